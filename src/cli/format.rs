//! Times, sizes and per-checkpoint totals for humans.

use exactly::engine::manifest::Manifest;
use std::collections::HashSet;

/// Milliseconds since the Unix epoch as a UTC time, `2026-12-04 10:22:02.456 UTC`.
pub fn utc(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || format!("{ms} ms after the Unix epoch"),
            |t| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string(),
        )
}

/// A byte count in binary units, `812 B`, `12.3 KiB`, `4.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// What a checkpoint holds and what it cost.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Task files (stateless tasks have none).
    pub task_files: usize,
    /// Distinct shared files referenced.
    pub shared_files: usize,
    /// Bytes of the task files plus the distinct shared files: what a restore reads.
    pub state_bytes: u64,
    /// Bytes this checkpoint wrote (shared files of earlier checkpoints excluded).
    pub uploaded: u64,
}

/// Totals of `m`; a shared file referenced by several tasks counts once.
pub fn totals(m: &Manifest) -> Totals {
    let mut shared = HashSet::new();
    let mut t = Totals::default();
    for task in &m.tasks {
        if !task.path.is_empty() {
            t.task_files += 1;
            t.state_bytes += task.size;
        }
        t.uploaded += task.uploaded;
        for f in &task.shared {
            if shared.insert(f.path.as_str()) {
                t.shared_files += 1;
                t.state_bytes += f.size;
            }
        }
    }
    t
}

/// `1 file`, `2 files`.
pub fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc(1_764_843_722_456), "2025-12-04 10:22:02.456 UTC");
        assert_eq!(count(1, "task"), "1 task");
        assert_eq!(count(3, "task"), "3 tasks");
    }
}
