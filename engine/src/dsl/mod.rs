//! The pipeline DSL: a [`Job`] holds a graph that [`Stream`]s and [`KeyedStream`]s add
//! typed operators to; [`Job::run`] executes it.
//!
//! ```
//! use exactly_engine::prelude::*;
//! use exactly_engine::testing::{CollectSink, VecSource};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let job = Job::builder("doc")
//!     .checkpoint_storage(dir.path().join("chk").to_str().unwrap())
//!     .parallelism(2)
//!     .build()?;
//! let out = CollectSink::new();
//! job.source("numbers", VecSource::new((1..=100u64).collect()))
//!     .map(|n| n * 2)
//!     .filter(|n| n % 3 == 0)
//!     .sink("out", out.clone());
//! job.run()?;
//! assert_eq!(out.sorted().len(), 33);
//! # Ok(()) }
//! ```

pub(crate) mod job;

pub use crate::driver::RestartPolicy;
pub use job::{Job, JobBuilder, JobHandle};

use crate::api::{Data, Key, TwoPhaseCommitSink};
use crate::ids::OperatorId;
use crate::operator::{Filter, FlatMap, Map, Operator};
use crate::plan::repartition::PendingRepartition;
use crate::plan::{
    KeyGroupFn, NodeId, NodeInput, OpFactory, Partition, SenderFactory, SharedGraph,
};
use crate::process::{KeyedContext, KeyedCore, KeyedProcessFunction, ProcessFn};
use crate::runtime::exchange::{ByKeyGroup, ExchangeOut};
use crate::runtime::ops::{KeyedProcessOp, PassOp, UserOp, UserOpEnv};
use crate::state::KeyedState;
use crate::time::WatermarkStrategy;
use std::marker::PhantomData;
use std::sync::Arc;

/// A typed stream of records in a job being built.
pub struct Stream<T> {
    graph: SharedGraph,
    node: NodeId,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Stream<T> {
    fn clone(&self) -> Self {
        Stream {
            graph: self.graph.clone(),
            node: self.node,
            _t: PhantomData,
        }
    }
}

impl<T: Data> Stream<T> {
    pub(crate) fn new(graph: SharedGraph, node: NodeId) -> Self {
        Stream {
            graph,
            node,
            _t: PhantomData,
        }
    }

    /// Add `op` as a node named `<kind>-<node>` fed by this stream, chained into its
    /// task (no exchange).
    fn add_operator<O: Operator<T>>(&self, kind: &str, op: O) -> Stream<O::Out> {
        let mut g = self.graph.lock();
        let node = g.nodes.len();
        g.add_node(OperatorId(format!("{kind}-{node}")));
        g.nodes[node].unnamed_state = crate::operator::has_state::<T, O>();
        let factory: OpFactory<T> = Arc::new(move |ctx| {
            let operator = ctx.graph.nodes[node].op.clone();
            let next = ctx.build_output::<O::Out>(node)?;
            // Job-wide, so that across instances each subtask's entries stay apart and
            // a rescale through a savepoint deals them out once.
            let (subtask, parallelism) = ctx.global_share(node);
            let env = UserOpEnv {
                subtask,
                parallelism,
                clock: ctx.env.clock.clone(),
                metrics: ctx.env.metrics.clone(),
                restored: ctx
                    .restored(&operator)
                    .iter()
                    .map(|s| s.list.as_slice())
                    .collect(),
                restored_types: ctx.restored_types(&operator),
                operator,
            };
            Ok(Box::new(UserOp::open(op.clone(), env, next)?))
        });
        g.nodes[node].input = Some(Arc::new(NodeInput { op: factory }));
        g.connect(self.node, node, Partition::Forward, None);
        drop(g);
        Stream::new(self.graph.clone(), node)
    }

    /// Run a non-keyed [`Operator`] in every parallel instance of this stream, chained
    /// into the same task (no exchange). An operator with state must be named
    /// (`.name("...")`); see [`crate::operator`] for how its state is stored and
    /// redistributed when the parallelism changes.
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// # use exactly_engine::testing::VecSource;
    /// /// Drops a record equal to the one before it in this instance.
    /// #[derive(Clone, Default)]
    /// struct DropRepeats(Option<u32>);
    ///
    /// impl Operator<u32> for DropRepeats {
    ///     type Out = u32;
    ///     type State = u32;
    ///     fn open(&mut self, restored: Vec<u32>, _: &mut OperatorContext<'_, u32>) -> Result<(), BoxError> {
    ///         self.0 = restored.last().copied();
    ///         Ok(())
    ///     }
    ///     fn process(&mut self, n: u32, ctx: &mut OperatorContext<'_, u32>) -> Result<(), BoxError> {
    ///         if self.0 != Some(n) {
    ///             ctx.emit(n);
    ///         }
    ///         self.0 = Some(n);
    ///         Ok(())
    ///     }
    ///     fn snapshot(&mut self, _: CheckpointId) -> Result<Vec<u32>, BoxError> {
    ///         Ok(self.0.into_iter().collect())
    ///     }
    /// }
    ///
    /// # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
    /// let changes = job
    ///     .source("readings", VecSource::new(vec![1u32, 1, 2]))
    ///     .transform(DropRepeats::default())
    ///     .name("changes");
    /// ```
    pub fn transform<O: Operator<T>>(&self, op: O) -> Stream<O::Out> {
        self.add_operator("transform", op)
    }

    /// Transform each record.
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// # use exactly_engine::testing::VecSource;
    /// # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
    /// let lengths = job.source("words", VecSource::new(vec!["a".to_string()])).map(|w| w.len());
    /// ```
    pub fn map<U: Data>(&self, f: impl Fn(T) -> U + Clone + Send + Sync + 'static) -> Stream<U> {
        self.add_operator("map", Map(f))
    }

    /// Keep the records for which `f` is true.
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// # use exactly_engine::testing::VecSource;
    /// # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
    /// let even = job.source("n", VecSource::new(vec![1u32, 2, 3])).filter(|n| n % 2 == 0);
    /// ```
    pub fn filter(&self, f: impl Fn(&T) -> bool + Clone + Send + Sync + 'static) -> Stream<T> {
        self.add_operator("filter", Filter(f))
    }

    /// Turn each record into zero or more records.
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// # use exactly_engine::testing::VecSource;
    /// # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
    /// let words = job
    ///     .source("lines", VecSource::new(vec!["a b".to_string()]))
    ///     .flat_map(|l| l.split(' ').map(String::from).collect::<Vec<_>>());
    /// ```
    pub fn flat_map<U: Data, I: IntoIterator<Item = U> + 'static>(
        &self,
        f: impl Fn(T) -> I + Clone + Send + Sync + 'static,
    ) -> Stream<U> {
        self.add_operator("flat_map", FlatMap(f))
    }

    /// Partition the stream by key: records with equal keys go to the same parallel
    /// instance, and keyed state is scoped to the key.
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// # use exactly_engine::testing::VecSource;
    /// # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
    /// let by_account = job.source("p", VecSource::new(vec![(1u64, 5i64)])).key_by(|p| p.0);
    /// ```
    pub fn key_by<K: Key, KF: Fn(&T) -> K + Clone + Send + Sync + 'static>(
        &self,
        key_fn: KF,
    ) -> KeyedStream<T, K, KF> {
        KeyedStream {
            stream: self.clone(),
            key_fn,
            _k: PhantomData,
        }
    }

    /// Merge with another stream of the same type. The merged task aligns barriers from
    /// both inputs.
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// # use exactly_engine::testing::VecSource;
    /// # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
    /// let a = job.source("a", VecSource::new(vec![1u32]));
    /// let b = job.source("b", VecSource::new(vec![2u32]));
    /// let both = a.union(&b);
    /// ```
    pub fn union(&self, other: &Stream<T>) -> Stream<T> {
        let mut g = self.graph.lock();
        let node = g.nodes.len();
        g.add_node(OperatorId(format!("union-{node}")));
        let op: OpFactory<T> = Arc::new(move |ctx| {
            Ok(Box::new(PassOp {
                next: ctx.build_output::<T>(node)?,
            }))
        });
        g.nodes[node].input = Some(Arc::new(NodeInput { op }));
        g.connect(self.node, node, Partition::Forward, None);
        g.connect(other.node, node, Partition::Forward, None);
        drop(g);
        Stream::new(self.graph.clone(), node)
    }

    /// Write the stream to a two-phase-commit sink named `name`.
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// # use exactly_engine::testing::{CollectSink, VecSource};
    /// # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
    /// let out = CollectSink::new();
    /// job.source("n", VecSource::new(vec![1u32])).sink("out", out.clone());
    /// ```
    pub fn sink<S: TwoPhaseCommitSink<Item = T>>(&self, name: &str, sink: S) -> Stream<()> {
        let mut g = self.graph.lock();
        let node = g.add_node(OperatorId(name.to_string()));
        crate::plan::set_sink(&mut g, node, sink);
        g.connect(self.node, node, Partition::Forward, None);
        drop(g);
        Stream::new(self.graph.clone(), node)
    }

    /// Derive watermarks from this source's records. Must directly follow
    /// [`Job::source`]; watermarks are generated per split and merged as a minimum.
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// # use exactly_engine::testing::VecSource;
    /// # use std::time::Duration;
    /// # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
    /// let events = job
    ///     .source("events", VecSource::new(vec![(1_000i64, "a".to_string())]))
    ///     .with_watermarks(WatermarkStrategy::bounded_out_of_orderness(Duration::from_secs(5), |e: &(i64, String)| e.0));
    /// ```
    pub fn with_watermarks(self, strategy: WatermarkStrategy<T>) -> Self {
        let mut g = self.graph.lock();
        if g.nodes[self.node].source.is_none() {
            let op = g.nodes[self.node].op.clone();
            g.errors.push(format!(
                "with_watermarks must directly follow job.source(...), but was called on '{op}'"
            ));
        } else {
            g.nodes[self.node].watermarks = Some(Arc::new(strategy));
        }
        drop(g);
        self
    }

    /// Set the parallelism of the operator that produces this stream.
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// # use exactly_engine::testing::VecSource;
    /// # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
    /// let parsed = job.source("lines", VecSource::new(vec!["1".to_string()]))
    ///     .map(|l| l.parse::<u64>().unwrap_or(0))
    ///     .parallelism(4);
    /// ```
    pub fn parallelism(self, n: usize) -> Self {
        self.graph.lock().nodes[self.node].parallelism = Some(n);
        self
    }

    /// Name the operator that produces this stream. Its state is stored under this name,
    /// so naming stateful operators keeps checkpoints restorable when the job changes.
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// # use exactly_engine::testing::VecSource;
    /// # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
    /// let totals = job.source("payments", VecSource::new(vec![(1u32, 5i64)]))
    ///     .key_by(|p| p.0)
    ///     .process_fn(|p: (u32, i64), ctx: &mut KeyedContext<'_, u32, (u32, i64)>| {
    ///         ctx.emit(p);
    ///         Ok(())
    ///     })
    ///     .name("totals");
    /// ```
    pub fn name(self, name: &str) -> Self {
        let mut g = self.graph.lock();
        g.nodes[self.node].op = OperatorId(name.to_string());
        g.nodes[self.node].unnamed_state = false;
        drop(g);
        self
    }

    /// Restore the checkpointed state of operator `old_name` into this operator: a
    /// rename on purpose. Its keyed state, timers and (for a source) read offsets carry
    /// over. Once a checkpoint holds the state under the new name, the mapping has
    /// nothing left to do and may be removed (it is ignored then). Without it, a
    /// checkpoint holding state of an operator the job no longer has is refused.
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// # use exactly_engine::testing::VecSource;
    /// # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
    /// let totals = job.source("payments", VecSource::new(vec![(1u32, 5i64)]))
    ///     .key_by(|p| p.0)
    ///     .process_fn(|p: (u32, i64), ctx: &mut KeyedContext<'_, u32, (u32, i64)>| {
    ///         ctx.emit(p);
    ///         Ok(())
    ///     })
    ///     .name("account-totals")
    ///     .restore_state_of("totals"); // its name in the previous version
    /// ```
    pub fn restore_state_of(self, old_name: &str) -> Self {
        self.graph.lock().nodes[self.node].restores = Some(OperatorId(old_name.to_string()));
        self
    }
}

/// A stream partitioned by key.
#[derive(Clone)]
pub struct KeyedStream<T, K, KF> {
    stream: Stream<T>,
    key_fn: KF,
    _k: PhantomData<fn() -> K>,
}

impl<T: Data, K: Key, KF: Fn(&T) -> K + Clone + Send + Sync + 'static> KeyedStream<T, K, KF> {
    /// Run a keyed process function: per record, with state scoped to the record's key.
    /// See [`KeyedProcessFunction`] for an example.
    pub fn process<F: KeyedProcessFunction<K, T>>(&self, func: F) -> Stream<F::Out> {
        let mut g = self.stream.graph.lock();
        // Across instances, records reach the operator through a topic: a sink in
        // front of it and a source feeding it, named and connected when the job runs.
        let crossing = g.repartitioner.is_some().then(|| {
            let n = g.nodes.len();
            let out = g.add_node(OperatorId(format!("repartition-{n}")));
            let input = g.add_node(OperatorId(format!("repartition-{}", n + 1)));
            g.connect(self.stream.node, out, Partition::Forward, None);
            (out, input)
        });
        let node = g.nodes.len();
        g.add_node(OperatorId(format!("process-{node}")));
        g.nodes[node].unnamed_state = true;
        let kf = self.key_fn.clone();
        let sender: SenderFactory<T> = Arc::new(move |senders, batches, lanes, ctx| {
            let cfg = &ctx.env.config;
            Box::new(ExchangeOut::new(
                senders,
                batches,
                lanes,
                ByKeyGroup::new(kf.clone(), cfg.max_parallelism),
                cfg.batch_size,
                ctx.env.cancel.clone(),
            ))
        });
        let kf = self.key_fn.clone();
        let op: OpFactory<T> = Arc::new(move |ctx| {
            let operator = ctx.graph.nodes[node].op.clone();
            let max = ctx.env.config.max_parallelism;
            let mut state = KeyedState::open(
                ctx.key_groups(node),
                max,
                &operator,
                ctx.subtask,
                &ctx.env.backend,
                ctx.restored(&operator),
            )?;
            state.expect_types(&operator, ctx.restored_types(&operator));
            let next = ctx.build_output::<F::Out>(node)?;
            let mut core = KeyedCore::new(
                operator,
                ctx.subtask,
                func.clone(),
                state,
                ctx.env.clock.clone(),
            );
            core.open(&ctx.env.metrics)?;
            Ok(Box::new(KeyedProcessOp {
                core,
                key_fn: kf.clone(),
                keys: Vec::new(),
                batch_size: ctx.env.config.batch_size,
                out: Vec::new(),
                next,
            }))
        });
        g.nodes[node].input = Some(Arc::new(NodeInput { op }));
        let kf = self.key_fn.clone();
        let key_group: KeyGroupFn<T> = Arc::new(move |r: &T, max: u16, buf: &mut Vec<u8>| {
            crate::codec::key_group_of(&kf(r), buf, max, "key")
        });
        match crossing {
            None => g.connect(
                self.stream.node,
                node,
                Partition::Hash,
                Some((Arc::new(sender), Arc::new(key_group))),
            ),
            Some((out, input)) => {
                g.connect(input, node, Partition::Forward, None);
                g.repartitions.push(PendingRepartition {
                    out,
                    input,
                    keyed: node,
                    bind: crate::plan::repartition::binder::<T, K, KF>(self.key_fn.clone()),
                    bound: None,
                });
            }
        }
        drop(g);
        Stream::new(self.stream.graph.clone(), node)
    }

    /// [`KeyedStream::process`] with a closure.
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// # use exactly_engine::testing::VecSource;
    /// # let job = Job::builder("d").checkpoint_storage("memory://").build().unwrap();
    /// const COUNT: ValueState<u64> = ValueState::new("count");
    /// let counts = job
    ///     .source("words", VecSource::new(vec!["a".to_string(), "a".to_string()]))
    ///     .key_by(|w| w.clone())
    ///     .process_fn(|w: String, ctx: &mut KeyedContext<'_, String, (String, u64)>| {
    ///         let n = ctx.value(COUNT)?.unwrap_or(0) + 1;
    ///         ctx.set_value(COUNT, &n)?;
    ///         ctx.emit((w, n));
    ///         Ok(())
    ///     });
    /// ```
    pub fn process_fn<O: Data>(
        &self,
        f: impl FnMut(T, &mut KeyedContext<'_, K, O>) -> std::result::Result<(), crate::api::BoxError>
            + Clone
            + Send
            + Sync
            + 'static,
    ) -> Stream<O> {
        self.process(ProcessFn::new(f))
    }

    /// The stream before keying.
    pub fn unkeyed(&self) -> &Stream<T> {
        &self.stream
    }

    /// The key function.
    pub fn key_fn(&self) -> &KF {
        &self.key_fn
    }
}
