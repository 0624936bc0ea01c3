//! Nexmark (the standard streaming benchmark: people, auctions and bids of an online
//! auction house) on the public DSL: q0 to q8, in-memory state,
//! parallelism 2, a local checkpoint directory. Each query runs with checkpoints off
//! (final checkpoint only) and every second, prints events/s (total and per core), the
//! median checkpoint duration and synchronous pause, and asserts its committed output
//! against a straightforward batch computation over the same events.
//!
//! Events come from the `nexmark` crate's generator (default configuration, fixed base
//! time), read as 2 interleaved splits (split `i` holds events `i, i + 2, i + 4, ...`), so
//! event time advances evenly on both.
//!
//! `cargo bench --bench nexmark`; `EXACTLY_BENCH_EVENTS` sets the event count,
//! `EXACTLY_NEXMARK` a comma-separated list of queries (`q0,q5`).

#[path = "common/mod.rs"]
mod common;

use common::{cores, env_num, listing, median, periodic};
use exactly::engine::error::Result as EngineResult;
use exactly::operators::{
    CoProcessFunction, ConnectExt, IntervalJoinExt, Window, WindowExt, Windowed, Windows,
};
use exactly::prelude::*;
use nexmark::config::NexmarkConfig;
use nexmark::event::{Auction, Bid, Event, Person};
use nexmark::EventGenerator;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SPLITS: u64 = 2;
const PARALLELISM: usize = 2;
const WINDOW_MS: i64 = 10_000;

fn config() -> NexmarkConfig {
    NexmarkConfig {
        // Fixed, so every run (and the batch computation) sees the same events.
        base_time: 1_700_000_000_000,
        ..Default::default()
    }
}

/// The first `events` Nexmark events as a replayable source of interleaved splits.
struct NexmarkSource {
    events: u64,
}

struct NexmarkReader {
    gen: EventGenerator,
    next: u64,
    end: u64,
}

impl Source for NexmarkSource {
    type Item = Event;
    type Offset = u64;
    type Reader = NexmarkReader;

    fn splits(&self) -> EngineResult<Vec<String>> {
        Ok((0..SPLITS).map(|i| format!("{i}-of-{SPLITS}")).collect())
    }

    fn open(
        &self,
        split: &str,
        from: Option<u64>,
        _: &SourceContext,
    ) -> EngineResult<NexmarkReader> {
        let i: u64 = split
            .split_once("-of-")
            .and_then(|(i, _)| i.parse().ok())
            .ok_or_else(|| Error::config(format!("not a nexmark split: {split}")))?;
        let next = from.unwrap_or(i);
        Ok(NexmarkReader {
            gen: EventGenerator::new(config())
                .with_offset(next)
                .with_step(SPLITS),
            next,
            end: self.events,
        })
    }
}

impl SourceReader for NexmarkReader {
    type Item = Event;
    type Offset = u64;

    fn poll_batch(&mut self, out: &mut Vec<Event>, max: usize) -> EngineResult<SourcePoll> {
        if self.next >= self.end {
            return Ok(SourcePoll::End);
        }
        let n = ((self.end - self.next).div_ceil(SPLITS)).min(max as u64);
        out.extend(self.gen.by_ref().take(n as usize));
        self.next += n * SPLITS;
        Ok(SourcePoll::Ready)
    }

    fn offset(&self) -> u64 {
        self.next
    }
}

/// Every event, in generation order (what the batch computations read).
fn all_events(n: u64) -> Vec<Event> {
    EventGenerator::new(config()).take(n as usize).collect()
}

fn ts(e: &Event) -> i64 {
    e.timestamp() as i64
}

fn bids(s: &Stream<Event>) -> Stream<Bid> {
    s.flat_map(|e| match e {
        Event::Bid(b) => Some(b),
        _ => None,
    })
}

fn start(t: i64) -> i64 {
    t - t.rem_euclid(WINDOW_MS)
}

fn hash<T: std::hash::Hash>(x: &T) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(x)
}

/// A commutative digest of a multiset of records: count and wrapping sum of hashes.
fn digest<T: std::hash::Hash>(items: impl Iterator<Item = T>) -> (u64, u64) {
    items.fold((0, 0), |(n, s), x| (n + 1, s.wrapping_add(hash(&x))))
}

/// A two-phase-commit sink that keeps only a digest of what it committed, so the
/// benchmark measures the engine, not a sink. Each committable is the digest of one
/// subtask's records between two barriers; a commit is recorded once per (checkpoint,
/// subtask), so committing again is a no-op.
/// Digests committed, by (checkpoint, subtask).
type Committed = HashMap<(u64, usize), (u64, u64)>;

struct DigestSink<T, H> {
    hash: H,
    committed: Arc<Mutex<Committed>>,
    _t: PhantomData<fn(T)>,
}

impl<T, H: Clone> Clone for DigestSink<T, H> {
    fn clone(&self) -> Self {
        DigestSink {
            hash: self.hash.clone(),
            committed: self.committed.clone(),
            _t: PhantomData,
        }
    }
}

impl<T, H> DigestSink<T, H> {
    fn new(hash: H) -> Self {
        DigestSink {
            hash,
            committed: Arc::default(),
            _t: PhantomData,
        }
    }

    /// Count and hash sum of everything committed.
    fn digest(&self) -> (u64, u64) {
        let c = self.committed.lock().unwrap();
        c.values()
            .fold((0, 0), |(n, s), (m, t)| (n + m, s.wrapping_add(*t)))
    }
}

struct DigestWriter<T, H> {
    hash: H,
    subtask: usize,
    open: (u64, u64),
    _t: PhantomData<fn(T)>,
}

impl<T: Data, H: Fn(&T) -> u64 + Clone + Send + Sync + 'static> TwoPhaseCommitSink
    for DigestSink<T, H>
{
    type Item = T;
    type Committable = (u64, usize, u64, u64);
    type Writer = DigestWriter<T, H>;
    fn open_writer(&self, ctx: &SinkContext) -> EngineResult<Self::Writer> {
        Ok(DigestWriter {
            hash: self.hash.clone(),
            subtask: ctx.subtask.0,
            open: (0, 0),
            _t: PhantomData,
        })
    }
    fn commit(&self, &(cp, subtask, n, sum): &Self::Committable) -> EngineResult<()> {
        self.committed
            .lock()
            .unwrap()
            .insert((cp, subtask), (n, sum));
        Ok(())
    }
    fn recover(
        &self,
        _: &RecoveryContext,
        pending: Vec<Self::Committable>,
    ) -> EngineResult<Option<CheckpointId>> {
        for c in &pending {
            self.commit(c)?;
        }
        Ok(None)
    }
}

impl<T: Data, H: Fn(&T) -> u64 + 'static> SinkWriter for DigestWriter<T, H> {
    type Item = T;
    type Committable = (u64, usize, u64, u64);
    fn write(&mut self, batch: &mut Vec<T>) -> EngineResult<()> {
        for x in batch.drain(..) {
            self.open.0 += 1;
            self.open.1 = self.open.1.wrapping_add((self.hash)(&x));
        }
        Ok(())
    }
    fn pre_commit(&mut self, c: CheckpointId) -> EngineResult<Option<Self::Committable>> {
        let (n, sum) = std::mem::take(&mut self.open);
        Ok((n > 0).then_some((c.0, self.subtask, n, sum)))
    }
}

/// A digest sink over records that are hashable themselves.
fn sink_of<T: Data + std::hash::Hash>() -> DigestSink<T, fn(&T) -> u64> {
    DigestSink::new(hash::<T> as fn(&T) -> u64)
}

type Q1Row = (usize, usize, usize, u64);

/// Keeps, per window start, the best score and the ids that reach it; emits them when
/// event time passes the window (the second phase of q5 and q7).
#[derive(Clone)]
struct WindowMax;

const BEST: ValueState<(u64, Vec<u64>)> = ValueState::new("best");

impl KeyedProcessFunction<i64, (Window, u64, u64)> for WindowMax {
    type Out = (i64, u64, u64);
    fn process(
        &mut self,
        (w, id, score): (Window, u64, u64),
        ctx: &mut KeyedContext<'_, i64, (i64, u64, u64)>,
    ) -> Result<(), BoxError> {
        let mut best = ctx.value(BEST)?.unwrap_or((0, Vec::new()));
        if score > best.0 {
            best = (score, vec![id]);
        } else if score == best.0 {
            best.1.push(id);
        }
        ctx.set_value(BEST, &best)?;
        ctx.register_event_time_timer(w.max_timestamp());
        Ok(())
    }

    fn on_timer(
        &mut self,
        _: Timer,
        ctx: &mut KeyedContext<'_, i64, (i64, u64, u64)>,
    ) -> Result<(), BoxError> {
        if let Some((score, ids)) = ctx.value(BEST)? {
            let w = *ctx.key();
            for id in ids {
                ctx.emit((w, id, score));
            }
            ctx.clear_value(BEST);
        }
        Ok(())
    }
}

/// q3's incremental join: a person of OR, ID or CA, with the auctions of category 10
/// they sell, in either arrival order.
#[derive(Clone)]
struct LocalItems;

type Q3Row = (String, String, String, usize);
const SELLER: ValueState<(String, String, String)> = ValueState::new("seller");
const WAITING: MapState<usize, ()> = MapState::new("waiting");

impl CoProcessFunction<usize, Person, Auction> for LocalItems {
    type Out = Q3Row;
    fn process_left(
        &mut self,
        p: Person,
        ctx: &mut KeyedContext<'_, usize, Q3Row>,
    ) -> Result<(), BoxError> {
        for (auction, ()) in ctx.map_entries(WAITING)? {
            ctx.emit((p.name.clone(), p.city.clone(), p.state.clone(), auction));
        }
        ctx.map_clear(WAITING);
        ctx.set_value(SELLER, &(p.name, p.city, p.state))?;
        Ok(())
    }
    fn process_right(
        &mut self,
        a: Auction,
        ctx: &mut KeyedContext<'_, usize, Q3Row>,
    ) -> Result<(), BoxError> {
        match ctx.value(SELLER)? {
            Some((name, city, state)) => ctx.emit((name, city, state, a.id)),
            None => ctx.map_put(WAITING, &a.id, &())?,
        }
        Ok(())
    }
}

/// The first phase of q4 and q6: per auction, the highest bid placed while it was open,
/// emitted when it closes.
#[derive(Clone)]
struct WinningBid {
    /// Group winners by seller (q6) rather than by category (q4).
    by_seller: bool,
}

/// A closed auction's winning bid: `(category or seller, closing time, auction, price)`.
type Winner = (usize, u64, usize, u64);

const OPEN: ValueState<(usize, u64, u64)> = ValueState::new("auction");
const HIGHEST: ValueState<u64> = ValueState::new("highest");
const EARLY: ValueState<Vec<(u64, u64)>> = ValueState::new("early");
/// How long bids of an auction not seen yet wait for it (the splits are read in step,
/// so an auction is at most a batch behind its bids).
const EARLY_WAIT_MS: i64 = 60_000;

impl CoProcessFunction<usize, Auction, Bid> for WinningBid {
    type Out = Winner;
    fn process_left(
        &mut self,
        a: Auction,
        ctx: &mut KeyedContext<'_, usize, Winner>,
    ) -> Result<(), BoxError> {
        let mut best = None;
        for (price, t) in ctx.value(EARLY)?.unwrap_or_default() {
            if a.date_time <= t && t <= a.expires {
                best = best.max(Some(price));
            }
        }
        ctx.clear_value(EARLY);
        if let Some(b) = best {
            ctx.set_value(HIGHEST, &b)?;
        }
        let group = if self.by_seller { a.seller } else { a.category };
        ctx.set_value(OPEN, &(group, a.date_time, a.expires))?;
        ctx.register_event_time_timer(a.expires as i64);
        Ok(())
    }
    fn process_right(
        &mut self,
        b: Bid,
        ctx: &mut KeyedContext<'_, usize, Winner>,
    ) -> Result<(), BoxError> {
        let (price, t) = (b.price as u64, b.date_time);
        match ctx.value(OPEN)? {
            Some((_, opened, expires)) => {
                if opened <= t && t <= expires && ctx.value(HIGHEST)?.is_none_or(|h| price > h) {
                    ctx.set_value(HIGHEST, &price)?;
                }
            }
            None => {
                let mut early = ctx.value(EARLY)?.unwrap_or_default();
                early.push((price, t));
                ctx.set_value(EARLY, &early)?;
                ctx.register_event_time_timer(t as i64 + EARLY_WAIT_MS);
            }
        }
        Ok(())
    }
    fn on_timer(
        &mut self,
        timer: Timer,
        ctx: &mut KeyedContext<'_, usize, Winner>,
    ) -> Result<(), BoxError> {
        match ctx.value(OPEN)? {
            Some((group, _, expires)) if expires as i64 == timer.time => {
                if let Some(h) = ctx.value(HIGHEST)? {
                    ctx.emit((group, expires, *ctx.key(), h));
                }
                ctx.clear_value(OPEN);
                ctx.clear_value(HIGHEST);
            }
            Some(_) => {}
            // Bids of an auction that never came (or came and closed before them).
            None => ctx.clear_value(EARLY),
        }
        Ok(())
    }
}

/// q4's second phase: sum and count of winning prices per category, emitted once event
/// time is complete (so the benchmark can compare a deterministic result).
#[derive(Clone)]
struct CategoryAverage;

const SUM_COUNT: ValueState<(u64, u64)> = ValueState::new("sum-count");

impl KeyedProcessFunction<usize, Winner> for CategoryAverage {
    type Out = (usize, u64, u64);
    fn process(
        &mut self,
        (_, _, _, price): Winner,
        ctx: &mut KeyedContext<'_, usize, (usize, u64, u64)>,
    ) -> Result<(), BoxError> {
        let (sum, n) = ctx.value(SUM_COUNT)?.unwrap_or((0, 0));
        ctx.set_value(SUM_COUNT, &(sum + price, n + 1))?;
        ctx.register_event_time_timer(Timestamp::MAX);
        Ok(())
    }
    fn on_timer(
        &mut self,
        _: Timer,
        ctx: &mut KeyedContext<'_, usize, (usize, u64, u64)>,
    ) -> Result<(), BoxError> {
        if let Some((sum, n)) = ctx.value(SUM_COUNT)? {
            ctx.emit((*ctx.key(), sum, n));
        }
        Ok(())
    }
}

/// q6's second phase: per seller, the average winning price of its last 10 closed
/// auctions, emitted at every close as `(seller, closing time, auction, average)`.
/// Winners are taken in closing order (ties by auction id) once event time has passed
/// their close, so the output does not depend on how the first phase's subtasks
/// interleave.
#[derive(Clone)]
struct SellerAverage;

/// Winners not yet taken: `(closing time, auction, price)`.
const CLOSED: ValueState<Vec<(u64, usize, u64)>> = ValueState::new("closed");
/// The winning prices of the seller's last (up to) 10 auctions, oldest first.
const LAST: ValueState<Vec<u64>> = ValueState::new("last-10");
const Q6_AUCTIONS: usize = 10;

/// The running averages of one seller's winners, in order: the same arithmetic for the
/// job and for the batch computation.
fn push_last(last: &mut Vec<u64>, price: u64) -> u64 {
    if last.len() == Q6_AUCTIONS {
        last.remove(0);
    }
    last.push(price);
    last.iter().sum::<u64>() / last.len() as u64
}

impl KeyedProcessFunction<usize, Winner> for SellerAverage {
    type Out = (usize, u64, usize, u64);
    fn process(
        &mut self,
        (_, closes, auction, price): Winner,
        ctx: &mut KeyedContext<'_, usize, (usize, u64, usize, u64)>,
    ) -> Result<(), BoxError> {
        let mut closed = ctx.value(CLOSED)?.unwrap_or_default();
        closed.push((closes, auction, price));
        ctx.set_value(CLOSED, &closed)?;
        ctx.register_event_time_timer(closes as i64);
        Ok(())
    }
    fn on_timer(
        &mut self,
        timer: Timer,
        ctx: &mut KeyedContext<'_, usize, (usize, u64, usize, u64)>,
    ) -> Result<(), BoxError> {
        let Some(mut closed) = ctx.value(CLOSED)? else {
            return Ok(());
        };
        closed.sort_unstable();
        let due = closed.partition_point(|c| c.0 as i64 <= timer.time);
        let mut last = ctx.value(LAST)?.unwrap_or_default();
        let seller = *ctx.key();
        for (closes, auction, price) in closed.drain(..due) {
            let avg = push_last(&mut last, price);
            ctx.emit((seller, closes, auction, avg));
        }
        ctx.set_value(LAST, &last)?;
        if closed.is_empty() {
            ctx.clear_value(CLOSED);
        } else {
            ctx.set_value(CLOSED, &closed)?;
        }
        Ok(())
    }
}

/// The winners of closed auctions (the first phase of q4 and q6), by category or seller.
fn winning_bids(src: &Stream<Event>, by_seller: bool, name: &str) -> Stream<Winner> {
    let auctions = src.flat_map(|e| match e {
        Event::Auction(a) => Some(a),
        _ => None,
    });
    auctions
        .connect(&bids(src))
        .key_by(|a: &Auction| a.id, |b: &Bid| b.auction)
        .process(WinningBid { by_seller })
        .name(name)
}

/// Per auction with a bid placed while it was open: its highest such bid (q4, q6).
fn winners(all: &[Event]) -> (HashMap<usize, &Auction>, HashMap<usize, u64>) {
    let auctions: HashMap<usize, &Auction> = all
        .iter()
        .filter_map(|e| match e {
            Event::Auction(a) => Some((a.id, a)),
            _ => None,
        })
        .collect();
    let mut highest: HashMap<usize, u64> = HashMap::new();
    for e in all {
        if let Event::Bid(b) = e {
            if let Some(a) = auctions.get(&b.auction) {
                if a.date_time <= b.date_time && b.date_time <= a.expires {
                    let h = highest.entry(a.id).or_default();
                    *h = (*h).max(b.price as u64);
                }
            }
        }
    }
    (auctions, highest)
}

fn q3_person(p: &Person) -> bool {
    matches!(p.state.as_str(), "or" | "id" | "ca")
}

/// What a query run leaves to check: a digest of its committed output.
type Check = Box<dyn Fn() -> (u64, u64)>;

/// Build query `q` on `job`; returns how to read its committed output, and the
/// expected digest from a batch computation over `events`.
fn build(q: &str, job: &Job, events: u64, all: &[Event]) -> (Check, (u64, u64)) {
    let src = job
        .source("nexmark", NexmarkSource { events })
        .with_watermarks(WatermarkStrategy::bounded_out_of_orderness(
            Duration::from_secs(1),
            ts,
        ));
    let all_bids = || {
        all.iter().filter_map(|e| match e {
            Event::Bid(b) => Some(b),
            _ => None,
        })
    };
    match q {
        // Pass-through: every bid.
        "q0" => {
            let out = DigestSink::new(|b: &Bid| hash(&(b.auction, b.bidder, b.price, b.date_time)));
            bids(&src).sink("out", out.clone());
            let expected = digest(all_bids().map(|b| (b.auction, b.bidder, b.price, b.date_time)));
            (Box::new(move || out.digest()), expected)
        }
        // Currency conversion: prices in euros.
        "q1" => {
            let out = sink_of();
            bids(&src)
                .map(|b| -> Q1Row { (b.auction, b.bidder, b.price * 908 / 1000, b.date_time) })
                .sink("out", out.clone());
            let expected = digest(
                all_bids().map(|b| (b.auction, b.bidder, b.price * 908 / 1000, b.date_time)),
            );
            (Box::new(move || out.digest()), expected)
        }
        // Selection: bids on a few auctions.
        "q2" => {
            let out = sink_of();
            bids(&src)
                .filter(|b| b.auction % 123 == 0)
                .map(|b| (b.auction, b.price))
                .sink("out", out.clone());
            let expected = digest(
                all_bids()
                    .filter(|b| b.auction % 123 == 0)
                    .map(|b| (b.auction, b.price)),
            );
            (Box::new(move || out.digest()), expected)
        }
        // Local item suggestion: an incremental join of people and auctions.
        "q3" => {
            let out = sink_of();
            let people = src.flat_map(|e| match e {
                Event::Person(p) if q3_person(&p) => Some(p),
                _ => None,
            });
            let auctions = src.flat_map(|e| match e {
                Event::Auction(a) if a.category == 10 => Some(a),
                _ => None,
            });
            people
                .connect(&auctions)
                .key_by(|p: &Person| p.id, |a: &Auction| a.seller)
                .process(LocalItems)
                .name("q3-join")
                .sink("out", out.clone());
            let people: HashMap<usize, &Person> = all
                .iter()
                .filter_map(|e| match e {
                    Event::Person(p) if q3_person(p) => Some((p.id, p)),
                    _ => None,
                })
                .collect();
            let expected = digest(all.iter().filter_map(|e| {
                match e {
                    Event::Auction(a) if a.category == 10 => people
                        .get(&a.seller)
                        .map(|p| (p.name.clone(), p.city.clone(), p.state.clone(), a.id)),
                    _ => None,
                }
            }));
            (Box::new(move || out.digest()), expected)
        }
        // Average winning price per category.
        "q4" => {
            let out = sink_of();
            winning_bids(&src, false, "q4-winning")
                .key_by(|w: &Winner| w.0)
                .process(CategoryAverage)
                .name("q4-average")
                .sink("out", out.clone());
            let (auctions, highest) = winners(all);
            let mut per_category: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
            for (id, price) in highest {
                let e = per_category.entry(auctions[&id].category).or_default();
                *e = (e.0 + price, e.1 + 1);
            }
            let expected = digest(per_category.into_iter().map(|(c, (s, n))| (c, s, n)));
            (Box::new(move || out.digest()), expected)
        }
        // Hot items: the auctions with the most bids per 10 s window, sliding by 2 s.
        "q5" => {
            let out = sink_of();
            bids(&src)
                .key_by(|b| b.auction as u64)
                .window(
                    Windows::sliding(Duration::from_secs(10), Duration::from_secs(2)),
                    |b: &Bid| b.date_time as i64,
                )
                .name("q5-count")
                .count()
                .results
                .map(|w: Windowed<u64, u64>| (w.window, w.key, w.value))
                .key_by(|r: &(Window, u64, u64)| r.0.start)
                .process(WindowMax)
                .name("q5-max")
                .sink("out", out.clone());
            let mut counts: HashMap<(i64, u64), u64> = HashMap::new();
            for b in all_bids() {
                let t = b.date_time as i64;
                for w in Windows::sliding(Duration::from_secs(10), Duration::from_secs(2)).assign(t)
                {
                    *counts.entry((w.start, b.auction as u64)).or_default() += 1;
                }
            }
            (
                Box::new(move || out.digest()),
                digest(window_max(counts).into_iter()),
            )
        }
        // Average selling price by seller: the mean winning price of each seller's last
        // 10 closed auctions, updated at every close.
        "q6" => {
            let out = sink_of();
            winning_bids(&src, true, "q6-winning")
                .key_by(|w: &Winner| w.0)
                .process(SellerAverage)
                .name("q6-average")
                .sink("out", out.clone());
            let (auctions, highest) = winners(all);
            let mut per_seller: BTreeMap<usize, Vec<(u64, usize, u64)>> = BTreeMap::new();
            for (id, price) in highest {
                let a = auctions[&id];
                per_seller
                    .entry(a.seller)
                    .or_default()
                    .push((a.expires, id, price));
            }
            let mut rows = Vec::new();
            for (seller, mut closed) in per_seller {
                closed.sort_unstable();
                let mut last = Vec::new();
                for (closes, auction, price) in closed {
                    rows.push((seller, closes, auction, push_last(&mut last, price)));
                }
            }
            (Box::new(move || out.digest()), digest(rows.into_iter()))
        }
        // Highest bid per 10 s tumbling window (two phases: per auction, then global).
        "q7" => {
            let out = sink_of();
            bids(&src)
                .key_by(|b| b.auction as u64)
                .window(Windows::tumbling(Duration::from_secs(10)), |b: &Bid| {
                    b.date_time as i64
                })
                .name("q7-auction-max")
                .reduce(|a, b| if b.price > a.price { b } else { a })
                .results
                .map(|w: Windowed<u64, Bid>| (w.window, w.key, w.value.price as u64))
                .key_by(|r: &(Window, u64, u64)| r.0.start)
                .process(WindowMax)
                .name("q7-max")
                .sink("out", out.clone());
            let mut best: HashMap<(i64, u64), u64> = HashMap::new();
            for b in all_bids() {
                let e = best
                    .entry((start(b.date_time as i64), b.auction as u64))
                    .or_default();
                *e = (*e).max(b.price as u64);
            }
            (
                Box::new(move || out.digest()),
                digest(window_max(best).into_iter()),
            )
        }
        // New users: people who created auctions in the same 10 s window.
        "q8" => {
            let out = sink_of();
            let people = src.flat_map(|e| match e {
                Event::Person(p) => Some(p),
                _ => None,
            });
            let auctions = src.flat_map(|e| match e {
                Event::Auction(a) => Some(a),
                _ => None,
            });
            people
                .key_by(|p: &Person| p.id)
                .window_join(
                    &auctions.key_by(|a: &Auction| a.seller),
                    Windows::tumbling(Duration::from_secs(10)),
                    |p: &Person| p.date_time as i64,
                    |a: &Auction| a.date_time as i64,
                    |p: &Person, _a: &Auction| (p.id, p.name.clone(), start(p.date_time as i64)),
                )
                .name("q8-join")
                .sink("out", out.clone());
            let mut people: HashMap<(usize, i64), &Person> = HashMap::new();
            for e in all {
                if let Event::Person(p) = e {
                    people.insert((p.id, start(p.date_time as i64)), p);
                }
            }
            let expected = digest(all.iter().filter_map(|e| {
                match e {
                    Event::Auction(a) => people
                        .get(&(a.seller, start(a.date_time as i64)))
                        .map(|p| (p.id, p.name.clone(), start(p.date_time as i64))),
                    _ => None,
                }
            }));
            (Box::new(move || out.digest()), expected)
        }
        other => panic!("unknown query {other} (known: {QUERIES:?})"),
    }
}

/// Per window, the ids with the highest score: `(window start, id, score)`.
fn window_max(scores: HashMap<(i64, u64), u64>) -> Vec<(i64, u64, u64)> {
    let mut best: BTreeMap<i64, (u64, Vec<u64>)> = BTreeMap::new();
    for ((w, id), s) in scores {
        let e = best.entry(w).or_insert((0, Vec::new()));
        if s > e.0 {
            *e = (s, vec![id]);
        } else if s == e.0 {
            e.1.push(id);
        }
    }
    best.into_iter()
        .flat_map(|(w, (s, ids))| ids.into_iter().map(move |id| (w, id, s)))
        .collect()
}

const QUERIES: [&str; 9] = ["q0", "q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8"];

fn main() {
    if listing() {
        return;
    }
    let events = env_num("EXACTLY_BENCH_EVENTS", 5_000_000);
    let wanted: Vec<String> = std::env::var("EXACTLY_NEXMARK")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_else(|_| QUERIES.iter().map(|q| q.to_string()).collect());
    let cores = cores();
    println!("nexmark: {events} events, parallelism {PARALLELISM}, {cores} cores, in-memory state");
    let all = all_events(events);
    let distinct: HashSet<&str> = wanted.iter().map(String::as_str).collect();
    for q in QUERIES.iter().filter(|q| distinct.contains(**q)) {
        for (label, interval) in [
            ("no checkpoints", None),
            ("every 1 s", Some(Duration::from_secs(1))),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut b = Job::builder("nexmark")
                .checkpoint_storage(dir.path().to_str().unwrap())
                .parallelism(PARALLELISM);
            if let Some(i) = interval {
                b = b.checkpoint_every(i);
            }
            let job = b.build().unwrap();
            let (check, expected) = build(q, &job, events, &all);
            let t = Instant::now();
            let report = job.run().unwrap();
            let elapsed = t.elapsed();
            let got = check();
            assert_eq!(
                got, expected,
                "{q}: committed output differs from the batch computation"
            );
            let eps = events as f64 / elapsed.as_secs_f64();
            let d = periodic(&report, |c| c.duration);
            let p = periodic(&report, |c| c.max_sync_pause);
            let figures = if d.is_empty() {
                "final checkpoint only".to_string()
            } else {
                format!(
                    "{} checkpoints, median checkpoint {:?}, median synchronous pause {:?}",
                    d.len(),
                    median(d),
                    median(p)
                )
            };
            println!(
                "{q} {label:>14}: {eps:>10.0} events/s ({:>9.0} per core), {} result rows (verified), {figures}",
                eps / cores as f64,
                got.0,
            );
        }
    }
}
