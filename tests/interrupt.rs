//! Signals: SIGTERM, SIGINT and SIGHUP cancel a save, remove its temporaries
//! (and the sharded-mode marker and the output lock) and exit 128 + the signal; under `axsave
//! launch` a killed rank makes the launcher SIGTERM the others, which clean up; a later save
//! removes (and reports) the temporaries of a run that was SIGKILLed, and leaves those it
//! cannot prove dead. Every process here is a real process of the built binary, stalled at a
//! fault-hook point (`AXSAVE_FAULT`) so the signal lands mid-save.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const FIXTURE: &str = "dcp/fsdp_w2/checkpoint";

/// Waits until the fault hook wrote `hit` (the rank stalls there); returns the stalled pid.
fn wait_hit(hit: &Path, children: &mut [Child]) -> u32 {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(hit)
            && let Some(pid) = s.split_whitespace().nth(1).and_then(|p| p.parse().ok())
        {
            // The hook writes the file before it starts waiting; let it get there.
            std::thread::sleep(Duration::from_millis(200));
            return pid;
        }
        for c in children.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!("a process exited ({st}) before reaching the fault hook");
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the fault hook was never reached"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with plain integers; the pid is a child of this test, not yet reaped.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill {pid} {sig}");
}

/// Waits for `c` with a limit; returns its exit code and stderr.
fn finish(c: Child, limit: Duration) -> (Option<i32>, String) {
    let r = wait_ranks(vec![c], limit);
    let (code, text, _) = r.into_iter().next().unwrap();
    (code, text)
}

/// Two env ranks saving the fixture into `dir/out` in sharded mode, rank 1 stalled at its first
/// piece (its pid written to `dir/hit` when it gets there); returns the output and hit paths.
fn sharded_pair_stalling_rank_1(
    dir: &Path,
) -> (std::path::PathBuf, std::path::PathBuf, Vec<Child>) {
    let out = dir.join("out");
    let hit = dir.join("hit");
    let (o, h) = (out.clone(), hit.clone());
    let children = spawn_ranks(
        2,
        &[
            "--source",
            s(&fixture(FIXTURE)),
            "--output",
            s(&o),
            "--mode",
            "sharded",
            "--quiet",
            "--timeout",
            "20",
        ],
        &move |_| {
            vec![
                ("AXSAVE_FAULT".into(), "copying@1".into()),
                ("AXSAVE_FAULT_FILE".into(), s(&h).into()),
            ]
        },
    );
    (out, hit, children)
}

/// One process saving `source` into `out`, stalled at `point` of rank 0.
fn stalled_save(source: &Path, out: &Path, hit: &Path, point: &str) -> Child {
    let mut c = Command::new(bin());
    c.args(["--source", s(source), "--output", s(out), "--quiet"]);
    clean_env(&mut c);
    c.env("AXSAVE_FAULT", format!("{point}@0"))
        .env("AXSAVE_FAULT_FILE", hit)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().expect("spawn axsave")
}

/// Nothing of the run is left: no temporary, no marker, no lock, no model.
/// `axsave launch -n <ranks>` of a sharded save into `out`, rank `fault`'s `copying` fault
/// point armed (it stalls there and names its pid in `hit`), output piped.
fn launch_stalling(ranks: &str, fault: &str, out: &Path, hit: &Path, extra: &[&str]) -> Child {
    let mut c = Command::new(bin());
    c.args(["launch", "-n", ranks, "--", "--source"])
        .arg(fixture(FIXTURE))
        .arg("--output")
        .arg(out)
        .args(["--mode", "sharded", "--quiet"])
        .args(extra);
    clean_env(&mut c);
    c.env("AXSAVE_FAULT", format!("copying@{fault}"))
        .env("AXSAVE_FAULT_FILE", hit)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().unwrap()
}

fn assert_nothing_left(out: &Path) {
    let names = listing(out);
    assert!(names.is_empty(), "left in the output directory: {names:?}");
}

#[test]
fn a_signal_cancels_a_single_process_save_and_removes_its_temporaries() {
    for (sig, code) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
    ] {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        let hit = t.path().join("hit");
        let mut c = stalled_save(&fixture(FIXTURE), &out, &hit, "copying");
        let pid = wait_hit(&hit, std::slice::from_mut(&mut c));
        // The save is under way: its temporary and its lock are there.
        let before = listing(&out);
        assert!(
            before.iter().any(|n| n.ends_with(".tmp")) && before.contains(&".axsave.lock".into()),
            "{before:?}"
        );
        let sent = Instant::now();
        signal(pid, sig);
        let (got, text) = finish(c, Duration::from_secs(30));
        assert_eq!(got, Some(code), "signal {sig}: {text}");
        assert!(text.contains("interrupted by SIG"), "{text}");
        // Cancelled by its own path, not by the backstop (4 s later).
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "{:?}",
            sent.elapsed()
        );
        assert_nothing_left(&out);
    }
}

/// Env ranks (as srun or torchrun start them), sharded: SIGTERM to every rank (what `scancel`
/// does) while rank 1 is stalled: each exits 143 and the shared directory is clean.
#[test]
fn sigterm_to_every_rank_of_a_sharded_save_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (out, hit, mut children) = sharded_pair_stalling_rank_1(t.path());
    wait_hit(&hit, &mut children);
    let before = listing(&out);
    assert!(
        before.iter().any(|n| n.ends_with(".shared")),
        "the marker is there: {before:?}"
    );
    for c in &children {
        signal(c.id(), libc::SIGTERM);
    }
    let results = wait_ranks(children, Duration::from_secs(30));
    for (r, (code, text, _)) in results.iter().enumerate() {
        assert_eq!(*code, Some(143), "rank {r}: {text}");
    }
    assert_nothing_left(&out);
}

/// SIGINT to one rank only (Ctrl-C in one terminal): that rank exits 130, tells the others,
/// which fail and clean up too.
#[test]
fn sigint_to_one_rank_stops_the_run() {
    let t = tempfile::tempdir().unwrap();
    let (out, hit, mut children) = sharded_pair_stalling_rank_1(t.path());
    let pid = wait_hit(&hit, &mut children);
    assert_eq!(pid, children[1].id());
    signal(pid, libc::SIGINT);
    let results = wait_ranks(children, Duration::from_secs(30));
    assert_eq!(results[1].0, Some(130), "{}", results[1].1);
    assert_eq!(results[0].0, Some(1), "{}", results[0].1);
    assert!(
        results[0]
            .1
            .contains("rank 1 failed: interrupted by SIGINT"),
        "{}",
        results[0].1
    );
    // Well within --timeout: the failure travelled, nobody waited for a heartbeat to lapse.
    assert!(results[0].2 < Duration::from_secs(15), "{:?}", results[0].2);
    assert_nothing_left(&out);
}

/// `axsave launch`: a rank SIGKILLed mid-save makes the launcher SIGTERM the others, which
/// remove the run's temporaries (the dead rank's too, in the shared directory) before they exit.
#[test]
fn under_launch_a_killed_rank_lets_the_others_clean_up() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let hit = t.path().join("hit");
    let mut launcher = launch_stalling("3", "2", &out, &hit, &["--timeout", "30"]);
    let pid = wait_hit(&hit, std::slice::from_mut(&mut launcher));
    assert!(listing(&out).iter().any(|n| n.ends_with(".tmp")));
    signal(pid, libc::SIGKILL);
    let (code, text) = finish(launcher, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("rank 2 was killed by SIGKILL"), "{text}");
    // The survivors cancelled themselves on SIGTERM (not killed after the grace period).
    assert!(
        text.contains("[rank 0]  WARN received SIGTERM") && !text.contains("sending SIGKILL"),
        "{text}"
    );
    assert_nothing_left(&out);
}

/// A save SIGKILLed mid-way leaves its temporaries (nothing can run then); the next save into the
/// same directory removes them and says so, and leaves a temporary whose owner it cannot prove
/// dead (another host's, an older axsave's), saying so too.
#[test]
fn a_later_save_removes_the_temporaries_of_a_dead_run() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let hit = t.path().join("hit");
    let mut c = stalled_save(&fixture(FIXTURE), &out, &hit, "copying");
    let pid = wait_hit(&hit, std::slice::from_mut(&mut c));
    signal(pid, libc::SIGKILL);
    let (code, _) = finish(c, Duration::from_secs(30));
    assert_eq!(code, None, "killed");
    let stale: Vec<String> = listing(&out)
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert_eq!(stale.len(), 1, "{:?}", listing(&out));
    // Someone else's: a tag of another host, and an old-style tag.
    let foreign = [
        ".model.safetensors.axsave-00000001-00000002-1-2-000000000003.tmp",
        ".model.safetensors.axsave-1a2b3c4d.tmp",
    ];
    for f in foreign {
        std::fs::write(out.join(f), b"x").unwrap();
    }
    let o = axsave(&["--source", s(&fixture(FIXTURE)), "--output", s(&out)]);
    assert_ok(&o);
    let text = stderr(&o);
    assert!(
        text.contains("removed 1 stale temporary") && text.contains(&stale[0]),
        "{text}"
    );
    assert!(text.contains("made by a save on another host"), "{text}");
    assert!(text.contains("made by an older axsave"), "{text}");
    let mut want = vec!["model.safetensors".to_string()];
    want.extend(foreign.iter().map(|f| f.to_string()));
    want.sort();
    assert_eq!(listing(&out), want);
}

/// A rank signalled after it reported its part (waiting for rank 0's commit) leaves the run's
/// files alone while rank 0 holds the output lock: rank 0 commits a complete model.
#[test]
fn a_signal_after_reporting_does_not_pull_files_from_under_the_commit() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let (hit, release) = (t.path().join("hit"), t.path().join("release"));
    let (o, h, rl) = (out.clone(), hit.clone(), release.clone());
    let mut children = spawn_ranks(
        2,
        &[
            "--source",
            s(&fixture(FIXTURE)),
            "--output",
            s(&o),
            "--mode",
            "sharded",
            "--quiet",
            "--timeout",
            "20",
        ],
        &move |_| {
            vec![
                ("AXSAVE_FAULT".into(), "committing@0".into()),
                ("AXSAVE_FAULT_FILE".into(), s(&h).into()),
                ("AXSAVE_FAULT_RELEASE".into(), s(&rl).into()),
            ]
        },
    );
    wait_hit(&hit, &mut children);
    signal(children[1].id(), libc::SIGTERM);
    // Rank 1 exits; its temporaries stay for rank 0.
    let start = Instant::now();
    while children[1].try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "rank 1 did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let temps = listing(&out)
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .count();
    assert_eq!(temps, 2, "{:?}", listing(&out));
    std::fs::write(&release, b"").unwrap();
    let results = wait_ranks(children, Duration::from_secs(60));
    assert_eq!(results[1].0, Some(143), "{}", results[1].1);
    assert_eq!(results[0].0, Some(0), "{}", results[0].1);
    let reference = t.path().join("reference");
    assert_ok(&axsave(&[
        "--source",
        s(&fixture(FIXTURE)),
        "--output",
        s(&reference),
    ]));
    assert!(
        tensors(&out) == tensors(&reference),
        "not the reference model"
    );
    assert!(
        listing(&out).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        listing(&out)
    );
}

/// Ctrl-C on `axsave launch`: passed on to the ranks, which cancel and clean up; the launcher
/// exits 130.
#[test]
fn ctrl_c_on_the_launcher_cancels_every_rank() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let hit = t.path().join("hit");
    let mut launcher = launch_stalling("2", "1", &out, &hit, &[]);
    wait_hit(&hit, std::slice::from_mut(&mut launcher));
    assert!(listing(&out).iter().any(|n| n.ends_with(".tmp")));
    signal(launcher.id(), libc::SIGINT);
    let (code, text) = finish(launcher, Duration::from_secs(30));
    assert_eq!(code, Some(130), "{text}");
    for r in 0..2 {
        assert!(
            text.contains(&format!("[rank {r}]  WARN received SIGINT")),
            "rank {r}: {text}"
        );
    }
    assert!(!text.contains("sending SIGKILL"), "{text}");
    assert_nothing_left(&out);
}

/// A rank stuck where the save cannot look at its cancel flag (connecting to a rendezvous store
/// that never comes up) still exits 143 within seconds of SIGTERM, not after
/// --rendezvous-timeout: the signal thread's backstop.
#[test]
fn a_rank_stuck_joining_exits_soon_after_sigterm() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let mut c = Command::new(bin());
    c.args([
        "--source",
        s(&fixture(FIXTURE)),
        "--output",
        s(&out),
        "--rendezvous-timeout",
        "300",
    ]);
    clean_env(&mut c);
    c.env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    signal(child.id(), libc::SIGTERM);
    let (code, text) = finish(child, Duration::from_secs(60));
    assert_eq!(code, Some(143), "{text}");
    assert!(
        sent.elapsed() < Duration::from_secs(15),
        "{:?}",
        sent.elapsed()
    );
    assert!(text.contains("interrupted by SIGTERM"), "{text}");
    assert!(!out.exists() || listing(&out).is_empty());
}

/// `AXSAVE_PARENT_PID` (set by the Python API) names the process axsave must stop with: one
/// that is not its parent (already gone, the save handed to init) is refused before anything is
/// written, and so is a value that is not a pid. (The Python test
/// `test_killing_the_python_process_stops_the_binary` kills a real parent.)
#[test]
fn a_parent_that_is_not_there_stops_the_save_before_it_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut other = Command::new("sleep").arg("30").spawn().unwrap();
    for (value, says) in [
        (other.id().to_string(), "is gone"),
        ("x1".to_string(), "is not a process id"),
    ] {
        let mut c = Command::new(bin());
        clean_env(&mut c);
        let o = c
            .args(["--source", s(&fixture(FIXTURE)), "--output", s(&out)])
            .env("AXSAVE_PARENT_PID", &value)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{value}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{value}: {}", stderr(&o));
        assert!(!out.exists(), "{value}: the output directory was made");
    }
    let _ = other.kill();
    let _ = other.wait();
    // The real parent (this test) is followed and the save goes on.
    let mut c = Command::new(bin());
    clean_env(&mut c);
    let o = c
        .args([
            "--source",
            s(&fixture(FIXTURE)),
            "--output",
            s(&out),
            "--quiet",
        ])
        .env("AXSAVE_PARENT_PID", std::process::id().to_string())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(out.join("model.safetensors").is_file());
}
