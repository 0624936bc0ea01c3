//! Rows per second into PostgreSQL through the exactly-once sink, per mode, and the
//! latency its commits add to each checkpoint.
//!
//! `scripts/with-pg.sh cargo bench --bench postgres` (starts a private PostgreSQL on
//! 127.0.0.1 and sets `EXACTLY_PG_URL`). `EXACTLY_BENCH_ROWS` sets the row count
//! (default 5,000,000). Each mode writes into a fresh table of (id, account, amount)
//! with multi-row inserts, parallelism 2, a checkpoint every second; the table is
//! counted afterwards. "Commit latency" is the time from the last acknowledgement of a
//! checkpoint to its manifest written and its output committed (median over the run's
//! checkpoints); the no-op sink row (a sink that only counts) shows that time without a database.

#[path = "common/mod.rs"]
mod common;

use common::{commit_latencies, env_num, listing, median, CountSink};
use exactly::prelude::*;
use exactly::sinks::postgres::client::{Client, NoTls};
use exactly::sinks::postgres::{PostgresSink, Sql};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

#[derive(Clone, Serialize, Deserialize)]
struct Row {
    id: i64,
    account: String,
    amount: i64,
}

enum Target {
    Discard,
    Postgres { url: String, two_phase: bool },
}

fn run(label: &str, rows: u64, target: Target) {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::builder("pg-bench")
        .checkpoint_storage(dir.path().to_str().unwrap())
        .checkpoint_every(Duration::from_secs(1))
        .parallelism(2)
        .build()
        .unwrap();
    let stream = job.source(
        "rows",
        GeneratorSource::new(rows, |i| Row {
            id: i as i64,
            account: format!("acct-{}", i % 10_000),
            amount: (i % 1000) as i64,
        })
        .with_splits(2),
    );
    let table = format!("bench_{}", label.replace('-', "_"));
    match &target {
        Target::Discard => {
            stream.sink("out", CountSink::<Row>::default());
        }
        Target::Postgres { url, two_phase } => {
            let mut c = Client::connect(url, NoTls).unwrap();
            c.batch_execute(&format!(
                "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigint, account text, amount bigint)"
            ))
            .unwrap();
            let sql = Sql::insert(&table, &["id", "account", "amount"]);
            let map = |r: &Row| (r.id, r.account.clone(), r.amount);
            let sink = if *two_phase {
                PostgresSink::two_phase(url, sql, map)
            } else {
                PostgresSink::idempotent(url, sql, map)
            };
            stream.sink("out", sink);
        }
    }
    let t = Instant::now();
    let report = job.run().unwrap();
    let elapsed = t.elapsed();
    if let Target::Postgres { url, .. } = &target {
        let mut c = Client::connect(url, NoTls).unwrap();
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .unwrap()
            .get(0);
        assert_eq!(n as u64, rows, "every row committed exactly once");
    }
    let commit = commit_latencies(&report);
    println!(
        "{label:>12}: {:>9.0} rows/s, {} checkpoints, median commit latency {:?} (max {:?})",
        rows as f64 / elapsed.as_secs_f64(),
        report.checkpoints.len(),
        median(commit.clone()),
        commit.iter().max().copied().unwrap_or_default()
    );
}

fn main() {
    if listing() {
        return;
    }
    let rows = env_num("EXACTLY_BENCH_ROWS", 5_000_000);
    let Ok(url) = std::env::var("EXACTLY_PG_URL") else {
        eprintln!(
            "EXACTLY_PG_URL is not set; run `scripts/with-pg.sh cargo bench --bench postgres`"
        );
        std::process::exit(1);
    };
    println!("{rows} rows of (bigint, text, bigint), parallelism 2, checkpoint every 1 s");
    run("no-op sink", rows, Target::Discard);
    run(
        "two-phase",
        rows,
        Target::Postgres {
            url: url.clone(),
            two_phase: true,
        },
    );
    run(
        "idempotent",
        rows,
        Target::Postgres {
            url,
            two_phase: false,
        },
    );
}
