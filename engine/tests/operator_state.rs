//! Non-keyed operators written with the public `Operator` API: their state survives a
//! crash and a restore at another parallelism exactly (every entry to one instance), a
//! changed state type is refused, and a stateful operator must be named.

use exactly_engine::prelude::*;
use exactly_engine::storage::CheckpointStorage;
use exactly_engine::testing::{CheckpointPace, CollectSink, ManualClock, VecSource};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const INTERVAL: Duration = Duration::from_millis(5);
const RECORDS: u64 = 20_000;

/// Passes records on as `(0, record)` and counts them per instance; when the input
/// ends, emits `(1, count)`. Its state is the count: lost state makes the counts sum to
/// less than the input, state restored twice to more. Panics once at the record
/// `fail_at` names, after it was armed.
#[derive(Clone)]
struct Tally {
    count: u64,
    fail_at: Arc<AtomicU64>,
}

const ARMED: u64 = u64::MAX - 1;

impl Operator<u64> for Tally {
    type Out = (u8, u64);
    type State = u64;

    fn open(
        &mut self,
        restored: Vec<u64>,
        _ctx: &mut OperatorContext<'_, (u8, u64)>,
    ) -> Result<(), BoxError> {
        self.count = restored.iter().sum();
        Ok(())
    }

    fn process(
        &mut self,
        record: u64,
        ctx: &mut OperatorContext<'_, (u8, u64)>,
    ) -> Result<(), BoxError> {
        if self.fail_at.load(Ordering::SeqCst) == ARMED {
            self.fail_at.store(u64::MAX, Ordering::SeqCst);
            panic!("injected failure at record {record}");
        }
        self.count += 1;
        ctx.emit((0, record));
        Ok(())
    }

    fn on_watermark(
        &mut self,
        wm: Timestamp,
        ctx: &mut OperatorContext<'_, (u8, u64)>,
    ) -> Result<(), BoxError> {
        if wm == Timestamp::MAX {
            ctx.emit((1, self.count));
        }
        Ok(())
    }

    fn snapshot(&mut self, _checkpoint: CheckpointId) -> Result<Vec<u64>, BoxError> {
        Ok(vec![self.count])
    }
}

/// The tally over `RECORDS` records from 3 splits, paced so that a checkpoint completes
/// every 500 records of a split; after 2 completed checkpoints the next record panics
/// if `crash`.
fn run(
    storage: &CheckpointStorage,
    parallelism: usize,
    sink: &CollectSink<(u8, u64)>,
    crash: bool,
    restarts: RestartPolicy,
) -> exactly_engine::error::Result<JobReport> {
    let clock = ManualClock::new(0);
    let pace = CheckpointPace::new(500, clock.clone(), INTERVAL);
    let paced_by = pace.clone();
    let fail = Arc::new(AtomicU64::new(u64::MAX));
    let arm = fail.clone();
    let completed = Arc::new(AtomicU64::new(0));
    let job = Job::builder("tally")
        .on_checkpoint(move |_| {
            paced_by.checkpoint_completed();
            if crash && completed.fetch_add(1, Ordering::SeqCst) + 1 == 2 {
                arm.store(ARMED, Ordering::SeqCst);
            }
        })
        .checkpoint_storage_instance(storage.clone())
        .clock(clock)
        .checkpoint_every(INTERVAL)
        .parallelism(parallelism)
        .restart_policy(restarts)
        .batch_size(64)
        .build()?;
    job.source(
        "numbers",
        VecSource::new((0..RECORDS).collect())
            .with_splits(3)
            .paced(pace),
    )
    .transform(Tally {
        count: 0,
        fail_at: fail,
    })
    .name("tally")
    .sink("out", sink.clone());
    job.run()
}

/// Every record once, and the final counts summing to the input.
fn check(sink: &CollectSink<(u8, u64)>, instances: usize) {
    let out = sink.sorted();
    let records: Vec<u64> = out.iter().filter(|r| r.0 == 0).map(|r| r.1).collect();
    assert_eq!(records, (0..RECORDS).collect::<Vec<_>>(), "records");
    let counts: Vec<u64> = out.iter().filter(|r| r.0 == 1).map(|r| r.1).collect();
    assert_eq!(
        counts.len(),
        instances,
        "one count per instance: {counts:?}"
    );
    assert_eq!(counts.iter().sum::<u64>(), RECORDS, "counts {counts:?}");
}

#[test]
fn operator_state_survives_a_crash_and_an_in_process_restart() {
    let storage = CheckpointStorage::in_memory();
    let sink = CollectSink::new();
    let report = run(
        &storage,
        2,
        &sink,
        true,
        RestartPolicy::fixed(3, Duration::ZERO),
    )
    .unwrap();
    assert_eq!(report.restarts, 1, "the injected failure restarted the job");
    check(&sink, 2);
}

#[test]
fn operator_state_is_dealt_out_when_the_parallelism_changes() {
    for (before, after) in [(2, 3), (3, 1), (2, 2)] {
        let storage = CheckpointStorage::in_memory();
        let sink = CollectSink::new();
        let err = run(&storage, before, &sink, true, RestartPolicy::none());
        assert!(err.is_err(), "the injected failure must end the first run");
        let committed = sink.committed().len();
        assert!(committed > 0 && committed < RECORDS as usize, "{committed}");
        let report = run(&storage, after, &sink, false, RestartPolicy::none()).unwrap();
        assert!(report.restored_from.is_some());
        check(&sink, after);
    }
}

/// The same operator name with another state type.
#[derive(Clone)]
struct Renamed;

impl Operator<u64> for Renamed {
    type Out = (u8, u64);
    type State = String;

    fn open(
        &mut self,
        _restored: Vec<String>,
        _ctx: &mut OperatorContext<'_, (u8, u64)>,
    ) -> Result<(), BoxError> {
        Ok(())
    }

    fn process(
        &mut self,
        record: u64,
        ctx: &mut OperatorContext<'_, (u8, u64)>,
    ) -> Result<(), BoxError> {
        ctx.emit((0, record));
        Ok(())
    }
}

/// The same operator with a new layout version of its state.
#[derive(Clone)]
struct Reshaped(Tally);

impl Operator<u64> for Reshaped {
    type Out = (u8, u64);
    type State = u64;
    const STATE_VERSION: u32 = 2;

    fn open(
        &mut self,
        restored: Vec<u64>,
        ctx: &mut OperatorContext<'_, (u8, u64)>,
    ) -> Result<(), BoxError> {
        self.0.open(restored, ctx)
    }

    fn process(
        &mut self,
        record: u64,
        ctx: &mut OperatorContext<'_, (u8, u64)>,
    ) -> Result<(), BoxError> {
        self.0.process(record, ctx)
    }
}

#[test]
fn a_new_state_version_is_refused_naming_both() {
    let storage = CheckpointStorage::in_memory();
    let sink = CollectSink::new();
    assert!(run(&storage, 2, &sink, true, RestartPolicy::none()).is_err());
    let job = Job::builder("tally")
        .checkpoint_storage_instance(storage)
        .parallelism(2)
        .build()
        .unwrap();
    job.source(
        "numbers",
        VecSource::new((0..RECORDS).collect()).with_splits(3),
    )
    .transform(Reshaped(Tally {
        count: 0,
        fail_at: Arc::new(AtomicU64::new(u64::MAX)),
    }))
    .name("tally")
    .sink("out", sink.clone());
    let err = job.run().unwrap_err().to_string();
    assert!(
        err.contains("holds OperatorState<u64>,") && err.contains("OperatorState<u64> version 2"),
        "{err}"
    );
}

#[test]
fn a_changed_state_type_is_refused_naming_both() {
    let storage = CheckpointStorage::in_memory();
    let sink = CollectSink::new();
    assert!(run(&storage, 2, &sink, true, RestartPolicy::none()).is_err());
    let job = Job::builder("tally")
        .checkpoint_storage_instance(storage)
        .parallelism(2)
        .restart_policy(RestartPolicy::fixed(3, Duration::ZERO))
        .build()
        .unwrap();
    job.source(
        "numbers",
        VecSource::new((0..RECORDS).collect()).with_splits(3),
    )
    .transform(Renamed)
    .name("tally")
    .sink("out", sink.clone());
    let err = job.run().unwrap_err();
    assert_eq!(err.class(), ErrorClass::Stop, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("'tally'")
            && msg.contains("OperatorState<u64>")
            && msg.contains("OperatorState<alloc::string::String>"),
        "{msg}"
    );
}

#[test]
fn a_stateful_operator_must_be_named_a_stateless_one_need_not() {
    let job = Job::builder("unnamed")
        .checkpoint_storage("memory://")
        .build()
        .unwrap();
    job.source("numbers", VecSource::new(vec![1u64, 2, 3]))
        .transform(Tally {
            count: 0,
            fail_at: Arc::new(AtomicU64::new(u64::MAX)),
        })
        .sink("out", CollectSink::new());
    let err = job.run().unwrap_err();
    assert!(
        err.to_string()
            .contains("stateful operator 'transform-1' has no name"),
        "{err}"
    );

    let sink = CollectSink::new();
    let job = Job::builder("unnamed")
        .checkpoint_storage("memory://")
        .build()
        .unwrap();
    job.source("numbers", VecSource::new(vec![1u64, 2, 3]))
        .map(|n| n * 2)
        .filter(|n| *n > 2)
        .flat_map(|n| [n, n + 1])
        .sink("out", sink.clone());
    job.run().unwrap();
    assert_eq!(sink.sorted(), vec![4, 5, 6, 7]);
}
