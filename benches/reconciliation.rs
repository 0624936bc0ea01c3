//! The reconciliation job end to end: generated input with 5 % redeliveries and 2 %
//! anomalies, three sources, dedup, reconciliation, ledger windows and balances, three
//! exactly-once file sinks, a checkpoint every second. Prints events/s (total and per
//! core) and checkpoint figures; the verifier must pass.
//!
//! `cargo bench --bench reconciliation`; `EXACTLY_BENCH_TRIPS` sets the size,
//! `EXACTLY_BENCH_AT_LEAST_ONCE=1` checkpoints without alignment,
//! `EXACTLY_BENCH_ALIGNED_TIMEOUT_MS=<ms>` lets checkpoints go unaligned after that
//! long (0: always).

#[path = "../examples/reconciliation/generator.rs"]
mod generator;
// The benchmark reads and writes files only: the Kafka side goes unused here.
#[path = "../examples/reconciliation/job.rs"]
#[allow(dead_code)]
mod job;
#[path = "../examples/reconciliation/model.rs"]
mod model;
#[path = "../examples/reconciliation/verifier.rs"]
#[allow(dead_code)]
mod verifier;

use std::time::{Duration, Instant};

/// The allocator the README recommends for jobs that allocate per record.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let trips: u64 = std::env::var("EXACTLY_BENCH_TRIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    let g = generator::generate(
        &generator::GenConfig {
            trips,
            seed: 3,
            duplicate_rate: 0.05,
            out_of_order_ms: 30_000,
            anomaly_rate: 0.02,
            files: 2,
        },
        &input,
    )
    .unwrap();
    let cfg = job::JobConfig {
        parallelism: 2,
        checkpoint_every: Duration::from_secs(1),
        out_of_order: Duration::from_secs(30),
        batch_size: 1024,
        pacing: None,
        ledger_pg: None,
        savepoint_on_stop: None,
        from_savepoint: None,
        max_parallelism: 128,
        at_least_once: std::env::var("EXACTLY_BENCH_AT_LEAST_ONCE").is_ok_and(|v| v == "1"),
        // `EXACTLY_BENCH_ALIGNED_TIMEOUT_MS=0`: unaligned checkpoints.
        aligned_timeout: std::env::var("EXACTLY_BENCH_ALIGNED_TIMEOUT_MS")
            .ok()
            .map(|v| Duration::from_millis(v.parse().expect("milliseconds"))),
    };
    let io = job::Io::Files {
        input: input.clone(),
        out: dir.path().join("out"),
    };
    let checkpoints = dir.path().join("checkpoints");
    let j = job::job(
        "reconciliation",
        checkpoints.to_str().unwrap(),
        &cfg,
        &io,
        None,
    )
    .unwrap();
    job::build(&j, &io, &cfg).unwrap();
    let t = Instant::now();
    let report = j.run().unwrap();
    let elapsed = t.elapsed();
    let v = verifier::verify(&input, &dir.path().join("out"), None).unwrap();
    v.print();
    assert!(v.passed(), "the benchmark run must verify");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let eps = g.events as f64 / elapsed.as_secs_f64();
    let mut d: Vec<Duration> = report.checkpoints.iter().map(|c| c.duration).collect();
    d.sort();
    let mut p: Vec<Duration> = report
        .checkpoints
        .iter()
        .map(|c| c.max_sync_pause)
        .collect();
    p.sort();
    let mut a: Vec<Duration> = report.checkpoints.iter().map(|c| c.max_alignment).collect();
    a.sort();
    let unaligned = report
        .checkpoints
        .iter()
        .filter(|c| !c.unaligned_tasks.is_empty())
        .count();
    let mut inflight: Vec<u64> = report
        .checkpoints
        .iter()
        .map(|c| c.inflight_bytes)
        .collect();
    inflight.sort();
    println!(
        "reconciliation{}: {trips} trips, {} events ({} redelivered, {} anomalies) in {:.2}s: {:.0} events/s ({:.0} per core on {cores} cores), {} checkpoints ({unaligned} unaligned, median {} bytes in flight), median checkpoint {:?}, p99 {:?}, median synchronous pause {:?}, median alignment {:?}, largest state {} bytes; verified",
        match (cfg.at_least_once, cfg.aligned_timeout) {
            (true, _) => " (at least once)".to_string(),
            (false, Some(t)) => format!(" (unaligned after {t:?})"),
            (false, None) => String::new(),
        },
        g.events,
        g.duplicates,
        g.anomalies,
        elapsed.as_secs_f64(),
        eps,
        eps / cores as f64,
        report.checkpoints.len(),
        inflight[inflight.len() / 2],
        d[d.len() / 2],
        d[(d.len() * 99 / 100).min(d.len() - 1)],
        p[p.len() / 2],
        a[a.len() / 2],
        report.checkpoints.iter().map(|c| c.state_bytes).max().unwrap_or(0),
    );
}
