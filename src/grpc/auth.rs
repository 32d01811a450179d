//! The auth check in front of every gRPC method, streams included: the bearer token's role
//! against what the method needs (see [`crate::auth::grpc_access`]). A refused call gets
//! `Unauthenticated` or `PermissionDenied` before any handler runs, is logged with the peer
//! address (never the token) and counted in `coordinator_auth_failures_total{reason}`.
//!
//! What passes is noted in the request as a [`Caller`], so worker handlers can check that the
//! `worker_id` in the message is one the token and the client certificate speak for.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tonic::Status;
use tower::{Layer, Service};
use tracing::{debug, warn};

use crate::{
    auth::{Access, Authenticator, Principal, Refusal, Role, grpc_access},
    core::CoreError,
    metrics, tls,
};

/// Who is calling, as far as the transport and the token tell.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub peer: Option<SocketAddr>,
    /// `None` when auth is off.
    pub principal: Option<Arc<Principal>>,
    /// Names in the client certificate (mTLS); `None` without one.
    pub cert_names: Option<Vec<String>>,
}

impl Caller {
    /// Refuses a worker call naming `worker_id` when the token is bound to another worker or the
    /// client certificate speaks for another name. Nothing is read or written before this.
    pub fn may_act_for(&self, worker_id: &str) -> Result<(), CoreError> {
        let bound = self.principal.as_ref().and_then(|p| p.worker_id.as_deref());
        let refusal = if bound.is_some_and(|b| b != worker_id) {
            Some("the token is bound to another worker id")
        } else if self.cert_names.as_ref().is_some_and(|names| !names.iter().any(|n| n == worker_id)) {
            Some("the client certificate is for another worker id")
        } else {
            None
        };
        match refusal {
            None => Ok(()),
            Some(message) => {
                let r = Refusal::forbidden("identity_mismatch", message);
                refused(self.peer, "worker call", &r);
                Err(CoreError::from(&r))
            }
        }
    }
}

/// The caller of a request (an empty one when the layer did not run, as in unit tests).
pub fn caller<T>(req: &tonic::Request<T>) -> Caller {
    req.extensions().get::<Caller>().cloned().unwrap_or_default()
}

fn refused(peer: Option<SocketAddr>, method: &str, r: &Refusal) {
    metrics::auth_failure(r.reason);
    let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
    warn!(%peer, method, reason = r.reason, "call refused by the auth check");
}

/// Token buckets per peer address for client calls (gRPC client RPCs and the REST client
/// routes): `rate` per second, bursts of `2 * rate`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    /// std Mutex: plain state, held for a few arithmetic steps and never across an await.
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Peers remembered at most; idle full buckets are dropped beyond this.
const MAX_TRACKED_PEERS: usize = 100_000;

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        Self { rate: f64::from(per_second), buckets: Mutex::new(HashMap::new()) }
    }

    /// The limiter for `client_rate_limit` calls per second per peer; `None` for 0 (no limit).
    pub fn for_rate(per_second: u32) -> Option<Arc<Self>> {
        (per_second > 0).then(|| Arc::new(Self::new(per_second)))
    }

    /// Takes one token for `peer`; `false` when its bucket is empty.
    pub fn allow(&self, peer: IpAddr) -> bool {
        self.take(peer).is_ok()
    }

    /// Takes one token for `peer`; when its bucket is empty, how long until it holds one again.
    pub fn take(&self, peer: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let burst = self.rate * 2.0;
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() >= MAX_TRACKED_PEERS {
            let rate = self.rate;
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets.entry(peer).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcAuthLayer {
    auth: Authenticator,
    limiter: Option<Arc<RateLimiter>>,
}

impl GrpcAuthLayer {
    /// `client_rate_limit`: client RPCs per second per peer address; 0 for none.
    pub fn new(auth: Authenticator, client_rate_limit: u32) -> Self {
        Self::with_limiter(auth, RateLimiter::for_rate(client_rate_limit))
    }

    /// With a limiter shared with the REST API, so a peer has one budget for both.
    pub fn with_limiter(auth: Authenticator, limiter: Option<Arc<RateLimiter>>) -> Self {
        Self { auth, limiter }
    }
}

impl<S> Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcAuth { inner, auth: self.auth.clone(), limiter: self.limiter.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcAuth<S> {
    inner: S,
    auth: Authenticator,
    limiter: Option<Arc<RateLimiter>>,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for GrpcAuth<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let (peer, cert_names) = tls::peer_of(req.extensions());
        let access = grpc_access(req.uri().path());
        if let (Some(limiter), Some(peer), Access::Role(Role::Client)) = (&self.limiter, peer, access)
            && !limiter.allow(peer.ip())
        {
            debug!(%peer, method = req.uri().path(), "client call over the per-peer rate limit");
            let resp = Status::from(CoreError::ResourceExhausted(
                "too many requests from this address; retry later".into(),
            ))
            .into_http();
            return Box::pin(async move { Ok(resp) });
        }
        let header = req.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        match self.auth.check(header, access) {
            Ok(principal) => {
                req.extensions_mut().insert(Caller { peer, principal, cert_names });
                Box::pin(self.inner.call(req))
            }
            Err(r) => {
                refused(peer, req.uri().path(), &r);
                let resp = Status::from(CoreError::from(&r)).into_http();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_allows_a_burst_then_refuses_per_peer() {
        let l = RateLimiter::new(5);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let allowed = (0..20).filter(|_| l.allow(a)).count();
        // A burst of 2 x rate, plus what refilled during the loop (microseconds: none).
        assert_eq!(allowed, 10);
        assert!(l.allow(b), "another peer has its own bucket");
        let wait = l.take(a).expect_err("the bucket is empty");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(200), "{wait:?}");
        std::thread::sleep(std::time::Duration::from_millis(450));
        assert!(l.allow(a), "the bucket refills at the rate");
    }
}
