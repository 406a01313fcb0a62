//! Starting and stopping the whole server: metrics endpoint, model loading, the gRPC services
//! (with health and reflection), graceful shutdown that drains in-flight work.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use concierge_engine::{BatchLimits, Device as EngineDevice, Engine};
use concierge_kb::store::{Store, StoreOptions};
use concierge_models::intent::{IntentFormat, IntentModel};
use concierge_models::tagger::InputKind;
use concierge_models::{BiLstmCrf, ImageEncoder, ModelInfo, ModelSource, TextEncoder};
use concierge_proto::v1::embeddings_server::EmbeddingsServer;
use concierge_proto::v1::entities_server::EntitiesServer;
use concierge_proto::v1::intents_server::IntentsServer;
use concierge_proto::v1::knowledge_base_server::KnowledgeBaseServer;
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
use crate::grpc::knowledge_base::KnowledgeBaseService;
use crate::kb::{LocalStore, VectorStore};
use crate::entities::{CharTagger, CharTaggerLane, Route};
use crate::grpc::entities::EntitiesService;
use crate::grpc::intents::IntentsService;
use crate::image::{ImageLane, ImageModel};
use crate::text::{IntentHead, TextLane, TextModel};

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
    let text = Arc::new(TextLane { slot: ModelSlot::empty("the text model"), engine: Engine::on(&gpu, "text", limits.clone())? });
    let tower = |dir: &Option<std::path::PathBuf>, name: &'static str, lane: &'static str| -> anyhow::Result<Arc<TextLane>> {
        Ok(match dir {
            Some(_) => Arc::new(TextLane { slot: ModelSlot::empty(name), engine: Engine::on(&gpu, lane, limits.clone())? }),
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
                slot: ModelSlot::empty("the image model"),
                engine: Engine::on(&gpu, "image", image_limits)?,
                decoders: Arc::new(tokio::sync::Semaphore::new(config.image_decode_threads())),
                limits: crate::image::limits_of(&config),
            }))
        }
    };
    let char_tagger = Arc::new(CharTaggerLane {
        slot: ModelSlot::empty("the entity tagger"),
        engine: Engine::on(&gpu, "entities", limits.clone())?,
    });
    let state = Arc::new(AppState {
        entity_route: ModelSlot::empty("the entity tagger"),
        char_tagger,
        query_tower: tower(&config.query_model_dir, "the query tower", "query")?,
        document_tower: tower(&config.document_model_dir, "the document tower", "document")?,
        text,
        image,
        kb: ModelSlot::empty("the knowledge base"),
        config,
    });

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

    // Model loading runs beside the server; a failure ends the server with the loader's message.
    let (ready_tx, ready_rx) = watch::channel(false);
    let (fail_tx, fail_rx) = oneshot::channel::<anyhow::Error>();
    {
        let (state, health) = (state.clone(), health.clone());
        tokio::spawn(async move {
            let st = state.clone();
            let loaded = tokio::task::spawn_blocking(move || load(&st, &device)).await;
            match loaded {
                Ok(Ok(())) => {
                    health.set_serving::<EmbeddingsServer<EmbeddingsService>>().await;
                    health.set_serving::<KnowledgeBaseServer<KnowledgeBaseService>>().await;
                    health.set_serving::<EntitiesServer<EntitiesService>>().await;
                    health.set_serving::<IntentsServer<IntentsService>>().await;
                    health.set_service_status("", ServingStatus::Serving).await;
                    let _ = ready_tx.send(true);
                    tracing::info!("models loaded; serving");
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

/// Loads every model and opens the knowledge base (recovering it from its log), filling the
/// slots. Runs on a blocking thread while the server already answers health checks.
fn load(state: &AppState, device: &candle_core::Device) -> anyhow::Result<()> {
    let cfg = &state.config;
    // The image model first: whether the intent model may fuse images depends on it.
    let image = match &state.image {
        None => None,
        Some(_) => {
            let source = cfg.image_model_source();
            let enc = ImageEncoder::load(&source, device, cfg.dtype.to_candle()).context(
                "cannot load the image model (run scripts/fetch-default-model.sh for the default, or start with --no-image-model to serve text only)",
            )?;
            tracing::info!(id = %enc.info().id, version = %enc.info().version, dim = enc.info().dimension,
                moderation = enc.has_moderation(), "image model loaded");
            Some(enc)
        }
    };
    let encoder = |source: ModelSource| TextEncoder::load(&source, device, cfg.dtype.to_candle(), cfg.max_input_tokens);
    let text = encoder(cfg.model_source()).context("cannot load the text model")?;
    let tagger = match cfg.no_entity_model {
        true => None,
        false => Some(load_tagger(cfg, device, text.info())?),
    };
    let intent = match cfg.no_intent_model {
        true => None,
        false => Some(load_intent(cfg, device, &text, image.as_ref())?),
    };
    let route = match &tagger {
        None => Route::Off,
        Some((t, info)) if t.config().input == InputKind::Encoder => Route::Encoder(info.clone()),
        Some(_) => Route::Chars,
    };
    let (text_tagger, char_tagger) = match tagger {
        Some((t, _)) if route != Route::Chars => (Some(t), None),
        Some((t, info)) => (None, Some(CharTagger { tagger: t, device: device.clone(), info })),
        None => (None, None),
    };
    state.text.slot.replace(Arc::new(TextModel { encoder: text, tagger: text_tagger, intent }));
    if let Some(c) = char_tagger {
        state.char_tagger.slot.replace(Arc::new(c));
    }
    state.entity_route.replace(Arc::new(route));
    metrics::gauge!("concierge_model_ready", "slot" => "text").set(1.0);
    for (lane, dir, what) in [
        (&state.query_tower, &cfg.query_model_dir, "query"),
        (&state.document_tower, &cfg.document_model_dir, "document"),
    ] {
        if let Some(dir) = dir {
            let enc = encoder(ModelSource::Dir(dir.clone())).with_context(|| format!("cannot load the {what} tower"))?;
            lane.slot.replace(Arc::new(TextModel { encoder: enc, tagger: None, intent: None }));
            metrics::gauge!("concierge_model_ready", "slot" => what).set(1.0);
        }
    }
    if let (Some(lane), Some(enc)) = (&state.image, image) {
        lane.slot.replace(Arc::new(ImageModel { encoder: enc }));
        metrics::gauge!("concierge_model_ready", "slot" => "image").set(1.0);
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

/// Loads the entity tagger; one that reads encoder states must have been trained on the text
/// model now loaded (its config names the encoder's id and version).
fn load_tagger(cfg: &crate::config::Config, device: &candle_core::Device, text: &ModelInfo) -> anyhow::Result<(BiLstmCrf, ModelInfo)> {
    let dir = &cfg.entity_model_dir;
    let tagger = BiLstmCrf::load(dir, device, candle_core::DType::F32).with_context(|| {
        format!("cannot load the entity tagger from {} (start with --no-entity-model to serve without one)", dir.display())
    })?;
    let weights = dir.join("model.safetensors");
    let version = concierge_models::checkpoint::weights_version(&[&weights])?;
    let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string());
    if tagger.config().input == InputKind::Encoder {
        let trained_on = tagger.config().extra.get("encoder").and_then(|e| e.get("version")).and_then(|v| v.as_str());
        match trained_on {
            Some(v) if v == text.version => {}
            Some(v) => anyhow::bail!(
                "the entity tagger in {} was trained on the states of text model version {v}, but the text model loaded is {} {}; \
                 retrain it on this model (concierge train-tagger --encoder-dir ...) or start with --no-entity-model",
                dir.display(), text.id, text.version
            ),
            None => tracing::warn!(dir = %dir.display(), "the entity tagger does not say which text model it was trained on"),
        }
    }
    let dim = tagger.config().input_dim;
    tracing::info!(dir = %dir.display(), %version, input = ?tagger.config().input, tags = tagger.tags().len(), "entity tagger loaded");
    Ok((tagger, ModelInfo { id, version, dimension: dim, max_input_tokens: 0 }))
}

/// Loads the intent model; it must read the states of the text model now loaded. A concierge
/// checkpoint names the encoder version it was trained on; a Hugging Face
/// BertForSequenceClassification folder carries its own encoder, so it must be the text model.
/// A fusion block fuses images only from the image model it was trained on; otherwise the model
/// serves text only (a warning says why).
fn load_intent(cfg: &Config, device: &candle_core::Device, text: &TextEncoder, image: Option<&ImageEncoder>) -> anyhow::Result<IntentHead> {
    let dir = &cfg.intent_model_dir;
    let model = IntentModel::load(dir, device).with_context(|| {
        format!("cannot load the intent model from {} (start with --no-intent-model to serve without one)", dir.display())
    })?;
    let version = concierge_models::checkpoint::weights_version(&[&dir.join("model.safetensors")])?;
    let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string());
    let t = text.info();
    match &model.config().encoder {
        Some(e) if e.version == t.version => {}
        Some(e) => anyhow::bail!(
            "the intent model in {} was trained on the states of text model {} {}, but the text model loaded is {} {}; \
             retrain it on this model (concierge train-intent --encoder-dir ...) or start with --no-intent-model",
            dir.display(), e.id, e.version, t.id, t.version
        ),
        None if model.format() == IntentFormat::HfSequenceClassification => {
            // Its classifier reads its own encoder's states: the same weights must be serving.
            let same_dir = cfg.model_id.is_none()
                && matches!((dir.canonicalize(), cfg.model_dir.canonicalize()), (Ok(a), Ok(b)) if a == b);
            anyhow::ensure!(
                same_dir || version == t.version,
                "the intent model in {} is a Hugging Face BertForSequenceClassification: its classifier reads the states of \
                 its own encoder, not those of the text model loaded ({} {}); serve that folder as the text model too \
                 (--model-dir {}), or train an intent model on this text model (concierge train-intent --encoder-dir ...), \
                 or start with --no-intent-model",
                dir.display(), t.id, t.version, dir.display()
            );
        }
        None => tracing::warn!(dir = %dir.display(), "the intent model does not say which text model it was trained on"),
    }
    anyhow::ensure!(
        model.config().input_dim == text.hidden_size(),
        "the intent model in {} reads token states of width {}, but the text model's are {}; start with --no-intent-model \
         or an intent model trained on this text model",
        dir.display(), model.config().input_dim, text.hidden_size()
    );
    if let Some(tap) = model.tap() {
        anyhow::ensure!(tap <= text.num_layers(),
            "the intent model in {} continues from layer {tap}, but the text model has {} layers", dir.display(), text.num_layers());
    }
    let no_images = match (model.image_channels(), &model.config().image_encoder, image) {
        (None, _, _) => Some("this intent model reads text only (it has no fusion block)".to_string()),
        (Some(_), _, None) => Some("this server runs no image model (--no-image-model), so the intent model reads text only".into()),
        (Some(_), None, Some(_)) => {
            Some("the intent model's fusion block does not name the image model it was trained on, so it reads text only".into())
        }
        (Some(_), Some(want), Some(img)) if want.version != img.info().version => Some(format!(
            "the intent model's fusion block was trained on image model {} {}, not the {} {} loaded, so it reads text only",
            want.id, want.version, img.info().id, img.info().version
        )),
        (Some(c), Some(_), Some(img)) if c != img.info().dimension => Some(format!(
            "the intent model's fusion block takes {c} image channels, but the image model loaded gives {}, so it reads text only",
            img.info().dimension
        )),
        _ => None,
    };
    if let (Some(why), true) = (&no_images, model.has_fusion()) {
        tracing::warn!(dir = %dir.display(), "{why}; queries with images get INVALID_ARGUMENT");
    }
    tracing::info!(dir = %dir.display(), %version, format = ?model.format(), labels = model.labels().len(), tap = ?model.tap(),
        fuses_images = no_images.is_none(), threshold = model.config().handoff_threshold, "intent model loaded");
    let info = ModelInfo { id, version, dimension: model.labels().len(), max_input_tokens: 0 };
    Ok(IntentHead { model, info, no_images })
}
