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

    /// The key groups this instance owns.
    pub fn range(&self) -> KeyGroupRange {
        self.range
    }

    /// Make `key` the current key.
    pub fn set_key<K: Serialize>(&mut self, key: &K) -> Result<()> {
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

    pub fn get<V: StateValue>(&mut self, s: ValueState<V>) -> Result<Option<V>> {
        self.entry_key(s.name());
        self.cache
            .get(&mut self.db, self.group, &self.scratch)?
            .map(|b| codec::decode(b, s.name()))
            .transpose()
    }

    pub fn put<V: StateValue>(&mut self, s: ValueState<V>, value: &V) -> Result<()> {
        self.entry_key(s.name());
        self.value_buf.clear();
        codec::encode_into(value, &mut self.value_buf, s.name())?;
        self.cache.set(
            &mut self.db,
            self.group,
            &self.scratch,
            Some(&self.value_buf),
        )
    }

    pub fn clear<V>(&mut self, s: ValueState<V>) -> Result<()> {
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
