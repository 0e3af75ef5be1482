//! The fault matrix: every way a save can go wrong must end cleanly. On any failure
//! every process exits non-zero within `--timeout` (+ a small slack), no final-named file
//! appears in the output directory, the temporaries (`.NAME.axsave-TAG.tmp`, and rank 0's
//! sharded-mode marker `.axsave-TAG.shared`) are gone once the processes have exited, and
//! damaged input is exit code 1 with an error naming the file: never a panic, never a model
//! that differs from the reference.
//!
//! What each test covers (each prints a table `case | runs | passed` on stderr, uncaptured;
//! the last of the CI tests to finish prints all of them together):
//!
//! 1. `killed_ranks`: a rank SIGKILLed at a fault-hook point or right after the start, for
//!    points, modes, formats and sources that `tests/multirank.rs` does not already kill
//!    (rank 0 included): rank 0 at `joined` in sharded mode, a sharded writer at `copying`, a
//!    DeepSpeed sender at `copying`, rank 0 at `synced` in gather and in sharded mode, a
//!    non-writer at `synced`, rank 0 before the store is up, a rank before it joins.
//! 2. `damaged_inputs`: 20 kinds of damaged or hostile input, one table (truncated zips,
//!    damaged central directories, metadata naming missing files, offsets past the end,
//!    unknown dtypes in DCP metadata / torch.save / safetensors, shapes whose size overflows,
//!    safetensors headers too large or overlapping, pickles with a bad opcode or nested 10,000
//!    deep, ZeRO partition counts that do not match the files, YAML with a wrong type, and an
//!    existing model without `--force`): exit 1, the file named, the message, no panic,
//!    nothing written (the existing model untouched).
//! 3. `flipped_bytes`: one seeded byte flip per run at 10 positions spread over a whole
//!    `.distcp` and a whole ZeRO optimizer file: a clear error naming the file, or (only where
//!    the byte is not tensor data) an output byte-identical to the reference. Each harmless
//!    position is printed with what the byte is (zip header field, padding, descriptor,
//!    pickle byte whose value is not used, record never read).
//! 4. `disk_full`: the output directory on a small tmpfs and on a loop-mounted ext4 image
//!    (made here, as root): ENOSPC at preallocation (one process, two sharded ranks, two
//!    gather ranks) and at the index write in the commit; temporaries removed, nothing
//!    final-named. Skipped, saying why, where mounting is impossible.
//! 5. `source_rewritten_during_a_multirank_save`: a shard rewritten while a rank is stalled
//!    at `copying` (node-local gather, and shared-source sharded): refused by the identity
//!    check on every rank.
//!
//! `stress_matrix` (skipped unless `AXSAVE_STRESS_RUNS` is set; `scripts/stress.sh [RUNS]`
//! runs it in release) randomizes 1 and 3: RUNS (default 24) kills with random victims,
//! moments (random delays after the start, or a hook point), world sizes 2–4, gather /
//! sharded, DCP / DeepSpeed, node-local / shared; and 50 flipped positions per file over a
//! `.distcp` and two ZeRO optimizer files (stage 2 and 3). `AXSAVE_STRESS_RUNS`, `AXSAVE_STRESS_POSITIONS`, `AXSAVE_STRESS_SEED` set it up.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// `--timeout` and `--rendezvous-timeout` of the kill runs, in seconds.
const TIMEOUT_S: u64 = 3;
/// How much longer than the timeout a surviving rank may take to exit after the kill (a busy
/// 2-core machine; the worst seen is printed).
const SLACK_S: u64 = 7;

// ---------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------

/// Writes straight to stderr: libtest captures `eprintln!` but not this, so the tables show up
/// in a plain `cargo test` run.
fn say(s: &str) {
    let mut e = std::io::stderr().lock();
    let _ = e.write_all(s.as_bytes());
    let _ = e.flush();
}

/// Runs and passes per case, failures with their details, notes.
#[derive(Default)]
struct Tally {
    rows: Vec<(String, u32, u32)>,
    failures: Vec<String>,
    notes: Vec<String>,
}

impl Tally {
    fn add(&mut self, case: &str, result: Result<(), String>) {
        let i = match self.rows.iter().position(|(c, _, _)| c == case) {
            Some(i) => i,
            None => {
                self.rows.push((case.to_string(), 0, 0));
                self.rows.len() - 1
            }
        };
        self.rows[i].1 += 1;
        match result {
            Ok(()) => self.rows[i].2 += 1,
            Err(why) => self.failures.push(format!("{case}: {why}")),
        }
    }

    fn note(&mut self, n: String) {
        self.notes.push(n);
    }

    /// Prints the table (and the notes and failures), records it for the combined table of the
    /// CI tests, and fails the test if any run failed.
    fn finish(self, title: &str, ci_test: bool) {
        let mut s = format!("\n== {title}\n");
        s += &table(self.rows.iter().map(|(c, r, p)| (c.as_str(), *r, *p)));
        for n in &self.notes {
            s += &format!("   note: {n}\n");
        }
        for f in &self.failures {
            s += &format!("   FAILED: {f}\n");
        }
        say(&s);
        if ci_test {
            let mut all = ALL_ROWS.lock().unwrap_or_else(|e| e.into_inner());
            for (c, r, p) in &self.rows {
                all.push((format!("{title}: {c}"), *r, *p));
            }
            drop(all);
            if DONE.fetch_add(1, Ordering::SeqCst) + 1 == CI_TESTS {
                let all = ALL_ROWS.lock().unwrap_or_else(|e| e.into_inner());
                let (runs, passed) = all
                    .iter()
                    .fold((0, 0), |(r, p), (_, rr, pp)| (r + rr, p + pp));
                say(&format!(
                    "\n== fault matrix (tests/faults.rs), all cases: {passed} of {runs} runs passed\n{}",
                    table(all.iter().map(|(c, r, p)| (c.as_str(), *r, *p)))
                ));
            }
        }
        assert!(
            self.failures.is_empty(),
            "{title}: {} run(s) failed:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

/// The CI tests that report to the combined table.
const CI_TESTS: usize = 7;
static ALL_ROWS: Mutex<Vec<(String, u32, u32)>> = Mutex::new(Vec::new());
static DONE: AtomicUsize = AtomicUsize::new(0);

fn table<'a>(rows: impl Iterator<Item = (&'a str, u32, u32)>) -> String {
    let rows: Vec<_> = rows.collect();
    let w = rows
        .iter()
        .map(|(c, _, _)| c.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut s = format!("   {:<w$} | {:>4} | {:>6}\n", "case", "runs", "passed");
    s += &format!("   {}-+------+-------\n", "-".repeat(w));
    for (c, r, p) in rows {
        let mark = if r == p { "" } else { "   <-- FAILED" };
        s += &format!("   {c:<w$} | {r:>4} | {p:>6}{mark}\n");
    }
    s
}

/// A small seeded generator (splitmix64): reproducible runs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Sources
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Dcp,
    DeepSpeed,
}

/// A fixture checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Fx {
    kind: Kind,
    name: &'static str,
}

const FSDP_W2: Fx = Fx {
    kind: Kind::Dcp,
    name: "fsdp_w2",
};
const FSDP_W4: Fx = Fx {
    kind: Kind::Dcp,
    name: "fsdp_w4",
};
const ZERO2_W2: Fx = Fx {
    kind: Kind::DeepSpeed,
    name: "zero2_w2",
};
const ZERO3_W2: Fx = Fx {
    kind: Kind::DeepSpeed,
    name: "zero3_w2",
};
const ZERO3_W3: Fx = Fx {
    kind: Kind::DeepSpeed,
    name: "zero3_w3",
};

impl Fx {
    fn checkpoint(self) -> PathBuf {
        match self.kind {
            Kind::Dcp => fixture(&format!("dcp/{}/checkpoint", self.name)),
            Kind::DeepSpeed => fixture(&format!("deepspeed/{}/checkpoint", self.name)),
        }
    }
    fn reference(self) -> PathBuf {
        match self.kind {
            Kind::Dcp => fixture(&format!("dcp/{}/reference.safetensors", self.name)),
            Kind::DeepSpeed => fixture(&format!(
                "deepspeed/{}/reference_fp32.safetensors",
                self.name
            )),
        }
    }
    /// How many ranks wrote it.
    fn writers(self) -> usize {
        self.name
            .rsplit("_w")
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or(1)
    }
}

/// Spreads a fixture over per-rank directories as node-local disks would: checkpoint rank k's
/// files go to rank `k % n`; DCP's `.metadata` to rank 0; DeepSpeed's `latest` and the files
/// of no rank (stage 1/2's `mp_rank_00_model_states.pt`) to every rank. Returns the
/// directory and the `--source` template.
fn node_local(fx: Fx, n: usize) -> (tempfile::TempDir, String) {
    let t = tempfile::tempdir().unwrap();
    let src = fx.checkpoint();
    let rank_dir = |r: usize| t.path().join(format!("rank{r}"));
    match fx.kind {
        Kind::Dcp => {
            for r in 0..n {
                std::fs::create_dir_all(rank_dir(r)).unwrap();
            }
            for e in std::fs::read_dir(&src).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let owner = dcp_writer(&name) % n;
                std::fs::copy(e.path(), rank_dir(owner).join(&name)).unwrap();
            }
        }
        Kind::DeepSpeed => {
            let tag = std::fs::read_to_string(src.join("latest")).unwrap();
            let tag = tag.trim();
            for r in 0..n {
                std::fs::create_dir_all(rank_dir(r).join(tag)).unwrap();
                std::fs::copy(src.join("latest"), rank_dir(r).join("latest")).unwrap();
            }
            for e in std::fs::read_dir(src.join(tag)).unwrap().flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                let owner = zero_rank(&f);
                let owners: Vec<usize> = match owner {
                    Some(k) => vec![k % n],
                    None => (0..n).collect(),
                };
                for r in owners {
                    std::fs::copy(e.path(), rank_dir(r).join(tag).join(&f)).unwrap();
                }
            }
        }
    }
    let template = format!("{}/rank{{rank}}", t.path().display());
    (t, template)
}

/// Whether `out` holds exactly the reference's model: byte-identical for one file, the same
/// tensors for shards + index; and nothing else of axsave's.
fn holds_reference(out: &Path, reference: &Path, mode: &str) -> Result<(), String> {
    let names = listing(out);
    if names.iter().any(|n| n.contains("axsave")) {
        return Err(format!("temporaries next to the model: {names:?}"));
    }
    if mode == "gather" {
        if names != ["model.safetensors"] {
            return Err(format!("expected model.safetensors, found {names:?}"));
        }
        if std::fs::read(out.join("model.safetensors")).ok() != std::fs::read(reference).ok() {
            return Err("model.safetensors differs from the reference".into());
        }
    } else {
        if !names.contains(&"model.safetensors.index.json".to_string()) {
            return Err(format!("no index among {names:?}"));
        }
        let got = std::panic::catch_unwind(|| tensors(out))
            .map_err(|_| format!("unreadable output {names:?}"))?;
        if got != tensors(reference) {
            return Err("the shards' tensors differ from the reference".into());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Killed ranks
// ---------------------------------------------------------------------------------------------

/// When the victim is killed.
#[derive(Clone, Copy, Debug)]
enum When {
    /// Once it stalls at this fault-hook point (`joined`, `copying`, `synced`).
    Point(&'static str),
    /// This long after the last rank was started (the victim may have finished by then).
    Delay(Duration),
}

#[derive(Clone, Copy, Debug)]
struct KillRun {
    fx: Fx,
    n: usize,
    mode: &'static str,
    node_local: bool,
    victim: usize,
    when: When,
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

fn all_exited(children: &mut [Child]) -> bool {
    children
        .iter_mut()
        .all(|c| matches!(c.try_wait(), Ok(Some(_))))
}

/// Runs `runs`, printing one line each; rows per moment kind and per outcome.
fn kill_matrix(runs: &[KillRun], tally: &mut Tally) {
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

// ---------------------------------------------------------------------------------------------
// 2. Damaged inputs
// ---------------------------------------------------------------------------------------------

/// How one damaged-input case runs: arguments, working directory, the output directory, and
/// what must still be in it afterwards (name → bytes).
struct Prepared {
    args: Vec<String>,
    cwd: Option<PathBuf>,
    out: PathBuf,
    keep: Vec<(String, Vec<u8>)>,
}

/// A damaged-input case: name, how to make it in a fresh temp dir, message fragments.
struct Damage {
    name: &'static str,
    make: fn(&Path) -> Prepared,
    want: &'static [&'static str],
}

fn plain(src: &Path, t: &Path) -> Prepared {
    Prepared {
        args: vec![
            "--source".into(),
            s(src).into(),
            "--output".into(),
            s(&t.join("out")).into(),
            "-q".into(),
        ],
        cwd: None,
        out: t.join("out"),
        keep: Vec::new(),
    }
}

/// A writable copy of a fixture checkpoint in `t/ckpt`.
fn ckpt_copy(fx: Fx, t: &Path) -> PathBuf {
    let dst = t.join("ckpt");
    copy_dir(&fx.checkpoint(), &dst);
    dst
}

fn edit(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut d = std::fs::read(path).unwrap();
    f(&mut d);
    std::fs::write(path, d).unwrap();
}

/// Replaces the only occurrence of `from` (asserting there is one) by `to` (same length).
fn replace_once(d: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let hits: Vec<usize> = (0..=d.len() - from.len())
        .filter(|&i| &d[i..i + from.len()] == from)
        .collect();
    assert_eq!(hits.len(), 1, "{:?}", String::from_utf8_lossy(from));
    d[hits[0]..hits[0] + to.len()].copy_from_slice(to);
}

fn find(d: &[u8], pat: &[u8]) -> usize {
    (0..=d.len() - pat.len())
        .find(|&i| &d[i..i + pat.len()] == pat)
        .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(pat)))
}

/// Spoils every occurrence of a zip signature (`PK\x01\x02`: central directory records).
fn spoil_signature(d: &mut [u8], sig: &[u8; 4]) {
    let mut n = 0;
    for i in 0..d.len() - 4 {
        if &d[i..i + 4] == sig {
            d[i + 3] = 0x09;
            n += 1;
        }
    }
    assert!(n > 0);
}

fn write_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data_len, 0);
    std::fs::write(path, b).unwrap();
}

fn safetensors_case(t: &Path, header: &str, data_len: usize) -> Prepared {
    let f = t.join("model.safetensors");
    write_safetensors(&f, header, data_len);
    plain(&f, t)
}

const OPTIM1: &str = "global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt";
const OPTIM0: &str = "global_step2/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt";

fn damage_cases() -> Vec<Damage> {
    vec![
        Damage {
            name: "truncated .distcp (cut in half)",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                let f = c.join("__0_0.distcp");
                cut_in_half(&f);
                plain(&c, t)
            },
            want: &["__0_0.distcp", "past the end of the file"],
        },
        Damage {
            name: "truncated torch.save zip (ZeRO optim file cut)",
            make: |t| {
                let c = ckpt_copy(ZERO2_W2, t);
                edit(&c.join(OPTIM1), |d| d.truncate(d.len() * 2 / 3));
                plain(&c, t)
            },
            want: &[
                "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "damaged zip archive",
            ],
        },
        Damage {
            name: "damaged central directory (.distcp)",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                edit(&c.join("__0_0.distcp"), |d| {
                    spoil_signature(d, b"PK\x01\x02")
                });
                plain(&c, t)
            },
            want: &["__0_0.distcp", "damaged zip archive at byte"],
        },
        Damage {
            name: "damaged central directory (ZeRO optim file)",
            make: |t| {
                let c = ckpt_copy(ZERO2_W2, t);
                edit(&c.join(OPTIM1), |d| spoil_signature(d, b"PK\x01\x02"));
                plain(&c, t)
            },
            want: &[
                "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "damaged zip archive at byte",
            ],
        },
        Damage {
            name: "DCP metadata naming a missing .distcp",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                std::fs::remove_file(c.join("__1_0.distcp")).unwrap();
                plain(&c, t)
            },
            want: &["__1_0.distcp"],
        },
        Damage {
            name: "safetensors index naming a missing shard",
            make: |t| {
                let c = t.join("model");
                copy_dir(&fixture("safetensors/sharded"), &c);
                std::fs::remove_file(c.join("model-00002-of-00002.safetensors")).unwrap();
                plain(&c, t)
            },
            want: &["model-00002-of-00002.safetensors", "No such file"],
        },
        Damage {
            name: "DCP item length past the end of its .distcp",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                // The first item's `length` (BININT2) becomes 65535.
                edit(&c.join(".metadata"), |d| {
                    let i = find(d, b"\x8c\x06length\x94M") + 10;
                    d[i] = 0xff;
                    d[i + 1] = 0xff;
                });
                plain(&c, t)
            },
            want: &["__0_0.distcp", "lies past the end of the file"],
        },
        Damage {
            name: "safetensors data_offsets past the end",
            make: |t| {
                safetensors_case(
                    t,
                    r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                    8,
                )
            },
            want: &["model.safetensors", "do not match the file's length"],
        },
        Damage {
            name: "unknown dtype in DCP metadata (torch.bits1x8)",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                edit(&c.join(".metadata"), |d| {
                    replace_once(d, b"\x8c\x07float32", b"\x8c\x07bits1x8")
                });
                plain(&c, t)
            },
            want: &[".metadata", "unsupported dtype torch.bits1x8"],
        },
        Damage {
            name: "unknown dtype in torch.save (QInt8Storage, ZeRO optim)",
            make: |t| {
                let c = ckpt_copy(ZERO2_W2, t);
                edit(&c.join(OPTIM0), |d| {
                    replace_once(d, b"FloatStorage", b"QInt8Storage");
                    resign_zip_record(d, "data.pkl");
                });
                plain(&c, t)
            },
            want: &[
                "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "QInt8Storage is not supported",
            ],
        },
        Damage {
            name: "unknown dtype in a safetensors header (Q9)",
            make: |t| {
                safetensors_case(
                    t,
                    r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#,
                    8,
                )
            },
            want: &["model.safetensors", "Q9"],
        },
        Damage {
            name: "shape whose byte size overflows (DCP metadata)",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                edit(&c.join(".metadata"), |d| {
                    // torch.Size((13, 8)) of the first tensor becomes (2**62, 8): the BININT1 13
                    // becomes a LONG1, and the frame that holds it grows to match.
                    let at = find(d, b"\x8c\x04Size\x94\x93\x94K\x0dK\x08") + 9;
                    let mut long = vec![0x8a, 8];
                    long.extend_from_slice(&(1u64 << 62).to_le_bytes());
                    d.splice(at..at + 2, long.iter().copied());
                    assert_eq!(d[2], 0x95, "FRAME");
                    let frame = u64::from_le_bytes(d[3..11].try_into().unwrap());
                    let grown = frame + long.len() as u64 - 2;
                    d[3..11].copy_from_slice(&grown.to_le_bytes());
                });
                plain(&c, t)
            },
            want: &[".metadata", "overflows"],
        },
        Damage {
            name: "shape whose byte size overflows (safetensors)",
            make: |t| {
                safetensors_case(
                    t,
                    r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
                    8,
                )
            },
            want: &["model.safetensors", "overflow"],
        },
        Damage {
            name: "safetensors header length > 100 MB",
            make: |t| {
                let f = t.join("model.safetensors");
                let mut b = 200_000_000u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{\"a\":{}}       ");
                std::fs::write(&f, b).unwrap();
                plain(&f, t)
            },
            want: &["model.safetensors", "larger than 100 MB"],
        },
        Damage {
            name: "safetensors overlapping offsets",
            make: |t| {
                safetensors_case(
                    t,
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                    12,
                )
            },
            want: &["model.safetensors", "invalid offset"],
        },
        Damage {
            name: "pickle with a bad opcode (DCP .metadata)",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                edit(&c.join(".metadata"), |d| d[11] = 0xff);
                plain(&c, t)
            },
            want: &[".metadata", "unknown opcode 0xff"],
        },
        Damage {
            name: "pickle nested 10,000 deep (DCP .metadata)",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                std::fs::copy(fixture("pickle/deep.pkl"), c.join(".metadata")).unwrap();
                plain(&c, t)
            },
            want: &[".metadata", "nesting deeper than"],
        },
        Damage {
            name: "ZeRO partition count vs files (a rank's optim file missing)",
            make: |t| {
                let c = ckpt_copy(ZERO3_W2, t);
                std::fs::remove_file(c.join(OPTIM1)).unwrap();
                plain(&c, t)
            },
            want: &["global_step2", "expected 2 *_optim_states.pt files"],
        },
        Damage {
            name: "ZeRO partition_count edited (2 -> 3)",
            make: |t| {
                let c = ckpt_copy(ZERO3_W2, t);
                edit(&c.join(OPTIM0), |d| {
                    replace_once(
                        d,
                        b"partition_countq\x0fK\x02",
                        b"partition_countq\x0fK\x03",
                    );
                    resign_zip_record(d, "data.pkl");
                });
                plain(&c, t)
            },
            want: &[
                "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "expected 3",
            ],
        },
        Damage {
            name: "YAML with a wrong type (--config, lora_r: eight)",
            make: |t| {
                std::fs::write(
                    t.join("bad.yml"),
                    "base_model: ./base\noutput_dir: ./run\nadapter: lora\nlora_r: eight\n",
                )
                .unwrap();
                Prepared {
                    args: vec!["--config".into(), "bad.yml".into()],
                    cwd: Some(t.to_path_buf()),
                    out: t.join("run"),
                    keep: Vec::new(),
                }
            },
            want: &["bad.yml", "lora_r", "line 4"],
        },
        Damage {
            name: "existing model without --force (refused, untouched)",
            make: |t| {
                let mut p = plain(&FSDP_W2.checkpoint(), t);
                std::fs::create_dir_all(&p.out).unwrap();
                std::fs::write(p.out.join("model.safetensors"), b"old").unwrap();
                p.keep = vec![("model.safetensors".into(), b"old".to_vec())];
                p
            },
            want: &["model.safetensors", "--force"],
        },
    ]
}

fn run_damage(d: &Damage) -> Result<(), String> {
    let t = tempfile::tempdir().unwrap();
    let p = (d.make)(t.path());
    let mut c = Command::new(bin());
    clean_env(&mut c);
    c.args(&p.args);
    if let Some(cwd) = &p.cwd {
        c.current_dir(cwd);
    }
    let o = c.output().map_err(|e| e.to_string())?;
    let err = stderr(&o);
    if o.status.code() != Some(1) {
        return Err(format!("exit {:?}, want 1: {err}", o.status.code()));
    }
    if err.contains("panicked") {
        return Err(format!("panic: {err}"));
    }
    for w in d.want {
        if !err.contains(w) {
            return Err(format!("the error lacks {w:?}: {err}"));
        }
    }
    let names = listing(&p.out);
    let want: Vec<String> = p.keep.iter().map(|(n, _)| n.clone()).collect();
    if names != want {
        return Err(format!(
            "the output directory holds {names:?}, want {want:?}"
        ));
    }
    for (n, bytes) in &p.keep {
        if std::fs::read(p.out.join(n)).ok().as_ref() != Some(bytes) {
            return Err(format!("{n} was changed"));
        }
    }
    Ok(())
}

#[test]
fn damaged_inputs() {
    let mut tally = Tally::default();
    for d in damage_cases() {
        tally.add(d.name, run_damage(&d));
    }
    tally.finish("2. damaged inputs", true);
}

// ---------------------------------------------------------------------------------------------
// 3. Flipped bytes
// ---------------------------------------------------------------------------------------------

/// A data file whose bytes get flipped.
struct FlipTarget {
    fx: Fx,
    /// The file, relative to the checkpoint directory.
    rel: &'static str,
}

/// What a byte of a source file is, from the undamaged file's catalog and zip structure.
struct ByteMap {
    /// Byte ranges tensor pieces read.
    tensor: Vec<(u64, u64)>,
    /// Byte ranges of records checked whole by their CRC.
    checked: Vec<(u64, u64)>,
    /// Zip structure: (start, end, label).
    zip: Vec<(u64, u64, String)>,
}

impl ByteMap {
    fn new(ckpt: &Path, rel: &str, data: &[u8]) -> ByteMap {
        let cat = axsave_formats::detect::open(ckpt).expect("catalog of the undamaged copy");
        let fi = cat
            .files
            .iter()
            .position(|f| f.path == Path::new(rel))
            .unwrap_or_else(|| panic!("{rel} is not a file of the catalog"));
        let mut tensor = Vec::new();
        for t in &cat.tensors {
            for p in t.pieces.iter().filter(|p| p.file == fi) {
                let elem = p.stored_dtype.size() as u64;
                let sizes: Vec<u64> = match &p.region {
                    axsave_formats::catalog::Region::Box { sizes, .. } => sizes.clone(),
                    axsave_formats::catalog::Region::Flat { len, .. } => vec![*len],
                };
                if sizes.contains(&0) {
                    continue;
                }
                let mut lo = p.offset as i128;
                let mut hi = p.offset as i128;
                for (n, st) in sizes.iter().zip(&p.strides) {
                    let span = (*n as i128 - 1) * *st as i128 * elem as i128;
                    if span < 0 {
                        lo += span;
                    } else {
                        hi += span;
                    }
                }
                tensor.push((lo as u64, hi as u64 + elem));
            }
        }
        let checked = cat
            .records
            .iter()
            .filter(|r| r.file == fi)
            .map(|r| (r.checksum.offset, r.checksum.offset + r.checksum.len))
            .collect();
        ByteMap {
            tensor,
            checked,
            zip: zip_regions(data),
        }
    }

    fn is_tensor(&self, pos: u64) -> bool {
        self.tensor.iter().any(|&(a, b)| (a..b).contains(&pos))
    }

    fn describe(&self, pos: u64) -> String {
        if self.is_tensor(pos) {
            return "tensor data".into();
        }
        if self.checked.iter().any(|&(a, b)| (a..b).contains(&pos)) {
            return "CRC-checked record, outside any piece (padding)".into();
        }
        match self.zip.iter().find(|(a, b, _)| (*a..*b).contains(&pos)) {
            Some((a, b, label)) if label.starts_with("record ") => {
                if self.tensor.iter().any(|&(x, y)| x < *b && *a < y) {
                    format!("{label} (tensor record, outside the pieces)")
                } else if label.ends_with("data.pkl") {
                    format!("{label} (pickle byte whose value is not used)")
                } else {
                    format!("{label} (never read)")
                }
            }
            Some((_, _, label)) => label.clone(),
            None => "unknown (not in a parsed zip)".into(),
        }
    }
}

fn u16_at(d: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_le_bytes(d.get(i..i + 2)?.try_into().ok()?))
}

/// The zip structure of a file made of one or more archives back to back (a `.distcp` is a
/// sequence of torch.save archives; a `.pt` file is one): each record's local header, name,
/// alignment padding, data and descriptor, and the central directories.
fn zip_regions(data: &[u8]) -> Vec<(u64, u64, String)> {
    let mut out = Vec::new();
    let mut start = 0usize;
    let mut i = 0usize;
    while i + 22 <= data.len() {
        if data[i..i + 4] != [0x50, 0x4b, 0x05, 0x06] || u16_at(data, i + 20) != Some(0) {
            i += 1;
            continue;
        }
        let end = i + 22;
        let item = &data[start..end];
        if let Ok(z) = axsave_formats::zip::ZipIndex::parse(item) {
            let mut entries: Vec<_> = z.entries().to_vec();
            entries.sort_by_key(|e| e.data_offset);
            let mut spans = Vec::new();
            for e in &entries {
                let short = e.name.split_once('/').map(|x| x.1).unwrap_or(&e.name);
                let dof = e.data_offset as usize;
                let nl = e.name.len();
                let local = (0..=u16::MAX as usize).find_map(|k| {
                    let l = dof.checked_sub(30 + nl + k)?;
                    (item.get(l..l + 4) == Some(&[0x50, 0x4b, 0x03, 0x04][..])
                        && u16_at(item, l + 28) == Some(k as u16)
                        && u16_at(item, l + 26) == Some(nl as u16))
                    .then_some(l)
                });
                let Some(l) = local else { continue };
                let dend = dof + e.size as usize;
                spans.push((l, l + 30, format!("zip local header of {short}")));
                spans.push((
                    l + 30,
                    l + 30 + nl,
                    format!("zip local header name of {short}"),
                ));
                spans.push((
                    l + 30 + nl,
                    dof,
                    format!("zip alignment padding of {short}"),
                ));
                spans.push((dof, dend, format!("record {short}")));
            }
            // Between a record and the next local header: its data descriptor; after the last
            // record: its descriptor, then the central directory and the end records.
            let mut gaps = Vec::new();
            for w in 0..spans.len() {
                if spans[w].2.starts_with("record ") {
                    let from = spans[w].1;
                    let next = spans.get(w + 1).map(|s| s.0);
                    let name = spans[w].2.trim_start_matches("record ").to_string();
                    match next {
                        Some(n) => gaps.push((from, n, format!("zip data descriptor of {name}"))),
                        None => {
                            let cd = (from..item.len().saturating_sub(4))
                                .find(|&p| item[p..p + 4] == [0x50, 0x4b, 0x01, 0x02])
                                .unwrap_or(item.len());
                            gaps.push((from, cd, format!("zip data descriptor of {name}")));
                            gaps.push((
                                cd,
                                item.len(),
                                "zip central directory / end records".to_string(),
                            ));
                        }
                    }
                }
            }
            for (a, b, l) in spans.into_iter().chain(gaps) {
                out.push(((start + a) as u64, (start + b) as u64, l));
            }
        }
        start = end;
        i = end;
    }
    out
}

/// One run per position: `positions` spread evenly over the file (a seeded position in each
/// of `positions` equal slices), each byte XORed with a seeded non-zero value.
fn flip_matrix(targets: &[FlipTarget], positions: u64, seed: u64, tally: &mut Tally) {
    let mut rng = Rng(seed);
    for tg in targets {
        let t = tempfile::tempdir().unwrap();
        let ckpt = t.path().join("ckpt");
        copy_dir(&tg.fx.checkpoint(), &ckpt);
        let file = ckpt.join(tg.rel);
        let base = file.file_name().unwrap().to_string_lossy().into_owned();
        let orig = std::fs::read(&file).unwrap();
        let map = ByteMap::new(&ckpt, tg.rel, &orig);
        let reference = std::fs::read(tg.fx.reference()).unwrap();
        let len = orig.len() as u64;
        let case = format!("flipped byte in {}/{base} ({len} B)", tg.fx.name);
        let mut harmless: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut errors: BTreeMap<String, u32> = BTreeMap::new();
        for i in 0..positions {
            let (lo, hi) = (i * len / positions, (i + 1) * len / positions);
            let pos = lo + rng.below((hi - lo).max(1));
            let x = 1 + rng.below(255) as u8;
            let mut d = orig.clone();
            d[pos as usize] ^= x;
            std::fs::write(&file, &d).unwrap();
            let out = t.path().join(format!("out{i}"));
            let o = axsave(&["--source", s(&ckpt), "--output", s(&out), "-q"]);
            let err = stderr(&o);
            let what = map.describe(pos);
            let r = match o.status.code() {
                Some(1) if err.contains("panicked") => Err(format!("panic: {err}")),
                Some(1) if !err.contains(&base) => {
                    Err(format!("the error does not name {base}: {err}"))
                }
                Some(1) if !listing(&out).is_empty() => {
                    Err(format!("failed but left {:?}", listing(&out)))
                }
                Some(1) => {
                    let kind = err
                        .lines()
                        .rev()
                        .find(|l| l.contains("ERROR"))
                        .map(error_kind)
                        .unwrap_or_else(|| "?".into());
                    *errors.entry(kind).or_default() += 1;
                    Ok(())
                }
                Some(0) => {
                    let got = std::fs::read(out.join("model.safetensors")).unwrap_or_default();
                    if got != reference {
                        Err(format!("succeeded with a DIFFERENT model ({what}): {err}"))
                    } else if what == "tensor data" || what.starts_with("CRC-checked") {
                        Err(format!(
                            "damage in {what} went unnoticed (output identical)"
                        ))
                    } else if listing(&out) != ["model.safetensors"] {
                        Err(format!("left {:?}", listing(&out)))
                    } else {
                        harmless.entry(what.clone()).or_default().push(pos);
                        Ok(())
                    }
                }
                c => Err(format!("exit {c:?}: {err}")),
            };
            tally.add(
                &case,
                r.map_err(|e| format!("byte {pos} ^ 0x{x:02x} ({what}): {e}")),
            );
        }
        std::fs::write(&file, &orig).unwrap();
        let n_harmless: usize = harmless.values().map(Vec::len).sum();
        tally.note(format!(
            "{}/{base}: {} detected, {n_harmless} harmless (output byte-identical)",
            tg.fx.name,
            positions as usize - n_harmless
        ));
        for (k, c) in &errors {
            tally.note(format!("    detected as: {k} x{c}"));
        }
        for (what, at) in &harmless {
            tally.note(format!("    harmless: {what}: bytes {at:?}"));
        }
    }
}

/// The kind of an error line, numbers replaced by `N` (for the summary).
fn error_kind(line: &str) -> String {
    let msg = line.split_once(": ").map(|x| x.1).unwrap_or(line);
    let mut s = String::new();
    for c in msg.chars() {
        if c.is_ascii_digit() {
            if !s.ends_with('N') {
                s.push('N');
            }
        } else {
            s.push(c);
        }
    }
    for cut in [" (crcN", " is torch", " says \""] {
        if let Some(i) = s.find(cut) {
            s.truncate(i);
        }
    }
    s.chars().take(90).collect()
}

fn flip_targets(stress: bool) -> Vec<FlipTarget> {
    let mut v = vec![
        FlipTarget {
            fx: FSDP_W2,
            rel: "__1_0.distcp",
        },
        FlipTarget {
            fx: ZERO2_W2,
            rel: OPTIM1,
        },
    ];
    if stress {
        v.push(FlipTarget {
            fx: ZERO3_W3,
            rel: "global_step2/bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
        });
    }
    v
}

#[test]
fn flipped_bytes() {
    let mut tally = Tally::default();
    flip_matrix(&flip_targets(false), 10, 7, &mut tally);
    tally.finish("3. flipped bytes", true);
}

/// One flipped byte in the pickle (`data.pkl`) of a DeepSpeed model-states file. FAILS at
/// present (a bug this suite found): axsave does not check `data.pkl` against the CRC-32 the
/// archive's central directory records for it, so a damaged parameter name or key is read as
/// is and the save succeeds with a different model: a tensor renamed, or the frozen
/// parameters silently left out (`frozen_param_shapes` no longer found). The flips in
/// `flipped_bytes` hit the optimizer files, whose pickles carry no names.
#[test]
fn torch_save_pickle_damage_is_detected() {
    const MODEL2: &str = "global_step2/mp_rank_00_model_states.pt";
    const MODEL3: &str = "global_step2/zero_pp_rank_0_mp_rank_00_model_states.pt";
    /// What is damaged, the fixture, the file, and the bytes replaced and their replacement.
    type Case<'a> = (&'a str, Fx, &'a str, &'a [u8], &'a [u8]);
    let cases: [Case; 3] = [
        (
            "ZeRO-2 model states: key frozen_param_shapes (frozen parameters dropped)",
            ZERO2_W2,
            MODEL2,
            b"\x13\x00\x00\x00frozen_param_shapes",
            b"\x13\x00\x00\x00grozen_param_shapes",
        ),
        (
            "ZeRO-2 model states: a name in param_shapes (tensor renamed)",
            ZERO2_W2,
            MODEL2,
            b"embed.weightq\x82ctorch\nSize",
            b"embee.weightq\x82ctorch\nSize",
        ),
        (
            "ZeRO-3 model states: a name in param_shapes (tensor renamed)",
            ZERO3_W2,
            MODEL3,
            b"conv.weightq\x8ch",
            b"conv.weighuq\x8ch",
        ),
    ];
    let mut tally = Tally::default();
    for (name, fx, rel, from, to) in cases {
        let t = tempfile::tempdir().unwrap();
        let c = ckpt_copy(fx, t.path());
        edit(&c.join(rel), |d| replace_once(d, from, to));
        let out = t.path().join("out");
        let o = axsave(&["--source", s(&c), "--output", s(&out), "-q"]);
        let err = stderr(&o);
        let base = Path::new(rel).file_name().unwrap().to_string_lossy();
        let r = match o.status.code() {
            Some(1)
                if err.contains(&*base)
                    && !err.contains("panicked")
                    && listing(&out).is_empty() =>
            {
                Ok(())
            }
            Some(0) => {
                let got: Vec<String> = tensors(&out).into_keys().collect();
                let want: Vec<String> = tensors(&fx.reference()).into_keys().collect();
                Err(format!(
                    "succeeded with a different model: tensors {got:?}, the reference has {want:?}"
                ))
            }
            c => Err(format!("exit {c:?}: {err}")),
        };
        tally.add(name, r);
    }
    tally.finish("3b. flipped byte in a torch.save pickle (data.pkl)", true);
}

// ---------------------------------------------------------------------------------------------
// 4. A full disk
// ---------------------------------------------------------------------------------------------

/// A filesystem mounted by the test, unmounted when dropped.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    fn tmpfs(dir: &Path, bytes: u64) -> Result<Mounted, String> {
        std::fs::create_dir_all(dir).unwrap();
        run_tool(Command::new("mount").args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={bytes}"),
            "tmpfs",
            s(dir),
        ]))?;
        Ok(Mounted {
            dir: dir.to_path_buf(),
        })
    }

    /// An ext4 image of `bytes` made with mkfs.ext4 and loop-mounted.
    fn ext4(dir: &Path, image: &Path, bytes: u64) -> Result<Mounted, String> {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::File::create(image)
            .and_then(|f| f.set_len(bytes))
            .map_err(|e| e.to_string())?;
        run_tool(Command::new("mkfs.ext4").args(["-q", "-F", s(image)]))?;
        run_tool(Command::new("mount").args(["-o", "loop", s(image), s(dir)]))?;
        Ok(Mounted {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn run_tool(c: &mut Command) -> Result<(), String> {
    let o = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{c:?}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{c:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let o = Command::new("df")
        .args(["-B1", "--output=avail", s(dir)])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

fn page_size() -> u64 {
    Command::new("getconf")
        .arg("PAGESIZE")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(4096)
}

/// Checks a run that must fail with ENOSPC: every rank exit 1, the message, no panic, nothing
/// of the model left in `out`.
fn check_enospc(res: &[(Option<i32>, String)], out: &Path) -> Result<(), String> {
    for (r, (code, text)) in res.iter().enumerate() {
        if !matches!(code, Some(c) if *c != 0 && *c != -999) {
            return Err(format!("rank {r} exited {code:?}: {text}"));
        }
        if text.contains("panicked") {
            return Err(format!("rank {r} panicked: {text}"));
        }
    }
    let all: String = res.iter().map(|(_, t)| t.as_str()).collect();
    if !(all.contains("No space left on device") && all.contains(".safetensors")) {
        return Err(format!("no ENOSPC naming the file: {all}"));
    }
    let left: Vec<String> = listing(out)
        .into_iter()
        .filter(|n| n != "lost+found" && n != "filler")
        .collect();
    if !left.is_empty() {
        return Err(format!("left behind: {left:?}"));
    }
    Ok(())
}

fn one(args: &[&str]) -> Vec<(Option<i32>, String)> {
    let o = axsave(args);
    vec![(o.status.code(), stderr(&o))]
}

fn ranks(n: usize, args: &[&str]) -> Vec<(Option<i32>, String)> {
    let mut a: Vec<&str> = args.to_vec();
    a.extend(["--timeout", "10"]);
    wait_ranks(
        spawn_ranks(n, &a, &|_| Vec::new()),
        Duration::from_secs(120),
    )
    .into_iter()
    .map(|(c, t, _)| (c, t))
    .collect()
}

#[test]
fn disk_full() {
    let mut tally = Tally::default();
    let demo = fixture("dcp/demo_w4/checkpoint");
    let demo = s(&demo);
    let t = tempfile::tempdir().unwrap();
    let page = page_size();

    // tmpfs
    let probe = t.path().join("probe");
    match Mounted::tmpfs(&probe, 64 << 10) {
        Err(why) => tally.note(format!("tmpfs: skipped, cannot mount: {why}")),
        Ok(m) => {
            drop(m);
            tally.note("tmpfs: mounting works".into());
            let case = |name: &str| format!("tmpfs: {name}");
            // One process, output 266 KB, 64 KiB of room: fails at preallocation.
            let dir = t.path().join("t1");
            let r = Mounted::tmpfs(&dir, 64 << 10).and_then(|_m| {
                check_enospc(&one(&["--source", demo, "--output", s(&dir), "-q"]), &dir)
            });
            tally.add(&case("1 process, 64 KiB for 266 KB"), r);

            // The data files fit exactly; the index, written in the commit, does not.
            let reference = t.path().join("ref");
            assert_ok(&axsave(&[
                "--source",
                demo,
                "--output",
                s(&reference),
                "-q",
                "--max-shard-size",
                "100KB",
            ]));
            let pages: u64 = listing(&reference)
                .iter()
                .filter(|n| n.ends_with(".safetensors"))
                .map(|n| {
                    std::fs::metadata(reference.join(n))
                        .unwrap()
                        .len()
                        .div_ceil(page)
                })
                .sum();
            let dir = t.path().join("t2");
            // One page more for the output lock (`.axsave.lock`, which records its holder).
            let r = Mounted::tmpfs(&dir, (pages + 1) * page).and_then(|_m| {
                let res = one(&[
                    "--source",
                    demo,
                    "--output",
                    s(&dir),
                    "-q",
                    "--max-shard-size",
                    "100KB",
                ]);
                if !res[0].1.contains("index.json") {
                    return Err(format!("expected the index write to fail: {}", res[0].1));
                }
                check_enospc(&res, &dir)
            });
            tally.add(&case("3 shards fit, the index does not (commit)"), r);

            // Two sharded ranks, room for one's files.
            let dir = t.path().join("t3");
            let r = Mounted::tmpfs(&dir, 160 << 10).and_then(|_m| {
                check_enospc(
                    &ranks(
                        2,
                        &[
                            "--source",
                            demo,
                            "--output",
                            s(&dir),
                            "-q",
                            "--mode",
                            "sharded",
                        ],
                    ),
                    &dir,
                )
            });
            tally.add(&case("2 ranks sharded, room for one"), r);
        }
    }

    // ext4 on a loop device, filled up by another file first.
    let probe = t.path().join("probe4");
    match Mounted::ext4(&probe, &t.path().join("probe.img"), 2 << 20) {
        Err(why) => tally.note(format!("loop-mounted ext4: skipped: {why}")),
        Ok(m) => {
            drop(m);
            tally.note("loop-mounted ext4: mkfs.ext4 + mount -o loop work".into());
            for (name, n) in [("1 process", 1usize), ("2 ranks gather", 2)] {
                let dir = t.path().join(format!("e{n}"));
                let r = Mounted::ext4(&dir, &t.path().join(format!("e{n}.img")), 2 << 20).and_then(
                    |_m| {
                        let room = 100 << 10;
                        let fill = free_bytes(&dir).saturating_sub(room);
                        std::fs::File::create(dir.join("filler"))
                            .and_then(|f| {
                                f.set_len(0)?;
                                std::io::Write::write_all(
                                    &mut std::io::BufWriter::new(&f),
                                    &vec![1u8; fill as usize],
                                )?;
                                f.sync_all()
                            })
                            .map_err(|e| e.to_string())?;
                        let out = dir.join("out");
                        let args = ["--source", demo, "--output", s(&out), "-q"];
                        let res = if n == 1 { one(&args) } else { ranks(n, &args) };
                        check_enospc(&res, &out)
                    },
                );
                tally.add(&format!("ext4 (loop): {name}, 100 KiB left for 266 KB"), r);
            }
        }
    }
    tally.finish("4. disk full", true);
}

// ---------------------------------------------------------------------------------------------
// 5. A source rewritten during a multi-rank save
// ---------------------------------------------------------------------------------------------

/// Rank `stall` stops at `copying`; the test rewrites `rewrite` (same bytes, a new mtime),
/// releases it, and every rank must fail with the identity check's message.
fn rewritten_run(
    n: usize,
    mode: &str,
    source: &str,
    rewrite: &[PathBuf],
    stall: usize,
) -> Result<(), String> {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let reached = t.path().join("reached");
    let release = t.path().join("release");
    let (r_s, rel_s) = (s(&reached).to_string(), s(&release).to_string());
    let env = move |r: usize| {
        if r == stall {
            vec![
                ("AXSAVE_FAULT".to_string(), format!("copying@{stall}")),
                ("AXSAVE_FAULT_FILE".to_string(), r_s.clone()),
                ("AXSAVE_FAULT_RELEASE".to_string(), rel_s.clone()),
            ]
        } else {
            Vec::new()
        }
    };
    let mut kids = spawn_ranks(
        n,
        &[
            "--source",
            source,
            "--output",
            s(&out),
            "-q",
            "--mode",
            mode,
            "--workers",
            "1",
            "--timeout",
            "30",
        ],
        &env,
    );
    let start = Instant::now();
    while !reached.exists() {
        if start.elapsed() > Duration::from_secs(120) || all_exited(&mut kids) {
            let res = wait_ranks(kids, Duration::ZERO);
            return Err(format!("rank {stall} never reached copying: {res:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for f in rewrite {
        let bytes = std::fs::read(f).unwrap();
        std::fs::write(f, &bytes).unwrap();
        let later = std::time::SystemTime::now() + Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(f)
            .and_then(|h| h.set_modified(later))
            .unwrap();
    }
    std::fs::write(&release, b"go").unwrap();
    let res = wait_ranks(kids, Duration::from_secs(120));
    for (r, (code, text, _)) in res.iter().enumerate() {
        if !matches!(code, Some(c) if *c != 0 && *c != -999) || text.contains("panicked") {
            return Err(format!("rank {r} exited {code:?}: {text}"));
        }
    }
    let all: String = res.iter().map(|(_, t, _)| t.as_str()).collect();
    let named = rewrite
        .iter()
        .any(|f| all.contains(&*f.file_name().unwrap().to_string_lossy()));
    if !(named && all.contains("changed while it was being read")) {
        return Err(format!(
            "no identity error naming the rewritten file: {all}"
        ));
    }
    if !listing(&out).is_empty() {
        return Err(format!("left {:?}", listing(&out)));
    }
    Ok(())
}

#[test]
fn source_rewritten_during_a_multirank_save() {
    let mut tally = Tally::default();
    // Node-local gather: rank 1 alone reads its shard, and sends it to rank 0.
    let (dir, template) = node_local(FSDP_W2, 2);
    let shard = dir.path().join("rank1/__1_0.distcp");
    tally.add(
        "node-local gather, rank 1's shard rewritten while it copies",
        rewritten_run(2, "gather", &template, &[shard], 1),
    );
    // Shared source, sharded: every data file rewritten while rank 1 is stalled.
    let t = tempfile::tempdir().unwrap();
    let ckpt = t.path().join("ckpt");
    copy_dir(&FSDP_W4.checkpoint(), &ckpt);
    let shards: Vec<PathBuf> = listing(&ckpt)
        .into_iter()
        .filter(|n| n.ends_with(".distcp"))
        .map(|n| ckpt.join(n))
        .collect();
    tally.add(
        "shared source, 3 ranks sharded, the shards rewritten while rank 1 copies",
        rewritten_run(3, "sharded", s(&ckpt), &shards, 1),
    );
    // DeepSpeed, node-local: rank 1's optimizer partition rewritten.
    let (dir, template) = node_local(ZERO3_W2, 2);
    let optim = dir.path().join("rank1").join(OPTIM1);
    tally.add(
        "DeepSpeed node-local gather, rank 1's optim file rewritten",
        rewritten_run(2, "gather", &template, &[optim], 1),
    );
    tally.finish("5. source rewritten during a save", true);
}

// ---------------------------------------------------------------------------------------------
// The randomized matrix (scripts/stress.sh)
// ---------------------------------------------------------------------------------------------

/// Kills at random (RUNS runs) and flipped bytes (POSITIONS per file): run by
/// `scripts/stress.sh [RUNS]` in release.
#[test]
fn stress_matrix() {
    let Some(runs) = env_u64("AXSAVE_STRESS_RUNS") else {
        say(
            "stress_matrix: skipped (long; scripts/stress.sh runs it with AXSAVE_STRESS_RUNS set)\n",
        );
        return;
    };
    let positions = env_u64("AXSAVE_STRESS_POSITIONS").unwrap_or(50);
    let seed = env_u64("AXSAVE_STRESS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    say(&format!(
        "stress: {runs} kill runs, {positions} flipped positions per file, seed {seed} (AXSAVE_STRESS_SEED={seed} repeats it)\n"
    ));
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut tally = Tally::default();

    // Baselines: each configuration once without a fault (its duration scales the delays).
    let mut baseline: BTreeMap<(Fx, usize, &str, bool), Duration> = BTreeMap::new();
    let mut plan = Vec::new();
    // Formats x modes x sources cycle through all 8 combinations every 8 runs (from a random
    // start), and the moments through joined / copying / synced / 3 x a random delay, so that
    // even a short run covers every dimension; the rest is random.
    let (c0, w0) = (rng.below(8), rng.below(6));
    for i in 0..runs {
        let n = 2 + rng.below(3) as usize;
        let combo = (i + c0) % 8;
        let mode = if combo & 1 == 0 { "gather" } else { "sharded" };
        let local = combo & 2 != 0;
        let fx = if combo & 4 == 0 {
            *rng.pick(&[FSDP_W2, FSDP_W4])
        } else if local {
            // A node-local ZeRO-3 rank that sees none of the files is refused (see the report).
            let ok: Vec<Fx> = [ZERO2_W2, ZERO3_W2, ZERO3_W3]
                .into_iter()
                .filter(|f| f.name.starts_with("zero2") || f.writers() >= n)
                .collect();
            *rng.pick(&ok)
        } else {
            *rng.pick(&[ZERO2_W2, ZERO3_W2, ZERO3_W3])
        };
        // Every third run kills rank 0 (the store's host and the committer).
        let victim = if i % 3 == 0 {
            0
        } else {
            rng.below(n as u64) as usize
        };
        let when = match (i + w0) % 6 {
            0 => When::Point("joined"),
            1 => When::Point("copying"),
            2 => When::Point("synced"),
            _ => When::Delay(Duration::ZERO), // filled in below, from the baseline
        };
        plan.push((
            KillRun {
                fx,
                n,
                mode,
                node_local: local,
                victim,
                when,
            },
            rng.next(),
        ));
    }
    for (k, r) in &mut plan {
        let key = (k.fx, k.n, k.mode, k.node_local);
        if let std::collections::btree_map::Entry::Vacant(slot) = baseline.entry(key) {
            let (_local, source) = if k.node_local {
                let (t, s) = node_local(k.fx, k.n);
                (Some(t), s)
            } else {
                (None, s(&k.fx.checkpoint()).to_string())
            };
            let out = tempfile::tempdir().unwrap();
            let o = out.path().join("out");
            let t0 = Instant::now();
            let res = wait_ranks(
                spawn_ranks(
                    k.n,
                    &[
                        "--source",
                        &source,
                        "--output",
                        s(&o),
                        "-q",
                        "--mode",
                        k.mode,
                    ],
                    &|_| Vec::new(),
                ),
                Duration::from_secs(120),
            );
            let took = t0.elapsed();
            let ok = res.iter().all(|(c, _, _)| *c == Some(0));
            let r0 = if ok {
                holds_reference(&o, &k.fx.reference(), k.mode)
            } else {
                Err(format!("{res:?}"))
            };
            tally.add("baseline save (no fault)", r0);
            slot.insert(took);
        }
        if let When::Delay(_) = k.when {
            // Uniform over the save's duration, and a little beyond it.
            let span = baseline[&key].as_micros() as u64 * 12 / 10 + 1;
            k.when = When::Delay(Duration::from_micros(*r % span));
        }
    }
    let kills: Vec<KillRun> = plan.into_iter().map(|(k, _)| k).collect();
    let victims0 = kills.iter().filter(|k| k.victim == 0).count();
    kill_matrix(&kills, &mut tally);
    tally.note(format!(
        "kill runs: {} with rank 0 as the victim; world sizes {:?}; {} DCP / {} DeepSpeed; {} node-local; {} sharded",
        victims0,
        kills.iter().map(|k| k.n).collect::<Vec<_>>(),
        kills.iter().filter(|k| k.fx.kind == Kind::Dcp).count(),
        kills.iter().filter(|k| k.fx.kind == Kind::DeepSpeed).count(),
        kills.iter().filter(|k| k.node_local).count(),
        kills.iter().filter(|k| k.mode == "sharded").count(),
    ));
    let kill_time = started.elapsed();

    flip_matrix(&flip_targets(true), positions, rng.next(), &mut tally);
    tally.note(format!(
        "time: kills {kill_time:.1?}, flips {:.1?}, total {:.1?}; seed {seed}",
        started.elapsed() - kill_time,
        started.elapsed()
    ));
    tally.finish("stress matrix", false);
}
