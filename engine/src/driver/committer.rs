//! The commit lane: sink commits and retention, off the coordinator thread.
//!
//! The coordinator thread writes a checkpoint's manifest (the commit point) and hands its
//! pending committables to this lane, then goes on triggering and aligning the next
//! checkpoint. The lane commits each sink's committables in checkpoint order, different
//! sinks concurrently, so commits stay ordered per sink. When commits are slower than
//! the checkpoint interval, jobs queue up; the lane takes the newest one, whose
//! manifest names every committable still pending, so one round commits everything due
//! and a slow sink cannot build an unbounded backlog. A committable already committed in
//! an earlier round of this attempt is skipped (a restore re-commits it anyway: commits
//! are idempotent).
//!
//! Each round is reported back as a [`TaskEvent::Committed`]; the coordinator drops the
//! committed output from its pending set and, for a final or stop checkpoint, ends the
//! job. Retention runs after each round: [`crate::retention`] decides, this lane deletes.

use crate::error::{Error, Result};
use crate::ids::CheckpointId;
use crate::manifest::PendingCommit;
use crate::plan::Graph;
use crate::retention;
use crate::runtime::TaskEvent;
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
            let span = tracing::info_span!("commit", checkpoint = %job.id, committables = job.pending.len());
            let result = span.in_scope(|| {
                self.rt
                    .block_on(self.storage.check_lease(self.lease))
                    .and_then(|()| self.commit(&job.pending, committed_through))
            });
            if result.is_ok() {
                committed_through = job.id;
            }
            let _ = self.events.send(TaskEvent::Committed { ids, result });
            let span = tracing::info_span!("retention", after = %job.id);
            if let Err(e) = span.in_scope(|| retain(self.rt, self.storage, self.retain, job.id)) {
                tracing::warn!(error = %e, "retention cleanup failed; will retry after the next checkpoint");
            }
        }
    }

    /// Commit `pending`, skipping what an earlier round committed: each sink's oldest
    /// first, different sinks at the same time (a job with many sinks, such as one
    /// running as several instances with a repartition topic per keyed operator, would
    /// otherwise wait for each sink's round trips in turn).
    fn commit(&self, pending: &[PendingCommit], committed_through: CheckpointId) -> Result<()> {
        let mut by_sink: Vec<(&crate::ids::OperatorId, Vec<&PendingCommit>)> = Vec::new();
        for p in pending.iter().filter(|p| p.checkpoint > committed_through) {
            match by_sink.iter_mut().find(|(sink, _)| **sink == p.sink) {
                Some((_, list)) => list.push(p),
                None => by_sink.push((&p.sink, vec![p])),
            }
        }
        // Every sink's commits run to their end; the first failure is reported.
        super::all_at_once(&by_sink, "a sink's commit", |(_, list)| {
            self.commit_in_order(list)
        })
        .into_iter()
        .collect()
    }

    /// Commit one sink's `pending` in order.
    fn commit_in_order(&self, pending: &[&PendingCommit]) -> Result<()> {
        let mut first = true;
        for p in pending {
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

/// Apply retention (see [`crate::retention`]) after checkpoint `latest` completed:
/// list, decide, delete in the decided order.
fn retain(
    rt: &tokio::runtime::Runtime,
    storage: &CheckpointStorage,
    retain: usize,
    latest: CheckpointId,
) -> Result<()> {
    let (ids, _) = rt.block_on(storage.scan())?;
    let dirs = rt.block_on(storage.checkpoint_dirs())?;
    let pinned: Vec<CheckpointId> = rt
        .block_on(storage.list_savepoints())?
        .into_iter()
        .map(|sp| sp.checkpoint)
        .collect();
    let plan = retention::plan(&ids, &dirs, retain, latest, &pinned);
    for action in &plan.actions {
        execute(rt, storage, action)?;
    }
    let files = rt.block_on(storage.list_shared())?;
    if files.is_empty() {
        return Ok(());
    }
    let mut referenced = HashSet::new();
    for &id in &plan.retained {
        let m = rt.block_on(storage.read_manifest(id))?;
        referenced.extend(m.tasks.into_iter().flat_map(|t| t.shared).map(|f| f.path));
    }
    for action in retention::sweep_shared(&files, &referenced, latest) {
        execute(rt, storage, &action)?;
    }
    Ok(())
}

fn execute(
    rt: &tokio::runtime::Runtime,
    storage: &CheckpointStorage,
    action: &retention::Delete,
) -> Result<()> {
    match action {
        retention::Delete::Manifest(id) => {
            rt.block_on(storage.delete_manifest(*id))?;
            fail::fail_point!("checkpoint::during_retention");
            Ok(())
        }
        retention::Delete::CheckpointFiles(id) => rt.block_on(storage.delete_checkpoint_files(*id)),
        retention::Delete::Shared(path) => rt.block_on(storage.delete_shared(path)),
    }
}
