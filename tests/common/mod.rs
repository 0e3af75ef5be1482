//! Helpers shared by the end-to-end tests: run the built binary, find fixtures, read outputs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The built `axsave` binary (`AXSAVE_BIN` overrides, for prebuilt test binaries run on
/// another machine, as scripts/gpu-check.sh does).
pub fn bin() -> PathBuf {
    std::env::var_os("AXSAVE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_axsave")))
}

/// A path under tests/fixtures (`AXSAVE_FIXTURES` overrides the directory).
pub fn fixture(rel: &str) -> PathBuf {
    std::env::var_os("AXSAVE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
        .join(rel)
}

/// Runs axsave with `args`; stderr is kept for assertions.
pub fn axsave(args: &[&str]) -> Output {
    let mut c = Command::new(bin());
    c.args(args);
    c.env_remove("RUST_LOG");
    // A clean environment: no launcher variables leak from whoever runs the tests.
    for (k, _) in std::env::vars() {
        if k.starts_with("SLURM_")
            || k.starts_with("OMPI_")
            || k.starts_with("PMI")
            || k.starts_with("TORCHELASTIC")
            || [
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "MASTER_ADDR",
                "MASTER_PORT",
            ]
            .contains(&k.as_str())
        {
            c.env_remove(k);
        }
    }
    c.output().expect("run axsave")
}

/// A path as the `&str` the helpers take (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success, printing stderr if not.
pub fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "axsave failed ({:?}):\n{}",
        o.status.code(),
        stderr(o)
    );
}

/// Every tensor of a safetensors model (file, index or directory): name → (dtype, shape, bytes).
pub fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let index = path.join("model.safetensors.index.json");
        if index.exists() {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
            let mut names: Vec<String> = v["weight_map"]
                .as_object()
                .unwrap()
                .values()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| path.join(n)).collect()
        } else {
            vec![path.join("model.safetensors")]
        }
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let prev = out.insert(
                name.clone(),
                (
                    format!("{:?}", view.dtype()),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                ),
            );
            assert!(prev.is_none(), "{name} twice");
        }
    }
    out
}

/// Names in `dir` (sorted).
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(e) => e
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Asserts that `dir` holds no model-looking file and no temporary.
pub fn assert_no_output(dir: &Path) {
    let names = listing(dir);
    assert!(
        names
            .iter()
            .all(|n| !n.contains("safetensors") && !n.contains("axsave")),
        "output left behind: {names:?}"
    );
}

/// Copies a directory tree (fixtures are read-only inputs; damaged copies go to temp dirs).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let t = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

/// A free TCP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `n` ranks of axsave with `args`, as `axsave launch` or torchrun would (RANK,
/// WORLD_SIZE, ... MASTER_ADDR/PORT). `env(rank)` adds variables per rank.
pub fn spawn_ranks(
    n: usize,
    args: &[&str],
    env: &dyn Fn(usize) -> Vec<(String, String)>,
) -> Vec<std::process::Child> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    spawn_ranks_args(n, &|_| args.clone(), env)
}

/// Like [`spawn_ranks`], with each rank's arguments given by `args(rank)`.
pub fn spawn_ranks_args(
    n: usize,
    args: &dyn Fn(usize) -> Vec<String>,
    env: &dyn Fn(usize) -> Vec<(String, String)>,
) -> Vec<std::process::Child> {
    let port = free_port().to_string();
    let run_id = format!("test-{}-{port}", std::process::id());
    (0..n)
        .map(|r| {
            let mut c = Command::new(bin());
            c.args(args(r));
            clean_env(&mut c);
            c.env("RANK", r.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("LOCAL_WORLD_SIZE", n.to_string())
                .env("GROUP_RANK", "0")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("AXSAVE_RUN_ID", &run_id)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            for (k, v) in env(r) {
                c.env(k, v);
            }
            c.spawn().expect("spawn rank")
        })
        .collect()
}

/// Removes launcher variables inherited from whoever runs the tests, and keeps every rank to the
/// files of its own view (`AXSAVE_TEST_OWN_FILES_ONLY=1`, a test hook): ranks of one machine
/// would otherwise open each other's node-local directories and no byte would cross between
/// them. The tests of that reading set it to 0.
pub fn clean_env(c: &mut Command) {
    c.env_remove("RUST_LOG");
    c.env("AXSAVE_TEST_OWN_FILES_ONLY", "1");
    for (k, _) in std::env::vars() {
        if k.starts_with("SLURM_")
            || k.starts_with("OMPI_")
            || k.starts_with("PMI")
            || k.starts_with("MV2_")
            || k.starts_with("TORCHELASTIC")
            || [
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "GROUP_RANK",
                "MASTER_ADDR",
                "MASTER_PORT",
                "AXSAVE_RUN_ID",
            ]
            .contains(&k.as_str())
        {
            c.env_remove(k);
        }
    }
}

/// Waits for every rank (up to `limit`), killing stragglers; returns their outputs in rank order.
pub fn wait_ranks(
    children: Vec<std::process::Child>,
    limit: std::time::Duration,
) -> Vec<(Option<i32>, String, std::time::Duration)> {
    let start = std::time::Instant::now();
    let mut handles = Vec::new();
    for mut c in children {
        let mut err = c.stderr.take().unwrap();
        let mut out = c.stdout.take().unwrap();
        let t_err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        let t_out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut s);
            s
        });
        handles.push((c, t_err, t_out));
    }
    let mut results = Vec::new();
    for (mut c, t_err, t_out) in handles {
        let code = loop {
            match c.try_wait().unwrap() {
                Some(st) => break st.code(),
                None if start.elapsed() > limit => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break Some(-999);
                }
                None => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        let took = start.elapsed();
        let err = t_err.join().unwrap();
        let out = t_out.join().unwrap();
        results.push((code, format!("{err}{out}"), took));
    }
    results
}

/// Gives a record of the `torch.save` archive `d` (named under its prefix, e.g. `data.pkl`) the
/// CRC-32 of its current bytes, in the central directory and in the data descriptor after it,
/// as torch.save would have written it. Tests that edit a value inside a pickle (a file as a
/// different producer could write it, not one damaged on disk) use it after the edit, so that
/// the reader's CRC check does not stop it before the check under test.
pub fn resign_zip_record(d: &mut [u8], name: &str) {
    let zip = axsave_formats::zip::ZipIndex::parse(d).expect("a zip archive");
    let e = zip
        .get(name)
        .unwrap_or_else(|| panic!("no record {name}"))
        .clone();
    let (start, end) = (e.data_offset as usize, (e.data_offset + e.size) as usize);
    let crc = crc32fast::hash(&d[start..end]).to_le_bytes();
    if d[end..].starts_with(b"PK\x07\x08") {
        d[end + 4..end + 8].copy_from_slice(&crc);
    }
    let mut patched = 0;
    for i in 0..d.len().saturating_sub(46) {
        if &d[i..i + 4] != b"PK\x01\x02" {
            continue;
        }
        let n = u16::from_le_bytes([d[i + 28], d[i + 29]]) as usize;
        if d.get(i + 46..i + 46 + n) == Some(e.name.as_bytes()) {
            d[i + 16..i + 20].copy_from_slice(&crc);
            patched += 1;
        }
    }
    assert_eq!(patched, 1, "central directory record of {}", e.name);
}

/// The rank that wrote a DCP checkpoint file: `__R_K.distcp` → R; the `.metadata` (and anything
/// else) → 0, the coordinator. Tests use it to split a fixture as node-local disks would.
pub fn dcp_writer(name: &str) -> usize {
    name.strip_prefix("__")
        .and_then(|n| n.split('_').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or(0)
}

/// The data-parallel rank in a DeepSpeed file name (`…zero_pp_rank_R_mp_rank_00_…`); `None` for
/// the files of no rank (stage 1/2's `mp_rank_00_model_states.pt`, `latest`).
pub fn zero_rank(name: &str) -> Option<usize> {
    name.split("zero_pp_rank_")
        .nth(1)
        .and_then(|x| x.split('_').next())
        .and_then(|x| x.parse().ok())
}

/// Truncates a file to half its length (a copy cut short).
pub fn cut_in_half(f: &Path) {
    let len = std::fs::metadata(f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(f)
        .and_then(|h| h.set_len(len / 2))
        .unwrap();
}
