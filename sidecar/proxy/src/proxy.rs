//! The request path: a tower [`Service`] that enforces the policy state current at the time
//! of each request (read from an `ArcSwap`, so reloads never block requests) and forwards to
//! the app.
//!
//! Per request: hygiene (inbound `x-custos-*` headers stripped; method-override headers,
//! CONNECT and absolute-form targets refused; header and body limits), path normalisation,
//! identity (peer workload, JWT user), decision, quotas, forwarding with the normalised path,
//! response transform, record accounting, and one audit event.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use custos_api::audit::{
    AUDIT_SCHEMA_VERSION, AppliedRule, AuditUser, CallerWorkload, DryRun, DryRunTransform, MAX_ALSO_APPLIED,
    MAX_DRY_RUNS,
};
use custos_api::config::WorkloadIdentity;
use custos_api::policy::{ExceedAction, Limits, Mode};
use custos_api::{AuditEvent, Decision};
use custos_policy::{NormalizedPath, Request as EngineRequest, User, Verdict, normalize};
use custos_quota::{QuotaKey, Quotas, Timestamp};
use custos_transform::expr::{RequestVars, UserVars, Vars, WorkloadVars};
use custos_transform::{HashKey, Outcome, Phase, Plan, TransformError, TransformStats};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use serde_json::json;

use crate::audit::PendingEvent;
use crate::body::{
    AppBody, Chunks, Collected, DRY_RUN_BUFFER_EXHAUSTED, DRY_RUN_BUFFER_TOO_SMALL, DecodeError, Encoding,
    ProxyBody, TeeEnd, TeeLimits, Teed, UPSTREAM_TIMEOUT, collect_limited, concat, decode,
};
use crate::budget::{BufferBudget, Reservation};
use crate::method_override::{self, BodyKind, PostBody, Scanned};
use crate::metrics::{
    DryRunLabels, LimitLabels, Metrics, ReasonLabels, ResultLabels, RuleLabels, ThreadCounters,
};
use crate::request_body::{BufferError, RequestBody, read_request_body};
use crate::settings::ProxyLimits;
use crate::state::{ConfigCell, PolicyState, Users};
use crate::upstream::{Upstream, UpstreamSettings};

/// Headers that ask a server to treat a request as another method. Refused with 400: a
/// backend honouring them would run e.g. a DELETE that the policy decided as a POST.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] =
    ["x-http-method-override", "x-http-method", "x-method-override"];

/// Hop-by-hop headers, never forwarded in either direction (`TE: trailers` is asked of the
/// app again when the client sent it; see [`strip_hop_by_hop`]). `Trailer` is not one of
/// them (RFC 9110 §6.6.2): it announces the trailer fields of a response passed through (a
/// request's go nowhere: [`upstream_request`] removes it, and the request body its fields).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

/// Bit of `TE` in [`strip_hop_by_hop`]'s set of present names.
const TE_BIT: u16 = 1 << 3;

/// The transform's failure code for a partial response (206 or `Content-Range`): a slice is
/// never a document the plan applies to, so it fails closed even under `failOpen`.
const PARTIAL_CONTENT: &str = "partial_content";

/// The transform's failure code when the response buffers are full: 503 with `Retry-After`
/// (a matter of load, not of the response).
const RESPONSE_BUFFER_EXHAUSTED: &str = "response_buffer_exhausted";

/// Reason code of a response whose `Content-Encoding` the sidecar cannot decode.
const UNSUPPORTED_CONTENT_ENCODING: &str = "unsupported_content_encoding";

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// State shared by every request (cloned per proxy thread: the `Arc`s are shared, the
/// upstream connections and counter handles are per thread, see [`Shared::for_thread`]).
#[derive(Clone)]
pub(crate) struct Shared {
    pub config: Arc<ConfigCell>,
    pub metrics: Arc<Metrics>,
    pub quotas: Arc<Quotas>,
    /// The quotas of dry runs (Audit-mode policies beside the deciding one): their own table,
    /// so that they cannot crowd out the enforced counts; merged with the cluster-wide usage
    /// of its principals like the enforced one.
    pub dry_run_quotas: Arc<Quotas>,
    /// The ids of this process's audit events (they carry its instance tag).
    pub event_ids: Arc<crate::event_ids::EventIds>,
    pub shipper: custos_shipper::Shipper,
    pub upstream: Arc<Upstream<RequestBody>>,
    /// This thread's handles on the per-request counters.
    pub counters: Arc<ThreadCounters>,
    pub hash_key: HashKey,
    pub limits: ProxyLimits,
    pub pod_name: Option<String>,
    /// `--namespace`: the pod's namespace, which events carry before a config is loaded (a
    /// namespace token's collector refuses events of any other, `""` included).
    pub namespace: Option<String>,
    pub cluster: Option<String>,
    /// `--caller-identity istio|linkerd`: callers through the mesh's proxy.
    pub mesh: Option<crate::MeshIdentity>,
    /// Open client connections allowed, across all proxy threads.
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    /// Memory for request bodies read before the app is called, across all proxy threads.
    pub request_buffers: Arc<BufferBudget>,
    /// What responses read to be transformed hold together.
    pub response_buffers: Arc<BufferBudget>,
    /// What the dry runs hold together (copies of responses, decoded bodies, documents): a
    /// quarter of the response budget's size, apart from it, so that a trial policy never
    /// takes room an enforced response needs.
    pub dry_run_buffers: Arc<BufferBudget>,
}

impl Shared {
    /// A copy for one of `threads` proxy threads: its own upstream connections (driven by
    /// the runtime that uses them; its share of the maximum) and its own counter handles.
    pub(crate) fn for_thread(&self, threads: usize) -> Shared {
        Shared {
            upstream: upstream(&self.limits, threads, &self.metrics),
            counters: Arc::new(ThreadCounters::new(&self.metrics)),
            ..self.clone()
        }
    }
}

/// The keep-alive HTTP/1.1 connections to the app of one of `threads` proxy threads (or of
/// the process's shared runtime: 1), with its share of the maximum (rounded up).
pub(crate) fn upstream(
    limits: &ProxyLimits,
    threads: usize,
    metrics: &Metrics,
) -> Arc<Upstream<RequestBody>> {
    let settings = UpstreamSettings {
        connect_timeout: limits.upstream_connect_timeout,
        max_connections: limits.upstream_max_connections.div_ceil(threads.max(1)),
        ..UpstreamSettings::default()
    };
    Arc::new(Upstream::new(settings, metrics.upstream.clone()))
}

/// The enforcing service of one client connection.
#[derive(Clone)]
pub(crate) struct Enforcer {
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// Whether the connection comes from the mesh's proxy (`Shared::mesh`), whose identity
    /// header is then the proxy's.
    origin: crate::mesh::OriginCheck,
}

impl Enforcer {
    pub(crate) fn new(shared: Arc<Shared>, peer: SocketAddr, origin: crate::mesh::OriginCheck) -> Self {
        Enforcer { shared, peer, origin }
    }
}

impl tower::Service<Request<Incoming>> for Enforcer {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let shared = self.shared.clone();
        let (peer, origin) = (self.peer, self.origin.clone());
        Box::pin(async move {
            let origin = match origin {
                crate::mesh::OriginCheck::Known(origin) => origin,
                check => check.origin(peer).await,
            };
            Ok(handle(shared, peer, origin, req).await)
        })
    }
}

/// What is known about a request as it goes through the pipeline.
struct Ctx {
    event: AuditEvent,
    /// Reason code for the metric label (bounded set).
    reason: &'static str,
    /// Set when Audit mode lets through what Enforce would refuse.
    would_deny: Option<&'static str>,
    /// The dry runs are completed and counted when the response body ends (a tee).
    dry_runs_at_body_end: bool,
    started: Instant,
    /// The peer's address as text (formatted once: principal and `x-forwarded-for`).
    peer_ip: String,
}

impl Ctx {
    /// The event names the rule of `job`, which refused the response (another policy's than
    /// the deciding one's, when several apply).
    /// When that rule was one of `alsoApplied`, it and the deciding rule trade places, each
    /// with the principal it counts by (`rulePrincipal` becomes the named rule's), so that the
    /// collector still charges every rule once, under its own key; the event's `principal`
    /// stays whom the request came from.
    fn name_rule(&mut self, job: &TransformJob) {
        let e = &mut self.event;
        if e.policy.as_deref() != Some(job.policy.as_str()) {
            let named = e.also_applied.iter().position(|a| a.policy == job.policy);
            let named_principal = named.map(|i| e.also_applied.remove(i)).and_then(|named| named.principal);
            if let (Some(_), Some(policy), Some(rule)) = (named, e.policy.take(), e.rule.take()) {
                let at = e.also_applied.partition_point(|a| a.policy < policy);
                let principal = e.rule_principal.take();
                e.also_applied.insert(at, AppliedRule { policy, rule, principal });
            }
            // Beyond the first MAX_ALSO_APPLIED rules the named one's key is not in the event.
            e.rule_principal = named_principal;
        }
        e.policy = Some(job.policy.clone());
        e.rule = Some(job.rule.clone());
    }

    fn set_reason(&mut self, code: &'static str) {
        self.reason = code;
        self.event.reason = code.to_string();
    }

    /// A refusal by the sidecar itself.
    fn deny(&mut self, code: &'static str) {
        self.event.decision = Decision::Deny;
        self.set_reason(code);
    }

    /// Audit mode: what Enforce would have refused.
    fn would_deny(&mut self, code: &'static str) {
        if self.would_deny.is_none() {
            self.would_deny = Some(code);
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    origin: crate::mesh::Origin,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let wall = SystemTime::now();
    let now = chrono::DateTime::<chrono::Utc>::from(wall);
    let peer_ip = ip_text(peer.ip());
    let ctx = Ctx {
        event: AuditEvent {
            schema_version: AUDIT_SCHEMA_VERSION,
            id: shared.event_ids.next(wall),
            time: crate::audit::event_time(&now),
            cluster: shared.cluster.clone(),
            // The config's once it is loaded (the same: a config of another namespace is
            // refused).
            namespace: shared.namespace.clone().unwrap_or_default(),
            policy: None,
            rule: None,
            mode: Mode::Disabled,
            pod: shared.pod_name.clone(),
            caller: None,
            user: None,
            // Replaced once the caller is known (`principal`); the peer's address until then.
            principal: ["peer:", &peer_ip].concat(),
            rule_principal: None,
            method: event_method(req.method()),
            path: "-".to_string(),
            decision: Decision::Allow,
            reason: String::new(),
            status: 0,
            records_returned: 0,
            records_filtered: 0,
            records_truncated: 0,
            masked: Default::default(),
            bytes: 0,
            latency_us: 0,
            trace_id: trace_id(req.headers()),
            record_hashes: Vec::new(),
            also_applied: Vec::new(),
            dry_runs: Vec::new(),
            prev_hash: None,
        },
        reason: "",
        would_deny: None,
        dry_runs_at_body_end: false,
        started,
        peer_ip,
    };
    let mut in_flight = InFlight { shared: &shared, ctx: Some(ctx) };
    let ctx = in_flight.ctx.as_mut().expect("set above");
    let response = process(&shared, ctx, peer, origin, req, wall).await;
    let ctx = in_flight.ctx.take().expect("taken once");
    finish(&shared, ctx, response)
}

/// Status and reason code of the event of a request whose client gave up before the
/// response head (nginx's 499).
const CLIENT_CANCELLED: (u16, &str) = (499, "client_cancelled");

/// A request's [`Ctx`] while it is processed. hyper drops the request's future when the
/// client goes away before the response head (an h2 RST_STREAM, a closed connection) and at
/// the drain time-out; by then the request may have reached the app, so dropping this emits
/// the event with [`CLIENT_CANCELLED`].
struct InFlight<'a> {
    shared: &'a Shared,
    ctx: Option<Ctx>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let Some(mut ctx) = self.ctx.take() else { return };
        let (status, code) = CLIENT_CANCELLED;
        ctx.reason = code;
        let mut event = close_event(self.shared, ctx, status);
        if event.reason.is_empty() {
            event.reason = code.to_string();
        } else {
            event.reason = format!("{},{code}", event.reason);
        }
        PendingEvent::new(event, self.shared.shipper.clone()).emit();
    }
}

/// The text of a peer's address, IPv4-mapped IPv6 as IPv4: what `Display` writes, without
/// the formatter's machinery for IPv4 (it cost about 1,300 instructions on every request).
fn ip_text(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                if octet >= 100 {
                    text.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    text.push(char::from(b'0' + octet / 10 % 10));
                }
                text.push(char::from(b'0' + octet % 10));
            }
            text
        }
        v6 => v6.to_string(),
    }
}

/// Completes the audit event and metrics, and attaches the event to the body.
fn finish(shared: &Shared, ctx: Ctx, response: Response<ProxyBody>) -> Response<ProxyBody> {
    let event = close_event(shared, ctx, response.status().as_u16());
    let pending = PendingEvent::new(event, shared.shipper.clone());
    response.map(|b| b.with_event(pending))
}

/// Completes the audit event of a request answered with `status`, and counts the request.
#[inline]
fn close_event(shared: &Shared, mut ctx: Ctx, status: u16) -> AuditEvent {
    let elapsed = ctx.started.elapsed();
    // Audit mode: what Enforce would have refused first. A refusal recorded before the
    // decision (a bad token) takes precedence over the engine's own WouldDeny, as Enforce
    // would have answered 401 before deciding; later ones only happen to allowed requests.
    if let Some(code) = ctx.would_deny
        && ctx.event.decision != Decision::Deny
    {
        ctx.event.decision = Decision::WouldDeny;
        ctx.reason = code;
        ctx.event.reason = format!("{code} (audit mode: not enforced)");
    }
    ctx.event.status = status;
    ctx.event.latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    shared.counters.request(
        &shared.metrics,
        ctx.event.decision.as_str(),
        ctx.event.policy.as_deref().unwrap_or(""),
        ctx.event.rule.as_deref().unwrap_or(""),
        ctx.reason,
    );
    shared.counters.latency.observe(elapsed);
    if !ctx.dry_runs_at_body_end {
        count_dry_runs(&shared.metrics, &ctx.event.dry_runs);
    }
    ctx.event
}

/// Counts `dry_runs` in `custos_sidecar_dry_runs_total`.
fn count_dry_runs(metrics: &Metrics, dry_runs: &[DryRun]) {
    for run in dry_runs {
        let labels = DryRunLabels {
            decision: run.decision.as_str(),
            policy: run.policy.clone(),
            rule: run.rule.clone().unwrap_or_default(),
            reason: run.reason.clone(),
        };
        metrics.dry_runs.get_or_create(&labels).inc();
    }
}

async fn process(
    shared: &Arc<Shared>,
    ctx: &mut Ctx,
    peer: SocketAddr,
    origin: crate::mesh::Origin,
    mut req: Request<Incoming>,
    wall: SystemTime,
) -> Response<ProxyBody> {
    let Some(state) = shared.config.current.load_full() else {
        ctx.deny("no_config");
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "no valid config loaded", "reason": "no_config"}),
        );
    };
    ctx.event.namespace.clone_from(&state.namespace);
    let limits = &shared.limits;

    // 1. Request hygiene.
    if header_bytes(&req) > limits.max_header_bytes {
        shared.metrics.limit("header_bytes");
        ctx.deny("header_too_large");
        return error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            json!({"error": "request headers too large", "reason": "header_too_large", "limit": limits.max_header_bytes}),
        );
    }
    if req.method() == Method::CONNECT {
        ctx.deny("connect_refused");
        return bad_request("CONNECT is not supported", "connect_refused");
    }
    if req.method().as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        // Methods are case-sensitive (RFC 9110 §9.1) and rules name them in capitals: `get`
        // would be decided as GET while an app comparing `r.Method == "GET"` runs another
        // branch for it.
        ctx.deny("method_case");
        return bad_request("methods are accepted in capital letters only", "method_case");
    }
    if req.version() <= Version::HTTP_11 && (req.uri().scheme().is_some() || req.uri().authority().is_some())
    {
        ctx.deny("absolute_form");
        return bad_request("absolute-form request targets are not accepted", "absolute_form");
    }
    // Hop-by-hop headers, those `Connection` names and inbound `x-custos-*` go first: what is
    // decided on is what the app is sent (`Connection: content-type` would otherwise take
    // away, after the method-override check read it, the type that check judged the body by).
    let accepts_trailers = strip_hop_by_hop(req.headers_mut());
    if req.headers().keys().any(is_method_override_header) {
        ctx.deny("method_override");
        return bad_request("method override headers are refused", "method_override");
    }
    if method_override::is_post(req.method())
        && req.uri().query().is_some_and(method_override::query_names_a_method)
    {
        ctx.deny("method_override");
        return bad_request("method override parameters are refused", "method_override");
    }
    if req.headers().get_all(header::AUTHORIZATION).iter().nth(1).is_some() {
        // A single-value field (RFC 9110 §11.6.2): the sidecar would verify one token and
        // the app might read another.
        ctx.deny("multiple_authorization");
        return bad_request("more than one Authorization header", "multiple_authorization");
    }
    // Read once: the limit here, the request buffer below.
    let declared_length = content_length(req.headers());
    if let Some(len) = declared_length
        && len > limits.max_request_body_bytes
    {
        shared.metrics.limit("request_body_bytes");
        ctx.deny("request_body_too_large");
        return body_too_large(limits.max_request_body_bytes);
    }

    // 2. Normalise.
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let path = match normalize(target) {
        Ok(p) => p,
        Err(rejection) => {
            ctx.deny("path_rejected");
            ctx.event.reason = format!("path_rejected:{}", rejection.code());
            return error_response(
                StatusCode::BAD_REQUEST,
                json!({"error": rejection.to_string(), "reason": rejection.code()}),
            );
        }
    };
    ctx.event.path = path.as_str().to_string();

    // 3. Identity.
    let ip = peer.ip().to_canonical();
    let mesh_caller;
    let caller = match &shared.mesh {
        Some(mesh) if origin == crate::mesh::Origin::MeshProxy => {
            let found = mesh.caller(req.headers());
            shared.metrics.mesh_callers.get_or_create(&ResultLabels { result: found.label() }).inc();
            mesh_caller = found.identity(&ctx.peer_ip);
            mesh_caller.as_ref()
        }
        Some(mesh) => {
            // Not through the mesh's proxy: whatever certificate details it claims are the
            // caller's own words, for the app as for the sidecar.
            req.headers_mut().remove(mesh.header());
            // Behind Linkerd, the pod's own address is every caller's: without the proxy's
            // word, anonymous.
            (origin == crate::mesh::Origin::Peer).then(|| state.workloads.get(&ip)).flatten()
        }
        None => state.workloads.get(&ip),
    };
    if let Some(w) = caller {
        ctx.event.caller = Some(CallerWorkload {
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
        });
    }
    let token = bearer(req.headers());
    let has_bearer = token.is_some();
    // What a verifier's refusal of the token is called in the dry runs of the Audit-mode
    // policies it belongs to.
    let mut refused_token = "invalid_token";
    let users = match token {
        Some(value) if !state.verifiers.is_empty() => match state.verify(value).await {
            Ok(users) => users,
            // No enforced policy verifies users: refused only by Audit-mode ones, recorded.
            Err(e) if !state.enforcing_identity => {
                refused_token = crate::state::refusal_code(&e);
                if !state.enforcing {
                    ctx.would_deny(refused_token);
                }
                Users::default()
            }
            Err(e) if e.is_client_error() => {
                ctx.deny("invalid_token");
                ctx.event.reason = format!("invalid_token:{}", e.code());
                let mut resp = error_response(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "invalid token", "detail": e.to_string(), "reason": e.code()}),
                );
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                return resp;
            }
            Err(e) => {
                if IDENTITY_WARNINGS.due() {
                    tracing::warn!(error = %e, "cannot verify tokens: identity provider unavailable (said at most every 10 s; the events count each request)");
                }
                ctx.deny("identity_unavailable");
                ctx.event.reason = format!("identity_unavailable:{}", e.code());
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "identity provider unavailable", "reason": e.code()}),
                );
            }
        },
        _ => Users::default(),
    };

    // 4. Decide: each policy with the user its own identity settings verified.
    let time =
        i64::try_from(wall.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())).unwrap_or(0);
    let verdict = state.engine.decide_as(
        &EngineRequest { method: req.method().as_str(), path: &path, caller, user: None, time },
        |i| state.user_of(&users, i),
    );
    let user = state.user_for(&users, verdict.policy);
    let policy_user = state.policy_user(&users, verdict.policy);
    // The event's principal is whom the token names, whichever policy verified it (for the
    // audit trail and detection); each rule's quotas count under its own policy's
    // (`quota_principal`).
    if let Some(known) = principal(user, caller) {
        ctx.event.principal = known;
    }
    if let Some(u) = user {
        ctx.event.user = Some(AuditUser { id: u.id.clone(), attributes: u.attributes.clone() });
    }
    ctx.event.policy = verdict.policy.map(|p| p.name.clone());
    ctx.event.rule = verdict.rule.map(|r| r.name.clone());
    ctx.event.mode = verdict.mode;
    ctx.event.decision = verdict.decision;
    ctx.set_reason(verdict.reason.code());
    // One entry per dry run, in order (`dry_run_jobs` finds them by position).
    ctx.event.dry_runs = verdict
        .dry_runs
        .iter()
        .take(MAX_DRY_RUNS)
        .map(|run| {
            // Alone, a policy whose verifier refused the token would have answered 401 (503
            // for an identity provider it cannot reach) before matching any rule.
            let refused = if has_bearer { state.refused_by(&users, run.policy, refused_token) } else { None };
            DryRun {
                policy: run.policy.map(|p| p.name.clone()).unwrap_or_default(),
                rule: run.rule.filter(|_| refused.is_none()).map(|r| r.name.clone()),
                principal: None,
                decision: if refused.is_some() { Decision::WouldDeny } else { run.decision },
                reason: refused.map_or_else(|| run.reason.code().to_owned(), str::to_owned),
                charged: false,
                transform: None,
            }
        })
        .collect();
    if verdict.blocks() {
        if verdict.wants_token(has_bearer) {
            ctx.deny("missing_token");
            return unauthenticated(&verdict);
        }
        return forbidden(&verdict);
    }

    // 5. Quotas: the deciding rule's, and those of the other constraining rules that apply
    // with it (`Verdict::also`), each under the principal its own policy identified.
    // Read now, not at the request's start: the token check may have waited on an identity
    // provider, and a reading from before it would look like the clock stepping back.
    let quota_now = crate::quota_clock::quota_time(SystemTime::now());
    // Built only for a request whose response is transformed.
    let request_vars = || RequestVars {
        method: req.method().as_str().to_ascii_uppercase(),
        path: path.as_str().to_string(),
        params: Default::default(),
        time,
    };
    let prepared = if verdict.also.is_empty() {
        prepare_one(shared, ctx, &verdict, policy_user, caller, request_vars, quota_now)
    } else {
        let several = Several { state: &state, users: &users, caller, request: request_vars() };
        prepare_several(shared, ctx, &verdict, &several, quota_now)
    };
    let transform = match prepared {
        Ok(transform) => transform,
        Err(refused) => return *refused,
    };
    // The dry runs' own quotas, and their response plans to run beside.
    let dry = if ctx.event.dry_runs.is_empty() {
        Vec::new()
    } else {
        let several = Several { state: &state, users: &users, caller, request: request_vars() };
        dry_run_jobs(shared, ctx, &verdict, &several, quota_now)
    };

    // 6. Forward.
    // Responses of an enforcing policy that rewrites some are the caller's, rewritten or not.
    let private = std::iter::once(&verdict)
        .chain(&verdict.also)
        .any(|v| v.mode == Mode::Enforce && v.policy.is_some_and(|p| p.transforms_responses));
    drop(verdict);
    let is_head = req.method() == Method::HEAD;
    // A HEAD under an enforced row filter is asked of the app as a GET, filtered, and answered
    // without the body: the app's answer to a HEAD would tell whether a record out of the
    // caller's scope exists (200 where a GET gets 403, 404 for none).
    let head_as_get = is_head
        && transform
            .as_ref()
            .is_some_and(|j| j.mode == Mode::Enforce && j.steps().any(|step| step.plan.row_filter.is_some()));
    let (mut parts, body) = req.into_parts();
    if head_as_get {
        parts.method = Method::GET;
    }
    let mut body = match read_request_body(body, declared_length, limits, &shared.request_buffers).await {
        Ok(body) => body,
        Err(BufferError::TooLarge) => {
            shared.metrics.limit("request_body_bytes");
            ctx.deny("request_body_too_large");
            return body_too_large(limits.max_request_body_bytes);
        }
        Err(BufferError::TimedOut) => {
            ctx.deny("request_body_timeout");
            return body_timed_out(shared, limits.request_body_timeout);
        }
        Err(BufferError::TooSlow) => {
            ctx.deny("request_body_too_slow");
            return body_too_slow(shared, limits.request_body_min_rate);
        }
        Err(BufferError::Client(e)) => {
            // The client closed its connection or sent a malformed chunk: the answer is
            // likely never read, but the event says what happened.
            tracing::debug!(error = %e, "the client's request body could not be read");
            ctx.deny("request_body_incomplete");
            return bad_request("the request body could not be read", "request_body_incomplete");
        }
    };
    if method_override::is_post(&parts.method) {
        match method_override::check_post_body(
            &parts.headers,
            body.is_complete(),
            body.whole(),
            limits.request_buffer_bytes,
        ) {
            PostBody::Clean => {}
            PostBody::NamesAMethod => return method_override_refused(ctx, None),
            // A body the sidecar did not read whole (over the request buffer, or no buffer
            // free) could name a method past what it saw: a form is refused (forms are small),
            // JSON and multipart (uploads) where that method could be decided otherwise than
            // the POST (uploads to a path whose rules treat every method alike go on) are
            // checked on their way to the app, piece by piece (refused before the app has
            // them whole), unless compressed or in another charset than UTF-8.
            PostBody::Unchecked(kind)
                if kind == BodyKind::Form
                    || (!limits.forward_unchecked_bodies
                        && override_matters(&state, &path, caller, &users, time)) =>
            {
                // (Never for a form: only JSON and multipart are read on their way.)
                if let Some(scan) = method_override::scan_on_the_way(&parts.headers) {
                    body.check_on_the_way(scan);
                } else {
                    shared.metrics.limit("request_buffer");
                    if body.spilled_for_room() {
                        // It would have been read whole with room in the budget: a retry may find it.
                        ctx.deny("request_buffer_exhausted");
                        return retry_later(
                            StatusCode::SERVICE_UNAVAILABLE,
                            json!({"error": "too many request bodies being read", "reason": "request_buffer_exhausted"}),
                            1,
                        );
                    }
                    let (what, reason) = match kind {
                        BodyKind::Form => ("a form body", "form_body_unchecked"),
                        BodyKind::Json => ("a JSON body", "json_body_unchecked"),
                        BodyKind::Multipart => ("a multipart body", "multipart_body_unchecked"),
                    };
                    ctx.deny(reason);
                    return error_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        json!({
                            "error": format!("{what} larger than the request buffer cannot be checked for method override parameters, and another method would be decided otherwise on this path"),
                            "reason": reason,
                            "limit": limits.request_buffer_bytes,
                        }),
                    );
                }
            }
            PostBody::Unchecked(_) => {}
            PostBody::Unreadable(reason) => return method_override_refused(ctx, Some(reason)),
        }
    }
    let progress = body.progress();
    // Only a transform reads the response before it goes on (the dry runs read a copy).
    let reads_response = transform.is_some();
    let upstream_req = match upstream_request(
        &state,
        parts,
        body,
        &path,
        &ctx.peer_ip,
        transform.as_ref(),
        accepts_trailers && !reads_response,
    ) {
        Ok(r) => r,
        Err(()) => {
            ctx.deny("bad_request");
            return bad_request("request cannot be forwarded", "bad_request");
        }
    };
    let mut deadline = tokio::time::Instant::now() + limits.upstream_timeout;
    // Pinned where it is made: the time-out then wraps a pointer instead of moving the
    // exchange's state (over a kilobyte) into itself.
    let mut sent = std::pin::pin!(shared.upstream.send(state.upstream, upstream_req));
    let exchanged = loop {
        match tokio::time::timeout_at(deadline, sent.as_mut()).await {
            Ok(exchanged) => break Ok(exchanged),
            // A body still arriving: the time-out counts from its last bytes.
            Err(elapsed) => {
                match progress.as_ref().and_then(|p| p.later_deadline(deadline, limits.upstream_timeout)) {
                    Some(later) => deadline = later,
                    None => break Err(elapsed),
                }
            }
        }
    };
    let response = match exchanged {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            match progress.as_ref().and_then(|p| p.stopped_by_scan()) {
                Some(Scanned::NamesAMethod) => return method_override_refused(ctx, None),
                Some(_) => {
                    return method_override_refused(ctx, Some(method_override::UNSUPPORTED_REQUEST_CHARSET));
                }
                None => {}
            }
            if progress.as_ref().is_some_and(|p| p.exceeded()) {
                shared.metrics.limit("request_body_bytes");
                ctx.deny("request_body_too_large");
                return body_too_large(limits.max_request_body_bytes);
            }
            if e.is_saturated() {
                shared.metrics.limit("upstream_connections");
                tracing::warn!(error = %e, "no connection to the app was free");
                ctx.set_reason("upstream_saturated");
                return retry_later(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "upstream busy", "reason": "upstream_saturated"}),
                    1,
                );
            }
            let code = if e.is_connect() { "upstream_unavailable" } else { "upstream_error" };
            if e.is_connect() {
                shared.metrics.limit("upstream_connect");
            }
            tracing::warn!(error = %e, "upstream request failed");
            ctx.set_reason(code);
            return error_response(
                StatusCode::BAD_GATEWAY,
                json!({"error": "upstream unavailable", "reason": code}),
            );
        }
        Err(_) if progress.as_ref().is_some_and(|p| p.too_slow()) => {
            ctx.deny("request_body_too_slow");
            return body_too_slow(shared, limits.request_body_min_rate);
        }
        Err(_) if progress.as_ref().is_some_and(|p| p.waiting_for_client()) => {
            ctx.deny("request_body_timeout");
            return body_timed_out(shared, limits.upstream_timeout);
        }
        Err(_) => {
            shared.metrics.limit("upstream_timeout");
            ctx.set_reason("upstream_timeout");
            return error_response(
                StatusCode::GATEWAY_TIMEOUT,
                json!({"error": "upstream timed out", "reason": "upstream_timeout"}),
            );
        }
    };

    // 7. Response.
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let has_body = !((is_head && !head_as_get)
        || parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED);
    match transform {
        Some(job) if has_body => {
            let mut for_dry_runs = DryRunInput::None;
            let keep = (!dry.is_empty()).then_some(&mut for_dry_runs);
            let response = transform_response(shared, ctx, job, parts, body, deadline, quota_now, keep).await;
            // The dry runs read the app's body, where the caller gets a response from the app.
            if !dry.is_empty() && ctx.event.decision != Decision::Deny {
                dry_runs_beside(shared, ctx, &dry, for_dry_runs, quota_now);
            }
            if head_as_get {
                // The GET's headers (its length included), no body.
                let (parts, _) = response.into_parts();
                return Response::from_parts(parts, ProxyBody::empty());
            }
            response
        }
        Some(job) => {
            if job.mode == Mode::Enforce {
                // HEAD, 204, 304: no body to rewrite, but the headers may still describe the
                // app's, and a shared cache must not take them as the page's.
                rewritten_for_the_caller(&mut parts.headers);
            }
            Response::from_parts(parts, ProxyBody::stream(body))
        }
        None => {
            if private {
                keep_out_of_shared_caches(&mut parts.headers);
            }
            if has_body && !dry.is_empty() {
                return tee_for_dry_runs(shared, ctx, dry, parts, body, deadline);
            }
            Response::from_parts(parts, ProxyBody::stream(body))
        }
    }
}

/// The response transform of the rules that apply, if any has a plan; or the answer that
/// refuses the request.
type Prepared = Result<Option<TransformJob>, Box<Response<ProxyBody>>>;

/// One rule applies (no `Verdict::also`): its quotas admit the request, and its plan, if it
/// reads the body, is the transform.
fn prepare_one(
    shared: &Shared,
    ctx: &mut Ctx,
    verdict: &Verdict<'_>,
    user: Option<&User>,
    caller: Option<&WorkloadIdentity>,
    request: impl FnOnce() -> RequestVars,
    quota_now: Timestamp,
) -> Prepared {
    if verdict.decision != Decision::Allow {
        return Ok(None);
    }
    let mut records_remaining = None;
    let mut quota_key = None;
    if let (Some(limits), Some(policy), Some(rule)) = (verdict.limits, verdict.policy, verdict.rule) {
        let key = QuotaKey {
            policy: policy.name.clone(),
            rule: rule.name.clone(),
            principal: quota_principal(user, caller, &ctx.peer_ip),
        };
        ctx.event.rule_principal = other_principal(&key, &ctx.event);
        match shared.quotas.admit(&key, limits, quota_now) {
            Ok(admission) => records_remaining = admission.records_remaining,
            Err(exceeded) if verdict.mode == Mode::Enforce => {
                return Err(Box::new(quota_refused(shared, ctx, policy, rule, &exceeded)));
            }
            Err(_) => ctx.would_deny("quota_exceeded"),
        }
        quota_key = Some(key);
    }
    let Some(plan) = verdict.plan.filter(|p| p.needs_body()) else { return Ok(None) };
    Ok(Some(TransformJob::of(verdict, plan, user, caller, request(), (records_remaining, quota_key))))
}

/// What [`prepare_several`] reads of the request besides the verdict.
struct Several<'a> {
    state: &'a PolicyState,
    users: &'a Users,
    caller: Option<&'a WorkloadIdentity>,
    request: RequestVars,
}

/// Several policies' constraining rules apply (`Verdict::also`, all enforced Allows): every
/// rule's quotas, under the principal its own policy identifies, admit the request all or
/// nothing (`Quotas::admit_all`; a refusal names its rule); then one transform job per plan step
/// (`Verdict::plan_steps`), the rule's quotas charged by its cap step.
fn prepare_several(
    shared: &Shared,
    ctx: &mut Ctx,
    verdict: &Verdict<'_>,
    several: &Several<'_>,
    quota_now: Timestamp,
) -> Prepared {
    let order = verdict.in_application_order();
    let keys: Vec<Option<QuotaKey>> = order
        .iter()
        .map(|applying| {
            let (Some(_), Some(policy), Some(rule)) = (applying.limits, applying.policy, applying.rule)
            else {
                return None;
            };
            // A policy that identifies nobody counts by the workload or peer, as it would alone.
            let user = several.state.policy_user(several.users, applying.policy);
            let principal = quota_principal(user, several.caller, &ctx.peer_ip);
            Some(QuotaKey { policy: policy.name.clone(), rule: rule.name.clone(), principal })
        })
        .collect();
    // Every rule with quotas (its position in `order`, key, limits, policy, rule), admitted
    // all or nothing.
    let charged: Vec<_> = keys
        .iter()
        .zip(&order)
        .enumerate()
        .filter_map(|(i, (key, applying))| {
            Some((i, key.as_ref()?, applying.limits?, applying.policy?, applying.rule?))
        })
        .collect();
    let requests: Vec<(&QuotaKey, &Limits)> =
        charged.iter().map(|&(_, key, limits, ..)| (key, limits)).collect();
    let mut remaining: Vec<Option<u64>> = vec![None; order.len()];
    match shared.quotas.admit_all(&requests, quota_now) {
        Ok(admissions) => {
            for (&(i, ..), admission) in charged.iter().zip(admissions) {
                remaining[i] = admission.records_remaining;
            }
        }
        Err((at, exceeded)) => {
            let (_, key, _, policy, rule) = charged[at];
            ctx.event.rule_principal = other_principal(key, &ctx.event);
            return Err(Box::new(quota_refused(shared, ctx, policy, rule, &exceeded)));
        }
    }
    // The event names the deciding rule's principal and the other rules, each with its
    // principal where it is not the event's: the collector charges them as this replica did.
    let principals: Vec<Option<String>> = order
        .iter()
        .zip(&keys)
        .map(|(applying, key)| {
            let principal = match key {
                Some(key) => key.principal.clone(),
                None => {
                    let user = several.state.policy_user(several.users, applying.policy);
                    quota_principal(user, several.caller, &ctx.peer_ip)
                }
            };
            Some(principal).filter(|p| *p != ctx.event.principal)
        })
        .collect();
    let mut also_applied = Vec::new();
    for (applying, principal) in order.iter().zip(principals) {
        if std::ptr::eq(*applying, verdict) {
            ctx.event.rule_principal = principal;
        } else if let (Some(policy), Some(rule)) = (applying.policy, applying.rule)
            && also_applied.len() < MAX_ALSO_APPLIED
        {
            also_applied.push(AppliedRule {
                policy: policy.name.clone(),
                rule: rule.name.clone(),
                principal,
            });
        }
    }
    ctx.event.also_applied = also_applied;
    let mut jobs: Vec<TransformJob> = verdict
        .plan_steps()
        .into_iter()
        .map(|(applying, plan, phase)| {
            let i = order.iter().position(|v| std::ptr::eq(*v, applying)).unwrap_or_default();
            let charges = phase == Some(Phase::Cap);
            let user = several.state.policy_user(several.users, applying.policy);
            let charged = (remaining[i].filter(|_| charges), keys[i].clone().filter(|_| charges));
            TransformJob::of(applying, plan, user, several.caller, several.request.clone(), charged)
        })
        .collect();
    // A cap step with no cap, no id to hash and no record quota to cut to only counts the
    // records, which any other step that selects them does too: one pass over the body less.
    let counts = |j: &TransformJob| j.plan.records.is_some();
    let idle = |j: &TransformJob| {
        counts(j)
            && j.plan.max_records.is_none()
            && j.plan.record_id.is_none()
            && j.records_remaining.is_none()
            && j.plan.row_filter.is_none()
            && j.plan.masks.is_empty()
    };
    let mut i = 0;
    while i < jobs.len() {
        if idle(&jobs[i]) && jobs.iter().enumerate().any(|(k, j)| k != i && counts(j)) {
            jobs.remove(i);
        } else {
            i += 1;
        }
    }
    Ok(TransformJob::in_order(jobs))
}

/// A dry run's response plan, run on the app's response beside the plans that apply.
struct DryRunJob {
    /// Its entry in the event's `dryRuns`.
    entry: usize,
    job: TransformJob,
}

/// The dry runs of an allowed request (`Verdict::dry_runs`, one entry each in the event): each
/// Audit-mode policy that would have allowed it counts it in its rule's quotas, under the
/// principal its own policy identifies, as it would alone (over them: `WouldDeny`,
/// `quota_exceeded`); the response plans of those still allowing, to run on the response.
fn dry_run_jobs(
    shared: &Shared,
    ctx: &mut Ctx,
    verdict: &Verdict<'_>,
    several: &Several<'_>,
    quota_now: Timestamp,
) -> Vec<DryRunJob> {
    let mut jobs = Vec::new();
    for (entry, run) in verdict.dry_runs.iter().take(MAX_DRY_RUNS).enumerate() {
        // The entry's decision: the verdict's, unless the policy's verifier refused the token.
        if ctx.event.dry_runs.get(entry).is_none_or(|d| d.decision != Decision::Allow) {
            continue;
        }
        // A policy that identifies nobody counts by the workload or peer, as it would alone.
        let user = several.state.policy_user(several.users, run.policy);
        let principal = quota_principal(user, several.caller, &ctx.peer_ip);
        let mut records_remaining = None;
        let mut quota_key = None;
        if let (Some(limits), Some(policy), Some(rule)) = (run.limits, run.policy, run.rule) {
            let key = QuotaKey { policy: policy.name.clone(), rule: rule.name.clone(), principal };
            match shared.dry_run_quotas.admit(&key, limits, quota_now) {
                Ok(admission) => {
                    records_remaining = admission.records_remaining;
                    // The collector charges the rule's cluster-wide usage as this replica did
                    // (a rule with only a per-response cap has no usage to share).
                    let quotas = limits.requests_per_minute.is_some()
                        || limits.records_per_hour.is_some()
                        || limits.records_per_day.is_some();
                    if let Some(dry_run) = ctx.event.dry_runs.get_mut(entry).filter(|_| quotas) {
                        dry_run.charged = true;
                        dry_run.principal = Some(key.principal.clone()).filter(|p| *p != ctx.event.principal);
                    }
                }
                Err(_) => {
                    if let Some(dry_run) = ctx.event.dry_runs.get_mut(entry) {
                        dry_run.decision = Decision::WouldDeny;
                        dry_run.reason = "quota_exceeded".to_owned();
                    }
                    continue;
                }
            }
            quota_key = Some(key);
        }
        let Some(plan) = run.plan.filter(|p| p.needs_body()) else { continue };
        let user = several.state.policy_user(several.users, run.policy);
        let charged = (records_remaining, quota_key);
        let job = TransformJob::of(run, plan, user, several.caller, several.request.clone(), charged);
        jobs.push(DryRunJob { entry, job });
    }
    jobs
}

/// Runs each dry run's plan on `body` (the app's, decoded, held by `reservation` on the
/// dry-run budget) and records in its entry of `dry_runs` what the plan would have done, or
/// what would have refused the response; its record quotas are charged the records it would
/// have returned (at `quota_now`), as they would be were it alone.
fn dry_run_plans(
    shared: &Shared,
    dry_runs: &mut [DryRun],
    jobs: &[DryRunJob],
    body: &[u8],
    reservation: &mut Reservation,
    quota_now: Timestamp,
) {
    for DryRunJob { entry, job } in jobs {
        let mut applied = Applied::default();
        let held = reservation.held();
        let result = apply_plan(shared, 0, job, body, reservation, &mut applied, true);
        reservation.shrink_to(held);
        let Some(dry_run) = dry_runs.get_mut(*entry) else { continue };
        match result {
            Ok(Outcome::Body(_)) => {
                let stats = applied.stats;
                if let Some(key) = &job.quota_key {
                    shared.dry_run_quotas.record(key, &job.limits, stats.records_returned, quota_now);
                }
                dry_run.transform = Some(DryRunTransform {
                    records_returned: stats.records_returned,
                    records_filtered: stats.records_filtered,
                    records_truncated: stats.records_truncated,
                    masked: stats.masked,
                });
            }
            Ok(Outcome::RootFiltered) => would_refuse(dry_run, "out_of_scope"),
            Err(PlanFailure::CapExceeded) => would_refuse(dry_run, "record_cap_exceeded"),
            Err(PlanFailure::Untransformable(code)) => unchecked(dry_run, job, code, Read::Transformed),
        }
    }
}

/// A dry run that would have refused what its policy's rule allowed.
fn would_refuse(dry_run: &mut DryRun, code: &str) {
    dry_run.decision = Decision::WouldDeny;
    dry_run.reason = code.to_owned();
}

/// How the response a dry run could not read was asked of the app.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// As an enforcing sidecar asks for a response it transforms (whole, uncompressed).
    Transformed,
    /// As the client asked for it (a response no enforcing plan reads).
    AsAsked,
}

impl Read {
    /// How the response of `job` was asked for: only an enforcing plan asks the app for the
    /// whole body, uncompressed.
    fn of(job: &TransformJob) -> Read {
        if job.mode == Mode::Enforce { Read::Transformed } else { Read::AsAsked }
    }
}

/// Marks every dry run of `jobs` as unable to read the response, for the reason `code`.
fn mark_unchecked(dry_runs: &mut [DryRun], jobs: &[DryRunJob], code: &str, read: Read) {
    for DryRunJob { entry, job } in jobs {
        if let Some(dry_run) = dry_runs.get_mut(*entry) {
            unchecked(dry_run, job, code, read);
        }
    }
}

/// A dry run whose plan could not be applied to the response, for the reason `code`. Where
/// only the dry run meets it, it stays `Allow` with reason `not_checked:<code>`: no room in
/// the buffers, a copy held longer than the upstream time-out, and on a response asked as
/// the client asked (`Read::AsAsked`) a slice or an encoding an enforcing sidecar would not
/// have asked for. Otherwise its policy would have refused the response (`WouldDeny` with the
/// code), or passed it on if it fails open (`fail_open:<code>`; never a slice), as
/// [`untransformable`] does.
fn unchecked(dry_run: &mut DryRun, job: &TransformJob, code: &str, read: Read) {
    let only_the_dry_run = matches!(
        code,
        DRY_RUN_BUFFER_EXHAUSTED | DRY_RUN_BUFFER_TOO_SMALL | RESPONSE_BUFFER_EXHAUSTED | UPSTREAM_TIMEOUT
    ) || (read == Read::AsAsked
        && matches!(code, PARTIAL_CONTENT | UNSUPPORTED_CONTENT_ENCODING | "bad_content_encoding"));
    if only_the_dry_run {
        dry_run.reason = ["not_checked:", code].concat();
    } else if job.fail_open && code != PARTIAL_CONTENT {
        dry_run.reason = ["fail_open:", code].concat();
    } else {
        would_refuse(dry_run, code);
    }
}

/// What the dry runs of a transformed response read.
enum DryRunInput {
    /// Nothing: the app's response did not come whole (the answer is the sidecar's own).
    None,
    /// The app's body, decoded, and how it was asked for.
    Body(Bytes, Read),
    /// The app's body cannot be read: why, and how it was asked for.
    Unreadable(&'static str, Read),
}

/// The dry runs of a response the enforcing plans read (`input`), once the caller's response
/// is certain: the app's body, held on the dry-run budget while the plans run.
#[inline(never)]
fn dry_runs_beside(
    shared: &Shared,
    ctx: &mut Ctx,
    dry: &[DryRunJob],
    input: DryRunInput,
    quota_now: Timestamp,
) {
    match input {
        DryRunInput::Body(original, read) => {
            let mut reservation = Reservation::on(&shared.dry_run_buffers);
            let size = original.len() as u64;
            if size > shared.dry_run_buffers.total() {
                mark_unchecked(&mut ctx.event.dry_runs, dry, DRY_RUN_BUFFER_TOO_SMALL, read);
            } else if reservation.grow(size) {
                dry_run_plans(shared, &mut ctx.event.dry_runs, dry, &original, &mut reservation, quota_now);
            } else {
                mark_unchecked(&mut ctx.event.dry_runs, dry, DRY_RUN_BUFFER_EXHAUSTED, read);
            }
        }
        DryRunInput::Unreadable(code, read) => mark_unchecked(&mut ctx.event.dry_runs, dry, code, read),
        DryRunInput::None => {}
    }
}

/// Copies above this size, and compressed ones, are read by the dry runs on the blocking pool,
/// off the proxy thread.
const DRY_RUN_INLINE_BYTES: usize = 256 * 1024;

/// A response no applying plan reads, streamed to the caller as the app sends it (no
/// deadline, trailers and all) while a copy of up to `--max-response-body-bytes` is kept in
/// the dry-run buffers until `deadline` (the request's, as an enforcing plan's response
/// would have; none for a body that cannot be JSON or is in an encoding the sidecar cannot
/// read); when the body ends, the dry runs' plans run on the copy, in a task of their own,
/// and complete their entries of the event, which is then counted and emitted.
#[inline(never)]
fn tee_for_dry_runs(
    shared: &Arc<Shared>,
    ctx: &mut Ctx,
    dry: Vec<DryRunJob>,
    parts: http::response::Parts,
    body: AppBody,
    deadline: tokio::time::Instant,
) -> Response<ProxyBody> {
    let encoding = Encoding::of(&parts.headers);
    let encoding = match encoding {
        Some(encoding) if !is_partial(&parts) => encoding,
        _ => {
            let code = if is_partial(&parts) { PARTIAL_CONTENT } else { UNSUPPORTED_CONTENT_ENCODING };
            mark_unchecked(&mut ctx.event.dry_runs, &dry, code, Read::AsAsked);
            return Response::from_parts(parts, ProxyBody::stream(body));
        }
    };
    ctx.dry_runs_at_body_end = true;
    let limit = shared.limits.max_response_body_bytes;
    let room = shared.dry_run_buffers.total();
    let limits =
        TeeLimits { bytes: limit, room, until: deadline, sniff_json: encoding == Encoding::Identity };
    let copy = Reservation::on(&shared.dry_run_buffers);
    let shared = Arc::clone(shared);
    let end: TeeEnd = Box::new(move |teed, pending| {
        let compressed = encoding != Encoding::Identity;
        let off_thread =
            matches!(&teed, Teed::Whole(raw, _) if compressed || raw.len() > DRY_RUN_INLINE_BYTES);
        let mut event = DryRunEvent { pending: Some(pending), metrics: Arc::clone(&shared.metrics) };
        let work = move || {
            let Some(pending) = event.pending.as_mut() else { return };
            let dry_runs = &mut pending.event_mut().dry_runs;
            match teed {
                Teed::Whole(raw, mut reservation) if !raw.is_empty() => {
                    // Decoding takes at most half the dry-run buffers, held while it runs.
                    let decode_limit = if compressed { limit.min(room / 2) } else { limit };
                    let held = reservation.held();
                    if compressed && !reservation.grow(decode_limit) {
                        return mark_unchecked(dry_runs, &dry, DRY_RUN_BUFFER_EXHAUSTED, Read::AsAsked);
                    }
                    match decode(raw, encoding, decode_limit) {
                        Ok(decoded) => {
                            if compressed {
                                reservation.shrink_to(held + decoded.len() as u64);
                            }
                            // The records it would have returned count now, when they would have.
                            let now = crate::quota_clock::quota_time(SystemTime::now());
                            dry_run_plans(&shared, dry_runs, &dry, &decoded, &mut reservation, now);
                        }
                        Err(DecodeError::TooLarge) if decode_limit < limit => {
                            mark_unchecked(dry_runs, &dry, DRY_RUN_BUFFER_TOO_SMALL, Read::AsAsked);
                        }
                        Err(DecodeError::TooLarge) => {
                            mark_unchecked(dry_runs, &dry, "response_too_large", Read::AsAsked);
                        }
                        Err(DecodeError::Corrupt) => {
                            mark_unchecked(dry_runs, &dry, "bad_content_encoding", Read::AsAsked);
                        }
                    }
                }
                // Nothing to leak, nothing to count.
                Teed::Whole(..) => {}
                Teed::Dropped(code) => mark_unchecked(dry_runs, &dry, code, Read::AsAsked),
                // The caller did not get the whole response: the entries stay decisions only.
                Teed::Incomplete => {}
            }
            // `event` is dropped with the closure: counted and emitted.
        };
        // Not in the body's last poll: the caller's last bytes do not wait for the dry runs.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if off_thread => drop(runtime.spawn_blocking(work)),
            Ok(runtime) => drop(runtime.spawn(async move { work() })),
            Err(_) => work(),
        }
    });
    Response::from_parts(parts, ProxyBody::tee(body, limits, copy, end))
}

/// The event of a teed response while its dry runs run: counted and emitted when dropped,
/// whether the dry runs completed it, panicked, or never ran (the runtime shutting down:
/// then with its dry runs' decisions only).
struct DryRunEvent {
    pending: Option<PendingEvent>,
    metrics: Arc<Metrics>,
}

impl Drop for DryRunEvent {
    fn drop(&mut self) {
        if let Some(mut pending) = self.pending.take() {
            count_dry_runs(&self.metrics, &pending.event_mut().dry_runs);
            pending.emit();
        }
    }
}

/// A POST refused by the `_method` check, whether it read the body whole or on its way:
/// 400 `method_override` for a body naming another method; 415 with the reason for one whose
/// encoding or charset it cannot read (`unreadable`).
fn method_override_refused(ctx: &mut Ctx, unreadable: Option<&'static str>) -> Response<ProxyBody> {
    let Some(reason) = unreadable else {
        ctx.deny("method_override");
        return bad_request("method override parameters are refused", "method_override");
    };
    ctx.deny(reason);
    error_response(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        json!({
            "error": "a POST body whose content encoding or charset the sidecar cannot read cannot be checked for method override parameters",
            "reason": reason,
        }),
    )
}

/// 429 for a request over one of `rule`'s quotas; the event names the rule.
fn quota_refused(
    shared: &Shared,
    ctx: &mut Ctx,
    policy: &custos_policy::CompiledPolicy,
    rule: &custos_policy::CompiledRule,
    exceeded: &custos_quota::Exceeded,
) -> Response<ProxyBody> {
    let limit = exceeded.limit.as_str();
    let retry = exceeded.retry_after_secs().max(1);
    shared.metrics.quota_rejections.get_or_create(&LimitLabels { limit }).inc();
    ctx.deny("quota_exceeded");
    ctx.event.reason = format!("quota_exceeded:{limit}");
    ctx.event.policy = Some(policy.name.clone());
    ctx.event.rule = Some(rule.name.clone());
    retry_later(
        StatusCode::TOO_MANY_REQUESTS,
        json!({
            "error": "quota exceeded",
            "policy": policy.name,
            "rule": rule.name,
            "reason": "quota_exceeded",
            "limit": limit,
            "retryAfterSeconds": retry,
        }),
        retry,
    )
}

/// What the response transform needs, taken from the verdict before the request is sent.
struct TransformJob {
    plan: Arc<Plan>,
    mode: Mode,
    fail_open: bool,
    policy: String,
    rule: String,
    request: RequestVars,
    user: Option<UserVars>,
    workload: Option<WorkloadVars>,
    records_remaining: Option<u64>,
    limits: Limits,
    /// The rule's quotas, charged the records the response returns.
    quota_key: Option<QuotaKey>,
    /// The plans of other policies' rules that apply with this one (`Verdict::also`),
    /// applied to the body first, in order; each of them with an empty `before`.
    before: Vec<TransformJob>,
}

impl TransformJob {
    /// The job of `plan`, a part or the whole of `v`'s rule's, for `user` (as `v`'s policy
    /// verified it) and `caller`; `request` without the rule's path parameters, which `v`
    /// adds; `charged`: what the rule's record quotas leave and their key, when this job
    /// charges them.
    fn of(
        v: &Verdict<'_>,
        plan: &Arc<Plan>,
        user: Option<&User>,
        caller: Option<&WorkloadIdentity>,
        request: RequestVars,
        (records_remaining, quota_key): (Option<u64>, Option<QuotaKey>),
    ) -> TransformJob {
        TransformJob {
            plan: plan.clone(),
            mode: v.mode,
            // A rule with record limits never fails open: the records of a response it cannot
            // read cannot be counted or capped, and a client can choose such a response.
            fail_open: v.policy.is_some_and(|p| p.fail_open) && !v.limits.is_some_and(counts_records),
            policy: v.policy.map(|p| p.name.clone()).unwrap_or_default(),
            rule: v.rule.map(|r| r.name.clone()).unwrap_or_default(),
            request: RequestVars { params: v.params.iter().cloned().collect(), ..request },
            user: user.map(|u| UserVars { id: u.id.clone(), attributes: u.attributes.clone() }),
            workload: caller.map(WorkloadVars::of),
            records_remaining,
            limits: v.limits.cloned().unwrap_or_default(),
            quota_key,
            before: Vec::new(),
        }
    }

    /// The jobs of the plan steps of one request, in the order they apply
    /// ([`Verdict::plan_steps`](custos_policy::Verdict::plan_steps)), as one job. A response
    /// passes on failure only if every rule's policy says `failOpen`.
    fn in_order(mut jobs: Vec<TransformJob>) -> Option<TransformJob> {
        let fail_open = jobs.iter().all(|j| j.fail_open);
        let mut last = jobs.pop()?;
        for job in &mut jobs {
            job.fail_open = fail_open;
        }
        last.fail_open = fail_open;
        last.before = jobs;
        Some(last)
    }

    /// This job's plans in the order they apply: those in `before`, then its own.
    fn steps(&self) -> impl Iterator<Item = &TransformJob> {
        self.before.iter().chain(std::iter::once(self))
    }
}

#[allow(clippy::too_many_arguments)]
async fn transform_response(
    shared: &Shared,
    ctx: &mut Ctx,
    job: TransformJob,
    mut parts: http::response::Parts,
    body: AppBody,
    deadline: tokio::time::Instant,
    quota_now: Timestamp,
    mut for_dry_runs: Option<&mut DryRunInput>,
) -> Response<ProxyBody> {
    if is_partial(&parts) {
        if let Some(input) = for_dry_runs {
            *input = DryRunInput::Unreadable(PARTIAL_CONTENT, Read::of(&job));
        }
        // The request's `Range` was dropped (Enforce), so only an app that answers with
        // slices unasked gets here; in Audit mode, one that honoured the caller's.
        return untransformable(shared, ctx, &job, parts, PARTIAL_CONTENT, ProxyBody::stream(body));
    }
    // Held until the transformed body is built (the app's bytes, and their decoding), then by
    // the body sent (shrunk to its length) until it is sent or dropped.
    let mut reservation = Reservation::on(&shared.response_buffers);
    let audit = job.mode == Mode::Audit;
    let (raw, decoded) =
        match gather(shared, ctx, &parts.headers, body, deadline, audit, &mut reservation).await {
            Ok(Gathered { raw, decoded }) => (raw, decoded),
            Err(Ungathered::Answered(answer)) => return answer,
            Err(Ungathered::Unreadable(code, original)) => {
                if let Some(input) = for_dry_runs {
                    *input = DryRunInput::Unreadable(code, Read::of(&job));
                }
                return untransformable(shared, ctx, &job, parts, code, original);
            }
            Err(Ungathered::Empty) => {
                if job.mode == Mode::Enforce {
                    keep_out_of_shared_caches(&mut parts.headers);
                }
                return Response::from_parts(parts, ProxyBody::empty());
            }
        };
    // The dry runs read the app's body, not what the plans make of it.
    if let Some(input) = for_dry_runs.take() {
        *input = DryRunInput::Body(decoded.clone(), Read::of(&job));
    }

    // Each plan in turn over what the one before let through (one plan but when several
    // policies' constraining rules apply). What they did reaches the event, the records
    // served and the quotas once the response is certain: a step that refuses it leaves
    // no count behind of records the caller did not get.
    let mut job = job;
    let before = std::mem::take(&mut job.before);
    let mut input = decoded;
    let mut applied = Applied::default();
    for (i, step) in before.iter().chain(std::iter::once(&job)).enumerate() {
        // A parsed document is gone once its step is done; the next takes its own share.
        // A step's output keeps what `apply_plan` charged for it (the reservation covers it).
        let held = reservation.held();
        let result = apply_plan(shared, i, step, &input, &mut reservation, &mut applied, false);
        if !matches!(result, Ok(Outcome::Body(_))) {
            reservation.shrink_to(held);
        }
        input = match result {
            Ok(Outcome::Body(body)) => Bytes::from(body),
            Ok(Outcome::RootFiltered) => {
                applied.commit(shared, ctx, before.iter().chain(std::iter::once(&job)), quota_now);
                ctx.name_rule(step);
                if step.mode == Mode::Enforce {
                    ctx.deny("out_of_scope");
                    return error_response(
                        StatusCode::FORBIDDEN,
                        json!({"error": "forbidden", "policy": step.policy, "rule": step.rule, "reason": "out_of_scope"}),
                    );
                }
                ctx.would_deny("out_of_scope");
                return Response::from_parts(parts, ProxyBody::held(raw, reservation));
            }
            Err(PlanFailure::CapExceeded) => {
                ctx.name_rule(step);
                return cap_denied(ctx, step, parts, ProxyBody::held(raw, reservation));
            }
            Err(PlanFailure::Untransformable(code))
                if i > 0 && step.mode == Mode::Enforce && passes_under_fail_open(step, code) =>
            {
                // Every policy fails open (`TransformJob::in_order`): the caller gets what the
                // plans before this one made of the body, not the app's bytes.
                // Every rule's quotas are charged what the caller gets.
                applied.commit(shared, ctx, before.iter().chain(std::iter::once(&job)), quota_now);
                rewritten_for_the_caller(&mut parts.headers);
                parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(input.len()));
                if !parts.headers.contains_key(header::CONTENT_TYPE) {
                    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
                return untransformable(shared, ctx, step, parts, code, ProxyBody::held(input, reservation));
            }
            Err(PlanFailure::Untransformable(code)) => {
                ctx.name_rule(step);
                return untransformable(shared, ctx, step, parts, code, ProxyBody::held(raw, reservation));
            }
        };
    }
    applied.commit(shared, ctx, before.iter().chain(std::iter::once(&job)), quota_now);
    if job.mode != Mode::Enforce {
        // Audit: the caller gets the app's bytes; the event holds what would have been done.
        return Response::from_parts(parts, ProxyBody::held(raw, reservation));
    }
    rewritten_for_the_caller(&mut parts.headers);
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(input.len()));
    if !parts.headers.contains_key(header::CONTENT_TYPE) {
        parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    Response::from_parts(parts, ProxyBody::held(input, reservation))
}

/// Grows `reservation` (on the response buffers) to cover a plan's output of `len` bytes, the
/// body that outlives the transform until it is sent, or says why not: `response_too_large`
/// when not even the whole budget could (no retry can help), else
/// [`RESPONSE_BUFFER_EXHAUSTED`] (a 503 to retry, as for a body the buffers had no room to
/// read). An output no longer than what the reservation holds (the app's bytes, the step's
/// input) takes nothing more: input and output are both alive only while the plan runs, one
/// response per proxy thread at a time.
fn charge_output(shared: &Shared, reservation: &mut Reservation, len: usize) -> Result<(), &'static str> {
    let more = (len as u64).saturating_sub(reservation.held());
    if reservation.grow(more) {
        return Ok(());
    }
    if reservation.held().saturating_add(more) > shared.limits.response_buffer_total_bytes {
        shared.metrics.limit("response_body_bytes");
        return Err("response_too_large");
    }
    Err(RESPONSE_BUFFER_EXHAUSTED)
}

/// Whether the app answered with a slice of the representation, which no plan can read.
fn is_partial(parts: &http::response::Parts) -> bool {
    parts.status == StatusCode::PARTIAL_CONTENT || parts.headers.contains_key(header::CONTENT_RANGE)
}

/// A response body read whole for plans to read: the app's bytes, and their decoding.
struct Gathered {
    raw: Bytes,
    decoded: Bytes,
}

/// Why a response body was not gathered.
enum Ungathered {
    /// The app's body failed or timed out: the answer to send (the event says why).
    Answered(Response<ProxyBody>),
    /// No plan can read it: why (a reason code), and the app's bytes to pass on as they are.
    Unreadable(&'static str, ProxyBody),
    /// An empty body: nothing to leak, nothing to count.
    Empty,
}

/// Reads the app's response body whole, within the response limit, the buffer budget
/// (`reservation` holds the share taken) and `deadline`, and decodes it (gzip, deflate). In
/// Audit mode (`audit`) a body not whole by the deadline is passed on as it continues, with
/// the code Enforce would have answered 504 for, rather than cut.
async fn gather(
    shared: &Shared,
    ctx: &mut Ctx,
    headers: &HeaderMap,
    mut body: AppBody,
    deadline: tokio::time::Instant,
    audit: bool,
    reservation: &mut Reservation,
) -> Result<Gathered, Ungathered> {
    let limit = shared.limits.max_response_body_bytes;
    let mut read = Chunks::default();
    let timed = {
        let collecting = std::pin::pin!(collect_limited(&mut body, &mut read, limit, reservation));
        tokio::time::timeout_at(deadline, collecting).await
    };
    let collected = match timed {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "upstream response body failed");
            ctx.set_reason("upstream_error");
            return Err(Ungathered::Answered(error_response(
                StatusCode::BAD_GATEWAY,
                json!({"error": "upstream response failed", "reason": "upstream_error"}),
            )));
        }
        Err(_) if audit => {
            shared.metrics.limit("upstream_timeout");
            return Err(Ungathered::Unreadable(UPSTREAM_TIMEOUT, read.then(body, reservation.take())));
        }
        Err(_) => {
            shared.metrics.limit("upstream_timeout");
            ctx.set_reason("upstream_timeout");
            return Err(Ungathered::Answered(error_response(
                StatusCode::GATEWAY_TIMEOUT,
                json!({"error": "upstream timed out", "reason": "upstream_timeout"}),
            )));
        }
    };
    let raw = match collected {
        Collected::Complete => concat(read.chunks, read.total),
        Collected::TooLarge => {
            shared.metrics.limit("response_body_bytes");
            return Err(Ungathered::Unreadable("response_too_large", read.then(body, reservation.take())));
        }
        Collected::NoRoom => {
            return Err(Ungathered::Unreadable(
                RESPONSE_BUFFER_EXHAUSTED,
                read.then(body, reservation.take()),
            ));
        }
    };
    if raw.is_empty() {
        return Err(Ungathered::Empty);
    }
    let Some(encoding) = Encoding::of(headers) else {
        return Err(Ungathered::Unreadable(
            UNSUPPORTED_CONTENT_ENCODING,
            ProxyBody::held(raw, reservation.take()),
        ));
    };
    match decode(raw.clone(), encoding, limit) {
        Ok(d) if encoding != Encoding::Identity && !reservation.grow(d.len() as u64) => {
            Err(Ungathered::Unreadable(RESPONSE_BUFFER_EXHAUSTED, ProxyBody::held(raw, reservation.take())))
        }
        Ok(decoded) => Ok(Gathered { raw, decoded }),
        Err(DecodeError::TooLarge) => {
            shared.metrics.limit("response_body_bytes");
            Err(Ungathered::Unreadable("response_too_large", ProxyBody::held(raw, reservation.take())))
        }
        Err(DecodeError::Corrupt) => {
            Err(Ungathered::Unreadable("bad_content_encoding", ProxyBody::held(raw, reservation.take())))
        }
    }
}

/// Why a plan could not be applied to a response.
enum PlanFailure {
    /// More records than the rule's `maxRecordsPerResponse` with `onExceed: Deny`.
    CapExceeded,
    /// The body cannot be transformed: the failure's code.
    Untransformable(&'static str),
}

/// Applies `job`'s plan, the `step`-th applied, to `body` and adds what it did to `applied`;
/// `dry_run`: a dry run's plan (`reservation` is on the dry-run budget).
fn apply_plan(
    shared: &Shared,
    step: usize,
    job: &TransformJob,
    body: &[u8],
    reservation: &mut Reservation,
    applied: &mut Applied,
    dry_run: bool,
) -> Result<Outcome, PlanFailure> {
    // The per-response cap, lowered to what the principal has left of its record quotas.
    // The cut is always a truncation; `onExceed: Deny` is judged on the records that passed
    // the row filter, against the policy's own cap.
    let plan = &*job.plan;
    let quota_cap = job.records_remaining.filter(|r| plan.max_records.is_none_or(|m| *r < m));
    let adjusted;
    let effective: &Plan = match quota_cap {
        Some(cap) => {
            adjusted = Plan { max_records: Some(cap), on_exceed: ExceedAction::Truncate, ..plan.clone() };
            &adjusted
        }
        None => plan,
    };
    let vars = || Vars::new(&job.request, job.user.as_ref(), job.workload.as_ref());
    let entry = reservation.held();
    // The parsed document, when the body needs one, takes its share of the budget too.
    // A dry run's document never fits in more than the dry-run buffers hold.
    let ceiling = if dry_run { shared.dry_run_buffers.total() } else { u64::MAX };
    let room = |needed| needed <= ceiling && reservation.grow(needed);
    let result = custos_transform::apply_within(body, effective, vars, &shared.hash_key, room);
    let transformed = match result {
        Ok(t) => t,
        Err(TransformError::RecordCapExceeded { .. }) => return Err(PlanFailure::CapExceeded),
        Err(TransformError::NoRoomForDocument { needed }) => {
            // More than the whole (enforced) budget: no retry can help, and Enforce would
            // refuse it too.
            let permanent = needed > shared.limits.response_buffer_total_bytes;
            if permanent && !dry_run {
                shared.metrics.limit("response_body_bytes");
            }
            let code = match (permanent, dry_run) {
                (true, _) => "response_too_large",
                (false, true) if needed > ceiling => DRY_RUN_BUFFER_TOO_SMALL,
                (false, true) => DRY_RUN_BUFFER_EXHAUSTED,
                (false, false) => RESPONSE_BUFFER_EXHAUSTED,
            };
            return Err(PlanFailure::Untransformable(code));
        }
        Err(TransformError::RecordsNotFound) => {
            tracing::debug!("the records path finds nothing to filter in the response");
            return Err(PlanFailure::Untransformable("records_not_found"));
        }
        Err(e) => {
            tracing::debug!(error = %e, "response could not be transformed");
            return Err(PlanFailure::Untransformable("response_not_json"));
        }
    };
    let passed = transformed.stats.records_returned + transformed.stats.records_truncated;
    if quota_cap.is_some()
        && plan.on_exceed == ExceedAction::Deny
        && plan.max_records.is_some_and(|m| passed > m)
    {
        return Err(PlanFailure::CapExceeded);
    }
    if !dry_run && let Outcome::Body(out) = &transformed.outcome {
        // The output is held until it is sent, and may be longer than its input (a hash mask
        // makes `1` 35 bytes): it takes its share once the document has given back its own.
        reservation.shrink_to(entry);
        charge_output(shared, reservation, out.len()).map_err(PlanFailure::Untransformable)?;
    }
    applied.add(step, job, transformed.stats);
    Ok(transformed.outcome)
}

/// What the plans applied to a response did, held until the response is certain: then it goes
/// into the event, the metrics (Enforce only: Audit-mode numbers are would-be values and live
/// in the events) and the quotas, at once.
#[derive(Default)]
struct Applied {
    /// The plans' numbers together (`TransformStats::then`).
    stats: TransformStats,
    /// The records each step removed, by the step's position: (step, filtered, truncated).
    removed_by: Vec<(usize, u64, u64)>,
}

impl Applied {
    /// Adds the numbers of the `step`-th plan applied, `job`'s.
    fn add(&mut self, step: usize, job: &TransformJob, stats: TransformStats) {
        if stats.records_filtered > 0 || stats.records_truncated > 0 {
            self.removed_by.push((step, stats.records_filtered, stats.records_truncated));
        }
        self.stats.then(&job.plan, stats, step == 0);
    }

    /// Into the event, the metrics (records served under the rule the event names) and the
    /// quotas of the rules of `jobs` (the plans applied, in order), each charged the records
    /// returned.
    fn commit<'j>(
        self,
        shared: &Shared,
        ctx: &mut Ctx,
        jobs: impl Iterator<Item = &'j TransformJob>,
        now: Timestamp,
    ) {
        let stats = self.stats;
        let returned = stats.records_returned;
        let (m, counters) = (&shared.metrics, &shared.counters);
        let mut enforced = false;
        for (step, job) in jobs.enumerate() {
            enforced = job.mode == Mode::Enforce;
            if let Some(key) = &job.quota_key {
                shared.quotas.record(key, &job.limits, returned, now);
            }
            for &(_, filtered, truncated) in self.removed_by.iter().filter(|r| r.0 == step && enforced) {
                // Rarer: straight to the families.
                let labels = || RuleLabels { policy: job.policy.clone(), rule: job.rule.clone() };
                if filtered > 0 {
                    m.records_filtered.get_or_create(&labels()).inc_by(filtered);
                }
                if truncated > 0 {
                    m.records_truncated.get_or_create(&labels()).inc_by(truncated);
                }
            }
        }
        if enforced {
            if returned > 0 {
                let policy = ctx.event.policy.as_deref().unwrap_or_default();
                let rule = ctx.event.rule.as_deref().unwrap_or_default();
                counters.records_served(m, policy, rule, returned);
            }
            for (class, n) in &stats.masked {
                if *n > 0 {
                    counters.masked_fields(m, class, *n);
                }
            }
        }
        ctx.event.records_returned = returned;
        ctx.event.records_filtered = stats.records_filtered;
        ctx.event.records_truncated = stats.records_truncated;
        ctx.event.record_hashes = stats.record_hashes;
        if stats.record_hashes_omitted > 0 {
            m.record_hashes_omitted.inc_by(stats.record_hashes_omitted);
        }
        ctx.event.masked = stats.masked;
    }
}

/// More records than `maxRecordsPerResponse` with `onExceed: Deny`: 403 in Enforce mode,
/// the app's response untouched in Audit mode.
fn cap_denied(
    ctx: &mut Ctx,
    job: &TransformJob,
    parts: http::response::Parts,
    raw: ProxyBody,
) -> Response<ProxyBody> {
    if job.mode != Mode::Enforce {
        ctx.would_deny("record_cap_exceeded");
        return Response::from_parts(parts, raw);
    }
    ctx.deny("record_cap_exceeded");
    error_response(
        StatusCode::FORBIDDEN,
        json!({"error": "forbidden", "policy": job.policy, "rule": job.rule, "reason": "record_cap_exceeded"}),
    )
}

/// A response that had to be transformed and cannot be: 502 in Enforce, passed through with
/// failOpen or in Audit mode (the event says so).
fn untransformable(
    shared: &Shared,
    ctx: &mut Ctx,
    job: &TransformJob,
    parts: http::response::Parts,
    code: &'static str,
    original: ProxyBody,
) -> Response<ProxyBody> {
    let mut parts = parts;
    shared.metrics.transform_failures.get_or_create(&ReasonLabels { reason: code }).inc();
    match (job.mode, passes_under_fail_open(job, code)) {
        (Mode::Enforce, false) if code == RESPONSE_BUFFER_EXHAUSTED => {
            ctx.deny(code);
            retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "too many responses being checked", "policy": job.policy, "rule": job.rule, "reason": code}),
                1,
            )
        }
        (Mode::Enforce, false) => {
            ctx.deny(code);
            error_response(
                StatusCode::BAD_GATEWAY,
                json!({"error": "response cannot be checked", "policy": job.policy, "rule": job.rule, "reason": code}),
            )
        }
        // Audit mode records what Enforce would do: pass it on.
        (mode, true) => {
            ctx.event.reason = format!("{},fail_open:{code}", ctx.event.reason);
            ctx.reason = "fail_open";
            if mode == Mode::Enforce {
                // The app's bytes, but a page of a policy that rewrites: the caller's.
                keep_out_of_shared_caches(&mut parts.headers);
            }
            Response::from_parts(parts, original)
        }
        _ => {
            ctx.would_deny(code);
            Response::from_parts(parts, original)
        }
    }
}

/// Whether `limits` count or cap the records of a response (`recordsPerHour`,
/// `recordsPerDay`, `maxRecordsPerResponse`).
fn counts_records(limits: &Limits) -> bool {
    limits.records_per_hour.is_some()
        || limits.records_per_day.is_some()
        || limits.max_records_per_response.is_some()
}

/// Whether `job`'s failOpen passes a response its plan cannot read for `code`: not a slice
/// (never a document), not one the buffers had no room for (load, which a client can make: a
/// flood would carry responses out unmasked), not one the app did not finish in time (Enforce
/// answers 504 whatever failOpen says).
fn passes_under_fail_open(job: &TransformJob, code: &str) -> bool {
    job.fail_open && !matches!(code, PARTIAL_CONTENT | RESPONSE_BUFFER_EXHAUSTED | UPSTREAM_TIMEOUT)
}

/// An h2 client may send its cookies as several `cookie` fields (RFC 9113 §8.2.3 lets it
/// split them for compression); before they go on over HTTP/1.1 they are joined into one
/// with `; `, as that section requires: an app reads only one `Cookie` header (RFC 6265).
fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (crumbs.next(), crumbs.next()) else { return };
    let mut joined = first.as_bytes().to_vec();
    for crumb in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(crumb.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// The headers of a response rewritten for its caller (or of a HEAD, 204 or 304 answer of such
/// a rule): without those that describe the app's body ([`is_body_metadata`]), kept out of
/// shared caches ([`keep_out_of_shared_caches`]). One pass over the names.
fn rewritten_for_the_caller(headers: &mut HeaderMap) {
    remove_present(headers, |name| is_body_metadata(name) || is_for_shared_caches(name));
    set_private(headers);
}

/// Keeps a response of a policy that rewrites responses out of shared caches: what the app
/// answers there depends on the caller, and an app that marked the page `public` (or gave it
/// an `s-maxage`) would have a CDN or gateway cache serve one caller's rows to the next, or an
/// unrestricted caller's page to a restricted one. The headers only shared caches read go
/// ([`is_for_shared_caches`]) and the response is `Cache-Control: private` ([`set_private`]).
fn keep_out_of_shared_caches(headers: &mut HeaderMap) {
    remove_present(headers, is_for_shared_caches);
    set_private(headers);
}

/// `CDN-Cache-Control` (RFC 9213) and `Surrogate-Control`: caching instructions that only
/// shared caches read, and prefer over `Cache-Control`.
fn is_for_shared_caches(name: &str) -> bool {
    matches!(name, "cdn-cache-control" | "surrogate-control")
}

/// `Cache-Control: private`, with the app's other directives (`max-age` still holds for the
/// caller's own cache, `no-store` stays `no-store`), without `public`, `s-maxage` and
/// `proxy-revalidate`.
fn set_private(headers: &mut HeaderMap) {
    if !headers.contains_key(header::CACHE_CONTROL) {
        // The common case: nothing to keep, nothing to allocate.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
        return;
    }
    let mut directives = vec!["private"];
    let values: Vec<HeaderValue> = headers.get_all(header::CACHE_CONTROL).iter().cloned().collect();
    for value in &values {
        // An unreadable value is dropped: `private` says what matters.
        let Ok(text) = value.to_str() else { continue };
        for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let name = directive.split('=').next().unwrap_or("").trim();
            // `private="field"` names fields only; `private` itself comes first.
            let shared = ["public", "s-maxage", "proxy-revalidate", "private"];
            if !shared.iter().any(|s| name.eq_ignore_ascii_case(s)) && !directives.contains(&directive) {
                directives.push(directive);
            }
        }
    }
    let value =
        HeaderValue::from_str(&directives.join(", ")).unwrap_or_else(|_| HeaderValue::from_static("private"));
    headers.insert(header::CACHE_CONTROL, value);
}

/// Whether `name` is one of the response headers that describe the app's bytes, dropped
/// when the body is rewritten (and from HEAD, 204 and 304 answers to a request whose
/// response would be): a hash or length of the unmasked body tells a caller whether a guess
/// of a masked value is right. (A `match`: the names are told apart by length first.)
fn is_body_metadata(name: &str) -> bool {
    matches!(
        name,
        "content-encoding"
            | "content-length"
            | "trailer"
            | "etag"
            | "accept-ranges"
            | "content-md5"
            | "digest"
            | "content-digest"
            | "repr-digest"
    )
}

/// Whether `name` is one of the request headers dropped when the response will be
/// transformed (Enforce): each could make the app answer with something other than the
/// whole representation, which the plan could not be applied to. A `Range` would return a slice (a bare `"+4917..."` is valid JSON that
/// no mask path matches, so masks and row filters would be bypassed a few bytes at a time);
/// a validator would return a 304 whose `ETag` describes the unmasked body, or confirm that
/// a record outside the caller's scope exists.
fn is_untransformable_request_header(name: &str) -> bool {
    matches!(name, "range" | "if-range" | "if-none-match" | "if-modified-since")
}

/// [`is_untransformable_request_header`], and for a read (GET, HEAD) the write
/// preconditions too: `If-Match` and `If-Unmodified-Since` on a read only tell, by a 412 or a
/// 200, whether a guessed `ETag` is the unmasked body's. On a write they guard against lost
/// updates, and stay.
fn is_untransformable_read_header(name: &str) -> bool {
    is_untransformable_request_header(name) || matches!(name, "if-match" | "if-unmodified-since")
}

/// Removes from `headers` every header whose name `named` picks (at most 8 names). One pass
/// over the few headers a message has finds them, and only they are looked up: a lookup per
/// name, absent or not, cost about 80 instructions each on every masked request.
fn remove_present(headers: &mut HeaderMap, named: fn(&str) -> bool) {
    let mut found: [Option<HeaderName>; 8] = Default::default();
    let mut slots = found.iter_mut();
    for name in headers.keys() {
        if named(name.as_str())
            && let Some(slot) = slots.next()
        {
            *slot = Some(name.clone());
        }
    }
    for name in found.iter().flatten() {
        headers.remove(name);
    }
}

/// Builds the request to the app: normalised path and original query (origin-form), original
/// method and headers (hop-by-hop ones already gone, see [`strip_hop_by_hop`]), `Host` (the
/// client's, else the app's address), `x-forwarded-for` appended; `TE: trailers` asked again
/// when `ask_trailers` (the client accepts them and the response passes through).
fn upstream_request(
    state: &PolicyState,
    parts: http::request::Parts,
    body: RequestBody,
    path: &NormalizedPath,
    ip: &str,
    transform: Option<&TransformJob>,
    ask_trailers: bool,
) -> Result<Request<RequestBody>, ()> {
    let mut target = encode_path(path.as_str());
    if target.len() > 1 && parts.uri.path().ends_with('/') {
        // The same resource, as the client named it: an app that wants the slash (Django's
        // APPEND_SLASH, DRF's routers) would otherwise redirect to it, for ever.
        target.push('/');
    }
    if let Some(q) = path.query() {
        target.push('?');
        target.push_str(q);
    }
    let uri = Uri::try_from(target).map_err(|_| ())?;
    let mut headers = parts.headers;
    if parts.version == Version::HTTP_2 {
        join_cookie_crumbs(&mut headers);
    }
    if !headers.contains_key(header::HOST) {
        // h2's `:authority`, else (HTTP/1.0 without `Host`) the app's own address.
        let authority = parts.uri.authority().unwrap_or(&state.upstream_authority);
        headers.insert(header::HOST, HeaderValue::from_str(authority.as_str()).map_err(|_| ())?);
    }
    let forwarded = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.to_owned(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if transform.is_some_and(|t| t.mode == Mode::Enforce) {
        // The body will be rewritten: ask for it uncompressed (gzip/deflate are decoded anyway),
        // whole and unconditionally.
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let untransformable = if parts.method == Method::GET || parts.method == Method::HEAD {
            is_untransformable_read_header
        } else {
            is_untransformable_request_header
        };
        remove_present(&mut headers, untransformable);
    }
    if ask_trailers {
        // The response passes through as it comes, with the trailer fields the client
        // accepts (a response read to be transformed or audited is read without them).
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if !body.is_end_stream() {
        // Request trailer fields never reach the app (`RequestBody` drops them); a request
        // without a body has none to announce.
        headers.remove(header::TRAILER);
    }
    if !body.is_end_stream() && body.is_complete() {
        // The whole body was read: the sidecar has answered any `100-continue` itself, and
        // goes with its length.
        headers.remove(header::EXPECT);
    }
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = headers;
    Ok(out)
}

/// Percent-encodes a normalised path back into a request-target path: bytes outside
/// RFC 3986 `pchar` and `/` are encoded; `%` only ever appears as the `%25` the normaliser
/// kept, so it is copied.
pub(crate) fn encode_path(path: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'/' | b'-'
                    | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b'='
                    | b':'
                    | b'@'
                    | b'%'
            );
        if keep {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// Removes hop-by-hop headers, those named by `Connection`, and `x-custos-*`; returns whether
/// a `TE` header removed accepted trailers (`TE: trailers`).
///
/// One pass over the names present finds what goes (most messages carry none of them, or
/// only `Connection: keep-alive`), and only that is removed, by name, with no allocation
/// unless an `x-custos-*` header or several `Connection` headers are present.
fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    // bit i: HOP_BY_HOP[i] is present
    let mut present = 0u16;
    let mut custos = Vec::new();
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name.as_str()) {
            present |= 1 << i;
        } else if is_custos_or_url_rewrite(name) {
            custos.push(name.clone());
        }
    }
    // Read before `Connection` names are removed: a client sending `TE` must name it there too
    // (RFC 9110 §10.1.4).
    let trailers = present & TE_BIT != 0
        && headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers")))
            })
        });
    if present & 1 != 0 {
        // HOP_BY_HOP[0], Connection: its values name more headers to remove.
        let mut values = headers.get_all(header::CONNECTION).iter();
        let first = values.next().cloned();
        let more: Vec<HeaderValue> = values.cloned().collect();
        headers.remove(header::CONNECTION);
        for value in first.iter().chain(&more) {
            let Ok(text) = value.to_str() else { continue };
            for token in text.split(',').map(str::trim) {
                // `keep-alive`, the usual token, is removed below if present; a name that is
                // not a valid header name finds nothing
                if !token.eq_ignore_ascii_case("keep-alive") {
                    headers.remove(token);
                }
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate().skip(1) {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
    for name in custos {
        headers.remove(name);
    }
    trailers
}

/// Headers some frameworks route by instead of the request target (Symfony before 3.4.14 and
/// Zend read `X-Original-URL` and `X-Rewrite-URL`, as set by IIS): the app would serve
/// another path than the one decided on. Also spelled with `_` for `-`.
const URL_REWRITE_HEADERS: [&[u8]; 2] = [b"x-original-url", b"x-rewrite-url"];

/// Whether `name` is an `x-custos-*` header or one of [`URL_REWRITE_HEADERS`] (each also
/// spelled with `_` for `-`). Its text is read once: most names are neither.
fn is_custos_or_url_rewrite(name: &HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    (name.len() > CUSTOS_PREFIX.len()
        && same_folding_underscores(&name[..CUSTOS_PREFIX.len()], CUSTOS_PREFIX))
        || (matches!(name.len(), 13 | 14)
            && URL_REWRITE_HEADERS.iter().any(|h| same_folding_underscores(name, h)))
}

/// The prefix of the sidecar's own headers, never taken from a client.
const CUSTOS_PREFIX: &[u8] = b"x-custos-";

/// The warning that tokens cannot be verified, at most every 10 s (not one a request).
static IDENTITY_WARNINGS: crate::throttle::Throttle = crate::throttle::Throttle::every_secs(10);

/// Whether a `_method` parameter in a POST's body could make the policies decide otherwise:
/// some method a rule names, a common one, or one no rule names, gets another verdict (or
/// another rule, of any policy that applies) than the POST for the same path, caller and
/// users. Asked only of bodies the sidecar could not read whole.
fn override_matters(
    state: &PolicyState,
    path: &NormalizedPath,
    caller: Option<&WorkloadIdentity>,
    users: &Users,
    time: i64,
) -> bool {
    /// Methods the frameworks' `_method` commonly names, and one no rule names.
    const COMMON: [&str; 8] =
        ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "X-CUSTOS-UNNAMED"];
    let verdict_of = |method: &str| {
        let request = EngineRequest { method, path, caller, user: None, time };
        let v = state.engine.decide_as(&request, |i| state.user_of(users, i));
        std::iter::once(&v)
            .chain(&v.also)
            .map(|v| {
                let policy = v.policy.map_or(std::ptr::null(), std::ptr::from_ref);
                let rule = v.rule.map_or(std::ptr::null(), std::ptr::from_ref);
                (v.decision, policy, rule)
            })
            .collect::<Vec<_>>()
    };
    let post = verdict_of("POST");
    let mut methods: Vec<&str> = COMMON.to_vec();
    let rules = state.engine.policies().iter().flat_map(|p| p.deny_rules.iter().chain(&p.allow_rules));
    for method in rules.flat_map(|r| r.methods.iter().map(String::as_str)) {
        // Each method once: a policy of many rules names the same few.
        if !methods.contains(&method) {
            methods.push(method);
        }
    }
    methods.into_iter().any(|method| verdict_of(method) != post)
}

/// Whether `name` is one of [`METHOD_OVERRIDE_HEADERS`], also spelled with `_` for `-`
/// (`X_HTTP_Method_Override`): servers that hand headers to the app as CGI variables (Puma,
/// PHP) map both spellings to `HTTP_X_HTTP_METHOD_OVERRIDE`.
fn is_method_override_header(name: &HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    METHOD_OVERRIDE_HEADERS.iter().any(|h| same_folding_underscores(name, h.as_bytes()))
}

/// Whether `name` (a lower-case header name) is `lower`, an `_` in `name` standing for `-`.
fn same_folding_underscores(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len() && name.iter().zip(lower).all(|(&n, &l)| n == l || (n == b'_' && l == b'-'))
}

/// Size of the request line and headers, as received (approximately: names, values and
/// separators). The URI's authority counts too: h2's `:authority` becomes the app's `Host`,
/// so it is held to the same limit as a `Host` header (an HTTP/1.1 absolute-form target's
/// authority is part of its request line).
fn header_bytes<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let line = req.method().as_str().len()
        + uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + 12;
    req.headers().iter().fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// The `Authorization` value when it uses the Bearer scheme, or names it anywhere as a word
/// (other schemes are the app's). `Basic eA==, Bearer <jwt>` or `Bearer` followed by a
/// non-breaking space is a token to an app that splits credentials at commas or at any
/// white space: the verifiers see it too (and refuse its form), rather than the app alone.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    names_bearer(v).then_some(v)
}

/// Whether `value` holds `bearer` (any case) at its start or after white space or a comma,
/// and not followed by another token character: the scheme as any reader could take it
/// (`realm=bearer` or base64 text holding the letters is not).
fn names_bearer(value: &[u8]) -> bool {
    const SCHEME: &[u8] = b"bearer";
    let token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    (0..value.len().saturating_sub(SCHEME.len() - 1)).any(|at| {
        value[at..at + SCHEME.len()].eq_ignore_ascii_case(SCHEME)
            && (at == 0 || matches!(value[at - 1], b' ' | b'\t' | b','))
            && value.get(at + SCHEME.len()).is_none_or(|&b| !token_char(b))
    })
}

/// The principal a rule's quotas count under: `user` as the rule's own policy verified it
/// (none for a policy that verifies no users, whatever another policy's verifier found: a
/// caller holding many tokens of that issuer would be as many principals), else the calling
/// workload, else the peer (`peer_ip`).
fn quota_principal(user: Option<&User>, caller: Option<&WorkloadIdentity>, peer_ip: &str) -> String {
    principal(user, caller).unwrap_or_else(|| ["peer:", peer_ip].concat())
}

/// `key`'s principal where it is not `event`'s own (the event's `rulePrincipal`, and the
/// principal of its `alsoApplied` and charged `dryRuns` entries).
fn other_principal(key: &QuotaKey, event: &AuditEvent) -> Option<String> {
    (key.principal != event.principal).then(|| key.principal.clone())
}

/// The principal of a known user or workload; `None`: an anonymous peer, whose principal
/// (`peer:<ip>`) the event holds from the start.
fn principal(user: Option<&User>, caller: Option<&WorkloadIdentity>) -> Option<String> {
    match (user, caller) {
        (Some(u), _) => Some(format!("user:{}", u.id)),
        (None, Some(w)) => Some(format!("workload:{}/{}", w.namespace, w.service_account)),
        (None, None) => None,
    }
}

/// The longest method an audit event records: the methods of HTTP are a few letters, and a
/// longer one (hyper takes any token up to the request head's size) is cut to this, so that
/// one hostile request cannot make an event, and the batch it ships in, one the collector
/// refuses.
const MAX_EVENT_METHOD_BYTES: usize = 64;

/// `method` as an audit event records it: at most [`MAX_EVENT_METHOD_BYTES`] (a method is
/// an ASCII token, so any cut is at a character boundary).
fn event_method(method: &hyper::Method) -> String {
    let m = method.as_str();
    m.get(..MAX_EVENT_METHOD_BYTES).unwrap_or(m).to_string()
}

/// The trace id of a W3C `traceparent` header.
fn trace_id(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(&TRACEPARENT)?.to_str().ok()?;
    let mut parts = v.trim().split('-');
    let _version = parts.next()?;
    let id = parts.next()?;
    (id.len() == 32
        && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0'))
    .then(|| id.to_string())
}

/// 401 `missing_token`, with `WWW-Authenticate: Bearer`.
fn unauthenticated(verdict: &Verdict<'_>) -> Response<ProxyBody> {
    let mut resp = error_response(
        StatusCode::UNAUTHORIZED,
        json!({
            "error": "unauthenticated",
            "policy": verdict.policy.map(|p| p.name.as_str()),
            "reason": "missing_token",
            "detail": "no allow rule matched and the request carries no bearer token",
        }),
    );
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

fn forbidden(verdict: &Verdict<'_>) -> Response<ProxyBody> {
    error_response(
        StatusCode::FORBIDDEN,
        json!({
            "error": "forbidden",
            "policy": verdict.policy.map(|p| p.name.as_str()),
            "rule": verdict.rule.map(|r| r.name.as_str()),
            "reason": verdict.reason.code(),
            "detail": verdict.explanation(),
        }),
    )
}

fn bad_request(message: &str, code: &str) -> Response<ProxyBody> {
    error_response(StatusCode::BAD_REQUEST, json!({"error": message, "reason": code}))
}

/// 408: the client did not send its body within `timeout`. The connection is closed, as the
/// rest of the body may still arrive.
fn body_timed_out(shared: &Shared, timeout: std::time::Duration) -> Response<ProxyBody> {
    shared.metrics.limit("request_body_timeout");
    request_timeout(json!({
        "error": "request body not received in time",
        "reason": "request_body_timeout",
        "timeoutSeconds": timeout.as_secs_f64(),
    }))
}

/// 408 for a client whose request body fell behind the minimum rate.
fn body_too_slow(shared: &Shared, bytes_per_second: u64) -> Response<ProxyBody> {
    shared.metrics.limit("request_body_rate");
    request_timeout(json!({
        "error": "request body arriving too slowly",
        "reason": "request_body_too_slow",
        "minBytesPerSecond": bytes_per_second,
    }))
}

/// 408 with `body`, closing the connection: the rest of the request body may still arrive.
fn request_timeout(body: serde_json::Value) -> Response<ProxyBody> {
    let mut resp = error_response(StatusCode::REQUEST_TIMEOUT, body);
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn body_too_large(limit: u64) -> Response<ProxyBody> {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        json!({"error": "request body too large", "reason": "request_body_too_large", "limit": limit}),
    )
}

/// A short JSON error document.
pub(crate) fn error_response(status: StatusCode, body: serde_json::Value) -> Response<ProxyBody> {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut resp = Response::new(ProxyBody::full(bytes));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// [`error_response`] with `Retry-After: <secs>`.
fn retry_later(status: StatusCode, body: serde_json::Value, secs: u64) -> Response<ProxyBody> {
    let mut resp = error_response(status, body);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// h2's `:authority` becomes the app's `Host`: it counts as a `Host` header would.
    #[test]
    fn the_authority_counts_as_header_bytes() {
        let host = "a".repeat(3000);
        let h2 = Request::get(format!("http://{host}/x")).version(Version::HTTP_2).body(()).unwrap();
        let h1 = Request::get("/x").header(header::HOST, host.as_str()).body(()).unwrap();
        assert!(header_bytes(&h2) > 3000, "{}", header_bytes(&h2));
        assert!(header_bytes(&h2).abs_diff(header_bytes(&h1)) < 16);
    }

    #[test]
    fn events_record_methods_of_at_most_64_bytes() {
        assert_eq!(event_method(&hyper::Method::GET), "GET");
        let long = "X".repeat(20_000);
        let method = hyper::Method::from_bytes(long.as_bytes()).unwrap();
        assert_eq!(event_method(&method), "X".repeat(MAX_EVENT_METHOD_BYTES));
        let exact = hyper::Method::from_bytes("Y".repeat(MAX_EVENT_METHOD_BYTES).as_bytes()).unwrap();
        assert_eq!(event_method(&exact).len(), MAX_EVENT_METHOD_BYTES);
    }

    fn mk_job(policy: &str, fail_open: bool) -> TransformJob {
        TransformJob {
            plan: Arc::new(Plan::default()),
            mode: Mode::Enforce,
            fail_open,
            policy: policy.into(),
            rule: "r".into(),
            request: RequestVars {
                method: "GET".into(),
                path: "/".into(),
                params: Default::default(),
                time: 0,
            },
            user: None,
            workload: None,
            records_remaining: None,
            limits: Default::default(),
            quota_key: None,
            before: Vec::new(),
        }
    }

    /// Several rules' plans make one job in the order given; a failure passes the app's
    /// response only when every policy says failOpen.
    #[test]
    fn plans_of_several_rules_make_one_job() {
        let job = |jobs: Vec<TransformJob>| {
            let job = TransformJob::in_order(jobs).unwrap();
            let names: Vec<_> = job.steps().map(|j| j.policy.clone()).collect();
            (names.join(","), job.steps().map(|j| j.fail_open).collect::<Vec<_>>())
        };
        assert!(TransformJob::in_order(Vec::new()).is_none());
        assert_eq!(job(vec![mk_job("a", true)]), ("a".into(), vec![true]));
        assert_eq!(job(vec![mk_job("a", false)]), ("a".into(), vec![false]));
        let all_open = vec![mk_job("c", true), mk_job("d", true), mk_job("b", true)];
        assert_eq!(job(all_open), ("c,d,b".into(), vec![true; 3]));
        for closed in 0..3 {
            let mut jobs = vec![mk_job("c", true), mk_job("d", true), mk_job("b", true)];
            jobs[closed].fail_open = false;
            assert_eq!(job(jobs), ("c,d,b".into(), vec![false; 3]), "{closed}");
        }
    }

    #[test]
    fn transformed_responses_stay_out_of_shared_caches() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "private"),
            (&["public, max-age=600"], "private, max-age=600"),
            (&["Public, S-MaxAge=3600, max-age=60, proxy-revalidate"], "private, max-age=60"),
            (&["no-store"], "private, no-store"),
            (&["private"], "private"),
            (&["private=\"set-cookie\", max-age=5"], "private, max-age=5"),
            (&["public", "max-age=10, must-revalidate"], "private, max-age=10, must-revalidate"),
            (&["max-age=10", "max-age=10"], "private, max-age=10"),
            (&[" , ,"], "private"),
        ];
        for (values, want) in cases {
            let mut headers = HeaderMap::new();
            for v in *values {
                headers.append(header::CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
            }
            keep_out_of_shared_caches(&mut headers);
            let got: Vec<_> = headers.get_all(header::CACHE_CONTROL).iter().collect();
            assert_eq!(got, [*want], "{values:?}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_bytes(b"public, max-age=\xff").unwrap());
        keep_out_of_shared_caches(&mut headers);
        assert_eq!(headers[header::CACHE_CONTROL], "private", "an unreadable value goes");
    }

    #[test]
    fn encoded_paths_normalise_to_themselves() {
        for p in ["/café/😀", "/customers/export ", "/discount/50%25-off", "/a\"b/{x}", "/customers/+49"] {
            let n = normalize(p).unwrap();
            let encoded = encode_path(n.as_str());
            assert!(encoded.is_ascii());
            assert_eq!(normalize(&encoded).unwrap().as_str(), n.as_str(), "{p}");
            assert!(encoded.parse::<Uri>().is_ok(), "{encoded}");
        }
    }

    #[test]
    fn the_header_predicates_pick_exactly_the_documented_names() {
        const BODY_METADATA_HEADERS: [&str; 8] = [
            "content-encoding",
            "content-length",
            "etag",
            "accept-ranges",
            "content-md5",
            "digest",
            "content-digest",
            "repr-digest",
        ];
        const UNTRANSFORMABLE_REQUEST_HEADERS: [&str; 4] =
            ["range", "if-range", "if-none-match", "if-modified-since"];
        for name in BODY_METADATA_HEADERS {
            assert!(is_body_metadata(name), "{name}");
            assert!(!is_untransformable_request_header(name), "{name}");
        }
        for name in UNTRANSFORMABLE_REQUEST_HEADERS {
            assert!(is_untransformable_request_header(name), "{name}");
            assert!(!is_body_metadata(name), "{name}");
        }
        for name in ["content-type", "etags", "x-etag", "", "Content-Length", "ranges", "if-match"] {
            assert!(!is_body_metadata(name) && !is_untransformable_request_header(name), "{name}");
        }
        for name in UNTRANSFORMABLE_REQUEST_HEADERS.into_iter().chain(["if-match", "if-unmodified-since"]) {
            assert!(is_untransformable_read_header(name), "{name}");
        }
        assert!(!is_untransformable_read_header("if-matches"));
    }

    #[test]
    fn only_the_named_headers_are_removed_every_value_of_them() {
        let mut h = HeaderMap::new();
        remove_present(&mut h, is_body_metadata);
        for (name, value) in [
            ("etag", "\"a\""),
            ("content-type", "application/json"),
            ("digest", "x"),
            ("digest", "y"),
            ("x-etag", "z"),
        ] {
            h.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        remove_present(&mut h, is_body_metadata);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-etag"]);
    }

    #[test]
    fn cookie_crumbs_are_joined() {
        let mut h = HeaderMap::new();
        join_cookie_crumbs(&mut h);
        assert!(h.is_empty());
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookie_crumbs(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1"]);
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("session=x; c=3"));
        join_cookie_crumbs(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2; session=x; c=3"]);
    }

    #[test]
    fn override_and_custos_headers_are_known_in_either_spelling() {
        for name in METHOD_OVERRIDE_HEADERS.into_iter().chain([
            "x_http_method_override",
            "x-http_method",
            "x_method-override",
        ]) {
            assert!(is_method_override_header(&HeaderName::from_static(name)), "{name}");
        }
        for name in
            ["x-http-method-overrides", "x-http-methods", "x-method", "x_http_method_overrid", "http-method"]
        {
            assert!(!is_method_override_header(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "x-custos-user",
            "x_custos_user",
            "x-custos_attrs",
            "x_custos-a",
            "x-original-url",
            "x_rewrite_url",
            "x-rewrite_url",
        ] {
            assert!(is_custos_or_url_rewrite(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "x-custos-",
            "x-custos",
            "x-custo-user",
            "xx-custos-user",
            "custos-user",
            "x-original-urls",
            "x-rewrite",
        ] {
            assert!(!is_custos_or_url_rewrite(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn traceparent() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(trace_id(&h).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        );
        assert_eq!(trace_id(&h), None);
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        assert_eq!(trace_id(&h), None);
    }

    #[test]
    fn bearer_scheme() {
        let mut h = HeaderMap::new();
        assert!(bearer(&h).is_none());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(bearer(&h).is_none());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer abc"));
        assert!(bearer(&h).is_some());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer"));
        assert!(bearer(&h).is_some());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearerx"));
        assert!(bearer(&h).is_none());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer\tabc"));
        assert!(bearer(&h).is_some(), "a tab separates the token too");
        // Another reader's token: verified (and refused for its form), not passed on unread.
        for disguised in
            [&b"Basic eA==, Bearer abc"[..], b"Bearer\xa0abc", b"Digest a=1,bearer abc", b"BEARER=abc"]
        {
            h.insert(header::AUTHORIZATION, HeaderValue::from_bytes(disguised).unwrap());
            assert!(bearer(&h).is_some(), "{disguised:?}");
        }
        for other in [
            &b"Basic YmVhcmVyOmJlYXJlcg=="[..],
            b"Digest realm=\"bearer\"",
            b"Basic bearerx",
            b"Negotiate abc",
        ] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_bytes(other).unwrap());
            assert!(bearer(&h).is_none(), "{other:?}");
        }
    }

    #[test]
    fn peer_addresses_read_as_display_writes_them() {
        for octet in 0..=255u8 {
            for at in 0..4 {
                let mut octets = [1, 22, 133, 4];
                octets[at] = octet;
                let ip = IpAddr::from(octets);
                assert_eq!(ip_text(ip), ip.to_string());
            }
        }
        let mapped: IpAddr = "::ffff:10.0.200.7".parse().unwrap();
        assert_eq!(ip_text(mapped), "10.0.200.7");
        let v6: IpAddr = "fd00::1:2".parse().unwrap();
        assert_eq!(ip_text(v6), "fd00::1:2");
    }

    #[test]
    fn hop_by_hop_and_custos_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-custos-user", HeaderValue::from_static("admin"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));

        // every hop-by-hop name, several Connection headers, several x-custos-* headers
        let mut h = HeaderMap::new();
        for name in HOP_BY_HOP {
            h.append(name, HeaderValue::from_static("1"));
        }
        h.append(header::CONNECTION, HeaderValue::from_static("x-a"));
        h.append(header::CONNECTION, HeaderValue::from_static(" X-B ,,"));
        for name in ["x-a", "x-b", "x-custos-user", "x-custos-attrs", "x-c", "content-type"] {
            h.append(name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-c"]);

        // `close` and `keep-alive` as options remove headers of those names too
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Close, KEEP-ALIVE"));
        h.insert("close", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["accept"]);

        // tokens that are not header names are passed over; a name in any case is removed
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, bad name, , X-Y, x-\"q\""));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-y", HeaderValue::from_static("1"));
        h.insert("x-z", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-z"]);

        // nothing to strip: nothing changes
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        let before = h.clone();
        assert!(!strip_hop_by_hop(&mut h));
        assert_eq!(h, before);

        // `TE` goes, and says whether the sender accepts trailer fields; `Trailer` stays
        for (te, accepts) in [
            (&["trailers"][..], true),
            (&["gzip, Trailers;q=1"], true),
            (&["gzip", " trailers "], true),
            (&["gzip, deflate"], false),
            (&["trailersx", "x-trailers"], false),
        ] {
            let mut h = HeaderMap::new();
            for value in te {
                h.append(header::TE, HeaderValue::from_static(value));
            }
            h.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
            assert_eq!(strip_hop_by_hop(&mut h), accepts, "{te:?}");
            assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["trailer"]);
        }
    }
}
