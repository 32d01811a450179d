//! Recurring schedules, the pure part: parsing a cron expression in a time zone, and deciding
//! which occurrences a schedule that is due creates now, by its policy for occurrences missed
//! while nothing could fire them (every replica down, the database unreachable).
//!
//! Expressions have 5 fields (minute hour day-of-month month day-of-week), 6 with seconds
//! first or 7 with a year last, in the POSIX/Vixie dialect with the usual extensions (`L`, `#`, `W`, names), as the
//! `croner` crate reads them; the time zone is an IANA name (`Europe/Berlin`), so a daily 02:30
//! follows daylight saving time.

use std::{str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::domain::MissedRuns;

/// An occurrence older than this when the coordinator gets to it was missed.
pub const ON_TIME: Duration = Duration::from_secs(60);
/// At most this many missed occurrences are created at once (`MissedRuns::All`): the latest.
pub const MAX_CATCH_UP: usize = 1000;

/// A parsed expression in its time zone.
#[derive(Debug, Clone)]
pub struct CronSpec {
    cron: croner::Cron,
    tz: Tz,
}

impl CronSpec {
    /// Parses `expr` in `timezone` (empty: UTC). The error names the field at fault
    /// (`cron` or `timezone`) and says what is wrong in one line.
    pub fn parse(expr: &str, timezone: &str) -> Result<CronSpec, (&'static str, String)> {
        let cron = croner::Cron::from_str(expr.trim())
            .map_err(|e| ("cron", format!("{expr:?} is not a cron expression: {e}")))?;
        let tz = match timezone {
            "" => Tz::UTC,
            name => Tz::from_str(name).map_err(|_| {
                ("timezone", format!("{name:?} is not an IANA time zone (e.g. Europe/Berlin)"))
            })?,
        };
        let spec = CronSpec { cron, tz };
        // An expression that never matches (30 February) is refused here, not at its first run.
        spec.next_after(Utc::now()).ok_or_else(|| ("cron", format!("{expr:?} never matches")))?;
        Ok(spec)
    }

    /// The first occurrence strictly after `t`, on a whole second. The cron library works on
    /// local wall-clock time and settles a wall time that daylight saving repeats on its first
    /// instant, which can lie before `t` when `t` is in the repeated hour: such an answer is
    /// passed over (the search moves on a second at a time), so a schedule never goes back in
    /// time, and a wall time that occurs twice runs once, as with classic cron.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut from = whole_second(t);
        // An hour of seconds at most: the length of a repeated hour.
        for _ in 0..3700 {
            let found = self.cron.find_next_occurrence(&from.with_timezone(&self.tz), false).ok()?;
            let found = whole_second(found.with_timezone(&Utc));
            if found > t {
                return Some(found);
            }
            from += chrono::Duration::seconds(1);
        }
        None
    }

    /// The first occurrence at or after `t`.
    fn first_from(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.next_after(t - chrono::Duration::microseconds(1))
    }

    /// The last occurrence at or before `t`.
    fn latest_until(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let until = whole_second(t).with_timezone(&self.tz);
        self.cron.find_previous_occurrence(&until, true).ok().map(|o| whole_second(o.with_timezone(&Utc)))
    }

    /// Occurrences in `[from, until]`, oldest first; at most `cap`, the latest ones. With a cap,
    /// the walk starts at most `cap` occurrences back from `until`, so a long gap costs no more
    /// than a short one.
    fn between(&self, from: DateTime<Utc>, until: DateTime<Utc>, cap: usize) -> Vec<DateTime<Utc>> {
        let mut start = from;
        if cap != usize::MAX {
            let mut back = until;
            for _ in 0..cap {
                match self.latest_until(back) {
                    Some(o) if o >= from && o <= back => {
                        start = o;
                        back = o - chrono::Duration::seconds(1);
                    }
                    _ => break,
                }
            }
        }
        let mut out = Vec::new();
        let mut next = self.first_from(start);
        while let Some(o) = next.filter(|o| *o <= until) {
            out.push(o);
            next = self.next_after(o);
        }
        if out.len() > cap {
            out.drain(..out.len() - cap);
        }
        out
    }
}

/// `t` without its fraction of a second.
fn whole_second(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// What a due schedule does now: the occurrences to create a task for, oldest first, and the
/// next time it is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    pub occurrences: Vec<DateTime<Utc>>,
    /// `None`: the expression matches no later time; the schedule stops.
    pub next: Option<DateTime<Utc>>,
}

/// The occurrences from `due` (the schedule's next run time, itself an occurrence) up to `now`:
/// those within [`ON_TIME`] of `now` always run; older ones (missed) by `missed`: none
/// (`Skip`), only the latest when no on-time one runs (`Latest`), or every one up to
/// [`MAX_CATCH_UP`] (`All`).
pub fn fire(spec: &CronSpec, due: DateTime<Utc>, now: DateTime<Utc>, missed: MissedRuns) -> Firing {
    let next = spec.next_after(now);
    if due > now {
        return Firing { occurrences: Vec::new(), next: Some(due) };
    }
    let on_time_from = now - ON_TIME;
    // Bounded: an occurrence per second for a minute at most, and catch-up is capped.
    let on_time = spec.between(due.max(on_time_from), now, usize::MAX);
    let mut occurrences = match missed {
        _ if due >= on_time_from => Vec::new(),
        MissedRuns::Skip => Vec::new(),
        MissedRuns::Latest if on_time.is_empty() => {
            spec.latest_until(on_time_from).filter(|o| *o >= due).into_iter().collect()
        }
        MissedRuns::Latest => Vec::new(),
        MissedRuns::All => {
            let until = on_time_from - chrono::Duration::microseconds(1);
            spec.between(due, until, MAX_CATCH_UP)
        }
    };
    occurrences.extend(on_time);
    Firing { occurrences, next }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn expressions_and_zones_are_checked() {
        assert!(CronSpec::parse("*/5 * * * *", "").is_ok());
        assert!(CronSpec::parse("* * * * * *", "UTC").is_ok(), "six fields: seconds first");
        assert!(CronSpec::parse("0 0 2 * * * 2099", "UTC").is_ok(), "seven fields: a year last");
        assert!(CronSpec::parse("0 30 2 * * *", "Europe/Berlin").is_ok());
        let (field, bad) = CronSpec::parse("every minute", "").unwrap_err();
        assert!(field == "cron" && bad.starts_with("\"every minute\" is not a cron expression"), "{bad}");
        let (field, bad) = CronSpec::parse("* * * * *", "Mars/Olympus").unwrap_err();
        assert!(field == "timezone" && bad.contains("not an IANA time zone"), "{bad}");
        let (field, bad) = CronSpec::parse("0 0 30 2 *", "").unwrap_err();
        assert!(field == "cron" && bad.contains("never matches"), "{bad}");
    }

    #[test]
    fn a_daily_time_follows_its_zone_through_daylight_saving() {
        let berlin = CronSpec::parse("30 2 * * *", "Europe/Berlin").unwrap();
        // Winter: UTC+1.
        assert_eq!(berlin.next_after(t("2026-01-10T00:00:00Z")), Some(t("2026-01-10T01:30:00Z")));
        // Summer: UTC+2.
        assert_eq!(berlin.next_after(t("2026-07-10T00:00:00Z")), Some(t("2026-07-10T00:30:00Z")));
    }

    #[test]
    fn on_time_occurrences_run_and_missed_ones_follow_the_policy() {
        let every_minute = CronSpec::parse("* * * * *", "").unwrap();
        let now = t("2026-06-01T12:00:30Z");
        // Due a moment ago: that occurrence runs, whatever the policy.
        for missed in [MissedRuns::Skip, MissedRuns::Latest, MissedRuns::All] {
            let f = fire(&every_minute, t("2026-06-01T12:00:00Z"), now, missed);
            assert_eq!(f.occurrences, vec![t("2026-06-01T12:00:00Z")], "{missed:?}");
            assert_eq!(f.next, Some(t("2026-06-01T12:01:00Z")));
        }
        // Down for ten minutes: 11:50 .. 11:59 were missed, 12:00 is on time.
        let due = t("2026-06-01T11:50:00Z");
        assert_eq!(
            fire(&every_minute, due, now, MissedRuns::Skip).occurrences,
            vec![t("2026-06-01T12:00:00Z")]
        );
        assert_eq!(
            fire(&every_minute, due, now, MissedRuns::Latest).occurrences,
            vec![t("2026-06-01T12:00:00Z")]
        );
        let all = fire(&every_minute, due, now, MissedRuns::All).occurrences;
        assert_eq!(all.len(), 11);
        assert_eq!((all[0], all[10]), (due, t("2026-06-01T12:00:00Z")));
        // An hourly schedule down over its hour: nothing on time; Latest runs the missed one.
        let hourly = CronSpec::parse("0 * * * *", "").unwrap();
        let now = t("2026-06-01T12:20:00Z");
        let due = t("2026-06-01T12:00:00Z");
        assert!(fire(&hourly, due, now, MissedRuns::Skip).occurrences.is_empty());
        assert_eq!(fire(&hourly, due, now, MissedRuns::Latest).occurrences, vec![due]);
        assert_eq!(fire(&hourly, due, now, MissedRuns::All).occurrences, vec![due]);
        assert_eq!(fire(&hourly, due, now, MissedRuns::Latest).next, Some(t("2026-06-01T13:00:00Z")));
        // Not due yet: nothing.
        let f = fire(&hourly, t("2026-06-01T13:00:00Z"), now, MissedRuns::All);
        assert_eq!(f, Firing { occurrences: vec![], next: Some(t("2026-06-01T13:00:00Z")) });
    }

    #[test]
    fn a_schedule_never_goes_back_in_time_when_daylight_saving_repeats_an_hour() {
        // Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET at 01:00 UTC; 02:xx happens twice.
        let hourly = CronSpec::parse("0 * * * *", "Europe/Berlin").unwrap();
        let mut at = t("2026-10-24T22:30:00Z");
        for _ in 0..6 {
            let next = hourly.next_after(at).unwrap();
            assert!(next > at, "{next} after {at}");
            at = next;
        }
        let daily = CronSpec::parse("30 2 * * *", "Europe/Berlin").unwrap();
        // 02:10 CET, inside the repeated hour: the next 02:30 is ahead, never the CEST one behind.
        let inside = t("2026-10-25T01:10:00Z");
        assert!(daily.next_after(inside).unwrap() > inside);
        let f = fire(&daily, t("2026-10-25T00:30:00Z"), inside, MissedRuns::Skip);
        assert!(f.next.unwrap() > inside, "{f:?}");
    }

    #[test]
    fn occurrences_fall_on_whole_seconds_whatever_the_time_asked_from() {
        let every_second = CronSpec::parse("* * * * * *", "").unwrap();
        let now = t("2026-06-01T12:00:00.588678Z");
        assert_eq!(every_second.next_after(now), Some(t("2026-06-01T12:00:01Z")));
        assert_eq!(every_second.next_after(t("2026-06-01T12:00:01Z")), Some(t("2026-06-01T12:00:02Z")));
        let f = fire(&every_second, t("2026-06-01T11:59:58Z"), now, MissedRuns::All);
        assert_eq!(
            f.occurrences,
            vec![t("2026-06-01T11:59:58Z"), t("2026-06-01T11:59:59Z"), t("2026-06-01T12:00:00Z")]
        );
        let f = fire(&every_second, t("2026-06-01T11:00:00Z"), now, MissedRuns::All);
        assert!(f.occurrences.iter().all(|o| o.timestamp_subsec_nanos() == 0));
        assert_eq!(f.occurrences.len(), MAX_CATCH_UP + ON_TIME.as_secs() as usize);
        let minutely = CronSpec::parse("* * * * *", "").unwrap();
        assert_eq!(minutely.next_after(now), Some(t("2026-06-01T12:01:00Z")));
    }

    #[test]
    fn catching_up_keeps_the_latest_occurrences_only() {
        let every_second = CronSpec::parse("* * * * * *", "").unwrap();
        let now = t("2026-06-01T12:00:00Z");
        let f = fire(&every_second, now - chrono::Duration::hours(2), now, MissedRuns::All);
        let on_time = ON_TIME.as_secs() as usize + 1;
        assert_eq!(f.occurrences.len(), MAX_CATCH_UP + on_time);
        assert!(f.occurrences.windows(2).all(|w| w[0] < w[1]), "oldest first, no repeats");
        assert_eq!(*f.occurrences.last().unwrap(), now);
    }

    proptest! {
        /// Firing from where the last firing left off never creates an occurrence twice and,
        /// with `All` and gaps shorter than the catch-up, never skips one.
        #[test]
        fn successive_firings_create_each_occurrence_once(gaps in prop::collection::vec(1i64..400, 1..20)) {
            let spec = CronSpec::parse("*/7 * * * * *", "").unwrap();
            let start = t("2026-06-01T00:00:00Z");
            let mut due = spec.next_after(start).unwrap();
            let mut now = start;
            let mut seen = Vec::new();
            for gap in gaps {
                now += chrono::Duration::seconds(gap);
                let f = fire(&spec, due, now, MissedRuns::All);
                seen.extend(f.occurrences);
                if due <= now {
                    due = f.next.unwrap();
                }
            }
            let expected = spec.between(spec.next_after(start).unwrap(), now, usize::MAX);
            prop_assert_eq!(seen, expected);
        }
    }
}
