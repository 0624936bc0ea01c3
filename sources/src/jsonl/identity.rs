//! Which file an offset belongs to, and what a restored offset finds in the file now.
//!
//! A byte offset means something only in the file it was taken in. Input files change
//! under a job: a log rotation puts another file at the same path, a copy-truncate
//! empties it, a writer appends to it. Resuming at a restored offset in a different file
//! skips or misreads records with no error at all, so each offset carries the
//! [`FileIdentity`] of its file, and [`check_restored`] decides, from facts read from
//! the file now, whether the offset still applies.
//!
//! # Invariants
//!
//! 1. A restored offset is used only if the file still starts with the bytes it started
//!    with when the job first read it (a CRC-32 of up to its first 4 KiB) and is at
//!    least as long as the offset: otherwise the job stops with an error naming the
//!    file and what changed.
//! 2. A bounded source reads the file as it was when the job first opened it: up to
//!    the length recorded then, in the first run and in every restored one, so a
//!    restore reads exactly what a failure-free run reads. Lines appended later are
//!    not read (a warning says so); a following source reads them.

use super::JsonLinesOffset;
use exactly_engine::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of a file's start identifies it.
const HEAD_BYTES: u64 = 4096;

/// The identity of the file an offset was taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// How many bytes at the start of the file `head_crc` covers: 4 KiB, or the whole
    /// file if it was shorter when the job first opened it.
    pub head_len: u32,
    /// CRC-32 of those bytes.
    pub head_crc: u32,
    /// Where a bounded source stops: the file's length when the job first opened it.
    /// `None` for a following source, which reads whatever is appended.
    pub end: Option<u64>,
}

impl FileIdentity {
    /// The identity of `file` as it is now (`len` bytes long).
    pub(super) fn of(file: &mut File, len: u64, follow: bool) -> std::io::Result<FileIdentity> {
        let head_len = len.min(HEAD_BYTES);
        Ok(FileIdentity {
            head_len: head_len as u32,
            head_crc: head_crc(file, head_len)?.unwrap_or(0),
            end: (!follow).then_some(len),
        })
    }
}

/// Check, through the reader's own handle (never the path, which may name another file
/// by now), that the file still starts with the bytes the identity covers, and cover
/// more of them once the file has grown to them: a file that was empty or short when
/// first opened (a fresh log being followed) would otherwise be identified by too few
/// bytes to tell a rotated one from it. `readable` is how far the reader reads. `Err`
/// with `InvalidData` if the covered bytes changed or are gone.
pub(super) fn refresh(file: &File, id: &mut FileIdentity, readable: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let covered = u64::from(id.head_len);
    if readable < covered {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "it is shorter than the start this job read from it (truncated)",
        ));
    }
    let mut head = vec![0; readable.min(HEAD_BYTES).max(covered) as usize];
    file.read_exact_at(&mut head, 0)?;
    if crc32fast::hash(&head[..covered as usize]) != id.head_crc {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "its first bytes changed under the reader (rewritten in place)",
        ));
    }
    id.head_len = head.len() as u32;
    id.head_crc = crc32fast::hash(&head);
    Ok(())
}

/// CRC-32 of the first `n` bytes of `file`, `None` if it is shorter. Leaves the file
/// positioned anywhere: the caller seeks.
pub(super) fn head_crc(file: &mut File, n: u64) -> std::io::Result<Option<u32>> {
    file.seek(SeekFrom::Start(0))?;
    let mut head = Vec::with_capacity(n as usize);
    file.take(n).read_to_end(&mut head)?;
    Ok((head.len() as u64 == n).then(|| crc32fast::hash(&head)))
}

/// What a restored offset finds in the file now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileNow {
    /// Its length.
    pub len: u64,
    /// CRC-32 of its first `head_len` bytes (of the restored identity), `None` if it is
    /// shorter than that.
    pub head_crc: Option<u32>,
}

/// Decide whether `restored` still applies to the file at `path`, and where a bounded
/// source stops (`follow`: it does not). Pure: the caller reads [`FileNow`].
pub(super) fn check_restored(
    path: &Path,
    restored: &JsonLinesOffset,
    now: FileNow,
    follow: bool,
) -> Result<Option<u64>> {
    let what_to_do = "Put the file that was read back in place, or start over with new \
                      checkpoint storage and a new output location";
    let id = &restored.file;
    let Some(head_crc) = now.head_crc else {
        return Err(Error::config(format!(
            "JSON-lines source: {} was truncated or replaced since the checkpoint: it has {} \
             bytes, fewer than the {} it started with when this job read it. {what_to_do}",
            path.display(),
            now.len,
            id.head_len,
        )));
    };
    if head_crc != id.head_crc {
        return Err(Error::config(format!(
            "JSON-lines source: {} was replaced since the checkpoint: its first {} bytes are not \
             the ones this job read (a rotated or rewritten input file). Resuming at byte {} \
             (line {}) of another file would skip or misread records. {what_to_do}",
            path.display(),
            id.head_len,
            restored.byte,
            restored.lines_read + 1,
        )));
    }
    if now.len < restored.byte {
        return Err(Error::config(format!(
            "JSON-lines source: {} was truncated since the checkpoint: it has {} bytes, and the \
             checkpoint resumes at byte {} (line {}). {what_to_do}",
            path.display(),
            now.len,
            restored.byte,
            restored.lines_read + 1,
        )));
    }
    if follow {
        return Ok(None);
    }
    match id.end {
        Some(end) if now.len < end => Err(Error::config(format!(
            "JSON-lines source: {} was truncated since the job started: it had {end} bytes, \
             now {}; lines the first run would have read are gone. {what_to_do}",
            path.display(),
            now.len,
        ))),
        Some(end) => Ok(Some(end)),
        // Restored from a following run: read what is there now.
        None => Ok(Some(now.len)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offset(byte: u64, head_crc: u32, end: Option<u64>) -> JsonLinesOffset {
        JsonLinesOffset {
            byte,
            lines_read: 3,
            file: FileIdentity {
                head_len: 100,
                head_crc,
                end,
            },
        }
    }

    fn now(len: u64, head_crc: Option<u32>) -> FileNow {
        FileNow { len, head_crc }
    }

    #[test]
    fn the_same_file_resumes_and_a_bounded_source_keeps_its_end() {
        let p = Path::new("in.jsonl");
        let o = offset(150, 7, Some(300));
        assert_eq!(
            check_restored(p, &o, now(300, Some(7)), false).unwrap(),
            Some(300)
        );
        // Grown since: still the first run's end.
        assert_eq!(
            check_restored(p, &o, now(900, Some(7)), false).unwrap(),
            Some(300)
        );
        // A following source reads on.
        assert_eq!(
            check_restored(p, &o, now(900, Some(7)), true).unwrap(),
            None
        );
        // A bounded restore of a following run's offset reads what is there now.
        let followed = offset(150, 7, None);
        assert_eq!(
            check_restored(p, &followed, now(900, Some(7)), false).unwrap(),
            Some(900)
        );
    }

    #[test]
    fn a_replaced_or_truncated_file_is_refused_naming_the_file() {
        let p = Path::new("in.jsonl");
        let o = offset(150, 7, Some(300));
        for (file_now, follow, says) in [
            (now(5000, Some(8)), false, "was replaced"),
            (now(50, None), false, "was truncated or replaced"),
            (
                now(120, Some(7)),
                false,
                "was truncated since the checkpoint",
            ),
            (
                now(120, Some(7)),
                true,
                "was truncated since the checkpoint",
            ),
            (
                now(200, Some(7)),
                false,
                "was truncated since the job started",
            ),
        ] {
            let err = check_restored(p, &o, file_now, follow).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("in.jsonl") && msg.contains(says), "{msg}");
            assert_eq!(
                err.class(),
                exactly_engine::error::ErrorClass::Stop,
                "{msg}"
            );
        }
    }
}
