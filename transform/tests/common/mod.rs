//! Comparing the streaming and parsed-document paths of `apply`.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;

use custos_transform::expr::{RequestVars, UserVars, Vars};
use custos_transform::{
    HashKey, Outcome, Plan, TransformError, Transformed, apply, apply_dom, apply_streaming,
};
use serde_json::Value;

/// The variables the tests run with.
pub fn vars() -> Vars {
    let user = UserVars {
        id: "clerk-1".into(),
        attributes: BTreeMap::from([("branch".to_owned(), "b1".to_owned())]),
    };
    Vars::new(&RequestVars { method: "GET".into(), ..RequestVars::default() }, Some(&user), None)
}

/// A body in the parsed document's canonical form: compact, duplicate keys resolved (first
/// position, last value), exact numbers in serde_json's spelling, others as written.
pub fn canonical(body: &[u8]) -> String {
    match apply_dom(body, &Plan::default(), &vars(), &HashKey::new("canonical")) {
        Ok(Transformed { outcome: Outcome::Body(b), .. }) => String::from_utf8(b).unwrap(),
        other => panic!("output is not JSON: {other:?}"),
    }
}

/// Whether `a` and `b` are the same result: equal stats and outcome kind, bodies that parse
/// to equal values (serde_json, last duplicate wins) and have the same canonical form, or
/// errors of the same kind. Returns what differs.
pub fn differences(
    a: &Result<Transformed, TransformError>,
    b: &Result<Transformed, TransformError>,
) -> Option<String> {
    match (a, b) {
        (Ok(a), Ok(b)) => {
            if a.stats != b.stats {
                return Some(format!("stats differ:\n{:?}\n{:?}", a.stats, b.stats));
            }
            match (&a.outcome, &b.outcome) {
                (Outcome::RootFiltered, Outcome::RootFiltered) => None,
                (Outcome::Body(x), Outcome::Body(y)) => {
                    // numbers beyond f64 (kept as written) fail serde_json: the canonical
                    // forms compare those
                    let (vx, vy) =
                        (serde_json::from_slice::<Value>(x).ok(), serde_json::from_slice::<Value>(y).ok());
                    if vx.is_some() && vy.is_some() && vx != vy {
                        return Some(format!(
                            "values differ:\n{}\n{}",
                            String::from_utf8_lossy(x),
                            String::from_utf8_lossy(y)
                        ));
                    }
                    let (cx, cy) = (canonical(x), canonical(y));
                    (cx != cy).then(|| format!("canonical forms differ:\n{cx}\n{cy}"))
                }
                (x, y) => Some(format!("outcomes differ: {x:?} {y:?}")),
            }
        }
        (Err(x @ TransformError::RecordCapExceeded { .. }), Err(y)) => {
            (x != y).then(|| format!("errors differ: {x:?} / {y:?}"))
        }
        (Err(x), Err(y)) => (std::mem::discriminant(x) != std::mem::discriminant(y))
            .then(|| format!("errors differ: {x:?} / {y:?}")),
        (x, y) => Some(format!("one failed: {:?} / {:?}", x.as_ref().err(), y.as_ref().err())),
    }
}

/// Panics unless `a` and `b` are the same result (see [`differences`]).
pub fn assert_agree(
    a: &Result<Transformed, TransformError>,
    b: &Result<Transformed, TransformError>,
    context: &str,
) {
    if let Some(d) = differences(a, b) {
        panic!("{context}: {d}");
    }
}

/// `apply`, after checking that it agrees with the parsed-document path and, when the
/// streaming path takes the body, with that too.
pub fn checked(body: &[u8], plan: &Plan, key: &HashKey) -> Result<Transformed, TransformError> {
    let result = apply(body, plan, &vars(), key);
    let dom = apply_dom(body, plan, &vars(), key);
    let context = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    assert_agree(&dom, &result, &format!("apply vs DOM on {context}"));
    if let Some(streamed) = apply_streaming(body, plan, key) {
        assert_agree(&dom, &streamed, &format!("streaming vs DOM on {context}"));
    }
    result
}
