//! Unaligned checkpoints: a barrier overtakes a backlog that does not move, and a
//! restore replays the records it overtook.
//!
//! The keyed operator takes one permit per record and waits while there is none, so the
//! test decides how fast it goes: the channels in front of it fill up and stay full
//! while the test hands out one permit at a time. An aligned checkpoint cannot complete
//! before that whole backlog is processed; an unaligned one completes after at most a
//! few batches, storing the backlog it overtook.

use exactly_engine::prelude::*;
use exactly_engine::testing::{CollectSink, VecSource};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const COUNT: ValueState<u64> = ValueState::new("count");
const BATCH: usize = 16;
const CAPACITY: usize = 32;
/// Records queued in front of the operator when the checkpoint is asked (the channel
/// holds CAPACITY batches; the source's own buffers come on top).
const BACKLOG: u64 = (CAPACITY * BATCH) as u64;
const RECORDS: u64 = 20_000;

/// Counts records per key, one permit per record.
#[derive(Clone)]
struct Gated {
    permits: Arc<AtomicU64>,
    processed: Arc<AtomicU64>,
    open: Arc<AtomicBool>,
}

impl KeyedProcessFunction<u64, u64> for Gated {
    type Out = (u64, u64, u64);
    fn process(
        &mut self,
        r: u64,
        ctx: &mut KeyedContext<'_, u64, Self::Out>,
    ) -> Result<(), BoxError> {
        while !self.open.load(Ordering::SeqCst) {
            let p = self.permits.load(Ordering::SeqCst);
            if p > 0
                && self
                    .permits
                    .compare_exchange(p, p - 1, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                break;
            }
            std::thread::yield_now();
        }
        self.processed.fetch_add(1, Ordering::SeqCst);
        let n = ctx.value(COUNT)?.unwrap_or(0) + 1;
        ctx.set_value(COUNT, &n)?;
        ctx.emit((r % 7, r, n));
        Ok(())
    }
}

/// Every record's output exactly once, and per key the counts 1..=n each once (the
/// order of records of one key depends on how the two splits interleave).
fn check_output(got: Vec<(u64, u64, u64)>) {
    let mut records: Vec<u64> = got.iter().map(|o| o.1).collect();
    records.sort_unstable();
    let want: Vec<u64> = (0..RECORDS).collect();
    assert!(
        records == want,
        "{} outputs for {RECORDS} records",
        records.len()
    );
    for key in 0..7 {
        let mut counts: Vec<u64> = got.iter().filter(|o| o.0 == key).map(|o| o.2).collect();
        counts.sort_unstable();
        let n = (0..RECORDS).filter(|r| r % 7 == key).count() as u64;
        assert!(
            counts == (1..=n).collect::<Vec<_>>(),
            "key {key}: counts are not 1..={n} once each"
        );
    }
}

fn job(
    storage: &exactly_engine::storage::CheckpointStorage,
    unaligned: bool,
    gate: &Gated,
    sink: &CollectSink<(u64, u64, u64)>,
    stats: &Arc<Mutex<Vec<CheckpointStats>>>,
) -> Job {
    let seen = stats.clone();
    let mut b = Job::builder("overtake")
        .checkpoint_storage_instance(storage.clone())
        .parallelism(1)
        .batch_size(BATCH)
        .channel_capacity(CAPACITY)
        .restart_policy(RestartPolicy::none())
        .on_checkpoint(move |c| seen.lock().unwrap().push(c.clone()));
    if unaligned {
        b = b.unaligned_checkpoints();
    }
    let job = b.build().unwrap();
    // Two splits read by one source subtask: the keyed task has one input channel, and
    // the source a backlog behind it.
    job.source(
        "numbers",
        VecSource::new((0..RECORDS).collect()).with_splits(2),
    )
    .key_by(|r: &u64| r % 7)
    .process(gate.clone())
    .name("gated")
    .sink("out", sink.clone());
    job
}

/// Wait (without a deadline of its own: the test harness has one) until `cond`.
fn until(cond: impl Fn() -> bool) {
    while !cond() {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn an_unaligned_checkpoint_overtakes_the_backlog_and_a_restore_replays_it() {
    let storage = exactly_engine::storage::CheckpointStorage::in_memory();
    let sink = CollectSink::new();
    let stats = Arc::new(Mutex::new(Vec::new()));
    let gate = Gated {
        permits: Arc::new(AtomicU64::new(0)),
        processed: Arc::new(AtomicU64::new(0)),
        open: Arc::new(AtomicBool::new(false)),
    };
    let handle = job(&storage, true, &gate, &sink, &stats).start().unwrap();
    // A few batches go through; the channels in front of the operator are full long
    // before the test asks for a checkpoint (the source has 20,000 records, they hold
    // 512).
    gate.permits.store(3 * BATCH as u64, Ordering::SeqCst);
    until(|| gate.processed.load(Ordering::SeqCst) == 3 * BATCH as u64);
    let asked_at = gate.processed.load(Ordering::SeqCst);
    let done = Arc::new(Mutex::new(None));
    std::thread::scope(|s| {
        let (handle, answer) = (&handle, done.clone());
        s.spawn(move || *answer.lock().unwrap() = Some(handle.checkpoint()));
        // One record at a time, slowly, until the checkpoint completes.
        while done.lock().unwrap().is_none() {
            let before = gate.processed.load(Ordering::SeqCst);
            gate.permits.fetch_add(1, Ordering::SeqCst);
            until(|| {
                gate.processed.load(Ordering::SeqCst) > before || done.lock().unwrap().is_some()
            });
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let id = done.lock().unwrap().take().unwrap().unwrap();
    let during = gate.processed.load(Ordering::SeqCst) - asked_at;
    assert!(
        during < BACKLOG / 2,
        "the checkpoint completed after {during} records, of a backlog of at least {BACKLOG}"
    );
    // The figures reach `on_checkpoint` once the checkpoint's output is committed,
    // which may be just after `checkpoint()` returned.
    until(|| stats.lock().unwrap().iter().any(|c| c.id == id));
    let c = stats
        .lock()
        .unwrap()
        .iter()
        .find(|c| c.id == id)
        .cloned()
        .unwrap();
    assert_eq!(
        c.unaligned_tasks,
        vec![("gated".to_string(), 0)],
        "the keyed task went unaligned"
    );
    assert!(
        c.inflight_bytes > 0,
        "the overtaken backlog is stored: {c:?}"
    );
    println!(
        "checkpoint {id} completed after {during} of at least {BACKLOG} queued records, storing {} bytes in flight",
        c.inflight_bytes
    );
    // Crash: the job is cancelled with the backlog unprocessed (the gate opens only
    // to let the stuck operator finish its batch and see the cancellation).
    handle.cancel();
    gate.open.store(true, Ordering::SeqCst);
    assert!(handle.wait().is_err());

    // The restart (aligned, nothing gated) restores that checkpoint and replays the
    // records in flight before reading on: every record's output exactly once.
    let report = job(&storage, false, &gate, &sink, &stats).run().unwrap();
    assert_eq!(report.restored_from, Some(id));
    check_output(sink.committed());
}

/// `source (2) → gate (1) → sink`: the gate is a task of its own, fed by two channels.
/// At parallelism 1 everywhere it is chained into the source's task and has no input
/// to replay records in flight into. The gate is named `name`, restoring the state of
/// `restores` if given.
fn forward_job(
    storage: &exactly_engine::storage::CheckpointStorage,
    source_parallelism: usize,
    gate: &Gated,
    sink: &CollectSink<u64>,
    name: &str,
    restores: Option<&str>,
) -> Job {
    let job = Job::builder("chained")
        .checkpoint_storage_instance(storage.clone())
        .parallelism(source_parallelism)
        .batch_size(BATCH)
        .channel_capacity(CAPACITY)
        .restart_policy(RestartPolicy::none())
        .unaligned_checkpoints()
        .build()
        .unwrap();
    let g = gate.clone();
    let gated = job
        .source(
            "numbers",
            VecSource::new((0..RECORDS).collect()).with_splits(2),
        )
        .map(move |r: u64| {
            while !g.open.load(Ordering::SeqCst) {
                let p = g.permits.load(Ordering::SeqCst);
                if p > 0
                    && g.permits
                        .compare_exchange(p, p - 1, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    break;
                }
                std::thread::yield_now();
            }
            g.processed.fetch_add(1, Ordering::SeqCst);
            r
        })
        .name(name);
    let gated = match restores {
        Some(old) => gated.restore_state_of(old),
        None => gated,
    };
    gated.parallelism(1).sink("out", sink.clone());
    job
}

/// Run the forward job at source parallelism 2 until an unaligned checkpoint stored
/// the gate's backlog, then cancel it; returns that checkpoint.
fn checkpoint_with_records_in_flight(
    storage: &exactly_engine::storage::CheckpointStorage,
    gate: &Gated,
    sink: &CollectSink<u64>,
) -> exactly_engine::ids::CheckpointId {
    let handle = forward_job(storage, 2, gate, sink, "gate", None)
        .start()
        .unwrap();
    until(|| gate.processed.load(Ordering::SeqCst) == BATCH as u64);
    // The gate has finished its first batch and waits: the checkpoint overtakes the
    // backlog queued in front of it.
    let id = std::thread::scope(|s| {
        let asked = s.spawn(|| handle.checkpoint());
        while !asked.is_finished() {
            gate.permits.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
        }
        asked.join().unwrap().unwrap()
    });
    handle.cancel();
    gate.open.store(true, Ordering::SeqCst);
    assert!(handle.wait().is_err());
    id
}

fn new_gate() -> Gated {
    Gated {
        permits: Arc::new(AtomicU64::new(BATCH as u64)),
        processed: Arc::new(AtomicU64::new(0)),
        open: Arc::new(AtomicBool::new(false)),
    }
}

fn all_records_once(sink: &CollectSink<u64>) {
    let mut got = sink.committed();
    got.sort_unstable();
    assert!(
        got == (0..RECORDS).collect::<Vec<_>>(),
        "{} records",
        got.len()
    );
}

#[test]
fn records_in_flight_of_a_task_that_chaining_removed_are_refused_not_dropped() {
    let storage = exactly_engine::storage::CheckpointStorage::in_memory();
    let sink = CollectSink::new();
    let gate = new_gate();
    let id = checkpoint_with_records_in_flight(&storage, &gate, &sink);

    // At parallelism 1 the gate is chained behind the source: its records in flight
    // would be lost, so the restore is refused, naming them.
    let err = forward_job(&storage, 1, &gate, &sink, "gate", None)
        .run()
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("checkpoint {}", id.0))
            && msg.contains("records in flight of task 'gate'")
            && msg.contains("old parallelism"),
        "{msg}"
    );
    // At the old parallelism it restores and finishes exactly once.
    let report = forward_job(&storage, 2, &gate, &sink, "gate", None)
        .run()
        .unwrap();
    assert_eq!(report.restored_from, Some(id));
    all_records_once(&sink);
}

#[test]
fn records_in_flight_follow_a_renamed_task_without_state() {
    let storage = exactly_engine::storage::CheckpointStorage::in_memory();
    let sink = CollectSink::new();
    let gate = new_gate();
    let id = checkpoint_with_records_in_flight(&storage, &gate, &sink);
    // The gate (a map: no state of its own) renamed on purpose: its backlog goes with
    // it and is replayed.
    let report = forward_job(&storage, 2, &gate, &sink, "gate-v2", Some("gate"))
        .run()
        .unwrap();
    assert_eq!(report.restored_from, Some(id));
    all_records_once(&sink);
}

/// A sender that emits far more before its barrier than a channel holds (one source
/// batch fans out into 500 batches): the capture reads ahead at most a channel's
/// capacity of batches and processes those before reading on, so memory stays bounded,
/// and the checkpoint still completes with every record once.
#[test]
fn reading_ahead_holds_at_most_a_channels_capacity() {
    const SEEDS: u64 = 64;
    const FAN: u64 = 500;
    const SMALL: usize = 4;
    let gate = new_gate();
    let sink = CollectSink::new();
    let job = Job::builder("read-ahead")
        .checkpoint_storage("memory://")
        .parallelism(1)
        .batch_size(BATCH)
        .channel_capacity(SMALL)
        .unaligned_checkpoints()
        .restart_policy(RestartPolicy::none())
        .build()
        .unwrap();
    job.source("seeds", VecSource::new((0..SEEDS).collect()))
        .flat_map(|s: u64| s * FAN..(s + 1) * FAN)
        .key_by(|r: &u64| r % 7)
        .process(gate.clone())
        .name("gated")
        .map(|o: (u64, u64, u64)| o.1)
        .sink("out", sink.clone());
    let handle = job.start().unwrap();
    // The gate's first batch of permits is used: the operator waits inside its second
    // batch, and the source inside the fan-out of its first, with the channel full.
    until(|| gate.processed.load(Ordering::SeqCst) == BATCH as u64);
    let id = std::thread::scope(|s| {
        let asked = s.spawn(|| handle.checkpoint());
        // A batch at a time until the operator has seen the checkpoint and reads ahead,
        // then twenty more while it does; then everything may run.
        let peak = || {
            (handle.metrics())
                .get("gated.read_ahead_peak_batches")
                .copied()
                .unwrap_or(0)
        };
        let mut given = BATCH as u64;
        let mut step = |batches: u64| {
            given += batches * BATCH as u64;
            gate.permits
                .fetch_add(batches * BATCH as u64, Ordering::SeqCst);
            until(|| gate.processed.load(Ordering::SeqCst) >= given);
        };
        while peak() == 0 {
            step(1);
            std::thread::sleep(Duration::from_millis(2));
        }
        step(20);
        gate.open.store(true, Ordering::SeqCst);
        asked.join().unwrap()
    })
    .unwrap();
    let report = handle.wait().unwrap();
    let stats = (report.checkpoints.iter())
        .find(|c| c.id == id)
        .expect("the asked checkpoint is reported");
    assert!(
        !stats.unaligned_tasks.is_empty(),
        "the checkpoint went unaligned"
    );
    let peak = report.metrics["gated.read_ahead_peak_batches"];
    println!(
        "read ahead at most {peak} batches; {} bytes in flight stored",
        stats.inflight_bytes
    );
    assert!(
        (1..=SMALL as u64).contains(&peak),
        "{peak} batches read ahead at once; the channel holds {SMALL}"
    );
    let mut got = sink.committed();
    got.sort_unstable();
    assert!(
        got == (0..SEEDS * FAN).collect::<Vec<u64>>(),
        "{} outputs for {} records",
        got.len(),
        SEEDS * FAN
    );
}
