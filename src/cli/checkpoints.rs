//! `exactly checkpoints list | show | verify`.

use super::format::{bytes, count, totals, utc};
use crate::{describe, Failure, Location};
use exactly::engine::error::Error;
use exactly::engine::ids::CheckpointId;
use exactly::engine::manifest::{Manifest, PendingCommit, SharedFile, TaskStateHandle};
use exactly::engine::storage::{CheckpointStorage, Takeover};
use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use tokio::runtime::Runtime;

/// The completed checkpoints of a location (those with a manifest), and which of them
/// no restore uses: manifests an older instance wrote after a newer one took over.
pub struct Completed {
    /// Oldest first.
    pub ids: Vec<CheckpointId>,
    /// Per orphaned checkpoint: the lease of the instance that wrote it, and of the one
    /// that had taken over.
    pub orphans: BTreeMap<CheckpointId, (u64, u64)>,
}

impl Completed {
    /// The checkpoint a job restores from: the newest that is not orphaned.
    pub fn latest(&self) -> Option<CheckpointId> {
        self.ids
            .iter()
            .rev()
            .find(|id| !self.orphans.contains_key(id))
            .copied()
    }

    /// The note for an orphaned checkpoint.
    pub fn orphan_note(&self, id: CheckpointId) -> Option<String> {
        self.orphans.get(&id).map(|(writer, newer)| {
            format!(
                "orphaned: written by the instance of lease {writer} after the instance of \
                 lease {newer} took over; never restored, its output was aborted"
            )
        })
    }
}

/// The completed checkpoints, with the orphans the takeover records name (manifests are
/// read only when there are such records).
pub fn completed(rt: &Runtime, loc: &Location) -> Result<Completed, Failure> {
    let ids = rt.block_on(loc.storage.scan())?.0;
    let takeovers = rt.block_on(loc.storage.takeovers())?;
    let mut orphans = BTreeMap::new();
    if !takeovers.is_empty() {
        for &id in &ids {
            // An unreadable manifest is reported where it is read.
            if let Ok(m) = rt.block_on(loc.storage.read_manifest(id)) {
                if let Some(t) = Takeover::orphaning(&takeovers, id, m.generation) {
                    orphans.insert(id, (m.generation, t.generation));
                }
            }
        }
    }
    Ok(Completed { ids, orphans })
}

/// The message for a location without completed checkpoints.
fn none_at(loc: &Location) -> String {
    format!("no completed checkpoints at {}", loc.name)
}

/// Checkpoint `id`, which must be a completed one, or the latest (the one a job
/// restores from) when none is given.
pub fn pick(loc: &Location, done: &Completed, id: Option<u64>) -> Result<CheckpointId, Failure> {
    match id.map(CheckpointId) {
        Some(id) if done.ids.contains(&id) => Ok(id),
        Some(id) => Err(Failure(format!(
            "checkpoint {id} is not a completed checkpoint at {}; completed: {}",
            loc.name,
            joined(&done.ids)
        ))),
        None => done.latest().ok_or_else(|| Failure(none_at(loc))),
    }
}

fn joined(ids: &[CheckpointId]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    ids.join(", ")
}

/// `exactly checkpoints list`: one line per completed checkpoint.
pub fn list(rt: &Runtime, loc: &Location) -> Result<ExitCode, Failure> {
    let done = completed(rt, loc)?;
    let ids = &done.ids;
    let Some(&newest) = ids.last() else {
        say!("{}", none_at(loc));
        return Ok(ExitCode::SUCCESS);
    };
    let latest = done.latest();
    let manifests: Vec<(CheckpointId, Result<Manifest, Error>)> = ids
        .iter()
        .map(|&id| (id, rt.block_on(loc.storage.read_manifest(id))))
        .collect();
    let job = manifests.iter().rev().find_map(|(_, m)| m.as_ref().ok());
    match job {
        Some(m) => say!("checkpoints of job '{}' at {}", m.job, loc.name),
        None => say!("checkpoints at {}", loc.name),
    }
    let width = newest.to_string().len().max(2);
    say!(
        "{:>width$}  {:<27}  {:<5}  {:>5}  {:>10}  {:>10}  {:>7}",
        "id",
        "completed",
        "final",
        "tasks",
        "state",
        "uploaded",
        "pending"
    );
    let mut unreadable = 0;
    for (id, m) in &manifests {
        let mark = match done.orphan_note(*id) {
            Some(note) => format!("  {note}"),
            None if Some(*id) == latest => "  latest".to_string(),
            None => String::new(),
        };
        match m {
            Ok(m) => say!("{}{mark}", row(m, width)),
            Err(e) => {
                unreadable += 1;
                say!("{:>width$}  {}{mark}", id.0, manifest_error(e));
            }
        }
    }
    match latest {
        Some(latest) => say!(
            "latest: {latest}; {} in all",
            count(ids.len(), "checkpoint")
        ),
        None => say!(
            "no checkpoint to restore from; {} in all",
            count(ids.len(), "checkpoint")
        ),
    }
    if !done.orphans.is_empty() {
        say!(
            "orphaned: {}; a job restores from the latest, never from those",
            count(done.orphans.len(), "checkpoint")
        );
    }
    if unreadable > 0 {
        say!(
            "{} could not be read; `exactly checkpoints verify` checks every file",
            count(unreadable, "manifest")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Why a manifest could not be read, without repeating its checkpoint.
fn manifest_error(e: &Error) -> String {
    match e {
        Error::CorruptCheckpoint { message, .. } => message.clone(),
        other => format!("cannot read the manifest: {}", describe(other)),
    }
}

/// One line of `list`.
fn row(m: &Manifest, width: usize) -> String {
    let t = totals(m);
    format!(
        "{:>width$}  {:<27}  {:<5}  {:>5}  {:>10}  {:>10}  {:>7}",
        m.checkpoint.to_string(),
        utc(m.completed_at_ms),
        if m.is_final { "final" } else { "-" },
        m.tasks.len(),
        bytes(t.state_bytes),
        bytes(t.uploaded),
        m.pending_commits.len()
    )
}

/// `exactly checkpoints show`: one manifest, readable or as JSON.
pub fn show(
    rt: &Runtime,
    loc: &Location,
    id: Option<u64>,
    json: bool,
) -> Result<ExitCode, Failure> {
    let done = completed(rt, loc)?;
    let id = pick(loc, &done, id)?;
    let m = rt.block_on(loc.storage.read_manifest(id))?;
    if json {
        let text = serde_json::to_string_pretty(&m)
            .map_err(|e| Failure(format!("checkpoint {id} as JSON: {e}")))?;
        say!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    print_header(&m, done.latest() == Some(id));
    if let Some(note) = done.orphan_note(id) {
        say!("  {note}");
    }
    say!("");
    say!("tasks ({})", m.tasks.len());
    for task in &m.tasks {
        print_task(task);
    }
    say!("");
    print_pending(&m.pending_commits);
    Ok(ExitCode::SUCCESS)
}

fn print_header(m: &Manifest, latest: bool) {
    let mut tags = Vec::new();
    if latest {
        tags.push("latest");
    }
    if m.is_final {
        tags.push("final");
    }
    let tags = if tags.is_empty() {
        String::new()
    } else {
        format!(" ({})", tags.join(", "))
    };
    let t = totals(m);
    say!("checkpoint {} of job '{}'{tags}", m.checkpoint, m.job);
    say!("  completed        {}", utc(m.completed_at_ms));
    say!("  max parallelism  {}", m.max_parallelism);
    if m.generation > 0 {
        say!("  written by       the instance of lease {}", m.generation);
    }
    say!(
        "  state            {} in {} and {}; {} uploaded by this checkpoint",
        bytes(t.state_bytes),
        count(t.task_files, "task file"),
        count(t.shared_files, "shared file"),
        bytes(t.uploaded)
    );
}

fn print_task(task: &TaskStateHandle) {
    say!(
        "  {}  subtask {}/{}",
        task.task,
        task.subtask,
        task.parallelism
    );
    let operators: Vec<String> = task.operators.iter().map(ToString::to_string).collect();
    say!("    operators    {}", operators.join(", "));
    if task.path.is_empty() {
        say!("    file         none (no operator of the task has state)");
        return;
    }
    say!("    file         {}", task.path);
    say!(
        "    size         {} ({} bytes), crc32 {:08x}",
        bytes(task.size),
        task.size,
        task.crc32
    );
    let shared: u64 = task.shared.iter().map(|f| f.size).sum();
    say!(
        "    shared       {}, {}",
        count(task.shared.len(), "file"),
        bytes(shared)
    );
    say!("    uploaded     {}", bytes(task.uploaded));
    for (operator, types) in &task.state_types {
        for (name, ty) in types {
            say!("    state        {operator}/{name}: {ty}");
        }
    }
}

fn print_pending(pending: &[PendingCommit]) {
    say!("pending commits ({})", pending.len());
    let mut by_sink: BTreeMap<&str, Vec<&PendingCommit>> = BTreeMap::new();
    for p in pending {
        by_sink.entry(p.sink.0.as_str()).or_default().push(p);
    }
    for (sink, commits) in by_sink {
        say!("  {sink}");
        for p in commits {
            say!(
                "    checkpoint {}, subtask {}: {}",
                p.checkpoint,
                p.subtask,
                p.committable
            );
        }
    }
}

/// What verifying one checkpoint checked.
#[derive(Default)]
struct Verified {
    /// Files of the checkpoint found good (task files and shared files).
    files: usize,
    /// Their bytes.
    bytes: u64,
}

/// The first file of a checkpoint that did not verify.
struct Bad {
    path: String,
    reason: String,
}

impl From<Error> for Bad {
    fn from(e: Error) -> Self {
        match e {
            Error::CorruptCheckpoint { path, message, .. } => Bad {
                path,
                reason: message,
            },
            Error::Storage { op, path, source } => Bad {
                path,
                reason: format!("{op} failed: {source}"),
            },
            other => Bad {
                path: String::new(),
                reason: describe(&other),
            },
        }
    }
}

/// Shared files verified in this run, by path, size and checksum: checkpoints of an
/// incremental backend reference the same files, which are read once.
type SeenShared = HashSet<SharedFile>;

/// Read and check every file checkpoint `id` references, counting them in `v`; stop at
/// the first bad one.
async fn verify_checkpoint(
    storage: &CheckpointStorage,
    id: CheckpointId,
    seen: &mut SeenShared,
    v: &mut Verified,
) -> Result<(), Bad> {
    let m = storage.read_manifest(id).await?;
    for task in m.tasks.iter().filter(|t| !t.path.is_empty()) {
        storage.read_state(id, task).await?;
        v.files += 1;
        v.bytes += task.size;
        for file in &task.shared {
            if !seen.contains(file) {
                storage.read_shared(id, file).await?;
                seen.insert(file.clone());
            }
            v.files += 1;
            v.bytes += file.size;
        }
    }
    Ok(())
}

/// What `verify` found so far.
#[derive(Default)]
struct Tally {
    good: usize,
    bad: Vec<CheckpointId>,
    files: usize,
    bytes: u64,
}

/// `exactly checkpoints verify`: exit code 1 if any checkpoint has a bad file.
pub fn verify(rt: &Runtime, loc: &Location, id: Option<u64>) -> Result<ExitCode, Failure> {
    let done = completed(rt, loc)?;
    let ids = &done.ids;
    if ids.is_empty() {
        return Err(Failure(format!("{}: nothing to verify", none_at(loc))));
    }
    let targets = match id {
        Some(_) => vec![pick(loc, &done, id)?],
        None => ids.clone(),
    };
    say!(
        "verifying {} at {}",
        count(targets.len(), "checkpoint"),
        loc.name
    );
    let mut seen = SeenShared::new();
    let mut tally = Tally::default();
    for id in targets {
        verify_one(rt, loc, id, &mut seen, &mut tally)?;
    }
    say!(
        "{} verified: {} good, {} bad; {} ({}) checked",
        count(tally.good + tally.bad.len(), "checkpoint"),
        tally.good,
        tally.bad.len(),
        count(tally.files, "file"),
        bytes(tally.bytes)
    );
    if tally.bad.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "error: {} failed verification: {}",
        count(tally.bad.len(), "checkpoint"),
        joined(&tally.bad)
    );
    if tally.bad.last().is_some() && tally.bad.last().copied() == done.latest() {
        eprintln!(
            "note: the latest checkpoint is bad: a job on this location refuses to start (it never \
             falls back to an older checkpoint)"
        );
    }
    Ok(ExitCode::from(1))
}

/// Verify checkpoint `id`, print its line and count it.
fn verify_one(
    rt: &Runtime,
    loc: &Location,
    id: CheckpointId,
    seen: &mut SeenShared,
    tally: &mut Tally,
) -> Result<(), Failure> {
    let mut v = Verified::default();
    let verdict = rt.block_on(verify_checkpoint(&loc.storage, id, seen, &mut v));
    tally.files += v.files;
    tally.bytes += v.bytes;
    match verdict {
        Ok(()) => {
            tally.good += 1;
            say!(
                "checkpoint {id}: ok, {}, {}",
                count(v.files, "file"),
                bytes(v.bytes)
            );
        }
        Err(_) if retired(rt, loc, id)? => say!(
            "checkpoint {id}: deleted while being verified (retention of a running job), skipped"
        ),
        Err(Bad { path, reason }) => {
            tally.bad.push(id);
            if path.is_empty() {
                say!("checkpoint {id}: BAD: {reason}");
            } else {
                say!("checkpoint {id}: BAD: {path}: {reason}");
            }
        }
    }
    Ok(())
}

/// Whether checkpoint `id` is no longer a completed checkpoint: a running job's
/// retention deleted it (manifest first, then files) while it was being read.
fn retired(rt: &Runtime, loc: &Location, id: CheckpointId) -> Result<bool, Failure> {
    Ok(!completed(rt, loc)?.ids.contains(&id))
}
