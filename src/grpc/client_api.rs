//! The client-facing calls on their wire messages: each checks its request
//! ([`super::convert`]), calls the [`Core`], and builds the answer. The gRPC service and
//! the REST routes (whose bodies are the same messages as JSON) both answer through these.

use futures::StreamExt as _;
use tonic::Status;

use super::{BoxStream, convert};
use crate::{
    core::{Core, CoreError},
    domain::NewTask,
    proto, telemetry,
};

/// The trace context a submission's tasks carry: see [`telemetry::submission_traceparent`].
/// `header` is the submitter's `traceparent` (gRPC metadata or HTTP header).
fn traced(mut tasks: Vec<NewTask>, header: Option<&str>) -> Vec<NewTask> {
    let traceparent = telemetry::submission_traceparent(header);
    for t in &mut tasks {
        t.traceparent = traceparent.clone();
    }
    tasks
}

pub async fn submit_task(
    core: &Core,
    req: proto::SubmitTaskRequest,
    traceparent: Option<&str>,
) -> Result<proto::SubmitTaskResponse, CoreError> {
    let task = convert::new_task("", req, &core.config().limits)?;
    let task = traced(vec![task], traceparent);
    let mut submitted = core.submit(task).await?;
    let task =
        submitted.tasks.pop().ok_or_else(|| CoreError::Internal("a submission answered no task".into()))?;
    Ok(convert::submitted_task(task, submitted.warnings))
}

pub async fn submit_tasks(
    core: &Core,
    req: proto::SubmitTasksRequest,
    traceparent: Option<&str>,
) -> Result<proto::SubmitTasksResponse, CoreError> {
    let tasks = traced(convert::new_tasks(req.tasks, &core.config().limits)?, traceparent);
    Ok(core.submit(tasks).await?.into())
}

pub async fn get_task(core: &Core, req: proto::GetTaskRequest) -> Result<proto::Task, CoreError> {
    let id = convert::task_id("task_id", &req.task_id)?;
    Ok(core.get_task(id, req.include_attempts).await?.into())
}

pub async fn list_tasks(
    core: &Core,
    req: proto::ListTasksRequest,
) -> Result<proto::ListTasksResponse, CoreError> {
    let filter = convert::task_filter(req)?;
    let tasks = core.list_tasks(&filter).await?;
    // A full page may have a next one: it starts after the last task of this one.
    let next_page_token = match tasks.last() {
        Some(last) if tasks.len() as u32 == filter.limit => last.task.id.to_string(),
        _ => String::new(),
    };
    Ok(proto::ListTasksResponse { tasks: tasks.into_iter().map(Into::into).collect(), next_page_token })
}

pub async fn cancel_task(
    core: &Core,
    req: proto::CancelTaskRequest,
) -> Result<proto::CancelTaskResponse, CoreError> {
    let id = convert::task_id("task_id", &req.task_id)?;
    let c = core.cancel(id, req.reason).await?;
    Ok(proto::CancelTaskResponse { cancelled: c.applied, task: Some(c.task.into()) })
}

/// The task's events until it is terminal; errors end the stream as a `Status`.
pub async fn watch_task(
    core: &Core,
    req: proto::WatchTaskRequest,
) -> Result<BoxStream<proto::TaskEvent>, CoreError> {
    let id = convert::task_id("task_id", &req.task_id)?;
    let updates = core.watch(id).await?;
    Ok(Box::pin(updates.map(|u| u.map(proto::TaskEvent::from).map_err(Status::from))))
}

pub async fn submit_job(
    core: &Core,
    req: proto::SubmitJobRequest,
    traceparent: Option<&str>,
) -> Result<proto::SubmitJobResponse, CoreError> {
    let mut job = convert::job(req, &core.config().limits)?;
    job.tasks = traced(job.tasks, traceparent);
    let submitted = core.submit_job(job).await?;
    Ok(proto::SubmitJobResponse {
        job_id: submitted.job.id.to_string(),
        task_ids: submitted.task_ids.iter().map(ToString::to_string).collect(),
        warnings: submitted.warnings,
        existing: submitted.existing,
    })
}

pub async fn get_job(core: &Core, req: proto::GetJobRequest) -> Result<proto::Job, CoreError> {
    let id = convert::job_id("job_id", &req.job_id)?;
    let (job, tasks) = core.get_job(id, req.include_results).await?;
    Ok(convert::job_out(job, tasks))
}

pub async fn list_workers(
    core: &Core,
    req: proto::ListWorkersRequest,
) -> Result<proto::ListWorkersResponse, CoreError> {
    let (after, limit) = convert::page(req.page_size, &req.page_token, convert::worker_id)?;
    let workers = core.list_workers(after.as_ref(), limit).await?;
    // A full page may have a next one: it starts after the last worker of this one.
    let next_page_token = match workers.last() {
        Some(last) if workers.len() as u32 == limit => last.record.id.0.clone(),
        _ => String::new(),
    };
    Ok(proto::ListWorkersResponse { workers: workers.into_iter().map(Into::into).collect(), next_page_token })
}

pub async fn get_worker_stats(
    core: &Core,
    req: proto::GetWorkerStatsRequest,
) -> Result<proto::WorkerStats, CoreError> {
    let id = convert::worker_id("worker_id", &req.worker_id)?;
    let (stats, state) = core.worker_stats(&id).await?;
    Ok(convert::worker_stats(id, stats, state))
}

pub async fn create_schedule(
    core: &Core,
    req: proto::CreateScheduleRequest,
) -> Result<proto::Schedule, CoreError> {
    let req = convert::schedule_request(req, &core.config().limits)?;
    Ok(convert::schedule_out(core.create_schedule(req).await?))
}

pub async fn list_schedules(
    core: &Core,
    _req: proto::ListSchedulesRequest,
) -> Result<proto::ListSchedulesResponse, CoreError> {
    let schedules = core.list_schedules().await?;
    Ok(proto::ListSchedulesResponse { schedules: schedules.into_iter().map(convert::schedule_out).collect() })
}

pub async fn pause_schedule(
    core: &Core,
    req: proto::PauseScheduleRequest,
) -> Result<proto::Schedule, CoreError> {
    let id = convert::schedule_id("schedule_id", &req.schedule_id)?;
    Ok(convert::schedule_out(core.pause_schedule(id, req.paused).await?))
}

pub async fn delete_schedule(
    core: &Core,
    req: proto::DeleteScheduleRequest,
) -> Result<proto::DeleteScheduleResponse, CoreError> {
    let id = convert::schedule_id("schedule_id", &req.schedule_id)?;
    core.delete_schedule(id).await?;
    Ok(proto::DeleteScheduleResponse {})
}

pub async fn set_type_limit(
    core: &Core,
    req: proto::SetTypeLimitRequest,
) -> Result<proto::TypeLimit, CoreError> {
    let task_type = convert::task_type("task_type", &req.task_type)?;
    let max = match (req.clear, req.max_in_flight) {
        (true, _) => None,
        (false, Some(max)) => Some(max),
        (false, None) => {
            return Err(CoreError::invalid(
                "max_in_flight",
                "required: the most tasks of the type assigned or running at once (0 holds them all); \
                 clear removes the limit",
            ));
        }
    };
    Ok(convert::type_limit(core.set_type_limit(&task_type, max).await?))
}

pub async fn list_type_limits(
    core: &Core,
    _req: proto::ListTypeLimitsRequest,
) -> Result<proto::ListTypeLimitsResponse, CoreError> {
    Ok(proto::ListTypeLimitsResponse {
        limits: core.type_limits().await?.into_iter().map(convert::type_limit).collect(),
    })
}

pub async fn retry_task(core: &Core, req: proto::RetryTaskRequest) -> Result<proto::Task, CoreError> {
    let id = convert::task_id("task_id", &req.task_id)?;
    Ok(convert::waiting_task(core.retry(id).await?, None))
}

pub async fn retry_tasks(
    core: &Core,
    req: proto::RetryTasksRequest,
) -> Result<proto::RetryTasksResponse, CoreError> {
    let (filter, limit) = convert::retry_filter(req)?;
    let r = core.retry_many(filter, limit).await?;
    Ok(proto::RetryTasksResponse {
        retried: r.ids.len() as u32,
        task_ids: r.ids.iter().map(ToString::to_string).collect(),
        more: r.more,
    })
}

pub async fn list_jobs(
    core: &Core,
    req: proto::ListJobsRequest,
) -> Result<proto::ListJobsResponse, CoreError> {
    let (before, limit) = convert::page(req.page_size, &req.page_token, convert::job_id)?;
    let jobs = core.list_jobs(before, limit).await?;
    // A full page may have a next one: it starts before the last (oldest) job of this one.
    let next_page_token = match jobs.last() {
        Some(last) if jobs.len() as u32 == limit => last.id.to_string(),
        _ => String::new(),
    };
    Ok(proto::ListJobsResponse {
        jobs: jobs.into_iter().map(|j| convert::job_out(j, Vec::new())).collect(),
        next_page_token,
    })
}

pub async fn cancel_job(
    core: &Core,
    req: proto::CancelJobRequest,
) -> Result<proto::CancelJobResponse, CoreError> {
    let id = convert::job_id("job_id", &req.job_id)?;
    let r = core.cancel_job(id, req.reason).await?;
    Ok(proto::CancelJobResponse { cancelled: r.cancelled, job: Some(convert::job_out(r.job, Vec::new())) })
}

/// The job's progress until it is done; errors end the stream as a `Status`.
pub async fn watch_job(core: &Core, req: proto::WatchJobRequest) -> Result<BoxStream<proto::Job>, CoreError> {
    let id = convert::job_id("job_id", &req.job_id)?;
    let updates = core.watch_job(id).await?;
    Ok(Box::pin(updates.map(|u| u.map(|j| convert::job_out(j, Vec::new())).map_err(Status::from))))
}

pub async fn get_failure_summary(
    core: &Core,
    req: proto::GetFailureSummaryRequest,
) -> Result<proto::FailureSummary, CoreError> {
    let since = req.since.as_ref().map(|t| convert::time("since", t)).transpose()?;
    let until = req.until.as_ref().map(|t| convert::time("until", t)).transpose()?;
    let (since, until, summary) = core.failure_summary(since, until, req.top).await?;
    Ok(convert::failure_summary(since, until, summary))
}
