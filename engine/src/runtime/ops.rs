//! Operators that run chained inside a task.

use super::{Collector, TaskSnapshot};
use crate::api::{Data, Key, SinkWriter, TwoPhaseCommitSink};
use crate::codec;
use crate::error::{Error, Result};
use crate::ids::{key_group_of_bytes, CheckpointId, KeyGroup, OperatorId, SubtaskIndex};
use crate::manifest::PendingCommit;
use crate::process::{KeyedContext, KeyedProcessFunction};
use crate::state::{MemoryKeyedState, StateSnapshot};
use crate::time::{Clock, TimeDomain, Timer, Timestamp};
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

pub(crate) struct MapOp<U, F> {
    pub f: F,
    pub buf: Vec<U>,
    pub next: Box<dyn Collector<U>>,
}

impl<T, U, F: FnMut(T) -> U> Collector<T> for MapOp<U, F> {
    fn push(&mut self, batch: &mut Vec<T>) -> Result<()> {
        self.buf.extend(batch.drain(..).map(&mut self.f));
        self.next.push(&mut self.buf)
    }
    forward_control!();
}

pub(crate) struct FilterOp<T, F> {
    pub f: F,
    pub next: Box<dyn Collector<T>>,
}

impl<T, F: FnMut(&T) -> bool> Collector<T> for FilterOp<T, F> {
    fn push(&mut self, batch: &mut Vec<T>) -> Result<()> {
        batch.retain(|x| (self.f)(x));
        self.next.push(batch)
    }
    forward_control!();
}

pub(crate) struct FlatMapOp<U, F> {
    pub f: F,
    pub buf: Vec<U>,
    pub next: Box<dyn Collector<U>>,
}

impl<T, U, I: IntoIterator<Item = U>, F: FnMut(T) -> I> Collector<T> for FlatMapOp<U, F> {
    fn push(&mut self, batch: &mut Vec<T>) -> Result<()> {
        for x in batch.drain(..) {
            self.buf.extend((self.f)(x));
        }
        self.next.push(&mut self.buf)
    }
    forward_control!();
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
    pub operator: OperatorId,
    pub subtask: SubtaskIndex,
    pub func: F,
    pub key_fn: KF,
    pub state: MemoryKeyedState,
    pub max_parallelism: u16,
    pub batch_size: usize,
    pub scratch: Vec<u8>,
    pub out: Vec<F::Out>,
    pub next: Box<dyn Collector<F::Out>>,
    pub watermark: Timestamp,
    pub clock: Arc<dyn Clock>,
    pub due: Vec<(KeyGroup, Timestamp, Vec<u8>)>,
    pub _p: PhantomData<fn(I) -> K>,
}

impl<K: Key, I, F: KeyedProcessFunction<K, I>, KF: Fn(&I) -> K> KeyedProcessOp<K, I, F, KF> {
    fn fail(&self, source: crate::api::BoxError) -> Error {
        Error::Operator {
            operator: self.operator.clone(),
            subtask: self.subtask,
            source,
        }
    }

    /// Fire every timer of `domain` due at `upto`, including timers that firing
    /// registers for times already due.
    fn fire_timers(&mut self, domain: TimeDomain, upto: Timestamp) -> Result<()> {
        loop {
            self.due.clear();
            self.state.drain_due_timers(domain, upto, &mut self.due);
            if self.due.is_empty() {
                return Ok(());
            }
            let due = std::mem::take(&mut self.due);
            for (kg, time, key_bytes) in &due {
                let key: K = codec::decode(key_bytes, "timer key")?;
                self.state.set_current_key(*kg, key_bytes);
                let mut ctx = KeyedContext {
                    key: &key,
                    state: &mut self.state,
                    out: &mut self.out,
                    watermark: self.watermark,
                    clock: &*self.clock,
                };
                let timer = Timer {
                    time: *time,
                    domain,
                };
                if let Err(e) = self.func.on_timer(timer, &mut ctx) {
                    return Err(self.fail(e));
                }
                if self.out.len() >= self.batch_size {
                    self.next.push(&mut self.out)?;
                }
            }
            self.due = due;
            if !self.out.is_empty() {
                self.next.push(&mut self.out)?;
            }
        }
    }
}

impl<K: Key, I, F: KeyedProcessFunction<K, I>, KF: Fn(&I) -> K> Collector<I>
    for KeyedProcessOp<K, I, F, KF>
{
    fn push(&mut self, batch: &mut Vec<I>) -> Result<()> {
        for record in batch.drain(..) {
            let key = (self.key_fn)(&record);
            self.scratch.clear();
            codec::encode_into(&key, &mut self.scratch, "key")?;
            let kg = key_group_of_bytes(&self.scratch, self.max_parallelism);
            self.state.set_current_key(kg, &self.scratch);
            let mut ctx = KeyedContext {
                key: &key,
                state: &mut self.state,
                out: &mut self.out,
                watermark: self.watermark,
                clock: &*self.clock,
            };
            if let Err(e) = self.func.process(record, &mut ctx) {
                return Err(self.fail(e));
            }
            if self.out.len() >= self.batch_size {
                self.next.push(&mut self.out)?;
            }
        }
        if !self.out.is_empty() {
            self.next.push(&mut self.out)?;
        }
        Ok(())
    }

    fn barrier(&mut self, id: CheckpointId, snap: &mut TaskSnapshot) -> Result<()> {
        snap.operators.push((
            self.operator.clone(),
            StateSnapshot {
                keyed: self.state.snapshot(),
                list: Vec::new(),
            },
        ));
        self.next.barrier(id, snap)
    }
    fn flush(&mut self) -> Result<()> {
        self.next.flush()
    }
    fn end(&mut self) -> Result<()> {
        self.next.end()
    }
    fn watermark(&mut self, wm: Timestamp) -> Result<()> {
        if wm > self.watermark {
            self.watermark = wm;
            self.fire_timers(TimeDomain::EventTime, wm)?;
        }
        self.next.watermark(wm)
    }
    fn idle(&mut self) -> Result<()> {
        self.next.idle()
    }
    fn tick(&mut self, now: Timestamp) -> Result<()> {
        self.fire_timers(TimeDomain::ProcessingTime, now)?;
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
        if let Some(c) = self.writer.pre_commit(id)? {
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
