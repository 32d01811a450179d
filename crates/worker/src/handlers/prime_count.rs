//! `prime_count`: payload `{"low":L,"high":H}` -> `{"count":N}`, the number of primes `p` with
//! `L <= p < H` (the half-open range `[L, H)`, so slices `[a, b)`, `[b, c)` add up exactly; for
//! `{"low":0,"high":100000}` the answer is 9592).
//!
//! The count is a segmented sieve of Eratosthenes over the odd numbers of the range, run on a
//! blocking thread. Ranges may sit anywhere in `u64` but be at most [`MAX_WIDTH`] wide. Base
//! primes are sieved up to `sqrt(H)` but never past [`MAX_BASE`] (nor much past the width of
//! the range); when that falls short of `sqrt(H)`, the numbers the sieve leaves are confirmed
//! with a deterministic Miller-Rabin test. Cancellation and the deadline are checked between
//! segments, and the sieve also stops when the handler's future is dropped.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{cancelled, is_prime::is_prime, json_result, parse_payload};
use crate::{Handler, TaskContext, TaskFailure};

/// The widest range one task may count: `high - low <= 10^9`.
pub const MAX_WIDTH: u64 = 1_000_000_000;
/// Base primes are sieved up to at most this (664,579 primes, 2.6 MB).
pub const MAX_BASE: u64 = 10_000_000;
/// Odd numbers per segment (a 256 KiB buffer, covering 2^19 integers).
const SEGMENT: u64 = 1 << 18;

/// Counts the primes in a range.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrimeCount;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    low: u64,
    high: u64,
}

#[derive(Debug, Serialize)]
struct Count {
    count: u64,
}

#[tonic::async_trait]
impl Handler for PrimeCount {
    async fn run(&self, task: TaskContext) -> Result<Vec<u8>, TaskFailure> {
        let Payload { low, high } =
            parse_payload("prime_count", &task.payload, r#"{"low":L,"high":H} counting primes in [L, H)"#)?;
        validate(low, high).map_err(TaskFailure::permanent)?;
        // Stops the blocking sieve on cancel, and also when this future is dropped (the worker
        // gave up on the task): a detached blocking thread would otherwise run to the end.
        let stop = task.cancelled.child_token();
        let _stop_on_drop = stop.clone().drop_guard();
        let deadline = task.deadline;
        let counted = tokio::task::spawn_blocking(move || {
            count_primes_until(low, high, || {
                stop.is_cancelled() || deadline.is_some_and(|d| SystemTime::now() >= d)
            })
        })
        .await;
        match counted {
            Ok(Some(count)) => json_result(&Count { count }),
            Ok(None) if task.cancelled.is_cancelled() => {
                Err(cancelled(&format!("prime count of [{low}, {high}) stopped")))
            }
            Ok(None) => Err(TaskFailure::retriable(format!(
                "deadline exceeded: prime count of [{low}, {high}) stopped unfinished"
            ))),
            Err(e) => Err(TaskFailure::permanent(format!("prime count of [{low}, {high}) failed: {e}"))),
        }
    }
}

/// Checks a range: `low <= high` and `high - low <= MAX_WIDTH`.
pub fn validate(low: u64, high: u64) -> Result<(), String> {
    if high < low {
        return Err(format!("invalid prime_count payload: high ({high}) is below low ({low})"));
    }
    if high - low > MAX_WIDTH {
        return Err(format!(
            "invalid prime_count payload: the range [{low}, {high}) is {} wide; one task counts at most \
             {MAX_WIDTH} numbers, split it into slices",
            high - low
        ));
    }
    Ok(())
}

/// The number of primes `p` with `low <= p < high` (0 when `high <= low`).
pub fn count_primes(low: u64, high: u64) -> u64 {
    count_primes_until(low, high, || false).unwrap_or_default()
}

/// [`count_primes`], asking `stop` before each segment; `None` if it said stop.
pub fn count_primes_until(low: u64, high: u64, mut stop: impl FnMut() -> bool) -> Option<u64> {
    if stop() {
        return None;
    }
    let mut count = u64::from(low <= 2 && 2 < high);
    // The odd numbers from `start` (odd, >= 3) up to `high - 1`.
    let start = match low.max(3) {
        s if s.is_multiple_of(2) => s + 1,
        s => s,
    };
    if start >= high {
        return Some(count);
    }
    let total = (high - 1 - start) / 2 + 1;
    let root = (high - 1).isqrt();
    // Sieving with primes far beyond the width of a narrow range costs more than testing the
    // few numbers the smaller primes leave.
    let base_limit = root.min(MAX_BASE).min((high - low).max(1 << 16));
    let exact = base_limit >= root;
    let base = odd_primes_up_to(base_limit);
    let mut seg = vec![true; SEGMENT.min(total) as usize];
    let mut done = 0u64;
    while done < total {
        if stop() {
            return None;
        }
        let len = SEGMENT.min(total - done);
        let lo = start + 2 * done;
        let last = lo + 2 * (len - 1);
        let seg = &mut seg[..len as usize];
        seg.fill(true);
        for &p in &base {
            let p = u64::from(p);
            let square = p * p;
            if square > last {
                break;
            }
            // The first odd multiple of p in the segment that is at least p^2.
            let first = if square >= lo {
                square
            } else {
                match lo % p {
                    0 => lo,
                    r => match lo.checked_add(p - r) {
                        Some(m) => m,
                        None => continue,
                    },
                }
            };
            let first = if first.is_multiple_of(2) {
                match first.checked_add(p) {
                    Some(m) => m,
                    None => continue,
                }
            } else {
                first
            };
            if first > last {
                continue;
            }
            let mut j = ((first - lo) / 2) as usize;
            while j < seg.len() {
                seg[j] = false;
                j += p as usize;
            }
        }
        count += if exact {
            seg.iter().filter(|&&left| left).count() as u64
        } else {
            // What survived has no prime factor up to base_limit: prime if below its square,
            // otherwise it needs a test.
            let proven = u128::from(base_limit + 1) * u128::from(base_limit + 1);
            seg.iter()
                .enumerate()
                .filter(|&(j, &left)| {
                    let n = lo + 2 * j as u64;
                    left && (u128::from(n) < proven || is_prime(n))
                })
                .count() as u64
        };
        done += len;
    }
    Some(count)
}

/// The odd primes up to `limit` (which is at most [`MAX_BASE`]), by a plain sieve over odds.
fn odd_primes_up_to(limit: u64) -> Vec<u32> {
    if limit < 3 {
        return Vec::new();
    }
    let limit = limit.min(MAX_BASE) as usize;
    // composite[i] is about 2i + 1.
    let mut composite = vec![false; limit / 2 + 1];
    let mut i = 3;
    while i * i <= limit {
        if !composite[i / 2] {
            let mut m = i * i;
            while m <= limit {
                composite[m / 2] = true;
                m += 2 * i;
            }
        }
        i += 2;
    }
    (1..=(limit - 1) / 2).filter(|&k| !composite[k]).map(|k| (2 * k + 1) as u32).collect()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use serde_json::json;

    use super::*;
    use crate::handlers::test_support::*;

    fn brute(low: u64, high: u64) -> u64 {
        (low..high).filter(|&n| is_prime(n)).count() as u64
    }

    #[test]
    fn known_counts() {
        assert_eq!(count_primes(0, 100_000), 9592);
        assert_eq!(count_primes(0, 10), 4);
        assert_eq!(count_primes(1, 2), 0);
        assert_eq!(count_primes(2, 3), 1);
        assert_eq!(count_primes(0, 2), 0);
        assert_eq!(count_primes(0, 3), 1);
        assert_eq!(count_primes(3, 3), 0);
        assert_eq!(count_primes(5, 3), 0);
        // Half-open: 7 is counted, 11 is not.
        assert_eq!(count_primes(7, 11), 1);
        assert_eq!(count_primes(0, 1_000_000), 78_498);
        // Several segments.
        assert_eq!(count_primes(0, 2_000_000), 148_933);
    }

    #[test]
    fn big_lows() {
        assert_eq!(count_primes(1_000_000_000, 1_000_001_000), 49);
        assert_eq!(count_primes(1_000_000_000, 1_000_001_000), brute(1_000_000_000, 1_000_001_000));
        // Sieved exactly (the base primes reach sqrt(high)).
        let (a, b) = (10_000_000_000, 10_000_200_000);
        assert_eq!(count_primes(a, b), brute(a, b));
        // Base primes stop short of sqrt(high): survivors are tested.
        let (a, b) = (1_000_000_000_000, 1_000_000_050_000);
        assert_eq!(count_primes(a, b), brute(a, b));
        // At the top of u64, without overflow.
        assert_eq!(count_primes(u64::MAX - 2000, u64::MAX), brute(u64::MAX - 2000, u64::MAX));
        assert_eq!(count_primes(18_446_744_073_709_551_557, u64::MAX), 1);
        assert_eq!(count_primes(u64::MAX - 1, u64::MAX), 0);
    }

    #[test]
    fn slices_add_up() {
        let whole = count_primes(0, 300_000);
        let parts: u64 =
            (0..300_000).step_by(37_000).map(|a| count_primes(a, (a + 37_000).min(300_000))).sum();
        assert_eq!(parts, whole);
        for low in 0..60 {
            for high in low..60 {
                assert_eq!(count_primes(low, high), brute(low, high), "[{low}, {high})");
            }
        }
    }

    #[test]
    fn stop_is_honoured_between_segments() {
        assert_eq!(count_primes_until(0, 100, || true), None);
        let mut asked = 0;
        let r = count_primes_until(0, 10_000_000, || {
            asked += 1;
            asked > 3
        });
        assert_eq!(r, None);
        assert_eq!(asked, 4);
    }

    #[test]
    fn ranges_are_validated() {
        assert!(validate(0, 0).is_ok());
        assert!(validate(0, MAX_WIDTH).is_ok());
        assert!(validate(10, 5).unwrap_err().contains("high (5) is below low (10)"));
        assert!(validate(0, MAX_WIDTH + 1).unwrap_err().contains("at most 1000000000"));
    }

    #[tokio::test]
    async fn the_handler_counts_and_refuses_bad_ranges() {
        bounded(async {
            let r = PrimeCount.run(task("prime_count", r#"{"low":0,"high":100000}"#)).await.unwrap();
            assert_eq!(json(&r), json!({"count": 9592}));
            let e = PrimeCount.run(task("prime_count", r#"{"low":10,"high":5}"#)).await.unwrap_err();
            assert!(!e.retriable && e.message.contains("below low"), "{e:?}");
            let e = PrimeCount.run(task("prime_count", r#"{"low":0,"high":2000000000}"#)).await.unwrap_err();
            assert!(!e.retriable && e.message.contains("split it into slices"), "{e:?}");
            let e = PrimeCount.run(task("prime_count", r#"{"low":0}"#)).await.unwrap_err();
            assert!(!e.retriable && e.message.contains("missing field `high`"), "{e:?}");
        })
        .await
    }

    #[tokio::test]
    async fn a_cancel_stops_the_sieve() {
        bounded(async {
            let t = task("prime_count", r#"{"low":0,"high":1000000000}"#);
            let token = t.cancelled.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                token.cancel();
            });
            let started = Instant::now();
            let e = PrimeCount.run(t).await.unwrap_err();
            assert!(e.message.starts_with("cancelled"), "{e:?}");
            assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        })
        .await
    }

    #[tokio::test]
    async fn the_deadline_stops_the_sieve() {
        bounded(async {
            let t = with_deadline(
                task("prime_count", r#"{"low":0,"high":1000000000}"#),
                Duration::from_millis(100),
            );
            let started = Instant::now();
            let e = PrimeCount.run(t).await.unwrap_err();
            assert!(e.retriable && e.message.starts_with("deadline exceeded"), "{e:?}");
            assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        })
        .await
    }
}
