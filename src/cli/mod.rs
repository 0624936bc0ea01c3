//! The commands of the `exactly` binary (`src/bin/exactly.rs`).

pub mod checkpoints;
pub mod format;
pub mod lease;
pub mod savepoints;
pub mod state;
