//! The checkpoint manifest: the one file whose existence makes a checkpoint complete.
//!
//! JSON, because humans read it when something goes wrong. The body is protected by a
//! CRC-32 of its canonical serialisation, so a torn or edited manifest is rejected.

use crate::error::{Error, Result};
use crate::ids::{CheckpointId, OperatorId, SubtaskIndex};
use serde::{Deserialize, Serialize};

/// Version of the manifest layout.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// Where one task's snapshot lives and how to verify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStateHandle {
    /// The task (its head operator's id).
    pub task: OperatorId,
    /// Subtask index.
    pub subtask: SubtaskIndex,
    /// Parallelism of the task when the snapshot was taken.
    pub parallelism: usize,
    /// Operators whose state the file holds.
    pub operators: Vec<OperatorId>,
    /// Object path relative to the storage root.
    pub path: String,
    /// File size in bytes.
    pub size: u64,
    /// CRC-32 of the whole file.
    pub crc32: u32,
    /// Shared files (RocksDB SST files) the snapshot references besides its own file;
    /// retention deletes a shared file only when no retained checkpoint lists it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared: Vec<SharedFile>,
    /// Bytes this checkpoint wrote for the task: its own file plus shared files
    /// uploaded for it (shared files of earlier checkpoints are referenced, not copied).
    #[serde(default)]
    pub uploaded: u64,
    /// The declared type of each keyed state, per operator: state name to description
    /// (`ValueState<i64> keyed by u32`). A restore refuses a state declared otherwise.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub state_types: std::collections::BTreeMap<String, StateTypeMap>,
}

/// A file in the shared area of checkpoint storage, referenced by one or more
/// checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SharedFile {
    /// Object path relative to the storage root.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// CRC-32 of the content.
    pub crc32: u32,
}

/// Output a sink staged and that is not yet known to be committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingCommit {
    /// The checkpoint whose barrier staged it.
    pub checkpoint: CheckpointId,
    /// The sink operator.
    pub sink: OperatorId,
    /// The sink subtask that staged it.
    pub subtask: SubtaskIndex,
    /// The sink's committable, as JSON.
    pub committable: serde_json::Value,
}

/// State name to type description, as recorded for one operator (see
/// [`crate::state::types`]).
pub type StateTypeMap = std::collections::BTreeMap<String, String>;

/// A completed checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version.
    pub format_version: u32,
    /// Job name.
    pub job: String,
    /// Checkpoint id.
    pub checkpoint: CheckpointId,
    /// Wall-clock time of completion, milliseconds since the Unix epoch.
    pub completed_at_ms: u64,
    /// Number of key groups of the job.
    pub max_parallelism: u16,
    /// Whether this was the final checkpoint of a bounded run.
    pub is_final: bool,
    /// Every task's snapshot.
    pub tasks: Vec<TaskStateHandle>,
    /// Sink output to commit (this checkpoint's and any older not yet committed).
    pub pending_commits: Vec<PendingCommit>,
    /// The savepoint this state descends from, when a run was started with
    /// `restore_from_savepoint` (carried by every later checkpoint): a restart of that
    /// deployment may resume from these newer checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_savepoint: Option<String>,
    /// The lease (fencing generation) of the instance that wrote it; 0 in manifests
    /// written before generations were recorded.
    #[serde(default)]
    pub generation: u64,
    /// The instance that wrote it, for a job that runs as several processes; `None` for
    /// a job in one process. A restart with another number of instances is refused
    /// (the instances' shares would move without their state): that goes through a
    /// savepoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<crate::ids::Instance>,
}

/// A named checkpoint that retention keeps until the savepoint is deleted: the state a
/// new version of a job starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Savepoint {
    /// Its name, unique in the checkpoint location.
    pub name: String,
    /// The job whose state it holds.
    pub job: String,
    /// The completed checkpoint it names.
    pub checkpoint: CheckpointId,
    /// Wall-clock time of creation, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// The instance that took it, for a job that runs as several processes (each takes
    /// its own, under one name); `None` for a job in one process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<crate::ids::Instance>,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    crc32: u32,
    manifest: Manifest,
}

impl Manifest {
    /// Serialise with a checksum of the body.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let body = serde_json::to_vec(self).map_err(|e| Error::Codec {
            what: format!("manifest {}", self.checkpoint),
            message: e.to_string(),
        })?;
        let env = Envelope {
            crc32: crc32fast::hash(&body),
            manifest: self.clone(),
        };
        serde_json::to_vec_pretty(&env).map_err(|e| Error::Codec {
            what: format!("manifest {}", self.checkpoint),
            message: e.to_string(),
        })
    }

    /// Parse and verify; `path` and `checkpoint` name the file in errors.
    pub fn from_bytes(bytes: &[u8], checkpoint: CheckpointId, path: &str) -> Result<Manifest> {
        let corrupt = |message: String| Error::CorruptCheckpoint {
            checkpoint,
            path: path.to_string(),
            message,
        };
        let env: Envelope = serde_json::from_slice(bytes)
            .map_err(|e| corrupt(format!("unreadable manifest: {e}")))?;
        if env.manifest.format_version != MANIFEST_FORMAT_VERSION {
            return Err(corrupt(format!(
                "manifest format version {} is not supported (this build reads {MANIFEST_FORMAT_VERSION})",
                env.manifest.format_version
            )));
        }
        let body = serde_json::to_vec(&env.manifest).map_err(|e| corrupt(e.to_string()))?;
        let actual = crc32fast::hash(&body);
        if actual != env.crc32 {
            return Err(corrupt(format!(
                "manifest checksum mismatch: recorded {:08x}, content {actual:08x}",
                env.crc32
            )));
        }
        if env.manifest.checkpoint != checkpoint {
            return Err(corrupt(format!(
                "manifest names checkpoint {} but is stored as {checkpoint}",
                env.manifest.checkpoint
            )));
        }
        Ok(env.manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            job: "j".into(),
            checkpoint: CheckpointId(4),
            completed_at_ms: 1,
            max_parallelism: 128,
            is_final: false,
            tasks: vec![TaskStateHandle {
                task: OperatorId("t".into()),
                subtask: SubtaskIndex(0),
                parallelism: 1,
                operators: vec![OperatorId("t".into())],
                path: "chk-4/t-0".into(),
                size: 10,
                crc32: 7,
                shared: vec![SharedFile {
                    path: "shared/x.sst".into(),
                    size: 3,
                    crc32: 9,
                }],
                uploaded: 13,
                state_types: [(
                    "t".to_string(),
                    [("n".to_string(), "ValueState<i64> keyed by u32".to_string())].into(),
                )]
                .into(),
            }],
            pending_commits: vec![PendingCommit {
                checkpoint: CheckpointId(4),
                sink: OperatorId("s".into()),
                subtask: SubtaskIndex(0),
                committable: serde_json::json!({"file": "x"}),
            }],
            from_savepoint: None,
            generation: 1,
            instance: None,
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let b = m.to_bytes().unwrap();
        assert_eq!(Manifest::from_bytes(&b, CheckpointId(4), "p").unwrap(), m);
    }

    #[test]
    fn edited_manifest_is_rejected() {
        let b = String::from_utf8(sample().to_bytes().unwrap()).unwrap();
        let edited = b.replace("\"size\": 10", "\"size\": 11");
        assert_ne!(edited, b);
        let err = Manifest::from_bytes(edited.as_bytes(), CheckpointId(4), "p").unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn truncated_or_misplaced_manifest_is_rejected() {
        let b = sample().to_bytes().unwrap();
        assert!(Manifest::from_bytes(&b[..b.len() / 2], CheckpointId(4), "p").is_err());
        let err = Manifest::from_bytes(&b, CheckpointId(5), "p").unwrap_err();
        assert!(err.to_string().contains("stored as 5"), "{err}");
    }
}
