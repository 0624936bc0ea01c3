//! Writing your own operator: `Batcher` groups payments into batches of a fixed size in
//! each parallel instance (the way a job prepares calls to a bulk API), keeping the
//! payments of the unfinished batch as operator state.
//!
//! ```text
//! cargo run --release --example custom_operator [-- --dir custom-operator-demo --events 200000]
//! ```
//!
//! The job runs at parallelism 2 and crashes on purpose after its second checkpoint; it
//! is then started again at parallelism 3 from that checkpoint, so the unfinished
//! batches of two instances are dealt out to three. Each payment is its own state entry,
//! so entries can move between instances one by one. When the input ends (the watermark
//! reaches `Timestamp::MAX` before the final checkpoint), each instance emits its last,
//! partial batch. The check at the end reads the committed batches: every payment in
//! exactly one batch, no batch over the size.

use anyhow::{bail, Context, Result};
use exactly::prelude::*;
use exactly::sinks::FileSink;
use exactly::sources::GeneratorSource;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payment {
    id: u64,
    cents: i64,
}

/// One call's worth of payments.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Batch {
    ids: Vec<u64>,
    total_cents: i64,
}

#[derive(Clone)]
struct Batcher {
    size: usize,
    open: Vec<Payment>,
    /// Crash on the next payment when set (the demo's failure on purpose).
    crash: Arc<AtomicBool>,
}

impl Batcher {
    fn emit(&mut self, ctx: &mut OperatorContext<'_, Batch>) {
        let ids = self.open.iter().map(|p| p.id).collect();
        let total_cents = self.open.iter().map(|p| p.cents).sum();
        self.open.clear();
        ctx.emit(Batch { ids, total_cents });
    }
}

impl Operator<Payment> for Batcher {
    type Out = Batch;
    /// Each payment of the unfinished batch is one entry.
    type State = Payment;

    fn open(
        &mut self,
        restored: Vec<Payment>,
        ctx: &mut OperatorContext<'_, Batch>,
    ) -> Result<(), BoxError> {
        // After a rescale an instance may get more than a batch's worth.
        self.open = Vec::with_capacity(self.size);
        for p in restored {
            self.open.push(p);
            if self.open.len() == self.size {
                self.emit(ctx);
            }
        }
        Ok(())
    }

    fn process(
        &mut self,
        p: Payment,
        ctx: &mut OperatorContext<'_, Batch>,
    ) -> Result<(), BoxError> {
        if self.crash.swap(false, Ordering::SeqCst) {
            return Err("a crash on purpose after the second checkpoint".into());
        }
        self.open.push(p);
        if self.open.len() == self.size {
            self.emit(ctx);
        }
        Ok(())
    }

    fn on_watermark(
        &mut self,
        wm: Timestamp,
        ctx: &mut OperatorContext<'_, Batch>,
    ) -> Result<(), BoxError> {
        if wm == Timestamp::MAX && !self.open.is_empty() {
            self.emit(ctx); // the input ended: the last, partial batch
        }
        Ok(())
    }

    fn snapshot(&mut self, _checkpoint: CheckpointId) -> Result<Vec<Payment>, BoxError> {
        Ok(self.open.clone())
    }
}

/// Runs the batching job with a crash and a rescale, and checks its output.
#[derive(clap::Parser)]
#[command(name = "custom_operator")]
struct Cli {
    /// Working directory (emptied first): output and checkpoints.
    #[arg(long, default_value = "custom-operator-demo")]
    dir: PathBuf,
    /// Payments to generate.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Payments per batch.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
}

const CENTS: fn(u64) -> i64 = |id| (id as i64 * 37) % 10_000 - 2_000;

/// One run at `parallelism`; with `crash`, it fails after its second checkpoint.
fn run(cli: &Cli, parallelism: usize, crash: bool) -> exactly::engine::error::Result<JobReport> {
    let fail = Arc::new(AtomicBool::new(false));
    let armed = fail.clone();
    let completed = Arc::new(AtomicU64::new(0));
    let job = Job::builder("batches")
        .checkpoint_storage(cli.dir.join("checkpoints").to_str().expect("a UTF-8 path"))
        .checkpoint_every(Duration::from_millis(50))
        .parallelism(parallelism)
        .restart_policy(RestartPolicy::none())
        .on_checkpoint(move |_| {
            if crash && completed.fetch_add(1, Ordering::SeqCst) + 1 == 2 {
                armed.store(true, Ordering::SeqCst);
            }
        })
        .build()?;
    job.source(
        "payments",
        GeneratorSource::new(cli.events, |id| Payment {
            id,
            cents: CENTS(id),
        })
        .with_splits(4),
    )
    .map(|p| {
        // Slow enough that the crash lands mid-stream.
        if p.id % 16 == 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
        p
    })
    .transform(Batcher {
        size: cli.batch,
        open: Vec::new(),
        crash: fail,
    })
    .name("batcher")
    .sink("batches", FileSink::exactly_once(cli.dir.join("out")));
    job.run()
}

fn check(out: &Path, cli: &Cli) -> Result<usize> {
    let mut seen = vec![0u8; cli.events as usize];
    let mut batches = 0;
    for entry in std::fs::read_dir(out)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "jsonl") {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            let b: Batch =
                serde_json::from_str(line).with_context(|| path.display().to_string())?;
            if b.ids.len() > cli.batch {
                bail!("a batch of {} payments", b.ids.len());
            }
            if b.total_cents != b.ids.iter().map(|&id| CENTS(id)).sum::<i64>() {
                bail!("a batch's total is wrong");
            }
            for id in b.ids {
                seen[id as usize] += 1;
            }
            batches += 1;
        }
    }
    let missing = seen.iter().filter(|&&n| n == 0).count();
    let doubled = seen.iter().filter(|&&n| n > 1).count();
    if missing + doubled > 0 {
        bail!("{missing} payments in no batch, {doubled} in more than one");
    }
    Ok(batches)
}

fn main() -> Result<()> {
    let cli = <Cli as clap::Parser>::parse();
    if cli.dir.exists() {
        std::fs::remove_dir_all(&cli.dir)
            .with_context(|| format!("clearing {}", cli.dir.display()))?;
    }
    match run(&cli, 2, true) {
        Err(e) => println!("first run, parallelism 2, failed on purpose: {e}"),
        Ok(_) => bail!("the first run ended before its crash; run it with more --events"),
    }
    let report = run(&cli, 3, false)?;
    println!(
        "second run, parallelism 3, restored checkpoint {}, finished",
        report
            .restored_from
            .map_or("none".to_string(), |c| c.to_string())
    );
    let batches = check(&cli.dir.join("out"), &cli)?;
    println!(
        "verified: {} payments in {batches} batches, each exactly once",
        cli.events
    );
    Ok(())
}
