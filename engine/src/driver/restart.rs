//! Restarts: the policy a job is configured with, and the budget that applies it at
//! start-up and after each failure.

use super::JobSettings;
use crate::error::{Error, ErrorClass, Result};
use crate::runtime::StopHandle;
use std::time::{Duration, Instant};

/// What happens when a task fails: how often the job restarts from its latest
/// checkpoint, and how long it waits before each restart.
///
/// Restarts are counted in a row: an attempt that completes a checkpoint and runs for
/// [`RestartPolicy::healthy_after`] (default 60 s) shows the job healthy again, and the
/// count and the pause start over. The pause doubles with
/// each restart in a row, from `backoff` up to `max_backoff`, shortened by a random
/// fraction up to `jitter` so that instances restarting together do not retry in step.
/// The default, [`RestartPolicy::default`], rides out an outage of a database or an
/// object store of about two minutes.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    /// Restarts in a row before `run()` gives up (with
    /// [`Error::RestartsExhausted`](crate::error::Error::RestartsExhausted)).
    pub max_restarts: u32,
    /// Pause before the first restart of a row.
    pub backoff: Duration,
    /// Longest pause.
    pub max_backoff: Duration,
    /// Largest fraction (0 to 1) taken off each pause at random.
    pub jitter: f64,
    /// A restarted attempt that completes a checkpoint and has run this long shows the
    /// job healthy: the count and the pause start over. (A failure that strikes soon
    /// after every restart's first checkpoint still exhausts the policy.)
    pub healthy_after: Duration,
}

impl Default for RestartPolicy {
    /// Up to 10 restarts in a row, waiting 1, 2, 4, 8, 16 s and then 30 s (each up to
    /// 20 % shorter at random): 145-181 s of pauses before giving up.
    fn default() -> Self {
        RestartPolicy::exponential(10, Duration::from_secs(1), Duration::from_secs(30))
    }
}

impl RestartPolicy {
    /// Up to `max_restarts` restarts in a row, `backoff` apart.
    pub fn fixed(max_restarts: u32, backoff: Duration) -> Self {
        RestartPolicy {
            max_restarts,
            backoff,
            max_backoff: backoff,
            jitter: 0.0,
            healthy_after: Duration::from_secs(60),
        }
    }

    /// Up to `max_restarts` restarts in a row, the pause doubling from `first` up to
    /// `max`, each up to 20 % shorter at random.
    pub fn exponential(max_restarts: u32, first: Duration, max: Duration) -> Self {
        RestartPolicy {
            max_restarts,
            backoff: first,
            max_backoff: max.max(first),
            jitter: 0.2,
            healthy_after: Duration::from_secs(60),
        }
    }

    /// Never restart in-process; `run()` returns the first failure.
    pub fn none() -> Self {
        RestartPolicy::fixed(0, Duration::ZERO)
    }

    /// The pause before restart `nth` of a row (1-based), with `random` in `[0, 1)`
    /// choosing the jitter.
    pub fn pause(&self, nth: u32, random: f64) -> Duration {
        let doublings = nth.saturating_sub(1).min(31);
        let full = self
            .backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff.max(self.backoff));
        let finite = |x: f64| {
            if x.is_finite() {
                x.clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        let factor = 1.0 - finite(self.jitter) * finite(random);
        Duration::try_from_secs_f64(full.as_secs_f64() * factor).unwrap_or(full)
    }
}

/// Restarts in a row under the job's [`RestartPolicy`]: whether one more is allowed,
/// and the pause before it. Shared by start-up and by the restart loop.
pub(super) struct RestartBudget<'a> {
    s: &'a JobSettings,
    in_a_row: u32,
}

impl<'a> RestartBudget<'a> {
    pub(super) fn new(s: &'a JobSettings) -> Self {
        RestartBudget { s, in_a_row: 0 }
    }

    /// The job showed progress: the count and the pause start over.
    pub(super) fn reset(&mut self) {
        self.in_a_row = 0;
    }

    /// After failure `e`: `RestartsExhausted` if the policy allows no more, otherwise
    /// wait the policy's pause (a cancel, or a stop asked meanwhile, ends it).
    pub(super) fn wait_or_give_up(&mut self, e: Error, what: &str) -> Result<()> {
        let s = self.s;
        if self.in_a_row >= s.restart.max_restarts {
            return Err(Error::RestartsExhausted {
                job: s.name.clone(),
                attempts: self.in_a_row,
                source: Box::new(e),
            });
        }
        self.in_a_row += 1;
        let pause = s.restart.pause(self.in_a_row, random_fraction());
        tracing::warn!(job = %s.name, error = %e, in_a_row = self.in_a_row,
            pause_ms = pause.as_millis() as u64, "{what}");
        sleep_unless_cancelled(pause, &s.stop);
        Ok(())
    }
}

/// Run a start-up step, retrying errors that are not [`ErrorClass::Stop`] under the
/// restart policy, so a job started while its storage is briefly unreachable waits for
/// it instead of failing.
pub(super) fn starting<T>(s: &JobSettings, mut step: impl FnMut() -> Result<T>) -> Result<T> {
    let mut budget = RestartBudget::new(s);
    loop {
        if s.stop.is_cancelled() {
            return Err(Error::JobCancelled {
                job: s.name.clone(),
            });
        }
        match step() {
            Ok(v) => return Ok(v),
            Err(e) if e.class() == ErrorClass::Stop => return Err(e),
            Err(e) => {
                budget.wait_or_give_up(e, "checkpoint storage not reachable at start; retrying")?
            }
        }
    }
}

/// A random number in `[0, 1)` for restart jitter (from the standard library's
/// randomly seeded hasher: no generator is needed for this).
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Wait `pause` before a restart; a cancel, or a stop asked during this wait, ends it
/// (a stop asked earlier does not shorten later waits).
fn sleep_unless_cancelled(pause: Duration, stop: &StopHandle) {
    let until = Instant::now()
        .checked_add(pause)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
    let stop_before = stop.is_requested();
    loop {
        let now = Instant::now();
        if now >= until || stop.is_cancelled() || (!stop_before && stop.is_requested()) {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::RestartPolicy;
    use std::time::Duration;

    #[test]
    fn pauses_double_up_to_the_cap_and_jitter_only_shortens() {
        let p = RestartPolicy::default();
        let secs = |n| p.pause(n, 0.0).as_secs_f64();
        assert_eq!(
            (1..=10).map(secs).collect::<Vec<_>>(),
            [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0, 30.0]
        );
        // Under the default, a 60 s outage is ridden out even with the shortest pauses.
        let shortest: f64 = (1..=p.max_restarts)
            .map(|n| p.pause(n, 0.999_999).as_secs_f64())
            .sum();
        assert!(shortest > 120.0, "{shortest}");
        assert_eq!(p.pause(1, 0.5), Duration::from_millis(900));
        assert_eq!(p.pause(40, 0.0), Duration::from_secs(30), "no overflow");
        let fixed = RestartPolicy::fixed(3, Duration::from_millis(10));
        assert_eq!(fixed.pause(3, 0.7), Duration::from_millis(10));
        assert_eq!(RestartPolicy::none().pause(1, 0.3), Duration::ZERO);
        // Nonsense settings do not panic.
        let odd = RestartPolicy {
            jitter: f64::NAN,
            ..RestartPolicy::fixed(1, Duration::MAX)
        };
        assert_eq!(odd.pause(3, f64::NAN), Duration::MAX);
    }
}
