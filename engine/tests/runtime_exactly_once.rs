//! End-to-end behaviour of the runtime with the in-memory reference sink.

use exactly_engine::prelude::*;
use exactly_engine::storage::CheckpointStorage;
use exactly_engine::testing::{CheckpointPace, CollectSink, ManualClock, VecSource};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SUM: ValueState<i64> = ValueState::new("sum");

/// (account, amount, seq) events, deterministic. The source reads 3 round-robin splits
/// in parallel; every account lives in one split (account ≡ seq mod 3), so each
/// account's events reach the keyed operator in sequence order and running sums are
/// well defined.
fn events(n: u64, accounts_per_split: u64) -> Vec<(u64, i64, u64)> {
    (0..n)
        .map(|i| {
            (
                ((i / 3) * 7919 % accounts_per_split) * 3 + i % 3,
                (i % 13) as i64 - 4,
                i,
            )
        })
        .collect()
}

/// The failure-free answer computed without the engine: per event, the account's
/// running sum after it.
fn expected(evs: &[(u64, i64, u64)]) -> Vec<(u64, u64, i64)> {
    let mut sums: BTreeMap<u64, i64> = BTreeMap::new();
    let mut out: Vec<(u64, u64, i64)> = evs
        .iter()
        .map(|&(a, v, seq)| {
            let s = sums.entry(a).or_default();
            *s += v;
            (a, seq, *s)
        })
        .collect();
    out.sort();
    out
}

/// Running sum per account; panics once when it sees seq `fail_at` (`ANY_SEQ_AFTER_2`:
/// the first record after the second completed checkpoint), to simulate a task crash.
#[derive(Clone)]
struct RunningSum {
    fail_at: Arc<AtomicU64>,
}

const ANY_SEQ_AFTER_2: u64 = u64::MAX - 1;
const ARMED: u64 = u64::MAX - 2;

impl KeyedProcessFunction<u64, (u64, i64, u64)> for RunningSum {
    type Out = (u64, u64, i64);
    fn process(
        &mut self,
        (a, v, seq): (u64, i64, u64),
        ctx: &mut KeyedContext<'_, u64, Self::Out>,
    ) -> Result<(), BoxError> {
        let f = self.fail_at.load(Ordering::SeqCst);
        if f == seq || f == ARMED {
            self.fail_at.store(u64::MAX, Ordering::SeqCst);
            panic!("injected failure at seq {seq}");
        }
        let s = ctx.value(SUM)?.unwrap_or(0) + v;
        ctx.set_value(SUM, &s)?;
        ctx.emit((a, seq, s));
        Ok(())
    }
}

fn build(
    storage: &CheckpointStorage,
    parallelism: usize,
    data: &[(u64, i64, u64)],
    sink: &CollectSink<(u64, u64, i64)>,
    fail_at: u64,
    restarts: RestartPolicy,
) -> Job {
    let fail = Arc::new(AtomicU64::new(fail_at));
    let arm = fail.clone();
    let completed = Arc::new(AtomicU64::new(0));
    let (clock, pace) = paced();
    let paced_by = pace.clone();
    let job = Job::builder("sum")
        .on_checkpoint(move |_| {
            paced_by.checkpoint_completed();
            if completed.fetch_add(1, Ordering::SeqCst) + 1 == 2 {
                let _ = arm.compare_exchange(
                    ANY_SEQ_AFTER_2,
                    ARMED,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
        })
        .checkpoint_storage_instance(storage.clone())
        .clock(clock)
        .checkpoint_every(INTERVAL)
        .parallelism(parallelism)
        .restart_policy(restarts)
        .batch_size(64)
        .build()
        .unwrap();
    pipeline(&job, data, sink, fail, pace);
    job
}

/// The checkpoint interval, on the job's manual clock.
const INTERVAL: Duration = Duration::from_millis(5);

/// A manual clock, and a pace that makes a checkpoint happen every 500 records of each
/// split: checkpoints come at known points of the input, however fast the machine.
fn paced() -> (ManualClock, CheckpointPace) {
    let clock = ManualClock::new(0);
    let pace = CheckpointPace::new(500, clock.clone(), INTERVAL);
    (clock, pace)
}

/// Events from 3 splits, paced by checkpoints, the keyed `running-sum` (failing as
/// `fail` says), into `sink`.
fn pipeline(
    job: &Job,
    data: &[(u64, i64, u64)],
    sink: &CollectSink<(u64, u64, i64)>,
    fail: Arc<AtomicU64>,
    pace: CheckpointPace,
) {
    job.source(
        "events",
        VecSource::new(data.to_vec()).with_splits(3).paced(pace),
    )
    .key_by(|e: &(u64, i64, u64)| e.0)
    .process(RunningSum { fail_at: fail })
    .name("running-sum")
    .sink("out", sink.clone());
}

#[test]
fn failure_free_run_commits_exactly_the_expected_output() {
    let data = events(20_000, 97);
    let sink = CollectSink::new();
    let report = build(
        &CheckpointStorage::in_memory(),
        2,
        &data,
        &sink,
        u64::MAX,
        RestartPolicy::none(),
    )
    .run()
    .unwrap();
    assert_eq!(sink.sorted(), expected(&data));
    assert_eq!(
        sink.staged_batches(),
        0,
        "nothing may stay staged after run()"
    );
    let last = report.checkpoints.last().expect("a final checkpoint");
    assert!(last.is_final);
    assert!(
        report.checkpoints.len() >= 2,
        "periodic checkpoints were taken: {}",
        report.checkpoints.len()
    );
    let ids: Vec<u64> = report.checkpoints.iter().map(|c| c.id.0).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    // The memory budget is visible: the keyed operator's state, in the encoded layout
    // (at least a key, a name and a value per distinct key: 97 keys).
    let bytes = last.state_bytes_by_operator.get("running-sum").copied();
    assert!(
        bytes.is_some_and(|b| b >= 97 * 5),
        "{:?}",
        last.state_bytes_by_operator
    );
}

#[test]
fn task_panic_restarts_from_checkpoint_without_duplicates_or_loss() {
    let data = events(20_000, 97);
    let sink = CollectSink::new();
    let report = build(
        &CheckpointStorage::in_memory(),
        2,
        &data,
        &sink,
        15_000,
        RestartPolicy::fixed(2, Duration::from_millis(10)),
    )
    .run()
    .unwrap();
    assert_eq!(report.restarts, 1);
    let got = sink.sorted();
    assert_eq!(got.len(), data.len(), "no loss, no duplicates");
    assert_eq!(got, expected(&data));
}

/// Restarts are counted in a row: a checkpoint completed after a restart shows progress
/// (here with `healthy_after` zero: no minimum run time) and the count starts over, so a
/// policy of one restart survives three failures that each follow a completed
/// checkpoint (each failure is armed by a checkpoint completing after the previous
/// restart).
#[test]
fn restart_count_starts_over_after_a_completed_checkpoint() {
    let data = events(40_000, 97);
    let sink = CollectSink::new();
    let fail = Arc::new(AtomicU64::new(u64::MAX));
    let (arm, armed) = (fail.clone(), Arc::new(AtomicU64::new(0)));
    let count = armed.clone();
    let (clock, pace) = paced();
    let paced_by = pace.clone();
    let job = Job::builder("sum")
        .on_checkpoint(move |c| {
            paced_by.checkpoint_completed();
            if !c.is_final
                && count.load(Ordering::SeqCst) < 3
                && arm
                    .compare_exchange(u64::MAX, ARMED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                count.fetch_add(1, Ordering::SeqCst);
            }
        })
        .checkpoint_storage_instance(CheckpointStorage::in_memory())
        .clock(clock)
        .checkpoint_every(INTERVAL)
        .parallelism(1)
        .restart_policy(RestartPolicy {
            healthy_after: Duration::ZERO,
            ..RestartPolicy::fixed(1, Duration::ZERO)
        })
        .batch_size(64)
        .build()
        .unwrap();
    pipeline(&job, &data, &sink, fail.clone(), pace);
    let report = job.run().unwrap();
    // A failure armed after the last record never fires.
    let fired = armed.load(Ordering::SeqCst) - u64::from(fail.load(Ordering::SeqCst) == ARMED);
    assert!(
        fired >= 2,
        "at least two failures in a row-breaking sequence: {fired}"
    );
    assert_eq!(u64::from(report.restarts), fired);
    assert_eq!(sink.sorted(), expected(&data));
}

#[test]
fn exhausted_restarts_name_the_failing_operator() {
    let data = events(5_000, 7);
    let sink = CollectSink::new();
    let err = build(
        &CheckpointStorage::in_memory(),
        1,
        &data,
        &sink,
        100,
        RestartPolicy::none(),
    )
    .run()
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("running-sum") && msg.contains("injected failure"),
        "{msg}"
    );
}

#[test]
fn restore_at_different_parallelism_gives_the_same_output() {
    let data = events(20_000, 97);
    let storage = CheckpointStorage::in_memory();
    let sink = CollectSink::new();
    // First run at parallelism 2 dies mid-way and may not restart.
    let err = build(
        &storage,
        2,
        &data,
        &sink,
        ANY_SEQ_AFTER_2,
        RestartPolicy::none(),
    )
    .run();
    assert!(err.is_err(), "the injected failure must end the first run");
    let committed_before = sink.committed().len();
    assert!(
        committed_before > 0 && committed_before < data.len(),
        "{committed_before}"
    );
    // The same job restored at parallelism 3 finishes it.
    let report = build(&storage, 3, &data, &sink, u64::MAX, RestartPolicy::none())
        .run()
        .unwrap();
    assert!(report.restored_from.is_some());
    assert_eq!(sink.sorted(), expected(&data));
}

#[test]
fn checkpoint_ids_continue_above_everything_seen_after_restart() {
    let data = events(5_000, 11);
    let storage = CheckpointStorage::in_memory();
    let sink = CollectSink::new();
    let first = build(&storage, 1, &data, &sink, u64::MAX, RestartPolicy::none())
        .run()
        .unwrap();
    let committed = sink.committed().len();
    // Same storage and sink: the second run restores the final checkpoint (re-committing
    // its output idempotently); its ids continue above.
    let second = build(&storage, 1, &data, &sink, u64::MAX, RestartPolicy::none())
        .run()
        .unwrap();
    let max_first = first.checkpoints.iter().map(|c| c.id).max().unwrap();
    let min_second = second.checkpoints.iter().map(|c| c.id).min().unwrap();
    assert_eq!(second.restored_from, Some(max_first));
    assert!(min_second > max_first, "{min_second} > {max_first}");
    // Restored at the end of input: nothing is processed or committed twice.
    assert_eq!(sink.committed().len(), committed);
    assert_eq!(sink.sorted(), expected(&data));
}

#[test]
fn union_aligns_barriers_from_both_inputs() {
    let a: Vec<(u64, i64, u64)> = (0..6_000).map(|i| (i % 5, 1, i)).collect();
    let b: Vec<(u64, i64, u64)> = (6_000..12_000).map(|i| (i % 5, 2, i)).collect();
    let all: Vec<_> = a.iter().chain(b.iter()).cloned().collect();
    let sink = CollectSink::new();
    let job = Job::builder("union")
        .checkpoint_storage("memory://")
        .checkpoint_every(Duration::from_millis(3))
        .parallelism(2)
        .restart_policy(RestartPolicy::fixed(1, Duration::ZERO))
        .batch_size(32)
        .build()
        .unwrap();
    let sa = job.source("a", VecSource::new(a).with_splits(2));
    let sb = job.source("b", VecSource::new(b).with_splits(2));
    sa.union(&sb)
        .key_by(|e: &(u64, i64, u64)| e.0)
        .process(RunningSum {
            fail_at: Arc::new(AtomicU64::new(9_000)),
        })
        .name("running-sum")
        .sink("out", sink.clone());
    let report = job.run().unwrap();
    assert_eq!(report.restarts, 1);
    // Order within a key differs from the single-sequence answer, so compare the
    // multiset of (key, seq) and the final sum per key.
    let got = sink.sorted();
    assert_eq!(got.len(), all.len());
    let mut seqs: Vec<u64> = got.iter().map(|r| r.1).collect();
    seqs.sort();
    assert_eq!(seqs, (0..12_000).collect::<Vec<_>>());
    let mut final_sum: BTreeMap<u64, i64> = BTreeMap::new();
    for &(a, v, _) in &all {
        *final_sum.entry(a).or_default() += v;
    }
    for (k, want) in final_sum {
        // Amounts are positive, so the last running sum of a key is its largest.
        let last = got.iter().filter(|r| r.0 == k).map(|r| r.2).max().unwrap();
        assert_eq!(last, want, "key {k}");
    }
}

#[test]
fn non_replayable_source_is_refused() {
    struct Once;
    impl Source for Once {
        type Item = u32;
        type Offset = ();
        type Reader = VecReaderStub;
        fn splits(&self) -> exactly_engine::error::Result<Vec<String>> {
            Ok(vec!["0".into()])
        }
        fn open(
            &self,
            _: &str,
            _: Option<()>,
            _: &SourceContext,
        ) -> exactly_engine::error::Result<VecReaderStub> {
            Ok(VecReaderStub)
        }
        fn replayable(&self) -> bool {
            false
        }
    }
    struct VecReaderStub;
    impl SourceReader for VecReaderStub {
        type Item = u32;
        type Offset = ();
        fn poll_batch(
            &mut self,
            _: &mut Vec<u32>,
            _: usize,
        ) -> exactly_engine::error::Result<SourcePoll> {
            Ok(SourcePoll::End)
        }
        fn offset(&self) {}
    }
    let job = Job::builder("nr")
        .checkpoint_storage("memory://")
        .build()
        .unwrap();
    job.source("socket", Once).sink("out", CollectSink::new());
    let err = job.run().unwrap_err();
    assert!(matches!(err, Error::NotReplayable { .. }), "{err}");
    assert!(err.to_string().contains("socket"), "{err}");
    // It points at something that helps: at-least-once mode needs a replayable source
    // too (without one, a crash loses records), so it is not offered as a way out.
    assert!(err.to_string().contains("replayable source"), "{err}");
    assert!(!err.to_string().contains("at-least-once"), "{err}");
}

#[test]
fn configuration_errors_are_clear() {
    let job = Job::builder("cfg")
        .checkpoint_storage("memory://")
        .build()
        .unwrap();
    job.source("a", VecSource::new(vec![1u32]));
    assert!(job.run().unwrap_err().to_string().contains("no sink"));

    let job = Job::builder("cfg")
        .checkpoint_storage("memory://")
        .build()
        .unwrap();
    job.source("a", VecSource::new(vec![1u32]))
        .sink("a", CollectSink::new());
    assert!(job
        .run()
        .unwrap_err()
        .to_string()
        .contains("two operators are named 'a'"));

    // Names become parts of paths: no separators, no `.`/`..`, nothing hidden.
    for bad in [
        "bad name", "..", ".", ".staging", "a/b", "a\\b", "tab\t", "",
    ] {
        let err = Job::builder(bad).build().err().expect(bad).to_string();
        assert!(err.contains("must be 1-100 characters"), "{bad:?}: {err}");
    }
    for bad in ["..", ".", ".staging", "out/../x", "a\\b", "nul\0"] {
        let job = Job::builder("cfg")
            .checkpoint_storage("memory://")
            .build()
            .unwrap();
        job.source("a", VecSource::new(vec![1u32]))
            .sink(bad, CollectSink::new());
        let err = job.run().unwrap_err().to_string();
        assert!(
            err.contains(&format!("operator name '{}' must be", bad.escape_debug())),
            "{bad:?}: {err}"
        );
    }
    assert!(Job::builder("v1.2-a_b")
        .checkpoint_storage("memory://")
        .build()
        .is_ok());
    assert!(Job::builder("x")
        .parallelism(0)
        .checkpoint_storage("memory://")
        .build()
        .is_err());
}

#[test]
fn corrupt_checkpoint_stops_the_job_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let data = events(3_000, 5);
    let storage = CheckpointStorage::from_url(&url).unwrap();
    build(
        &storage,
        1,
        &data,
        &CollectSink::new(),
        u64::MAX,
        RestartPolicy::none(),
    )
    .run()
    .unwrap();
    // Damage the newest checkpoint's keyed state file.
    let mut newest = None;
    for entry in walk(dir.path()) {
        if entry.to_string_lossy().contains("running-sum") {
            newest = newest.max(Some(entry));
        }
    }
    let file = newest.expect("a state file of the keyed operator");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let err = build(
        &storage,
        1,
        &data,
        &CollectSink::new(),
        u64::MAX,
        RestartPolicy::none(),
    )
    .run()
    .unwrap_err();
    assert!(matches!(err, Error::CorruptCheckpoint { .. }), "{err}");
    assert!(err.to_string().contains("running-sum"), "{err}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn retention_keeps_the_newest_checkpoints_and_removes_orphaned_state() {
    let dir = tempfile::tempdir().unwrap();
    // Left behind by an interrupted cleanup: state files without a manifest.
    std::fs::create_dir_all(dir.path().join("chk-00000000000000000001")).unwrap();
    std::fs::write(dir.path().join("chk-00000000000000000001/op-0.state"), b"x").unwrap();
    let storage = CheckpointStorage::from_url(dir.path().to_str().unwrap()).unwrap();
    let data = events(20_000, 97);
    let sink = CollectSink::new();
    let job = Job::builder("sum")
        .checkpoint_storage_instance(storage.clone())
        .checkpoint_every(Duration::from_millis(5))
        .retain_checkpoints(2)
        .parallelism(2)
        .batch_size(64)
        // 105 batches a split: at least 6 checkpoints, however fast the machine.
        .source_batches_per_checkpoint(20)
        .build()
        .unwrap();
    job.source("events", VecSource::new(data.clone()).with_splits(3))
        .key_by(|e: &(u64, i64, u64)| e.0)
        .process(RunningSum {
            fail_at: Arc::new(AtomicU64::new(u64::MAX)),
        })
        .name("running-sum")
        .sink("out", sink.clone());
    let report = job.run().unwrap();
    // With two retained, a third checkpoint must have deleted the first.
    assert!(
        report.checkpoints.len() >= 3,
        "{}",
        report.checkpoints.len()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (manifests, _) = rt.block_on(storage.scan()).unwrap();
    let newest: Vec<_> = report
        .checkpoints
        .iter()
        .rev()
        .take(2)
        .map(|c| c.id)
        .rev()
        .collect();
    assert_eq!(manifests, newest);
    assert_eq!(
        rt.block_on(storage.checkpoint_dirs()).unwrap(),
        newest,
        "no orphaned state directories"
    );
    assert_eq!(sink.sorted(), expected(&data));
}

#[test]
fn a_second_instance_on_the_same_storage_fences_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().to_str().unwrap().to_string();
    let data = events(60_000, 97);
    let first_checkpoint = Arc::new(std::sync::Barrier::new(2));
    // Both instances write to the same external system, as two deployments would.
    let sink = CollectSink::new();
    let (url_a, data_a, gate, sink_a) = (
        url.clone(),
        data.clone(),
        first_checkpoint.clone(),
        sink.clone(),
    );
    let a = std::thread::spawn(move || {
        let signalled = std::sync::atomic::AtomicBool::new(false);
        let job = Job::builder("sum")
            .checkpoint_storage(url_a)
            .checkpoint_every(Duration::from_millis(5))
            .parallelism(2)
            .batch_size(64)
            // 313 batches a split: the older instance cannot finish before the newer
            // one takes over, however fast the machine.
            .source_batches_per_checkpoint(10)
            .restart_policy(RestartPolicy::none())
            .on_checkpoint(move |_| {
                if !signalled.swap(true, Ordering::SeqCst) {
                    gate.wait();
                }
            })
            .build()
            .unwrap();
        job.source("events", VecSource::new(data_a).with_splits(3))
            .key_by(|e: &(u64, i64, u64)| e.0)
            .process(RunningSum {
                fail_at: Arc::new(AtomicU64::new(u64::MAX)),
            })
            .name("running-sum")
            .sink("out", sink_a);
        job.run()
    });
    first_checkpoint.wait();
    let storage = CheckpointStorage::from_url(&url).unwrap();
    let b = build(&storage, 2, &data, &sink, u64::MAX, RestartPolicy::none()).run();
    let a = a.join().unwrap();
    let err = a.expect_err("the older instance must be stopped");
    assert!(matches!(err, Error::Fenced { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("one instance per checkpoint location"),
        "{err}"
    );
    assert!(b.is_ok(), "the newer instance runs on: {b:?}");
}

/// A [`VecSource`] whose readers log every completion notice: (split, offset, records
/// of that split in the committed output at that moment).
#[derive(Clone)]
struct Announced {
    inner: VecSource<u64>,
    sink: CollectSink<u64>,
    log: Arc<std::sync::Mutex<Vec<(u64, u64, u64)>>>,
}

struct AnnouncedReader {
    inner: <VecSource<u64> as Source>::Reader,
    split: u64,
    source: Announced,
}

impl Source for Announced {
    type Item = u64;
    type Offset = u64;
    type Reader = AnnouncedReader;
    fn splits(&self) -> Result<Vec<String>, Error> {
        self.inner.splits()
    }
    fn open(
        &self,
        split: &str,
        from: Option<u64>,
        ctx: &SourceContext,
    ) -> Result<AnnouncedReader, Error> {
        Ok(AnnouncedReader {
            inner: self.inner.open(split, from, ctx)?,
            split: split.parse().unwrap(),
            source: self.clone(),
        })
    }
}

impl SourceReader for AnnouncedReader {
    type Item = u64;
    type Offset = u64;
    fn poll_batch(&mut self, out: &mut Vec<u64>, max: usize) -> Result<SourcePoll, Error> {
        self.inner.poll_batch(out, max)
    }
    fn offset(&self) -> u64 {
        self.inner.offset()
    }
    fn checkpoint_complete(&mut self, offset: &u64) {
        let splits = 3;
        let visible = (self.source.sink.committed().iter())
            .filter(|r| *r % splits == self.split)
            .count() as u64;
        (self.source.log.lock().unwrap()).push((self.split, *offset, visible));
    }
}

/// Readers hear of every completed checkpoint, with the offsets recorded at its
/// barrier, only once its output is committed, and of the final one before `run()`
/// returns (what a Kafka source commits to its consumer group for monitoring).
#[test]
fn sources_hear_of_completed_checkpoints_after_their_output_is_committed() {
    const N: u64 = 30_000;
    let sink = CollectSink::new();
    let source = Announced {
        inner: VecSource::new((0..N).collect()).with_splits(3),
        sink: sink.clone(),
        log: Default::default(),
    };
    let job = Job::builder("announce")
        .checkpoint_storage("memory://")
        .checkpoint_every(Duration::from_millis(5))
        .parallelism(2)
        .batch_size(64)
        // 157 batches a split: about 10 checkpoints to notice.
        .source_batches_per_checkpoint(16)
        .build()
        .unwrap();
    job.source("numbers", source.clone())
        .map(|n| n)
        .sink("out", sink.clone());
    let report = job.run().unwrap();
    assert_eq!(sink.sorted(), (0..N).collect::<Vec<_>>());

    let log = source.log.lock().unwrap().clone();
    for split in 0..3 {
        let notices: Vec<(u64, u64)> = (log.iter())
            .filter(|n| n.0 == split)
            .map(|n| (n.1, n.2))
            .collect();
        assert_eq!(
            notices.len(),
            report.checkpoints.len(),
            "split {split}: one notice per completed checkpoint"
        );
        assert!(
            notices.windows(2).all(|w| w[0].0 <= w[1].0),
            "split {split}: offsets never go back: {notices:?}"
        );
        assert!(
            notices.iter().all(|&(offset, visible)| visible >= offset),
            "split {split}: a notice came before its output was committed: {notices:?}"
        );
        let records = N / 3;
        assert_eq!(
            notices.last().map(|n| n.0),
            Some(records),
            "split {split}: the final checkpoint's offset, the end of the split, is announced"
        );
    }
}
