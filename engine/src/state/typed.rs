//! The in-memory backend: typed tables per state, no encoding on the record path.
//!
//! Each state an operator uses gets its own table of the user's key and value types,
//! created on first access (names are matched by pointer first, so a lookup is a few
//! comparisons). Value state is a [`CowTable`] of `K -> V`; a value with a TTL also
//! carries its expiry and sits in an expiry queue; map state is a table of `K -> small
//! vector of (map key, value)`, which is what per-key iteration and the small per-key
//! maps of windows and joins want. Timers live in the [`TimerService`].
//!
//! Bytes appear only at the snapshot boundary: a snapshot shares the tables (O(segments)
//! at the barrier) and is encoded off the task thread into the layout of
//! [`super::layout`], the same bytes the RocksDB backend stores, so either backend
//! restores the other's checkpoints at any parallelism. A restored checkpoint is kept as
//! bytes per state until the state is first used with its types, and written back
//! unchanged if it never is.

use super::layout::{self, classify, mark, EntryKind, GroupWriter, TTL_MARK};
use super::table::{hash_of, hasher, CowTable, FixedHasher, PrefetchHints, Segment};
use super::timers::{TimerService, TimersView};
use super::types::{Declared, Restore, StateTypes};
use super::{MapState, StateValue, ValueState};
use crate::api::Key;
use crate::codec;
use crate::error::{Error, Result};
use crate::ids::{key_group_of_bytes, KeyGroup, KeyGroupRange};
use crate::time::Timestamp;
use std::any::TypeId;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// One state's live table.
pub(crate) trait StateTable<K>: Send {
    /// A point-in-time view of the table, cheap to take (shared segments).
    fn share(&self) -> Box<dyn TableView>;
    /// Delete values whose TTL expired at `now`; returns how many.
    fn expire(&mut self, _now: Timestamp) -> usize {
        0
    }
    /// Entries held, counted as the byte layout counts them.
    fn entries(&self) -> usize;
    /// Where the table's buckets are, to prefetch a key's.
    fn hints(&self) -> Arc<PrefetchHints>;
}

/// A table as of a barrier, written to bytes off the task thread. Consumed as it is
/// written, so segments are released as early as possible.
pub(crate) trait TableView: Send + Sync {
    fn encode(self: Box<Self>, max_parallelism: u16, w: &mut GroupWriter) -> Result<()>;
}

/// Encode a key into `buf` (cleared) and return its key group.
fn key_bytes<K: Key>(k: &K, buf: &mut Vec<u8>, max: u16) -> Result<KeyGroup> {
    buf.clear();
    codec::encode_into(k, buf, "state key")?;
    Ok(key_group_of_bytes(buf, max))
}

fn decode_err(state: &str, e: impl std::fmt::Display) -> Error {
    Error::Codec {
        what: format!("restored entry of state '{state}'"),
        message: e.to_string(),
    }
}

/// Restored entries of one state, not yet decoded into its types.
#[derive(Debug, Clone, Default)]
pub(crate) struct Pending {
    prefix: Vec<u8>,
    /// `(key group, postcard(key) [| postcard(map key)], value)`.
    entries: Vec<(KeyGroup, Vec<u8>, Vec<u8>)>,
    /// TTL cleanup entries: `(key group, entry key)`.
    cleanup: Vec<(KeyGroup, Vec<u8>)>,
}

struct PendingView(Arc<Pending>);

impl TableView for PendingView {
    fn encode(self: Box<Self>, _max: u16, w: &mut GroupWriter) -> Result<()> {
        let p = &*self.0;
        for (kg, rest, v) in &p.entries {
            w.push(*kg, &[&p.prefix, rest], v);
        }
        for (kg, k) in &p.cleanup {
            w.push(*kg, &[k], &[]);
        }
        Ok(())
    }
}

// ---- value state ----

pub(crate) struct ValueTable<K, V> {
    prefix: Arc<[u8]>,
    pub table: CowTable<K, V>,
}

impl<K: Key, V: StateValue> ValueTable<K, V> {
    fn open(
        name: &'static str,
        pending: Option<Arc<Pending>>,
        value: impl Fn(&[u8]) -> Result<V>,
    ) -> Result<Self> {
        let mut table = CowTable::default();
        for (_, rest, v) in pending.iter().flat_map(|p| &p.entries) {
            let k: K = postcard::from_bytes(rest).map_err(|e| decode_err(name, e))?;
            table.insert(&k, value(v)?);
        }
        Ok(ValueTable {
            prefix: layout::name_prefix(name).into(),
            table,
        })
    }
}

impl<K: Key, V: StateValue> StateTable<K> for ValueTable<K, V> {
    fn hints(&self) -> Arc<PrefetchHints> {
        self.table.hints()
    }
    fn share(&self) -> Box<dyn TableView> {
        Box::new(ValueView {
            prefix: self.prefix.clone(),
            segs: self.table.share(),
        })
    }
    fn entries(&self) -> usize {
        self.table.len()
    }
}

struct ValueView<K, V> {
    prefix: Arc<[u8]>,
    segs: Vec<Segment<K, V>>,
}

impl<K: Key, V: StateValue> TableView for ValueView<K, V> {
    fn encode(self: Box<Self>, max: u16, w: &mut GroupWriter) -> Result<()> {
        let (mut key, mut value) = (Vec::new(), Vec::new());
        for seg in self.segs {
            for (k, v) in seg.iter() {
                let kg = key_bytes(k, &mut key, max)?;
                value.clear();
                codec::encode_into(v, &mut value, "state value")?;
                w.push(kg, &[&self.prefix, &key], &value);
            }
        }
        Ok(())
    }
}

// ---- value state with a TTL ----

type Keys<K> = hashbrown::HashSet<K, FixedHasher>;

pub(crate) struct TtlTable<K, V> {
    prefix: Arc<[u8]>,
    table: CowTable<K, (Timestamp, V)>,
    /// Keys by expiry; exact (a rewrite moves the key), so expiring is O(expired).
    queue: BTreeMap<Timestamp, Keys<K>>,
}

impl<K: Key, V: StateValue> TtlTable<K, V> {
    fn open(
        name: &'static str,
        pending: Option<Arc<Pending>>,
        value: impl Fn(&[u8]) -> Result<V>,
    ) -> Result<Self> {
        let mut t = TtlTable {
            prefix: layout::name_prefix(name).into(),
            table: CowTable::default(),
            queue: BTreeMap::new(),
        };
        for (_, rest, v) in pending.iter().flat_map(|p| &p.entries) {
            if v.len() < 8 {
                return Err(decode_err(name, "a value with a TTL lacks its expiry"));
            }
            let k: K = postcard::from_bytes(rest).map_err(|e| decode_err(name, e))?;
            t.set(&k, layout::decode_ts(v), value(&v[8..])?);
        }
        Ok(t)
    }

    pub fn get(&self, k: &K, now: Timestamp) -> Option<&V> {
        self.table
            .get(k)
            .filter(|(expires, _)| *expires > now)
            .map(|(_, v)| v)
    }

    pub fn set(&mut self, k: &K, expires: Timestamp, v: V) {
        if let Some((old, _)) = self.table.insert(k, (expires, v)) {
            self.unqueue(old, k);
        }
        self.queue
            .entry(expires)
            .or_insert_with(|| Keys::with_hasher(hasher()))
            .insert(k.clone());
    }

    pub fn clear(&mut self, k: &K) {
        if let Some((old, _)) = self.table.remove(k) {
            self.unqueue(old, k);
        }
    }

    fn unqueue(&mut self, expires: Timestamp, k: &K) {
        if let Some(keys) = self.queue.get_mut(&expires) {
            keys.remove(k);
            if keys.is_empty() {
                self.queue.remove(&expires);
            }
        }
    }
}

impl<K: Key, V: StateValue> StateTable<K> for TtlTable<K, V> {
    fn hints(&self) -> Arc<PrefetchHints> {
        self.table.hints()
    }
    fn share(&self) -> Box<dyn TableView> {
        Box::new(TtlView {
            prefix: self.prefix.clone(),
            segs: self.table.share(),
        })
    }

    fn expire(&mut self, now: Timestamp) -> usize {
        let mut n = 0;
        while let Some(first) = self.queue.first_entry() {
            if *first.key() > now {
                break;
            }
            for k in first.remove() {
                self.table.remove(&k);
                n += 1;
            }
        }
        n
    }

    fn entries(&self) -> usize {
        // A value and its cleanup entry, as stored in the byte layout.
        2 * self.table.len()
    }
}

struct TtlView<K, V> {
    prefix: Arc<[u8]>,
    segs: Vec<Segment<K, (Timestamp, V)>>,
}

impl<K: Key, V: StateValue> TableView for TtlView<K, V> {
    fn encode(self: Box<Self>, max: u16, w: &mut GroupWriter) -> Result<()> {
        let (mut key, mut value) = (Vec::new(), Vec::new());
        for seg in self.segs {
            for (k, (expires, v)) in seg.iter() {
                let kg = key_bytes(k, &mut key, max)?;
                value.clear();
                value.extend_from_slice(&layout::ts_bytes(*expires));
                codec::encode_into(v, &mut value, "state value")?;
                w.push(kg, &[&self.prefix, &key], &value);
                w.push(kg, &[&mark(TTL_MARK, *expires), &self.prefix, &key], &[]);
            }
        }
        Ok(())
    }
}

// ---- map state ----

/// The map of one key: few entries in the common case (windows, join buffers), so a
/// vector in insertion order, with room for two entries inside the table's bucket: a
/// key with one window, or with the next window open before the previous one fired,
/// costs no allocation of its own (with room for one, most keys of a tumbling window
/// moved to the heap and back at every window end: about a fifth of the window
/// benchmark's CPU time was malloc and free). Point access is linear in the key's
/// entries.
pub(crate) type KeyMap<UK, UV> = smallvec::SmallVec<[(UK, UV); 2]>;

/// Move a key's map that spilled to the heap back into its bucket once it fits again.
/// Otherwise a key that once held more entries (sliding windows, a burst of late
/// windows) keeps a heap buffer for good, and every checkpoint's copy-on-write segment
/// copy allocates a new one and frees the old.
#[inline]
fn inline_again<UK, UV>(m: &mut KeyMap<UK, UV>) {
    if m.spilled() && m.len() <= m.inline_size() {
        m.shrink_to_fit();
    }
}

pub(crate) struct MapTable<K, UK, UV> {
    prefix: Arc<[u8]>,
    pub table: CowTable<K, KeyMap<UK, UV>>,
    entries: usize,
}

impl<K: Key, UK: StateValue + Eq, UV: StateValue> MapTable<K, UK, UV> {
    fn open(
        name: &'static str,
        pending: Option<Arc<Pending>>,
        value: impl Fn(&[u8]) -> Result<UV>,
    ) -> Result<Self> {
        let mut t = MapTable {
            prefix: layout::name_prefix(name).into(),
            table: CowTable::default(),
            entries: 0,
        };
        for (_, rest, v) in pending.iter().flat_map(|p| &p.entries) {
            let (k, tail): (K, &[u8]) =
                postcard::take_from_bytes(rest).map_err(|e| decode_err(name, e))?;
            let uk: UK = postcard::from_bytes(tail).map_err(|e| decode_err(name, e))?;
            t.put(&k, &uk, value(v)?);
        }
        Ok(t)
    }

    pub fn get(&self, k: &K, uk: &UK) -> Option<&UV> {
        self.table
            .get(k)?
            .iter()
            .find(|(x, _)| x == uk)
            .map(|(_, v)| v)
    }

    pub fn put(&mut self, k: &K, uk: &UK, uv: UV) {
        let m = self.table.upsert(k, KeyMap::new);
        match m.iter_mut().find(|(x, _)| x == uk) {
            Some(e) => e.1 = uv,
            None => {
                m.push((uk.clone(), uv));
                self.entries += 1;
            }
        }
    }

    /// Change one entry in place (created with `init` if absent): one probe.
    #[inline]
    pub fn update<R>(
        &mut self,
        k: &K,
        uk: &UK,
        init: impl FnOnce() -> UV,
        f: impl FnOnce(&mut UV) -> R,
    ) -> R {
        let m = self.table.upsert(k, KeyMap::new);
        let i = match m.iter().position(|(x, _)| x == uk) {
            Some(i) => i,
            None => {
                m.push((uk.clone(), init()));
                self.entries += 1;
                m.len() - 1
            }
        };
        f(&mut m[i].1)
    }

    /// Visit every entry of `k`'s map in order, keeping those for which `f` returns
    /// true (changes `f` makes to them are kept too).
    #[inline]
    pub fn retain(&mut self, k: &K, mut f: impl FnMut(&UK, &mut UV) -> bool) {
        let Some(m) = self.table.get_mut(k) else {
            return;
        };
        let before = m.len();
        m.retain(|(uk, uv)| f(uk, uv));
        inline_again(m);
        let emptied = m.is_empty();
        self.entries -= before - m.len();
        if emptied {
            self.table.remove(k);
        }
    }

    /// [`Self::retain`] over every key's map, in memory order.
    pub fn retain_all(&mut self, mut f: impl FnMut(&K, &UK, &mut UV) -> bool) {
        let mut removed = 0;
        self.table.retain_all(|k, m| {
            let before = m.len();
            m.retain(|(uk, uv)| f(k, uk, uv));
            inline_again(m);
            removed += before - m.len();
            !m.is_empty()
        });
        self.entries -= removed;
    }

    pub fn remove(&mut self, k: &K, uk: &UK) {
        let present = self
            .table
            .get(k)
            .and_then(|m| m.iter().position(|(x, _)| x == uk));
        let Some(i) = present else {
            return;
        };
        let Some(m) = self.table.get_mut(k) else {
            return;
        };
        m.remove(i);
        inline_again(m);
        self.entries -= 1;
        if m.is_empty() {
            self.table.remove(k);
        }
    }

    pub fn clear(&mut self, k: &K) {
        if let Some(m) = self.table.remove(k) {
            self.entries -= m.len();
        }
    }
}

impl<K: Key, UK: StateValue + Eq, UV: StateValue> StateTable<K> for MapTable<K, UK, UV> {
    fn hints(&self) -> Arc<PrefetchHints> {
        self.table.hints()
    }
    fn share(&self) -> Box<dyn TableView> {
        Box::new(MapView {
            prefix: self.prefix.clone(),
            segs: self.table.share(),
        })
    }
    fn entries(&self) -> usize {
        self.entries
    }
}

struct MapView<K, UK, UV> {
    prefix: Arc<[u8]>,
    segs: Vec<Segment<K, KeyMap<UK, UV>>>,
}

impl<K: Key, UK: StateValue, UV: StateValue> TableView for MapView<K, UK, UV> {
    fn encode(self: Box<Self>, max: u16, w: &mut GroupWriter) -> Result<()> {
        let (mut key, mut value) = (Vec::new(), Vec::new());
        for seg in self.segs {
            for (k, m) in seg.iter() {
                let kg = key_bytes(k, &mut key, max)?;
                let key_len = key.len();
                for (uk, uv) in m {
                    key.truncate(key_len);
                    codec::encode_into(uk, &mut key, "map key")?;
                    value.clear();
                    codec::encode_into(uv, &mut value, "state value")?;
                    w.push(kg, &[&self.prefix, &key], &value);
                }
            }
        }
        Ok(())
    }
}

impl<K: Key> TableView for TimersView<K> {
    fn encode(self: Box<Self>, max: u16, w: &mut GroupWriter) -> Result<()> {
        TimersView::encode(&self, max, w)
    }
}

// ---- the backend ----

struct Slot<K> {
    name: &'static str,
    type_id: TypeId,
    table: Box<dyn StateTable<K>>,
    hints: Arc<PrefetchHints>,
}

/// Keyed state of one operator instance in memory.
pub(crate) struct TypedState<K> {
    range: KeyGroupRange,
    max_parallelism: u16,
    slots: Vec<Slot<K>>,
    pub timers: TimerService<K>,
    pending: HashMap<Vec<u8>, Arc<Pending>>,
    pub types: StateTypes,
    /// Scratch for encoding a key to find its key group.
    key_buf: Vec<u8>,
    /// Bytes the last snapshot encoded, so the next one sizes its buffers once instead
    /// of growing (and copying) them.
    encoded: Arc<AtomicUsize>,
}

impl<K: Key> TypedState<K> {
    pub fn new(range: KeyGroupRange, max_parallelism: u16) -> Self {
        TypedState {
            range,
            max_parallelism,
            slots: Vec::new(),
            timers: TimerService::default(),
            pending: HashMap::new(),
            types: StateTypes::default(),
            key_buf: Vec::new(),
            encoded: Arc::default(),
        }
    }

    /// The table of state `name`, typed `T`, created (from restored entries, if any)
    /// on first use.
    #[inline(always)]
    fn table<T: StateTable<K> + 'static>(
        &mut self,
        name: &'static str,
        declared: impl FnOnce() -> Declared,
        open: impl FnOnce(&'static str, Option<Arc<Pending>>, Restore) -> Result<T>,
    ) -> Result<&mut T> {
        let found = self
            .slots
            .iter()
            .position(|s| std::ptr::eq(s.name, name) || s.name == name);
        let i = match found {
            Some(i) => i,
            None => self.open_slot(name, declared, open)?,
        };
        let slot = &mut self.slots[i];
        if slot.type_id != TypeId::of::<T>() {
            return Err(Error::config(format!(
                "state '{name}' is used with two different types (or as value and map state) in one operator; give each state its own name"
            )));
        }
        let table: *mut dyn StateTable<K> = &mut *slot.table;
        // SAFETY: the slot's table was created as a `T` (its `TypeId` is `T`'s), so the
        // pointer to the trait object's data is a valid, uniquely borrowed `T`.
        Ok(unsafe { &mut *(table as *mut T) })
    }

    #[cold]
    fn open_slot<T: StateTable<K> + 'static>(
        &mut self,
        name: &'static str,
        declared: impl FnOnce() -> Declared,
        open: impl FnOnce(&'static str, Option<Arc<Pending>>, Restore) -> Result<T>,
    ) -> Result<usize> {
        let how = self.types.declare(name, declared())?;
        let pending = self.pending.remove(name.as_bytes());
        let table = open(name, pending, how)?;
        self.slots.push(Slot {
            name,
            type_id: TypeId::of::<T>(),
            hints: table.hints(),
            table: Box::new(table),
        });
        Ok(self.slots.len() - 1)
    }

    /// Start fetching `k`'s buckets in every state's table into the cache, so that the
    /// access a few records later does not wait for memory.
    #[inline]
    pub fn prefetch(&self, k: &K) {
        if self.slots.is_empty() {
            return;
        }
        let h = hash_of(k);
        for slot in &self.slots {
            slot.hints.prefetch(h);
        }
    }

    /// The key group of `k` (the same as the exchange's and the snapshot's).
    pub fn key_group(&mut self, k: &K) -> Result<KeyGroup> {
        key_bytes(k, &mut self.key_buf, self.max_parallelism)
    }

    pub fn values<V: StateValue>(&mut self, s: ValueState<V>) -> Result<&mut ValueTable<K, V>> {
        self.table(
            s.name(),
            || s.declared::<K>(),
            |name, pending, how| ValueTable::open(name, pending, |b| s.decode_restored(b, how)),
        )
    }

    pub fn ttl_values<V: StateValue>(&mut self, s: ValueState<V>) -> Result<&mut TtlTable<K, V>> {
        self.table(
            s.name(),
            || s.declared::<K>(),
            |name, pending, how| TtlTable::open(name, pending, |b| s.decode_restored(b, how)),
        )
    }

    pub fn maps<UK: StateValue + Eq, UV: StateValue>(
        &mut self,
        s: MapState<UK, UV>,
    ) -> Result<&mut MapTable<K, UK, UV>> {
        self.table(
            s.name(),
            || s.declared::<K>(),
            |name, pending, how| MapTable::open(name, pending, |b| s.decode_restored(b, how)),
        )
    }

    /// Delete every value whose TTL expired at `now`.
    pub fn expire_ttl(&mut self, now: Timestamp) -> usize {
        self.slots.iter_mut().map(|s| s.table.expire(now)).sum()
    }

    /// Entries over all states and timers, counted as the byte layout would store them.
    pub fn len(&self) -> usize {
        self.slots.iter().map(|s| s.table.entries()).sum::<usize>()
            + self.timers.len()
            + self
                .pending
                .values()
                .map(|p| p.entries.len() + p.cleanup.len())
                .sum::<usize>()
    }

    /// Load one entry of a restored snapshot (any backend, any parallelism); entries
    /// outside this instance's key groups are skipped.
    pub fn restore_entry(&mut self, kg: KeyGroup, key: &[u8], value: &[u8]) -> Result<()> {
        if !self.range.contains(kg) {
            return Ok(());
        }
        let corrupt = || Error::Codec {
            what: "restored keyed state".into(),
            message: format!("an entry key fits no layout: {key:02x?}"),
        };
        match classify(key).ok_or_else(corrupt)? {
            EntryKind::Timer { domain, time, key } => {
                let k: K = codec::decode(key, "timer key")?;
                self.timers.register(domain, time, &k);
            }
            EntryKind::TtlCleanup { name } => {
                self.pending_of(name).cleanup.push((kg, key.to_vec()));
            }
            EntryKind::State { name, rest } => {
                self.pending_of(name)
                    .entries
                    .push((kg, rest.to_vec(), value.to_vec()));
            }
        }
        Ok(())
    }

    fn pending_of(&mut self, name: &[u8]) -> &mut Pending {
        let p = self.pending.entry(name.to_vec()).or_insert_with(|| {
            Arc::new(Pending {
                prefix: layout::name_prefix_bytes(name),
                ..Pending::default()
            })
        });
        Arc::make_mut(p)
    }

    /// A point-in-time view of every state and timer: O(states x segments + timer
    /// slots), no entry copied.
    pub fn share(&self) -> LiveView {
        let mut parts: Vec<Box<dyn TableView>> =
            self.slots.iter().map(|s| s.table.share()).collect();
        parts.extend(
            self.pending
                .values()
                .map(|p| Box::new(PendingView(p.clone())) as Box<dyn TableView>),
        );
        parts.push(Box::new(self.timers.share()));
        LiveView {
            max_parallelism: self.max_parallelism,
            range: self.range,
            encoded: self.encoded.clone(),
            parts,
        }
    }
}

/// Shared tables of one operator as of a barrier, encoded later.
pub(crate) struct LiveView {
    max_parallelism: u16,
    range: KeyGroupRange,
    /// The state's bytes at its previous snapshot (see [`TypedState`]).
    encoded: Arc<AtomicUsize>,
    parts: Vec<Box<dyn TableView>>,
}

impl LiveView {
    /// Encode into the byte layout, releasing each table as soon as it is written.
    pub fn encode(self) -> Result<layout::EncodedGroups> {
        let hint = self.encoded.load(Relaxed);
        let mut w = GroupWriter::sized(self.max_parallelism, self.range, hint);
        for part in self.parts {
            part.encode(self.max_parallelism, &mut w)?;
        }
        let groups = w.finish();
        self.encoded.store(groups.buffered(), Relaxed);
        Ok(groups)
    }
}

impl std::fmt::Debug for LiveView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveView({} tables)", self.parts.len())
    }
}

impl<K> TypedState<K> {
    /// The key groups this instance owns.
    pub fn range(&self) -> KeyGroupRange {
        self.range
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spilled(t: &MapTable<u64, u32, u32>, k: u64) -> bool {
        t.table.get(&k).is_some_and(|m| m.spilled())
    }

    /// A key whose map spilled to the heap and fits in its bucket again keeps no heap
    /// buffer, however the entries went: retain, retain over all keys, remove.
    #[test]
    fn a_map_that_fits_again_lives_in_its_bucket_again() {
        let inline = KeyMap::<u32, u32>::new().inline_size() as u32;
        let mut t = MapTable::<u64, u32, u32>::open("m", None, |b| codec::decode(b, "m")).unwrap();
        for uk in 0..=inline {
            t.put(&1, &uk, uk * 10);
        }
        assert!(spilled(&t, 1));
        t.retain(&1, |uk, _| *uk != 0);
        assert!(!spilled(&t, 1));
        t.put(&1, &100, 1000);
        assert!(spilled(&t, 1));
        t.retain_all(|_, uk, _| *uk != 1);
        assert!(!spilled(&t, 1));
        t.put(&1, &101, 1010);
        assert!(spilled(&t, 1));
        t.remove(&1, &100);
        assert!(!spilled(&t, 1));
        assert_eq!(t.get(&1, &101), Some(&1010));
        assert_eq!(t.entries, inline as usize);
    }
}
