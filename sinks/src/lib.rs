//! Two-phase-commit sinks for exactly. Each stages output at the checkpoint barrier and
//! makes it visible only after the checkpoint's manifest is written; committing twice
//! has no effect.
//!
//! * [`FileSink`]: part files in a local directory, published by atomic rename.
//! * [`ObjectStoreSink`]: part files in S3 (or any store with multipart uploads),
//!   published by completing their multipart uploads.
//! * [`postgres::PostgresSink`] (feature `postgres`): rows in PostgreSQL, by two-phase
//!   commit or by idempotent transactional commits with marker rows.
//! * [`kafka::KafkaSink`] (feature `kafka`): records in a Kafka topic, produced at commit
//!   time in one Kafka transaction per subtask and checkpoint, with a marker record.
//!
//! Part files are JSON lines ([`JsonLines`]), CSV ([`Csv`]), Parquet (`Parquet`,
//! feature `parquet`) or your own [`RecordEncoder`].

#![warn(missing_docs)]

mod bucket;
mod file;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "parquet")]
pub mod parquet;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "s3")]
mod s3_uploads;

pub use bucket::{Bucket, ObjectStoreSink, ObjectWriter, ObjectsCommittable, StagedObject};
pub use file::{Csv, FileCommittable, FileSink, FnEncoder, JsonLines, RecordEncoder};
#[cfg(feature = "parquet")]
pub use parquet::Parquet;

/// A number no other writer of this process or another uses (clock, process, a random
/// hasher key): names staged uploads and staging tokens.
pub(crate) fn unique_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}
