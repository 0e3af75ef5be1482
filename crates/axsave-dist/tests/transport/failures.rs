//! Failures: dead, hung, refusing or misbehaving peers are reported promptly and by rank.

use super::*;

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
