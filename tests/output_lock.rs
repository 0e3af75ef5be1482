//! The output directory's lock: two saves into one `--output` at once never
//! mix; the second fails at once, naming the holder, and the directory ends up holding exactly
//! the first save's model, with `--force` too. Real processes of the built binary; the first
//! save is held at a fault-hook point until the second has finished.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const A: &str = "dcp/fsdp_w2/checkpoint";
const B: &str = "safetensors/sharded";

fn wait_for(path: &Path, children: &mut [Child]) {
    let start = Instant::now();
    while !path.exists() {
        for c in children.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!("a process exited ({st}) before reaching the fault hook");
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no fault hook");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
}

fn held_save(args: &[&str], hit: &Path, release: &Path, point: &str) -> Child {
    let mut c = Command::new(bin());
    c.args(args);
    clean_env(&mut c);
    c.env("AXSAVE_FAULT", point)
        .env("AXSAVE_FAULT_FILE", hit)
        .env("AXSAVE_FAULT_RELEASE", release)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().unwrap()
}

/// The model a save of `src` alone gives.
fn reference(src: &str, t: &Path, extra: &[&str]) -> std::path::PathBuf {
    let r = t.join(format!("ref-{}", src.replace('/', "_")));
    let src = fixture(src);
    let mut args = vec!["--source", s(&src), "--output", s(&r)];
    args.extend_from_slice(extra);
    assert_ok(&axsave(&args));
    r
}

/// The second save fails at once (exit 1, naming the first's process), writes nothing; the
/// first completes; the directory holds exactly the first's model.
fn race(force: bool, first_src: &str, second_src: &str) {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let want = reference(first_src, t.path(), &["--max-shard-size", "1KB"]);
    let (first_src, second_src) = (fixture(first_src), fixture(second_src));
    if force {
        // An older model is there, of another shape (one file): --force replaces it.
        assert_ok(&axsave(&["--source", s(&fixture(B)), "--output", s(&out)]));
        assert_eq!(listing(&out), ["model.safetensors"]);
    }
    let (hit, release) = (t.path().join("hit"), t.path().join("release"));
    let mut first_args = vec![
        "--source",
        s(&first_src),
        "--output",
        s(&out),
        "--max-shard-size",
        "1KB",
        "--quiet",
    ];
    if force {
        first_args.push("--force");
    }
    let mut first = held_save(&first_args, &hit, &release, "copying@0");
    wait_for(&hit, std::slice::from_mut(&mut first));
    let started = Instant::now();
    let mut second_args = vec!["--source", s(&second_src), "--output", s(&out)];
    if force {
        second_args.push("--force");
    }
    let o = axsave(&second_args);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let text = stderr(&o);
    assert!(
        text.contains("is in use by another save")
            && text.contains(&format!("process {} on host", first.id())),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("ERROR")).count(),
        1,
        "one error line: {text}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "at once");
    std::fs::write(&release, b"").unwrap();
    let r = wait_ranks(vec![first], Duration::from_secs(60));
    assert_eq!(r[0].0, Some(0), "{}", r[0].1);
    assert_eq!(
        listing(&out),
        listing(&want),
        "exactly the first save's files"
    );
    assert_eq!(tensors(&out), tensors(&want));
    for f in listing(&want) {
        assert_eq!(
            std::fs::read(out.join(&f)).unwrap(),
            std::fs::read(want.join(&f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn two_saves_into_one_output_never_mix() {
    race(false, A, B);
}

#[test]
fn two_forced_saves_into_one_output_never_mix() {
    race(true, A, B);
}

/// Multi-rank: rank 0 holds the lock for the whole run (the other ranks write into the shared
/// directory in sharded mode); a single save started meanwhile fails at once, naming rank 0.
#[test]
fn rank_0_holds_the_lock_for_a_sharded_run() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let (hit, release) = (t.path().join("hit"), t.path().join("release"));
    let (h, r) = (hit.clone(), release.clone());
    let mut ranks = spawn_ranks(
        2,
        &[
            "--source",
            s(&fixture(A)),
            "--output",
            s(&out),
            "--mode",
            "sharded",
            "--quiet",
        ],
        &move |_| {
            vec![
                ("AXSAVE_FAULT".into(), "copying@1".into()),
                ("AXSAVE_FAULT_FILE".into(), s(&h).into()),
                ("AXSAVE_FAULT_RELEASE".into(), s(&r).into()),
            ]
        },
    );
    wait_for(&hit, &mut ranks);
    let o = axsave(&["--source", s(&fixture(B)), "--output", s(&out), "--force"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("process {} on host", ranks[0].id())),
        "{}",
        stderr(&o)
    );
    std::fs::write(&release, b"").unwrap();
    for (r, (code, text, _)) in wait_ranks(ranks, Duration::from_secs(60))
        .into_iter()
        .enumerate()
    {
        assert_eq!(code, Some(0), "rank {r}: {text}");
    }
    let want = reference(A, t.path(), &[]);
    assert_eq!(tensors(&out), tensors(&want));
    // No lock file, marker or temporary left: only the model.
    assert!(
        listing(&out).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        listing(&out)
    );
}
