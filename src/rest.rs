//! The REST/JSON API under `/api/v1/`, for clients without gRPC. Each route answers through the
//! same call over the core as its gRPC method ([`crate::grpc::client_api`]), so validation, auth
//! roles and answers are the same; bodies are the protobuf JSON mapping of the gRPC messages
//! (`bytes` as base64, enums by name, timestamps as RFC 3339, field names as in the .proto;
//! lowerCamelCase is accepted on input).
//!
//! | route | gRPC method | role |
//! |---|---|---|
//! | `POST /api/v1/tasks` | SubmitTask | client |
//! | `POST /api/v1/tasks/batch` | SubmitTasks | client |
//! | `GET /api/v1/tasks?status=&task_type=&job_id=&worker_id=&page_size=&page_token=` | ListTasks | client |
//! | `GET /api/v1/tasks/{id}` (`?include_attempts=true`) | GetTask | client |
//! | `POST /api/v1/tasks/{id}/cancel` | CancelTask | client |
//! | `POST /api/v1/jobs` | SubmitJob | client |
//! | `GET /api/v1/jobs/{id}?include_results=true` | GetJob | client |
//! | `GET /api/v1/jobs?page_size=&page_token=` | ListJobs | client |
//! | `POST /api/v1/jobs/{id}/cancel` | CancelJob | client |
//! | `GET /api/v1/failures?since=&until=&top=` | GetFailureSummary | client |
//! | `GET /api/v1/workers` | ListWorkers | admin |
//! | `GET /api/v1/workers/{id}/stats` | GetWorkerStats | admin |
//! | `POST /api/v1/tasks/{id}/retry` | RetryTask | admin |
//! | `POST /api/v1/tasks/retry` | RetryTasks | admin |
//!
//! Errors are JSON: `{"error": "invalid_argument", "message": "..."}`, with the HTTP status that
//! matches the gRPC code (400 bad input or bad JSON, 401, 403, 404, 409, 413 a body or payload
//! over its limit, 429, 503); `http_status` is the one mapping of a core error.
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
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, SerializeOptions};
use serde_json::{Value, json};
use tracing::{Instrument as _, error};

use crate::{
    auth::{Access, Authenticator, Refusal, Role},
    core::{Core, CoreError},
    grpc::{auth::RateLimiter, client_api},
    metrics, proto, telemetry,
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
    ListWorkersRequest,
    ListWorkersResponse,
    WorkerStats,
    CreateScheduleRequest,
    Schedule,
    ListSchedulesResponse,
    DeleteScheduleResponse,
    RetryTasksRequest,
    RetryTasksResponse,
    ListJobsRequest,
    ListJobsResponse,
    CancelJobRequest,
    CancelJobResponse,
    GetFailureSummaryRequest,
    FailureSummary,
    SetTypeLimitRequest,
    TypeLimit,
    ListTypeLimitsResponse,
);

/// What the REST handlers need.
#[derive(Debug, Clone)]
pub struct RestState {
    pub core: Core,
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
    // Creating a schedule shares its path with the client's listing but needs an admin.
    let admin_layer = axum::middleware::from_fn_with_state(state.auth.clone(), require_admin);
    let client_routes = Router::new()
        .route("/api/v1/tasks", post(submit_task).get(list_tasks))
        .route("/api/v1/tasks/batch", post(submit_tasks))
        .route("/api/v1/tasks/{id}", get(get_task))
        .route("/api/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/api/v1/jobs", post(submit_job).get(list_jobs))
        .route("/api/v1/jobs/{id}", get(get_job))
        .route("/api/v1/schedules", get(list_schedules).merge(post(create_schedule).route_layer(admin_layer)))
        .route("/api/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/api/v1/failures", get(failure_summary))
        .route_layer(client);
    let admin_routes = Router::new()
        .route("/api/v1/workers", get(list_workers))
        .route("/api/v1/workers/{id}/stats", get(worker_stats))
        .route("/api/v1/schedules/{id}", axum::routing::delete(delete_schedule))
        .route("/api/v1/schedules/{id}/pause", post(pause_schedule))
        .route("/api/v1/schedules/{id}/resume", post(resume_schedule))
        .route("/api/v1/tasks/{id}/retry", post(retry_task))
        .route("/api/v1/tasks/retry", post(retry_tasks))
        .route("/api/v1/limits", get(list_type_limits))
        .route("/api/v1/limits/{task_type}", axum::routing::put(set_type_limit).delete(clear_type_limit))
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
    let mut resp = error_response(CoreError::ResourceExhausted(
        "too many requests from this address; retry later".into(),
    ));
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    resp
}

/// Logs and counts a refusal and answers 401 or 403.
pub fn refused_http(peer: &str, path: &str, r: &Refusal) -> Response {
    metrics::auth_failure(r.reason);
    tracing::warn!(peer, path, reason = r.reason, "request refused by the auth check");
    let mut resp = error_response(CoreError::from(r));
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

/// The HTTP status and error name of a core error: the one mapping, as the gRPC codes map.
fn http_status(e: &CoreError) -> (StatusCode, &'static str) {
    match e {
        CoreError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
        // A payload over `tasks.max_payload_size`: the same answer as a body over its limit.
        CoreError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        CoreError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        CoreError::FailedPrecondition(_) => (StatusCode::CONFLICT, "failed_precondition"),
        CoreError::AlreadyExists(_) => (StatusCode::CONFLICT, "already_exists"),
        CoreError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
        CoreError::PermissionDenied(_) => (StatusCode::FORBIDDEN, "permission_denied"),
        CoreError::ResourceExhausted(_) => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
        CoreError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        CoreError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

/// A core error as a JSON answer; `Internal` is logged with its detail and answered without it.
fn error_response(e: CoreError) -> Response {
    let (code, name) = http_status(&e);
    match e {
        CoreError::Internal(detail) => {
            error!(error = %detail, "internal error");
            json_error(code, name, "internal error")
        }
        CoreError::InvalidArgument(m)
        | CoreError::TooLarge(m)
        | CoreError::NotFound(m)
        | CoreError::FailedPrecondition(m)
        | CoreError::AlreadyExists(m)
        | CoreError::Unauthenticated(m)
        | CoreError::PermissionDenied(m)
        | CoreError::ResourceExhausted(m)
        | CoreError::Unavailable(m) => json_error(code, name, &m),
    }
}

/// A protobuf message as JSON, field names as in the .proto, with every field that has no
/// presence of its own given even at its default (see [`with_defaults`]).
fn to_json<M: prost::Message + Named>(msg: &M) -> Value {
    let Some(desc) = POOL.get_message_by_name(M::NAME) else {
        return Value::Null;
    };
    let mut dm = DynamicMessage::new(desc.clone());
    if dm.transcode_from(msg).is_err() {
        return Value::Null;
    }
    let opts = SerializeOptions::new().use_proto_field_name(true).stringify_64_bit_integers(false);
    let mut value = dm.serialize_with_options(serde_json::value::Serializer, &opts).unwrap_or(Value::Null);
    with_defaults(&desc, &mut value);
    value
}

/// Adds the fields proto3's JSON mapping leaves out at their default: zeros, `false`, empty
/// strings, lists and maps, and an enum's first value. A client reads `"in_flight": 0` or
/// `"max_in_flight": 0` (a type held) rather than inferring it from a missing key. Fields with
/// presence stay out when unset: messages (a task not finished has no `finished_at`), and
/// members of a oneof or `optional` fields. Well-known types (timestamps, durations) are
/// left as they serialize.
fn with_defaults(desc: &MessageDescriptor, value: &mut Value) {
    let Value::Object(map) = value else { return };
    for field in desc.fields() {
        let kind = field.kind();
        let nested = kind.as_message().filter(|m| !m.full_name().starts_with("google.protobuf."));
        match map.get_mut(field.name()) {
            Some(present) => match nested {
                Some(m) if field.is_map() => {
                    if let (Some(values), Kind::Message(v)) =
                        (present.as_object_mut(), m.map_entry_value_field().kind())
                    {
                        values.values_mut().for_each(|e| with_defaults(&v, e));
                    }
                }
                Some(m) if field.is_list() => {
                    present.as_array_mut().into_iter().flatten().for_each(|e| with_defaults(m, e));
                }
                Some(m) => with_defaults(m, present),
                None => {}
            },
            None if field.containing_oneof().is_some() => {}
            None => {
                let default = if field.is_map() {
                    Value::Object(serde_json::Map::new())
                } else if field.is_list() {
                    Value::Array(Vec::new())
                } else {
                    match kind {
                        Kind::Message(_) => continue,
                        Kind::Bool => Value::Bool(false),
                        Kind::String | Kind::Bytes => Value::String(String::new()),
                        Kind::Double | Kind::Float => json!(0.0),
                        Kind::Enum(e) => Value::String(e.default_value().name().to_owned()),
                        _ => json!(0),
                    }
                };
                map.insert(field.name().to_owned(), default);
            }
        }
    }
}

/// A protobuf message from a JSON body; the error names the field (`tasks[0].priority`) and
/// what is wrong with it, for a 400.
fn from_json<M: prost::Message + Named + Default>(value: &[u8]) -> Result<M, String> {
    decode_json(value).map_err(|(field, e)| match field {
        Some(field) => format!("request body, field {field}: {e}"),
        None => format!("request body: {e}"),
    })
}

/// The message, or the path of the field that failed (when inside one) and the error.
fn decode_json<M: prost::Message + Named + Default>(
    value: &[u8],
) -> Result<M, (Option<String>, serde_json::Error)> {
    let desc = POOL
        .get_message_by_name(M::NAME)
        .ok_or_else(|| (None, serde::de::Error::custom(format!("no descriptor for {}", M::NAME))))?;
    let mut de = serde_json::Deserializer::from_slice(value);
    let mut track = serde_path_to_error::Track::new();
    let dm = DynamicMessage::deserialize(desc, serde_path_to_error::Deserializer::new(&mut de, &mut track))
        .map_err(|e| {
        let path = track.path().to_string();
        ((path != "." && !path.is_empty()).then_some(path), e)
    })?;
    de.end().map_err(|e| (None, e))?;
    dm.transcode_to::<M>().map_err(|e| (None, serde::de::Error::custom(e)))
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

/// An answer as JSON with status `ok`, or its error as a JSON error.
fn answer<M: prost::Message + Named>(ok: StatusCode, result: Result<M, CoreError>) -> Response {
    match result {
        Ok(msg) => (ok, Json(to_json(&msg))).into_response(),
        Err(e) => error_response(e),
    }
}

async fn submit_task(
    State(s): State<RestState>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<proto::SubmitTaskRequest>,
) -> Response {
    let submitted = client_api::submit_task(&s.core, req, traceparent(&headers))
        .instrument(submit_span("POST /api/v1/tasks", &headers))
        .await;
    match submitted {
        Ok(resp) => {
            let code = if resp.created { StatusCode::CREATED } else { StatusCode::OK };
            (code, Json(to_json(&resp))).into_response()
        }
        Err(e) => error_response(e),
    }
}

async fn submit_tasks(
    State(s): State<RestState>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<proto::SubmitTasksRequest>,
) -> Response {
    let submitted = client_api::submit_tasks(&s.core, req, traceparent(&headers))
        .instrument(submit_span("POST /api/v1/tasks/batch", &headers))
        .await;
    answer(StatusCode::OK, submitted)
}

/// The submitter's W3C `traceparent` header, if any.
fn traceparent(headers: &HeaderMap) -> Option<&str> {
    headers.get("traceparent").and_then(|v| v.to_str().ok())
}

/// The span of a REST submission, a child of the submitter's `traceparent` when one came: the
/// tasks carry its context when trace export is on, as gRPC submissions carry their call's.
fn submit_span(route: &'static str, headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!("http", otel.name = route, otel.kind = "server", http.route = route);
    if let Some(parent) = traceparent(headers).and_then(telemetry::parse_traceparent) {
        telemetry::set_remote_parent(&span, parent);
    }
    span
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
    let req = match query_message::<proto::ListTasksRequest>(obj) {
        Ok(r) => r,
        Err(message) => return bad_json(message),
    };
    answer(StatusCode::OK, client_api::list_tasks(&s.core, req).await)
}

#[derive(Debug, serde::Deserialize)]
struct TaskQuery {
    #[serde(default)]
    include_attempts: bool,
}

async fn get_task(
    State(s): State<RestState>,
    Path(id): Path<String>,
    Query(q): Query<TaskQuery>,
) -> Response {
    let req = proto::GetTaskRequest { task_id: id, include_attempts: q.include_attempts };
    answer(StatusCode::OK, client_api::get_task(&s.core, req).await)
}

async fn cancel_task(
    State(s): State<RestState>,
    Path(id): Path<String>,
    JsonBody(mut req): JsonBody<proto::CancelTaskRequest>,
) -> Response {
    req.task_id = id;
    answer(StatusCode::OK, client_api::cancel_task(&s.core, req).await)
}

async fn submit_job(
    State(s): State<RestState>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<proto::SubmitJobRequest>,
) -> Response {
    let submitted = client_api::submit_job(&s.core, req, traceparent(&headers))
        .instrument(submit_span("POST /api/v1/jobs", &headers))
        .await;
    let code = match &submitted {
        Ok(resp) if resp.existing => StatusCode::OK,
        _ => StatusCode::CREATED,
    };
    answer(code, submitted)
}

#[derive(Debug, serde::Deserialize)]
struct JobQuery {
    #[serde(default)]
    include_results: bool,
}

async fn get_job(State(s): State<RestState>, Path(id): Path<String>, Query(q): Query<JobQuery>) -> Response {
    let req = proto::GetJobRequest { job_id: id, include_results: q.include_results };
    answer(StatusCode::OK, client_api::get_job(&s.core, req).await)
}

/// A request message from query parameters named as its fields (values as in its JSON); the
/// error names what is wrong, for a 400.
fn from_query<M: prost::Message + Named + Default>(q: HashMap<String, String>) -> Result<M, String> {
    query_message(q.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
}

/// [`from_query`] of parameters already made JSON values: the error names the parameter, and
/// no line or column (there is no body).
fn query_message<M: prost::Message + Named + Default>(
    q: serde_json::Map<String, Value>,
) -> Result<M, String> {
    let body = Value::Object(q).to_string();
    decode_json::<M>(body.as_bytes()).map_err(|(field, e)| {
        let text = e.to_string();
        // serde_json places the error in the JSON it was given; the caller wrote no JSON.
        let text = match text.rfind(" at line ") {
            Some(at) => text[..at].to_owned(),
            None => text,
        };
        match field {
            Some(field) => format!("query parameter {field}: {text}"),
            None => format!("query parameters: {text}"),
        }
    })
}

async fn list_jobs(State(s): State<RestState>, Query(q): Query<HashMap<String, String>>) -> Response {
    match from_query::<proto::ListJobsRequest>(q) {
        Ok(req) => answer(StatusCode::OK, client_api::list_jobs(&s.core, req).await),
        Err(message) => bad_json(message),
    }
}

async fn failure_summary(State(s): State<RestState>, Query(q): Query<HashMap<String, String>>) -> Response {
    match from_query::<proto::GetFailureSummaryRequest>(q) {
        Ok(req) => answer(StatusCode::OK, client_api::get_failure_summary(&s.core, req).await),
        Err(message) => bad_json(message),
    }
}

async fn cancel_job(
    State(s): State<RestState>,
    Path(id): Path<String>,
    JsonBody(mut req): JsonBody<proto::CancelJobRequest>,
) -> Response {
    req.job_id = id;
    answer(StatusCode::OK, client_api::cancel_job(&s.core, req).await)
}

async fn list_workers(State(s): State<RestState>, Query(q): Query<HashMap<String, String>>) -> Response {
    match from_query::<proto::ListWorkersRequest>(q) {
        Ok(req) => answer(StatusCode::OK, client_api::list_workers(&s.core, req).await),
        Err(message) => bad_json(message),
    }
}

async fn worker_stats(State(s): State<RestState>, Path(id): Path<String>) -> Response {
    let req = proto::GetWorkerStatsRequest { worker_id: id };
    answer(StatusCode::OK, client_api::get_worker_stats(&s.core, req).await)
}

async fn create_schedule(
    State(s): State<RestState>,
    JsonBody(req): JsonBody<proto::CreateScheduleRequest>,
) -> Response {
    answer(StatusCode::CREATED, client_api::create_schedule(&s.core, req).await)
}

async fn list_type_limits(State(s): State<RestState>) -> Response {
    answer(StatusCode::OK, client_api::list_type_limits(&s.core, proto::ListTypeLimitsRequest {}).await)
}

/// `PUT /api/v1/limits/{task_type}` with `{"max_in_flight": N}`.
async fn set_type_limit(
    State(s): State<RestState>,
    Path(task_type): Path<String>,
    JsonBody(req): JsonBody<proto::SetTypeLimitRequest>,
) -> Response {
    let req = proto::SetTypeLimitRequest { task_type, clear: false, ..req };
    answer(StatusCode::OK, client_api::set_type_limit(&s.core, req).await)
}

async fn clear_type_limit(State(s): State<RestState>, Path(task_type): Path<String>) -> Response {
    let req = proto::SetTypeLimitRequest { task_type, max_in_flight: None, clear: true };
    answer(StatusCode::OK, client_api::set_type_limit(&s.core, req).await)
}

async fn list_schedules(State(s): State<RestState>) -> Response {
    answer(StatusCode::OK, client_api::list_schedules(&s.core, proto::ListSchedulesRequest {}).await)
}

async fn delete_schedule(State(s): State<RestState>, Path(id): Path<String>) -> Response {
    let req = proto::DeleteScheduleRequest { schedule_id: id };
    answer(StatusCode::OK, client_api::delete_schedule(&s.core, req).await)
}

async fn pause_schedule(State(s): State<RestState>, Path(id): Path<String>) -> Response {
    let req = proto::PauseScheduleRequest { schedule_id: id, paused: true };
    answer(StatusCode::OK, client_api::pause_schedule(&s.core, req).await)
}

async fn resume_schedule(State(s): State<RestState>, Path(id): Path<String>) -> Response {
    let req = proto::PauseScheduleRequest { schedule_id: id, paused: false };
    answer(StatusCode::OK, client_api::pause_schedule(&s.core, req).await)
}

async fn retry_task(State(s): State<RestState>, Path(id): Path<String>) -> Response {
    let req = proto::RetryTaskRequest { task_id: id };
    answer(StatusCode::OK, client_api::retry_task(&s.core, req).await)
}

async fn retry_tasks(
    State(s): State<RestState>,
    JsonBody(req): JsonBody<proto::RetryTasksRequest>,
) -> Response {
    answer(StatusCode::OK, client_api::retry_tasks(&s.core, req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(resp: Response) -> Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn core_errors_answer_the_status_of_their_grpc_code_and_hide_internal_detail() {
        let resp = error_response(CoreError::Internal("pool timed out on host db-1".into()));
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body(resp).await, json!({"error": "internal", "message": "internal error"}));

        let resp = error_response(CoreError::TooLarge("payload: 2000 bytes is over the limit".into()));
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body(resp).await["error"], "payload_too_large");

        for (e, code) in [
            (CoreError::invalid("task_id", "must not be empty"), StatusCode::BAD_REQUEST),
            (CoreError::NotFound("task x not found".into()), StatusCode::NOT_FOUND),
            (CoreError::FailedPrecondition("stale".into()), StatusCode::CONFLICT),
            (CoreError::shutting_down(), StatusCode::SERVICE_UNAVAILABLE),
            (CoreError::Unauthenticated("no token".into()), StatusCode::UNAUTHORIZED),
            (CoreError::PermissionDenied("admin only".into()), StatusCode::FORBIDDEN),
        ] {
            let message = e.to_string();
            let resp = error_response(e);
            assert_eq!(resp.status(), code);
            assert_eq!(body(resp).await["message"], message.as_str());
        }
    }
}
