//! Writes the three input streams for N trips, with redelivered duplicates, bounded
//! disorder and injected anomalies, plus the ground truth of what was injected.

use crate::model::*;
use anyhow::{Context, Result};
use serde::Serialize;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Generator settings (all flags of `generate` and `demo`).
#[derive(Debug, Clone)]
pub struct GenConfig {
    pub trips: u64,
    pub seed: u64,
    /// Probability that an event is delivered twice.
    pub duplicate_rate: f64,
    /// Largest delay between an event's timestamp and its position in its file (ms).
    pub out_of_order_ms: i64,
    /// Probability that a trip carries one anomaly.
    pub anomaly_rate: f64,
    /// Files per stream (read in parallel).
    pub files: usize,
}

/// SplitMix64: deterministic from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Events of one stream with the position they are delivered at.
struct Stream<T> {
    rows: Vec<(i64, u64, T)>,
}

impl<T: Serialize + Clone> Stream<T> {
    fn new() -> Self {
        Stream { rows: Vec::new() }
    }

    /// Deliver `e` (timestamp `ts`) once, or twice with probability `dup`.
    fn push(&mut self, rng: &mut Rng, cfg: &GenConfig, ts: i64, e: T) -> u64 {
        let mut copies = 1;
        if rng.chance(cfg.duplicate_rate) {
            copies = 2;
        }
        for _ in 0..copies {
            let arrival = ts + rng.below(cfg.out_of_order_ms.max(1) as u64) as i64;
            let tiebreak = rng.next();
            self.rows.push((arrival, tiebreak, e.clone()));
        }
        copies - 1
    }

    fn write(mut self, dir: &Path, name: &str, files: usize) -> Result<u64> {
        self.rows.sort_by_key(|r| (r.0, r.1));
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let mut writers = Vec::new();
        for i in 0..files {
            let p = dir.join(format!("part-{i}.jsonl"));
            writers.push(BufWriter::new(
                std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?,
            ));
        }
        let n = self.rows.len() as u64;
        for (i, (_, _, e)) in self.rows.into_iter().enumerate() {
            let w = &mut writers[i % files];
            serde_json::to_writer(&mut *w, &e)?;
            w.write_all(b"\n")?;
        }
        for mut w in writers {
            w.flush()?;
        }
        Ok(n)
    }
}

/// What `generate` wrote.
pub struct Generated {
    pub events: u64,
    pub duplicates: u64,
    pub anomalies: u64,
}

/// 2026-11-01T00:00:00Z: trips spread over the following three days.
const START_MS: i64 = 1_793_491_200_000;
const SPAN_MS: i64 = 3 * DAY_MS;

pub fn generate(cfg: &GenConfig, dir: &Path) -> Result<Generated> {
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng(cfg.seed);
    let (mut charges, mut payments, mut payouts) = (Stream::new(), Stream::new(), Stream::new());
    let mut truth = Vec::new();
    let mut duplicates = 0;
    let riders = cfg.trips / 8 + 1;
    let drivers = cfg.trips / 20 + 1;
    for trip in 0..cfg.trips {
        let t0 = START_MS + (trip as i64) * SPAN_MS / cfg.trips.max(1) as i64;
        let rider = rng.below(riders);
        let driver = rng.below(drivers);
        let amount = 500 + rng.below(9_500) as i64;
        let fee = amount / 5;
        let anomaly = rng.chance(cfg.anomaly_rate).then(|| match rng.below(4) {
            0 => DiscrepancyKind::AmountMismatch,
            1 => DiscrepancyKind::MissingPayment,
            2 => DiscrepancyKind::MissingPayout,
            _ => DiscrepancyKind::DoubleCharge,
        });
        if let Some(kind) = anomaly {
            truth.push(Anomaly {
                trip_id: trip,
                kind,
            });
        }
        let charge = Charge {
            event_id: format!("c-{trip}"),
            trip_id: trip,
            rider_id: rider,
            amount_cents: amount,
            ts: t0,
        };
        duplicates += charges.push(&mut rng, cfg, t0, charge.clone());
        if anomaly == Some(DiscrepancyKind::DoubleCharge) {
            let ts = t0 + rng.below(120_000) as i64;
            let again = Charge {
                event_id: format!("c-{trip}-again"),
                ts,
                ..charge
            };
            duplicates += charges.push(&mut rng, cfg, ts, again);
        }
        if anomaly != Some(DiscrepancyKind::MissingPayment) {
            let ts = t0 + rng.below(300_000) as i64;
            let off = if anomaly == Some(DiscrepancyKind::AmountMismatch) {
                1 + rng.below(500) as i64
            } else {
                0
            };
            let p = Payment {
                event_id: format!("p-{trip}"),
                payment_id: format!("pay_{:016x}", rng.next()),
                trip_id: trip,
                rider_id: rider,
                amount_cents: amount + off,
                ts,
            };
            duplicates += payments.push(&mut rng, cfg, ts, p);
        }
        if anomaly != Some(DiscrepancyKind::MissingPayout) {
            let ts = t0 + rng.below(600_000) as i64;
            let p = Payout {
                event_id: format!("o-{trip}"),
                trip_id: trip,
                driver_id: driver,
                amount_cents: amount - fee,
                fee_cents: fee,
                ts,
            };
            duplicates += payouts.push(&mut rng, cfg, ts, p);
        }
    }
    let mut events = charges.write(dir, "charges", cfg.files)?;
    events += payments.write(dir, "payments", cfg.files)?;
    events += payouts.write(dir, "payouts", cfg.files)?;
    let mut w = BufWriter::new(std::fs::File::create(dir.join("anomalies.jsonl"))?);
    for a in &truth {
        serde_json::to_writer(&mut w, a)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(Generated {
        events,
        duplicates,
        anomalies: truth.len() as u64,
    })
}
