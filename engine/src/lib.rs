//! exactly's engine: the typed DSL, the threaded runtime, barrier checkpoints, keyed
//! state, checkpoint storage and recovery.
//!
//! Start with [`dsl::Job`]; implement [`api::Source`] or [`api::TwoPhaseCommitSink`] to
//! connect other systems. The protocol modules ([`coordinator`], [`aligner`]) are pure
//! state machines; the runtime drives them.

pub mod aligner;
pub mod api;
pub mod codec;
pub mod coordinator;
pub mod driver;
pub mod dsl;
pub mod error;
pub mod failpoints;
pub mod ids;
pub mod manifest;
pub mod metrics;
pub(crate) mod plan;
pub mod process;
pub mod report;
pub(crate) mod retention;
pub mod runtime;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod testing;
pub mod time;

/// Everything a pipeline author needs.
pub mod prelude {
    pub use crate::api::{
        BoxError, Data, Key, RecoveryContext, SinkContext, SinkWriter, Source, SourceContext,
        SourcePoll, SourceReader, TwoPhaseCommitSink,
    };
    pub use crate::dsl::{Job, JobBuilder, JobHandle, KeyedStream, RestartPolicy, Stream};
    pub use crate::error::{Error, ErrorClass};
    pub use crate::ids::CheckpointId;
    pub use crate::metrics::{Counter, OpenContext};
    pub use crate::process::{Emitter, KeyedContext, KeyedProcessFunction};
    pub use crate::runtime::{CheckpointStats, JobReport, StopHandle};
    pub use crate::state::{MapState, StateBackend, StateValue, ValueState};
    pub use crate::testing::{CollectSink, VecSource};
    pub use crate::time::{Clock, ManualClock, TimeDomain, Timer, Timestamp, WatermarkStrategy};
}
