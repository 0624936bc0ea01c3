//! The RocksDB keyed state backend: one RocksDB instance per keyed operator instance,
//! with incremental checkpoints.
//!
//! # Layout
//!
//! A state entry `e` of key group `kg` is stored under `be16(kg) | e`, so the key groups
//! of an instance are contiguous key ranges and a rescaled restore copies a range. The
//! WAL is off: a crash always restores from a checkpoint, never from the local files.
//!
//! # Checkpoints
//!
//! At the barrier the task copies the dirty entries of its write-behind cache (module
//! `cache`) into one buffer (`DeferredBatch`): that is the whole synchronous part. A
//! thread of its own then sorts them into a batch, writes it, flushes the memtable and
//! creates a RocksDB checkpoint (hard links) in the working directory while the task
//! goes on with its cache. Until that thread is done the task neither writes to the
//! database nor reads it other than for a key missing from the cache
//! (`RocksStore::settle` waits for it first): the batch's entries stay in the cache,
//! clean, until an eviction, and an eviction settles first. So the checkpoint holds
//! exactly the barrier's state, and every read sees it. On the job's I/O runtime the SST
//! files not uploaded before are uploaded to `shared/` in checkpoint storage; the small
//! metadata files (`MANIFEST-*`, `CURRENT`, `OPTIONS-*`) go inline
//! into the task's state file, which lists every file the checkpoint needs.
//!
//! A file is referenced again by a later checkpoint only once a checkpoint listing it
//! has completed (the task learns of completions through [`BackendEnv::completed`]);
//! files of checkpoints that never completed are uploaded again under a new name. The
//! driver deletes a shared file when no retained manifest lists it (see
//! `storage.rs`). Every uploaded file is also hard-linked into `<local dir>/cache`, so a
//! restore on the same machine reuses it (after checking its size and CRC-32) instead
//! of downloading it.

use super::{
    BackendEnv, DbFile, DbFileContent, DbSnapshot, OperatorSnapshot, RocksDbConfig, Uploaded,
};
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, KeyGroup, KeyGroupRange, OperatorId, SubtaskIndex};
use crate::manifest::SharedFile;
use crate::storage::CheckpointStorage;
use futures::{StreamExt, TryStreamExt};
use rocksdb::{
    checkpoint::Checkpoint, BlockBasedOptions, ColumnFamilyDescriptor, DBCompressionType, Options,
    ReadOptions, WriteBatch, WriteOptions, DB, DEFAULT_COLUMN_FAMILY_NAME,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Concurrent file transfers per instance during upload and restore.
const TRANSFERS: usize = 8;

fn db_err(context: impl Into<String>, e: rocksdb::Error) -> Error {
    Error::State {
        context: context.into(),
        message: e.into_string(),
    }
}

fn io_err(context: String, e: std::io::Error) -> Error {
    Error::State {
        context,
        message: e.to_string(),
    }
}

/// A name no other instance uses: time, a process-wide counter and the pid.
fn nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(&nanos.to_le_bytes());
    b[8..16].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    b[16..].copy_from_slice(&std::process::id().to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&b)
}

fn options(cfg: &RocksDbConfig) -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_compression_type(DBCompressionType::Lz4);
    o.set_write_buffer_size(cfg.write_buffer_size);
    o.set_max_background_jobs(2);
    // Bloom filters on whole keys, in SST files and in the memtable: most cache misses
    // look up an entry that does not exist yet (a key's first record, a new window),
    // which otherwise searches the memtable and every level-0 file.
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(true);
    o.set_block_based_table_factory(&table);
    o.set_memtable_whole_key_filtering(true);
    o.set_memtable_prefix_bloom_ratio(0.1);
    o
}

fn cache_dir(local: &Path) -> PathBuf {
    local.join("cache")
}

/// The file name part of a shared file's storage path (its name in the local cache).
fn cache_name(f: &SharedFile) -> &str {
    f.path.rsplit('/').next().unwrap_or(&f.path)
}

/// Shared files each checkpoint of this instance referenced, by checkpoint id, until a
/// completion confirms one of them.
type Uploads = BTreeMap<u64, HashMap<String, SharedFile>>;

/// One operator instance's RocksDB.
pub struct RocksStore {
    db: Option<Arc<DB>>,
    /// The thread writing the barrier's batch and creating the latest checkpoint, until
    /// the task needs the database again; an error means the batch was not written.
    creating: Option<std::thread::JoinHandle<Result<()>>>,
    /// The cache's batch for the next checkpoint, not yet handed to its thread.
    deferred: Option<DeferredBatch>,
    dir: PathBuf,
    local: PathBuf,
    start: u16,
    end: u16,
    key: Vec<u8>,
    /// Where each key of a [`RocksStore::multi_get`] ends in `key`.
    ends: Vec<usize>,
    write: WriteOptions,
    instance: String,
    completed: Arc<AtomicU64>,
    uploads: Arc<Mutex<Uploads>>,
    /// SST files of the newest completed checkpoint: these may be referenced again.
    confirmed: HashMap<String, SharedFile>,
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        // The state lives in checkpoints; the local copy is scratch space.
        let _ = self.join_checkpoint_thread();
        drop(self.db.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RocksStore {
    /// Open a fresh instance for `range` and load `snapshots` into it. A snapshot of
    /// exactly this range (a restore at the same parallelism) is opened in place;
    /// anything else is copied key-group range by key-group range.
    pub(crate) fn open(
        range: KeyGroupRange,
        operator: &OperatorId,
        subtask: SubtaskIndex,
        cfg: &RocksDbConfig,
        env: &BackendEnv,
        snapshots: &[OperatorSnapshot],
    ) -> Result<Self> {
        let instance = format!("{operator}-{subtask}-{:016x}", nonce());
        let dir = env
            .local_dir
            .join(format!("db-{}-{instance}", std::process::id()));
        let dbs: Vec<&DbSnapshot> = snapshots
            .iter()
            .filter_map(|s| s.db.as_ref())
            .filter(|d| d.range.start < range.end && d.range.end > range.start)
            .collect();
        let entries = snapshots
            .iter()
            .any(|s| s.keyed.iter().any(|(kg, _)| range.contains(*kg)));
        let in_place = dbs.len() == 1 && dbs[0].range == range && !entries;
        let mut confirmed = HashMap::new();
        if in_place {
            materialize(dbs[0], &dir, env)?;
            // Files of another location (a savepoint taken by another number of
            // instances) are uploaded again by the next checkpoint: this location's
            // checkpoints must not rest on files another location's retention deletes.
            for f in &dbs[0].files {
                if let DbFileContent::Shared(s) = &f.content {
                    if env.storage.holds_shared(s) {
                        confirmed.insert(f.name.clone(), s.clone());
                    }
                }
            }
        }
        // The default column family by name, so that its handle serves `MultiGet`, with
        // the database's options (a name alone would give it RocksDB's defaults).
        let opts = options(cfg);
        let default = ColumnFamilyDescriptor::new(DEFAULT_COLUMN_FAMILY_NAME, opts.clone());
        let db = DB::open_cf_descriptors(&opts, &dir, [default])
            .map_err(|e| db_err(format!("opening {}", dir.display()), e))?;
        let mut write = WriteOptions::default();
        write.disable_wal(true);
        let mut store = RocksStore {
            db: Some(Arc::new(db)),
            creating: None,
            deferred: None,
            dir,
            local: env.local_dir.clone(),
            start: range.start,
            end: range.end,
            key: Vec::new(),
            ends: Vec::new(),
            write,
            instance,
            completed: env.completed.clone(),
            uploads: Default::default(),
            confirmed,
        };
        if !in_place {
            for d in dbs {
                read_snapshot(d, range, env, |kg, k, v| {
                    store.put((kg.0 - range.start) as usize, k, v)
                })?;
            }
            for snap in snapshots {
                for (kg, entries) in &snap.keyed {
                    if range.contains(*kg) {
                        for (k, v) in entries {
                            store.put((kg.0 - range.start) as usize, k, v)?;
                        }
                    }
                }
            }
        }
        Ok(store)
    }

    fn db(&self) -> &DB {
        self.db.as_ref().expect("the database is open until drop")
    }

    /// Make the database whole before the task uses it other than for a point read of
    /// a key missing from the cache: wait for the checkpoint thread (its batch written,
    /// its checkpoint created, so the checkpoint never holds a later write) and write a
    /// deferred batch not handed to a thread. A batch that could not be written is an
    /// error here, so the task fails rather than read around it.
    pub(crate) fn settle(&mut self) -> Result<()> {
        self.join_checkpoint_thread()?;
        if let Some(batch) = self.deferred.take() {
            self.db()
                .write_opt(batch.into_write_batch(), &self.write)
                .map_err(|e| db_err("write", e))?;
        }
        Ok(())
    }

    /// Hand `batch` (entries of this instance's key group indexes) to the next
    /// [`RocksStore::checkpoint`], whose thread writes it before the checkpoint.
    pub(crate) fn defer(&mut self, mut batch: DeferredBatch) -> Result<()> {
        self.settle()?;
        batch.start = self.start;
        self.deferred = Some(batch);
        Ok(())
    }

    fn join_checkpoint_thread(&mut self) -> Result<()> {
        match self.creating.take().map(|h| h.join()) {
            Some(Err(_)) => Err(Error::State {
                context: "creating a RocksDB checkpoint".into(),
                message: "the thread creating it panicked".into(),
            }),
            Some(Ok(r)) => r,
            None => Ok(()),
        }
    }

    fn prefixed(&mut self, g: usize, key: &[u8]) {
        self.key.clear();
        self.key
            .extend_from_slice(&(self.start + g as u16).to_be_bytes());
        self.key.extend_from_slice(key);
    }

    pub(crate) fn get<R>(
        &mut self,
        g: usize,
        key: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>> {
        self.prefixed(g, key);
        match self.db().get_pinned(&self.key) {
            Ok(v) => Ok(v.map(|v| f(&v))),
            Err(e) => Err(db_err("read", e)),
        }
    }

    /// Read the entries `keys` (key group index, entry key; sorted by both, each once)
    /// in one `MultiGet`, appending each value found to `values` and its place there,
    /// or `None`, to `found`, in order. Like [`RocksStore::get`], only for entries the
    /// cache does not hold (what the checkpoint thread writes is still cached).
    pub(crate) fn multi_get<'k>(
        &mut self,
        keys: impl Iterator<Item = (usize, &'k [u8])>,
        values: &mut Vec<u8>,
        found: &mut Vec<Option<(usize, usize)>>,
    ) -> Result<()> {
        self.key.clear();
        self.ends.clear();
        for (g, key) in keys {
            self.key
                .extend_from_slice(&(self.start + g as u16).to_be_bytes());
            self.key.extend_from_slice(key);
            self.ends.push(self.key.len());
        }
        let db = self.db.as_ref().expect("the database is open until drop");
        let cf = db
            .cf_handle(DEFAULT_COLUMN_FAMILY_NAME)
            .expect("the default column family is opened by name");
        let (buf, ends) = (&self.key, &self.ends);
        let slices = (0..ends.len()).map(|i| &buf[if i == 0 { 0 } else { ends[i - 1] }..ends[i]]);
        for r in db.batched_multi_get_cf(cf, slices, true) {
            match r.map_err(|e| db_err("read", e))? {
                Some(v) => {
                    let start = values.len();
                    values.extend_from_slice(&v);
                    found.push(Some((start, values.len())));
                }
                None => found.push(None),
            }
        }
        Ok(())
    }

    pub(crate) fn put(&mut self, g: usize, key: &[u8], value: &[u8]) -> Result<()> {
        self.settle()?;
        self.prefixed(g, key);
        self.db()
            .put_opt(&self.key, value, &self.write)
            .map_err(|e| db_err("write", e))
    }

    pub(crate) fn delete(&mut self, g: usize, key: &[u8]) -> Result<()> {
        self.settle()?;
        self.prefixed(g, key);
        self.db()
            .delete_opt(&self.key, &self.write)
            .map_err(|e| db_err("delete", e))
    }

    /// Write (`Some`) or delete (`None`) every entry of `entries`, given as `(key group
    /// index, entry key, value)`, in one batch of about `bytes` bytes.
    pub(crate) fn write_batch<'a>(
        &mut self,
        bytes: usize,
        entries: impl Iterator<Item = (usize, &'a [u8], Option<&'a [u8]>)>,
    ) -> Result<()> {
        self.settle()?;
        let mut batch = WriteBatch::with_capacity_bytes(bytes);
        for (g, key, value) in entries {
            self.prefixed(g, key);
            match value {
                Some(v) => batch.put(&self.key, v),
                None => batch.delete(&self.key),
            }
        }
        self.db()
            .write_opt(batch, &self.write)
            .map_err(|e| db_err("write", e))
    }

    pub(crate) fn scan_prefix(
        &mut self,
        g: usize,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.settle()?;
        self.prefixed(g, prefix);
        let mut it = self.db().raw_iterator();
        it.seek(&self.key);
        while let Some((k, v)) = it.item() {
            if !k.starts_with(&self.key) {
                break;
            }
            f(&k[2..], v)?;
            it.next();
        }
        it.status().map_err(|e| db_err("scan", e))
    }

    pub(crate) fn take_range(
        &mut self,
        g: usize,
        lo: &[u8],
        hi: &[u8],
        out: &mut Vec<Vec<u8>>,
    ) -> Result<()> {
        self.settle()?;
        let first = out.len();
        self.prefixed(g, hi);
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(self.key.clone());
        self.prefixed(g, lo);
        {
            let mut it = self.db().raw_iterator_opt(opts);
            it.seek(&self.key);
            while let Some(k) = it.key() {
                out.push(k[2..].to_vec());
                it.next();
            }
            it.status().map_err(|e| db_err("scan", e))?;
        }
        if out.len() == first {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for k in &out[first..] {
            self.prefixed(g, k);
            batch.delete(&self.key);
        }
        self.db()
            .write_opt(batch, &self.write)
            .map_err(|e| db_err("delete", e))
    }

    pub(crate) fn count(&mut self) -> Result<usize> {
        self.settle()?;
        let mut it = self.db().raw_iterator();
        it.seek_to_first();
        let mut n = 0;
        while it.valid() {
            n += 1;
            it.next();
        }
        it.status().map_err(|e| db_err("scan", e))?;
        Ok(n)
    }

    /// Adopt the files of the newest completed checkpoint as reusable, and drop local
    /// cache links no pending or confirmed checkpoint needs.
    fn confirm(&mut self) {
        let done = self.completed.load(Ordering::SeqCst);
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        let Some(newest) = uploads.remove(&done) else {
            return;
        };
        let mut stale: Vec<SharedFile> = std::mem::replace(&mut self.confirmed, newest)
            .into_values()
            .collect();
        let older: Vec<u64> = uploads.range(..done).map(|(&k, _)| k).collect();
        for k in older {
            stale.extend(uploads.remove(&k).into_iter().flat_map(|m| m.into_values()));
        }
        let keep: HashSet<&str> = self
            .confirmed
            .values()
            .chain(uploads.values().flat_map(|m| m.values()))
            .map(|f| f.path.as_str())
            .collect();
        let cache = cache_dir(&self.local);
        for f in stale {
            if !keep.contains(f.path.as_str()) {
                let _ = std::fs::remove_file(cache.join(cache_name(&f)));
            }
        }
    }

    /// Start a RocksDB checkpoint of the database with the deferred batch written (a
    /// flush and hard links) on a thread of its own; the returned upload waits for it.
    pub(crate) fn checkpoint(&mut self, id: CheckpointId) -> Result<PendingDb> {
        let batch = self.deferred.take();
        self.join_checkpoint_thread()?;
        self.confirm();
        let dir = self.local.join(format!(
            "chk-{}-{}-{}",
            std::process::id(),
            self.instance,
            id.0
        ));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| io_err(format!("removing {}", dir.display()), e))?;
        }
        let db = self.db.clone().expect("the database is open until drop");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let target = dir.clone();
        let thread = std::thread::Builder::new()
            .name("rocksdb-checkpoint".into())
            .spawn(move || {
                let mut write = WriteOptions::default();
                write.disable_wal(true);
                let written = match batch {
                    Some(b) => db.write_opt(b.into_write_batch(), &write),
                    None => Ok(()),
                };
                let (files, written) = match written {
                    Ok(()) => (create_checkpoint(&db, &target), Ok(())),
                    Err(e) => (
                        Err(db_err("writing the barrier's batch", e.clone())),
                        Err(db_err("writing the barrier's batch", e)),
                    ),
                };
                drop(db);
                let _ = tx.send(files);
                written
            })
            .map_err(|e| io_err("starting the RocksDB checkpoint thread".into(), e))?;
        self.creating = Some(thread);
        Ok(PendingDb {
            dir,
            created: Some(rx),
            files: Vec::new(),
            range_start: self.start,
            range_end: self.end,
            confirmed: self.confirmed.clone(),
            instance: self.instance.clone(),
            cache: cache_dir(&self.local),
            uploads: self.uploads.clone(),
        })
    }
}

/// Entries to write at a checkpoint, copied from the cache at the barrier in any order
/// and sorted into a RocksDB batch later, on the checkpoint's thread.
#[derive(Debug, Default)]
pub(crate) struct DeferredBatch {
    /// The instance's first key group (key group indexes are relative to it).
    start: u16,
    /// Per entry: its first 16 bytes of `key group index | key` as a number, where its
    /// key starts in `bytes`, the key's length, and the value's (`u32::MAX`: a delete).
    entries: Vec<(u128, usize, u32, u32)>,
    /// Keys and values, each entry's key group index (2 bytes) and key, then value.
    bytes: Vec<u8>,
}

/// RocksDB's batch record tags (its `WriteBatch` format: a 12-byte header, then per
/// record a tag and length-prefixed key and value).
const TAG_DELETE: u8 = 0;
const TAG_PUT: u8 = 1;

impl DeferredBatch {
    /// Add entry `key` of key group index `g`: written as `value`, or deleted (`None`).
    pub fn push(&mut self, g: u16, key: &[u8], value: Option<&[u8]>) {
        let mut order = [0u8; 16];
        order[..2].copy_from_slice(&g.to_be_bytes());
        let n = key.len().min(14);
        order[2..2 + n].copy_from_slice(&key[..n]);
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&g.to_be_bytes());
        self.bytes.extend_from_slice(key);
        if let Some(v) = value {
            self.bytes.extend_from_slice(v);
        }
        let vlen = value.map_or(u32::MAX, |v| v.len() as u32);
        self.entries
            .push((u128::from_be_bytes(order), at, key.len() as u32, vlen));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in key order (RocksDB inserts a sorted batch into its memtable several
    /// times faster: each insertion starts where the previous one ended), encoded in
    /// RocksDB's batch format with key group indexes made absolute.
    fn into_write_batch(mut self) -> WriteBatch {
        let bytes = &self.bytes;
        let key = |&(_, at, klen, _): &(u128, usize, u32, u32)| &bytes[at..at + 2 + klen as usize];
        self.entries
            .sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| key(a).cmp(key(b))));
        let mut rep = Vec::with_capacity(12 + bytes.len() + 11 * self.entries.len());
        rep.extend_from_slice(&0u64.to_le_bytes());
        rep.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            let (_, at, klen, vlen) = *e;
            let k = key(e);
            let g = u16::from_be_bytes([k[0], k[1]]) + self.start;
            rep.push(if vlen == u32::MAX {
                TAG_DELETE
            } else {
                TAG_PUT
            });
            push_varint32(&mut rep, klen + 2);
            rep.extend_from_slice(&g.to_be_bytes());
            rep.extend_from_slice(&k[2..]);
            if vlen != u32::MAX {
                push_varint32(&mut rep, vlen);
                let v = at + 2 + klen as usize;
                rep.extend_from_slice(&bytes[v..v + vlen as usize]);
            }
        }
        WriteBatch::from_data(&rep)
    }
}

fn push_varint32(out: &mut Vec<u8>, mut n: u32) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Flush the memtable and hard-link a RocksDB checkpoint of `db` into `dir`; its files
/// with their sizes, sorted by name.
fn create_checkpoint(db: &DB, dir: &Path) -> Result<Vec<LocalFile>> {
    Checkpoint::new(db)
        .and_then(|c| c.create_checkpoint(dir))
        .map_err(|e| db_err(format!("creating checkpoint {}", dir.display()), e))?;
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(dir).map_err(|e| io_err(format!("listing {}", dir.display()), e))?
    {
        let entry = entry.map_err(|e| io_err(format!("listing {}", dir.display()), e))?;
        let size = entry
            .metadata()
            .map_err(|e| io_err(format!("reading {}", entry.path().display()), e))?
            .len();
        files.push((entry.file_name().to_string_lossy().into_owned(), size));
    }
    files.sort();
    Ok(files)
}

/// A file of a local RocksDB checkpoint: its name and size.
type LocalFile = (String, u64);

/// A local RocksDB checkpoint, being created, waiting for its upload.
pub struct PendingDb {
    dir: PathBuf,
    /// The checkpoint's files, once the thread creating it is done.
    created: Option<tokio::sync::oneshot::Receiver<Result<Vec<LocalFile>>>>,
    files: Vec<LocalFile>,
    range_start: u16,
    range_end: u16,
    confirmed: HashMap<String, SharedFile>,
    instance: String,
    cache: PathBuf,
    uploads: Arc<Mutex<Uploads>>,
}

impl std::fmt::Debug for PendingDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingDb")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .finish()
    }
}

impl PendingDb {
    /// Upload the SST files not uploaded before; inline the metadata files. The local
    /// checkpoint directory is removed afterwards, whatever the outcome.
    pub async fn upload(
        mut self,
        storage: &CheckpointStorage,
        id: CheckpointId,
    ) -> Result<Uploaded> {
        let result = match self.created.take() {
            Some(created) => match created.await {
                Ok(Ok(files)) => {
                    self.files = files;
                    self.transfer(storage, id).await
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(Error::State {
                    context: format!("creating RocksDB checkpoint {}", self.dir.display()),
                    message: "the thread creating it ended without an answer".into(),
                }),
            },
            None => self.transfer(storage, id).await,
        };
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        result
    }

    async fn transfer(&self, storage: &CheckpointStorage, id: CheckpointId) -> Result<Uploaded> {
        let _ = std::fs::create_dir_all(&self.cache);
        // At most TRANSFERS files in memory and in flight at once.
        let permits = tokio::sync::Semaphore::new(TRANSFERS);
        let files: Vec<(DbFile, u64)> =
            futures::future::try_join_all(self.files.iter().map(|(name, size)| {
                let permits = &permits;
                async move {
                    let _permit = permits.acquire().await.map_err(|e| Error::State {
                        context: "uploading a RocksDB checkpoint".into(),
                        message: e.to_string(),
                    })?;
                    self.transfer_one(storage, id, name, *size).await
                }
            }))
            .await?;
        let mut shared = Vec::new();
        let mut uploaded = 0;
        let mut referenced = HashMap::new();
        let mut out = Vec::with_capacity(files.len());
        for (f, new_bytes) in files {
            uploaded += new_bytes;
            if let DbFileContent::Shared(s) = &f.content {
                shared.push(s.clone());
                referenced.insert(f.name.clone(), s.clone());
            }
            out.push(f);
        }
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.0, referenced);
        Ok(Uploaded {
            snapshot: DbSnapshot {
                range: KeyGroupRange {
                    start: self.range_start,
                    end: self.range_end,
                },
                files: out,
            },
            shared,
            uploaded,
        })
    }

    async fn transfer_one(
        &self,
        storage: &CheckpointStorage,
        id: CheckpointId,
        name: &str,
        size: u64,
    ) -> Result<(DbFile, u64)> {
        if name.ends_with(".sst") {
            if let Some(f) = self.confirmed.get(name).filter(|f| f.size == size) {
                let file = DbFile {
                    name: name.to_string(),
                    content: DbFileContent::Shared(f.clone()),
                };
                return Ok((file, 0));
            }
        }
        let path = self.dir.join(name);
        let bytes = read_file(path.clone()).await?;
        let content = if name.ends_with(".sst") {
            let f = storage.put_shared(id, &self.instance, name, bytes).await?;
            // The local cache shares the inode: free until compaction drops the file.
            let _ = std::fs::hard_link(&path, self.cache.join(cache_name(&f)));
            DbFileContent::Shared(f)
        } else {
            DbFileContent::Inline(bytes)
        };
        Ok((
            DbFile {
                name: name.to_string(),
                content,
            },
            size,
        ))
    }
}

async fn read_file(path: PathBuf) -> Result<Vec<u8>> {
    let p = path.clone();
    tokio::task::spawn_blocking(move || std::fs::read(&p))
        .await
        .map_err(|e| Error::State {
            context: format!("reading {}", path.display()),
            message: e.to_string(),
        })?
        .map_err(|e| io_err(format!("reading {}", path.display()), e))
}

/// Write the files of `snap` into `dir`: inline files from the state file, shared files
/// from the local cache when a valid copy is there, otherwise from storage.
/// Returns the bytes reused from the cache and the bytes downloaded.
fn materialize(snap: &DbSnapshot, dir: &Path, env: &BackendEnv) -> Result<(u64, u64)> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
    let cache = cache_dir(&env.local_dir);
    let _ = std::fs::create_dir_all(&cache);
    let restored = CheckpointId(env.completed.load(Ordering::SeqCst));
    let (mut reused, mut downloaded) = (0u64, 0u64);
    let mut fetch = Vec::new();
    for f in &snap.files {
        let dest = dir.join(&f.name);
        match &f.content {
            DbFileContent::Inline(bytes) => std::fs::write(&dest, bytes)
                .map_err(|e| io_err(format!("writing {}", dest.display()), e))?,
            DbFileContent::Shared(s) => {
                let cached = cache.join(cache_name(s));
                if local_copy_valid(&cached, s) && std::fs::hard_link(&cached, &dest).is_ok() {
                    reused += s.size;
                } else {
                    fetch.push((s, dest, cached));
                }
            }
        }
    }
    let storage = &env.storage;
    env.rt.block_on(async {
        futures::stream::iter(fetch.iter())
            .map(|(s, dest, cached)| async move {
                let bytes = storage.read_shared(restored, s).await?;
                let d = dest.clone();
                tokio::task::spawn_blocking(move || std::fs::write(&d, &bytes))
                    .await
                    .map_err(|e| Error::State {
                        context: format!("writing {}", dest.display()),
                        message: e.to_string(),
                    })?
                    .map_err(|e| io_err(format!("writing {}", dest.display()), e))?;
                let _ = std::fs::hard_link(dest, cached);
                Ok::<_, Error>(())
            })
            .buffer_unordered(TRANSFERS)
            .try_collect::<Vec<()>>()
            .await
    })?;
    downloaded += fetch.iter().map(|(s, _, _)| s.size).sum::<u64>();
    tracing::debug!(dir = %dir.display(), reused_bytes = reused, downloaded_bytes = downloaded, "restored RocksDB files");
    Ok((reused, downloaded))
}

/// Whether the cached copy of a shared file has the recorded size and checksum.
fn local_copy_valid(path: &Path, f: &SharedFile) -> bool {
    match std::fs::metadata(path) {
        Ok(m) if m.len() == f.size => {}
        _ => return false,
    }
    std::fs::read(path).is_ok_and(|b| crc32fast::hash(&b) == f.crc32)
}

/// Call `f(key group, entry key, value)` for every entry of `snap` in `range`, by
/// opening a temporary copy of the snapshot read-only.
pub(crate) fn read_snapshot(
    snap: &DbSnapshot,
    range: KeyGroupRange,
    env: &BackendEnv,
    mut f: impl FnMut(KeyGroup, &[u8], &[u8]) -> Result<()>,
) -> Result<()> {
    let dir = env
        .local_dir
        .join(format!("restore-{}-{:016x}", std::process::id(), nonce()));
    let result = (|| {
        materialize(snap, &dir, env)?;
        let db = DB::open_for_read_only(&options(&RocksDbConfig::default()), &dir, false)
            .map_err(|e| db_err(format!("opening {}", dir.display()), e))?;
        let lo = range.start.max(snap.range.start);
        let hi = range.end.min(snap.range.end);
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(hi.to_be_bytes().to_vec());
        let mut it = db.raw_iterator_opt(opts);
        it.seek(lo.to_be_bytes());
        while let Some((k, v)) = it.item() {
            let kg = KeyGroup(u16::from_be_bytes([k[0], k[1]]));
            f(kg, &k[2..], v)?;
            it.next();
        }
        it.status().map_err(|e| db_err("scan", e))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Create the working directory and remove what dead processes left in it (databases,
/// checkpoint and restore directories named after their pid).
pub(crate) fn prepare_local_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(cache_dir(dir))
        .map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
    let entries =
        std::fs::read_dir(dir).map_err(|e| io_err(format!("listing {}", dir.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = ["db-", "chk-", "restore-"]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !process_alive(pid) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        // Without a cheap check, assume alive: leaving a directory behind is safe.
        true
    }
}

/// Remove the working directory of a finished job: its cache, and the directory
/// itself once nothing else (another instance's database) is in it.
pub(crate) fn remove_local_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(cache_dir(dir));
    let _ = std::fs::remove_dir(dir);
}

/// Remove cached files the restored checkpoint does not reference.
pub(crate) fn prune_local_cache<'a>(dir: &Path, keep: impl Iterator<Item = &'a SharedFile>) {
    let keep: HashSet<&str> = keep.map(cache_name).collect();
    let Ok(entries) = std::fs::read_dir(cache_dir(dir)) else {
        return;
    };
    for entry in entries.flatten() {
        if !keep.contains(entry.file_name().to_string_lossy().as_ref()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::codec;
    use crate::ids::key_group_of_bytes;
    use crate::state::{KeyedState, StateBackend, ValueState};
    use std::collections::BTreeMap;

    const V: ValueState<String> = ValueState::new("v");
    const MAX: u16 = 128;

    #[test]
    fn a_deferred_batch_is_the_batch_rocksdb_builds_from_the_sorted_entries() {
        // Entries pushed out of order, with keys sharing their first 14 bytes (ties of
        // the order prefix), long values (two-byte lengths) and deletes.
        let long = vec![7u8; 300];
        let entries: Vec<(u16, Vec<u8>, Option<Vec<u8>>)> = vec![
            (3, b"b".to_vec(), Some(b"x".to_vec())),
            (0, b"same-prefix-1234-z".to_vec(), None),
            (3, b"a".to_vec(), Some(long.clone())),
            (0, b"same-prefix-1234-a".to_vec(), Some(Vec::new())),
            (1, Vec::new(), Some(b"empty key".to_vec())),
            (0, b"same-prefix-1234".to_vec(), Some(b"shorter".to_vec())),
        ];
        let mut deferred = DeferredBatch {
            start: 40,
            ..Default::default()
        };
        for (g, k, v) in &entries {
            deferred.push(*g, k, v.as_deref());
        }
        let mut sorted = entries.clone();
        sorted.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut expected = WriteBatch::default();
        for (g, k, v) in &sorted {
            let mut key = (40 + g).to_be_bytes().to_vec();
            key.extend_from_slice(k);
            match v {
                Some(v) => expected.put(&key, v),
                None => expected.delete(&key),
            }
        }
        let got = deferred.into_write_batch();
        assert_eq!(got.len(), entries.len());
        assert_eq!(got.data(), expected.data());
    }

    /// Checkpoint storage in memory, a local directory and an I/O runtime, to open,
    /// checkpoint and restore RocksDB state.
    pub(crate) struct Fixture {
        rt: tokio::runtime::Runtime,
        local: tempfile::TempDir,
        storage: CheckpointStorage,
        completed: Arc<AtomicU64>,
    }

    impl Fixture {
        pub(crate) fn new() -> Self {
            Fixture {
                rt: tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap(),
                local: tempfile::tempdir().unwrap(),
                storage: CheckpointStorage::in_memory(),
                completed: Arc::new(AtomicU64::new(0)),
            }
        }

        pub(crate) fn env(&self, backend: StateBackend) -> BackendEnv {
            BackendEnv {
                backend,
                local_dir: self.local.path().to_path_buf(),
                storage: self.storage.clone(),
                rt: self.rt.handle().clone(),
                completed: self.completed.clone(),
            }
        }

        pub(crate) fn open(
            &self,
            range: KeyGroupRange,
            snaps: &[OperatorSnapshot],
        ) -> KeyedState<u64> {
            self.open_caching(range, snaps, RocksDbConfig::default().cache_bytes)
        }

        /// [`Self::open`] with a write-behind cache of `cache_bytes`.
        pub(crate) fn open_caching(
            &self,
            range: KeyGroupRange,
            snaps: &[OperatorSnapshot],
            cache_bytes: usize,
        ) -> KeyedState<u64> {
            let backend = StateBackend::RocksDb(RocksDbConfig {
                local_dir: None,
                write_buffer_size: 1 << 20,
                cache_bytes,
            });
            self.open_backend(range, backend, snaps)
        }

        /// In-memory state of every key group, restored from `snaps`.
        pub(crate) fn open_memory(&self, snaps: &[OperatorSnapshot]) -> KeyedState<u64> {
            let all = KeyGroupRange { start: 0, end: MAX };
            self.open_backend(all, StateBackend::Memory, snaps)
        }

        fn open_backend(
            &self,
            range: KeyGroupRange,
            backend: StateBackend,
            snaps: &[OperatorSnapshot],
        ) -> KeyedState<u64> {
            KeyedState::open(
                range,
                MAX,
                &OperatorId("op".into()),
                SubtaskIndex(0),
                &self.env(backend),
                snaps,
            )
            .unwrap()
        }

        /// Take checkpoint `id`, upload it, and mark it completed.
        pub(crate) fn checkpoint(&self, s: &mut KeyedState<u64>, id: u64) -> Uploaded {
            let view = s.snapshot(CheckpointId(id)).unwrap();
            let up = self
                .rt
                .block_on(
                    view.pending_db
                        .unwrap()
                        .upload(&self.storage, CheckpointId(id)),
                )
                .unwrap();
            self.completed.store(id, Ordering::SeqCst);
            up
        }
    }

    fn set(s: &mut KeyedState<u64>, k: u64, v: &str) {
        s.put(&k, V, &v.to_string(), 0).unwrap();
    }

    fn get(s: &mut KeyedState<u64>, k: u64) -> Option<String> {
        let enc = codec::encode(&k, "k").unwrap();
        if !s.range().contains(key_group_of_bytes(&enc, MAX)) {
            return None;
        }
        s.get(&k, V, 0).unwrap()
    }

    /// Compact everything into one level and wait until RocksDB is idle. Otherwise a
    /// background compaction of the first checkpoint's level-0 files may finish just
    /// after it, and the second checkpoint then (correctly) uploads the rewritten files:
    /// the size comparison would measure compaction timing, not incrementality.
    fn settle(s: &KeyedState<u64>) {
        let store = s.rocks().expect("the fixture opens RocksDB state");
        let db = store.db();
        db.compact_range(None::<&[u8]>, None::<&[u8]>);
        let mut wait = rocksdb::WaitForCompactOptions::default();
        wait.set_flush(true);
        db.wait_for_compact(&wait).unwrap();
    }

    fn value(k: u64, round: u32) -> String {
        format!("{k:020}-{round:04}-{}", "x".repeat(70))
    }

    const ALL: KeyGroupRange = KeyGroupRange { start: 0, end: MAX };
    const KEYS: u64 = 30_000;

    /// 30k keys of ~100 bytes, then 1 % changed: the second checkpoint uploads a small
    /// fraction of the first and references the rest.
    fn two_checkpoints(f: &Fixture) -> (BTreeMap<u64, String>, Uploaded, Uploaded) {
        let mut s = f.open(ALL, &[]);
        let mut expect = BTreeMap::new();
        for k in 0..KEYS {
            set(&mut s, k, &value(k, 0));
            expect.insert(k, value(k, 0));
        }
        settle(&s);
        let first = f.checkpoint(&mut s, 1);
        for k in (0..KEYS).step_by(100) {
            set(&mut s, k, &value(k, 1));
            expect.insert(k, value(k, 1));
        }
        let second = f.checkpoint(&mut s, 2);
        (expect, first, second)
    }

    #[test]
    fn second_checkpoint_uploads_only_the_change() {
        let f = Fixture::new();
        let (_, first, second) = two_checkpoints(&f);
        let total: u64 = second.shared.iter().map(|s| s.size).sum();
        println!(
            "first checkpoint uploaded {} bytes; second uploaded {} of {total} referenced",
            first.uploaded, second.uploaded
        );
        assert!(first.uploaded > 100_000, "{}", first.uploaded);
        assert!(
            second.uploaded * 10 < first.uploaded,
            "second checkpoint uploaded {} bytes, first {}",
            second.uploaded,
            first.uploaded
        );
        let reused = second
            .shared
            .iter()
            .filter(|s| first.shared.contains(s))
            .count();
        assert!(
            reused > 0,
            "no file of the first checkpoint was referenced again"
        );
    }

    #[test]
    fn restores_in_place_rescaled_and_into_memory() {
        let f = Fixture::new();
        let (expect, _, second) = two_checkpoints(&f);
        let snap = OperatorSnapshot {
            db: Some(second.snapshot),
            ..Default::default()
        };
        let snaps = std::slice::from_ref(&snap);
        // Same range: opened in place.
        let mut same = f.open(ALL, snaps);
        assert_eq!(same.len().unwrap(), expect.len());
        for (k, v) in &expect {
            assert_eq!(get(&mut same, *k).as_ref(), Some(v));
        }
        // Rescaled to two instances: each gets exactly its key groups.
        let mut halves = [
            f.open(KeyGroupRange { start: 0, end: 64 }, snaps),
            f.open(
                KeyGroupRange {
                    start: 64,
                    end: 128,
                },
                snaps,
            ),
        ];
        assert_eq!(
            halves[0].len().unwrap() + halves[1].len().unwrap(),
            expect.len()
        );
        for (k, v) in &expect {
            let found: Vec<String> = halves.iter_mut().filter_map(|h| get(h, *k)).collect();
            assert_eq!(found, vec![v.clone()], "key {k}");
        }
        // Switching backend: the in-memory backend reads the RocksDB checkpoint.
        let mut mem = f.open_memory(snaps);
        for (k, v) in &expect {
            assert_eq!(get(&mut mem, *k).as_ref(), Some(v));
        }
    }

    /// Value, map and timer state written by the in-memory backend at parallelism 2
    /// restores into RocksDB at parallelism 3, and that RocksDB state back into memory
    /// at parallelism 1: every entry arrives exactly where its key group is owned.
    #[test]
    fn map_state_on_rocksdb_matches_a_model() {
        use crate::state::tests::{map_op, map_ops_match_a_model};
        use proptest::strategy::{Strategy, ValueTree};
        use proptest::test_runner::TestRunner;
        let f = Fixture::new();
        let mut runner = TestRunner::deterministic();
        for _ in 0..32 {
            let ops = proptest::collection::vec(map_op(), 0..200)
                .new_tree(&mut runner)
                .unwrap()
                .current();
            map_ops_match_a_model(&mut f.open(ALL, &[]), &ops);
        }
    }

    #[test]
    fn memory_and_rocksdb_restore_each_other_at_another_parallelism() {
        use crate::state::{MapState, StateSnapshot};
        use crate::time::TimeDomain;
        const M: MapState<u32, String> = MapState::new("m");
        let f = Fixture::new();
        let mem_env = f.env(StateBackend::Memory);
        let ranges = |p: usize| -> Vec<KeyGroupRange> {
            (0..p)
                .map(|i| KeyGroupRange::for_subtask(MAX, p, SubtaskIndex(i)))
                .collect()
        };
        let owner = |k: u64, rs: &[KeyGroupRange]| {
            let kg = key_group_of_bytes(&codec::encode(&k, "k").unwrap(), MAX);
            rs.iter().position(|r| r.contains(kg)).unwrap()
        };
        let through_bytes = |mut view: StateSnapshot| -> OperatorSnapshot {
            view.prepare().unwrap();
            codec::decode(&codec::encode(&view, "t").unwrap(), "t").unwrap()
        };
        let two = ranges(2);
        let mut mems: Vec<KeyedState<u64>> = two
            .iter()
            .map(|r| {
                KeyedState::open(
                    *r,
                    MAX,
                    &OperatorId("op".into()),
                    SubtaskIndex(0),
                    &mem_env,
                    &[],
                )
                .unwrap()
            })
            .collect();
        for k in 0..500u64 {
            let s = &mut mems[owner(k, &two)];
            set(s, k, &value(k, 0));
            s.map_put(&k, M, &(k as u32), &k.to_string()).unwrap();
            s.register_timer(&k, TimeDomain::EventTime, k as i64);
        }
        let snaps: Vec<OperatorSnapshot> = mems
            .iter_mut()
            .map(|s| through_bytes(s.snapshot(CheckpointId(1)).unwrap()))
            .collect();
        let three = ranges(3);
        let mut rocks: Vec<KeyedState<u64>> = three.iter().map(|r| f.open(*r, &snaps)).collect();
        for k in 0..500u64 {
            let s = &mut rocks[owner(k, &three)];
            assert_eq!(get(s, k), Some(value(k, 0)), "key {k}");
            assert_eq!(
                s.map_entries(&k, M).unwrap(),
                vec![(k as u32, k.to_string())]
            );
        }
        let rocks_snaps: Vec<OperatorSnapshot> = rocks
            .iter_mut()
            .enumerate()
            .map(|(i, s)| OperatorSnapshot {
                db: Some(f.checkpoint(s, 2 + i as u64).snapshot),
                ..Default::default()
            })
            .collect();
        let mut one = KeyedState::<u64>::open(
            ALL,
            MAX,
            &OperatorId("op".into()),
            SubtaskIndex(0),
            &mem_env,
            &rocks_snaps,
        )
        .unwrap();
        let mut fired = Vec::new();
        one.drain_due_timers(TimeDomain::EventTime, i64::MAX, &mut fired)
            .unwrap();
        fired.sort();
        assert_eq!(
            fired,
            (0..500u64).map(|k| (k as i64, k)).collect::<Vec<_>>()
        );
        for k in 0..500u64 {
            assert_eq!(get(&mut one, k), Some(value(k, 0)));
            assert_eq!(
                one.map_get(&k, M, &(k as u32)).unwrap(),
                Some(k.to_string())
            );
        }
    }

    #[test]
    fn restore_reuses_valid_local_files_and_refetches_damaged_ones() {
        let f = Fixture::new();
        let (_, _, second) = two_checkpoints(&f);
        let env = f.env(StateBackend::rocksdb());
        let total: u64 = second.shared.iter().map(|s| s.size).sum();
        let (reused, downloaded) =
            materialize(&second.snapshot, &f.local.path().join("r1"), &env).unwrap();
        assert_eq!(
            (reused, downloaded),
            (total, 0),
            "every file was in the cache"
        );
        // Replace one cached file with different bytes of the same size.
        let victim = &second.shared[0];
        let cached = cache_dir(f.local.path()).join(cache_name(victim));
        std::fs::remove_file(&cached).unwrap();
        std::fs::write(&cached, vec![0u8; victim.size as usize]).unwrap();
        let (reused, downloaded) =
            materialize(&second.snapshot, &f.local.path().join("r2"), &env).unwrap();
        assert_eq!(downloaded, victim.size, "the damaged copy is fetched again");
        assert_eq!(reused, total - victim.size);
        // A fresh machine downloads everything.
        std::fs::remove_dir_all(cache_dir(f.local.path())).unwrap();
        let (reused, downloaded) =
            materialize(&second.snapshot, &f.local.path().join("r3"), &env).unwrap();
        assert_eq!((reused, downloaded), (0, total));
    }

    #[test]
    fn an_altered_shared_file_is_named_at_restore() {
        let f = Fixture::new();
        let (_, _, second) = two_checkpoints(&f);
        std::fs::remove_dir_all(cache_dir(f.local.path())).unwrap();
        let victim = second.shared[0].clone();
        f.rt.block_on(async {
            let path = object_store::path::Path::from(victim.path.as_str());
            use object_store::ObjectStoreExt;
            let store = f.storage.raw();
            let got = store.get(&path).await.unwrap().bytes().await.unwrap();
            let mut bytes = got.to_vec();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            store.put(&path, bytes.into()).await.unwrap();
        });
        let snap = OperatorSnapshot {
            db: Some(second.snapshot),
            ..Default::default()
        };
        let err = KeyedState::<u64>::open(
            ALL,
            MAX,
            &OperatorId("op".into()),
            SubtaskIndex(0),
            &f.env(StateBackend::rocksdb()),
            std::slice::from_ref(&snap),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::CorruptCheckpoint { .. }) && msg.contains(&victim.path),
            "{msg}"
        );
    }
}
