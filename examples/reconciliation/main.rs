//! Reconciliation of charges, payments and payouts, exactly once.
//!
//! ```text
//! reconciliation demo     [--dir reconciliation-demo] [generator and job flags]
//! reconciliation generate --dir DIR [--trips 200000] [--seed 7] [--duplicate-rate 0.05]
//!                         [--out-of-order-ms 30000] [--anomaly-rate 0.02] [--files 2]
//! reconciliation run      --dir DIR [--parallelism 2] [--checkpoint-ms 1000] [--out-of-order-ms 30000]
//!                         [--batch-size 1024] [--pace-us 0]
//!                         [--ledger-postgres 'host=... user=... dbname=...'] [--ledger-table ledger]
//!                         [--ledger-commit two-phase|idempotent]
//! reconciliation verify   --dir DIR [--ledger-postgres ... --ledger-table ledger]
//! ```
//!
//! `DIR/input` holds the generated streams and the ground truth, `DIR/out` the committed
//! output, `DIR/checkpoints` the job's checkpoints. `run` resumes from its checkpoints,
//! so it can be killed and started again at any moment (also at another parallelism).

#[path = "../common/args.rs"]
mod args;
mod generator;
mod job;
mod model;
mod verifier;

use anyhow::{bail, Result};
use args::Args;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Settings from the command line.
trait Settings {
    fn dir(&self) -> PathBuf;
    fn gen_config(&self) -> Result<generator::GenConfig>;
    fn job_config(&self) -> Result<job::JobConfig>;
    fn ledger_table(&self) -> Result<Option<job::LedgerTable>>;
}

impl Settings for Args {
    fn ledger_table(&self) -> Result<Option<job::LedgerTable>> {
        let Some(url) = self.0.get("ledger-postgres") else {
            if self.0.contains_key("ledger-table") || self.0.contains_key("ledger-commit") {
                bail!("--ledger-table and --ledger-commit need --ledger-postgres");
            }
            return Ok(None);
        };
        if !cfg!(feature = "postgres") {
            bail!(
                "--ledger-postgres needs the PostgreSQL sink, an opt-in feature: \
                 cargo run --release --features postgres --example reconciliation -- ..."
            );
        }
        let table = self
            .0
            .get("ledger-table")
            .cloned()
            .unwrap_or_else(|| "ledger".into());
        if table.is_empty() || !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("--ledger-table must be a plain table name (letters, digits, _), got '{table}'");
        }
        let two_phase = match self.0.get("ledger-commit").map(String::as_str) {
            None | Some("two-phase") => true,
            Some("idempotent") => false,
            Some(other) => bail!("--ledger-commit expects two-phase or idempotent, got '{other}'"),
        };
        Ok(Some(job::LedgerTable {
            url: url.clone(),
            table,
            two_phase,
        }))
    }

    fn dir(&self) -> PathBuf {
        self.path_or("dir", "reconciliation-demo")
    }

    fn gen_config(&self) -> Result<generator::GenConfig> {
        let c = generator::GenConfig {
            trips: self.num("trips", 200_000)?,
            seed: self.num("seed", 7)?,
            duplicate_rate: self.num("duplicate-rate", 0.05)?,
            out_of_order_ms: self.num("out-of-order-ms", 30_000)?,
            anomaly_rate: self.num("anomaly-rate", 0.02)?,
            files: self.num("files", 2)?,
        };
        if !(0.0..=1.0).contains(&c.duplicate_rate) || !(0.0..=1.0).contains(&c.anomaly_rate) {
            bail!("--duplicate-rate and --anomaly-rate are probabilities between 0 and 1");
        }
        if c.files == 0 || c.trips == 0 {
            bail!("--files and --trips must be at least 1");
        }
        Ok(c)
    }
    fn job_config(&self) -> Result<job::JobConfig> {
        Ok(job::JobConfig {
            parallelism: self.num("parallelism", 2)?,
            checkpoint_every: Duration::from_millis(self.num("checkpoint-ms", 1_000)?),
            out_of_order: Duration::from_millis(self.num("out-of-order-ms", 30_000)?),
            batch_size: self.num("batch-size", 1024)?,
            pacing: match self.num("pace-us", 0u64)? {
                0 => None,
                us => Some(Duration::from_micros(us)),
            },
            ledger_pg: self.ledger_table()?,
        })
    }
}

fn generate(a: &Args) -> Result<()> {
    let cfg = a.gen_config()?;
    let input = a.dir().join("input");
    let t = Instant::now();
    let g = generator::generate(&cfg, &input)?;
    eprintln!(
        "generated {} trips: {} events ({} redelivered duplicates, {} injected anomalies) in {} in {:.1}s",
        cfg.trips,
        g.events,
        g.duplicates,
        g.anomalies,
        input.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run(a: &Args) -> Result<()> {
    let dir = a.dir();
    let input = dir.join("input");
    if !input.join("anomalies.jsonl").exists() {
        bail!(
            "no input in {}: run `reconciliation generate --dir {}` first",
            input.display(),
            dir.display()
        );
    }
    let cfg = a.job_config()?;
    if let Some(pg) = &cfg.ledger_pg {
        create_ledger_table(pg)?;
    }
    let job = job::job("reconciliation", &dir.join("checkpoints"), &cfg, true)?;
    job::build(&job, &input, &dir.join("out"), &cfg);
    let report = job.run()?;
    let read: u64 = ["charges", "payments", "payouts"]
        .iter()
        .map(|s| {
            report
                .metrics
                .get(&format!("{s}.records"))
                .copied()
                .unwrap_or(0)
        })
        .sum();
    eprintln!(
        "job finished in {:.2}s ({} events read, restored from checkpoint {:?}, {} checkpoints, {} in-process restarts)",
        report.elapsed.as_secs_f64(),
        read,
        report.restored_from.map(|c| c.0),
        report.checkpoints.len(),
        report.restarts
    );
    Ok(())
}

/// Create the ledger table if it does not exist.
#[cfg(feature = "postgres")]
fn create_ledger_table(pg: &job::LedgerTable) -> Result<()> {
    use exactly::sinks::postgres::client::{Client, NoTls};
    let mut c = Client::connect(&pg.url, NoTls)?;
    c.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {} (account text NOT NULL, amount_cents bigint NOT NULL, ts bigint NOT NULL)",
        pg.table
    ))?;
    Ok(())
}

/// Without the feature `ledger_table` refuses `--ledger-postgres`, so there is no table.
#[cfg(not(feature = "postgres"))]
fn create_ledger_table(_: &job::LedgerTable) -> Result<()> {
    unreachable!("--ledger-postgres is refused without the postgres feature")
}

fn verify(a: &Args) -> Result<()> {
    let dir = a.dir();
    let report = verifier::verify(&dir.join("input"), &dir.join("out"), a.ledger_table()?)?;
    report.print();
    if !report.passed() {
        bail!("verification failed");
    }
    Ok(())
}

fn demo(a: &Args) -> Result<()> {
    let dir = a.dir();
    if !dir.join("input").join("anomalies.jsonl").exists() {
        generate(a)?;
    } else {
        eprintln!("using the input already in {}", dir.join("input").display());
    }
    eprintln!("running the job: kill it at any moment and run the same command again, it resumes");
    run(a)?;
    verify(a)?;
    eprintln!(
        "output in {}; delete {} to start over",
        dir.join("out").display(),
        dir.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    args::start()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("demo");
    let rest = if args.is_empty() { &[][..] } else { &args[1..] };
    let a = Args::parse(rest)?;
    const GEN: &[&str] = &[
        "dir",
        "trips",
        "seed",
        "duplicate-rate",
        "out-of-order-ms",
        "anomaly-rate",
        "files",
    ];
    const JOB: &[&str] = &[
        "dir",
        "parallelism",
        "checkpoint-ms",
        "out-of-order-ms",
        "batch-size",
        "pace-us",
        "ledger-postgres",
        "ledger-table",
        "ledger-commit",
    ];
    match cmd {
        "demo" => {
            a.only(cmd, &[GEN, JOB].concat())?;
            demo(&a)
        }
        "generate" => {
            a.only(cmd, GEN)?;
            generate(&a)
        }
        "run" => {
            a.only(cmd, JOB)?;
            run(&a)
        }
        "verify" => {
            a.only(cmd, &["dir", "ledger-postgres", "ledger-table"])?;
            verify(&a)
        }
        other => bail!("unknown command '{other}'; expected demo, generate, run or verify"),
    }
}
