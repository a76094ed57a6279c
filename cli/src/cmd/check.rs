//! `custos check`: validates policy files offline.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use custos_policy::compile_policy;

use crate::input::{Problem, document_problems, problems, read_files};
use crate::output::{OutputFormat, print_json};

/// Arguments of `custos check`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Policy files (multi-document YAML or JSON; `-` for standard input).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Namespace for policies that do not set metadata.namespace.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    output: OutputFormat,
}

#[derive(serde::Serialize)]
struct Report {
    policies: usize,
    valid: usize,
    problems: Vec<Problem>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let files = read_files(&args.files)?;
    let mut report = Report { policies: 0, valid: 0, problems: Vec::new() };
    let mut ok_lines = Vec::new();
    // Two policies of one name in one namespace would overwrite each other.
    let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
    for f in &files {
        report.policies += f.loaded.errors.len();
        report.problems.extend(document_problems(f, &args.namespace));
        for p in &f.loaded.policies {
            report.policies += 1;
            let ns = p.namespace.clone().unwrap_or_else(|| args.namespace.clone());
            let key = (ns.clone(), p.input.name.clone());
            if let Some(other) = seen.insert(key, f.path.display().to_string()) {
                report.problems.push(Problem {
                    file: f.path.display().to_string(),
                    document: p.document,
                    policy: Some(p.input.name.clone()),
                    path: "metadata.name".into(),
                    message: format!("policy {ns}/{} is also defined in {other}", p.input.name),
                });
                continue;
            }
            match compile_policy(&ns, &p.input.name, &p.input.spec) {
                Ok(c) => {
                    report.valid += 1;
                    let rules = c.deny_rules.len() + c.allow_rules.len();
                    ok_lines.push(format!(
                        "{}: {ns}/{}: ok ({rules} rule{}, mode {:?})",
                        f.path.display(),
                        p.input.name,
                        if rules == 1 { "" } else { "s" },
                        c.mode
                    ));
                }
                Err(errors) => {
                    let qualified = format!("{ns}/{}", p.input.name);
                    report.problems.extend(problems(&f.path, p.document, Some(&qualified), &errors));
                }
            }
        }
    }
    let failed = !report.problems.is_empty() || report.policies == 0;
    match args.output {
        OutputFormat::Json => print_json(&report)?,
        OutputFormat::Text => {
            for l in &ok_lines {
                println!("{l}");
            }
            for p in &report.problems {
                eprintln!("{p}");
            }
            if report.policies == 0 {
                eprintln!("no DataAccessPolicy found in the given files");
            } else {
                let errors = report.problems.len();
                let summary = format!(
                    "{} polic{} checked: {} valid, {} with errors ({errors} error{})",
                    report.policies,
                    if report.policies == 1 { "y" } else { "ies" },
                    report.valid,
                    report.policies - report.valid,
                    if errors == 1 { "" } else { "s" }
                );
                if failed { eprintln!("{summary}") } else { println!("{summary}") }
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
