//! axsave under a real Slurm (one node, `localhost`): `srun -n N axsave` in gather and sharded
//! mode, with `--gpus-per-task`, with `--mpi=pmi2|pmix`, node-local sources, a failing and a
//! killed rank; a batch script that runs axsave without `srun` (no step: one process, saving
//! alone); `mpirun` in a batch script and inside a step; and the example jobs in
//! `scripts/slurm/`.
//!
//! These tests need a running cluster: `scripts/test-slurm.sh` installs Slurm and munge if
//! missing, starts them with a configuration of its own, runs these tests with
//! `AXSAVE_TEST_SLURM_CONF` set to that `slurm.conf`, and stops them. Without that variable every
//! test here says it is skipping and passes.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Longest any one srun or batch job may take before the test gives up (and cancels it).
const LIMIT: Duration = Duration::from_secs(120);

/// The test cluster's slurm.conf, or `None` (after saying so) when there is none.
fn cluster() -> Option<PathBuf> {
    match std::env::var_os("AXSAVE_TEST_SLURM_CONF") {
        Some(c) => Some(PathBuf::from(c)),
        None => {
            eprintln!(
                "skipping: no Slurm cluster (scripts/test-slurm.sh starts one and runs these)"
            );
            None
        }
    }
}

/// A Slurm client command aimed at the test cluster, with no launcher variables inherited from
/// whoever runs the tests (an outer Slurm job's SLURM_JOB_ID would make srun look for that job).
fn slurm(conf: &Path, program: &str) -> Command {
    let mut c = Command::new(program);
    clean_env(&mut c);
    c.env("SLURM_CONF", conf);
    c
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn text(&self) -> String {
        format!(
            "exit {:?} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.took, self.stdout, self.stderr
        )
    }

    /// The first JSON object on stdout (rank 0's `--json` summary).
    fn json(&self) -> serde_json::Value {
        let start = self
            .stdout
            .find("{\n")
            .unwrap_or_else(|| panic!("no JSON summary:\n{}", self.text()));
        serde_json::Deserializer::from_str(&self.stdout[start..])
            .into_iter::<serde_json::Value>()
            .next()
            .unwrap()
            .unwrap()
    }
}

/// Runs `c` to the end (killing it after `LIMIT`), keeping stdout and stderr apart.
fn run(mut c: Command) -> Run {
    let start = Instant::now();
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        took: start.elapsed(),
    }
}

/// `srun <opts> axsave <args>`.
fn srun(conf: &Path, opts: &[&str], args: &[&str]) -> Run {
    let mut c = slurm(conf, "srun");
    c.args(["--job-name=axsave-test", "--time=3", "--kill-on-bad-exit=0"])
        .args(opts)
        .arg(bin())
        .args(args);
    run(c)
}

/// Submits `script` with `sbatch <opts>` and waits for the job to end (polling `scontrol`,
/// which answers at once; `sbatch --wait` polls at growing intervals, 2 s then 10 s then 42 s).
/// Returns the job's final state, its exit code and what the script printed.
fn sbatch(conf: &Path, opts: &[&str], env: &[(&str, String)], script: &Path) -> (String, Run) {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut c = slurm(conf, "sbatch");
    c.args(["--parsable", "--job-name=axsave-test", "--time=3"])
        .arg(format!("--output={}", out.display()))
        .arg(format!("--error={}", err.display()))
        .args(opts)
        .arg(script)
        .envs(env.iter().map(|(k, v)| (k, v)));
    let submitted = run(c);
    assert_eq!(submitted.code, Some(0), "sbatch: {}", submitted.text());
    let id = submitted
        .stdout
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let start = Instant::now();
    let (state, exit) = loop {
        let mut q = slurm(conf, "scontrol");
        q.args(["show", "job", "-o", &id]);
        let shown = run(q);
        let field = |k: &str| {
            shown
                .stdout
                .split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .map(str::to_string)
        };
        let state = field("JobState=").unwrap_or_default();
        if !["PENDING", "CONFIGURING", "RUNNING", "COMPLETING", ""].contains(&state.as_str()) {
            break (state, field("ExitCode=").unwrap_or_default());
        }
        if start.elapsed() > LIMIT {
            let mut cancel = slurm(conf, "scancel");
            cancel.arg(&id);
            run(cancel);
            break ("TIMEOUT (test)".to_string(), String::new());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let r = Run {
        code: exit
            .split(':')
            .next()
            .and_then(|c| c.parse().ok())
            .filter(|_| state == "COMPLETED" || state == "FAILED"),
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
        took: start.elapsed(),
    };
    (state, r)
}

fn assert_byte_identical(file: &Path, reference: &Path) {
    assert!(
        std::fs::read(file).unwrap() == std::fs::read(reference).unwrap(),
        "{} differs from {}",
        file.display(),
        reference.display()
    );
}

/// A sharded output: at least `n` shards and an index, no temporaries, the reference's tensors,
/// and consolidated again by a single axsave into one file, byte-identical to the reference.
fn assert_sharded_output(out: &Path, n: usize, reference: &Path) {
    let files = listing(out);
    let shards = files.iter().filter(|f| f.ends_with(".safetensors")).count();
    assert!(shards >= n, "only {shards} files for {n} ranks: {files:?}");
    assert!(files.contains(&"model.safetensors.index.json".to_string()));
    assert!(
        files.iter().all(|f| !f.contains("axsave")),
        "temporaries left: {files:?}"
    );
    let (got, want) = (tensors(out), tensors(reference));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, v) in &want {
        assert_eq!(&got[k], v, "tensor {k}");
    }
    let one = tempfile::tempdir().unwrap();
    assert_ok(&axsave(&[
        "--source",
        s(out),
        "--output",
        s(one.path()),
        "-q",
    ]));
    assert_byte_identical(&one.path().join("model.safetensors"), reference);
}

fn assert_world(r: &Run, launcher: &str, world: u64) {
    let v = r.json();
    assert_eq!(v["launcher"], launcher, "{}", r.text());
    assert_eq!(v["world_size"], world, "{}", r.text());
}

/// Rank r's directory holds only `__r_*.distcp` (and rank 0's the metadata), as node-local
/// disks would; rank `missing`'s directory is left out. Returns the `{rank}` template.
fn node_local_copy(t: &Path, fixture_name: &str, n: usize, missing: Option<usize>) -> String {
    let src = fixture(&format!("dcp/{fixture_name}/checkpoint"));
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let owner = dcp_writer(&name);
        assert!(owner < n);
        if Some(owner) == missing {
            continue;
        }
        let dir = t.join(format!("rank{owner}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(e.path(), dir.join(&name)).unwrap();
    }
    format!("{}/rank{{rank}}", t.display())
}

#[test]
fn srun_gather_is_byte_identical() {
    let Some(conf) = cluster() else { return };
    let src = fixture("dcp/fsdp_w4/checkpoint");
    let reference = fixture("dcp/fsdp_w4/reference.safetensors");
    let cases: &[(&[&str], u64)] = &[
        (&["-n", "1"], 1),
        (&["-n", "2"], 2),
        (&["-n", "4"], 4),
        (&["-n", "8"], 8),
        // The README's form, and one GPU per task (the test node has 8 placeholder GPUs).
        (
            &["--nodes=1", "--ntasks-per-node=4", "--gpus-per-task=1"],
            4,
        ),
    ];
    for (opts, n) in cases {
        let out = tempfile::tempdir().unwrap();
        let r = srun(
            &conf,
            opts,
            &["--source", s(&src), "--output", s(out.path()), "--json"],
        );
        assert_eq!(r.code, Some(0), "srun {opts:?}: {}", r.text());
        assert_eq!(listing(out.path()), ["model.safetensors"], "srun {opts:?}");
        assert_byte_identical(&out.path().join("model.safetensors"), &reference);
        assert_world(&r, "slurm", *n);
    }
}

#[test]
fn srun_sharded_writes_a_file_per_rank() {
    let Some(conf) = cluster() else { return };
    let src = fixture("dcp/fsdp_w8/checkpoint");
    let reference = fixture("dcp/fsdp_w8/reference.safetensors");
    for n in [2usize, 4] {
        let out = tempfile::tempdir().unwrap();
        let r = srun(
            &conf,
            &["-n", &n.to_string()],
            &[
                "--source",
                s(&src),
                "--output",
                s(out.path()),
                "--mode",
                "sharded",
                "--json",
            ],
        );
        assert_eq!(r.code, Some(0), "{n} ranks: {}", r.text());
        assert_world(&r, "slurm", n as u64);
        assert_sharded_output(out.path(), n, &reference);
    }
}

/// `srun --mpi=pmi2|pmix` adds PMI_RANK/PMI_SIZE or PMIX_RANK to the step: still one Slurm
/// world of 4, not 4 worlds of 1.
#[test]
fn srun_with_pmi2_and_pmix_is_one_slurm_world() {
    let Some(conf) = cluster() else { return };
    let src = fixture("dcp/fsdp_w4/checkpoint");
    let reference = fixture("dcp/fsdp_w4/reference.safetensors");
    for mpi in ["pmi2", "pmix"] {
        let out = tempfile::tempdir().unwrap();
        let r = srun(
            &conf,
            &["-n", "4", &format!("--mpi={mpi}")],
            &["--source", s(&src), "--output", s(out.path()), "--json"],
        );
        assert_eq!(r.code, Some(0), "--mpi={mpi}: {}", r.text());
        assert_world(&r, "slurm", 4);
        assert_byte_identical(&out.path().join("model.safetensors"), &reference);
    }
}

/// Each task sees only its own rank's files (`{rank}` in --source): the pieces rank 0 cannot
/// read come over TCP.
#[test]
fn srun_node_local_sources_cross_tcp() {
    let Some(conf) = cluster() else { return };
    let t = tempfile::tempdir().unwrap();
    let template = node_local_copy(t.path(), "fsdp_w4", 4, None);
    let reference = fixture("dcp/fsdp_w4/reference.safetensors");
    for mode in ["gather", "sharded"] {
        let out = tempfile::tempdir().unwrap();
        let r = srun(
            &conf,
            &["-n", "4"],
            &[
                "--source",
                &template,
                "--output",
                s(out.path()),
                "--mode",
                mode,
                "--json",
            ],
        );
        assert_eq!(r.code, Some(0), "{mode}: {}", r.text());
        let v = r.json();
        assert!(v["network_bytes"].as_u64().unwrap() > 0, "{mode}: {v}");
        if mode == "gather" {
            assert_byte_identical(&out.path().join("model.safetensors"), &reference);
        } else {
            assert_sharded_output(out.path(), 4, &reference);
        }
    }
}

/// Runs axsave as every task of `srun -n 4` through a shell that records each task's pid (in
/// `dir/pid.<rank>`) and prints `axsave-exit <rank> <code>`; returns the srun run and the exit
/// code of each rank.
fn srun_recording_exits(
    conf: &Path,
    dir: &Path,
    env: &[(&str, String)],
    args: &[&str],
    on_start: impl FnOnce(),
) -> (Run, Vec<Option<i32>>) {
    let mut c = slurm(conf, "srun");
    c.args([
        "--job-name=axsave-test",
        "--time=3",
        "--kill-on-bad-exit=0",
        "-n",
        "4",
        "bash",
        "-c",
        r#"d=$1; shift; "$0" "$@" & p=$!; echo $p > "$d/pid.$SLURM_PROCID"; wait $p; echo "axsave-exit $SLURM_PROCID $?""#,
    ])
    .arg(bin())
    .arg(dir)
    .args(args)
    .envs(env.iter().map(|(k, v)| (k, v)));
    let handle = std::thread::spawn(move || run(c));
    on_start();
    let r = handle.join().unwrap();
    let mut exits = vec![None; 4];
    for line in r.stdout.lines() {
        if let Some(rest) = line.strip_prefix("axsave-exit ") {
            let mut it = rest.split_whitespace().map(|x| x.parse::<i32>().unwrap());
            let (rank, code) = (it.next().unwrap(), it.next().unwrap());
            exits[rank as usize] = Some(code);
        }
    }
    (r, exits)
}

/// A rank whose node-local directory lacks its files makes the save fail on every rank, at
/// once, and leaves nothing in the output directory.
#[test]
fn srun_a_failing_rank_fails_every_rank() {
    let Some(conf) = cluster() else { return };
    let t = tempfile::tempdir().unwrap();
    let template = node_local_copy(t.path(), "fsdp_w4", 4, Some(3));
    let out = t.path().join("out");
    let (r, exits) = srun_recording_exits(
        &conf,
        t.path(),
        &[],
        &["--source", &template, "--output", s(&out), "--timeout", "5"],
        || {},
    );
    for (rank, code) in exits.iter().enumerate() {
        assert!(
            matches!(code, Some(c) if *c != 0),
            "rank {rank} exited {code:?}:\n{}",
            r.text()
        );
    }
    assert!(r.took < Duration::from_secs(30), "{}", r.text());
    assert_no_output(&out);
}

/// A rank killed (SIGKILL) in the middle of sending its pieces: srun does not kill the others
/// (--kill-on-bad-exit=0), and they all give up, non-zero, within about --timeout.
#[test]
fn srun_a_killed_rank_never_hangs_the_others() {
    let Some(conf) = cluster() else { return };
    let t = tempfile::tempdir().unwrap();
    let template = node_local_copy(t.path(), "fsdp_w4", 4, None);
    let out = t.path().join("out");
    let reached = t.path().join("reached");
    let timeout = 4;
    let mut killed_at = None;
    let (r, exits) = srun_recording_exits(
        &conf,
        t.path(),
        &[
            ("AXSAVE_FAULT", "copying@3".to_string()),
            ("AXSAVE_FAULT_FILE", s(&reached).to_string()),
        ],
        &[
            "--source",
            &template,
            "--output",
            s(&out),
            "--timeout",
            &timeout.to_string(),
            "-q",
        ],
        || {
            let start = Instant::now();
            let pid_file = t.path().join("pid.3");
            while !(reached.exists() && pid_file.exists()) {
                assert!(start.elapsed() < LIMIT, "rank 3 never reached `copying`");
                std::thread::sleep(Duration::from_millis(20));
            }
            let pid: i32 = std::fs::read_to_string(&pid_file)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            // The axsave process of rank 3, started by this test through srun.
            assert!(
                Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .unwrap()
                    .success()
            );
            killed_at = Some(Instant::now());
        },
    );
    let took = killed_at.unwrap().elapsed();
    assert_eq!(exits[3], Some(137), "{}", r.text());
    for (rank, code) in exits.iter().enumerate().take(3) {
        assert!(
            matches!(code, Some(c) if *c != 0),
            "rank {rank} exited {code:?}:\n{}",
            r.text()
        );
    }
    assert!(
        took < Duration::from_secs(timeout + 10),
        "ranks took {took:?} to give up:\n{}",
        r.text()
    );
    assert_no_output(&out);
}

/// A batch script that runs axsave itself, without srun: the script has SLURM_PROCID=0 and
/// SLURM_NTASKS=4 but no step, so axsave is one process that saves alone at once instead of
/// waiting (here up to 600 s) for three peers that will never come.
#[test]
fn batch_script_without_srun_saves_alone() {
    let Some(conf) = cluster() else { return };
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let script = t.path().join("job.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n\
             echo \"procid=$SLURM_PROCID ntasks=$SLURM_NTASKS step=${{SLURM_STEP_ID-none}}\" >&2\n\
             exec '{}' --source '{}' --output '{}' --json --rendezvous-timeout 600\n",
            s(&bin()),
            s(&fixture("dcp/fsdp_w4/checkpoint")),
            s(&out)
        ),
    )
    .unwrap();
    let (state, r) = sbatch(&conf, &["--ntasks=4"], &[], &script);
    assert_eq!(state, "COMPLETED", "{}", r.text());
    assert_eq!(r.code, Some(0), "{}", r.text());
    assert!(
        r.stderr.contains("procid=0 ntasks=4 step=none"),
        "not the batch-script environment: {}",
        r.text()
    );
    assert!(r.took < Duration::from_secs(30), "{}", r.text());
    assert_world(&r, "single", 1);
    assert_byte_identical(
        &out.join("model.safetensors"),
        &fixture("dcp/fsdp_w4/reference.safetensors"),
    );
}

/// Open MPI's mpirun, or `None` (after saying so).
fn mpirun() -> Option<&'static str> {
    match Command::new("mpirun").arg("--version").output() {
        Ok(o) if o.status.success() => Some("mpirun"),
        _ => {
            eprintln!("skipping: no mpirun (scripts/test.sh installs Open MPI)");
            None
        }
    }
}

/// What running Open MPI as root needs.
fn mpi_root_env() -> Vec<(&'static str, String)> {
    vec![
        ("OMPI_ALLOW_RUN_AS_ROOT", "1".to_string()),
        ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1".to_string()),
    ]
}

fn assert_mpi_world(r: &Run) {
    assert_world(r, "openmpi", 4);
    let transport = if cfg!(feature = "mpi") { "mpi" } else { "tcp" };
    assert_eq!(r.json()["transport"], transport, "{}", r.text());
}

/// `mpirun` run by the batch script itself, the usual `sbatch` + `mpirun` job: Open MPI takes its
/// slots from the allocation, and the ranks, which also see the batch script's SLURM_PROCID=0
/// and SLURM_NTASKS=4, are one Open MPI world of 4.
#[test]
fn mpirun_in_a_batch_script() {
    let Some(conf) = cluster() else { return };
    let Some(mpirun) = mpirun() else { return };
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let script = t.path().join("job.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\nexec {mpirun} -n 4 '{}' --source '{}' --output '{}' --json\n",
            s(&bin()),
            s(&fixture("dcp/fsdp_w4/checkpoint")),
            s(&out)
        ),
    )
    .unwrap();
    let (state, r) = sbatch(&conf, &["--ntasks=4"], &mpi_root_env(), &script);
    assert_eq!(state, "COMPLETED", "{}", r.text());
    assert_mpi_world(&r);
    assert_byte_identical(
        &out.join("model.safetensors"),
        &fixture("dcp/fsdp_w4/reference.safetensors"),
    );
}

/// `mpirun` inside a job step (`srun -n 1 mpirun -n 4`): the ranks see both a Slurm step of one
/// task (as the ranks that Open MPI's daemons start through srun on other nodes do) and Open
/// MPI's world of 4. They disagree, so the step is the daemons' and MPI's world is used.
#[test]
fn mpirun_inside_a_step() {
    let Some(conf) = cluster() else { return };
    let Some(mpirun) = mpirun() else { return };
    let out = tempfile::tempdir().unwrap();
    let mut c = slurm(&conf, "srun");
    c.args([
        "--job-name=axsave-test",
        "--time=3",
        "-n",
        "1",
        mpirun,
        "--oversubscribe",
        "-n",
        "4",
    ])
    .arg(bin())
    .args([
        "--source",
        s(&fixture("dcp/fsdp_w4/checkpoint")),
        "--output",
        s(out.path()),
        "--json",
    ])
    .envs(mpi_root_env());
    let r = run(c);
    assert_eq!(r.code, Some(0), "{}", r.text());
    assert_mpi_world(&r);
    assert_byte_identical(
        &out.path().join("model.safetensors"),
        &fixture("dcp/fsdp_w4/reference.safetensors"),
    );
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/slurm")
        .join(name)
}

/// scripts/slurm/axsave.sbatch as shipped, on one node of 4 tasks (1 CPU and 1 GPU each).
#[test]
fn example_sbatch_job() {
    let Some(conf) = cluster() else { return };
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("final");
    let (state, r) = sbatch(
        &conf,
        &["--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=1"],
        &[
            ("AXSAVE", s(&bin()).to_string()),
            (
                "AXSAVE_SOURCE",
                s(&fixture("dcp/fsdp_w8/checkpoint")).to_string(),
            ),
            ("AXSAVE_OUTPUT", s(&out).to_string()),
            ("AXSAVE_ARGS", "--json --dtype keep".to_string()),
        ],
        &example("axsave.sbatch"),
    );
    assert_eq!(state, "COMPLETED", "{}", r.text());
    assert_world(&r, "slurm", 4);
    assert_sharded_output(&out, 4, &fixture("dcp/fsdp_w8/reference.safetensors"));
}

/// The torchrun that AXSAVE_TEST_TORCHRUN names, else the one next to AXSAVE_TEST_PYTHON, else
/// one on PATH.
fn torchrun() -> Option<PathBuf> {
    if let Some(t) = std::env::var_os("AXSAVE_TEST_TORCHRUN") {
        return Some(PathBuf::from(t));
    }
    if let Some(p) = std::env::var_os("AXSAVE_TEST_PYTHON") {
        let t = Path::new(&p).with_file_name("torchrun");
        if t.exists() {
            return Some(t);
        }
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("torchrun"))
            .find(|t| t.exists())
    })
}

/// scripts/slurm/axsave-torchrun.sbatch as shipped: one torchrun on the one node, 4 workers.
#[test]
fn example_torchrun_sbatch_job() {
    let Some(conf) = cluster() else { return };
    let Some(torchrun) = torchrun() else {
        eprintln!(
            "skipping: no torchrun (set AXSAVE_TEST_TORCHRUN or AXSAVE_TEST_PYTHON, or put one on PATH)"
        );
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("final");
    let (state, r) = sbatch(
        &conf,
        &["--nodes=1", "--gpus-per-node=4", "--cpus-per-task=4"],
        &[
            ("AXSAVE", s(&bin()).to_string()),
            ("TORCHRUN", s(&torchrun).to_string()),
            ("GPUS_PER_NODE", "4".to_string()),
            ("RDZV_PORT", free_port().to_string()),
            (
                "AXSAVE_SOURCE",
                s(&fixture("dcp/fsdp_w4/checkpoint")).to_string(),
            ),
            ("AXSAVE_OUTPUT", s(&out).to_string()),
            ("AXSAVE_MODE", "gather".to_string()),
            ("AXSAVE_ARGS", "--json".to_string()),
        ],
        &example("axsave-torchrun.sbatch"),
    );
    assert_eq!(state, "COMPLETED", "{}", r.text());
    assert_world(&r, "torchrun", 4);
    assert_byte_identical(
        &out.join("model.safetensors"),
        &fixture("dcp/fsdp_w4/reference.safetensors"),
    );
}
