//! The job: configuration, the graph being built, and `run()`.

use super::Stream;
use crate::api::{Repartitioner, Source};
use crate::driver::{self, JobSettings, RestartPolicy};
use crate::error::{Error, Result};
use crate::ids::{valid_name, OperatorId, NAME_RULE};
use crate::plan::repartition::DynRepartitioner;
use crate::plan::{SharedGraph, SourceNode};
use crate::report::{CheckpointStats, JobReport};
use crate::runtime::StopHandle;
use crate::state::StateBackend;
use crate::storage::CheckpointStorage;
use std::sync::Arc;
use std::time::Duration;

/// Configures a [`Job`]. Every setting has a default except the name.
pub struct JobBuilder {
    s: JobSettings,
    storage_url: Option<String>,
    repartitioner: Option<Arc<dyn DynRepartitioner>>,
}

impl JobBuilder {
    /// Take a checkpoint this often (default: only the final checkpoint).
    pub fn checkpoint_every(mut self, interval: Duration) -> Self {
        self.s.interval = Some(interval);
        self
    }

    /// Where checkpoints go: `file:///abs/dir`, a directory path, or `memory://`.
    /// Default: `./exactly-checkpoints/<job name>`.
    pub fn checkpoint_storage(mut self, url: impl Into<String>) -> Self {
        self.storage_url = Some(url.into());
        self
    }

    /// Use an already opened storage (e.g. one shared by tests).
    pub fn checkpoint_storage_instance(mut self, storage: CheckpointStorage) -> Self {
        self.s.storage = Some(storage);
        self
    }

    /// Default parallelism of every operator (default: the number of cores).
    pub fn parallelism(mut self, n: usize) -> Self {
        self.s.parallelism = n;
        self
    }

    /// Number of key groups; the upper bound for any keyed operator's parallelism.
    /// Fixed for the lifetime of the job's checkpoints (default 128).
    pub fn max_parallelism(mut self, n: u16) -> Self {
        self.s.max_parallelism = n;
        self
    }

    /// Completed checkpoints to keep (default 3).
    pub fn retain_checkpoints(mut self, n: usize) -> Self {
        self.s.retain = n;
        self
    }

    /// Restore even if the checkpoint holds state (keyed or operator state, source
    /// offsets, output pending commit) of an operator or sink this job no longer has,
    /// dropping that state. Without it such a restore is an error naming what has no
    /// place, since a renamed operator would otherwise silently start empty and a
    /// renamed source read its input again from the start. Set it for the one run that
    /// removes an operator on purpose.
    pub fn allow_non_restored_state(mut self) -> Self {
        self.s.allow_non_restored_state = true;
        self
    }

    /// Start this deployment from savepoint `name` in the job's checkpoint storage (one
    /// taken with [`StopHandle::stop_with_savepoint`]): the way to deploy a new version
    /// of a job. The run fails unless the savepoint exists and is the newest checkpoint,
    /// or the newest checkpoint descends from it (a restart of this deployment, which
    /// resumes from its own latest checkpoint, so keeping the setting is safe). Restoring
    /// an older savepoint over checkpoints taken after it would commit their output
    /// again, so that is refused.
    ///
    /// The state is checked as on every restore: state of an operator the job no
    /// longer has is an error (see [`Stream::restore_state_of`] for renames and
    /// [`JobBuilder::allow_non_restored_state`] for removals), and a state whose type
    /// changed needs a migration (see [`ValueState::migrate_from`]).
    ///
    /// [`Stream::restore_state_of`]: crate::dsl::Stream::restore_state_of
    /// [`ValueState::migrate_from`]: crate::state::ValueState::migrate_from
    pub fn restore_from_savepoint(mut self, name: &str) -> Self {
        self.s.restore_from_savepoint = Some(name.to_string());
        self
    }

    /// Serve the job's metrics (see [`crate::telemetry`]) for Prometheus at
    /// `http://<addr>/metrics`, e.g. `127.0.0.1:9464` (bind to 127.0.0.1 unless the
    /// port is meant to be reachable from other machines). The exporter is installed
    /// once per process, as the process's `metrics` recorder; every job of the process
    /// must name the same address. Without this, metrics go to whatever recorder the
    /// application installed, if any.
    #[cfg(feature = "prometheus")]
    pub fn prometheus_endpoint(mut self, addr: std::net::SocketAddr) -> Self {
        self.s.prometheus = Some(addr);
        self
    }

    /// Keep the checkpoint of any stop (a [`StopHandle`], or SIGTERM/Ctrl-C with
    /// [`JobBuilder::stop_on_sigterm`]) as savepoint `name`, as
    /// [`StopHandle::stop_with_savepoint`] does: a deployment script stops the running
    /// version with a signal and starts the next one with
    /// [`JobBuilder::restore_from_savepoint`]. A name given to the stop itself wins.
    pub fn savepoint_on_stop(mut self, name: &str) -> Self {
        self.s.savepoint_on_stop = Some(name.to_string());
        self
    }

    /// Restart policy (default: [`RestartPolicy::default`], exponential backoff).
    pub fn restart_policy(mut self, p: RestartPolicy) -> Self {
        self.s.restart = p;
        self
    }

    /// Abort a checkpoint not complete after this long (default 10 min).
    pub fn checkpoint_timeout(mut self, d: Duration) -> Self {
        self.s.timeout = d;
        self
    }

    /// Failed checkpoints in a row tolerated before the job restarts (default 3).
    pub fn tolerable_checkpoint_failures(mut self, n: u32) -> Self {
        self.s.tolerable_failures = n;
        self
    }

    /// Records per batch between operators (default 1024).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.s.batch_size = n;
        self
    }

    /// Batches buffered per channel between tasks (default 16). Aligned barriers wait
    /// behind buffered records, so under backpressure smaller buffers make checkpoints
    /// faster at some cost in throughput. On the reconciliation job here, 4 instead of
    /// 16 roughly halved checkpoint duration (250-560 ms vs 550-1,200 ms) and ran
    /// 5-15 % slower.
    pub fn channel_capacity(mut self, batches: usize) -> Self {
        self.s.channel_capacity = batches;
        self
    }

    /// Longest time a partial batch waits before it is sent (default 10 ms).
    pub fn buffer_timeout(mut self, d: Duration) -> Self {
        self.s.buffer_timeout = d;
        self
    }

    /// Called on the driver thread after every completed checkpoint (progress display).
    pub fn on_checkpoint(mut self, f: impl Fn(&CheckpointStats) + Send + Sync + 'static) -> Self {
        self.s.on_checkpoint = Some(Arc::new(f));
        self
    }

    /// Checkpoint **at least once** instead of exactly once: barriers are not aligned.
    /// A task with several inputs keeps reading an input that delivered a checkpoint's
    /// barrier while it waits for the barrier on the others, so records keep flowing on
    /// the inputs whose barrier arrived. It does not make checkpoints shorter: a barrier
    /// still waits behind the records queued before it (measured on the reconciliation
    /// benchmark, see the README). The price:
    /// the snapshot can include records that come after the barrier, and after a
    /// failure the restored job processes them again, so state and committed output may
    /// hold **duplicates** (never losses: every record before a barrier is in its
    /// checkpoint). Sinks still stage at the barrier and commit after the checkpoint.
    /// Tasks with a single input (every task of a job without `union`, joins or
    /// re-partitioning with several upstream subtasks) behave as before.
    pub fn at_least_once(mut self) -> Self {
        self.s.at_least_once = true;
        self
    }

    /// Let a checkpoint go **unaligned** once it has been in progress at a task for
    /// `timeout`, counted from the moment the task heard of it (`Duration::ZERO`: always
    /// unaligned; default: always aligned).
    ///
    /// An aligned barrier waits behind every record queued in the channels in front of
    /// it, so under backpressure a checkpoint takes as long as the backlog takes to
    /// process. An unaligned one overtakes that backlog: the driver announces each
    /// triggered checkpoint to every task on a priority lane (and senders announce their
    /// barriers there), the task snapshots as soon as it switches, forwards the barrier
    /// at once, and stores with the checkpoint the records it overtook (every record
    /// read from an input between the snapshot and that input's barrier). A restore
    /// replays them before new input, so the guarantee is still exactly once, also at
    /// another parallelism (records of keyed inputs go to the subtask owning their key
    /// group), as long as the tasks stay the same: an operator that a parallelism change
    /// chains into another task has no input to replay into, and the restore is refused.
    /// The final checkpoint, stops and savepoints are always aligned.
    ///
    /// The price: checkpoints grow by the records in flight (what the channels held when
    /// the task switched, [`JobBuilder::channel_capacity`] batches per channel, plus what
    /// the senders emit before their barriers; reported as
    /// `CheckpointStats::inflight_bytes`), those records are encoded and held in memory
    /// while a checkpoint is being taken, and record types must be serializable (every
    /// stream's type is, see [`crate::api::Data`]). A record in flight is replayed before
    /// event time advances after a restore, so one that came late in the interrupted run
    /// may count as on time: with late data, results can differ from an uninterrupted
    /// run as they can with any change of arrival order; nothing is lost or doubled.
    pub fn aligned_checkpoint_timeout(mut self, timeout: Duration) -> Self {
        self.s.aligned_timeout = Some(timeout);
        self
    }

    /// Always take unaligned checkpoints: `aligned_checkpoint_timeout(Duration::ZERO)`.
    pub fn unaligned_checkpoints(self) -> Self {
        self.aligned_checkpoint_timeout(Duration::ZERO)
    }

    /// Fault injection for tests: once the `n`-th checkpoint of an attempt completed,
    /// the sources fail the attempt, as a crash in the middle of the stream would (a
    /// source that already stopped for a savepoint ignores it). The driver tells the
    /// sources on their control channel, so a job without it checks nothing per batch. Used by [`crate::testing::ExactlyOnceCheck`].
    pub fn inject_failure_after_checkpoint(mut self, n: u64) -> Self {
        self.s.inject_failure_after = Some(n);
        self
    }

    /// Sleep this long after every batch a source reads: slows a job down so tests and
    /// demos can crash it mid-stream. Off by default.
    pub fn source_pacing(mut self, pause: Duration) -> Self {
        self.s.pacing.pause = Some(pause);
        self
    }

    /// For tests: each source split reads at most `batches` batches, then nothing more
    /// until a checkpoint completes. A crash injected after checkpoint `n`
    /// ([`inject_failure_after_checkpoint`](Self::inject_failure_after_checkpoint))
    /// then lands before a split's `(n + 1) · batches + 1`-th batch however fast the
    /// machine is, so a test with more input than that crashes mid-stream every time,
    /// with no sleeping and no retries. Needs periodic checkpoints. Off by default.
    pub fn source_batches_per_checkpoint(mut self, batches: u32) -> Self {
        self.s.pacing.batches_per_checkpoint = Some(batches.max(1));
        self
    }

    /// The keyed state backend (default [`StateBackend::Memory`]).
    ///
    /// ```
    /// # use exactly_engine::prelude::*;
    /// use exactly_engine::state::StateBackend;
    /// let job = Job::builder("balances").state_backend(StateBackend::rocksdb());
    /// ```
    pub fn state_backend(mut self, backend: StateBackend) -> Self {
        self.s.backend = backend;
        self
    }

    /// The clock the job's time comes from (default: the system clock for processing
    /// time, the monotonic clock for the checkpoint protocol). A clock set here drives
    /// both: processing-time timers, and when periodic checkpoints are triggered and
    /// time out. Tests pass a [`crate::testing::ManualClock`] and advance it to make
    /// timers fire and checkpoints come exactly when they say.
    pub fn clock(mut self, clock: impl crate::time::Clock) -> Self {
        self.s.clock = Arc::new(clock);
        self
    }

    /// Stop with a checkpoint on SIGTERM or SIGINT (Ctrl-C) while [`Job::run`] runs:
    /// as [`StopHandle::stop`] does. A second signal ends the process at once (exit
    /// code 1), as a crash would: the restart resumes from the latest checkpoint.
    pub fn stop_on_sigterm(mut self) -> Self {
        self.s.stop_on_signals = true;
        self
    }

    /// Run as instance `index` of `count` copies of this binary (default: 0 of 1, one
    /// process). Every instance builds the same job; instance `index` runs its share of
    /// every operator (subtasks `index * p .. (index + 1) * p` of `count * p`, with `p`
    /// this process's [`JobBuilder::parallelism`]): those subtasks' source splits and
    /// key groups. Each instance checkpoints on its own, under `instances/<index>/` of
    /// the checkpoint storage, with its own lease; a `key_by` reaches the instance that
    /// owns the key through [`JobBuilder::repartition_through`], which a job with more
    /// than one instance and a `key_by` needs. Sinks see the job name as
    /// `<name>@<index>`, so each instance's transactional ids and staged output are its
    /// own. Every instance must be started with the same `count` and parallelism.
    pub fn instance(mut self, index: usize, count: usize) -> Self {
        self.s.instance = crate::ids::Instance { index, count };
        self
    }

    /// [`JobBuilder::instance`] from the environment: `EXACTLY_INSTANCES` (the count;
    /// unset: one instance) and `EXACTLY_INSTANCE` (the index), or, without it, the
    /// ordinal that ends the host name (`ledger-2` is 2, as the pods of a Kubernetes
    /// StatefulSet are named).
    pub fn instance_from_env(self) -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok();
        match instance_from(
            var("EXACTLY_INSTANCES").as_deref(),
            var("EXACTLY_INSTANCE").as_deref(),
            var("HOSTNAME").as_deref(),
        )? {
            Some(i) => Ok(self.instance(i.index, i.count)),
            None => Ok(self),
        }
    }

    /// How a `key_by` crosses instances when the job runs as several
    /// ([`JobBuilder::instance`]): a topic per keyed operator with one partition per key
    /// group (`exactly::kafka_repartition::KafkaRepartition` for Kafka). Ignored when
    /// the job runs as one instance, whose exchanges stay in memory.
    pub fn repartition_through(mut self, repartitioner: impl Repartitioner) -> Self {
        self.repartitioner = Some(Arc::new(repartitioner));
        self
    }

    /// Validate the settings and create the job.
    pub fn build(mut self) -> Result<Job> {
        let s = &self.s;
        if !valid_name(&s.name) {
            return Err(Error::config(format!(
                "job name '{}' must be {NAME_RULE}",
                s.name.escape_debug()
            )));
        }
        if s.parallelism == 0 {
            return Err(Error::config("parallelism must be at least 1"));
        }
        if s.max_parallelism == 0 || s.max_parallelism > 32768 {
            return Err(Error::config("max_parallelism must be between 1 and 32768"));
        }
        if s.batch_size == 0 {
            return Err(Error::config("batch_size must be at least 1"));
        }
        if s.at_least_once && s.aligned_timeout.is_some() {
            return Err(Error::config(
                "at_least_once() and unaligned checkpoints (aligned_checkpoint_timeout) are \
                 alternatives: at least once never aligns, unaligned checkpoints stay exactly \
                 once; choose one",
            ));
        }
        if s.channel_capacity == 0 {
            return Err(Error::config("channel_capacity must be at least 1 batch"));
        }
        if s.retain == 0 {
            return Err(Error::config(
                "retain_checkpoints must be at least 1: the latest checkpoint is the restore point",
            ));
        }
        if s.interval.is_some_and(|i| i.is_zero()) {
            return Err(Error::config(
                "checkpoint interval must be greater than zero",
            ));
        }
        if let StateBackend::RocksDb(cfg) = &s.backend {
            if !cfg!(feature = "rocksdb") {
                return Err(Error::config(
                    "the RocksDB state backend needs the `rocksdb` feature of `exactly` (or `exactly-engine`); it is opt-in",
                ));
            }
            if cfg.write_buffer_size < (1 << 20) {
                return Err(Error::config(
                    "RocksDB write_buffer_size must be at least 1 MiB",
                ));
            }
        }
        let instance = self.s.instance;
        if instance.count == 0 || instance.index >= instance.count {
            return Err(Error::config(format!(
                "instance {} of {}: the index must be below the number of instances",
                instance.index, instance.count
            )));
        }
        if instance.count > 1
            && instance.count.saturating_mul(self.s.parallelism)
                > usize::from(self.s.max_parallelism)
        {
            return Err(Error::config(format!(
                "{} instances of parallelism {} make more subtasks than the job's {} key \
                 groups (max_parallelism): lower the parallelism per instance, or raise \
                 max_parallelism for a new job",
                instance.count, self.s.parallelism, self.s.max_parallelism
            )));
        }
        if self.s.storage.is_none() {
            let url = self
                .storage_url
                .take()
                .unwrap_or_else(|| format!("exactly-checkpoints/{}", self.s.name));
            self.s.storage = Some(CheckpointStorage::from_url(&url)?);
        }
        let graph = SharedGraph::default();
        if instance.count > 1 {
            let storage = self.s.storage.take().expect("set above");
            self.s.storage = Some(storage.child(&format!("instances/{}", instance.index)));
            self.s.root_storage = Some(storage);
            graph.lock().repartitioner = self.repartitioner.take();
        }
        Ok(Job {
            settings: self.s,
            graph,
        })
    }
}

/// The instance the variables `EXACTLY_INSTANCES`, `EXACTLY_INSTANCE` and `HOSTNAME`
/// name (see [`JobBuilder::instance_from_env`]); `None` without a count.
fn instance_from(
    count: Option<&str>,
    index: Option<&str>,
    host: Option<&str>,
) -> Result<Option<crate::ids::Instance>> {
    fn set(v: Option<&str>) -> Option<&str> {
        v.map(str::trim).filter(|v| !v.is_empty())
    }
    let Some(count) = set(count) else {
        return Ok(None);
    };
    let count: usize = count.parse().map_err(|_| {
        Error::config(format!(
            "EXACTLY_INSTANCES='{count}' is not a number of instances"
        ))
    })?;
    let index = match set(index) {
        Some(i) => i.parse().map_err(|_| {
            Error::config(format!("EXACTLY_INSTANCE='{i}' is not an instance index"))
        })?,
        None => {
            let host = set(host).unwrap_or_default();
            host.rsplit_once('-')
                .and_then(|(_, n)| n.parse().ok())
                .ok_or_else(|| {
                    Error::config(format!(
                        "EXACTLY_INSTANCES is set but EXACTLY_INSTANCE is not, and the host name \
                         '{host}' does not end in an ordinal (`name-<n>`, as a StatefulSet's \
                         pods): set EXACTLY_INSTANCE"
                    ))
                })?
        }
    };
    Ok(Some(crate::ids::Instance { index, count }))
}

/// A job started with [`Job::start`], running on its own thread.
#[derive(Debug)]
pub struct JobHandle {
    stop: StopHandle,
    latest: Arc<std::sync::Mutex<Option<CheckpointStats>>>,
    live: Arc<std::sync::Mutex<Arc<crate::metrics::Metrics>>>,
    thread: std::thread::JoinHandle<Result<JobReport>>,
}

impl JobHandle {
    /// Ask the job to stop with a checkpoint (see [`StopHandle::stop`]); returns at
    /// once, [`JobHandle::wait`] returns the report once the checkpoint is committed.
    pub fn stop_with_checkpoint(&self) {
        self.stop.stop();
    }

    /// Ask the job to stop with a checkpoint kept as savepoint `name` (see
    /// [`StopHandle::stop_with_savepoint`]).
    pub fn stop_with_savepoint(&self, name: &str) {
        self.stop.stop_with_savepoint(name);
    }

    /// Cancel the job without a checkpoint (see [`StopHandle::cancel`]); returns at
    /// once, [`JobHandle::wait`] then returns [`Error::JobCancelled`].
    pub fn cancel(&self) {
        self.stop.cancel();
    }

    /// A handle to stop the job from elsewhere (another thread, a signal handler).
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Take savepoint `name` while the job keeps running: a checkpoint is triggered at
    /// once (or right after the one in flight) and kept under that name; returns its
    /// id once its manifest and the savepoint are written. Retention never deletes it
    /// (`exactly savepoints delete` does). Fails if the name is invalid or taken, if
    /// that checkpoint is aborted (ask again), or if the job ends first.
    ///
    /// Restoring it with `restore_from_savepoint` is refused while newer checkpoints of
    /// the same location exist (their output is committed, and restoring the older
    /// state would commit it again): it is a point to inspect, verify, or come back to
    /// after the newer checkpoints are removed on purpose. To deploy a new version, stop
    /// with a savepoint ([`JobHandle::stop_with_savepoint`]).
    pub fn savepoint(&self, name: &str) -> Result<crate::ids::CheckpointId> {
        self.ask_checkpoint(Some(name))
    }

    /// Take a checkpoint now (or right after the one in flight) and return its id once
    /// its manifest is written: the job restores from it or a later one, and its sinks'
    /// output is committed right after, on the commit lane. For a maintenance step that
    /// wants a fresh restore point, and for tests that need a checkpoint at a known
    /// point of the input instead of waiting for the interval. Fails if that checkpoint
    /// is aborted (ask again) or the job ends first.
    pub fn checkpoint(&self) -> Result<crate::ids::CheckpointId> {
        self.ask_checkpoint(None)
    }

    fn ask_checkpoint(&self, name: Option<&str>) -> Result<crate::ids::CheckpointId> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.stop.request_checkpoint(name, reply);
        loop {
            match answer.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(result) => return result,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) if !self.is_finished() => {}
                Err(_) => {
                    return answer.try_recv().unwrap_or_else(|_| {
                        Err(Error::config(match name {
                            Some(name) => {
                                format!("the job ended before savepoint '{name}' was taken")
                            }
                            None => "the job ended before the checkpoint was taken".to_string(),
                        }))
                    })
                }
            }
        }
    }

    /// Every counter's value now (e.g. `<source>.records`, read so far, including
    /// records read again after a restart), by `operator.name`; empty before the job
    /// has started. For a progress display; [`JobHandle::last_checkpoint`] has the
    /// values as of the latest committed output.
    pub fn metrics(&self) -> std::collections::BTreeMap<String, u64> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .snapshot()
    }

    /// The latest checkpoint completed (its output committed) so far, with every
    /// counter's value at that moment ([`CheckpointStats::metrics`]); `None` before the
    /// first.
    pub fn last_checkpoint(&self) -> Option<CheckpointStats> {
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the job has ended (its report is ready).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Wait for the job to end: its report, or why it failed.
    pub fn wait(self) -> Result<JobReport> {
        self.thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// A pipeline and its configuration. Add sources with [`Job::source`], then run it.
/// `Send`: it can be built on one thread and run on another ([`Job::start`]).
pub struct Job {
    settings: JobSettings,
    graph: SharedGraph,
}

impl Job {
    /// Start configuring a job called `name`. The name identifies the job's checkpoints.
    pub fn builder(name: &str) -> JobBuilder {
        JobBuilder {
            s: JobSettings {
                name: name.to_string(),
                interval: None,
                storage: None,
                parallelism: std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
                max_parallelism: 128,
                retain: 3,
                restart: RestartPolicy::default(),
                timeout: Duration::from_secs(600),
                tolerable_failures: 3,
                batch_size: 1024,
                buffer_timeout: Duration::from_millis(10),
                channel_capacity: 16,
                on_checkpoint: None,
                clock: Arc::new(crate::time::SystemClock),
                inject_failure_after: None,
                pacing: Default::default(),
                at_least_once: false,
                aligned_timeout: None,
                backend: StateBackend::Memory,
                allow_non_restored_state: false,
                restore_from_savepoint: None,
                savepoint_on_stop: None,
                #[cfg(feature = "prometheus")]
                prometheus: None,
                stop: StopHandle::default(),
                latest: Default::default(),
                live: Default::default(),
                stop_on_signals: false,
                instance: crate::ids::Instance::SINGLE,
                root_storage: None,
            },
            storage_url: None,
            repartitioner: None,
        }
    }

    /// Add a source named `name`; its offsets are checkpointed under that name.
    pub fn source<S: Source>(&self, name: &str, source: S) -> Stream<S::Item> {
        let mut g = self.graph.lock();
        let node = g.add_node(OperatorId(name.to_string()));
        // Pacing wraps the source only when asked for: the production path stays free
        // of test knobs.
        g.nodes[node].source = if self.settings.pacing.is_off() {
            Some(Arc::new(SourceNode {
                source: Arc::new(source),
            }))
        } else {
            Some(Arc::new(SourceNode {
                source: Arc::new(crate::plan::paced::Paced {
                    inner: source,
                    pacing: self.settings.pacing,
                }),
            }))
        };
        drop(g);
        Stream::new(self.graph.clone(), node)
    }

    /// Run to completion. Resumes from the latest completed checkpoint if there is one;
    /// when every source is exhausted, takes and commits a final checkpoint, then
    /// returns. Task failures restart the job from its latest checkpoint under the
    /// restart policy.
    ///
    /// `run` blocks the calling thread. Called from inside a tokio runtime (an async
    /// `main`), it runs the job on a thread of its own, since the engine's I/O runtime
    /// cannot be nested in the caller's; the calling thread still waits, so in async code
    /// call it from `tokio::task::spawn_blocking` or a thread of its own where that
    /// matters.
    pub fn run(&self) -> Result<JobReport> {
        let mut graph = self.graph.lock();
        if tokio::runtime::Handle::try_current().is_err() {
            return driver::run(&mut graph, &self.settings);
        }
        let (graph, settings) = (&mut *graph, &self.settings);
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name(format!("{}-driver", settings.name))
                .spawn_scoped(scope, move || driver::run(graph, settings))
                .map_err(|e| Error::io("spawning the job's driver thread", e))?
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Start the job on a thread of its own and return at once with a handle to stop it
    /// and wait for its report. Works from sync and async code alike.
    pub fn start(self) -> Result<JobHandle> {
        let stop = self.stop_handle();
        let latest = self.settings.latest.clone();
        let live = self.settings.live.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{}-job", self.settings.name))
            .spawn(move || self.run())
            .map_err(|e| Error::io("spawning the job's thread", e))?;
        Ok(JobHandle {
            stop,
            latest,
            live,
            thread,
        })
    }

    /// [`Job::run`] for async code: runs on a blocking thread of the caller's tokio
    /// runtime (`spawn_blocking`), so the caller's tasks go on meanwhile. Must be awaited
    /// inside a tokio runtime.
    pub async fn run_async(self) -> Result<JobReport> {
        match tokio::task::spawn_blocking(move || self.run()).await {
            Ok(report) => report,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(Error::Cancelled),
        }
    }

    /// A handle that stops this job with a checkpoint, from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.settings.stop.clone()
    }

    /// Which of the job's processes this is ([`JobBuilder::instance`]).
    pub fn instance(&self) -> crate::ids::Instance {
        self.settings.instance
    }

    /// The checkpoint storage of this job (this instance's, for a job that runs as
    /// several).
    pub fn storage(&self) -> &CheckpointStorage {
        self.settings
            .storage
            .as_ref()
            .expect("storage is set by build()")
    }
}

// `Job`, its streams and its handle can move to another thread: checked at compile time.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Job>();
    send::<super::Stream<u32>>();
    send::<JobHandle>();
};

#[cfg(test)]
mod tests {
    use super::instance_from;
    use crate::ids::Instance;

    #[test]
    fn the_instance_comes_from_the_variables_or_the_host_name() {
        let i = |index, count| Some(Instance { index, count });
        assert_eq!(instance_from(None, Some("2"), Some("x-1")).unwrap(), None);
        assert_eq!(instance_from(Some(" "), None, None).unwrap(), None);
        assert_eq!(
            instance_from(Some("3"), Some("2"), Some("x-1")).unwrap(),
            i(2, 3)
        );
        assert_eq!(
            instance_from(Some("3"), None, Some("ledger-1")).unwrap(),
            i(1, 3)
        );
        assert_eq!(
            instance_from(Some("3"), Some(""), Some("my-job-0")).unwrap(),
            i(0, 3)
        );
        for (count, index, host) in [
            (Some("three"), Some("0"), None),
            (Some("3"), Some("first"), None),
            (Some("3"), None, Some("ledger")),
            (Some("3"), None, None),
        ] {
            let e = instance_from(count, index, host).unwrap_err().to_string();
            assert!(e.contains("EXACTLY_INSTANCE"), "{e}");
        }
    }
}
