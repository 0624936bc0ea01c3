//! The chaos suite: the reconciliation job runs as a child process and is crashed by
//! SIGKILL at random moments (restarting at another parallelism each time) and by
//! aborting at every named step of the checkpoint protocol, including during recovery.
//! Each test ends with the committed output identical to a failure-free run, no staged
//! output left behind, and the job's independent verifier passing.
//!
//! Every test runs with aligned checkpoints, and again with unaligned ones (`unaligned`)
//! and with an alignment timeout of 2 ms (`alignment_timeout`); the failure-free run
//! they are compared with is always aligned.
//!
//! `EXACTLY_CHAOS_KILLS` (default 50) sets the number of random kills for soak runs;
//! `EXACTLY_CHAOS_SEED` replays a run.

mod common;

use common::{
    committed_bytes, committed_lines, env_num, example_binary, kill_at_progress, leftover_staging,
    xorshift, Start,
};
use exactly::engine::failpoints;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// How the crashed runs align barriers.
#[derive(Clone, Copy)]
enum Mode {
    Aligned,
    Unaligned,
    Timeout,
}

impl Mode {
    fn args(self) -> &'static [&'static str] {
        match self {
            Mode::Aligned => &[],
            Mode::Unaligned => &["--aligned-checkpoint-timeout-ms", "0"],
            Mode::Timeout => &["--aligned-checkpoint-timeout-ms", "2"],
        }
    }
}

struct Fixture {
    mode: Mode,
    bin: PathBuf,
    tmp: tempfile::TempDir,
    golden: Vec<String>,
    golden_bytes: u64,
}

/// Generate the input and run the job once without failures (aligned).
fn fixture(trips: u64, mode: Mode) -> Fixture {
    let bin = example_binary("reconciliation", &["failpoints"]);
    let tmp = tempfile::tempdir().unwrap();
    let gold = tmp.path().join("gold");
    common::generate(
        &bin,
        &["--trips", &trips.to_string(), "--seed", "11", "--dir"],
        &gold,
    );
    let out = run(&bin, &gold, 2, None, Mode::Aligned);
    assert!(
        out.status.success(),
        "failure-free run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let golden = committed_lines(&gold.join("out"));
    assert!(
        golden.len() as u64 > trips,
        "results, daily totals and balances are committed"
    );
    // Progress is measured on trip results, which are committed steadily over the run
    // (daily totals and balances arrive in a few large steps).
    let golden_bytes = committed_bytes(&gold.join("out/results"));
    Fixture {
        mode,
        bin,
        tmp,
        golden,
        golden_bytes,
    }
}

impl Fixture {
    /// A fresh run directory sharing the generated input.
    fn run_dir(&self, name: &str) -> PathBuf {
        let dir = self.tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(self.tmp.path().join("gold/input"), dir.join("input")).unwrap();
        dir
    }

    /// Finish the job without failures and check it against the golden run.
    fn finish_and_check(&self, dir: &Path) {
        let out = run(&self.bin, dir, 2, None, self.mode);
        assert!(
            out.status.success(),
            "final run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let left = leftover_staging(&dir.join("out"));
        assert!(left.is_empty(), "staged output left behind: {left:?}");
        let got = committed_lines(&dir.join("out"));
        let missing = self
            .golden
            .iter()
            .filter(|l| got.binary_search(l).is_err())
            .count();
        assert_eq!(
            (got.len(), missing),
            (self.golden.len(), 0),
            "committed output differs from the failure-free run"
        );
        assert!(got == self.golden);
        let verify = Command::new(&self.bin)
            .arg("verify")
            .arg("--dir")
            .arg(dir)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&verify.stdout);
        assert!(
            verify.status.success() && report.contains("VERIFIED"),
            "{report}"
        );
        for line in [
            "duplicates in output       0",
            "missing from output        0",
            "ledger sum                 0 cents",
        ] {
            assert!(report.contains(line), "{report}");
        }
    }
}

/// Pause per source batch of 128 events: the run spans many checkpoints, so crashes
/// land mid-run.
const PACE_US: u64 = 8000;

fn run_cmd(
    bin: &Path,
    dir: &Path,
    parallelism: usize,
    crash: Option<&str>,
    pace_us: u64,
    mode: Mode,
) -> Command {
    let mut c = Command::new(bin);
    c.arg("run")
        .arg("--dir")
        .arg(dir)
        .args([
            "--checkpoint-ms",
            "20",
            "--parallelism",
            &parallelism.to_string(),
        ])
        .args(["--batch-size", "128", "--pace-us", &pace_us.to_string()])
        .args(mode.args());
    if let Some(spec) = crash {
        c.env("EXACTLY_CRASH_AT", spec);
    }
    c
}

fn run(bin: &Path, dir: &Path, parallelism: usize, crash: Option<&str>, mode: Mode) -> Output {
    run_cmd(bin, dir, parallelism, crash, PACE_US, mode)
        .output()
        .unwrap()
}

fn random_sigkills_while_rescaling(mode: Mode) {
    let kills_wanted = env_num("EXACTLY_CHAOS_KILLS", 50);
    let f = fixture(40_000, mode);
    let mut seed = common::seed();
    let mut targets: Vec<u64> = (0..kills_wanted)
        .map(|_| 1 + xorshift(&mut seed) % 80)
        .collect();
    targets.sort_unstable();
    let parallelism = [2usize, 3, 1];
    let (mut kills, mut early, mut rescales, mut last_p) = (0u64, 0u64, 0u64, 2usize);
    let mut points = Vec::new();
    // A run that ends before its kill (one slow checkpoint committed the rest) is a
    // finished kill-and-restore run: it is checked, and the remaining kills go to a new
    // round in a fresh directory with slower sources (at most 5 rounds).
    let (mut round, mut pace_us) = (0u64, PACE_US);
    let mut dir = f.run_dir("chaos0");
    let percent =
        |dir: &Path| committed_bytes(&dir.join("out/results")) * 100 / f.golden_bytes.max(1);
    while !targets.is_empty() {
        let p = parallelism[(xorshift(&mut seed) % 3) as usize];
        rescales += u64::from(p != last_p);
        last_p = p;
        let mut child = run_cmd(&f.bin, &dir, p, None, pace_us, mode)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = kill_at_progress(&mut child, &mut seed, targets[0], 30, || percent(&dir));
        if let Start::Finished(s) = start {
            assert!(s.success(), "run of round {round} failed: {s}");
            println!(
                "round {round} finished before its kill at {}% (pacing {pace_us} us); checking it",
                targets[0]
            );
            f.finish_and_check(&dir);
            round += 1;
            assert!(
                round < 5,
                "every round finished before its kill, the last with {pace_us} us of source \
                 pacing per batch; give the test more input"
            );
            pace_us *= 2;
            dir = f.run_dir(&format!("chaos{round}"));
            continue;
        }
        kills += 1;
        early += u64::from(matches!(start, Start::Killed { early: true }));
        points.push(percent(&dir));
        targets.remove(0);
    }
    f.finish_and_check(&dir);
    println!(
        "survived {kills} SIGKILLs in {} round(s) ({early} during startup or recovery, \
         {rescales} restarts at another parallelism); trip results committed at each kill (%): \
         {points:?}; duplicates 0, lost 0",
        round + 1
    );
}

/// Crash the job by aborting at the `nth` hit of `point`, then finish it.
fn crash_at(mode: Mode, point: &str, nth: u64) {
    let f = fixture(30_000, mode);
    let dir = f.run_dir("crash");
    let out = run(&f.bin, &dir, 2, Some(&format!("{point}:{nth}")), mode);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(6),
        "the run must abort at {point}: {}\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains(&format!("fail point {point}: crashing")),
        "{stderr}"
    );
    let committed = committed_bytes(&dir.join("out/results")) * 100 / f.golden_bytes.max(1);
    f.finish_and_check(&dir);
    println!("crashed at {point} (hit {nth}, {committed}% committed), restored: output identical, duplicates 0, lost 0");
}

fn crash_during_recovery(mode: Mode) {
    let f = fixture(30_000, mode);
    let dir = f.run_dir("recovery");
    let first = run(
        &f.bin,
        &dir,
        2,
        Some(&format!("{}:4", failpoints::AFTER_MANIFEST)),
        mode,
    );
    assert_eq!(first.status.signal(), Some(6), "first crash");
    // The restart crashes while restoring; the one after that restores at parallelism 3.
    let second = run(
        &f.bin,
        &dir,
        3,
        Some(&format!("{}:1", failpoints::DURING_RESTORE)),
        mode,
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(
        second.status.signal(),
        Some(6),
        "crash during restore: {stderr}"
    );
    assert!(stderr.contains("recovery::during_restore"), "{stderr}");
    f.finish_and_check(&dir);
    println!("crashed after a manifest, then again during recovery; restored: output identical, duplicates 0, lost 0");
}

macro_rules! in_mode {
    ($module:ident, $mode:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn random_sigkills_while_rescaling() {
                super::random_sigkills_while_rescaling($mode);
            }

            #[test]
            fn crash_after_barrier_injection() {
                crash_at($mode, failpoints::AFTER_BARRIER_INJECTION, 5);
            }

            #[test]
            fn crash_after_state_snapshot() {
                crash_at($mode, failpoints::AFTER_SNAPSHOT, 20);
            }

            #[test]
            fn crash_after_state_upload() {
                crash_at($mode, failpoints::AFTER_STATE_UPLOAD, 20);
            }

            #[test]
            fn crash_after_pre_commit() {
                crash_at($mode, failpoints::AFTER_PRE_COMMIT, 15);
            }

            #[test]
            fn crash_after_manifest_before_sink_commit() {
                crash_at($mode, failpoints::AFTER_MANIFEST, 4);
            }

            #[test]
            fn crash_between_commits_of_two_sink_subtasks() {
                crash_at($mode, failpoints::BETWEEN_COMMITS, 7);
            }

            #[test]
            fn crash_during_retention_cleanup() {
                crash_at($mode, failpoints::DURING_RETENTION, 2);
            }

            #[test]
            fn crash_during_recovery() {
                super::crash_during_recovery($mode);
            }
        }
    };
}

in_mode!(aligned, Mode::Aligned);
in_mode!(unaligned, Mode::Unaligned);
in_mode!(alignment_timeout, Mode::Timeout);

#[test]
fn every_fail_point_has_a_test() {
    let here = include_str!("chaos_reconciliation.rs");
    for p in failpoints::ALL {
        let constant = p.split("::").nth(1).unwrap().to_uppercase();
        assert!(
            here.contains(&format!("failpoints::{constant}")),
            "no crash test for {p}"
        );
    }
}
