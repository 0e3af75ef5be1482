//! Conversions between f16, bf16, f32 and f64 that give the bytes torch's `Tensor.to()` gives.
//!
//! `--dtype` converts floating tensors while copying them, and users compare the result with what
//! `model.to(dtype)` would have saved, so every bit counts, NaNs included. The reference is torch's
//! CPU copy kernel for contiguous tensors on x86-64, as measured on torch 2.9.1 with its AVX2
//! kernels (`scripts/fixtures/convert.py` records those outputs; the tests compare against them).
//! The AVX512 kernels use the same conversion code (read from torch's source, not measured):
//!
//! | from → to   | finite values, ±0, ±Inf                     | NaN                                     |
//! |-------------|---------------------------------------------|-----------------------------------------|
//! | f32 → bf16  | round to nearest even, overflow to Inf      | always `0xFFFF`                         |
//! | f32 → f16   | round to nearest even (subnormals too), overflow to Inf | sign kept, quiet bit set, top 10 payload bits kept (F16C `vcvtps2ph`) |
//! | f32 → f64   | exact                                       | sign and payload kept, quiet bit set    |
//! | f64 → f32   | round to nearest even, overflow to Inf      | sign kept, quiet bit set, top 22 payload bits kept |
//! | f64 → bf16  | through f32 (rounded twice, as torch does)  | `0xFFFF`                                |
//! | f64 → f16   | through f32 (rounded twice, as torch does)  | through f32, as above                   |
//! | f16 → f32   | exact                                       | sign and payload kept, quiet bit set    |
//! | f16 → f64   | exact                                       | sign and payload kept, quiet bit set    |
//! | f16 → bf16  | exact to f32, then rounded to nearest even  | always `0x7FC0` (sign dropped)          |
//! | bf16 → f32  | exact (the bits shifted up)                 | unchanged, even signalling ones         |
//! | bf16 → f64  | exact                                       | sign and payload kept, quiet bit set    |
//! | bf16 → f16  | through f32, as f32 → f16                   | as f32 → f16                            |
//!
//! torch is not consistent about NaNs; where it is not, this module follows its x86 vector kernels,
//! which is what the bulk of every real tensor gets:
//!
//! - torch finishes the last `chunk_len % vector_width` elements of each thread's chunk with a
//!   scalar routine. For f16 → f32 that routine turns every NaN into `0x7FFF_FFFF`, for f64 → bf16
//!   into `0x7FC0`; which elements fall there depends on the tensor length and torch's thread count,
//!   so it cannot be reproduced and is not. The other ten pairs have no such difference.
//! - torch's scalar kernels (`ATEN_CPU_CAPABILITY=default`, and presumably CPUs without its x86
//!   vector kernels, such as ARM: not measured) canonicalize more: f32 → bf16 and f64 → bf16 give
//!   `0x7FC0`, f64 → f16 and bf16 → f16 give `0x7E00` with the sign. A 0-d tensor and some strided
//!   ones (`x[::2]`) take a scalar path as well. Finite values, zeros and infinities agree
//!   everywhere.
//!
//! The element functions ([`f32_to_bf16`], ...) work on bit patterns with integer operations (and
//! exact or correctly rounded float casts), so they mean the same on every target; they are public
//! because they are the specification a device implementation is checked against. [`convert`] runs
//! them over byte slices in blocks that the compiler vectorizes (compiled twice on x86-64: for the
//! build's baseline and, picked at run time, for AVX2); the last partial block uses the same
//! functions, so this module has no tail that behaves differently.

use crate::DType;

/// Why [`convert`] refused a conversion. It never converts part of the input and then fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The pair is not among the ones [`can_convert`] accepts.
    #[error("cannot convert {from} to {to}: only F16, BF16, F32 and F64 convert into one another")]
    Unsupported {
        /// Source dtype.
        from: DType,
        /// Requested dtype.
        to: DType,
    },
    /// The source bytes do not split into whole elements.
    #[error("{len} source bytes are not a whole number of {from} elements ({} bytes each)", from.size())]
    PartialElement {
        /// Source dtype.
        from: DType,
        /// Length of the source in bytes.
        len: usize,
    },
    /// The destination does not hold exactly as many elements as the source.
    #[error(
        "converting {elements} {from} elements to {to} needs {} output bytes, but the output has {dst_len}",
        *elements as u128 * to.size() as u128
    )]
    OutputLength {
        /// Source dtype.
        from: DType,
        /// Destination dtype.
        to: DType,
        /// Number of source elements.
        elements: usize,
        /// Length of the destination in bytes.
        dst_len: usize,
    },
}

/// Whether [`convert`] can turn `from` into `to`: always when they are equal (a plain copy), and
/// between any two of F16, BF16, F32 and F64.
pub fn can_convert(from: DType, to: DType) -> bool {
    from == to || (from.is_convertible_float() && to.is_convertible_float())
}

/// Bytes that `src_len` bytes of `from` take once converted to `to`, after the same checks as
/// [`convert`] makes on the source.
pub fn converted_len(from: DType, to: DType, src_len: usize) -> Result<usize, ConvertError> {
    if !can_convert(from, to) {
        return Err(ConvertError::Unsupported { from, to });
    }
    if src_len % from.size() != 0 {
        return Err(ConvertError::PartialElement { from, len: src_len });
    }
    let elements = src_len / from.size();
    // Widening can overflow only for a source longer than any address space allows; report it as a
    // destination that cannot be long enough instead of panicking.
    elements
        .checked_mul(to.size())
        .ok_or(ConvertError::OutputLength {
            from,
            to,
            elements,
            dst_len: usize::MAX,
        })
}

/// Converts the little-endian elements in `src` (dtype `from`) into `dst` (dtype `to`), exactly as
/// torch's `Tensor.to()` does (see the module documentation for the rules).
///
/// `src` and `dst` may start at any address; `dst` must hold exactly as many elements as `src`.
/// Equal dtypes copy the bytes unchanged, whatever the dtype.
pub fn convert(from: DType, to: DType, src: &[u8], dst: &mut [u8]) -> Result<(), ConvertError> {
    convert_with(Isa::best(), from, to, src, dst)
}

/// [`convert`] with the loops compiled for `isa`; the tests run every available one.
fn convert_with(
    isa: Isa,
    from: DType,
    to: DType,
    src: &[u8],
    dst: &mut [u8],
) -> Result<(), ConvertError> {
    if !can_convert(from, to) {
        return Err(ConvertError::Unsupported { from, to });
    }
    if src.len() % from.size() != 0 {
        return Err(ConvertError::PartialElement {
            from,
            len: src.len(),
        });
    }
    let elements = src.len() / from.size();
    if dst.len() % to.size() != 0 || dst.len() / to.size() != elements {
        return Err(ConvertError::OutputLength {
            from,
            to,
            elements,
            dst_len: dst.len(),
        });
    }
    use DType::{BF16, F16, F32, F64};
    match (from, to) {
        _ if from == to => dst.copy_from_slice(src),
        (F32, BF16) => map(isa, src, dst, f32_to_bf16),
        (F32, F16) => map(isa, src, dst, f32_to_f16),
        (F32, F64) => map(isa, src, dst, f32_to_f64),
        (F64, F32) => map(isa, src, dst, f64_to_f32),
        (F64, BF16) => map(isa, src, dst, f64_to_bf16),
        (F64, F16) => map(isa, src, dst, f64_to_f16),
        (F16, F32) => map(isa, src, dst, f16_to_f32),
        (F16, F64) => map(isa, src, dst, f16_to_f64),
        (F16, BF16) => map(isa, src, dst, f16_to_bf16),
        (BF16, F32) => map(isa, src, dst, bf16_to_f32),
        (BF16, F64) => map(isa, src, dst, bf16_to_f64),
        (BF16, F16) => map(isa, src, dst, bf16_to_f16),
        // can_convert admitted only equal dtypes and pairs of the four floats, all handled above.
        _ => return Err(ConvertError::Unsupported { from, to }),
    }
    Ok(())
}

/// Elements per block in [`map_blocks`]: enough for the compiler to unroll and vectorize a fixed trip count,
/// small enough that a block of the widest type (f64, 512 bytes) stays in L1.
const BLOCK: usize = 64;

/// An element's bit pattern, read from and written to little-endian bytes at any alignment.
trait Bits: Copy {
    /// Bytes per element.
    const SIZE: usize;
    /// Reads an element from exactly `SIZE` bytes.
    fn load(bytes: &[u8]) -> Self;
    /// Writes the element into exactly `SIZE` bytes.
    fn store(self, bytes: &mut [u8]);
}

macro_rules! impl_bits {
    ($($t:ty),*) => {$(
        impl Bits for $t {
            const SIZE: usize = size_of::<$t>();
            #[inline(always)]
            fn load(bytes: &[u8]) -> Self {
                let mut le = [0u8; size_of::<$t>()];
                le.copy_from_slice(bytes);
                <$t>::from_le_bytes(le)
            }
            #[inline(always)]
            fn store(self, bytes: &mut [u8]) {
                bytes.copy_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
impl_bits!(u16, u32, u64);

/// The instruction sets [`map`] is compiled for. All give identical results: the element functions
/// use integer operations and IEEE float operations that are exact or correctly rounded, whatever the
/// vector width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// Whatever the build targets (SSE2 only, for a default x86-64 build).
    Portable,
    /// AVX2: twice the lanes, plus the blends and unsigned compares SSE2 lacks; 2-2.5x faster on
    /// the f16 pairs while the data is in cache. Only made by [`Isa::best`] and the tests, after checking
    /// the CPU.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    /// The fastest the running CPU supports.
    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Isa::Avx2;
        }
        Isa::Portable
    }
}

/// Applies `f` to every element of `src`, writing the results to `dst`, with the loop compiled for
/// `isa`. Not inlined: each pair gets its own symbol, which keeps `convert` small and names the loop
/// in profiles.
#[inline(never)]
fn map<A: Bits, B: Bits>(isa: Isa, src: &[u8], dst: &mut [u8], f: impl Fn(A) -> B) {
    match isa {
        Isa::Portable => map_blocks(src, dst, &f),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa::Avx2` exists only once `is_x86_feature_detected!("avx2")` has confirmed
        // the CPU runs AVX2 instructions, the one requirement of `map_blocks_avx2`.
        Isa::Avx2 => unsafe { map_blocks_avx2(src, dst, &f) },
    }
}

/// [`map_blocks`] compiled with AVX2 enabled (it and the element functions are inlined here).
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn map_blocks_avx2<A: Bits, B: Bits>(src: &[u8], dst: &mut [u8], f: &impl Fn(A) -> B) {
    map_blocks(src, dst, f)
}

/// The conversion loop: fixed-size blocks, then the remainder with the same element function.
///
/// The callers have checked that both slices hold the same number of elements. Byte slices (not
/// typed ones) make unaligned buffers work without `unsafe`; the fixed-size blocks let LLVM see
/// constant trip counts and turn the byte shuffling into plain vector loads and stores.
#[inline(always)]
fn map_blocks<A: Bits, B: Bits>(src: &[u8], dst: &mut [u8], f: &impl Fn(A) -> B) {
    let mut src_blocks = src.chunks_exact(A::SIZE * BLOCK);
    let mut dst_blocks = dst.chunks_exact_mut(B::SIZE * BLOCK);
    for (s, d) in (&mut src_blocks).zip(&mut dst_blocks) {
        map_elements(s, d, f);
    }
    map_elements(src_blocks.remainder(), dst_blocks.into_remainder(), f);
}

#[inline(always)]
fn map_elements<A: Bits, B: Bits>(src: &[u8], dst: &mut [u8], f: &impl Fn(A) -> B) {
    for (s, d) in src.chunks_exact(A::SIZE).zip(dst.chunks_exact_mut(B::SIZE)) {
        f(A::load(s)).store(d);
    }
}

const F32_SIGN: u32 = 0x8000_0000;
const F32_ABS: u32 = 0x7FFF_FFFF;
const F32_INF: u32 = 0x7F80_0000;
const F32_MANTISSA: u32 = 0x007F_FFFF;
const F32_QUIET: u32 = 0x0040_0000;
const F64_ABS: u64 = 0x7FFF_FFFF_FFFF_FFFF;
const F64_INF: u64 = 0x7FF0_0000_0000_0000;
const F64_MANTISSA: u64 = 0x000F_FFFF_FFFF_FFFF;

/// Rounds f32 bits to bf16 bits, to nearest even, answering `nan` for every NaN.
#[inline(always)]
fn f32_to_bf16_with_nan(x: u32, nan: u16) -> u16 {
    // Adding 0x7FFF plus the lowest kept bit rounds to nearest even in one go: the carry moves into
    // the exponent when the mantissa overflows, which also turns values past bf16's largest into Inf.
    // Only NaN bit patterns could wrap around, and they are replaced.
    let rounded = (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16;
    if x & F32_ABS > F32_INF { nan } else { rounded }
}

/// f32 → bf16 as torch's x86 vector kernel does it: round to nearest even, every NaN becomes
/// `0xFFFF` (torch's AVX2/AVX512 `cvtfp32_bf16` blends in that constant).
#[inline(always)]
pub fn f32_to_bf16(x: u32) -> u16 {
    f32_to_bf16_with_nan(x, 0xFFFF)
}

/// f32 → f16 with the semantics of x86's `vcvtps2ph` (round to nearest even): subnormal results are
/// rounded, not flushed; magnitudes from 65520 up become Inf; a NaN keeps its sign and the top 10
/// payload bits and gets the quiet bit.
#[inline(always)]
pub fn f32_to_f16(x: u32) -> u16 {
    let sign = ((x >> 16) & 0x8000) as u16;
    let a = x & F32_ABS;

    let nan = 0x7E00 | ((a & F32_MANTISSA) >> 13) as u16;

    // Normal f16 results: rebias the exponent (127 → 15) and round off 13 bits to nearest even; a
    // carry out of the mantissa bumps the exponent, up to 0x7C00 (Inf) for 65520 and above. Far
    // larger inputs would overflow the field, hence the clamp.
    let normal = (a
        .wrapping_sub((127 - 15) << 23)
        .wrapping_add(0x0FFF + ((a >> 13) & 1))
        >> 13)
        .min(0x7C00) as u16;

    // Subnormal f16 results (|x| < 2**-14): adding 0.5 leaves a float in [0.5, 1), whose ulp is
    // 2**-24, f16's subnormal step, so the FPU's own round-to-nearest-even does the rounding and the
    // mantissa of the sum is the f16 bit pattern (up to 0x0400, the smallest normal, when rounding
    // carries). Cheaper than variable shifts, which baseline x86-64 lacks. f32 subnormal inputs round
    // to 0 whether or not the CPU treats them as zero (DAZ), so no FPU mode changes the answer.
    let subnormal = (f32::from_bits(a) + 0.5)
        .to_bits()
        .wrapping_sub(0x3F00_0000) as u16;

    sign | if a > F32_INF {
        nan
    } else if a < 0x3880_0000 {
        subnormal
    } else {
        normal
    }
}

/// f32 → f64, exact; a NaN keeps sign and payload and gets the quiet bit (x86 `cvtss2sd`).
#[inline(always)]
pub fn f32_to_f64(x: u32) -> u64 {
    let x64 = x as u64;
    let nan = ((x64 & F32_SIGN as u64) << 32)
        | 0x7FF8_0000_0000_0000
        | ((x64 & F32_MANTISSA as u64) << 29);
    // Widening a non-NaN float is exact, subnormals included; Rust leaves NaN payloads of casts
    // unspecified, so NaNs take the explicit pattern.
    let widened = (f32::from_bits(x) as f64).to_bits();
    if x & F32_ABS > F32_INF { nan } else { widened }
}

/// f64 → f32: round to nearest even, overflow to Inf, subnormals rounded; a NaN keeps its sign and
/// the top 22 payload bits and gets the quiet bit (x86 `cvtsd2ss`).
#[inline(always)]
pub fn f64_to_f32(x: u64) -> u32 {
    let nan = ((x >> 32) as u32 & F32_SIGN) | 0x7FC0_0000 | ((x & F64_MANTISSA) >> 29) as u32;
    // `as` rounds a non-NaN f64 to nearest even (IEEE), which is what the hardware does for torch.
    let narrowed = (f64::from_bits(x) as f32).to_bits();
    if x & F64_ABS > F64_INF { nan } else { narrowed }
}

/// f64 → bf16 as torch does it: to f32 first, then as [`f32_to_bf16`]. Rounding twice differs from
/// rounding once when the f32 step lands exactly on a bf16 tie; torch rounds twice, so this does too.
#[inline(always)]
pub fn f64_to_bf16(x: u64) -> u16 {
    f32_to_bf16(f64_to_f32(x))
}

/// f64 → f16 as torch does it: to f32 first ([`f64_to_f32`]), then [`f32_to_f16`] (rounded twice).
#[inline(always)]
pub fn f64_to_f16(x: u64) -> u16 {
    f32_to_f16(f64_to_f32(x))
}

/// f16 → f32, exact; a NaN keeps sign and payload and gets the quiet bit (x86 `vcvtph2ps`).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> u32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let a = h & 0x7FFF;
    let mantissa = a & 0x03FF;
    // Normal: rebias the exponent (15 → 127) and move the mantissa up.
    let normal = (a << 13) + ((127 - 15) << 23);
    let inf_nan = F32_INF | (mantissa << 13) | if mantissa != 0 { F32_QUIET } else { 0 };
    // Zero and subnormal: mantissa × 2**-24, exact in f32 (at most 10 significant bits, and the
    // result is an f32 normal or zero, so no flush-to-zero mode could touch it).
    let subnormal = (mantissa as f32 * f32::from_bits(0x3380_0000)).to_bits();
    sign | match a >> 10 {
        0x1F => inf_nan,
        0 => subnormal,
        _ => normal,
    }
}

/// f16 → f64, exact; a NaN keeps sign and payload and gets the quiet bit.
#[inline(always)]
pub fn f16_to_f64(h: u16) -> u64 {
    f32_to_f64(f16_to_f32(h))
}

/// f16 → bf16 as torch does it: exactly to f32, then round to nearest even; every NaN becomes
/// `0x7FC0` (torch converts this pair element by element through `c10::BFloat16`, whatever the CPU).
#[inline(always)]
pub fn f16_to_bf16(h: u16) -> u16 {
    f32_to_bf16_with_nan(f16_to_f32(h), 0x7FC0)
}

/// bf16 → f32: the bits moved up, exact, NaNs (even signalling ones) unchanged.
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> u32 {
    (h as u32) << 16
}

/// bf16 → f64, exact; a NaN keeps sign and payload and gets the quiet bit.
#[inline(always)]
pub fn bf16_to_f64(h: u16) -> u64 {
    f32_to_f64(bf16_to_f32(h))
}

/// bf16 → f16 as torch's x86 kernel does it: exactly to f32, then [`f32_to_f16`].
#[inline(always)]
pub fn bf16_to_f16(h: u16) -> u16 {
    f32_to_f16(bf16_to_f32(h))
}

#[cfg(test)]
mod tests {
    //! Expected values come from torch itself: `scripts/fixtures/convert.py` stores torch's outputs
    //! for explicit inputs, and CRC-32s of its outputs for large inputs both sides generate from the
    //! same formulas ("sweeps"). Nothing here types an expected bit pattern by hand.

    use super::*;
    use crate::torch_fixtures::{Sweeps, pairs, sweeps};

    /// Every instruction set this CPU can run: the tests check each compiled loop, not just the one
    /// `convert` would pick.
    fn isas() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            isas.push(Isa::Avx2);
        }
        isas
    }

    /// Element `i` of a little-endian buffer of `size`-byte elements, as hex.
    fn hex_at(bytes: &[u8], size: usize, i: usize) -> String {
        let mut v = 0u64;
        for (k, b) in bytes[i * size..(i + 1) * size].iter().enumerate() {
            v |= (*b as u64) << (8 * k);
        }
        format!("0x{v:0width$x}", width = 2 * size)
    }

    /// Describes every element where `got` differs from `want` (first few in full), or `None`.
    fn mismatches(
        from: DType,
        to: DType,
        input: &[u8],
        want: &[u8],
        got: &[u8],
        index_base: usize,
    ) -> Option<String> {
        let (fs, ts) = (from.size(), to.size());
        let bad: Vec<usize> = (0..want.len() / ts)
            .filter(|&i| want[i * ts..(i + 1) * ts] != got[i * ts..(i + 1) * ts])
            .collect();
        if bad.is_empty() {
            return None;
        }
        let shown: Vec<String> = bad
            .iter()
            .take(5)
            .map(|&i| {
                format!(
                    "element {}: input {} -> torch {}, axsave {}",
                    index_base + i,
                    hex_at(input, fs, i),
                    hex_at(want, ts, i),
                    hex_at(got, ts, i)
                )
            })
            .collect();
        Some(format!(
            "{from} -> {to}: {} of {} elements differ from torch; first: {}",
            bad.len(),
            want.len() / ts,
            shown.join("; ")
        ))
    }

    #[test]
    fn explicit_fixtures_match_torch_bit_for_bit() {
        let mut failures = Vec::new();
        let mut checked = 0;
        for p in pairs() {
            for isa in isas() {
                let mut got = vec![0u8; p.want.len()];
                convert_with(isa, p.from, p.to, &p.input, &mut got).expect("convert");
                checked += p.want.len() / p.to.size();
                failures.extend(
                    mismatches(p.from, p.to, &p.input, &p.want, &got, 0)
                        .map(|m| format!("{isa:?}: {m}")),
                );
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        assert!(checked > 20_000, "only {checked} elements checked");
    }

    /// Every length from 0 to a few blocks, at every start element parity and misaligned byte
    /// offsets of source and destination: the block loop, the remainder and unaligned access must
    /// all give torch's answer (torch itself has no tail differences in these fixtures).
    #[test]
    fn every_length_and_misalignment_matches_torch() {
        let mut failures = Vec::new();
        for p in pairs() {
            let (fs, ts) = (p.from.size(), p.to.size());
            let count = p.input.len() / fs;
            for isa in isas() {
                for len in 0..=3 * BLOCK + 7 {
                    let start = (len * 37) % (count - len);
                    for (src_off, dst_off) in [(0, 0), (1, 0), (0, 1), (3, 5), (7, 3)] {
                        let mut src = vec![0u8; src_off + len * fs];
                        src[src_off..].copy_from_slice(&p.input[start * fs..(start + len) * fs]);
                        let mut dst = vec![0xA5u8; dst_off + len * ts + 3];
                        let out = dst_off..dst_off + len * ts;
                        convert_with(isa, p.from, p.to, &src[src_off..], &mut dst[out.clone()])
                            .expect("convert");
                        assert!(
                            dst[..out.start]
                                .iter()
                                .chain(&dst[out.end..])
                                .all(|&b| b == 0xA5),
                            "{isa:?} {} -> {}: wrote outside the destination (len {len})",
                            p.from,
                            p.to
                        );
                        let want = &p.want[start * ts..(start + len) * ts];
                        let got = &dst[out];
                        if let Some(m) = mismatches(p.from, p.to, &src[src_off..], want, got, start)
                        {
                            failures.push(format!(
                                "{isa:?}, len {len}, offsets {src_off}/{dst_off}: {m}"
                            ));
                        }
                    }
                }
            }
        }
        failures.truncate(10);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// Millions of generated inputs per pair, against the CRC-32 of torch's output block by block,
    /// with every instruction set.
    #[test]
    fn sweeps_match_torch_block_crcs() {
        let sweeps: Sweeps = sweeps();
        let mut failures = Vec::new();
        let mut checked = 0;
        for sweep in &sweeps.sources {
            let (from, count) = (sweep.from, sweep.count());
            for (to, crcs) in &sweep.outputs {
                let to = *to;
                for isa in isas() {
                    let mut out = vec![0u8; count * to.size()];
                    convert_with(isa, from, to, &sweep.input, &mut out).expect("convert");
                    checked += count;
                    let bad = sweeps.differing_blocks(to, &out, crcs);
                    if !bad.is_empty() {
                        let block = sweeps.block;
                        let shown: Vec<String> = bad
                            .iter()
                            .take(8)
                            .map(|b| format!("{}..{}", b * block, (b + 1) * block))
                            .collect();
                        failures.push(format!(
                            "{isa:?} {from} -> {to}: {} of {} blocks differ from torch, elements {}",
                            bad.len(),
                            crcs.len(),
                            shown.join(", ")
                        ));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        assert!(checked > 10_000_000, "only {checked} elements checked");
    }

    #[test]
    fn equal_dtypes_copy_bytes_unchanged() {
        let src: Vec<u8> = (0..=255u8).cycle().take(8 * 97).collect();
        for d in DType::ALL {
            let src = &src[..src.len() / d.size() * d.size()];
            let mut dst = vec![0u8; src.len()];
            convert(d, d, src, &mut dst).expect("identity");
            assert_eq!(dst, src, "{d}");
            assert!(can_convert(d, d));
        }
    }

    #[test]
    fn can_convert_agrees_with_convert_and_converted_len() {
        for from in DType::ALL {
            for to in DType::ALL {
                let floats = from.is_convertible_float() && to.is_convertible_float();
                assert_eq!(
                    can_convert(from, to),
                    from == to || floats,
                    "{from} -> {to}"
                );
                let src = vec![0u8; 3 * from.size()];
                let mut dst = vec![0u8; 3 * to.size()];
                let result = convert(from, to, &src, &mut dst);
                let len = converted_len(from, to, src.len());
                if can_convert(from, to) {
                    assert_eq!(result, Ok(()), "{from} -> {to}");
                    assert_eq!(len, Ok(dst.len()), "{from} -> {to}");
                } else {
                    let err = ConvertError::Unsupported { from, to };
                    assert_eq!(result, Err(err.clone()));
                    assert_eq!(len, Err(err));
                }
            }
        }
    }

    #[test]
    fn bad_lengths_are_errors_and_leave_the_destination_alone() {
        let (from, to) = (DType::F32, DType::BF16);
        let src = [0x3Fu8; 12];
        let cases: [(usize, usize); 5] = [(10, 6), (12, 4), (12, 8), (12, 7), (0, 2)];
        for (src_len, dst_len) in cases {
            let mut dst = vec![0xEEu8; dst_len];
            let err = convert(from, to, &src[..src_len], &mut dst).expect_err("must fail");
            let expected = if src_len % 4 != 0 {
                ConvertError::PartialElement { from, len: src_len }
            } else {
                ConvertError::OutputLength {
                    from,
                    to,
                    elements: src_len / 4,
                    dst_len,
                }
            };
            assert_eq!(err, expected);
            assert!(!err.to_string().is_empty());
            assert!(
                dst.iter().all(|&b| b == 0xEE),
                "destination touched on error"
            );
        }
        assert_eq!(
            converted_len(DType::F16, DType::F64, 3),
            Err(ConvertError::PartialElement {
                from: DType::F16,
                len: 3
            })
        );
        let err = ConvertError::Unsupported {
            from: DType::F8E4M3,
            to: DType::F16,
        };
        assert_eq!(
            convert(DType::F8E4M3, DType::F16, &[0], &mut [0, 0]),
            Err(err)
        );
    }

    /// All 2**32 f32 patterns against the CPU's own F16C instructions (which torch uses), reached
    /// through the `half` crate's runtime-detected path, NaNs included; and the non-NaN ones against
    /// `half`'s bf16 rounding. Takes half a minute in release builds, so it runs only when
    /// `AXSAVE_EXHAUSTIVE=1` is set: `AXSAVE_EXHAUSTIVE=1 cargo test --release -p axsave-formats exhaustive`.
    #[test]
    fn exhaustive_f32_against_hardware_f16c_and_half() {
        if std::env::var_os("AXSAVE_EXHAUSTIVE").is_none() {
            eprintln!("skipping: set AXSAVE_EXHAUSTIVE=1 to check all 2^32 f32 inputs (slow)");
            return;
        }
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        let f16c = std::arch::is_x86_feature_detected!("f16c");
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        let f16c = false;
        if !f16c {
            eprintln!("no F16C on this CPU: only the bf16 half of this test runs");
        }
        let mut bad = Vec::new();
        for x in 0..=u32::MAX {
            let is_nan = x & F32_ABS > F32_INF;
            if f16c {
                let want = half::f16::from_f32(f32::from_bits(x)).to_bits();
                if f32_to_f16(x) != want && bad.len() < 5 {
                    bad.push(format!(
                        "f32->f16 0x{x:08x}: F16C 0x{want:04x}, axsave 0x{:04x}",
                        f32_to_f16(x)
                    ));
                }
            }
            if !is_nan {
                let want = half::bf16::from_f32(f32::from_bits(x)).to_bits();
                if f32_to_bf16(x) != want && bad.len() < 5 {
                    bad.push(format!(
                        "f32->bf16 0x{x:08x}: half 0x{want:04x}, axsave 0x{:04x}",
                        f32_to_bf16(x)
                    ));
                }
            }
        }
        if f16c {
            for h in 0..=u16::MAX {
                let want = half::f16::from_bits(h).to_f32().to_bits();
                if f16_to_f32(h) != want && bad.len() < 5 {
                    bad.push(format!(
                        "f16->f32 0x{h:04x}: F16C 0x{want:08x}, axsave 0x{:08x}",
                        f16_to_f32(h)
                    ));
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }
}
