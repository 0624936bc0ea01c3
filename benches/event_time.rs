//! Event-time operators: tumbling-window count and sum over 1M keys (checkpoints off, then every
//! second; on RocksDB too with the `rocksdb` feature) and dedup over a stream with 10 %
//! duplicates (every second), in-memory state unless said otherwise, local checkpoint
//! directory. Prints events/s (total and per core) and checkpoint figures.
//!
//! `cargo bench --bench event_time`; `EXACTLY_BENCH_EVENTS` sets the event count,
//! `EXACTLY_BENCH_ONLY=window` skips the dedup runs.

use exactly::operators::{AggregateFunction, DedupExt, DedupTime, WindowExt, Windows};
use exactly::prelude::*;
use exactly::testing::CollectSink;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The allocator the README recommends for jobs that allocate per record.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEYS: u64 = 1_000_000;
const PARALLELISM: usize = 2;

#[derive(Clone, Serialize, Deserialize)]
struct Event {
    id: u64,
    key: u64,
    ts: i64,
    amount: i64,
}

/// Count and sum of the amounts, per window.
#[derive(Clone)]
struct CountSum;

impl AggregateFunction<Event> for CountSum {
    type Acc = (u64, i64);
    type Out = (u64, i64);
    fn create(&self) -> (u64, i64) {
        (0, 0)
    }
    fn add(&self, acc: &mut (u64, i64), e: &Event) {
        acc.0 += 1;
        acc.1 += e.amount;
    }
    fn result(&self, acc: &(u64, i64)) -> (u64, i64) {
        *acc
    }
    fn merge(&self, acc: &mut (u64, i64), other: (u64, i64)) {
        acc.0 += other.0;
        acc.1 += other.1;
    }
}

/// Event `i` of `events`. The generator gives each split a contiguous range of `i`, so
/// the timestamp follows `i`'s position inside its split: both splits move through event
/// time together, as the partitions of a topic do. (Timestamps that grew with `i` across
/// the whole run put the second split's events far ahead of the watermark, which is the
/// first split's, and kept all of its windows open until the end.)
fn event(i: u64, events: u64) -> Event {
    // Every tenth event repeats the previous id (a redelivery), so 10 % are duplicates.
    let id = if i % 10 == 9 { i - 1 } else { i };
    let splits = PARALLELISM as u64;
    let split = (0..splits)
        .rev()
        .find(|s| i >= s * events / splits)
        .unwrap_or(0);
    let position = (i - split * events / splits) * splits + split;
    Event {
        id,
        key: i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % KEYS,
        ts: (position / 100) as i64, // 100k events per second of event time
        amount: (i % 100) as i64,
    }
}

fn job(dir: &std::path::Path, interval: Option<Duration>, backend: StateBackend) -> Job {
    let mut b = Job::builder("bench")
        .checkpoint_storage(dir.to_str().unwrap())
        .parallelism(PARALLELISM)
        .state_backend(backend);
    if let Some(i) = interval {
        b = b.checkpoint_every(i);
    }
    b.build().unwrap()
}

fn source(job: &Job, events: u64) -> Stream<Event> {
    job.source(
        "events",
        GeneratorSource::new(events, move |i| event(i, events)).with_splits(PARALLELISM as u64),
    )
    .with_watermarks(WatermarkStrategy::bounded_out_of_orderness(
        Duration::from_secs(1),
        |e: &Event| e.ts,
    ))
}

fn report(label: &str, events: u64, elapsed: Duration, r: &JobReport) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let eps = events as f64 / elapsed.as_secs_f64();
    let mut d: Vec<Duration> = r.checkpoints.iter().map(|c| c.duration).collect();
    d.sort();
    let mut p: Vec<Duration> = r.checkpoints.iter().map(|c| c.max_sync_pause).collect();
    p.sort();
    println!(
        "{label:>34}: {:>10.0} events/s ({:>9.0} per core), {} checkpoints, median checkpoint {:?}, median synchronous pause {:?}, largest state {} bytes",
        eps,
        eps / cores as f64,
        r.checkpoints.len(),
        d[d.len() / 2],
        p[p.len() / 2],
        r.checkpoints.iter().map(|c| c.state_bytes).max().unwrap_or(0),
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let events: u64 = std::env::var("EXACTLY_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    println!("{events} events, {KEYS} keys, parallelism {PARALLELISM}");

    let every = Some(Duration::from_secs(1));
    let mut cases = vec![
        (
            "tumbling count+sum, 1M keys, off",
            None,
            StateBackend::Memory,
        ),
        (
            "tumbling count+sum, 1M keys, 1 s",
            every,
            StateBackend::Memory,
        ),
    ];
    if cfg!(feature = "rocksdb") {
        cases.push((
            "tumbling count+sum, rocksdb, off",
            None,
            StateBackend::rocksdb(),
        ));
        cases.push((
            "tumbling count+sum, rocksdb, 1 s",
            every,
            StateBackend::rocksdb(),
        ));
    }
    for (label, interval, backend) in cases {
        let dir = tempfile::tempdir().unwrap();
        let j = job(dir.path(), interval, backend);
        let out = CollectSink::new();
        source(&j, events)
            .key_by(|e| e.key)
            .window(Windows::tumbling(Duration::from_secs(10)), |e| e.ts)
            .name("window")
            .aggregate(CountSum)
            .results
            .map(|w| w.value)
            .sink("counts", out.clone());
        let t = Instant::now();
        let r = j.run().unwrap();
        let elapsed = t.elapsed();
        let windows = out.committed();
        assert_eq!(
            windows.iter().map(|w| w.0).sum::<u64>(),
            events,
            "every event counted once"
        );
        let amounts: i64 = (0..events).map(|i| (i % 100) as i64).sum();
        assert_eq!(
            windows.iter().map(|w| w.1).sum::<i64>(),
            amounts,
            "every amount summed once"
        );
        report(label, events, elapsed, &r);
    }
    if std::env::var("EXACTLY_BENCH_ONLY").is_ok_and(|v| v == "window") {
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let j = job(
        dir.path(),
        Some(Duration::from_secs(1)),
        StateBackend::Memory,
    );
    let out = CollectSink::new();
    source(&j, events)
        .dedup_by(
            |e| e.id,
            Duration::from_secs(60),
            DedupTime::EventTime(|e: &Event| e.ts),
        )
        .name("dedup")
        .map(|e| e.id)
        .sink("unique", out.clone());
    let t = Instant::now();
    let r = j.run().unwrap();
    let elapsed = t.elapsed();
    assert_eq!(
        r.metrics["dedup.duplicates_dropped"],
        events / 10,
        "exactly the redeliveries dropped"
    );
    assert_eq!(out.committed().len() as u64, events - events / 10);
    report("dedup, 10% duplicates", events, elapsed, &r);
}
