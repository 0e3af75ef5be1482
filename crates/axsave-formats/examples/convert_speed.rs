//! Throughput of `axsave_formats::convert::convert` next to a plain memcpy of the same source.
//!
//! `cargo run --release -p axsave-formats --example convert_speed [MiB] [pairs...]`
//!
//! Converts a source buffer of MiB mebibytes (default 256) on one thread, best of several runs, with
//! the destination already faulted in so page faults are not timed. Pairs are written like
//! `F32:BF16`; the default is F32:BF16 and BF16:F32, `all` runs every pair. Each pair runs three
//! ways: the whole buffer at once; the same with source and destination misaligned by one byte, as
//! slices cut from file buffers can be; and in 1 MiB pieces into one reused destination, as a
//! convert-then-write pipeline would, which keeps the destination in cache. memcpy runs the first
//! and last way for comparison.

use std::hint::black_box;
use std::time::{Duration, Instant};

use axsave_formats::DType;
use axsave_formats::convert::convert;

const RUNS: usize = 7;

fn best_of(mut f: impl FnMut()) -> Duration {
    f(); // warm caches, branch predictors and the destination's pages
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// Plausible weights: normal-ish values of magnitude ~0.02 with a sprinkling of specials, in `dtype`.
fn source(dtype: DType, bytes: usize) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let n = bytes / dtype.size();
    let mut out = Vec::with_capacity(n * dtype.size());
    for i in 0..n {
        let r = next();
        // Sum of four uniforms: roughly normal, cheap.
        let u = (0..4)
            .map(|k| ((r >> (16 * k)) & 0xFFFF) as f64 / 65536.0)
            .sum::<f64>()
            - 2.0;
        let v = if i % 4099 == 0 { f64::NAN } else { u * 0.02 };
        match dtype {
            DType::F64 => out.extend_from_slice(&v.to_le_bytes()),
            DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
            other => panic!("no source for {other}"),
        }
    }
    out
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(256, |a| a.parse().expect("MiB"));
    let bytes = mib << 20;
    let names: Vec<String> = args.collect();
    let floats = [DType::F16, DType::BF16, DType::F32, DType::F64];
    let pairs: Vec<(DType, DType)> = if names.iter().any(|n| n == "all") {
        floats
            .iter()
            .flat_map(|&a| {
                floats
                    .iter()
                    .filter(move |&&b| b != a)
                    .map(move |&b| (a, b))
            })
            .collect()
    } else if names.is_empty() {
        vec![(DType::F32, DType::BF16), (DType::BF16, DType::F32)]
    } else {
        names
            .iter()
            .map(|n| {
                let (a, b) = n.split_once(':').expect("pairs look like F32:BF16");
                let d = |s| DType::from_safetensors_name(s).expect("dtype");
                (d(a), d(b))
            })
            .collect()
    };

    let src = vec![0x5Au8; bytes + 1];
    let mut dst = vec![0u8; bytes + 1];
    let t = best_of(|| dst[..bytes].copy_from_slice(black_box(&src[..bytes])));
    report("memcpy", mib, bytes, bytes, t, "");
    let t = best_of(|| {
        for piece in src[..bytes].chunks(PIECE) {
            dst[..piece.len()].copy_from_slice(black_box(piece));
        }
    });
    report("memcpy", mib, bytes, bytes, t, PIECES);
    drop((src, dst));

    for (from, to) in pairs {
        let mut src = source(from, bytes + from.size());
        let out_len = bytes / from.size() * to.size();
        let mut dst = vec![0u8; out_len + to.size()];
        let name = format!("{from}->{to}");
        let t =
            best_of(|| convert(from, to, black_box(&src[..bytes]), &mut dst[..out_len]).unwrap());
        report(&name, mib, bytes, out_len, t, "");
        // Shift the data by one byte so neither side is aligned to its element size.
        src.rotate_right(1);
        let t = best_of(|| {
            convert(from, to, black_box(&src[1..=bytes]), &mut dst[1..=out_len]).unwrap()
        });
        report(&name, mib, bytes, out_len, t, "  misaligned by 1 byte");
        let t = best_of(|| {
            for piece in src[..bytes].chunks(PIECE) {
                let n = piece.len() / from.size() * to.size();
                convert(from, to, black_box(piece), &mut dst[..n]).unwrap();
            }
        });
        report(&name, mib, bytes, out_len, t, PIECES);
        black_box(&dst);
    }
}

/// Source bytes per piece in the "pieces" runs: what a convert-then-write pipeline with a reused,
/// cache-sized buffer does, so the destination stays in cache.
const PIECE: usize = 1 << 20;
const PIECES: &str = "  in 1 MiB pieces, reused destination";

fn report(name: &str, mib: usize, src: usize, dst: usize, t: Duration, note: &str) {
    println!(
        "{name:<10} {mib} MiB: {:6.1} ms {:6.2} GB/s source {:6.2} GB/s read+write{note}",
        t.as_secs_f64() * 1e3,
        gbps(src, t),
        gbps(src + dst, t),
    );
}
