//! The admission webhooks end to end through the router, with the AdmissionReview fixtures of
//! `operator/testdata/` (as the apiserver sends them): injection patches applied to the
//! fixture's pod give the expected pod, re-admission changes nothing, opt-outs and injected
//! pods get no patch, invalid policies are denied with their field paths, risky ones admitted
//! with warnings, malformed bodies get 400, updates that would take an injected pod's sidecar
//! away (image swapped, `kubectl debug` into its volumes or process) are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use custos_api::DataAccessPolicy;
use custos_operator::OperatorMetrics;
use custos_operator::webhook::review::{AdmissionResponse, AdmissionReviewResponse};
use custos_operator::webhook::{StaticView, WebhookState, router};
use custos_operator_core::inject::InjectSettings;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const MUTATE: &str = "/mutate-pods";
const VALIDATE: &str = "/validate-policies";
const VALIDATE_PODS: &str = "/validate-pods";

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn policy_of(review: &str) -> DataAccessPolicy {
    serde_json::from_value(fixture(review)["request"]["object"].clone()).unwrap()
}

fn settings() -> InjectSettings {
    InjectSettings {
        image: "registry.example/custos:0.1.0".to_string(),
        collector_url: Some("http://custos-collector.custos-system.svc:8080".to_string()),
        collector_token_secret: Some("custos-collector-token".to_string()),
        hash_key_secret: Some("custos-hash-key".to_string()),
        ..InjectSettings::default()
    }
}

fn namespace_labels(name: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([("kubernetes.io/metadata.name".to_string(), name.to_string())]);
    labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    labels
}

/// The cluster of the fixtures: the customer-api policy (valid fixture) and the waybill-api
/// one (Audit fixture) in `logistics`; `legacy` labelled for injection, with a policy for
/// another app (so its `custos-config` exists).
fn legacy_billing_policy() -> DataAccessPolicy {
    serde_json::from_value(json!({
        "apiVersion": "custos.dev/v1alpha1", "kind": "DataAccessPolicy",
        "metadata": {"name": "billing", "namespace": "legacy"},
        "spec": {"workload": {"selector": {"matchLabels": {"app": "billing"}}, "appPort": 8080}}
    }))
    .unwrap()
}

fn app() -> (Router, OperatorMetrics) {
    let view = StaticView::new()
        .with_policy(policy_of("policy-valid.json"))
        .with_policy(policy_of("policy-audit.json"))
        .with_policy(legacy_billing_policy())
        .with_namespace("logistics", namespace_labels("logistics", &[]))
        .with_namespace("legacy", namespace_labels("legacy", &[("custos.dev/injection", "enabled")]));
    let metrics = OperatorMetrics::new();
    (router(WebhookState::new(Arc::new(view), settings(), metrics.clone())), metrics)
}

async fn post(app: &Router, path: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    (status, response.into_body().collect().await.unwrap().to_bytes().to_vec())
}

/// Sends `review` and returns its response, checking the envelope and the uid.
async fn admit(app: &Router, path: &str, review: &Value) -> AdmissionResponse {
    let (status, body) = post(app, path, serde_json::to_vec(review).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let raw: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(raw["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(raw["kind"], "AdmissionReview");
    if let Some(patch) = raw["response"].get("patch") {
        assert!(patch.is_string(), "patch must be base64 text, as the API specifies: {patch}");
    }
    let answer: AdmissionReviewResponse = serde_json::from_value(raw).unwrap();
    assert_eq!(answer.response.uid, review["request"]["uid"].as_str().unwrap());
    answer.response
}

/// Applies the response's JSON patch to `object`.
fn apply(object: &Value, response: &AdmissionResponse) -> Value {
    assert!(response.allowed);
    assert_eq!(response.patch_type.as_deref(), Some("JSONPatch"));
    let bytes = &response.patch.as_ref().expect("a patch").0;
    let patch: json_patch::Patch = serde_json::from_slice(bytes).unwrap();
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    patched
}

fn with_object(review: &Value, object: Value) -> Value {
    let mut review = review.clone();
    review["request"]["object"] = object;
    review
}

#[tokio::test]
async fn injection_patches_give_the_expected_pods_and_are_idempotent() {
    let (app, metrics) = app();
    for (name, expected) in [
        ("pod-selected.json", "pod-selected.expected.json"),
        ("pod-generate-name.json", "pod-generate-name.expected.json"),
        ("pod-namespace-labelled.json", "pod-namespace-labelled.expected.json"),
    ] {
        let review = fixture(name);
        let response = admit(&app, MUTATE, &review).await;
        assert_eq!(response.warnings, None, "{name}");
        let patched = apply(&review["request"]["object"], &response);
        assert_eq!(patched, fixture(expected), "{name}: the patched pod differs from {expected}");

        // The patched pod admitted again: nothing to do.
        let again = admit(&app, MUTATE, &with_object(&review, patched)).await;
        assert!(again.allowed, "{name}");
        assert_eq!(again.patch, None, "{name}: re-admission must not patch");
        assert_eq!(again.warnings, None, "{name}");
    }
    assert_eq!(metrics.admissions("mutate-pods", "injected"), 3);
    assert_eq!(metrics.admissions("mutate-pods", "skipped"), 3);
}

/// A pod an enforced policy selects that opts out, or carries a container named like the
/// sidecar that is not it, is refused (fail closed); an injected pod admitted again is left
/// alone.
#[tokio::test]
async fn unprotected_pods_an_enforced_policy_selects_are_refused_and_injected_pods_left_alone() {
    let (app, metrics) = app();
    let response = admit(&app, MUTATE, &fixture("pod-opted-out.json")).await;
    assert!(!response.allowed);
    assert_eq!(response.patch, None);
    let status = response.status.unwrap();
    assert_eq!(status.code, Some(403));
    let message = status.message.unwrap();
    assert!(
        message.contains("custos.dev/inject=false") && message.contains("customer-api (mode Enforce)"),
        "{message}"
    );

    let response = admit(&app, MUTATE, &fixture("pod-already-injected.json")).await;
    assert!(response.allowed);
    assert_eq!(response.patch, None);
    assert_eq!(response.warnings, None);

    // The same pod with its sidecar container's image replaced.
    let mut forged = fixture("pod-already-injected.json");
    let containers = forged["request"]["object"]["spec"]["containers"].as_array_mut().unwrap();
    let sidecar = containers.iter_mut().find(|c| c["name"] == "custos-sidecar").unwrap();
    sidecar["image"] = json!("alpine/socat");
    let response = admit(&app, MUTATE, &forged).await;
    assert!(!response.allowed);
    let message = response.status.unwrap().message.unwrap();
    assert!(
        message.contains("image alpine/socat") && message.contains("not the Custos sidecar"),
        "{message}"
    );

    assert_eq!(metrics.admissions("mutate-pods", "refused"), 2);
    assert_eq!(metrics.admissions("mutate-pods", "skipped"), 1);
}

#[tokio::test]
async fn a_pod_no_policy_selects_is_admitted_unchanged() {
    let (app, _) = app();
    let mut review = fixture("pod-selected.json");
    review["request"]["object"]["metadata"]["labels"] = json!({"app": "billing-api"});
    let response = admit(&app, MUTATE, &review).await;
    assert!(response.allowed);
    assert_eq!((response.patch, response.warnings), (None, None));
}

#[tokio::test]
async fn requests_the_webhooks_are_not_for_are_admitted_unchanged() {
    let (app, metrics) = app();
    let response = admit(&app, MUTATE, &fixture("policy-valid.json")).await;
    assert!(response.allowed);
    assert_eq!(response.patch, None);
    let response = admit(&app, VALIDATE, &fixture("pod-selected.json")).await;
    assert!(response.allowed);
    assert_eq!(response.status, None);

    let mut delete = fixture("pod-selected.json");
    delete["request"]["operation"] = json!("DELETE");
    delete["request"]["oldObject"] = delete["request"]["object"].take();
    let response = admit(&app, MUTATE, &delete).await;
    assert!(response.allowed);
    assert_eq!(response.patch, None);

    let mut status = fixture("pod-selected.json");
    status["request"]["subResource"] = json!("status");
    status["request"]["operation"] = json!("UPDATE");
    assert_eq!(admit(&app, MUTATE, &status).await.patch, None);
    assert_eq!(metrics.admissions("mutate-pods", "ignored"), 3);
    assert_eq!(metrics.admissions("validate-policies", "ignored"), 1);
}

#[tokio::test]
async fn an_unreadable_pod_is_refused_without_quoting_it() {
    let (app, metrics) = app();
    let mut review = fixture("pod-selected.json");
    review["request"]["object"]["spec"]["containers"][0]["ports"][0]["containerPort"] = json!("555-0100");
    let response = admit(&app, MUTATE, &review).await;
    assert!(!response.allowed);
    assert_eq!(response.patch, None);
    let message = response.status.and_then(|s| s.message).unwrap();
    assert!(message.contains("not a valid Pod"), "{message}");
    assert!(!message.contains("555-0100"), "no value of the object in the message: {message}");
    assert_eq!(metrics.admissions("mutate-pods", "error"), 1);
}

#[tokio::test]
async fn a_valid_policy_is_admitted_without_warnings() {
    let (app, metrics) = app();
    let response = admit(&app, VALIDATE, &fixture("policy-valid.json")).await;
    assert!(response.allowed);
    assert_eq!(response.warnings, None);
    assert_eq!(response.status, None);
    assert_eq!(metrics.admissions("validate-policies", "allowed"), 1);
}

#[tokio::test]
async fn an_invalid_policy_is_denied_with_its_field_paths() {
    let (app, metrics) = app();
    let response = admit(&app, VALIDATE, &fixture("policy-invalid.json")).await;
    assert!(!response.allowed);
    let status = response.status.unwrap();
    assert_eq!(status.code, Some(422));
    assert_eq!(status.reason.as_deref(), Some("Invalid"));
    let message = status.message.unwrap();
    assert!(message.starts_with("DataAccessPolicy logistics/customer-api is invalid: "), "{message}");
    for path in ["spec.rules[0].rowFilter: ", "spec.rules[0].to.paths[1]: ", "spec.rules[0].mask.email: "] {
        assert!(message.contains(path), "{path} missing from: {message}");
    }
    let details = status.details.unwrap();
    assert_eq!(details.kind.as_deref(), Some("DataAccessPolicy"));
    assert_eq!(details.group.as_deref(), Some("custos.dev"));
    assert_eq!(details.name.as_deref(), Some("customer-api"));
    let fields: Vec<String> = details.causes.unwrap().into_iter().filter_map(|c| c.field).collect();
    for field in ["spec.rules[0].rowFilter", "spec.rules[0].to.paths[1]", "spec.rules[0].mask.email"] {
        assert!(fields.iter().any(|f| f == field), "{field} missing from {fields:?}");
    }
    assert_eq!(metrics.admissions("validate-policies", "denied"), 1);
}

#[tokio::test]
async fn an_audit_mode_policy_is_admitted_with_a_warning() {
    let (app, _) = app();
    let response = admit(&app, VALIDATE, &fixture("policy-audit.json")).await;
    assert!(response.allowed);
    let warnings = response.warnings.unwrap_or_default();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with("spec.mode is Audit"), "{warnings:?}");
}

#[tokio::test]
async fn schema_errors_are_denied_with_their_paths() {
    let (app, _) = app();
    let mut review = fixture("policy-valid.json");
    review["request"]["object"]["spec"]["rules"][1]["acton"] = json!("Deny");
    let response = admit(&app, VALIDATE, &review).await;
    assert!(!response.allowed);
    let message = response.status.and_then(|s| s.message).unwrap();
    assert!(message.contains("spec.rules[1].acton: unknown field"), "{message}");
}

#[tokio::test]
async fn updates_that_keep_an_invalid_spec_or_delete_the_policy_are_admitted() {
    let (app, _) = app();
    let invalid = fixture("policy-invalid.json");
    let object = invalid["request"]["object"].clone();

    // A label added to a policy admitted before the webhook existed: the spec is unchanged.
    let mut update = invalid.clone();
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = object.clone();
    update["request"]["object"]["metadata"]["labels"] = json!({"team": "parcels"});
    let response = admit(&app, VALIDATE, &update).await;
    assert!(response.allowed);
    let warnings = response.warnings.unwrap_or_default();
    assert!(warnings[0].contains("spec.rules[0].mask.email"), "{warnings:?}");

    // The same update changing the spec is checked.
    update["request"]["object"]["spec"]["defaultAction"] = json!("Allow");
    assert!(!admit(&app, VALIDATE, &update).await.allowed);

    // Removing the finalizer of a policy being deleted.
    let mut finalize = invalid.clone();
    finalize["request"]["operation"] = json!("UPDATE");
    finalize["request"]["oldObject"] = object;
    finalize["request"]["object"]["metadata"]["deletionTimestamp"] = json!("2025-03-12T10:00:00Z");
    assert!(admit(&app, VALIDATE, &finalize).await.allowed);
}

#[tokio::test]
async fn malformed_bodies_get_400_with_the_reason() {
    let (app, metrics) = app();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "syntax error at line 1"),
        (b"[]".to_vec(), "the body is not an admission.k8s.io/v1 AdmissionReview: not a JSON object"),
        (b"{\"kind\": 3}".to_vec(), "data error at line 1"),
        (
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "Pod"})).unwrap(),
            "expected apiVersion admission.k8s.io/v1 and kind AdmissionReview",
        ),
        (
            serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}))
                .unwrap(),
            "the AdmissionReview has no request",
        ),
    ];
    for (body, expected) in cases {
        for path in [MUTATE, VALIDATE] {
            let (status, answer) = post(&app, path, body.clone()).await;
            let text = String::from_utf8_lossy(&answer);
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {text}");
            assert!(text.contains(expected), "{path}: expected '{expected}' in: {text}");
        }
    }
    let mut no_uid = fixture("pod-selected.json");
    no_uid["request"]["uid"] = json!("");
    let (status, answer) = post(&app, MUTATE, serde_json::to_vec(&no_uid).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&answer).contains("no uid"));
    assert_eq!(metrics.admissions("mutate-pods", "malformed"), 6);
    assert_eq!(metrics.admissions("validate-policies", "malformed"), 5);

    let request = Request::builder().method(Method::GET).uri(MUTATE).body(Body::empty()).unwrap();
    assert_eq!(app.clone().oneshot(request).await.unwrap().status(), StatusCode::METHOD_NOT_ALLOWED);
}

/// The fixtures are UPDATEs of an injected pod as `kubectl set image pod/customer-api-0
/// custos-sidecar=alpine/socat:1.8.0.0` and `kubectl debug -it customer-api-0
/// --image=busybox:1.36 --target=custos-sidecar` send them.
#[tokio::test]
async fn updates_that_would_take_an_injected_pods_sidecar_away_are_refused() {
    let (app, metrics) = app();
    let swap = fixture("pod-update-sidecar-image.json");
    let response = admit(&app, VALIDATE_PODS, &swap).await;
    assert!(!response.allowed);
    let status = response.status.unwrap();
    assert_eq!(status.code, Some(403));
    let message = status.message.unwrap();
    assert!(message.contains("changes the image of the custos-sidecar container"), "{message}");

    let debug = fixture("pod-update-debug-sidecar.json");
    assert_eq!(debug["request"]["subResource"], "ephemeralcontainers");
    let response = admit(&app, VALIDATE_PODS, &debug).await;
    assert!(!response.allowed);
    let message = response.status.unwrap().message.unwrap();
    assert!(message.contains("debugger-x7k2p targets the custos-sidecar container"), "{message}");

    // The same debug container aimed at the app is admitted; mounting the spool is not.
    let mut at_app = debug.clone();
    at_app["request"]["object"]["spec"]["ephemeralContainers"][0]["targetContainerName"] =
        json!("customer-api");
    assert!(admit(&app, VALIDATE_PODS, &at_app).await.allowed);
    let mut spool = at_app.clone();
    spool["request"]["object"]["spec"]["ephemeralContainers"][0]["volumeMounts"] =
        json!([{"name": "custos-spool", "mountPath": "/spool"}]);
    let message = admit(&app, VALIDATE_PODS, &spool).await.status.unwrap().message.unwrap();
    assert!(message.contains("mounts custos-spool"), "{message}");

    // Label edits and the app's own image: admitted.
    let mut relabel = swap.clone();
    relabel["request"]["object"] = relabel["request"]["oldObject"].clone();
    relabel["request"]["object"]["metadata"]["labels"]["release"] = json!("canary");
    relabel["request"]["object"]["spec"]["containers"][0]["image"] =
        json!("registry.example/customer-api:1.5");
    assert!(admit(&app, VALIDATE_PODS, &relabel).await.allowed);

    // Not for this webhook: status updates, CREATE, other kinds.
    let mut status_update = swap.clone();
    status_update["request"]["subResource"] = json!("status");
    assert!(admit(&app, VALIDATE_PODS, &status_update).await.allowed);
    assert!(admit(&app, VALIDATE_PODS, &fixture("pod-selected.json")).await.allowed);
    assert!(admit(&app, VALIDATE_PODS, &fixture("policy-valid.json")).await.allowed);

    // Unreadable: refused, without quoting the object.
    let mut broken = swap.clone();
    broken["request"]["oldObject"]["spec"]["containers"] = json!("555-0100");
    let response = admit(&app, VALIDATE_PODS, &broken).await;
    assert!(!response.allowed);
    let message = response.status.unwrap().message.unwrap();
    assert!(message.contains("oldObject is not a valid Pod") && !message.contains("555-0100"), "{message}");

    assert_eq!(metrics.admissions("validate-pods", "refused"), 3);
    assert_eq!(metrics.admissions("validate-pods", "allowed"), 2);
    assert_eq!(metrics.admissions("validate-pods", "ignored"), 3);
    assert_eq!(metrics.admissions("validate-pods", "error"), 1);
}
