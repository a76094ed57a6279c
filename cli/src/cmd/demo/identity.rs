//! Who calls in the demo: end users with tokens signed by a fresh Ed25519 key (published as a
//! JWKS), and calling workloads identified by their loopback source address, as the operator's
//! workload table would identify pod IPs.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use custos_api::WorkloadIdentity;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use serde_json::{Value, json};

/// Key id of the demo's signing key in every JWKS.
const KID: &str = "custos-demo-1";
/// Issuer of the staff single sign-on (clerks, support agents).
pub(crate) const SSO_ISSUER: &str = "https://sso.swiftparcel.example";
/// Issuer of the scanners' device tokens.
pub(crate) const DEVICE_ISSUER: &str = "https://devices.swiftparcel.example";
/// Issuer of the storefront's customer accounts.
pub(crate) const ACCOUNTS_ISSUER: &str = "https://accounts.swiftparcel.example";

/// A calling workload: the source address its requests come from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Workload {
    /// Loopback source address (all of 127.0.0.0/8 is local on Linux).
    pub(crate) ip: Ipv4Addr,
    /// Its namespace.
    pub(crate) namespace: &'static str,
    /// Its service account.
    pub(crate) service_account: &'static str,
}

/// The clerks' web portal (logistics).
pub(crate) const OPS_PORTAL: Workload =
    Workload { ip: Ipv4Addr::new(127, 0, 0, 2), namespace: "logistics", service_account: "ops-portal" };
/// The back-office admin console.
pub(crate) const ADMIN_CONSOLE: Workload =
    Workload { ip: Ipv4Addr::new(127, 0, 0, 3), namespace: "backoffice", service_account: "admin-console" };
/// The storefront's backend for frontend.
pub(crate) const STOREFRONT_BFF: Workload =
    Workload { ip: Ipv4Addr::new(127, 0, 0, 4), namespace: "storefront", service_account: "storefront-bff" };
/// The depot scanners' gateway.
pub(crate) const SCANNER_GATEWAY: Workload =
    Workload { ip: Ipv4Addr::new(127, 0, 0, 5), namespace: "scanning", service_account: "scanner-gateway" };
/// A workload no rule names (where a rented account gets used from).
pub(crate) const BILLING: Workload =
    Workload { ip: Ipv4Addr::new(127, 0, 0, 6), namespace: "logistics", service_account: "billing" };
/// Callers from outside the cluster: not in the workload table, hence anonymous workloads.
pub(crate) const INTERNET: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The workload identity table given to every namespace's config.
pub(crate) fn workload_table() -> Vec<WorkloadIdentity> {
    [OPS_PORTAL, ADMIN_CONSOLE, STOREFRONT_BFF, SCANNER_GATEWAY, BILLING]
        .iter()
        .map(|w| WorkloadIdentity {
            ip: w.ip.to_string(),
            namespace: w.namespace.to_owned(),
            service_account: w.service_account.to_owned(),
            labels: BTreeMap::from([("app".to_owned(), w.service_account.to_owned())]),
            labels_unknown: false,
        })
        .collect()
}

/// DER prefix of a PKCS#8 v1 Ed25519 private key (RFC 8410), followed by the 32-byte seed.
const PKCS8_V1_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
/// DER of the PKCS#8 v2 document ring generates, after the outer SEQUENCE header: version 1,
/// the Ed25519 algorithm, the seed's OCTET STRING header (the seed, then the public key follow).
const PKCS8_V2_HEAD: [u8; 14] =
    [0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// ring's PKCS#8 v2 document as the v1 document jsonwebtoken reads (its JWK export expects
/// exactly the 48 bytes of v1).
fn pkcs8_v1(v2: &[u8]) -> anyhow::Result<Vec<u8>> {
    match (v2.get(2..16), v2.get(16..48)) {
        (Some(head), Some(seed)) if v2[0] == 0x30 && head == PKCS8_V2_HEAD => {
            Ok([&PKCS8_V1_PREFIX[..], seed].concat())
        }
        _ => Err(anyhow!("unexpected PKCS#8 document from the key generator")),
    }
}

/// The demo's token issuer: one Ed25519 key for the three identity providers.
pub(crate) struct Issuer {
    key: EncodingKey,
}

impl Issuer {
    /// A fresh key, never written anywhere (the JWKS holds its public part).
    pub(crate) fn generate() -> anyhow::Result<Issuer> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| anyhow!("cannot generate an Ed25519 key"))?;
        Ok(Issuer { key: EncodingKey::from_ed_der(&pkcs8_v1(pkcs8.as_ref())?) })
    }

    /// The public key as a JWKS document.
    pub(crate) fn jwks(&self) -> anyhow::Result<String> {
        let jwk = Jwk::from_encoding_key(&self.key, Algorithm::EdDSA).context("the demo key as a JWK")?;
        let mut jwk = serde_json::to_value(jwk)?;
        jwk["kid"] = json!(KID);
        jwk["use"] = json!("sig");
        jwk["alg"] = json!("EdDSA");
        Ok(json!({"keys": [jwk]}).to_string())
    }

    /// A token of `issuer` for `audiences`, valid for an hour, with `claims` added.
    fn sign(&self, issuer: &str, audiences: &[&str], claims: Value) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut body = json!({"iss": issuer, "aud": audiences, "iat": now, "exp": now + 3600});
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), claims) {
            body.extend(extra);
        }
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(KID.to_owned());
        jsonwebtoken::encode(&header, &body, &self.key).context("cannot sign a demo token")
    }

    /// A branch clerk's SSO token (customer-api and waybill-api).
    pub(crate) fn clerk(&self, sub: &str, branch: &str) -> anyhow::Result<String> {
        self.sign(
            SSO_ISSUER,
            &["customer-api", "waybill-api"],
            json!({"sub": sub, "role": "clerk", "branch_id": branch}),
        )
    }

    /// A back-office employee's SSO token (member-admin).
    pub(crate) fn staff(&self, sub: &str, role: &str, team: &str) -> anyhow::Result<String> {
        self.sign(SSO_ISSUER, &["member-admin"], json!({"sub": sub, "role": role, "team": team}))
    }

    /// A storefront customer account's token.
    pub(crate) fn shopper(&self, sub: &str, tier: &str) -> anyhow::Result<String> {
        self.sign(ACCOUNTS_ISSUER, &["storefront"], json!({"sub": sub, "tier": tier}))
    }

    /// A depot scanner's device token.
    pub(crate) fn device(&self, device: &str, depot: &str) -> anyhow::Result<String> {
        self.sign(
            DEVICE_ISSUER,
            &["parcel-scan"],
            json!({"sub": device, "device_id": device, "depot_id": depot}),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use jsonwebtoken::{DecodingKey, Validation, jwk::JwkSet};

    use super::*;

    #[test]
    fn tokens_verify_against_the_published_jwks() {
        let issuer = Issuer::generate().unwrap();
        let jwks: JwkSet = serde_json::from_str(&issuer.jwks().unwrap()).unwrap();
        let key = DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&["customer-api"]);
        validation.set_issuer(&[SSO_ISSUER]);
        let token = issuer.clerk("clerk-1", "HB-07").unwrap();
        let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation).unwrap().claims;
        assert_eq!(claims["branch_id"], "HB-07");
        assert_eq!(claims["role"], "clerk");
        // Another key does not verify it.
        let other: JwkSet = serde_json::from_str(&Issuer::generate().unwrap().jwks().unwrap()).unwrap();
        let other = DecodingKey::from_jwk(&other.keys[0]).unwrap();
        assert!(jsonwebtoken::decode::<Value>(&token, &other, &validation).is_err());
    }

    #[test]
    fn the_workload_table_names_each_caller_once() {
        let table = workload_table();
        let ips: std::collections::BTreeSet<_> = table.iter().map(|w| w.ip.clone()).collect();
        assert_eq!(ips.len(), table.len());
        assert!(!ips.contains(&INTERNET.to_string()));
    }
}
