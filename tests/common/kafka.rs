//! Kafka helpers shared by the tests against the broker `scripts/test.sh` starts.

use exactly::sources::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use exactly::sources::rdkafka::client::DefaultClientContext;
use exactly::sources::rdkafka::config::ClientConfig;
use exactly::sources::rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::Duration;

/// The broker's address.
pub fn brokers() -> String {
    std::env::var("EXACTLY_KAFKA_BROKERS").expect(
        "EXACTLY_KAFKA_BROKERS is not set: run the suite with ./scripts/test.sh, which starts a broker",
    )
}

/// A client configuration for the broker, an admin client and a runtime for its calls.
fn admin() -> (
    ClientConfig,
    AdminClient<DefaultClientContext>,
    tokio::runtime::Runtime,
) {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers());
    let admin = cfg.create().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (cfg, admin, rt)
}

/// Create `topic` with `partitions` partitions and wait until each has a leader:
/// records produced before that can fail or be retried into duplicates.
pub fn create_topic(topic: &str, partitions: i32) {
    let (cfg, admin, rt) = admin();
    let created = rt
        .block_on(admin.create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        ))
        .unwrap();
    for r in created {
        r.unwrap();
    }
    wait_for_leaders(&cfg, topic, partitions);
}

/// The value of `topic`'s configuration entry `name`, as the broker describes it.
pub fn topic_config(topic: &str, name: &str) -> Option<String> {
    use exactly::sources::rdkafka::admin::ResourceSpecifier;
    let (_, admin, rt) = admin();
    let described = rt
        .block_on(admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new()))
        .unwrap();
    let resource = described.into_iter().next()?.ok()?;
    resource.get(name)?.value.clone()
}

/// Delete the records of `topic`'s `partition` below `offset` (what retention does to
/// old segments, at once).
pub fn delete_records_below(topic: &str, partition: i32, offset: i64) {
    use exactly::sources::rdkafka::{Offset, TopicPartitionList};
    let (_, admin, rt) = admin();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .unwrap();
    let done = rt
        .block_on(admin.delete_records(&tpl, &AdminOptions::new()))
        .unwrap();
    for e in done.elements() {
        assert!(e.error().is_ok(), "deleting records: {:?}", e.error());
    }
}

/// Grow `topic` to `partitions` partitions and wait until each has a leader.
pub fn add_partitions(topic: &str, partitions: usize) {
    use exactly::sources::rdkafka::admin::NewPartitions;
    let (cfg, admin, rt) = admin();
    let grown = rt
        .block_on(admin.create_partitions(
            &[NewPartitions::new(topic, partitions)],
            &AdminOptions::new(),
        ))
        .unwrap();
    for r in grown {
        r.unwrap();
    }
    wait_for_leaders(&cfg, topic, partitions as i32);
}

/// Wait until every partition of the new `topic` has a leader: records produced before
/// that can fail or be retried.
fn wait_for_leaders(cfg: &ClientConfig, topic: &str, partitions: i32) {
    let consumer: BaseConsumer = cfg.create().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ready = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .and_then(|md| {
                let t = md.topics().iter().find(|t| t.name() == topic)?;
                Some(
                    t.error().is_none()
                        && t.partitions().len() == partitions as usize
                        && t.partitions()
                            .iter()
                            .all(|p| p.error().is_none() && p.leader() >= 0),
                )
            })
            .unwrap_or(false);
        if ready {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{topic} has no leaders"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
