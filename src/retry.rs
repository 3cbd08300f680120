//! Retries, in one place: full-jitter exponential backoff (backon) that honours
//! `Retry-After`, bounded by attempts and by elapsed time.
//!
//! Errors decide *what* is retryable (they implement [`RetryClass`]; connectors' errors
//! do); this module decides *how*. It knows no caller's types, so anything may use it.
//! We use `backon` rather than `backoff`, which is unmaintained (RUSTSEC-2025-0012).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use backon::Retryable;
use rand::Rng;

/// How an error classifies itself for retrying. (Not `Retryable`: that is backon's
/// extension trait for futures, imported here too.)
pub trait RetryClass {
    /// Whether trying again may succeed. Implementations match exhaustively, so a new
    /// error variant must decide.
    fn is_retryable(&self) -> bool;

    /// The target's own wait hint (`Retry-After`), a floor for the next sleep.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub max_elapsed: Duration,
}

/// AWS-style full jitter: sleep n is uniform in [0, min(max, initial * 2^n)].
/// Ends after `max_attempts - 1` sleeps (so at most `max_attempts` calls).
struct FullJitterBackoff {
    policy: RetryPolicy,
    sleeps_given: u32,
}

impl Iterator for FullJitterBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.sleeps_given + 1 >= self.policy.max_attempts {
            return None;
        }
        let ceiling = self
            .policy
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(self.sleeps_given.min(30)))
            .min(self.policy.max_backoff);
        self.sleeps_given += 1;
        let millis = ceiling.as_millis() as u64;
        Some(Duration::from_millis(rand::rng().random_range(0..=millis)))
    }
}

/// What a retried operation came to.
pub struct RetryOutcome<T, E> {
    pub result: Result<T, E>,
    /// Calls made, the first included.
    pub attempts: u32,
    /// Whether retrying stopped because attempts or time ran out (the last error was retryable).
    pub exhausted: bool,
}

/// Runs `operation` until it succeeds, fails permanently, or the policy runs out.
/// `on_retry` is told about every retry (for logs and metrics) before the sleep.
pub async fn run_with_retries<T, E, F, Fut>(
    policy: RetryPolicy,
    mut operation: F,
    mut on_retry: impl FnMut(&E, Duration, u32),
) -> RetryOutcome<T, E>
where
    E: RetryClass,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let attempts = AtomicU32::new(0);
    let result = (|| {
        attempts.fetch_add(1, Ordering::Relaxed);
        operation()
    })
    .retry(FullJitterBackoff {
        policy,
        sleeps_given: 0,
    })
    .sleep(tokio::time::sleep)
    .when(|error: &E| error.is_retryable())
    .adjust(|error, backoff| {
        let backoff = backoff?;
        // A server's Retry-After is a floor, not a suggestion.
        let delay = error.retry_after().map_or(backoff, |hint| hint.max(backoff));
        if started.elapsed() + delay > policy.max_elapsed {
            None
        } else {
            Some(delay)
        }
    })
    .notify(|error, delay| on_retry(error, delay, attempts.load(Ordering::Relaxed)))
    .await;
    let exhausted = matches!(&result, Err(error) if error.is_retryable());
    RetryOutcome {
        result,
        attempts: attempts.into_inner(),
        exhausted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a caller's error type.
    #[derive(Debug)]
    enum TestError {
        Busy,
        Throttled(Duration),
        Bad,
    }

    impl RetryClass for TestError {
        fn is_retryable(&self) -> bool {
            match self {
                TestError::Busy | TestError::Throttled(_) => true,
                TestError::Bad => false,
            }
        }

        fn retry_after(&self) -> Option<Duration> {
            match self {
                TestError::Throttled(hint) => Some(*hint),
                TestError::Busy | TestError::Bad => None,
            }
        }
    }

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_elapsed: Duration::from_secs(60),
        }
    }

    #[test]
    fn full_jitter_stays_under_the_exponential_ceiling() {
        let sleeps: Vec<Duration> = FullJitterBackoff {
            policy: policy(8),
            sleeps_given: 0,
        }
        .collect();
        assert_eq!(sleeps.len(), 7, "max_attempts counts the first call");
        for (index, sleep) in sleeps.iter().enumerate() {
            let ceiling = Duration::from_millis(100 * 2u64.pow(index as u32)).min(Duration::from_secs(1));
            assert!(*sleep <= ceiling, "sleep {index} = {sleep:?} over {ceiling:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let outcome = run_with_retries(
            policy(5),
            || async {
                if calls.fetch_add(1, Ordering::Relaxed) < 2 {
                    Err(TestError::Busy)
                } else {
                    Ok("done")
                }
            },
            |_, _, _| {},
        )
        .await;
        assert_eq!(outcome.result.unwrap(), "done");
        assert_eq!(outcome.attempts, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_fail_at_once() {
        let outcome: RetryOutcome<(), TestError> =
            run_with_retries(policy(5), || async { Err(TestError::Bad) }, |_, _, _| {}).await;
        assert_eq!(outcome.attempts, 1);
        assert!(!outcome.exhausted);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_a_floor_for_the_wait() {
        let started = tokio::time::Instant::now();
        let calls = AtomicU32::new(0);
        let outcome = run_with_retries(
            policy(3),
            || async {
                if calls.fetch_add(1, Ordering::Relaxed) == 0 {
                    Err(TestError::Throttled(Duration::from_secs(7)))
                } else {
                    Ok(())
                }
            },
            |_, _, _| {},
        )
        .await;
        assert!(outcome.result.is_ok());
        assert!(started.elapsed() >= Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_run_out_and_say_so() {
        let outcome: RetryOutcome<(), TestError> =
            run_with_retries(policy(4), || async { Err(TestError::Busy) }, |_, _, _| {}).await;
        assert_eq!(outcome.attempts, 4);
        assert!(outcome.exhausted);
    }
}
