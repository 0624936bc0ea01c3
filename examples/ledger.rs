//! A ledger job: payments in, a running balance per account out, exactly once.
//!
//! ```text
//! ledger demo [--dir ledger-demo] [--events 1000000]     generate, run, verify in one go
//! ledger generate --events N --accounts A --seed S --out payments.jsonl
//! ledger run --input payments.jsonl|kafka://host:port/topic
//!            --out DIR|s3://bucket/prefix|kafka://host:port/topic|postgresql://...
//!            [--kafka-staging DIR] [--pg-table balances]
//!            --checkpoints DIR [--interval-ms 100] [--parallelism P]
//!            [--state memory|rocksdb] [--pace-us 0 (pause per source batch)]
//!            [--format jsonl|parquet] [--name ledger]
//!            [--savepoint-on-stop NAME] [--restore-savepoint NAME]
//! ledger verify --input payments.jsonl --out DIR
//! ```
//!
//! Several processes (feature `kafka`): start `ledger run` N times with
//! `EXACTLY_INSTANCES=N` and `EXACTLY_INSTANCE=0..N` (or a host name ending in the
//! ordinal), the same flags, `--input kafka://...` and `--kafka-staging DIR`: each
//! instance reads its share of the input's partitions, sends each payment through the
//! topic `<name>-balance-repartition` to the instance that owns its account, checkpoints
//! under `<checkpoints>/instances/<i>/` and follows the input until stopped (SIGTERM
//! stops it with a checkpoint).
//!
//! `ledger --help` and `ledger <command> --help` describe every flag. `run` resumes from
//! its checkpoint directory, so it can be killed and started again
//! any number of times; `verify` recomputes every balance from the input without the
//! engine and checks the committed output record by record (JSON lines or Parquet).

#[path = "common/args.rs"]
mod args;

use anyhow::{bail, Context, Result};
use exactly::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The allocator the README recommends for jobs that allocate per record.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payment {
    seq: u64,
    account: u32,
    amount_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BalanceUpdate {
    seq: u64,
    account: u32,
    amount_cents: i64,
    balance_cents: i64,
}

const BALANCE: ValueState<i64> = ValueState::new("balance");

#[derive(Clone, Default)]
struct Balance;

impl KeyedProcessFunction<u32, Payment> for Balance {
    type Out = BalanceUpdate;
    fn process(
        &mut self,
        p: Payment,
        ctx: &mut KeyedContext<'_, u32, BalanceUpdate>,
    ) -> Result<(), BoxError> {
        let balance = ctx.value(BALANCE)?.unwrap_or(0) + p.amount_cents;
        ctx.set_value(BALANCE, &balance)?;
        ctx.emit(BalanceUpdate {
            seq: p.seq,
            account: p.account,
            amount_cents: p.amount_cents,
            balance_cents: balance,
        });
        Ok(())
    }
}

/// SplitMix64: a tiny deterministic generator so inputs are reproducible from a seed.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `ledger generate`: a payments file.
#[derive(clap::Args)]
struct GenerateArgs {
    /// Payments to write.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Distinct accounts.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    accounts: u32,
    /// Seed of the generator (same seed, same file).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The JSON-lines file to write.
    #[arg(long)]
    out: PathBuf,
}

fn generate(a: &GenerateArgs) -> Result<()> {
    let (events, accounts, mut seed, out) = (a.events, a.accounts, a.seed, &a.out);
    let mut w = BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
    );
    for seq in 0..events {
        let r = splitmix(&mut seed);
        let p = Payment {
            seq,
            account: (r % accounts as u64) as u32,
            amount_cents: (r >> 32) as i64 % 100_000 - 40_000,
        };
        serde_json::to_writer(&mut w, &p)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    eprintln!(
        "wrote {events} payments over {accounts} accounts to {}",
        out.display()
    );
    Ok(())
}

/// `ledger run`: the job.
#[derive(clap::Args)]
struct RunArgs {
    /// The payments file, or `kafka://host:port/topic` (feature `kafka`; JSON payments,
    /// read to the end each partition had when the job started).
    #[arg(long)]
    input: PathBuf,
    /// Output: a directory, `s3://bucket/prefix` (feature `s3`),
    /// `kafka://host:port/topic` (feature `kafka`; one JSON balance update per record,
    /// keyed by account, committed in transactions; needs `--kafka-staging`), or a
    /// PostgreSQL URL or `host=... dbname=...` string (feature `postgres`; see
    /// `--pg-table`).
    #[arg(long)]
    out: PathBuf,
    /// Where records for a Kafka output wait between a checkpoint's barrier and its
    /// commit (a directory that survives restarts).
    #[arg(long = "kafka-staging")]
    kafka_staging: Option<PathBuf>,
    /// The table for a PostgreSQL output (`--out postgresql://...`, feature `postgres`;
    /// created if missing; rows committed with two-phase commit).
    #[arg(long = "pg-table", default_value = "balances")]
    pg_table: String,
    /// Checkpoint location: a directory, or `s3://bucket/prefix`.
    #[arg(long)]
    checkpoints: PathBuf,
    /// The job's name: it names the checkpoints and, with a Kafka output, the
    /// transactional ids, so two jobs writing to one Kafka cluster need different names.
    #[arg(long, default_value = "ledger")]
    name: String,
    /// Checkpoint interval in milliseconds.
    #[arg(long = "interval-ms", default_value_t = 1000)]
    interval_ms: u64,
    /// Parallelism of every operator.
    #[arg(long, default_value_t = 2)]
    parallelism: usize,
    /// Keyed state backend.
    #[arg(long, value_enum, default_value_t = args::State::Memory)]
    state: args::State,
    /// Pause this many microseconds after every source batch (tests slow the job down).
    #[arg(long = "pace-us", default_value_t = 0)]
    pace_us: u64,
    /// Part file format.
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    format: Format,
    /// Keep the checkpoint a stop (SIGTERM) takes as this savepoint.
    #[arg(long = "savepoint-on-stop")]
    savepoint_on_stop: Option<String>,
    /// Start from this savepoint (a new deployment; also with another number of
    /// instances than the one that took it).
    #[arg(long = "restore-savepoint")]
    restore_savepoint: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Jsonl,
    /// Parquet (feature `parquet`).
    Parquet,
}

fn run(a: &RunArgs) -> Result<()> {
    let (input, out, checkpoints) = (&a.input, &a.out, &a.checkpoints);
    let (interval, parallelism, pace_us) = (a.interval_ms, a.parallelism, a.pace_us);
    let started = Instant::now();
    let mut builder = Job::builder(&a.name).instance_from_env()?;
    if pace_us > 0 {
        builder = builder.source_pacing(Duration::from_micros(pace_us));
    }
    if let Some(name) = &a.savepoint_on_stop {
        builder = builder.savepoint_on_stop(name);
    }
    if let Some(name) = &a.restore_savepoint {
        builder = builder.restore_from_savepoint(name);
    }
    // Used only when the job runs as several instances (EXACTLY_INSTANCES).
    #[cfg(feature = "kafka")]
    if let (Some((brokers, _)), Some(staging)) = (kafka_topic(input), &a.kafka_staging) {
        use exactly::kafka_repartition::KafkaRepartition;
        use exactly::sinks::kafka::Staging;
        builder =
            builder.repartition_through(KafkaRepartition::new(brokers, Staging::dir(staging)?));
    }
    let job = builder
        .checkpoint_every(Duration::from_millis(interval))
        .checkpoint_storage(
            checkpoints
                .to_str()
                .context("checkpoint path is not UTF-8")?,
        )
        .parallelism(parallelism)
        .stop_on_sigterm()
        .state_backend(a.state.backend())
        .on_checkpoint(move |c| {
            eprintln!(
                "[{:>7.2}s] checkpoint {:>4} {} in {:>4} ms, {:>8} bytes of state",
                started.elapsed().as_secs_f64(),
                c.id,
                if c.is_final { "(final)" } else { "       " },
                c.duration.as_millis(),
                c.state_bytes
            )
        })
        .build()?;
    let payments = match kafka_topic(input) {
        #[cfg(feature = "kafka")]
        Some((brokers, topic)) => {
            let source = exactly::sources::KafkaSource::new(brokers, topic, |b: &[u8]| {
                serde_json::from_slice::<Payment>(b)
            });
            // Across instances the job follows its input until stopped: the topic the
            // instances exchange payments through has no end.
            let source = if job.instance().count > 1 {
                source
            } else {
                source.bounded()
            };
            job.source("payments", source)
        }
        #[cfg(not(feature = "kafka"))]
        Some(_) => bail!("--input kafka://...: Kafka input needs the `kafka` feature"),
        None => job.source("payments", JsonLinesSource::<Payment>::new(input)),
    };
    let balances = payments
        .key_by(|p| p.account)
        .process(Balance)
        .name("balance");
    if let Some((brokers, topic)) = kafka_topic(out) {
        #[cfg(feature = "kafka")]
        {
            use exactly::sinks::kafka::{KafkaSink, Staging};
            let staging = a
                .kafka_staging
                .as_ref()
                .context("--out kafka://... needs --kafka-staging DIR (records wait there between a checkpoint's barrier and its commit)")?;
            let encode = |u: &BalanceUpdate, key: &mut Vec<u8>, value: &mut Vec<u8>| {
                key.extend_from_slice(u.account.to_string().as_bytes());
                serde_json::to_writer(value, u).expect("a balance update encodes");
            };
            let sink = KafkaSink::new(brokers, topic, Staging::dir(staging)?, encode)?
                .marker_topic(&format!("{topic}-commits"));
            balances.sink("balances", sink);
        }
        #[cfg(not(feature = "kafka"))]
        bail!("--out kafka://{brokers}/{topic}: Kafka output needs the `kafka` feature");
        #[cfg(feature = "kafka")]
        return finish(job);
    }
    // A PostgreSQL URL, or libpq's `host=... dbname=...` form (which would otherwise
    // become a directory of that name).
    if let Some(url) = out.to_str().filter(|o| {
        o.starts_with("postgresql://")
            || o.starts_with("postgres://")
            || o.split_whitespace()
                .any(|kv| kv.starts_with("host=") || kv.starts_with("dbname="))
    }) {
        #[cfg(feature = "postgres")]
        {
            use exactly::sinks::postgres::client::{Client, NoTls};
            use exactly::sinks::postgres::{PostgresSink, Sql};
            let table = &a.pg_table;
            Client::connect(url, NoTls)
                .and_then(|mut c| {
                    c.batch_execute(&format!(
                        "CREATE TABLE IF NOT EXISTS {table} (seq bigint, account bigint, amount_cents bigint, balance_cents bigint)"
                    ))
                })
                .with_context(|| format!("creating table {table} in the --out database"))?;
            let sql = Sql::insert(table, &["seq", "account", "amount_cents", "balance_cents"]);
            let row = |u: &BalanceUpdate| {
                (
                    u.seq as i64,
                    u.account as i64,
                    u.amount_cents,
                    u.balance_cents,
                )
            };
            balances.sink("balances", PostgresSink::two_phase(url, sql, row));
        }
        #[cfg(not(feature = "postgres"))]
        {
            let _ = url;
            bail!("--out: PostgreSQL output needs the `postgres` feature");
        }
        #[cfg(feature = "postgres")]
        return finish(job);
    }
    // Part files in S3 through multipart uploads (AWS_* environment), or in a directory.
    let s3 = out.to_str().filter(|o| o.starts_with("s3://"));
    match (s3, a.format) {
        #[cfg(feature = "s3")]
        (Some(url), Format::Jsonl) => {
            balances.sink("balances", ObjectStoreSink::s3(url, JsonLines)?);
        }
        #[cfg(not(feature = "s3"))]
        (Some(url), _) => bail!("--out {url}: S3 output needs the `s3` feature"),
        (None, Format::Jsonl) => {
            balances.sink("balances", FileSink::exactly_once(out));
        }
        #[cfg(all(feature = "s3", feature = "parquet"))]
        (Some(url), Format::Parquet) => {
            balances.sink("balances", ObjectStoreSink::s3(url, Parquet::for_type()?)?);
        }
        #[cfg(feature = "parquet")]
        (None, Format::Parquet) => {
            balances.sink(
                "balances",
                FileSink::with_encoder(out, Parquet::for_type()?),
            );
        }
        #[cfg(not(feature = "parquet"))]
        (_, Format::Parquet) => bail!("--format parquet needs the `parquet` feature"),
    }
    finish(job)
}

/// `kafka://host:port[,host:port]/topic` as (brokers, topic).
fn kafka_topic(p: &Path) -> Option<(&str, &str)> {
    p.to_str()?.strip_prefix("kafka://")?.split_once('/')
}

/// Run the job and report how it ended.
fn finish(job: Job) -> Result<()> {
    let report = job.run()?;
    eprintln!(
        "done in {:.2}s: restored from {:?}, {} checkpoints, {} in-process restarts",
        report.elapsed.as_secs_f64(),
        report.restored_from.map(|c| c.0),
        report.checkpoints.len(),
        report.restarts
    );
    if let Some(id) = report.stopped_at {
        eprintln!("stopped with checkpoint {id}: run the same command again to resume from it");
    }
    Ok(())
}

/// Read every committed output record (JSON lines or Parquet part files).
fn committed(out: &Path) -> Result<Vec<BalanceUpdate>> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))? {
        let p = e?.path();
        if p.is_file()
            && p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
        {
            if p.extension().is_some_and(|e| e == "parquet") {
                all.extend(read_parquet(&p)?);
                continue;
            }
            for line in std::io::BufReader::new(std::fs::File::open(&p)?).lines() {
                all.push(
                    serde_json::from_str(&line?)
                        .with_context(|| format!("parsing {}", p.display()))?,
                );
            }
        }
    }
    Ok(all)
}

#[cfg(feature = "parquet")]
fn read_parquet(p: &Path) -> Result<Vec<BalanceUpdate>> {
    let file = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let (rows, _) = exactly::sinks::parquet::read_records(file)
        .with_context(|| format!("reading {}", p.display()))?;
    Ok(rows)
}

#[cfg(not(feature = "parquet"))]
fn read_parquet(p: &Path) -> Result<Vec<BalanceUpdate>> {
    bail!("{} is Parquet: build with feature `parquet`", p.display())
}

/// `ledger verify`: recompute the balances without the engine and compare.
#[derive(clap::Args)]
struct VerifyArgs {
    /// The payments file.
    #[arg(long)]
    input: PathBuf,
    /// The job's output directory.
    #[arg(long)]
    out: PathBuf,
}

fn verify(a: &VerifyArgs) -> Result<()> {
    let (input, out) = (&a.input, &a.out);
    // Independent recomputation: a plain sequential fold over the input.
    let mut balances: HashMap<u32, i64> = HashMap::new();
    let mut expected: BTreeMap<u64, BalanceUpdate> = BTreeMap::new();
    for line in std::io::BufReader::new(std::fs::File::open(input)?).lines() {
        let p: Payment = serde_json::from_str(&line?)?;
        let b = balances.entry(p.account).or_default();
        *b += p.amount_cents;
        expected.insert(
            p.seq,
            BalanceUpdate {
                seq: p.seq,
                account: p.account,
                amount_cents: p.amount_cents,
                balance_cents: *b,
            },
        );
    }
    let got = committed(out)?;
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    let mut wrong = 0usize;
    for u in &got {
        *seen.entry(u.seq).or_default() += 1;
        if expected.get(&u.seq) != Some(u) {
            wrong += 1;
        }
    }
    let duplicates: usize = seen.values().filter(|&&n| n > 1).map(|n| n - 1).sum();
    let missing = expected.keys().filter(|s| !seen.contains_key(s)).count();
    println!("events: {}", expected.len());
    println!("committed output lines: {}", got.len());
    println!("duplicates: {duplicates}");
    println!("missing: {missing}");
    println!("wrong balances: {wrong}");
    if duplicates + missing + wrong > 0 {
        bail!("verification FAILED");
    }
    println!("verification passed");
    Ok(())
}

/// `ledger demo`: generate an input (unless one exists), run the job, verify its output.
#[derive(clap::Args)]
struct DemoArgs {
    /// Working directory: input, output and checkpoints.
    #[arg(long, default_value = "ledger-demo")]
    dir: PathBuf,
    /// Payments to generate.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Checkpoint interval in milliseconds.
    #[arg(long = "interval-ms", default_value_t = 100)]
    interval_ms: u64,
    /// Parallelism of every operator.
    #[arg(long, default_value_t = 2)]
    parallelism: usize,
}

fn demo(a: &DemoArgs) -> Result<()> {
    let dir = &a.dir;
    std::fs::create_dir_all(dir)?;
    let input = dir.join(format!("payments-{}.jsonl", a.events));
    if !input.exists() {
        generate(&GenerateArgs {
            events: a.events,
            accounts: 10_000,
            seed: 42,
            out: input.clone(),
        })?;
    }
    let out = dir.join("out");
    eprintln!(
        "running the ledger job (kill it at any time and run the same command again: it resumes)"
    );
    run(&RunArgs {
        input: input.clone(),
        out: out.clone(),
        checkpoints: dir.join("checkpoints"),
        interval_ms: a.interval_ms,
        parallelism: a.parallelism,
        state: args::State::Memory,
        pace_us: 0,
        format: Format::Jsonl,
        kafka_staging: None,
        pg_table: "balances".into(),
        name: "ledger".into(),
        savepoint_on_stop: None,
        restore_savepoint: None,
    })?;
    verify(&VerifyArgs {
        input,
        out: out.clone(),
    })?;
    eprintln!(
        "output in {}; delete {} to start from scratch",
        out.display(),
        dir.display()
    );
    Ok(())
}

/// A running balance per account over a payments file, exactly once; the 1M-event
/// kill-and-restore tests run it.
#[derive(clap::Parser)]
#[command(name = "ledger")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Generate an input (unless one exists), run the job, verify its output.
    Demo(DemoArgs),
    /// Write a payments file.
    Generate(GenerateArgs),
    /// Run the job (it resumes from its last checkpoint).
    Run(RunArgs),
    /// Check the committed output against an independent recomputation.
    Verify(VerifyArgs),
}

fn main() -> Result<()> {
    args::start()?;
    match <Cli as clap::Parser>::parse().command {
        Command::Demo(a) => demo(&a),
        Command::Generate(a) => generate(&a),
        Command::Run(a) => run(&a),
        Command::Verify(a) => verify(&a),
    }
}
