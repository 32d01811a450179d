//! gRPC health (`grpc.health.v1`) that follows readiness: the whole server (`""`) and
//! `coordinator.CoordinatorService` are SERVING while `/health` would answer 200, and
//! NOT_SERVING while the database is unreachable and from the moment shutdown begins, so a
//! gRPC-aware balancer or a Kubernetes `grpc` probe stops sending work exactly when `/health`
//! turns 503.

use std::{sync::Arc, time::Duration};

use tokio::{sync::Mutex, time::MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::info;

use crate::{
    core::{self, Readiness},
    proto::coordinator_service_server::SERVICE_NAME,
    store::Store,
};

/// How often the database is probed for the health status; a status a balancer polls every
/// few seconds is at most this much behind.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// The names whose status follows readiness: the whole server and the coordinator's service.
fn names() -> [&'static str; 2] {
    ["", SERVICE_NAME]
}

/// The gRPC health status of this replica. A `Watch` stream is sent a message only when the
/// status changes: the reporter itself notifies watchers on every set, even of the same value,
/// which a balancer would read as a flap.
#[derive(Clone, Debug)]
pub struct GrpcHealth {
    reporter: HealthReporter,
    /// The status set last, and whether shutdown closed it for good.
    current: Arc<Mutex<(ServingStatus, bool)>>,
}

impl GrpcHealth {
    /// A status that starts SERVING for every followed name.
    pub async fn serving(reporter: HealthReporter) -> GrpcHealth {
        for name in names() {
            reporter.set_service_status(name, ServingStatus::Serving).await;
        }
        GrpcHealth { reporter, current: Arc::new(Mutex::new((ServingStatus::Serving, false))) }
    }

    /// Sets every followed name to `status`; true when that was a change. After [`Self::close`]
    /// nothing changes it: a readiness probe that ran just before shutdown began cannot turn the
    /// status back to SERVING.
    pub async fn set(&self, status: ServingStatus) -> bool {
        let mut current = self.current.lock().await;
        if current.0 == status || current.1 {
            return false;
        }
        for name in names() {
            self.reporter.set_service_status(name, status).await;
        }
        current.0 = status;
        true
    }

    /// NOT_SERVING from now on: shutdown has begun.
    pub async fn close(&self) {
        let mut current = self.current.lock().await;
        if current.0 != ServingStatus::NotServing {
            for name in names() {
                self.reporter.set_service_status(name, ServingStatus::NotServing).await;
            }
            current.0 = ServingStatus::NotServing;
        }
        current.1 = true;
    }
}

/// Keeps the health status in step with readiness until `stop`: at once when `closing` fires,
/// else every [`PROBE_EVERY`]. Changes are logged.
pub async fn follow_readiness(
    health: GrpcHealth,
    store: Store,
    closing: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            _ = closing.cancelled(), if !closing.is_cancelled() => {}
            _ = tick.tick() => {}
        }
        let readiness = core::readiness(&store, &closing).await;
        let status = status_of(readiness);
        if health.set(status).await {
            info!(status = ?status, shutting_down = readiness.shutting_down,
                  database_reachable = readiness.database_reachable, "grpc health status changed");
        }
    }
}

fn status_of(r: Readiness) -> ServingStatus {
    if r.ready() { ServingStatus::Serving } else { ServingStatus::NotServing }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_ready_replica_is_serving() {
        let r =
            |shutting_down, database_reachable| status_of(Readiness { shutting_down, database_reachable });
        assert_eq!(r(false, true), ServingStatus::Serving);
        assert_eq!(r(false, false), ServingStatus::NotServing);
        assert_eq!(r(true, true), ServingStatus::NotServing);
        assert_eq!(r(true, false), ServingStatus::NotServing);
        assert_eq!(names(), ["", "coordinator.CoordinatorService"]);
    }

    /// A watcher hears of changes only: setting the status it already has sends nothing.
    #[tokio::test]
    async fn a_watcher_is_sent_changes_only() {
        use futures::{FutureExt, StreamExt};
        use tonic_health::pb::{HealthCheckRequest, health_server::Health};
        use tonic_health::server::HealthService;

        let reporter = HealthReporter::new();
        let service = HealthService::from_health_reporter(reporter.clone());
        let health = GrpcHealth::serving(reporter).await;
        for name in names() {
            let request = tonic::Request::new(HealthCheckRequest { service: name.into() });
            let mut watch = service.watch(request).await.unwrap().into_inner();
            let status = |m: Option<Result<tonic_health::pb::HealthCheckResponse, tonic::Status>>| {
                m.map(|r| r.unwrap().status)
            };
            assert_eq!(status(watch.next().await), Some(ServingStatus::Serving as i32), "{name:?}");
            assert!(!health.set(ServingStatus::Serving).await);
            assert!(watch.next().now_or_never().is_none(), "{name:?}: no message without a change");
            assert!(health.set(ServingStatus::NotServing).await);
            assert_eq!(status(watch.next().await), Some(ServingStatus::NotServing as i32), "{name:?}");
            assert!(!health.set(ServingStatus::NotServing).await);
            assert!(watch.next().now_or_never().is_none(), "{name:?}: no message without a change");
            assert!(health.set(ServingStatus::Serving).await);
        }
        health.close().await;
        assert!(!health.set(ServingStatus::Serving).await, "closed for good");
    }
}
