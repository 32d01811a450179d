//! A Postgres server that is up but refuses the coordinator's connections (its database closed
//! to connections, as an operator does before a restore) is a database the callers cannot
//! reach: `UNAVAILABLE` (a retry fixes it once it is opened again), never `INTERNAL`; `/health`
//! says so, and the coordinator recovers by itself. The test runs a Postgres server of its own
//! (initdb into a temporary directory), where it may create and close databases.

#[path = "common/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod common;

use std::time::{Duration, Instant};

use common::*;
use coordinator::proto;
use sqlx::{Connection, Executor, PgConnection};
use tonic::Code;

async fn admin(url: &str, sql: &str) {
    let mut c = PgConnection::connect(url).await.expect("admin connection");
    c.execute(sqlx::AssertSqlSafe(sql.to_owned())).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn submit_code(client: &mut Client) -> Code {
    let req = proto::SubmitTaskRequest { task_type: "echo".into(), ..Default::default() };
    match client.submit_task(req).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// With the other Postgres tests: where they run, the server's binaries are installed.
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_database_closed_to_connections_is_unavailable_not_internal() {
    let pg = cluster::OwnPostgres::init();
    let admin_url = pg.url();
    let name = "closing";
    admin(&admin_url, &format!("CREATE DATABASE {name}")).await;
    let db_url = format!("postgres://postgres@127.0.0.1:{}/{name}", pg.port);
    let coordinator = TestCoordinator::start_url(&db_url, |c| {
        c.database.acquire_timeout = Duration::from_secs(1);
    })
    .await;
    let mut client = coordinator.client().await;
    assert_eq!(submit_code(&mut client).await, Code::Ok);

    admin(&admin_url, &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).await;
    admin(
        &admin_url,
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    )
    .await;
    // The first calls may meet a connection the server just ended; then every new connection is
    // refused with "database ... is not currently accepting connections" (SQLSTATE 55000).
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(submit_code(&mut client).await);
    }
    assert!(codes.iter().all(|c| *c == Code::Unavailable), "{codes:?}");
    let (status, body) = http_get(coordinator.http, "/health").await.expect("health answers");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("unreachable"), "{body}");

    admin(&admin_url, &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while submit_code(&mut client).await != Code::Ok {
        assert!(Instant::now() < deadline, "no recovery after the database was opened again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    coordinator.stop().await.expect("stops cleanly");
    pg.stop();
}
