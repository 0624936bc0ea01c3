//! The S3 server frozen for 30 s in the middle of a run (it accepts connections and
//! answers nothing, as a stopped process or a dropped route does) is ridden out under
//! the default restart policy, with the committed output exactly once. The job reaches
//! the real server (SeaweedFS, started by `scripts/test.sh`) through a proxy in this
//! test, which the test freezes; a test binary of its own, as it points the process's
//! AWS environment at the proxy.

use exactly_engine::prelude::*;
use exactly_engine::testing::s3_test_bucket;
use exactly_engine::testing::{CollectSink, VecSource};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Copy `from` to `to` while not frozen; frozen, hold the bytes back.
fn pump(mut from: TcpStream, mut to: TcpStream, frozen: Arc<AtomicBool>) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A TCP proxy to `upstream` on a free local port; its address.
fn proxy(upstream: String, frozen: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { continue };
            let frozen = frozen.clone();
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                // A frozen server accepts, and then says nothing.
                while frozen.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    return;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let f2 = frozen.clone();
                std::thread::spawn(move || pump(c2, s2, f2));
                pump(server, client, frozen);
            });
        }
    });
    addr
}

#[test]
fn a_30_second_freeze_of_the_s3_server_is_survived_under_the_default_policy() {
    let bucket = s3_test_bucket();
    let real = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let upstream = real
        .strip_prefix("http://")
        .expect("the test server speaks http")
        .trim_end_matches('/')
        .to_string();
    let frozen = Arc::new(AtomicBool::new(false));
    let via = proxy(upstream, frozen.clone());
    // SAFETY: this binary has one test and sets the environment before the job (or any
    // other thread that reads it) starts.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", format!("http://{via}"));
        // Shorter than the default 30 s so the freeze makes requests fail, retry and
        // exhaust their retries: what the restart policy must then ride out.
        std::env::set_var("AWS_TIMEOUT", "3s");
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = 20_000u64;
    let sink = CollectSink::new();
    let (builder, at_third) = exactly_engine::testing::job_for_outage(
        "frozen",
        &format!("s3://{bucket}/tests/frozen-{nanos}"),
    );
    let job = builder.build().unwrap();
    job.source("numbers", VecSource::new((0..n).collect::<Vec<u64>>()))
        .key_by(|x: &u64| x % 97)
        .process_fn(|x, ctx: &mut KeyedContext<'_, u64, u64>| {
            const SEEN: ValueState<u64> = ValueState::new("seen");
            let seen = ctx.value(SEEN)?.unwrap_or(0) + 1;
            ctx.set_value(SEEN, &seen)?;
            ctx.emit(x);
            Ok(())
        })
        .name("count")
        .sink("out", sink.clone());
    let running = std::thread::spawn(move || job.run());
    at_third.recv().unwrap();
    frozen.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(30));
    frozen.store(false, Ordering::SeqCst);
    let report = running.join().unwrap().unwrap();
    assert!(
        report.restarts >= 1,
        "the freeze made the job restart at least once"
    );
    assert_eq!(sink.sorted(), (0..n).collect::<Vec<u64>>(), "exactly once");
}
