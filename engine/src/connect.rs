//! What a connector of one's own (a source or a sink) uses besides the traits in
//! [`crate::api`]: the S3 client configuration the job's checkpoint storage uses (from the
//! `AWS_*` environment, with its timeouts and retries), and the compact serde framing
//! (postcard) the engine stores state and offsets in. The sinks in `exactly-sinks` are
//! written with these and nothing else from the engine's internals;
//! `examples/custom_sink.rs` in the repository is a complete sink built on the traits.

pub use crate::api::{
    Data, RecoveryContext, SinkContext, SinkWriter, Source, SourceContext, SourcePoll,
    SourceReader, TwoPhaseCommitSink,
};
pub use crate::codec::{decode, decode_prefix, encode, encode_into};
#[cfg(feature = "s3")]
pub use crate::storage::{s3_bucket, S3_MAX_RETRIES, S3_RETRY_TIMEOUT};
