//! `axsave launch` end to end: the built binary starts real child processes.
//!
//! The ranks are `/bin/sh -c SCRIPT` started through the hidden `--exe` option rather than axsave
//! itself: a shell script controls exactly what each rank prints, how it exits and how it reacts
//! to signals, while the launcher runs the very code it runs for axsave ranks (only the program
//! path differs). Two tests launch axsave itself: `-- --version` for the default path, and a
//! save with `--json` whose summary must reach stdout as plain JSON.
//!
//! Tests that tell the ranks' stdout lines apart by their `[rank r] ` prefix ask for it with
//! `--tag-output` (without it, only stderr lines are prefixed).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Launcher variables the tests' own environment might have (a CI job under Slurm), removed so
/// each test sets exactly what it means to.
fn clean(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("SLURM_")
            || k.starts_with("OMPI_")
            || k.starts_with("PMI")
            || k.starts_with("MV2_")
            || k.starts_with("TORCHELASTIC")
            || k.starts_with("AXSAVE_")
            || [
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "GROUP_RANK",
                "NODE_RANK",
                "MASTER_ADDR",
                "MASTER_PORT",
                "RUST_LOG",
            ]
            .contains(&k.as_str())
        {
            cmd.env_remove(k);
        }
    }
}

/// `axsave launch` with `launch_args`, running `/bin/sh -c script` as every rank.
fn sh_launch(launch_args: &[&str], script: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_axsave"));
    cmd.arg("launch")
        .args(launch_args)
        .args(["--exe", "/bin/sh", "--", "-c", script]);
    clean(&mut cmd);
    cmd
}

/// Runs `cmd` to the end; returns its output and how long it took.
fn run(cmd: &mut Command) -> (Output, Duration) {
    let start = Instant::now();
    let out = cmd.output().expect("run axsave launch");
    (out, start.elapsed())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The launcher's stdout lines that rank `rank` printed, without the prefix, in order.
fn rank_lines(stdout: &[u8], rank: u32) -> Vec<String> {
    let prefix = format!("[rank {rank}] ");
    text(stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

/// `KEY=value` pairs of a line like `RANK=1 WORLD_SIZE=4`.
fn fields(line: &str) -> std::collections::HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

const PRINT_ENV: &str = "echo \"RANK=$RANK WORLD_SIZE=$WORLD_SIZE LOCAL_RANK=$LOCAL_RANK \
    LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE GROUP_RANK=$GROUP_RANK MASTER_ADDR=$MASTER_ADDR \
    MASTER_PORT=$MASTER_PORT RUN=$AXSAVE_RUN_ID \
    SLURM=${SLURM_STEP_ID-unset},${SLURM_PROCID-unset} OMPI=${OMPI_COMM_WORLD_RANK-unset} \
    TE=${TORCHELASTIC_RUN_ID-unset} PMI=${PMI_RANK-unset},${PMIX_RANK-unset} \
    MV2=${MV2_COMM_WORLD_RANK-unset} HYDRA=${MPI_LOCALRANKID-unset} \
    NODE_RANK=${NODE_RANK-unset} KEEP=${AXSAVE_TEST_KEEP-unset} \
    PARENT=${AXSAVE_PARENT_PID-unset}\"";

/// Every rank gets its own rank and the shared world size, port and run id; other launchers'
/// variables in the launcher's environment (as in an sbatch script) and the parent the launcher
/// follows (`AXSAVE_PARENT_PID`) do not reach the ranks; anything else does.
#[test]
fn every_rank_gets_its_environment() {
    let mut cmd = sh_launch(&["-n", "4", "--tag-output"], PRINT_ENV);
    cmd.envs([
        ("SLURM_STEP_ID", "0"),
        ("SLURM_PROCID", "3"),
        ("SLURM_NTASKS", "8"),
        ("OMPI_COMM_WORLD_RANK", "3"),
        ("TORCHELASTIC_RUN_ID", "outer"),
        ("PMI_RANK", "3"),
        ("PMIX_RANK", "3"),
        ("MV2_COMM_WORLD_RANK", "3"),
        ("MPI_LOCALRANKID", "1"),
        ("NODE_RANK", "2"),
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("MASTER_PORT", "1"),
        ("AXSAVE_TEST_KEEP", "yes"),
    ]);
    // The launcher follows this test process (its parent); the ranks follow the launcher, not
    // the variable.
    cmd.env("AXSAVE_PARENT_PID", std::process::id().to_string());
    let (out, _) = run(&mut cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut ports = Vec::new();
    let mut run_ids = Vec::new();
    for rank in 0..4 {
        let lines = rank_lines(&out.stdout, rank);
        assert_eq!(lines.len(), 1, "rank {rank}: {}", text(&out.stdout));
        let f = fields(&lines[0]);
        let r = rank.to_string();
        assert_eq!(f["RANK"], r);
        assert_eq!(f["LOCAL_RANK"], r);
        assert_eq!(f["WORLD_SIZE"], "4");
        assert_eq!(f["LOCAL_WORLD_SIZE"], "4");
        assert_eq!(f["GROUP_RANK"], "0");
        assert_eq!(f["MASTER_ADDR"], "127.0.0.1");
        for var in ["SLURM", "OMPI", "TE", "PMI", "MV2", "HYDRA", "NODE_RANK"] {
            assert!(
                f[var].split(',').all(|v| v == "unset"),
                "rank {rank}: {var}={} leaked",
                f[var]
            );
        }
        assert_eq!(f["KEEP"], "yes");
        assert_eq!(f["PARENT"], "unset", "rank {rank}");
        ports.push(f["MASTER_PORT"].clone());
        run_ids.push(f["RUN"].clone());
    }
    let port: u16 = ports[0].parse().expect("numeric port");
    assert!(port > 1, "a free port, not the inherited MASTER_PORT");
    assert!(ports.iter().all(|p| *p == ports[0]), "{ports:?}");
    assert!(!run_ids[0].is_empty());
    assert!(run_ids.iter().all(|r| *r == run_ids[0]), "{run_ids:?}");

    // Another launch is another run.
    let (again, _) = run(&mut sh_launch(&["-n", "1", "--tag-output"], PRINT_ENV));
    let f = fields(&rank_lines(&again.stdout, 0)[0]);
    assert_ne!(f["RUN"], run_ids[0]);
}

#[test]
fn master_addr_and_port_options() {
    let (out, _) = run(&mut sh_launch(
        &[
            "-n",
            "2",
            "--master-port",
            "23456",
            "--master-addr",
            "10.1.2.3",
            "--tag-output",
        ],
        PRINT_ENV,
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    for rank in 0..2 {
        let f = fields(&rank_lines(&out.stdout, rank)[0]);
        assert_eq!(f["MASTER_PORT"], "23456");
        assert_eq!(f["MASTER_ADDR"], "10.1.2.3");
    }
}

/// The lines a rank prints with `printf` in [`output_lines`]: stdout lines carry the rank in
/// their text, since without `--tag-output` nothing else tells them apart.
const OUTPUT_SCRIPT: &str = r#"printf "out one $RANK\nout two $RANK\n\377\376 raw $RANK\nno newline $RANK"
    printf 'err one\nerr partial' >&2"#;

/// The launcher's stdout and stderr for [`OUTPUT_SCRIPT`] run by 3 ranks.
fn output_lines(launch_args: &[&str]) -> Output {
    let args = [&["-n", "3"], launch_args].concat();
    let (out, _) = run(&mut sh_launch(&args, OUTPUT_SCRIPT));
    assert!(out.status.success(), "{}", text(&out.stderr));
    out
}

/// The lines rank `rank` wrote to stdout with [`OUTPUT_SCRIPT`], newline included, after `p`.
fn expected_stdout(p: &str, rank: u32) -> Vec<Vec<u8>> {
    vec![
        format!("{p}out one {rank}\n").into_bytes(),
        format!("{p}out two {rank}\n").into_bytes(),
        [
            p.as_bytes(),
            b"\xff\xfe raw ",
            format!("{rank}\n").as_bytes(),
        ]
        .concat(),
        format!("{p}no newline {rank}\n").into_bytes(),
    ]
}

/// stderr lines (the ranks' logs) go to stderr with the `[rank r] ` prefix; stdout lines go to
/// stdout as they are (a rank's results, like the summary of `--json`), whole and in the rank's
/// order, with a last line that has no newline and bytes that are not UTF-8 passed through.
#[test]
fn stdout_lines_are_passed_on_as_they_are_and_stderr_lines_prefixed() {
    let out = output_lines(&[]);
    for rank in 0..3u32 {
        let tail = format!(" {rank}\n");
        let got: Vec<&[u8]> = out
            .stdout
            .split_inclusive(|&b| b == b'\n')
            .filter(|l| l.ends_with(tail.as_bytes()))
            .collect();
        let expected = expected_stdout("", rank);
        assert_eq!(got, expected.iter().map(Vec::as_slice).collect::<Vec<_>>());

        let p = format!("[rank {rank}] ");
        let err = text(&out.stderr);
        let err_lines: Vec<&str> = err.lines().filter(|l| l.starts_with(&p)).collect();
        assert_eq!(
            err_lines,
            [format!("{p}err one"), format!("{p}err partial")]
        );
    }
    // Those 12 lines and nothing else: no prefix, nothing of the launcher's own.
    assert_eq!(
        out.stdout.split_inclusive(|&b| b == b'\n').count(),
        12,
        "{}",
        text(&out.stdout)
    );
    assert!(out.stdout.ends_with(b"\n"));
}

/// With `--tag-output`, stdout lines get the `[rank r] ` prefix too.
#[test]
fn tag_output_prefixes_stdout_lines() {
    let out = output_lines(&["--tag-output"]);
    for rank in 0..3u32 {
        let p = format!("[rank {rank}] ");
        let got: Vec<&[u8]> = out
            .stdout
            .split_inclusive(|&b| b == b'\n')
            .filter(|l| l.starts_with(p.as_bytes()))
            .collect();
        let expected = expected_stdout(&p, rank);
        assert_eq!(got, expected.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let err = text(&out.stderr);
        let err_lines: Vec<&str> = err.lines().filter(|l| l.starts_with(&p)).collect();
        assert_eq!(
            err_lines,
            [format!("{p}err one"), format!("{p}err partial")]
        );
    }
    // Nothing but prefixed lines on stdout (the launcher's own messages go to stderr).
    assert!(
        out.stdout
            .split_inclusive(|&b| b == b'\n')
            .all(|l| l.starts_with(b"[rank "))
    );
    assert!(out.stdout.ends_with(b"\n"));
}

/// Ranks printing many long lines at the same time: every line arrives whole. Each rank writes
/// its lines to a file first and then sends them with `cat`, in large writes, so the launcher's
/// reader threads all have many lines to pass on at once.
#[test]
fn lines_of_different_ranks_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"line=$(printf "%01000d" 0 | tr 0 "$RANK"); i=0
        while [ $i -lt 1000 ]; do echo "$line"; i=$((i+1)); done > "$DIR/$RANK"
        cat "$DIR/$RANK" & cat "$DIR/$RANK" >&2; wait"#;
    let mut cmd = sh_launch(&["-n", "4"], script);
    cmd.env("DIR", dir.path());
    let (out, _) = run(&mut cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // stderr lines are prefixed, stdout lines are not: each line must be one rank's 1000 digits.
    for (name, stream, prefixed) in [
        ("stdout", &out.stdout, false),
        ("stderr", &out.stderr, true),
    ] {
        let s = text(stream);
        let mut counts = [0; 4];
        for line in s
            .lines()
            .filter(|l| !l.contains(" INFO ") && !l.starts_with("INFO"))
        {
            let (prefix_rank, body) = if prefixed {
                let body = line.strip_prefix("[rank ").and_then(|l| l.get(3..));
                let rank = line.get(6..7).and_then(|r| r.parse::<usize>().ok());
                let (Some(rank), Some(body)) = (rank, body) else {
                    panic!("{name}: a line without a prefix: {:.60}", line);
                };
                (Some(rank), body)
            } else {
                (None, line)
            };
            let rank = body.get(..1).and_then(|r| r.parse::<usize>().ok());
            let Some(rank) = rank.filter(|&r| r < 4) else {
                panic!("{name}: not a rank's line: {:.60}", line);
            };
            assert!(
                body == rank.to_string().repeat(1000) && prefix_rank.is_none_or(|p| p == rank),
                "{name}: a mixed line for rank {rank}: {:.60}…",
                line
            );
            counts[rank] += 1;
        }
        assert_eq!(counts, [1000; 4], "{name}");
    }
}

#[test]
fn all_ranks_succeeding_exit_0() {
    let (out, _) = run(&mut sh_launch(&["-n", "5"], "sleep 0.1; exit 0"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(!err.contains("ERROR"), "{err}");
}

/// One rank fails while the others sleep: they are stopped at once, and the launcher exits with
/// the failed rank's code, naming it.
#[test]
fn a_failing_rank_stops_the_others() {
    let script = r#"if [ "$RANK" = 1 ]; then sleep 0.3; echo bye >&2; exit 7; fi; exec sleep 60"#;
    let (out, took) = run(&mut sh_launch(&["-n", "3"], script));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
    assert!(err.contains("[rank 1] bye"), "{err}");
    assert!(err.contains("rank 1 exited with code 7"), "{err}");
    assert!(err.contains("stopping the other ranks"), "{err}");
    // The sleepers went on SIGTERM, long before the grace period would have ended.
    assert!(!err.contains("SIGKILL"), "{err}");
}

/// Codes above 125 would read as "killed by a signal" or "cannot run" from a shell: 1 instead.
#[test]
fn high_exit_codes_become_1() {
    let (out, _) = run(&mut sh_launch(
        &["-n", "2"],
        r#"[ "$RANK" = 0 ] && exit 200; exit 0"#,
    ));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("rank 0 exited with code 200"), "{err}");
}

#[test]
fn a_rank_killed_by_a_signal_is_reported() {
    let script = r#"if [ "$RANK" = 1 ]; then kill -KILL $$; fi; exec sleep 60"#;
    let (out, took) = run(&mut sh_launch(&["-n", "2"], script));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
    assert!(
        err.contains("rank 1 was killed by SIGKILL (signal 9)"),
        "{err}"
    );
}

/// A rank that ignores SIGTERM gets SIGKILL once the grace period is over.
#[test]
fn a_rank_ignoring_sigterm_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    // Rank 0 ignores SIGTERM, then says so with a file; rank 1 fails once it sees the file, so
    // the SIGTERM cannot arrive before the trap is set.
    let script = r#"if [ "$RANK" = 0 ]; then trap '' TERM; touch "$DIR/ready"; exec sleep 60; fi
        while [ ! -e "$DIR/ready" ]; do sleep 0.05; done; exit 3"#;
    let mut cmd = sh_launch(&["-n", "2", "--grace-period", "0.5"], script);
    cmd.env("DIR", dir.path());
    let (out, took) = run(&mut cmd);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
    assert!(err.contains("rank(s) 0 still running"), "{err}");
    assert!(err.contains("sending SIGKILL"), "{err}");
}

/// A launcher running in the background, with its stdout read line by line.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    started: Instant,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start axsave launch");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            started: Instant::now(),
        }
    }

    /// The next `n` stdout lines (fails after 30 s).
    fn next_lines(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                self.lines
                    .recv_timeout(Duration::from_secs(30))
                    .expect("a line from the ranks")
            })
            .collect()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Waits for the launcher; returns its exit code, the rest of stdout, stderr and the time
    /// since it started.
    fn finish(mut self) -> (Option<i32>, Vec<String>, String, Duration) {
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = self.child.wait().unwrap();
        let took = self.started.elapsed();
        let rest = self.lines.iter().collect();
        (status.code(), rest, err, took)
    }
}

/// A test that fails while the launcher runs must not leave it (and its ranks) behind: killing
/// it makes the kernel send the ranks SIGTERM (see `ranks_die_with_a_killed_launcher`).
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGINT (Ctrl-C) or SIGTERM sent to the launcher alone reaches every rank, which can act on it;
/// the launcher exits 128 + the signal.
fn forwards(sig: &str, code: i32) {
    // Bounded (about 20 s), so that a launcher that does not forward fails the test instead
    // of hanging it.
    let script = format!(
        r#"trap 'echo "got {sig}"; exit 0' {sig}; echo ready
        i=0; while [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; echo "no {sig}""#
    );
    let run = Running::start(sh_launch(&["-n", "3", "--tag-output"], &script));
    let ready = run.next_lines(3);
    assert!(ready.iter().all(|l| l.ends_with("] ready")), "{ready:?}");
    run.signal(sig);
    let (status, rest, err, took) = run.finish();
    assert_eq!(status, Some(code), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
    for rank in 0..3 {
        assert!(
            rest.contains(&format!("[rank {rank}] got {sig}")),
            "rank {rank}: {rest:?} {err}"
        );
    }
    assert!(err.contains(&format!("received SIG{sig}")), "{err}");
}

#[test]
fn sigint_is_forwarded_to_the_ranks() {
    forwards("INT", 130);
}

#[test]
fn sigterm_is_forwarded_to_the_ranks() {
    forwards("TERM", 143);
}

/// Ranks that ignore the forwarded signal: a second Ctrl-C kills them without waiting for the
/// (long) grace period.
#[test]
fn a_second_signal_kills_at_once() {
    let script = "trap '' INT TERM; echo ready; exec sleep 60";
    let run = Running::start(sh_launch(&["-n", "2", "--grace-period", "60"], script));
    run.next_lines(2);
    run.signal("INT");
    std::thread::sleep(Duration::from_millis(300));
    run.signal("INT");
    let (status, _, err, took) = run.finish();
    assert_eq!(status, Some(130), "{err}");
    assert!(took < Duration::from_secs(20), "took {took:?}: {err}");
    assert!(err.contains("killing the ranks"), "{err}");
}

/// Whether process `pid` still runs (a zombie nobody reaped counts as gone).
#[cfg(target_os = "linux")]
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// The launcher killed with SIGKILL cannot stop the ranks itself; they get SIGTERM from the
/// kernel instead of running on unattended.
#[cfg(target_os = "linux")]
#[test]
fn ranks_die_with_a_killed_launcher() {
    let run = Running::start(sh_launch(&["-n", "2"], "echo $$; exec sleep 60"));
    let pids: Vec<u32> = run
        .next_lines(2)
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(pids.iter().all(|&p| alive(p)));
    run.signal("KILL");
    let (status, _, _, _) = run.finish();
    assert_eq!(status, None, "killed by a signal");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "ranks {pids:?} outlived the launcher"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stopping a rank stops the processes it started too (each rank is a process group).
#[cfg(target_os = "linux")]
#[test]
fn stopping_a_rank_stops_what_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"if [ "$RANK" = 1 ]; then
            while [ ! -e "$DIR/ready" ]; do sleep 0.05; done; exit 4
        fi
        sleep 60 & echo $!; touch "$DIR/ready"; wait"#;
    let mut cmd = sh_launch(&["-n", "2", "--tag-output"], script);
    cmd.env("DIR", dir.path());
    let (out, took) = run(&mut cmd);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
    let pid: u32 = rank_lines(&out.stdout, 0)[0].parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "rank 0's background sleep {pid} survived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A rank that leaves a background process holding its output open does not keep the launcher
/// waiting once every rank has exited.
#[test]
fn a_leftover_background_process_does_not_hold_the_launcher() {
    let (out, took) = run(&mut sh_launch(
        &["-n", "2", "--tag-output"],
        "sleep 20 & echo done",
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_eq!(rank_lines(&out.stdout, 0), ["done"]);
}

/// Without --exe the ranks are this axsave.
#[test]
fn launches_axsave_itself_by_default() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_axsave"));
    cmd.args(["launch", "-n", "2", "--", "--version"]);
    clean(&mut cmd);
    let (out, _) = run(&mut cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let version = format!("axsave {}\n", env!("CARGO_PKG_VERSION"));
    assert_eq!(text(&out.stdout), version.repeat(2));
}

/// `axsave launch -n 2 -- … --json`: rank 0's summary is on stdout as plain JSON (`| jq` works),
/// nothing else is, and rank 0's log is on stderr with its prefix.
#[test]
fn a_save_with_json_prints_plain_json() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let source = fixtures.join("dcp/fsdp_w2/checkpoint");
    let output = dir.path().join("out");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_axsave"));
    cmd.args(["launch", "-n", "2", "--"])
        .arg("--source")
        .arg(&source)
        .arg("--output")
        .arg(&output)
        .args(["--json", "--transport", "tcp"]);
    clean(&mut cmd);
    let (out, _) = run(&mut cmd);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&out.stdout)));
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("dcp/fsdp_w2/expected.json")).unwrap())
            .unwrap();
    assert_eq!(v["world_size"], 2, "{v}");
    assert_eq!(v["launcher"], "env", "{v}");
    assert_eq!(v["output"], output.to_str().unwrap(), "{v}");
    assert_eq!(
        v["tensors"].as_u64(),
        Some(expected["tensors"].as_object().unwrap().len() as u64),
        "{v}"
    );
    let files = v["files"].as_array().expect("files");
    assert!(!files.is_empty(), "{v}");
    for f in files {
        let path = std::path::Path::new(f["path"].as_str().expect("a path"));
        assert_eq!(path.parent(), Some(output.as_path()), "{f}");
        assert_eq!(f["sha256"].as_str().map(str::len), Some(64), "{f}");
        assert_eq!(
            f["size"].as_u64(),
            Some(std::fs::metadata(path).unwrap().len()),
            "{f}"
        );
    }
    assert!(output.join("model.safetensors").exists());
    assert!(err.contains("[rank 0]  INFO"), "{err}");
}

#[test]
fn a_program_that_cannot_start_is_an_error() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_axsave"));
    cmd.args(["launch", "-n", "2", "--exe", "/nonexistent/prog", "--", "x"]);
    clean(&mut cmd);
    let (out, _) = run(&mut cmd);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot start rank 0 (/nonexistent/prog)"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let cases: &[&[&str]] = &[
        &["launch", "--", "--version"],            // no -n
        &["launch", "-n", "0", "--", "--version"], // no ranks
        &["launch", "-n", "x", "--", "--version"], // not a number
        &["launch", "-n", "2"],                    // no ARGS
        &["launch", "-n", "2", "--"],              // empty ARGS
        &["launch", "-n", "2", "--version"],       // ARGS without `--`
        &["launch", "-n", "2", "--master-port", "0", "--", "x"],
        &["launch", "-n", "2", "--master-port", "70000", "--", "x"],
        &["launch", "-n", "2", "--grace-period", "-1", "--", "x"],
    ];
    for args in cases {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_axsave"));
        cmd.args(*args);
        clean(&mut cmd);
        let (out, _) = run(&mut cmd);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "{args:?}: nothing may run");
    }
}

#[test]
fn help_shows_an_example() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_axsave"));
    cmd.args(["launch", "--help"]);
    let (out, _) = run(&mut cmd);
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(
        help.contains("axsave launch -n 4 -- --source ckpt --output out"),
        "{help}"
    );
    assert!(!help.contains("--exe"), "--exe is hidden: {help}");
}
