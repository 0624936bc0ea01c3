//! A job run as several instances in one test process: each instance reads its share of
//! the source splits, and a `key_by` reaches the instance owning the key through a
//! repartition topic, here an in-memory one with the same contract as Kafka's (records
//! visible once committed, one partition per key group, offsets per partition).
//! `tests/kafka_end_to_end.rs` runs the same across processes against a real broker.

use exactly_engine::api::BoxError;
use exactly_engine::api::{
    RecoveryContext, RepartitionTopic, Repartitioner, Routed, SinkContext, SinkWriter, Source,
    SourceContext, SourcePoll, SourceReader, TwoPhaseCommitSink,
};
use exactly_engine::error::{Error, Result};
use exactly_engine::ids::{key_group_of_bytes, subtask_for_key_group, CheckpointId, KeyGroup};
use exactly_engine::prelude::*;
use exactly_engine::testing::{CollectSink, VecSource};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Topics in memory: per topic, per partition, the committed payloads.
#[derive(Clone, Default)]
struct MemoryTopics(Arc<Mutex<Topics>>);

#[derive(Default)]
struct Topics {
    partitions: HashMap<String, Vec<Vec<Vec<u8>>>>,
    /// The last checkpoint committed per writer (job, sink, subtask): commits are
    /// idempotent, as the Kafka sink's markers make them.
    committed: HashMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Staged {
    writer: String,
    checkpoint: u64,
    records: Vec<(u16, Vec<u8>)>,
}

struct MemorySink {
    topics: MemoryTopics,
    topic: String,
}

struct MemoryWriter {
    writer: String,
    buf: Vec<(u16, Vec<u8>)>,
}

struct MemorySource {
    topics: MemoryTopics,
    topic: String,
    partitions: u16,
}

struct MemoryReader {
    topics: MemoryTopics,
    topic: String,
    partition: usize,
    next: u64,
}

impl Repartitioner for MemoryTopics {
    type Sink = MemorySink;
    type Source = MemorySource;
    fn sink(&self, t: &RepartitionTopic) -> Result<MemorySink> {
        self.0
            .lock()
            .unwrap()
            .partitions
            .entry(t.name.clone())
            .or_insert_with(|| vec![Vec::new(); t.key_groups as usize]);
        Ok(MemorySink {
            topics: self.clone(),
            topic: t.name.clone(),
        })
    }
    fn source(&self, t: &RepartitionTopic) -> Result<MemorySource> {
        Ok(MemorySource {
            topics: self.clone(),
            topic: t.name.clone(),
            partitions: t.key_groups,
        })
    }
}

impl TwoPhaseCommitSink for MemorySink {
    type Item = Routed;
    type Committable = Staged;
    type Writer = MemoryWriter;
    fn open_writer(&self, ctx: &SinkContext) -> Result<MemoryWriter> {
        Ok(MemoryWriter {
            writer: format!("{}/{}/{}", ctx.job, ctx.sink, ctx.subtask),
            buf: Vec::new(),
        })
    }
    fn commit(&self, c: &Staged) -> Result<()> {
        let mut t = self.topics.0.lock().unwrap();
        if t.committed
            .get(&c.writer)
            .is_some_and(|&done| done >= c.checkpoint)
        {
            return Ok(());
        }
        let parts = t.partitions.get_mut(&self.topic).expect("created");
        for (kg, payload) in &c.records {
            parts[*kg as usize].push(payload.clone());
        }
        t.committed.insert(c.writer.clone(), c.checkpoint);
        Ok(())
    }
    fn recover(&self, _: &RecoveryContext, pending: Vec<Staged>) -> Result<Option<CheckpointId>> {
        for c in &pending {
            self.commit(c)?;
        }
        Ok(None)
    }
}

impl SinkWriter for MemoryWriter {
    type Item = Routed;
    type Committable = Staged;
    fn write(&mut self, batch: &mut Vec<Routed>) -> Result<()> {
        self.buf
            .extend(batch.drain(..).map(|r| (r.key_group, r.payload)));
        Ok(())
    }
    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<Option<Staged>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        Ok(Some(Staged {
            writer: self.writer.clone(),
            checkpoint: checkpoint.0,
            records: std::mem::take(&mut self.buf),
        }))
    }
}

impl Source for MemorySource {
    type Item = Vec<u8>;
    type Offset = u64;
    type Reader = MemoryReader;
    fn splits(&self) -> Result<Vec<String>> {
        Ok((0..self.partitions).map(|p| format!("p-{p}")).collect())
    }
    fn split_key_group(&self, split: &str) -> Option<KeyGroup> {
        split.strip_prefix("p-")?.parse().ok().map(KeyGroup)
    }
    fn open(&self, split: &str, from: Option<u64>, _: &SourceContext) -> Result<MemoryReader> {
        let partition = self
            .split_key_group(split)
            .ok_or_else(|| Error::config(format!("split {split}")))?;
        Ok(MemoryReader {
            topics: self.topics.clone(),
            topic: self.topic.clone(),
            partition: partition.0 as usize,
            next: from.unwrap_or(0),
        })
    }
}

impl SourceReader for MemoryReader {
    type Item = Vec<u8>;
    type Offset = u64;
    fn poll_batch(&mut self, out: &mut Vec<Vec<u8>>, max: usize) -> Result<SourcePoll> {
        let t = self.topics.0.lock().unwrap();
        let part = &t.partitions[&self.topic][self.partition];
        let new = &part[(self.next as usize).min(part.len())..];
        let n = new.len().min(max);
        out.extend(new[..n].iter().cloned());
        self.next += n as u64;
        Ok(if n == 0 {
            SourcePoll::Idle
        } else {
            SourcePoll::Ready
        })
    }
    fn offset(&self) -> u64 {
        self.next
    }
}

const COUNT: ValueState<u64> = ValueState::new("count");

/// Passes records on and counts them in its operator state (not keyed); every opened
/// instance adds the count it restored to `restored`. Across a rescale the counts must
/// arrive once: each old entry in exactly one new instance.
#[derive(Clone)]
struct Seen {
    count: u64,
    restored: Arc<Mutex<Vec<u64>>>,
}

impl Operator<u64> for Seen {
    type Out = u64;
    type State = u64;

    fn open(
        &mut self,
        restored: Vec<u64>,
        _ctx: &mut OperatorContext<'_, u64>,
    ) -> std::result::Result<(), BoxError> {
        self.count = restored.iter().sum();
        self.restored.lock().unwrap().push(self.count);
        Ok(())
    }

    fn process(
        &mut self,
        record: u64,
        ctx: &mut OperatorContext<'_, u64>,
    ) -> std::result::Result<(), BoxError> {
        self.count += 1;
        ctx.emit(record);
        Ok(())
    }

    fn snapshot(&mut self, _: CheckpointId) -> std::result::Result<Vec<u64>, BoxError> {
        Ok(vec![self.count])
    }
}
const KEYS: u64 = 50;
const RECORDS: u64 = 4_000;

/// How a deployment runs: subtasks per instance, how many sources of `RECORDS` records
/// each it reads (a new version of the job adds one), and its state backend.
#[derive(Clone)]
struct Shape {
    parallelism: usize,
    sources: usize,
    backend: StateBackend,
}

impl Shape {
    /// Two subtasks in memory; from a savepoint, a second source joins the first.
    fn of(from_savepoint: Option<&str>) -> Shape {
        Shape {
            parallelism: 2,
            sources: 1 + from_savepoint.is_some() as usize,
            backend: StateBackend::Memory,
        }
    }
}

/// What the instances of one test share: their checkpoint root, the topics between
/// them, and the counts their `Seen` operators restored.
struct Counting<'a> {
    dir: &'a std::path::Path,
    topics: &'a MemoryTopics,
    seen: &'a Arc<Mutex<Vec<u64>>>,
}

impl Counting<'_> {
    /// Instance `index` of `count`: counts per key; its output goes to `out`. From a
    /// savepoint, a second source of as many records joins the first (a new version
    /// of the job).
    fn instance(
        &self,
        index: usize,
        count: usize,
        out: &CollectSink<(u64, u64)>,
        from_savepoint: Option<&str>,
    ) -> Job {
        self.shaped(
            index,
            count,
            out,
            from_savepoint,
            &Shape::of(from_savepoint),
        )
    }

    /// The same, shaped by `shape`.
    fn shaped(
        &self,
        index: usize,
        count: usize,
        out: &CollectSink<(u64, u64)>,
        from_savepoint: Option<&str>,
        shape: &Shape,
    ) -> Job {
        let (dir, topics, seen) = (self.dir, self.topics, self.seen);
        let mut builder = Job::builder("counts")
            .instance(index, count)
            .parallelism(shape.parallelism)
            .state_backend(shape.backend.clone())
            .checkpoint_every(Duration::from_millis(20))
            .checkpoint_storage(dir.to_str().unwrap())
            .repartition_through(topics.clone());
        if let Some(name) = from_savepoint {
            builder = builder.restore_from_savepoint(name);
        }
        let job = builder.build().unwrap();
        let keys = || VecSource::new((0..RECORDS).map(|i| i % KEYS).collect()).with_splits(8);
        let mut input = job.source("keys", keys());
        for name in ["more", "again", "last"].iter().take(shape.sources - 1) {
            input = input.union(&job.source(name, keys()));
        }
        input
            .transform(Seen {
                count: 0,
                restored: seen.clone(),
            })
            .name("seen")
            .key_by(|k: &u64| *k)
            .process_fn(|k: u64, ctx: &mut KeyedContext<'_, u64, (u64, u64)>| {
                let n = ctx.value(COUNT)?.unwrap_or(0) + 1;
                ctx.set_value(COUNT, &n)?;
                ctx.emit((k, n));
                Ok(())
            })
            .name("count")
            .sink("out", out.clone());
        job
    }
}

/// Start every instance, wait until `outs` hold `expected` records, stop them with a
/// checkpoint kept as savepoint `savepoint`.
fn run_until<T: exactly_engine::api::Data>(
    jobs: Vec<Job>,
    outs: &[CollectSink<T>],
    expected: usize,
    savepoint: &str,
) {
    let handles: Vec<_> = jobs.into_iter().map(|j| j.start().unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let committed = || outs.iter().map(|o| o.committed().len()).sum::<usize>();
    while committed() < expected {
        assert!(
            Instant::now() < deadline,
            "the instances did not finish the input: {} of {expected} records committed",
            committed()
        );
        assert!(
            handles.iter().all(|h| !h.is_finished()),
            "an instance ended by itself"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for h in &handles {
        h.stop_with_savepoint(savepoint);
    }
    for h in handles {
        h.wait().unwrap();
    }
}

/// Two instances, each with two subtasks: the splits of the input are read once over
/// both, every key is counted by the instance that owns its key group, and every
/// count is committed once. Then three instances from their savepoint.
#[test]
fn instances_count_each_key_once_in_the_instance_owning_it_and_rescale() {
    let dir = tempfile::tempdir().unwrap();
    let topics = MemoryTopics::default();
    let outs = [CollectSink::new(), CollectSink::new()];
    let seen = Arc::new(Mutex::new(Vec::new()));
    let c = Counting {
        dir: dir.path(),
        topics: &topics,
        seen: &seen,
    };
    let jobs = (0..2).map(|i| c.instance(i, 2, &outs[i], None)).collect();
    run_until(jobs, &outs, RECORDS as usize, "two");
    assert_eq!(owned_counts(&outs), counts(1..=RECORDS / KEYS));
    // Each instance checkpointed on its own.
    for i in 0..2 {
        assert!(dir.path().join(format!("instances/{i}")).is_dir());
    }
    // Restarted as three without the savepoint, an instance would restore its own
    // part under another share of the work: refused.
    let e = c
        .instance(0, 3, &CollectSink::new(), None)
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("only through a savepoint"), "{e}");

    // Three instances from the two's savepoint, with a second source: every key's
    // count goes on from where the two left it, in the instance that owns it now.
    let outs = [CollectSink::new(), CollectSink::new(), CollectSink::new()];
    seen.lock().unwrap().clear();
    let jobs = (0..3)
        .map(|i| c.instance(i, 3, &outs[i], Some("two")))
        .collect();
    run_until(jobs, &outs, RECORDS as usize, "three");
    assert_eq!(
        owned_counts(&outs),
        counts(RECORDS / KEYS + 1..=2 * RECORDS / KEYS)
    );
    // The operator state of the two (their counts of the first input) was restored
    // once over the three instances' six subtasks.
    let restored = seen.lock().unwrap().clone();
    assert_eq!(restored.len(), 6);
    assert_eq!(restored.iter().sum::<u64>(), RECORDS, "{restored:?}");

    // Back to two from the three's savepoint (no new input): instance 2's location is
    // retired. Started again as the third of three (as it ran, from "two", or from the
    // savepoint that retired it), it would read input the two read: refused.
    let outs = [CollectSink::new(), CollectSink::new()];
    let jobs = (0..2)
        .map(|i| c.instance(i, 2, &outs[i], Some("three")))
        .collect();
    run_until(jobs, &outs, 0, "two-again");
    for from in [Some("two"), Some("three")] {
        let h = c.instance(2, 3, &CollectSink::new(), from).start().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !h.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !h.is_finished() {
            h.cancel();
            panic!("the old deployment's instance 2 runs again (from {from:?})");
        }
        let e = h.wait().unwrap_err().to_string();
        assert!(e.contains("is retired"), "{e}");
    }
}

/// Every key's counts `n`, sorted.
fn counts(n: std::ops::RangeInclusive<u64>) -> Vec<(u64, u64)> {
    (0..KEYS)
        .flat_map(|k| n.clone().map(move |n| (k, n)))
        .collect()
}

/// Everything the instances committed, sorted, after checking that each key was
/// counted by the instance owning its key group (two subtasks per instance).
fn owned_counts(outs: &[CollectSink<(u64, u64)>]) -> Vec<(u64, u64)> {
    owned_counts_of(outs, 2)
}

/// The same with `parallelism` subtasks per instance.
fn owned_counts_of(outs: &[CollectSink<(u64, u64)>], parallelism: usize) -> Vec<(u64, u64)> {
    let mut all = Vec::new();
    for (i, out) in outs.iter().enumerate() {
        for (k, n) in out.committed() {
            let kg = key_group_of_bytes(&postcard::to_allocvec(&k).unwrap(), 128);
            let owner = subtask_for_key_group(kg, 128, parallelism * outs.len()).0 / parallelism;
            assert_eq!(
                owner, i,
                "key {k} was counted by instance {i}, not its owner"
            );
            all.push((k, n));
        }
    }
    all.sort();
    all
}

/// RocksDB state across instance counts: 2 instances of 2 subtasks, then 4 of 1 from
/// their savepoint (each new subtask's key groups are exactly an old subtask's, so its
/// database opens in place, from files in another instance's location for three of
/// them), then 2 of 2 again (in place, instance 1 from the retired locations of 2 and
/// 3), then, with those two locations deleted, 3 of 2. Each version adds a source, and
/// every key's count goes on where it was. The checkpoints of each instance rest only
/// on files in its own location: a location's retention (or its deletion once
/// retired) must not take away another's state. And the last deployment's instance 2,
/// in an empty location, numbers its checkpoints above every id the old instance 2
/// used: the repartition topic's commits are idempotent by checkpoint id per writer,
/// so reusing those ids would drop its records (3,500 of 4,000 arrive).
#[cfg(feature = "rocksdb")]
#[test]
fn rocksdb_state_follows_its_key_groups_across_instance_counts() {
    let dir = tempfile::tempdir().unwrap();
    let topics = MemoryTopics::default();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let c = Counting {
        dir: dir.path(),
        topics: &topics,
        seen: &seen,
    };
    let phases = [
        (2, 2, None, "two"),
        (4, 1, Some("two"), "four"),
        (2, 2, Some("four"), "two-again"),
        (3, 2, Some("two-again"), "three"),
    ];
    for (n, (count, parallelism, from, savepoint)) in phases.into_iter().enumerate() {
        let shape = Shape {
            parallelism,
            sources: n + 1,
            backend: StateBackend::RocksDb(exactly_engine::state::RocksDbConfig {
                local_dir: Some(dir.path().join(format!("local-{savepoint}"))),
                ..exactly_engine::state::RocksDbConfig::default()
            }),
        };
        let outs: Vec<_> = (0..count).map(|_| CollectSink::new()).collect();
        let jobs = (0..count)
            .map(|i| c.shaped(i, count, &outs[i], from, &shape))
            .collect();
        run_until(jobs, &outs, RECORDS as usize, savepoint);
        let before = n as u64 * RECORDS / KEYS;
        assert_eq!(
            owned_counts_of(&outs, parallelism),
            counts(before + 1..=before + RECORDS / KEYS),
            "{count} instances of {parallelism}"
        );
        for i in 0..count {
            let manifests = dir.path().join(format!("instances/{i}/manifests"));
            let mut files = 0;
            for m in std::fs::read_dir(&manifests).unwrap() {
                let text = std::fs::read_to_string(m.unwrap().path()).unwrap();
                for at in text.match_indices("/shared/").map(|(at, _)| at) {
                    files += 1;
                    let start = text[..at].rfind('"').unwrap();
                    let location = &text[start + 1..at];
                    assert!(
                        location.ends_with(&format!("instances/{i}")),
                        "instance {i} of {count} rests on {}",
                        text.get(start + 1..at + 40).unwrap_or(location)
                    );
                }
            }
            assert!(files > 0, "instance {i} of {count} has no RocksDB files");
        }
        if savepoint == "two-again" {
            // The locations the two no longer use are retired: an operator may delete them.
            for i in 2..4 {
                std::fs::remove_dir_all(dir.path().join(format!("instances/{i}"))).unwrap();
            }
        }
    }
}

/// Mistakes refused before anything runs: a `key_by` with no way to reach the other
/// instances, an unnamed or renamed keyed operator (its topic is named after it), an
/// instance outside the count.
#[test]
fn instance_mistakes_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().to_str().unwrap();
    let counting = |job: &Job, name: Option<&str>| {
        let s = job
            .source("keys", VecSource::new(vec![1u64, 2, 3]))
            .key_by(|k: &u64| *k)
            .process_fn(|k: u64, ctx: &mut KeyedContext<'_, u64, u64>| {
                ctx.emit(k);
                Ok(())
            });
        let s = match name {
            Some(n) => s.name(n),
            None => s,
        };
        s.sink("out", CollectSink::new());
    };
    let builder = || {
        Job::builder("mistakes")
            .instance(0, 2)
            .checkpoint_storage(storage)
    };

    let job = builder().build().unwrap();
    counting(&job, Some("count"));
    let e = job.run().unwrap_err().to_string();
    assert!(e.contains("repartition_through"), "{e}");

    let job = builder()
        .repartition_through(MemoryTopics::default())
        .build()
        .unwrap();
    counting(&job, None);
    let e = job.run().unwrap_err().to_string();
    assert!(e.contains("has no name"), "{e}");

    // A rename would move its repartition topic.
    let job = builder()
        .repartition_through(MemoryTopics::default())
        .build()
        .unwrap();
    job.source("keys", VecSource::new(vec![1u64, 2, 3]))
        .key_by(|k: &u64| *k)
        .process_fn(|k: u64, ctx: &mut KeyedContext<'_, u64, u64>| {
            ctx.emit(k);
            Ok(())
        })
        .name("count-v2")
        .restore_state_of("count")
        .sink("out", CollectSink::new());
    let e = job.run().unwrap_err().to_string();
    assert!(e.contains("restores the state of 'count'"), "{e}");

    let e = Job::builder("mistakes")
        .instance(2, 2)
        .checkpoint_storage(storage)
        .build()
        .err()
        .expect("instance 2 of 2 is refused")
        .to_string();
    assert!(e.contains("below the number of instances"), "{e}");
}

/// Event time across instances: per key, 1 s tumbling windows counted with event-time
/// timers behind a repartition topic. Each of the 8 splits holds its own stretch of
/// time, 100 s apart, so the writers' watermarks are far apart: a reader that let one
/// writer's watermark stand for all (or kept watermarks of the deployment before a
/// rescale, or of the version before an upgrade with the same layout) would fire
/// windows before the slower writers' records arrive, which then count twice or late.
/// Every window must be counted once, equal to the batch count.
#[test]
fn event_time_crosses_instances_and_rescales() {
    let dir = tempfile::tempdir().unwrap();
    let topics = MemoryTopics::default();
    let late = Arc::new(Mutex::new(0u64));
    // Run `instances` instances (from savepoint `from`) over batch `batch`, stop them
    // into savepoint `to`: every window of the batch once, no record late.
    let phase = |instances: usize, from: Option<&str>, batch: u64, to: &str| {
        let outs: Vec<_> = (0..instances).map(|_| CollectSink::new()).collect();
        let jobs = (0..instances)
            .map(|i| windowed(i, instances, dir.path(), &topics, &outs[i], from, &late))
            .collect();
        let expected = batch_windows(batch);
        run_until(jobs, &outs, expected.len(), to);
        assert_windows(&outs, &expected);
        assert_eq!(
            *late.lock().unwrap(),
            0,
            "records arrived after their window fired"
        );
    };
    phase(2, None, 0, "two");
    // Three instances from the savepoint with a new source, later in time: the two's
    // watermarks (at the end of time, their input done) must not fire its windows.
    phase(3, Some("two"), 1, "three");
    // A new version with the same layout and one more source: the three's watermarks
    // (restored in the readers' offsets, and at the end of time) are not this
    // deployment's, and must not fire its windows either.
    phase(3, Some("three"), 2, "upgraded");
}

const WINDOW_MS: i64 = 1_000;
const SPLITS: u64 = 8;
const PER_SPLIT: u64 = 600;
const WINDOW_KEYS: u64 = 7;

/// Input `round` (0: the first source, 1: the one added after the rescale): record `r`
/// is in split `r % 8` (the test source deals round-robin), its timestamp 10 ms after
/// its split's previous one, each split starting 100 s after the one before, up to
/// 40 ms out of order.
fn timed_events(round: u64) -> Vec<(i64, u64)> {
    (0..SPLITS * PER_SPLIT)
        .map(|r| {
            let (split, seq) = (r % SPLITS, r / SPLITS);
            let jitter = [0, 40, 10, 30, 20][(seq % 5) as usize];
            let ts = (round * 1_000 + split * 100) as i64 * 1_000 + seq as i64 * 10 + jitter;
            (ts, seq % WINDOW_KEYS)
        })
        .collect()
}

/// The window counts of input `round`, computed in one pass: (key, window start, count).
fn batch_windows(round: u64) -> Vec<(u64, i64, u64)> {
    let mut m = std::collections::BTreeMap::new();
    for (ts, key) in timed_events(round) {
        *m.entry((key, ts.div_euclid(WINDOW_MS) * WINDOW_MS))
            .or_insert(0) += 1;
    }
    m.into_iter().map(|((k, w), n)| (k, w, n)).collect()
}

const WINDOW_COUNTS: MapState<i64, u64> = MapState::new("window-counts");

/// Counts each key's records per 1 s window, emitted when the watermark passes the
/// window's end; a record whose window has already fired is counted in `late`.
#[derive(Clone)]
struct WindowCount {
    late: Arc<Mutex<u64>>,
}

impl KeyedProcessFunction<u64, (i64, u64)> for WindowCount {
    type Out = (u64, i64, u64);

    fn process(
        &mut self,
        (ts, _): (i64, u64),
        ctx: &mut KeyedContext<'_, u64, (u64, i64, u64)>,
    ) -> std::result::Result<(), BoxError> {
        let start = ts.div_euclid(WINDOW_MS) * WINDOW_MS;
        let end = start + WINDOW_MS - 1;
        if end <= ctx.current_watermark() {
            *self.late.lock().unwrap() += 1;
        }
        let n = ctx.map_get(WINDOW_COUNTS, &start)?.unwrap_or(0) + 1;
        ctx.map_put(WINDOW_COUNTS, &start, &n)?;
        ctx.register_event_time_timer(end);
        Ok(())
    }

    fn on_timer(
        &mut self,
        t: Timer,
        ctx: &mut KeyedContext<'_, u64, (u64, i64, u64)>,
    ) -> std::result::Result<(), BoxError> {
        let start = t.time + 1 - WINDOW_MS;
        if let Some(n) = ctx.map_get(WINDOW_COUNTS, &start)? {
            ctx.map_remove(WINDOW_COUNTS, &start)?;
            ctx.emit((*ctx.key(), start, n));
        }
        Ok(())
    }
}

/// Instance `index` of `count` of the windowed job; from a savepoint, it reads the
/// second input instead of the first (whose splits the savepoint has finished).
fn windowed(
    index: usize,
    count: usize,
    dir: &std::path::Path,
    topics: &MemoryTopics,
    out: &CollectSink<(u64, i64, u64)>,
    from_savepoint: Option<&str>,
    late: &Arc<Mutex<u64>>,
) -> Job {
    let mut builder = Job::builder("windows")
        .instance(index, count)
        .parallelism(2)
        .batch_size(50)
        .checkpoint_every(Duration::from_millis(20))
        // Each split reads one batch per checkpoint: the fast and the slow splits stay
        // apart for the whole run.
        .source_batches_per_checkpoint(1)
        .checkpoint_storage(dir.to_str().unwrap())
        .repartition_through(topics.clone());
    if let Some(name) = from_savepoint {
        builder = builder.restore_from_savepoint(name);
    }
    let job = builder.build().unwrap();
    let source = |name: &str, round: u64| {
        job.source(
            name,
            VecSource::new(timed_events(round)).with_splits(SPLITS as usize),
        )
        .with_watermarks(WatermarkStrategy::bounded_out_of_orderness(
            Duration::from_millis(50),
            |e: &(i64, u64)| e.0,
        ))
    };
    let mut input = source("events", 0);
    if from_savepoint.is_some() {
        input = input.union(&source("later", 1));
    }
    if from_savepoint == Some("three") {
        input = input.union(&source("latest", 2));
    }
    input
        .key_by(|e: &(i64, u64)| e.1)
        .process(WindowCount { late: late.clone() })
        .name("window-count")
        .sink("out", out.clone());
    job
}

/// The committed window counts equal `expected`; if not, the first differences.
fn assert_windows(outs: &[CollectSink<(u64, i64, u64)>], expected: &[(u64, i64, u64)]) {
    let mut all: Vec<_> = outs.iter().flat_map(|o| o.committed()).collect();
    all.sort();
    if all != expected {
        let missing: Vec<_> = expected.iter().filter(|w| !all.contains(w)).collect();
        let extra: Vec<_> = all.iter().filter(|w| !expected.contains(w)).collect();
        panic!(
            "{} window counts committed, {} expected; {} missing, first {:?}; {} wrong, first {:?}",
            all.len(),
            expected.len(),
            missing.len(),
            &missing[..missing.len().min(5)],
            extra.len(),
            &extra[..extra.len().min(5)]
        );
    }
}
