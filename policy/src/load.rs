//! Reading DataAccessPolicies from YAML or JSON text, with every schema problem reported at
//! its field path (unknown fields, wrong types, values outside an enum, missing fields) before
//! the typed parse.

use std::sync::OnceLock;

use custos_api::DataAccessPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_json::Value;

use crate::error::{FieldErrors, Path};
use crate::namespace::PolicyInput;

/// A policy read from a document.
#[derive(Clone, Debug)]
pub struct LoadedPolicy {
    /// 0-based index of the YAML document in its file.
    pub document: usize,
    /// metadata.namespace, when set.
    pub namespace: Option<String>,
    /// The policy.
    pub input: PolicyInput,
}

/// A document that could not be read as a policy.
#[derive(Clone, Debug)]
pub struct DocumentError {
    /// 0-based index of the YAML document (0 when the whole text failed to parse).
    pub document: usize,
    /// metadata.name, when it could be read.
    pub name: Option<String>,
    /// metadata.namespace, when it could be read.
    pub namespace: Option<String>,
    /// The problems.
    pub errors: FieldErrors,
}

impl DocumentError {
    /// `namespace/name` (with `default_namespace` when the document sets none), when the name
    /// could be read.
    pub fn qualified_name(&self, default_namespace: &str) -> Option<String> {
        let name = self.name.as_deref()?;
        Some(format!("{}/{name}", self.namespace.as_deref().unwrap_or(default_namespace)))
    }
}

/// What a text held.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// The policies read.
    pub policies: Vec<LoadedPolicy>,
    /// Documents that are DataAccessPolicies but malformed, or not YAML at all.
    pub errors: Vec<DocumentError>,
    /// Documents of other kinds, skipped (kind names).
    pub skipped: Vec<String>,
}

/// Reads every document of a (multi-document) YAML or JSON text.
pub fn load_policies(text: &str) -> Loaded {
    let mut out = Loaded::default();
    let docs: Vec<Value> = match serde_saphyr::from_multiple::<Value>(text) {
        Ok(d) => d,
        Err(e) => {
            let mut errors = FieldErrors::default();
            errors.push("(document)", format!("not valid YAML: {}", first_line(&e.to_string())));
            out.errors.push(DocumentError { document: 0, name: None, namespace: None, errors });
            return out;
        }
    };
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind != "DataAccessPolicy" {
            out.skipped.push(if kind.is_empty() { "(no kind)".to_string() } else { kind.to_string() });
            continue;
        }
        let namespace = doc.pointer("/metadata/namespace").and_then(Value::as_str).map(str::to_string);
        match read_policy(doc) {
            Ok(p) => out.policies.push(LoadedPolicy { document: i, namespace: p.0, input: p.1 }),
            Err((name, errors)) => out.errors.push(DocumentError { document: i, name, namespace, errors }),
        }
    }
    out
}

fn read_policy(doc: Value) -> Result<(Option<String>, PolicyInput), (Option<String>, FieldErrors)> {
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).map(str::to_string);
    let mut errors = FieldErrors::default();
    if doc.get("apiVersion").and_then(Value::as_str) != Some("custos.dev/v1alpha1") {
        errors.push("apiVersion", "must be custos.dev/v1alpha1");
    }
    if name.as_deref().is_none_or(str::is_empty) {
        errors.push("metadata.name", "is required");
    }
    if let Some(spec) = doc.get("spec") {
        check_schema(spec, spec_schema(), &Path::root("spec"), &mut errors);
    } else {
        errors.push("spec", "is required");
    }
    if !errors.is_empty() {
        return Err((name, errors));
    }
    match serde_json::from_value::<DataAccessPolicy>(doc) {
        Ok(p) => Ok((
            p.metadata.namespace.clone(),
            PolicyInput {
                name: p.metadata.name.clone().unwrap_or_default(),
                generation: p.metadata.generation,
                spec: p.spec,
            },
        )),
        Err(e) => {
            errors.push("spec", e.to_string());
            Err((name, errors))
        }
    }
}

/// The openAPIV3Schema of `spec`, from the CRD the API types generate.
fn spec_schema() -> &'static JSONSchemaProps {
    static SCHEMA: OnceLock<JSONSchemaProps> = OnceLock::new();
    SCHEMA.get_or_init(custos_api::spec_schema)
}

/// Checks `value` against `schema`, recording unknown fields, wrong types, values outside an
/// enum and missing required fields.
fn check_schema(value: &Value, schema: &JSONSchemaProps, path: &Path, errors: &mut FieldErrors) {
    if value.is_null() {
        if schema.nullable != Some(true) {
            errors.push(path.as_str(), "must not be null");
        }
        return;
    }
    if let Some(ty) = schema.type_.as_deref() {
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !ok {
            errors.push(path.as_str(), format!("must be {} {ty}, got {}", article(ty), type_name(value)));
            return;
        }
    }
    if let Some(allowed) = &schema.enum_
        && !allowed.iter().any(|a| a.0 == *value)
    {
        let list: Vec<String> =
            allowed.iter().map(|a| a.0.as_str().map_or_else(|| a.0.to_string(), str::to_string)).collect();
        errors.push(path.as_str(), format!("must be one of {}", list.join(", ")));
        return;
    }
    if let (Some(min), Some(n)) = (schema.minimum, value.as_f64())
        && n < min
    {
        errors.push(path.as_str(), format!("must be at least {min}"));
    }
    if let (Some(max), Some(n)) = (schema.maximum, value.as_f64())
        && n > max
    {
        errors.push(path.as_str(), format!("must be at most {max}"));
    }
    match value {
        Value::Object(map) => {
            for req in schema.required.iter().flatten() {
                if !map.contains_key(req) {
                    errors.push(path.field(req).as_str(), "is required");
                }
            }
            let props = schema.properties.as_ref();
            for (k, v) in map {
                if let Some(sub) = props.and_then(|p| p.get(k)) {
                    check_schema(v, sub, &path.key(k), errors);
                } else if let Some(JSONSchemaPropsOrBool::Schema(sub)) = &schema.additional_properties {
                    check_schema(v, sub, &path.key(k), errors);
                } else if props.is_some() && schema.x_kubernetes_preserve_unknown_fields != Some(true) {
                    let known: Vec<&str> =
                        props.into_iter().flat_map(|p| p.keys()).map(String::as_str).collect();
                    errors.push(path.key(k).as_str(), format!("unknown field (known: {})", known.join(", ")));
                }
            }
        }
        Value::Array(items) => {
            if let Some(JSONSchemaPropsOrArray::Schema(sub)) = &schema.items {
                for (i, v) in items.iter().enumerate() {
                    check_schema(v, sub, &path.index(i), errors);
                }
            }
        }
        _ => {}
    }
}

fn article(ty: &str) -> &'static str {
    if ty.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
