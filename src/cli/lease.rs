//! `exactly lease show`.

use super::format::utc;
use crate::{Failure, Location};
use exactly::engine::storage::Lease;
use std::process::ExitCode;
use tokio::runtime::Runtime;

/// `exactly lease show`: the leases the storage holds; none is taken or changed.
pub fn show(rt: &Runtime, loc: &Location) -> Result<ExitCode, Failure> {
    let leases = rt.block_on(loc.storage.list_leases())?;
    let Some((current, older)) = leases.split_last() else {
        say!(
            "no lease at {}: no job instance has started on this location",
            loc.name
        );
        return Ok(ExitCode::SUCCESS);
    };
    say!("lease at {}", loc.name);
    say!("  epoch   {}", current.epoch);
    say!("  taken   {}", taken(current));
    say!("  object  {}", current.path);
    say!("The instance that took it fences every older one; a job started now would take a");
    say!("higher epoch. A lease stays after its job ends: it names the latest instance to start");
    say!("here, running or not. The storage records nothing else about the holder.");
    if !older.is_empty() {
        let epochs: Vec<String> = older.iter().map(|l| l.epoch.to_string()).collect();
        say!(
            "older leases not yet removed (their holders are fenced): {}",
            epochs.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn taken(lease: &Lease) -> String {
    lease
        .created_at_ms
        .map_or_else(|| "unknown (the store reports no time)".into(), utc)
}
