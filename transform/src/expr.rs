//! CEL expressions: rule conditions (`when`) and row filters (`rowFilter`).
//!
//! Expressions are compiled once, when a policy is compiled, and checked against the
//! variables of their [`Scope`]: a reference to anything else is an error at compile time,
//! not at request time. Evaluation binds the request-scoped [`Vars`] (built once per request)
//! and, for row filters, one `record` at a time.
//!
//! Variables seen by CEL:
//!
//! | variable | fields |
//! |---|---|
//! | `request` | `method`, `path`, `params` (map of path captures), `time` (timestamp), `hour` (UTC, 0-23), `weekday` (UTC, 0 = Sunday) |
//! | `user` | `id`, `authenticated` (`true`), one field per user attribute; without a verified user only `authenticated: false` |
//! | `workload` | `namespace`, `serviceAccount`, `labels` (map); without a known calling workload an empty map |
//! | `record` | the record being filtered (row filters only) |
//!
//! JSON numbers of a record are CEL `int` when they are integers that fit an `int64`, `uint`
//! when they fit only a `uint64` and `double` otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, OnceLock};

use cel::common::ast::{EntryExpr, Expr as Node, IdedExpr, LiteralValue, operators};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelTimestamp, CelUInt,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Context, Env, ExecutionError, Program, Value};

use crate::numbers;

/// Where an expression is used, which decides the variables it may reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A rule's `when` condition: `request`, `user` and `workload`.
    When,
    /// A rule's `rowFilter`: `request`, `user`, `workload` and `record`.
    RowFilter,
}

impl Scope {
    /// The variables an expression of this scope may reference.
    pub fn variables(self) -> &'static [&'static str] {
        match self {
            Scope::When => &["request", "user", "workload"],
            Scope::RowFilter => &["request", "user", "workload", "record"],
        }
    }

    fn allows(self, name: &str) -> bool {
        self.variables().contains(&name)
    }
}

/// Why an expression failed to compile or to evaluate. Messages never contain values of
/// variables or records.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    /// The source is not valid CEL.
    #[error("syntax error: {0}")]
    Syntax(String),
    /// The expression references a variable that its scope does not declare.
    #[error("undeclared reference '{0}'")]
    UndeclaredReference(String),
    /// The expression calls a function that CEL does not know.
    #[error("unknown function '{0}'")]
    UnknownFunction(String),
    /// The expression evaluated to something other than a bool.
    #[error("expression must evaluate to a bool, got {0}")]
    NotBool(String),
    /// Evaluation failed (missing field, type mismatch, ...). The message names kinds, types,
    /// functions and field names, never values.
    #[error("evaluation failed: {0}")]
    Evaluation(String),
}

/// A compiled CEL expression. Cheap to clone (shared), `Send` and `Sync`.
#[derive(Clone)]
pub struct Expr {
    inner: Arc<Inner>,
}

struct Inner {
    source: String,
    scope: Scope,
    program: Program,
    /// Variable -> fields selected directly on it (`v.f`, `has(v.f)`, `v['f']`, `v.?f`).
    fields: BTreeMap<String, BTreeSet<String>>,
    /// Field names of `record` when the record is only ever used through direct field
    /// selections, so that evaluation converts just those fields; `None`: the whole record.
    record_fields: Option<Vec<String>>,
    /// Field names and string literals of the source: error messages may name these.
    names: HashSet<String>,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Expr").field("source", &self.inner.source).field("scope", &self.inner.scope).finish()
    }
}

impl PartialEq for Expr {
    fn eq(&self, other: &Self) -> bool {
        self.inner.scope == other.inner.scope && self.inner.source == other.inner.source
    }
}

impl Eq for Expr {}

/// The CEL environment: the standard library plus the strings extension, shared.
fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Env::stdlib();
        // The strings extension (lowerAscii, split, ...) only adds overloads; should it ever
        // fail to register, the standard library alone is still a valid environment.
        if env.add_extension(cel::extensions::strings).is_err() {
            env = Env::stdlib();
        }
        Arc::new(env)
    })
}

impl Expr {
    /// Compiles `source` for `scope`: parses it, and checks that it references only the
    /// variables of the scope and only functions CEL knows.
    pub fn compile(source: &str, scope: Scope) -> Result<Expr, ExprError> {
        let program = env().compile(source).map_err(|errors| {
            // The parser's own syntax errors come first in quality; the others (internal
            // states of an incomplete parse) follow from them.
            let first = errors
                .errors
                .iter()
                .find(|e| e.msg.starts_with("Syntax error: "))
                .or_else(|| errors.errors.first());
            ExprError::Syntax(match first {
                Some(e) => {
                    let msg = e.msg.strip_prefix("Syntax error: ").unwrap_or(&e.msg);
                    format!("{msg} (line {}, column {})", e.pos.0, e.pos.1)
                }
                None => "invalid expression".to_owned(),
            })
        })?;
        let mut analysis = Analysis::default();
        analysis.walk(program.expression(), &mut Vec::new());

        let types = env().types();
        for var in &analysis.vars {
            if !scope.allows(var) && types.find_type(var).is_none() {
                return Err(ExprError::UndeclaredReference(var.clone()));
            }
        }
        if !analysis.functions.is_empty() {
            let mut probe = Context::with_env(Arc::clone(env()));
            for function in &analysis.functions {
                // A name is known when the environment declares an overload for it: adding a
                // function of the same name to a context is then refused.
                if probe.add_function(function, |a: i64| a).is_ok() {
                    return Err(ExprError::UnknownFunction(function.clone()));
                }
            }
        }

        let record_fields = if analysis.whole.contains("record") {
            None
        } else {
            Some(analysis.fields.get("record").map(|f| f.iter().cloned().collect()).unwrap_or_default())
        };
        Ok(Expr {
            inner: Arc::new(Inner {
                source: source.to_owned(),
                scope,
                program,
                fields: analysis.fields,
                record_fields,
                names: analysis.names,
            }),
        })
    }

    /// The source text the expression was compiled from.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The scope the expression was compiled for.
    pub fn scope(&self) -> Scope {
        self.inner.scope
    }

    /// Field names selected directly on the variable `var`, e.g. for
    /// `user.branch == record.branch` and `"user"`: `{"branch"}`. Covers `v.f`, `has(v.f)`,
    /// `v['f']` (with a literal key) and `v.?f`.
    pub fn fields_of(&self, var: &str) -> BTreeSet<String> {
        self.inner.fields.get(var).cloned().unwrap_or_default()
    }

    /// Evaluates the expression with the request-scoped variables (a `when` condition).
    /// A row filter evaluated this way has no `record` and fails.
    pub fn eval_bool(&self, vars: &Vars) -> Result<bool, ExprError> {
        self.eval_val(vars, None).map_err(|e| self.describe(e))
    }

    /// Evaluates a row filter for one JSON record.
    pub fn eval_record(&self, vars: &Vars, record: &serde_json::Value) -> Result<bool, ExprError> {
        self.eval_json_record(vars, record, None).map_err(|e| self.describe(e))
    }

    /// Evaluates a row filter for one record of a parsed body; strings starting with `marker`
    /// stand for numbers (see [`crate::numbers`]).
    pub(crate) fn eval_json_record(
        &self,
        vars: &Vars,
        record: &serde_json::Value,
        marker: Option<char>,
    ) -> Result<bool, EvalError> {
        match (&self.inner.record_fields, record) {
            (Some(fields), serde_json::Value::Object(object)) => {
                let mut entries: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> =
                    HashMap::with_capacity(fields.len());
                for field in fields {
                    if let Some(value) = object.get(field) {
                        entries.insert(CelMapKey::from(field.as_str()), json_to_val(value, marker));
                    }
                }
                let map = CelMap::from(entries);
                self.eval_val(vars, Some(&map))
            }
            _ => {
                let value = json_to_val(record, marker);
                self.eval_val(vars, Some(value.as_ref()))
            }
        }
    }

    fn eval_val<'a>(&self, vars: &'a Vars, record: Option<&'a (dyn Val + 'a)>) -> Result<bool, EvalError> {
        let resolver = Resolver { vars, record };
        let mut ctx = Context::with_env(Arc::clone(env()));
        ctx.set_variable_resolver(&resolver);
        let value =
            Value::resolve_val(self.inner.program.expression(), &ctx).map_err(EvalError::Execution)?;
        match value.downcast_ref::<CelBool>() {
            Some(b) => Ok(*b.inner()),
            None => Err(EvalError::NotBool(value.get_type().name().to_owned())),
        }
    }

    fn describe(&self, error: EvalError) -> ExprError {
        match error {
            EvalError::NotBool(t) => ExprError::NotBool(t),
            EvalError::Execution(e) => ExprError::Evaluation(self.describe_execution(&e)),
        }
    }

    /// A message for an execution error that names no value: cel's own messages print the
    /// values involved, which may be personal data.
    fn describe_execution(&self, error: &ExecutionError) -> String {
        let t = |v: &Value| v.type_of().to_string();
        match error {
            ExecutionError::InvalidArgumentCount { expected, actual } => {
                format!("invalid argument count: expected {expected}, got {actual}")
            }
            ExecutionError::UnsupportedTargetType { target } => {
                format!("unsupported target type {}", t(target))
            }
            ExecutionError::NotSupportedAsMethod { method, target } => {
                format!("method '{method}' not supported on type {}", t(target))
            }
            ExecutionError::UnsupportedKeyType(v) => format!("unsupported map key type {}", t(v)),
            ExecutionError::UnexpectedType { got, want } => {
                format!("unexpected type: got {got}, want {want}")
            }
            ExecutionError::NoSuchKey(key) if self.inner.names.contains(key.as_str()) => {
                format!("no such key '{key}'")
            }
            ExecutionError::NoSuchKey(_) => "no such key".to_owned(),
            ExecutionError::NoSuchOverload(overload) => overload.to_string(),
            ExecutionError::UndeclaredReference(name) => {
                format!("undeclared reference '{name}'")
            }
            ExecutionError::MissingArgumentOrTarget => "missing argument or target".to_owned(),
            ExecutionError::ValuesNotComparable(a, b) => {
                format!("values of type {} and {} cannot be compared", t(a), t(b))
            }
            ExecutionError::UnsupportedBinaryOperator(op, a, b) => {
                format!("unsupported operator '{op}' for {} and {}", t(a), t(b))
            }
            ExecutionError::UnsupportedIndex(index, target) => {
                format!("cannot use {} to index {}", t(index), t(target))
            }
            ExecutionError::FunctionError { function, .. } => {
                format!("function '{function}' failed")
            }
            ExecutionError::DivisionByZero(_) => "division by zero".to_owned(),
            ExecutionError::RemainderByZero(_) => "remainder by zero".to_owned(),
            ExecutionError::Overflow(op, _, _) => format!("overflow in '{op}'"),
            ExecutionError::IndexOutOfBounds(_) => "index out of bounds".to_owned(),
            ExecutionError::DuplicateKey(_) => "duplicate map key".to_owned(),
            ExecutionError::InternalError(_) => "internal error".to_owned(),
            _ => "unsupported operation".to_owned(),
        }
    }
}

/// A row filter bound to one request, evaluating record after record.
///
/// When the filter uses the record only through direct field selections, its result depends
/// on nothing but the values of those fields (CEL is deterministic and the request variables
/// are fixed), so results are remembered by those values: a response with a few distinct
/// branches evaluates CEL a few times, not once per record. Only scalar field values are
/// remembered, and at most [`RecordFilter::MEMO_LIMIT`] distinct combinations.
pub(crate) struct RecordFilter<'a> {
    expr: &'a Expr,
    vars: &'a Vars,
    /// Strings starting with it stand for numbers ([`crate::numbers`]).
    marker: Option<char>,
    memo: HashMap<u64, Vec<(Vec<MemoPart>, Verdict)>>,
    memo_len: usize,
    hasher: std::hash::RandomState,
}

/// The outcome of a filter for one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Keep,
    Drop,
    Error,
}

/// One field value of a memo key.
#[derive(Debug, PartialEq)]
enum MemoPart {
    Missing,
    Null,
    Bool(bool),
    Number((u8, u64)),
    String(String),
}

/// A number's identity for the memo: its integer value, or the bits of its float (so that
/// `-0.0` and `0.0`, equal as numbers, stay apart as CEL `string()` tells them apart).
fn number_key(n: &serde_json::Number) -> (u8, u64) {
    if let Some(u) = n.as_u64() {
        (0, u)
    } else if let Some(i) = n.as_i64() {
        (1, i.cast_unsigned())
    } else {
        (2, n.as_f64().unwrap_or(f64::NAN).to_bits())
    }
}

impl MemoPart {
    fn matches(&self, value: Option<&serde_json::Value>) -> bool {
        use serde_json::Value as J;
        match (self, value) {
            (MemoPart::Missing, None) | (MemoPart::Null, Some(J::Null)) => true,
            (MemoPart::Bool(a), Some(J::Bool(b))) => a == b,
            (MemoPart::Number(a), Some(J::Number(b))) => *a == number_key(b),
            (MemoPart::String(a), Some(J::String(b))) => a == b,
            _ => false,
        }
    }

    fn of(value: Option<&serde_json::Value>) -> Option<MemoPart> {
        use serde_json::Value as J;
        Some(match value {
            None => MemoPart::Missing,
            Some(J::Null) => MemoPart::Null,
            Some(J::Bool(b)) => MemoPart::Bool(*b),
            Some(J::Number(n)) => MemoPart::Number(number_key(n)),
            Some(J::String(s)) => MemoPart::String(s.clone()),
            Some(J::Array(_) | J::Object(_)) => return None,
        })
    }
}

impl<'a> RecordFilter<'a> {
    /// Distinct field-value combinations remembered per response.
    pub(crate) const MEMO_LIMIT: usize = 4096;

    pub(crate) fn new(expr: &'a Expr, vars: &'a Vars, marker: Option<char>) -> Self {
        RecordFilter {
            expr,
            vars,
            marker,
            memo: HashMap::new(),
            memo_len: 0,
            hasher: std::hash::RandomState::new(),
        }
    }

    /// Whether the filter keeps `record`.
    pub(crate) fn verdict(&mut self, record: &serde_json::Value) -> Verdict {
        let (Some(fields), serde_json::Value::Object(object)) = (&self.expr.inner.record_fields, record)
        else {
            return self.evaluate(record);
        };
        let Some(hash) = self.key_hash(fields, object) else {
            return self.evaluate(record);
        };
        if let Some(bucket) = self.memo.get(&hash)
            && let Some((_, verdict)) = bucket.iter().find(|(parts, _)| {
                parts.iter().zip(fields).all(|(part, field)| part.matches(object.get(field)))
            })
        {
            return *verdict;
        }
        let verdict = self.evaluate(record);
        if self.memo_len < Self::MEMO_LIMIT {
            let parts: Option<Vec<MemoPart>> = fields.iter().map(|f| MemoPart::of(object.get(f))).collect();
            if let Some(parts) = parts {
                self.memo.entry(hash).or_default().push((parts, verdict));
                self.memo_len += 1;
            }
        }
        verdict
    }

    /// A keyed hash of the values of `fields`, or `None` if one of them is not a scalar.
    fn key_hash(
        &self,
        fields: &[String],
        object: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<u64> {
        use serde_json::Value as J;
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.hasher.build_hasher();
        for field in fields {
            match object.get(field) {
                None => 0u8.hash(&mut h),
                Some(J::Null) => 1u8.hash(&mut h),
                Some(J::Bool(b)) => (2u8, b).hash(&mut h),
                Some(J::Number(n)) => (3u8, number_key(n)).hash(&mut h),
                Some(J::String(s)) => (4u8, s).hash(&mut h),
                Some(J::Array(_) | J::Object(_)) => return None,
            }
        }
        Some(h.finish())
    }

    fn evaluate(&self, record: &serde_json::Value) -> Verdict {
        match self.expr.eval_json_record(self.vars, record, self.marker) {
            Ok(true) => Verdict::Keep,
            Ok(false) => Verdict::Drop,
            Err(_) => Verdict::Error,
        }
    }
}

/// Why an evaluation failed, before it is described (row filters only count failures).
#[derive(Debug)]
pub(crate) enum EvalError {
    NotBool(String),
    Execution(ExecutionError),
}

/// What the walk over an expression found.
#[derive(Default)]
struct Analysis {
    vars: BTreeSet<String>,
    fields: BTreeMap<String, BTreeSet<String>>,
    whole: BTreeSet<String>,
    functions: BTreeSet<String>,
    names: HashSet<String>,
}

impl Analysis {
    /// Walks `e`; `bound` holds the comprehension variables in scope.
    fn walk(&mut self, e: &IdedExpr, bound: &mut Vec<String>) {
        match &e.expr {
            Node::Unspecified => {}
            Node::Ident(name) => {
                if !name.starts_with('@') && !bound.contains(name) {
                    self.vars.insert(name.clone());
                    self.whole.insert(name.clone());
                }
            }
            Node::Select(select) => {
                self.names.insert(select.field.clone());
                match &select.operand.expr {
                    Node::Ident(root) if !bound.contains(root) => {
                        self.field(root, &select.field);
                    }
                    _ => self.walk(&select.operand, bound),
                }
            }
            Node::Call(call) => {
                let is_field_access = matches!(
                    call.func_name.as_str(),
                    operators::INDEX | operators::OPT_INDEX | operators::OPT_SELECT
                );
                if is_field_access
                    && call.target.is_none()
                    && let [operand, key] = call.args.as_slice()
                    && let Node::Ident(root) = &operand.expr
                    && !bound.contains(root)
                    && let Node::Literal(LiteralValue::String(field)) = &key.expr
                {
                    self.names.insert(field.inner().to_owned());
                    self.field(root, field.inner());
                    return;
                }
                if !is_operator(&call.func_name) {
                    match call.target.as_deref() {
                        Some(target) => match qualified_name(target) {
                            // `ns.f(..)`: a namespaced function, e.g. `optional.of(x)`
                            Some(name)
                                if !bound.contains(&root_of(&name).to_owned())
                                    && !Scope::RowFilter.allows(root_of(&name))
                                    && is_namespaced_function(&name, &call.func_name) =>
                            {
                                self.functions.insert(format!("{name}.{}", call.func_name));
                                for arg in &call.args {
                                    self.walk(arg, bound);
                                }
                                return;
                            }
                            _ => {
                                self.functions.insert(call.func_name.clone());
                            }
                        },
                        None => {
                            self.functions.insert(call.func_name.clone());
                        }
                    }
                }
                if let Some(target) = call.target.as_deref() {
                    self.walk(target, bound);
                }
                for arg in &call.args {
                    self.walk(arg, bound);
                }
            }
            Node::Comprehension(c) => {
                self.walk(&c.iter_range, bound);
                self.walk(&c.accu_init, bound);
                let depth = bound.len();
                bound.push(c.iter_var.clone());
                if let Some(v2) = &c.iter_var2 {
                    bound.push(v2.clone());
                }
                bound.push(c.accu_var.clone());
                self.walk(&c.loop_cond, bound);
                self.walk(&c.loop_step, bound);
                self.walk(&c.result, bound);
                bound.truncate(depth);
            }
            Node::List(list) => {
                for element in &list.elements {
                    self.walk(element, bound);
                }
            }
            Node::Literal(LiteralValue::String(s)) => {
                self.names.insert(s.inner().to_owned());
            }
            Node::Literal(_) => {}
            Node::Map(map) => self.walk_entries(map.entries.iter().map(|e| &e.expr), bound),
            Node::Struct(s) => self.walk_entries(s.entries.iter().map(|e| &e.expr), bound),
        }
    }

    fn walk_entries<'a>(&mut self, entries: impl Iterator<Item = &'a EntryExpr>, bound: &mut Vec<String>) {
        for entry in entries {
            match entry {
                EntryExpr::StructField(field) => self.walk(&field.value, bound),
                EntryExpr::MapEntry(entry) => {
                    self.walk(&entry.key, bound);
                    self.walk(&entry.value, bound);
                }
            }
        }
    }

    fn field(&mut self, var: &str, field: &str) {
        self.vars.insert(var.to_owned());
        self.fields.entry(var.to_owned()).or_default().insert(field.to_owned());
    }
}

/// Operators and internal helpers are calls too; the interpreter handles them itself.
fn is_operator(name: &str) -> bool {
    name.starts_with('_')
        || name.starts_with('@')
        || name == operators::LOGICAL_NOT
        || name == operators::NEGATE
}

/// `a.b.c` spelled by identifiers and field selections.
fn qualified_name(e: &IdedExpr) -> Option<String> {
    match &e.expr {
        Node::Ident(name) => Some(name.clone()),
        Node::Select(select) if !select.test => {
            qualified_name(&select.operand).map(|prefix| format!("{prefix}.{}", select.field))
        }
        _ => None,
    }
}

fn root_of(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

fn is_namespaced_function(namespace: &str, function: &str) -> bool {
    let mut probe = Context::with_env(Arc::clone(env()));
    probe.add_function(&format!("{namespace}.{function}"), |a: i64| a).is_err()
}

/// Binds `request`, `user`, `workload` and, for row filters, `record`.
struct Resolver<'a> {
    vars: &'a Vars,
    record: Option<&'a (dyn Val + 'a)>,
}

impl VariableResolver for Resolver<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        match variable {
            "request" => Some(CowVal::Borrowed(self.vars.request.as_ref())),
            "user" => Some(CowVal::Borrowed(self.vars.user.as_ref())),
            "workload" => Some(CowVal::Borrowed(self.vars.workload.as_ref())),
            "record" => self.record.map(CowVal::Borrowed),
            _ => None,
        }
    }
}

/// Converts a JSON value into a CEL value that borrows its strings.
pub(crate) fn json_to_val(value: &serde_json::Value, marker: Option<char>) -> Box<dyn Val + '_> {
    use serde_json::Value as J;
    match value {
        J::Null => Box::new(CelNull),
        J::Bool(b) => Box::new(CelBool::from(*b)),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                Box::new(CelInt::from(i))
            } else if let Some(u) = n.as_u64() {
                Box::new(CelUInt::from(u))
            } else {
                Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        J::String(s) => match numbers::number_text(s, marker) {
            // A number kept verbatim (see `numbers`): CEL compares it as a double.
            Some(text) => Box::new(CelDouble::from(text.parse::<f64>().unwrap_or(f64::NAN))),
            None => Box::new(CelString::from(s.as_str())),
        },
        J::Array(items) => {
            Box::new(CelList::from(items.iter().map(|v| json_to_val(v, marker)).collect::<Vec<_>>()))
        }
        J::Object(object) => Box::new(CelMap::from(
            object
                .iter()
                .map(|(k, v)| (CelMapKey::from(k.as_str()), json_to_val(v, marker)))
                .collect::<HashMap<_, _>>(),
        )),
    }
}

/// The request as CEL sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestVars {
    /// HTTP method, upper case (`request.method`).
    pub method: String,
    /// Normalised request path (`request.path`).
    pub path: String,
    /// Captures of `{name}` segments of the matched path glob (`request.params`).
    pub params: BTreeMap<String, String>,
    /// Request time in seconds since the Unix epoch. CEL sees it as `request.time` (a
    /// timestamp), `request.hour` (UTC, 0-23) and `request.weekday` (UTC, 0 = Sunday).
    pub time: i64,
}

/// A verified end user as CEL sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserVars {
    /// User id (`user.id`).
    pub id: String,
    /// Attributes mapped from token claims (`user.<attribute>`). `id` and `authenticated`
    /// are built in and win over attributes of the same name.
    pub attributes: BTreeMap<String, String>,
}

/// The calling workload as CEL sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadVars {
    /// Namespace of the calling pod (`workload.namespace`).
    pub namespace: String,
    /// Service account of the calling pod (`workload.serviceAccount`).
    pub service_account: String,
    /// Labels of the calling pod (`workload.labels`); `None` when they are not known (a
    /// caller known by its certificate only): CEL then has no `workload.labels`, and an
    /// expression reading it fails to evaluate.
    pub labels: Option<BTreeMap<String, String>>,
}

impl WorkloadVars {
    /// The variables of a calling workload.
    pub fn of(w: &custos_api::WorkloadIdentity) -> WorkloadVars {
        WorkloadVars {
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            labels: (!w.labels_unknown).then(|| w.labels.clone()),
        }
    }
}

/// The request-scoped CEL variables, built once per request and shared by every expression
/// and record evaluated for it.
#[derive(Clone, Debug)]
pub struct Vars {
    request: Box<dyn Val>,
    user: Box<dyn Val>,
    workload: Box<dyn Val>,
}

impl Vars {
    /// Builds `request`, `user` (`{authenticated: false}` without a user) and `workload`
    /// (empty without a known workload).
    pub fn new(request: &RequestVars, user: Option<&UserVars>, workload: Option<&WorkloadVars>) -> Vars {
        let mut r = Entries::default();
        r.string("method", &request.method);
        r.string("path", &request.path);
        r.insert("params", string_map(&request.params));
        if let Some(time) = chrono::DateTime::from_timestamp(request.time, 0) {
            r.insert("time", Box::new(CelTimestamp::from(time.fixed_offset())));
        }
        let days = request.time.div_euclid(86_400);
        r.insert("hour", Box::new(CelInt::from(request.time.rem_euclid(86_400) / 3_600)));
        // 1970-01-01 was a Thursday.
        r.insert("weekday", Box::new(CelInt::from((days + 4).rem_euclid(7))));

        let mut u = Entries::default();
        match user {
            Some(user) => {
                for (name, value) in &user.attributes {
                    u.string(name, value);
                }
                u.string("id", &user.id);
                u.insert("authenticated", Box::new(CelBool::from(true)));
            }
            None => u.insert("authenticated", Box::new(CelBool::from(false))),
        }

        let mut w = Entries::default();
        if let Some(workload) = workload {
            w.string("namespace", &workload.namespace);
            w.string("serviceAccount", &workload.service_account);
            if let Some(labels) = &workload.labels {
                w.insert("labels", string_map(labels));
            }
        }

        Vars { request: r.into_val(), user: u.into_val(), workload: w.into_val() }
    }
}

#[derive(Default)]
struct Entries(HashMap<CelMapKey<'static>, Box<dyn Val>>);

impl Entries {
    fn insert(&mut self, key: &str, value: Box<dyn Val>) {
        self.0.insert(CelMapKey::from(key.to_owned()), value);
    }

    fn string(&mut self, key: &str, value: &str) {
        self.insert(key, Box::new(CelString::from(value.to_owned())));
    }

    fn into_val(self) -> Box<dyn Val> {
        Box::new(CelMap::from(self.0))
    }
}

fn string_map(map: &BTreeMap<String, String>) -> Box<dyn Val> {
    let mut entries = Entries::default();
    for (k, v) in map {
        entries.string(k, v);
    }
    entries.into_val()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn vars() -> Vars {
        let request = RequestVars {
            method: "GET".into(),
            path: "/customers/7".into(),
            params: BTreeMap::from([("id".to_owned(), "7".to_owned())]),
            // 2024-01-07 (a Sunday) 13:20:00 UTC
            time: 1_704_633_600,
        };
        let user = UserVars {
            id: "u1".into(),
            attributes: BTreeMap::from([("branch".to_owned(), "b1".to_owned())]),
        };
        let workload = WorkloadVars {
            namespace: "logistics".into(),
            service_account: "ops-portal".into(),
            labels: Some(BTreeMap::from([("app".to_owned(), "portal".to_owned())])),
        };
        Vars::new(&request, Some(&user), Some(&workload))
    }

    #[test]
    fn a_workload_whose_labels_are_unknown_has_no_labels_variable() {
        let request = RequestVars { method: "GET".into(), ..RequestVars::default() };
        let caller = custos_api::WorkloadIdentity {
            ip: "127.0.0.6".into(),
            namespace: "logistics".into(),
            service_account: "ops-portal".into(),
            labels: BTreeMap::new(),
            labels_unknown: true,
        };
        let vars = Vars::new(&request, None, Some(&WorkloadVars::of(&caller)));
        let eval = |src: &str| Expr::compile(src, Scope::When).unwrap().eval_bool(&vars);
        assert_eq!(eval("workload.serviceAccount == 'ops-portal'"), Ok(true));
        assert_eq!(eval("has(workload.labels)"), Ok(false));
        // Reading a label fails (a Deny rule's condition then counts as matched), where an
        // empty label map would have said "not a crawler".
        for src in ["workload.labels.tier != 'crawler'", "!('tier' in workload.labels)"] {
            assert!(eval(src).is_err(), "{src}");
        }
        let known = WorkloadVars::of(&custos_api::WorkloadIdentity { labels_unknown: false, ..caller });
        let vars = Vars::new(&request, None, Some(&known));
        assert_eq!(Expr::compile("has(workload.labels)", Scope::When).unwrap().eval_bool(&vars), Ok(true));
    }

    fn eval(src: &str) -> Result<bool, ExprError> {
        Expr::compile(src, Scope::When)?.eval_bool(&vars())
    }

    #[test]
    fn request_user_and_workload_variables() {
        for src in [
            "request.method == 'GET'",
            "request.path.startsWith('/customers/')",
            "request.params.id == '7'",
            "request.hour == 13",
            "request.weekday == 0",
            "request.time == timestamp('2024-01-07T13:20:00Z')",
            "user.id == 'u1' && user.authenticated && user.branch == 'b1'",
            "workload.namespace == 'logistics' && workload.serviceAccount == 'ops-portal'",
            "workload.labels.app == 'portal'",
            "'app' in workload.labels",
            "[1, 2, 3].exists(x, x == 2)",
            "request.method.lowerAscii() == 'get'",
            "type(request.hour) == int",
        ] {
            assert_eq!(eval(src), Ok(true), "{src}");
        }
    }

    #[test]
    fn anonymous_caller() {
        let vars = Vars::new(&RequestVars::default(), None, None);
        let e = Expr::compile("!user.authenticated && size(workload) == 0", Scope::When).unwrap();
        assert_eq!(e.eval_bool(&vars), Ok(true));
        let e = Expr::compile("user.branch == 'b1'", Scope::When).unwrap();
        assert_eq!(e.eval_bool(&vars).unwrap_err().to_string(), "evaluation failed: no such key 'branch'");
    }

    #[test]
    fn weekday_and_hour_before_the_epoch() {
        let request = RequestVars { time: -1, ..RequestVars::default() };
        let vars = Vars::new(&request, None, None);
        let e = Expr::compile("request.hour == 23 && request.weekday == 3", Scope::When).unwrap();
        assert_eq!(e.eval_bool(&vars), Ok(true));
    }

    #[test]
    fn undeclared_reference() {
        let err = Expr::compile("usr.branch == 'x'", Scope::When).unwrap_err();
        assert_eq!(err.to_string(), "undeclared reference 'usr'");
        let err = Expr::compile("record.branch == user.branch", Scope::When).unwrap_err();
        assert_eq!(err.to_string(), "undeclared reference 'record'");
        assert!(Expr::compile("record.branch == user.branch", Scope::RowFilter).is_ok());
        // comprehension variables are not references
        assert!(Expr::compile("record.tags.all(t, t != 'vip')", Scope::RowFilter).is_ok());
        let err = Expr::compile("record.tags.all(t, t != x)", Scope::RowFilter).unwrap_err();
        assert_eq!(err.to_string(), "undeclared reference 'x'");
    }

    #[test]
    fn unknown_function() {
        let err = Expr::compile("frobnicate(user.id)", Scope::When).unwrap_err();
        assert_eq!(err.to_string(), "unknown function 'frobnicate'");
        let err = Expr::compile("user.id.frob()", Scope::When).unwrap_err();
        assert_eq!(err.to_string(), "unknown function 'frob'");
        for src in [
            "size(user.id) > 0",
            "user.id.matches('^u[0-9]+$')",
            "int(request.params.id) == 7",
            "string(request.hour) == '13'",
            "duration('1h') > duration('1m')",
            "request.time.getHours() == 13",
            "optional.of(1).hasValue()",
            "user.id.contains('u') && user.id.endsWith('1')",
        ] {
            assert!(Expr::compile(src, Scope::When).is_ok(), "{src}");
            assert_eq!(eval(src), Ok(true), "{src}");
        }
    }

    #[test]
    fn syntax_error() {
        let err = Expr::compile("user.branch ==", Scope::When).unwrap_err();
        let msg = err.to_string();
        for src in ["(", "'unterminated", "1 +* 2", "user.?", "x[", ""] {
            let msg = Expr::compile(src, Scope::When).unwrap_err().to_string();
            assert!(msg.starts_with("syntax error: ") && msg.ends_with(')'), "{msg}");
            assert!(!msg.contains('\n') && !msg.contains("Syntax error"), "{msg}");
        }
        assert_eq!(
            Expr::compile("a.b.c)", Scope::When).unwrap_err().to_string(),
            "syntax error: extraneous input ')' expecting <EOF> (line 1, column 6)"
        );
        assert!(msg.starts_with("syntax error: mismatched input '<EOF>' expecting "), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(matches!(Expr::compile("(", Scope::When), Err(ExprError::Syntax(_))));
    }

    #[test]
    fn not_bool() {
        let err = eval("user.id").unwrap_err();
        assert_eq!(err.to_string(), "expression must evaluate to a bool, got string");
        let err = eval("request.hour + 1").unwrap_err();
        assert_eq!(err.to_string(), "expression must evaluate to a bool, got int");
    }

    #[test]
    fn evaluation_errors_name_no_values() {
        let e = Expr::compile("record.branch > 3", Scope::RowFilter).unwrap();
        let record = serde_json::json!({"branch": "secret-branch-value"});
        let msg = e.eval_record(&vars(), &record).unwrap_err().to_string();
        assert!(msg.starts_with("evaluation failed: "), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
        let e = Expr::compile("record[user.branch] == 1", Scope::RowFilter).unwrap();
        let msg = e.eval_record(&vars(), &record).unwrap_err().to_string();
        assert_eq!(msg, "evaluation failed: no such key");
        let e = Expr::compile("int(record.branch) == 1", Scope::RowFilter).unwrap();
        let msg = e.eval_record(&vars(), &record).unwrap_err().to_string();
        assert!(!msg.contains("secret"), "{msg}");
    }

    #[test]
    fn fields_of() {
        let e = Expr::compile(
            "user.branch == record.branch && has(record.owner) && record['zone'] == user.zone \
             && record.tags.exists(t, t == request.params.tag)",
            Scope::RowFilter,
        )
        .unwrap();
        assert_eq!(e.fields_of("user"), BTreeSet::from(["branch".to_owned(), "zone".to_owned()]));
        assert_eq!(
            e.fields_of("record"),
            BTreeSet::from(["branch", "owner", "tags", "zone"].map(str::to_owned))
        );
        assert_eq!(e.fields_of("request"), BTreeSet::from(["params".to_owned()]));
        assert!(e.fields_of("workload").is_empty());
        assert_eq!(e.inner.record_fields.as_ref().map(Vec::len), Some(4));
        // a comprehension variable named like a field's variable is not that variable
        let e = Expr::compile("[{'a': 1}].all(user, user.a == 1)", Scope::When).unwrap();
        assert!(e.fields_of("user").is_empty());
    }

    #[test]
    fn whole_record_use() {
        let e = Expr::compile("size(record) == 2 && record.a == 1", Scope::RowFilter).unwrap();
        assert!(e.inner.record_fields.is_none());
        let record = serde_json::json!({"a": 1, "b": [1, 2]});
        assert_eq!(e.eval_record(&vars(), &record), Ok(true));
    }

    #[test]
    fn record_values() {
        let record = serde_json::json!({
            "branch": "b1", "n": 3, "big": 18446744073709551615u64, "f": 1.5,
            "ok": true, "none": null, "tags": ["x", "y"], "addr": {"city": "Z"}
        });
        for src in [
            "record.branch == user.branch",
            "record.n == 3 && record.n + 1 == 4",
            "record.big == 18446744073709551615u",
            "record.f > 1.0",
            "record.ok",
            "record.none == null",
            "'y' in record.tags",
            "record.addr.city == 'Z'",
            "!has(record.missing)",
        ] {
            let e = Expr::compile(src, Scope::RowFilter).unwrap();
            assert_eq!(e.eval_record(&vars(), &record), Ok(true), "{src}");
        }
    }

    #[test]
    fn expr_is_shareable() {
        fn assert_send_sync<T: Send + Sync + Clone + fmt::Debug>() {}
        assert_send_sync::<Expr>();
        assert_send_sync::<Vars>();
        let e = Expr::compile("true", Scope::When).unwrap();
        assert_eq!(e.source(), "true");
        assert_eq!(e.scope(), Scope::When);
        assert_eq!(format!("{e:?}"), "Expr { source: \"true\", scope: When }");
    }
}
