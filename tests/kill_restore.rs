//! Kill-and-restore: the `ledger` example runs as a child process over 1,000,000 events
//! and is SIGKILLed at random moments, then started again, until it finishes. Its
//! committed output must equal a failure-free run's exactly.
//!
//! `EXACTLY_KILL_EVENTS`, `EXACTLY_KILL_MIN` and `EXACTLY_CHAOS_SEED` change the size,
//! the minimum number of kills and the random seed (printed, for reproduction).

mod common;

use common::{
    committed_bytes, committed_lines, env_num, example_binary, kill_at_progress, leftover_staging,
    xorshift, Start,
};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

fn run_args(input: &Path, out: &Path, chk: &Path, state: &str, pace_us: u64) -> Vec<String> {
    [
        "run",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--checkpoints",
        chk.to_str().unwrap(),
        "--interval-ms",
        "20",
        "--parallelism",
        "2",
        "--state",
        state,
        "--pace-us",
        &pace_us.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn sigkilled_job_commits_exactly_the_failure_free_output() {
    kill_and_restore("memory", |tmp, name| tmp.join(name));
}

/// The same on the RocksDB backend (incremental checkpoints; the golden run uses it too).
#[cfg(feature = "rocksdb")]
#[test]
fn sigkilled_job_with_rocksdb_state() {
    kill_and_restore("rocksdb", |tmp, name| tmp.join(name));
}

/// The same with checkpoints in the S3-compatible server `scripts/test.sh` starts.
#[cfg(feature = "s3")]
#[test]
fn sigkilled_job_with_s3_checkpoints() {
    let bucket = exactly::testing::s3_test_bucket();
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    kill_and_restore("memory", move |_, name| {
        std::path::PathBuf::from(format!("s3://{bucket}/kill-restore-{run}/{name}"))
    });
}

/// Golden run, then a run killed at random progress points until it finishes; the
/// committed outputs must be identical. `checkpoints` names each run's checkpoint
/// location (a directory or an `s3://` URL).
fn kill_and_restore(state: &str, checkpoints: impl Fn(&Path, &str) -> std::path::PathBuf) {
    let events = env_num("EXACTLY_KILL_EVENTS", 1_000_000);
    let min_kills = env_num("EXACTLY_KILL_MIN", 12);
    let mut seed = common::seed();
    let bin = example_binary("ledger", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("payments.jsonl");
    common::generate(
        &bin,
        &[
            "--events",
            &events.to_string(),
            "--accounts",
            "20000",
            "--seed",
            "7",
            "--out",
        ],
        &input,
    );

    // Failure-free run.
    let (gold_out, gold_chk) = (
        tmp.path().join("gold-out"),
        checkpoints(tmp.path(), "gold-chk"),
    );
    let t = Instant::now();
    let ok = Command::new(&bin)
        .args(run_args(&input, &gold_out, &gold_chk, state, 0))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let clean = t.elapsed();
    let golden = committed_lines(&gold_out);
    assert!(leftover_staging(&gold_out).is_empty());
    let golden_bytes = committed_bytes(&gold_out);
    assert_eq!(golden.len() as u64, events, "one output line per event");

    // The same run, killed with SIGKILL until it finishes. Kills are placed at random
    // progress points spread over the whole run (plus a random delay within the
    // checkpoint cycle), and a quarter of the starts are killed during startup and
    // recovery, so the number of kills does not depend on how fast this machine is.
    //
    // A run can outrun its kill: where checkpoints are slow (a loaded machine, slow
    // fsync) one checkpoint commits a large share of the output, and the run ends before
    // the next target is reached. Such a round is a finished kill-and-restore run, so
    // its output is checked like the last one; the remaining kills then go to a new
    // round in fresh directories with slower sources (at most 5 rounds).
    let mut targets: Vec<u64> = (0..min_kills)
        .map(|_| 2 + xorshift(&mut seed) % 79)
        .collect();
    targets.sort_unstable();
    let mut kills = 0u64;
    let mut early_kills = 0u64;
    let mut kill_points = Vec::new();
    let mut round = 0u64;
    let mut pace_us = 0u64;
    let dirs = |round: u64| {
        (
            tmp.path().join(format!("chaos{round}-out")),
            checkpoints(tmp.path(), &format!("chaos{round}-chk")),
        )
    };
    let (mut out, mut chk) = dirs(round);
    let percent = |out: &Path| committed_bytes(out) * 100 / golden_bytes.max(1);
    while !targets.is_empty() {
        assert!(kills < 20 * min_kills, "no progress after {kills} kills");
        let mut child = Command::new(&bin)
            .args(run_args(&input, &out, &chk, state, pace_us))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = kill_at_progress(&mut child, &mut seed, targets[0], 40, || percent(&out));
        if let Start::Finished(status) = start {
            assert!(status.success(), "run of round {round} failed: {status}");
            kill_points.push("end".to_string());
            println!(
                "round {round} finished before reaching its kill at {}% (pacing {pace_us} us); \
                 checking its output",
                targets[0]
            );
            check_committed(&bin, &input, &out, &golden);
            round += 1;
            assert!(
                round < 5,
                "every round finished before its kill, the last with {pace_us} us of source \
                 pacing per batch; give the test more input"
            );
            pace_us = (pace_us * 2).max(250);
            (out, chk) = dirs(round);
            continue;
        }
        kills += 1;
        early_kills += u64::from(matches!(start, Start::Killed { early: true }));
        kill_points.push(format!("{}%", percent(&out)));
        // One target per kill: a target already passed means the next start is killed
        // right away, i.e. during recovery.
        targets.remove(0);
    }
    let status = Command::new(&bin)
        .args(run_args(&input, &out, &chk, state, pace_us))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "final uninterrupted run failed: {status}");
    println!("committed output at each kill: {}", kill_points.join(" "));
    let lines = check_committed(&bin, &input, &out, &golden);
    println!(
        "survived {kills} SIGKILLs in {} round(s) ({early_kills} during startup or recovery; \
         clean run {clean:?}); committed {lines} lines, golden {}",
        round + 1,
        golden.len()
    );
}

/// The committed output under `out` of a finished run must equal the failure-free run's
/// `golden` lines, leave no staged file behind and pass the example's own verifier,
/// which recomputes balances without the engine. Returns the number of lines.
fn check_committed(bin: &Path, input: &Path, out: &Path, golden: &[String]) -> usize {
    let got = committed_lines(out);
    let left = leftover_staging(out);
    assert!(
        left.is_empty(),
        "staged files left after a finished run: {left:?}"
    );
    let missing = golden.iter().filter(|l| golden_missing(&got, l)).count();
    assert_eq!(
        got.len(),
        golden.len(),
        "duplicates or losses in committed output ({missing} golden lines missing)"
    );
    assert!(
        got == golden,
        "committed output differs from the failure-free run ({missing} golden lines missing)"
    );
    let verify = Command::new(bin)
        .arg("verify")
        .arg("--input")
        .arg(input)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    println!("{report}");
    assert!(
        verify.status.success()
            && report.contains("duplicates: 0")
            && report.contains("missing: 0"),
        "{report}"
    );
    got.len()
}

fn golden_missing(got: &[String], line: &String) -> bool {
    got.binary_search(line).is_err()
}
