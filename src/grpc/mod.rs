//! The gRPC service: thin handlers over [`crate::core`]. Each parses its request
//! ([`convert`]), calls the core, and maps the answer; errors become a `Status` in one place
//! ([`status`]). Client-facing calls are in [`client_api`], worker-facing ones in
//! [`worker_api`]; the auth check is in [`auth`], call metrics in [`layer`], call spans (and the
//! caller's trace context) in [`trace`], the HTTP/2 server in [`serve`].

pub mod auth;
pub mod client_api;
pub mod convert;
pub mod health;
pub mod layer;
pub mod serve;
pub mod status;
pub mod trace;
pub mod worker_api;

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};

use crate::{
    core::Core,
    proto::{self, coordinator_service_server::CoordinatorService},
};

/// The caller's W3C `traceparent` metadata, if any.
fn traceparent(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// A server stream of one of the service's messages.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The `CoordinatorService` implementation. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Service {
    core: Core,
}

impl Service {
    pub fn new(core: Core) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl CoordinatorService for Service {
    async fn register_worker(
        &self,
        request: Request<proto::RegisterWorkerRequest>,
    ) -> Result<Response<proto::RegisterWorkerResponse>, Status> {
        worker_api::register_worker(&self.core, request).await
    }

    async fn send_heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        worker_api::send_heartbeat(&self.core, request).await
    }

    type ReceiveTasksStream = BoxStream<proto::TaskAssignment>;

    async fn receive_tasks(
        &self,
        request: Request<proto::ReceiveTasksRequest>,
    ) -> Result<Response<Self::ReceiveTasksStream>, Status> {
        worker_api::receive_tasks(&self.core, request)
    }

    async fn report_completion(
        &self,
        request: Request<proto::ReportCompletionRequest>,
    ) -> Result<Response<proto::ReportResponse>, Status> {
        worker_api::report_completion(&self.core, request).await
    }

    async fn report_completions(
        &self,
        request: Request<proto::ReportCompletionsRequest>,
    ) -> Result<Response<proto::ReportCompletionsResponse>, Status> {
        worker_api::report_completions(&self.core, request).await
    }

    async fn report_failure(
        &self,
        request: Request<proto::ReportFailureRequest>,
    ) -> Result<Response<proto::ReportResponse>, Status> {
        worker_api::report_failure(&self.core, request).await
    }

    async fn deregister(
        &self,
        request: Request<proto::DeregisterRequest>,
    ) -> Result<Response<proto::DeregisterResponse>, Status> {
        worker_api::deregister(&self.core, request).await
    }

    async fn submit_task(
        &self,
        request: Request<proto::SubmitTaskRequest>,
    ) -> Result<Response<proto::SubmitTaskResponse>, Status> {
        let traceparent = traceparent(request.metadata());
        Ok(Response::new(
            client_api::submit_task(&self.core, request.into_inner(), traceparent.as_deref()).await?,
        ))
    }

    async fn submit_tasks(
        &self,
        request: Request<proto::SubmitTasksRequest>,
    ) -> Result<Response<proto::SubmitTasksResponse>, Status> {
        let traceparent = traceparent(request.metadata());
        Ok(Response::new(
            client_api::submit_tasks(&self.core, request.into_inner(), traceparent.as_deref()).await?,
        ))
    }

    async fn get_task(
        &self,
        request: Request<proto::GetTaskRequest>,
    ) -> Result<Response<proto::Task>, Status> {
        Ok(Response::new(client_api::get_task(&self.core, request.into_inner()).await?))
    }

    async fn list_tasks(
        &self,
        request: Request<proto::ListTasksRequest>,
    ) -> Result<Response<proto::ListTasksResponse>, Status> {
        Ok(Response::new(client_api::list_tasks(&self.core, request.into_inner()).await?))
    }

    async fn cancel_task(
        &self,
        request: Request<proto::CancelTaskRequest>,
    ) -> Result<Response<proto::CancelTaskResponse>, Status> {
        Ok(Response::new(client_api::cancel_task(&self.core, request.into_inner()).await?))
    }

    type WatchTaskStream = BoxStream<proto::TaskEvent>;

    async fn watch_task(
        &self,
        request: Request<proto::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        Ok(Response::new(client_api::watch_task(&self.core, request.into_inner()).await?))
    }

    async fn submit_job(
        &self,
        request: Request<proto::SubmitJobRequest>,
    ) -> Result<Response<proto::SubmitJobResponse>, Status> {
        let traceparent = traceparent(request.metadata());
        Ok(Response::new(
            client_api::submit_job(&self.core, request.into_inner(), traceparent.as_deref()).await?,
        ))
    }

    async fn get_job(&self, request: Request<proto::GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        Ok(Response::new(client_api::get_job(&self.core, request.into_inner()).await?))
    }

    async fn list_workers(
        &self,
        request: Request<proto::ListWorkersRequest>,
    ) -> Result<Response<proto::ListWorkersResponse>, Status> {
        Ok(Response::new(client_api::list_workers(&self.core, request.into_inner()).await?))
    }

    async fn get_worker_stats(
        &self,
        request: Request<proto::GetWorkerStatsRequest>,
    ) -> Result<Response<proto::WorkerStats>, Status> {
        Ok(Response::new(client_api::get_worker_stats(&self.core, request.into_inner()).await?))
    }

    async fn create_schedule(
        &self,
        request: Request<proto::CreateScheduleRequest>,
    ) -> Result<Response<proto::Schedule>, Status> {
        Ok(Response::new(client_api::create_schedule(&self.core, request.into_inner()).await?))
    }

    async fn list_schedules(
        &self,
        request: Request<proto::ListSchedulesRequest>,
    ) -> Result<Response<proto::ListSchedulesResponse>, Status> {
        Ok(Response::new(client_api::list_schedules(&self.core, request.into_inner()).await?))
    }

    async fn pause_schedule(
        &self,
        request: Request<proto::PauseScheduleRequest>,
    ) -> Result<Response<proto::Schedule>, Status> {
        Ok(Response::new(client_api::pause_schedule(&self.core, request.into_inner()).await?))
    }

    async fn delete_schedule(
        &self,
        request: Request<proto::DeleteScheduleRequest>,
    ) -> Result<Response<proto::DeleteScheduleResponse>, Status> {
        Ok(Response::new(client_api::delete_schedule(&self.core, request.into_inner()).await?))
    }

    async fn retry_task(
        &self,
        request: Request<proto::RetryTaskRequest>,
    ) -> Result<Response<proto::Task>, Status> {
        Ok(Response::new(client_api::retry_task(&self.core, request.into_inner()).await?))
    }

    async fn retry_tasks(
        &self,
        request: Request<proto::RetryTasksRequest>,
    ) -> Result<Response<proto::RetryTasksResponse>, Status> {
        Ok(Response::new(client_api::retry_tasks(&self.core, request.into_inner()).await?))
    }

    async fn list_jobs(
        &self,
        request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        Ok(Response::new(client_api::list_jobs(&self.core, request.into_inner()).await?))
    }

    async fn cancel_job(
        &self,
        request: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::CancelJobResponse>, Status> {
        Ok(Response::new(client_api::cancel_job(&self.core, request.into_inner()).await?))
    }

    type WatchJobStream = BoxStream<proto::Job>;

    async fn watch_job(
        &self,
        request: Request<proto::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Ok(Response::new(client_api::watch_job(&self.core, request.into_inner()).await?))
    }

    async fn get_failure_summary(
        &self,
        request: Request<proto::GetFailureSummaryRequest>,
    ) -> Result<Response<proto::FailureSummary>, Status> {
        Ok(Response::new(client_api::get_failure_summary(&self.core, request.into_inner()).await?))
    }

    async fn set_type_limit(
        &self,
        request: Request<proto::SetTypeLimitRequest>,
    ) -> Result<Response<proto::TypeLimit>, Status> {
        Ok(Response::new(client_api::set_type_limit(&self.core, request.into_inner()).await?))
    }

    async fn list_type_limits(
        &self,
        request: Request<proto::ListTypeLimitsRequest>,
    ) -> Result<Response<proto::ListTypeLimitsResponse>, Status> {
        Ok(Response::new(client_api::list_type_limits(&self.core, request.into_inner()).await?))
    }
}
