//! The user that owns the other end of a TCP connection made within the pod, read from the
//! kernel's socket tables (`/proc/net/tcp` and `/proc/net/tcp6`).
//!
//! Every container of a pod shares one network namespace, so these tables list the sockets
//! of the pod's other processes too, each with the user id that created it: a connection from
//! the mesh's proxy can be told from one the app (or anything else in the pod) opened by that
//! user id, where the addresses are the same. A peer outside the pod has no socket there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The socket tables of this network namespace.
const TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];

/// The user id owning the socket at `peer` connected to `local`; `None` when no socket of this
/// network namespace is (the peer is outside the pod) or the tables cannot be read.
pub(crate) fn peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    TABLES.iter().find_map(|path| uid_in_table(&std::fs::read_to_string(path).ok()?, peer, local))
}

/// The user id of the socket at `peer` connected to `local` in the text of a socket table
/// (`sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid ...`).
pub(crate) fn uid_in_table(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let _slot = fields.next()?;
        let (own, remote) = (parse_address(fields.next()?)?, parse_address(fields.next()?)?);
        if !(same(own, peer) && same(remote, local)) {
            return None;
        }
        // st, tx_queue:rx_queue, tr:tm->when, retrnsmt, then uid.
        fields.nth(4)?.parse().ok()
    })
}

/// Addresses compared with IPv4-mapped IPv6 read as IPv4.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// `0100007F:1F90`: the address as the kernel prints it (each 32-bit word of the network-order
/// address as a native-endian hex number), then the port in hex.
fn parse_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The hex of an address as this machine's kernel prints it.
    fn hex(addr: SocketAddr) -> String {
        let words: Vec<[u8; 4]> = match addr.ip() {
            IpAddr::V4(v4) => vec![v4.octets()],
            IpAddr::V6(v6) => v6.octets().chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect(),
        };
        let ip: String = words.iter().map(|w| format!("{:08X}", u32::from_ne_bytes(*w))).collect();
        format!("{ip}:{:04X}", addr.port())
    }

    const HEADER: &str =
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";

    fn row(own: SocketAddr, remote: SocketAddr, uid: &str) -> String {
        format!(
            "   0: {} {} 01 00000000:00000000 00:00000000 00000000  {uid}        0 12345 1 0 20 4 30 10 -1",
            hex(own),
            hex(remote)
        )
    }

    #[test]
    fn finds_the_owner_of_the_peer_socket() {
        let proxy: SocketAddr = "10.1.2.3:15080".parse().unwrap();
        let mesh: SocketAddr = "10.1.2.3:40312".parse().unwrap();
        let app: SocketAddr = "10.1.2.3:40400".parse().unwrap();
        let table = [
            HEADER.to_owned(),
            // The sidecar's own end of each connection, and its listener.
            row(proxy, mesh, "1000"),
            row(proxy, app, "1000"),
            row(proxy, "0.0.0.0:0".parse().unwrap(), "1000"),
            row(mesh, proxy, "2102"),
            row(app, proxy, "1001"),
        ]
        .join("\n");
        assert_eq!(uid_in_table(&table, mesh, proxy), Some(2102));
        assert_eq!(uid_in_table(&table, app, proxy), Some(1001));
        // A peer outside the pod has no socket here.
        assert_eq!(uid_in_table(&table, "10.9.9.9:40312".parse().unwrap(), proxy), None);
        // IPv6 rows, and an IPv4 peer seen through a dual-stack listener.
        let v6: SocketAddr = "[fd00::1:2]:40312".parse().unwrap();
        let local6: SocketAddr = "[fd00::1:2]:15080".parse().unwrap();
        let table6 = [HEADER.to_owned(), row(v6, local6, "2102")].join("\n");
        assert_eq!(uid_in_table(&table6, v6, local6), Some(2102));
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:40312".parse().unwrap();
        let mapped_local: SocketAddr = "[::ffff:10.1.2.3]:15080".parse().unwrap();
        assert_eq!(uid_in_table(&table, mapped, mapped_local), Some(2102));
    }

    #[test]
    fn malformed_tables_name_nobody() {
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:15080".parse().unwrap();
        let good = row(peer, local, "7");
        let cases = [
            String::new(),
            HEADER.to_owned(),
            format!("{HEADER}\n{}", &good[..good.find("  7 ").unwrap()]),
            format!("{HEADER}\n{}", good.replace("  7  ", "  x  ")),
            format!("{HEADER}\n{}", &good[..good.find(" 01 ").unwrap()]),
            format!("{HEADER}\n   0: 0100007F {}", hex(local)),
            format!("{HEADER}\n   0: 0100007G:9C40 {} 01 0 0 0 7", hex(local)),
            format!("{HEADER}\n   0: 00007F:9C40 {} 01 0 0 0 7", hex(local)),
            // The header line is not a row.
            good.clone(),
        ];
        for table in cases {
            assert_eq!(uid_in_table(&table, peer, local), None, "{table}");
        }
        assert_eq!(uid_in_table(&format!("{HEADER}\n{good}"), peer, local), Some(7));
    }

    /// The user of this process, from `/proc/self/status`.
    pub(crate) fn own_uid() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// This machine's kernel, over a real connection on loopback.
    #[test]
    fn reads_this_kernels_tables() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(peer_uid(peer, local), Some(own_uid()));
        drop(client);
        let elsewhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(peer_uid(elsewhere, local), None);
    }
}
