//! The RocksDB backend end to end: incremental checkpoints through a real job, shared
//! files kept exactly as long as a retained checkpoint references them, a restart from
//! a crash in the middle of the stream, and a restore from a real S3-compatible server
//! (started by `scripts/test.sh`) after the local working directory is wiped.
#![cfg(feature = "rocksdb")]

mod common;

use exactly_engine::manifest::Manifest;
use exactly_engine::prelude::*;
use exactly_engine::state::RocksDbConfig;
use exactly_engine::testing::{CollectSink, VecSource};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

const KEYS: u64 = 20_000;
const EVENTS: u64 = 300_000;
/// Batches each source split reads per completed checkpoint: with 586 batches a split,
/// a crash after checkpoint 2 lands before batch 301, and a run restored there takes
/// at least 3 checkpoints more, on any machine.
const BATCHES_PER_CHECKPOINT: u32 = 100;

fn events() -> Vec<(u64, i64)> {
    (0..EVENTS)
        .map(|i| ((i * 7919) % KEYS, (i % 11) as i64))
        .collect()
}

fn run(
    chk: &str,
    local: &Path,
    crash_after: Option<u64>,
    out: &CollectSink<(u64, i64)>,
) -> Result<JobReport, Error> {
    let mut b = Job::builder("rocks-job")
        .checkpoint_storage(chk)
        .checkpoint_every(Duration::from_millis(30))
        .retain_checkpoints(2)
        .parallelism(2)
        .batch_size(256)
        .source_batches_per_checkpoint(BATCHES_PER_CHECKPOINT)
        .restart_policy(RestartPolicy::none())
        .state_backend(StateBackend::RocksDb(RocksDbConfig {
            local_dir: Some(local.to_path_buf()),
            write_buffer_size: 1 << 20,
            // Small enough that the cache evicts and writes through between barriers.
            cache_bytes: 16 << 10,
        }));
    if let Some(n) = crash_after {
        b = b.inject_failure_after_checkpoint(n);
    }
    let job = b.build()?;
    let events = job.source("events", VecSource::new(events()).with_splits(2));
    common::running_sum(&events).sink("out", out.clone());
    job.run()
}

/// Every manifest in the checkpoint directory, and the shared files on disk.
fn storage_view(chk: &Path) -> (Vec<Manifest>, BTreeSet<String>) {
    let mut manifests = Vec::new();
    for e in std::fs::read_dir(chk.join("manifests")).unwrap() {
        let p = e.unwrap().path();
        let id: u64 = p.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let bytes = std::fs::read(&p).unwrap();
        manifests
            .push(Manifest::from_bytes(&bytes, CheckpointId(id), p.to_str().unwrap()).unwrap());
    }
    let shared = std::fs::read_dir(chk.join("shared"))
        .map(|d| {
            d.map(|e| format!("shared/{}", e.unwrap().file_name().to_str().unwrap()))
                .collect()
        })
        .unwrap_or_default();
    (manifests, shared)
}

/// Sums without failures, computed directly.
fn golden() -> Vec<(u64, i64)> {
    let mut sums: BTreeMap<u64, i64> = BTreeMap::new();
    let mut golden: Vec<(u64, i64)> = events()
        .into_iter()
        .map(|(k, v)| {
            let s = sums.entry(k).or_default();
            *s += v;
            (k, *s)
        })
        .collect();
    golden.sort();
    golden
}

/// The crash-and-restore job: the first run crashes after `CRASH_AFTER` checkpoints,
/// the second restores and finishes.
fn crash_and_restore(chk: &Path, local: &Path, out: &CollectSink<(u64, i64)>) -> JobReport {
    const CRASH_AFTER: u64 = 2;
    let chk_url = chk.to_str().unwrap();
    let err = run(chk_url, local, Some(CRASH_AFTER), out).expect_err("the first run crashes");
    assert!(err.to_string().contains("injected failure"), "{err}");
    let report = run(chk_url, local, None, out).unwrap();
    assert!(report.restored_from.is_some(), "the second run restores");
    assert_eq!(
        out.sorted(),
        golden(),
        "committed output equals the failure-free result"
    );
    assert!(
        report.checkpoints.len() >= 3,
        "the restored run reads at most {BATCHES_PER_CHECKPOINT} batches a split per checkpoint"
    );
    report
}

#[test]
fn incremental_checkpoints_crash_restore_and_shared_file_retention() {
    let tmp = tempfile::tempdir().unwrap();
    let (chk, local) = (tmp.path().join("chk"), tmp.path().join("local"));
    let report = crash_and_restore(&chk, &local, &CollectSink::new());

    // Incremental: after the first checkpoint of the run, checkpoints upload less than
    // the state they reference.
    let cps = &report.checkpoints;
    let incremental = cps
        .iter()
        .filter(|c| c.uploaded_bytes < c.state_bytes / 2)
        .count();
    assert!(
        incremental > 0,
        "no checkpoint was incremental: {:?}",
        cps.iter()
            .map(|c| (c.uploaded_bytes, c.state_bytes))
            .collect::<Vec<_>>()
    );

    // Retention: exactly the files the two retained manifests reference are left.
    let (manifests, on_disk) = storage_view(&chk);
    assert_eq!(manifests.len(), 2, "retain_checkpoints(2)");
    let referenced: BTreeSet<String> = manifests
        .iter()
        .flat_map(|m| {
            m.tasks
                .iter()
                .flat_map(|t| t.shared.iter().map(|f| f.path.clone()))
        })
        .collect();
    assert!(!referenced.is_empty());
    assert_eq!(
        on_disk, referenced,
        "shared files on disk vs referenced by retained checkpoints"
    );

    // A finished job leaves nothing in its working directory.
    assert!(
        !local.exists(),
        "the working directory of a finished job is removed"
    );
}

/// A replacement machine: checkpoints in S3, the crashed run's working directory gone.
#[test]
fn restore_from_s3_after_the_working_directory_is_wiped() {
    let bucket = exactly_engine::testing::s3_test_bucket();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let url = format!("s3://{bucket}/tests/rocks-wipe-{nanos}");
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("local");
    let out = CollectSink::new();
    let err = run(&url, &local, Some(2), &out).expect_err("the first run crashes");
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(
        local.join("cache").read_dir().unwrap().next().is_some(),
        "files were cached"
    );
    std::fs::remove_dir_all(&local).unwrap();
    let report = run(&url, &local, None, &out).unwrap();
    assert!(
        report.restored_from.is_some(),
        "the second run restores from S3"
    );
    assert_eq!(
        out.sorted(),
        golden(),
        "committed output equals the failure-free result"
    );
}
