//! Named fault-injection points at the steps of the checkpoint protocol.
//!
//! With the `failpoints` feature, each point can be made to crash the process (abort,
//! no unwinding, like `kill -9`) at its n-th hit; without it they compile to nothing.
//! The chaos suite crashes the reconciliation job at every point and checks that the
//! restarted job still commits exactly the failure-free output.

/// Every point, in protocol order.
pub const ALL: &[&str] = &[
    AFTER_BARRIER_INJECTION,
    AFTER_SNAPSHOT,
    AFTER_STATE_UPLOAD,
    AFTER_PRE_COMMIT,
    AFTER_MANIFEST,
    BETWEEN_COMMITS,
    DURING_RETENTION,
    DURING_RESTORE,
];

/// A source emitted barrier `n` downstream but has not reported its snapshot.
pub const AFTER_BARRIER_INJECTION: &str = "checkpoint::after_barrier_injection";
/// A task took its synchronous snapshot; the upload has not started.
pub const AFTER_SNAPSHOT: &str = "checkpoint::after_snapshot";
/// A task's state is in storage but not acknowledged.
pub const AFTER_STATE_UPLOAD: &str = "checkpoint::after_state_upload";
/// A sink staged its output for barrier `n`.
pub const AFTER_PRE_COMMIT: &str = "sink::after_pre_commit";
/// The lease was checked for manifest `n`, which is not written yet. Not in [`ALL`]: a
/// crash there is a crash before the manifest, which [`AFTER_STATE_UPLOAD`] covers;
/// tests hold an instance there to let a newer one start in between.
pub const BEFORE_MANIFEST: &str = "checkpoint::before_manifest";
/// Manifest `n` is written (checkpoint complete) but no sink output is committed.
pub const AFTER_MANIFEST: &str = "checkpoint::after_manifest";
/// One committable of a checkpoint is committed, the next is not.
pub const BETWEEN_COMMITS: &str = "sink::between_commits";
/// Retention deleted part of an old checkpoint.
pub const DURING_RETENTION: &str = "checkpoint::during_retention";
/// Recovery read the checkpoint but sinks have not settled yet.
pub const DURING_RESTORE: &str = "recovery::during_restore";

/// Abort the process at the `nth` hit of `point` (1-based).
#[cfg(feature = "failpoints")]
pub fn crash_at(point: &str, nth: u64) -> Result<(), String> {
    if !ALL.contains(&point) {
        return Err(format!(
            "unknown fail point '{point}'; known: {}",
            ALL.join(", ")
        ));
    }
    let hits = std::sync::atomic::AtomicU64::new(0);
    let name = point.to_string();
    fail::cfg_callback(point, move || {
        if hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == nth {
            eprintln!("fail point {name}: crashing (hit {nth})");
            std::process::abort();
        }
    })
}

/// Call `f` at every hit of `point` (in this process, by every job in it): tests hold a
/// thread there to order two instances' steps. `point` is one of [`ALL`] or
/// [`BEFORE_MANIFEST`].
#[cfg(feature = "failpoints")]
pub fn on_hit(point: &str, f: impl Fn() + Send + Sync + 'static) -> Result<(), String> {
    if !ALL.contains(&point) && point != BEFORE_MANIFEST {
        return Err(format!("unknown fail point '{point}'"));
    }
    fail::cfg_callback(point, f)
}

/// Arm the point named by `EXACTLY_CRASH_AT=<point>[:<nth>]`, if set.
#[cfg(feature = "failpoints")]
pub fn crash_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("EXACTLY_CRASH_AT") else {
        return Ok(());
    };
    let (point, nth) = match spec.rsplit_once(':') {
        Some((p, n)) if n.chars().all(|c| c.is_ascii_digit()) => {
            (p.to_string(), n.parse().map_err(|e| format!("{e}"))?)
        }
        _ => (spec.clone(), 1),
    };
    crash_at(&point, nth)
}
