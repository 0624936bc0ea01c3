//! A completed checkpoint's state read back with the job's own types (`StateReader`):
//! value state per key, map entries and a non-keyed operator's entries equal what the
//! job computed; a handle of another type is refused naming both.

use exactly_engine::inspect::StateReader;
use exactly_engine::prelude::*;
use exactly_engine::storage::CheckpointStorage;
use exactly_engine::testing::{CollectSink, VecSource};
use std::collections::BTreeMap;

const BALANCE: ValueState<i64> = ValueState::new("balance");
const BY_SIGN: MapState<String, u64> = MapState::new("by-sign");
/// Payments per account, with a time-to-live (its values carry an expiry).
const PAYMENTS: ValueState<u64> =
    ValueState::new("payments").with_ttl(std::time::Duration::from_secs(86_400));

/// Counts records per instance; its state is the count.
#[derive(Clone, Default)]
struct Count(u64);

impl Operator<(u32, i64)> for Count {
    type Out = (u32, i64);
    type State = u64;
    fn open(
        &mut self,
        restored: Vec<u64>,
        _: &mut OperatorContext<'_, (u32, i64)>,
    ) -> Result<(), BoxError> {
        self.0 = restored.iter().sum();
        Ok(())
    }
    fn process(
        &mut self,
        r: (u32, i64),
        ctx: &mut OperatorContext<'_, (u32, i64)>,
    ) -> Result<(), BoxError> {
        self.0 += 1;
        ctx.emit(r);
        Ok(())
    }
    fn snapshot(&mut self, _: CheckpointId) -> Result<Vec<u64>, BoxError> {
        Ok(vec![self.0])
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

#[test]
fn a_checkpoints_state_reads_back_with_the_jobs_types() {
    read_back(StateBackend::Memory);
}

#[cfg(feature = "rocksdb")]
#[test]
fn a_rocksdb_checkpoints_state_reads_back_with_the_jobs_types() {
    read_back(StateBackend::rocksdb());
}

fn read_back(backend: StateBackend) {
    let input: Vec<(u32, i64)> = (0..5_000i64)
        .map(|i| ((i % 97) as u32, i % 13 - 6))
        .collect();
    let storage = CheckpointStorage::in_memory();
    let job = Job::builder("inspect")
        .checkpoint_storage_instance(storage.clone())
        .state_backend(backend)
        .parallelism(2)
        .build()
        .unwrap();
    job.source("payments", VecSource::new(input.clone()).with_splits(3))
        .transform(Count::default())
        .name("count")
        .key_by(|p| p.0)
        .process_fn(|(a, c): (u32, i64), ctx: &mut KeyedContext<'_, u32, i64>| {
            let b = ctx.value(BALANCE)?.unwrap_or(0) + c;
            ctx.set_value(BALANCE, &b)?;
            let sign = if c < 0 { "debit" } else { "credit" }.to_string();
            let n = ctx.map_get(BY_SIGN, &sign)?.unwrap_or(0) + 1;
            ctx.map_put(BY_SIGN, &sign, &n)?;
            let p = ctx.value(PAYMENTS)?.unwrap_or(0) + 1;
            ctx.set_value(PAYMENTS, &p)?;
            ctx.emit(b);
            let _ = a;
            Ok(())
        })
        .name("balance")
        .sink("out", CollectSink::new());
    job.run().unwrap();

    let mut balances: BTreeMap<u32, i64> = BTreeMap::new();
    let mut signs: BTreeMap<(u32, String), u64> = BTreeMap::new();
    let mut payments: BTreeMap<u32, u64> = BTreeMap::new();
    for &(a, c) in &input {
        *balances.entry(a).or_default() += c;
        *payments.entry(a).or_default() += 1;
        let sign = if c < 0 { "debit" } else { "credit" };
        *signs.entry((a, sign.to_string())).or_default() += 1;
    }

    let reader = rt().block_on(StateReader::latest(&storage)).unwrap();
    assert_eq!(reader.job(), "inspect");
    let got: BTreeMap<u32, i64> = reader
        .values::<u32, i64>("balance", BALANCE)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(got, balances);
    let got: BTreeMap<(u32, String), u64> = reader
        .map_entries::<u32, String, u64>("balance", BY_SIGN)
        .unwrap()
        .into_iter()
        .map(|(a, s, n)| ((a, s), n))
        .collect();
    assert_eq!(got, signs);
    let got: BTreeMap<u32, u64> = reader
        .values::<u32, u64>("balance", PAYMENTS)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(got, payments, "values of a state with a time-to-live");
    let counts = reader.operator_entries::<u64>("count", 1).unwrap();
    assert_eq!(counts.len(), 2, "one entry per instance");
    assert_eq!(counts.iter().sum::<u64>(), input.len() as u64);

    // Another type than the job's is refused, naming both.
    let err = reader
        .values::<u32, u64>("balance", ValueState::<u64>::new("balance"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ValueState<i64> keyed by u32")
            && err.contains("ValueState<u64> keyed by u32"),
        "{err}"
    );
    let err = reader
        .values::<u64, i64>("balance", BALANCE)
        .unwrap_err()
        .to_string();
    assert!(err.contains("keyed by u64"), "{err}");
    let err = reader
        .operator_entries::<i32>("count", 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("OperatorState<u64>") && err.contains("OperatorState<i32>"),
        "{err}"
    );
    let err = reader
        .values::<u32, i64>("balance", ValueState::new("balanse"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no state 'balanse'") && err.contains("balance"),
        "{err}"
    );
    let err = reader
        .values::<u32, i64>("nope", BALANCE)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no state of operator 'nope'"), "{err}");
}
