//! In-memory source and sink for tests and examples.
//!
//! [`VecSource`] replays a vector (offset = position in its split). [`CollectSink`] is a
//! real two-phase-commit sink whose "external system" is shared memory: staged batches
//! become visible only on commit, commit is idempotent, and recovery aborts what was
//! staged under checkpoints that never completed. It survives in-process restarts, which
//! makes it the reference sink for exactly-once tests.

pub use crate::time::ManualClock;

use crate::api::{
    Data, RecoveryContext, SinkContext, SinkWriter, Source, SourceContext, SourcePoll,
    SourceReader, TwoPhaseCommitSink,
};
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, OperatorId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// The bucket of the S3-compatible server a test suite runs against (`EXACTLY_S3_BUCKET`,
/// default `exactly`; `scripts/test.sh` starts SeaweedFS and sets `AWS_*`). Panics when
/// `AWS_ENDPOINT_URL` is unset, so an S3 test fails instead of silently skipping.
pub fn s3_test_bucket() -> String {
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok(),
        "AWS_ENDPOINT_URL is not set: run the suite with ./scripts/test.sh, which installs and starts SeaweedFS"
    );
    std::env::var("EXACTLY_S3_BUCKET").unwrap_or_else(|_| "exactly".into())
}

/// A runtime standing in for a job's I/O runtime where a test drives a sink or a
/// storage call directly (one per test process, shared).
pub fn io_runtime() -> tokio::runtime::Handle {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a test runtime")
    })
    .handle()
    .clone()
}

/// A job for outage tests: checkpoints every 100 ms into `storage`, sources paced
/// (100 records per batch, 10 ms apart) so the run lasts while the test breaks something,
/// and a receiver that hears when checkpoint 3 completes (the moment to break it).
pub fn job_for_outage(
    name: &str,
    storage: &str,
) -> (crate::dsl::JobBuilder, std::sync::mpsc::Receiver<()>) {
    let (third, at_third) = std::sync::mpsc::channel();
    let builder = crate::dsl::Job::builder(name)
        .checkpoint_storage(storage)
        .checkpoint_every(std::time::Duration::from_millis(100))
        .batch_size(100)
        .source_pacing(std::time::Duration::from_millis(10))
        .on_checkpoint(move |cp| {
            if cp.id.0 == 3 {
                let _ = third.send(());
            }
        });
    (builder, at_third)
}

/// A replayable source over a vector, divided into `splits` round-robin splits.
#[derive(Clone)]
pub struct VecSource<T> {
    data: Arc<Vec<T>>,
    splits: usize,
    pace: Option<CheckpointPace>,
}

/// Makes checkpoints happen at known points of a [`VecSource`]'s input, without
/// sleeping: after every `every` records of a split, the reader advances the job's
/// [`ManualClock`] by the checkpoint interval and reads on only once a checkpoint has
/// completed since. Build the job with `.clock(clock)`, `.checkpoint_every(interval)`
/// and `.on_checkpoint(move |_| pace.checkpoint_completed())`.
#[derive(Clone)]
pub struct CheckpointPace(Arc<PaceInner>);

struct PaceInner {
    every: u64,
    clock: ManualClock,
    interval: std::time::Duration,
    completed: std::sync::atomic::AtomicU64,
}

impl CheckpointPace {
    /// A checkpoint every `every` records of each split, on `clock`, whose job
    /// checkpoints every `interval`.
    pub fn new(every: u64, clock: ManualClock, interval: std::time::Duration) -> Self {
        CheckpointPace(Arc::new(PaceInner {
            every: every.max(1),
            clock,
            interval,
            completed: Default::default(),
        }))
    }

    /// A checkpoint completed (call it from `JobBuilder::on_checkpoint`).
    pub fn checkpoint_completed(&self) {
        self.0
            .completed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn completed(&self) -> u64 {
        self.0.completed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl<T: Data + Sync> VecSource<T> {
    /// One split holding every record in order.
    pub fn new(data: Vec<T>) -> Self {
        VecSource {
            data: Arc::new(data),
            splits: 1,
            pace: None,
        }
    }

    /// Spread the records round-robin over `n` splits (read in parallel).
    pub fn with_splits(mut self, n: usize) -> Self {
        self.splits = n.max(1);
        self
    }

    /// Wait for a checkpoint every so many records (see [`CheckpointPace`]).
    pub fn paced(mut self, pace: CheckpointPace) -> Self {
        self.pace = Some(pace);
        self
    }
}

/// Reads one split of a [`VecSource`].
pub struct VecReader<T> {
    data: Arc<Vec<T>>,
    split: usize,
    splits: usize,
    /// Records of this split already read; names the next one.
    next: u64,
    pace: Option<ReaderPace>,
}

struct ReaderPace {
    pace: CheckpointPace,
    /// Records read since the last pause.
    since: u64,
    /// Paused until this many checkpoints have completed.
    until: Option<u64>,
}

impl<T: Data + Sync> Source for VecSource<T> {
    type Item = T;
    type Offset = u64;
    type Reader = VecReader<T>;

    fn splits(&self) -> Result<Vec<String>> {
        Ok((0..self.splits).map(|i| i.to_string()).collect())
    }

    fn open(&self, split: &str, from: Option<u64>, ctx: &SourceContext) -> Result<VecReader<T>> {
        let split = split.parse().map_err(|_| {
            Error::config(format!(
                "source '{}': unknown split '{split}'",
                ctx.operator
            ))
        })?;
        Ok(VecReader {
            data: self.data.clone(),
            split,
            splits: self.splits,
            next: from.unwrap_or(0),
            pace: self.pace.clone().map(|pace| ReaderPace {
                pace,
                since: 0,
                until: None,
            }),
        })
    }
}

impl<T: Data> SourceReader for VecReader<T> {
    type Item = T;
    type Offset = u64;

    fn poll_batch(&mut self, out: &mut Vec<T>, mut max: usize) -> Result<SourcePoll> {
        if let Some(p) = &mut self.pace {
            if let Some(until) = p.until {
                if p.pace.completed() < until {
                    return Ok(SourcePoll::Idle);
                }
                p.until = None;
                p.since = 0;
            }
            max = max.min((p.pace.0.every - p.since) as usize);
        }
        let before = out.len();
        while out.len() - before < max {
            let pos = self.next as usize * self.splits + self.split;
            match self.data.get(pos) {
                Some(x) => {
                    out.push(x.clone());
                    self.next += 1;
                }
                None => break,
            }
        }
        let read = (out.len() - before) as u64;
        if let Some(p) = &mut self.pace {
            p.since += read;
            if p.since >= p.pace.0.every {
                p.until = Some(p.pace.completed() + 1);
                p.pace.0.clock.advance(p.pace.0.interval);
            }
        }
        Ok(if read > 0 {
            SourcePoll::Ready
        } else {
            SourcePoll::End
        })
    }

    fn offset(&self) -> u64 {
        self.next
    }
}

#[derive(Default)]
struct Shared<T> {
    staged: BTreeMap<(u64, usize), Vec<T>>,
    committed: Vec<T>,
    committed_keys: BTreeSet<(u64, usize)>,
    commit_calls: u64,
}

/// An in-memory two-phase-commit sink; clones share the same contents.
pub struct CollectSink<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

impl<T> Clone for CollectSink<T> {
    fn clone(&self) -> Self {
        CollectSink {
            shared: self.shared.clone(),
        }
    }
}

impl<T: Data> Default for CollectSink<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Data> CollectSink<T> {
    /// An empty sink.
    pub fn new() -> Self {
        CollectSink {
            shared: Arc::new(Mutex::new(Shared {
                staged: BTreeMap::new(),
                committed: Vec::new(),
                committed_keys: BTreeSet::new(),
                commit_calls: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared<T>> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything committed so far, in commit order.
    pub fn committed(&self) -> Vec<T> {
        self.lock().committed.clone()
    }

    /// Number of staged batches not committed.
    pub fn staged_batches(&self) -> usize {
        self.lock().staged.len()
    }

    /// Number of `commit` calls, including idempotent repeats.
    pub fn commit_calls(&self) -> u64 {
        self.lock().commit_calls
    }
}

impl<T: Data + Ord> CollectSink<T> {
    /// Committed records, sorted (order across subtasks is not defined).
    pub fn sorted(&self) -> Vec<T> {
        let mut v = self.committed();
        v.sort();
        v
    }
}

/// Identifies one staged batch of a [`CollectSink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectCommittable {
    /// Checkpoint whose barrier staged it.
    pub checkpoint: u64,
    /// Sink subtask.
    pub subtask: usize,
}

/// Writer of one [`CollectSink`] subtask.
pub struct CollectWriter<T> {
    shared: Arc<Mutex<Shared<T>>>,
    subtask: usize,
    buf: Vec<T>,
}

impl<T: Data> TwoPhaseCommitSink for CollectSink<T> {
    type Item = T;
    type Committable = CollectCommittable;
    type Writer = CollectWriter<T>;

    fn open_writer(&self, ctx: &SinkContext) -> Result<CollectWriter<T>> {
        Ok(CollectWriter {
            shared: self.shared.clone(),
            subtask: ctx.subtask.0,
            buf: Vec::new(),
        })
    }

    fn commit(&self, c: &CollectCommittable) -> Result<()> {
        let mut s = self.lock();
        s.commit_calls += 1;
        let key = (c.checkpoint, c.subtask);
        if let Some(batch) = s.staged.remove(&key) {
            s.committed.extend(batch);
            s.committed_keys.insert(key);
            Ok(())
        } else if s.committed_keys.contains(&key) {
            Ok(())
        } else {
            Err(Error::CommitLost {
                sink: OperatorId("collect".into()),
                checkpoint: CheckpointId(c.checkpoint),
                message: format!("no staged batch for subtask {}", c.subtask),
            })
        }
    }

    fn recover(
        &self,
        _ctx: &RecoveryContext,
        pending: Vec<CollectCommittable>,
    ) -> Result<Option<CheckpointId>> {
        for c in &pending {
            self.commit(c)?;
        }
        let mut s = self.lock();
        let max = s.staged.keys().map(|k| k.0).max().map(CheckpointId);
        s.staged.clear();
        Ok(max)
    }
}

impl<T: Data> SinkWriter for CollectWriter<T> {
    type Item = T;
    type Committable = CollectCommittable;

    fn write(&mut self, batch: &mut Vec<T>) -> Result<()> {
        self.buf.append(batch);
        Ok(())
    }

    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<Option<CollectCommittable>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let batch = std::mem::take(&mut self.buf);
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.staged.insert((checkpoint.0, self.subtask), batch);
        Ok(Some(CollectCommittable {
            checkpoint: checkpoint.0,
            subtask: self.subtask,
        }))
    }
}

/// Drives a [`KeyedProcessFunction`](crate::process::KeyedProcessFunction) directly, one record, watermark or clock step at a
/// time, with the same state, timers and firing logic as the runtime. Use it to test a
/// function's semantics (window boundaries, lateness, TTL edges) deterministically.
///
/// ```
/// use exactly_engine::prelude::*;
/// use exactly_engine::testing::KeyedHarness;
///
/// const N: ValueState<u32> = ValueState::new("n");
/// #[derive(Clone)]
/// struct CountThenFlush;
/// impl KeyedProcessFunction<String, i64> for CountThenFlush {
///     type Out = (String, u32);
///     fn process(&mut self, ts: i64, ctx: &mut KeyedContext<'_, String, (String, u32)>) -> Result<(), BoxError> {
///         let n = ctx.value(N)?.unwrap_or(0) + 1;
///         ctx.set_value(N, &n)?;
///         ctx.register_event_time_timer(ts + 10);
///         Ok(())
///     }
///     fn on_timer(&mut self, _: Timer, ctx: &mut KeyedContext<'_, String, (String, u32)>) -> Result<(), BoxError> {
///         if let Some(n) = ctx.value(N)? {
///             ctx.emit((ctx.key().clone(), n));
///             ctx.clear_value(N);
///         }
///         Ok(())
///     }
/// }
/// let mut h = KeyedHarness::new(CountThenFlush).unwrap();
/// h.process("a".into(), 0).unwrap();
/// h.process("a".into(), 5).unwrap();
/// h.watermark(9).unwrap();
/// assert!(h.take_output().is_empty());
/// h.watermark(10).unwrap();
/// assert_eq!(h.take_output(), vec![("a".to_string(), 2)]);
/// ```
pub struct KeyedHarness<K, I, F: crate::process::KeyedProcessFunction<K, I>> {
    core: crate::process::KeyedCore<K, I, F>,
    out: Vec<F::Out>,
    clock: crate::time::ManualClock,
    metrics: crate::metrics::Metrics,
}

impl<K: crate::api::Key, I, F: crate::process::KeyedProcessFunction<K, I>> KeyedHarness<K, I, F> {
    /// A harness owning every key group, with a manual clock at 0; calls `open`.
    pub fn new(func: F) -> Result<Self> {
        let clock = crate::time::ManualClock::new(0);
        let state = crate::state::KeyedState::in_memory(
            crate::ids::KeyGroupRange { start: 0, end: 128 },
            128,
        );
        let mut core = crate::process::KeyedCore::new(
            OperatorId("harness".into()),
            crate::ids::SubtaskIndex(0),
            func,
            state,
            std::sync::Arc::new(clock.clone()),
        );
        let metrics = crate::metrics::Metrics::default();
        core.open(&metrics)?;
        Ok(KeyedHarness {
            core,
            out: Vec::new(),
            clock,
            metrics,
        })
    }

    /// Process `record` under `key`.
    pub fn process(&mut self, key: K, record: I) -> Result<()> {
        self.core.process(&key, record, &mut self.out)
    }

    /// Advance event time to `wm`, firing due event-time timers. Never moves back.
    pub fn watermark(&mut self, wm: crate::time::Timestamp) -> Result<()> {
        if wm > self.core.watermark {
            self.core.watermark = wm;
            self.core.fire_timers(
                crate::time::TimeDomain::EventTime,
                wm,
                &mut self.out,
                |_| Ok(()),
            )?;
        }
        Ok(())
    }

    /// Set the clock to `now`, firing due processing-time timers.
    pub fn set_processing_time(&mut self, now: crate::time::Timestamp) -> Result<()> {
        self.clock.set(now);
        self.core.fire_timers(
            crate::time::TimeDomain::ProcessingTime,
            now,
            &mut self.out,
            |_| Ok(()),
        )
    }

    /// Output emitted since the last call.
    pub fn take_output(&mut self) -> Vec<F::Out> {
        std::mem::take(&mut self.out)
    }

    /// The value of a counter the function registered in `open`.
    pub fn counter(&self, name: &str) -> u64 {
        self.metrics
            .snapshot()
            .get(&format!("harness.{name}"))
            .copied()
            .unwrap_or(0)
    }

    /// Number of state entries, timers included: shows whether state is purged.
    pub fn state_entries(&mut self) -> usize {
        self.core
            .state
            .len()
            .expect("the harness's in-memory state cannot fail")
    }

    /// Snapshot the state through the checkpoint encoding and restore it into a fresh
    /// instance of the function, as a restore after a crash would.
    pub fn checkpoint_and_restore(&mut self, fresh: F) -> Result<()> {
        let mut view = self.core.state.snapshot(crate::ids::CheckpointId(1))?;
        view.prepare()?;
        let snap: crate::state::OperatorSnapshot =
            crate::codec::decode(&crate::codec::encode(&view, "harness")?, "harness")?;
        let mut state = crate::state::KeyedState::in_memory(
            crate::ids::KeyGroupRange { start: 0, end: 128 },
            128,
        );
        state.restore(&[snap], None)?;
        let watermark = self.core.watermark;
        self.core = crate::process::KeyedCore::new(
            OperatorId("harness".into()),
            crate::ids::SubtaskIndex(0),
            fresh,
            state,
            std::sync::Arc::new(self.clock.clone()),
        );
        self.core.open(&self.metrics)?;
        self.core.watermark = watermark;
        Ok(())
    }
}

/// Proves a pipeline exactly-once: it runs the pipeline once without failures (the
/// golden output), then again through a series of stages at different parallelisms,
/// each crashing in the middle of the stream after a checkpoint and the next restoring
/// from it, and requires the committed output to equal the golden output exactly: the
/// same records, none missing, none twice.
///
/// ```
/// use exactly_engine::prelude::*;
/// use exactly_engine::testing::{CollectSink, ExactlyOnceCheck, VecSource};
///
/// const SUM: ValueState<i64> = ValueState::new("sum");
/// let input: Vec<(u32, i64)> = (0..40_000).map(|i| (i % 50, 1)).collect();
/// let report = ExactlyOnceCheck::default()
///     .run("running-sums", |job: &Job, out: &CollectSink<(u32, i64)>| {
///         job.source("in", VecSource::new(input.clone()).with_splits(4))
///             .key_by(|e| e.0)
///             .process_fn(|(k, v): (u32, i64), ctx: &mut KeyedContext<'_, u32, (u32, i64)>| {
///                 let s = ctx.value(SUM)?.unwrap_or(0) + v;
///                 ctx.set_value(SUM, &s)?;
///                 ctx.emit((k, s));
///                 Ok(())
///             })
///             .name("sum")
///             .sink("out", out.clone());
///     })
///     .unwrap();
/// assert_eq!(report.crashes, 2);
/// ```
#[derive(Debug, Clone)]
pub struct ExactlyOnceCheck {
    /// Parallelism of the failure-free run.
    pub golden_parallelism: usize,
    /// Parallelism of each stage; every stage but the last crashes.
    pub stages: Vec<usize>,
    /// Checkpoints a stage completes before its crash is armed.
    pub crash_after_checkpoints: u64,
    /// Checkpoint interval of every run.
    pub checkpoint_interval: std::time::Duration,
    /// Batch size of every run (small batches interleave more).
    pub batch_size: usize,
    /// Batches each source split of a crashing stage reads per completed checkpoint
    /// (see [`JobBuilder::source_batches_per_checkpoint`](crate::dsl::JobBuilder::source_batches_per_checkpoint)):
    /// the crash after checkpoint `n` lands before a split's `(n + 1) · k + 1`-th batch
    /// on any machine, so give the check more input than that.
    pub batches_per_checkpoint: u32,
    /// Checkpoint storage of the crashing stages: `None` for memory, or a URL (e.g.
    /// `s3://bucket/prefix`) under which each attempt uses a fresh sub-prefix.
    pub storage_url: Option<String>,
    /// State backend of the crashing stages (the failure-free run always uses the
    /// in-memory backend, so a RocksDB check also compares the two backends).
    pub state_backend: crate::state::StateBackend,
    /// Alignment timeout of the crashing stages (see
    /// [`JobBuilder::aligned_checkpoint_timeout`](crate::dsl::JobBuilder::aligned_checkpoint_timeout)):
    /// `None` aligns every checkpoint, `Some(Duration::ZERO)` takes every one unaligned.
    /// The failure-free run is always aligned.
    pub aligned_checkpoint_timeout: Option<std::time::Duration>,
}

impl Default for ExactlyOnceCheck {
    fn default() -> Self {
        ExactlyOnceCheck {
            golden_parallelism: 1,
            stages: vec![2, 3, 1],
            crash_after_checkpoints: 2,
            checkpoint_interval: std::time::Duration::from_millis(5),
            batch_size: 64,
            batches_per_checkpoint: 8,
            storage_url: None,
            state_backend: crate::state::StateBackend::Memory,
            aligned_checkpoint_timeout: None,
        }
    }
}

/// What an [`ExactlyOnceCheck`] observed.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Records in the golden output.
    pub golden_records: usize,
    /// Crashes survived.
    pub crashes: usize,
    /// The checkpoint each stage restored from.
    pub restored_from: Vec<Option<CheckpointId>>,
}

impl ExactlyOnceCheck {
    fn job(
        &self,
        name: &str,
        storage: &crate::storage::CheckpointStorage,
        parallelism: usize,
        crash: bool,
        backend: crate::state::StateBackend,
        timeout: Option<std::time::Duration>,
    ) -> Result<crate::dsl::Job> {
        let mut b = crate::dsl::Job::builder(name)
            .checkpoint_storage_instance(storage.clone())
            .checkpoint_every(self.checkpoint_interval)
            .parallelism(parallelism)
            .batch_size(self.batch_size)
            .restart_policy(crate::dsl::RestartPolicy::none())
            .state_backend(backend);
        if crash {
            b = b
                .source_batches_per_checkpoint(self.batches_per_checkpoint)
                .inject_failure_after_checkpoint(self.crash_after_checkpoints);
        }
        if let Some(t) = timeout {
            b = b.aligned_checkpoint_timeout(t);
        }
        b.build()
    }

    /// Run the check; `build` adds the pipeline to the job and must write its output to
    /// the given sink. Returns a description of the difference on failure.
    ///
    /// The crashing stages' sources read a fixed number of batches per checkpoint, so
    /// where each crash lands does not depend on the machine's speed: the check needs
    /// no sleeping and no retries. A stage that finishes before its crash proves
    /// nothing and fails the check (give it more input).
    pub fn run<T, B>(&self, name: &str, build: B) -> std::result::Result<CheckReport, String>
    where
        T: Data + Ord + std::fmt::Debug,
        B: Fn(&crate::dsl::Job, &CollectSink<T>),
    {
        self.stages_against_golden(name, &build)
            .map_err(|e| format!("{name}: {e}"))
    }

    /// The failure-free run, then the stages; the first difference as an error.
    fn stages_against_golden<T, B>(
        &self,
        name: &str,
        build: &B,
    ) -> std::result::Result<CheckReport, String>
    where
        T: Data + Ord + std::fmt::Debug,
        B: Fn(&crate::dsl::Job, &CollectSink<T>),
    {
        let golden_sink = CollectSink::new();
        let job = self
            .job(
                name,
                &crate::storage::CheckpointStorage::in_memory(),
                self.golden_parallelism,
                false,
                crate::state::StateBackend::Memory,
                None,
            )
            .map_err(|e| e.to_string())?;
        build(&job, &golden_sink);
        job.run()
            .map_err(|e| format!("failure-free run failed: {e}"))?;
        let golden = golden_sink.sorted();

        let storage = match &self.storage_url {
            None => crate::storage::CheckpointStorage::in_memory(),
            Some(url) => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let url = format!("{}/check-{nanos}", url.trim_end_matches('/'));
                crate::storage::CheckpointStorage::from_url(&url).map_err(|e| e.to_string())?
            }
        };
        let sink = CollectSink::new();
        let mut report = CheckReport {
            golden_records: golden.len(),
            crashes: 0,
            restored_from: Vec::new(),
        };
        for (i, &p) in self.stages.iter().enumerate() {
            let last = i + 1 == self.stages.len();
            let job = self
                .job(
                    name,
                    &storage,
                    p,
                    !last,
                    self.state_backend.clone(),
                    self.aligned_checkpoint_timeout,
                )
                .map_err(|e| e.to_string())?;
            build(&job, &sink);
            match job.run() {
                Ok(r) if last => report.restored_from.push(r.restored_from),
                Ok(_) => {
                    return Err(format!(
                        "stage {i} (parallelism {p}) finished before its injected failure after \
                         checkpoint {}, which proves nothing: give the check more than {} \
                         batches of {} records per source split",
                        self.crash_after_checkpoints,
                        (self.crash_after_checkpoints + 1) * u64::from(self.batches_per_checkpoint),
                        self.batch_size
                    ))
                }
                Err(e) if !last && e.to_string().contains("injected failure") => {
                    report.crashes += 1;
                    report.restored_from.push(None);
                }
                Err(e) => return Err(format!("stage {i} (parallelism {p}) failed: {e}")),
            }
        }
        let got = sink.sorted();
        if got != golden {
            let mut missing = 0usize;
            let mut extra = 0usize;
            let (mut a, mut b) = (golden.iter().peekable(), got.iter().peekable());
            loop {
                match (a.peek(), b.peek()) {
                    (Some(x), Some(y)) if x == y => {
                        a.next();
                        b.next();
                    }
                    (Some(x), Some(y)) if x < y => {
                        missing += 1;
                        a.next();
                    }
                    (Some(_), Some(_)) | (None, Some(_)) => {
                        extra += 1;
                        b.next();
                    }
                    (Some(_), None) => {
                        missing += 1;
                        a.next();
                    }
                    (None, None) => break,
                }
            }
            return Err(format!(
                "committed output differs from the failure-free run: {} records vs {} golden; {missing} missing, {extra} extra (duplicated or wrong)",
                got.len(),
                golden.len()
            ));
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::{CollectSink, ExactlyOnceCheck, VecSource};
    use crate::dsl::Job;

    fn doubled(records: u64) -> impl Fn(&Job, &CollectSink<(u64, u64)>) {
        let input: Vec<(u64, u64)> = (0..records).map(|i| (i % 7, i)).collect();
        move |job, out| {
            job.source("numbers", VecSource::new(input.clone()).with_splits(2))
                .map(|(k, v)| (k, v * 2))
                .sink("out", out.clone());
        }
    }

    #[test]
    fn crashes_land_mid_stream_whatever_the_speed() {
        // 2 splits of 2,000 records in batches of 64: 32 batches a split, more than the
        // 3 · 8 a crashing stage may read before its crash. Run several times: the
        // outcome must not depend on timing.
        for _ in 0..5 {
            let report = ExactlyOnceCheck::default()
                .run("mid-stream", doubled(4_000))
                .unwrap();
            assert_eq!(report.crashes, 2);
            assert_eq!(report.golden_records, 4_000);
        }
    }

    #[test]
    fn a_stage_that_ends_before_its_crash_fails_the_check() {
        // 2 splits of 500 records: 8 batches a split, fewer than the 24 a stage may read.
        let err = ExactlyOnceCheck::default()
            .run("too-short", doubled(1_000))
            .unwrap_err();
        assert!(
            err.contains("finished before its injected failure") && err.contains("24 batches"),
            "{err}"
        );
    }
}
