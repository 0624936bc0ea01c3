//! Keyed state scoped to the current key, with two backends behind one API.
//!
//! * **In memory** ([`StateBackend::Memory`]): typed tables per state holding the user's
//!   keys and values, a timer service ordered by time, nothing encoded on the record
//!   path (module `typed`).
//! * **RocksDB** ([`StateBackend::RocksDb`]): entries of the byte layout in one database
//!   per operator instance, value and map entries behind a write-behind cache written
//!   in one batch at each barrier (modules `bytes`, `cache` and [`rocks`]).
//!
//! Checkpoints of both hold the same backend-independent byte layout (module `layout`),
//! stored per key group, so either backend restores the other's checkpoints and a job
//! can restore at another parallelism.
//!
//! Handles ([`ValueState`], [`MapState`]) are typed names, created in `const` context:
//! ```
//! use exactly_engine::state::{MapState, ValueState};
//! const BALANCE: ValueState<i64> = ValueState::new("balance");
//! const SEEN: MapState<u64, bool> = MapState::new("seen");
//! ```

#[cfg(feature = "rocksdb")]
mod bytes;
#[cfg(feature = "rocksdb")]
mod cache;
pub(crate) mod layout;
#[cfg(feature = "rocksdb")]
pub mod rocks;
mod table;
mod timers;
mod typed;
pub mod types;

use crate::api::Key;
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, KeyGroup, KeyGroupRange, OperatorId};
use crate::manifest::SharedFile;
use crate::storage::CheckpointStorage;
use crate::time::{TimeDomain, Timestamp};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
#[cfg(feature = "rocksdb")]
use std::any::TypeId;
use std::marker::PhantomData;
use std::sync::Arc;

/// What state values (and map keys) are: stored typed in memory and cloned out on
/// read, encoded with postcard in checkpoints and in RocksDB.
pub trait StateValue: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> StateValue for T {}

/// Decodes an old value (bytes, the user's erased function, the state's name) and
/// converts it.
type Convert<V> = fn(&[u8], fn(), &str) -> Result<V>;

/// How values written by an earlier version of a state become values of its current
/// type: set with [`ValueState::migrate_from`] or [`MapState::migrate_from`].
pub struct Migration<V> {
    /// The type migrated from, as `std::any::type_name` gives it.
    from: fn() -> &'static str,
    /// Decode an old value and convert it with `f`.
    convert: Convert<V>,
    /// The user's `fn(Old) -> V`, type-erased (only `convert` calls it, as that type).
    f: fn(),
}

impl<V> Clone for Migration<V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for Migration<V> {}

impl<V> Migration<V> {
    const fn new<Old: StateValue>(f: fn(Old) -> V) -> Self {
        Migration {
            from: std::any::type_name::<Old>,
            convert: convert_from::<Old, V>,
            // SAFETY: function pointers have one size and representation; `f` is only
            // called after being transmuted back to `fn(Old) -> V` by
            // `convert_from::<Old, V>`, the function stored beside it.
            f: unsafe { std::mem::transmute::<fn(Old) -> V, fn()>(f) },
        }
    }

    /// Decode a value written as the old type and convert it.
    pub(crate) fn convert(&self, bytes: &[u8], state: &str) -> Result<V> {
        (self.convert)(bytes, self.f, state)
    }
}

fn convert_from<Old: StateValue, V>(bytes: &[u8], f: fn(), state: &str) -> Result<V> {
    let old: Old = postcard::from_bytes(bytes).map_err(|e| Error::Codec {
        what: format!(
            "state '{state}', a value of the previous version, as {}",
            std::any::type_name::<Old>()
        ),
        message: e.to_string(),
    })?;
    // SAFETY: `f` was made from a `fn(Old) -> V` in `Migration::<V>::new::<Old>`, which
    // pairs it with this very instantiation.
    let f = unsafe { std::mem::transmute::<fn(), fn(Old) -> V>(f) };
    Ok(f(old))
}

/// A single value per key.
pub struct ValueState<V> {
    name: &'static str,
    ttl_ms: Option<i64>,
    version: u32,
    migration: Option<Migration<V>>,
    _v: PhantomData<fn() -> V>,
}

impl<V> ValueState<V> {
    /// A handle for the value state called `name` (1 to 255 bytes, unique within its
    /// operator).
    pub const fn new(name: &'static str) -> Self {
        assert!(
            !name.is_empty() && name.len() < 256,
            "state names are 1 to 255 bytes"
        );
        ValueState {
            name,
            ttl_ms: None,
            version: 1,
            migration: None,
            _v: PhantomData,
        }
    }

    /// Expire values `ttl` after they were last written, in processing time: a read at
    /// or after that moment sees nothing, and expired values are deleted in the
    /// background, so state stays bounded.
    ///
    /// ```
    /// use exactly_engine::state::ValueState;
    /// use std::time::Duration;
    /// const LAST_SEEN: ValueState<i64> = ValueState::new("last-seen").with_ttl(Duration::from_secs(3600));
    /// ```
    pub const fn with_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.ttl_ms = Some(ttl.as_millis() as i64);
        self
    }

    /// The version of the state's schema (default 1). Checkpoints record it with the
    /// state's type; raise it when the type or the meaning of its values changes, and
    /// give the conversion with [`ValueState::migrate_from`]. A checkpoint written at a
    /// higher version than the job declares is refused.
    pub const fn version(mut self, version: u32) -> Self {
        assert!(version >= 1, "state versions start at 1");
        self.version = version;
        self
    }

    /// Convert values written by the previous version, where the state held `Old`: on
    /// restore, each old value is decoded as `Old` and converted with `f` (on first use
    /// of the state, in memory and on RocksDB, at any parallelism). The next checkpoint
    /// holds the converted values at the new version; the migration is then no longer
    /// needed. Use with [`ValueState::version`].
    ///
    /// ```
    /// use exactly_engine::state::ValueState;
    /// // Version 1 kept whole units in a u32; version 2 keeps cents in an i64.
    /// const BALANCE: ValueState<i64> = ValueState::new("balance")
    ///     .version(2)
    ///     .migrate_from::<u32>(|units| i64::from(units) * 100);
    /// ```
    pub const fn migrate_from<Old: StateValue>(mut self, f: fn(Old) -> V) -> Self {
        self.migration = Some(Migration::new(f));
        self
    }

    /// The state's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The time-to-live in milliseconds, if set.
    pub const fn ttl_ms(&self) -> Option<i64> {
        self.ttl_ms
    }

    /// What this handle declares for an operator keyed by `K`.
    pub(crate) fn declared<K>(&self) -> types::Declared {
        let kind = match self.ttl_ms {
            None => "ValueState",
            Some(_) => "ValueState with TTL",
        };
        types::Declared {
            description: types::describe::<K>(kind, std::any::type_name::<V>()),
            version: self.version,
            migrates_from: self
                .migration
                .map(|m| types::describe::<K>(kind, (m.from)())),
        }
    }

    /// Read a restored value as [`types::Restore`] says.
    pub(crate) fn decode_restored(&self, bytes: &[u8], how: types::Restore) -> Result<V>
    where
        V: StateValue,
    {
        match (how, &self.migration) {
            (types::Restore::Migrate, Some(m)) => m.convert(bytes, self.name),
            _ => crate::codec::decode(bytes, self.name),
        }
    }
}

impl<V> Clone for ValueState<V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for ValueState<V> {}

/// A map per key, with entries stored individually.
pub struct MapState<UK, UV> {
    name: &'static str,
    version: u32,
    migration: Option<Migration<UV>>,
    _v: PhantomData<fn() -> (UK, UV)>,
}

impl<UK, UV> MapState<UK, UV> {
    /// A handle for the map state called `name` (1 to 255 bytes, unique within its
    /// operator).
    pub const fn new(name: &'static str) -> Self {
        assert!(
            !name.is_empty() && name.len() < 256,
            "state names are 1 to 255 bytes"
        );
        MapState {
            name,
            version: 1,
            migration: None,
            _v: PhantomData,
        }
    }

    /// The version of the state's schema (default 1); see [`ValueState::version`].
    pub const fn version(mut self, version: u32) -> Self {
        assert!(version >= 1, "state versions start at 1");
        self.version = version;
        self
    }

    /// Convert map values written by the previous version, where they were `Old`;
    /// see [`ValueState::migrate_from`]. Map keys keep their type.
    pub const fn migrate_from<Old: StateValue>(mut self, f: fn(Old) -> UV) -> Self {
        self.migration = Some(Migration::new(f));
        self
    }

    /// The state's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// What this handle declares for an operator keyed by `K`.
    pub(crate) fn declared<K>(&self) -> types::Declared {
        let uk = std::any::type_name::<UK>();
        let map = |uv: &str| types::describe::<K>("MapState", &format!("{uk}, {uv}"));
        types::Declared {
            description: map(std::any::type_name::<UV>()),
            version: self.version,
            migrates_from: self.migration.map(|m| map((m.from)())),
        }
    }

    /// Read a restored map value as [`types::Restore`] says.
    pub(crate) fn decode_restored(&self, bytes: &[u8], how: types::Restore) -> Result<UV>
    where
        UV: StateValue,
    {
        match (how, &self.migration) {
            (types::Restore::Migrate, Some(m)) => m.convert(bytes, self.name),
            _ => crate::codec::decode(bytes, self.name),
        }
    }
}

impl<UK, UV> Clone for MapState<UK, UV> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<UK, UV> Copy for MapState<UK, UV> {}

/// The entries of one key group: `(entry key, value)` pairs in key order.
pub type KeyGroupEntries = (KeyGroup, Vec<(Vec<u8>, Vec<u8>)>);

/// The state of one operator instance as stored in a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorSnapshot {
    /// Keyed state of the in-memory backend: entries per key group.
    pub keyed: Vec<KeyGroupEntries>,
    /// Operator (non-keyed) state entries. On restore every subtask sees the entries of
    /// all subtasks (union semantics); sources pick the offsets of their own splits.
    pub list: Vec<Vec<u8>>,
    /// Keyed state of the RocksDB backend: a RocksDB checkpoint of the instance.
    pub db: Option<DbSnapshot>,
}

/// A RocksDB checkpoint of one operator instance: the key groups it holds and its
/// files. SST files are immutable and shared between checkpoints (stored once, under
/// `shared/`); the small metadata files are stored inline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbSnapshot {
    /// The key groups the instance owned.
    pub range: KeyGroupRange,
    /// Every file of the checkpoint directory.
    pub files: Vec<DbFile>,
}

/// One file of a RocksDB checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbFile {
    /// Its name inside the database directory (`000012.sst`, `CURRENT`, ...).
    pub name: String,
    /// Its bytes, or where they are stored.
    pub content: DbFileContent,
}

/// Where a RocksDB checkpoint file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DbFileContent {
    /// Stored in the state file itself (small metadata files).
    Inline(Vec<u8>),
    /// A shared file in checkpoint storage (SST files).
    Shared(SharedFile),
}

/// Keyed state of the in-memory backend as of a barrier: shared tables until
/// [`StateSnapshot::prepare`] encodes them, then entries per key group in the byte
/// layout. Serialises as `Vec<(KeyGroup, Vec<(Vec<u8>, Vec<u8>)>)>`.
#[derive(Debug, Default)]
pub struct KeyedView(ViewState);

#[derive(Debug, Default)]
enum ViewState {
    #[default]
    Empty,
    Live(typed::LiveView),
    Encoded(layout::EncodedGroups),
}

impl Serialize for KeyedView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match &self.0 {
            ViewState::Empty => layout::EncodedGroups::default().serialize(s),
            ViewState::Encoded(g) => g.serialize(s),
            ViewState::Live(_) => Err(serde::ser::Error::custom(
                "keyed state view serialised before StateSnapshot::prepare",
            )),
        }
    }
}

impl StateSnapshot {
    /// Encode the shared in-memory tables into the byte layout (CPU work: run it off
    /// the task thread). Each table is released as soon as it is written, so the live
    /// state stops copying on write early. Idempotent.
    pub fn prepare(&mut self) -> Result<()> {
        if let ViewState::Live(_) = self.keyed.0 {
            let ViewState::Live(live) = std::mem::take(&mut self.keyed.0) else {
                unreachable!()
            };
            self.keyed.0 = ViewState::Encoded(live.encode()?);
        }
        Ok(())
    }

    /// Bytes of keyed state in the encoded view (0 before [`StateSnapshot::prepare`]
    /// and for RocksDB, whose size is its files').
    pub fn keyed_bytes(&self) -> u64 {
        match &self.keyed.0 {
            ViewState::Encoded(g) => g.bytes() as u64,
            _ => 0,
        }
    }
}

/// Snapshots of every operator of one task instance; the payload of a state file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskSnapshotPayload {
    /// One entry per stateful operator of the task.
    pub operators: Vec<(OperatorId, OperatorSnapshot)>,
}

/// A point-in-time view of one operator's state, taken at the barrier and completed
/// later, off the task thread: in-memory tables are shared copy-on-write at the barrier
/// and encoded by [`StateSnapshot::prepare`]; a RocksDB checkpoint directory is uploaded
/// later. Once prepared, it encodes to exactly the bytes of the equivalent
/// [`OperatorSnapshot`], which is what restore decodes.
#[derive(Debug, Default, Serialize)]
pub struct StateSnapshot {
    /// Keyed state of the in-memory backend.
    pub keyed: KeyedView,
    /// Operator state entries.
    pub list: Vec<Vec<u8>>,
    /// The uploaded RocksDB checkpoint, once `pending_db` is uploaded.
    pub db: Option<DbSnapshot>,
    /// A local RocksDB checkpoint still to upload.
    #[serde(skip)]
    pub pending_db: Option<PendingDb>,
    /// The declared type of every state, recorded in the manifest (not the state file).
    #[serde(skip)]
    pub types: types::StateTypeMap,
}

/// A local RocksDB checkpoint waiting for its upload (uninhabited without the
/// `rocksdb` feature).
#[cfg(feature = "rocksdb")]
pub type PendingDb = rocks::PendingDb;
/// A local RocksDB checkpoint waiting for its upload (uninhabited without the
/// `rocksdb` feature).
#[cfg(not(feature = "rocksdb"))]
#[derive(Debug)]
pub enum PendingDb {}

#[cfg(not(feature = "rocksdb"))]
impl PendingDb {
    /// Upload the checkpoint (never called: the type has no values).
    pub async fn upload(self, _storage: &CheckpointStorage, _id: CheckpointId) -> Result<Uploaded> {
        match self {}
    }
}

/// An uploaded RocksDB checkpoint.
#[derive(Debug)]
pub struct Uploaded {
    /// What the state file records.
    pub snapshot: DbSnapshot,
    /// Every shared file the snapshot references (for the manifest).
    pub shared: Vec<SharedFile>,
    /// Bytes uploaded for this checkpoint (shared files reused from earlier ones are
    /// not counted).
    pub uploaded: u64,
}

/// What a task writes at a barrier: every stateful operator's view, encoded later.
#[derive(Debug, Default, Serialize)]
pub struct TaskStateView {
    /// One entry per stateful operator of the task.
    pub operators: Vec<(OperatorId, StateSnapshot)>,
}

impl TaskStateView {
    /// [`StateSnapshot::prepare`] every operator's view.
    pub fn prepare(&mut self) -> Result<()> {
        self.operators.iter_mut().try_for_each(|(_, s)| s.prepare())
    }

    /// The state file of a prepared view: exactly the framed postcard encoding of
    /// `self`, in pieces, the encoded key groups never copied.
    pub fn into_file(self) -> Result<crate::codec::FileChunks> {
        let (mut cur, mut chunks) = (Vec::with_capacity(256), Vec::new());
        layout::push_varint(&mut cur, self.operators.len() as u64);
        for (op, snap) in self.operators {
            crate::codec::encode_into(&op, &mut cur, "task snapshot")?;
            match snap.keyed.0 {
                ViewState::Empty => {
                    layout::EncodedGroups::default().into_chunks(&mut cur, &mut chunks)
                }
                ViewState::Encoded(g) => g.into_chunks(&mut cur, &mut chunks),
                ViewState::Live(_) => {
                    return Err(Error::Codec {
                        what: "task snapshot".into(),
                        message: "keyed state view encoded before StateSnapshot::prepare".into(),
                    })
                }
            }
            crate::codec::encode_into(&snap.list, &mut cur, "task snapshot")?;
            crate::codec::encode_into(&snap.db, &mut cur, "task snapshot")?;
        }
        chunks.push(cur.into());
        Ok(crate::codec::frame_chunks(chunks))
    }
}

/// Which keyed state backend a job uses. Switching is one line of job configuration
/// ([`crate::dsl::JobBuilder::state_backend`]); a checkpoint written by either backend
/// restores into either.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StateBackend {
    /// Ordered maps in memory, copied on write while a snapshot is being written. Fast;
    /// state must fit in memory and every checkpoint writes all of it.
    #[default]
    Memory,
    /// One RocksDB instance per keyed operator instance, in a local working directory:
    /// state may exceed memory, and checkpoints are incremental (only SST files not
    /// uploaded before are written). Needs the `rocksdb` cargo feature.
    RocksDb(RocksDbConfig),
}

impl StateBackend {
    /// The RocksDB backend with default settings.
    pub fn rocksdb() -> Self {
        StateBackend::RocksDb(RocksDbConfig::default())
    }
}

/// Settings of the RocksDB backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RocksDbConfig {
    /// Working directory for the databases and the local copy of uploaded files
    /// (reused on restore). `None`: a directory under the system temp directory,
    /// derived from the job name and checkpoint location.
    pub local_dir: Option<std::path::PathBuf>,
    /// Memtable size per instance, in bytes (default 64 MiB).
    pub write_buffer_size: usize,
    /// Write-behind cache of value and map entries per instance, in bytes (approximate:
    /// each entry counts its encoded key and value plus about 100 bytes; default 64
    /// MiB). Reads are served from it, writes collect in it and reach RocksDB in one
    /// batch at the next checkpoint, or earlier (when it fills, and before a scan of
    /// map state); 0 still works but writes almost every change through at once. The
    /// barrier's pause grows with the keys changed since the previous checkpoint.
    pub cache_bytes: usize,
}

impl Default for RocksDbConfig {
    fn default() -> Self {
        RocksDbConfig {
            local_dir: None,
            write_buffer_size: 64 << 20,
            cache_bytes: 64 << 20,
        }
    }
}

/// What a keyed state instance needs from its job to open, snapshot and restore.
#[derive(Clone)]
pub struct BackendEnv {
    /// The configured backend.
    pub backend: StateBackend,
    /// The resolved local working directory (RocksDB).
    pub local_dir: std::path::PathBuf,
    /// Checkpoint storage (shared files are read from and written to it).
    pub storage: CheckpointStorage,
    /// The job's I/O runtime.
    pub rt: tokio::runtime::Handle,
    /// The newest checkpoint known to be complete (its files may be referenced again).
    pub completed: Arc<std::sync::atomic::AtomicU64>,
}

/// How many records ahead of the one being processed a keyed operator prefetches
/// in-memory state: enough to cover a memory access while the records in between are
/// processed.
const PREFETCH_AHEAD: usize = 8;

/// Keyed state of one operator instance, scoped by the key passed to each call: typed
/// tables in memory, or a RocksDB instance (see [`StateBackend`]).
///
/// Operations that cannot report an error in their signature (timer registration,
/// clearing) record a backend failure instead; the operator reports it right after the
/// record or timer that caused it, and the job restarts from its last checkpoint.
pub struct KeyedState<K> {
    inner: Inner<K>,
    failure: Option<Error>,
}

enum Inner<K> {
    Memory(typed::TypedState<K>),
    #[cfg(feature = "rocksdb")]
    /// The database, and the key it was last set to (so a record's accesses encode
    /// its key once).
    Rocks(bytes::ByteState, Option<K>),
}

impl<K> std::fmt::Debug for KeyedState<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match self.inner {
            Inner::Memory(_) => "memory",
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(..) => "rocksdb",
        };
        f.debug_struct("KeyedState")
            .field("backend", &backend)
            .finish()
    }
}

impl<K: Key> KeyedState<K> {
    /// Empty in-memory state for the key groups in `range` of `max_parallelism`.
    pub fn in_memory(range: KeyGroupRange, max_parallelism: u16) -> Self {
        KeyedState {
            inner: Inner::Memory(typed::TypedState::new(range, max_parallelism)),
            failure: None,
        }
    }

    /// State for operator instance `operator`/`subtask` owning `range` on the
    /// configured backend, restored from `snapshots` (taken at any parallelism, by
    /// either backend).
    pub fn open(
        range: KeyGroupRange,
        max_parallelism: u16,
        operator: &OperatorId,
        subtask: crate::ids::SubtaskIndex,
        env: &BackendEnv,
        snapshots: &[OperatorSnapshot],
    ) -> Result<Self> {
        match &env.backend {
            StateBackend::Memory => {
                let mut s = Self::in_memory(range, max_parallelism);
                s.restore(snapshots, Some(env))?;
                Ok(s)
            }
            #[cfg(feature = "rocksdb")]
            StateBackend::RocksDb(cfg) => {
                let db = rocks::RocksStore::open(range, operator, subtask, cfg, env, snapshots)?;
                Ok(KeyedState {
                    inner: Inner::Rocks(
                        bytes::ByteState::new(range, max_parallelism, db, cfg.cache_bytes),
                        None,
                    ),
                    failure: None,
                })
            }
            #[cfg(not(feature = "rocksdb"))]
            StateBackend::RocksDb(_) => {
                let _ = (operator, subtask);
                Err(rocksdb_missing())
            }
        }
    }

    /// Check every state's declared type, on its first use, against `restored` (the
    /// types the restored checkpoint recorded for `operator`), and record the types in
    /// this instance's checkpoints.
    pub fn expect_types(&mut self, operator: &OperatorId, restored: types::StateTypeMap) {
        let t = types::StateTypes::new(operator.clone(), restored);
        match &mut self.inner {
            Inner::Memory(m) => m.types = t,
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, _) => b.types = t,
        }
    }

    /// The RocksDB instance, if this state is on RocksDB (tests compact it).
    #[cfg(feature = "rocksdb")]
    pub fn rocks(&self) -> Option<&rocks::RocksStore> {
        match &self.inner {
            Inner::Rocks(b, _) => Some(&b.db),
            Inner::Memory(_) => None,
        }
    }

    /// The backend failure recorded by an operation without a `Result`, if any.
    pub fn take_failure(&mut self) -> Result<()> {
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn record(&mut self, r: Result<()>) {
        if let Err(e) = r {
            self.failure.get_or_insert(e);
        }
    }

    /// Before a batch of records with keys `keys` (processed in order, record `i`
    /// announced with [`KeyedState::next_record`]). In memory: start fetching the first
    /// records' entries into the processor's cache. RocksDB: encode the keys once and
    /// find their value entries in the cache, reading the missing ones in one
    /// `MultiGet` (see `ByteState::read_ahead`).
    #[inline]
    pub fn begin_batch(&mut self, keys: &[K]) -> Result<()> {
        match &mut self.inner {
            Inner::Memory(m) => {
                for key in keys.iter().take(PREFETCH_AHEAD) {
                    m.prefetch(key);
                }
                Ok(())
            }
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                *last = None;
                b.read_ahead(keys)
            }
        }
    }

    /// Record `i` of the batch begun with `keys` is processed next. In memory: fetch
    /// the entries of the record a few (8) further. RocksDB: its key, encoded
    /// ahead, becomes the current key.
    #[inline]
    pub fn next_record(&mut self, i: usize, keys: &[K]) {
        match &mut self.inner {
            Inner::Memory(m) => {
                if let Some(ahead) = keys.get(i + PREFETCH_AHEAD) {
                    m.prefetch(ahead);
                }
            }
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                b.use_ahead(i);
                // Reuses the previous key's allocation (`clone_from`).
                match last {
                    Some(l) => l.clone_from(&keys[i]),
                    None => *last = Some(keys[i].clone()),
                }
            }
        }
    }

    /// `key`'s value of `s` (`None` if absent, or if its TTL expired at `now`).
    #[inline]
    pub fn get<V: StateValue>(
        &mut self,
        key: &K,
        s: ValueState<V>,
        now: Timestamp,
    ) -> Result<Option<V>> {
        match &mut self.inner {
            Inner::Memory(m) => Ok(match s.ttl_ms() {
                None => m.values(s)?.table.get(key).cloned(),
                Some(_) => m.ttl_values(s)?.get(key, now).cloned(),
            }),
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                set_rocks_key(b, last, key)?;
                check_value::<K, V>(b, s)?;
                match s.ttl_ms() {
                    None => b.get(s),
                    Some(_) => b.get_ttl(s, now),
                }
            }
        }
    }

    /// Set `key`'s value of `s` (written at `now`, for a TTL).
    #[inline]
    pub fn put<V: StateValue>(
        &mut self,
        key: &K,
        s: ValueState<V>,
        value: &V,
        now: Timestamp,
    ) -> Result<()> {
        match &mut self.inner {
            Inner::Memory(m) => {
                match s.ttl_ms() {
                    None => m.values(s)?.table.set(key, value),
                    Some(ttl) => m
                        .ttl_values(s)?
                        .set(key, now.saturating_add(ttl), value.clone()),
                }
                Ok(())
            }
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                set_rocks_key(b, last, key)?;
                check_value::<K, V>(b, s)?;
                match s.ttl_ms() {
                    None => b.put(s, value),
                    Some(_) => b.put_ttl(s, value, now),
                }
            }
        }
    }

    /// Remove `key`'s value of `s`.
    pub fn clear<V: StateValue>(&mut self, key: &K, s: ValueState<V>) {
        let r = match &mut self.inner {
            Inner::Memory(m) => match s.ttl_ms() {
                None => m.values(s).map(|t| {
                    t.table.remove(key);
                }),
                Some(_) => m.ttl_values(s).map(|t| t.clear(key)),
            },
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => set_rocks_key(b, last, key)
                .and_then(|()| check_value::<K, V>(b, s))
                .and_then(|()| match s.ttl_ms() {
                    None => b.clear(s),
                    Some(_) => b.clear_ttl(s),
                }),
        };
        self.record(r);
    }

    /// One entry of `key`'s map `s`.
    #[inline]
    pub fn map_get<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        key: &K,
        s: MapState<UK, UV>,
        uk: &UK,
    ) -> Result<Option<UV>> {
        match &mut self.inner {
            Inner::Memory(m) => Ok(m.maps(s)?.get(key, uk).cloned()),
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                set_rocks_key(b, last, key)?;
                check_map::<K, UK, UV>(b, s)?;
                b.map_get(s, uk)
            }
        }
    }

    /// Set one entry of `key`'s map `s`.
    #[inline]
    pub fn map_put<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        key: &K,
        s: MapState<UK, UV>,
        uk: &UK,
        value: &UV,
    ) -> Result<()> {
        match &mut self.inner {
            Inner::Memory(m) => {
                m.maps(s)?.put(key, uk, value.clone());
                Ok(())
            }
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                set_rocks_key(b, last, key)?;
                check_map::<K, UK, UV>(b, s)?;
                b.map_put(s, uk, value)
            }
        }
    }

    /// Remove one entry of `key`'s map `s`.
    pub fn map_remove<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        key: &K,
        s: MapState<UK, UV>,
        uk: &UK,
    ) -> Result<()> {
        match &mut self.inner {
            Inner::Memory(m) => {
                m.maps(s)?.remove(key, uk);
                Ok(())
            }
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                set_rocks_key(b, last, key)?;
                check_map::<K, UK, UV>(b, s)?;
                b.map_remove(s, uk)
            }
        }
    }

    /// Every entry of `key`'s map `s`: in insertion order in memory (removals keep the
    /// order of the rest), in encoded-key order on RocksDB.
    pub fn map_entries<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        key: &K,
        s: MapState<UK, UV>,
    ) -> Result<Vec<(UK, UV)>> {
        match &mut self.inner {
            Inner::Memory(m) => Ok(m
                .maps(s)?
                .table
                .get(key)
                .map(|e| e.to_vec())
                .unwrap_or_default()),
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                set_rocks_key(b, last, key)?;
                check_map::<K, UK, UV>(b, s)?;
                b.map_entries(s)
            }
        }
    }

    /// Change entry `uk` of `key`'s map `s` in place with `f` (created with `init` if
    /// absent), and return what `f` returns: one lookup in memory.
    #[inline]
    pub fn map_update<UK: StateValue + Eq, UV: StateValue, R>(
        &mut self,
        key: &K,
        s: MapState<UK, UV>,
        uk: &UK,
        init: impl FnOnce() -> UV,
        f: impl FnOnce(&mut UV) -> R,
    ) -> Result<R> {
        match &mut self.inner {
            Inner::Memory(m) => Ok(m.maps(s)?.update(key, uk, init, f)),
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                set_rocks_key(b, last, key)?;
                check_map::<K, UK, UV>(b, s)?;
                let mut v = b.map_get(s, uk)?.unwrap_or_else(init);
                let r = f(&mut v);
                b.map_put(s, uk, &v)?;
                Ok(r)
            }
        }
    }

    /// Visit every entry of `key`'s map `s` (in [`Self::map_entries`] order), keeping
    /// those for which `f` returns true, with the changes `f` made to them.
    pub fn map_retain<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        key: &K,
        s: MapState<UK, UV>,
        f: impl FnMut(&UK, &mut UV) -> bool,
    ) -> Result<()> {
        match &mut self.inner {
            Inner::Memory(m) => {
                m.maps(s)?.retain(key, f);
                Ok(())
            }
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                set_rocks_key(b, last, key)?;
                check_map::<K, UK, UV>(b, s)?;
                // Write back only what changed: compare each kept value's encoding.
                let mut f = f;
                let (mut before, mut after) = (Vec::new(), Vec::new());
                for (uk, mut uv) in b.map_entries(s)? {
                    before.clear();
                    crate::codec::encode_into(&uv, &mut before, s.name())?;
                    if !f(&uk, &mut uv) {
                        b.map_remove(s, &uk)?;
                        continue;
                    }
                    after.clear();
                    crate::codec::encode_into(&uv, &mut after, s.name())?;
                    if after != before {
                        b.map_put(s, &uk, &uv)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// The key group of `key`.
    pub fn key_group(&mut self, key: &K) -> Result<KeyGroup> {
        match &mut self.inner {
            Inner::Memory(m) => m.key_group(key),
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                set_rocks_key(b, last, key)?;
                Ok(b.key_group())
            }
        }
    }

    /// [`Self::map_retain`] over every key of this instance: `f` gets each entry with
    /// its key. In memory the table is visited in memory order; on RocksDB key group by
    /// key group.
    pub fn map_retain_all_keys<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        s: MapState<UK, UV>,
        f: impl FnMut(&K, &UK, &mut UV) -> bool,
    ) -> Result<()> {
        match &mut self.inner {
            Inner::Memory(m) => {
                m.maps(s)?.retain_all(f);
                Ok(())
            }
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, _) => {
                check_map::<K, UK, UV>(b, s)?;
                b.map_retain_all(s, f)
            }
        }
    }

    /// Remove every entry of `key`'s map `s`.
    pub fn map_clear<UK: StateValue + Eq, UV: StateValue>(&mut self, key: &K, s: MapState<UK, UV>) {
        let r = match &mut self.inner {
            Inner::Memory(m) => m.maps(s).map(|t| t.clear(key)),
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => set_rocks_key(b, last, key)
                .and_then(|()| check_map::<K, UK, UV>(b, s))
                .and_then(|()| b.map_clear(s)),
        };
        self.record(r);
    }

    /// Register a timer for `key` (idempotent).
    pub fn register_timer(&mut self, key: &K, domain: TimeDomain, ts: Timestamp) {
        match &mut self.inner {
            Inner::Memory(m) => m.timers.register(domain, ts, key),
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                let r = set_rocks_key(b, last, key).and_then(|()| b.register_timer(domain, ts));
                self.record(r)
            }
        }
    }

    /// Delete a timer of `key`, if registered.
    pub fn delete_timer(&mut self, key: &K, domain: TimeDomain, ts: Timestamp) {
        match &mut self.inner {
            Inner::Memory(m) => m.timers.delete(domain, ts, key),
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, last) => {
                let r = set_rocks_key(b, last, key).and_then(|()| b.delete_timer(domain, ts));
                self.record(r)
            }
        }
    }

    /// Remove and append to `out` every timer of `domain` due at `upto`, as `(time,
    /// key)`: in time order in memory, in time order within each key group on RocksDB.
    pub fn drain_due_timers(
        &mut self,
        domain: TimeDomain,
        upto: Timestamp,
        out: &mut Vec<(Timestamp, K)>,
    ) -> Result<()> {
        match &mut self.inner {
            Inner::Memory(m) => {
                m.timers.drain_due(domain, upto, out);
                Ok(())
            }
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, _) => {
                let mut raw = Vec::new();
                b.drain_due_timers(domain, upto, &mut raw)?;
                for (t, k) in raw {
                    out.push((t, crate::codec::decode(&k, "timer key")?));
                }
                Ok(())
            }
        }
    }

    /// Delete every value whose TTL expired at `now`; returns how many.
    pub fn expire_ttl(&mut self, now: Timestamp) -> Result<usize> {
        match &mut self.inner {
            Inner::Memory(m) => Ok(m.expire_ttl(now)),
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, _) => b.expire_ttl(now),
        }
    }

    /// Number of entries as the byte layout counts them, timers included (a full scan
    /// with RocksDB).
    pub fn len(&mut self) -> Result<usize> {
        match &mut self.inner {
            Inner::Memory(m) => Ok(m.len()),
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, _) => b.len(),
        }
    }

    /// Whether no entry is stored.
    pub fn is_empty(&mut self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// A point-in-time view of the keyed state for checkpoint `id`: in memory the
    /// tables, shared (O(states x segments), no entry copied; encoded later by
    /// [`StateSnapshot::prepare`]); with RocksDB a local checkpoint (a memtable flush
    /// and hard links), uploaded later.
    pub fn snapshot(&mut self, id: CheckpointId) -> Result<StateSnapshot> {
        match &mut self.inner {
            Inner::Memory(m) => {
                let _ = id;
                Ok(StateSnapshot {
                    keyed: KeyedView(ViewState::Live(m.share())),
                    types: m.types.recorded(),
                    ..Default::default()
                })
            }
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, _) => {
                let mut snap = b.snapshot(id)?;
                snap.types = b.types.recorded();
                Ok(snap)
            }
        }
    }

    /// Load the entries of the key groups this instance owns from restored snapshots
    /// (taken at any parallelism, by either backend; a RocksDB snapshot needs `env` to
    /// fetch its files).
    pub fn restore(
        &mut self,
        snapshots: &[OperatorSnapshot],
        env: Option<&BackendEnv>,
    ) -> Result<()> {
        for snap in snapshots {
            for (kg, entries) in &snap.keyed {
                for (k, v) in entries {
                    self.restore_entry(*kg, k, v)?;
                }
            }
            if let Some(db) = &snap.db {
                let range = self.range();
                if db.range.start >= range.end || db.range.end <= range.start {
                    continue;
                }
                #[cfg(feature = "rocksdb")]
                {
                    let env = env.ok_or_else(|| {
                        Error::config("restoring a RocksDB snapshot needs checkpoint storage")
                    })?;
                    rocks::read_snapshot(db, range, env, |kg, k, v| self.restore_entry(kg, k, v))?;
                }
                #[cfg(not(feature = "rocksdb"))]
                {
                    let _ = env;
                    return Err(rocksdb_missing());
                }
            }
        }
        Ok(())
    }

    fn restore_entry(&mut self, kg: KeyGroup, k: &[u8], v: &[u8]) -> Result<()> {
        match &mut self.inner {
            Inner::Memory(m) => m.restore_entry(kg, k, v),
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, _) => b.restore_entry(kg, k, v),
        }
    }

    /// The key groups this instance owns.
    pub fn range(&self) -> KeyGroupRange {
        match &self.inner {
            Inner::Memory(m) => m.range(),
            #[cfg(feature = "rocksdb")]
            Inner::Rocks(b, _) => b.range(),
        }
    }
}

/// Make `key` RocksDB's current key, encoding it only if it changed.
#[cfg(feature = "rocksdb")]
#[inline]
fn set_rocks_key<K: Key>(b: &mut bytes::ByteState, last: &mut Option<K>, key: &K) -> Result<()> {
    if last.as_ref() != Some(key) {
        b.set_key(key)?;
        *last = Some(key.clone());
    }
    Ok(())
}

/// Check a value state's declared type on RocksDB (a pointer scan after the first use;
/// the memory backend checks when it opens the state's table).
#[cfg(feature = "rocksdb")]
#[inline]
fn check_value<K, V: StateValue>(b: &mut bytes::ByteState, s: ValueState<V>) -> Result<()> {
    let (kind, expiry) = match s.ttl_ms() {
        None => (0, 0),
        Some(_) => (1, 8),
    };
    b.check(
        s.name(),
        kind,
        TypeId::of::<V>(),
        || s.declared::<K>(),
        |old, new| {
            let head = old.get(..expiry).ok_or_else(|| Error::Codec {
                what: format!("state '{}'", s.name()),
                message: "a value with a TTL lacks its expiry".into(),
            })?;
            new.extend_from_slice(head);
            let v = s.decode_restored(&old[expiry..], types::Restore::Migrate)?;
            crate::codec::encode_into(&v, new, s.name())
        },
    )
}

/// [`check_value`] for a map state.
#[cfg(feature = "rocksdb")]
#[inline]
fn check_map<K, UK: StateValue, UV: StateValue>(
    b: &mut bytes::ByteState,
    s: MapState<UK, UV>,
) -> Result<()> {
    b.check(
        s.name(),
        2,
        TypeId::of::<(UK, UV)>(),
        || s.declared::<K>(),
        |old, new| {
            let v = s.decode_restored(old, types::Restore::Migrate)?;
            crate::codec::encode_into(&v, new, s.name())
        },
    )
}

#[cfg(not(feature = "rocksdb"))]
fn rocksdb_missing() -> Error {
    Error::config(
        "the RocksDB state backend (or a checkpoint written by it) needs the `rocksdb` feature of `exactly` (or `exactly-engine`)",
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::codec;
    use crate::ids::{key_group_of_bytes, SubtaskIndex};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    const V: ValueState<i64> = ValueState::new("v");
    const T: ValueState<String> =
        ValueState::new("t").with_ttl(std::time::Duration::from_millis(100));
    const M: MapState<String, u32> = MapState::new("m");
    const MAX: u16 = 128;
    const ALL: KeyGroupRange = KeyGroupRange { start: 0, end: MAX };

    fn full() -> KeyedState<u64> {
        KeyedState::in_memory(ALL, MAX)
    }

    /// Snapshot through the real encoding: a view is prepared and written, an
    /// `OperatorSnapshot` is read back.
    fn through_bytes(s: &mut KeyedState<u64>) -> OperatorSnapshot {
        let mut view = s.snapshot(CheckpointId(1)).unwrap();
        view.list = vec![b"offset".to_vec()];
        let mut task = TaskStateView {
            operators: vec![(OperatorId("op".into()), view)],
        };
        task.prepare().unwrap();
        // The state file's direct path writes exactly what serde writes.
        let expected = codec::frame(&codec::encode(&task, "t").unwrap());
        let chunks = task.into_file().unwrap();
        let file: Vec<u8> = chunks
            .chunks
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect();
        assert_eq!(file, expected);
        assert_eq!(chunks.len, file.len() as u64);
        assert_eq!(chunks.crc32, crc32fast::hash(&file));
        let mut back: TaskSnapshotPayload =
            codec::decode(codec::unframe(&file).unwrap(), "t").unwrap();
        assert_eq!(back.operators.len(), 1);
        let (_, snap) = back.operators.pop().unwrap();
        assert_eq!(snap.list, vec![b"offset".to_vec()]);
        snap
    }

    fn entries(snap: &OperatorSnapshot) -> BTreeSet<(u16, Vec<u8>, Vec<u8>)> {
        snap.keyed
            .iter()
            .flat_map(|(kg, e)| e.iter().map(move |(k, v)| (kg.0, k.clone(), v.clone())))
            .collect()
    }

    fn enc<X: Serialize>(x: &X) -> Vec<u8> {
        codec::encode(x, "t").unwrap()
    }

    #[test]
    fn snapshots_are_the_documented_byte_layout() {
        let mut s = full();
        s.put(&7, V, &-3, 0).unwrap();
        s.put(&7, T, &"x".to_string(), 1_000).unwrap();
        s.map_put(&8, M, &"a".to_string(), &5).unwrap();
        s.register_timer(&9, TimeDomain::EventTime, -2);
        s.register_timer(&9, TimeDomain::ProcessingTime, 40);
        let got = entries(&through_bytes(&mut s));
        let kg = |k: u64| key_group_of_bytes(&enc(&k), MAX).0;
        let cat = |parts: &[&[u8]]| parts.concat();
        let expected: BTreeSet<(u16, Vec<u8>, Vec<u8>)> = [
            (kg(7), cat(&[b"\x01v", &enc(&7u64)]), enc(&-3i64)),
            (
                kg(7),
                cat(&[b"\x01t", &enc(&7u64)]),
                cat(&[&layout::ts_bytes(1_100), &enc(&"x".to_string())]),
            ),
            (
                kg(7),
                cat(&[&layout::mark(b'X', 1_100), b"\x01t", &enc(&7u64)]),
                vec![],
            ),
            (
                kg(8),
                cat(&[b"\x01m", &enc(&8u64), &enc(&"a".to_string())]),
                enc(&5u32),
            ),
            (kg(9), cat(&[&layout::mark(b'E', -2), &enc(&9u64)]), vec![]),
            (kg(9), cat(&[&layout::mark(b'P', 40), &enc(&9u64)]), vec![]),
        ]
        .into_iter()
        .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn timers_fire_in_time_order_once_and_survive_rescale() {
        let mut s = full();
        for (k, ts) in [(1u64, 30), (1, 10), (2, -5), (3, 20), (1, 10), (4, 11)] {
            s.register_timer(&k, TimeDomain::EventTime, ts);
        }
        s.delete_timer(&3, TimeDomain::EventTime, 20);
        s.register_timer(&2, TimeDomain::ProcessingTime, 0);
        let mut out = Vec::new();
        s.drain_due_timers(TimeDomain::EventTime, 10, &mut out)
            .unwrap();
        assert_eq!(out, vec![(-5, 2), (10, 1)]);
        out.clear();
        s.drain_due_timers(TimeDomain::EventTime, 10, &mut out)
            .unwrap();
        assert!(out.is_empty(), "fired timers are gone");
        // The remaining timers move with their key groups on rescale.
        let snap = through_bytes(&mut s);
        let mut a = KeyedState::<u64>::in_memory(KeyGroupRange { start: 0, end: 64 }, MAX);
        let mut b = KeyedState::<u64>::in_memory(
            KeyGroupRange {
                start: 64,
                end: 128,
            },
            MAX,
        );
        a.restore(std::slice::from_ref(&snap), None).unwrap();
        b.restore(std::slice::from_ref(&snap), None).unwrap();
        out.clear();
        a.drain_due_timers(TimeDomain::EventTime, i64::MAX, &mut out)
            .unwrap();
        b.drain_due_timers(TimeDomain::EventTime, i64::MAX, &mut out)
            .unwrap();
        out.sort();
        assert_eq!(out, vec![(11, 4), (30, 1)]);
        out.clear();
        a.drain_due_timers(TimeDomain::ProcessingTime, 0, &mut out)
            .unwrap();
        b.drain_due_timers(TimeDomain::ProcessingTime, 0, &mut out)
            .unwrap();
        assert_eq!(out, vec![(0, 2)]);
    }

    #[test]
    fn snapshot_is_isolated_from_later_writes() {
        let mut s = full();
        s.put(&1, V, &1, 0).unwrap();
        s.map_put(&1, M, &"a".to_string(), &1).unwrap();
        s.register_timer(&1, TimeDomain::EventTime, 5);
        let mut view = s.snapshot(CheckpointId(1)).unwrap();
        view.list = vec![b"x".to_vec()];
        s.put(&1, V, &2, 0).unwrap();
        s.put(&2, V, &3, 0).unwrap();
        s.map_put(&1, M, &"a".to_string(), &9).unwrap();
        s.map_put(&1, M, &"b".to_string(), &9).unwrap();
        s.register_timer(&1, TimeDomain::EventTime, 6);
        s.delete_timer(&1, TimeDomain::EventTime, 5);
        let mut out = Vec::new();
        s.drain_due_timers(TimeDomain::EventTime, 100, &mut out)
            .unwrap();
        view.prepare().unwrap();
        let back: OperatorSnapshot =
            codec::decode(&codec::encode(&view, "t").unwrap(), "t").unwrap();
        assert_eq!(back.list, vec![b"x".to_vec()]);
        let mut restored = full();
        restored.restore(&[back], None).unwrap();
        assert_eq!(restored.get(&1, V, 0).unwrap(), Some(1));
        assert_eq!(restored.get(&2, V, 0).unwrap(), None);
        assert_eq!(
            restored.map_entries(&1, M).unwrap(),
            vec![("a".to_string(), 1)]
        );
        out.clear();
        restored
            .drain_due_timers(TimeDomain::EventTime, 100, &mut out)
            .unwrap();
        assert_eq!(out, vec![(5, 1)], "the view must not see later writes");
    }

    /// One operation on map state, for [`map_ops_match_a_model`].
    #[derive(Debug, Clone)]
    pub(crate) enum MapOp {
        Put(u64, u8, u32),
        Update(u64, u8, u32),
        Remove(u64, u8),
        /// Keep the entries whose map key is not divisible by the divisor; add 1 to the
        /// kept values whose map key is even.
        Retain(u64, u8),
        /// The same over every key's map; entries whose key plus map key is divisible
        /// by the divisor are dropped.
        RetainAllKeys(u8),
        Clear(u64),
    }

    pub(crate) fn map_op() -> impl Strategy<Value = MapOp> {
        let k = 0u64..6;
        let uk = 0u8..6;
        prop_oneof![
            (k.clone(), uk.clone(), any::<u32>()).prop_map(|(k, u, v)| MapOp::Put(k, u, v)),
            (k.clone(), uk.clone(), any::<u32>()).prop_map(|(k, u, v)| MapOp::Update(k, u, v)),
            (k.clone(), uk).prop_map(|(k, u)| MapOp::Remove(k, u)),
            (k.clone(), 1u8..5).prop_map(|(k, d)| MapOp::Retain(k, d)),
            (2u8..5).prop_map(MapOp::RetainAllKeys),
            k.prop_map(MapOp::Clear),
        ]
    }

    const MO: MapState<u8, u32> = MapState::new("mo");

    /// Apply `ops` to `s` and to a `BTreeMap` model; after every step each key's
    /// entries (as a set: the backends order them differently) and the entry count
    /// must match the model.
    pub(crate) fn map_ops_match_a_model(s: &mut KeyedState<u64>, ops: &[MapOp]) {
        let mut model: BTreeMap<(u64, u8), u32> = BTreeMap::new();
        for op in ops {
            match *op {
                MapOp::Put(k, u, v) => {
                    s.map_put(&k, MO, &u, &v).unwrap();
                    model.insert((k, u), v);
                }
                MapOp::Update(k, u, v) => {
                    let old = s
                        .map_update(
                            &k,
                            MO,
                            &u,
                            || v,
                            |x| {
                                let old = *x;
                                *x = x.wrapping_mul(3).wrapping_add(1);
                                old
                            },
                        )
                        .unwrap();
                    let m = model.entry((k, u)).or_insert(v);
                    assert_eq!(old, *m, "map_update sees the value before it");
                    *m = m.wrapping_mul(3).wrapping_add(1);
                }
                MapOp::Remove(k, u) => {
                    s.map_remove(&k, MO, &u).unwrap();
                    model.remove(&(k, u));
                }
                MapOp::Retain(k, d) => {
                    let mut seen = Vec::new();
                    s.map_retain(&k, MO, |u, v| {
                        seen.push(*u);
                        if *u % 2 == 0 {
                            *v = v.wrapping_add(1);
                        }
                        *u % d != 0
                    })
                    .unwrap();
                    seen.sort();
                    let expected: Vec<u8> = model
                        .keys()
                        .filter(|(mk, _)| *mk == k)
                        .map(|(_, u)| *u)
                        .collect();
                    assert_eq!(seen, expected, "map_retain visits every entry once");
                    model.retain(|(mk, u), v| {
                        if *mk != k {
                            return true;
                        }
                        if *u % 2 == 0 {
                            *v = v.wrapping_add(1);
                        }
                        *u % d != 0
                    });
                }
                MapOp::RetainAllKeys(d) => {
                    let keep = |k: u64, u: u8, v: &mut u32| {
                        if u.is_multiple_of(2) {
                            *v = v.wrapping_add(1);
                        }
                        !(k + u64::from(u)).is_multiple_of(u64::from(d))
                    };
                    let mut seen = Vec::new();
                    s.map_retain_all_keys(MO, |k, u, v| {
                        seen.push((*k, *u));
                        keep(*k, *u, v)
                    })
                    .unwrap();
                    seen.sort();
                    let expected: Vec<(u64, u8)> = model.keys().copied().collect();
                    assert_eq!(seen, expected, "every key's entries visited once");
                    model.retain(|(k, u), v| keep(*k, *u, v));
                }
                MapOp::Clear(k) => {
                    s.map_clear(&k, MO);
                    model.retain(|(mk, _), _| *mk != k);
                }
            }
            s.take_failure().unwrap();
            for k in 0..6u64 {
                let mut got = s.map_entries(&k, MO).unwrap();
                got.sort();
                let expected: Vec<(u8, u32)> = model
                    .iter()
                    .filter(|((mk, _), _)| *mk == k)
                    .map(|((_, u), v)| (*u, *v))
                    .collect();
                assert_eq!(got, expected, "key {k} after {op:?}");
            }
            assert_eq!(s.len().unwrap(), model.len());
        }
    }

    proptest! {
        #[test]
        fn in_memory_map_state_matches_a_model(ops in proptest::collection::vec(map_op(), 0..200)) {
            map_ops_match_a_model(&mut full(), &ops);
        }
    }

    #[test]
    fn values_and_maps_are_scoped_to_the_key() {
        let mut s = full();
        s.put(&1, V, &10, 0).unwrap();
        s.map_put(&1, M, &"a".to_string(), &1).unwrap();
        s.map_put(&1, M, &"b".to_string(), &2).unwrap();
        assert_eq!(s.get(&2, V, 0).unwrap(), None);
        assert!(s.map_entries(&2, M).unwrap().is_empty());
        s.map_put(&2, M, &"a".to_string(), &9).unwrap();
        assert_eq!(s.get(&1, V, 0).unwrap(), Some(10));
        assert_eq!(
            s.map_entries(&1, M).unwrap(),
            vec![("a".to_string(), 1), ("b".to_string(), 2)]
        );
        s.map_remove(&1, M, &"a".to_string()).unwrap();
        assert_eq!(s.map_get(&1, M, &"a".to_string()).unwrap(), None);
        s.map_clear(&1, M);
        assert!(s.map_entries(&1, M).unwrap().is_empty());
        assert_eq!(s.map_get(&2, M, &"a".to_string()).unwrap(), Some(9));
        s.clear(&1, V);
        assert_eq!(s.len().unwrap(), 1, "only key 2's map entry is left");
    }

    #[test]
    fn one_name_with_two_types_is_refused() {
        const SAME: ValueState<String> = ValueState::new("v");
        let mut s = full();
        s.put(&1, V, &1, 0).unwrap();
        let err = s.get(&1, SAME, 0).unwrap_err();
        assert!(err.to_string().contains("two different types"), "{err}");
    }

    #[test]
    fn ttl_values_expire_and_are_deleted() {
        let mut s = full();
        s.put(&1, T, &"a".to_string(), 1_000).unwrap();
        s.put(&2, T, &"b".to_string(), 1_050).unwrap();
        assert_eq!(s.get(&1, T, 1_099).unwrap().as_deref(), Some("a"));
        assert_eq!(s.get(&1, T, 1_100).unwrap(), None, "expired at write + ttl");
        // A rewrite restarts the TTL; the old expiry must not delete the new value.
        s.put(&1, T, &"a2".to_string(), 1_090).unwrap();
        assert_eq!(s.expire_ttl(1_150).unwrap(), 1, "key 2 expired");
        assert_eq!(s.get(&1, T, 1_150).unwrap().as_deref(), Some("a2"));
        // Restored state keeps expiries.
        let snap = through_bytes(&mut s);
        let mut r = full();
        r.restore(&[snap], None).unwrap();
        assert_eq!(r.get(&1, T, 1_189).unwrap().as_deref(), Some("a2"));
        assert_eq!(r.expire_ttl(1_190).unwrap(), 1);
        assert!(r.is_empty().unwrap());
    }

    #[test]
    fn restored_state_never_touched_is_written_back_unchanged() {
        let mut s = full();
        for k in 0..50u64 {
            s.put(&k, V, &(k as i64), 0).unwrap();
            s.put(&k, T, &k.to_string(), 0).unwrap();
            s.map_put(&k, M, &k.to_string(), &(k as u32)).unwrap();
        }
        let first = through_bytes(&mut s);
        let mut r = full();
        r.restore(std::slice::from_ref(&first), None).unwrap();
        assert_eq!(r.len().unwrap(), s.len().unwrap());
        // Only V is used in this run; T and M pass through as bytes.
        assert_eq!(r.get(&3, V, 0).unwrap(), Some(3));
        let second = through_bytes(&mut r);
        assert_eq!(entries(&second), entries(&first));
    }

    proptest! {
        /// Snapshot at parallelism `p1`, restore at `p2`: every key sees the same values.
        #[test]
        fn rescale_round_trip(entries in proptest::collection::btree_map(any::<u64>(), any::<i64>(), 0..200), p1 in 1usize..5, p2 in 1usize..5) {
            let mut olds: Vec<KeyedState<u64>> = (0..p1)
                .map(|i| KeyedState::in_memory(KeyGroupRange::for_subtask(MAX, p1, SubtaskIndex(i)), MAX))
                .collect();
            for (k, v) in &entries {
                let kg = key_group_of_bytes(&enc(k), MAX);
                let owner = crate::ids::subtask_for_key_group(kg, MAX, p1);
                olds[owner.0].put(k, V, v, 0).unwrap();
                olds[owner.0].register_timer(k, TimeDomain::EventTime, *v);
            }
            let snaps: Vec<OperatorSnapshot> = olds.iter_mut().map(through_bytes).collect();
            let mut news: Vec<KeyedState<u64>> = (0..p2)
                .map(|i| KeyedState::in_memory(KeyGroupRange::for_subtask(MAX, p2, SubtaskIndex(i)), MAX))
                .collect();
            for n in &mut news { n.restore(&snaps, None).unwrap(); }
            prop_assert_eq!(news.iter_mut().map(|n| n.len().unwrap()).sum::<usize>(), 2 * entries.len());
            let mut fired = Vec::new();
            for n in &mut news { n.drain_due_timers(TimeDomain::EventTime, i64::MAX, &mut fired).unwrap(); }
            prop_assert_eq!(fired.len(), entries.len());
            for (k, v) in &entries {
                let kg = key_group_of_bytes(&enc(k), MAX);
                let owner = crate::ids::subtask_for_key_group(kg, MAX, p2);
                prop_assert_eq!(news[owner.0].get(k, V, 0).unwrap(), Some(*v));
                prop_assert!(fired.contains(&(*v, *k)));
            }
        }
    }
}
