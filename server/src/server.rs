//! Starting and stopping the whole server: metrics endpoint, model loading, the gRPC services
//! (with health and reflection), graceful shutdown that drains in-flight work.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use concierge_engine::{BatchLimits, Engine};
use concierge_models::TextEncoder;
use concierge_proto::v1::embeddings_server::EmbeddingsServer;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::grpc::embeddings::EmbeddingsService;
use crate::grpc::EdgeLayer;
use crate::registry::ModelSlot;
use crate::state::AppState;
use crate::telemetry;
use crate::text::TextModel;

/// A started server. [`Running::shutdown`] stops it and waits; dropping it starts the same
/// shutdown without waiting for it.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    ready: watch::Receiver<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the models are loaded and the health service says SERVING.
    pub async fn ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let mut ready = self.ready.clone();
        tokio::time::timeout(timeout, ready.wait_for(|r| *r))
            .await
            .context("server did not become ready in time")?
            .context("server stopped before it became ready")?;
        Ok(())
    }

    /// Stops accepting, drains in-flight work, and waits for the server to end.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await?
    }

    /// Waits for the server to end by itself (a failed model load ends it).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.task).await?
    }
}

/// Binds the sockets, starts loading the models in the background and serves until
/// [`Running::shutdown`]. Health reports NOT_SERVING until the models are loaded.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    config.validate()?;
    let device = config.candle_device()?;
    let metrics_addr = telemetry::serve_metrics(config.metrics_listen, telemetry::recorder())
        .await
        .with_context(|| format!("cannot listen for metrics on {}", config.metrics_listen))?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.listen))?;
    let grpc_addr = listener.local_addr()?;

    let limits = BatchLimits {
        max_batch_size: config.max_batch_size,
        max_batch_cost: config.max_batch_tokens,
        max_wait: config.max_wait(),
        max_queued: config.max_queued_inputs,
    };
    let state = Arc::new(AppState {
        text: ModelSlot::empty("text"),
        text_engine: Engine::start("text", limits)?,
        config,
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::NotServing).await;
    health.set_not_serving::<EmbeddingsServer<EmbeddingsService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(concierge_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(concierge_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let embeddings = EmbeddingsServer::new(EmbeddingsService::new(state.clone()))
        .max_decoding_message_size(state.config.max_message_bytes);

    // Model loading runs beside the server; a failure ends the server with the loader's message.
    let (ready_tx, ready_rx) = watch::channel(false);
    let (fail_tx, fail_rx) = oneshot::channel::<anyhow::Error>();
    {
        let (state, health) = (state.clone(), health.clone());
        tokio::spawn(async move {
            let cfg = state.config.clone();
            let loaded = tokio::task::spawn_blocking(move || {
                TextEncoder::load(&cfg.model_source(), &device, cfg.dtype.to_candle(), cfg.max_input_tokens)
            })
            .await;
            match loaded {
                Ok(Ok(encoder)) => {
                    state.text.replace(Arc::new(TextModel { encoder }));
                    metrics::gauge!("concierge_model_ready", "slot" => "text").set(1.0);
                    health.set_serving::<EmbeddingsServer<EmbeddingsService>>().await;
                    health.set_service_status("", ServingStatus::Serving).await;
                    let _ = ready_tx.send(true);
                    tracing::info!("models loaded; serving");
                }
                Ok(Err(e)) => {
                    let _ = fail_tx.send(anyhow::Error::new(e).context("cannot load the text model"));
                }
                Err(e) => {
                    let _ = fail_tx.send(anyhow::anyhow!("model loading panicked: {e}"));
                }
            }
        });
    }

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let failure = Arc::new(std::sync::Mutex::new(None::<anyhow::Error>));
    let stopping = Arc::new(tokio::sync::Notify::new());
    let signal = {
        let (health, failure, stopping) = (health.clone(), failure.clone(), stopping.clone());
        async move {
            tokio::select! {
                _ = stop_rx => {}
                Ok(e) = fail_rx => { *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e); }
            }
            // Say so first, so load balancers move away while we drain.
            health.set_service_status("", ServingStatus::NotServing).await;
            health.set_not_serving::<EmbeddingsServer<EmbeddingsService>>().await;
            tracing::info!("shutting down: no new calls; draining in-flight work");
            stopping.notify_one();
        }
    };
    let serve = tonic::transport::Server::builder()
        .layer(EdgeLayer)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(embeddings)
        .serve_with_incoming_shutdown(
            // Small unary messages must not wait on Nagle + delayed ACK (~40 ms a call).
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            signal,
        );
    tracing::info!(%grpc_addr, %metrics_addr, "concierge listening");

    let st = state.clone();
    let task = tokio::spawn(async move {
        let grace = Duration::from_secs(st.config.shutdown_grace_secs);
        let mut served = tokio::spawn(serve);
        let flat = |r: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>| -> anyhow::Result<()> {
            Ok(r??)
        };
        let result = tokio::select! {
            r = &mut served => flat(r),
            _ = stopping.notified() => match tokio::time::timeout(grace, &mut served).await {
                Ok(r) => flat(r),
                Err(_) => {
                    tracing::warn!(?grace, "in-flight calls did not finish within the grace period; exiting anyway");
                    served.abort();
                    Ok(())
                }
            },
        };
        // Everything admitted is answered before the device thread stops.
        let engine_state = st.clone();
        tokio::task::spawn_blocking(move || engine_state.text_engine.shutdown()).await?;
        if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        result
    });
    Ok(Running { grpc_addr, metrics_addr, state, stop: Some(stop_tx), ready: ready_rx, task })
}
