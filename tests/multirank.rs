//! Several real processes of the built binary, one per rank, as torchrun / srun / `axsave
//! launch` would start them: gather and sharded saves byte-identical to the references,
//! node-local sources, killed ranks, mismatched worlds.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

fn no_env(_: usize) -> Vec<(String, String)> {
    Vec::new()
}

/// Runs `n` ranks and asserts they all succeed.
fn run_ok(n: usize, args: &[&str]) -> Vec<String> {
    let res = wait_ranks(spawn_ranks(n, args, &no_env), LIMIT);
    for (r, (code, text, _)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r} of {n} failed:\n{text}");
    }
    res.into_iter().map(|(_, t, _)| t).collect()
}

/// The output (one file or shards + index) holds exactly the reference's tensors.
fn assert_same_tensors(out: &Path, reference: &Path) {
    let (g, w) = (tensors(out), tensors(reference));
    assert_eq!(g.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>());
    for (k, v) in &w {
        assert_eq!(&g[k], v, "tensor {k}");
    }
}

fn assert_clean(out: &Path) {
    let left: Vec<String> = listing(out)
        .into_iter()
        .filter(|n| n.contains("axsave"))
        .collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
}

#[test]
fn gather_is_byte_identical_for_1_2_3_4_8_ranks() {
    let src = fixture("dcp/fsdp_w4/checkpoint");
    let reference = std::fs::read(fixture("dcp/fsdp_w4/reference.safetensors")).unwrap();
    for n in [1, 2, 3, 4, 8] {
        let out = tempfile::tempdir().unwrap();
        run_ok(n, &["--source", s(&src), "--output", s(out.path()), "-q"]);
        assert_eq!(listing(out.path()), ["model.safetensors"], "{n} ranks");
        assert!(
            std::fs::read(out.path().join("model.safetensors")).unwrap() == reference,
            "{n} ranks: output differs from the reference"
        );
    }
}

#[test]
fn sharded_writes_a_file_per_rank_for_1_2_3_4_8_ranks() {
    let src = fixture("dcp/fsdp_w8/checkpoint");
    let reference = fixture("dcp/fsdp_w8/reference.safetensors");
    for n in [1, 2, 3, 4, 8] {
        let out = tempfile::tempdir().unwrap();
        run_ok(
            n,
            &[
                "--source",
                s(&src),
                "--output",
                s(out.path()),
                "-q",
                "--mode",
                "sharded",
            ],
        );
        let files = listing(out.path());
        let shards = files.iter().filter(|f| f.ends_with(".safetensors")).count();
        if n > 1 {
            assert!(shards >= n, "{n} ranks: only {shards} files: {files:?}");
            assert!(files.contains(&"model.safetensors.index.json".to_string()));
        }
        assert_same_tensors(out.path(), &reference);
        assert_clean(out.path());
        assert_ok(&axsave(&[
            "verify",
            "--source",
            s(&src),
            "--output",
            s(out.path()),
        ]));
    }
}

/// Splits a DCP fixture so that rank r's directory holds only `__r_*.distcp` (and rank 0's the
/// metadata), as node-local disks would.
fn node_local_copy(fixture_name: &str, n: usize) -> (tempfile::TempDir, String) {
    let t = tempfile::tempdir().unwrap();
    let src = fixture(&format!("dcp/{fixture_name}/checkpoint"));
    for r in 0..n {
        std::fs::create_dir_all(t.path().join(format!("rank{r}"))).unwrap();
    }
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let owner = dcp_writer(&name);
        std::fs::copy(e.path(), t.path().join(format!("rank{owner}")).join(&name)).unwrap();
    }
    let template = format!("{}/rank{{rank}}", t.path().display());
    (t, template)
}

#[test]
fn node_local_sources_cross_tcp() {
    let (_t, template) = node_local_copy("fsdp_w4", 4);
    let reference = fixture("dcp/fsdp_w4/reference.safetensors");
    for mode in ["gather", "sharded"] {
        let out = tempfile::tempdir().unwrap();
        let logs = run_ok(
            4,
            &[
                "--source",
                &template,
                "--output",
                s(out.path()),
                "--mode",
                mode,
                "--json",
                // Explicitly: on a machine with GPUs `auto` would take NCCL.
                "--transport",
                "tcp",
            ],
        );
        assert_same_tensors(out.path(), &reference);
        if mode == "gather" {
            assert!(
                std::fs::read(out.path().join("model.safetensors")).unwrap()
                    == std::fs::read(&reference).unwrap()
            );
        }
        // Rank 0's JSON summary says bytes crossed the network.
        let json_start = logs[0].find("{\n").expect("no JSON summary");
        let v: serde_json::Value = serde_json::from_str(&logs[0][json_start..]).unwrap();
        assert!(v["network_bytes"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(v["world_size"], 4);
        assert_eq!(v["transport"], "tcp");
        for f in v["files"].as_array().unwrap() {
            let path = PathBuf::from(f["path"].as_str().unwrap());
            let data = std::fs::read(&path).unwrap();
            assert_eq!(f["size"].as_u64().unwrap(), data.len() as u64);
            assert_eq!(f["sha256"].as_str().unwrap().len(), 64);
        }
        assert_clean(out.path());
    }
}

/// Ranks of one node with a directory each (`--source .../rank{rank}`): each rank can open the
/// files the others listed (the same device and inode), so the writers read every piece
/// themselves and nothing is sent; the bytes are the reference's.
#[test]
fn ranks_of_one_node_read_each_others_files_themselves() {
    let (_t, template) = node_local_copy("fsdp_w4", 4);
    let reference = fixture("dcp/fsdp_w4/reference.safetensors");
    let env = |_: usize| {
        vec![
            ("AXSAVE_TEST_OWN_FILES_ONLY".to_string(), "0".to_string()),
            ("RUST_LOG".to_string(), "info".to_string()),
        ]
    };
    for mode in ["gather", "sharded"] {
        let out = tempfile::tempdir().unwrap();
        let args = [
            "--source",
            &template,
            "--output",
            s(out.path()),
            "--mode",
            mode,
            "--json",
        ];
        let res = wait_ranks(spawn_ranks(4, &args, &env), LIMIT);
        for (r, (code, text, _)) in res.iter().enumerate() {
            assert_eq!(*code, Some(0), "{mode}: rank {r} failed:\n{text}");
        }
        let log = &res[0].1;
        assert!(
            log.contains("through another rank's path (same device and inode)"),
            "{mode}: {log}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&log[log.find("{\n").expect("no JSON summary")..]).unwrap();
        assert_eq!(v["network_bytes"], 0, "{mode}: {v}");
        let route = v["route"].as_array().unwrap();
        assert_eq!(route[0]["class"], "local");
        assert_eq!(route[0]["bytes"], v["bytes"], "{mode}: {v}");
        assert_eq!(route[1]["bytes"], 0);
        assert_same_tensors(out.path(), &reference);
        if mode == "gather" {
            assert!(
                std::fs::read(out.path().join("model.safetensors")).unwrap()
                    == std::fs::read(&reference).unwrap()
            );
        }
        assert_clean(out.path());
    }
}

#[test]
fn node_local_hugging_face_shards() {
    let t = tempfile::tempdir().unwrap();
    let src = fixture("dcp/hf_w2/checkpoint");
    for r in 0..2 {
        let d = t.path().join(format!("rank{r}"));
        std::fs::create_dir_all(&d).unwrap();
        let name = format!("shard-{:05}-model-00001-of-00001.safetensors", r + 1);
        std::fs::copy(src.join(&name), d.join(&name)).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let template = format!("{}/rank{{rank}}", t.path().display());
    run_ok(2, &["--source", &template, "--output", s(out.path()), "-q"]);
    assert!(
        std::fs::read(out.path().join("model.safetensors")).unwrap()
            == std::fs::read(fixture("dcp/hf_w2/reference.safetensors")).unwrap()
    );
}

/// Kills rank `victim` once it reaches `point` and checks that every other rank exits non-zero
/// within the timeout and that nothing final-named (and no temporary) is left.
fn kill_at(point: &str, victim: usize, n: usize, source: &str, mode: &str) {
    let out = tempfile::tempdir().unwrap();
    let marker = tempfile::tempdir().unwrap();
    let flag = marker.path().join("reached");
    let flag_s = s(&flag).to_string();
    let env = move |r: usize| {
        if r == victim {
            vec![
                ("AXSAVE_FAULT".into(), format!("{point}@{victim}")),
                ("AXSAVE_FAULT_FILE".into(), flag_s.clone()),
            ]
        } else {
            Vec::new()
        }
    };
    let timeout = 4;
    let mut children = spawn_ranks(
        n,
        &[
            "--source",
            source,
            "--output",
            s(out.path()),
            "-q",
            "--mode",
            mode,
            "--timeout",
            &timeout.to_string(),
        ],
        &env,
    );
    let start = std::time::Instant::now();
    while !flag.exists() {
        assert!(
            start.elapsed() < LIMIT,
            "rank {victim} never reached {point}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    children[victim].kill().unwrap();
    let killed_at = std::time::Instant::now();
    let res = wait_ranks(children, Duration::from_secs(60));
    for (r, (code, text, _)) in res.iter().enumerate() {
        if r == victim {
            continue;
        }
        assert!(
            matches!(code, Some(c) if *c != 0 && *c != -999),
            "{point}@{victim}: rank {r} exited {code:?}:\n{text}"
        );
    }
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_secs(timeout + 10),
        "{point}@{victim}: ranks took {took:?} to give up"
    );
    let names = listing(out.path());
    assert!(
        names.iter().all(|n| !n.contains("safetensors")),
        "{point}@{victim}: files left: {names:?}"
    );
}

#[test]
fn a_killed_rank_never_hangs_the_others() {
    let src = fixture("dcp/fsdp_w4/checkpoint");
    let (_t, node_local) = node_local_copy("fsdp_w4", 4);
    // A rank that dies after joining; one that dies while sending its pieces; a writer that
    // dies with its files on disk but before reporting success; and rank 0, which hosts the
    // store and writes the files, in the middle of the copy.
    kill_at("joined", 2, 3, s(&src), "gather");
    kill_at("copying", 3, 4, &node_local, "gather");
    kill_at("synced", 1, 3, s(&src), "sharded");
    kill_at("copying", 0, 4, &node_local, "gather");
}

#[test]
fn mismatched_world_sizes_fail_clearly() {
    let src = fixture("dcp/fsdp_w2/checkpoint");
    let out = tempfile::tempdir().unwrap();
    let mut kids = spawn_ranks(
        2,
        &[
            "--source",
            s(&src),
            "--output",
            s(out.path()),
            "--timeout",
            "5",
            "--rendezvous-timeout",
            "10",
        ],
        &|r| {
            if r == 1 {
                vec![("WORLD_SIZE".into(), "3".into())]
            } else {
                Vec::new()
            }
        },
    );
    let res = wait_ranks(std::mem::take(&mut kids), LIMIT);
    for (r, (code, text, _)) in res.iter().enumerate() {
        assert!(
            matches!(code, Some(c) if *c != 0),
            "rank {r}: {code:?}\n{text}"
        );
    }
    assert!(res[0].1.contains("world size of 3"), "{}", res[0].1);
    assert!(res[1].1.contains("world size"), "{}", res[1].1);
    assert_no_output(out.path());
}

#[test]
fn different_arguments_fail_clearly() {
    let src = fixture("dcp/fsdp_w2/checkpoint");
    let out = tempfile::tempdir().unwrap();
    let base: Vec<String> = [
        "--source",
        s(&src),
        "--output",
        s(out.path()),
        "--timeout",
        "5",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let kids = spawn_ranks_args(
        2,
        &|r| {
            let mut a = base.clone();
            if r == 1 {
                a.extend(["--dtype".to_string(), "bf16".to_string()]);
            }
            a
        },
        &no_env,
    );
    let res = wait_ranks(kids, LIMIT);
    for (r, (code, text, _)) in res.iter().enumerate() {
        assert!(
            matches!(code, Some(c) if *c != 0),
            "rank {r}: {code:?}\n{text}"
        );
        assert!(text.contains("different arguments"), "rank {r}: {text}");
    }
    assert_no_output(out.path());
}

#[test]
fn sharded_mode_refuses_an_unshared_output_directory() {
    // /proc/self/cwd/out is a different directory for each rank when their working
    // directories differ, as with node-local scratch.
    let src = fixture("dcp/fsdp_w2/checkpoint");
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let cwd: Vec<PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
    let mut kids = Vec::new();
    let port = free_port().to_string();
    for (r, dir) in cwd.iter().enumerate() {
        let mut c = std::process::Command::new(bin());
        clean_env(&mut c);
        c.current_dir(dir)
            .args([
                "--source",
                s(&src),
                "--output",
                "/proc/self/cwd/out",
                "--mode",
                "sharded",
                "--timeout",
                "5",
            ])
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        kids.push(c.spawn().unwrap());
    }
    let res = wait_ranks(kids, LIMIT);
    for (r, (code, text, _)) in res.iter().enumerate() {
        assert!(
            matches!(code, Some(c) if *c != 0),
            "rank {r}: {code:?}\n{text}"
        );
    }
    assert!(
        res[1]
            .1
            .contains("needs an output directory every rank shares"),
        "{}",
        res[1].1
    );
    for d in &cwd {
        assert!(
            listing(&d.join("out"))
                .iter()
                .all(|n| !n.contains("safetensors") && !n.contains("axsave")),
            "{:?}",
            listing(&d.join("out"))
        );
    }
}

/// torchrun itself, when a python with torch is named by AXSAVE_TEST_PYTHON.
#[test]
fn under_real_torchrun() {
    let Ok(python) = std::env::var("AXSAVE_TEST_PYTHON") else {
        eprintln!(
            "skipping: set AXSAVE_TEST_PYTHON=/path/to/python-with-torch to run under torchrun"
        );
        return;
    };
    let src = fixture("dcp/fsdp_w4/checkpoint");
    for standalone in [false, true] {
        let out = tempfile::tempdir().unwrap();
        let mut c = std::process::Command::new(&python);
        clean_env(&mut c);
        c.args(["-m", "torch.distributed.run", "--nproc-per-node", "3"]);
        if standalone {
            c.arg("--standalone");
        } else {
            c.args(["--master-port", &free_port().to_string()]);
        }
        c.args([
            "--no-python",
            s(&bin()),
            "--source",
            s(&src),
            "--output",
            s(out.path()),
            "-q",
        ]);
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "torchrun: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            std::fs::read(out.path().join("model.safetensors")).unwrap()
                == std::fs::read(fixture("dcp/fsdp_w4/reference.safetensors")).unwrap()
        );
    }
}
