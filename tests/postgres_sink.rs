//! Exactly-once into a real PostgreSQL (a private cluster `scripts/test.sh` starts on
//! 127.0.0.1 with `max_prepared_transactions` set), in both sink modes.
//!
//! The reconciliation job writes its ledger (every posting) into a table while it is
//! crashed at the named steps of the commit protocol (after the prepare, after the
//! manifest but before the commit, between the commits of two sink subtasks, during
//! recovery) and by SIGKILL at random moments. After the final run the table must hold
//! exactly the postings the independent verifier recomputes from the input (no extra
//! row, no missing row), the file outputs must verify, and no prepared transaction or
//! staged row of the job may be left. Each test uses its own database, so tests running
//! at the same time cannot roll back each other's prepared transactions.

mod common;

use common::{example_binary, seed, xorshift};
use exactly::engine::failpoints;
use exactly::sinks::postgres::client::{Client, NoTls};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn server_url() -> String {
    std::env::var("EXACTLY_PG_URL").expect(
        "EXACTLY_PG_URL is not set: run the suite with ./scripts/test.sh, which starts PostgreSQL",
    )
}

struct Case {
    bin: PathBuf,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    url: String,
    mode: &'static str,
    /// Pause after each source batch (there are six splits reading in parallel).
    pace_us: u64,
}

/// An empty database named `name`; returns its connection string.
fn fresh_database(name: &str) -> String {
    let server = server_url();
    let mut admin = Client::connect(&server, NoTls).unwrap();
    // Two statements: DROP/CREATE DATABASE cannot share an implicit transaction.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let url = server.replace("dbname=postgres", &format!("dbname={name}"));
    assert_ne!(url, server, "EXACTLY_PG_URL must name dbname=postgres");
    url
}

/// Input for `trips` trips and an empty database named `name`.
fn setup_with(name: &str, mode: &'static str, trips: u64) -> Case {
    let url = fresh_database(name);
    let bin = example_binary("reconciliation", &["failpoints"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    common::generate(
        &bin,
        &["--trips", &trips.to_string(), "--seed", "5", "--dir"],
        &dir,
    );
    Case {
        bin,
        _tmp: tmp,
        dir,
        url,
        mode,
        pace_us: 8000,
    }
}

/// 30,000 trips (about 95,000 events): a paced run spans 10-60 checkpoints.
fn setup(name: &str, mode: &'static str) -> Case {
    setup_with(name, mode, 30_000)
}

impl Case {
    fn command(&self, parallelism: usize, crash: Option<&str>) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("run")
            .arg("--dir")
            .arg(&self.dir)
            .args(["--checkpoint-ms", "20"])
            .args(["--parallelism", &parallelism.to_string()])
            // Small, paced batches: the run spans many checkpoints.
            .args([
                "--batch-size",
                "128",
                "--pace-us",
                &self.pace_us.to_string(),
            ])
            .args(["--ledger-postgres", &self.url])
            .args(["--ledger-commit", self.mode]);
        if let Some(spec) = crash {
            c.env("EXACTLY_CRASH_AT", spec);
        }
        c
    }

    fn run(&self, parallelism: usize, crash: Option<&str>) -> Output {
        self.command(parallelism, crash).output().unwrap()
    }

    /// Run until the fail point `spec` aborts the process; returns the number of
    /// prepared transactions the crash left behind.
    fn crash(&self, parallelism: usize, spec: &str) -> i64 {
        let out = self.run(parallelism, Some(spec));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(6),
            "the run must abort at {spec}: {}\n{stderr}",
            out.status
        );
        self.prepared()
    }

    fn query_count(&self, sql: &str) -> i64 {
        let mut c = Client::connect(&self.url, NoTls).unwrap();
        c.query_one(sql, &[]).unwrap().get(0)
    }

    fn prepared_gids(&self) -> Vec<String> {
        let mut c = Client::connect(&self.url, NoTls).unwrap();
        c.query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    fn prepared(&self) -> i64 {
        self.query_count(
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
        )
    }

    /// Finish without failures; the table must equal the recomputed ledger exactly.
    fn finish_and_check(&self) {
        let out = self.run(2, None);
        assert!(
            out.status.success(),
            "final run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let verify = Command::new(&self.bin)
            .arg("verify")
            .arg("--dir")
            .arg(&self.dir)
            .args(["--ledger-postgres", &self.url])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&verify.stdout);
        println!("{report}");
        assert!(
            verify.status.success() && report.contains("VERIFIED"),
            "{report}"
        );
        assert!(report.contains(", 0 extra, 0 missing"), "{report}");
        let rows = self.query_count("SELECT count(*) FROM ledger");
        assert!(rows > 40_000, "{rows} ledger rows");
        assert_eq!(self.prepared(), 0, "prepared transactions left behind");
        if self.mode == "idempotent" {
            assert_eq!(
                self.query_count("SELECT count(*) FROM exactly_sink_staging"),
                0,
                "staged rows left behind"
            );
            assert!(self.query_count("SELECT count(*) FROM exactly_sink_commits") > 0);
        }
    }
}

fn crash_then_check(name: &str, mode: &'static str, point: &str, nth: u64) -> i64 {
    let case = setup(name, mode);
    let left = case.crash(2, &format!("{point}:{nth}"));
    println!("{mode}: crashed at {point} (hit {nth}) with {left} prepared transaction(s) pending");
    case.finish_and_check();
    left
}

#[test]
fn two_phase_crash_after_prepare() {
    crash_then_check(
        "pg_2pc_prepare",
        "two-phase",
        failpoints::AFTER_PRE_COMMIT,
        15,
    );
}

#[test]
fn two_phase_crash_after_manifest_before_commit() {
    let left = crash_then_check(
        "pg_2pc_manifest",
        "two-phase",
        failpoints::AFTER_MANIFEST,
        4,
    );
    assert!(
        left > 0,
        "the crash must leave the completed checkpoint's transactions prepared"
    );
}

#[test]
fn two_phase_crash_between_commits() {
    between_commits("pg_2pc_between", "two-phase");
}

#[test]
fn two_phase_crash_during_recovery() {
    during_recovery("pg_2pc_recovery", "two-phase");
}

#[test]
fn two_phase_random_sigkills() {
    random_sigkills("pg_2pc_kills", "two-phase");
}

#[test]
fn idempotent_crash_after_staging() {
    crash_then_check(
        "pg_idem_stage",
        "idempotent",
        failpoints::AFTER_PRE_COMMIT,
        15,
    );
}

#[test]
fn idempotent_crash_after_manifest_before_commit() {
    crash_then_check(
        "pg_idem_manifest",
        "idempotent",
        failpoints::AFTER_MANIFEST,
        4,
    );
}

#[test]
fn idempotent_crash_between_commits() {
    between_commits("pg_idem_between", "idempotent");
}

#[test]
fn idempotent_crash_during_recovery() {
    during_recovery("pg_idem_recovery", "idempotent");
}

#[test]
fn idempotent_random_sigkills() {
    random_sigkills("pg_idem_kills", "idempotent");
}

/// Crash between the commits of the two ledger subtasks of one checkpoint. A
/// manifest's commits run by sink and subtask, so the ledger's two are adjacent; the
/// crash is repeated at later commits until one lands between them, which shows as
/// exactly subtask 1's transaction still prepared.
fn between_commits(name: &str, mode: &'static str) {
    // Enough input that the crash-and-restart cycles below cannot finish the job.
    let case = setup_with(name, mode, 60_000);
    let mut landed = false;
    for attempt in 0..15 {
        let nth = 2 + attempt % 5;
        case.crash(2, &format!("{}:{nth}", failpoints::BETWEEN_COMMITS));
        let gids = case.prepared_gids();
        println!("{mode}: crash at commit boundary {nth}: prepared {gids:?}");
        if mode == "idempotent" {
            // Subtask 0's marker (and rows) committed, subtask 1's rows still staged.
            let latest =
                case.query_count("SELECT coalesce(max(checkpoint), 0) FROM exactly_sink_commits");
            let markers = case.query_count(&format!(
                "SELECT coalesce(sum(subtask + 1), 0) FROM exactly_sink_commits WHERE checkpoint = {latest}"
            ));
            let staged = case.query_count("SELECT count(*) FROM exactly_sink_staging");
            landed = markers == 1 && staged > 0;
        } else if let [only] = gids.as_slice() {
            // exactly:<job>:<sink>:<checkpoint>:<subtask>:g<generation>
            landed = only.starts_with("exactly:reconciliation:ledger:")
                && only.split(':').nth(4) == Some("1");
        }
        if landed {
            break;
        }
    }
    assert!(
        landed,
        "no crash landed between the commits of the ledger's two subtasks"
    );
    case.finish_and_check();
}

/// Crash after a manifest, then crash again while restoring, then restore at
/// parallelism 3.
fn during_recovery(name: &str, mode: &'static str) {
    let case = setup_with(name, mode, 40_000);
    case.crash(2, &format!("{}:4", failpoints::AFTER_MANIFEST));
    let out = case.run(3, Some(&format!("{}:1", failpoints::DURING_RESTORE)));
    assert_eq!(out.status.signal(), Some(6), "crash during restore");
    let ok = case.run(3, None);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    case.finish_and_check();
}

/// SIGKILL at random moments, restarting at parallelism 1, 2 or 3.
fn random_sigkills(name: &str, mode: &'static str) {
    let mut case = setup(name, mode);
    // Slower sources: the whole run takes several seconds, so the kills land in it.
    case.pace_us = 30_000;
    let mut s = seed();
    let path: &Path = &case.dir;
    let mut kills = 0;
    for _ in 0..8 {
        let p = 1 + (xorshift(&mut s) % 3) as usize;
        let mut child = case.command(p, None).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(100 + xorshift(&mut s) % 600));
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the job failed on its own: {status}");
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    println!(
        "{mode}: {kills} SIGKILLs in {}; {} prepared transaction(s) pending after the last",
        path.display(),
        case.prepared()
    );
    assert!(kills >= 4, "the job finished before most kills");
    case.finish_and_check();
}

/// A server with `max_prepared_transactions = 0` (the second cluster the test script
/// starts): the two-phase sink is refused at job start with an error naming the
/// setting, before any record is read; the idempotent sink works there.
#[test]
fn two_phase_is_refused_without_prepared_transactions() {
    use exactly::prelude::*;
    use exactly::sinks::postgres::{PostgresSink, Sql};
    use exactly::testing::VecSource;
    let url = std::env::var("EXACTLY_PG_NO2PC_URL").expect(
        "EXACTLY_PG_NO2PC_URL is not set: run the suite with ./scripts/test.sh, which starts PostgreSQL",
    );
    let mut c = Client::connect(&url, NoTls).unwrap();
    c.batch_execute("DROP TABLE IF EXISTS refused; CREATE TABLE refused (n bigint)")
        .unwrap();
    let run = |two_phase: bool| {
        let tmp = tempfile::tempdir().unwrap();
        let job = Job::builder("no2pc")
            .checkpoint_storage(tmp.path().to_str().unwrap())
            .restart_policy(RestartPolicy::none())
            .build()
            .unwrap();
        let sql = Sql::insert("refused", &["n"]);
        let map = |n: &i64| (*n,);
        let sink = if two_phase {
            PostgresSink::two_phase(&url, sql, map)
        } else {
            PostgresSink::idempotent(&url, sql, map)
        };
        job.source("numbers", VecSource::new((0..1000i64).collect()))
            .sink("out", sink);
        job.run()
    };
    let err = run(true).expect_err("two-phase commit needs prepared transactions");
    assert!(
        matches!(err, Error::Config { .. })
            && err.to_string().contains("max_prepared_transactions = 0"),
        "{err}"
    );
    let rows: i64 = c
        .query_one("SELECT count(*) FROM refused", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "nothing was written");
    run(false).unwrap();
    let rows: i64 = c
        .query_one("SELECT count(*) FROM refused", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        rows, 1000,
        "the idempotent mode needs no prepared transactions"
    );
}

/// The server drops every connection of the sink (`pg_terminate_backend`), in both
/// modes. After a barrier, the staged output survives, and commit and recovery notice
/// the dead connection, reconnect and go through. Before a barrier, the writer's open
/// transaction is lost: pre-commit fails (the job restarts), and recovery from the last
/// checkpoint re-commits idempotently and leaves nothing prepared or staged.
#[test]
fn connection_loss_during_commit_and_writing() {
    use exactly::engine::api::{RecoveryContext, SinkContext, SinkWriter, TwoPhaseCommitSink};
    use exactly::engine::ids::{CheckpointId, OperatorId, SubtaskIndex};
    use exactly::sinks::postgres::{PostgresSink, Sql};
    let url = fresh_database("pg_connection_loss");
    let mut db = Client::connect(&url, NoTls).unwrap();
    let count = |db: &mut Client, sql: &str| -> i64 { db.query_one(sql, &[]).unwrap().get(0) };
    let drop_all_connections = |db: &mut Client| {
        let n = count(
            db,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        );
        assert!(n > 0, "the sink had connections to drop");
    };
    for two_phase in [true, false] {
        let table = if two_phase { "lost_2pc" } else { "lost_idem" };
        db.batch_execute(&format!("CREATE TABLE {table} (n bigint)"))
            .unwrap();
        let sql = Sql::insert(table, &["n"]);
        let map = |n: &i64| (*n,);
        let sink = if two_phase {
            PostgresSink::two_phase(&url, sql, map)
        } else {
            PostgresSink::idempotent(&url, sql, map)
        };
        let recovery = |restored: Option<u64>| RecoveryContext {
            job: "loss".into(),
            sink: OperatorId(table.into()),
            restored: restored.map(CheckpointId),
            generation: 1,
            storage_id: "test-location".to_string(),
            io: exactly::testing::io_runtime(),
        };
        sink.recover(&recovery(None), Vec::new()).unwrap();
        let mut w = sink
            .open_writer(&SinkContext {
                job: "loss".into(),
                sink: OperatorId(table.into()),
                subtask: SubtaskIndex(0),
                parallelism: 1,
                checkpoint_interval: None,
                generation: 1,
                io: exactly::testing::io_runtime(),
            })
            .unwrap();
        w.write(&mut (0..100).collect()).unwrap();
        let staged = w.pre_commit(CheckpointId(1)).unwrap().unwrap();

        drop_all_connections(&mut db);
        sink.commit(&staged).unwrap();
        let rows = format!("SELECT count(*) FROM {table}");
        assert_eq!(count(&mut db, &rows), 100, "committed once");

        w.write(&mut (100..200).collect()).unwrap();
        drop_all_connections(&mut db);
        assert!(
            w.pre_commit(CheckpointId(2)).is_err(),
            "the writer's transaction died with its connection"
        );
        // The restart: recovery from checkpoint 1 commits its output again (no effect).
        sink.recover(&recovery(Some(1)), vec![staged]).unwrap();
        assert_eq!(
            count(&mut db, &rows),
            100,
            "nothing doubled, nothing from the lost interval"
        );
        assert_eq!(
            count(
                &mut db,
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
            ),
            0
        );
        if !two_phase {
            assert_eq!(
                count(&mut db, "SELECT count(*) FROM exactly_sink_staging"),
                0
            );
        }
    }
}

/// Mistakes in a sink's configuration stop the job at once, with the server's own words
/// in the message, instead of three restarts as if the server were down (the default
/// policy would end in `RestartsExhausted`, not a configuration error).
#[test]
fn configuration_mistakes_stop_at_once_with_the_servers_message() {
    use exactly::prelude::*;
    use exactly::sinks::postgres::{PostgresSink, Sql};
    use exactly::testing::VecSource;
    let good = fresh_database("pg_mistakes");
    let mut c = Client::connect(&good, NoTls).unwrap();
    c.batch_execute("CREATE TABLE t (n bigint)").unwrap();
    let run = |url: &str, table: &str| {
        let tmp = tempfile::tempdir().unwrap();
        let job = Job::builder("mistakes")
            .checkpoint_storage(tmp.path().to_str().unwrap())
            .build()
            .unwrap();
        job.source("numbers", VecSource::new((0..100i64).collect()))
            .sink(
                "out",
                PostgresSink::two_phase(url, Sql::insert(table, &["n"]), |n: &i64| (*n,)),
            );
        job.run()
    };
    for (url, table, says) in [
        (
            good.replace("password=exactly-test", "password=wrong"),
            "t",
            "28P01",
        ),
        (
            good.replace("dbname=pg_mistakes", "dbname=pg_no_such_db"),
            "t",
            "3D000",
        ),
        (good.clone(), "no_such_table", "42P01"),
    ] {
        let err = run(&url, table).expect_err(says);
        assert!(
            matches!(err, Error::Config { .. }) && err.to_string().contains(says),
            "{says}: {err}"
        );
    }
    run(&good, "t").unwrap();
    let rows: i64 = c.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(rows, 100);
}

/// What an instance stages carries its fencing generation: a recovery of an older
/// instance that finds a newer instance's prepared transaction or staged rows stops
/// with `Fenced` and touches none of them; the newer instance's own recovery (or a yet
/// newer one's) aborts them as usual. Both modes.
#[test]
fn an_older_instance_never_aborts_what_a_newer_one_staged() {
    use exactly::engine::api::{RecoveryContext, SinkContext, SinkWriter, TwoPhaseCommitSink};
    use exactly::engine::ids::{OperatorId, SubtaskIndex};
    use exactly::prelude::*;
    use exactly::sinks::postgres::{PostgresSink, Sql};
    let url = fresh_database("pg_generations");
    let mut c = Client::connect(&url, NoTls).unwrap();
    c.batch_execute("CREATE TABLE t (n bigint)").unwrap();
    let count = |c: &mut Client, sql: &str| -> i64 { c.query_one(sql, &[]).unwrap().get(0) };
    for two_phase in [true, false] {
        let sql = Sql::insert("t", &["n"]);
        fn row(n: &i64) -> (i64,) {
            (*n,)
        }
        let sink = if two_phase {
            PostgresSink::two_phase(&url, sql, row)
        } else {
            PostgresSink::idempotent(&url, sql, row)
        };
        let recovery = |generation| RecoveryContext {
            job: "gen".into(),
            sink: OperatorId("out".into()),
            restored: None,
            generation,
            storage_id: "test-location".to_string(),
            io: exactly::testing::io_runtime(),
        };
        // Creates the staging tables of the idempotent mode.
        sink.recover(&recovery(1), vec![]).unwrap();
        let mut w = sink
            .open_writer(&SinkContext {
                job: "gen".into(),
                sink: OperatorId("out".into()),
                subtask: SubtaskIndex(0),
                parallelism: 1,
                checkpoint_interval: None,
                generation: 5,
                io: exactly::testing::io_runtime(),
            })
            .unwrap();
        w.write(&mut vec![1, 2, 3]).unwrap();
        let staged = w.pre_commit(CheckpointId(7)).unwrap().expect("staged");
        let pending = |c: &mut Client| {
            if two_phase {
                count(c, "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'exactly:gen:out:7:0:g5'")
            } else {
                count(
                    c,
                    "SELECT count(*) FROM exactly_sink_staging WHERE generation = 5",
                )
            }
        };
        assert_eq!(pending(&mut c), if two_phase { 1 } else { 3 });
        let err = sink.recover(&recovery(4), vec![]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Fenced {
                    epoch: 4,
                    newer: 5,
                    ..
                }
            ),
            "two-phase {two_phase}: {err}"
        );
        assert_eq!(pending(&mut c), if two_phase { 1 } else { 3 }, "untouched");
        // The newer instance itself restores it and commits it.
        sink.recover(&recovery(5), vec![staged]).unwrap();
        assert_eq!(pending(&mut c), 0);
        assert_eq!(count(&mut c, "SELECT count(*) FROM t"), 3);
        c.batch_execute("DELETE FROM t").unwrap();
    }
}

/// PostgreSQL stopped for 30 s in the middle of a run (an immediate shutdown, with
/// prepared transactions pending) is ridden out by the default restart policy: the
/// job restarts until the server is back, recovers the prepared checkpoint and ends
/// with every row exactly once. Runs on a cluster of its own, which it stops and
/// starts with the commands `scripts/pg-server.sh` exports.
#[test]
fn a_30_second_outage_is_survived_under_the_default_policy() {
    use exactly::sinks::postgres::{PostgresSink, Sql};
    use exactly::testing::VecSource;
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: run the suite with ./scripts/test.sh, which starts PostgreSQL"
            )
        })
    };
    let (server, stop, start) = (
        var("EXACTLY_PG_OUTAGE_URL"),
        var("EXACTLY_PG_OUTAGE_STOP"),
        var("EXACTLY_PG_OUTAGE_START"),
    );
    let sh = |cmd: &str| {
        let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut c = Client::connect(&server, NoTls).unwrap();
    c.batch_execute("DROP TABLE IF EXISTS outage; CREATE TABLE outage (n bigint)")
        .unwrap();
    let n = 20_000i64;
    let tmp = tempfile::tempdir().unwrap();
    let (builder, at_third) =
        exactly::engine::testing::job_for_outage("outage", tmp.path().to_str().unwrap());
    let job = builder.build().unwrap();
    job.source("numbers", VecSource::new((0..n).collect()))
        .sink(
            "out",
            PostgresSink::two_phase(&server, Sql::insert("outage", &["n"]), |n: &i64| (*n,)),
        );
    let running = std::thread::spawn(move || job.run());
    at_third.recv().unwrap();
    sh(&stop);
    std::thread::sleep(Duration::from_secs(30));
    sh(&start);
    let report = running.join().unwrap().unwrap();
    assert!(report.restarts >= 1, "the outage was seen");
    let mut c = Client::connect(&server, NoTls).unwrap();
    let (rows, distinct): (i64, i64) = {
        let r = c
            .query_one("SELECT count(*), count(DISTINCT n) FROM outage", &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((rows, distinct), (n, n), "every row exactly once");
}
