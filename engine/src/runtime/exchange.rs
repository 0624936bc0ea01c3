//! Senders of an edge that leaves a task: forward, round-robin and hash by key group.

use super::{send_blocking, Announce, BatchPool, Collector, Lanes, Message, TaskSnapshot};
use crate::api::{Data, Key};
use crate::codec;
use crate::error::Result;
use crate::ids::{subtask_for_key_group, CheckpointId, KeyGroup};
use crate::time::Timestamp;
use crossbeam_channel::Sender;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Picks the output channel of each record.
pub(crate) trait Partitioner<T> {
    fn channel(&mut self, record: &T, channels: usize) -> Result<usize>;
}

/// Round-robin (also used for forward edges with a single channel).
pub(crate) struct RoundRobin(pub usize);

impl<T> Partitioner<T> for RoundRobin {
    #[inline]
    fn channel(&mut self, _: &T, channels: usize) -> Result<usize> {
        self.0 = (self.0 + 1) % channels;
        Ok(self.0)
    }
}

/// Hash by key group: the channel is the subtask owning the record's key group.
pub(crate) struct ByKeyGroup<K, F> {
    key_fn: F,
    max_parallelism: u16,
    scratch: Vec<u8>,
    /// The channel of each key group, for `owners_of` channels (no division per record).
    owners: Vec<u32>,
    owners_of: usize,
    _k: std::marker::PhantomData<fn() -> K>,
}

impl<K, F> ByKeyGroup<K, F> {
    pub fn new(key_fn: F, max_parallelism: u16) -> Self {
        ByKeyGroup {
            key_fn,
            max_parallelism,
            scratch: Vec::new(),
            owners: Vec::new(),
            owners_of: 0,
            _k: std::marker::PhantomData,
        }
    }

    #[cold]
    fn set_channels(&mut self, channels: usize) {
        self.owners = (0..self.max_parallelism)
            .map(|g| subtask_for_key_group(KeyGroup(g), self.max_parallelism, channels).0 as u32)
            .collect();
        self.owners_of = channels;
    }
}

impl<T, K: Key, F: Fn(&T) -> K> Partitioner<T> for ByKeyGroup<K, F> {
    #[inline]
    fn channel(&mut self, record: &T, channels: usize) -> Result<usize> {
        if channels != self.owners_of {
            self.set_channels(channels);
        }
        let key = (self.key_fn)(record);
        let kg = codec::key_group_of(&key, &mut self.scratch, self.max_parallelism, "key")?;
        Ok(self.owners[kg.0 as usize] as usize)
    }
}

/// Buffers records per output channel and sends full batches.
pub(crate) struct ExchangeOut<T, P> {
    senders: Vec<Sender<Message<T>>>,
    buffers: Vec<Vec<T>>,
    /// Where fresh buffers come from (the receivers hand their batches back).
    pool: BatchPool<T>,
    partitioner: P,
    batch_size: usize,
    cancel: Arc<AtomicBool>,
    /// Where barriers are announced ahead of the records (unaligned checkpoints).
    lanes: Lanes,
}

impl<T: Data, P: Partitioner<T>> ExchangeOut<T, P> {
    pub fn new(
        senders: Vec<Sender<Message<T>>>,
        pool: BatchPool<T>,
        lanes: Lanes,
        partitioner: P,
        batch_size: usize,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        let buffers = senders.iter().map(|_| pool.take()).collect();
        ExchangeOut {
            senders,
            buffers,
            pool,
            partitioner,
            batch_size,
            cancel,
            lanes,
        }
    }

    fn send_buffer(&mut self, i: usize) -> Result<()> {
        if self.buffers[i].is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buffers[i], self.pool.take());
        send_blocking(&self.senders[i], Message::Batch(full), &self.cancel)
    }

    fn broadcast(&mut self, msg: impl Fn() -> Message<T>) -> Result<()> {
        for i in 0..self.senders.len() {
            self.send_buffer(i)?;
            send_blocking(&self.senders[i], msg(), &self.cancel)?;
        }
        Ok(())
    }
}

impl<T: Data, P: Partitioner<T>> Collector<T> for ExchangeOut<T, P> {
    fn push(&mut self, batch: &mut Vec<T>) -> Result<()> {
        let n = self.senders.len();
        let size = self.batch_size;
        if n == 1 {
            if batch.len() > size {
                // An operator that fans out (a flat_map, a window firing) hands over more
                // than a batch: it goes in batches, so a channel never holds more than
                // its capacity times the batch size, which bounds what an aligned
                // checkpoint waits for and an unaligned one stores.
                self.send_buffer(0)?;
                let mut records = batch.drain(..);
                while records.len() >= size {
                    let mut chunk = self.pool.take();
                    chunk.extend(records.by_ref().take(size));
                    send_blocking(&self.senders[0], Message::Batch(chunk), &self.cancel)?;
                }
                self.buffers[0].extend(records);
                return Ok(());
            }
            if self.buffers[0].len() + batch.len() > size {
                self.send_buffer(0)?;
            }
            // Forward edge: move the whole batch when the buffer is empty, and leave
            // the caller a recycled one to fill next.
            if self.buffers[0].is_empty() && batch.len() >= size / 2 {
                let b = std::mem::replace(batch, self.pool.take());
                return send_blocking(&self.senders[0], Message::Batch(b), &self.cancel);
            }
            self.buffers[0].append(batch);
            if self.buffers[0].len() >= size {
                self.send_buffer(0)?;
            }
            return Ok(());
        }
        for record in batch.drain(..) {
            let i = self.partitioner.channel(&record, n)?;
            self.buffers[i].push(record);
            if self.buffers[i].len() >= self.batch_size {
                let full = std::mem::replace(&mut self.buffers[i], self.pool.take());
                send_blocking(&self.senders[i], Message::Batch(full), &self.cancel)?;
            }
        }
        Ok(())
    }

    fn barrier(&mut self, id: CheckpointId, _snap: &mut TaskSnapshot) -> Result<()> {
        // Announce first: a receiver that goes unaligned reads its channel ahead to the
        // barrier, which makes room for the records and the barrier still to send.
        for lane in &self.lanes {
            // A receiver that is gone fails its attempt on its own.
            let _ = lane.send(Announce { id });
        }
        self.broadcast(|| Message::Barrier(id))
    }

    fn flush(&mut self) -> Result<()> {
        for i in 0..self.senders.len() {
            self.send_buffer(i)?;
        }
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        self.broadcast(|| Message::End)
    }

    fn watermark(&mut self, wm: Timestamp) -> Result<()> {
        // Records buffered before the watermark must reach the channel before it.
        self.broadcast(|| Message::Watermark(wm))
    }

    fn idle(&mut self) -> Result<()> {
        self.broadcast(|| Message::Idle)
    }

    fn tick(&mut self, _now: Timestamp) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{ExchangeOut, RoundRobin};
    use crate::runtime::{BatchPool, Collector, Message};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// What one receiver gets for `pushes` on a forward edge with batches of 16.
    fn forwarded(pushes: &[std::ops::Range<u32>]) -> Vec<Vec<u32>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut out = ExchangeOut::new(
            vec![tx],
            BatchPool::new(4, 16),
            Vec::new(),
            RoundRobin(0),
            16,
            Arc::new(AtomicBool::new(false)),
        );
        for r in pushes {
            out.push(&mut r.clone().collect()).unwrap();
        }
        out.flush().unwrap();
        drop(out);
        rx.iter()
            .map(|m| match m {
                Message::Batch(b) => b,
                _ => panic!("only batches were sent"),
            })
            .collect()
    }

    #[test]
    fn a_forward_edge_never_sends_more_than_a_batch_at_once() {
        // A fan-out of 100 records after 5 buffered ones, then small and half batches.
        let got = forwarded(&[0..5, 5..105, 105..108, 108..120, 120..130]);
        assert!(
            got.iter().all(|b| !b.is_empty() && b.len() <= 16),
            "batch sizes {:?}",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(
            got.concat(),
            (0..130).collect::<Vec<u32>>(),
            "in order, once"
        );
    }
}
