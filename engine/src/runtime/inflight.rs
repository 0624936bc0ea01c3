//! Records in flight stored with an unaligned checkpoint, and their replay on restore.
//!
//! A task that snapshots unaligned stores every record it reads from an input between
//! the snapshot and that input's barrier (see [`crate::aligner`]). They are kept as
//! operator state of a pseudo-operator named after the task (`<task>@in-flight`, a name
//! no operator can take), so they travel in the task's state file and a restore hands
//! every new subtask the entries of all old ones. Each entry holds one input's records
//! of one old subtask: a version byte, the old subtask index, then per record its key
//! group (`0xFFFF` when the input is not keyed), its length and its postcard bytes. A
//! new subtask replays the records of the key groups it owns, and of the non-keyed
//! inputs those of the old subtasks `s` with `s % parallelism` equal to its index, so a
//! restore at another parallelism sends each record where its key's state now lives.

use crate::api::Data;
use crate::codec;
use crate::error::{Error, Result};
use crate::ids::{KeyGroupRange, OperatorId, SubtaskIndex};
use crate::state::OperatorSnapshot;

/// The key group of a record on a hash edge, for routing its records in flight: given
/// the job's maximum parallelism (the number of key groups) and a scratch buffer for
/// the encoded key.
pub(crate) type KeyGroupFn<T> =
    std::sync::Arc<dyn Fn(&T, u16, &mut Vec<u8>) -> Result<crate::ids::KeyGroup> + Send + Sync>;

const VERSION: u8 = 1;
const NOT_KEYED: u16 = u16::MAX;
const SUFFIX: &str = "@in-flight";

/// The pseudo-operator holding task `task`'s records in flight.
pub(crate) fn operator_of(task: &OperatorId) -> OperatorId {
    OperatorId(format!("{}{SUFFIX}", task.0))
}

/// The task whose records in flight `op` holds, if it is such a pseudo-operator.
pub(crate) fn task_of(op: &OperatorId) -> Option<&str> {
    op.0.strip_suffix(SUFFIX)
}

/// What one task stores for one unaligned checkpoint, per input.
pub(crate) struct InFlight {
    subtask: u32,
    inputs: Vec<Vec<u8>>,
    /// Scratch for encoded keys.
    key: Vec<u8>,
}

impl InFlight {
    pub fn new(subtask: SubtaskIndex, inputs: usize) -> Self {
        InFlight {
            subtask: subtask.0 as u32,
            inputs: vec![Vec::new(); inputs],
            key: Vec::new(),
        }
    }

    /// Store `batch`, read from input `i` (keyed by `route` into `max` key groups if
    /// the input is keyed).
    pub fn capture<T: Data>(
        &mut self,
        i: usize,
        batch: &[T],
        route: Option<&KeyGroupFn<T>>,
        max: u16,
    ) -> Result<()> {
        let buf = &mut self.inputs[i];
        if buf.is_empty() {
            buf.push(VERSION);
            buf.extend_from_slice(&self.subtask.to_le_bytes());
        }
        for r in batch {
            let kg = match route {
                Some(f) => f(r, max, &mut self.key)?.0,
                None => NOT_KEYED,
            };
            buf.extend_from_slice(&kg.to_le_bytes());
            let at = buf.len();
            buf.extend_from_slice(&[0; 4]);
            codec::encode_into(r, buf, "record in flight")?;
            let len = (buf.len() - at - 4) as u32;
            buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        }
        Ok(())
    }

    /// The operator state entries, and their size in bytes.
    pub fn into_entries(self) -> (Vec<Vec<u8>>, u64) {
        let entries: Vec<Vec<u8>> = self.inputs.into_iter().filter(|b| !b.is_empty()).collect();
        let bytes = entries.iter().map(|e| e.len() as u64).sum();
        (entries, bytes)
    }
}

fn corrupt(msg: &str) -> Error {
    Error::Codec {
        what: "records in flight".into(),
        message: msg.into(),
    }
}

/// The records in flight that subtask `subtask` of `parallelism` (owning `range`)
/// replays, in batches of at most `batch_size`, in the order they were stored.
pub(crate) fn replay<T: Data>(
    snaps: &[OperatorSnapshot],
    range: KeyGroupRange,
    subtask: SubtaskIndex,
    parallelism: usize,
    batch_size: usize,
) -> Result<Vec<Vec<T>>> {
    let mut batches: Vec<Vec<T>> = Vec::new();
    let mut batch = Vec::new();
    for entry in snaps.iter().flat_map(|s| &s.list) {
        if entry.len() < 5 || entry[0] != VERSION {
            return Err(corrupt("unknown entry version"));
        }
        let old = u32::from_le_bytes(entry[1..5].try_into().expect("4 bytes")) as usize;
        let mine_unkeyed = old % parallelism.max(1) == subtask.0;
        let mut at = 5;
        while at < entry.len() {
            if entry.len() - at < 6 {
                return Err(corrupt("truncated record header"));
            }
            let kg = u16::from_le_bytes([entry[at], entry[at + 1]]);
            let len =
                u32::from_le_bytes(entry[at + 2..at + 6].try_into().expect("4 bytes")) as usize;
            at += 6;
            let Some(bytes) = entry.get(at..at + len) else {
                return Err(corrupt("truncated record"));
            };
            at += len;
            let mine = if kg == NOT_KEYED {
                mine_unkeyed
            } else {
                range.contains(crate::ids::KeyGroup(kg))
            };
            if mine {
                batch.push(codec::decode::<T>(bytes, "record in flight")?);
                if batch.len() >= batch_size {
                    batches.push(std::mem::take(&mut batch));
                }
            }
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::KeyGroup;
    use std::sync::Arc;

    fn snap(entries: Vec<Vec<u8>>) -> OperatorSnapshot {
        OperatorSnapshot {
            keyed: Vec::new(),
            list: entries,
            db: None,
        }
    }

    #[test]
    fn records_in_flight_go_where_their_key_group_lives_after_a_rescale() {
        let max = 8u16;
        let route: KeyGroupFn<u64> = Arc::new(|r: &u64, _, _| Ok(KeyGroup((*r % 8) as u16)));
        // Two old subtasks: one keyed input and one forward input each.
        let mut olds = Vec::new();
        for s in 0..2u64 {
            let mut f = InFlight::new(SubtaskIndex(s as usize), 2);
            let keyed: Vec<u64> = (0..20).map(|k| k * 2 + s).collect();
            f.capture(0, &keyed, Some(&route), max).unwrap();
            f.capture(1, &[1000 + s], None, max).unwrap();
            olds.push(snap(f.into_entries().0));
        }
        let mut seen = Vec::new();
        for new in 0..3usize {
            let range = KeyGroupRange::for_subtask(max, 3, SubtaskIndex(new));
            let got: Vec<u64> = replay::<u64>(&olds, range, SubtaskIndex(new), 3, 4)
                .unwrap()
                .into_iter()
                .inspect(|b| assert!(b.len() <= 4))
                .flatten()
                .collect();
            for r in &got {
                if *r < 1000 {
                    assert!(range.contains(KeyGroup((*r % 8) as u16)), "{r} at {new}");
                } else {
                    assert_eq!((*r - 1000) as usize % 3, new, "{r} at {new}");
                }
            }
            seen.extend(got);
        }
        seen.sort();
        let mut want: Vec<u64> = (0..40).chain([1000, 1001]).collect();
        want.sort();
        assert_eq!(seen, want, "every record replayed exactly once");
    }

    #[test]
    fn order_is_kept_and_damage_is_an_error() {
        let mut f = InFlight::new(SubtaskIndex(0), 1);
        f.capture::<String>(0, &["a".into(), "b".into()], None, 4)
            .unwrap();
        f.capture::<String>(0, &["c".into()], None, 4).unwrap();
        let (entries, bytes) = f.into_entries();
        assert_eq!(bytes, entries[0].len() as u64);
        let range = KeyGroupRange::for_subtask(4, 1, SubtaskIndex(0));
        let got = replay::<String>(&[snap(entries.clone())], range, SubtaskIndex(0), 1, 10);
        assert_eq!(got.unwrap(), vec![vec!["a", "b", "c"]]);
        let mut cut = entries[0].clone();
        cut.pop();
        assert!(replay::<String>(&[snap(vec![cut])], range, SubtaskIndex(0), 1, 10).is_err());
        assert_eq!(task_of(&operator_of(&OperatorId("t".into()))), Some("t"));
    }
}
