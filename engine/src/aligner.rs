//! Barrier alignment for a task with several input channels, as a pure state machine.
//!
//! # Protocol
//!
//! 1. A barrier `n` arriving on input `i` blocks `i`: records behind it belong to the
//!    epoch after `n` and must not reach the operator before its snapshot.
//! 2. When barrier `n` has arrived on every input that has not ended, the task snapshots,
//!    forwards `n` downstream and unblocks every input ([`BarrierAligner::on_barrier`]
//!    returns `Some(n)`).
//! 3. A barrier `m > n` arriving while `n` is still being aligned means `n` was abandoned
//!    upstream; alignment of `n` is dropped and `m` is aligned instead.
//! 4. Barriers at or below the last snapshotted id are stale and ignored.
//!
//! # Invariants
//!
//! * A blocked input is never read (the driver asks [`BarrierAligner::is_readable`]).
//! * For each id, the snapshot is signalled at most once, and only after every input that
//!   has not ended delivered that id.
//! * An ended input counts as aligned: sources only end after the final barrier, so an
//!   ended input has nothing left to deliver.
//!
//! # At-least-once
//!
//! [`BarrierAligner::at_least_once`] skips step 1: an input that delivered barrier `n`
//! stays readable, so records after `n` may reach the operator before its snapshot of
//! `n`. The snapshot still waits for `n` on every input (nothing before `n` is missed:
//! no loss), but may include the effect of records a restore replays (duplicates). Nothing
//! waits behind a barrier, so a backlog on one input never holds the others back.

use crate::ids::CheckpointId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    Open,
    /// Delivered the barrier being aligned; read only in at-least-once mode.
    Blocked,
    Ended,
}

/// Alignment state of one task's inputs.
#[derive(Debug, Clone)]
pub struct BarrierAligner {
    inputs: Vec<Input>,
    aligning: Option<CheckpointId>,
    last_snapshot: Option<CheckpointId>,
    /// Exactly-once: an input that delivered the barrier is not read until the snapshot.
    block: bool,
}

/// What happened when an input ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndOutcome {
    /// The pending alignment completed because of this end: snapshot now.
    pub snapshot: Option<CheckpointId>,
    /// Every input has ended: the task may end.
    pub all_ended: bool,
}

impl BarrierAligner {
    /// An aligner for `inputs` channels, all open.
    pub fn new(inputs: usize) -> Self {
        BarrierAligner {
            inputs: vec![Input::Open; inputs],
            aligning: None,
            last_snapshot: None,
            block: true,
        }
    }

    /// An aligner that never blocks an input (see the module's "At-least-once").
    pub fn at_least_once(inputs: usize) -> Self {
        BarrierAligner {
            block: false,
            ..BarrierAligner::new(inputs)
        }
    }

    /// Whether input `i` may be read now.
    pub fn is_readable(&self, i: usize) -> bool {
        match self.inputs[i] {
            Input::Open => true,
            Input::Blocked => !self.block,
            Input::Ended => false,
        }
    }

    /// The checkpoint being aligned, if any.
    pub fn aligning(&self) -> Option<CheckpointId> {
        self.aligning
    }

    /// Barrier `id` arrived on input `i`. Returns `Some(id)` when the task must snapshot now.
    pub fn on_barrier(&mut self, i: usize, id: CheckpointId) -> Option<CheckpointId> {
        if self.last_snapshot.is_some_and(|last| id <= last) {
            return None;
        }
        match self.aligning {
            Some(current) if id < current => return None,
            Some(current) if id > current => {
                // The older checkpoint was abandoned upstream: its barrier will not come
                // on the inputs still open. Release them and align the newer one.
                self.unblock_all();
                self.aligning = Some(id);
            }
            Some(_) => {}
            None => self.aligning = Some(id),
        }
        if self.inputs[i] == Input::Open {
            self.inputs[i] = Input::Blocked;
        }
        self.try_complete()
    }

    /// Input `i` delivered end of stream.
    pub fn on_end(&mut self, i: usize) -> EndOutcome {
        self.inputs[i] = Input::Ended;
        let snapshot = if self.aligning.is_some() {
            self.try_complete()
        } else {
            None
        };
        EndOutcome {
            snapshot,
            all_ended: self.inputs.iter().all(|s| *s == Input::Ended),
        }
    }

    fn try_complete(&mut self) -> Option<CheckpointId> {
        if self.inputs.contains(&Input::Open) {
            return None;
        }
        let id = self.aligning.take()?;
        self.last_snapshot = Some(id);
        self.unblock_all();
        Some(id)
    }

    fn unblock_all(&mut self) {
        for s in &mut self.inputs {
            if *s == Input::Blocked {
                *s = Input::Open;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(n: u64) -> CheckpointId {
        CheckpointId(n)
    }

    #[test]
    fn single_input_snapshots_at_once() {
        let mut a = BarrierAligner::new(1);
        assert_eq!(a.on_barrier(0, c(1)), Some(c(1)));
        assert!(a.is_readable(0));
    }

    #[test]
    fn blocks_until_all_inputs_delivered_in_any_order() {
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]] {
            let mut a = BarrierAligner::new(3);
            for (k, &i) in order.iter().enumerate() {
                let r = a.on_barrier(i, c(7));
                if k < 2 {
                    assert_eq!(r, None, "order {order:?}");
                    assert!(!a.is_readable(i));
                } else {
                    assert_eq!(r, Some(c(7)), "order {order:?}");
                }
            }
            assert!((0..3).all(|i| a.is_readable(i)));
        }
    }

    #[test]
    fn newer_barrier_supersedes_abandoned_alignment() {
        let mut a = BarrierAligner::new(2);
        assert_eq!(a.on_barrier(0, c(1)), None);
        // Checkpoint 1 never reaches input 1 (abandoned); 2 arrives on input 0.
        assert_eq!(a.on_barrier(0, c(2)), None);
        assert!(!a.is_readable(0) && a.is_readable(1));
        // A late barrier 1 on input 1 is stale.
        assert_eq!(a.on_barrier(1, c(1)), None);
        assert!(a.is_readable(1));
        assert_eq!(a.on_barrier(1, c(2)), Some(c(2)));
    }

    #[test]
    fn stale_barrier_after_snapshot_is_ignored() {
        let mut a = BarrierAligner::new(2);
        a.on_barrier(0, c(3));
        assert_eq!(a.on_barrier(1, c(3)), Some(c(3)));
        assert_eq!(a.on_barrier(0, c(3)), None);
        assert!(a.is_readable(0));
        assert_eq!(a.aligning(), None);
    }

    #[test]
    fn end_of_input_during_alignment_completes_it() {
        let mut a = BarrierAligner::new(2);
        assert_eq!(a.on_barrier(0, c(5)), None);
        let out = a.on_end(1);
        assert_eq!(
            out,
            EndOutcome {
                snapshot: Some(c(5)),
                all_ended: false
            }
        );
        assert!(a.is_readable(0));
        let out = a.on_end(0);
        assert_eq!(
            out,
            EndOutcome {
                snapshot: None,
                all_ended: true
            }
        );
    }

    #[test]
    fn end_without_alignment_does_not_snapshot() {
        let mut a = BarrierAligner::new(2);
        assert_eq!(a.on_end(0).snapshot, None);
        // With input 0 gone, a barrier on input 1 completes alignment alone.
        assert_eq!(a.on_barrier(1, c(1)), Some(c(1)));
    }

    #[test]
    fn at_least_once_keeps_reading_but_snapshots_only_when_all_delivered() {
        let mut a = BarrierAligner::at_least_once(3);
        assert_eq!(a.on_barrier(0, c(4)), None);
        assert!(a.is_readable(0), "records after the barrier flow on");
        assert_eq!(a.on_barrier(2, c(4)), None);
        assert!((0..3).all(|i| a.is_readable(i)));
        assert_eq!(a.on_barrier(1, c(4)), Some(c(4)));
        assert_eq!(a.on_end(1).snapshot, None);
        assert!(!a.is_readable(1), "an ended input is never read");
    }

    /// One input's script: a sequence of barrier ids (increasing), then maybe end.
    fn scripts() -> impl Strategy<Value = Vec<(Vec<u64>, bool)>> {
        proptest::collection::vec(
            (
                proptest::collection::btree_set(1u64..6, 0..5)
                    .prop_map(|s| s.into_iter().collect()),
                any::<bool>(),
            ),
            1..5,
        )
    }

    proptest! {
        /// Drive random interleavings, honouring blocking as the task driver does.
        /// Invariants: snapshots are strictly increasing; a snapshot of `n` happens only
        /// when every input that has not ended has delivered `n` (or passed it).
        #[test]
        fn alignment_invariants(
            scripts in scripts(),
            picks in proptest::collection::vec(any::<usize>(), 0..200),
            exactly_once in any::<bool>(),
        ) {
            let n = scripts.len();
            let mut a = if exactly_once {
                BarrierAligner::new(n)
            } else {
                BarrierAligner::at_least_once(n)
            };
            let mut pos = vec![0usize; n];
            let mut ended = vec![false; n];
            let mut delivered_max = vec![0u64; n];
            let mut last = 0u64;
            for p in picks {
                let readable: Vec<usize> = (0..n).filter(|&i| !ended[i] && a.is_readable(i)).collect();
                if readable.is_empty() { break; }
                let i = readable[p % readable.len()];
                let (bars, ends) = &scripts[i];
                let snap = if pos[i] < bars.len() {
                    let id = bars[pos[i]];
                    pos[i] += 1;
                    delivered_max[i] = id;
                    a.on_barrier(i, CheckpointId(id))
                } else if *ends {
                    ended[i] = true;
                    a.on_end(i).snapshot
                } else {
                    ended[i] = true; // input idles forever: stop reading it
                    // Model an idle input as never delivering more: it still blocks alignment.
                    None
                };
                if let Some(id) = snap {
                    prop_assert!(id.0 > last, "snapshots must increase");
                    last = id.0;
                    for (j, &max) in delivered_max.iter().enumerate() {
                        let done = a_input_ended(&a, j) || max >= id.0;
                        prop_assert!(done, "snapshot {} before input {} delivered it", id.0, j);
                    }
                }
            }
        }
    }

    fn a_input_ended(a: &BarrierAligner, i: usize) -> bool {
        a.inputs[i] == Input::Ended
    }
}
