//! Protocol values as newtypes: checkpoint ids, key groups, subtask indices, operator ids.
//!
//! Key groups are the unit of keyed state: `key_group = xxh3(postcard(key)) % max_parallelism`.
//! Both the hash and the encoding are stable across builds and Rust versions, which is
//! what lets a checkpoint written by one binary be restored by the next one.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Identifies one checkpoint. Strictly increasing within a job, never reused, also not
/// across restarts (see `runtime::recovery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CheckpointId(pub u64);

impl CheckpointId {
    /// The id after this one.
    pub fn next(self) -> CheckpointId {
        CheckpointId(self.0 + 1)
    }
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A shard of keyed state. Keys map to key groups with a stable hash; every parallel
/// instance of a keyed operator owns a contiguous range of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyGroup(pub u16);

/// The index of one parallel instance of an operator, `0..parallelism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SubtaskIndex(pub usize);

impl fmt::Display for SubtaskIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The stable name of an operator. State in a checkpoint is stored under it, so it must
/// not change between the run that wrote a checkpoint and the run that restores it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OperatorId(pub String);

impl fmt::Display for OperatorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which of several copies of one job's binary this process is: `index` of `count`.
/// Every instance builds the same job; instance `index` runs subtasks
/// `index * p .. (index + 1) * p` of each operator's `count * p` (`p`: the job's
/// parallelism in each process), so it reads those subtasks' share of the source splits
/// and owns their key groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// This instance, `0..count`.
    pub index: usize,
    /// How many instances run the job.
    pub count: usize,
}

impl Instance {
    /// The one instance of a job that runs in a single process.
    pub const SINGLE: Instance = Instance { index: 0, count: 1 };

    /// Local subtask `subtask` of `parallelism` in this process, as the job-wide subtask
    /// and the job-wide parallelism.
    pub fn global(&self, subtask: SubtaskIndex, parallelism: usize) -> (SubtaskIndex, usize) {
        (
            SubtaskIndex(self.index * parallelism + subtask.0),
            self.count * parallelism,
        )
    }
}

/// A half-open range of key groups `[start, end)` owned by one subtask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGroupRange {
    /// First key group in the range.
    pub start: u16,
    /// One past the last key group.
    pub end: u16,
}

impl KeyGroupRange {
    /// The range owned by `subtask` of `parallelism` when keys are spread over
    /// `max_parallelism` key groups. Ranges of all subtasks are disjoint and cover
    /// `0..max_parallelism`.
    pub fn for_subtask(max_parallelism: u16, parallelism: usize, subtask: SubtaskIndex) -> Self {
        let max = max_parallelism as usize;
        // Ceiling division makes this the exact inverse of `subtask_for_key_group`.
        let start = (subtask.0 * max).div_ceil(parallelism);
        let end = ((subtask.0 + 1) * max).div_ceil(parallelism);
        KeyGroupRange {
            start: start as u16,
            end: end as u16,
        }
    }

    /// Whether `kg` lies in this range.
    pub fn contains(&self, kg: KeyGroup) -> bool {
        kg.0 >= self.start && kg.0 < self.end
    }

    /// Number of key groups in the range.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// Whether the range holds no key group.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Where a split is dealt out when a job runs as several instances, the same in every
/// process whenever it lists its splits: the number its name ends with (a Kafka
/// partition `topic-3`, a numbered split `7`), or else a hash of the name. (In one
/// process splits are dealt out in the order the source lists them.)
pub fn split_slot(split: &str) -> u64 {
    let tail = split.rsplit('-').next().unwrap_or(split);
    match tail.parse::<u64>() {
        Ok(n) if !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => xxhash_rust::xxh3::xxh3_64(split.as_bytes()),
    }
}

/// The key group of an already encoded key.
pub fn key_group_of_bytes(encoded_key: &[u8], max_parallelism: u16) -> KeyGroup {
    let h = xxhash_rust::xxh3::xxh3_64(encoded_key);
    let m = max_parallelism as u64;
    // The same value either way; a mask saves a division per record for the usual
    // power-of-two number of key groups.
    KeyGroup(if m.is_power_of_two() {
        h & (m - 1)
    } else {
        h % m
    } as u16)
}

/// The subtask that owns key group `kg` at `parallelism`. Inverse of
/// [`KeyGroupRange::for_subtask`].
pub fn subtask_for_key_group(
    kg: KeyGroup,
    max_parallelism: u16,
    parallelism: usize,
) -> SubtaskIndex {
    SubtaskIndex(kg.0 as usize * parallelism / max_parallelism as usize)
}

/// What a job, operator or sink name may be. Names become parts of paths (a sink's
/// staging directory, a part file's name, a checkpoint's state), so they are plain ASCII
/// with no separator, and may not start with `.`: no `.` or `..`, no hidden or
/// `.staging` directory.
pub(crate) const NAME_RULE: &str =
    "1-100 characters of A-Z a-z 0-9 _ . - that do not start with '.'";

/// Whether `n` follows [`NAME_RULE`].
pub(crate) fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 100
        && !n.starts_with('.')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_split_is_placed_by_its_number_or_its_name() {
        assert_eq!(super::split_slot("payments-12"), 12);
        assert_eq!(super::split_slot("7"), 7);
        let h = super::split_slot("day.jsonl");
        assert_eq!(h, super::split_slot("day.jsonl"), "stable");
        assert_ne!(h, super::split_slot("night.jsonl"));
        assert_ne!(super::split_slot("x-"), 0, "no number: hashed");
        assert_ne!(super::split_slot("x-+3"), 3, "a sign is not a number");
    }

    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ranges_partition_key_groups(max in 1u16..1024, p in 1usize..64) {
            prop_assume!(p <= max as usize);
            let mut next = 0u16;
            for s in 0..p {
                let r = KeyGroupRange::for_subtask(max, p, SubtaskIndex(s));
                prop_assert_eq!(r.start, next);
                prop_assert!(!r.is_empty());
                next = r.end;
            }
            prop_assert_eq!(next, max);
        }

        #[test]
        fn owner_matches_range(max in 1u16..1024, p in 1usize..64, kg in 0u16..1024) {
            prop_assume!(p <= max as usize && kg < max);
            let owner = subtask_for_key_group(KeyGroup(kg), max, p);
            prop_assert!(KeyGroupRange::for_subtask(max, p, owner).contains(KeyGroup(kg)));
        }
    }

    #[test]
    fn key_group_hash_is_stable() {
        // Pinned values: if this changes, checkpoints written by older builds would
        // restore keys into the wrong key groups.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b"account-1"), PINNED_HASH);
        assert_eq!(
            key_group_of_bytes(b"account-1", 128),
            KeyGroup((PINNED_HASH % 128) as u16)
        );
    }
    const PINNED_HASH: u64 = 6_925_527_013_811_150_362;
}
