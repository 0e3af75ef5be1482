//! PEFT's merge arithmetic, row block by row block, with PEFT's roundings.
//!
//! Read from PEFT 0.21's `tuners/lora/layer.py` and `variants.py` (and checked against its
//! output by the fixtures, `scripts/fixtures/lora.py`). The adapter is held in fp32 (PEFT's
//! `autocast_adapter_dtype` upcasts bf16/fp16 adapters on load), so on the CPU:
//!
//! - `Linear.get_delta_weight`: `delta = transpose(B @ A, fan_in_fan_out) * scaling`, the product
//!   in fp32 and the scaling (a Python float) applied in fp32;
//! - `Linear.merge`: `weight += delta`: the base weight widened to fp32, the sum rounded once to
//!   the weight's dtype;
//! - `Embedding.merge`: `weight += delta.to(weight.dtype)`: delta = `(B @ A)^T * scaling`,
//!   rounded to the weight's dtype first, then the sum rounded again;
//! - DoRA (`DoraLinearVariant.merge_unsafe`, `DoraEmbeddingVariant`): `norm = ‖W + delta‖` per
//!   output row (fp32; per stored column for embeddings and `fan_in_fan_out`, whose DoRA layers
//!   transpose the weight), `W' = (magnitude / norm) * (W + delta)` in fp32, rounded once (the
//!   embedding's delta is not rounded first here);
//! - `lora_bias`: `bias += lora_B.bias * scaling`, rounded once.

use axsave_formats::DType;
use axsave_formats::convert::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

/// The low-rank product of one module, as fp32 matrices.
pub struct LowRank<'a> {
    /// `lora_B` (`out × r`, row-major).
    pub b: &'a [f32],
    /// `lora_A` (`r × in`, row-major).
    pub a: &'a [f32],
    /// The rank.
    pub rank: usize,
    /// Rows of the stored base weight.
    pub rows: usize,
    /// Columns of the stored base weight.
    pub cols: usize,
    /// Whether the stored weight is `(B @ A)^T` (`fan_in_fan_out`, and every embedding:
    /// `lora_embedding_B @ lora_embedding_A` is `(dim × vocab)` and the weight `(vocab × dim)`).
    pub transposed: bool,
    /// PEFT's scaling, as the fp32 torch multiplies by.
    pub scale: f32,
}

impl LowRank<'_> {
    /// Writes `delta` for rows `row0 .. row0 + n` of the stored weight into `out` (`n × cols`).
    pub fn delta_rows(&self, row0: usize, n: usize, out: &mut [f32]) {
        let (r, rows, cols) = (self.rank, self.rows, self.cols);
        assert!(row0 + n <= rows && out.len() == n * cols);
        assert!(self.a.len() == r * if self.transposed { rows } else { cols });
        assert!(self.b.len() == r * if self.transposed { cols } else { rows });
        // delta[i][j] = Σ_k L[i][k] · R[k][j] with, unless transposed, L = B and R = A;
        // transposed, L = Aᵀ (element (i, k) at a[k·rows + i]) and R = Bᵀ ((k, j) at b[j·r + k]).
        let (l_off, rsl, csl, rsr, csr, right) = if self.transposed {
            (row0, 1, rows, 1, r, self.b)
        } else {
            (row0 * r, r, 1, cols, 1, self.a)
        };
        let left = if self.transposed { self.a } else { self.b };
        if n == 0 || cols == 0 {
            return;
        }
        // SAFETY: the asserts above make every index sgemm touches valid: rows `row0 .. row0+n`
        // and columns `0 .. r` of L lie in `left` (non-transposed: (row0+i)·r + k < rows·r;
        // transposed: k·rows + row0 + i < r·rows), rows `0 .. r` and columns `0 .. cols` of R lie
        // in `right` (k·cols + j < r·cols; j·r + k < cols·r), and `out` holds n·cols elements
        // written with row stride `cols`. `out` does not alias the inputs (a `&mut` borrow).
        unsafe {
            matrixmultiply::sgemm(
                n,
                r,
                cols,
                1.0,
                left.as_ptr().add(l_off),
                rsl as isize,
                csl as isize,
                right.as_ptr(),
                rsr as isize,
                csr as isize,
                0.0,
                out.as_mut_ptr(),
                cols as isize,
                1,
            );
        }
        for d in out.iter_mut() {
            *d *= self.scale;
        }
    }
}

/// The base weight's dtypes a merge can write.
pub fn mergeable(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16 | DType::F32)
}

/// Widens stored elements of `dtype` to fp32 (exact).
pub fn to_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(bf16_to_f32(u16::from_le_bytes([c[0], c[1]])));
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(f16_to_f32(u16::from_le_bytes([c[0], c[1]])));
            }
        }
        _ => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

/// Rounds one fp32 value to `dtype` (nearest even) and back: what `.to(dtype)` keeps.
#[inline]
pub fn round_trip(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => f32::from_bits(bf16_to_f32(f32_to_bf16(x.to_bits()))),
        DType::F16 => f32::from_bits(f16_to_f32(f32_to_f16(x.to_bits()))),
        _ => x,
    }
}

/// Rounds fp32 values to `dtype` (nearest even) into little-endian bytes.
pub fn from_f32(dtype: DType, vals: &[f32], out: &mut [u8]) {
    match dtype {
        DType::BF16 => {
            for (v, o) in vals.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f32_to_bf16(v.to_bits()).to_le_bytes());
            }
        }
        DType::F16 => {
            for (v, o) in vals.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f32_to_f16(v.to_bits()).to_le_bytes());
            }
        }
        _ => {
            for (v, o) in vals.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// How a module's delta meets its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    /// `Linear.merge`: `round(W + delta)`.
    Add,
    /// `Embedding.merge`: `round(W + round(delta))`.
    AddRounded,
}

/// Merges rows in place: `w` holds the base weight's rows widened to fp32, `delta` the same
/// rows of the delta; on return `w` holds the merged values, not yet rounded to `dtype` (the
/// caller's [`from_f32`] does that, the one final rounding).
pub fn combine(dtype: DType, how: Combine, w: &mut [f32], delta: &[f32]) {
    match how {
        Combine::Add => {
            for (w, d) in w.iter_mut().zip(delta) {
                *w += *d;
            }
        }
        Combine::AddRounded => {
            for (w, d) in w.iter_mut().zip(delta) {
                *w += round_trip(dtype, *d);
            }
        }
    }
}

/// DoRA on rows of a `(out, in)` weight: each row `i` becomes
/// `(magnitude[i] / ‖W_i + delta_i‖) · (W_i + delta_i)`, in fp32.
pub fn dora_rows(w: &mut [f32], delta: &[f32], cols: usize, magnitude: &[f32]) {
    for ((row, drow), m) in w
        .chunks_exact_mut(cols)
        .zip(delta.chunks_exact(cols))
        .zip(magnitude)
    {
        for (x, d) in row.iter_mut().zip(drow) {
            *x += *d;
        }
        let norm = l2_norm(row);
        let factor = *m / norm;
        for x in row.iter_mut() {
            *x *= factor;
        }
    }
}

/// DoRA where the stored weight is transposed (`fan_in_fan_out`, embeddings): PEFT's norm runs
/// over the stored rows, one per stored column. This adds the squares of `W + delta` for rows
/// of a block to `acc` (one per column), in row order as torch's reduction over a strided
/// dimension does (a product rounded, then a sum rounded); blocks must come in order.
pub fn dora_column_squares(w: &[f32], delta: &[f32], cols: usize, acc: &mut [f32]) {
    for (row, drow) in w.chunks_exact(cols).zip(delta.chunks_exact(cols)) {
        for ((a, x), d) in acc.iter_mut().zip(row).zip(drow) {
            let v = *x + *d;
            *a += v * v;
        }
    }
}

/// The second pass of [`dora_column_squares`]: each column `j` of `W + delta` times
/// `magnitude[j] / sqrt(acc[j])`, in fp32.
pub fn dora_columns(w: &mut [f32], delta: &[f32], cols: usize, factor: &[f32]) {
    for (row, drow) in w.chunks_exact_mut(cols).zip(delta.chunks_exact(cols)) {
        for ((x, d), f) in row.iter_mut().zip(drow).zip(factor) {
            *x = (*x + *d) * *f;
        }
    }
}

/// `torch.linalg.norm` of one fp32 row, summed in the order of torch's AVX2 CPU kernel (the
/// vector width of the machine the fixtures were made on; measured, not documented): eight
/// lanes each accumulate `x * x` (a product rounded, then a sum rounded: no FMA) over the
/// row's first multiple of eight elements, the lanes are added in order, then the remaining
/// elements one by one, then the square root. Other orders differ in the last bit of about a
/// quarter of the rows, and every element of such a row then moves.
pub fn l2_norm(row: &[f32]) -> f32 {
    let full = row.len() - row.len() % 8;
    let mut acc = [0f32; 8];
    for chunk in row[..full].chunks_exact(8) {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += *x * *x;
        }
    }
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    for x in &row[full..] {
        s += *x * *x;
    }
    s.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(b: &[f32], a: &[f32], r: usize, out_f: usize, in_f: usize, s: f32) -> Vec<f32> {
        let mut d = vec![0f32; out_f * in_f];
        for i in 0..out_f {
            for j in 0..in_f {
                let mut acc = 0f32;
                for k in 0..r {
                    acc = b[i * r + k].mul_add(a[k * in_f + j], acc);
                }
                d[i * in_f + j] = acc * s;
            }
        }
        d
    }

    #[test]
    fn low_rank_rows_and_transposes() {
        let (out_f, in_f, r) = (5usize, 7usize, 3usize);
        let b: Vec<f32> = (0..out_f * r).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<f32> = (0..r * in_f).map(|i| (i as f32 * 0.11).cos()).collect();
        let full = naive(&b, &a, r, out_f, in_f, 0.5);
        let lr = LowRank {
            b: &b,
            a: &a,
            rank: r,
            rows: out_f,
            cols: in_f,
            transposed: false,
            scale: 0.5,
        };
        let mut got = vec![0f32; 2 * in_f];
        lr.delta_rows(2, 2, &mut got);
        for (g, e) in got.iter().zip(&full[2 * in_f..4 * in_f]) {
            assert!((g - e).abs() <= 1e-6, "{g} {e}");
        }
        // The stored weight is (in, out) and its delta the transpose.
        let lt = LowRank {
            rows: in_f,
            cols: out_f,
            transposed: true,
            ..lr
        };
        let mut got = vec![0f32; 3 * out_f];
        lt.delta_rows(4, 3, &mut got);
        for i in 0..3 {
            for j in 0..out_f {
                let e = full[j * in_f + 4 + i];
                assert!((got[i * out_f + j] - e).abs() <= 1e-6);
            }
        }
    }

    #[test]
    fn roundings() {
        // 1 + 2^-8 + 2^-20 in bf16 (7 stored mantissa bits, ulp 2^-7 at 1): one rounding goes
        // up; rounding the delta first (2^-8 + 2^-20 → 2^-8) makes a tie that rounds to even.
        let w = [1.0f32];
        let d = [2f32.powi(-8) + 2f32.powi(-20)];
        let mut one = w;
        combine(DType::BF16, Combine::Add, &mut one, &d);
        let mut two = w;
        combine(DType::BF16, Combine::AddRounded, &mut two, &d);
        let mut b1 = [0u8; 2];
        let mut b2 = [0u8; 2];
        from_f32(DType::BF16, &one, &mut b1);
        from_f32(DType::BF16, &two, &mut b2);
        assert_eq!(u16::from_le_bytes(b1), 0x3F81);
        assert_eq!(u16::from_le_bytes(b2), 0x3F80);
    }

    #[test]
    fn dora_scales_rows_to_their_magnitude() {
        let mut w = vec![3.0f32, 0.0, 0.0, 1.0];
        dora_rows(&mut w, &[0.0, 4.0, 0.0, 0.0], 2, &[10.0, 2.0]);
        assert_eq!(w, vec![6.0, 8.0, 0.0, 2.0]);
    }
}
