//! A source that reads the first half of its payments, then waits at a gate until
//! the test opens it: a job that is certainly mid-run, without sleeping.

use exactly::prelude::*;
use std::sync::{Arc, Condvar, Mutex};

/// Reads `(account, amount)` payments from one split: the first `half` at once, then
/// waits at a gate (reporting that it got there) until the test opens it.
#[derive(Clone)]
pub struct GatedSource {
    payments: Arc<Vec<(u32, i64)>>,
    half: u64,
    /// 0: before the gate, 1: waiting at it, 2: open.
    gate: Arc<(Mutex<u8>, Condvar)>,
}

pub struct GatedReader {
    s: GatedSource,
    next: u64,
}

impl Source for GatedSource {
    type Item = (u32, i64);
    type Offset = u64;
    type Reader = GatedReader;
    fn splits(&self) -> exactly::engine::error::Result<Vec<String>> {
        Ok(vec!["0".into()])
    }
    fn open(
        &self,
        _split: &str,
        from: Option<u64>,
        _ctx: &SourceContext,
    ) -> exactly::engine::error::Result<GatedReader> {
        Ok(GatedReader {
            s: self.clone(),
            next: from.unwrap_or(0),
        })
    }
}

impl SourceReader for GatedReader {
    type Item = (u32, i64);
    type Offset = u64;
    fn poll_batch(
        &mut self,
        out: &mut Vec<(u32, i64)>,
        max: usize,
    ) -> exactly::engine::error::Result<SourcePoll> {
        if self.next == self.s.half {
            let (lock, cv) = &*self.s.gate;
            let mut g = lock.lock().unwrap();
            if *g == 0 {
                *g = 1;
                cv.notify_all();
            }
            if *g < 2 {
                return Ok(SourcePoll::Idle);
            }
        }
        let end = if self.next < self.s.half {
            self.s.half
        } else {
            self.s.payments.len() as u64
        };
        if self.next == end {
            return Ok(SourcePoll::End);
        }
        let to = end.min(self.next + max as u64);
        out.extend_from_slice(&self.s.payments[self.next as usize..to as usize]);
        self.next = to;
        Ok(SourcePoll::Ready)
    }
    fn offset(&self) -> u64 {
        self.next
    }
}

pub fn gated(payments: &[(u32, i64)]) -> (GatedSource, Arc<(Mutex<u8>, Condvar)>) {
    gated_at(payments, payments.len() as u64 / 2)
}

/// [`gated`] with the gate after the first `at` payments (`at` = all: the source has
/// read everything but has not ended).
pub fn gated_at(payments: &[(u32, i64)], at: u64) -> (GatedSource, Arc<(Mutex<u8>, Condvar)>) {
    let gate = Arc::new((Mutex::new(0u8), Condvar::new()));
    let source = GatedSource {
        payments: Arc::new(payments.to_vec()),
        half: at,
        gate: gate.clone(),
    };
    (source, gate)
}

pub fn wait_at(gate: &(Mutex<u8>, Condvar)) {
    let (lock, cv) = gate;
    let _reached = cv.wait_while(lock.lock().unwrap(), |g| *g == 0).unwrap();
}

pub fn open(gate: &(Mutex<u8>, Condvar)) {
    let (lock, cv) = gate;
    *lock.lock().unwrap() = 2;
    cv.notify_all();
}

/// Run `job` and stop it with a checkpoint once its gated source waits at `gate`.
pub fn run_stopped_at_gate(job: &Job, gate: &(Mutex<u8>, Condvar)) -> JobReport {
    run_at_gate_then(job, gate, StopHandle::stop).unwrap()
}

/// Run `job` and, once its gated source waits at `gate`, call `then` with its stop
/// handle (from another thread, while the job runs). If `then` panics (a failed
/// assertion), the job is stopped and the panic goes on to the test.
pub fn run_at_gate_then(
    job: &Job,
    gate: &(Mutex<u8>, Condvar),
    then: impl FnOnce(&StopHandle) + Send,
) -> exactly::engine::error::Result<JobReport> {
    let stop = job.stop_handle();
    std::thread::scope(|s| {
        s.spawn(|| {
            wait_at(gate);
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| then(&stop)));
            if let Err(panic) = done {
                stop.stop();
                std::panic::resume_unwind(panic);
            }
        });
        job.run()
    })
}
