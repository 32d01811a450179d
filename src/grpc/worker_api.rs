//! The worker-facing calls: each checks that the caller may act for the worker it names
//! (token binding, client certificate), checks the request
//! ([`super::convert`]), calls the [`Core`], and builds the answer.

use futures::StreamExt as _;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::{BoxStream, auth, convert, serve::ConnectionDraining};
use crate::{core::Core, proto};

pub async fn register_worker(
    core: &Core,
    request: Request<proto::RegisterWorkerRequest>,
) -> Result<Response<proto::RegisterWorkerResponse>, Status> {
    auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
    let registration = convert::registration(request.into_inner())?;
    let joined = core.register(registration).await?;
    Ok(Response::new(proto::RegisterWorkerResponse {
        worker_id: joined.worker_id.0,
        session_id: joined.session_id.to_string(),
        heartbeat_interval_ms: joined.heartbeat_interval.as_millis() as u64,
        coordinator_id: joined.coordinator_id,
    }))
}

pub async fn send_heartbeat(
    core: &Core,
    request: Request<proto::HeartbeatRequest>,
) -> Result<Response<proto::HeartbeatResponse>, Status> {
    auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
    let req = request.into_inner();
    let worker = convert::worker_id("worker_id", &req.worker_id)?;
    let running = convert::running_tasks("running_tasks", &req.running_tasks)?;
    let beat = core.heartbeat(&worker, process(&req.instance_id), running).await?;
    Ok(Response::new(proto::HeartbeatResponse {
        state: convert::worker_state(beat.state) as i32,
        revoked_task_ids: beat.revoked.iter().map(|h| h.task_id.to_string()).collect(),
        revoked: beat
            .revoked
            .iter()
            .map(|h| proto::RunningTask { task_id: h.task_id.to_string(), attempt: h.attempt })
            .collect(),
    }))
}

pub fn receive_tasks(
    core: &Core,
    request: Request<proto::ReceiveTasksRequest>,
) -> Result<Response<BoxStream<proto::TaskAssignment>>, Status> {
    auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
    let worker = convert::worker_id("worker_id", &request.get_ref().worker_id)?;
    // The connection reached its maximum age and was sent GOAWAY: the stream ends cleanly
    // (status OK) and the worker opens a new one on a new connection, so connections
    // rebalance across replicas without cutting a push in half.
    let draining = ConnectionDraining::of(&request);
    let instance = process(&request.get_ref().instance_id);
    let pushes = core.receive(worker, instance, async move { draining.cancelled().await })?;
    let stream = pushes.map(|p| p.map(proto::TaskAssignment::from).map_err(Status::from));
    Ok(Response::new(Box::pin(stream)))
}

pub async fn report_completion(
    core: &Core,
    request: Request<proto::ReportCompletionRequest>,
) -> Result<Response<proto::ReportResponse>, Status> {
    auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
    let req = request.into_inner();
    let held = convert::held(&req.worker_id, &req.task_id, req.attempt)?;
    let accepted = core.complete(held, req.result, req.held_ms).await?;
    Ok(Response::new(accepted.into()))
}

/// Each entry as [`report_completion`] would answer it alone, all at once: the store's
/// completion batcher takes them together.
pub async fn report_completions(
    core: &Core,
    request: Request<proto::ReportCompletionsRequest>,
) -> Result<Response<proto::ReportCompletionsResponse>, Status> {
    auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
    let req = request.into_inner();
    convert::report_count(req.completions.len())?;
    let worker = req.worker_id;
    let verdicts = req.completions.into_iter().map(|c| {
        let span = entry_span(&c.traceparent);
        let worker = &worker;
        async move {
            let held = convert::held(worker, &c.task_id, c.attempt)?;
            core.complete(held, c.result, c.held_ms).await
        }
        .instrument(span)
    });
    let verdicts: Vec<proto::CompletionVerdict> =
        futures::future::join_all(verdicts).await.into_iter().map(convert::completion_verdict).collect();
    for v in &verdicts {
        crate::metrics::report_entry(super::layer::code_label(v.code));
    }
    Ok(Response::new(proto::ReportCompletionsResponse { verdicts }))
}

/// The span of one entry of a [`report_completions`] call: a child of the worker's report
/// when the entry carries its context, otherwise none (the call's own span covers it).
fn entry_span(traceparent: &str) -> tracing::Span {
    match crate::telemetry::parse_traceparent(traceparent) {
        Some(parent) => {
            let span = tracing::info_span!("report_completion", otel.kind = "server");
            crate::telemetry::set_remote_parent(&span, parent);
            span
        }
        None => tracing::Span::none(),
    }
}

pub async fn report_failure(
    core: &Core,
    request: Request<proto::ReportFailureRequest>,
) -> Result<Response<proto::ReportResponse>, Status> {
    auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
    let req = request.into_inner();
    let held = convert::held(&req.worker_id, &req.task_id, req.attempt)?;
    if req.release {
        // Handed back unfinished by a draining worker: not charged.
        let state = core.release(held).await?;
        return Ok(Response::new(proto::ReportResponse {
            duplicate: false,
            status: convert::task_state(state) as i32,
        }));
    }
    let accepted = core.fail(held, req.error, req.retriable, req.held_ms).await?;
    Ok(Response::new(accepted.into()))
}

pub async fn deregister(
    core: &Core,
    request: Request<proto::DeregisterRequest>,
) -> Result<Response<proto::DeregisterResponse>, Status> {
    auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
    let req = request.into_inner();
    let worker = convert::worker_id("worker_id", &req.worker_id)?;
    let in_flight = core.deregister(&worker, process(&req.instance_id), req.reason).await?;
    Ok(Response::new(proto::DeregisterResponse { in_flight }))
}

/// The process a worker's call names (`instance_id`), if it names one: calls of another process
/// than the one that registered the session act for nobody.
fn process(instance_id: &str) -> Option<&str> {
    (!instance_id.is_empty()).then_some(instance_id)
}
