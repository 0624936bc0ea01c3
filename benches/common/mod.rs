//! Helpers shared by the benchmarks (`#[path]`-included; each bench uses some).
#![allow(dead_code)]

#[cfg(feature = "kafka")]
pub mod kafka;

use exactly::engine::error::Result;
use exactly::engine::testing::CollectCommittable;
use exactly::prelude::*;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The allocator the README recommends for jobs that allocate per record.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `cargo bench --list` and `cargo test --benches` must not run a benchmark.
pub fn listing() -> bool {
    std::env::args().any(|a| a == "--list" || a == "--test")
}

/// A number from the environment, or `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Cores of this machine.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// This process's user + system CPU time.
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // The kernel's USER_HZ, 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// `f` of every periodic (not final) checkpoint of a run.
pub fn periodic<X>(report: &JobReport, f: impl Fn(&CheckpointStats) -> X) -> Vec<X> {
    report
        .checkpoints
        .iter()
        .filter(|c| !c.is_final)
        .map(f)
        .collect()
}

/// How long each checkpoint of a run took from its last acknowledgement to its output
/// committed (what a sink's commits add to the latency of its output).
pub fn commit_latencies(report: &JobReport) -> Vec<Duration> {
    report
        .checkpoints
        .iter()
        .map(|c| c.end_to_end.saturating_sub(c.duration))
        .collect()
}

/// Event `i`'s key among `keys`, spread by multiply-shift: the generator divides
/// nothing per event (a `%` by a key count known only at run time is a division).
#[inline]
pub fn spread_key(i: u64, keys: u64) -> u64 {
    ((u128::from(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) * u128::from(keys)) >> 64) as u64
}

/// The median of `v` (zero when empty).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// A two-phase-commit sink that only counts committed records, so a benchmark measures
/// the engine (and can assert that every record was committed once). Its commit is
/// idempotent and its recovery commits what the restored checkpoint left pending, as the
/// protocol asks (a commit may come again after a crash); what it counted lives in
/// memory, so it suits runs in one process. `examples/custom_sink.rs` is a durable one.
pub struct CountSink<T> {
    pub committed: Arc<AtomicU64>,
    /// (checkpoint, subtask) pairs already counted.
    done: Arc<std::sync::Mutex<std::collections::BTreeSet<(u64, usize)>>>,
    _t: PhantomData<fn(T)>,
}

impl<T> Default for CountSink<T> {
    fn default() -> Self {
        CountSink {
            committed: Arc::default(),
            done: Arc::default(),
            _t: PhantomData,
        }
    }
}

impl<T> Clone for CountSink<T> {
    fn clone(&self) -> Self {
        CountSink {
            committed: self.committed.clone(),
            done: self.done.clone(),
            _t: PhantomData,
        }
    }
}

pub struct CountWriter<T> {
    records: u64,
    subtask: usize,
    _t: PhantomData<fn(T)>,
}

impl<T: Data> TwoPhaseCommitSink for CountSink<T> {
    type Item = T;
    type Committable = (CollectCommittable, u64);
    type Writer = CountWriter<T>;
    fn open_writer(&self, ctx: &SinkContext) -> Result<CountWriter<T>> {
        Ok(CountWriter {
            records: 0,
            subtask: ctx.subtask.0,
            _t: PhantomData,
        })
    }
    fn commit(&self, (c, n): &Self::Committable) -> Result<()> {
        // Once per checkpoint and subtask, however often it is asked.
        if self.done.lock().unwrap().insert((c.checkpoint, c.subtask)) {
            self.committed.fetch_add(*n, Ordering::Relaxed);
        }
        Ok(())
    }
    fn recover(
        &self,
        _: &RecoveryContext,
        pending: Vec<Self::Committable>,
    ) -> Result<Option<CheckpointId>> {
        for c in &pending {
            self.commit(c)?;
        }
        Ok(pending
            .iter()
            .map(|(c, _)| CheckpointId(c.checkpoint))
            .max())
    }
}

impl<T: Data> SinkWriter for CountWriter<T> {
    type Item = T;
    type Committable = (CollectCommittable, u64);
    fn write(&mut self, batch: &mut Vec<T>) -> Result<()> {
        self.records += batch.len() as u64;
        batch.clear();
        Ok(())
    }
    fn pre_commit(&mut self, c: CheckpointId) -> Result<Option<Self::Committable>> {
        let n = std::mem::take(&mut self.records);
        Ok((n > 0).then_some((
            CollectCommittable {
                checkpoint: c.0,
                subtask: self.subtask,
            },
            n,
        )))
    }
}
