//! Kill-and-restore: the `ledger` example runs as a child process over 1,000,000 events
//! and is SIGKILLed at random moments, then started again, until it finishes. Its
//! committed output must equal a failure-free run's exactly.
//!
//! `EXACTLY_KILL_EVENTS`, `EXACTLY_KILL_MIN` and `EXACTLY_KILL_SEED` change the size,
//! the minimum number of kills and the random seed (printed, for reproduction).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Build the example with the same cargo profile as this test and return its path.
fn ledger_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile-dir>/deps/kill_restore-<hash>
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev".to_string(),
        other => other.to_string(),
    };
    let status = Command::new(env!("CARGO"))
        .args(["build", "--example", "ledger", "--profile", &profile])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the ledger example failed");
    profile_dir.join("examples").join("ledger")
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// All committed output lines, sorted; panics if staging was left behind.
fn committed_lines(out: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for e in std::fs::read_dir(out).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            lines.extend(
                std::fs::read_to_string(&p)
                    .unwrap()
                    .lines()
                    .map(String::from),
            );
        }
    }
    let staging = out.join(".staging/balances");
    let leftover: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    assert!(
        leftover.is_empty(),
        "staged files left after a finished run: {leftover:?}"
    );
    lines.sort_unstable();
    lines
}

/// Bytes of committed part files: a cheap progress measure.
fn committed_bytes(out: &Path) -> u64 {
    std::fs::read_dir(out)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn run_args<'a>(input: &'a Path, out: &'a Path, chk: &'a Path) -> Vec<String> {
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
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn sigkilled_job_commits_exactly_the_failure_free_output() {
    let events = env_num("EXACTLY_KILL_EVENTS", 1_000_000);
    let min_kills = env_num("EXACTLY_KILL_MIN", 12);
    let mut seed = env_num(
        "EXACTLY_KILL_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    println!("seed {seed} (set EXACTLY_KILL_SEED to reproduce)");
    let bin = ledger_binary();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("payments.jsonl");
    let ok = Command::new(&bin)
        .args([
            "generate",
            "--events",
            &events.to_string(),
            "--accounts",
            "20000",
            "--seed",
            "7",
            "--out",
        ])
        .arg(&input)
        .status()
        .unwrap();
    assert!(ok.success());

    // Failure-free run.
    let (gold_out, gold_chk) = (tmp.path().join("gold-out"), tmp.path().join("gold-chk"));
    let t = Instant::now();
    let ok = Command::new(&bin)
        .args(run_args(&input, &gold_out, &gold_chk))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let clean = t.elapsed();
    let golden = committed_lines(&gold_out);
    let golden_bytes = committed_bytes(&gold_out);
    assert_eq!(golden.len() as u64, events, "one output line per event");

    // The same run, killed with SIGKILL until it finishes. Kills are placed at random
    // progress points spread over the whole run (plus a random delay within the
    // checkpoint cycle), and a quarter of the starts are killed during startup and
    // recovery, so the number of kills does not depend on how fast this machine is.
    let (out, chk) = (tmp.path().join("chaos-out"), tmp.path().join("chaos-chk"));
    let mut targets: Vec<u64> = (0..min_kills)
        .map(|_| 2 + xorshift(&mut seed) % 79)
        .collect();
    targets.sort_unstable();
    let mut kills = 0u64;
    let mut early_kills = 0u64;
    let mut kill_points = Vec::new();
    let percent = |out: &Path| committed_bytes(out) * 100 / golden_bytes.max(1);
    while !targets.is_empty() {
        assert!(kills < 20 * min_kills, "no progress after {kills} kills");
        let mut child = Command::new(&bin)
            .args(run_args(&input, &out, &chk))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if xorshift(&mut seed) % 4 == 0 {
            std::thread::sleep(Duration::from_millis(xorshift(&mut seed) % 40));
            early_kills += 1;
        } else {
            while percent(&out) < targets[0] {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "the run finished ({status}) before reaching {}% committed",
                        targets[0]
                    );
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(xorshift(&mut seed) % 25));
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run finished ({status}) before kill {}", kills + 1);
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        kills += 1;
        let now = percent(&out);
        kill_points.push(format!("{now}%"));
        // One target per kill: a target already passed means the next start is killed
        // right away, i.e. during recovery.
        targets.remove(0);
    }
    let status = Command::new(&bin)
        .args(run_args(&input, &out, &chk))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "final uninterrupted run failed: {status}");
    println!("committed output at each kill: {}", kill_points.join(" "));
    let got = committed_lines(&out);
    let missing = golden.iter().filter(|l| golden_missing(&got, l)).count();
    println!(
        "survived {kills} SIGKILLs ({early_kills} during startup or recovery; clean run {clean:?}); \
         committed {} lines, golden {}, missing {missing}",
        got.len(),
        golden.len()
    );
    assert_eq!(
        got.len(),
        golden.len(),
        "duplicates or losses in committed output"
    );
    assert!(
        got == golden,
        "committed output differs from the failure-free run"
    );
    // And the example's own verifier, which recomputes balances without the engine.
    let verify = Command::new(&bin)
        .arg("verify")
        .arg("--input")
        .arg(&input)
        .arg("--out")
        .arg(&out)
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
}

fn golden_missing(got: &[String], line: &String) -> bool {
    got.binary_search(line).is_err()
}
