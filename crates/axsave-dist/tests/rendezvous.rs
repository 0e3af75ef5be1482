//! Barrier, broadcast and failure flag across threads and processes, over our real server.

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use axsave_dist::store::rendezvous::{
    self, FAILURE_KEY, barrier, broadcast_bytes, check_failure, receive_broadcast, report_failure,
};
use axsave_dist::store::{CoordError, Failure};
use axsave_dist::{ClientOptions, ServerOptions, StoreClient, StoreServer};

fn opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(10),
        io_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

fn connect(port: u16) -> StoreClient {
    StoreClient::connect("127.0.0.1", port, opts())
        .unwrap()
        .with_namespace("axsave/test/0")
}

fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

#[test]
fn barrier_releases_everyone_together() {
    let s = StoreServer::start(ServerOptions::default()).unwrap();
    let port = s.port();
    let n = 4;
    let handles: Vec<_> = (0..n)
        .map(|rank| {
            thread::spawn(move || {
                let mut c = connect(port);
                // Stagger arrivals: nobody may leave before the last one arrives.
                thread::sleep(Duration::from_millis(100 * rank as u64));
                barrier(&mut c, "start", n, secs(10)).unwrap();
                Instant::now()
            })
        })
        .collect();
    let t0 = Instant::now();
    let left: Vec<Instant> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for l in left {
        assert!(
            l.duration_since(t0) >= Duration::from_millis(290),
            "left too early"
        );
    }
}

#[test]
fn barrier_times_out_when_a_rank_is_missing() {
    let s = StoreServer::start(ServerOptions::default()).unwrap();
    let mut c = connect(s.port());
    let t = Instant::now();
    let e = barrier(
        &mut c,
        "lonely",
        2,
        Instant::now() + Duration::from_millis(400),
    )
    .unwrap_err();
    assert!(
        matches!(&e, CoordError::Timeout { what, .. } if what.contains("lonely")),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn barrier_reuse_is_detected() {
    let s = StoreServer::start(ServerOptions::default()).unwrap();
    let mut c = connect(s.port());
    barrier(&mut c, "once", 1, secs(5)).unwrap();
    let e = barrier(&mut c, "once", 1, secs(5)).unwrap_err();
    assert!(
        matches!(
            e,
            CoordError::BarrierOverrun {
                arrived: 2,
                world_size: 1,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn broadcast_in_chunks() {
    let s = StoreServer::start(ServerOptions::default()).unwrap();
    let port = s.port();
    // A small value limit forces several chunks.
    let small = ClientOptions {
        max_value_len: 1000,
        ..opts()
    };
    let value: Vec<u8> = (0..10_500u32).map(|i| (i % 251) as u8).collect();
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let small = small.clone();
            thread::spawn(move || {
                let mut c = StoreClient::connect("127.0.0.1", port, small)
                    .unwrap()
                    .with_namespace("ns");
                receive_broadcast(&mut c, "plan", secs(10)).unwrap()
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    let mut root = StoreClient::connect("127.0.0.1", port, small)
        .unwrap()
        .with_namespace("ns");
    broadcast_bytes(&mut root, "plan", &value).unwrap();
    for r in readers {
        assert_eq!(r.join().unwrap(), value);
    }
    // 11 chunks + header.
    assert_eq!(root.num_keys().unwrap(), 12);
    // Empty values work too.
    broadcast_bytes(&mut root, "empty", b"").unwrap();
    assert_eq!(receive_broadcast(&mut root, "empty", secs(5)).unwrap(), b"");
}

#[test]
fn broadcast_rejects_a_bad_header() {
    let s = StoreServer::start(ServerOptions::default()).unwrap();
    let mut c = connect(s.port());
    c.set("bcast/x", b"two 5").unwrap();
    let e = receive_broadcast(&mut c, "x", secs(5)).unwrap_err();
    assert!(matches!(e, CoordError::BadBroadcast { .. }), "{e}");
    c.set("bcast/y", b"1 3").unwrap();
    c.set("bcast/y/0", b"toolong").unwrap();
    let e = receive_broadcast(&mut c, "y", secs(5)).unwrap_err();
    assert!(matches!(e, CoordError::BadBroadcast { .. }), "{e}");
}

#[test]
fn first_failure_wins_and_everyone_sees_it() {
    let s = StoreServer::start(ServerOptions::default()).unwrap();
    let mut a = connect(s.port());
    let mut b = connect(s.port());
    assert_eq!(check_failure(&mut a).unwrap(), None);
    let f = report_failure(&mut a, 3, "disk full: /out").unwrap();
    assert_eq!(
        f,
        Failure {
            rank: 3,
            message: "disk full: /out".into()
        }
    );
    // A later report keeps the first.
    assert_eq!(report_failure(&mut b, 1, "other").unwrap(), f);
    assert_eq!(check_failure(&mut b).unwrap(), Some(f));
    // Long messages are cut at a character boundary.
    let s2 = StoreServer::start(ServerOptions::default()).unwrap();
    let mut c = connect(s2.port());
    let long = "é".repeat(5000);
    let f = report_failure(&mut c, 0, &long).unwrap();
    assert!(f.message.len() <= rendezvous::MAX_FAILURE_MESSAGE && !f.message.is_empty());
    c.set(FAILURE_KEY, b"garbage").unwrap();
    assert!(matches!(
        check_failure(&mut c),
        Err(CoordError::BadFailureRecord { .. })
    ));
}

#[test]
fn a_failure_releases_ranks_stuck_in_a_barrier() {
    let s = StoreServer::start(ServerOptions::default()).unwrap();
    let port = s.port();
    let stuck = thread::spawn(move || {
        let mut c = connect(port);
        let t = Instant::now();
        (barrier(&mut c, "never-complete", 3, secs(60)), t.elapsed())
    });
    thread::sleep(Duration::from_millis(300));
    report_failure(&mut connect(port), 2, "cannot read shard 7").unwrap();
    let (r, took) = stuck.join().unwrap();
    match r {
        Err(CoordError::PeerFailed { rank, message }) => {
            assert_eq!((rank, message.as_str()), (2, "cannot read shard 7"));
        }
        other => panic!("{other:?}"),
    }
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// The probe with every launcher variable removed, so only what the test sets is seen.
fn probe(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_axsave-dist-probe"));
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        let launcher_var = [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "NODE_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        ]
        .contains(&k.as_str())
            || [
                "TORCHELASTIC_",
                "SLURM_",
                "OMPI_",
                "PMIX_",
                "PMI_",
                "MPI_",
                "MV2_",
                "AXSAVE_",
            ]
            .iter()
            .any(|p| k.starts_with(p));
        if launcher_var {
            c.env_remove(&k);
        }
    }
    c
}

#[test]
fn probe_reports_the_world() {
    let out = probe(&["world"])
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_PORT", "41234")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "rank: 1",
        "world_size: 2",
        "launcher: Env",
        "master_port: 41234",
    ] {
        assert!(text.contains(want), "{want} missing in\n{text}");
    }
    let out = probe(&["world"])
        .env("RANK", "x")
        .env("WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RANK=\"x\""));
}

#[test]
fn probe_single_process() {
    let out = probe(&["rendezvous", "--timeout", "20"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "rank 0/1 ok: hello from rank 0 of 1 (single)"
    );
}

#[test]
fn probe_processes_rendezvous_through_rank0s_server() {
    // Plain-env launch, as `axsave launch` will do: rank 0 hosts the store on MASTER_PORT.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let n = 3;
    let children: Vec<_> = (0..n)
        .map(|rank| {
            probe(&["rendezvous", "--timeout", "30"])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("AXSAVE_RUN_ID", "probe-test")
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rank {rank}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.trim(),
            format!("rank {rank}/{n} ok: hello from rank 0 of {n} (env)")
        );
    }
}
