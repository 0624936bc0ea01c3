//! exactly: embedded exactly-once stream processing.
//!
//! A pipeline is Rust code; [`prelude::Job::run`] executes it in the calling process on
//! all cores and, after a crash, the restarted process resumes from the last completed
//! checkpoint with nothing lost and nothing doubled in committed output.
//!
//! ```
//! use exactly::prelude::*;
//! use exactly::testing::VecSource;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! const BALANCE: ValueState<i64> = ValueState::new("balance");
//!
//! let job = Job::builder("ledger")
//!     .checkpoint_every(std::time::Duration::from_secs(1))
//!     .checkpoint_storage(dir.path().join("checkpoints").to_str().unwrap())
//!     .build()?;
//! job.source("payments", VecSource::new(vec![(1u32, 500i64), (2, 100), (1, -200)]))
//!     .key_by(|p| p.0)
//!     .process_fn(|(account, amount), ctx: &mut KeyedContext<'_, u32, (u32, i64)>| {
//!         let balance = ctx.value(BALANCE)?.unwrap_or(0) + amount;
//!         ctx.set_value(BALANCE, &balance)?;
//!         ctx.emit((account, balance));
//!         Ok(())
//!     })
//!     .name("balance") // state is stored under the operator's name
//!     .sink("balances", FileSink::exactly_once(dir.path().join("out")));
//! job.run()?; // resumes from the last checkpoint if there is one
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub use exactly_engine as engine;
#[cfg(feature = "kafka")]
pub mod kafka_repartition;
/// Keyed state: handles, and the backends ([`state::StateBackend`]: in memory, or
/// RocksDB with incremental checkpoints).
pub use exactly_engine::state;
/// The chaos kit: prove a pipeline exactly-once under injected crashes and rescaling
/// ([`testing::ExactlyOnceCheck`]), and test functions step by step
/// ([`testing::KeyedHarness`]).
pub use exactly_engine::testing;
pub use exactly_operators as operators;
pub use exactly_sinks as sinks;
pub use exactly_sources as sources;

/// Everything a pipeline author needs.
pub mod prelude {
    pub use exactly_engine::prelude::*;
    pub use exactly_operators::ReduceExt;
    #[cfg(feature = "parquet")]
    pub use exactly_sinks::Parquet;
    pub use exactly_sinks::{Csv, FileSink, FnEncoder, JsonLines, ObjectStoreSink};
    pub use exactly_sources::{BadRecordPolicy, GeneratorSource, JsonLinesSource};
}

/// The README's code blocks compile as doctests, so the quick start cannot rot. Some use
/// opt-in features (Parquet, PostgreSQL, Kafka), so they compile with all of them, as the
/// test command (`--all-features`) builds.
#[cfg(all(doctest, feature = "full"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
