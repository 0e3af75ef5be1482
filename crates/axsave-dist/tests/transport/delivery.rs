//! Delivery: every byte arrives exactly once, split and merged as the frames allow.

use super::*;

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
