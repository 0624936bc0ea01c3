//! Large keyed state on the RocksDB backend: incremental checkpoints and restore.
//!
//! 10M keys with ~100-byte values are loaded into one RocksDB instance; then, between
//! checkpoints, 1 % of the keys change. For every checkpoint this prints the bytes
//! uploaded (which should track the change, not the total), the bytes the checkpoint
//! references, the synchronous pause (flush + hard-linked RocksDB checkpoint: what the
//! task thread waits for) and the checkpoint duration (pause + upload). Then it restores
//! the last checkpoint: on the same machine (valid local files reused) and as a fresh
//! machine would (everything downloaded).
//!
//! This drives the state backend directly (the same calls a keyed operator makes at a
//! barrier), so the change rate between checkpoints is exact. Pipeline throughput on
//! RocksDB vs in-memory is in `cargo bench --bench throughput`.
//!
//! `cargo bench --bench large_state`. `EXACTLY_BENCH_KEYS` (default 10,000,000),
//! `EXACTLY_BENCH_ROUNDS` (default 5); `EXACTLY_BENCH_S3=s3://bucket/prefix` with the
//! `AWS_*` variables adds the same against an S3 server (`scripts/with-s3.sh` starts
//! one).

#[path = "common/mod.rs"]
mod common;

use common::{env_num, listing};
use exactly::engine::ids::{KeyGroupRange, OperatorId, SubtaskIndex};
use exactly::engine::state::{BackendEnv, KeyedState, OperatorSnapshot, StateBackend};
use exactly::engine::storage::CheckpointStorage;
use exactly::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VALUE: ValueState<Vec<u8>> = ValueState::new("value");
const MAX: u16 = 128;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// 100 pseudo-random bytes for `key` in `round` (incompressible, like real payloads).
fn value(key: u64, round: u64, buf: &mut Vec<u8>) {
    buf.clear();
    let mut s = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (round + 1);
    while buf.len() < 100 {
        buf.extend_from_slice(&xorshift(&mut s).to_le_bytes());
    }
    buf.truncate(100);
}

fn set(state: &mut KeyedState<u64>, key: u64, v: &Vec<u8>) {
    state.put(&key, VALUE, v, 0).unwrap();
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn bench(label: &str, storage: CheckpointStorage, keys: u64, rounds: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let env = BackendEnv {
        backend: StateBackend::rocksdb(),
        local_dir: work.path().to_path_buf(),
        storage: storage.clone(),
        rt: rt.handle().clone(),
        completed: Arc::new(AtomicU64::new(0)),
    };
    let all = KeyGroupRange { start: 0, end: MAX };
    let op = OperatorId("bench".into());
    let mut state = KeyedState::open(all, MAX, &op, SubtaskIndex(0), &env, &[]).unwrap();
    let mut v = Vec::new();
    let t = Instant::now();
    for key in 0..keys {
        value(key, 0, &mut v);
        set(&mut state, key, &v);
    }
    let load = t.elapsed();
    println!(
        "[{label}] loaded {keys} keys x 100-byte values in {load:.2?} ({:.0} puts/s)",
        keys as f64 / load.as_secs_f64()
    );
    let mut seed = 0x5eed_u64;
    let mut last = None;
    for round in 0..=rounds {
        let changed = if round == 0 { 0 } else { keys / 100 };
        for _ in 0..changed {
            let key = xorshift(&mut seed) % keys;
            value(key, round, &mut v);
            set(&mut state, key, &v);
        }
        let id = CheckpointId(round + 1);
        let t = Instant::now();
        let view = state.snapshot(id).unwrap();
        let pause = t.elapsed();
        let up = rt
            .block_on(
                view.pending_db
                    .expect("a RocksDB snapshot")
                    .upload(&storage, id),
            )
            .unwrap();
        let duration = t.elapsed();
        env.completed.store(id.0, Ordering::SeqCst);
        let referenced: u64 = up.shared.iter().map(|f| f.size).sum();
        println!(
            "[{label}] checkpoint {id}: {changed:>8} keys changed, uploaded {:>10} of {:>10} referenced ({:>5.1} %), synchronous pause {:>7.1?}, duration {:>8.1?}",
            mib(up.uploaded),
            mib(referenced),
            up.uploaded as f64 * 100.0 / referenced.max(1) as f64,
            pause,
            duration
        );
        last = Some(up.snapshot);
    }
    drop(state);
    let snap = OperatorSnapshot {
        db: last,
        ..Default::default()
    };
    let restore = |what: &str| -> Duration {
        let t = Instant::now();
        let mut s = KeyedState::<u64>::open(
            all,
            MAX,
            &op,
            SubtaskIndex(0),
            &env,
            std::slice::from_ref(&snap),
        )
        .unwrap();
        let elapsed = t.elapsed();
        // Spot-check: every key present.
        for key in (0..keys).step_by((keys / 1000).max(1) as usize) {
            assert_eq!(
                s.get(&key, VALUE, 0).unwrap().map(|v| v.len()),
                Some(100),
                "key {key}"
            );
        }
        println!("[{label}] restore {what}: {elapsed:.2?}");
        elapsed
    };
    restore("on the same machine (local files reused after checksum)");
    std::fs::remove_dir_all(work.path().join("cache")).unwrap();
    restore("on a fresh machine (every file downloaded)");
}

fn main() {
    if listing() {
        return;
    }
    let keys = env_num("EXACTLY_BENCH_KEYS", 10_000_000);
    let rounds = env_num("EXACTLY_BENCH_ROUNDS", 5);
    let dir = tempfile::tempdir().unwrap();
    bench(
        "local directory",
        CheckpointStorage::from_url(dir.path().to_str().unwrap()).unwrap(),
        keys,
        rounds,
    );
    match std::env::var("EXACTLY_BENCH_S3") {
        Ok(prefix) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let url = format!("{}/large-state-{nanos}", prefix.trim_end_matches('/'));
            bench("S3", CheckpointStorage::from_url(&url).unwrap(), keys, rounds);
        }
        Err(_) => println!(
            "[S3] not measured; run `scripts/with-s3.sh cargo bench --bench large_state` (sets EXACTLY_BENCH_S3)"
        ),
    }
}
