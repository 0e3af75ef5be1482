//! `axsave merge-lora`: a PEFT LoRA adapter merged into its safetensors base in one streaming
//! pass, with PEFT's arithmetic and roundings ([`math`]), written with the same temp-and-rename
//! commit as saves.
//!
//! Memory: the adapter's `A`/`B` of one module at a time plus row blocks of one weight, sized
//! from the budget; untouched tensors are copied in chunks.

pub mod axolotl;
pub mod config;
pub mod math;
pub mod plan;
pub mod ranks;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axsave_formats::{Catalog, DType, st_reader};
use rayon::prelude::*;

use crate::axolotl::Extras;
use crate::axolotl::extras::{Extra, find_tokenizer};
use crate::error::{CoreError, Result};
use crate::layout::{Layout, LayoutOptions, OutTensor, plan_layout};
use crate::output::{self, OutputFiles};
use config::AdapterConfig;
use math::LowRank;
use plan::{LoraOp, MergePlan, Op};

/// What a merge needs to know.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// The base model: a directory with `model.safetensors` or shards + index.
    pub base: PathBuf,
    /// The adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    pub adapter: PathBuf,
    /// The output directory.
    pub output: PathBuf,
    /// Largest output file before splitting.
    pub max_shard_size: u64,
    /// Memory for row blocks and copy buffers, in bytes.
    pub memory_budget: u64,
    /// Replace a model already in the output directory.
    pub force: bool,
    /// Threads.
    pub workers: usize,
    /// Makes temporary names unique.
    pub tag: String,
}

/// What a finished merge wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MergeReport {
    /// Files written, with their sizes.
    pub files: Vec<(PathBuf, u64)>,
    /// Tensors written.
    pub tensors: usize,
    /// Tensors merged with a LoRA delta (weights and `lora_bias` biases).
    pub merged: usize,
    /// Tensors replaced by the adapter's copy (`modules_to_save`).
    pub replaced: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Files of an older model removed (`--force`).
    pub removed: Vec<String>,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Everything read and checked before anything is written.
pub struct Prepared {
    /// The base model.
    pub base: Catalog,
    /// The adapter's tensors.
    pub adapter: Catalog,
    /// The adapter's settings.
    pub config: AdapterConfig,
    /// The op of every base tensor.
    pub plan: MergePlan,
    /// The output layout (the base's names, dtypes and shapes).
    pub layout: Layout,
    /// `config.json`, `generation_config.json` and the tokenizer, copied as they are.
    pub extras: Extras,
}

/// Reads the base, the adapter and its config, and checks that they fit: every error here
/// names the tensor or the setting, and nothing has been written yet.
pub fn prepare(opts: &MergeOptions) -> Result<Prepared> {
    if !opts.base.exists() {
        return Err(CoreError::Merge(format!(
            "base model {} does not exist",
            opts.base.display()
        )));
    }
    let cfg_path = opts.adapter.join("adapter_config.json");
    if !cfg_path.is_file() {
        return Err(CoreError::Merge(format!(
            "{} has no adapter_config.json: not a PEFT adapter directory",
            opts.adapter.display()
        )));
    }
    let config = AdapterConfig::load(&cfg_path)?;
    let adapter_file = opts.adapter.join("adapter_model.safetensors");
    if !adapter_file.is_file() {
        return Err(CoreError::Merge(format!(
            "{} has no adapter_model.safetensors (a .bin adapter is not read)",
            opts.adapter.display()
        )));
    }
    let adapter = st_reader::read_model(&adapter_file)?;
    let base = st_reader::read_model(&opts.base)?;
    let plan = plan::plan(&base, &adapter, &config)?;
    let layout = plan_layout(
        &base,
        &LayoutOptions {
            max_shard_size: opts.max_shard_size,
            ..LayoutOptions::default()
        },
    )?;
    let base_dir = if opts.base.is_dir() {
        opts.base.clone()
    } else {
        base.root.clone()
    };
    let mut files = Vec::new();
    for f in ["config.json", "generation_config.json"] {
        let from = base_dir.join(f);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(|e| CoreError::io(&from, e))?;
            files.push(Extra {
                name: f.to_string(),
                bytes,
                from,
            });
        }
    }
    // A fine-tune that changed the tokenizer saved it beside the adapter.
    files.extend(find_tokenizer(&[opts.adapter.clone(), base_dir])?);
    Ok(Prepared {
        base,
        adapter,
        config,
        plan,
        layout,
        extras: Extras {
            files,
            ..Extras::default()
        },
    })
}

/// Merges in this process alone: checks everything, writes every file under a temporary name,
/// fsyncs, and renames into place; on failure the temporaries are removed.
pub fn merge_local(p: &Prepared, opts: &MergeOptions, written: &AtomicU64) -> Result<MergeReport> {
    let start = Instant::now();
    let existing = crate::save::check_output(&opts.output, "model", opts.force)?;
    let files = match OutputFiles::create(&opts.output, &p.layout, &opts.tag, |_| true) {
        Ok(f) => f,
        Err(e) => {
            output::remove_temps(&opts.output, &p.layout.final_names(), &opts.tag);
            return Err(e);
        }
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.workers.max(1))
        .build()
        .map_err(|e| CoreError::Merge(format!("cannot start {} threads: {e}", opts.workers)))?;
    let result = pool.install(|| {
        let all: Vec<usize> = (0..p.layout.tensors.len()).collect();
        write_tensors(p, opts, &all, &files, written, &|| Ok(()))?;
        files.sync()
    });
    if let Err(e) = result {
        files.discard();
        return Err(e);
    }
    drop(files);
    commit(p, opts, &existing, start)
}

/// Renders the files beside the weights and renames everything into place (the weights are
/// written and synced); on failure every temporary of the run is removed.
pub fn commit(
    p: &Prepared,
    opts: &MergeOptions,
    existing: &[String],
    start: Instant,
) -> Result<MergeReport> {
    let extras = match p.extras.render(&p.layout) {
        Ok(e) => e,
        Err(e) => {
            output::remove_run_temps(&opts.output, &opts.tag);
            return Err(e);
        }
    };
    let removed = crate::save::finalize(&opts.output, &p.layout, &opts.tag, &extras, existing)?;
    let mut out_files: Vec<(PathBuf, u64)> = p
        .layout
        .files
        .iter()
        .map(|f| (opts.output.join(&f.name), f.size))
        .collect();
    for name in p
        .layout
        .index_name()
        .into_iter()
        .chain(extras.iter().map(|(n, _)| n.clone()))
    {
        let path = opts.output.join(&name);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        out_files.push((path, size));
    }
    let (merged, replaced, _) = p.plan.counts();
    Ok(MergeReport {
        files: out_files,
        tensors: p.layout.tensors.len(),
        merged,
        replaced,
        bytes: p.layout.total_size,
        removed,
        seconds: start.elapsed().as_secs_f64(),
    })
}

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
    starts.par_iter().try_for_each(|&row0| {
        let n = rows_per_block.min(rows - row0);
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
        match &magnitude {
            Some(m) => math::dora_rows(&mut w, &delta, cols, &m[row0..row0 + n]),
            None => math::combine(out_dtype, op.combine, &mut w, &delta),
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

/// The default output directory of a merge from an Axolotl config: `output_dir/merged`.
pub fn merged_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("merged")
}
