//! The threaded runtime: one OS thread per task instance, chained operators inside a
//! task, bounded channels between tasks, and the driver that runs checkpoints and
//! recovery.
//!
//! Records move in batches; an operator is called once per batch through a trait object
//! ([`Collector`]), and loops over the batch in monomorphised code, so the per-record path
//! has no dynamic dispatch, no locking and no allocation.

pub(crate) mod driver;
pub(crate) mod exchange;
pub(crate) mod heads;
pub(crate) mod ops;

use crate::coordinator::TaskKey;
use crate::error::{Error, Result};
use crate::ids::CheckpointId;
use crate::ids::OperatorId;
use crate::manifest::{PendingCommit, TaskStateHandle};
use crate::state::{OperatorSnapshot, TaskSnapshotPayload};
use crate::storage::CheckpointStorage;
use crossbeam_channel::Sender;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use driver::{CheckpointStats, JobReport};

/// What travels on an edge between tasks.
pub(crate) enum Message<T> {
    Batch(Vec<T>),
    Barrier(CheckpointId),
    End,
}

/// Collected while a barrier passes through a task's chain.
#[derive(Default)]
pub(crate) struct TaskSnapshot {
    pub operators: Vec<(OperatorId, OperatorSnapshot)>,
    pub commits: Vec<PendingCommit>,
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
}

/// Reports from tasks to the driver.
pub(crate) enum TaskEvent {
    Ack {
        key: TaskKey,
        id: CheckpointId,
        handle: TaskStateHandle,
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
}

/// Control messages to source tasks.
pub(crate) enum SourceControl {
    Trigger { id: CheckpointId, is_final: bool },
}

/// Tuning knobs shared by every task.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeConfig {
    pub batch_size: usize,
    pub buffer_timeout: Duration,
    pub max_parallelism: u16,
    pub job: String,
}

/// Shared by all tasks of one attempt.
#[derive(Clone)]
pub(crate) struct TaskEnv {
    pub config: Arc<RuntimeConfig>,
    pub events: Sender<TaskEvent>,
    pub storage: CheckpointStorage,
    pub rt: tokio::runtime::Handle,
    pub cancel: Arc<AtomicBool>,
}

impl TaskEnv {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Finish a task's part of checkpoint `id`: committables go to the coordinator at
    /// once (in order with this task's earlier messages), the state is encoded now and
    /// uploaded asynchronously, then acknowledged.
    pub fn complete_snapshot(
        &self,
        key: &TaskKey,
        parallelism: usize,
        id: CheckpointId,
        snap: TaskSnapshot,
    ) -> Result<()> {
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
            };
            let _ = self.events.send(TaskEvent::Ack {
                key: key.clone(),
                id,
                handle,
            });
            return Ok(());
        }
        let payload = crate::codec::encode(
            &TaskSnapshotPayload {
                operators: snap.operators,
            },
            "task snapshot",
        )?;
        let storage = self.storage.clone();
        let events = self.events.clone();
        let key = key.clone();
        self.rt.spawn(async move {
            let res = storage
                .put_state(id, &key.task, key.subtask, parallelism, operators, &payload)
                .await;
            let _ = match res {
                Ok(handle) => events.send(TaskEvent::Ack { key, id, handle }),
                Err(e) => events.send(TaskEvent::Decline {
                    id,
                    reason: format!("task {} subtask {}: {e}", key.task, key.subtask),
                }),
            };
        });
        Ok(())
    }
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
