//! `concierge`: parse the configuration, start the server, stop it cleanly on SIGTERM/SIGINT.
//! Exits 0 after a clean stop, 1 when start-up fails (the log says why).
//!
//! `concierge train-tagger …` / `concierge eval-tagger …` train and score the entity tagger
//! (`concierge ensemble-tagger …` assembles several into one, `concierge average-tagger …`
//! averages checkpoints along one run),
//! `concierge train-intent …` / `concierge eval-intent …` the intent classifier,
//! instead (see `concierge train-tagger --help`).
use std::process::ExitCode;

use clap::Parser;
use concierge_server::{config::Config, start};

/// The offline commands beside serving.
#[derive(clap::Parser)]
#[command(name = "concierge")]
enum Command {
    /// Train a BiLSTM-CRF entity tagger (ATIS slots over the text encoder, or MSRA NER over characters).
    TrainTagger(concierge_train::tagger::TrainTagger),
    /// Score a tagger checkpoint on a test file (conlleval: entity-level P/R/F1, per label).
    EvalTagger(concierge_train::tagger::EvalTagger),
    /// Assemble an ensemble tagger from taggers trained apart (same settings, own seeds).
    EnsembleTagger(concierge_train::tagger::EnsembleTagger),
    /// Average the weights of checkpoints along one training run, the dev split choosing.
    AverageTagger(concierge_train::tagger::AverageTagger),
    /// Train an intent classifier (Banking77, CLINC150 or JSONL with images) over the text encoder.
    TrainIntent(concierge_train::intent::TrainIntent),
    /// Score an intent checkpoint: accuracy, macro-F1, handoff, CLINC150's out-of-scope figures.
    EvalIntent(concierge_train::intent::EvalIntent),
}

fn offline(cmd: Command) -> ExitCode {
    let result = match cmd {
        Command::TrainTagger(args) => concierge_train::tagger::train(&args),
        Command::EvalTagger(args) => concierge_train::tagger::eval(&args).map(|_| ()),
        Command::EnsembleTagger(args) => concierge_train::tagger::ensemble(&args),
        Command::AverageTagger(args) => concierge_train::tagger::average(&args),
        Command::TrainIntent(args) => concierge_train::intent::train(&args).map(|_| ()),
        Command::EvalIntent(args) => concierge_train::intent::eval(&args).map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    if std::env::args().nth(1).is_some_and(|a| matches!(a.as_str(), "train-tagger" | "eval-tagger" | "ensemble-tagger" | "average-tagger" | "train-intent" | "eval-intent")) {
        tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        ).init();
        return offline(Command::parse());
    }
    serve()
}

#[tokio::main]
async fn serve() -> ExitCode {
    let config = match Config::from_args_and_file() {
        Ok(c) => c,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap_error) => clap_error.exit(),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        },
    };
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
