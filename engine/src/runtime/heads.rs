//! The loop at the head of each task: a source reader or the task's input channels.

use super::{Collector, Message, SourceControl, TaskEnv, TaskEvent, TaskSnapshot};
use crate::aligner::BarrierAligner;
use crate::api::{Source, SourcePoll, SourceReader};
use crate::codec;
use crate::coordinator::TaskKey;
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, OperatorId};
use crate::state::StateSnapshot;
use crossbeam_channel::{Receiver, RecvTimeoutError, Select, TryRecvError};
use std::time::{Duration, Instant};

/// A task's main loop.
pub(crate) trait TaskHead {
    fn run(self: Box<Self>) -> Result<()>;
}

pub(crate) struct SplitReader<S: Source> {
    pub split: String,
    pub reader: S::Reader,
    pub done: bool,
}

pub(crate) struct SourceHead<S: Source> {
    pub key: TaskKey,
    pub parallelism: usize,
    pub operator: OperatorId,
    pub readers: Vec<SplitReader<S>>,
    pub out: Box<dyn Collector<S::Item>>,
    pub control: Receiver<SourceControl>,
    pub env: TaskEnv,
}

/// A split's entry in the source's operator state.
pub(crate) type SplitState<O> = (String, O, bool);

impl<S: Source> SourceHead<S> {
    fn barrier(&mut self, id: CheckpointId) -> Result<()> {
        let started = Instant::now();
        let mut list = Vec::with_capacity(self.readers.len());
        for r in &self.readers {
            let entry: SplitState<S::Offset> = (r.split.clone(), r.reader.offset(), r.done);
            list.push(codec::encode(&entry, "source offset")?);
        }
        let mut snap = TaskSnapshot::default();
        snap.operators.push((
            self.operator.clone(),
            StateSnapshot {
                keyed: Vec::new(),
                list,
            },
        ));
        self.out.barrier(id, &mut snap)?;
        self.env
            .complete_snapshot(&self.key, self.parallelism, id, snap, started)
    }

    /// Returns true when the task must end (after the final barrier).
    fn handle(&mut self, msg: SourceControl) -> Result<bool> {
        match msg {
            SourceControl::Trigger { id, is_final } => {
                self.barrier(id)?;
                if is_final {
                    self.out.end()?;
                    return Ok(true);
                }
                Ok(false)
            }
        }
    }
}

impl<S: Source> TaskHead for SourceHead<S> {
    fn run(mut self: Box<Self>) -> Result<()> {
        let batch_size = self.env.config.batch_size;
        let buffer_timeout = self.env.config.buffer_timeout;
        let mut buf: Vec<S::Item> = Vec::with_capacity(batch_size);
        let mut cursor = 0usize;
        let mut reported = false;
        let mut last_flush = Instant::now();
        let mut idle_in_row = 0usize;
        loop {
            loop {
                match self.control.try_recv() {
                    Ok(msg) => {
                        if self.handle(msg)? {
                            return Ok(());
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Err(Error::Cancelled),
                }
            }
            if self.env.cancelled() {
                return Err(Error::Cancelled);
            }
            let active = self.readers.iter().filter(|r| !r.done).count();
            if active == 0 {
                if !reported {
                    self.out.flush()?;
                    let _ = self
                        .env
                        .events
                        .send(TaskEvent::SourceFinished(self.key.clone()));
                    reported = true;
                }
                match self.control.recv_timeout(Duration::from_millis(100)) {
                    Ok(msg) => {
                        if self.handle(msg)? {
                            return Ok(());
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return Err(Error::Cancelled),
                }
                continue;
            }
            cursor %= self.readers.len();
            while self.readers[cursor].done {
                cursor = (cursor + 1) % self.readers.len();
            }
            let r = &mut self.readers[cursor];
            match r.reader.poll_batch(&mut buf, batch_size)? {
                SourcePoll::Ready => {
                    idle_in_row = 0;
                    self.out.push(&mut buf)?;
                }
                SourcePoll::End => {
                    r.done = true;
                    buf.clear();
                }
                SourcePoll::Idle => {
                    idle_in_row += 1;
                    if idle_in_row >= active {
                        idle_in_row = 0;
                        self.out.flush()?;
                        last_flush = Instant::now();
                        match self.control.recv_timeout(Duration::from_millis(2)) {
                            Ok(msg) => {
                                if self.handle(msg)? {
                                    return Ok(());
                                }
                            }
                            Err(RecvTimeoutError::Timeout) => {}
                            Err(RecvTimeoutError::Disconnected) => return Err(Error::Cancelled),
                        }
                    }
                }
            }
            cursor += 1;
            if last_flush.elapsed() >= buffer_timeout {
                self.out.flush()?;
                last_flush = Instant::now();
            }
        }
    }
}

pub(crate) struct InputHead<T> {
    pub key: TaskKey,
    pub parallelism: usize,
    pub receivers: Vec<Receiver<Message<T>>>,
    pub op: Box<dyn Collector<T>>,
    pub env: TaskEnv,
}

impl<T> InputHead<T> {
    fn snapshot(&mut self, id: CheckpointId) -> Result<()> {
        let started = Instant::now();
        let mut snap = TaskSnapshot::default();
        self.op.barrier(id, &mut snap)?;
        self.env
            .complete_snapshot(&self.key, self.parallelism, id, snap, started)
    }
}

impl<T: 'static> TaskHead for InputHead<T> {
    fn run(mut self: Box<Self>) -> Result<()> {
        let timeout = self.env.config.buffer_timeout;
        let receivers = std::mem::take(&mut self.receivers);
        let mut aligner = BarrierAligner::new(receivers.len());
        let mut ended = vec![false; receivers.len()];
        // The select set changes only when an input blocks, unblocks or ends.
        let mut dirty = true;
        let mut sel = Select::new();
        let mut index_of: Vec<usize> = Vec::new();
        loop {
            if dirty {
                sel = Select::new();
                index_of.clear();
                for (i, rx) in receivers.iter().enumerate() {
                    if !ended[i] && aligner.is_readable(i) {
                        sel.recv(rx);
                        index_of.push(i);
                    }
                }
                dirty = false;
            }
            let oper = match sel.select_timeout(timeout) {
                Ok(oper) => oper,
                Err(_) => {
                    if self.env.cancelled() {
                        return Err(Error::Cancelled);
                    }
                    self.op.flush()?;
                    continue;
                }
            };
            let i = index_of[oper.index()];
            match oper.recv(&receivers[i]) {
                Ok(Message::Batch(mut b)) => self.op.push(&mut b)?,
                Ok(Message::Barrier(id)) => {
                    dirty = true;
                    if let Some(id) = aligner.on_barrier(i, id) {
                        self.snapshot(id)?;
                    }
                }
                Ok(Message::End) => {
                    dirty = true;
                    ended[i] = true;
                    let out = aligner.on_end(i);
                    if let Some(id) = out.snapshot {
                        self.snapshot(id)?;
                    }
                    if out.all_ended {
                        self.op.end()?;
                        return Ok(());
                    }
                }
                Err(_) => return Err(Error::Cancelled),
            }
        }
    }
}
