//! Helpers for tests that run example jobs as child processes.
#![allow(dead_code)]

pub mod gated;
#[cfg(feature = "kafka")]
pub mod kafka;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

/// Build example `name` with the same cargo profile as the running test (and `features`)
/// and return the binary's path.
pub fn example_binary(name: &str, features: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile-dir>/deps/<test>-<hash>
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev".to_string(),
        other => other.to_string(),
    };
    // Paths from the environment at run time, not `env!`: a target directory shared by
    // two clones (CI's and a work tree) reuses a test binary built in the other clone,
    // whose compiled-in manifest directory may no longer exist.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::current_dir().unwrap());
    // The example gets the features this test was built with, and those it asks for:
    // with the test command's `--all-features` that is one build for tests and examples.
    let mut features = features.to_vec();
    for (on, feature) in [
        (cfg!(feature = "s3"), "s3"),
        (cfg!(feature = "rocksdb"), "rocksdb"),
        (cfg!(feature = "postgres"), "postgres"),
        (cfg!(feature = "kafka"), "kafka"),
        (cfg!(feature = "parquet"), "parquet"),
        (cfg!(feature = "failpoints"), "failpoints"),
    ] {
        if on && !features.contains(&feature) {
            features.push(feature);
        }
    }
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--example", name, "--profile", &profile]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let status = cmd.current_dir(&manifest_dir).status().expect("cargo runs");
    assert!(status.success(), "building example {name} failed");
    profile_dir.join("examples").join(name)
}

/// Run an example's input generator, `bin generate <args> <target>` (the last flag in
/// `args` names the target), and require it to succeed.
pub fn generate(bin: &Path, args: &[&str], target: &Path) {
    let status = Command::new(bin)
        .arg("generate")
        .args(args)
        .arg(target)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the example runs");
    assert!(status.success(), "generating input with {args:?} failed");
}

/// A number from the environment, or `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A seed from `EXACTLY_CHAOS_SEED` or the clock; printed so a failure can be replayed.
pub fn seed() -> u64 {
    let s = env_num(
        "EXACTLY_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    println!("seed {s} (set EXACTLY_CHAOS_SEED to reproduce)");
    s
}

/// xorshift64: small, seeded, good enough to place kills.
pub fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// How one start of a job ended in a kill-at-progress loop.
pub enum Start {
    /// SIGKILLed; `early` when that was during startup or recovery.
    Killed { early: bool },
    /// The job ended by itself first: where checkpoints are slow (a loaded machine,
    /// slow fsync) one checkpoint can commit all the rest.
    Finished(ExitStatus),
}

/// SIGKILL `child` once `progress()` (percent of the output committed) reaches `target`,
/// after a further random delay within a checkpoint cycle; or, one start in four,
/// within `early_ms` of starting, i.e. during startup and recovery. A child that ends
/// by itself first is left alone.
pub fn kill_at_progress(
    child: &mut Child,
    seed: &mut u64,
    target: u64,
    early_ms: u64,
    progress: impl Fn() -> u64,
) -> Start {
    let early = xorshift(seed).is_multiple_of(4);
    let mut finished = None;
    if early {
        std::thread::sleep(Duration::from_millis(xorshift(seed) % early_ms));
    } else {
        while progress() < target {
            finished = child.try_wait().unwrap();
            if finished.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(xorshift(seed) % 25));
    }
    if let Some(status) = finished.or_else(|| child.try_wait().unwrap()) {
        return Start::Finished(status);
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    Start::Killed { early }
}

fn part_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() && !name.starts_with('.') {
            part_files(&p, out);
        } else if p.is_file() && name.starts_with("part-") {
            out.push(p);
        }
    }
}

/// Every committed output line under `dir` (part files of all sinks), each prefixed by
/// its sink directory, sorted.
pub fn committed_lines(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    part_files(dir, &mut files);
    let mut lines = Vec::new();
    for f in files {
        let sink = f
            .parent()
            .unwrap()
            .strip_prefix(dir)
            .unwrap()
            .display()
            .to_string();
        for l in std::fs::read_to_string(&f).unwrap().lines() {
            lines.push(format!("{sink}\t{l}"));
        }
    }
    lines.sort_unstable();
    lines
}

/// Bytes of committed part files under `dir`: a cheap progress measure.
pub fn committed_bytes(dir: &Path) -> u64 {
    let mut files = Vec::new();
    part_files(dir, &mut files);
    files
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Files left in any sink's `.staging` directory under `dir`: after a finished run
/// there must be none.
pub fn leftover_staging(dir: &Path) -> Vec<PathBuf> {
    fn walk(p: &Path, in_staging: bool, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(p) else {
            return;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let path = e.path();
            let staging = in_staging || e.file_name() == ".staging";
            if path.is_dir() {
                walk(&path, staging, out);
            } else if in_staging {
                out.push(path);
            }
        }
    }
    let mut left = Vec::new();
    walk(dir, false, &mut left);
    left
}

/// The ledger pipeline several tests share: source `payments`, each account's running
/// balance in keyed operator `balance` (state `balance`), file sink `balances` into
/// `out`, added to `job`.
pub fn running_balances<S: exactly::prelude::Source<Item = (u32, i64)>>(
    job: &exactly::prelude::Job,
    source: S,
    out: &Path,
) {
    use exactly::prelude::*;
    const BALANCE: ValueState<i64> = ValueState::new("balance");
    job.source("payments", source)
        .key_by(|p| p.0)
        .process_fn(
            |(account, amount), ctx: &mut KeyedContext<'_, u32, (u32, i64)>| {
                let balance = ctx.value(BALANCE)?.unwrap_or(0) + amount;
                ctx.set_value(BALANCE, &balance)?;
                ctx.emit((account, balance));
                Ok(())
            },
        )
        .name("balance")
        .sink("balances", FileSink::exactly_once(out));
}
