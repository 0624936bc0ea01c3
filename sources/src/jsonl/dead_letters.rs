//! The dead-letter file of one split: bad lines set aside, each written once even when a
//! restore re-reads it.

use exactly_engine::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub(super) struct DeadLetters {
    path: PathBuf,
    file: File,
    /// Entries at or below this byte offset are already in the file.
    written_through: Option<u64>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct DeadLetter {
    pub(super) file: String,
    pub(super) line: u64,
    pub(super) byte_offset: u64,
    pub(super) error: String,
    pub(super) raw: String,
}

impl DeadLetters {
    pub(super) fn open(dir: &Path, source: &str, split: &str) -> Result<DeadLetters> {
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

    pub(super) fn write(&mut self, entry: &DeadLetter) -> Result<()> {
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
