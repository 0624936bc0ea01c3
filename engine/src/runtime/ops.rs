//! Operators that run chained inside a task.

use super::{Collector, TaskSnapshot};
use crate::api::{Data, Key, SinkWriter, TwoPhaseCommitSink};
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, OperatorId, SubtaskIndex};
use crate::manifest::PendingCommit;
use crate::process::{KeyedCore, KeyedProcessFunction};
use crate::time::{TimeDomain, Timestamp};

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

/// How many records ahead of the one being processed a keyed operator prefetches state:
/// enough to cover a memory access while the records in between are processed.
const PREFETCH_AHEAD: usize = 8;

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
        // Keys first, so that each record's state is prefetched a few records before
        // it is needed: with large state, the wait for memory is most of the work.
        self.keys.clear();
        self.keys.extend(batch.iter().map(&self.key_fn));
        for key in self.keys.iter().take(PREFETCH_AHEAD) {
            self.core.state.prefetch(key);
        }
        for (i, record) in batch.drain(..).enumerate() {
            if let Some(ahead) = self.keys.get(i + PREFETCH_AHEAD) {
                self.core.state.prefetch(ahead);
            }
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
