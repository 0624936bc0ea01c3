//! Runs a job: recovery, task threads, the checkpoint coordinator loop, restarts.
//!
//! # Protocol
//!
//! 1. **Recover.** Scan checkpoint storage. If a manifest exists, read the newest one and
//!    every state file it names, verifying sizes and checksums; any mismatch is a
//!    [`Error::CorruptCheckpoint`] that stops the job (falling back to an older checkpoint
//!    would commit output twice).
//! 2. **Settle sinks.** Each sink re-commits the committables recorded in that manifest
//!    (idempotent) and aborts everything else it staged, reporting the highest checkpoint
//!    id among its staged artifacts.
//! 3. **Pick ids.** The first checkpoint id of this attempt is above every id seen in
//!    storage, in the manifest and in staged sink artifacts.
//! 4. **Run.** One thread per task instance; the driver thread runs the coordinator. On
//!    [`Decision::Complete`] it writes the manifest (the commit point) and hands the
//!    pending committables to the commit lane (`committer.rs`), which commits them and
//!    applies retention on its own thread while the next checkpoint runs.
//! 5. **Finish.** When every source has ended, the final checkpoint is taken and
//!    committed before `run()` returns.
//!
//! # Failure and recovery
//!
//! Any task error or panic cancels every task of the attempt; once all threads have
//! exited the job restarts from step 1, under its [`RestartPolicy`]. Errors classified
//! [`ErrorClass::Stop`] end the job at once. A commit that fails after its manifest is
//! written stays pending and is retried with the next checkpoint; a commit whose staged
//! output is gone ([`Error::CommitLost`]) stops the job, because that is data loss.

mod committer;
mod restart;
mod restore;

pub use restart::RestartPolicy;

use crate::coordinator::{CheckpointCoordinator, CoordinatorConfig, Decision, TaskKey};
use crate::error::{Error, ErrorClass, Result};
use crate::ids::{CheckpointId, OperatorId};
use crate::manifest::{Manifest, Savepoint, MANIFEST_FORMAT_VERSION};
use crate::plan::{BuildCtx, ChannelPool, Graph, NodeId, Plan, RestoredState, SplitLists};
use crate::report::{push_recent, CheckpointStats, JobReport, REPORTED_CHECKPOINTS};
use crate::runtime::{RuntimeConfig, SourceControl, TaskEnv, TaskEvent};
use crate::state::TaskSnapshotPayload;
use crate::storage::CheckpointStorage;
use committer::{CommitJob, Committer};
use crossbeam_channel::{RecvTimeoutError, Sender};
use restart::{starting, RestartBudget};
use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Progress callback run after each completed checkpoint.
pub(crate) type CheckpointCallback = Arc<dyn Fn(&CheckpointStats) + Send + Sync>;

/// Job settings, as configured through `JobBuilder`.
#[derive(Clone)]
pub(crate) struct JobSettings {
    pub name: String,
    pub interval: Option<Duration>,
    pub storage: Option<CheckpointStorage>,
    pub parallelism: usize,
    pub max_parallelism: u16,
    pub retain: usize,
    pub restart: RestartPolicy,
    pub timeout: Duration,
    pub tolerable_failures: u32,
    pub batch_size: usize,
    pub buffer_timeout: Duration,
    pub channel_capacity: usize,
    pub on_checkpoint: Option<CheckpointCallback>,
    pub clock: Arc<dyn crate::time::Clock>,
    pub inject_failure_after: Option<u64>,
    /// Test and demo knobs that slow sources down (off: sources read unwrapped).
    pub pacing: crate::plan::paced::Pacing,
    /// Checkpoints without alignment (see `JobBuilder::at_least_once`).
    pub at_least_once: bool,
    /// Alignment timeout before a checkpoint goes unaligned (see
    /// `JobBuilder::aligned_checkpoint_timeout`); `None`: always aligned.
    pub aligned_timeout: Option<Duration>,
    pub backend: crate::state::StateBackend,
    pub allow_non_restored_state: bool,
    /// The savepoint a new deployment starts from.
    pub restore_from_savepoint: Option<String>,
    /// The savepoint every stop checkpoint is kept as.
    pub savepoint_on_stop: Option<String>,
    /// Where to serve metrics for Prometheus.
    #[cfg(feature = "prometheus")]
    pub prometheus: Option<std::net::SocketAddr>,
    pub stop: crate::runtime::StopHandle,
    /// The latest completed checkpoint, for a [`crate::dsl::JobHandle`].
    pub latest: Arc<std::sync::Mutex<Option<CheckpointStats>>>,
    /// The running job's counters, for a [`crate::dsl::JobHandle`].
    pub live: Arc<std::sync::Mutex<Arc<crate::metrics::Metrics>>>,
    /// SIGTERM and SIGINT stop the job with a checkpoint while it runs.
    pub stop_on_signals: bool,
    /// Which of the job's processes this is.
    pub instance: crate::ids::Instance,
    /// The checkpoint location of the whole job, where `storage` is this instance's
    /// part of it (`instances/<i>/`); `None` for a job in one process.
    pub root_storage: Option<CheckpointStorage>,
}

impl JobSettings {
    /// The job name sinks see: the job's own, with `@<instance>` when it runs as several
    /// processes, so that each instance's transactional ids, staged output and commit
    /// records are its own (each has its own checkpoint location and lease).
    pub fn connector_job(&self) -> String {
        if self.instance.count > 1 {
            format!("{}@{}", self.name, self.instance.index)
        } else {
            self.name.clone()
        }
    }
}

pub(crate) fn run(graph: &mut Graph, s: &JobSettings) -> Result<JobReport> {
    // First, so that a stop asked while the job starts (an orchestrator's SIGTERM to a
    // process still connecting to its systems) is a stop with a checkpoint, not a kill.
    let _signals = if s.stop_on_signals {
        Some(SignalStop::install(&s.stop)?)
    } else {
        None
    };
    crate::plan::repartition::bind(
        graph,
        &s.name,
        (s.max_parallelism, s.parallelism),
        s.instance,
        s.restore_from_savepoint.as_deref(),
    )?;
    let graph: &Graph = graph;
    validate(graph, s)?;
    #[cfg(feature = "prometheus")]
    if let Some(addr) = s.prometheus {
        crate::telemetry::install_prometheus(addr)?;
    }
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("{}-io", s.name))
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the job's I/O runtime", e))?;
    let storage = s
        .storage
        .clone()
        .ok_or_else(|| Error::config("no checkpoint storage"))?;
    // Storage that does not answer at start is retried like a failure while running.
    let lease = starting(s, || {
        rt.block_on(async {
            storage.check_access().await?;
            storage.acquire_lease().await
        })
    })?;
    let local_dir = local_state_dir(s, &storage);
    #[cfg(feature = "rocksdb")]
    if matches!(s.backend, crate::state::StateBackend::RocksDb(_)) {
        crate::state::rocks::prepare_local_dir(&local_dir)?;
    }
    let mut report = JobReport::default();
    let metrics = Arc::new(crate::metrics::Metrics::default());
    *s.live
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = metrics.clone();
    let run = RunContext {
        graph,
        s,
        rt: &rt,
        storage: &storage,
        metrics: &metrics,
        lease,
        local_dir,
        completed: Arc::new(AtomicU64::new(0)),
    };
    let mut budget = RestartBudget::new(s);
    loop {
        let attempt = report.restarts;
        let completed_before = run.completed.load(Ordering::SeqCst);
        let attempt_started = Instant::now();
        match run_attempt(&run, &mut report, attempt == 0) {
            Ok(()) => {
                report.elapsed = started.elapsed();
                report.metrics = metrics.snapshot();
                crate::telemetry::counters(&s.name, &report.metrics);
                // Finished: the local copies only served a restart of this run.
                #[cfg(feature = "rocksdb")]
                if matches!(s.backend, crate::state::StateBackend::RocksDb(_)) {
                    crate::state::rocks::remove_local_dir(&run.local_dir);
                }
                return Ok(report);
            }
            Err(e) if e.class() == ErrorClass::Stop => return Err(e),
            Err(_) if s.stop.is_cancelled() => {
                return Err(Error::JobCancelled {
                    job: s.name.clone(),
                })
            }
            Err(e) => {
                // Progress since the last restart: a checkpoint, and long enough.
                if run.completed.load(Ordering::SeqCst) > completed_before
                    && attempt_started.elapsed() >= s.restart.healthy_after
                {
                    budget.reset();
                }
                budget.wait_or_give_up(e, "task failed; restarting from the latest checkpoint")?;
                report.restarts += 1;
                crate::telemetry::restarted(&s.name);
            }
        }
    }
}

/// What a request asked for, in messages: a savepoint or a checkpoint.
fn asked(req: &crate::runtime::CheckpointRequest) -> String {
    match &req.name {
        Some(name) => format!("savepoint '{name}'"),
        None => "the checkpoint asked for".to_string(),
    }
}

/// SIGTERM and SIGINT handlers that ask for a stop with a checkpoint, removed when
/// dropped. A signal that finds the stop already asked ends the process (exit code 1).
struct SignalStop(Vec<signal_hook::SigId>);

impl SignalStop {
    fn install(stop: &crate::runtime::StopHandle) -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut ids = Vec::new();
        for sig in [SIGTERM, SIGINT] {
            // First the exit (it checks the flag before the second handler sets it).
            let exit =
                signal_hook::flag::register_conditional_shutdown(sig, 1, stop.flag().clone());
            let set = signal_hook::flag::register(sig, stop.flag().clone());
            for id in [exit, set] {
                ids.push(id.map_err(|e| Error::io("installing the SIGTERM/SIGINT handler", e))?);
            }
        }
        Ok(SignalStop(ids))
    }
}

impl Drop for SignalStop {
    fn drop(&mut self) {
        for id in self.0.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

fn validate(graph: &Graph, s: &JobSettings) -> Result<()> {
    if !graph.errors.is_empty() {
        return Err(Error::config(graph.errors.join("; ")));
    }
    if s.pacing.batches_per_checkpoint.is_some() && s.interval.is_none() {
        return Err(Error::config(
            "source_batches_per_checkpoint needs periodic checkpoints (checkpoint_every): \
             without them the sources would wait for a checkpoint that never comes",
        ));
    }
    let mut seen = HashSet::new();
    let mut locations: std::collections::HashMap<&str, &OperatorId> = Default::default();
    for n in &graph.nodes {
        if let Some(loc) = &n.sink_location {
            if let Some(other) = locations.insert(loc, &n.op) {
                return Err(Error::config(format!(
                    "sinks '{other}' and '{}' both write to {loc}; each would take the \
                     other's files for its own (overwriting or deleting them): give each \
                     sink its own location",
                    n.op
                )));
            }
        }
    }
    for n in &graph.nodes {
        if !crate::ids::valid_name(&n.op.0) {
            return Err(Error::config(format!(
                "operator name '{}' must be {}",
                n.op.0.escape_debug(),
                crate::ids::NAME_RULE
            )));
        }
        if n.unnamed_state {
            return Err(Error::config(format!(
                "stateful operator '{}' has no name: call .name(\"...\") on it. Its state is \
                 stored under its name, and the generated one changes when operators are \
                 added before it, which would restore the state into another operator or none",
                n.op
            )));
        }
        if !seen.insert(n.op.clone()) {
            return Err(Error::config(format!(
                "two operators are named '{}'; names identify state in checkpoints and must be unique",
                n.op
            )));
        }
        if let Some(old) = &n.restores {
            if !crate::ids::valid_name(&old.0) {
                return Err(Error::config(format!(
                    "operator '{}' restores the state of '{}', which is not a valid name ({})",
                    n.op,
                    old.0.escape_debug(),
                    crate::ids::NAME_RULE
                )));
            }
            if let Some(other) = graph.nodes.iter().find(|o| &o.op == old && o.op != n.op) {
                return Err(Error::config(format!(
                    "operator '{}' restores the state of '{old}', but the job has an operator \
                     named '{}': each operator's state goes to one operator",
                    n.op, other.op
                )));
            }
            if n.sink.is_some() {
                return Err(Error::config(format!(
                    "sink '{}': restore_state_of is for operators and sources; a sink's output \
                     pending commit stays with its name. Stop the job with a checkpoint (which \
                     commits everything), then rename the sink",
                    n.op
                )));
            }
            if let Some(twice) = graph
                .nodes
                .iter()
                .find(|o| o.op != n.op && o.restores.as_ref() == Some(old))
            {
                return Err(Error::config(format!(
                    "operators '{}' and '{}' both restore the state of '{old}'",
                    n.op, twice.op
                )));
            }
        }
        if let Some(p) = n.parallelism {
            if p == 0 || p > s.max_parallelism as usize {
                return Err(Error::config(format!(
                    "operator '{}' has parallelism {p}; it must be between 1 and max_parallelism ({})",
                    n.op, s.max_parallelism
                )));
            }
        }
        if let Some(src) = &n.source {
            if !src.replayable() {
                return Err(Error::NotReplayable {
                    operator: n.op.clone(),
                });
            }
        }
    }
    if s.parallelism > s.max_parallelism as usize {
        return Err(Error::config(format!(
            "parallelism {} exceeds max_parallelism {}",
            s.parallelism, s.max_parallelism
        )));
    }
    if !graph.nodes.iter().any(|n| n.source.is_some()) {
        return Err(Error::config("the job has no source"));
    }
    if !graph.nodes.iter().any(|n| n.sink.is_some()) {
        return Err(Error::config(
            "the job has no sink, so nothing it computes would ever be committed",
        ));
    }
    Ok(())
}

struct Restored {
    state: RestoredState,
    first_id: CheckpointId,
    /// The savepoint the restored state descends from, recorded in every checkpoint.
    from_savepoint: Option<String>,
}

/// With `restore_from_savepoint(name)`: the savepoint must exist and be the newest
/// checkpoint, or the newest must descend from it (a restart of the deployment that
/// started from it). Restoring an older savepoint over newer checkpoints would commit
/// their output a second time, so that is an error.
async fn check_savepoint(
    storage: &CheckpointStorage,
    s: &JobSettings,
    name: &str,
    latest: Option<CheckpointId>,
) -> Result<()> {
    let Some(sp) = storage.read_savepoint(name).await? else {
        let have: Vec<String> = storage
            .list_savepoints()
            .await?
            .into_iter()
            .map(|sp| format!("'{}' (checkpoint {})", sp.name, sp.checkpoint))
            .collect();
        return Err(Error::config(format!(
            "savepoint '{name}' does not exist in {}; it has {}",
            storage.url(),
            if have.is_empty() {
                "no savepoints".to_string()
            } else {
                format!("savepoints {}", have.join(", "))
            }
        )));
    };
    if sp.job != s.name {
        return Err(Error::config(format!(
            "savepoint '{name}' holds the state of job '{}', not '{}'",
            sp.job, s.name
        )));
    }
    let Some(latest) = latest.filter(|l| *l >= sp.checkpoint) else {
        return Err(Error::config(format!(
            "savepoint '{name}' names checkpoint {}, whose manifest is missing from {}",
            sp.checkpoint,
            storage.url()
        )));
    };
    if latest == sp.checkpoint {
        return Ok(());
    }
    let m = storage.read_manifest(latest).await?;
    if m.from_savepoint.as_deref() == Some(name) {
        tracing::info!(savepoint = name, checkpoint = %latest, "this deployment started from the savepoint; resuming from its latest checkpoint");
        return Ok(());
    }
    Err(Error::config(format!(
        "savepoint '{name}' is checkpoint {}, but checkpoint {latest} completed after it \
         without starting from it: restoring the savepoint would commit that output again. \
         Stop the running version with stop_with_savepoint and start the new one from that",
        sp.checkpoint
    )))
}

/// The union restore: savepoint `name` was taken under one name by every instance of a
/// deployment with another number of instances (or by the job in one process). Each
/// old instance's part is checked like a savepoint restore (it exists, no checkpoint
/// of the old deployment came after it, its stop committed all its output: the
/// `.committed` mark), and their state is merged, so that this instance's operators
/// pick what they now own: key groups by range, source splits (input partitions and
/// repartition-topic partitions) by owner, as an in-process rescale does. Nothing is
/// left to commit. `None` when the savepoint was taken with this instance layout (the
/// ordinary restore applies) or does not exist (which it reports). Besides the state,
/// the highest checkpoint id in any location of the job: this instance's ids go on
/// above it, so a sink whose commits are idempotent by checkpoint id never takes a new
/// checkpoint for one an old instance of the same index committed, even if this
/// instance's location was deleted after it was retired (a sink that also checks the
/// location's identity, as the Kafka, file and object-store sinks do, refuses to
/// start there instead).
async fn union_restore(
    graph: &Graph,
    s: &JobSettings,
    own: &CheckpointStorage,
    name: &str,
) -> Result<Option<(String, RestoredState, Option<CheckpointId>)>> {
    let root = s.root_storage.as_ref().unwrap_or(own);
    // Each part with its layout: recorded in the savepoint, or (one made with the CLI)
    // its location's index and the number of parts found.
    let mut found: Vec<(CheckpointStorage, crate::manifest::Savepoint, usize)> = Vec::new();
    for k in root.instance_dirs().await? {
        let part = root.child(&format!("instances/{k}"));
        if let Some(sp) = part.read_savepoint(name).await? {
            found.push((part, sp, k));
        }
    }
    let at_root = found.is_empty() && s.instance.count > 1;
    if at_root {
        // Taken by the job in one process, at the root of the location.
        if let Some(sp) = root.read_savepoint(name).await? {
            found.push((root.clone(), sp, 0));
        }
    }
    let n = if at_root { 1 } else { found.len() };
    let mut parts = Vec::with_capacity(found.len());
    for (part, sp, k) in found {
        let layout = sp
            .instance
            .unwrap_or(crate::ids::Instance { index: k, count: n });
        let m = part.read_manifest(sp.checkpoint).await?;
        parts.push((part, sp, layout, m));
    }
    let Some(old_count) = parts.first().map(|p| p.2.count) else {
        return Ok(None);
    };
    let mut indices: Vec<usize> = parts.iter().map(|p| p.2.index).collect();
    indices.sort_unstable();
    if parts.iter().any(|p| p.2.count != old_count) || indices != (0..old_count).collect::<Vec<_>>()
    {
        return Err(Error::config(format!(
            "savepoint '{name}' in {}: the instances that took it do not form one deployment \
             (found instances {indices:?}, expected 0..{old_count}): a part is missing, or two \
             deployments used the name",
            root.url()
        )));
    }
    // The same layout restores the ordinary way, each instance from its own part. Across
    // instances a changed parallelism moves splits and key groups between them too.
    let plan = Plan::new(graph, s.parallelism);
    let same_parallelism = parts.iter().all(|p| layout_matches(graph, &plan, &p.3));
    if old_count == s.instance.count && (old_count == 1 || same_parallelism) {
        return Ok(None);
    }
    let mut state = RestoredState::default();
    // Every location of the job, not only the savepoint's parts (a job once run in one
    // process, instances of an earlier deployment): ids go above all of them. The parts
    // are among these locations, their savepoints' checkpoints included.
    let mut highest = root.scan().await?.1;
    for k in root.instance_dirs().await? {
        highest = highest.max(root.child(&format!("instances/{k}")).scan().await?.1);
    }
    for (part, sp, _, m) in &parts {
        let (_, newest) = RestorePoint::find(part).await?;
        check_savepoint(part, s, name, newest.as_ref().map(|m| m.checkpoint)).await?;
        // Checkpoints after the savepoint in an old instance's location are this
        // deployment's (an instance that already started from it), or another
        // deployment ran from it before: restoring it again would commit that
        // deployment's output a second time.
        if let Some(m) = newest.filter(|m| m.checkpoint != sp.checkpoint) {
            let by = m.instance.map_or(1, |i| i.count);
            if by != s.instance.count {
                return Err(Error::config(format!(
                    "savepoint '{name}' in {}: a deployment of {by} instance(s) started from \
                    it and ran on (checkpoint {}); restoring it again with {} would commit \
                    that deployment's output a second time. Stop that deployment with a new \
                    savepoint and start from that",
                    part.url(),
                    m.checkpoint,
                    s.instance.count
                )));
            }
        }
        if !part.savepoint_committed(name).await? {
            return Err(Error::config(format!(
                "savepoint '{name}' in {}: its stop did not confirm that all its output was \
                committed, so starting with another number of instances could lose it. \
                Start that deployment again with its own number of instances (it resumes \
                and commits), stop every instance with a new savepoint, and start from that",
                part.url()
            )));
        }
        if m.max_parallelism != s.max_parallelism {
            return Err(Error::config(format!(
                "savepoint '{name}' was taken with max_parallelism {}, the job now has {}; it \
                is fixed for the life of a job's state",
                m.max_parallelism, s.max_parallelism
            )));
        }
        let read = read_checkpoint_state(part, sp.checkpoint, m).await?;
        for (op, snaps) in read.operators {
            state.operators.entry(op).or_default().extend(snaps);
        }
        for (op, types) in read.types {
            let known = state.types.entry(op).or_default();
            for (n, t) in types {
                known.entry(n).or_insert(t);
            }
        }
    }
    // The old locations this layout does not use are retired: a process of the old
    // deployment restarted there would read input this deployment reads. This
    // instance's own location is in use again.
    let mine: Vec<String> = if s.instance.count > 1 {
        (0..s.instance.count)
            .map(|i| root.child(&format!("instances/{i}")).url().to_string())
            .collect()
    } else {
        vec![root.url().to_string()]
    };
    for (part, ..) in &parts {
        if !mine.iter().any(|u| u == part.url()) {
            part.retire(&format!(
                "restarted as {} instance(s) from savepoint '{name}'",
                s.instance.count
            ))
            .await?;
        }
    }
    own.unretire().await?;
    Ok(Some((name.to_string(), state, highest)))
}

/// Whether every task of manifest `m` that the job still has ran at the parallelism the
/// job's plan gives it now.
fn layout_matches(graph: &Graph, plan: &Plan, m: &crate::manifest::Manifest) -> bool {
    m.tasks.iter().all(|t| {
        graph
            .nodes
            .iter()
            .position(|n| n.op == t.task)
            .is_none_or(|node| plan.parallelism[node] == t.parallelism)
    })
}

/// Where a recovering instance stands: the checkpoint it restores and what it must
/// record before any sink settles (steps 1 and 3 of the protocol above, as far as
/// checkpoint storage decides them).
struct RestorePoint {
    /// The newest checkpoint that is not an orphan, and the generation that wrote it.
    restored: Option<(CheckpointId, u64)>,
    /// The highest checkpoint id in storage, completed or not (directories included).
    max_any: Option<CheckpointId>,
    /// The takeover records found.
    takeovers: Vec<crate::storage::Takeover>,
}

impl RestorePoint {
    /// Read what storage holds (completed checkpoints, directories, takeover records):
    /// the point, and the manifest to restore.
    async fn find(
        storage: &CheckpointStorage,
    ) -> Result<(RestorePoint, Option<crate::manifest::Manifest>)> {
        let (ids, max_any) = storage.scan().await?;
        let takeovers = storage.takeovers().await?;
        let newest = newest_restorable(storage, &ids, &takeovers).await?;
        let point = RestorePoint {
            restored: newest.as_ref().map(|(id, m)| (*id, m.generation)),
            max_any,
            takeovers,
        };
        Ok((point, newest.map(|(_, m)| m)))
    }

    /// Record that instance `generation` restores this point, so that a manifest an
    /// older instance writes from now on is never restored, and delete the records no
    /// longer needed: a record guards against orphans older than the manifest restored
    /// next, so once a manifest of its generation or a newer one is the newest, it is
    /// spent. Done before any sink settles.
    async fn take_over(&self, storage: &CheckpointStorage, generation: u64) -> Result<()> {
        let takeover = crate::storage::Takeover {
            generation,
            restored: self.restored.map(|(id, _)| id),
        };
        storage.record_takeover(&takeover).await?;
        let newest_generation = self.restored.map_or(0, |(_, g)| g);
        for t in self
            .takeovers
            .iter()
            .filter(|t| t.generation <= newest_generation)
        {
            if let Err(e) = storage.delete_takeover(t.generation).await {
                tracing::warn!(generation = t.generation, error = %e, "could not delete an old takeover record");
            }
        }
        Ok(())
    }

    /// The first checkpoint id of the instance: above every id in storage, and above
    /// `sinks_seen`, the highest id the sinks found staged.
    fn first_id(&self, sinks_seen: Option<CheckpointId>) -> CheckpointId {
        let restored = self.restored.map(|(id, _)| id);
        self.max_any
            .max(restored)
            .max(sinks_seen)
            .map_or(CheckpointId(1), |c| c.next())
    }
}

/// The newest manifest that is not an orphan (see [`crate::storage::Takeover`]).
pub(crate) async fn newest_restorable(
    storage: &CheckpointStorage,
    ids: &[CheckpointId],
    takeovers: &[crate::storage::Takeover],
) -> Result<Option<(CheckpointId, crate::manifest::Manifest)>> {
    for &id in ids.iter().rev() {
        let m = storage.read_manifest(id).await?;
        match crate::storage::Takeover::orphaning(takeovers, id, m.generation) {
            Some(t) => tracing::warn!(
                checkpoint = %id,
                writer = m.generation,
                newer = t.generation,
                "passing over a checkpoint an older instance completed after a newer one took over (its output was aborted)"
            ),
            None => return Ok(Some((id, m))),
        }
    }
    Ok(None)
}

fn recover(
    graph: &Graph,
    s: &JobSettings,
    rt: &tokio::runtime::Runtime,
    storage: &CheckpointStorage,
    local_dir: &std::path::Path,
    generation: u64,
) -> Result<Restored> {
    let (point, newest) = rt.block_on(RestorePoint::find(storage))?;
    let newest = point.restored.map(|(id, _)| id).zip(newest);
    let mut state = RestoredState::default();
    let mut pending = Vec::new();
    let mut from_savepoint = s.restore_from_savepoint.clone();
    // A savepoint of a deployment with another number of instances: each old instance
    // took its part, and this instance gathers the key groups and splits it now owns.
    // A restart of the deployment that started from the savepoint resumes from its own
    // newer checkpoints (an instance added by a rescale has the savepoint in other
    // instances' locations only).
    let resuming = |name: &str| {
        newest
            .as_ref()
            .is_some_and(|(_, m)| m.from_savepoint.as_deref() == Some(name))
    };
    let union = match &s.restore_from_savepoint {
        Some(name) if !resuming(name) => rt.block_on(union_restore(graph, s, storage, name))?,
        _ => None,
    };
    // A location a deployment of another layout took over (the union restore retires
    // the old locations it does not use): a process restarting there without joining
    // the new layout is the old deployment come back.
    if union.is_none() {
        if let Some(why) = rt.block_on(storage.retired())? {
            return Err(Error::config(format!(
                "checkpoint location {} is retired: the job was {why}. This process belongs \
                 to the old deployment and would read input the new one reads; stop it (or \
                 start it with the new deployment's instance count and savepoint)",
                storage.url()
            )));
        }
    }
    let mut union_floor = None;
    if let Some((name, mut union, highest)) = union {
        union_floor = highest;
        // Sinks restore this instance's own history: what its location committed last.
        union.checkpoint = newest.as_ref().map(|(id, _)| *id);
        let newest_id = union.checkpoint.unwrap_or(CheckpointId(0));
        check_all_state_restores(graph, s, newest_id, &mut union, &mut pending)?;
        tracing::info!(job = %s.name, savepoint = %name, instance = s.instance.index,
            of = s.instance.count, "restoring a savepoint taken by another number of instances");
        state = union;
    } else if let Some(name) = s.restore_from_savepoint.as_ref().filter(|n| !resuming(n)) {
        rt.block_on(check_savepoint(
            storage,
            s,
            name,
            newest.as_ref().map(|(id, _)| *id),
        ))?;
    }
    if let Some((latest, m)) = newest.filter(|_| state.checkpoint.is_none()) {
        if from_savepoint.is_none() {
            from_savepoint = m.from_savepoint.clone();
        }
        let plan = Plan::new(graph, s.parallelism);
        restore::fits(
            &m,
            latest,
            (&s.name, s.max_parallelism, s.instance.count, s.parallelism),
            layout_matches(graph, &plan, &m),
            storage.url(),
        )?;
        state = rt.block_on(read_checkpoint_state(storage, latest, &m))?;
        #[cfg(feature = "rocksdb")]
        crate::state::rocks::prune_local_cache(
            local_dir,
            m.tasks.iter().flat_map(|t| t.shared.iter()),
        );
        pending = m.pending_commits;
        check_all_state_restores(graph, s, latest, &mut state, &mut pending)?;
        fail::fail_point!("recovery::during_restore");
        tracing::info!(job = %s.name, checkpoint = %latest, "restoring from checkpoint");
    }
    let _ = local_dir;
    // Before any sink settles: a failure from here on must not let a later recovery
    // restore a manifest that an older instance writes after this point.
    rt.block_on(point.take_over(storage, generation))?;
    let storage_id = rt.block_on(storage.storage_id())?;
    let settled = settle_sinks(
        graph,
        &pending,
        crate::api::RecoveryContext {
            job: s.connector_job(),
            sink: OperatorId(String::new()),
            restored: state.checkpoint,
            generation,
            storage_id,
            io: rt.handle().clone(),
        },
    );
    if let Err(e) = &settled {
        if e.class() == ErrorClass::Stop {
            // This run goes no further (a sink refused: e.g. output ahead of the
            // checkpoints after manifests were lost). Its record would make manifests
            // put back as the error advises look written behind its back.
            if let Err(d) = rt.block_on(storage.delete_takeover(generation)) {
                tracing::warn!(generation, error = %d, "could not delete this run's takeover record");
            }
        }
    }
    Ok(Restored {
        state,
        first_id: point.first_id(settled?.max(union_floor)),
        from_savepoint,
    })
}

/// Every task file of checkpoint `id` (manifest `m`) read, verified and decoded: each
/// operator's snapshots (one per instance that wrote state) and the state types the
/// checkpoint recorded. What a restore starts from, and what `inspect` reads.
pub(crate) async fn read_checkpoint_state(
    storage: &CheckpointStorage,
    id: CheckpointId,
    m: &crate::manifest::Manifest,
) -> Result<RestoredState> {
    let mut state = RestoredState {
        checkpoint: Some(id),
        ..Default::default()
    };
    let with_state = || m.tasks.iter().filter(|h| !h.path.is_empty());
    let files =
        futures::future::try_join_all(with_state().map(|h| storage.read_state(id, h))).await?;
    for (bytes, h) in files.iter().zip(with_state()) {
        let payload: TaskSnapshotPayload =
            crate::codec::decode(bytes, &h.path).map_err(|e| Error::CorruptCheckpoint {
                checkpoint: id,
                path: h.path.clone(),
                message: e.to_string(),
            })?;
        for (op, snap) in payload.operators {
            state.operators.entry(op).or_default().push(snap);
        }
    }
    for h in &m.tasks {
        for (op, types) in &h.state_types {
            let known = state.types.entry(OperatorId(op.clone())).or_default();
            for (name, t) in types {
                known.entry(name.clone()).or_insert_with(|| t.clone());
            }
        }
    }
    Ok(state)
}

/// `f` of every item, all at the same time (a scoped thread each when there are
/// several), each run to its end; the results in the items' order, a panic as an error
/// saying `what` panicked.
pub(crate) fn all_at_once<I: Sync, R: Send>(
    items: &[I],
    what: &str,
    f: impl Fn(&I) -> Result<R> + Sync,
) -> Vec<Result<R>> {
    match items {
        [] => Vec::new(),
        [one] => vec![f(one)],
        _ => std::thread::scope(|scope| {
            let f = &f;
            let running: Vec<_> = (items.iter())
                .map(|item| scope.spawn(move || f(item)))
                .collect();
            running
                .into_iter()
                .map(|r| {
                    r.join()
                        .unwrap_or_else(|_| Err(Error::config(format!("{what} panicked"))))
                })
                .collect()
        }),
    }
}

/// Let every sink commit the restored checkpoint's output and abort what was staged
/// after it; the highest checkpoint id a sink saw staged. The sinks recover at the same
/// time: one sink's recovery can wait on what another's fences (Kafka sinks sharing a
/// marker topic: a transaction a killed process left open on it holds every reader
/// until the sink owning it fences it, or until it times out).
fn settle_sinks(
    graph: &Graph,
    pending: &[crate::manifest::PendingCommit],
    ctx: crate::api::RecoveryContext,
) -> Result<Option<CheckpointId>> {
    let recover = |n: &crate::plan::Node, sink: &Arc<dyn crate::plan::ErasedSink>| {
        let mine = pending
            .iter()
            .filter(|p| p.sink == n.op)
            .map(|p| p.committable.clone())
            .collect();
        let mut ctx = ctx.clone();
        ctx.sink = n.op.clone();
        sink.recover(&ctx, mine)
    };
    let sinks: Vec<_> = (graph.nodes.iter())
        .filter_map(|n| n.sink.as_ref().map(|s| (n, s)))
        .collect();
    let results = all_at_once(&sinks, "a sink's recovery", |(n, sink)| recover(n, sink));
    let mut max_seen = None;
    for r in results {
        max_seen = max_seen.max(r?);
    }
    Ok(max_seen)
}

/// Every piece of a checkpoint must go somewhere (see [`restore`]): the job's
/// operators, task heads and sinks as receivers, the decision made there.
fn check_all_state_restores(
    graph: &Graph,
    s: &JobSettings,
    checkpoint: CheckpointId,
    state: &mut RestoredState,
    pending: &mut Vec<crate::manifest::PendingCommit>,
) -> Result<()> {
    let plan = Plan::new(graph, s.parallelism);
    let receivers = restore::Receivers {
        operators: (graph.nodes.iter())
            .map(|n| (n.op.clone(), n.restores.clone()))
            .collect(),
        task_heads: (plan.heads.iter())
            .filter(|&&h| !graph.nodes[h].in_edges.is_empty())
            .map(|&h| graph.nodes[h].op.clone())
            .collect(),
        sinks: (graph.nodes.iter())
            .filter(|n| n.sink.is_some())
            .map(|n| n.op.clone())
            .collect(),
    };
    let dropped = restore::place(
        &receivers,
        s.allow_non_restored_state,
        checkpoint,
        state,
        pending,
    )?;
    if !dropped.is_empty() {
        tracing::warn!(job = %s.name, %checkpoint, dropped = %dropped.join(", "), "dropping checkpointed state that no operator of the job restores (allow_non_restored_state)");
    }
    Ok(())
}

/// What every attempt of one `run()` shares.
struct RunContext<'a> {
    graph: &'a Graph,
    s: &'a JobSettings,
    rt: &'a tokio::runtime::Runtime,
    storage: &'a CheckpointStorage,
    metrics: &'a Arc<crate::metrics::Metrics>,
    /// This instance's lease on the checkpoint storage.
    lease: u64,
    /// The RocksDB backend's working directory.
    local_dir: std::path::PathBuf,
    /// The newest completed checkpoint, for state backends.
    completed: Arc<AtomicU64>,
}

/// The RocksDB working directory: configured, or one per job and checkpoint location
/// under the system temp directory (so jobs on different locations never share one).
fn local_state_dir(s: &JobSettings, storage: &CheckpointStorage) -> std::path::PathBuf {
    if let crate::state::StateBackend::RocksDb(crate::state::RocksDbConfig {
        local_dir: Some(dir),
        ..
    }) = &s.backend
    {
        return dir.clone();
    }
    let tag = xxhash_rust::xxh3::xxh3_64(storage.url().as_bytes());
    std::env::temp_dir()
        .join("exactly-state")
        .join(format!("{}-{tag:016x}", s.name))
}

fn run_attempt(run: &RunContext<'_>, report: &mut JobReport, first_attempt: bool) -> Result<()> {
    let RunContext {
        graph,
        s,
        rt,
        storage,
        metrics,
        lease,
        ..
    } = *run;
    let t0 = Instant::now();
    // A fenced instance (a newer one took a lease since) must not touch any sink
    // artifact: its recovery would commit or delete what the newer one staged. This also
    // stops its in-process restarts.
    rt.block_on(storage.check_lease(lease))?;
    let restored = tracing::info_span!("recovery", job = %s.name, lease)
        .in_scope(|| recover(graph, s, rt, storage, &run.local_dir, lease))?;
    run.completed.store(
        restored.state.checkpoint.map_or(0, |c| c.0),
        Ordering::SeqCst,
    );
    if first_attempt {
        report.restored_from = restored.state.checkpoint;
        report.recovery_time = t0.elapsed();
    }
    let plan = Plan::new(graph, s.parallelism);
    let alignment = if s.at_least_once {
        crate::aligner::Mode::AtLeastOnce
    } else if let Some(t) = s.aligned_timeout {
        crate::aligner::Mode::Unaligned {
            timeout_ms: t.as_millis().min(u64::MAX as u128) as u64,
        }
    } else {
        crate::aligner::Mode::Aligned
    };
    let channels = ChannelPool::new(
        graph,
        &plan,
        s.channel_capacity,
        s.batch_size,
        matches!(alignment, crate::aligner::Mode::Unaligned { .. }),
    );
    let splits = SplitLists::default();
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let cancel = Arc::new(AtomicBool::new(false));
    let env = TaskEnv {
        config: Arc::new(RuntimeConfig {
            batch_size: s.batch_size,
            buffer_timeout: s.buffer_timeout,
            alignment,
            max_parallelism: s.max_parallelism,
            job: s.connector_job(),
            instance: s.instance,
            checkpoint_interval: s.interval,
            generation: lease,
        }),
        events: events_tx,
        storage: storage.clone(),
        rt: rt.handle().clone(),
        cancel: cancel.clone(),
        clock: s.clock.clone(),
        metrics: metrics.clone(),
        backend: crate::state::BackendEnv {
            backend: s.backend.clone(),
            local_dir: run.local_dir.clone(),
            storage: storage.clone(),
            rt: rt.handle().clone(),
            completed: run.completed.clone(),
        },
        aligned: Default::default(),
    };
    let tasks = plan.task_keys(graph);
    let mut controls: Vec<Sender<SourceControl>> = Vec::new();
    let mut source_keys = Vec::new();

    // Taken before any task runs: a task may move the job's clock (a test pacing its
    // input), and the coordinator's first interval must count from before that.
    let protocol = ProtocolClock::new(s);
    let started_at = protocol.now();
    std::thread::scope(|scope| {
        for (head, key) in &tasks {
            let control = if graph.nodes[*head].source.is_some() {
                let (tx, rx) = crossbeam_channel::unbounded();
                controls.push(tx);
                source_keys.push(key.clone());
                Some(rx)
            } else {
                None
            };
            let (env, plan, channels, splits, restored) =
                (&env, &plan, &channels, &splits, &restored.state);
            let (head, key) = (*head, key.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{}", key.task, key.subtask))
                .spawn_scoped(scope, move || {
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        run_task(
                            graph, plan, head, &key, env, channels, splits, restored, control,
                        )
                    }))
                    .unwrap_or_else(|payload| {
                        let message = payload
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "non-string panic payload".into());
                        Err(Error::Panic {
                            task: key.task.clone(),
                            subtask: key.subtask,
                            message,
                        })
                    });
                    if result.is_err() {
                        env.cancel.store(true, Ordering::Relaxed);
                    }
                    let _ = env.events.send(TaskEvent::Exited { key, result });
                });
            if let Err(e) = spawned {
                cancel.store(true, Ordering::Relaxed);
                return Err(Error::io("spawning a task thread", e));
            }
        }
        let (commit_tx, commit_rx) = crossbeam_channel::unbounded();
        let committer = Committer {
            graph,
            rt,
            storage,
            lease,
            retain: s.retain,
            cancel: cancel.clone(),
            events: env.events.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("{}-commit", s.name))
            .spawn_scoped(scope, move || committer.run(commit_rx));
        if let Err(e) = spawned {
            cancel.store(true, Ordering::Relaxed);
            return Err(Error::io("spawning the commit thread", e));
        }
        let mut coordinator = CheckpointCoordinator::new(
            CoordinatorConfig {
                interval: s.interval,
                timeout: s.timeout,
                tolerable_failures: s.tolerable_failures,
            },
            tasks.iter().map(|(_, k)| k.clone()),
            source_keys.iter().cloned(),
            restored.first_id,
            Vec::new(),
            started_at,
        );
        let driver = Driver {
            s,
            rt,
            storage,
            controls: std::mem::take(&mut controls),
            lanes: channels.all_lanes(),
            aligned: env.aligned.clone(),
            commits: commit_tx,
            cancel: cancel.clone(),
            report,
            crash_after: s.inject_failure_after,
            completed_in_attempt: 0,
            lease,
            metrics: metrics.clone(),
            completed: run.completed.clone(),
            from_savepoint: restored.from_savepoint.clone(),
            protocol,
        };
        let result = driver.coordinate(&mut coordinator, &events_rx, tasks.len());
        if result.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        result
    })
}

#[allow(clippy::too_many_arguments)]
fn run_task(
    graph: &Graph,
    plan: &Plan,
    head: NodeId,
    key: &TaskKey,
    env: &TaskEnv,
    channels: &ChannelPool,
    splits: &SplitLists,
    restored: &RestoredState,
    control: Option<crossbeam_channel::Receiver<SourceControl>>,
) -> Result<()> {
    let mut ctx = BuildCtx {
        graph,
        plan,
        head,
        subtask: key.subtask,
        env,
        channels,
        splits,
        restored,
        control,
    };
    let node = &graph.nodes[head];
    let task = if let Some(src) = &node.source {
        src.build_head(head, &mut ctx)?
    } else {
        let input = node
            .input
            .clone()
            .ok_or_else(|| Error::config(format!("operator '{}' has no input", node.op)))?;
        input.build_head(head, &mut ctx)?
    };
    task.run()
}

struct Driver<'a> {
    s: &'a JobSettings,
    rt: &'a tokio::runtime::Runtime,
    storage: &'a CheckpointStorage,
    controls: Vec<Sender<SourceControl>>,
    /// Checkpoints the tasks must take aligned.
    aligned: crate::runtime::AlignedIds,
    /// Every task's priority lane (unaligned checkpoints only): a triggered checkpoint
    /// is announced to all tasks at once, so a task blocked behind a full channel
    /// upstream need not wait for its sources to get to their barrier.
    lanes: Vec<Sender<crate::runtime::Announce>>,
    /// Written manifests' committables, to the commit lane.
    commits: Sender<CommitJob>,
    cancel: Arc<AtomicBool>,
    report: &'a mut JobReport,
    /// Injected failure: sent to the sources after this many checkpoints of the
    /// attempt.
    crash_after: Option<u64>,
    completed_in_attempt: u64,
    metrics: Arc<crate::metrics::Metrics>,
    lease: u64,
    completed: Arc<AtomicU64>,
    /// Recorded in every manifest (see [`Manifest::from_savepoint`]).
    from_savepoint: Option<String>,
    /// The time the coordinator sees.
    protocol: ProtocolClock,
}

/// The time the checkpoint protocol runs on (checkpoint cadence and timeouts): the job's
/// clock's [`Clock::monotonic_ms`](crate::time::Clock::monotonic_ms), the monotonic
/// clock unless a test set a manual one, which then decides when periodic checkpoints
/// come. Durations reported in statistics are measured on the monotonic clock.
struct ProtocolClock {
    clock: Arc<dyn crate::time::Clock>,
    /// The monotonic and the clock's time when this attempt began.
    base: Instant,
    base_ms: crate::time::Timestamp,
}

impl ProtocolClock {
    fn new(s: &JobSettings) -> Self {
        ProtocolClock {
            clock: s.clock.clone(),
            base: Instant::now(),
            base_ms: s.clock.monotonic_ms(),
        }
    }

    /// Now, as an instant the coordinator compares (a clock set back counts as no time
    /// passing).
    fn now(&self) -> Instant {
        let passed = self
            .clock
            .monotonic_ms()
            .saturating_sub(self.base_ms)
            .max(0);
        self.base + Duration::from_millis(passed as u64)
    }
}

impl Driver<'_> {
    fn coordinate(
        mut self,
        c: &mut CheckpointCoordinator,
        events: &crossbeam_channel::Receiver<TaskEvent>,
        task_count: usize,
    ) -> Result<()> {
        let mut exited = 0usize;
        let mut failure: Option<Error> = None;
        let mut finished = false;
        let mut stop_asked = false;
        let mut stopped: Option<CheckpointId> = None;
        // The stop checkpoint, once triggered, and the savepoint to keep it as.
        let mut stop_id: Option<CheckpointId> = None;
        let mut savepoint: Option<String> = None;
        // Checkpoints and savepoints asked while running: waiting for the next trigger,
        // then by checkpoint.
        let mut asked_next: Vec<crate::runtime::CheckpointRequest> = Vec::new();
        let mut asked_at: BTreeMap<CheckpointId, Vec<crate::runtime::CheckpointRequest>> =
            BTreeMap::new();
        let mut triggered_at: BTreeMap<CheckpointId, Instant> = BTreeMap::new();
        let mut pauses: BTreeMap<CheckpointId, Duration> = BTreeMap::new();
        let mut aligns: BTreeMap<CheckpointId, Duration> = BTreeMap::new();
        let mut sink_waits: BTreeMap<CheckpointId, Duration> = BTreeMap::new();
        // Bytes in flight stored and tasks that went unaligned, per checkpoint.
        let mut unaligned: BTreeMap<CheckpointId, (u64, Vec<(String, usize)>)> = BTreeMap::new();
        let mut op_bytes: BTreeMap<CheckpointId, BTreeMap<String, u64>> = BTreeMap::new();
        // Checkpoints whose manifest is written, waiting for the commit lane.
        let mut committing: BTreeMap<CheckpointId, CheckpointStats> = BTreeMap::new();
        let mut published = Instant::now();
        loop {
            let ev = events.recv_timeout(Duration::from_millis(20));
            let now = self.protocol.now();
            if published.elapsed() >= Duration::from_secs(1) {
                crate::telemetry::counters(&self.s.name, &self.metrics.snapshot());
                crate::telemetry::gauges(&self.s.name, &self.metrics);
                published = Instant::now();
            }
            let mut decisions = Vec::new();
            match ev {
                Ok(TaskEvent::Ack {
                    key,
                    id,
                    handle,
                    sync_pause,
                    alignment,
                    inflight_bytes,
                    unaligned: went_unaligned,
                    operator_bytes,
                    sink_wait,
                }) => {
                    if went_unaligned {
                        let u = unaligned.entry(id).or_default();
                        u.0 += inflight_bytes;
                        u.1.push((key.task.0.clone(), key.subtask.0));
                    }
                    let p = pauses.entry(id).or_insert(Duration::ZERO);
                    *p = (*p).max(sync_pause);
                    let a = aligns.entry(id).or_insert(Duration::ZERO);
                    *a = (*a).max(alignment);
                    let w = sink_waits.entry(id).or_insert(Duration::ZERO);
                    *w = (*w).max(sink_wait);
                    let per_op = op_bytes.entry(id).or_default();
                    for (op, b) in operator_bytes {
                        *per_op.entry(op.0).or_default() += b;
                    }
                    decisions = c.on_ack(key, id, handle, now)
                }
                Ok(TaskEvent::Decline { id, reason }) => decisions = c.on_decline(id, reason, now),
                Ok(TaskEvent::Committables(commits)) => c.on_committables(commits),
                Ok(TaskEvent::SourceFinished(key)) => decisions = c.on_source_finished(key, now),
                Ok(TaskEvent::Exited { key, result }) => {
                    exited += 1;
                    if let Err(e) = result {
                        tracing::debug!(task = %key.task, subtask = %key.subtask, error = %e, "task exited with error");
                        let replace = match &failure {
                            None => true,
                            Some(Error::Cancelled) => !matches!(e, Error::Cancelled),
                            Some(_) => false,
                        };
                        if replace {
                            failure = Some(e);
                        }
                        self.cancel.store(true, Ordering::Relaxed);
                    }
                }
                Ok(TaskEvent::Committed { ids, result }) => {
                    let newest = ids.iter().copied().max().unwrap_or(CheckpointId(0));
                    match result {
                        Ok(()) => {
                            decisions.extend(c.on_committed(newest, now));
                            // Sources may report progress outside the checkpoint (a
                            // Kafka group's offsets), now that output is visible.
                            for tx in &self.controls {
                                let _ = tx.send(SourceControl::Completed { id: newest });
                            }
                        }
                        Err(e) if e.class() == ErrorClass::Stop => {
                            failure = Some(e);
                            self.cancel.store(true, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tracing::warn!(checkpoint = %newest, error = %e, "commit failed; retrying with the next checkpoint");
                            decisions.extend(c.on_commit_deferred(newest, now));
                        }
                    }
                    for id in ids {
                        if let Some(mut stats) = committing.remove(&id) {
                            stats.end_to_end = triggered_at
                                .remove(&id)
                                .map_or(stats.duration, |t| t.elapsed());
                            self.record(stats);
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {}
            }
            if self.s.stop.is_cancelled() && !matches!(failure, Some(Error::JobCancelled { .. })) {
                tracing::info!(job = %self.s.name, "cancelled: stopping without a checkpoint");
                failure = Some(Error::JobCancelled {
                    job: self.s.name.clone(),
                });
                self.cancel.store(true, Ordering::Relaxed);
            }
            if failure.is_none() && !stop_asked && self.s.stop.is_requested() {
                stop_asked = true;
                savepoint = self
                    .s
                    .stop
                    .savepoint()
                    .or_else(|| self.s.savepoint_on_stop.clone());
                match savepoint
                    .as_deref()
                    .map(|n| self.rt.block_on(self.storage.savepoint_name_free(n)))
                {
                    Some(Err(e)) => {
                        failure = Some(e);
                        self.cancel.store(true, Ordering::Relaxed);
                    }
                    _ => {
                        tracing::info!(job = %self.s.name, savepoint = ?savepoint, "stop requested: taking a checkpoint, then stopping");
                        decisions.extend(c.request_stop(now));
                    }
                }
            }
            for req in self.s.stop.take_checkpoint_requests() {
                let free = match &req.name {
                    _ if failure.is_some() || stop_asked => Err(Error::config(format!(
                        "job '{}' is stopping; {} was not taken",
                        self.s.name,
                        asked(&req)
                    ))),
                    Some(name) => self.rt.block_on(self.storage.savepoint_name_free(name)),
                    None => Ok(()),
                };
                match free {
                    Ok(()) => {
                        tracing::info!(job = %self.s.name, savepoint = ?req.name, "checkpoint asked: taking it now");
                        asked_next.push(req);
                        decisions.extend(c.request_checkpoint(now));
                    }
                    Err(e) => {
                        let _ = req.reply.send(Err(e));
                    }
                }
            }
            // Once finished, nothing is left to trigger (the coordinator would take a
            // second final checkpoint that no task answers).
            if failure.is_none() && stopped.is_none() && !finished {
                decisions.extend(c.on_tick(now));
            }
            while let Some(d) = (!decisions.is_empty()).then(|| decisions.remove(0)) {
                if failure.is_some() {
                    break;
                }
                match d {
                    Decision::Trigger { id, is_final } => {
                        tracing::debug!(checkpoint = %id, is_final, "trigger");
                        if is_final || asked_next.iter().any(|r| r.name.is_some()) {
                            self.aligned.mark(id);
                        } else {
                            for lane in &self.lanes {
                                let _ = lane.send(crate::runtime::Announce { id });
                            }
                        }
                        if !asked_next.is_empty() {
                            asked_at.insert(id, std::mem::take(&mut asked_next));
                        }
                        triggered_at.insert(id, Instant::now());
                        for tx in &self.controls {
                            let _ = tx.send(SourceControl::Trigger { id, is_final });
                        }
                    }
                    Decision::TriggerStop { id } => {
                        tracing::debug!(checkpoint = %id, "trigger stop");
                        if !asked_next.is_empty() {
                            asked_at.insert(id, std::mem::take(&mut asked_next));
                        }
                        stop_id = Some(id);
                        self.aligned.mark(id);
                        triggered_at.insert(id, Instant::now());
                        for tx in &self.controls {
                            let _ = tx.send(SourceControl::Stop { id });
                        }
                    }
                    Decision::Stopped { id } => {
                        tracing::info!(job = %self.s.name, checkpoint = %id, "stopped with a checkpoint");
                        // Its output is committed: say so next to the savepoint, which
                        // lets a deployment with another number of instances start
                        // from it (see `union_restore`).
                        if let Some(name) = savepoint.as_ref().filter(|_| stop_id == Some(id)) {
                            if let Err(e) = self
                                .rt
                                .block_on(self.storage.mark_savepoint_committed(name))
                            {
                                tracing::warn!(savepoint = %name, error = %e,
                                    "could not record that the savepoint's output is committed; \
                                     restoring it with another number of instances will be refused");
                            }
                        }
                        stopped = Some(id);
                        self.cancel.store(true, Ordering::Relaxed);
                    }
                    Decision::Complete {
                        id,
                        is_final,
                        tasks,
                        pending_commits,
                        duration,
                    } => {
                        // Statistics on the monotonic clock, whatever the protocol runs on.
                        let duration = triggered_at.get(&id).map_or(duration, |t| t.elapsed());
                        let state_bytes = tasks
                            .iter()
                            .map(|t| t.size + t.shared.iter().map(|f| f.size).sum::<u64>())
                            .sum();
                        let uploaded_bytes = tasks.iter().map(|t| t.uploaded).sum();
                        let manifest = Manifest {
                            format_version: MANIFEST_FORMAT_VERSION,
                            job: self.s.name.clone(),
                            checkpoint: id,
                            completed_at_ms: SystemTime::now()
                                .duration_since(SystemTime::UNIX_EPOCH)
                                .map(|d| d.as_millis() as u64)
                                .unwrap_or(0),
                            max_parallelism: self.s.max_parallelism,
                            is_final,
                            tasks,
                            pending_commits,
                            from_savepoint: self.from_savepoint.clone(),
                            generation: self.lease,
                            instance: (self.s.instance.count > 1).then_some(self.s.instance),
                        };
                        let written =
                            tracing::info_span!("manifest", checkpoint = %id).in_scope(|| {
                                self.rt.block_on(async {
                                    self.storage.check_lease(self.lease).await?;
                                    fail::fail_point!("checkpoint::before_manifest");
                                    self.storage.write_manifest(&manifest).await
                                })
                            });
                        match written {
                            Ok(()) => {}
                            Err(e) if e.class() == ErrorClass::Stop => {
                                failure = Some(e);
                                self.cancel.store(true, Ordering::Relaxed);
                                continue;
                            }
                            Err(e) => {
                                triggered_at.remove(&id);
                                decisions.extend(c.on_manifest_failed(
                                    id,
                                    e.to_string(),
                                    self.protocol.now(),
                                ));
                                continue;
                            }
                        }
                        self.completed.fetch_max(id.0, Ordering::SeqCst);
                        fail::fail_point!("checkpoint::after_manifest");
                        if let Some(name) = savepoint.as_ref().filter(|_| stop_id == Some(id)) {
                            // Before the commit round, so the stop cannot end the job
                            // without it. If it fails, the checkpoint stands; the job
                            // fails, and resumes from it.
                            if let Err(e) = self.keep_as_savepoint(name, &manifest) {
                                failure = Some(e);
                                self.cancel.store(true, Ordering::Relaxed);
                                continue;
                            }
                        }
                        // Checkpoints and savepoints asked while running: answered
                        // (never failing the job) once the coordinator knows the
                        // checkpoint is complete, so the next interval counts from then.
                        let answers: Vec<_> = asked_at
                            .remove(&id)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|req| {
                                let kept = match &req.name {
                                    Some(name) => self.keep_as_savepoint(name, &manifest),
                                    None => Ok(()),
                                };
                                (req.reply, kept.map(|()| id))
                            })
                            .collect();
                        tracing::info!(checkpoint = %id, ms = duration.as_millis() as u64, bytes = state_bytes, is_final, "checkpoint complete");
                        committing.insert(
                            id,
                            CheckpointStats {
                                id,
                                duration,
                                end_to_end: duration,
                                state_bytes,
                                uploaded_bytes,
                                max_sync_pause: pauses.remove(&id).unwrap_or_default(),
                                max_alignment: aligns.remove(&id).unwrap_or_default(),
                                max_sink_wait: sink_waits.remove(&id).unwrap_or_default(),
                                inflight_bytes: unaligned.get(&id).map_or(0, |u| u.0),
                                unaligned_tasks: unaligned
                                    .remove(&id)
                                    .map(|mut u| {
                                        u.1.sort();
                                        u.1
                                    })
                                    .unwrap_or_default(),
                                is_final,
                                state_bytes_by_operator: op_bytes.remove(&id).unwrap_or_default(),
                                metrics: self.metrics.snapshot(),
                            },
                        );
                        pauses.retain(|&p, _| p > id);
                        aligns.retain(|&p, _| p > id);
                        sink_waits.retain(|&p, _| p > id);
                        unaligned.retain(|&p, _| p > id);
                        op_bytes.retain(|&p, _| p > id);
                        triggered_at.retain(|&p, _| p >= id);
                        // The lane re-checks the lease before it commits: a newer
                        // instance that took it since may have restored an older
                        // checkpoint, and publishing this output could duplicate what it
                        // produces. If it restores this manifest instead, it re-commits
                        // the output itself. (If it missed the manifest and deleted the
                        // staged files, a later restore of this manifest stops with
                        // CommitLost: the documented race.)
                        let _ = self.commits.send(CommitJob {
                            id,
                            pending: manifest.pending_commits,
                        });
                        decisions.extend(c.on_manifest_written(id, self.protocol.now()));
                        for (reply, answer) in answers {
                            let _ = reply.send(answer);
                        }
                    }
                    Decision::Abort { id, reason } => {
                        tracing::warn!(checkpoint = %id, %reason, "checkpoint aborted");
                        for req in asked_at.remove(&id).unwrap_or_default() {
                            let _ = req.reply.send(Err(Error::CheckpointsFailing {
                                reason: format!(
                                    "checkpoint {id} for {} was aborted: {reason}",
                                    asked(&req)
                                ),
                            }));
                        }
                        triggered_at.remove(&id);
                        self.report.aborted_checkpoints += 1;
                        crate::telemetry::checkpoint_aborted(&self.s.name);
                    }
                    Decision::Fail { reason } => {
                        failure = Some(Error::CheckpointsFailing { reason });
                        self.cancel.store(true, Ordering::Relaxed);
                    }
                    Decision::Finished => finished = true,
                }
            }
            if exited == task_count {
                let unserved = asked_next
                    .drain(..)
                    .chain(std::mem::take(&mut asked_at).into_values().flatten());
                for req in unserved {
                    let _ = req.reply.send(Err(Error::config(format!(
                        "job '{}' ended before the checkpoint {} completed",
                        self.s.name,
                        match &req.name {
                            Some(name) => format!("of savepoint '{name}'"),
                            None => "asked for".to_string(),
                        }
                    ))));
                }
                if let Some(id) = stopped {
                    // Output and state are safe at `id`; what tasks did after its barrier
                    // is redone by the next run.
                    if let Some(e) = failure.filter(|e| !matches!(e, Error::Cancelled)) {
                        tracing::warn!(error = %e, "a task failed after the stop checkpoint; the next run resumes from it");
                    }
                    self.report.stopped_at = Some(id);
                    self.report.savepoint = savepoint;
                    return Ok(());
                }
                if let Some(e) = failure {
                    return Err(e);
                }
                if finished {
                    return Ok(());
                }
                if !c.busy() {
                    return Err(Error::Operator {
                        operator: crate::ids::OperatorId(self.s.name.clone()),
                        subtask: crate::ids::SubtaskIndex(0),
                        source: "all tasks exited before the final checkpoint completed".into(),
                    });
                }
            }
        }
    }

    /// Keep the checkpoint of `manifest` (just written) as savepoint `name`.
    fn keep_as_savepoint(&self, name: &str, manifest: &Manifest) -> Result<()> {
        let sp = Savepoint {
            name: name.to_string(),
            job: self.s.name.clone(),
            checkpoint: manifest.checkpoint,
            created_at_ms: manifest.completed_at_ms,
            instance: (self.s.instance.count > 1).then_some(self.s.instance),
        };
        self.rt.block_on(self.storage.write_savepoint(&sp))?;
        tracing::info!(savepoint = %name, checkpoint = %manifest.checkpoint, "savepoint written");
        Ok(())
    }

    /// A checkpoint is complete and its commit round has run: report it, and arm the
    /// injected failure once enough checkpoints of the attempt completed.
    fn record(&mut self, stats: CheckpointStats) {
        if let Some(cb) = &self.s.on_checkpoint {
            cb(&stats);
        }
        self.completed_in_attempt += 1;
        if self.crash_after == Some(self.completed_in_attempt) {
            for tx in &self.controls {
                let _ = tx.send(SourceControl::Fail);
            }
        }
        crate::telemetry::checkpoint_completed(&self.s.name, &stats);
        *self
            .s
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(stats.clone());
        crate::telemetry::counters(&self.s.name, &stats.metrics);
        push_recent(&mut self.report.checkpoints, stats, REPORTED_CHECKPOINTS);
        self.report.completed_checkpoints += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::RestorePoint;
    use crate::codec::frame_chunks;
    use crate::error::Error;
    use crate::ids::{CheckpointId, OperatorId, SubtaskIndex};
    use crate::manifest::{Manifest, MANIFEST_FORMAT_VERSION};
    use crate::storage::CheckpointStorage;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        /// A new instance starts and recovers. The one it takes over from had a
        /// checkpoint in flight (`in_flight`), whose directory exists or not yet.
        Start { in_flight: bool, dir: bool },
        /// The newest instance completes a checkpoint.
        Complete,
        /// An older instance's in-flight checkpoint lands after it was taken over: its
        /// lease check passed just before (the race no object store can close).
        Late { which: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (any::<bool>(), any::<bool>()).prop_map(|(in_flight, dir)| Op::Start { in_flight, dir }),
            4 => Just(Op::Complete),
            2 => (0usize..8).prop_map(|which| Op::Late { which }),
        ]
    }

    struct Instance {
        generation: u64,
        next: u64,
        /// The checkpoint it had in flight when a newer instance took over.
        in_flight: Option<CheckpointId>,
    }

    fn manifest(id: CheckpointId, generation: u64) -> Manifest {
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            job: "j".into(),
            checkpoint: id,
            completed_at_ms: 0,
            max_parallelism: 128,
            is_final: false,
            tasks: vec![],
            pending_commits: vec![],
            from_savepoint: None,
            generation,
            instance: None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Against a model of instances taking over one checkpoint location: every
        /// recovery restores the newest manifest that was not written by an older
        /// instance after a newer one took over (never an orphan, never an older
        /// checkpoint than needed), and continues with ids above every checkpoint it
        /// can see.
        #[test]
        fn recovery_restores_the_newest_checkpoint_that_is_not_an_orphan(
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let storage = CheckpointStorage::in_memory();
            // Manifests written: id -> whether it is an orphan.
            let mut written: BTreeMap<CheckpointId, bool> = BTreeMap::new();
            let mut instances: Vec<Instance> = Vec::new();
            for op in ops {
                match op {
                    Op::Start { in_flight, dir } => {
                        if let Some(cur) = instances.last_mut().filter(|_| in_flight) {
                            let id = CheckpointId(cur.next);
                            cur.next += 1;
                            cur.in_flight = Some(id);
                            if dir {
                                let file = frame_chunks(vec![bytes::Bytes::from_static(b"x")]);
                                rt.block_on(storage.put_state_file(
                                    id, cur.generation, &OperatorId("t".into()), SubtaskIndex(0), 1, vec![], file,
                                )).unwrap();
                            }
                        }
                        let generation = rt.block_on(storage.acquire_lease()).unwrap();
                        let (point, m) = rt.block_on(RestorePoint::find(&storage)).unwrap();
                        let expected = written.iter().rev().find(|(_, orphan)| !**orphan).map(|(id, _)| *id);
                        prop_assert_eq!(point.restored.map(|(id, _)| id), expected);
                        prop_assert_eq!(m.map(|m| m.checkpoint), expected);
                        rt.block_on(point.take_over(&storage, generation)).unwrap();
                        let first = point.first_id(None);
                        let (_, max_any) = rt.block_on(storage.scan()).unwrap();
                        prop_assert!(max_any.is_none_or(|m| first > m), "{first} not above {max_any:?}");
                        instances.push(Instance { generation, next: first.0, in_flight: None });
                    }
                    Op::Complete => {
                        let Some(cur) = instances.last_mut() else { continue };
                        let id = CheckpointId(cur.next);
                        cur.next += 1;
                        match rt.block_on(storage.write_manifest(&manifest(id, cur.generation))) {
                            Ok(()) => {
                                written.insert(id, false);
                            }
                            // An older instance's late manifest took the id: the write
                            // is refused (the real driver stops with ConcurrentWriter, and
                            // its rerun recovers past the orphan, as the next Start here
                            // does). The model only needs the id spent.
                            Err(Error::ConcurrentWriter { .. }) => prop_assert!(written.contains_key(&id)),
                            Err(e) => return Err(TestCaseError::fail(e.to_string())),
                        }
                    }
                    Op::Late { which } => {
                        let n = instances.len();
                        if n < 2 {
                            continue;
                        }
                        let older = &mut instances[which % (n - 1)];
                        let Some(id) = older.in_flight.take() else { continue };
                        if rt.block_on(storage.write_manifest(&manifest(id, older.generation))).is_ok() {
                            written.insert(id, true);
                        }
                    }
                }
            }
        }
    }
}
