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

mod delivery;
mod failures;
mod processes;

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
