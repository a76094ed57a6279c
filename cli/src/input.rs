//! Reading policy files given on the command line.

use std::path::{Path, PathBuf};

use anyhow::Context;
use custos_policy::{FieldErrors, Loaded, load_policies};

/// The policies and errors of one file.
pub(crate) struct PolicyFile {
    /// The path as given.
    pub(crate) path: PathBuf,
    /// What it held.
    pub(crate) loaded: Loaded,
}

/// One problem to report, with where it is.
#[derive(serde::Serialize)]
pub(crate) struct Problem {
    /// File path.
    pub(crate) file: String,
    /// 0-based YAML document index.
    pub(crate) document: usize,
    /// Policy name, when known.
    pub(crate) policy: Option<String>,
    /// Field path.
    pub(crate) path: String,
    /// What is wrong.
    pub(crate) message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let policy = self.policy.as_deref().unwrap_or("(unnamed)");
        write!(f, "{}: {}: {}: {}", self.file, policy, self.path, self.message)
    }
}

/// Reads each file (`-` is standard input). A file that cannot be read is an error of the
/// command, not of a policy.
pub(crate) fn read_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PolicyFile>> {
    paths
        .iter()
        .map(|p| {
            let text = if p == Path::new("-") {
                std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
            } else {
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?
            };
            Ok(PolicyFile { path: p.clone(), loaded: load_policies(&text) })
        })
        .collect()
}

/// Turns field errors of one policy into problems.
pub(crate) fn problems(
    file: &Path,
    document: usize,
    policy: Option<&str>,
    errors: &FieldErrors,
) -> Vec<Problem> {
    errors
        .iter()
        .map(|e| Problem {
            file: file.display().to_string(),
            document,
            policy: policy.map(str::to_string),
            path: e.path.clone(),
            message: e.message.clone(),
        })
        .collect()
}

/// The problems of the documents of `file` that could not be read as policies.
pub(crate) fn document_problems(file: &PolicyFile, default_namespace: &str) -> Vec<Problem> {
    file.loaded
        .errors
        .iter()
        .flat_map(|e| {
            problems(&file.path, e.document, e.qualified_name(default_namespace).as_deref(), &e.errors)
        })
        .collect()
}

/// Parses an optional `k=v,k2=v2` flag into a map (empty when absent).
pub(crate) fn parse_map(s: Option<&str>) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    Ok(s.map(parse_pairs).transpose()?.unwrap_or_default().into_iter().collect())
}

/// Parses `k=v,k2=v2` into pairs.
pub(crate) fn parse_pairs(s: &str) -> anyhow::Result<Vec<(String, String)>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').with_context(|| format!("expected key=value, got '{p}'"))?;
            let k = k.trim();
            anyhow::ensure!(!k.is_empty(), "empty key in '{p}'");
            Ok((k.to_string(), v.trim().to_string()))
        })
        .collect()
}
