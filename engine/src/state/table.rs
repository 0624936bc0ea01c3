//! A typed hash table shared copy-on-write with the snapshots being encoded.
//!
//! Entries live in [`SEGMENTS`] hash tables chosen by hash. A snapshot clones the
//! segments' `Arc`s (O(segments), no entry copied); the first write to a segment that a
//! snapshot still holds copies that one segment. The encoder releases each segment as
//! soon as it has written it, so what is copied is bounded by the segments written
//! between the barrier and the moment the encoder reaches them, never the whole state
//! more than once per checkpoint.
//!
//! With 1M keys and more, nearly all the time of a keyed operator is two cache misses
//! per record: the bucket's control bytes and the bucket. The keyed operator knows the
//! keys of a whole batch before it processes them, so it prefetches a few records ahead
//! ([`PrefetchHints`]): each segment remembers where its buckets were last seen.

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// Segments per table; a power of two.
pub(crate) const SEGMENTS: usize = 256;

/// A fast, fixed-seed hash: iteration order (and so timer firing order among equal
/// times) is the same in every run.
pub(crate) type FixedHasher = foldhash::fast::FixedState;

pub(crate) fn hasher() -> FixedHasher {
    foldhash::fast::FixedState::with_seed(0x6578_6163_746c_7921)
}

#[inline]
pub(crate) fn hash_of<K: Hash + ?Sized>(k: &K) -> u64 {
    hasher().hash_one(k)
}

/// Segment of a hash. The table inside a segment uses the low bits for buckets and the
/// top 7 for its control bytes, so the segment comes from bits in between.
#[inline]
fn segment(h: u64) -> usize {
    ((h >> 40) as usize) & (SEGMENTS - 1)
}

/// One segment, as shared with snapshots.
pub(crate) type Segment<K, E> = Arc<HashTable<(K, E)>>;

/// Where each segment's buckets were last seen, so that a key's bucket can be fetched
/// into the cache before it is needed.
///
/// The table stores its buckets just below its control bytes, bucket `i` at
/// `ctrl - (i + 1) * size`, and starts probing a hash at position `hash & mask`. A
/// segment's `ctrl` is learnt from the address and index of any entry the table hands
/// out, and goes stale when the segment grows or is copied until the next write to it.
/// A prefetch is only a hint to the processor: a stale or wrong address costs a wasted
/// cache line, never a wrong result, and nothing is ever read through these addresses.
#[derive(Debug)]
pub(crate) struct PrefetchHints {
    /// Bytes per bucket.
    size: usize,
    /// Per segment: its control bytes' address (0 = not seen yet) and bucket mask.
    segs: Box<[(AtomicUsize, AtomicUsize)]>,
}

impl PrefetchHints {
    fn new(size: usize) -> Self {
        PrefetchHints {
            size,
            segs: (0..SEGMENTS)
                .map(|_| (AtomicUsize::new(0), AtomicUsize::new(0)))
                .collect(),
        }
    }

    /// Note that the entry at `addr` is bucket `index` of segment `seg`, whose table has
    /// `buckets` buckets.
    #[inline]
    fn note(&self, seg: usize, addr: usize, index: usize, buckets: usize) {
        let (ctrl, mask) = &self.segs[seg];
        ctrl.store(addr.wrapping_add((index + 1) * self.size), Relaxed);
        mask.store(buckets.wrapping_sub(1), Relaxed);
    }

    /// Ask the processor to fetch the control bytes and the first bucket probed for
    /// `hash` (a [`hash_of`] value).
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        if let Some((ctrl, bucket)) = self.addresses(hash) {
            prefetch(ctrl);
            prefetch(bucket);
        }
    }

    /// The addresses of the control bytes and the bucket probed first for `hash`, if
    /// its segment was seen.
    #[inline]
    fn addresses(&self, hash: u64) -> Option<(usize, usize)> {
        let (ctrl, mask) = &self.segs[segment(hash)];
        let ctrl = ctrl.load(Relaxed);
        if ctrl == 0 {
            return None;
        }
        let pos = (hash as usize) & mask.load(Relaxed);
        Some((
            ctrl.wrapping_add(pos),
            ctrl.wrapping_sub((pos + 1) * self.size),
        ))
    }
}

/// A prefetch of the cache line at `addr`: a hint that never faults and reads nothing
/// the program sees, so any address is allowed.
#[inline(always)]
fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` takes any address; it does not fault and has no effect on
    // the program's memory, only on what the cache holds.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(addr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// A hash table from `K` to `E` in copy-on-write segments.
#[derive(Debug)]
pub(crate) struct CowTable<K, E> {
    segs: Vec<Segment<K, E>>,
    len: usize,
    hints: Arc<PrefetchHints>,
}

impl<K: Hash + Eq + Clone, E: Clone> Default for CowTable<K, E> {
    fn default() -> Self {
        CowTable {
            segs: (0..SEGMENTS).map(|_| Arc::new(HashTable::new())).collect(),
            len: 0,
            hints: Arc::new(PrefetchHints::new(std::mem::size_of::<(K, E)>())),
        }
    }
}

/// The entry `o` of segment `seg` (as `&mut E`), after noting where it is.
#[inline]
fn noted<'a, K, E>(
    hints: &PrefetchHints,
    seg: usize,
    o: hashbrown::hash_table::OccupiedEntry<'a, (K, E)>,
) -> &'a mut E {
    let index = o.bucket_index();
    let addr = o.get() as *const (K, E) as usize;
    let table = o.into_table();
    hints.note(seg, addr, index, table.num_buckets());
    &mut table
        .get_bucket_mut(index)
        .expect("the bucket just found is full")
        .1
}

impl<K: Hash + Eq + Clone, E: Clone> CowTable<K, E> {
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Where the segments' buckets are, for [`PrefetchHints::prefetch`]; shared, and
    /// kept up to date by every write.
    pub fn hints(&self) -> Arc<PrefetchHints> {
        self.hints.clone()
    }

    #[inline]
    pub fn get(&self, k: &K) -> Option<&E> {
        let h = hash_of(k);
        self.segs[segment(h)]
            .find(h, |(x, _)| x == k)
            .map(|(_, e)| e)
    }

    /// The entry of `k` for writing, copying its segment if a snapshot holds it.
    #[inline]
    pub fn get_mut(&mut self, k: &K) -> Option<&mut E> {
        let h = hash_of(k);
        let i = segment(h);
        let seg = &mut self.segs[i];
        seg.find(h, |(x, _)| x == k)?;
        let o = Arc::make_mut(seg).find_entry(h, |(x, _)| x == k).ok()?;
        Some(noted(&self.hints, i, o))
    }

    /// The entry of `k`, inserted with `make` if absent.
    #[inline]
    pub fn upsert(&mut self, k: &K, make: impl FnOnce() -> E) -> &mut E {
        let h = hash_of(k);
        let i = segment(h);
        let seg = Arc::make_mut(&mut self.segs[i]);
        let o = match seg.entry(h, |(x, _)| x == k, |(x, _)| hash_of(x)) {
            Entry::Occupied(o) => o,
            Entry::Vacant(v) => {
                self.len += 1;
                v.insert((k.clone(), make()))
            }
        };
        noted(&self.hints, i, o)
    }

    /// Set `k` to `e`; returns the old entry.
    #[inline]
    pub fn insert(&mut self, k: &K, e: E) -> Option<E> {
        let h = hash_of(k);
        let i = segment(h);
        let seg = Arc::make_mut(&mut self.segs[i]);
        match seg.entry(h, |(x, _)| x == k, |(x, _)| hash_of(x)) {
            Entry::Occupied(o) => Some(std::mem::replace(noted(&self.hints, i, o), e)),
            Entry::Vacant(v) => {
                self.len += 1;
                noted(&self.hints, i, v.insert((k.clone(), e)));
                None
            }
        }
    }

    /// Set `k` to a copy of `e` in one probe (an existing entry's buffers are reused).
    #[inline]
    pub fn set(&mut self, k: &K, e: &E) {
        let h = hash_of(k);
        let i = segment(h);
        let seg = Arc::make_mut(&mut self.segs[i]);
        match seg.entry(h, |(x, _)| x == k, |(x, _)| hash_of(x)) {
            Entry::Occupied(o) => noted(&self.hints, i, o).clone_from(e),
            Entry::Vacant(v) => {
                self.len += 1;
                noted(&self.hints, i, v.insert((k.clone(), e.clone())));
            }
        }
    }

    /// Remove `k`; a segment is copied only if it holds `k`.
    #[inline]
    pub fn remove(&mut self, k: &K) -> Option<E> {
        let h = hash_of(k);
        let seg = &mut self.segs[segment(h)];
        seg.find(h, |(x, _)| x == k)?;
        let (entry, _) = Arc::make_mut(seg)
            .find_entry(h, |(x, _)| x == k)
            .ok()?
            .remove();
        self.len -= 1;
        Some(entry.1)
    }

    /// Visit every entry in memory order, keeping those for which `f` returns true (with
    /// the changes `f` made). Each non-empty segment is copied if a snapshot holds it.
    pub fn retain_all(&mut self, mut f: impl FnMut(&K, &mut E) -> bool) {
        for seg in &mut self.segs {
            if seg.is_empty() {
                continue;
            }
            let seg = Arc::make_mut(seg);
            let before = seg.len();
            seg.retain(|(k, e)| f(k, e));
            self.len -= before - seg.len();
        }
    }

    /// The segments, shared (a snapshot).
    pub fn share(&self) -> Vec<Segment<K, E>> {
        self.segs.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u32),
        Upsert(u16, u32),
        Remove(u16),
        /// Keep entries whose value is not divisible by the number; add one to the rest.
        RetainAll(u32),
        Snapshot,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u16..300, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            (0u16..300, any::<u32>()).prop_map(|(k, v)| Op::Upsert(k, v)),
            (0u16..300).prop_map(Op::Remove),
            (2u32..5).prop_map(Op::RetainAll),
            Just(Op::Snapshot),
        ]
    }

    type Snap = (Vec<Segment<u16, u32>>, HashMap<u16, u32>);

    fn contents(segs: &[Segment<u16, u32>]) -> HashMap<u16, u32> {
        segs.iter().flat_map(|s| s.iter().copied()).collect()
    }

    proptest! {
        /// The table behaves as a map, and every snapshot keeps exactly the contents it
        /// had when taken, whatever is written afterwards.
        #[test]
        fn behaves_as_a_map_with_isolated_snapshots(ops in proptest::collection::vec(op(), 0..400)) {
            let mut t = CowTable::<u16, u32>::default();
            let mut model = HashMap::new();
            let mut snaps: Vec<Snap> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) if v % 2 == 0 => {
                        t.set(&k, &v);
                        model.insert(k, v);
                    }
                    Op::Insert(k, v) => prop_assert_eq!(t.insert(&k, v), model.insert(k, v)),
                    Op::Upsert(k, v) => {
                        let e = t.upsert(&k, || 0);
                        *e = e.wrapping_add(v);
                        let m = model.entry(k).or_insert(0);
                        *m = m.wrapping_add(v);
                    }
                    Op::Remove(k) => prop_assert_eq!(t.remove(&k), model.remove(&k)),
                    Op::RetainAll(d) => {
                        let keep = |v: &mut u32| {
                            let kept = !v.is_multiple_of(d);
                            *v = v.wrapping_add(1);
                            kept
                        };
                        t.retain_all(|_, v| keep(v));
                        model.retain(|_, v| keep(v));
                    }
                    Op::Snapshot => snaps.push((t.share(), model.clone())),
                }
                prop_assert_eq!(t.len(), model.len());
            }
            for (k, v) in &model {
                prop_assert_eq!(t.get(k), Some(v));
            }
            for (segs, expected) in &snaps {
                prop_assert_eq!(&contents(segs), expected);
            }
        }
    }

    #[test]
    fn a_write_copies_only_the_segment_it_touches() {
        let mut t = CowTable::<u64, u64>::default();
        for k in 0..10_000 {
            t.insert(&k, k);
        }
        let snap = t.share();
        *t.get_mut(&7).unwrap() = 70;
        assert_eq!(copied(&t, &snap), 1);
        assert_eq!(contents_u64(&snap)[&7], 7);
        // A removal of an absent key copies nothing.
        assert_eq!(t.remove(&1_000_000), None);
        assert_eq!(copied(&t, &snap), 1);
    }

    /// The prefetch addresses are where the table keeps the entries: most keys sit in
    /// the first bucket probed for their hash (the others a few buckets on). Guards the layout assumption of [`PrefetchHints`] (a
    /// change of it in the table's crate would make every prefetch miss, silently).
    #[test]
    fn prefetch_hints_point_at_the_buckets() {
        let mut t = CowTable::<u64, u64>::default();
        for k in 0..100_000u64 {
            t.insert(&k, k);
        }
        // A copy-on-write after a snapshot moves a segment; the write notes it again.
        let _snap = t.share();
        for k in 0..100_000u64 {
            t.set(&k, &(k + 1));
        }
        let hints = t.hints();
        let mut home = 0;
        for k in 0..100_000u64 {
            let (_, predicted) = hints.addresses(hash_of(&k)).unwrap();
            let actual = t.get(&k).unwrap() as *const u64 as usize - std::mem::size_of::<u64>();
            if predicted == actual {
                home += 1;
            }
        }
        assert!(
            home > 50_000,
            "only {home} of 100000 keys at the prefetched bucket"
        );
    }

    /// Segments of `t` no longer shared with the snapshot `snap`.
    fn copied(t: &CowTable<u64, u64>, snap: &[Segment<u64, u64>]) -> usize {
        t.segs
            .iter()
            .zip(snap)
            .filter(|(a, b)| !Arc::ptr_eq(a, b))
            .count()
    }

    fn contents_u64(segs: &[Segment<u64, u64>]) -> HashMap<u64, u64> {
        segs.iter().flat_map(|s| s.iter().copied()).collect()
    }
}
