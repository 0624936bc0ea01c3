//! Whether this run may restore a checkpoint at all ([`fits`]), and where every piece
//! of it goes ([`place`]): pure decisions, fed by the driver with the job's settings,
//! operators and the checkpoint's contents, and tested here (`place` against a model).
//!
//! Every piece must go somewhere: state (keyed state, operator state, source offsets)
//! to an operator of the same name, records in flight of an unaligned checkpoint to the
//! task that read them, output pending commit to a sink of the same name. What has no
//! place means an operator was renamed or removed, and restoring without it would
//! silently restart that state empty (or re-read a source from its beginning), so it is
//! an error, unless the job allows it on purpose; then it is dropped with a warning.

use crate::error::{Error, Result};
use crate::ids::{CheckpointId, OperatorId};
use crate::manifest::{Manifest, PendingCommit};
use crate::plan::RestoredState;
use crate::runtime::inflight;
use std::collections::HashSet;

/// Whether a run of job `name` (`max_parallelism`, `instances` processes) may restore
/// checkpoint `id` (manifest `m`, found in `location`); `same_share` says whether every
/// task of the checkpoint has this run's parallelism (what each instance reads depends
/// on it). What changes only through a savepoint is refused, naming what to do.
pub(crate) fn fits(
    m: &Manifest,
    id: CheckpointId,
    job: (&str, u16, usize, usize),
    same_share: bool,
    location: &str,
) -> Result<()> {
    let (name, max_parallelism, instances, parallelism) = job;
    if m.job != name {
        return Err(Error::config(format!(
            "checkpoint storage {location} holds checkpoints of job '{}', not '{name}'; use a \
             separate location per job",
            m.job
        )));
    }
    if m.max_parallelism != max_parallelism {
        return Err(Error::config(format!(
            "checkpoint {id} was taken with max_parallelism {}, the job now has \
             {max_parallelism}; it is fixed for the life of a job's state",
            m.max_parallelism
        )));
    }
    let by = m.instance.map_or(1, |i| i.count);
    if by != instances || (instances > 1 && !same_share) {
        return Err(Error::config(format!(
            "checkpoint {id} in {location} was taken by {by} instance(s) of this job with \
             another share of the work than this one ({instances} instance(s), parallelism \
             {parallelism}): across instances, the number of instances and the parallelism \
             change only through a savepoint. Stop every instance with one savepoint name \
             (savepoint_on_stop, or stop_with_savepoint) and start the new layout with \
             restore_from_savepoint"
        )));
    }
    Ok(())
}

/// What of this run can take restored pieces.
pub(crate) struct Receivers {
    /// Every operator, with the name whose state it restores after a rename
    /// (`restore_state_of`).
    pub operators: Vec<(OperatorId, Option<OperatorId>)>,
    /// The heads of this run's tasks with inputs: the only ones that replay records in
    /// flight (an operator chained into another task has no input of its own).
    pub task_heads: Vec<OperatorId>,
    /// The sinks.
    pub sinks: HashSet<OperatorId>,
}

/// Move renamed operators' state and records in flight to their new names, then check
/// that every piece has a receiver. With `allow_dropping`, pieces without one are
/// removed instead, and named in the returned list (for a warning).
pub(crate) fn place(
    to: &Receivers,
    allow_dropping: bool,
    checkpoint: CheckpointId,
    state: &mut RestoredState,
    pending: &mut Vec<PendingCommit>,
) -> Result<Vec<String>> {
    for (op, old) in &to.operators {
        let Some(old) = old else { continue };
        // A task's records in flight follow its head's rename, whether or not that
        // operator has state of its own (a sink, a union).
        let (old_flight, new_flight) = (inflight::operator_of(old), inflight::operator_of(op));
        match (
            state.operators.contains_key(&old_flight),
            state.operators.contains_key(&new_flight),
        ) {
            (true, true) => {
                return Err(Error::config(format!(
                    "checkpoint {checkpoint} holds records in flight of both tasks '{old}' and \
                     '{op}'; task '{op}' cannot replay those of '{old}' without dropping its own"
                )))
            }
            (true, false) => {
                if let Some(snaps) = state.operators.remove(&old_flight) {
                    state.operators.insert(new_flight, snaps);
                }
            }
            _ => {}
        }
        match (
            state.operators.contains_key(old),
            state.operators.contains_key(op),
        ) {
            (true, true) => {
                return Err(Error::config(format!(
                    "checkpoint {checkpoint} holds state of both '{old}' and '{op}'; operator \
                     '{op}' cannot restore the state of '{old}' without dropping its own"
                )))
            }
            (true, false) => {
                tracing::info!(operator = %op, from = %old, "restoring the state of a renamed operator");
                if let Some(snaps) = state.operators.remove(old) {
                    state.operators.insert(op.clone(), snaps);
                }
                if let Some(types) = state.types.remove(old) {
                    state.types.insert(op.clone(), types);
                }
            }
            // Renamed by an earlier run, or nothing to restore.
            _ => {}
        }
    }
    let in_flight: Vec<OperatorId> = to.task_heads.iter().map(inflight::operator_of).collect();
    let known: HashSet<&OperatorId> = to
        .operators
        .iter()
        .map(|(op, _)| op)
        .chain(&in_flight)
        .collect();
    let mut orphans: Vec<String> = state
        .operators
        .keys()
        .filter(|op| !known.contains(op))
        .map(|op| match inflight::task_of(op) {
            Some(task) => format!("records in flight of task '{task}'"),
            None => format!("state of operator '{op}'"),
        })
        .collect();
    let mut orphan_sinks: Vec<String> = pending
        .iter()
        .filter(|p| !to.sinks.contains(&p.sink))
        .map(|p| format!("output of sink '{}' not yet committed", p.sink))
        .collect();
    orphans.sort();
    orphan_sinks.sort();
    orphan_sinks.dedup();
    orphans.extend(orphan_sinks);
    if orphans.is_empty() {
        return Ok(orphans);
    }
    if !allow_dropping {
        let flight = if orphans.iter().any(|o| o.starts_with("records in flight")) {
            " (records in flight of an unaligned checkpoint are replayed by the task that \
             read them: if a parallelism change chained that operator into another task, \
             restore at the old parallelism, then take a savepoint, which is always \
             aligned, before changing it)"
        } else {
            ""
        };
        return Err(Error::config(format!(
            "checkpoint {checkpoint} holds {} that this job has no operator for: was an \
             operator renamed or removed? Give it back its old name to restore it, or call \
             JobBuilder::allow_non_restored_state() to drop it on purpose{flight}",
            orphans.join(", ")
        )));
    }
    state.operators.retain(|op, _| known.contains(op));
    state.types.retain(|op, _| known.contains(op));
    pending.retain(|p| to.sinks.contains(&p.sink));
    Ok(orphans)
}

#[cfg(test)]
mod tests {
    use super::{fits, place, Receivers};
    use crate::ids::Instance;
    use crate::manifest::{Manifest, MANIFEST_FORMAT_VERSION};

    fn manifest(job: &str, max_parallelism: u16, instance: Option<Instance>) -> Manifest {
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            job: job.into(),
            checkpoint: CheckpointId(7),
            completed_at_ms: 0,
            max_parallelism,
            is_final: false,
            tasks: vec![],
            pending_commits: vec![],
            from_savepoint: None,
            generation: 1,
            instance,
        }
    }

    #[test]
    fn a_checkpoint_fits_only_the_job_and_layout_that_wrote_it() {
        let fit = |m: &Manifest, job, same_share| {
            fits(m, CheckpointId(7), job, same_share, "/chk").map_err(|e| e.to_string())
        };
        let one = manifest("ledger", 128, None);
        assert_eq!(fit(&one, ("ledger", 128, 1, 2), true), Ok(()));
        // One process: the parallelism may change (rescale by key group).
        assert_eq!(fit(&one, ("ledger", 128, 1, 3), false), Ok(()));
        let err = fit(&one, ("billing", 128, 1, 2), true).unwrap_err();
        assert!(err.contains("job 'ledger', not 'billing'"), "{err}");
        let err = fit(&one, ("ledger", 256, 1, 2), true).unwrap_err();
        assert!(
            err.contains("max_parallelism 128, the job now has 256"),
            "{err}"
        );
        let err = fit(&one, ("ledger", 128, 2, 2), true).unwrap_err();
        assert!(
            err.contains("taken by 1 instance(s)") && err.contains("savepoint"),
            "{err}"
        );

        let three = manifest("ledger", 128, Some(Instance { index: 1, count: 3 }));
        assert_eq!(fit(&three, ("ledger", 128, 3, 2), true), Ok(()));
        let err = fit(&three, ("ledger", 128, 3, 4), false).unwrap_err();
        assert!(
            err.contains("taken by 3 instance(s)") && err.contains("parallelism 4"),
            "{err}"
        );
        let err = fit(&three, ("ledger", 128, 2, 2), true).unwrap_err();
        assert!(err.contains("(2 instance(s)"), "{err}");
    }

    use crate::ids::{CheckpointId, OperatorId, SubtaskIndex};
    use crate::manifest::PendingCommit;
    use crate::plan::RestoredState;
    use crate::runtime::inflight;
    use crate::state::OperatorSnapshot;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet, HashSet};

    /// Names are small numbers, so renames, collisions and orphans are frequent.
    fn name(n: u8) -> OperatorId {
        OperatorId(format!("op{n}"))
    }

    /// A snapshot that says where it came from: its one list entry is the original key.
    fn snapshot(origin: &OperatorId) -> OperatorSnapshot {
        OperatorSnapshot {
            keyed: Vec::new(),
            list: vec![origin.0.clone().into_bytes()],
            db: None,
        }
    }

    fn origin(s: &OperatorSnapshot) -> OperatorId {
        OperatorId(String::from_utf8(s.list[0].clone()).unwrap())
    }

    #[derive(Debug, Clone)]
    struct Case {
        /// Operators of the run: name, renamed from, is a sink, is a task head.
        operators: Vec<(u8, Option<u8>, bool, bool)>,
        /// Operators with state in the checkpoint, and tasks with records in flight.
        state: BTreeSet<u8>,
        flight: BTreeSet<u8>,
        /// Sinks with output pending commit.
        pending: BTreeSet<u8>,
        allow: bool,
    }

    /// Only jobs that pass the driver's validation: an operator is renamed from a name
    /// no operator has now, two operators never rename from one name, and sinks are
    /// never renamed.
    fn case() -> impl Strategy<Value = Case> {
        (
            prop::collection::btree_map(
                0u8..8,
                (prop::option::of(0u8..12), any::<bool>(), any::<bool>()),
                0..6,
            ),
            prop::collection::btree_set(0u8..12, 0..6),
            prop::collection::btree_set(0u8..12, 0..3),
            prop::collection::btree_set(0u8..12, 0..3),
            any::<bool>(),
        )
            .prop_map(|(ops, state, flight, pending, allow)| {
                let names: BTreeSet<u8> = ops.keys().copied().collect();
                let mut taken = BTreeSet::new();
                let operators = ops
                    .into_iter()
                    .map(|(n, (from, sink, head))| {
                        let from = from.filter(|f| !sink && !names.contains(f) && taken.insert(*f));
                        (n, from, sink, head)
                    })
                    .collect();
                Case {
                    operators,
                    state,
                    flight,
                    pending,
                    allow,
                }
            })
    }

    /// The model, said directly: a piece stored under `k` belongs to the operator
    /// renamed from `k`, or else to the one named `k` (its destination name); it has a
    /// receiver if an operator has that name (for records in flight: a task head).
    /// A conflict is an operator that both has a piece of its own and is renamed from
    /// another stored one.
    fn destination(c: &Case, k: u8) -> u8 {
        c.operators
            .iter()
            .find(|o| o.1 == Some(k))
            .map_or(k, |o| o.0)
    }

    fn received(c: &Case, k: u8, heads_only: bool) -> bool {
        let d = destination(c, k);
        c.operators.iter().any(|o| o.0 == d && (!heads_only || o.3))
    }

    fn conflict(c: &Case, stored: &BTreeSet<u8>) -> bool {
        c.operators
            .iter()
            .any(|(n, from, _, _)| from.is_some_and(|f| stored.contains(&f)) && stored.contains(n))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Each stored piece lands on exactly the receiver the model names, keeping its
        /// contents; a piece without a receiver refuses the restore, or is dropped and
        /// named when dropping is allowed; conflicting renames are refused.
        #[test]
        fn every_restored_piece_goes_to_its_receiver_or_is_named(c in case()) {
            let receivers = Receivers {
                operators: c.operators.iter().map(|(n, from, _, _)| (name(*n), from.map(name))).collect(),
                task_heads: c.operators.iter().filter(|o| o.3).map(|o| name(o.0)).collect(),
                sinks: c.operators.iter().filter(|o| o.2).map(|o| name(o.0)).collect::<HashSet<_>>(),
            };
            let mut state = RestoredState::default();
            for k in &c.state {
                state.operators.insert(name(*k), vec![snapshot(&name(*k))]);
            }
            for k in &c.flight {
                let f = inflight::operator_of(&name(*k));
                state.operators.insert(f.clone(), vec![snapshot(&f)]);
            }
            let mut pending: Vec<PendingCommit> = c.pending.iter().map(|k| PendingCommit {
                checkpoint: CheckpointId(3),
                sink: name(*k),
                subtask: SubtaskIndex(0),
                committable: serde_json::Value::Null,
            }).collect();

            let result = place(&receivers, c.allow, CheckpointId(3), &mut state, &mut pending);

            if conflict(&c, &c.state) || conflict(&c, &c.flight) {
                prop_assert!(result.is_err(), "a conflicting rename was accepted");
                return Ok(());
            }
            // Pieces with no receiver, by the model.
            let lost_state: Vec<u8> = c.state.iter().copied()
                .filter(|k| !received(&c, *k, false)).collect();
            let lost_flight: Vec<u8> = c.flight.iter().copied()
                .filter(|k| !received(&c, *k, true)).map(|k| destination(&c, k)).collect();
            let sinks: BTreeSet<u8> = c.operators.iter().filter(|o| o.2).map(|o| o.0).collect();
            let lost_output: Vec<u8> = c.pending.difference(&sinks).copied().collect();
            let lost = lost_state.len() + lost_flight.len() + lost_output.len();
            if lost > 0 && !c.allow {
                let err = result.expect_err("a piece without a receiver was accepted").to_string();
                for k in &lost_state {
                    prop_assert!(err.contains(&format!("state of operator '{}'", name(*k))), "{err}");
                }
                for k in &lost_flight {
                    prop_assert!(err.contains(&format!("records in flight of task '{}'", name(*k))), "{err}");
                }
                for k in &lost_output {
                    prop_assert!(err.contains(&format!("output of sink '{}'", name(*k))), "{err}");
                }
                return Ok(());
            }
            let dropped = result.expect("a restore with every piece placed, or dropping allowed");
            prop_assert_eq!(dropped.len(), lost);
            // Where each piece went.
            let mut expected: BTreeMap<OperatorId, OperatorId> = BTreeMap::new();
            for k in c.state.iter().filter(|k| received(&c, **k, false)) {
                expected.insert(name(destination(&c, *k)), name(*k));
            }
            for k in c.flight.iter().filter(|k| received(&c, **k, true)) {
                expected.insert(
                    inflight::operator_of(&name(destination(&c, *k))),
                    inflight::operator_of(&name(*k)),
                );
            }
            let got: BTreeMap<OperatorId, OperatorId> = state.operators.iter()
                .map(|(op, snaps)| {
                    assert_eq!(snaps.len(), 1);
                    (op.clone(), origin(&snaps[0]))
                })
                .collect();
            prop_assert_eq!(got, expected);
            let kept: BTreeSet<u8> = c.pending.intersection(&sinks).copied().collect();
            let got_pending: BTreeSet<String> = pending.iter().map(|p| p.sink.0.clone()).collect();
            prop_assert_eq!(got_pending, kept.iter().map(|k| name(*k).0).collect::<BTreeSet<_>>());
        }
    }
}
