//! JSON-lines files: one JSON document per line; each file is a split.
//!
//! # Files that change
//!
//! A bounded source (the default) reads each file as it was when the job first opened
//! it, up to the length it had then, in the first run and in every restored run; a
//! [`JsonLinesSource::follow`] source tails its files and never ends. Every offset
//! carries the identity of its file, so a file replaced (rotated) or truncated under a
//! restored offset stops the job with an error naming it (see `identity`).
//!
//! # Bad records
//!
//! What happens to a line that does not parse is the job's explicit choice
//! ([`BadRecordPolicy`]): stop with an error naming file and line, or append the line to
//! a dead-letter file and go on. Dead-letter entries carry the byte offset of the line,
//! and a reader only appends entries beyond the highest offset already in the file, so
//! re-reading after a restore never writes an entry twice.

mod dead_letters;
mod identity;

use dead_letters::{DeadLetter, DeadLetters};
use exactly_engine::api::{Source, SourceContext, SourcePoll, SourceReader};
use exactly_engine::error::{Error, Result};
pub use identity::FileIdentity;
use identity::FileNow;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Take};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// What to do with a line that is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BadRecordPolicy {
    /// Stop the job with an error naming the file and line (the default).
    Fail,
    /// Append the line to a dead-letter file in this directory and continue.
    DeadLetter(PathBuf),
}

/// Position in one file: the byte offset and number of the next line, and which file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonLinesOffset {
    /// Byte offset of the next line.
    pub byte: u64,
    /// Number of lines before it.
    pub lines_read: u64,
    /// The file this offset is in.
    pub file: FileIdentity,
}

/// Reads records of type `T` from a JSON-lines file, or from every `*.jsonl` file in a
/// directory (each file is a split, read in parallel).
///
/// ```no_run
/// # use exactly_sources::{JsonLinesSource, BadRecordPolicy};
/// #[derive(serde::Deserialize, Clone)]
/// struct Payment { account: u64, amount_cents: i64 }
/// let src = JsonLinesSource::<Payment>::new("payments.jsonl")
///     .on_bad_record(BadRecordPolicy::DeadLetter("dead-letters/".into()));
/// ```
pub struct JsonLinesSource<T> {
    path: PathBuf,
    policy: BadRecordPolicy,
    follow: bool,
    _t: PhantomData<fn() -> T>,
}

impl<T> JsonLinesSource<T> {
    /// Read `path`: a file, or a directory of `*.jsonl` files.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        JsonLinesSource {
            path: path.into(),
            policy: BadRecordPolicy::Fail,
            follow: false,
            _t: PhantomData,
        }
    }

    /// Tail the files instead of reading them as they were when the job started: lines
    /// appended while the job runs, or while it is down, are read once, across restarts.
    /// A line is read only once its newline is written. The source never ends: stop the
    /// job with its `StopHandle` or SIGTERM (a checkpoint keeps the position). Files
    /// are followed by the handle opened at start, like `tail -f`: a file rotated away
    /// under a running job is read to its end and the new file is not picked up; after
    /// a restart the new file at the same path is refused as replaced.
    ///
    /// Following a directory, `*.jsonl` files added to it are read too: the directory
    /// is listed again every second while the job runs (and at every start), and each
    /// new file is read from its start, once. Write a new file under another name and
    /// rename it into place, or write whole lines: a partial last line waits for its
    /// newline either way.
    ///
    /// ```no_run
    /// # use exactly_sources::JsonLinesSource;
    /// #[derive(serde::Deserialize, Clone)]
    /// struct Payment { account: u64, amount_cents: i64 }
    /// let src = JsonLinesSource::<Payment>::new("payments.jsonl").follow();
    /// ```
    pub fn follow(mut self) -> Self {
        self.follow = true;
        self
    }

    /// Choose what happens to lines that are not valid records.
    pub fn on_bad_record(mut self, policy: BadRecordPolicy) -> Self {
        self.policy = policy;
        self
    }

    fn split_path(&self, split: &str) -> PathBuf {
        if self.path.is_dir() {
            self.path.join(split)
        } else {
            self.path.clone()
        }
    }
}

/// Reads one file of a [`JsonLinesSource`].
pub struct JsonLinesReader<T> {
    path: PathBuf,
    /// Limited to the bounded end; unlimited when following.
    reader: BufReader<Take<File>>,
    offset: JsonLinesOffset,
    follow: bool,
    /// The current line's bytes: read as bytes, so invalid UTF-8 is a bad record (of
    /// its file and line) rather than an I/O error. When following, a line whose
    /// newline is not written yet stays here, unread, until it is.
    line: Vec<u8>,
    /// A bounded reader warned that the file grew past its end.
    warned_growth: bool,
    /// The file's length when it was last checked against the identity.
    checked_len: Option<u64>,
    dead_letters: Option<DeadLetters>,
    _t: PhantomData<fn() -> T>,
}

/// A missing input is a configuration error (restarting cannot make it appear), so the
/// job stops at once; other I/O errors may be transient.
fn missing_or_io(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::config(format!(
            "JSON-lines source: input {} does not exist",
            path.display()
        ))
    } else {
        Error::io(format!("JSON-lines source {}", path.display()), e)
    }
}

impl<T: exactly_engine::api::Data> Source for JsonLinesSource<T> {
    type Item = T;
    type Offset = JsonLinesOffset;
    type Reader = JsonLinesReader<T>;

    fn splits(&self) -> Result<Vec<String>> {
        let meta = std::fs::metadata(&self.path).map_err(|e| missing_or_io(&self.path, e))?;
        if !meta.is_dir() {
            let name = self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Ok(vec![name]);
        }
        let mut names = Vec::new();
        let entries = std::fs::read_dir(&self.path)
            .map_err(|e| Error::io(format!("listing {}", self.path.display()), e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(format!("listing {}", self.path.display()), e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".jsonl") {
                names.push(name);
            }
        }
        names.sort();
        if names.is_empty() {
            return Err(Error::config(format!(
                "JSON-lines source: no *.jsonl files in {}",
                self.path.display()
            )));
        }
        Ok(names)
    }

    fn discover_splits_every(&self) -> Option<std::time::Duration> {
        (self.follow && self.path.is_dir()).then_some(std::time::Duration::from_secs(1))
    }

    fn open(
        &self,
        split: &str,
        from: Option<JsonLinesOffset>,
        ctx: &SourceContext,
    ) -> Result<JsonLinesReader<T>> {
        let path = self.split_path(split);
        let mut file = File::open(&path).map_err(|e| missing_or_io(&path, e))?;
        let io = |e| Error::io(format!("reading {}", path.display()), e);
        let len = file.metadata().map_err(io)?.len();
        let offset = match from {
            None => JsonLinesOffset {
                byte: 0,
                lines_read: 0,
                file: FileIdentity::of(&mut file, len, self.follow).map_err(io)?,
            },
            Some(restored) => {
                let now = FileNow {
                    len,
                    head_crc: identity::head_crc(&mut file, restored.file.head_len.into())
                        .map_err(io)?,
                };
                let end = identity::check_restored(&path, &restored, now, self.follow)?;
                JsonLinesOffset {
                    file: FileIdentity {
                        end,
                        ..restored.file
                    },
                    ..restored
                }
            }
        };
        file.seek(SeekFrom::Start(offset.byte)).map_err(io)?;
        let limit = match offset.file.end {
            Some(end) => end.saturating_sub(offset.byte),
            None => u64::MAX,
        };
        let dead_letters = match &self.policy {
            BadRecordPolicy::Fail => None,
            BadRecordPolicy::DeadLetter(dir) => {
                Some(DeadLetters::open(dir, &ctx.operator.0, split)?)
            }
        };
        let mut reader = JsonLinesReader {
            path,
            reader: BufReader::with_capacity(256 * 1024, file.take(limit)),
            offset,
            follow: self.follow,
            line: Vec::new(),
            warned_growth: false,
            checked_len: None,
            dead_letters,
            _t: PhantomData,
        };
        reader.note_growth(len);
        Ok(reader)
    }
}

impl<T> JsonLinesReader<T> {
    /// Whenever the file's length changed (and before the first read), check it against
    /// the offset: not shorter than what was read, and still starting with the bytes the
    /// identity covers. Otherwise reading on at the byte offset would skip or misread
    /// records. One `fstat` per batch; a read of at most 4 KiB when the length changed.
    fn check_file(&mut self) -> Result<u64> {
        let file = self.reader.get_ref().get_ref();
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))?
            .len();
        if self.checked_len == Some(len) {
            return Ok(len);
        }
        // A bounded reader also needs what it has still to read, up to its end.
        let read = self.offset.byte + self.line.len() as u64;
        let needed = self.offset.file.end.map_or(read, |end| end.max(read));
        if len < needed {
            return Err(Error::config(format!(
                "JSON-lines source: {} was truncated while it was read: it has {len} bytes, \
                 {read} were read and {needed} are needed. Lines would be skipped; \
                 copy-truncate rotation cannot be read safely, rotate by renaming instead",
                self.path.display(),
            )));
        }
        // A bounded reader's identity covers only what it reads.
        let readable = self.offset.file.end.map_or(len, |end| len.min(end));
        identity::refresh(file, &mut self.offset.file, readable).map_err(|e| {
            // Rewritten or cut: restarting cannot undo it. Other read errors may pass.
            if e.kind() == std::io::ErrorKind::InvalidData {
                Error::config(format!("JSON-lines source: {}: {e}", self.path.display()))
            } else {
                Error::io(format!("reading {}", self.path.display()), e)
            }
        })?;
        self.checked_len = Some(len);
        Ok(len)
    }

    /// A bounded reader says once that the file grew past its end: those lines are not
    /// read, by design.
    fn note_growth(&mut self, len: u64) {
        if let Some(end) = self.offset.file.end {
            if len > end && !self.warned_growth {
                self.warned_growth = true;
                tracing::warn!(
                    "{}: {} bytes were appended after the job started; this bounded source \
                     reads the file as it was then ({end} bytes), not the new lines \
                     (JsonLinesSource::follow() tails a growing file)",
                    self.path.display(),
                    len - end
                );
            }
        }
    }
}

impl<T: DeserializeOwned + 'static> SourceReader for JsonLinesReader<T> {
    type Item = T;
    type Offset = JsonLinesOffset;

    fn poll_batch(&mut self, out: &mut Vec<T>, max: usize) -> Result<SourcePoll> {
        let len = self.check_file()?;
        let before = out.len();
        while out.len() - before < max {
            let n = self.reader.read_until(b'\n', &mut self.line).map_err(|e| {
                Error::io(
                    format!(
                        "reading {} at line {}",
                        self.path.display(),
                        self.offset.lines_read + 1
                    ),
                    e,
                )
            })?;
            if n == 0 || (self.follow && self.line.last() != Some(&b'\n')) {
                break;
            }
            let line_start = self.offset.byte;
            self.offset.byte += self.line.len() as u64;
            self.offset.lines_read += 1;
            // The same UTF-8 check `read_line` made, but a failure is the line's.
            let parsed = match std::str::from_utf8(&self.line) {
                Ok(text) => {
                    let text = text.trim_end_matches(['\n', '\r']);
                    if text.trim().is_empty() {
                        self.line.clear();
                        continue;
                    }
                    serde_json::from_str::<T>(text).map_err(|e| e.to_string())
                }
                Err(e) => Err(format!("invalid UTF-8: {e}")),
            };
            match parsed {
                Ok(record) => out.push(record),
                Err(e) => match &mut self.dead_letters {
                    None => {
                        return Err(Error::BadRecord {
                            file: self.path.clone(),
                            line: self.offset.lines_read,
                            message: e,
                        })
                    }
                    Some(dl) => dl.write(&DeadLetter {
                        file: self.path.display().to_string(),
                        line: self.offset.lines_read,
                        byte_offset: line_start,
                        error: e,
                        raw: String::from_utf8_lossy(&self.line)
                            .trim_end_matches(['\n', '\r'])
                            .to_string(),
                    })?,
                },
            }
            self.line.clear();
        }
        if out.len() > before {
            return Ok(SourcePoll::Ready);
        }
        if self.follow {
            return Ok(SourcePoll::Idle);
        }
        self.note_growth(len);
        Ok(SourcePoll::End)
    }

    fn offset(&self) -> JsonLinesOffset {
        self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_engine::ids::{OperatorId, SubtaskIndex};

    #[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
    struct R {
        n: u32,
    }

    fn ctx() -> SourceContext {
        SourceContext {
            operator: OperatorId("src".into()),
            subtask: SubtaskIndex(0),
        }
    }

    fn read_all(r: &mut JsonLinesReader<R>, max: usize) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        while r.poll_batch(&mut out, max)? == SourcePoll::Ready {}
        Ok(out.into_iter().map(|r| r.n).collect())
    }

    #[test]
    fn restore_at_every_boundary_neither_repeats_nor_skips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        let body: String = (0..50)
            .map(|n| format!("{{\"n\":{n}}}\n"))
            .collect::<String>()
            + "{\"n\":50}";
        std::fs::write(&p, body).unwrap();
        let src = JsonLinesSource::<R>::new(&p);
        for cut in 0..=51 {
            let mut r = src.open("in.jsonl", None, &ctx()).unwrap();
            let mut got = Vec::new();
            if cut > 0 {
                r.poll_batch(&mut got, cut).unwrap();
            }
            let off = r.offset();
            let mut r2 = src.open("in.jsonl", Some(off), &ctx()).unwrap();
            let mut got: Vec<u32> = got.into_iter().map(|r| r.n).collect();
            got.extend(read_all(&mut r2, 7).unwrap());
            assert_eq!(got, (0..=50).collect::<Vec<_>>(), "cut at {cut}");
        }
    }

    fn append(p: &Path, text: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn lines(range: std::ops::Range<u32>) -> String {
        range.map(|n| format!("{{\"n\":{n}}}\n")).collect()
    }

    #[test]
    fn a_bounded_source_reads_the_file_as_it_was_when_the_job_started() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, lines(0..10)).unwrap();
        let src = JsonLinesSource::<R>::new(&p);
        let mut r = src.open("in.jsonl", None, &ctx()).unwrap();
        let mut first = Vec::new();
        r.poll_batch(&mut first, 4).unwrap();
        let at_four = r.offset();
        // A writer appends while the job runs: the run still ends at the first 10 lines...
        append(&p, &lines(10..15));
        assert_eq!(read_all(&mut r, 3).unwrap(), (4..10).collect::<Vec<_>>());
        // ...and so does a run restored from its checkpoint, with the file grown since.
        let mut restored = src.open("in.jsonl", Some(at_four), &ctx()).unwrap();
        assert_eq!(
            read_all(&mut restored, 3).unwrap(),
            (4..10).collect::<Vec<_>>()
        );
        // Cut below its end while it is read: an error, not an early end.
        let mut r = src.open("in.jsonl", Some(at_four), &ctx()).unwrap();
        r.poll_batch(&mut Vec::new(), 1).unwrap();
        std::fs::write(&p, lines(0..7)).unwrap();
        let err = r.poll_batch(&mut Vec::new(), 10).unwrap_err();
        assert!(
            err.to_string().contains("truncated while it was read"),
            "{err}"
        );
    }

    #[test]
    fn a_rotated_or_truncated_file_under_a_restored_offset_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, lines(0..50)).unwrap();
        for policy in [
            BadRecordPolicy::Fail,
            BadRecordPolicy::DeadLetter(dir.path().join("dl")),
        ] {
            let src = JsonLinesSource::<R>::new(&p).on_bad_record(policy);
            std::fs::write(&p, lines(0..50)).unwrap();
            let mut r = src.open("in.jsonl", None, &ctx()).unwrap();
            r.poll_batch(&mut Vec::new(), 20).unwrap();
            let offset = r.offset();
            // Rotated: a longer file with other records at the same path.
            std::fs::write(&p, lines(1000..1100)).unwrap();
            let err = src.open("in.jsonl", Some(offset), &ctx()).err().unwrap();
            assert!(err.to_string().contains("was replaced"), "{err}");
            assert!(err.to_string().contains("in.jsonl"), "{err}");
            // Truncated under the offset (copy-truncate rotation).
            std::fs::write(&p, lines(0..5)).unwrap();
            let err = src.open("in.jsonl", Some(offset), &ctx()).err().unwrap();
            assert!(err.to_string().contains("was truncated"), "{err}");
            // The original file again: the restore reads on from line 20.
            std::fs::write(&p, lines(0..50)).unwrap();
            let mut r = src.open("in.jsonl", Some(offset), &ctx()).unwrap();
            assert_eq!(read_all(&mut r, 7).unwrap(), (20..50).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_following_source_reads_appended_lines_once_across_restores() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, lines(0..3) + "{\"n\":3").unwrap();
        let src = JsonLinesSource::<R>::new(&p).follow();
        let mut r = src.open("in.jsonl", None, &ctx()).unwrap();
        let mut out = Vec::new();
        assert_eq!(r.poll_batch(&mut out, 10).unwrap(), SourcePoll::Ready);
        // The half-written line is not read until its newline is there.
        assert_eq!(r.poll_batch(&mut out, 10).unwrap(), SourcePoll::Idle);
        assert_eq!(out.iter().map(|r| r.n).collect::<Vec<_>>(), vec![0, 1, 2]);
        let at_three = r.offset();
        assert_eq!(at_three.lines_read, 3);
        append(&p, "}\n");
        append(&p, &lines(4..6));
        assert_eq!(read_all(&mut r, 10).unwrap(), vec![3, 4, 5]);
        // Appended while the job was down: read once after the restore.
        append(&p, &lines(6..8));
        let mut r = src.open("in.jsonl", Some(at_three), &ctx()).unwrap();
        assert_eq!(read_all(&mut r, 2).unwrap(), (3..8).collect::<Vec<_>>());
        // Truncated under a running follower: an error, not silently skipped lines.
        std::fs::write(&p, lines(0..1)).unwrap();
        let err = r.poll_batch(&mut Vec::new(), 10).unwrap_err();
        assert!(
            err.to_string().contains("truncated while it was read"),
            "{err}"
        );
    }

    #[test]
    fn offsets_of_checkpoints_before_file_identities_do_not_decode() {
        #[derive(Serialize)]
        struct Before {
            byte: u64,
            lines_read: u64,
        }
        // A split's checkpointed state: split name, offset, done, highest timestamp.
        for (byte, done, max_ts) in [
            (0, false, i64::MIN),
            (123_456, true, 1_700_000_000_000),
            (7, false, 1000),
            (70, true, 0),
        ] {
            let old = postcard::to_stdvec(&(
                "in.jsonl",
                Before {
                    byte,
                    lines_read: 9,
                },
                done,
                max_ts,
            ))
            .unwrap();
            let new = postcard::from_bytes::<(String, JsonLinesOffset, bool, i64)>(&old);
            assert!(new.is_err(), "{new:?}");
        }
    }

    #[test]
    fn a_file_that_was_empty_at_start_is_still_told_from_a_rotated_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, "").unwrap();
        let src = JsonLinesSource::<R>::new(&p).follow();
        let mut r = src.open("in.jsonl", None, &ctx()).unwrap();
        assert_eq!(read_all(&mut r, 10).unwrap(), Vec::<u32>::new());
        append(&p, &lines(0..3));
        assert_eq!(read_all(&mut r, 10).unwrap(), vec![0, 1, 2]);
        let offset = r.offset();
        assert_eq!(offset.file.head_len as usize, lines(0..3).len());
        std::fs::write(&p, lines(100..200)).unwrap();
        let err = src.open("in.jsonl", Some(offset), &ctx()).err().unwrap();
        assert!(err.to_string().contains("was replaced"), "{err}");
        // The same file, grown: read on.
        std::fs::write(&p, lines(0..5)).unwrap();
        let mut r = src.open("in.jsonl", Some(offset), &ctx()).unwrap();
        assert_eq!(read_all(&mut r, 10).unwrap(), vec![3, 4]);
    }

    #[test]
    fn a_followed_file_rewritten_in_place_is_an_error_that_stops_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, lines(0..2)).unwrap();
        let src = JsonLinesSource::<R>::new(&p).follow();
        let mut r = src.open("in.jsonl", None, &ctx()).unwrap();
        assert_eq!(read_all(&mut r, 10).unwrap(), vec![0, 1]);
        // Same file (the reader's handle sees it), other first bytes, longer.
        std::fs::write(&p, lines(50..60)).unwrap();
        let err = r.poll_batch(&mut Vec::new(), 10).unwrap_err();
        assert!(err.to_string().contains("rewritten in place"), "{err}");
        assert_eq!(err.class(), exactly_engine::error::ErrorClass::Stop);
    }

    #[test]
    fn malformed_line_fails_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, "{\"n\":1}\n\n{\"n\":oops}\n{\"n\":3}\n").unwrap();
        let mut r = JsonLinesSource::<R>::new(&p)
            .open("in.jsonl", None, &ctx())
            .unwrap();
        let err = read_all(&mut r, 10).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("in.jsonl:3"), "{msg}");
        assert_eq!(err.class(), exactly_engine::error::ErrorClass::Stop);
    }

    #[test]
    fn dead_letters_are_written_once_even_when_reread() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, "{\"n\":1}\nbad one\n{\"n\":2}\nbad two\n{\"n\":3}\n").unwrap();
        let dl = dir.path().join("dl");
        let src =
            JsonLinesSource::<R>::new(&p).on_bad_record(BadRecordPolicy::DeadLetter(dl.clone()));
        let mut r = src.open("in.jsonl", None, &ctx()).unwrap();
        assert_eq!(read_all(&mut r, 10).unwrap(), vec![1, 2, 3]);
        // A restore from the start re-reads both bad lines.
        let mut r = src.open("in.jsonl", None, &ctx()).unwrap();
        assert_eq!(read_all(&mut r, 1).unwrap(), vec![1, 2, 3]);
        let written = std::fs::read_to_string(dl.join("src-in.jsonl.deadletter.jsonl")).unwrap();
        let entries: Vec<DeadLetter> = written
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[0].line, entries[0].raw.as_str()), (2, "bad one"));
        assert_eq!((entries[1].line, entries[1].raw.as_str()), (4, "bad two"));
    }

    #[test]
    fn directory_splits_and_missing_input() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.jsonl"), "{\"n\":2}\n").unwrap();
        std::fs::write(dir.path().join("a.jsonl"), "{\"n\":1}\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let src = JsonLinesSource::<R>::new(dir.path());
        assert_eq!(src.splits().unwrap(), vec!["a.jsonl", "b.jsonl"]);
        let err = JsonLinesSource::<R>::new(dir.path().join("nope.jsonl"))
            .splits()
            .unwrap_err();
        assert!(err.to_string().contains("nope.jsonl"), "{err}");
        // Restarting cannot make it appear: the job stops at once.
        assert_eq!(
            err.class(),
            exactly_engine::error::ErrorClass::Stop,
            "{err}"
        );
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn invalid_utf8_is_a_bad_record_not_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, b"{\"n\":1}\n{\"n\":\"\xff\xfe\"}\n{\"n\":3}\n").unwrap();
        let mut r = JsonLinesSource::<R>::new(&p)
            .open("in.jsonl", None, &ctx())
            .unwrap();
        let err = read_all(&mut r, 10).unwrap_err();
        assert!(matches!(err, Error::BadRecord { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("invalid UTF-8"), "{err}");
        assert_eq!(err.class(), exactly_engine::error::ErrorClass::Stop);
        // Under DeadLetter it is set aside, and the rest is read.
        let dl = dir.path().join("dl");
        let src =
            JsonLinesSource::<R>::new(&p).on_bad_record(BadRecordPolicy::DeadLetter(dl.clone()));
        let mut r = src.open("in.jsonl", None, &ctx()).unwrap();
        assert_eq!(read_all(&mut r, 10).unwrap(), vec![1, 3]);
        let written = std::fs::read_to_string(dl.join("src-in.jsonl.deadletter.jsonl")).unwrap();
        let entry: DeadLetter = serde_json::from_str(written.trim()).unwrap();
        assert_eq!(entry.line, 2);
        assert!(entry.error.contains("invalid UTF-8"), "{}", entry.error);
    }
}
