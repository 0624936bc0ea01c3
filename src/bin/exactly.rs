//! `exactly`: inspect a job's checkpoint storage without running the job.
//!
//! ```text
//! exactly checkpoints list   <location>          one line per completed checkpoint
//! exactly checkpoints show   <location> [ID]     a manifest, readable (or --json)
//! exactly checkpoints verify <location> [ID]     read every file, check size and CRC-32
//! exactly lease show         <location>          the fencing lease the storage holds
//! exactly savepoints list    <location>          named checkpoints retention keeps
//! exactly savepoints create  <location> NAME [--checkpoint ID]
//! exactly savepoints delete  <location> NAME
//! exactly savepoints assignment <location> NAME --instances N [--parallelism P]
//! exactly state dump         <location> [ID] [--operator NAME] [--entries N]
//! ```
//!
//! The location is what the job was given as `checkpoint_storage`: a local directory,
//! `file:///abs/dir`, or `s3://bucket/prefix` (with the `s3` feature). Nothing is
//! written but savepoint records: a missing directory is an error, not created, and no
//! lease is taken.
//!
//! Exit codes: 0 done, 1 a checkpoint failed verification, 2 bad usage or a location
//! that cannot be read.

/// Print a line on stdout. A closed pipe (`| head`) is not worth a panic; the exit
/// code still tells the verdict.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

// The commands live in `src/cli/`, outside the library, which does not compile them.
#[path = "../cli/mod.rs"]
mod cli;

use clap::{Parser, Subcommand};
use cli::{checkpoints, lease, savepoints, state};
use exactly::engine::error::Error;
use exactly::engine::storage::CheckpointStorage;
use std::process::ExitCode;

/// Inspect and verify the checkpoints of an exactly job.
#[derive(Parser)]
#[command(name = "exactly", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Completed checkpoints: list, show, verify.
    #[command(subcommand)]
    Checkpoints(CheckpointsCommand),
    /// The fencing lease of a checkpoint location.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Savepoints: checkpoints kept by name until deleted, to deploy new job versions.
    #[command(subcommand)]
    Savepoints(SavepointsCommand),
    /// What a checkpoint holds per operator and state.
    #[command(subcommand)]
    State(StateCommand),
}

#[derive(Subcommand)]
enum StateCommand {
    /// Entries, bytes and key groups per operator and state; with --entries, the first
    /// entries of each state (decoded where the recorded types are primitives).
    Dump {
        /// Checkpoint location: a directory, file:///dir or s3://bucket/prefix.
        location: String,
        /// Checkpoint id (default: the latest).
        id: Option<u64>,
        /// Only this operator.
        #[arg(long)]
        operator: Option<String>,
        /// Print the first N entries of each state.
        #[arg(long, default_value_t = 0)]
        entries: usize,
    },
}

#[derive(Subcommand)]
enum SavepointsCommand {
    /// Every savepoint and the checkpoint it keeps.
    List {
        /// Checkpoint location: a directory, file:///dir or s3://bucket/prefix.
        location: String,
    },
    /// Keep a completed checkpoint as a named savepoint.
    Create {
        /// Checkpoint location: a directory, file:///dir or s3://bucket/prefix.
        location: String,
        /// The savepoint's name (A-Z a-z 0-9 _ . -, not starting with '.').
        name: String,
        /// Checkpoint id (default: the latest).
        #[arg(long)]
        checkpoint: Option<u64>,
    },
    /// Delete a savepoint (its checkpoint goes with the job's next retention run).
    Delete {
        /// Checkpoint location: a directory, file:///dir or s3://bucket/prefix.
        location: String,
        /// The savepoint's name.
        name: String,
    },
    /// Which instance owns which key groups and source splits in a savepoint, and would
    /// own them started as another number of instances.
    Assignment {
        /// The job's checkpoint location (for several instances: the one holding
        /// `instances/<i>/`).
        location: String,
        /// The savepoint's name.
        name: String,
        /// The number of instances to start from it.
        #[arg(long)]
        instances: usize,
        /// Subtasks per instance (default: as when the savepoint was taken).
        #[arg(long)]
        parallelism: Option<usize>,
    },
}

#[derive(Subcommand)]
enum CheckpointsCommand {
    /// One line per completed checkpoint, oldest first.
    List {
        /// Checkpoint location: a directory, file:///dir or s3://bucket/prefix.
        location: String,
    },
    /// One checkpoint's manifest in readable form.
    Show {
        /// Checkpoint location: a directory, file:///dir or s3://bucket/prefix.
        location: String,
        /// Checkpoint id (default: the latest).
        id: Option<u64>,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read every file a checkpoint references and check its size and CRC-32.
    Verify {
        /// Checkpoint location: a directory, file:///dir or s3://bucket/prefix.
        location: String,
        /// Checkpoint id (default: every retained checkpoint).
        id: Option<u64>,
    },
}

#[derive(Subcommand)]
enum LeaseCommand {
    /// The lease epochs in the storage and when they were taken.
    Show {
        /// Checkpoint location: a directory, file:///dir or s3://bucket/prefix.
        location: String,
    },
}

/// Why a command could not do its work; printed as `error: ...`, exit code 2.
#[derive(Debug)]
pub struct Failure(pub String);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure(describe(&e))
    }
}

/// An engine error without the advice meant for a job that is starting (a corrupt
/// checkpoint's "refusing to start from scratch ..."): here only the facts matter.
pub fn describe(e: &Error) -> String {
    match e {
        Error::Config { message } => message.clone(),
        Error::CorruptCheckpoint {
            checkpoint,
            path,
            message,
        } => format!("checkpoint {checkpoint}: file '{path}': {message}"),
        other => other.to_string(),
    }
}

/// A checkpoint location, opened read-only, and its name in output: as it was given.
pub struct Location {
    pub storage: CheckpointStorage,
    pub name: String,
}

/// Open the location read-only and check that it can be listed.
pub fn open(rt: &tokio::runtime::Runtime, location: &str) -> Result<Location, Failure> {
    let storage = CheckpointStorage::open_existing(location)?;
    rt.block_on(storage.check_access())?;
    Ok(Location {
        storage,
        name: location.to_string(),
    })
}

fn run(args: Cli) -> Result<ExitCode, Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(format!("starting the I/O runtime: {e}")))?;
    match args.command {
        Command::Checkpoints(CheckpointsCommand::List { location }) => {
            checkpoints::list(&rt, &open(&rt, &location)?)
        }
        Command::Checkpoints(CheckpointsCommand::Show { location, id, json }) => {
            checkpoints::show(&rt, &open(&rt, &location)?, id, json)
        }
        Command::Checkpoints(CheckpointsCommand::Verify { location, id }) => {
            checkpoints::verify(&rt, &open(&rt, &location)?, id)
        }
        Command::Lease(LeaseCommand::Show { location }) => lease::show(&rt, &open(&rt, &location)?),
        Command::Savepoints(SavepointsCommand::List { location }) => {
            savepoints::list(&rt, &open(&rt, &location)?)
        }
        Command::Savepoints(SavepointsCommand::Create {
            location,
            name,
            checkpoint,
        }) => savepoints::create(&rt, &open(&rt, &location)?, &name, checkpoint),
        Command::Savepoints(SavepointsCommand::Delete { location, name }) => {
            savepoints::delete(&rt, &open(&rt, &location)?, &name)
        }
        Command::Savepoints(SavepointsCommand::Assignment {
            location,
            name,
            instances,
            parallelism,
        }) => savepoints::assignment(&rt, &open(&rt, &location)?, &name, instances, parallelism),
        Command::State(StateCommand::Dump {
            location,
            id,
            operator,
            entries,
        }) => state::dump(
            &rt,
            &open(&rt, &location)?,
            id,
            operator.as_deref(),
            entries,
        ),
    }
}

fn main() -> ExitCode {
    // Usage errors: clap prints them (and --help, --version) and exits with 2 or 0.
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(Failure(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}
