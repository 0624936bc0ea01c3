//! Keyed running-sum throughput: 1M distinct keys, parallelism 2, local checkpoint
//! directory, on the in-memory and the RocksDB state backend. Prints events/s (total
//! and per core) with checkpointing off (final checkpoint only) and every second, plus
//! checkpoint durations and bytes uploaded per checkpoint.
//!
//! `cargo bench --bench throughput`; `EXACTLY_BENCH_EVENTS` sets the event count and
//! `EXACTLY_BENCH_KEYS` the number of distinct keys (state size);
//! `EXACTLY_BENCH_ROUNDS` repeats the cases alternately and summarises what
//! checkpointing costs (throughput lost and CPU per event added, median of the rounds).
//! Without
//! the `rocksdb` feature only the in-memory cases run.

#[path = "common/mod.rs"]
mod common;

use common::{cores, cpu_time, env_num, listing, median, periodic, spread_key, CountSink};
use exactly::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const SUM: ValueState<i64> = ValueState::new("sum");
const PARALLELISM: usize = 2;

#[derive(Clone, Serialize, Deserialize)]
struct Event {
    key: u64,
    amount: i64,
}

#[derive(Clone)]
struct RunningSum;

impl KeyedProcessFunction<u64, Event> for RunningSum {
    type Out = (u64, i64);
    fn process(
        &mut self,
        e: Event,
        ctx: &mut KeyedContext<'_, u64, (u64, i64)>,
    ) -> Result<(), BoxError> {
        let s = ctx.value(SUM)?.unwrap_or(0) + e.amount;
        ctx.set_value(SUM, &s)?;
        ctx.emit((e.key, s));
        Ok(())
    }
}

/// Distinct keys: `EXACTLY_BENCH_KEYS`, 1M by default.
fn keys() -> u64 {
    env_num("EXACTLY_BENCH_KEYS", 1_000_000).max(1)
}

fn run(events: u64, interval: Option<Duration>, backend: StateBackend) -> (Duration, JobReport) {
    let dir = tempfile::tempdir().unwrap();
    run_on(dir.path().to_str().unwrap(), events, interval, backend)
}

/// Run the pipeline on checkpoint storage `url` (a run on storage that holds the final
/// checkpoint of a finished run restores it and has nothing left to process).
fn run_on(
    url: &str,
    events: u64,
    interval: Option<Duration>,
    backend: StateBackend,
) -> (Duration, JobReport) {
    let mut b = Job::builder("bench")
        .checkpoint_storage(url)
        .parallelism(PARALLELISM)
        .state_backend(backend);
    if let Some(i) = interval {
        b = b.checkpoint_every(i);
    }
    let job = b.build().unwrap();
    let sink = CountSink::<(u64, i64)>::default();
    let keys = keys();
    job.source(
        "events",
        GeneratorSource::new(events, move |i| Event {
            key: spread_key(i, keys),
            amount: (i % 100) as i64,
        })
        .with_splits(PARALLELISM as u64),
    )
    .key_by(|e: &Event| e.key)
    .process(RunningSum)
    .name("running-sum")
    .sink("count", sink.clone());
    let t = Instant::now();
    let report = job.run().unwrap();
    let elapsed = t.elapsed();
    if report.restored_from.is_none() {
        assert_eq!(
            sink.committed.load(Ordering::Relaxed),
            events,
            "every event committed once"
        );
    }
    (elapsed, report)
}

/// Recovery time of the 1M-key state: run once, then restore its final checkpoint.
fn recovery(url: &str, events: u64) -> Duration {
    run_on(url, events, None, StateBackend::Memory);
    let (_, report) = run_on(url, events, None, StateBackend::Memory);
    assert!(report.restored_from.is_some());
    report.recovery_time
}

/// The middle value (the upper one of an even count).
fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    if listing() {
        return;
    }
    let events = env_num("EXACTLY_BENCH_EVENTS", 10_000_000);
    let cores = cores();
    let keys = keys();
    println!("keyed running sum: {events} events, {keys} distinct keys, parallelism {PARALLELISM}, {cores} cores");
    let every = Some(Duration::from_secs(1));
    let mut cases = vec![
        ("memory, no checkpoints", None, StateBackend::Memory),
        ("memory, every 1 s", every, StateBackend::Memory),
    ];
    if cfg!(feature = "rocksdb") {
        cases.push(("rocksdb, no checkpoints", None, StateBackend::rocksdb()));
        cases.push(("rocksdb, every 1 s", every, StateBackend::rocksdb()));
    }
    // Rounds alternate the cases, so a slow spell of the machine falls on both; the
    // summary compares each case with checkpoints with the one just before it.
    let rounds = env_num("EXACTLY_BENCH_ROUNDS", 1).max(1);
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 1..=rounds {
        if rounds > 1 {
            println!("round {round} of {rounds}");
        }
        for (i, (label, interval, backend)) in cases.iter().enumerate() {
            let cpu = cpu_time();
            let (elapsed, report) = run(events, *interval, backend.clone());
            let cpu_ns = (cpu_time() - cpu).as_nanos() as f64 / events as f64;
            let eps = events as f64 / elapsed.as_secs_f64();
            rates[i].push(eps / cores as f64);
            cpus[i].push(cpu_ns);
            let durations = periodic(&report, |c| c.duration);
            let pauses = periodic(&report, |c| c.max_sync_pause);
            let uploaded = periodic(&report, |c| c.uploaded_bytes);
            let last = report.checkpoints.last().unwrap();
            println!(
                "{label:>24}: {:>10.0} events/s ({:>9.0} events/s per core, {cpu_ns:.1} ns CPU per event), {} checkpoints, median checkpoint {:?} (median synchronous pause {:?}, mean upload {} bytes), final checkpoint {:?} ({} bytes of state)",
                eps,
                eps / cores as f64,
                report.checkpoints.len(),
                median(if durations.is_empty() { vec![last.duration] } else { durations }),
                median(if pauses.is_empty() { vec![last.max_sync_pause] } else { pauses }),
                uploaded.iter().sum::<u64>() / uploaded.len().max(1) as u64,
                last.duration,
                last.state_bytes,
            );
        }
    }
    if rounds > 1 {
        // Cases come in pairs: checkpoints off, then every second.
        for pair in (0..cases.len()).step_by(2) {
            let (off, on) = (pair, pair + 1);
            let loss: Vec<f64> = (0..rounds as usize)
                .map(|r| 100.0 * (1.0 - rates[on][r] / rates[off][r]))
                .collect();
            let cpu: Vec<f64> = (0..rounds as usize)
                .map(|r| 100.0 * (cpus[on][r] / cpus[off][r] - 1.0))
                .collect();
            println!(
                "{:>24}: median of {rounds} rounds {:.0} events/s per core off, {:.0} every 1 s; checkpointing costs {:.1} % of the throughput (rounds: {}) and {:.1} % more CPU per event (rounds: {})",
                cases[on].0.split(',').next().unwrap_or(""),
                median_f64(rates[off].clone()),
                median_f64(rates[on].clone()),
                median_f64(loss.clone()),
                list(&loss),
                median_f64(cpu.clone()),
                list(&cpu),
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    println!(
        "{:>24}: {:?} to read and restore the {keys}-key state from a local directory",
        "recovery",
        recovery(dir.path().to_str().unwrap(), events)
    );
    match std::env::var("EXACTLY_BENCH_S3") {
        Ok(prefix) => println!(
            "{:>24}: {:?} from {prefix} (AWS_* environment)",
            "recovery from S3",
            recovery(&prefix, events)
        ),
        Err(_) => println!(
            "{:>24}: not measured; set EXACTLY_BENCH_S3=s3://bucket/prefix and AWS_*",
            "recovery from S3"
        ),
    }
}
