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

use crate::codec;
use crate::error::Result;
use crate::ids::{KeyGroup, KeyGroupRange, OperatorId};
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
    /// Keyed state: entries per key group.
    pub keyed: Vec<KeyGroupEntries>,
    /// Operator (non-keyed) state entries. On restore every subtask sees the entries of
    /// all subtasks (union semantics); sources pick the offsets of their own splits.
    pub list: Vec<Vec<u8>>,
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

/// A point-in-time view of one operator's state, taken in O(key groups) at the barrier
/// and encoded later, off the task thread. Encodes to exactly the bytes of the
/// equivalent [`OperatorSnapshot`] (a map and a sequence of pairs share postcard's wire
/// format), which is what restore decodes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StateSnapshot {
    /// Keyed state per non-empty key group.
    pub keyed: Vec<(KeyGroup, SharedGroup)>,
    /// Operator state entries.
    pub list: Vec<Vec<u8>>,
}

/// What a task writes at a barrier: every stateful operator's view, encoded later.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TaskStateView {
    /// One entry per stateful operator of the task.
    pub operators: Vec<(OperatorId, StateSnapshot)>,
}

/// In-memory keyed state of one operator instance: an ordered map per key group.
///
/// Key groups are shared copy-on-write with snapshots: taking a snapshot clones
/// `Arc`s, and a group is copied only when it is written while a snapshot that still
/// holds it is being uploaded.
#[derive(Debug)]
pub struct MemoryKeyedState {
    range: KeyGroupRange,
    groups: Vec<SharedGroup>,
    /// The current key's key group and entry prefix without the state name.
    current_group: usize,
    current_key: Vec<u8>,
    scratch: Vec<u8>,
    value_buf: Vec<u8>,
}

impl MemoryKeyedState {
    /// Empty state for the key groups in `range`.
    pub fn new(range: KeyGroupRange) -> Self {
        MemoryKeyedState {
            range,
            groups: (0..range.len()).map(|_| SharedGroup::default()).collect(),
            current_group: 0,
            current_key: Vec::new(),
            scratch: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    /// The key groups this instance owns.
    pub fn range(&self) -> KeyGroupRange {
        self.range
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
        match self.groups[self.current_group].get(self.scratch.as_slice()) {
            Some(bytes) => codec::decode(bytes, s.name).map(Some),
            None => Ok(None),
        }
    }

    /// Set the current key's value.
    pub fn put<V: Serialize>(&mut self, s: ValueState<V>, value: &V) -> Result<()> {
        self.entry_key(s.name);
        self.value_buf.clear();
        codec::encode_into(value, &mut self.value_buf, s.name)?;
        self.upsert();
        Ok(())
    }

    /// Store `value_buf` under the entry key in `scratch`, reusing an existing entry's
    /// buffer so that updating a key allocates nothing.
    fn upsert(&mut self) {
        let group = Arc::make_mut(&mut self.groups[self.current_group]);
        match group.get_mut(self.scratch.as_slice()) {
            Some(existing) => {
                existing.clear();
                existing.extend_from_slice(&self.value_buf);
            }
            None => {
                group.insert(self.scratch.clone(), self.value_buf.clone());
            }
        }
    }

    /// Remove the current key's value.
    pub fn clear<V>(&mut self, s: ValueState<V>) {
        self.entry_key(s.name);
        if self.groups[self.current_group].contains_key(self.scratch.as_slice()) {
            Arc::make_mut(&mut self.groups[self.current_group]).remove(self.scratch.as_slice());
        }
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
        match self.groups[self.current_group].get(self.scratch.as_slice()) {
            Some(bytes) => codec::decode(bytes, s.name).map(Some),
            None => Ok(None),
        }
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
        self.upsert();
        Ok(())
    }

    /// Remove one entry of the current key's map.
    pub fn map_remove<UK: Serialize, UV>(&mut self, s: MapState<UK, UV>, uk: &UK) -> Result<()> {
        self.map_entry_key(s.name, uk)?;
        if self.groups[self.current_group].contains_key(self.scratch.as_slice()) {
            Arc::make_mut(&mut self.groups[self.current_group]).remove(self.scratch.as_slice());
        }
        Ok(())
    }

    /// All entries of the current key's map, ordered by encoded map key.
    pub fn map_entries<UK: DeserializeOwned, UV: DeserializeOwned>(
        &mut self,
        s: MapState<UK, UV>,
    ) -> Result<Vec<(UK, UV)>> {
        self.entry_key(s.name);
        let prefix = self.scratch.as_slice();
        let mut out = Vec::new();
        for (k, v) in self.groups[self.current_group].range(prefix.to_vec()..) {
            let Some(rest) = k.strip_prefix(prefix) else {
                break;
            };
            out.push((codec::decode(rest, s.name)?, codec::decode(v, s.name)?));
        }
        Ok(out)
    }

    /// Remove every entry of the current key's map.
    pub fn map_clear<UK, UV>(&mut self, s: MapState<UK, UV>) {
        self.entry_key(s.name);
        let prefix = self.scratch.clone();
        let group = Arc::make_mut(&mut self.groups[self.current_group]);
        let doomed: Vec<Vec<u8>> = group
            .range(prefix.clone()..)
            .map(|(k, _)| k.clone())
            .take_while(|k| k.starts_with(&prefix))
            .collect();
        for k in doomed {
            group.remove(&k);
        }
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
        if !self.groups[self.current_group].contains_key(self.scratch.as_slice()) {
            Arc::make_mut(&mut self.groups[self.current_group])
                .insert(self.scratch.clone(), Vec::new());
        }
    }

    /// Delete a timer of the current key, if registered.
    pub fn delete_timer(&mut self, domain: TimeDomain, ts: Timestamp) {
        self.timer_entry(domain, ts);
        if self.groups[self.current_group].contains_key(self.scratch.as_slice()) {
            Arc::make_mut(&mut self.groups[self.current_group]).remove(self.scratch.as_slice());
        }
    }

    /// Remove and return every timer of `domain` due at `upto`, as
    /// `(key group, time, encoded key)`, in time order within each key group.
    pub fn drain_due_timers(
        &mut self,
        domain: TimeDomain,
        upto: Timestamp,
        out: &mut Vec<(KeyGroup, Timestamp, Vec<u8>)>,
    ) {
        let start = self.range.start;
        self.drain_due(domain_byte(domain), upto, |i, _, k| {
            out.push((
                KeyGroup(start + i as u16),
                decode_ts(&k[2..10]),
                k[10..].to_vec(),
            ));
        });
    }

    fn ttl_timer(&mut self, expires: Timestamp) {
        // [0, 'X', expiry, entry key]: the entry key is in `self.scratch`.
        let mut k = Vec::with_capacity(10 + self.scratch.len());
        k.push(TIMER_MARK);
        k.push(TTL_MARK);
        k.extend_from_slice(&ts_bytes(expires));
        k.extend_from_slice(&self.scratch);
        self.value_buf = k;
    }

    /// The current key's value of a state with a TTL, `None` once expired at `now`.
    pub fn get_ttl<V: DeserializeOwned>(
        &mut self,
        s: ValueState<V>,
        now: Timestamp,
    ) -> Result<Option<V>> {
        self.entry_key(s.name);
        let Some(bytes) = self.groups[self.current_group].get(self.scratch.as_slice()) else {
            return Ok(None);
        };
        if bytes.len() < 8 || decode_ts(&bytes[..8]) <= now {
            return Ok(None);
        }
        codec::decode(&bytes[8..], s.name).map(Some)
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
        self.clear_ttl(s);
        self.entry_key(s.name);
        let mut stored = ts_bytes(expires).to_vec();
        codec::encode_into(value, &mut stored, s.name)?;
        self.ttl_timer(expires);
        let timer = std::mem::take(&mut self.value_buf);
        let group = Arc::make_mut(&mut self.groups[self.current_group]);
        group.insert(self.scratch.clone(), stored);
        group.insert(timer, Vec::new());
        Ok(())
    }

    /// Remove the current key's value of a state with a TTL, and its cleanup entry.
    pub fn clear_ttl<V>(&mut self, s: ValueState<V>) {
        self.entry_key(s.name);
        let old = self.groups[self.current_group]
            .get(self.scratch.as_slice())
            .filter(|b| b.len() >= 8)
            .map(|b| decode_ts(&b[..8]));
        if let Some(old) = old {
            self.ttl_timer(old);
            let timer = std::mem::take(&mut self.value_buf);
            let group = Arc::make_mut(&mut self.groups[self.current_group]);
            group.remove(&timer);
            group.remove(self.scratch.as_slice());
        }
    }

    /// Delete every value whose TTL expired at `now`; returns how many.
    pub fn expire_ttl(&mut self, now: Timestamp) -> usize {
        let mut expired = 0;
        self.drain_due(TTL_MARK, now, |_, g, k| {
            let entry = &k[10..];
            // Only delete the value if this cleanup entry is its current expiry.
            if g.get(entry)
                .is_some_and(|v| v.len() >= 8 && v[..8] == k[2..10])
            {
                g.remove(entry);
                expired += 1;
            }
        });
        expired
    }

    /// Remove every reserved entry `[0, kind, ts, ..]` with `ts <= upto` from every key
    /// group, calling `f(group index, group, removed entry key)` for each.
    fn drain_due(
        &mut self,
        kind: u8,
        upto: Timestamp,
        mut f: impl FnMut(usize, &mut BTreeMap<Vec<u8>, Vec<u8>>, &[u8]),
    ) {
        let (lo, hi) = due_range(kind, upto);
        for (i, group) in self.groups.iter_mut().enumerate() {
            let due: Vec<Vec<u8>> = group
                .range(lo.clone()..hi.clone())
                .map(|(k, _)| k.clone())
                .collect();
            if due.is_empty() {
                continue;
            }
            let g = Arc::make_mut(group);
            for k in due {
                g.remove(&k);
                f(i, g, &k);
            }
        }
    }

    /// Number of entries over all key groups.
    pub fn len(&self) -> usize {
        self.groups.iter().map(|g| g.len()).sum()
    }

    /// Whether no entry is stored.
    pub fn is_empty(&self) -> bool {
        self.groups.iter().all(|g| g.is_empty())
    }

    /// A view of every non-empty key group for a checkpoint: O(key groups), no copy.
    pub fn snapshot(&self) -> Vec<(KeyGroup, SharedGroup)> {
        self.groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .map(|(i, g)| (KeyGroup(self.range.start + i as u16), g.clone()))
            .collect()
    }

    /// Load the entries of the key groups this instance owns from restored snapshots
    /// (taken at any parallelism).
    pub fn restore<'a>(&mut self, snapshots: impl IntoIterator<Item = &'a OperatorSnapshot>) {
        for snap in snapshots {
            for (kg, entries) in &snap.keyed {
                if self.range.contains(*kg) {
                    let g = Arc::make_mut(&mut self.groups[(kg.0 - self.range.start) as usize]);
                    g.extend(entries.iter().cloned());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{key_group_of_bytes, SubtaskIndex};
    use proptest::prelude::*;

    const V: ValueState<i64> = ValueState::new("v");
    const M: MapState<String, u32> = MapState::new("m");

    fn full() -> MemoryKeyedState {
        MemoryKeyedState::new(KeyGroupRange { start: 0, end: 128 })
    }

    fn key(s: &mut MemoryKeyedState, k: u64) {
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
        s.drain_due_timers(TimeDomain::EventTime, 10, &mut out);
        let mut fired: Vec<(Timestamp, u64)> = out
            .iter()
            .map(|(_, t, k)| (*t, codec::decode(k, "k").unwrap()))
            .collect();
        fired.sort();
        assert_eq!(fired, vec![(-5, 2), (10, 1)]);
        out.clear();
        s.drain_due_timers(TimeDomain::EventTime, 10, &mut out);
        assert!(out.is_empty(), "fired timers are gone");
        // The remaining timers move with their key groups on rescale.
        let view = StateSnapshot {
            keyed: s.snapshot(),
            list: vec![],
        };
        let snap: OperatorSnapshot =
            codec::decode(&codec::encode(&view, "t").unwrap(), "t").unwrap();
        let mut a = MemoryKeyedState::new(KeyGroupRange { start: 0, end: 64 });
        let mut b = MemoryKeyedState::new(KeyGroupRange {
            start: 64,
            end: 128,
        });
        a.restore([&snap]);
        b.restore([&snap]);
        out.clear();
        a.drain_due_timers(TimeDomain::EventTime, i64::MAX, &mut out);
        b.drain_due_timers(TimeDomain::EventTime, i64::MAX, &mut out);
        let mut rest: Vec<(Timestamp, u64)> = out
            .iter()
            .map(|(_, t, k)| (*t, codec::decode(k, "k").unwrap()))
            .collect();
        rest.sort();
        assert_eq!(rest, vec![(11, 4), (30, 1)]);
        out.clear();
        a.drain_due_timers(TimeDomain::ProcessingTime, 0, &mut out);
        b.drain_due_timers(TimeDomain::ProcessingTime, 0, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn snapshot_is_isolated_from_later_writes() {
        let mut s = full();
        key(&mut s, 1);
        s.put(V, &1).unwrap();
        let view = StateSnapshot {
            keyed: s.snapshot(),
            list: vec![b"x".to_vec()],
        };
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
            let mut olds: Vec<MemoryKeyedState> = (0..p1)
                .map(|i| MemoryKeyedState::new(KeyGroupRange::for_subtask(max, p1, SubtaskIndex(i))))
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
                .iter()
                .map(|s| codec::decode(&codec::encode(&StateSnapshot { keyed: s.snapshot(), list: vec![] }, "t").unwrap(), "t").unwrap())
                .collect();
            let mut news: Vec<MemoryKeyedState> = (0..p2)
                .map(|i| MemoryKeyedState::new(KeyGroupRange::for_subtask(max, p2, SubtaskIndex(i))))
                .collect();
            for n in &mut news { n.restore(&snaps); }
            prop_assert_eq!(news.iter().map(|n| n.len()).sum::<usize>(), entries.len());
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
