//! Barrier alignment for a task with several input channels, as a pure state machine:
//! aligned (exactly-once), unaligned after a timeout (exactly-once, barriers overtake
//! queued records) and at-least-once are parameters of one machine ([`Mode`]).
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
//!
//! # Unaligned
//!
//! In [`Mode::Unaligned`] a checkpoint is announced on each task's priority lane
//! ([`BarrierAligner::on_announce`]) when the driver triggers it, and again by each
//! sender as it puts the barrier into the channel, so the task learns of it at once
//! instead of after every record queued in front of the barrier (and even while its
//! sources are still blocked behind full channels). The task starts aligned; once
//! `timeout_ms` passed since the checkpoint reached it (zero: at once) it switches
//! ([`Step::Unaligned`]): it snapshots at that moment, forwards the barrier, and from
//! then on every record it reads from an input whose barrier it has not read yet is *in
//! flight*: it belongs before the barrier but is not in the snapshot, so the task
//! stores it with the checkpoint (and still processes it). As in Chandy and Lamport's
//! algorithm, any moment will do for the snapshot, provided the task records each input
//! from then until that input's barrier (the marker). Those inputs are read ahead
//! ([`BarrierAligner::drain`]) into a queue, so their barriers are found without
//! processing what is in front of them, and their senders, no longer held back, get to
//! their own barriers sooner. When the barrier was read on every input, the in-flight
//! data is complete ([`Step::Captured`]) and the task acknowledges. A restore replays
//! the stored records before new input: the restored state plus those records is
//! exactly the state aligned at the barrier. Inputs that already delivered the barrier
//! when the task switches hold nothing in flight. One capture at a time: a newer
//! checkpoint switches once the capture in front of it completed, and a capture whose
//! barrier is overtaken by a newer one on some input is abandoned (that checkpoint was
//! abandoned upstream).

use crate::ids::CheckpointId;

/// How a task with several inputs treats a barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Block an input at its barrier until every input delivered it (exactly-once).
    Aligned,
    /// Never block (see "At-least-once").
    AtLeastOnce,
    /// Align for `timeout_ms` after the checkpoint reached the task, then snapshot
    /// unaligned (see "Unaligned"); zero is always unaligned.
    Unaligned {
        /// Alignment timeout in milliseconds of the protocol clock.
        timeout_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    Open,
    /// Delivered the barrier being aligned; read only in at-least-once mode.
    Blocked,
    /// Unaligned snapshot taken, its barrier not read yet: what is read is in flight.
    Capturing,
    Ended,
}

/// What the task must do after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing.
    Wait,
    /// Snapshot now: every input delivered the barrier (or, at least once, it passed).
    Aligned(CheckpointId),
    /// Snapshot now, unaligned: store what [`BarrierAligner::is_capturing`] inputs
    /// deliver from now until their barrier, and forward the barrier at once.
    Unaligned(CheckpointId),
    /// Every input delivered the unaligned checkpoint's barrier: its in-flight data is
    /// complete.
    Captured(CheckpointId),
}

/// Alignment state of one task's inputs.
#[derive(Debug, Clone)]
pub struct BarrierAligner {
    inputs: Vec<Input>,
    aligning: Option<CheckpointId>,
    /// When the checkpoint being aligned reached the task (protocol clock, ms).
    since_ms: Option<u64>,
    /// The checkpoint being aligned must stay aligned (a final checkpoint, a stop or a
    /// savepoint: nothing may be left in flight).
    keep_aligned: bool,
    /// The unaligned checkpoint whose in-flight data is being stored.
    capturing: Option<CheckpointId>,
    last_snapshot: Option<CheckpointId>,
    mode: Mode,
}

/// What happened when an input ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndOutcome {
    /// What to do now.
    pub step: Step,
    /// Every input has ended: the task may end.
    pub all_ended: bool,
}

impl BarrierAligner {
    /// An aligner for `inputs` channels, all open.
    pub fn new(inputs: usize, mode: Mode) -> Self {
        BarrierAligner {
            inputs: vec![Input::Open; inputs],
            aligning: None,
            since_ms: None,
            keep_aligned: false,
            capturing: None,
            last_snapshot: None,
            mode,
        }
    }

    /// Whether input `i` may be read now.
    pub fn is_readable(&self, i: usize) -> bool {
        match self.inputs[i] {
            Input::Open | Input::Capturing => true,
            Input::Blocked => self.mode == Mode::AtLeastOnce,
            Input::Ended => false,
        }
    }

    /// Whether what input `i` delivers now is in flight for the unaligned checkpoint
    /// being captured (stored with it).
    pub fn is_capturing(&self, i: usize) -> bool {
        self.inputs[i] == Input::Capturing
    }

    /// Whether input `i` should be read ahead to its barrier (it is being captured).
    pub fn drain(&self, i: usize) -> bool {
        self.inputs[i] == Input::Capturing
    }

    /// The checkpoint being aligned, if any.
    pub fn aligning(&self) -> Option<CheckpointId> {
        self.aligning
    }

    /// The unaligned checkpoint whose in-flight data is being stored, if any.
    pub fn capturing(&self) -> Option<CheckpointId> {
        self.capturing
    }

    /// Start aligning `id` if it is new; false if it is stale (already snapshotted or
    /// older than the one being aligned). A newer id abandons the alignment in
    /// progress, not a capture: an input still being captured delivers the captured
    /// barrier before the newer one.
    fn begin(&mut self, id: CheckpointId, keep_aligned: bool, now_ms: u64) -> bool {
        if self.last_snapshot.is_some_and(|last| id <= last) {
            return false;
        }
        match self.aligning {
            Some(current) if id < current => return false,
            Some(current) if id == current => return true,
            _ => {}
        }
        // A newer checkpoint: the one being aligned was abandoned upstream, its barrier
        // will not come on the inputs still open.
        self.unblock_all();
        self.aligning = Some(id);
        self.since_ms = Some(now_ms);
        self.keep_aligned = keep_aligned;
        true
    }

    fn abandon_capture(&mut self) {
        if self.capturing.take().is_some() {
            for s in &mut self.inputs {
                if *s == Input::Capturing {
                    *s = Input::Open;
                }
            }
        }
    }

    /// Checkpoint `id` was announced (unaligned mode): triggered, or its barrier is in
    /// an input channel behind what is queued there. The task need not have read any
    /// of its barriers to snapshot: as in Chandy and Lamport's algorithm, any moment
    /// will do, provided that from then on it stores what each input delivers until
    /// that input's barrier. `keep_aligned`: the checkpoint must not go unaligned
    /// (final, stop, savepoint).
    pub fn on_announce(&mut self, id: CheckpointId, keep_aligned: bool, now_ms: u64) -> Step {
        if self.capturing == Some(id) || !self.begin(id, keep_aligned, now_ms) {
            return Step::Wait;
        }
        self.on_tick(now_ms)
    }

    /// Barrier `id` was read on input `i` (`keep_aligned` as for [`Self::on_announce`]).
    pub fn on_barrier(
        &mut self,
        i: usize,
        id: CheckpointId,
        keep_aligned: bool,
        now_ms: u64,
    ) -> Step {
        if self.capturing == Some(id) {
            if self.inputs[i] == Input::Capturing {
                self.inputs[i] = Input::Open;
            }
            return self.try_captured();
        }
        if self.inputs[i] == Input::Capturing {
            if self.capturing.is_some_and(|c| id < c) {
                // An older checkpoint's barrier still in front of the captured one (that
                // checkpoint was aborted): stale, the capture goes on.
                return Step::Wait;
            }
            // A newer barrier before the captured one: that checkpoint was abandoned
            // upstream and its in-flight data will never be complete.
            self.abandon_capture();
        }
        if !self.begin(id, keep_aligned, now_ms) {
            return Step::Wait;
        }
        if self.inputs[i] == Input::Open {
            self.inputs[i] = Input::Blocked;
        }
        match self.try_complete() {
            Step::Wait => self.on_tick(now_ms),
            step => step,
        }
    }

    /// Time passed, or a capture just completed (call it after [`Step::Captured`]): an
    /// alignment held back by that capture completes, and in unaligned mode the task
    /// switches once the alignment timeout is over.
    pub fn on_tick(&mut self, now_ms: u64) -> Step {
        if self.aligning.is_some() {
            if let step @ Step::Aligned(_) = self.try_complete() {
                return step;
            }
        }
        let Mode::Unaligned { timeout_ms } = self.mode else {
            return Step::Wait;
        };
        let (Some(id), Some(since)) = (self.aligning, self.since_ms) else {
            return Step::Wait;
        };
        if self.capturing.is_some() {
            // One capture at a time: the next switch waits for the barriers in front.
            return Step::Wait;
        }
        if self.keep_aligned || now_ms.saturating_sub(since) < timeout_ms {
            return Step::Wait;
        }
        // Inputs that delivered the barrier hold nothing in flight; the others do.
        let mut any = false;
        for s in &mut self.inputs {
            match s {
                Input::Blocked => *s = Input::Open,
                Input::Open => {
                    *s = Input::Capturing;
                    any = true;
                }
                Input::Capturing | Input::Ended => {}
            }
        }
        self.aligning = None;
        self.since_ms = None;
        self.last_snapshot = Some(id);
        if any {
            self.capturing = Some(id);
            Step::Unaligned(id)
        } else {
            Step::Aligned(id)
        }
    }

    /// Input `i` delivered end of stream.
    pub fn on_end(&mut self, i: usize) -> EndOutcome {
        let was_capturing = self.inputs[i] == Input::Capturing;
        self.inputs[i] = Input::Ended;
        let step = if was_capturing {
            self.try_captured()
        } else {
            Step::Wait
        };
        let step = match step {
            Step::Wait if self.aligning.is_some() => self.try_complete(),
            step => step,
        };
        EndOutcome {
            step,
            all_ended: self.inputs.iter().all(|s| *s == Input::Ended),
        }
    }

    fn try_complete(&mut self) -> Step {
        if self
            .inputs
            .iter()
            .any(|s| matches!(s, Input::Open | Input::Capturing))
        {
            return Step::Wait;
        }
        let Some(id) = self.aligning.take() else {
            return Step::Wait;
        };
        self.since_ms = None;
        self.last_snapshot = Some(id);
        self.unblock_all();
        Step::Aligned(id)
    }

    fn try_captured(&mut self) -> Step {
        match self.capturing {
            Some(id) if !self.inputs.contains(&Input::Capturing) => {
                self.capturing = None;
                Step::Captured(id)
            }
            _ => Step::Wait,
        }
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
    use std::collections::BTreeSet;

    fn c(n: u64) -> CheckpointId {
        CheckpointId(n)
    }

    const ALIGNED: Mode = Mode::Aligned;
    const UNALIGNED: Mode = Mode::Unaligned { timeout_ms: 0 };

    #[test]
    fn single_input_snapshots_at_once() {
        let mut a = BarrierAligner::new(1, ALIGNED);
        assert_eq!(a.on_barrier(0, c(1), false, 0), Step::Aligned(c(1)));
        assert!(a.is_readable(0));
    }

    #[test]
    fn blocks_until_all_inputs_delivered_in_any_order() {
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]] {
            let mut a = BarrierAligner::new(3, ALIGNED);
            for (k, &i) in order.iter().enumerate() {
                let r = a.on_barrier(i, c(7), false, 0);
                if k < 2 {
                    assert_eq!(r, Step::Wait, "order {order:?}");
                    assert!(!a.is_readable(i));
                } else {
                    assert_eq!(r, Step::Aligned(c(7)), "order {order:?}");
                }
            }
            assert!((0..3).all(|i| a.is_readable(i)));
        }
    }

    #[test]
    fn newer_barrier_supersedes_abandoned_alignment() {
        let mut a = BarrierAligner::new(2, ALIGNED);
        assert_eq!(a.on_barrier(0, c(1), false, 0), Step::Wait);
        // Checkpoint 1 never reaches input 1 (abandoned); 2 arrives on input 0.
        assert_eq!(a.on_barrier(0, c(2), false, 0), Step::Wait);
        assert!(!a.is_readable(0) && a.is_readable(1));
        // A late barrier 1 on input 1 is stale.
        assert_eq!(a.on_barrier(1, c(1), false, 0), Step::Wait);
        assert!(a.is_readable(1));
        assert_eq!(a.on_barrier(1, c(2), false, 0), Step::Aligned(c(2)));
    }

    #[test]
    fn stale_barrier_after_snapshot_is_ignored() {
        let mut a = BarrierAligner::new(2, ALIGNED);
        a.on_barrier(0, c(3), false, 0);
        assert_eq!(a.on_barrier(1, c(3), false, 0), Step::Aligned(c(3)));
        assert_eq!(a.on_barrier(0, c(3), false, 0), Step::Wait);
        assert!(a.is_readable(0));
        assert_eq!(a.aligning(), None);
    }

    #[test]
    fn end_of_input_during_alignment_completes_it() {
        let mut a = BarrierAligner::new(2, ALIGNED);
        assert_eq!(a.on_barrier(0, c(5), false, 0), Step::Wait);
        let out = a.on_end(1);
        assert_eq!(
            out,
            EndOutcome {
                step: Step::Aligned(c(5)),
                all_ended: false
            }
        );
        assert!(a.is_readable(0));
        let out = a.on_end(0);
        assert_eq!(
            out,
            EndOutcome {
                step: Step::Wait,
                all_ended: true
            }
        );
    }

    #[test]
    fn end_without_alignment_does_not_snapshot() {
        let mut a = BarrierAligner::new(2, ALIGNED);
        assert_eq!(a.on_end(0).step, Step::Wait);
        // With input 0 gone, a barrier on input 1 completes alignment alone.
        assert_eq!(a.on_barrier(1, c(1), false, 0), Step::Aligned(c(1)));
    }

    #[test]
    fn at_least_once_keeps_reading_but_snapshots_only_when_all_delivered() {
        let mut a = BarrierAligner::new(3, Mode::AtLeastOnce);
        assert_eq!(a.on_barrier(0, c(4), false, 0), Step::Wait);
        assert!(a.is_readable(0), "records after the barrier flow on");
        assert_eq!(a.on_barrier(2, c(4), false, 0), Step::Wait);
        assert!((0..3).all(|i| a.is_readable(i)));
        assert_eq!(a.on_barrier(1, c(4), false, 0), Step::Aligned(c(4)));
        assert_eq!(a.on_end(1).step, Step::Wait);
        assert!(!a.is_readable(1), "an ended input is never read");
    }

    #[test]
    fn an_announced_barrier_overtakes_what_is_queued() {
        let mut a = BarrierAligner::new(2, UNALIGNED);
        // Barrier 3 is behind a backlog on input 1: the announcement alone snapshots.
        assert_eq!(a.on_announce(c(3), false, 10), Step::Unaligned(c(3)));
        assert!(a.is_capturing(0) && a.is_capturing(1));
        assert!(
            a.drain(0) && a.drain(1),
            "both are read ahead to their barrier"
        );
        assert!(a.is_readable(0) && a.is_readable(1), "nothing blocks");
        assert_eq!(a.on_barrier(1, c(3), false, 11), Step::Wait);
        assert!(
            !a.is_capturing(1),
            "after its barrier input 1 is not in flight"
        );
        assert!(a.is_capturing(0));
        assert_eq!(a.on_announce(c(3), false, 12), Step::Wait);
        assert_eq!(a.on_barrier(0, c(3), false, 12), Step::Captured(c(3)));
        assert_eq!(a.capturing(), None);
        // Stale announcements and barriers of 3 change nothing.
        assert_eq!(a.on_announce(c(3), false, 13), Step::Wait);
        assert!(!a.drain(0) && !a.is_capturing(0));
    }

    #[test]
    fn the_timeout_switches_a_started_alignment_to_unaligned() {
        let mut a = BarrierAligner::new(3, Mode::Unaligned { timeout_ms: 100 });
        assert_eq!(a.on_barrier(0, c(1), false, 1_000), Step::Wait);
        assert!(!a.is_readable(0), "aligned first: input 0 waits");
        assert_eq!(a.on_announce(c(1), false, 1_010), Step::Wait);
        assert_eq!(a.on_tick(1_099), Step::Wait);
        assert_eq!(a.on_tick(1_100), Step::Unaligned(c(1)));
        // Input 0 delivered the barrier before the switch: nothing of it is in flight.
        assert!(a.is_readable(0) && !a.is_capturing(0));
        assert!(a.is_capturing(1) && a.is_capturing(2));
        assert_eq!(a.on_end(2).step, Step::Wait, "an end completes that input");
        assert_eq!(a.on_barrier(1, c(1), false, 1_200), Step::Captured(c(1)));
    }

    #[test]
    fn alignment_that_completes_before_the_timeout_stays_aligned() {
        let mut a = BarrierAligner::new(2, Mode::Unaligned { timeout_ms: 100 });
        assert_eq!(a.on_barrier(0, c(1), false, 0), Step::Wait);
        assert_eq!(a.on_barrier(1, c(1), false, 50), Step::Aligned(c(1)));
        assert_eq!(a.on_tick(500), Step::Wait);
        assert_eq!(a.capturing(), None);
    }

    #[test]
    fn a_newer_checkpoint_waits_for_the_capture_in_front_of_it() {
        let mut a = BarrierAligner::new(2, UNALIGNED);
        assert_eq!(a.on_announce(c(1), false, 0), Step::Unaligned(c(1)));
        assert_eq!(a.on_barrier(0, c(1), false, 0), Step::Wait);
        // Checkpoint 2 reaches input 0 while input 1 still holds 1's barrier.
        assert_eq!(a.on_barrier(0, c(2), false, 0), Step::Wait);
        assert!(!a.is_readable(0), "input 0 waits at 2 while 1 is captured");
        assert_eq!(a.on_tick(1_000), Step::Wait, "no second capture at once");
        assert_eq!(a.on_barrier(1, c(1), false, 0), Step::Captured(c(1)));
        assert_eq!(a.on_tick(1_000), Step::Unaligned(c(2)));
        assert!(!a.is_capturing(0) && a.is_capturing(1));
        assert_eq!(a.on_barrier(1, c(2), false, 0), Step::Captured(c(2)));
    }

    #[test]
    fn a_capture_whose_barrier_never_comes_is_abandoned() {
        let mut a = BarrierAligner::new(2, UNALIGNED);
        assert_eq!(a.on_announce(c(1), false, 0), Step::Unaligned(c(1)));
        // Input 1 delivers barrier 2 without 1: checkpoint 1 was abandoned upstream.
        assert_eq!(a.on_barrier(1, c(2), false, 0), Step::Unaligned(c(2)));
        assert_eq!(a.capturing(), Some(c(2)));
        assert!(a.is_capturing(0) && !a.is_capturing(1));
        assert_eq!(a.on_barrier(0, c(2), false, 0), Step::Captured(c(2)));
    }

    #[test]
    fn final_and_stop_checkpoints_stay_aligned() {
        let mut a = BarrierAligner::new(2, UNALIGNED);
        assert_eq!(a.on_announce(c(4), true, 0), Step::Wait);
        assert_eq!(a.on_barrier(0, c(4), true, 0), Step::Wait);
        assert_eq!(a.on_tick(1_000_000), Step::Wait, "never switches");
        assert!(!a.is_readable(0) && !a.is_capturing(1));
        assert_eq!(a.on_barrier(1, c(4), true, 5), Step::Aligned(c(4)));
        // The next one may go unaligned again.
        assert_eq!(a.on_announce(c(5), false, 6), Step::Unaligned(c(5)));
    }

    #[test]
    fn an_aborted_checkpoints_late_barrier_does_not_cancel_the_capture() {
        // Checkpoint 1 (a savepoint: kept aligned) is aligning when it is aborted; 2 is
        // announced and captured while 1's barrier is still queued on input 1.
        let mut a = BarrierAligner::new(2, UNALIGNED);
        assert_eq!(a.on_barrier(0, c(1), true, 0), Step::Wait);
        assert_eq!(a.on_announce(c(2), false, 5), Step::Unaligned(c(2)));
        assert_eq!(a.on_barrier(1, c(1), true, 6), Step::Wait);
        assert_eq!(a.capturing(), Some(c(2)), "the capture of 2 goes on");
        assert!(a.is_capturing(1));
        assert_eq!(a.on_barrier(1, c(2), false, 7), Step::Wait);
        assert_eq!(a.on_barrier(0, c(2), false, 8), Step::Captured(c(2)));
    }

    #[test]
    fn end_of_input_completes_a_capture() {
        let mut a = BarrierAligner::new(2, UNALIGNED);
        assert_eq!(a.on_barrier(0, c(9), false, 0), Step::Unaligned(c(9)));
        assert!(!a.is_capturing(0) && a.is_capturing(1));
        let out = a.on_end(1);
        assert_eq!(out.step, Step::Captured(c(9)));
        assert!(!out.all_ended);
    }

    /// One input's script: records (numbered per input) with increasing barrier ids
    /// among them, then maybe its end.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Item {
        Record(u32),
        Barrier(u64),
    }

    fn scripts() -> impl Strategy<Value = Vec<(Vec<Item>, bool)>> {
        proptest::collection::vec(
            (
                proptest::collection::btree_set(1u64..6, 0..4),
                proptest::collection::vec(0u32..4, 5),
                any::<bool>(),
            )
                .prop_map(|(ids, gaps, ends)| {
                    let mut items = Vec::new();
                    let mut n = 0;
                    for (k, id) in ids.into_iter().enumerate() {
                        for _ in 0..gaps[k] {
                            items.push(Item::Record(n));
                            n += 1;
                        }
                        items.push(Item::Barrier(id));
                    }
                    for _ in 0..gaps[4] {
                        items.push(Item::Record(n));
                        n += 1;
                    }
                    (items, ends)
                }),
            1..4,
        )
    }

    /// A checkpoint of the model: id, records in the snapshot and in flight per input,
    /// complete.
    type Snap = (u64, Vec<BTreeSet<u32>>, Vec<BTreeSet<u32>>, bool);

    fn modes() -> impl Strategy<Value = Mode> {
        prop_oneof![
            Just(Mode::Aligned),
            Just(Mode::AtLeastOnce),
            (0u64..30).prop_map(|timeout_ms| Mode::Unaligned { timeout_ms }),
        ]
    }

    /// What input `i` holds before barrier `id` in its script (all of it if `id` is not
    /// there: the input ended or idles first).
    fn before(items: &[Item], id: u64) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        for it in items {
            match *it {
                Item::Record(r) => {
                    out.insert(r);
                }
                Item::Barrier(b) if b >= id => break,
                Item::Barrier(_) => {}
            }
        }
        out
    }

    proptest! {
        /// Drive random interleavings of reads, announcements and time, honouring what
        /// the aligner says may be read, as the task does. For every checkpoint whose
        /// snapshot is complete (aligned, or unaligned with its in-flight data
        /// captured), per input: the records in the snapshot plus those stored in flight
        /// are exactly those before the barrier (at least those, at least once), and no
        /// record is both. Snapshots strictly increase.
        #[test]
        fn every_mode_snapshots_exactly_what_is_before_the_barrier(
            scripts in scripts(),
            mode in modes(),
            picks in proptest::collection::vec((any::<usize>(), 0u8..4), 0..300),
        ) {
            let n = scripts.len();
            let mut a = BarrierAligner::new(n, mode);
            let mut pos = vec![0usize; n];
            let mut announced = vec![0usize; n];
            let mut ended = vec![false; n];
            let mut processed: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); n];
            // The snapshot taken and what is stored in flight, per checkpoint.
            let mut snaps: Vec<Snap> = Vec::new();
            let mut now = 0u64;
            let mut last = 0u64;
            for (p, what) in picks {
                let mut steps = Vec::new();
                match what {
                    // Time passes.
                    0 => {
                        now += 7;
                        steps.push(a.on_tick(now));
                    }
                    // A sender announces the next barrier of an input it already sent.
                    1 => {
                        let i = p % n;
                        let items = &scripts[i].0;
                        let next = (announced[i]..items.len())
                            .find(|&k| matches!(items[k], Item::Barrier(_)));
                        if let Some(k) = next {
                            announced[i] = k + 1;
                            if let Item::Barrier(id) = items[k] {
                                if matches!(mode, Mode::Unaligned { .. }) {
                                    steps.push(a.on_announce(CheckpointId(id), false, now));
                                }
                            }
                        }
                    }
                    // A read.
                    _ => {
                        let readable: Vec<usize> =
                            (0..n).filter(|&i| !ended[i] && a.is_readable(i)).collect();
                        if readable.is_empty() {
                            break;
                        }
                        let i = readable[p % readable.len()];
                        let (items, ends) = &scripts[i];
                        if pos[i] < items.len() {
                            let item = items[pos[i]];
                            pos[i] += 1;
                            match item {
                                Item::Record(r) => {
                                    if a.is_capturing(i) {
                                        let cur = a.capturing().unwrap().0;
                                        let s = snaps.iter_mut().find(|s| s.0 == cur).unwrap();
                                        s.2[i].insert(r);
                                    }
                                    processed[i].insert(r);
                                }
                                Item::Barrier(id) => {
                                    steps.push(a.on_barrier(i, CheckpointId(id), false, now));
                                }
                            }
                        } else {
                            ended[i] = true;
                            if *ends {
                                steps.push(a.on_end(i).step);
                            }
                        }
                    }
                }
                while let Some(step) = steps.pop() {
                    match step {
                        Step::Wait => {}
                        Step::Aligned(id) | Step::Unaligned(id) => {
                            prop_assert!(id.0 > last, "snapshots must increase");
                            last = id.0;
                            let done = matches!(step, Step::Aligned(_));
                            snaps.push((id.0, processed.clone(), vec![BTreeSet::new(); n], done));
                        }
                        Step::Captured(id) => {
                            let s = snaps.iter_mut().find(|s| s.0 == id.0);
                            prop_assert!(s.is_some(), "captured {} never snapshotted", id.0);
                            s.unwrap().3 = true;
                            steps.push(a.on_tick(now));
                        }
                    }
                }
            }
            for (id, state, inflight, done) in &snaps {
                if !done {
                    continue;
                }
                for i in 0..n {
                    let want = before(&scripts[i].0, *id);
                    let got: BTreeSet<u32> = state[i].union(&inflight[i]).copied().collect();
                    prop_assert!(state[i].is_disjoint(&inflight[i]), "checkpoint {id} input {i}: a record both in state and in flight");
                    if mode == Mode::AtLeastOnce {
                        prop_assert!(got.is_superset(&want), "checkpoint {id} input {i}: lost {:?}", want.difference(&got).collect::<Vec<_>>());
                    } else {
                        prop_assert_eq!(&got, &want, "checkpoint {} input {}", id, i);
                    }
                }
            }
        }
    }
}
