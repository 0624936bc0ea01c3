//! The checkpoint coordinator as a pure state machine: it is fed facts (time passed, a
//! task acknowledged, a source finished, the manifest was written) and returns decisions
//! (trigger, complete, abort, fail, finished). The runtime's driver does the I/O.
//!
//! # Protocol
//!
//! 1. On a tick after the interval has passed, and with no checkpoint in flight, the
//!    coordinator picks the next id and decides [`Decision::Trigger`]. At most one
//!    checkpoint is in flight.
//! 2. Sinks report committables as they pre-commit ([`CheckpointCoordinator::on_committables`]);
//!    they are kept as pending whatever checkpoint they belong to, because output staged
//!    for an abandoned checkpoint is still part of the next completed one.
//! 3. Every task acknowledges with its state handle. When all have, the decision is
//!    [`Decision::Complete`], carrying every pending committable up to that id: the driver
//!    writes the manifest (the commit point) and reports it
//!    ([`CheckpointCoordinator::on_manifest_written`]). From then on the checkpoint is
//!    complete and the next one may be triggered, while the driver commits.
//! 4. [`CheckpointCoordinator::on_committed`] drops what was committed; a later checkpoint
//!    subsumes commits that failed or are still running (commits are idempotent).
//! 5. When every source has finished, the next checkpoint is the final one; when it is
//!    committed the decision is [`Decision::Finished`]. A stop checkpoint likewise ends
//!    with [`Decision::Stopped`] once committed; nothing is triggered after either.
//!
//! # Invariants
//!
//! * Ids strictly increase, starting above every id the driver found in storage.
//! * A checkpoint completes only with an ack from every task.
//! * Pending committables are only dropped after the driver reports them committed.
//!
//! # Failure and recovery
//!
//! A checkpoint that times out or is declined (an upload failed) is aborted; acks for it
//! that arrive later are ignored. More than `tolerable_failures` in a row, or any failure
//! of the final checkpoint (whose sources have already ended), is [`Decision::Fail`]:
//! the job restarts from its latest completed checkpoint.

use crate::ids::{CheckpointId, OperatorId, SubtaskIndex};
use crate::manifest::{PendingCommit, TaskStateHandle};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// One task instance: the task's head operator and its subtask index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskKey {
    /// Head operator of the task.
    pub task: OperatorId,
    /// Subtask index.
    pub subtask: SubtaskIndex,
}

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Time between checkpoints; `None` takes only the final checkpoint.
    pub interval: Option<Duration>,
    /// A checkpoint not complete after this long is aborted.
    pub timeout: Duration,
    /// Failed checkpoints in a row that are tolerated before the job fails.
    pub tolerable_failures: u32,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Ask every source to inject barrier `id`.
    Trigger {
        /// Checkpoint id.
        id: CheckpointId,
        /// Sources end after this barrier.
        is_final: bool,
    },
    /// Every task acked: write the manifest, then commit `pending_commits`.
    Complete {
        /// Checkpoint id.
        id: CheckpointId,
        /// Whether it is the final one.
        is_final: bool,
        /// Task snapshots, sorted.
        tasks: Vec<TaskStateHandle>,
        /// Every committable staged up to `id` and not yet committed.
        pending_commits: Vec<PendingCommit>,
        /// From trigger to the last ack.
        duration: Duration,
    },
    /// Abandon checkpoint `id`.
    Abort {
        /// Checkpoint id.
        id: CheckpointId,
        /// Why.
        reason: String,
    },
    /// The job must restart from its latest checkpoint.
    Fail {
        /// Why.
        reason: String,
    },
    /// Ask every source to inject barrier `id` and then read nothing more: a stop with
    /// a checkpoint was requested.
    TriggerStop {
        /// Checkpoint id.
        id: CheckpointId,
    },
    /// The final checkpoint is committed: the job is done.
    Finished,
    /// The stop checkpoint `id` is committed: the job may stop, and a restart resumes
    /// from `id`.
    Stopped {
        /// Checkpoint id.
        id: CheckpointId,
    },
}

/// A checkpoint past its acks: what its completion means.
#[derive(Debug, Clone, Copy)]
struct Ending {
    id: CheckpointId,
    is_final: bool,
    stop: bool,
}

#[derive(Debug)]
struct InFlight {
    id: CheckpointId,
    is_final: bool,
    stop: bool,
    started: Instant,
    acks: BTreeMap<TaskKey, TaskStateHandle>,
}

/// Checkpoint coordination state.
#[derive(Debug)]
pub struct CheckpointCoordinator {
    config: CoordinatorConfig,
    tasks: BTreeSet<TaskKey>,
    sources: BTreeSet<TaskKey>,
    finished_sources: BTreeSet<TaskKey>,
    next_id: CheckpointId,
    in_flight: Option<InFlight>,
    /// Every task acked; the driver is writing the manifest.
    writing: Option<Ending>,
    /// A final or stop checkpoint whose manifest is written, waiting for its commits.
    closing: Option<Ending>,
    /// Stopped or finished was decided: the job is over, nothing is triggered again.
    ended: bool,
    /// A stop with a checkpoint was requested; the checkpoint in flight, if any, is
    /// the stop checkpoint when `in_flight.stop`.
    stop_requested: bool,
    /// A checkpoint was asked for now (a savepoint), not at the next interval.
    asap: bool,
    last_completed: Option<CheckpointId>,
    last_settled: Instant,
    pending: Vec<PendingCommit>,
    consecutive_failures: u32,
}

impl CheckpointCoordinator {
    /// A coordinator for `tasks` (of which `sources` inject barriers), whose first
    /// checkpoint id is `first_id`.
    pub fn new(
        config: CoordinatorConfig,
        tasks: impl IntoIterator<Item = TaskKey>,
        sources: impl IntoIterator<Item = TaskKey>,
        first_id: CheckpointId,
        restored_pending: Vec<PendingCommit>,
        now: Instant,
    ) -> Self {
        CheckpointCoordinator {
            config,
            tasks: tasks.into_iter().collect(),
            sources: sources.into_iter().collect(),
            finished_sources: BTreeSet::new(),
            next_id: first_id,
            in_flight: None,
            writing: None,
            closing: None,
            ended: false,
            stop_requested: false,
            asap: false,
            last_completed: None,
            last_settled: now,
            pending: restored_pending,
            consecutive_failures: 0,
        }
    }

    /// The latest checkpoint whose manifest was written in this attempt.
    #[cfg(test)]
    pub fn last_completed(&self) -> Option<CheckpointId> {
        self.last_completed
    }

    /// Whether a checkpoint is in flight, its manifest being written, or a final or
    /// stop checkpoint waiting for its commits: no checkpoint may be triggered.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some() || self.writing.is_some() || self.closing.is_some() || self.ended
    }

    fn all_sources_finished(&self) -> bool {
        self.finished_sources.len() == self.sources.len()
    }

    fn trigger(&mut self, now: Instant, is_final: bool) -> Decision {
        self.asap = false;
        let id = self.next_id;
        self.next_id = id.next();
        // The final checkpoint ends the job anyway; it wins over a stop.
        let stop = self.stop_requested && !is_final;
        self.in_flight = Some(InFlight {
            id,
            is_final,
            stop,
            started: now,
            acks: BTreeMap::new(),
        });
        if stop {
            Decision::TriggerStop { id }
        } else {
            Decision::Trigger { id, is_final }
        }
    }

    /// Stop with a checkpoint: at once if no checkpoint is in flight, else right after
    /// the one in flight (a stop checkpoint that fails is retried like a periodic one).
    pub fn request_stop(&mut self, now: Instant) -> Vec<Decision> {
        if self.stop_requested {
            return Vec::new();
        }
        self.stop_requested = true;
        if !self.busy() {
            vec![self.trigger(now, self.all_sources_finished())]
        } else {
            Vec::new()
        }
    }

    /// Take a checkpoint as soon as possible (a savepoint asked while the job runs): at
    /// once if none is in flight, else right after the one in flight. The next trigger
    /// decision is that checkpoint.
    pub fn request_checkpoint(&mut self, now: Instant) -> Vec<Decision> {
        self.asap = true;
        if self.busy() {
            Vec::new()
        } else {
            vec![self.trigger(now, self.all_sources_finished())]
        }
    }

    /// Time passed.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Decision> {
        let mut out = Vec::new();
        if let Some(f) = &self.in_flight {
            if now.duration_since(f.started) >= self.config.timeout {
                let id = f.id;
                let reason = format!(
                    "checkpoint {id} timed out after {:?} with {}/{} acks",
                    self.config.timeout,
                    f.acks.len(),
                    self.tasks.len()
                );
                out.extend(self.fail_in_flight(now, reason));
            }
            return out;
        }
        if self.busy() {
            return out;
        }
        if self.all_sources_finished() {
            out.push(self.trigger(now, true));
        } else if self.stop_requested || self.asap {
            out.push(self.trigger(now, false));
        } else if let Some(interval) = self.config.interval {
            if now.duration_since(self.last_settled) >= interval {
                out.push(self.trigger(now, false));
            }
        }
        out
    }

    /// A source task has read all its input and waits for the final barrier.
    pub fn on_source_finished(&mut self, task: TaskKey, now: Instant) -> Vec<Decision> {
        self.finished_sources.insert(task);
        if self.all_sources_finished() && !self.busy() {
            vec![self.trigger(now, true)]
        } else {
            Vec::new()
        }
    }

    /// A sink subtask pre-committed `committables` at barrier `checkpoint`.
    pub fn on_committables(&mut self, commits: impl IntoIterator<Item = PendingCommit>) {
        self.pending.extend(commits);
    }

    /// A task finished its snapshot for `id` and stored it at `handle`.
    pub fn on_ack(
        &mut self,
        task: TaskKey,
        id: CheckpointId,
        handle: TaskStateHandle,
        now: Instant,
    ) -> Vec<Decision> {
        let Some(f) = &mut self.in_flight else {
            return Vec::new();
        };
        if f.id != id || !self.tasks.contains(&task) {
            return Vec::new();
        }
        f.acks.insert(task, handle);
        if f.acks.len() < self.tasks.len() {
            return Vec::new();
        }
        let Some(f) = self.in_flight.take() else {
            return Vec::new();
        };
        // Oldest checkpoint first; within one, by sink and subtask, so a manifest's
        // commit order does not depend on which task reported first.
        let mut pending_commits: Vec<PendingCommit> = self
            .pending
            .iter()
            .filter(|p| p.checkpoint <= f.id)
            .cloned()
            .collect();
        pending_commits.sort_by(|a, b| {
            (a.checkpoint, &a.sink, a.subtask).cmp(&(b.checkpoint, &b.sink, b.subtask))
        });
        self.writing = Some(Ending {
            id: f.id,
            is_final: f.is_final,
            stop: f.stop,
        });
        vec![Decision::Complete {
            id: f.id,
            is_final: f.is_final,
            tasks: f.acks.into_values().collect(),
            pending_commits,
            duration: now.duration_since(f.started),
        }]
    }

    /// A task could not snapshot or store its state for `id`.
    pub fn on_decline(&mut self, id: CheckpointId, reason: String, now: Instant) -> Vec<Decision> {
        match &self.in_flight {
            Some(f) if f.id == id => self.fail_in_flight(now, reason),
            _ => Vec::new(),
        }
    }

    /// Writing the manifest of `id` failed; the checkpoint does not exist.
    pub fn on_manifest_failed(
        &mut self,
        id: CheckpointId,
        reason: String,
        now: Instant,
    ) -> Vec<Decision> {
        match self.writing {
            Some(w) if w.id == id => {
                self.writing = None;
                self.register_failure(id, w.is_final, reason, now)
            }
            _ => Vec::new(),
        }
    }

    /// The manifest of `id` is written: the checkpoint is complete (the restore point)
    /// and its commits may run while the next checkpoint is taken.
    pub fn on_manifest_written(&mut self, id: CheckpointId, now: Instant) -> Vec<Decision> {
        let w = match self.writing {
            Some(w) if w.id == id => w,
            _ => return Vec::new(),
        };
        self.writing = None;
        self.last_completed = Some(id);
        self.last_settled = now;
        self.consecutive_failures = 0;
        if w.is_final || w.stop {
            self.closing = Some(w);
            Vec::new()
        } else if self.all_sources_finished() {
            vec![self.trigger(now, true)]
        } else if self.stop_requested || self.asap {
            vec![self.trigger(now, false)]
        } else {
            Vec::new()
        }
    }

    /// Every pending commit up to `id` (whose manifest is written) succeeded.
    pub fn on_committed(&mut self, id: CheckpointId, _now: Instant) -> Vec<Decision> {
        self.pending.retain(|p| p.checkpoint > id);
        match self.closing {
            Some(c) if c.id <= id => {
                self.closing = None;
                self.ended = true;
                if c.is_final {
                    vec![Decision::Finished]
                } else {
                    vec![Decision::Stopped { id: c.id }]
                }
            }
            _ => Vec::new(),
        }
    }

    /// The manifest of `id` is written but commits failed: the checkpoint is complete
    /// (it is the restore point), its output stays pending for the next checkpoint.
    pub fn on_commit_deferred(&mut self, id: CheckpointId, _now: Instant) -> Vec<Decision> {
        match self.closing {
            Some(c) if c.id <= id => {
                // A stop checkpoint whose output is not committed is not a stop: the
                // next tick triggers another one, which commits it.
                self.closing = None;
                if c.is_final {
                    return vec![Decision::Fail {
                        reason: format!("commit of final checkpoint {} failed", c.id),
                    }];
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn fail_in_flight(&mut self, now: Instant, reason: String) -> Vec<Decision> {
        let Some(f) = self.in_flight.take() else {
            return Vec::new();
        };
        self.register_failure(f.id, f.is_final, reason, now)
    }

    fn register_failure(
        &mut self,
        id: CheckpointId,
        is_final: bool,
        reason: String,
        now: Instant,
    ) -> Vec<Decision> {
        self.last_settled = now;
        self.consecutive_failures += 1;
        let mut out = vec![Decision::Abort {
            id,
            reason: reason.clone(),
        }];
        if is_final {
            out.push(Decision::Fail {
                reason: format!("final checkpoint {id} failed after sources ended: {reason}"),
            });
        } else if self.consecutive_failures > self.config.tolerable_failures {
            out.push(Decision::Fail {
                reason: format!(
                    "{} consecutive checkpoints failed; last: {reason}",
                    self.consecutive_failures
                ),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str, s: usize) -> TaskKey {
        TaskKey {
            task: OperatorId(t.into()),
            subtask: SubtaskIndex(s),
        }
    }

    fn handle(k: &TaskKey, id: u64) -> TaskStateHandle {
        TaskStateHandle {
            task: k.task.clone(),
            subtask: k.subtask,
            parallelism: 1,
            operators: vec![],
            path: format!("chk-{id}/{}-{}", k.task, k.subtask),
            size: 0,
            crc32: 0,
            shared: Vec::new(),
            uploaded: 0,
            state_types: Default::default(),
        }
    }

    fn commit(id: u64, sink: &str) -> PendingCommit {
        PendingCommit {
            checkpoint: CheckpointId(id),
            sink: OperatorId(sink.into()),
            subtask: SubtaskIndex(0),
            committable: serde_json::json!(id),
        }
    }

    fn setup(tolerable: u32) -> (CheckpointCoordinator, Vec<TaskKey>, Instant) {
        let t0 = Instant::now();
        let tasks = vec![key("src", 0), key("src", 1), key("sink", 0)];
        let c = CheckpointCoordinator::new(
            CoordinatorConfig {
                interval: Some(Duration::from_secs(1)),
                timeout: Duration::from_secs(10),
                tolerable_failures: tolerable,
            },
            tasks.clone(),
            tasks[..2].to_vec(),
            CheckpointId(5),
            vec![],
            t0,
        );
        (c, tasks, t0)
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn triggers_on_interval_with_ids_from_first_id() {
        let (mut c, _, t0) = setup(0);
        assert!(c.on_tick(t0 + Duration::from_millis(500)).is_empty());
        assert_eq!(
            c.on_tick(t0 + s(1)),
            vec![Decision::Trigger {
                id: CheckpointId(5),
                is_final: false
            }]
        );
        // No second trigger while one is in flight.
        assert!(c.on_tick(t0 + s(3)).is_empty());
    }

    #[test]
    fn a_checkpoint_asked_for_comes_at_once_or_right_after_the_one_in_flight() {
        let (mut c, tasks, t0) = setup(0);
        let trigger = |id| {
            vec![Decision::Trigger {
                id: CheckpointId(id),
                is_final: false,
            }]
        };
        // Idle: at once, not at the interval.
        assert_eq!(c.request_checkpoint(t0), trigger(5));
        // In flight: after it, before the interval has passed.
        assert!(c.request_checkpoint(t0).is_empty());
        for t in &tasks {
            c.on_ack(t.clone(), CheckpointId(5), handle(t, 5), t0);
        }
        assert_eq!(c.on_manifest_written(CheckpointId(5), t0), trigger(6));
        for t in &tasks {
            c.on_ack(t.clone(), CheckpointId(6), handle(t, 6), t0);
        }
        // Served: back to the interval.
        assert!(c.on_manifest_written(CheckpointId(6), t0).is_empty());
        assert!(c.on_tick(t0 + Duration::from_millis(500)).is_empty());
        assert_eq!(c.on_tick(t0 + s(1)), trigger(7));
    }

    #[test]
    fn completes_only_after_every_ack_in_any_order() {
        for order in [[0, 1, 2], [2, 0, 1], [1, 2, 0]] {
            let (mut c, tasks, t0) = setup(0);
            c.on_tick(t0 + s(1));
            c.on_committables([commit(5, "sink")]);
            for (k, &i) in order.iter().enumerate() {
                let d = c.on_ack(
                    tasks[i].clone(),
                    CheckpointId(5),
                    handle(&tasks[i], 5),
                    t0 + s(2),
                );
                if k < 2 {
                    assert!(d.is_empty());
                } else {
                    match &d[..] {
                        [Decision::Complete {
                            id,
                            tasks: hs,
                            pending_commits,
                            is_final: false,
                            ..
                        }] => {
                            assert_eq!(*id, CheckpointId(5));
                            assert_eq!(hs.len(), 3);
                            assert_eq!(pending_commits, &vec![commit(5, "sink")]);
                        }
                        other => panic!("{other:?}"),
                    }
                }
            }
            assert!(c.on_manifest_written(CheckpointId(5), t0 + s(2)).is_empty());
            assert_eq!(c.last_completed(), Some(CheckpointId(5)));
            // Next trigger one interval after completion, with the next id.
            assert!(c.on_tick(t0 + s(2)).is_empty());
            assert_eq!(
                c.on_tick(t0 + s(3)),
                vec![Decision::Trigger {
                    id: CheckpointId(6),
                    is_final: false
                }]
            );
        }
    }

    #[test]
    fn checkpoint_that_never_completes_times_out_and_late_acks_are_ignored() {
        let (mut c, tasks, t0) = setup(1);
        c.on_tick(t0 + s(1));
        c.on_ack(
            tasks[0].clone(),
            CheckpointId(5),
            handle(&tasks[0], 5),
            t0 + s(1),
        );
        let d = c.on_tick(t0 + s(11));
        assert!(
            matches!(
                &d[..],
                [Decision::Abort {
                    id: CheckpointId(5),
                    ..
                }]
            ),
            "{d:?}"
        );
        // Late acks of the abandoned checkpoint do nothing.
        assert!(c
            .on_ack(
                tasks[1].clone(),
                CheckpointId(5),
                handle(&tasks[1], 5),
                t0 + s(12)
            )
            .is_empty());
        assert!(c
            .on_ack(
                tasks[2].clone(),
                CheckpointId(5),
                handle(&tasks[2], 5),
                t0 + s(12)
            )
            .is_empty());
        // The next one gets a fresh id; a second failure in a row exceeds the tolerance.
        assert_eq!(
            c.on_tick(t0 + s(12)),
            vec![Decision::Trigger {
                id: CheckpointId(6),
                is_final: false
            }]
        );
        let d = c.on_decline(CheckpointId(6), "upload failed".into(), t0 + s(12));
        assert!(
            matches!(&d[..], [Decision::Abort { .. }, Decision::Fail { .. }]),
            "{d:?}"
        );
    }

    #[test]
    fn committables_of_abandoned_checkpoint_are_carried_into_the_next() {
        let (mut c, tasks, t0) = setup(5);
        c.on_tick(t0 + s(1));
        c.on_committables([commit(5, "sink")]);
        c.on_decline(CheckpointId(5), "x".into(), t0 + s(1));
        c.on_tick(t0 + s(2));
        c.on_committables([commit(6, "sink")]);
        let mut last = Vec::new();
        for t in &tasks {
            last = c.on_ack(t.clone(), CheckpointId(6), handle(t, 6), t0 + s(2));
        }
        match &last[..] {
            [Decision::Complete {
                pending_commits, ..
            }] => {
                assert_eq!(pending_commits, &vec![commit(5, "sink"), commit(6, "sink")])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failed_commit_stays_pending_until_a_later_checkpoint_commits() {
        let (mut c, tasks, t0) = setup(5);
        c.on_tick(t0 + s(1));
        c.on_committables([commit(5, "sink")]);
        for t in &tasks {
            c.on_ack(t.clone(), CheckpointId(5), handle(t, 5), t0 + s(1));
        }
        c.on_manifest_written(CheckpointId(5), t0 + s(1));
        c.on_commit_deferred(CheckpointId(5), t0 + s(1));
        c.on_tick(t0 + s(2));
        let mut last = Vec::new();
        for t in &tasks {
            last = c.on_ack(t.clone(), CheckpointId(6), handle(t, 6), t0 + s(2));
        }
        match &last[..] {
            [Decision::Complete {
                pending_commits, ..
            }] => assert_eq!(pending_commits, &vec![commit(5, "sink")]),
            other => panic!("{other:?}"),
        }
        c.on_manifest_written(CheckpointId(6), t0 + s(2));
        c.on_committed(CheckpointId(6), t0 + s(2));
        c.on_tick(t0 + s(3));
        let mut last = Vec::new();
        for t in &tasks {
            last = c.on_ack(t.clone(), CheckpointId(7), handle(t, 7), t0 + s(3));
        }
        match &last[..] {
            [Decision::Complete {
                pending_commits, ..
            }] => assert!(pending_commits.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn final_checkpoint_after_all_sources_finish_then_finished() {
        let (mut c, tasks, t0) = setup(0);
        assert!(c.on_source_finished(tasks[0].clone(), t0).is_empty());
        assert_eq!(
            c.on_source_finished(tasks[1].clone(), t0),
            vec![Decision::Trigger {
                id: CheckpointId(5),
                is_final: true
            }]
        );
        let mut last = Vec::new();
        for t in &tasks {
            last = c.on_ack(t.clone(), CheckpointId(5), handle(t, 5), t0);
        }
        assert!(matches!(
            &last[..],
            [Decision::Complete { is_final: true, .. }]
        ));
        assert!(c.on_manifest_written(CheckpointId(5), t0).is_empty());
        assert!(
            c.on_tick(t0 + s(5)).is_empty(),
            "nothing after the final one"
        );
        assert_eq!(
            c.on_committed(CheckpointId(5), t0),
            vec![Decision::Finished]
        );
    }

    #[test]
    fn sources_finishing_during_a_periodic_checkpoint_get_a_final_one_after_it() {
        let (mut c, tasks, t0) = setup(0);
        c.on_tick(t0 + s(1));
        assert!(c.on_source_finished(tasks[0].clone(), t0 + s(1)).is_empty());
        assert!(c.on_source_finished(tasks[1].clone(), t0 + s(1)).is_empty());
        for t in &tasks {
            c.on_ack(t.clone(), CheckpointId(5), handle(t, 5), t0 + s(1));
        }
        assert_eq!(
            c.on_manifest_written(CheckpointId(5), t0 + s(1)),
            vec![Decision::Trigger {
                id: CheckpointId(6),
                is_final: true
            }]
        );
    }

    #[test]
    fn stop_waits_for_the_checkpoint_in_flight_then_stops_after_its_own_commits() {
        let (mut c, tasks, t0) = setup(5);
        c.on_tick(t0 + s(1));
        assert!(c.request_stop(t0 + s(1)).is_empty(), "5 is in flight");
        assert!(c.request_stop(t0 + s(1)).is_empty(), "asked once");
        for t in &tasks {
            c.on_ack(t.clone(), CheckpointId(5), handle(t, 5), t0 + s(1));
        }
        assert_eq!(
            c.on_manifest_written(CheckpointId(5), t0 + s(1)),
            vec![Decision::TriggerStop {
                id: CheckpointId(6)
            }]
        );
        // The stop checkpoint fails: the next tick tries again, before any interval.
        c.on_decline(CheckpointId(6), "x".into(), t0 + s(1));
        assert_eq!(
            c.on_tick(t0 + s(1)),
            vec![Decision::TriggerStop {
                id: CheckpointId(7)
            }]
        );
        for t in &tasks {
            c.on_ack(t.clone(), CheckpointId(7), handle(t, 7), t0 + s(1));
        }
        // Its commit fails: not stopped yet, the next stop checkpoint commits it.
        assert!(c.on_manifest_written(CheckpointId(7), t0 + s(1)).is_empty());
        assert!(
            c.on_tick(t0 + s(1)).is_empty(),
            "waits for the stop's commits"
        );
        assert!(c.on_commit_deferred(CheckpointId(7), t0 + s(1)).is_empty());
        assert_eq!(
            c.on_tick(t0 + s(1)),
            vec![Decision::TriggerStop {
                id: CheckpointId(8)
            }]
        );
        for t in &tasks {
            c.on_ack(t.clone(), CheckpointId(8), handle(t, 8), t0 + s(1));
        }
        assert!(c.on_manifest_written(CheckpointId(8), t0 + s(1)).is_empty());
        assert_eq!(
            c.on_committed(CheckpointId(8), t0 + s(1)),
            vec![Decision::Stopped {
                id: CheckpointId(8)
            }]
        );
        // Over: a tick in the same round as the decision (before the driver acted on
        // it), the sources ending as they stop, another request: nothing is taken
        // after the stop checkpoint (a second one would find its savepoint's name
        // taken).
        assert!(c.on_tick(t0 + s(9)).is_empty());
        for t in &tasks {
            assert!(c.on_source_finished(t.clone(), t0 + s(9)).is_empty());
        }
        assert!(c.request_checkpoint(t0 + s(9)).is_empty());
    }

    #[test]
    fn stop_when_idle_triggers_at_once_and_a_finished_job_ends_with_its_final_checkpoint() {
        let (mut c, tasks, t0) = setup(0);
        assert_eq!(
            c.request_stop(t0),
            vec![Decision::TriggerStop {
                id: CheckpointId(5)
            }]
        );
        let (mut c, _, t0) = setup(0);
        c.on_source_finished(tasks[0].clone(), t0);
        c.on_source_finished(tasks[1].clone(), t0);
        assert!(
            c.request_stop(t0).is_empty(),
            "the final checkpoint is in flight"
        );
    }

    #[test]
    fn failure_of_final_checkpoint_fails_the_job() {
        let (mut c, tasks, t0) = setup(10);
        c.on_source_finished(tasks[0].clone(), t0);
        c.on_source_finished(tasks[1].clone(), t0);
        let d = c.on_decline(CheckpointId(5), "disk full".into(), t0);
        assert!(
            matches!(&d[..], [Decision::Abort { .. }, Decision::Fail { .. }]),
            "{d:?}"
        );
    }

    #[test]
    fn next_checkpoint_runs_while_commits_of_the_previous_one_are_in_progress() {
        let (mut c, tasks, t0) = setup(0);
        c.on_tick(t0 + s(1));
        c.on_committables([commit(5, "sink")]);
        for t in &tasks {
            c.on_ack(t.clone(), CheckpointId(5), handle(t, 5), t0 + s(1));
        }
        assert!(c.on_manifest_written(CheckpointId(5), t0 + s(1)).is_empty());
        // 5's commits have not been reported: the interval still triggers 6.
        assert!(!c.busy());
        assert_eq!(
            c.on_tick(t0 + s(2)),
            vec![Decision::Trigger {
                id: CheckpointId(6),
                is_final: false
            }]
        );
        c.on_committables([commit(6, "sink")]);
        let mut last = Vec::new();
        for t in &tasks {
            last = c.on_ack(t.clone(), CheckpointId(6), handle(t, 6), t0 + s(2));
        }
        // 6's manifest still names 5's output: a restore from 6 re-commits it.
        match &last[..] {
            [Decision::Complete {
                pending_commits, ..
            }] => assert_eq!(pending_commits, &vec![commit(5, "sink"), commit(6, "sink")]),
            other => panic!("{other:?}"),
        }
        assert!(c.on_committed(CheckpointId(5), t0 + s(2)).is_empty());
        c.on_manifest_written(CheckpointId(6), t0 + s(2));
        c.on_tick(t0 + s(3));
        let mut last = Vec::new();
        for t in &tasks {
            last = c.on_ack(t.clone(), CheckpointId(7), handle(t, 7), t0 + s(3));
        }
        match &last[..] {
            [Decision::Complete {
                pending_commits, ..
            }] => assert_eq!(pending_commits, &vec![commit(6, "sink")]),
            other => panic!("{other:?}"),
        }
        // While a manifest is written nothing is triggered.
        assert!(c.busy());
        assert!(c.on_tick(t0 + s(9)).is_empty());
    }

    #[test]
    fn manifest_write_failure_counts_as_failed_checkpoint() {
        let (mut c, tasks, t0) = setup(0);
        c.on_tick(t0 + s(1));
        for t in &tasks {
            c.on_ack(t.clone(), CheckpointId(5), handle(t, 5), t0 + s(1));
        }
        let d = c.on_manifest_failed(CheckpointId(5), "403".into(), t0 + s(1));
        assert!(
            matches!(&d[..], [Decision::Abort { .. }, Decision::Fail { .. }]),
            "{d:?}"
        );
        assert_eq!(c.last_completed(), None);
    }
}
