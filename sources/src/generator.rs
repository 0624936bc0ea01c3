//! A deterministic generator: record `i` is `f(i)` for `i` in `0..count`.

use exactly_engine::api::{Data, Source, SourceContext, SourcePoll, SourceReader};
use exactly_engine::error::{Error, Result};
use std::sync::Arc;

/// Produces `f(0), f(1), …, f(count - 1)`, divided into contiguous splits that are read
/// in parallel. The offset of a split is the next sequence number.
///
/// ```
/// use exactly_sources::GeneratorSource;
/// let squares = GeneratorSource::new(1_000, |i| i * i).with_splits(4);
/// ```
pub struct GeneratorSource<T, F> {
    count: u64,
    splits: u64,
    f: Arc<F>,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: Data, F: Fn(u64) -> T + Send + Sync + 'static> GeneratorSource<T, F> {
    /// `count` records, one split.
    pub fn new(count: u64, f: F) -> Self {
        GeneratorSource {
            count,
            splits: 1,
            f: Arc::new(f),
            _t: std::marker::PhantomData,
        }
    }

    /// Divide the sequence into `n` contiguous splits. The split count is part of the
    /// source's identity: keep it when restoring from a checkpoint.
    pub fn with_splits(mut self, n: u64) -> Self {
        self.splits = n.max(1);
        self
    }

    fn range(&self, split: u64) -> (u64, u64) {
        let start = split * self.count / self.splits;
        let end = (split + 1) * self.count / self.splits;
        (start, end)
    }
}

/// Reads one split of a [`GeneratorSource`].
pub struct GeneratorReader<T, F> {
    f: Arc<F>,
    next: u64,
    end: u64,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: Data, F: Fn(u64) -> T + Send + Sync + 'static> Source for GeneratorSource<T, F> {
    type Item = T;
    type Offset = u64;
    type Reader = GeneratorReader<T, F>;

    fn splits(&self) -> Result<Vec<String>> {
        Ok((0..self.splits)
            .map(|i| format!("{i}-of-{}", self.splits))
            .collect())
    }

    fn open(&self, split: &str, from: Option<u64>, ctx: &SourceContext) -> Result<Self::Reader> {
        let index: u64 = split
            .split_once("-of-")
            .filter(|(_, n)| n.parse() == Ok(self.splits))
            .and_then(|(i, _)| i.parse().ok())
            .ok_or_else(|| {
                Error::config(format!(
                    "generator '{}': split '{split}' does not belong to a generator with {} splits",
                    ctx.operator, self.splits
                ))
            })?;
        let (start, end) = self.range(index);
        let next = from.unwrap_or(start);
        if next < start || next > end {
            return Err(Error::config(format!(
                "generator '{}': restored offset {next} is outside split {split} ({start}..{end})",
                ctx.operator
            )));
        }
        Ok(GeneratorReader {
            f: self.f.clone(),
            next,
            end,
            _t: std::marker::PhantomData,
        })
    }
}

impl<T: Data, F: Fn(u64) -> T + Send + Sync + 'static> SourceReader for GeneratorReader<T, F> {
    type Item = T;
    type Offset = u64;

    fn poll_batch(&mut self, out: &mut Vec<T>, max: usize) -> Result<SourcePoll> {
        if self.next >= self.end {
            return Ok(SourcePoll::End);
        }
        let stop = self.end.min(self.next + max as u64);
        out.extend((self.next..stop).map(|i| (self.f)(i)));
        self.next = stop;
        Ok(SourcePoll::Ready)
    }

    fn offset(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_engine::ids::{OperatorId, SubtaskIndex};

    fn ctx() -> SourceContext {
        SourceContext {
            operator: OperatorId("g".into()),
            subtask: SubtaskIndex(0),
        }
    }

    fn drain(
        r: &mut GeneratorReader<u64, impl Fn(u64) -> u64 + Send + Sync + 'static>,
        max: usize,
    ) -> Vec<u64> {
        let mut out = Vec::new();
        while r.poll_batch(&mut out, max).unwrap() == SourcePoll::Ready {}
        out
    }

    #[test]
    fn splits_cover_the_sequence_exactly_once() {
        let g = GeneratorSource::new(1003, |i| i).with_splits(4);
        let mut all = Vec::new();
        for s in g.splits().unwrap() {
            all.extend(drain(&mut g.open(&s, None, &ctx()).unwrap(), 10));
        }
        assert_eq!(all, (0..1003).collect::<Vec<_>>());
    }

    #[test]
    fn restoring_at_an_offset_neither_repeats_nor_skips() {
        let g = GeneratorSource::new(100, |i| i);
        let mut r = g.open("0-of-1", None, &ctx()).unwrap();
        let mut first = Vec::new();
        r.poll_batch(&mut first, 37).unwrap();
        let off = r.offset();
        let rest = drain(&mut g.open("0-of-1", Some(off), &ctx()).unwrap(), 7);
        first.extend(rest);
        assert_eq!(first, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn foreign_split_names_are_rejected() {
        let g = GeneratorSource::new(10, |i| i).with_splits(2);
        assert!(g.open("0-of-3", None, &ctx()).is_err());
        assert!(g.open("0-of-2", Some(99), &ctx()).is_err());
    }
}
