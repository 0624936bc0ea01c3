//! Deduplication by id within a time-to-live.
//!
//! A record passes if its id was not seen, or was last let through at least `ttl`
//! earlier (`t - first_seen >= ttl`); otherwise it is dropped and counted in the
//! `duplicates_dropped` counter. A duplicate with an *earlier* time than the one that
//! passed is also dropped. The id's state expires through a timer at `first_seen + ttl`,
//! so state is bounded by the number of distinct ids per TTL.
//!
//! In event time, expiry follows the watermark: a duplicate that arrives after the
//! watermark passed its id's expiry is let through, which is what a TTL means; choose a
//! TTL longer than the redelivery horizon of the input.

use exactly_engine::api::{BoxError, Data, Key};
use exactly_engine::dsl::Stream;
use exactly_engine::metrics::{Counter, OpenContext};
use exactly_engine::process::{KeyedContext, KeyedProcessFunction};
use exactly_engine::state::ValueState;
use exactly_engine::time::{Timer, Timestamp};
use std::time::Duration;

const SEEN: ValueState<Timestamp> = ValueState::new("dedup-seen");

/// Which clock the TTL follows.
#[derive(Clone)]
pub enum DedupTime<TS> {
    /// The job's clock.
    ProcessingTime,
    /// The record's timestamp; state expires with the watermark.
    EventTime(TS),
}

/// The dedup operator as a keyed process function (keyed by id).
#[derive(Clone)]
pub struct Dedup<TS> {
    ttl: i64,
    time: DedupTime<TS>,
    dropped: Option<Counter>,
}

impl<TS> Dedup<TS> {
    /// Drop repeats within `ttl` measured by `time`.
    pub fn new(ttl: Duration, time: DedupTime<TS>) -> Self {
        Dedup {
            ttl: ttl.as_millis() as i64,
            time,
            dropped: None,
        }
    }
}

impl<K, T, TS> KeyedProcessFunction<K, T> for Dedup<TS>
where
    K: Key,
    T: Data,
    TS: Fn(&T) -> Timestamp + Clone + Send + Sync + 'static,
{
    type Out = T;

    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<(), BoxError> {
        self.dropped = Some(ctx.counter("duplicates_dropped"));
        Ok(())
    }

    fn process(&mut self, record: T, ctx: &mut KeyedContext<'_, K, T>) -> Result<(), BoxError> {
        let t = match &self.time {
            DedupTime::ProcessingTime => ctx.current_processing_time(),
            DedupTime::EventTime(f) => f(&record),
        };
        if let Some(seen) = ctx.value(SEEN)? {
            if t.saturating_sub(seen) < self.ttl {
                if let Some(c) = &self.dropped {
                    c.inc();
                }
                return Ok(());
            }
        }
        ctx.set_value(SEEN, &t)?;
        let expiry = t.saturating_add(self.ttl);
        match self.time {
            DedupTime::ProcessingTime => ctx.register_processing_time_timer(expiry),
            DedupTime::EventTime(_) => ctx.register_event_time_timer(expiry),
        }
        ctx.emit(record);
        Ok(())
    }

    fn on_timer(&mut self, timer: Timer, ctx: &mut KeyedContext<'_, K, T>) -> Result<(), BoxError> {
        // Only the timer of the current entry expires it; older ones are stale.
        if ctx
            .value(SEEN)?
            .is_some_and(|seen| seen.saturating_add(self.ttl) == timer.time)
        {
            ctx.clear_value(SEEN);
        }
        Ok(())
    }
}

/// Adds `dedup_by` to streams.
pub trait DedupExt<T> {
    /// Drop records whose id was seen within `ttl`.
    ///
    /// ```
    /// use exactly_engine::prelude::*;
    /// use exactly_engine::testing::{CollectSink, VecSource};
    /// use exactly_operators::{DedupExt, DedupTime};
    /// use std::time::Duration;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let job = Job::builder("dedup").checkpoint_storage("memory://").build()?;
    /// let out = CollectSink::new();
    /// let deliveries = vec![("e1".to_string(), 10i64), ("e2".into(), 11), ("e1".into(), 12)];
    /// job.source("payments", VecSource::new(deliveries))
    ///     .dedup_by(|p| p.0.clone(), Duration::from_secs(3600), DedupTime::EventTime(|p: &(String, i64)| p.1))
    ///     .name("dedup")
    ///     .sink("unique", out.clone());
    /// let report = job.run()?;
    /// assert_eq!(out.sorted(), vec![("e1".to_string(), 10), ("e2".to_string(), 11)]);
    /// assert_eq!(report.metrics["dedup.duplicates_dropped"], 1);
    /// # Ok(()) }
    /// ```
    fn dedup_by<I, F, TS>(&self, id: F, ttl: Duration, time: DedupTime<TS>) -> Stream<T>
    where
        I: Key,
        F: Fn(&T) -> I + Clone + Send + Sync + 'static,
        TS: Fn(&T) -> Timestamp + Clone + Send + Sync + 'static;
}

impl<T: Data> DedupExt<T> for Stream<T> {
    fn dedup_by<I, F, TS>(&self, id: F, ttl: Duration, time: DedupTime<TS>) -> Stream<T>
    where
        I: Key,
        F: Fn(&T) -> I + Clone + Send + Sync + 'static,
        TS: Fn(&T) -> Timestamp + Clone + Send + Sync + 'static,
    {
        self.key_by(id).process(Dedup::new(ttl, time))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_engine::testing::KeyedHarness;

    type Ev = (String, i64);
    type EventDedup = Dedup<fn(&Ev) -> Timestamp>;

    fn ts(e: &Ev) -> Timestamp {
        e.1
    }

    fn event_time(ttl: u64) -> KeyedHarness<String, Ev, EventDedup> {
        KeyedHarness::new(Dedup::new(
            Duration::from_millis(ttl),
            DedupTime::EventTime(ts as fn(&Ev) -> Timestamp),
        ))
        .unwrap()
    }

    fn send(h: &mut KeyedHarness<String, Ev, EventDedup>, id: &str, t: i64) -> bool {
        h.process(id.to_string(), (id.to_string(), t)).unwrap();
        !h.take_output().is_empty()
    }

    #[test]
    fn duplicate_just_before_ttl_is_dropped_at_and_after_it_passes() {
        let mut h = event_time(100);
        assert!(send(&mut h, "x", 1_000));
        assert!(!send(&mut h, "x", 1_099), "just before the TTL: duplicate");
        assert!(send(&mut h, "x", 1_100), "exactly at the TTL: passes");
        assert!(!send(&mut h, "x", 1_150), "a new window started at 1100");
        assert!(send(&mut h, "x", 1_201), "just after: passes");
        assert!(
            !send(&mut h, "x", 900),
            "an earlier duplicate of a seen id is dropped"
        );
        assert_eq!(h.counter("duplicates_dropped"), 3);
    }

    #[test]
    fn state_expires_with_the_watermark_and_survives_restore() {
        let mut h = event_time(100);
        assert!(send(&mut h, "a", 0));
        assert!(send(&mut h, "b", 50));
        h.checkpoint_and_restore(Dedup::new(
            Duration::from_millis(100),
            DedupTime::EventTime(ts as fn(&Ev) -> Timestamp),
        ))
        .unwrap();
        assert!(!send(&mut h, "a", 10), "seen state restored");
        h.watermark(99).unwrap();
        assert!(h.state_entries() > 0);
        h.watermark(150).unwrap();
        assert_eq!(h.state_entries(), 0, "ids expire at first_seen + ttl");
    }

    #[test]
    fn processing_time_ttl_follows_the_clock() {
        let mut h: KeyedHarness<String, Ev, EventDedup> = KeyedHarness::new(Dedup::new(
            Duration::from_millis(100),
            DedupTime::ProcessingTime,
        ))
        .unwrap();
        h.set_processing_time(1_000).unwrap();
        h.process("x".into(), ("x".into(), 0)).unwrap();
        h.process("x".into(), ("x".into(), 0)).unwrap();
        assert_eq!(h.take_output().len(), 1);
        h.set_processing_time(1_100).unwrap();
        assert_eq!(h.state_entries(), 0, "expired by its processing-time timer");
        h.process("x".into(), ("x".into(), 0)).unwrap();
        assert_eq!(h.take_output().len(), 1);
    }
}
