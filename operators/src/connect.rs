//! Two inputs: `connect` with a keyed co-process function, the interval join and the
//! windowed join.
//!
//! Both inputs are tagged ([`Either`]), merged and keyed with one key function per side,
//! so the two sides of a key meet in the same parallel instance and share its keyed
//! state and timers. The merged task aligns barriers from both inputs, so state of both
//! sides is snapshotted at one consistent cut.

use crate::window::{Window, Windows};
use exactly_engine::api::{BoxError, Data, Key};
use exactly_engine::dsl::{KeyedStream, Stream};
use exactly_engine::metrics::{Counter, OpenContext};
use exactly_engine::process::{KeyedContext, KeyedProcessFunction};
use exactly_engine::state::{MapState, ValueState};
use exactly_engine::time::{Timer, Timestamp};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::marker::PhantomData;

/// A record from the left or the right input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Either<A, B> {
    /// From the first input.
    Left(A),
    /// From the second input.
    Right(B),
}

/// Logic over two keyed inputs with shared keyed state.
pub trait CoProcessFunction<K, A, B>: Clone + Send + Sync + 'static {
    /// Records emitted.
    type Out: Data;
    /// Called once per parallel instance.
    fn open(&mut self, _ctx: &mut OpenContext<'_>) -> Result<(), BoxError> {
        Ok(())
    }
    /// A record of the first input.
    fn process_left(
        &mut self,
        a: A,
        ctx: &mut KeyedContext<'_, K, Self::Out>,
    ) -> Result<(), BoxError>;
    /// A record of the second input.
    fn process_right(
        &mut self,
        b: B,
        ctx: &mut KeyedContext<'_, K, Self::Out>,
    ) -> Result<(), BoxError>;
    /// A timer of the current key fired.
    fn on_timer(
        &mut self,
        _timer: Timer,
        _ctx: &mut KeyedContext<'_, K, Self::Out>,
    ) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Runs a [`CoProcessFunction`] as a keyed process function over `Either`.
#[derive(Clone)]
pub struct CoProcess<F>(pub F);

impl<K: Key, A, B, F: CoProcessFunction<K, A, B>> KeyedProcessFunction<K, Either<A, B>>
    for CoProcess<F>
{
    type Out = F::Out;
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<(), BoxError> {
        self.0.open(ctx)
    }
    fn process(
        &mut self,
        input: Either<A, B>,
        ctx: &mut KeyedContext<'_, K, F::Out>,
    ) -> Result<(), BoxError> {
        match input {
            Either::Left(a) => self.0.process_left(a, ctx),
            Either::Right(b) => self.0.process_right(b, ctx),
        }
    }
    fn on_timer(
        &mut self,
        timer: Timer,
        ctx: &mut KeyedContext<'_, K, F::Out>,
    ) -> Result<(), BoxError> {
        self.0.on_timer(timer, ctx)
    }
}

/// Two streams to be processed together.
pub struct ConnectedStreams<A, B> {
    left: Stream<A>,
    right: Stream<B>,
}

/// Two streams keyed so that equal keys meet.
pub struct KeyedConnectedStreams<A, B, K, KA, KB> {
    merged: Stream<Either<A, B>>,
    left_key: KA,
    right_key: KB,
    _k: PhantomData<fn() -> K>,
}

impl<A: Data, B: Data> ConnectedStreams<A, B> {
    /// Key both inputs; records with equal keys share state.
    pub fn key_by<K, KA, KB>(
        self,
        left_key: KA,
        right_key: KB,
    ) -> KeyedConnectedStreams<A, B, K, KA, KB>
    where
        K: Key,
        KA: Fn(&A) -> K + Clone + Send + Sync + 'static,
        KB: Fn(&B) -> K + Clone + Send + Sync + 'static,
    {
        KeyedConnectedStreams {
            merged: self
                .left
                .map(Either::Left)
                .union(&self.right.map(Either::Right)),
            left_key,
            right_key,
            _k: PhantomData,
        }
    }
}

impl<A, B, K, KA, KB> KeyedConnectedStreams<A, B, K, KA, KB>
where
    A: Data,
    B: Data,
    K: Key,
    KA: Fn(&A) -> K + Clone + Send + Sync + 'static,
    KB: Fn(&B) -> K + Clone + Send + Sync + 'static,
{
    /// The merged stream keyed by the two key functions (monomorphised: no dynamic call
    /// per record).
    // The key function is an `impl Fn`, which stable Rust cannot name in a type alias.
    #[allow(clippy::type_complexity)]
    pub fn keyed(
        &self,
    ) -> KeyedStream<Either<A, B>, K, impl Fn(&Either<A, B>) -> K + Clone + Send + Sync + 'static>
    {
        let (ka, kb) = (self.left_key.clone(), self.right_key.clone());
        self.merged.key_by(move |e: &Either<A, B>| match e {
            Either::Left(a) => ka(a),
            Either::Right(b) => kb(b),
        })
    }

    /// Run a co-process function.
    ///
    /// ```
    /// use exactly_engine::prelude::*;
    /// use exactly_engine::testing::{CollectSink, VecSource};
    /// use exactly_operators::{ConnectExt, CoProcessFunction};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// const CHARGED: ValueState<i64> = ValueState::new("charged");
    /// #[derive(Clone)]
    /// struct Match;
    /// impl CoProcessFunction<u32, (u32, i64), (u32, i64)> for Match {
    ///     type Out = (u32, bool);
    ///     fn process_left(&mut self, c: (u32, i64), ctx: &mut KeyedContext<'_, u32, (u32, bool)>) -> Result<(), BoxError> {
    ///         ctx.set_value(CHARGED, &c.1)?;
    ///         Ok(())
    ///     }
    ///     fn process_right(&mut self, p: (u32, i64), ctx: &mut KeyedContext<'_, u32, (u32, bool)>) -> Result<(), BoxError> {
    ///         let ok = ctx.value(CHARGED)? == Some(p.1);
    ///         ctx.emit((p.0, ok));
    ///         Ok(())
    ///     }
    /// }
    /// let job = Job::builder("match").checkpoint_storage("memory://").parallelism(1).build()?;
    /// let out = CollectSink::new();
    /// let charges = job.source("charges", VecSource::new(vec![(1u32, 500i64), (2, 700)]));
    /// // The two inputs race: a payment may be seen before its charge. Real matching
    /// // logic keeps both sides in state and decides on a timer (see the joins).
    /// let payments = job.source("payments", VecSource::new(vec![(1u32, 500i64)]));
    /// charges.connect(&payments).key_by(|c| c.0, |p| p.0).process(Match).name("match").sink("matched", out.clone());
    /// job.run()?;
    /// # Ok(()) }
    /// ```
    pub fn process<F: CoProcessFunction<K, A, B>>(&self, f: F) -> Stream<F::Out> {
        self.keyed().process(CoProcess(f))
    }
}

/// Adds `connect` to streams.
pub trait ConnectExt<A> {
    /// Pair this stream with `other` for two-input processing.
    fn connect<B: Data>(&self, other: &Stream<B>) -> ConnectedStreams<A, B>;
}

impl<A: Data> ConnectExt<A> for Stream<A> {
    fn connect<B: Data>(&self, other: &Stream<B>) -> ConnectedStreams<A, B> {
        ConnectedStreams {
            left: self.clone(),
            right: other.clone(),
        }
    }
}

const JOIN_SEQ: ValueState<u64> = ValueState::new("join-seq");

fn next_seq<K: Key, O>(ctx: &mut KeyedContext<'_, K, O>) -> Result<u64, BoxError> {
    let n = ctx.value(JOIN_SEQ)?.unwrap_or(0);
    ctx.set_value(JOIN_SEQ, &(n + 1))?;
    Ok(n)
}

/// Joins `a` with every `b` of the same key where `b.ts - a.ts` is in
/// `[lower_ms, upper_ms]`. Records at or behind the watermark are late and dropped
/// (counted in `late_records`); buffered records are purged once no match is possible.
#[derive(Clone)]
pub struct IntervalJoin<A, B, TA, TB, F> {
    lower: i64,
    upper: i64,
    ts_a: TA,
    ts_b: TB,
    f: F,
    late: Option<Counter>,
    _p: PhantomData<fn(A, B)>,
}

impl<A, B, TA, TB, F> IntervalJoin<A, B, TA, TB, F> {
    /// An interval join (normally built through [`IntervalJoinExt::interval_join`]).
    pub fn new(lower_ms: i64, upper_ms: i64, ts_a: TA, ts_b: TB, f: F) -> Self {
        assert!(lower_ms <= upper_ms, "interval join needs lower <= upper");
        IntervalJoin {
            lower: lower_ms,
            upper: upper_ms,
            ts_a,
            ts_b,
            f,
            late: None,
            _p: PhantomData,
        }
    }
}

fn left_buf<A>() -> MapState<(Timestamp, u64), A> {
    MapState::new("join-left")
}
fn right_buf<B>() -> MapState<(Timestamp, u64), B> {
    MapState::new("join-right")
}

impl<K, A, B, O, TA, TB, F> CoProcessFunction<K, A, B> for IntervalJoin<A, B, TA, TB, F>
where
    K: Key,
    A: Data + Serialize + DeserializeOwned + Sync,
    B: Data + Serialize + DeserializeOwned + Sync,
    O: Data,
    TA: Fn(&A) -> Timestamp + Clone + Send + Sync + 'static,
    TB: Fn(&B) -> Timestamp + Clone + Send + Sync + 'static,
    F: Fn(&A, &B) -> O + Clone + Send + Sync + 'static,
{
    type Out = O;

    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<(), BoxError> {
        self.late = Some(ctx.counter("late_records"));
        Ok(())
    }

    fn process_left(&mut self, a: A, ctx: &mut KeyedContext<'_, K, O>) -> Result<(), BoxError> {
        let ta = (self.ts_a)(&a);
        if ta <= ctx.current_watermark() {
            self.late.iter().for_each(|c| c.inc());
            return Ok(());
        }
        for ((tb, _), b) in ctx.map_entries(right_buf::<B>())? {
            if tb >= ta + self.lower && tb <= ta + self.upper {
                ctx.emit((self.f)(&a, &b));
            }
        }
        let seq = next_seq(ctx)?;
        ctx.map_put(left_buf::<A>(), &(ta, seq), &a)?;
        ctx.register_event_time_timer(ta + self.upper.max(0));
        Ok(())
    }

    fn process_right(&mut self, b: B, ctx: &mut KeyedContext<'_, K, O>) -> Result<(), BoxError> {
        let tb = (self.ts_b)(&b);
        if tb <= ctx.current_watermark() {
            self.late.iter().for_each(|c| c.inc());
            return Ok(());
        }
        for ((ta, _), a) in ctx.map_entries(left_buf::<A>())? {
            if tb >= ta + self.lower && tb <= ta + self.upper {
                ctx.emit((self.f)(&a, &b));
            }
        }
        let seq = next_seq(ctx)?;
        ctx.map_put(right_buf::<B>(), &(tb, seq), &b)?;
        ctx.register_event_time_timer(tb - self.lower.min(0));
        Ok(())
    }

    fn on_timer(&mut self, timer: Timer, ctx: &mut KeyedContext<'_, K, O>) -> Result<(), BoxError> {
        // A buffered left can still match rights up to ta + upper; a right, lefts down
        // to tb - lower. Past that, with the watermark at `timer.time`, nothing can.
        let (upper, lower) = (self.upper.max(0), self.lower.min(0));
        let mut buffered = 0usize;
        ctx.map_retain(left_buf::<A>(), |(ta, _), _, _| {
            let keep = ta + upper > timer.time;
            buffered += usize::from(keep);
            keep
        })?;
        ctx.map_retain(right_buf::<B>(), |(tb, _), _, _| {
            let keep = tb - lower > timer.time;
            buffered += usize::from(keep);
            keep
        })?;
        if buffered == 0 {
            ctx.clear_value(JOIN_SEQ);
        }
        Ok(())
    }
}

/// Joins records of both inputs that share a key and a window; emits `f(a, b)` for every
/// pair when the window fires. Records for windows already fired are late (dropped and
/// counted in `late_records`).
#[derive(Clone)]
pub struct WindowJoin<A, B, TA, TB, F> {
    windows: Windows,
    ts_a: TA,
    ts_b: TB,
    f: F,
    late: Option<Counter>,
    _p: PhantomData<fn(A, B)>,
}

impl<A, B, TA, TB, F> WindowJoin<A, B, TA, TB, F> {
    /// A windowed join (normally built through [`IntervalJoinExt::window_join`]).
    pub fn new(windows: Windows, ts_a: TA, ts_b: TB, f: F) -> Self {
        assert!(
            !matches!(windows, Windows::Session { .. }),
            "window joins take tumbling or sliding windows"
        );
        WindowJoin {
            windows,
            ts_a,
            ts_b,
            f,
            late: None,
            _p: PhantomData,
        }
    }

    fn add<K: Key, O, X: exactly_engine::state::StateValue>(
        &self,
        ts: Timestamp,
        side: MapState<(Window, u64), X>,
        x: &X,
        ctx: &mut KeyedContext<'_, K, O>,
    ) -> Result<(), BoxError> {
        let mut on_time = false;
        for w in self.windows.assign(ts) {
            if w.max_timestamp() <= ctx.current_watermark() {
                continue;
            }
            on_time = true;
            let seq = next_seq(ctx)?;
            ctx.map_put(side, &(w, seq), x)?;
            ctx.register_event_time_timer(w.max_timestamp());
        }
        if !on_time {
            self.late.iter().for_each(|c| c.inc());
        }
        Ok(())
    }
}

fn wleft<A>() -> MapState<(Window, u64), A> {
    MapState::new("wjoin-left")
}
fn wright<B>() -> MapState<(Window, u64), B> {
    MapState::new("wjoin-right")
}

impl<K, A, B, O, TA, TB, F> CoProcessFunction<K, A, B> for WindowJoin<A, B, TA, TB, F>
where
    K: Key,
    A: Data + Serialize + DeserializeOwned + Sync,
    B: Data + Serialize + DeserializeOwned + Sync,
    O: Data,
    TA: Fn(&A) -> Timestamp + Clone + Send + Sync + 'static,
    TB: Fn(&B) -> Timestamp + Clone + Send + Sync + 'static,
    F: Fn(&A, &B) -> O + Clone + Send + Sync + 'static,
{
    type Out = O;

    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<(), BoxError> {
        self.late = Some(ctx.counter("late_records"));
        Ok(())
    }

    fn process_left(&mut self, a: A, ctx: &mut KeyedContext<'_, K, O>) -> Result<(), BoxError> {
        let ts = (self.ts_a)(&a);
        self.add(ts, wleft::<A>(), &a, ctx)
    }

    fn process_right(&mut self, b: B, ctx: &mut KeyedContext<'_, K, O>) -> Result<(), BoxError> {
        let ts = (self.ts_b)(&b);
        self.add(ts, wright::<B>(), &b, ctx)
    }

    fn on_timer(&mut self, timer: Timer, ctx: &mut KeyedContext<'_, K, O>) -> Result<(), BoxError> {
        // Take the due records of both sides out of the buffers (in one pass each).
        let due = |w: &Window| w.max_timestamp() <= timer.time;
        let (mut lefts, mut rights) = (Vec::new(), Vec::new());
        let mut buffered = 0usize;
        ctx.map_retain(wleft::<A>(), |(w, _), a, _| {
            if due(w) {
                lefts.push((*w, a.clone()));
                return false;
            }
            buffered += 1;
            true
        })?;
        ctx.map_retain(wright::<B>(), |(w, _), b, _| {
            if due(w) {
                rights.push((*w, b.clone()));
                return false;
            }
            buffered += 1;
            true
        })?;
        for (wa, a) in &lefts {
            for (wb, b) in &rights {
                if wa == wb {
                    ctx.emit((self.f)(a, b));
                }
            }
        }
        if buffered == 0 {
            ctx.clear_value(JOIN_SEQ);
        }
        Ok(())
    }
}

/// Adds joins to keyed streams.
pub trait IntervalJoinExt<A, K> {
    /// Join with `other` on the key: `f(a, b)` for every `b` with
    /// `ts_b(b) - ts_a(a)` in `[lower_ms, upper_ms]`.
    ///
    /// ```
    /// use exactly_engine::prelude::*;
    /// use exactly_engine::testing::{CollectSink, VecSource};
    /// use exactly_operators::IntervalJoinExt;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let job = Job::builder("join").checkpoint_storage("memory://").build()?;
    /// let out = CollectSink::new();
    /// let charges = job.source("charges", VecSource::new(vec![(1u32, 1_000i64)]));
    /// let payouts = job.source("payouts", VecSource::new(vec![(1u32, 1_500i64), (1, 9_000)]));
    /// charges
    ///     .key_by(|c| c.0)
    ///     .interval_join(&payouts.key_by(|p| p.0), 0, 2_000, |c| c.1, |p| p.1, |c, p| (c.0, p.1 - c.1))
    ///     .name("charge-payout")
    ///     .sink("matched", out.clone());
    /// job.run()?;
    /// assert_eq!(out.sorted(), vec![(1, 500)]);
    /// # Ok(()) }
    /// ```
    #[allow(clippy::too_many_arguments)]
    fn interval_join<B, KB, TA, TB, O, F>(
        &self,
        other: &KeyedStream<B, K, KB>,
        lower_ms: i64,
        upper_ms: i64,
        ts_a: TA,
        ts_b: TB,
        f: F,
    ) -> Stream<O>
    where
        B: Data + Serialize + DeserializeOwned + Sync,
        KB: Fn(&B) -> K + Clone + Send + Sync + 'static,
        TA: Fn(&A) -> Timestamp + Clone + Send + Sync + 'static,
        TB: Fn(&B) -> Timestamp + Clone + Send + Sync + 'static,
        O: Data,
        F: Fn(&A, &B) -> O + Clone + Send + Sync + 'static;

    /// Join with `other` on the key within the same tumbling or sliding window; emits
    /// `f(a, b)` for every pair when the window fires.
    ///
    /// ```
    /// use exactly_engine::prelude::*;
    /// use exactly_engine::testing::{CollectSink, VecSource};
    /// use exactly_operators::{IntervalJoinExt, Windows};
    /// use std::time::Duration;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let job = Job::builder("wjoin").checkpoint_storage("memory://").build()?;
    /// let out = CollectSink::new();
    /// let views = job.source("views", VecSource::new(vec![(1u32, 100i64), (1, 1_200)]));
    /// let buys = job.source("buys", VecSource::new(vec![(1u32, 900i64)]));
    /// views
    ///     .key_by(|v| v.0)
    ///     .window_join(&buys.key_by(|b| b.0), Windows::tumbling(Duration::from_secs(1)), |v| v.1, |b| b.1, |v, b| (v.1, b.1))
    ///     .name("view-buy")
    ///     .sink("pairs", out.clone());
    /// job.run()?;
    /// assert_eq!(out.sorted(), vec![(100, 900)]);
    /// # Ok(()) }
    /// ```
    fn window_join<B, KB, TA, TB, O, F>(
        &self,
        other: &KeyedStream<B, K, KB>,
        windows: Windows,
        ts_a: TA,
        ts_b: TB,
        f: F,
    ) -> Stream<O>
    where
        B: Data + Serialize + DeserializeOwned + Sync,
        KB: Fn(&B) -> K + Clone + Send + Sync + 'static,
        TA: Fn(&A) -> Timestamp + Clone + Send + Sync + 'static,
        TB: Fn(&B) -> Timestamp + Clone + Send + Sync + 'static,
        O: Data,
        F: Fn(&A, &B) -> O + Clone + Send + Sync + 'static;
}

impl<A, K, KA> IntervalJoinExt<A, K> for KeyedStream<A, K, KA>
where
    A: Data + Serialize + DeserializeOwned + Sync,
    K: Key,
    KA: Fn(&A) -> K + Clone + Send + Sync + 'static,
{
    fn interval_join<B, KB, TA, TB, O, F>(
        &self,
        other: &KeyedStream<B, K, KB>,
        lower_ms: i64,
        upper_ms: i64,
        ts_a: TA,
        ts_b: TB,
        f: F,
    ) -> Stream<O>
    where
        B: Data + Serialize + DeserializeOwned + Sync,
        KB: Fn(&B) -> K + Clone + Send + Sync + 'static,
        TA: Fn(&A) -> Timestamp + Clone + Send + Sync + 'static,
        TB: Fn(&B) -> Timestamp + Clone + Send + Sync + 'static,
        O: Data,
        F: Fn(&A, &B) -> O + Clone + Send + Sync + 'static,
    {
        let (ka, kb) = (self.key_fn().clone(), other.key_fn().clone());
        self.unkeyed()
            .connect(other.unkeyed())
            .key_by(ka, kb)
            .process(IntervalJoin::new(lower_ms, upper_ms, ts_a, ts_b, f))
    }

    fn window_join<B, KB, TA, TB, O, F>(
        &self,
        other: &KeyedStream<B, K, KB>,
        windows: Windows,
        ts_a: TA,
        ts_b: TB,
        f: F,
    ) -> Stream<O>
    where
        B: Data + Serialize + DeserializeOwned + Sync,
        KB: Fn(&B) -> K + Clone + Send + Sync + 'static,
        TA: Fn(&A) -> Timestamp + Clone + Send + Sync + 'static,
        TB: Fn(&B) -> Timestamp + Clone + Send + Sync + 'static,
        O: Data,
        F: Fn(&A, &B) -> O + Clone + Send + Sync + 'static,
    {
        let (ka, kb) = (self.key_fn().clone(), other.key_fn().clone());
        self.unkeyed()
            .connect(other.unkeyed())
            .key_by(ka, kb)
            .process(WindowJoin::new(windows, ts_a, ts_b, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_engine::testing::KeyedHarness;
    use std::time::Duration;

    type Ev = (u32, i64);
    type Tf = fn(&Ev) -> Timestamp;
    type Pair = fn(&Ev, &Ev) -> (i64, i64);

    fn ts(e: &Ev) -> Timestamp {
        e.1
    }
    fn pair(a: &Ev, b: &Ev) -> (i64, i64) {
        (a.1, b.1)
    }

    fn sorted(mut v: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
        v.sort();
        v
    }

    #[test]
    fn interval_join_bounds_are_inclusive_and_state_is_purged() {
        let join: IntervalJoin<Ev, Ev, Tf, Tf, Pair> =
            IntervalJoin::new(-5, 10, ts as Tf, ts as Tf, pair as Pair);
        let mut h = KeyedHarness::new(CoProcess(join)).unwrap();
        let l = |t| Either::Left((1u32, t));
        let r = |t| Either::Right((1u32, t));
        h.process(1, r(94)).unwrap(); // 94 - 100 = -6: outside
        h.process(1, r(95)).unwrap(); // -5: lower bound, inside
        h.process(1, l(100)).unwrap();
        h.process(1, r(110)).unwrap(); // +10: upper bound, inside
        h.process(1, r(111)).unwrap(); // +11: outside
        assert_eq!(sorted(h.take_output()), vec![(100, 95), (100, 110)]);
        h.watermark(150).unwrap();
        assert_eq!(
            h.state_entries(),
            0,
            "buffers, timers and the sequence are purged"
        );
        h.process(1, l(140)).unwrap();
        assert!(h.take_output().is_empty());
        assert_eq!(h.counter("late_records"), 1);
    }

    #[test]
    fn interval_join_keeps_buffers_across_restore() {
        let mk = || -> IntervalJoin<Ev, Ev, Tf, Tf, Pair> {
            IntervalJoin::new(0, 100, ts as Tf, ts as Tf, pair as Pair)
        };
        let mut h = KeyedHarness::new(CoProcess(mk())).unwrap();
        h.process(7, Either::Left((7, 1_000))).unwrap();
        h.watermark(1_050).unwrap();
        h.checkpoint_and_restore(CoProcess(mk())).unwrap();
        h.process(7, Either::Right((7, 1_080))).unwrap();
        assert_eq!(h.take_output(), vec![(1_000, 1_080)]);
    }

    #[test]
    fn window_join_pairs_within_the_same_window_only() {
        let join: WindowJoin<Ev, Ev, Tf, Tf, Pair> = WindowJoin::new(
            Windows::tumbling(Duration::from_millis(100)),
            ts as Tf,
            ts as Tf,
            pair as Pair,
        );
        let mut h = KeyedHarness::new(CoProcess(join)).unwrap();
        for e in [
            Either::Left((1, 10)),
            Either::Left((1, 20)),
            Either::Right((1, 50)),
            Either::Right((1, 150)),
        ] {
            h.process(1, e).unwrap();
        }
        h.watermark(98).unwrap();
        assert!(h.take_output().is_empty());
        h.watermark(99).unwrap();
        assert_eq!(sorted(h.take_output()), vec![(10, 50), (20, 50)]);
        h.process(1, Either::Left((1, 30))).unwrap();
        assert_eq!(h.counter("late_records"), 1);
        h.watermark(199).unwrap();
        assert!(
            h.take_output().is_empty(),
            "a window with one side only emits nothing"
        );
        assert_eq!(h.state_entries(), 0);
    }
}
