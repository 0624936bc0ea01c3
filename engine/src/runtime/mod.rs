//! The threaded runtime: one OS thread per task instance, chained operators inside a
//! task, bounded channels between tasks, and the driver that runs checkpoints and
//! recovery.
//!
//! Records move in batches; an operator is called once per batch through a trait object
//! (`Collector`), and loops over the batch in monomorphised code, so the per-record path
//! has no dynamic dispatch, no locking and no allocation.

pub(crate) mod exchange;
pub(crate) mod heads;
pub(crate) mod inflight;
pub(crate) mod ops;

use crate::coordinator::TaskKey;
use crate::error::{Error, Result};
use crate::ids::CheckpointId;
use crate::ids::OperatorId;
use crate::manifest::{PendingCommit, TaskStateHandle};
use crate::state::{StateSnapshot, TaskStateView};
use crate::storage::CheckpointStorage;
use crate::time::{Clock, Timestamp};
use crossbeam_channel::Sender;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Stops a running job with a checkpoint: the sources read no further, one more
/// checkpoint is taken and its output committed, and [`Job::run`] returns with
/// [`JobReport::stopped_at`] set. The next run resumes from that checkpoint, so nothing
/// is lost or repeated. Event time is not advanced to the end: open windows stay open
/// and fire after the restart. Cheap to clone; stopping twice is stopping once.
///
/// [`StopHandle::stop_with_savepoint`] also keeps that checkpoint as a named savepoint,
/// the way to deploy a new version of the job (see
/// [`JobBuilder::restore_from_savepoint`](crate::dsl::JobBuilder::restore_from_savepoint)).
///
/// [`JobReport::stopped_at`]: crate::report::JobReport::stopped_at
/// [`Job::run`]: crate::dsl::Job::run
#[derive(Debug, Clone, Default)]
pub struct StopHandle {
    flag: Arc<AtomicBool>,
    savepoint: Arc<std::sync::Mutex<Option<String>>>,
    cancel: Arc<AtomicBool>,
    /// Checkpoints and savepoints asked while the job runs, not yet taken up by the
    /// coordinator.
    asked: Arc<std::sync::Mutex<Vec<CheckpointRequest>>>,
}

/// A checkpoint asked while the job runs, kept as savepoint `name` if one is given; the
/// coordinator answers on `reply` once its manifest (and the savepoint record) are
/// written, or why not.
#[derive(Debug)]
pub(crate) struct CheckpointRequest {
    pub name: Option<String>,
    pub reply: Sender<Result<CheckpointId>>,
}

impl StopHandle {
    /// Ask the job to stop with a checkpoint (returns at once; `run()` returns once
    /// the checkpoint is committed). A stop asked before `run()` stops after recovery.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    /// Ask the job to stop with a checkpoint and keep that checkpoint as savepoint
    /// `name`: retention never deletes it, and a new version of the job starts from it
    /// with `restore_from_savepoint(name)`. `run()` fails if the name is taken or not
    /// a valid name (the job then stops without a checkpoint and resumes from its last
    /// one). Asked after a plain stop was taken into account, it is a plain stop.
    pub fn stop_with_savepoint(&self, name: &str) {
        *self
            .savepoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(name.to_string());
        self.stop();
    }

    /// Cancel the job without a checkpoint: tasks stop where they are and `run()`
    /// returns [`Error::JobCancelled`] without restarting. Output of completed
    /// checkpoints stays committed; what was processed after the last one is not, and
    /// the next run resumes from that checkpoint and does it again (so nothing is lost
    /// or doubled). For a deployment, prefer
    /// [`StopHandle::stop`]: it commits everything read before stopping.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether the job was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Whether a stop was asked.
    pub fn is_requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The savepoint name asked with the stop, if any.
    pub(crate) fn savepoint(&self) -> Option<String> {
        self.savepoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Ask for a checkpoint taken as soon as possible, kept as savepoint `name` if
    /// given; the answer comes on `reply`.
    pub(crate) fn request_checkpoint(
        &self,
        name: Option<&str>,
        reply: Sender<Result<CheckpointId>>,
    ) {
        self.asked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(CheckpointRequest {
                name: name.map(str::to_string),
                reply,
            });
    }

    /// The checkpoints and savepoints asked since the last call.
    pub(crate) fn take_checkpoint_requests(&self) -> Vec<CheckpointRequest> {
        std::mem::take(
            &mut *self
                .asked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The flag a signal handler sets.
    pub(crate) fn flag(&self) -> &Arc<AtomicBool> {
        &self.flag
    }
}

/// What travels on an edge between tasks.
pub(crate) enum Message<T> {
    Batch(Vec<T>),
    Barrier(CheckpointId),
    /// Event time on this channel has reached the timestamp.
    Watermark(Timestamp),
    /// The sender has no data for now and must not hold event time back.
    Idle,
    End,
}

/// Checkpoint `id` announced on a task's priority lane, by the driver as it triggers
/// the checkpoint and by each sender as it puts the barrier into one of the task's
/// input channels: in unaligned mode the task learns of the checkpoint at once, not
/// after the records queued in front of the barrier (see [`crate::aligner`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Announce {
    pub id: CheckpointId,
}

/// Where a sender announces barriers: the lanes of the tasks it sends to. Empty unless
/// checkpoints may be unaligned.
pub(crate) type Lanes = Vec<Sender<Announce>>;

/// Checkpoints that must be taken aligned whatever the mode: the final one, a stop and
/// savepoints. Their snapshots are the end of a run (or the start of another version of
/// the job), so nothing may be left in flight. The driver marks an id before it
/// triggers it; tasks look it up once per checkpoint.
#[derive(Debug, Clone, Default)]
pub(crate) struct AlignedIds(Arc<std::sync::Mutex<std::collections::BTreeSet<CheckpointId>>>);

impl AlignedIds {
    pub fn mark(&self, id: CheckpointId) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id);
    }

    pub fn contains(&self, id: CheckpointId) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&id)
    }
}

/// Emptied batches of one edge, handed back from the receiving tasks to the sending
/// ones, so that in steady state a batch costs no allocation (and, with the system
/// allocator, no free of a large block in another thread than the one that allocated
/// it). Best effort both ways: an empty pool allocates, a full one drops.
pub(crate) struct BatchPool<T> {
    tx: Sender<Vec<T>>,
    rx: crossbeam_channel::Receiver<Vec<T>>,
    batch_size: usize,
}

impl<T> Clone for BatchPool<T> {
    fn clone(&self) -> Self {
        BatchPool {
            tx: self.tx.clone(),
            rx: self.rx.clone(),
            batch_size: self.batch_size,
        }
    }
}

impl<T> BatchPool<T> {
    /// A pool keeping up to `slots` batches of `batch_size` records.
    pub fn new(slots: usize, batch_size: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(slots.max(1));
        BatchPool { tx, rx, batch_size }
    }

    /// An empty batch with room for a whole batch.
    #[inline]
    pub fn take(&self) -> Vec<T> {
        self.rx
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(self.batch_size))
    }

    /// Hand a processed batch back (its records, if any are left, are dropped here).
    /// Batches that are too small or grew far beyond a batch are not kept.
    #[inline]
    pub fn give(&self, mut batch: Vec<T>) {
        let cap = batch.capacity();
        if cap >= self.batch_size && cap <= self.batch_size.saturating_mul(4) {
            batch.clear();
            let _ = self.tx.try_send(batch);
        }
    }
}

/// Collected while a barrier passes through a task's chain.
#[derive(Default)]
pub(crate) struct TaskSnapshot {
    pub operators: Vec<(OperatorId, StateSnapshot)>,
    pub commits: Vec<PendingCommit>,
    /// The longest time a sink of the task waited at this barrier for staging started
    /// before it.
    pub sink_wait: Duration,
}

/// The input side of a chained operator (or of an exchange that leaves the task).
pub(crate) trait Collector<T> {
    /// Process a batch; leaves `batch` empty (its capacity may be reused).
    fn push(&mut self, batch: &mut Vec<T>) -> Result<()>;
    /// Snapshot (if stateful) and forward the barrier.
    fn barrier(&mut self, id: CheckpointId, snap: &mut TaskSnapshot) -> Result<()>;
    /// Send buffered output downstream (buffer timeout).
    fn flush(&mut self) -> Result<()>;
    /// End of stream: flush and forward.
    fn end(&mut self) -> Result<()>;
    /// Event time advanced (fire event-time timers, then forward).
    fn watermark(&mut self, wm: Timestamp) -> Result<()>;
    /// Every input of the task is idle: forward so downstream ignores this path.
    fn idle(&mut self) -> Result<()>;
    /// Processing time passed (fire processing-time timers); not forwarded across tasks.
    fn tick(&mut self, now: Timestamp) -> Result<()>;
}

/// Reports from tasks to the driver.
pub(crate) enum TaskEvent {
    Ack {
        key: TaskKey,
        id: CheckpointId,
        handle: TaskStateHandle,
        /// Time the task spent on the checkpoint before resuming (the synchronous part).
        sync_pause: Duration,
        /// From the first of its inputs' barriers to the last (zero for one input).
        alignment: Duration,
        /// Bytes of records in flight stored with the snapshot (unaligned only).
        inflight_bytes: u64,
        /// Whether the task snapshotted unaligned.
        unaligned: bool,
        /// Bytes of keyed state per stateful operator of the task.
        operator_bytes: Vec<(OperatorId, u64)>,
        /// The longest wait of a sink of the task for its staging at the barrier.
        sink_wait: Duration,
    },
    Decline {
        id: CheckpointId,
        reason: String,
    },
    Committables(Vec<PendingCommit>),
    SourceFinished(TaskKey),
    Exited {
        key: TaskKey,
        result: Result<()>,
    },
    /// The commit lane committed (or failed to commit) everything pending up to the
    /// newest of `ids`, manifests it took in one round.
    Committed {
        ids: Vec<CheckpointId>,
        result: Result<()>,
    },
}

/// Control messages to source tasks.
pub(crate) enum SourceControl {
    Trigger {
        id: CheckpointId,
        is_final: bool,
    },
    /// Checkpoint `id` is durable and its output committed (best effort: sent once,
    /// lost if the task is gone).
    Completed {
        id: CheckpointId,
    },
    /// Inject barrier `id`, then read nothing more until the job ends (a stop with a
    /// checkpoint; sent again if that checkpoint fails).
    Stop {
        id: CheckpointId,
    },
    /// Fail the attempt as a crash would (a test's injected failure: see
    /// `JobBuilder::inject_failure_after_checkpoint`). Handled where the source reads
    /// or waits for input; ignored once it stopped or finished.
    Fail,
}

/// Tuning knobs shared by every task.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeConfig {
    pub batch_size: usize,
    pub buffer_timeout: Duration,
    /// How tasks with several inputs align barriers.
    pub alignment: crate::aligner::Mode,
    pub max_parallelism: u16,
    /// The job name sinks see (the job's, with `@<instance>` when it runs as several).
    pub job: String,
    /// Which of the job's processes this is.
    pub instance: crate::ids::Instance,
    pub checkpoint_interval: Option<Duration>,
    /// This instance's lease (fencing generation).
    pub generation: u64,
}

/// Shared by all tasks of one attempt.
#[derive(Clone)]
pub(crate) struct TaskEnv {
    pub config: Arc<RuntimeConfig>,
    pub events: Sender<TaskEvent>,
    pub storage: CheckpointStorage,
    pub rt: tokio::runtime::Handle,
    pub cancel: Arc<AtomicBool>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The keyed state backend and what it needs.
    pub backend: crate::state::BackendEnv,
    /// Checkpoints that must stay aligned.
    pub aligned: AlignedIds,
}

impl TaskEnv {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Finish a task's part of checkpoint `id`: committables go to the coordinator at
    /// once (in order with this task's earlier messages); the state view is encoded and
    /// uploaded on the I/O runtime while the task goes on, then acknowledged.
    pub fn complete_snapshot(
        &self,
        key: &TaskKey,
        parallelism: usize,
        id: CheckpointId,
        mut snap: TaskSnapshot,
        figures: SnapshotFigures,
    ) -> Result<()> {
        let SnapshotFigures {
            sync_pause,
            alignment,
            inflight_bytes,
            unaligned,
        } = figures;
        let sink_wait = snap.sink_wait;
        if !snap.commits.is_empty() {
            let _ = self.events.send(TaskEvent::Committables(snap.commits));
        }
        let operators: Vec<OperatorId> = snap.operators.iter().map(|(o, _)| o.clone()).collect();
        if operators.is_empty() {
            let handle = TaskStateHandle {
                task: key.task.clone(),
                subtask: key.subtask,
                parallelism,
                operators,
                path: String::new(),
                size: 0,
                crc32: 0,
                shared: Vec::new(),
                uploaded: 0,
                state_types: Default::default(),
            };
            let _ = self.events.send(TaskEvent::Ack {
                key: key.clone(),
                id,
                handle,
                sync_pause,
                alignment,
                inflight_bytes,
                unaligned,
                operator_bytes: Vec::new(),
                sink_wait,
            });
            return Ok(());
        }
        fail::fail_point!("checkpoint::after_snapshot");
        let state_types: std::collections::BTreeMap<String, _> = snap
            .operators
            .iter_mut()
            .filter(|(_, s)| !s.types.is_empty())
            .map(|(o, s)| (o.0.clone(), std::mem::take(&mut s.types)))
            .collect();
        let mut view = TaskStateView {
            operators: snap.operators,
        };
        let storage = self.storage.clone();
        let events = self.events.clone();
        let key = key.clone();
        let generation = self.config.generation;
        self.rt.spawn(async move {
            let res = async {
                // RocksDB checkpoints: upload the SST files not uploaded before.
                let mut shared = Vec::new();
                let mut shared_new = 0;
                let mut db_bytes = Vec::new();
                for (op_id, op) in &mut view.operators {
                    if let Some(pending) = op.pending_db.take() {
                        let up = pending.upload(&storage, id).await?;
                        db_bytes
                            .push((op_id.clone(), up.shared.iter().map(|f| f.size).sum::<u64>()));
                        shared.extend(up.shared);
                        shared_new += up.uploaded;
                        op.db = Some(up.snapshot);
                    }
                }
                // Encoding is CPU work: keep it off the I/O workers.
                let (file, operator_bytes) = tokio::task::spawn_blocking(move || {
                    view.prepare()?;
                    let mut bytes: Vec<(OperatorId, u64)> = view
                        .operators
                        .iter()
                        .map(|(o, s)| (o.clone(), s.keyed_bytes()))
                        .collect();
                    for (o, b) in db_bytes {
                        if let Some(e) = bytes.iter_mut().find(|(x, _)| *x == o) {
                            e.1 += b;
                        }
                    }
                    Ok::<_, Error>((view.into_file()?, bytes))
                })
                .await
                .map_err(|e| Error::Codec {
                    what: "task snapshot".into(),
                    message: e.to_string(),
                })??;
                let mut handle = storage
                    .put_state_file(
                        id,
                        generation,
                        &key.task,
                        key.subtask,
                        parallelism,
                        operators,
                        file,
                    )
                    .await?;
                handle.shared = shared;
                handle.uploaded += shared_new;
                handle.state_types = state_types;
                Ok::<_, Error>((handle, operator_bytes))
            }
            .await;
            if res.is_ok() {
                fail::fail_point!("checkpoint::after_state_upload");
            }
            let _ = match res {
                Ok((handle, operator_bytes)) => events.send(TaskEvent::Ack {
                    key,
                    id,
                    handle,
                    sync_pause,
                    alignment,
                    inflight_bytes,
                    unaligned,
                    operator_bytes,
                    sink_wait,
                }),
                Err(e) => events.send(TaskEvent::Decline {
                    id,
                    reason: format!("task {} subtask {}: {e}", key.task, key.subtask),
                }),
            };
        });
        Ok(())
    }
}

/// A task's figures for one checkpoint.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SnapshotFigures {
    /// Time the task spent on the barrier before reading on.
    pub sync_pause: Duration,
    /// From the checkpoint reaching the task to its snapshot.
    pub alignment: Duration,
    /// Bytes of in-flight records stored (unaligned).
    pub inflight_bytes: u64,
    pub unaligned: bool,
}

/// Send with backpressure, giving up when the job is cancelled or the receiver is gone.
pub(crate) fn send_blocking<T>(
    tx: &Sender<Message<T>>,
    mut msg: Message<T>,
    cancel: &AtomicBool,
) -> Result<()> {
    use crossbeam_channel::{SendTimeoutError, TrySendError};
    match tx.try_send(msg) {
        Ok(()) => return Ok(()),
        Err(TrySendError::Disconnected(_)) => return Err(Error::Cancelled),
        Err(TrySendError::Full(m)) => msg = m,
    }
    loop {
        match tx.send_timeout(msg, Duration::from_millis(50)) {
            Ok(()) => return Ok(()),
            Err(SendTimeoutError::Disconnected(_)) => return Err(Error::Cancelled),
            Err(SendTimeoutError::Timeout(m)) => {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                msg = m;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BatchPool;

    #[test]
    fn batch_pool_hands_back_the_same_buffers() {
        let pool = BatchPool::<u64>::new(2, 16);
        let mut a = pool.take();
        assert!(a.capacity() >= 16);
        a.extend(0..10);
        let addr = a.as_ptr();
        pool.give(a);
        let b = pool.take();
        assert!(b.is_empty(), "records left in a batch are dropped");
        assert_eq!(b.as_ptr(), addr, "the buffer handed back is reused");
        // Too small (a batch moved on and replaced) or far too large: not kept.
        pool.give(Vec::new());
        pool.give(Vec::with_capacity(1000));
        assert_ne!(pool.take().capacity(), 1000);
        // A full pool drops what it cannot keep.
        for _ in 0..5 {
            pool.give(Vec::with_capacity(16));
        }
        assert_eq!(pool.rx.len(), 2);
    }
}
