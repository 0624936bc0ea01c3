//! Job metrics through the `metrics` facade, and an optional Prometheus endpoint.
//!
//! The engine records into whatever `metrics` recorder the process installed (none: the
//! calls cost a few loads). [`JobBuilder::prometheus_endpoint`] installs the Prometheus
//! exporter with its HTTP listener (feature `prometheus`).
//!
//! Nothing here runs per record: operators count into the job's [`Metrics`] counters
//! (one relaxed atomic add per batch), and the coordinator publishes their values about
//! once a second, after every checkpoint and when the job ends.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `exactly_counter` | counter | `job`, `operator`, `name` (`records` of a source: records read; `records_in` of a task: records received; `busy_ns` of a task: nanoseconds its operators spent on batches, summed over subtasks, so its rate over the subtasks is how busy they are; and every counter operators register) |
//! | `exactly_task_input_fill_ratio` | gauge | `job`, `operator`, `subtask` (batches queued on the task's inputs over their capacity: near 1, the task holds its inputs back, which is backpressure) |
//! | `exactly_task_watermark_lag_seconds` | gauge | `job`, `operator`, `subtask` (the clock's time minus the task's event time, once it has one) |
//! | `exactly_source_backlog_records` | gauge | `job`, `operator`, `subtask` (records of the subtask's splits not read yet, for sources that know, e.g. Kafka's consumer lag) |
//! | `exactly_checkpoints_completed_total` | counter | `job` |
//! | `exactly_checkpoints_aborted_total` | counter | `job` |
//! | `exactly_restarts_total` | counter | `job` |
//! | `exactly_checkpoint_duration_seconds` | histogram | `job` (trigger to last acknowledgement) |
//! | `exactly_checkpoint_end_to_end_seconds` | histogram | `job` (trigger to output committed) |
//! | `exactly_checkpoint_sync_pause_seconds` | histogram | `job` (longest task pause) |
//! | `exactly_checkpoint_alignment_seconds` | histogram | `job` (longest barrier alignment) |
//! | `exactly_checkpoint_sink_wait_seconds` | histogram | `job` (longest wait of a sink for uploads at the barrier) |
//! | `exactly_checkpoint_last_id` | gauge | `job` |
//! | `exactly_checkpoint_state_bytes` | gauge | `job` |
//! | `exactly_checkpoint_uploaded_bytes` | gauge | `job` |
//! | `exactly_operator_state_bytes` | gauge | `job`, `operator` |
//!
//! [`JobBuilder::prometheus_endpoint`]: crate::dsl::JobBuilder::prometheus_endpoint
//! [`Metrics`]: crate::metrics::Metrics

use crate::report::CheckpointStats;
use ::metrics::{counter, gauge, histogram};
use std::collections::BTreeMap;

/// Publish every counter's current value.
pub(crate) fn counters(job: &str, values: &BTreeMap<String, u64>) {
    for (key, value) in values {
        let (operator, name) = key.split_once('.').unwrap_or(("", key));
        counter!(
            "exactly_counter",
            "job" => job.to_string(),
            "operator" => operator.to_string(),
            "name" => name.to_string()
        )
        .absolute(*value);
    }
}

/// Publish the engine's gauges.
pub(crate) fn gauges(job: &str, metrics: &crate::metrics::Metrics) {
    for ((operator, name, subtask), value) in metrics.gauges() {
        let labels = [
            ("job", job.to_string()),
            ("operator", operator),
            ("subtask", subtask.to_string()),
        ];
        match name.as_str() {
            INPUT_FILL_PERMILLE => {
                gauge!("exactly_task_input_fill_ratio", &labels).set(value as f64 / 1000.0)
            }
            WATERMARK_LAG_MS => {
                gauge!("exactly_task_watermark_lag_seconds", &labels).set(value as f64 / 1000.0)
            }
            SOURCE_BACKLOG => gauge!("exactly_source_backlog_records", &labels).set(value as f64),
            _ => {}
        }
    }
}

/// Gauge of an input task: batches queued over capacity, in thousandths.
pub(crate) const INPUT_FILL_PERMILLE: &str = "input_fill_permille";
/// Gauge of an input task: clock time minus its event time, in milliseconds.
pub(crate) const WATERMARK_LAG_MS: &str = "watermark_lag_ms";
/// Gauge of a source task: records of its splits not read yet, where its readers know.
pub(crate) const SOURCE_BACKLOG: &str = "source_backlog_records";
/// Counter of an input task: the most batches it held read ahead on one input while
/// capturing records in flight (summed over its subtasks; at most the channel capacity
/// each).
pub(crate) const READ_AHEAD_PEAK: &str = "read_ahead_peak_batches";
/// Counter of an input task: nanoseconds its operators spent on batches.
pub(crate) const BUSY_NS: &str = "busy_ns";

/// A checkpoint completed and its output was committed.
pub(crate) fn checkpoint_completed(job: &str, c: &CheckpointStats) {
    let job = job.to_string();
    counter!("exactly_checkpoints_completed_total", "job" => job.clone()).increment(1);
    histogram!("exactly_checkpoint_duration_seconds", "job" => job.clone())
        .record(c.duration.as_secs_f64());
    histogram!("exactly_checkpoint_end_to_end_seconds", "job" => job.clone())
        .record(c.end_to_end.as_secs_f64());
    histogram!("exactly_checkpoint_sync_pause_seconds", "job" => job.clone())
        .record(c.max_sync_pause.as_secs_f64());
    histogram!("exactly_checkpoint_alignment_seconds", "job" => job.clone())
        .record(c.max_alignment.as_secs_f64());
    histogram!("exactly_checkpoint_sink_wait_seconds", "job" => job.clone())
        .record(c.max_sink_wait.as_secs_f64());
    gauge!("exactly_checkpoint_last_id", "job" => job.clone()).set(c.id.0 as f64);
    gauge!("exactly_checkpoint_state_bytes", "job" => job.clone()).set(c.state_bytes as f64);
    gauge!("exactly_checkpoint_uploaded_bytes", "job" => job.clone()).set(c.uploaded_bytes as f64);
    gauge!("exactly_checkpoint_inflight_bytes", "job" => job.clone()).set(c.inflight_bytes as f64);
    gauge!("exactly_checkpoint_unaligned_tasks", "job" => job.clone())
        .set(c.unaligned_tasks.len() as f64);
    for (op, bytes) in &c.state_bytes_by_operator {
        gauge!("exactly_operator_state_bytes", "job" => job.clone(), "operator" => op.clone())
            .set(*bytes as f64);
    }
}

/// A checkpoint was abandoned.
pub(crate) fn checkpoint_aborted(job: &str) {
    counter!("exactly_checkpoints_aborted_total", "job" => job.to_string()).increment(1);
}

/// The job restarts in-process after a failure.
pub(crate) fn restarted(job: &str) {
    counter!("exactly_restarts_total", "job" => job.to_string()).increment(1);
}

/// Install the Prometheus exporter, serving `/metrics` on `addr`, once per process.
#[cfg(feature = "prometheus")]
pub(crate) fn install_prometheus(addr: std::net::SocketAddr) -> crate::error::Result<()> {
    use std::sync::Mutex;
    static INSTALLED: Mutex<Option<std::net::SocketAddr>> = Mutex::new(None);
    let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    match *installed {
        Some(a) if a == addr => return Ok(()),
        Some(a) => {
            return Err(crate::error::Error::config(format!(
                "the Prometheus endpoint of this process is already on {a}; one process serves \
                 one endpoint for all its jobs (give every job the same address)"
            )))
        }
        None => {}
    }
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| crate::error::Error::config(format!("Prometheus endpoint on {addr}: {e}")))?;
    *installed = Some(addr);
    Ok(())
}
