//! Interoperability with real PyTorch: our client against torch's TCPStore servers (libuv and
//! classic), torch's client against our server, and `torchrun` workers meeting in torchrun's
//! agent store.
//!
//! Needs a Python with torch: `AXSAVE_TEST_PYTHON=/path/to/python cargo test -p axsave-dist`.
//! Without it each test prints why it skips and passes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use axsave_dist::{ClientOptions, ServerOptions, StoreClient, StoreError, StoreServer};
use serde_json::Value;

fn python() -> Option<String> {
    match std::env::var("AXSAVE_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            println!(
                "skipping: set AXSAVE_TEST_PYTHON=/path/to/python (with torch) to run torch interop"
            );
            None
        }
    }
}

fn opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(30),
        io_timeout: Duration::from_secs(30),
        ..ClientOptions::default()
    }
}

fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

/// A Python child that is killed if the test fails halfway.
struct Py {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Py {
    fn spawn(python: &str, script: &str, args: &[&str]) -> Py {
        let mut child = Command::new(python)
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Py {
            child,
            stdin,
            stdout,
        }
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).expect("read python output");
        assert!(!l.is_empty(), "python exited early");
        l.trim_end().to_owned()
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to python");
        stdin.flush().expect("flush");
    }

    fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("wait python");
        assert!(status.success(), "python failed: {status}");
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

const TORCH_SERVER: &str = r#"
import sys, datetime
import torch.distributed as d
libuv = sys.argv[1] == "1"
s = d.TCPStore("127.0.0.1", 0, is_master=True, use_libuv=libuv, wait_for_workers=False,
               timeout=datetime.timedelta(seconds=30))
assert s.libuvBackend == libuv, "backend"
s.set("from_torch", "hello")
print("PORT", s.port, flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "check":
        print("GOT", s.get("from_rust").decode(), flush=True)
        print("NS", d.PrefixStore("axsave/run/0", s).get("nk").decode(), flush=True)
        print("CNT", s.get("cnt").decode(), flush=True)
        print("NUM", s.num_keys(), flush=True)
    elif cmd == "exit":
        break
"#;

/// Every client operation against a torch server.
fn torch_server_roundtrip(python: &str, libuv: bool) {
    let mut py = Py::spawn(python, TORCH_SERVER, &[if libuv { "1" } else { "0" }]);
    let port: u16 = py
        .line()
        .strip_prefix("PORT ")
        .expect("PORT line")
        .parse()
        .expect("port");
    // "localhost" resolves to ::1 and 127.0.0.1; torch's servers listen on both.
    let mut c = StoreClient::connect("localhost", port, opts()).expect("connect to torch");
    let d = secs(20);

    // A key torch wrote through its own store object.
    assert_eq!(c.get("from_torch", d).unwrap(), b"hello");

    c.set("k", b"v1").unwrap();
    assert_eq!(c.get("k", d).unwrap(), b"v1");
    assert_eq!(c.add("cnt", 5).unwrap(), 5);
    assert_eq!(c.add("cnt", -2).unwrap(), 3);
    assert_eq!(c.get("cnt", d).unwrap(), b"3");
    assert!(c.check(&["k", "cnt"]).unwrap());
    assert!(!c.check(&["k", "nope"]).unwrap());
    c.wait(&["k", "cnt"], d).unwrap();

    // Wait timeout: CANCEL_WAIT round trip, connection still usable.
    let t = Instant::now();
    let e = c
        .wait(&["never"], Instant::now() + Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(e, StoreError::WaitTimeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(c.get("k", d).unwrap(), b"v1");

    assert_eq!(c.compare_set("k", b"v1", b"v2").unwrap(), b"v2");
    assert_eq!(c.compare_set("k", b"zzz", b"v3").unwrap(), b"v2");
    assert_eq!(c.compare_set("fresh", b"", b"f").unwrap(), b"f");
    assert_eq!(c.compare_set("absent", b"e", b"d").unwrap(), b"e");
    assert!(!c.check(&["absent"]).unwrap());

    c.multi_set(&[("a", b"1"), ("b", b"22")]).unwrap();
    assert_eq!(
        c.multi_get(&["b", "a"], d).unwrap(),
        vec![b"22".to_vec(), b"1".to_vec()]
    );
    assert!(c.delete_key("a").unwrap());
    assert!(!c.delete_key("a").unwrap());
    c.append("log", b"ab").unwrap();
    c.append("log", b"cd").unwrap();
    assert_eq!(c.get("log", d).unwrap(), b"abcd");

    if libuv {
        c.queue_push("q", b"x").unwrap();
        c.queue_push("q", b"y").unwrap();
        assert_eq!(c.queue_len("q").unwrap(), 2);
        assert_eq!(c.queue_pop("q").unwrap().as_deref(), Some(&b"x"[..]));
        assert_eq!(c.queue_len("q").unwrap(), 1);
    }

    // Several clients waiting on one key, released by another client's SET.
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            thread::spawn(move || {
                let mut w = StoreClient::connect("127.0.0.1", port, opts()).unwrap();
                w.get("go", secs(20)).unwrap()
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    c.set("go", b"now").unwrap();
    for w in waiters {
        assert_eq!(w.join().unwrap(), b"now");
    }

    // Keys written by us, read by torch (plain and through PrefixStore).
    c.set("from_rust", b"world").unwrap();
    let mut ns = c.reconnect().unwrap().with_namespace("axsave/run/0");
    ns.set("nk", b"nv").unwrap();
    // SET has no reply; a round trip on the same connection proves it was applied.
    assert!(ns.check(&["nk"]).unwrap());
    let ours = c.num_keys().unwrap();
    py.send("check");
    assert_eq!(py.line(), "GOT world");
    assert_eq!(py.line(), "NS nv");
    assert_eq!(py.line(), "CNT 3");
    assert_eq!(py.line(), format!("NUM {ours}"));
    // from_torch k cnt fresh b log go from_rust axsave/run/0/nk
    assert_eq!(ours, 9);
    py.send("exit");
    py.finish();
}

#[test]
fn our_client_against_torch_libuv_server() {
    let Some(python) = python() else { return };
    torch_server_roundtrip(&python, true);
}

#[test]
fn our_client_against_torch_classic_server() {
    let Some(python) = python() else { return };
    torch_server_roundtrip(&python, false);
}

const TORCH_CLIENT: &str = r#"
import sys, json, datetime
import torch.distributed as d
port = int(sys.argv[1])
c = d.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=20))
out = {}
out["from_rust"] = c.get("from_rust").decode()
c.set("k", "v1"); out["get"] = c.get("k").decode()
out["add1"] = c.add("cnt", 5); out["add2"] = c.add("cnt", 2); out["get_cnt"] = c.get("cnt").decode()
out["check_yes"] = c.check(["k", "cnt"]); out["check_no"] = c.check(["k", "nope"])
c.wait(["k", "cnt"])
try:
    c.wait(["never"], datetime.timedelta(milliseconds=200)); out["wait_timeout"] = "no error"
except Exception as e:
    out["wait_timeout"] = type(e).__name__
out["after_timeout"] = c.get("k").decode()
out["cs_match"] = c.compare_set("k", "v1", "v2").decode()
out["cs_mismatch"] = c.compare_set("k", "zzz", "v3").decode()
out["cs_missing_empty"] = c.compare_set("fresh", "", "f").decode()
out["cs_missing_nonempty"] = c.compare_set("absent", "e", "d").decode()
c.multi_set(["a", "b"], ["1", "22"])
out["multi_get"] = [x.decode() for x in c.multi_get(["b", "a"])]
out["del_yes"] = c.delete_key("a"); out["del_no"] = c.delete_key("a")
c.append("log", "ab"); c.append("log", "cd"); out["append"] = c.get("log").decode()
out["num_keys"] = c.num_keys()
c.queue_push("q", "x"); c.queue_push("q", "y")
out["qlen"] = c.queue_len("q"); out["qpop"] = c.queue_pop("q").decode()
out["ns"] = d.PrefixStore("axsave/run/0", c).get("nk").decode()
c.set("from_torch", "hi")
print("WAITING", flush=True)
out["late"] = c.get("late").decode()
print(json.dumps(out), flush=True)
"#;

#[test]
fn torch_client_against_our_server() {
    let Some(python) = python() else { return };
    let server = StoreServer::start(ServerOptions::default()).unwrap();
    let port = server.port();
    let mut c = StoreClient::connect("127.0.0.1", port, opts()).unwrap();
    c.set("from_rust", b"rust").unwrap();
    c.reconnect()
        .unwrap()
        .with_namespace("axsave/run/0")
        .set("nk", b"nv")
        .unwrap();

    let mut py = Py::spawn(&python, TORCH_CLIENT, &[&port.to_string()]);
    assert_eq!(py.line(), "WAITING");
    // torch's client is now blocked in WAIT on "late".
    thread::sleep(Duration::from_millis(300));
    c.set("late", b"finally").unwrap();
    let out: Value = serde_json::from_str(&py.line()).expect("json from python");
    py.finish();

    let expect = serde_json::json!({
        "from_rust": "rust",
        "get": "v1",
        "add1": 5, "add2": 7, "get_cnt": "7",
        "check_yes": true, "check_no": false,
        "wait_timeout": "DistStoreError",
        "after_timeout": "v1",
        "cs_match": "v2", "cs_mismatch": "v2",
        "cs_missing_empty": "f", "cs_missing_nonempty": "e",
        "multi_get": ["22", "1"],
        "del_yes": true, "del_no": false,
        "append": "abcd",
        // from_rust axsave/run/0/nk k cnt fresh b log
        "num_keys": 7,
        "qlen": 2, "qpop": "x",
        "ns": "nv",
        "late": "finally",
    });
    assert_eq!(out, expect);

    // What torch wrote, read by us.
    let d = secs(5);
    assert_eq!(c.get("from_torch", d).unwrap(), b"hi");
    assert_eq!(c.get("k", d).unwrap(), b"v2");
    assert_eq!(c.get("cnt", d).unwrap(), b"7");
    assert!(!c.check(&["absent", "a"]).unwrap());
    assert_eq!(c.queue_pop("q").unwrap().as_deref(), Some(&b"y"[..]));
    drop(c);
    assert!(server.wait_for_disconnects(secs(10)));
    server.shutdown();
}

/// `torchrun --no-python axsave-dist-probe rendezvous`: every worker detects the torchrun
/// world, joins torchrun's agent store as a client, and passes barriers and a broadcast there.
fn torchrun_probe(python: &str, extra: &[&str]) {
    let out = Command::new(python)
        .args(["-m", "torch.distributed.run", "--nproc-per-node", "3"])
        .args(extra)
        .args([
            "--no-python",
            env!("CARGO_BIN_EXE_axsave-dist-probe"),
            "rendezvous",
            "--timeout",
            "60",
        ])
        .env_remove("SLURM_STEP_ID")
        .output()
        .expect("run torchrun");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "torchrun failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("rank ")).collect();
    lines.sort();
    assert_eq!(
        lines,
        (0..3)
            .map(|r| format!("rank {r}/3 ok: hello from rank 0 of 3 (torchrun)"))
            .collect::<Vec<_>>()
    );
}

#[test]
fn torchrun_workers_meet_in_the_agent_store() {
    let Some(python) = python() else { return };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // Static rendezvous: agent 0 hosts the store at --master-port.
    torchrun_probe(&python, &["--master-port", &port.to_string()]);
    // c10d rendezvous on a random port, shared agent store.
    torchrun_probe(&python, &["--standalone"]);
}
