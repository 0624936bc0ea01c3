//! Every stateful operator, golden vs crash-and-restore: a failure-free run at
//! parallelism 1 against a run at parallelism 2 that crashes mid-stream after a
//! checkpoint, is restored at 3, crashes again and finishes at 1. Windows are open and
//! timers pending at each crash. Inputs are out of order within the watermark bound, so
//! no record is late and results do not depend on timing.
//!
//! Every case runs on both state backends (the failure-free run always uses the
//! in-memory one, so the RocksDB cases also compare the backends), and with unaligned
//! checkpoints and an alignment timeout (the failure-free run is always aligned).

use exactly_engine::prelude::*;
use exactly_engine::state::StateBackend;
use exactly_engine::testing::ExactlyOnceCheck;
use exactly_engine::testing::{CollectSink, VecSource};
use exactly_operators::*;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Ev {
    key: u32,
    ts: i64,
    value: i64,
    id: u64,
}

const N: u64 = 40_000;

/// Timestamps advance 10 ms per event with up to 400 ms of disorder; every event with
/// `id % 5 == 0` is delivered twice (for dedup).
fn events() -> Vec<Ev> {
    let mut v = Vec::new();
    for i in 0..N {
        let jitter = ((i * 7919) % 41) as i64 * 10;
        let e = Ev {
            key: (i % 97) as u32,
            ts: i as i64 * 10 + jitter,
            value: (i % 13) as i64,
            id: i,
        };
        if i % 5 == 0 {
            v.push(e.clone());
        }
        v.push(e);
    }
    v
}

fn bounded() -> WatermarkStrategy<Ev> {
    WatermarkStrategy::bounded_out_of_orderness(Duration::from_millis(1_000), |e: &Ev| e.ts)
}

fn source(job: &Job, name: &str, splits: usize) -> Stream<Ev> {
    job.source(name, VecSource::new(events()).with_splits(splits))
        .with_watermarks(bounded())
}

/// The state backend and alignment timeout of the crashing runs.
type Setup = (StateBackend, Option<Duration>);

fn check<T: Data + Ord + std::fmt::Debug>(
    (backend, timeout): Setup,
    name: &str,
    build: impl Fn(&Job, &CollectSink<T>),
) {
    let report = ExactlyOnceCheck {
        state_backend: backend,
        aligned_checkpoint_timeout: timeout,
        ..Default::default()
    }
    .run(name, build)
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    println!(
        "{name}: {} records, survived {} crashes",
        report.golden_records, report.crashes
    );
    assert!(report.golden_records > 0);
    assert_eq!(report.crashes, 2);
}

/// A windowed result, flattened so it sorts and compares.
type Row = (u32, i64, i64, i64);

fn tumbling_window_count(backend: Setup) {
    check(backend, "tumbling", |job, out: &CollectSink<Row>| {
        source(job, "events", 4)
            .filter(|e| e.id % 5 != 0)
            .key_by(|e| e.key)
            .window(Windows::tumbling(Duration::from_millis(2_000)), |e| e.ts)
            .name("tumbling")
            .count()
            .results
            .map(|w| (w.key, w.window.start, w.window.end, w.value as i64))
            .sink("out", out.clone());
    });
}

fn sliding_window_reduce(backend: Setup) {
    check(backend, "sliding", |job, out: &CollectSink<Row>| {
        source(job, "events", 4)
            .key_by(|e| e.key)
            .window(
                Windows::sliding(Duration::from_millis(3_000), Duration::from_millis(1_000)),
                |e| e.ts,
            )
            .name("sliding")
            .reduce(|a, b| Ev {
                value: a.value + b.value,
                ..a
            })
            .results
            .map(|w| (w.key, w.window.start, w.window.end, w.value.value))
            .sink("out", out.clone());
    });
}

fn session_window_count(backend: Setup) {
    check(backend, "session", |job, out: &CollectSink<Row>| {
        source(job, "events", 4)
            // Gaps of 5 s every 15 s, so sessions open and close.
            .filter(|e| (e.ts / 5_000) % 3 != 0)
            .key_by(|e| e.key % 7)
            .window(Windows::session(Duration::from_millis(1_500)), |e| e.ts)
            .name("session")
            .count()
            .results
            .map(|w| (w.key, w.window.start, w.window.end, w.value as i64))
            .sink("out", out.clone());
    });
}

fn full_window_process(backend: Setup) {
    check(backend, "window-process", |job, out: &CollectSink<Row>| {
        source(job, "events", 4)
            .key_by(|e| e.key % 11)
            .window(Windows::tumbling(Duration::from_millis(5_000)), |e| e.ts)
            .name("window-process")
            .process(|_k, _w, records: Vec<Ev>| {
                records.iter().map(|e| e.value * e.value).sum::<i64>()
            })
            .results
            .map(|w| (w.key, w.window.start, w.window.end, w.value))
            .sink("out", out.clone());
    });
}

fn dedup_event_time(backend: Setup) {
    check(backend, "dedup", |job, out: &CollectSink<Ev>| {
        source(job, "events", 4)
            .dedup_by(
                |e| e.id,
                Duration::from_secs(24 * 3600),
                DedupTime::EventTime(|e: &Ev| e.ts),
            )
            .name("dedup")
            .sink("out", out.clone());
    });
}

fn interval_join(backend: Setup) {
    check(
        backend,
        "interval-join",
        |job, out: &CollectSink<(u64, u64)>| {
            let charges = source(job, "charges", 4).filter(|e| e.id % 2 == 0);
            let payouts = source(job, "payouts", 3).filter(|e| e.id % 3 == 0);
            charges
                .key_by(|e| e.key)
                .interval_join(
                    &payouts.key_by(|e| e.key),
                    -300,
                    500,
                    |e| e.ts,
                    |e| e.ts,
                    |c, p| (c.id, p.id),
                )
                .name("interval-join")
                .sink("out", out.clone());
        },
    );
}

fn window_join(backend: Setup) {
    check(
        backend,
        "window-join",
        |job, out: &CollectSink<(u64, u64)>| {
            let left = source(job, "left", 4).filter(|e| e.id % 2 == 0 && e.id % 5 != 0);
            let right = source(job, "right", 2).filter(|e| e.id % 7 == 0 && e.id % 5 != 0);
            left.key_by(|e| e.key)
                .window_join(
                    &right.key_by(|e| e.key),
                    Windows::tumbling(Duration::from_millis(4_000)),
                    |e| e.ts,
                    |e| e.ts,
                    |l, r| (l.id, r.id),
                )
                .name("window-join")
                .sink("out", out.clone());
        },
    );
}

fn running_reduce(backend: Setup) {
    check(backend, "reduce", |job, out: &CollectSink<(u32, i64)>| {
        // A running value depends on per-key order: one split keeps it deterministic.
        let input: Vec<(u32, i64)> = events()
            .into_iter()
            .filter(|e| e.id % 5 != 0)
            .map(|e| (e.key, e.value))
            .collect();
        job.source("events", VecSource::new(input))
            .key_by(|e| e.0)
            .reduce(|a, b| (a.0, a.1 + b.1))
            .name("reduce")
            .sink("out", out.clone());
    });
}

macro_rules! on_backend {
    ($module:ident, $backend:expr) => {
        mod $module {
            use super::*;
            #[test]
            fn tumbling_window_count() {
                super::super::tumbling_window_count($backend);
            }
            #[test]
            fn sliding_window_reduce() {
                super::super::sliding_window_reduce($backend);
            }
            #[test]
            fn session_window_count() {
                super::super::session_window_count($backend);
            }
            #[test]
            fn full_window_process() {
                super::super::full_window_process($backend);
            }
            #[test]
            fn dedup_event_time() {
                super::super::dedup_event_time($backend);
            }
            #[test]
            fn interval_join() {
                super::super::interval_join($backend);
            }
            #[test]
            fn window_join() {
                super::super::window_join($backend);
            }
            #[test]
            fn running_reduce() {
                super::super::running_reduce($backend);
            }
        }
    };
}

mod backend {
    use super::*;
    on_backend!(memory, (StateBackend::Memory, None));
    #[cfg(feature = "rocksdb")]
    on_backend!(rocksdb, (StateBackend::rocksdb(), None));
    on_backend!(
        memory_unaligned,
        (StateBackend::Memory, Some(Duration::ZERO))
    );
    on_backend!(
        memory_alignment_timeout,
        (StateBackend::Memory, Some(Duration::from_millis(1)))
    );
    #[cfg(feature = "rocksdb")]
    on_backend!(
        rocksdb_unaligned,
        (StateBackend::rocksdb(), Some(Duration::ZERO))
    );
}
