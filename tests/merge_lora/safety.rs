//! Process safety: a merge is protected as a save is (signals, the output lock, exclusive
//! temporaries and the sweep of a dead run's temporaries).

use super::*;

/// Waits until the fault hook wrote `hit` (the process stalls there); returns the stalled pid.
fn wait_hit(hit: &Path, children: &mut [std::process::Child]) -> u32 {
    let start = std::time::Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(hit)
            && let Some(pid) = text.split_whitespace().nth(1).and_then(|p| p.parse().ok())
        {
            // The hook writes the file before it starts waiting; let it get there.
            std::thread::sleep(std::time::Duration::from_millis(200));
            return pid;
        }
        for c in children.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!("a process exited ({st}) before reaching the fault hook");
            }
        }
        assert!(
            start.elapsed().as_secs() < 60,
            "the fault hook was never reached"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with plain integers; the pid is a child of this test, not yet reaped.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill {pid} {sig}");
}

/// `axsave` with `args`, stalled at the fault point `at` (`point@rank`) until `release` exists
/// (if given).
fn stalled(args: &[String], at: &str, hit: &Path, release: Option<&Path>) -> std::process::Child {
    let mut c = std::process::Command::new(common::bin());
    c.args(args);
    common::clean_env(&mut c);
    c.env("AXSAVE_FAULT", at)
        .env("AXSAVE_FAULT_FILE", hit)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(r) = release {
        c.env("AXSAVE_FAULT_RELEASE", r);
    }
    c.spawn().expect("spawn axsave")
}

fn merge_args(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "merge-lora".into(),
        "--base".into(),
        s(base).into(),
        "--adapter".into(),
        s(adapter).into(),
        "--output".into(),
        s(out).into(),
    ];
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

/// SIGTERM, SIGINT to a merge by one process, stalled after its temporaries and lock exist:
/// it cancels itself, removes them and exits 128 + the signal.
#[test]
fn a_signal_cancels_a_single_process_merge_and_removes_its_temporaries() {
    for (sig, code, name) in [
        (libc::SIGTERM, 143, "SIGTERM"),
        (libc::SIGINT, 130, "SIGINT"),
    ] {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        let hit = t.path().join("hit");
        let args = merge_args(
            &lora("base_bf16"),
            &lora("lora_bf16/adapter"),
            &out,
            &["--max-shard-size", "20KB"],
        );
        let mut c = stalled(&args, "merging@0", &hit, None);
        let pid = wait_hit(&hit, std::slice::from_mut(&mut c));
        let before = common::listing(&out);
        assert!(
            before.iter().any(|n| n.ends_with(".tmp")) && before.contains(&".axsave.lock".into()),
            "{before:?}"
        );
        let sent = std::time::Instant::now();
        signal(pid, sig);
        let (code_got, text, _) = common::wait_ranks(vec![c], std::time::Duration::from_secs(30))
            .pop()
            .unwrap();
        assert_eq!(code_got, Some(code), "{name}: {text}");
        assert!(text.contains(&format!("interrupted by {name}")), "{text}");
        // Cancelled by its own path, not by the signal thread's backstop (4 s later).
        assert!(sent.elapsed().as_secs() < 3, "{:?}", sent.elapsed());
        assert!(
            common::listing(&out).is_empty(),
            "left behind: {:?}",
            common::listing(&out)
        );
    }
}

/// `axsave launch -n 3 -- merge-lora`: rank 2 SIGKILLed mid-merge makes the launcher SIGTERM
/// the others, which cancel and remove the run's temporaries (rank 2's share too, in the
/// shared directory) and the lock before they exit.
#[test]
fn under_launch_a_killed_merge_rank_lets_the_others_clean_up() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let hit = t.path().join("hit");
    let args = launch_merge(
        "3",
        &lora("base_bf16"),
        &lora("dora_bf16/adapter"),
        &out,
        &["--max-shard-size", "20KB", "--timeout", "30"],
    );
    let mut launcher = stalled(&args, "merging@2", &hit, None);
    let pid = wait_hit(&hit, std::slice::from_mut(&mut launcher));
    assert!(
        common::listing(&out).iter().any(|n| n.ends_with(".tmp")),
        "{:?}",
        common::listing(&out)
    );
    signal(pid, libc::SIGKILL);
    let (code, text, took) = common::wait_ranks(vec![launcher], std::time::Duration::from_secs(30))
        .pop()
        .unwrap();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("rank 2 was killed by SIGKILL"), "{text}");
    // The survivors cancelled themselves on SIGTERM (not killed after the grace period, nor
    // left to give up after --timeout).
    assert!(
        text.contains("[rank 0]  WARN received SIGTERM") && !text.contains("sending SIGKILL"),
        "{text}"
    );
    assert!(took.as_secs() < 20, "{took:?}");
    assert!(
        common::listing(&out).is_empty(),
        "left behind: {:?}",
        common::listing(&out)
    );
}

/// Two merges into one output at once: the second fails at once naming the first's process
/// and writes nothing; the first completes; the directory holds exactly the first's merge.
#[test]
fn two_merges_into_one_output_never_mix() {
    for force in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        let want = t.path().join("want");
        assert_ok(&merge(
            &lora("base_bf16"),
            &lora("lora_bf16/adapter"),
            &want,
            &["--max-shard-size", "20KB"],
        ));
        let mut extra = vec!["--max-shard-size", "20KB"];
        if force {
            // An older model of another shape (one file) is there: --force replaces it.
            assert_ok(&merge(
                &lora("base_f32"),
                &lora("lora_f32/adapter"),
                &out,
                &[],
            ));
            extra.push("--force");
        }
        let (hit, release) = (t.path().join("hit"), t.path().join("release"));
        let args = merge_args(&lora("base_bf16"), &lora("lora_bf16/adapter"), &out, &extra);
        let mut first = stalled(&args, "merging@0", &hit, Some(&release));
        wait_hit(&hit, std::slice::from_mut(&mut first));
        let started = std::time::Instant::now();
        let second_extra: &[&str] = if force { &["--force"] } else { &[] };
        let o = merge(
            &lora("base_bf16"),
            &lora("rslora_bf16/adapter"),
            &out,
            second_extra,
        );
        let text = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "force {force}: {text}");
        assert!(
            text.contains("is in use by another save")
                && text.contains(&format!("process {} on host", first.id())),
            "{text}"
        );
        assert_eq!(
            text.lines().filter(|l| l.contains("ERROR")).count(),
            1,
            "{text}"
        );
        assert!(started.elapsed().as_secs() < 10, "at once");
        std::fs::write(&release, b"").unwrap();
        let (code, text, _) = common::wait_ranks(vec![first], std::time::Duration::from_secs(60))
            .pop()
            .unwrap();
        assert_eq!(code, Some(0), "{text}");
        assert_eq!(
            common::listing(&out),
            common::listing(&want),
            "force {force}"
        );
        for f in common::listing(&want) {
            assert_eq!(
                std::fs::read(out.join(&f)).unwrap(),
                std::fs::read(want.join(&f)).unwrap(),
                "force {force}: {f}"
            );
        }
    }
}

/// Across ranks rank 0 holds the lock for the whole merge: a merge started meanwhile fails
/// naming rank 0, and the ranks' merge completes untouched.
#[test]
fn rank_0_holds_the_lock_for_a_merge_across_ranks() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let (hit, release) = (t.path().join("hit"), t.path().join("release"));
    let (h, r) = (s(&hit).to_string(), s(&release).to_string());
    let args = merge_args(&lora("base_bf16"), &lora("lora_bf16/adapter"), &out, &[]);
    let mut ranks = common::spawn_ranks(
        2,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &move |_| {
            vec![
                ("AXSAVE_FAULT".into(), "merging@1".into()),
                ("AXSAVE_FAULT_FILE".into(), h.clone()),
                ("AXSAVE_FAULT_RELEASE".into(), r.clone()),
            ]
        },
    );
    wait_hit(&hit, &mut ranks);
    let o = merge(
        &lora("base_bf16"),
        &lora("rslora_bf16/adapter"),
        &out,
        &["--force"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("process {} on host", ranks[0].id())),
        "{}",
        stderr(&o)
    );
    std::fs::write(&release, b"").unwrap();
    for (r, (code, text, _)) in common::wait_ranks(ranks, std::time::Duration::from_secs(60))
        .into_iter()
        .enumerate()
    {
        assert_eq!(code, Some(0), "rank {r}: {text}");
    }
    assert_eq!(tensors(&out), tensors(&lora("lora_bf16/merged")));
    assert!(
        common::listing(&out).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        common::listing(&out)
    );
}

/// A merge SIGKILLed mid-way leaves its temporaries (nothing can run then); the next merge into
/// the same directory removes them and says so.
#[test]
fn a_later_merge_removes_the_temporaries_of_a_dead_run() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let hit = t.path().join("hit");
    let args = merge_args(&lora("base_bf16"), &lora("lora_bf16/adapter"), &out, &[]);
    let mut c = stalled(&args, "merging@0", &hit, None);
    let pid = wait_hit(&hit, std::slice::from_mut(&mut c));
    signal(pid, libc::SIGKILL);
    let (code, _, _) = common::wait_ranks(vec![c], std::time::Duration::from_secs(30))
        .pop()
        .unwrap();
    assert_eq!(code, None, "killed");
    let stale: Vec<String> = common::listing(&out)
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert_eq!(stale.len(), 1, "{:?}", common::listing(&out));
    let o = merge(&lora("base_bf16"), &lora("lora_bf16/adapter"), &out, &[]);
    assert_ok(&o);
    let text = stderr(&o);
    assert!(
        text.contains("removed 1 stale temporary") && text.contains(&stale[0]),
        "{text}"
    );
    assert!(
        common::listing(&out).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        common::listing(&out)
    );
    assert_eq!(tensors(&out), tensors(&lora("lora_bf16/merged")));
}
