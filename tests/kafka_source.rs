//! The Kafka source against the real Apache Kafka broker `scripts/test.sh` starts on
//! 127.0.0.1 (KRaft, one node).
//!
//! * The restored offset is the next record: reading k records, then reopening at the
//!   reported offset, yields record k+1 first, and never record k again (the peer
//!   off-by-one bug, tested explicitly), both with one record per batch and with large
//!   batches, where the restore lands inside a batch and the records before its offset
//!   must be dropped (librdkafka does; the reader also skips any it is handed).
//! * A job over a 3-partition topic crashes mid-stream after a checkpoint, restores at
//!   parallelism 3, crashes again and finishes at 1 (partitions redistributed each
//!   time): its committed output equals a failure-free run's, so no record was read
//!   twice into the output and none was skipped. The pipeline includes an event-time
//!   window, so per-partition watermarks are exercised.
//! * A partition added to the topic while an unbounded job runs is found and read from
//!   its first record, once, without a restart.
//! * 64 partitions at parallelism 2 are read by two consumers, not 64.
//! * Records deleted before the job read them stop it, naming them, instead of being
//!   jumped over.
//! * A topic written in transactions, some committed and some aborted: the job reads
//!   exactly the committed records, once each, across crashes, restores inside the
//!   topic and rescaling, although commit and abort markers occupy offsets between
//!   them.

mod common;

use common::kafka::{add_partitions, brokers, create_topic};
use exactly::operators::{WindowExt, Windows};
use exactly::prelude::*;
use exactly::sources::rdkafka::client::ClientContext;
use exactly::sources::rdkafka::config::ClientConfig;
use exactly::sources::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::sources::rdkafka::producer::Producer;
use exactly::sources::rdkafka::producer::{
    BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer,
};
use exactly::sources::KafkaSource;
use exactly::testing::CollectSink;
use exactly::testing::ExactlyOnceCheck;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const PARTITIONS: i32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Event {
    seq: u64,
    key: u32,
    ts: i64,
}

/// A new, empty topic named after `name`, with `PARTITIONS` partitions.
fn fresh_topic(name: &str) -> String {
    let topic = format!(
        "{name}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    create_topic(&topic, PARTITIONS);
    topic
}

/// A fresh topic with `n` events spread round-robin over the partitions.
fn topic_with(name: &str, n: u64) -> String {
    let topic = fresh_topic(name);
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers());
    cfg.set("batch.num.messages", "1").set("linger.ms", "0");
    produce(&cfg, &topic, n);
    topic
}

/// Counts failed deliveries, so test data is known to be complete.
#[derive(Default)]
struct Deliveries(AtomicU64);

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Send `n` events round-robin over the partitions and wait until all are acknowledged;
/// a failed delivery fails the test. Idempotent: a produce request retried after a
/// timeout (a broker that just created the topic) must not write a record twice, or
/// the test data itself has a duplicate, which arrives late for its window.
fn produce(cfg: &ClientConfig, topic: &str, n: u64) {
    let mut cfg = cfg.clone();
    cfg.set("enable.idempotence", "true");
    let producer: ThreadedProducer<Deliveries> =
        cfg.create_with_context(Deliveries::default()).unwrap();
    for seq in 0..n {
        send_event(&producer, topic, seq);
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    assert_eq!(
        producer.context().0.load(Ordering::SeqCst),
        0,
        "records of the test data were not delivered"
    );
}

/// Queue event `seq` for its partition (round-robin by sequence number).
fn send_event(producer: &ThreadedProducer<Deliveries>, topic: &str, seq: u64) {
    let e = Event {
        seq,
        key: (seq % 37) as u32,
        ts: seq as i64 * 10,
    };
    let payload = serde_json::to_vec(&e).unwrap();
    let key = seq.to_string();
    let mut record = BaseRecord::to(topic)
        .partition((seq % PARTITIONS as u64) as i32)
        .key(&key)
        .payload(&payload);
    loop {
        match producer.send(record) {
            Ok(()) => break,
            Err((_, r)) => {
                // Queue full: let deliveries drain.
                std::thread::sleep(Duration::from_millis(5));
                record = r;
            }
        }
    }
}

type Decode = fn(&[u8]) -> serde_json::Result<Event>;

fn decode(b: &[u8]) -> serde_json::Result<Event> {
    serde_json::from_slice(b)
}

fn source(topic: &str) -> KafkaSource<Event, Decode> {
    KafkaSource::new(&brokers(), topic, decode as Decode).bounded()
}

#[test]
fn restored_offset_is_the_next_record() {
    let topic = topic_with("offsets", 300);
    check_resume_at_next_record(source(&topic));
}

#[test]
fn restored_offset_inside_a_batch_is_the_next_record() {
    let topic = topic_with("batched", 0);
    let mut cfg = ClientConfig::new();
    // Batch generously, so partition 0's 100 records arrive in few batches and the
    // resume point (offset 37) lies inside one.
    cfg.set("bootstrap.servers", brokers())
        .set("linger.ms", "200")
        .set("batch.num.messages", "10000");
    produce(&cfg, &topic, 300);
    check_resume_at_next_record(source(&topic));
}

/// Partition 0 holds 100 records; reading 37 and resuming at the reported offset yields
/// exactly the other 63.
fn check_resume_at_next_record(src: KafkaSource<Event, Decode>) {
    use exactly::engine::api::{Source, SourceContext, SourcePoll, SourceReader};
    let splits = src.splits().unwrap();
    assert_eq!(splits.len(), PARTITIONS as usize);
    let ctx = SourceContext {
        operator: exactly::engine::ids::OperatorId("events".into()),
        subtask: exactly::engine::ids::SubtaskIndex(0),
    };
    let read_all = |r: &mut <KafkaSource<Event, _> as Source>::Reader, max: usize| {
        let mut out = Vec::new();
        while out.len() < max {
            let want = max - out.len();
            match r.poll_batch(&mut out, want).unwrap() {
                SourcePoll::End => break,
                SourcePoll::Ready | SourcePoll::Idle => {}
            }
        }
        out
    };
    // The whole partition 0: seq 0, 3, 6, ...
    let mut whole = src.open(&splits[0], None, &ctx).unwrap();
    let all = read_all(&mut whole, usize::MAX);
    assert_eq!(all.len(), 100);
    assert!(all.iter().all(|e| e.seq % PARTITIONS as u64 == 0));
    // Read 37 records, note the offset, reopen there.
    let mut first = src.open(&splits[0], None, &ctx).unwrap();
    let head = read_all(&mut first, 37);
    let offset = first.offset();
    assert_eq!(offset, 37, "the offset names the next record");
    let mut resumed = src.open(&splits[0], Some(offset), &ctx).unwrap();
    let tail = read_all(&mut resumed, usize::MAX);
    assert_eq!(
        tail.first(),
        Some(&all[37]),
        "the first record after restore is the next one"
    );
    assert!(
        !tail.contains(&head[36]),
        "the last record before the checkpoint is not re-read"
    );
    let mut joined = head.clone();
    joined.extend(tail);
    assert_eq!(joined, all, "nothing skipped, nothing twice");
    // Resumed at the end: no record, and the split ends (after some idle polls while
    // the broker answers).
    let mut at_end = src.open(&splits[0], Some(100), &ctx).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while at_end.poll_batch(&mut out, 10).unwrap() != SourcePoll::End {
        assert!(std::time::Instant::now() < deadline, "no end of partition");
    }
    assert!(out.is_empty(), "records after the end: {out:?}");
}

/// Kafka clients alive in this process: librdkafka gives each exactly one thread named
/// `rdk:main`. (The test command runs each test in a process of its own; under a plain
/// `cargo test` the other tests' clients count too.)
fn kafka_clients() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "rdk:main")
        .count()
}

/// A topic with 64 partitions read at parallelism 2 takes two consumers (one per
/// subtask, each partition read through its own queue), not 64 clients with their
/// threads and connections; every record is read once.
#[test]
fn sixty_four_partitions_take_one_consumer_per_subtask() {
    static MOST_CLIENTS: AtomicU64 = AtomicU64::new(0);
    const WIDE: u64 = 64;
    let topic = format!("wide-{}", fresh_topic("x"));
    create_topic(&topic, WIDE as i32);
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "20");
    let producer: ThreadedProducer<Deliveries> =
        cfg.create_with_context(Deliveries::default()).unwrap();
    for seq in 0..WIDE * 100 {
        let payload = serde_json::to_vec(&Event { seq, key: 0, ts: 0 }).unwrap();
        producer
            .send(
                BaseRecord::<(), _>::to(&topic)
                    .partition((seq % WIDE) as i32)
                    .payload(&payload),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    assert_eq!(producer.context().0.load(Ordering::SeqCst), 0);
    drop(producer);

    let job = Job::builder("wide")
        .checkpoint_storage("memory://")
        .parallelism(2)
        .build()
        .unwrap();
    let out = CollectSink::new();
    job.source("events", source(&topic))
        .map(|e: Event| {
            if e.seq.is_multiple_of(50) {
                MOST_CLIENTS.fetch_max(kafka_clients() as u64, Ordering::SeqCst);
            }
            e.seq
        })
        .sink("out", out.clone());
    job.run().unwrap();
    assert_eq!(out.sorted(), (0..WIDE * 100).collect::<Vec<_>>());
    let most = MOST_CLIENTS.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&most),
        "{most} Kafka clients while reading 64 partitions at parallelism 2"
    );
}

/// A task failure restarts the job inside the process: every subtask's readers close
/// and reopen on the restored offsets, their shared consumers with them (a consumer
/// still holding a partition would refuse it to its successor). Every record is still
/// committed once.
#[test]
fn an_in_process_restart_reopens_the_shared_consumers() {
    use std::sync::atomic::AtomicBool;
    static FAILED: AtomicBool = AtomicBool::new(false);
    let topic = topic_with("restart", 3_000);
    let tmp = tempfile::tempdir().unwrap();
    let job = Job::builder("restart")
        .checkpoint_storage(tmp.path().to_str().unwrap())
        .checkpoint_every(Duration::from_millis(20))
        .parallelism(2)
        // 20 batches a partition at most: several checkpoints before event 2000.
        .source_batches_per_checkpoint(2)
        .batch_size(50)
        .build()
        .unwrap();
    let out = CollectSink::new();
    job.source("events", source(&topic))
        .map(|e: Event| {
            if e.seq == 2_000 && !FAILED.swap(true, Ordering::SeqCst) {
                panic!("injected failure at event 2000");
            }
            e.seq
        })
        .sink("out", out.clone());
    let report = job.run().unwrap();
    assert!(FAILED.load(Ordering::SeqCst));
    assert_eq!(report.restarts, 1);
    assert_eq!(out.sorted(), (0..3_000).collect::<Vec<u64>>());
}

/// Records deleted under the offset a job must read on from (retention, or
/// `DeleteRecords`) stop it with an error naming topic, partition and offsets: at a
/// restore, and while it reads. Never a silent jump over the gap, which is what the
/// consumer's default reset policy does.
#[test]
fn records_deleted_before_they_were_read_stop_the_job_naming_them() {
    use exactly::engine::api::{Source, SourceContext, SourcePoll, SourceReader};
    use exactly::engine::error::ErrorClass;
    let topic = topic_with("deleted", 300);
    let ctx = SourceContext {
        operator: exactly::engine::ids::OperatorId("events".into()),
        subtask: exactly::engine::ids::SubtaskIndex(0),
    };
    // Fetch one record at a time and keep at most one queued, so the reader's fetch
    // position stays a few records ahead of what it returned.
    let src = source(&topic)
        .set("queued.min.messages", "1")
        .set("fetch.message.max.bytes", "1")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", "5");
    let splits = src.splits().unwrap();
    common::kafka::delete_records_below(&topic, 0, 50);

    // A restore below the log start.
    let err = src
        .open(&splits[0], Some(10), &ctx)
        .err()
        .expect("restore below the log start");
    let msg = err.to_string();
    for part in [
        topic.as_str(),
        "partition 0",
        "offset 10",
        "offset 50",
        "deleted",
    ] {
        assert!(msg.contains(part), "'{part}' missing in: {msg}");
    }
    assert_eq!(
        err.class(),
        ErrorClass::Stop,
        "retrying cannot bring records back"
    );
    // At or above the log start, the rest is read.
    let mut at_start = src.open(&splits[0], Some(50), &ctx).unwrap();
    let mut out = Vec::new();
    while at_start.poll_batch(&mut out, 100).unwrap() != SourcePoll::End {}
    assert_eq!(out.len(), 50);
    assert_eq!(out[0].seq, 150, "partition 0's record 50 is event 150");

    // While reading: partition 1 is read from its start, then its records below 90
    // are deleted while the reader is a few records in.
    let mut reader = src.open(&splits[1], None, &ctx).unwrap();
    let mut read = Vec::new();
    while read.len() < 5 {
        let want = 5 - read.len();
        reader.poll_batch(&mut read, want).unwrap();
    }
    common::kafka::delete_records_below(&topic, 1, 90);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let err = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no error after the deletion"
        );
        match reader.poll_batch(&mut read, 10) {
            Ok(SourcePoll::End) => panic!(
                "the partition ended without an error; read {:?}",
                read.iter().map(|e| e.seq).collect::<Vec<_>>()
            ),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    // What was read is gap-free, and the error names the gap.
    let seqs: Vec<u64> = read.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (0..seqs.len() as u64).map(|i| 1 + 3 * i).collect();
    assert_eq!(seqs, expected, "records were skipped");
    let msg = err.to_string();
    for part in [
        topic.as_str(),
        "partition 1",
        &format!("offset {}", seqs.len()),
        "offset 90",
    ] {
        assert!(msg.contains(part), "'{part}' missing in: {msg}");
    }
    assert_eq!(err.class(), ErrorClass::Stop);
}

#[test]
fn crash_restore_and_rescale_over_partitions() {
    let topic = topic_with("rescale", 30_000);
    let report = ExactlyOnceCheck {
        // A consumer needs a few hundred ms for its first fetch: crash only after 15
        // checkpoints 20 ms apart, so the restored offsets lie inside the partitions
        // (an off-by-one in the source then changes a count; checked by mutation).
        // 157 batches a partition: each crashing stage reads at most 16 · 4.
        checkpoint_interval: Duration::from_millis(20),
        crash_after_checkpoints: 15,
        batches_per_checkpoint: 4,
        ..Default::default()
    }
    .run("kafka", |job, out: &CollectSink<(u32, i64, u64)>| {
        let events = job.source("events", source(&topic)).with_watermarks(
            WatermarkStrategy::bounded_out_of_orderness(Duration::from_millis(500), |e: &Event| {
                e.ts
            }),
        );
        // One-second event-time windows per key. Keys span all partitions, so a window
        // fires only when every partition's watermark passed it; a record read twice or
        // skipped changes a count.
        events
            .key_by(|e| e.key)
            .window(Windows::tumbling(Duration::from_secs(1)), |e: &Event| e.ts)
            .name("count")
            .count()
            .results
            .map(|w| (w.key, w.window.start, w.value))
            .sink("out", out.clone());
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // 300 s of event time, 37 keys: one count per key and second.
    assert_eq!(report.golden_records, 37 * 300);
    assert_eq!(report.crashes, 2);
}

/// The group's committed offsets of `topic`'s partitions (`None`: nothing committed).
fn group_offsets(group: &str, topic: &str) -> Vec<Option<i64>> {
    use exactly::sources::rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    (0..PARTITIONS)
        .map(
            |p| match committed.find_partition(topic, p).unwrap().offset() {
                Offset::Offset(n) => Some(n),
                _ => None,
            },
        )
        .collect()
}

/// With `commit_offsets_to_group`, completed checkpoints' offsets reach the consumer
/// group (for lag monitoring): after a bounded job they are each partition's end,
/// the final checkpoint's offsets. Without it, the source commits nothing. (That a
/// notice never runs ahead of committed output is tested in the engine's
/// `sources_hear_of_completed_checkpoints_after_their_output_is_committed`.)
#[test]
fn completed_checkpoints_commit_offsets_to_the_monitoring_group() {
    let topic = topic_with("group", 3_000);
    let run = |src: KafkaSource<Event, Decode>| {
        let tmp = tempfile::tempdir().unwrap();
        let out = CollectSink::new();
        let job = Job::builder("group")
            .checkpoint_storage(tmp.path().to_str().unwrap())
            .checkpoint_every(Duration::from_millis(20))
            .parallelism(2)
            .build()
            .unwrap();
        job.source("events", src)
            .map(|e| e.seq)
            .sink("out", out.clone());
        job.run().unwrap();
        assert_eq!(out.sorted(), (0..3_000).collect::<Vec<u64>>());
    };
    let group = format!("{topic}-monitor");
    run(source(&topic).commit_offsets_to_group(&group));
    assert_eq!(
        group_offsets(&group, &topic),
        vec![Some(1_000); PARTITIONS as usize],
        "the group holds the final checkpoint's offsets: every partition's end"
    );
    // The plain source: its consumers' group (named after the operator) stays empty.
    run(source(&topic));
    assert_eq!(
        group_offsets("exactly-events", &topic),
        vec![None; PARTITIONS as usize],
        "without monitoring, nothing is committed"
    );
}

/// A partition added while an unbounded job runs: found by the next discovery, read from
/// its first record by one subtask; every record of the topic reaches the output once.
#[test]
fn a_partition_added_while_the_job_runs_is_read_once() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    let topic = topic_with("grown", 300);
    let tmp = tempfile::tempdir().unwrap();
    let out = CollectSink::new();
    let job = Job::builder("grown")
        .checkpoint_storage(tmp.path().to_str().unwrap())
        .parallelism(2)
        .build()
        .unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    let src = KafkaSource::new(&brokers(), &topic, decode as Decode)
        .discover_partitions_every(Some(Duration::from_millis(100)));
    job.source("events", src)
        .map(move |e| {
            counted.fetch_add(1, Ordering::SeqCst);
            e.seq
        })
        .sink("out", out.clone());
    let handle = job.start().unwrap();
    let wait_for = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while seen.load(Ordering::SeqCst) < n {
            assert!(
                std::time::Instant::now() < deadline && !handle.is_finished(),
                "the job read {} of {n} records",
                seen.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(300);
    add_partitions(&topic, PARTITIONS as usize + 1);
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true");
    let producer: ThreadedProducer<Deliveries> =
        cfg.create_with_context(Deliveries::default()).unwrap();
    for seq in 300..400u64 {
        let payload = serde_json::to_vec(&Event { seq, key: 0, ts: 0 }).unwrap();
        producer
            .send(
                BaseRecord::<(), _>::to(&topic)
                    .partition(PARTITIONS)
                    .payload(&payload),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    assert_eq!(producer.context().0.load(Ordering::SeqCst), 0);
    wait_for(400);
    handle.stop_with_checkpoint();
    let report = handle.wait().unwrap();
    assert!(report.stopped_at.is_some());
    // Finding the partition must not cost a restart (a consumer that has been running
    // does not know the new partition until its metadata is refreshed).
    assert_eq!(report.restarts, 0, "the job restarted");
    assert_eq!(out.sorted(), (0..400).collect::<Vec<u64>>());
}

/// Write `txns` transactions of `per_txn` events each, round-robin over the partitions,
/// aborting every third (the second, fifth, ...); returns the sequence numbers of the
/// committed events. Each transaction's markers occupy one offset per partition.
fn produce_transactions(topic: &str, txns: u64, per_txn: u64) -> Vec<u64> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers())
        .set("transactional.id", format!("{topic}-writer"))
        .set("linger.ms", "0");
    let producer: ThreadedProducer<Deliveries> =
        cfg.create_with_context(Deliveries::default()).unwrap();
    let t = Duration::from_secs(30);
    producer.init_transactions(t).unwrap();
    let mut committed = Vec::new();
    let mut seq = 0u64;
    for txn in 0..txns {
        producer.begin_transaction().unwrap();
        let mut this = Vec::new();
        for _ in 0..per_txn {
            send_event(&producer, topic, seq);
            this.push(seq);
            seq += 1;
        }
        // Every record reaches the log before the transaction ends (an abort would
        // otherwise drop the ones still queued in the client, and nothing aborted would
        // be in the topic to skip).
        producer.flush(t).unwrap();
        if txn % 3 == 1 {
            producer.abort_transaction(t).unwrap();
        } else {
            producer.commit_transaction(t).unwrap();
            committed.extend(this);
        }
    }
    committed
}

/// A bounded job over a topic with a transaction still open ends where each partition
/// was stable when its reader opened (the last stable offset: the broker answers the
/// end of a `read_committed` reader with it), instead of waiting for the transaction:
/// it reads the records committed before it, once, and finishes; the transaction's
/// records, which may yet commit, are left for a later run.
#[test]
fn a_bounded_job_ends_at_the_last_stable_offset_of_an_open_transaction() {
    let topic = topic_with("opentxn", 300);
    let t = Duration::from_secs(30);
    let producer: ThreadedProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", format!("{topic}-open"))
        .create_with_context(Deliveries::default())
        .unwrap();
    producer.init_transactions(t).unwrap();
    producer.begin_transaction().unwrap();
    for seq in 300..330 {
        send_event(&producer, &topic, seq);
    }
    producer.flush(t).unwrap();
    let job = Job::builder("opentxn")
        .checkpoint_storage("memory://")
        .parallelism(2)
        .build()
        .unwrap();
    let out = CollectSink::new();
    job.source("events", source(&topic))
        .map(|e: Event| e.seq)
        .sink("out", out.clone());
    let handle = job.start().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !handle.is_finished() {
        if std::time::Instant::now() > deadline {
            handle.cancel();
            panic!("the bounded job waits for the open transaction");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    handle.wait().unwrap();
    producer.abort_transaction(t).unwrap();
    assert_eq!(out.sorted(), (0..300).collect::<Vec<u64>>());
}

#[test]
fn a_transactional_topic_is_read_committed_exactly_once() {
    let topic = fresh_topic("txn");
    // 30 transactions of 600 events: 10 aborted, 12,000 events committed.
    let committed = produce_transactions(&topic, 30, 600);
    assert_eq!(committed.len(), 12_000);

    // A plain run reads exactly the committed events, once each.
    let job = Job::builder("txn-plain")
        .checkpoint_storage("memory://")
        .parallelism(2)
        .build()
        .unwrap();
    let out = CollectSink::new();
    job.source("events", source(&topic))
        .map(|e: Event| e.seq)
        .sink("out", out.clone());
    job.run().unwrap();
    assert!(
        out.sorted() == committed,
        "{} records read, {} committed",
        out.committed().len(),
        committed.len()
    );

    // Crashes restore inside the topic, between markers, at other parallelisms: the
    // output equals the failure-free run's.
    let report = ExactlyOnceCheck {
        // 4,000 visible records a partition, at least 63 batches: each crashing stage
        // reads at most 16.
        checkpoint_interval: Duration::from_millis(20),
        crash_after_checkpoints: 15,
        batches_per_checkpoint: 1,
        ..Default::default()
    }
    .run("kafka-txn", |job, out: &CollectSink<u64>| {
        job.source("events", source(&topic))
            .map(|e: Event| e.seq)
            .sink("out", out.clone());
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.golden_records, committed.len());
    assert_eq!(report.crashes, 2);
}
