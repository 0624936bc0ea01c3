//! Two-phase-commit sinks for exactly. Each stages output at the checkpoint barrier and
//! makes it visible only after the checkpoint's manifest is written; committing twice
//! has no effect.
//!
//! * [`FileSink`]: part files in a local directory, published by atomic rename.

mod file;

pub use file::{FileCommittable, FileSink, FnEncoder, JsonLines, RecordEncoder};
