//! Wires store -> registry -> scheduler -> sweeper -> servers, and owns the shutdown order:
//! stop assigning, end open task streams with `Unavailable` (workers reconnect elsewhere; their
//! running tasks keep their leases), drain gRPC and HTTP within the deadline, stop the
//! background loops (the registry flushes heartbeats), let the batched writes finish, close
//! the pool.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tracing::{debug, info, warn};

use crate::{
    auth::Authenticator,
    config::{Config, redact_url},
    core::{Core, CoreConfig, SubmitLimits, batches, effects::Effects, schedules},
    domain::Wake,
    events::Events,
    fleet::Fleet,
    grpc::{
        self, Service,
        auth::{GrpcAuthLayer, RateLimiter},
        layer::GrpcMetricsLayer,
        serve::{self, ServeConfig},
        trace::GrpcTraceLayer,
    },
    http::{self, HttpState, Liveness},
    metrics::{
        self,
        task_types::{self, TaskTypes},
    },
    proto::{self, coordinator_service_server::CoordinatorServiceServer},
    pruner::Pruner,
    registry::{Registry, RegistryConfig},
    rest::RestState,
    scheduler::{Scheduler, SchedulerConfig, SchedulerStats},
    store::{RetryPolicy, Store, sqlite::ProcessLock},
    sweeper::Sweeper,
    telemetry,
    tls::{self, ReloadingConfig},
    wakeups::Wakeups,
};

/// How often database-derived gauges (tasks by status, pending by type, pool) are refreshed, at
/// most: at least three times within the series TTL, so no gauge that is set expires.
const GAUGE_REFRESH: Duration = Duration::from_secs(5);

/// How seldom `coordinator_tasks` counts the finished states, in multiples of the last count's
/// duration. That count reads the whole kept history (days of finished tasks by default), on
/// every replica: at each refresh it cost the database most of a core at a few million tasks
/// kept. So it runs at most 1 % of the time: at each refresh while it is quick, every 30 s or so
/// at 2 million kept tasks.
const FINISHED_COUNT_SPACING: u32 = 100;

/// The tokens and certificates the configuration names, read and checked.
type Files = (Authenticator, Option<ReloadingConfig>, Option<ReloadingConfig>);

fn load_files(config: &Config) -> anyhow::Result<Files> {
    tls::install_crypto_provider();
    let auth = Authenticator::from_config(&config.auth)?;
    let (grpc_tls, http_tls) = if config.tls.enabled {
        let grpc = ReloadingConfig::load(&config.tls, tls::Port::Grpc)?;
        let http =
            if config.http.tls { Some(ReloadingConfig::load(&config.tls, tls::Port::Http)?) } else { None };
        (Some(grpc), http)
    } else {
        (None, None)
    };
    Ok((auth, grpc_tls, http_tls))
}

/// A coordinator whose database is open and migrated, ready to serve.
#[derive(Debug)]
pub struct App {
    config: Config,
    store: Store,
    /// Held until [`App::serve`] has closed the store: no other process serves this SQLite file.
    lock: Option<ProcessLock>,
    files: Files,
}

impl App {
    /// Reads the token and certificate files the configuration names (a missing or bad one is
    /// reported before the database is touched), then connects to the database and applies
    /// migrations. A database error is a [`crate::store::StoreError`] in the chain.
    pub async fn connect(config: Config) -> anyhow::Result<App> {
        let files = load_files(&config)?;
        let lock = if config.database.url.starts_with("sqlite:") {
            ProcessLock::acquire(&config.database.url)?
        } else {
            None
        };
        let store = Store::connect(&config.database).await?;
        store.seed_type_limits(&config.scheduler.type_limits).await?;
        info!(database = %redact_url(&config.database.url), backend = store.backend(), "database ready");
        Ok(App { config, store, lock, files })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves on the given listeners until `shutdown` is cancelled, then shuts down in order.
    pub async fn serve(
        self,
        grpc_listener: TcpListener,
        http_listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let App { config, store, lock, files: (auth, grpc_tls, http_tls) } = self;
        let started = Instant::now();
        if !auth.enabled() {
            warn!(
                "authentication is off (auth.enabled: false): any caller that reaches the ports may \
                 submit, report and list; keep them on a trusted network"
            );
        }
        // Per instance, so replicas started together do not recycle connections together.
        let connection_age = (!config.grpc.max_connection_age.is_zero())
            .then(|| config.grpc.max_connection_age.mul_f64(rand::random_range(0.9..1.1)));
        let series_ttl = config.http.metrics_series_ttl;
        let prometheus = metrics::install_with(series_ttl);
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let c = &config.coordinator;

        let wake = Wake::default();
        let events = Events::new();
        let stats = Arc::new(SchedulerStats::default());
        let (registry, dead_rx) = Registry::new(
            RegistryConfig {
                coordinator_id: c.id.clone(),
                heartbeat_timeout: c.heartbeat_timeout,
                cleanup_interval: c.cleanup_interval,
                liveness_write_every: crate::registry::LIVENESS_WRITE_EVERY,
            },
            store.clone(),
            wake.clone(),
        );
        // Before anything is served or written under this replica's name.
        registry.claim_name().await?;

        // Tokens, in the order they fire.
        let stop_assigning = CancellationToken::new();
        let closing = CancellationToken::new();
        let stop_servers = CancellationToken::new();
        let stop_background = CancellationToken::new();

        let (notifier, wakeups) = Wakeups::new(store.clone());
        let effects = Effects::new(registry.clone(), wake.clone(), events.clone(), notifier);
        // Dependents the store released or ended, each after its transition's commit.
        let mut settled = store.settled();
        let (settled_effects, stop) = (effects.clone(), stop_background.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    s = settled.recv() => match s {
                        Some(s) => settled_effects.settled(&s),
                        None => break,
                    },
                }
            }
        });

        let lease = c.stale_task_timeout;
        let scheduler = Scheduler::new(
            SchedulerConfig {
                strategy: config.scheduler.strategy,
                batch_size: config.scheduler.batch_size,
                poll_interval: c.poll_interval,
                lease,
            },
            store.clone(),
            registry.clone(),
            wake.clone(),
            events.clone(),
            Arc::new(effects.clone()),
            stats.clone(),
        );
        let (batchers, batch_handles) = batches::spawn(&store, lease, &effects, Some(scheduler.refiller()));

        let core = Core::new(
            CoreConfig {
                coordinator_id: c.id.clone(),
                heartbeat_timeout: c.heartbeat_timeout,
                lease,
                retry: RetryPolicy {
                    base: config.tasks.retry_backoff_base,
                    max: config.tasks.retry_backoff_max,
                },
                limits: SubmitLimits {
                    default_max_attempts: config.tasks.default_max_attempts,
                    default_timeout: config.tasks.default_timeout,
                    max_payload_size: config.tasks.max_payload_size.as_usize(),
                },
                watch_poll: c.poll_interval.max(Duration::from_millis(500)),
                reject_unknown_types: config.tasks.reject_unknown_types,
            },
            store.clone(),
            registry.clone(),
            effects.clone(),
            events.clone(),
            batchers,
            closing.clone(),
        );

        core.place_at_submission(scheduler.at_submission());
        let sweeper = Sweeper::new(
            store.clone(),
            Arc::new(effects.clone()),
            c.cleanup_interval,
            c.heartbeat_timeout * 2,
            dead_rx,
            c.heartbeat_timeout,
        );

        // Every loop is supervised: one that panics or ends early turns /health/live red (the
        // kubelet restarts the process) and is counted.
        let liveness = Liveness::default();
        let scheduler_task = supervise(
            "scheduler",
            liveness.clone(),
            stop_assigning.clone(),
            scheduler.run(stop_assigning.clone()),
        );
        let (listen_wakeups, notify_wakeups) = wakeups.split();
        let mut background: Vec<JoinHandle<()>> = vec![
            supervise(
                "sweeper",
                liveness.clone(),
                stop_background.clone(),
                sweeper.run(stop_background.clone()),
            ),
            supervise(
                "pruner",
                liveness.clone(),
                stop_background.clone(),
                Pruner::new(store.clone(), &config.retention).run(stop_background.clone()),
            ),
            supervise(
                "registry",
                liveness.clone(),
                stop_background.clone(),
                registry.clone().run(stop_background.clone()),
            ),
            supervise(
                "gauges",
                liveness.clone(),
                stop_background.clone(),
                refresh_gauges(
                    Fleet::new(store.clone(), registry.clone(), c.heartbeat_timeout),
                    store.clone(),
                    registry.clone(),
                    series_ttl,
                    stop_background.clone(),
                ),
            ),
            supervise(
                "listener",
                liveness.clone(),
                stop_background.clone(),
                listen_wakeups.run_listener(
                    wake.clone(),
                    events.clone(),
                    registry.clone(),
                    stop_background.clone(),
                ),
            ),
        ];
        // The notifier outlives the servers and the loops: it sends what they did last.
        let stop_notifier = CancellationToken::new();
        let notifier_task = supervise(
            "notifier",
            liveness.clone(),
            stop_notifier.clone(),
            notify_wakeups.run_notifier(stop_notifier.clone()),
        );

        // gRPC: health and reflection beside the service, so grpcurl works without proto files.
        // Its status follows readiness (the database, shutdown), as `/health` does.
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let grpc_health = grpc::health::GrpcHealth::serving(health_reporter).await;
        background.push(supervise(
            "schedules",
            liveness.clone(),
            stop_background.clone(),
            schedules::run(core.clone(), stop_background.clone()),
        ));
        background.push(supervise(
            "grpc_health",
            liveness.clone(),
            stop_background.clone(),
            grpc::health::follow_readiness(
                grpc_health.clone(),
                store.clone(),
                closing.clone(),
                stop_background.clone(),
            ),
        ));
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let max_recv = config.grpc.max_recv_msg_size.as_usize();
        let max_send = config.grpc.max_send_msg_size.as_usize();
        // The REST API gets its clone of the core first; the gRPC service takes the last one, so
        // once both servers are done nothing holds the batchers' senders and their loops end.
        // One budget per peer for client calls, over gRPC and REST alike.
        let client_limiter = RateLimiter::for_rate(config.grpc.client_rate_limit);
        let api = RestState { core: core.clone(), auth: auth.clone(), limiter: client_limiter.clone() };
        let coordinator_service = CoordinatorServiceServer::new(Service::new(core))
            .max_decoding_message_size(max_recv)
            .max_encoding_message_size(max_send);
        let routes = tonic::service::Routes::new(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(coordinator_service)
            .prepare();
        let grpc_service = ServiceBuilder::new()
            // Outermost first: refused calls are counted in the gRPC metrics too.
            .layer(GrpcMetricsLayer)
            // Refused calls have a span too, joined to the caller's trace.
            .layer(GrpcTraceLayer)
            .layer(GrpcAuthLayer::with_limiter(auth.clone(), client_limiter.clone()))
            .service(routes);
        let ka = &config.grpc.keepalive;
        let serve_config = ServeConfig {
            keepalive_interval: ka.interval,
            keepalive_timeout: ka.timeout,
            tcp_keepalive: ka.tcp,
            max_connection_age: connection_age,
            max_connection_age_grace: config.grpc.max_connection_age_grace,
            drain_timeout: c.shutdown_timeout,
        };
        if let Some(t) = &grpc_tls {
            tokio::spawn(t.clone().watch(config.tls.reload_interval, stop_background.clone()));
        }
        let grpc_server = tokio::spawn(serve::serve(
            grpc_listener,
            grpc_tls,
            grpc_service,
            serve_config,
            stop_servers.clone(),
        ));
        if let Some(t) = &http_tls {
            tokio::spawn(t.clone().watch(config.tls.reload_interval, stop_background.clone()));
        }

        let http_state = HttpState {
            coordinator_id: c.id.clone(),
            store: store.clone(),
            registry: registry.clone(),
            scheduler: stats.clone(),
            metrics: prometheus,
            closing: closing.clone(),
            grpc_addr,
            started,
            auth: auth.clone(),
            liveness: liveness.clone(),
        };
        let router = http::router(http_state, api, config.http.write_timeout, max_recv);
        let http_server = tokio::spawn(http::serve(
            http_listener,
            router,
            config.http.clone(),
            http_tls,
            stop_servers.clone(),
        ));

        info!(
            coordinator_id = %c.id,
            grpc_addr = %grpc_addr,
            http_addr = %http_addr,
            grpc_port = grpc_addr.port(),
            http_port = http_addr.port(),
            database = store.backend(),
            tls = config.tls.enabled,
            mtls = config.tls.enabled && !config.tls.client_ca_file.is_empty(),
            auth = auth.enabled(),
            "coordinator ready"
        );

        shutdown.cancelled().await;
        let deadline = c.shutdown_timeout;
        info!(deadline_ms = deadline.as_millis() as u64, "shutting down");

        // 1. Stop assigning.
        stop_assigning.cancel();
        let _ = scheduler_task.await;
        // 2. Tell workers to go elsewhere: streams end with UNAVAILABLE, /health turns 503.
        closing.cancel();
        grpc_health.close().await;
        // 3. Drain both servers within the deadline.
        stop_servers.cancel();
        let drained = tokio::time::timeout(deadline, async {
            let _ = grpc_server.await;
            let _ = http_server.await;
        })
        .await;
        if drained.is_err() {
            warn!("servers did not drain within the deadline; closing anyway");
        }
        registry.close_streams();
        // 4. Background loops; the registry flushes heartbeats on the way out.
        stop_background.cancel();
        for task in background {
            let _ = task.await;
        }
        // 5. Batched writes finish once their last senders are gone: the servers held the only
        //    clones of the core, and have ended.
        let flushed = tokio::time::timeout(Duration::from_secs(5), async {
            for h in batch_handles {
                let _ = h.await;
            }
        })
        .await;
        if flushed.is_err() {
            warn!("batched writes did not finish in time");
        }
        // 6. Tell the other replicas what happened last, then close the pool.
        stop_notifier.cancel();
        let _ = notifier_task.await;
        store.close().await;
        drop(lock);
        info!("coordinator stopped");
        // 7. The last spans (the shutdown's own included) leave before the process does.
        telemetry::shutdown(Duration::from_secs(5)).await;
        Ok(())
    }
}

/// Spawns a background loop and watches it: a panic, an error, or an end before `stop` was
/// cancelled marks the process not live and is counted.
pub fn supervise(
    task: &'static str,
    liveness: Liveness,
    stop: CancellationToken,
    run: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) -> JoinHandle<()> {
    let handle = tokio::spawn(run);
    tokio::spawn(async move {
        let ended = handle.await;
        let early = !stop.is_cancelled();
        match ended {
            Ok(Ok(())) if !early => return,
            Ok(Ok(())) => tracing::error!(task, "background loop stopped before shutdown"),
            Ok(Err(error)) => tracing::error!(task, %error, "background loop failed"),
            Err(error) => tracing::error!(task, %error, "background loop panicked"),
        }
        metrics::background_failure(task);
        liveness.fail(task);
    })
}

/// Refreshes the gauges that come from the database, the registry and the process, publishes
/// the `task_type` label values (types the live fleet declared within `series_ttl`, or with
/// pending tasks), and runs the exporter's upkeep.
async fn refresh_gauges(
    fleet: Fleet,
    store: Store,
    registry: Registry,
    series_ttl: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(GAUGE_REFRESH.min(series_ttl / 3));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported: HashSet<String> = HashSet::new();
    let mut types = TaskTypes::default();
    let mut finished = BTreeMap::new();
    // When the finished states were last counted, and how long that took.
    let mut finished_at: Option<(Instant, Duration)> = None;
    let exporter = metrics::install();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        // What needs no I/O first, so the first scrape after start-up has it.
        metrics::set_registry_gauges(&registry.counts());
        metrics::process::record();
        metrics::keep_alive();
        let live = store.live_task_counts().await;
        let db_up = live.is_ok();
        if db_up && finished_at.is_none_or(|(at, took)| at.elapsed() >= took * FINISHED_COUNT_SPACING) {
            let started = Instant::now();
            if let Ok(counted) = store.finished_task_counts().await {
                finished = counted;
                finished_at = Some((started, started.elapsed()));
            }
        }
        // While the database is unreachable every state reads 0, as it always has.
        let counts = match live {
            Ok(mut live) => {
                live.extend(finished.iter().map(|(s, n)| (*s, *n)));
                live
            }
            Err(_) => BTreeMap::new(),
        };
        let pending = store.pending_by_type().await.unwrap_or_default();
        let view = fleet.view().await.ok();
        // While the database is unreachable nothing is declared: the set keeps what was
        // declared within the TTL.
        let declared = view.as_ref().map(|v| v.known_types()).unwrap_or_default();
        let labels = types.update(Instant::now(), &declared, &pending, series_ttl);
        task_types::publish(labels.clone());
        let by_label = task_types::pending_by_label(&pending, &labels, chrono::Utc::now());
        let mut unschedulable: BTreeMap<String, u64> = BTreeMap::new();
        if let Some(view) = &view {
            for (t, p) in pending.iter().filter(|(t, _)| !view.runs(t)) {
                *unschedulable.entry(task_types::label(t)).or_default() += p.count;
            }
        }
        // Types that became schedulable drop to zero rather than keep their last value (and
        // leave `/metrics` after the series TTL).
        let mut series: Vec<(String, u64)> = unschedulable.iter().map(|(t, n)| (t.clone(), *n)).collect();
        for gone in reported.iter().filter(|t| !unschedulable.contains_key(*t)) {
            series.push((gone.clone(), 0));
        }
        reported = unschedulable.keys().cloned().collect();
        metrics::set_store_gauges(&counts, &series, &by_label, store.pool_stats(), db_up);
        // Folds recorded histogram samples into their buckets: without it they pile up in
        // memory until a scrape renders them, and nothing may scrape for hours.
        exporter.run_upkeep();
    }
}

/// Binds a listener with a message that names the address.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot bind {what} address {addr}"))
}

/// A signal this soon after the first is the same request delivered twice (GNU `timeout` and
/// some supervisors signal the process and its group at once), not a second request.
const SAME_SIGNAL_WITHIN: std::time::Duration = std::time::Duration::from_millis(250);

/// Cancels `shutdown` on the first SIGINT or SIGTERM; a second one exits the process at once
/// (status 130), unless it comes within [`SAME_SIGNAL_WITHIN`] of the first.
pub async fn shutdown_on_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        warn!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("signal received: shutting down (a second signal exits at once)");
    let first = std::time::Instant::now();
    shutdown.cancel();
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if first.elapsed() >= SAME_SIGNAL_WITHIN {
            break;
        }
        debug!("the same signal again at once: taken as one");
    }
    warn!("second signal: exiting now");
    std::process::exit(130);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicked_loop_marks_the_process_not_live_and_a_clean_stop_does_not() {
        let live = Liveness::default();
        let stop = CancellationToken::new();
        let quiet = supervise("sweeper", live.clone(), stop.clone(), {
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                Ok(())
            }
        });
        let crashed = supervise("scheduler", live.clone(), CancellationToken::new(), async {
            tokio::task::yield_now().await;
            panic!("a defect in a loop");
        });
        crashed.await.unwrap();
        assert_eq!(live.failed(), Some("scheduler"));
        stop.cancel();
        quiet.await.unwrap();
        assert_eq!(live.failed(), Some("scheduler"), "the first failure is kept");

        let live = Liveness::default();
        let early = supervise("registry", live.clone(), CancellationToken::new(), async { Ok(()) });
        early.await.unwrap();
        assert_eq!(live.failed(), Some("registry"), "a loop that ends before shutdown is a failure too");
    }
}
