//! The timer service of the in-memory backend: per time domain, timers ordered by time
//! with a set per time for deduplication, so registering is idempotent, deleting is a
//! point operation and firing costs O(due timers).
//!
//! Times are grouped into slots of [`SLOT_MS`] milliseconds, each shared copy-on-write
//! with the snapshots being encoded: a snapshot clones O(slots) `Arc`s, and a write
//! copies only the slot it touches.

use super::layout::{domain_byte, mark, GroupWriter};
use super::table::{hasher, FixedHasher};
use crate::codec;
use crate::error::Result;
use crate::ids::key_group_of_bytes;
use crate::time::{TimeDomain, Timestamp};
use serde::Serialize;
use std::collections::BTreeMap;
use std::hash::Hash;
use std::sync::Arc;

const SLOT_BITS: u32 = 10;
/// Width of a slot in milliseconds.
pub(crate) const SLOT_MS: i64 = 1 << SLOT_BITS;

type Slot<K> = BTreeMap<Timestamp, Keys<K>>;

/// The keys with a timer at one time. Most times have one key (event times in
/// milliseconds rarely repeat, unless timers sit on window or day ends), so a single
/// key is kept without a set: registering it costs no allocation beyond its entry.
#[derive(Debug, Clone)]
enum Keys<K> {
    One(K),
    Many(hashbrown::HashSet<K, FixedHasher>),
}

impl<K: Hash + Eq + Clone> Keys<K> {
    fn contains(&self, k: &K) -> bool {
        match self {
            Keys::One(x) => x == k,
            Keys::Many(set) => set.contains(k),
        }
    }

    /// Add `k`; whether it was new.
    fn insert(&mut self, k: &K) -> bool {
        match self {
            Keys::One(x) if x == k => false,
            Keys::One(_) => {
                let mut set = hashbrown::HashSet::with_capacity_and_hasher(2, hasher());
                let Keys::One(x) = std::mem::replace(self, Keys::Many(Default::default())) else {
                    unreachable!()
                };
                set.insert(x);
                set.insert(k.clone());
                *self = Keys::Many(set);
                true
            }
            Keys::Many(set) => {
                let before = set.len();
                set.get_or_insert_with(k, K::clone);
                set.len() > before
            }
        }
    }

    /// Remove `k` (which is present); whether none is left.
    fn remove(&mut self, k: &K) -> bool {
        match self {
            Keys::One(_) => true,
            Keys::Many(set) => {
                set.remove(k);
                set.is_empty()
            }
        }
    }
}

impl<K> Keys<K> {
    fn iter(&self) -> impl Iterator<Item = &K> {
        let (one, many) = match self {
            Keys::One(x) => (Some(x), None),
            Keys::Many(set) => (None, Some(set.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    fn into_iter(self) -> impl Iterator<Item = K> {
        let (one, many) = match self {
            Keys::One(x) => (Some(x), None),
            Keys::Many(set) => (None, Some(set.into_iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

fn slot_of(ts: Timestamp) -> i64 {
    ts >> SLOT_BITS
}

/// Timers of one time domain.
#[derive(Debug)]
struct TimerQueue<K> {
    slots: BTreeMap<i64, Arc<Slot<K>>>,
    len: usize,
}

impl<K> Default for TimerQueue<K> {
    fn default() -> Self {
        TimerQueue {
            slots: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<K: Hash + Eq + Clone> TimerQueue<K> {
    fn contains(&self, ts: Timestamp, k: &K) -> bool {
        self.slots
            .get(&slot_of(ts))
            .and_then(|s| s.get(&ts))
            .is_some_and(|keys| keys.contains(k))
    }

    fn register(&mut self, ts: Timestamp, k: &K) {
        let shared = self.slots.entry(slot_of(ts)).or_default();
        // A slot that a snapshot still holds is copied only if the timer is new.
        if Arc::get_mut(shared).is_none() && shared.get(&ts).is_some_and(|keys| keys.contains(k)) {
            return;
        }
        match Arc::make_mut(shared).entry(ts) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(Keys::One(k.clone()));
                self.len += 1;
            }
            std::collections::btree_map::Entry::Occupied(mut e) => {
                if e.get_mut().insert(k) {
                    self.len += 1;
                }
            }
        }
    }

    fn delete(&mut self, ts: Timestamp, k: &K) {
        if !self.contains(ts, k) {
            return;
        }
        let s = slot_of(ts);
        let Some(shared) = self.slots.get_mut(&s) else {
            return;
        };
        let slot = Arc::make_mut(shared);
        if let Some(keys) = slot.get_mut(&ts) {
            self.len -= 1;
            if keys.remove(k) {
                slot.remove(&ts);
            }
        }
        if slot.is_empty() {
            self.slots.remove(&s);
        }
    }

    /// Move every timer due at `upto` to `out`, in time order.
    fn drain_due(&mut self, upto: Timestamp, out: &mut Vec<(Timestamp, K)>) {
        while let Some(mut first) = self.slots.first_entry() {
            if first.key().saturating_mul(SLOT_MS) > upto {
                return;
            }
            let before = out.len();
            let emptied = match Arc::get_mut(first.get_mut()) {
                Some(slot) => {
                    while let Some(e) = slot.first_entry() {
                        if *e.key() > upto {
                            break;
                        }
                        let (ts, keys) = e.remove_entry();
                        out.extend(keys.into_iter().map(|k| (ts, k)));
                    }
                    slot.is_empty()
                }
                None => {
                    // A snapshot holds the slot: copy out what is due and rebuild the
                    // rest, rather than copying the whole slot first.
                    let shared = first.get().clone();
                    let mut rest = Slot::new();
                    for (&ts, keys) in shared.iter() {
                        if ts <= upto {
                            out.extend(keys.iter().map(|k| (ts, k.clone())));
                        } else {
                            rest.insert(ts, keys.clone());
                        }
                    }
                    let empty = rest.is_empty();
                    *first.get_mut() = Arc::new(rest);
                    empty
                }
            };
            self.len -= out.len() - before;
            if !emptied {
                return;
            }
            first.remove();
        }
    }
}

/// Event-time and processing-time timers of one keyed operator instance.
#[derive(Debug)]
pub(crate) struct TimerService<K> {
    event: TimerQueue<K>,
    processing: TimerQueue<K>,
}

impl<K> Default for TimerService<K> {
    fn default() -> Self {
        TimerService {
            event: TimerQueue::default(),
            processing: TimerQueue::default(),
        }
    }
}

impl<K: Hash + Eq + Clone + Serialize + Send + Sync + 'static> TimerService<K> {
    fn queue(&mut self, d: TimeDomain) -> &mut TimerQueue<K> {
        match d {
            TimeDomain::EventTime => &mut self.event,
            TimeDomain::ProcessingTime => &mut self.processing,
        }
    }

    /// Register a timer (idempotent).
    pub fn register(&mut self, d: TimeDomain, ts: Timestamp, k: &K) {
        self.queue(d).register(ts, k)
    }

    /// Delete a timer, if registered.
    pub fn delete(&mut self, d: TimeDomain, ts: Timestamp, k: &K) {
        self.queue(d).delete(ts, k)
    }

    /// Remove and return every timer of `d` due at `upto`, in time order.
    pub fn drain_due(&mut self, d: TimeDomain, upto: Timestamp, out: &mut Vec<(Timestamp, K)>) {
        self.queue(d).drain_due(upto, out)
    }

    /// Timers registered.
    pub fn len(&self) -> usize {
        self.event.len + self.processing.len
    }

    /// A point-in-time view (O(slots)).
    pub fn share(&self) -> TimersView<K> {
        TimersView {
            event: self.event.slots.values().cloned().collect(),
            processing: self.processing.slots.values().cloned().collect(),
        }
    }
}

/// Timers as of a barrier.
pub(crate) struct TimersView<K> {
    event: Vec<Arc<Slot<K>>>,
    processing: Vec<Arc<Slot<K>>>,
}

impl<K: Serialize> TimersView<K> {
    /// Write every timer as a `0 | domain | time | key` entry.
    pub fn encode(&self, max_parallelism: u16, w: &mut GroupWriter) -> Result<()> {
        let mut key = Vec::new();
        for (d, slots) in [
            (TimeDomain::EventTime, &self.event),
            (TimeDomain::ProcessingTime, &self.processing),
        ] {
            for slot in slots {
                for (&ts, keys) in slot.iter() {
                    let m = mark(domain_byte(d), ts);
                    for k in keys.iter() {
                        key.clear();
                        codec::encode_into(k, &mut key, "timer key")?;
                        w.push(key_group_of_bytes(&key, max_parallelism), &[&m, &key], &[]);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        Register(bool, i64, u8),
        Delete(bool, i64, u8),
        Fire(bool, i64),
        Snapshot,
    }

    fn time() -> impl Strategy<Value = i64> {
        prop_oneof![-3000i64..3000, Just(i64::MIN), Just(i64::MAX)]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<bool>(), time(), 0u8..8).prop_map(|(d, t, k)| Op::Register(d, t, k)),
            (any::<bool>(), time(), 0u8..8).prop_map(|(d, t, k)| Op::Delete(d, t, k)),
            (any::<bool>(), time()).prop_map(|(d, t)| Op::Fire(d, t)),
            Just(Op::Snapshot),
        ]
    }

    fn dom(event: bool) -> TimeDomain {
        if event {
            TimeDomain::EventTime
        } else {
            TimeDomain::ProcessingTime
        }
    }

    proptest! {
        /// Against a model (an ordered set of (domain, time, key)): registration is
        /// idempotent, deletion exact, firing returns exactly the due timers in time
        /// order, and snapshots are unaffected by later changes.
        #[test]
        fn matches_an_ordered_set(ops in proptest::collection::vec(op(), 0..300)) {
            let mut s = TimerService::<u8>::default();
            let mut model: BTreeSet<(bool, i64, u8)> = BTreeSet::new();
            let mut snaps = Vec::new();
            for op in ops {
                match op {
                    Op::Register(d, t, k) => { s.register(dom(d), t, &k); model.insert((d, t, k)); }
                    Op::Delete(d, t, k) => { s.delete(dom(d), t, &k); model.remove(&(d, t, k)); }
                    Op::Fire(d, upto) => {
                        let mut out = Vec::new();
                        s.drain_due(dom(d), upto, &mut out);
                        let due: Vec<(bool, i64, u8)> = model.iter().filter(|(md, t, _)| *md == d && *t <= upto).copied().collect();
                        for x in &due { model.remove(x); }
                        prop_assert!(out.windows(2).all(|w| w[0].0 <= w[1].0), "time order");
                        let mut got: Vec<(bool, i64, u8)> = out.iter().map(|(t, k)| (d, *t, *k)).collect();
                        got.sort();
                        prop_assert_eq!(got, due);
                    }
                    Op::Snapshot => snaps.push((s.share(), model.clone())),
                }
                prop_assert_eq!(s.len(), model.len());
            }
            for (view, expected) in snaps {
                let mut got = BTreeSet::new();
                for (d, slots) in [(true, &view.event), (false, &view.processing)] {
                    for slot in slots {
                        for (t, keys) in slot.iter() {
                            for k in keys.iter() { got.insert((d, *t, *k)); }
                        }
                    }
                }
                prop_assert_eq!(got, expected);
            }
        }
    }
}
