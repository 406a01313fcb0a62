//! `concierge`: parse the configuration, start the server, stop it cleanly on SIGTERM/SIGINT.
//! Exits 0 after a clean stop, 1 when start-up fails (the log says why).
use std::process::ExitCode;

use clap::Parser;
use concierge_server::{config::Config, start};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    concierge_server::telemetry::init_logging(config.log_format);
    tracing::info!(?config, "starting concierge");
    let result = async {
        let mut running = start(config).await?;
        tokio::select! {
            r = running.wait() => return r,
            _ = shutdown_signal() => {}
        }
        running.shutdown().await
    }
    .await;
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
