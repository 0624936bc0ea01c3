//! What the example binaries share: logging and fault injection at start, and the
//! `--state` flag. Their flags are parsed with clap (`--help` lists them).
#![allow(dead_code)]

use anyhow::Result;

/// `--state`: the keyed state backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum State {
    /// Hash tables in memory.
    Memory,
    /// RocksDB (feature `rocksdb`).
    Rocksdb,
}

impl State {
    /// The backend it names.
    pub fn backend(self) -> exactly::state::StateBackend {
        match self {
            State::Memory => exactly::state::StateBackend::Memory,
            State::Rocksdb => exactly::state::StateBackend::rocksdb(),
        }
    }
}

/// Start an example binary: print the engine's warnings (e.g. a stalled watermark) to
/// stderr (`RUST_LOG` overrides) and, in builds with the `failpoints` feature, arm the
/// fail point named by `EXACTLY_CRASH_AT` (the chaos tests crash the binary with it).
pub fn start() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    #[cfg(feature = "failpoints")]
    exactly::engine::failpoints::crash_from_env().map_err(|e| anyhow::anyhow!(e))?;
    Ok(())
}
