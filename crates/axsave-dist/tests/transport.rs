//! The TCP transport over real loopback sockets, with real threads and, where a peer must
//! die, real child processes (this test binary re-run in a child role).
//!
//! Raw peers below build hellos and frames by hand from the wire format documented in
//! `axsave_dist::data_plane::tcp`, so the format itself is under test too.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use axsave_dist::data_plane::{
    PROTOCOL_VERSION, ReceiveStats, RunError, SharedSink, TcpOptions, TcpReceiver, TcpSender,
    TransportError, sink_fn,
};

// ---- helpers ----

fn loopback() -> SocketAddr {
    (Ipv4Addr::LOCALHOST, 0).into()
}

fn options(frame_bytes: usize, io_timeout: Duration) -> TcpOptions {
    TcpOptions {
        session: 0x5e55_1011_abcd_0042,
        token: *b"0123456789abcdef0123456789ABCDEF",
        frame_bytes,
        io_timeout,
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn no_cancel() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// The byte that belongs at `pos` of `file` in every test "model".
fn byte(file: u32, pos: u64) -> u8 {
    ((pos.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8) ^ (file as u8).wrapping_mul(31)
}

fn run_bytes(file: u32, offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|p| byte(file, p))
        .collect()
}

/// Deterministic pseudo-random numbers (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Output "files" in memory, with a count of how often each byte was written.
struct Files {
    data: Vec<Mutex<Vec<u8>>>,
    hits: Vec<Mutex<Vec<u8>>>,
}

impl Files {
    fn new(sizes: &[usize]) -> Arc<Files> {
        Arc::new(Files {
            data: sizes.iter().map(|&n| Mutex::new(vec![0; n])).collect(),
            hits: sizes.iter().map(|&n| Mutex::new(vec![0; n])).collect(),
        })
    }

    /// A sink that does a positioned write, refusing writes outside the file.
    fn sink(self: &Arc<Files>) -> SharedSink {
        let files = Arc::clone(self);
        sink_fn(move |_rank, file, offset, bytes| {
            let f = file as usize;
            let mut data = files
                .data
                .get(f)
                .ok_or_else(|| format!("no file {file}"))?
                .lock()
                .unwrap();
            let start = usize::try_from(offset).map_err(|e| e.to_string())?;
            let end = start + bytes.len();
            if end > data.len() {
                return Err(format!("write to {start}..{end} past the end of file {file}").into());
            }
            data[start..end].copy_from_slice(bytes);
            let mut hits = files.hits[f].lock().unwrap();
            for h in &mut hits[start..end] {
                *h = h.saturating_add(1);
            }
            Ok(())
        })
    }

    /// Every byte written exactly once, with the right value.
    fn check_complete(&self) {
        for (f, (data, hits)) in self.data.iter().zip(&self.hits).enumerate() {
            let data = data.lock().unwrap();
            let hits = hits.lock().unwrap();
            if let Some(p) = hits.iter().position(|&h| h != 1) {
                panic!("file {f} byte {p} written {} times", hits[p]);
            }
            for (p, &b) in data.iter().enumerate() {
                assert_eq!(b, byte(f as u32, p as u64), "file {f} byte {p}");
            }
        }
    }
}

/// A receiver on loopback, started with `sink`.
fn receiver(opts: &TcpOptions, sink: SharedSink) -> (TcpReceiver, Arc<AtomicBool>) {
    let mut r = TcpReceiver::listen(loopback(), opts.clone()).unwrap();
    let cancel = no_cancel();
    r.start(sink, Arc::clone(&cancel)).unwrap();
    (r, cancel)
}

fn null_sink() -> SharedSink {
    sink_fn(|_, _, _, _| Ok(()))
}

/// A hello as the documented wire format spells it.
fn raw_hello(session: u64, rank: u64, frame_bytes: u64, version: u32) -> Vec<u8> {
    raw_hello_with(
        session,
        rank,
        frame_bytes,
        version,
        &options(1, secs(1)).token,
    )
}

/// A hello with the given job token.
fn raw_hello_with(
    session: u64,
    rank: u64,
    frame_bytes: u64,
    version: u32,
    token: &[u8; 32],
) -> Vec<u8> {
    let mut b = b"AXSVTCP\0".to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&session.to_le_bytes());
    b.extend_from_slice(&rank.to_le_bytes());
    b.extend_from_slice(&frame_bytes.to_le_bytes());
    b.extend_from_slice(token);
    b
}

fn raw_frame_header(file: u32, runs: u32, payload: u64) -> Vec<u8> {
    let mut b = b"AXFR".to_vec();
    b.extend_from_slice(&file.to_le_bytes());
    b.extend_from_slice(&runs.to_le_bytes());
    b.extend_from_slice(&payload.to_le_bytes());
    b
}

fn raw_run(offset: u64, len: u32) -> Vec<u8> {
    let mut b = offset.to_le_bytes().to_vec();
    b.extend_from_slice(&len.to_le_bytes());
    b
}

/// Reads a reply: its code and message.
fn raw_read_reply(s: &mut TcpStream) -> (u8, String) {
    let mut h = [0u8; 9];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], b"AXRP");
    let len = u32::from_le_bytes(h[5..9].try_into().unwrap()) as usize;
    let mut m = vec![0u8; len];
    s.read_exact(&mut m).unwrap();
    (h[4], String::from_utf8(m).unwrap())
}

/// A raw client that passed the hello as `rank`.
fn raw_client(addr: SocketAddr, opts: &TcpOptions, rank: u64) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(secs(10))).unwrap();
    s.write_all(&raw_hello(
        opts.session,
        rank,
        opts.frame_bytes as u64,
        PROTOCOL_VERSION,
    ))
    .unwrap();
    assert_eq!(raw_read_reply(&mut s), (0, String::new()));
    s
}

/// Reads until the peer closes (or resets); true if it did within 10 s.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(secs(10))).unwrap();
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return !matches!(e.kind(), std::io::ErrorKind::WouldBlock),
        }
    }
}

fn total(stats: &ReceiveStats) -> u64 {
    stats.bytes_by_rank.values().sum()
}

// ---- delivery ----

#[test]
fn many_runs_from_several_senders_and_connections_arrive_exactly_once() {
    let sizes = [3 * 1024 * 1024 + 5, 2 * 1024 * 1024 + 123, 70_000];
    let files = Files::new(&sizes);
    let opts = options(64 * 1024, secs(20));
    let (r, _cancel) = receiver(&opts, files.sink());
    let addr = r.local_addr();

    // Connections: rank 0 one, rank 1 three (worker threads), rank 2 one.
    let conn_ranks = [0usize, 1, 1, 1, 2];
    let mut plans: Vec<Vec<(u32, u64, usize)>> = vec![Vec::new(); conn_ranks.len()];
    let mut rng = Rng(7);
    for (f, &size) in sizes.iter().enumerate() {
        let mut pos = 0u64;
        while pos < size as u64 {
            let len = match rng.below(10) {
                0..=2 => 1 + rng.below(100),         // tiny
                3 => 64 * 1024 + rng.below(300_000), // several frames
                _ => 1 + rng.below(40_000),          // within a frame
            }
            .min(size as u64 - pos);
            // Two pieces in a row to the same connection: merged into one run on the wire.
            let c = rng.below(conn_ranks.len() as u64) as usize;
            plans[c].push((f as u32, pos, len as usize));
            if rng.below(8) == 0 {
                plans[c].push((f as u32, pos, 0)); // empty runs are fine
            }
            pos += len;
        }
    }
    // Interleave the files within each connection (arrival order across files is free).
    for plan in &mut plans {
        for i in (1..plan.len()).rev() {
            if rng.below(3) == 0 {
                let j = rng.below(i as u64 + 1) as usize;
                plan.swap(i, j);
            }
        }
    }
    let expected: u64 = sizes.iter().map(|&s| s as u64).sum();
    let mut per_rank = BTreeMap::new();
    for (c, plan) in plans.iter().enumerate() {
        let n: u64 = plan.iter().map(|r| r.2 as u64).sum();
        *per_rank.entry(conn_ranks[c]).or_insert(0u64) += n;
    }

    let senders: Vec<_> = plans
        .into_iter()
        .zip(conn_ranks)
        .map(|(plan, rank)| {
            let opts = opts.clone();
            thread::spawn(move || {
                let mut s = TcpSender::connect(addr, rank, &opts).unwrap();
                let mut n = 0u64;
                for (file, offset, len) in plan {
                    s.push(file, offset, &run_bytes(file, offset, len)).unwrap();
                    n += len as u64;
                }
                let sent = s.finish().unwrap();
                assert_eq!(sent, n);
            })
        })
        .collect();
    let stats = r.wait(expected).unwrap();
    for s in senders {
        s.join().unwrap();
    }
    assert_eq!(stats.bytes, expected);
    assert_eq!(total(&stats), expected);
    assert_eq!(stats.bytes_by_rank, per_rank);
    assert_eq!(stats.connections, 5);
    assert_eq!(stats.rejected, 0);
    r.shutdown();
    files.check_complete();
}

#[test]
fn runs_larger_than_a_frame_are_split_and_adjacent_runs_merged() {
    let frame = 4096;
    let files = Files::new(&[2 * 1024 * 1024, 64 * 1024]);
    let calls: Arc<Mutex<Vec<(u32, u64, usize)>>> = Arc::default();
    let sink: SharedSink = {
        let inner = files.sink();
        let calls = Arc::clone(&calls);
        sink_fn(move |rank, file, offset, bytes| {
            calls.lock().unwrap().push((file, offset, bytes.len()));
            inner.write_run(rank, file, offset, bytes)
        })
    };
    let opts = options(frame, secs(20));
    let (r, _cancel) = receiver(&opts, sink);
    let mut s = TcpSender::connect(r.local_addr(), 4, &opts).unwrap();

    // A run far larger than a frame, starting with an empty frame (sent without a copy).
    let big = 1024 * 1024 + 17;
    s.push(0, 0, &run_bytes(0, 0, big)).unwrap();
    s.push(0, 5, &[]).unwrap();
    // Three adjacent small runs: one sink call.
    for i in 0..3u64 {
        let off = 1_500_000 + i * 100;
        s.push(0, off, &run_bytes(0, off, 100)).unwrap();
    }
    // A large run arriving at a partly filled frame: filled by copy, then direct frames.
    let off = 1_500_300;
    s.push(0, off, &run_bytes(0, off, 524_288 + 1000)).unwrap();
    // Switching files flushes the frame of the other file.
    s.push(1, 0, &run_bytes(1, 0, 1000)).unwrap();
    s.push(0, 2_025_588, &run_bytes(0, 2_025_588, 23_564))
        .unwrap();
    s.flush().unwrap();
    s.push(1, 1000, &run_bytes(1, 1000, 64 * 1024 - 1000))
        .unwrap();
    // Gaps stay gaps.
    let expected_0 = big as u64 + 300 + 524_288 + 1000 + 23_564;
    let expected = expected_0 + 64 * 1024;
    let sent = s.finish().unwrap();
    assert_eq!(sent, expected);
    let stats = r.wait(expected).unwrap();
    assert_eq!(stats.bytes, expected);
    r.shutdown();

    let calls = calls.lock().unwrap();
    assert!(calls.iter().all(|c| c.2 <= frame && c.2 > 0), "{calls:?}");
    let merged: Vec<_> = calls
        .iter()
        .filter(|c| c.0 == 0 && (1_500_000..1_500_300).contains(&c.1))
        .collect();
    // The three small runs and the head of the large one that followed them were adjacent:
    // one run on the wire, filling the rest of the frame after 17 bytes of the first push.
    assert_eq!(
        merged,
        [&(0, 1_500_000, 4096 - 17)],
        "adjacent runs not merged"
    );
    // Everything pushed arrived, once, with the right bytes; the gap was never written.
    let data = files.data[0].lock().unwrap();
    let hits = files.hits[0].lock().unwrap();
    for p in 0..data.len() {
        let sent = p < big
            || (1_500_000..1_500_000 + 300 + 524_288 + 1000).contains(&p)
            || (2_025_588..2_049_152).contains(&p);
        assert_eq!(hits[p], u8::from(sent), "byte {p}");
        if sent {
            assert_eq!(data[p], byte(0, p as u64), "byte {p}");
        }
    }
    drop((data, hits));
    let hits1 = files.hits[1].lock().unwrap();
    assert!(hits1.iter().all(|&h| h == 1));
}

#[test]
fn nothing_expected_and_nothing_sent_returns_at_once() {
    let (r, _c) = receiver(&options(1024, secs(30)), null_sink());
    let t = Instant::now();
    assert_eq!(r.wait(0).unwrap(), ReceiveStats::default());
    assert!(t.elapsed() < secs(1));
    // A sender with nothing to say may still connect and finish.
    let s = TcpSender::connect(r.local_addr(), 0, &options(1024, secs(30))).unwrap();
    assert_eq!(s.finish().unwrap(), 0);
    let stats = r.wait(0).unwrap();
    assert_eq!(stats.connections, 1);
    r.shutdown();
}

#[test]
fn misuse_is_an_error() {
    let bad = TcpOptions {
        frame_bytes: 0,
        ..TcpOptions::default()
    };
    assert!(matches!(
        TcpReceiver::listen(loopback(), bad.clone()),
        Err(TransportError::InvalidOptions { .. })
    ));
    let r = TcpReceiver::listen(loopback(), TcpOptions::default()).unwrap();
    assert!(matches!(
        TcpSender::connect(r.local_addr(), 0, &bad),
        Err(TransportError::InvalidOptions { .. })
    ));
    assert!(matches!(r.wait(0), Err(TransportError::NotStarted)));
    let mut r = r;
    r.start(null_sink(), no_cancel()).unwrap();
    assert!(matches!(
        r.start(null_sink(), no_cancel()),
        Err(TransportError::AlreadyStarted)
    ));
    let mut s = TcpSender::connect(r.local_addr(), 0, &TcpOptions::default()).unwrap();
    // A run that would end past 2^64 is refused, and the sender stays usable.
    assert!(matches!(
        s.push(0, u64::MAX - 1, &[1, 2, 3]),
        Err(TransportError::Run(RunError::InvalidRun { .. }))
    ));
    s.push(0, 0, &[1, 2, 3]).unwrap();
    assert_eq!(s.finish().unwrap(), 3);
    assert_eq!(r.wait(3).unwrap().bytes, 3);

    // An "infinite" io_timeout is not an overflow.
    let forever = options(1024, Duration::MAX);
    let (r, _c) = receiver(&forever, null_sink());
    let mut s = TcpSender::connect(r.local_addr(), 0, &forever).unwrap();
    s.push(0, 0, &[1; 5000]).unwrap();
    assert_eq!(s.finish().unwrap(), 5000);
    assert_eq!(r.wait(5000).unwrap().bytes, 5000);
}

#[test]
fn sending_and_receiving_at_once_in_every_rank_does_not_deadlock() {
    // Three "ranks", each a receiver and a sender to both others at the same time, with more
    // data per pair than the socket buffers hold. Sinks record the runs (and check their
    // first and last bytes) instead of storing 200 MiB.
    let n = 3;
    let per_pair = 24 * 1024 * 1024;
    let opts = options(1024 * 1024, secs(30));
    type Seen = Arc<Mutex<Vec<(usize, u64, usize)>>>;
    let seen: Vec<Seen> = (0..n).map(|_| Seen::default()).collect();
    let receivers: Vec<(TcpReceiver, Arc<AtomicBool>)> = seen
        .iter()
        .map(|seen| {
            let seen = Arc::clone(seen);
            let sink: SharedSink = sink_fn(move |rank, file, offset, bytes| {
                let last = offset + bytes.len() as u64 - 1;
                if bytes[0] != byte(file, offset) || bytes[bytes.len() - 1] != byte(file, last) {
                    return Err(format!("wrong bytes at {offset}").into());
                }
                seen.lock().unwrap().push((rank, offset, bytes.len()));
                Ok(())
            });
            receiver(&opts, sink)
        })
        .collect();
    let addrs: Vec<SocketAddr> = receivers.iter().map(|r| r.0.local_addr()).collect();
    let ranks: Vec<_> = (0..n)
        .map(|me| {
            let addrs = addrs.clone();
            let opts = opts.clone();
            thread::spawn(move || {
                // Each destination gets the region `me` of its file, pushed alternately so
                // both connections are busy at once.
                let mut conns: Vec<TcpSender> = (0..n)
                    .filter(|&d| d != me)
                    .map(|d| TcpSender::connect(addrs[d], me, &opts).unwrap())
                    .collect();
                let step = 256 * 1024;
                for at in (0..per_pair).step_by(step) {
                    let off = (me * per_pair + at) as u64;
                    let data = run_bytes(0, off, step);
                    for s in &mut conns {
                        s.push(0, off, &data).unwrap();
                    }
                }
                for s in conns {
                    s.finish().unwrap();
                }
            })
        })
        .collect();
    for (d, (r, _)) in receivers.iter().enumerate() {
        let stats = r.wait(((n - 1) * per_pair) as u64).unwrap();
        assert_eq!(stats.connections, n - 1);
        assert!(!stats.bytes_by_rank.contains_key(&d));
    }
    for t in ranks {
        t.join().unwrap();
    }
    for (d, seen) in seen.iter().enumerate() {
        let mut runs = seen.lock().unwrap().clone();
        runs.sort_by_key(|r| r.1);
        // The runs tile exactly the regions of the other ranks, each from its owner.
        let mut at = 0u64;
        for (rank, offset, len) in runs {
            if at == (d * per_pair) as u64 {
                at += per_pair as u64;
            }
            assert_eq!(offset, at, "receiver {d}");
            assert_eq!(rank, offset as usize / per_pair, "receiver {d}");
            at += len as u64;
        }
        let end = if d == n - 1 {
            d * per_pair
        } else {
            n * per_pair
        };
        assert_eq!(at, end as u64, "receiver {d}");
    }
}

#[test]
fn throughput_on_loopback() {
    // 128 MiB in 1 MiB runs over one connection, written into a preallocated buffer as a
    // positioned write would. `cargo run --release --example tcp_throughput` measures more.
    let mib = 1024 * 1024;
    let total_mib = 128;
    let opts = options(mib, secs(30));
    // Filled, not zeroed, so its pages exist before the clock starts (a zeroed allocation
    // would be faulted in page by page by the sink and measure that instead).
    let out = Arc::new(Mutex::new(vec![0xEEu8; total_mib * mib]));
    let sink: SharedSink = {
        let out = Arc::clone(&out);
        sink_fn(move |_, _, offset, bytes| {
            let o = offset as usize;
            out.lock().unwrap()[o..o + bytes.len()].copy_from_slice(bytes);
            Ok(())
        })
    };
    let (r, _c) = receiver(&opts, sink);
    let source = run_bytes(0, 0, mib);
    let t = Instant::now();
    let addr = r.local_addr();
    let sender = thread::spawn(move || {
        let mut s = TcpSender::connect(addr, 1, &opts).unwrap();
        for i in 0..total_mib {
            s.push(0, (i * mib) as u64, &source).unwrap();
        }
        s.finish().unwrap()
    });
    let stats = r.wait((total_mib * mib) as u64).unwrap();
    assert_eq!(sender.join().unwrap(), (total_mib * mib) as u64);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "loopback: {total_mib} MiB in {secs:.3} s = {:.2} GB/s (one connection, 1 MiB runs)",
        stats.bytes as f64 / secs / 1e9
    );
    let source = run_bytes(0, 0, mib);
    let out = out.lock().unwrap();
    for chunk in out.chunks(mib) {
        assert!(chunk == &source[..]);
    }
}

// ---- failures ----

#[test]
fn a_sender_that_drops_its_socket_mid_frame_is_reported_by_rank() {
    let opts = options(4096, secs(20));
    let (r, _c) = receiver(&opts, null_sink());
    let mut s = raw_client(r.local_addr(), &opts, 5);
    s.write_all(&raw_frame_header(0, 1, 1000)).unwrap();
    s.write_all(&raw_run(0, 1000)).unwrap();
    s.write_all(&[7u8; 500]).unwrap();
    let t = Instant::now();
    drop(s);
    let e = r.wait(1000).unwrap_err();
    assert!(
        matches!(&e, TransportError::SenderDied { rank: 5, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("rank 5"), "{e}");
    // Seen at once, not after io_timeout.
    assert!(t.elapsed() < secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_sender_dropped_without_finish_is_reported_as_died() {
    let opts = options(4096, secs(20));
    let (r, _c) = receiver(&opts, null_sink());
    let mut s = TcpSender::connect(r.local_addr(), 3, &opts).unwrap();
    s.push(0, 0, &[1u8; 10_000]).unwrap();
    s.flush().unwrap();
    drop(s);
    let e = r.wait(10_000).unwrap_err();
    assert!(
        matches!(&e, TransportError::SenderDied { rank: 3, detail, .. } if detail.contains("end marker")),
        "{e}"
    );
}

#[test]
fn a_sender_hung_mid_frame_is_reported_within_io_timeout() {
    let opts = options(4096, Duration::from_millis(800));
    let (r, _c) = receiver(&opts, null_sink());
    let mut s = raw_client(r.local_addr(), &opts, 2);
    s.write_all(&raw_frame_header(0, 1, 1000)).unwrap();
    s.write_all(&raw_run(0, 1000)).unwrap();
    s.write_all(&[7u8; 10]).unwrap();
    let t = Instant::now();
    let e = r.wait(1000).unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(&e, TransportError::SenderHung { rank: 2, .. }),
        "{e}"
    );
    assert!(took >= Duration::from_millis(700), "{took:?}");
    assert!(took < secs(4), "{took:?}");
    drop(s);
}

#[test]
fn nothing_arriving_is_a_stall_naming_the_open_connections() {
    let opts = options(4096, Duration::from_millis(600));
    let (r, _c) = receiver(&opts, null_sink());
    // Rank 6 connects, sends one frame, then idles without finishing.
    let mut s = TcpSender::connect(r.local_addr(), 6, &opts).unwrap();
    s.push(0, 0, &[1u8; 100]).unwrap();
    s.flush().unwrap();
    let t = Instant::now();
    let e = r.wait(1000).unwrap_err();
    assert!(
        matches!(&e, TransportError::Stalled { received: 100, expected: 1000, open, .. } if open == &[6]),
        "{e}"
    );
    assert!(t.elapsed() < secs(4));
    drop(s);

    // Quiet time before `wait` is called does not count against the senders.
    let (r, _c) = receiver(&opts, null_sink());
    thread::sleep(Duration::from_millis(1300));
    let addr = r.local_addr();
    let o = opts.clone();
    let late = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        let mut s = TcpSender::connect(addr, 1, &o).unwrap();
        s.push(0, 0, &[1u8; 10]).unwrap();
        s.finish().unwrap()
    });
    assert_eq!(r.wait(10).unwrap().bytes, 10);
    assert_eq!(late.join().unwrap(), 10);

    // And with nobody connecting at all.
    let (r, _c) = receiver(&opts, null_sink());
    let t = Instant::now();
    let e = r.wait(1).unwrap_err();
    assert!(
        matches!(&e, TransportError::Stalled { open, .. } if open.is_empty()),
        "{e}"
    );
    assert!(t.elapsed() >= Duration::from_millis(500) && t.elapsed() < secs(4));
}

#[test]
fn a_receiver_that_shuts_down_fails_the_sender_promptly() {
    let opts = options(64 * 1024, secs(30));
    let slow: SharedSink = sink_fn(|_, _, _, _| {
        thread::sleep(Duration::from_millis(2));
        Ok(())
    });
    let (r, _c) = receiver(&opts, slow);
    let addr = r.local_addr();
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let k = Arc::clone(&killed_at);
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        *k.lock().unwrap() = Some(Instant::now());
        r.shutdown();
    });
    let mut s = TcpSender::connect(addr, 1, &opts).unwrap();
    let data = vec![9u8; 1024 * 1024];
    let mut offset = 0;
    let e = loop {
        if let Err(e) = s.push(0, offset, &data) {
            break e;
        }
        offset += data.len() as u64;
        assert!(offset < 1 << 40, "the sender never noticed");
    };
    let noticed = Instant::now();
    killer.join().unwrap();
    assert!(matches!(e, TransportError::Closed { .. }), "{e}");
    let since = noticed.duration_since(killed_at.lock().unwrap().unwrap());
    assert!(since < secs(5), "{since:?}");
    // Broken from now on, with the same error.
    assert!(matches!(s.flush(), Err(TransportError::Closed { .. })));
    assert!(matches!(s.finish(), Err(TransportError::Closed { .. })));
}

/// A peer that accepts, answers the hello like a receiver, then never reads (`drain` false) or
/// reads everything but never acknowledges (`drain` true).
fn hung_receiver(drain: bool) -> (SocketAddr, thread::JoinHandle<()>, Arc<AtomicBool>) {
    let l = TcpListener::bind(loopback()).unwrap();
    let addr = l.local_addr().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let t = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut hello = [0u8; 40];
        s.read_exact(&mut hello).unwrap();
        let mut ok = b"AXRP".to_vec();
        ok.push(0);
        ok.extend_from_slice(&0u32.to_le_bytes());
        s.write_all(&ok).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while !d.load(Ordering::SeqCst) {
            if drain {
                let _ = s.read(&mut buf);
            } else {
                thread::sleep(Duration::from_millis(20));
            }
        }
    });
    (addr, t, done)
}

#[test]
fn a_receiver_that_stops_reading_times_the_sender_out() {
    let (addr, t, done) = hung_receiver(false);
    let opts = options(1024 * 1024, Duration::from_millis(700));
    let mut s = TcpSender::connect(addr, 0, &opts).unwrap();
    let data = vec![1u8; 1024 * 1024];
    let started = Instant::now();
    let mut offset = 0;
    let e = loop {
        if let Err(e) = s.push(0, offset, &data) {
            break e;
        }
        offset += data.len() as u64;
    };
    assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
    assert!(started.elapsed() < secs(5), "{:?}", started.elapsed());
    done.store(true, Ordering::SeqCst);
    t.join().unwrap();
}

#[test]
fn a_receiver_that_never_acknowledges_times_finish_out() {
    let (addr, t, done) = hung_receiver(true);
    let opts = options(1024 * 1024, Duration::from_millis(700));
    let mut s = TcpSender::connect(addr, 0, &opts).unwrap();
    s.push(0, 0, &[1u8; 5000]).unwrap();
    let started = Instant::now();
    let e = s.finish().unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(&e, TransportError::Timeout { during, .. } if during.contains("acknowledgement")),
        "{e}"
    );
    assert!(
        took >= Duration::from_millis(600) && took < secs(4),
        "{took:?}"
    );
    done.store(true, Ordering::SeqCst);
    t.join().unwrap();
}

#[test]
fn a_sink_error_reaches_the_sender_instead_of_an_ack_and_fails_wait() {
    let opts = options(4096, secs(20));
    let sink: SharedSink = sink_fn(|_, file, _, _| {
        if file == 1 {
            Err("disk full".into())
        } else {
            Ok(())
        }
    });
    let (r, _c) = receiver(&opts, sink);
    let mut s = TcpSender::connect(r.local_addr(), 8, &opts).unwrap();
    s.push(0, 0, &[0u8; 10_000]).unwrap();
    s.push(1, 0, &[0u8; 100]).unwrap();
    // The frame for file 1 is still buffered; finish sends it and must not get an ack.
    let e = s.finish().unwrap_err();
    assert!(
        matches!(&e, TransportError::Remote { message, .. } if message.contains("disk full")),
        "{e}"
    );
    let e = r.wait(10_100).unwrap_err();
    assert!(
        matches!(&e, TransportError::Run(RunError::Sink { rank: 8, file: 1, message, .. }) if message == "disk full"),
        "{e}"
    );
}

#[test]
fn a_sink_error_stops_a_sender_that_keeps_pushing() {
    let opts = options(4096, secs(20));
    let calls = Arc::new(AtomicUsize::new(0));
    let sink: SharedSink = {
        let calls = Arc::clone(&calls);
        sink_fn(move |_, _, _, _| {
            if calls.fetch_add(1, Ordering::SeqCst) == 3 {
                Err("no space left on device".into())
            } else {
                Ok(())
            }
        })
    };
    let (r, _c) = receiver(&opts, sink);
    let mut s = TcpSender::connect(r.local_addr(), 2, &opts).unwrap();
    let data = vec![5u8; 4096];
    let mut offset = 0;
    let t = Instant::now();
    let e = loop {
        if let Err(e) = s.push(0, offset, &data) {
            break e;
        }
        offset += 4096;
        assert!(
            t.elapsed() < secs(10),
            "the sender never heard of the sink error"
        );
    };
    assert!(
        matches!(&e, TransportError::Remote { message, .. } if message.contains("no space left")),
        "{e}"
    );
    assert!(matches!(
        r.wait(u64::MAX).unwrap_err(),
        TransportError::Run(RunError::Sink { rank: 2, .. })
    ));
}

#[test]
fn a_panicking_sink_is_an_error_not_a_hang() {
    let opts = options(4096, secs(20));
    let sink: SharedSink = sink_fn(|_, _, _, _| panic!("sink exploded"));
    let (r, _c) = receiver(&opts, sink);
    let mut s = TcpSender::connect(r.local_addr(), 1, &opts).unwrap();
    s.push(0, 0, b"hello").unwrap();
    let e = s.finish().unwrap_err();
    assert!(e.to_string().contains("sink exploded"), "{e}");
    let e = r.wait(5).unwrap_err();
    assert!(
        matches!(&e, TransportError::Run(RunError::Sink { message, .. }) if message.contains("panicked")),
        "{e}"
    );
}

#[test]
fn more_bytes_than_expected_never_reach_the_sink() {
    let opts = options(1024, secs(20));
    let files = Files::new(&[10_000]);
    let (r, _c) = receiver(&opts, files.sink());
    let addr = r.local_addr();
    let o = opts.clone();
    let sender = thread::spawn(move || {
        // Let `wait` announce its expectation first.
        thread::sleep(Duration::from_millis(200));
        let mut s = TcpSender::connect(addr, 4, &o).unwrap();
        let r = s.push(0, 0, &run_bytes(0, 0, 5000));
        r.and_then(|()| s.finish())
    });
    let e = r.wait(3000).unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::Run(RunError::TooManyBytes {
                expected: 3000,
                rank: Some(4),
                ..
            })
        ),
        "{e}"
    );
    let se = sender.join().unwrap().unwrap_err();
    assert!(
        matches!(&se, TransportError::Remote { message, .. } if message.contains("more than the 3000 expected")),
        "{se}"
    );
    let hits = files.hits[0].lock().unwrap();
    assert!(hits[3072..].iter().all(|&h| h == 0));
}

#[test]
fn stray_connections_are_turned_away_without_harming_the_transfer() {
    let opts = options(8192, secs(20));
    let files = Files::new(&[200_000]);
    let (r, _c) = receiver(&opts, files.sink());
    let addr = r.local_addr();

    // A silent connection stays open through the whole transfer.
    let silent = TcpStream::connect(addr).unwrap();

    // Garbage.
    let mut g = TcpStream::connect(addr).unwrap();
    let _ = g.write_all(&[0xAB; 100]);
    assert!(closed_by_peer(&mut g));
    // Connect and leave.
    drop(TcpStream::connect(addr).unwrap());
    // Half a hello, then leave.
    let mut h = TcpStream::connect(addr).unwrap();
    h.write_all(&raw_hello(opts.session, 0, 8192, PROTOCOL_VERSION)[..20])
        .unwrap();
    drop(h);
    // Another run's session.
    let other = TcpOptions {
        session: 1,
        ..opts.clone()
    };
    let e = TcpSender::connect(addr, 0, &other).unwrap_err();
    assert!(
        matches!(&e, TransportError::Rejected { reason, .. } if reason.contains("session")),
        "{e}"
    );
    // The right session but the wrong job token: someone who could read the store (or guess
    // the session) but was not given the token.
    let intruder = TcpOptions {
        token: [7; 32],
        ..opts.clone()
    };
    let e = TcpSender::connect(addr, 0, &intruder).unwrap_err();
    assert!(
        matches!(&e, TransportError::Rejected { reason, .. } if reason.contains("wrong job token")),
        "{e}"
    );
    // The same by hand, one byte off at the end: refused, and nothing it sends is written.
    let mut last = opts.token;
    last[31] ^= 1;
    let mut t = TcpStream::connect(addr).unwrap();
    t.set_read_timeout(Some(secs(10))).unwrap();
    t.write_all(&raw_hello_with(
        opts.session,
        0,
        8192,
        PROTOCOL_VERSION,
        &last,
    ))
    .unwrap();
    let _ = t.write_all(&raw_frame_header(0, 1, 4));
    let _ = t.write_all(&raw_run(0, 4));
    let _ = t.write_all(b"EVIL");
    let (code, msg) = raw_read_reply(&mut t);
    assert_eq!(code, 1);
    assert!(msg.contains("wrong job token"), "{msg}");
    assert!(closed_by_peer(&mut t));
    // Another protocol version.
    let mut v = TcpStream::connect(addr).unwrap();
    v.set_read_timeout(Some(secs(10))).unwrap();
    v.write_all(&raw_hello(opts.session, 0, 8192, 99)).unwrap();
    let (code, msg) = raw_read_reply(&mut v);
    assert_eq!(code, 1);
    assert!(msg.contains("version 99"), "{msg}");
    assert!(closed_by_peer(&mut v));
    // Frames larger than this receiver accepts.
    let bigger = TcpOptions {
        frame_bytes: 16384,
        ..opts.clone()
    };
    let e = TcpSender::connect(addr, 0, &bigger).unwrap_err();
    assert!(
        matches!(&e, TransportError::Rejected { reason, .. } if reason.contains("frame size")),
        "{e}"
    );

    // The real transfer, from two ranks.
    let handles: Vec<_> = [(0usize, 0..120_000u64), (1, 120_000..200_000)]
        .into_iter()
        .map(|(rank, range)| {
            let opts = opts.clone();
            thread::spawn(move || {
                let mut s = TcpSender::connect(addr, rank, &opts).unwrap();
                let len = (range.end - range.start) as usize;
                s.push(0, range.start, &run_bytes(0, range.start, len))
                    .unwrap();
                s.finish().unwrap()
            })
        })
        .collect();
    let stats = r.wait(200_000).unwrap();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(stats.connections, 2);
    // Garbage, connect-and-leave (its hello never came), half a hello, wrong session, two
    // wrong tokens, wrong version, frame too large. The first three may still be counted a
    // moment later.
    let deadline = Instant::now() + secs(5);
    while r.stats().rejected < 8 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(r.stats().rejected, 8);
    drop(silent);
    r.shutdown();
    files.check_complete();
}

#[test]
fn lying_frames_are_refused_before_any_allocation() {
    let opts = options(64 * 1024, secs(20));
    type Case = (&'static str, Vec<u8>, &'static str);
    let cases: Vec<Case> = vec![
        (
            "huge payload",
            raw_frame_header(0, 1, u64::MAX - 7),
            "payload",
        ),
        ("huge run count", raw_frame_header(0, u32::MAX, 100), "runs"),
        (
            "payload above the frame size",
            raw_frame_header(0, 1, 64 * 1024 + 1),
            "payload",
        ),
        (
            "table disagrees with payload",
            [raw_frame_header(0, 2, 100), raw_run(0, 10), raw_run(10, 20)].concat(),
            "add up to 30",
        ),
        (
            "run ending past 2^64",
            [raw_frame_header(0, 1, 100), raw_run(u64::MAX - 10, 100)].concat(),
            "2^64",
        ),
        ("unknown message", b"JUNKJUNKJUNKJUNK".to_vec(), "neither"),
    ];
    for (name, bytes, why) in cases {
        let (r, _c) = receiver(&opts, null_sink());
        let mut s = raw_client(r.local_addr(), &opts, 9);
        s.write_all(&bytes).unwrap();
        let t = Instant::now();
        let e = r.wait(1000).unwrap_err();
        assert!(
            matches!(&e, TransportError::Malformed { rank: 9, detail, .. } if detail.contains(why)),
            "{name}: {e}"
        );
        assert!(t.elapsed() < secs(5), "{name}");
        // The sender is told why, then the receiver closes.
        let (code, msg) = raw_read_reply(&mut s);
        assert_eq!(code, 1, "{name}");
        assert!(msg.contains(why), "{name}: {msg}");
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(closed_by_peer(&mut s), "{name}");
    }
}

#[test]
fn an_end_marker_with_the_wrong_total_is_refused() {
    let opts = options(1024, secs(20));
    let (r, _c) = receiver(&opts, null_sink());
    let mut s = raw_client(r.local_addr(), &opts, 3);
    s.write_all(&[raw_frame_header(0, 1, 4), raw_run(0, 4), b"abcd".to_vec()].concat())
        .unwrap();
    let mut end = b"AXEN".to_vec();
    end.extend_from_slice(&5u64.to_le_bytes());
    s.write_all(&end).unwrap();
    let (code, msg) = raw_read_reply(&mut s);
    assert_eq!(code, 1);
    assert!(msg.contains("announced 5"), "{msg}");
    assert!(matches!(
        r.wait(4).unwrap_err(),
        TransportError::CountMismatch {
            rank: 3,
            announced: 5,
            received: 4,
            ..
        }
    ));
}

#[test]
fn cancel_stops_wait_and_blocked_senders_promptly() {
    let opts = options(4096, secs(60));
    let (r, cancel) = receiver(&opts, null_sink());
    let mut s = TcpSender::connect(r.local_addr(), 1, &opts).unwrap();
    s.push(0, 0, &[1u8; 100]).unwrap();
    s.flush().unwrap();
    let c = Arc::clone(&cancel);
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        c.store(true, Ordering::SeqCst);
    });
    let t = Instant::now();
    let e = r.wait(1_000_000).unwrap_err();
    assert!(matches!(e, TransportError::Cancelled), "{e}");
    assert!(t.elapsed() < secs(2), "{:?}", t.elapsed());
    // The receiver dropped its connections: the sender learns it at its next step.
    let e = s.finish().unwrap_err();
    assert!(matches!(e, TransportError::Closed { .. }), "{e}");

    // A sender blocked on a receiver that does not read gives up when cancelled.
    let (addr, t, done) = hung_receiver(false);
    let flag = Arc::new(AtomicBool::new(false));
    let mut s = TcpSender::connect_with_cancel(addr, 0, &opts, Some(Arc::clone(&flag))).unwrap();
    let f = Arc::clone(&flag);
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        f.store(true, Ordering::SeqCst);
    });
    let data = vec![0u8; 1024 * 1024];
    let started = Instant::now();
    let mut offset = 0;
    let e = loop {
        if let Err(e) = s.push(0, offset, &data) {
            break e;
        }
        offset += data.len() as u64;
    };
    assert!(matches!(e, TransportError::Cancelled), "{e}");
    assert!(started.elapsed() < secs(3));
    done.store(true, Ordering::SeqCst);
    t.join().unwrap();
}

#[test]
fn connect_retries_until_the_receiver_listens_and_gives_up_at_io_timeout() {
    // A port that is free now; the receiver takes it a little later.
    let port = TcpListener::bind(loopback())
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
    let opts = options(4096, secs(10));
    let o = opts.clone();
    let late = thread::spawn(move || {
        thread::sleep(Duration::from_millis(400));
        let mut r = TcpReceiver::listen(addr, o).unwrap();
        r.start(null_sink(), no_cancel()).unwrap();
        let stats = r.wait(3).unwrap();
        r.shutdown();
        stats
    });
    let t = Instant::now();
    let mut s = TcpSender::connect(addr, 0, &opts).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    s.push(0, 0, b"abc").unwrap();
    assert_eq!(s.finish().unwrap(), 3);
    assert_eq!(late.join().unwrap().bytes, 3);

    // Nobody ever listens.
    let port = TcpListener::bind(loopback())
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = Instant::now();
    let e = TcpSender::connect(
        (Ipv4Addr::LOCALHOST, port).into(),
        0,
        &options(4096, Duration::from_millis(500)),
    )
    .unwrap_err();
    assert!(matches!(e, TransportError::Connect { .. }), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(450) && t.elapsed() < secs(3));
}

#[test]
fn connecting_to_something_else_is_not_mistaken_for_a_receiver() {
    // A listener that answers with nonsense.
    let l = TcpListener::bind(loopback()).unwrap();
    let addr = l.local_addr().unwrap();
    let t = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut hello = [0u8; 40];
        s.read_exact(&mut hello).unwrap();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
    });
    let e = TcpSender::connect(addr, 0, &options(4096, secs(5))).unwrap_err();
    assert!(matches!(e, TransportError::NotTransport { .. }), "{e}");
    t.join().unwrap();
}

// ---- real processes ----

const CHILD_ENV: &str = "AXSAVE_TRANSPORT_TEST_CHILD";

/// Kills the child on drop so a failing test does not leave it running.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs this test binary again as a child playing `role` (see [`child_process_role`]).
fn spawn_child(
    role: &str,
    env: &[(&str, String)],
) -> (Killed, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_process_role",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, role)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = Killed(cmd.spawn().expect("re-run the test binary as a child"));
    let lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    (child, lines)
}

/// Entry point of the child processes the tests below start; on its own (without the
/// environment variable) it has nothing to do.
#[test]
fn child_process_role() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    let opts = options(64 * 1024, secs(30));
    let give_up = Instant::now() + secs(60);
    match role.as_str() {
        // Sends forever, slowly, as rank 7, until killed.
        "send" => {
            let addr: SocketAddr = std::env::var("AXSAVE_TRANSPORT_TEST_ADDR")
                .unwrap()
                .parse()
                .unwrap();
            let mut s = TcpSender::connect(addr, 7, &opts).unwrap();
            let mut offset = 0;
            while Instant::now() < give_up {
                s.push(0, offset, &[3u8; 4096]).unwrap();
                s.flush().unwrap();
                offset += 4096;
                thread::sleep(Duration::from_millis(5));
            }
        }
        // Receives forever into a slow sink, until killed.
        "receive" => {
            let slow: SharedSink = sink_fn(|_, _, _, _| {
                thread::sleep(Duration::from_millis(1));
                Ok(())
            });
            let (r, _c) = receiver(&opts, slow);
            println!("ADDR {}", r.local_addr());
            while Instant::now() < give_up {
                thread::sleep(Duration::from_millis(50));
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

#[test]
fn a_killed_sender_process_is_reported_by_rank_at_once() {
    let opts = options(64 * 1024, secs(30));
    let (r, _c) = receiver(&opts, null_sink());
    let (mut child, _out) = spawn_child(
        "send",
        &[("AXSAVE_TRANSPORT_TEST_ADDR", r.local_addr().to_string())],
    );
    let deadline = Instant::now() + secs(20);
    while r.stats().bytes < 64 * 1024 {
        assert!(Instant::now() < deadline, "the child sent nothing");
        thread::sleep(Duration::from_millis(10));
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let t = Instant::now();
    let e = r.wait(u64::MAX).unwrap_err();
    assert!(
        matches!(&e, TransportError::SenderDied { rank: 7, .. }),
        "{e}"
    );
    assert!(t.elapsed() < secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_killed_receiver_process_fails_the_sender_at_once() {
    let (child, mut out) = spawn_child("receive", &[]);
    let addr: SocketAddr = loop {
        let line = out.next().expect("the child exited").unwrap();
        // The harness prints `test child_process_role ... ` first, on the same line.
        if let Some(at) = line.find("ADDR ") {
            break line[at + 5..].trim().parse().unwrap();
        }
    };
    let opts = options(64 * 1024, secs(30));
    let mut s = TcpSender::connect(addr, 0, &opts).unwrap();
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let k = Arc::clone(&killed_at);
    let killer = thread::spawn(move || {
        let mut child = child;
        thread::sleep(Duration::from_millis(300));
        child.0.kill().unwrap();
        *k.lock().unwrap() = Some(Instant::now());
        child.0.wait().unwrap();
    });
    let data = vec![1u8; 256 * 1024];
    let mut offset = 0;
    let e = loop {
        if let Err(e) = s.push(0, offset, &data) {
            break e;
        }
        offset += data.len() as u64;
    };
    let noticed = Instant::now();
    killer.join().unwrap();
    assert!(matches!(e, TransportError::Closed { .. }), "{e}");
    let since = noticed.duration_since(killed_at.lock().unwrap().unwrap());
    assert!(since < secs(5), "{since:?}");
}
