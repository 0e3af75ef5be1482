//! 1. Ranks SIGKILLed at a fault-hook point or right after the start.

use super::*;

/// When the victim is killed.
#[derive(Clone, Copy, Debug)]
pub(super) enum When {
    /// Once it stalls at this fault-hook point (`joined`, `copying`, `synced`).
    Point(&'static str),
    /// This long after the last rank was started (the victim may have finished by then).
    Delay(Duration),
}

#[derive(Clone, Copy, Debug)]
pub(super) struct KillRun {
    pub(super) fx: Fx,
    pub(super) n: usize,
    pub(super) mode: &'static str,
    pub(super) node_local: bool,
    pub(super) victim: usize,
    pub(super) when: When,
}

impl KillRun {
    fn describe(&self) -> String {
        let when = match self.when {
            When::Point(p) => format!("at {p}"),
            When::Delay(d) => format!("{} ms after the start", d.as_millis()),
        };
        format!(
            "{} {} {} ranks {} {}: rank {} killed {when}",
            self.fx.name,
            if self.node_local {
                "node-local"
            } else {
                "shared"
            },
            self.n,
            self.mode,
            if self.fx.kind == Kind::Dcp {
                "DCP"
            } else {
                "DeepSpeed"
            },
            self.victim
        )
    }
}

/// How a kill run ended (every one of these passed its checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// The victim died and every other rank gave up: the intended case.
    Aborted,
    /// The kill came after the victim had reported its part written: the save committed.
    CommittedAnyway,
    /// Like `CommittedAnyway`, but a rank that could not confirm the commit (the store, hosted
    /// by the killed rank 0, was gone) exited non-zero although the model is complete.
    CommittedSomeFailed,
    /// The victim had already finished (exit 0) when the kill came.
    FinishedFirst,
    /// The victim never reached the hook point (it reads nothing) and the save completed.
    PointNotReached,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Aborted => "aborted cleanly",
            Outcome::CommittedAnyway => "killed after reporting: committed",
            Outcome::CommittedSomeFailed => {
                "killed after the commit: model complete, a survivor exited non-zero"
            }
            Outcome::FinishedFirst => "victim had finished: success",
            Outcome::PointNotReached => "point not reached: success",
        }
    }
}

/// Runs the ranks, kills the victim, checks everything; returns the outcome and the slowest
/// survivor's exit after the kill.
fn kill_run(k: &KillRun) -> Result<(Outcome, Duration), String> {
    let (_local, source) = if k.node_local {
        let (t, s) = node_local(k.fx, k.n);
        (Some(t), s)
    } else {
        (None, s(&k.fx.checkpoint()).to_string())
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let flag = tmp.path().join("reached");
    let flag_s = s(&flag).to_string();
    let (victim, when) = (k.victim, k.when);
    let env = move |r: usize| match when {
        When::Point(p) if r == victim => vec![
            ("AXSAVE_FAULT".to_string(), format!("{p}@{victim}")),
            ("AXSAVE_FAULT_FILE".to_string(), flag_s.clone()),
        ],
        _ => Vec::new(),
    };
    let t = TIMEOUT_S.to_string();
    let mut children = spawn_ranks(
        k.n,
        &[
            "--source",
            &source,
            "--output",
            s(&out),
            "-q",
            "--mode",
            k.mode,
            "--timeout",
            &t,
            "--rendezvous-timeout",
            &t,
        ],
        &env,
    );
    let mut reached = true;
    match k.when {
        When::Delay(d) => std::thread::sleep(d),
        When::Point(_) => {
            let start = Instant::now();
            while !flag.exists() {
                if all_exited(&mut children) {
                    reached = flag.exists();
                    break;
                }
                if start.elapsed() > Duration::from_secs(120) {
                    let _ = wait_ranks(children, Duration::ZERO);
                    return Err("the victim never reached the point in 120 s".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let _ = children[victim].kill();
    let res = wait_ranks(children, Duration::from_secs(TIMEOUT_S + SLACK_S + 60));
    let names = listing(&out);
    let log = |res: &[(Option<i32>, String, Duration)]| {
        res.iter()
            .enumerate()
            .map(|(r, (c, text, took))| {
                format!(
                    "--- rank {r}: exit {c:?} after {took:.1?}\n{}",
                    text.trim_end()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let survivors: Vec<usize> = (0..k.n).filter(|&r| r != victim).collect();
    let latency = survivors
        .iter()
        .map(|&r| res[r].2)
        .max()
        .unwrap_or_default();
    let fail = |why: String| Err(format!("{why}; output dir: {names:?}\n{}", log(&res)));
    if res.iter().any(|(_, text, _)| text.contains("panicked")) {
        return fail("a rank panicked".into());
    }
    if res.iter().any(|(c, _, _)| *c == Some(-999)) {
        return fail(format!(
            "a rank was still running {}s after the kill (killed by the test)",
            TIMEOUT_S + SLACK_S + 60
        ));
    }
    let codes: Vec<Option<i32>> = survivors.iter().map(|&r| res[r].0).collect();
    let all_failed = codes.iter().all(|c| matches!(c, Some(c) if *c != 0));
    let all_ok = codes.iter().all(|c| *c == Some(0));
    let model = holds_reference(&out, &k.fx.reference(), k.mode);
    let outcome = match (res[victim].0, reached) {
        // The victim was killed by the signal.
        (None, true) => {
            if all_failed {
                if !names.is_empty() {
                    return fail("every rank failed but the output directory is not empty".into());
                }
                if latency > Duration::from_secs(TIMEOUT_S + SLACK_S) {
                    return fail(format!(
                        "the survivors took {latency:.1?} to exit (timeout {TIMEOUT_S}s + {SLACK_S}s)"
                    ));
                }
                Outcome::Aborted
            } else if matches!(k.when, When::Point(_)) {
                // The hook stalls the victim before it reports: a commit is never allowed.
                return fail(format!(
                    "survivors exited {codes:?} although the victim died before reporting"
                ));
            } else if let Err(e) = model {
                return fail(format!(
                    "survivors exited {codes:?} but the output is not the reference: {e}"
                ));
            } else if all_ok {
                Outcome::CommittedAnyway
            } else {
                Outcome::CommittedSomeFailed
            }
        }
        // The victim had finished (or never reached its point and finished).
        (Some(0), _) => {
            if !all_ok {
                return fail(format!(
                    "the victim succeeded but the others exited {codes:?}"
                ));
            }
            if let Err(e) = model {
                return fail(format!("every rank succeeded but {e}"));
            }
            if reached {
                Outcome::FinishedFirst
            } else {
                Outcome::PointNotReached
            }
        }
        (c, _) => return fail(format!("the victim exited {c:?} before the kill")),
    };
    Ok((outcome, latency))
}

pub(super) fn all_exited(children: &mut [Child]) -> bool {
    children
        .iter_mut()
        .all(|c| matches!(c.try_wait(), Ok(Some(_))))
}

/// Runs `runs`, printing one line each; rows per moment kind and per outcome.
pub(super) fn kill_matrix(runs: &[KillRun], tally: &mut Tally) {
    let mut outcomes: BTreeMap<Outcome, u32> = BTreeMap::new();
    let mut worst = Duration::ZERO;
    for k in runs {
        let started = Instant::now();
        let r = kill_run(k);
        let who = if k.victim == 0 { "rank 0" } else { "rank > 0" };
        let case = match k.when {
            When::Point(p) => format!("SIGKILL {who} at hook point {p}"),
            When::Delay(_) => format!("SIGKILL {who} after a delay"),
        };
        match &r {
            Ok((o, lat)) => {
                *outcomes.entry(*o).or_default() += 1;
                if *o == Outcome::Aborted {
                    worst = worst.max(*lat);
                }
                say(&format!(
                    "   kill: {} -> {} (survivors out {lat:.1?} after the kill; run {:.1?})\n",
                    k.describe(),
                    o.label(),
                    started.elapsed()
                ));
            }
            Err(e) => say(&format!(
                "   kill: {} -> FAILED: {}\n",
                k.describe(),
                e.lines().next().unwrap_or("")
            )),
        }
        tally.add(
            &case,
            r.as_ref()
                .map(|_| ())
                .map_err(|e| format!("{}: {e}", k.describe())),
        );
    }
    for (o, c) in outcomes {
        tally.note(format!("{c} run(s): {}", o.label()));
    }
    tally.note(format!(
        "slowest exit of a surviving rank after a kill: {worst:.1?} (--timeout {TIMEOUT_S}s, allowed {}s)",
        TIMEOUT_S + SLACK_S
    ));
}

/// Deterministic kills at points, modes and sources that tests/multirank.rs does not cover
/// (it kills joined@2 gather, copying@3 and copying@0 node-local gather, synced@1 sharded,
/// all on DCP).
#[test]
fn killed_ranks() {
    let ms = Duration::from_millis;
    let runs = [
        // Rank 0, the store's host, right after the rendezvous, in sharded mode.
        KillRun {
            fx: FSDP_W2,
            n: 2,
            mode: "sharded",
            node_local: false,
            victim: 0,
            when: When::Point("joined"),
        },
        // A sharded writer in the middle of its copy.
        KillRun {
            fx: FSDP_W4,
            n: 3,
            mode: "sharded",
            node_local: false,
            victim: 1,
            when: When::Point("copying"),
        },
        // A DeepSpeed rank sending its own partitions to rank 0.
        KillRun {
            fx: ZERO2_W2,
            n: 2,
            mode: "gather",
            node_local: true,
            victim: 1,
            when: When::Point("copying"),
        },
        // Rank 0 with every piece on disk, before the commit (DeepSpeed, node-local).
        KillRun {
            fx: ZERO3_W3,
            n: 3,
            mode: "gather",
            node_local: true,
            victim: 0,
            when: When::Point("synced"),
        },
        // A sharded DeepSpeed writer with its files on disk, before it reported: rank 0
        // removes them. (Rank 0 killed in sharded mode: `sharded_marker_is_removed_...`.)
        KillRun {
            fx: ZERO3_W2,
            n: 2,
            mode: "sharded",
            node_local: true,
            victim: 1,
            when: When::Point("synced"),
        },
        // A rank that writes nothing, after it sent its pieces, before it reported.
        KillRun {
            fx: FSDP_W4,
            n: 4,
            mode: "gather",
            node_local: true,
            victim: 2,
            when: When::Point("synced"),
        },
        // Rank 0 at once: the store never comes up.
        KillRun {
            fx: FSDP_W4,
            n: 3,
            mode: "gather",
            node_local: false,
            victim: 0,
            when: When::Delay(ms(0)),
        },
        // A rank before it joins: rank 0 waits for it no longer than the rendezvous timeout.
        KillRun {
            fx: ZERO3_W3,
            n: 3,
            mode: "sharded",
            node_local: false,
            victim: 2,
            when: When::Delay(ms(0)),
        },
    ];
    let mut tally = Tally::default();
    kill_matrix(&runs, &mut tally);
    tally.finish("1. killed ranks", true);
}

/// Rank 0 killed in sharded mode once it has made the marker (`.axsave-TAG.shared`) that lets
/// the other ranks check that they share the output directory. FAILS at present (a bug this
/// suite found): the marker is left behind, because only rank 0 removes it (`Rank::cleanup`
/// removes `self.token`, which only `plan_and_send` on rank 0 sets), although every rank knows
/// the output directory and the run's tag.
#[test]
fn sharded_marker_is_removed_when_rank0_dies() {
    let mut tally = Tally::default();
    let runs = [
        (FSDP_W2, false, "copying"),
        (ZERO3_W2, false, "synced"),
        (FSDP_W4, true, "synced"),
    ];
    for (fx, node_local, point) in runs {
        let k = KillRun {
            fx,
            n: 2,
            mode: "sharded",
            node_local,
            victim: 0,
            when: When::Point(point),
        };
        let r = kill_run(&k).and_then(|(o, _)| {
            (o == Outcome::Aborted)
                .then_some(())
                .ok_or(format!("{o:?}"))
        });
        tally.add(
            &format!("SIGKILL rank 0 at hook point {point}, sharded"),
            r.map_err(|e| format!("{}: {e}", k.describe())),
        );
    }
    tally.finish("1b. rank 0 killed in sharded mode", true);
}
