//! exactly's engine: the typed DSL, the threaded runtime, barrier checkpoints, keyed
//! state, checkpoint storage and recovery.
//!
//! Start with [`dsl::Job`]; implement [`api::Source`] or [`api::TwoPhaseCommitSink`] to
//! connect other systems. The protocol's decisions (the checkpoint coordinator, barrier
//! alignment, retention) are pure state machines inside the crate; the driver runs
//! them (ARCHITECTURE.md in the repository walks through the layers).

#![warn(missing_docs)]

pub(crate) mod aligner;
pub mod api;
pub mod codec;
pub mod connect;
pub(crate) mod coordinator;
pub(crate) mod driver;
pub mod dsl;
pub mod error;
pub mod failpoints;
pub mod ids;
pub mod inspect;
pub mod manifest;
pub mod metrics;
pub mod operator;
pub(crate) mod plan;
pub mod process;
pub mod report;
pub(crate) mod retention;
pub(crate) mod runtime;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod testing;
pub mod time;

/// Everything a pipeline author writes. Test doubles (`VecSource`, `CollectSink`,
/// `ManualClock`) and the chaos kit are in [`testing`].
pub mod prelude {
    pub use crate::api::{
        BoxError, Data, Key, RecoveryContext, SinkContext, SinkWriter, Source, SourceContext,
        SourcePoll, SourceReader, TwoPhaseCommitSink,
    };
    pub use crate::dsl::{Job, JobBuilder, JobHandle, KeyedStream, RestartPolicy, Stream};
    pub use crate::error::{Error, ErrorClass};
    pub use crate::ids::CheckpointId;
    pub use crate::metrics::{Counter, OpenContext};
    pub use crate::operator::{Operator, OperatorContext};
    pub use crate::process::{Emitter, KeyedContext, KeyedProcessFunction};
    pub use crate::report::{CheckpointStats, JobReport};
    pub use crate::runtime::StopHandle;
    pub use crate::state::{MapState, StateBackend, StateValue, ValueState};
    pub use crate::time::{Clock, TimeDomain, Timer, Timestamp, WatermarkStrategy};
}
