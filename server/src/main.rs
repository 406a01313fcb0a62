//! `concierge`: parse the configuration, start the server, stop it cleanly on SIGTERM/SIGINT.
use clap::Parser;
use concierge_server::{config::Config, start};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    concierge_server::telemetry::init_logging(config.log_format);
    tracing::info!(?config, "starting concierge");
    let mut running = match start(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e:#}");
            return Err(e);
        }
    };
    tokio::select! {
        r = running.wait() => {
            if let Err(e) = &r {
                tracing::error!("{e:#}");
            }
            return r;
        }
        _ = shutdown_signal() => {}
    }
    let r = running.shutdown().await;
    tracing::info!("stopped");
    r
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
