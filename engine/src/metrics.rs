//! Counters that operators register when they open, reported in the job report.
//!
//! Counters count work done, including work repeated after a restart (records replayed
//! from the restored checkpoint are counted again); they are for observing a job, not
//! for results, which belong in state and sinks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A monotonically increasing count, shared by every parallel instance of an operator.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Add one.
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Add `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (a queue's fill, a lag), one per parallel instance.
#[derive(Debug, Clone, Default)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    /// Set the value.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What identifies a gauge: operator (task), name, subtask.
pub type GaugeKey = (String, String, usize);

/// All counters of a job, by `operator.name`, and the engine's gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<String, Counter>>,
    gauges: Mutex<BTreeMap<GaugeKey, Gauge>>,
}

impl Metrics {
    /// The counter `name` of `operator`, created on first use.
    pub fn counter(&self, operator: &str, name: &str) -> Counter {
        let mut m = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(format!("{operator}.{name}")).or_default().clone()
    }

    /// Every counter's current value.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        let m = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.get())).collect()
    }

    /// The gauge `name` of `operator`'s instance `subtask`, created on first use.
    pub(crate) fn gauge(&self, operator: &str, name: &str, subtask: usize) -> Gauge {
        let mut m = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((operator.to_string(), name.to_string(), subtask))
            .or_default()
            .clone()
    }

    /// Every gauge's current value.
    pub fn gauges(&self) -> BTreeMap<GaugeKey, u64> {
        let m = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.get())).collect()
    }
}

/// What a function sees when its operator instance opens.
pub struct OpenContext<'a> {
    pub(crate) operator: &'a str,
    pub(crate) metrics: &'a Metrics,
}

impl<'a> OpenContext<'a> {
    /// A context for `operator` registering into `metrics` (for test harnesses).
    pub fn new(operator: &'a str, metrics: &'a Metrics) -> Self {
        OpenContext { operator, metrics }
    }

    /// A counter of this operator, summed over its parallel instances.
    pub fn counter(&self, name: &str) -> Counter {
        self.metrics.counter(self.operator, name)
    }
}
