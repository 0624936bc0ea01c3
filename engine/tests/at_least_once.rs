//! At-least-once checkpoints: a task keeps reading an input whose barrier arrived while
//! another input's barrier is held up, a failure loses nothing, and the duplicates a
//! restore brings are exactly the records read past a barrier, counted.

use exactly_engine::api::{Source, SourceContext, SourcePoll, SourceReader};
use exactly_engine::error::Result;
use exactly_engine::prelude::*;
use exactly_engine::testing::{CollectSink, VecSource};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const N: u64 = 10_000;

/// A source of one split whose reader `make` builds from the offset to start at.
struct OneSplit<F>(F);

impl<F, R> Source for OneSplit<F>
where
    F: Fn(Option<u64>) -> R + Send + Sync + 'static,
    R: SourceReader<Item = u64, Offset = u64>,
{
    type Item = u64;
    type Offset = u64;
    type Reader = R;
    fn splits(&self) -> Result<Vec<String>> {
        Ok(vec!["0".into()])
    }
    fn open(&self, _: &str, from: Option<u64>, _: &SourceContext) -> Result<R> {
        Ok((self.0)(from))
    }
}

/// Emits `N..N + 10` once its gate opens, blocking inside `poll_batch` until then, so
/// its task cannot inject a barrier (at most a minute, so a failing test ends).
struct BlockedReader {
    gate: Arc<(Mutex<bool>, Condvar)>,
    next: u64,
}

impl SourceReader for BlockedReader {
    type Item = u64;
    type Offset = u64;
    fn poll_batch(&mut self, out: &mut Vec<u64>, _: usize) -> Result<SourcePoll> {
        let (lock, cv) = &*self.gate;
        let _open = cv
            .wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(60), |o| !*o)
            .unwrap();
        if self.next == N + 10 {
            return Ok(SourcePoll::End);
        }
        out.extend(self.next..N + 10);
        self.next = N + 10;
        Ok(SourcePoll::Ready)
    }
    fn offset(&self) -> u64 {
        self.next
    }
}

#[test]
fn an_input_whose_barrier_arrived_keeps_flowing_while_another_is_held_up() {
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let seen_after_barrier = Arc::new(AtomicU64::new(0));
    let job = Job::builder("alo")
        .checkpoint_storage("memory://")
        .checkpoint_every(Duration::from_millis(10))
        .parallelism(1)
        .batch_size(100)
        .at_least_once()
        .build()
        .unwrap();
    let out = CollectSink::new();
    // The second half of `a` is released by the barrier that passes its first half.
    let passed = Gate::default();
    let halves = Halves {
        rest: passed.clone(),
        at_half: passed,
    };
    let a = job.source(
        "a",
        OneSplit(move |from: Option<u64>| HalvesReader {
            s: halves.clone(),
            next: from.unwrap_or(0),
        }),
    );
    let blocked = gate.clone();
    let b = job.source(
        "b",
        OneSplit(move |from: Option<u64>| BlockedReader {
            gate: blocked.clone(),
            next: from.unwrap_or(N),
        }),
    );
    let seen = seen_after_barrier.clone();
    a.union(&b)
        .map(move |x| {
            if (N / 2..N).contains(&x) {
                seen.fetch_add(1, Ordering::SeqCst);
            }
            x
        })
        .sink("out", out.clone());
    let handle = job.start().unwrap();
    // The second half of `a` is behind a checkpoint barrier whose counterpart on `b`
    // cannot come while `b` is held: aligned, the union would not read it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen_after_barrier.load(Ordering::SeqCst) < N / 2 {
        assert!(
            Instant::now() < deadline,
            "records behind the barrier were not read while the other input was held up ({} of {})",
            seen_after_barrier.load(Ordering::SeqCst),
            N / 2
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    let report = handle.wait().unwrap();
    // The union aligned its first checkpoint from `a`'s barrier to `b`'s, after the wait.
    assert!(
        report.checkpoints[0].max_alignment > Duration::ZERO,
        "{:?}",
        report.checkpoints[0]
    );
    let expected: Vec<u64> = (0..N + 10).collect();
    assert_eq!(
        out.sorted(),
        expected,
        "without a failure: each record once"
    );
}

fn numbers(chk: &str, crash_after: Option<u64>, out: &CollectSink<u64>) -> Result<JobReport> {
    let mut b = Job::builder("alo")
        .checkpoint_storage(chk)
        .checkpoint_every(Duration::from_millis(20))
        .parallelism(2)
        .batch_size(64)
        // 157 batches a split: the crash after checkpoint 3 lands before batch 65.
        .source_batches_per_checkpoint(16)
        .restart_policy(RestartPolicy::none())
        .at_least_once();
    if let Some(n) = crash_after {
        b = b.inject_failure_after_checkpoint(n);
    }
    let job = b.build()?;
    let data: Vec<u64> = (0..20_000).collect();
    job.source("numbers", VecSource::new(data).with_splits(2))
        .key_by(|x| x % 13)
        .process_fn(|x, ctx: &mut KeyedContext<'_, u64, u64>| {
            ctx.emit(x);
            Ok(())
        })
        .name("pass")
        .sink("out", out.clone());
    job.run()
}

#[test]
fn a_failure_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let chk = dir.path().to_str().unwrap();
    let out = CollectSink::new();
    let err = numbers(chk, Some(3), &out).unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    let report = numbers(chk, None, &out).unwrap();
    assert!(report.restored_from.is_some());
    let mut got = out.sorted();
    got.dedup();
    assert_eq!(
        got,
        (0..20_000).collect::<Vec<u64>>(),
        "every record committed at least once"
    );
}

/// A gate a test opens once; readers poll it.
#[derive(Clone, Default)]
struct Gate(Arc<AtomicBool>);

impl Gate {
    fn open(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn is_open(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Emits `0..N/2`, then nothing (idle, so a barrier can pass) until `rest` opens, then
/// `N/2..N`. `at_half` hears when an offset was taken at `N/2`: a barrier passed there.
#[derive(Clone)]
struct Halves {
    rest: Gate,
    at_half: Gate,
}

struct HalvesReader {
    s: Halves,
    next: u64,
}

impl SourceReader for HalvesReader {
    type Item = u64;
    type Offset = u64;
    fn poll_batch(&mut self, out: &mut Vec<u64>, max: usize) -> Result<SourcePoll> {
        let end = if self.next < N / 2 {
            N / 2
        } else if self.s.rest.is_open() {
            N
        } else {
            return Ok(SourcePoll::Idle);
        };
        if self.next == N {
            return Ok(SourcePoll::End);
        }
        let to = end.min(self.next + max as u64);
        out.extend(self.next..to);
        self.next = to;
        Ok(SourcePoll::Ready)
    }
    fn offset(&self) -> u64 {
        if self.next == N / 2 {
            self.s.at_half.open();
        }
        self.next
    }
}

/// Emits `N..N + 10` inside a poll that blocks until `first` opens (so no barrier can
/// be injected before them), then nothing until `second` opens, then `N + 10..N + 20`.
#[derive(Clone)]
struct Late {
    first: Arc<(Mutex<bool>, Condvar)>,
    second: Gate,
}

struct LateReader {
    s: Late,
    next: u64,
}

impl SourceReader for LateReader {
    type Item = u64;
    type Offset = u64;
    fn poll_batch(&mut self, out: &mut Vec<u64>, _: usize) -> Result<SourcePoll> {
        let to = if self.next < N + 10 {
            let (lock, cv) = &*self.s.first;
            let _open = cv
                .wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(60), |o| !*o)
                .unwrap();
            N + 10
        } else if self.next < N + 20 && self.s.second.is_open() {
            N + 20
        } else if self.next < N + 20 {
            return Ok(SourcePoll::Idle);
        } else {
            return Ok(SourcePoll::End);
        };
        out.extend(self.next..to);
        self.next = to;
        Ok(SourcePoll::Ready)
    }
    fn offset(&self) -> u64 {
        self.next
    }
}

/// The trade-off of at-least-once, provoked and counted: records that pass an input's
/// barrier while another input's barrier is held up reach the checkpoint's committed
/// output, and a restore from that checkpoint reads them again. After a crash every
/// record is committed, and exactly those records twice.
#[test]
fn after_a_crash_records_read_past_a_barrier_are_duplicated_and_nothing_is_lost() {
    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let (rest, at_half, second) = (Gate::default(), Gate::default(), Gate::default());
    let first = Arc::new((Mutex::new(false), Condvar::new()));
    let seen = Arc::new(AtomicU64::new(0));
    let crash = Arc::new(AtomicBool::new(false));
    let tmp = tempfile::tempdir().unwrap();
    // No periodic checkpoints: the test takes the one it needs.
    let job = Job::builder("alo-dup")
        .checkpoint_storage(tmp.path().to_str().unwrap())
        .parallelism(1)
        .batch_size(100)
        .restart_policy(RestartPolicy::fixed(1, Duration::ZERO))
        .at_least_once()
        .build()
        .unwrap();
    let out = CollectSink::new();
    let halves = Halves {
        rest: rest.clone(),
        at_half: at_half.clone(),
    };
    let a = job.source(
        "a",
        OneSplit(move |from: Option<u64>| HalvesReader {
            s: halves.clone(),
            next: from.unwrap_or(0),
        }),
    );
    let late = Late {
        first: first.clone(),
        second: second.clone(),
    };
    let b = job.source(
        "b",
        OneSplit(move |from: Option<u64>| LateReader {
            s: late.clone(),
            next: from.unwrap_or(N),
        }),
    );
    let (counted, armed) = (seen.clone(), crash.clone());
    a.union(&b)
        .map(move |x| {
            if x >= N + 10 && armed.swap(false, Ordering::SeqCst) {
                panic!("crash at record {x}");
            }
            counted.fetch_add(1, Ordering::SeqCst);
            x
        })
        .sink("out", out.clone());
    let handle = job.start().unwrap();
    wait_for("the first half of a", || {
        seen.load(Ordering::SeqCst) >= N / 2
    });
    let checkpoint = std::thread::scope(|s| {
        let asked = s.spawn(|| handle.checkpoint());
        // a's barrier passes at N/2; b's waits inside its blocked poll.
        wait_for("a's barrier", || at_half.is_open());
        rest.open();
        wait_for("a's second half, past its barrier", || {
            seen.load(Ordering::SeqCst) >= N
        });
        *first.0.lock().unwrap() = true;
        first.1.notify_all();
        asked.join().unwrap()
    })
    .unwrap();
    crash.store(true, Ordering::SeqCst);
    second.open();
    let report = handle.wait().unwrap();
    assert_eq!(report.restarts, 1, "the crash restarted the job once");
    assert_eq!(
        checkpoint.0, 1,
        "the job took no other checkpoint before the crash"
    );

    let mut counts = std::collections::BTreeMap::<u64, u32>::new();
    for x in out.committed() {
        *counts.entry(x).or_default() += 1;
    }
    let missing: Vec<u64> = (0..N + 20).filter(|x| !counts.contains_key(x)).collect();
    assert!(
        missing.is_empty(),
        "{} records lost, from {:?} to {:?}",
        missing.len(),
        missing.first(),
        missing.last()
    );
    let twice: Vec<u64> = counts.iter().filter(|c| *c.1 > 1).map(|c| *c.0).collect();
    println!(
        "{} records committed, {} of them twice (read past a's barrier before b's came)",
        N + 20,
        twice.len()
    );
    assert!(
        counts.values().all(|&c| c <= 2),
        "a record committed 3 times"
    );
    assert!(
        twice == (N / 2..N).collect::<Vec<u64>>(),
        "exactly the records read past a's barrier ({}..{N}) are duplicated, not {} records \
         from {:?} to {:?}",
        N / 2,
        twice.len(),
        twice.first(),
        twice.last()
    );
}
