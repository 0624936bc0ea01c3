//! Exactly-once part files in a local directory.
//!
//! # Protocol
//!
//! 1. Records of one subtask go to
//!    `<dir>/.staging/<sink>/inprogress-g<generation>-<subtask>-<pid>-<n>` as they arrive
//!    (buffered); the generation is the job instance's lease on its checkpoint storage.
//! 2. At barrier `c` (pre-commit) the file is flushed, fsynced and renamed to
//!    `<dir>/.staging/<sink>/staged-g<generation>-<c>-<subtask>.<ext>`; that name is the
//!    committable.
//! 3. After the manifest of checkpoint `c` is written, commit renames the staged file to
//!    `<dir>/part-<sink>-<c>-<subtask>.<ext>` and fsyncs the directory. Readers only ever see
//!    complete part files.
//!
//! # Invariants
//!
//! * A part file exists only for a completed checkpoint; its content is exactly the
//!   records between two barriers of one subtask.
//! * Commit is idempotent: a committable whose staged file is gone and whose part file
//!   exists counts as committed. Both missing is data loss and an error.
//!
//! # Failure and recovery
//!
//! `recover` commits the committables of the restored checkpoint, then deletes every
//! file left in the sink's staging directory (in-progress files and files staged for
//! checkpoints that never completed), reporting the highest checkpoint id among them.
//! It first checks that none of those files was written by a newer instance of the job
//! (a higher generation): if one was, this instance is fenced and stops with
//! [`Error::Fenced`] before deleting anything. Files of older generations belong to
//! fenced instances and are aborted. (Staged names without a generation, written before
//! generations existed, count as generation 0.)

use exactly_engine::api::{Data, RecoveryContext, SinkContext, SinkWriter, TwoPhaseCommitSink};
use exactly_engine::error::{Error, Result};
use exactly_engine::ids::{CheckpointId, OperatorId};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Turns records into the bytes of a part file.
///
/// Each sink writer encodes with its own clone, so an encoder may keep per-file state
/// (a columnar format buffers rows and writes a footer). Line formats write each record
/// at once and need no [`finish_file`](RecordEncoder::finish_file).
pub trait RecordEncoder<T>: Clone + Send + Sync + 'static {
    /// Append the encoding of `record` to `out` (possibly later, for buffered formats).
    fn encode(&mut self, record: &T, out: &mut Vec<u8>) -> Result<()>;
    /// Append whatever completes the current file (buffered rows, a footer); the next
    /// `encode` starts a new file. Called when a part file is closed: at every barrier
    /// and when an object-store part file rolls over.
    fn finish_file(&mut self, out: &mut Vec<u8>) -> Result<()> {
        let _ = out;
        Ok(())
    }
    /// File extension of part files.
    fn extension(&self) -> &str;
}

/// Comma-separated values, one record per line, without a header row (part files of
/// one sink concatenate into one table). Structs become their fields in order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Csv;

/// The bytes a reused CSV writer produced, shared with the encoder that drains them.
#[derive(Default, Clone)]
struct CsvBytes(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

impl Write for CsvBytes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn csv_writer() -> (csv::Writer<CsvBytes>, CsvBytes) {
    let bytes = CsvBytes::default();
    let w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(bytes.clone());
    (w, bytes)
}

thread_local! {
    /// One CSV writer per thread, reused for every record (building one per record
    /// allocated its buffer each time).
    static CSV: std::cell::RefCell<(csv::Writer<CsvBytes>, CsvBytes)> =
        std::cell::RefCell::new(csv_writer());
}

impl<T: Serialize> RecordEncoder<T> for Csv {
    fn encode(&mut self, record: &T, out: &mut Vec<u8>) -> Result<()> {
        CSV.with(|cell| {
            let mut cell = cell.borrow_mut();
            let (w, bytes) = &mut *cell;
            let r = w
                .serialize(record)
                .and_then(|()| w.flush().map_err(Into::into));
            match r {
                Ok(()) => {
                    let mut b = bytes.0.borrow_mut();
                    out.extend_from_slice(&b);
                    b.clear();
                    Ok(())
                }
                Err(e) => {
                    // A record that failed half-way must not leak into the next one.
                    *cell = csv_writer();
                    Err(Error::Codec {
                        what: "CSV record".into(),
                        message: e.to_string(),
                    })
                }
            }
        })
    }
    fn extension(&self) -> &str {
        "csv"
    }
}

/// One JSON document per line.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<T: Serialize> RecordEncoder<T> for JsonLines {
    fn encode(&mut self, record: &T, out: &mut Vec<u8>) -> Result<()> {
        serde_json::to_writer(&mut *out, record).map_err(|e| Error::Codec {
            what: "JSON line".into(),
            message: e.to_string(),
        })?;
        out.push(b'\n');
        Ok(())
    }
    fn extension(&self) -> &str {
        "jsonl"
    }
}

/// An encoder from a closure, e.g. for CSV.
#[derive(Clone)]
pub struct FnEncoder<F> {
    f: F,
    ext: &'static str,
}

impl<F> FnEncoder<F> {
    /// Encode with `f`; part files get extension `ext`.
    pub fn new(ext: &'static str, f: F) -> Self {
        FnEncoder { f, ext }
    }
}

impl<T, F: Fn(&T, &mut Vec<u8>) + Clone + Send + Sync + 'static> RecordEncoder<T> for FnEncoder<F> {
    fn encode(&mut self, record: &T, out: &mut Vec<u8>) -> Result<()> {
        (self.f)(record, out);
        Ok(())
    }
    fn extension(&self) -> &str {
        self.ext
    }
}

/// Writes part files that appear only when their checkpoint completes.
///
/// ```
/// use exactly_sinks::FileSink;
/// let sink = FileSink::<(u64, i64), _>::exactly_once("out/");
/// ```
pub struct FileSink<T, E> {
    dir: PathBuf,
    encoder: E,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T: Serialize> FileSink<T, JsonLines> {
    /// JSON-lines part files in `dir`.
    pub fn exactly_once(dir: impl Into<PathBuf>) -> Self {
        FileSink {
            dir: dir.into(),
            encoder: JsonLines,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T, E: RecordEncoder<T>> FileSink<T, E> {
    /// Part files in `dir`, encoded by `encoder`.
    pub fn with_encoder(dir: impl Into<PathBuf>, encoder: E) -> Self {
        FileSink {
            dir: dir.into(),
            encoder,
            _t: std::marker::PhantomData,
        }
    }

    fn staging(&self, sink: &OperatorId) -> PathBuf {
        self.dir.join(".staging").join(&sink.0)
    }

    /// The staged file and the part file of a committable, both checked to lie inside
    /// this sink's directory: the committable comes from the manifest, and a path
    /// edited there (`../../victim`) must not make the job rename files elsewhere.
    fn paths(&self, c: &FileCommittable) -> Result<(PathBuf, PathBuf)> {
        use std::path::Component;
        let plain = |rel: &str, parts: usize| {
            let comps: Vec<Component<'_>> = Path::new(rel).components().collect();
            comps.len() == parts
                && !rel.contains('\\')
                && comps.iter().enumerate().all(|(i, comp)| match comp {
                    Component::Normal(n) => {
                        let n = n.to_string_lossy();
                        // Only the first part of a staged path is hidden (`.staging`).
                        (i == 0 && parts == 3 && n == ".staging") || !n.starts_with('.')
                    }
                    _ => false,
                })
        };
        if !plain(&c.staged, 3) || !c.staged.starts_with(".staging/") || !plain(&c.part, 1) {
            return Err(Error::CorruptCheckpoint {
                checkpoint: CheckpointId(c.checkpoint),
                path: format!(
                    "manifest (a committable of the file sink in {})",
                    self.dir.display()
                ),
                message: format!(
                    "its paths (staged '{}', part '{}') do not stay inside the sink's directory; \
                     refusing to rename anything",
                    c.staged.escape_debug(),
                    c.part.escape_debug()
                ),
            });
        }
        Ok((self.dir.join(&c.staged), self.dir.join(&c.part)))
    }
}

impl<T, E> FileSink<T, E> {
    /// Part files are committed only after their checkpoint's manifest is written, so a
    /// part file of a checkpoint newer than the restored one means the checkpoint
    /// storage lost manifests (deleted, moved aside, replaced by an empty directory)
    /// while the output kept what they committed. Restoring would produce those records
    /// again, so it is an error that explains this, and nothing is touched.
    fn check_nothing_committed_after(&self, ctx: &RecoveryContext) -> Result<()> {
        let restored = ctx.restored.map_or(0, |c| c.0);
        let prefix = format!("part-{}-", ctx.sink.0);
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("listing {}", self.dir.display()), e)),
        };
        let mut newer: Option<(u64, String)> = None;
        for entry in entries {
            let entry = entry.map_err(io(format!("listing {}", self.dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix(&prefix).and_then(part_checkpoint);
            if let Some(id) = id.filter(|&id| id > restored) {
                if newer.as_ref().is_none_or(|(n, _)| id > *n) {
                    newer = Some((id, name));
                }
            }
        }
        let Some((id, name)) = newer else {
            return Ok(());
        };
        Err(Error::output_ahead_of_checkpoints(
            &ctx.sink.0,
            &format!("{} holds {name}", self.dir.display()),
            id,
            ctx.restored,
        ))
    }
}

/// The checkpoint id of a part file's name after `part-<sink>-`: exactly
/// `<12 digits>-<4 digits>.<ext>`, so a sink `out` does not take the files of a sink
/// `out-2` (`part-out-2-000000000009-0000.jsonl`) for its own.
fn part_checkpoint(rest: &str) -> Option<u64> {
    let b = rest.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let fixed =
        digits(0..12) && b.get(12) == Some(&b'-') && digits(13..17) && b.get(17) == Some(&b'.');
    fixed.then(|| rest[..12].parse().ok()).flatten()
}

/// The generation and (for staged files) the checkpoint id in a staging file's name:
/// `staged-g<gen>-<c>-<subtask>.<ext>`, `inprogress-g<gen>-...`; names from before
/// generations (`staged-<c>-...`, `inprogress-<subtask>-...`) are generation 0.
fn staged_name_parts(name: &str) -> (u64, Option<u64>) {
    let (rest, staged) = match name.strip_prefix("staged-") {
        Some(r) => (r, true),
        None => (name.strip_prefix("inprogress-").unwrap_or(""), false),
    };
    let (generation, rest) = match rest
        .strip_prefix('g')
        .and_then(|r| r.split_once('-'))
        .and_then(|(g, r)| Some((g.parse::<u64>().ok()?, r)))
    {
        Some((g, r)) => (g, r),
        None => (0, rest),
    };
    let checkpoint = staged
        .then(|| rest.split('-').next().and_then(|c| c.parse::<u64>().ok()))
        .flatten();
    (generation, checkpoint)
}

/// `dir` made absolute and normalised (`.` and `..` resolved by name, symlinks not
/// followed), so `out`, `./out` and `/abs/out` compare equal as sink locations.
fn normalised(dir: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut out = PathBuf::new();
    for comp in abs.components() {
        match comp {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// A staged part file: where it is and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCommittable {
    /// Staged file, relative to the sink directory.
    pub staged: String,
    /// Final part file, relative to the sink directory.
    pub part: String,
    /// Checkpoint id.
    pub checkpoint: u64,
}

/// Writer of one [`FileSink`] subtask.
pub struct FileWriter<T, E> {
    /// The sink's name: part files carry it, so sinks sharing a directory by mistake
    /// could not overwrite each other's files (the job refuses that anyway).
    sink: String,
    /// This instance's fencing generation, in every staged name.
    generation: u64,
    staging: PathBuf,
    staging_rel: String,
    subtask: usize,
    encoder: E,
    ext: String,
    out: Option<(PathBuf, BufWriter<File>)>,
    buf: Vec<u8>,
    _t: std::marker::PhantomData<fn(T)>,
}

static INPROGRESS_SEQ: AtomicU64 = AtomicU64::new(0);

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(context, e)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing directory {}", dir.display())))
}

impl<T: Data, E: RecordEncoder<T>> TwoPhaseCommitSink for FileSink<T, E> {
    type Item = T;
    type Committable = FileCommittable;
    type Writer = FileWriter<T, E>;

    fn open_writer(&self, ctx: &SinkContext) -> Result<Self::Writer> {
        let staging = self.staging(&ctx.sink);
        std::fs::create_dir_all(&staging).map_err(io(format!("creating {}", staging.display())))?;
        Ok(FileWriter {
            sink: ctx.sink.0.clone(),
            generation: ctx.generation,
            staging,
            staging_rel: format!(".staging/{}", ctx.sink.0),
            subtask: ctx.subtask.0,
            encoder: self.encoder.clone(),
            ext: self.encoder.extension().to_string(),
            out: None,
            buf: Vec::with_capacity(64 * 1024),
            _t: std::marker::PhantomData,
        })
    }

    fn location(&self) -> Option<String> {
        Some(normalised(&self.dir).display().to_string())
    }

    fn commit(&self, c: &FileCommittable) -> Result<()> {
        let (staged, part) = self.paths(c)?;
        match std::fs::rename(&staged, &part) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if part.exists() {
                    Ok(())
                } else {
                    Err(Error::CommitLost {
                        sink: OperatorId(self.dir.display().to_string()),
                        checkpoint: CheckpointId(c.checkpoint),
                        message: format!(
                            "neither staged file {} nor part file {} exists",
                            staged.display(),
                            part.display()
                        ),
                    })
                }
            }
            Err(e) => Err(Error::io(
                format!("publishing {} as {}", staged.display(), part.display()),
                e,
            )),
        }
    }

    fn recover(
        &self,
        ctx: &RecoveryContext,
        pending: Vec<FileCommittable>,
    ) -> Result<Option<CheckpointId>> {
        std::fs::create_dir_all(&self.dir).map_err(io(format!(
            "creating sink directory {}",
            self.dir.display()
        )))?;
        for c in &pending {
            self.commit(c)?;
        }
        self.check_nothing_committed_after(ctx)?;
        let staging = self.staging(&ctx.sink);
        let mut max_seen: Option<CheckpointId> = None;
        let entries = match std::fs::read_dir(&staging) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("listing {}", staging.display()), e)),
        };
        let mut lingering = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(format!("listing {}", staging.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let (generation, checkpoint) = staged_name_parts(&name);
            if generation > ctx.generation {
                // A newer instance staged it: this one is fenced and touches nothing.
                return Err(Error::Fenced {
                    epoch: ctx.generation,
                    newer: generation,
                    url: staging.display().to_string(),
                });
            }
            if let Some(id) = checkpoint {
                max_seen = max_seen.max(Some(CheckpointId(id)));
            }
            lingering.push(entry.path());
        }
        let removed = lingering.len();
        for path in lingering {
            std::fs::remove_file(&path)
                .map_err(io(format!("removing lingering {}", path.display())))?;
        }
        if removed > 0 {
            tracing::info!(sink = %ctx.sink, removed, "aborted output staged after the restored checkpoint");
            sync_dir(&staging)?;
        }
        Ok(max_seen)
    }
}

impl<T, E: RecordEncoder<T>> FileWriter<T, E> {
    fn open_file(&mut self) -> Result<&mut BufWriter<File>> {
        if self.out.is_none() {
            let n = INPROGRESS_SEQ.fetch_add(1, Ordering::Relaxed);
            let path = self.staging.join(format!(
                "inprogress-g{}-{}-{}-{n}",
                self.generation,
                self.subtask,
                std::process::id()
            ));
            let f = File::create(&path).map_err(io(format!("creating {}", path.display())))?;
            self.out = Some((path, BufWriter::with_capacity(256 * 1024, f)));
        }
        match &mut self.out {
            Some((_, w)) => Ok(w),
            None => unreachable!("opened above"),
        }
    }
}

impl<T: Data, E: RecordEncoder<T>> SinkWriter for FileWriter<T, E> {
    type Item = T;
    type Committable = FileCommittable;

    fn write(&mut self, batch: &mut Vec<T>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.buf.clear();
        for r in batch.drain(..) {
            self.encoder.encode(&r, &mut self.buf)?;
        }
        let buf = std::mem::take(&mut self.buf);
        let res = self
            .open_file()
            .and_then(|w| w.write_all(&buf).map_err(io("writing part file".into())));
        self.buf = buf;
        res
    }

    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<Option<FileCommittable>> {
        let Some((path, mut w)) = self.out.take() else {
            return Ok(None);
        };
        self.buf.clear();
        self.encoder.finish_file(&mut self.buf)?;
        w.write_all(&self.buf)
            .map_err(io(format!("writing {}", path.display())))?;
        let f = w
            .into_inner()
            .map_err(|e| Error::io(format!("flushing {}", path.display()), e.into_error()))?;
        f.sync_all()
            .map_err(io(format!("syncing {}", path.display())))?;
        let staged_name = format!(
            "staged-g{}-{:012}-{:04}.{}",
            self.generation, checkpoint.0, self.subtask, self.ext
        );
        let staged = self.staging.join(&staged_name);
        std::fs::rename(&path, &staged).map_err(io(format!("staging {}", path.display())))?;
        sync_dir(&self.staging)?;
        let part = format!(
            "part-{}-{:012}-{:04}.{}",
            self.sink, checkpoint.0, self.subtask, self.ext
        );
        Ok(Some(FileCommittable {
            staged: format!("{}/{staged_name}", self.staging_rel),
            part,
            checkpoint: checkpoint.0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_records_are_independent_even_after_a_failed_one() {
        let mut out = Vec::new();
        RecordEncoder::encode(&mut Csv, &(1u32, "a"), &mut out).unwrap();
        // A nested map cannot be a CSV row: it fails and leaves nothing behind.
        let bad: std::collections::BTreeMap<u8, Vec<(u8, u8)>> = [(1, vec![(2, 3)])].into();
        assert!(RecordEncoder::encode(&mut Csv, &(9u32, bad), &mut out).is_err());
        out.truncate(4);
        RecordEncoder::encode(&mut Csv, &(2u32, "b,c"), &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "1,a\n2,\"b,c\"\n");
    }
    use exactly_engine::ids::SubtaskIndex;

    fn ctx(sink: &str, subtask: usize) -> SinkContext {
        SinkContext {
            job: "j".into(),
            sink: OperatorId(sink.into()),
            subtask: SubtaskIndex(subtask),
            parallelism: 2,
            checkpoint_interval: None,
            generation: 1,
            io: exactly_engine::testing::io_runtime(),
        }
    }

    fn rctx(sink: &str, restored: Option<u64>) -> RecoveryContext {
        RecoveryContext {
            job: "j".into(),
            sink: OperatorId(sink.into()),
            restored: restored.map(CheckpointId),
            generation: 1,
            storage_id: "test-location".to_string(),
            io: exactly_engine::testing::io_runtime(),
        }
    }

    fn parts(dir: &Path) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read_to_string(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn output_is_invisible_until_commit_and_commit_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::<u32, _>::exactly_once(dir.path());
        let mut w = sink.open_writer(&ctx("s", 1)).unwrap();
        w.write(&mut vec![1, 2]).unwrap();
        w.write(&mut vec![3]).unwrap();
        let c = w.pre_commit(CheckpointId(7)).unwrap().unwrap();
        assert!(
            parts(dir.path()).is_empty(),
            "nothing visible before commit"
        );
        assert_eq!(
            w.pre_commit(CheckpointId(8)).unwrap(),
            None,
            "empty epoch stages nothing"
        );
        sink.commit(&c).unwrap();
        sink.commit(&c).unwrap();
        assert_eq!(
            parts(dir.path()),
            vec![(
                "part-s-000000000007-0001.jsonl".to_string(),
                "1\n2\n3\n".to_string()
            )]
        );
    }

    #[test]
    fn recovery_commits_restored_output_and_removes_later_staged_files() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::<u32, _>::exactly_once(dir.path());
        let mut w0 = sink.open_writer(&ctx("s", 0)).unwrap();
        let mut w1 = sink.open_writer(&ctx("s", 1)).unwrap();
        w0.write(&mut vec![1]).unwrap();
        w1.write(&mut vec![2]).unwrap();
        let c0 = w0.pre_commit(CheckpointId(3)).unwrap().unwrap();
        let c1 = w1.pre_commit(CheckpointId(3)).unwrap().unwrap();
        // Crash after the manifest of 3, after subtask 0 was committed but not subtask 1;
        // subtask 0 had also staged output for checkpoint 4 and had a file in progress.
        sink.commit(&c0).unwrap();
        w0.write(&mut vec![10]).unwrap();
        w0.pre_commit(CheckpointId(4)).unwrap().unwrap();
        w0.write(&mut vec![11]).unwrap();
        drop((w0, w1));
        let max = sink.recover(&rctx("s", Some(3)), vec![c0, c1]).unwrap();
        assert_eq!(max, Some(CheckpointId(4)));
        assert_eq!(
            parts(dir.path()),
            vec![
                (
                    "part-s-000000000003-0000.jsonl".to_string(),
                    "1\n".to_string()
                ),
                (
                    "part-s-000000000003-0001.jsonl".to_string(),
                    "2\n".to_string()
                ),
            ]
        );
        assert!(parts(&dir.path().join(".staging/s")).is_empty());
    }

    #[test]
    fn recovery_never_touches_what_a_newer_instance_staged() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::<u32, _>::exactly_once(dir.path());
        // Generation 2 (a newer instance) staged checkpoint 5 and has a file in progress.
        let newer = SinkContext {
            generation: 2,
            io: exactly_engine::testing::io_runtime(),
            ..ctx("s", 0)
        };
        let mut w = sink.open_writer(&newer).unwrap();
        w.write(&mut vec![1]).unwrap();
        w.pre_commit(CheckpointId(5)).unwrap().unwrap();
        w.write(&mut vec![2]).unwrap();
        let staging = dir.path().join(".staging/s");
        let before = parts(&staging);
        assert_eq!(before.len(), 2, "{before:?}");
        // The older instance (generation 1) recovers: it is fenced and deletes nothing.
        let err = sink.recover(&rctx("s", Some(4)), Vec::new()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Fenced {
                    epoch: 1,
                    newer: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(parts(&staging), before);
        // An even newer one (generation 3) aborts them, and learns of checkpoint 5.
        let newest = RecoveryContext {
            generation: 3,
            storage_id: "test-location".to_string(),
            io: exactly_engine::testing::io_runtime(),
            ..rctx("s", Some(4))
        };
        assert_eq!(
            sink.recover(&newest, Vec::new()).unwrap(),
            Some(CheckpointId(5))
        );
        assert!(parts(&staging).is_empty());
    }

    #[test]
    fn part_names_give_their_checkpoint_only_for_this_sink() {
        assert_eq!(part_checkpoint("000000000009-0000.jsonl"), Some(9));
        // `part-out-2-000000000009-0000.jsonl` after `part-out-`: sink `out-2`'s file.
        assert_eq!(part_checkpoint("2-000000000009-0000.jsonl"), None);
        assert_eq!(part_checkpoint("000000000009-0000"), None);
        assert_eq!(part_checkpoint("00000000009-0000.jsonl"), None);
    }

    #[test]
    fn staging_names_give_generation_and_checkpoint() {
        assert_eq!(
            staged_name_parts("staged-g7-000000000012-0003.jsonl"),
            (7, Some(12))
        );
        assert_eq!(staged_name_parts("inprogress-g7-3-991-4"), (7, None));
        // Before generations: generation 0, so any instance may abort them.
        assert_eq!(
            staged_name_parts("staged-000000000012-0003.jsonl"),
            (0, Some(12))
        );
        assert_eq!(staged_name_parts("inprogress-3-991-4"), (0, None));
    }

    #[test]
    fn committing_vanished_output_is_data_loss() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::<u32, _>::exactly_once(dir.path());
        let c = FileCommittable {
            staged: ".staging/s/staged-g1-000000000001-0000.jsonl".into(),
            part: "part-s-000000000001-0000.jsonl".into(),
            checkpoint: 1,
        };
        let err = sink.commit(&c).unwrap_err();
        assert!(matches!(err, Error::CommitLost { .. }), "{err}");
    }

    #[test]
    fn committables_leading_outside_the_directory_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        std::fs::create_dir_all(dir.join(".staging/s")).unwrap();
        let victim = root.path().join("victim.txt");
        std::fs::write(&victim, "keep me").unwrap();
        std::fs::write(dir.join(".staging/s/staged-1"), "x").unwrap();
        let sink = FileSink::<u32, _>::exactly_once(&dir);
        let c = |staged: &str, part: &str| FileCommittable {
            staged: staged.into(),
            part: part.into(),
            checkpoint: 1,
        };
        for bad in [
            c("../victim.txt", "part-s-1.jsonl"),
            c(".staging/s/../../../victim.txt", "part-s-1.jsonl"),
            c("/etc/passwd", "part-s-1.jsonl"),
            c(".staging/s/staged-1", "../stolen.jsonl"),
            c(".staging/s/staged-1", "sub/part-s-1.jsonl"),
            c(".staging/s/staged-1", ".hidden"),
            c(".staging/../staged-1", "part-s-1.jsonl"),
        ] {
            let err = sink.commit(&bad).unwrap_err();
            assert!(
                matches!(err, Error::CorruptCheckpoint { .. }),
                "{bad:?}: {err}"
            );
            assert!(
                err.to_string().contains("inside the sink's directory"),
                "{err}"
            );
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        assert!(dir.join(".staging/s/staged-1").exists());
        assert!(!root.path().join("stolen.jsonl").exists());
        // The same files under plain names commit.
        sink.commit(&c(".staging/s/staged-1", "part-s-1.jsonl"))
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("part-s-1.jsonl")).unwrap(),
            "x"
        );
    }

    #[test]
    fn location_is_the_normalised_absolute_directory() {
        let a = FileSink::<u32, _>::exactly_once("out");
        let b = FileSink::<u32, _>::exactly_once("./x/../out/");
        let here = std::env::current_dir().unwrap();
        assert_eq!(a.location(), Some(here.join("out").display().to_string()));
        assert_eq!(a.location(), b.location());
        assert_ne!(
            a.location(),
            FileSink::<u32, _>::exactly_once("out2").location()
        );
    }

    #[test]
    fn csv_through_a_closure() {
        let dir = tempfile::tempdir().unwrap();
        let enc = FnEncoder::new("csv", |r: &(u32, i64), out: &mut Vec<u8>| {
            out.extend_from_slice(format!("{},{}\n", r.0, r.1).as_bytes())
        });
        let sink = FileSink::with_encoder(dir.path(), enc);
        let mut w = sink.open_writer(&ctx("s", 0)).unwrap();
        w.write(&mut vec![(1, -5)]).unwrap();
        let c = w.pre_commit(CheckpointId(1)).unwrap().unwrap();
        sink.commit(&c).unwrap();
        assert_eq!(parts(dir.path())[0].1, "1,-5\n");
    }

    #[cfg(feature = "parquet")]
    #[test]
    fn parquet_part_files_are_complete_per_checkpoint() {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        struct Row {
            id: u32,
            name: String,
        }
        let dir = tempfile::tempdir().unwrap();
        let format = crate::Parquet::<Row>::for_type().unwrap();
        let sink = FileSink::with_encoder(dir.path(), format);
        let mut w = sink.open_writer(&ctx("s", 0)).unwrap();
        let rows = |r: std::ops::Range<u32>| -> Vec<Row> {
            r.map(|id| Row {
                id,
                name: format!("n{id}"),
            })
            .collect()
        };
        w.write(&mut rows(0..20_000)).unwrap();
        let c1 = w.pre_commit(CheckpointId(1)).unwrap().unwrap();
        w.write(&mut rows(20_000..20_003)).unwrap();
        let c2 = w.pre_commit(CheckpointId(2)).unwrap().unwrap();
        sink.commit(&c1).unwrap();
        sink.commit(&c2).unwrap();
        let read = |name: &str| {
            crate::parquet::tests::read::<Row>(std::fs::read(dir.path().join(name)).unwrap()).0
        };
        assert_eq!(read("part-s-000000000001-0000.parquet"), rows(0..20_000));
        assert_eq!(
            read("part-s-000000000002-0000.parquet"),
            rows(20_000..20_003)
        );
    }
}
