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
        if n == 1 {
            // Forward edge: move the whole batch when the buffer is empty, and leave
            // the caller a recycled one to fill next.
            if self.buffers[0].is_empty() && batch.len() >= self.batch_size / 2 {
                let b = std::mem::replace(batch, self.pool.take());
                return send_blocking(&self.senders[0], Message::Batch(b), &self.cancel);
            }
            self.buffers[0].append(batch);
            if self.buffers[0].len() >= self.batch_size {
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
