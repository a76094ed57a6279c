//! What the long-running commands (`custos operator`, `custos sidecar`, `custos collector`)
//! share at the binary edge: JSON logs, optional OpenTelemetry trace export, and waiting for
//! the signal to stop.

use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes pending spans.
pub(crate) struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the trace exporter, if any. Call it outside the async runtime.
    pub(crate) fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("warning: flushing traces: {error}");
        }
    }
}

/// JSON logs to stderr, filtered by `RUST_LOG` (default `info`); when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans are
/// also exported there as OTLP/HTTP protobuf, with `service.name` from `OTEL_SERVICE_NAME` or
/// `default_service`. Call it before starting the async runtime (the exporter's HTTP client
/// is a blocking one on its own thread). Does nothing if a subscriber is already set.
pub(crate) fn init_telemetry(default_service: &str) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_current_span(false);
    let endpoint_set = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()));
    let provider = if endpoint_set {
        match otlp_provider(default_service) {
            Ok(provider) => Some(provider),
            Err(error) => {
                eprintln!("warning: OpenTelemetry trace export disabled: {error}");
                None
            }
        }
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("custos")));
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
    Telemetry { provider }
}

fn otlp_provider(default_service: &str) -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build()?;
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default_service.to_string());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Resolves on SIGTERM or SIGINT (SIGINT only where SIGTERM cannot be listened for).
pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; waiting for SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
