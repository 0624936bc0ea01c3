//! The Prometheus endpoint of a running job: scraped while the job waits mid-input
//! and after it stopped, its figures match what the job did.
#![cfg(feature = "prometheus")]

mod common;

use common::gated::{gated, run_at_gate_then};
use exactly::prelude::*;
use exactly::testing::ManualClock;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The process's one Prometheus endpoint: every job of a process serves on the same
/// address, so the tests here (which a plain `cargo test` runs in one process) share it.
fn endpoint() -> SocketAddr {
    static ADDR: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();
    *ADDR.get_or_init(|| {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("127.0.0.1:{port}").parse().unwrap()
    })
}

/// `GET /metrics`, the body.
fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The value of the sample of `family` whose labels include every one of `labels`.
fn sample(body: &str, family: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn a_running_job_serves_its_metrics_for_prometheus() {
    let addr = endpoint();
    let payments: Vec<(u32, i64)> = (0..10_000).map(|i| (i % 97, i64::from(i))).collect();
    let half = (payments.len() / 2) as f64;
    let dir = tempfile::tempdir().unwrap();
    // The job's clock is held at 65 s; event time is the amount in milliseconds, so it
    // stops at 4,999 ms while the source waits at its gate after half its input.
    let job = Job::builder("ledger")
        .parallelism(2)
        .checkpoint_storage(dir.path().join("checkpoints").to_str().unwrap())
        .clock(ManualClock::new(65_000))
        .prometheus_endpoint(addr)
        .build()
        .unwrap();
    let (source, gate) = gated(&payments);
    const BALANCE: ValueState<i64> = ValueState::new("balance");
    job.source("payments", source)
        .with_watermarks(WatermarkStrategy::monotonic(|p: &(u32, i64)| p.1))
        .key_by(|p| p.0)
        .process_fn(
            |(account, amount), ctx: &mut KeyedContext<'_, u32, (u32, i64)>| {
                let balance = ctx.value(BALANCE)?.unwrap_or(0) + amount;
                ctx.set_value(BALANCE, &balance)?;
                ctx.emit((account, balance));
                Ok(())
            },
        )
        .name("balance")
        .sink("balances", FileSink::exactly_once(dir.path().join("out")));
    let read = [
        "exactly_counter",
        "job=\"ledger\"",
        "operator=\"payments\"",
        "name=\"records\"",
    ];
    let received = ["operator=\"balance\"", "name=\"records_in\""];

    // The source waits at its gate after half its input: the job is running. Counters
    // are published about once a second, so the scrape is repeated until they show it.
    let report = run_at_gate_then(&job, &gate, |stop| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let body = scrape(addr).unwrap_or_default();
            if sample(&body, read[0], &read[1..]) == Some(half) {
                let got = sample(&body, "exactly_counter", &received);
                assert_eq!(got, Some(half), "{body}");
                // The keyed task worked on those records, and its inputs' fill is
                // published per subtask, a ratio.
                let busy = sample(
                    &body,
                    "exactly_counter",
                    &["operator=\"balance\"", "name=\"busy_ns\""],
                );
                assert!(busy.is_some_and(|b| b > 0.0), "{body}");
                for subtask in ["0", "1"] {
                    let fill = sample(
                        &body,
                        "exactly_task_input_fill_ratio",
                        &["operator=\"balance\"", &format!("subtask=\"{subtask}\"")],
                    );
                    assert!(fill.is_some_and(|f| (0.0..=1.0).contains(&f)), "{body}");
                }
                // Watermark lag: the clock's 65 s minus the event time reached (the
                // watermark trails the largest timestamp read, 4,999 ms, by at most a
                // few milliseconds). Gauges are sampled every buffer timeout, so wait
                // for both subtasks' to show.
                let lags: Vec<Option<f64>> = ["0", "1"]
                    .iter()
                    .map(|subtask| {
                        sample(
                            &body,
                            "exactly_task_watermark_lag_seconds",
                            &["operator=\"balance\"", &format!("subtask=\"{subtask}\"")],
                        )
                    })
                    .collect();
                if lags.iter().all(Option::is_some) {
                    for lag in lags.into_iter().flatten() {
                        assert!((59.9..=60.1).contains(&lag), "{body}");
                    }
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no records counter at {half}, or no watermark lag, within 60 s:\n{body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.stop();
    })
    .unwrap();

    // After the stop checkpoint: the checkpoint figures, published when it completed.
    let stopped_at = report.stopped_at.unwrap();
    let body = scrape(addr).expect("the endpoint still serves");
    let job_label = ["job=\"ledger\""];
    assert_eq!(
        sample(&body, "exactly_checkpoint_last_id", &job_label),
        Some(stopped_at.0 as f64),
        "{body}"
    );
    let completed = sample(&body, "exactly_checkpoints_completed_total", &job_label).unwrap();
    assert_eq!(completed, report.checkpoints.len() as f64, "{body}");
    assert!(completed >= 1.0);
    let bytes = sample(&body, "exactly_checkpoint_state_bytes", &job_label).unwrap();
    assert!(bytes > 0.0, "{body}");
    assert!(
        body.contains("exactly_checkpoint_duration_seconds"),
        "the duration family: {body}"
    );
    // A stop checkpoint is always aligned: nothing in flight.
    assert_eq!(
        sample(&body, "exactly_checkpoint_unaligned_tasks", &job_label),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "exactly_checkpoint_inflight_bytes", &job_label),
        Some(0.0),
        "{body}"
    );
    assert_eq!(sample(&body, read[0], &read[1..]), Some(half), "{body}");
}

/// The Kafka source's backlog (its partitions' ends as the consumer last saw them minus
/// the next offsets) is served as `exactly_source_backlog_records`: while a blocked
/// operator holds the job back it shows the records not read yet, and once the job
/// catches up it falls to 0.
#[cfg(feature = "kafka")]
#[test]
fn the_kafka_sources_backlog_is_served() {
    use exactly::sources::rdkafka::config::ClientConfig;
    use exactly::sources::rdkafka::producer::{
        BaseRecord, DefaultProducerContext, Producer, ThreadedProducer,
    };
    use exactly::sources::KafkaSource;
    use std::sync::atomic::{AtomicBool, Ordering};
    static OPEN: AtomicBool = AtomicBool::new(false);
    const N: u64 = 20_000;
    let topic = format!(
        "backlog-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    common::kafka::create_topic(&topic, 2);
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", common::kafka::brokers())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for i in 0..N {
        let payload = i.to_le_bytes();
        let mut record = BaseRecord::<(), _>::to(&topic)
            .partition((i % 2) as i32)
            .payload(&payload[..]);
        while let Err((_, r)) = producer.send(record) {
            std::thread::sleep(Duration::from_millis(2));
            record = r;
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();

    let addr = endpoint();
    let dir = tempfile::tempdir().unwrap();
    let job = Job::builder("backlog")
        .parallelism(2)
        .batch_size(100)
        .channel_capacity(2)
        .checkpoint_storage(dir.path().to_str().unwrap())
        .prometheus_endpoint(addr)
        .build()
        .unwrap();
    let decode = |b: &[u8]| b.try_into().map(u64::from_le_bytes);
    job.source(
        "events",
        KafkaSource::new(&common::kafka::brokers(), &topic, decode),
    )
    .map(|i: u64| {
        while !OPEN.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        i
    })
    .sink("out", exactly::testing::CollectSink::<u64>::new());
    let handle = job.start().unwrap();
    // The backlog summed over the source's subtasks, once every subtask reported one.
    let backlog = || -> Option<f64> {
        let body = scrape(addr)?;
        let values: Vec<f64> = body
            .lines()
            .filter(|l| {
                l.starts_with("exactly_source_backlog_records{")
                    && l.contains("operator=\"events\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (values.len() == 2).then(|| values.iter().sum())
    };
    let wait_for = |what: &str, ok: &dyn Fn(f64) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = backlog();
            if now.is_some_and(ok) {
                return now.unwrap();
            }
            assert!(Instant::now() < deadline, "{what}: backlog {now:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Held back: at most the few batches the channels and the map hold are read.
    let held = wait_for("while held back", &|b| b >= (N - 2_000) as f64);
    assert!(held <= N as f64, "more than the topic holds: {held}");
    OPEN.store(true, Ordering::SeqCst);
    wait_for("after catching up", &|b| b == 0.0);
    handle.stop_with_checkpoint();
    handle.wait().unwrap();
}
