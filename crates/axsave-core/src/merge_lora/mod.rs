//! `axsave merge-lora`: a PEFT LoRA adapter merged into its safetensors base in one streaming
//! pass, with PEFT's arithmetic and roundings ([`math`]), written with the same temp-and-rename
//! commit as saves.
//!
//! [`prepare`] reads and checks everything ([`config`], [`plan`]) before anything is written;
//! [`merge_local`] writes in this process alone, [`ranks`] shares the tensors among ranks;
//! `write` streams each tensor: untouched and replaced tensors in chunks, merged weights in
//! row blocks, so memory stays at the adapter's `A`/`B` of one module plus a few MiB per
//! thread.

pub mod axolotl;
pub mod config;
pub mod math;
pub mod plan;
pub mod ranks;
pub mod write;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use axsave_formats::{Catalog, st_reader};

use crate::axolotl::Extras;
use crate::axolotl::extras::{Extra, find_tokenizer};
use crate::error::{CoreError, Result};
use crate::layout::{Layout, LayoutOptions, plan_layout};
use crate::output::{self, OutputFiles};
use config::AdapterConfig;
use plan::MergePlan;
pub use write::{WriteAt, write_tensors};

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
///
/// The same process safety as a save ([`crate::save::save_local`]): the run is registered for
/// the signal backstop ([`crate::interrupt`]) and cancelled by a signal, the output lock
/// ([`crate::lock`]) is held to the end of the commit, and the temporaries of dead earlier
/// runs are removed (and reported) before anything is written.
pub fn merge_local(p: &Prepared, opts: &MergeOptions, written: &AtomicU64) -> Result<MergeReport> {
    let start = Instant::now();
    let guard = crate::interrupt::register_run(&opts.output, &opts.tag)?;
    let _lock = crate::lock::OutputLock::acquire(&opts.output, &opts.tag)?;
    let existing = crate::save::check_output(&opts.output, "model", opts.force)?;
    for m in output::sweep_stale_temps(&opts.output, &opts.tag).messages(&opts.output) {
        tracing::warn!("{m}");
    }
    let files = match OutputFiles::create(
        &opts.output,
        &p.layout,
        &opts.tag,
        opts.memory_budget,
        |_| true,
    ) {
        Ok(f) => f,
        Err(e) => {
            output::remove_temps(&opts.output, &p.layout.final_names(), &opts.tag);
            return Err(e);
        }
    };
    let cancel = crate::cancel::Cancel::new();
    crate::interrupt::watch(&cancel);
    let check = || -> Result<()> {
        if cancel.is_cancelled() {
            return Err(CoreError::Cancelled);
        }
        Ok(())
    };
    let result = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.workers.max(1))
        .build()
        .map_err(|e| CoreError::Merge(format!("cannot start {} threads: {e}", opts.workers)))
        .and_then(|pool| {
            crate::fault::point("merging", 0);
            pool.install(|| {
                let all: Vec<usize> = (0..p.layout.tensors.len()).collect();
                write_tensors(p, opts, &all, &files, written, &check)?;
                files.sync()
            })
        });
    if let Err(e) = result {
        files.discard();
        return Err(match (e, crate::interrupt::received()) {
            (CoreError::Cancelled, Some(signal)) => CoreError::Interrupted { signal },
            (e, _) => e,
        });
    }
    drop(files);
    guard
        .commit(|| commit(p, opts, &existing, start))
        .inspect_err(|_| output::remove_run_temps(&opts.output, &opts.tag))
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
    let removed = crate::finalize::finalize(&opts.output, &p.layout, &opts.tag, &extras, existing)?;
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

/// The default output directory of a merge from an Axolotl config: `output_dir/merged`.
pub fn merged_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("merged")
}
