//! Exactly-once files in an object store (S3 and compatible stores, GCS, Azure, or
//! memory), written with multipart uploads.
//!
//! # Protocol
//!
//! * Each sink subtask writes its records of one checkpoint interval into part files
//!   (`<prefix>/part-<sink>-<subtask>-g<generation>-<run>-<seq>.<ext>`, the generation
//!   being the job instance's lease; a new file once one exceeds
//!   [`ObjectStoreSink::max_file_bytes`]). A file is a multipart upload: full parts are
//!   uploaded while records arrive, on the job's I/O runtime, so the operator thread
//!   goes on encoding while they travel; it waits only when [`PARTS_AHEAD`] parts are
//!   already queued behind the ones in flight (memory stays bounded: at most
//!   `PARTS_AHEAD + PARTS_IN_FLIGHT + 1` parts of 8 MiB per file being written, and a
//!   file rolled over within an interval (see `max_file_bytes`) keeps at most that many
//!   until its upload ends). A writer dropped by a failed attempt stops its uploads;
//!   recovery aborts what they started.
//! * Before a file's upload starts, a marker `<prefix>/_pending/<sink>/<file>.json`
//!   records its path and upload id.
//! * At the barrier the rest of each file goes up as its last part, and the barrier
//!   waits for every part of the interval's files (the checkpoint's `max_sink_wait`
//!   reports how long); the committable is every file's path, upload id, part ids and
//!   size. Nothing is visible yet.
//! * Commit completes the uploads (the object appears atomically with all its bytes),
//!   then deletes the markers. Completing an upload that was already completed fails
//!   with "no such upload"; the commit then checks that the object exists with the
//!   recorded size, so a repeated commit is harmless, and a missing object is
//!   [`Error::CommitLost`].
//! * Recovery commits the restored committables, then aborts the upload of every
//!   remaining marker (files of checkpoints that never completed) and deletes it. On S3
//!   it also lists the incomplete uploads under the sink's prefix (`ListMultipartUploads`)
//!   and aborts them: an upload created just before a crash, before its marker was
//!   written, is known only to the server. So no incomplete multipart upload is left
//!   behind. One sink per prefix: recovery treats every upload of `part-<sink>-` under
//!   it as its own, and a job refuses two sinks on one `s3://` location.
//! * Every path a committable names (it comes from the manifest) must be a plain name
//!   under the sink's prefix; anything else is refused before a request is made.

use crate::file::RecordEncoder;
use exactly_engine::api::{Data, RecoveryContext, SinkContext, SinkWriter, TwoPhaseCommitSink};
use exactly_engine::error::{Error, Result};
use exactly_engine::ids::{CheckpointId, OperatorId};
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;

/// An object store that supports the low-level multipart API.
pub trait Bucket: ObjectStore + MultipartStore {}
impl<B: ObjectStore + MultipartStore> Bucket for B {}

/// Parts are this large (S3 needs at least 5 MiB for every part but the last).
const PART_BYTES: usize = 8 << 20;
/// Parts of one file uploaded at the same time.
pub const PARTS_IN_FLIGHT: usize = 2;
/// Parts of one file queued behind those in flight before the writer waits.
pub const PARTS_AHEAD: usize = 1;

/// One staged file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedObject {
    /// Object path.
    pub path: String,
    /// Multipart upload id.
    pub upload_id: String,
    /// Part ids, in order.
    pub parts: Vec<String>,
    /// Size of the completed object.
    pub size: u64,
    /// The marker recording the upload.
    pub marker: String,
}

/// What an [`ObjectStoreSink`] subtask staged at one barrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectsCommittable {
    /// The sink.
    pub sink: String,
    /// The checkpoint whose barrier staged the files.
    pub checkpoint: u64,
    /// The files.
    pub files: Vec<StagedObject>,
}

#[derive(Serialize, Deserialize)]
struct Marker {
    path: String,
    upload_id: String,
    /// The fencing generation of the instance that started the upload (0: written
    /// before generations existed).
    #[serde(default)]
    generation: u64,
}

/// The generation in an object name `part-<sink>-<subtask>-g<gen>-<run>-<seq>.<ext>`
/// (0 for names from before generations).
#[cfg(any(feature = "s3", test))]
fn generation_in_name(key: &str, sink: &str) -> u64 {
    key.rsplit('/')
        .next()
        .and_then(|n| n.strip_prefix(&format!("part-{sink}-")))
        .and_then(|r| r.split_once('-'))
        .and_then(|(_, r)| r.strip_prefix('g'))
        .and_then(|r| r.split_once('-'))
        .and_then(|(g, _)| g.parse().ok())
        .unwrap_or(0)
}

/// Exactly-once part files in an object store; see the module docs.
///
/// ```no_run
/// use exactly_sinks::{JsonLines, ObjectStoreSink};
/// // Endpoint and credentials from the AWS_* environment variables (feature `s3`).
/// # #[cfg(feature = "s3")]
/// let sink = ObjectStoreSink::<(String, i64), _>::s3("s3://warehouse/ledger", JsonLines).unwrap();
/// ```
pub struct ObjectStoreSink<T, E> {
    store: Arc<dyn Bucket>,
    prefix: Path,
    encoder: E,
    max_file_bytes: u64,
    /// The job's I/O runtime, known from recovery (which comes before every commit).
    io: Mutex<Option<Handle>>,
    /// `s3://bucket/prefix`, for the job's check that no two sinks share a location.
    location: Option<String>,
    /// On S3: lists uploads the server knows of (an upload created just before a crash
    /// has no marker yet).
    #[cfg(feature = "s3")]
    lister: Option<Arc<crate::s3_uploads::UploadLister>>,
    _t: PhantomData<fn(T)>,
}

impl<T: Data, E: RecordEncoder<T>> ObjectStoreSink<T, E> {
    /// Files under `prefix` of `store`, encoded with `encoder`.
    pub fn new(store: Arc<dyn Bucket>, prefix: &str, encoder: E) -> Result<Self> {
        let prefix = Path::parse(prefix.trim_matches('/'))
            .map_err(|e| Error::config(format!("object sink prefix '{prefix}': {e}")))?;
        Ok(ObjectStoreSink {
            store,
            prefix,
            encoder,
            max_file_bytes: 128 << 20,
            io: Mutex::new(None),
            location: None,
            #[cfg(feature = "s3")]
            lister: None,
            _t: PhantomData,
        })
    }

    /// Files under `s3://bucket/prefix`, with the endpoint and credentials from the
    /// AWS environment variables (as for checkpoint storage).
    #[cfg(feature = "s3")]
    pub fn s3(url: &str, encoder: E) -> Result<Self> {
        let (store, prefix) = exactly_engine::connect::s3_bucket(url)?;
        let store = Arc::new(store);
        let bucket = url
            .trim_start_matches("s3://")
            .split('/')
            .next()
            .unwrap_or_default();
        let lister = crate::s3_uploads::UploadLister::from_env(store.clone(), bucket)?;
        let mut sink = Self::new(store, prefix.as_ref(), encoder)?;
        sink.lister = Some(Arc::new(lister));
        sink.location = Some(format!("s3://{bucket}/{}", sink.prefix));
        Ok(sink)
    }

    /// Start a new file once one reaches this size (default 128 MiB).
    pub fn max_file_bytes(mut self, n: u64) -> Self {
        self.max_file_bytes = n.max(1);
        self
    }

    fn err(sink: &str, step: &'static str, c: Option<u64>, e: object_store::Error) -> Error {
        Error::Sink {
            sink: OperatorId(sink.to_string()),
            step,
            checkpoint: c.map(CheckpointId),
            source: Box::new(e),
        }
    }

    /// The job's I/O runtime, as recovery passed it.
    fn io(&self) -> Result<Handle> {
        self.io.lock().expect("io handle").clone().ok_or_else(|| {
            Error::config("the object store sink was asked to commit before its recovery ran")
        })
    }

    fn marker_dir(&self, sink: &str) -> Path {
        self.prefix.clone().join("_pending").join(sink)
    }

    /// The object holding the highest checkpoint this sink committed here.
    fn committed_path(&self, sink: &str) -> Path {
        self.prefix.clone().join("_committed").join(sink)
    }

    /// The highest checkpoint committed into this prefix, if any.
    async fn committed_high_water(&self, sink: &str) -> Result<Option<u64>> {
        let path = self.committed_path(sink);
        match self.store.get(&path).await {
            Ok(r) => {
                let bytes = r
                    .bytes()
                    .await
                    .map_err(|e| Self::err(sink, "recover", None, e))?;
                let id = std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .ok_or_else(|| Error::CorruptCheckpoint {
                        checkpoint: CheckpointId(0),
                        path: path.to_string(),
                        message: "not a checkpoint id".into(),
                    })?;
                Ok(Some(id))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::err(sink, "recover", None, e)),
        }
    }

    /// Refuse a committable whose paths are not plain names under this sink's prefix:
    /// it comes from the manifest, and an edited one must not complete, or later delete,
    /// objects elsewhere in the bucket.
    fn check_paths(&self, c: &ObjectsCommittable) -> Result<()> {
        let plain =
            |name: &str| !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\']);
        fn under<'a>(path: &'a str, dir: &Path) -> Option<&'a str> {
            if dir.as_ref().is_empty() {
                return Some(path); // the bucket's root: no separator to strip
            }
            path.strip_prefix(dir.as_ref())
                .and_then(|rest| rest.strip_prefix('/'))
        }
        let markers = self.marker_dir(&c.sink);
        let ok = plain(&c.sink)
            && c.files.iter().all(|f| {
                under(&f.path, &self.prefix).is_some_and(|n| plain(n) && n.starts_with("part-"))
                    && under(&f.marker, &markers).is_some_and(|n| plain(n) && n.ends_with(".json"))
            });
        if ok {
            return Ok(());
        }
        Err(Error::CorruptCheckpoint {
            checkpoint: CheckpointId(c.checkpoint),
            path: format!(
                "manifest (a committable of sink '{}')",
                c.sink.escape_debug()
            ),
            message: format!(
                "its objects {:?} do not all lie inside the sink's prefix '{}'; refusing to \
                 complete or delete anything",
                c.files
                    .iter()
                    .map(|f| (&f.path, &f.marker))
                    .collect::<Vec<_>>(),
                self.prefix
            ),
        })
    }
}

impl<T: Data, E: RecordEncoder<T>> TwoPhaseCommitSink for ObjectStoreSink<T, E> {
    type Item = T;
    type Committable = ObjectsCommittable;
    type Writer = ObjectWriter<T, E>;

    fn open_writer(&self, ctx: &SinkContext) -> Result<Self::Writer> {
        Ok(ObjectWriter {
            store: self.store.clone(),
            io: ctx.io.clone(),
            prefix: self.prefix.clone(),
            markers: self.marker_dir(&ctx.sink.0),
            encoder: self.encoder.clone(),
            max_file_bytes: self.max_file_bytes,
            sink: ctx.sink.0.clone(),
            subtask: ctx.subtask.0,
            run: run_id(),
            generation: ctx.generation,
            seq: 0,
            buf: Vec::new(),
            open: None,
            finishing: Vec::new(),
            waited: Duration::ZERO,
            _t: PhantomData,
        })
    }

    fn location(&self) -> Option<String> {
        self.location.clone()
    }

    fn commit(&self, c: &ObjectsCommittable) -> Result<()> {
        self.check_paths(c)?;
        let store = &self.store;
        self.io()?.block_on(async {
            for f in &c.files {
                let path = Path::from(f.path.as_str());
                let id = f.upload_id.clone();
                let parts = f
                    .parts
                    .iter()
                    .map(|p| PartId {
                        content_id: p.clone(),
                    })
                    .collect();
                match store.complete_multipart(&path, &id, parts).await {
                    Ok(_) => {}
                    Err(e) => {
                        // Completed before (a repeated commit), or lost.
                        match store.head(&path).await {
                            Ok(meta) if meta.size == f.size => {}
                            Ok(meta) => {
                                return Err(Error::CommitLost {
                                    sink: OperatorId(c.sink.clone()),
                                    checkpoint: CheckpointId(c.checkpoint),
                                    message: format!(
                                        "{} has {} bytes, the committed upload had {} ({e})",
                                        f.path, meta.size, f.size
                                    ),
                                })
                            }
                            Err(object_store::Error::NotFound { .. }) => {
                                return Err(Error::CommitLost {
                                    sink: OperatorId(c.sink.clone()),
                                    checkpoint: CheckpointId(c.checkpoint),
                                    message: format!(
                                        "upload {} of {} can no longer be completed and the object does not exist ({e})",
                                        f.upload_id, f.path
                                    ),
                                })
                            }
                            Err(e) => {
                                return Err(Self::err(&c.sink, "commit", Some(c.checkpoint), e))
                            }
                        }
                    }
                }
                match store.delete(&Path::from(f.marker.as_str())).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(Self::err(&c.sink, "commit", Some(c.checkpoint), e)),
                }
            }
            // Remember the highest checkpoint committed here, so that a job whose
            // checkpoint storage lost manifests finds out before committing them again.
            let high = self.committed_high_water(&c.sink).await?;
            if high.is_none_or(|h| h < c.checkpoint) {
                store
                    .put(
                        &self.committed_path(&c.sink),
                        PutPayload::from(c.checkpoint.to_string()),
                    )
                    .await
                    .map_err(|e| Self::err(&c.sink, "commit", Some(c.checkpoint), e))?;
            }
            Ok(())
        })
    }

    fn recover(
        &self,
        ctx: &RecoveryContext,
        pending: Vec<ObjectsCommittable>,
    ) -> Result<Option<CheckpointId>> {
        let sink = ctx.sink.0.clone();
        *self.io.lock().expect("io handle") = Some(ctx.io.clone());
        // Output committed by a checkpoint above the one restored: the checkpoint
        // storage lost manifests (deleted, moved aside, replaced) that this output
        // already committed; going on would commit their records again.
        let high = ctx.io.block_on(self.committed_high_water(&sink))?;
        if let Some(high) = high.filter(|&h| ctx.restored.is_none_or(|r| h > r.0)) {
            return Err(Error::output_ahead_of_checkpoints(
                &sink,
                &format!("{} holds output", self.prefix),
                high,
                ctx.restored,
            ));
        }
        for c in &pending {
            self.commit(c)?;
        }
        let dir = self.marker_dir(&sink);
        let store = &self.store;
        ctx.io.block_on(async {
            let markers: Vec<_> = store
                .list(Some(&dir))
                .try_collect()
                .await
                .map_err(|e| Self::err(&sink, "recover", None, e))?;
            // Read every marker first: one of a newer instance means this one is
            // fenced, and it must not abort anything.
            let mut found = Vec::with_capacity(markers.len());
            for m in markers {
                let bytes = store
                    .get(&m.location)
                    .await
                    .map_err(|e| Self::err(&sink, "recover", None, e))?
                    .bytes()
                    .await
                    .map_err(|e| Self::err(&sink, "recover", None, e))?;
                let marker = serde_json::from_slice::<Marker>(&bytes).ok();
                if let Some(newer) = marker.as_ref().map(|m| m.generation).filter(|&g| g > ctx.generation) {
                    return Err(Error::Fenced {
                        epoch: ctx.generation,
                        newer,
                        url: m.location.to_string(),
                    });
                }
                found.push((m, marker));
            }
            for (m, marker) in found {
                if let Some(marker) = marker {
                    let path = Path::from(marker.path.as_str());
                    tracing::info!(path = %marker.path, "aborting the upload of an unfinished checkpoint");
                    match store.abort_multipart(&path, &marker.upload_id).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(Self::err(&sink, "recover", None, e)),
                    }
                }
                match store.delete(&m.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(Self::err(&sink, "recover", None, e)),
                }
            }
            #[cfg(feature = "s3")]
            if let Some(lister) = &self.lister {
                // Uploads created just before a crash, before their marker existed.
                let files = self.prefix.clone().join(format!("part-{sink}-"));
                let uploads = lister.list(files.as_ref()).await?;
                if let Some((key, _)) = uploads
                    .iter()
                    .find(|(key, _)| generation_in_name(key, &sink) > ctx.generation)
                {
                    return Err(Error::Fenced {
                        epoch: ctx.generation,
                        newer: generation_in_name(key, &sink),
                        url: key.clone(),
                    });
                }
                for (key, id) in uploads {
                    tracing::info!(%key, "aborting an upload that has no marker");
                    match store.abort_multipart(&Path::from(key.as_str()), &id).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(Self::err(&sink, "recover", None, e)),
                    }
                }
            }
            Ok(None)
        })
    }
}

fn run_id() -> String {
    format!("{:016x}", crate::unique_u64())
}

/// A file being uploaded: its parts go to the task that uploads them.
struct OpenFile {
    path: Path,
    marker: Path,
    parts: tokio::sync::mpsc::Sender<PutPayload>,
    size: u64,
    upload: Upload,
}

/// The task uploading one file: its upload id and part ids, in order, once every part
/// sent to it is uploaded.
type Upload = tokio::task::JoinHandle<object_store::Result<(String, Vec<String>)>>;

/// A file whose last part was sent, waiting for its upload at the barrier.
struct FinishingFile {
    path: Path,
    marker: Path,
    size: u64,
    upload: Upload,
}

/// Writes one sink subtask's files.
pub struct ObjectWriter<T, E> {
    store: Arc<dyn Bucket>,
    /// The job's I/O runtime: uploads run there.
    io: Handle,
    prefix: Path,
    markers: Path,
    encoder: E,
    max_file_bytes: u64,
    sink: String,
    subtask: usize,
    run: String,
    /// This instance's fencing generation: in object names and markers.
    generation: u64,
    seq: u64,
    /// Encoded bytes not sent to an upload yet.
    buf: Vec<u8>,
    open: Option<OpenFile>,
    /// Files of this interval whose last part was sent.
    finishing: Vec<FinishingFile>,
    /// How long the last barrier waited for uploads.
    waited: Duration,
    _t: PhantomData<fn(T)>,
}

impl<T, E: RecordEncoder<T>> ObjectWriter<T, E> {
    fn err(&self, step: &'static str, e: object_store::Error) -> Error {
        Error::Sink {
            sink: OperatorId(self.sink.clone()),
            step,
            checkpoint: None,
            source: Box::new(e),
        }
    }

    /// Wait for an upload task: its upload id and part ids, or why it failed.
    fn join(&self, upload: Upload) -> Result<(String, Vec<String>)> {
        match self.io.block_on(upload) {
            Ok(r) => r.map_err(|e| self.err("write", e)),
            Err(e) => Err(Error::Sink {
                sink: OperatorId(self.sink.clone()),
                step: "write",
                checkpoint: None,
                source: format!("the upload task ended: {e}").into(),
            }),
        }
    }

    /// Start a file: a task on the I/O runtime creates its upload, records it in a
    /// marker (so recovery can abort it), then uploads the parts sent to it.
    fn start_file(&mut self) {
        let name = format!(
            "part-{}-{:04}-g{}-{}-{:06}.{}",
            self.sink,
            self.subtask,
            self.generation,
            self.run,
            self.seq,
            self.encoder.extension()
        );
        self.seq += 1;
        let path = self.prefix.clone().join(name.as_str());
        let marker = self.markers.clone().join(format!("{name}.json"));
        let (parts, mut queued) = tokio::sync::mpsc::channel::<PutPayload>(PARTS_AHEAD);
        let (store, generation) = (self.store.clone(), self.generation);
        let (p, m) = (path.clone(), marker.clone());
        let upload = self.io.spawn(async move {
            let id = store.create_multipart(&p).await?;
            let body = serde_json::to_vec(&Marker {
                path: p.to_string(),
                upload_id: id.clone(),
                generation,
            })
            .expect("a marker serialises");
            store.put(&m, PutPayload::from(body)).await?;
            let incoming = futures::stream::poll_fn(move |cx| queued.poll_recv(cx));
            let ids: Vec<String> = incoming
                .enumerate()
                .map(|(idx, data)| {
                    let (store, p, id) = (store.clone(), p.clone(), id.clone());
                    async move {
                        let part = store.put_part(&p, &id, idx, data).await?;
                        Ok::<_, object_store::Error>(part.content_id)
                    }
                })
                .buffered(PARTS_IN_FLIGHT)
                .try_collect()
                .await?;
            Ok((id, ids))
        });
        self.open = Some(OpenFile {
            path,
            marker,
            parts,
            size: 0,
            upload,
        });
    }

    /// Send `n` bytes from the front of the buffer as the next part of the open file;
    /// waits only while the file's queue of parts is full.
    fn upload_part(&mut self, n: usize) -> Result<()> {
        if self.open.is_none() {
            self.start_file();
        }
        let rest = self.buf.split_off(n);
        let data = std::mem::replace(&mut self.buf, rest);
        let len = data.len() as u64;
        let f = self.open.as_mut().expect("started above");
        if f.parts.blocking_send(PutPayload::from(data)).is_err() {
            // The task stopped taking parts: it failed; its error says why.
            let f = self.open.take().expect("open");
            drop(f.parts);
            self.join(f.upload)?;
            return Err(Error::Sink {
                sink: OperatorId(self.sink.clone()),
                step: "write",
                checkpoint: None,
                source: "the upload task stopped taking parts".into(),
            });
        }
        f.size += len;
        Ok(())
    }

    /// Complete the open file's encoding and send what is buffered as its last part.
    fn finish_file(&mut self) -> Result<()> {
        self.encoder.finish_file(&mut self.buf)?;
        if !self.buf.is_empty() {
            self.upload_part(self.buf.len())?;
        }
        if let Some(f) = self.open.take() {
            // Dropping the sender ends the file's stream of parts.
            self.finishing.push(FinishingFile {
                path: f.path,
                marker: f.marker,
                size: f.size,
                upload: f.upload,
            });
        }
        Ok(())
    }
}

impl<T, E> Drop for ObjectWriter<T, E> {
    /// A writer dropped with uploads under way belongs to an attempt that failed: its
    /// uploads stop, so none starts after the next attempt's recovery looked.
    fn drop(&mut self) {
        if let Some(f) = &self.open {
            f.upload.abort();
        }
        for f in &self.finishing {
            f.upload.abort();
        }
    }
}

impl<T: Data, E: RecordEncoder<T>> SinkWriter for ObjectWriter<T, E> {
    type Item = T;
    type Committable = ObjectsCommittable;

    fn write(&mut self, batch: &mut Vec<T>) -> Result<()> {
        for record in batch.drain(..) {
            self.encoder.encode(&record, &mut self.buf)?;
            if self.buf.len() >= PART_BYTES {
                self.upload_part(PART_BYTES)?;
                let size = self.open.as_ref().map_or(0, |f| f.size);
                if size >= self.max_file_bytes {
                    self.finish_file()?;
                }
            }
        }
        Ok(())
    }

    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<Option<ObjectsCommittable>> {
        self.finish_file()?;
        let started = Instant::now();
        let mut files = Vec::with_capacity(self.finishing.len());
        for f in std::mem::take(&mut self.finishing) {
            let (upload_id, parts) = self.join(f.upload)?;
            files.push(StagedObject {
                path: f.path.to_string(),
                upload_id,
                parts,
                size: f.size,
                marker: f.marker.to_string(),
            });
        }
        self.waited = started.elapsed();
        if files.is_empty() {
            return Ok(None);
        }
        Ok(Some(ObjectsCommittable {
            sink: self.sink.clone(),
            checkpoint: checkpoint.0,
            files,
        }))
    }

    fn last_pre_commit_wait(&self) -> Duration {
        self.waited
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Csv, JsonLines};
    use exactly_engine::ids::SubtaskIndex;

    fn ctx() -> SinkContext {
        SinkContext {
            job: "j".into(),
            sink: OperatorId("out".into()),
            subtask: SubtaskIndex(0),
            parallelism: 1,
            checkpoint_interval: None,
            generation: 1,
            io: exactly_engine::testing::io_runtime(),
        }
    }

    fn recovery() -> RecoveryContext {
        RecoveryContext {
            job: "j".into(),
            sink: OperatorId("out".into()),
            restored: None,
            generation: 1,
            storage_id: "test-location".to_string(),
            io: exactly_engine::testing::io_runtime(),
        }
    }

    fn objects(
        sink: &ObjectStoreSink<(u32, String), impl RecordEncoder<(u32, String)>>,
    ) -> Vec<(String, Vec<u8>)> {
        let store = sink.store.clone();
        exactly_engine::testing::io_runtime().block_on(async move {
            let metas: Vec<_> = store.list(None).try_collect().await.unwrap();
            let mut out = Vec::new();
            for m in metas {
                if m.location.as_ref().contains("/_committed/") {
                    continue; // the sink's own bookkeeping, not output
                }
                let b = store.get(&m.location).await.unwrap().bytes().await.unwrap();
                out.push((m.location.to_string(), b.to_vec()));
            }
            out.sort();
            out
        })
    }

    fn memory_sink<E: RecordEncoder<(u32, String)>>(e: E) -> ObjectStoreSink<(u32, String), E> {
        recovered(
            ObjectStoreSink::new(Arc::new(object_store::memory::InMemory::new()), "out", e)
                .unwrap()
                .max_file_bytes(20 << 20),
        )
    }

    /// A sink after the fresh start's recovery, as a job runs it before any commit.
    fn recovered<T: Data, E: RecordEncoder<T>>(
        sink: ObjectStoreSink<T, E>,
    ) -> ObjectStoreSink<T, E> {
        assert_eq!(sink.recover(&recovery(), Vec::new()).unwrap(), None);
        sink
    }

    /// Part uploads run on the job's I/O runtime while the operator thread goes on: with
    /// the runtime's only worker held, a write that fills a part still returns and no
    /// upload has started (no marker exists yet); once the runtime runs again, the
    /// barrier waits for the upload, says how long, and the committed file is whole.
    #[test]
    fn parts_upload_while_records_are_written_and_the_barrier_waits_for_them() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sink = memory_sink(JsonLines);
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (held, is_held) = std::sync::mpsc::channel::<()>();
        rt.spawn(async move {
            held.send(()).unwrap();
            let _ = gate.recv(); // blocks the worker until released
        });
        is_held.recv().unwrap();
        let mut w = sink
            .open_writer(&SinkContext {
                io: rt.handle().clone(),
                ..ctx()
            })
            .unwrap();
        let records: Vec<(u32, String)> = (0..9_000).map(|i| (i, "x".repeat(1_000))).collect();
        w.write(&mut records.clone()).unwrap();
        assert!(
            objects(&sink).is_empty(),
            "an upload started on the operator thread"
        );
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            release.send(()).unwrap();
        });
        let c = w.pre_commit(CheckpointId(1)).unwrap().unwrap();
        releaser.join().unwrap();
        assert!(w.last_pre_commit_wait() > Duration::ZERO);
        assert_eq!(c.files.len(), 1);
        assert_eq!(c.files[0].parts.len(), 2, "a full part and the rest");
        sink.commit(&c).unwrap();
        let files = objects(&sink);
        assert_eq!(
            files.len(),
            1,
            "{:?}",
            files.iter().map(|f| &f.0).collect::<Vec<_>>()
        );
        let lines: Vec<(u32, String)> = std::str::from_utf8(&files[0].1)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, records);
    }

    #[test]
    fn a_sink_at_the_bucket_root_commits() {
        let sink = recovered(
            ObjectStoreSink::<(u32, String), _>::new(
                Arc::new(object_store::memory::InMemory::new()),
                "",
                JsonLines,
            )
            .unwrap(),
        );
        let mut w = sink.open_writer(&ctx()).unwrap();
        w.write(&mut vec![(1, "a".to_string())]).unwrap();
        let c = w.pre_commit(CheckpointId(1)).unwrap().unwrap();
        sink.commit(&c).unwrap();
        assert!(objects(&sink)
            .iter()
            .any(|(p, _)| p.starts_with("part-out-")));
        let mut outside = c.clone();
        outside.files[0].path = "elsewhere/part-out-1".into();
        assert!(matches!(
            sink.commit(&outside).unwrap_err(),
            Error::CorruptCheckpoint { .. }
        ));
    }

    #[test]
    fn generations_are_read_from_object_names() {
        assert_eq!(
            generation_in_name("p/part-out-0003-g12-00ab-000001.jsonl", "out"),
            12
        );
        assert_eq!(
            generation_in_name("part-a-b-0003-g2-00ab-000001.jsonl", "a-b"),
            2
        );
        assert_eq!(
            generation_in_name("p/part-out-0003-00ab-000001.jsonl", "out"),
            0
        );
    }

    #[test]
    fn recovery_of_an_older_instance_aborts_nothing_a_newer_one_started() {
        let sink = memory_sink(JsonLines);
        let newer = SinkContext {
            generation: 2,
            io: exactly_engine::testing::io_runtime(),
            ..ctx()
        };
        let mut w = sink.open_writer(&newer).unwrap();
        w.write(&mut vec![(1, "a".to_string())]).unwrap();
        let staged = w.pre_commit(CheckpointId(3)).unwrap().unwrap();
        assert!(staged.files[0].path.contains("-g2-"), "{staged:?}");
        let err = sink.recover(&recovery(), Vec::new()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Fenced {
                    epoch: 1,
                    newer: 2,
                    ..
                }
            ),
            "{err}"
        );
        // The newer instance can still commit what it staged.
        sink.commit(&staged).unwrap();
        assert!(objects(&sink)
            .iter()
            .any(|(p, _)| p.starts_with("out/part-out-0000-g2-")));
    }

    #[test]
    fn committables_naming_objects_outside_the_prefix_are_refused() {
        let sink = memory_sink(JsonLines);
        let mut w = sink.open_writer(&ctx()).unwrap();
        w.write(&mut vec![(1, "a".to_string())]).unwrap();
        let good = w.pre_commit(CheckpointId(1)).unwrap().unwrap();
        assert!(
            good.files[0].path.starts_with("out/part-out-0000-"),
            "{good:?}"
        );
        let edit = |f: &dyn Fn(&mut ObjectsCommittable)| {
            let mut c = good.clone();
            f(&mut c);
            c
        };
        for bad in [
            edit(&|c| c.files[0].path = "victim/data.json".into()),
            edit(&|c| c.files[0].path = "out/../victim/part-1".into()),
            edit(&|c| c.files[0].path = "out/sub/part-1".into()),
            edit(&|c| c.files[0].marker = "victim/marker.json".into()),
            edit(&|c| c.sink = "../x".into()),
        ] {
            let err = sink.commit(&bad).unwrap_err();
            assert!(
                matches!(err, Error::CorruptCheckpoint { .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(
            objects(&sink)
                .iter()
                .all(|(p, _)| p.starts_with("out/_pending/")),
            "nothing completed"
        );
        sink.commit(&good).unwrap();
    }

    #[test]
    fn files_appear_only_on_commit_and_commit_is_idempotent() {
        let sink = memory_sink(JsonLines);
        let mut w = sink.open_writer(&ctx()).unwrap();
        // ~30 MiB: several parts and a rolled file within one interval.
        let big = "x".repeat(1000);
        let mut batch: Vec<(u32, String)> = (0..30_000).map(|i| (i, big.clone())).collect();
        w.write(&mut batch).unwrap();
        let c = w.pre_commit(CheckpointId(1)).unwrap().unwrap();
        assert_eq!(c.files.len(), 2, "rolled at 20 MiB");
        assert!(c.files[0].parts.len() >= 3);
        let visible: Vec<String> = objects(&sink).into_iter().map(|(p, _)| p).collect();
        assert!(
            visible.iter().all(|p| p.starts_with("out/_pending/")),
            "nothing but markers before the commit: {visible:?}"
        );
        sink.commit(&c).unwrap();
        sink.commit(&c).unwrap(); // repeated after a crash: no effect
        let files = objects(&sink);
        assert_eq!(files.len(), 2, "markers are gone, two files");
        let text: String = files
            .iter()
            .map(|(_, b)| String::from_utf8(b.clone()).unwrap())
            .collect();
        assert_eq!(text.lines().count(), 30_000);
        assert_eq!(
            files.iter().map(|(_, b)| b.len() as u64).sum::<u64>(),
            c.files.iter().map(|f| f.size).sum::<u64>()
        );
        // Nothing written since: no committable.
        assert!(w.pre_commit(CheckpointId(2)).unwrap().is_none());
    }

    #[test]
    fn recovery_commits_restored_files_and_aborts_the_rest() {
        let sink = memory_sink(Csv);
        let mut w = sink.open_writer(&ctx()).unwrap();
        w.write(&mut vec![(1, "a,b".into())]).unwrap();
        let restored = w.pre_commit(CheckpointId(1)).unwrap().unwrap();
        w.write(&mut vec![(2, "later".into())]).unwrap();
        let _lost = w.pre_commit(CheckpointId(2)).unwrap().unwrap();
        w.write(&mut vec![(3, "in flight".into())]).unwrap();
        w.upload_part(w.buf.len()).unwrap(); // an upload started before a crash
        drop(w);
        assert_eq!(sink.recover(&recovery(), vec![restored]).unwrap(), None);
        let files = objects(&sink);
        assert_eq!(
            files.len(),
            1,
            "only the restored checkpoint's file: {files:?}"
        );
        assert_eq!(files[0].1, b"1,\"a,b\"\n");
    }

    /// The checkpoint storage lost manifests (deleted, moved aside) while the output
    /// stayed: restoring below a checkpoint the output already committed, or starting
    /// from nothing, stops before committing or aborting anything.
    #[test]
    fn output_committed_above_the_restored_checkpoint_stops_recovery() {
        let sink = memory_sink(JsonLines);
        let mut w = sink.open_writer(&ctx()).unwrap();
        w.write(&mut vec![(1, "a".into())]).unwrap();
        let one = w.pre_commit(CheckpointId(1)).unwrap().unwrap();
        sink.commit(&one).unwrap();
        w.write(&mut vec![(2, "b".into())]).unwrap();
        let two = w.pre_commit(CheckpointId(2)).unwrap().unwrap();
        sink.commit(&two).unwrap();
        sink.commit(&one).unwrap(); // a repeated older commit keeps the mark at 2
        w.write(&mut vec![(3, "c".into())]).unwrap();
        let _staged = w.pre_commit(CheckpointId(3)).unwrap().unwrap();
        let before = objects(&sink);
        let at = |restored: Option<u64>| RecoveryContext {
            restored: restored.map(CheckpointId),
            ..recovery()
        };
        for restored in [None, Some(1)] {
            let err = sink.recover(&at(restored), vec![one.clone()]).unwrap_err();
            assert!(
                matches!(err, Error::Config { .. })
                    && err.to_string().contains("committed by checkpoint 2"),
                "{restored:?}: {err}"
            );
            assert_eq!(objects(&sink), before, "nothing committed or aborted");
        }
        // Restoring the checkpoint that committed it (or a later one) is normal.
        sink.recover(&at(Some(2)), vec![two]).unwrap();
    }

    #[test]
    fn a_vanished_committed_file_is_data_loss() {
        let sink = memory_sink(JsonLines);
        let mut w = sink.open_writer(&ctx()).unwrap();
        w.write(&mut vec![(1, "a".into())]).unwrap();
        let c = w.pre_commit(CheckpointId(1)).unwrap().unwrap();
        sink.commit(&c).unwrap();
        let store = sink.store.clone();
        let path = Path::from(c.files[0].path.as_str());
        exactly_engine::testing::io_runtime()
            .block_on(async move { store.delete(&path).await })
            .unwrap();
        let err = sink.commit(&c).unwrap_err();
        assert!(matches!(err, Error::CommitLost { .. }), "{err}");
    }

    /// Large Parquet output: several multipart parts per file, a roll to a second file
    /// within one interval, and every committed object a complete Parquet file.
    #[cfg(feature = "parquet")]
    #[test]
    fn parquet_files_span_parts_roll_and_each_is_complete() {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        struct Wide {
            id: u32,
            blob: String,
        }
        // Random hex: Snappy cannot shrink it much, so the files really are large.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rows: Vec<Wide> = (0..30_000)
            .map(|id| Wide {
                id,
                blob: crate::parquet::tests::random_hex(&mut x, 63),
            })
            .collect();
        let expect = rows.clone();
        let format = crate::Parquet::<Wide>::for_type()
            .unwrap()
            .row_group_rows(4_096);
        let store = Arc::new(object_store::memory::InMemory::new());
        let sink = recovered(
            ObjectStoreSink::new(store.clone(), "out", format)
                .unwrap()
                .max_file_bytes(12 << 20),
        );
        let mut w = sink.open_writer(&ctx()).unwrap();
        w.write(&mut rows).unwrap();
        let c = w.pre_commit(CheckpointId(1)).unwrap().unwrap();
        assert!(c.files.len() >= 2, "~30 MB rolls at 12 MiB: {:?}", c.files);
        assert!(c.files[0].parts.len() >= 2, "{:?}", c.files[0]);
        sink.commit(&c).unwrap();
        let mut got = Vec::new();
        for f in &c.files {
            let path = Path::from(f.path.as_str());
            let bytes = exactly_engine::testing::io_runtime()
                .block_on(async { store.get(&path).await.unwrap().bytes().await.unwrap() });
            assert_eq!(bytes.len() as u64, f.size);
            got.extend(crate::parquet::tests::read::<Wide>(bytes.to_vec()).0);
        }
        assert_eq!(got, expect, "all rows, in order, across the rolled files");
    }
}
