//! Kubernetes `LabelSelector` evaluation against a pod's labels, as the apiserver evaluates it:
//! policy workload selectors (injection, selected pods) and the `podSelector` of foreign
//! NetworkPolicies (bypass check).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// True when `labels` satisfy every `matchLabels` pair and every `matchExpressions`
/// requirement of `selector`. The empty selector matches every label set. A requirement the
/// apiserver would reject (unknown operator, `In`/`NotIn` without values) matches nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v))
        && selector.match_expressions.iter().flatten().all(|expr| {
            let values = expr.values.as_deref().unwrap_or_default();
            let value = labels.get(&expr.key);
            match expr.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => !values.is_empty() && value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
    }

    fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_string()).collect()),
        }
    }

    fn with_exprs(exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector { match_labels: None, match_expressions: Some(exprs) }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
        assert!(selector_matches(&LabelSelector::default(), &labels(&[("app", "x")])));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let s = LabelSelector {
            match_labels: Some(labels(&[("app", "api"), ("tier", "db")])),
            ..Default::default()
        };
        assert!(selector_matches(&s, &labels(&[("app", "api"), ("tier", "db"), ("extra", "1")])));
        assert!(!selector_matches(&s, &labels(&[("app", "api")])));
        assert!(!selector_matches(&s, &labels(&[("app", "api"), ("tier", "web")])));
    }

    #[test]
    fn each_operator() {
        let l = labels(&[("app", "api"), ("tier", "db")]);
        assert!(selector_matches(&with_exprs(vec![expr("app", "In", &["web", "api"])]), &l));
        assert!(!selector_matches(&with_exprs(vec![expr("app", "In", &["web"])]), &l));
        assert!(!selector_matches(&with_exprs(vec![expr("missing", "In", &["x"])]), &l));
        assert!(selector_matches(&with_exprs(vec![expr("app", "NotIn", &["web"])]), &l));
        assert!(selector_matches(&with_exprs(vec![expr("missing", "NotIn", &["web"])]), &l));
        assert!(!selector_matches(&with_exprs(vec![expr("app", "NotIn", &["api"])]), &l));
        assert!(selector_matches(&with_exprs(vec![expr("tier", "Exists", &[])]), &l));
        assert!(!selector_matches(&with_exprs(vec![expr("zone", "Exists", &[])]), &l));
        assert!(selector_matches(&with_exprs(vec![expr("zone", "DoesNotExist", &[])]), &l));
        assert!(!selector_matches(&with_exprs(vec![expr("tier", "DoesNotExist", &[])]), &l));
    }

    #[test]
    fn invalid_requirements_match_nothing() {
        let l = labels(&[("app", "api")]);
        assert!(!selector_matches(&with_exprs(vec![expr("app", "Equals", &["api"])]), &l));
        assert!(!selector_matches(&with_exprs(vec![expr("app", "NotIn", &[])]), &l));
        assert!(!selector_matches(&with_exprs(vec![expr("app", "In", &[])]), &l));
    }

    #[test]
    fn labels_and_expressions_combine() {
        let s = LabelSelector {
            match_labels: Some(labels(&[("app", "api")])),
            match_expressions: Some(vec![expr("tier", "In", &["db"])]),
        };
        assert!(selector_matches(&s, &labels(&[("app", "api"), ("tier", "db")])));
        assert!(!selector_matches(&s, &labels(&[("app", "api"), ("tier", "web")])));
        assert!(!selector_matches(&s, &labels(&[("app", "web"), ("tier", "db")])));
    }
}
