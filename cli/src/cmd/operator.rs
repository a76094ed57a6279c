//! `custos operator`: the DataAccessPolicy controller and the admission webhooks.

use std::process::ExitCode;

/// Arguments of `custos operator` (every flag also reads the environment variable named in its
/// help).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    operator: custos_operator::args::OperatorArgs,
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = args.operator.into_config()?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("custos-operator").build()?;
    let telemetry = crate::serve::init_telemetry("custos-operator");
    let result = runtime.block_on(async {
        let running = custos_operator::start(config).await?;
        let failed = tokio::select! {
            () = crate::serve::wait_for_signal() => false,
            failed = running.failed() => {
                tracing::error!(error = %failed, "operator stopped");
                true
            }
        };
        running.shutdown().await;
        anyhow::Ok(failed)
    });
    drop(runtime);
    telemetry.shutdown();
    // A part that failed (the webhook server, say) ends the process non-zero, so that the
    // pod shows Error and restarts count, not Completed.
    Ok(if result? { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
