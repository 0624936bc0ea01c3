//! Building a source task: splits, restored offsets, reader per split.

use super::{BuildCtx, ErasedSource, NodeId, SourceNode};
use crate::api::{Source, SourceContext};
use crate::codec;
use crate::error::{Error, Result};
use crate::runtime::heads::{
    split_owner, Discovery, SourceHead, SourceWatermarks, SplitReader, SplitState, TaskHead,
};
use crate::time::{Timestamp, WatermarkStrategy};
use std::collections::HashMap;
use std::time::Instant;

impl<S: Source> ErasedSource for SourceNode<S> {
    fn replayable(&self) -> bool {
        self.source.replayable()
    }

    fn build_head(&self, node: NodeId, ctx: &mut BuildCtx<'_>) -> Result<Box<dyn TaskHead>> {
        let operator = ctx.graph.nodes[node].op.clone();
        let parallelism = ctx.parallelism_of(node);
        // Listed once per run for all subtasks: each deals out the same list.
        let splits = ctx.splits.of(node, || self.source.splits())?;
        let mut restored: HashMap<String, (S::Offset, bool, Timestamp)> = HashMap::new();
        for snap in ctx.restored(&operator) {
            for entry in &snap.list {
                // Restarting cannot make it decode: stop, and say why.
                let (split, offset, done, max_ts): SplitState<S::Offset> =
                    codec::decode(entry, "source offset").map_err(|e| {
                        Error::config(format!(
                            "source '{operator}': an offset in the restored checkpoint does not \
                             decode as {} ({e}): the source's type, or the version of exactly \
                             that wrote the checkpoint, changed. Run the version that wrote it, \
                             or start over with new checkpoint storage and new output locations",
                            std::any::type_name::<S::Offset>()
                        ))
                    })?;
                restored.insert(split, (offset, done, max_ts));
            }
        }
        if ctx.subtask.0 == 0 && ctx.restored.checkpoint.is_some() {
            for split in restored.keys() {
                if !splits.contains(split) {
                    return Err(Error::config(format!(
                        "source '{operator}': split '{split}' is in the restored checkpoint but no longer \
                         in the input; its unread records would be lost. Restore the input or start \
                         with fresh checkpoint storage deliberately"
                    )));
                }
            }
        }
        let sctx = SourceContext {
            operator: operator.clone(),
            subtask: ctx.subtask,
        };
        let discovery = self.source.discover_splits_every().map(|every| Discovery {
            source: self.source.clone(),
            ctx: sctx.clone(),
            every,
            last: Instant::now(),
            known: splits.iter().cloned().collect(),
        });
        let (global, total) = ctx.global_share(node);
        let max = ctx.env.config.max_parallelism;
        let mut readers = Vec::new();
        for (i, split) in splits.iter().enumerate() {
            let key_group = self.source.split_key_group(split);
            let across = ctx.env.config.instance.count > 1;
            if split_owner(split, key_group, i, (max, total, across)) != global.0 {
                continue;
            }
            let (from, done, max_ts) = match restored.remove(split) {
                Some((offset, done, max_ts)) => (Some(offset), done, max_ts),
                None => (None, false, Timestamp::MIN),
            };
            let reader = self.source.open(split, from, &sctx)?;
            readers.push(SplitReader {
                split: split.clone(),
                reader,
                done,
                max_ts,
                last_data: ctx.env.clock.monotonic_ms(),
            });
        }
        let strategy = match &ctx.graph.nodes[node].watermarks {
            None => None,
            Some(any) => Some(
                any.downcast_ref::<WatermarkStrategy<S::Item>>()
                    .ok_or_else(|| {
                        Error::config(format!(
                            "internal: watermark strategy of '{operator}' has the wrong type"
                        ))
                    })?
                    .clone(),
            ),
        };
        let watermarks = match strategy {
            None if !self.source.watermarks_from_readers() => None,
            strategy => {
                let metrics = &ctx.env.metrics;
                Some(SourceWatermarks {
                    strategy,
                    negative: metrics.counter(&operator.0, "negative_timestamps"),
                    future: metrics.counter(&operator.0, "future_timestamp_batches"),
                    stalls: metrics.counter(&operator.0, "watermark_stalls"),
                    emitted: Timestamp::MIN,
                    idle: false,
                    last_advance: Instant::now(),
                    records_since_advance: 0,
                    warned_negative: false,
                    warned_future: false,
                })
            }
        };
        let out = ctx.build_output::<S::Item>(node)?;
        let control = ctx.control.take().ok_or_else(|| {
            Error::config(format!(
                "internal: source '{operator}' has no control channel"
            ))
        })?;
        let records = ctx.env.metrics.counter(&operator.0, "records");
        let backlog =
            ctx.env
                .metrics
                .gauge(&operator.0, crate::telemetry::SOURCE_BACKLOG, ctx.subtask.0);
        Ok(Box::new(SourceHead::<S> {
            key: ctx.key(),
            parallelism,
            global: (global.0, total, max),
            operator,
            readers,
            out,
            control,
            env: ctx.env.clone(),
            watermarks,
            records,
            backlog,
            backlog_countdown: 0,
            unannounced: Default::default(),
            discovery,
        }))
    }
}
