//! Calling workloads behind a service mesh's proxy.
//!
//! Where Istio intercepts a pod's inbound traffic, its Envoy terminates the caller's mutual
//! TLS and opens its own connection to the Custos sidecar, from 127.0.0.6: the peer address
//! names no workload. What Envoy knows of the caller it adds to the request instead, as the
//! last element of `x-forwarded-client-cert` (XFCC): Istio's sidecars run with
//! `forward_client_cert_details: APPEND_FORWARD`, which appends the element of the verified
//! client certificate when the connection is mutual TLS and removes the header otherwise, so
//! the last element is Envoy's own and a client cannot forge it through Envoy.
//!
//! With `--caller-identity istio` the sidecar reads the caller's SPIFFE id there
//! (`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`) for connections from
//! 127.0.0.6 or ::6, the addresses Istio's inbound passthrough connects from; a connection
//! from anywhere else did not come through Envoy's HTTP handling (another process of the pod
//! on 127.0.0.1, say, which the app could be made to call), so its XFCC is removed and the
//! identity table applies as without a mesh. Envoy handles XFCC only where it reads the port
//! as HTTP: a port Istio treats as TCP (a Service port named `tcp-*`, `appProtocol: tcp`)
//! passes the client's own header through, so the proxy port must be HTTP to Istio. A
//! certificate carries no pod labels: such a caller matches the `from.workloads` entries of
//! Allow rules that name no labels, and those of Deny rules whatever their labels.
//!
//! Linkerd's proxy does the same with `l5d-client-id`: its inbound side sets the header to the
//! verified client identity (`<service account>.<namespace>.serviceaccount.identity.<control
//! plane namespace>.<trust domain>`) on requests of mutual TLS connections, and removes it
//! from all others. Since Linkerd 2.11 it connects to the pod's own address (before, to
//! 127.0.0.1), where the app, or any other process of the pod, could connect from too; so with
//! `--caller-identity linkerd` the header is believed only on connections whose other end is
//! a socket of the pod owned by the Linkerd proxy's user id (2102 unless the mesh says
//! otherwise), as the kernel's socket tables show ([`crate::socket_owner`]); other
//! connections from the pod's own address are anonymous. Linkerd handles the header only on
//! connections it reads as HTTP: an opaque port, or a connection its protocol detection gives
//! up on (no request within 10 s), is forwarded as TCP with the client's own header, so the
//! proxy port needs a Linkerd `Server` with `proxyProtocol: HTTP/1` (or `HTTP/2`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use custos_api::WorkloadIdentity;
use http::HeaderMap;
use http::header::HeaderName;

/// The header Envoy adds the verified client certificate's details to.
pub(crate) static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// The header Linkerd's inbound proxy sets to the verified client identity.
pub(crate) static L5D_CLIENT_ID: HeaderName = HeaderName::from_static("l5d-client-id");

/// The user id Linkerd's proxy runs as unless its `proxy.uid` is changed.
pub const LINKERD_PROXY_UID: u32 = 2102;

/// The user id Istio's sidecar (`istio-proxy`) runs as unless the mesh sets another
/// (`values.global.proxy.runAsUser`, or a platform that picks user ids per namespace).
pub const ISTIO_PROXY_UID: u32 = 1337;

/// How the sidecar tells which workload is calling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CallerIdentity {
    /// The peer address, looked up in the config's identity table.
    #[default]
    PeerIp,
    /// Behind Istio's sidecar: the SPIFFE id of the client certificate Envoy verified (the last
    /// element of `x-forwarded-client-cert`) for connections from 127.0.0.6 or ::6; the peer
    /// address for the others.
    Istio,
    /// Behind Linkerd's proxy: the client identity it verified (`l5d-client-id`), for
    /// connections from a socket of the pod owned by the proxy's user id; the peer address for
    /// the others.
    Linkerd,
}

/// The mesh settings of the sidecar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshIdentity {
    /// Which mesh's proxy sits in front of the sidecar.
    pub mesh: Mesh,
    /// The mesh's trust domain: identities of other trust domains name no workload here.
    pub trust_domain: String,
}

/// A service mesh whose proxy forwards callers to the sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mesh {
    /// Istio: `x-forwarded-client-cert` from 127.0.0.6 or ::6, on connections from a socket
    /// of the pod owned by `proxy_uid`.
    Istio {
        /// The user id Envoy runs as.
        proxy_uid: u32,
    },
    /// Linkerd: `l5d-client-id` from a socket of the pod owned by `proxy_uid`.
    Linkerd {
        /// The user id Linkerd's proxy runs as.
        proxy_uid: u32,
    },
}

/// What the XFCC header said of a caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MeshCaller {
    /// A workload of the trust domain.
    Workload {
        /// Namespace of the calling workload.
        namespace: String,
        /// Its service account.
        service_account: String,
    },
    /// No XFCC or `l5d-client-id` (the connection to the mesh's proxy was not mutual TLS):
    /// anonymous.
    NoCertificate,
    /// A SPIFFE id of another trust domain: anonymous.
    ForeignTrustDomain,
    /// An XFCC element without exactly one Kubernetes SPIFFE id, or an `l5d-client-id` that is
    /// not one workload's identity: anonymous.
    Malformed,
}

impl MeshCaller {
    /// Metric label.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            MeshCaller::Workload { .. } => "workload",
            MeshCaller::NoCertificate => "no_certificate",
            MeshCaller::ForeignTrustDomain => "foreign_trust_domain",
            MeshCaller::Malformed => "malformed",
        }
    }

    /// The caller as the decision engine sees it (labels unknown), when it is a workload.
    pub(crate) fn identity(self, peer: &str) -> Option<WorkloadIdentity> {
        match self {
            MeshCaller::Workload { namespace, service_account } => Some(WorkloadIdentity {
                ip: peer.to_owned(),
                namespace,
                service_account,
                labels: Default::default(),
                labels_unknown: true,
            }),
            _ => None,
        }
    }
}

/// Where a connection comes from, as far as the mesh's identity header goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The mesh's proxy: its identity header names the caller.
    MeshProxy,
    /// Behind Linkerd, another process of the pod on the pod's own address: anonymous (the
    /// identity table would name the pod itself, as it would every caller if the proxy's user
    /// id were set wrong).
    Pod,
    /// Anywhere else: the identity table applies.
    Peer,
}

/// The warning that a connection from Istio's address belongs to another user than its proxy's.
static FOREIGN_OWNER_WARNINGS: crate::throttle::Throttle = crate::throttle::Throttle::every_secs(10);

/// How a connection's [`Origin`] is found: at once, or (Linkerd) from the pod's socket table,
/// read once per connection on its first request, off the proxy thread (the table of a busy
/// pod is long, and the accept loop must not wait for it).
#[derive(Clone, Debug)]
pub(crate) enum OriginCheck {
    /// Known when the connection was accepted.
    Known(Origin),
    /// The owner of the peer's socket decides.
    SocketTable {
        /// The connection's local address.
        local: SocketAddr,
        /// The user id of the mesh's proxy.
        proxy_uid: u32,
        /// The answer, once read.
        answer: Arc<tokio::sync::OnceCell<Origin>>,
    },
}

impl OriginCheck {
    /// The origin of the connection from `peer`.
    pub(crate) async fn origin(&self, peer: SocketAddr) -> Origin {
        match self {
            OriginCheck::Known(origin) => *origin,
            OriginCheck::SocketTable { local, proxy_uid, answer } => {
                let (local, proxy_uid) = (*local, *proxy_uid);
                *answer
                    .get_or_init(|| async move {
                        let owner =
                            tokio::task::spawn_blocking(move || crate::socket_owner::peer_uid(peer, local))
                                .await
                                .ok()
                                .flatten();
                        if owner == Some(proxy_uid) {
                            Origin::MeshProxy
                        } else if let Some(owner) = owner.filter(|_| MeshIdentity::trusts(peer.ip())) {
                            // Istio's address, another user: a process of the pod, or Envoy
                            // running as another user than --istio-proxy-uid says.
                            if FOREIGN_OWNER_WARNINGS.due() {
                                tracing::warn!(
                                    owner,
                                    proxy_uid,
                                    "a connection from Istio's address 127.0.0.6 is not the proxy user's: its \
                                     x-forwarded-client-cert is ignored (if Envoy runs as this user, set \
                                     --istio-proxy-uid; said at most every 10 s)"
                                );
                            }
                            Origin::Peer
                        } else if peer.ip().to_canonical() == local.ip().to_canonical() {
                            Origin::Pod
                        } else {
                            Origin::Peer
                        }
                    })
                    .await
            }
        }
    }
}

impl MeshIdentity {
    /// How to find the origin of a connection from `peer` accepted on `local` (`None` when
    /// the address cannot be read: then it is not the mesh's proxy).
    pub(crate) fn origin_check(&self, peer: SocketAddr, local: Option<SocketAddr>) -> OriginCheck {
        match (self.mesh, local) {
            // Any process of the pod may bind 127.0.0.6 and connect to 127.0.0.1, which Istio's
            // redirection leaves alone: the address alone would believe its XFCC.
            (Mesh::Istio { proxy_uid }, Some(local)) if Self::trusts(peer.ip()) => {
                OriginCheck::SocketTable { local, proxy_uid, answer: Arc::default() }
            }
            (Mesh::Istio { .. }, _) => OriginCheck::Known(Origin::Peer),
            // Linkerd's proxy connects from the pod's own address (before 2.11, loopback):
            // another peer cannot be it, and its connection needs no read of the socket table
            // (a pod's table is long, and a flood of connections would read it for each).
            (Mesh::Linkerd { proxy_uid }, Some(local))
                if peer.ip().to_canonical() == local.ip().to_canonical()
                    || peer.ip().to_canonical().is_loopback() =>
            {
                OriginCheck::SocketTable { local, proxy_uid, answer: Arc::default() }
            }
            (Mesh::Linkerd { .. }, Some(_)) => OriginCheck::Known(Origin::Peer),
            (Mesh::Linkerd { .. }, None) => OriginCheck::Known(Origin::Pod),
        }
    }

    /// The header the mesh's proxy names the caller in: removed from requests of other
    /// connections (the caller's own words, for the app as for the sidecar).
    pub(crate) fn header(&self) -> &'static HeaderName {
        match self.mesh {
            Mesh::Istio { .. } => &XFCC,
            Mesh::Linkerd { .. } => &L5D_CLIENT_ID,
        }
    }

    /// Whether the XFCC of a connection from `peer` is Envoy's: Istio's inbound passthrough
    /// connects from 127.0.0.6 (IPv6: ::6).
    pub(crate) fn trusts(peer: IpAddr) -> bool {
        match peer.to_canonical() {
            IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::new(127, 0, 0, 6),
            IpAddr::V6(v6) => v6 == std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6),
        }
    }

    /// The caller the mesh's proxy named in `headers`.
    pub(crate) fn caller(&self, headers: &HeaderMap) -> MeshCaller {
        match self.mesh {
            Mesh::Istio { .. } => self.xfcc_caller(headers),
            Mesh::Linkerd { .. } => self.linkerd_caller(headers),
        }
    }

    /// The caller of an `l5d-client-id`: Linkerd sets one value (replacing any the client
    /// sent), `<sa>.<ns>.serviceaccount.identity.<control plane namespace>.<trust domain>`.
    fn linkerd_caller(&self, headers: &HeaderMap) -> MeshCaller {
        let mut values = headers.get_all(&L5D_CLIENT_ID).iter();
        let (value, None) = (values.next(), values.next()) else { return MeshCaller::Malformed };
        let Some(value) = value else { return MeshCaller::NoCertificate };
        let Ok(id) = value.to_str() else { return MeshCaller::Malformed };
        let Some((workload, issuer)) = id.split_once(".serviceaccount.identity.") else {
            return MeshCaller::Malformed;
        };
        let (Some((sa, ns)), Some((control_plane, domain))) =
            (workload.rsplit_once('.'), issuer.split_once('.'))
        else {
            return MeshCaller::Malformed;
        };
        if !(is_dns_subdomain(sa) && is_dns_label(ns) && is_dns_label(control_plane)) {
            return MeshCaller::Malformed;
        }
        if !domain.eq_ignore_ascii_case(&self.trust_domain) {
            return MeshCaller::ForeignTrustDomain;
        }
        MeshCaller::Workload { namespace: ns.to_owned(), service_account: sa.to_owned() }
    }

    /// The caller named by the last XFCC element of `headers`.
    fn xfcc_caller(&self, headers: &HeaderMap) -> MeshCaller {
        let Some(last) = headers.get_all(&XFCC).iter().next_back() else {
            return MeshCaller::NoCertificate;
        };
        let Ok(text) = last.to_str() else { return MeshCaller::Malformed };
        match last_element_uris(text) {
            Some(uris) => self.caller_of(&uris),
            None => MeshCaller::Malformed,
        }
    }

    fn caller_of(&self, uris: &[String]) -> MeshCaller {
        let mut spiffe =
            uris.iter().filter(|u| u.get(..9).is_some_and(|s| s.eq_ignore_ascii_case("spiffe://")));
        let (Some(id), None) = (spiffe.next(), spiffe.next()) else { return MeshCaller::Malformed };
        let rest = &id[9..];
        let Some((domain, path)) = rest.split_once('/') else { return MeshCaller::Malformed };
        if !domain.eq_ignore_ascii_case(&self.trust_domain) {
            return MeshCaller::ForeignTrustDomain;
        }
        let mut segments = path.split('/');
        match (segments.next(), segments.next(), segments.next(), segments.next(), segments.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if is_dns_label(ns) && is_dns_subdomain(sa) =>
            {
                MeshCaller::Workload { namespace: ns.to_owned(), service_account: sa.to_owned() }
            }
            _ => MeshCaller::Malformed,
        }
    }
}

/// The `URI` values of the last element of an XFCC header value (elements separated by
/// commas, key=value pairs by semicolons, values with those characters double-quoted, `\"`
/// within quotes); `None` when it does not parse.
fn last_element_uris(text: &str) -> Option<Vec<String>> {
    let elements = split_unquoted(text, b',')?;
    let last = elements.last()?;
    let mut uris = Vec::new();
    for pair in split_unquoted(last, b';')? {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair.split_once('=')?;
        if key.trim().eq_ignore_ascii_case("uri") {
            uris.push(unquote(value.trim())?);
        }
    }
    Some(uris)
}

/// Splits at `separator` outside double quotes; `None` for an unterminated quote.
fn split_unquoted(text: &str, separator: u8) -> Option<Vec<&str>> {
    let bytes = text.as_bytes();
    let (mut parts, mut start, mut quoted, mut i) = (Vec::new(), 0, false, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b if b == separator && !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if quoted {
        return None;
    }
    parts.push(&text[start..]);
    Some(parts)
}

/// A value without its double quotes and with `\"` (and `\\`) unescaped; a bare value as is.
fn unquote(value: &str) -> Option<String> {
    let Some(inner) = value.strip_prefix('"') else {
        return (!value.contains('"')).then(|| value.to_owned());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// A Kubernetes namespace name: an RFC 1123 label.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A service account name: an RFC 1123 subdomain.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    fn mesh() -> MeshIdentity {
        MeshIdentity {
            mesh: Mesh::Istio { proxy_uid: ISTIO_PROXY_UID },
            trust_domain: "cluster.local".into(),
        }
    }

    fn linkerd() -> MeshIdentity {
        MeshIdentity {
            mesh: Mesh::Linkerd { proxy_uid: LINKERD_PROXY_UID },
            trust_domain: "cluster.local".into(),
        }
    }

    fn linkerd_caller(values: &[&str]) -> MeshCaller {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(&L5D_CLIENT_ID, HeaderValue::from_str(v).unwrap());
        }
        // XFCC means nothing behind Linkerd.
        headers.append(&XFCC, HeaderValue::from_static("URI=spiffe://cluster.local/ns/x/sa/y"));
        linkerd().caller(&headers)
    }

    #[test]
    fn l5d_client_id_table() {
        let cases: &[(&[&str], MeshCaller)] = &[
            (
                &["ops-portal.logistics.serviceaccount.identity.linkerd.cluster.local"],
                workload("logistics", "ops-portal"),
            ),
            (
                &["svc.acct-1.a-b.serviceaccount.identity.linkerd-cp.cluster.local"],
                workload("a-b", "svc.acct-1"),
            ),
            (&["web.shop.serviceaccount.identity.linkerd.CLUSTER.LOCAL"], workload("shop", "web")),
            (&[], MeshCaller::NoCertificate),
            (&["web.shop.serviceaccount.identity.linkerd.other.mesh"], MeshCaller::ForeignTrustDomain),
            // Linkerd sets one value: more are not its own.
            (
                &[
                    "web.shop.serviceaccount.identity.linkerd.cluster.local",
                    "web.shop.serviceaccount.identity.linkerd.cluster.local",
                ],
                MeshCaller::Malformed,
            ),
            (&["shop.serviceaccount.identity.linkerd.cluster.local"], MeshCaller::Malformed),
            (&["web.shop.serviceaccount.identity.linkerd"], MeshCaller::Malformed),
            (&["web.Shop.serviceaccount.identity.linkerd.cluster.local"], MeshCaller::Malformed),
            (&["web..serviceaccount.identity.linkerd.cluster.local"], MeshCaller::Malformed),
            (&["web.shop.serviceaccount.identity..cluster.local"], MeshCaller::Malformed),
            (&["web/x.shop.serviceaccount.identity.linkerd.cluster.local"], MeshCaller::Malformed),
            (&["spiffe://cluster.local/ns/shop/sa/web"], MeshCaller::Malformed),
            (&[""], MeshCaller::Malformed),
        ];
        for (values, want) in cases {
            assert_eq!(&linkerd_caller(values), want, "{values:?}");
        }
        assert_eq!(linkerd().header(), &L5D_CLIENT_ID);
        assert_eq!(mesh().header(), &XFCC);
    }

    /// Only a socket of the mesh proxy's user id is believed: this process's connection is
    /// believed when the proxy's user id is this process's; otherwise, behind Linkerd from the
    /// pod's own address, it is anonymous, and from another address the table applies. Behind
    /// Istio, only connections from 127.0.0.6 are looked up at all.
    #[tokio::test]
    async fn only_the_mesh_proxys_sockets_are_trusted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let own = crate::socket_owner::tests::own_uid();
        let (behind_linkerd, behind_istio) =
            (|proxy_uid| Mesh::Linkerd { proxy_uid }, |proxy_uid| Mesh::Istio { proxy_uid });
        for (from, mesh, want) in [
            ("127.0.0.1", behind_linkerd(own), Origin::MeshProxy),
            ("127.0.0.1", behind_linkerd(own.wrapping_add(1)), Origin::Pod),
            ("127.0.0.2", behind_linkerd(own.wrapping_add(1)), Origin::Peer),
            ("127.0.0.6", behind_istio(own), Origin::MeshProxy),
            // Another process of the pod bound Envoy's address.
            ("127.0.0.6", behind_istio(own.wrapping_add(1)), Origin::Peer),
            ("127.0.0.2", behind_istio(own), Origin::Peer),
        ] {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
            let _client = socket.connect(to).await.unwrap();
            let (server, peer) = listener.accept().await.unwrap();
            let proxy_uid = match mesh {
                Mesh::Linkerd { proxy_uid } | Mesh::Istio { proxy_uid } => proxy_uid,
            };
            let mesh = MeshIdentity { mesh, trust_domain: "cluster.local".into() };
            let check = mesh.origin_check(peer, server.local_addr().ok());
            assert_eq!(check.origin(peer).await, want, "{from}, proxy uid {proxy_uid}");
            assert_eq!(check.origin(peer).await, want, "read once, kept");
        }
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        // No local address: never the proxy.
        assert!(matches!(linkerd().origin_check(peer, None), OriginCheck::Known(Origin::Pod)));
        assert!(matches!(mesh().origin_check(peer, None), OriginCheck::Known(Origin::Peer)));
        // Linkerd: a peer neither loopback nor the pod's own address is never its proxy, and
        // the socket table is not read for it.
        let local: SocketAddr = "10.0.0.5:15080".parse().unwrap();
        for (from, table) in [("10.0.0.9:40000", false), ("10.0.0.5:40000", true), ("127.0.0.1:40000", true)]
        {
            let check = linkerd().origin_check(from.parse().unwrap(), Some(local));
            assert_eq!(matches!(check, OriginCheck::SocketTable { .. }), table, "{from}");
        }
        let envoy: SocketAddr = "127.0.0.6:40000".parse().unwrap();
        assert!(matches!(mesh().origin_check(envoy, None), OriginCheck::Known(Origin::Peer)));
    }

    fn caller(values: &[&str]) -> MeshCaller {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(&XFCC, HeaderValue::from_str(v).unwrap());
        }
        mesh().caller(&headers)
    }

    fn workload(ns: &str, sa: &str) -> MeshCaller {
        MeshCaller::Workload { namespace: ns.into(), service_account: sa.into() }
    }

    const ENVOY: &str = "By=spiffe://cluster.local/ns/shop/sa/customer-api;\
                         Hash=0f7b1c64e7bc5e6b1d2a9c8c6f0b8a4e3d2c1b0a99887766554433221100ffee;\
                         Subject=\"\";URI=spiffe://cluster.local/ns/logistics/sa/ops-portal";

    #[test]
    fn xfcc_table() {
        let forged = "By=x;URI=spiffe://cluster.local/ns/logistics/sa/ops-portal";
        let cases: Vec<(Vec<String>, MeshCaller)> = vec![
            (vec![ENVOY.into()], workload("logistics", "ops-portal")),
            (vec![], MeshCaller::NoCertificate),
            // The last element is Envoy's: what a client put before it does not count.
            (
                vec![format!(
                    "{forged},By=spiffe://cluster.local/ns/shop/sa/customer-api;URI=spiffe://cluster.local/ns/storefront/sa/web"
                )],
                workload("storefront", "web"),
            ),
            // ...also across header fields (the last field's last element).
            (vec![forged.replace("ops-portal", "admin"), ENVOY.into()], workload("logistics", "ops-portal")),
            // Quoted values with separators and escaped quotes, keys in any case.
            (
                vec![
                    r#"By=a;Subject="CN=x, O=\"y;z\"";uri="spiffe://cluster.local/ns/a-b/sa/svc.acct-1""#
                        .into(),
                ],
                workload("a-b", "svc.acct-1"),
            ),
            (vec!["URI=spiffe://CLUSTER.LOCAL/ns/shop/sa/web".into()], workload("shop", "web")),
            // Refused: another trust domain, two SPIFFE ids, none, not a workload id.
            (vec!["URI=spiffe://other.mesh/ns/shop/sa/web".into()], MeshCaller::ForeignTrustDomain),
            (
                vec!["URI=spiffe://cluster.local/ns/a/sa/b;URI=spiffe://cluster.local/ns/c/sa/d".into()],
                MeshCaller::Malformed,
            ),
            (vec!["By=spiffe://cluster.local/ns/a/sa/b;Hash=00".into()], MeshCaller::Malformed),
            (vec!["URI=https://cluster.local/ns/a/sa/b".into()], MeshCaller::Malformed),
            (vec!["URI=spiffe://cluster.local/ns/a/sa/b/extra".into()], MeshCaller::Malformed),
            (vec!["URI=spiffe://cluster.local/ns/a/sa".into()], MeshCaller::Malformed),
            (vec!["URI=spiffe://cluster.local/ns//sa/b".into()], MeshCaller::Malformed),
            (vec!["URI=spiffe://cluster.local/ns/A/sa/b".into()], MeshCaller::Malformed),
            (vec!["URI=spiffe://cluster.local/ns/a/sa/b%2F..".into()], MeshCaller::Malformed),
            (vec!["URI=spiffe://cluster.local".into()], MeshCaller::Malformed),
            (vec![r#"URI="spiffe://cluster.local/ns/a/sa/b"#.into()], MeshCaller::Malformed),
            (vec!["URI".into()], MeshCaller::Malformed),
            // A trailing comma: the last element is empty, so names nobody.
            (vec![format!("{ENVOY},")], MeshCaller::Malformed),
        ];
        for (values, want) in cases {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            assert_eq!(caller(&values), want, "{values:?}");
        }
    }

    #[test]
    fn only_istios_passthrough_address_is_trusted() {
        for (ip, trusted) in [
            ("127.0.0.6", true),
            ("::6", true),
            ("::ffff:127.0.0.6", true),
            // Other processes of the pod (an app made to call its own sidecar).
            ("127.0.0.1", false),
            ("::1", false),
            ("127.0.0.7", false),
            ("10.0.0.7", false),
            ("::ffff:10.0.0.7", false),
            ("fd00::1", false),
        ] {
            assert_eq!(MeshIdentity::trusts(ip.parse().unwrap()), trusted, "{ip}");
        }
    }

    #[test]
    fn a_workload_caller_has_unknown_labels() {
        let id = workload("logistics", "ops-portal").identity("127.0.0.6").unwrap();
        assert!(id.labels_unknown && id.labels.is_empty());
        assert_eq!((id.namespace.as_str(), id.service_account.as_str()), ("logistics", "ops-portal"));
        assert_eq!(MeshCaller::Malformed.identity("127.0.0.6"), None);
    }

    proptest! {
        /// Any header text: an answer, never a panic; a workload only with a well-formed id.
        #[test]
        fn any_xfcc_is_answered(text in "[ -~]{0,200}") {
            if let Ok(value) = HeaderValue::from_str(&text) {
                let mut headers = HeaderMap::new();
                headers.insert(&XFCC, value.clone());
                if let MeshCaller::Workload { namespace, service_account } = mesh().caller(&headers) {
                    prop_assert!(is_dns_label(&namespace) && is_dns_subdomain(&service_account));
                }
                let mut headers = HeaderMap::new();
                headers.insert(&L5D_CLIENT_ID, value);
                if let MeshCaller::Workload { namespace, service_account } = linkerd().caller(&headers) {
                    prop_assert!(is_dns_label(&namespace) && is_dns_subdomain(&service_account));
                    prop_assert!(text.contains(".serviceaccount.identity."));
                }
            }
        }

        /// A client's elements before Envoy's never change the answer.
        #[test]
        fn elements_before_the_last_do_not_count(prefix in "[ -~&&[^\"]]{0,100}") {
            let mut headers = HeaderMap::new();
            headers.insert(&XFCC, HeaderValue::from_str(&format!("{prefix},{ENVOY}")).unwrap());
            prop_assert_eq!(mesh().caller(&headers), workload("logistics", "ops-portal"));
        }
    }
}
