//! Streaming the merged model into the output files: every tensor read once from the base (or
//! the adapter) and written once at its place in the layout.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use axsave_formats::{Catalog, DType};
use rayon::prelude::*;

use super::math::{self, LowRank};
use super::plan::{LoraOp, Op};
use super::{MergeOptions, Prepared};
use crate::error::{CoreError, Result};
use crate::layout::OutTensor;
use crate::output::OutputFiles;

/// Where merged bytes go: the output files under their temporary names.
pub trait WriteAt: Sync {
    /// Writes `data` at byte `offset` of layout file `file`.
    fn write_at(&self, file: usize, offset: u64, data: &[u8]) -> Result<()>;
}

impl WriteAt for OutputFiles {
    fn write_at(&self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        OutputFiles::write_at(self, file, offset, data)
    }
}

/// The open base and adapter files.
struct Io {
    base: Vec<(PathBuf, File)>,
    adapter: Vec<(PathBuf, File)>,
}

impl Io {
    fn open(p: &Prepared) -> Result<Io> {
        let open = |c: &Catalog| -> Result<Vec<(PathBuf, File)>> {
            c.files
                .iter()
                .map(|f| {
                    let path = c.root.join(&f.path);
                    let file = File::open(&path).map_err(|e| CoreError::io(&path, e))?;
                    Ok((path, file))
                })
                .collect()
        };
        Ok(Io {
            base: open(&p.base)?,
            adapter: open(&p.adapter)?,
        })
    }
}

/// Reads `len` bytes at byte `at` of tensor `ti`'s data in `catalog` (one whole piece, as the
/// safetensors reader gives).
fn read_tensor_bytes(
    catalog: &Catalog,
    files: &[(PathBuf, File)],
    ti: usize,
    at: u64,
    buf: &mut [u8],
) -> Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let t = &catalog.tensors[ti];
    let piece = t
        .pieces
        .first()
        .ok_or_else(|| CoreError::Merge(format!("tensor {} has no data to read", t.name)))?;
    let (path, f) = &files[piece.file];
    f.read_exact_at(buf, piece.offset + at)
        .map_err(|e| CoreError::io(path, e))
}

/// A whole adapter tensor as fp32.
fn adapter_f32(p: &Prepared, io: &Io, ai: usize) -> Result<Vec<f32>> {
    let t = &p.adapter.tensors[ai];
    let mut bytes = vec![0u8; t.nbytes() as usize];
    read_tensor_bytes(&p.adapter, &io.adapter, ai, 0, &mut bytes)?;
    let mut out = vec![0f32; t.numel() as usize];
    math::to_f32(t.dtype, &bytes, &mut out);
    Ok(out)
}

/// Writes the layout tensors `which` (indices into `p.layout.tensors`), calling `check`
/// between tensors (a multi-rank run stops there when another rank failed).
pub fn write_tensors(
    p: &Prepared,
    opts: &MergeOptions,
    which: &[usize],
    files: &dyn WriteAt,
    written: &AtomicU64,
    check: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let io = Io::open(p)?;
    // Blocks of a few MiB: large enough for long sequential I/O, small enough that the
    // allocator recycles them (fresh multi-MiB buffers per block cost page faults that took
    // most of the time).
    let block =
        (opts.memory_budget / (3 * opts.workers.max(1) as u64)).clamp(1 << 16, 4 << 20) as usize;
    for &i in which {
        check()?;
        write_tensor(p, &io, files, &p.layout.tensors[i], block, written)?;
    }
    Ok(())
}

fn write_tensor(
    p: &Prepared,
    io: &Io,
    files: &dyn WriteAt,
    t: &OutTensor,
    block: usize,
    written: &AtomicU64,
) -> Result<()> {
    let src = &p.base.tensors[t.source];
    match &p.plan.ops[t.source] {
        Op::Copy => {
            let chunks: Vec<u64> = (0..t.nbytes).step_by(block).collect();
            chunks.par_iter().try_for_each(|&at| {
                let len = (t.nbytes - at).min(block as u64) as usize;
                let mut buf = vec![0u8; len];
                read_tensor_bytes(&p.base, &io.base, t.source, at, &mut buf)?;
                files.write_at(t.file, t.offset + at, &buf)?;
                written.fetch_add(len as u64, Ordering::Relaxed);
                Ok(())
            })
        }
        Op::Replace(ai) => {
            // In chunks, converted on the way when the dtypes differ (loaded into the base's
            // module, `copy_` rounds to its dtype).
            let from = p.adapter.tensors[*ai].dtype;
            let (fs, ts) = (from.size() as u64, t.dtype.size() as u64);
            let per = (block as u64 / fs.max(ts)).max(1);
            let numel = t.nbytes / ts;
            let starts: Vec<u64> = (0..numel).step_by(per as usize).collect();
            starts.par_iter().try_for_each(|&e0| {
                let n = per.min(numel - e0);
                let mut raw = vec![0u8; (n * fs) as usize];
                read_tensor_bytes(&p.adapter, &io.adapter, *ai, e0 * fs, &mut raw)?;
                let out = if from == t.dtype {
                    raw
                } else {
                    let mut vals = vec![0f32; n as usize];
                    math::to_f32(from, &raw, &mut vals);
                    let mut out = vec![0u8; (n * ts) as usize];
                    math::from_f32(t.dtype, &vals, &mut out);
                    out
                };
                files.write_at(t.file, t.offset + e0 * ts, &out)?;
                written.fetch_add(out.len() as u64, Ordering::Relaxed);
                Ok(())
            })
        }
        Op::Bias(ai, scale) => {
            let lb = adapter_f32(p, io, *ai)?;
            let mut raw = vec![0u8; t.nbytes as usize];
            read_tensor_bytes(&p.base, &io.base, t.source, 0, &mut raw)?;
            let mut b = vec![0f32; lb.len()];
            math::to_f32(src.dtype, &raw, &mut b);
            let s = *scale as f32;
            for (b, l) in b.iter_mut().zip(&lb) {
                *b += *l * s;
            }
            math::from_f32(t.dtype, &b, &mut raw);
            files.write_at(t.file, t.offset, &raw)?;
            written.fetch_add(t.nbytes, Ordering::Relaxed);
            Ok(())
        }
        Op::Lora(op) => merge_weight(p, io, files, t, op, block, written),
    }
}

/// Merges one weight, row block by row block, in parallel.
fn merge_weight(
    p: &Prepared,
    io: &Io,
    files: &dyn WriteAt,
    t: &OutTensor,
    op: &LoraOp,
    block: usize,
    written: &AtomicU64,
) -> Result<()> {
    let a = adapter_f32(p, io, op.a)?;
    let b = adapter_f32(p, io, op.b)?;
    let magnitude = op.magnitude.map(|m| adapter_f32(p, io, m)).transpose()?;
    let (rows, cols) = (t.shape[0] as usize, t.shape[1] as usize);
    let lr = LowRank {
        b: &b,
        a: &a,
        rank: op.rank,
        rows,
        cols,
        transposed: op.transposed,
        scale: op.scale as f32,
    };
    // Where W's rows come from, and in which dtype they are stored.
    let (w_catalog, w_files, w_index) = match op.weight_from_adapter {
        Some(ai) => (&p.adapter, &io.adapter, ai),
        None => (&p.base, &io.base, t.source),
    };
    let w_dtype: DType = w_catalog.tensors[w_index].dtype;
    let out_dtype = t.dtype;
    let rows_per_block = (block / (cols.max(1) * 4)).max(1);
    let starts: Vec<usize> = (0..rows).step_by(rows_per_block).collect();
    // Rows `row0 .. row0 + n` of W (widened to fp32) and of the delta.
    let load = |row0: usize, n: usize| -> Result<(Vec<f32>, Vec<f32>)> {
        let mut raw = vec![0u8; n * cols * w_dtype.size()];
        read_tensor_bytes(
            w_catalog,
            w_files,
            w_index,
            (row0 * cols * w_dtype.size()) as u64,
            &mut raw,
        )?;
        let mut w = vec![0f32; n * cols];
        math::to_f32(w_dtype, &raw, &mut w);
        if w_dtype != out_dtype {
            // A `base_layer.weight` saved in another dtype is loaded into the base's.
            for x in w.iter_mut() {
                *x = math::round_trip(out_dtype, *x);
            }
        }
        let mut delta = vec![0f32; n * cols];
        lr.delta_rows(row0, n, &mut delta);
        Ok((w, delta))
    };
    // DoRA over a transposed weight needs every row before any is written: a first pass (in
    // row order) sums the squares of each column.
    let column_factor = match (&magnitude, op.transposed) {
        (Some(m), true) => {
            let mut acc = vec![0f32; cols];
            for &row0 in &starts {
                let n = rows_per_block.min(rows - row0);
                let (w, delta) = load(row0, n)?;
                math::dora_column_squares(&w, &delta, cols, &mut acc);
            }
            Some(
                acc.iter()
                    .zip(m)
                    .map(|(a, m)| *m / a.sqrt())
                    .collect::<Vec<f32>>(),
            )
        }
        _ => None,
    };
    starts.par_iter().try_for_each(|&row0| {
        let n = rows_per_block.min(rows - row0);
        let (mut w, delta) = load(row0, n)?;
        match (&magnitude, &column_factor) {
            (_, Some(f)) => math::dora_columns(&mut w, &delta, cols, f),
            (Some(m), None) => math::dora_rows(&mut w, &delta, cols, &m[row0..row0 + n]),
            (None, _) => math::combine(out_dtype, op.combine, &mut w, &delta),
        }
        let mut out = vec![0u8; n * cols * out_dtype.size()];
        math::from_f32(out_dtype, &w, &mut out);
        files.write_at(
            t.file,
            t.offset + (row0 * cols * out_dtype.size()) as u64,
            &out,
        )?;
        written.fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(())
    })
}
