//! Operators built on the engine's public API, added to the DSL by extension traits.
//!
//! * [`ReduceExt::reduce`]: running reduction per key.
//! * [`WindowExt::window`]: tumbling, sliding and session event-time windows.
//! * [`DedupExt::dedup_by`]: drop records whose id was seen within a TTL.
//! * [`ConnectExt::connect`]: two inputs with shared keyed state (co-process);
//!   [`IntervalJoinExt::interval_join`] and [`IntervalJoinExt::window_join`].

#![warn(missing_docs)]

mod connect;
mod dedup;
mod reduce;
mod window;

pub use connect::{
    CoProcess, CoProcessFunction, ConnectExt, ConnectedStreams, Either, IntervalJoin,
    IntervalJoinExt, KeyedConnectedStreams, WindowJoin,
};
pub use dedup::{Dedup, DedupExt, DedupTime};
pub use reduce::ReduceExt;
pub use window::{
    AggregateFunction, Assigned, CollectAll, Count, ReduceAggregate, Window, WindowEvent,
    WindowExt, WindowOperator, WindowOutput, Windowed, WindowedStream, Windows,
};
