//! The engine's error type, classified so the runtime can decide what to do.
//!
//! * [`ErrorClass::Retry`]: a transient fault of one operation (an upload that timed out).
//!   The operation is retried or the checkpoint is abandoned and a later one takes over.
//! * [`ErrorClass::Restart`]: the running attempt is broken (a task failed or panicked);
//!   the job restarts from the latest completed checkpoint under its restart policy.
//! * [`ErrorClass::Stop`]: retrying cannot help (bad configuration, bad input under the
//!   `Fail` policy, a corrupt checkpoint). `run()` returns the error at once.

use crate::ids::{CheckpointId, OperatorId, SubtaskIndex};
use std::path::PathBuf;

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the runtime should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Transient; retry the operation.
    Retry,
    /// Restart the job from the latest checkpoint.
    Restart,
    /// Stop the job; retrying cannot help.
    Stop,
}

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The job is configured in a way that cannot work.
    #[error("invalid job configuration: {message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },

    /// A source cannot rewind but the job runs in exactly-once mode.
    #[error(
        "source '{operator}' cannot rewind to a checkpointed offset, so it cannot take part in \
         an exactly-once job: after a crash its events since the last checkpoint would be \
         lost; use a replayable source (files, Kafka, a generator), or land the events in \
         one first (e.g. a Kafka topic) and read them from there"
    )]
    NotReplayable {
        /// The source's operator id.
        operator: OperatorId,
    },

    /// A record in the input could not be read.
    #[error("bad record in {file}:{line}: {message}")]
    BadRecord {
        /// Input file.
        file: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Why it was rejected.
        message: String,
    },

    /// A user function or operator failed while processing.
    #[error("operator '{operator}' subtask {subtask} failed: {source}")]
    Operator {
        /// Operator that failed.
        operator: OperatorId,
        /// Its subtask.
        subtask: SubtaskIndex,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A task thread panicked.
    #[error("task '{task}' subtask {subtask} panicked: {message}")]
    Panic {
        /// The task (its head operator).
        task: OperatorId,
        /// Its subtask.
        subtask: SubtaskIndex,
        /// The panic payload, if it was a string.
        message: String,
    },

    /// Checkpoint storage could not be read or written.
    #[error("checkpoint storage {op} '{path}' failed: {source}")]
    Storage {
        /// What was attempted.
        op: &'static str,
        /// Object path.
        path: String,
        /// The object store's error.
        #[source]
        source: object_store::Error,
    },

    /// A checkpoint file exists but does not verify.
    #[error(
        "checkpoint {checkpoint} is corrupt: file '{path}': {message}. Refusing to start \
         from scratch or from an older checkpoint, because output committed after that \
         checkpoint would be produced twice. Restore the file from a copy; or start over \
         with new checkpoint storage and new, empty output locations (new checkpoints \
         with the old output would commit records it already holds)"
    )]
    CorruptCheckpoint {
        /// The checkpoint concerned.
        checkpoint: CheckpointId,
        /// The file that failed verification.
        path: String,
        /// What did not verify.
        message: String,
    },

    /// Another writer created a manifest we were about to write.
    #[error(
        "manifest for checkpoint {checkpoint} already exists at '{path}': another instance of \
         this job is writing to the same checkpoint storage"
    )]
    ConcurrentWriter {
        /// The checkpoint concerned.
        checkpoint: CheckpointId,
        /// The manifest path.
        path: String,
    },

    /// A newer instance of the job started on the same checkpoint storage.
    #[error(
        "job instance with lease {epoch} was fenced: instance {newer} started on the same \
         checkpoint storage {url}. Run one instance per checkpoint location"
    )]
    Fenced {
        /// This instance's lease.
        epoch: u64,
        /// The newer lease found.
        newer: u64,
        /// The storage.
        url: String,
    },

    /// State could not be encoded or decoded.
    #[error("state codec error in {what}: {message}")]
    Codec {
        /// What was being encoded or decoded.
        what: String,
        /// The codec's message.
        message: String,
    },

    /// A sink failed to stage, commit or abort.
    #[error("sink '{sink}' failed to {step}{}: {source}", for_checkpoint(.checkpoint))]
    Sink {
        /// The sink's operator id.
        sink: OperatorId,
        /// `pre-commit`, `commit`, `abort` or `recover`.
        step: &'static str,
        /// The checkpoint concerned, when there is one.
        checkpoint: Option<CheckpointId>,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A committable of a completed checkpoint can no longer be committed: data loss.
    #[error(
        "sink '{sink}' cannot commit checkpoint {checkpoint}: {message}. The staged output \
         of a completed checkpoint is gone; this is data loss and needs an operator"
    )]
    CommitLost {
        /// The sink's operator id.
        sink: OperatorId,
        /// The checkpoint whose output is lost.
        checkpoint: CheckpointId,
        /// What was found.
        message: String,
    },

    /// Checkpoints kept failing beyond the tolerated number, or the final one failed.
    #[error("checkpoints are failing: {reason}")]
    CheckpointsFailing {
        /// What failed, and how often in a row.
        reason: String,
    },

    /// The restart policy gave up.
    #[error("job '{job}' failed after {attempts} restart(s); last failure: {source}")]
    RestartsExhausted {
        /// The job.
        job: String,
        /// Restarts attempted.
        attempts: u32,
        /// The failure that ended it.
        #[source]
        source: Box<Error>,
    },

    /// Local I/O outside checkpoint storage (sources, sinks).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, including the path.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The keyed state backend failed (RocksDB I/O, a full disk).
    #[error("state backend: {context}: {message}")]
    State {
        /// What was being done, including the path.
        context: String,
        /// The backend's message.
        message: String,
    },

    /// The job was cancelled because another task failed.
    #[error("cancelled")]
    Cancelled,

    /// The job was cancelled on request (`cancel()` on its handle).
    #[error("job '{job}' was cancelled: output after its last completed checkpoint is not committed; the next run resumes from that checkpoint")]
    JobCancelled {
        /// The job's name.
        job: String,
    },
}

impl Error {
    /// How the runtime should react to this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Config { .. }
            | Error::NotReplayable { .. }
            | Error::BadRecord { .. }
            | Error::CorruptCheckpoint { .. }
            | Error::ConcurrentWriter { .. }
            | Error::Fenced { .. }
            | Error::CommitLost { .. }
            | Error::JobCancelled { .. }
            | Error::RestartsExhausted { .. } => ErrorClass::Stop,
            Error::Storage { .. } => ErrorClass::Retry,
            Error::Operator { .. }
            | Error::Panic { .. }
            | Error::Codec { .. }
            | Error::Sink { .. }
            | Error::CheckpointsFailing { .. }
            | Error::Io { .. }
            | Error::State { .. }
            | Error::Cancelled => ErrorClass::Restart,
        }
    }

    /// Shorthand for a configuration error.
    pub fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
        }
    }

    /// A sink found output committed by checkpoint `committed`, above the checkpoint
    /// being restored (or with none to restore): the checkpoint storage lost manifests
    /// that the output already committed. `holds` says where, e.g. `/out holds
    /// part-x.jsonl`. A configuration error: going on would commit those records again.
    pub fn output_ahead_of_checkpoints(
        sink: &str,
        holds: &str,
        committed: u64,
        restored: Option<CheckpointId>,
    ) -> Self {
        let from = match restored {
            Some(c) => format!("restores checkpoint {c}"),
            None => "finds no checkpoint and would start from the beginning".to_string(),
        };
        Error::config(format!(
            "sink '{sink}': {holds}, committed by checkpoint {committed}, but the job {from}: \
             the checkpoint storage lost manifests that the output already committed \
             (deleted, moved aside or replaced). Going on would commit those records \
             again. Put the checkpoint storage back as it was, or start over with both a \
             new checkpoint location and a new, empty output location"
        ))
    }

    /// What a user function's error becomes: [`Error::Operator`] naming the operator
    /// instance, except an engine error the function passed on (with `?`) whose class is
    /// [`ErrorClass::Stop`] (a state declared with another type than the checkpoint's),
    /// which stays as it is: restarting cannot fix it.
    pub fn from_user(
        operator: &OperatorId,
        subtask: SubtaskIndex,
        source: Box<dyn std::error::Error + Send + Sync>,
    ) -> Self {
        let source = match source.downcast::<Error>() {
            Ok(e) if e.class() == ErrorClass::Stop => return *e,
            Ok(e) => e,
            Err(other) => other,
        };
        Error::Operator {
            operator: operator.clone(),
            subtask,
            source,
        }
    }

    /// Shorthand for an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// " for checkpoint N", or nothing when no checkpoint is concerned.
fn for_checkpoint(checkpoint: &Option<CheckpointId>) -> String {
    checkpoint
        .map(|c| format!(" for checkpoint {c}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_error_names_its_checkpoint_only_when_there_is_one() {
        let sink = |checkpoint| Error::Sink {
            sink: OperatorId("out".into()),
            step: "connect",
            checkpoint,
            source: "refused".into(),
        };
        assert_eq!(
            sink(None).to_string(),
            "sink 'out' failed to connect: refused"
        );
        assert_eq!(
            sink(Some(CheckpointId(7))).to_string(),
            "sink 'out' failed to connect for checkpoint 7: refused"
        );
    }
}
