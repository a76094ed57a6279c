//! The `admission.k8s.io/v1` AdmissionReview as this webhook reads and answers it.
//!
//! The request's `object` is kept as raw JSON: the pod patch is computed on typed pods but
//! must apply to exactly what the apiserver sent (fields newer than our Kubernetes types
//! included). The response encodes `patch` as base64, as the API specifies for `[]byte`.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Status, StatusCause, StatusDetails};
use kube::core::admission::Operation;
use kube::core::{GroupVersionKind, GroupVersionResource};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The API version this webhook speaks (and the only one the apiserver still sends).
pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";
/// The kind of the review objects.
pub const ADMISSION_KIND: &str = "AdmissionReview";

/// Why a request body is not an AdmissionReview this webhook can answer (answered with 400).
#[derive(Debug, thiserror::Error)]
pub enum MalformedReview {
    /// Not JSON of the AdmissionReview shape. Only the position is reported: the serde message
    /// could quote values of the object.
    #[error(
        "the body is not an admission.k8s.io/v1 AdmissionReview: {category} error at line {line} \
         column {column}"
    )]
    Json {
        /// `syntax`, `data` (wrong shape) or `eof`.
        category: &'static str,
        /// Line of the error.
        line: usize,
        /// Column of the error.
        column: usize,
    },
    /// The body is not a JSON object.
    #[error("the body is not an admission.k8s.io/v1 AdmissionReview: not a JSON object")]
    NotAnObject,
    /// `apiVersion`/`kind` are not those of an AdmissionReview.
    #[error(
        "expected apiVersion {ADMISSION_API_VERSION} and kind {ADMISSION_KIND}, got apiVersion \
         '{api_version}' and kind '{kind}'"
    )]
    WrongType {
        /// The apiVersion sent.
        api_version: String,
        /// The kind sent.
        kind: String,
    },
    /// The review has no `request`.
    #[error("the AdmissionReview has no request")]
    NoRequest,
    /// The request has an empty `uid`.
    #[error("the AdmissionReview request has no uid")]
    NoUid,
}

impl From<serde_json::Error> for MalformedReview {
    fn from(e: serde_json::Error) -> Self {
        let category = match e.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "data",
            serde_json::error::Category::Eof => "eof",
        };
        MalformedReview::Json { category, line: e.line(), column: e.column() }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    request: Option<AdmissionRequest>,
}

/// The request of an AdmissionReview (the fields this webhook uses).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    /// Round-trip id, copied into the response.
    pub uid: String,
    /// Kind of the object (after conversion).
    pub kind: GroupVersionKind,
    /// Resource of the request.
    pub resource: GroupVersionResource,
    /// Subresource, if any (`status`, `ephemeralcontainers`, ...).
    #[serde(default)]
    pub sub_resource: Option<String>,
    /// Object name; empty on CREATE with `generateName`.
    #[serde(default)]
    pub name: String,
    /// Namespace of the object.
    #[serde(default)]
    pub namespace: Option<String>,
    /// CREATE, UPDATE, DELETE or CONNECT.
    pub operation: Operation,
    /// The object, as sent.
    #[serde(default)]
    pub object: Option<Value>,
    /// The existing object (UPDATE, DELETE).
    #[serde(default)]
    pub old_object: Option<Value>,
    /// Whether the request is a dry run.
    #[serde(default)]
    pub dry_run: bool,
}

impl AdmissionRequest {
    /// True when the request is for `group`/`kind`, on the main resource (no subresource).
    pub fn is_for(&self, group: &str, kind: &str) -> bool {
        self.kind.group == group
            && self.kind.kind == kind
            && self.sub_resource.as_deref().unwrap_or("").is_empty()
    }
}

/// Parses a request body.
pub fn parse(body: &[u8]) -> Result<AdmissionRequest, MalformedReview> {
    // serde would read a struct from a JSON array too.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(MalformedReview::NotAnObject);
    }
    let review: ReviewIn = serde_json::from_slice(body)?;
    if review.api_version != ADMISSION_API_VERSION || review.kind != ADMISSION_KIND {
        return Err(MalformedReview::WrongType { api_version: review.api_version, kind: review.kind });
    }
    let request = review.request.ok_or(MalformedReview::NoRequest)?;
    if request.uid.is_empty() {
        return Err(MalformedReview::NoUid);
    }
    Ok(request)
}

/// The response of an AdmissionReview.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    /// The request's uid.
    pub uid: String,
    /// Whether the request is admitted.
    pub allowed: bool,
    /// Why not (for denials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// A JSON Patch (RFC 6902) to apply to the object, base64 in JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<ByteString>,
    /// `JSONPatch` when `patch` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    /// Warnings shown to the client (kubectl prints them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warnings: Option<Vec<String>>,
    /// Key/values the apiserver adds to its audit event (prefixed with the webhook name).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub audit_annotations: BTreeMap<String, String>,
}

impl AdmissionResponse {
    /// Admits `request` unchanged.
    pub fn allow(request: &AdmissionRequest) -> Self {
        AdmissionResponse { uid: request.uid.clone(), allowed: true, ..AdmissionResponse::default() }
    }

    /// Refuses `request` with `message`, `reason` (a Kubernetes StatusReason such as
    /// `Invalid` or `BadRequest`) and HTTP `code`.
    pub fn deny(request: &AdmissionRequest, code: i32, reason: &str, message: String) -> Self {
        AdmissionResponse {
            uid: request.uid.clone(),
            allowed: false,
            status: Some(Status {
                status: Some("Failure".to_string()),
                code: Some(code),
                reason: Some(reason.to_string()),
                message: Some(message),
                ..Status::default()
            }),
            ..AdmissionResponse::default()
        }
    }

    /// Adds the field-level causes of a denial.
    pub fn with_causes(mut self, kind: &str, group: &str, name: &str, causes: Vec<StatusCause>) -> Self {
        if let Some(status) = &mut self.status {
            status.details = Some(StatusDetails {
                kind: Some(kind.to_string()),
                group: Some(group.to_string()),
                name: (!name.is_empty()).then(|| name.to_string()),
                causes: Some(causes),
                ..StatusDetails::default()
            });
        }
        self
    }

    /// Adds a JSON patch.
    pub fn with_patch(mut self, patch: &json_patch::Patch) -> Result<Self, serde_json::Error> {
        self.patch = Some(ByteString(serde_json::to_vec(patch)?));
        self.patch_type = Some("JSONPatch".to_string());
        Ok(self)
    }

    /// Adds warnings (none: unchanged).
    pub fn with_warnings(mut self, warnings: Vec<String>) -> Self {
        if !warnings.is_empty() {
            self.warnings.get_or_insert_with(Vec::new).extend(warnings);
        }
        self
    }

    /// The AdmissionReview carrying this response.
    pub fn into_review(self) -> AdmissionReviewResponse {
        AdmissionReviewResponse {
            api_version: ADMISSION_API_VERSION.to_string(),
            kind: ADMISSION_KIND.to_string(),
            response: self,
        }
    }
}

/// An AdmissionReview with a response, as returned to the apiserver.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReviewResponse {
    /// `admission.k8s.io/v1`.
    pub api_version: String,
    /// `AdmissionReview`.
    pub kind: String,
    /// The answer.
    pub response: AdmissionResponse,
}
