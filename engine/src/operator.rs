//! Non-keyed operators: user logic that runs in each parallel instance of a stream, with
//! operator state, the watermark and the job's clock (the shape of timely's `unary`, and
//! of Flink's `transform` with a checkpointed function). [`crate::dsl::Stream::transform`]
//! puts one into a pipeline; `map`, `filter` and `flat_map` are built on it.
//!
//! # Operator state
//!
//! An operator's state is a list of entries per parallel instance, of the type it names
//! as [`Operator::State`]. At each barrier [`Operator::snapshot`] returns the instance's
//! entries, stored with the checkpoint; after a restore [`Operator::open`] receives them:
//!
//! * at the parallelism the checkpoint was taken with, every instance gets back exactly
//!   the entries it returned;
//! * at another parallelism, the entries of all old instances are dealt out in turn (the
//!   first to instance 0, the next to instance 1, ...), so each entry goes to exactly one
//!   instance and the counts differ by at most one. Make entries the unit that may move:
//!   a partial count, a buffered record, a range of work.
//!
//! An operator whose `State` is a zero-sized type (`()`) has no state: nothing is stored
//! and it needs no name. Any other operator must be named (`.name("...")`) before the job
//! runs, so that a later version of the job finds its state, and the type it declares is
//! recorded (its name from `std::any::type_name`, with [`Operator::STATE_VERSION`]): a
//! restore into an operator that now declares another type is an error naming both. A
//! type that keeps its name while its fields change is the same type to this check:
//! raise `STATE_VERSION` with such a change, so the old entries are refused rather than
//! decoded as the new layout.
//!
//! ```
//! # use exactly_engine::prelude::*;
//! # use exactly_engine::testing::VecSource;
//! /// Counts the records each instance sees and emits the count when the input ends.
//! #[derive(Clone, Default)]
//! struct CountRecords {
//!     count: u64,
//! }
//!
//! impl Operator<String> for CountRecords {
//!     type Out = u64;
//!     type State = u64;
//!
//!     fn open(&mut self, restored: Vec<u64>, _ctx: &mut OperatorContext<'_, u64>) -> Result<(), BoxError> {
//!         // After a rescale an instance may get several old instances' counts, or none.
//!         self.count = restored.iter().sum();
//!         Ok(())
//!     }
//!     fn process(&mut self, _line: String, _ctx: &mut OperatorContext<'_, u64>) -> Result<(), BoxError> {
//!         self.count += 1;
//!         Ok(())
//!     }
//!     fn snapshot(&mut self, _checkpoint: CheckpointId) -> Result<Vec<u64>, BoxError> {
//!         Ok(vec![self.count])
//!     }
//!     fn on_watermark(&mut self, wm: Timestamp, ctx: &mut OperatorContext<'_, u64>) -> Result<(), BoxError> {
//!         if wm == Timestamp::MAX {
//!             ctx.emit(self.count); // the input ended
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
//! let counts = job
//!     .source("lines", VecSource::new(vec!["a".to_string(), "b".to_string()]))
//!     .transform(CountRecords::default())
//!     .name("count-lines");
//! ```

use crate::api::{BoxError, Data};
use crate::codec;
use crate::error::Result;
use crate::ids::{CheckpointId, OperatorId, SubtaskIndex};
use crate::metrics::{Counter, Metrics};
use crate::time::{Clock, Timestamp};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// User logic over the records of one parallel instance of a stream; see the module
/// docs. Each parallel instance runs its own clone of the value given to
/// [`crate::dsl::Stream::transform`].
pub trait Operator<I>: Clone + Send + Sync + 'static {
    /// Records emitted.
    type Out: Data;
    /// One entry of the operator's state (`()` for none).
    type State: Serialize + DeserializeOwned + Send + 'static;

    /// The version of [`Operator::State`]'s layout, recorded with its type name. Raise
    /// it when the type keeps its name but its fields change: a restore of entries
    /// written at another version is then refused instead of decoding old bytes as the
    /// new layout (operator state has no conversion function yet: restore under a new
    /// operator name, which starts empty, to change it).
    const STATE_VERSION: u32 = 1;

    /// Called once per parallel instance before any record, with the state entries this
    /// instance restores (none on a fresh start). The default accepts only an empty
    /// list: an operator that snapshots state must take it back here.
    fn open(
        &mut self,
        restored: Vec<Self::State>,
        _ctx: &mut OperatorContext<'_, Self::Out>,
    ) -> std::result::Result<(), BoxError> {
        if restored.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} state entries were restored, but the operator does not implement \
                 Operator::open to take them",
                restored.len()
            )
            .into())
        }
    }

    /// Handle one record.
    fn process(
        &mut self,
        record: I,
        ctx: &mut OperatorContext<'_, Self::Out>,
    ) -> std::result::Result<(), BoxError>;

    /// Handle a batch of records, leaving `batch` empty. The default calls
    /// [`Operator::process`] for each; override it to work on the batch as a whole
    /// ([`OperatorContext::emit_all`] passes a batch on without copying it).
    #[inline]
    fn process_batch(
        &mut self,
        batch: &mut Vec<I>,
        ctx: &mut OperatorContext<'_, Self::Out>,
    ) -> std::result::Result<(), BoxError> {
        for record in batch.drain(..) {
            self.process(record, ctx)?;
        }
        Ok(())
    }

    /// Event time reached `watermark`; records emitted here go downstream before it.
    /// When a bounded input is read to its end, the watermark reaches
    /// [`Timestamp::MAX`] before the final checkpoint: emit end-of-input results then.
    /// (A job stopped with a checkpoint does not push event time to the end.)
    fn on_watermark(
        &mut self,
        _watermark: Timestamp,
        _ctx: &mut OperatorContext<'_, Self::Out>,
    ) -> std::result::Result<(), BoxError> {
        Ok(())
    }

    /// The job's clock read `now` (called about every `tick_interval` while the job
    /// runs, for work on processing time).
    fn on_processing_time(
        &mut self,
        _now: Timestamp,
        _ctx: &mut OperatorContext<'_, Self::Out>,
    ) -> std::result::Result<(), BoxError> {
        Ok(())
    }

    /// The state entries to store with `checkpoint`, taken at its barrier: every record
    /// before the barrier is processed, none after it. The default stores none.
    fn snapshot(
        &mut self,
        _checkpoint: CheckpointId,
    ) -> std::result::Result<Vec<Self::State>, BoxError> {
        Ok(Vec::new())
    }
}

/// What an [`Operator`] sees: its output, the watermark, the job's clock and where it
/// runs.
pub struct OperatorContext<'a, O> {
    pub(crate) out: &'a mut Vec<O>,
    pub(crate) watermark: Timestamp,
    pub(crate) clock: &'a dyn Clock,
    pub(crate) operator: &'a OperatorId,
    pub(crate) subtask: SubtaskIndex,
    pub(crate) parallelism: usize,
    pub(crate) metrics: &'a Metrics,
}

impl<'a, O> OperatorContext<'a, O> {
    /// A context writing into `out`, for test harnesses that drive an operator directly.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        out: &'a mut Vec<O>,
        watermark: Timestamp,
        clock: &'a dyn Clock,
        operator: &'a OperatorId,
        subtask: SubtaskIndex,
        parallelism: usize,
        metrics: &'a Metrics,
    ) -> Self {
        OperatorContext {
            out,
            watermark,
            clock,
            operator,
            subtask,
            parallelism,
            metrics,
        }
    }

    /// Emit a record downstream.
    #[inline]
    pub fn emit(&mut self, record: O) {
        self.out.push(record);
    }

    /// Emit every record of `records`, leaving it empty (its buffer is exchanged for the
    /// output's when nothing else was emitted yet, so nothing is copied).
    #[inline]
    pub fn emit_all(&mut self, records: &mut Vec<O>) {
        if self.out.is_empty() {
            std::mem::swap(self.out, records);
        } else {
            self.out.append(records);
        }
    }

    /// The operator's current event time (watermark); `i64::MIN` before the first one.
    pub fn current_watermark(&self) -> Timestamp {
        self.watermark
    }

    /// The job clock's current time.
    pub fn current_processing_time(&self) -> Timestamp {
        self.clock.now_ms()
    }

    /// This parallel instance's index, from 0.
    pub fn subtask(&self) -> usize {
        self.subtask.0
    }

    /// How many parallel instances the operator has.
    pub fn parallelism(&self) -> usize {
        self.parallelism
    }

    /// The operator's name.
    pub fn operator(&self) -> &str {
        &self.operator.0
    }

    /// A counter of this operator, summed over its parallel instances (register it in
    /// [`Operator::open`], not per record).
    pub fn counter(&self, name: &str) -> Counter {
        self.metrics.counter(&self.operator.0, name)
    }
}

/// The name an operator's state is recorded under in checkpoints.
pub(crate) const STATE_NAME: &str = "state";

/// `map`: one record out per record in.
#[derive(Clone)]
pub(crate) struct Map<F>(pub F);

impl<I, O: Data, F: Fn(I) -> O + Clone + Send + Sync + 'static> Operator<I> for Map<F> {
    type Out = O;
    type State = ();

    fn process(
        &mut self,
        record: I,
        ctx: &mut OperatorContext<'_, O>,
    ) -> std::result::Result<(), BoxError> {
        ctx.emit((self.0)(record));
        Ok(())
    }

    #[inline]
    fn process_batch(
        &mut self,
        batch: &mut Vec<I>,
        ctx: &mut OperatorContext<'_, O>,
    ) -> std::result::Result<(), BoxError> {
        ctx.out.extend(batch.drain(..).map(&self.0));
        Ok(())
    }
}

/// `filter`: the records for which the predicate holds, passed on in their batch.
#[derive(Clone)]
pub(crate) struct Filter<F>(pub F);

impl<T: Data, F: Fn(&T) -> bool + Clone + Send + Sync + 'static> Operator<T> for Filter<F> {
    type Out = T;
    type State = ();

    fn process(
        &mut self,
        record: T,
        ctx: &mut OperatorContext<'_, T>,
    ) -> std::result::Result<(), BoxError> {
        if (self.0)(&record) {
            ctx.emit(record);
        }
        Ok(())
    }

    #[inline]
    fn process_batch(
        &mut self,
        batch: &mut Vec<T>,
        ctx: &mut OperatorContext<'_, T>,
    ) -> std::result::Result<(), BoxError> {
        batch.retain(&self.0);
        ctx.emit_all(batch);
        Ok(())
    }
}

/// `flat_map`: zero or more records out per record in.
#[derive(Clone)]
pub(crate) struct FlatMap<F>(pub F);

impl<I, O: Data, R: IntoIterator<Item = O>, F: Fn(I) -> R + Clone + Send + Sync + 'static>
    Operator<I> for FlatMap<F>
{
    type Out = O;
    type State = ();

    fn process(
        &mut self,
        record: I,
        ctx: &mut OperatorContext<'_, O>,
    ) -> std::result::Result<(), BoxError> {
        ctx.out.extend((self.0)(record));
        Ok(())
    }
}

/// Whether an operator's state type can hold anything (a zero-sized `State` is none).
pub(crate) fn has_state<I, O: Operator<I>>() -> bool {
    std::mem::size_of::<O::State>() != 0
}

/// How a state type is recorded in checkpoints (version 1 has no suffix).
pub(crate) fn describe<S>(version: u32) -> String {
    match version {
        0 | 1 => format!("OperatorState<{}>", std::any::type_name::<S>()),
        v => format!("OperatorState<{}> version {v}", std::any::type_name::<S>()),
    }
}

/// The first entry of an instance's stored list: who wrote the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Writer {
    subtask: u32,
    parallelism: u32,
}

/// An instance's entries as stored: the writer first, then each entry.
pub(crate) fn encode_entries<S: Serialize>(
    operator: &OperatorId,
    subtask: SubtaskIndex,
    parallelism: usize,
    entries: &[S],
) -> Result<Vec<Vec<u8>>> {
    let what = format!("operator state of '{operator}'");
    let writer = Writer {
        subtask: subtask.0 as u32,
        parallelism: parallelism as u32,
    };
    let mut list = Vec::with_capacity(entries.len() + 1);
    list.push(codec::encode(&writer, "operator state writer")?);
    for e in entries {
        list.push(codec::encode(e, &what)?);
    }
    Ok(list)
}

/// The entries instance `subtask` of `parallelism` restores from the stored lists of
/// every old instance (in any order): its own list when the parallelism is unchanged,
/// otherwise every old entry dealt out in turn, ordered by old instance and position.
pub(crate) fn restore_entries<S: DeserializeOwned>(
    operator: &OperatorId,
    lists: &[&[Vec<u8>]],
    subtask: SubtaskIndex,
    parallelism: usize,
) -> Result<Vec<S>> {
    let what = format!("operator state of '{operator}'");
    let mut written: Vec<(Writer, &[Vec<u8>])> = Vec::with_capacity(lists.len());
    for list in lists.iter().filter(|l| !l.is_empty()) {
        written.push((codec::decode(&list[0], &what)?, &list[1..]));
    }
    written.sort_by_key(|(w, _)| w.subtask);
    let same = written
        .iter()
        .all(|(w, _)| w.parallelism as usize == parallelism);
    let mine: Vec<&Vec<u8>> = if same {
        written
            .iter()
            .filter(|(w, _)| w.subtask as usize == subtask.0)
            .flat_map(|(_, entries)| entries.iter())
            .collect()
    } else {
        written
            .iter()
            .flat_map(|(_, entries)| entries.iter())
            .enumerate()
            .filter(|(i, _)| i % parallelism == subtask.0)
            .map(|(_, e)| e)
            .collect()
    };
    mine.into_iter()
        .map(|bytes| codec::decode(bytes, &what))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op() -> OperatorId {
        OperatorId("op".into())
    }

    fn stored(parallelism: usize, entries: &[Vec<u32>]) -> Vec<Vec<Vec<u8>>> {
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| encode_entries(&op(), SubtaskIndex(i), parallelism, e).unwrap())
            .collect()
    }

    fn restore(lists: &[Vec<Vec<u8>>], parallelism: usize) -> Vec<Vec<u32>> {
        let refs: Vec<&[Vec<u8>]> = lists.iter().rev().map(|l| l.as_slice()).collect();
        (0..parallelism)
            .map(|i| restore_entries(&op(), &refs, SubtaskIndex(i), parallelism).unwrap())
            .collect()
    }

    #[test]
    fn the_same_parallelism_gives_each_instance_its_own_entries() {
        let entries = vec![vec![1, 2, 3], vec![], vec![4]];
        assert_eq!(restore(&stored(3, &entries), 3), entries);
    }

    proptest! {
        /// At any other parallelism every entry goes to exactly one instance, in the
        /// old order, and the counts differ by at most one.
        #[test]
        fn rescaled_entries_are_dealt_out_once(
            entries in proptest::collection::vec(proptest::collection::vec(any::<u32>(), 0..20), 1..6),
            new in 1usize..8,
        ) {
            let old = entries.len();
            prop_assume!(old != new);
            let got = restore(&stored(old, &entries), new);
            let all: Vec<u32> = entries.concat();
            let mut dealt = vec![Vec::new(); new];
            for (i, e) in all.iter().enumerate() {
                dealt[i % new].push(*e);
            }
            prop_assert_eq!(&got, &dealt);
            let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
            prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
    }
}
