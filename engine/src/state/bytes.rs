//! Keyed state of the RocksDB backend: entries of the byte layout ([`super::layout`]) in
//! the operator instance's database, value and map entries behind a write-behind cache
//! ([`super::cache`]) that is flushed before every scan and at every checkpoint.

use super::cache::EntryCache;
use super::layout::{decode_ts, domain_byte, due_range, mark, MARK_LEN, TTL_MARK};
use super::rocks::RocksStore;
use super::types::{Declared, Restore, StateTypes};
use super::{MapState, StateSnapshot, StateValue, ValueState};
use crate::codec;
use crate::error::Result;
use crate::ids::{key_group_of_bytes, CheckpointId, KeyGroup, KeyGroupRange};
use crate::time::{TimeDomain, Timestamp};
use serde::de::DeserializeOwned;
use serde::Serialize;
use smallvec::SmallVec;
use std::any::TypeId;

pub(crate) struct ByteState {
    range: KeyGroupRange,
    max_parallelism: u16,
    pub db: Box<RocksStore>,
    /// Value and map entries, written to `db` in batches (see [`super::cache`]).
    cache: EntryCache,
    /// The current key's key group (index in `range`) and encoded key.
    group: usize,
    key: Vec<u8>,
    scratch: Vec<u8>,
    value_buf: Vec<u8>,
    /// States whose declared type was checked: name, kind (0 value, 1 TTL value, 2
    /// map) and the value type's id.
    checked: Vec<(&'static str, u8, TypeId)>,
    pub types: StateTypes,
    /// The batch being processed, read ahead ([`ByteState::read_ahead`]); boxed, so
    /// the backends' state types stay of similar size.
    ahead: Box<Ahead>,
}

/// Value states read ahead at most (the first ones an operator reads).
const AHEAD_STATES: usize = 4;
/// No slot, in [`Ahead::slots`].
const NO_SLOT: u32 = u32::MAX;

/// A batch's keys encoded once, and the cache slots of their entries.
#[derive(Default)]
struct Ahead {
    /// Value states whose entries are read ahead: those read with `get`.
    states: SmallVec<[&'static str; AHEAD_STATES]>,
    /// The batch's encoded keys back to back, where each ends, and its key group index.
    keys: Vec<u8>,
    ends: Vec<usize>,
    groups: Vec<u16>,
    /// Per state and record (state-major), the entry's cache slot or [`NO_SLOT`], for
    /// the first `covered` states (a state first read during the batch is not).
    slots: Vec<u32>,
    covered: usize,
    /// The cache generation the slots belong to.
    generation: u64,
    /// The record whose key is the current key, if it is one of the batch's.
    current: Option<usize>,
    /// The batch's entry keys back to back (state-major, as `slots`) and where each
    /// ends; the entries missing from the cache; scratch of the `MultiGet`.
    entry_keys: Vec<u8>,
    entry_ends: Vec<u32>,
    misses: Vec<Miss>,
    /// Scratch of [`ByteState::read_misses`]: the misses in the database's order, the
    /// number of each one's entry in that order, and each entry's slot.
    order: Vec<u32>,
    unique: Vec<u32>,
    entry_slots: Vec<u32>,
    values: Vec<u8>,
    found: Vec<Option<(usize, usize)>>,
    /// `MultiGet`s made.
    multi_gets: u64,
}

struct Miss {
    group: u16,
    /// Its entry key in [`Ahead::entry_keys`].
    start: u32,
    end: u32,
    hash: u64,
    /// Index into [`Ahead::slots`].
    at: u32,
}

impl Ahead {
    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.keys[start..self.ends[i]]
    }
}

impl ByteState {
    /// State over `db`, caching about `cache_bytes` of entries.
    pub fn new(
        range: KeyGroupRange,
        max_parallelism: u16,
        db: RocksStore,
        cache_bytes: usize,
    ) -> Self {
        ByteState {
            range,
            max_parallelism,
            db: Box::new(db),
            cache: EntryCache::new(cache_bytes),
            group: 0,
            key: Vec::new(),
            scratch: Vec::new(),
            value_buf: Vec::new(),
            checked: Vec::new(),
            types: StateTypes::default(),
            ahead: Box::default(),
        }
    }

    /// Check state `name`'s declared type against the restored checkpoint's, once per
    /// state (a short scan by name pointer afterwards). If the checkpoint wrote it at an
    /// earlier version, every stored value of it is converted with `convert` (old value
    /// bytes to new) before its first use.
    #[inline]
    pub fn check(
        &mut self,
        name: &'static str,
        kind: u8,
        type_id: TypeId,
        declared: impl FnOnce() -> Declared,
        convert: impl Fn(&[u8], &mut Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let seen = self
            .checked
            .iter()
            .any(|&(n, k, t)| std::ptr::eq(n, name) && k == kind && t == type_id);
        if seen {
            return Ok(());
        }
        if self.types.declare(name, declared())? == Restore::Migrate {
            self.migrate(name, convert)?;
        }
        self.checked.push((name, kind, type_id));
        Ok(())
    }

    /// Key group `g`'s entries under `prefix`, copied into `out` (cleared), so they can
    /// be rewritten (through [`EntryCache::write_through_all`]) while walked.
    fn entries_under(
        &mut self,
        g: usize,
        prefix: &[u8],
        out: &mut Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<()> {
        out.clear();
        self.cache.flush(&mut self.db)?;
        self.db.scan_prefix(g, prefix, |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
    }

    /// Rewrite every value of state `name` with `convert`.
    #[cold]
    fn migrate(
        &mut self,
        name: &str,
        convert: impl Fn(&[u8], &mut Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let prefix = super::layout::name_prefix(name);
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut converted = Vec::new();
        let mut count = 0usize;
        for g in 0..self.range.len() {
            self.entries_under(g, &prefix, &mut entries)?;
            for (_, v) in &mut entries {
                converted.clear();
                convert(v, &mut converted)?;
                std::mem::swap(v, &mut converted);
            }
            let writes = entries.iter().map(|(k, v)| (&k[..], Some(&v[..])));
            self.cache.write_through_all(&mut self.db, g, writes)?;
            count += entries.len();
        }
        tracing::info!(
            state = name,
            values = count,
            "migrated state to its new version"
        );
        Ok(())
    }

    /// Entries cached, and how many of them are dirty.
    #[cfg(test)]
    pub fn cache_counts(&self) -> (usize, usize) {
        self.cache.counts()
    }

    /// Entries read from the database one by one, and `MultiGet`s made.
    #[cfg(test)]
    pub fn reads(&self) -> (u64, u64) {
        (self.cache.point_reads, self.ahead.multi_gets)
    }

    /// The key groups this instance owns.
    pub fn range(&self) -> KeyGroupRange {
        self.range
    }

    /// Make `key` the current key.
    pub fn set_key<K: Serialize>(&mut self, key: &K) -> Result<()> {
        self.ahead.current = None;
        self.key.clear();
        codec::encode_into(key, &mut self.key, "state key")?;
        let kg = key_group_of_bytes(&self.key, self.max_parallelism);
        debug_assert!(
            self.range.contains(kg),
            "key group {kg:?} outside {:?}",
            self.range
        );
        self.group = (kg.0 - self.range.start) as usize;
        Ok(())
    }

    /// The current key's key group.
    pub fn key_group(&self) -> KeyGroup {
        KeyGroup(self.range.start + self.group as u16)
    }

    fn entry_key(&mut self, name: &str) {
        self.scratch.clear();
        self.scratch.push(name.len() as u8);
        self.scratch.extend_from_slice(name.as_bytes());
        self.scratch.extend_from_slice(&self.key);
    }

    /// Before a batch with keys `keys`: encode them and find their key groups once, and
    /// find the cache slots of their entries of the value states read so far, reading
    /// the missing ones from the database in one `MultiGet`. Then
    /// [`ByteState::use_ahead`] makes a record's key current without encoding it, and
    /// its value reads and writes go straight to their slots. Everything here is a
    /// shortcut: an entry without a slot (no room in the cache, a state read for the
    /// first time) is read the usual way.
    pub fn read_ahead<K: Serialize>(&mut self, keys: &[K]) -> Result<()> {
        let a = &mut self.ahead;
        a.current = None;
        a.keys.clear();
        a.ends.clear();
        a.groups.clear();
        for k in keys {
            let start = a.keys.len();
            codec::encode_into(k, &mut a.keys, "state key")?;
            let kg = key_group_of_bytes(&a.keys[start..], self.max_parallelism);
            debug_assert!(
                self.range.contains(kg),
                "key group {kg:?} outside {:?}",
                self.range
            );
            a.groups.push(kg.0 - self.range.start);
            a.ends.push(a.keys.len());
        }
        let n = keys.len();
        a.covered = a.states.len();
        a.slots.clear();
        a.slots.resize(a.covered * n, NO_SLOT);
        if a.states.is_empty() {
            return Ok(());
        }
        // Find the slots; if making room for the missing entries evicted (slot numbers
        // changed), find them again.
        for _ in 0..2 {
            self.ahead.generation = self.cache.generation();
            self.find_slots();
            let a = &self.ahead;
            if a.misses.is_empty() {
                return Ok(());
            }
            let key_bytes = a.misses.iter().map(|m| (m.end - m.start) as usize).sum();
            if !self
                .cache
                .room_for(&mut self.db, a.misses.len(), key_bytes)?
            {
                // Too many to cache at once: the hits keep their slots, the misses are
                // read one by one when the records need them.
                return Ok(());
            }
            if self.cache.generation() == self.ahead.generation {
                return self.read_misses();
            }
        }
        // Evicted twice (not expected: the first eviction made room): no slot holds.
        self.ahead.slots.fill(NO_SLOT);
        Ok(())
    }

    /// The slots of the batch's entries that the cache holds; the others in `misses`.
    fn find_slots(&mut self) {
        let a = &mut self.ahead;
        a.misses.clear();
        a.entry_keys.clear();
        a.entry_ends.clear();
        let n = a.groups.len();
        // Every entry key first, then the lookups: a lookup hashing bytes just written
        // byte by byte waits for those stores, which wait for the previous lookup's
        // memory access, so interleaving them would serialise the cache misses.
        for &name in &a.states[..a.covered] {
            for i in 0..n {
                let start = if i == 0 { 0 } else { a.ends[i - 1] };
                a.entry_keys.push(name.len() as u8);
                a.entry_keys.extend_from_slice(name.as_bytes());
                a.entry_keys.extend_from_slice(&a.keys[start..a.ends[i]]);
                a.entry_ends.push(a.entry_keys.len() as u32);
            }
        }
        for at in 0..a.entry_ends.len() {
            let start = if at == 0 { 0 } else { a.entry_ends[at - 1] };
            let end = a.entry_ends[at];
            let g = a.groups[at % n] as usize;
            match self
                .cache
                .lookup(g, &a.entry_keys[start as usize..end as usize])
            {
                (_, Some(slot)) => a.slots[at] = slot,
                (hash, None) => a.misses.push(Miss {
                    group: g as u16,
                    start,
                    end,
                    hash,
                    at: at as u32,
                }),
            }
        }
    }

    /// Read the missing entries in one `MultiGet` (in the database's order, each once)
    /// and cache them, room having been made, in the batch's order: the slots are then
    /// dirtied in about the order they were made, which the checkpoint walks.
    fn read_misses(&mut self) -> Result<()> {
        let a = &mut self.ahead;
        let (buf, misses) = (&a.entry_keys, &a.misses);
        let entry = |j: u32| {
            let m = &misses[j as usize];
            (m.group, &buf[m.start as usize..m.end as usize])
        };
        a.order.clear();
        a.order.extend(0..misses.len() as u32);
        a.order.sort_unstable_by(|&x, &y| entry(x).cmp(&entry(y)));
        // Each miss's entry, numbered in the database's order.
        a.unique.clear();
        a.unique.resize(misses.len(), 0);
        let mut u = 0;
        for (j, &m) in a.order.iter().enumerate() {
            if j > 0 && entry(a.order[j - 1]) != entry(m) {
                u += 1;
            }
            a.unique[m as usize] = u;
        }
        a.values.clear();
        a.found.clear();
        let order = &a.order;
        let firsts = (0..order.len())
            .filter(|&j| j == 0 || entry(order[j - 1]) != entry(order[j]))
            .map(|j| {
                let (g, key) = entry(order[j]);
                (g as usize, key)
            });
        self.db.multi_get(firsts, &mut a.values, &mut a.found)?;
        a.multi_gets += 1;
        a.entry_slots.clear();
        a.entry_slots.resize(u as usize + 1, NO_SLOT);
        for (j, m) in a.misses.iter().enumerate() {
            let u = a.unique[j] as usize;
            let slot = match a.entry_slots[u] {
                NO_SLOT => {
                    let key = &a.entry_keys[m.start as usize..m.end as usize];
                    let value = a.found[u].map(|(s, e)| &a.values[s..e]);
                    self.cache.insert_read(m.hash, m.group as usize, key, value)
                }
                slot => {
                    // A key twice in the batch: read again, as a second record's is.
                    self.cache.reference(slot);
                    slot
                }
            };
            a.entry_slots[u] = slot;
            a.slots[m.at as usize] = slot;
        }
        Ok(())
    }

    /// Make record `i` of the batch last read ahead the current key.
    #[inline]
    pub fn use_ahead(&mut self, i: usize) {
        let a = &mut self.ahead;
        self.key.clear();
        self.key.extend_from_slice(a.key(i));
        self.group = a.groups[i] as usize;
        a.current = Some(i);
    }

    /// The cache slot of the current key's entry of value state `name`, if it was read
    /// ahead and its slot still holds.
    #[inline]
    fn slot_ahead(&self, name: &str) -> Option<u32> {
        let a = &self.ahead;
        let i = a.current?;
        if a.generation != self.cache.generation() {
            return None;
        }
        let si = a.states[..a.covered].iter().position(|&n| n == name)?;
        let slot = a.slots[si * a.groups.len() + i];
        (slot != NO_SLOT).then_some(slot)
    }

    pub fn get<V: StateValue>(&mut self, s: ValueState<V>) -> Result<Option<V>> {
        if let Some(slot) = self.slot_ahead(s.name()) {
            return self
                .cache
                .slot_value(slot)
                .map(|b| codec::decode(b, s.name()))
                .transpose();
        }
        let a = &mut self.ahead;
        if a.states.len() < AHEAD_STATES && !a.states.contains(&s.name()) {
            a.states.push(s.name());
        }
        self.entry_key(s.name());
        self.cache
            .get(&mut self.db, self.group, &self.scratch)?
            .map(|b| codec::decode(b, s.name()))
            .transpose()
    }

    pub fn put<V: StateValue>(&mut self, s: ValueState<V>, value: &V) -> Result<()> {
        self.value_buf.clear();
        codec::encode_into(value, &mut self.value_buf, s.name())?;
        if let Some(slot) = self.slot_ahead(s.name()) {
            self.cache.set_slot(slot, Some(&self.value_buf));
            return Ok(());
        }
        self.entry_key(s.name());
        self.cache.set(
            &mut self.db,
            self.group,
            &self.scratch,
            Some(&self.value_buf),
        )
    }

    pub fn clear<V>(&mut self, s: ValueState<V>) -> Result<()> {
        if let Some(slot) = self.slot_ahead(s.name()) {
            self.cache.set_slot(slot, None);
            return Ok(());
        }
        self.entry_key(s.name());
        self.cache
            .set(&mut self.db, self.group, &self.scratch, None)
    }

    fn map_entry_key<UK: Serialize>(&mut self, name: &str, uk: &UK) -> Result<()> {
        self.entry_key(name);
        codec::encode_into(uk, &mut self.scratch, name)
    }

    pub fn map_get<UK: StateValue, UV: StateValue>(
        &mut self,
        s: MapState<UK, UV>,
        uk: &UK,
    ) -> Result<Option<UV>> {
        self.map_entry_key(s.name(), uk)?;
        self.cache
            .get(&mut self.db, self.group, &self.scratch)?
            .map(|b| codec::decode(b, s.name()))
            .transpose()
    }

    pub fn map_put<UK: StateValue, UV: StateValue>(
        &mut self,
        s: MapState<UK, UV>,
        uk: &UK,
        value: &UV,
    ) -> Result<()> {
        self.map_entry_key(s.name(), uk)?;
        self.value_buf.clear();
        codec::encode_into(value, &mut self.value_buf, s.name())?;
        self.cache.set(
            &mut self.db,
            self.group,
            &self.scratch,
            Some(&self.value_buf),
        )
    }

    pub fn map_remove<UK: StateValue, UV>(&mut self, s: MapState<UK, UV>, uk: &UK) -> Result<()> {
        self.map_entry_key(s.name(), uk)?;
        self.cache
            .set(&mut self.db, self.group, &self.scratch, None)
    }

    /// All entries of the current key's map, ordered by encoded map key.
    pub fn map_entries<UK: StateValue, UV: StateValue>(
        &mut self,
        s: MapState<UK, UV>,
    ) -> Result<Vec<(UK, UV)>> {
        self.entry_key(s.name());
        let plen = self.scratch.len();
        let mut out = Vec::new();
        self.cache.flush(&mut self.db)?;
        self.db.scan_prefix(self.group, &self.scratch, |k, v| {
            out.push((
                codec::decode(&k[plen..], s.name())?,
                codec::decode(v, s.name())?,
            ));
            Ok(())
        })?;
        Ok(out)
    }

    /// Every entry of map `s` of every key of this instance, key group by key group,
    /// kept if `f` returns true; a kept entry is written back only if its encoding
    /// changed. Leaves the current key as it was.
    pub fn map_retain_all<K: DeserializeOwned, UK: StateValue, UV: StateValue>(
        &mut self,
        s: MapState<UK, UV>,
        mut f: impl FnMut(&K, &UK, &mut UV) -> bool,
    ) -> Result<()> {
        let prefix = super::layout::name_prefix(s.name());
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut after = Vec::new();
        // Entries to write back, by index in `entries` (its value rewritten), and
        // whether they are kept (else deleted).
        let mut changed: Vec<(usize, bool)> = Vec::new();
        for g in 0..self.range.len() {
            self.entries_under(g, &prefix, &mut entries)?;
            changed.clear();
            for (i, (k, v)) in entries.iter_mut().enumerate() {
                let (key, uk): (K, &[u8]) =
                    postcard::take_from_bytes(&k[prefix.len()..]).map_err(|e| {
                        crate::error::Error::Codec {
                            what: s.name().to_string(),
                            message: e.to_string(),
                        }
                    })?;
                let uk: UK = codec::decode(uk, s.name())?;
                let mut uv: UV = codec::decode(v, s.name())?;
                if !f(&key, &uk, &mut uv) {
                    changed.push((i, false));
                    continue;
                }
                after.clear();
                codec::encode_into(&uv, &mut after, s.name())?;
                if after != *v {
                    std::mem::swap(v, &mut after);
                    changed.push((i, true));
                }
            }
            if !changed.is_empty() {
                let writes = changed.iter().map(|&(i, keep)| {
                    let (k, v) = &entries[i];
                    (&k[..], keep.then_some(&v[..]))
                });
                self.cache.write_through_all(&mut self.db, g, writes)?;
            }
        }
        Ok(())
    }

    pub fn map_clear<UK, UV>(&mut self, s: MapState<UK, UV>) -> Result<()> {
        self.entry_key(s.name());
        let mut doomed = Vec::new();
        self.cache.flush(&mut self.db)?;
        self.db.scan_prefix(self.group, &self.scratch, |k, _| {
            doomed.push(k.to_vec());
            Ok(())
        })?;
        let writes = doomed.iter().map(|k| (&k[..], None));
        self.cache
            .write_through_all(&mut self.db, self.group, writes)?;
        Ok(())
    }

    fn timer_entry(&mut self, domain: TimeDomain, ts: Timestamp) {
        self.scratch.clear();
        self.scratch
            .extend_from_slice(&mark(domain_byte(domain), ts));
        self.scratch.extend_from_slice(&self.key);
    }

    pub fn register_timer(&mut self, domain: TimeDomain, ts: Timestamp) -> Result<()> {
        self.timer_entry(domain, ts);
        self.db.put(self.group, &self.scratch, &[])
    }

    pub fn delete_timer(&mut self, domain: TimeDomain, ts: Timestamp) -> Result<()> {
        self.timer_entry(domain, ts);
        self.db.delete(self.group, &self.scratch)
    }

    /// Remove and return every timer of `domain` due at `upto` as `(time, encoded
    /// key)`, in time order within each key group.
    pub fn drain_due_timers(
        &mut self,
        domain: TimeDomain,
        upto: Timestamp,
        out: &mut Vec<(Timestamp, Vec<u8>)>,
    ) -> Result<()> {
        for (_, k) in self.drain_due(domain_byte(domain), upto)? {
            out.push((decode_ts(&k[2..MARK_LEN]), k[MARK_LEN..].to_vec()));
        }
        Ok(())
    }

    /// `[0, 'X', expiry, entry key]` for the entry key in `self.scratch`.
    fn ttl_timer(&self, expires: Timestamp) -> Vec<u8> {
        let mut k = Vec::with_capacity(MARK_LEN + self.scratch.len());
        k.extend_from_slice(&mark(TTL_MARK, expires));
        k.extend_from_slice(&self.scratch);
        k
    }

    pub fn get_ttl<V: StateValue>(
        &mut self,
        s: ValueState<V>,
        now: Timestamp,
    ) -> Result<Option<V>> {
        self.entry_key(s.name());
        match self.cache.get(&mut self.db, self.group, &self.scratch)? {
            Some(b) if b.len() >= 8 && decode_ts(&b[..8]) > now => {
                codec::decode(&b[8..], s.name()).map(Some)
            }
            _ => Ok(None),
        }
    }

    pub fn put_ttl<V: StateValue>(
        &mut self,
        s: ValueState<V>,
        value: &V,
        now: Timestamp,
    ) -> Result<()> {
        let expires = now.saturating_add(s.ttl_ms().unwrap_or(i64::MAX));
        self.clear_ttl(s)?;
        self.entry_key(s.name());
        self.value_buf.clear();
        self.value_buf
            .extend_from_slice(&super::layout::ts_bytes(expires));
        codec::encode_into(value, &mut self.value_buf, s.name())?;
        let timer = self.ttl_timer(expires);
        self.cache.set(
            &mut self.db,
            self.group,
            &self.scratch,
            Some(&self.value_buf),
        )?;
        self.db.put(self.group, &timer, &[])
    }

    pub fn clear_ttl<V>(&mut self, s: ValueState<V>) -> Result<()> {
        self.entry_key(s.name());
        let old = self
            .cache
            .get(&mut self.db, self.group, &self.scratch)?
            .and_then(|b| (b.len() >= 8).then(|| decode_ts(&b[..8])));
        if let Some(old) = old {
            let timer = self.ttl_timer(old);
            self.db.delete(self.group, &timer)?;
            self.cache
                .set(&mut self.db, self.group, &self.scratch, None)?;
        }
        Ok(())
    }

    /// Delete every value whose TTL expired at `now`; returns how many.
    pub fn expire_ttl(&mut self, now: Timestamp) -> Result<usize> {
        let mut expired = 0;
        for (g, k) in self.drain_due(TTL_MARK, now)? {
            let entry = &k[MARK_LEN..];
            // Only delete the value if this cleanup entry is its current expiry.
            let current = self
                .cache
                .get(&mut self.db, g, entry)?
                .is_some_and(|v| v.len() >= 8 && v[..8] == k[2..MARK_LEN]);
            if current {
                self.cache.set(&mut self.db, g, entry, None)?;
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// Remove every reserved entry `[0, kind, ts, ..]` with `ts <= upto` from every key
    /// group; returns `(group index, removed entry key)` pairs. These entries are never
    /// cached, so RocksDB alone holds them.
    fn drain_due(&mut self, kind: u8, upto: Timestamp) -> Result<Vec<(usize, Vec<u8>)>> {
        let (lo, hi) = due_range(kind, upto);
        let mut out = Vec::new();
        let mut keys = Vec::new();
        for g in 0..self.range.len() {
            self.db.take_range(g, &lo, &hi, &mut keys)?;
            out.extend(keys.drain(..).map(|k| (g, k)));
        }
        Ok(out)
    }

    /// Store an entry of a restored snapshot.
    pub fn restore_entry(&mut self, kg: KeyGroup, key: &[u8], value: &[u8]) -> Result<()> {
        if self.range.contains(kg) {
            let g = (kg.0 - self.range.start) as usize;
            self.cache
                .write_through(&mut self.db, g, key, Some(value))?;
        }
        Ok(())
    }

    pub fn len(&mut self) -> Result<usize> {
        self.cache.flush(&mut self.db)?;
        self.db.count()
    }

    /// A local RocksDB checkpoint (a memtable flush and hard links), uploaded later.
    /// The cache's dirty entries go first, in one batch that the checkpoint's thread
    /// writes before it flushes, so the checkpoint holds the state as of the barrier.
    pub fn snapshot(&mut self, id: CheckpointId) -> Result<StateSnapshot> {
        self.cache.flush_for_checkpoint(&mut self.db)?;
        Ok(StateSnapshot {
            pending_db: Some(self.db.checkpoint(id)?),
            ..Default::default()
        })
    }
}
