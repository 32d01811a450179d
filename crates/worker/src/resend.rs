//! Calls the coordinator never saw are sent again, at once.
//!
//! A connection the coordinator ages (or a replica that shuts down) is sent GOAWAY naming the
//! last stream the server took. A call the client started on it after that, or that was still
//! queued for it when the client learned of the GOAWAY, fails without having reached a handler:
//! HTTP/2 (RFC 9113, section 6.8) says such streams were not processed. tonic turns them into
//! `INTERNAL` ("h2 protocol error") or `CANCELLED`, which a caller cannot tell from a call that
//! failed on the server, so a report would wait out a backoff and log a failure for nothing.
//! [`Resend`] sends such a call again, as gRPC's own transparent retry does, and only such a
//! call: anything the server may have seen (a stream it took, then cut) fails as before. A call
//! turned back unseen on every send fails `UNAVAILABLE`, what a retry later can fix.
//!
//! Every call of the coordinator's API sends one message, so the request body is read whole
//! before the first send and kept for the next.
//!
//! "Never saw" holds for the call's handler, not always for its headers: a GOAWAY that arrives
//! while the client opens a stream can fail the call after its HEADERS frame left but before its
//! message did. The server then never decodes a message and no handler runs; only what acts on
//! headers alone (the server's auth check, its metrics and trace layers) sees the call twice.

use std::{
    error::Error as StdError,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use tonic::body::Body;
use tower::{Service, ServiceExt as _};

type BoxError = Box<dyn StdError + Send + Sync>;

/// Sends beyond the first that one call may take. Each goes out once the channel is ready
/// again. After a GOAWAY the first of them usually still lands in the queue of the connection
/// going away (the channel reconnects only once that connection has closed, which its task
/// learns when a new request wakes it) and comes back cancelled, unsent; the next goes out on a
/// new connection. A `REFUSED_STREAM` is answered on the same connection, after
/// [`REFUSED_PAUSE`]. A call a server keeps turning away without taking it fails `UNAVAILABLE`.
const MAX_RESENDS: usize = 3;

/// How long a call the server refused (`REFUSED_STREAM`: over its limit of streams, or closing)
/// waits before it is sent again, doubled for each refusal of the same call: 10, 20, 40 ms. A call
/// turned back by a GOAWAY goes again at once, to the next connection.
const REFUSED_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// Wraps a channel so that calls the server never saw are sent again (module doc).
#[derive(Debug, Clone)]
pub struct Resend<S> {
    inner: S,
}

impl<S> Resend<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> Service<http::Request<Body>> for Resend<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The service made ready above takes the first send; a clone waits for readiness
        // before each later one (tower's pattern for a service called from a future).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let message: Bytes = body.collect().await?.to_bytes();
            let request = |message: &Bytes| {
                http::Request::from_parts(parts.clone(), Body::new(Full::new(message.clone())))
            };
            let mut answer = inner.call(request(&message)).await.map_err(Into::into);
            let mut pause = REFUSED_PAUSE;
            for _ in 0..MAX_RESENDS {
                match answer {
                    Err(e) if never_seen(&*e) => {
                        tracing::debug!(error = %e, "call turned back unseen; sending it again");
                        if refused(&*e) {
                            tokio::time::sleep(pause).await;
                            pause *= 2;
                        }
                        let ready = inner.ready().await.map_err(Into::into)?;
                        answer = ready.call(request(&message)).await.map_err(Into::into);
                    }
                    _ => break,
                }
            }
            // Turned back unseen every time: the server never had it, so a retry later can
            // only help. tonic takes the status from the error as it is.
            match answer {
                Err(e) if never_seen(&*e) => Err(BoxError::from(tonic::Status::unavailable(format!(
                    "the coordinator turned the call back without taking it, {} times: {}",
                    MAX_RESENDS + 1,
                    crate::error::one_line(&*e)
                )))),
                answer => answer,
            }
        })
    }
}

/// Whether `error` proves the server never took the call: the connection's GOAWAY named a
/// last stream below it, or refused it (`REFUSED_STREAM`), or the client never sent it (it
/// waited for a connection that closed first).
fn never_seen(error: &(dyn StdError + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // A remote GOAWAY reaches a stream only when its id is above the GOAWAY's last
            // stream, or when the stream was opened after it: never processed either way.
            return h2.is_remote()
                && (h2.is_go_away() || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)));
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            // An HTTP/2 connection cancels only calls it had not sent: "connection was not
            // ready", or still queued when the connection closed.
            if hyper.is_canceled() {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

/// Whether `error` is the server's `REFUSED_STREAM`.
fn refused(error: &(dyn StdError + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_remote() && h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use futures::future::poll_fn;
    use tokio::{net::TcpListener, sync::mpsc};

    use super::*;
    use crate::{
        client::{self, ClientSecurity},
        proto,
    };

    /// What one server connection took: the path of each call, in order.
    type Seen = mpsc::UnboundedSender<(usize, String)>;

    /// A gRPC answer with an empty message (every response type of the API decodes from it)
    /// and status OK.
    async fn answer_ok(req: http::Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
        let mut body = req.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("request body");
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let head = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let mut send = respond.send_response(head, false).expect("response headers");
        send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false).expect("response message");
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        send.send_trailers(trailers).expect("trailers");
    }

    /// Serves every connection after the first normally, recording what it took.
    async fn serve_normally(listener: Arc<TcpListener>, seen: Seen) {
        let mut n = 1;
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            n += 1;
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(tcp).await.expect("handshake");
                while let Some(Ok((req, respond))) = conn.accept().await {
                    let _ = seen.send((n, req.uri().path().to_owned()));
                    tokio::spawn(answer_ok(req, respond));
                }
            });
        }
    }

    /// Waits (at most 10 s) until a HEADERS frame of `stream` is among the bytes waiting unread
    /// in `socket`: its 9-byte frame header ends with type 1, END_HEADERS and the stream id.
    async fn wait_for_headers_of_stream(socket: &std::net::TcpStream, stream: u8) {
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..2_000 {
            if let Ok(n) = socket.peek(&mut buf) {
                let waiting = &buf[..n];
                if waiting.windows(6).any(|w| w[0] == 1 && w[1] & 0x4 != 0 && w[2..] == [0, 0, 0, stream]) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("no HEADERS frame of stream {stream} arrived");
    }

    /// What the servers took. Called once the calls have been answered: a server records a
    /// call before it answers or drops it, and a call is sent again only before its caller is
    /// answered, so nothing more can arrive.
    fn calls_taken<T>(took: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
        let mut calls = Vec::new();
        while let Ok(call) = took.try_recv() {
            calls.push(call);
        }
        calls
    }

    fn client_of(addr: std::net::SocketAddr) -> client::Client {
        client::connect_lazy(&format!("http://{addr}"), &ClientSecurity::default(), 1 << 20).unwrap()
    }

    fn report() -> proto::ReportCompletionRequest {
        proto::ReportCompletionRequest { task_id: "t-1".into(), attempt: 1, ..Default::default() }
    }

    /// A connection goes away (GOAWAY naming the heartbeat's stream as the last it took) while
    /// a heartbeat is in flight on it and a report has just been sent on it: the report, past
    /// the GOAWAY's last stream, is sent again on a new connection and answered; the heartbeat,
    /// which the server took, fails with its connection and is not sent again. Each reached a
    /// server once.
    #[tokio::test]
    async fn a_call_past_the_goaway_is_sent_again_and_one_before_it_is_not() {
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let addr = listener.local_addr().unwrap();
        let (seen, mut took) = mpsc::unbounded_channel();
        let (first_taken, mut heartbeat_arrived) = mpsc::unbounded_channel::<()>();
        let first = {
            let (listener, seen) = (listener.clone(), seen.clone());
            tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(serve_normally(listener, seen.clone()));
                // A second handle on the socket, to see what waits in it unread.
                let tcp = tcp.into_std().unwrap();
                let peek = tcp.try_clone().unwrap();
                let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
                let mut conn = h2::server::handshake(tcp).await.expect("handshake");
                let (req, _respond) = conn.accept().await.expect("a first call").expect("its stream");
                seen.send((1, req.uri().path().to_owned())).unwrap();
                first_taken.send(()).unwrap();
                // The connection is not polled until the report's stream (3) waits unread in
                // the socket: the GOAWAY's last stream is then the heartbeat's.
                wait_for_headers_of_stream(&peek, 3).await;
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), poll_fn(|cx| conn.poll_closed(cx))).await;
            })
        };
        let client = client_of(addr);
        let heartbeat = {
            let mut c = client.clone();
            tokio::spawn(async move { c.send_heartbeat(proto::HeartbeatRequest::default()).await })
        };
        heartbeat_arrived.recv().await.unwrap();
        let reporting = {
            let mut c = client.clone();
            tokio::spawn(async move { c.report_completion(report()).await })
        };

        let answered = reporting.await.unwrap();
        assert!(answered.is_ok(), "the report is sent again, not failed: {answered:?}");
        let lost = heartbeat.await.unwrap();
        assert!(lost.is_err(), "the heartbeat, taken before the GOAWAY, fails with its connection: {lost:?}");
        first.await.unwrap();
        let calls = calls_taken(&mut took);
        assert_eq!(
            calls,
            [
                (1, "/coordinator.CoordinatorService/SendHeartbeat".to_owned()),
                (2, "/coordinator.CoordinatorService/ReportCompletion".to_owned()),
            ],
            "each call reached a server once, the report on the second connection"
        );
    }

    /// A call the server took and then lost with its connection may have been handled: it
    /// fails to its caller (who decides) and is not sent again.
    #[tokio::test]
    async fn a_call_the_server_took_is_not_sent_again() {
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let addr = listener.local_addr().unwrap();
        let (seen, mut took) = mpsc::unbounded_channel();
        let server = {
            let (listener, seen) = (listener.clone(), seen.clone());
            tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut conn = h2::server::handshake(tcp).await.expect("handshake");
                let (req, _respond) = conn.accept().await.expect("a call").expect("its stream");
                seen.send((1, req.uri().path().to_owned())).unwrap();
                // The connection is dropped with the call unanswered.
                drop(conn);
                tokio::spawn(serve_normally(listener, seen));
            })
        };
        let answered = client_of(addr).report_completion(report()).await;
        assert!(answered.is_err(), "a call cut after the server took it fails: {answered:?}");
        server.await.unwrap();
        let calls = calls_taken(&mut took);
        assert_eq!(calls, [(1, "/coordinator.CoordinatorService/ReportCompletion".to_owned())]);
    }

    /// A server that refuses every stream (`REFUSED_STREAM`) is sent each call at most
    /// `1 + MAX_RESENDS` times, each resend after a pause twice as long as the one before, and
    /// the caller gets `UNAVAILABLE`: the call was never taken, so a retry later can help.
    #[tokio::test]
    async fn a_call_refused_every_time_is_sent_a_bounded_number_of_times_then_unavailable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, mut took) = mpsc::unbounded_channel::<(std::time::Instant, String)>();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.expect("handshake");
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let _ = seen.send((std::time::Instant::now(), req.uri().path().to_owned()));
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    }
                });
            }
        });
        let refused = client_of(addr).report_completion(report()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        let sends = calls_taken(&mut took);
        assert_eq!(sends.len(), 1 + MAX_RESENDS, "the first send and every resend, and no more");
        // Each resend waited at least its pause after the refusal before it (the server sees a
        // send after the client sent it, so the gaps it sees are no shorter than the pauses).
        let mut pause = REFUSED_PAUSE;
        for pair in sends.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(gap >= pause, "a resend {gap:?} after the refusal before it, not after {pause:?}");
            pause *= 2;
        }
    }
}
