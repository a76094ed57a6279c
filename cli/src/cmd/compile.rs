//! `custos compile`: the sidecar config (and NetworkPolicies) of one namespace.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use custos_api::WorkloadIdentity;
use custos_policy::{PolicyInput, compile_namespace};

use crate::input::{Problem, document_problems, problems, read_files};

/// Arguments of `custos compile`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Policy files (multi-document YAML or JSON; `-` for standard input).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The namespace to compile. Policies whose metadata.namespace names another one are
    /// skipped; policies without one are taken as in this namespace.
    #[arg(long, short = 'n')]
    namespace: String,
    /// Write the config here instead of standard output.
    #[arg(long, short = 'o')]
    output_file: Option<PathBuf>,
    /// Also write the NetworkPolicies, as multi-document YAML, to this file (`-`: stdout).
    #[arg(long)]
    network_policies: Option<PathBuf>,
    /// JSON file with the workload identity table (`[{"ip","namespace","serviceAccount","labels"}]`).
    #[arg(long)]
    workloads: Option<PathBuf>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let files = read_files(&args.files)?;
    let mut inputs: Vec<PolicyInput> = Vec::new();
    let mut all_problems: Vec<Problem> = Vec::new();
    let mut origin = std::collections::BTreeMap::new();
    for f in &files {
        all_problems.extend(document_problems(f, &args.namespace));
        for p in &f.loaded.policies {
            if p.namespace.as_deref().is_some_and(|ns| ns != args.namespace) {
                continue;
            }
            origin.insert(p.input.name.clone(), (f.path.clone(), p.document));
            inputs.push(p.input.clone());
        }
    }
    let workloads: Vec<WorkloadIdentity> = match &args.workloads {
        Some(p) => {
            let text = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a workload identity table", p.display()))?
        }
        None => Vec::new(),
    };
    let out = compile_namespace(&args.namespace, &inputs, workloads);
    for (name, errors) in &out.errors {
        let (file, doc) = origin.get(name).cloned().unwrap_or_default();
        all_problems.extend(problems(&file, doc, Some(name), errors));
    }
    if !all_problems.is_empty() {
        for p in &all_problems {
            eprintln!("{p}");
        }
        eprintln!("not compiled: {} error(s)", all_problems.len());
        return Ok(ExitCode::FAILURE);
    }
    if inputs.is_empty() {
        eprintln!("no DataAccessPolicy for namespace {} in the given files", args.namespace);
        return Ok(ExitCode::FAILURE);
    }
    let json = serde_json::to_string_pretty(&out.config)? + "\n";
    match &args.output_file {
        Some(p) => std::fs::write(p, &json).with_context(|| format!("cannot write {}", p.display()))?,
        None => print!("{json}"),
    }
    if let Some(p) = &args.network_policies {
        let mut yaml = String::new();
        for np in &out.network_policies {
            let mut v = serde_json::to_value(np)?;
            if let Some(obj) = v.as_object_mut() {
                obj.insert("apiVersion".into(), "networking.k8s.io/v1".into());
                obj.insert("kind".into(), "NetworkPolicy".into());
            }
            yaml.push_str("---\n");
            yaml.push_str(&serde_saphyr::to_string(&v)?);
        }
        if p.as_os_str() == "-" {
            print!("{yaml}");
        } else {
            std::fs::write(p, yaml).with_context(|| format!("cannot write {}", p.display()))?;
        }
    }
    eprintln!(
        "compiled {} polic{} for namespace {} ({}, {} NetworkPolic{})",
        out.config.policies.len(),
        if out.config.policies.len() == 1 { "y" } else { "ies" },
        args.namespace,
        out.config.hash,
        out.network_policies.len(),
        if out.network_policies.len() == 1 { "y" } else { "ies" },
    );
    Ok(ExitCode::SUCCESS)
}
