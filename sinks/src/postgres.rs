//! Exactly-once into PostgreSQL, in one of two modes.
//!
//! # Two-phase commit ([`PostgresSink::two_phase`])
//!
//! Each sink subtask writes the rows of one checkpoint interval into one open
//! transaction. At the barrier the transaction is prepared (`PREPARE TRANSACTION`) under
//! the global id `exactly:<job>:<sink>:<checkpoint>:<subtask>:g<generation>` (the
//! generation is the job instance's lease on its checkpoint storage): its rows are durable but
//! invisible. After the checkpoint's manifest is written, `COMMIT PREPARED` makes them
//! visible; an id that no longer exists counts as committed (SQLSTATE 42704), so a
//! repeated commit is harmless. On recovery the restored checkpoint's ids are committed
//! and every other prepared transaction of this job and sink (listed in
//! `pg_prepared_xacts`) is rolled back, unless one has a newer generation: then a newer
//! instance runs on the same checkpoint location, and this one stops with
//! `Error::Fenced` before touching anything. Needs `max_prepared_transactions > 0`, checked
//! when the job starts. Commits are cheap; the server holds one prepared transaction
//! per subtask between barrier and commit.
//!
//! # Idempotent commit ([`PostgresSink::idempotent`])
//!
//! Without prepared transactions: records are staged (postcard-encoded) in the table
//! `exactly_sink_staging` under a random token per subtask and interval, committed at
//! the barrier. The committable is `(checkpoint, subtask, token)`. Committing runs one
//! ordinary transaction that inserts the marker row `(job, sink, subtask, checkpoint)`
//! into `exactly_sink_commits` (primary key), applies the staged records with the
//! user's statement and deletes them; if the marker is already there the transaction
//! does nothing. On recovery, restored committables are committed the same way and
//! other staged rows of this job and sink are deleted; staged rows carry the
//! instance's generation, and rows of a newer generation fence this instance instead. Staging lives in the database, so its
//! size is bounded by the database, not by the checkpoint; the commit does the real
//! writes, so it takes longer than a two-phase commit.
//!
//! # Mapping records to SQL
//!
//! [`Sql::insert`] writes multi-row `INSERT`s (one round trip per batch; an
//! `ON CONFLICT` clause makes it an upsert); [`Sql::statement`] runs any statement with
//! `$1..$n` once per record. A record maps to a tuple of parameters (`PgRow`).
//!
//! Connection loss: a writer error restarts the job from its last checkpoint (the open
//! transaction is rolled back by the server). Commit and recovery reconnect once when
//! their connection turns out to be dropped; a commit that still fails stays pending
//! and is retried after the next checkpoint and on recovery.

use exactly_engine::api::{Data, RecoveryContext, SinkContext, SinkWriter, TwoPhaseCommitSink};
use exactly_engine::error::{Error, Result};
use exactly_engine::ids::{CheckpointId, OperatorId};
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::marker::PhantomData;

/// The PostgreSQL client the sink uses (the `postgres` crate, a blocking wrapper over
/// `tokio-postgres`), for setting up tables and reading results.
pub use postgres as client;
use std::sync::{Arc, Mutex};

/// PostgreSQL accepts at most this many parameters per statement.
const MAX_PARAMS: usize = 65_535;
/// Records per round trip.
const BATCH_ROWS: usize = 1_000;

/// The parameters one record binds, in column order: a tuple of `ToSql` values.
pub trait PgRow: Send + 'static {
    /// Parameters per record.
    const WIDTH: usize;
    /// Append references to the parameters.
    fn params<'a>(&'a self, out: &mut Vec<&'a (dyn ToSql + Sync)>);
}

macro_rules! pg_row {
    ($n:expr; $($t:ident $i:tt),+) => {
        impl<$($t: ToSql + Sync + Send + 'static),+> PgRow for ($($t,)+) {
            const WIDTH: usize = $n;
            fn params<'a>(&'a self, out: &mut Vec<&'a (dyn ToSql + Sync)>) {
                $(out.push(&self.$i);)+
            }
        }
    };
}
pg_row!(1; A 0);
pg_row!(2; A 0, B 1);
pg_row!(3; A 0, B 1, C 2);
pg_row!(4; A 0, B 1, C 2, D 3);
pg_row!(5; A 0, B 1, C 2, D 3, E 4);
pg_row!(6; A 0, B 1, C 2, D 3, E 4, F 5);
pg_row!(7; A 0, B 1, C 2, D 3, E 4, F 5, G 6);
pg_row!(8; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
pg_row!(9; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
pg_row!(10; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);

/// How records become SQL.
#[derive(Debug, Clone)]
pub enum Sql {
    /// Multi-row `INSERT INTO table (columns) VALUES ... [ON CONFLICT ...]`.
    Insert {
        /// Target table.
        table: String,
        /// Columns, in the order of the record's parameters.
        columns: Vec<String>,
        /// An `ON CONFLICT` clause without the keywords, e.g.
        /// `(id) DO UPDATE SET amount = EXCLUDED.amount`.
        on_conflict: Option<String>,
    },
    /// Any statement with parameters `$1..$n`, run once per record.
    Statement(String),
}

impl Sql {
    /// Insert into `table`; the record's parameters fill `columns` in order.
    pub fn insert(table: &str, columns: &[&str]) -> Self {
        Sql::Insert {
            table: table.to_string(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            on_conflict: None,
        }
    }

    /// Make an insert an upsert: `clause` follows `ON CONFLICT`.
    pub fn on_conflict(self, clause: &str) -> Self {
        match self {
            Sql::Insert { table, columns, .. } => Sql::Insert {
                table,
                columns,
                on_conflict: Some(clause.to_string()),
            },
            other => other,
        }
    }

    /// Any statement, run once per record with the record's parameters as `$1..$n`.
    pub fn statement(sql: &str) -> Self {
        Sql::Statement(sql.to_string())
    }

    fn validate(&self, width: usize) -> std::result::Result<(), String> {
        match self {
            Sql::Insert { columns, .. } if columns.len() != width => Err(format!(
                "the insert names {} columns but records bind {width} parameters",
                columns.len()
            )),
            Sql::Insert { .. } => Ok(()),
            Sql::Statement(s) if !s.contains(&format!("${width}")) => Err(format!(
                "the statement does not use ${width}, the last of the {width} parameters records bind"
            )),
            Sql::Statement(_) => Ok(()),
        }
    }

    /// Run the statement for `rows` on `client`.
    fn execute<R: PgRow>(
        &self,
        client: &mut impl GenericClient,
        rows: &[R],
    ) -> std::result::Result<(), postgres::Error> {
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * R::WIDTH);
        match self {
            Sql::Insert {
                table,
                columns,
                on_conflict,
            } => {
                for chunk in rows.chunks((MAX_PARAMS / R::WIDTH).max(1)) {
                    let mut sql = format!("INSERT INTO {table} ({}) VALUES ", columns.join(", "));
                    for i in 0..chunk.len() {
                        sql.push_str(if i == 0 { "(" } else { ", (" });
                        for c in 0..R::WIDTH {
                            if c > 0 {
                                sql.push_str(", ");
                            }
                            sql.push('$');
                            sql.push_str(&(i * R::WIDTH + c + 1).to_string());
                        }
                        sql.push(')');
                    }
                    if let Some(clause) = on_conflict {
                        sql.push_str(" ON CONFLICT ");
                        sql.push_str(clause);
                    }
                    params.clear();
                    for r in chunk {
                        r.params(&mut params);
                    }
                    client.execute(sql.as_str(), &params)?;
                }
            }
            Sql::Statement(sql) => {
                let stmt = client.prepare(sql)?;
                for r in rows {
                    params.clear();
                    r.params(&mut params);
                    client.execute(&stmt, &params)?;
                }
            }
        }
        Ok(())
    }
}

/// Which exactly-once protocol a [`PostgresSink`] uses (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PgMode {
    /// `PREPARE TRANSACTION` at the barrier, `COMMIT PREPARED` after the checkpoint.
    TwoPhase,
    /// Stage at the barrier, apply with a marker row in one ordinary transaction.
    Idempotent,
}

/// What a PostgreSQL sink commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PgCommittable {
    /// A prepared transaction.
    Prepared {
        /// Its global id.
        gid: String,
    },
    /// Staged records to apply once.
    Staged {
        /// Job name.
        job: String,
        /// Sink name.
        sink: String,
        /// Subtask that staged them.
        subtask: usize,
        /// Checkpoint whose barrier staged them.
        checkpoint: u64,
        /// Identifies the staged records.
        token: i64,
    },
}

/// An exactly-once PostgreSQL sink; see the module docs.
///
/// ```no_run
/// use exactly_sinks::postgres::{PostgresSink, Sql};
/// let sink = PostgresSink::two_phase(
///     "host=127.0.0.1 user=postgres dbname=ledger",
///     Sql::insert("entries", &["account", "amount_cents"]),
///     |e: &(String, i64)| (e.0.clone(), e.1),
/// );
/// ```
pub struct PostgresSink<T, R, F> {
    config: String,
    sql: Arc<Sql>,
    map: F,
    mode: PgMode,
    batch_rows: usize,
    /// The driver's connection for commits and recovery, opened on first use.
    control: Mutex<Option<Client>>,
    _t: PhantomData<fn(T) -> R>,
}

impl<T, R, F> PostgresSink<T, R, F>
where
    T: Data + Serialize + DeserializeOwned,
    R: PgRow,
    F: Fn(&T) -> R + Clone + Send + Sync + 'static,
{
    /// A sink using two-phase commit. `config` is a libpq-style connection string.
    pub fn two_phase(config: &str, sql: Sql, map: F) -> Self {
        Self::new(config, sql, map, PgMode::TwoPhase)
    }

    /// A sink using idempotent commits with marker rows (no prepared transactions).
    pub fn idempotent(config: &str, sql: Sql, map: F) -> Self {
        Self::new(config, sql, map, PgMode::Idempotent)
    }

    fn new(config: &str, sql: Sql, map: F, mode: PgMode) -> Self {
        PostgresSink {
            config: config.to_string(),
            sql: Arc::new(sql),
            map,
            mode,
            batch_rows: BATCH_ROWS,
            control: Mutex::new(None),
            _t: PhantomData,
        }
    }

    /// Records sent per round trip (default 1,000).
    pub fn batch_rows(mut self, n: usize) -> Self {
        self.batch_rows = n.max(1);
        self
    }

    fn connect(&self, sink: &str) -> Result<Client> {
        Client::connect(&self.config, NoTls).map_err(|e| pg_error(sink, "connect", None, e))
    }

    /// Run `f` on the control connection. If a connection opened earlier turns out to be
    /// dead (the server restarted or dropped it while idle), reconnect and run `f` once
    /// more; any other failure drops the connection so the next call reconnects.
    fn with_control<X>(
        &self,
        sink: &str,
        mut f: impl FnMut(&mut Client) -> std::result::Result<X, SinkFailure>,
    ) -> std::result::Result<X, SinkFailure> {
        let mut guard = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let mut reused = true;
        loop {
            if guard.as_ref().is_none_or(|c| c.is_closed()) {
                *guard = Some(self.connect(sink).map_err(SinkFailure::Engine)?);
                reused = false;
            }
            let client = guard.as_mut().expect("connected above");
            let r = f(client);
            if r.is_ok() {
                return r;
            }
            let lost = match &r {
                Err(SinkFailure::Pg(e)) => {
                    e.is_closed()
                        || e.code().is_some_and(|c| {
                            c == &SqlState::ADMIN_SHUTDOWN || c == &SqlState::CRASH_SHUTDOWN
                        })
                }
                _ => false,
            };
            let stale = reused && (lost || client.is_closed());
            *guard = None;
            if !stale {
                return r;
            }
            tracing::info!(sink, "PostgreSQL connection was lost; reconnecting");
            reused = false;
        }
    }

    fn commit_one(&self, c: &PgCommittable) -> Result<()> {
        match c {
            PgCommittable::Prepared { gid } => {
                let sink = gid_sink(gid);
                let r = self.with_control(&sink, |client| {
                    Ok(client.batch_execute(&format!("COMMIT PREPARED '{gid}'"))?)
                });
                match r {
                    Ok(()) => Ok(()),
                    // No such prepared transaction: committed before (a repeated commit).
                    Err(SinkFailure::Pg(e)) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {
                        Ok(())
                    }
                    Err(e) => Err(e.into_error(&sink, "commit", gid_checkpoint(gid))),
                }
            }
            PgCommittable::Staged {
                job,
                sink,
                subtask,
                checkpoint,
                token,
            } => {
                let sql = self.sql.clone();
                let map = self.map.clone();
                self.with_control(sink, |client| {
                    let mut tx = client.transaction()?;
                    let fresh = tx.execute(
                        "INSERT INTO exactly_sink_commits (job, sink, subtask, checkpoint) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                        &[job, sink, &(*subtask as i32), &(*checkpoint as i64)],
                    )?;
                    if fresh == 0 {
                        // Applied before: the marker and the rows committed together.
                        return Ok(tx.rollback()?);
                    }
                    let staged = tx.query(
                        "SELECT payload FROM exactly_sink_staging WHERE token = $1 ORDER BY seq",
                        &[token],
                    )?;
                    let mut rows = Vec::with_capacity(staged.len());
                    for row in &staged {
                        let bytes: &[u8] = row.get(0);
                        let record: T = exactly_engine::connect::decode(bytes, "staged record")
                            .map_err(SinkFailure::Engine)?;
                        rows.push(map(&record));
                    }
                    sql.execute(&mut tx, &rows)?;
                    tx.execute(
                        "DELETE FROM exactly_sink_staging WHERE token = $1",
                        &[token],
                    )?;
                    Ok(tx.commit()?)
                })
                .map_err(|e| e.into_error(sink, "commit", Some(CheckpointId(*checkpoint))))
            }
        }
    }
}

/// A database error, or an engine error from connecting.
enum SinkFailure {
    Pg(postgres::Error),
    Engine(Error),
}

impl From<postgres::Error> for SinkFailure {
    fn from(e: postgres::Error) -> Self {
        SinkFailure::Pg(e)
    }
}

impl SinkFailure {
    fn into_error(self, sink: &str, step: &'static str, checkpoint: Option<CheckpointId>) -> Error {
        match self {
            SinkFailure::Engine(e) => e,
            SinkFailure::Pg(e) => pg_error(sink, step, checkpoint, e),
        }
    }
}

/// A PostgreSQL error as the engine's. A server error that restarting cannot fix
/// (refused credentials or privileges, a missing database, table or column, a statement
/// the server rejects, a row it cannot store) stops the job at once; anything else (the
/// server unreachable, restarting or dropping the connection) is a sink error the job
/// restarts from. Either way the message carries the server's own words: the client
/// library's says only "db error".
fn pg_error(
    sink: &str,
    step: &'static str,
    checkpoint: Option<CheckpointId>,
    e: postgres::Error,
) -> Error {
    let permanent = e.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        // 28: invalid authorization; 3D: no such database; 42: syntax or access rule
        // violation; 22: data exception. Except what two sessions racing on `CREATE ...
        // IF NOT EXISTS` can get: a duplicate table, object or schema.
        ["28", "3D", "42", "22"]
            .iter()
            .any(|class| code.starts_with(class))
            && !["42P07", "42710", "42P06"].contains(&code)
    });
    if permanent {
        return Error::config(format!(
            "sink '{sink}' ({step}): PostgreSQL refused it, and restarting cannot change \
             that: {}",
            PgError(e)
        ));
    }
    Error::Sink {
        sink: OperatorId(sink.to_string()),
        step,
        checkpoint,
        source: Box::new(PgError(e)),
    }
}

/// A PostgreSQL error whose message includes its cause: the server's severity, SQLSTATE
/// and message, or the I/O error behind a failed connection.
#[derive(Debug)]
struct PgError(postgres::Error);

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_db_error() {
            Some(db) => {
                write!(
                    f,
                    "{} {}: {}",
                    db.severity(),
                    db.code().code(),
                    db.message()
                )?;
                if let Some(detail) = db.detail() {
                    write!(f, " ({detail})")?;
                }
                if let Some(hint) = db.hint() {
                    write!(f, "; hint: {hint}")?;
                }
                Ok(())
            }
            None => {
                write!(f, "{}", self.0)?;
                let mut cause = std::error::Error::source(&self.0);
                while let Some(c) = cause {
                    write!(f, ": {c}")?;
                    cause = c.source();
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

fn gid_prefix(job: &str, sink: &str) -> String {
    format!("exactly:{job}:{sink}:")
}

fn gid_sink(gid: &str) -> String {
    gid.split(':').nth(2).unwrap_or("postgres").to_string()
}

fn gid_checkpoint(gid: &str) -> Option<CheckpointId> {
    gid.split(':').nth(3)?.parse().ok().map(CheckpointId)
}

/// The fencing generation in a transaction id (`...:<checkpoint>:<subtask>:g<generation>`;
/// ids written before generations existed count as generation 0).
fn gid_generation(gid: &str) -> u64 {
    gid.split(':')
        .nth(5)
        .and_then(|g| g.strip_prefix('g'))
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}

impl<T, R, F> TwoPhaseCommitSink for PostgresSink<T, R, F>
where
    T: Data + Serialize + DeserializeOwned,
    R: PgRow,
    F: Fn(&T) -> R + Clone + Send + Sync + 'static,
{
    type Item = T;
    type Committable = PgCommittable;
    type Writer = PgWriter<T, R, F>;

    fn open_writer(&self, ctx: &SinkContext) -> Result<Self::Writer> {
        let client = self.connect(&ctx.sink.0)?;
        let gid_prefix = gid_prefix(&ctx.job, &ctx.sink.0);
        Ok(PgWriter {
            client,
            sql: self.sql.clone(),
            map: self.map.clone(),
            mode: self.mode,
            batch_rows: self.batch_rows,
            rows: Vec::new(),
            staged: Vec::new(),
            in_txn: false,
            token: 0,
            seq: 0,
            gid_prefix,
            job: ctx.job.clone(),
            sink: ctx.sink.clone(),
            subtask: ctx.subtask.0,
            generation: ctx.generation as i64,
            _t: PhantomData,
        })
    }

    fn commit(&self, c: &PgCommittable) -> Result<()> {
        self.commit_one(c)
    }

    fn recover(
        &self,
        ctx: &RecoveryContext,
        pending: Vec<PgCommittable>,
    ) -> Result<Option<CheckpointId>> {
        let sink = ctx.sink.0.as_str();
        let fail = |e: SinkFailure| e.into_error(sink, "recover", ctx.restored);
        let width_ok = self.sql.validate(R::WIDTH);
        if let Err(message) = width_ok {
            return Err(Error::config(format!(
                "PostgreSQL sink '{sink}': {message}"
            )));
        }
        match self.mode {
            PgMode::TwoPhase => {
                let max: String = self
                    .with_control(sink, |c| {
                        Ok(c.query_one("SHOW max_prepared_transactions", &[])?.get(0))
                    })
                    .map_err(fail)?;
                if max.trim() == "0" {
                    return Err(Error::config(format!(
                        "PostgreSQL sink '{sink}' uses two-phase commit, but the server has max_prepared_transactions = 0; \
                         set it above the sink's parallelism (postgresql.conf, needs a restart) or use PostgresSink::idempotent"
                    )));
                }
                let prefix = gid_prefix(&ctx.job, sink);
                if prefix.len() + 52 > 200 {
                    return Err(Error::config(format!(
                        "PostgreSQL sink '{sink}': job and sink names are too long for a transaction id (200 bytes)"
                    )));
                }
                let keep: std::collections::HashSet<&str> = pending
                    .iter()
                    .filter_map(|c| match c {
                        PgCommittable::Prepared { gid } => Some(gid.as_str()),
                        PgCommittable::Staged { .. } => None,
                    })
                    .collect();
                let gids: Vec<String> = self
                    .with_control(sink, |c| {
                        let rows = c.query(
                            "SELECT gid FROM pg_prepared_xacts \
                             WHERE database = current_database() AND left(gid, $1) = $2",
                            &[&(prefix.len() as i32), &prefix],
                        )?;
                        Ok(rows.iter().map(|r| r.get(0)).collect())
                    })
                    .map_err(fail)?;
                // A transaction a newer instance prepared: this one is fenced, and rolls
                // back nothing (it would abort the newer instance's output).
                if let Some(newer) = gids
                    .iter()
                    .map(|g| gid_generation(g))
                    .find(|&g| g > ctx.generation)
                {
                    return Err(Error::Fenced {
                        epoch: ctx.generation,
                        newer,
                        url: format!("PostgreSQL sink '{sink}'"),
                    });
                }
                for c in &pending {
                    self.commit_one(c)?;
                }
                let mut max_seen = None;
                for gid in gids {
                    max_seen = max_seen.max(gid_checkpoint(&gid));
                    if keep.contains(gid.as_str()) {
                        continue;
                    }
                    tracing::info!(%gid, "rolling back a prepared transaction of an unfinished checkpoint");
                    let r = self.with_control(sink, |c| {
                        Ok(c.batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))?)
                    });
                    match r {
                        Ok(()) => {}
                        Err(SinkFailure::Pg(e))
                            if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {}
                        Err(e) => return Err(fail(e)),
                    }
                }
                Ok(max_seen)
            }
            PgMode::Idempotent => {
                self.with_control(sink, |c| {
                    Ok(c.batch_execute(
                        "CREATE TABLE IF NOT EXISTS exactly_sink_staging (
                             token bigint NOT NULL, seq integer NOT NULL,
                             job text NOT NULL, sink text NOT NULL, payload bytea NOT NULL,
                             generation bigint NOT NULL DEFAULT 0,
                             PRIMARY KEY (token, seq));
                         CREATE TABLE IF NOT EXISTS exactly_sink_commits (
                             job text NOT NULL, sink text NOT NULL, subtask integer NOT NULL,
                             checkpoint bigint NOT NULL,
                             committed_at timestamptz NOT NULL DEFAULT now(),
                             PRIMARY KEY (job, sink, subtask, checkpoint));",
                    )?)
                })
                .map_err(fail)?;
                // Staging tables created before generations existed get the column. The
                // ALTER takes an exclusive lock even when the column exists, and would
                // queue behind other jobs' open staging transactions: only when missing.
                self.with_control(sink, |c| {
                    let has: bool = c
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
                             WHERE table_schema = current_schema() \
                             AND table_name = 'exactly_sink_staging' AND column_name = 'generation')",
                            &[],
                        )?
                        .get(0);
                    if !has {
                        c.batch_execute(
                            "ALTER TABLE exactly_sink_staging \
                             ADD COLUMN IF NOT EXISTS generation bigint NOT NULL DEFAULT 0",
                        )?;
                    }
                    Ok(())
                })
                .map_err(fail)?;
                let mut tokens = Vec::new();
                for c in &pending {
                    self.commit_one(c)?;
                    if let PgCommittable::Staged { token, .. } = c {
                        tokens.push(*token);
                    }
                }
                // Staged records of intervals no restored checkpoint includes.
                // Staged by a newer instance: this one is fenced and deletes nothing.
                let job = ctx.job.clone();
                let generation = ctx.generation as i64;
                let newer: Option<i64> = self
                    .with_control(sink, |c| {
                        Ok(c.query_one(
                            "SELECT max(generation) FROM exactly_sink_staging \
                             WHERE job = $1 AND sink = $2 AND generation > $3",
                            &[&job, &sink, &generation],
                        )?
                        .get(0))
                    })
                    .map_err(fail)?;
                if let Some(newer) = newer {
                    return Err(Error::Fenced {
                        epoch: ctx.generation,
                        newer: newer as u64,
                        url: format!("PostgreSQL sink '{sink}'"),
                    });
                }
                let max: Option<i64> = self
                    .with_control(sink, |c| {
                        c.execute(
                            "DELETE FROM exactly_sink_staging \
                             WHERE job = $1 AND sink = $2 AND generation <= $3",
                            &[&job, &sink, &generation],
                        )?;
                        Ok(c.query_one(
                            "SELECT max(checkpoint) FROM exactly_sink_commits WHERE job = $1 AND sink = $2",
                            &[&job, &sink],
                        )?
                        .get(0))
                    })
                    .map_err(fail)?;
                Ok(max.map(|m| CheckpointId(m as u64)))
            }
        }
    }
}

/// Writes one sink subtask's records.
pub struct PgWriter<T, R, F> {
    client: Client,
    sql: Arc<Sql>,
    map: F,
    mode: PgMode,
    batch_rows: usize,
    rows: Vec<R>,
    staged: Vec<Vec<u8>>,
    in_txn: bool,
    token: i64,
    seq: i32,
    gid_prefix: String,
    job: String,
    sink: OperatorId,
    subtask: usize,
    /// This instance's fencing generation, in every transaction id and staged row.
    generation: i64,
    _t: PhantomData<fn(T)>,
}

impl<T, R, F> PgWriter<T, R, F>
where
    T: Data + Serialize,
    R: PgRow,
    F: Fn(&T) -> R,
{
    fn err(&self, step: &'static str, c: Option<CheckpointId>, e: postgres::Error) -> Error {
        pg_error(&self.sink.0, step, c, e)
    }

    fn begin(&mut self) -> Result<()> {
        if !self.in_txn {
            self.client
                .batch_execute("BEGIN")
                .map_err(|e| self.err("write", None, e))?;
            self.in_txn = true;
            self.token = random_token();
            self.seq = 0;
        }
        Ok(())
    }

    /// Send buffered records to the server (inside the open transaction).
    fn flush(&mut self) -> Result<()> {
        match self.mode {
            PgMode::TwoPhase if !self.rows.is_empty() => {
                self.begin()?;
                let r = self.sql.execute(&mut self.client, &self.rows);
                r.map_err(|e| self.err("write", None, e))?;
                self.rows.clear();
            }
            PgMode::Idempotent if !self.staged.is_empty() => {
                self.begin()?;
                let mut sql = String::from(
                    "INSERT INTO exactly_sink_staging (token, seq, job, sink, generation, payload) VALUES ",
                );
                let seqs: Vec<i32> = (0..self.staged.len() as i32)
                    .map(|i| self.seq + i)
                    .collect();
                let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(seqs.len() * 6);
                for (i, payload) in self.staged.iter().enumerate() {
                    let b = i * 6;
                    sql.push_str(&format!(
                        "{}(${}, ${}, ${}, ${}, ${}, ${})",
                        if i == 0 { "" } else { ", " },
                        b + 1,
                        b + 2,
                        b + 3,
                        b + 4,
                        b + 5,
                        b + 6
                    ));
                    params.push(&self.token);
                    params.push(&seqs[i]);
                    params.push(&self.job);
                    params.push(&self.sink.0);
                    params.push(&self.generation);
                    params.push(payload);
                }
                let r = self.client.execute(sql.as_str(), &params);
                r.map_err(|e| self.err("write", None, e))?;
                self.seq += self.staged.len() as i32;
                self.staged.clear();
            }
            _ => {}
        }
        Ok(())
    }
}

fn random_token() -> i64 {
    crate::unique_u64() as i64
}

impl<T, R, F> SinkWriter for PgWriter<T, R, F>
where
    T: Data + Serialize,
    R: PgRow,
    F: Fn(&T) -> R + 'static,
{
    type Item = T;
    type Committable = PgCommittable;

    fn write(&mut self, batch: &mut Vec<T>) -> Result<()> {
        for record in batch.drain(..) {
            match self.mode {
                PgMode::TwoPhase => {
                    self.rows.push((self.map)(&record));
                    if self.rows.len() >= self.batch_rows {
                        self.flush()?;
                    }
                }
                PgMode::Idempotent => {
                    self.staged
                        .push(exactly_engine::connect::encode(&record, "staged record")?);
                    if self.staged.len() >= self.batch_rows.min(MAX_PARAMS / 6) {
                        self.flush()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<Option<PgCommittable>> {
        self.flush()?;
        if !self.in_txn {
            return Ok(None);
        }
        self.in_txn = false;
        match self.mode {
            PgMode::TwoPhase => {
                let gid = format!(
                    "{}{}:{}:g{}",
                    self.gid_prefix, checkpoint.0, self.subtask, self.generation
                );
                self.client
                    .batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
                    .map_err(|e| self.err("pre-commit", Some(checkpoint), e))?;
                Ok(Some(PgCommittable::Prepared { gid }))
            }
            PgMode::Idempotent => {
                self.client
                    .batch_execute("COMMIT")
                    .map_err(|e| self.err("pre-commit", Some(checkpoint), e))?;
                Ok(Some(PgCommittable::Staged {
                    job: self.job.clone(),
                    sink: self.sink.0.clone(),
                    subtask: self.subtask,
                    checkpoint: checkpoint.0,
                    token: self.token,
                }))
            }
        }
    }
}
