//! The engine's modules form layers with arrows one way: the DSL plans through the
//! planner, the driver runs what the planner built on the runtime, and the runtime
//! drives the protocol state machines and storage. A module may use only modules in
//! layers below its own (ARCHITECTURE.md draws the same picture).
//!
//! This reads the `crate::` paths in the engine's source (outside comments) and fails
//! naming the file and line of any arrow that runs up or sideways, so a cycle between
//! modules cannot come back unnoticed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules of `engine/src`, from the top layer down. Modules in one layer do
/// not use each other.
const LAYERS: &[&[&str]] = &[
    &["lib"],
    &["testing", "inspect", "connect"],
    &["dsl"],
    &["driver"],
    &["plan"],
    &["runtime"],
    &["process", "operator", "telemetry"],
    &["state"],
    &["storage", "coordinator"],
    &["manifest", "report", "codec", "api", "aligner", "retention"],
    &["error", "metrics", "time", "failpoints"],
    &["ids"],
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("engine source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`src/state/rocks.rs` -> `state`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src");
    let first = rel.components().next().expect("non-empty path");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

/// Every top-level module named by a `crate::` path on a line that is not a comment,
/// with its line number. `crate::{a, b::c}` names `a` and `b`.
fn uses(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" //").next().unwrap_or(code);
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            if let Some(group) = after.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.push((n + 1, name));
                    }
                }
            } else {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.push((n + 1, name));
            }
            rest = after;
        }
    }
    out
}

#[test]
fn modules_use_only_layers_below_their_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, mods)| mods.iter().map(move |m| (*m, i)))
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 20, "read the engine's source: {files:?}");

    let mut wrong = Vec::new();
    let mut seen = BTreeSet::new();
    for file in &files {
        let from = module_of(&src, file);
        let shown = file.strip_prefix(&src).unwrap_or(file).display();
        let Some(&from_layer) = layer.get(from.as_str()) else {
            wrong.push(format!(
                "src/{shown}: module `{from}` is in no layer of this test"
            ));
            continue;
        };
        seen.insert(from.clone());
        let text = std::fs::read_to_string(file).expect("source file");
        for (line, to) in uses(&text) {
            if to == from {
                continue;
            }
            match layer.get(to.as_str()) {
                // Not a module of the engine (e.g. `crate::Foo` re-exported at the root).
                None => {}
                Some(&to_layer) if to_layer > from_layer => {}
                Some(_) => wrong.push(format!(
                    "src/{shown}:{line}: `{from}` uses `{to}`, which is not in a layer below it"
                )),
            }
        }
    }
    let declared: BTreeSet<String> = layer.keys().map(|m| m.to_string()).collect();
    let gone: Vec<_> = declared.difference(&seen).collect();
    assert!(
        gone.is_empty(),
        "layers name modules that no longer exist: {gone:?}"
    );
    assert!(
        wrong.is_empty(),
        "arrows that run up:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_reader_sees_groups_and_skips_comments() {
    let text = "use crate::{dsl::Job, ids};\n// crate::runtime\n/// [`crate::plan`]\nlet x = crate::state::X; // crate::driver\n";
    let got: Vec<_> = uses(text).into_iter().map(|(_, m)| m).collect();
    assert_eq!(got, ["dsl", "ids", "state"]);
}
