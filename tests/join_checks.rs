//! What the ranks check about each other when they join: that they
//! read the same checkpoint (node-local sources from two different checkpoints of the same
//! model, and identical arguments run from different working directories, both used to give a
//! model that matches neither with exit 0), that no two processes claim one rank, and that a
//! world size nobody will fill fails within `--rendezvous-timeout` with a short message. Real
//! processes of the built binary.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const A: &str = "dcp/torch27_w2/checkpoint";
const B: &str = "dcp/torch215_w2/checkpoint";

/// Every rank fails, naming both sides (rank, path, digest, save id); nothing is written.
fn assert_different_checkpoints(results: &[(Option<i32>, String, Duration)], out: &Path) {
    for (r, (code, text, _)) in results.iter().enumerate() {
        assert_eq!(*code, Some(1), "rank {r}: {text}");
        assert!(
            text.contains("the ranks read different checkpoints: rank 0 reads")
                && text.contains("but rank 1 reads")
                && text.matches(".metadata sha256 ").count() >= 2
                && text.matches("save_id ").count() >= 2,
            "rank {r}: {text}"
        );
    }
    assert_no_output(out);
}

/// Node-local sources: rank 0 holds checkpoint A's `.metadata` and its shard, rank 1 checkpoint
/// B's (the same model, so every shape matches): refused on every rank.
#[test]
fn node_local_views_of_two_checkpoints_are_refused() {
    let t = tempfile::tempdir().unwrap();
    for (r, src) in [(0, A), (1, B)] {
        let d = t.path().join(format!("mix/rank{r}"));
        std::fs::create_dir_all(&d).unwrap();
        for f in [".metadata".to_string(), format!("__{r}_0.distcp")] {
            std::fs::copy(fixture(src).join(&f), d.join(&f)).unwrap();
        }
    }
    let out = t.path().join("out");
    let source = format!("{}/mix/rank{{rank}}", s(t.path()));
    let children = spawn_ranks(
        2,
        &["--source", &source, "--output", s(&out), "--quiet"],
        &|_| vec![],
    );
    let results = wait_ranks(children, Duration::from_secs(60));
    assert_different_checkpoints(&results, &out);
    // The same layout from one checkpoint is fine (the check is not what fails).
    let t2 = tempfile::tempdir().unwrap();
    for r in 0..2 {
        let d = t2.path().join(format!("same/rank{r}"));
        std::fs::create_dir_all(&d).unwrap();
        for f in [".metadata".to_string(), format!("__{r}_0.distcp")] {
            std::fs::copy(fixture(A).join(&f), d.join(&f)).unwrap();
        }
    }
    let out2 = t2.path().join("out");
    let source = format!("{}/same/rank{{rank}}", s(t2.path()));
    let children = spawn_ranks(
        2,
        &["--source", &source, "--output", s(&out2), "--quiet"],
        &|_| vec![],
    );
    for (r, (code, text, _)) in wait_ranks(children, Duration::from_secs(60))
        .into_iter()
        .enumerate()
    {
        assert_eq!(code, Some(0), "rank {r}: {text}");
    }
}

/// Identical arguments (`--source ckpt`, relative) run from two working directories that hold
/// different checkpoints: every rank fails.
#[test]
fn the_same_relative_source_from_different_directories_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let port = free_port().to_string();
    let children: Vec<Child> = [A, B]
        .iter()
        .enumerate()
        .map(|(r, src)| {
            let cwd = t.path().join(format!("node{r}"));
            copy_dir(&fixture(src), &cwd.join("ckpt"));
            let mut c = Command::new(bin());
            c.args(["--source", "ckpt", "--output", s(&out), "--quiet"]);
            clean_env(&mut c);
            c.current_dir(&cwd)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    let results = wait_ranks(children, Duration::from_secs(60));
    assert_different_checkpoints(&results, &out);
    assert!(results[0].1.contains("node0/ckpt") && results[0].1.contains("node1/ckpt"));
}

/// Two processes started with RANK=1: the second fails at once saying so (not, later, with
/// "payload bytes arrived, more than expected"), and its failure stops the others.
#[test]
fn a_rank_claimed_twice_is_reported_as_such() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let (hit, release) = (t.path().join("hit"), t.path().join("release"));
    let port = free_port().to_string();
    let start = |rank: usize, hold: bool| {
        let mut c = Command::new(bin());
        c.args([
            "--source",
            s(&fixture(A)),
            "--output",
            s(&out),
            "--quiet",
            "--timeout",
            "20",
        ]);
        clean_env(&mut c);
        c.env("RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if hold {
            // The first rank 1 waits after joining, so the duplicate surely comes mid-run.
            c.env("AXSAVE_FAULT", "joined@1")
                .env("AXSAVE_FAULT_FILE", &hit)
                .env("AXSAVE_FAULT_RELEASE", &release);
        }
        c.spawn().unwrap()
    };
    let rank0 = start(0, false);
    let first = start(1, true);
    let begun = Instant::now();
    while !hit.exists() {
        assert!(begun.elapsed() < Duration::from_secs(60), "no fault hook");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (first_pid, dup) = (first.id(), start(1, false));
    let dup_pid = dup.id();
    let dup_result = wait_ranks(vec![dup], Duration::from_secs(60));
    std::fs::write(&release, b"").unwrap();
    let (code, text, _) = &dup_result[0];
    assert_eq!(*code, Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "two processes claim rank 1: process {first_pid} on"
        )) && text.contains(&format!("and process {dup_pid} on")),
        "{text}"
    );
    assert!(!text.contains("payload bytes"), "{text}");
    let rest = wait_ranks(vec![rank0, first], Duration::from_secs(60));
    for (r, (code, text, _)) in rest.iter().enumerate() {
        assert_eq!(*code, Some(1), "rank {r}: {text}");
    }
    assert!(
        rest[0]
            .1
            .contains("rank 1 failed: two processes claim rank 1"),
        "{}",
        rest[0].1
    );
    assert_no_output(&out);
}

/// A WORLD_SIZE of a million with one rank: rank 0 gives up at --rendezvous-timeout (not after
/// polling a million keys) with one short line naming a few missing ranks.
#[test]
fn a_huge_world_size_fails_in_time_with_a_short_message() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let mut c = Command::new(bin());
    c.args([
        "--source",
        s(&fixture(A)),
        "--output",
        s(&out),
        "--quiet",
        "--rendezvous-timeout",
        "2",
    ]);
    clean_env(&mut c);
    c.env("RANK", "0")
        .env("WORLD_SIZE", "1000000")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let r = wait_ranks(vec![c.spawn().unwrap()], Duration::from_secs(60));
    let (code, text, took) = &r[0];
    assert_eq!(*code, Some(1), "{text}");
    assert!(*took < Duration::from_secs(12), "took {took:?}");
    assert!(text.len() < 400, "{} bytes: {text}", text.len());
    assert!(
        text.contains("999999 of 1000000 ranks did not join within 2s")
            && text.contains("ranks 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 999989 more"),
        "{text}"
    );
}

/// Ranks given different job tokens (`AXSAVE_JOB_TOKEN`, which `axsave launch` sets) are not
/// one job: refused at the join, before any data connection, on every rank.
#[test]
fn ranks_with_different_job_tokens_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let children = spawn_ranks(
        2,
        &["--source", s(&fixture(A)), "--output", s(&out), "--quiet"],
        &|r| vec![("AXSAVE_JOB_TOKEN".into(), format!("{r:064x}"))],
    );
    for (r, (code, text, _)) in wait_ranks(children, Duration::from_secs(60))
        .into_iter()
        .enumerate()
    {
        assert_eq!(code, Some(1), "rank {r}: {text}");
        assert!(
            text.contains("rank 1 (on") && text.contains("was given another job token"),
            "rank {r}: {text}"
        );
    }
    assert_no_output(&out);
    // A malformed token is a usage error.
    let mut c = Command::new(bin());
    c.args(["--source", s(&fixture(A)), "--output", s(&out)]);
    clean_env(&mut c);
    c.env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .env("AXSAVE_JOB_TOKEN", "abc");
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("AXSAVE_JOB_TOKEN must be 64 hex digits"));
}
