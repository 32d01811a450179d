//! `is_prime`: payload `{"number":N}` (any u64) -> `{"number":N,"is_prime":bool}`, by a
//! deterministic Miller-Rabin test.

use serde::{Deserialize, Serialize};

use super::{json_result, parse_payload};
use crate::{Handler, TaskContext, TaskFailure};

/// Answers whether a number is prime.
#[derive(Debug, Clone, Copy, Default)]
pub struct IsPrime;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    number: u64,
}

#[derive(Debug, Serialize)]
struct Answer {
    number: u64,
    is_prime: bool,
}

#[tonic::async_trait]
impl Handler for IsPrime {
    async fn run(&self, task: TaskContext) -> Result<Vec<u8>, TaskFailure> {
        let Payload { number } =
            parse_payload("is_prime", &task.payload, r#"{"number":N} with 0 <= N < 2^64"#)?;
        json_result(&Answer { number, is_prime: is_prime(number) })
    }
}

/// Whether `n` is prime: trial division by the primes below 40, then Miller-Rabin with the
/// first twelve prime bases, which is exact for every `n < 3.3 * 10^24` (so every u64).
pub fn is_prime(n: u64) -> bool {
    const BASES: [u64; 12] = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37];
    if n < 2 {
        return false;
    }
    for p in BASES {
        if n.is_multiple_of(p) {
            return n == p;
        }
    }
    if n < 41 * 41 {
        return true;
    }
    // n - 1 = d * 2^s with d odd.
    let s = (n - 1).trailing_zeros();
    let d = (n - 1) >> s;
    'bases: for a in BASES {
        let mut x = pow_mod(a, d, n);
        if x == 1 || x == n - 1 {
            continue;
        }
        for _ in 1..s {
            x = mul_mod(x, x, n);
            if x == n - 1 {
                continue 'bases;
            }
        }
        return false;
    }
    true
}

fn mul_mod(a: u64, b: u64, m: u64) -> u64 {
    ((a as u128 * b as u128) % m as u128) as u64
}

fn pow_mod(mut base: u64, mut exp: u64, m: u64) -> u64 {
    let mut result = 1 % m;
    base %= m;
    while exp > 0 {
        if exp & 1 == 1 {
            result = mul_mod(result, base, m);
        }
        base = mul_mod(base, base, m);
        exp >>= 1;
    }
    result
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::handlers::test_support::*;

    fn trial_division(n: u64) -> bool {
        n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
    }

    #[test]
    fn edge_cases() {
        assert!(!is_prime(0));
        assert!(!is_prime(1));
        assert!(is_prime(2));
        assert!(is_prime(3));
        assert!(!is_prime(4));
        assert!(is_prime(37));
        assert!(is_prime(41));
        assert!(!is_prime(41 * 41));
        assert!(!is_prime(u64::MAX));
    }

    #[test]
    fn large_primes_and_composites() {
        // The largest prime below 2^64, and below 2^63, 2^32.
        assert!(is_prime(18_446_744_073_709_551_557));
        assert!(is_prime(9_223_372_036_854_775_783));
        assert!(is_prime(4_294_967_291));
        assert!(is_prime(1_000_000_007));
        assert!(is_prime(999_999_999_989));
        // Mersenne prime 2^61 - 1; 2^59 - 1 is composite.
        assert!(is_prime((1 << 61) - 1));
        assert!(!is_prime((1 << 59) - 1));
        // Product of two large primes, and a prime square.
        assert!(!is_prime(4_294_967_291 * 4_294_967_279));
        assert!(!is_prime(1_000_000_007 * 1_000_000_007));
        assert!(!is_prime(18_446_744_073_709_551_557 - 2));
    }

    #[test]
    fn carmichael_numbers_and_strong_pseudoprimes_are_composite() {
        for n in
            [561u64, 1105, 1729, 2465, 2821, 6601, 8911, 41041, 825265, 321197185, 5394826801, 232250619601]
        {
            assert!(!is_prime(n), "Carmichael {n}");
        }
        // Strong pseudoprimes to several of the smallest bases at once.
        for n in [2047u64, 3215031751, 2152302898747, 3474749660383, 341550071728321, 3825123056546413051] {
            assert!(!is_prime(n), "strong pseudoprime {n}");
        }
    }

    #[test]
    fn agrees_with_trial_division() {
        for n in (0..20_000).chain(1_000_000_000..1_000_002_000) {
            assert_eq!(is_prime(n), trial_division(n), "{n}");
        }
    }

    #[tokio::test]
    async fn answers_in_json() {
        bounded(async {
            let r = IsPrime.run(task("is_prime", r#"{"number":17}"#)).await.unwrap();
            assert_eq!(json(&r), json!({"number": 17, "is_prime": true}));
            let r = IsPrime.run(task("is_prime", r#"{"number":18446744073709551557}"#)).await.unwrap();
            assert_eq!(r, br#"{"number":18446744073709551557,"is_prime":true}"#.to_vec());
            let r = IsPrime.run(task("is_prime", r#"{"number":18}"#)).await.unwrap();
            assert_eq!(json(&r)["is_prime"], false);
            for bad in [
                "17",
                r#"{"number":-3}"#,
                r#"{"number":1.5}"#,
                r#"{"n":17}"#,
                r#"{"number":18446744073709551616}"#,
            ] {
                let e = IsPrime.run(task("is_prime", bad)).await.unwrap_err();
                assert!(!e.retriable && e.message.starts_with("invalid is_prime payload"), "{bad}: {e:?}");
            }
        })
        .await
    }
}
