//! The policy reference (`docs/policy-reference.md`), generated from the CRD's OpenAPI schema:
//! one row per field of `spec` and `status`, with its type, whether it is required, its
//! default, its allowed values and its documentation (the same text `kubectl explain` shows),
//! plus the CEL validation rules. `custos crd --reference` prints it; `make crds` writes it and
//! `make crds-check` fails when it drifts from the types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray,
};

/// The reference as Markdown.
pub fn markdown() -> String {
    use kube::CustomResourceExt;
    let crd = crate::DataAccessPolicy::crd();
    let version = crd.spec.versions.first();
    let root = version.and_then(|v| v.schema.as_ref()).and_then(|s| s.open_api_v3_schema.as_ref());
    let mut out = String::new();
    out.push_str("# DataAccessPolicy reference\n\n");
    out.push_str(
        "<!-- Generated from the CRD schema by `custos crd --reference` (make crds). Do not edit. -->\n\n",
    );
    out.push_str(&format!(
        "`{}/{}`, kind `{}` (short name `{}`), namespaced. The same text is available in a \
         cluster with `kubectl explain dataaccesspolicy.spec --recursive`. For a guided tour see \
         [policy-guide.md](policy-guide.md).\n",
        crd.spec.group,
        version.map(|v| v.name.as_str()).unwrap_or_default(),
        crd.spec.names.kind,
        crd.spec.names.short_names.as_ref().and_then(|s| s.first()).map(String::as_str).unwrap_or_default(),
    ));
    if let Some(root) = root {
        for section in ["spec", "status"] {
            if let Some(schema) = root.properties.as_ref().and_then(|p| p.get(section)) {
                out.push_str(&format!("\n## `{section}`\n\n"));
                if let Some(d) = &schema.description {
                    out.push_str(&one_line(d));
                    out.push_str("\n\n");
                }
                out.push_str("| field | type | required | default | description |\n|---|---|---|---|---|\n");
                let mut rules = Vec::new();
                walk(section, schema, &mut out, &mut rules);
                if !rules.is_empty() {
                    out.push_str(&format!(
                        "\nValidation rules of `{section}` (checked by the apiserver):\n\n"
                    ));
                    for (path, rule, message) in rules {
                        out.push_str(&format!("- `{path}`: `{rule}` — {message}\n"));
                    }
                }
            }
        }
    }
    out
}

fn walk(path: &str, schema: &JSONSchemaProps, out: &mut String, rules: &mut Vec<(String, String, String)>) {
    for rule in schema.x_kubernetes_validations.iter().flatten() {
        rules.push((path.to_string(), rule.rule.clone(), rule.message.clone().unwrap_or_default()));
    }
    let required = schema.required.clone().unwrap_or_default();
    if let Some(properties) = &schema.properties {
        for (name, child) in properties {
            let child_path = format!("{path}.{name}");
            row(&child_path, child, required.contains(name), out);
            walk(&child_path, child, out, rules);
        }
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &schema.items {
        walk(&format!("{path}[]"), items, out, rules);
    }
    if let Some(additional) = schema.additional_properties.as_ref()
        && let k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrBool::Schema(
            values,
        ) = additional
        && values.properties.is_some()
    {
        walk(&format!("{path}.<key>"), values, out, rules);
    }
}

fn type_of(schema: &JSONSchemaProps) -> String {
    let base = schema.type_.clone().unwrap_or_else(|| {
        if schema.x_kubernetes_int_or_string == Some(true) { "int-or-string".into() } else { "any".into() }
    });
    match base.as_str() {
        "array" => match &schema.items {
            Some(JSONSchemaPropsOrArray::Schema(items)) => format!("[]{}", type_of(items)),
            _ => "array".into(),
        },
        "object" if schema.properties.is_none() && schema.additional_properties.is_some() => {
            match &schema.additional_properties {
                Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrBool::Schema(v)) => {
                    format!("map[string]{}", type_of(v))
                }
                _ => "map".into(),
            }
        }
        _ => base,
    }
}

fn row(path: &str, schema: &JSONSchemaProps, required: bool, out: &mut String) {
    let mut description = schema.description.as_deref().map(one_line).unwrap_or_default();
    if let Some(values) = &schema.enum_ {
        let values: Vec<String> =
            values.iter().map(|v| format!("`{}`", v.0.as_str().unwrap_or_default())).collect();
        description.push_str(&format!(" One of: {}.", values.join(", ")));
    }
    let mut bounds = Vec::new();
    if let Some(min) = schema.minimum {
        bounds.push(format!("minimum {min}"));
    }
    if let Some(max) = schema.maximum {
        bounds.push(format!("maximum {max}"));
    }
    if let Some(n) = schema.min_items {
        bounds.push(format!("at least {n} item(s)"));
    }
    if let Some(n) = schema.max_items {
        bounds.push(format!("at most {n} item(s)"));
    }
    if let Some(n) = schema.max_length {
        bounds.push(format!("at most {n} characters"));
    }
    if let Some(p) = &schema.pattern {
        bounds.push(format!("pattern `{p}`"));
    }
    if !bounds.is_empty() {
        description.push_str(&format!(" ({}).", bounds.join(", ")));
    }
    let default = schema.default.as_ref().map(|d| format!("`{}`", d.0)).unwrap_or_default();
    out.push_str(&format!(
        "| `{path}` | {} | {} | {default} | {} |\n",
        type_of(schema).replace('|', "\\|"),
        if required { "yes" } else { "" },
        description.trim().replace('|', "\\|"),
    ));
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_spec_field_has_a_row() {
        let md = markdown();
        for field in [
            "`spec.workload.appPort`",
            "`spec.mode`",
            "`spec.rules[].rowFilter`",
            "`spec.rules[].limits.recordsPerHour`",
            "`spec.dataClasses[].paths`",
            "`status.conditions`",
        ] {
            assert!(md.contains(field), "{field} missing from the reference");
        }
        assert!(md.contains("One of: `Enforce`, `Audit`, `Disabled`."), "the mode enum is listed");
        assert!(md.contains("Validation rules of `spec`"), "the CEL rules are listed");
    }
}
