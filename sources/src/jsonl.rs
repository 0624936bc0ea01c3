//! JSON-lines files: one JSON document per line; each file is a split.
//!
//! # Bad records
//!
//! What happens to a line that does not parse is the job's explicit choice
//! ([`BadRecordPolicy`]): stop with an error naming file and line, or append the line to
//! a dead-letter file and go on. Dead-letter entries carry the byte offset of the line,
//! and a reader only appends entries beyond the highest offset already in the file, so
//! re-reading after a restore never writes an entry twice.

use exactly_engine::api::{Source, SourceContext, SourcePoll, SourceReader};
use exactly_engine::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// What to do with a line that is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadRecordPolicy {
    /// Stop the job with an error naming the file and line (the default).
    Fail,
    /// Append the line to a dead-letter file in this directory and continue.
    DeadLetter(PathBuf),
}

/// Position in one file: the byte offset and 1-based number of the next line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonLinesOffset {
    /// Byte offset of the next line.
    pub byte: u64,
    /// Number of lines before it.
    pub lines_read: u64,
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
    _t: PhantomData<fn() -> T>,
}

impl<T> JsonLinesSource<T> {
    /// Read `path`: a file, or a directory of `*.jsonl` files.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        JsonLinesSource {
            path: path.into(),
            policy: BadRecordPolicy::Fail,
            _t: PhantomData,
        }
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
    reader: BufReader<File>,
    offset: JsonLinesOffset,
    /// The current line's bytes: read as bytes, so invalid UTF-8 is a bad record (of
    /// its file and line) rather than an I/O error.
    line: Vec<u8>,
    dead_letters: Option<DeadLetters>,
    _t: PhantomData<fn() -> T>,
}

struct DeadLetters {
    path: PathBuf,
    file: File,
    /// Entries at or below this byte offset are already in the file.
    written_through: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct DeadLetter {
    file: String,
    line: u64,
    byte_offset: u64,
    error: String,
    raw: String,
}

impl DeadLetters {
    fn open(dir: &Path, source: &str, split: &str) -> Result<DeadLetters> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::io(
                format!("creating dead-letter directory {}", dir.display()),
                e,
            )
        })?;
        let safe: String = split
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("{source}-{safe}.deadletter.jsonl"));
        let mut existing = String::new();
        if let Ok(mut f) = File::open(&path) {
            f.read_to_string(&mut existing).map_err(|e| {
                Error::io(format!("reading dead-letter file {}", path.display()), e)
            })?;
        }
        // A crash can leave a torn last entry: drop it, it is written again on re-read.
        let complete = existing.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let mut written_through = None;
        for l in existing[..complete].lines() {
            if let Ok(d) = serde_json::from_str::<DeadLetter>(l) {
                written_through = written_through.max(Some(d.byte_offset));
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening dead-letter file {}", path.display()), e))?;
        file.set_len(complete as u64)
            .map_err(|e| Error::io(format!("truncating dead-letter file {}", path.display()), e))?;
        Ok(DeadLetters {
            path,
            file,
            written_through,
        })
    }

    fn write(&mut self, entry: &DeadLetter) -> Result<()> {
        if self.written_through.is_some_and(|w| entry.byte_offset <= w) {
            return Ok(());
        }
        let mut line = serde_json::to_vec(entry).map_err(|e| Error::Codec {
            what: "dead-letter entry".into(),
            message: e.to_string(),
        })?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| {
                Error::io(
                    format!("writing dead-letter file {}", self.path.display()),
                    e,
                )
            })?;
        self.written_through = Some(entry.byte_offset);
        Ok(())
    }
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

impl<T: DeserializeOwned + Clone + Send + 'static> Source for JsonLinesSource<T> {
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

    fn open(
        &self,
        split: &str,
        from: Option<JsonLinesOffset>,
        ctx: &SourceContext,
    ) -> Result<JsonLinesReader<T>> {
        let path = self.split_path(split);
        let mut file = File::open(&path).map_err(|e| missing_or_io(&path, e))?;
        let offset = from.unwrap_or(JsonLinesOffset {
            byte: 0,
            lines_read: 0,
        });
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
            .len();
        if offset.byte > len {
            return Err(Error::config(format!(
                "{}: restored offset {} is beyond the end of the file ({len} bytes); the input was truncated or replaced",
                path.display(),
                offset.byte
            )));
        }
        file.seek(SeekFrom::Start(offset.byte))
            .map_err(|e| Error::io(format!("seeking {}", path.display()), e))?;
        let dead_letters = match &self.policy {
            BadRecordPolicy::Fail => None,
            BadRecordPolicy::DeadLetter(dir) => {
                Some(DeadLetters::open(dir, &ctx.operator.0, split)?)
            }
        };
        Ok(JsonLinesReader {
            path,
            reader: BufReader::with_capacity(256 * 1024, file),
            offset,
            line: Vec::new(),
            dead_letters,
            _t: PhantomData,
        })
    }
}

impl<T: DeserializeOwned + 'static> SourceReader for JsonLinesReader<T> {
    type Item = T;
    type Offset = JsonLinesOffset;

    fn poll_batch(&mut self, out: &mut Vec<T>, max: usize) -> Result<SourcePoll> {
        let before = out.len();
        while out.len() - before < max {
            self.line.clear();
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
            if n == 0 {
                break;
            }
            let line_start = self.offset.byte;
            self.offset.byte += n as u64;
            self.offset.lines_read += 1;
            // The same UTF-8 check `read_line` made, but a failure is the line's.
            let parsed = match std::str::from_utf8(&self.line) {
                Ok(text) => {
                    let text = text.trim_end_matches(['\n', '\r']);
                    if text.trim().is_empty() {
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
        }
        Ok(if out.len() > before {
            SourcePoll::Ready
        } else {
            SourcePoll::End
        })
    }

    fn offset(&self) -> JsonLinesOffset {
        self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_engine::ids::{OperatorId, SubtaskIndex};

    #[derive(Debug, Clone, PartialEq, Deserialize)]
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
