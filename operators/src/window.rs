//! Event-time windows: tumbling, sliding and session, with allowed lateness and late
//! records routed to a side stream.
//!
//! # Protocol
//!
//! 1. A record is assigned to its windows by timestamp. A window whose cleanup time
//!    (`end - 1 + allowed lateness`) is not after the watermark is gone; a record whose
//!    windows are all gone is *late* and goes to [`WindowOutput::late`], never dropped
//!    silently.
//! 2. The window's accumulator is keyed state (`MapState<Window, _>`); an event-time timer
//!    at `end - 1` fires the result. A record for a window that already fired but is
//!    within the allowed lateness updates it and fires it again at once.
//! 3. A second timer at the cleanup time purges the window, so state stays bounded.
//! 4. Tumbling and sliding windows are aligned: every key's windows end at the same
//!    times. The first timer of a window end fires and purges every key's due windows
//!    in one pass over the state ([`KeyedContext::map_retain_all_keys`]); the other
//!    keys' timers of that time then find nothing to do and touch no state. Timers
//!    are registered once per window end and key group (for the first key of the key
//!    group that opens the window in this instance): a key group is what moves between
//!    instances on a rescaled restore, with its timers, so every instance still has a
//!    timer for every window end its keys need.
//! 5. Session windows merge: a record opens `[ts, ts + gap)`, which absorbs every session
//!    of the key it touches (accumulators merged, old timers deleted).
//!
//! Everything is keyed state and timers, so windows open across a checkpoint are
//! restored (also at another parallelism) and fire as if nothing happened.

use exactly_engine::api::{BoxError, Data, Key};
use exactly_engine::dsl::{KeyedStream, Stream};
use exactly_engine::metrics::{Counter, OpenContext};
use exactly_engine::process::{Emitter, KeyedContext, KeyedProcessFunction};
use exactly_engine::state::MapState;
use exactly_engine::time::{Timer, Timestamp};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::time::Duration;

/// The half-open event-time interval `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Window {
    /// First timestamp in the window.
    pub start: Timestamp,
    /// One past the last timestamp.
    pub end: Timestamp,
}

impl Window {
    /// The last timestamp that belongs to the window; its result fires when the
    /// watermark reaches it.
    pub fn max_timestamp(&self) -> Timestamp {
        self.end - 1
    }

    fn touches(&self, other: &Window) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

/// How records are assigned to windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Windows {
    /// Fixed-size, non-overlapping windows aligned to the epoch.
    Tumbling {
        /// Window length in ms.
        size: i64,
    },
    /// Fixed-size windows starting every `slide` ms; a record is in `size / slide` of them.
    Sliding {
        /// Window length in ms.
        size: i64,
        /// Distance between window starts in ms.
        slide: i64,
    },
    /// Windows that close after `gap` ms without records for the key.
    Session {
        /// Inactivity gap in ms.
        gap: i64,
    },
}

impl Windows {
    /// Tumbling windows of `size`.
    pub fn tumbling(size: Duration) -> Self {
        assert!(ms(size) > 0, "window size must be at least 1 ms");
        Windows::Tumbling { size: ms(size) }
    }

    /// Sliding windows of `size` every `slide`.
    pub fn sliding(size: Duration, slide: Duration) -> Self {
        assert!(
            ms(slide) > 0 && ms(size) >= ms(slide),
            "need 0 < slide <= size"
        );
        Windows::Sliding {
            size: ms(size),
            slide: ms(slide),
        }
    }

    /// Session windows with inactivity `gap`.
    pub fn session(gap: Duration) -> Self {
        assert!(ms(gap) > 0, "session gap must be at least 1 ms");
        Windows::Session { gap: ms(gap) }
    }

    /// The windows a record at `ts` belongs to (before session merging), newest
    /// first; an iterator, so assigning a record allocates nothing.
    pub fn assign(&self, ts: Timestamp) -> Assigned {
        let (start, size, slide, last) = match *self {
            Windows::Tumbling { size } => {
                let start = ts - ts.rem_euclid(size);
                (start, size, size, start)
            }
            Windows::Sliding { size, slide } => {
                // Starts from the newest window down to the oldest that still holds ts.
                let start = ts - ts.rem_euclid(slide);
                (start, size, slide, ts - size + 1)
            }
            Windows::Session { gap } => (ts, gap, gap, ts),
        };
        Assigned {
            next: start,
            size,
            slide,
            last,
        }
    }
}

/// The windows of one record; see [`Windows::assign`].
#[derive(Debug, Clone)]
pub struct Assigned {
    next: Timestamp,
    size: i64,
    slide: i64,
    /// The lowest start that still holds the record.
    last: Timestamp,
}

impl Iterator for Assigned {
    type Item = Window;

    fn next(&mut self) -> Option<Window> {
        if self.next < self.last {
            return None;
        }
        let w = Window {
            start: self.next,
            end: self.next + self.size,
        };
        self.next -= self.slide;
        Some(w)
    }
}

/// Incremental aggregation of a window's records.
pub trait AggregateFunction<T>: Clone + Send + Sync + 'static {
    /// Running state of one window.
    type Acc: Serialize + DeserializeOwned + Clone + Send + Sync + 'static;
    /// What a fired window emits.
    type Out: Data;
    /// An empty accumulator.
    fn create(&self) -> Self::Acc;
    /// Add a record.
    fn add(&self, acc: &mut Self::Acc, record: &T);
    /// The result of an accumulator.
    fn result(&self, acc: &Self::Acc) -> Self::Out;
    /// Combine two accumulators (session windows merge).
    fn merge(&self, acc: &mut Self::Acc, other: Self::Acc);
}

/// Counts records.
#[derive(Debug, Clone, Copy, Default)]
pub struct Count;

impl<T> AggregateFunction<T> for Count {
    type Acc = u64;
    type Out = u64;
    fn create(&self) -> u64 {
        0
    }
    fn add(&self, acc: &mut u64, _: &T) {
        *acc += 1;
    }
    fn result(&self, acc: &u64) -> u64 {
        *acc
    }
    fn merge(&self, acc: &mut u64, other: u64) {
        *acc += other;
    }
}

/// Combines records pairwise with a function.
#[derive(Clone)]
pub struct ReduceAggregate<F>(pub F);

impl<
        T: Data + Serialize + DeserializeOwned + Sync,
        F: Fn(T, T) -> T + Clone + Send + Sync + 'static,
    > AggregateFunction<T> for ReduceAggregate<F>
{
    type Acc = Option<T>;
    type Out = T;
    fn create(&self) -> Option<T> {
        None
    }
    fn add(&self, acc: &mut Option<T>, record: &T) {
        *acc = Some(match acc.take() {
            Some(a) => (self.0)(a, record.clone()),
            None => record.clone(),
        });
    }
    fn result(&self, acc: &Option<T>) -> T {
        acc.clone()
            .expect("a window that fires holds at least one record")
    }
    fn merge(&self, acc: &mut Option<T>, other: Option<T>) {
        if let Some(o) = other {
            self.add(acc, &o);
        }
    }
}

/// Keeps every record, for full-window processing. State grows with the window and
/// each record rewrites the window's list: prefer an [`AggregateFunction`] when the
/// result can be computed incrementally.
#[derive(Clone)]
pub struct CollectAll<T>(PhantomData<fn() -> T>);

impl<T: Data + Serialize + DeserializeOwned + Sync> AggregateFunction<T> for CollectAll<T> {
    type Acc = Vec<T>;
    type Out = Vec<T>;
    fn create(&self) -> Vec<T> {
        Vec::new()
    }
    fn add(&self, acc: &mut Vec<T>, record: &T) {
        acc.push(record.clone());
    }
    fn result(&self, acc: &Vec<T>) -> Vec<T> {
        acc.clone()
    }
    fn merge(&self, acc: &mut Vec<T>, other: Vec<T>) {
        acc.extend(other);
    }
}

/// One fired window.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Windowed<K, R> {
    /// The key.
    pub key: K,
    /// The window.
    pub window: Window,
    /// The result.
    pub value: R,
}

/// What the window operator emits before the split into results and late records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WindowEvent<K, R, T> {
    /// A window fired.
    Fired(Windowed<K, R>),
    /// A record arrived after all its windows were purged.
    Late(T),
}

/// The results of a windowed aggregation and the records that came too late for it.
pub struct WindowOutput<K, R, T> {
    /// One record per fired window (again for each late update within the lateness).
    pub results: Stream<Windowed<K, R>>,
    /// Records whose windows were all purged when they arrived.
    pub late: Stream<T>,
}

/// A session window after merging, with the accumulator of what it absorbed.
type Merged<A> = (Window, Option<Entry<A>>);

#[derive(Clone, Serialize, Deserialize)]
struct Entry<A> {
    acc: A,
    fired: bool,
}

/// The window operator as a keyed process function.
#[derive(Clone)]
pub struct WindowOperator<T, A: AggregateFunction<T>, TS> {
    windows: Windows,
    lateness: i64,
    timestamp: TS,
    agg: A,
    late: Option<Counter>,
    /// Aligned windows: every window ending at or before this time was fired (and
    /// purged, if its cleanup time has passed) for every key of this instance by one
    /// pass over the state. Not checkpointed: after a restore the first timer passes
    /// again, which finds what the restored state holds.
    swept_upto: Timestamp,
    /// Aligned windows: the (window end, key group) pairs that have a timer registered
    /// by this instance and not fired yet. Not checkpointed: after a restore the first
    /// key of each pair registers again (a second timer of a time is a no-op).
    triggers: BTreeSet<(Timestamp, u16)>,
    _t: PhantomData<fn(T)>,
}

fn slots<A>() -> MapState<Window, Entry<A>> {
    MapState::new("windows")
}

impl<T, A, TS> WindowOperator<T, A, TS>
where
    T: Data,
    A: AggregateFunction<T>,
    TS: Fn(&T) -> Timestamp + Clone + Send + Sync + 'static,
{
    /// A window operator (normally built through [`WindowExt::window`]).
    pub fn new(windows: Windows, lateness: Duration, timestamp: TS, agg: A) -> Self {
        WindowOperator {
            windows,
            lateness: ms(lateness),
            timestamp,
            agg,
            late: None,
            swept_upto: Timestamp::MIN,
            triggers: BTreeSet::new(),
            _t: PhantomData,
        }
    }

    fn cleanup_time(&self, w: &Window) -> Timestamp {
        w.max_timestamp().saturating_add(self.lateness)
    }

    fn fire<K: Clone>(&self, key: &K, w: Window, acc: &A::Acc) -> WindowEvent<K, A::Out, T> {
        WindowEvent::Fired(Windowed {
            key: key.clone(),
            window: w,
            value: self.agg.result(acc),
        })
    }

    /// Merge the session `w` with every session of the key it touches; returns the
    /// merged window and, if anything was absorbed, the merged accumulator.
    fn merge_sessions<K: Key>(
        &self,
        w: Window,
        ctx: &mut KeyedContext<'_, K, WindowEvent<K, A::Out, T>>,
    ) -> Result<Merged<A::Acc>, BoxError> {
        let mut merged = w;
        let mut acc: Option<A::Acc> = None;
        for (old, entry) in ctx.map_entries(slots::<A::Acc>())? {
            if !old.touches(&w) {
                continue;
            }
            merged = Window {
                start: merged.start.min(old.start),
                end: merged.end.max(old.end),
            };
            match &mut acc {
                None => acc = Some(entry.acc),
                Some(a) => self.agg.merge(a, entry.acc),
            }
            ctx.map_remove(slots::<A::Acc>(), &old)?;
            ctx.delete_event_time_timer(old.max_timestamp());
            ctx.delete_event_time_timer(self.cleanup_time(&old));
        }
        Ok((merged, acc.map(|acc| Entry { acc, fired: false })))
    }
}

impl<K, T, A, TS> KeyedProcessFunction<K, T> for WindowOperator<T, A, TS>
where
    K: Key,
    T: Data,
    A: AggregateFunction<T>,
    TS: Fn(&T) -> Timestamp + Clone + Send + Sync + 'static,
{
    type Out = WindowEvent<K, A::Out, T>;

    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<(), BoxError> {
        self.late = Some(ctx.counter("late_records"));
        Ok(())
    }

    fn process(
        &mut self,
        record: T,
        ctx: &mut KeyedContext<'_, K, Self::Out>,
    ) -> Result<(), BoxError> {
        let ts = (self.timestamp)(&record);
        let wm = ctx.current_watermark();
        let mut on_time = false;
        for w in self.windows.assign(ts) {
            if self.cleanup_time(&w) <= wm {
                continue;
            }
            on_time = true;
            let (w, merged) = match self.windows {
                Windows::Session { .. } => self.merge_sessions(w, ctx)?,
                _ => (w, None),
            };
            // Within the allowed lateness of a window that already fired: fire again now.
            let refire = w.max_timestamp() <= wm;
            // A window's timer is registered when its entry is created; a later record
            // for it finds both (the timer service dedups anyway, but skipping the
            // lookup is most of the per-record cost for a window already open).
            let mut created = merged.is_some();
            let result = match merged {
                Some(mut entry) => {
                    self.agg.add(&mut entry.acc, &record);
                    entry.fired |= refire;
                    let result = refire.then(|| self.agg.result(&entry.acc));
                    ctx.map_put(slots::<A::Acc>(), &w, &entry)?;
                    result
                }
                None => ctx.map_update(
                    slots::<A::Acc>(),
                    &w,
                    || {
                        created = true;
                        Entry {
                            acc: self.agg.create(),
                            fired: false,
                        }
                    },
                    |entry| {
                        self.agg.add(&mut entry.acc, &record);
                        entry.fired |= refire;
                        refire.then(|| self.agg.result(&entry.acc))
                    },
                )?,
            };
            match result {
                Some(value) => {
                    let key = ctx.key().clone();
                    ctx.emit(WindowEvent::Fired(Windowed {
                        key,
                        window: w,
                        value,
                    }));
                    ctx.register_event_time_timer(self.cleanup_time(&w));
                }
                // One timer per window: firing registers the cleanup timer, if the
                // allowed lateness puts it later. Aligned windows: one per window and
                // key group, since one timer fires every key's window.
                None if created => {
                    let end = w.max_timestamp();
                    let register = match self.windows {
                        Windows::Session { .. } => true,
                        _ => self.triggers.insert((end, ctx.key_group()?.0)),
                    };
                    if register {
                        ctx.register_event_time_timer(end);
                    }
                }
                None => {}
            }
        }
        if !on_time {
            if let Some(c) = &self.late {
                c.inc();
            }
            ctx.emit(WindowEvent::Late(record));
        }
        Ok(())
    }

    fn on_timer(
        &mut self,
        timer: Timer,
        ctx: &mut KeyedContext<'_, K, Self::Out>,
    ) -> Result<(), BoxError> {
        // Aligned windows: the first timer of a time fires every key's windows ending by
        // then, in one pass; later timers of that time return at once.
        let aligned = !matches!(self.windows, Windows::Session { .. });
        if aligned {
            if timer.time <= self.swept_upto {
                return Ok(());
            }
            self.swept_upto = timer.time;
            self.triggers = self.triggers.split_off(&(timer.time.saturating_add(1), 0));
        }
        let mut fired_any = false;
        let visit = |w: &Window, entry: &mut Entry<A::Acc>, out: &mut Emitter<'_, K, _>| {
            if w.max_timestamp() <= timer.time && !entry.fired {
                out.emit(self.fire(out.key(), *w, &entry.acc));
                entry.fired = true;
                fired_any = true;
            }
            // Kept until its allowed lateness has passed.
            self.cleanup_time(w) > timer.time
        };
        if aligned {
            ctx.map_retain_all_keys(slots::<A::Acc>(), visit)?;
        } else {
            ctx.map_retain(slots::<A::Acc>(), visit)?;
        }
        // What fired now is purged by the timer this registers: every window fired now
        // ends by this time, so its cleanup time is by this time + lateness.
        if fired_any && self.lateness > 0 {
            ctx.register_event_time_timer(timer.time.saturating_add(self.lateness));
        }
        Ok(())
    }
}

/// A keyed stream with a window assigner, before the aggregation is chosen.
pub struct WindowedStream<T, K, KF, TS> {
    keyed: KeyedStream<T, K, KF>,
    windows: Windows,
    timestamp: TS,
    lateness: Duration,
    name: Option<String>,
}

impl<T, K, KF, TS> WindowedStream<T, K, KF, TS>
where
    T: Data,
    K: Key,
    KF: Fn(&T) -> K + Clone + Send + Sync + 'static,
    TS: Fn(&T) -> Timestamp + Clone + Send + Sync + 'static,
{
    /// Keep windows this long after they fire; records arriving meanwhile update and
    /// re-fire them. Later records go to the `late` stream.
    pub fn allowed_lateness(mut self, lateness: Duration) -> Self {
        self.lateness = lateness;
        self
    }

    /// Name the window operator (its state is stored under this name).
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Aggregate each window incrementally with `agg`.
    pub fn aggregate<A: AggregateFunction<T>>(self, agg: A) -> WindowOutput<K, A::Out, T> {
        let op = WindowOperator::new(self.windows, self.lateness, self.timestamp, agg);
        let mut events = self.keyed.process(op);
        if let Some(n) = &self.name {
            events = events.name(n);
        }
        WindowOutput {
            results: events.flat_map(|e| match e {
                WindowEvent::Fired(w) => Some(w),
                WindowEvent::Late(_) => None,
            }),
            late: events.flat_map(|e| match e {
                WindowEvent::Late(t) => Some(t),
                WindowEvent::Fired(_) => None,
            }),
        }
    }

    /// Count the records of each window.
    pub fn count(self) -> WindowOutput<K, u64, T> {
        self.aggregate(Count)
    }

    /// Combine the records of each window pairwise.
    pub fn reduce<F: Fn(T, T) -> T + Clone + Send + Sync + 'static>(
        self,
        f: F,
    ) -> WindowOutput<K, T, T>
    where
        T: Serialize + DeserializeOwned + Sync,
    {
        self.aggregate(ReduceAggregate(f))
    }

    /// Process all records of a window at once when it fires.
    pub fn process<O: Data, F>(self, f: F) -> WindowOutput<K, O, T>
    where
        T: Serialize + DeserializeOwned + Sync,
        F: Fn(&K, &Window, Vec<T>) -> O + Clone + Send + Sync + 'static,
    {
        let out = self.aggregate(CollectAll(PhantomData));
        WindowOutput {
            results: out.results.map(move |w| Windowed {
                value: f(&w.key, &w.window, w.value),
                key: w.key,
                window: w.window,
            }),
            late: out.late,
        }
    }
}

/// Adds event-time windows to keyed streams.
pub trait WindowExt<T, K, KF> {
    /// Group the keyed stream into `windows` by the event time `timestamp` returns.
    ///
    /// ```
    /// use exactly_engine::prelude::*;
    /// use exactly_engine::testing::{CollectSink, VecSource};
    /// use exactly_operators::{WindowExt, Windows};
    /// use std::time::Duration;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let job = Job::builder("counts").checkpoint_storage("memory://").build()?;
    /// let clicks = vec![("a".to_string(), 1_000i64), ("a".into(), 1_500), ("b".into(), 2_500)];
    /// let out = CollectSink::new();
    /// let windows = job
    ///     .source("clicks", VecSource::new(clicks))
    ///     .with_watermarks(WatermarkStrategy::monotonic(|c: &(String, i64)| c.1))
    ///     .key_by(|c| c.0.clone())
    ///     .window(Windows::tumbling(Duration::from_secs(1)), |c| c.1)
    ///     .name("clicks-per-second")
    ///     .count();
    /// windows.results.map(|w| (w.key, w.window.start, w.value)).sink("counts", out.clone());
    /// job.run()?;
    /// assert_eq!(out.sorted(), vec![("a".to_string(), 1_000, 2), ("b".to_string(), 2_000, 1)]);
    /// # Ok(()) }
    /// ```
    fn window<TS: Fn(&T) -> Timestamp + Clone + Send + Sync + 'static>(
        &self,
        windows: Windows,
        timestamp: TS,
    ) -> WindowedStream<T, K, KF, TS>;
}

impl<T, K, KF> WindowExt<T, K, KF> for KeyedStream<T, K, KF>
where
    T: Data,
    K: Key,
    KF: Fn(&T) -> K + Clone + Send + Sync + 'static,
{
    fn window<TS: Fn(&T) -> Timestamp + Clone + Send + Sync + 'static>(
        &self,
        windows: Windows,
        timestamp: TS,
    ) -> WindowedStream<T, K, KF, TS> {
        WindowedStream {
            keyed: self.clone(),
            windows,
            timestamp,
            lateness: Duration::ZERO,
            name: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_engine::testing::KeyedHarness;

    type Ev = (String, i64);
    type Op = WindowOperator<Ev, Count, fn(&Ev) -> Timestamp>;

    fn ts(e: &Ev) -> Timestamp {
        e.1
    }

    fn op(windows: Windows, lateness_ms: u64) -> Op {
        WindowOperator::new(
            windows,
            Duration::from_millis(lateness_ms),
            ts as fn(&Ev) -> Timestamp,
            Count,
        )
    }

    fn harness(windows: Windows, lateness_ms: u64) -> KeyedHarness<String, Ev, Op> {
        KeyedHarness::new(op(windows, lateness_ms)).unwrap()
    }

    fn feed(h: &mut KeyedHarness<String, Ev, Op>, key: &str, t: i64) {
        h.process(key.to_string(), (key.to_string(), t)).unwrap();
    }

    /// (key, start, end, count) of a fired window.
    type Fired = (String, i64, i64, u64);

    /// Fired windows, and late timestamps.
    fn drain(h: &mut KeyedHarness<String, Ev, Op>) -> (Vec<Fired>, Vec<i64>) {
        let mut fired = Vec::new();
        let mut late = Vec::new();
        for e in h.take_output() {
            match e {
                WindowEvent::Fired(w) => fired.push((w.key, w.window.start, w.window.end, w.value)),
                WindowEvent::Late((_, t)) => late.push(t),
            }
        }
        fired.sort();
        (fired, late)
    }

    fn s(k: &str) -> String {
        k.to_string()
    }

    #[test]
    fn tumbling_assignment_at_boundaries_and_negative_times() {
        let w = Windows::tumbling(Duration::from_millis(1000));
        assert_eq!(
            w.assign(999).collect::<Vec<_>>(),
            vec![Window {
                start: 0,
                end: 1000
            }]
        );
        assert_eq!(
            w.assign(1000).collect::<Vec<_>>(),
            vec![Window {
                start: 1000,
                end: 2000
            }]
        );
        assert_eq!(
            w.assign(-1).collect::<Vec<_>>(),
            vec![Window {
                start: -1000,
                end: 0
            }]
        );
    }

    #[test]
    fn sliding_assignment_covers_size_over_slide_windows() {
        let w = Windows::sliding(Duration::from_millis(30), Duration::from_millis(10));
        let mut got: Vec<Window> = w.assign(25).collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                Window { start: 0, end: 30 },
                Window { start: 10, end: 40 },
                Window { start: 20, end: 50 }
            ]
        );
    }

    #[test]
    fn tumbling_fires_exactly_when_the_watermark_reaches_the_last_timestamp() {
        let mut h = harness(Windows::tumbling(Duration::from_millis(1000)), 0);
        feed(&mut h, "a", 0);
        feed(&mut h, "a", 999);
        feed(&mut h, "a", 1000);
        feed(&mut h, "b", 500);
        h.watermark(998).unwrap();
        assert_eq!(drain(&mut h), (vec![], vec![]));
        h.watermark(999).unwrap();
        assert_eq!(
            drain(&mut h),
            (vec![(s("a"), 0, 1000, 2), (s("b"), 0, 1000, 1)], vec![])
        );
        // No lateness: a record for [0, 1000) is now late and goes to the side output.
        feed(&mut h, "a", 10);
        assert_eq!(drain(&mut h), (vec![], vec![10]));
        assert_eq!(h.counter("late_records"), 1);
        h.watermark(1999).unwrap();
        assert_eq!(drain(&mut h), (vec![(s("a"), 1000, 2000, 1)], vec![]));
        assert_eq!(
            h.state_entries(),
            0,
            "fired windows and their timers are purged"
        );
    }

    #[test]
    fn allowed_lateness_refires_updates_then_routes_to_side_output() {
        let mut h = harness(Windows::tumbling(Duration::from_millis(100)), 50);
        feed(&mut h, "a", 10);
        h.watermark(99).unwrap();
        assert_eq!(drain(&mut h).0, vec![(s("a"), 0, 100, 1)]);
        // Within lateness (cleanup at 99 + 50 = 149): updated result fires at once.
        h.watermark(148).unwrap();
        feed(&mut h, "a", 20);
        assert_eq!(drain(&mut h), (vec![(s("a"), 0, 100, 2)], vec![]));
        // The cleanup timer at 149 purges the window without firing again.
        h.watermark(149).unwrap();
        assert_eq!(drain(&mut h), (vec![], vec![]));
        assert_eq!(h.state_entries(), 0);
        feed(&mut h, "a", 30);
        assert_eq!(drain(&mut h), (vec![], vec![30]));
    }

    #[test]
    fn sessions_merge_when_a_record_bridges_them() {
        let mut h = harness(Windows::session(Duration::from_millis(10)), 0);
        feed(&mut h, "a", 0); // [0, 10)
        feed(&mut h, "a", 25); // [25, 35)
        feed(&mut h, "a", 5); // [5, 15) touches [0, 10) -> [0, 15)
        h.watermark(13).unwrap();
        assert_eq!(
            drain(&mut h).0,
            vec![],
            "the merged session ends at 15, its old timer at 9 is gone"
        );
        feed(&mut h, "a", 14); // [14, 24) merges into [0, 24); touches [25, 35)? no: 24 < 25
        feed(&mut h, "a", 24); // [24, 34) touches both -> [0, 35)
        h.watermark(34).unwrap();
        assert_eq!(drain(&mut h).0, vec![(s("a"), 0, 35, 5)]);
        assert_eq!(h.state_entries(), 0);
    }

    #[test]
    fn open_windows_and_pending_timers_survive_checkpoint_and_restore() {
        let w = Windows::sliding(Duration::from_millis(100), Duration::from_millis(50));
        let mut h = harness(w, 20);
        for t in [10, 60, 70, 120] {
            feed(&mut h, "k", t);
        }
        h.watermark(99).unwrap();
        let before = drain(&mut h).0;
        assert_eq!(before, vec![(s("k"), -50, 50, 1), (s("k"), 0, 100, 3)]);
        h.checkpoint_and_restore(op(w, 20)).unwrap();
        feed(&mut h, "k", 95); // within lateness of [0, 100): re-fires; also in [50, 150)
        h.watermark(200).unwrap();
        let (fired, late) = drain(&mut h);
        assert_eq!(late, Vec::<i64>::new());
        assert_eq!(
            fired,
            vec![
                (s("k"), 0, 100, 4),
                (s("k"), 50, 150, 4),
                (s("k"), 100, 200, 1)
            ]
        );
    }
}
