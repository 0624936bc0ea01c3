//! The reconciliation pipeline.
//!
//! ```text
//! charges  ─ dedup ─┐
//! payments ─ dedup ─┼─ union ─┬─ key_by(trip) ─ reconcile ─────────────► results
//! payouts  ─ dedup ─┘         └─ postings ─┬─ key_by(account) ─ 1-day windows ─► daily-totals
//!                                          ├─ key_by(account) ─ closing balance ─► balances
//!                                          └─ (with --ledger-postgres) every posting ─► PostgreSQL
//! ```

use crate::model::*;
use exactly::engine::time::Timer;
use exactly::operators::{AggregateFunction, DedupExt, DedupTime, WindowExt, Windows};
use exactly::prelude::*;
#[cfg(feature = "postgres")]
use exactly::sinks::postgres::{PostgresSink, Sql};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Where the job reads its three streams and writes its three outputs.
#[derive(Debug, Clone)]
pub enum Io {
    /// `input/<stream>/` files in, `out/<sink>/` part files out.
    Files { input: PathBuf, out: PathBuf },
    /// Topics `<prefix><stream>` in (read to their end as of the start), topics
    /// `<prefix><sink>` out through the transactional Kafka sink (feature `kafka`).
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    Kafka(KafkaIo),
}

/// The Kafka side of [`Io::Kafka`].
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub struct KafkaIo {
    pub brokers: String,
    pub prefix: String,
    /// Where records wait between a checkpoint's barrier and their commit.
    pub staging: PathBuf,
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
impl KafkaIo {
    /// The topic of stream or sink `name`.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

/// Job settings.
#[derive(Debug, Clone)]
pub struct JobConfig {
    pub parallelism: usize,
    pub checkpoint_every: Duration,
    /// Must cover the disorder of the inputs (the generator's `out_of_order_ms`).
    pub out_of_order: Duration,
    /// Records per batch.
    pub batch_size: usize,
    /// Pause after each source batch (tests slow the job down to crash it mid-run).
    pub pacing: Option<Duration>,
    /// Also write the ledger (every posting) into PostgreSQL.
    pub ledger_pg: Option<LedgerTable>,
    /// Keep the checkpoint of a stop (SIGTERM, Ctrl-C) as this savepoint.
    pub savepoint_on_stop: Option<String>,
    /// Start this deployment from this savepoint.
    pub from_savepoint: Option<String>,
    /// Key groups (see `JobBuilder::max_parallelism`).
    pub max_parallelism: u16,
    /// Checkpoint without barrier alignment (duplicates possible after a failure; the
    /// benchmark compares checkpoint times).
    pub at_least_once: bool,
    /// Alignment timeout before a checkpoint goes unaligned (`None`: always aligned).
    pub aligned_timeout: Option<Duration>,
}

/// Where and how the ledger goes into PostgreSQL.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub struct LedgerTable {
    /// libpq-style connection string.
    pub url: String,
    pub table: String,
    /// Two-phase commit, or idempotent commits with marker rows.
    pub two_phase: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Trip {
    charges: Vec<i64>,
    payment: Option<i64>,
    payout: Option<(i64, i64)>,
    earliest: Option<i64>,
}

const TRIP: ValueState<Trip> = ValueState::new("trip");

/// Collects a trip's events and decides it `DEADLINE_MS` (event time) after its
/// earliest event.
#[derive(Clone)]
struct Reconcile;

impl KeyedProcessFunction<u64, TripEvent> for Reconcile {
    type Out = TripResult;

    fn process(
        &mut self,
        e: TripEvent,
        ctx: &mut KeyedContext<'_, u64, TripResult>,
    ) -> Result<(), BoxError> {
        let mut trip = ctx.value(TRIP)?.unwrap_or_default();
        let ts = e.ts();
        if trip.earliest.is_none_or(|t| ts < t) {
            // The deadline follows the earliest event, whatever order events arrive in.
            if let Some(t) = trip.earliest {
                ctx.delete_event_time_timer(t + DEADLINE_MS);
            }
            trip.earliest = Some(ts);
            ctx.register_event_time_timer(ts + DEADLINE_MS);
        }
        match e {
            TripEvent::Charge(c) => trip.charges.push(c.amount_cents),
            TripEvent::Payment(p) => {
                trip.payment = Some(trip.payment.unwrap_or(0) + p.amount_cents)
            }
            TripEvent::Payout(p) => {
                let (a, f) = trip.payout.unwrap_or((0, 0));
                trip.payout = Some((a + p.amount_cents, f + p.fee_cents));
            }
        }
        ctx.set_value(TRIP, &trip)?;
        Ok(())
    }

    fn on_timer(
        &mut self,
        _: Timer,
        ctx: &mut KeyedContext<'_, u64, TripResult>,
    ) -> Result<(), BoxError> {
        if let Some(trip) = ctx.value(TRIP)? {
            let result = decide(*ctx.key(), &trip.charges, trip.payment, trip.payout);
            ctx.emit(result);
            ctx.clear_value(TRIP);
        }
        Ok(())
    }
}

/// Sum of postings.
#[derive(Clone)]
struct SumCents;

impl AggregateFunction<Posting> for SumCents {
    type Acc = i64;
    type Out = i64;
    fn create(&self) -> i64 {
        0
    }
    fn add(&self, acc: &mut i64, p: &Posting) {
        *acc += p.amount_cents;
    }
    fn result(&self, acc: &i64) -> i64 {
        *acc
    }
    fn merge(&self, acc: &mut i64, other: i64) {
        *acc += other;
    }
}

const BALANCE: ValueState<i64> = ValueState::new("balance");
const DAY_DELTA: MapState<i64, i64> = MapState::new("day-delta");

/// An account's balance at the end of each day it moved, in day order.
#[derive(Clone)]
struct ClosingBalances;

impl KeyedProcessFunction<String, Posting> for ClosingBalances {
    type Out = ClosingBalance;

    fn process(
        &mut self,
        p: Posting,
        ctx: &mut KeyedContext<'_, String, ClosingBalance>,
    ) -> Result<(), BoxError> {
        let day = day_of(p.ts);
        let delta = ctx.map_get(DAY_DELTA, &day)?.unwrap_or(0) + p.amount_cents;
        ctx.map_put(DAY_DELTA, &day, &delta)?;
        ctx.register_event_time_timer(day + DAY_MS - 1);
        Ok(())
    }

    fn on_timer(
        &mut self,
        t: Timer,
        ctx: &mut KeyedContext<'_, String, ClosingBalance>,
    ) -> Result<(), BoxError> {
        let day = t.time + 1 - DAY_MS;
        if let Some(delta) = ctx.map_get(DAY_DELTA, &day)? {
            let balance = ctx.value(BALANCE)?.unwrap_or(0) + delta;
            ctx.set_value(BALANCE, &balance)?;
            ctx.map_remove(DAY_DELTA, &day)?;
            ctx.emit(ClosingBalance {
                account: ctx.key().clone(),
                day_start: day,
                balance_cents: balance,
            });
        }
        Ok(())
    }
}

fn read_stream<T>(job: &Job, io: &Io, name: &str, cfg: &JobConfig, ts: fn(&T) -> i64) -> Stream<T>
where
    T: exactly::prelude::Data + Sync + DeserializeOwned,
{
    let stream = match io {
        Io::Files { input, .. } => job.source(name, JsonLinesSource::<T>::new(input.join(name))),
        #[cfg(feature = "kafka")]
        Io::Kafka(k) => {
            // Bounded: each partition is read to its end as of the start, so event time
            // ends with the input and the last windows and deadlines fire, also when
            // the job runs as several instances (which go on until stopped).
            let decode = |b: &[u8]| serde_json::from_slice::<T>(b);
            let source = exactly::sources::KafkaSource::new(&k.brokers, &k.topic(name), decode);
            job.source(name, source.bounded())
        }
        #[cfg(not(feature = "kafka"))]
        Io::Kafka(_) => unreachable!("--kafka is refused without the kafka feature"),
    };
    stream.with_watermarks(
        WatermarkStrategy::bounded_out_of_orderness(cfg.out_of_order, ts)
            .with_idleness(Duration::from_secs(5)),
    )
}

/// Write `stream` into sink `name`: part files under `out/<name>`, or topic
/// `<prefix><name>` with records keyed by `key`.
fn write<T: exactly::prelude::Data + Serialize>(
    stream: Stream<T>,
    io: &Io,
    name: &str,
    key: fn(&T) -> String,
) -> anyhow::Result<()> {
    match io {
        Io::Files { out, .. } => {
            stream.sink(name, FileSink::exactly_once(out.join(name)));
        }
        #[cfg(feature = "kafka")]
        Io::Kafka(k) => {
            use exactly::sinks::kafka::{KafkaSink, Staging};
            let encode = move |r: &T, k: &mut Vec<u8>, v: &mut Vec<u8>| {
                k.extend_from_slice(key(r).as_bytes());
                serde_json::to_writer(v, r).expect("an output record encodes");
            };
            let topic = k.topic(name);
            let sink = KafkaSink::new(&k.brokers, &topic, Staging::dir(&k.staging)?, encode)?
                .marker_topic(&format!("{topic}-commits"));
            stream.sink(name, sink);
        }
        #[cfg(not(feature = "kafka"))]
        Io::Kafka(_) => {
            let _ = key;
            unreachable!("--kafka is refused without the kafka feature")
        }
    }
    Ok(())
}

/// Add the reconciliation pipeline to `job`, reading and writing through `io`.
pub fn build(job: &Job, io: &Io, cfg: &JobConfig) -> anyhow::Result<()> {
    let redelivery_horizon = Duration::from_secs(24 * 3600);
    let charges = read_stream(job, io, "charges", cfg, |c: &Charge| c.ts)
        .dedup_by(
            |c| c.event_id.clone(),
            redelivery_horizon,
            DedupTime::EventTime(|c: &Charge| c.ts),
        )
        .name("dedup-charges")
        .map(TripEvent::Charge);
    let payments = read_stream(job, io, "payments", cfg, |p: &Payment| p.ts)
        .dedup_by(
            |p| p.event_id.clone(),
            redelivery_horizon,
            DedupTime::EventTime(|p: &Payment| p.ts),
        )
        .name("dedup-payments")
        .map(TripEvent::Payment);
    let payouts = read_stream(job, io, "payouts", cfg, |p: &Payout| p.ts)
        .dedup_by(
            |p| p.event_id.clone(),
            redelivery_horizon,
            DedupTime::EventTime(|p: &Payout| p.ts),
        )
        .name("dedup-payouts")
        .map(TripEvent::Payout);
    let events = charges.union(&payments).union(&payouts);

    let results = events
        .key_by(|e| e.trip_id())
        .process(Reconcile)
        .name("reconcile");
    write(results, io, "results", |r| r.trip_id().to_string())?;

    let postings = events.flat_map(|e| e.postings());
    // Without the feature `--ledger-postgres` is refused when the flags are read.
    #[cfg(feature = "postgres")]
    if let Some(pg) = &cfg.ledger_pg {
        let sql = Sql::insert(&pg.table, &["account", "amount_cents", "ts"]);
        let row = |p: &Posting| (p.account.clone(), p.amount_cents, p.ts);
        let sink = if pg.two_phase {
            PostgresSink::two_phase(&pg.url, sql, row)
        } else {
            PostgresSink::idempotent(&pg.url, sql, row)
        };
        postings.sink("ledger", sink);
    }
    let daily = postings
        .key_by(|p| p.account.clone())
        .window(
            Windows::tumbling(Duration::from_millis(DAY_MS as u64)),
            |p| p.ts,
        )
        .name("daily")
        .aggregate(SumCents)
        .results
        .map(|w| DailyTotal {
            account: w.key,
            day_start: w.window.start,
            net_cents: w.value,
        });
    write(daily, io, "daily-totals", |d| d.account.clone())?;
    let balances = postings
        .key_by(|p| p.account.clone())
        .process(ClosingBalances)
        .name("closing-balances");
    write(balances, io, "balances", |b| b.account.clone())?;
    Ok(())
}

/// Events read so far by the three sources, from a job's counters.
pub fn events_read(metrics: &std::collections::BTreeMap<String, u64>) -> u64 {
    ["charges", "payments", "payouts"]
        .iter()
        .map(|s| metrics.get(&format!("{s}.records")).copied().unwrap_or(0))
        .sum()
}

/// A job with the settings of `cfg`, checkpointing into `checkpoints` (a directory or
/// `s3://bucket/prefix`). With Kafka, it runs as the instance `EXACTLY_INSTANCE` of
/// `EXACTLY_INSTANCES` when those are set, its `key_by`s crossing instances through
/// repartition topics. With `progress`, a line per completed checkpoint is printed
/// above that bar (or to stderr when the bar is hidden, as it is when stderr is not a
/// terminal).
pub fn job(
    name: &str,
    checkpoints: &str,
    cfg: &JobConfig,
    io: &Io,
    progress: Option<indicatif::ProgressBar>,
) -> anyhow::Result<Job> {
    let started = std::time::Instant::now();
    let mut b = Job::builder(name)
        .instance_from_env()?
        .checkpoint_storage(checkpoints)
        .checkpoint_every(cfg.checkpoint_every)
        .stop_on_sigterm()
        .parallelism(cfg.parallelism)
        .max_parallelism(cfg.max_parallelism)
        .batch_size(cfg.batch_size);
    if let Some(p) = cfg.pacing {
        b = b.source_pacing(p);
    }
    #[cfg(feature = "kafka")]
    if let Io::Kafka(k) = io {
        use exactly::kafka_repartition::KafkaRepartition;
        use exactly::sinks::kafka::Staging;
        b = b.repartition_through(KafkaRepartition::new(&k.brokers, Staging::dir(&k.staging)?));
    }
    #[cfg(not(feature = "kafka"))]
    let _ = io;
    if let Some(name) = &cfg.savepoint_on_stop {
        b = b.savepoint_on_stop(name);
    }
    if let Some(name) = &cfg.from_savepoint {
        b = b.restore_from_savepoint(name);
    }
    if cfg.at_least_once {
        b = b.at_least_once();
    }
    if let Some(t) = cfg.aligned_timeout {
        b = b.aligned_checkpoint_timeout(t);
    }
    if let Some(bar) = progress {
        b = b.on_checkpoint(move |c| {
            let read = events_read(&c.metrics);
            let secs = started.elapsed().as_secs_f64();
            let line = format!(
                "[{secs:>7.2}s] checkpoint {:>4}{} {:>5} ms | {:>10} events read ({:>9.0}/s this run) | {:>6} duplicates dropped",
                c.id,
                if c.is_final { " (final)" } else { "        " },
                c.duration.as_millis(),
                read,
                read as f64 / secs.max(1e-9),
                ["dedup-charges", "dedup-payments", "dedup-payouts"]
                    .iter()
                    .map(|s| c.metrics.get(&format!("{s}.duplicates_dropped")).copied().unwrap_or(0))
                    .sum::<u64>(),
            );
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        });
    }
    Ok(b.build()?)
}
