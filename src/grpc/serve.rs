//! The gRPC port: accepts connections (plain TCP, or TLS with the handshake in the connection's
//! own task), runs hyper's HTTP/2 server on each, and ages them.
//!
//! At `grpc.max_connection_age` a connection is sent GOAWAY: calls in flight go on, new calls go
//! to a new connection. Then its task streams end cleanly (status OK) and their workers open them
//! again, on a new connection, so connections rebalance across replicas without cutting a push or
//! a report in half. Whatever is still open `grpc.max_connection_age_grace` later is cut. (tonic's
//! own server sends no GOAWAY when a grace period is set: it cuts the connection at age + grace,
//! streams and calls included.)
//!
//! Each request carries, in its extensions, tonic's connect info (the peer address, and the
//! client certificate over TLS: [`crate::tls::peer_of`]) and its connection's
//! [`ConnectionDraining`].

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use hyper::{body::Incoming, server::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tower::{Service, ServiceExt as _};
use tracing::{debug, warn};

use crate::tls::{self, ReloadingConfig};

/// Cancelled when the connection a request came on has reached its maximum age: task streams
/// on it end cleanly so their workers reopen them on a new connection. A request that did not
/// come through [`serve`] (unit tests) gets one that never fires.
#[derive(Debug, Clone, Default)]
pub struct ConnectionDraining(CancellationToken);

impl ConnectionDraining {
    /// The token of the connection `req` came on.
    pub fn of<T>(req: &tonic::Request<T>) -> Self {
        req.extensions().get::<Self>().cloned().unwrap_or_default()
    }

    /// Resolves once the connection is going away.
    pub async fn cancelled(&self) {
        self.0.cancelled().await
    }
}

/// Settings of the gRPC port.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// HTTP/2 PING interval, and how long an unanswered PING may wait before the connection is
    /// closed.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// TCP keepalive on accepted sockets.
    pub tcp_keepalive: Duration,
    /// A connection open this long is sent GOAWAY; `None`: connections never age.
    pub max_connection_age: Option<Duration>,
    /// How long an aged connection's calls get to finish before it is cut.
    pub max_connection_age_grace: Duration,
    /// After shutdown, how long open connections get to finish before they are cut.
    pub drain_timeout: Duration,
}

/// Serves `service` on `listener` (over TLS when `tls` is given) until `shutdown`; then stops
/// accepting, sends every open connection GOAWAY and waits up to `cfg.drain_timeout` for their
/// calls to finish before cutting what is left. Every connection task is owned here and ended
/// before this returns.
pub async fn serve<S>(
    listener: TcpListener,
    tls: Option<ReloadingConfig>,
    service: S,
    cfg: ServeConfig,
    shutdown: CancellationToken,
) where
    S: Service<http::Request<Incoming>, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = http2_builder(&cfg);
    let mut connections = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // Reap finished connections so the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = tls::accept(&listener, "grpc") => accepted,
        };
        tls::tune_socket(&tcp, cfg.tcp_keepalive);
        let conn = Connection {
            peer,
            service: service.clone(),
            builder: builder.clone(),
            age: cfg.max_connection_age,
            grace: cfg.max_connection_age_grace,
            shutdown: shutdown.clone(),
        };
        let tls = tls.clone();
        connections.spawn(async move {
            let Some(tls) = tls else { return conn.run(tcp).await };
            let accepted = tokio::select! {
                biased;
                _ = conn.shutdown.cancelled() => return,
                accepted = tls.accept(tcp) => accepted,
            };
            match accepted {
                Ok(stream) => conn.run(stream).await,
                Err(error) => debug!(%error, %peer, "tls handshake failed"),
            }
        });
    }
    // New clients are refused at once rather than left waiting in the backlog.
    drop(listener);
    let drained =
        tokio::time::timeout(cfg.drain_timeout, async { while connections.join_next().await.is_some() {} })
            .await;
    if drained.is_err() {
        warn!(open = connections.len(), "grpc connections still open at the shutdown deadline; closing them");
        connections.shutdown().await;
    }
}

/// What tonic's server set and matters here; everything else is hyper's default (a 16 KiB
/// maximum frame, 1 MiB windows without adaptive sizing, 1024 locally reset streams).
fn http2_builder(cfg: &ServeConfig) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(Some(cfg.keepalive_interval))
        .keep_alive_timeout(cfg.keepalive_timeout)
        // As tonic: no limit on concurrent calls per connection (hyper's default is 200); a
        // client multiplexing many calls over one channel queues none of them.
        .max_concurrent_streams(None);
    b
}

/// One accepted connection and what it needs to serve and age.
struct Connection<S> {
    peer: SocketAddr,
    service: S,
    builder: http2::Builder<TokioExecutor>,
    age: Option<Duration>,
    grace: Duration,
    shutdown: CancellationToken,
}

impl<S> Connection<S>
where
    S: Service<http::Request<Incoming>, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    /// Serves `io` until the client closes it, it is cut after its grace period, or the server
    /// shuts down and its calls have finished.
    async fn run<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    {
        let Connection { peer, service, builder, age, grace, shutdown } = self;
        let info = io.connect_info();
        let draining = ConnectionDraining::default();
        let requests = {
            let draining = draining.clone();
            hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                req.extensions_mut().insert(info.clone());
                req.extensions_mut().insert(draining.clone());
                let deadline = grpc_timeout(req.headers());
                let call = service.clone().oneshot(req);
                async move {
                    match deadline {
                        None => call.await,
                        // As tonic's server: the client's deadline ends the call here too.
                        Some(limit) => match tokio::time::timeout(limit, call).await {
                            Ok(answer) => answer,
                            Err(_) => Ok(super::status::timeout_expired().into_http()),
                        },
                    }
                }
            })
        };
        let conn = builder.serve_connection(TokioIo::new(io), requests);
        tokio::pin!(conn);
        let never = Instant::now() + Duration::from_secs(100 * 365 * 86_400);
        let aged = tokio::time::sleep_until(age.map_or(never, |a| Instant::now() + a));
        let cut = tokio::time::sleep_until(never);
        tokio::pin!(aged, cut);
        let mut going_away = false;
        let mut ageing = false;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !going_away => {
                    // Task streams end with `Unavailable` through the service's own token.
                    going_away = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = &mut aged, if !going_away => {
                    debug!(%peer, "connection reached its maximum age; sending goaway");
                    going_away = true;
                    ageing = true;
                    // GOAWAY first, so the worker's new stream goes to a new connection; the
                    // frame is queued now, ahead of the streams' trailers.
                    conn.as_mut().graceful_shutdown();
                    draining.0.cancel();
                    cut.as_mut().reset(Instant::now() + grace);
                }
                _ = &mut cut, if ageing => {
                    debug!(%peer, grace_ms = grace.as_millis() as u64,
                           "aged connection still open after its grace period; closing it");
                    return;
                }
                ended = conn.as_mut() => {
                    if let Err(error) = ended {
                        debug!(%error, %peer, "grpc connection ended with an error");
                    }
                    return;
                }
            }
        }
    }
}

/// The client's deadline from the `grpc-timeout` header; `None` when absent or malformed (as
/// tonic: at most 8 digits, then a unit).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
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

    /// `/slow` answers after 600 ms; `/stream` answers once its connection is draining.
    async fn answer(req: http::Request<Incoming>) -> Result<http::Response<tonic::body::Body>, Infallible> {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(600)).await;
        } else {
            req.extensions()
                .get::<ConnectionDraining>()
                .expect("each request has its connection's token")
                .0
                .cancelled()
                .await;
        }
        Ok(http::Response::new(tonic::body::Body::empty()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_aged_connection_finishes_its_calls_ends_its_streams_and_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = ServeConfig {
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            tcp_keepalive: Duration::from_secs(60),
            max_connection_age: Some(Duration::from_millis(300)),
            // Long: the connection must close because its calls finished, not be cut.
            max_connection_age_grace: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(5),
        };
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, None, tower::service_fn(answer), cfg, shutdown.clone()));

        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
        let conn = tokio::spawn(conn);
        let call = |path: &'static str| {
            let mut send = send.clone();
            let req = http::Request::builder()
                .uri(format!("http://{addr}{path}"))
                .body(tonic::body::Body::empty())
                .unwrap();
            tokio::spawn(async move { send.send_request(req).await.map(|r| r.status()) })
        };
        // Both are open when the connection reaches its age.
        let (stream, slow) = (call("/stream"), call("/slow"));
        let limit = Duration::from_secs(10);
        let stream = tokio::time::timeout(limit, stream).await.expect("the stream ends at the age").unwrap();
        assert_eq!(stream.unwrap(), http::StatusCode::OK);
        let slow = tokio::time::timeout(limit, slow).await.expect("the call in flight finishes").unwrap();
        assert_eq!(slow.unwrap(), http::StatusCode::OK, "a call in flight at GOAWAY completes");
        let closed = tokio::time::timeout(limit, conn).await.expect("the connection closes within its grace");
        let closed = closed.unwrap();
        assert!(closed.is_ok(), "closed cleanly after GOAWAY: {closed:?}");

        shutdown.cancel();
        tokio::time::timeout(limit, server).await.expect("the server stops").unwrap();
    }

    fn parse(v: &str) -> Option<Duration> {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", v.parse().unwrap());
        grpc_timeout(&h)
    }

    #[test]
    fn grpc_timeouts_parse_as_the_spec_says() {
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(parse("123456789S"), None, "more than 8 digits");
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("S"), None);
        assert_eq!(parse("-1S"), None);
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }
}
