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

use super::{Graph, NodeId, SourceNode};
use crate::api::{
    Data, Key, RecoveryContext, RepartitionTopic, Repartitioner, Routed, SinkContext, SinkWriter,
    Source, SourceContext, SourcePoll, SourceReader, TwoPhaseCommitSink,
};
use crate::codec;
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, KeyGroup, OperatorId};
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

/// The sink in front of the topic: each record with its key group, encoded.
pub(crate) struct EncodeSink<T, K, KF> {
    inner: Arc<dyn DynSink>,
    key_fn: KF,
    max_parallelism: u16,
    _t: PhantomData<fn(T) -> K>,
}

impl<T: Data, K: Key, KF: Fn(&T) -> K + Clone + Send + Sync + 'static> TwoPhaseCommitSink
    for EncodeSink<T, K, KF>
{
    type Item = T;
    type Committable = serde_json::Value;
    type Writer = EncodeWriter<T, K, KF>;

    fn open_writer(&self, ctx: &SinkContext) -> Result<Self::Writer> {
        Ok(EncodeWriter {
            inner: self.inner.open_writer(ctx)?,
            key_fn: self.key_fn.clone(),
            max_parallelism: self.max_parallelism,
            key: Vec::new(),
            routed: Vec::new(),
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
            self.routed.push(Routed {
                key_group: kg.0,
                payload: codec::encode(&record, "repartitioned record")?,
            });
        }
        self.inner.write(&mut self.routed)
    }
    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<Option<serde_json::Value>> {
        self.inner.pre_commit(checkpoint)
    }
    fn last_pre_commit_wait(&self) -> std::time::Duration {
        self.inner.last_pre_commit_wait()
    }
}

/// The source behind the topic: records decoded back into the stream's type.
pub(crate) struct DecodeSource<T> {
    inner: Arc<dyn DynSource>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Data> Source for DecodeSource<T> {
    type Item = T;
    type Offset = Vec<u8>;
    type Reader = DecodeReader<T>;

    fn splits(&self) -> Result<Vec<String>> {
        self.inner.splits()
    }
    fn open(
        &self,
        split: &str,
        from: Option<Vec<u8>>,
        ctx: &SourceContext,
    ) -> Result<Self::Reader> {
        Ok(DecodeReader {
            inner: self.inner.open(split, from, ctx)?,
            split: split.to_string(),
            buf: Vec::new(),
            _t: PhantomData,
        })
    }
    fn discover_splits_every(&self) -> Option<std::time::Duration> {
        self.inner.discover_splits_every()
    }
    fn split_key_group(&self, split: &str) -> Option<KeyGroup> {
        self.inner.split_key_group(split)
    }
}

pub(crate) struct DecodeReader<T> {
    inner: BoxReader,
    split: String,
    buf: Vec<Vec<u8>>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Data> SourceReader for DecodeReader<T> {
    type Item = T;
    type Offset = Vec<u8>;

    fn poll_batch(&mut self, out: &mut Vec<T>, max: usize) -> Result<SourcePoll> {
        self.buf.clear();
        let polled = self.inner.poll_batch(&mut self.buf, max)?;
        for payload in self.buf.drain(..) {
            out.push(
                codec::decode(&payload, "repartitioned record").map_err(|e| {
                    Error::config(format!(
                        "a record of repartition split '{}' does not decode as {} ({e}): \
                     the instances run different versions of the job",
                        self.split,
                        std::any::type_name::<T>()
                    ))
                })?,
            );
        }
        Ok(polled)
    }
    fn offset(&self) -> Vec<u8> {
        self.inner.offset()
    }
    fn checkpoint_complete(&mut self, offset: &Vec<u8>) {
        self.inner.checkpoint_complete(offset)
    }
    fn backlog(&self) -> Option<u64> {
        self.inner.backlog()
    }
}

/// Fills a repartition's two nodes with their connectors.
pub(crate) type BindFn = Arc<
    dyn Fn(&mut Graph, &PendingRepartition, &RepartitionTopic, &dyn DynRepartitioner) -> Result<()>
        + Send
        + Sync,
>;

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
    Arc::new(move |g, p, topic, rep| {
        let sink = EncodeSink {
            inner: rep.sink(topic)?,
            key_fn: key_fn.clone(),
            max_parallelism: topic.key_groups,
            _t: PhantomData,
        };
        super::set_sink(g, p.out, sink);
        let source = DecodeSource::<T> {
            inner: rep.source(topic)?,
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
    max_parallelism: u16,
    instance: crate::ids::Instance,
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
        if let Some(source) = event_time_source(g, p.out) {
            return Err(Error::config(format!(
                "source '{source}' has watermarks, and its records reach keyed operator \
                '{keyed}' through another instance: event time does not cross instances \
                (watermarks are not carried through the repartition topic), so its timers \
                would never fire. Run the job as one instance, or key it without event time"
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
        (p.bind)(g, &p, &topic, rep.as_ref())?;
        g.repartitions[i].bound = Some(topic.name);
    }
    Ok(())
}

/// A source with watermarks upstream of `node`, if any.
fn event_time_source(g: &Graph, node: NodeId) -> Option<OperatorId> {
    let mut stack = vec![node];
    let mut seen = std::collections::HashSet::new();
    while let Some(n) = stack.pop() {
        if !seen.insert(n) {
            continue;
        }
        if g.nodes[n].source.is_some() && g.nodes[n].watermarks.is_some() {
            return Some(g.nodes[n].op.clone());
        }
        stack.extend(g.nodes[n].in_edges.iter().map(|&e| g.edges[e].from));
    }
    None
}
