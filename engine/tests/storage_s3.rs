//! Checkpoint storage on a real S3-compatible server (SeaweedFS, started by
//! `scripts/test.sh` on 127.0.0.1). These tests fail, they do not skip, when the server
//! is not configured.

mod common;

use exactly_engine::codec::frame_chunks;
use exactly_engine::ids::{OperatorId, SubtaskIndex};
use exactly_engine::manifest::{Manifest, MANIFEST_FORMAT_VERSION};
use exactly_engine::prelude::*;
use exactly_engine::storage::{CheckpointStorage, MULTIPART_THRESHOLD};
use exactly_engine::testing::ExactlyOnceCheck;
use exactly_engine::testing::{CollectSink, VecSource};

use exactly_engine::testing::s3_test_bucket as bucket;

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("s3://{}/tests/{name}-{nanos}", bucket())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn manifest(id: u64) -> Manifest {
    Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        job: "s3".into(),
        checkpoint: CheckpointId(id),
        completed_at_ms: 0,
        max_parallelism: 128,
        is_final: false,
        tasks: vec![],
        pending_commits: vec![],
        from_savepoint: None,
        generation: 1,
        instance: None,
    }
}

#[test]
fn savepoints_are_written_once_listed_and_deleted() {
    let s = CheckpointStorage::from_url(&unique("savepoints")).unwrap();
    rt().block_on(async {
        s.write_manifest(&manifest(3)).await.unwrap();
        let sp = exactly_engine::manifest::Savepoint {
            name: "v1".into(),
            job: "s3".into(),
            checkpoint: CheckpointId(3),
            created_at_ms: 1,
            instance: None,
        };
        s.write_savepoint(&sp).await.unwrap();
        let again = s.write_savepoint(&sp).await.unwrap_err().to_string();
        assert!(again.contains("exists already"), "{again}");
        assert_eq!(s.read_savepoint("v1").await.unwrap(), Some(sp.clone()));
        assert_eq!(s.read_savepoint("v2").await.unwrap(), None);
        assert_eq!(s.list_savepoints().await.unwrap(), vec![sp]);
        assert!(s.delete_savepoint("v1").await.unwrap());
        assert!(!s.delete_savepoint("v1").await.unwrap());
        assert!(s.list_savepoints().await.unwrap().is_empty());
    });
}

#[test]
fn put_list_read_conditional_manifest_and_delete() {
    let s = CheckpointStorage::from_url(&unique("basic")).unwrap();
    rt().block_on(async {
        s.check_access().await.unwrap();
        let op = OperatorId("op".into());
        let h = s
            .put_state_file(
                CheckpointId(3),
                1,
                &op,
                SubtaskIndex(0),
                1,
                vec![op.clone()],
                frame_chunks(vec![bytes::Bytes::from_static(b"state")]),
            )
            .await
            .unwrap();
        assert_eq!(s.read_state(CheckpointId(3), &h).await.unwrap(), b"state");
        s.write_manifest(&manifest(3)).await.unwrap();
        let again = s.write_manifest(&manifest(3)).await.unwrap_err();
        assert!(
            matches!(again, Error::ConcurrentWriter { .. }),
            "conditional put must refuse: {again}"
        );
        assert_eq!(
            s.scan().await.unwrap(),
            (vec![CheckpointId(3)], Some(CheckpointId(3)))
        );
        s.delete_checkpoint(CheckpointId(3)).await.unwrap();
        // The checkpoint is gone; an emptied "directory" may still be listed by some
        // S3-compatible servers, which only makes id allocation more conservative.
        assert_eq!(s.scan().await.unwrap().0, vec![]);
        let err = s.read_state(CheckpointId(3), &h).await.unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    });
}

/// A large state file goes up in parts, from pieces of uneven sizes (as the snapshot
/// writes it: framing, then each key group's buffer) that the parts cut across.
#[test]
fn large_state_files_use_multipart_upload() {
    let s = CheckpointStorage::from_url(&unique("multipart")).unwrap();
    let payload: Vec<u8> = (0..MULTIPART_THRESHOLD + 4 * 1024 * 1024)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    rt().block_on(async {
        let op = OperatorId("big".into());
        let pieces: Vec<bytes::Bytes> = [0, 7, 5 * 1024 * 1024 + 3, 5 * 1024 * 1024 + 4]
            .into_iter()
            .chain([payload.len()])
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| bytes::Bytes::copy_from_slice(&payload[w[0]..w[1]]))
            .collect();
        let h = s
            .put_state_file(
                CheckpointId(1),
                1,
                &op,
                SubtaskIndex(0),
                1,
                vec![],
                frame_chunks(pieces),
            )
            .await
            .unwrap();
        assert!(h.size as usize > MULTIPART_THRESHOLD);
        assert_eq!(s.read_state(CheckpointId(1), &h).await.unwrap(), payload);
    });
}

fn job(url: &str, input: &[(u32, i64)], out: &CollectSink<(u32, i64)>) -> Job {
    let job = Job::builder("s3-sum")
        .checkpoint_storage(url)
        .restart_policy(RestartPolicy::none())
        .build()
        .unwrap();
    pipeline(&job, input, out);
    job
}

/// A running sum per key into `out`.
fn pipeline(job: &Job, input: &[(u32, i64)], out: &CollectSink<(u32, i64)>) {
    let events = job.source("in", VecSource::new(input.to_vec()).with_splits(4));
    common::running_sum(&events).sink("out", out.clone());
}

#[test]
fn job_crashes_and_restores_from_s3_at_other_parallelisms() {
    // key = i % 4 = split, so running sums are deterministic.
    let input: Vec<(u32, i64)> = (0..40_000)
        .map(|i| ((i % 4) as u32, (i % 9) as i64))
        .collect();
    let check = ExactlyOnceCheck {
        storage_url: Some(unique("job")),
        ..ExactlyOnceCheck::default()
    };
    let report = check
        .run("s3-sum", |job: &Job, out: &CollectSink<(u32, i64)>| {
            pipeline(job, &input, out)
        })
        .unwrap();
    assert_eq!(report.crashes, 2);
    assert!(
        report.restored_from.last().unwrap().is_some(),
        "the last stage restored from S3"
    );
}

#[test]
fn missing_bucket_and_wrong_credentials_are_clear_errors_at_start() {
    let _ = bucket();
    let out = CollectSink::new();
    let input = vec![(1u32, 1i64)];
    let err = job("s3://no-such-bucket-exactly/x", &input, &out)
        .run()
        .unwrap_err();
    assert!(
        err.to_string().contains("cannot access checkpoint storage"),
        "{err}"
    );
    assert_eq!(err.class(), ErrorClass::Stop);
    // Wrong credentials: the same server and bucket with a bad secret.
    let bad = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_secret_access_key("not-the-secret")
        .build()
        .unwrap();
    let storage = CheckpointStorage::from_store(
        std::sync::Arc::new(bad),
        object_store::path::Path::from("creds"),
        "s3://bad-creds",
    );
    let job = Job::builder("creds")
        .checkpoint_storage_instance(storage)
        .build()
        .unwrap();
    job.source("in", VecSource::new(input))
        .sink("out", CollectSink::new());
    let err = job.run().unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot access checkpoint storage s3://bad-creds"),
        "{err}"
    );
    assert!(
        err.to_string().contains("403") || err.to_string().to_lowercase().contains("denied"),
        "{err}"
    );
    assert_eq!(err.class(), ErrorClass::Stop);
}
