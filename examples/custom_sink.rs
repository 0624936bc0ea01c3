//! Writing your own exactly-once sink: one CSV file per subtask that committed records
//! are appended to, with a journal that makes every commit idempotent.
//!
//! ```text
//! cargo run --release --example custom_sink [-- --dir custom-sink-demo --events 200000]
//! ```
//!
//! The job runs once, crashes on purpose after its second checkpoint, restarts in the
//! same process from that checkpoint (which re-commits it: the case an idempotent commit
//! exists for), finishes, and then checks that the CSV files hold every event exactly
//! once. The protocol, as [`TwoPhaseCommitSink`] asks for it:
//!
//! * **write**: records go into the subtask's buffer (memory only: a crash loses them,
//!   and the restore replays them from the source);
//! * **pre-commit** (the barrier): the buffer becomes a staged file named by checkpoint,
//!   subtask and the instance's fencing generation, written and fsynced; its path is the
//!   committable, which the checkpoint's manifest stores;
//! * **commit** (after the checkpoint completed, and again after any crash that may have
//!   come before or during it): the journal next to the output file says up to which
//!   checkpoint the file is committed and how long it was then. At or below that
//!   checkpoint there is nothing to do. Otherwise the file is cut back to the journal's
//!   length (a crash mid-append leaves a partial tail), the staged bytes are appended and
//!   fsynced, and the journal is replaced atomically. Commits of one subtask come in
//!   checkpoint order. The journal also names the fencing generation of the instance
//!   that committed: an older instance (a zombie still committing after a newer one
//!   took over) finds a newer generation there and stops as fenced instead of cutting
//!   the file back. (The engine checks its lease just before committing too; a zombie
//!   passing both checks in the same instant as the newer instance's append is not
//!   caught: a lock file would close that window);
//! * **recover**: a journal above the restored checkpoint means the checkpoint storage
//!   lost manifests that the output already holds, so stop instead of writing them again;
//!   a staged file of a newer generation belongs to a newer instance, so stop as fenced
//!   and touch nothing; then commit what the restored checkpoint left pending and delete
//!   staged files of checkpoints that never completed.

use anyhow::{bail, Context, Result};
use exactly::engine::api::{RecoveryContext, SinkContext, SinkWriter, TwoPhaseCommitSink};
use exactly::engine::error::Error;
use exactly::prelude::*;
use exactly::sources::GeneratorSource;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Appends committed records as CSV lines to `<dir>/<sink>-<subtask>.csv`.
#[derive(Clone)]
struct CsvLedgerSink {
    dir: PathBuf,
    /// This instance's fencing generation, known from recovery (before any commit).
    generation: Arc<AtomicU64>,
}

/// What a barrier staged: the manifest keeps it until the commit is done.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Staged {
    checkpoint: u64,
    subtask: usize,
    /// The staged file's name inside `<dir>/.staging/<sink>/`.
    file: String,
}

/// The last commit into one output file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Journal {
    checkpoint: u64,
    len: u64,
    /// The generation of the instance that committed it.
    generation: u64,
}

struct CsvWriter {
    staging: PathBuf,
    subtask: usize,
    generation: u64,
    buf: Vec<u8>,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(context, e)
}

/// Write `bytes` to `path` through a temporary file, fsynced, then renamed over it.
fn write_atomically(path: &Path, bytes: &[u8]) -> exactly::engine::error::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io(format!("renaming to {}", path.display())))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing {}", dir.display())))?;
    }
    Ok(())
}

impl CsvLedgerSink {
    fn staging(&self, sink: &str) -> PathBuf {
        self.dir.join(".staging").join(sink)
    }

    fn output(&self, sink: &str, subtask: usize) -> PathBuf {
        self.dir.join(format!("{sink}-{subtask}.csv"))
    }

    fn journal_path(&self, sink: &str, subtask: usize) -> PathBuf {
        self.dir.join(format!("{sink}-{subtask}.journal"))
    }

    fn journal(&self, sink: &str, subtask: usize) -> exactly::engine::error::Result<Journal> {
        let path = self.journal_path(sink, subtask);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::config(format!("{} is damaged: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Commit `c` of sink `sink`; doing it twice appends nothing the second time.
    fn commit_as(&self, sink: &str, c: &Staged) -> exactly::engine::error::Result<()> {
        let journal = self.journal(sink, c.subtask)?;
        let generation = self.generation.load(Ordering::SeqCst);
        if journal.generation > generation {
            return Err(Error::Fenced {
                epoch: generation,
                newer: journal.generation,
                url: self.journal_path(sink, c.subtask).display().to_string(),
            });
        }
        let staged = self.staging(sink).join(&c.file);
        if journal.checkpoint >= c.checkpoint {
            // Committed before a crash: the restore's re-commit. The staged file may
            // still be there if the crash came before its removal.
            return match fs::remove_file(&staged) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("removing {}", staged.display()), e))
                }
                _ => Ok(()),
            };
        }
        let bytes = fs::read(&staged).map_err(|e| Error::CommitLost {
            sink: exactly::engine::ids::OperatorId(sink.to_string()),
            checkpoint: CheckpointId(c.checkpoint),
            message: format!("staged file {}: {e}", staged.display()),
        })?;
        let out = self.output(sink, c.subtask);
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&out)
            .map_err(io(format!("opening {}", out.display())))?;
        // A crash during an earlier append may have left part of it behind.
        f.set_len(journal.len)
            .and_then(|()| f.seek(SeekFrom::Start(journal.len)).map(drop))
            .and_then(|()| f.write_all(&bytes))
            .and_then(|()| f.sync_all())
            .map_err(io(format!("appending to {}", out.display())))?;
        let next = Journal {
            checkpoint: c.checkpoint,
            len: journal.len + bytes.len() as u64,
            generation,
        };
        let json = serde_json::to_vec(&next).expect("a journal serialises");
        write_atomically(&self.journal_path(sink, c.subtask), &json)?;
        fs::remove_file(&staged).map_err(io(format!("removing {}", staged.display())))
    }
}

/// `<checkpoint>-<subtask>-g<generation>.csv`
fn staged_name(checkpoint: u64, subtask: usize, generation: u64) -> String {
    format!("{checkpoint}-{subtask}-g{generation}.csv")
}

fn parse_staged_name(name: &str) -> Option<(u64, usize, u64)> {
    let mut parts = name.strip_suffix(".csv")?.split('-');
    let checkpoint = parts.next()?.parse().ok()?;
    let subtask = parts.next()?.parse().ok()?;
    let generation = parts.next()?.strip_prefix('g')?.parse().ok()?;
    Some((checkpoint, subtask, generation))
}

impl TwoPhaseCommitSink for CsvLedgerSink {
    type Item = (u64, i64);
    type Committable = Staged;
    type Writer = CsvWriter;

    fn open_writer(&self, ctx: &SinkContext) -> exactly::engine::error::Result<CsvWriter> {
        let staging = self.staging(&ctx.sink.0);
        fs::create_dir_all(&staging).map_err(io(format!("creating {}", staging.display())))?;
        Ok(CsvWriter {
            staging,
            subtask: ctx.subtask.0,
            generation: ctx.generation,
            buf: Vec::new(),
        })
    }

    /// The sink's name is not in the committable: this sink is used under one name.
    fn commit(&self, c: &Staged) -> exactly::engine::error::Result<()> {
        self.commit_as(SINK, c)
    }

    fn recover(
        &self,
        ctx: &RecoveryContext,
        mut pending: Vec<Staged>,
    ) -> exactly::engine::error::Result<Option<CheckpointId>> {
        let sink = ctx.sink.0.as_str();
        self.generation.store(ctx.generation, Ordering::SeqCst);
        let staging = self.staging(sink);
        fs::create_dir_all(&staging).map_err(io(format!("creating {}", staging.display())))?;
        let mut highest = None;
        // Output committed above the restored checkpoint: the storage lost manifests.
        for entry in
            fs::read_dir(&self.dir).map_err(io(format!("listing {}", self.dir.display())))?
        {
            let name = entry
                .map_err(io(format!("listing {}", self.dir.display())))?
                .file_name();
            let name = name.to_string_lossy();
            let Some(subtask) = name
                .strip_prefix(&format!("{sink}-"))
                .and_then(|s| s.strip_suffix(".journal"))
                .and_then(|s| s.parse::<usize>().ok())
            else {
                continue;
            };
            let journal = self.journal(sink, subtask)?;
            if ctx.restored.is_none_or(|r| journal.checkpoint > r.0) {
                return Err(Error::output_ahead_of_checkpoints(
                    sink,
                    &format!("{name} records a commit"),
                    journal.checkpoint,
                    ctx.restored,
                ));
            }
            highest = highest.max(Some(journal.checkpoint));
        }
        let mut staged = Vec::new();
        for entry in fs::read_dir(&staging).map_err(io(format!("listing {}", staging.display())))? {
            let name = entry
                .map_err(io(format!("listing {}", staging.display())))?
                .file_name();
            let name = name.to_string_lossy().to_string();
            let Some((checkpoint, _, generation)) = parse_staged_name(&name) else {
                continue;
            };
            if generation > ctx.generation {
                return Err(Error::Fenced {
                    epoch: ctx.generation,
                    newer: generation,
                    url: staging.display().to_string(),
                });
            }
            highest = highest.max(Some(checkpoint));
            staged.push(name);
        }
        pending.sort_by_key(|c| c.checkpoint);
        for c in &pending {
            self.commit_as(sink, c)?;
        }
        // Whatever is still staged belongs to checkpoints that never completed.
        for name in staged {
            let path = staging.join(&name);
            if path.exists() && !pending.iter().any(|c| c.file == name) {
                fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
            }
        }
        Ok(highest.map(CheckpointId))
    }
}

impl SinkWriter for CsvWriter {
    type Item = (u64, i64);
    type Committable = Staged;

    fn write(&mut self, batch: &mut Vec<(u64, i64)>) -> exactly::engine::error::Result<()> {
        for (id, cents) in batch.drain(..) {
            writeln!(self.buf, "{id},{cents}").expect("writing to a Vec");
        }
        Ok(())
    }

    fn pre_commit(
        &mut self,
        checkpoint: CheckpointId,
    ) -> exactly::engine::error::Result<Option<Staged>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let file = staged_name(checkpoint.0, self.subtask, self.generation);
        let path = self.staging.join(&file);
        let mut f = File::create(&path).map_err(io(format!("creating {}", path.display())))?;
        f.write_all(&self.buf)
            .and_then(|()| f.sync_all())
            .and_then(|()| File::open(&self.staging)?.sync_all())
            .map_err(io(format!("writing {}", path.display())))?;
        self.buf.clear();
        Ok(Some(Staged {
            checkpoint: checkpoint.0,
            subtask: self.subtask,
            file,
        }))
    }
}

const SINK: &str = "ledger";

/// Runs a job into the CSV ledger sink with a crash on purpose, and checks its output.
#[derive(clap::Parser)]
#[command(name = "custom_sink")]
struct Cli {
    /// Working directory (emptied first): output and checkpoints.
    #[arg(long, default_value = "custom-sink-demo")]
    dir: PathBuf,
    /// Events to generate.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
}

fn main() -> Result<()> {
    let Cli { dir, events } = <Cli as clap::Parser>::parse();
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let out = dir.join("out");
    fs::create_dir_all(&out)?;

    // Crash once, on the first record after the second completed checkpoint.
    let crash = Arc::new(AtomicBool::new(false));
    let armed = crash.clone();
    let completed = Arc::new(AtomicU64::new(0));
    let job = Job::builder("custom-sink")
        .checkpoint_storage(dir.join("checkpoints").to_str().context("a UTF-8 path")?)
        .checkpoint_every(Duration::from_millis(50))
        .parallelism(2)
        .restart_policy(RestartPolicy::fixed(3, Duration::ZERO))
        .on_checkpoint(move |_| {
            if completed.fetch_add(1, Ordering::SeqCst) + 1 == 2 {
                armed.store(true, Ordering::SeqCst);
            }
        })
        .build()?;
    job.source(
        "payments",
        GeneratorSource::new(events, |i| (i, (i as i64 % 1_000) - 500)).with_splits(4),
    )
    .map(move |p| {
        if crash.swap(false, Ordering::SeqCst) {
            panic!("a crash on purpose after the second checkpoint");
        }
        // Slow enough that the crash lands mid-stream.
        if p.0 % 16 == 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
        p
    })
    .sink(
        SINK,
        CsvLedgerSink {
            dir: out.clone(),
            generation: Arc::default(),
        },
    );
    let report = job.run()?;
    println!(
        "{} checkpoints, {} restart(s){}",
        report.completed_checkpoints,
        report.restarts,
        if report.restarts == 0 {
            " (the job ended before its crash; run it with more --events)"
        } else {
            ""
        }
    );

    // Every event exactly once across the subtasks' files.
    let mut seen = vec![0u8; events as usize];
    for entry in fs::read_dir(&out)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "csv") {
            continue;
        }
        for line in fs::read_to_string(&path)?.lines() {
            let (id, cents) = line.split_once(',').context("a CSV line")?;
            let id: u64 = id.parse()?;
            if cents.parse::<i64>()? != (id as i64 % 1_000) - 500 {
                bail!("{}: wrong amount for {id}", path.display());
            }
            seen[id as usize] += 1;
        }
    }
    let missing = seen.iter().filter(|&&n| n == 0).count();
    let doubled = seen.iter().filter(|&&n| n > 1).count();
    if missing + doubled > 0 {
        bail!("{missing} events missing, {doubled} committed more than once");
    }
    println!("verified: {events} events committed exactly once");
    Ok(())
}
