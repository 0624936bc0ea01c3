//! Exactly-once into a Kafka topic with Kafka transactions (feature `kafka`).
//!
//! # Why records are staged outside Kafka
//!
//! Flink's Kafka sink writes a checkpoint interval's records into an open transaction
//! and commits it after the checkpoint completes; after a crash between the two it
//! *resumes* that transaction from its producer id and epoch (through Java reflection)
//! to commit it. librdkafka has no way to resume a transaction: `init_transactions`
//! with the same transactional id aborts it. A crash after the manifest and before the
//! commit would then lose a completed checkpoint's records. So this sink keeps the
//! prepared records durable itself, and the Kafka transaction only spans the commit:
//!
//! * **Write**: records are encoded (key and value bytes) into the subtask's buffer.
//! * **Pre-commit** (barrier): the buffer is written as one staged object
//!   `<prefix>/<job>/<sink>/<checkpoint>-<subtask>-g<generation>.stage` (the
//!   generation is the job instance's lease; length-framed records, a
//!   record count and a CRC-32) to the staging store; the committable names it. Nothing
//!   is in Kafka yet.
//! * **Commit** (after the manifest): one transaction of the producer whose
//!   transactional id is derived from job, sink and subtask produces the staged records
//!   into the topic *and* a marker record `transactional id → checkpoint` into the
//!   marker topic, then commits. Records and marker become visible atomically. The
//!   marker's `exactly-location` header names the job's checkpoint location
//!   (`RecoveryContext::storage_id`): markers of this job's and sink's transactional ids
//!   from another location (a second job with the same name, or this job's location
//!   replaced) stop the recovery, or a commit that read the markers again, with a
//!   configuration error instead of being taken for this job's commits.
//! * **Idempotence**: a commit first compares the checkpoint with the subtask's marker
//!   (known after this process's own commits, or read from the marker topic with
//!   `read_committed`); at or below the marker it was already committed and does nothing.
//!   Commits of one subtask happen in checkpoint order and stop at the first failure, so
//!   a marker at `n` means every checkpoint up to `n` was committed.
//! * **Recovery**: `init_transactions` for every transactional id with a pending
//!   committable or a staged object fences the previous process's producers and aborts
//!   a transaction a crash left open ("lingering"); then the markers are read, the
//!   restored committables are committed (the prepared-but-not-committed case), and
//!   staged objects of checkpoints that never completed are deleted. A staged object of
//!   a newer generation means a newer instance runs on the same checkpoint location:
//!   this one stops with `Error::Fenced` before fencing any producer. (Fencing and the
//!   abort are the broker's InitProducerId semantics; `tests/kafka_sink.rs` checks them
//!   against a real Apache Kafka broker with zombie producers.)
//! * **Transaction timeout**: a commit produces one checkpoint interval's records in one
//!   transaction; a job whose checkpoint interval exceeds the producer's
//!   `transaction.timeout.ms` is refused at start. The broker refuses a timeout above
//!   its `transaction.max.timeout.ms`, reported as a configuration error.
//!
//! The marker topic (default `exactly-commits`, one partition is enough, compaction
//! recommended: only the latest marker per key matters) must exist or be creatable.
//! Consumers of the topic should read with `isolation.level=read_committed`.
//!
//! Memory: a subtask buffers one checkpoint interval's encoded records.

use exactly_engine::api::{Data, RecoveryContext, SinkContext, SinkWriter, TwoPhaseCommitSink};
use exactly_engine::error::{Error, Result};
use exactly_engine::ids::{CheckpointId, OperatorId};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long metadata, marker reads and transaction calls may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// First bytes of a staged object (format version 1).
const STAGE_MAGIC: &[u8] = b"exactly-kafka-stage-1\n";
/// A key length meaning "no key".
const NO_KEY: u32 = u32::MAX;

/// Where staged records wait between the barrier and the commit.
#[derive(Clone)]
pub struct Staging {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// The directory of [`Staging::dir`]: a put interrupted by a crash leaves its
    /// temporary file (`<name>#<n>`) there, which listing the store does not show.
    local: Option<std::path::PathBuf>,
}

impl Staging {
    /// A local directory (created if missing). It must survive a process restart; on a
    /// machine that can be replaced, use an object store instead.
    pub fn dir(path: impl AsRef<std::path::Path>) -> Result<Staging> {
        let path = path.as_ref();
        std::fs::create_dir_all(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(path).map_err(|e| {
            Error::config(format!("Kafka staging directory {}: {e}", path.display()))
        })?;
        Ok(Staging {
            store: Arc::new(store),
            prefix: Path::default(),
            local: Some(path.to_path_buf()),
        })
    }

    /// Under `prefix` of any object store.
    pub fn store(store: Arc<dyn ObjectStore>, prefix: &str) -> Result<Staging> {
        let prefix = Path::parse(prefix.trim_matches('/'))
            .map_err(|e| Error::config(format!("Kafka staging prefix '{prefix}': {e}")))?;
        Ok(Staging {
            store,
            prefix,
            local: None,
        })
    }

    /// An S3 URL `s3://bucket/prefix`, configured from the `AWS_*` environment.
    #[cfg(feature = "s3")]
    pub fn s3(url: &str) -> Result<Staging> {
        let (store, prefix) = exactly_engine::connect::s3_bucket(url)?;
        Ok(Staging {
            store: Arc::new(store),
            prefix,
            local: None,
        })
    }
}

/// Encodes a record into Kafka key and value bytes; both buffers arrive empty. An
/// empty key is sent as no key.
pub trait KafkaEncoder<T>: Send + Sync + 'static {
    /// Fill `key` and `value` for `record`.
    fn encode(&self, record: &T, key: &mut Vec<u8>, value: &mut Vec<u8>);
}

impl<T, F: Fn(&T, &mut Vec<u8>, &mut Vec<u8>) + Send + Sync + 'static> KafkaEncoder<T> for F {
    fn encode(&self, record: &T, key: &mut Vec<u8>, value: &mut Vec<u8>) {
        self(record, key, value)
    }
}

/// What one subtask staged for one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaCommittable {
    /// The producer's transactional id (job, sink, subtask).
    pub transactional_id: String,
    /// The checkpoint.
    pub checkpoint: u64,
    /// Path of the staged object in the staging store.
    pub staged: String,
    /// Records staged.
    pub records: u64,
}

/// Exactly-once writes into a Kafka topic; see the module docs for the protocol.
pub struct KafkaSink<T, E> {
    inner: Arc<Inner>,
    encoder: Arc<E>,
    _t: PhantomData<fn(T)>,
}

struct Inner {
    brokers: String,
    topic: String,
    marker_topic: String,
    config: Vec<(String, String)>,
    /// The partition of a record with a key, from the key; `None`: the producer's
    /// partitioner chooses.
    partition_of_key: Option<fn(&[u8]) -> i32>,
    transaction_timeout: Duration,
    staging: Staging,
    /// The job's I/O runtime (for the staging store and the admin client), known from
    /// recovery, which comes before every commit.
    io: Mutex<Option<tokio::runtime::Handle>>,
    /// Initialised transactional producers by transactional id.
    producers: Mutex<HashMap<String, ThreadedProducer<DefaultProducerContext>>>,
    /// The last committed checkpoint per transactional id; `None` until read from the
    /// marker topic, and again after a commit whose outcome is unknown.
    markers: Mutex<Option<HashMap<String, Marker>>>,
    /// The job's checkpoint location identity, known from recovery; every marker
    /// carries it in a header.
    storage_id: Mutex<Option<String>>,
}

/// The marker header naming the checkpoint location that committed.
const LOCATION_HEADER: &str = "exactly-location";

/// What the marker topic holds for one transactional id.
#[derive(Debug, Default)]
struct Marker {
    /// The highest checkpoint committed.
    checkpoint: u64,
    /// Every checkpoint location identity its markers name (markers written before
    /// identities were recorded name none).
    locations: BTreeSet<String>,
}

impl Marker {
    /// A location other than `mine` that committed under this transactional id.
    fn foreign(&self, mine: &str) -> Option<&str> {
        self.locations
            .iter()
            .map(String::as_str)
            .find(|&l| l != mine)
    }
}

/// The error for commits of another checkpoint location under this job's and sink's
/// transactional ids: another job with the same name, or this job's location replaced.
fn foreign_marker(
    sink: &OperatorId,
    marker_topic: &str,
    id: &str,
    theirs: &str,
    mine: &str,
) -> Error {
    Error::config(format!(
        "Kafka sink '{sink}': marker topic '{marker_topic}' holds commits of transactional \
         id '{id}' made from another checkpoint location (identity {theirs}; this job's is \
         {mine}). Either a second job with this job's name and a sink of this name writes \
         to the same Kafka cluster (each would fence the other's producers and could skip \
         the other's checkpoints): give every job a name of its own, or each sink its own \
         marker_topic; or this job's checkpoint location was replaced or emptied while the \
         topic kept its output: restore the location, or start over under a new job or \
         sink name (the transactional ids and markers are named after them)"
    ))
}

impl<T: Data, E: KafkaEncoder<T>> KafkaSink<T, E> {
    /// Write into `topic` on `brokers` (comma-separated `host:port`), staging records in
    /// `staging` between barrier and commit, encoding each with `encoder`.
    pub fn new(brokers: &str, topic: &str, staging: Staging, encoder: E) -> Result<Self> {
        if topic.is_empty() {
            return Err(Error::config("Kafka sink: the topic name is empty"));
        }
        Ok(KafkaSink {
            inner: Arc::new(Inner {
                brokers: brokers.to_string(),
                topic: topic.to_string(),
                marker_topic: "exactly-commits".to_string(),
                config: Vec::new(),
                partition_of_key: None,
                transaction_timeout: Duration::from_secs(60),
                staging,
                io: Mutex::new(None),
                producers: Mutex::new(HashMap::new()),
                markers: Mutex::new(None),
                storage_id: Mutex::new(None),
            }),
            encoder: Arc::new(encoder),
            _t: PhantomData,
        })
    }

    fn inner_mut(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("configured before the job runs")
    }

    /// The topic holding commit markers (default `exactly-commits`).
    pub fn marker_topic(mut self, topic: &str) -> Self {
        self.inner_mut().marker_topic = topic.to_string();
        self
    }

    /// Choose each record's partition from its key (when it has one) instead of the
    /// producer's partitioner: for a topic whose partitions mean something to its
    /// readers, such as a repartition topic with one partition per key group.
    pub fn partition_by_key(mut self, partition: fn(&[u8]) -> i32) -> Self {
        self.inner_mut().partition_of_key = Some(partition);
        self
    }

    /// The producer's `transaction.timeout.ms` (default 60 s); must be at least the
    /// job's checkpoint interval and at most the broker's `transaction.max.timeout.ms`.
    pub fn transaction_timeout(mut self, timeout: Duration) -> Self {
        self.inner_mut().transaction_timeout = timeout;
        self
    }

    /// Set a librdkafka client property for the producers and the marker reader
    /// (security, compression, ...).
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.inner_mut()
            .config
            .push((key.to_string(), value.to_string()));
        self
    }
}

/// `/` and `%` escaped, so ids made of names cannot collide.
fn escape(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2F")
}

/// What every transactional id of one job's sink starts with.
fn id_prefix(job: &str, sink: &str) -> String {
    format!("exactly/{}/{}/", escape(job), escape(sink))
}

fn transactional_id(job: &str, sink: &str, subtask: usize) -> String {
    format!("{}{subtask}", id_prefix(job, sink))
}

fn kafka_err(sink: &OperatorId, step: &'static str, cp: Option<u64>, msg: String) -> Error {
    Error::Sink {
        sink: sink.clone(),
        step,
        checkpoint: cp.map(CheckpointId),
        source: msg.into(),
    }
}

impl Inner {
    /// The job's I/O runtime, as recovery passed it.
    fn io(&self) -> Result<tokio::runtime::Handle> {
        self.io.lock().expect("io handle").clone().ok_or_else(|| {
            Error::config("the Kafka sink was asked to commit before its recovery ran")
        })
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.config {
            c.set(k, v);
        }
        c
    }

    fn staged_dir(&self, job: &str, sink: &str) -> Path {
        self.staging.prefix.clone().join(job).join(sink)
    }

    /// The initialised producer of `id`, created (and `init_transactions` called, which
    /// fences older producers of the id and aborts their open transaction) if needed.
    fn with_producer<R>(
        &self,
        sink: &OperatorId,
        step: &'static str,
        id: &str,
        f: impl FnOnce(&ThreadedProducer<DefaultProducerContext>) -> R,
    ) -> Result<R> {
        let mut producers = self.producers.lock().expect("producer map");
        if !producers.contains_key(id) {
            let mut c = self.client_config();
            c.set("transactional.id", id).set(
                "transaction.timeout.ms",
                self.transaction_timeout.as_millis().to_string(),
            );
            let p: ThreadedProducer<DefaultProducerContext> = c.create().map_err(|e| {
                Error::config(format!("Kafka sink '{sink}': creating a producer: {e}"))
            })?;
            match p.init_transactions(REQUEST_TIMEOUT) {
                Ok(()) => {}
                Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::InvalidTransactionTimeout) => {
                    return Err(Error::config(format!(
                        "Kafka sink '{sink}': the broker refuses transaction.timeout.ms = {} ms; it must not exceed the broker's transaction.max.timeout.ms (set a lower .transaction_timeout, and checkpoint at least that often)",
                        self.transaction_timeout.as_millis()
                    )))
                }
                Err(e) => {
                    return Err(kafka_err(
                        sink,
                        step,
                        None,
                        format!("init_transactions for '{id}': {e}"),
                    ))
                }
            }
            producers.insert(id.to_string(), p);
        }
        Ok(f(&producers[id]))
    }

    /// Read every marker of the marker topic's partition 0 (committed ones only), up to
    /// the high watermark at the start. A `read_committed` reader stops early at a
    /// transaction still open (another job's, or one a crashed process left until its
    /// timeout); a marker committed after that would be missed and its checkpoint
    /// produced twice, so the reader waits until its position reaches the watermark.
    fn read_markers(&self, sink: &OperatorId) -> Result<HashMap<String, Marker>> {
        let err = |m: String| kafka_err(sink, "recover", None, m);
        let mut c = self.client_config();
        c.set("group.id", "exactly-marker-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed");
        let consumer: BaseConsumer<EndIsNoError> = c
            .create_with_context(EndIsNoError)
            .map_err(|e| err(format!("creating the marker reader: {e}")))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.marker_topic, 0, Offset::Beginning)
            .map_err(|e| err(e.to_string()))?;
        // The end of the log, asked as a `read_uncommitted` client: under
        // `read_committed` the broker answers with the last stable offset, which an open
        // transaction holds at its start, and reading up to there would miss every
        // marker committed behind it.
        let mut u = self.client_config();
        u.set("group.id", "exactly-marker-reader")
            .set("isolation.level", "read_uncommitted");
        let (_, high) = u
            .create::<BaseConsumer>()
            .and_then(|c| c.fetch_watermarks(&self.marker_topic, 0, REQUEST_TIMEOUT))
            .map_err(|e| err(format!("watermarks of '{}': {e}", self.marker_topic)))?;
        consumer
            .assign(&tpl)
            .map_err(|e| err(format!("assigning {}: {e}", self.marker_topic)))?;
        let patience = REQUEST_TIMEOUT + self.transaction_timeout;
        let deadline = Instant::now() + patience;
        let mut markers = HashMap::new();
        // librdkafka recovers from consumer errors by itself (they are informational):
        // keep reading until the deadline, and name the last one if it passes.
        let mut last_error = String::new();
        loop {
            if Instant::now() > deadline {
                return Err(err(format!(
                    "reading markers from '{}' up to offset {high} took longer than {patience:?} (a transaction stays open on it?{last_error})",
                    self.marker_topic
                )));
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    let position = consumer.position().ok().and_then(|tpl| {
                        tpl.find_partition(&self.marker_topic, 0)
                            .and_then(|p| p.offset().to_raw())
                    });
                    if high == 0 || position.is_some_and(|p| p >= high) {
                        return Ok(markers);
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(topic = %self.marker_topic, error = %e, "reading markers");
                    last_error = format!(" last error: {e}");
                }
                Some(Ok(m)) => {
                    let (Some(key), Some(value)) = (m.key(), m.payload()) else {
                        continue;
                    };
                    let (Ok(key), Some(cp)) = (
                        std::str::from_utf8(key),
                        std::str::from_utf8(value)
                            .ok()
                            .and_then(|v| v.parse::<u64>().ok()),
                    ) else {
                        continue;
                    };
                    let e: &mut Marker = markers.entry(key.to_string()).or_default();
                    e.checkpoint = e.checkpoint.max(cp);
                    let location = m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == LOCATION_HEADER)
                            .and_then(|h| h.value)
                            .and_then(|v| std::str::from_utf8(v).ok())
                    });
                    if let Some(l) = location {
                        if !e.locations.contains(l) {
                            e.locations.insert(l.to_string());
                        }
                    }
                }
            }
        }
    }

    /// The marker topic exists, or is created (one partition, compacted).
    fn ensure_marker_topic(&self, sink: &OperatorId) -> Result<()> {
        let consumer: BaseConsumer = self
            .client_config()
            .create()
            .map_err(|e| Error::config(format!("Kafka sink '{sink}': {e}")))?;
        let md = consumer
            .fetch_metadata(Some(&self.marker_topic), REQUEST_TIMEOUT)
            .map_err(|e| Error::config(format!("Kafka sink '{sink}' on {}: {e}", self.brokers)))?;
        let exists = md.topics().iter().any(|t| {
            t.name() == self.marker_topic && t.error().is_none() && !t.partitions().is_empty()
        });
        if exists {
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .map_err(|e| Error::config(format!("Kafka sink '{sink}': {e}")))?;
        let topic = NewTopic::new(&self.marker_topic, 1, TopicReplication::Fixed(-1))
            .set("cleanup.policy", "compact");
        let created = self
            .io()?
            .block_on(admin.create_topics([&topic], &AdminOptions::new()));
        let failure = match created {
            Ok(results) => results.into_iter().find_map(|r| match r {
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) | Ok(_) => None,
                Err((_, code)) => Some(code.to_string()),
            }),
            Err(e) => Some(e.to_string()),
        };
        match failure {
            None => Ok(()),
            Some(why) => Err(Error::config(format!(
                "Kafka sink '{sink}': the marker topic '{}' does not exist and could not be created ({why}); create it with 1 partition and cleanup.policy=compact",
                self.marker_topic
            ))),
        }
    }

    /// Commit `c` (see the module docs); idempotent.
    fn commit(&self, sink: &OperatorId, c: &KafkaCommittable) -> Result<()> {
        let cp = Some(c.checkpoint);
        // The producer first: initialising it aborts an open transaction of a previous
        // attempt, so the markers read next are final.
        self.with_producer(sink, "commit", &c.transactional_id, |_| ())?;
        let committed = {
            let mut markers = self.markers.lock().expect("markers");
            if markers.is_none() {
                *markers = Some(self.read_markers(sink)?);
            }
            let marker = markers.as_ref().and_then(|m| m.get(&c.transactional_id));
            let mine = self.storage_id.lock().expect("storage id");
            if let (Some(marker), Some(mine)) = (marker, mine.as_deref()) {
                if let Some(theirs) = marker.foreign(mine) {
                    return Err(foreign_marker(
                        sink,
                        &self.marker_topic,
                        &c.transactional_id,
                        theirs,
                        mine,
                    ));
                }
            }
            marker.map(|m| m.checkpoint)
        };
        let path = Path::parse(&c.staged)
            .map_err(|e| kafka_err(sink, "commit", cp, format!("staged path: {e}")))?;
        if committed.is_some_and(|m| m >= c.checkpoint) {
            tracing::debug!(%sink, checkpoint = c.checkpoint, "already committed");
            self.delete_staged(&path);
            return Ok(());
        }
        let store = self.staging.store.clone();
        let get_path = path.clone();
        let bytes = match self
            .io()?
            .block_on(async move { store.get(&get_path).await?.bytes().await })
        {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::CommitLost {
                    sink: sink.clone(),
                    checkpoint: CheckpointId(c.checkpoint),
                    message: format!("staged records {} are gone", c.staged),
                })
            }
            Err(e) => {
                return Err(kafka_err(
                    sink,
                    "commit",
                    cp,
                    format!("reading {}: {e}", c.staged),
                ))
            }
        };
        let records = decode_staged(&bytes, c.records).map_err(|m| Error::CommitLost {
            sink: sink.clone(),
            checkpoint: CheckpointId(c.checkpoint),
            message: format!("staged records {} are damaged: {m}", c.staged),
        })?;
        let result = self.with_producer(sink, "commit", &c.transactional_id, |p| {
            self.produce_transaction(p, c, records)
        })?;
        match result {
            Ok(()) => {
                if let Some(m) = self.markers.lock().expect("markers").as_mut() {
                    let marker = m.entry(c.transactional_id.clone()).or_default();
                    marker.checkpoint = marker.checkpoint.max(c.checkpoint);
                }
                self.delete_staged(&path);
                Ok(())
            }
            Err(e) => {
                // The outcome may be unknown: drop the producer (its successor aborts
                // what is open) and read the markers again before the next commit.
                self.producers
                    .lock()
                    .expect("producer map")
                    .remove(&c.transactional_id);
                *self.markers.lock().expect("markers") = None;
                Err(kafka_err(sink, "commit", cp, e.to_string()))
            }
        }
    }

    fn produce_transaction<'a>(
        &self,
        p: &ThreadedProducer<DefaultProducerContext>,
        c: &KafkaCommittable,
        records: impl Iterator<Item = (Option<&'a [u8]>, &'a [u8])>,
    ) -> std::result::Result<(), KafkaError> {
        p.begin_transaction()?;
        let outcome = (|| {
            for (key, value) in records {
                let mut r = BaseRecord::<[u8], [u8]>::to(&self.topic).payload(value);
                if let Some(k) = key {
                    r = r.key(k);
                    if let Some(partition) = self.partition_of_key {
                        r = r.partition(partition(k));
                    }
                }
                send(p, r)?;
            }
            let marker = c.checkpoint.to_string();
            let storage_id = self.storage_id.lock().expect("storage id").clone();
            let mut record = BaseRecord::<str, str>::to(&self.marker_topic)
                .partition(0)
                .key(c.transactional_id.as_str())
                .payload(marker.as_str());
            if let Some(id) = &storage_id {
                record = record.headers(OwnedHeaders::new().insert(Header {
                    key: LOCATION_HEADER,
                    value: Some(id.as_bytes()),
                }));
            }
            send(p, record)?;
            p.commit_transaction(REQUEST_TIMEOUT)
        })();
        if outcome.is_err() {
            let _ = p.abort_transaction(REQUEST_TIMEOUT);
        }
        outcome
    }

    fn delete_staged(&self, path: &Path) {
        let store = self.staging.store.clone();
        let p = path.clone();
        let io = match self.io() {
            Ok(io) => io,
            // Left behind; the next recovery deletes it.
            Err(e) => {
                return tracing::warn!(path = %path, error = %e, "deleting staged Kafka records")
            }
        };
        match io.block_on(async move { store.delete(&p).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            // Left behind; the next recovery deletes it.
            Err(e) => tracing::warn!(path = %path, error = %e, "deleting staged Kafka records"),
        }
    }
}

/// Send, waiting while the producer's queue is full.
fn send<K: rdkafka::message::ToBytes + ?Sized, V: rdkafka::message::ToBytes + ?Sized>(
    p: &ThreadedProducer<DefaultProducerContext>,
    mut record: BaseRecord<'_, K, V>,
) -> std::result::Result<(), KafkaError> {
    loop {
        match p.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Checkpoint, subtask and fencing generation in a staged object's name
/// (`<checkpoint>-<subtask>-g<generation>.stage`; names written before generations
/// existed, `<checkpoint>-<subtask>.stage`, are generation 0).
fn staged_name_parts(name: &str) -> Option<(u64, usize, u64)> {
    let mut parts = name.strip_suffix(".stage")?.split('-');
    let cp = parts.next()?.parse().ok()?;
    let subtask = parts.next()?.parse().ok()?;
    let generation = match parts.next() {
        None => 0,
        Some(g) => g.strip_prefix('g')?.parse().ok()?,
    };
    parts.next().is_none().then_some((cp, subtask, generation))
}

/// Append one record to a staged buffer.
fn frame(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let key_len = if key.is_empty() {
        NO_KEY
    } else {
        key.len() as u32
    };
    buf.extend_from_slice(&key_len.to_le_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
    buf.extend_from_slice(value);
}

/// The records of a staged object, after checking its header, count and CRC-32.
fn decode_staged(
    bytes: &[u8],
    expected: u64,
) -> std::result::Result<impl Iterator<Item = (Option<&[u8]>, &[u8])>, String> {
    let body_end = bytes
        .len()
        .checked_sub(12)
        .filter(|&e| e >= STAGE_MAGIC.len() && bytes.starts_with(STAGE_MAGIC))
        .ok_or("not a staged-records object")?;
    let count = u64::from_le_bytes(bytes[body_end..body_end + 8].try_into().unwrap());
    let crc = u32::from_le_bytes(bytes[body_end + 8..].try_into().unwrap());
    if crc32fast::hash(&bytes[..body_end + 8]) != crc {
        return Err("CRC mismatch".into());
    }
    if count != expected {
        return Err(format!("{count} records, the committable says {expected}"));
    }
    let mut rest = &bytes[STAGE_MAGIC.len()..body_end];
    let mut take = move |n: usize| -> &[u8] {
        let (a, b) = rest.split_at(n);
        rest = b;
        a
    };
    // The CRC matched, so the framing is what the writer wrote.
    Ok((0..count).map(move |_| {
        let key_len = u32::from_le_bytes(take(4).try_into().unwrap());
        let key = (key_len != NO_KEY).then(|| take(key_len as usize));
        let value_len = u32::from_le_bytes(take(4).try_into().unwrap()) as usize;
        (key, take(value_len))
    }))
}

impl<T: Data, E: KafkaEncoder<T>> TwoPhaseCommitSink for KafkaSink<T, E> {
    type Item = T;
    type Committable = KafkaCommittable;
    type Writer = KafkaWriter<T, E>;

    fn open_writer(&self, ctx: &SinkContext) -> Result<Self::Writer> {
        if let Some(interval) = ctx.checkpoint_interval {
            if self.inner.transaction_timeout < interval {
                return Err(Error::config(format!(
                    "Kafka sink '{}': transaction timeout {:?} is shorter than the checkpoint interval {interval:?}; a commit produces one interval's records in one transaction, which the broker would abort. Raise .transaction_timeout (up to the broker's transaction.max.timeout.ms) or checkpoint more often",
                    ctx.sink, self.inner.transaction_timeout
                )));
            }
        }
        Ok(KafkaWriter {
            inner: self.inner.clone(),
            io: ctx.io.clone(),
            encoder: self.encoder.clone(),
            dir: self.inner.staged_dir(&ctx.job, &ctx.sink.0),
            transactional_id: transactional_id(&ctx.job, &ctx.sink.0, ctx.subtask.0),
            subtask: ctx.subtask.0,
            generation: ctx.generation,
            buf: STAGE_MAGIC.to_vec(),
            key: Vec::new(),
            value: Vec::new(),
            records: 0,
            _t: PhantomData,
        })
    }

    fn commit(&self, c: &KafkaCommittable) -> Result<()> {
        // The sink's name is not in the committable; the transactional id names it.
        let sink = OperatorId(c.transactional_id.clone());
        self.inner.commit(&sink, c)
    }

    fn recover(
        &self,
        ctx: &RecoveryContext,
        mut pending: Vec<KafkaCommittable>,
    ) -> Result<Option<CheckpointId>> {
        let inner = &self.inner;
        *inner.storage_id.lock().expect("storage id") = Some(ctx.storage_id.clone());
        *inner.io.lock().expect("io handle") = Some(ctx.io.clone());
        inner.ensure_marker_topic(&ctx.sink)?;
        // Staged objects of this job and sink: (path, checkpoint, subtask).
        let dir = inner.staged_dir(&ctx.job, &ctx.sink.0);
        let store = inner.staging.store.clone();
        let list_dir = dir.clone();
        let listed: Vec<Path> = ctx
            .io
            .block_on(async move {
                store
                    .list(Some(&list_dir))
                    .map_ok(|m| m.location)
                    .try_collect()
                    .await
            })
            .map_err(|e| kafka_err(&ctx.sink, "recover", None, format!("listing {dir}: {e}")))?;
        let staged: Vec<(Path, u64, usize)> = listed
            .into_iter()
            .filter_map(|p| {
                let (cp, subtask, generation) = staged_name_parts(p.filename()?)?;
                Some((p, cp, subtask, generation))
            })
            .map(|(p, cp, subtask, generation)| {
                if generation > ctx.generation {
                    // A newer instance staged it: fencing producers or deleting would
                    // break its commits. This one is fenced and touches nothing.
                    return Err(Error::Fenced {
                        epoch: ctx.generation,
                        newer: generation,
                        url: format!("Kafka sink '{}' staging", ctx.sink),
                    });
                }
                Ok((p, cp, subtask))
            })
            .collect::<Result<_>>()?;
        // Temporary files of puts a crash interrupted (local staging only), of this
        // instance's generation or older: never committed, never listed.
        if let Some(root) = &inner.staging.local {
            let local_dir = root.join(&ctx.job).join(&ctx.sink.0);
            for entry in std::fs::read_dir(&local_dir)
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = entry.file_name().to_string_lossy().to_string();
                let Some((staged, _)) = name.split_once('#') else {
                    continue;
                };
                if staged_name_parts(staged).is_some_and(|(_, _, g)| g <= ctx.generation) {
                    tracing::info!(file = %name, "deleting a staged file a crash left half written");
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        // Fence the previous producers and abort what they left open.
        let ids: BTreeSet<String> = pending
            .iter()
            .map(|c| c.transactional_id.clone())
            .chain(
                staged
                    .iter()
                    .map(|(_, _, s)| transactional_id(&ctx.job, &ctx.sink.0, *s)),
            )
            .collect();
        for id in &ids {
            inner.with_producer(&ctx.sink, "recover", id, |_| ())?;
        }
        let markers = inner.read_markers(&ctx.sink)?;
        let mine = id_prefix(&ctx.job, &ctx.sink.0);
        let ours = || markers.iter().filter(|(k, _)| k.starts_with(&mine));
        // Before anything is compared: a marker of another location under these ids
        // is not this job's history, whatever its checkpoint.
        if let Some((id, theirs)) = ours().find_map(|(k, m)| Some((k, m.foreign(&ctx.storage_id)?)))
        {
            return Err(foreign_marker(
                &ctx.sink,
                &inner.marker_topic,
                id,
                theirs,
                &ctx.storage_id,
            ));
        }
        let highest_marker = ours()
            .map(|(k, m)| (k, m.checkpoint))
            .max_by_key(|&(_, v)| v);
        // A marker above the restored checkpoint: the checkpoint storage lost manifests
        // whose records are already in the topic (deleted, moved aside, a fresh location
        // for the same job). Going on would produce them again.
        if let Some((id, cp)) = highest_marker {
            if ctx.restored.is_none_or(|r| cp > r.0) {
                return Err(Error::output_ahead_of_checkpoints(
                    &ctx.sink.0,
                    &format!(
                        "marker topic '{}' records a transaction of '{id}'",
                        inner.marker_topic
                    ),
                    cp,
                    ctx.restored,
                ));
            }
        }
        let highest_marker = highest_marker.map(|(_, cp)| cp);
        *inner.markers.lock().expect("markers") = Some(markers);
        pending.sort_by_key(|c| c.checkpoint);
        for c in &pending {
            inner.commit(&ctx.sink, c)?;
        }
        let keep: BTreeSet<&str> = pending.iter().map(|c| c.staged.as_str()).collect();
        let mut highest = highest_marker;
        for (path, cp, _) in &staged {
            highest = highest.max(Some(*cp));
            if !keep.contains(path.as_ref()) {
                tracing::info!(sink = %ctx.sink, checkpoint = cp, "deleting staged Kafka records of an uncompleted checkpoint");
                inner.delete_staged(path);
            }
        }
        Ok(highest.map(CheckpointId))
    }
}

/// Buffers one subtask's records of the current checkpoint interval.
pub struct KafkaWriter<T, E> {
    inner: Arc<Inner>,
    /// The job's I/O runtime, for staging.
    io: tokio::runtime::Handle,
    encoder: Arc<E>,
    dir: Path,
    transactional_id: String,
    subtask: usize,
    /// This instance's fencing generation, in every staged object's name.
    generation: u64,
    /// Header and framed records since the last barrier.
    buf: Vec<u8>,
    key: Vec<u8>,
    value: Vec<u8>,
    records: u64,
    _t: PhantomData<fn(T)>,
}

impl<T: Data, E: KafkaEncoder<T>> SinkWriter for KafkaWriter<T, E> {
    type Item = T;
    type Committable = KafkaCommittable;

    fn write(&mut self, batch: &mut Vec<T>) -> Result<()> {
        for record in batch.drain(..) {
            self.key.clear();
            self.value.clear();
            self.encoder.encode(&record, &mut self.key, &mut self.value);
            frame(&mut self.buf, &self.key, &self.value);
            self.records += 1;
        }
        Ok(())
    }

    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<Option<KafkaCommittable>> {
        if self.records == 0 {
            return Ok(None);
        }
        self.buf.extend_from_slice(&self.records.to_le_bytes());
        let crc = crc32fast::hash(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        let path = self.dir.clone().join(format!(
            "{:020}-{}-g{}.stage",
            checkpoint.0, self.subtask, self.generation
        ));
        let payload = PutPayload::from(std::mem::replace(&mut self.buf, STAGE_MAGIC.to_vec()));
        let store = self.inner.staging.store.clone();
        let put_path = path.clone();
        self.io
            .block_on(async move { store.put(&put_path, payload).await })
            .map_err(|e| Error::Sink {
                sink: OperatorId(self.transactional_id.clone()),
                step: "pre-commit",
                checkpoint: Some(checkpoint),
                source: format!("staging {path}: {e}").into(),
            })?;
        let c = KafkaCommittable {
            transactional_id: self.transactional_id.clone(),
            checkpoint: checkpoint.0,
            staged: path.to_string(),
            records: self.records,
        };
        self.records = 0;
        Ok(Some(c))
    }
}

/// The marker reader's client: librdkafka also reports reaching the end of the marker
/// partition as a client-wide error, which is the reader's expected end, not an error.
struct EndIsNoError;

impl ClientContext for EndIsNoError {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::trace!(%reason, "end of the marker partition");
        } else {
            tracing::error!(%error, %reason, "Kafka client error");
        }
    }
}

impl ConsumerContext for EndIsNoError {}

#[cfg(test)]
mod tests {
    use super::staged_name_parts;

    #[test]
    fn staged_names_carry_checkpoint_subtask_and_generation() {
        assert_eq!(
            staged_name_parts("00000000000000000007-2-g13.stage"),
            Some((7, 2, 13))
        );
        assert_eq!(
            staged_name_parts("00000000000000000007-2.stage"),
            Some((7, 2, 0)),
            "names from before generations are generation 0"
        );
        assert_eq!(staged_name_parts("7-2-x13.stage"), None);
        assert_eq!(staged_name_parts("7-2-g1-9.stage"), None);
        assert_eq!(staged_name_parts("7-2-g1.tmp"), None);
    }
}
