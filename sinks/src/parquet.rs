//! Parquet part files (feature `parquet`), for the file and object-store sinks.
//!
//! Records become rows: each field of a record struct is a column, with the Arrow type
//! serde_arrow derives from the record type (integers, floats, strings, `Option` as a
//! nullable column, nested structs, sequences as lists, unit-only enums as
//! dictionary-encoded strings).
//! Every part file is a complete Parquet file: the sink closes it (writes the footer)
//! at the checkpoint barrier, before its bytes are staged, so a committed file is
//! readable on its own by any Parquet reader.
//!
//! Memory: records are collected into Arrow arrays [`BATCH_ROWS`] at a time and encoded
//! into the file's current row group; a full row group ([`Parquet::row_group_rows`],
//! default 128 Ki rows, or [`ROW_GROUP_BYTES`] encoded) goes to the sink's output (the
//! next multipart part, or the local file). Compression is Snappy, which every
//! warehouse reads.

use crate::file::RecordEncoder;
use arrow_schema::{DataType, FieldRef, Schema, SchemaRef};
use exactly_engine::error::{Error, Result};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_arrow::schema::{SchemaLike, TracingOptions};
use serde_arrow::ArrayBuilder;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, PoisonError};

/// Records are turned into Arrow arrays this many at a time.
pub const BATCH_ROWS: usize = 8 * 1024;

/// A row group also ends once it holds about this many encoded bytes, so wide records
/// do not make a row group of [`Parquet::row_group_rows`] rows large in memory.
pub const ROW_GROUP_BYTES: usize = 64 << 20;

/// Parquet part files of records of type `T`.
///
/// ```
/// use exactly_sinks::{FileSink, Parquet};
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct Balance { account: String, cents: i64, updates: u32 }
/// let sink = FileSink::with_encoder("out/", Parquet::<Balance>::for_type().unwrap());
/// ```
pub struct Parquet<T> {
    fields: Vec<FieldRef>,
    schema: SchemaRef,
    row_group_rows: usize,
    /// The file being written by this writer's copy (a sink's own copy never has one).
    /// Only reached through `&mut self`, so the lock is never contended.
    file: Mutex<Option<OpenFile>>,
    _t: PhantomData<fn(&T)>,
}

struct OpenFile {
    rows: ArrayBuilder,
    pending: usize,
    writer: ArrowWriter<Vec<u8>>,
}

fn codec(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Codec {
        what: what.to_string(),
        message: e.to_string(),
    }
}

impl<T> Clone for Parquet<T> {
    /// The same format, without the open file.
    fn clone(&self) -> Self {
        Parquet {
            fields: self.fields.clone(),
            schema: self.schema.clone(),
            row_group_rows: self.row_group_rows,
            file: Mutex::new(None),
            _t: PhantomData,
        }
    }
}

impl<T: Serialize + DeserializeOwned> Parquet<T> {
    /// Columns derived from the record type `T`, which must serialise as a struct.
    /// A type serde_arrow cannot map (a bare number, say) is a configuration error
    /// naming the type, and so is a field that is an enum with data (serde_arrow makes
    /// it an Arrow union, which Parquet cannot store).
    pub fn for_type() -> Result<Self> {
        let options = TracingOptions::default()
            .enums_without_data_as_strings(true)
            .strings_as_large_utf8(false)
            .sequence_as_large_list(false);
        let fields = Vec::<FieldRef>::from_type::<T>(options).map_err(|e| {
            Error::config(format!(
                "no Parquet schema for {}: {e}",
                std::any::type_name::<T>()
            ))
        })?;
        Self::with_fields(fields)
    }
}

impl<T: Serialize> Parquet<T> {
    /// Columns as given (names and Arrow types of the record's fields, in order), for
    /// types whose derived schema is not what the warehouse expects.
    pub fn with_fields(fields: Vec<FieldRef>) -> Result<Self> {
        let schema = Arc::new(Schema::new(fields.clone()));
        // The Parquet writer panics on a union column; refuse it here instead.
        if let Some(path) = fields
            .iter()
            .find_map(|f| union_column(f.name(), f.data_type()))
        {
            return Err(Error::config(format!(
                "Parquet schema {schema}: column '{path}' is an enum with data (an Arrow \
                 union), which Parquet cannot store; flatten it into fields or make it a string"
            )));
        }
        // Both the record-to-Arrow mapping and the Arrow-to-Parquet mapping must accept
        // the schema: check now, not at the first record.
        ArrayBuilder::from_arrow(&fields)
            .map_err(|e| Error::config(format!("Parquet schema {schema}: {e}")))?;
        ArrowWriter::try_new(Vec::new(), schema.clone(), None)
            .map_err(|e| Error::config(format!("Parquet schema {schema}: {e}")))?;
        Ok(Parquet {
            fields,
            schema,
            row_group_rows: 128 * 1024,
            file: Mutex::new(None),
            _t: PhantomData,
        })
    }

    /// Rows per row group (default 131,072; a row group also ends at
    /// [`ROW_GROUP_BYTES`]). A row group is held in memory, encoded and compressed,
    /// until it is full.
    pub fn row_group_rows(mut self, n: usize) -> Self {
        self.row_group_rows = n.max(1);
        self
    }

    /// The columns written.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn open(&mut self) -> Result<&mut OpenFile> {
        let file = self.file.get_mut().unwrap_or_else(PoisonError::into_inner);
        if file.is_none() {
            let props = WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .set_max_row_group_row_count(Some(self.row_group_rows))
                .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
                .build();
            *file = Some(OpenFile {
                rows: ArrayBuilder::from_arrow(&self.fields)
                    .map_err(|e| codec("Parquet columns", e))?,
                pending: 0,
                writer: ArrowWriter::try_new(Vec::new(), self.schema.clone(), Some(props))
                    .map_err(|e| codec("Parquet file", e))?,
            });
        }
        Ok(file.as_mut().expect("opened above"))
    }
}

/// The path of the first union column within `name: data_type`, if any.
fn union_column(name: &str, data_type: &DataType) -> Option<String> {
    let child = |f: &FieldRef| union_column(&format!("{name}.{}", f.name()), f.data_type());
    match data_type {
        DataType::Union(..) => Some(name.to_string()),
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _) => child(f),
        DataType::Struct(fs) => fs.iter().find_map(child),
        DataType::Dictionary(_, values) => union_column(name, values),
        DataType::RunEndEncoded(_, values) => child(values),
        _ => None,
    }
}

impl OpenFile {
    /// Encode the collected records into the row group and move the bytes the writer
    /// produced so far (complete row groups) to `out`.
    fn flush_rows(&mut self, out: &mut Vec<u8>) -> Result<()> {
        if self.pending > 0 {
            let batch = self
                .rows
                .to_record_batch()
                .map_err(|e| codec("Parquet rows", e))?;
            self.writer
                .write(&batch)
                .map_err(|e| codec("Parquet rows", e))?;
            self.pending = 0;
        }
        // Taking written bytes out of the buffer under the writer does not disturb
        // its offsets: it counts bytes itself.
        out.append(self.writer.inner_mut());
        Ok(())
    }
}

impl<T: Serialize + 'static> RecordEncoder<T> for Parquet<T> {
    fn encode(&mut self, record: &T, out: &mut Vec<u8>) -> Result<()> {
        let file = self.open()?;
        file.rows
            .push(record)
            .map_err(|e| codec("Parquet row", e))?;
        file.pending += 1;
        if file.pending >= BATCH_ROWS {
            file.flush_rows(out)?;
        }
        Ok(())
    }

    fn finish_file(&mut self, out: &mut Vec<u8>) -> Result<()> {
        let file = self.file.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(mut f) = file.take() {
            f.flush_rows(out)?;
            f.writer.finish().map_err(|e| codec("Parquet footer", e))?;
            out.append(f.writer.inner_mut());
        }
        Ok(())
    }

    fn extension(&self) -> &str {
        "parquet"
    }
}

/// Every record of a Parquet file (a committed part file, say: a `std::fs::File` or
/// the bytes of an object), deserialised into `R`: to check output against its input
/// without a warehouse. Returns the records and the file's number of row groups.
pub fn read_records<R: DeserializeOwned>(
    file: impl parquet::file::reader::ChunkReader + 'static,
) -> Result<(Vec<R>, usize)> {
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| codec("Parquet file", e))?;
    let groups = builder.metadata().num_row_groups();
    let mut records = Vec::new();
    for batch in builder.build().map_err(|e| codec("Parquet file", e))? {
        let batch = batch.map_err(|e| codec("Parquet rows", e))?;
        records.extend(
            serde_arrow::from_record_batch::<Vec<R>>(&batch)
                .map_err(|e| codec("Parquet rows", e))?,
        );
    }
    Ok((records, groups))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Kind {
        Payment,
        Refund,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Row {
        id: u64,
        account: String,
        cents: i64,
        note: Option<String>,
        kind: Kind,
        tags: Vec<u16>,
    }

    fn row(i: u64) -> Row {
        Row {
            id: i,
            account: format!("acct-{:05}", i % 977),
            cents: (i as i64 * 7919) % 100_000 - 50_000,
            note: i.is_multiple_of(3).then(|| format!("note {i}")),
            kind: if i.is_multiple_of(5) {
                Kind::Refund
            } else {
                Kind::Payment
            },
            tags: (0..(i % 4) as u16).collect(),
        }
    }

    /// `words` × 16 hex digits of xorshift output: text Snappy cannot shrink much.
    pub(crate) fn random_hex(state: &mut u64, words: usize) -> String {
        (0..words)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                format!("{:016x}", *state)
            })
            .collect()
    }

    /// Every row of a Parquet file, and its number of row groups.
    pub(crate) fn read<R: DeserializeOwned>(bytes: Vec<u8>) -> (Vec<R>, usize) {
        read_records(Bytes::from(bytes)).unwrap()
    }

    #[test]
    fn rows_round_trip_row_groups_stream_out_and_files_are_independent() {
        let mut p = Parquet::<Row>::for_type().unwrap().row_group_rows(10_000);
        let mut out = Vec::new();
        let n = 45_000;
        for i in 0..n {
            p.encode(&row(i), &mut out).unwrap();
        }
        // Full row groups left the encoder before the file was finished.
        assert!(
            !out.is_empty(),
            "no row group was written out before finish"
        );
        p.finish_file(&mut out).unwrap();
        let (rows, groups) = read::<Row>(std::mem::take(&mut out));
        assert_eq!(groups, 5, "45,000 rows in row groups of 10,000");
        assert_eq!(rows, (0..n).map(row).collect::<Vec<_>>());

        // The next file starts from scratch.
        for i in n..n + 10 {
            p.encode(&row(i), &mut out).unwrap();
        }
        p.finish_file(&mut out).unwrap();
        let (rows, _) = read::<Row>(out);
        assert_eq!(rows, (n..n + 10).map(row).collect::<Vec<_>>());

        // Finishing without an open file writes nothing.
        let mut none = Vec::new();
        p.finish_file(&mut none).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn wide_rows_end_a_row_group_at_its_byte_limit() {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        struct Wide {
            blob: String,
        }
        let mut p = Parquet::<Wide>::for_type().unwrap().row_group_rows(1 << 20);
        let mut out = Vec::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        // 20,000 rows of 4 KiB random hex: ~80 MB, one row group by the row limit.
        for _ in 0..20_000 {
            let blob = random_hex(&mut x, 256);
            p.encode(&Wide { blob }, &mut out).unwrap();
        }
        p.finish_file(&mut out).unwrap();
        let (rows, groups) = read::<Wide>(out);
        assert_eq!(rows.len(), 20_000);
        assert!(groups >= 2, "{groups} row group(s) for ~80 MB");
    }

    #[test]
    fn columns_follow_the_record_type() {
        let p = Parquet::<Row>::for_type().unwrap();
        let cols: Vec<String> = p
            .schema()
            .fields()
            .iter()
            .map(|f| format!("{}:{}:{}", f.name(), f.data_type(), f.is_nullable()))
            .collect();
        assert_eq!(
            cols,
            [
                "id:UInt64:false",
                "account:Utf8:false",
                "cents:Int64:false",
                "note:Utf8:true",
                "kind:Dictionary(UInt32, Utf8):false",
                "tags:List(non-null UInt16, field: 'element'):false",
            ]
        );
    }

    #[test]
    fn a_type_without_columns_is_a_clear_error() {
        let err = Parquet::<u64>::for_type()
            .err()
            .expect("a bare u64 has no columns");
        let msg = err.to_string();
        assert!(msg.contains("no Parquet schema for u64"), "{msg}");
    }

    #[test]
    fn an_enum_with_data_is_refused_at_construction() {
        // serde_arrow maps it to an Arrow union, which Parquet cannot store.
        #[derive(Clone, Serialize, Deserialize)]
        enum Outcome {
            Matched { cents: i64 },
            Missing(String),
        }
        #[derive(Clone, Serialize, Deserialize)]
        struct Settled {
            trip: u64,
            outcome: Outcome,
        }
        let err = Parquet::<Settled>::for_type()
            .err()
            .expect("a union column has no Parquet type");
        let msg = err.to_string();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert!(
            msg.contains("column 'outcome' is an enum with data"),
            "{msg}"
        );
    }
}
