//! Checkpoint storage on any `object_store` backend: a local directory (default), memory
//! (tests), or S3 and S3-compatible stores (`s3://bucket/prefix`, `s3` feature).
//!
//! For S3, the endpoint, region and credentials come from the usual AWS environment
//! variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL`; an `http://` endpoint is allowed for local servers). The manifest
//! is written with a conditional put (`If-None-Match`), so the store must support it.
//!
//! # Layout
//!
//! ```text
//! <root>/chk-<id:020>/<task>-<subtask>-g<gen>.state
//!                                              one framed snapshot per task instance,
//!                                              <gen> the writer's lease (two instances
//!                                              never write one file)
//! <root>/manifests/<id:020>.json               the commit point of checkpoint <id>
//! <root>/shared/<id:020>_<instance>_<file>     RocksDB SST files, referenced by every
//!                                              checkpoint that needs them; <id> is the
//!                                              checkpoint that uploaded the file
//! <root>/savepoints/<name>.json                a savepoint: names a checkpoint that
//!                                              retention keeps until it is deleted
//! <root>/_leases/<gen:020>                     the newest instance's lease
//! <root>/_takeovers/<gen:020>.json             the checkpoint instance <gen> restored
//!                                              (see [`Takeover`])
//! <root>/_id                                   the location's identity, made by the
//!                                              first run (see
//!                                              [`CheckpointStorage::storage_id`])
//! ```
//!
//! # Invariants
//!
//! * A manifest is written last, with create-if-absent: an existing manifest is never
//!   overwritten (a second writer on the same path is detected, not silently merged).
//! * Local writes are fsynced (file and directory) before they count as done, matching
//!   the durability contract of remote object stores.
//! * Deletion removes the manifest first, then the files, so a manifest never names a
//!   deleted file. A shared file is deleted only when no retained manifest lists it and
//!   the checkpoint that uploaded it is not newer than the latest completed one (it may
//!   belong to a checkpoint still in flight).

use crate::codec::{self, FrameError};
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, OperatorId, SubtaskIndex};
use crate::manifest::{Manifest, Savepoint, SharedFile, TaskStateHandle};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::sync::Arc;

/// State files larger than this are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;
const MULTIPART_PART_SIZE: usize = 8 * 1024 * 1024;

/// Where checkpoints of one job live.
#[derive(Clone)]
pub struct CheckpointStorage {
    store: Arc<dyn ObjectStore>,
    root: Path,
    url: String,
}

impl std::fmt::Debug for CheckpointStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStorage")
            .field("url", &self.url)
            .finish()
    }
}

fn storage_err(op: &'static str, path: &Path, source: object_store::Error) -> Error {
    Error::Storage {
        op,
        path: path.to_string(),
        source,
    }
}

/// Whether the store refused the request for good (missing bucket, rejected
/// credentials, no permission), as opposed to failing to answer.
fn is_refusal(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    if matches!(
        e,
        E::NotFound { .. } | E::PermissionDenied { .. } | E::Unauthenticated { .. }
    ) {
        return true;
    }
    // The client's errors carry the HTTP status in their text: any 4xx but a timeout
    // (408) or throttling (429) is the server saying no (wrong region, bad bucket name,
    // credentials, permissions), which retrying cannot change.
    let text = format!("{e:?}");
    let refused_status = text.match_indices("status: ").any(|(i, m)| {
        let code = &text[i + m.len()..];
        code.len() >= 3
            && code.as_bytes()[0] == b'4'
            && code.as_bytes()[1..3].iter().all(u8::is_ascii_digit)
            && !code.starts_with("408")
            && !code.starts_with("429")
    });
    refused_status
        || [
            "NoSuchBucket",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "PermanentRedirect",
            "AuthorizationHeaderMalformed",
            "InvalidBucketName",
        ]
        .iter()
        .any(|s| text.contains(s))
}

impl CheckpointStorage {
    /// Open storage by URL: `file:///abs/dir`, a plain directory path, `s3://bucket/prefix`
    /// or `memory://`. A local directory is created if missing.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::open(url, true)
    }

    /// Open storage that must already exist, for tools that only inspect it: like
    /// [`CheckpointStorage::from_url`], but a missing local directory is an error
    /// instead of being created (a mistyped path must not leave an empty directory
    /// behind and look like a location without checkpoints).
    pub fn open_existing(url: &str) -> Result<Self> {
        Self::open(url, false)
    }

    fn open(url: &str, create: bool) -> Result<Self> {
        if url == "memory://" || url == "memory:///" {
            return Ok(Self::in_memory());
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            return Self::s3(url, rest);
        }
        let dir = if let Some(rest) = url.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(Error::config(format!(
                    "checkpoint storage '{url}': file URLs need an absolute path, e.g. file:///var/lib/job/checkpoints"
                )));
            }
            std::path::PathBuf::from(rest)
        } else if url.contains("://") {
            return Err(Error::config(format!(
                "checkpoint storage '{url}': unsupported scheme; use file:///dir, a directory path, s3://bucket/prefix or memory://"
            )));
        } else if let Some(scheme) = mistyped_scheme(url) {
            // Taken as a path, `s3:bucket/x` would be a local directory named `s3:`.
            return Err(Error::config(format!(
                "checkpoint storage '{url}' looks like a {scheme}: URL without '//'; write \
                 {scheme}://..., or ./{url} for a local directory of that name"
            )));
        } else {
            std::path::PathBuf::from(url)
        };
        if create {
            std::fs::create_dir_all(&dir).map_err(|e| {
                Error::io(
                    format!("creating checkpoint directory {}", dir.display()),
                    e,
                )
            })?;
        } else if !dir.is_dir() {
            let what = if dir.exists() {
                "is not a directory"
            } else {
                "does not exist"
            };
            return Err(Error::config(format!(
                "checkpoint storage '{url}': {} {what}",
                dir.display()
            )));
        }
        let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| Error::config(format!("checkpoint directory {}: {e}", dir.display())))?
            .with_fsync(true)
            .with_automatic_cleanup(true);
        Ok(CheckpointStorage {
            store: Arc::new(local),
            root: Path::default(),
            url: format!("file://{}", dir.display()),
        })
    }

    #[cfg(feature = "s3")]
    fn s3(url: &str, _rest: &str) -> Result<Self> {
        let (store, root) = s3_bucket(url)?;
        Ok(CheckpointStorage {
            store: Arc::new(store),
            root,
            url: url.to_string(),
        })
    }

    #[cfg(not(feature = "s3"))]
    fn s3(url: &str, _rest: &str) -> Result<Self> {
        Err(Error::config(format!(
            "checkpoint storage '{url}': this build has no S3 support; enable the `s3` feature of `exactly` (or `exactly-engine`)"
        )))
    }

    /// Check at job start that the storage can be listed (bucket exists, credentials
    /// accepted), so a misconfiguration is a clear error before any work, not a failed
    /// checkpoint later.
    ///
    /// A refusal (no such bucket, credentials rejected) is a configuration error; a
    /// server that cannot be reached or does not answer is a storage error, which the
    /// job retries under its restart policy.
    pub async fn check_access(&self) -> Result<()> {
        match self.store.list_with_delimiter(Some(&self.root)).await {
            Ok(_) => Ok(()),
            Err(e) if is_refusal(&e) => Err(Error::config(format!(
                "cannot access checkpoint storage {}: {e}. Check that the bucket exists and that the \
                 credentials may read and write it",
                self.url
            ))),
            Err(e) => Err(storage_err("list", &self.root, e)),
        }
    }

    /// The underlying object store (tests alter files behind the engine's back).
    #[cfg(all(test, feature = "rocksdb"))]
    pub(crate) fn raw(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Volatile storage for tests.
    pub fn in_memory() -> Self {
        Self::from_store(
            Arc::new(object_store::memory::InMemory::new()),
            Path::default(),
            "memory://",
        )
    }

    /// Storage on an existing store under `root`.
    pub fn from_store(store: Arc<dyn ObjectStore>, root: Path, url: &str) -> Self {
        CheckpointStorage {
            store,
            root,
            url: url.to_string(),
        }
    }

    /// The location `path` (`/`-separated) below this one, on the same store: where
    /// one instance of a job that runs as several keeps its checkpoints.
    pub fn child(&self, path: &str) -> CheckpointStorage {
        let mut root = self.root.clone();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            root = root.join(part);
        }
        CheckpointStorage {
            store: self.store.clone(),
            root,
            url: format!(
                "{}/{}",
                self.url.trim_end_matches('/'),
                path.trim_matches('/')
            ),
        }
    }

    /// The URL this storage was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn checkpoint_dir(&self, id: CheckpointId) -> Path {
        self.root.clone().join(format!("chk-{:020}", id.0))
    }

    fn manifest_path(&self, id: CheckpointId) -> Path {
        self.root
            .clone()
            .join("manifests")
            .join(format!("{:020}.json", id.0))
    }

    /// Write a task's state file, framed in pieces (see [`codec::frame_chunks`]). The
    /// name carries the writer's `generation`, so an older instance still finishing a
    /// checkpoint never overwrites what a newer one wrote under the same id.
    #[allow(clippy::too_many_arguments)]
    pub async fn put_state_file(
        &self,
        id: CheckpointId,
        generation: u64,
        task: &OperatorId,
        subtask: SubtaskIndex,
        parallelism: usize,
        operators: Vec<OperatorId>,
        file: codec::FileChunks,
    ) -> Result<TaskStateHandle> {
        let path = self
            .checkpoint_dir(id)
            .join(format!("{task}-{subtask}-g{generation}.state"));
        let (size, crc32) = (file.len, file.crc32);
        self.put_object(&path, file.chunks.into_iter().collect())
            .await?;
        Ok(TaskStateHandle {
            task: task.clone(),
            subtask,
            parallelism,
            operators,
            path: path.to_string(),
            size,
            crc32,
            shared: Vec::new(),
            uploaded: size,
            state_types: Default::default(),
        })
    }

    /// Write one object; large ones go up in parts (S3 caps single puts, and parts
    /// upload in parallel) and appear only when the upload completes.
    async fn put_object(&self, path: &Path, payload: PutPayload) -> Result<()> {
        if payload.content_length() > MULTIPART_THRESHOLD {
            let upload = self
                .store
                .put_multipart(path)
                .await
                .map_err(|e| storage_err("start multipart upload", path, e))?;
            let mut w =
                object_store::WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART_SIZE);
            for chunk in payload.iter() {
                w.write(chunk);
            }
            w.finish()
                .await
                .map_err(|e| storage_err("multipart upload", path, e))?;
        } else {
            self.store
                .put(path, payload)
                .await
                .map_err(|e| storage_err("put", path, e))?;
        }
        Ok(())
    }

    fn shared_dir(&self) -> Path {
        self.root.clone().join("shared")
    }

    /// Whether `file` lies in this location's shared directory (and not in another
    /// location of the same store, such as another instance's, whose retention and
    /// retirement this location does not control).
    pub fn holds_shared(&self, file: &SharedFile) -> bool {
        Path::from(file.path.as_str()).prefix_matches(&self.shared_dir())
    }

    /// Store a shared file uploaded by checkpoint `id` under a name unique to its
    /// producer (`instance`, `file`); writing the same name again stores the same bytes.
    pub async fn put_shared(
        &self,
        id: CheckpointId,
        instance: &str,
        file: &str,
        bytes: Vec<u8>,
    ) -> Result<SharedFile> {
        let path = self
            .shared_dir()
            .join(format!("{:020}_{instance}_{file}", id.0));
        let size = bytes.len() as u64;
        let crc32 = crc32fast::hash(&bytes);
        self.put_object(&path, bytes.into()).await?;
        Ok(SharedFile {
            path: path.to_string(),
            size,
            crc32,
        })
    }

    /// Read a shared file referenced by checkpoint `id` and verify its size and checksum.
    pub async fn read_shared(&self, id: CheckpointId, file: &SharedFile) -> Result<bytes::Bytes> {
        let path = Path::from(file.path.as_str());
        let bytes = match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(|e| storage_err("read", &path, e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::CorruptCheckpoint {
                    checkpoint: id,
                    path: file.path.clone(),
                    message: "shared file referenced by the manifest is missing".into(),
                })
            }
            Err(e) => return Err(storage_err("get", &path, e)),
        };
        verify_shared(id, file, &bytes)?;
        Ok(bytes)
    }

    /// Shared files with the id of the checkpoint that uploaded each.
    pub async fn list_shared(&self) -> Result<Vec<(String, CheckpointId)>> {
        Ok(self
            .list_all(&self.shared_dir())
            .await?
            .into_iter()
            .filter_map(|m| {
                let id = m.location.filename()?.split('_').next()?.parse().ok()?;
                Some((m.location.to_string(), CheckpointId(id)))
            })
            .collect())
    }

    /// Delete one shared file (absent counts as deleted).
    pub async fn delete_shared(&self, path: &str) -> Result<()> {
        let path = Path::from(path);
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage_err("delete", &path, e)),
        }
    }

    /// Read a snapshot and verify it against its handle and its own frame.
    pub async fn read_state(&self, id: CheckpointId, handle: &TaskStateHandle) -> Result<Vec<u8>> {
        let path = Path::from(handle.path.as_str());
        let corrupt = |message: String| Error::CorruptCheckpoint {
            checkpoint: id,
            path: handle.path.clone(),
            message,
        };
        let bytes = match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(|e| storage_err("read", &path, e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(corrupt("file referenced by the manifest is missing".into()))
            }
            Err(e) => return Err(storage_err("get", &path, e)),
        };
        if bytes.len() as u64 != handle.size {
            return Err(corrupt(format!(
                "size {} differs from the {} bytes recorded in the manifest (truncated or replaced)",
                bytes.len(),
                handle.size
            )));
        }
        let crc = crc32fast::hash(&bytes);
        if crc != handle.crc32 {
            return Err(corrupt(format!(
                "checksum {crc:08x} differs from {:08x} recorded in the manifest",
                handle.crc32
            )));
        }
        codec::unframe(&bytes)
            .map(|p| p.to_vec())
            .map_err(|e: FrameError| corrupt(e.to_string()))
    }

    /// Write the manifest: the commit point of its checkpoint. Never overwrites.
    pub async fn write_manifest(&self, manifest: &Manifest) -> Result<()> {
        let path = self.manifest_path(manifest.checkpoint);
        if self
            .put_once(&path, manifest.to_bytes()?, "write manifest")
            .await?
        {
            Ok(())
        } else {
            Err(Error::ConcurrentWriter {
                checkpoint: manifest.checkpoint,
                path: path.to_string(),
            })
        }
    }

    /// Create `path` with `bytes` unless it exists (conditional put): `false` if it did.
    async fn put_once(&self, path: &Path, bytes: Vec<u8>, op: &'static str) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(storage_err(op, path, e)),
        }
    }

    /// Every object under `dir`.
    async fn list_all(&self, dir: &Path) -> Result<Vec<object_store::ObjectMeta>> {
        self.store
            .list(Some(dir))
            .try_collect()
            .await
            .map_err(|e| storage_err("list", dir, e))
    }

    fn lease_dir(&self) -> Path {
        self.root.clone().join("_leases")
    }

    fn takeover_path(&self, generation: u64) -> Path {
        self.root
            .clone()
            .join("_takeovers")
            .join(format!("{generation:020}.json"))
    }

    /// Record which checkpoint the instance of `generation` restored, before its
    /// recovery touches any sink. Written once per instance (a restart of the same
    /// instance keeps the first record).
    pub async fn record_takeover(&self, t: &Takeover) -> Result<()> {
        let bytes = serde_json::to_vec(t).map_err(|e| Error::Codec {
            what: "takeover record".into(),
            message: e.to_string(),
        })?;
        self.put_once(&self.takeover_path(t.generation), bytes, "record takeover")
            .await
            .map(|_| ())
    }

    /// Every takeover record, oldest generation first.
    pub async fn takeovers(&self) -> Result<Vec<Takeover>> {
        let mut out = Vec::new();
        for meta in self.list_all(&self.root.clone().join("_takeovers")).await? {
            let bytes = self
                .store
                .get(&meta.location)
                .await
                .map_err(|e| storage_err("get", &meta.location, e))?
                .bytes()
                .await
                .map_err(|e| storage_err("read", &meta.location, e))?;
            let t: Takeover =
                serde_json::from_slice(&bytes).map_err(|e| Error::CorruptCheckpoint {
                    checkpoint: CheckpointId(0),
                    path: meta.location.to_string(),
                    message: format!("takeover record: {e}"),
                })?;
            out.push(t);
        }
        out.sort_by_key(|t| t.generation);
        Ok(out)
    }

    /// Delete the takeover record of `generation` (absent counts as deleted).
    pub async fn delete_takeover(&self, generation: u64) -> Result<()> {
        let path = self.takeover_path(generation);
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage_err("delete", &path, e)),
        }
    }

    async fn leases(&self) -> Result<Vec<u64>> {
        Ok(self
            .list_all(&self.lease_dir())
            .await?
            .iter()
            .filter_map(|m| m.location.filename())
            .filter_map(|n| n.parse::<u64>().ok())
            .collect())
    }

    /// Every lease in the storage, lowest epoch first, for tools that inspect it; it
    /// neither takes nor changes one. Normally there is one: the last instance that
    /// started took it and removed the older ones. A lease stays after its instance
    /// ends, so it names the latest instance, not necessarily a running one.
    pub async fn list_leases(&self) -> Result<Vec<Lease>> {
        let mut leases: Vec<Lease> = self
            .list_all(&self.lease_dir())
            .await?
            .iter()
            .filter_map(|m| {
                let epoch = m.location.filename()?.parse::<u64>().ok()?;
                Some(Lease {
                    epoch,
                    path: m.location.to_string(),
                    created_at_ms: u64::try_from(m.last_modified.timestamp_millis()).ok(),
                })
            })
            .collect();
        leases.sort_by_key(|l| l.epoch);
        Ok(leases)
    }

    /// Take a lease above every existing one (create-if-absent, so two instances never
    /// hold the same epoch) and drop older leases: their holders are fenced.
    ///
    /// The epoch is also at least the wall clock in milliseconds. Sinks tag what they
    /// stage with it, and those artifacts live in the output, which outlives the
    /// checkpoint storage when that is deleted or replaced: numbering from 1 again
    /// would make the new instance look older than its own dead predecessors' leftovers
    /// (and refuse to clean them up). Time only raises the epoch, so a clock set back
    /// still gives one above every lease in the storage.
    ///
    /// # Protocol
    ///
    /// 1. Each `run()` takes a lease before recovery.
    /// 2. Before writing a manifest, an instance checks that no newer lease exists
    ///    ([`CheckpointStorage::check_lease`]) and stops with [`Error::Fenced`] if one does.
    ///
    /// A newer instance that starts between an older one's check and its manifest write
    /// is not caught before that one write; object stores offer no write conditional on
    /// another object.
    pub async fn acquire_lease(&self) -> Result<u64> {
        loop {
            let leases = self.leases().await?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let epoch = leases.iter().max().map_or(1, |m| m + 1).max(now_ms);
            let path = self.lease_dir().join(format!("{epoch:020}"));
            if !self.put_once(&path, Vec::new(), "create lease").await? {
                continue;
            }
            for old in leases.into_iter().filter(|&l| l < epoch) {
                let p = self.lease_dir().join(format!("{old:020}"));
                match self.store.delete(&p).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(storage_err("delete", &p, e)),
                }
            }
            return Ok(epoch);
        }
    }

    /// The identity of this checkpoint location: made at random by the first run that
    /// asks (create-if-absent, so two instances starting together agree on one) and read
    /// back by every later run. Two jobs, or one job started over on an emptied or new
    /// location, have different ones; a location copied elsewhere keeps its own. Sinks
    /// that write to a system shared between jobs put it in what they commit (the Kafka
    /// sink's markers), so a job can tell its own commits from another job's with the
    /// same name.
    pub async fn storage_id(&self) -> Result<String> {
        let path = self.root.clone().join("_id");
        loop {
            match self.store.get(&path).await {
                Ok(r) => {
                    let bytes = r.bytes().await.map_err(|e| storage_err("read", &path, e))?;
                    let id = String::from_utf8_lossy(&bytes).trim().to_string();
                    if id.is_empty() {
                        return Err(Error::config(format!(
                            "{} in {} is empty: the checkpoint location's identity is damaged; \
                             restore the file from a backup of the location",
                            path, self.url
                        )));
                    }
                    return Ok(id);
                }
                Err(object_store::Error::NotFound { .. }) => {
                    // Either this put creates it, or another instance's did: read it.
                    self.put_once(&path, new_storage_id().into_bytes(), "create storage id")
                        .await?;
                }
                Err(e) => return Err(storage_err("get", &path, e)),
            }
        }
    }

    /// Fail with [`Error::Fenced`] if a lease newer than `epoch` exists.
    pub async fn check_lease(&self, epoch: u64) -> Result<()> {
        match self.leases().await?.into_iter().max() {
            Some(newer) if newer > epoch => Err(Error::Fenced {
                epoch,
                newer,
                url: self.url.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Read and verify manifest `id`.
    pub async fn read_manifest(&self, id: CheckpointId) -> Result<Manifest> {
        let path = self.manifest_path(id);
        let bytes = self
            .store
            .get(&path)
            .await
            .map_err(|e| storage_err("get", &path, e))?
            .bytes()
            .await
            .map_err(|e| storage_err("read", &path, e))?;
        Manifest::from_bytes(&bytes, id, path.as_ref())
    }

    /// Ids of all manifests, ascending, and the highest checkpoint id that appears
    /// anywhere in storage (manifests or state directories of incomplete checkpoints).
    pub async fn scan(&self) -> Result<(Vec<CheckpointId>, Option<CheckpointId>)> {
        let mut max_any = self.checkpoint_dirs().await?.last().copied();
        let metas = self.list_all(&self.root.clone().join("manifests")).await?;
        let mut ids: Vec<CheckpointId> = metas
            .iter()
            .filter_map(|m| m.location.filename())
            .filter_map(|f| f.strip_suffix(".json"))
            .filter_map(|n| n.parse::<u64>().ok())
            .map(CheckpointId)
            .collect();
        ids.sort();
        if let Some(&last) = ids.last() {
            max_any = max_any.max(Some(last));
        }
        Ok((ids, max_any))
    }

    fn savepoint_path(&self, name: &str) -> Path {
        self.root
            .clone()
            .join("savepoints")
            .join(format!("{name}.json"))
    }

    /// Record savepoint `sp` (its checkpoint's manifest must exist). Never overwrites:
    /// a name is given once, and an existing one is a configuration error.
    pub async fn write_savepoint(&self, sp: &Savepoint) -> Result<()> {
        valid_savepoint_name(&sp.name)?;
        let path = self.savepoint_path(&sp.name);
        let bytes = serde_json::to_vec_pretty(sp).map_err(|e| Error::Codec {
            what: format!("savepoint '{}'", sp.name),
            message: e.to_string(),
        })?;
        if self.put_once(&path, bytes, "write savepoint").await? {
            return Ok(());
        }
        let old = self.read_savepoint(&sp.name).await?;
        Err(Error::config(format!(
            "savepoint '{}' exists already in {}{}; choose another name, or delete it first",
            sp.name,
            self.url,
            old.map(|o| format!(" (checkpoint {})", o.checkpoint))
                .unwrap_or_default()
        )))
    }

    /// Whether a new savepoint may take `name`: a valid name no savepoint has. Checked
    /// before a stop's checkpoint is taken, so a bad name fails the stop before it
    /// happens; the write is create-if-absent all the same.
    pub async fn savepoint_name_free(&self, name: &str) -> Result<()> {
        valid_savepoint_name(name)?;
        match self.read_savepoint(name).await? {
            Some(old) => Err(Error::config(format!(
                "savepoint '{name}' exists already in {} (checkpoint {}); choose another \
                 name, or delete it first",
                self.url, old.checkpoint
            ))),
            None => Ok(()),
        }
    }

    /// Savepoint `name`, if it exists.
    pub async fn read_savepoint(&self, name: &str) -> Result<Option<Savepoint>> {
        if !crate::ids::valid_name(name) {
            return Ok(None);
        }
        let path = self.savepoint_path(name);
        let bytes = match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(|e| storage_err("read", &path, e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(storage_err("get", &path, e)),
        };
        let sp: Savepoint = serde_json::from_slice(&bytes).map_err(|e| Error::Codec {
            what: format!("savepoint file {path}"),
            message: e.to_string(),
        })?;
        if sp.name != name {
            return Err(Error::Codec {
                what: format!("savepoint file {path}"),
                message: format!("it names savepoint '{}'", sp.name),
            });
        }
        Ok(Some(sp))
    }

    /// Every savepoint, oldest checkpoint first.
    pub async fn list_savepoints(&self) -> Result<Vec<Savepoint>> {
        let metas = self.list_all(&self.root.clone().join("savepoints")).await?;
        let mut all = Vec::new();
        for name in metas
            .iter()
            .filter_map(|m| m.location.filename())
            .filter_map(|f| f.strip_suffix(".json"))
        {
            if let Some(sp) = self.read_savepoint(name).await? {
                all.push(sp);
            }
        }
        all.sort_by(|a, b| (a.checkpoint, &a.name).cmp(&(b.checkpoint, &b.name)));
        Ok(all)
    }

    /// Delete savepoint `name` (its checkpoint goes with the next retention run unless
    /// it is among the newest or another savepoint names it). `false` if there was none.
    pub async fn delete_savepoint(&self, name: &str) -> Result<bool> {
        let path = self.savepoint_path(name);
        if self.read_savepoint(name).await?.is_none() {
            return Ok(false);
        }
        // The mark first: a later savepoint of this name must not find it.
        let mark = self.savepoint_committed_path(name);
        match self.store.delete(&mark).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(storage_err("delete", &mark, e)),
        }
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(storage_err("delete", &path, e)),
        }
    }

    /// Delete checkpoint `id`: its manifest first, then its files.
    pub async fn delete_checkpoint(&self, id: CheckpointId) -> Result<()> {
        self.delete_manifest(id).await?;
        self.delete_checkpoint_files(id).await
    }

    /// Delete manifest `id` (the checkpoint stops existing; its files stay).
    pub async fn delete_manifest(&self, id: CheckpointId) -> Result<()> {
        let manifest = self.manifest_path(id);
        match self.store.delete(&manifest).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage_err("delete", &manifest, e)),
        }
    }

    /// The instances that keep checkpoints below this location (`instances/<i>/`, for a
    /// job that runs as several processes), ascending.
    pub async fn instance_dirs(&self) -> Result<Vec<usize>> {
        let dir = self.root.clone().join("instances");
        let listing = self
            .store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(|e| storage_err("list", &dir, e))?;
        let mut found: Vec<usize> = listing
            .common_prefixes
            .iter()
            .filter_map(|d| d.filename())
            .filter_map(|n| n.parse().ok())
            .collect();
        found.sort_unstable();
        Ok(found)
    }

    /// Record that the stop which took savepoint `name` committed all its output before
    /// the job ended: nothing of it is left for a restore to commit. A job rescaled to
    /// another number of instances restores only from such savepoints.
    pub async fn mark_savepoint_committed(&self, name: &str) -> Result<()> {
        let path = self.savepoint_committed_path(name);
        self.put_object(&path, PutPayload::from_static(b"committed\n"))
            .await
    }

    /// Record that a deployment with another layout took over this location's job
    /// (`why` says which): a process that restarts here belongs to the old deployment
    /// and would process input the new one processes, so its recovery refuses. A
    /// process of the old deployment still running here is fenced too: retiring takes
    /// the location's lease, so its next checkpoint or commit finds a newer one.
    pub async fn retire(&self, why: &str) -> Result<()> {
        let path = self.root.clone().join("_retired");
        self.put_object(&path, PutPayload::from(why.as_bytes().to_vec()))
            .await?;
        self.acquire_lease().await.map(|_| ())
    }

    /// Why this location was retired ([`CheckpointStorage::retire`]), if it was. Asked
    /// at every recovery, so found by listing (which recovery does anyway) and read only
    /// when there.
    pub async fn retired(&self) -> Result<Option<String>> {
        let path = self.root.clone().join("_retired");
        let listing = self
            .store
            .list_with_delimiter(Some(&self.root))
            .await
            .map_err(|e| storage_err("list", &self.root, e))?;
        if !listing.objects.iter().any(|o| o.location == path) {
            return Ok(None);
        }
        match self.store.get(&path).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(|e| storage_err("read", &path, e))?;
                Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(storage_err("get", &path, e)),
        }
    }

    /// This location is used again by the deployment that retired it (an instance
    /// added back by a later rescale).
    pub async fn unretire(&self) -> Result<()> {
        let path = self.root.clone().join("_retired");
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage_err("delete", &path, e)),
        }
    }

    /// Whether [`CheckpointStorage::mark_savepoint_committed`] was recorded for `name`.
    pub async fn savepoint_committed(&self, name: &str) -> Result<bool> {
        let path = self.savepoint_committed_path(name);
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(storage_err("head", &path, e)),
        }
    }

    fn savepoint_committed_path(&self, name: &str) -> Path {
        self.root
            .clone()
            .join("savepoints")
            .join(format!("{name}.committed"))
    }

    /// Ids of every state directory, with or without a manifest, ascending.
    pub async fn checkpoint_dirs(&self) -> Result<Vec<CheckpointId>> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.root))
            .await
            .map_err(|e| storage_err("list", &self.root, e))?;
        let mut ids: Vec<CheckpointId> = listing
            .common_prefixes
            .iter()
            .filter_map(|d| d.filename())
            .filter_map(|n| n.strip_prefix("chk-"))
            .filter_map(|n| n.parse().ok())
            .map(CheckpointId)
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Delete the state files of checkpoint `id` (used for abandoned checkpoints too).
    pub async fn delete_checkpoint_files(&self, id: CheckpointId) -> Result<()> {
        for m in self.list_all(&self.checkpoint_dir(id)).await? {
            match self.store.delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(storage_err("delete", &m.location, e)),
            }
        }
        Ok(())
    }
}

/// A lease in checkpoint storage, as listed by [`CheckpointStorage::list_leases`]: an
/// empty object named by its epoch; nothing else about its holder is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The fencing epoch: the instance that holds the highest one fences the others.
    pub epoch: u64,
    /// Object path relative to the storage root.
    pub path: String,
    /// When the store wrote the object (leases are never rewritten, so when it was
    /// taken), in milliseconds since the Unix epoch, if the store reports it.
    pub created_at_ms: Option<u64>,
}

/// 128 bits that differ between locations: the time in nanoseconds, and a hash keyed by
/// the standard library's per-process random seed over it and the process id.
fn new_storage_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(nanos);
    h.write_u32(std::process::id());
    format!("{nanos:016x}{:016x}", h.finish())
}

/// Savepoint names follow the rule of job and operator names (they become file names).
fn valid_savepoint_name(name: &str) -> Result<()> {
    if crate::ids::valid_name(name) {
        return Ok(());
    }
    Err(Error::config(format!(
        "savepoint name '{}' must be {}",
        name.escape_debug(),
        crate::ids::NAME_RULE
    )))
}

/// The scheme of a storage location that names a known scheme but lacks the `//` of a
/// URL (`s3:bucket/x`, `s3:/bucket/x`, `file:/abs`, `memory:`), if it does.
fn mistyped_scheme(location: &str) -> Option<&str> {
    const SCHEMES: [&str; 9] = [
        "s3", "s3a", "file", "memory", "gs", "az", "abfs", "http", "https",
    ];
    let (scheme, _) = location.split_once(':')?;
    SCHEMES
        .iter()
        .find(|s| s.eq_ignore_ascii_case(scheme))
        .copied()
}

/// Connect timeout of S3 requests, unless `AWS_CONNECT_TIMEOUT` says otherwise (e.g. `2s`).
pub const S3_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Timeout of one S3 request, unless `AWS_TIMEOUT` says otherwise (e.g. `10s`).
pub const S3_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Retries of a failed S3 request (connection errors, timeouts, 5xx) before the
/// operation fails; each retry also stays within [`S3_RETRY_TIMEOUT`] of the first try.
pub const S3_MAX_RETRIES: usize = 3;
/// No retry of an S3 request starts later than this after its first try (object_store
/// also resumes an interrupted download within it, so it bounds how long reading one
/// large state file may take).
pub const S3_RETRY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// An S3 client for `s3://bucket/prefix` configured from the usual AWS environment
/// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
/// `AWS_ENDPOINT_URL`; an `http://` endpoint is allowed for local servers), and the
/// prefix, with the timeouts and retries above. Used for checkpoint storage and by the
/// object-store sink.
#[cfg(feature = "s3")]
pub fn s3_bucket(url: &str) -> Result<(object_store::aws::AmazonS3, Path)> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| Error::config(format!("'{url}' is not an s3://bucket/prefix URL")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::config(format!(
            "'{url}': no bucket; use s3://bucket/prefix"
        )));
    }
    let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
    let endpoint = std::env::var("AWS_ENDPOINT_URL")
        .or_else(|_| std::env::var("AWS_ENDPOINT"))
        .unwrap_or_default();
    if endpoint.starts_with("http://") {
        builder = builder.with_allow_http(true);
    }
    if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
        builder = builder.with_region("us-east-1");
    }
    // A server that accepts connections but never answers must become an error in
    // bounded time; the job's restart policy, not the client, rides out long outages.
    use object_store::ClientConfigKey;
    for (var, key, default) in [
        (
            "AWS_CONNECT_TIMEOUT",
            ClientConfigKey::ConnectTimeout,
            S3_CONNECT_TIMEOUT,
        ),
        ("AWS_TIMEOUT", ClientConfigKey::Timeout, S3_REQUEST_TIMEOUT),
    ] {
        if std::env::var(var).is_err() {
            builder = builder.with_config(
                object_store::aws::AmazonS3ConfigKey::Client(key),
                format!("{}s", default.as_secs()),
            );
        }
    }
    builder = builder.with_retry(object_store::RetryConfig {
        backoff: Default::default(),
        max_retries: S3_MAX_RETRIES,
        retry_timeout: S3_RETRY_TIMEOUT,
    });
    let store = builder.build().map_err(|e| {
        Error::config(format!(
            "'{url}': {e}. Set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, for \
             S3-compatible servers, AWS_ENDPOINT_URL"
        ))
    })?;
    let root = Path::parse(prefix.trim_end_matches('/'))
        .map_err(|e| Error::config(format!("'{url}': bad prefix: {e}")))?;
    Ok((store, root))
}

/// Which checkpoint an instance restored when it took the checkpoint location over
/// (its lease, `generation`): `None` for a fresh start.
///
/// An older instance can still write one manifest after a newer one took the lease: it
/// checked its lease just before. The newer instance restored an older checkpoint and
/// its recovery aborted what that manifest's sinks staged, so the manifest is an orphan
/// that must never be restored. The newer instance's own checkpoints get higher ids (ids
/// continue past every checkpoint directory found), so the orphan only matters if the
/// newer instance fails before its first checkpoint; then this record says which
/// manifests to pass over: those of an older generation above `restored`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Takeover {
    /// The lease of the instance that took over.
    pub generation: u64,
    /// The checkpoint it restored.
    pub restored: Option<CheckpointId>,
}

impl Takeover {
    /// Whether manifest `id`, written by an instance of `generation`, was written after
    /// this takeover by an older instance.
    pub fn orphans(&self, id: CheckpointId, generation: u64) -> bool {
        generation < self.generation && self.restored.is_none_or(|r| id > r)
    }

    /// The takeover, among `takeovers`, after which an older instance wrote manifest `id`
    /// (of `generation`): such a checkpoint is never restored, and its output was
    /// aborted. `None` for a checkpoint a restore may use.
    pub fn orphaning(
        takeovers: &[Takeover],
        id: CheckpointId,
        generation: u64,
    ) -> Option<&Takeover> {
        takeovers.iter().find(|t| t.orphans(id, generation))
    }
}

/// Check `bytes` against the size and CRC-32 a manifest recorded for a shared file.
pub fn verify_shared(id: CheckpointId, file: &SharedFile, bytes: &[u8]) -> Result<()> {
    let corrupt = |message: String| Error::CorruptCheckpoint {
        checkpoint: id,
        path: file.path.clone(),
        message,
    };
    if bytes.len() as u64 != file.size {
        return Err(corrupt(format!(
            "size {} differs from the {} bytes recorded in the manifest (truncated or replaced)",
            bytes.len(),
            file.size
        )));
    }
    let crc = crc32fast::hash(bytes);
    if crc != file.crc32 {
        return Err(corrupt(format!(
            "checksum {crc:08x} differs from {:08x} recorded in the manifest",
            file.crc32
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::MANIFEST_FORMAT_VERSION;

    fn manifest(id: u64, tasks: Vec<TaskStateHandle>) -> Manifest {
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            job: "t".into(),
            checkpoint: CheckpointId(id),
            completed_at_ms: 0,
            max_parallelism: 128,
            is_final: false,
            tasks,
            pending_commits: vec![],
            from_savepoint: None,
            generation: 1,
            instance: None,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn leases_never_go_back_even_when_the_storage_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let s = CheckpointStorage::from_url(&url).unwrap();
        let (a, b) = rt().block_on(async {
            let a = s.acquire_lease().await.unwrap();
            let b = s.acquire_lease().await.unwrap();
            (a, b)
        });
        assert!(b > a, "{a} {b}");
        // The checkpoint storage deleted: the next lease is still not below the old ones,
        // so sink artifacts tagged with them stay older (or equal) and can be cleaned up.
        std::fs::remove_dir_all(dir.path()).unwrap();
        let s = CheckpointStorage::from_url(&url).unwrap();
        let c = rt().block_on(s.acquire_lease()).unwrap();
        assert!(c >= b, "{b} {c}");
    }

    /// A process still running on a location that a new deployment retires loses its
    /// lease: its next checkpoint or commit is fenced, and a restart there refuses.
    #[test]
    fn retiring_a_location_fences_the_process_still_running_there() {
        let dir = tempfile::tempdir().unwrap();
        let s = CheckpointStorage::from_url(&format!("file://{}", dir.path().display())).unwrap();
        rt().block_on(async {
            let running = s.acquire_lease().await.unwrap();
            s.check_lease(running).await.unwrap();
            s.retire("restarted as 2 instance(s)").await.unwrap();
            let e = s.check_lease(running).await.unwrap_err();
            assert!(matches!(e, Error::Fenced { .. }), "{e}");
            assert_eq!(
                s.retired().await.unwrap().as_deref(),
                Some("restarted as 2 instance(s)")
            );
        });
    }

    /// One identity per location: kept across runs (and by two instances asking at
    /// once), new when the location is emptied, different for another location.
    #[test]
    fn a_location_keeps_one_identity_until_it_is_emptied() {
        let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let url = |d: &tempfile::TempDir| format!("file://{}", d.path().display());
        let id = |u: &str| {
            let s = CheckpointStorage::from_url(u).unwrap();
            rt().block_on(s.storage_id()).unwrap()
        };
        let s = CheckpointStorage::from_url(&url(&dir)).unwrap();
        let (a, b) = rt().block_on(async { futures::join!(s.storage_id(), s.storage_id()) });
        let first = a.unwrap();
        assert_eq!(b.unwrap(), first);
        assert_eq!(first.len(), 32, "{first}");
        assert_eq!(id(&url(&dir)), first, "a later run reads it back");
        assert_ne!(id(&url(&other)), first);
        std::fs::remove_dir_all(dir.path()).unwrap();
        assert_ne!(id(&url(&dir)), first, "an emptied location is another one");
        std::fs::write(dir.path().join("_id"), "").unwrap();
        let err = rt().block_on(s.storage_id()).unwrap_err();
        assert!(err.to_string().contains("identity is damaged"), "{err}");
    }

    #[test]
    fn open_existing_creates_nothing_and_listing_leases_takes_none() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("mistyped");
        let err = CheckpointStorage::open_existing(missing.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!missing.exists(), "a mistyped location was created");
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = CheckpointStorage::open_existing(file.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");

        let url = dir.path().to_str().unwrap();
        let epoch = rt()
            .block_on(CheckpointStorage::from_url(url).unwrap().acquire_lease())
            .unwrap();
        let s = CheckpointStorage::open_existing(url).unwrap();
        for _ in 0..2 {
            let leases = rt().block_on(s.list_leases()).unwrap();
            assert_eq!(leases.len(), 1, "{leases:?}");
            assert_eq!(leases[0].epoch, epoch);
            assert!(
                leases[0].path.ends_with(&format!("{epoch:020}")),
                "{leases:?}"
            );
            assert!(leases[0].created_at_ms.is_some());
        }
    }

    #[test]
    fn refusals_are_told_apart_from_failures_to_answer() {
        let generic = |text: &str| object_store::Error::Generic {
            store: "S3",
            source: std::io::Error::other(text.to_string()).into(),
        };
        for (text, refused) in [
            (
                "Client error with status: 400 Bad Request: InvalidRequest",
                true,
            ),
            ("status: 403 Forbidden", true),
            ("<Code>PermanentRedirect</Code>", true),
            ("status: 408 Request Timeout", false),
            ("status: 429 Too Many Requests", false),
            ("Server error, status: 503 Service Unavailable", false),
            ("error sending request: connection refused", false),
            ("operation timed out", false),
        ] {
            assert_eq!(is_refusal(&generic(text)), refused, "{text}");
        }
        assert!(is_refusal(&object_store::Error::NotFound {
            path: "x".into(),
            source: std::io::Error::other("gone").into(),
        }));
    }

    /// `payload` as a state file.
    fn framed(payload: &[u8]) -> codec::FileChunks {
        codec::frame_chunks(vec![payload.to_vec().into()])
    }

    #[test]
    fn state_round_trip_scan_and_delete_on_local_dir() {
        let dir = tempfile::tempdir().unwrap();
        let s = CheckpointStorage::from_url(&format!("file://{}", dir.path().display())).unwrap();
        rt().block_on(async {
            let op = OperatorId("op".into());
            let h = s
                .put_state_file(
                    CheckpointId(3),
                    1,
                    &op,
                    SubtaskIndex(1),
                    2,
                    vec![op.clone()],
                    framed(b"hello"),
                )
                .await
                .unwrap();
            assert_eq!(s.read_state(CheckpointId(3), &h).await.unwrap(), b"hello");
            s.write_manifest(&manifest(3, vec![h.clone()]))
                .await
                .unwrap();
            // An incomplete later checkpoint still counts for id allocation.
            s.put_state_file(
                CheckpointId(9),
                1,
                &op,
                SubtaskIndex(0),
                2,
                vec![],
                framed(b"x"),
            )
            .await
            .unwrap();
            assert_eq!(
                s.scan().await.unwrap(),
                (vec![CheckpointId(3)], Some(CheckpointId(9)))
            );
            assert_eq!(
                s.read_manifest(CheckpointId(3)).await.unwrap().tasks,
                vec![h]
            );
            s.delete_checkpoint(CheckpointId(3)).await.unwrap();
            assert_eq!(s.scan().await.unwrap(), (vec![], Some(CheckpointId(9))));
        });
    }

    #[test]
    fn two_instances_never_write_one_state_file() {
        // An older instance whose upload for checkpoint 4 lands after a newer one chose
        // id 4 too (it scanned before the older one's files appeared) must not replace
        // the file the newer one's manifest names.
        let s = CheckpointStorage::in_memory();
        let op = OperatorId("op".into());
        rt().block_on(async {
            let put = |generation, body: &'static [u8]| {
                s.put_state_file(
                    CheckpointId(4),
                    generation,
                    &op,
                    SubtaskIndex(0),
                    1,
                    vec![],
                    framed(body),
                )
            };
            let newer = put(8, b"newer").await.unwrap();
            let older = put(7, b"older").await.unwrap();
            assert_ne!(newer.path, older.path);
            let id = CheckpointId(4);
            assert_eq!(s.read_state(id, &newer).await.unwrap(), b"newer");
            assert_eq!(s.read_state(id, &older).await.unwrap(), b"older");
        });
    }

    #[test]
    fn takeover_records_are_kept_once_per_instance_and_name_orphans() {
        let s = CheckpointStorage::in_memory();
        rt().block_on(async {
            let t = |generation, restored: Option<u64>| Takeover {
                generation,
                restored: restored.map(CheckpointId),
            };
            s.record_takeover(&t(5, Some(3))).await.unwrap();
            // A restart of the same instance keeps the first record.
            s.record_takeover(&t(5, Some(4))).await.unwrap();
            s.record_takeover(&t(2, None)).await.unwrap();
            assert_eq!(
                s.takeovers().await.unwrap(),
                vec![t(2, None), t(5, Some(3))]
            );
            s.delete_takeover(2).await.unwrap();
            s.delete_takeover(2).await.unwrap();
            assert_eq!(s.takeovers().await.unwrap(), vec![t(5, Some(3))]);
        });
        let t = Takeover {
            generation: 5,
            restored: Some(CheckpointId(3)),
        };
        assert!(
            t.orphans(CheckpointId(4), 4),
            "older writer, above the restore"
        );
        assert!(!t.orphans(CheckpointId(3), 4), "what it restored");
        assert!(!t.orphans(CheckpointId(4), 5), "its own");
        assert!(!t.orphans(CheckpointId(9), 6), "a newer instance's");
        let fresh = Takeover {
            generation: 5,
            restored: None,
        };
        assert!(fresh.orphans(CheckpointId(1), 0));
    }

    #[test]
    fn manifest_is_never_overwritten() {
        let s = CheckpointStorage::in_memory();
        rt().block_on(async {
            s.write_manifest(&manifest(1, vec![])).await.unwrap();
            let err = s.write_manifest(&manifest(1, vec![])).await.unwrap_err();
            assert!(matches!(err, Error::ConcurrentWriter { .. }), "{err}");
        });
    }

    #[test]
    fn altered_or_truncated_state_file_is_named_at_restore() {
        let dir = tempfile::tempdir().unwrap();
        let s = CheckpointStorage::from_url(dir.path().to_str().unwrap()).unwrap();
        let op = OperatorId("op".into());
        let h = rt()
            .block_on(s.put_state_file(
                CheckpointId(1),
                1,
                &op,
                SubtaskIndex(0),
                1,
                vec![],
                framed(&[7u8; 100]),
            ))
            .unwrap();
        let file = dir.path().join(&h.path);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[50] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let err = rt()
            .block_on(s.read_state(CheckpointId(1), &h))
            .unwrap_err();
        assert!(matches!(err, Error::CorruptCheckpoint { .. }), "{err}");
        assert!(
            err.to_string().contains(&h.path) && err.to_string().contains("checksum"),
            "{err}"
        );
        std::fs::write(&file, &bytes[..60]).unwrap();
        let err = rt()
            .block_on(s.read_state(CheckpointId(1), &h))
            .unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        std::fs::remove_file(&file).unwrap();
        let err = rt()
            .block_on(s.read_state(CheckpointId(1), &h))
            .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn bad_urls_are_clear_errors() {
        let err = CheckpointStorage::from_url("gopher://x").unwrap_err();
        assert!(err.to_string().contains("unsupported scheme"), "{err}");
        let err = CheckpointStorage::from_url("file://relative").unwrap_err();
        assert!(err.to_string().contains("absolute path"), "{err}");
        // A scheme without '//' used to become a relative directory named after it.
        let dir = tempfile::tempdir().unwrap();
        let cwd = std::env::current_dir().unwrap();
        for (url, scheme) in [
            ("s3:bucket/x", "s3"),
            ("s3:/bucket/x", "s3"),
            ("file:/abs/dir", "file"),
            ("memory:", "memory"),
        ] {
            let err = CheckpointStorage::from_url(url).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("{scheme}://")), "{msg}");
            assert_eq!(err.class(), crate::error::ErrorClass::Stop, "{msg}");
            assert!(!cwd.join(url).exists(), "{url} created a directory");
        }
        // A directory whose name merely contains a colon is still a directory.
        let odd = dir.path().join("run:2026");
        assert!(CheckpointStorage::from_url(odd.to_str().unwrap()).is_ok());
    }
}
