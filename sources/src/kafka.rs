//! A Kafka source: one split per partition, offsets in the checkpoint, one consumer per
//! subtask.
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
//! Records deleted before the job read them (retention, `DeleteRecords`) are an error
//! naming topic, partition and offsets, at a restore and while reading: the consumer's
//! `auto.offset.reset` is `error`, so librdkafka never jumps over such a gap.
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
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
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
    /// Partition `n` holds the records of key group `n`.
    key_group_partitions: bool,
    /// Each subtask's consumer, shared by its readers while any is open.
    consumers: Arc<Mutex<HashMap<usize, Weak<Shared>>>>,
    _t: PhantomData<fn() -> T>,
}

/// The consumer of one subtask: every partition the subtask reads is assigned to it and
/// read through its own partition queue, so a subtask needs one client (and its
/// threads and connections) whatever the number of partitions.
struct Shared {
    consumer: Arc<BaseConsumer<GroupCommits>>,
    /// Readers open on it.
    readers: AtomicUsize,
    /// Every partition's low and high watermark, asked for all of them at once when the
    /// first reader opened: librdkafka answers a query for one partition in about half
    /// a second, so opening 64 partitions one query each took half a minute.
    opening: Mutex<Option<(std::time::Instant, Option<Watermarks>)>>,
}

/// Low and high watermark by partition.
type Watermarks = HashMap<i32, (i64, i64)>;

/// How long the watermarks asked for all partitions serve readers being opened.
const OPENING_WATERMARKS_FOR: Duration = Duration::from_secs(5);

impl Shared {
    /// The low and high watermarks of `partition` from one query for every partition of
    /// `topic` (asked again once older than [`OPENING_WATERMARKS_FOR`]); `None` if that
    /// query failed or did not cover the partition (the caller asks for it alone). A
    /// few seconds old is as good as fresh here: a low watermark only rises (the
    /// consumer's `auto.offset.reset=error` still catches records deleted meanwhile),
    /// and a bounded reader ends where its partition ended when the job started.
    fn opening_watermarks(&self, topic: &str, partition: i32) -> Option<(i64, i64)> {
        let mut cache = self.opening.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = cache.as_ref().is_some_and(|(at, w)| {
            at.elapsed() < OPENING_WATERMARKS_FOR
                && w.as_ref().is_none_or(|w| w.contains_key(&partition))
        });
        if !fresh {
            let all = self.all_watermarks(topic);
            if all.is_none() {
                // Not asked again for a while: each reader asks for its own partition.
                tracing::warn!(
                    topic,
                    "asking for every partition's watermarks at once failed; asking per partition"
                );
            }
            *cache = Some((std::time::Instant::now(), all));
        }
        cache.as_ref()?.1.as_ref()?.get(&partition).copied()
    }

    /// Low and high watermarks of every partition of `topic`: two list-offsets
    /// requests (earliest, latest) for all of them.
    fn all_watermarks(&self, topic: &str) -> Option<Watermarks> {
        let md = self
            .consumer
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .ok()?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)?
            .partitions()
            .iter()
            .map(|p| p.id())
            .collect();
        // As timestamps, "beginning" and "end" (-2 and -1) ask for the earliest and the
        // latest offset (the last stable one, with `read_committed`).
        let ask = |at: Offset| -> Option<HashMap<i32, i64>> {
            let mut tpl = TopicPartitionList::new();
            for &p in &partitions {
                tpl.add_partition_offset(topic, p, at).ok()?;
            }
            let got = self.consumer.offsets_for_times(tpl, REQUEST_TIMEOUT).ok()?;
            Some(
                got.elements()
                    .iter()
                    .filter_map(|e| match (e.error(), e.offset()) {
                        (Ok(()), Offset::Offset(o)) => Some((e.partition(), o)),
                        _ => None,
                    })
                    .collect(),
            )
        };
        let (low, high) = (ask(Offset::Beginning)?, ask(Offset::End)?);
        // The partitions that answered both; the others are asked alone.
        Some(
            partitions
                .iter()
                .filter_map(|p| Some((*p, (*low.get(p)?, *high.get(p)?))))
                .collect(),
        )
    }

    /// Serve the consumer's main queue: commit callbacks and client-wide errors. No
    /// message arrives there (each partition's queue is split off before the partition
    /// is assigned); one that did would belong to some reader, so it is an error rather
    /// than a record dropped.
    fn serve(&self) -> std::result::Result<(), String> {
        match self.consumer.poll(Duration::ZERO) {
            None => Ok(()),
            Some(Err(e)) => Err(e.to_string()),
            Some(Ok(m)) => Err(format!(
                "a record of partition {} at offset {} arrived outside its partition's queue",
                m.partition(),
                m.offset()
            )),
        }
    }
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
            key_group_partitions: false,
            consumers: Arc::default(),
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

    /// Partition `n` of the topic holds the records of the engine's key group `n` (a
    /// repartition topic): each partition is read by the subtask that owns its key
    /// group ([`Source::split_key_group`]), so the records can feed a keyed operator
    /// without an exchange.
    pub fn partitions_are_key_groups(mut self) -> Self {
        self.key_group_partitions = true;
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
            // Every reader is assigned an exact offset. If that offset stops existing
            // (retention or `DeleteRecords` removed records the job has not read yet),
            // librdkafka would jump to the earliest or latest record and skip the gap
            // silently; make it an error instead.
            .set("auto.offset.reset", "error")
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

impl ClientContext for GroupCommits {
    /// librdkafka also reports a bounded reader's end of partition as a client-wide
    /// error; each reader sees it on its own queue, where it is the expected end, so it
    /// is not logged as an error here.
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::trace!(%reason, "end of partition");
        } else {
            tracing::error!(%error, %reason, "Kafka client error");
        }
    }
}

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

/// Records from `next` on, not yet processed, are gone from the partition: the broker
/// keeps it only from `low`. Retrying cannot bring them back, so the job stops.
fn deleted(topic: &str, partition: i32, next: i64, low: i64) -> Error {
    Error::config(format!(
        "Kafka topic '{topic}' partition {partition}: the job must read on from offset {next}, \
         but the broker keeps the partition only from offset {low}: records {next}..{low} were \
         deleted (retention or DeleteRecords) before the job processed them. Nothing after \
         them was read. Restore the records (e.g. from a backup topic), or accept the loss \
         deliberately by starting over with new checkpoint storage and a new output location"
    ))
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

    fn split_key_group(&self, split: &str) -> Option<exactly_engine::ids::KeyGroup> {
        if !self.key_group_partitions {
            return None;
        }
        let partition = split.strip_prefix(&self.topic)?.strip_prefix('-')?;
        partition.parse().ok().map(exactly_engine::ids::KeyGroup)
    }

    fn open(&self, split: &str, from: Option<i64>, ctx: &SourceContext) -> Result<Self::Reader> {
        let partition: i32 = split
            .rsplit('-')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| source_err(ctx, format!("'{split}' is not a partition split")))?;
        let shared = self.shared(ctx, partition)?;
        let consumer = &shared.consumer;
        let (low, high) = match shared.opening_watermarks(&self.topic, partition) {
            Some(w) => w,
            None => watermarks(consumer, &self.topic, partition)
                .map_err(|e| source_err(ctx, format!("watermarks of {split}: {e}")))?,
        };
        let next = from.unwrap_or(low);
        if next < low {
            return Err(deleted(&self.topic, partition, next, low));
        }
        // The partition's own queue first, so none of its records reaches the main one.
        let queue = consumer
            .split_partition_queue(&self.topic, partition)
            .ok_or_else(|| source_err(ctx, format!("no queue for {split}")))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next))
            .map_err(|e| source_err(ctx, format!("{split}: {e}")))?;
        consumer
            .incremental_assign(&tpl)
            .map_err(|e| source_err(ctx, format!("assigning {split}: {e}")))?;
        shared.readers.fetch_add(1, Ordering::Relaxed);
        Ok(KafkaReader {
            queue,
            shared,
            decode: self.decode.clone(),
            ctx: ctx.clone(),
            split: split.to_string(),
            topic: self.topic.clone(),
            topic_c: std::ffi::CString::new(self.topic.as_str())
                .map_err(|_| source_err(ctx, format!("topic '{}' contains NUL", self.topic)))?,
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

/// The low and high watermarks of a partition. A consumer that has been running knows
/// the topic's partitions as of its last metadata refresh; one just added to the topic
/// is unknown to it until the next, so on `UnknownPartition` the metadata is fetched
/// again (a few times, while the broker propagates it) before giving up.
fn watermarks(
    consumer: &BaseConsumer<GroupCommits>,
    topic: &str,
    partition: i32,
) -> KafkaResult<(i64, i64)> {
    use rdkafka::error::RDKafkaErrorCode::UnknownPartition;
    let mut attempts = 0;
    loop {
        match consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT) {
            Err(e) if e.rdkafka_error_code() == Some(UnknownPartition) && attempts < 20 => {
                attempts += 1;
                consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// A fetch at an offset the partition no longer has (with `auto.offset.reset=error`).
fn out_of_range(e: &KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode::{AutoOffsetReset, OffsetOutOfRange};
    matches!(
        e.rdkafka_error_code(),
        Some(AutoOffsetReset | OffsetOutOfRange)
    )
}

impl<T, F, E> KafkaSource<T, F>
where
    T: Data,
    F: Fn(&[u8]) -> std::result::Result<T, E> + Send + Sync + 'static,
    E: std::fmt::Display,
{
    /// The consumer of `ctx`'s subtask: the one its open readers use, or a new one. A
    /// partition the subtask's consumer already reads (a second reader of one split,
    /// which the engine never opens but a caller of the source could) gets a consumer
    /// of its own.
    fn shared(&self, ctx: &SourceContext, partition: i32) -> Result<Arc<Shared>> {
        let mut consumers = self.consumers.lock().unwrap_or_else(|e| e.into_inner());
        let subtask = ctx.subtask.0;
        if let Some(shared) = consumers.get(&subtask).and_then(Weak::upgrade) {
            let taken = shared
                .consumer
                .assignment()
                .is_ok_and(|tpl| tpl.find_partition(&self.topic, partition).is_some());
            if !taken {
                return Ok(shared);
            }
            return Ok(Arc::new(Shared {
                consumer: Arc::new(
                    self.consumer(&ctx.operator.0)
                        .map_err(|e| source_err(ctx, format!("creating a Kafka consumer: {e}")))?,
                ),
                readers: AtomicUsize::new(0),
                opening: Mutex::new(None),
            }));
        }
        let consumer = self
            .consumer(&ctx.operator.0)
            .map_err(|e| source_err(ctx, format!("creating a Kafka consumer: {e}")))?;
        let shared = Arc::new(Shared {
            consumer: Arc::new(consumer),
            readers: AtomicUsize::new(0),
            opening: Mutex::new(None),
        });
        consumers.insert(subtask, Arc::downgrade(&shared));
        Ok(shared)
    }
}

impl<T, F> KafkaReader<T, F> {
    /// The consumer's fetch position in the partition (the next offset it fetches).
    fn position(&self) -> Option<i64> {
        let tpl = self.shared.consumer.position().ok()?;
        match tpl.find_partition(&self.topic, self.partition)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }
}

/// Reads one partition, through its queue of the subtask's consumer.
pub struct KafkaReader<T, F> {
    /// Declared first: dropped before the consumer it belongs to.
    queue: PartitionQueue<GroupCommits>,
    shared: Arc<Shared>,
    decode: F,
    ctx: SourceContext,
    split: String,
    topic: String,
    /// The topic as a C string, for librdkafka's cached watermarks.
    topic_c: std::ffi::CString,
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
        self.shared
            .serve()
            .map_err(|e| source_err(&self.ctx, format!("reading {}: {e}", self.split)))?;
        // The only reader of its consumer waits briefly for a first record; with several,
        // none waits (the source task pauses once all of them are idle), so one idle
        // partition never delays the others.
        let first_wait = if self.shared.readers.load(Ordering::Relaxed) == 1 {
            Duration::from_millis(100)
        } else {
            Duration::ZERO
        };
        let mut got = 0;
        while got < max && !self.ended {
            let wait = if got == 0 { first_wait } else { Duration::ZERO };
            let Some(msg) = self.queue.poll(wait) else {
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
                Err(e) if out_of_range(&e) => {
                    let low = watermarks(&self.shared.consumer, &self.topic, self.partition)
                        .map_err(|w| {
                            source_err(
                                &self.ctx,
                                format!("reading {}: {e} (and its watermarks: {w})", self.split),
                            )
                        })?
                        .0;
                    return Err(if low > self.next {
                        deleted(&self.topic, self.partition, self.next, low)
                    } else {
                        source_err(&self.ctx, format!("reading {}: {e}", self.split))
                    });
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

    fn backlog(&self) -> Option<u64> {
        self.lag()
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
            .and_then(|()| self.shared.consumer.commit(&tpl, CommitMode::Async));
        if let Err(e) = committed {
            self.shared.consumer.context().commit_callback(Err(e), &tpl);
        }
    }
}

impl<T, F> KafkaReader<T, F> {
    /// The partition's end as of the consumer's last fetch response, minus the next
    /// offset to read (librdkafka keeps the end from every fetch; asking costs no
    /// request).
    fn lag(&self) -> Option<u64> {
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: `rd_kafka_get_watermark_offsets` reads the client's cached offsets
        // of a partition under its own lock and writes two integers; the client is
        // alive (the consumer is held by `self.shared`), the topic is a NUL-terminated
        // string that outlives the call, and the out-pointers point at live locals.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.shared.consumer.client().native_ptr(),
                self.topic_c.as_ptr(),
                self.partition,
                &mut low,
                &mut high,
            )
        };
        (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
            .then(|| high.saturating_sub(self.next).max(0) as u64)
    }
}

impl<T, F> Drop for KafkaReader<T, F> {
    /// Take the partition off the consumer, which other readers of the subtask may go on
    /// using (the last one closes it).
    fn drop(&mut self) {
        self.shared.readers.fetch_sub(1, Ordering::Relaxed);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, self.partition);
        let _ = self.shared.consumer.incremental_unassign(&tpl);
    }
}
