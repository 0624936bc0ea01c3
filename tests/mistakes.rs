//! Operators' mistakes that used to lose or double committed output, with exit code 0:
//! each must now be refused with a message that says what is wrong.

mod common;

use common::gated::{gated, open, wait_at, GatedSource};
use exactly::engine::ids::CheckpointId;
use exactly::prelude::*;
use exactly::testing::VecSource;
use std::path::Path;

const BALANCE: ValueState<i64> = ValueState::new("balance");

/// Each account's running balance, in the keyed state `balance` (the caller names the
/// operator).
fn running_balance(payments: &Stream<(u32, i64)>) -> Stream<(u32, i64)> {
    payments.key_by(|p| p.0).process_fn(
        |(account, amount), ctx: &mut KeyedContext<'_, u32, (u32, i64)>| {
            let balance = ctx.value(BALANCE)?.unwrap_or(0) + amount;
            ctx.set_value(BALANCE, &balance)?;
            ctx.emit((account, balance));
            Ok(())
        },
    )
}

/// Source `source`, keyed running balance `balance` (when `keyed_name` is None the keyed
/// operator keeps its generated name), a stateless `tag` map, file sink `balances`.
fn ledger(
    dir: &Path,
    source: &str,
    keyed_name: Option<&str>,
    map_name: &str,
    allow_non_restored: bool,
) -> exactly::engine::error::Result<JobReport> {
    let mut b = Job::builder("ledger")
        .parallelism(2)
        .checkpoint_storage(dir.join("checkpoints").to_str().unwrap());
    if allow_non_restored {
        b = b.allow_non_restored_state();
    }
    let job = b.build()?;
    let payments: Vec<(u32, i64)> = (0..1_000).map(|i| (i % 17, i as i64)).collect();
    let keyed = running_balance(&job.source(source, VecSource::new(payments)));
    let keyed = match keyed_name {
        Some(n) => keyed.name(n),
        None => keyed,
    };
    keyed
        .map(|b| b)
        .name(map_name)
        .sink("balances", FileSink::exactly_once(dir.join("out")));
    job.run()
}

fn part_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("part-"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_renamed_keyed_operator_or_source_is_refused_not_restarted_empty() {
    let tmp = tempfile::tempdir().unwrap();
    ledger(tmp.path(), "payments", Some("balance"), "tag", false).unwrap();
    let committed = part_files(&tmp.path().join("out"));
    assert!(!committed.is_empty());

    // A stateless operator has nothing to restore: renaming it is fine.
    ledger(
        tmp.path(),
        "payments",
        Some("balance"),
        "tag-renamed",
        false,
    )
    .unwrap();

    let err = ledger(tmp.path(), "payments", Some("balance-v2"), "tag", false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("state of operator 'balance'"), "{err}");
    assert!(err.contains("allow_non_restored_state"), "{err}");

    let err = ledger(tmp.path(), "payments-v2", Some("balance"), "tag", false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("state of operator 'payments'"), "{err}");
    assert_eq!(
        part_files(&tmp.path().join("out")),
        committed,
        "refused runs commit nothing"
    );

    // Dropping the state on purpose is possible, and said so.
    ledger(tmp.path(), "payments", Some("balance-v2"), "tag", true).unwrap();
}

#[test]
fn a_keyed_operator_without_a_name_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ledger(tmp.path(), "payments", None, "tag", false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("stateful operator 'process-"), "{err}");
    assert!(err.contains("has no name"), "{err}");
    assert!(!tmp.path().join("out").exists(), "nothing ran");
}

#[test]
fn two_file_sinks_on_one_directory_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let job = Job::builder("two-sinks")
        .checkpoint_storage(tmp.path().join("checkpoints").to_str().unwrap())
        .build()
        .unwrap();
    let s = job.source("numbers", VecSource::new(vec![1u32, 2, 3]));
    s.sink("a", FileSink::exactly_once(tmp.path().join("out")));
    s.map(|n| n * 2)
        .name("double")
        .sink("b", FileSink::exactly_once(tmp.path().join("x/../out/")));
    let err = job.run().unwrap_err().to_string();
    assert!(err.contains("sinks 'a' and 'b' both write to"), "{err}");
    assert!(!tmp.path().join("out").exists(), "nothing ran");
}

#[test]
fn leftovers_of_dead_runs_are_cleaned_up_after_the_checkpoints_were_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    // An in-progress file of an instance with lease 5 that died before its first
    // checkpoint; its checkpoint storage is gone. Leases restart from the clock, not from
    // 1, so this run's lease is above 5 and the file is an older instance's to abort.
    let staging = tmp.path().join("out/.staging/balances");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("inprogress-g5-0-4242-0"), "{}\n").unwrap();
    ledger(tmp.path(), "payments", Some("balance"), "tag", false).unwrap();
    assert!(!staging.join("inprogress-g5-0-4242-0").exists());
    assert!(!part_files(&tmp.path().join("out")).is_empty());
}

#[test]
fn part_files_carry_the_sink_name() {
    let tmp = tempfile::tempdir().unwrap();
    ledger(tmp.path(), "payments", Some("balance"), "tag", false).unwrap();
    let parts = part_files(&tmp.path().join("out"));
    assert!(!parts.is_empty());
    assert!(
        parts.iter().all(|p| p.starts_with("part-balances-")),
        "{parts:?}"
    );
}

/// The running balance again, with the balance's type or the key's type changed.
fn retyped(dir: &Path, change: &str, backend: StateBackend) -> exactly::engine::error::Result<()> {
    const BALANCE_U64: ValueState<u64> = ValueState::new("balance");
    let job = Job::builder("ledger")
        .parallelism(2)
        .state_backend(backend)
        .checkpoint_storage(dir.join("checkpoints").to_str().unwrap())
        .build()?;
    // The restored source has read all its input; a new one brings records to the
    // retyped state.
    let payments: Vec<(u32, i64)> = (0..1_000).map(|i| (i % 17, i as i64)).collect();
    let more: Vec<(u32, i64)> = (0..100).map(|i| (i % 17, i as i64)).collect();
    let source = job
        .source("payments", VecSource::new(payments))
        .union(&job.source("more-payments", VecSource::new(more)));
    let out = dir.join("out");
    match change {
        "value" => source
            .key_by(|p| p.0)
            .process_fn(|(a, n), ctx: &mut KeyedContext<'_, u32, (u32, u64)>| {
                let b = ctx.value(BALANCE_U64)?.unwrap_or(0) + n as u64;
                ctx.set_value(BALANCE_U64, &b)?;
                ctx.emit((a, b));
                Ok(())
            })
            .name("balance")
            .sink("balances", FileSink::exactly_once(out)),
        "key" => source
            .key_by(|p| p.0 as u64)
            .process_fn(|(a, n), ctx: &mut KeyedContext<'_, u64, (u32, i64)>| {
                let b = ctx.value(BALANCE)?.unwrap_or(0) + n;
                ctx.set_value(BALANCE, &b)?;
                ctx.emit((a, b));
                Ok(())
            })
            .name("balance")
            .sink("balances", FileSink::exactly_once(out)),
        other => panic!("{other}"),
    };
    job.run().map(|_| ())
}

fn a_changed_state_type_is_refused(backend: StateBackend) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let job = Job::builder("ledger")
        .parallelism(2)
        .state_backend(backend.clone())
        .checkpoint_storage(dir.join("checkpoints").to_str().unwrap())
        .build()
        .unwrap();
    let payments: Vec<(u32, i64)> = (0..1_000).map(|i| (i % 17, i as i64)).collect();
    running_balance(&job.source("payments", VecSource::new(payments)))
        .name("balance")
        .sink("balances", FileSink::exactly_once(dir.join("out")));
    job.run().unwrap();
    let committed = part_files(&dir.join("out"));

    let err = retyped(dir, "value", backend.clone()).unwrap_err();
    // Restarting cannot fix it: the job stops at once instead of retrying.
    assert_eq!(
        err.class(),
        exactly::engine::error::ErrorClass::Stop,
        "{err}"
    );
    let err = err.to_string();
    assert!(err.contains("operator 'balance', state 'balance'"), "{err}");
    assert!(
        err.contains("holds ValueState<i64> keyed by u32")
            && err.contains("declares ValueState<u64> keyed by u32"),
        "{err}"
    );
    let err = retyped(dir, "key", backend).unwrap_err().to_string();
    assert!(err.contains("keyed by u64"), "{err}");
    assert_eq!(
        part_files(&dir.join("out")),
        committed,
        "refused runs commit nothing"
    );
}

#[test]
fn a_changed_state_type_is_refused_in_memory() {
    a_changed_state_type_is_refused(StateBackend::Memory);
}

#[cfg(feature = "rocksdb")]
#[test]
fn a_changed_state_type_is_refused_on_rocksdb() {
    a_changed_state_type_is_refused(StateBackend::rocksdb());
}

/// The ledger with a second source of `extra` payments unioned in (0: no second source;
/// a source that has ended stays ended in its checkpoints, so new input needs a new one).
fn ledger_with_more(dir: &Path, extra: u32) -> exactly::engine::error::Result<JobReport> {
    let job = Job::builder("ledger")
        .parallelism(2)
        .checkpoint_storage(dir.join("checkpoints").to_str().unwrap())
        .build()?;
    let payments: Vec<(u32, i64)> = (0..1_000).map(|i| (i % 17, i as i64)).collect();
    let mut source = job.source("payments", VecSource::new(payments));
    if extra > 0 {
        let more: Vec<(u32, i64)> = (0..extra).map(|i| (i % 17, 1)).collect();
        source = source.union(&job.source("more-payments", VecSource::new(more)));
    }
    running_balance(&source)
        .name("balance")
        .sink("balances", FileSink::exactly_once(dir.join("out")));
    job.run()
}

/// Every file of `dir` with its content.
fn snapshot_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    part_files(dir)
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).unwrap();
            (n, bytes)
        })
        .collect()
}

#[test]
fn lost_manifests_stop_the_job_before_it_commits_anything_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let manifests = dir.join("checkpoints/manifests");
    ledger_with_more(dir, 0).unwrap(); // checkpoint 1 (final)
    ledger_with_more(dir, 500).unwrap(); // checkpoint 2 (final): commits the 500 more
    let mut names: Vec<_> = std::fs::read_dir(&manifests)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    let out = snapshot_of(&dir.join("out"));
    assert!(out
        .iter()
        .any(|(n, _)| n.starts_with("part-balances-000000000002-")));

    // The newest manifest deleted: the job would restore checkpoint 1 and commit the
    // 500 payments of checkpoint 2 again.
    let newest = std::fs::read(names.last().unwrap()).unwrap();
    std::fs::remove_file(names.last().unwrap()).unwrap();
    let err = ledger_with_more(dir, 500).unwrap_err();
    assert_eq!(
        err.class(),
        exactly::engine::error::ErrorClass::Stop,
        "{err}"
    );
    let err = err.to_string();
    assert!(err.contains("committed by checkpoint 2"), "{err}");
    assert!(err.contains("restores checkpoint 1"), "{err}");
    assert_eq!(
        snapshot_of(&dir.join("out")),
        out,
        "no committed file touched"
    );
    // The manifest put back, as the error advises: the job restores checkpoint 2 and
    // has nothing left to do (the refused run's record of what it restored must not
    // make checkpoint 2 look like a manifest written behind its back).
    std::fs::write(names.last().unwrap(), &newest).unwrap();
    let report = ledger_with_more(dir, 500).unwrap();
    assert_eq!(report.restored_from, Some(CheckpointId(2)));
    assert_eq!(
        snapshot_of(&dir.join("out")),
        out,
        "nothing committed again"
    );

    // Every manifest deleted (or the checkpoint directory moved aside).
    std::fs::remove_dir_all(dir.join("checkpoints")).unwrap();
    let err = ledger_with_more(dir, 500).unwrap_err().to_string();
    assert!(err.contains("finds no checkpoint"), "{err}");
    assert!(err.contains("new, empty output location"), "{err}");
    assert_eq!(
        snapshot_of(&dir.join("out")),
        out,
        "no committed file touched"
    );
}

/// The running balance of `source`'s payments into `dir/out`, checkpoints in
/// `dir/checkpoints`.
fn balances<S: Source<Item = (u32, i64)>>(
    dir: &Path,
    source: S,
) -> exactly::engine::error::Result<JobReport> {
    let job = Job::builder("ledger")
        .parallelism(2)
        .checkpoint_storage(dir.join("checkpoints").to_str().unwrap())
        .build()?;
    running_balance(&job.source("payments", source))
        .name("balance")
        .sink("balances", FileSink::exactly_once(dir.join("out")));
    job.run()
}

/// Every committed line under `dir`, sorted.
fn committed_lines(dir: &Path) -> Vec<String> {
    let mut lines: Vec<String> = part_files(dir)
        .iter()
        .flat_map(|n| {
            std::fs::read_to_string(dir.join(n))
                .unwrap()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    lines.sort();
    lines
}

/// The in-progress and staged files of the `balances` sink.
fn staging_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("out/.staging/balances"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn an_older_instance_is_fenced_and_never_touches_the_newer_ones_output() {
    let payments: Vec<(u32, i64)> = (0..20_000).map(|i| (i % 101, i as i64)).collect();
    let golden = tempfile::tempdir().unwrap();
    balances(golden.path(), VecSource::new(payments.clone())).unwrap();
    let expected = committed_lines(&golden.path().join("out"));
    assert_eq!(expected.len(), payments.len());

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let spawn = |source: GatedSource| {
        let dir = dir.clone();
        std::thread::spawn(move || balances(&dir, source))
    };
    // The older instance reads half its input and waits, holding its lease.
    let (older, older_gate) = gated(&payments);
    let a = spawn(older);
    wait_at(&older_gate);
    // A newer instance (a higher lease) on the same location does the same; once its sink
    // has output in progress, the older one goes on.
    let (newer, newer_gate) = gated(&payments);
    let b = spawn(newer);
    wait_at(&newer_gate);
    // The newer instance's lease, the only one left: its generation tags its files.
    let leases: Vec<String> = std::fs::read_dir(dir.join("checkpoints/_leases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leases.len(), 1, "{leases:?}");
    let tag = format!("-g{}-", leases[0].parse::<u64>().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !staging_files(&dir).iter().any(|f| f.contains(&tag)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the newer instance wrote nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    open(&older_gate);
    let err = a.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::Fenced { .. }), "{err}");
    // Fenced, it deleted nothing of the newer instance's (before, its in-process
    // restart's recovery removed the newer instance's files as if they were its own).
    let newer_files: Vec<String> = staging_files(&dir)
        .into_iter()
        .filter(|f| f.contains(&tag))
        .collect();
    assert!(!newer_files.is_empty(), "{:?}", staging_files(&dir));
    assert!(
        committed_lines(&dir.join("out")).is_empty(),
        "the older one committed nothing"
    );

    open(&newer_gate);
    let report = b.join().unwrap().unwrap();
    assert_eq!(report.restarts, 0, "the newer instance was not disturbed");
    assert_eq!(
        committed_lines(&dir.join("out")),
        expected,
        "the survivor's output is the failure-free run's: nothing lost or doubled"
    );
    // A rerun on the location has nothing left to do.
    let report = balances(&dir, VecSource::new(payments)).unwrap();
    assert!(report.restored_from.is_some());
    assert_eq!(committed_lines(&dir.join("out")), expected);
}

/// The running balance of the JSON-lines payments in `input` into `dir/out`. With
/// `stop_after`, the file is followed (`follow()`) and the job stops itself with a
/// checkpoint once it has processed that many records in this run: the source waits at
/// the end of what is written, so the stop comes exactly there.
fn balances_of_file(
    dir: &Path,
    input: &Path,
    stop_after: Option<usize>,
) -> exactly::engine::error::Result<JobReport> {
    let job = Job::builder("ledger")
        .parallelism(2)
        .checkpoint_storage(dir.join("checkpoints").to_str().unwrap())
        .build()?;
    let stop = job.stop_handle();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let source = JsonLinesSource::<(u32, i64)>::new(input);
    let source = match stop_after {
        Some(_) => source.follow(),
        None => source,
    };
    let payments = job.source("payments", source).map(move |p| {
        if Some(seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1) == stop_after {
            stop.stop();
        }
        p
    });
    running_balance(&payments)
        .name("balance")
        .sink("balances", FileSink::exactly_once(dir.join("out")));
    job.run()
}

fn payments_file(range: std::ops::Range<i64>) -> String {
    range.map(|i| format!("[{},{i}]\n", i % 17)).collect()
}

#[test]
fn an_input_file_rotated_under_a_checkpoint_is_refused_and_a_grown_one_read_on() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("payments.jsonl");
    std::fs::write(&input, payments_file(0..5_000)).unwrap();
    let golden = dir.path().join("golden");
    balances_of_file(&golden, &input, None).unwrap();
    let expected = committed_lines(&golden.join("out"));

    // The first 2,000 payments are written; the job stops after reading them.
    std::fs::write(&input, payments_file(0..2_000)).unwrap();
    let run = dir.path().join("run");
    let report = balances_of_file(&run, &input, Some(2_000)).unwrap();
    assert!(
        report.stopped_at.is_some(),
        "the job stopped with a checkpoint"
    );
    let out = run.join("out");
    assert_eq!(committed_lines(&out).len(), 2_000);
    let at_stop = snapshot_of(&out);

    // Log rotation: a longer file with other records at the same path. Resuming at the
    // checkpoint's byte offset would skip its first records; the job refuses it.
    std::fs::write(&input, payments_file(100_000..150_000)).unwrap();
    let err = balances_of_file(&run, &input, Some(1)).unwrap_err();
    assert!(
        err.to_string().contains("was replaced") && err.to_string().contains("payments.jsonl"),
        "{err}"
    );
    assert_eq!(
        err.class(),
        exactly::engine::error::ErrorClass::Stop,
        "{err}"
    );
    assert_eq!(snapshot_of(&out), at_stop, "no committed file touched");

    // Truncated under the checkpoint's offset: refused as well.
    std::fs::write(&input, payments_file(0..10)).unwrap();
    let err = balances_of_file(&run, &input, Some(1)).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    assert_eq!(snapshot_of(&out), at_stop, "no committed file touched");

    // The original file with the rest appended: read on from the checkpoint, each
    // payment once, and the output is the failure-free run's.
    std::fs::write(&input, payments_file(0..5_000)).unwrap();
    balances_of_file(&run, &input, Some(3_000)).unwrap();
    assert_eq!(committed_lines(&out), expected);
}

/// The running balance of every payment in the `*.jsonl` files of directory `input`,
/// followed, into `dir/out`. The job stops itself with a checkpoint once it has processed
/// `stop_after` records in this run; when it has processed `add_at` of them, it calls
/// `add` (which adds a file to the directory). Gives up after a minute.
fn balances_of_followed_dir(
    dir: &Path,
    input: &Path,
    stop_after: usize,
    add_at: Option<(usize, std::sync::Arc<dyn Fn() + Send + Sync>)>,
) -> JobReport {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let job = Job::builder("ledger")
        .parallelism(2)
        .checkpoint_storage(dir.join("checkpoints").to_str().unwrap())
        .build()
        .unwrap();
    let stop = job.stop_handle();
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let source = JsonLinesSource::<(u32, i64)>::new(input).follow();
    let payments = job.source("payments", source).map(move |p| {
        let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some((at, add)) = &add_at {
            if n == *at {
                add();
            }
        }
        if n == stop_after {
            stop.stop();
        }
        p
    });
    running_balance(&payments)
        .name("balance")
        .sink("balances", FileSink::exactly_once(dir.join("out")));
    let handle = job.start().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !handle.is_finished() {
        if std::time::Instant::now() > deadline {
            handle.stop_with_checkpoint();
            let report = handle.wait();
            panic!("the job did not read {stop_after} records within a minute: {report:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    handle.wait().unwrap()
}

/// Each account's output lines and highest balance. Amounts are never negative, so the
/// highest balance is the sum of every payment the job processed: with a line per
/// payment, a lost payment lowers it and a doubled one adds a line.
fn per_account(lines: &[String]) -> std::collections::BTreeMap<u32, (usize, i64)> {
    let mut out = std::collections::BTreeMap::new();
    for l in lines {
        let (account, balance): (u32, i64) = serde_json::from_str(l).unwrap();
        let e = out.entry(account).or_insert((0, i64::MIN));
        e.0 += 1;
        e.1 = e.1.max(balance);
    }
    out
}

fn expected_per_account(
    payments: std::ops::Range<i64>,
) -> std::collections::BTreeMap<u32, (usize, i64)> {
    let mut out = std::collections::BTreeMap::new();
    for i in payments {
        let e = out.entry((i % 17) as u32).or_insert((0, 0));
        e.0 += 1;
        e.1 += i;
    }
    out
}

/// A followed directory picks up files added while the job runs, and files added while
/// it is stopped: each payment once, none lost.
#[test]
fn files_added_to_a_followed_directory_are_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join("a.jsonl"), payments_file(0..2_000)).unwrap();
    let add = |name: &'static str, range: std::ops::Range<i64>| {
        let input = input.clone();
        move || {
            let tmp = input.join(format!("{name}.tmp"));
            std::fs::write(&tmp, payments_file(range.clone())).unwrap();
            std::fs::rename(&tmp, input.join(name)).unwrap();
        }
    };
    let run = dir.path().join("run");
    // b.jsonl appears once a.jsonl has been read; the job reads it while it runs.
    let report = balances_of_followed_dir(
        &run,
        &input,
        3_000,
        Some((2_000, std::sync::Arc::new(add("b.jsonl", 2_000..3_000)))),
    );
    assert!(report.stopped_at.is_some());
    let out = committed_lines(&run.join("out"));
    assert_eq!(per_account(&out), expected_per_account(0..3_000));

    // c.jsonl appears while the job is stopped; the next run reads it, and a and b
    // resume at their ends.
    add("c.jsonl", 3_000..4_000)();
    let report = balances_of_followed_dir(&run, &input, 1_000, None);
    assert!(report.restored_from.is_some());
    let out = committed_lines(&run.join("out"));
    assert_eq!(per_account(&out), expected_per_account(0..4_000));
}

/// Two instances started at nearly the same moment on one location, 50 times, with the
/// second one's start shifted a little further each time so the starts interleave with
/// leases, checkpoints and the final checkpoint in every order: each instance either
/// finishes or stops with a fencing error (never another error, never hanging), the
/// committed output never holds a line twice, and a rerun on the location leaves exactly
/// the failure-free run's output.
#[test]
fn two_instances_started_together_never_double_or_lose_output() {
    two_instances_started_together(50, |dir, _| dir.join("checkpoints").display().to_string());
}

/// The same with checkpoints on S3 (the SeaweedFS server `scripts/test.sh` starts), 20
/// times: leases and manifests are conditional objects there, not files.
#[cfg(feature = "s3")]
#[test]
fn two_instances_started_together_on_s3_never_double_or_lose_output() {
    let bucket = exactly::engine::testing::s3_test_bucket();
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    two_instances_started_together(20, |_, trial| {
        format!("s3://{bucket}/tests/two-instances-{run}-{trial}")
    });
}

/// `trials` times: two instances on the checkpoint location `location(dir, trial)`
/// with output in `dir/out`, then a rerun (see above).
fn two_instances_started_together(trials: u64, location: impl Fn(&Path, u64) -> String + Sync) {
    use std::time::Duration;
    let payments: Vec<(u32, i64)> = (0..3_000).map(|i| (i % 53, i as i64)).collect();
    let run = |dir: &Path, checkpoints: &str| {
        let job = Job::builder("ledger")
            .parallelism(2)
            .checkpoint_storage(checkpoints)
            .checkpoint_every(Duration::from_millis(5))
            .batch_size(32)
            // 94 batches: at least 4 checkpoints, so the two runs overlap.
            .source_batches_per_checkpoint(24)
            .restart_policy(RestartPolicy::fixed(2, Duration::ZERO))
            .build()?;
        running_balance(&job.source("payments", VecSource::new(payments.clone())))
            .name("balance")
            .sink("balances", FileSink::exactly_once(dir.join("out")));
        job.run()
    };
    let golden = tempfile::tempdir().unwrap();
    run(
        golden.path(),
        &golden.path().join("checkpoints").display().to_string(),
    )
    .unwrap();
    let expected = committed_lines(&golden.path().join("out"));
    assert_eq!(expected.len(), payments.len());
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    for trial in 0..trials {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let checkpoints = location(dir, trial);
        let start = std::sync::Barrier::new(2);
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2u64)
                .map(|i| {
                    let (start, run, checkpoints) = (&start, &run, &checkpoints);
                    s.spawn(move || {
                        start.wait();
                        if i == 1 {
                            std::thread::sleep(Duration::from_millis(trial * 4));
                        }
                        run(dir, checkpoints)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        let mut finished = 0;
        for r in &results {
            let what = match r {
                Ok(_) => {
                    finished += 1;
                    "finished".to_string()
                }
                Err(Error::Fenced { .. }) => "fenced".to_string(),
                Err(Error::ConcurrentWriter { .. }) => "concurrent manifest".to_string(),
                Err(e) => panic!("trial {trial}: an instance failed otherwise: {e:#}"),
            };
            *outcomes.entry(what).or_default() += 1;
        }
        let lines = committed_lines(&dir.join("out"));
        let mut unique = lines.clone();
        unique.dedup();
        assert_eq!(
            lines.len(),
            unique.len(),
            "trial {trial}: a line committed twice"
        );
        assert!(
            lines.iter().all(|l| expected.binary_search(l).is_ok()),
            "trial {trial}: a line the failure-free run does not have"
        );
        if finished == 0 {
            // Both stopped: a rerun finishes the job.
            run(dir, &checkpoints).unwrap();
        }
        run(dir, &checkpoints).unwrap();
        assert_eq!(
            committed_lines(&dir.join("out")),
            expected,
            "trial {trial}: after a rerun the output is the failure-free run's"
        );
    }
    eprintln!("outcomes of {} instances: {outcomes:?}", 2 * trials);
}

/// The race of two instances at a checkpoint's end: the older one checked its lease and
/// is about to write manifest 1 when the newer one takes the location over, finds no
/// manifest and starts afresh (its recovery aborts what the older one staged); the older
/// one's manifest 1 lands while the newer one runs, and the newer one fails before its
/// own first checkpoint. The next run must not restore that orphan manifest (before,
/// it did, found its staged output gone and stopped with `CommitLost`, on every rerun).
#[cfg(feature = "failpoints")]
#[test]
fn an_older_instances_late_manifest_is_never_restored() {
    use exactly::engine::failpoints::{on_hit, AFTER_MANIFEST, BEFORE_MANIFEST};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};

    let payments: Vec<(u32, i64)> = (0..20_000).map(|i| (i % 101, i as i64)).collect();
    let golden = tempfile::tempdir().unwrap();
    balances(golden.path(), VecSource::new(payments.clone())).unwrap();
    let expected = committed_lines(&golden.path().join("out"));

    // The first manifest about to be written (the older instance's) waits for the second
    // (the newer instance's), which lets it go, waits until it is written, and then
    // fails the newer instance on the spot, as a crash would.
    let (older_waits, older_is_waiting) = mpsc::channel::<()>();
    let (release_older, older_released) = mpsc::channel::<()>();
    let (older_wrote, older_has_written) = mpsc::channel::<()>();
    let (older_waits, release_older) = (Mutex::new(older_waits), Mutex::new(release_older));
    let (older_released, older_has_written) =
        (Mutex::new(older_released), Mutex::new(older_has_written));
    let before = Arc::new(AtomicUsize::new(0));
    let b = before.clone();
    on_hit(BEFORE_MANIFEST, move || {
        match b.fetch_add(1, Ordering::SeqCst) {
            0 => {
                older_waits.lock().unwrap().send(()).unwrap();
                older_released.lock().unwrap().recv().unwrap();
            }
            1 => {
                release_older.lock().unwrap().send(()).unwrap();
                older_has_written.lock().unwrap().recv().unwrap();
                panic!("the newer instance crashes before its first manifest");
            }
            _ => {}
        }
    })
    .unwrap();
    let written = AtomicUsize::new(0);
    on_hit(AFTER_MANIFEST, move || {
        if written.fetch_add(1, Ordering::SeqCst) == 0 {
            older_wrote.send(()).unwrap();
        }
    })
    .unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let spawn = || {
        let dir = dir.clone();
        let payments = payments.clone();
        std::thread::spawn(move || balances(&dir, VecSource::new(payments)))
    };
    let older = spawn();
    older_is_waiting.recv().unwrap();
    let newer = spawn();
    assert!(newer.join().is_err(), "the newer instance crashed");
    let err = older.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::Fenced { .. }), "{err}");
    assert!(
        dir.join("checkpoints/manifests/00000000000000000001.json")
            .exists(),
        "the older instance's manifest landed"
    );
    assert!(committed_lines(&dir.join("out")).is_empty());

    // The next run passes over the orphan and ends with the failure-free output.
    let report = balances(&dir, VecSource::new(payments.clone())).unwrap();
    assert_eq!(
        report.restored_from, None,
        "nothing restorable: a fresh start"
    );
    assert_eq!(committed_lines(&dir.join("out")), expected);
    let report = balances(&dir, VecSource::new(payments)).unwrap();
    assert!(report.restored_from.is_some());
    assert_eq!(committed_lines(&dir.join("out")), expected);
}
