//! Keyed process functions: user logic that runs once per record with state scoped to
//! the record's key.

use crate::api::{BoxError, Data, Key};
use crate::error::Error;
use crate::error::Result;
use crate::ids::{KeyGroup, OperatorId, SubtaskIndex};
use crate::metrics::Metrics;
use crate::metrics::OpenContext;
use crate::state::{KeyedState, MapState, StateValue, ValueState};
use crate::time::{Clock, TimeDomain, Timer, Timestamp};
use std::marker::PhantomData;
use std::sync::Arc;

/// What a keyed process function sees for one record: its key, the key's state, and
/// the output.
pub struct KeyedContext<'a, K, O> {
    pub(crate) key: &'a K,
    pub(crate) state: &'a mut KeyedState<K>,
    pub(crate) out: &'a mut Vec<O>,
    pub(crate) watermark: Timestamp,
    pub(crate) clock: &'a dyn Clock,
}

impl<'a, K, O> KeyedContext<'a, K, O> {
    /// A context for `key` over `state`; used by test harnesses that drive a function
    /// directly.
    pub fn new(
        key: &'a K,
        state: &'a mut KeyedState<K>,
        out: &'a mut Vec<O>,
        watermark: Timestamp,
        clock: &'a dyn Clock,
    ) -> Self {
        KeyedContext {
            key,
            state,
            out,
            watermark,
            clock,
        }
    }
}

impl<K, O> KeyedContext<'_, K, O> {
    /// The operator's current event time (watermark); `i64::MIN` before the first one.
    pub fn current_watermark(&self) -> Timestamp {
        self.watermark
    }

    /// The job clock's current time.
    pub fn current_processing_time(&self) -> Timestamp {
        self.clock.now_ms()
    }

    /// The current record's key.
    pub fn key(&self) -> &K {
        self.key
    }

    /// Emit a record downstream.
    #[inline]
    pub fn emit(&mut self, record: O) {
        self.out.push(record);
    }
}

impl<K: Key, O> KeyedContext<'_, K, O> {
    /// Call `on_timer` for the current key once the watermark reaches `time`.
    pub fn register_event_time_timer(&mut self, time: Timestamp) {
        self.state
            .register_timer(self.key, TimeDomain::EventTime, time)
    }

    /// Cancel an event-time timer of the current key.
    pub fn delete_event_time_timer(&mut self, time: Timestamp) {
        self.state
            .delete_timer(self.key, TimeDomain::EventTime, time)
    }

    /// Call `on_timer` for the current key once the clock reaches `time`. A timer that
    /// came due while the job was down fires right after restore.
    pub fn register_processing_time_timer(&mut self, time: Timestamp) {
        self.state
            .register_timer(self.key, TimeDomain::ProcessingTime, time)
    }

    /// Cancel a processing-time timer of the current key.
    pub fn delete_processing_time_timer(&mut self, time: Timestamp) {
        self.state
            .delete_timer(self.key, TimeDomain::ProcessingTime, time)
    }

    /// The clock's time, read only for states with a TTL.
    #[inline]
    fn now_for<V>(&self, state: ValueState<V>) -> Timestamp {
        match state.ttl_ms() {
            None => 0,
            Some(_) => self.clock.now_ms(),
        }
    }

    /// The current key's value of `state` (`None` if a TTL expired).
    #[inline]
    pub fn value<V: StateValue>(&mut self, state: ValueState<V>) -> Result<Option<V>> {
        let now = self.now_for(state);
        self.state.get(self.key, state, now)
    }

    /// Set the current key's value of `state` (restarting its TTL, if it has one).
    #[inline]
    pub fn set_value<V: StateValue>(&mut self, state: ValueState<V>, value: &V) -> Result<()> {
        let now = self.now_for(state);
        self.state.put(self.key, state, value, now)
    }

    /// Remove the current key's value of `state`.
    pub fn clear_value<V: StateValue>(&mut self, state: ValueState<V>) {
        self.state.clear(self.key, state)
    }

    /// One entry of the current key's map `state`.
    pub fn map_get<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        state: MapState<UK, UV>,
        key: &UK,
    ) -> Result<Option<UV>> {
        self.state.map_get(self.key, state, key)
    }

    /// Set one entry of the current key's map `state`.
    pub fn map_put<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        state: MapState<UK, UV>,
        key: &UK,
        value: &UV,
    ) -> Result<()> {
        self.state.map_put(self.key, state, key, value)
    }

    /// Remove one entry of the current key's map `state`.
    pub fn map_remove<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        state: MapState<UK, UV>,
        key: &UK,
    ) -> Result<()> {
        self.state.map_remove(self.key, state, key)
    }

    /// All entries of the current key's map `state` (in memory: in insertion order).
    pub fn map_entries<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        state: MapState<UK, UV>,
    ) -> Result<Vec<(UK, UV)>> {
        self.state.map_entries(self.key, state)
    }

    /// Change entry `key` of the current key's map `state` in place (created with
    /// `init` if absent) and return what `f` returns. In memory this is one lookup,
    /// where [`Self::map_get`] then [`Self::map_put`] are two and copy the value twice.
    #[inline]
    pub fn map_update<UK: StateValue + Eq, UV: StateValue, R>(
        &mut self,
        state: MapState<UK, UV>,
        key: &UK,
        init: impl FnOnce() -> UV,
        f: impl FnOnce(&mut UV) -> R,
    ) -> Result<R> {
        self.state.map_update(self.key, state, key, init, f)
    }

    /// Visit every entry of the current key's map `state` (in memory: in insertion
    /// order), keeping those for which `f` returns true, with the changes `f` made to
    /// them. `f` may emit through its [`Emitter`]. Nothing is copied out, unlike
    /// [`Self::map_entries`].
    pub fn map_retain<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        state: MapState<UK, UV>,
        mut f: impl FnMut(&UK, &mut UV, &mut Emitter<'_, K, O>) -> bool,
    ) -> Result<()> {
        let mut emitter = Emitter {
            key: self.key,
            out: &mut *self.out,
        };
        self.state
            .map_retain(self.key, state, |uk, uv| f(uk, uv, &mut emitter))
    }

    /// The key group of the current key: `hash(key) % max_parallelism`, the unit in which
    /// keyed state and timers move between instances when a job is restored at another
    /// parallelism. Computed on each call (an encoding and a hash of the key).
    pub fn key_group(&mut self) -> Result<KeyGroup> {
        self.state.key_group(self.key)
    }

    /// Visit every entry of map `state` of **every key** of this operator instance, not
    /// only the current one, keeping those for which `f` returns true (with the changes
    /// `f` made); `f` may emit through its [`Emitter`], whose key is the visited one.
    /// For work that concerns all keys at one moment, such as firing every key's window
    /// at a window end with one pass over the state instead of a lookup per key. Costs
    /// O(entries of `state` in this instance): in memory one sequential pass, on
    /// RocksDB a scan of each key group.
    pub fn map_retain_all_keys<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        state: MapState<UK, UV>,
        mut f: impl FnMut(&UK, &mut UV, &mut Emitter<'_, K, O>) -> bool,
    ) -> Result<()> {
        let out = &mut *self.out;
        self.state.map_retain_all_keys(state, |key, uk, uv| {
            f(
                uk,
                uv,
                &mut Emitter {
                    key,
                    out: &mut *out,
                },
            )
        })
    }

    /// Remove all entries of the current key's map `state`.
    pub fn map_clear<UK: StateValue + Eq, UV: StateValue>(&mut self, state: MapState<UK, UV>) {
        self.state.map_clear(self.key, state)
    }
}

/// The current key and the output, for code that runs while the key's state is borrowed
/// (see [`KeyedContext::map_retain`]).
pub struct Emitter<'a, K, O> {
    key: &'a K,
    out: &'a mut Vec<O>,
}

impl<K, O> Emitter<'_, K, O> {
    /// The current record's key.
    pub fn key(&self) -> &K {
        self.key
    }

    /// Emit a record downstream.
    #[inline]
    pub fn emit(&mut self, record: O) {
        self.out.push(record);
    }
}

/// Per-record logic with keyed state. One clone runs in every parallel instance.
///
/// ```
/// use exactly_engine::prelude::*;
///
/// const TOTAL: ValueState<i64> = ValueState::new("total");
///
/// #[derive(Clone)]
/// struct RunningTotal;
///
/// impl KeyedProcessFunction<u32, (u32, i64)> for RunningTotal {
///     type Out = (u32, i64);
///     fn process(&mut self, (k, v): (u32, i64), ctx: &mut KeyedContext<'_, u32, (u32, i64)>) -> Result<(), BoxError> {
///         let total = ctx.value(TOTAL)?.unwrap_or(0) + v;
///         ctx.set_value(TOTAL, &total)?;
///         ctx.emit((k, total));
///         Ok(())
///     }
/// }
/// ```
pub trait KeyedProcessFunction<K, I>: Clone + Send + Sync + 'static {
    /// Records emitted.
    type Out: Data;

    /// Handle one record.
    fn process(
        &mut self,
        input: I,
        ctx: &mut KeyedContext<'_, K, Self::Out>,
    ) -> std::result::Result<(), BoxError>;

    /// Called once per parallel instance before any record, e.g. to register counters.
    fn open(&mut self, _ctx: &mut OpenContext<'_>) -> std::result::Result<(), BoxError> {
        Ok(())
    }

    /// A timer of the current key fired.
    fn on_timer(
        &mut self,
        _timer: Timer,
        _ctx: &mut KeyedContext<'_, K, Self::Out>,
    ) -> std::result::Result<(), BoxError> {
        Ok(())
    }
}

/// A keyed process function from a closure; see [`crate::dsl::KeyedStream::process_fn`].
#[derive(Clone)]
pub struct ProcessFn<F, O> {
    f: F,
    _o: std::marker::PhantomData<fn() -> O>,
}

impl<F, O> ProcessFn<F, O> {
    /// Wrap a closure.
    pub fn new(f: F) -> Self {
        ProcessFn {
            f,
            _o: std::marker::PhantomData,
        }
    }
}

impl<K, I, O, F> KeyedProcessFunction<K, I> for ProcessFn<F, O>
where
    O: Data,
    F: FnMut(I, &mut KeyedContext<'_, K, O>) -> std::result::Result<(), BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
{
    type Out = O;
    fn process(
        &mut self,
        input: I,
        ctx: &mut KeyedContext<'_, K, O>,
    ) -> std::result::Result<(), BoxError> {
        (self.f)(input, ctx)
    }
}

/// The per-record and per-timer logic of a keyed process operator, shared by the
/// runtime operator and [`crate::testing::KeyedHarness`].
pub(crate) struct KeyedCore<K, I, F: KeyedProcessFunction<K, I>> {
    pub operator: OperatorId,
    pub subtask: SubtaskIndex,
    pub func: F,
    pub state: KeyedState<K>,
    pub watermark: Timestamp,
    pub clock: Arc<dyn Clock>,
    due: Vec<(Timestamp, K)>,
    _p: PhantomData<fn(I) -> K>,
}

impl<K: Key, I, F: KeyedProcessFunction<K, I>> KeyedCore<K, I, F> {
    pub fn new(
        operator: OperatorId,
        subtask: SubtaskIndex,
        func: F,
        state: KeyedState<K>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        KeyedCore {
            operator,
            subtask,
            func,
            state,
            watermark: Timestamp::MIN,
            clock,
            due: Vec::new(),
            _p: PhantomData,
        }
    }

    fn fail(&self, source: BoxError) -> Error {
        Error::from_user(&self.operator, self.subtask, source)
    }

    /// Call `open` on the function.
    pub fn open(&mut self, metrics: &Metrics) -> Result<()> {
        let r = self
            .func
            .open(&mut OpenContext::new(&self.operator.0, metrics));
        r.map_err(|e| self.fail(e))
    }

    /// Run the function for one record of `key`.
    #[inline]
    pub fn process(&mut self, key: &K, record: I, out: &mut Vec<F::Out>) -> Result<()> {
        let mut ctx = KeyedContext {
            key,
            state: &mut self.state,
            out,
            watermark: self.watermark,
            clock: &*self.clock,
        };
        let r = self.func.process(record, &mut ctx);
        r.map_err(|e| self.fail(e))?;
        self.state.take_failure()
    }

    /// Fire every timer of `domain` due at `upto`, including timers that firing
    /// registers for times already due. `after_each` runs after every timer (to send
    /// full batches on).
    pub fn fire_timers(
        &mut self,
        domain: TimeDomain,
        upto: Timestamp,
        out: &mut Vec<F::Out>,
        mut after_each: impl FnMut(&mut Vec<F::Out>) -> Result<()>,
    ) -> Result<()> {
        if domain == TimeDomain::ProcessingTime {
            self.state.expire_ttl(upto)?;
        }
        loop {
            self.due.clear();
            self.state.drain_due_timers(domain, upto, &mut self.due)?;
            if self.due.is_empty() {
                return Ok(());
            }
            let mut due = std::mem::take(&mut self.due);
            for (time, key) in &due {
                let mut ctx = KeyedContext {
                    key,
                    state: &mut self.state,
                    out,
                    watermark: self.watermark,
                    clock: &*self.clock,
                };
                let r = self.func.on_timer(
                    Timer {
                        time: *time,
                        domain,
                    },
                    &mut ctx,
                );
                r.map_err(|e| self.fail(e))?;
                self.state.take_failure()?;
                after_each(out)?;
            }
            due.clear();
            self.due = due;
        }
    }
}
