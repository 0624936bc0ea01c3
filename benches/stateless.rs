//! Stateless throughput: a map and a filter between a generator of 32-byte payment events
//! and a counting two-phase-commit sink, parallelism 2 (chained: no exchange), with
//! checkpointing off (final checkpoint only) and every second. The same pipeline without
//! the map and filter shows how much of the time is the source and the sink. Prints
//! events/s (total and per core); every run asserts the committed count against a plain
//! loop over the input.
//!
//! `cargo bench --bench stateless`; `EXACTLY_BENCH_EVENTS` sets the event count.

#[path = "common/mod.rs"]
mod common;

use common::{cores, env_num, listing, median, periodic, CountSink};
use exactly::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const PARALLELISM: usize = 2;

#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Payment {
    id: u64,
    account: u32,
    currency: u32,
    cents: i64,
    ts: i64,
}

// Every field is computed and stored into the batch the sink receives (through a call
// the compiler cannot see through); the counting sink just does not read them.
#[allow(dead_code)]
#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Converted {
    account: u32,
    euro_cents: i64,
    ts: i64,
}

fn payment(i: u64) -> Payment {
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    Payment {
        id: i,
        account: (h >> 40) as u32 % 100_000,
        currency: (h >> 20) as u32 % 4,
        cents: (h % 20_000) as i64 - 5_000,
        ts: (i / 1_000) as i64,
    }
}

/// A currency conversion (Nexmark q1's shape).
fn convert(p: Payment) -> Converted {
    let rate = [100, 92, 79, 15_000][p.currency as usize];
    Converted {
        account: p.account,
        euro_cents: p.cents * rate / 100,
        ts: p.ts + (p.id & 1) as i64,
    }
}

/// Debits only (about a quarter of the events).
fn kept(c: &Converted) -> bool {
    c.euro_cents < 0
}

fn main() {
    if listing() {
        return;
    }
    let events = env_num("EXACTLY_BENCH_EVENTS", 1_000_000_000);
    let cores = cores();
    println!("stateless: {events} generated events, parallelism {PARALLELISM}, {cores} cores");
    let expected_kept = (0..events).filter(|&i| kept(&convert(payment(i)))).count() as u64;
    for (pipeline, with_ops) in [("source and sink only", false), ("map + filter", true)] {
        for (label, interval) in [("off", None), ("every 1 s", Some(Duration::from_secs(1)))] {
            let dir = tempfile::tempdir().unwrap();
            let mut b = Job::builder("stateless")
                .checkpoint_storage(dir.path().to_str().unwrap())
                .parallelism(PARALLELISM);
            if let Some(i) = interval {
                b = b.checkpoint_every(i);
            }
            let job = b.build().unwrap();
            let source = job.source(
                "payments",
                GeneratorSource::new(events, payment).with_splits(PARALLELISM as u64),
            );
            let committed = if with_ops {
                let sink = CountSink::<Converted>::default();
                source.map(convert).filter(kept).sink("count", sink.clone());
                sink.committed
            } else {
                let sink = CountSink::<Payment>::default();
                source.sink("count", sink.clone());
                sink.committed
            };
            let t = Instant::now();
            let report = job.run().unwrap();
            let elapsed = t.elapsed();
            let expected = if with_ops { expected_kept } else { events };
            assert_eq!(
                committed.load(Ordering::Relaxed),
                expected,
                "every record committed once"
            );
            let eps = events as f64 / elapsed.as_secs_f64();
            let durations = periodic(&report, |c| c.duration);
            println!(
                "{pipeline:>20}, checkpoints {label:>9}: {eps:>12.0} events/s ({:>11.0} per core), {} checkpoints, median checkpoint {:?}",
                eps / cores as f64,
                report.checkpoints.len(),
                median(durations),
            );
        }
    }
}
