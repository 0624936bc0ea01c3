//! Checkpoints under backpressure: aligned, unaligned and with an alignment timeout.
//!
//! A generator feeds a keyed operator that spins ~`EXACTLY_BENCH_SLOW_NS` (default
//! 40,000 ns) per record, so the operator is the bottleneck and the channels in front
//! of it stay full: an aligned barrier waits behind that backlog, an unaligned one
//! overtakes it. Checkpoints every `EXACTLY_BENCH_INTERVAL_MS` (default 1,000 ms), for
//! `EXACTLY_BENCH_SECONDS` (default 20) of input per mode, batches of
//! `EXACTLY_BENCH_BATCH` records (default 1024) and `EXACTLY_BENCH_CAPACITY` batches per
//! channel (default 16, the engine's default). Prints per mode: events/s
//! per core, median and p99 checkpoint duration, median commit latency (trigger to
//! output committed), median alignment, bytes in flight stored per checkpoint.
//!
//! Then the cost of each mode without a slow operator: the keyed running sum over 100K
//! keys (`EXACTLY_BENCH_EVENTS`, default 100M), checkpoints every second, events/s per
//! core.
//!
//! `cargo bench --bench backpressure`

#[path = "common/mod.rs"]
mod common;

use common::{cores, env_num, listing, periodic, spread_key, CountSink};
use exactly::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const PARALLELISM: usize = 2;
const SUM: ValueState<i64> = ValueState::new("sum");

#[derive(Clone, Serialize, Deserialize)]
struct Event {
    key: u64,
    amount: i64,
}

/// Adds each amount to its key's sum, spinning `spin_ns` per record first.
#[derive(Clone)]
struct Slow {
    spin_ns: u64,
}

impl KeyedProcessFunction<u64, Event> for Slow {
    type Out = i64;
    fn process(&mut self, e: Event, ctx: &mut KeyedContext<'_, u64, i64>) -> Result<(), BoxError> {
        if self.spin_ns > 0 {
            let t = Instant::now();
            while (t.elapsed().as_nanos() as u64) < self.spin_ns {
                std::hint::spin_loop();
            }
        }
        let s = ctx.value(SUM)?.unwrap_or(0) + e.amount;
        ctx.set_value(SUM, &s)?;
        ctx.emit(s);
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Aligned,
    Unaligned,
    Timeout(Duration),
}

impl Mode {
    fn label(self) -> String {
        match self {
            Mode::Aligned => "aligned".into(),
            Mode::Unaligned => "unaligned".into(),
            Mode::Timeout(t) => format!("timeout {t:?}"),
        }
    }
}

fn run(
    events: u64,
    keys: u64,
    spin_ns: u64,
    interval: Duration,
    mode: Mode,
) -> (Duration, JobReport) {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Job::builder("backpressure")
        .checkpoint_storage(dir.path().to_str().unwrap())
        .batch_size(env_num("EXACTLY_BENCH_BATCH", 1024) as usize)
        .channel_capacity(env_num("EXACTLY_BENCH_CAPACITY", 16) as usize)
        .parallelism(PARALLELISM)
        .checkpoint_every(interval);
    b = match mode {
        Mode::Aligned => b,
        Mode::Unaligned => b.unaligned_checkpoints(),
        Mode::Timeout(t) => b.aligned_checkpoint_timeout(t),
    };
    let job = b.build().unwrap();
    let sink = CountSink::<i64>::default();
    job.source(
        "events",
        GeneratorSource::new(events, move |i| Event {
            key: spread_key(i, keys),
            amount: (i % 100) as i64,
        })
        .with_splits(PARALLELISM as u64),
    )
    .key_by(|e: &Event| e.key)
    .process(Slow { spin_ns })
    .name("slow")
    .sink("count", sink.clone());
    let t = Instant::now();
    let report = job.run().unwrap();
    let elapsed = t.elapsed();
    assert_eq!(
        sink.committed.load(Ordering::Relaxed),
        events,
        "every event committed once"
    );
    (elapsed, report)
}

fn pct(mut v: Vec<Duration>, p: usize) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn main() {
    if listing() {
        return;
    }
    let cores = cores();
    let spin_ns = env_num("EXACTLY_BENCH_SLOW_NS", 40_000);
    let interval = Duration::from_millis(env_num("EXACTLY_BENCH_INTERVAL_MS", 1_000));
    let seconds = env_num("EXACTLY_BENCH_SECONDS", 20);
    // The slow operator handles about PARALLELISM / spin events per second.
    let events = seconds * 1_000_000_000 / spin_ns.max(1) * PARALLELISM as u64;
    let modes = [
        Mode::Aligned,
        Mode::Unaligned,
        Mode::Timeout(Duration::from_millis(20)),
    ];
    println!(
        "backpressured: {events} events into a keyed operator spinning {spin_ns} ns per record, \
         parallelism {PARALLELISM}, {cores} cores, checkpoints every {interval:?}, batches of {}, \
         {} batches per channel",
        env_num("EXACTLY_BENCH_BATCH", 1024),
        env_num("EXACTLY_BENCH_CAPACITY", 16)
    );
    for mode in modes {
        let (elapsed, r) = run(events, 10_000, spin_ns, interval, mode);
        let eps = events as f64 / elapsed.as_secs_f64();
        let unaligned = periodic(&r, |c| !c.unaligned_tasks.is_empty())
            .into_iter()
            .filter(|u| *u)
            .count();
        let mut inflight = periodic(&r, |c| c.inflight_bytes);
        inflight.sort();
        println!(
            "{:>14}: {:>9.0} events/s per core, {} checkpoints ({unaligned} unaligned), checkpoint median {:?} p99 {:?}, commit latency median {:?} p99 {:?}, alignment median {:?}, in flight median {} bytes max {} bytes",
            mode.label(),
            eps / cores as f64,
            r.checkpoints.len(),
            pct(periodic(&r, |c| c.duration), 50),
            pct(periodic(&r, |c| c.duration), 99),
            pct(periodic(&r, |c| c.end_to_end), 50),
            pct(periodic(&r, |c| c.end_to_end), 99),
            pct(periodic(&r, |c| c.max_alignment), 50),
            inflight.get(inflight.len() / 2).copied().unwrap_or(0),
            inflight.last().copied().unwrap_or(0),
        );
    }
    let events = env_num("EXACTLY_BENCH_EVENTS", 100_000_000);
    println!("without backpressure: keyed running sum, {events} events, 100K keys, checkpoints every 1 s");
    for mode in modes {
        let (elapsed, r) = run(events, 100_000, 0, Duration::from_secs(1), mode);
        let eps = events as f64 / elapsed.as_secs_f64();
        println!(
            "{:>14}: {:>10.0} events/s per core, checkpoint median {:?}",
            mode.label(),
            eps / cores as f64,
            pct(periodic(&r, |c| c.duration), 50),
        );
    }
}
