//! The cost of the part-file formats: a generated stream of ledger-like records
//! (parallelism 2, checkpoint every 250 ms) into `FileSink` as JSON lines, CSV and
//! Parquet. Prints records/s (total and per core), bytes committed, and checkpoint
//! durations; every record is read back and counted, so a format that loses rows fails
//! the run.
//!
//! `cargo bench --bench file_formats`; `EXACTLY_BENCH_EVENTS` sets the record count.

#[path = "common/mod.rs"]
mod common;

use common::{cores, env_num, listing, median, periodic};
use exactly::prelude::*;
use exactly::sinks::RecordEncoder;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};

const PARALLELISM: usize = 2;

#[derive(Clone, Serialize, Deserialize)]
struct Posting {
    seq: u64,
    account: String,
    amount_cents: i64,
    balance_cents: i64,
    currency: String,
}

fn posting(i: u64) -> Posting {
    Posting {
        seq: i,
        account: format!(
            "acct-{:06}",
            i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 100_000
        ),
        amount_cents: (i % 20_000) as i64 - 10_000,
        balance_cents: (i as i64).wrapping_mul(31) % 1_000_000,
        currency: "EUR".into(),
    }
}

/// Committed records and bytes of the part files in `dir`.
fn committed(dir: &Path) -> (u64, u64) {
    let (mut rows, mut bytes) = (0, 0);
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if !p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("part-")
        {
            continue;
        }
        let data = std::fs::read(&p).unwrap();
        bytes += data.len() as u64;
        rows += if p.extension().is_some_and(|e| e == "parquet") {
            exactly::sinks::parquet::read_records::<Posting>(bytes::Bytes::from(data))
                .unwrap()
                .0
                .len() as u64
        } else {
            data.iter().filter(|&&b| b == b'\n').count() as u64
        };
    }
    (rows, bytes)
}

fn run<E: RecordEncoder<Posting>>(events: u64, encoder: E) -> (Duration, JobReport, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let job = Job::builder("formats")
        .checkpoint_storage(tmp.path().join("chk").to_str().unwrap())
        .checkpoint_every(Duration::from_millis(250))
        .parallelism(PARALLELISM)
        .build()
        .unwrap();
    job.source(
        "postings",
        GeneratorSource::new(events, posting).with_splits(PARALLELISM as u64),
    )
    .sink("out", FileSink::with_encoder(&out, encoder));
    let t = Instant::now();
    let report = job.run().unwrap();
    let elapsed = t.elapsed();
    let (rows, bytes) = committed(&out);
    assert_eq!(rows, events, "every record committed once");
    (elapsed, report, bytes)
}

fn main() {
    if listing() {
        return;
    }
    let events = env_num("EXACTLY_BENCH_EVENTS", 5_000_000);
    let cores = cores();
    println!("part-file formats: {events} records of 5 fields into FileSink, parallelism {PARALLELISM}, checkpoint every 250 ms, {cores} cores");
    let report = |label: &str, (elapsed, report, bytes): (Duration, JobReport, u64)| {
        let eps = events as f64 / elapsed.as_secs_f64();
        let durations = periodic(&report, |c| c.duration);
        println!(
            "{label:>10}: {eps:>10.0} records/s ({:>9.0} per core), {:>6.1} MB committed ({:.1} bytes/record), {} checkpoints, median periodic checkpoint {}",
            eps / cores as f64,
            bytes as f64 / 1e6,
            bytes as f64 / events as f64,
            report.checkpoints.len(),
            if durations.is_empty() {
                "(none, only the final one)".to_string()
            } else {
                format!("{:?}", median(durations))
            },
        );
    };
    report("JSON lines", run(events, JsonLines));
    report("CSV", run(events, Csv));
    report(
        "Parquet",
        run(events, Parquet::<Posting>::for_type().unwrap()),
    );
}
