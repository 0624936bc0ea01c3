//! Sources slowed down on purpose, for tests and demos: a pause after every batch, or a
//! budget of batches per completed checkpoint. A job that sets neither reads its
//! sources unwrapped, so these knobs cost the production path nothing.

use crate::api::{Source, SourceContext, SourcePoll, SourceReader};
use crate::error::Result;
use std::time::Duration;

/// How a paced source reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Pacing {
    /// Sleep this long after every batch read.
    pub pause: Option<Duration>,
    /// Read at most this many batches of a split, then nothing until a checkpoint
    /// completes (its notice reaches the reader). Makes a crash armed after checkpoint
    /// `n` land before the split's `(n + 1) · k + 1`-th batch, whatever the machine's
    /// speed.
    pub batches_per_checkpoint: Option<u32>,
}

impl Pacing {
    pub(crate) fn is_off(&self) -> bool {
        *self == Pacing::default()
    }
}

/// A source whose readers follow a [`Pacing`]. Splits, offsets and everything else are
/// the wrapped source's, so checkpoints of a paced run restore into an unpaced one.
pub(crate) struct Paced<S> {
    pub inner: S,
    pub pacing: Pacing,
}

impl<S: Source> Source for Paced<S> {
    type Item = S::Item;
    type Offset = S::Offset;
    type Reader = PacedReader<S::Reader>;

    fn splits(&self) -> Result<Vec<String>> {
        self.inner.splits()
    }

    fn open(
        &self,
        split: &str,
        from: Option<S::Offset>,
        ctx: &SourceContext,
    ) -> Result<Self::Reader> {
        Ok(PacedReader {
            inner: self.inner.open(split, from, ctx)?,
            pacing: self.pacing,
            budget: self.pacing.batches_per_checkpoint.unwrap_or(u32::MAX),
        })
    }

    fn replayable(&self) -> bool {
        self.inner.replayable()
    }

    fn discover_splits_every(&self) -> Option<Duration> {
        self.inner.discover_splits_every()
    }

    fn split_key_group(&self, split: &str) -> Option<crate::ids::KeyGroup> {
        self.inner.split_key_group(split)
    }
}

/// Reads one split of a [`Paced`] source.
pub(crate) struct PacedReader<R> {
    inner: R,
    pacing: Pacing,
    /// Batches this reader may still read before the next checkpoint completes.
    budget: u32,
}

impl<R: SourceReader> SourceReader for PacedReader<R> {
    type Item = R::Item;
    type Offset = R::Offset;

    fn poll_batch(&mut self, out: &mut Vec<R::Item>, max: usize) -> Result<SourcePoll> {
        if self.budget == 0 {
            return Ok(SourcePoll::Idle);
        }
        let polled = self.inner.poll_batch(out, max)?;
        if matches!(polled, SourcePoll::Ready) {
            if self.pacing.batches_per_checkpoint.is_some() {
                self.budget -= 1;
            }
            if let Some(pause) = self.pacing.pause {
                std::thread::sleep(pause);
            }
        }
        Ok(polled)
    }

    fn offset(&self) -> R::Offset {
        self.inner.offset()
    }

    fn checkpoint_complete(&mut self, offset: &R::Offset) {
        if let Some(k) = self.pacing.batches_per_checkpoint {
            self.budget = k;
        }
        self.inner.checkpoint_complete(offset);
    }

    fn backlog(&self) -> Option<u64> {
        self.inner.backlog()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{OperatorId, SubtaskIndex};

    /// The numbers `0..100` in one split.
    struct Numbers;

    struct NumbersReader(u32);

    impl Source for Numbers {
        type Item = u32;
        type Offset = u32;
        type Reader = NumbersReader;
        fn splits(&self) -> Result<Vec<String>> {
            Ok(vec!["0".into()])
        }
        fn open(&self, _: &str, from: Option<u32>, _: &SourceContext) -> Result<NumbersReader> {
            Ok(NumbersReader(from.unwrap_or(0)))
        }
    }

    impl SourceReader for NumbersReader {
        type Item = u32;
        type Offset = u32;
        fn poll_batch(&mut self, out: &mut Vec<u32>, max: usize) -> Result<SourcePoll> {
            if self.0 == 100 {
                return Ok(SourcePoll::End);
            }
            let to = 100.min(self.0 + max as u32);
            out.extend(self.0..to);
            self.0 = to;
            Ok(SourcePoll::Ready)
        }
        fn offset(&self) -> u32 {
            self.0
        }
    }

    fn reader(pacing: Pacing) -> PacedReader<NumbersReader> {
        let source = Paced {
            inner: Numbers,
            pacing,
        };
        let ctx = SourceContext {
            operator: OperatorId("numbers".into()),
            subtask: SubtaskIndex(0),
        };
        source.open("0", None, &ctx).unwrap()
    }

    #[test]
    fn a_budget_reads_that_many_batches_per_completed_checkpoint() {
        let mut r = reader(Pacing {
            pause: None,
            batches_per_checkpoint: Some(2),
        });
        let mut out = Vec::new();
        assert!(matches!(
            r.poll_batch(&mut out, 10).unwrap(),
            SourcePoll::Ready
        ));
        assert!(matches!(
            r.poll_batch(&mut out, 10).unwrap(),
            SourcePoll::Ready
        ));
        for _ in 0..3 {
            assert!(matches!(
                r.poll_batch(&mut out, 10).unwrap(),
                SourcePoll::Idle
            ));
        }
        assert_eq!(out.len(), 20);
        assert_eq!(r.offset(), 20);
        r.checkpoint_complete(&20);
        assert!(matches!(
            r.poll_batch(&mut out, 10).unwrap(),
            SourcePoll::Ready
        ));
        assert_eq!(out, (0..30).collect::<Vec<u32>>());
    }

    #[test]
    fn without_a_budget_a_reader_reads_to_the_end() {
        let mut r = reader(Pacing::default());
        let mut out = Vec::new();
        while matches!(r.poll_batch(&mut out, 7).unwrap(), SourcePoll::Ready) {}
        assert_eq!(out, (0..100).collect::<Vec<u32>>());
    }
}
