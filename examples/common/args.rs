//! `--flag value` arguments shared by the example binaries.
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::PathBuf;

/// Parsed `--name value` pairs.
pub struct Args(pub HashMap<String, String>);

impl Args {
    /// Parse `--name value` pairs; anything else is an error naming the argument.
    pub fn parse(args: &[String]) -> Result<Args> {
        let mut m = HashMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let Some(name) = k.strip_prefix("--") else {
                bail!("unexpected argument '{k}'")
            };
            let v = it
                .next()
                .with_context(|| format!("--{name} needs a value"))?;
            m.insert(name.to_string(), v.clone());
        }
        Ok(Args(m))
    }

    /// Fail on any flag not in `known` (a typo must not be silently ignored).
    pub fn only(&self, command: &str, known: &[&str]) -> Result<()> {
        let mut unknown: Vec<&String> = self
            .0
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .collect();
        unknown.sort();
        if let Some(k) = unknown.first() {
            let list: Vec<String> = known.iter().map(|k| format!("--{k}")).collect();
            bail!(
                "`{command}` does not take --{k}; it takes {}",
                list.join(", ")
            );
        }
        Ok(())
    }

    /// A required path.
    pub fn path(&self, k: &str) -> Result<PathBuf> {
        self.0
            .get(k)
            .map(PathBuf::from)
            .with_context(|| format!("missing --{k}"))
    }

    /// A path with a default.
    pub fn path_or(&self, k: &str, default: &str) -> PathBuf {
        PathBuf::from(self.0.get(k).map(String::as_str).unwrap_or(default))
    }

    /// A number with a default; a value that does not parse is an error naming the flag.
    pub fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Result<T> {
        match self.0.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("--{k} expects a number, got '{v}'")),
        }
    }
}

impl Args {
    /// `--state memory|rocksdb`: the keyed state backend (default memory).
    pub fn state_backend(&self) -> Result<exactly::state::StateBackend> {
        match self.0.get("state").map(String::as_str) {
            None | Some("memory") => Ok(exactly::state::StateBackend::Memory),
            Some("rocksdb") => Ok(exactly::state::StateBackend::rocksdb()),
            Some(other) => bail!("--state expects memory or rocksdb, got '{other}'"),
        }
    }
}

/// Start an example binary: print the engine's warnings (e.g. a stalled watermark) to
/// stderr (`RUST_LOG` overrides) and, in builds with the `failpoints` feature, arm the
/// fail point named by `EXACTLY_CRASH_AT` (the chaos tests crash the binary with it).
pub fn start() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    #[cfg(feature = "failpoints")]
    exactly::engine::failpoints::crash_from_env().map_err(|e| anyhow::anyhow!(e))?;
    Ok(())
}
