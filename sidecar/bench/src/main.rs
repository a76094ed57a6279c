//! `sidecar-bench`: the sidecar benchmark of `make bench`.
//!
//! Same run, loopback, same cores: an upstream app serving 2 KB JSON responses is measured
//! (a) directly, (b) behind `custos sidecar` with a 20-rule policy masking two data classes,
//! (c) behind nginx as a plain reverse proxy, and (d) behind a second sidecar with the same
//! rules but no masks or records (same identity, decision and audit work, no response
//! transform), which splits the sidecar's cost into the proxy's and the transform's, and (e)
//! behind a bare reverse proxy on the sidecar's own stack (hyper, the sidecar's app connections, a Tokio
//! runtime per CPU: [`bare`]), the floor of that stack, and (f) behind a third sidecar with (b)'s
//! policy that ships every audit event to a `custos collector` (SQLite) started by the harness,
//! as a deployed sidecar does; (b) to (e) run without a collector, events are built and dropped.
//! The collector shares the cores, so (f)'s throughput pays for it too; the table gives the
//! sidecar's own CPU per request and, below it, the collector's, and whether every event of
//! (f) was delivered. For the fixed-rate runs the collector is reniced to 19, a stand-in for
//! a collector on other nodes, so that (f)'s latency is the sidecar's. Peak throughput and latency percentiles
//! come from `wrk`, target after target in several rounds, each round starting one target
//! later (medians; ratios taken within a round, so that a shared machine's drifts hit all
//! targets alike); latency at a fixed 2,000 req/s comes from an open-loop load generator
//! (latency measured from each request's scheduled send time, so queueing is not hidden).
//! The sidecar's peak RSS is read from /proc after the load.
//!
//! (g) A burst of h2c streams: `h2load` (nghttp2) opens 32 client connections with 256
//! concurrent streams each (8,192 requests in flight) against (b) and against nginx (an h2c
//! listener of (c)), and the app counts the connections each opens to it: a proxy that opens
//! one per request in flight exhausts an app's connection limit and the host's ports.
//!
//! (h) Slow uploads ([`slow`]): wrk's GETs through a sidecar as deployed and through one that
//! forwards request bodies as they arrive (`--request-buffer-bytes 0`), each alone and then
//! while 64 clients trickle POST bodies at one byte a second, both allowed 32 connections to
//! the app. Skipped with `--peak-only` or `--slow-clients 0`.
//!
//! (i) Large uploads ([`uploads`]): 1 MiB multipart and JSON POST bodies, as fast as they are
//! answered, through a sidecar that checks each for a `_method` field on its way to the app
//! (the path's DELETE is denied), against the same sidecar with `--forward-unchecked-bodies`
//! (the bodies forwarded unread) and the app directly. Skipped with `--peak-only` or
//! `--upload-clients 0`.
#![forbid(unsafe_code)]

mod bare;
mod cgroups;
mod loadgen;
mod slow;
mod uploads;
mod upstream;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::cgroups::Cgroups;

/// Command line of the harness.
#[derive(Parser, Debug)]
struct Args {
    /// The custos binary to benchmark (a release build).
    #[arg(long, default_value = "target/release/custos")]
    custos: PathBuf,
    /// Seconds of load per wrk measurement and per fixed-rate measurement.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Request rate of the fixed-rate measurement.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Peak measurements of every target, taken in turn (target after target, round after
    /// round) so that all see the same drifts of a shared machine; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Also write the result table (markdown) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip the fixed-rate measurements (quick peak-only runs while tuning).
    #[arg(long)]
    peak_only: bool,
    /// Requests of each h2c burst measurement (g); 0 skips it.
    #[arg(long, default_value_t = 200_000)]
    burst_requests: u64,
    /// Slow clients of the slow-upload measurement (h), each trickling a POST body one byte a
    /// second; 0 skips it.
    #[arg(long, default_value_t = 64)]
    slow_clients: usize,
    /// Clients of the large-upload measurement (i), each POSTing 1 MiB bodies over one
    /// keep-alive connection; 0 skips it.
    #[arg(long, default_value_t = 4)]
    upload_clients: usize,
    /// Run as in a pod: the load generator (wrk, h2load), the app (this process), the proxies
    /// and the collector each in a cgroup of its own with equal CPU weight, so that a
    /// proxy's thread count does not decide its share of the CPUs (needs root and the cgroup
    /// v1 or v2 cpu controller). The fixed-rate load generator runs in this process, with the app:
    /// at 2,000 req/s the CPUs are not contended.
    #[arg(long)]
    cgroups: bool,
    /// Internal: run as the bare proxy (e) on this address, then `--upstream-addr`.
    #[arg(long, hide = true, requires = "upstream_addr")]
    bare_proxy: Option<SocketAddr>,
    /// Internal: the bare proxy's upstream.
    #[arg(long, hide = true)]
    upstream_addr: Option<SocketAddr>,
}

/// The 20-rule policy of the benchmark: 19 rules that do not match the benchmarked path,
/// then the allow rule that does, masking two classes; without `masking`, the same rules with
/// no records path and no masks (no response transform).
fn policy_yaml(masking: bool) -> String {
    let plan = |text: &str| if masking { text.to_owned() } else { String::new() };
    let mut rules = String::new();
    for i in 0..10 {
        let _ = write!(
            rules,
            "    - name: deny-export-{i}\n      action: Deny\n      to: {{paths: [\"/area{i}/export\", \"/area{i}/export/**\"]}}\n"
        );
        if i < 9 {
            let _ = write!(
                rules,
                "    - name: read-area-{i}\n      action: Allow\n      to: {{methods: [GET], paths: [\"/area{i}/{{id}}\", \"/area{i}/*/history/**\"]}}\n{}",
                plan("      records: \"$.items[*]\"\n      mask: {phone: ShowLast4, name: ShowFirst1}\n")
            );
        }
    }
    rules.push_str("    - name: read-customers\n      action: Allow\n      to: {methods: [GET], paths: [\"/customers/{id}\"]}\n");
    rules
        .push_str(&plan("      records: \"$.items[*]\"\n      mask: {phone: ShowLast4, name: ShowFirst1}\n"));
    format!(
        "apiVersion: custos.dev/v1alpha1\nkind: DataAccessPolicy\nmetadata: {{name: bench, namespace: bench}}\nspec:\n  workload: {{selector: {{matchLabels: {{app: customer-api}}}}, appPort: 8080}}\n  defaultAction: Deny\n  dataClasses:\n    - {{name: phone, paths: [\"$.items[*].phone\"]}}\n    - {{name: name, paths: [\"$.items[*].name\"]}}\n  rules:\n{rules}"
    )
}

/// The processes the harness started, stopped when it ends.
struct Guard(Vec<Child>);

impl Guard {
    /// Starts `command` (`what` names it in errors), keeps it to be stopped with the others,
    /// and waits until it listens on `port`; returns its pid and address.
    fn start(&mut self, command: &mut Command, what: &str, port: u16) -> Result<(u32, SocketAddr)> {
        let child = command.spawn().with_context(|| format!("cannot start {what}"))?;
        let pid = child.id();
        self.0.push(child);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_for(addr, what)?;
        Ok((pid, addr))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SIGTERM first, so that nginx's master stops its workers (a SIGKILLed master
        // leaves them running) and the sidecar drains; SIGKILL what is still there after 5 s.
        for c in &self.0 {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.0 {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for(addr: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not start listening on {addr}")
}

/// One wrk measurement.
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: String,
    /// Responses that were not 2xx or 3xx.
    non_2xx: u64,
    /// Proxy CPU time per request (µs), for the proxied targets.
    cpu_us: Option<f64>,
}

impl WrkResult {
    /// Requests per second answered with 2xx or 3xx over `duration` seconds.
    fn ok_rps(&self, duration: u64) -> f64 {
        (self.rps - self.non_2xx as f64 / duration.max(1) as f64).max(0.0)
    }
}

/// Runs `command` to its end, in the cgroup `load` of `cgroups` when there are.
fn load_output(command: &mut Command, cgroups: Option<&Cgroups>) -> std::io::Result<std::process::Output> {
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    if let Some(cgroups) = cgroups
        && let Err(e) = cgroups.join("load", &[child.id()])
    {
        // a load generator outside its cgroup would measure something else
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        return Err(std::io::Error::other(format!("{e:#}")));
    }
    child.wait_with_output()
}

fn wrk(url: &str, duration: u64, connections: u32, cgroups: Option<&Cgroups>) -> Result<WrkResult> {
    let out = load_output(
        Command::new("wrk").args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{duration}s"),
            "--latency",
            url,
        ]),
        cgroups,
    )
    .context("cannot run wrk (apt-get install wrk)")?;
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// The figures of wrk's `--latency` report.
fn parse_wrk(text: &str) -> Result<WrkResult> {
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("unexpected wrk output:\n{text}"))?;
    let pct = |p: &str| -> Result<f64> {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .map(str::trim)
            .and_then(parse_wrk_duration)
            .with_context(|| format!("no {p} in wrk output"))
    };
    let errors = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    let non_2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    Ok(WrkResult { rps, p50_ms: pct("50%")?, p99_ms: pct("99%")?, errors, non_2xx, cpu_us: None })
}

fn parse_wrk_duration(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// CPU time (user + system, ns) consumed so far by the processes `pids` and all their
/// threads, from `/proc/<pid>/task/<tid>/schedstat` (nanosecond resolution).
fn cpu_ns(pids: &[u32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for task in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
                total += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    total
}

/// `pid` and its child processes (nginx's workers).
fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(child) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else { continue };
            // Field 4 (after the parenthesised command name) is the parent pid.
            let ppid = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if ppid.and_then(|v| v.parse::<u32>().ok()) == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One h2load measurement: 32 client connections, 256 concurrent streams each.
struct BurstResult {
    rps: f64,
    succeeded: u64,
    failed: u64,
    non_2xx: u64,
    /// Connections the app accepted during the measurement.
    app_connections: u64,
    /// The most connections the app had open at once during the measurement, beyond those
    /// open before it (the other targets' idle keep-alive connections).
    app_peak_open: u64,
}

/// Runs h2load (h2c, prior knowledge) against `url`.
fn h2load(url: &str, requests: u64, cgroups: Option<&Cgroups>) -> Result<BurstResult> {
    let before = upstream::accepted();
    let (_, open_before) = upstream::take_peak_open();
    let out = load_output(
        Command::new("h2load").args(["-n", &requests.to_string(), "-c", "32", "-m", "256", url]),
        cgroups,
    )
    .context("cannot run h2load (apt-get install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut r = parse_h2load(&text).with_context(|| format!("unexpected h2load output:\n{text}"))?;
    r.app_connections = upstream::accepted() - before;
    r.app_peak_open = upstream::take_peak_open().0.saturating_sub(open_before);
    Ok(r)
}

/// The figures of h2load's summary (the app's counts left 0).
fn parse_h2load(text: &str) -> Option<BurstResult> {
    let rps = text.lines().find_map(|l| l.strip_prefix("finished in "))?.split(", ").nth(1)?;
    let rps = rps.strip_suffix(" req/s").unwrap_or(rps).parse().ok()?;
    let requests = text.lines().find_map(|l| l.strip_prefix("requests: "))?;
    let count = |line: &str, what: &str| -> Option<u64> {
        line.split(", ").find_map(|part| part.strip_suffix(what)).and_then(|n| n.trim().parse().ok())
    };
    let codes = text.lines().find_map(|l| l.strip_prefix("status codes: "))?;
    let non_2xx = ["3xx", "4xx", "5xx"].iter().filter_map(|c| count(codes, &format!(" {c}"))).sum();
    Some(BurstResult {
        rps,
        succeeded: count(requests, " succeeded")?,
        failed: count(requests, " failed")?,
        non_2xx,
        app_connections: 0,
        app_peak_open: 0,
    })
}

fn nginx_conf(dir: &Path, listen: u16, h2c_listen: u16, upstream: SocketAddr) -> String {
    format!(
        "worker_processes auto;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {dir}/nginx-body;\n  proxy_temp_path {dir}/nginx-proxy;\n  fastcgi_temp_path {dir}/nginx-fastcgi;\n  uwsgi_temp_path {dir}/nginx-uwsgi;\n  scgi_temp_path {dir}/nginx-scgi;\n  upstream app {{ server {upstream}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{listen};\n    listen 127.0.0.1:{h2c_listen} http2;\n    http2_max_concurrent_streams 256;\n    location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        dir = dir.display()
    )
}

/// A collector the benchmark ships (f)'s audit events to.
struct Collector {
    url: String,
    token: PathBuf,
    pid: u32,
}

/// Starts `custos collector` on SQLite in `dir`.
fn start_collector(custos: &Path, dir: &Path, guard: &mut Guard) -> Result<Collector> {
    let dir = dir.join("collector");
    std::fs::create_dir_all(&dir)?;
    let token = dir.join("token");
    std::fs::write(&token, "sidecar-bench-token")?;
    let port = free_port()?;
    let (pid, addr) = guard.start(
        Command::new(custos)
            .arg("collector")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--store")
            .arg(format!("sqlite:{}", dir.join("audit.db").display()))
            .arg("--token-file")
            .arg(&token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.join("collector.log"))?)),
        "custos collector",
        port,
    )?;
    Ok(Collector { url: format!("http://{addr}"), token, pid })
}

/// A sidecar the harness started.
struct Sidecar {
    addr: SocketAddr,
    admin: SocketAddr,
    pid: u32,
}

/// What sets one of the harness's sidecars apart.
struct SidecarSpec<'a> {
    /// Its directory under the run's.
    name: &'a str,
    /// The policy it enforces (YAML).
    policy: String,
    /// Flags added to the common ones.
    args: &'a [&'a str],
    /// Where it ships its audit events (none: they are built and dropped).
    collector: Option<&'a Collector>,
}

impl<'a> SidecarSpec<'a> {
    fn new(name: &'a str, policy: String) -> Self {
        SidecarSpec { name, policy, args: &[], collector: None }
    }
}

/// Compiles the spec's policy into `dir/<name>` and starts a sidecar on it in front of
/// `upstream`, hashing ids with `hash_key`.
fn start_sidecar(
    custos: &Path,
    dir: &Path,
    hash_key: &Path,
    spec: SidecarSpec<'_>,
    upstream: SocketAddr,
    guard: &mut Guard,
) -> Result<Sidecar> {
    let dir = dir.join(spec.name);
    std::fs::create_dir_all(&dir)?;
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, &spec.policy)?;
    let config = dir.join("config.json");
    let status =
        Command::new(custos).args(["compile", "-n", "bench"]).arg(&policy).arg("-o").arg(&config).status()?;
    anyhow::ensure!(status.success(), "custos compile failed");
    let port = free_port()?;
    let admin_port = free_port()?;
    let mut command = Command::new(custos);
    command
        .arg("sidecar")
        .arg("--config")
        .arg(&config)
        .args(["--namespace", "bench", "--pod-labels", "app=customer-api"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &upstream.to_string()])
        .args(["--admin", &format!("127.0.0.1:{admin_port}")])
        .arg("--spool-dir")
        .arg(dir.join("spool"))
        .arg("--hash-key-file")
        .arg(hash_key)
        .env("RUST_LOG", "warn")
        // The allocator setting of the deployed sidecar: the image (Dockerfile) and the
        // injected container (operator/core/src/inject/sidecar.rs, ALLOCATOR_ENV) set it.
        .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.join("sidecar.log"))?));
    if let Some(collector) = spec.collector {
        command.args(["--collector", &collector.url]).arg("--collector-token-file").arg(&collector.token);
    }
    command.args(spec.args);
    let (pid, addr) = guard.start(&mut command, "custos sidecar", port)?;
    Ok(Sidecar { addr, admin: ([127, 0, 0, 1], admin_port).into(), pid })
}

/// A shipping sidecar's audit counts once every event it emitted is delivered or counted as
/// dropped (within a flush interval or two; after 20 s, as they are).
fn settled_audit_counts(admin: SocketAddr) -> Result<(u64, u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let counts = audit_counts(&loadgen::get_once(admin, "/metrics")?);
        if counts.1 + counts.2 >= counts.0 || Instant::now() > deadline {
            return Ok(counts);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The audit event counters of a sidecar's `/metrics`: emitted, delivered, dropped (all
/// reasons).
fn audit_counts(metrics: &str) -> (u64, u64, u64) {
    let (mut emitted, mut delivered, mut dropped) = (0, 0, 0);
    for line in metrics.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<u64>() else { continue };
        match series.split('{').next() {
            Some("custos_audit_events_emitted_total") => emitted += value,
            Some("custos_audit_events_delivered_total") => delivered += value,
            Some("custos_audit_events_dropped_total") => dropped += value,
            _ => {}
        }
    }
    (emitted, delivered, dropped)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The peak table: for each target the medians over the rounds, and its ratios to the direct
/// app (target 0) and to nginx (target 2) taken within each round, as median and range.
fn peak_table(names: &[&str], rounds: &[Vec<WrkResult>], connections: u32) -> String {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| target | peak req/s (wrk -t2 -c{connections}, median of {}) | p50 | p99 | vs direct | vs nginx (median, range over rounds) | proxy CPU per request |",
        rounds.len()
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|");
    for (t, name) in names.iter().enumerate() {
        let of = |f: &dyn Fn(&WrkResult) -> f64| median(rounds.iter().map(|r| f(&r[t])).collect());
        let ratios = |base: usize| -> Vec<f64> { rounds.iter().map(|r| r[t].rps / r[base].rps).collect() };
        let vs_nginx = ratios(2);
        let (lo, hi) = vs_nginx.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let cpu = of(&|r| r.cpu_us.unwrap_or(f64::NAN));
        let _ = writeln!(
            table,
            "| {name} | {:.0} | {:.3} ms | {:.3} ms | {:.2}x | {:.2}x ({lo:.2}–{hi:.2}) | {} |",
            of(&|r| r.rps),
            of(&|r| r.p50_ms),
            of(&|r| r.p99_ms),
            median(ratios(0)),
            median(vs_nginx),
            if cpu.is_nan() { "—".to_string() } else { format!("{cpu:.1} µs") }
        );
    }
    table
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let (Some(listen), Some(upstream)) = (args.bare_proxy, args.upstream_addr) {
        return bare::run(listen, upstream);
    }
    anyhow::ensure!(
        args.custos.exists(),
        "{} not found: build it with `cargo build --release -p custos`",
        args.custos.display()
    );
    let dir = std::env::temp_dir().join(format!("custos-sidecar-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    // (a) the upstream app, in this process on its own runtime.
    let upstream = upstream::start()?;
    println!("upstream app on {upstream} ({} byte JSON responses)", upstream::body().len());

    // Before the processes' guard, so that it is dropped after they have stopped.
    let cgroups =
        args.cgroups.then(|| Cgroups::create(&["load", "app", "proxies", "collector"])).transpose()?;

    // (b) the sidecar, a separate process; (d) the same without a response transform; (f) (b)
    // shipping its audit events to a collector.
    let mut guard = Guard(Vec::new());
    let key = dir.join("hash.key");
    std::fs::write(&key, b"benchmark-hash-key-0123456789abcdef")?;
    let custos = &args.custos;
    let masking = SidecarSpec::new("masking", policy_yaml(true));
    let sidecar = start_sidecar(custos, &dir, &key, masking, upstream, &mut guard)?;
    let plain = SidecarSpec::new("plain", policy_yaml(false));
    let plain = start_sidecar(custos, &dir, &key, plain, upstream, &mut guard)?;
    let collector = start_collector(custos, &dir, &mut guard)?;
    let shipping =
        SidecarSpec { collector: Some(&collector), ..SidecarSpec::new("shipping", policy_yaml(true)) };
    let shipping = start_sidecar(custos, &dir, &key, shipping, upstream, &mut guard)?;
    let (sidecar_addr, sidecar_pid, plain_addr) = (sidecar.addr, sidecar.pid, plain.addr);

    // (c) nginx as a plain reverse proxy.
    let (nginx_port, nginx_h2c_port) = (free_port()?, free_port()?);
    std::fs::write(dir.join("nginx.conf"), nginx_conf(&dir, nginx_port, nginx_h2c_port, upstream))?;
    let (nginx_pid, nginx_addr) = guard.start(
        Command::new("nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "nginx (if it is not installed: apt-get install nginx-light)",
        nginx_port,
    )?;

    // (e) the bare proxy on the sidecar's stack, this program run again.
    let bare_port = free_port()?;
    let (bare_pid, bare_addr) = guard.start(
        Command::new(std::env::current_exe()?)
            .args([
                "--bare-proxy",
                &format!("127.0.0.1:{bare_port}"),
                "--upstream-addr",
                &upstream.to_string(),
            ])
            .stdout(Stdio::null()),
        "the bare proxy",
        bare_port,
    )?;

    if let Some(cgroups) = &cgroups {
        cgroups.join("app", &[std::process::id()])?;
        cgroups.join("proxies", &[sidecar_pid, plain.pid, shipping.pid, bare_pid])?;
        cgroups.join("proxies", &with_children(nginx_pid))?;
        cgroups.join("collector", &[collector.pid])?;
    }

    let path = "/customers/42";
    let targets = [
        ("direct", upstream),
        ("custos sidecar", sidecar_addr),
        ("nginx proxy", nginx_addr),
        ("sidecar, no masks", plain_addr),
        ("bare hyper proxy", bare_addr),
        ("sidecar → collector", shipping.addr),
    ];
    const SHIPPING: usize = 5;

    // Sanity: the sidecar really masks.
    let body = loadgen::get_once(sidecar_addr, path)?;
    anyhow::ensure!(!body.contains("+86 138") && body.contains("*"), "the sidecar did not mask the response");
    let body = loadgen::get_once(plain_addr, path)?;
    anyhow::ensure!(body.contains("+86 138"), "the sidecar without masks changed the response");
    let body = loadgen::get_once(shipping.addr, path)?;
    anyhow::ensure!(!body.contains("+86 138") && body.contains("*"), "the shipping sidecar did not mask");
    let body = loadgen::get_once(bare_addr, path)?;
    anyhow::ensure!(body == loadgen::get_once(upstream, path)?, "the bare proxy changed the response");

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    // CPU time per request of the proxy processes under peak load: a figure that does not
    // depend on how the two cores are shared with wrk and the upstream.
    let nginx_pids = with_children(nginx_pid);
    let proxy_pids: [&[u32]; 6] =
        [&[], &[sidecar_pid], &nginx_pids, &[plain.pid], &[bare_pid], &[shipping.pid]];
    // The collector's CPU and the requests it was spent on, over (f)'s peak measurements.
    let (mut collector_ns, mut shipped_requests) = (0u64, 0f64);
    // rounds[r][t]: round r's measurement of target t
    let mut rounds: Vec<Vec<WrkResult>> = Vec::new();
    for round in 1..=args.rounds {
        // each round starts one target later, so that no target always follows the same one
        let mut results: Vec<Option<WrkResult>> = targets.iter().map(|_| None).collect();
        let order = (0..targets.len()).map(|i| (i + round as usize - 1) % targets.len());
        for t in order {
            let ((name, addr), pids) = (targets[t], proxy_pids[t]);
            let cpu_before = cpu_ns(pids);
            let collector_before = cpu_ns(&[collector.pid]);
            let mut r =
                wrk(&format!("http://{addr}{path}"), args.duration, args.connections, cgroups.as_ref())?;
            let cpu = cpu_ns(pids) - cpu_before;
            let requests = r.rps * args.duration as f64;
            if t == SHIPPING {
                // the collector's work on this run ends once the last batches are stored: wait
                // for it, so that it is counted here and does not slow down the next target
                settled_audit_counts(shipping.admin)?;
                collector_ns += cpu_ns(&[collector.pid]) - collector_before;
                shipped_requests += requests;
            }
            r.cpu_us = (!pids.is_empty() && requests > 0.0).then(|| cpu as f64 / 1000.0 / requests);
            println!(
                "wrk {round}/{} {name:<18} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  proxy CPU {} {}",
                args.rounds,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.cpu_us.map_or("-".to_string(), |c| format!("{c:.1} µs/req")),
                r.errors
            );
            results[t] = Some(r);
        }
        rounds.push(results.into_iter().flatten().collect());
    }
    let mut table = peak_table(&targets.map(|(name, _)| name), &rounds, args.connections);
    if let Some(cgroups) = &cgroups {
        let _ = writeln!(
            table,
            "\n--cgroups: load generator, app, proxies and collector each in a cgroup of its own ({}), as containers in a pod",
            cgroups.weights()
        );
    }
    let _ = writeln!(
        table,
        "\ncollector CPU per event during (f)'s peak runs: {:.1} µs (SQLite store, on the same cores)",
        collector_ns as f64 / 1000.0 / shipped_requests.max(1.0)
    );
    let (emitted, delivered, dropped) = settled_audit_counts(shipping.admin)?;
    let _ = writeln!(
        table,
        "audit events of (f) after the peak runs: {emitted} emitted, {delivered} delivered to the collector, {dropped} dropped"
    );
    if args.peak_only {
        println!("\n{table}");
        drop(guard);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    // At a fixed rate the question is the sidecar's latency, and a deployed collector runs on
    // other nodes: lowest CPU priority keeps its batch inserts (milliseconds of CPU each) from
    // holding up requests on these two cores, while it still has the idle CPU it needs.
    let reniced = Command::new("renice")
        .args(["-n", "19", "-p", &collector.pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut fixed = Vec::new();
    for (name, addr) in targets {
        let l =
            rt.block_on(loadgen::fixed_rate(addr, path, args.rate, Duration::from_secs(args.duration), 32))?;
        println!(
            "fixed {} req/s {name:<18} p50 {:>7.3} ms  p99 {:>7.3} ms  ({} ok, {} errors; sent late by ≤ {:.0} µs at p99)",
            args.rate, l.p50_ms, l.p99_ms, l.ok, l.errors, l.send_lateness_p99_us
        );
        fixed.push((name, l));
    }
    let hwm = rss_kib(sidecar_pid, "VmHWM:").unwrap_or(0);
    let rss = rss_kib(sidecar_pid, "VmRSS:").unwrap_or(0);

    let _ = writeln!(
        table,
        "\n| target | p50 at {} req/s | p99 at {} req/s | added p50 | added p99 |",
        args.rate, args.rate
    );
    let _ = writeln!(table, "|---|---|---|---|---|");
    let d = &fixed[0].1;
    for (name, l) in &fixed {
        let _ = writeln!(
            table,
            "| {name} | {:.3} ms | {:.3} ms | {:+.0} µs | {:+.0} µs |",
            l.p50_ms,
            l.p99_ms,
            (l.p50_ms - d.p50_ms) * 1000.0,
            (l.p99_ms - d.p99_ms) * 1000.0
        );
    }
    let _ = writeln!(
        table,
        "\n(f)'s collector during the fixed-rate runs: {}",
        if reniced {
            "at nice 19 (a stand-in for a collector on other nodes)"
        } else {
            "on the same cores (renice failed)"
        }
    );
    let _ = writeln!(table, "sidecar RSS after load: {rss} KiB (peak {hwm} KiB)");

    if args.burst_requests > 0 {
        let n = args.burst_requests;
        let nginx_h2c = SocketAddr::from(([127, 0, 0, 1], nginx_h2c_port));
        let mut bursts = Vec::new();
        for (name, addr) in [("custos sidecar", sidecar_addr), ("nginx proxy", nginx_h2c)] {
            let r = h2load(&format!("http://{addr}{path}"), n, cgroups.as_ref())?;
            println!(
                "h2load {name:<18} {:>9.0} req/s  {} ok, {} failed, {} non-2xx, {} app connections opened, at most {} more open at once",
                r.rps, r.succeeded, r.failed, r.non_2xx, r.app_connections, r.app_peak_open
            );
            bursts.push((name, r));
        }
        let _ = writeln!(
            table,
            "\n| h2c burst: h2load -c32 -m256 -n {n} (8,192 streams in flight) | req/s | vs nginx | succeeded | failed | non-2xx | connections opened to the app | most open at once (beyond those open before) |"
        );
        let _ = writeln!(table, "|---|---|---|---|---|---|---|---|");
        let nginx_rps = bursts[1].1.rps;
        for (name, r) in &bursts {
            let _ = writeln!(
                table,
                "| {name} | {:.0} | {:.2}x | {} | {} | {} | {} | {} |",
                r.rps,
                r.rps / nginx_rps,
                r.succeeded,
                r.failed,
                r.non_2xx,
                r.app_connections,
                r.app_peak_open
            );
        }
    }

    if args.slow_clients > 0 {
        let rows = slow_uploads(&args, &dir, &key, upstream, cgroups.as_ref(), &mut guard)?;
        table.push_str(&rows);
    }
    if args.upload_clients > 0 {
        let rows = large_uploads(&args, &dir, &key, upstream, cgroups.as_ref(), &mut guard)?;
        table.push_str(&rows);
    }

    println!("\n{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, &table)?;
    }
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Connections to the app each slow-upload sidecar may open (an app server's worker pool).
const SLOW_UPLOAD_APP_CONNECTIONS: &str = "32";

/// (h) wrk's GETs through a sidecar as deployed (request bodies up to 64 KiB read before the
/// app is called) and through one forwarding bodies as they arrive (`--request-buffer-bytes
/// 0`), each first alone, then while `--slow-clients` trickle POST bodies; both may open
/// [`SLOW_UPLOAD_APP_CONNECTIONS`] connections to the app. Returns the table's rows.
fn slow_uploads(
    args: &Args,
    dir: &Path,
    key: &Path,
    upstream: SocketAddr,
    cgroups: Option<&Cgroups>,
    guard: &mut Guard,
) -> Result<String> {
    let common = ["--upstream-max-connections", SLOW_UPLOAD_APP_CONNECTIONS];
    let unbuffered = [&common[..], &["--request-buffer-bytes", "0"]].concat();
    let variants = [
        ("sidecar (bodies ≤ 64 KiB read first)", "uploads-buffered", &common[..]),
        ("sidecar, --request-buffer-bytes 0", "uploads-streamed", &unbuffered[..]),
    ];
    let path = "/customers/42";
    let (n, connections) = (args.slow_clients, 8);
    let mut out = format!(
        "\n| slow uploads: wrk -c{connections} GETs; {n} clients trickle {}-byte POST bodies at 1 byte/s; {SLOW_UPLOAD_APP_CONNECTIONS} connections to the app | 2xx req/s alone | 2xx req/s with the slow clients | ratio | p99 with them | errors with them |\n|---|---|---|---|---|---|\n",
        slow::BODY_BYTES
    );
    let mut served = Vec::new();
    for (label, name, extra) in variants {
        let spec = SidecarSpec { args: extra, ..SidecarSpec::new(name, slow::policy_yaml()) };
        let sc = start_sidecar(&args.custos, dir, key, spec, upstream, guard)?;
        if let Some(cgroups) = cgroups {
            cgroups.join("proxies", &[sc.pid])?;
        }
        let url = format!("http://{}{path}", sc.addr);
        let alone = wrk(&url, args.duration, connections, cgroups)?.ok_rps(args.duration);
        let slow = slow::SlowUploads::start(sc.addr, n)?;
        // Until every slow client's request has reached the sidecar.
        std::thread::sleep(Duration::from_secs(2));
        let with = wrk(&url, args.duration, connections, cgroups)?;
        drop(slow);
        let ok = with.ok_rps(args.duration);
        let p99 = if ok > 0.0 { format!("{:.3} ms", with.p99_ms) } else { "—".to_owned() };
        println!(
            "slow uploads {label:<38} alone {alone:>8.0} req/s, with {n} slow clients {ok:>8.0} req/s (2xx)  p99 {p99} {}",
            with.errors
        );
        let errors = if with.errors.is_empty() { "none" } else { &with.errors };
        let _ = writeln!(
            out,
            "| {label} | {alone:.0} | {ok:.0} | {:.2}x | {p99} | {errors} |",
            ok / alone.max(1.0)
        );
        served.push(ok);
    }
    let _ = writeln!(
        out,
        "\nwith the slow clients, 2xx req/s reading bodies first: {:.0}; forwarding them as they arrive: {:.0}",
        served[0], served[1]
    );
    Ok(out)
}

/// (i) 1 MiB multipart and JSON uploads through a sidecar checking them for `_method` on
/// their way, through the same with `--forward-unchecked-bodies`, and to the app directly:
/// MiB/s of bodies answered 2xx and the sidecar's CPU per MiB. Returns the table's rows.
fn large_uploads(
    args: &Args,
    dir: &Path,
    key: &Path,
    upstream: SocketAddr,
    cgroups: Option<&Cgroups>,
    guard: &mut Guard,
) -> Result<String> {
    let clients = args.upload_clients;
    let duration = Duration::from_secs(args.duration);
    let bodies = [uploads::body(true), uploads::body(false)];
    let mut out = format!(
        "\n| large uploads: {clients} clients POST {} KiB bodies | multipart MiB/s | sidecar CPU ms per MiB | JSON MiB/s | sidecar CPU ms per MiB | failed |\n|---|---|---|---|---|---|\n",
        uploads::BODY_BYTES / 1024
    );
    let mut measured = Vec::new();
    /// A sidecar's directory name and flags; none: the app directly.
    type Target<'a> = Option<(&'a str, &'a [&'a str])>;
    let variants: [(&str, Target<'_>); 3] = [
        ("app directly", None),
        ("sidecar, checked on the way", Some(("uploads-checked", &[]))),
        ("sidecar, --forward-unchecked-bodies", Some(("uploads-unchecked", &["--forward-unchecked-bodies"]))),
    ];
    for (label, sidecar) in variants {
        let (addr, pid) = match sidecar {
            None => (upstream, None),
            Some((name, extra)) => {
                let spec = SidecarSpec { args: extra, ..SidecarSpec::new(name, slow::policy_yaml()) };
                let sc = start_sidecar(&args.custos, dir, key, spec, upstream, guard)?;
                if let Some(cgroups) = cgroups {
                    cgroups.join("proxies", &[sc.pid])?;
                }
                (sc.addr, Some(sc.pid))
            }
        };
        let mut row = Vec::new();
        let mut failed = 0;
        for (content_type, body) in &bodies {
            let before = pid.map(|p| cpu_ns(&[p]));
            let done = uploads::run(addr, clients, duration, content_type, body)?;
            let cpu = pid.zip(before).map(|(p, b)| cpu_ns(&[p]).saturating_sub(b));
            let mib = done.ok as f64 * uploads::BODY_BYTES as f64 / (1024.0 * 1024.0);
            let per_mib = cpu.map(|ns| ns as f64 / 1e6 / mib.max(1e-9));
            row.push((done.mib_per_second(), per_mib));
            failed += done.failed;
        }
        let cpu = |c: Option<f64>| c.map_or("—".to_owned(), |ms| format!("{ms:.2}"));
        println!(
            "large uploads {label:<38} multipart {:>7.1} MiB/s, JSON {:>7.1} MiB/s, failed {failed}",
            row[0].0, row[1].0
        );
        let _ = writeln!(
            out,
            "| {label} | {:.1} | {} | {:.1} | {} | {failed} |",
            row[0].0,
            cpu(row[0].1),
            row[1].0,
            cpu(row[1].1)
        );
        measured.push(row);
    }
    let ratio = |kind: usize| measured[1][kind].0 / measured[2][kind].0.max(1e-9);
    let _ = writeln!(
        out,
        "\nchecked on the way vs. forwarded unchecked (same run): multipart {:.2}x, JSON {:.2}x",
        ratio(0),
        ratio(1)
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn result(rps: f64, cpu_us: Option<f64>) -> WrkResult {
        WrkResult { rps, p50_ms: 1.0, p99_ms: 2.0, errors: String::new(), non_2xx: 0, cpu_us }
    }

    #[test]
    fn audit_counts_sum_every_drop_reason() {
        let metrics = "# HELP custos_audit_events_emitted Audit events handed to the shipper.\n\
            custos_audit_events_emitted_total 120\n\
            custos_audit_events_delivered_total 100\n\
            custos_audit_events_duplicate_total 3\n\
            custos_audit_events_dropped_total{reason=\"queue_full\"} 15\n\
            custos_audit_events_dropped_total{reason=\"spool_full\"} 5\n\
            custos_audit_spool_events 7\n";
        assert_eq!(audit_counts(metrics), (120, 100, 20));
        assert_eq!(audit_counts(""), (0, 0, 0));
    }

    #[test]
    fn h2load_summaries() {
        let text = "starting benchmark...\n\
            finished in 6.51s, 30738.51 req/s, 62.15MB/s\n\
            requests: 200000 total, 200000 started, 200000 done, 194242 succeeded, 5758 failed, 0 errored, 0 timeout\n\
            status codes: 194000 2xx, 0 3xx, 12 4xx, 230 5xx\n";
        let r = parse_h2load(text).unwrap();
        assert_eq!((r.rps, r.succeeded, r.failed, r.non_2xx), (30738.51, 194242, 5758, 242));
        assert!(parse_h2load("finished in 1s, 10 req/s\n").is_none());
    }

    #[test]
    fn wrk_reports() {
        let text = "Running 10s test @ http://127.0.0.1:1/customers/42\n  2 threads and 8 connections\n\
            \x20 Latency Distribution\n     50%  312.00us\n     75%  400.00us\n     90%  1.20ms\n     99%    2.00s \n\
            \x20 250 requests in 10.01s, 1.00MB read\n\
            \x20 Socket errors: connect 0, read 0, write 0, timeout 8\n\
            \x20 Non-2xx or 3xx responses: 50\n\
            Requests/sec:     24.98\nTransfer/sec:    102.30KB\n";
        let r = parse_wrk(text).unwrap();
        assert_eq!((r.rps, r.p50_ms, r.p99_ms, r.non_2xx), (24.98, 0.312, 2000.0, 50));
        assert_eq!(
            r.errors,
            "Socket errors: connect 0, read 0, write 0, timeout 8; Non-2xx or 3xx responses: 50"
        );
        assert!((r.ok_rps(10) - 19.98).abs() < 1e-9);
        let clean = parse_wrk(&text.replace("  Non-2xx or 3xx responses: 50\n", "")).unwrap();
        assert_eq!((clean.non_2xx, clean.ok_rps(10)), (0, 24.98));
        assert!(parse_wrk("no figures").is_err());
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn ratios_are_taken_within_each_round() {
        // the machine halves its speed in round 2: every target slows down alike
        let rounds = vec![
            vec![result(100.0, None), result(40.0, Some(20.0)), result(50.0, Some(10.0))],
            vec![result(50.0, None), result(20.0, Some(22.0)), result(25.0, Some(12.0))],
            vec![result(90.0, None), result(45.0, Some(21.0)), result(50.0, Some(11.0))],
        ];
        let table = peak_table(&["direct", "sidecar", "nginx"], &rounds, 64);
        let sidecar = table.lines().find(|l| l.starts_with("| sidecar")).unwrap();
        // median req/s 40, vs nginx 0.8, 0.8, 0.9 per round: median 0.80, range 0.80–0.90
        assert_eq!(sidecar, "| sidecar | 40 | 1.000 ms | 2.000 ms | 0.40x | 0.80x (0.80–0.90) | 21.0 µs |");
        let direct = table.lines().find(|l| l.starts_with("| direct")).unwrap();
        assert!(direct.ends_with("| — |"), "{direct}");
    }
}
