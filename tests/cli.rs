//! The `exactly` binary against the checkpoints of a real job: a ledger run stopped
//! half-way (a stop checkpoint) and resumed to its end (the final checkpoint). What the
//! binary prints is compared with what the engine reads from the same storage.
#![cfg(feature = "cli")]

mod common;

use common::gated::{gated, open, run_stopped_at_gate};
use exactly::engine::ids::CheckpointId;
use exactly::engine::manifest::Manifest;
use exactly::engine::storage::CheckpointStorage;
use exactly::prelude::*;
use exactly::testing::{CollectSink, VecSource};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ledger<S: Source<Item = (u32, i64)>>(checkpoints: &Path, out: &Path, source: S) -> Job {
    let job = Job::builder("ledger")
        .parallelism(2)
        .checkpoint_storage(checkpoints.to_str().unwrap())
        .build()
        .unwrap();
    common::running_balances(&job, source, out);
    job
}

/// A scratch directory whose `checkpoints/` holds a stop checkpoint and, as the latest,
/// the final checkpoint of the resumed run.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let payments: Vec<(u32, i64)> = (0..4_000).map(|i| (i % 97, i64::from(i) - 500)).collect();
        let (checkpoints, out) = (dir.path().join("checkpoints"), dir.path().join("out"));
        let (source, gate) = gated(&payments);
        let stopped = run_stopped_at_gate(&ledger(&checkpoints, &out, source), &gate);
        assert!(stopped.stopped_at.is_some());
        let (source, gate) = gated(&payments);
        open(&gate);
        let report = ledger(&checkpoints, &out, source).run().unwrap();
        assert!(report.checkpoints.last().is_some_and(|c| c.is_final));
        Fixture { dir }
    }

    fn checkpoints(&self) -> PathBuf {
        self.dir.path().join("checkpoints")
    }

    fn location(&self) -> String {
        self.checkpoints().to_str().unwrap().to_string()
    }

    fn storage(&self) -> CheckpointStorage {
        CheckpointStorage::open_existing(&self.location()).unwrap()
    }

    /// The completed checkpoints, as the engine lists them.
    fn ids(&self) -> Vec<CheckpointId> {
        rt().block_on(self.storage().scan()).unwrap().0
    }

    fn manifest(&self, id: CheckpointId) -> Manifest {
        rt().block_on(self.storage().read_manifest(id)).unwrap()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Run `exactly <args>`; stdout and stderr as text, and the exit code.
fn exactly(args: &[&str]) -> (String, String, i32) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_exactly"))
        .args(args)
        .output()
        .expect("the binary runs");
    let (stdout, stderr) = (
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    );
    let code = status.code().expect("exited, not killed");
    (stdout, stderr, code)
}

/// The rows of `list`: lines that start with a checkpoint id.
fn rows(stdout: &str) -> Vec<(u64, &str)> {
    stdout
        .lines()
        .filter_map(|l| Some((l.split_whitespace().next()?.parse().ok()?, l)))
        .collect()
}

#[test]
fn list_shows_every_checkpoint_and_marks_the_latest_and_the_final_one() {
    let f = Fixture::new();
    let ids = f.ids();
    assert!(ids.len() >= 2, "a stop and a final checkpoint: {ids:?}");
    let latest = *ids.last().unwrap();
    let (out, err, code) = exactly(&["checkpoints", "list", &f.location()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("checkpoints of job 'ledger'"), "{out}");
    let rows = rows(&out);
    let listed: Vec<u64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(listed, ids.iter().map(|i| i.0).collect::<Vec<_>>(), "{out}");
    let marked = |word: &str| -> Vec<u64> {
        rows.iter()
            .filter(|(_, l)| l.split_whitespace().any(|w| w == word))
            .map(|r| r.0)
            .collect()
    };
    assert_eq!(marked("latest"), vec![latest.0], "{out}");
    assert_eq!(marked("final"), vec![latest.0], "{out}");
    let m = f.manifest(latest);
    // id, date, time, UTC, final, tasks, state (2 words), uploaded (2), pending, latest
    let row: Vec<&str> = rows.last().unwrap().1.split_whitespace().collect();
    assert_eq!(row[5], m.tasks.len().to_string(), "task count: {row:?}");
    assert_eq!(row[10], m.pending_commits.len().to_string(), "{row:?}");
}

#[test]
fn show_prints_the_manifest_readably_and_as_json() {
    let f = Fixture::new();
    let ids = f.ids();
    let latest = *ids.last().unwrap();
    let (out, err, code) = exactly(&["checkpoints", "show", &f.location()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with(&format!(
            "checkpoint {latest} of job 'ledger' (latest, final)"
        )),
        "{out}"
    );
    let m = f.manifest(latest);
    assert!(m.generation > 0);
    assert!(
        out.contains(&format!(
            "  written by       the instance of lease {}",
            m.generation
        )),
        "{out}"
    );
    for task in &m.tasks {
        assert!(
            out.contains(&format!(
                "  {}  subtask {}/{}",
                task.task, task.subtask, task.parallelism
            )),
            "{out}"
        );
        if !task.path.is_empty() {
            assert!(out.contains(&task.path), "{out}");
        }
    }
    assert!(out.contains("balance/balance: ValueState<i64>"), "{out}");
    assert!(
        out.contains(&format!("pending commits ({})", m.pending_commits.len())),
        "{out}"
    );

    let (out, err, code) = exactly(&["checkpoints", "show", &f.location(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(json["checkpoint"], latest.0);
    assert_eq!(json["job"], "ledger");
    let first = ids[0].0.to_string();
    let (out, _, code) = exactly(&["checkpoints", "show", &f.location(), &first, "--json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["checkpoint"], ids[0].0);
    assert_eq!(json["is_final"], false);
}

#[test]
fn verify_passes_on_clean_checkpoints_and_names_a_corrupted_file() {
    let f = Fixture::new();
    let ids = f.ids();
    let (out, err, code) = exactly(&["checkpoints", "verify", &f.location()]);
    assert_eq!(code, 0, "{out}{err}");
    for id in &ids {
        assert!(out.contains(&format!("checkpoint {id}: ok")), "{out}");
    }
    assert!(
        out.contains(&format!("{} checkpoints verified", ids.len())),
        "{out}"
    );

    // One byte of one task file of the latest checkpoint changed.
    let latest = *ids.last().unwrap();
    let m = f.manifest(latest);
    let task = m
        .tasks
        .iter()
        .find(|t| t.path.contains("balance"))
        .expect("the keyed operator's task has a file");
    let file = f.checkpoints().join(&task.path);
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();

    let (out, err, code) = exactly(&["checkpoints", "verify", &f.location()]);
    assert_eq!(code, 1, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("checkpoint {latest}: BAD")))
        .unwrap_or_else(|| panic!("no verdict for {latest}: {out}"));
    assert!(
        line.contains(&task.path) && line.contains("checksum"),
        "{line}"
    );
    assert!(
        err.starts_with("error: 1 checkpoint failed verification"),
        "{err}"
    );
    // An older checkpoint does not reference that file and still verifies.
    let older = ids[0].to_string();
    let (out, err, code) = exactly(&["checkpoints", "verify", &f.location(), &older]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn a_wrong_location_or_id_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let missing = missing.to_str().unwrap();
    for command in ["list", "show", "verify"] {
        let (out, err, code) = exactly(&["checkpoints", command, missing]);
        assert_eq!(code, 2, "{out}{err}");
        assert!(
            err.starts_with("error: ") && err.contains(missing) && err.contains("does not exist"),
            "{err}"
        );
    }
    assert!(
        !dir.path().join("no-such-dir").exists(),
        "nothing is created"
    );
    let (_, err, code) = exactly(&["checkpoints", "list", "s3:bucket/prefix"]);
    assert_eq!(code, 2);
    assert!(err.contains("s3://"), "{err}");
    let (_, err, code) = exactly(&["lease", "show", "gopher://host/x"]);
    assert_eq!(code, 2);
    assert!(err.contains("unsupported scheme"), "{err}");

    // An existing directory without checkpoints: listed as such; nothing to verify.
    let empty = dir.path().to_str().unwrap();
    let (out, _, code) = exactly(&["checkpoints", "list", empty]);
    assert_eq!(code, 0);
    assert!(out.starts_with("no completed checkpoints at "), "{out}");
    let (_, err, code) = exactly(&["checkpoints", "verify", empty]);
    assert_eq!(code, 2);
    assert!(err.contains("nothing to verify"), "{err}");

    let f = Fixture::new();
    let (_, err, code) = exactly(&["checkpoints", "show", &f.location(), "999999"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("999999 is not a completed checkpoint"),
        "{err}"
    );
    let (_, err, code) = exactly(&["checkpoints", "show", &f.location(), "latest"]);
    assert_eq!(code, 2, "a usage error");
    assert!(err.contains("invalid value 'latest'"), "{err}");
}

#[test]
fn lease_show_prints_the_epoch_and_takes_no_lease() {
    let f = Fixture::new();
    let before = rt().block_on(f.storage().list_leases()).unwrap();
    let current = before.last().expect("the job took a lease");
    let (out, err, code) = exactly(&["lease", "show", &f.location()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("epoch   {}", current.epoch)), "{out}");
    assert!(out.contains(&current.path), "{out}");
    assert_eq!(rt().block_on(f.storage().list_leases()).unwrap(), before);
}

#[test]
fn savepoints_are_created_listed_kept_by_a_job_and_deleted() {
    let f = Fixture::new();
    let ids = f.ids();
    let first = ids[0];
    let loc = f.location();
    let (out, _, code) = exactly(&["savepoints", "list", &loc]);
    assert_eq!(code, 0);
    assert!(out.contains("no savepoints"), "{out}");

    let first_id = first.0.to_string();
    let (out, err, code) = exactly(&[
        "savepoints",
        "create",
        &loc,
        "audit",
        "--checkpoint",
        &first_id,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, err, code) = exactly(&["savepoints", "create", &loc, "audit"]);
    assert_eq!(code, 2);
    assert!(err.contains("exists already"), "{err}");
    let (_, err, code) = exactly(&["savepoints", "create", &loc, "../x"]);
    assert_eq!(code, 2);
    assert!(err.contains("must be"), "{err}");
    let (out, _, code) = exactly(&["savepoints", "list", &loc]);
    assert_eq!(code, 0);
    let row = out.lines().find(|l| l.starts_with("audit")).expect(&out);
    assert_eq!(
        row.split_whitespace().nth(1),
        Some(first_id.as_str()),
        "{out}"
    );

    // The job's retention keeps it (retain 1) through the next run's checkpoints.
    let payments: Vec<(u32, i64)> = (0..10).map(|i| (i, 1)).collect();
    let job = Job::builder("ledger")
        .parallelism(2)
        .retain_checkpoints(1)
        .checkpoint_storage(f.checkpoints().to_str().unwrap())
        .build()
        .unwrap();
    job.source("payments", VecSource::new(Vec::<(u32, i64)>::new()))
        .union(&job.source("more", VecSource::new(payments)))
        .key_by(|p| p.0)
        .process_fn(|p, ctx: &mut KeyedContext<'_, u32, (u32, i64)>| {
            ctx.emit(p);
            Ok(())
        })
        .name("balance")
        .sink("balances", FileSink::exactly_once(f.dir.path().join("out")));
    job.run().unwrap();
    let after = f.ids();
    assert_eq!(after.first(), Some(&first), "{after:?}");
    assert_eq!(after.len(), 2, "the savepoint's and the newest: {after:?}");

    let (out, err, code) = exactly(&["savepoints", "delete", &loc, "audit"]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, err, code) = exactly(&["savepoints", "delete", &loc, "audit"]);
    assert_eq!(code, 2);
    assert!(err.contains("no savepoint 'audit'"), "{err}");
}

/// The same commands on checkpoints in S3 (the SeaweedFS server `scripts/test.sh`
/// starts; the binary reads the same AWS_* environment): `list` shows what the engine
/// scans and `verify` checks every file.
#[cfg(feature = "s3")]
#[test]
fn list_and_verify_work_on_s3_locations() {
    let bucket = exactly::engine::testing::s3_test_bucket();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let url = format!("s3://{bucket}/tests/cli-{nanos}");
    let out = tempfile::tempdir().unwrap();
    let payments: Vec<(u32, i64)> = (0..2_000).map(|i| (i % 31, i64::from(i))).collect();
    let job = Job::builder("ledger")
        .parallelism(2)
        .checkpoint_storage(url.as_str())
        .build()
        .unwrap();
    common::running_balances(&job, VecSource::new(payments), out.path());
    job.run().unwrap();
    let storage = CheckpointStorage::open_existing(&url).unwrap();
    let ids = rt().block_on(storage.scan()).unwrap().0;
    assert!(!ids.is_empty());
    let (stdout, err, code) = exactly(&["checkpoints", "list", &url]);
    assert_eq!(code, 0, "{stdout}{err}");
    let listed: Vec<u64> = rows(&stdout).iter().map(|r| r.0).collect();
    assert_eq!(
        listed,
        ids.iter().map(|i| i.0).collect::<Vec<_>>(),
        "{stdout}"
    );
    let (stdout, err, code) = exactly(&["checkpoints", "verify", &url]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(
        stdout.contains(&format!("{} good, 0 bad", ids.len())),
        "{stdout}"
    );
}

#[test]
fn state_dump_decodes_every_balance_of_the_final_checkpoint() {
    let f = Fixture::new();
    let (out, err, code) = exactly(&[
        "state",
        "dump",
        &f.location(),
        "--operator",
        "balance",
        "--entries",
        "1000",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("  state balance: ValueState<i64> keyed by u32\n    97 entries,"),
        "{out}"
    );
    // Every account's balance at the end of the input, as the job computed it.
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..4_000u32 {
        *expected.entry(i % 97).or_insert(0i64) += i64::from(i) - 500;
    }
    assert_eq!(dumped_balances(&out), expected);
    assert!(
        !out.contains("operator payments"),
        "only the operator asked for"
    );

    let (_, err, code) = exactly(&["state", "dump", &f.location(), "--operator", "nope"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("holds no state of operator 'nope'; operators with state: balance"),
        "{err}"
    );
}

/// The `key group .. key K  value V` lines of a dump.
fn dumped_balances(out: &str) -> std::collections::BTreeMap<u32, i64> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("key group"))
        .map(|l| {
            let (_, rest) = l.split_once(" key ").unwrap();
            let (k, v) = rest.split_once("  value ").unwrap();
            (k.parse().unwrap(), v.parse().unwrap())
        })
        .collect()
}

/// RocksDB state is read from a copy of the checkpoint's files: the same entries and
/// balances as the in-memory backend's dump.
#[cfg(feature = "rocksdb")]
#[test]
fn state_dump_reads_rocksdb_entries() {
    let dir = tempfile::tempdir().unwrap();
    let payments: Vec<(u32, i64)> = (0..4_000).map(|i| (i % 97, i64::from(i) - 500)).collect();
    let checkpoints = dir.path().join("checkpoints");
    let job = Job::builder("ledger")
        .parallelism(2)
        .state_backend(exactly::state::StateBackend::rocksdb())
        .checkpoint_storage(checkpoints.to_str().unwrap())
        .build()
        .unwrap();
    common::running_balances(&job, VecSource::new(payments), &dir.path().join("out"));
    job.run().unwrap();
    let (out, err, code) = exactly(&[
        "state",
        "dump",
        checkpoints.to_str().unwrap(),
        "--operator",
        "balance",
        "--entries",
        "1000",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("  state balance: ValueState<i64> keyed by u32\n    97 entries,")
            && out.contains("entries above read from a copy of its files"),
        "{out}"
    );
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..4_000u32 {
        *expected.entry(i % 97).or_insert(0i64) += i64::from(i) - 500;
    }
    assert_eq!(dumped_balances(&out), expected);
}

/// A manifest an older instance wrote after a newer one took over (recorded in a
/// takeover record) is never restored: the CLI marks it, never calls it the latest, and
/// refuses to keep it as a savepoint.
#[test]
fn an_orphaned_checkpoint_is_marked_and_never_the_latest() {
    use exactly::engine::storage::Takeover;
    let f = Fixture::new();
    let ids = f.ids();
    let (first, newest) = (ids[0], *ids.last().unwrap());
    let newer = ids
        .iter()
        .map(|&id| f.manifest(id).generation)
        .max()
        .unwrap()
        + 1;
    rt().block_on(f.storage().record_takeover(&Takeover {
        generation: newer,
        restored: Some(first),
    }))
    .unwrap();
    let loc = f.location();

    let (out, err, code) = exactly(&["checkpoints", "list", &loc]);
    assert_eq!(code, 0, "{out}{err}");
    let rows = rows(&out);
    assert_eq!(rows.len(), ids.len(), "{out}");
    for (id, line) in &rows {
        if *id == first.0 {
            assert!(line.ends_with("latest"), "{out}");
        } else {
            assert!(
                line.contains("orphaned") && !line.contains("latest"),
                "{out}"
            );
        }
    }
    assert!(out.contains(&format!("latest: {first}")), "{out}");

    let (out, err, code) = exactly(&["checkpoints", "show", &loc]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with(&format!("checkpoint {first} ")), "{out}");
    let (out, err, code) = exactly(&["state", "dump", &loc]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with(&format!("checkpoint {first} ")), "{out}");
    let newest_id = newest.0.to_string();
    let (out, _, code) = exactly(&["checkpoints", "show", &loc, &newest_id]);
    assert_eq!(code, 0);
    assert!(out.contains("orphaned"), "{out}");

    let (_, err, code) = exactly(&[
        "savepoints",
        "create",
        &loc,
        "late",
        "--checkpoint",
        &newest_id,
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot be a savepoint") && err.contains("orphaned"),
        "{err}"
    );
    let (out, err, code) = exactly(&["savepoints", "create", &loc, "kept"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("keeps checkpoint {first} ")), "{out}");
}

/// `savepoints assignment` on a savepoint of a job run as two instances: the splits
/// each instance read and the key groups it owned, and where both go with three.
#[test]
fn savepoint_assignment_shows_the_instances_before_and_after_a_rescale() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    for i in 0..2 {
        let job = Job::builder("numbers")
            .instance(i, 2)
            .parallelism(1)
            .checkpoint_storage(root.to_str().unwrap())
            .build()
            .unwrap();
        job.source(
            "numbers",
            VecSource::new((0..600u64).collect()).with_splits(6),
        )
        .map(|n| n * 2)
        .sink("out", CollectSink::new());
        job.run().unwrap();
        let part = root.join(format!("instances/{i}"));
        let (_, err, code) = exactly(&["savepoints", "create", part.to_str().unwrap(), "sp"]);
        assert_eq!(code, 0, "{err}");
    }
    let (out, err, code) = exactly(&[
        "savepoints",
        "assignment",
        root.to_str().unwrap(),
        "sp",
        "--instances",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    let expected = [
        "before: 2 instance(s) of 1 subtask(s)",
        "  instance 0: key groups 0..64",
        "    numbers: 0, 2, 4",
        "  instance 1: key groups 64..128",
        "    numbers: 1, 3, 5",
        "after: 3 instance(s) of 1 subtask(s)",
        "  instance 0: key groups 0..43",
        "    numbers: 0, 3",
        "  instance 1: key groups 43..86",
        "    numbers: 1, 4",
        "  instance 2: key groups 86..128",
        "    numbers: 2, 5",
    ];
    let lines: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(lines, expected, "{out}");
    let (_, err, code) = exactly(&[
        "savepoints",
        "assignment",
        root.to_str().unwrap(),
        "nope",
        "--instances",
        "2",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("no savepoint 'nope'"), "{err}");
}
