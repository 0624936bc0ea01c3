//! An S3 endpoint that accepts connections and never answers (a frozen server, a
//! firewall that drops replies) becomes an error after the request timeout and a
//! bounded number of retries, instead of a silent wait of minutes. Its own test binary:
//! it points the process's AWS environment at a local socket.

use exactly_engine::prelude::*;
use exactly_engine::storage::{CheckpointStorage, S3_MAX_RETRIES};
use exactly_engine::testing::VecSource;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn a_silent_endpoint_fails_after_the_timeout_and_a_bounded_number_of_tries() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(conn); // read nothing, answer nothing, never close
        }
    });
    // SAFETY: this binary has one test and sets the environment before any thread of
    // its own reads it.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"));
        std::env::set_var("AWS_ACCESS_KEY_ID", "silent");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "silent");
        std::env::set_var("AWS_TIMEOUT", "1s");
    }
    let storage = CheckpointStorage::from_url("s3://frozen/job").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(storage.check_access())
        .expect_err("a server that never answers is an error");
    let msg = format!("{err:#}");
    assert!(
        msg.to_lowercase().contains("timed out") || msg.to_lowercase().contains("timeout"),
        "{msg}"
    );
    let tries = accepted.load(Ordering::SeqCst);
    assert!(
        (1..=S3_MAX_RETRIES + 1).contains(&tries),
        "{tries} connections for one request with {S3_MAX_RETRIES} retries"
    );

    // A job started on it is not refused as misconfigured: the start is retried under
    // the restart policy (here one retry), and the error says what did not answer.
    let before = accepted.load(Ordering::SeqCst);
    let job = Job::builder("frozen")
        .checkpoint_storage("s3://frozen/job")
        .restart_policy(RestartPolicy::fixed(1, Duration::ZERO))
        .build()
        .unwrap();
    job.source("n", VecSource::new(vec![1u64]))
        .sink("out", exactly_engine::testing::CollectSink::new());
    let err = job.run().unwrap_err();
    assert!(
        matches!(&err, Error::RestartsExhausted { attempts: 1, source, .. }
            if matches!(**source, Error::Storage { .. })),
        "{err:#}"
    );
    let tries = accepted.load(Ordering::SeqCst) - before;
    assert!(
        (2..=2 * (S3_MAX_RETRIES + 1)).contains(&tries),
        "{tries} connections for two tries"
    );
}
