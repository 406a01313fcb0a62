//! Starting and stopping the whole server: metrics endpoint, model loading, the gRPC services
//! (with health and reflection), graceful shutdown that drains in-flight work.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use concierge_engine::{BatchLimits, Device as EngineDevice, Engine};
use concierge_kb::store::{Store, StoreOptions};
use concierge_models::ModelSource;
use concierge_proto::v1::embeddings_server::EmbeddingsServer;
use concierge_proto::v1::entities_server::EntitiesServer;
use concierge_proto::v1::intents_server::IntentsServer;
use concierge_proto::v1::knowledge_base_server::KnowledgeBaseServer;
use concierge_proto::v1::models_server::ModelsServer;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::grpc::embeddings::EmbeddingsService;
use crate::grpc::EdgeLayer;
use crate::grpc::models::ModelsService;
use crate::loader::{self, Install};
use crate::registry::{ModelSlot, Registry, SlotName};
use crate::state::AppState;
use crate::telemetry;
use crate::grpc::knowledge_base::KnowledgeBaseService;
use crate::kb::{LocalStore, VectorStore};
use crate::entities::CharTaggerLane;
use crate::grpc::entities::EntitiesService;
use crate::grpc::intents::IntentsService;
use crate::image::ImageLane;
use crate::text::TextLane;

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
    // One device thread runs every model's batches, the lanes taking turns.
    let gpu = EngineDevice::start("model")?;
    let text = Arc::new(TextLane { engine: Engine::on(&gpu, "text", limits.clone())? });
    let tower = |dir: &Option<std::path::PathBuf>, lane: &'static str| -> anyhow::Result<Arc<TextLane>> {
        Ok(match dir {
            Some(_) => Arc::new(TextLane { engine: Engine::on(&gpu, lane, limits.clone())? }),
            None => text.clone(),
        })
    };
    let image = match config.no_image_model {
        true => None,
        false => {
            let image_limits = BatchLimits {
                max_batch_size: config.max_image_batch_size,
                max_batch_cost: config.max_image_batch_size,
                max_wait: Duration::from_millis(config.max_image_wait_ms),
                max_queued: config.max_queued_images,
            };
            Some(Arc::new(ImageLane {
                engine: Engine::on(&gpu, "image", image_limits)?,
                decoders: Arc::new(tokio::sync::Semaphore::new(config.image_decode_threads())),
                limits: crate::image::limits_of(&config),
            }))
        }
    };
    let char_tagger = Arc::new(CharTaggerLane { engine: Engine::on(&gpu, "entities", limits.clone())? });
    let admin_token = config.admin_token()?;
    let state = Arc::new(AppState {
        registry: Registry::new(device.clone()),
        device: device.clone(),
        char_tagger,
        query_tower: tower(&config.query_model_dir, "query")?,
        document_tower: tower(&config.document_model_dir, "document")?,
        text,
        image,
        kb: ModelSlot::empty("the knowledge base"),
        config,
    });
    // Before any call is served: which optional heads are on their way (see Slots::expected).
    state.registry.change(|slots| {
        let cfg = &state.config;
        slots.expected = [(SlotName::Tagger, !cfg.no_entity_model), (SlotName::Intent, !cfg.no_intent_model)]
            .into_iter()
            .filter_map(|(slot, on)| on.then_some(slot))
            .collect();
        Ok(())
    })?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::NotServing).await;
    health.set_not_serving::<EmbeddingsServer<EmbeddingsService>>().await;
    health.set_not_serving::<KnowledgeBaseServer<KnowledgeBaseService>>().await;
    health.set_not_serving::<EntitiesServer<EntitiesService>>().await;
    health.set_not_serving::<IntentsServer<IntentsService>>().await;
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
    let knowledge_base = KnowledgeBaseServer::new(KnowledgeBaseService::new(state.clone()))
        .max_decoding_message_size(state.config.max_message_bytes);
    let entities = EntitiesServer::new(EntitiesService::new(state.clone()))
        .max_decoding_message_size(state.config.max_message_bytes);
    let intents = IntentsServer::new(IntentsService::new(state.clone()))
        .max_decoding_message_size(state.config.max_message_bytes);
    if admin_token.is_none() {
        tracing::info!("no admin token set (--admin-token-file or CONCIERGE_ADMIN_TOKEN): the Models admin API refuses every call");
    }
    let models = ModelsServer::new(ModelsService::new(state.clone(), admin_token));

    // Model loading runs beside the server; a failure ends the server with the loader's message.
    let (ready_tx, ready_rx) = watch::channel(false);
    let (fail_tx, fail_rx) = oneshot::channel::<anyhow::Error>();
    {
        let (state, health) = (state.clone(), health.clone());
        tokio::spawn(async move {
            let st = state.clone();
            let loaded = tokio::task::spawn_blocking(move || load(&st)).await;
            match loaded {
                Ok(Ok(())) => {
                    health.set_serving::<EmbeddingsServer<EmbeddingsService>>().await;
                    health.set_serving::<KnowledgeBaseServer<KnowledgeBaseService>>().await;
                    health.set_serving::<EntitiesServer<EntitiesService>>().await;
                    health.set_serving::<IntentsServer<IntentsService>>().await;
                    health.set_service_status("", ServingStatus::Serving).await;
                    let _ = ready_tx.send(true);
                    tracing::info!("models loaded; serving");
                    // Candidates the config file names load beside serving; a refused one is
                    // logged and the active versions serve on.
                    for c in state.config.candidates.clone() {
                        let st = state.clone();
                        let r = tokio::task::spawn_blocking(move || start_candidate(&st, &c)).await;
                        if let Ok(Err(e)) = r {
                            tracing::error!(error = %e, "a candidate in the config file was not loaded");
                        }
                    }
                }
                Ok(Err(e)) => {
                    let _ = fail_tx.send(e);
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
            health.set_not_serving::<KnowledgeBaseServer<KnowledgeBaseService>>().await;
            health.set_not_serving::<EntitiesServer<EntitiesService>>().await;
            health.set_not_serving::<IntentsServer<IntentsService>>().await;
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
        .add_service(knowledge_base)
        .add_service(entities)
        .add_service(intents)
        .add_service(models)
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
        tokio::task::spawn_blocking(move || {
            let s = engine_state;
            for lane in [&s.text, &s.query_tower, &s.document_tower] {
                lane.engine.shutdown();
            }
            if let Some(image) = &s.image {
                image.engine.shutdown();
            }
            s.char_tagger.engine.shutdown();
            // Writes already queued are committed before the store stops.
            if let Ok(kb) = s.kb.get() {
                kb.shutdown();
            }
        })
        .await?;
        if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        result
    });
    Ok(Running { grpc_addr, metrics_addr, state, stop: Some(stop_tx), ready: ready_rx, task })
}

/// Loads every model into its slot and opens the knowledge base (recovering it from its log).
/// Runs on a blocking thread while the server already answers health checks. Each model takes
/// the admin API's load path (checks and a warm-up pass), as the active version.
fn load(state: &AppState) -> anyhow::Result<()> {
    let cfg = &state.config;
    let label = |slot: SlotName| cfg.version_label(slot.as_str());
    let load = |slot: SlotName, source: ModelSource, hint: &str| -> anyhow::Result<()> {
        loader::load_into(state, slot, &source, label(slot), Install::Active)
            .map_err(|e| anyhow::anyhow!("{e} ({hint})"))?;
        metrics::gauge!("concierge_model_ready", "slot" => slot.as_str()).set(1.0);
        Ok(())
    };
    // The image model first: whether the intent model may fuse images depends on it; then the
    // text encoder, which the heads are checked against.
    if state.image.is_some() {
        load(SlotName::ImageEncoder, cfg.image_model_source(),
            "run scripts/fetch-default-model.sh for the default, or start with --no-image-model to serve text only")?;
    }
    load(SlotName::TextEncoder, cfg.model_source(), "the text model")?;
    for (slot, dir) in [(SlotName::QueryTower, &cfg.query_model_dir), (SlotName::DocumentTower, &cfg.document_model_dir)] {
        match dir {
            Some(dir) => load(slot, ModelSource::Dir(dir.clone()), "the knowledge base tower")?,
            // The text encoder's version serves as the tower; swapping the text encoder later
            // does not move the knowledge base's vector space.
            None => {
                state.registry.change(|slots| {
                    let v = slots.text.active.clone();
                    match slot {
                        SlotName::QueryTower => slots.query.active = v,
                        _ => slots.document.active = v,
                    }
                    Ok(())
                })?;
            }
        }
    }
    if !cfg.no_entity_model {
        load(SlotName::Tagger, ModelSource::Dir(cfg.entity_model_dir.clone()), "start with --no-entity-model to serve without one")?;
    }
    if !cfg.no_intent_model {
        load(SlotName::Intent, ModelSource::Dir(cfg.intent_model_dir.clone()), "start with --no-intent-model to serve without one")?;
    }

    let t0 = std::time::Instant::now();
    let opts = StoreOptions { snapshot_after_bytes: cfg.kb_snapshot_mb << 20, ..StoreOptions::default() };
    let (store, recovery) = Store::open(&cfg.kb_dir, opts)
        .map_err(|e| anyhow::anyhow!("cannot open the knowledge base in {}: {e}", cfg.kb_dir.display()))?;
    let documents: usize = store.collections().iter().map(|c| c.len()).sum();
    tracing::info!(dir = %cfg.kb_dir.display(), ?recovery, documents, secs = t0.elapsed().as_secs_f64(), "knowledge base opened");
    let limits = BatchLimits {
        max_batch_size: cfg.kb_max_search_batch,
        max_batch_cost: cfg.kb_max_search_batch,
        max_wait: Duration::ZERO,
        max_queued: cfg.max_queued_inputs,
    };
    let kb: Arc<dyn VectorStore> = Arc::new(LocalStore::new(store, limits)?);
    state.kb.replace(kb);
    Ok(())
}

/// Loads a candidate the config file names and gives it its traffic share.
fn start_candidate(state: &AppState, c: &crate::config::StartCandidate) -> anyhow::Result<()> {
    let slot = SlotName::parse(&c.slot)?;
    loader::load_into(state, slot, &c.source, Some(&c.version), Install::Candidate)?;
    let share = (c.traffic_percent / 100.0 * crate::registry::BUCKETS as f32).round() as u32;
    if share > 0 {
        state.registry.change(|slots| slots.promote(slot, share))?;
    }
    tracing::info!(%slot, version = %c.version, traffic_percent = c.traffic_percent, "candidate from the config file loaded");
    Ok(())
}
