//! Operators built on the engine's public API, added to the DSL by extension traits.
//!
//! * [`ReduceExt::reduce`]: running reduction per key.
//! * [`WindowExt::window`]: tumbling, sliding and session event-time windows.
//! * [`DedupExt::dedup_by`]: drop records whose id was seen within a TTL.

mod dedup;
mod reduce;
mod window;

pub use dedup::{Dedup, DedupExt, DedupTime};
pub use reduce::ReduceExt;
pub use window::{
    AggregateFunction, CollectAll, Count, ReduceAggregate, Window, WindowEvent, WindowExt,
    WindowOperator, WindowOutput, Windowed, WindowedStream, Windows,
};
