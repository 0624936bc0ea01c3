//! The loop at the head of each task: a source reader or the task's input channels.

use super::inflight::{InFlight, KeyGroupFn};
use super::{
    Announce, BatchPool, Collector, Message, SnapshotFigures, SourceControl, TaskEnv, TaskEvent,
    TaskSnapshot,
};
use crate::aligner::{BarrierAligner, Mode, Step};
use crate::api::Data;
use crate::api::{Source, SourceContext, SourcePoll, SourceReader};
use crate::codec;
use crate::coordinator::TaskKey;
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, KeyGroup, OperatorId};
use crate::state::StateSnapshot;
use crate::time::{Timestamp, WatermarkStrategy};
use crossbeam_channel::{Receiver, RecvTimeoutError, Select, TryRecvError};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A task's main loop.
pub(crate) trait TaskHead {
    fn run(self: Box<Self>) -> Result<()>;
}

pub(crate) struct SplitReader<S: Source> {
    pub split: String,
    pub reader: S::Reader,
    pub done: bool,
    /// Highest timestamp read from the split (`MIN` before the first).
    pub max_ts: Timestamp,
    /// Last time the split produced records, on the job's clock's monotonic reading
    /// (a test's manual clock decides idleness).
    pub last_data: Timestamp,
}

/// A split's entry in the source's operator state: name, offset, finished, highest
/// timestamp read.
pub(crate) type SplitState<O> = (String, O, bool, Timestamp);

/// Event-time bookkeeping of one source subtask.
pub(crate) struct SourceWatermarks<T> {
    /// `None`: the readers know their splits' watermarks ([`SourceReader::watermark`]).
    pub strategy: Option<WatermarkStrategy<T>>,
    /// Records with negative timestamps, far-future timestamps, and watermark stalls.
    pub negative: crate::metrics::Counter,
    pub future: crate::metrics::Counter,
    pub stalls: crate::metrics::Counter,
    pub emitted: Timestamp,
    pub idle: bool,
    pub last_advance: Instant,
    pub records_since_advance: u64,
    pub warned_negative: bool,
    pub warned_future: bool,
}

pub(crate) struct SourceHead<S: Source> {
    pub key: TaskKey,
    pub parallelism: usize,
    /// Job-wide subtask, job-wide parallelism and key groups, for dealing out splits
    /// found while the job runs.
    pub global: (usize, usize, u16),
    pub operator: OperatorId,
    pub readers: Vec<SplitReader<S>>,
    pub out: Box<dyn Collector<S::Item>>,
    pub control: Receiver<SourceControl>,
    pub env: TaskEnv,
    pub watermarks: Option<SourceWatermarks<S::Item>>,
    /// Records read (counted per batch).
    pub records: crate::metrics::Counter,
    /// Records not read yet over the readers that know ([`SourceReader::backlog`]),
    /// sampled every buffer timeout and before one pushed batch in 16.
    pub backlog: crate::metrics::Gauge,
    /// Batches until the backlog is sampled before a push (0: at the next one).
    pub backlog_countdown: u32,
    /// Offsets of each reader recorded at barriers whose completion has not been
    /// announced yet, oldest first (at most [`MAX_UNANNOUNCED`]).
    pub unannounced: std::collections::VecDeque<(CheckpointId, Vec<S::Offset>)>,
    /// Finding splits that appear while the job runs, if the source does.
    pub discovery: Option<Discovery<S>>,
}

/// Splits that appear while a job runs ([`Source::discover_splits_every`]).
pub(crate) struct Discovery<S> {
    pub source: Arc<S>,
    pub ctx: SourceContext,
    pub every: Duration,
    pub last: Instant,
    /// Every split this run knows: listed when it started, or found since (whichever
    /// subtask reads it).
    pub known: HashSet<String>,
}

/// Where a split found while the job runs is dealt out: the same number in every
/// subtask, whenever each of them finds it. (Splits listed at the start of a run are
/// dealt out in list order instead, from the one list all subtasks share.)
pub(crate) fn discovered_split_hash(split: &str) -> usize {
    xxhash_rust::xxh3::xxh3_64(split.as_bytes()) as usize
}

/// The job-wide subtask of `total` that reads `split`: the owner of its key group if it
/// has one ([`Source::split_key_group`]); across instances, by
/// [`crate::ids::split_slot`], which every process computes alike whenever it lists;
/// in one process by `index` (its place in the listing, or [`discovered_split_hash`]
/// for a split found later).
pub(crate) fn split_owner(
    split: &str,
    key_group: Option<KeyGroup>,
    index: usize,
    (max, total, across_instances): (u16, usize, bool),
) -> usize {
    match key_group {
        Some(kg) => crate::ids::subtask_for_key_group(kg, max, total).0,
        None if across_instances => (crate::ids::split_slot(split) % total as u64) as usize,
        None => index % total,
    }
}

/// Checkpoints whose offsets a source keeps for completion notices; older ones are
/// dropped (a later notice subsumes them), so aborted checkpoints cannot pile up.
const MAX_UNANNOUNCED: usize = 8;

/// How long a source task waits after the final barrier for the final checkpoint's
/// completion notice (its commit included) before it ends without it.
const FINAL_NOTICE_WAIT: Duration = Duration::from_secs(30);

impl<S: Source> SourceHead<S> {
    fn barrier(&mut self, id: CheckpointId) -> Result<()> {
        let started = Instant::now();
        let mut list = Vec::with_capacity(self.readers.len());
        let mut offsets = Vec::with_capacity(self.readers.len());
        for r in &self.readers {
            let entry: SplitState<S::Offset> =
                (r.split.clone(), r.reader.offset(), r.done, r.max_ts);
            list.push(codec::encode(&entry, "source offset")?);
            offsets.push(entry.1);
        }
        if self.unannounced.len() == MAX_UNANNOUNCED {
            self.unannounced.pop_front();
        }
        self.unannounced.push_back((id, offsets));
        let mut snap = TaskSnapshot::default();
        snap.operators.push((
            self.operator.clone(),
            StateSnapshot {
                list,
                ..Default::default()
            },
        ));
        self.out.barrier(id, &mut snap)?;
        fail::fail_point!("checkpoint::after_barrier_injection");
        self.env.complete_snapshot(
            &self.key,
            self.parallelism,
            id,
            snap,
            SnapshotFigures {
                sync_pause: started.elapsed(),
                ..Default::default()
            },
        )
    }

    /// Returns true when the task must end (after the final barrier).
    fn handle(&mut self, msg: SourceControl) -> Result<bool> {
        match msg {
            SourceControl::Trigger { id, is_final } => {
                self.barrier(id)?;
                if is_final {
                    self.out.end()?;
                    self.await_final_completion(id)?;
                    return Ok(true);
                }
                Ok(false)
            }
            SourceControl::Completed { id } => {
                self.announce(id);
                Ok(false)
            }
            SourceControl::Stop { id } => {
                self.barrier(id)?;
                self.stay_stopped()?;
                Ok(true)
            }
            SourceControl::Fail => Err(Error::Operator {
                operator: self.operator.clone(),
                subtask: self.key.subtask,
                source: "injected failure".into(),
            }),
        }
    }

    /// After a stop barrier: read nothing more, inject the barrier again if the stop
    /// checkpoint is retried, and pass completion notices on, until the driver ends the
    /// job (by cancelling it, once the stop checkpoint is committed).
    fn stay_stopped(&mut self) -> Result<()> {
        loop {
            if self.env.cancelled() {
                return Err(Error::Cancelled);
            }
            match self.control.recv_timeout(Duration::from_millis(20)) {
                Ok(SourceControl::Stop { id }) | Ok(SourceControl::Trigger { id, .. }) => {
                    self.barrier(id)?
                }
                Ok(SourceControl::Completed { id }) => self.announce(id),
                // Stopped: an injected failure no longer lands mid-stream.
                Ok(SourceControl::Fail) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(Error::Cancelled),
            }
        }
    }

    /// Tell the readers that checkpoint `id` completed, with the offsets they had at
    /// its barrier; forget that and older checkpoints.
    fn announce(&mut self, id: CheckpointId) {
        while let Some((oldest, _)) = self.unannounced.front() {
            if *oldest > id {
                break;
            }
            let (oldest, offsets) = self.unannounced.pop_front().unwrap();
            if oldest == id {
                for (r, offset) in self.readers.iter_mut().zip(&offsets) {
                    r.reader.checkpoint_complete(offset);
                }
            }
        }
    }

    /// After the final barrier, stay until the final checkpoint is announced, so the
    /// readers hear of the offsets they ended at. Every other outcome of the final
    /// checkpoint fails the job, which cancels this wait; and as the notice is best
    /// effort, the task leaves without it after [`FINAL_NOTICE_WAIT`] in any case.
    fn await_final_completion(&mut self, id: CheckpointId) -> Result<()> {
        let deadline = Instant::now() + FINAL_NOTICE_WAIT;
        loop {
            if self.env.cancelled() {
                return Err(Error::Cancelled);
            }
            if Instant::now() >= deadline {
                tracing::warn!(source = %self.operator, checkpoint = %id,
                    "the final checkpoint was not announced in time; its completion notice is skipped");
                return Ok(());
            }
            match self.control.recv_timeout(Duration::from_millis(20)) {
                Ok(SourceControl::Completed { id: done }) => {
                    self.announce(done);
                    if done >= id {
                        return Ok(());
                    }
                }
                Ok(SourceControl::Trigger { .. } | SourceControl::Stop { .. })
                | Ok(SourceControl::Fail)
                | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    /// Note the timestamps of a batch just read from split `i`.
    fn observe(&mut self, i: usize, batch: &[S::Item]) {
        let Some(w) = &mut self.watermarks else {
            return;
        };
        let r = &mut self.readers[i];
        r.last_data = self.env.clock.monotonic_ms();
        let Some(strategy) = &w.strategy else {
            return;
        };
        let times = strategy.extract.scan(batch);
        w.records_since_advance += batch.len() as u64;
        w.negative.add(times.negative);
        if times.negative > 0 && !w.warned_negative {
            w.warned_negative = true;
            tracing::warn!(source = %self.operator, split = %r.split, count = times.negative,
                "records with negative timestamps (before 1970): check the timestamp extractor");
        }
        if let Some(max) = times.max {
            let limit = self
                .env
                .clock
                .now_ms()
                .saturating_add(strategy.max_future.as_millis() as i64);
            if max > limit {
                w.future.inc();
            }
            if max > limit && !w.warned_future {
                w.warned_future = true;
                tracing::warn!(source = %self.operator, split = %r.split, timestamp = max,
                    "record timestamp is far in the future; the watermark jumps with it and later records become late");
            }
            r.max_ts = r.max_ts.max(max);
        }
    }

    /// Emit the subtask's watermark, or `Idle`, if it changed.
    fn emit_watermark(&mut self) -> Result<()> {
        let Some(w) = &mut self.watermarks else {
            return Ok(());
        };
        let idle_timeout = w.strategy.as_ref().and_then(|s| s.idle_timeout);
        let now = self.env.clock.monotonic_ms();
        let mut min: Option<Timestamp> = None;
        let mut all_idle = true;
        for r in &self.readers {
            if r.done {
                continue;
            }
            if idle_timeout.is_some_and(|t| now.saturating_sub(r.last_data) >= t.as_millis() as i64)
            {
                continue;
            }
            let wm = match &w.strategy {
                // The reader knows; `None` is an idle split.
                None => match r.reader.watermark() {
                    Some(wm) => wm,
                    None => continue,
                },
                Some(_) if r.max_ts == Timestamp::MIN => Timestamp::MIN,
                Some(s) => r.max_ts.saturating_sub(s.bound_ms).saturating_sub(1),
            };
            all_idle = false;
            min = Some(min.map_or(wm, |m| m.min(wm)));
        }
        // A source that discovers splits is never done: more may come.
        let all_done = self.discovery.is_none() && self.readers.iter().all(|r| r.done);
        if all_done {
            min = Some(Timestamp::MAX);
            all_idle = false;
        }
        if all_idle && !w.idle {
            w.idle = true;
            return self.out.idle();
        }
        if let Some(wm) = min {
            if wm > w.emitted || (w.idle && wm >= w.emitted && wm > Timestamp::MIN) {
                w.idle = false;
                w.emitted = wm.max(w.emitted);
                w.last_advance = Instant::now();
                w.records_since_advance = 0;
                return self.out.watermark(w.emitted);
            }
            let stall_warning = w.strategy.as_ref().map(|s| s.stall_warning);
            if let Some(stall_warning) = stall_warning
                .filter(|&t| w.records_since_advance > 0 && w.last_advance.elapsed() >= t)
            {
                w.stalls.inc();
                tracing::warn!(source = %self.operator, watermark = w.emitted, records = w.records_since_advance,
                    "the watermark has not advanced for {:?} while records flowed: timestamps may not increase, or the out-of-orderness bound is too large",
                    stall_warning);
                w.last_advance = Instant::now();
            }
        }
        Ok(())
    }

    /// List the source's splits again if it is time, and open those this subtask reads
    /// that appeared since. A listing that fails is retried at the next round.
    fn discover(&mut self) -> Result<()> {
        let Some(d) = &mut self.discovery else {
            return Ok(());
        };
        if d.last.elapsed() < d.every {
            return Ok(());
        }
        d.last = Instant::now();
        let splits = match d.source.splits() {
            Ok(splits) => splits,
            Err(e) => {
                tracing::warn!(source = %self.operator, error = %e,
                    "listing the source's splits failed; trying again at the next round");
                return Ok(());
            }
        };
        for split in splits {
            let (global, total, max) = self.global;
            let hashed = discovered_split_hash(&split);
            let across = self.env.config.instance.count > 1;
            let key_group = d.source.split_key_group(&split);
            if !d.known.insert(split.clone())
                || split_owner(&split, key_group, hashed, (max, total, across)) != global
            {
                continue;
            }
            tracing::info!(source = %self.operator, split = %split, subtask = self.key.subtask.0,
                "reading a split that appeared while the job runs");
            let reader = d.source.open(&split, None, &d.ctx)?;
            self.readers.push(SplitReader {
                split,
                reader,
                done: false,
                max_ts: Timestamp::MIN,
                last_data: self.env.clock.monotonic_ms(),
            });
        }
        Ok(())
    }

    /// Set the backlog gauge from the readers that know theirs.
    fn sample_backlog(&mut self) {
        let mut known = None;
        for r in self.readers.iter().filter(|r| !r.done) {
            if let Some(b) = r.reader.backlog() {
                *known.get_or_insert(0) += b;
            }
        }
        if let Some(sum) = known {
            self.backlog.set(sum);
        }
    }

    /// Every buffer timeout: watermark, flush, processing-time tick, and (when due) a
    /// look for new splits.
    fn periodic(&mut self, last: &mut Instant) -> Result<()> {
        if last.elapsed() >= self.env.config.buffer_timeout {
            self.emit_watermark()?;
            self.out.flush()?;
            self.out.tick(self.env.clock.now_ms())?;
            self.discover()?;
            self.sample_backlog();
            *last = Instant::now();
        }
        Ok(())
    }
}

impl<S: Source> TaskHead for SourceHead<S> {
    fn run(mut self: Box<Self>) -> Result<()> {
        let batch_size = self.env.config.batch_size;
        let mut buf: Vec<S::Item> = Vec::with_capacity(batch_size);
        let mut cursor = 0usize;
        let mut reported = false;
        let mut last_periodic = Instant::now();
        let mut idle_in_row = 0usize;
        // A restored source re-asserts its event time before any record.
        self.emit_watermark()?;
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
            if active == 0 && self.discovery.is_some() {
                // Nothing to read until a split appears: idle, not finished.
                self.emit_watermark()?;
                self.out.flush()?;
                match self.control.recv_timeout(Duration::from_millis(50)) {
                    Ok(msg) => {
                        if self.handle(msg)? {
                            return Ok(());
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return Err(Error::Cancelled),
                }
                self.periodic(&mut last_periodic)?;
                continue;
            }
            if active == 0 {
                if !reported {
                    // All splits are done: event time is complete. A source with a
                    // strategy emits +inf itself; one without needs it said here.
                    if self.watermarks.is_some() {
                        self.emit_watermark()?;
                    } else {
                        self.out.watermark(Timestamp::MAX)?;
                    }
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
                    Err(RecvTimeoutError::Timeout) => self.out.tick(self.env.clock.now_ms())?,
                    Err(RecvTimeoutError::Disconnected) => return Err(Error::Cancelled),
                }
                continue;
            }
            cursor %= self.readers.len();
            while self.readers[cursor].done {
                cursor = (cursor + 1) % self.readers.len();
            }
            let i = cursor;
            match self.readers[i].reader.poll_batch(&mut buf, batch_size)? {
                SourcePoll::Ready => {
                    idle_in_row = 0;
                    self.records.add(buf.len() as u64);
                    self.observe(i, &buf);
                    // A push can block for long under backpressure, which is when the
                    // backlog matters: sample it before one batch in 16 as well.
                    if self.backlog_countdown == 0 {
                        self.sample_backlog();
                    }
                    self.backlog_countdown = self.backlog_countdown.wrapping_sub(1) & 15;
                    // Empty when a reader read only what is not records (a repartition
                    // topic's watermarks).
                    if !buf.is_empty() {
                        self.out.push(&mut buf)?;
                    }
                    self.emit_watermark()?;
                }
                SourcePoll::End => {
                    self.readers[i].done = true;
                    buf.clear();
                    self.emit_watermark()?;
                }
                SourcePoll::Idle => {
                    idle_in_row += 1;
                    if idle_in_row >= active {
                        idle_in_row = 0;
                        self.emit_watermark()?;
                        self.out.flush()?;
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
            self.periodic(&mut last_periodic)?;
        }
    }
}

pub(crate) struct InputHead<T> {
    pub key: TaskKey,
    pub parallelism: usize,
    pub receivers: Vec<Receiver<Message<T>>>,
    /// Where each receiver's processed batches go back to.
    pub pools: Vec<BatchPool<T>>,
    /// Per receiver: the key group of its records if its edge is keyed (for storing
    /// records in flight).
    pub routes: Vec<Option<KeyGroupFn<T>>>,
    /// Barrier announcements of the senders (unaligned checkpoints only).
    pub lane: Option<Receiver<Announce>>,
    /// Records in flight of the restored checkpoint, processed before any input.
    pub replay: Vec<Vec<T>>,
    pub op: Box<dyn Collector<T>>,
    pub env: TaskEnv,
    /// Records received, counted per batch (`<task>.records_in`).
    pub records_in: crate::metrics::Counter,
    /// Time spent in the operators on batches (`<task>.busy_ns`).
    pub busy_ns: crate::metrics::Counter,
    /// The most batches read ahead on one input (`<task>.read_ahead_peak_batches`).
    pub read_ahead_peak: crate::metrics::Counter,
    /// Batches queued on the inputs over their capacity, in thousandths, and the
    /// clock's time minus the task's event time: sampled every buffer timeout.
    pub fill: crate::metrics::Gauge,
    pub lag: crate::metrics::Gauge,
}

/// Event time over a task's inputs: the minimum over inputs that are not idle.
struct InputWatermarks {
    input: Vec<Timestamp>,
    idle: Vec<bool>,
    emitted: Timestamp,
    idle_emitted: bool,
}

impl InputWatermarks {
    fn new(n: usize) -> Self {
        InputWatermarks {
            input: vec![Timestamp::MIN; n],
            idle: vec![false; n],
            emitted: Timestamp::MIN,
            idle_emitted: false,
        }
    }

    /// What to send downstream after a change: a new watermark, `Idle`, or nothing.
    fn update(&mut self) -> Option<Option<Timestamp>> {
        let min = (0..self.input.len())
            .filter(|&i| !self.idle[i])
            .map(|i| self.input[i])
            .min();
        match min {
            None if !self.idle_emitted => {
                self.idle_emitted = true;
                Some(None)
            }
            None => None,
            Some(wm) if wm > self.emitted => {
                self.emitted = wm;
                self.idle_emitted = false;
                Some(Some(wm))
            }
            Some(_) => None,
        }
    }
}

/// An unaligned snapshot whose records in flight are still being read.
struct Capture {
    id: CheckpointId,
    snap: TaskSnapshot,
    figures: SnapshotFigures,
    records: InFlight,
}

/// The input side of a task: channels, what was read ahead of them, and alignment.
struct Inputs<T> {
    /// Per input: messages read ahead of processing (unaligned checkpoints), in order.
    ahead: Vec<VecDeque<Message<T>>>,
    ended: Vec<bool>,
    aligner: BarrierAligner,
    /// When the checkpoint being aligned reached the task.
    since: Option<Instant>,
    capture: Option<Capture>,
    /// The most batches `ahead` has held on one input.
    peak: usize,
}

impl<T: Data> InputHead<T> {
    fn now_ms(&self) -> u64 {
        self.env.clock.monotonic_ms().max(0) as u64
    }

    fn forward(&mut self, change: Option<Option<Timestamp>>) -> Result<()> {
        match change {
            Some(Some(wm)) => self.op.watermark(wm),
            Some(None) => self.op.idle(),
            None => Ok(()),
        }
    }

    /// Act on what the aligner decided, and on what follows from it.
    fn step(&mut self, inp: &mut Inputs<T>, mut step: Step) -> Result<()> {
        loop {
            match step {
                Step::Wait => break,
                Step::Aligned(id) => {
                    let started = Instant::now();
                    let alignment = inp.since.take().map_or(Duration::ZERO, |t| started - t);
                    let mut snap = TaskSnapshot::default();
                    self.op.barrier(id, &mut snap)?;
                    let figures = SnapshotFigures {
                        sync_pause: started.elapsed(),
                        alignment,
                        ..Default::default()
                    };
                    self.env
                        .complete_snapshot(&self.key, self.parallelism, id, snap, figures)?;
                    break;
                }
                Step::Unaligned(id) => {
                    let started = Instant::now();
                    let alignment = inp.since.take().map_or(Duration::ZERO, |t| started - t);
                    let mut snap = TaskSnapshot::default();
                    // Snapshot now and forward the barrier; what is read from here to
                    // each input's barrier is stored with the checkpoint.
                    self.op.barrier(id, &mut snap)?;
                    if !snap.commits.is_empty() {
                        let commits = std::mem::take(&mut snap.commits);
                        let _ = self.env.events.send(TaskEvent::Committables(commits));
                    }
                    if let Some(old) = inp.capture.take() {
                        tracing::debug!(task = %self.key.task, checkpoint = %old.id, "unaligned checkpoint abandoned");
                    }
                    let mut records = InFlight::new(self.key.subtask, inp.ahead.len());
                    // Records read ahead for an earlier checkpoint and not processed yet
                    // are not in this snapshot either: in flight for this one too.
                    for (i, ahead) in inp.ahead.iter().enumerate() {
                        if !inp.aligner.is_capturing(i) {
                            continue;
                        }
                        for msg in ahead {
                            match msg {
                                Message::Batch(b) => records.capture(
                                    i,
                                    b,
                                    self.routes[i].as_ref(),
                                    self.env.config.max_parallelism,
                                )?,
                                Message::Barrier(_) | Message::End => break,
                                Message::Watermark(_) | Message::Idle => {}
                            }
                        }
                    }
                    inp.capture = Some(Capture {
                        id,
                        snap,
                        figures: SnapshotFigures {
                            sync_pause: started.elapsed(),
                            alignment,
                            inflight_bytes: 0,
                            unaligned: true,
                        },
                        records,
                    });
                    break;
                }
                Step::Captured(id) => {
                    if let Some(c) = inp.capture.take_if(|c| c.id == id) {
                        let Capture {
                            id,
                            mut snap,
                            mut figures,
                            records,
                        } = c;
                        let (list, bytes) = records.into_entries();
                        figures.inflight_bytes = bytes;
                        if !list.is_empty() {
                            snap.operators.push((
                                super::inflight::operator_of(&self.key.task),
                                crate::state::StateSnapshot {
                                    list,
                                    ..Default::default()
                                },
                            ));
                        }
                        self.env.complete_snapshot(
                            &self.key,
                            self.parallelism,
                            id,
                            snap,
                            figures,
                        )?;
                    }
                    // An alignment held back by the capture may go on now.
                    step = inp.aligner.on_tick(self.now_ms());
                }
            }
        }
        // A capture the aligner gave up (its barrier will never come) is dropped: its
        // committables went to the coordinator already and carry into the next one.
        if inp
            .capture
            .as_ref()
            .is_some_and(|c| inp.aligner.capturing() != Some(c.id))
        {
            inp.capture = None;
        }
        Ok(())
    }

    /// A barrier read on input `i`.
    fn on_barrier(&mut self, inp: &mut Inputs<T>, i: usize, id: CheckpointId) -> Result<()> {
        if inp.aligner.aligning().is_none() && inp.aligner.capturing() != Some(id) {
            inp.since = Some(Instant::now());
        }
        let keep = self.env.aligned.contains(id);
        let step = inp.aligner.on_barrier(i, id, keep, self.now_ms());
        self.step(inp, step)
    }

    /// Store `batch` from input `i` with the unaligned checkpoint if it is in flight.
    fn capture(&mut self, inp: &mut Inputs<T>, i: usize, batch: &[T]) -> Result<()> {
        if inp.aligner.is_capturing(i) {
            if let Some(c) = &mut inp.capture {
                c.records.capture(
                    i,
                    batch,
                    self.routes[i].as_ref(),
                    self.env.config.max_parallelism,
                )?;
            }
        }
        Ok(())
    }

    /// A barrier announced on the lane.
    fn announced(&mut self, inp: &mut Inputs<T>, a: Announce) -> Result<()> {
        if inp.aligner.aligning().is_none() && inp.aligner.capturing() != Some(a.id) {
            inp.since = Some(Instant::now());
        }
        let keep = self.env.aligned.contains(a.id);
        let step = inp.aligner.on_announce(a.id, keep, self.now_ms());
        self.step(inp, step)
    }

    /// Read inputs being captured ahead to their barrier, storing what is in front of
    /// it, without processing it yet: the barrier is found at once, and the senders are
    /// not held back on their way to theirs. At most a channel's capacity of batches is
    /// held per input: past that, what was read ahead is processed first (memory stays
    /// bounded however much a sender emits before its barrier).
    /// Returns whether a barrier was taken (which can change what may be read: the
    /// select set must be rebuilt).
    fn read_ahead(&mut self, inp: &mut Inputs<T>, rx: &[Receiver<Message<T>>]) -> Result<bool> {
        let mut stepped = false;
        for (i, rx) in rx.iter().enumerate() {
            let cap = rx.capacity().unwrap_or(usize::MAX).max(1);
            while inp.aligner.drain(i)
                && inp.ahead[i].len() < cap
                && !matches!(
                    inp.ahead[i].back(),
                    Some(Message::Barrier(_) | Message::End)
                )
            {
                match rx.try_recv() {
                    Ok(msg) => stepped |= self.take_ahead(inp, i, msg)?,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Err(Error::Cancelled),
                }
            }
        }
        Ok(stepped)
    }

    /// `msg` was read ahead on input `i`; returns whether it was the captured barrier.
    fn take_ahead(&mut self, inp: &mut Inputs<T>, i: usize, msg: Message<T>) -> Result<bool> {
        match msg {
            Message::Barrier(id) if inp.aligner.capturing() == Some(id) => {
                // The captured barrier: input `i`'s records in flight are complete.
                // What was read ahead stays queued, to be processed in order.
                self.on_barrier(inp, i, id)?;
                Ok(true)
            }
            Message::Batch(b) => {
                self.capture(inp, i, &b)?;
                inp.ahead[i].push_back(Message::Batch(b));
                let held = inp.ahead[i].len();
                if held > inp.peak {
                    self.read_ahead_peak.add((held - inp.peak) as u64);
                    inp.peak = held;
                }
                Ok(false)
            }
            other => {
                inp.ahead[i].push_back(other);
                Ok(false)
            }
        }
    }
}

impl<T: Data> TaskHead for InputHead<T> {
    fn run(mut self: Box<Self>) -> Result<()> {
        let timeout = self.env.config.buffer_timeout;
        let receivers = std::mem::take(&mut self.receivers);
        let n = receivers.len();
        let mut inp = Inputs {
            ahead: (0..n).map(|_| VecDeque::new()).collect(),
            ended: vec![false; n],
            aligner: BarrierAligner::new(n, self.env.config.alignment),
            since: None,
            capture: None,
            peak: 0,
        };
        let lane = self.lane.take();
        let unaligned = matches!(self.env.config.alignment, Mode::Unaligned { .. });
        // Records in flight of the restored checkpoint come before any new input.
        for mut b in std::mem::take(&mut self.replay) {
            self.records_in.add(b.len() as u64);
            self.op.push(&mut b)?;
        }
        let mut wms = InputWatermarks::new(n);
        // The select set changes only when an input blocks, unblocks or ends.
        let mut dirty = true;
        let mut sel = Select::new();
        let mut index_of: Vec<usize> = Vec::new();
        let mut last_periodic = Instant::now();
        loop {
            if unaligned {
                if let Some(lane) = &lane {
                    while let Ok(a) = lane.try_recv() {
                        self.announced(&mut inp, a)?;
                        dirty = true;
                    }
                }
                if self.read_ahead(&mut inp, &receivers)? {
                    dirty = true;
                }
            }
            if dirty {
                sel = Select::new();
                index_of.clear();
                for (i, rx) in receivers.iter().enumerate() {
                    if !inp.ended[i] && inp.aligner.is_readable(i) {
                        sel.recv(rx);
                        index_of.push(i);
                    }
                }
                if unaligned {
                    if let Some(lane) = &lane {
                        sel.recv(lane);
                    }
                }
                dirty = false;
            }
            if last_periodic.elapsed() >= timeout {
                if self.env.cancelled() {
                    return Err(Error::Cancelled);
                }
                let (queued, capacity) = receivers.iter().fold((0, 0), |(q, c), rx| {
                    (q + rx.len(), c + rx.capacity().unwrap_or(0))
                });
                self.fill
                    .set((queued * 1000).checked_div(capacity).unwrap_or(0) as u64);
                if wms.emitted > Timestamp::MIN {
                    let now = self.env.clock.now_ms();
                    self.lag.set(now.saturating_sub(wms.emitted).max(0) as u64);
                }
                self.op.flush()?;
                self.op.tick(self.env.clock.now_ms())?;
                if unaligned {
                    let step = inp.aligner.on_tick(self.now_ms());
                    self.step(&mut inp, step)?;
                    dirty = true;
                }
                last_periodic = Instant::now();
            }
            // What was read ahead comes first, in order, as long as its input may be
            // read (an input blocked at a barrier waits, its queue with it).
            let queued = (0..n).find(|&i| !inp.ahead[i].is_empty() && inp.aligner.is_readable(i));
            let (i, msg) = if let Some(i) = queued {
                let msg = inp.ahead[i].pop_front().expect("not empty");
                (i, msg)
            } else {
                let oper = match sel.select_timeout(timeout) {
                    Ok(oper) => oper,
                    Err(_) => continue,
                };
                if oper.index() == index_of.len() {
                    // The lane (the last operation of the select).
                    if let Some(l) = &lane {
                        if let Ok(a) = oper.recv(l) {
                            self.announced(&mut inp, a)?;
                        }
                    }
                    dirty = true;
                    continue;
                }
                let i = index_of[oper.index()];
                match oper.recv(&receivers[i]) {
                    Ok(msg) => {
                        if inp.aligner.drain(i) {
                            // Whatever it was, the select set is rebuilt next round.
                            let _ = self.take_ahead(&mut inp, i, msg)?;
                            dirty = true;
                            continue;
                        }
                        if let Message::Batch(b) = &msg {
                            self.capture(&mut inp, i, b)?;
                        }
                        (i, msg)
                    }
                    Err(_) => return Err(Error::Cancelled),
                }
            };
            match msg {
                Message::Batch(mut b) => {
                    wms.idle[i] = false;
                    self.records_in.add(b.len() as u64);
                    let started = Instant::now();
                    self.op.push(&mut b)?;
                    self.pools[i].give(b);
                    self.busy_ns.add(started.elapsed().as_nanos() as u64);
                }
                Message::Watermark(wm) => {
                    wms.idle[i] = false;
                    wms.input[i] = wms.input[i].max(wm);
                    let change = wms.update();
                    self.forward(change)?;
                }
                Message::Idle => {
                    wms.idle[i] = true;
                    let change = wms.update();
                    self.forward(change)?;
                }
                Message::Barrier(id) => {
                    dirty = true;
                    self.on_barrier(&mut inp, i, id)?;
                }
                Message::End => {
                    dirty = true;
                    inp.ended[i] = true;
                    wms.idle[i] = false;
                    wms.input[i] = Timestamp::MAX;
                    let change = wms.update();
                    self.forward(change)?;
                    let out = inp.aligner.on_end(i);
                    self.step(&mut inp, out.step)?;
                    if out.all_ended {
                        self.op.end()?;
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InputWatermarks;

    #[test]
    fn input_watermark_is_the_minimum_over_active_inputs() {
        let mut w = InputWatermarks::new(2);
        w.input[0] = 10;
        assert_eq!(
            w.update(),
            None,
            "input 1 still at MIN holds event time back"
        );
        w.input[1] = 5;
        assert_eq!(w.update(), Some(Some(5)));
        w.idle[1] = true;
        assert_eq!(
            w.update(),
            Some(Some(10)),
            "an idle input stops holding back"
        );
        w.idle[0] = true;
        assert_eq!(w.update(), Some(None), "all idle: forward idleness once");
        assert_eq!(w.update(), None);
        w.idle[0] = false;
        w.input[0] = 8;
        assert_eq!(w.update(), None, "never moves backwards");
        w.input[0] = 12;
        assert_eq!(w.update(), Some(Some(12)));
    }
}
