//! A slow sink commit does not hold back the next checkpoint: while one commit is
//! blocked, later checkpoints are still triggered and completed, and once it returns
//! every checkpoint's output is committed, in checkpoint order, exactly once.

mod common;

use common::gated::{gated, open, wait_at};
use exactly::engine::error::Result;
use exactly::prelude::*;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One checkpoint's output: (checkpoint, records).
type Batch = (u64, Vec<(u32, i64)>);

/// What the sink has committed, and a gate its first commit waits at.
#[derive(Default)]
struct Shared {
    /// (checkpoint, records) per commit, in the order commits ran.
    committed: Mutex<Vec<Batch>>,
    /// The checkpoint whose commit is waiting at the gate, and whether the gate is open.
    gate: Mutex<(Option<u64>, bool)>,
    changed: Condvar,
}

#[derive(Clone)]
struct SlowSink(Arc<Shared>);

struct SlowWriter(Vec<(u32, i64)>);

impl SinkWriter for SlowWriter {
    type Item = (u32, i64);
    type Committable = Batch;
    fn write(&mut self, batch: &mut Vec<(u32, i64)>) -> Result<()> {
        self.0.append(batch);
        Ok(())
    }
    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<Option<Self::Committable>> {
        Ok((!self.0.is_empty()).then(|| (checkpoint.0, std::mem::take(&mut self.0))))
    }
}

impl TwoPhaseCommitSink for SlowSink {
    type Item = (u32, i64);
    type Committable = Batch;
    type Writer = SlowWriter;
    fn open_writer(&self, _ctx: &SinkContext) -> Result<SlowWriter> {
        Ok(SlowWriter(Vec::new()))
    }
    fn commit(&self, (id, records): &Self::Committable) -> Result<()> {
        let mut g = self.0.gate.lock().unwrap();
        if g.0.is_none() {
            g.0 = Some(*id);
            self.0.changed.notify_all();
        }
        let _open = self.0.changed.wait_while(g, |g| !g.1).unwrap();
        // Idempotent: a checkpoint's output is committed once, however often asked.
        let mut done = self.0.committed.lock().unwrap();
        if !done.iter().any(|(c, _)| c == id) {
            done.push((*id, records.clone()));
        }
        Ok(())
    }
    fn recover(
        &self,
        _ctx: &RecoveryContext,
        pending: Vec<Self::Committable>,
    ) -> Result<Option<CheckpointId>> {
        let max = pending.iter().map(|p| p.0).max();
        for p in &pending {
            self.commit(p)?;
        }
        Ok(max.map(CheckpointId))
    }
}

fn manifests(dir: &Path) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(dir.join("manifests"))
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".json")?.parse().ok()
        })
        .collect();
    ids.sort();
    ids
}

#[test]
fn checkpoints_complete_while_a_commit_is_blocked_and_commits_stay_ordered() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = dir.path().join("checkpoints");
    let payments: Vec<(u32, i64)> = (0..4000).map(|i| (i % 13, i64::from(i))).collect();
    let (source, reached) = gated(&payments);
    let shared = Arc::new(Shared::default());
    let (sink, at) = (SlowSink(shared.clone()), checkpoints.clone());
    let runner = std::thread::spawn(move || {
        let job = Job::builder("slow-commit")
            .parallelism(1)
            .checkpoint_every(Duration::from_millis(10))
            .retain_checkpoints(1000)
            .checkpoint_storage(at.to_str().unwrap())
            .build()
            .unwrap();
        job.source("payments", source).sink("slow", sink);
        job.run()
    });

    // The first half is read; a checkpoint with output reaches the sink's commit, which
    // blocks.
    wait_at(&reached);
    let blocked = {
        let g = shared
            .changed
            .wait_while(shared.gate.lock().unwrap(), |g| g.0.is_none())
            .unwrap();
        g.0.unwrap()
    };
    // While it is blocked, two more checkpoints complete: their manifests are written.
    let deadline = Instant::now() + Duration::from_secs(120);
    while manifests(&checkpoints)
        .iter()
        .filter(|&&m| m > blocked)
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "no checkpoint after {blocked} completed while its commit was blocked; manifests: {:?}",
            manifests(&checkpoints)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(shared.committed.lock().unwrap().is_empty());

    shared.gate.lock().unwrap().1 = true;
    shared.changed.notify_all();
    open(&reached);
    let report = runner.join().unwrap().unwrap();

    let committed = shared.committed.lock().unwrap().clone();
    let ids: Vec<u64> = committed.iter().map(|c| c.0).collect();
    assert_eq!(ids[0], blocked, "{ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of order: {ids:?}");
    let all: Vec<(u32, i64)> = committed.into_iter().flat_map(|c| c.1).collect();
    assert_eq!(all, payments, "lost or doubled output");
    let reported: Vec<u64> = report.checkpoints.iter().map(|c| c.id.0).collect();
    assert!(reported.windows(2).all(|w| w[0] < w[1]), "{reported:?}");
    assert!(report.checkpoints.last().unwrap().is_final);
}
