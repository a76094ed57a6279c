//! `custos sidecar`: the enforcing proxy in front of a protected app.

use std::process::ExitCode;

/// Arguments of `custos sidecar` (every flag also reads a `CUSTOS_*` environment variable).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    sidecar: custos_sidecar::SidecarArgs,
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // With proxy threads (the default) requests are served on their own runtimes; this one
    // only runs the config watcher, the admin server, the usage sync and the audit shipper.
    if args.sidecar.proxy_threads != Some(0) {
        builder.worker_threads(1);
    }
    let runtime = builder.enable_all().thread_name("custos-sidecar").build()?;
    let telemetry = crate::serve::init_telemetry("custos-sidecar");
    let result = runtime.block_on(async {
        let running = custos_sidecar::start(args.sidecar.into_settings()?).await?;
        crate::serve::wait_for_signal().await;
        running.shutdown().await?;
        anyhow::Ok(())
    });
    drop(runtime);
    telemetry.shutdown();
    result?;
    Ok(ExitCode::SUCCESS)
}
