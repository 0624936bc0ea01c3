//! The extension points users implement: [`Source`] (replayable input) and
//! [`TwoPhaseCommitSink`] (staged, idempotently committed output).
//!
//! # Protocol (sinks)
//!
//! 1. `write`: records since the last barrier go into the writer's current transaction.
//! 2. `pre_commit(n)` at barrier `n`: make the transaction durable but invisible and
//!    return a serialisable committable (or `None` if nothing was written). It is recorded
//!    in the manifest of the first checkpoint `>= n` that completes.
//! 3. `commit(c)` after that manifest is written. Must be idempotent: it runs again after
//!    a crash, and a committable already made visible must count as success.
//! 4. `recover(restored, pending)` before any task starts: commit the committables of the
//!    restored checkpoint, abort everything else staged (a later checkpoint's lingering
//!    transactions), and report the highest checkpoint id found in staged artifacts so the
//!    job's next checkpoint id is above it.
//!
//! # Protocol (sources)
//!
//! A source is split into stable, named splits. An offset names the **next** record to
//! read: restoring at offset `o` re-reads nothing before `o` and skips nothing from `o` on.

use crate::error::Result;
use crate::ids::{CheckpointId, OperatorId, SubtaskIndex};
use serde::{de::DeserializeOwned, Serialize};
use std::hash::Hash;

/// What flows through streams: owned, clonable (for fan-out), sendable between threads,
/// and serializable: an unaligned checkpoint stores the records it overtook in the
/// channels (see [`JobBuilder::aligned_checkpoint_timeout`]), so every record type derives
/// `Serialize` and `Deserialize`, as in any engine that checkpoints data in flight.
///
/// [`JobBuilder::aligned_checkpoint_timeout`]: crate::dsl::JobBuilder::aligned_checkpoint_timeout
pub trait Data: Clone + Send + Serialize + DeserializeOwned + 'static {}
impl<T: Clone + Send + Serialize + DeserializeOwned + 'static> Data for T {}

/// What streams are keyed by: encoded with postcard to find its key group and state.
pub trait Key: Data + Serialize + DeserializeOwned + Eq + Hash + Sync {}
impl<T: Data + Serialize + DeserializeOwned + Eq + Hash + Sync> Key for T {}

/// The error type user functions return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a source reader produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePoll {
    /// Records were appended (at least one).
    Ready,
    /// Nothing available now; poll again later.
    Idle,
    /// The split is exhausted (no records appended).
    End,
}

/// Where a source instance runs.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// The source's operator id.
    pub operator: OperatorId,
    /// Subtask reading the split.
    pub subtask: SubtaskIndex,
}

/// A replayable input, divided into named splits.
pub trait Source: Send + Sync + 'static {
    /// Records produced.
    type Item: Data;
    /// A position in one split: names the next record to read.
    type Offset: Serialize + DeserializeOwned + Clone + Send + 'static;
    /// Reads one split.
    type Reader: SourceReader<Item = Self::Item, Offset = Self::Offset>;

    /// Stable split names. The same input must give the same names in every run.
    fn splits(&self) -> Result<Vec<String>>;

    /// Open `split`, positioned at `from` (its start when `None`).
    fn open(
        &self,
        split: &str,
        from: Option<Self::Offset>,
        ctx: &SourceContext,
    ) -> Result<Self::Reader>;

    /// Whether the source can rewind to an offset it reported. Exactly-once jobs refuse
    /// sources that cannot.
    fn replayable(&self) -> bool {
        true
    }

    /// How often a running job lists [`Source::splits`] again to find splits that
    /// appeared since it started (files added to a followed directory). `None`, the
    /// default: the splits are listed once per run, when it starts. A split found while
    /// the job runs is read from its start by the subtask a hash of its name picks; a
    /// source that discovers splits never finishes, even with none to read yet.
    fn discover_splits_every(&self) -> Option<std::time::Duration> {
        None
    }

    /// The key group whose records `split` holds, for a source partitioned by the
    /// engine's key groups (a repartition topic: one partition per key group). Such a
    /// split is read by the subtask owning that key group, so what it reads can feed a
    /// keyed operator without an exchange. `None`, the default: splits are dealt out in
    /// order.
    fn split_key_group(&self, split: &str) -> Option<crate::ids::KeyGroup> {
        let _ = split;
        None
    }

    /// Whether this source's readers know their splits' event time from the data itself
    /// ([`SourceReader::watermark`]) rather than from a
    /// [`crate::time::WatermarkStrategy`]: a repartition topic, whose writers leave
    /// their watermarks in it. The default: no.
    fn watermarks_from_readers(&self) -> bool {
        false
    }
}

/// Reads one split of a [`Source`].
pub trait SourceReader: 'static {
    /// Records produced.
    type Item;
    /// Position type.
    type Offset;

    /// Append up to `max` records to `out`.
    fn poll_batch(&mut self, out: &mut Vec<Self::Item>, max: usize) -> Result<SourcePoll>;

    /// The offset of the next record `poll_batch` would return.
    fn offset(&self) -> Self::Offset;

    /// A checkpoint that recorded this split at `offset` is complete and its output
    /// committed. For reporting progress outside the checkpoint (a Kafka consumer
    /// group's committed offset, for lag monitoring); never needed for correctness,
    /// since a restore always uses the checkpoint's offsets. Best effort, as in Flink's
    /// `CheckpointListener`: a notification can be missed (a crash; a final checkpoint
    /// whose notice does not come within 30 s, which a source task waits for before it
    /// ends), and a later one subsumes it. Called on the source's own thread, between
    /// `poll_batch` calls; the default does nothing.
    fn checkpoint_complete(&mut self, offset: &Self::Offset) {
        let _ = offset;
    }

    /// Records of this split that exist but are not read yet, if the source knows
    /// without asking anyone (a Kafka partition: its end as the consumer last saw it,
    /// minus the next offset). Summed over a subtask's splits into the
    /// `exactly_source_backlog_records` gauge every buffer timeout and before one pushed
    /// batch in 16: how far the job is behind its input. Called on the source's thread;
    /// must not block. The default knows nothing.
    fn backlog(&self) -> Option<u64> {
        None
    }

    /// The split's watermark as far as the reader has read, for a source whose readers
    /// know it ([`Source::watermarks_from_readers`]): `Some(t)` (`Timestamp::MIN`
    /// while not known yet), or `None` while the split is idle (nothing will arrive
    /// for now that could be late). Merged over a subtask's splits as a minimum, idle
    /// ones left out. Asked after every batch: keep it cheap. The default: not known.
    fn watermark(&self) -> Option<crate::time::Timestamp> {
        Some(crate::time::Timestamp::MIN)
    }
}

/// Where a sink instance runs.
#[derive(Debug, Clone)]
pub struct SinkContext {
    /// Job name.
    pub job: String,
    /// The sink's operator id.
    pub sink: OperatorId,
    /// Subtask index.
    pub subtask: SubtaskIndex,
    /// Parallelism of the sink.
    pub parallelism: usize,
    /// The job's checkpoint interval (`None`: only the final checkpoint), so a sink can
    /// check its own timeouts against it.
    pub checkpoint_interval: Option<std::time::Duration>,
    /// This job instance's lease on its checkpoint storage (its fencing generation):
    /// higher for every instance started later on the same storage. Sinks tag what they
    /// stage with it, so a recovery can tell its own and older instances' artifacts
    /// (safe to abort) from a newer instance's (never to be touched).
    pub generation: u64,
    /// The job's I/O runtime: a sink runs its network and storage calls here (spawned,
    /// or `block_on` from the operator thread, which is not one of its workers) instead
    /// of starting a runtime of its own.
    pub io: tokio::runtime::Handle,
}

/// What recovery tells a sink.
#[derive(Debug, Clone)]
pub struct RecoveryContext {
    /// Job name.
    pub job: String,
    /// The sink's operator id.
    pub sink: OperatorId,
    /// The checkpoint being restored, `None` on a fresh start.
    pub restored: Option<CheckpointId>,
    /// This instance's fencing generation (see [`SinkContext::generation`]). A recovery
    /// that finds artifacts of a higher generation must stop with [`crate::error::Error::Fenced`].
    pub generation: u64,
    /// The checkpoint location's identity ([`crate::storage::CheckpointStorage::storage_id`]):
    /// the same for every run on one location, different for another job or a location
    /// started over. A sink committing into a system other jobs share puts it in its
    /// commit records to tell its own from theirs.
    pub storage_id: String,
    /// The job's I/O runtime (see [`SinkContext::io`]). Recovery comes before every
    /// commit of a run, so a sink keeps this handle for its commits.
    pub io: tokio::runtime::Handle,
}

/// A sink that stages output at each barrier and makes it visible only after the
/// checkpoint completes. See the module docs for the protocol.
pub trait TwoPhaseCommitSink: Send + Sync + 'static {
    /// Records written.
    type Item: Data;
    /// Identifies staged output; stored in the manifest as JSON.
    type Committable: Serialize + DeserializeOwned + Send + 'static;
    /// Per-subtask writer.
    type Writer: SinkWriter<Item = Self::Item, Committable = Self::Committable>;

    /// Open the writer of one subtask.
    fn open_writer(&self, ctx: &SinkContext) -> Result<Self::Writer>;

    /// Where this sink's output goes, when it is a place no other sink of the job may
    /// also write to: a directory (absolute, normalised), a bucket and prefix. Two sinks
    /// of one job with the same location are refused before the job starts, since each
    /// would treat the other's files as its own. `None` (the default): not checked, as
    /// for a table or a topic, which several sinks may share.
    fn location(&self) -> Option<String> {
        None
    }

    /// Make staged output visible. Idempotent.
    fn commit(&self, committable: &Self::Committable) -> Result<()>;

    /// Commit `pending` (from the restored checkpoint), abort all other staged output,
    /// and return the highest checkpoint id seen among staged artifacts.
    fn recover(
        &self,
        ctx: &RecoveryContext,
        pending: Vec<Self::Committable>,
    ) -> Result<Option<CheckpointId>>;
}

/// Writes one sink subtask's output into its current transaction.
pub trait SinkWriter: 'static {
    /// Records written.
    type Item;
    /// See [`TwoPhaseCommitSink::Committable`].
    type Committable;

    /// Write a batch; drains `batch`.
    fn write(&mut self, batch: &mut Vec<Self::Item>) -> Result<()>;

    /// Stage everything written since the previous barrier.
    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<Option<Self::Committable>>;

    /// How long the last [`SinkWriter::pre_commit`] waited for staging that had started
    /// before the barrier (uploads still in flight), reported as the checkpoint's
    /// `max_sink_wait`. A writer that stages synchronously has nothing to report.
    fn last_pre_commit_wait(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Event time reached this sink: records written from now on have timestamps from
    /// `wm` on (or are late). Most sinks have no use for it; the repartition sink of a
    /// job across instances carries it to the instances that read what it writes. The
    /// default ignores it.
    fn watermark(&mut self, wm: crate::time::Timestamp) -> Result<()> {
        let _ = wm;
        Ok(())
    }

    /// Every input of this sink is idle: until the next [`SinkWriter::watermark`], its
    /// event time should not hold anyone back. The default ignores it.
    fn idle(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One record on its way to another instance: its key group (the partition of the
/// repartition topic it goes to) and its postcard encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Routed {
    /// The key group of the record's key.
    pub key_group: u16,
    /// The record, postcard-encoded.
    pub payload: Vec<u8>,
}

/// The topic a `key_by` crosses between instances through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepartitionTopic {
    /// `<job>-<keyed operator>-repartition`: stable while the job and the operator keep
    /// their names.
    pub name: String,
    /// Partitions it must have: one per key group (the job's `max_parallelism`).
    pub key_groups: u16,
}

/// How records cross from one instance to another when a job runs as several processes
/// ([`crate::dsl::JobBuilder::instance`]): a topic with one partition per key group,
/// written by a two-phase-commit sink at every checkpoint and read by a source that
/// sees only committed records and reports each partition's key group
/// ([`Source::split_key_group`]). Exactly-once holds per hop: the writing instance's
/// checkpoint commits what it wrote, the reading instance's checkpoint holds how far it
/// read. `exactly::kafka_repartition::KafkaRepartition` is the Kafka implementation.
pub trait Repartitioner: Send + Sync + 'static {
    /// Writes routed records into the partition of their key group.
    type Sink: TwoPhaseCommitSink<Item = Routed>;
    /// Reads a topic's committed payloads, one split per partition.
    type Source: Source<Item = Vec<u8>>;

    /// The writing side of `topic`; creates the topic if it does not exist.
    fn sink(&self, topic: &RepartitionTopic) -> Result<Self::Sink>;

    /// The reading side of `topic`.
    fn source(&self, topic: &RepartitionTopic) -> Result<Self::Source>;
}
