//! The transactional Kafka sink against the real Apache Kafka broker that
//! `scripts/test.sh` starts (KRaft, one node): records visible to `read_committed`
//! readers only once a checkpoint commits, exactly once across repeated commits,
//! restarts, crashes and rescaling; a completed but uncommitted checkpoint committed by
//! recovery, an uncompleted one never produced; a zombie producer (an older process with
//! the same transactional id) fenced, and the transaction it left open aborted before
//! new output, so its records never become visible.
//!
//! Tests run in parallel on one broker, so each has its own topics and job name (the
//! transactional ids derive from it).

mod common;

use common::kafka::{brokers, create_topic};
use exactly::engine::api::{RecoveryContext, SinkContext, SinkWriter, TwoPhaseCommitSink};
use exactly::engine::ids::{CheckpointId, OperatorId, SubtaskIndex};
use exactly::prelude::*;
use exactly::sinks::kafka::{KafkaCommittable, KafkaSink, Staging};
use exactly::sources::rdkafka::config::ClientConfig;
use exactly::sources::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::sources::rdkafka::error::KafkaError;
use exactly::sources::rdkafka::message::Message;
use exactly::sources::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use exactly::sources::rdkafka::{Offset, TopicPartitionList};
use exactly::sources::GeneratorSource;
use std::time::Duration;

const PARTITIONS: i32 = 3;

/// One test's broker address, topics and job name.
struct Fx {
    brokers: String,
    topic: String,
    markers: String,
    job: String,
}

/// A topic of [`PARTITIONS`] partitions, a marker topic name and a job name that no
/// other test uses.
fn fixture(test: &str) -> Fx {
    let brokers = brokers();
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let fx = Fx {
        brokers,
        topic: format!("ledger-{test}-{n}"),
        markers: format!("commits-{test}-{n}"),
        job: format!("books-{n}"),
    };
    create_topic(&fx.topic, PARTITIONS);
    fx
}

type Encode = fn(&u64, &mut Vec<u8>, &mut Vec<u8>);

/// Key = record modulo 7 (spreads over partitions), value = the number in decimal.
fn encode(r: &u64, key: &mut Vec<u8>, value: &mut Vec<u8>) {
    key.extend_from_slice((r % 7).to_string().as_bytes());
    value.extend_from_slice(r.to_string().as_bytes());
}

fn sink(fx: &Fx, staging: &std::path::Path) -> KafkaSink<u64, Encode> {
    KafkaSink::new(
        &fx.brokers,
        &fx.topic,
        Staging::dir(staging).unwrap(),
        encode as Encode,
    )
    .unwrap()
    .marker_topic(&fx.markers)
}

/// Every value in the topic (all partitions, committed reads), sorted.
fn topic_values(fx: &Fx) -> Vec<u64> {
    read_topic(fx, "read_committed")
}

/// Every value in the topic read with `isolation` (`read_uncommitted` also returns the
/// records of aborted and open transactions), sorted.
fn read_topic(fx: &Fx, isolation: &str) -> Vec<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &fx.brokers)
        .set("group.id", "test-reader")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&fx.topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    // Ends per partition (a partition may report its end more than once), and
    // consumer errors are informational: librdkafka recovers by itself.
    let mut ended = std::collections::BTreeSet::new();
    let mut values = Vec::new();
    let mut last_error = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ended.len() < PARTITIONS as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "topic not read to its end; ended {ended:?}, last error {last_error:?}"
        );
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ended.insert(p);
            }
            Some(Err(e)) => last_error = Some(e),
            Some(Ok(m)) => {
                let v: u64 = std::str::from_utf8(m.payload().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                let key: u64 = std::str::from_utf8(m.key().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(key, v % 7, "key of {v}");
                values.push(v);
            }
        }
    }
    values.sort_unstable();
    values
}

fn writer_ctx(fx: &Fx, subtask: usize) -> SinkContext {
    SinkContext {
        job: fx.job.clone(),
        sink: OperatorId("ledger".into()),
        subtask: SubtaskIndex(subtask),
        parallelism: 2,
        checkpoint_interval: Some(Duration::from_secs(1)),
        generation: 1,
        io: exactly::testing::io_runtime(),
    }
}

fn recovery(fx: &Fx, restored: Option<u64>) -> RecoveryContext {
    RecoveryContext {
        job: fx.job.clone(),
        sink: OperatorId("ledger".into()),
        restored: restored.map(CheckpointId),
        generation: 1,
        storage_id: "test-location".to_string(),
        io: exactly::testing::io_runtime(),
    }
}

/// Stage `records` as checkpoint `cp` of subtask `subtask`.
fn stage(
    fx: &Fx,
    s: &KafkaSink<u64, Encode>,
    subtask: usize,
    cp: u64,
    records: std::ops::Range<u64>,
) -> KafkaCommittable {
    let mut w = s.open_writer(&writer_ctx(fx, subtask)).unwrap();
    w.write(&mut records.collect()).unwrap();
    w.pre_commit(CheckpointId(cp)).unwrap().unwrap()
}

/// Files under `dir`, recursively.
fn staged_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        staged_files(&p)
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn records_appear_only_at_commit_and_exactly_once() {
    let fx = fixture("visibility");
    let staging = tempfile::tempdir().unwrap();
    let s = sink(&fx, staging.path());
    assert_eq!(s.recover(&recovery(&fx, None), Vec::new()).unwrap(), None);
    let c0 = stage(&fx, &s, 0, 1, 0..1000);
    let c1 = stage(&fx, &s, 1, 1, 1000..1500);
    assert_eq!(c0.records, 1000);
    assert_eq!(staged_files(staging.path()), 2);
    assert!(topic_values(&fx).is_empty(), "visible before commit");

    s.commit(&c0).unwrap();
    s.commit(&c1).unwrap();
    let expected: Vec<u64> = (0..1500).collect();
    assert_eq!(topic_values(&fx), expected);
    assert_eq!(staged_files(staging.path()), 0, "staged objects deleted");

    // Committed again (a replayed notification): nothing new.
    s.commit(&c0).unwrap();
    assert_eq!(topic_values(&fx), expected);

    // A restarted process restores the checkpoint whose commits already happened (a
    // crash after the commits, before the next manifest): the markers in Kafka make the
    // re-commit a no-op, although the staged objects are gone.
    let restarted = sink(&fx, staging.path());
    let highest = restarted
        .recover(&recovery(&fx, Some(1)), vec![c0.clone(), c1.clone()])
        .unwrap();
    assert_eq!(highest, Some(CheckpointId(1)), "markers are reported");
    assert_eq!(topic_values(&fx), expected, "nothing doubled");

    // The next checkpoint still commits.
    let c2 = stage(&fx, &restarted, 0, 2, 1500..1600);
    restarted.commit(&c2).unwrap();
    assert_eq!(topic_values(&fx), (0..1600).collect::<Vec<_>>());
}

#[test]
fn recovery_commits_prepared_and_drops_uncompleted_checkpoints() {
    let fx = fixture("recovery");
    let staging = tempfile::tempdir().unwrap();
    let s = sink(&fx, staging.path());
    s.recover(&recovery(&fx, None), Vec::new()).unwrap();
    // Checkpoint 1 completed (its committables are in the manifest) but the process
    // died before committing; checkpoint 2 was staged by one subtask and never
    // completed.
    let c1a = stage(&fx, &s, 0, 1, 0..300);
    let c1b = stage(&fx, &s, 1, 1, 300..700);
    let _c2 = stage(&fx, &s, 0, 2, 700..900);
    drop(s);
    assert!(topic_values(&fx).is_empty());
    // A put a crash interrupted leaves its temporary file, which listing does not show.
    let half = staging
        .path()
        .join(&fx.job)
        .join("ledger")
        .join("00000000000000000003-1-g1.stage#1");
    std::fs::write(&half, b"half").unwrap();

    let restarted = sink(&fx, staging.path());
    let highest = restarted
        .recover(&recovery(&fx, Some(1)), vec![c1b, c1a])
        .unwrap();
    assert_eq!(
        highest,
        Some(CheckpointId(2)),
        "the uncompleted checkpoint's id is reported, so new ids go above it"
    );
    assert_eq!(topic_values(&fx), (0..700).collect::<Vec<_>>());
    assert_eq!(
        staged_files(staging.path()),
        0,
        "checkpoint 2's staged records and the half-written file are deleted, never produced"
    );
}

/// Staged objects carry the instance's fencing generation: the recovery of an older
/// instance (generation 0 here, the writer's is 1) that finds them stops with `Fenced`
/// before fencing any producer or deleting anything, and the newer instance's own
/// recovery commits them.
#[test]
fn an_older_instance_never_touches_what_a_newer_one_staged() {
    let fx = fixture("generations");
    let staging = tempfile::tempdir().unwrap();
    let s = sink(&fx, staging.path());
    s.recover(&recovery(&fx, None), Vec::new()).unwrap();
    let c = stage(&fx, &s, 0, 3, 0..50);
    assert!(c.staged.ends_with("-0-g1.stage"), "{}", c.staged);
    let older = RecoveryContext {
        generation: 0,
        storage_id: "test-location".to_string(),
        io: exactly::testing::io_runtime(),
        ..recovery(&fx, None)
    };
    let err = sink(&fx, staging.path())
        .recover(&older, Vec::new())
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Fenced {
                epoch: 0,
                newer: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(staged_files(staging.path()), 1, "nothing deleted");
    let restarted = sink(&fx, staging.path());
    restarted.recover(&recovery(&fx, Some(3)), vec![c]).unwrap();
    assert_eq!(topic_values(&fx), (0..50).collect::<Vec<_>>());
}

#[test]
fn transaction_timeout_below_checkpoint_interval_is_refused() {
    let fx = fixture("timeout");
    let staging = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = Job::builder(&fx.job)
        .checkpoint_storage(dir.path().to_str().unwrap())
        .checkpoint_every(Duration::from_secs(120))
        .restart_policy(RestartPolicy::none())
        .build()
        .unwrap();
    job.source("n", GeneratorSource::new(10, |i| i))
        .sink("ledger", sink(&fx, staging.path()));
    let err = job.run().unwrap_err().to_string();
    assert!(
        err.contains("transaction timeout 60s is shorter than the checkpoint interval 120s"),
        "{err}"
    );
    assert!(topic_values(&fx).is_empty());
}

/// Another producer's transaction open on the marker partition holds `read_committed`
/// readers at its start (the last stable offset). A checkpoint's marker committed
/// behind it is invisible to them until it ends, so a recovery that stopped reading at
/// the first end it was shown would take the checkpoint for uncommitted and produce its
/// records again. The recovery reads on until its position reaches the partition's end
/// as of its start: the records stay in the topic once.
#[test]
fn a_marker_behind_an_open_transaction_is_found() {
    use exactly::sources::rdkafka::producer::ThreadedProducer;
    let fx = fixture("openmarker");
    let staging = tempfile::tempdir().unwrap();
    let s = sink(&fx, staging.path());
    s.recover(&recovery(&fx, None), Vec::new()).unwrap(); // creates the marker topic
    let foreign: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", &fx.brokers)
        .set("transactional.id", format!("foreign-{}", fx.job))
        .create()
        .unwrap();
    foreign.init_transactions(Duration::from_secs(30)).unwrap();
    foreign.begin_transaction().unwrap();
    foreign
        .send(
            exactly::sources::rdkafka::producer::BaseRecord::to(&fx.markers)
                .partition(0)
                .key("foreign")
                .payload("1"),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    foreign.flush(Duration::from_secs(30)).unwrap();
    // Checkpoint 1 commits, its marker behind the open transaction.
    let c1 = stage(&fx, &s, 0, 1, 0..500);
    s.commit(&c1).unwrap();
    assert_eq!(topic_values(&fx), (0..500).collect::<Vec<_>>());
    drop(s);
    // A restarted process restores checkpoint 1 while the transaction is still open;
    // it ends two seconds later.
    let ender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        foreign.abort_transaction(Duration::from_secs(30)).unwrap();
    });
    let restarted = sink(&fx, staging.path());
    let highest = restarted
        .recover(&recovery(&fx, Some(1)), vec![c1])
        .unwrap();
    ender.join().unwrap();
    assert_eq!(highest, Some(CheckpointId(1)), "the marker was found");
    assert_eq!(
        topic_values(&fx),
        (0..500).collect::<Vec<_>>(),
        "checkpoint 1 produced again"
    );
}

/// This sink's own producer fenced during a commit (another process took its
/// transactional id, as a newer instance's recovery does): the commit fails, nothing of
/// it becomes visible, and the commit is not retried on the fenced producer. The
/// process that restores the checkpoint commits its records once; an interval without
/// records then has nothing to commit, and the next one commits.
#[test]
fn a_commit_fenced_midway_is_failed_and_committed_once_after_restore() {
    let fx = fixture("fenced");
    let staging = tempfile::tempdir().unwrap();
    let s = sink(&fx, staging.path());
    s.recover(&recovery(&fx, None), Vec::new()).unwrap();
    let c1 = stage(&fx, &s, 0, 1, 0..100);
    s.commit(&c1).unwrap(); // the producer exists now
    let c2 = stage(&fx, &s, 0, 2, 100..300);
    // Another producer takes subtask 0's transactional id: ours is fenced.
    let usurper: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &fx.brokers)
        .set("transactional.id", transactional_id(&fx, 0))
        .create()
        .unwrap();
    usurper.init_transactions(Duration::from_secs(30)).unwrap();
    let err = s.commit(&c2).unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("fenced"),
        "not reported as fenced: {err}"
    );
    assert_eq!(
        topic_values(&fx),
        (0..100).collect::<Vec<_>>(),
        "records of a fenced commit are visible"
    );
    drop(usurper);
    drop(s);
    let restarted = sink(&fx, staging.path());
    restarted
        .recover(&recovery(&fx, Some(2)), vec![c2])
        .unwrap();
    assert_eq!(topic_values(&fx), (0..300).collect::<Vec<_>>());
    // An interval without records has nothing to commit, and the next one commits.
    let mut w = restarted.open_writer(&writer_ctx(&fx, 0)).unwrap();
    assert!(w.pre_commit(CheckpointId(3)).unwrap().is_none());
    let c4 = stage(&fx, &restarted, 0, 4, 300..310);
    restarted.commit(&c4).unwrap();
    assert_eq!(topic_values(&fx), (0..310).collect::<Vec<_>>());
}

/// The checkpoint storage lost manifests (deleted, moved aside, a fresh location for the
/// same job) while the topic kept what they committed: the recovery finds a marker above
/// the restored checkpoint and stops with an error that explains this, instead of
/// letting the job produce those records again. Restoring the right checkpoint works.
#[test]
fn markers_above_the_restored_checkpoint_stop_the_recovery() {
    let fx = fixture("ahead");
    let staging = tempfile::tempdir().unwrap();
    let s = sink(&fx, staging.path());
    s.recover(&recovery(&fx, None), Vec::new()).unwrap();
    for cp in 1..=3u64 {
        let c = stage(&fx, &s, 0, cp, cp * 100..cp * 100 + 100);
        s.commit(&c).unwrap();
    }
    drop(s);
    for restored in [None, Some(2)] {
        let err = sink(&fx, staging.path())
            .recover(&recovery(&fx, restored), Vec::new())
            .unwrap_err();
        assert!(
            matches!(err, exactly::engine::error::Error::Config { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("committed by checkpoint 3") && msg.contains(&fx.markers),
            "{msg}"
        );
    }
    assert_eq!(topic_values(&fx), (100..400).collect::<Vec<_>>());
    sink(&fx, staging.path())
        .recover(&recovery(&fx, Some(3)), Vec::new())
        .unwrap();
}

/// Two different jobs with one name (and a sink of one name) on one Kafka cluster share
/// transactional ids and markers. Job B, restoring its checkpoint 3 with that
/// checkpoint's output pending, would find job A's marker at 3 and skip its own commit as
/// done: its records lost. Markers carry the committing checkpoint location's identity,
/// so B's recovery stops instead, naming both, and touches nothing. A marker without an
/// identity (written before they were recorded) is taken as the job's own.
#[test]
fn another_job_with_the_same_name_is_refused_not_skipped() {
    let fx = fixture("samename");
    let (staging_a, staging_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let location = |id: &str, restored: Option<u64>| RecoveryContext {
        storage_id: id.to_string(),
        io: exactly::testing::io_runtime(),
        ..recovery(&fx, restored)
    };
    let a = sink(&fx, staging_a.path());
    a.recover(&location("location-a", None), Vec::new())
        .unwrap();
    for cp in 1..=3u64 {
        a.commit(&stage(&fx, &a, 0, cp, cp * 100..cp * 100 + 100))
            .unwrap();
    }
    drop(a);
    // A marker of job A's subtask 1 from before identities: no header.
    let old: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &fx.brokers)
        .create()
        .unwrap();
    old.send(
        BaseRecord::to(&fx.markers)
            .partition(0)
            .key(&transactional_id(&fx, 1))
            .payload("1"),
    )
    .unwrap();
    old.flush(Duration::from_secs(30)).unwrap();
    let b = sink(&fx, staging_b.path());
    let theirs = stage(&fx, &b, 0, 3, 5000..5100);
    let err = b
        .recover(&location("location-b", Some(3)), vec![theirs])
        .unwrap_err();
    assert!(
        matches!(err, exactly::engine::error::Error::Config { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("another checkpoint location")
            && msg.contains("location-a")
            && msg.contains("location-b")
            && msg.contains(&fx.markers),
        "{msg}"
    );
    assert_eq!(
        topic_values(&fx),
        (100..400).collect::<Vec<_>>(),
        "B produced nothing"
    );
    assert_eq!(
        staged_files(staging_b.path()),
        1,
        "B's staged output is kept"
    );
    // Job A itself, on its own location, goes on.
    let a = sink(&fx, staging_a.path());
    assert_eq!(
        a.recover(&location("location-a", Some(3)), Vec::new())
            .unwrap(),
        Some(CheckpointId(3))
    );
}

/// The marker topic the sink creates keeps one record per transactional id for ever:
/// compacted, not deleted by retention (a marker lost to retention would let a
/// replayed commit produce its records again), in one partition.
#[test]
fn the_marker_topic_is_created_compacted() {
    let fx = fixture("markertopic");
    let staging = tempfile::tempdir().unwrap();
    sink(&fx, staging.path())
        .recover(&recovery(&fx, None), Vec::new())
        .unwrap();
    assert_eq!(
        common::kafka::topic_config(&fx.markers, "cleanup.policy").as_deref(),
        Some("compact")
    );
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &fx.brokers)
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(&fx.markers), Duration::from_secs(10))
        .unwrap();
    assert_eq!(md.topics()[0].partitions().len(), 1);
}

/// A transaction timeout above the broker's `transaction.max.timeout.ms` (15 minutes by
/// default) is refused by the broker when the first producer initialises; the job stops
/// with a configuration error naming the setting (a class that is never retried, so the
/// default restart policy does not wait it out), and nothing is committed.
#[test]
fn transaction_timeout_above_the_brokers_maximum_is_refused() {
    let fx = fixture("maxtimeout");
    let staging = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = Job::builder(&fx.job)
        .checkpoint_storage(dir.path().to_str().unwrap())
        .checkpoint_every(Duration::from_secs(1))
        .build()
        .unwrap();
    job.source("n", GeneratorSource::new(10, |i| i)).sink(
        "ledger",
        sink(&fx, staging.path()).transaction_timeout(Duration::from_secs(3600)),
    );
    let err = job.run().unwrap_err();
    assert!(
        matches!(err, exactly::engine::error::Error::Config { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("transaction.timeout.ms = 3600000 ms")
            && msg.contains("transaction.max.timeout.ms"),
        "{msg}"
    );
    assert!(topic_values(&fx).is_empty());
}

/// Stages at parallelism 2 and 3 crash after 4 checkpoints, the last (1) finishes; the
/// topic then holds every record exactly once.
#[test]
fn crashes_and_rescaling_commit_every_record_exactly_once() {
    let fx = fixture("crashes");
    let staging = tempfile::tempdir().unwrap();
    let checkpoints = tempfile::tempdir().unwrap();
    const N: u64 = 20_000;
    let stages = [2usize, 3, 1];
    for (i, &p) in stages.iter().enumerate() {
        let last = i + 1 == stages.len();
        let mut b = Job::builder(&fx.job)
            .checkpoint_storage(checkpoints.path().to_str().unwrap())
            .checkpoint_every(Duration::from_millis(20))
            .parallelism(p)
            .batch_size(16)
            .restart_policy(RestartPolicy::none());
        if !last {
            // 313 batches a split: a crashing stage reads at most 5 · 20 of them, so
            // both crashes land mid-stream however slowly checkpoints commit.
            b = b
                .source_batches_per_checkpoint(20)
                .inject_failure_after_checkpoint(4);
        }
        let job = b.build().unwrap();
        job.source("n", GeneratorSource::new(N, |i| i).with_splits(4))
            .map(|x| x)
            .sink("ledger", sink(&fx, staging.path()));
        match job.run() {
            Ok(_) => assert!(last, "stage {i} finished before its crash"),
            Err(e) => {
                assert!(!last && e.to_string().contains("injected failure"), "{e}");
                // Records of completed checkpoints are in Kafka, no more than once.
                let so_far = topic_values(&fx);
                assert!(so_far.windows(2).all(|w| w[0] < w[1]), "a duplicate");
            }
        }
    }
    assert_eq!(topic_values(&fx), (0..N).collect::<Vec<_>>());
    assert_eq!(staged_files(staging.path()), 0, "no staged records left");
}

/// The transactional id of subtask `subtask` of this test's sink (as the sink derives it).
fn transactional_id(fx: &Fx, subtask: usize) -> String {
    format!("exactly/{}/ledger/{subtask}", fx.job)
}

/// A process that died inside its commit leaves a transaction open, and an older
/// instance still running (a zombie) may try to finish its own: recovery fences every
/// transactional id it has pending or staged output for, which aborts the open
/// transaction, and the zombie's late commit is refused. Its records are in the log but
/// never visible to `read_committed` readers, and they block nothing.
#[test]
fn a_zombie_is_fenced_and_its_open_transaction_never_becomes_visible() {
    let fx = fixture("zombie");
    let staging = tempfile::tempdir().unwrap();
    let s = sink(&fx, staging.path());
    s.recover(&recovery(&fx, None), Vec::new()).unwrap();
    let c1 = stage(&fx, &s, 0, 1, 0..100);
    s.commit(&c1).unwrap();
    // Checkpoint 2 completed (subtask 0's committable is in its manifest); subtask 1
    // staged checkpoint 3, which never completed. Then the process "dies".
    let c2 = stage(&fx, &s, 0, 2, 100..200);
    let _c3 = stage(&fx, &s, 1, 3, 200..300);
    drop(s);

    // Zombies with the sink's transactional ids, each inside a transaction with records
    // produced and not committed.
    let zombies: Vec<BaseProducer> = (0..2)
        .map(|subtask| {
            let z: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &fx.brokers)
                .set("transactional.id", transactional_id(&fx, subtask))
                .create()
                .unwrap();
            z.init_transactions(Duration::from_secs(30)).unwrap();
            z.begin_transaction().unwrap();
            for v in 0..10u64 {
                let v = 1_000_000 + 100 * subtask as u64 + v;
                let (key, value) = ((v % 7).to_string(), v.to_string());
                z.send(BaseRecord::to(&fx.topic).key(&key).payload(&value))
                    .unwrap();
            }
            z.flush(Duration::from_secs(30)).unwrap();
            z
        })
        .collect();

    let restarted = sink(&fx, staging.path());
    let highest = restarted
        .recover(&recovery(&fx, Some(2)), vec![c2])
        .unwrap();
    assert_eq!(highest, Some(CheckpointId(3)));
    for z in &zombies {
        assert!(
            z.commit_transaction(Duration::from_secs(30)).is_err(),
            "a fenced zombie cannot commit"
        );
    }
    let c4 = stage(&fx, &restarted, 1, 4, 300..400);
    restarted.commit(&c4).unwrap();

    let mut expected: Vec<u64> = (0..200).collect();
    expected.extend(300..400);
    assert_eq!(topic_values(&fx), expected, "only committed checkpoints");
    let all = read_topic(&fx, "read_uncommitted");
    assert_eq!(
        all.iter().filter(|v| **v >= 1_000_000).count(),
        20,
        "the zombies' records are in the log (aborted), so the check above means something"
    );
}
