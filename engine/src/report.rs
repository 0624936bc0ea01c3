//! What a job reports: figures of each completed checkpoint and of the whole run.

use crate::ids::CheckpointId;
use std::time::Duration;

/// Figures of one completed checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointStats {
    /// Checkpoint id.
    pub id: CheckpointId,
    /// From trigger to the last acknowledgement.
    pub duration: Duration,
    /// From trigger to manifest written and output committed.
    pub end_to_end: Duration,
    /// Size of the checkpoint's state: every file it references, including shared
    /// files uploaded by earlier checkpoints.
    pub state_bytes: u64,
    /// Bytes written for this checkpoint (with incremental RocksDB checkpoints, only
    /// the SST files not uploaded before).
    pub uploaded_bytes: u64,
    /// Longest time any task spent on this checkpoint before resuming its input.
    pub max_sync_pause: Duration,
    /// Longest barrier alignment of any task with several inputs: from the first input's
    /// barrier (or, with unaligned checkpoints, the checkpoint's announcement) to the
    /// snapshot. In exactly-once mode the inputs whose barrier arrived are not read
    /// meanwhile; in at-least-once mode they are; an unaligned snapshot ends it early.
    pub max_alignment: Duration,
    /// Longest time a sink waited at the barrier for staging it had started before
    /// (e.g. the object-store sink's part uploads still in flight); zero for sinks that
    /// stage at the barrier itself.
    pub max_sink_wait: Duration,
    /// Bytes of records in flight stored by unaligned snapshots (see
    /// [`JobBuilder::aligned_checkpoint_timeout`](crate::dsl::JobBuilder::aligned_checkpoint_timeout)).
    pub inflight_bytes: u64,
    /// The task instances (task, subtask) that snapshotted unaligned, in order; empty
    /// when the checkpoint was aligned everywhere.
    pub unaligned_tasks: Vec<(String, usize)>,
    /// Whether it was the final checkpoint.
    pub is_final: bool,
    /// Bytes of keyed state per stateful operator (summed over subtasks): the encoded
    /// state in memory, the referenced SST files with RocksDB. The memory budget to
    /// watch.
    pub state_bytes_by_operator: std::collections::BTreeMap<String, u64>,
    /// Every counter's value when the checkpoint completed (e.g. `<source>.records`).
    pub metrics: std::collections::BTreeMap<String, u64>,
}

/// Checkpoints a [`JobReport`] keeps at least (the most recent ones).
pub const REPORTED_CHECKPOINTS: usize = 1000;

/// Append `item`, first dropping the oldest `keep` items once `2 * keep` are held: at
/// least the `keep` most recent stay, in amortised O(1) per item.
pub(crate) fn push_recent<T>(v: &mut Vec<T>, item: T, keep: usize) {
    if v.len() >= 2 * keep {
        v.drain(..keep);
    }
    v.push(item);
}

/// What a finished `run()` reports.
#[derive(Debug, Clone, Default)]
pub struct JobReport {
    /// The checkpoint the first attempt restored, if any.
    pub restored_from: Option<CheckpointId>,
    /// Time the first attempt spent restoring (reading state, settling sinks).
    pub recovery_time: Duration,
    /// In-process restarts after task failures.
    pub restarts: u32,
    /// Checkpoints abandoned (timed out, or a task or the manifest write failed).
    pub aborted_checkpoints: u32,
    /// The checkpoints completed, in order: all of them, or for a long run the most
    /// recent (between [`REPORTED_CHECKPOINTS`] and twice as many), so that a job
    /// running for months does not grow its report. `completed_checkpoints` counts all.
    pub checkpoints: Vec<CheckpointStats>,
    /// Checkpoints completed over the whole run.
    pub completed_checkpoints: u64,
    /// Wall-clock time of `run()`.
    pub elapsed: Duration,
    /// Every counter operators registered, as `operator.name`, summed over subtasks
    /// and including work repeated after restarts.
    pub metrics: std::collections::BTreeMap<String, u64>,
    /// The checkpoint the job stopped with, when it was stopped (a
    /// [`StopHandle`](crate::runtime::StopHandle), or SIGTERM with
    /// [`JobBuilder::stop_on_sigterm`](crate::dsl::JobBuilder::stop_on_sigterm)) rather
    /// than run to the end of its input. The next run resumes from it.
    pub stopped_at: Option<CheckpointId>,
    /// The savepoint the stop checkpoint was kept as
    /// ([`StopHandle::stop_with_savepoint`](crate::runtime::StopHandle::stop_with_savepoint)).
    pub savepoint: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::push_recent;

    #[test]
    fn a_report_keeps_the_most_recent_checkpoints_and_stays_bounded() {
        let mut v = Vec::new();
        for i in 0..10_000u32 {
            push_recent(&mut v, i, 100);
            assert!(v.len() <= 200);
            assert!(v.len() >= 100.min(i as usize + 1));
            assert_eq!(*v.last().unwrap(), i);
            // In order, without gaps.
            assert!(v.windows(2).all(|w| w[1] == w[0] + 1));
        }
    }
}
