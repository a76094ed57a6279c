//! Keyed hashes for `Hash` masks and record ids.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// An HMAC-SHA256 key. Equal inputs hash equally under the same key, so masked values still
/// join and audit queries can find a data subject by the hash of its id; without the key the
/// hashes cannot be reversed by guessing.
///
/// Record ids are hashed under the key itself; `Hash` masks under a key derived from it
/// (`HMAC(key, "custos/mask-hash/v1")`). A caller sees mask hashes, so with one key a masked
/// value would be linkable to the audit trail's record-id hashes, and a user who can have a
/// value of their own Hash-masked would get an oracle for the record-id hashes.
#[derive(Clone)]
pub struct HashKey {
    /// The MAC with the key already absorbed; cloned for each hash.
    mac: Hmac<Sha256>,
    /// The same for the derived key of `Hash` masks.
    mask: Hmac<Sha256>,
}

/// What the key of `Hash` masks is derived with.
const MASK_KEY_LABEL: &[u8] = b"custos/mask-hash/v1";

impl HashKey {
    /// A key of any length (HMAC hashes keys longer than the block size).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        let bytes = bytes.into();
        let mac = keyed(&bytes);
        let mut derive = mac.clone();
        derive.update(MASK_KEY_LABEL);
        let mask = keyed(&derive.finalize().into_bytes());
        HashKey { mac, mask }
    }

    /// The HMAC-SHA256 of `data` under the key of `Hash` masks, as 64 lower-case hex digits
    /// (a masked value shows the first 32, after `h:`).
    pub fn mask_hash_hex(&self, data: &[u8]) -> String {
        hex32(&self.mask_mac(data))
    }

    /// The raw HMAC-SHA256 of `data` under the key of `Hash` masks.
    pub(crate) fn mask_mac(&self, data: &[u8]) -> [u8; 32] {
        finish(&self.mask, data)
    }

    /// The HMAC-SHA256 of `data`, as 64 lower-case hex digits.
    pub fn hash_hex(&self, data: &[u8]) -> String {
        hex32(&self.mac(data))
    }

    /// The raw HMAC-SHA256 of `data`.
    pub(crate) fn mac(&self, data: &[u8]) -> [u8; 32] {
        finish(&self.mac, data)
    }
}

/// The MAC of `data` with `keyed`'s key.
fn finish(keyed: &Hmac<Sha256>, data: &[u8]) -> [u8; 32] {
    let mut mac = keyed.clone();
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// A MAC as 64 lower-case hex digits.
fn hex32(mac: &[u8; 32]) -> String {
    let mut out = String::with_capacity(64);
    push_hex(&mut out, mac);
    out
}

/// An HMAC-SHA256 with `key` absorbed.
fn keyed(key: &[u8]) -> Hmac<Sha256> {
    match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(mac) => mac,
        // HMAC accepts keys of every length; this arm is never taken.
        Err(_) => <Hmac<Sha256> as hmac::digest::KeyInit>::new(&Default::default()),
    }
}

/// Appends `bytes` as lower-case hex.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_test_case_2() {
        let key = HashKey::new(b"Jefe".to_vec());
        assert_eq!(
            key.hash_hex(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// Mask hashes are under HMAC(key, label): unlinkable to the record-id hashes.
    #[test]
    fn mask_hashes_use_a_derived_key() {
        let key = HashKey::new(b"Jefe".to_vec());
        let derived = HashKey::new(hex::decode(key.hash_hex(MASK_KEY_LABEL)).expect("hex"));
        assert_eq!(key.mask_hash_hex(b"+4917612345678"), derived.hash_hex(b"+4917612345678"));
        assert_ne!(key.mask_hash_hex(b"+4917612345678"), key.hash_hex(b"+4917612345678"));
    }

    #[test]
    fn hex_matches_the_hex_crate() {
        let bytes: Vec<u8> = (0..=255).collect();
        let mut out = String::new();
        push_hex(&mut out, &bytes);
        assert_eq!(out, hex::encode(&bytes));
    }

    #[test]
    fn long_keys_and_debug() {
        let key = HashKey::new(vec![7u8; 200]);
        assert_eq!(key.hash_hex(b"x"), key.clone().hash_hex(b"x"));
        assert_ne!(key.hash_hex(b"x"), HashKey::new("other").hash_hex(b"x"));
        assert_eq!(format!("{key:?}"), "HashKey(..)");
    }
}
