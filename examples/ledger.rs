//! A ledger job: payments in, a running balance per account out, exactly once.
//!
//! ```text
//! ledger demo [--dir ledger-demo] [--events 1000000]     generate, run, verify in one go
//! ledger generate --events N --accounts A --seed S --out payments.jsonl
//! ledger run --input payments.jsonl --out DIR|s3://bucket/prefix --checkpoints DIR [--interval-ms 100] [--parallelism P]
//!            [--state memory|rocksdb] [--pace-us 0 (pause per source batch)]
//!            [--format jsonl|parquet]
//! ledger verify --input payments.jsonl --out DIR
//! ```
//!
//! `run` resumes from its checkpoint directory, so it can be killed and started again
//! any number of times; `verify` recomputes every balance from the input without the
//! engine and checks the committed output record by record (JSON lines or Parquet).

#[path = "common/args.rs"]
mod args;

use anyhow::{bail, Context, Result};
use args::Args;
use exactly::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

fn generate(a: &Args) -> Result<()> {
    let events: u64 = a.num("events", 1_000_000)?;
    let accounts: u32 = a.num("accounts", 10_000)?;
    let mut seed: u64 = a.num("seed", 42)?;
    let out = a.path("out")?;
    let mut w = BufWriter::new(
        std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?,
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

fn run(a: &Args) -> Result<()> {
    let input = a.path("input")?;
    let out = a.path("out")?;
    let checkpoints = a.path("checkpoints")?;
    let interval: u64 = a.num("interval-ms", 1000)?;
    let parallelism: usize = a.num("parallelism", 2)?;
    let pace_us: u64 = a.num("pace-us", 0)?;
    let started = Instant::now();
    let mut builder = Job::builder("ledger");
    if pace_us > 0 {
        builder = builder.source_pacing(Duration::from_micros(pace_us));
    }
    let job = builder
        .checkpoint_every(Duration::from_millis(interval))
        .checkpoint_storage(
            checkpoints
                .to_str()
                .context("checkpoint path is not UTF-8")?,
        )
        .parallelism(parallelism)
        .state_backend(a.state_backend()?)
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
    let balances = job
        .source("payments", JsonLinesSource::<Payment>::new(&input))
        .key_by(|p| p.account)
        .process(Balance)
        .name("balance");
    // Part files in S3 through multipart uploads (AWS_* environment), or in a directory.
    let s3 = out.to_str().filter(|o| o.starts_with("s3://"));
    match (s3, a.0.get("format").map_or("jsonl", String::as_str)) {
        #[cfg(feature = "s3")]
        (Some(url), "jsonl") => {
            balances.sink("balances", ObjectStoreSink::s3(url, JsonLines)?);
        }
        #[cfg(not(feature = "s3"))]
        (Some(url), _) => bail!("--out {url}: S3 output needs the `s3` feature"),
        (None, "jsonl") => {
            balances.sink("balances", FileSink::exactly_once(&out));
        }
        #[cfg(all(feature = "s3", feature = "parquet"))]
        (Some(url), "parquet") => {
            balances.sink("balances", ObjectStoreSink::s3(url, Parquet::for_type()?)?);
        }
        #[cfg(feature = "parquet")]
        (None, "parquet") => {
            balances.sink(
                "balances",
                FileSink::with_encoder(&out, Parquet::for_type()?),
            );
        }
        (_, other) => bail!("--format {other}: expected jsonl or parquet (feature `parquet`)"),
    }
    let report = job.run()?;
    eprintln!(
        "done in {:.2}s: restored from {:?}, {} checkpoints, {} in-process restarts",
        report.elapsed.as_secs_f64(),
        report.restored_from.map(|c| c.0),
        report.checkpoints.len(),
        report.restarts
    );
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

fn verify(a: &Args) -> Result<()> {
    let input = a.path("input")?;
    let out = a.path("out")?;
    // Independent recomputation: a plain sequential fold over the input.
    let mut balances: HashMap<u32, i64> = HashMap::new();
    let mut expected: BTreeMap<u64, BalanceUpdate> = BTreeMap::new();
    for line in std::io::BufReader::new(std::fs::File::open(&input)?).lines() {
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
    let got = committed(&out)?;
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

/// Generate an input (unless one exists), run the job, verify its output.
fn demo(a: &Args) -> Result<()> {
    let dir =
        a.0.get("dir")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("ledger-demo"));
    let events: u64 = a.num("events", 1_000_000)?;
    std::fs::create_dir_all(&dir)?;
    let input = dir.join(format!("payments-{events}.jsonl"));
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let arg = |pairs: &[(&str, String)]| {
        Args(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    };
    if !input.exists() {
        generate(&arg(&[("events", events.to_string()), ("out", s(&input))]))?;
    }
    let out = dir.join("out");
    let chk = dir.join("checkpoints");
    eprintln!(
        "running the ledger job (kill it at any time and run the same command again: it resumes)"
    );
    run(&arg(&[
        ("input", s(&input)),
        ("out", s(&out)),
        ("checkpoints", s(&chk)),
        ("interval-ms", a.num("interval-ms", 100u64)?.to_string()),
        ("parallelism", a.num("parallelism", 2usize)?.to_string()),
    ]))?;
    verify(&arg(&[("input", s(&input)), ("out", s(&out))]))?;
    eprintln!(
        "output in {}; delete {} to start from scratch",
        out.display(),
        dir.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    args::start()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        bail!("usage: ledger demo|generate|run|verify --flag value ...");
    };
    let a = Args::parse(&args[1..])?;
    match cmd.as_str() {
        "generate" => {
            a.only(cmd, &["events", "accounts", "seed", "out"])?;
            generate(&a)
        }
        "run" => {
            a.only(
                cmd,
                &[
                    "input",
                    "out",
                    "checkpoints",
                    "interval-ms",
                    "parallelism",
                    "state",
                    "pace-us",
                    "format",
                ],
            )?;
            run(&a)
        }
        "verify" => {
            a.only(cmd, &["input", "out"])?;
            verify(&a)
        }
        "demo" => {
            a.only(cmd, &["dir", "events", "interval-ms", "parallelism"])?;
            demo(&a)
        }
        other => bail!("unknown command '{other}'; expected demo, generate, run or verify"),
    }
}
