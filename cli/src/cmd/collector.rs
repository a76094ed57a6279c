//! `custos collector`: the central audit collector.

use std::process::ExitCode;

/// Arguments of `custos collector` (every flag also reads a `CUSTOS_COLLECTOR_*` environment
/// variable).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    collector: custos_collector::CollectorArgs,
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("custos-collector").build()?;
    let telemetry = crate::serve::init_telemetry("custos-collector");
    let result = runtime.block_on(async {
        let config = args.collector.into_config().map_err(anyhow::Error::msg)?;
        let running = custos_collector::start(config).await?;
        crate::serve::wait_for_signal().await;
        running.shutdown().await;
        anyhow::Ok(())
    });
    drop(runtime);
    telemetry.shutdown();
    result?;
    Ok(ExitCode::SUCCESS)
}
