//! `concierge.v1.Models`: the admin API for checkpoint hot swap (list, load a candidate,
//! promote with a traffic share, roll back).
//!
//! It is served on the gRPC port beside the other services, behind a bearer token: one port to
//! deploy, health-check and put TLS in front of, and the admin calls are as reachable as the
//! model they change is. Each call must bear `authorization: Bearer <token>`; a missing token
//! is UNAUTHENTICATED, a wrong one PERMISSION_DENIED (compared in constant time), and without a
//! configured token every call is PERMISSION_DENIED, so a server started without one cannot be
//! reconfigured by anybody.
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use concierge_proto::v1 as pb;
use concierge_proto::v1::models_server::Models;
use tonic::{Request, Response, Status};

use super::respond;
use crate::error::ServiceError;
use crate::loader::{self, Install};
use crate::registry::{SlotName, SlotView, Stage, VersionView, BUCKETS};
use crate::state::AppState;

pub struct ModelsService {
    state: Arc<AppState>,
    token: Option<String>,
}

impl ModelsService {
    pub fn new(state: Arc<AppState>, token: Option<String>) -> Self {
        Self { state, token }
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<(), ServiceError> {
        let Some(token) = &self.token else {
            return Err(ServiceError::PermissionDenied(
                "the admin API is disabled on this server: start it with --admin-token-file (or CONCIERGE_ADMIN_TOKEN) to enable it".into(),
            ));
        };
        let given = match req.metadata().get("authorization") {
            None => {
                return Err(ServiceError::Unauthenticated(
                    "admin calls need the metadata entry `authorization: Bearer <admin token>`".into(),
                ))
            }
            Some(v) => v.to_str().unwrap_or("").trim().to_string(),
        };
        let given = given.strip_prefix("Bearer ").or_else(|| given.strip_prefix("bearer ")).unwrap_or("").trim();
        if given.is_empty() {
            return Err(ServiceError::Unauthenticated("the authorization entry must be `Bearer <admin token>`".into()));
        }
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            tracing::warn!("an admin call bore a wrong token");
            return Err(ServiceError::PermissionDenied("the admin token is wrong".into()));
        }
        Ok(())
    }

    fn slot_proto(&self, name: SlotName) -> pb::ModelSlot {
        let view: SlotView = self.state.registry.snapshot().slots.view(name);
        let mut versions = Vec::new();
        let mut push = |v: &Option<VersionView>, state: pb::VersionState, percent: f32| {
            if let Some(v) = v {
                versions.push(pb::ModelVersion {
                    version: v.label.clone(),
                    id: v.id.clone(),
                    source: v.source.clone(),
                    state: state as i32,
                    traffic_percent: percent,
                    error: String::new(),
                    weights: v.weights.clone(),
                    dimension: v.dimension as u32,
                    loaded_at_unix_ms: unix_ms(v.loaded_at),
                });
            }
        };
        let share = view.share as f32 * 100.0 / BUCKETS as f32;
        push(&view.active, pb::VersionState::Active, if view.candidate.is_some() { 100.0 - share } else { 100.0 });
        push(&view.candidate, pb::VersionState::Candidate, share);
        push(&view.previous, pb::VersionState::Previous, 0.0);
        if let Some(a) = self.state.registry.activity(name) {
            let (state, error) = match a.stage {
                Stage::Loading => (pb::VersionState::Loading, String::new()),
                Stage::Warming => (pb::VersionState::Warming, String::new()),
                Stage::Failed(e) => (pb::VersionState::Failed, e),
            };
            versions.push(pb::ModelVersion {
                version: a.label,
                source: a.source,
                state: state as i32,
                error,
                loaded_at_unix_ms: unix_ms(a.since),
                ..Default::default()
            });
        }
        pb::ModelSlot { name: name.as_str().into(), versions }
    }

    /// The slots this server runs (those with a version, or a load under way).
    fn list(&self) -> pb::ListModelsResponse {
        let snapshot = self.state.registry.snapshot();
        let slots = SlotName::ALL
            .into_iter()
            .filter(|&n| {
                let v = snapshot.slots.view(n);
                v.active.is_some() || v.candidate.is_some() || self.state.registry.activity(n).is_some()
            })
            .map(|n| self.slot_proto(n))
            .collect();
        pb::ListModelsResponse { slots }
    }

    async fn load(&self, msg: pb::LoadModelRequest) -> Result<pb::LoadModelResponse, ServiceError> {
        let slot = SlotName::parse(&msg.slot)?;
        let label = msg.version.trim().to_string();
        if label.is_empty() || label.len() > 128 || label.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ServiceError::InvalidArgument(
                "version must be a label of 1 to 128 characters without spaces (e.g. \"intents-2026-11-23\")".into(),
            ));
        }
        let source = match msg.source.and_then(|s| s.source) {
            Some(pb::model_source::Source::LocalDir(d)) if !d.trim().is_empty() => concierge_models::ModelSource::Dir(d.trim().into()),
            Some(pb::model_source::Source::Hub(h)) if !h.repo.trim().is_empty() => concierge_models::ModelSource::Hub {
                repo: h.repo.trim().into(),
                revision: if h.revision.trim().is_empty() { "main".into() } else { h.revision.trim().into() },
            },
            _ => {
                return Err(ServiceError::InvalidArgument(
                    "source is missing: give source.local_dir (a folder on the server) or source.hub.repo".into(),
                ))
            }
        };
        tracing::info!(%slot, version = %label, source = %loader::describe(&source), "admin: load");
        // The load runs to its end even if this caller goes away; its outcome shows in List.
        let state = self.state.clone();
        let loaded = tokio::spawn(async move {
            tokio::task::spawn_blocking(move || loader::load_into(&state, slot, &source, Some(&label), Install::Candidate)).await
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("the load task failed: {e}")))?
        .map_err(|e| ServiceError::Internal(format!("the load task failed: {e}")))??;
        Ok(pb::LoadModelResponse { slot: Some(self.slot_proto(slot)), load_seconds: loaded.seconds })
    }

    fn promote(&self, msg: pb::PromoteModelRequest) -> Result<pb::PromoteModelResponse, ServiceError> {
        let slot = SlotName::parse(&msg.slot)?;
        let p = msg.traffic_percent;
        if !(0.0..=100.0).contains(&p) {
            return Err(ServiceError::InvalidArgument(format!(
                "traffic_percent {p} is outside 0..100; send the candidate's share of calls (100 makes it active)"
            )));
        }
        let share = (p / 100.0 * BUCKETS as f32).round() as u32;
        let changed = self.state.registry.change(|slots| slots.promote(slot, share))?;
        tracing::info!(%slot, traffic_percent = p, ?changed, "admin: promote");
        Ok(pb::PromoteModelResponse { slots: changed.into_iter().map(|s| self.slot_proto(s)).collect() })
    }

    fn rollback(&self, msg: pb::RollbackModelRequest) -> Result<pb::RollbackModelResponse, ServiceError> {
        let slot = SlotName::parse(&msg.slot)?;
        let changed = self.state.registry.change(|slots| slots.rollback(slot))?;
        tracing::info!(%slot, ?changed, "admin: rollback");
        Ok(pb::RollbackModelResponse { slots: changed.into_iter().map(|s| self.slot_proto(s)).collect() })
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Byte comparison whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

#[tonic::async_trait]
impl Models for ModelsService {
    async fn list(&self, req: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        let start = Instant::now();
        respond("Models.List", start, self.authorize(&req).map(|_| ModelsService::list(self)))
    }

    async fn load(&self, req: Request<pb::LoadModelRequest>) -> Result<Response<pb::LoadModelResponse>, Status> {
        let start = Instant::now();
        let r = match self.authorize(&req) {
            Ok(()) => ModelsService::load(self, req.into_inner()).await,
            Err(e) => Err(e),
        };
        respond("Models.Load", start, r)
    }

    async fn promote(&self, req: Request<pb::PromoteModelRequest>) -> Result<Response<pb::PromoteModelResponse>, Status> {
        let start = Instant::now();
        let r = self.authorize(&req).and_then(|_| ModelsService::promote(self, req.into_inner()));
        respond("Models.Promote", start, r)
    }

    async fn rollback(&self, req: Request<pb::RollbackModelRequest>) -> Result<Response<pb::RollbackModelResponse>, Status> {
        let start = Instant::now();
        let r = self.authorize(&req).and_then(|_| ModelsService::rollback(self, req.into_inner()));
        respond("Models.Rollback", start, r)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares_bytes() {
        assert!(super::constant_time_eq(b"secret", b"secret"));
        assert!(!super::constant_time_eq(b"secret", b"secreT"));
        assert!(!super::constant_time_eq(b"secret", b"secret2"));
        assert!(!super::constant_time_eq(b"", b"x"));
    }
}
