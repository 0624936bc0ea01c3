//! Pipelines shared by the engine's integration tests.
#![allow(dead_code)]

use exactly_engine::prelude::*;

const SUM: ValueState<i64> = ValueState::new("sum");

/// A running sum per key (operator "sum"): `(key, value)` in, `(key, sum so far)` out.
pub fn running_sum<K: Key>(events: &Stream<(K, i64)>) -> Stream<(K, i64)> {
    events
        .key_by(|e: &(K, i64)| e.0.clone())
        .process_fn(
            |(k, v): (K, i64), ctx: &mut KeyedContext<'_, K, (K, i64)>| {
                let s = ctx.value(SUM)?.unwrap_or(0) + v;
                ctx.set_value(SUM, &s)?;
                ctx.emit((k, s));
                Ok(())
            },
        )
        .name("sum")
}
