//! The values the `task_type` label may take. Task types come from clients, so a label taken
//! from them as written would let any submitter create series without bound. The label is the
//! type only when some live worker (on any replica) declared it lately, or declared it once and
//! tasks of it still wait; any other type is recorded as [`OTHER`]. A type that leaves the set is
//! no longer written, and the exporter drops its series once they have been idle for the
//! series TTL (`http.metrics_series_ttl`).
//!
//! [`TaskTypes::update`] decides the set (a pure function of the readings); the gauge refresh
//! publishes it with [`publish`], and every recording site maps a type through [`label`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::RwLock,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};

use crate::domain::PendingType;

/// The label of every type outside the set.
pub const OTHER: &str = "other";

/// The published set. std RwLock: read on every recording, written once per gauge refresh,
/// never held across an `.await`.
static LABELS: RwLock<BTreeSet<String>> = RwLock::new(BTreeSet::new());

/// The label value for `task_type`: itself when published, [`OTHER`] otherwise.
pub fn label(task_type: &str) -> String {
    let labels = LABELS.read().unwrap_or_else(|e| e.into_inner());
    if labels.contains(task_type) { task_type.to_owned() } else { OTHER.to_owned() }
}

/// Makes `labels` the label values from now on.
pub fn publish(labels: BTreeSet<String>) {
    *LABELS.write().unwrap_or_else(|e| e.into_inner()) = labels;
}

/// Adds the types a worker just declared to the published set (until the next [`publish`],
/// which keeps them while the worker is live).
pub fn declare(types: &[String]) {
    let mut labels = LABELS.write().unwrap_or_else(|e| e.into_inner());
    labels.extend(types.iter().filter(|t| *t != OTHER).cloned());
}

/// When each type was last seen declared by a live worker.
#[derive(Debug, Default)]
pub struct TaskTypes {
    last_declared: HashMap<String, Instant>,
}

impl TaskTypes {
    /// Folds one reading in (the types live workers declare now, the types with pending tasks)
    /// and returns the label values: types declared within `keep_for`, and types declared
    /// earlier that still have pending tasks. A type that is neither is forgotten.
    pub fn update(
        &mut self,
        now: Instant,
        declared: &[String],
        pending: &BTreeMap<String, PendingType>,
        keep_for: Duration,
    ) -> BTreeSet<String> {
        for t in declared {
            // `other` stays the bucket of the rest even if a worker declares it.
            if t != OTHER {
                self.last_declared.insert(t.clone(), now);
            }
        }
        self.last_declared.retain(|t, at| now.duration_since(*at) < keep_for || pending.contains_key(t));
        self.last_declared.keys().cloned().collect()
    }
}

/// Pending work by label value: the count and how long the longest-waiting runnable task has
/// waited, summed (counts) and maxed (waits) over the types a label stands for. Every label of
/// `labels` has an entry (zero when nothing is pending), and so has [`OTHER`].
pub fn pending_by_label(
    pending: &BTreeMap<String, PendingType>,
    labels: &BTreeSet<String>,
    now: DateTime<Utc>,
) -> BTreeMap<String, (u64, Duration)> {
    let mut out: BTreeMap<String, (u64, Duration)> =
        labels.iter().map(|l| (l.clone(), (0, Duration::ZERO))).collect();
    out.entry(OTHER.to_owned()).or_default();
    for (t, p) in pending {
        let key = if labels.contains(t) { t.as_str() } else { OTHER };
        let e = out.get_mut(key).expect("every label has an entry");
        e.0 += p.count;
        e.1 = e.1.max(p.waited(now));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(types: &[(&str, u64, i64)], now: DateTime<Utc>) -> BTreeMap<String, PendingType> {
        types
            .iter()
            .map(|(t, n, ago)| {
                let p = PendingType { count: *n, runnable_since: now - chrono::Duration::seconds(*ago) };
                (t.to_string(), p)
            })
            .collect()
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn declared_types_stay_a_while_then_only_while_tasks_wait() {
        let keep = Duration::from_secs(600);
        let t0 = Instant::now();
        let now = Utc::now();
        let mut types = TaskTypes::default();
        let got = types.update(t0, &["prove".into(), "hash".into()], &BTreeMap::new(), keep);
        assert_eq!(got, set(&["hash", "prove"]));
        // The workers left: both types stay for a while.
        let got = types.update(t0 + Duration::from_secs(599), &[], &BTreeMap::new(), keep);
        assert_eq!(got, set(&["hash", "prove"]));
        // Past it, only the type with waiting tasks stays; undeclared pending types never enter.
        let p = pending(&[("prove", 3, 10), ("random-123", 1, 5)], now);
        let got = types.update(t0 + Duration::from_secs(601), &[], &p, keep);
        assert_eq!(got, set(&["prove"]));
        // Its tasks are gone: so is the type.
        let got = types.update(t0 + Duration::from_secs(602), &[], &BTreeMap::new(), keep);
        assert!(got.is_empty());
        // `other` is never a type of its own.
        let got = types.update(t0 + Duration::from_secs(603), &[OTHER.into()], &BTreeMap::new(), keep);
        assert!(got.is_empty());
    }

    #[test]
    fn pending_work_of_undeclared_types_is_one_other_entry() {
        let now = Utc::now();
        let mut p = pending(&[("prove", 3, 10)], now);
        for i in 0..200 {
            p.insert(
                format!("unknown-{i}"),
                PendingType { count: 1, runnable_since: now - chrono::Duration::seconds(i) },
            );
        }
        // Waiting out a backoff: runnable later, has not waited.
        p.insert(
            "later".into(),
            PendingType { count: 2, runnable_since: now + chrono::Duration::seconds(60) },
        );
        let got = pending_by_label(&p, &set(&["prove", "hash"]), now);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got["prove"], (3, Duration::from_secs(10)));
        assert_eq!(got["hash"], (0, Duration::ZERO));
        assert_eq!(got[OTHER], (202, Duration::from_secs(199)));
        // The counts add up to every pending task.
        assert_eq!(got.values().map(|v| v.0).sum::<u64>(), p.values().map(|v| v.count).sum::<u64>());
        assert_eq!(pending_by_label(&BTreeMap::new(), &BTreeSet::new(), now)[OTHER], (0, Duration::ZERO));
    }

    #[test]
    fn labels_are_published_or_declared_types_or_other() {
        publish(set(&["prove"]));
        assert_eq!(label("prove"), "prove");
        assert_eq!(label("whatever-a-client-sent"), OTHER);
        declare(&["hash".into()]);
        assert_eq!(label("hash"), "hash");
        assert_eq!(label("prove"), "prove");
        publish(set(&["prove"]));
        assert_eq!(label("hash"), OTHER);
    }
}
