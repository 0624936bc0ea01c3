//! A `key_by` across instances: when a job runs as several processes, the exchange in
//! front of every keyed operator becomes a topic with one partition per key group.
//!
//! The DSL adds two nodes in front of the keyed operator while the job is built: a sink
//! that encodes each record with its key group (`<operator>.repartition-out`, fed by
//! the stream being keyed) and a source reading the partitions of the key groups this
//! instance owns (`<operator>.repartition-in`, feeding the keyed operator one to one).
//! Their connectors come from the job's [`Repartitioner`] when the job runs, once the
//! operator has its final name (the topic is named after it): [`bind`]. Both are an
//! ordinary sink and source to the rest of the engine, so what they stage, commit and
//! read is checkpointed and recovered like any other's.
//!
//! Everything here is typed at the edges and erased in the middle: the repartitioner
//! knows bytes, the two nodes know the stream's type. The crossing costs an encoding
//! and an allocation per record on each side, next to which the network hop dominates.
//!
//! **Event time crosses too.** A payload's first byte says what it is: a record, or a
//! watermark. At each barrier, a writer whose event time changed since it last said so
//! writes its watermark (or that it is idle) into every partition, in the same
//! transaction as its records, so a watermark is visible exactly when the records
//! before it are. A reader keeps, per partition, the last watermark of every writer of
//! the deployment it belongs to (`instances × writing subtasks`, known when the job is
//! bound) and reports their minimum, idle writers left out; a partition is idle when
//! every writer is. Watermarks of another deployment (another layout, or a start from
//! another savepoint) are ignored:
//! everything that deployment wrote precedes, in each partition, what the current one
//! writes, and its watermarks promise nothing about the current writers' input (a new
//! version of the job may read a new source). The per-writer watermarks are part of
//! the reader's offset, so a restarted reader does not wait for every writer to speak
//! again. Cost: one watermark per partition per writer per checkpoint interval at
//! most, and a byte per record.

use super::{Graph, NodeId, SourceNode};
use crate::api::{
    Data, Key, RecoveryContext, RepartitionTopic, Repartitioner, Routed, SinkContext, SinkWriter,
    Source, SourceContext, SourcePoll, SourceReader, TwoPhaseCommitSink,
};
use crate::codec;
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, Instance, KeyGroup, OperatorId};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;
use std::sync::Arc;

/// A [`Repartitioner`] with its types erased, as the job keeps it.
pub(crate) trait DynRepartitioner: Send + Sync {
    fn sink(&self, topic: &RepartitionTopic) -> Result<Arc<dyn DynSink>>;
    fn source(&self, topic: &RepartitionTopic) -> Result<Arc<dyn DynSource>>;
}

impl<R: Repartitioner> DynRepartitioner for R {
    fn sink(&self, topic: &RepartitionTopic) -> Result<Arc<dyn DynSink>> {
        Ok(Arc::new(SinkBox(Repartitioner::sink(self, topic)?)))
    }
    fn source(&self, topic: &RepartitionTopic) -> Result<Arc<dyn DynSource>> {
        Ok(Arc::new(SourceBox(Repartitioner::source(self, topic)?)))
    }
}

type BoxWriter = Box<dyn SinkWriter<Item = Routed, Committable = serde_json::Value>>;
type BoxReader = Box<dyn SourceReader<Item = Vec<u8>, Offset = Vec<u8>>>;

/// The writing side, committables as JSON (as the manifest stores them anyway).
pub(crate) trait DynSink: Send + Sync {
    fn open_writer(&self, ctx: &SinkContext) -> Result<BoxWriter>;
    fn commit(&self, c: &serde_json::Value) -> Result<()>;
    fn recover(
        &self,
        ctx: &RecoveryContext,
        pending: Vec<serde_json::Value>,
    ) -> Result<Option<CheckpointId>>;
}

struct SinkBox<S>(S);

fn from_json<C: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<C> {
    serde_json::from_value(v).map_err(|e| Error::Codec {
        what: "committable of a repartition sink".into(),
        message: e.to_string(),
    })
}

impl<S: TwoPhaseCommitSink<Item = Routed>> DynSink for SinkBox<S> {
    fn open_writer(&self, ctx: &SinkContext) -> Result<BoxWriter> {
        Ok(Box::new(WriterBox(self.0.open_writer(ctx)?)))
    }
    fn commit(&self, c: &serde_json::Value) -> Result<()> {
        self.0.commit(&from_json(c.clone())?)
    }
    fn recover(
        &self,
        ctx: &RecoveryContext,
        pending: Vec<serde_json::Value>,
    ) -> Result<Option<CheckpointId>> {
        let typed = pending
            .into_iter()
            .map(from_json)
            .collect::<Result<Vec<S::Committable>>>()?;
        self.0.recover(ctx, typed)
    }
}

struct WriterBox<W>(W);

impl<W: SinkWriter<Item = Routed>> SinkWriter for WriterBox<W>
where
    W::Committable: serde::Serialize,
{
    type Item = Routed;
    type Committable = serde_json::Value;

    fn write(&mut self, batch: &mut Vec<Routed>) -> Result<()> {
        self.0.write(batch)
    }
    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<Option<serde_json::Value>> {
        match self.0.pre_commit(checkpoint)? {
            None => Ok(None),
            Some(c) => serde_json::to_value(c).map(Some).map_err(|e| Error::Codec {
                what: "committable of a repartition sink".into(),
                message: e.to_string(),
            }),
        }
    }
    fn last_pre_commit_wait(&self) -> std::time::Duration {
        self.0.last_pre_commit_wait()
    }
}

/// The reading side, offsets postcard-encoded.
pub(crate) trait DynSource: Send + Sync {
    fn splits(&self) -> Result<Vec<String>>;
    fn open(&self, split: &str, from: Option<Vec<u8>>, ctx: &SourceContext) -> Result<BoxReader>;
    fn split_key_group(&self, split: &str) -> Option<KeyGroup>;
    fn discover_splits_every(&self) -> Option<std::time::Duration>;
}

struct SourceBox<S>(S);

impl<S: Source<Item = Vec<u8>>> DynSource for SourceBox<S> {
    fn splits(&self) -> Result<Vec<String>> {
        self.0.splits()
    }
    fn open(&self, split: &str, from: Option<Vec<u8>>, ctx: &SourceContext) -> Result<BoxReader> {
        let from = match from {
            None => None,
            Some(bytes) => Some(codec::decode::<S::Offset>(&bytes, "repartition offset")?),
        };
        Ok(Box::new(ReaderBox(self.0.open(split, from, ctx)?)))
    }
    fn split_key_group(&self, split: &str) -> Option<KeyGroup> {
        self.0.split_key_group(split)
    }
    fn discover_splits_every(&self) -> Option<std::time::Duration> {
        self.0.discover_splits_every()
    }
}

struct ReaderBox<R>(R);

impl<R: SourceReader<Item = Vec<u8>>> SourceReader for ReaderBox<R>
where
    R::Offset: serde::Serialize + serde::de::DeserializeOwned,
{
    type Item = Vec<u8>;
    type Offset = Vec<u8>;

    fn poll_batch(&mut self, out: &mut Vec<Vec<u8>>, max: usize) -> Result<SourcePoll> {
        self.0.poll_batch(out, max)
    }
    /// Asked at barriers only.
    fn offset(&self) -> Vec<u8> {
        codec::encode(&self.0.offset(), "repartition offset").expect("offsets encode")
    }
    fn checkpoint_complete(&mut self, offset: &Vec<u8>) {
        if let Ok(o) = codec::decode::<R::Offset>(offset, "repartition offset") {
            self.0.checkpoint_complete(&o);
        }
    }
    fn backlog(&self) -> Option<u64> {
        self.0.backlog()
    }
}

/// The first byte of a payload in a repartition topic: a record follows.
const RECORD: u8 = 0;
/// The first byte of a payload in a repartition topic: a [`Marker`] follows.
const WATERMARK: u8 = 1;

/// Who writes a repartition topic: every subtask of the writing operator in every
/// instance, of one deployment. Watermarks are kept per writer of one layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Layout {
    pub instances: u32,
    /// Writing subtasks over all instances.
    pub writers: u32,
    /// The deployment: a hash of the savepoint it started from (0: none). A new
    /// version started from a savepoint with the same layout may read input whose
    /// event time lies behind the old version's watermarks (an added source): those
    /// watermarks, restored or still in the topic, must not count for it.
    pub deployment: u64,
}

/// What a writer says of its event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Mark {
    /// Its records from here on have timestamps from this one on (or are late).
    At(Timestamp),
    /// Its input is idle: leave it out until it speaks again.
    Idle,
}

/// A writer's watermark, as written into every partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    layout: Layout,
    writer: u32,
    mark: Mark,
}

/// The minimum over the writers' marks, idle ones left out: `MIN` while a writer has
/// not spoken, `None` when every writer is idle.
pub(crate) fn merge(marks: &[Option<Mark>]) -> Option<Timestamp> {
    let mut min: Option<Timestamp> = None;
    for m in marks {
        match m {
            None => return Some(Timestamp::MIN),
            Some(Mark::Idle) => {}
            Some(Mark::At(t)) => min = Some(min.map_or(*t, |m| m.min(*t))),
        }
    }
    min
}

/// The sink in front of the topic: each record with its key group, encoded.
pub(crate) struct EncodeSink<T, K, KF> {
    inner: Arc<dyn DynSink>,
    key_fn: KF,
    max_parallelism: u16,
    instance: Instance,
    /// Writing subtasks per instance, as the job was bound.
    per_instance: usize,
    /// See [`Layout::deployment`].
    deployment: u64,
    _t: PhantomData<fn(T) -> K>,
}

impl<T: Data, K: Key, KF: Fn(&T) -> K + Clone + Send + Sync + 'static> TwoPhaseCommitSink
    for EncodeSink<T, K, KF>
{
    type Item = T;
    type Committable = serde_json::Value;
    type Writer = EncodeWriter<T, K, KF>;

    fn open_writer(&self, ctx: &SinkContext) -> Result<Self::Writer> {
        if ctx.parallelism != self.per_instance {
            return Err(Error::config(format!(
                "internal: repartition sink '{}' runs {} subtasks, bound for {}",
                ctx.sink, ctx.parallelism, self.per_instance
            )));
        }
        let (writer, writers) = self.instance.global(ctx.subtask, ctx.parallelism);
        Ok(EncodeWriter {
            inner: self.inner.open_writer(ctx)?,
            key_fn: self.key_fn.clone(),
            max_parallelism: self.max_parallelism,
            key: Vec::new(),
            routed: Vec::new(),
            layout: Layout {
                instances: self.instance.count as u32,
                writers: writers as u32,
                deployment: self.deployment,
            },
            writer: writer.0 as u32,
            current: None,
            marked: None,
            _t: PhantomData,
        })
    }
    fn commit(&self, c: &serde_json::Value) -> Result<()> {
        self.inner.commit(c)
    }
    fn recover(
        &self,
        ctx: &RecoveryContext,
        pending: Vec<serde_json::Value>,
    ) -> Result<Option<CheckpointId>> {
        self.inner.recover(ctx, pending)
    }
}

pub(crate) struct EncodeWriter<T, K, KF> {
    inner: BoxWriter,
    key_fn: KF,
    max_parallelism: u16,
    /// Scratch for encoding keys.
    key: Vec<u8>,
    routed: Vec<Routed>,
    layout: Layout,
    writer: u32,
    /// Event time as it reached this writer (`None`: nothing yet).
    current: Option<Mark>,
    /// What this writer last wrote into the topic, in this run.
    marked: Option<Mark>,
    _t: PhantomData<fn(T) -> K>,
}

impl<T: Data, K: Key, KF: Fn(&T) -> K + 'static> SinkWriter for EncodeWriter<T, K, KF> {
    type Item = T;
    type Committable = serde_json::Value;

    fn write(&mut self, batch: &mut Vec<T>) -> Result<()> {
        for record in batch.drain(..) {
            let kg = codec::key_group_of(
                &(self.key_fn)(&record),
                &mut self.key,
                self.max_parallelism,
                "key",
            )?;
            let mut payload = Vec::with_capacity(32);
            payload.push(RECORD);
            codec::encode_into(&record, &mut payload, "repartitioned record")?;
            self.routed.push(Routed {
                key_group: kg.0,
                payload,
            });
        }
        self.inner.write(&mut self.routed)
    }
    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<Option<serde_json::Value>> {
        // Event time changed since this writer last said: say it in every partition,
        // after the records it covers and in their transaction.
        if let Some(mark) = self.current.filter(|m| Some(*m) != self.marked) {
            let mut payload = vec![WATERMARK];
            let marker = Marker {
                layout: self.layout,
                writer: self.writer,
                mark,
            };
            codec::encode_into(&marker, &mut payload, "repartition watermark")?;
            self.routed
                .extend((0..self.max_parallelism).map(|kg| Routed {
                    key_group: kg,
                    payload: payload.clone(),
                }));
            self.inner.write(&mut self.routed)?;
            self.marked = Some(mark);
        }
        self.inner.pre_commit(checkpoint)
    }
    fn last_pre_commit_wait(&self) -> std::time::Duration {
        self.inner.last_pre_commit_wait()
    }
    fn watermark(&mut self, wm: Timestamp) -> Result<()> {
        self.current = Some(Mark::At(wm));
        Ok(())
    }
    fn idle(&mut self) -> Result<()> {
        self.current = Some(Mark::Idle);
        Ok(())
    }
}

/// The source behind the topic: records decoded back into the stream's type.
pub(crate) struct DecodeSource<T> {
    inner: Arc<dyn DynSource>,
    /// The deployment whose writers' watermarks count.
    layout: Layout,
    _t: PhantomData<fn() -> T>,
}

/// Where a reader of a repartition topic is: the topic's own offset, and the last
/// watermark of every writer of `layout` read so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RepartitionOffset {
    inner: Vec<u8>,
    layout: Layout,
    marks: Vec<Option<Mark>>,
}

impl<T: Data> Source for DecodeSource<T> {
    type Item = T;
    type Offset = RepartitionOffset;
    type Reader = DecodeReader<T>;

    fn splits(&self) -> Result<Vec<String>> {
        self.inner.splits()
    }
    fn open(
        &self,
        split: &str,
        from: Option<RepartitionOffset>,
        ctx: &SourceContext,
    ) -> Result<Self::Reader> {
        let (inner, marks) = match from {
            None => (None, None),
            // Another deployment's watermarks promise nothing about this one's writers.
            Some(o) if o.layout == self.layout && o.marks.len() == self.layout.writers as usize => {
                (Some(o.inner), Some(o.marks))
            }
            Some(o) => (Some(o.inner), None),
        };
        let marks = marks.unwrap_or_else(|| vec![None; self.layout.writers as usize]);
        Ok(DecodeReader {
            inner: self.inner.open(split, inner, ctx)?,
            split: split.to_string(),
            buf: Vec::new(),
            layout: self.layout,
            watermark: merge(&marks),
            marks,
            _t: PhantomData,
        })
    }
    fn discover_splits_every(&self) -> Option<std::time::Duration> {
        self.inner.discover_splits_every()
    }
    fn split_key_group(&self, split: &str) -> Option<KeyGroup> {
        self.inner.split_key_group(split)
    }
    fn watermarks_from_readers(&self) -> bool {
        true
    }
}

pub(crate) struct DecodeReader<T> {
    inner: BoxReader,
    split: String,
    buf: Vec<Vec<u8>>,
    layout: Layout,
    marks: Vec<Option<Mark>>,
    /// [`merge`] of `marks`, kept current.
    watermark: Option<Timestamp>,
    _t: PhantomData<fn() -> T>,
}

/// A payload of `split` that does not decode.
fn foreign<T>(split: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::config(format!(
        "{what} of repartition split '{split}' does not decode as {} ({e}): the instances \
         run different versions of the job",
        std::any::type_name::<T>()
    ))
}

impl<T: Data> SourceReader for DecodeReader<T> {
    type Item = T;
    type Offset = RepartitionOffset;

    fn poll_batch(&mut self, out: &mut Vec<T>, max: usize) -> Result<SourcePoll> {
        self.buf.clear();
        let polled = self.inner.poll_batch(&mut self.buf, max)?;
        let mut marked = false;
        for payload in self.buf.drain(..) {
            match payload.split_first() {
                Some((&RECORD, record)) => out.push(
                    codec::decode(record, "repartitioned record")
                        .map_err(|e| foreign::<T>(&self.split, "a record", e))?,
                ),
                Some((&WATERMARK, marker)) => {
                    let m: Marker = codec::decode(marker, "repartition watermark")
                        .map_err(|e| foreign::<T>(&self.split, "a watermark", e))?;
                    if m.layout == self.layout && m.writer < self.layout.writers {
                        self.marks[m.writer as usize] = Some(m.mark);
                        marked = true;
                    }
                }
                _ => {
                    return Err(foreign::<T>(
                        &self.split,
                        "a payload",
                        "neither a record nor a watermark",
                    ))
                }
            }
        }
        if marked {
            self.watermark = merge(&self.marks);
        }
        Ok(polled)
    }
    fn offset(&self) -> RepartitionOffset {
        RepartitionOffset {
            inner: self.inner.offset(),
            layout: self.layout,
            marks: self.marks.clone(),
        }
    }
    fn checkpoint_complete(&mut self, offset: &RepartitionOffset) {
        self.inner.checkpoint_complete(&offset.inner)
    }
    fn backlog(&self) -> Option<u64> {
        self.inner.backlog()
    }
    fn watermark(&self) -> Option<Timestamp> {
        self.watermark
    }
}

/// Fills a repartition's two nodes with their connectors.
pub(crate) type BindFn = Arc<
    dyn Fn(&mut Graph, &PendingRepartition, &Binding, &dyn DynRepartitioner) -> Result<()>
        + Send
        + Sync,
>;

/// What a repartition is bound to when the job runs.
pub(crate) struct Binding {
    pub topic: RepartitionTopic,
    pub instance: Instance,
    /// Subtasks of the writing side per instance.
    pub writers_per_instance: usize,
    /// See [`Layout::deployment`].
    pub deployment: u64,
}

/// The two nodes a `key_by` across instances added, waiting for the keyed operator's
/// final name.
#[derive(Clone)]
pub(crate) struct PendingRepartition {
    /// The sink writing into the topic.
    pub out: NodeId,
    /// The source reading it, feeding `keyed`.
    pub input: NodeId,
    pub keyed: NodeId,
    pub bind: BindFn,
    /// The topic it was bound to, if it was.
    pub bound: Option<String>,
}

/// What [`PendingRepartition::bind`] does for a stream of `T` keyed by `KF`.
pub(crate) fn binder<T: Data, K: Key, KF: Fn(&T) -> K + Clone + Send + Sync + 'static>(
    key_fn: KF,
) -> BindFn {
    Arc::new(move |g, p, b, rep| {
        let sink = EncodeSink {
            inner: rep.sink(&b.topic)?,
            key_fn: key_fn.clone(),
            max_parallelism: b.topic.key_groups,
            instance: b.instance,
            per_instance: b.writers_per_instance,
            deployment: b.deployment,
            _t: PhantomData,
        };
        super::set_sink(g, p.out, sink);
        let source = DecodeSource::<T> {
            inner: rep.source(&b.topic)?,
            layout: Layout {
                instances: b.instance.count as u32,
                writers: (b.instance.count * b.writers_per_instance) as u32,
                deployment: b.deployment,
            },
            _t: PhantomData,
        };
        g.nodes[p.input].source = Some(Arc::new(SourceNode {
            source: Arc::new(source),
        }));
        Ok(())
    })
}

/// Name and connect every repartition of the job, once its operators have their final
/// names: `<operator>.repartition-out` and `-in`, topic `<job>-<operator>-repartition`.
/// Binding again to the same names does nothing.
pub(crate) fn bind(
    g: &mut Graph,
    job: &str,
    (max_parallelism, parallelism): (u16, usize),
    instance: Instance,
    from_savepoint: Option<&str>,
) -> Result<()> {
    if instance.count <= 1 {
        return Ok(());
    }
    let Some(rep) = g.repartitioner.clone() else {
        if let Some(e) = g
            .edges
            .iter()
            .find(|e| e.partition == super::Partition::Hash)
        {
            return Err(Error::config(format!(
                "the job runs as {} instances and keys records by key_by in front of '{}', \
                but has no way to send records to the instance that owns their key: \
                configure JobBuilder::repartition_through (Kafka: KafkaRepartition)",
                instance.count, g.nodes[e.to].op
            )));
        }
        return Ok(());
    };
    for i in 0..g.repartitions.len() {
        let p = g.repartitions[i].clone();
        let keyed = g.nodes[p.keyed].op.clone();
        if g.nodes[p.keyed].unnamed_state {
            return Err(Error::config(format!(
                "keyed operator '{keyed}' has no name: across instances its records travel \
                 through a topic named after it, and its state is stored under it. Name it \
                 with .name(\"...\") after .process(...)"
            )));
        }
        if let Some(old) = &g.nodes[p.keyed].restores {
            return Err(Error::config(format!(
                "keyed operator '{keyed}' restores the state of '{old}': across instances \
                 its repartition topic is named after it, and records the old topic holds \
                 but no instance read yet would be left behind. Renaming a keyed operator \
                 of a job that runs as several instances is not supported yet: keep its \
                 name, or rename it while the job runs as one instance"
            )));
        }
        let topic = RepartitionTopic {
            name: format!("{job}-{keyed}-repartition"),
            key_groups: max_parallelism,
        };
        if p.bound.as_deref() == Some(topic.name.as_str()) {
            continue;
        }
        g.nodes[p.out].op = OperatorId(format!("{keyed}.repartition-out"));
        g.nodes[p.input].op = OperatorId(format!("{keyed}.repartition-in"));
        // The reading side feeds the keyed operator one to one: same parallelism.
        g.nodes[p.input].parallelism = g.nodes[p.keyed].parallelism;
        let binding = Binding {
            writers_per_instance: super::Plan::new(g, parallelism).parallelism[p.out],
            topic,
            instance,
            deployment: from_savepoint
                .map_or(0, |name| xxhash_rust::xxh3::xxh3_64(name.as_bytes())),
        };
        (p.bind)(g, &p, &binding, rep.as_ref())?;
        g.repartitions[i].bound = Some(binding.topic.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{merge, Mark};
    use crate::time::Timestamp;

    #[test]
    fn a_partitions_watermark_is_the_slowest_writers_idle_ones_left_out() {
        let at = |t| Some(Mark::At(t));
        let idle = Some(Mark::Idle);
        for (marks, expected) in [
            (vec![at(5), at(3), at(9)], Some(3)),
            // A writer that has not spoken holds everything back.
            (vec![at(5), None, at(9)], Some(Timestamp::MIN)),
            (vec![at(5), idle, at(9)], Some(5)),
            (vec![idle, idle], None),
            (vec![idle, at(Timestamp::MAX)], Some(Timestamp::MAX)),
        ] {
            assert_eq!(merge(&marks), expected, "{marks:?}");
        }
    }
}
