//! Running reduction per key.

use exactly_engine::api::{BoxError, Data, Key};
use exactly_engine::dsl::{KeyedStream, Stream};
use exactly_engine::process::{KeyedContext, KeyedProcessFunction};
use exactly_engine::state::ValueState;
use serde::{de::DeserializeOwned, Serialize};

/// Keeps, per key, the reduction of every record seen so far and emits it after each
/// record. The accumulator is keyed state, so it is checkpointed and restored.
#[derive(Clone)]
pub struct Reduce<F> {
    f: F,
}

fn acc<T>() -> ValueState<T> {
    ValueState::new("reduce")
}

impl<K: Key, T, F> KeyedProcessFunction<K, T> for Reduce<F>
where
    T: Data + Serialize + DeserializeOwned + Sync,
    F: Fn(T, T) -> T + Clone + Send + Sync + 'static,
{
    type Out = T;

    fn process(&mut self, input: T, ctx: &mut KeyedContext<'_, K, T>) -> Result<(), BoxError> {
        let next = match ctx.value(acc::<T>())? {
            Some(prev) => (self.f)(prev, input),
            None => input,
        };
        ctx.set_value(acc::<T>(), &next)?;
        ctx.emit(next);
        Ok(())
    }
}

/// Adds `reduce` to keyed streams.
pub trait ReduceExt<T> {
    /// Combine each record with the key's previous reduction and emit the result.
    ///
    /// ```
    /// use exactly_engine::prelude::*;
    /// use exactly_engine::testing::{CollectSink, VecSource};
    /// use exactly_operators::ReduceExt;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let job = Job::builder("totals").checkpoint_storage("memory://").build()?;
    /// let out = CollectSink::new();
    /// job.source("payments", VecSource::new(vec![(1u32, 5i64), (2, 1), (1, 7)]))
    ///     .key_by(|p| p.0)
    ///     .reduce(|a, b| (a.0, a.1 + b.1))
    ///     .name("sum-by-account")
    ///     .sink("totals", out.clone());
    /// job.run()?;
    /// assert_eq!(out.sorted(), vec![(1, 5), (1, 12), (2, 1)]);
    /// # Ok(()) }
    /// ```
    fn reduce<F: Fn(T, T) -> T + Clone + Send + Sync + 'static>(&self, f: F) -> Stream<T>;
}

impl<T, K, KF> ReduceExt<T> for KeyedStream<T, K, KF>
where
    T: Data + Serialize + DeserializeOwned + Sync,
    K: Key,
    KF: Fn(&T) -> K + Clone + Send + Sync + 'static,
{
    fn reduce<F: Fn(T, T) -> T + Clone + Send + Sync + 'static>(&self, f: F) -> Stream<T> {
        self.process(Reduce { f })
    }
}
