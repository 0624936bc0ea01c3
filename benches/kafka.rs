//! Kafka against a real broker: the source's records/s per core beside a plain
//! librdkafka consumer reading the same topic, the transactional sink's records/s per
//! core and the time its commits add to each checkpoint, and the end-to-end latency
//! from a record's produce to its visibility to a `read_committed` reader downstream of
//! a job with checkpoints every second.
//!
//! `scripts/with-kafka.sh cargo bench --features kafka --bench kafka` (starts a private
//! broker on 127.0.0.1 and sets `EXACTLY_KAFKA_BROKERS`). `EXACTLY_BENCH_EVENTS` sets
//! the record count of the throughput parts (default 5,000,000 records of 8 bytes, on
//! 4 partitions), `EXACTLY_BENCH_RATE` and `EXACTLY_BENCH_SECONDS` the latency part's
//! input rate (default 20,000 records/s) and length (default 10 s). Parallelism 2.

#[path = "common/mod.rs"]
mod common;

use common::kafka::{brokers, create_topic, decode, producer, send, topic_of, unique};
use common::{commit_latencies, cores, env_num, listing, median, CountSink};
use exactly::prelude::*;
use exactly::sinks::kafka::{KafkaSink, Staging};
use exactly::sources::rdkafka::config::ClientConfig;
use exactly::sources::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::sources::rdkafka::message::Message;
use exactly::sources::rdkafka::producer::Producer;
use exactly::sources::rdkafka::{Offset, TopicPartitionList};
use exactly::sources::{GeneratorSource, KafkaSource};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PARTITIONS: i32 = 4;
const PARALLELISM: usize = 2;

/// The baseline: one plain consumer per "subtask" thread, each assigned every other
/// partition from its start (`read_committed`, as the source reads), reading until it
/// has every record of its partitions; returns records/s.
fn plain_consumers(topic: &str, n: u64) -> f64 {
    let t = Instant::now();
    let threads: Vec<_> = (0..PARALLELISM)
        .map(|s| {
            let topic = topic.to_string();
            std::thread::spawn(move || {
                let consumer: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", brokers())
                    .set("group.id", unique("plain"))
                    .set("enable.auto.commit", "false")
                    .set("isolation.level", "read_committed")
                    .create()
                    .unwrap();
                let mut tpl = TopicPartitionList::new();
                let mut expected = 0u64;
                for p in (0..PARTITIONS).filter(|p| *p as usize % PARALLELISM == s) {
                    tpl.add_partition_offset(&topic, p, Offset::Beginning)
                        .unwrap();
                    expected += (n + (PARTITIONS as u64 - 1 - p as u64)) / PARTITIONS as u64;
                }
                consumer.assign(&tpl).unwrap();
                let (mut got, mut sum) = (0u64, 0u64);
                while got < expected {
                    if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                        sum = sum.wrapping_add(decode(m.unwrap().payload().unwrap()).unwrap());
                        got += 1;
                    }
                }
                sum
            })
        })
        .collect();
    let sum = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold(0u64, u64::wrapping_add);
    assert_eq!(
        sum,
        n * (n - 1) / 2,
        "the plain consumers read every record once"
    );
    n as f64 / t.elapsed().as_secs_f64()
}

/// The job reading the topic to its end (bounded) into a counting sink; returns
/// records/s and the report.
fn job_source(topic: &str, n: u64, interval: Option<Duration>) -> (f64, JobReport) {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Job::builder(&unique("source"))
        .checkpoint_storage(dir.path().to_str().unwrap())
        .parallelism(PARALLELISM);
    if let Some(i) = interval {
        b = b.checkpoint_every(i);
    }
    let job = b.build().unwrap();
    let sink = CountSink::<u64>::default();
    job.source("in", KafkaSource::new(&brokers(), topic, decode).bounded())
        .sink("count", sink.clone());
    let t = Instant::now();
    let report = job.run().unwrap();
    let rate = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(
        sink.committed.load(Ordering::Relaxed),
        n,
        "every record once"
    );
    (rate, report)
}

fn encode(r: &u64, _key: &mut Vec<u8>, value: &mut Vec<u8>) {
    value.extend_from_slice(&r.to_le_bytes());
}

type Encode = fn(&u64, &mut Vec<u8>, &mut Vec<u8>);

/// A job checkpointing every second into `checkpoints`, and a transactional sink into
/// `topic` staging in `staging`, with a marker topic of its own.
fn job_into_kafka(
    name: &str,
    checkpoints: &std::path::Path,
    staging: &std::path::Path,
    topic: &str,
) -> (Job, KafkaSink<u64, Encode>) {
    let job = Job::builder(&unique(name))
        .checkpoint_storage(checkpoints.to_str().unwrap())
        .checkpoint_every(Duration::from_secs(1))
        .parallelism(PARALLELISM)
        .build()
        .unwrap();
    let sink = KafkaSink::new(
        &brokers(),
        topic,
        Staging::dir(staging).unwrap(),
        encode as Encode,
    )
    .unwrap()
    .marker_topic(&unique(&format!("{name}-markers")));
    (job, sink)
}

/// Records 0..n from a generator into a new topic through the transactional sink.
fn job_sink(n: u64) -> (f64, JobReport) {
    let dir = tempfile::tempdir().unwrap();
    let staging = tempfile::tempdir().unwrap();
    let topic = unique("output");
    create_topic(&topic, PARTITIONS);
    let (job, sink) = job_into_kafka("sink", dir.path(), staging.path(), &topic);
    job.source(
        "gen",
        GeneratorSource::new(n, |i| i).with_splits(PARALLELISM as u64),
    )
    .sink("out", sink);
    let t = Instant::now();
    let report = job.run().unwrap();
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let (sum, count) = topic_count(&topic, n);
    assert_eq!(
        (count, sum),
        (n, n * (n - 1) / 2),
        "every record committed once"
    );
    (rate, report)
}

/// Read `topic` as a `read_committed` reader until `expected` records arrived, then one
/// more second for any extra; returns (sum, count).
fn topic_count(topic: &str, expected: u64) -> (u64, u64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("count"))
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let (mut count, mut sum) = (0u64, 0u64);
    let mut until = Instant::now() + Duration::from_secs(60);
    let mut complete = false;
    while Instant::now() < until {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            sum = sum.wrapping_add(decode(m.unwrap().payload().unwrap()).unwrap());
            count += 1;
        }
        if count >= expected && !complete {
            complete = true;
            until = Instant::now() + Duration::from_secs(1);
        }
    }
    (sum, count)
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A producer writes `rate` records/s for `seconds`, each carrying its produce time; an
/// unbounded job copies them through the transactional sink into another topic; a
/// `read_committed` reader of that topic notes when each becomes visible. Returns the
/// median and 99th percentile of visible time minus produce time.
fn end_to_end(rate: u64, seconds: u64) -> (Duration, Duration, JobReport) {
    let input = unique("e2e-in");
    let output = unique("e2e-out");
    create_topic(&input, PARTITIONS);
    create_topic(&output, PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let staging = tempfile::tempdir().unwrap();
    let (job, sink) = job_into_kafka("e2e", dir.path(), staging.path(), &output);
    job.source("in", KafkaSource::new(&brokers(), &input, decode))
        .sink("out", sink);
    let handle = job.start().unwrap();

    let total = rate * seconds;
    let reader = {
        let output = output.clone();
        std::thread::spawn(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .set("group.id", unique("e2e-reader"))
                .set("isolation.level", "read_committed")
                .create()
                .unwrap();
            let mut tpl = TopicPartitionList::new();
            for p in 0..PARTITIONS {
                tpl.add_partition_offset(&output, p, Offset::Beginning)
                    .unwrap();
            }
            consumer.assign(&tpl).unwrap();
            let mut latencies = Vec::with_capacity(total as usize);
            let deadline = Instant::now() + Duration::from_secs(seconds + 60);
            while (latencies.len() as u64) < total && Instant::now() < deadline {
                if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                    let produced = decode(m.unwrap().payload().unwrap()).unwrap();
                    latencies.push(Duration::from_micros(micros_now().saturating_sub(produced)));
                }
            }
            latencies
        })
    };

    let p = producer();
    let start = Instant::now();
    for i in 0..total {
        // Paced: record i is due at i / rate seconds.
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        send(
            &p,
            &input,
            (i % PARTITIONS as u64) as i32,
            &micros_now().to_le_bytes(),
        );
    }
    p.flush(Duration::from_secs(60)).unwrap();
    let mut latencies = reader.join().unwrap();
    handle.stop_with_checkpoint();
    let report = handle.wait().unwrap();
    assert_eq!(
        latencies.len() as u64,
        total,
        "every record became visible once"
    );
    latencies.sort_unstable();
    let p99 = latencies[latencies.len() * 99 / 100];
    (median(latencies), p99, report)
}

fn main() {
    if listing() {
        return;
    }
    let n = env_num("EXACTLY_BENCH_EVENTS", 5_000_000);
    let cores = cores();
    println!(
        "Kafka: {n} records of 8 bytes on {PARTITIONS} partitions, parallelism {PARALLELISM}, {cores} cores"
    );
    let topic = topic_of(n, PARTITIONS);
    // Twice each, alternating: the first reads of a topic just written run against a
    // broker still flushing it.
    for _ in 0..2 {
        let plain = plain_consumers(&topic, n);
        println!(
            "{:>32}: {:>10.0} records/s ({:>9.0} per core)",
            "plain librdkafka consumers",
            plain,
            plain / cores as f64
        );
        let every = Some(Duration::from_secs(1));
        for (label, interval) in [
            ("source, no checkpoints", None),
            ("source, checkpoints every 1 s", every),
        ] {
            let (rate, report) = job_source(&topic, n, interval);
            println!(
                "{label:>32}: {rate:>10.0} records/s ({:>9.0} per core), {} checkpoints",
                rate / cores as f64,
                report.checkpoints.len()
            );
        }
    }
    let (rate, report) = job_sink(n);
    let commit = commit_latencies(&report);
    println!(
        "{:>32}: {rate:>10.0} records/s ({:>9.0} per core), {} checkpoints, median checkpoint {:?}, median commit {:?} (max {:?})",
        "transactional sink, every 1 s",
        rate / cores as f64,
        report.checkpoints.len(),
        median(report.checkpoints.iter().map(|c| c.duration).collect()),
        median(commit.clone()),
        commit.iter().max().copied().unwrap_or_default(),
    );
    let rate = env_num("EXACTLY_BENCH_RATE", 20_000);
    let seconds = env_num("EXACTLY_BENCH_SECONDS", 10);
    let (p50, p99, report) = end_to_end(rate, seconds);
    let periodic: Vec<_> = report.checkpoints.iter().filter(|c| !c.is_final).collect();
    println!(
        "{:>32}: median {p50:?}, p99 {p99:?} from produce to visible ({rate} records/s for {seconds} s, {} checkpoints: median checkpoint {:?}, median commit {:?})",
        "end to end, every 1 s",
        report.checkpoints.len(),
        median(periodic.iter().map(|c| c.duration).collect()),
        median(periodic.iter().map(|c| c.end_to_end.saturating_sub(c.duration)).collect()),
    );
}
