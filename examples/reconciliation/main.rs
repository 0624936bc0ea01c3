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
//! With the `kafka` feature, `run --kafka host:port` reads the three streams from
//! topics `reconciliation-charges`, `-payments` and `-payouts` (`--topic-prefix`) and
//! writes the outputs into `reconciliation-results`, `-daily-totals` and `-balances`
//! through the transactional sink; `verify --kafka host:port` reads those with
//! `read_committed`. Started N times with `EXACTLY_INSTANCES=N` and
//! `EXACTLY_INSTANCE=0..N`, `run --kafka` is one job across N processes (see "Beyond
//! one machine" in the README).
//!
//! `reconciliation --help` and `reconciliation <command> --help` describe every flag
//! (`--flag value` and `--flag=value` both work).
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
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The allocator the README recommends for jobs that allocate per record.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The flags of a command, as the commands' functions read them.
struct Flags {
    dir: PathBuf,
    out_of_order_ms: i64,
    /// Present for `demo` and `generate`.
    gen: Option<GenFlags>,
    /// Present for `demo` and `run`.
    job: Option<JobFlags>,
    ledger: LedgerFlags,
    kafka: KafkaFlags,
}

/// Kafka topics instead of files (feature `kafka`).
#[derive(clap::Args, Default)]
struct KafkaFlags {
    /// Read the streams from, and write the outputs to, topics on these brokers
    /// (host:port[,host:port]).
    #[arg(long, value_name = "BROKERS")]
    kafka: Option<String>,
    /// The topics' names: <prefix>charges, <prefix>payments, <prefix>payouts in,
    /// <prefix>results, <prefix>daily-totals, <prefix>balances out.
    #[arg(long = "topic-prefix", default_value = "reconciliation-")]
    topic_prefix: String,
    /// Where records wait between a checkpoint's barrier and their commit
    /// (default DIR/kafka-staging).
    #[arg(long = "kafka-staging", value_name = "DIR")]
    kafka_staging: Option<PathBuf>,
}

/// `--dir`: input, output and checkpoints live under it.
#[derive(clap::Args)]
struct DirFlag {
    /// Working directory: DIR/input, DIR/out, DIR/checkpoints.
    #[arg(long, default_value = "reconciliation-demo")]
    dir: PathBuf,
}

/// `--out-of-order-ms`: how far events are out of order (the generator's disorder and
/// the job's watermark bound).
#[derive(clap::Args)]
struct DisorderFlag {
    /// Largest delay of an event behind its timestamp, in milliseconds.
    #[arg(long = "out-of-order-ms", default_value_t = 30_000)]
    out_of_order_ms: i64,
}

/// The generator's flags.
#[derive(clap::Args)]
struct GenFlags {
    /// Trips to generate.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    trips: u64,
    /// Seed (same seed, same input).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Probability that an event is delivered twice.
    #[arg(long = "duplicate-rate", default_value_t = 0.05)]
    duplicate_rate: f64,
    /// Probability that a trip carries an anomaly.
    #[arg(long = "anomaly-rate", default_value_t = 0.02)]
    anomaly_rate: f64,
    /// Files per stream (read in parallel).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    files: u64,
}

/// The job's flags.
#[derive(clap::Args)]
struct JobFlags {
    /// Parallelism of every operator.
    #[arg(long, default_value_t = 2)]
    parallelism: usize,
    /// Checkpoint interval in milliseconds.
    #[arg(long = "checkpoint-ms", default_value_t = 1_000)]
    checkpoint_ms: u64,
    /// Records per batch.
    #[arg(long = "batch-size", default_value_t = 1024)]
    batch_size: usize,
    /// Pause this many microseconds after every source batch (tests slow the job down).
    #[arg(long = "pace-us", default_value_t = 0)]
    pace_us: u64,
    /// Let a checkpoint go unaligned after aligning this long (0: always unaligned;
    /// unset: always aligned).
    #[arg(long = "aligned-checkpoint-timeout-ms", value_name = "MS")]
    aligned_checkpoint_timeout_ms: Option<u64>,
    /// How the ledger table is written.
    #[arg(long = "ledger-commit", value_enum, requires = "ledger_postgres")]
    ledger_commit: Option<LedgerCommit>,
    /// Keep the checkpoint of a stop (SIGTERM, Ctrl-C) as savepoint NAME, to start the
    /// next version of the job from.
    #[arg(long = "savepoint-on-stop", value_name = "NAME")]
    savepoint_on_stop: Option<String>,
    /// Start from savepoint NAME (taken by a run with --savepoint-on-stop): the way to
    /// deploy a new version.
    #[arg(long = "from-savepoint", value_name = "NAME")]
    from_savepoint: Option<String>,
    /// Where the checkpoints go: a directory or s3://bucket/prefix (default
    /// DIR/checkpoints).
    #[arg(long, value_name = "LOCATION")]
    checkpoints: Option<String>,
    /// Key groups: the most subtasks a keyed operator can ever have over all instances,
    /// and with Kafka the partitions of each repartition topic. Fixed for the job's
    /// life (a restore with another number is refused).
    #[arg(long = "max-parallelism", default_value_t = 128,
          value_parser = clap::value_parser!(u16).range(1..=32768))]
    max_parallelism: u16,
    /// The job's name: with Kafka it names the transactional ids and the repartition
    /// topics, so two deployments on one cluster need different names.
    #[arg(long, default_value = "reconciliation")]
    name: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LedgerCommit {
    /// Two-phase commit (PREPARE TRANSACTION; needs max_prepared_transactions > 0).
    TwoPhase,
    /// Idempotent transactional commits with marker rows.
    Idempotent,
}

/// Where the ledger also goes: a PostgreSQL table (feature `postgres`).
#[derive(clap::Args)]
struct LedgerFlags {
    /// Also write every posting to PostgreSQL ('host=... user=... dbname=...').
    #[arg(long = "ledger-postgres", id = "ledger_postgres")]
    ledger_postgres: Option<String>,
    /// The ledger table's name.
    #[arg(long = "ledger-table", requires = "ledger_postgres")]
    ledger_table: Option<String>,
}

/// Settings from the command line.
impl Flags {
    fn ledger_table(&self) -> Result<Option<job::LedgerTable>> {
        let Some(url) = &self.ledger.ledger_postgres else {
            return Ok(None);
        };
        if !cfg!(feature = "postgres") {
            bail!(
                "--ledger-postgres needs the PostgreSQL sink, an opt-in feature: \
                 cargo run --release --features postgres --example reconciliation -- ..."
            );
        }
        let table = self
            .ledger
            .ledger_table
            .clone()
            .unwrap_or_else(|| "ledger".into());
        if table.is_empty() || !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("--ledger-table must be a plain table name (letters, digits, _), got '{table}'");
        }
        let commit = self.job.as_ref().and_then(|j| j.ledger_commit);
        Ok(Some(job::LedgerTable {
            url: url.clone(),
            table,
            two_phase: !matches!(commit, Some(LedgerCommit::Idempotent)),
        }))
    }

    fn dir(&self) -> PathBuf {
        self.dir.clone()
    }

    /// Files under DIR, or Kafka topics with `--kafka`.
    fn io(&self) -> Result<job::Io> {
        let Some(brokers) = &self.kafka.kafka else {
            return Ok(job::Io::Files {
                input: self.dir.join("input"),
                out: self.dir.join("out"),
            });
        };
        if !cfg!(feature = "kafka") {
            bail!(
                "--kafka needs the Kafka connectors, an opt-in feature: \
                 cargo run --release --features kafka --example reconciliation -- ..."
            );
        }
        Ok(job::Io::Kafka(job::KafkaIo {
            brokers: brokers.clone(),
            prefix: self.kafka.topic_prefix.clone(),
            staging: self
                .kafka
                .kafka_staging
                .clone()
                .unwrap_or_else(|| self.dir.join("kafka-staging")),
        }))
    }

    fn gen_config(&self) -> Result<generator::GenConfig> {
        let g = self
            .gen
            .as_ref()
            .expect("a command that generates has the generator's flags");
        let c = generator::GenConfig {
            trips: g.trips,
            seed: g.seed,
            duplicate_rate: g.duplicate_rate,
            out_of_order_ms: self.out_of_order_ms,
            anomaly_rate: g.anomaly_rate,
            files: g.files as usize,
        };
        if !(0.0..=1.0).contains(&c.duplicate_rate) || !(0.0..=1.0).contains(&c.anomaly_rate) {
            bail!("--duplicate-rate and --anomaly-rate are probabilities between 0 and 1");
        }
        if c.out_of_order_ms < 0 {
            bail!("--out-of-order-ms cannot be negative");
        }
        Ok(c)
    }

    fn job_config(&self) -> Result<job::JobConfig> {
        let j = self
            .job
            .as_ref()
            .expect("a command that runs has the job's flags");
        Ok(job::JobConfig {
            parallelism: j.parallelism,
            checkpoint_every: Duration::from_millis(j.checkpoint_ms),
            out_of_order: Duration::from_millis(self.out_of_order_ms.max(0) as u64),
            batch_size: j.batch_size,
            pacing: match j.pace_us {
                0 => None,
                us => Some(Duration::from_micros(us)),
            },
            ledger_pg: self.ledger_table()?,
            savepoint_on_stop: j.savepoint_on_stop.clone(),
            from_savepoint: j.from_savepoint.clone(),
            max_parallelism: j.max_parallelism,
            at_least_once: false,
            aligned_timeout: j.aligned_checkpoint_timeout_ms.map(Duration::from_millis),
        })
    }
}

fn generate(a: &Flags) -> Result<()> {
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

/// Run the job; false if it was stopped (SIGTERM or Ctrl-C) before the end of its input.
fn run(a: &Flags) -> Result<bool> {
    let dir = a.dir();
    let input = dir.join("input");
    let io = a.io()?;
    let files = matches!(io, job::Io::Files { .. });
    if files && !input.join("anomalies.jsonl").exists() {
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
    let bar = if files {
        progress_bar(&input)?
    } else {
        indicatif::ProgressBar::hidden()
    };
    let checkpoints = match a.job.as_ref().and_then(|j| j.checkpoints.clone()) {
        Some(location) => location,
        None => dir
            .join("checkpoints")
            .to_str()
            .ok_or_else(|| anyhow::anyhow!("--dir is not UTF-8"))?
            .to_string(),
    };
    let name = a.job.as_ref().map_or("reconciliation", |j| j.name.as_str());
    let job = job::job(name, &checkpoints, &cfg, &io, Some(bar.clone()))?;
    job::build(&job, &io, &cfg)?;
    // On its own thread, so that this one can show progress; SIGTERM and Ctrl-C still
    // stop it with a checkpoint.
    let handle = job.start()?;
    let started = Instant::now();
    while !handle.is_finished() {
        let read = job::events_read(&handle.metrics());
        bar.set_position(read.min(bar.length().unwrap_or(u64::MAX)));
        let rate = read as f64 / started.elapsed().as_secs_f64().max(1e-3);
        bar.set_message(match handle.last_checkpoint() {
            Some(c) => format!(
                "{rate:>9.0}/s | checkpoint {} took {} ms",
                c.id,
                c.duration.as_millis()
            ),
            None => format!("{rate:>9.0}/s"),
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
    let report = handle.wait()?;
    let read = job::events_read(&report.metrics);
    eprintln!(
        "job finished in {:.2}s ({} events read, restored from checkpoint {:?}, {} checkpoints, {} in-process restarts)",
        report.elapsed.as_secs_f64(),
        read,
        report.restored_from.map(|c| c.0),
        report.checkpoints.len(),
        report.restarts
    );
    if let Some(id) = report.stopped_at {
        match &report.savepoint {
            Some(name) => eprintln!(
                "stopped with checkpoint {id}, kept as savepoint '{name}': start the next \
                 version with --from-savepoint {name}"
            ),
            None => eprintln!(
                "stopped with checkpoint {id}: run the same command again to resume from it"
            ),
        }
        return Ok(false);
    }
    Ok(true)
}

/// A progress bar over the input's events (its lines), drawn on stderr when that is a
/// terminal and hidden otherwise (logs and tests get the checkpoint lines only).
fn progress_bar(input: &std::path::Path) -> Result<indicatif::ProgressBar> {
    let mut total = 0u64;
    for stream in ["charges", "payments", "payouts"] {
        for f in std::fs::read_dir(input.join(stream))? {
            let mut r = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(f?.path())?);
            loop {
                let buf = std::io::BufRead::fill_buf(&mut r)?;
                if buf.is_empty() {
                    break;
                }
                total += buf.iter().filter(|&&b| b == b'\n').count() as u64;
                let n = buf.len();
                std::io::BufRead::consume(&mut r, n);
            }
        }
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {human_pos}/{human_len} events read {msg}",
        )?
        .progress_chars("=> "),
    );
    Ok(bar)
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

fn verify(a: &Flags) -> Result<()> {
    let dir = a.dir();
    let out = match a.io()? {
        job::Io::Files { out, .. } => out,
        #[cfg(feature = "kafka")]
        job::Io::Kafka(k) => {
            let out = dir.join("out-kafka");
            verifier::read_committed_topics(&k, &["results", "daily-totals", "balances"], &out)?;
            out
        }
        #[cfg(not(feature = "kafka"))]
        job::Io::Kafka(_) => unreachable!("--kafka is refused without the kafka feature"),
    };
    let report = verifier::verify(&dir.join("input"), &out, a.ledger_table()?)?;
    report.print();
    if !report.passed() {
        bail!("verification failed");
    }
    Ok(())
}

fn demo(a: &Flags) -> Result<()> {
    let dir = a.dir();
    if !dir.join("input").join("anomalies.jsonl").exists() {
        generate(a)?;
    } else {
        eprintln!("using the input already in {}", dir.join("input").display());
    }
    eprintln!("running the job: stop it (Ctrl-C) or kill it at any moment and run the same command again, it resumes");
    if !run(a)? {
        return Ok(());
    }
    verify(a)?;
    eprintln!(
        "output in {}; delete {} to start over",
        dir.join("out").display(),
        dir.display()
    );
    Ok(())
}

/// Reconciliation of charges, payments and payouts, exactly once (`demo` when no
/// command is given).
#[derive(clap::Parser)]
#[command(name = "reconciliation")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Generate the input (unless there is one), run the job, verify its output.
    Demo {
        #[command(flatten)]
        dir: DirFlag,
        #[command(flatten)]
        disorder: DisorderFlag,
        #[command(flatten)]
        gen: GenFlags,
        #[command(flatten)]
        job: JobFlags,
        #[command(flatten)]
        ledger: LedgerFlags,
    },
    /// Generate the input streams and their ground truth into DIR/input.
    Generate {
        #[command(flatten)]
        dir: DirFlag,
        #[command(flatten)]
        disorder: DisorderFlag,
        #[command(flatten)]
        gen: GenFlags,
    },
    /// Run the job (it resumes from DIR/checkpoints).
    Run {
        #[command(flatten)]
        dir: DirFlag,
        #[command(flatten)]
        disorder: DisorderFlag,
        #[command(flatten)]
        job: JobFlags,
        #[command(flatten)]
        ledger: LedgerFlags,
        #[command(flatten)]
        kafka: KafkaFlags,
    },
    /// Check DIR/out (or the output topics, and the ledger table) against an
    /// independent recomputation from DIR/input.
    Verify {
        #[command(flatten)]
        dir: DirFlag,
        #[command(flatten)]
        ledger: LedgerFlags,
        #[command(flatten)]
        kafka: KafkaFlags,
    },
}

fn main() -> Result<()> {
    args::start()?;
    let cli = <Cli as clap::Parser>::parse();
    let command = match cli.command {
        Some(c) => c,
        None => match <Cli as clap::Parser>::parse_from(["reconciliation", "demo"]).command {
            Some(c) => c,
            None => unreachable!("demo was given"),
        },
    };
    let no_ledger = || LedgerFlags {
        ledger_postgres: None,
        ledger_table: None,
    };
    match command {
        Command::Demo {
            dir,
            disorder,
            gen,
            job,
            ledger,
        } => demo(&Flags {
            dir: dir.dir,
            out_of_order_ms: disorder.out_of_order_ms,
            gen: Some(gen),
            job: Some(job),
            ledger,
            kafka: KafkaFlags::default(),
        }),
        Command::Generate { dir, disorder, gen } => generate(&Flags {
            dir: dir.dir,
            out_of_order_ms: disorder.out_of_order_ms,
            gen: Some(gen),
            job: None,
            ledger: no_ledger(),
            kafka: KafkaFlags::default(),
        }),
        Command::Run {
            dir,
            disorder,
            job,
            ledger,
            kafka,
        } => run(&Flags {
            dir: dir.dir,
            out_of_order_ms: disorder.out_of_order_ms,
            gen: None,
            job: Some(job),
            ledger,
            kafka,
        })
        .map(|_| ()),
        Command::Verify { dir, ledger, kafka } => verify(&Flags {
            dir: dir.dir,
            out_of_order_ms: 0,
            gen: None,
            job: None,
            ledger,
            kafka,
        }),
    }
}
