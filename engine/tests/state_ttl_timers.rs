//! Keyed state TTL and processing-time timers across restore, through the harness.

use exactly_engine::prelude::*;
use exactly_engine::testing::KeyedHarness;
use std::time::Duration;

const LAST: ValueState<i64> = ValueState::new("last").with_ttl(Duration::from_millis(100));

/// Emits the previous value still alive for the key, then stores the new one.
#[derive(Clone)]
struct Remember;

impl KeyedProcessFunction<u32, i64> for Remember {
    type Out = Option<i64>;
    fn process(
        &mut self,
        v: i64,
        ctx: &mut KeyedContext<'_, u32, Option<i64>>,
    ) -> Result<(), BoxError> {
        let prev = ctx.value(LAST)?;
        ctx.emit(prev);
        ctx.set_value(LAST, &v)?;
        Ok(())
    }
}

#[test]
fn ttl_value_expires_exactly_at_ttl_and_is_cleaned_up() {
    let mut h = KeyedHarness::new(Remember).unwrap();
    h.set_processing_time(1_000).unwrap();
    h.process(1, 10).unwrap(); // written at 1000, expires at 1100
    h.set_processing_time(1_099).unwrap();
    h.process(1, 11).unwrap(); // 1 ms before: still there; rewrite restarts the TTL (expires 1199)
    h.set_processing_time(1_198).unwrap();
    h.process(2, 20).unwrap();
    h.set_processing_time(1_199).unwrap(); // key 1 expired exactly now
    h.process(1, 12).unwrap();
    assert_eq!(h.take_output(), vec![None, Some(10), None, None]);
    // Both keys' values expire by 1300 and their cleanup entries delete them.
    h.set_processing_time(1_300).unwrap();
    assert_eq!(
        h.state_entries(),
        0,
        "expired values are deleted, not just hidden"
    );
}

#[test]
fn ttl_survives_checkpoint_and_restore() {
    let mut h = KeyedHarness::new(Remember).unwrap();
    h.set_processing_time(0).unwrap();
    h.process(7, 1).unwrap();
    h.checkpoint_and_restore(Remember).unwrap();
    h.set_processing_time(50).unwrap();
    h.process(7, 2).unwrap();
    assert_eq!(h.take_output(), vec![None, Some(1)]);
}

/// Emits the key when its processing-time timer fires.
#[derive(Clone)]
struct Reminder;

impl KeyedProcessFunction<u32, i64> for Reminder {
    type Out = (u32, i64);
    fn process(
        &mut self,
        at: i64,
        ctx: &mut KeyedContext<'_, u32, (u32, i64)>,
    ) -> Result<(), BoxError> {
        ctx.register_processing_time_timer(at);
        Ok(())
    }
    fn on_timer(
        &mut self,
        t: Timer,
        ctx: &mut KeyedContext<'_, u32, (u32, i64)>,
    ) -> Result<(), BoxError> {
        assert_eq!(t.domain, TimeDomain::ProcessingTime);
        ctx.emit((*ctx.key(), t.time));
        Ok(())
    }
}

#[test]
fn processing_time_timer_due_while_down_fires_after_restore() {
    let mut h = KeyedHarness::new(Reminder).unwrap();
    h.set_processing_time(500).unwrap();
    h.process(3, 1_000).unwrap();
    h.process(4, 9_000).unwrap();
    // Crash at 500; the job is down until 5000.
    h.checkpoint_and_restore(Reminder).unwrap();
    h.set_processing_time(5_000).unwrap();
    assert_eq!(
        h.take_output(),
        vec![(3, 1_000)],
        "the overdue timer fires once, the future one waits"
    );
    h.set_processing_time(9_000).unwrap();
    assert_eq!(h.take_output(), vec![(4, 9_000)]);
}
