//! axsave under a real `mpirun` (Open MPI, or MPICH's `mpiexec` via AXSAVE_MPIEXEC): the MPI
//! transport when built with `--features mpi`, environment detection and TCP otherwise.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The MPI launcher, or why these tests cannot run here.
fn launcher() -> Result<String, String> {
    let exe = std::env::var("AXSAVE_MPIEXEC").unwrap_or_else(|_| "mpirun".into());
    match Command::new(&exe).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(exe),
        _ => Err(format!(
            "{exe} is not installed (scripts/test.sh installs Open MPI)"
        )),
    }
}

/// `mpirun -n N axsave ARGS` with what running as root on a 2-core machine needs.
fn mpirun(exe: &str, n: usize, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(exe);
    clean_env(&mut c);
    if exe.ends_with("mpirun") {
        c.args(["--oversubscribe", "--allow-run-as-root"]);
    }
    c.args(["-n", &n.to_string()]).arg(bin()).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    // Tests run in parallel: without MPI's bootstrap each job needs its own store port.
    c.env("MASTER_PORT", free_port().to_string())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn json_of(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    let start = text
        .find("{\n")
        .unwrap_or_else(|| panic!("no JSON summary in {text}"));
    serde_json::from_str(&text[start..]).unwrap()
}

#[test]
fn gather_and_sharded_under_mpirun() {
    let exe = match launcher() {
        Ok(e) => e,
        Err(why) => return eprintln!("skipping: {why}"),
    };
    let src = fixture("dcp/fsdp_w4/checkpoint");
    let reference = fixture("dcp/fsdp_w4/reference.safetensors");
    let transport = if cfg!(feature = "mpi") { "mpi" } else { "tcp" };
    for n in [2, 3, 4] {
        for mode in ["gather", "sharded"] {
            let out = tempfile::tempdir().unwrap();
            let o = mpirun(
                &exe,
                n,
                &[
                    "--source",
                    s(&src),
                    "--output",
                    s(out.path()),
                    "--mode",
                    mode,
                    "--json",
                    "-q",
                ],
                &[],
            )
            .output()
            .unwrap();
            assert!(o.status.success(), "{n} ranks {mode}: {}", stderr(&o));
            let v = json_of(&o.stdout);
            assert_eq!(v["transport"], transport);
            assert_eq!(v["world_size"], n);
            if mode == "gather" {
                assert!(
                    std::fs::read(out.path().join("model.safetensors")).unwrap()
                        == std::fs::read(&reference).unwrap()
                );
            } else {
                let (g, w) = (tensors(out.path()), tensors(&reference));
                assert_eq!(g, w, "{n} ranks sharded");
            }
        }
    }
}

/// Each rank reads only its own files, so every other rank's pieces cross the transport.
#[test]
fn node_local_sources_cross_the_transport() {
    let exe = match launcher() {
        Ok(e) => e,
        Err(why) => return eprintln!("skipping: {why}"),
    };
    let t = tempfile::tempdir().unwrap();
    let src = fixture("dcp/fsdp_w4/checkpoint");
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let owner = if name.ends_with(".metadata") {
            0
        } else {
            name[2..3].parse::<usize>().unwrap()
        };
        let d = t.path().join(format!("rank{owner}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(e.path(), d.join(&name)).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let template = format!("{}/rank{{rank}}", t.path().display());
    let o = mpirun(
        &exe,
        4,
        &[
            "--source",
            &template,
            "--output",
            s(out.path()),
            "--json",
            "-q",
        ],
        &[],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json_of(&o.stdout);
    assert!(v["network_bytes"].as_u64().unwrap() > 0);
    assert!(
        std::fs::read(out.path().join("model.safetensors")).unwrap()
            == std::fs::read(fixture("dcp/fsdp_w4/reference.safetensors")).unwrap()
    );
}

/// A rank killed mid-copy: mpirun returns non-zero well within the timeout, and no final-named
/// file is left.
#[test]
fn a_killed_rank_fails_the_job() {
    let exe = match launcher() {
        Ok(e) => e,
        Err(why) => return eprintln!("skipping: {why}"),
    };
    let out = tempfile::tempdir().unwrap();
    let flags = tempfile::tempdir().unwrap();
    let reached = flags.path().join("reached");
    let src = fixture("dcp/fsdp_w4/checkpoint");
    for victim in [0usize, 2] {
        let _ = std::fs::remove_file(&reached);
        let point = format!("copying@{victim}");
        let mut child = mpirun(
            &exe,
            3,
            &[
                "--source",
                s(&src),
                "--output",
                s(out.path()),
                "--mode",
                "sharded",
                "--timeout",
                "5",
                "-q",
            ],
            &[("AXSAVE_FAULT", &point), ("AXSAVE_FAULT_FILE", s(&reached))],
        )
        .spawn()
        .unwrap();
        let start = Instant::now();
        while !reached.exists()
            || std::fs::read_to_string(&reached)
                .unwrap()
                .split(' ')
                .nth(1)
                .is_none()
        {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "rank {victim} never reached the copy"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = std::fs::read_to_string(&reached).unwrap();
        let pid = pid.split(' ').nth(1).unwrap().trim().to_string();
        let killed = Instant::now();
        assert!(
            Command::new("kill")
                .args(["-9", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "mpirun still running 30 s after the kill"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success(), "victim {victim}: mpirun exited 0");
        let names = listing(out.path());
        assert!(
            names
                .iter()
                .all(|n| !n.ends_with(".safetensors") && !n.ends_with(".json")),
            "{names:?}"
        );
    }
}

/// Ranks of an MPI job on several nodes (emulated: Open MPI's variables with a local size
/// smaller than the world) need MASTER_ADDR for TCP, and say so.
#[test]
fn several_nodes_without_master_addr_say_what_to_set() {
    let out = tempfile::tempdir().unwrap();
    let src = fixture("dcp/fsdp_w2/checkpoint");
    let mut c = Command::new(bin());
    clean_env(&mut c);
    let o = c
        .args([
            "--source",
            s(&src),
            "--output",
            s(out.path()),
            "--transport",
            "tcp",
            "--rendezvous-timeout",
            "5",
        ])
        .env("OMPI_COMM_WORLD_RANK", "1")
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        .env("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("set MASTER_ADDR"), "{}", stderr(&o));
    assert!(Path::new(out.path()).read_dir().unwrap().next().is_none());
}

/// With MPI, rank 0 broadcasts where its store listens (here MASTER_ADDR, a name that resolves
/// nowhere): the other ranks say so and abort the job at once, instead of retrying the
/// connection for the whole rendezvous timeout.
#[test]
fn an_unresolvable_store_address_fails_at_once() {
    let exe = match launcher() {
        Ok(e) => e,
        Err(why) => return eprintln!("skipping: {why}"),
    };
    if !cfg!(feature = "mpi") {
        return eprintln!("skipping: the MPI bootstrap needs --features mpi");
    }
    let out = tempfile::tempdir().unwrap();
    let src = fixture("dcp/fsdp_w2/checkpoint");
    let start = Instant::now();
    let o = mpirun(
        &exe,
        2,
        &["--source", s(&src), "--output", s(out.path())],
        &[("MASTER_ADDR", "no-such-host.invalid")],
    )
    .output()
    .unwrap();
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("\"no-such-host.invalid\" does not resolve")
            && err.contains("set MASTER_ADDR"),
        "{err}"
    );
    // The rendezvous timeout is 300 s; failing at once is the point.
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert_no_output(out.path());
}

/// Without MPI linked in and without MASTER_ADDR/MASTER_PORT, rank 0 tells the others through
/// PMIx (libpmix opened at run time) where its store listens, on a port free at the time: every
/// rank says it got the address from PMIx, and the model is the reference.
#[test]
fn without_master_addr_the_store_address_comes_through_pmix() {
    let exe = match launcher() {
        Ok(e) if e.ends_with("mpirun") => e,
        Ok(e) => return eprintln!("skipping: {e} is not Open MPI's mpirun (no PMIx)"),
        Err(why) => return eprintln!("skipping: {why}"),
    };
    if cfg!(feature = "mpi") || !cfg!(feature = "pmix") {
        return eprintln!(
            "skipping: a build with MPI bootstraps through MPI, one without pmix never asks PMIx"
        );
    }
    let src = fixture("dcp/fsdp_w4/checkpoint");
    let out = tempfile::tempdir().unwrap();
    let mut c = mpirun(
        &exe,
        3,
        &["--source", s(&src), "--output", s(out.path())],
        &[("RUST_LOG", "info,axsave=debug")],
    );
    c.env_remove("MASTER_PORT").env_remove("MASTER_ADDR");
    let o = c.output().unwrap();
    let err = stderr(&o);
    if err.contains("PMIx unavailable") {
        return eprintln!("skipping: no PMIx client library here (Debian: libpmix2): {err}");
    }
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("(from PMIx)").count(), 3, "{err}");
    assert!(
        std::fs::read(out.path().join("model.safetensors")).unwrap()
            == std::fs::read(fixture("dcp/fsdp_w4/reference.safetensors")).unwrap()
    );
}

/// A rank that does not reach the PMIx exchange (here: it starts 30 s late) fails the job
/// within --rendezvous-timeout, saying so, instead of leaving the others in PMIx_Fence.
#[test]
fn a_late_rank_fails_the_pmix_exchange_within_the_rendezvous_timeout() {
    let exe = match launcher() {
        Ok(e) if e.ends_with("mpirun") => e,
        Ok(e) => return eprintln!("skipping: {e} is not Open MPI's mpirun (no PMIx)"),
        Err(why) => return eprintln!("skipping: {why}"),
    };
    if cfg!(feature = "mpi") || !cfg!(feature = "pmix") {
        return eprintln!(
            "skipping: a build with MPI bootstraps through MPI, one without pmix never asks PMIx"
        );
    }
    let t = tempfile::tempdir().unwrap();
    let late = t.path().join("late.sh");
    std::fs::write(
        &late,
        format!(
            "#!/bin/sh\n[ \"$OMPI_COMM_WORLD_RANK\" = 1 ] && sleep 30\nexec '{}' \"$@\"\n",
            bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&late, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let src = fixture("dcp/fsdp_w2/checkpoint");
    let out = t.path().join("out");
    let mut c = Command::new(&exe);
    clean_env(&mut c);
    c.args(["--oversubscribe", "--allow-run-as-root", "-n", "2"])
        .arg(&late)
        .args([
            "--source",
            s(&src),
            "--output",
            s(&out),
            "--rendezvous-timeout",
            "2",
        ])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let start = Instant::now();
    let o = c.output().unwrap();
    let took = start.elapsed();
    let err = stderr(&o);
    if err.contains("PMIx unavailable") {
        return eprintln!("skipping: no PMIx client library here (Debian: libpmix2)");
    }
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("PMIx_Fence failed"), "{err}");
    assert!(took < Duration::from_secs(25), "took {took:?}");
    assert!(!out.join("model.safetensors").exists());
}
