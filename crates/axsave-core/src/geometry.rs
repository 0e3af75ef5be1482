//! The arithmetic of copying a stored piece into its place in an output tensor.
//!
//! A piece is a box of a tensor (a flat element range is treated as a box of the tensor seen as
//! one dimension), stored with some strides. To bound memory it is processed in *sub-boxes*
//! whose stored bytes fit a chunk; each sub-box is read with one positioned read, gathered to
//! row-major order if its storage is not, converted, and written as *runs*: the contiguous
//! stretches of the output tensor it covers.

use axsave_formats::{Piece, Region};

/// A piece's place in its tensor, in the (possibly one-dimensional) view both share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// The tensor's shape in this view.
    pub shape: Vec<u64>,
    /// Where the piece starts, per dimension.
    pub offsets: Vec<u64>,
    /// The piece's extent, per dimension.
    pub sizes: Vec<u64>,
    /// The stored strides, in elements, per dimension.
    pub strides: Vec<u64>,
}

impl Geometry {
    /// The geometry of `piece` in a tensor of `shape`.
    pub fn of(piece: &Piece, shape: &[u64]) -> Geometry {
        let strides = piece.strides.iter().map(|&s| s.max(0) as u64).collect();
        match &piece.region {
            Region::Box { offsets, sizes } => Geometry {
                shape: shape.to_vec(),
                offsets: offsets.clone(),
                sizes: sizes.clone(),
                strides,
            },
            Region::Flat { start, len } => Geometry {
                shape: vec![shape.iter().product()],
                offsets: vec![*start],
                sizes: vec![*len],
                strides,
            },
        }
    }
}

/// A part of a piece, relative to the piece's own first element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubBox {
    /// First index per dimension, relative to the piece.
    pub offsets: Vec<u64>,
    /// Extent per dimension.
    pub sizes: Vec<u64>,
}

impl SubBox {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.sizes.iter().product()
    }

    /// The stored elements it touches: `(first, count)` in elements from the piece's first
    /// stored element, `count` spanning gaps if the strides leave any.
    pub fn span(&self, strides: &[u64]) -> (u64, u64) {
        if self.sizes.contains(&0) {
            return (0, 0);
        }
        let first: u64 = self.offsets.iter().zip(strides).map(|(o, s)| o * s).sum();
        let last: u64 = self
            .sizes
            .iter()
            .zip(strides)
            .map(|(n, s)| (n - 1) * s)
            .sum();
        (first, last + 1)
    }

    /// Whether its stored elements are in row-major order without gaps.
    pub fn is_contiguous(&self, strides: &[u64]) -> bool {
        let mut expected = 1u64;
        for (&n, &s) in self.sizes.iter().zip(strides).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected *= n;
        }
        true
    }
}

/// Splits a piece into sub-boxes whose stored span is at most `max_elems` elements (a single
/// element is always allowed). Dimensions are split from the one with the largest stride, so
/// each sub-box's span stays compact whatever the strides, and sub-boxes come in increasing
/// stored order (which a forward-only decoder needs).
pub fn split(g: &Geometry, max_elems: u64) -> Vec<SubBox> {
    let n = g.sizes.len();
    let whole = SubBox {
        offsets: vec![0; n],
        sizes: g.sizes.clone(),
    };
    if g.sizes.contains(&0) {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).filter(|&d| g.sizes[d] > 1).collect();
    order.sort_by(|&a, &b| g.strides[b].cmp(&g.strides[a]).then(a.cmp(&b)));
    let mut out = Vec::new();
    split_rec(whole, &order, &g.strides, max_elems.max(1), &mut out);
    out
}

fn split_rec(b: SubBox, order: &[usize], strides: &[u64], max: u64, out: &mut Vec<SubBox>) {
    if b.span(strides).1 <= max || order.is_empty() {
        out.push(b);
        return;
    }
    let d = order[0];
    // The span of a slab of k indices along d is (k - 1) · stride_d plus the span of one index.
    let mut one = b.clone();
    one.sizes[d] = 1;
    let one_span = one.span(strides).1;
    let k = if one_span > max || strides[d] == 0 {
        1
    } else {
        ((max - one_span) / strides[d] + 1).max(1)
    };
    let mut i = 0;
    while i < b.sizes[d] {
        let take = k.min(b.sizes[d] - i);
        let mut s = b.clone();
        s.offsets[d] = b.offsets[d] + i;
        s.sizes[d] = take;
        if take == 1 && one_span > max {
            split_rec(s, &order[1..], strides, max, out);
        } else {
            out.push(s);
        }
        i += take;
    }
}

/// The runs a sub-box covers in the output tensor, in the sub-box's row-major order:
/// `(first element in the tensor, number of elements)`.
pub fn runs(g: &Geometry, b: &SubBox) -> Vec<(u64, u64)> {
    let n = g.shape.len();
    if n == 0 {
        return vec![(0, 1)];
    }
    if b.sizes.contains(&0) {
        return Vec::new();
    }
    let abs: Vec<u64> = (0..n).map(|d| g.offsets[d] + b.offsets[d]).collect();
    // Row-major strides of the output tensor.
    let mut t = vec![1u64; n];
    for d in (0..n - 1).rev() {
        t[d] = t[d + 1] * g.shape[d + 1];
    }
    // Trailing dimensions the sub-box covers fully merge into one run.
    let mut k = n - 1;
    while k > 0 && b.sizes[k] == g.shape[k] {
        k -= 1;
    }
    let run_len = b.sizes[k] * t[k];
    let outer: u64 = b.sizes[..k].iter().product();
    let mut out = Vec::with_capacity(outer as usize);
    let mut idx = vec![0u64; k];
    for _ in 0..outer {
        let mut off = abs[k] * t[k];
        for d in 0..k {
            off += (abs[d] + idx[d]) * t[d];
        }
        out.push((off, run_len));
        for d in (0..k).rev() {
            idx[d] += 1;
            if idx[d] < b.sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Copies the elements of a sub-box from `src` (its stored span, starting at its first stored
/// element) to `dst` in row-major order. `es` is the element size in bytes.
pub fn gather(b: &SubBox, strides: &[u64], es: usize, src: &[u8], dst: &mut [u8]) {
    let n = b.sizes.len();
    if n == 0 {
        dst[..es].copy_from_slice(&src[..es]);
        return;
    }
    let inner = b.sizes[n - 1] as usize;
    let inner_stride = strides[n - 1] as usize * es;
    let outer: u64 = b.sizes[..n - 1].iter().product();
    let mut idx = vec![0u64; n - 1];
    let mut w = 0usize;
    for _ in 0..outer {
        let base: u64 = idx.iter().zip(strides).map(|(i, s)| i * s).sum::<u64>() * es as u64;
        let base = base as usize;
        if inner_stride == es {
            let len = inner * es;
            dst[w..w + len].copy_from_slice(&src[base..base + len]);
            w += len;
        } else {
            for j in 0..inner {
                let at = base + j * inner_stride;
                dst[w..w + es].copy_from_slice(&src[at..at + es]);
                w += es;
            }
        }
        for d in (0..n - 1).rev() {
            idx[d] += 1;
            if idx[d] < b.sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(shape: &[u64], offsets: &[u64], sizes: &[u64], strides: &[u64]) -> Geometry {
        Geometry {
            shape: shape.to_vec(),
            offsets: offsets.to_vec(),
            sizes: sizes.to_vec(),
            strides: strides.to_vec(),
        }
    }

    /// Every element of the piece lands exactly once, at the right place, whatever the chunk.
    fn check_covers(g: &Geometry, max: u64) {
        let subs = split(g, max);
        let numel: u64 = g.shape.iter().product();
        let mut hits = vec![0u32; numel as usize];
        for b in &subs {
            assert!(
                b.span(&g.strides).1 <= max.max(1) || b.numel() == 1,
                "{b:?}"
            );
            let mut count = 0;
            for (off, len) in runs(g, b) {
                for e in off..off + len {
                    hits[e as usize] += 1;
                }
                count += len;
            }
            assert_eq!(count, b.numel());
        }
        // The hit elements form exactly the piece's box.
        let n = g.shape.len();
        for (e, &h) in hits.iter().enumerate() {
            let mut rem = e as u64;
            let mut inside = true;
            for d in (0..n).rev() {
                let i = rem % g.shape[d];
                rem /= g.shape[d];
                inside &= i >= g.offsets[d] && i < g.offsets[d] + g.sizes[d];
            }
            assert_eq!(h, inside as u32, "element {e}");
        }
    }

    #[test]
    fn splits_cover_every_element_once() {
        for max in [1, 2, 3, 5, 7, 12, 100] {
            check_covers(&geom(&[5, 3], &[0, 0], &[5, 3], &[3, 1]), max);
            check_covers(&geom(&[13, 8], &[7, 0], &[6, 8], &[8, 1]), max);
            check_covers(&geom(&[8, 12], &[0, 6], &[8, 6], &[6, 1]), max);
            check_covers(&geom(&[4, 6, 5], &[2, 3, 0], &[2, 3, 5], &[15, 5, 1]), max);
            // Transposed storage.
            check_covers(&geom(&[4, 6], &[0, 0], &[4, 6], &[1, 4]), max);
        }
    }

    #[test]
    fn column_block_runs() {
        // Columns 6..12 of an 8x12 tensor: one run of 6 per row.
        let g = geom(&[8, 12], &[0, 6], &[8, 6], &[6, 1]);
        let b = SubBox {
            offsets: vec![0, 0],
            sizes: vec![8, 6],
        };
        let r = runs(&g, &b);
        assert_eq!(r.len(), 8);
        assert_eq!(r[0], (6, 6));
        assert_eq!(r[1], (18, 6));
    }

    #[test]
    fn gather_transposed() {
        // Storage of a 3x2 matrix [[0,1],[2,3],[4,5]] viewed transposed as 2x3 with strides (1, 2).
        let src: Vec<u8> = (0u8..6).collect();
        let b = SubBox {
            offsets: vec![0, 0],
            sizes: vec![2, 3],
        };
        let mut dst = vec![0u8; 6];
        gather(&b, &[1, 2], 1, &src, &mut dst);
        assert_eq!(dst, vec![0, 2, 4, 1, 3, 5]);
        assert!(!b.is_contiguous(&[1, 2]));
        assert!(b.is_contiguous(&[3, 1]));
    }

    #[test]
    fn scalar() {
        let g = geom(&[], &[], &[], &[]);
        let subs = split(&g, 1);
        assert_eq!(subs.len(), 1);
        assert_eq!(runs(&g, &subs[0]), vec![(0, 1)]);
    }
}
