//! Real processes: a peer killed mid-transfer (this test binary re-run in a child role).

use super::*;

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
        "processes::child_process_role",
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
