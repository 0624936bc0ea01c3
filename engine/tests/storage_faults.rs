//! Checkpoint storage that fails and stalls: checkpoints are abandoned and retried,
//! the job restarts when it must, and committed output stays exactly-once.

use async_trait::async_trait;
mod common;

use exactly_engine::prelude::*;
use exactly_engine::storage::CheckpointStorage;
use exactly_engine::testing::{CollectSink, VecSource};
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Fails every `fail_put`-th write, every write in `outage` (a storage outage long
/// enough to exceed the tolerated checkpoint failures), and every `fail_get`-th read;
/// delays every third write.
#[derive(Debug)]
struct FaultyStore {
    inner: InMemory,
    puts: AtomicU64,
    gets: AtomicU64,
    injected: AtomicU64,
    fail_put: u64,
    outage: std::ops::RangeInclusive<u64>,
    fail_get: u64,
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore")
    }
}

impl FaultyStore {
    fn fault(&self) -> object_store::Error {
        self.injected.fetch_add(1, Ordering::SeqCst);
        object_store::Error::Generic {
            store: "faulty",
            source: "injected storage fault".into(),
        }
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let n = self.puts.fetch_add(1, Ordering::SeqCst) + 1;
        if n.is_multiple_of(self.fail_put) || self.outage.contains(&n) {
            return Err(self.fault());
        }
        if n.is_multiple_of(3) {
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let n = self.gets.fetch_add(1, Ordering::SeqCst) + 1;
        if n.is_multiple_of(self.fail_get) {
            return Err(self.fault());
        }
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

fn build(job: &Job, input: &[(u32, i64)], out: &CollectSink<(u32, i64)>) {
    let events = job.source("in", VecSource::new(input.to_vec()).with_splits(4));
    common::running_sum(&events).sink("out", out.clone());
}

#[test]
fn failing_and_slow_storage_keeps_output_exactly_once() {
    // One split per key keeps running sums deterministic: key = i % 4 = split.
    let input: Vec<(u32, i64)> = (0..120_000)
        .map(|i| ((i % 4) as u32, (i % 7) as i64))
        .collect();
    let golden = CollectSink::new();
    let job = Job::builder("faults")
        .checkpoint_storage("memory://")
        .parallelism(2)
        .build()
        .unwrap();
    build(&job, &input, &golden);
    job.run().unwrap();

    let store = Arc::new(FaultyStore {
        inner: InMemory::new(),
        puts: AtomicU64::new(0),
        gets: AtomicU64::new(0),
        injected: AtomicU64::new(0),
        fail_put: 13,
        outage: 20..=35,
        fail_get: 7,
    });
    let storage = CheckpointStorage::from_store(store.clone(), Path::default(), "faulty://");
    let out = CollectSink::new();
    let job = Job::builder("faults")
        .checkpoint_storage_instance(storage)
        .checkpoint_every(Duration::from_millis(5))
        .tolerable_checkpoint_failures(1)
        .restart_policy(RestartPolicy::fixed(50, Duration::ZERO))
        .parallelism(2)
        .batch_size(64)
        // 469 batches a split: at least 10 checkpoints of 5 writes, so the faults
        // (counted in storage calls, the outage ends at the 35th) land while the job
        // runs, however fast the machine.
        .source_batches_per_checkpoint(48)
        .build()
        .unwrap();
    build(&job, &input, &out);
    let report = job.run().unwrap();
    let injected = store.injected.load(Ordering::SeqCst);
    println!(
        "storage faults injected: {injected}; checkpoints completed {}, aborted {}; restarts {}",
        report.checkpoints.len(),
        report.aborted_checkpoints,
        report.restarts
    );
    assert!(
        injected > 0 && report.aborted_checkpoints > 0,
        "faults must have hit checkpoints"
    );
    assert!(
        report.restarts > 0,
        "repeated checkpoint failures must have restarted the job"
    );
    assert_eq!(
        out.sorted(),
        golden.sorted(),
        "exactly-once despite storage faults"
    );
}
