//! The `malformed` scenario: a peer that breaks the protocol (a bad frame, an end with wrong
//! totals) and a stray of another session next to good data.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axsave_dist::data_plane::mpi::{DATA_TAG, END_TAG, MpiContext, MpiError, MpiOptions};
use axsave_dist::data_plane::{SharedSink, sink_fn};

use super::{Res, err};

/// A valid frame as the module documentation describes it, built by hand.
fn raw_frame(session: u64, stream: u64, file: u32, runs: &[(u64, u32)], payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(b"AXMF");
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&session.to_le_bytes());
    m.extend_from_slice(&stream.to_le_bytes());
    m.extend_from_slice(&file.to_le_bytes());
    m.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    m.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    m.extend_from_slice(payload);
    for &(o, l) in runs {
        m.extend_from_slice(&o.to_le_bytes());
        m.extend_from_slice(&l.to_le_bytes());
    }
    m
}

fn raw_end(session: u64, stream: u64, bytes: u64, frames: u64) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(b"AXME");
    m.extend_from_slice(&1u32.to_le_bytes());
    for v in [session, stream, bytes, frames] {
        m.extend_from_slice(&v.to_le_bytes());
    }
    m
}

pub(crate) fn malformed(ctx: &MpiContext) -> Res {
    let me = ctx.rank();
    let opts = |session| MpiOptions {
        session,
        frame_bytes: 4096,
        io_timeout: Duration::from_secs(20),
        max_in_flight: 4,
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let counting: SharedSink = {
        let c = Arc::clone(&calls);
        sink_fn(move |_, _, _, _| {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    };
    let no_cancel = || Arc::new(AtomicBool::new(false));
    for (phase, session) in [("bad-table", 11u64), ("bad-end", 12), ("stray", 13)] {
        let net = ctx.transport(opts(session)).map_err(err)?;
        let rx = if me == 0 {
            Some(
                net.start_receiver(Arc::clone(&counting), no_cancel())
                    .map_err(err)?,
            )
        } else {
            None
        };
        ctx.barrier().map_err(err)?;
        if me == 1 {
            match phase {
                "bad-table" => {
                    // Run lengths add up to 4, the payload has 5 bytes.
                    let mut m = raw_frame(session, 1, 0, &[(0, 5)], b"hello");
                    let at = m.len() - 4;
                    m[at..].copy_from_slice(&4u32.to_le_bytes());
                    net.send_raw(0, DATA_TAG, m).map_err(err)?;
                }
                "bad-end" => {
                    net.send_raw(0, DATA_TAG, raw_frame(session, 1, 0, &[(0, 5)], b"hello"))
                        .map_err(err)?;
                    net.send_raw(0, END_TAG, raw_end(session, 1, 6, 1))
                        .map_err(err)?;
                }
                _ => {
                    net.send_raw(
                        0,
                        DATA_TAG,
                        raw_frame(session + 100, 1, 0, &[(0, 5)], b"stray"),
                    )
                    .map_err(err)?;
                    let mut tx = net.sender(0).map_err(err)?;
                    tx.push(0, 0, b"good").map_err(err)?;
                    tx.finish().map_err(err)?;
                }
            }
        }
        if let Some(rx) = rx {
            let before = calls.load(Ordering::SeqCst);
            let t = Instant::now();
            let r = rx.wait(if phase == "stray" { 4 } else { 5 });
            let took = t.elapsed();
            let ok = match phase {
                "bad-table" => {
                    matches!(&r, Err(MpiError::Malformed { rank: 1, detail }) if detail.contains("add up to 4"))
                }
                "bad-end" => matches!(
                    &r,
                    Err(MpiError::CountMismatch {
                        rank: 1,
                        announced_bytes: 6,
                        received_bytes: 5,
                        ..
                    })
                ),
                _ => matches!(&r, Ok(s) if s.rejected == 1 && s.bytes == 4),
            };
            if !ok || took > Duration::from_secs(5) {
                return Err(format!("{phase}: wait returned {r:?} after {took:?}"));
            }
            if phase == "bad-table" && calls.load(Ordering::SeqCst) != before {
                return Err("a malformed frame reached the sink".into());
            }
            println!(
                "rank 0: {phase}: {}",
                r.map_or_else(|e| e.to_string(), |s| format!("{s:?}"))
            );
            rx.shutdown();
        }
        ctx.barrier().map_err(err)?;
    }
    println!("rank {me}: ok malformed");
    Ok(())
}
