//! The gRPC edge: thin services that validate, convert to domain requests, call the engine and
//! convert back. Status codes are decided in `crate::error` alone.
pub mod edge;
pub mod embeddings;
pub mod entities;
pub mod intents;
pub mod knowledge_base;
pub mod models;

use std::time::{Duration, Instant};

pub use edge::{Deadline, EdgeLayer};
use tonic::Status;

use crate::error::ServiceError;

/// Answer this much before the caller's deadline, so the answer (DEADLINE_EXCEEDED) is ours
/// and reaches the caller before its own timer fires.
pub(crate) const DEADLINE_MARGIN: Duration = Duration::from_millis(3);

/// The caller's deadline, or DEADLINE_EXCEEDED if it passed before any work started.
pub(crate) fn deadline_of<T>(req: &tonic::Request<T>) -> Result<Option<Instant>, ServiceError> {
    match req.extensions().get::<Deadline>() {
        Some(Deadline(d)) if *d <= Instant::now() + DEADLINE_MARGIN => Err(ServiceError::DeadlineExceeded(
            "the deadline had passed before work could start; allow the call more time".into(),
        )),
        Some(Deadline(d)) => Ok(Some(*d)),
        None => Ok(None),
    }
}

/// The metadata entry naming the caller for canary routing (a shopper or session id).
pub const ROUTING_KEY: &str = "x-routing-key";

/// The call's routing bucket: its `x-routing-key` hashed (one key, one bucket, always), or a
/// random bucket when it has none.
pub(crate) fn routing_bucket<T>(req: &tonic::Request<T>) -> u32 {
    match req.metadata().get(ROUTING_KEY).map(|v| v.as_bytes()) {
        Some(key) if !key.is_empty() => crate::registry::bucket_of(&String::from_utf8_lossy(key)),
        _ => crate::registry::random_bucket(),
    }
}

/// The slot and version label a call was routed to, once it was.
pub(crate) type Routed = Option<(crate::registry::SlotName, String)>;

/// Counts a finished call against the model version that answered it (see
/// [`crate::registry::observe_version`]); `version` is None when the call failed before routing.
pub(crate) fn observe_version<T>(version: Routed, start: Instant, result: &Result<T, Status>) {
    if let Some((slot, label)) = version {
        let code = match result {
            Ok(_) => "OK".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        crate::registry::observe_version(slot, &label, &code, start.elapsed().as_secs_f64());
    }
}

/// Runs `fut`, answering DEADLINE_EXCEEDED if it is not done by the deadline. Dropping the
/// future drops its pending engine replies, so queued inputs are not computed.
pub(crate) async fn with_deadline<T>(
    deadline: Option<Instant>,
    fut: impl std::future::Future<Output = Result<T, ServiceError>>,
) -> Result<T, ServiceError> {
    match deadline {
        None => fut.await,
        Some(d) => {
            let at = d.checked_sub(DEADLINE_MARGIN).unwrap_or(d);
            tokio::time::timeout_at(at.into(), fut).await.map_err(|_| {
                ServiceError::DeadlineExceeded(
                    "the deadline passed while the request waited for or ran on the model; allow more time or send fewer inputs".into(),
                )
            })?
        }
    }
}

/// Waits for every submitted input's answer, in order.
pub(crate) async fn answers<O>(pending: Vec<concierge_engine::Pending<O>>) -> Result<Vec<O>, ServiceError> {
    let mut out = Vec::with_capacity(pending.len());
    for p in pending {
        out.push(p.await.map_err(|_| ServiceError::Internal("the engine dropped an input unanswered".into()))??);
    }
    Ok(out)
}

/// Checks a request's list of texts: at least one, at most `limit`, none blank. `what` names
/// the field ("inputs", "texts") and `item` one entry ("input", "text").
pub(crate) fn check_texts(texts: &[String], limit: usize, what: &str, item: &str) -> Result<(), ServiceError> {
    if texts.is_empty() {
        return Err(ServiceError::InvalidArgument(format!("{what} is empty; send at least one text")));
    }
    if texts.len() > limit {
        return Err(ServiceError::InvalidArgument(format!(
            "{} {what} in one request; the limit is {limit}; split them over several calls",
            texts.len()
        )));
    }
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        return Err(ServiceError::InvalidArgument(format!("{item} {i} is empty or only whitespace; every {item} needs some text")));
    }
    Ok(())
}

/// A service method's result as the rpc's answer, counted by [`observe`].
pub(crate) fn respond<T>(rpc: &'static str, start: Instant, result: Result<T, ServiceError>) -> Result<tonic::Response<T>, Status> {
    let result = result.map(tonic::Response::new).map_err(Status::from);
    observe(rpc, start, &result);
    result
}

/// Counts a finished request by rpc and status code, and records its latency. `rpc` is a
/// handler's name, or the edge layer's label from the request path.
pub(crate) fn observe<T>(rpc: impl Into<metrics::SharedString>, start: Instant, result: &Result<T, Status>) {
    let rpc: metrics::SharedString = rpc.into();
    let code = match result {
        Ok(_) => "OK".to_string(),
        Err(s) => format!("{:?}", s.code()),
    };
    metrics::counter!("concierge_requests_total", "rpc" => rpc.clone(), "code" => code).increment(1);
    metrics::histogram!("concierge_request_duration_seconds", "rpc" => rpc.clone()).record(start.elapsed().as_secs_f64());
    if let Err(s) = result {
        tracing::debug!(rpc = rpc.as_ref(), code = ?s.code(), message = s.message(), "request failed");
    }
}
