//! The commit lane: sink commits and retention, off the coordinator thread.
//!
//! The coordinator thread writes a checkpoint's manifest (the commit point) and hands its
//! pending committables to this lane, then goes on triggering and aligning the next
//! checkpoint. The lane commits in checkpoint order on one thread, so commits stay
//! ordered per sink. When commits are slower than the checkpoint interval, jobs queue up;
//! the lane takes the newest one, whose manifest names every committable still pending,
//! so one round commits everything due and a slow sink cannot build an unbounded
//! backlog. A committable already committed in an earlier round of this attempt is
//! skipped (a restore re-commits it anyway: commits are idempotent).
//!
//! Each round is reported back as a [`TaskEvent::Committed`]; the coordinator drops the
//! committed output from its pending set and, for a final or stop checkpoint, ends the
//! job. Retention runs after each round.

use super::TaskEvent;
use crate::dsl::graph::Graph;
use crate::error::{Error, Result};
use crate::ids::CheckpointId;
use crate::manifest::PendingCommit;
use crate::storage::CheckpointStorage;
use crossbeam_channel::{Receiver, Sender};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One written manifest's committables.
pub(crate) struct CommitJob {
    pub id: CheckpointId,
    pub pending: Vec<PendingCommit>,
}

pub(crate) struct Committer<'a> {
    pub graph: &'a Graph,
    pub rt: &'a tokio::runtime::Runtime,
    pub storage: &'a CheckpointStorage,
    pub lease: u64,
    pub retain: usize,
    pub cancel: Arc<AtomicBool>,
    pub events: Sender<TaskEvent>,
}

impl Committer<'_> {
    /// Run until the job side of `jobs` is dropped, or the attempt is cancelled.
    pub(crate) fn run(self, jobs: Receiver<CommitJob>) {
        let mut committed_through = CheckpointId(0);
        while let Ok(first) = jobs.recv() {
            let mut ids = vec![first.id];
            let mut job = first;
            while let Ok(newer) = jobs.try_recv() {
                ids.push(newer.id);
                job = newer;
            }
            if self.cancel.load(Ordering::Relaxed) {
                // The next attempt restores the newest manifest and re-commits it.
                break;
            }
            let result = self
                .rt
                .block_on(self.storage.check_lease(self.lease))
                .and_then(|()| self.commit(&job.pending, committed_through));
            if result.is_ok() {
                committed_through = job.id;
            }
            let _ = self.events.send(TaskEvent::Committed { ids, result });
            if let Err(e) = retain(self.rt, self.storage, self.retain, job.id) {
                tracing::warn!(error = %e, "retention cleanup failed; will retry after the next checkpoint");
            }
        }
    }

    /// Commit `pending` oldest first, skipping what an earlier round committed.
    fn commit(&self, pending: &[PendingCommit], committed_through: CheckpointId) -> Result<()> {
        let mut first = true;
        for p in pending.iter().filter(|p| p.checkpoint > committed_through) {
            if !std::mem::take(&mut first) {
                fail::fail_point!("sink::between_commits");
            }
            let node = self
                .graph
                .nodes
                .iter()
                .find(|n| n.op == p.sink)
                .ok_or_else(|| {
                    Error::config(format!(
                        "manifest names sink '{}' that is not in the job",
                        p.sink
                    ))
                })?;
            let sink = node
                .sink
                .as_ref()
                .ok_or_else(|| Error::config(format!("operator '{}' is not a sink", p.sink)))?;
            sink.commit(&p.committable)?;
        }
        Ok(())
    }
}

/// Delete completed checkpoints beyond the retention count (manifest first, then
/// files), and state directories without a manifest older than the oldest retained
/// checkpoint: abandoned checkpoints, or a cleanup a crash interrupted.
///
/// Safe while the next checkpoint is in flight: its state directory and the shared
/// files it uploads are newer than `latest`, and the shared files it references again
/// belong to the newest completed checkpoint, which is always retained.
fn retain(
    rt: &tokio::runtime::Runtime,
    storage: &CheckpointStorage,
    retain: usize,
    latest: CheckpointId,
) -> Result<()> {
    let (ids, _) = rt.block_on(storage.scan())?;
    let keep_from = ids.len().saturating_sub(retain);
    let oldest_kept = ids.get(keep_from).copied().unwrap_or(latest).min(latest);
    for &old in &ids[..keep_from] {
        rt.block_on(storage.delete_manifest(old))?;
        fail::fail_point!("checkpoint::during_retention");
        rt.block_on(storage.delete_checkpoint_files(old))?;
    }
    for dir in rt.block_on(storage.checkpoint_dirs())? {
        if dir < oldest_kept && !ids[keep_from..].contains(&dir) {
            rt.block_on(storage.delete_checkpoint_files(dir))?;
        }
    }
    sweep_shared(rt, storage, &ids[keep_from..], latest)
}

/// Delete shared files no retained checkpoint references. Reference counts are
/// recomputed from the retained manifests every time, so they survive restarts.
/// Files uploaded by checkpoints newer than `latest` may belong to one in flight
/// and are kept.
fn sweep_shared(
    rt: &tokio::runtime::Runtime,
    storage: &CheckpointStorage,
    retained: &[CheckpointId],
    latest: CheckpointId,
) -> Result<()> {
    let files = rt.block_on(storage.list_shared())?;
    if files.is_empty() {
        return Ok(());
    }
    let mut referenced = HashSet::new();
    for &id in retained {
        let m = rt.block_on(storage.read_manifest(id))?;
        referenced.extend(m.tasks.into_iter().flat_map(|t| t.shared).map(|f| f.path));
    }
    for (path, uploaded_by) in files {
        if uploaded_by <= latest && !referenced.contains(&path) {
            rt.block_on(storage.delete_shared(&path))?;
        }
    }
    Ok(())
}
