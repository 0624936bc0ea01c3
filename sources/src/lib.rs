//! Replayable sources for exactly.
//!
//! Every source here names its offsets as the position of the **next** record to read,
//! so a restore neither re-reads nor skips the record at the boundary.
//!
//! * [`JsonLinesSource`]: files of one JSON document per line; offset = byte position.
//! * [`GeneratorSource`]: records computed from a sequence number; offset = sequence number.
//! * [`VecSource`]: an in-memory vector, for tests.
//! * `KafkaSource` (feature `kafka`): a topic, one split per partition; offset = next offset.

#![warn(missing_docs)]

mod generator;
mod jsonl;
#[cfg(feature = "kafka")]
mod kafka;

pub use exactly_engine::testing::VecSource;
pub use generator::GeneratorSource;
pub use jsonl::{BadRecordPolicy, JsonLinesOffset, JsonLinesSource};
#[cfg(feature = "kafka")]
pub use kafka::{KafkaReader, KafkaSource};
/// The Kafka client the source uses (for producing test data, admin calls).
#[cfg(feature = "kafka")]
pub use rdkafka;
