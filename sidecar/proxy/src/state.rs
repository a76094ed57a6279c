//! The policy state of the proxy: the compiled config of this pod, swapped atomically on
//! reload, and the watcher that reloads it.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use custos_api::config::WorkloadIdentity;
use custos_api::policy::{Mode, UserIdentity};
use custos_jwt::{JwksSource, JwtError, Verifier, VerifierSettings};
use custos_policy::{CompiledPolicy, Engine, User, load_config};
use serde::Serialize;
use tokio::sync::watch;

use crate::metrics::{Metrics, ResultLabels};

/// Everything a request needs from the config, immutable once built.
pub(crate) struct PolicyState {
    /// The policies that select this pod.
    pub engine: Engine,
    /// `sha256:...` of the config.
    pub hash: String,
    /// Namespace of the config.
    pub namespace: String,
    /// Pod IP -> calling workload.
    pub workloads: HashMap<IpAddr, WorkloadIdentity>,
    /// Token verifiers of the selected policies, in decision order, without duplicates.
    pub verifiers: Vec<Arc<Verifier>>,
    /// For each of the engine's policies, in its order, the index of its verifier in
    /// `verifiers` (none for a policy without `spec.identity.users`).
    pub policy_verifiers: Vec<Option<usize>>,
    /// The app.
    pub upstream: SocketAddr,
    /// `http://<upstream>` authority, for request URIs.
    pub upstream_authority: http::uri::Authority,
    /// Whether any selected policy is enforced (otherwise request-side refusals of identity
    /// are only recorded).
    pub enforcing: bool,
    /// Whether any enforced policy verifies users: only then does a token no verifier accepts
    /// get 401 (an Audit-mode policy's verifier refusing it is recorded in its dry run).
    pub enforcing_identity: bool,
}

impl PolicyState {
    /// Verifies the `Authorization` header value with each of the policies' identity
    /// settings: the user each verifier found, in the order of `verifiers`. An error when
    /// none accepted the token: see [`verify_with`]. Empty when no selected policy verifies
    /// users.
    pub(crate) async fn verify(&self, authorization: &[u8]) -> Result<Users, JwtError> {
        verify_with(&self.verifiers, authorization).await
    }

    /// When `policy` verifies users and its verifier refused the request's token (`users` of a
    /// request that sent one), why: `invalid_token` or `identity_unavailable` (`all_refused`,
    /// the code of a token every verifier refused, when `users` holds none).
    pub(crate) fn refused_by(
        &self,
        users: &Users,
        policy: Option<&CompiledPolicy>,
        all_refused: &'static str,
    ) -> Option<&'static str> {
        match users.by_verifier.get(self.verifier_of(policy)?) {
            None => Some(all_refused),
            Some(Err(code)) => Some(code),
            Some(Ok(_)) => None,
        }
    }

    /// The user the `i`-th of the engine's policies sees: the one its own verifier found.
    pub(crate) fn user_of<'u>(&self, users: &'u Users, i: usize) -> Option<&'u User> {
        let v = (*self.policy_verifiers.get(i)?)?;
        users.by_verifier.get(v)?.as_ref().ok()
    }

    /// The user `policy`'s own verifier found: what its row filter and masks see as `user`.
    /// None for a policy that verifies no users, even when another policy's verifier found
    /// one (its `user.*` is absent, as documented).
    pub(crate) fn policy_user<'u>(
        &self,
        users: &'u Users,
        policy: Option<&CompiledPolicy>,
    ) -> Option<&'u User> {
        self.user_of(users, self.index_of(policy?)?)
    }

    /// The index in `verifiers` of `policy`'s verifier; none for no policy or one that
    /// verifies no users.
    fn verifier_of(&self, policy: Option<&CompiledPolicy>) -> Option<usize> {
        self.policy_verifiers.get(self.index_of(policy?)?).copied().flatten()
    }

    /// The position of `policy` (one of this state's) among the engine's policies.
    fn index_of(&self, policy: &CompiledPolicy) -> Option<usize> {
        self.engine.policies().iter().position(|q| std::ptr::eq(policy, q))
    }

    /// The user to record for a request `policy` decided: the one that policy's verifier
    /// found, or, for a policy that verifies no users (or no policy), the first any verifier
    /// found.
    pub(crate) fn user_for<'u>(&self, users: &'u Users, policy: Option<&CompiledPolicy>) -> Option<&'u User> {
        match self.verifier_of(policy) {
            Some(v) => users.by_verifier.get(v)?.as_ref().ok(),
            None => users.by_verifier.iter().find_map(|u| u.as_ref().ok()),
        }
    }
}

/// The users a request's token verified as, one per verifier of [`PolicyState`] (none where
/// that verifier refused it). Each policy sees only its own verifier's: a token one issuer
/// signed for one audience must not pass for a policy that trusts another.
#[derive(Debug, Default)]
pub(crate) struct Users {
    /// Each verifier's user, or why it refused the token.
    by_verifier: Vec<Result<User, &'static str>>,
}

/// [`PolicyState::verify`] with these verifiers. When every verifier refuses the token, the
/// error is that of the first verifier whose issuer the token's (unverified) `iss` names, or,
/// when it names none of theirs, the first verifier's. A token of issuer B is then refused
/// for B's reason (`expired`, or B's JWKS unavailable: 503), not for verifier A's
/// `invalid_issuer` or `unknown_kid`. The `iss` is read only on this failure path.
async fn verify_with(verifiers: &[Arc<Verifier>], authorization: &[u8]) -> Result<Users, JwtError> {
    let mut errors = Vec::new();
    let mut users = Vec::with_capacity(verifiers.len());
    for v in verifiers {
        match v.verify(authorization).await {
            Ok(user) => users.push(Ok(user)),
            Err(e) => {
                users.push(Err(refusal_code(&e)));
                errors.push(e);
            }
        }
    }
    if errors.is_empty() || errors.len() < verifiers.len() {
        return Ok(Users { by_verifier: users });
    }
    // Every verifier refused: `errors` is in the order of `verifiers`.
    let reported = verifiers.iter().position(|v| v.names_issuer(authorization)).unwrap_or(0);
    Err(errors.swap_remove(reported))
}

/// The reason code of a token refusal: the token's fault, or the identity provider's.
pub(crate) fn refusal_code(e: &JwtError) -> &'static str {
    if e.is_client_error() { "invalid_token" } else { "identity_unavailable" }
}

/// What the config needs from the settings.
#[derive(Clone, Debug)]
pub(crate) struct StateInputs {
    pub config_path: PathBuf,
    pub namespace: Option<String>,
    pub pod_labels: BTreeMap<String, String>,
    pub upstream: Option<SocketAddr>,
    pub jwks_dir: PathBuf,
    pub jwks_refresh: Duration,
    pub jwks_timeout: Duration,
}

/// Verifiers kept across reloads, so that a reload does not drop cached JWKS.
#[derive(Default)]
pub(crate) struct VerifierCache {
    verifiers: HashMap<String, Arc<Verifier>>,
}

impl VerifierCache {
    fn get(&mut self, identity: &UserIdentity, inputs: &StateInputs) -> Result<Arc<Verifier>, String> {
        let key = serde_json::to_string(identity).map_err(|e| e.to_string())?;
        if let Some(v) = self.verifiers.get(&key) {
            return Ok(v.clone());
        }
        let jwt = &identity.jwt;
        let source = match (&jwt.jwks_secret_ref, &jwt.jwks_uri) {
            (Some(secret), _) => JwksSource::File(
                inputs.jwks_dir.join(&secret.name).join(secret.key.as_deref().unwrap_or("jwks.json")),
            ),
            (None, Some(url)) => JwksSource::Url {
                url: url.clone(),
                refresh: inputs.jwks_refresh,
                timeout: inputs.jwks_timeout,
            },
            (None, None) => return Err("identity.users.jwt has neither jwksSecretRef nor jwksUri".into()),
        };
        let verifier = Verifier::new(VerifierSettings::from_identity(identity), source)
            .map_err(|e| format!("JWT verifier: {e}"))?;
        // URL sources: fetch now and keep refreshing in the background.
        let _ = verifier.start();
        let verifier = Arc::new(verifier);
        self.verifiers.insert(key, verifier.clone());
        Ok(verifier)
    }

    /// Drops verifiers no longer used by `state`.
    fn retain_used(&mut self, state: &PolicyState) {
        self.verifiers.retain(|_, v| state.verifiers.iter().any(|u| Arc::ptr_eq(u, v)));
    }

    /// Forgets the verifiers made since `known` was taken ([`Self::known`]): a config rejected
    /// part way leaves none behind (their JWKS refresh loops end with the last reference; a
    /// storm of rejected configs naming new `jwksUri`s kept them all fetching).
    fn forget_all_but(&mut self, known: &std::collections::HashSet<String>) {
        self.verifiers.retain(|key, _| known.contains(key));
    }

    /// The keys of the verifiers kept now.
    fn known(&self) -> std::collections::HashSet<String> {
        self.verifiers.keys().cloned().collect()
    }

    /// How many verifiers are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.verifiers.len()
    }
}

/// Builds the state from config bytes. The error is a message for logs and `/ready` (it
/// names fields and policies, never request data).
pub(crate) fn build_state(
    bytes: &[u8],
    inputs: &StateInputs,
    cache: &mut VerifierCache,
    previous_upstream: Option<SocketAddr>,
) -> Result<PolicyState, String> {
    let (config, policies) = load_config(bytes).map_err(|e| e.to_string())?;
    if let Some(ns) = &inputs.namespace
        && *ns != config.namespace
    {
        return Err(format!(
            "config is for namespace '{}' but this pod is in namespace '{ns}'",
            config.namespace
        ));
    }
    let engine = Engine::new(policies).for_pod(&inputs.pod_labels);

    let mut app_ports: Vec<u16> = engine.policies().iter().map(|p| p.app_port).collect();
    app_ports.sort_unstable();
    app_ports.dedup();
    let upstream = match (inputs.upstream, app_ports.as_slice()) {
        (Some(u), _) => u,
        (None, [port]) => SocketAddr::from(([127, 0, 0, 1], *port)),
        (None, []) => previous_upstream.ok_or_else(|| {
            "no policy of the config selects this pod's labels and --upstream is not set".to_string()
        })?,
        (None, ports) => {
            return Err(format!(
                "the policies selecting this pod name different appPorts ({ports:?}); set --upstream"
            ));
        }
    };
    let upstream_authority = http::uri::Authority::try_from(upstream.to_string().as_str())
        .map_err(|e| format!("upstream address: {e}"))?;

    let mut workloads = HashMap::with_capacity(config.workloads.len());
    for w in &config.workloads {
        match w.ip.parse::<IpAddr>() {
            Ok(ip) => {
                workloads.insert(ip.to_canonical(), w.clone());
            }
            Err(_) => {
                tracing::warn!(namespace = %w.namespace, service_account = %w.service_account, "workload identity with an invalid IP ignored")
            }
        }
    }

    let mut verifiers: Vec<Arc<Verifier>> = Vec::new();
    let mut policy_verifiers = Vec::with_capacity(engine.policies().len());
    let known = cache.known();
    for policy in engine.policies() {
        let Some(identity) = &policy.identity else {
            policy_verifiers.push(None);
            continue;
        };
        let v = match cache.get(identity, inputs) {
            Ok(v) => v,
            Err(e) => {
                cache.forget_all_but(&known);
                return Err(format!("policy {}: {e}", policy.name));
            }
        };
        let index = match verifiers.iter().position(|u| Arc::ptr_eq(u, &v)) {
            Some(i) => i,
            None => {
                verifiers.push(v);
                verifiers.len() - 1
            }
        };
        policy_verifiers.push(Some(index));
    }
    let enforcing = engine.policies().iter().any(|p| p.mode == Mode::Enforce);
    let enforcing_identity =
        engine.policies().iter().any(|p| p.mode == Mode::Enforce && p.identity.is_some());
    let state = PolicyState {
        engine,
        hash: config.hash,
        namespace: config.namespace,
        workloads,
        verifiers,
        policy_verifiers,
        upstream,
        upstream_authority,
        enforcing,
        enforcing_identity,
    };
    cache.retain_used(&state);
    Ok(state)
}

/// What `/ready` reports.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ReadyReport {
    /// Whether a valid config is loaded and the proxy is not shutting down.
    pub ready: bool,
    /// Hash of the config in force.
    pub config_hash: Option<String>,
    /// Namespace of the config in force.
    pub namespace: Option<String>,
    /// Policies of the config that select this pod.
    pub policies: Vec<String>,
    /// Why the last config read was rejected; `None` once a valid config applies.
    pub last_reload_error: Option<String>,
    /// When the config in force was loaded (RFC 3339).
    pub loaded_at: Option<String>,
    /// True while draining on shutdown.
    pub shutting_down: bool,
}

/// The policy state plus what the admin server reports about it.
pub(crate) struct ConfigCell {
    pub current: ArcSwapOption<PolicyState>,
    pub report: Mutex<ReadyReport>,
}

impl ConfigCell {
    pub(crate) fn new() -> Self {
        ConfigCell { current: ArcSwapOption::empty(), report: Mutex::new(ReadyReport::default()) }
    }

    /// Installs a new state.
    pub(crate) fn install(&self, state: PolicyState) {
        if let Ok(mut r) = self.report.lock() {
            r.config_hash = Some(state.hash.clone());
            r.namespace = Some(state.namespace.clone());
            r.policies = state.engine.policies().iter().map(|p| p.name.clone()).collect();
            r.last_reload_error = None;
            r.loaded_at = Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            r.ready = !r.shutting_down;
        }
        self.current.store(Some(Arc::new(state)));
    }

    /// Records a rejected config.
    pub(crate) fn reject(&self, message: String) {
        if let Ok(mut r) = self.report.lock() {
            r.last_reload_error = Some(message);
        }
    }

    /// Clears the last reload error: the file reads again, as the config in force.
    fn clear_reload_error(&self) {
        if let Ok(mut r) = self.report.lock() {
            r.last_reload_error = None;
        }
    }

    /// Marks the proxy as shutting down (not ready).
    pub(crate) fn shutting_down(&self) {
        if let Ok(mut r) = self.report.lock() {
            r.shutting_down = true;
            r.ready = false;
        }
    }

    /// A copy of the report.
    pub(crate) fn report(&self) -> ReadyReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// A content hash for change detection.
pub(crate) fn content_hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Ticks after which an unchanged rejected config is tried again.
const RETRY_FAILED_AFTER_TICKS: u32 = 20;

/// The config file as the sidecar last read it.
pub(crate) struct LastRead {
    /// Its [`content_hash`].
    pub hash: u64,
    /// It was rejected (and is tried again now and then).
    pub rejected: bool,
}

/// Polls the config file and applies changes until `shutdown` turns true. A file that cannot
/// be read is a failed reload too (logged, counted and shown in `/ready` once per error).
pub(crate) async fn watch_config(
    cell: Arc<ConfigCell>,
    metrics: Arc<Metrics>,
    inputs: StateInputs,
    mut cache: VerifierCache,
    last: LastRead,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_hash = last.hash;
    let mut last_read_error: Option<String> = None;
    // A rejected config is retried now and then even if unchanged: what it refers to (a JWKS
    // Secret) may appear later. The first one too.
    let mut failed_ticks: Option<u32> = last.rejected.then_some(0);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticker.tick() => {}
        }
        // A ConfigMap volume swaps a symlink: read the path itself each time.
        let bytes = match tokio::fs::read(&inputs.config_path).await {
            Ok(b) => b,
            Err(e) => {
                let msg = format!("cannot read config file {}: {e}", inputs.config_path.display());
                if last_read_error.as_ref() != Some(&msg) {
                    tracing::warn!(error = %msg, "config file unreadable; keeping the config in force");
                    metrics.config_reloads.get_or_create(&ResultLabels { result: "failure" }).inc();
                    cell.reject(msg.clone());
                    last_read_error = Some(msg);
                }
                continue;
            }
        };
        let hash = content_hash(&bytes);
        if last_read_error.take().is_some() && hash == last_hash {
            match &mut failed_ticks {
                // Back as it was: the config in force is the file's again.
                None => {
                    tracing::info!("config file readable again, unchanged");
                    cell.clear_reload_error();
                }
                // A rejected one: tried again now, so that /ready says why again.
                Some(n) => *n = RETRY_FAILED_AFTER_TICKS,
            }
        }
        if hash == last_hash {
            match &mut failed_ticks {
                Some(n) if *n >= RETRY_FAILED_AFTER_TICKS => *n = 0,
                Some(n) => {
                    *n += 1;
                    continue;
                }
                None => continue,
            }
        }
        last_hash = hash;
        let previous_upstream = cell.current.load().as_ref().map(|s| s.upstream);
        match build_state(&bytes, &inputs, &mut cache, previous_upstream) {
            Ok(state) => {
                tracing::info!(config_hash = %state.hash, policies = state.engine.policies().len(), "config reloaded");
                metrics.config_reloads.get_or_create(&ResultLabels { result: "success" }).inc();
                cell.install(state);
                failed_ticks = None;
            }
            Err(message) => {
                tracing::error!(error = %message, "config rejected; keeping the last good config");
                metrics.config_reloads.get_or_create(&ResultLabels { result: "failure" }).inc();
                cell.reject(message);
                failed_ticks = Some(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{SystemTime, UNIX_EPOCH};

    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::{Value, json};

    use super::*;

    const A: &str = "https://a.example";
    const B: &str = "https://b.example";

    /// The test-only Ed25519 key of sidecar/jwt/testdata.
    fn key() -> EncodingKey {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../jwt/testdata/test-only-ed25519.pkcs8.der");
        EncodingKey::from_ed_der(&std::fs::read(path).unwrap())
    }

    fn settings(issuer: &str) -> VerifierSettings {
        VerifierSettings {
            issuer: issuer.into(),
            audiences: vec!["api".into()],
            leeway: Duration::from_secs(30),
            id_claim: "sub".into(),
            attributes: BTreeMap::new(),
        }
    }

    /// A verifier of `issuer` whose static JWKS holds the test key as `kid`.
    fn verifier(issuer: &str, kid: &str) -> Arc<Verifier> {
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&key(), Algorithm::EdDSA).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        let jwks = json!({"keys": [jwk]}).to_string();
        Arc::new(Verifier::new(settings(issuer), JwksSource::Static(jwks)).unwrap())
    }

    /// A config rejected part way (the second policy's JWKS file is missing) leaves no
    /// verifier of the first policy behind: their refresh loops would keep fetching.
    #[test]
    fn a_rejected_config_leaves_no_verifier_behind() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |jwt: Value| {
            let spec = json!({
                "workload": {"selector": {"matchLabels": {"app": "api"}}, "appPort": 8080},
                "identity": {"users": {"jwt": jwt}},
                "rules": [{"name": "r", "action": "Allow", "to": {"paths": ["/**"]}}],
            });
            serde_json::from_value::<custos_api::policy::DataAccessPolicySpec>(spec).unwrap()
        };
        let input = |name: &str, jwt: Value| custos_policy::PolicyInput {
            name: name.into(),
            generation: Some(1),
            spec: spec(jwt),
        };
        let inputs = [
            input(
                "a-remote",
                json!({"issuer": A, "audiences": ["api"], "jwksUri": "https://idp.example/jwks"}),
            ),
            input("b-file", json!({"issuer": B, "audiences": ["api"], "jwksSecretRef": {"name": "absent"}})),
        ];
        let compiled = custos_policy::compile_namespace("shop", &inputs, Vec::new());
        assert!(compiled.is_clean(), "{:?}", compiled.errors);
        let bytes = serde_json::to_vec(&compiled.config).unwrap();
        let state_inputs = StateInputs {
            config_path: dir.path().join("config.json"),
            namespace: Some("shop".into()),
            pod_labels: BTreeMap::from([("app".to_owned(), "api".to_owned())]),
            upstream: None,
            jwks_dir: dir.path().to_path_buf(),
            jwks_refresh: Duration::from_secs(300),
            jwks_timeout: Duration::from_secs(5),
        };
        let mut cache = VerifierCache::default();
        let error = build_state(&bytes, &state_inputs, &mut cache, None).map(|_| ()).unwrap_err();
        assert!(error.contains("b-file"), "{error}");
        assert_eq!(cache.len(), 0, "the first policy's verifier was kept");
        // With the file there, the config applies and both verifiers are kept.
        std::fs::create_dir_all(dir.path().join("absent")).unwrap();
        let jwk = serde_json::to_value(Jwk::from_encoding_key(&key(), Algorithm::EdDSA).unwrap()).unwrap();
        std::fs::write(dir.path().join("absent/jwks.json"), json!({"keys": [jwk]}).to_string()).unwrap();
        build_state(&bytes, &state_inputs, &mut cache, None).unwrap();
        assert_eq!(cache.len(), 2);
    }

    fn bearer(kid: &str, claims: &Value) -> Vec<u8> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        format!("Bearer {}", jsonwebtoken::encode(&header, claims, &key()).unwrap()).into_bytes()
    }

    fn claims(issuer: &str, exp: u64) -> Value {
        json!({"iss": issuer, "aud": "api", "sub": "u1", "exp": exp})
    }

    fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    /// When every verifier refuses a token, the refusal reported is that of the verifier of
    /// the issuer the token names, not the first verifier's.
    #[tokio::test]
    async fn the_refusal_of_the_tokens_own_issuer_is_reported() {
        let (a, b) = (verifier(A, "a-key"), verifier(B, "b-key"));
        let both = [a.clone(), b.clone()];

        // Expired at B: A refuses it for its unknown kid, B because it expired.
        let expired = bearer("b-key", &claims(B, 1_000));
        assert_eq!(a.verify(&expired).await.unwrap_err(), JwtError::UnknownKid);
        assert_eq!(verify_with(&both, &expired).await.unwrap_err(), JwtError::Expired);
        // Either order.
        assert_eq!(verify_with(&[b.clone(), a.clone()], &expired).await.unwrap_err(), JwtError::Expired);

        // A token naming no verifier's issuer: the first verifier's refusal, as before.
        let stranger = bearer("b-key", &claims("https://c.example", now() + 600));
        assert_eq!(verify_with(&both, &stranger).await.unwrap_err(), JwtError::UnknownKid);
        assert_eq!(
            verify_with(&[b.clone(), a.clone()], &stranger).await.unwrap_err(),
            JwtError::InvalidIssuer
        );
        // Unparsable: the first refusal.
        assert_eq!(verify_with(&both, b"Basic x").await.unwrap_err(), JwtError::InvalidScheme);

        // A good token of B: accepted by B, refused by A; not an error.
        let good = bearer("b-key", &claims(B, now() + 600));
        let users = verify_with(&both, &good).await.unwrap();
        assert_eq!(users.by_verifier[0], Err("invalid_token"));
        assert_eq!(users.by_verifier[1].as_ref().unwrap().id, "u1");
        // No verifiers: no users, no error.
        assert!(verify_with(&[], &good).await.unwrap().by_verifier.is_empty());
    }

    /// A token of issuer B whose JWKS cannot be fetched gets B's 503 refusal, not verifier A's
    /// 401.
    #[tokio::test]
    async fn an_unavailable_jwks_of_the_tokens_issuer_is_reported() {
        let a = verifier(A, "a-key");
        // Nothing listens on port 1: the fetch fails at once.
        let source = JwksSource::Url {
            url: "http://127.0.0.1:1/jwks".into(),
            refresh: Duration::from_secs(300),
            timeout: Duration::from_secs(2),
        };
        let b = Arc::new(Verifier::new(settings(B), source).unwrap());
        let token = bearer("b-key", &claims(B, now() + 600));
        let error = verify_with(&[a, b], &token).await.unwrap_err();
        assert_eq!(error, JwtError::JwksUnavailable);
        assert!(!error.is_client_error());
    }
}
