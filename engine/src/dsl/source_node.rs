//! Building a source task: splits, restored offsets, reader per split.

use super::graph::{BuildCtx, ErasedSource, NodeId, SourceNode};
use crate::api::{Source, SourceContext};
use crate::codec;
use crate::error::{Error, Result};
use crate::runtime::heads::{SourceHead, SplitReader, SplitState, TaskHead};
use std::collections::HashMap;

impl<S: Source> ErasedSource for SourceNode<S> {
    fn replayable(&self) -> bool {
        self.source.replayable()
    }

    fn build_head(&self, node: NodeId, ctx: &mut BuildCtx<'_>) -> Result<Box<dyn TaskHead>> {
        let operator = ctx.graph.nodes[node].op.clone();
        let parallelism = ctx.parallelism_of(node);
        let splits = self.source.splits()?;
        let mut restored: HashMap<String, (S::Offset, bool)> = HashMap::new();
        for snap in ctx.restored(&operator) {
            for entry in &snap.list {
                let (split, offset, done): SplitState<S::Offset> =
                    codec::decode(entry, &format!("offset of source '{operator}'"))?;
                restored.insert(split, (offset, done));
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
        let mut readers = Vec::new();
        for (i, split) in splits.iter().enumerate() {
            if i % parallelism != ctx.subtask.0 {
                continue;
            }
            let (from, done) = match restored.remove(split) {
                Some((offset, done)) => (Some(offset), done),
                None => (None, false),
            };
            let reader = self.source.open(split, from, &sctx)?;
            readers.push(SplitReader {
                split: split.clone(),
                reader,
                done,
            });
        }
        let out = ctx.build_output::<S::Item>(node)?;
        let control = ctx.control.take().ok_or_else(|| {
            Error::config(format!(
                "internal: source '{operator}' has no control channel"
            ))
        })?;
        Ok(Box::new(SourceHead::<S> {
            key: ctx.key(),
            parallelism,
            operator,
            readers,
            out,
            control,
            env: ctx.env.clone(),
        }))
    }
}
