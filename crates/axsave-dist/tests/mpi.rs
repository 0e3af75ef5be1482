//! The MPI transport under a real launcher: each test runs
//! `mpirun -n N axsave-mpi-check SCENARIO ...` (the scenarios live in
//! `src/bin/axsave-mpi-check/`) and checks its exit status, its output and how long it
//! took. Needs the `mpi` feature and `mpirun` on `PATH`; without them the tests say why
//! they skip and pass.
//!
//! Run with `cargo test -p axsave-dist --features mpi --test mpi`. The launcher environment
//! allows running as root and more ranks than cores (Open MPI reads the `OMPI_*`
//! variables; other launchers ignore them).

#[cfg(not(feature = "mpi"))]
#[test]
fn mpi_tests_need_the_mpi_feature() {
    eprintln!(
        "skipped: axsave-dist was built without the `mpi` feature; run \
         `cargo test -p axsave-dist --features mpi --test mpi`"
    );
}

#[cfg(feature = "mpi")]
mod under_mpirun {
    use std::io::{BufRead, BufReader, Read};
    use std::path::PathBuf;
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::sync::{Mutex, MutexGuard, PoisonError, mpsc};
    use std::thread;
    use std::time::{Duration, Instant};

    const CHECK: &str = env!("CARGO_BIN_EXE_axsave-mpi-check");

    /// One launch at a time: the machine may have few cores, and several tests time things.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mpirun() -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join("mpirun"))
            .find(|p| p.is_file())
    }

    /// `mpirun -n N axsave-mpi-check ARGS`, or `None` (with the reason printed) without
    /// mpirun.
    fn launch(n: usize, args: &[&str]) -> Option<Child> {
        let Some(mpirun) = mpirun() else {
            eprintln!("skipped: mpirun is not on PATH (install Open MPI or MPICH to run this)");
            return None;
        };
        let child = Command::new(mpirun)
            .arg("-n")
            .arg(n.to_string())
            .arg(CHECK)
            .args(args)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start mpirun");
        Some(child)
    }

    struct Outcome {
        status: ExitStatus,
        stdout: String,
        stderr: String,
        elapsed: Duration,
    }

    impl Outcome {
        fn assert_ok(&self, n: usize, scenario: &str) {
            assert!(
                self.status.success(),
                "mpirun failed: {:?}\nstdout:\n{}\nstderr:\n{}",
                self.status,
                self.stdout,
                self.stderr
            );
            for r in 0..n {
                let line = format!("rank {r}: ok {scenario}");
                assert!(
                    self.stdout.lines().any(|l| l.starts_with(&line)),
                    "no `{line}` in\n{}\nstderr:\n{}",
                    self.stdout,
                    self.stderr
                );
            }
        }
    }

    /// Waits for `child` at most `limit`; kills it (and fails) past that.
    fn finish(mut child: Child, started: Instant, limit: Duration) -> Outcome {
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let o = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let e = thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let status = wait_at_most(&mut child, started, limit);
        Outcome {
            status,
            stdout: o.join().unwrap_or_default(),
            stderr: e.join().unwrap_or_default(),
            elapsed: started.elapsed(),
        }
    }

    fn wait_at_most(child: &mut Child, started: Instant, limit: Duration) -> ExitStatus {
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                return s;
            }
            if started.elapsed() > limit {
                // SIGTERM first: mpirun then takes its ranks down with it.
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .status();
                thread::sleep(Duration::from_secs(2));
                let _ = child.kill();
                let _ = child.wait();
                panic!("mpirun still running after {limit:?}: a hang");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn run(n: usize, args: &[&str], limit: Duration) -> Option<Outcome> {
        let started = Instant::now();
        let child = launch(n, args)?;
        Some(finish(child, started, limit))
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn exchange(n: usize, extra: &[&str]) {
        let _g = serial();
        let mut args = vec!["exchange"];
        args.extend_from_slice(extra);
        let Some(o) = run(n, &args, secs(180)) else {
            return;
        };
        o.assert_ok(n, "exchange");
        eprintln!("{}", o.stdout);
    }

    #[test]
    fn every_run_arrives_exactly_once_between_2_ranks() {
        exchange(2, &[]);
    }

    #[test]
    fn every_run_arrives_exactly_once_between_3_ranks() {
        exchange(3, &[]);
    }

    #[test]
    fn every_run_arrives_exactly_once_between_4_ranks() {
        exchange(4, &["--threads", "4"]);
    }

    #[test]
    fn runs_many_frames_long_are_split_and_reassembled() {
        // 1 MiB frames, runs up to 5 MiB; several frames of one run in flight at once.
        exchange(
            3,
            &[
                "--frame",
                "1048576",
                "--max-run",
                "5242880",
                "--runs",
                "2",
                "--threads",
                "2",
                "--in-flight",
                "3",
            ],
        );
    }

    #[test]
    fn all_to_all_with_one_frame_in_flight_does_not_deadlock() {
        // Every rank sends to every rank while receiving, through a single send slot and
        // a single receive slot, with frames far smaller than the runs.
        exchange(
            4,
            &[
                "--in-flight",
                "1",
                "--frame",
                "512",
                "--max-run",
                "6000",
                "--runs",
                "8",
            ],
        );
    }

    #[test]
    fn broadcasts_barriers_and_collective_timeouts() {
        let _g = serial();
        let Some(o) = run(3, &["collectives"], secs(120)) else {
            return;
        };
        o.assert_ok(3, "collectives");
    }

    #[test]
    fn cancel_and_stall_end_waits_promptly_and_strays_are_drained() {
        let _g = serial();
        let Some(o) = run(3, &["cancel"], secs(120)) else {
            return;
        };
        o.assert_ok(3, "cancel");
        eprintln!("{}", o.stdout);
    }

    #[test]
    fn malformed_messages_and_wrong_ends_fail_wait_and_strays_do_not() {
        let _g = serial();
        let Some(o) = run(2, &["malformed"], secs(120)) else {
            return;
        };
        o.assert_ok(2, "malformed");
        eprintln!("{}", o.stdout);
    }

    #[test]
    fn a_sink_error_fails_wait_and_the_rank_aborts_the_whole_job() {
        sink_error_aborts(&[], "Multiple");
    }

    #[test]
    fn abort_works_through_the_progress_thread_under_serialized_threading() {
        sink_error_aborts(&["--thread-level", "serialized"], "Serialized");
    }

    #[test]
    fn every_run_arrives_exactly_once_under_serialized_threading() {
        exchange(3, &["--thread-level", "serialized"]);
    }

    fn sink_error_aborts(extra: &[&str], level: &str) {
        let _g = serial();
        let mut args = vec!["sink-error"];
        args.extend_from_slice(extra);
        let Some(o) = run(3, &args, secs(120)) else {
            return;
        };
        assert!(
            o.stdout.contains(&format!("(thread level {level})")),
            "{}",
            o.stdout
        );
        assert!(
            !o.status.success(),
            "the job succeeded:\n{}\n{}",
            o.stdout,
            o.stderr
        );
        assert!(
            o.stdout.contains("rank 0: wait failed: writing 4096 bytes")
                && o.stdout.contains("disk full"),
            "stdout:\n{}\nstderr:\n{}",
            o.stdout,
            o.stderr
        );
        // The other ranks sit at a barrier with a 5-minute timeout: only the abort ends them.
        assert!(!o.stdout.contains("clean exit"), "{}", o.stdout);
        assert!(o.elapsed < secs(30), "the aborted job took {:?}", o.elapsed);
        eprintln!(
            "sink error: mpirun exited with {:?} after {:?}\n{}{}",
            o.status, o.elapsed, o.stdout, o.stderr
        );
    }

    #[test]
    fn a_rank_killed_mid_transfer_ends_the_job() {
        let _g = serial();
        let started = Instant::now();
        let Some(mut child) = launch(3, &["kill"]) else {
            return;
        };
        // Read stdout as it comes, to learn the sending rank's pid.
        let out = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        let reader = thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                all.push_str(&line);
                all.push('\n');
                let _ = tx.send(line);
            }
            all
        });
        let pid = loop {
            match lines.recv_timeout(secs(60)) {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix("rank 1: pid ") {
                        break rest
                            .split_whitespace()
                            .next()
                            .and_then(|p| p.parse::<u32>().ok())
                            .expect("a pid");
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("rank 1 never started sending");
                }
            }
        };
        // Mid-transfer: it sends a 64 KiB run every 50 ms for two minutes.
        thread::sleep(Duration::from_millis(700));
        let killed = Instant::now();
        let st = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(st.success(), "could not kill {pid}");
        let mut err = child.stderr.take().expect("piped");
        let e = thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let status = wait_at_most(&mut child, started, secs(120));
        let after_kill = killed.elapsed();
        let stdout = reader.join().unwrap_or_default();
        let stderr = e.join().unwrap_or_default();
        assert!(!status.success(), "the job succeeded:\n{stdout}\n{stderr}");
        assert!(!stdout.contains("clean exit"), "{stdout}");
        assert!(
            after_kill < secs(30),
            "mpirun took {after_kill:?} to end the job after the kill"
        );
        eprintln!(
            "killed rank 1 (pid {pid}): mpirun exited with {status:?} {after_kill:?} later\n{stdout}{stderr}"
        );
    }

    #[test]
    fn throughput_between_two_ranks_is_reported() {
        let _g = serial();
        // Small in debug builds; the 512 MiB measurement is
        // `mpirun -n 2 target/release/axsave-mpi-check throughput --mib 512`.
        let Some(o) = run(2, &["throughput", "--mib", "64"], secs(120)) else {
            return;
        };
        o.assert_ok(2, "throughput");
        eprintln!("{}", o.stdout);
    }
}
