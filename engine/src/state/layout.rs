//! The backend-independent byte layout of keyed state, as stored in checkpoints and in
//! RocksDB.
//!
//! ```text
//! value        len(name) | name | postcard(key)                  -> postcard(value)
//! TTL value    len(name) | name | postcard(key)                  -> expiry | postcard(value)
//! map entry    len(name) | name | postcard(key) | postcard(ukey) -> postcard(uvalue)
//! timer        0 | 'E' or 'P' | time | postcard(key)             -> (empty)
//! TTL cleanup  0 | 'X' | expiry | <the value's entry key>        -> (empty)
//! ```
//!
//! Times are big-endian with the sign bit flipped, so byte order is time order. State
//! names are 1-255 bytes, so an entry starting with 0 is never a state entry. The key
//! group of every entry is `xxh3(postcard(key)) % max_parallelism`; the in-memory backend
//! keeps typed values and writes this layout only when a snapshot is encoded.

use crate::ids::{KeyGroup, KeyGroupRange};
use crate::time::{TimeDomain, Timestamp};

/// First byte of timer and TTL cleanup entries.
pub(crate) const TIMER_MARK: u8 = 0;
/// Second byte of TTL cleanup entries.
pub(crate) const TTL_MARK: u8 = b'X';
/// Length of `0 | kind | time`, the start of every timer and cleanup entry.
pub(crate) const MARK_LEN: usize = 10;

pub(crate) fn domain_byte(d: TimeDomain) -> u8 {
    match d {
        TimeDomain::EventTime => b'E',
        TimeDomain::ProcessingTime => b'P',
    }
}

/// Order-preserving encoding of a signed timestamp.
pub(crate) fn ts_bytes(ts: Timestamp) -> [u8; 8] {
    ((ts as u64) ^ (1 << 63)).to_be_bytes()
}

pub(crate) fn decode_ts(b: &[u8]) -> Timestamp {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    (u64::from_be_bytes(a) ^ (1 << 63)) as i64
}

/// `len(name) | name`, the start of a state's entries.
pub(crate) fn name_prefix(name: &str) -> Vec<u8> {
    name_prefix_bytes(name.as_bytes())
}

/// [`name_prefix`] of a name read from an entry.
pub(crate) fn name_prefix_bytes(name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(1 + name.len());
    p.push(name.len() as u8);
    p.extend_from_slice(name);
    p
}

/// `0 | kind | ts`, the start of a timer or cleanup entry.
pub(crate) fn mark(kind: u8, ts: Timestamp) -> [u8; MARK_LEN] {
    let mut m = [0u8; MARK_LEN];
    m[0] = TIMER_MARK;
    m[1] = kind;
    m[2..].copy_from_slice(&ts_bytes(ts));
    m
}

/// The key range of entries `[0, kind, ts, ..]` with `ts <= upto`; the upper bound is
/// exclusive (the first possible entry of `upto + 1`).
#[cfg(feature = "rocksdb")]
pub(crate) fn due_range(kind: u8, upto: Timestamp) -> (Vec<u8>, Vec<u8>) {
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

/// What one stored entry is, read from its key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum EntryKind<'a> {
    /// A timer of `domain` at `time` for the encoded key.
    Timer {
        domain: TimeDomain,
        time: Timestamp,
        key: &'a [u8],
    },
    /// A TTL cleanup entry of the state called `name`.
    TtlCleanup { name: &'a [u8] },
    /// A value or map entry of the state called `name`; `rest` is `postcard(key)`
    /// followed, for map state, by `postcard(map key)`.
    State { name: &'a [u8], rest: &'a [u8] },
}

/// Classify an entry key; `None` for bytes that fit no entry of the layout.
pub(crate) fn classify(key: &[u8]) -> Option<EntryKind<'_>> {
    let (&first, tail) = key.split_first()?;
    if first != TIMER_MARK {
        let len = first as usize;
        return (tail.len() >= len).then(|| EntryKind::State {
            name: &tail[..len],
            rest: &tail[len..],
        });
    }
    if key.len() < MARK_LEN {
        return None;
    }
    let time = decode_ts(&key[2..MARK_LEN]);
    let body = &key[MARK_LEN..];
    match key[1] {
        b'E' | b'P' => Some(EntryKind::Timer {
            domain: if key[1] == b'E' {
                TimeDomain::EventTime
            } else {
                TimeDomain::ProcessingTime
            },
            time,
            key: body,
        }),
        TTL_MARK => {
            let (&len, name) = body.split_first()?;
            (name.len() >= len as usize).then(|| EntryKind::TtlCleanup {
                name: &name[..len as usize],
            })
        }
        _ => None,
    }
}

/// Entries of one snapshot, bucketed by key group while they are encoded. Each entry is
/// written once, already in its final form (postcard's `len | key | len | value`), into
/// its group's buffer, so that [`EncodedGroups::into_chunks`] produces the postcard
/// encoding of `Vec<(KeyGroup, Vec<(Vec<u8>, Vec<u8>)>)>`, the `keyed` field of
/// [`super::OperatorSnapshot`], by copying each group's buffer once.
#[derive(Debug, Default)]
pub(crate) struct GroupWriter {
    groups: Vec<GroupBuf>,
}

#[derive(Debug, Default)]
struct GroupBuf {
    /// Entries as postcard writes a `(Vec<u8>, Vec<u8>)`.
    bytes: Vec<u8>,
    entries: usize,
    /// Bytes of keys and values, without the lengths.
    payload: usize,
}

/// Append `n` as postcard's variable-length integer.
#[inline]
pub(crate) fn push_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Read a postcard variable-length integer at the start of `b`: its value and length.
fn read_varint(b: &[u8]) -> (u64, usize) {
    let mut n = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        n |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return (n, i + 1);
        }
    }
    unreachable!("the group writer writes complete variable-length integers")
}

impl GroupWriter {
    pub fn new(max_parallelism: u16) -> Self {
        GroupWriter {
            groups: (0..max_parallelism).map(|_| GroupBuf::default()).collect(),
        }
    }

    /// A writer whose groups in `range` have room for `bytes` in all, spread evenly (a
    /// snapshot's size is about the previous one's): no buffer grows by copying itself.
    pub fn sized(max_parallelism: u16, range: KeyGroupRange, bytes: usize) -> Self {
        let mut w = Self::new(max_parallelism);
        let per_group = (bytes / range.len().max(1)) * 9 / 8;
        if per_group > 0 {
            for g in range.start..range.end {
                w.groups[g as usize].bytes.reserve_exact(per_group);
            }
        }
        w
    }

    /// Append one entry whose key is the concatenation of `key_parts`.
    #[inline]
    pub fn push(&mut self, kg: KeyGroup, key_parts: &[&[u8]], value: &[u8]) {
        let g = &mut self.groups[kg.0 as usize];
        let key_len: usize = key_parts.iter().map(|p| p.len()).sum();
        g.bytes.reserve(key_len + value.len() + 20);
        push_varint(&mut g.bytes, key_len as u64);
        for part in key_parts {
            g.bytes.extend_from_slice(part);
        }
        push_varint(&mut g.bytes, value.len() as u64);
        g.bytes.extend_from_slice(value);
        g.entries += 1;
        g.payload += key_len + value.len();
    }

    /// The non-empty groups, in key group order.
    pub fn finish(self) -> EncodedGroups {
        EncodedGroups(
            self.groups
                .into_iter()
                .enumerate()
                .filter(|(_, g)| g.entries > 0)
                .map(|(i, g)| (KeyGroup(i as u16), g))
                .collect(),
        )
    }
}

/// Encoded entries per key group, ready to serialise.
#[derive(Debug, Default)]
pub(crate) struct EncodedGroups(Vec<(KeyGroup, GroupBuf)>);

impl EncodedGroups {
    /// Bytes of the encoded entries, lengths included.
    pub fn buffered(&self) -> usize {
        self.0.iter().map(|(_, g)| g.bytes.len()).sum()
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.0.iter().map(|(_, g)| g.payload).sum()
    }

    /// Append exactly what serialising `self` with postcard appends: small pieces go
    /// into `cur`, and a large group's buffer becomes a chunk of its own (after `cur`
    /// is moved into `chunks`), so it is never copied.
    pub fn into_chunks(self, cur: &mut Vec<u8>, chunks: &mut Vec<bytes::Bytes>) {
        push_varint(cur, self.0.len() as u64);
        for (kg, g) in self.0 {
            push_varint(cur, u64::from(kg.0));
            push_varint(cur, g.entries as u64);
            if g.bytes.len() >= 4096 {
                chunks.push(std::mem::take(cur).into());
                chunks.push(g.bytes.into());
            } else {
                cur.extend_from_slice(&g.bytes);
            }
        }
    }
}

/// A byte string serialised as postcard serialises a `Vec<u8>`.
struct Raw<'a>(&'a [u8]);

impl serde::Serialize for Raw<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

struct Entries<'a>(&'a GroupBuf);

impl serde::Serialize for Entries<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let g = self.0;
        let mut seq = s.serialize_seq(Some(g.entries))?;
        let mut rest = &g.bytes[..];
        while !rest.is_empty() {
            let (klen, n) = read_varint(rest);
            let (key, tail) = rest[n..].split_at(klen as usize);
            let (vlen, n) = read_varint(tail);
            let (value, tail) = tail[n..].split_at(vlen as usize);
            seq.serialize_element(&(Raw(key), Raw(value)))?;
            rest = tail;
        }
        seq.end()
    }
}

/// The general (and slower) path through serde: not used to write state files any
/// more, kept as the reference the tests hold [`EncodedGroups::into_chunks`] to.
impl serde::Serialize for EncodedGroups {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (kg, g) in &self.0 {
            seq.serialize_element(&(kg, Entries(g)))?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn group_writer_encodes_like_a_vector_of_pairs() {
        let mut w = GroupWriter::new(8);
        w.push(KeyGroup(5), &[b"\x01a", b"k1"], b"v1");
        w.push(KeyGroup(2), &[b"\x01a", b"k2"], b"");
        w.push(KeyGroup(5), &[b"\x01b", b"k3"], &[0u8; 300]);
        let groups = w.finish();
        let ours = codec::encode(&groups, "t").unwrap();
        assert_eq!(
            direct(groups),
            ours,
            "the direct path writes what serde writes"
        );
        let expected: Vec<super::super::KeyGroupEntries> = vec![
            (KeyGroup(2), vec![(b"\x01ak2".to_vec(), vec![])]),
            (
                KeyGroup(5),
                vec![
                    (b"\x01ak1".to_vec(), b"v1".to_vec()),
                    (b"\x01bk3".to_vec(), vec![0u8; 300]),
                ],
            ),
        ];
        assert_eq!(ours, codec::encode(&expected, "t").unwrap());
    }

    type Pair = (Vec<u8>, Vec<u8>);

    /// The chunks [`EncodedGroups::into_chunks`] makes, put together.
    fn direct(groups: EncodedGroups) -> Vec<u8> {
        let (mut cur, mut chunks) = (b"head".to_vec(), Vec::new());
        groups.into_chunks(&mut cur, &mut chunks);
        chunks.push(cur.into());
        let all: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(&all[..4], b"head", "what was in the buffer comes first");
        all[4..].to_vec()
    }

    proptest::proptest! {
        /// Entries of any size (lengths of one to three varint bytes) in any key group
        /// (two-byte group numbers too): the direct path and serde agree byte for byte,
        /// whatever room the writer was given ahead (for some of the groups, or none).
        #[test]
        fn direct_encoding_matches_serde(
            entries in proptest::collection::vec(
                (0u16..400, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 0usize..20_000),
                0..40,
            ),
            sized in (0u16..400, 0u16..400, 0usize..200_000),
        ) {
            let (a, b, hint) = sized;
            let range = KeyGroupRange { start: a.min(b), end: a.max(b) };
            let mut w = GroupWriter::sized(400, range, hint);
            let mut model: std::collections::BTreeMap<u16, Vec<Pair>> = Default::default();
            for (kg, key, vlen) in &entries {
                let value = vec![*vlen as u8; *vlen];
                let (a, b) = key.split_at(key.len() / 2);
                w.push(KeyGroup(*kg), &[a, b], &value);
                model.entry(*kg).or_default().push((key.clone(), value));
            }
            let groups = w.finish();
            let serde = codec::encode(&groups, "t").unwrap();
            let direct = direct(groups);
            let expected: Vec<super::super::KeyGroupEntries> =
                model.into_iter().map(|(k, v)| (KeyGroup(k), v)).collect();
            proptest::prop_assert_eq!(&direct, &codec::encode(&expected, "t").unwrap());
            proptest::prop_assert_eq!(direct, serde);
        }
    }

    #[test]
    fn entry_keys_classify() {
        let mut timer = mark(b'E', -5).to_vec();
        timer.extend_from_slice(b"key");
        assert_eq!(
            classify(&timer),
            Some(EntryKind::Timer {
                domain: TimeDomain::EventTime,
                time: -5,
                key: b"key"
            })
        );
        let mut cleanup = mark(TTL_MARK, 7).to_vec();
        cleanup.extend_from_slice(b"\x03abckey");
        assert_eq!(
            classify(&cleanup),
            Some(EntryKind::TtlCleanup { name: b"abc" })
        );
        assert_eq!(
            classify(b"\x02abkey"),
            Some(EntryKind::State {
                name: b"ab",
                rest: b"key"
            })
        );
        assert_eq!(classify(b"\x09ab"), None);
        assert_eq!(classify(&[0, b'E', 1]), None);
        assert!(ts_bytes(-1) < ts_bytes(0) && ts_bytes(0) < ts_bytes(1));
        assert_eq!(decode_ts(&ts_bytes(-77)), -77);
    }
}
