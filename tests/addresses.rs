//! Where the ranks listen: with `MASTER_ADDR=127.0.0.1` every socket rank 0 listens on (the
//! rendezvous store and the data listener) is on 127.0.0.1, not on every interface. Read from
//! the kernel's own table of rank 0's sockets while rank 1 is stopped at its first piece. (The
//! multi-node side, where the published address must be the node's and not 127.0.1.1 or a
//! Docker bridge, runs in network namespaces: scripts/test-multinode.sh.)

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Inodes of the sockets process `pid` holds open.
fn socket_inodes(pid: u32) -> Vec<String> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_owned)
        })
        .collect()
}

/// The local addresses (`/proc/net/tcp{,6}` hex, decoded to text) of listening TCP sockets
/// with one of `inodes`.
fn listening(inodes: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for (table, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st queues timer retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" || !inodes.iter().any(|i| i == f[9]) {
                continue;
            }
            let (addr, port) = f[1].split_once(':').unwrap();
            let port = u16::from_str_radix(port, 16).unwrap();
            let bytes: Vec<u8> = (0..addr.len() / 2)
                .map(|i| u8::from_str_radix(&addr[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            // The kernel prints each 32-bit word in host order (little-endian here).
            let words: Vec<u8> = bytes
                .chunks(4)
                .flat_map(|w| w.iter().rev().copied().collect::<Vec<_>>())
                .collect();
            let ip: std::net::IpAddr = if v6 {
                <[u8; 16]>::try_from(words).unwrap().into()
            } else {
                <[u8; 4]>::try_from(words).unwrap().into()
            };
            out.push(std::net::SocketAddr::new(ip, port).to_string());
        }
    }
    out
}

/// Starts two ranks with `args` (rank 1 stopped at fault point `point` until released), reads
/// where rank 0 listens once it listens on `want` sockets or more, lets rank 1 go, checks both
/// ranks succeed, and returns rank 0's listening addresses.
fn rank0_listeners(args: &[&str], point: &str, want: usize) -> Vec<String> {
    let t = tempfile::tempdir().unwrap();
    let stalled = t.path().join("stalled");
    let release = t.path().join("release");
    let (st, rel) = (s(&stalled).to_owned(), s(&release).to_owned());
    let fault = format!("{point}@1");
    let children = spawn_ranks(2, args, &|r| {
        if r == 1 {
            vec![
                ("AXSAVE_FAULT".into(), fault.clone()),
                ("AXSAVE_FAULT_FILE".into(), st.clone()),
                ("AXSAVE_FAULT_RELEASE".into(), rel.clone()),
            ]
        } else {
            Vec::new()
        }
    });
    let rank0 = children[0].id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if stalled.exists() {
            seen = listening(&socket_inodes(rank0));
            if seen.len() >= want {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&release, b"").unwrap();
    let res = wait_ranks(children, Duration::from_secs(120));
    for (r, (code, text, _)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r} failed:\n{text}");
    }
    assert!(
        seen.len() >= want,
        "rank 0 listened on {seen:?}: expected {want} sockets"
    );
    for a in &seen {
        assert!(
            a.starts_with("127.0.0.1:"),
            "rank 0 listened on {a} (all: {seen:?})"
        );
    }
    seen
}

#[test]
fn a_loopback_master_addr_keeps_every_listener_on_loopback() {
    if !Path::new("/proc/net/tcp").exists() {
        return eprintln!("skipping: no /proc/net/tcp (not Linux)");
    }
    // Rank 0 sees the metadata and shards 0 and 2, rank 1 shards 1 and 3: pieces cross, so
    // rank 0 listens for them.
    let t = tempfile::tempdir().unwrap();
    let src = fixture("dcp/fsdp_w4/checkpoint");
    for (rank, files) in [
        (0, &[".metadata", "__0_0.distcp", "__2_0.distcp"][..]),
        (1, &["__1_0.distcp", "__3_0.distcp"][..]),
    ] {
        let d = t.path().join(format!("rank{rank}"));
        std::fs::create_dir_all(&d).unwrap();
        for f in files {
            std::fs::copy(src.join(f), d.join(f)).unwrap();
        }
    }
    let out = tempfile::tempdir().unwrap();
    let template = format!("{}/rank{{rank}}", t.path().display());
    // Rank 1 stops at its first piece; by then rank 0 has its store up and, soon, its data
    // listener: wait for both.
    let args = [
        "--source",
        &template,
        "--output",
        s(out.path()),
        "--transport",
        "tcp",
        "-q",
    ];
    rank0_listeners(&args, "copying", 2);
    assert!(
        std::fs::read(out.path().join("model.safetensors")).unwrap()
            == std::fs::read(fixture("dcp/fsdp_w4/reference.safetensors")).unwrap()
    );
}

/// A merge across ranks joins through the same store, bound the same way.
#[test]
fn a_merge_across_ranks_keeps_its_store_on_loopback() {
    if !Path::new("/proc/net/tcp").exists() {
        return eprintln!("skipping: no /proc/net/tcp (not Linux)");
    }
    let out = tempfile::tempdir().unwrap();
    let (base, adapter) = (fixture("lora/base_bf16"), fixture("lora/lora_bf16/adapter"));
    let args = [
        "merge-lora",
        "--base",
        s(&base),
        "--adapter",
        s(&adapter),
        "--output",
        s(out.path()),
    ];
    rank0_listeners(&args, "merging", 1);
    assert!(out.path().join("model.safetensors").exists());
}
