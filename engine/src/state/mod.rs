//! Keyed state scoped to the current key, stored per key group.
//!
//! State is kept as bytes: a state entry's key is
//! `len(name) | name | postcard(key) [| postcard(map key)]` and its value is the postcard
//! encoding of the user's value. Postcard encodings are self-delimiting, so the entries of
//! one key's map state are exactly the entries under the prefix `len(name) | name | key`.
//! Byte-level state makes snapshots, restores and re-partitioning by key group independent
//! of the user's types, and it is the layout the RocksDB backend uses on disk.
//!
//! Handles ([`ValueState`], [`MapState`]) are typed names, created in `const` context:
//! ```
//! use exactly_engine::state::{MapState, ValueState};
//! const BALANCE: ValueState<i64> = ValueState::new("balance");
//! const SEEN: MapState<u64, bool> = MapState::new("seen");
//! ```

#[cfg(feature = "rocksdb")]
pub mod rocks;

use crate::codec;
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, KeyGroup, KeyGroupRange, OperatorId};
use crate::manifest::SharedFile;
use crate::storage::CheckpointStorage;
use crate::time::{TimeDomain, Timestamp};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

/// State names are 1-255 bytes, so entries starting with 0 are free for timers.
const TIMER_MARK: u8 = 0;
/// Cleanup entries of values with a TTL: `[0, 'X', expiry, entry key]`.
const TTL_MARK: u8 = b'X';

fn domain_byte(d: TimeDomain) -> u8 {
    match d {
        TimeDomain::EventTime => b'E',
        TimeDomain::ProcessingTime => b'P',
    }
}

/// Order-preserving encoding of a signed timestamp.
fn ts_bytes(ts: Timestamp) -> [u8; 8] {
    ((ts as u64) ^ (1 << 63)).to_be_bytes()
}

/// The key range of entries `[0, kind, ts, ..]` with `ts <= upto`; the upper bound is
/// exclusive (the first possible entry of `upto + 1`).
fn due_range(kind: u8, upto: Timestamp) -> (Vec<u8>, Vec<u8>) {
    let lo = vec![TIMER_MARK, kind];
    let hi = match upto.checked_add(1) {
        Some(next) => {
            let mut hi = lo.clone();
            hi.extend_from_slice(&ts_bytes(next));
            hi
        }
        None => vec![TIMER_MARK, kind + 1],
    };
    (lo, hi)
}

fn decode_ts(b: &[u8]) -> Timestamp {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    (u64::from_be_bytes(a) ^ (1 << 63)) as i64
}

/// A single value per key.
pub struct ValueState<V> {
    name: &'static str,
    ttl_ms: Option<i64>,
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

    /// The state's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The time-to-live in milliseconds, if set.
    pub const fn ttl_ms(&self) -> Option<i64> {
        self.ttl_ms
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
            _v: PhantomData,
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

/// Snapshots of every operator of one task instance; the payload of a state file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskSnapshotPayload {
    /// One entry per stateful operator of the task.
    pub operators: Vec<(OperatorId, OperatorSnapshot)>,
}

/// The entries of one key group, shared copy-on-write between the live state and the
/// snapshots still being written.
pub type SharedGroup = Arc<BTreeMap<Vec<u8>, Vec<u8>>>;

/// A point-in-time view of one operator's state, taken at the barrier and completed
/// later, off the task thread: in-memory key groups are shared copy-on-write (O(key
/// groups) at the barrier) and encoded later; a RocksDB checkpoint directory is
/// uploaded later. Encodes to exactly the bytes of the equivalent [`OperatorSnapshot`]
/// (a map and a sequence of pairs share postcard's wire format), which is what restore
/// decodes.
#[derive(Debug, Default, Serialize)]
pub struct StateSnapshot {
    /// Keyed state per non-empty key group (in-memory backend).
    pub keyed: Vec<(KeyGroup, SharedGroup)>,
    /// Operator state entries.
    pub list: Vec<Vec<u8>>,
    /// The uploaded RocksDB checkpoint, once `pending_db` is uploaded.
    pub db: Option<DbSnapshot>,
    /// A local RocksDB checkpoint still to upload.
    #[serde(skip)]
    pub pending_db: Option<PendingDb>,
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

/// Which keyed state backend a job uses. Switching is one line of job configuration
/// ([`crate::dsl::JobBuilder::state_backend`]); a checkpoint written by either backend
/// restores into either.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
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
}

impl Default for RocksDbConfig {
    fn default() -> Self {
        RocksDbConfig {
            local_dir: None,
            write_buffer_size: 64 << 20,
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

/// The storage primitives both backends provide, per key group (by index in the
/// instance's range). Entry keys are the layout described in the module docs.
enum Store {
    Memory(Vec<SharedGroup>),
    #[cfg(feature = "rocksdb")]
    Rocks(Box<rocks::RocksStore>),
}

impl Store {
    fn get<R>(&mut self, g: usize, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        match self {
            Store::Memory(groups) => Ok(groups[g].get(key).map(|v| f(v))),
            #[cfg(feature = "rocksdb")]
            Store::Rocks(db) => db.get(g, key, f),
        }
    }

    /// Store `value` under `key`, reusing an existing entry's buffer in memory so that
    /// updating a key allocates nothing.
    fn put(&mut self, g: usize, key: &[u8], value: &[u8]) -> Result<()> {
        match self {
            Store::Memory(groups) => {
                let group = Arc::make_mut(&mut groups[g]);
                match group.get_mut(key) {
                    Some(existing) => {
                        existing.clear();
                        existing.extend_from_slice(value);
                    }
                    None => {
                        group.insert(key.to_vec(), value.to_vec());
                    }
                }
                Ok(())
            }
            #[cfg(feature = "rocksdb")]
            Store::Rocks(db) => db.put(g, key, value),
        }
    }

    /// Insert an empty marker entry unless present (timers).
    fn put_marker(&mut self, g: usize, key: &[u8]) -> Result<()> {
        match self {
            Store::Memory(groups) => {
                if !groups[g].contains_key(key) {
                    Arc::make_mut(&mut groups[g]).insert(key.to_vec(), Vec::new());
                }
                Ok(())
            }
            #[cfg(feature = "rocksdb")]
            Store::Rocks(db) => db.put(g, key, &[]),
        }
    }

    fn delete(&mut self, g: usize, key: &[u8]) -> Result<()> {
        match self {
            Store::Memory(groups) => {
                // Check first: removing through `make_mut` would copy a shared group.
                if groups[g].contains_key(key) {
                    Arc::make_mut(&mut groups[g]).remove(key);
                }
                Ok(())
            }
            #[cfg(feature = "rocksdb")]
            Store::Rocks(db) => db.delete(g, key),
        }
    }

    /// Call `f(entry key, value)` for every entry under `prefix`, in key order.
    fn scan_prefix(
        &mut self,
        g: usize,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        match self {
            Store::Memory(groups) => {
                for (k, v) in groups[g].range(prefix.to_vec()..) {
                    if !k.starts_with(prefix) {
                        break;
                    }
                    f(k, v)?;
                }
                Ok(())
            }
            #[cfg(feature = "rocksdb")]
            Store::Rocks(db) => db.scan_prefix(g, prefix, f),
        }
    }

    /// Remove every entry with a key in `[lo, hi)` and append the keys to `out`.
    fn take_range(&mut self, g: usize, lo: &[u8], hi: &[u8], out: &mut Vec<Vec<u8>>) -> Result<()> {
        match self {
            Store::Memory(groups) => {
                let first = out.len();
                out.extend(
                    groups[g]
                        .range(lo.to_vec()..hi.to_vec())
                        .map(|(k, _)| k.clone()),
                );
                if out.len() > first {
                    let group = Arc::make_mut(&mut groups[g]);
                    for k in &out[first..] {
                        group.remove(k);
                    }
                }
                Ok(())
            }
            #[cfg(feature = "rocksdb")]
            Store::Rocks(db) => db.take_range(g, lo, hi, out),
        }
    }

    fn delete_prefix(&mut self, g: usize, prefix: &[u8]) -> Result<()> {
        let mut doomed = Vec::new();
        self.scan_prefix(g, prefix, |k, _| {
            doomed.push(k.to_vec());
            Ok(())
        })?;
        for k in doomed {
            self.delete(g, &k)?;
        }
        Ok(())
    }
}

/// Keyed state of one operator instance, scoped to the current key: an ordered map per
/// key group in memory, or a RocksDB instance (see [`StateBackend`]).
///
/// In memory, key groups are shared copy-on-write with snapshots: taking a snapshot
/// clones `Arc`s, and a group is copied only when it is written while a snapshot that
/// still holds it is being uploaded.
///
/// Operations that cannot report an error in their signature (timer registration,
/// clearing) record a backend failure instead; the operator reports it right after the
/// record or timer that caused it, and the job restarts from its last checkpoint.
pub struct KeyedState {
    range: KeyGroupRange,
    store: Store,
    /// The current key's key group (index in `range`) and encoded key.
    current_group: usize,
    current_key: Vec<u8>,
    scratch: Vec<u8>,
    value_buf: Vec<u8>,
    failure: Option<Error>,
}

impl std::fmt::Debug for KeyedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedState")
            .field("range", &self.range)
            .field(
                "backend",
                &match self.store {
                    Store::Memory(_) => "memory",
                    #[cfg(feature = "rocksdb")]
                    Store::Rocks(_) => "rocksdb",
                },
            )
            .finish()
    }
}

impl KeyedState {
    /// Empty in-memory state for the key groups in `range`.
    pub fn in_memory(range: KeyGroupRange) -> Self {
        Self::with_store(
            range,
            Store::Memory((0..range.len()).map(|_| SharedGroup::default()).collect()),
        )
    }

    fn with_store(range: KeyGroupRange, store: Store) -> Self {
        KeyedState {
            range,
            store,
            current_group: 0,
            current_key: Vec::new(),
            scratch: Vec::new(),
            value_buf: Vec::new(),
            failure: None,
        }
    }

    /// State for operator instance `operator`/`subtask` owning `range` on the
    /// configured backend, restored from `snapshots` (taken at any parallelism, by
    /// either backend).
    pub fn open(
        range: KeyGroupRange,
        operator: &OperatorId,
        subtask: crate::ids::SubtaskIndex,
        env: &BackendEnv,
        snapshots: &[OperatorSnapshot],
    ) -> Result<Self> {
        match &env.backend {
            StateBackend::Memory => {
                let mut s = Self::in_memory(range);
                s.restore(snapshots, Some(env))?;
                Ok(s)
            }
            #[cfg(feature = "rocksdb")]
            StateBackend::RocksDb(cfg) => {
                let store = rocks::RocksStore::open(range, operator, subtask, cfg, env, snapshots)?;
                Ok(Self::with_store(range, Store::Rocks(Box::new(store))))
            }
            #[cfg(not(feature = "rocksdb"))]
            StateBackend::RocksDb(_) => {
                let _ = (operator, subtask);
                Err(rocksdb_missing())
            }
        }
    }

    /// The key groups this instance owns.
    pub fn range(&self) -> KeyGroupRange {
        self.range
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

    /// Make `encoded_key` (in key group `kg`) the current key.
    pub fn set_current_key(&mut self, kg: KeyGroup, encoded_key: &[u8]) {
        debug_assert!(
            self.range.contains(kg),
            "key group {kg:?} outside {:?}",
            self.range
        );
        self.current_group = (kg.0 - self.range.start) as usize;
        self.current_key.clear();
        self.current_key.extend_from_slice(encoded_key);
    }

    fn entry_key(&mut self, name: &str) {
        self.scratch.clear();
        self.scratch.push(name.len() as u8);
        self.scratch.extend_from_slice(name.as_bytes());
        self.scratch.extend_from_slice(&self.current_key);
    }

    /// The current key's value.
    pub fn get<V: DeserializeOwned>(&mut self, s: ValueState<V>) -> Result<Option<V>> {
        self.entry_key(s.name);
        self.store
            .get(self.current_group, &self.scratch, |b| {
                codec::decode(b, s.name)
            })?
            .transpose()
    }

    /// Set the current key's value.
    pub fn put<V: Serialize>(&mut self, s: ValueState<V>, value: &V) -> Result<()> {
        self.entry_key(s.name);
        self.value_buf.clear();
        codec::encode_into(value, &mut self.value_buf, s.name)?;
        self.store
            .put(self.current_group, &self.scratch, &self.value_buf)
    }

    /// Remove the current key's value.
    pub fn clear<V>(&mut self, s: ValueState<V>) {
        self.entry_key(s.name);
        let r = self.store.delete(self.current_group, &self.scratch);
        self.record(r);
    }

    fn map_entry_key<UK: Serialize>(&mut self, name: &str, uk: &UK) -> Result<()> {
        self.entry_key(name);
        codec::encode_into(uk, &mut self.scratch, name)
    }

    /// One entry of the current key's map.
    pub fn map_get<UK: Serialize, UV: DeserializeOwned>(
        &mut self,
        s: MapState<UK, UV>,
        uk: &UK,
    ) -> Result<Option<UV>> {
        self.map_entry_key(s.name, uk)?;
        self.store
            .get(self.current_group, &self.scratch, |b| {
                codec::decode(b, s.name)
            })?
            .transpose()
    }

    /// Set one entry of the current key's map.
    pub fn map_put<UK: Serialize, UV: Serialize>(
        &mut self,
        s: MapState<UK, UV>,
        uk: &UK,
        value: &UV,
    ) -> Result<()> {
        self.map_entry_key(s.name, uk)?;
        self.value_buf.clear();
        codec::encode_into(value, &mut self.value_buf, s.name)?;
        self.store
            .put(self.current_group, &self.scratch, &self.value_buf)
    }

    /// Remove one entry of the current key's map.
    pub fn map_remove<UK: Serialize, UV>(&mut self, s: MapState<UK, UV>, uk: &UK) -> Result<()> {
        self.map_entry_key(s.name, uk)?;
        self.store.delete(self.current_group, &self.scratch)
    }

    /// All entries of the current key's map, ordered by encoded map key.
    pub fn map_entries<UK: DeserializeOwned, UV: DeserializeOwned>(
        &mut self,
        s: MapState<UK, UV>,
    ) -> Result<Vec<(UK, UV)>> {
        self.entry_key(s.name);
        let plen = self.scratch.len();
        let mut out = Vec::new();
        self.store
            .scan_prefix(self.current_group, &self.scratch, |k, v| {
                out.push((
                    codec::decode(&k[plen..], s.name)?,
                    codec::decode(v, s.name)?,
                ));
                Ok(())
            })?;
        Ok(out)
    }

    /// Remove every entry of the current key's map.
    pub fn map_clear<UK, UV>(&mut self, s: MapState<UK, UV>) {
        self.entry_key(s.name);
        let r = self.store.delete_prefix(self.current_group, &self.scratch);
        self.record(r);
    }

    fn timer_entry(&mut self, domain: TimeDomain, ts: Timestamp) {
        self.scratch.clear();
        self.scratch.push(TIMER_MARK);
        self.scratch.push(domain_byte(domain));
        self.scratch.extend_from_slice(&ts_bytes(ts));
        self.scratch.extend_from_slice(&self.current_key);
    }

    /// Register a timer for the current key (idempotent).
    pub fn register_timer(&mut self, domain: TimeDomain, ts: Timestamp) {
        self.timer_entry(domain, ts);
        let r = self.store.put_marker(self.current_group, &self.scratch);
        self.record(r);
    }

    /// Delete a timer of the current key, if registered.
    pub fn delete_timer(&mut self, domain: TimeDomain, ts: Timestamp) {
        self.timer_entry(domain, ts);
        let r = self.store.delete(self.current_group, &self.scratch);
        self.record(r);
    }

    /// Remove and return every timer of `domain` due at `upto`, as
    /// `(key group, time, encoded key)`, in time order within each key group.
    pub fn drain_due_timers(
        &mut self,
        domain: TimeDomain,
        upto: Timestamp,
        out: &mut Vec<(KeyGroup, Timestamp, Vec<u8>)>,
    ) -> Result<()> {
        let start = self.range.start;
        for (i, k) in self.drain_due(domain_byte(domain), upto)? {
            out.push((
                KeyGroup(start + i as u16),
                decode_ts(&k[2..10]),
                k[10..].to_vec(),
            ));
        }
        Ok(())
    }

    /// `[0, 'X', expiry, entry key]` for the entry key in `self.scratch`.
    fn ttl_timer(&self, expires: Timestamp) -> Vec<u8> {
        let mut k = Vec::with_capacity(10 + self.scratch.len());
        k.push(TIMER_MARK);
        k.push(TTL_MARK);
        k.extend_from_slice(&ts_bytes(expires));
        k.extend_from_slice(&self.scratch);
        k
    }

    /// The current key's value of a state with a TTL, `None` once expired at `now`.
    pub fn get_ttl<V: DeserializeOwned>(
        &mut self,
        s: ValueState<V>,
        now: Timestamp,
    ) -> Result<Option<V>> {
        self.entry_key(s.name);
        let found = self.store.get(self.current_group, &self.scratch, |b| {
            if b.len() < 8 || decode_ts(&b[..8]) <= now {
                None
            } else {
                Some(codec::decode(&b[8..], s.name))
            }
        })?;
        found.flatten().transpose()
    }

    /// Set the current key's value of a state with a TTL, expiring `ttl` after `now`.
    pub fn put_ttl<V: Serialize>(
        &mut self,
        s: ValueState<V>,
        value: &V,
        now: Timestamp,
    ) -> Result<()> {
        let ttl = s.ttl_ms.unwrap_or(i64::MAX);
        let expires = now.saturating_add(ttl);
        self.remove_ttl(s)?;
        self.entry_key(s.name);
        self.value_buf.clear();
        self.value_buf.extend_from_slice(&ts_bytes(expires));
        codec::encode_into(value, &mut self.value_buf, s.name)?;
        let timer = self.ttl_timer(expires);
        let g = self.current_group;
        self.store.put(g, &self.scratch, &self.value_buf)?;
        self.store.put_marker(g, &timer)
    }

    /// Remove the current key's value of a state with a TTL, and its cleanup entry.
    pub fn clear_ttl<V>(&mut self, s: ValueState<V>) {
        let r = self.remove_ttl(s);
        self.record(r);
    }

    fn remove_ttl<V>(&mut self, s: ValueState<V>) -> Result<()> {
        self.entry_key(s.name);
        let g = self.current_group;
        let old = self
            .store
            .get(g, &self.scratch, |b| {
                (b.len() >= 8).then(|| decode_ts(&b[..8]))
            })?
            .flatten();
        if let Some(old) = old {
            let timer = self.ttl_timer(old);
            self.store.delete(g, &timer)?;
            self.store.delete(g, &self.scratch)?;
        }
        Ok(())
    }

    /// Delete every value whose TTL expired at `now`; returns how many.
    pub fn expire_ttl(&mut self, now: Timestamp) -> Result<usize> {
        let mut expired = 0;
        for (g, k) in self.drain_due(TTL_MARK, now)? {
            let entry = &k[10..];
            // Only delete the value if this cleanup entry is its current expiry.
            let current = self
                .store
                .get(g, entry, |v| v.len() >= 8 && v[..8] == k[2..10])?
                .unwrap_or(false);
            if current {
                self.store.delete(g, entry)?;
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// Remove every reserved entry `[0, kind, ts, ..]` with `ts <= upto` from every key
    /// group; returns `(group index, removed entry key)` pairs.
    fn drain_due(&mut self, kind: u8, upto: Timestamp) -> Result<Vec<(usize, Vec<u8>)>> {
        let (lo, hi) = due_range(kind, upto);
        let mut out = Vec::new();
        let mut keys = Vec::new();
        for g in 0..self.range.len() {
            self.store.take_range(g, &lo, &hi, &mut keys)?;
            out.extend(keys.drain(..).map(|k| (g, k)));
        }
        Ok(out)
    }

    /// Number of entries over all key groups (a full scan with RocksDB).
    pub fn len(&mut self) -> Result<usize> {
        match &mut self.store {
            Store::Memory(groups) => Ok(groups.iter().map(|g| g.len()).sum()),
            #[cfg(feature = "rocksdb")]
            Store::Rocks(db) => db.count(),
        }
    }

    /// Whether no entry is stored.
    pub fn is_empty(&mut self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// A point-in-time view of the keyed state for checkpoint `id`: in memory every
    /// non-empty key group, shared (O(key groups), no copy); with RocksDB a local
    /// checkpoint (a memtable flush and hard links), uploaded later.
    pub fn snapshot(&mut self, id: CheckpointId) -> Result<StateSnapshot> {
        let _ = id;
        match &mut self.store {
            Store::Memory(groups) => Ok(StateSnapshot {
                keyed: groups
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| !g.is_empty())
                    .map(|(i, g)| (KeyGroup(self.range.start + i as u16), g.clone()))
                    .collect(),
                ..Default::default()
            }),
            #[cfg(feature = "rocksdb")]
            Store::Rocks(db) => Ok(StateSnapshot {
                pending_db: Some(db.checkpoint(id)?),
                ..Default::default()
            }),
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
        let range = self.range;
        for snap in snapshots {
            for (kg, entries) in &snap.keyed {
                if range.contains(*kg) {
                    let g = (kg.0 - range.start) as usize;
                    for (k, v) in entries {
                        self.store.put(g, k, v)?;
                    }
                }
            }
            if let Some(db) = &snap.db {
                if db.range.start >= range.end || db.range.end <= range.start {
                    continue;
                }
                #[cfg(feature = "rocksdb")]
                {
                    let env = env.ok_or_else(|| {
                        Error::config("restoring a RocksDB snapshot needs checkpoint storage")
                    })?;
                    let store = &mut self.store;
                    rocks::read_snapshot(db, range, env, |kg, k, v| {
                        store.put((kg.0 - range.start) as usize, k, v)
                    })?;
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
}

#[cfg(not(feature = "rocksdb"))]
fn rocksdb_missing() -> Error {
    Error::config(
        "the RocksDB state backend (or a checkpoint written by it) needs the `rocksdb` cargo feature of exactly-engine",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{key_group_of_bytes, SubtaskIndex};
    use proptest::prelude::*;

    const V: ValueState<i64> = ValueState::new("v");
    const M: MapState<String, u32> = MapState::new("m");

    fn full() -> KeyedState {
        KeyedState::in_memory(KeyGroupRange { start: 0, end: 128 })
    }

    fn key(s: &mut KeyedState, k: u64) {
        let enc = codec::encode(&k, "k").unwrap();
        s.set_current_key(key_group_of_bytes(&enc, 128), &enc);
    }

    #[test]
    fn timers_fire_in_time_order_once_and_survive_rescale() {
        let mut s = full();
        for (k, ts) in [(1u64, 30), (1, 10), (2, -5), (3, 20), (1, 10), (4, 11)] {
            key(&mut s, k);
            s.register_timer(TimeDomain::EventTime, ts);
        }
        key(&mut s, 3);
        s.delete_timer(TimeDomain::EventTime, 20);
        key(&mut s, 2);
        s.register_timer(TimeDomain::ProcessingTime, 0);
        let mut out = Vec::new();
        s.drain_due_timers(TimeDomain::EventTime, 10, &mut out)
            .unwrap();
        let mut fired: Vec<(Timestamp, u64)> = out
            .iter()
            .map(|(_, t, k)| (*t, codec::decode(k, "k").unwrap()))
            .collect();
        fired.sort();
        assert_eq!(fired, vec![(-5, 2), (10, 1)]);
        out.clear();
        s.drain_due_timers(TimeDomain::EventTime, 10, &mut out)
            .unwrap();
        assert!(out.is_empty(), "fired timers are gone");
        // The remaining timers move with their key groups on rescale.
        let view = s.snapshot(CheckpointId(1)).unwrap();
        let snap: OperatorSnapshot =
            codec::decode(&codec::encode(&view, "t").unwrap(), "t").unwrap();
        let mut a = KeyedState::in_memory(KeyGroupRange { start: 0, end: 64 });
        let mut b = KeyedState::in_memory(KeyGroupRange {
            start: 64,
            end: 128,
        });
        a.restore(std::slice::from_ref(&snap), None).unwrap();
        b.restore(std::slice::from_ref(&snap), None).unwrap();
        out.clear();
        a.drain_due_timers(TimeDomain::EventTime, i64::MAX, &mut out)
            .unwrap();
        b.drain_due_timers(TimeDomain::EventTime, i64::MAX, &mut out)
            .unwrap();
        let mut rest: Vec<(Timestamp, u64)> = out
            .iter()
            .map(|(_, t, k)| (*t, codec::decode(k, "k").unwrap()))
            .collect();
        rest.sort();
        assert_eq!(rest, vec![(11, 4), (30, 1)]);
        out.clear();
        a.drain_due_timers(TimeDomain::ProcessingTime, 0, &mut out)
            .unwrap();
        b.drain_due_timers(TimeDomain::ProcessingTime, 0, &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn snapshot_is_isolated_from_later_writes() {
        let mut s = full();
        key(&mut s, 1);
        s.put(V, &1).unwrap();
        let mut view = s.snapshot(CheckpointId(1)).unwrap();
        view.list = vec![b"x".to_vec()];
        let before = codec::encode(&view, "t").unwrap();
        s.put(V, &2).unwrap();
        key(&mut s, 2);
        s.put(V, &3).unwrap();
        assert_eq!(
            codec::encode(&view, "t").unwrap(),
            before,
            "the view must not see later writes"
        );
        let back: OperatorSnapshot = codec::decode(&before, "t").unwrap();
        assert_eq!(back.list, vec![b"x".to_vec()]);
        assert_eq!(back.keyed.iter().map(|(_, e)| e.len()).sum::<usize>(), 1);
    }

    #[test]
    fn values_and_maps_are_scoped_to_the_current_key() {
        let mut s = full();
        key(&mut s, 1);
        s.put(V, &10).unwrap();
        s.map_put(M, &"a".to_string(), &1).unwrap();
        s.map_put(M, &"b".to_string(), &2).unwrap();
        key(&mut s, 2);
        assert_eq!(s.get(V).unwrap(), None);
        assert!(s.map_entries(M).unwrap().is_empty());
        s.map_put(M, &"a".to_string(), &9).unwrap();
        key(&mut s, 1);
        assert_eq!(s.get(V).unwrap(), Some(10));
        assert_eq!(
            s.map_entries(M).unwrap(),
            vec![("a".to_string(), 1), ("b".to_string(), 2)]
        );
        s.map_remove(M, &"a".to_string()).unwrap();
        assert_eq!(s.map_get(M, &"a".to_string()).unwrap(), None);
        s.map_clear(M);
        assert!(s.map_entries(M).unwrap().is_empty());
        key(&mut s, 2);
        assert_eq!(s.map_get(M, &"a".to_string()).unwrap(), Some(9));
        s.clear(V);
    }

    proptest! {
        /// Snapshot at parallelism `p1`, restore at `p2`: every key sees the same values.
        #[test]
        fn rescale_round_trip(entries in proptest::collection::btree_map(any::<u64>(), any::<i64>(), 0..200), p1 in 1usize..5, p2 in 1usize..5) {
            let max = 128u16;
            let mut olds: Vec<KeyedState> = (0..p1)
                .map(|i| KeyedState::in_memory(KeyGroupRange::for_subtask(max, p1, SubtaskIndex(i))))
                .collect();
            for (k, v) in &entries {
                let enc = codec::encode(k, "k").unwrap();
                let kg = key_group_of_bytes(&enc, max);
                let owner = crate::ids::subtask_for_key_group(kg, max, p1);
                olds[owner.0].set_current_key(kg, &enc);
                olds[owner.0].put(V, v).unwrap();
            }
            // Through the real encoding: a view is written, an OperatorSnapshot is read.
            let snaps: Vec<OperatorSnapshot> = olds
                .iter_mut()
                .map(|s| codec::decode(&codec::encode(&s.snapshot(CheckpointId(1)).unwrap(), "t").unwrap(), "t").unwrap())
                .collect();
            let mut news: Vec<KeyedState> = (0..p2)
                .map(|i| KeyedState::in_memory(KeyGroupRange::for_subtask(max, p2, SubtaskIndex(i))))
                .collect();
            for n in &mut news { n.restore(&snaps, None).unwrap(); }
            prop_assert_eq!(news.iter_mut().map(|n| n.len().unwrap()).sum::<usize>(), entries.len());
            for (k, v) in &entries {
                let enc = codec::encode(k, "k").unwrap();
                let kg = key_group_of_bytes(&enc, max);
                let owner = crate::ids::subtask_for_key_group(kg, max, p2);
                news[owner.0].set_current_key(kg, &enc);
                prop_assert_eq!(news[owner.0].get(V).unwrap(), Some(*v));
            }
        }
    }
}
