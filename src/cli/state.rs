//! `exactly state dump`: what a checkpoint holds per operator and state, read from its
//! state files without the job's code.
//!
//! Keyed state of the in-memory backend is in the backend-independent layout (see the
//! engine's `state::layout`): `len(name) | name | postcard(key) [| postcard(map key)]`
//! for state entries, `0 | kind | time | ...` for timers and TTL cleanup entries. The
//! CLI counts entries, bytes and key groups per state; with `--entries N` it prints the
//! first N entries of each state, decoded where the recorded types are primitives
//! (integers, `bool`, `String`, floats) and as hex otherwise. RocksDB state is a set of
//! SST files: its size is reported, and with the `rocksdb` feature its entries are read
//! from a read-only copy of the files (in the same layout) and counted the same way.

use super::format::{bytes, count};
use crate::{Failure, Location};
use exactly::engine::codec;
use exactly::engine::ids::CheckpointId;
use exactly::engine::manifest::TaskStateHandle;
use exactly::engine::state::{DbFileContent, TaskSnapshotPayload};
use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use tokio::runtime::Runtime;

/// Per state name: entries, key bytes, value bytes, key groups, the first entries.
#[derive(Default)]
struct StateSummary {
    entries: u64,
    key_bytes: u64,
    value_bytes: u64,
    key_groups: BTreeSet<u16>,
    /// `(key group, key bytes after the name, value bytes)`.
    first: Vec<(u16, Vec<u8>, Vec<u8>)>,
}

/// One operator's state across its subtasks.
#[derive(Default)]
struct OperatorSummary {
    subtasks: BTreeSet<(usize, usize)>,
    states: BTreeMap<String, StateSummary>,
    event_timers: u64,
    processing_timers: u64,
    ttl_entries: u64,
    list_entries: u64,
    list_bytes: u64,
    db_files: u64,
    db_bytes: u64,
    /// Whether the RocksDB files' entries were read (feature `rocksdb`).
    db_read: bool,
    types: BTreeMap<String, String>,
}

/// `exactly state dump`: checkpoint `id` (default: the latest), every operator or only
/// `operator`, with the first `entries` entries of each state.
pub fn dump(
    rt: &Runtime,
    loc: &Location,
    id: Option<u64>,
    operator: Option<&str>,
    entries: usize,
) -> Result<ExitCode, Failure> {
    let done = super::checkpoints::completed(rt, loc)?;
    let id = super::checkpoints::pick(loc, &done, id)?;
    let m = rt.block_on(loc.storage.read_manifest(id))?;
    let mut ops: BTreeMap<String, OperatorSummary> = BTreeMap::new();
    for h in m.tasks.iter().filter(|h| !h.path.is_empty()) {
        let payload = read_payload(rt, loc, id, h)?;
        for (op, snap) in payload.operators {
            if operator.is_some_and(|o| o != op.0) {
                continue;
            }
            let s = ops.entry(op.0.clone()).or_default();
            s.subtasks.insert((h.subtask.0, h.parallelism));
            if let Some(types) = h.state_types.get(&op.0) {
                s.types.extend(types.clone());
            }
            for (kg, group) in snap.keyed {
                for (k, v) in group {
                    s.add(kg.0, k, v, entries);
                }
            }
            s.list_entries += snap.list.len() as u64;
            s.list_bytes += snap.list.iter().map(|e| e.len() as u64).sum::<u64>();
            if let Some(db) = snap.db {
                for f in &db.files {
                    s.db_files += 1;
                    s.db_bytes += match &f.content {
                        DbFileContent::Inline(b) => b.len() as u64,
                        DbFileContent::Shared(sf) => sf.size,
                    };
                }
                // The entries themselves, from a read-only copy of the files.
                #[cfg(feature = "rocksdb")]
                {
                    let groups = rt.block_on(exactly::engine::inspect::rocksdb_entries(
                        &loc.storage,
                        id,
                        &op,
                        db,
                    ))?;
                    s.db_read = true;
                    for (kg, group) in groups {
                        for (k, v) in group {
                            s.add(kg.0, k, v, entries);
                        }
                    }
                }
            }
        }
    }
    if let Some(o) = operator {
        if !ops.contains_key(o) {
            let known: BTreeSet<&str> = m
                .tasks
                .iter()
                .flat_map(|t| t.operators.iter().map(|o| o.0.as_str()))
                .collect();
            return Err(Failure(format!(
                "checkpoint {id} holds no state of operator '{o}'; operators with state: {}",
                known.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    say!("checkpoint {id} of job '{}' at {}", m.job, loc.name);
    for (name, s) in &ops {
        s.print(name, entries);
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn read_payload(
    rt: &Runtime,
    loc: &Location,
    id: CheckpointId,
    h: &TaskStateHandle,
) -> Result<TaskSnapshotPayload, Failure> {
    let bytes = rt.block_on(loc.storage.read_state(id, h))?;
    codec::decode(&bytes, &h.path)
        .map_err(|e| Failure(format!("checkpoint {id}: file '{}': {e}", h.path)))
}

impl OperatorSummary {
    fn add(&mut self, kg: u16, key: Vec<u8>, value: Vec<u8>, keep: usize) {
        match key.first() {
            Some(0) => match key.get(1) {
                Some(b'E') => self.event_timers += 1,
                Some(b'P') => self.processing_timers += 1,
                _ => self.ttl_entries += 1,
            },
            Some(&len) => {
                let end = (1 + len as usize).min(key.len());
                let name = String::from_utf8_lossy(&key[1..end]).into_owned();
                let s = self.states.entry(name).or_default();
                s.entries += 1;
                s.key_bytes += (key.len() - end) as u64;
                s.value_bytes += value.len() as u64;
                s.key_groups.insert(kg);
                if s.first.len() < keep {
                    s.first.push((kg, key[end..].to_vec(), value));
                }
            }
            None => {}
        }
    }

    fn print(&self, name: &str, keep: usize) {
        let subtasks: Vec<String> = self
            .subtasks
            .iter()
            .map(|(s, p)| format!("{s}/{p}"))
            .collect();
        say!("");
        say!("operator {name} (subtasks {})", subtasks.join(", "));
        for (state, s) in &self.states {
            let ty = self.types.get(state).map(String::as_str).unwrap_or("");
            say!("  state {state}: {ty}");
            say!(
                "    {}, keys {}, values {}, in {}",
                entries_count(s.entries),
                bytes(s.key_bytes),
                bytes(s.value_bytes),
                count(s.key_groups.len(), "key group")
            );
            let types = Types::of(ty);
            for (kg, k, v) in &s.first {
                say!(
                    "    key group {kg:>5}  key {}  value {}",
                    types.key(k),
                    types.value(v)
                );
            }
            if keep > 0 && (s.entries as usize) > s.first.len() {
                say!("    ... {} more", s.entries as usize - s.first.len());
            }
        }
        if self.event_timers + self.processing_timers > 0 {
            say!(
                "  timers: {} in event time, {} in processing time",
                self.event_timers,
                self.processing_timers
            );
        }
        if self.ttl_entries > 0 {
            say!("  TTL cleanup entries: {}", self.ttl_entries);
        }
        if self.list_entries > 0 {
            say!(
                "  operator state (source offsets and the like): {}, {}",
                entries_count(self.list_entries),
                bytes(self.list_bytes)
            );
        }
        if self.db_files > 0 {
            say!(
                "  RocksDB checkpoint: {}, {}{}",
                count(self.db_files as usize, "file"),
                bytes(self.db_bytes),
                if self.db_read {
                    " (entries above read from a copy of its files)"
                } else {
                    " (entries not read: build the CLI with the `rocksdb` feature)"
                }
            );
        }
    }
}

/// The primitive types of a state's description (`ValueState<i64> keyed by u32`,
/// `MapState<u8, String> keyed by alloc::string::String`), as far as they are known.
struct Types {
    key: Option<Prim>,
    map_key: Option<Option<Prim>>,
    value: Option<Prim>,
    ttl: bool,
}

impl Types {
    fn of(description: &str) -> Types {
        let unknown = Types {
            key: None,
            map_key: None,
            value: None,
            ttl: false,
        };
        let description = description
            .rsplit_once(" version ")
            .map_or(description, |(d, _)| d);
        let Some((state, key)) = description.split_once(" keyed by ") else {
            return unknown;
        };
        let Some((kind, params)) = state.split_once('<') else {
            return unknown;
        };
        let params = params.strip_suffix('>').unwrap_or(params);
        let key = Prim::parse(key);
        match kind {
            "MapState" => match params.split_once(", ") {
                Some((uk, uv)) if !uk.contains('<') && !uk.contains('(') => Types {
                    key,
                    map_key: Some(Prim::parse(uk)),
                    value: Prim::parse(uv),
                    ttl: false,
                },
                _ => Types { key, ..unknown },
            },
            "ValueState" => Types {
                key,
                value: Prim::parse(params),
                ..unknown
            },
            "ValueState with TTL" => Types {
                key,
                value: Prim::parse(params),
                ttl: true,
                ..unknown
            },
            _ => Types { key, ..unknown },
        }
    }

    fn key(&self, bytes: &[u8]) -> String {
        let Some(k) = self.key else {
            return hex(bytes);
        };
        match (k.decode(bytes), self.map_key) {
            (Some((k, [])), None) => k,
            (Some((k, rest)), Some(Some(uk))) => match uk.decode(rest) {
                Some((uk, [])) => format!("{k} / {uk}"),
                _ => format!("{k} / {}", hex(rest)),
            },
            (Some((k, rest)), Some(None)) => format!("{k} / {}", hex(rest)),
            _ => hex(bytes),
        }
    }

    fn value(&self, bytes: &[u8]) -> String {
        let (bytes, expiry) = match (self.ttl, bytes.len() >= 8) {
            (true, true) => (&bytes[8..], Some(&bytes[..8])),
            _ => (bytes, None),
        };
        let v = match self.value.and_then(|p| p.decode(bytes)) {
            Some((v, [])) => v,
            _ => hex(bytes),
        };
        match expiry {
            Some(e) => format!("{v} (expiry bytes {})", hex(e)),
            None => v,
        }
    }
}

/// A primitive type whose postcard encoding the CLI reads.
#[derive(Clone, Copy)]
enum Prim {
    Unsigned,
    Signed,
    Byte,
    SignedByte,
    Bool,
    Text,
    F32,
    F64,
}

impl Prim {
    fn parse(t: &str) -> Option<Prim> {
        Some(match t.trim() {
            "u16" | "u32" | "u64" | "u128" | "usize" => Prim::Unsigned,
            "i16" | "i32" | "i64" | "i128" | "isize" => Prim::Signed,
            "u8" => Prim::Byte,
            "i8" => Prim::SignedByte,
            "bool" => Prim::Bool,
            "alloc::string::String" | "String" | "&str" => Prim::Text,
            "f32" => Prim::F32,
            "f64" => Prim::F64,
            _ => return None,
        })
    }

    /// The value at the start of `b` and what follows it. Integers of any width are
    /// read at the widest: postcard writes them all as the same varint (zigzag for
    /// signed ones).
    fn decode(self, b: &[u8]) -> Option<(String, &[u8])> {
        macro_rules! text {
            ($t:ty) => {
                codec::decode_prefix::<$t>(b).map(|(v, r)| (v.to_string(), r))
            };
        }
        match self {
            Prim::Unsigned => text!(u128),
            Prim::Signed => text!(i128),
            Prim::Byte => text!(u8),
            Prim::SignedByte => text!(i8),
            Prim::Bool => text!(bool),
            Prim::Text => codec::decode_prefix::<String>(b).map(|(v, r)| (format!("{v:?}"), r)),
            Prim::F32 => text!(f32),
            Prim::F64 => text!(f64),
        }
    }
}

/// `1 entry`, `2 entries`.
fn entries_count(n: u64) -> String {
    if n == 1 {
        "1 entry".into()
    } else {
        format!("{n} entries")
    }
}

fn hex(b: &[u8]) -> String {
    if b.is_empty() {
        return "(empty)".into();
    }
    let mut s = String::from("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_decode_as_postcard_wrote_them() {
        let types = Types::of("MapState<u8, alloc::string::String> keyed by i64");
        let mut key = codec::encode(&-300i64, "test").unwrap();
        key.extend(codec::encode(&7u8, "test").unwrap());
        assert_eq!(types.key(&key), "-300 / 7");
        let v = codec::encode(&"hé".to_string(), "test").unwrap();
        assert_eq!(types.value(&v), "\"hé\"");
        let types = Types::of("ValueState<(u32, u32)> keyed by u64 version 2");
        let k = codec::encode(&u64::MAX, "test").unwrap();
        assert_eq!(types.key(&k), u64::MAX.to_string());
        assert_eq!(types.value(&[1, 2]), "0x0102", "a tuple stays raw");
        assert_eq!(Types::of("").key(&[5]), "0x05");
    }
}
