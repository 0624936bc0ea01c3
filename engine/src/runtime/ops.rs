//! Operators that run chained inside a task.

use super::{Collector, TaskSnapshot};
use crate::api::{BoxError, Data, Key, SinkWriter, TwoPhaseCommitSink};
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, OperatorId, SubtaskIndex};
use crate::manifest::PendingCommit;
use crate::metrics::Metrics;
use crate::operator::{self, Operator, OperatorContext};
use crate::process::{KeyedCore, KeyedProcessFunction};
use crate::state::types::StateTypeMap;
use crate::state::StateSnapshot;
use crate::time::{Clock, TimeDomain, Timestamp};
use std::marker::PhantomData;
use std::sync::Arc;

macro_rules! forward_control {
    () => {
        fn barrier(&mut self, id: CheckpointId, snap: &mut TaskSnapshot) -> Result<()> {
            self.next.barrier(id, snap)
        }
        fn flush(&mut self) -> Result<()> {
            self.next.flush()
        }
        fn end(&mut self) -> Result<()> {
            self.next.end()
        }
        fn watermark(&mut self, wm: Timestamp) -> Result<()> {
            self.next.watermark(wm)
        }
        fn idle(&mut self) -> Result<()> {
            self.next.idle()
        }
        fn tick(&mut self, now: Timestamp) -> Result<()> {
            self.next.tick(now)
        }
    };
}

/// A user [`Operator`] in a task: builds its context around each call, passes what it
/// emits on after each call, and stores its state at barriers.
pub(crate) struct UserOp<I, O: Operator<I>> {
    op: O,
    operator: OperatorId,
    subtask: SubtaskIndex,
    parallelism: usize,
    /// The recorded state types, for a stateful operator.
    types: Option<StateTypeMap>,
    watermark: Timestamp,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    out: Vec<O::Out>,
    next: Box<dyn Collector<O::Out>>,
    _i: PhantomData<fn(I)>,
}

/// Where a [`UserOp`] runs, and what it restores.
pub(crate) struct UserOpEnv<'a> {
    pub operator: OperatorId,
    pub subtask: SubtaskIndex,
    pub parallelism: usize,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// The stored lists of every old instance of the operator.
    pub restored: Vec<&'a [Vec<u8>]>,
    pub restored_types: StateTypeMap,
}

impl<I, O: Operator<I>> UserOp<I, O> {
    /// Check the restored state against the operator's declaration, hand it this
    /// instance's entries and open it.
    pub fn open(mut op: O, env: UserOpEnv<'_>, next: Box<dyn Collector<O::Out>>) -> Result<Self> {
        let UserOpEnv {
            operator,
            subtask,
            parallelism,
            clock,
            metrics,
            restored,
            restored_types,
        } = env;
        let (types, entries) = if operator::has_state::<I, O>() {
            let declared = operator::describe::<O::State>(O::STATE_VERSION);
            if let Some(old) = restored_types.get(operator::STATE_NAME) {
                if *old != declared {
                    return Err(Error::config(format!(
                        "operator '{operator}': the checkpoint holds {old}, the operator now \
                         declares {declared}. Restoring would read the old entries as the new \
                         type; keep the old State type (and STATE_VERSION), or give the \
                         operator a new name, which starts its state empty (with \
                         allow_non_restored_state() to drop the old one)"
                    )));
                }
            }
            let mut types = restored_types;
            types.insert(operator::STATE_NAME.to_string(), declared);
            let entries = operator::restore_entries(&operator, &restored, subtask, parallelism)?;
            (Some(types), entries)
        } else {
            if restored.iter().any(|l| !l.is_empty()) {
                return Err(Error::config(format!(
                    "operator '{operator}' declares no state (its State type is zero-sized), \
                     but the checkpoint holds state of it: give the operator its old State \
                     type, or give it a new name and drop the old state on purpose with \
                     allow_non_restored_state()"
                )));
            }
            (None, Vec::new())
        };
        let mut out = Vec::new();
        let mut ctx = OperatorContext {
            out: &mut out,
            watermark: Timestamp::MIN,
            clock: &*clock,
            operator: &operator,
            subtask,
            parallelism,
            metrics: &metrics,
        };
        op.open(entries, &mut ctx)
            .map_err(|e| Error::from_user(&operator, subtask, e))?;
        Ok(UserOp {
            op,
            operator,
            subtask,
            parallelism,
            types,
            watermark: Timestamp::MIN,
            clock,
            metrics,
            out,
            next,
            _i: PhantomData,
        })
    }

    /// Pass on what the operator emitted (also what `open` left, before a barrier).
    fn drain(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.next.push(&mut self.out)?;
        }
        Ok(())
    }

    /// Call `f` with the operator and its context, then pass what it emitted on.
    #[inline]
    fn call(
        &mut self,
        f: impl FnOnce(&mut O, &mut OperatorContext<'_, O::Out>) -> std::result::Result<(), BoxError>,
    ) -> Result<()> {
        let mut ctx = OperatorContext {
            out: &mut self.out,
            watermark: self.watermark,
            clock: &*self.clock,
            operator: &self.operator,
            subtask: self.subtask,
            parallelism: self.parallelism,
            metrics: &self.metrics,
        };
        if let Err(e) = f(&mut self.op, &mut ctx) {
            return Err(Error::from_user(&self.operator, self.subtask, e));
        }
        self.drain()
    }
}

impl<I, O: Operator<I>> Collector<I> for UserOp<I, O> {
    #[inline]
    fn push(&mut self, batch: &mut Vec<I>) -> Result<()> {
        self.call(|op, ctx| op.process_batch(batch, ctx))
    }
    fn barrier(&mut self, id: CheckpointId, snap: &mut TaskSnapshot) -> Result<()> {
        // Records emitted before the barrier belong to this checkpoint.
        self.drain()?;
        if let Some(types) = &self.types {
            let entries = self
                .op
                .snapshot(id)
                .map_err(|e| Error::from_user(&self.operator, self.subtask, e))?;
            let list =
                operator::encode_entries(&self.operator, self.subtask, self.parallelism, &entries)?;
            snap.operators.push((
                self.operator.clone(),
                StateSnapshot {
                    list,
                    types: types.clone(),
                    ..Default::default()
                },
            ));
        }
        self.next.barrier(id, snap)
    }
    fn flush(&mut self) -> Result<()> {
        self.drain()?;
        self.next.flush()
    }
    fn end(&mut self) -> Result<()> {
        self.drain()?;
        self.next.end()
    }
    fn watermark(&mut self, wm: Timestamp) -> Result<()> {
        if wm > self.watermark {
            self.watermark = wm;
            self.call(|op, ctx| op.on_watermark(wm, ctx))?;
        }
        self.next.watermark(wm)
    }
    fn idle(&mut self) -> Result<()> {
        self.next.idle()
    }
    fn tick(&mut self, now: Timestamp) -> Result<()> {
        self.call(|op, ctx| op.on_processing_time(now, ctx))?;
        self.next.tick(now)
    }
}

/// Identity (the operator of a union node).
pub(crate) struct PassOp<T> {
    pub next: Box<dyn Collector<T>>,
}

impl<T> Collector<T> for PassOp<T> {
    fn push(&mut self, batch: &mut Vec<T>) -> Result<()> {
        self.next.push(batch)
    }
    forward_control!();
}

/// One stream consumed by several operators.
pub(crate) struct Fanout<T> {
    pub outs: Vec<Box<dyn Collector<T>>>,
    pub copy: Vec<T>,
}

impl<T: Data> Collector<T> for Fanout<T> {
    fn push(&mut self, batch: &mut Vec<T>) -> Result<()> {
        let (last, rest) = self.outs.split_last_mut().expect("fanout has outputs");
        for out in rest {
            self.copy.extend_from_slice(batch);
            out.push(&mut self.copy)?;
            self.copy.clear();
        }
        last.push(batch)
    }
    fn barrier(&mut self, id: CheckpointId, snap: &mut TaskSnapshot) -> Result<()> {
        self.outs.iter_mut().try_for_each(|o| o.barrier(id, snap))
    }
    fn flush(&mut self) -> Result<()> {
        self.outs.iter_mut().try_for_each(|o| o.flush())
    }
    fn end(&mut self) -> Result<()> {
        self.outs.iter_mut().try_for_each(|o| o.end())
    }
    fn watermark(&mut self, wm: Timestamp) -> Result<()> {
        self.outs.iter_mut().try_for_each(|o| o.watermark(wm))
    }
    fn idle(&mut self) -> Result<()> {
        self.outs.iter_mut().try_for_each(|o| o.idle())
    }
    fn tick(&mut self, now: Timestamp) -> Result<()> {
        self.outs.iter_mut().try_for_each(|o| o.tick(now))
    }
}

/// A stream nobody consumes.
pub(crate) struct Discard;

impl<T> Collector<T> for Discard {
    fn push(&mut self, batch: &mut Vec<T>) -> Result<()> {
        batch.clear();
        Ok(())
    }
    fn barrier(&mut self, _: CheckpointId, _: &mut TaskSnapshot) -> Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    fn end(&mut self) -> Result<()> {
        Ok(())
    }
    fn watermark(&mut self, _: Timestamp) -> Result<()> {
        Ok(())
    }
    fn idle(&mut self) -> Result<()> {
        Ok(())
    }
    fn tick(&mut self, _: Timestamp) -> Result<()> {
        Ok(())
    }
}

pub(crate) struct KeyedProcessOp<K, I, F: KeyedProcessFunction<K, I>, KF> {
    pub core: KeyedCore<K, I, F>,
    pub key_fn: KF,
    /// The keys of the batch being processed (kept to reuse its allocation).
    pub keys: Vec<K>,
    pub batch_size: usize,
    pub out: Vec<F::Out>,
    pub next: Box<dyn Collector<F::Out>>,
}

impl<K: Key, I, F: KeyedProcessFunction<K, I>, KF: Fn(&I) -> K> KeyedProcessOp<K, I, F, KF> {
    fn fire(&mut self, domain: TimeDomain, upto: Timestamp) -> Result<()> {
        let (next, batch_size) = (&mut self.next, self.batch_size);
        self.core.fire_timers(domain, upto, &mut self.out, |out| {
            if out.len() >= batch_size {
                next.push(out)?;
            }
            Ok(())
        })?;
        if !self.out.is_empty() {
            self.next.push(&mut self.out)?;
        }
        Ok(())
    }
}

impl<K: Key, I, F: KeyedProcessFunction<K, I>, KF: Fn(&I) -> K> Collector<I>
    for KeyedProcessOp<K, I, F, KF>
{
    fn push(&mut self, batch: &mut Vec<I>) -> Result<()> {
        // Keys first, so that the state backend sees the whole batch before it is
        // processed (see `KeyedState::begin_batch`): with large state, the wait for
        // memory or the database is most of the work.
        self.keys.clear();
        self.keys.extend(batch.iter().map(&self.key_fn));
        self.core.state.begin_batch(&self.keys)?;
        for (i, record) in batch.drain(..).enumerate() {
            self.core.state.next_record(i, &self.keys);
            self.core.process(&self.keys[i], record, &mut self.out)?;
            if self.out.len() >= self.batch_size {
                self.next.push(&mut self.out)?;
            }
        }
        self.keys.clear();
        if !self.out.is_empty() {
            self.next.push(&mut self.out)?;
        }
        Ok(())
    }

    fn barrier(&mut self, id: CheckpointId, snap: &mut TaskSnapshot) -> Result<()> {
        snap.operators
            .push((self.core.operator.clone(), self.core.state.snapshot(id)?));
        self.next.barrier(id, snap)
    }
    fn flush(&mut self) -> Result<()> {
        self.next.flush()
    }
    fn end(&mut self) -> Result<()> {
        self.next.end()
    }
    fn watermark(&mut self, wm: Timestamp) -> Result<()> {
        if wm > self.core.watermark {
            self.core.watermark = wm;
            self.fire(TimeDomain::EventTime, wm)?;
        }
        self.next.watermark(wm)
    }
    fn idle(&mut self) -> Result<()> {
        self.next.idle()
    }
    fn tick(&mut self, now: Timestamp) -> Result<()> {
        self.fire(TimeDomain::ProcessingTime, now)?;
        self.next.tick(now)
    }
}

pub(crate) struct SinkOp<S: TwoPhaseCommitSink> {
    pub sink: OperatorId,
    pub subtask: SubtaskIndex,
    pub writer: S::Writer,
}

impl<S: TwoPhaseCommitSink> Collector<S::Item> for SinkOp<S> {
    fn push(&mut self, batch: &mut Vec<S::Item>) -> Result<()> {
        self.writer.write(batch)
    }

    fn barrier(&mut self, id: CheckpointId, snap: &mut TaskSnapshot) -> Result<()> {
        let staged = self.writer.pre_commit(id)?;
        snap.sink_wait = snap.sink_wait.max(self.writer.last_pre_commit_wait());
        fail::fail_point!("sink::after_pre_commit");
        if let Some(c) = staged {
            let committable = serde_json::to_value(&c).map_err(|e| Error::Codec {
                what: format!("committable of sink '{}'", self.sink),
                message: e.to_string(),
            })?;
            snap.commits.push(PendingCommit {
                checkpoint: id,
                sink: self.sink.clone(),
                subtask: self.subtask,
                committable,
            });
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    fn end(&mut self) -> Result<()> {
        Ok(())
    }
    fn watermark(&mut self, wm: Timestamp) -> Result<()> {
        self.writer.watermark(wm)
    }
    fn idle(&mut self) -> Result<()> {
        self.writer.idle()
    }
    fn tick(&mut self, _: Timestamp) -> Result<()> {
        Ok(())
    }
}
