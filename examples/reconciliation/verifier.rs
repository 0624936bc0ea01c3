//! An independent batch recomputation from the raw inputs, without the engine, checked
//! against the job's committed output and the generator's ground truth.

use crate::job::LedgerTable;
use crate::model::*;
use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::BufRead;
use std::path::Path;

/// Every record in the `.jsonl` files of `dir` whose names start with `prefix`.
fn read_all<T: DeserializeOwned>(dir: &Path, prefix: &str) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    names.sort();
    for p in names {
        let f = std::fs::File::open(&p)?;
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line?;
            if !line.trim().is_empty() {
                out.push(
                    serde_json::from_str(&line)
                        .with_context(|| format!("{}:{}", p.display(), i + 1))?,
                );
            }
        }
    }
    Ok(out)
}

/// The verifier's findings.
#[derive(Debug, Default)]
pub struct Report {
    pub trips: usize,
    pub reconciled: usize,
    pub by_kind: BTreeMap<DiscrepancyKind, usize>,
    pub truth_by_kind: BTreeMap<DiscrepancyKind, usize>,
    pub discrepancies_match_truth: bool,
    pub duplicates: usize,
    pub missing: usize,
    pub wrong: usize,
    pub daily_totals_ok: bool,
    pub closing_balances_ok: bool,
    pub ledger_sum_cents: i64,
    pub accounts: usize,
    pub input_duplicates: usize,
    /// The ledger table in PostgreSQL, when checked: rows, duplicated and missing
    /// postings against the recomputed ledger.
    pub ledger_table: Option<TableCheck>,
}

#[derive(Debug, Default)]
pub struct TableCheck {
    pub table: String,
    pub rows: usize,
    pub expected: usize,
    pub extra: usize,
    pub missing: usize,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.duplicates == 0
            && self.missing == 0
            && self.wrong == 0
            && self.discrepancies_match_truth
            && self.daily_totals_ok
            && self.closing_balances_ok
            && self.ledger_sum_cents == 0
            && self
                .ledger_table
                .as_ref()
                .is_none_or(|t| t.extra == 0 && t.missing == 0 && t.rows == t.expected)
    }

    pub fn print(&self) {
        let ok = |b: bool| if b { "ok" } else { "MISMATCH" };
        println!("reconciliation report");
        println!("  trips                      {}", self.trips);
        println!("  reconciled                 {}", self.reconciled);
        for (kind, n) in &self.by_kind {
            let truth = self.truth_by_kind.get(kind).copied().unwrap_or(0);
            println!("  {:<26} {n} (injected {truth})", format!("{kind:?}"));
        }
        println!(
            "  discrepancies = injected   {}",
            ok(self.discrepancies_match_truth)
        );
        println!(
            "  redelivered input events   {} (dropped by dedup)",
            self.input_duplicates
        );
        println!("  ledger accounts            {}", self.accounts);
        println!("  daily totals               {}", ok(self.daily_totals_ok));
        println!(
            "  closing balances           {}",
            ok(self.closing_balances_ok)
        );
        println!(
            "  ledger sum                 {} cents",
            self.ledger_sum_cents
        );
        println!("  duplicates in output       {}", self.duplicates);
        println!("  missing from output        {}", self.missing);
        println!("  wrong results              {}", self.wrong);
        if let Some(t) = &self.ledger_table {
            println!(
                "  PostgreSQL table {:<9} {} rows (expected {}), {} extra, {} missing",
                t.table, t.rows, t.expected, t.extra, t.missing
            );
        }
        println!(
            "{}",
            if self.passed() {
                "VERIFIED"
            } else {
                "VERIFICATION FAILED"
            }
        );
    }
}

fn dedup<T, F: Fn(&T) -> String>(items: Vec<T>, id: F, dups: &mut usize) -> Vec<T> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for x in items {
        if seen.insert(id(&x)) {
            out.push(x);
        } else {
            *dups += 1;
        }
    }
    out
}

/// Recompute everything from `input` and compare with the committed output in `out`.
pub fn verify(input: &Path, out: &Path, ledger: Option<LedgerTable>) -> Result<Report> {
    let mut r = Report::default();
    let charges = dedup(
        read_all::<Charge>(&input.join("charges"), "part-")?,
        |c| c.event_id.clone(),
        &mut r.input_duplicates,
    );
    let payments = dedup(
        read_all::<Payment>(&input.join("payments"), "part-")?,
        |p| p.event_id.clone(),
        &mut r.input_duplicates,
    );
    let payouts = dedup(
        read_all::<Payout>(&input.join("payouts"), "part-")?,
        |p| p.event_id.clone(),
        &mut r.input_duplicates,
    );

    // Per trip, in plain batch code: charge amounts, paid, (paid out, fee).
    type Collected = (Vec<i64>, Option<i64>, Option<(i64, i64)>);
    let mut trips: BTreeMap<u64, Collected> = BTreeMap::new();
    for c in &charges {
        trips.entry(c.trip_id).or_default().0.push(c.amount_cents);
    }
    for p in &payments {
        let t = trips.entry(p.trip_id).or_default();
        t.1 = Some(t.1.unwrap_or(0) + p.amount_cents);
    }
    for p in &payouts {
        let t = trips.entry(p.trip_id).or_default();
        let (a, f) = t.2.unwrap_or((0, 0));
        t.2 = Some((a + p.amount_cents, f + p.fee_cents));
    }
    let expected: BTreeMap<u64, TripResult> = trips
        .iter()
        .map(|(&id, (c, p, o))| (id, decide(id, c, *p, *o)))
        .collect();
    r.trips = expected.len();

    let got: Vec<TripResult> = read_all(&out.join("results"), "part-")?;
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for res in &got {
        *seen.entry(res.trip_id()).or_default() += 1;
        if expected.get(&res.trip_id()) != Some(res) {
            r.wrong += 1;
        }
        match res {
            TripResult::Reconciled { .. } => r.reconciled += 1,
            TripResult::Discrepancy { kind, .. } => *r.by_kind.entry(*kind).or_default() += 1,
        }
    }
    r.duplicates = seen.values().filter(|&&n| n > 1).map(|n| n - 1).sum();
    r.missing = expected.keys().filter(|t| !seen.contains_key(t)).count();

    // Discrepancies must be exactly what the generator injected.
    let truth: Vec<Anomaly> = read_all(input, "anomalies")?;
    for a in &truth {
        *r.truth_by_kind.entry(a.kind).or_default() += 1;
    }
    let found: BTreeSet<(u64, DiscrepancyKind)> = got
        .iter()
        .filter_map(|res| match res {
            TripResult::Discrepancy { trip_id, kind, .. } => Some((*trip_id, *kind)),
            _ => None,
        })
        .collect();
    let injected: BTreeSet<(u64, DiscrepancyKind)> =
        truth.iter().map(|a| (a.trip_id, a.kind)).collect();
    r.discrepancies_match_truth = found == injected;

    // The ledger, from the same deduplicated events.
    let mut postings = Vec::new();
    postings.extend(
        charges
            .into_iter()
            .flat_map(|c| TripEvent::Charge(c).postings()),
    );
    postings.extend(
        payments
            .into_iter()
            .flat_map(|p| TripEvent::Payment(p).postings()),
    );
    postings.extend(
        payouts
            .into_iter()
            .flat_map(|p| TripEvent::Payout(p).postings()),
    );
    if let Some(t) = ledger {
        r.ledger_table = Some(check_table(&t, &postings)?);
    }
    let mut daily: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for p in &postings {
        *daily.entry((p.account.clone(), day_of(p.ts))).or_default() += p.amount_cents;
    }
    let expected_daily: BTreeSet<DailyTotal> = daily
        .iter()
        .map(|((account, day), net)| DailyTotal {
            account: account.clone(),
            day_start: *day,
            net_cents: *net,
        })
        .collect();
    let got_daily: Vec<DailyTotal> = read_all(&out.join("daily-totals"), "part-")?;
    r.daily_totals_ok = got_daily.len() == expected_daily.len()
        && got_daily.iter().cloned().collect::<BTreeSet<_>>() == expected_daily;

    let mut balance: BTreeMap<String, i64> = BTreeMap::new();
    let mut expected_closing = BTreeSet::new();
    for ((account, day), net) in &daily {
        let b = balance.entry(account.clone()).or_default();
        *b += net;
        expected_closing.insert(ClosingBalance {
            account: account.clone(),
            day_start: *day,
            balance_cents: *b,
        });
    }
    let got_closing: Vec<ClosingBalance> = read_all(&out.join("balances"), "part-")?;
    r.closing_balances_ok = got_closing.len() == expected_closing.len()
        && got_closing.iter().cloned().collect::<BTreeSet<_>>() == expected_closing;
    // Double entry: the final balances of all accounts, as committed, sum to zero.
    let mut last: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for c in &got_closing {
        let e = last.entry(c.account.as_str()).or_insert((i64::MIN, 0));
        if c.day_start > e.0 {
            *e = (c.day_start, c.balance_cents);
        }
    }
    r.accounts = last.len();
    r.ledger_sum_cents = last.values().map(|v| v.1).sum();
    Ok(r)
}

/// Every row of the ledger table: account, amount, event time.
#[cfg(feature = "postgres")]
fn table_rows(t: &LedgerTable) -> Result<Vec<(String, i64, i64)>> {
    use exactly::sinks::postgres::client::{Client, NoTls};
    let mut c = Client::connect(&t.url, NoTls)?;
    let rows = c.query(
        &format!("SELECT account, amount_cents, ts FROM {}", t.table),
        &[],
    )?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Without the feature `--ledger-postgres` is refused when the flags are read.
#[cfg(not(feature = "postgres"))]
fn table_rows(_: &LedgerTable) -> Result<Vec<(String, i64, i64)>> {
    unreachable!("--ledger-postgres is refused without the postgres feature")
}

/// Compare the ledger table with the recomputed postings, as multisets.
fn check_table(t: &LedgerTable, postings: &[Posting]) -> Result<TableCheck> {
    let rows = table_rows(t)?;
    let mut got: BTreeMap<(String, i64, i64), i64> = BTreeMap::new();
    for row in &rows {
        *got.entry(row.clone()).or_default() += 1;
    }
    let mut want: BTreeMap<(String, i64, i64), i64> = BTreeMap::new();
    for p in postings {
        *want
            .entry((p.account.clone(), p.amount_cents, p.ts))
            .or_default() += 1;
    }
    let (mut extra, mut missing) = (0, 0);
    for (k, n) in &got {
        let w = want.get(k).copied().unwrap_or(0);
        extra += (n - w).max(0) as usize;
    }
    for (k, w) in &want {
        let n = got.get(k).copied().unwrap_or(0);
        missing += (w - n).max(0) as usize;
    }
    Ok(TableCheck {
        table: t.table.clone(),
        rows: rows.len(),
        expected: postings.len(),
        extra,
        missing,
    })
}

/// The committed records of topics `<prefix><name>` for each of `names`, as a
/// `read_committed` consumer reads them up to each partition's last stable offset, into
/// `out/<name>/part-kafka.jsonl` (one record a line): the verifier then reads them like
/// the file sink's part files.
#[cfg(feature = "kafka")]
pub fn read_committed_topics(k: &crate::job::KafkaIo, names: &[&str], out: &Path) -> Result<()> {
    use exactly::sources::rdkafka::config::ClientConfig;
    use exactly::sources::rdkafka::consumer::{BaseConsumer, Consumer};
    use exactly::sources::rdkafka::message::Message;
    use exactly::sources::rdkafka::{Offset, TopicPartitionList};
    use std::io::Write;
    use std::time::{Duration, Instant};
    const TIMEOUT: Duration = Duration::from_secs(10);
    for name in names {
        let topic = k.topic(name);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &k.brokers)
            .set("group.id", "reconciliation-verify")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()?;
        let md = consumer.fetch_metadata(Some(&topic), TIMEOUT)?;
        let partitions = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
        if partitions == 0 {
            anyhow::bail!("topic {topic} does not exist on {}", k.brokers);
        }
        let mut tpl = TopicPartitionList::new();
        let mut ends = Vec::new();
        for p in 0..partitions {
            // Asked as a read_committed client: the last stable offset.
            ends.push(consumer.fetch_watermarks(&topic, p, TIMEOUT)?.1);
            tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let dir = out.join(name);
        std::fs::create_dir_all(&dir)?;
        let mut w = std::io::BufWriter::new(std::fs::File::create(dir.join("part-kafka.jsonl"))?);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let positions = consumer.position()?;
            let behind = (0..partitions).find(|&p| {
                let at = match positions.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                };
                at < ends[p as usize]
            });
            let Some(p) = behind else {
                break;
            };
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{topic} partition {p}: not read to its last stable offset {} in two minutes",
                    ends[p as usize]
                );
            }
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m?;
                w.write_all(m.payload().unwrap_or_default())?;
                w.write_all(b"\n")?;
            }
        }
        w.flush()?;
    }
    Ok(())
}
