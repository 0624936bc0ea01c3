//! Event time and processing time: timestamps, watermark strategies, clocks.
//!
//! Timestamps are milliseconds since the Unix epoch (`i64`). A watermark `w` asserts that
//! no record with a timestamp `<= w` is still to come on that path (records that do come
//! are *late*).
//!
//! # Protocol (watermarks)
//!
//! 1. A source tracks, per split, the highest timestamp read; a split's watermark is
//!    `max_ts - bound - 1`. The subtask's watermark is the minimum over its splits that
//!    are neither finished nor idle; it is emitted after a batch when it advanced.
//! 2. A split with no data for the idle timeout stops holding the watermark back; if all
//!    splits of a subtask are idle it emits `Idle`, and its next watermark or batch
//!    makes it active again.
//! 3. A task's watermark is the minimum over its inputs that are not idle; ended inputs
//!    count as `+inf`. It is forwarded when it advances.
//! 4. When all splits of a source subtask are finished it emits `Timestamp::MAX`, so every
//!    event-time timer of a bounded job fires before the final checkpoint.
//!
//! # Failure and recovery
//!
//! A split's highest timestamp is part of the source's checkpointed offset, and a
//! restored source emits the restored watermark before any record, so a restore never
//! moves event time backwards. Which records are late still depends on how watermarks
//! from parallel inputs interleave with records (as in every parallel stream engine);
//! jobs whose results must not depend on timing choose a bound that leaves no late
//! records, or treat late records explicitly.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Milliseconds since the Unix epoch.
pub type Timestamp = i64;

/// Which clock a timer follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeDomain {
    /// Fires when the watermark passes the timer.
    EventTime,
    /// Fires when the job's clock passes the timer.
    ProcessingTime,
}

/// A timer that fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timer {
    /// The time it was registered for.
    pub time: Timestamp,
    /// Its clock.
    pub domain: TimeDomain,
}

/// The clock a job's time comes from; tests use [`ManualClock`].
pub trait Clock: Send + Sync + 'static {
    /// Current time in milliseconds since the Unix epoch (processing time).
    fn now_ms(&self) -> Timestamp;

    /// Milliseconds on a clock that never goes back, for how long something lasted:
    /// checkpoint cadence and timeouts, source idleness. The default is
    /// [`Clock::now_ms`], right for a clock that only moves forward, as a test's manual
    /// clock; the system clock answers from the monotonic clock, so a step of the wall
    /// clock neither triggers nor delays anything.
    fn monotonic_ms(&self) -> Timestamp {
        self.now_ms()
    }
}

/// Wall-clock time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Timestamp {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn monotonic_ms(&self) -> Timestamp {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as i64
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock(Arc::new(AtomicI64::new(start)))
    }
    /// Set the time.
    pub fn set(&self, t: Timestamp) {
        self.0.store(t, Ordering::SeqCst);
    }
    /// Move the time forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Timestamp {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a batch of records says about event time.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BatchTimes {
    pub max: Option<Timestamp>,
    pub negative: u64,
}

/// Reads timestamps from a batch; one dynamic call per batch, a monomorphised loop inside.
pub(crate) trait BatchTimestamps<T>: Send + Sync {
    fn scan(&self, batch: &[T]) -> BatchTimes;
}

struct Extract<F>(F);

impl<T, F: Fn(&T) -> Timestamp + Send + Sync> BatchTimestamps<T> for Extract<F> {
    fn scan(&self, batch: &[T]) -> BatchTimes {
        let mut t = BatchTimes::default();
        for r in batch {
            let ts = (self.0)(r);
            if ts < 0 {
                t.negative += 1;
            }
            t.max = Some(t.max.map_or(ts, |m| m.max(ts)));
        }
        t
    }
}

/// How a source derives watermarks from its records.
///
/// ```
/// use exactly_engine::time::WatermarkStrategy;
/// use std::time::Duration;
/// #[derive(Clone)]
/// struct Charge { ts: i64 }
/// let s = WatermarkStrategy::bounded_out_of_orderness(Duration::from_secs(5), |c: &Charge| c.ts)
///     .with_idleness(Duration::from_secs(30));
/// ```
pub struct WatermarkStrategy<T> {
    pub(crate) extract: Arc<dyn BatchTimestamps<T>>,
    pub(crate) bound_ms: i64,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_future: Duration,
    pub(crate) stall_warning: Duration,
}

impl<T> Clone for WatermarkStrategy<T> {
    fn clone(&self) -> Self {
        WatermarkStrategy {
            extract: self.extract.clone(),
            bound_ms: self.bound_ms,
            idle_timeout: self.idle_timeout,
            max_future: self.max_future,
            stall_warning: self.stall_warning,
        }
    }
}

impl<T: 'static> WatermarkStrategy<T> {
    /// Records may arrive up to `bound` out of order: the watermark trails the highest
    /// timestamp seen by `bound`.
    pub fn bounded_out_of_orderness(
        bound: Duration,
        timestamp: impl Fn(&T) -> Timestamp + Send + Sync + 'static,
    ) -> Self {
        WatermarkStrategy {
            extract: Arc::new(Extract(timestamp)),
            bound_ms: bound.as_millis() as i64,
            idle_timeout: None,
            max_future: Duration::from_secs(24 * 3600),
            stall_warning: Duration::from_secs(60),
        }
    }

    /// Timestamps never decrease within a split.
    pub fn monotonic(timestamp: impl Fn(&T) -> Timestamp + Send + Sync + 'static) -> Self {
        Self::bounded_out_of_orderness(Duration::ZERO, timestamp)
    }

    /// A split without records for `timeout` (on the job's clock, see
    /// `JobBuilder::clock`; monotonic unless a test set one) stops holding the
    /// watermark back.
    pub fn with_idleness(mut self, timeout: Duration) -> Self {
        self.idle_timeout = Some(timeout);
        self
    }

    /// Warn about timestamps further than this ahead of the job's clock (default 1 day):
    /// one such record moves the watermark so far that everything after it is late.
    pub fn with_max_future(mut self, d: Duration) -> Self {
        self.max_future = d;
        self
    }

    /// Warn when the watermark has not advanced for this long while records flowed
    /// (default 60 s): timestamps that never increase stall every event-time result.
    pub fn with_stall_warning(mut self, d: Duration) -> Self {
        self.stall_warning = d;
        self
    }
}
