//! exactly's engine: placeholder while modules land.
pub mod aligner;
pub mod codec;
pub mod coordinator;
pub mod error;
pub mod ids;
pub mod manifest;
