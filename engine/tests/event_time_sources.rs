//! Source-side event time: bad timestamps are reported, stalls are detected, and an
//! idle source stops holding event time back only when idleness is configured.

use exactly_engine::prelude::*;
use exactly_engine::testing::{CollectSink, ManualClock, VecSource};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const COUNT: ValueState<u64> = ValueState::new("count");

/// Counts records per key and emits the count when the watermark passes `ts + 100`.
#[derive(Clone)]
struct CountUntil;

impl KeyedProcessFunction<u8, (u8, i64)> for CountUntil {
    type Out = (u8, u64);
    fn process(
        &mut self,
        e: (u8, i64),
        ctx: &mut KeyedContext<'_, u8, (u8, u64)>,
    ) -> Result<(), BoxError> {
        let n = ctx.value(COUNT)?.unwrap_or(0) + 1;
        ctx.set_value(COUNT, &n)?;
        ctx.register_event_time_timer(e.1 + 100);
        Ok(())
    }
    fn on_timer(
        &mut self,
        _: Timer,
        ctx: &mut KeyedContext<'_, u8, (u8, u64)>,
    ) -> Result<(), BoxError> {
        if let Some(n) = ctx.value(COUNT)? {
            ctx.emit((*ctx.key(), n));
            ctx.clear_value(COUNT);
        }
        Ok(())
    }
}

#[test]
fn negative_and_far_future_timestamps_are_counted_and_stalls_detected() {
    let future = exactly_engine::time::SystemClock.now_ms() + 10 * 24 * 3600 * 1000;
    let mut data: Vec<(u8, i64)> = (0..5_000).map(|_| (1, 42)).collect();
    data.push((1, -5));
    data.push((1, -6));
    data.push((1, future));
    let job = Job::builder("bad-ts")
        .checkpoint_storage("memory://")
        .parallelism(1)
        .batch_size(16)
        .source_pacing(Duration::from_millis(1))
        .build()
        .unwrap();
    job.source("src", VecSource::new(data))
        .with_watermarks(
            WatermarkStrategy::monotonic(|e: &(u8, i64)| e.1)
                .with_stall_warning(Duration::from_millis(20)),
        )
        .key_by(|e| e.0)
        .process(CountUntil)
        .name("count-until")
        .sink("out", CollectSink::new());
    let report = job.run().unwrap();
    assert_eq!(report.metrics["src.negative_timestamps"], 2);
    assert_eq!(report.metrics["src.future_timestamp_batches"], 1);
    assert!(
        report.metrics["src.watermark_stalls"] >= 1,
        "5000 records with one timestamp must be reported as a stalled watermark: {:?}",
        report.metrics
    );
}

/// One record at ts 0, then idle until released, then done.
struct Quiet(Arc<AtomicBool>);
struct QuietReader(Arc<AtomicBool>, u64);

impl Source for Quiet {
    type Item = (u8, i64);
    type Offset = u64;
    type Reader = QuietReader;
    fn splits(&self) -> exactly_engine::error::Result<Vec<String>> {
        Ok(vec!["only".into()])
    }
    fn open(
        &self,
        _: &str,
        from: Option<u64>,
        _: &SourceContext,
    ) -> exactly_engine::error::Result<QuietReader> {
        Ok(QuietReader(self.0.clone(), from.unwrap_or(0)))
    }
}

impl SourceReader for QuietReader {
    type Item = (u8, i64);
    type Offset = u64;
    fn poll_batch(
        &mut self,
        out: &mut Vec<(u8, i64)>,
        _: usize,
    ) -> exactly_engine::error::Result<SourcePoll> {
        if self.1 == 0 {
            self.1 = 1;
            out.push((9, 0));
            return Ok(SourcePoll::Ready);
        }
        Ok(if self.0.load(Ordering::SeqCst) {
            SourcePoll::End
        } else {
            SourcePoll::Idle
        })
    }
    fn offset(&self) -> u64 {
        self.1
    }
}

/// Runs busy + quiet sources on a manual clock; returns how many results were committed
/// while the quiet source was still idle, and the final output. Once both sources have
/// read what they have, the clock moves 1 s past the idleness timeout and checkpoints
/// are taken until results are committed (at most 20): with idleness they come, without
/// it none may.
fn run_with_quiet_source(idleness: Option<Duration>) -> (usize, Vec<(u8, u64)>) {
    let release = Arc::new(AtomicBool::new(false));
    let sink = CollectSink::new();
    let clock = ManualClock::new(0);
    let job = Job::builder("idle")
        .checkpoint_storage("memory://")
        .clock(clock.clone())
        .parallelism(1)
        .build()
        .unwrap();
    let busy: Vec<(u8, i64)> = (0..1_000).map(|i| ((i % 3) as u8, i * 10)).collect();
    let busy = job
        .source("busy", VecSource::new(busy))
        .with_watermarks(WatermarkStrategy::monotonic(|e: &(u8, i64)| e.1));
    let mut quiet_wm = WatermarkStrategy::monotonic(|e: &(u8, i64)| e.1);
    if let Some(d) = idleness {
        quiet_wm = quiet_wm.with_idleness(d);
    }
    let quiet = job
        .source("quiet", Quiet(release.clone()))
        .with_watermarks(quiet_wm);
    busy.union(&quiet)
        .key_by(|e| e.0)
        .process(CountUntil)
        .name("count-until")
        .sink("out", sink.clone());
    let handle = job.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while handle.metrics().get("count-until.records_in") != Some(&1_001) {
        assert!(Instant::now() < deadline, "{:?}", handle.metrics());
        std::thread::sleep(Duration::from_millis(2));
    }
    clock.advance(idleness.unwrap_or_default() + Duration::from_secs(1));
    for _ in 0..20 {
        handle.checkpoint().unwrap();
        if !sink.committed().is_empty() {
            break;
        }
    }
    let while_idle = sink.committed().len();
    release.store(true, Ordering::SeqCst);
    handle.wait().unwrap();
    (while_idle, sink.sorted())
}

#[test]
fn idle_source_does_not_hold_back_event_time_with_idleness() {
    let (while_idle, all) = run_with_quiet_source(Some(Duration::from_millis(50)));
    assert!(
        while_idle > 0,
        "results must be committed while the quiet source idles"
    );
    let (control_while_idle, control_all) = run_with_quiet_source(None);
    assert_eq!(
        control_while_idle, 0,
        "without idleness the quiet source holds event time at its one record"
    );
    assert_eq!(
        all, control_all,
        "idleness changes when results come, not what they are"
    );
    assert_eq!(all.iter().map(|r| r.1).sum::<u64>(), 1_001);
}
