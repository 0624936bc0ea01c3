//! One job as 1, 2 and 3 instances on this machine: a keyed running count over Kafka
//! input, the instances in one process (each its own job, checkpoint location and
//! Kafka clients, as separate processes would have), checkpoints every second. One
//! instance exchanges records in memory; two and three send every record through the
//! repartition topic (written with the transactional sink at each checkpoint, read
//! `read_committed`). Prints records/s, the engine's CPU time per record (this
//! process's user + system time, the broker's excluded), and an estimate for N
//! machines from those figures.
//!
//! `scripts/with-kafka.sh cargo bench --features kafka --bench instances`.
//! `EXACTLY_BENCH_EVENTS` sets the record count (default 1,000,000, on 6 partitions).

#[path = "common/mod.rs"]
mod common;

use common::kafka::{brokers, decode, topic_of, unique};
use common::{cores, cpu_time, env_num, CountSink};
use exactly::kafka_repartition::KafkaRepartition;
use exactly::prelude::*;
use exactly::sinks::kafka::Staging;
use exactly::sources::KafkaSource;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 6;
const KEYS: u64 = 100_000;
const COUNT: ValueState<u64> = ValueState::new("count");

/// A topic holding records 0..n, 8 bytes each (little-endian), round-robin.
fn input(n: u64) -> String {
    topic_of(n, PARTITIONS)
}

/// What one run measured.
struct Run {
    /// From the start to the last record counted.
    wall: Duration,
    /// This process's CPU time over the whole run.
    cpu: Duration,
}

/// `count` instances of the job over `topic` until every record was counted.
fn run(topic: &str, n: u64, count: usize) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let name = unique("instances");
    let sinks: Vec<CountSink<(u64, u64)>> = (0..count).map(|_| CountSink::default()).collect();
    let jobs: Vec<Job> = (0..count)
        .map(|i| {
            let job = Job::builder(&name)
                .instance(i, count)
                .parallelism(1)
                .checkpoint_every(Duration::from_secs(1))
                .checkpoint_storage(dir.path().join("chk").to_str().unwrap())
                .repartition_through(KafkaRepartition::new(
                    &brokers(),
                    Staging::dir(dir.path().join("staging")).unwrap(),
                ))
                .build()
                .unwrap();
            job.source("in", KafkaSource::new(&brokers(), topic, decode))
                .key_by(|r: &u64| r % KEYS)
                .process_fn(|r: u64, ctx: &mut KeyedContext<'_, u64, (u64, u64)>| {
                    let c = ctx.value(COUNT)?.unwrap_or(0) + 1;
                    ctx.set_value(COUNT, &c)?;
                    ctx.emit((r, c));
                    Ok(())
                })
                .name("count")
                .sink("out", sinks[i].clone());
            job
        })
        .collect();
    let (t, cpu) = (Instant::now(), cpu_time());
    let handles: Vec<JobHandle> = jobs.into_iter().map(|j| j.start().unwrap()).collect();
    while sinks
        .iter()
        .map(|s| s.committed.load(Ordering::Relaxed))
        .sum::<u64>()
        < n
    {
        assert!(
            handles.iter().all(|h| !h.is_finished()),
            "an instance ended by itself"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (wall, cpu) = (t.elapsed(), cpu_time() - cpu);
    for h in &handles {
        h.stop_with_checkpoint();
    }
    for h in handles {
        h.wait().unwrap();
    }
    let counted: u64 = sinks
        .iter()
        .map(|s| s.committed.load(Ordering::Relaxed))
        .sum();
    assert_eq!(counted, n, "every record counted once");
    Run { wall, cpu }
}

fn main() {
    if common::listing() {
        return;
    }
    let n = env_num("EXACTLY_BENCH_EVENTS", 1_000_000);
    // The broker's first transactions and consumer groups take seconds to set up: not
    // part of the figures.
    run(&input(10_000), 10_000, 2);
    let topic = input(n);
    println!(
        "keyed running count over {n} Kafka records ({PARTITIONS} partitions, {KEYS} keys), \
         1 subtask per instance, checkpoints every 1 s, {} cores",
        cores()
    );
    println!("| instances | records/s | per instance | engine CPU per record | exchange |");
    println!("|---|---|---|---|---|");
    let mut per_record = Vec::new();
    for count in [1, 2, 3] {
        let r = run(&topic, n, count);
        let rate = n as f64 / r.wall.as_secs_f64();
        let cpu_ns = r.cpu.as_nanos() as f64 / n as f64;
        per_record.push(cpu_ns);
        let exchange = if count == 1 {
            "in memory"
        } else {
            "Kafka topic"
        };
        println!(
            "| {count} | {rate:.0} | {:.0} | {cpu_ns:.0} ns | {exchange} |",
            rate / count as f64
        );
    }
    let across = per_record[1..].iter().sum::<f64>() / (per_record.len() - 1) as f64;
    println!(
        "estimate: with the repartition hop an instance needs about {across:.0} ns of CPU \
         per record, so one core carries about {:.0} records/s; N machines of C cores, \
         about N x C x {:.0} records/s until the brokers' limit (each record crosses \
         them three times: input, repartition write, repartition read)",
        1e9 / across,
        1e9 / across
    );
}
