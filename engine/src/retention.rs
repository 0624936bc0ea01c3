//! Retention as pure decisions: given what checkpoint storage lists, which manifests,
//! state directories and shared files may be deleted now. The commit lane
//! (`driver/committer.rs`) lists, asks, and executes the actions in order.
//!
//! # Rules
//!
//! 1. The newest `retain` manifests are kept (at least one: the restore point). Older
//!    ones are deleted manifest first, then their state directory, so a crash between
//!    the two leaves a directory without a manifest, never a manifest without files.
//! 2. A state directory without a manifest that is older than the oldest kept
//!    checkpoint belongs to an abandoned checkpoint or an interrupted cleanup: deleted.
//!    Newer ones may belong to the checkpoint in flight and are kept.
//! 3. A shared file (RocksDB SST) is deleted when no kept manifest references it and it
//!    was uploaded by a checkpoint no newer than `latest` (newer uploads may belong to
//!    the checkpoint in flight). References are recomputed from the kept manifests
//!    every time, so nothing depends on counts surviving a crash.
//!
//! 4. A checkpoint a savepoint names (`pinned`) is kept with its directory and shared
//!    files, however old, until the savepoint is deleted; it does not count towards
//!    `retain`.
//!
//! The checkpoint in flight only re-references shared files of the newest completed
//! checkpoint, which rule 1 always keeps; so retention may run while it is in flight.

use crate::ids::CheckpointId;
use std::collections::HashSet;

/// One deletion, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delete {
    /// Delete checkpoint `id`'s manifest: it stops being a restore point.
    Manifest(CheckpointId),
    /// Delete every file under checkpoint `id`'s state directory.
    CheckpointFiles(CheckpointId),
    /// Delete one shared file.
    Shared(String),
}

/// What to delete among manifests and state directories, and which manifests stay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub actions: Vec<Delete>,
    /// The kept manifests, oldest first: read them for [`sweep_shared`].
    pub retained: Vec<CheckpointId>,
}

/// Rules 1, 2 and 4, from the listed manifest ids and state directories (any order)
/// after checkpoint `latest` completed, and the checkpoints savepoints name.
pub(crate) fn plan(
    manifests: &[CheckpointId],
    dirs: &[CheckpointId],
    retain: usize,
    latest: CheckpointId,
    pinned: &[CheckpointId],
) -> Plan {
    let mut ids: Vec<CheckpointId> = manifests
        .iter()
        .copied()
        .filter(|id| !pinned.contains(id))
        .collect();
    ids.sort();
    ids.dedup();
    let keep_from = ids.len().saturating_sub(retain.max(1));
    let (old, kept) = ids.split_at(keep_from);
    let oldest_kept = kept.first().copied().unwrap_or(latest).min(latest);
    let mut actions = Vec::new();
    for &id in old {
        actions.push(Delete::Manifest(id));
        actions.push(Delete::CheckpointFiles(id));
    }
    let mut retained: Vec<CheckpointId> = manifests
        .iter()
        .copied()
        .filter(|id| pinned.contains(id))
        .chain(kept.iter().copied())
        .collect();
    retained.sort();
    retained.dedup();
    let mut stray: Vec<CheckpointId> = dirs
        .iter()
        .copied()
        .filter(|d| *d < oldest_kept && !retained.contains(d) && !old.contains(d))
        .collect();
    stray.sort();
    stray.dedup();
    actions.extend(stray.into_iter().map(Delete::CheckpointFiles));
    Plan { actions, retained }
}

/// Rule 3: the listed shared files (path, uploading checkpoint) that may go, given
/// every path the kept manifests reference.
pub(crate) fn sweep_shared(
    shared: &[(String, CheckpointId)],
    referenced: &HashSet<String>,
    latest: CheckpointId,
) -> Vec<Delete> {
    shared
        .iter()
        .filter(|(path, by)| *by <= latest && !referenced.contains(path))
        .map(|(path, _)| Delete::Shared(path.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Checkpoint storage as the model sees it.
    #[derive(Debug, Default, Clone)]
    struct Store {
        manifests: BTreeMap<CheckpointId, BTreeSet<String>>,
        dirs: BTreeSet<CheckpointId>,
        /// Checkpoints savepoints name.
        pinned: BTreeSet<CheckpointId>,
        shared: BTreeMap<String, CheckpointId>,
    }

    impl Store {
        fn apply(&mut self, a: &Delete) {
            match a {
                Delete::Manifest(id) => {
                    self.manifests.remove(id);
                }
                Delete::CheckpointFiles(id) => {
                    self.dirs.remove(id);
                }
                Delete::Shared(p) => {
                    self.shared.remove(p);
                }
            }
        }

        /// Run retention as the commit lane does; with `crash_after`, stop after that
        /// many deletions.
        fn retain(&mut self, retain: usize, latest: CheckpointId, crash_after: Option<usize>) {
            let ids: Vec<CheckpointId> = self.manifests.keys().copied().collect();
            let dirs: Vec<CheckpointId> = self.dirs.iter().copied().collect();
            let pinned: Vec<CheckpointId> = self.pinned.iter().copied().collect();
            let p = plan(&ids, &dirs, retain, latest, &pinned);
            let mut budget = crash_after.unwrap_or(usize::MAX);
            for a in &p.actions {
                if budget == 0 {
                    return;
                }
                budget -= 1;
                self.apply(a);
            }
            let referenced: HashSet<String> = p
                .retained
                .iter()
                .flat_map(|id| self.manifests[id].iter().cloned())
                .collect();
            let listed: Vec<(String, CheckpointId)> =
                self.shared.iter().map(|(p, b)| (p.clone(), *b)).collect();
            for a in sweep_shared(&listed, &referenced, latest) {
                if budget == 0 {
                    return;
                }
                budget -= 1;
                self.apply(&a);
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A checkpoint completes, uploading `new` shared files and referencing again
        /// those of the newest completed checkpoint picked by the mask; the retention
        /// after it crashes after `crash` deletions, if set.
        Complete {
            new: u8,
            reuse_mask: u8,
            crash: Option<u8>,
        },
        /// A checkpoint is abandoned after writing its directory and `new` uploads.
        Abort { new: u8 },
        /// Retention runs again (after a restart) and crashes after `n` deletions.
        CrashRetention { n: u8 },
        /// A savepoint is taken of the newest completed checkpoint.
        Pin,
        /// The oldest savepoint is deleted.
        Unpin,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4, any::<u8>(), proptest::option::weighted(0.3, 0u8..6))
                .prop_map(|(new, reuse_mask, crash)| Op::Complete { new, reuse_mask, crash }),
            1 => (0u8..3).prop_map(|new| Op::Abort { new }),
            1 => (0u8..6).prop_map(|n| Op::CrashRetention { n }),
            1 => Just(Op::Pin),
            1 => Just(Op::Unpin),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Against a model of checkpoint storage: retention never deletes what a kept
        /// checkpoint or the checkpoint in flight needs, keeps exactly the newest
        /// `retain` restore points, and once it runs to the end leaves no garbage.
        #[test]
        fn retention_keeps_what_restores_need_and_nothing_else(
            retain in 0usize..4,
            ops in proptest::collection::vec(op(), 1..40),
            in_flight_uploads in 0u8..3,
        ) {
            let mut s = Store::default();
            // Stray files from before: a directory and a shared file nobody references.
            s.dirs.insert(CheckpointId(0));
            s.shared.insert("shared/0_stray".into(), CheckpointId(0));
            let mut next = 1u64;
            let mut latest: Option<CheckpointId> = None;
            for op in &ops {
                match *op {
                    Op::Complete { new, reuse_mask, crash } => {
                        let id = CheckpointId(next);
                        next += 1;
                        let mut refs: BTreeSet<String> = BTreeSet::new();
                        if let Some(l) = latest {
                            for (i, p) in s.manifests[&l].iter().enumerate() {
                                if reuse_mask & (1 << (i % 8)) != 0 {
                                    refs.insert(p.clone());
                                }
                            }
                        }
                        for i in 0..new {
                            let p = format!("shared/{}_{i}", id.0);
                            s.shared.insert(p.clone(), id);
                            refs.insert(p);
                        }
                        s.dirs.insert(id);
                        s.manifests.insert(id, refs);
                        latest = Some(id);
                        s.retain(retain, id, crash.map(usize::from));
                    }
                    Op::Abort { new } => {
                        let id = CheckpointId(next);
                        next += 1;
                        s.dirs.insert(id);
                        for i in 0..new {
                            s.shared.insert(format!("shared/{}_{i}", id.0), id);
                        }
                    }
                    Op::CrashRetention { n } => {
                        if let Some(l) = latest {
                            s.retain(retain, l, Some(n as usize));
                        }
                    }
                    Op::Pin => {
                        if let Some(l) = latest {
                            s.pinned.insert(l);
                        }
                    }
                    Op::Unpin => {
                        let oldest = s.pinned.iter().next().copied();
                        if let Some(p) = oldest {
                            s.pinned.remove(&p);
                        }
                    }
                }
                // Safety, after every step (crashed retentions included): every kept
                // manifest's directory and shared files exist.
                for (id, refs) in &s.manifests {
                    prop_assert!(s.dirs.contains(id), "manifest {id} without its files");
                    for p in refs {
                        prop_assert!(s.shared.contains_key(p), "{p} of {id} deleted");
                    }
                }
                if let Some(l) = latest {
                    prop_assert!(s.manifests.contains_key(&l), "latest {l} deleted");
                }
                for p in &s.pinned {
                    prop_assert!(s.manifests.contains_key(p), "savepoint's checkpoint {p} deleted");
                }
            }
            let Some(l) = latest else { return Ok(()) };
            // A checkpoint in flight: its directory and uploads survive a full retention.
            let flying = CheckpointId(next);
            s.dirs.insert(flying);
            for i in 0..in_flight_uploads {
                s.shared.insert(format!("shared/{}_{i}", flying.0), flying);
            }
            s.retain(retain, l, None);
            prop_assert!(s.dirs.contains(&flying));
            prop_assert_eq!(
                s.shared.values().filter(|&&b| b == flying).count(),
                in_flight_uploads as usize
            );
            // Exactly the newest `retain` (at least one) restore points are left besides
            // the savepoints' checkpoints...
            let completed: Vec<CheckpointId> = s
                .manifests
                .keys()
                .copied()
                .filter(|id| !s.pinned.contains(id))
                .collect();
            prop_assert!(s.manifests.contains_key(&l));
            prop_assert!(completed.len() <= retain.max(1));
            // ...and no garbage: directories are those of kept checkpoints (or newer);
            // shared files are referenced by one, or uploaded by the one in flight.
            let oldest = completed.first().copied().unwrap_or(l);
            for d in &s.dirs {
                prop_assert!(s.manifests.contains_key(d) || *d > oldest, "stray dir {d}");
            }
            let referenced: BTreeSet<&String> = s.manifests.values().flatten().collect();
            for (p, by) in &s.shared {
                prop_assert!(referenced.contains(p) || *by > l, "garbage {p}");
            }
        }
    }

    #[test]
    fn keeps_the_restore_point_even_with_retain_zero() {
        let p = plan(
            &[CheckpointId(3), CheckpointId(4)],
            &[],
            0,
            CheckpointId(4),
            &[],
        );
        assert_eq!(p.retained, vec![CheckpointId(4)]);
        assert_eq!(
            p.actions,
            vec![
                Delete::Manifest(CheckpointId(3)),
                Delete::CheckpointFiles(CheckpointId(3))
            ]
        );
    }

    #[test]
    fn keeps_a_savepoints_checkpoint_and_its_directory_whatever_its_age() {
        let ids = [1, 2, 3, 4, 5].map(CheckpointId);
        let p = plan(&ids, &ids, 1, CheckpointId(5), &[CheckpointId(2)]);
        assert_eq!(p.retained, vec![CheckpointId(2), CheckpointId(5)]);
        for gone in [1, 3, 4] {
            assert!(p.actions.contains(&Delete::Manifest(CheckpointId(gone))));
        }
        assert!(!p.actions.iter().any(|a| matches!(
            a,
            Delete::Manifest(CheckpointId(2)) | Delete::CheckpointFiles(CheckpointId(2))
        )));
    }
}
