//! A `key_by` across instances through Kafka (feature `kafka`).
//!
//! When a job runs as several processes ([`JobBuilder::instance`]), each keyed
//! operator's input crosses a topic `<job>-<operator>-repartition` with one partition per
//! key group (the job's `max_parallelism`, 128 by default): every instance writes each
//! record into the partition of its key group with the transactional Kafka sink (staged
//! at the barrier, produced and committed in one transaction after the instance's
//! checkpoint completes), and the instance that owns a key group reads its partition
//! with `read_committed`, its offsets in its own checkpoints. Exactly-once holds per
//! hop, so no barrier has to cross instances: a record is in the topic exactly once
//! because its writer's commit is idempotent and fenced, and read into state exactly
//! once because its reader's offset and state are in one checkpoint.
//!
//! ```no_run
//! use exactly::kafka_repartition::KafkaRepartition;
//! use exactly::prelude::*;
//! use exactly::sinks::kafka::Staging;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let job = Job::builder("ledger")
//!     .instance_from_env()? // EXACTLY_INSTANCE of EXACTLY_INSTANCES
//!     .checkpoint_storage("s3://checkpoints/ledger")
//!     .repartition_through(KafkaRepartition::new(
//!         "kafka:9092",
//!         Staging::s3("s3://checkpoints/ledger-staging")?,
//!     ))
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! [`JobBuilder::instance`]: exactly_engine::dsl::JobBuilder::instance

use exactly_engine::api::{RepartitionTopic, Repartitioner, Routed};
use exactly_engine::error::{Error, Result};
use exactly_sinks::kafka::{KafkaSink, Staging};
use exactly_sources::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use exactly_sources::rdkafka::client::DefaultClientContext;
use exactly_sources::rdkafka::config::ClientConfig;
use exactly_sources::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly_sources::rdkafka::types::RDKafkaErrorCode;
use exactly_sources::KafkaSource;
use std::time::Duration;

/// How long metadata and topic creation may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Encodes a routed record: its key group as the key (two bytes, little-endian), which
/// also picks the partition, and the encoded record as the value.
type RoutedEncoder = fn(&Routed, &mut Vec<u8>, &mut Vec<u8>);
/// Hands a payload on as it is.
type PayloadDecoder = fn(&[u8]) -> std::result::Result<Vec<u8>, std::convert::Infallible>;

fn encode_routed(r: &Routed, key: &mut Vec<u8>, value: &mut Vec<u8>) {
    key.extend_from_slice(&r.key_group.to_le_bytes());
    value.extend_from_slice(&r.payload);
}

fn key_group_partition(key: &[u8]) -> i32 {
    match key {
        [a, b] => i32::from(u16::from_le_bytes([*a, *b])),
        // Every key this sink writes has two bytes; anything else is not ours.
        _ => unreachable!("a repartition record's key is its key group"),
    }
}

fn payload(bytes: &[u8]) -> std::result::Result<Vec<u8>, std::convert::Infallible> {
    Ok(bytes.to_vec())
}

/// Repartition topics in a Kafka cluster; see the module docs.
#[derive(Clone)]
pub struct KafkaRepartition {
    brokers: String,
    staging: Staging,
    marker_topic: Option<String>,
    replication: i32,
    config: Vec<(String, String)>,
}

impl KafkaRepartition {
    /// Topics on `brokers` (comma-separated `host:port`); records wait in `staging`
    /// between an instance's barrier and its commit (an object store, or a directory
    /// that survives the instance's restart).
    pub fn new(brokers: &str, staging: Staging) -> KafkaRepartition {
        KafkaRepartition {
            brokers: brokers.to_string(),
            staging,
            marker_topic: None,
            replication: -1,
            config: Vec::new(),
        }
    }

    /// The topic holding the commit markers of the writing side (default
    /// `exactly-commits`, as for [`KafkaSink`]).
    pub fn marker_topic(mut self, topic: &str) -> Self {
        self.marker_topic = Some(topic.to_string());
        self
    }

    /// Replication factor of the repartition topics the job creates (default: the
    /// broker's `default.replication.factor`).
    pub fn replication_factor(mut self, n: i32) -> Self {
        self.replication = n;
        self
    }

    /// Set a librdkafka client property for producers, consumers and the admin client.
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.config.push((key.to_string(), value.to_string()));
        self
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.config {
            c.set(k, v);
        }
        c
    }

    /// The topic exists with one partition per key group, or is created so.
    fn ensure_topic(&self, topic: &RepartitionTopic) -> Result<()> {
        let context = |e: &dyn std::fmt::Display| {
            Error::config(format!(
                "repartition topic '{}' on {}: {e}",
                topic.name, self.brokers
            ))
        };
        let partitions = |c: &BaseConsumer| -> Result<Option<usize>> {
            let md = c
                .fetch_metadata(Some(&topic.name), REQUEST_TIMEOUT)
                .map_err(|e| context(&e))?;
            // Counted once every partition has a leader: readers and writers of a topic
            // just created would otherwise each wait for theirs.
            Ok(md
                .topics()
                .iter()
                .find(|t| t.name() == topic.name && t.error().is_none())
                .filter(|t| {
                    t.partitions()
                        .iter()
                        .all(|p| p.error().is_none() && p.leader() >= 0)
                })
                .map(|t| t.partitions().len())
                .filter(|&n| n > 0))
        };
        let consumer: BaseConsumer = self.client_config().create().map_err(|e| context(&e))?;
        if partitions(&consumer)?.is_none() {
            let admin: AdminClient<DefaultClientContext> =
                self.client_config().create().map_err(|e| context(&e))?;
            let new = NewTopic::new(
                &topic.name,
                i32::from(topic.key_groups),
                TopicReplication::Fixed(self.replication),
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::io("starting a runtime for the Kafka admin client", e))?;
            let created = rt.block_on(admin.create_topics([&new], &AdminOptions::new()));
            match created {
                Ok(results) => {
                    for r in results {
                        match r {
                            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                            Err((_, code)) => return Err(context(&code)),
                        }
                    }
                }
                Err(e) => return Err(context(&e)),
            }
        }
        // Created just now by this or another instance, or found: check what it is.
        let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            match partitions(&consumer)? {
                Some(n) if n == usize::from(topic.key_groups) => return Ok(()),
                Some(n) => {
                    return Err(context(&format!(
                        "it has {n} partitions, but the job has {} key groups \
                         (max_parallelism), one partition each. max_parallelism cannot \
                         change while the job keeps its state; if it changed on purpose, \
                         start over with new checkpoint storage and delete the topic",
                        topic.key_groups
                    )))
                }
                None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                None => {
                    return Err(context(
                        &"created, but its partitions have no leader yet; try again",
                    ))
                }
            }
        }
    }
}

impl Repartitioner for KafkaRepartition {
    type Sink = KafkaSink<Routed, RoutedEncoder>;
    type Source = KafkaSource<Vec<u8>, PayloadDecoder>;

    fn sink(&self, topic: &RepartitionTopic) -> Result<Self::Sink> {
        self.ensure_topic(topic)?;
        let mut sink = KafkaSink::new(
            &self.brokers,
            &topic.name,
            self.staging.clone(),
            encode_routed as RoutedEncoder,
        )?
        .partition_by_key(key_group_partition);
        if let Some(m) = &self.marker_topic {
            sink = sink.marker_topic(m);
        }
        for (k, v) in &self.config {
            sink = sink.set(k, v);
        }
        Ok(sink)
    }

    fn source(&self, topic: &RepartitionTopic) -> Result<Self::Source> {
        let mut source = KafkaSource::new(&self.brokers, &topic.name, payload as PayloadDecoder)
            .partitions_are_key_groups()
            // Its partitions are the key groups: there are never new ones.
            .discover_partitions_every(None);
        for (k, v) in &self.config {
            source = source.set(k, v);
        }
        Ok(source)
    }
}
