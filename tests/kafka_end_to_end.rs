//! Kafka to Kafka, end to end, with real processes and a real broker: the `ledger`
//! example reads payments from a topic (`--input kafka://...`) and writes every balance
//! update into another topic through the transactional sink (`--out kafka://...`). It
//! runs as a child process that is crashed at each step of the commit protocol, or
//! SIGKILLed at random moments while the parallelism changes between starts, and is
//! started again until it finishes. An independent `read_committed` consumer then finds
//! every balance update of a failure-free computation exactly once: nothing lost,
//! nothing doubled, no balance computed from a payment counted twice. With the
//! `postgres` feature, the same from Kafka into a PostgreSQL table (two-phase sink).
//!
//! `EXACTLY_CHAOS_SEED` changes the random seed (printed, for reproduction).

#![cfg(feature = "kafka")]

mod common;

use common::kafka::{brokers, create_topic};
use common::{example_binary, xorshift};
use exactly::sources::rdkafka::config::ClientConfig;
use exactly::sources::rdkafka::consumer::{BaseConsumer, Consumer};
use exactly::sources::rdkafka::message::Message;
use exactly::sources::rdkafka::producer::{
    BaseRecord, DefaultProducerContext, Producer, ThreadedProducer,
};
use exactly::sources::rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 3;
const PAYMENTS: u64 = 40_000;
const ACCOUNTS: u64 = 500;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payment {
    seq: u64,
    account: u32,
    amount_cents: i64,
}

/// Payment `seq` of the input.
fn payment(seq: u64) -> Payment {
    Payment {
        seq,
        account: (seq.wrapping_mul(7919) % ACCOUNTS) as u32,
        amount_cents: (seq.wrapping_mul(2_654_435_761) % 100_000) as i64 - 40_000,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct BalanceUpdate {
    seq: u64,
    account: u32,
    amount_cents: i64,
    balance_cents: i64,
}

/// A producer for test input: idempotent, so a request retried while a new topic's
/// leader settles does not write a record twice.
fn input_producer() -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

/// One pipeline's topics, directories and the updates a failure-free run commits.
struct Pipeline {
    input: String,
    output: String,
    /// The job's name, unique to the test (see `start`).
    job: String,
    /// PostgreSQL output instead of the `output` topic: (URL, table).
    pg: Option<(String, String)>,
    /// Checkpoints in S3 (`s3://bucket/prefix`) instead of the test's directory.
    s3_checkpoints: Option<String>,
    /// Payments produced into the input so far.
    produced: std::cell::Cell<usize>,
    dir: tempfile::TempDir,
    golden: Vec<BalanceUpdate>,
}

impl Pipeline {
    /// Fresh topics; the input holds `PAYMENTS` payments, each account's in one
    /// partition in sequence order (so its balances do not depend on interleaving).
    fn new(name: &str) -> Pipeline {
        let p = Pipeline::unproduced(name);
        p.produce(PAYMENTS as usize);
        p
    }

    /// Fresh topics, the input still empty: [`Pipeline::produce`] adds the payments.
    fn unproduced(name: &str) -> Pipeline {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = Pipeline {
            input: format!("payments-{name}-{n}"),
            output: format!("balances-{name}-{n}"),
            job: format!("ledger-{name}-{n}"),
            dir: tempfile::tempdir().unwrap(),
            golden: Vec::new(),
            pg: None,
            s3_checkpoints: None,
            produced: std::cell::Cell::new(0),
        };
        create_topic(&p.input, PARTITIONS);
        create_topic(&p.output, PARTITIONS);
        let mut balances: HashMap<u32, i64> = HashMap::new();
        let golden = (0..PAYMENTS)
            .map(|seq| {
                let Payment {
                    account,
                    amount_cents,
                    ..
                } = payment(seq);
                let balance = balances.entry(account).or_default();
                *balance += amount_cents;
                BalanceUpdate {
                    seq,
                    account,
                    amount_cents,
                    balance_cents: *balance,
                }
            })
            .collect();
        Pipeline { golden, ..p }
    }

    /// Append the next `n` payments (at most up to `PAYMENTS`) to the input.
    fn produce(&self, n: usize) {
        let producer = input_producer();
        let from = self.produced.get();
        let to = (from + n).min(PAYMENTS as usize);
        for seq in from as u64..to as u64 {
            let payment = payment(seq);
            let payload = serde_json::to_vec(&payment).unwrap();
            let mut record = BaseRecord::<(), _>::to(&self.input)
                .partition(payment.account as i32 % PARTITIONS)
                .payload(&payload);
            while let Err((_, r)) = producer.send(record) {
                std::thread::sleep(Duration::from_millis(2));
                record = r;
            }
        }
        producer.flush(Duration::from_secs(60)).unwrap();
        self.produced.set(to);
    }

    /// The same, writing into a new PostgreSQL table instead of a topic.
    #[cfg(feature = "postgres")]
    fn into_postgres(self) -> Pipeline {
        // libpq's `key=value` form, as the test script gives it (the example takes a
        // URL too).
        let url = std::env::var("EXACTLY_PG_URL").expect(
            "EXACTLY_PG_URL is not set: run the suite with ./scripts/test.sh, which starts PostgreSQL",
        );
        let table = self.output.replace('-', "_");
        Pipeline {
            pg: Some((url, table)),
            ..self
        }
    }

    /// Every run's stderr, appended to one file in the test's directory.
    fn stderr_log(&self) -> Stdio {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("stderr.log"))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    }

    /// The last 40 lines the runs wrote to stderr.
    fn stderr_tail(&self) -> String {
        let all = std::fs::read_to_string(self.path("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Where the job checkpoints: a directory of the test, or S3.
    fn checkpoints(&self) -> String {
        match &self.s3_checkpoints {
            Some(url) => url.clone(),
            None => self.path("checkpoints").to_str().unwrap().to_string(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// One start of the job at `parallelism`, crashing at `crash_at` if given.
    fn start(&self, parallelism: usize, crash_at: Option<&str>) -> std::process::Child {
        self.command(parallelism, crash_at).spawn().unwrap()
    }

    /// One start of instance `index` of `count`, at parallelism 1, with more `args`: it
    /// follows the input until stopped. Its state is in RocksDB when the suite has the
    /// feature (the reconciliation job's instances keep theirs in memory), so RocksDB
    /// state is carried across instance counts under SIGKILLs too.
    fn start_instance(&self, index: usize, count: usize, args: &[&str]) -> std::process::Child {
        let state = if cfg!(feature = "rocksdb") {
            "rocksdb"
        } else {
            "memory"
        };
        self.command(1, None)
            .args(["--state", state])
            .args(args)
            .env("EXACTLY_INSTANCES", count.to_string())
            .env("EXACTLY_INSTANCE", index.to_string())
            .spawn()
            .unwrap()
    }

    fn command(&self, parallelism: usize, crash_at: Option<&str>) -> Command {
        let bin = example_binary("ledger", &["kafka", "failpoints"]);
        let mut cmd = Command::new(bin);
        // Each test its own job name: jobs with one name share transactional ids, and
        // tests running at the same time would fence each other's producers.
        cmd.args(["run", "--name", &self.job, "--input"])
            .arg(format!("kafka://{}/{}", brokers(), self.input));
        match &self.pg {
            Some((url, table)) => cmd.args(["--out", url, "--pg-table", table]),
            None => cmd
                .arg("--out")
                .arg(format!("kafka://{}/{}", brokers(), self.output))
                .arg("--kafka-staging")
                .arg(self.path("staging")),
        };
        cmd.arg("--checkpoints")
            .arg(self.checkpoints())
            .args(["--interval-ms", "50", "--pace-us", "40000"])
            .args(["--parallelism", &parallelism.to_string()])
            .stdout(Stdio::null())
            .stderr(self.stderr_log());
        match crash_at {
            Some(point) => cmd.env("EXACTLY_CRASH_AT", point),
            None => cmd.env_remove("EXACTLY_CRASH_AT"),
        };
        cmd.env_remove("EXACTLY_INSTANCES")
            .env_remove("EXACTLY_INSTANCE")
            // Errors, not backtraces, at the end of the runs' stderr.
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0");
        cmd
    }

    /// Run to completion (no fault), within two minutes.
    fn finish(&self, parallelism: usize) {
        let mut child = self.start(parallelism, None);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the final run failed: {status}; the runs' stderr ends:\n{}",
                    self.stderr_tail()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "the final run did not finish in two minutes; the runs' stderr ends:\n{}",
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Grows with every commit: the sum of the output partitions' end offsets (records
    /// and transaction markers), or the table's row count.
    fn output_end(&self) -> i64 {
        #[cfg(feature = "postgres")]
        if let Some((url, table)) = &self.pg {
            use exactly::sinks::postgres::client::{Client, NoTls};
            let mut c = Client::connect(url, NoTls).unwrap();
            return c
                .query_one(
                    &format!(
                        "SELECT count(*) FROM information_schema.tables WHERE table_name = '{table}'"
                    ),
                    &[],
                )
                .ok()
                .filter(|r| r.get::<_, i64>(0) > 0)
                .and_then(|_| c.query_one(&format!("SELECT count(*) FROM {table}"), &[]).ok())
                .map_or(0, |r| r.get(0));
        }
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .unwrap();
        (0..PARTITIONS)
            .map(|p| {
                consumer
                    .fetch_watermarks(&self.output, p, Duration::from_secs(10))
                    .unwrap()
                    .1
            })
            .sum()
    }

    /// What a `read_committed` consumer (or a query of the table) finds in the output:
    /// every record, sorted.
    fn committed(&self) -> Vec<BalanceUpdate> {
        #[cfg(feature = "postgres")]
        if let Some((url, table)) = &self.pg {
            use exactly::sinks::postgres::client::{Client, NoTls};
            let mut c = Client::connect(url, NoTls).unwrap();
            let mut got: Vec<BalanceUpdate> = c
                .query(
                    &format!("SELECT seq, account, amount_cents, balance_cents FROM {table}"),
                    &[],
                )
                .unwrap()
                .iter()
                .map(|r| BalanceUpdate {
                    seq: r.get::<_, i64>(0) as u64,
                    account: r.get::<_, i64>(1) as u32,
                    amount_cents: r.get(2),
                    balance_cents: r.get(3),
                })
                .collect();
            got.sort();
            return got;
        }
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", format!("verify-{}", self.output))
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(&self.output, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut got = Vec::new();
        // Until every expected record came and then two quiet seconds (a duplicate
        // would arrive among them), or 60 s.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(m) => {
                    let m = m.unwrap();
                    got.push(serde_json::from_slice(m.payload().unwrap()).unwrap());
                    quiet_since = Instant::now();
                }
                None if got.len() >= self.golden.len()
                    && quiet_since.elapsed() > Duration::from_secs(2) =>
                {
                    break
                }
                None => {}
            }
        }
        got.sort();
        got
    }

    /// The output holds the golden updates exactly once, and nothing is left staged.
    fn check(&self) {
        let got = self.committed();
        let mut seen = std::collections::BTreeSet::new();
        let duplicates = got.iter().filter(|u| !seen.insert(u.seq)).count();
        assert_eq!(
            duplicates, 0,
            "{duplicates} balance updates committed twice"
        );
        assert_eq!(
            got.len(),
            self.golden.len(),
            "{} of {} balance updates committed",
            got.len(),
            self.golden.len()
        );
        let wrong = got.iter().zip(&self.golden).filter(|(a, b)| a != b).count();
        assert_eq!(
            wrong, 0,
            "{wrong} balance updates differ from the golden run"
        );
        let staged = walk(&self.path("staging"));
        assert!(staged.is_empty(), "staged records left: {staged:?}");
    }
}

/// Files under `dir` (none if it does not exist).
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flat_map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p)
            } else {
                vec![p]
            }
        })
        .collect()
}

/// Start with a crash armed at `point`; the process must die there (not finish first).
fn crash(p: &Pipeline, parallelism: usize, point: &str) {
    let status = p.start(parallelism, Some(point)).wait().unwrap();
    assert!(
        !status.success(),
        "the run armed to crash at {point} finished first"
    );
}

/// The job crashes at each step of the commit protocol, in a process of its own, and
/// is started again: after a sink staged its records (pre-commit), after the manifest
/// was written but before any transaction committed, between two subtasks' commits,
/// and during the recovery that re-commits a completed checkpoint. Each ends with the
/// failure-free output, once.
#[test]
fn a_crash_at_every_commit_step_leaves_each_balance_committed_once() {
    use exactly::engine::failpoints::{
        AFTER_MANIFEST, AFTER_PRE_COMMIT, BETWEEN_COMMITS, DURING_RESTORE,
    };
    for point in [AFTER_PRE_COMMIT, AFTER_MANIFEST, BETWEEN_COMMITS] {
        let p = Pipeline::new("step");
        crash(&p, 2, &format!("{point}:4"));
        p.finish(2);
        p.check();
    }
    // A recovery that crashes before its sinks settled, after a crash that left a
    // completed checkpoint uncommitted.
    let p = Pipeline::new("restore");
    crash(&p, 2, &format!("{AFTER_MANIFEST}:4"));
    crash(&p, 3, &format!("{DURING_RESTORE}:1"));
    p.finish(1);
    p.check();
}

/// SIGKILLs at random moments, each restart at another parallelism (partitions and
/// key groups move between subtasks, the sink's transactional ids change with them).
#[test]
fn random_sigkills_with_rescaling_leave_each_balance_committed_once() {
    let mut seed: u64 = std::env::var("EXACTLY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("EXACTLY_CHAOS_SEED={seed}");
    sigkill_with_rescaling(&Pipeline::new("chaos"), &mut seed);
}

/// Kafka to PostgreSQL (two-phase commit) under the same SIGKILLs: the table holds each
/// balance update once.
#[cfg(feature = "postgres")]
#[test]
fn kafka_to_postgres_under_random_sigkills_commits_each_balance_once() {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("EXACTLY_CHAOS_SEED={seed}");
    sigkill_with_rescaling(&Pipeline::new("pg").into_postgres(), &mut seed);
}

/// Start `p` five times at parallelism 2, 3, 1, 2, 3, SIGKILLing each start, then run it
/// to the end and check its output.
fn sigkill_with_rescaling(p: &Pipeline, seed: &mut u64) {
    let mut kills = 0;
    for parallelism in [2, 3, 1, 2, 3] {
        let before = p.output_end();
        let mut child = p.start(parallelism, None);
        // One start in four is killed during start-up or recovery; the others once this
        // run committed something (the output grew), plus up to 150 ms.
        if xorshift(seed).is_multiple_of(4) {
            std::thread::sleep(Duration::from_millis(xorshift(seed) % 700));
        } else {
            let deadline = Instant::now() + Duration::from_secs(60);
            while p.output_end() == before
                && child.try_wait().unwrap().is_none()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(xorshift(seed) % 150));
        }
        if child.try_wait().unwrap().is_some() {
            break; // finished before the kill
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    println!("{kills} SIGKILLs");
    assert!(kills >= 3, "only {kills} kills: the job finished too soon");
    p.finish(2);
    p.check();
}

/// The job as several processes (`EXACTLY_INSTANCES`): the input's partitions hold
/// accounts by `account % 3`, which is not how the engine spreads accounts over key
/// groups, so most payments cross to another instance through the repartition topic.
/// Three instances, then two, then four: each deployment is stopped with SIGTERM into
/// one savepoint name and the next starts from it, gathering the key groups and
/// partitions its instances now own. Meanwhile instances are SIGKILLed at random and
/// started again with the same ordinal while the others run: one at a time, two at
/// once, and one while another recovers. Each balance update is committed once, and
/// the output is the failure-free computation's.
#[test]
fn instances_under_sigkills_and_rescaling_commit_each_balance_once() {
    let mut seed = common::seed();
    // The input grows while the test runs: each kill round first adds a part of it, so
    // every kill, the last one too, comes while the job works.
    let p = Pipeline::unproduced("instances");
    let p = Pipeline {
        s3_checkpoints: s3_checkpoints(&p.job),
        ..p
    };
    println!("checkpoints at {}", p.checkpoints());
    let mut kills = 0;
    let mut last_kill_output = 0;
    for (count, from, stop_as) in RESCALES {
        let args = savepoint_flags(stop_as, from, "--restore-savepoint");
        let mut instances = Deployment::start(&p, count, &args);
        let (k, at) = instances.sigkill_while_working(&p, 7, &mut seed);
        kills += k;
        last_kill_output = at;
        if stop_as == "final" {
            // Every payment processed: every balance update committed.
            p.produce(PAYMENTS as usize);
            let got = p.committed();
            instances.alive(&p);
            assert!(
                got.len() >= p.golden.len(),
                "{} of {} balance updates committed",
                got.len(),
                p.golden.len()
            );
        }
        instances.stop(&p);
        println!("{count} instances stopped into savepoint '{stop_as}'");
    }
    println!("{kills} SIGKILLs in all");
    p.check();
    // The kills came while the job worked: its output grew after the last one (the
    // output ends count records and transaction markers).
    let end = p.output_end();
    println!("output end offsets {end} after the stop");
    assert!(
        last_kill_output < end,
        "the output was complete before the last kill: pace the job more slowly"
    );
    no_open_transaction(&p.output, PARTITIONS);
    no_open_transaction(&format!("{}-balance-repartition", p.job), 128);
}

/// A job run as instance processes, as [`Deployment`] starts, kills and stops them.
trait InstanceJob {
    /// Start instance `index` of `count` with more `args`.
    fn start_instance(&self, index: usize, count: usize, args: &[&str]) -> std::process::Child;
    /// Where the instances checkpoint.
    fn checkpoints(&self) -> String;
    /// The last lines the runs wrote to stderr.
    fn stderr_tail(&self) -> String;
    /// Grows with every commit of output.
    fn output_end(&self) -> i64;
    /// Before each kill round: more input, for a job that follows a growing input.
    fn feed(&self) {}
}

impl InstanceJob for Pipeline {
    fn start_instance(&self, index: usize, count: usize, args: &[&str]) -> std::process::Child {
        Pipeline::start_instance(self, index, count, args)
    }
    fn checkpoints(&self) -> String {
        Pipeline::checkpoints(self)
    }
    fn stderr_tail(&self) -> String {
        Pipeline::stderr_tail(self)
    }
    fn output_end(&self) -> i64 {
        Pipeline::output_end(self)
    }
    /// The ledger's input grows while it runs: a sixteenth of it per round.
    fn feed(&self) {
        self.produce(PAYMENTS as usize / 16);
    }
}

/// The deployments the multi-process tests go through, each stopped (SIGTERM) into a
/// savepoint the next starts from: (instances, savepoint to start from, savepoint to
/// stop into).
const RESCALES: [(usize, Option<&str>, &str); 3] = [
    (3, None, "to-2"),
    (2, Some("to-2"), "to-4"),
    (4, Some("to-4"), "final"),
];

/// The flags of one of [`RESCALES`]: stop into `stop_as`, start from `from` (given with
/// `from_flag`, as the example names it).
fn savepoint_flags<'a>(
    stop_as: &'a str,
    from: Option<&'a str>,
    from_flag: &'a str,
) -> Vec<&'a str> {
    let mut flags = vec!["--savepoint-on-stop", stop_as];
    if let Some(from) = from {
        flags.extend([from_flag, from]);
    }
    flags
}

/// Where job `job`'s instances checkpoint: with the `s3` feature (the test command has
/// every feature), the S3 server the suite starts; without, the test's directory.
fn s3_checkpoints(job: &str) -> Option<String> {
    #[cfg(feature = "s3")]
    return Some(format!(
        "s3://{}/{job}/checkpoints",
        exactly::testing::s3_test_bucket()
    ));
    #[cfg(not(feature = "s3"))]
    {
        let _ = job;
        None
    }
}

/// The processes of one deployment of the job.
struct Deployment<'a> {
    children: Vec<std::process::Child>,
    /// Per instance, the newest checkpoint in its location when it was last started.
    started_after: Vec<u64>,
    args: &'a [&'a str],
}

/// A failing test leaves no instance running.
impl Drop for Deployment<'_> {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The newest checkpoint instance `i` completed, or 0, as the engine lists them.
fn newest_checkpoint(p: &dyn InstanceJob, i: usize) -> u64 {
    use exactly::engine::storage::CheckpointStorage;
    // Missing until the instance's first checkpoint.
    let Ok(root) = CheckpointStorage::open_existing(&p.checkpoints()) else {
        return 0;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(root.child(&format!("instances/{i}")).scan())
        .ok()
        .and_then(|(ids, _)| ids.last().map(|id| id.0))
        .unwrap_or(0)
}

impl<'a> Deployment<'a> {
    fn start(p: &dyn InstanceJob, count: usize, args: &'a [&'a str]) -> Deployment<'a> {
        Deployment {
            started_after: (0..count).map(|i| newest_checkpoint(p, i)).collect(),
            children: (0..count)
                .map(|i| p.start_instance(i, count, args))
                .collect(),
            args,
        }
    }

    /// No instance ended by itself.
    fn alive(&mut self, p: &dyn InstanceJob) {
        for (i, c) in self.children.iter_mut().enumerate() {
            if let Some(status) = c.try_wait().unwrap() {
                panic!(
                    "instance {i} ended by itself ({status}); the runs' stderr ends:\n{}",
                    p.stderr_tail()
                );
            }
        }
    }

    fn restart(&mut self, i: usize, p: &dyn InstanceJob) {
        let count = self.children.len();
        self.children[i].kill().unwrap();
        self.children[i].wait().unwrap();
        self.started_after[i] = newest_checkpoint(p, i);
        self.children[i] = p.start_instance(i, count, self.args);
    }

    /// At least `at_least` SIGKILLs, each round feeding the job ([`InstanceJob::feed`]) and
    /// killing once the output grew since the last round (the instances made progress
    /// between the kills) plus up to 300 ms: one
    /// instance, two at once, or one while another recovers. Returns the kills and
    /// the output's end offsets at the last.
    fn sigkill_while_working(
        &mut self,
        p: &dyn InstanceJob,
        at_least: usize,
        seed: &mut u64,
    ) -> (usize, i64) {
        let n = self.children.len();
        let mut kills = 0;
        let mut round = 0;
        while kills < at_least {
            round += 1;
            let (before, since) = (p.output_end(), Instant::now());
            p.feed();
            while p.output_end() == before && since.elapsed() < Duration::from_secs(60) {
                self.alive(p);
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(xorshift(seed) % 300));
            self.alive(p);
            let i = (xorshift(seed) % n as u64) as usize;
            let j = (i + 1 + (xorshift(seed) % (n as u64 - 1)) as usize) % n;
            let what = match round % 3 {
                0 => {
                    self.children[i].kill().unwrap();
                    self.children[j].kill().unwrap();
                    self.restart(i, p);
                    self.restart(j, p);
                    kills += 2;
                    "two at once"
                }
                1 => {
                    self.restart(i, p);
                    std::thread::sleep(Duration::from_millis(xorshift(seed) % 150));
                    self.restart(j, p);
                    kills += 2;
                    "one during another's recovery"
                }
                _ => {
                    self.restart(i, p);
                    kills += 1;
                    "one"
                }
            };
            println!(
                "{n} instances, round {round}: killed {what} after {:?}, output end offsets {}",
                since.elapsed(),
                p.output_end()
            );
        }
        (kills, p.output_end())
    }

    /// SIGTERM every instance once each completed a checkpoint since its last start
    /// (it is up, its signal handler in place): each stops with a checkpoint and exits
    /// 0.
    fn stop(mut self, p: &dyn InstanceJob) {
        let since = Instant::now();
        while (0..self.children.len()).any(|i| newest_checkpoint(p, i) <= self.started_after[i]) {
            assert!(
                since.elapsed() < Duration::from_secs(60),
                "an instance completed no checkpoint in a minute; the runs' stderr ends:\n{}",
                p.stderr_tail()
            );
            self.alive(p);
            std::thread::sleep(Duration::from_millis(20));
        }
        for c in &self.children {
            let term = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            assert!(term.success());
        }
        for (i, c) in self.children.iter_mut().enumerate() {
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "instance {i} did not stop cleanly on SIGTERM: {status}; the runs' stderr ends:\n{}",
                p.stderr_tail()
            );
        }
    }
}

/// A `read_committed` consumer sees each partition's end where a `read_uncommitted`
/// one does: no transaction is open (the last stable offset is the high watermark).
fn no_open_transaction(topic: &str, partitions: i32) {
    let consumer = |isolation: &str| -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("isolation.level", isolation)
            .create()
            .unwrap()
    };
    let (committed, all) = (consumer("read_committed"), consumer("read_uncommitted"));
    for p in 0..partitions {
        let stable = committed
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap()
            .1;
        let end = all
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap()
            .1;
        assert_eq!(
            stable, end,
            "{topic} partition {p}: a transaction is still open"
        );
    }
}

/// The reconciliation job as instance processes: its three streams in Kafka topics, its
/// three outputs into Kafka topics, its six keyed operators (three deduplications by
/// event, reconciliation by trip, daily windows and closing balances by account) fed through
/// repartition topics, event time (watermarks) crossing with them.
struct Reconciliation {
    bin: PathBuf,
    dir: tempfile::TempDir,
    prefix: String,
    job: String,
    /// Checkpoints in S3 (`s3://bucket/prefix`) instead of the test's directory.
    s3_checkpoints: Option<String>,
}

const STREAMS: [&str; 3] = ["charges", "payments", "payouts"];
const OUTPUTS: [&str; 3] = ["results", "daily-totals", "balances"];
const KEYED: [&str; 6] = [
    "dedup-charges",
    "dedup-payments",
    "dedup-payouts",
    "reconcile",
    "daily",
    "closing-balances",
];

impl Reconciliation {
    /// Generated input for `trips` trips, in topics of 3 partitions by trip, and the
    /// failure-free single-process run's output (files) in `DIR/out`.
    fn new(name: &str, trips: u64) -> Reconciliation {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let r = Reconciliation {
            bin: example_binary("reconciliation", &["kafka"]),
            dir: tempfile::tempdir().unwrap(),
            prefix: format!("recon-{name}-{n}-"),
            job: format!("recon-{name}-{n}"),
            s3_checkpoints: None,
        };
        common::generate(
            &r.bin,
            // One file per stream, in arrival order: produced in that order, each
            // partition's disorder stays within the generator's bound.
            &[
                "--trips",
                &trips.to_string(),
                "--seed",
                "17",
                "--files",
                "1",
                "--dir",
            ],
            r.dir.path(),
        );
        let golden = Command::new(&r.bin)
            .args(["run", "--dir"])
            .arg(r.dir.path())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(golden.success(), "the failure-free run failed");
        let producer = input_producer();
        for stream in STREAMS {
            let topic = format!("{}{stream}", r.prefix);
            create_topic(&topic, PARTITIONS);
            let mut files: Vec<_> = walk(&r.dir.path().join("input").join(stream));
            files.sort();
            for f in files {
                for line in std::fs::read_to_string(&f).unwrap().lines() {
                    // By trip: no partition holds what a keyed operator needs together.
                    let v: serde_json::Value = serde_json::from_str(line).unwrap();
                    let trip = v["trip_id"].as_u64().expect("events have a trip_id");
                    let mut record = BaseRecord::<(), _>::to(&topic)
                        .partition((trip % PARTITIONS as u64) as i32)
                        .payload(line.as_bytes());
                    while let Err((_, rec)) = producer.send(record) {
                        std::thread::sleep(Duration::from_millis(2));
                        record = rec;
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(60)).unwrap();
        for out in OUTPUTS {
            create_topic(&format!("{}{out}", r.prefix), PARTITIONS);
        }
        r
    }

    fn stderr_log(&self) -> Stdio {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stderr.log"))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    }

    /// `verify --kafka`: reads the output topics (`read_committed`) into `DIR/out-kafka`
    /// and checks them against the independent recomputation. Its report on failure.
    fn verify(&self) -> Result<(), String> {
        let out = Command::new(&self.bin)
            .args(["verify", "--dir"])
            .arg(self.dir.path())
            .args(["--kafka", &brokers(), "--topic-prefix", &self.prefix])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl InstanceJob for Reconciliation {
    fn start_instance(&self, index: usize, count: usize, args: &[&str]) -> std::process::Child {
        Command::new(&self.bin)
            .args(["run", "--dir"])
            .arg(self.dir.path())
            .args(["--name", &self.job, "--kafka", &brokers()])
            .args(["--topic-prefix", &self.prefix, "--kafka-staging"])
            .arg(self.dir.path().join("staging"))
            .args(["--checkpoints", &self.checkpoints()])
            .args(["--parallelism", "1", "--checkpoint-ms", "500"])
            // 8 key groups: 8 partitions per repartition topic, not 128.
            .args(["--max-parallelism", "8"])
            .args(args)
            .env("EXACTLY_INSTANCES", count.to_string())
            .env("EXACTLY_INSTANCE", index.to_string())
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(self.stderr_log())
            .spawn()
            .unwrap()
    }
    fn checkpoints(&self) -> String {
        match &self.s3_checkpoints {
            Some(url) => url.clone(),
            None => self
                .dir
                .path()
                .join("checkpoints-kafka")
                .display()
                .to_string(),
        }
    }
    fn stderr_tail(&self) -> String {
        let all = std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
    fn output_end(&self) -> i64 {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .unwrap();
        OUTPUTS
            .iter()
            .flat_map(|out| (0..PARTITIONS).map(move |p| (format!("{}{out}", self.prefix), p)))
            .map(|(topic, p)| {
                consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .unwrap()
                    .1
            })
            .sum()
    }
}

/// The reconciliation job (inputs in Kafka topics partitioned by trip, so every keyed
/// operator gets its records from other instances) as three processes, then two, then
/// four, through savepoints taken at SIGTERM, SIGKILLed at random while it works (one
/// instance, two at once, one during another's recovery; the last round kills all and
/// restarts them at full speed). Its output topics, read `read_committed`, must equal
/// the failure-free single-process run's output line for line and pass the independent
/// verifier; no transaction is left open and nothing staged.
#[test]
fn reconciliation_as_instances_under_sigkills_and_rescaling_equals_the_failure_free_run() {
    let mut seed = common::seed();
    let r = Reconciliation::new("instances", 2_000);
    let r = Reconciliation {
        s3_checkpoints: s3_checkpoints(&r.job),
        ..r
    };
    println!("checkpoints at {}", InstanceJob::checkpoints(&r));
    // Slowly: one event per input partition every 150 ms (about 60 events/s over the
    // nine), so the input lasts through every kill round.
    let slow = ["--batch-size", "1", "--pace-us", "150000"];
    let mut kills = 0;
    let mut last_kill_output = 0;
    for (count, from, stop_as) in RESCALES {
        let fast = savepoint_flags(stop_as, from, "--from-savepoint");
        let args = [slow.as_slice(), &fast].concat();
        let mut instances = Deployment::start(&r, count, &args);
        let (k, _) = instances.sigkill_while_working(&r, 7, &mut seed);
        kills += k;
        if stop_as == "final" {
            // The last kill: all of them, restarted at full speed to finish the input.
            for c in &mut instances.children {
                c.kill().unwrap();
                c.wait().unwrap();
            }
            kills += count;
            last_kill_output = r.output_end();
            instances = Deployment::start(&r, count, &fast);
            // Every window and deadline fires once the input's event time ends.
            let deadline = Instant::now() + Duration::from_secs(180);
            while let Err(report) = r.verify() {
                instances.alive(&r);
                assert!(
                    Instant::now() < deadline,
                    "the output did not verify in three minutes:\n{report}\nthe runs' stderr ends:\n{}",
                    r.stderr_tail()
                );
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        instances.stop(&r);
        println!("{count} instances stopped into savepoint '{stop_as}'");
    }
    println!("{kills} SIGKILLs in all");
    assert!(kills >= 20, "{kills} kills");
    // Stopped: nothing more arrives, nothing arrived twice.
    if let Err(report) = r.verify() {
        panic!("after the stop:\n{report}");
    }
    let golden = common::committed_lines(&r.dir.path().join("out"));
    let got = common::committed_lines(&r.dir.path().join("out-kafka"));
    assert_eq!(got.len(), golden.len(), "records committed");
    assert!(
        got == golden,
        "the output differs from the failure-free run's"
    );
    let end = r.output_end();
    assert!(
        last_kill_output < end,
        "the output was complete before the last kill ({end} offsets)"
    );
    for out in OUTPUTS {
        no_open_transaction(&format!("{}{out}", r.prefix), PARTITIONS);
    }
    for op in KEYED {
        no_open_transaction(&format!("{}-{op}-repartition", r.job), 8);
    }
    let staged = walk(&r.dir.path().join("staging"));
    assert!(staged.is_empty(), "staged records left: {staged:?}");
}
