//! Changing a job on purpose: a new version starts from a savepoint of the old one, with
//! renamed operators, an added operator and state converted to new types, and together
//! the two versions commit exactly what one uninterrupted run of the old one would.

mod common;

use common::committed_lines;
use common::gated::{gated, open, run_at_gate_then, run_stopped_at_gate};
use exactly::engine::storage::CheckpointStorage;
use exactly::prelude::*;
use exactly::testing::VecSource;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Version 1's states: each account's balance, and its total per payment kind.
const BALANCE: ValueState<i64> = ValueState::new("balance");
const BY_KIND: MapState<u8, i64> = MapState::new("by-kind");

fn payments(n: u32) -> Vec<(u32, i64)> {
    (0..n).map(|i| (i % 97, i64::from(i) - 500)).collect()
}

fn kind(amount: i64) -> u8 {
    amount.rem_euclid(3) as u8
}

fn storage(dir: &Path) -> String {
    dir.join("checkpoints").to_str().unwrap().to_string()
}

/// Version 1's keyed operator (unnamed): each account's balance and the total of the
/// payment's kind.
fn balances(payments: Stream<(u32, i64)>) -> Stream<(u32, i64, i64)> {
    payments.key_by(|p| p.0).process_fn(
        |(account, amount), ctx: &mut KeyedContext<'_, u32, (u32, i64, i64)>| {
            let balance = ctx.value(BALANCE)?.unwrap_or(0) + amount;
            ctx.set_value(BALANCE, &balance)?;
            let k = kind(amount);
            let total = ctx.map_get(BY_KIND, &k)?.unwrap_or(0) + amount;
            ctx.map_put(BY_KIND, &k, &total)?;
            ctx.emit((account, balance, total));
            Ok(())
        },
    )
}

/// Version 1: source `payments`, keyed operator `balance` emitting (account, balance,
/// total of the payment's kind), file sink `balances`.
fn v1<S: Source<Item = (u32, i64)>>(dir: &Path, source: S, builder: JobBuilder) -> Job {
    let job = builder
        .parallelism(2)
        .checkpoint_storage(storage(dir))
        .build()
        .unwrap();
    balances(job.source("payments", source))
        .name("balance")
        .sink("balances", FileSink::exactly_once(dir.join("out")));
    job
}

/// Version 2 keeps amounts in cents, in a struct.
#[derive(Clone, Serialize, Deserialize)]
struct Cents {
    cents: i64,
}

/// Version 2: the source and the keyed operator renamed (restoring their old state), an
/// added stateless operator, states in cents; the same output as version 1.
fn v2<S: Source<Item = (u32, i64)>>(
    dir: &Path,
    source: S,
    builder: JobBuilder,
    parallelism: usize,
    states: (ValueState<Cents>, MapState<u8, Cents>),
) -> Job {
    let (balance_state, kind_state) = states;
    let job = builder
        .parallelism(parallelism)
        .checkpoint_storage(storage(dir))
        .build()
        .unwrap();
    job.source("payments-in", source)
        .restore_state_of("payments")
        .filter(|p| p.1 != i64::MIN)
        .name("sanity-check")
        .key_by(|p| p.0)
        .process_fn(
            move |(account, amount), ctx: &mut KeyedContext<'_, u32, (u32, i64, i64)>| {
                let mut b = ctx.value(balance_state)?.unwrap_or(Cents { cents: 0 });
                b.cents += amount * 100;
                ctx.set_value(balance_state, &b)?;
                let k = kind(amount);
                let mut t = ctx.map_get(kind_state, &k)?.unwrap_or(Cents { cents: 0 });
                t.cents += amount * 100;
                ctx.map_put(kind_state, &k, &t)?;
                ctx.emit((account, b.cents / 100, t.cents / 100));
                Ok(())
            },
        )
        .name("account-balance")
        .restore_state_of("balance")
        .sink("balances", FileSink::exactly_once(dir.join("out")));
    job
}

/// Version 1 at parallelism 2 is stopped with a savepoint and version 2 starts from it
/// at `parallelism`.
fn upgrade_from_a_savepoint(
    backend: StateBackend,
    parallelism: usize,
    states: (ValueState<Cents>, MapState<u8, Cents>),
    counters: (&AtomicUsize, &AtomicUsize),
) {
    let all = payments(20_000);
    let golden = tempfile::tempdir().unwrap();
    v1(
        golden.path(),
        VecSource::new(all.clone()),
        Job::builder("ledger"),
    )
    .run()
    .unwrap();
    let expected = committed_lines(&golden.path().join("out"));
    let builder = || Job::builder("ledger").state_backend(backend.clone());

    // Version 1 reads half its input, then is stopped with a savepoint.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (source, gate) = gated(&all);
    let job = v1(dir, source, builder());
    let report =
        run_at_gate_then(&job, &gate, |stop| stop.stop_with_savepoint("v1-final")).unwrap();
    let stopped_at = report.stopped_at.expect("stopped");
    assert_eq!(report.savepoint.as_deref(), Some("v1-final"));
    let first_half = &all[..all.len() / 2];
    let accounts: std::collections::BTreeSet<u32> = first_half.iter().map(|p| p.0).collect();
    let kinds: std::collections::BTreeSet<(u32, u8)> =
        first_half.iter().map(|p| (p.0, kind(p.1))).collect();

    // Version 2 starts from it, keeping only one checkpoint.
    let (source, gate) = gated(&all);
    open(&gate);
    let from_savepoint = || {
        builder()
            .restore_from_savepoint("v1-final")
            .retain_checkpoints(1)
    };
    let report = v2(dir, source, from_savepoint(), parallelism, states)
        .run()
        .unwrap();
    assert_eq!(report.restored_from, Some(stopped_at));
    assert_eq!(
        committed_lines(&dir.join("out")),
        expected,
        "version 2 continued every balance where version 1 left it"
    );
    assert_eq!(
        counters.0.load(Ordering::SeqCst),
        accounts.len(),
        "every balance converted once"
    );
    assert_eq!(
        counters.1.load(Ordering::SeqCst),
        kinds.len(),
        "every map entry converted once"
    );

    // Restarts of version 2 (with the setting kept) resume from its own checkpoints;
    // retention keeps the savepoint's checkpoint through them all.
    for _ in 0..3 {
        let (source, gate) = gated(&all);
        open(&gate);
        let job = v2(dir, source, from_savepoint(), 2, states);
        job.stop_handle().stop();
        let report = job.run().unwrap();
        assert!(report.restored_from.unwrap() > stopped_at);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let st = CheckpointStorage::from_url(&storage(dir)).unwrap();
    let (ids, _) = rt.block_on(st.scan()).unwrap();
    assert_eq!(ids.len(), 2, "the savepoint's and the newest: {ids:?}");
    assert_eq!(ids[0], stopped_at);
    let sp = rt.block_on(st.read_savepoint("v1-final")).unwrap().unwrap();
    assert_eq!(sp.checkpoint, stopped_at);
    assert_eq!(committed_lines(&dir.join("out")), expected);
}

/// One upgrade test: version 2's states (version 2 of both, converting version 1's
/// values, counted in the test's own statics) and the upgrade on `backend` to
/// `parallelism`.
macro_rules! upgrade_test {
    ($(#[$attr:meta])* $test:ident, $backend:expr, $parallelism:expr) => {
        $(#[$attr])*
        #[test]
        fn $test() {
            static VALUES: AtomicUsize = AtomicUsize::new(0);
            static ENTRIES: AtomicUsize = AtomicUsize::new(0);
            const BALANCE: ValueState<Cents> = ValueState::new("balance")
                .version(2)
                .migrate_from::<i64>(|units| {
                    VALUES.fetch_add(1, Ordering::SeqCst);
                    Cents { cents: units * 100 }
                });
            const BY_KIND: MapState<u8, Cents> = MapState::new("by-kind")
                .version(2)
                .migrate_from::<i64>(|units| {
                    ENTRIES.fetch_add(1, Ordering::SeqCst);
                    Cents { cents: units * 100 }
                });
            upgrade_from_a_savepoint($backend, $parallelism, (BALANCE, BY_KIND), (&VALUES, &ENTRIES));
        }
    };
}

upgrade_test!(
    a_new_version_starts_from_a_savepoint_with_renamed_operators_and_migrated_state,
    StateBackend::Memory,
    3
);
upgrade_test!(
    #[cfg(feature = "rocksdb")]
    a_new_version_starts_from_a_savepoint_with_migrated_state_on_rocksdb,
    StateBackend::rocksdb(),
    2
);
upgrade_test!(
    #[cfg(feature = "rocksdb")]
    a_new_version_starts_from_a_savepoint_with_migrated_state_on_rocksdb_rescaled,
    StateBackend::rocksdb(),
    3
);

/// A savepoint restored over checkpoints taken after it (without starting from it)
/// would commit their output again; a missing or taken name is an error, as is a new
/// version of a state without a conversion.
#[test]
fn savepoint_and_version_mistakes_are_refused() {
    let all = payments(4_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (source, gate) = gated(&all);
    let job = v1(dir, source, Job::builder("ledger"));
    run_at_gate_then(&job, &gate, |stop| stop.stop_with_savepoint("before")).unwrap();
    let committed = committed_lines(&dir.join("out"));

    let err = v1(
        dir,
        VecSource::new(Vec::new()),
        Job::builder("ledger").restore_from_savepoint("befor"),
    )
    .run()
    .unwrap_err()
    .to_string();
    assert!(err.contains("'befor' does not exist"), "{err}");
    assert!(
        err.contains("'before'"),
        "lists the savepoints there: {err}"
    );

    // A name is given once.
    let (source, gate) = gated(&all);
    let job = v1(dir, source, Job::builder("ledger"));
    let err = run_at_gate_then(&job, &gate, |stop| stop.stop_with_savepoint("before"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("'before' exists already"), "{err}");
    assert_eq!(committed_lines(&dir.join("out")), committed);

    // The same version goes on after the savepoint...
    let (source, gate) = gated(&all);
    open(&gate);
    v1(dir, source, Job::builder("ledger")).run().unwrap();
    let after = committed_lines(&dir.join("out"));
    assert!(after.len() > committed.len());
    // ...so the savepoint is no longer where the job is.
    let err = v1(
        dir,
        VecSource::new(Vec::new()),
        Job::builder("ledger").restore_from_savepoint("before"),
    )
    .run()
    .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Stop);
    assert!(
        err.to_string().contains("would commit that output again"),
        "{err}"
    );

    // A state at a new version needs a conversion from the old one.
    const UNCONVERTED: ValueState<Cents> = ValueState::new("balance").version(2);
    let job = Job::builder("ledger")
        .parallelism(2)
        .checkpoint_storage(storage(dir))
        .build()
        .unwrap();
    // The restored source has ended; a new one brings records to the state.
    job.source("payments", VecSource::new(Vec::new()))
        .union(&job.source("more-payments", VecSource::new(payments(10))))
        .key_by(|p| p.0)
        .process_fn(|(a, n), ctx: &mut KeyedContext<'_, u32, (u32, i64)>| {
            let mut b = ctx.value(UNCONVERTED)?.unwrap_or(Cents { cents: 0 });
            b.cents += n;
            ctx.set_value(UNCONVERTED, &b)?;
            ctx.emit((a, b.cents));
            Ok(())
        })
        .name("balance")
        .sink("balances", FileSink::exactly_once(dir.join("out")));
    let err = job.run().unwrap_err().to_string();
    assert!(err.contains("without a migration"), "{err}");
    assert!(err.contains("migrate_from"), "{err}");
    assert_eq!(
        committed_lines(&dir.join("out")),
        after,
        "refused runs commit nothing"
    );
}

/// A rename on purpose restores the state; a mapping to a name another operator has is
/// refused.
#[test]
fn restore_state_of_carries_a_renamed_operators_state() {
    let all = payments(10_000);
    let golden = tempfile::tempdir().unwrap();
    v1(
        golden.path(),
        VecSource::new(all.clone()),
        Job::builder("ledger"),
    )
    .run()
    .unwrap();
    let expected = committed_lines(&golden.path().join("out"));

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (source, gate) = gated(&all);
    run_stopped_at_gate(&v1(dir, source, Job::builder("ledger")), &gate);

    // Without the mapping the renamed operators' state has no place.
    let rename = |source: VecSource<(u32, i64)>, map: bool| {
        let job = Job::builder("ledger")
            .parallelism(2)
            .checkpoint_storage(storage(dir))
            .build()
            .unwrap();
        let mut s = job.source("payments-in", source);
        if map {
            s = s.restore_state_of("payments");
        }
        let mut keyed = balances(s).name("account-balance");
        if map {
            keyed = keyed.restore_state_of("balance");
        }
        keyed.sink("balances", FileSink::exactly_once(dir.join("out")));
        job.run()
    };
    let err = rename(VecSource::new(all.clone()), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("state of operator 'balance'"), "{err}");
    // The gated source was at offset half: the renamed one continues from there.
    rename(VecSource::new(all.clone()), true).unwrap();
    assert_eq!(committed_lines(&dir.join("out")), expected);
    // Once a checkpoint holds the state under the new names, the mapping is not needed.
    let report = rename(VecSource::new(all.clone()), false).unwrap();
    assert!(report.restored_from.is_some());
    assert_eq!(committed_lines(&dir.join("out")), expected);

    // Two operators cannot own one operator's state.
    let job = Job::builder("ledger")
        .checkpoint_storage(storage(dir))
        .build()
        .unwrap();
    job.source("payments-in", VecSource::new(payments(10)))
        .map(|p| p)
        .name("copy")
        .restore_state_of("payments-in")
        .sink("balances", FileSink::exactly_once(dir.join("out")));
    let err = job.run().unwrap_err().to_string();
    assert!(
        err.contains("each operator's state goes to one operator"),
        "{err}"
    );
}

/// A savepoint taken through the job handle while the job runs: a checkpoint at once,
/// kept under its name through retention, while the job goes on to finish; a taken
/// name and a job that has ended are answered with errors.
#[test]
fn a_savepoint_taken_while_the_job_runs_survives_retention() {
    let all = payments(20_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (source, gate) = gated(&all);
    // No periodic checkpoints: the savepoint's checkpoint is the one it asked for.
    let job = v1(dir, source, Job::builder("ledger").retain_checkpoints(1));
    let handle = job.start().unwrap();
    common::gated::wait_at(&gate);
    let id = handle.savepoint("mid-run").unwrap();
    let err = handle.savepoint("mid-run").unwrap_err();
    assert!(err.to_string().contains("exists already"), "{err}");
    let err = handle.savepoint("../x").unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    open(&gate);
    let report = handle.wait().unwrap();
    let last = report.checkpoints.last().unwrap().id;
    assert!(
        last > id,
        "the job went on after the savepoint: {last} > {id}"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let st = CheckpointStorage::from_url(&storage(dir)).unwrap();
    let sp = rt.block_on(st.read_savepoint("mid-run")).unwrap().unwrap();
    assert_eq!(sp.checkpoint, id);
    let (ids, _) = rt.block_on(st.scan()).unwrap();
    assert_eq!(
        ids,
        vec![id, last],
        "retention keeps the savepoint's checkpoint"
    );
    // It was taken at the gate: the output it committed is the first half of the input.
    let m = rt.block_on(st.read_manifest(id)).unwrap();
    assert!(!m.is_final);
    let upto_savepoint: usize = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.strip_prefix("part-balances-")
                .and_then(|r| r.split('-').next())
                .and_then(|c| c.parse::<u64>().ok())
                .is_some_and(|c| c <= id.0)
        })
        .map(|n| {
            std::fs::read_to_string(dir.join("out").join(n))
                .unwrap()
                .lines()
                .count()
        })
        .sum();
    assert_eq!(upto_savepoint, all.len() / 2);
    assert_eq!(committed_lines(&dir.join("out")).len(), all.len());

    // A job that has ended takes no savepoint.
    let (source, gate) = gated(&all);
    open(&gate);
    let handle = v1(dir, source, Job::builder("ledger")).start().unwrap();
    while !handle.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let err = handle.savepoint("too-late").unwrap_err();
    assert!(err.to_string().contains("ended"), "{err}");
    assert!(rt
        .block_on(st.read_savepoint("too-late"))
        .unwrap()
        .is_none());
}
