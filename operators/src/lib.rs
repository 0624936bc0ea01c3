//! Operators built on the engine's public API, added to the DSL by extension traits.
//!
//! * [`ReduceExt::reduce`]: running reduction per key.

mod reduce;

pub use reduce::ReduceExt;
