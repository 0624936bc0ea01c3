//! Operators' mistakes that used to lose or double committed output, with exit code 0:
//! each must now be refused with a message that says what is wrong.

use exactly::prelude::*;
use std::path::Path;

const BALANCE: ValueState<i64> = ValueState::new("balance");

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
    let keyed = job
        .source(source, VecSource::new(payments))
        .key_by(|p| p.0)
        .process_fn(
            |(account, amount), ctx: &mut KeyedContext<'_, u32, (u32, i64)>| {
                let balance = ctx.value(BALANCE)?.unwrap_or(0) + amount;
                ctx.set_value(BALANCE, &balance)?;
                ctx.emit((account, balance));
                Ok(())
            },
        );
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
    assert!(err.contains("keyed operator 'process-"), "{err}");
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
