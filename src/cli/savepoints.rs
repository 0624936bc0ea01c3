//! `exactly savepoints list | create | delete | assignment`.

use super::format::utc;
use crate::{Failure, Location};
use exactly::engine::codec;
use exactly::engine::ids::{
    split_slot, subtask_for_key_group, KeyGroup, KeyGroupRange, SubtaskIndex,
};
use exactly::engine::manifest::Savepoint;
use std::collections::BTreeMap;
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
        instance: None,
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

/// One old instance's part of a savepoint: its location, and its manifest.
struct Part {
    index: usize,
    url: String,
    storage: exactly::engine::storage::CheckpointStorage,
    manifest: exactly::engine::manifest::Manifest,
}

/// `exactly savepoints assignment`: which instance owns which key groups and splits in
/// savepoint `name` (taken by every instance of a job that runs as several processes,
/// or by the job in one process), and which it would own started as `instances`
/// instances of `parallelism` subtasks.
pub fn assignment(
    rt: &Runtime,
    loc: &Location,
    name: &str,
    instances: usize,
    parallelism: Option<usize>,
) -> Result<ExitCode, Failure> {
    if instances == 0 || parallelism == Some(0) {
        return Err(Failure(
            "--instances and --parallelism must be at least 1".into(),
        ));
    }
    let mut parts = Vec::new();
    for k in rt.block_on(loc.storage.instance_dirs())? {
        let storage = loc.storage.child(&format!("instances/{k}"));
        if let Some(sp) = rt.block_on(storage.read_savepoint(name))? {
            let manifest = rt.block_on(storage.read_manifest(sp.checkpoint))?;
            parts.push(Part {
                index: sp.instance.map_or(k, |i| i.index),
                url: storage.url().to_string(),
                storage,
                manifest,
            });
        }
    }
    if parts.is_empty() {
        if let Some(sp) = rt.block_on(loc.storage.read_savepoint(name))? {
            let manifest = rt.block_on(loc.storage.read_manifest(sp.checkpoint))?;
            parts.push(Part {
                index: 0,
                url: loc.storage.url().to_string(),
                storage: loc.storage.clone(),
                manifest,
            });
        }
    }
    let Some(first) = parts.first() else {
        return Err(Failure(format!(
            "no savepoint '{name}' at {} or in its instances' locations",
            loc.name
        )));
    };
    let max = first.manifest.max_parallelism;
    let old_p = first
        .manifest
        .tasks
        .iter()
        .map(|t| t.parallelism)
        .max()
        .unwrap_or(1);
    let new_p = parallelism.unwrap_or(old_p);
    if instances.saturating_mul(new_p) > usize::from(max) {
        return Err(Failure(format!(
            "{instances} instance(s) of {new_p} subtask(s) exceed the job's {max} key groups \
             (max_parallelism): some subtasks would own none"
        )));
    }
    // Splits per operator, with the old instance holding each.
    let mut splits: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();
    for part in &parts {
        let id = part.manifest.checkpoint;
        let sub = Location {
            storage: part.storage.clone(),
            name: part.url.clone(),
        };
        for h in part.manifest.tasks.iter().filter(|h| !h.path.is_empty()) {
            let payload = super::state::read_payload(rt, &sub, id, h)?;
            for (op, snap) in payload.operators {
                // Sources record no state types; operators with state of their own
                // do, and records in flight belong to no split.
                if h.state_types.contains_key(&op.0)
                    || snap.list.is_empty()
                    || op.0.ends_with("@in-flight")
                {
                    continue;
                }
                for entry in &snap.list {
                    if let Some((split, _)) = codec::decode_prefix::<String>(entry) {
                        splits
                            .entry(op.0.clone())
                            .or_default()
                            .push((split, part.index));
                    }
                }
            }
        }
    }
    // The order sources list their splits in: by name, trailing numbers in order.
    for list in splits.values_mut() {
        list.sort_by_key(|(split, _)| {
            let (stem, n) = split
                .rsplit_once('-')
                .and_then(|(a, b)| Some((a.to_string(), b.parse::<u64>().ok()?)))
                .unwrap_or_else(|| (split.clone(), 0));
            (stem, n, split.clone())
        });
    }
    say!(
        "savepoint '{name}' at {}: {} instance(s) of {old_p} subtask(s), {max} key groups",
        loc.name,
        parts.len()
    );
    let show = |title: &str, n: usize, p: usize, owner_of: &dyn Fn(&str, &str, usize) -> usize| {
        say!("{title}: {n} instance(s) of {p} subtask(s)");
        for i in 0..n {
            let first = KeyGroupRange::for_subtask(max, n * p, SubtaskIndex(i * p));
            let last = KeyGroupRange::for_subtask(max, n * p, SubtaskIndex((i + 1) * p - 1));
            say!("  instance {i}: key groups {}..{}", first.start, last.end);
            for (op, list) in &splits {
                let mine: Vec<&str> = list
                    .iter()
                    .enumerate()
                    .filter(|(at, (split, _))| owner_of(op, split, *at) == i)
                    .map(|(_, (split, _))| split.as_str())
                    .collect();
                if !mine.is_empty() {
                    say!("    {op}: {}", mine.join(", "));
                }
            }
        }
    };
    let holders: BTreeMap<(String, String), usize> = splits
        .iter()
        .flat_map(|(op, list)| list.iter().map(|(s, k)| ((op.clone(), s.clone()), *k)))
        .collect();
    show("before", parts.len(), old_p, &|op, split, _| {
        holders[&(op.to_string(), split.to_string())]
    });
    let total = instances * new_p;
    show("after", instances, new_p, &|op, split, at| {
        // A repartition topic's partition is its key group; other splits are dealt out
        // in the order the source lists them (here: by name, numbers in order).
        let subtask = match op
            .ends_with(".repartition-in")
            .then(|| split.rsplit('-').next()?.parse::<u16>().ok())
            .flatten()
        {
            Some(kg) => subtask_for_key_group(KeyGroup(kg), max, total).0,
            None if instances > 1 => (split_slot(split) % total as u64) as usize,
            None => at % total,
        };
        subtask / new_p
    });
    Ok(ExitCode::SUCCESS)
}
