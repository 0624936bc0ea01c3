//! Stopping a job on purpose: with a `StopHandle` and with SIGTERM. A stopped job has
//! committed exactly what it read before the stop checkpoint, and the next run resumes
//! from that checkpoint: together they commit a failure-free run's output exactly.

mod common;

use common::gated::{gated, gated_at, open, run_stopped_at_gate};
use common::{committed_lines, example_binary, leftover_staging};
use exactly::operators::{WindowExt, Windows};
use exactly::prelude::*;
use exactly::testing::{ManualClock, VecSource};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const SECOND: Duration = Duration::from_secs(1);

/// Each account's running balance of `source`'s payments into `dir/out`, checkpoints
/// in `dir/checkpoints`. Returns the job (not yet run).
fn ledger<S: Source<Item = (u32, i64)>>(dir: &Path, source: S) -> Job {
    let job = Job::builder("ledger")
        .parallelism(2)
        .checkpoint_storage(dir.join("checkpoints").to_str().unwrap())
        .build()
        .unwrap();
    common::running_balances(&job, source, &dir.join("out"));
    job
}

fn payments(n: u32) -> Vec<(u32, i64)> {
    (0..n).map(|i| (i % 97, i64::from(i) - 500)).collect()
}

/// The committed output of failure-free runs over all of `all` and over its first
/// half (what a job stopped at a half-way gate must have committed).
fn golden_runs(all: &[(u32, i64)]) -> (Vec<String>, Vec<String>) {
    let run = |payments: &[(u32, i64)]| {
        let dir = tempfile::tempdir().unwrap();
        ledger(dir.path(), VecSource::new(payments.to_vec()))
            .run()
            .unwrap();
        committed_lines(&dir.path().join("out"))
    };
    (run(all), run(&all[..all.len() / 2]))
}

#[test]
fn stop_commits_what_was_read_and_the_next_run_resumes_from_its_checkpoint() {
    let all = payments(20_000);
    let (expected, expected_first_half) = golden_runs(&all);

    // The source reads half, then waits at its gate; the stop is asked there, from
    // another thread, while the job runs.
    let dir = tempfile::tempdir().unwrap();
    let (source, gate) = gated(&all);
    let job = ledger(dir.path(), source);
    let report = run_stopped_at_gate(&job, &gate);
    let stopped_at = report
        .stopped_at
        .expect("the job reports its stop checkpoint");
    assert_eq!(
        report.checkpoints.last().map(|c| c.id),
        Some(stopped_at),
        "the stop checkpoint completed"
    );
    assert!(!report.checkpoints.iter().any(|c| c.is_final));
    let out = dir.path().join("out");
    assert_eq!(
        committed_lines(&out),
        expected_first_half,
        "everything read before the stop, and nothing else, is committed"
    );
    assert!(leftover_staging(&out).is_empty(), "nothing staged is left");

    // The next run resumes after the last record read, with its state.
    let (source, gate) = gated(&all);
    open(&gate);
    let report = ledger(dir.path(), source).run().unwrap();
    assert_eq!(report.restored_from, Some(stopped_at));
    assert_eq!(report.stopped_at, None);
    assert_eq!(committed_lines(&out), expected);
}

#[test]
fn a_stop_asked_before_the_run_stops_it_after_recovery() {
    let all = payments(4_000);
    let golden = tempfile::tempdir().unwrap();
    ledger(golden.path(), VecSource::new(all.clone()))
        .run()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The gated source never ends by itself, so only the stop ends this run. Its
    // barrier may come before the first record or after any batch of the first half.
    let (source, _gate) = gated(&all);
    let job = ledger(dir.path(), source);
    job.stop_handle().stop();
    let report = job.run().unwrap();
    let id = report.stopped_at.expect("stopped");
    let (source, gate) = gated(&all);
    open(&gate);
    let report = ledger(dir.path(), source).run().unwrap();
    assert_eq!(report.restored_from, Some(id));
    assert_eq!(
        committed_lines(&dir.path().join("out")),
        committed_lines(&golden.path().join("out"))
    );
}

/// Per-account counts in tumbling event-time windows of `size` (a payment's amount is
/// its timestamp in ms, never decreasing) into `dir/out`.
fn window_counts<S: Source<Item = (u32, i64)>>(
    dir: &Path,
    source: S,
    parallelism: usize,
    size: Duration,
) -> Job {
    let job = Job::builder("windows")
        .parallelism(parallelism)
        .checkpoint_storage(dir.join("checkpoints").to_str().unwrap())
        .build()
        .unwrap();
    job.source("payments", source)
        .with_watermarks(WatermarkStrategy::monotonic(|p: &(u32, i64)| p.1))
        .key_by(|p| p.0)
        .window(Windows::tumbling(size), |p| p.1)
        .name("count")
        .count()
        .results
        .map(|w| (w.key, w.window.start, w.value))
        .sink("counts", FileSink::exactly_once(dir.join("out")));
    job
}

/// A stop does not end event time: windows still open at the stop are not fired with
/// what they hold so far (every committed count is a final one), and fire complete
/// after the restart.
#[test]
fn a_stop_leaves_open_windows_open_until_the_restart() {
    let all = payments(20_000);
    let golden = tempfile::tempdir().unwrap();
    window_counts(golden.path(), VecSource::new(all.clone()), 2, SECOND)
        .run()
        .unwrap();
    let expected = committed_lines(&golden.path().join("out"));

    let dir = tempfile::tempdir().unwrap();
    let (source, gate) = gated(&all);
    let job = window_counts(dir.path(), source, 2, SECOND);
    let report = run_stopped_at_gate(&job, &gate);
    assert!(report.stopped_at.is_some());
    let at_stop = committed_lines(&dir.path().join("out"));
    assert!(
        at_stop.len() < expected.len(),
        "{} of {} windows",
        at_stop.len(),
        expected.len()
    );
    let partial: Vec<&String> = at_stop.iter().filter(|l| !expected.contains(l)).collect();
    assert!(
        partial.is_empty(),
        "windows fired early at the stop: {partial:?}"
    );

    let (source, gate) = gated(&all);
    open(&gate);
    window_counts(dir.path(), source, 2, SECOND).run().unwrap();
    assert_eq!(committed_lines(&dir.path().join("out")), expected);
}

/// Windows open at a stop whose input is all read fire after a restart at another
/// parallelism, though no record reaches them after it: each instance must have a timer
/// for every window its restored key groups hold (tumbling windows register one per
/// window and key group, not one per key).
#[test]
fn open_windows_fire_after_a_rescaled_restart_with_no_new_input() {
    // 2,000 accounts, every payment in the first 10 s window.
    let all: Vec<(u32, i64)> = (0..20_000)
        .map(|i| (i % 2_000, (i % 9_000) as i64))
        .collect();
    let ten = Duration::from_secs(10);
    let golden = tempfile::tempdir().unwrap();
    let (source, gate) = gated_at(&all, all.len() as u64);
    open(&gate);
    window_counts(golden.path(), source, 1, ten).run().unwrap();
    let expected = committed_lines(&golden.path().join("out"));
    assert_eq!(expected.len(), 2_000);

    let dir = tempfile::tempdir().unwrap();
    let (source, gate) = gated_at(&all, all.len() as u64);
    let job = window_counts(dir.path(), source, 1, ten);
    let report = run_stopped_at_gate(&job, &gate);
    assert!(report.stopped_at.is_some());
    assert!(committed_lines(&dir.path().join("out")).is_empty());

    let (source, gate) = gated_at(&all, all.len() as u64);
    open(&gate);
    let report = window_counts(dir.path(), source, 3, ten).run().unwrap();
    assert!(report.restored_from.is_some());
    let got = committed_lines(&dir.path().join("out"));
    assert_eq!(got.len(), expected.len(), "windows fired after the restart");
    assert_eq!(got, expected);
}

/// The `ledger` example under SIGTERM: it exits 0 after its stop checkpoint, and run
/// again it completes the failure-free output exactly.
#[test]
fn sigterm_stops_the_example_with_a_checkpoint_and_exit_code_0() {
    let bin = example_binary("ledger", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("payments.jsonl");
    common::generate(
        &bin,
        &[
            "--events",
            "200000",
            "--accounts",
            "1000",
            "--seed",
            "3",
            "--out",
        ],
        &input,
    );
    let run = |out: &Path, chk: &Path, pace_us: u64| {
        let mut c = Command::new(&bin);
        c.args(["run", "--input", input.to_str().unwrap(), "--out"])
            .arg(out)
            .arg("--checkpoints")
            .arg(chk)
            .args(["--interval-ms", "50", "--pace-us", &pace_us.to_string()])
            .stderr(Stdio::piped());
        c
    };
    let (gold_out, gold_chk) = (tmp.path().join("gold-out"), tmp.path().join("gold-chk"));
    assert!(run(&gold_out, &gold_chk, 0).status().unwrap().success());
    let golden = committed_lines(&gold_out);
    assert_eq!(golden.len(), 200_000);

    let (out, chk) = (tmp.path().join("out"), tmp.path().join("chk"));
    // Paced at 2 ms per batch of 1,024: about 200 s for the whole input, so the
    // signal certainly arrives mid-run; it is sent once the first output is committed.
    let mut child = run(&out, &chk, 2_000).spawn().unwrap();
    let started = std::time::Instant::now();
    while committed_lines(&out).is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "the job ended early");
        assert!(started.elapsed().as_secs() < 120, "no output committed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let ended = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(ended.status.success(), "exit {:?}: {stderr}", ended.status);
    assert!(stderr.contains("stopped with checkpoint"), "{stderr}");
    let partial = committed_lines(&out);
    assert!(
        !partial.is_empty() && partial.len() < golden.len(),
        "{} of {} lines",
        partial.len(),
        golden.len()
    );
    assert!(leftover_staging(&out).is_empty());

    let resumed = run(&out, &chk, 0).output().unwrap();
    assert!(resumed.status.success());
    assert_eq!(committed_lines(&out), golden, "nothing lost or doubled");
}

/// `run()` called from async code (an `async fn main` under `#[tokio::main]`) works on
/// either kind of tokio runtime: the engine's own I/O runtime is not nested in the
/// caller's.
#[test]
fn a_job_runs_inside_a_tokio_runtime() {
    let all = payments(4_000);
    let golden = tempfile::tempdir().unwrap();
    ledger(golden.path(), VecSource::new(all.clone()))
        .run()
        .unwrap();
    let expected = committed_lines(&golden.path().join("out"));
    let runtimes = [
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap(),
    ];
    for rt in runtimes {
        let dir = tempfile::tempdir().unwrap();
        let report = rt
            .block_on(async { ledger(dir.path(), VecSource::new(all.clone())).run() })
            .unwrap();
        assert!(report.checkpoints.last().is_some_and(|c| c.is_final));
        assert_eq!(committed_lines(&dir.path().join("out")), expected);
        // And awaited, on a blocking thread of the caller's runtime.
        let dir = tempfile::tempdir().unwrap();
        let job = ledger(dir.path(), VecSource::new(all.clone()));
        let report = rt.block_on(job.run_async()).unwrap();
        assert!(report.checkpoints.last().is_some_and(|c| c.is_final));
        assert_eq!(committed_lines(&dir.path().join("out")), expected);
    }
}

/// `start()` runs the job on its own thread; the handle stops it with a checkpoint in
/// the middle of its input, and the next run resumes exactly after it.
#[test]
fn a_started_job_stops_with_a_checkpoint_through_its_handle() {
    let all = payments(20_000);
    let (expected, expected_first_half) = golden_runs(&all);

    let dir = tempfile::tempdir().unwrap();
    let (source, gate) = gated(&all);
    // Built here, run on the job's own thread.
    let handle = ledger(dir.path(), source).start().unwrap();
    common::gated::wait_at(&gate);
    assert!(!handle.is_finished(), "it waits at its gate, mid-input");
    // Live counters: the source has read up to its gate.
    assert_eq!(handle.metrics().get("payments.records"), Some(&10_000));
    handle.stop_with_checkpoint();
    // The stop checkpoint is committed before the job ends.
    while !handle.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let last = handle.last_checkpoint().expect("the stop checkpoint");
    assert_eq!(last.metrics.get("payments.records"), Some(&10_000));
    let report = handle.wait().unwrap();
    assert_eq!(report.stopped_at, Some(last.id));
    let out = dir.path().join("out");
    assert_eq!(committed_lines(&out), expected_first_half);

    let (source, gate) = gated(&all);
    open(&gate);
    let report = ledger(dir.path(), source).start().unwrap().wait().unwrap();
    assert!(report.restored_from.is_some());
    assert_eq!(committed_lines(&out), expected);
}

/// `JobHandle::checkpoint()` takes a checkpoint at a known point of the input (here the
/// source's gate, half-way) and returns once it is complete; its output is committed,
/// and a cancelled job's next run resumes from it.
#[test]
fn a_checkpoint_asked_through_the_handle_is_taken_at_once_and_resumed_from() {
    let all = payments(20_000);
    let (expected, expected_first_half) = golden_runs(&all);

    let dir = tempfile::tempdir().unwrap();
    let (source, gate) = gated(&all);
    let handle = ledger(dir.path(), source).start().unwrap();
    common::gated::wait_at(&gate);
    let id = handle.checkpoint().unwrap();
    let storage = exactly::engine::storage::CheckpointStorage::open_existing(
        dir.path().join("checkpoints").to_str().unwrap(),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let manifest = rt.block_on(storage.read_manifest(id)).unwrap();
    assert!(!manifest.is_final, "taken while the job runs");
    // Its output reaches the sink's directory on the commit lane, right after.
    let out = dir.path().join("out");
    let asked = std::time::Instant::now();
    while committed_lines(&out) != expected_first_half {
        assert!(
            asked.elapsed() < Duration::from_secs(60),
            "checkpoint {id}'s output was not committed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.cancel();
    assert!(matches!(handle.wait(), Err(Error::JobCancelled { .. })));

    let (source, gate) = gated(&all);
    open(&gate);
    let report = ledger(dir.path(), source).run().unwrap();
    assert!(
        report.restored_from >= Some(id),
        "{:?}",
        report.restored_from
    );
    assert_eq!(committed_lines(&out), expected);
}

/// With the job's clock set, periodic checkpoints follow that clock, not the wall: a
/// manual clock held still means none come (even every 1 ms), and moving it past the
/// interval triggers exactly one. Checkpoints therefore come exactly when the test says:
/// the ids below leave no room for any other.
#[test]
fn periodic_checkpoints_follow_the_jobs_clock() {
    let all = payments(20_000);
    let (expected, _) = golden_runs(&all);
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(0);
    let job = Job::builder("ledger")
        .parallelism(2)
        .checkpoint_storage(dir.path().join("checkpoints").to_str().unwrap())
        .checkpoint_every(Duration::from_millis(1))
        .clock(clock.clone())
        .build()
        .unwrap();
    let (source, gate) = gated(&all);
    common::running_balances(&job, source, &dir.path().join("out"));
    let handle = job.start().unwrap();
    common::gated::wait_at(&gate);
    // Wait until checkpoint `id` is complete and committed.
    let committed = |id: u64| {
        let asked = std::time::Instant::now();
        while handle
            .last_checkpoint()
            .is_none_or(|c| c.id < CheckpointId(id))
        {
            assert!(
                asked.elapsed() < Duration::from_secs(60),
                "checkpoint {id} did not come"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    // Half the input processed, the clock still: only the checkpoints asked for, each
    // committed before the next is asked (on the wall clock, periodic ones every 1 ms
    // would come in between).
    for id in 1..=5 {
        assert_eq!(handle.checkpoint().unwrap(), CheckpointId(id));
        committed(id);
    }
    clock.advance(Duration::from_millis(1));
    committed(6);
    // One periodic checkpoint, and no other: the clock has not moved since.
    assert_eq!(handle.checkpoint().unwrap(), CheckpointId(7));
    open(&gate);
    let report = handle.wait().unwrap();
    let ids: Vec<u64> = report.checkpoints.iter().map(|c| c.id.0).collect();
    assert_eq!(
        ids,
        [1, 2, 3, 4, 5, 6, 7, 8],
        "5 asked, periodic, asked, final"
    );
    // Statistics stay on the monotonic clock: the still manual clock measures nothing.
    for c in &report.checkpoints {
        assert!(
            c.duration > Duration::ZERO && c.end_to_end >= c.duration,
            "{c:?}"
        );
    }
    assert_eq!(committed_lines(&dir.path().join("out")), expected);
}

/// `cancel()` ends a job without a checkpoint and without restarting it; the next run
/// resumes from the last completed checkpoint and the output ends exactly as a
/// failure-free run's.
#[test]
fn a_cancelled_job_ends_without_restarting_and_the_next_run_completes_it_exactly() {
    let all = payments(20_000);
    let (expected, _) = golden_runs(&all);

    let dir = tempfile::tempdir().unwrap();
    let (source, gate) = gated(&all);
    let handle = ledger(dir.path(), source).start().unwrap();
    common::gated::wait_at(&gate);
    handle.cancel();
    // The source idles at its gate, so only the cancel can end the job. (A bound, not a
    // timing: a cancel that did nothing would otherwise hang the test.)
    let asked = std::time::Instant::now();
    while !handle.is_finished() {
        assert!(
            asked.elapsed() < Duration::from_secs(120),
            "the cancel did not end the job"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    match handle.wait() {
        Err(Error::JobCancelled { job }) => assert_eq!(job, "ledger"),
        other => panic!("expected the job cancelled, got {other:?}"),
    }
    let out = dir.path().join("out");
    assert_ne!(committed_lines(&out), expected, "cancelled before the end");

    let (source, gate) = gated(&all);
    open(&gate);
    let report = ledger(dir.path(), source).start().unwrap().wait().unwrap();
    assert_eq!(report.restarts, 0);
    assert_eq!(committed_lines(&out), expected);
}

/// The reconciliation example upgraded the documented way: the running version is
/// stopped with SIGTERM and keeps its stop checkpoint as a savepoint
/// (`--savepoint-on-stop`); the next one starts from it (`--from-savepoint`). Together
/// they commit the failure-free run's output exactly, and the example's verifier agrees.
#[test]
fn the_reconciliation_example_upgrades_through_a_savepoint_taken_at_sigterm() {
    let bin = example_binary("reconciliation", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let gold = tmp.path().join("gold");
    common::generate(&bin, &["--trips", "20000", "--seed", "5", "--dir"], &gold);
    let run = |dir: &Path, extra: &[&str]| {
        let mut c = Command::new(&bin);
        c.arg("run")
            .arg("--dir")
            .arg(dir)
            .args(["--checkpoint-ms", "50", "--batch-size", "128"])
            .args(extra)
            .stderr(Stdio::piped());
        c
    };
    assert!(run(&gold, &[]).status().unwrap().success());
    let golden = committed_lines(&gold.join("out"));

    let dir = tmp.path().join("upgraded");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(gold.join("input"), dir.join("input")).unwrap();
    // Version 1, paced so that the signal certainly arrives mid-run; it is sent once the
    // first output is committed.
    let mut v1 = run(&dir, &["--pace-us", "3000", "--savepoint-on-stop", "v1"])
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while committed_lines(&dir.join("out")).is_empty() {
        assert!(v1.try_wait().unwrap().is_none(), "the job ended early");
        assert!(started.elapsed().as_secs() < 120, "no output committed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let term = Command::new("kill")
        .args(["-TERM", &v1.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let ended = v1.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(ended.status.success(), "exit {:?}: {stderr}", ended.status);
    assert!(stderr.contains("kept as savepoint 'v1'"), "{stderr}");
    let partial = committed_lines(&dir.join("out"));
    assert!(partial.len() < golden.len(), "stopped mid-run");

    // Version 2 starts from the savepoint and runs to the end.
    let v2 = run(&dir, &["--from-savepoint", "v1"]).output().unwrap();
    assert!(
        v2.status.success(),
        "{}",
        String::from_utf8_lossy(&v2.stderr)
    );
    assert_eq!(
        committed_lines(&dir.join("out")),
        golden,
        "nothing lost or doubled"
    );
    let verify = Command::new(&bin)
        .arg("verify")
        .arg("--dir")
        .arg(&dir)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success() && report.contains("VERIFIED"),
        "{report}"
    );
}
