//! Walking JSONPaths over a document.
//!
//! Most paths of a policy are simple: names, indices and wildcards, one selector per
//! segment, no descendant segments, slices or filters (`$.items[*].phone`). Those are walked
//! directly over the mutable document, without building normalized paths. Everything else
//! goes through `serde_json_path`'s located query.

use serde_json::{Map, Value};
use serde_json_path::{JsonPath, PathElement};

/// One segment of a simple path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// A member name (`.name` or `['name']`).
    Name(String),
    /// An array index, negative from the end (`[2]`, `[-1]`).
    Index(i64),
    /// Every member or element (`.*` or `[*]`).
    Wildcard,
}

/// The steps of `path` if it is simple, else `None`.
///
/// `JsonPath` does not expose its segments, so this reads its canonical display. That display
/// prints bracketed names unescaped, so a name containing `'` could read as several segments:
/// whenever the display contains a quote, the reading is checked by rendering it back,
/// escaped, and comparing the parsed result with `path`.
pub(crate) fn simple(path: &JsonPath) -> Option<Vec<Step>> {
    let text = path.to_string();
    let steps = read(&text)?;
    if text.contains('\'') {
        let rendered = render(&text, &steps)?;
        if JsonPath::parse(&rendered).ok()? != *path {
            return None;
        }
    }
    Some(steps)
}

/// Reads the display form of a path.
fn read(text: &str) -> Option<Vec<Step>> {
    let mut rest = text.strip_prefix('$')?;
    let mut steps = Vec::new();
    while !rest.is_empty() {
        if rest.starts_with("..") {
            return None;
        }
        if let Some(after) = rest.strip_prefix(".*") {
            steps.push(Step::Wildcard);
            rest = after;
        } else if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            if end == 0 {
                return None;
            }
            steps.push(Step::Name(after[..end].to_owned()));
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix("[*]") {
            steps.push(Step::Wildcard);
            rest = after;
        } else if let Some(after) = rest.strip_prefix("['") {
            let end = after.find('\'')?;
            let (name, after) = after.split_at(end);
            rest = after.strip_prefix("']")?;
            steps.push(Step::Name(name.to_owned()));
        } else if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']')?;
            let index = &after[..end];
            let digits = index.strip_prefix('-').unwrap_or(index);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            steps.push(Step::Index(index.parse().ok()?));
            rest = &after[end + 1..];
        } else {
            return None;
        }
    }
    Some(steps)
}

/// Renders `steps` in the notation `text` uses for each, with names escaped.
fn render(text: &str, steps: &[Step]) -> Option<String> {
    let mut out = String::from("$");
    let mut rest = text.strip_prefix('$')?;
    for step in steps {
        match step {
            Step::Wildcard => {
                let notation = if rest.starts_with(".*") { ".*" } else { "[*]" };
                out.push_str(notation);
                rest = rest.get(notation.len()..)?;
            }
            Step::Index(i) => {
                let notation = format!("[{i}]");
                out.push_str(&notation);
                rest = rest.get(notation.len()..)?;
            }
            Step::Name(name) if rest.starts_with("['") => {
                out.push_str("['");
                for c in name.chars() {
                    match c {
                        '\'' => out.push_str("\\'"),
                        '\\' => out.push_str("\\\\"),
                        c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                        c => out.push(c),
                    }
                }
                out.push_str("']");
                rest = rest.get(name.len() + 4..)?;
            }
            Step::Name(name) => {
                out.push('.');
                out.push_str(name);
                rest = rest.get(name.len() + 1..)?;
            }
        }
    }
    Some(out)
}

/// The position an index designates in an array of `len` elements.
pub(crate) fn resolve_index(index: i64, len: usize) -> Option<usize> {
    if index >= 0 {
        let i = usize::try_from(index).ok()?;
        (i < len).then_some(i)
    } else {
        len.checked_sub(usize::try_from(index.unsigned_abs()).ok()?)
    }
}

/// Calls `f` with every node the steps select, in document order.
pub(crate) fn for_each_mut(value: &mut Value, steps: &[Step], f: &mut dyn FnMut(&mut Value)) {
    let Some((step, rest)) = steps.split_first() else {
        f(value);
        return;
    };
    match (step, value) {
        (Step::Name(name), Value::Object(map)) => {
            if let Some(child) = map.get_mut(name.as_str()) {
                for_each_mut(child, rest, f);
            }
        }
        (Step::Index(index), Value::Array(items)) => {
            if let Some(i) = resolve_index(*index, items.len()) {
                for_each_mut(&mut items[i], rest, f);
            }
        }
        (Step::Wildcard, Value::Array(items)) => {
            for child in items {
                for_each_mut(child, rest, f);
            }
        }
        (Step::Wildcard, Value::Object(map)) => {
            for child in map.values_mut() {
                for_each_mut(child, rest, f);
            }
        }
        _ => {}
    }
}

/// The first node the steps select, in document order.
pub(crate) fn first<'a>(value: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    let Some((step, rest)) = steps.split_first() else {
        return Some(value);
    };
    match (step, value) {
        (Step::Name(name), Value::Object(map)) => first(map.get(name.as_str())?, rest),
        (Step::Index(index), Value::Array(items)) => first(&items[resolve_index(*index, items.len())?], rest),
        (Step::Wildcard, Value::Array(items)) => items.iter().find_map(|c| first(c, rest)),
        (Step::Wildcard, Value::Object(map)) => map.values().find_map(|c| first(c, rest)),
        _ => None,
    }
}

/// An owned element of a normalized path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Elem {
    Name(String),
    Index(usize),
}

/// The distinct locations `path` selects, sorted by location (an ancestor before what it
/// contains; object members by name), as owned paths.
pub(crate) fn locations(path: &JsonPath, doc: &Value) -> Vec<Vec<Elem>> {
    path.query_located(doc).dedup().iter().map(|node| owned(node.location())).collect()
}

/// The distinct locations `path` selects, in the order it selects them: document order for
/// wildcards, filters and descendants (an object's members in the body's order), as owned
/// paths. Records are decided in this order, so that a cap keeps the first ones of the body.
pub(crate) fn locations_in_query_order(path: &JsonPath, doc: &Value) -> Vec<Vec<Elem>> {
    let mut seen = std::collections::HashSet::new();
    path.query_located(doc)
        .iter()
        .map(|node| owned(node.location()))
        .filter(|location| seen.insert(location.clone()))
        .collect()
}

fn owned(location: &serde_json_path::NormalizedPath<'_>) -> Vec<Elem> {
    location
        .iter()
        .map(|e| match e {
            PathElement::Name(n) => Elem::Name((*n).to_owned()),
            PathElement::Index(i) => Elem::Index(*i),
        })
        .collect()
}

/// The node at an owned path.
pub(crate) fn get_mut<'a>(value: &'a mut Value, path: &[Elem]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |v, e| match (e, v) {
        (Elem::Name(n), Value::Object(map)) => map.get_mut(n.as_str()),
        (Elem::Index(i), Value::Array(items)) => items.get_mut(*i),
        _ => None,
    })
}

/// Removes `name` from `map`, keeping the order of the other members (also with serde_json's
/// `preserve_order`).
pub(crate) fn remove_member(map: &mut Map<String, Value>, name: &str) -> bool {
    if !map.contains_key(name) {
        return false;
    }
    map.retain(|k, _| k != name);
    true
}

/// Removes the nodes at `locations` (non-empty owned paths into `doc`, as [`locations`]
/// gives them), each container filtered once, by the set of its indexes or names to drop,
/// however many go: one removal at a time shifts the rest of an array (and rebuilds an
/// ordered object) each time, quadratic in the records of a large response. Returns how many
/// of the locations were there, those inside a removed node included.
pub(crate) fn remove_all(doc: &mut Value, locations: &[Vec<Elem>]) -> u64 {
    let mut root = Removal::default();
    for location in locations.iter().filter(|l| !l.is_empty()) {
        root.mark(location);
    }
    root.sweep(doc)
}

/// The nodes of a document to remove, by their locations in it before any removal: a trie of
/// the locations. Marking removes nothing; [`Removal::sweep`] removes them all at once, so
/// that locations marked or resolved later still designate the positions they had.
#[derive(Default)]
pub(crate) struct Removal {
    /// This node goes.
    remove: bool,
    children: std::collections::HashMap<Elem, Removal>,
}

impl Removal {
    /// Nothing is marked.
    pub(crate) fn is_empty(&self) -> bool {
        !self.remove && self.children.is_empty()
    }

    /// Marks the node at `location` (relative to this node).
    pub(crate) fn mark(&mut self, location: &[Elem]) {
        let node = location.iter().fold(self, |node, elem| node.children.entry(elem.clone()).or_default());
        node.remove = true;
    }

    /// Whether the node at `location`, or one that contains it, is marked.
    pub(crate) fn covers(&self, location: &[Elem]) -> bool {
        let mut node = self;
        for elem in location {
            if node.remove {
                return true;
            }
            match node.children.get(elem) {
                Some(child) => node = child,
                None => return false,
            }
        }
        node.remove
    }

    /// The marks strictly below the node at `location`, taken out of this trie (as a trie
    /// rooted at that node), if there are any.
    pub(crate) fn take_below(&mut self, location: &[Elem]) -> Option<Removal> {
        let mut node = self;
        for elem in location {
            node = node.children.get_mut(elem)?;
        }
        if node.children.is_empty() {
            return None;
        }
        Some(Removal { remove: false, children: std::mem::take(&mut node.children) })
    }

    /// Calls `f` with the location of every node of `value` (at `at`, this trie's node for
    /// it, itself not marked) that `steps` select and that neither is marked nor lies in a
    /// marked node, in document order.
    pub(crate) fn for_each_kept(
        &self,
        value: &Value,
        steps: &[Step],
        at: &mut Vec<Elem>,
        f: &mut dyn FnMut(&[Elem]),
    ) {
        let Some((step, rest)) = steps.split_first() else {
            f(at);
            return;
        };
        let mut visit = |elem: Elem, child: &Value, at: &mut Vec<Elem>| {
            let node = self.children.get(&elem);
            if node.is_some_and(|n| n.remove) {
                return;
            }
            at.push(elem);
            match node {
                Some(node) => node.for_each_kept(child, rest, at, f),
                None => Removal::default().for_each_kept(child, rest, at, f),
            }
            at.pop();
        };
        match (step, value) {
            (Step::Name(name), Value::Object(map)) => {
                if let Some(child) = map.get(name.as_str()) {
                    visit(Elem::Name(name.clone()), child, at);
                }
            }
            (Step::Index(index), Value::Array(items)) => {
                if let Some(i) = resolve_index(*index, items.len()) {
                    visit(Elem::Index(i), &items[i], at);
                }
            }
            (Step::Wildcard, Value::Array(items)) => {
                for (i, child) in items.iter().enumerate() {
                    visit(Elem::Index(i), child, at);
                }
            }
            (Step::Wildcard, Value::Object(map)) => {
                for (name, child) in map {
                    visit(Elem::Name(name.clone()), child, at);
                }
            }
            _ => {}
        }
    }

    /// Removes what is marked under `value`; how many marked locations were there.
    pub(crate) fn sweep(&self, value: &mut Value) -> u64 {
        let mut count = 0;
        match value {
            Value::Array(items) => {
                // Below the nodes that stay first, while the indexes are still the query's.
                let mut drop = std::collections::HashSet::new();
                for (elem, child) in &self.children {
                    let Elem::Index(i) = elem else { continue };
                    let Some(item) = items.get_mut(*i) else { continue };
                    if child.remove {
                        count += 1 + child.marked_within(item);
                        drop.insert(*i);
                    } else {
                        count += child.sweep(item);
                    }
                }
                if !drop.is_empty() {
                    let mut i = 0;
                    items.retain(|_| {
                        let keep = !drop.contains(&i);
                        i += 1;
                        keep
                    });
                }
            }
            Value::Object(map) => {
                let mut drop = std::collections::HashSet::new();
                for (elem, child) in &self.children {
                    let Elem::Name(name) = elem else { continue };
                    let Some(member) = map.get_mut(name.as_str()) else { continue };
                    if child.remove {
                        count += 1 + child.marked_within(member);
                        drop.insert(name.as_str());
                    } else {
                        count += child.sweep(member);
                    }
                }
                if !drop.is_empty() {
                    map.retain(|k, _| !drop.contains(k.as_str()));
                }
            }
            _ => {}
        }
        count
    }

    /// Marked locations below this node that are there in `value` (removed with it).
    fn marked_within(&self, value: &Value) -> u64 {
        self.children
            .iter()
            .map(|(elem, child)| {
                let inner = match (elem, value) {
                    (Elem::Index(i), Value::Array(items)) => items.get(*i),
                    (Elem::Name(n), Value::Object(map)) => map.get(n.as_str()),
                    _ => None,
                };
                inner.map_or(0, |v| u64::from(child.remove) + child.marked_within(v))
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    /// The removal one location at a time, last to first (what `remove_all` replaced).
    fn remove_one_by_one(doc: &mut Value, locations: &[Vec<Elem>]) -> u64 {
        let mut count = 0;
        for path in locations.iter().rev().filter(|l| !l.is_empty()) {
            let (last, parent) = path.split_last().unwrap();
            count += u64::from(match (last, get_mut(doc, parent)) {
                (Elem::Name(n), Some(Value::Object(map))) => remove_member(map, n),
                (Elem::Index(i), Some(Value::Array(items))) if *i < items.len() => {
                    items.remove(*i);
                    true
                }
                _ => false,
            });
        }
        count
    }

    fn value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![Just(json!(1)), Just(json!("a")), Just(json!(null))];
        leaf.prop_recursive(4, 48, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("c".to_string())],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Removing every location at once gives the document and the count that removing them
    /// one by one, last to first, gives: nested locations, locations inside removed ones,
    /// arrays and objects.
    #[test]
    fn removing_all_at_once_is_removing_one_by_one() {
        use proptest::prelude::*;
        let paths = ["$..a", "$..[0]", "$.*", "$..*", "$..[?@.a]", "$..[?@ == 1]", "$..b[1]", "$[1:]"];
        let strategy = (value(), 0..paths.len());
        proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(2_000))
            .run(&strategy, |(doc, which)| {
                let path = JsonPath::parse(paths[which]).unwrap();
                let found = locations(&path, &doc);
                let (mut expected, mut actual) = (doc.clone(), doc.clone());
                let want = remove_one_by_one(&mut expected, &found);
                let got = remove_all(&mut actual, &found);
                prop_assert_eq!(&actual, &expected, "{} on {}", paths[which], doc);
                prop_assert_eq!(got, want);
                Ok(())
            })
            .unwrap();
    }

    fn steps(p: &str) -> Option<Vec<Step>> {
        simple(&JsonPath::parse(p).unwrap())
    }

    fn name(n: &str) -> Step {
        Step::Name(n.to_owned())
    }

    #[test]
    fn simple_paths() {
        assert_eq!(steps("$"), Some(vec![]));
        assert_eq!(steps("$.items[*].phone"), Some(vec![name("items"), Step::Wildcard, name("phone")]));
        assert_eq!(
            steps("$['items'].*[0][-1]"),
            Some(vec![name("items"), Step::Wildcard, Step::Index(0), Step::Index(-1)])
        );
        assert_eq!(steps("$['a b']['c.d']"), Some(vec![name("a b"), name("c.d")]));
        assert_eq!(steps("$.名前"), Some(vec![name("名前")]));
        // quotes in names: not simple (the located query handles them)
        assert_eq!(steps(r"$['it\'s']"), None);
        assert_eq!(steps(r#"$["x"]"#), Some(vec![name("x")]));
        // a name that reads like two segments
        assert_eq!(steps(r"$['a\'][\'b']"), None);
        for p in ["$..phone", "$.items[0,1]", "$.items[1:3]", "$.items[?@.x == 1]", "$[?@.a]"] {
            assert_eq!(steps(p), None, "{p}");
        }
    }

    /// Simple walking selects what serde_json_path selects.
    #[test]
    fn walking_matches_queries() {
        let doc = json!({"items": [{"a": 1, "b": [1, 2, 3]}, {"a": 2, "b": []}, 3], "x": {"a": 5}});
        for p in [
            "$.items[*].a",
            "$.items[*].b[-1]",
            "$.items[1]",
            "$.*.a",
            "$.items[*].b[*]",
            "$.nope[*]",
            "$.items[-4]",
        ] {
            let path = JsonPath::parse(p).unwrap();
            let st = simple(&path).unwrap();
            let expected: Vec<Value> = path.query(&doc).all().into_iter().cloned().collect();
            let mut got = Vec::new();
            let mut copy = doc.clone();
            for_each_mut(&mut copy, &st, &mut |v| got.push(v.clone()));
            assert_eq!(got, expected, "{p}");
            assert_eq!(first(&doc, &st), expected.first(), "{p}");
        }
    }
}
