//! Encoding of state files and state values.
//!
//! Values and keys use postcard (a compact serde format with a stable, documented wire
//! format). A state file is framed so that a truncated or altered file is detected before
//! anything in it is trusted:
//!
//! ```text
//! magic "EXST" | format version u16 LE | payload length u64 LE | crc32 u32 LE | payload
//! ```

use crate::error::{Error, Result};
use serde::{de::DeserializeOwned, Serialize};

const MAGIC: &[u8; 4] = b"EXST";
/// Version of the state file layout; bumped on any incompatible change.
pub const STATE_FORMAT_VERSION: u16 = 2;
const HEADER_LEN: usize = 4 + 2 + 8 + 4;

/// Encode `value` with postcard, appending to `buf` (which is not cleared).
pub fn encode_into<T: Serialize + ?Sized>(value: &T, buf: &mut Vec<u8>, what: &str) -> Result<()> {
    postcard::serialize_with_flavor(value, Append(buf)).map_err(|e| Error::Codec {
        what: what.to_string(),
        message: e.to_string(),
    })
}

/// The key group of `key`: the hash of its postcard encoding, written into `buf`
/// (cleared first; a scratch buffer kept by the caller, so nothing is allocated).
#[inline]
pub fn key_group_of<K: Serialize + ?Sized>(
    key: &K,
    buf: &mut Vec<u8>,
    max_parallelism: u16,
    what: &str,
) -> Result<crate::ids::KeyGroup> {
    buf.clear();
    encode_into(key, buf, what)?;
    Ok(crate::ids::key_group_of_bytes(buf, max_parallelism))
}

/// Postcard output appended to a vector, byte strings copied in one go. (postcard's own
/// `to_extend` pushes them byte by byte: a quarter of the snapshot encoder's time for
/// string keys.)
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    #[inline(always)]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    #[inline(always)]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        if data.len() <= 16 {
            // Varints and short strings: a copy loop the compiler unrolls beats a call.
            self.0.extend(data.iter().copied());
        } else {
            self.0.extend_from_slice(data);
        }
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Encode `value` with postcard into a new vector.
pub fn encode<T: Serialize + ?Sized>(value: &T, what: &str) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    encode_into(value, &mut v, what)?;
    Ok(v)
}

/// Decode a postcard value.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::Codec {
        what: what.to_string(),
        message: e.to_string(),
    })
}

/// Decode a `T` from the start of `bytes`: the value and the bytes after it (for a key
/// made of several encoded values), or `None` if they do not start with one.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Option<(T, &[u8])> {
    postcard::take_from_bytes(bytes).ok()
}

/// Wrap a payload into a framed state file.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header(payload.len(), crc32fast::hash(payload)));
    out.extend_from_slice(payload);
    out
}

fn header(payload_len: usize, payload_crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
    h[6..14].copy_from_slice(&(payload_len as u64).to_le_bytes());
    h[14..18].copy_from_slice(&payload_crc.to_le_bytes());
    h
}

/// A framed state file in pieces, written one after the other (large encoded buffers
/// go to storage as they are, without being copied into one).
#[derive(Debug)]
pub struct FileChunks {
    /// The header first, then the payload.
    pub chunks: Vec<bytes::Bytes>,
    /// Bytes of the whole file.
    pub len: u64,
    /// CRC-32 of the whole file.
    pub crc32: u32,
}

/// Frame a payload given in pieces: exactly the file [`frame`] writes for their
/// concatenation.
pub fn frame_chunks(payload: Vec<bytes::Bytes>) -> FileChunks {
    let mut payload_crc = crc32fast::Hasher::new();
    let mut n = 0;
    for c in &payload {
        payload_crc.update(c);
        n += c.len();
    }
    let head = header(n, payload_crc.clone().finalize());
    let mut file_crc = crc32fast::Hasher::new();
    file_crc.update(&head);
    file_crc.combine(&payload_crc);
    let mut chunks = Vec::with_capacity(payload.len() + 1);
    chunks.push(bytes::Bytes::copy_from_slice(&head));
    chunks.extend(payload);
    FileChunks {
        chunks,
        len: (HEADER_LEN + n) as u64,
        crc32: file_crc.finalize(),
    }
}

/// Why a framed file did not verify.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than the header or than the length it declares.
    Truncated {
        /// Bytes expected.
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// Not a state file.
    BadMagic,
    /// Written by an incompatible version.
    UnsupportedVersion(u16),
    /// Content altered.
    ChecksumMismatch {
        /// Checksum in the header.
        expected: u32,
        /// Checksum of the content.
        actual: u32,
    },
    /// Longer than the length it declares.
    TrailingBytes(u64),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated { expected, found } => {
                write!(f, "truncated: expected {expected} bytes, found {found}")
            }
            FrameError::BadMagic => f.write_str("not an exactly state file (bad magic)"),
            FrameError::UnsupportedVersion(v) => write!(
                f,
                "state format version {v} is not supported (this build reads {STATE_FORMAT_VERSION})"
            ),
            FrameError::ChecksumMismatch { expected, actual } => write!(
                f,
                "checksum mismatch: header says {expected:08x}, content is {actual:08x}"
            ),
            FrameError::TrailingBytes(n) => write!(f, "{n} unexpected trailing bytes"),
        }
    }
}

/// Verify a framed file and return its payload.
pub fn unframe(file: &[u8]) -> std::result::Result<&[u8], FrameError> {
    if file.len() < HEADER_LEN {
        return Err(FrameError::Truncated {
            expected: HEADER_LEN as u64,
            found: file.len() as u64,
        });
    }
    if &file[0..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let version = u16::from_le_bytes([file[4], file[5]]);
    if version != STATE_FORMAT_VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&file[6..14]);
    let len = u64::from_le_bytes(len);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&file[14..18]);
    let expected = u32::from_le_bytes(crc);
    let body = &file[HEADER_LEN..];
    if (body.len() as u64) < len {
        return Err(FrameError::Truncated {
            expected: HEADER_LEN as u64 + len,
            found: file.len() as u64,
        });
    }
    if body.len() as u64 > len {
        return Err(FrameError::TrailingBytes(body.len() as u64 - len));
    }
    let actual = crc32fast::hash(body);
    if actual != expected {
        return Err(FrameError::ChecksumMismatch { expected, actual });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_into_appends_postcards_bytes(
            before in proptest::collection::vec(any::<u8>(), 0..8),
            value in any::<(u64, String, Vec<u8>, i32)>(),
        ) {
            let mut buf = before.clone();
            encode_into(&value, &mut buf, "test").unwrap();
            let mut expected = before;
            expected.extend(postcard::to_allocvec(&value).unwrap());
            prop_assert_eq!(buf, expected);
        }

        #[test]
        fn frame_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let f = frame(&payload);
            prop_assert_eq!(unframe(&f).unwrap(), &payload[..]);
        }

        #[test]
        fn any_single_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..512), bit in any::<usize>()) {
            let mut f = frame(&payload);
            let bit = bit % (f.len() * 8);
            f[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(unframe(&f).is_err());
        }

        #[test]
        fn any_truncation_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..512), cut in any::<usize>()) {
            let f = frame(&payload);
            let cut = cut % f.len();
            prop_assert!(unframe(&f[..cut]).is_err());
        }

        #[test]
        fn postcard_values_round_trip(v in proptest::collection::vec((any::<u64>(), ".*", any::<i64>()), 0..32)) {
            let bytes = encode(&v, "test").unwrap();
            let back: Vec<(u64, String, i64)> = decode(&bytes, "test").unwrap();
            prop_assert_eq!(back, v);
        }
    }

    #[test]
    fn wrong_version_is_named() {
        let mut f = frame(b"abc");
        f[4] = 9;
        assert_eq!(unframe(&f), Err(FrameError::UnsupportedVersion(9)));
    }
}
