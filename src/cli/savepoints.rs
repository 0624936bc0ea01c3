//! `exactly savepoints list | create | delete`.

use super::format::utc;
use crate::{Failure, Location};
use exactly::engine::manifest::Savepoint;
use std::process::ExitCode;
use tokio::runtime::Runtime;

/// `exactly savepoints list`: every savepoint, oldest checkpoint first.
pub fn list(rt: &Runtime, loc: &Location) -> Result<ExitCode, Failure> {
    let all = rt.block_on(loc.storage.list_savepoints())?;
    if all.is_empty() {
        say!("no savepoints at {}", loc.name);
        return Ok(ExitCode::SUCCESS);
    }
    let (ids, _) = rt.block_on(loc.storage.scan())?;
    say!("savepoints at {}", loc.name);
    say!(
        "{:<24}  {:>10}  {:<27}  {:<20}",
        "name",
        "checkpoint",
        "created",
        "job"
    );
    for sp in &all {
        let missing = if ids.contains(&sp.checkpoint) {
            ""
        } else {
            "  MISSING: its checkpoint's manifest is gone"
        };
        say!(
            "{:<24}  {:>10}  {:<27}  {:<20}{missing}",
            sp.name,
            sp.checkpoint.to_string(),
            utc(sp.created_at_ms),
            sp.job
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `exactly savepoints create`: keep completed checkpoint `id` (default: the latest)
/// as savepoint `name`.
pub fn create(
    rt: &Runtime,
    loc: &Location,
    name: &str,
    id: Option<u64>,
) -> Result<ExitCode, Failure> {
    let done = super::checkpoints::completed(rt, loc)?;
    let id = super::checkpoints::pick(loc, &done, id)?;
    if let Some(note) = done.orphan_note(id) {
        return Err(Failure(format!(
            "checkpoint {id} cannot be a savepoint: {note}"
        )));
    }
    let manifest = rt.block_on(loc.storage.read_manifest(id))?;
    let sp = Savepoint {
        name: name.to_string(),
        job: manifest.job.clone(),
        checkpoint: id,
        created_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    rt.block_on(loc.storage.write_savepoint(&sp))?;
    // A running job's retention may have deleted the checkpoint meanwhile: then the
    // savepoint would name nothing.
    if let Err(e) = rt.block_on(loc.storage.read_manifest(id)) {
        let _ = rt.block_on(loc.storage.delete_savepoint(name));
        return Err(Failure(format!(
            "checkpoint {id} was deleted while the savepoint was written ({}); take the \
             savepoint of a newer one, or stop the job with stop_with_savepoint",
            crate::describe(&e)
        )));
    }
    say!(
        "savepoint '{name}' keeps checkpoint {id} of job '{}' at {}",
        sp.job,
        loc.name
    );
    if manifest.is_final || done.latest() == Some(id) {
        say!("a new version of the job starts from it with .restore_from_savepoint(\"{name}\")");
    }
    Ok(ExitCode::SUCCESS)
}

/// `exactly savepoints delete`: the checkpoint goes with the job's next retention run.
pub fn delete(rt: &Runtime, loc: &Location, name: &str) -> Result<ExitCode, Failure> {
    if rt.block_on(loc.storage.delete_savepoint(name))? {
        say!(
            "savepoint '{name}' deleted; its checkpoint goes with the job's next retention run \
             unless it is among the newest"
        );
        Ok(ExitCode::SUCCESS)
    } else {
        Err(Failure(format!("no savepoint '{name}' at {}", loc.name)))
    }
}
