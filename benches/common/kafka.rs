//! Kafka helpers of the benchmarks that need a broker (`scripts/with-kafka.sh`).

use exactly::sources::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use exactly::sources::rdkafka::client::DefaultClientContext;
use exactly::sources::rdkafka::config::ClientConfig;
use exactly::sources::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::sources::rdkafka::producer::{
    BaseRecord, DefaultProducerContext, Producer, ThreadedProducer,
};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub fn brokers() -> String {
    std::env::var("EXACTLY_KAFKA_BROKERS").unwrap_or_else(|_| {
        eprintln!(
            "EXACTLY_KAFKA_BROKERS is not set; run the benchmark with `scripts/with-kafka.sh cargo bench --features kafka --bench <name>`"
        );
        std::process::exit(1);
    })
}

pub fn unique(name: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("bench-{name}-{n}")
}

pub fn create_topic(topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for r in rt
        .block_on(admin.create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        ))
        .unwrap()
    {
        r.unwrap();
    }
    // Wait until every partition has a leader.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()
        .and_then(|md| {
            let t = md.topics().iter().find(|t| t.name() == topic)?;
            Some(
                t.partitions().len() == partitions as usize
                    && t.partitions().iter().all(|p| p.leader() >= 0),
            )
        })
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "topic {topic} has no leaders");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn producer() -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .create()
        .unwrap()
}

/// Send `payload` to `partition`, waiting while the producer's queue is full.
pub fn send(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    partition: i32,
    payload: &[u8],
) {
    let mut record = BaseRecord::<(), [u8]>::to(topic)
        .partition(partition)
        .payload(payload);
    loop {
        match p.send(record) {
            Ok(()) => return,
            Err((_, r)) => {
                std::thread::sleep(Duration::from_millis(1));
                record = r;
            }
        }
    }
}

/// A topic holding records 0..n, 8 bytes each (little-endian), round-robin.
pub fn topic_of(n: u64, partitions: i32) -> String {
    let topic = unique("input");
    create_topic(&topic, partitions);
    let p = producer();
    for i in 0..n {
        send(&p, &topic, (i % partitions as u64) as i32, &i.to_le_bytes());
    }
    p.flush(Duration::from_secs(120)).unwrap();
    topic
}

pub fn decode(b: &[u8]) -> Result<u64, String> {
    b.try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| format!("{} bytes, not 8", b.len()))
}
