//! The HTTP side: `/health` (JSON; 200 when serving, 503 when the database is unreachable or
//! shutdown has begun), `/health/live` (200 while the process runs), `/metrics` (Prometheus) and
//! `/` (service info). Its own port, with a header-read timeout (a slow client cannot hold a
//! connection), a per-request timeout and an idle-connection timeout (no request in flight for
//! `http.idle_timeout`, whatever keepalive PINGs pass meanwhile).

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tracing::debug;

use crate::{
    auth::Authenticator,
    config::HttpConfig,
    core::{self, Readiness},
    metrics,
    registry::Registry,
    rest::{self, RestState},
    scheduler::SchedulerStats,
    store::Store,
    tls::{self, ReloadingConfig},
};

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    pub coordinator_id: String,
    pub store: Store,
    pub registry: Registry,
    pub scheduler: Arc<SchedulerStats>,
    pub metrics: PrometheusHandle,
    /// Cancelled when shutdown begins; `/health` turns 503 so load balancers stop sending work.
    pub closing: CancellationToken,
    pub grpc_addr: SocketAddr,
    pub started: Instant,
    /// Guards `/metrics` when `auth.metrics_require_token` is set.
    pub auth: Authenticator,
    /// Set by the supervisor when a background loop stopped: `/health/live` answers 503.
    pub liveness: Liveness,
}

/// Whether every background loop still runs; `/health/live` answers 503 once one stopped.
#[derive(Debug, Clone, Default)]
pub struct Liveness(Arc<std::sync::Mutex<Option<&'static str>>>);

impl Liveness {
    /// The loop that failed, if one did.
    pub fn failed(&self) -> Option<&'static str> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `task` as the loop that failed, unless one already did.
    pub fn fail(&self, task: &'static str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(task);
    }
}

/// Every route: the open ones here, the REST API from [`rest`]. Unknown routes get a JSON 404,
/// known routes with the wrong method a JSON 405.
pub fn router(state: HttpState, api: RestState, request_timeout: Duration, max_body: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/metrics", get(metrics_text))
        .route("/", get(info))
        .with_state(state)
        .merge(rest::routes(api, max_body))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(axum::middleware::from_fn(record_request))
}

/// Records `http_requests_total{method,route,status}` and
/// `http_request_duration_seconds{method,route}` for every request. `route` is the template the
/// router matched (`/api/v1/tasks/{id}`), `unmatched` for a path no route has: never the raw
/// path, whose values a caller could make unbounded.
async fn record_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let resp = next.run(req).await;
    metrics::http_request(method, route, resp.status().as_u16(), start.elapsed());
    resp
}

/// A method from a fixed list (a client may send any token as its method).
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH, Method::HEAD, Method::OPTIONS]
        .into_iter()
        .zip(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
        .find(|(known, _)| known == m)
        .map(|(_, name)| name)
        .unwrap_or("other")
}

#[derive(Debug, Serialize)]
struct WorkersBody {
    total: u32,
    active: u32,
    suspect: u32,
    dead: u32,
    draining: u32,
}

#[derive(Debug, Serialize)]
struct CapacityBody {
    total: u32,
    used: u32,
    available: u32,
}

#[derive(Debug, Serialize)]
struct SchedulerBody {
    tasks_assigned: u64,
    assignments_failed: u64,
    poll_cycles: u64,
}

#[derive(Debug, Serialize)]
struct HealthBody {
    status: &'static str,
    coordinator_id: String,
    workers: WorkersBody,
    capacity: CapacityBody,
    scheduler: SchedulerBody,
    database: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

async fn health(State(s): State<HttpState>) -> Response {
    let c = s.registry.counts();
    let Readiness { shutting_down, database_reachable: db_ok } = core::readiness(&s.store, &s.closing).await;
    let (status, reason) = match (shutting_down, db_ok) {
        (true, _) => ("shutting_down", Some("shutdown has begun".to_owned())),
        (false, false) => ("unhealthy", Some("database unreachable".to_owned())),
        (false, true) => ("healthy", None),
    };
    let body = HealthBody {
        status,
        coordinator_id: s.coordinator_id.clone(),
        workers: WorkersBody {
            total: c.total,
            active: c.active,
            suspect: c.suspect,
            dead: c.dead,
            draining: c.draining,
        },
        capacity: CapacityBody {
            total: c.capacity_total,
            used: c.capacity_used,
            available: c.capacity_total.saturating_sub(c.capacity_used),
        },
        scheduler: SchedulerBody {
            tasks_assigned: s.scheduler.tasks_assigned.load(Ordering::Relaxed),
            assignments_failed: s.scheduler.assignments_failed.load(Ordering::Relaxed),
            poll_cycles: s.scheduler.poll_cycles.load(Ordering::Relaxed),
        },
        database: if db_ok { "connected" } else { "unreachable" },
        reason,
    };
    let code = if status == "healthy" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body)).into_response()
}

async fn live(State(s): State<HttpState>) -> axum::response::Response {
    if let Some(task) = s.liveness.failed() {
        let body =
            serde_json::json!({"status": "failed", "reason": format!("background loop {task} stopped")});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(serde_json::json!({"status": "alive"})).into_response()
}

async fn metrics_text(State(s): State<HttpState>, req: axum::extract::Request) -> Response {
    let auth_header = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if let Err(r) = s.auth.check(auth_header, s.auth.metrics_access()) {
        return rest::refused_http(&rest::peer(&req), "/metrics", &r);
    }
    // Registry gauges are cheap and exact at scrape time; database gauges come from the
    // periodic refresh in the app.
    let c = s.registry.counts();
    metrics::set_registry_gauges(&c);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render()).into_response()
}

async fn info(State(s): State<HttpState>) -> impl IntoResponse {
    Json(serde_json::json!({
        "service": "coordinator",
        "version": env!("CARGO_PKG_VERSION"),
        "coordinator_id": s.coordinator_id,
        "database": s.store.backend(),
        "grpc_port": s.grpc_addr.port(),
        "uptime_seconds": s.started.elapsed().as_secs(),
        "endpoints": {
            "health": "/health",
            "live": "/health/live",
            "metrics": "/metrics",
            "grpc": "coordinator.CoordinatorService",
        },
    }))
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, Json(serde_json::json!({"error": "not_found", "message": "no such route"})))
}

async fn method_not_allowed() -> impl IntoResponse {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(
            serde_json::json!({"error": "method_not_allowed", "message": "method not allowed on this route"}),
        ),
    )
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until `shutdown`, then lets
/// in-flight requests finish. At most `cfg.max_connections` connections are open at once; the
/// next ones wait in the listen backlog.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    cfg: HttpConfig,
    tls: Option<ReloadingConfig>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let conn_shutdown = CancellationToken::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections as usize));
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = tls::accept(&listener, "http") => accepted,
        };
        tls::tune_socket(&stream, Duration::from_secs(60));
        let router = router.clone();
        let cfg = cfg.clone();
        let stop = conn_shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(stream, peer, router, cfg, stop).await,
                Some(tls) => {
                    // The handshake gets the header-read timeout too: a client that stalls in
                    // it holds nothing for longer than one that stalls in its headers.
                    let accepted = tokio::time::timeout(cfg.read_timeout, tls.accept(stream)).await;
                    match accepted {
                        Ok(Ok(stream)) => serve_connection(stream, peer, router, cfg, stop).await,
                        Ok(Err(error)) => debug!(%error, %peer, "http tls handshake failed"),
                        Err(_) => debug!(%peer, "http tls handshake timed out"),
                    }
                }
            }
        });
    }
    conn_shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}

async fn serve_connection<T>(
    stream: T,
    peer: SocketAddr,
    router: Router,
    cfg: HttpConfig,
    stop: CancellationToken,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let io = TokioIo::new(ActivityIo { inner: stream, activity: activity.clone(), epoch });
    let requests = Arc::new(Requests::new(epoch));
    let counted = requests.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        let in_flight = InFlight::start(counted.clone());
        let answer = router.clone().oneshot(req.map(axum::body::Body::new));
        async move {
            let resp = answer.await;
            drop(in_flight);
            resp
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(cfg.read_timeout).keep_alive(true);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(cfg.idle_timeout));
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let tick = (cfg.idle_timeout.min(cfg.read_timeout) / 4).max(Duration::from_millis(10));
    let mut watchdog = tokio::time::interval(tick);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    debug!(%error, %peer, "http connection ended with an error");
                }
                break;
            }
            _ = stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = watchdog.tick(), if !closing => {
                let last = activity.load(Ordering::Relaxed);
                // A client that connects and sends nothing is held to the header timeout too
                // (hyper starts that clock at the first byte).
                if last == 0 && epoch.elapsed() > cfg.read_timeout {
                    debug!(%peer, "closing a connection that sent nothing");
                    break;
                }
                // Idle means no request in flight, not a quiet socket: HTTP/2 keepalive PINGs
                // move bytes on a connection that serves nothing.
                if requests.idle_for().is_some_and(|idle| idle > cfg.idle_timeout) {
                    debug!(%peer, "closing idle http connection");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Requests in flight on one connection and when the last one ended, for the idle timeout.
#[derive(Debug)]
struct Requests {
    epoch: Instant,
    in_flight: AtomicU64,
    /// Milliseconds since `epoch` when the last request ended; 0 (the connection's start) until
    /// one has.
    last_done: AtomicU64,
}

impl Requests {
    fn new(epoch: Instant) -> Self {
        Self { epoch, in_flight: AtomicU64::new(0), last_done: AtomicU64::new(0) }
    }

    /// How long no request has been in flight; `None` while one is.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_done.load(Ordering::SeqCst));
        Some(self.epoch.elapsed().saturating_sub(last))
    }
}

/// One request in flight, from its headers to its answer (the body may still be streaming:
/// a graceful shutdown lets it finish).
struct InFlight(Arc<Requests>);

impl InFlight {
    fn start(requests: Arc<Requests>) -> Self {
        requests.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(requests)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The end time first: a watchdog that sees nothing in flight reads a fresh one.
        let now = self.0.epoch.elapsed().as_millis() as u64;
        self.0.last_done.fetch_max(now, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A socket that notes when it last moved bytes, for closing a connection that never sent any.
struct ActivityIo<T> {
    inner: T,
    /// Milliseconds since `epoch` of the last read or write, plus one; 0 until the first.
    activity: Arc<AtomicU64>,
    epoch: Instant,
}

impl<T> ActivityIo<T> {
    fn touch(&self) {
        self.activity.store(self.epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
