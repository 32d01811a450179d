//! What operators see must be true: every metric the Grafana dashboard and the alert rules use
//! appears in a live `/metrics` scrape (a rename can never silently blank a panel or mute an
//! alert), and the gRPC metrics count exactly the calls made. Its own test binary, so the
//! process-wide metrics hold this test's calls only.

mod common;

use std::{collections::BTreeSet, path::Path, time::Duration};

use common::*;
use coordinator::{
    proto,
    worker::{Worker, WorkerOptions, handler_fn},
};
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

/// The metric names a PromQL expression reads. Label matchers (`{...}`), grouping clauses
/// (`by (...)`), strings, durations (`[5m]`), numbers and function names are skipped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut after_grouping = false;
    while i < chars.len() {
        let c = chars[i];
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
                            i += 1;
                        }
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
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j] == ' ' {
                    j += 1;
                }
                let is_call = j < chars.len() && chars[j] == '(';
                if ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&word.as_str()) {
                    after_grouping = true;
                } else if !(is_call || PROMQL_WORDS.contains(&word.as_str())) {
                    out.insert(word);
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers, including 1e-9.
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '-')
                {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out
}

fn dashboard_exprs(path: &Path) -> Vec<String> {
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vars = d["templating"]["list"].as_array().expect("templating list");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource" && v["name"] == "datasource"),
        "the dashboard has a `datasource` variable"
    );
    let mut exprs = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {} uses the variable", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    exprs
}

fn alert_exprs(path: &Path) -> Vec<String> {
    let v: serde_norway::Value = serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for g in v["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let runbook = r["annotations"]["runbook_url"].as_str().expect("runbook_url");
            let anchor = runbook.rsplit_once('#').expect("an anchor").1;
            let readme = std::fs::read_to_string(manifest("deploy/README.md")).unwrap();
            assert!(
                readme.contains(&format!("<a id=\"{anchor}\"></a>")),
                "deploy/README.md has no anchor {anchor}"
            );
            assert!(r["annotations"]["summary"].as_str().is_some());
            exprs.push(r["expr"].as_str().expect("expr").to_owned());
        }
    }
    exprs
}

fn manifest(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn the_expression_reader_finds_metric_names_only() {
    let got = metric_names(
        r#"histogram_quantile(0.99, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket{grpc_method!~"A|B"}[5m]))) > 1
           and max(coordinator_tasks{status="pending"}) / clamp_min(sum(rate(x_total[5m])), 1e-9) > 0.1 or up{job="c"} == 0
           unless on (instance) y:recorded"#,
    );
    let want: BTreeSet<String> =
        ["grpc_server_handling_seconds_bucket", "coordinator_tasks", "x_total", "up", "y:recorded"]
            .into_iter()
            .map(String::from)
            .collect();
    assert_eq!(got, want);
}

/// A name as it shows in the exposition: histograms as `name_bucket`, `name_sum`, `name_count`.
fn scraped(scrape: &str, name: &str) -> bool {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .any(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_and_alerts_use_only_metrics_the_coordinator_exposes() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |_| {}).await;

    // A worker runs some tasks, one of which fails, so every series has data.
    let mut o = WorkerOptions::new(c.endpoint(), "observed");
    o.capabilities = vec!["echo".into()];
    o.max_concurrent = 4;
    let worker = Worker::new(
        o,
        handler_fn(|t| async move {
            if t.payload == b"fail" {
                Err(coordinator::worker::TaskFailure::permanent("asked to fail"))
            } else {
                Ok(t.payload)
            }
        }),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let mut client = c.client().await;
    wait_connected(&client, &["observed"]).await;
    let n = 7;
    let mut ids = Vec::new();
    for i in 0..n {
        let payload = if i == 0 { b"fail".to_vec() } else { format!("{i}").into_bytes() };
        ids.push(submit(&mut client, "echo", &payload).await);
    }
    for id in &ids {
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
    }
    // An unschedulable task and a refused call.
    submit(&mut client, "nobody-runs-this", b"").await;
    assert!(client.get_task(proto::GetTaskRequest { task_id: "bad".into() }).await.is_err());

    // Gauges from the database refresh every 5 s.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let (code, scrape) = http_get(c.http, "/metrics").await.unwrap();
    assert_eq!(code, 200);

    let mut names = BTreeSet::new();
    let dash = dashboard_exprs(&manifest("deploy/grafana/dashboards/coordinator.json"));
    let alerts = alert_exprs(&manifest("deploy/prometheus/alerts.yml"));
    assert!(dash.len() >= 15 && alerts.len() >= 8, "{} panel queries, {} alerts", dash.len(), alerts.len());
    for e in dash.iter().chain(&alerts) {
        names.extend(metric_names(e));
    }
    // `up` is written by Prometheus itself.
    names.remove("up");
    assert!(names.len() >= 15, "{names:?}");
    let missing: Vec<&String> = names.iter().filter(|n| !scraped(&scrape, n)).collect();
    assert!(missing.is_empty(), "used by the dashboard or alerts but not in /metrics: {missing:?}\n{scrape}");
    // Every name the code declares is used by the dashboard (nothing exported goes unseen).
    for name in coordinator::metrics::ALL {
        let used = names.iter().any(|n| n == name || n.strip_suffix("_bucket") == Some(name));
        assert!(used, "{name} is exported but no panel or alert uses it");
    }

    // The gRPC metrics count exactly the calls made above.
    let line = |method: &str, code: &str| {
        let key = format!(r#"grpc_server_handled_total{{grpc_method="{method}",grpc_code="{code}"}} "#);
        scrape.lines().find_map(|l| l.strip_prefix(&key)).map(|v| v.trim().parse::<f64>().unwrap() as u64)
    };
    assert_eq!(line("SubmitTask", "OK"), Some(n as u64 + 1), "{scrape}");
    assert_eq!(line("GetTask", "InvalidArgument"), Some(1));
    assert_eq!(line("RegisterWorker", "OK"), Some(1));
    let count = format!(r#"grpc_server_handling_seconds_count{{grpc_method="SubmitTask"}} {}"#, n + 1);
    assert!(scrape.contains(&count), "{count}");
    stop.cancel();
    run.await.unwrap().unwrap();
    c.stop().await.unwrap();
}
