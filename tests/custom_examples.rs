//! The examples that teach how to write an operator and a sink
//! (`examples/custom_operator.rs`, `examples/custom_sink.rs`) run as a user would run
//! them: each crashes its job on purpose, restores it (the operator's at another
//! parallelism, the sink's re-committing a completed checkpoint), and exits with an error
//! unless its committed output holds every event exactly once.

mod common;

use common::example_binary;
use std::process::Command;

fn run_example(name: &str) -> String {
    let bin = example_binary(name, &[]);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .args(["--dir", dir.path().join("demo").to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{name} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_custom_operator_example_keeps_its_state_across_a_crash_and_a_rescale() {
    let out = run_example("custom_operator");
    assert!(out.contains("failed on purpose"), "{out}");
    assert!(
        out.contains("restored checkpoint ") && !out.contains("restored checkpoint none"),
        "{out}"
    );
    assert!(out.contains("verified: 200000 payments"), "{out}");
}

#[test]
fn the_custom_sink_example_commits_exactly_once_across_a_crash() {
    let out = run_example("custom_sink");
    assert!(out.contains("1 restart(s)"), "{out}");
    assert!(
        out.contains("verified: 200000 events committed exactly once"),
        "{out}"
    );
}
