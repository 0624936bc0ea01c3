//! Replayable sources for exactly.
//!
//! Every source here names its offsets as the position of the **next** record to read,
//! so a restore neither re-reads nor skips the record at the boundary.
//!
//! * [`JsonLinesSource`]: files of one JSON document per line; offset = byte position.
//! * [`GeneratorSource`]: records computed from a sequence number; offset = sequence number.
//! * [`VecSource`]: an in-memory vector, for tests.

mod generator;
mod jsonl;

pub use exactly_engine::testing::VecSource;
pub use generator::GeneratorSource;
pub use jsonl::{BadRecordPolicy, JsonLinesOffset, JsonLinesSource};
