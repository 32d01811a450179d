//! What operators see must be true.
//!
//! - Every metric the Grafana dashboard and the alert rules read appears in a live `/metrics`
//!   scrape, with the type the query assumes (a rename can never silently blank a panel or mute
//!   an alert), and every metric the code declares is shown somewhere.
//! - The gRPC metrics count exactly the calls made, and store statements are timed by operation.
//! - Logs are JSON lines with ISO-8601 timestamps, level, target and fields; lines about a task
//!   carry `worker_id`, `task_id` and `attempt`; `logging.level`, `logging.format` and `RUST_LOG`
//!   work as documented.
//!
//! Its own test binary, so the process-wide metrics hold this file's calls only; the one test
//! that reads them runs its backends one after the other and counts differences.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use coordinator::proto;
use coordinator_worker::{Worker, WorkerOptions, handler_fn};
use tokio_util::sync::CancellationToken;

/// PromQL words that are not metric names.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "predict_linear",
    "histogram_quantile",
    "clamp_min",
    "clamp_max",
    "clamp",
    "abs",
    "absent",
    "absent_over_time",
    "ceil",
    "floor",
    "round",
    "sqrt",
    "exp",
    "ln",
    "log2",
    "log10",
    "time",
    "vector",
    "scalar",
    "label_replace",
    "label_join",
    "sort",
    "sort_desc",
    "changes",
    "resets",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "last_over_time",
    "timestamp",
    "inf",
    "nan",
];

/// Words that end a grouping clause's label list: `by (..)`, `on (..)`, `group_left (..)`.
const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The metric names a PromQL expression reads, as written (`x_bucket` stays `x_bucket`; see
/// [`base_name`]). Label matchers (`{...}`), label lists of grouping clauses (`by (...)`),
/// strings, ranges (`[5m]`), numbers, function names, keywords and Grafana variables (`$x`,
/// `${x}`) are skipped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut i = 0;
    // Set by a grouping keyword: the next `(` opens a label list, not an expression.
    let mut after_grouping = false;
    while i < chars.len() {
        let c = chars[i];
        if after_grouping && !c.is_whitespace() && c != '(' {
            after_grouping = false;
        }
        match c {
            '{' | '[' | '"' | '\'' | '`' => {
                let close = match c {
                    '{' => '}',
                    '[' => ']',
                    q => q,
                };
                i += 1;
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' && close == '}' {
                        // A quoted label value may hold a brace.
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                    } else if chars[i] == '\\' && close != '}' && close != ']' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if after_grouping => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                after_grouping = false;
                i += 1;
            }
            '$' => {
                // A Grafana variable: $name or ${name}.
                i += 1;
                if chars.get(i) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < chars.len() && is_word(chars[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && is_word(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let is_call = j < chars.len() && chars[j] == '(';
                if GROUPING.contains(&word.as_str()) {
                    after_grouping = true;
                } else if !(is_call || PROMQL_WORDS.contains(&word.as_str())) {
                    out.insert(word);
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers (1e-9, 0x1f) and durations (5m, 1h30m).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    if (chars[i] == 'e' || chars[i] == 'E') && chars.get(i + 1) == Some(&'-') {
                        i += 1;
                    }
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The family a name read by a query belongs to: the series of a histogram (`x_bucket`, `x_sum`,
/// `x_count`) map to `x`, with the suffix; any other name maps to itself. `families` is what the
/// scrape declares, so a counter that happens to end in `_count` stays whole.
fn base_name<'a>(name: &'a str, families: &BTreeMap<String, String>) -> (&'a str, Option<&'a str>) {
    if families.contains_key(name) {
        return (name, None);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return (base, Some(suffix));
        }
    }
    (name, None)
}

/// `# TYPE name kind` lines of a Prometheus exposition: name -> kind.
fn families(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, k)| (n.to_owned(), k.trim().to_owned()))
        .collect()
}

/// Whether the exposition has at least one sample of `series` (a full series name).
fn has_sample(scrape: &str, series: &str) -> bool {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .any(|l| l.strip_prefix(series).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
}

fn manifest(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn dashboard() -> serde_json::Value {
    let path = manifest("deploy/grafana/dashboards/coordinator.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn dashboard_exprs() -> Vec<String> {
    let mut exprs = Vec::new();
    for p in dashboard()["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    exprs
}

fn alert_rules() -> Vec<serde_norway::Value> {
    let path = manifest("deploy/prometheus/alerts.yml");
    let v: serde_norway::Value = serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut rules = Vec::new();
    for g in v["groups"].as_sequence().expect("groups") {
        rules.extend(g["rules"].as_sequence().expect("rules").iter().cloned());
    }
    rules
}

fn alert_exprs() -> Vec<String> {
    alert_rules().iter().map(|r| r["expr"].as_str().expect("expr").to_owned()).collect()
}

#[test]
fn the_expression_reader_finds_metric_names_only() {
    let got = metric_names(
        r#"histogram_quantile(0.99, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket{grpc_method!~"A|B"}[5m]))) > 1
           and max(coordinator_tasks{status="pending", x="}"}) / clamp_min(sum(rate(x_total[5m] offset 1h)), 1e-9) > 0.1
           or up{job="c"} == 0 unless on (instance) group_left (version) y:recorded
           + sum(rate(h_seconds_count[$__rate_interval])) by (op) / ${__range_s} * $scale
           + on (a) group_left sum without (b) (label_replace(z, "dst", "$1", "src", "(.*)"))
           + count(q_sum offset 5m) * 1.5e3 + deriv(max(g)[15m:1m]) - 0x1f"#,
    );
    let want: BTreeSet<String> = [
        "grpc_server_handling_seconds_bucket",
        "coordinator_tasks",
        "x_total",
        "up",
        "y:recorded",
        "h_seconds_count",
        "z",
        "q_sum",
        "g",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(got, want);

    // Histogram series map to their family unless the scrape declares the name itself.
    let families: BTreeMap<String, String> =
        [("h_seconds".to_owned(), "histogram".to_owned()), ("odd_count".to_owned(), "counter".to_owned())]
            .into();
    assert_eq!(base_name("h_seconds_bucket", &families), ("h_seconds", Some("_bucket")));
    assert_eq!(base_name("h_seconds_count", &families), ("h_seconds", Some("_count")));
    assert_eq!(base_name("odd_count", &families), ("odd_count", None));
    assert_eq!(base_name("coordinator_tasks", &families), ("coordinator_tasks", None));
}

#[test]
fn the_dashboard_reads_through_the_datasource_variable() {
    let d = dashboard();
    let vars = d["templating"]["list"].as_array().expect("templating list");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["name"] == "datasource" && v["query"] == "prometheus"),
        "the dashboard has a Prometheus `datasource` variable"
    );
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "panel ids are unique: {}", p["id"]);
        assert!(p["gridPos"]["w"].as_u64().is_some(), "panel {} has a position", p["title"]);
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {} uses the variable", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "a query of {} uses the variable",
                p["title"]
            );
        }
    }
    // The panels an operator needs, and deploy/README.md lists every panel with the metrics
    // its queries read.
    let titles: Vec<&str> = panels.iter().map(|p| p["title"].as_str().unwrap()).collect();
    for want in [
        "Workers by state",
        "Capacity slots",
        "Tasks by status",
        "Queue depth (pending)",
        "Throughput",
        "Dispatch latency p50 / p95 / p99",
        "Task duration by type (p50 / p95)",
        "Requeues by reason",
        "Unschedulable tasks",
        "gRPC rate by method",
        "gRPC errors by method and code",
        "gRPC latency by method",
        "Auth failures by reason",
        "Database pool",
        "Database statement latency p99 by operation",
    ] {
        assert!(titles.contains(&want), "no panel {want:?} in {titles:?}");
    }
    let readme = std::fs::read_to_string(manifest("deploy/README.md")).unwrap();
    for p in panels {
        let title = p["title"].as_str().unwrap();
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| {title} |")))
            .unwrap_or_else(|| panic!("deploy/README.md does not list panel {title:?}"));
        for t in p["targets"].as_array().unwrap() {
            for name in metric_names(t["expr"].as_str().unwrap()) {
                let base = name.strip_suffix("_bucket").unwrap_or(&name);
                assert!(
                    row.contains(base),
                    "deploy/README.md's row for {title:?} does not name {base}: {row}"
                );
            }
        }
    }
}

#[test]
fn every_alert_has_a_summary_and_a_runbook_anchor() {
    let readme = std::fs::read_to_string(manifest("deploy/README.md")).unwrap();
    let rules = alert_rules();
    assert!(rules.len() >= 8, "{} alerts", rules.len());
    for r in &rules {
        let name = r["alert"].as_str().expect("alert name");
        assert!(r["annotations"]["summary"].as_str().is_some_and(|s| !s.is_empty()), "{name}: summary");
        let runbook = r["annotations"]["runbook_url"].as_str().expect("runbook_url");
        let (file, anchor) = runbook.rsplit_once('#').expect("an anchor");
        assert!(file.ends_with("deploy/README.md"), "{name}: {runbook}");
        assert!(
            readme.contains(&format!("<a id=\"{anchor}\"></a>")),
            "deploy/README.md has no anchor {anchor}"
        );
        assert!(["critical", "warning", "info"].contains(&r["labels"]["severity"].as_str().unwrap_or("")));
    }
}

/// Runs a worker and some tasks against a coordinator on `db` (one failing, one whose type no
/// worker runs, one refused call), then checks the scrape against the dashboard and the alerts,
/// and the gRPC and statement counts against the calls made.
async fn observe(db: &TestDb, backend: &str) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let (_, before) = http_get(c.http, "/metrics").await.unwrap();

    let worker_id = format!("observed-{backend}");
    let mut o = WorkerOptions::new(c.endpoint(), &worker_id);
    o.capabilities = vec!["echo".into()];
    o.max_concurrent = 4;
    let worker = echo_or_fail(o);
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let mut client = c.client().await;
    wait_connected(&client, &[worker_id.as_str()]).await;
    let n = 7;
    let mut ids = Vec::new();
    // One at a time: each result goes alone, as `ReportCompletion` (results that finish while
    // another is on its way would go together, in one `ReportCompletions`).
    for i in 0..n {
        let payload = if i == 0 { b"fail".to_vec() } else { format!("{i}").into_bytes() };
        let id = submit(&mut client, "echo", &payload).await;
        wait_until("the task finishes", Duration::from_secs(20), || {
            let (id, mut client) = (id.clone(), client.clone());
            async move {
                matches!(
                    task_status(&mut client, &id).await,
                    proto::TaskStatus::Completed | proto::TaskStatus::Failed
                )
            }
        })
        .await;
        ids.push(id);
    }
    // A task nobody runs, a refused call, a REST call, and a stream watched to its end.
    let unschedulable = format!("nobody-runs-{backend}");
    submit(&mut client, &unschedulable, b"").await;
    assert!(
        client.get_task(proto::GetTaskRequest { task_id: "bad".into(), ..Default::default() }).await.is_err()
    );
    let (code, _) = http_get(c.http, &format!("/api/v1/tasks/{}", ids[1])).await.unwrap();
    assert_eq!(code, 200);
    let mut watch =
        client.watch_task(proto::WatchTaskRequest { task_id: ids[1].clone() }).await.unwrap().into_inner();
    // A finished task's stream sends its state and ends.
    while watch.message().await.unwrap().is_some() {}

    // Gauges read off the database refresh every few seconds: wait for this run's. The type
    // nobody declared is counted as `other`, never under its own name.
    let gauge = r#"coordinator_tasks_unschedulable{task_type="other"} 1"#.to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let scrape = loop {
        let (code, body) = http_get(c.http, "/metrics").await.unwrap();
        assert_eq!(code, 200);
        // One refresh sets these gauges one after the other, with a query between: wait for both.
        if body.lines().any(|l| l == gauge)
            && sample(&body, r#"coordinator_tasks{status="completed"}"#) == (n - 1) as f64
        {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "the database gauges never showed this run's\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(sample(&scrape, r#"coordinator_tasks{status="completed"}"#), (n - 1) as f64, "{scrape}");
    assert_eq!(sample(&scrape, r#"coordinator_tasks{status="failed"}"#), 1.0);
    assert_eq!(sample(&scrape, "coordinator_database_up"), 1.0);
    let pool =
        |state: &str| sample(&scrape, &format!(r#"coordinator_db_pool_connections{{state="{state}"}}"#));
    assert!(pool("busy") + pool("idle") >= 1.0, "{backend} pool");
    assert!(!scrape.contains(r#"state="open""#), "open is the sum of busy and idle, not a part");
    // Capacity: used and available add up to the worker's slots.
    let slots = |state: &str| sample(&scrape, &format!(r#"coordinator_capacity_slots{{state="{state}"}}"#));
    assert_eq!(slots("used") + slots("available"), 4.0, "{scrape}");
    assert!(!scrape.contains(r#"kind="total""#));
    // Pending by type and queue age, from the same refresh: the declared type by name (nothing
    // pending), the undeclared one as `other`.
    assert!(scrape.lines().any(|l| l == r#"coordinator_tasks_pending{task_type="echo"} 0"#), "{scrape}");
    assert!(scrape.lines().any(|l| l == r#"coordinator_tasks_pending{task_type="other"} 1"#), "{scrape}");
    assert_eq!(sample(&scrape, r#"coordinator_queue_oldest_pending_seconds{task_type="echo"}"#), 0.0);
    assert!(has_sample(&scrape, "coordinator_queue_oldest_pending_seconds"));
    assert!(!scrape.contains(&unschedulable), "a client's type became a label value:\n{scrape}");
    assert!(
        has_sample(&scrape, r#"coordinator_task_duration_seconds_count{task_type="echo"}"#),
        "a declared type keeps its name: {scrape}"
    );

    // Every name a panel or an alert reads is exposed, with the type the query assumes.
    let declared = families(&scrape);
    let mut names = BTreeSet::new();
    for e in dashboard_exprs().iter().chain(&alert_exprs()) {
        names.extend(metric_names(e));
    }
    // `up` is written by Prometheus itself.
    names.remove("up");
    let mut bases = BTreeSet::new();
    let mut wrong = Vec::new();
    for name in &names {
        let (base, suffix) = base_name(name, &declared);
        bases.insert(base.to_owned());
        match (declared.get(base).map(String::as_str), suffix) {
            (None, _) => wrong.push(format!("{name}: not in /metrics")),
            (Some("histogram"), Some(_)) => {}
            (Some(kind), Some(_)) => wrong.push(format!("{name}: read as a histogram, exposed as a {kind}")),
            (Some("histogram"), None) => {
                wrong.push(format!("{name}: a histogram read without _bucket/_sum/_count"))
            }
            (Some(_), None) if !has_sample(&scrape, name) => wrong.push(format!("{name}: no sample")),
            _ => {}
        }
    }
    assert!(wrong.is_empty(), "dashboard or alerts read what /metrics does not offer: {wrong:?}\n{scrape}");
    assert!(bases.len() >= 15, "{bases:?}");
    // Every name the code declares is exposed with help text and shown by a panel or an alert.
    for name in coordinator::metrics::ALL {
        assert!(scrape.contains(&format!("# HELP {name} ")), "{name} has no HELP line");
        assert!(bases.contains(*name), "{name} is exported but no panel or alert uses it");
    }

    // The gRPC metrics count exactly the calls made above.
    let delta = |series: &str| sample(&scrape, series) - sample(&before, series);
    const SERVICE: &str = "coordinator.CoordinatorService";
    let labels = |method: &str, kind: &str| {
        format!(r#"grpc_service="{SERVICE}",grpc_method="{method}",grpc_type="{kind}""#)
    };
    let handled = |method: &str, code: &str| {
        delta(&format!(r#"grpc_server_handled_total{{{},grpc_code="{code}"}}"#, labels(method, "unary")))
    };
    assert_eq!(handled("SubmitTask", "OK"), (n + 1) as f64, "{scrape}");
    assert_eq!(handled("GetTask", "InvalidArgument"), 1.0);
    assert_eq!(handled("RegisterWorker", "OK"), 1.0);
    assert_eq!(handled("ReportCompletion", "OK"), (n - 1) as f64);
    assert_eq!(handled("ReportFailure", "OK"), 1.0);
    let started = |method: &str, kind: &str| {
        delta(&format!(r#"grpc_server_started_total{{{}}}"#, labels(method, kind)))
    };
    assert_eq!(started("SubmitTask", "unary"), (n + 1) as f64, "{scrape}");
    // Streams: the worker's task stream is still open (started, not handled); the watch ended.
    assert_eq!(started("ReceiveTasks", "server_stream"), 1.0, "{scrape}");
    assert_eq!(started("WatchTask", "server_stream"), 1.0, "{scrape}");
    let watch_ended =
        format!(r#"grpc_server_handled_total{{{},grpc_code="OK"}}"#, labels("WatchTask", "server_stream"));
    assert_eq!(delta(&watch_ended), 1.0, "{scrape}");
    let handling = format!(r#"grpc_server_handling_seconds_count{{{}}}"#, labels("SubmitTask", "unary"));
    assert_eq!(delta(&handling), (n + 1) as f64);

    // REST: counted under the route template, never the raw path.
    let rest = r#"http_requests_total{method="GET",route="/api/v1/tasks/{id}",status="200"}"#;
    assert_eq!(delta(rest), 1.0, "{scrape}");
    assert!(has_sample(
        &scrape,
        r#"http_request_duration_seconds_count{method="GET",route="/api/v1/tasks/{id}"}"#
    ));
    assert!(delta(r#"http_requests_total{method="GET",route="/metrics",status="200"}"#) >= 1.0, "{scrape}");
    assert!(!scrape.lines().any(|l| l.starts_with("http_") && l.contains(&ids[1])), "a raw path in a label");
    assert_eq!(delta("coordinator_tasks_submitted_total"), (n + 1) as f64);
    assert_eq!(delta("coordinator_tasks_completed_total"), (n - 1) as f64);
    assert_eq!(delta("coordinator_tasks_failed_total"), 1.0);

    // Store statements are timed by operation: one submission, one completion each.
    let statements = |op: &str| delta(&format!(r#"coordinator_db_query_seconds_count{{op="{op}"}}"#));
    assert_eq!(statements("create_tasks"), (n + 1) as f64, "{scrape}");
    assert_eq!(statements("fail"), 1.0);
    assert!(
        statements("complete") >= 1.0 && statements("claim") >= 1.0 && statements("live_task_counts") >= 1.0
    );

    stop.cancel();
    run.await.unwrap().unwrap();
    c.stop().await.unwrap();
}

/// The metrics recorder is global to this process, and [`observe`] counts exact deltas: one
/// backend at a time.
static OBSERVING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_dashboard_and_alerts_use_only_metrics_the_coordinator_exposes() {
    let _one_at_a_time = OBSERVING.lock().await;
    let db = TestDb::sqlite().await;
    observe(&db, "sqlite").await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn postgres_dashboard_and_alerts_use_only_metrics_the_coordinator_exposes() {
    let _one_at_a_time = OBSERVING.lock().await;
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    observe(&db, "postgres").await;
    db.cleanup().await;
}

/// The `task_type` label values in a scrape.
fn task_type_labels(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(r#"task_type=""#))
        .filter_map(|(_, rest)| rest.split_once('"'))
        .map(|(v, _)| v.to_owned())
        .collect()
}

/// 200 submissions of types no worker declared, then a worker that runs any type completing
/// them: no series is created for any of those types; they are counted once, as `other`.
async fn burst_of_unknown_types(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut o = WorkerOptions::new(c.endpoint(), "declares-echo");
    o.capabilities = vec!["echo".into()];
    let stop = CancellationToken::new();
    let echo = tokio::spawn(echo_or_fail(o).run(stop.clone()));
    let mut client = c.client().await;
    wait_connected(&client, &["declares-echo"]).await;
    let (_, before) = http_get(c.http, "/metrics").await.unwrap();
    let labels_before = task_type_labels(&before);

    let n = 200;
    let tasks = (0..n)
        .map(|i| proto::SubmitTaskRequest {
            task_type: format!("burst-{i}"),
            payload: b"x".to_vec(),
            ..Default::default()
        })
        .collect();
    client.submit_tasks(proto::SubmitTasksRequest { tasks }).await.unwrap();
    let pending = format!(r#"coordinator_tasks_pending{{task_type="other"}} {n}"#);
    let scrape =
        scrape_until(c.http, "the burst shows as pending `other`", |s| s.lines().any(|l| l == pending)).await;
    assert_eq!(
        sample(&scrape, r#"coordinator_tasks_unschedulable{task_type="other"}"#),
        n as f64,
        "{scrape}"
    );

    // A worker of any type runs them all: their durations are recorded as `other` too.
    let any = tokio::spawn(echo_or_fail(WorkerOptions::new(c.endpoint(), "runs-anything")).run(stop.clone()));
    let completed = r#"coordinator_task_duration_seconds_count{task_type="other"}"#;
    let done = scrape_until(c.http, "the burst completes", |s| {
        sample(s, completed) - sample(&before, completed) >= n as f64
    })
    .await;
    for scrape in [&scrape, &done] {
        assert!(!scrape.contains("burst-"), "a submitted type became a label value:\n{scrape}");
        // The declared type may be new since `before` (its gauges begin at the next refresh).
        let new: BTreeSet<String> = task_type_labels(scrape).difference(&labels_before).cloned().collect();
        assert!(new.iter().all(|l| l == "other" || l == "echo"), "new task_type values {new:?}");
    }
    stop.cancel();
    echo.await.unwrap().unwrap();
    any.await.unwrap().unwrap();
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_burst_of_unknown_task_types_creates_no_series() {
    let _one_at_a_time = OBSERVING.lock().await;
    let db = TestDb::sqlite().await;
    burst_of_unknown_types(&db).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn postgres_a_burst_of_unknown_task_types_creates_no_series() {
    let _one_at_a_time = OBSERVING.lock().await;
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    burst_of_unknown_types(&db).await;
    db.cleanup().await;
}

// ---- logs ----

/// The coordinator binary on a fresh SQLite database, its stdout collected line by line.
struct Logged {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    grpc: u16,
    http: u16,
    _dir: tempfile::TempDir,
}

impl Logged {
    /// Started on two free ports; again on two others when one was taken between the check and
    /// the bind (by a connection of a test running beside this one).
    fn start(logging: &str, rust_log: Option<&str>) -> Logged {
        for _ in 0..3 {
            let mut c = Self::start_once(logging, rust_log);
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", c.http)).is_ok() {
                    return c;
                }
                if c.child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        panic!("the coordinator did not start on free ports three times");
    }

    fn start_once(logging: &str, rust_log: Option<&str>) -> Logged {
        let dir = tempfile::tempdir().unwrap();
        let [grpc, http] = common::free_ports();
        let config = dir.path().join("coordinator.yaml");
        let yaml = format!(
            "coordinator: {{id: log-test, bind_address: 127.0.0.1, grpc_port: {grpc}, http_port: {http}, \
             poll_interval: 200ms}}\n\
             database: {{url: \"sqlite://{}\"}}\n\
             auth: {{enabled: false}}\n\
             logging: {logging}\n",
            dir.path().join("c.db").display()
        );
        std::fs::write(&config, yaml).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coordinator"));
        cmd.arg("-config").arg(&config).stdout(Stdio::piped()).stderr(Stdio::inherit());
        cmd.env_remove("RUST_LOG").env_remove("LOGGING_LEVEL").env_remove("LOGGING_FORMAT");
        if let Some(filter) = rust_log {
            cmd.env("RUST_LOG", filter);
        }
        let mut child = cmd.spawn().expect("spawn coordinator");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Logged { child, lines, grpc, http, _dir: dir }
    }

    async fn wait_live(&self) {
        let addr = ([127, 0, 0, 1], self.http).into();
        wait_until("the coordinator answers /health/live", Duration::from_secs(30), || async move {
            http_get(addr, "/health/live").await.map(|(code, _)| code == 200).unwrap_or(false)
        })
        .await;
    }

    async fn wait_line(&self, what: &str) {
        wait_until(&format!("a log line {what:?}"), Duration::from_secs(20), || {
            let found = self.lines.lock().unwrap().iter().any(|l| l.contains(what));
            async move { found }
        })
        .await;
    }

    /// SIGTERM, then every line it wrote.
    fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let start = std::time::Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                panic!("the coordinator did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The reader thread sees end of file once the process is gone.
        std::thread::sleep(Duration::from_millis(100));
        self.lines.lock().unwrap().clone()
    }
}

/// Each line as a JSON object with an ISO-8601 timestamp, a level, a target and a message.
fn parse_json_lines(lines: &[String]) -> Vec<serde_json::Map<String, serde_json::Value>> {
    assert!(!lines.is_empty(), "no log lines");
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
            let o = v.as_object().unwrap_or_else(|| panic!("not an object: {l}")).clone();
            let ts = o["timestamp"].as_str().unwrap_or_else(|| panic!("no timestamp: {l}"));
            chrono::DateTime::parse_from_rfc3339(ts)
                .unwrap_or_else(|e| panic!("{ts:?} is not ISO-8601: {e}"));
            assert!(ts.ends_with('Z'), "timestamps are UTC: {l}");
            assert!(
                ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&o["level"].as_str().unwrap_or("")),
                "{l}"
            );
            assert!(o["target"].as_str().is_some_and(|t| !t.is_empty()), "no target: {l}");
            assert!(o["message"].as_str().is_some(), "no message: {l}");
            o
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_timestamps_levels_targets_and_task_fields() {
    // `format: auto` with stdout a pipe is JSON; RUST_LOG wins over `logging.level: warn`.
    let c = Logged::start(
        "{level: warn, format: auto}",
        Some("info,coordinator=debug,sqlx=warn,h2=warn,tonic=warn,hyper=warn,tower=warn"),
    );
    c.wait_live().await;
    let endpoint = format!("http://127.0.0.1:{}", c.grpc);
    let mut o = WorkerOptions::new(endpoint.clone(), "logged-worker");
    o.capabilities = vec!["echo".into()];
    let worker = echo_or_fail(o);
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let mut client = client(&endpoint).await;
    wait_connected(&client, &["logged-worker"]).await;
    let done = submit(&mut client, "echo", b"ok").await;
    let failed = submit(&mut client, "echo", b"fail").await;
    c.wait_line(&done).await;
    c.wait_line(&failed).await;
    stop.cancel();
    run.await.unwrap().unwrap();

    let grpc = c.grpc;
    let lines = parse_json_lines(&c.stop());
    let messages: Vec<&str> = lines.iter().map(|o| o["message"].as_str().unwrap()).collect();
    for want in ["coordinator ready", "worker registered", "task completed", "task attempt failed"] {
        assert!(messages.contains(&want), "no {want:?} line in {messages:?}");
    }
    let ready = lines.iter().find(|o| o["message"] == "coordinator ready").unwrap();
    assert_eq!(ready["grpc_port"], grpc);
    assert_eq!(ready["level"], "INFO");
    // Every line about a task names the worker, the task and the attempt.
    let about_tasks: Vec<_> = lines.iter().filter(|o| o.contains_key("task_id")).collect();
    assert!(about_tasks.len() >= 2, "{lines:?}");
    for o in &about_tasks {
        assert!(o.contains_key("worker_id") && o["attempt"].as_u64().is_some(), "{o:?}");
    }
    for id in [&done, &failed] {
        assert!(about_tasks.iter().any(|o| o["task_id"] == id.as_str() && o["worker_id"] == "logged-worker"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_level_and_format_apply_without_rust_log() {
    // `logging.level: warn`: the info lines (ready, shutting down) are left out, warnings kept.
    let c = Logged::start("{level: warn, format: json}", None);
    c.wait_live().await;
    let lines = parse_json_lines(&c.stop());
    assert!(lines.iter().all(|o| ["WARN", "ERROR"].contains(&o["level"].as_str().unwrap())), "{lines:?}");
    assert!(
        lines.iter().any(|o| o["message"].as_str().unwrap().starts_with("authentication is off")),
        "{lines:?}"
    );

    // `format: text`: human-readable lines, `logging.level: info` shows the ready line.
    let c = Logged::start("{level: info, format: text}", None);
    c.wait_live().await;
    c.wait_line("coordinator ready").await;
    let lines = c.stop();
    let ready = lines.iter().find(|l| l.contains("coordinator ready")).unwrap();
    assert!(serde_json::from_str::<serde_json::Value>(ready).is_err(), "{ready}");
    assert!(ready.contains(" INFO ") && ready.contains("grpc_port="), "{ready}");
    let ts = ready.split_whitespace().next().unwrap();
    chrono::DateTime::parse_from_rfc3339(ts).unwrap_or_else(|e| panic!("{ts:?} is not ISO-8601: {e}"));
}

/// An echo worker whose task fails for good when its payload is `fail`.
fn echo_or_fail(o: WorkerOptions) -> Worker {
    Worker::new(
        o,
        handler_fn(|t| async move {
            if t.payload == b"fail" {
                Err(coordinator_worker::TaskFailure::permanent("asked to fail"))
            } else {
                Ok(t.payload)
            }
        }),
    )
    .unwrap()
}

/// The coordinator binary exposes its own process figures under the standard `process_*` names,
/// read from its own `/proc` entry: its pid's resident memory, descriptors and start time.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_reports_its_own_cpu_memory_descriptors_and_start() {
    let c = Logged::start("{level: warn, format: json}", None);
    c.wait_live().await;
    let addr = ([127, 0, 0, 1], c.http).into();
    let (_, scrape) = http_get(addr, "/metrics").await.unwrap();
    for name in coordinator::metrics::process::ALL {
        assert!(has_sample(&scrape, name), "/metrics lacks {name}");
    }
    let pid = c.child.id();
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    let resident_pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    let resident = sample(&scrape, "process_resident_memory_bytes");
    // The same process: within a factor of two of what /proc says of the child (not of us).
    // SAFETY: sysconf reads a process-wide setting.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    assert!(resident > resident_pages * page / 2.0 && resident < resident_pages * page * 2.0, "{resident}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let started = sample(&scrape, "process_start_time_seconds");
    assert!(started > now - 120.0 && started <= now + 1.0, "started {started}, now {now}");
    assert!(sample(&scrape, "process_open_fds") >= 3.0);
    assert!(sample(&scrape, "process_max_fds") >= sample(&scrape, "process_open_fds"));
    assert!(sample(&scrape, "process_cpu_seconds_total") >= 0.0);
    c.stop();
}
