//! Loopback throughput of the TCP transport against plain TCP.
//!
//! `cargo run --release -p axsave-dist --example tcp_throughput -- [MIB] [CONNECTIONS]`
//! (default 1024 MiB over 1 connection). Pushes MIB runs of 1 MiB, split over CONNECTIONS
//! senders to one receiver whose sink copies into a preallocated, pre-touched buffer (as a
//! positioned write into the page cache would); then the same bytes as plain `write_all` /
//! `read_exact` of 1 MiB blocks with no sink, the floor on this machine.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use axsave_dist::data_plane::{SharedSink, TcpOptions, TcpReceiver, TcpSender, sink_fn};

const MIB: usize = 1024 * 1024;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: usize = args.first().map_or(Ok(1024), |a| a.parse())?;
    let conns: usize = args.get(1).map_or(Ok(1), |a| a.parse())?;
    if mib == 0 || conns == 0 {
        return Err("MIB and CONNECTIONS must be positive".into());
    }
    let total = (mib * MIB) as u64;

    let opts = TcpOptions {
        session: 42,
        token: [0; 32],
        frame_bytes: MIB,
        io_timeout: Duration::from_secs(30),
    };
    // One output "file" per connection so the sinks do not contend for one lock.
    let per_conn = mib.div_ceil(conns);
    let outs: Arc<Vec<Mutex<Vec<u8>>>> = Arc::new(
        (0..conns)
            .map(|_| Mutex::new(vec![1u8; per_conn * MIB]))
            .collect(),
    );
    let sink: SharedSink = {
        let outs = Arc::clone(&outs);
        sink_fn(move |_, file, offset, bytes| {
            let o = offset as usize;
            let mut out = outs[file as usize].lock().map_err(|e| e.to_string())?;
            out[o..o + bytes.len()].copy_from_slice(bytes);
            Ok(())
        })
    };
    let mut r = TcpReceiver::listen((Ipv4Addr::LOCALHOST, 0).into(), opts.clone())?;
    r.start(sink, Arc::new(AtomicBool::new(false)))?;
    let addr = r.local_addr();
    let source: Arc<Vec<u8>> = Arc::new((0..MIB).map(|i| (i * 7) as u8).collect());

    let t = Instant::now();
    let senders: Vec<_> = (0..conns)
        .map(|c| {
            let opts = opts.clone();
            let source = Arc::clone(&source);
            let runs = (c..mib).step_by(conns).count();
            thread::spawn(move || -> Result<u64, String> {
                let mut s = TcpSender::connect(addr, c, &opts).map_err(|e| e.to_string())?;
                for i in 0..runs {
                    s.push(c as u32, (i * MIB) as u64, &source)
                        .map_err(|e| e.to_string())?;
                }
                s.finish().map_err(|e| e.to_string())
            })
        })
        .collect();
    let stats = r.wait(total)?;
    for s in senders {
        s.join().map_err(|_| "a sender thread panicked")??;
    }
    let secs = t.elapsed().as_secs_f64();
    r.shutdown();
    println!(
        "transport: {mib} MiB over {conns} connection(s) in {secs:.3} s = {:.2} GB/s",
        stats.bytes as f64 / secs / 1e9
    );

    // Plain TCP, same volume, no sink.
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = l.local_addr()?;
    let t = Instant::now();
    let reader = thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; MIB];
        for _ in 0..mib {
            s.read_exact(&mut buf)?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    for _ in 0..mib {
        s.write_all(&source)?;
    }
    reader.join().map_err(|_| "reader panicked")??;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "plain TCP: {mib} MiB in {secs:.3} s = {:.2} GB/s",
        total as f64 / secs / 1e9
    );
    Ok(())
}
