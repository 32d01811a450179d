//! The `job submit` file: one JSON object per line, each a task. Every key is checked before
//! anything is submitted: a key of the wrong type or out of range, or a key the format does not
//! have (a misspelt `depend_on` would otherwise drop a dependency), stops the command with an
//! error naming the file, the line and the key.

use coordinator_worker::proto;
use serde_json::{Map, Value};

/// The keys of a line, in the order the documentation lists them.
const KEYS: [&str; 11] = [
    "type",
    "payload",
    "priority",
    "max_attempts",
    "idempotency_key",
    "delay_ms",
    "depends_on",
    "on_parent_failure",
    "requires",
    "weight",
    "affinity_key",
];

/// The tasks of a file's text; `name` names the file in errors. Blank lines are skipped.
pub fn parse(name: &str, text: &str) -> anyhow::Result<Vec<proto::SubmitTaskRequest>> {
    let mut tasks = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{name} line {}", n + 1);
        // A byte-order mark some editors write is not part of the JSON.
        let line = if n == 0 { line.trim_start_matches('\u{feff}') } else { line };
        let v: Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let Value::Object(fields) = v else {
            anyhow::bail!("{}: not a JSON object", at());
        };
        tasks.push(task(&fields).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?);
    }
    if tasks.is_empty() {
        anyhow::bail!(
            "{name} holds no tasks: one JSON object per line, e.g. {{\"type\":\"echo\",\"payload\":\"hi\"}}"
        );
    }
    Ok(tasks)
}

fn task(fields: &Map<String, Value>) -> Result<proto::SubmitTaskRequest, String> {
    if let Some(unknown) = fields.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!("unknown key \"{unknown}\" (the keys are {})", KEYS.join(", ")));
    }
    // A key given as null is a key not given.
    let get = |k: &str| fields.get(k).filter(|v| !v.is_null());
    let task_type = match get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(format!("\"type\" must be a string, not {other}")),
        None => return Err("no \"type\"".into()),
    };
    let payload = match get("payload") {
        None => Vec::new(),
        Some(Value::String(s)) => s.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
    };
    let on_parent_failure = match get("on_parent_failure") {
        None => proto::ParentFailurePolicy::Fail,
        Some(Value::String(s)) if s == "fail" => proto::ParentFailurePolicy::Fail,
        Some(Value::String(s)) if s == "cancel" => proto::ParentFailurePolicy::Cancel,
        Some(other) => {
            return Err(format!("\"on_parent_failure\" must be \"fail\" or \"cancel\", not {other}"));
        }
    };
    Ok(proto::SubmitTaskRequest {
        task_type,
        payload,
        priority: integer(get("priority"), "priority", i64::from(i32::MIN), i64::from(i32::MAX))? as i32,
        max_attempts: integer(get("max_attempts"), "max_attempts", 0, i64::from(u32::MAX))? as u32,
        idempotency_key: string(get("idempotency_key"), "idempotency_key")?,
        timeout_ms: 0,
        delay_ms: integer(get("delay_ms"), "delay_ms", 0, i64::MAX)? as u64,
        run_at: None,
        // Parents: task ids, or "#N" for the task on line N+1 of this file.
        depends_on: strings(get("depends_on"), "depends_on")?,
        on_parent_failure: on_parent_failure as i32,
        // Worker labels it needs ("gpu=h100", "mem_gb>=256"), slots, affinity key.
        requires: strings(get("requires"), "requires")?,
        weight: integer(get("weight"), "weight", 0, i64::from(u32::MAX))? as u32,
        affinity_key: string(get("affinity_key"), "affinity_key")?,
    })
}

/// An integer key within `min..=max`; 0 when absent.
fn integer(v: Option<&Value>, key: &str, min: i64, max: i64) -> Result<i64, String> {
    let Some(v) = v else { return Ok(0) };
    match v.as_i64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("\"{key}\" must be an integer from {min} to {max}, not {v}")),
    }
}

fn string(v: Option<&Value>, key: &str) -> Result<String, String> {
    match v {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("\"{key}\" must be a string, not {other}")),
    }
}

fn strings(v: Option<&Value>, key: &str) -> Result<Vec<String>, String> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let items = v.as_array().ok_or_else(|| format!("\"{key}\" must be an array of strings, not {v}"))?;
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(format!("\"{key}\" must be an array of strings; it holds {other}")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> anyhow::Result<proto::SubmitTaskRequest> {
        parse("tasks.jsonl", line).map(|mut t| t.remove(0))
    }

    #[test]
    fn a_file_without_tasks_says_so() {
        for text in ["", "\n  \n"] {
            let e = parse("tasks.jsonl", text).unwrap_err().to_string();
            assert!(e.starts_with("tasks.jsonl holds no tasks: one JSON object per line"), "{e}");
        }
    }

    fn refused(line: &str) -> String {
        match one(line) {
            Ok(t) => panic!("{line} was accepted as {t:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_key_is_read() {
        let t =
            one(r##"{"type":"batch","payload":{"a":1},"priority":-5,"max_attempts":4,"idempotency_key":"k",
                "delay_ms":250,"depends_on":["#0","#1"],"on_parent_failure":"cancel","requires":["gpu=h100"],
                "weight":2,"affinity_key":"c7"}"##
                .replace('\n', " ")
                .as_str())
            .unwrap();
        assert_eq!(t.task_type, "batch");
        assert_eq!(t.payload, br#"{"a":1}"#);
        assert_eq!((t.priority, t.max_attempts, t.delay_ms, t.weight), (-5, 4, 250, 2));
        assert_eq!((t.idempotency_key.as_str(), t.affinity_key.as_str()), ("k", "c7"));
        assert_eq!(t.depends_on, ["#0", "#1"]);
        assert_eq!(t.requires, ["gpu=h100"]);
        assert_eq!(t.on_parent_failure, proto::ParentFailurePolicy::Cancel as i32);
    }

    #[test]
    fn absent_and_null_keys_take_their_defaults() {
        let t = one(r#"{"type":"echo","payload":"hi","priority":null,"depends_on":null}"#).unwrap();
        assert_eq!(t.payload, b"hi");
        assert_eq!((t.priority, t.max_attempts, t.delay_ms, t.weight), (0, 0, 0, 0));
        assert!(t.depends_on.is_empty() && t.requires.is_empty());
        assert_eq!(t.on_parent_failure, proto::ParentFailurePolicy::Fail as i32);
    }

    /// Each of these was once accepted with the key dropped, defaulted or wrapped around: a task
    /// that ran without its parent, on any worker, or with another priority.
    #[test]
    fn a_key_of_the_wrong_type_or_range_is_named_with_its_line() {
        for (line, names) in [
            (r##"{"type":"echo","depends_on":"#0"}"##, "\"depends_on\" must be an array of strings"),
            (
                r##"{"type":"echo","depends_on":["#0",1]}"##,
                "\"depends_on\" must be an array of strings; it holds 1",
            ),
            (r#"{"type":"echo","requires":"gpu=h100"}"#, "\"requires\" must be an array of strings"),
            (
                r#"{"type":"echo","on_parent_failure":"explode"}"#,
                "\"on_parent_failure\" must be \"fail\" or \"cancel\"",
            ),
            (r#"{"type":"echo","priority":"high"}"#, "\"priority\" must be an integer"),
            (
                r#"{"type":"echo","priority":4294967301}"#,
                "\"priority\" must be an integer from -2147483648 to 2147483647",
            ),
            (r#"{"type":"echo","priority":1.5}"#, "\"priority\" must be an integer"),
            (
                r#"{"type":"echo","max_attempts":-1}"#,
                "\"max_attempts\" must be an integer from 0 to 4294967295",
            ),
            (r#"{"type":"echo","max_attempts":4294967297}"#, "\"max_attempts\" must be an integer"),
            (r#"{"type":"echo","weight":-1}"#, "\"weight\" must be an integer from 0"),
            (r#"{"type":"echo","delay_ms":-100}"#, "\"delay_ms\" must be an integer from 0"),
            (r#"{"type":"echo","idempotency_key":7}"#, "\"idempotency_key\" must be a string"),
            (r#"{"type":"echo","affinity_key":["a"]}"#, "\"affinity_key\" must be a string"),
            (r#"{"type":7}"#, "\"type\" must be a string"),
            (r#"{"payload":"x"}"#, "no \"type\""),
            (r#"["echo"]"#, "not a JSON object"),
        ] {
            let e = refused(line);
            assert!(e.starts_with("tasks.jsonl line 1: "), "{line}: {e}");
            assert!(e.contains(names), "{line}: {e}");
        }
    }

    #[test]
    fn an_unknown_key_is_refused_not_ignored() {
        let e = refused(r##"{"type":"echo","depend_on":["#0"]}"##);
        assert!(e.contains("unknown key \"depend_on\""), "{e}");
        assert!(e.contains("depends_on"), "the real keys are listed: {e}");
    }

    #[test]
    fn errors_name_the_line_counting_blank_ones_and_a_bom_is_skipped() {
        let text = "\u{feff}{\"type\":\"echo\"}\n\n{\"type\":\"echo\",\"weight\":\"2\"}\n";
        let e = parse("p.jsonl", text).unwrap_err().to_string();
        assert!(e.starts_with("p.jsonl line 3: \"weight\""), "{e}");
        let tasks = parse("p.jsonl", "\u{feff}{\"type\":\"echo\"}\n\n{\"type\":\"sleep\"}\n").unwrap();
        assert_eq!(tasks.iter().map(|t| t.task_type.as_str()).collect::<Vec<_>>(), ["echo", "sleep"]);
    }
}
