//! The REST/JSON API under `/api/v1/`, for clients without gRPC. Each route calls the same
//! handler as its gRPC method, so validation, auth roles and answers are the same; bodies are
//! the protobuf JSON mapping of the gRPC messages (`bytes` as base64, enums by name, timestamps
//! as RFC 3339, field names as in the .proto; lowerCamelCase is accepted on input).
//!
//! | route | gRPC method | role |
//! |---|---|---|
//! | `POST /api/v1/tasks` | SubmitTask | client |
//! | `POST /api/v1/tasks/batch` | SubmitTasks | client |
//! | `GET /api/v1/tasks?status=&task_type=&job_id=&worker_id=&page_size=&page_token=` | ListTasks | client |
//! | `GET /api/v1/tasks/{id}` | GetTask | client |
//! | `POST /api/v1/tasks/{id}/cancel` | CancelTask | client |
//! | `POST /api/v1/jobs` | SubmitJob | client |
//! | `GET /api/v1/jobs/{id}?include_results=true` | GetJob | client |
//! | `GET /api/v1/workers` | ListWorkers | admin |
//! | `GET /api/v1/workers/{id}/stats` | GetWorkerStats | admin |
//!
//! Errors are JSON: `{"error": "invalid_argument", "message": "..."}`, with the HTTP status that
//! matches the gRPC code (400 bad input or bad JSON, 401, 403, 404, 409, 413 a body or payload
//! over its limit, 429, 503).
//!
//! The client routes share the per-peer limiter of the gRPC client RPCs
//! (`grpc.client_rate_limit`): over it they answer 429 with `Retry-After`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, LazyLock},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{FromRequest, Path, Query, Request, State, rejection::BytesRejection},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::{Value, json};
use tonic::{Code, Status};

use crate::{
    auth::{Access, Authenticator, Refusal, Role},
    grpc::{Service, auth::RateLimiter},
    metrics,
    proto::{self, coordinator_service_server::CoordinatorService},
};

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    let mut pool = DescriptorPool::global();
    pool.decode_file_descriptor_set(proto::FILE_DESCRIPTOR_SET).expect("the built descriptor set decodes");
    pool
});

/// The protobuf full name of a message the API carries.
trait Named {
    const NAME: &'static str;
}

macro_rules! named {
    ($($t:ident),* $(,)?) => {
        $(impl Named for proto::$t {
            const NAME: &'static str = concat!("coordinator.", stringify!($t));
        })*
    };
}

named!(
    SubmitTaskRequest,
    SubmitTaskResponse,
    SubmitTasksRequest,
    SubmitTasksResponse,
    Task,
    ListTasksRequest,
    ListTasksResponse,
    CancelTaskRequest,
    CancelTaskResponse,
    SubmitJobRequest,
    SubmitJobResponse,
    Job,
    ListWorkersResponse,
    WorkerStats,
);

/// What the REST handlers need.
#[derive(Debug, Clone)]
pub struct RestState {
    pub service: Service,
    pub auth: Authenticator,
    /// Client calls per second per peer address, shared with the gRPC auth layer; `None`: no
    /// limit.
    pub limiter: Option<Arc<RateLimiter>>,
}

/// What the client-route check needs.
#[derive(Debug, Clone)]
struct ClientGate {
    auth: Authenticator,
    limiter: Option<Arc<RateLimiter>>,
}

/// The `/api/v1` routes. Unknown routes fall through to the caller's 404; a known route with
/// the wrong method answers 405.
pub fn routes(state: RestState, max_body: usize) -> Router {
    let gate = ClientGate { auth: state.auth.clone(), limiter: state.limiter.clone() };
    let client = axum::middleware::from_fn_with_state(gate, require_client);
    let admin = axum::middleware::from_fn_with_state(state.auth.clone(), require_admin);
    let client_routes = Router::new()
        .route("/api/v1/tasks", post(submit_task).get(list_tasks))
        .route("/api/v1/tasks/batch", post(submit_tasks))
        .route("/api/v1/tasks/{id}", get(get_task))
        .route("/api/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/api/v1/jobs", post(submit_job))
        .route("/api/v1/jobs/{id}", get(get_job))
        .route_layer(client);
    let admin_routes = Router::new()
        .route("/api/v1/workers", get(list_workers))
        .route("/api/v1/workers/{id}/stats", get(worker_stats))
        .route_layer(admin);
    client_routes
        .merge(admin_routes)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The rate limit first, as on gRPC, then the role.
async fn require_client(State(gate): State<ClientGate>, req: Request, next: Next) -> Response {
    if let (Some(limiter), Some(peer)) = (&gate.limiter, peer_addr(&req))
        && let Err(wait) = limiter.take(peer.ip())
    {
        tracing::debug!(%peer, path = req.uri().path(), "client request over the per-peer rate limit");
        return too_many_requests(wait);
    }
    authorize(&gate.auth, Access::Role(Role::Client), req, next).await
}

async fn require_admin(State(auth): State<Authenticator>, req: Request, next: Next) -> Response {
    authorize(&auth, Access::Admin, req, next).await
}

/// The same check as the gRPC layer, answered in JSON.
pub async fn authorize(auth: &Authenticator, access: Access, req: Request, next: Next) -> Response {
    let header = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match auth.check(header, access) {
        Ok(_) => next.run(req).await,
        Err(r) => refused_http(&peer(&req), req.uri().path(), &r),
    }
}

/// The client address of a request, for logs.
pub fn peer(req: &Request) -> String {
    peer_addr(req).map(|p| p.to_string()).unwrap_or_else(|| "unknown".into())
}

fn peer_addr(req: &Request) -> Option<SocketAddr> {
    req.extensions().get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0)
}

/// 429 with `Retry-After`: whole seconds until the peer's bucket holds a token again.
fn too_many_requests(wait: std::time::Duration) -> Response {
    let mut resp = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        "resource_exhausted",
        "too many requests from this address; retry later",
    );
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    resp
}

/// Logs and counts a refusal and answers 401 or 403.
pub fn refused_http(peer: &str, path: &str, r: &Refusal) -> Response {
    metrics::auth_failure(r.reason);
    tracing::warn!(peer, path, reason = r.reason, "request refused by the auth check");
    let mut resp = error_response(r.to_status());
    if !r.forbidden {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

async fn method_not_allowed() -> Response {
    json_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

fn json_error(code: StatusCode, error: &str, message: &str) -> Response {
    (code, Json(json!({"error": error, "message": message}))).into_response()
}

fn http_status(code: Code) -> (StatusCode, &'static str) {
    match code {
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_argument"),
        // A payload over `tasks.max_payload_size`: the same answer as a body over its limit.
        Code::OutOfRange => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        Code::AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
        Code::FailedPrecondition => (StatusCode::CONFLICT, "failed_precondition"),
        Code::Aborted => (StatusCode::CONFLICT, "aborted"),
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
        Code::Unimplemented => (StatusCode::NOT_IMPLEMENTED, "unimplemented"),
        Code::Cancelled => (StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST), "cancelled"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

fn error_response(s: Status) -> Response {
    let (code, error) = http_status(s.code());
    json_error(code, error, s.message())
}

/// A protobuf message as JSON, field names as in the .proto.
fn to_json<M: prost::Message + Named>(msg: &M) -> Value {
    let Some(desc) = POOL.get_message_by_name(M::NAME) else {
        return Value::Null;
    };
    let mut dm = DynamicMessage::new(desc);
    if dm.transcode_from(msg).is_err() {
        return Value::Null;
    }
    let opts = SerializeOptions::new().use_proto_field_name(true).stringify_64_bit_integers(false);
    dm.serialize_with_options(serde_json::value::Serializer, &opts).unwrap_or(Value::Null)
}

/// A protobuf message from JSON; the error names what is wrong, for a 400.
fn from_json<M: prost::Message + Named + Default>(value: &[u8]) -> Result<M, String> {
    let desc = POOL.get_message_by_name(M::NAME).ok_or_else(|| format!("no descriptor for {}", M::NAME))?;
    let mut de = serde_json::Deserializer::from_slice(value);
    let dm = DynamicMessage::deserialize(desc, &mut de).map_err(|e| format!("request body: {e}"))?;
    de.end().map_err(|e| format!("request body: {e}"))?;
    dm.transcode_to::<M>().map_err(|e| format!("request body: {e}"))
}

fn bad_json(message: String) -> Response {
    json_error(StatusCode::BAD_REQUEST, "invalid_json", &message)
}

/// The request body as a protobuf message. An empty body is the empty message.
struct JsonBody<M>(M);

impl<S: Send + Sync, M: prost::Message + Named + Default> FromRequest<S> for JsonBody<M> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| v.starts_with("application/json"));
        let body = Bytes::from_request(req, state).await.map_err(|e| match e {
            BytesRejection::FailedToBufferBody(_) => json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body exceeds grpc.max_recv_msg_size",
            ),
            other => json_error(StatusCode::BAD_REQUEST, "invalid_body", &other.body_text()),
        })?;
        if !json_type {
            return Err(json_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send content-type: application/json",
            ));
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody(M::default()));
        }
        from_json(&body).map(JsonBody).map_err(bad_json)
    }
}

/// Runs a gRPC handler and answers its response as JSON, or its status as a JSON error.
async fn answer<T, M, F>(ok: StatusCode, call: F, req: T) -> Response
where
    M: prost::Message + Named,
    F: AsyncFnOnce(tonic::Request<T>) -> Result<tonic::Response<M>, Status>,
{
    match call(tonic::Request::new(req)).await {
        Ok(resp) => (ok, Json(to_json(resp.get_ref()))).into_response(),
        Err(s) => error_response(s),
    }
}

async fn submit_task(
    State(s): State<RestState>,
    JsonBody(req): JsonBody<proto::SubmitTaskRequest>,
) -> Response {
    match s.service.submit_task(tonic::Request::new(req)).await {
        Ok(resp) => {
            let code = if resp.get_ref().created { StatusCode::CREATED } else { StatusCode::OK };
            (code, Json(to_json(resp.get_ref()))).into_response()
        }
        Err(status) => error_response(status),
    }
}

async fn submit_tasks(
    State(s): State<RestState>,
    JsonBody(req): JsonBody<proto::SubmitTasksRequest>,
) -> Response {
    answer(StatusCode::OK, async |r| s.service.submit_tasks(r).await, req).await
}

async fn list_tasks(State(s): State<RestState>, Query(q): Query<HashMap<String, String>>) -> Response {
    // Query parameters are the ListTasksRequest fields; a status may be written `pending`.
    let mut obj = serde_json::Map::new();
    for (k, v) in q {
        let v = if k == "status" && !v.starts_with("TASK_STATUS_") {
            format!("TASK_STATUS_{}", v.to_ascii_uppercase())
        } else {
            v
        };
        obj.insert(k, Value::String(v));
    }
    let body = Value::Object(obj).to_string();
    let req = match from_json::<proto::ListTasksRequest>(body.as_bytes()) {
        Ok(r) => r,
        Err(message) => return bad_json(message),
    };
    answer(StatusCode::OK, async |r| s.service.list_tasks(r).await, req).await
}

async fn get_task(State(s): State<RestState>, Path(id): Path<String>) -> Response {
    answer(StatusCode::OK, async |r| s.service.get_task(r).await, proto::GetTaskRequest { task_id: id }).await
}

async fn cancel_task(
    State(s): State<RestState>,
    Path(id): Path<String>,
    JsonBody(mut req): JsonBody<proto::CancelTaskRequest>,
) -> Response {
    req.task_id = id;
    answer(StatusCode::OK, async |r| s.service.cancel_task(r).await, req).await
}

async fn submit_job(
    State(s): State<RestState>,
    JsonBody(req): JsonBody<proto::SubmitJobRequest>,
) -> Response {
    answer(StatusCode::CREATED, async |r| s.service.submit_job(r).await, req).await
}

#[derive(Debug, serde::Deserialize)]
struct JobQuery {
    #[serde(default)]
    include_results: bool,
}

async fn get_job(State(s): State<RestState>, Path(id): Path<String>, Query(q): Query<JobQuery>) -> Response {
    let req = proto::GetJobRequest { job_id: id, include_results: q.include_results };
    answer(StatusCode::OK, async |r| s.service.get_job(r).await, req).await
}

async fn list_workers(State(s): State<RestState>) -> Response {
    answer(StatusCode::OK, async |r| s.service.list_workers(r).await, proto::ListWorkersRequest {}).await
}

async fn worker_stats(State(s): State<RestState>, Path(id): Path<String>) -> Response {
    let req = proto::GetWorkerStatsRequest { worker_id: id };
    answer(StatusCode::OK, async |r| s.service.get_worker_stats(r).await, req).await
}
