//! The records of the reconciliation job, shared by generator, job and verifier.

use serde::{Deserialize, Serialize};

/// What a rider was charged for a trip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub event_id: String,
    pub trip_id: u64,
    pub rider_id: u64,
    pub amount_cents: i64,
    pub ts: i64,
}

/// What the payment provider settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub event_id: String,
    pub payment_id: String,
    pub trip_id: u64,
    pub rider_id: u64,
    pub amount_cents: i64,
    pub ts: i64,
}

/// What the driver was paid, and the platform's fee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payout {
    pub event_id: String,
    pub trip_id: u64,
    pub driver_id: u64,
    pub amount_cents: i64,
    pub fee_cents: i64,
    pub ts: i64,
}

/// Any of the three, keyed by trip.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TripEvent {
    Charge(Charge),
    Payment(Payment),
    Payout(Payout),
}

impl TripEvent {
    pub fn trip_id(&self) -> u64 {
        match self {
            TripEvent::Charge(c) => c.trip_id,
            TripEvent::Payment(p) => p.trip_id,
            TripEvent::Payout(p) => p.trip_id,
        }
    }

    pub fn ts(&self) -> i64 {
        match self {
            TripEvent::Charge(c) => c.ts,
            TripEvent::Payment(p) => p.ts,
            TripEvent::Payout(p) => p.ts,
        }
    }

    /// Double-entry postings: every event moves money between two accounts, so all
    /// balances together always sum to zero.
    pub fn postings(&self) -> Vec<Posting> {
        let p = |account: String, amount_cents: i64, ts: i64| Posting {
            account,
            amount_cents,
            ts,
        };
        match self {
            TripEvent::Charge(c) => vec![
                p(format!("rider:{}", c.rider_id), -c.amount_cents, c.ts),
                p("platform:receivable".into(), c.amount_cents, c.ts),
            ],
            TripEvent::Payment(x) => vec![
                p("platform:receivable".into(), -x.amount_cents, x.ts),
                p("platform:cash".into(), x.amount_cents, x.ts),
            ],
            TripEvent::Payout(x) => vec![
                p(
                    "platform:cash".into(),
                    -(x.amount_cents + x.fee_cents),
                    x.ts,
                ),
                p(format!("driver:{}", x.driver_id), x.amount_cents, x.ts),
                p("platform:fees".into(), x.fee_cents, x.ts),
            ],
        }
    }
}

/// One side of a ledger movement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    pub account: String,
    pub amount_cents: i64,
    pub ts: i64,
}

/// The kinds of discrepancy the job detects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DiscrepancyKind {
    /// Charge, payment and payout plus fee do not agree.
    AmountMismatch,
    /// No payment within the deadline.
    MissingPayment,
    /// No payout within the deadline.
    MissingPayout,
    /// Two distinct charge events for one trip.
    DoubleCharge,
}

/// The job's verdict on one trip.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "status")]
pub enum TripResult {
    Reconciled {
        trip_id: u64,
        amount_cents: i64,
    },
    Discrepancy {
        trip_id: u64,
        kind: DiscrepancyKind,
        charged_cents: i64,
        paid_cents: Option<i64>,
        paid_out_cents: Option<i64>,
    },
}

impl TripResult {
    pub fn trip_id(&self) -> u64 {
        match self {
            TripResult::Reconciled { trip_id, .. } | TripResult::Discrepancy { trip_id, .. } => {
                *trip_id
            }
        }
    }
}

/// What the generator injected into one trip.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Anomaly {
    pub trip_id: u64,
    pub kind: DiscrepancyKind,
}

/// Net movement of one account during one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DailyTotal {
    pub account: String,
    pub day_start: i64,
    pub net_cents: i64,
}

/// An account's balance at the end of a day in which it moved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClosingBalance {
    pub account: String,
    pub day_start: i64,
    pub balance_cents: i64,
}

pub const DAY_MS: i64 = 24 * 3600 * 1000;

/// The start of the UTC day containing `ts`.
pub fn day_of(ts: i64) -> i64 {
    ts - ts.rem_euclid(DAY_MS)
}

/// A trip is decided this long (event time) after its earliest event.
pub const DEADLINE_MS: i64 = 3600 * 1000;

/// The verdict for a trip's deduplicated events. The job and the verifier both apply
/// these rules; the verifier's code path to get here shares nothing else with the job.
pub fn decide(
    trip_id: u64,
    charges: &[i64],
    payment: Option<i64>,
    payout: Option<(i64, i64)>,
) -> TripResult {
    let charged = charges.first().copied().unwrap_or(0);
    let discrepancy = |kind| TripResult::Discrepancy {
        trip_id,
        kind,
        charged_cents: charges.iter().sum(),
        paid_cents: payment,
        paid_out_cents: payout.map(|p| p.0 + p.1),
    };
    if charges.len() > 1 {
        return discrepancy(DiscrepancyKind::DoubleCharge);
    }
    let Some(paid) = payment else {
        return discrepancy(DiscrepancyKind::MissingPayment);
    };
    let Some((amount, fee)) = payout else {
        return discrepancy(DiscrepancyKind::MissingPayout);
    };
    if charges.is_empty() || charged != paid || paid != amount + fee {
        return discrepancy(DiscrepancyKind::AmountMismatch);
    }
    TripResult::Reconciled {
        trip_id,
        amount_cents: charged,
    }
}
