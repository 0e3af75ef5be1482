//! The dtype conversion kernels the GPU runs, and their CPU twins.
//!
//! [`SOURCE`] is CUDA C, compiled at run time by NVRTC: one kernel per pair of distinct floats
//! (F16, BF16, F32, F64), each applying an element function to every element. The element
//! functions transliterate the bit-level specification in `axsave_formats::convert` (which is
//! checked against torch), operation for operation: integer arithmetic on bit patterns, plus
//! the few float operations that are exact or correctly rounded (`__fadd_rn`, `__fmul_rn`,
//! `__double2float_rn`, widening casts). The source must be compiled with `--ftz=false
//! --fmad=false` ([`NVRTC_OPTIONS`]) so that no subnormal is flushed and nothing is fused.
//!
//! Each element function has a **CPU twin** here ([`twin`]): the same algorithm, line by line
//! in Rust, so the kernel logic is verified without a GPU: the tests run the twins on the
//! torch-made fixtures in `tests/fixtures/convert` (explicit inputs and the large sweeps), and
//! against `convert.rs` on every 16-bit input. A further test compiles the element functions of
//! [`SOURCE`] itself with the host C compiler (with a small header standing in for the CUDA
//! intrinsics) and runs them on the fixtures, so the CUDA text is checked as written. On a GPU,
//! the GPU tests run the real kernels on the same fixtures, and every process checks the
//! compiled kernels against the CPU on [`self_test_inputs`] before trusting them.

use axsave_formats::DType;

/// Options NVRTC compiles [`SOURCE`] with: IEEE semantics (no flush-to-zero, no fused
/// multiply-add, correctly rounded division and square root), as the twins assume.
pub const NVRTC_OPTIONS: &[&str] = &[
    "--ftz=false",
    "--prec-div=true",
    "--prec-sqrt=true",
    "--fmad=false",
];

/// The kernels, as NVRTC compiles them. Everything above the `__CUDACC_RTC__` guard is plain C
/// (the host-compile test builds it with a C compiler); the kernels below it are CUDA only.
pub const SOURCE: &str = r#"
/* axsave dtype conversion kernels. Element functions transliterate
   crates/axsave-formats/src/convert.rs; their CPU twins are in
   crates/axsave-core/src/gpu/kernels.rs. Keep the three in step. */
typedef unsigned short ax_u16;
typedef unsigned int ax_u32;
typedef unsigned long long ax_u64;

#define AX_F32_ABS 0x7FFFFFFFu
#define AX_F32_INF 0x7F800000u
#define AX_F32_MANTISSA 0x007FFFFFu
#define AX_F32_QUIET 0x00400000u
#define AX_F64_ABS 0x7FFFFFFFFFFFFFFFull
#define AX_F64_INF 0x7FF0000000000000ull
#define AX_F64_MANTISSA 0x000FFFFFFFFFFFFFull

/* f32 -> bf16, round to nearest even; every NaN becomes `nan_bits`. */
__device__ __forceinline__ ax_u16 ax_f32_to_bf16_nan(ax_u32 x, ax_u16 nan_bits) {
    ax_u32 rounded = (x + (0x7FFFu + ((x >> 16) & 1u))) >> 16;
    return ((x & AX_F32_ABS) > AX_F32_INF) ? nan_bits : (ax_u16)rounded;
}

__device__ __forceinline__ ax_u16 ax_f32_to_bf16(ax_u32 x) {
    return ax_f32_to_bf16_nan(x, (ax_u16)0xFFFFu);
}

/* f32 -> f16 as x86 vcvtps2ph: round to nearest even, subnormals rounded, NaN keeps the sign
   and the top 10 payload bits and gets the quiet bit. */
__device__ __forceinline__ ax_u16 ax_f32_to_f16(ax_u32 x) {
    ax_u32 sign = (x >> 16) & 0x8000u;
    ax_u32 a = x & AX_F32_ABS;
    ax_u32 nan_bits = 0x7E00u | ((a & AX_F32_MANTISSA) >> 13);
    ax_u32 n = ((a - ((127u - 15u) << 23)) + (0x0FFFu + ((a >> 13) & 1u))) >> 13;
    ax_u32 normal = n < 0x7C00u ? n : 0x7C00u;
    ax_u32 subnormal = __float_as_uint(__fadd_rn(__uint_as_float(a), 0.5f)) - 0x3F000000u;
    ax_u32 body = (a > AX_F32_INF) ? nan_bits : ((a < 0x38800000u) ? subnormal : normal);
    return (ax_u16)(sign | (body & 0xFFFFu));
}

/* f32 -> f64, exact; a NaN keeps sign and payload and gets the quiet bit. */
__device__ __forceinline__ ax_u64 ax_f32_to_f64(ax_u32 x) {
    ax_u64 x64 = (ax_u64)x;
    ax_u64 nan_bits = ((x64 & 0x80000000ull) << 32) | 0x7FF8000000000000ull
                    | ((x64 & (ax_u64)AX_F32_MANTISSA) << 29);
    ax_u64 widened = (ax_u64)__double_as_longlong((double)__uint_as_float(x));
    return ((x & AX_F32_ABS) > AX_F32_INF) ? nan_bits : widened;
}

/* f64 -> f32, round to nearest even; a NaN keeps its sign and top 22 payload bits, quiet bit set. */
__device__ __forceinline__ ax_u32 ax_f64_to_f32(ax_u64 x) {
    ax_u32 nan_bits = ((ax_u32)(x >> 32) & 0x80000000u) | 0x7FC00000u
                    | (ax_u32)((x & AX_F64_MANTISSA) >> 29);
    ax_u32 narrowed = __float_as_uint(__double2float_rn(__longlong_as_double((long long)x)));
    return ((x & AX_F64_ABS) > AX_F64_INF) ? nan_bits : narrowed;
}

__device__ __forceinline__ ax_u16 ax_f64_to_bf16(ax_u64 x) { return ax_f32_to_bf16(ax_f64_to_f32(x)); }
__device__ __forceinline__ ax_u16 ax_f64_to_f16(ax_u64 x) { return ax_f32_to_f16(ax_f64_to_f32(x)); }

/* f16 -> f32, exact; a NaN keeps sign and payload and gets the quiet bit. */
__device__ __forceinline__ ax_u32 ax_f16_to_f32(ax_u16 h16) {
    ax_u32 h = (ax_u32)h16;
    ax_u32 sign = (h & 0x8000u) << 16;
    ax_u32 a = h & 0x7FFFu;
    ax_u32 mantissa = a & 0x03FFu;
    ax_u32 normal = (a << 13) + ((127u - 15u) << 23);
    ax_u32 inf_nan = AX_F32_INF | (mantissa << 13) | (mantissa != 0u ? AX_F32_QUIET : 0u);
    ax_u32 subnormal = __float_as_uint(__fmul_rn(__uint2float_rn(mantissa), __uint_as_float(0x33800000u)));
    ax_u32 e = a >> 10;
    return sign | ((e == 0x1Fu) ? inf_nan : ((e == 0u) ? subnormal : normal));
}

__device__ __forceinline__ ax_u64 ax_f16_to_f64(ax_u16 h) { return ax_f32_to_f64(ax_f16_to_f32(h)); }
__device__ __forceinline__ ax_u16 ax_f16_to_bf16(ax_u16 h) { return ax_f32_to_bf16_nan(ax_f16_to_f32(h), (ax_u16)0x7FC0u); }
__device__ __forceinline__ ax_u32 ax_bf16_to_f32(ax_u16 h) { return ((ax_u32)h) << 16; }
__device__ __forceinline__ ax_u64 ax_bf16_to_f64(ax_u16 h) { return ax_f32_to_f64(ax_bf16_to_f32(h)); }
__device__ __forceinline__ ax_u16 ax_bf16_to_f16(ax_u16 h) { return ax_f32_to_f16(ax_bf16_to_f32(h)); }

#ifdef __CUDACC_RTC__
/* dst[i] = f(src[i]) for i < n, grid-stride. Buffers are element-aligned (16-byte offsets). */
#define AX_KERNEL(NAME, IN, OUT, F)                                                  \
    extern "C" __global__ void NAME(OUT* __restrict__ dst, const IN* __restrict__ src, \
                                    ax_u64 n) {                                      \
        ax_u64 stride = (ax_u64)gridDim.x * blockDim.x;                              \
        for (ax_u64 i = (ax_u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) \
            dst[i] = F(src[i]);                                                      \
    }
AX_KERNEL(axsave_f32_to_bf16, ax_u32, ax_u16, ax_f32_to_bf16)
AX_KERNEL(axsave_f32_to_f16, ax_u32, ax_u16, ax_f32_to_f16)
AX_KERNEL(axsave_f32_to_f64, ax_u32, ax_u64, ax_f32_to_f64)
AX_KERNEL(axsave_f64_to_f32, ax_u64, ax_u32, ax_f64_to_f32)
AX_KERNEL(axsave_f64_to_bf16, ax_u64, ax_u16, ax_f64_to_bf16)
AX_KERNEL(axsave_f64_to_f16, ax_u64, ax_u16, ax_f64_to_f16)
AX_KERNEL(axsave_f16_to_f32, ax_u16, ax_u32, ax_f16_to_f32)
AX_KERNEL(axsave_f16_to_f64, ax_u16, ax_u64, ax_f16_to_f64)
AX_KERNEL(axsave_f16_to_bf16, ax_u16, ax_u16, ax_f16_to_bf16)
AX_KERNEL(axsave_bf16_to_f32, ax_u16, ax_u32, ax_bf16_to_f32)
AX_KERNEL(axsave_bf16_to_f64, ax_u16, ax_u64, ax_bf16_to_f64)
AX_KERNEL(axsave_bf16_to_f16, ax_u16, ax_u16, ax_bf16_to_f16)
#endif
"#;

/// The kernel of [`SOURCE`] that converts `from` to `to`, for the twelve pairs of distinct
/// floats (`None` otherwise, equal dtypes included: those are plain copies).
pub fn kernel_name(from: DType, to: DType) -> Option<&'static str> {
    use DType::{BF16, F16, F32, F64};
    Some(match (from, to) {
        (F32, BF16) => "axsave_f32_to_bf16",
        (F32, F16) => "axsave_f32_to_f16",
        (F32, F64) => "axsave_f32_to_f64",
        (F64, F32) => "axsave_f64_to_f32",
        (F64, BF16) => "axsave_f64_to_bf16",
        (F64, F16) => "axsave_f64_to_f16",
        (F16, F32) => "axsave_f16_to_f32",
        (F16, F64) => "axsave_f16_to_f64",
        (F16, BF16) => "axsave_f16_to_bf16",
        (BF16, F32) => "axsave_bf16_to_f32",
        (BF16, F64) => "axsave_bf16_to_f64",
        (BF16, F16) => "axsave_bf16_to_f16",
        _ => return None,
    })
}

/// Every pair with a kernel, in a fixed order.
pub const PAIRS: [(DType, DType); 12] = [
    (DType::F32, DType::BF16),
    (DType::F32, DType::F16),
    (DType::F32, DType::F64),
    (DType::F64, DType::F32),
    (DType::F64, DType::BF16),
    (DType::F64, DType::F16),
    (DType::F16, DType::F32),
    (DType::F16, DType::F64),
    (DType::F16, DType::BF16),
    (DType::BF16, DType::F32),
    (DType::BF16, DType::F64),
    (DType::BF16, DType::F16),
];

/// The CPU twins: each kernel's element function, line by line as in [`SOURCE`]. C's unsigned
/// arithmetic wraps, hence `wrapping_*`; C's `?:` is `if`; `__fadd_rn`, `__fmul_rn`,
/// `__double2float_rn`, `__uint2float_rn` and the widening cast are IEEE operations that Rust's
/// `+`, `*` and `as` perform identically (round to nearest even, no flush, no fusion).
pub mod twin {
    const F32_ABS: u32 = 0x7FFF_FFFF;
    const F32_INF: u32 = 0x7F80_0000;
    const F32_MANTISSA: u32 = 0x007F_FFFF;
    const F32_QUIET: u32 = 0x0040_0000;
    const F64_ABS: u64 = 0x7FFF_FFFF_FFFF_FFFF;
    const F64_INF: u64 = 0x7FF0_0000_0000_0000;
    const F64_MANTISSA: u64 = 0x000F_FFFF_FFFF_FFFF;

    /// `ax_f32_to_bf16_nan`.
    pub fn f32_to_bf16_nan(x: u32, nan_bits: u16) -> u16 {
        let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
        if (x & F32_ABS) > F32_INF {
            nan_bits
        } else {
            rounded as u16
        }
    }

    /// `ax_f32_to_bf16`.
    pub fn f32_to_bf16(x: u32) -> u16 {
        f32_to_bf16_nan(x, 0xFFFF)
    }

    /// `ax_f32_to_f16`.
    pub fn f32_to_f16(x: u32) -> u16 {
        let sign = (x >> 16) & 0x8000;
        let a = x & F32_ABS;
        let nan_bits = 0x7E00 | ((a & F32_MANTISSA) >> 13);
        let n = (a.wrapping_sub((127 - 15) << 23)).wrapping_add(0x0FFF + ((a >> 13) & 1)) >> 13;
        let normal = if n < 0x7C00 { n } else { 0x7C00 };
        let subnormal = (f32::from_bits(a) + 0.5f32)
            .to_bits()
            .wrapping_sub(0x3F00_0000);
        let body = if a > F32_INF {
            nan_bits
        } else if a < 0x3880_0000 {
            subnormal
        } else {
            normal
        };
        (sign | (body & 0xFFFF)) as u16
    }

    /// `ax_f32_to_f64`.
    pub fn f32_to_f64(x: u32) -> u64 {
        let x64 = x as u64;
        let nan_bits = ((x64 & 0x8000_0000) << 32)
            | 0x7FF8_0000_0000_0000
            | ((x64 & F32_MANTISSA as u64) << 29);
        let widened = (f32::from_bits(x) as f64).to_bits();
        if (x & F32_ABS) > F32_INF {
            nan_bits
        } else {
            widened
        }
    }

    /// `ax_f64_to_f32`.
    pub fn f64_to_f32(x: u64) -> u32 {
        let nan_bits =
            ((x >> 32) as u32 & 0x8000_0000) | 0x7FC0_0000 | ((x & F64_MANTISSA) >> 29) as u32;
        let narrowed = (f64::from_bits(x) as f32).to_bits();
        if (x & F64_ABS) > F64_INF {
            nan_bits
        } else {
            narrowed
        }
    }

    /// `ax_f64_to_bf16`.
    pub fn f64_to_bf16(x: u64) -> u16 {
        f32_to_bf16(f64_to_f32(x))
    }

    /// `ax_f64_to_f16`.
    pub fn f64_to_f16(x: u64) -> u16 {
        f32_to_f16(f64_to_f32(x))
    }

    /// `ax_f16_to_f32`.
    pub fn f16_to_f32(h16: u16) -> u32 {
        let h = h16 as u32;
        let sign = (h & 0x8000) << 16;
        let a = h & 0x7FFF;
        let mantissa = a & 0x03FF;
        let normal = (a << 13) + ((127 - 15) << 23);
        let inf_nan = F32_INF | (mantissa << 13) | if mantissa != 0 { F32_QUIET } else { 0 };
        let subnormal = (mantissa as f32 * f32::from_bits(0x3380_0000)).to_bits();
        let e = a >> 10;
        sign | if e == 0x1F {
            inf_nan
        } else if e == 0 {
            subnormal
        } else {
            normal
        }
    }

    /// `ax_f16_to_f64`.
    pub fn f16_to_f64(h: u16) -> u64 {
        f32_to_f64(f16_to_f32(h))
    }

    /// `ax_f16_to_bf16`.
    pub fn f16_to_bf16(h: u16) -> u16 {
        f32_to_bf16_nan(f16_to_f32(h), 0x7FC0)
    }

    /// `ax_bf16_to_f32`.
    pub fn bf16_to_f32(h: u16) -> u32 {
        (h as u32) << 16
    }

    /// `ax_bf16_to_f64`.
    pub fn bf16_to_f64(h: u16) -> u64 {
        f32_to_f64(bf16_to_f32(h))
    }

    /// `ax_bf16_to_f16`.
    pub fn bf16_to_f16(h: u16) -> u16 {
        f32_to_f16(bf16_to_f32(h))
    }
}

/// Runs the twin of kernel `(from, to)` over little-endian bytes, as the kernel would over a
/// buffer: the CPU stand-in for a device conversion. Equal dtypes copy. Refuses what
/// `convert::convert` refuses, with the same errors.
pub fn twin_convert(
    from: DType,
    to: DType,
    src: &[u8],
    dst: &mut [u8],
) -> Result<(), axsave_formats::convert::ConvertError> {
    use axsave_formats::convert::{ConvertError, converted_len};
    let need = converted_len(from, to, src.len())?;
    if dst.len() != need {
        return Err(ConvertError::OutputLength {
            from,
            to,
            elements: src.len() / from.size(),
            dst_len: dst.len(),
        });
    }
    fn each<const A: usize, const B: usize>(
        src: &[u8],
        dst: &mut [u8],
        f: impl Fn([u8; A]) -> [u8; B],
    ) {
        for (s, d) in src.chunks_exact(A).zip(dst.chunks_exact_mut(B)) {
            let mut a = [0u8; A];
            a.copy_from_slice(s);
            d.copy_from_slice(&f(a));
        }
    }
    use DType::{BF16, F16, F32, F64};
    let u16_ = u16::from_le_bytes;
    let u32_ = u32::from_le_bytes;
    let u64_ = u64::from_le_bytes;
    match (from, to) {
        _ if from == to => dst.copy_from_slice(src),
        (F32, BF16) => each(src, dst, |a| twin::f32_to_bf16(u32_(a)).to_le_bytes()),
        (F32, F16) => each(src, dst, |a| twin::f32_to_f16(u32_(a)).to_le_bytes()),
        (F32, F64) => each(src, dst, |a| twin::f32_to_f64(u32_(a)).to_le_bytes()),
        (F64, F32) => each(src, dst, |a| twin::f64_to_f32(u64_(a)).to_le_bytes()),
        (F64, BF16) => each(src, dst, |a| twin::f64_to_bf16(u64_(a)).to_le_bytes()),
        (F64, F16) => each(src, dst, |a| twin::f64_to_f16(u64_(a)).to_le_bytes()),
        (F16, F32) => each(src, dst, |a| twin::f16_to_f32(u16_(a)).to_le_bytes()),
        (F16, F64) => each(src, dst, |a| twin::f16_to_f64(u16_(a)).to_le_bytes()),
        (F16, BF16) => each(src, dst, |a| twin::f16_to_bf16(u16_(a)).to_le_bytes()),
        (BF16, F32) => each(src, dst, |a| twin::bf16_to_f32(u16_(a)).to_le_bytes()),
        (BF16, F64) => each(src, dst, |a| twin::bf16_to_f64(u16_(a)).to_le_bytes()),
        (BF16, F16) => each(src, dst, |a| twin::bf16_to_f16(u16_(a)).to_le_bytes()),
        _ => return Err(ConvertError::Unsupported { from, to }),
    }
    Ok(())
}

/// Inputs for the start-up self-test of the compiled kernels, as little-endian bytes of
/// `from`: every special value and boundary the element functions branch on (zeros, ±Inf,
/// quiet and signalling NaNs with payloads, subnormals, rounding ties either side, overflow
/// thresholds), then a deterministic spread of bit patterns. A few thousand elements: checked in
/// well under a millisecond, yet a kernel that disagrees with the CPU anywhere it branches
/// fails it.
pub fn self_test_inputs(from: DType) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        // xorshift64*: a fixed sequence, no dependency.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    match from {
        DType::F16 | DType::BF16 => (0..=u16::MAX).flat_map(u16::to_le_bytes).collect(),
        DType::F32 => {
            let special: [u32; 24] = [
                0x0000_0000,
                0x8000_0000,
                0x7F80_0000,
                0xFF80_0000,
                0x7FC0_0000,
                0xFFC0_0001,
                0x7F80_0001,
                0xFFBF_FFFF,
                0x0000_0001,
                0x807F_FFFF,
                0x3880_0000,
                0x387F_FFFF,
                0x3300_0000,
                0x3300_0001,
                0x477F_E000,
                0x477F_EFFF,
                0x477F_F000,
                0x7F7F_FFFF,
                0x3F80_8000,
                0x3F81_8000,
                0x3F80_7FFF,
                0xBF80_8001,
                0x3F80_1000,
                0x3F80_3000,
            ];
            let mut v: Vec<u32> = special.to_vec();
            v.extend((0..4096).map(|_| (next() >> 32) as u32));
            v.into_iter().flat_map(u32::to_le_bytes).collect()
        }
        DType::F64 => {
            let special: [u64; 16] = [
                0,
                1 << 63,
                0x7FF0_0000_0000_0000,
                0xFFF0_0000_0000_0000,
                0x7FF8_0000_0000_0001,
                0xFFF0_0000_0000_0001,
                1,
                0x3810_0000_0000_0000,
                0x380F_FFFF_FFFF_FFFF,
                0x47EF_FFFF_E000_0000,
                0x47EF_FFFF_F000_0000,
                0x3FF0_0000_1000_0000,
                0x3FF0_0000_3000_0000,
                0x3FF0_1000_0000_0000,
                0x3FF0_1000_0000_0001,
                0x40EF_FE00_0000_0000,
            ];
            let mut v: Vec<u64> = special.to_vec();
            v.extend((0..4096).map(|_| next()));
            v.into_iter().flat_map(u64::to_le_bytes).collect()
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The twins against torch (the fixtures that convert.rs is tested with) and against
    //! convert.rs; the CUDA C source compiled for the host against torch.

    use super::*;
    use axsave_formats::convert;
    use axsave_formats::torch_fixtures::{pairs, splitmix64, sweeps};

    /// (from, to, input, torch's output) for every pair of the explicit fixtures.
    pub(crate) fn explicit() -> Vec<(DType, DType, Vec<u8>, Vec<u8>)> {
        let pairs: Vec<_> = pairs()
            .into_iter()
            .map(|p| (p.from, p.to, p.input, p.want))
            .collect();
        assert_eq!(pairs.len(), 12, "the fixtures cover the twelve pairs");
        pairs
    }

    pub(crate) fn first_difference(size: usize, want: &[u8], got: &[u8]) -> Option<usize> {
        (0..want.len() / size)
            .find(|&i| want[i * size..(i + 1) * size] != got[i * size..(i + 1) * size])
    }

    #[test]
    fn every_pair_has_a_kernel_and_a_twin() {
        for from in DType::ALL {
            for to in DType::ALL {
                let expected =
                    from != to && from.is_convertible_float() && to.is_convertible_float();
                assert_eq!(kernel_name(from, to).is_some(), expected, "{from} -> {to}");
                if let Some(k) = kernel_name(from, to) {
                    assert!(
                        SOURCE.contains(&format!("AX_KERNEL({k},")),
                        "{k} missing from SOURCE"
                    );
                    assert!(PAIRS.contains(&(from, to)));
                }
            }
        }
    }

    #[test]
    fn twins_match_torch_on_the_explicit_fixtures() {
        let mut checked = 0;
        for (from, to, input, want) in explicit() {
            let mut got = vec![0u8; want.len()];
            twin_convert(from, to, &input, &mut got).unwrap();
            if let Some(i) = first_difference(to.size(), &want, &got) {
                panic!("{from} -> {to}: element {i} differs from torch");
            }
            checked += want.len() / to.size();
        }
        assert!(checked > 20_000, "only {checked} elements");
    }

    /// Millions of inputs per pair, against the CRC-32 of torch's output block by block.
    #[test]
    fn twins_match_torch_on_the_sweeps() {
        let sweeps = sweeps();
        let mut pairs = 0;
        for sweep in &sweeps.sources {
            let from = sweep.from;
            for (to, crcs) in &sweep.outputs {
                let mut out = vec![0u8; sweep.count() * to.size()];
                twin_convert(from, *to, &sweep.input, &mut out).unwrap();
                if let Some(b) = sweeps.differing_blocks(*to, &out, crcs).first() {
                    panic!(
                        "{from} -> {to}: block {b} (elements {}..) differs from torch",
                        b * sweeps.block
                    );
                }
                pairs += 1;
            }
        }
        assert_eq!(pairs, 12);
    }

    /// convert.rs is the specification: every 16-bit input, and the self-test inputs.
    #[test]
    fn twins_agree_with_convert_rs() {
        for (from, to) in PAIRS {
            let mut inputs = self_test_inputs(from);
            if from.size() == 8 {
                // And a million more f64 patterns, so every exponent range is hit.
                inputs.extend((0..1u64 << 20).flat_map(|i| splitmix64(i ^ 0xA5A5).to_le_bytes()));
            }
            let n = inputs.len() / from.size();
            let mut want = vec![0u8; n * to.size()];
            let mut got = vec![0u8; n * to.size()];
            convert::convert(from, to, &inputs, &mut want).unwrap();
            twin_convert(from, to, &inputs, &mut got).unwrap();
            if let Some(i) = first_difference(to.size(), &want, &got) {
                panic!("{from} -> {to}: element {i} differs from convert.rs");
            }
        }
    }

    #[test]
    fn twin_convert_checks_lengths_like_convert() {
        let mut dst = [0u8; 3];
        assert_eq!(
            twin_convert(DType::F32, DType::BF16, &[0u8; 4], &mut dst),
            convert::convert(DType::F32, DType::BF16, &[0u8; 4], &mut dst)
        );
        assert!(twin_convert(DType::I32, DType::F32, &[0u8; 4], &mut [0u8; 4]).is_err());
    }

    /// The CUDA C element functions themselves, compiled for the host with a C compiler and a
    /// header that maps the CUDA intrinsics to their C equivalents, run on torch's explicit
    /// fixtures. Skips (saying so) when no C compiler is found.
    #[test]
    fn cuda_source_compiled_on_the_host_matches_torch() {
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let dir = tempfile::tempdir().unwrap();
        let shim = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define __device__
#define __forceinline__ static inline
static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline double __longlong_as_double(long long u) { double d; memcpy(&d, &u, 8); return d; }
static inline long long __double_as_longlong(double d) { long long u; memcpy(&u, &d, 8); return u; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __double2float_rn(double d) { return (float)d; }
static inline float __uint2float_rn(unsigned int u) { return (float)u; }
"#;
        let mut main = String::from(
            "int main(int argc, char** argv) {\n  if (argc != 2) return 2;\n  const char* k = argv[1];\n",
        );
        let cty = |d: DType| match d.size() {
            2 => "ax_u16",
            4 => "ax_u32",
            _ => "ax_u64",
        };
        for (from, to) in PAIRS {
            let name = kernel_name(from, to).unwrap();
            let func = name.replacen("axsave_", "ax_", 1);
            main.push_str(&format!(
                "  if (!strcmp(k, \"{name}\")) {{ {i} x; while (fread(&x, sizeof x, 1, stdin) == 1) {{ {o} y = {func}(x); fwrite(&y, sizeof y, 1, stdout); }} return 0; }}\n",
                i = cty(from),
                o = cty(to),
            ));
        }
        main.push_str("  return 3;\n}\n");
        let c = dir.path().join("kernels.c");
        std::fs::write(&c, format!("{shim}\n{SOURCE}\n{main}")).unwrap();
        let exe = dir.path().join("kernels");
        // -ffp-contract=off: no fused multiply-add, as --fmad=false on the device.
        let built = std::process::Command::new(&cc)
            .args([
                "-std=c99",
                "-O2",
                "-ffp-contract=off",
                "-Wall",
                "-Werror",
                "-o",
            ])
            .arg(&exe)
            .arg(&c)
            .output();
        let built = match built {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipping: no C compiler ({cc}: {e}); the twins are still checked");
                return;
            }
        };
        assert!(
            built.status.success(),
            "the kernel source does not compile as C:\n{}",
            String::from_utf8_lossy(&built.stderr)
        );
        // The kernels themselves (CUDA only) as C++, with the CUDA built-ins declared: a
        // syntax and type check of the whole NVRTC input, macros expanded.
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let kernels_cpp = dir.path().join("kernels.cpp");
        let cuda_shim = r#"
#define __CUDACC_RTC__ 1
#define __global__
#define __restrict__ __restrict
struct ax_dim3 { unsigned x, y, z; };
static ax_dim3 blockIdx, blockDim, gridDim, threadIdx;
"#;
        std::fs::write(&kernels_cpp, format!("{shim}\n{cuda_shim}\n{SOURCE}\n")).unwrap();
        match std::process::Command::new(&cxx)
            .args([
                "-std=c++14",
                "-fsyntax-only",
                "-Wall",
                "-Werror",
                "-Wno-unused-function",
            ])
            .arg(&kernels_cpp)
            .output()
        {
            Ok(o) => assert!(
                o.status.success(),
                "the kernels do not compile as C++:\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("no C++ compiler ({cxx}: {e}): kernel syntax not checked here"),
        }
        for (from, to, input, want) in explicit() {
            let name = kernel_name(from, to).unwrap();
            let mut child = std::process::Command::new(&exe)
                .arg(name)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let feed = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
            let out = child.wait_with_output().unwrap();
            feed.join().unwrap().unwrap();
            assert!(out.status.success(), "{name}");
            assert_eq!(out.stdout.len(), want.len(), "{name}");
            if let Some(i) = first_difference(to.size(), &want, &out.stdout) {
                panic!("{name} (compiled from SOURCE): element {i} differs from torch");
            }
        }
    }
}
