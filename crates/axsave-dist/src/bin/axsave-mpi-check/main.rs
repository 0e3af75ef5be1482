//! `axsave-mpi-check`: runs the MPI transport's scenarios under an MPI launcher, for the
//! tests in `tests/mpi.rs` and for measurements (feature `mpi`).
//!
//! `mpirun -n N axsave-mpi-check SCENARIO [--key value]...`, where SCENARIO is one of
//!
//! * `exchange` — every rank writes three "files" in memory and sends to every rank (itself
//!   included) from `--threads` worker threads, one sender per thread and destination; runs
//!   of 1 ..= `--max-run` bytes (`--runs` per thread, writer and file) in a shuffled order,
//!   frames of `--frame` bytes, `--in-flight` frames at most. Each writer checks that every
//!   byte arrived exactly once and is right.
//! * `collectives` — broadcasts (the bootstrap address, a large value, an empty one, a root
//!   without a value), barriers, a collective that times out on rank 0.
//! * `cancel` — a cancelled `wait`, a stalled `wait`, a cancelled sender, strays drained.
//! * `malformed` — a peer that breaks the protocol: a bad frame, an end with wrong totals,
//!   and a stray of another session next to good data.
//! * `sink-error` — rank 0's sink fails; rank 0 reports the error and aborts the job.
//! * `kill` — rank 1 sends slowly to rank 0 and prints its pid, to be killed from outside.
//! * `throughput` — rank 1 sends `--mib` MiB in 1 MiB runs to rank 0 (two ranks).
//!
//! `--thread-level serialized` (any scenario) asks MPI for `MPI_THREAD_SERIALIZED` instead of
//! `MPI_THREAD_MULTIPLE`.
//!
//! Every rank prints `rank R: ok SCENARIO ...` when its part passed; a failure prints
//! `rank R: FAIL ...` and exits with status 1 (which makes the launcher fail the job).

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use axsave_dist::data_plane::mpi::Threading;
use axsave_dist::data_plane::mpi::{MpiContext, MpiError, MpiOptions, MpiTransport};
use axsave_dist::data_plane::{SharedSink, sink_fn};

mod malformed;
use malformed::malformed;

type Res<T = ()> = Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(scenario) = args.first().cloned() else {
        eprintln!("usage: axsave-mpi-check SCENARIO [--key value]...");
        return ExitCode::from(2);
    };
    let flags = match Flags::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("axsave-mpi-check: {e}");
            return ExitCode::from(2);
        }
    };
    // `--thread-level serialized` asks for less than MULTIPLE, so that MPI_Abort takes the
    // progress thread's path.
    let level = match flags.0.get("thread-level").map(String::as_str) {
        None | Some("multiple") => Threading::Multiple,
        Some("serialized") => Threading::Serialized,
        Some(other) => {
            eprintln!("axsave-mpi-check: unknown thread level {other}");
            return ExitCode::from(2);
        }
    };
    let ctx = match MpiContext::init_with_thread_level(level) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("axsave-mpi-check: MPI init failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rank = ctx.rank();
    let result = match scenario.as_str() {
        "exchange" => exchange(&ctx, &flags),
        "collectives" => collectives(ctx, &flags),
        "cancel" => cancel(&ctx),
        "malformed" => malformed(&ctx),
        "sink-error" => sink_error(&ctx),
        "kill" => kill(&ctx),
        "throughput" => throughput(&ctx, &flags),
        other => Err(format!("unknown scenario {other}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("rank {rank}: FAIL {scenario}: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: &[String]) -> Res<Flags> {
        let mut m = HashMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or_else(|| format!("expected --key, got {k}"))?;
            let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            m.insert(key.to_owned(), v.clone());
        }
        Ok(Flags(m))
    }

    fn num(&self, key: &str, default: usize) -> Res<usize> {
        self.0.get(key).map_or(Ok(default), |v| {
            v.parse().map_err(|e| format!("--{key}: {e}"))
        })
    }
}

fn err(e: MpiError) -> String {
    e.to_string()
}

/// The byte at `pos` of `file` of writer `w` in every test "model".
fn byte(w: usize, file: u32, pos: u64) -> u8 {
    ((pos.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        ^ (file as u8).wrapping_mul(31)
        ^ (w as u8).wrapping_mul(101)
}

/// Deterministic pseudo-random numbers (splitmix64), identical on every rank.
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
    fn new(sizes: &[u64]) -> Arc<Files> {
        Arc::new(Files {
            data: sizes
                .iter()
                .map(|&n| Mutex::new(vec![0; n as usize]))
                .collect(),
            hits: sizes
                .iter()
                .map(|&n| Mutex::new(vec![0; n as usize]))
                .collect(),
        })
    }

    fn sink(files: &Arc<Files>) -> SharedSink {
        let f = Arc::clone(files);
        sink_fn(move |_from, file, offset, bytes| {
            let i = file as usize;
            let (Some(d), Some(h)) = (f.data.get(i), f.hits.get(i)) else {
                return Err(format!("no file {file}").into());
            };
            let mut d = d.lock().map_err(|e| e.to_string())?;
            let mut h = h.lock().map_err(|e| e.to_string())?;
            let o = offset as usize;
            if o + bytes.len() > d.len() {
                return Err(format!("run past the end of file {file}").into());
            }
            d[o..o + bytes.len()].copy_from_slice(bytes);
            for x in &mut h[o..o + bytes.len()] {
                *x = x.saturating_add(1);
            }
            Ok(())
        })
    }

    /// Every byte written once and right.
    fn check(&self, w: usize) -> Res {
        for (i, (d, h)) in self.data.iter().zip(&self.hits).enumerate() {
            let d = d.lock().map_err(|e| e.to_string())?;
            let h = h.lock().map_err(|e| e.to_string())?;
            if let Some(p) = h.iter().position(|&x| x != 1) {
                return Err(format!("file {i} byte {p} written {} times", h[p]));
            }
            if let Some(p) = (0..d.len()).find(|&p| d[p] != byte(w, i as u32, p as u64)) {
                return Err(format!("file {i} byte {p} is wrong"));
            }
        }
        Ok(())
    }
}

const FILES: u32 = 3;

/// One run of the exchange plan.
#[derive(Clone, Copy)]
struct Chunk {
    writer: usize,
    file: u32,
    offset: u64,
    len: u64,
    sender: usize,
    thread: usize,
}

/// The same on every rank: for each writer and file, consecutive runs of random length,
/// each assigned to a random (sending rank, thread).
fn plan(size: usize, threads: usize, runs: usize, max_run: u64) -> (Vec<Chunk>, Vec<Vec<u64>>) {
    let mut chunks = Vec::new();
    let mut sizes = vec![vec![0u64; FILES as usize]; size];
    for (w, sizes) in sizes.iter_mut().enumerate() {
        for f in 0..FILES {
            let mut rng = Rng(0xA5A5 ^ (w as u64) << 8 ^ u64::from(f));
            let mut offset = 0;
            for _ in 0..size * threads * runs {
                // Mostly small runs, some several frames long.
                let len = if rng.below(8) == 0 {
                    1 + rng.below(max_run)
                } else {
                    1 + rng.below(max_run / 16 + 1)
                };
                chunks.push(Chunk {
                    writer: w,
                    file: f,
                    offset,
                    len,
                    sender: rng.below(size as u64) as usize,
                    thread: rng.below(threads as u64) as usize,
                });
                offset += len;
            }
            sizes[f as usize] = offset;
        }
    }
    (chunks, sizes)
}

fn options(flags: &Flags, session: u64) -> Res<MpiOptions> {
    Ok(MpiOptions {
        session,
        frame_bytes: flags.num("frame", 4096)?,
        io_timeout: Duration::from_secs(flags.num("io-timeout", 30)? as u64),
        max_in_flight: flags.num("in-flight", 4)?,
    })
}

fn exchange(ctx: &MpiContext, flags: &Flags) -> Res {
    let (me, size) = (ctx.rank(), ctx.size());
    let threads = flags.num("threads", 3)?;
    let runs = flags.num("runs", 12)?;
    let max_run = flags.num("max-run", 20_000)? as u64;
    let net = ctx.transport(options(flags, 0xE1)?).map_err(err)?;
    let (chunks, sizes) = plan(size, threads, runs, max_run);
    let files = Files::new(&sizes[me]);
    let expected: u64 = sizes[me].iter().sum();
    let cancel = Arc::new(AtomicBool::new(false));
    let rx = net
        .start_receiver(Files::sink(&files), Arc::clone(&cancel))
        .map_err(err)?;
    let streams_to_me: usize = {
        let mut pairs: Vec<(usize, usize)> = chunks
            .iter()
            .filter(|c| c.writer == me)
            .map(|c| (c.sender, c.thread))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        pairs.len()
    };
    // Every rank is writer and reader at once: the receiver runs while the workers send.
    let sent: u64 = thread::scope(|s| -> Res<u64> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let net = net.clone();
                let mut mine: Vec<Chunk> = chunks
                    .iter()
                    .filter(|c| c.sender == me && c.thread == t)
                    .copied()
                    .collect();
                s.spawn(move || send_chunks(&net, me, t, &mut mine))
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h.join().map_err(|_| "a worker panicked".to_owned())??;
        }
        Ok(total)
    })?;
    let stats = rx.wait(expected).map_err(err)?;
    files.check(me)?;
    if stats.connections != streams_to_me {
        return Err(format!(
            "{} streams ended, {streams_to_me} expected",
            stats.connections
        ));
    }
    rx.shutdown();
    net.wait_idle(Duration::from_secs(30)).map_err(err)?;
    ctx.barrier().map_err(err)?;
    println!(
        "rank {me}: ok exchange: received {} bytes in {} streams (by rank {:?}), sent {sent}",
        stats.bytes, stats.connections, stats.bytes_by_rank
    );
    Ok(())
}

/// One worker: a sender per destination, runs in a shuffled order, empty runs thrown in.
fn send_chunks(net: &MpiTransport, me: usize, t: usize, mine: &mut [Chunk]) -> Res<u64> {
    let mut rng = Rng(0x5EED ^ (me as u64) << 16 ^ t as u64);
    for i in (1..mine.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        mine.swap(i, j);
    }
    let mut senders = BTreeMap::new();
    let mut want: BTreeMap<usize, u64> = BTreeMap::new();
    for c in mine.iter() {
        let s = match senders.entry(c.writer) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(net.sender(c.writer).map_err(err)?)
            }
        };
        let data: Vec<u8> = (c.offset..c.offset + c.len)
            .map(|p| byte(c.writer, c.file, p))
            .collect();
        s.push(c.file, c.offset, &data).map_err(err)?;
        if rng.below(10) == 0 {
            s.push(c.file, 0, &[]).map_err(err)?;
        }
        *want.entry(c.writer).or_default() += c.len;
    }
    let mut total = 0;
    for (w, s) in senders {
        let n = s.finish().map_err(err)?;
        if n != want[&w] {
            return Err(format!(
                "sender to {w} reports {n} bytes, {} pushed",
                want[&w]
            ));
        }
        total += n;
    }
    Ok(total)
}

fn collectives(mut ctx: MpiContext, _flags: &Flags) -> Res {
    let (me, size) = (ctx.rank(), ctx.size());
    if let (Ok(r), Ok(n)) = (
        std::env::var("OMPI_COMM_WORLD_RANK"),
        std::env::var("OMPI_COMM_WORLD_SIZE"),
    ) {
        if r != me.to_string() || n != size.to_string() {
            return Err(format!(
                "MPI says {me}/{size}, Open MPI's environment {r}/{n}"
            ));
        }
    }
    if ctx.processor_name().is_empty() {
        return Err("empty processor name".into());
    }
    if !matches!(MpiContext::init(), Err(MpiError::AlreadyInitialized)) {
        return Err("MPI was initialized twice".into());
    }
    // The bootstrap: rank 0 hosts the store and tells everyone where.
    let addr = b"10.1.2.3:29500";
    let got = ctx
        .broadcast(0, (me == 0).then_some(addr.as_slice()))
        .map_err(err)?;
    if got != addr {
        return Err(format!("broadcast gave {got:?}"));
    }
    let last = size - 1;
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
    let got = ctx
        .broadcast(last, (me == last).then_some(big.as_slice()))
        .map_err(err)?;
    if got != big {
        return Err("large broadcast differs".into());
    }
    let got = ctx
        .broadcast(0, (me == 0).then_some(&[][..]))
        .map_err(err)?;
    if !got.is_empty() {
        return Err("empty broadcast is not empty".into());
    }
    // A root without a value fails on every rank, and the ranks stay in step.
    match ctx.broadcast(0, None) {
        Err(MpiError::InvalidArgument { .. }) if me == 0 => {}
        Err(MpiError::Broadcast { root: 0, .. }) if me != 0 => {}
        other => return Err(format!("broadcast without a value: {other:?}")),
    }
    if !matches!(
        ctx.broadcast(size, None),
        Err(MpiError::InvalidArgument { .. })
    ) {
        return Err("a root outside the world was accepted".into());
    }
    ctx.barrier().map_err(err)?;
    // Rank 0 gives up on a barrier the others join late; its context then refuses
    // collectives, and the abandoned barrier completes when the others arrive.
    if me == 0 {
        ctx.set_collective_timeout(Duration::from_millis(300));
        let t = Instant::now();
        match ctx.barrier() {
            Err(MpiError::CollectiveTimeout { .. }) => {}
            other => return Err(format!("late barrier: {other:?}")),
        }
        let took = t.elapsed();
        if took > Duration::from_secs(2) {
            return Err(format!("the barrier timed out after {took:?}"));
        }
        match ctx.barrier() {
            Err(MpiError::Broken { .. }) => {}
            other => return Err(format!("barrier after a timeout: {other:?}")),
        }
    } else {
        thread::sleep(Duration::from_millis(1500));
        ctx.barrier().map_err(err)?;
    }
    println!(
        "rank {me}: ok collectives on {} ({:?})",
        ctx.processor_name(),
        ctx.thread_level()
    );
    drop(ctx);
    Ok(())
}

fn cancel(ctx: &MpiContext) -> Res {
    let me = ctx.rank();
    let opts = |session, io_secs: u64, frame| MpiOptions {
        session,
        frame_bytes: frame,
        io_timeout: Duration::from_secs(io_secs),
        max_in_flight: 1,
    };
    let null: SharedSink = sink_fn(|_, _, _, _| Ok(()));

    // A: a cancelled wait returns Cancelled promptly.
    if me == 0 {
        let net = ctx.transport(opts(1, 60, 4096)).map_err(err)?;
        let flag = Arc::new(AtomicBool::new(false));
        let rx = net
            .start_receiver(Arc::clone(&null), Arc::clone(&flag))
            .map_err(err)?;
        if !matches!(
            net.start_receiver(Arc::clone(&null), Arc::clone(&flag)),
            Err(MpiError::AlreadyReceiving)
        ) {
            return Err("a second receiver was allowed".into());
        }
        let f = Arc::clone(&flag);
        let setter = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            f.store(true, Ordering::SeqCst);
        });
        let t = Instant::now();
        let r = rx.wait(1 << 20);
        let took = t.elapsed();
        let _ = setter.join();
        if !matches!(r, Err(MpiError::Cancelled)) {
            return Err(format!("cancelled wait returned {r:?}"));
        }
        if took > Duration::from_millis(1300) {
            return Err(format!("cancel took {took:?}"));
        }
        rx.shutdown();
        println!("rank 0: cancelled wait returned after {took:?}");
    }
    ctx.barrier().map_err(err)?;

    // B: nothing arriving is a stall after io_timeout.
    if me == 0 {
        let net = ctx.transport(opts(2, 1, 4096)).map_err(err)?;
        let rx = net
            .start_receiver(Arc::clone(&null), Arc::new(AtomicBool::new(false)))
            .map_err(err)?;
        let t = Instant::now();
        let r = rx.wait(100);
        let took = t.elapsed();
        if !matches!(
            r,
            Err(MpiError::Stalled {
                received: 0,
                expected: 100,
                ..
            })
        ) {
            return Err(format!("stalled wait returned {r:?}"));
        }
        if took < Duration::from_millis(950) || took > Duration::from_millis(2500) {
            return Err(format!("stall reported after {took:?}, io_timeout 1 s"));
        }
        println!("rank 0: stall reported after {took:?}");
    }
    ctx.barrier().map_err(err)?;

    // C: a sender blocked on its one send slot (rank 0 is not receiving, and a 1 MiB message
    // needs a matching receive) returns Cancelled, another one Timeout after io_timeout;
    // their frames are later drained by a receiver of another session, as strays.
    if me == 1 {
        let slow = ctx.transport(opts(9, 1, 1 << 20)).map_err(err)?;
        let mut tx = slow.sender(0).map_err(err)?;
        let data = vec![7u8; 1 << 20];
        let t = Instant::now();
        let mut r = Ok(());
        for i in 0..8u64 {
            r = tx.push(0, i << 20, &data);
            if r.is_err() {
                break;
            }
        }
        let took = t.elapsed();
        if !matches!(r, Err(MpiError::Timeout { dest: Some(0), .. })) {
            return Err(format!("stuck sender returned {r:?}"));
        }
        if took < Duration::from_millis(950) || took > Duration::from_millis(2500) {
            return Err(format!("sender timed out after {took:?}, io_timeout 1 s"));
        }
        println!(
            "rank 1: stuck sender timed out after {took:?}: {}",
            r.unwrap_err()
        );
        drop(tx);
        let net = ctx.transport(opts(7, 60, 1 << 20)).map_err(err)?;
        let flag = Arc::new(AtomicBool::new(false));
        let mut tx = net
            .sender_with_cancel(0, Some(Arc::clone(&flag)))
            .map_err(err)?;
        let f = Arc::clone(&flag);
        let setter = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            f.store(true, Ordering::SeqCst);
        });
        let data = vec![7u8; 1 << 20];
        let t = Instant::now();
        let mut r = Ok(());
        for i in 0..8u64 {
            r = tx.push(0, i << 20, &data);
            if r.is_err() {
                break;
            }
        }
        let took = t.elapsed();
        let _ = setter.join();
        if !matches!(r, Err(MpiError::Cancelled)) {
            return Err(format!("blocked sender returned {r:?}"));
        }
        if took > Duration::from_millis(1300) {
            return Err(format!("sender cancel took {took:?}"));
        }
        println!("rank 1: blocked sender cancelled after {took:?}");
        drop(tx);
        if !matches!(
            slow.wait_idle(Duration::from_millis(200)),
            Err(MpiError::Timeout { dest: None, .. })
        ) {
            return Err("frames nobody receives completed".into());
        }
        ctx.barrier().map_err(err)?;
        net.wait_idle(Duration::from_secs(20)).map_err(err)?;
        slow.wait_idle(Duration::from_secs(20)).map_err(err)?;
        ctx.barrier().map_err(err)?;
    } else if me == 0 {
        ctx.barrier().map_err(err)?;
        let net = ctx.transport(opts(8, 60, 1 << 20)).map_err(err)?;
        let rx = net
            .start_receiver(Arc::clone(&null), Arc::new(AtomicBool::new(false)))
            .map_err(err)?;
        ctx.barrier().map_err(err)?;
        let stats = rx.stats();
        if stats.rejected != 2 || stats.bytes != 0 {
            return Err(format!("strays not dropped: {stats:?}"));
        }
        rx.shutdown();
        println!("rank 0: drained {} stray frame(s)", stats.rejected);
    } else {
        ctx.barrier().map_err(err)?;
        ctx.barrier().map_err(err)?;
    }
    ctx.barrier().map_err(err)?;

    // D: a sender dropped without finishing leaves its stream open: a stall naming its rank.
    if me == 0 {
        let net = ctx.transport(opts(10, 1, 4096)).map_err(err)?;
        let rx = net
            .start_receiver(Arc::clone(&null), Arc::new(AtomicBool::new(false)))
            .map_err(err)?;
        ctx.barrier().map_err(err)?;
        let r = rx.wait(10);
        match &r {
            Err(MpiError::Stalled {
                received: 10, open, ..
            }) if open == &[1] => {}
            _ => return Err(format!("a dropped sender gave {r:?}")),
        }
        println!("rank 0: dropped sender: {}", r.unwrap_err());
        rx.shutdown();
    } else {
        let net = ctx.transport(opts(10, 1, 4096)).map_err(err)?;
        ctx.barrier().map_err(err)?;
        if me == 1 {
            let mut tx = net.sender(0).map_err(err)?;
            tx.push(0, 0, b"0123456789").map_err(err)?;
            tx.flush().map_err(err)?;
            drop(tx);
            net.wait_idle(Duration::from_secs(20)).map_err(err)?;
        }
    }
    ctx.barrier().map_err(err)?;
    println!("rank {me}: ok cancel");
    Ok(())
}

fn sink_error(ctx: &MpiContext) -> Res {
    let me = ctx.rank();
    let net = ctx
        .transport(MpiOptions {
            session: 3,
            frame_bytes: 4096,
            io_timeout: Duration::from_secs(60),
            max_in_flight: 4,
        })
        .map_err(err)?;
    let total: u64 = 64 * 4096;
    if me == 0 {
        let calls = AtomicUsize::new(0);
        let sink: SharedSink = sink_fn(move |_, _, offset, _| {
            if calls.fetch_add(1, Ordering::SeqCst) == 5 {
                Err(format!("disk full at {offset}").into())
            } else {
                Ok(())
            }
        });
        let rx = net
            .start_receiver(sink, Arc::new(AtomicBool::new(false)))
            .map_err(err)?;
        let expected = total * (ctx.size() as u64 - 1);
        match rx.wait(expected) {
            Err(e) => {
                println!(
                    "rank 0: wait failed: {e}; aborting the job (thread level {:?})",
                    ctx.thread_level()
                );
                ctx.abort(3);
            }
            Ok(s) => return Err(format!("wait succeeded despite the sink error: {s:?}")),
        }
    }
    let mut tx = net.sender(0).map_err(err)?;
    let data = vec![1u8; total as usize];
    tx.push(0, me as u64 * total, &data).map_err(err)?;
    tx.finish().map_err(err)?;
    println!("rank {me}: sent everything, waiting at a barrier");
    ctx.barrier().map_err(err)?;
    println!("rank {me}: clean exit (should not happen)");
    Ok(())
}

fn kill(ctx: &MpiContext) -> Res {
    let me = ctx.rank();
    let net = ctx
        .transport(MpiOptions {
            session: 4,
            frame_bytes: 64 * 1024,
            io_timeout: Duration::from_secs(120),
            max_in_flight: 4,
        })
        .map_err(err)?;
    let got = Arc::new(AtomicUsize::new(0));
    let rx = if me == 0 {
        let g = Arc::clone(&got);
        let sink: SharedSink = sink_fn(move |_, _, _, b| {
            g.fetch_add(b.len(), Ordering::SeqCst);
            Ok(())
        });
        Some(
            net.start_receiver(sink, Arc::new(AtomicBool::new(false)))
                .map_err(err)?,
        )
    } else {
        None
    };
    ctx.barrier().map_err(err)?;
    if me == 1 {
        println!("rank 1: pid {} sending", std::process::id());
        let mut tx = net.sender(0).map_err(err)?;
        let data = vec![9u8; 64 * 1024];
        for i in 0..2400u64 {
            tx.push(0, i * 65536, &data).map_err(err)?;
            thread::sleep(Duration::from_millis(50));
        }
        tx.finish().map_err(err)?;
    }
    if let Some(rx) = rx {
        let r = rx.wait(2400 * 65536);
        println!(
            "rank 0: wait returned {r:?} after {} bytes",
            got.load(Ordering::SeqCst)
        );
    }
    ctx.barrier().map_err(err)?;
    println!("rank {me}: clean exit (should not happen)");
    Ok(())
}

fn throughput(ctx: &MpiContext, flags: &Flags) -> Res {
    const MIB: usize = 1 << 20;
    let me = ctx.rank();
    let mib = flags.num("mib", 512)?;
    let threads = flags.num("threads", 1)?.max(1);
    let net = ctx
        .transport(MpiOptions {
            session: 5,
            frame_bytes: flags.num("frame", MIB)?,
            io_timeout: Duration::from_secs(60),
            max_in_flight: flags.num("in-flight", 8)?,
        })
        .map_err(err)?;
    if me == 0 {
        // A pre-touched 64 MiB buffer the runs are copied into (offset modulo its size), as
        // a positioned write into the page cache would.
        let ring = 64 * MIB;
        let out = Arc::new(Mutex::new(vec![1u8; ring]));
        let o = Arc::clone(&out);
        let sink: SharedSink = sink_fn(move |_, _, offset, b| {
            let at = offset as usize % ring;
            let mut out = o.lock().map_err(|e| e.to_string())?;
            let n = b.len().min(ring - at);
            out[at..at + n].copy_from_slice(&b[..n]);
            out[..b.len() - n].copy_from_slice(&b[n..]);
            Ok(())
        });
        let rx = net
            .start_receiver(sink, Arc::new(AtomicBool::new(false)))
            .map_err(err)?;
        ctx.barrier().map_err(err)?;
        let t = Instant::now();
        let stats = rx.wait((mib * MIB) as u64).map_err(err)?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "rank 0: ok throughput: {mib} MiB in 1 MiB runs over {threads} stream(s) in {secs:.3} s = {:.2} GB/s",
            stats.bytes as f64 / secs / 1e9
        );
        rx.shutdown();
    } else {
        ctx.barrier().map_err(err)?;
        if me == 1 {
            let source: Vec<u8> = (0..MIB).map(|i| (i * 7) as u8).collect();
            thread::scope(|s| -> Res {
                let hs: Vec<_> = (0..threads)
                    .map(|t| {
                        let net = net.clone();
                        let source = &source;
                        s.spawn(move || -> Res {
                            let mut tx = net.sender(0).map_err(err)?;
                            for i in (t..mib).step_by(threads) {
                                tx.push(0, (i * MIB) as u64, source).map_err(err)?;
                            }
                            tx.finish().map_err(err)?;
                            Ok(())
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().map_err(|_| "a sender panicked".to_owned())??;
                }
                Ok(())
            })?;
        }
        println!("rank {me}: ok throughput");
    }
    ctx.barrier().map_err(err)?;
    Ok(())
}
