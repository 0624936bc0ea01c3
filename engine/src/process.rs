//! Keyed process functions: user logic that runs once per record with state scoped to
//! the record's key.

use crate::api::{BoxError, Data};
use crate::error::Result;
use crate::state::{MapState, MemoryKeyedState, ValueState};
use crate::time::{Clock, TimeDomain, Timer, Timestamp};
use serde::{de::DeserializeOwned, Serialize};

/// What a keyed process function sees for one record: its key, the key's state, and
/// the output.
pub struct KeyedContext<'a, K, O> {
    pub(crate) key: &'a K,
    pub(crate) state: &'a mut MemoryKeyedState,
    pub(crate) out: &'a mut Vec<O>,
    pub(crate) watermark: Timestamp,
    pub(crate) clock: &'a dyn Clock,
}

impl<'a, K, O> KeyedContext<'a, K, O> {
    /// A context over `state` (whose current key must already be set); used by test
    /// harnesses that drive a function directly.
    pub fn new(
        key: &'a K,
        state: &'a mut MemoryKeyedState,
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

    /// Call `on_timer` for the current key once the watermark reaches `time`.
    pub fn register_event_time_timer(&mut self, time: Timestamp) {
        self.state.register_timer(TimeDomain::EventTime, time)
    }

    /// Cancel an event-time timer of the current key.
    pub fn delete_event_time_timer(&mut self, time: Timestamp) {
        self.state.delete_timer(TimeDomain::EventTime, time)
    }

    /// Call `on_timer` for the current key once the clock reaches `time`. A timer that
    /// came due while the job was down fires right after restore.
    pub fn register_processing_time_timer(&mut self, time: Timestamp) {
        self.state.register_timer(TimeDomain::ProcessingTime, time)
    }

    /// Cancel a processing-time timer of the current key.
    pub fn delete_processing_time_timer(&mut self, time: Timestamp) {
        self.state.delete_timer(TimeDomain::ProcessingTime, time)
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

    /// The current key's value of `state`.
    pub fn value<V: DeserializeOwned>(&mut self, state: ValueState<V>) -> Result<Option<V>> {
        self.state.get(state)
    }

    /// Set the current key's value of `state`.
    pub fn set_value<V: Serialize>(&mut self, state: ValueState<V>, value: &V) -> Result<()> {
        self.state.put(state, value)
    }

    /// Remove the current key's value of `state`.
    pub fn clear_value<V>(&mut self, state: ValueState<V>) {
        self.state.clear(state)
    }

    /// One entry of the current key's map `state`.
    pub fn map_get<UK: Serialize, UV: DeserializeOwned>(
        &mut self,
        state: MapState<UK, UV>,
        key: &UK,
    ) -> Result<Option<UV>> {
        self.state.map_get(state, key)
    }

    /// Set one entry of the current key's map `state`.
    pub fn map_put<UK: Serialize, UV: Serialize>(
        &mut self,
        state: MapState<UK, UV>,
        key: &UK,
        value: &UV,
    ) -> Result<()> {
        self.state.map_put(state, key, value)
    }

    /// Remove one entry of the current key's map `state`.
    pub fn map_remove<UK: Serialize, UV>(
        &mut self,
        state: MapState<UK, UV>,
        key: &UK,
    ) -> Result<()> {
        self.state.map_remove(state, key)
    }

    /// All entries of the current key's map `state`.
    pub fn map_entries<UK: DeserializeOwned, UV: DeserializeOwned>(
        &mut self,
        state: MapState<UK, UV>,
    ) -> Result<Vec<(UK, UV)>> {
        self.state.map_entries(state)
    }

    /// Remove all entries of the current key's map `state`.
    pub fn map_clear<UK, UV>(&mut self, state: MapState<UK, UV>) {
        self.state.map_clear(state)
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
