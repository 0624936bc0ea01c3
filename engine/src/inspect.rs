//! Reading a checkpoint's state with the job's own types, without running the job: the
//! values a keyed operator holds per key, its map entries, a non-keyed operator's
//! entries. `exactly state dump` shows counts, sizes and primitive values from the shell;
//! for the job's own types, a small program of the job's crate uses [`StateReader`] with
//! the same state handles the job declares and prints what it needs (as JSON with
//! `serde_json`, for instance).
//!
//! Types are checked as a restore checks them: a handle that declares another type than
//! the checkpoint recorded is an error naming both, and a handle with a migration
//! (`.version(2).migrate_from`) reads values written at the older version converted.
//! Types are compared by their names from `std::any::type_name`, which include the crate
//! they are defined in: declare the state types in a library crate that the job and the
//! reading program share (a type defined in the job's `main.rs` has another name in any
//! other program). State in RocksDB files (`StateBackend::rocksdb()`) is read too when
//! the `rocksdb` feature is on: each instance's files are copied into a temporary
//! directory, opened read-only and scanned (so the whole state is read into memory).
//!
//! ```no_run
//! use exactly_engine::inspect::StateReader;
//! use exactly_engine::prelude::*;
//! use exactly_engine::storage::CheckpointStorage;
//!
//! const BALANCE: ValueState<i64> = ValueState::new("balance");
//! # async fn show() -> Result<(), Error> {
//! let storage = CheckpointStorage::open_existing("ledger-demo/checkpoints")?;
//! let reader = StateReader::latest(&storage).await?;
//! for (account, cents) in reader.values::<u32, i64>("balance", BALANCE)? {
//!     println!("{account}: {cents}");
//! }
//! # Ok(()) }
//! ```

use crate::codec;
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, OperatorId, SubtaskIndex};
use crate::manifest::{Manifest, StateTypeMap};
use crate::state::types::{Declared, Restore, StateTypes};
use crate::state::{layout, MapState, OperatorSnapshot, StateValue, ValueState};
use crate::storage::CheckpointStorage;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;

/// One completed checkpoint's state, read into memory (see the module docs).
pub struct StateReader {
    checkpoint: CheckpointId,
    job: String,
    operators: BTreeMap<OperatorId, Vec<OperatorSnapshot>>,
    types: BTreeMap<String, StateTypeMap>,
}

impl StateReader {
    /// The checkpoint a restart of the job would restore: the newest completed one that
    /// a later instance did not pass over.
    pub async fn latest(storage: &CheckpointStorage) -> Result<StateReader> {
        let (ids, _) = storage.scan().await?;
        let takeovers = storage.takeovers().await?;
        match crate::driver::newest_restorable(storage, &ids, &takeovers).await? {
            Some((id, m)) => Self::read(storage, id, m).await,
            None => Err(Error::config(format!(
                "{} holds no completed checkpoint",
                storage.url()
            ))),
        }
    }

    /// Completed checkpoint `id`.
    pub async fn open(storage: &CheckpointStorage, id: CheckpointId) -> Result<StateReader> {
        let m = storage.read_manifest(id).await?;
        Self::read(storage, id, m).await
    }

    /// The state a restore of checkpoint `id` starts from (the same reading), with
    /// RocksDB instances' entries read out of their files.
    async fn read(storage: &CheckpointStorage, id: CheckpointId, m: Manifest) -> Result<Self> {
        let restored = crate::driver::read_checkpoint_state(storage, id, &m).await?;
        let mut operators = BTreeMap::new();
        for (op, mut snaps) in restored.operators {
            for snap in &mut snaps {
                if let Some(db) = snap.db.take() {
                    snap.keyed = rocksdb_entries(storage, id, &op, db).await?;
                }
            }
            operators.insert(op, snaps);
        }
        let types = restored
            .types
            .into_iter()
            .map(|(op, t)| (op.0, t))
            .collect();
        Ok(StateReader {
            checkpoint: id,
            job: m.job,
            operators,
            types,
        })
    }

    /// The checkpoint read.
    pub fn checkpoint(&self) -> CheckpointId {
        self.checkpoint
    }

    /// The name of the job that wrote it.
    pub fn job(&self) -> &str {
        &self.job
    }

    /// Every operator with state in the checkpoint.
    pub fn operators(&self) -> impl Iterator<Item = &str> {
        self.operators.keys().map(|o| o.0.as_str())
    }

    /// The declared type of every state of `operator`, as recorded.
    pub fn state_types(&self, operator: &str) -> Option<&StateTypeMap> {
        self.types.get(operator)
    }

    /// The keyed entries of state `name` of `operator`, checked against `declared`:
    /// (the rest of the entry key after the name, the value bytes, how to read them).
    fn entries(
        &self,
        operator: &str,
        name: &str,
        declared: Declared,
    ) -> Result<(Entries<'_>, Restore)> {
        let op = OperatorId(operator.to_string());
        let snaps = self.snapshots(&op)?;
        let recorded = self.types.get(operator).cloned().unwrap_or_default();
        if !recorded.contains_key(name) {
            return Err(Error::config(format!(
                "operator '{operator}' of checkpoint {} has no state '{name}'; its states: {}",
                self.checkpoint,
                recorded.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let how = StateTypes::new(op, recorded).declare(name, declared)?;
        let prefix = layout::name_prefix(name);
        let entries = snaps
            .iter()
            .flat_map(|s| s.keyed.iter())
            .flat_map(|(_, group)| group.iter())
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix.as_slice())?, v.as_slice())))
            .collect();
        Ok((entries, how))
    }

    fn snapshots(&self, op: &OperatorId) -> Result<&[OperatorSnapshot]> {
        let snaps = self.operators.get(op).ok_or_else(|| {
            Error::config(format!(
                "checkpoint {} holds no state of operator '{op}'; operators with state: {}",
                self.checkpoint,
                self.operators().collect::<Vec<_>>().join(", ")
            ))
        })?;
        Ok(snaps)
    }

    /// Every key's value of value state `state` of the keyed operator `operator`, keyed
    /// by `K` (in key-group order). Values of a state with a time-to-live are returned
    /// even when it has passed, until the job cleans them up.
    pub fn values<K: DeserializeOwned, V: StateValue>(
        &self,
        operator: &str,
        state: ValueState<V>,
    ) -> Result<Vec<(K, V)>> {
        let (entries, how) = self.entries(operator, state.name(), state.declared::<K>())?;
        let ttl = state.ttl_ms().is_some();
        entries
            .into_iter()
            .map(|(key, value)| {
                let key: K = decode_all(key, state.name())?;
                let value = if ttl {
                    value.get(8..).unwrap_or_default()
                } else {
                    value
                };
                Ok((key, state.decode_restored(value, how)?))
            })
            .collect()
    }

    /// Every entry of map state `state` of the keyed operator `operator`, keyed by `K`:
    /// (key, map key, map value).
    pub fn map_entries<K: DeserializeOwned, UK: StateValue, UV: StateValue>(
        &self,
        operator: &str,
        state: MapState<UK, UV>,
    ) -> Result<Vec<(K, UK, UV)>> {
        let (entries, how) = self.entries(operator, state.name(), state.declared::<K>())?;
        entries
            .into_iter()
            .map(|(key, value)| {
                let (k, rest) =
                    codec::decode_prefix::<K>(key).ok_or_else(|| bad_key(state.name()))?;
                let uk: UK = decode_all(rest, state.name())?;
                Ok((k, uk, state.decode_restored(value, how)?))
            })
            .collect()
    }

    /// Every entry of the state of the non-keyed operator `operator` (written with
    /// [`crate::operator::Operator`]), of all its instances; `state_version` is the
    /// operator's [`crate::operator::Operator::STATE_VERSION`].
    pub fn operator_entries<S: DeserializeOwned>(
        &self,
        operator: &str,
        state_version: u32,
    ) -> Result<Vec<S>> {
        let op = OperatorId(operator.to_string());
        let snaps = self.snapshots(&op)?;
        let declared = crate::operator::describe::<S>(state_version);
        match self
            .types
            .get(operator)
            .and_then(|t| t.get(crate::operator::STATE_NAME))
        {
            Some(recorded) if *recorded == declared => {}
            recorded => {
                return Err(Error::config(format!(
                    "operator '{operator}': the checkpoint holds {}, read as {declared}",
                    recorded.map_or("no operator state", String::as_str)
                )))
            }
        }
        let lists: Vec<&[Vec<u8>]> = snaps.iter().map(|s| s.list.as_slice()).collect();
        // One instance of one: every entry.
        crate::operator::restore_entries(&op, &lists, SubtaskIndex(0), 1)
    }
}

/// Keyed entries of one state: the entry key after the state's name, and the value.
type Entries<'a> = Vec<(&'a [u8], &'a [u8])>;

/// The entries of one operator instance's RocksDB checkpoint, per key group (in the
/// backend-independent layout), read from a temporary copy of its files.
pub async fn rocksdb_entries(
    storage: &CheckpointStorage,
    checkpoint: CheckpointId,
    operator: &OperatorId,
    db: crate::state::DbSnapshot,
) -> Result<Vec<crate::state::KeyGroupEntries>> {
    #[cfg(feature = "rocksdb")]
    {
        let _ = checkpoint;
        let dir = std::env::temp_dir().join(format!(
            "exactly-inspect-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let env = crate::state::BackendEnv {
            backend: crate::state::StateBackend::rocksdb(),
            local_dir: dir.clone(),
            storage: storage.clone(),
            rt: tokio::runtime::Handle::current(),
            completed: std::sync::Arc::default(),
        };
        let read = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            let mut groups: Vec<crate::state::KeyGroupEntries> = Vec::new();
            let result = crate::state::rocks::read_snapshot(&db, db.range, &env, |kg, k, v| {
                match groups.last_mut() {
                    Some((g, entries)) if *g == kg => entries.push((k.to_vec(), v.to_vec())),
                    _ => groups.push((kg, vec![(k.to_vec(), v.to_vec())])),
                }
                Ok(())
            });
            let _ = std::fs::remove_dir_all(&dir);
            result.map(|()| groups)
        });
        read.await.map_err(|e| Error::State {
            context: format!("reading the RocksDB state of '{operator}'"),
            message: e.to_string(),
        })?
    }
    #[cfg(not(feature = "rocksdb"))]
    {
        let _ = (storage, db);
        Err(Error::config(format!(
            "operator '{operator}' of checkpoint {checkpoint} keeps its state in RocksDB \
             files; reading them needs the `rocksdb` feature"
        )))
    }
}

fn bad_key(state: &str) -> Error {
    Error::Codec {
        what: format!("a key of state '{state}'"),
        message: "the entry key does not decode as the declared key type".into(),
    }
}

/// `bytes` as one `T`, with nothing left over.
fn decode_all<T: DeserializeOwned>(bytes: &[u8], state: &str) -> Result<T> {
    match codec::decode_prefix::<T>(bytes) {
        Some((t, [])) => Ok(t),
        _ => Err(bad_key(state)),
    }
}
