//! Helpers shared by the benchmarks (`#[path]`-included; each bench uses some).
#![allow(dead_code)]

use std::time::Duration;

/// `cargo bench --list` and `cargo test --benches` must not run a benchmark.
pub fn listing() -> bool {
    std::env::args().any(|a| a == "--list" || a == "--test")
}

/// A number from the environment, or `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Cores of this machine.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The median of `v` (zero when empty).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}
