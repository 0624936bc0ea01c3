//! A Kafka source: one split per partition, offsets in the checkpoint.
//!
//! The offset of a split is the offset of the **next** record to read, so a restored
//! reader seeks exactly there: nothing before it is read again, nothing from it on is
//! skipped (the classic off-by-one is restoring at the last *read* offset, which reads
//! that record twice). The consumer group's committed offsets are never read: the
//! checkpoint is the only source of truth. For lag monitoring with the usual Kafka
//! tools, [`KafkaSource::commit_offsets_to_group`] commits each partition's offset to a
//! consumer group once a checkpoint containing it has completed and its output is
//! committed, so the group shows what is durably processed, never more.
//!
//! Event time is per partition: each partition is a split, and the engine tracks
//! watermarks per split and merges them. Restoring at another parallelism redistributes
//! partitions like any other splits.
//!
//! Partitions added to the topic while an unbounded job runs are found within a minute
//! ([`KafkaSource::discover_partitions_every`]) and read from their first record; a
//! bounded source reads the partitions the topic had when the job started.
//!
//! ```no_run
//! use exactly_sources::KafkaSource;
//! let payments = KafkaSource::new("127.0.0.1:9092", "payments", |payload: &[u8]| {
//!     serde_json::from_slice::<serde_json::Value>(payload)
//! });
//! ```

use exactly_engine::api::{Data, Source, SourceContext, SourcePoll, SourceReader};
use exactly_engine::error::{Error, Result};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::marker::PhantomData;
use std::time::Duration;

/// How long metadata and watermark requests may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a topic; records are decoded from message payloads by a function.
pub struct KafkaSource<T, F> {
    brokers: String,
    topic: String,
    decode: F,
    bounded: bool,
    config: Vec<(String, String)>,
    /// Consumer group that completed checkpoints' offsets are committed to.
    group: Option<String>,
    /// How often an unbounded source looks for partitions added to the topic.
    discover: Option<Duration>,
    _t: PhantomData<fn() -> T>,
}

/// How often an unbounded source looks for new partitions unless told otherwise.
const DISCOVER_PARTITIONS_EVERY: Duration = Duration::from_secs(60);

impl<T, F, E> KafkaSource<T, F>
where
    T: Data,
    F: Fn(&[u8]) -> std::result::Result<T, E> + Send + Sync + 'static,
    E: std::fmt::Display,
{
    /// Read `topic` from the brokers `brokers` (comma-separated `host:port`), decoding
    /// each payload with `decode`. A payload that does not decode stops the job with an
    /// error naming the partition and offset.
    pub fn new(brokers: &str, topic: &str, decode: F) -> Self {
        KafkaSource {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            decode,
            bounded: false,
            config: Vec::new(),
            group: None,
            discover: Some(DISCOVER_PARTITIONS_EVERY),
            _t: PhantomData,
        }
    }

    /// How often a running unbounded job asks the broker for partitions added to the
    /// topic (default: every 60 s; `None`: only when the job starts). A new partition
    /// is read from its first record by one subtask. A bounded source never looks: it
    /// reads the partitions the topic had at its start.
    pub fn discover_partitions_every(mut self, every: Option<Duration>) -> Self {
        self.discover = every;
        self
    }

    /// End each partition when the reader reaches its end (librdkafka's partition-EOF
    /// event, from the broker's fetch responses), so a job over data already in the
    /// topic finishes and takes its final checkpoint.
    pub fn bounded(mut self) -> Self {
        self.bounded = true;
        self
    }

    /// Set a librdkafka client property (security, timeouts, ...).
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.config.push((key.to_string(), value.to_string()));
        self
    }

    /// After each completed checkpoint, commit every partition's checkpointed offset
    /// (the next record to read) to consumer group `group`, asynchronously, so
    /// `kafka-consumer-groups --describe` and lag exporters see the job's durable
    /// progress. For monitoring only: a restore never reads these offsets. A failed
    /// commit is logged and retried with the next checkpoint. The group must not be
    /// used by other consumers (the source assigns partitions itself).
    pub fn commit_offsets_to_group(mut self, group: &str) -> Self {
        self.group = Some(group.to_string());
        self
    }

    /// A consumer that commits only when asked to (`who` names it in the group id
    /// when no monitoring group is set).
    fn consumer(&self, who: &str) -> std::result::Result<BaseConsumer<GroupCommits>, KafkaError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set(
                "enable.partition.eof",
                if self.bounded { "true" } else { "false" },
            )
            // Offsets live in checkpoints: the group names the client, and receives
            // completed checkpoints' offsets only when monitoring asks for them.
            .set(
                "group.id",
                self.group
                    .clone()
                    .unwrap_or_else(|| format!("exactly-{who}")),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Records of aborted (and still open) transactions are never read; their
            // markers occupy offsets, which the reader's offsets step over.
            .set("isolation.level", "read_committed");
        for (k, v) in &self.config {
            c.set(k, v);
        }
        c.create_with_context(GroupCommits::default())
    }
}

/// Reports failed asynchronous group commits (their outcome arrives through `poll`),
/// once per consumer: they are for monitoring and retried at the next checkpoint.
#[derive(Default)]
struct GroupCommits {
    warned: std::sync::atomic::AtomicBool,
}

impl ClientContext for GroupCommits {}

impl ConsumerContext for GroupCommits {
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(error = %e, offsets = ?offsets.to_topic_map(),
                    "committing checkpointed offsets to the consumer group failed (monitoring only; retried at the next checkpoint)");
            }
        }
    }
}

fn source_err(ctx: &SourceContext, message: String) -> Error {
    Error::Operator {
        operator: ctx.operator.clone(),
        subtask: ctx.subtask,
        source: message.into(),
    }
}

impl<T, F, E> Source for KafkaSource<T, F>
where
    T: Data,
    F: Fn(&[u8]) -> std::result::Result<T, E> + Clone + Send + Sync + 'static,
    E: std::fmt::Display,
{
    type Item = T;
    type Offset = i64;
    type Reader = KafkaReader<T, F>;

    fn splits(&self) -> Result<Vec<String>> {
        let consumer = self
            .consumer("splits")
            .map_err(|e| Error::config(format!("creating a Kafka consumer: {e}")))?;
        let md = consumer
            .fetch_metadata(Some(&self.topic), REQUEST_TIMEOUT)
            .map_err(|e| {
                Error::config(format!(
                    "Kafka topic '{}' on {}: {e}",
                    self.topic, self.brokers
                ))
            })?;
        let topic = md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .ok_or_else(|| {
                Error::config(format!(
                    "Kafka topic '{}' does not exist on {} (or has no partitions)",
                    self.topic, self.brokers
                ))
            })?;
        let mut ids: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
        ids.sort_unstable();
        Ok(ids.iter().map(|p| format!("{}-{p}", self.topic)).collect())
    }

    fn discover_splits_every(&self) -> Option<Duration> {
        self.discover.filter(|_| !self.bounded)
    }

    fn open(&self, split: &str, from: Option<i64>, ctx: &SourceContext) -> Result<Self::Reader> {
        let partition: i32 = split
            .rsplit('-')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| source_err(ctx, format!("'{split}' is not a partition split")))?;
        let consumer = self
            .consumer(&ctx.operator.0)
            .map_err(|e| source_err(ctx, format!("creating a Kafka consumer: {e}")))?;
        let (low, high) = consumer
            .fetch_watermarks(&self.topic, partition, REQUEST_TIMEOUT)
            .map_err(|e| source_err(ctx, format!("watermarks of {split}: {e}")))?;
        let next = from.unwrap_or(low);
        if next < low {
            return Err(source_err(
                ctx,
                format!(
                    "{split}: the checkpoint resumes at offset {next}, but the broker retains only from {low}; records were deleted before they were processed"
                ),
            ));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next))
            .map_err(|e| source_err(ctx, format!("{split}: {e}")))?;
        consumer
            .assign(&tpl)
            .map_err(|e| source_err(ctx, format!("assigning {split}: {e}")))?;
        Ok(KafkaReader {
            consumer,
            decode: self.decode.clone(),
            ctx: ctx.clone(),
            split: split.to_string(),
            topic: self.topic.clone(),
            partition,
            commit_to_group: self.group.is_some(),
            next,
            end: self.bounded.then_some(high),
            // Nothing left to read: a partition-end event may never come.
            ended: self.bounded && next >= high,
            _t: PhantomData,
        })
    }
}

impl<T, F> KafkaReader<T, F> {
    /// The consumer's fetch position in the partition (the next offset it fetches).
    fn position(&self) -> Option<i64> {
        let tpl = self.consumer.position().ok()?;
        match tpl.find_partition(&self.topic, self.partition)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }
}

/// Reads one partition.
pub struct KafkaReader<T, F> {
    consumer: BaseConsumer<GroupCommits>,
    decode: F,
    ctx: SourceContext,
    split: String,
    topic: String,
    partition: i32,
    /// Commit completed checkpoints' offsets to the consumer group.
    commit_to_group: bool,
    /// Offset of the next record to read.
    next: i64,
    /// Bounded: the partition's high watermark when the reader opened.
    end: Option<i64>,
    /// Bounded, and the end of the partition was reached.
    ended: bool,
    _t: PhantomData<fn() -> T>,
}

impl<T, F, E> SourceReader for KafkaReader<T, F>
where
    T: 'static,
    F: Fn(&[u8]) -> std::result::Result<T, E> + 'static,
    E: std::fmt::Display,
{
    type Item = T;
    type Offset = i64;

    fn poll_batch(&mut self, out: &mut Vec<T>, max: usize) -> Result<SourcePoll> {
        let mut got = 0;
        while got < max && !self.ended {
            // Wait briefly for the first record only; then take what is buffered.
            let wait = if got == 0 {
                Duration::from_millis(100)
            } else {
                Duration::ZERO
            };
            let Some(msg) = self.consumer.poll(wait) else {
                break;
            };
            let msg = match msg {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(_)) => {
                    // A partition-end event can come before the first fetch of a
                    // partition that has records (seen with a real broker, right after
                    // assignment): the end is where the consumer's position reaches the
                    // high watermark seen at the start. The position, not the last
                    // record's offset, since a transaction's commit marker occupies
                    // the offset after its last record.
                    if self
                        .position()
                        .is_some_and(|p| self.end.is_some_and(|e| p >= e))
                    {
                        self.ended = true;
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    return Err(source_err(
                        &self.ctx,
                        format!("reading {}: {e}", self.split),
                    ))
                }
            };
            let offset = msg.offset();
            if offset < self.next {
                // A record before the resume point (never expected after an exact
                // seek): skip it rather than process it twice.
                continue;
            }
            let record =
                (self.decode)(msg.payload().unwrap_or_default()).map_err(|e| Error::BadRecord {
                    file: self.split.clone().into(),
                    line: offset as u64,
                    message: format!("offset {offset}: {e}"),
                })?;
            out.push(record);
            self.next = offset + 1;
            got += 1;
        }
        Ok(if got > 0 {
            SourcePoll::Ready
        } else if self.ended {
            SourcePoll::End
        } else {
            SourcePoll::Idle
        })
    }

    fn offset(&self) -> i64 {
        self.next
    }

    fn checkpoint_complete(&mut self, offset: &i64) {
        if !self.commit_to_group {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        // Asynchronous: the result arrives through `poll`, and closing the consumer
        // waits for a commit still in flight, so the final checkpoint's offset lands.
        let committed = tpl
            .add_partition_offset(&self.topic, self.partition, Offset::Offset(*offset))
            .and_then(|()| self.consumer.commit(&tpl, CommitMode::Async));
        if let Err(e) = committed {
            self.consumer.context().commit_callback(Err(e), &tpl);
        }
    }
}
