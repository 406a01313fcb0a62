//! A tower layer at the edge of every gRPC service:
//! - reads the caller's `grpc-timeout` into a [`Deadline`] request extension, so handlers and the
//!   engine can refuse work that can no longer be answered in time, and answers
//!   DEADLINE_EXCEEDED itself when a call is still unanswered just before its deadline (while its
//!   message is still arriving or being decoded, say). Without that, tonic's own timer, which
//!   wraps every service, would answer first, with CANCELLED ("Timeout expired");
//! - turns tonic's answer to an over-size message (OUT_OF_RANGE) into RESOURCE_EXHAUSTED, the
//!   code gRPC's status-code guide gives for a message over the receive limit, with a message
//!   that names the limit and the flag that sets it.
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};

/// The instant by which the caller wants its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

#[derive(Clone)]
pub struct EdgeLayer;

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = Edge<S>;
    fn layer(&self, inner: S) -> Edge<S> {
        Edge { inner }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<Request<B>> for Edge<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>> + Send,
    RB: Default + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let received = Instant::now();
        let deadline = req.headers().get("grpc-timeout").and_then(|v| parse_grpc_timeout(v.to_str().ok()?)).map(|t| received + t);
        if let Some(d) = deadline {
            req.extensions_mut().insert(Deadline(d));
        }
        let rpc = rpc_label(req.uri().path());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = match deadline {
                None => fut.await?,
                // A moment after the handlers' own timer (so their answer, which names where the
                // time went, usually wins) and before tonic's, which fires at the deadline itself
                // and polls us first. This timer polls the call first, so an answer the call has
                // ready always wins. The two timers may sit on different workers' timer wheels,
                // so under load this one can still fire first: then the call is counted here,
                // once, since the handler that would have counted it is dropped unfinished.
                Some(d) => match tokio::time::timeout_at(d.checked_sub(EDGE_MARGIN).unwrap_or(received).into(), fut).await {
                    Ok(resp) => resp?,
                    Err(_) => {
                        let status = tonic::Status::deadline_exceeded(
                            "the deadline passed before the call could be answered (its message was still arriving or \
                             being read, or the work was not done); allow the call more time or send less per call",
                        );
                        if let Some(rpc) = rpc {
                            super::observe(rpc, received, &Err::<(), _>(status.clone()));
                        }
                        return Ok(status.into_http());
                    }
                },
            };
            rewrite_oversize(resp.headers_mut());
            Ok(resp)
        })
    }
}

/// Answer a call the handler has not answered this much before its deadline; less than the
/// handlers' [`super::DEADLINE_MARGIN`], so theirs fires first.
const EDGE_MARGIN: Duration = Duration::from_millis(1);

/// The `rpc` label the handlers count a call under: the method name, or `Models.<method>` for
/// the model-management service; None outside this server's own services (health, reflection).
fn rpc_label(path: &str) -> Option<String> {
    let (service, method) = path.strip_prefix("/concierge.v1.")?.split_once('/')?;
    if method.is_empty() || method.contains('/') {
        return None;
    }
    Some(if service == "Models" { format!("Models.{method}") } else { method.to_string() })
}

fn rewrite_oversize(headers: &mut http::HeaderMap) {
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
        return;
    }
    let Some(msg) = headers.get("grpc-message").and_then(|v| v.to_str().ok()) else { return };
    let msg = percent_encoding::percent_decode_str(msg).decode_utf8_lossy().into_owned();
    if !msg.contains("decoded message length too large") {
        return;
    }
    let detail = msg.split_once(": ").map(|(_, d)| d).unwrap_or(&msg);
    let text = format!(
        "request message too large ({detail}); send fewer or shorter inputs per call, or raise the server's --max-message-bytes"
    );
    let encoded = percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC).to_string();
    headers.insert("grpc-status", HeaderValue::from_static("8"));
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", v);
    }
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n), per the gRPC HTTP/2 spec.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

    #[test]
    fn rpc_labels_match_the_handlers() {
        assert_eq!(rpc_label("/concierge.v1.Embeddings/EmbedText").as_deref(), Some("EmbedText"));
        assert_eq!(rpc_label("/concierge.v1.Models/Load").as_deref(), Some("Models.Load"));
        assert_eq!(rpc_label("/grpc.health.v1.Health/Check"), None);
        assert_eq!(rpc_label("/concierge.v1.Embeddings/"), None);
    }

    #[test]
    fn oversize_becomes_resource_exhausted() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("11"));
        let m = "Error, decoded message length too large: found 5000 bytes, the limit is: 4096 bytes";
        let enc = percent_encoding::utf8_percent_encode(m, percent_encoding::NON_ALPHANUMERIC).to_string();
        h.insert("grpc-message", HeaderValue::from_str(&enc).unwrap());
        rewrite_oversize(&mut h);
        assert_eq!(h["grpc-status"], "8");
        let msg = percent_encoding::percent_decode_str(h["grpc-message"].to_str().unwrap()).decode_utf8().unwrap();
        assert!(msg.contains("found 5000 bytes, the limit is: 4096 bytes") && msg.contains("--max-message-bytes"), "{msg}");
    }
}
