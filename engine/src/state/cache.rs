//! The write-behind cache of the RocksDB backend: value, TTL value and map entries of
//! the byte layout ([`super::layout`]), keyed by key group and entry key, holding the
//! encoded value or its absence.
//!
//! # Protocol
//!
//! 1. A read looks in the cache; on a miss it reads RocksDB and caches what it found,
//!    including "absent", so a key read again before it is written costs no database
//!    lookup either. A batch's entries can be looked up at once beforehand
//!    ([`EntryCache::lookup`]), the missing ones read in one `MultiGet` and cached
//!    after [`EntryCache::room_for`] made room; the slot numbers handed out are used
//!    for the batch's reads and writes while [`EntryCache::generation`] holds.
//! 2. A write or delete changes only the cache and marks the entry dirty (a delete
//!    leaves a dirty tombstone).
//! 3. [`EntryCache::flush`] writes every dirty entry in one `WriteBatch`, in key
//!    order, and marks them clean. The owner flushes before anything reads RocksDB
//!    other than through the cache: the checkpoint at the barrier, every scan (map
//!    iteration, retain, clear, migration, counting), and before evicting.
//! 4. When an insertion would take the cache past its byte budget, the owner flushes
//!    and the cache evicts: it keeps the entries read again since they were cached or
//!    since the last eviction (a clock's second chance), or none if they alone fill
//!    half the budget.
//!
//! # Invariants
//!
//! * A clean entry equals RocksDB (present with these bytes, or absent). Writes that
//!   bypass the cache ([`EntryCache::write_through`], while walking a scan) update a
//!   cached copy in place.
//! * A dirty entry is newer than RocksDB and is listed in `dirty` (the list may also
//!   name entries cleaned since; [`EntryCache::flush`] skips those).
//! * `dirty` is empty whenever the slots are renumbered (eviction), so it never names a
//!   moved slot.
//! * Timers and TTL cleanup entries never enter the cache: they live in RocksDB only,
//!   so draining them by range needs no flush.
//!
//! # Failure and recovery
//!
//! A failed flush keeps the entries dirty and the error reaches the task, which
//! restarts the job from its last checkpoint; the cache is never the only copy of
//! anything a checkpoint needed, because a checkpoint is created only after a
//! successful flush.

use super::rocks::{DeferredBatch, RocksStore};
use super::table::hash_of;
use crate::error::Result;
use hashbrown::HashTable;
use smallvec::SmallVec;

/// Bytes charged per entry beyond its key and value: the slot and its index entry (an
/// estimate; the budget is approximate).
const ENTRY_OVERHEAD: usize = 96;

/// An entry key, inline while short (a value state's key with a small user key): no
/// allocation per cached entry, and no pointer to follow when comparing.
type KeyBytes = SmallVec<[u8; 24]>;
/// An encoded value, inline while short.
type ValueBytes = SmallVec<[u8; 16]>;

struct Slot {
    hash: u64,
    group: u16,
    dirty: bool,
    /// Read again since it was cached or since the last eviction: a read-modify-write
    /// of a key seen once does not count, a second record of the key does.
    referenced: bool,
    /// Whether the entry exists; if not, `value` is empty (a tombstone while dirty).
    present: bool,
    key: KeyBytes,
    value: ValueBytes,
}

impl Slot {
    fn bytes(&self) -> usize {
        ENTRY_OVERHEAD + self.key.len() + self.value.len()
    }

    fn value(&self) -> Option<&[u8]> {
        self.present.then_some(&self.value[..])
    }

    fn set_value(&mut self, value: Option<&[u8]>) {
        self.value.clear();
        self.present = value.is_some();
        if let Some(v) = value {
            self.value.extend_from_slice(v);
        }
    }

    /// The first 16 bytes of `group | key` as a number: the order of entry keys
    /// (before a tie), found without following a pointer.
    fn order(&self) -> u128 {
        let mut b = [0u8; 16];
        b[..2].copy_from_slice(&self.group.to_be_bytes());
        let n = self.key.len().min(14);
        b[2..2 + n].copy_from_slice(&self.key[..n]);
        u128::from_be_bytes(b)
    }
}

/// Cached entries of one operator instance's database; see the module docs.
pub(crate) struct EntryCache {
    slots: Vec<Slot>,
    index: HashTable<u32>,
    dirty: Vec<u32>,
    /// Sort buffer of [`EntryCache::flush`]: (order, slot).
    order: Vec<(u128, u32)>,
    bytes: usize,
    budget: usize,
    /// Bumped whenever slots are renumbered (an eviction): slot numbers handed out by
    /// [`EntryCache::lookup`] and [`EntryCache::insert_read`] before are void.
    generation: u64,
    /// Entries read from the database one by one (misses of [`EntryCache::get`]).
    pub point_reads: u64,
}

/// Bytes assumed per value not read yet, to make room for a batch's missing entries.
const VALUE_ESTIMATE: usize = 16;

impl EntryCache {
    /// An empty cache holding about `budget` bytes.
    pub fn new(budget: usize) -> Self {
        EntryCache {
            slots: Vec::new(),
            index: HashTable::new(),
            dirty: Vec::new(),
            order: Vec::new(),
            bytes: 0,
            budget,
            generation: 0,
            point_reads: 0,
        }
    }

    /// Changes whenever slot numbers change (see [`EntryCache::lookup`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Entry `key` of key group index `g`: its hash, and its slot if cached (marked
    /// read again, as [`EntryCache::get`] marks a hit). The slot number holds while
    /// [`EntryCache::generation`] does not change.
    #[inline]
    pub fn lookup(&mut self, g: usize, key: &[u8]) -> (u64, Option<u32>) {
        let g16 = g as u16;
        let hash = hash_of(&(g16, key));
        let i = self.find(hash, g16, key);
        if let Some(i) = i {
            self.slots[i].referenced = true;
        }
        (hash, i.map(|i| i as u32))
    }

    /// Make room for `entries` entries not cached yet, with `key_bytes` bytes of keys in
    /// all, flushing and evicting if needed (which changes the generation). False if
    /// they would take more than half the cache: reading them ahead would evict what is
    /// about to be used.
    pub fn room_for(
        &mut self,
        db: &mut RocksStore,
        entries: usize,
        key_bytes: usize,
    ) -> Result<bool> {
        let need = key_bytes + entries * (ENTRY_OVERHEAD + VALUE_ESTIMATE);
        if need > self.budget / 2 {
            return Ok(false);
        }
        if self.bytes + need > self.budget {
            self.flush(db)?;
            db.settle()?;
            self.evict();
        }
        Ok(true)
    }

    /// Cache entry `key` of key group index `g` (hash `hash`, from
    /// [`EntryCache::lookup`]) as the database holds it (`value`; `None` if absent),
    /// after [`EntryCache::room_for`]; it must not be cached. Returns its slot.
    pub fn insert_read(&mut self, hash: u64, g: usize, key: &[u8], value: Option<&[u8]>) -> u32 {
        debug_assert!(self.find(hash, g as u16, key).is_none(), "cached twice");
        let i = self.insert(hash, g as u16, key, None);
        if value.is_some() {
            let s = &mut self.slots[i];
            s.set_value(value);
            self.bytes += s.value.len();
        }
        i as u32
    }

    /// Mark slot `i` read again.
    pub fn reference(&mut self, i: u32) {
        self.slots[i as usize].referenced = true;
    }

    /// The value in slot `i` (of the current generation).
    #[inline]
    pub fn slot_value(&self, i: u32) -> Option<&[u8]> {
        self.slots[i as usize].value()
    }

    /// Set slot `i` (of the current generation) to `value` (`None`: delete the entry),
    /// in the cache only.
    #[inline]
    pub fn set_slot(&mut self, i: u32, value: Option<&[u8]>) {
        let s = &mut self.slots[i as usize];
        let before = s.bytes();
        s.set_value(value);
        let after = s.bytes();
        self.bytes = self.bytes + after - before;
        if !s.dirty {
            s.dirty = true;
            self.dirty.push(i);
        }
    }

    fn find(&self, hash: u64, g: u16, key: &[u8]) -> Option<usize> {
        let slots = &self.slots;
        self.index
            .find(hash, |&i| {
                let s = &slots[i as usize];
                s.group == g && s.key[..] == *key
            })
            .map(|&i| i as usize)
    }

    fn insert(&mut self, hash: u64, g: u16, key: &[u8], value: Option<&[u8]>) -> usize {
        let i = self.slots.len();
        let mut slot = Slot {
            hash,
            group: g,
            dirty: false,
            referenced: false,
            present: false,
            key: KeyBytes::from_slice(key),
            value: ValueBytes::new(),
        };
        slot.set_value(value);
        self.bytes += slot.bytes();
        self.slots.push(slot);
        let slots = &self.slots;
        self.index
            .insert_unique(hash, i as u32, |&j| slots[j as usize].hash);
        i
    }

    /// Make room for an entry of about `extra` bytes: flush and evict if it would not
    /// fit.
    fn make_room(&mut self, db: &mut RocksStore, extra: usize) -> Result<()> {
        if self.bytes + extra + ENTRY_OVERHEAD > self.budget && !self.slots.is_empty() {
            self.flush(db)?;
            // Evicted entries are read from the database again: it must hold them.
            db.settle()?;
            self.evict();
        }
        Ok(())
    }

    /// Drop clean entries: keep those read again since they were cached or since the
    /// last eviction (clearing their mark) unless they alone take half the budget,
    /// then drop everything.
    fn evict(&mut self) {
        debug_assert!(self.dirty.is_empty(), "evicting with dirty entries");
        let kept: usize = self
            .slots
            .iter()
            .filter(|s| s.referenced)
            .map(Slot::bytes)
            .sum();
        if kept > self.budget / 2 {
            self.slots.clear();
        } else {
            self.slots.retain_mut(|s| std::mem::take(&mut s.referenced));
        }
        self.bytes = self.slots.iter().map(Slot::bytes).sum();
        self.generation += 1;
        self.index.clear();
        let slots = &self.slots;
        for (i, s) in slots.iter().enumerate() {
            self.index
                .insert_unique(s.hash, i as u32, |&j| slots[j as usize].hash);
        }
    }

    /// Entry `key` of key group index `g`: from the cache, or read from `db` and cached.
    pub fn get<'a>(
        &'a mut self,
        db: &mut RocksStore,
        g: usize,
        key: &[u8],
    ) -> Result<Option<&'a [u8]>> {
        let g16 = g as u16;
        let hash = hash_of(&(g16, key));
        let i = match self.find(hash, g16, key) {
            Some(i) => {
                self.slots[i].referenced = true;
                i
            }
            None => {
                self.point_reads += 1;
                self.make_room(db, key.len())?;
                let mut found = None;
                let value = db.get(g, key, |v| {
                    // Reads the value once, straight into the new slot.
                    found = Some(ValueBytes::from_slice(v));
                })?;
                let i = self.insert(hash, g16, key, None);
                if value.is_some() {
                    let s = &mut self.slots[i];
                    s.value = found.unwrap_or_default();
                    s.present = true;
                    self.bytes += s.value.len();
                }
                i
            }
        };
        Ok(self.slots[i].value())
    }

    /// Set entry `key` of key group index `g` to `value` (`None`: delete it), in the
    /// cache only.
    pub fn set(
        &mut self,
        db: &mut RocksStore,
        g: usize,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<()> {
        let g16 = g as u16;
        let hash = hash_of(&(g16, key));
        let i = match self.find(hash, g16, key) {
            Some(i) => i,
            None => {
                self.make_room(db, key.len() + value.map_or(0, <[u8]>::len))?;
                self.insert(hash, g16, key, None)
            }
        };
        self.set_slot(i as u32, value);
        Ok(())
    }

    /// Write entry `key` straight to `db` (`None`: delete it), updating a cached copy,
    /// which stays clean.
    pub fn write_through(
        &mut self,
        db: &mut RocksStore,
        g: usize,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<()> {
        match value {
            Some(v) => db.put(g, key, v)?,
            None => db.delete(g, key)?,
        }
        self.written(g, key, value);
        Ok(())
    }

    /// [`Self::write_through`] for every `(key, value)` of `writes`, all of key group
    /// index `g`, in one batch. For writes made while walking entries read from `db`
    /// after a flush.
    pub fn write_through_all<'a, I>(
        &mut self,
        db: &mut RocksStore,
        g: usize,
        writes: I,
    ) -> Result<()>
    where
        I: Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone,
    {
        if writes.clone().next().is_none() {
            return Ok(());
        }
        let bytes = writes
            .clone()
            .map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len) + 8)
            .sum();
        db.write_batch(bytes, writes.clone().map(|(k, v)| (g, k, v)))?;
        for (key, value) in writes {
            self.written(g, key, value);
        }
        Ok(())
    }

    /// Entry `key` now holds `value` in RocksDB: a cached copy takes it, clean.
    fn written(&mut self, g: usize, key: &[u8], value: Option<&[u8]>) {
        let g16 = g as u16;
        let hash = hash_of(&(g16, key));
        if let Some(i) = self.find(hash, g16, key) {
            let s = &mut self.slots[i];
            let before = s.bytes();
            s.set_value(value);
            s.dirty = false;
            self.bytes = self.bytes + s.bytes() - before;
        }
    }

    /// Write every dirty entry to `db` in one batch; they stay cached, clean.
    pub fn flush(&mut self, db: &mut RocksStore) -> Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let slots = &self.slots;
        // In key order: RocksDB inserts a sorted batch into its memtable several times
        // faster (each insertion starts where the previous one ended). Sorted by a
        // prefix held beside the index, comparing whole keys only on a tie.
        self.order.clear();
        self.order.extend(
            self.dirty
                .iter()
                .map(|&i| (slots[i as usize].order(), i))
                .filter(|&(_, i)| slots[i as usize].dirty),
        );
        self.order.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0).then_with(|| {
                let (x, y) = (&slots[a.1 as usize], &slots[b.1 as usize]);
                (x.group, &x.key[..]).cmp(&(y.group, &y.key[..]))
            })
        });
        // An entry dirtied again after a write-through is listed twice.
        self.order.dedup_by_key(|e| e.1);
        // Each record: a tag, two length prefixes, the key group, key and value.
        let bytes = self
            .order
            .iter()
            .map(|&(_, i)| slots[i as usize].bytes() - ENTRY_OVERHEAD + 8)
            .sum();
        db.write_batch(
            bytes,
            self.order.iter().map(|&(_, i)| {
                let s = &slots[i as usize];
                (s.group as usize, &s.key[..], s.value())
            }),
        )?;
        for i in self.dirty.drain(..) {
            self.slots[i as usize].dirty = false;
        }
        Ok(())
    }

    /// Copy every dirty entry into the batch the next checkpoint's thread sorts and
    /// writes before it creates the checkpoint ([`RocksStore::checkpoint`]); they stay
    /// cached, clean, so reads find them here until the database holds them (an
    /// eviction waits for that thread first).
    pub fn flush_for_checkpoint(&mut self, db: &mut RocksStore) -> Result<()> {
        let mut batch = DeferredBatch::default();
        for i in self.dirty.drain(..) {
            let s = &mut self.slots[i as usize];
            // An entry dirtied again after a write-through is listed twice.
            if std::mem::take(&mut s.dirty) {
                batch.push(s.group, &s.key, s.present.then_some(&s.value[..]));
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        db.defer(batch)
    }

    /// Entries cached, and how many of them are dirty (tests).
    #[cfg(test)]
    pub fn counts(&self) -> (usize, usize) {
        (
            self.slots.len(),
            self.slots.iter().filter(|s| s.dirty).count(),
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::ids::KeyGroupRange;
    use crate::state::rocks::tests::Fixture;
    use crate::state::{Inner, KeyedState, MapState, OperatorSnapshot, ValueState};
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeMap;
    use std::time::Duration;

    const V: ValueState<u32> = ValueState::new("v");
    const T: ValueState<u32> = ValueState::new("t").with_ttl(Duration::from_millis(5));
    const M: MapState<u8, u32> = MapState::new("m");
    const MAX: u16 = 128;
    const ALL: KeyGroupRange = KeyGroupRange { start: 0, end: MAX };
    const KEYS: u64 = 8;

    fn cache_counts(s: &KeyedState<u64>) -> (usize, usize) {
        match &s.inner {
            Inner::Rocks(b, _) => b.cache_counts(),
            Inner::Memory(_) => unreachable!("the fixture opens RocksDB state"),
        }
    }

    fn snapshot_of(f: &Fixture, s: &mut KeyedState<u64>, id: u64) -> OperatorSnapshot {
        OperatorSnapshot {
            db: Some(f.checkpoint(s, id).snapshot),
            ..Default::default()
        }
    }

    #[test]
    fn a_checkpoint_holds_the_entries_still_dirty_in_the_cache() {
        let f = Fixture::new();
        let mut s = f.open(ALL, &[]);
        for k in 0..100u64 {
            s.put(&k, V, &(k as u32), 0).unwrap();
            s.map_put(&k, M, &1, &(k as u32 + 1)).unwrap();
        }
        s.clear(&7, V);
        s.map_remove(&8, M, &1).unwrap();
        let (cached, dirty) = cache_counts(&s);
        assert_eq!(
            (cached, dirty),
            (200, 200),
            "every write is still in the cache"
        );
        let snap = snapshot_of(&f, &mut s, 1);
        assert_eq!(cache_counts(&s), (200, 0), "the entries stay cached, clean");
        // Both backends read the checkpoint with every write in it.
        for mut r in [
            f.open(ALL, std::slice::from_ref(&snap)),
            f.open_memory(&[snap]),
        ] {
            for k in 0..100u64 {
                let v = (k != 7).then_some(k as u32);
                let m = (k != 8).then_some(k as u32 + 1);
                assert_eq!(r.get(&k, V, 0).unwrap(), v, "key {k}");
                assert_eq!(r.map_get(&k, M, &1).unwrap(), m, "key {k}");
            }
            assert_eq!(r.len().unwrap(), 198);
        }
    }

    /// A batch's keys, once a value state has been read: the entries the cache lacks
    /// are read in one `MultiGet` (absent ones too), and the batch's reads and writes
    /// then cost no database read; what they find is what the database holds.
    #[test]
    fn a_batch_reads_its_missing_entries_in_one_multi_get() {
        let f = Fixture::new();
        let mut s = f.open_caching(ALL, &[], 64 << 20);
        for k in 0..100u64 {
            s.put(&k, V, &(k as u32 * 3), 0).unwrap();
        }
        let snap = snapshot_of(&f, &mut s, 1);
        let mut s = f.open_caching(ALL, &[snap], 64 << 20);
        let reads = |s: &KeyedState<u64>| match &s.inner {
            Inner::Rocks(b, _) => b.reads(),
            Inner::Memory(_) => unreachable!("the fixture opens RocksDB state"),
        };
        // Nothing is read ahead for a state not read yet.
        s.begin_batch(&[0u64, 1]).unwrap();
        assert_eq!(cache_counts(&s).0, 0);
        s.next_record(0, &[0, 1]);
        assert_eq!(s.get(&0, V, 0).unwrap(), Some(0));
        assert_eq!(reads(&s), (1, 0), "one point read");
        // Keys 150.. were never written; keys 1..10 come twice.
        let batch: Vec<u64> = (1..50).chain(150..160).chain(1..10).collect();
        s.begin_batch(&batch).unwrap();
        assert_eq!(reads(&s), (1, 1), "one MultiGet for the batch");
        let mut written = std::collections::HashSet::new();
        for (i, &k) in batch.iter().enumerate() {
            s.next_record(i, &batch);
            let want = match written.insert(k) {
                false => Some(k as u32),
                true => (k < 100).then_some(k as u32 * 3),
            };
            assert_eq!(s.get(&batch[i], V, 0).unwrap(), want, "key {k}");
            s.put(&batch[i], V, &(k as u32), 0).unwrap();
        }
        assert_eq!(reads(&s), (1, 1), "every read of the batch hit the cache");
        let snap = snapshot_of(&f, &mut s, 2);
        let mut r = f.open_caching(ALL, &[snap], 64 << 20);
        for k in (0..100u64).chain(150..160) {
            let want = match k {
                0 => Some(0),
                1..50 | 150..160 => Some(k as u32),
                _ => Some(k as u32 * 3),
            };
            assert_eq!(r.get(&k, V, 0).unwrap(), want, "key {k} restored");
        }
    }

    #[test]
    fn a_full_cache_writes_its_entries_and_evicts() {
        let f = Fixture::new();
        let mut s = f.open_caching(ALL, &[], 4 << 10);
        for round in 0..3u32 {
            for k in 0..1_000u64 {
                let old = s.get(&k, V, 0).unwrap();
                assert_eq!(old, round.checked_sub(1).map(|r| k as u32 + r));
                s.put(&k, V, &(k as u32 + round), 0).unwrap();
            }
            let (cached, _) = cache_counts(&s);
            assert!(cached < 100, "{cached} entries cached in 4 KiB");
        }
        let snap = snapshot_of(&f, &mut s, 1);
        let mut r = f.open_memory(&[snap]);
        for k in 0..1_000u64 {
            assert_eq!(r.get(&k, V, 0).unwrap(), Some(k as u32 + 2));
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u64, u32),
        Clear(u64),
        PutTtl(u64, u32),
        ClearTtl(u64),
        ExpireTtl,
        MapPut(u64, u8, u32),
        MapRemove(u64, u8),
        MapClear(u64),
        /// Drop the entries whose key plus map key is divisible by the divisor; add 1 to
        /// the others.
        MapRetainAll(u8),
        /// Let time pass.
        Wait(u8),
        /// A batch as a keyed operator processes it (keys read ahead, then record by
        /// record): per record, read the value and then add the number to it (0: clear
        /// it; 3: also put a map entry, which may evict and void the slots read ahead).
        Batch(Vec<(u64, u8)>),
        /// Check every key against the model through this instance.
        Check,
        /// Checkpoint, check that both backends restore the model from it, and carry on
        /// with a RocksDB instance restored from it (with this cache size).
        Checkpoint(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let k = 0..KEYS;
        let uk = 0u8..4;
        prop_oneof![
            4 => (k.clone(), any::<u32>()).prop_map(|(k, v)| Op::Put(k, v)),
            1 => k.clone().prop_map(Op::Clear),
            2 => (k.clone(), any::<u32>()).prop_map(|(k, v)| Op::PutTtl(k, v)),
            1 => k.clone().prop_map(Op::ClearTtl),
            1 => Just(Op::ExpireTtl),
            4 => (k.clone(), uk.clone(), any::<u32>()).prop_map(|(k, u, v)| Op::MapPut(k, u, v)),
            1 => (k.clone(), uk).prop_map(|(k, u)| Op::MapRemove(k, u)),
            1 => k.prop_map(Op::MapClear),
            1 => (2u8..5).prop_map(Op::MapRetainAll),
            1 => (0u8..4).prop_map(Op::Wait),
            3 => proptest::collection::vec((0..KEYS, 0u8..4), 0..12).prop_map(Op::Batch),
            1 => Just(Op::Check),
            1 => prop_oneof![Just(0usize), Just(400), Just(2_000), Just(64 << 20)]
                .prop_map(Op::Checkpoint),
        ]
    }

    /// What the state should hold: values, TTL values (expiry, value) until they are
    /// expired or cleared, map entries.
    #[derive(Default)]
    struct Model {
        values: BTreeMap<u64, u32>,
        ttl: BTreeMap<u64, (i64, u32)>,
        maps: BTreeMap<(u64, u8), u32>,
    }

    impl Model {
        /// Entries as the byte layout counts them: a TTL value has a cleanup entry.
        fn len(&self) -> usize {
            self.values.len() + 2 * self.ttl.len() + self.maps.len()
        }

        fn check(&self, s: &mut KeyedState<u64>, now: i64, what: &str) {
            for k in 0..KEYS {
                assert_eq!(
                    s.get(&k, V, now).unwrap(),
                    self.values.get(&k).copied(),
                    "{what}: value of {k}"
                );
                let ttl = self.ttl.get(&k).filter(|(e, _)| *e > now).map(|(_, v)| *v);
                assert_eq!(s.get(&k, T, now).unwrap(), ttl, "{what}: TTL value of {k}");
                let mut got = s.map_entries(&k, M).unwrap();
                got.sort();
                let want: Vec<(u8, u32)> = self
                    .maps
                    .range((k, 0)..=(k, u8::MAX))
                    .map(|(&(_, u), &v)| (u, v))
                    .collect();
                assert_eq!(got, want, "{what}: map of {k}");
            }
            assert_eq!(s.len().unwrap(), self.len(), "{what}: entries");
        }
    }

    fn run(f: &Fixture, cache_bytes: usize, ops: &[Op], next_id: &mut u64) {
        let mut s = f.open_caching(ALL, &[], cache_bytes);
        let mut model = Model::default();
        let mut now = 0i64;
        for op in ops {
            now += 1;
            match *op {
                Op::Put(k, v) => {
                    s.put(&k, V, &v, now).unwrap();
                    model.values.insert(k, v);
                }
                Op::Clear(k) => {
                    s.clear(&k, V);
                    model.values.remove(&k);
                }
                Op::PutTtl(k, v) => {
                    s.put(&k, T, &v, now).unwrap();
                    model.ttl.insert(k, (now + 5, v));
                }
                Op::ClearTtl(k) => {
                    s.clear(&k, T);
                    model.ttl.remove(&k);
                }
                Op::ExpireTtl => {
                    let before = model.ttl.len();
                    model.ttl.retain(|_, (e, _)| *e > now);
                    assert_eq!(s.expire_ttl(now).unwrap(), before - model.ttl.len());
                }
                Op::MapPut(k, u, v) => {
                    s.map_put(&k, M, &u, &v).unwrap();
                    model.maps.insert((k, u), v);
                }
                Op::MapRemove(k, u) => {
                    s.map_remove(&k, M, &u).unwrap();
                    model.maps.remove(&(k, u));
                }
                Op::MapClear(k) => {
                    s.map_clear(&k, M);
                    model.maps.retain(|(mk, _), _| *mk != k);
                }
                Op::MapRetainAll(d) => {
                    let keep = |k: u64, u: u8, v: &mut u32| {
                        *v = v.wrapping_add(1);
                        !(k + u64::from(u)).is_multiple_of(u64::from(d))
                    };
                    s.map_retain_all_keys(M, |k, u, v| keep(*k, *u, v)).unwrap();
                    model.maps.retain(|(k, u), v| keep(*k, *u, v));
                }
                Op::Wait(t) => now += i64::from(t),
                Op::Batch(ref records) => {
                    let keys: Vec<u64> = records.iter().map(|r| r.0).collect();
                    s.begin_batch(&keys).unwrap();
                    for (i, &(k, add)) in records.iter().enumerate() {
                        s.next_record(i, &keys);
                        let got = s.get(&keys[i], V, now).unwrap();
                        assert_eq!(got, model.values.get(&k).copied(), "key {k} in a batch");
                        if add == 0 {
                            s.clear(&keys[i], V);
                            model.values.remove(&k);
                        } else {
                            let v = got.unwrap_or(0).wrapping_add(u32::from(add));
                            s.put(&keys[i], V, &v, now).unwrap();
                            model.values.insert(k, v);
                        }
                        if add == 3 {
                            s.map_put(&keys[i], M, &add, &u32::from(add)).unwrap();
                            model.maps.insert((k, add), u32::from(add));
                        }
                        s.take_failure().unwrap();
                    }
                }
                Op::Check => model.check(&mut s, now, "live"),
                Op::Checkpoint(bytes) => {
                    *next_id += 1;
                    let snap = snapshot_of(f, &mut s, *next_id);
                    model.check(
                        &mut f.open_memory(std::slice::from_ref(&snap)),
                        now,
                        "in memory",
                    );
                    s = f.open_caching(ALL, &[snap], bytes);
                    model.check(&mut s, now, "restored");
                }
            }
            s.take_failure().unwrap();
        }
        *next_id += 1;
        let snap = snapshot_of(f, &mut s, *next_id);
        model.check(&mut f.open_memory(&[snap]), now, "final checkpoint");
    }

    /// Random value, TTL and map operations, checkpoints and restores, with caches from
    /// none (every insertion evicts) to larger than the state: every read, every count
    /// and every checkpoint (read by both backends) matches a model.
    #[test]
    fn cached_state_and_its_checkpoints_match_a_model() {
        let f = Fixture::new();
        let mut runner = TestRunner::deterministic();
        let mut next_id = 0;
        for case in 0..48 {
            let ops = proptest::collection::vec(op(), 0..150)
                .new_tree(&mut runner)
                .unwrap()
                .current();
            let cache_bytes = [0, 400, 2_000, 64 << 20][case % 4];
            run(&f, cache_bytes, &ops, &mut next_id);
        }
    }
}
