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
//! 1. `kill::killed_ranks` (and `kill::sharded_marker_is_removed_when_rank0_dies`): a rank SIGKILLed at a fault-hook point or right after the start, for
//!    points, modes, formats and sources that `tests/multirank.rs` does not already kill
//!    (rank 0 included): rank 0 at `joined` in sharded mode, a sharded writer at `copying`, a
//!    DeepSpeed sender at `copying`, rank 0 at `synced` in gather and in sharded mode, a
//!    non-writer at `synced`, rank 0 before the store is up, a rank before it joins.
//! 2. `damage::damaged_inputs`: 20 kinds of damaged or hostile input, one table (truncated zips,
//!    damaged central directories, metadata naming missing files, offsets past the end,
//!    unknown dtypes in DCP metadata / torch.save / safetensors, shapes whose size overflows,
//!    safetensors headers too large or overlapping, pickles with a bad opcode or nested 10,000
//!    deep, ZeRO partition counts that do not match the files, YAML with a wrong type, and an
//!    existing model without `--force`): exit 1, the file named, the message, no panic,
//!    nothing written (the existing model untouched).
//! 3. `flips::flipped_bytes` (and `flips::torch_save_pickle_damage_is_detected`): one seeded byte flip per run at 10 positions spread over a whole
//!    `.distcp` and a whole ZeRO optimizer file: a clear error naming the file, or (only where
//!    the byte is not tensor data) an output byte-identical to the reference. Each harmless
//!    position is printed with what the byte is (zip header field, padding, descriptor,
//!    pickle byte whose value is not used, record never read).
//! 4. `disk::disk_full`: the output directory on a small tmpfs and on a loop-mounted ext4 image
//!    (made here, as root): ENOSPC at preallocation (one process, two sharded ranks, two
//!    gather ranks) and at the index write in the commit; temporaries removed, nothing
//!    final-named. Skipped, saying why, where mounting is impossible.
//! 5. `rewrite::source_rewritten_during_a_multirank_save`: a shard rewritten while a rank is stalled
//!    at `copying` (node-local gather, and shared-source sharded): refused by the identity
//!    check on every rank.
//!
//! `stress_matrix` (skipped unless `AXSAVE_STRESS_RUNS` is set; `scripts/stress.sh [RUNS]`
//! runs it in release) randomizes 1 and 3: RUNS (default 24) kills with random victims,
//! moments (random delays after the start, or a hook point), world sizes 2–4, gather /
//! sharded, DCP / DeepSpeed, node-local / shared; and 50 flipped positions per file over a
//! `.distcp` and two ZeRO optimizer files (stage 2 and 3). `AXSAVE_STRESS_RUNS`, `AXSAVE_STRESS_POSITIONS`, `AXSAVE_STRESS_SEED` set it up.

#[path = "../common/mod.rs"]
mod common;
mod damage;
mod disk;
mod flips;
mod kill;
mod rewrite;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use flips::{flip_matrix, flip_targets};
use kill::{KillRun, When, kill_matrix};

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
                    "\n== fault matrix (tests/faults/), all cases: {passed} of {runs} runs passed\n{}",
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
