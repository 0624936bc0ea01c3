//! The planner: the logical graph the DSL builds, the physical plan of one run
//! (parallelism, chaining, channels) and how a task instance is built from it.
//!
//! Every node keeps its typed parts behind `Any`: the DSL knows the types when a node is
//! added, and the builder downcasts with the same types when a task is assembled, so the
//! operators that run are fully monomorphised.

pub(crate) mod paced;
pub(crate) mod repartition;
mod source_node;

use crate::api::{Data, Source, TwoPhaseCommitSink};
use crate::coordinator::TaskKey;
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, OperatorId, SubtaskIndex};
use crate::runtime::exchange::{ExchangeOut, RoundRobin};
use crate::runtime::heads::{InputHead, TaskHead};
use crate::runtime::ops::{Discard, Fanout, SinkOp};
use crate::runtime::{Announce, BatchPool, Collector, Lanes, Message, SourceControl, TaskEnv};
use crate::state::OperatorSnapshot;
use crossbeam_channel::{Receiver, Sender};
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub(crate) type NodeId = usize;
pub(crate) type EdgeId = usize;

/// Builds a node's operator (and, recursively, what it feeds) for one subtask.
pub(crate) type OpFactory<I> =
    Arc<dyn Fn(&mut BuildCtx<'_>) -> Result<Box<dyn Collector<I>>> + Send + Sync>;
/// Builds the sending side of a hash edge for one upstream subtask.
pub(crate) type SenderFactory<T> = Arc<
    dyn Fn(Vec<Sender<Message<T>>>, BatchPool<T>, Lanes, &BuildCtx<'_>) -> Box<dyn Collector<T>>
        + Send
        + Sync,
>;
pub(crate) use crate::runtime::inflight::KeyGroupFn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Partition {
    /// Same subtask index downstream; chained when parallelism matches.
    Forward,
    /// Hash by key group.
    Hash,
}

pub(crate) struct Edge {
    pub from: NodeId,
    pub to: NodeId,
    pub partition: Partition,
    /// `SenderFactory<T>` for hash edges.
    pub hash_sender: Option<Arc<dyn Any + Send + Sync>>,
    /// `KeyGroupFn<T>` for hash edges.
    pub key_group: Option<Arc<dyn Any + Send + Sync>>,
}

/// The typed input side of a node.
pub(crate) struct NodeInput<I> {
    pub op: OpFactory<I>,
}

/// Channels of one edge, typed by what it carries.
struct EdgeChannels<T> {
    /// Per upstream subtask: senders ordered by downstream subtask.
    senders: Vec<Option<Vec<Sender<Message<T>>>>>,
    /// Per downstream subtask: receivers ordered by upstream subtask.
    receivers: Vec<Option<Vec<Receiver<Message<T>>>>>,
    /// Emptied batches going back from the receivers to the senders.
    pool: BatchPool<T>,
}

pub(crate) trait ErasedInput: Send + Sync {
    fn as_any(&self) -> &dyn Any;
    fn make_channels(
        &self,
        up: usize,
        down: usize,
        one_to_one: bool,
        capacity: usize,
        batch_size: usize,
    ) -> Box<dyn Any + Send>;
    fn build_head(&self, node: NodeId, ctx: &mut BuildCtx<'_>) -> Result<Box<dyn TaskHead>>;
}

impl<I: Data> ErasedInput for NodeInput<I> {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn make_channels(
        &self,
        up: usize,
        down: usize,
        one_to_one: bool,
        capacity: usize,
        batch_size: usize,
    ) -> Box<dyn Any + Send> {
        let mut senders: Vec<Vec<Sender<Message<I>>>> = (0..up).map(|_| Vec::new()).collect();
        let mut receivers: Vec<Vec<Receiver<Message<I>>>> = (0..down).map(|_| Vec::new()).collect();
        for (u, s) in senders.iter_mut().enumerate() {
            for (d, r) in receivers.iter_mut().enumerate() {
                if one_to_one && u != d {
                    continue;
                }
                let (tx, rx) = crossbeam_channel::bounded(capacity);
                s.push(tx);
                r.push(rx);
            }
        }
        // Enough for every sender to take a fresh buffer per channel while the
        // receivers hand back what they processed.
        let channels = if one_to_one { up } else { up * down };
        Box::new(EdgeChannels {
            senders: senders.into_iter().map(Some).collect(),
            receivers: receivers.into_iter().map(Some).collect(),
            pool: BatchPool::new(2 * channels + up, batch_size),
        })
    }

    fn build_head(&self, node: NodeId, ctx: &mut BuildCtx<'_>) -> Result<Box<dyn TaskHead>> {
        let mut receivers = Vec::new();
        let mut pools = Vec::new();
        let mut routes = Vec::new();
        for &e in &ctx.graph.nodes[node].in_edges {
            let (mine, pool) = ctx.channels.take(e, |c: &mut EdgeChannels<I>| {
                c.receivers[ctx.subtask.0].take()
            })?;
            let route = match &ctx.graph.edges[e].key_group {
                Some(f) => Some(
                    f.downcast_ref::<KeyGroupFn<I>>()
                        .ok_or_else(|| Error::config("internal: key group of the wrong type"))?
                        .clone(),
                ),
                None => None,
            };
            pools.extend(mine.iter().map(|_| pool.clone()));
            routes.extend(mine.iter().map(|_| route.clone()));
            receivers.extend(mine);
        }
        let key = ctx.key();
        let parallelism = ctx.plan.parallelism[node];
        let replay = crate::runtime::inflight::replay::<I>(
            ctx.restored(&crate::runtime::inflight::operator_of(&key.task)),
            ctx.key_groups(node),
            ctx.subtask,
            parallelism,
            ctx.env.config.batch_size,
        )?;
        let lane = ctx.channels.lane_end(node, ctx.subtask.0);
        let op = (self.op)(ctx)?;
        let metrics = &ctx.env.metrics;
        let records_in = metrics.counter(&key.task.0, "records_in");
        let busy_ns = metrics.counter(&key.task.0, crate::telemetry::BUSY_NS);
        let read_ahead_peak = metrics.counter(&key.task.0, crate::telemetry::READ_AHEAD_PEAK);
        let fill = metrics.gauge(
            &key.task.0,
            crate::telemetry::INPUT_FILL_PERMILLE,
            key.subtask.0,
        );
        let lag = metrics.gauge(
            &key.task.0,
            crate::telemetry::WATERMARK_LAG_MS,
            key.subtask.0,
        );
        Ok(Box::new(InputHead {
            key,
            parallelism,
            receivers,
            pools,
            routes,
            lane,
            replay,
            op,
            env: ctx.env.clone(),
            records_in,
            busy_ns,
            read_ahead_peak,
            fill,
            lag,
        }))
    }
}

/// A source node's typed part.
pub(crate) trait ErasedSource: Send + Sync {
    fn replayable(&self) -> bool;
    fn build_head(&self, node: NodeId, ctx: &mut BuildCtx<'_>) -> Result<Box<dyn TaskHead>>;
}

pub(crate) struct SourceNode<S: Source> {
    pub source: Arc<S>,
}

/// A sink node's typed committer side, used by the driver.
pub(crate) trait ErasedSink: Send + Sync {
    fn commit(&self, committable: &serde_json::Value) -> Result<()>;
    fn recover(
        &self,
        ctx: &crate::api::RecoveryContext,
        pending: Vec<serde_json::Value>,
    ) -> Result<Option<CheckpointId>>;
}

pub(crate) struct Node {
    pub op: OperatorId,
    /// `WatermarkStrategy<T>` of a source node.
    pub watermarks: Option<Arc<dyn Any + Send + Sync>>,
    pub parallelism: Option<usize>,
    pub source: Option<Arc<dyn ErasedSource>>,
    pub input: Option<Arc<dyn ErasedInput>>,
    pub sink: Option<Arc<dyn ErasedSink>>,
    /// Where a sink writes ([`crate::api::TwoPhaseCommitSink::location`]).
    pub sink_location: Option<String>,
    /// A keyed operator still under its generated name (`process-N`): its state would
    /// be stored under a name that changes when operators are added before it.
    pub unnamed_state: bool,
    /// The operator whose checkpointed state this one restores (a rename on purpose).
    pub restores: Option<OperatorId>,
    pub in_edges: Vec<EdgeId>,
    pub out_edges: Vec<EdgeId>,
}

/// The graph a job's DSL calls build, shared by the job and its streams (and sent with
/// the job to the thread that runs it).
#[derive(Clone, Default)]
pub(crate) struct SharedGraph(Arc<Mutex<Graph>>);

impl SharedGraph {
    /// The graph, for one DSL call or one run. Never held across user code.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Graph> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Default)]
pub(crate) struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// Problems found while the DSL was used; reported by `run()`.
    pub errors: Vec<String>,
    /// How keyed exchanges cross instances, for a job that runs as several.
    pub repartitioner: Option<Arc<dyn repartition::DynRepartitioner>>,
    /// The keyed exchanges that cross instances.
    pub repartitions: Vec<repartition::PendingRepartition>,
}

impl Graph {
    pub fn add_node(&mut self, op: OperatorId) -> NodeId {
        self.nodes.push(Node {
            op,
            watermarks: None,
            parallelism: None,
            source: None,
            input: None,
            sink: None,
            sink_location: None,
            unnamed_state: false,
            restores: None,
            in_edges: Vec::new(),
            out_edges: Vec::new(),
        });
        self.nodes.len() - 1
    }

    pub fn connect(
        &mut self,
        from: NodeId,
        to: NodeId,
        partition: Partition,
        hash: Option<(Arc<dyn Any + Send + Sync>, Arc<dyn Any + Send + Sync>)>,
    ) {
        let e = self.edges.len();
        let (hash_sender, key_group) = hash.unzip();
        self.edges.push(Edge {
            from,
            to,
            partition,
            hash_sender,
            key_group,
        });
        self.nodes[from].out_edges.push(e);
        self.nodes[to].in_edges.push(e);
    }
}

/// Make `node` a sink node writing into `sink`: its writers per subtask, and its commit
/// side for the driver.
pub(crate) fn set_sink<S: TwoPhaseCommitSink>(g: &mut Graph, node: NodeId, sink: S) {
    let sink = Arc::new(sink);
    let writer_sink = sink.clone();
    let op: OpFactory<S::Item> = Arc::new(move |ctx| {
        let sink_id = ctx.graph.nodes[node].op.clone();
        let writer = writer_sink.open_writer(&crate::api::SinkContext {
            job: ctx.env.config.job.clone(),
            sink: sink_id.clone(),
            subtask: ctx.subtask,
            parallelism: ctx.parallelism_of(node),
            checkpoint_interval: ctx.env.config.checkpoint_interval,
            generation: ctx.env.config.generation,
            io: ctx.env.rt.clone(),
        })?;
        Ok(Box::new(SinkOp::<S> {
            sink: sink_id,
            subtask: ctx.subtask,
            writer,
        }))
    });
    g.nodes[node].input = Some(Arc::new(NodeInput { op }));
    g.nodes[node].sink_location = sink.location();
    let name = g.nodes[node].op.clone();
    g.nodes[node].sink = Some(Arc::new(SinkCommitter { sink, name }) as Arc<dyn ErasedSink>);
}

struct SinkCommitter<S> {
    sink: Arc<S>,
    name: OperatorId,
}

impl<S: TwoPhaseCommitSink> ErasedSink for SinkCommitter<S> {
    fn commit(&self, committable: &serde_json::Value) -> Result<()> {
        let c: S::Committable = serde_json::from_value(committable.clone()).map_err(|e| {
            crate::error::Error::Codec {
                what: format!("committable of sink '{}'", self.name),
                message: e.to_string(),
            }
        })?;
        self.sink.commit(&c).map_err(|e| match e {
            // Sinks' `commit` has no context; name the sink as the job knows it.
            crate::error::Error::CommitLost {
                sink,
                checkpoint,
                message,
            } if sink != self.name => crate::error::Error::CommitLost {
                sink: self.name.clone(),
                checkpoint,
                message: format!("{message} (sink at {sink})"),
            },
            e => e,
        })
    }

    fn recover(
        &self,
        ctx: &crate::api::RecoveryContext,
        pending: Vec<serde_json::Value>,
    ) -> Result<Option<crate::ids::CheckpointId>> {
        let typed = pending
            .into_iter()
            .map(|v| {
                serde_json::from_value(v).map_err(|e| crate::error::Error::Codec {
                    what: format!("committable of sink '{}'", self.name),
                    message: e.to_string(),
                })
            })
            .collect::<Result<Vec<S::Committable>>>()?;
        self.sink.recover(ctx, typed)
    }
}

/// Parallelism and chaining decisions for one run.
pub(crate) struct Plan {
    pub parallelism: Vec<usize>,
    pub chained: Vec<bool>,
    /// Nodes that start a task.
    pub heads: Vec<NodeId>,
}

impl Plan {
    pub fn new(graph: &Graph, default_parallelism: usize) -> Plan {
        // Nodes are added after their inputs, so one pass in id order sees every input's
        // parallelism first. A node fed by a single forward edge inherits its input's
        // parallelism unless set, so that it stays chained.
        let mut parallelism: Vec<usize> = Vec::with_capacity(graph.nodes.len());
        for n in &graph.nodes {
            let inherited = match n.in_edges.as_slice() {
                [e] if graph.edges[*e].partition == Partition::Forward => {
                    Some(parallelism[graph.edges[*e].from])
                }
                _ => None,
            };
            parallelism.push(n.parallelism.or(inherited).unwrap_or(default_parallelism));
        }
        let chained: Vec<bool> = graph
            .edges
            .iter()
            .map(|e| {
                e.partition == Partition::Forward
                    && parallelism[e.from] == parallelism[e.to]
                    && graph.nodes[e.to].in_edges.len() == 1
            })
            .collect();
        let heads = (0..graph.nodes.len())
            .filter(|&n| {
                graph.nodes[n].in_edges.is_empty()
                    || graph.nodes[n].in_edges.iter().any(|&e| !chained[e])
            })
            .collect();
        Plan {
            parallelism,
            chained,
            heads,
        }
    }

    /// Every task instance.
    pub fn task_keys(&self, graph: &Graph) -> Vec<(NodeId, TaskKey)> {
        let mut out = Vec::new();
        for &h in &self.heads {
            for s in 0..self.parallelism[h] {
                out.push((
                    h,
                    TaskKey {
                        task: graph.nodes[h].op.clone(),
                        subtask: SubtaskIndex(s),
                    },
                ));
            }
        }
        out
    }
}

/// Channels of every edge that crosses tasks, for one run, and each receiving task's
/// priority lane for barrier announcements.
pub(crate) struct ChannelPool {
    edges: Mutex<HashMap<EdgeId, Box<dyn Any + Send>>>,
    /// Per (task head, subtask): its lane, if barriers are announced.
    lanes: HashMap<(NodeId, usize), Sender<Announce>>,
    lane_ends: Mutex<HashMap<(NodeId, usize), Receiver<Announce>>>,
}

impl ChannelPool {
    /// `announce`: create priority lanes (checkpoints may be unaligned).
    pub fn new(
        graph: &Graph,
        plan: &Plan,
        capacity: usize,
        batch_size: usize,
        announce: bool,
    ) -> ChannelPool {
        let mut map = HashMap::new();
        let mut lanes = HashMap::new();
        let mut lane_ends = HashMap::new();
        for (e, edge) in graph.edges.iter().enumerate() {
            if plan.chained[e] {
                continue;
            }
            let (up, down) = (plan.parallelism[edge.from], plan.parallelism[edge.to]);
            let one_to_one = edge.partition == Partition::Forward && up == down;
            let input = graph.nodes[edge.to]
                .input
                .as_ref()
                .expect("non-source node has an input");
            map.insert(
                e,
                input.make_channels(up, down, one_to_one, capacity, batch_size),
            );
            if announce {
                for s in 0..down {
                    lanes.entry((edge.to, s)).or_insert_with(|| {
                        let (tx, rx) = crossbeam_channel::unbounded();
                        lane_ends.insert((edge.to, s), rx);
                        tx
                    });
                }
            }
        }
        ChannelPool {
            edges: Mutex::new(map),
            lanes,
            lane_ends: Mutex::new(lane_ends),
        }
    }

    /// Take one subtask's end of edge `e` (`side` picks senders or receivers), with the
    /// edge's batch pool. Each end is taken once.
    fn take<T: 'static, End>(
        &self,
        e: EdgeId,
        side: impl FnOnce(&mut EdgeChannels<T>) -> Option<End>,
    ) -> Result<(End, BatchPool<T>)> {
        // Only used while tasks are built; a poisoned lock means a builder panicked, and
        // the map itself is still consistent.
        let mut map = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        let chans = map
            .get_mut(&e)
            .and_then(|c| c.downcast_mut::<EdgeChannels<T>>())
            .ok_or_else(|| Error::config(format!("internal: no channels for edge {e}")))?;
        let end = side(chans)
            .ok_or_else(|| Error::config(format!("internal: an end of edge {e} taken twice")))?;
        Ok((end, chans.pool.clone()))
    }

    /// Where upstream subtask `up` of edge `e` announces barriers: the lanes of the
    /// subtasks it sends to (none unless barriers are announced).
    fn lanes(&self, graph: &Graph, plan: &Plan, e: EdgeId, up: usize) -> Lanes {
        let edge = &graph.edges[e];
        let down = plan.parallelism[edge.to];
        let one_to_one =
            edge.partition == Partition::Forward && plan.parallelism[edge.from] == down;
        let targets: Vec<usize> = if one_to_one {
            vec![up]
        } else {
            (0..down).collect()
        };
        targets
            .into_iter()
            .filter_map(|d| self.lanes.get(&(edge.to, d)).cloned())
            .collect()
    }

    /// Every task's lane, for the driver to announce a triggered checkpoint to all of
    /// them (empty unless barriers are announced).
    pub fn all_lanes(&self) -> Vec<Sender<Announce>> {
        self.lanes.values().cloned().collect()
    }

    /// The lane task `node`'s subtask reads announcements from, if barriers are
    /// announced.
    fn lane_end(&self, node: NodeId, subtask: usize) -> Option<Receiver<Announce>> {
        self.lane_ends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(node, subtask))
    }
}

/// Each source's splits, listed once per run: every subtask deals out the same list,
/// even if the input changes while the subtasks start.
#[derive(Default)]
pub(crate) struct SplitLists(Mutex<HashMap<NodeId, Arc<Vec<String>>>>);

impl SplitLists {
    /// `node`'s list, listed with `list` by the first subtask that asks.
    pub fn of(
        &self,
        node: NodeId,
        list: impl FnOnce() -> Result<Vec<String>>,
    ) -> Result<Arc<Vec<String>>> {
        // A poisoned lock means a listing panicked; the map itself is consistent.
        let mut lists = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = lists.get(&node) {
            return Ok(l.clone());
        }
        let l = Arc::new(list()?);
        lists.insert(node, l.clone());
        Ok(l)
    }
}

/// Restored operator state, by operator id.
#[derive(Default)]
pub(crate) struct RestoredState {
    pub checkpoint: Option<CheckpointId>,
    pub operators: HashMap<OperatorId, Vec<OperatorSnapshot>>,
    /// Declared state types the checkpoint recorded, per operator.
    pub types: HashMap<OperatorId, crate::state::types::StateTypeMap>,
}

/// Everything needed to build one task instance.
pub(crate) struct BuildCtx<'a> {
    pub graph: &'a Graph,
    pub plan: &'a Plan,
    pub head: NodeId,
    pub subtask: SubtaskIndex,
    pub env: &'a TaskEnv,
    pub channels: &'a ChannelPool,
    pub splits: &'a SplitLists,
    pub restored: &'a RestoredState,
    pub control: Option<Receiver<SourceControl>>,
}

impl BuildCtx<'_> {
    pub fn key(&self) -> TaskKey {
        TaskKey {
            task: self.graph.nodes[self.head].op.clone(),
            subtask: self.subtask,
        }
    }

    pub fn parallelism_of(&self, node: NodeId) -> usize {
        self.plan.parallelism[node]
    }

    /// This subtask of `node` as the job-wide subtask, and the job-wide parallelism:
    /// the same as the local ones unless the job runs as several instances.
    pub fn global_share(&self, node: NodeId) -> (SubtaskIndex, usize) {
        self.env
            .config
            .instance
            .global(self.subtask, self.parallelism_of(node))
    }

    /// The key groups this subtask of `node` owns (its job-wide share).
    pub fn key_groups(&self, node: NodeId) -> crate::ids::KeyGroupRange {
        let (subtask, parallelism) = self.global_share(node);
        crate::ids::KeyGroupRange::for_subtask(
            self.env.config.max_parallelism,
            parallelism,
            subtask,
        )
    }

    /// The state types the restored checkpoint recorded for `op`.
    pub fn restored_types(&self, op: &OperatorId) -> crate::state::types::StateTypeMap {
        self.restored.types.get(op).cloned().unwrap_or_default()
    }

    /// Snapshots of `op` from the restored checkpoint (all subtasks).
    pub fn restored(&self, op: &OperatorId) -> &[OperatorSnapshot] {
        self.restored
            .operators
            .get(op)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    /// Build what consumes `node`'s output in this subtask.
    pub fn build_output<T: Data>(&mut self, node: NodeId) -> Result<Box<dyn Collector<T>>> {
        let graph = self.graph;
        let mut outs: Vec<Box<dyn Collector<T>>> = Vec::new();
        for &e in &graph.nodes[node].out_edges {
            let edge = &graph.edges[e];
            if self.plan.chained[e] {
                outs.push(self.build_input::<T>(edge.to)?);
                continue;
            }
            let subtask = self.subtask.0;
            let (senders, batches) = self
                .channels
                .take(e, |c: &mut EdgeChannels<T>| c.senders[subtask].take())?;
            let lanes = self.channels.lanes(graph, self.plan, e, subtask);
            let out: Box<dyn Collector<T>> = match (&edge.partition, &edge.hash_sender) {
                (Partition::Hash, Some(f)) => {
                    let f = f
                        .downcast_ref::<SenderFactory<T>>()
                        .ok_or_else(|| Error::config("internal: hash sender of the wrong type"))?;
                    f(senders, batches, lanes, self)
                }
                _ => Box::new(ExchangeOut::new(
                    senders,
                    batches,
                    lanes,
                    RoundRobin(self.subtask.0),
                    self.env.config.batch_size,
                    self.env.cancel.clone(),
                )),
            };
            outs.push(out);
        }
        Ok(match outs.len() {
            0 => Box::new(Discard),
            1 => outs.pop().expect("one output"),
            _ => Box::new(Fanout {
                outs,
                copy: Vec::new(),
            }),
        })
    }

    /// Build `node`'s operator chained into this task.
    pub fn build_input<T: Data>(&mut self, node: NodeId) -> Result<Box<dyn Collector<T>>> {
        let input = self.graph.nodes[node].input.clone().ok_or_else(|| {
            Error::config(format!(
                "internal: node {} has no input",
                self.graph.nodes[node].op
            ))
        })?;
        let typed = input
            .as_any()
            .downcast_ref::<NodeInput<T>>()
            .ok_or_else(|| {
                Error::config(format!(
                    "internal: input of {} has the wrong type",
                    self.graph.nodes[node].op
                ))
            })?;
        (typed.op)(self)
    }
}
