//! A save in one process: catalog → layout → copy every piece → fsync → rename.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use axsave_formats::Catalog;

use crate::cancel::{Cancel, CancelReason};
use crate::error::{CoreError, Result};
use crate::execute::{self, CopyJob, ExecOptions, Task};
use crate::layout::{Layout, LayoutOptions, plan_layout};
use crate::output::{self, OutputFiles};
use crate::progress::{Phase, Progress};

// Re-exported where the distributed save has always found them.
pub use crate::finalize::finalize;
pub use crate::output::LocalSink;
use crate::sources::SourceFiles;

/// What a save needs to know.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// The output directory.
    pub output: PathBuf,
    /// How the output is shaped.
    pub layout: LayoutOptions,
    /// Memory the executor's buffers may use, in bytes.
    pub memory_budget: u64,
    /// Replace a model already in the output directory.
    pub force: bool,
    /// Worker threads for the copy.
    pub workers: usize,
    /// A tag that makes this run's temporary names unique.
    pub tag: String,
    /// Files written beside the weights (tokenizer, config).
    pub extras: crate::axolotl::Extras,
    /// Convert on this GPU (`None`: everything on the CPU).
    pub gpu: Option<crate::gpu::LocalGpu>,
}

/// What a finished save wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SaveReport {
    /// Files written (data files, then the index), with their sizes.
    pub files: Vec<(PathBuf, u64)>,
    /// Number of tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Files removed because `--force` replaced an older model.
    pub replaced: Vec<String>,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Every (tensor, piece) of the layout, in layout order.
pub fn all_tasks(catalog: &Catalog, layout: &Layout) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (oi, t) in layout.tensors.iter().enumerate() {
        for pi in 0..catalog.tensors[t.source].pieces.len() {
            tasks.push(Task { out: oi, piece: pi });
        }
    }
    tasks
}

/// Refuses to overwrite a model unless `force`; returns the existing model files.
pub fn check_output(dir: &Path, stem: &str, force: bool) -> Result<Vec<String>> {
    let existing = output::existing_model_files(dir, stem)?;
    if !existing.is_empty() && !force {
        return Err(CoreError::OutputExists {
            dir: dir.to_path_buf(),
            names: existing,
        });
    }
    Ok(existing)
}

/// Saves `catalog` into `opts.output` in this process alone.
pub fn save_local(
    catalog: &Catalog,
    opts: &SaveOptions,
    progress: &Progress,
) -> Result<(Layout, SaveReport)> {
    let start = Instant::now();
    let layout = plan_layout(catalog, &opts.layout)?;
    progress
        .total
        .store(crate::progress::total_bytes(&layout), Ordering::Relaxed);
    let written = &progress.done;
    let guard = crate::interrupt::register_run(&opts.output, &opts.tag)?;
    // Held until the end of the commit: a second save into this directory fails at once.
    let _lock = crate::lock::OutputLock::acquire(&opts.output, &opts.tag)?;
    let existing = check_output(&opts.output, &opts.layout.stem, opts.force)?;
    for m in output::sweep_stale_temps(&opts.output, &opts.tag).messages(&opts.output) {
        tracing::warn!("{m}");
    }
    let files = OutputFiles::create(&opts.output, &layout, &opts.tag, opts.memory_budget, |_| {
        true
    });
    let files = match files {
        Ok(f) => f,
        Err(e) => {
            output::remove_temps(&opts.output, &layout.final_names(), &opts.tag);
            return Err(e);
        }
    };
    // A signal cancels the copy (see `crate::interrupt`).
    let cancel = Cancel::new();
    crate::interrupt::watch(&cancel);
    let result = (|| {
        let copy_start = Instant::now();
        let sources = SourceFiles::new(catalog, &catalog.root);
        let tasks = all_tasks(catalog, &layout);
        let job = CopyJob {
            catalog,
            layout: &layout,
            sources: &sources,
            tasks: &tasks,
            opts: ExecOptions::for_budget(opts.memory_budget, opts.workers),
        };
        if let Some(g) = &opts.gpu {
            // The GPU executor with a plan of one rank that reads and writes everything.
            let readers = vec![vec![0]; catalog.files.len()];
            let plan =
                crate::plan::make_plan(catalog, &layout, &readers, 1, crate::plan::Mode::Gather)?;
            let work = crate::gpu::RankWork {
                catalog,
                local_on_gpu: true,
                layout: &layout,
                plan: &plan,
                sources: &sources,
                files: Some(&files),
                me: 0,
                sizing: crate::gpu::schedule::Sizing::for_budget(opts.memory_budget),
                // Half the budget is the GPU executor's pinned buffers; the CPU copies get
                // three quarters of the rest, the output writers an eighth of the whole.
                exec: ExecOptions::for_budget(opts.memory_budget / 2, opts.workers),
                written,
                cancel: cancel.flag(),
            };
            crate::gpu::run_single(work, g)?;
        } else {
            let sink_for = |_: &Task| {
                crate::fault::point("copying", 0);
                0
            };
            execute::run(
                job,
                &sink_for,
                &|_| Ok(LocalSink(&files)),
                written,
                cancel.flag(),
            )?;
        }
        let sync_start = Instant::now();
        progress.set_phase(Phase::Syncing {
            files: files.temp_paths().len() as u64,
        });
        files.sync()?;
        tracing::debug!(
            copy_s = (sync_start - copy_start).as_secs_f64(),
            fsync_s = sync_start.elapsed().as_secs_f64(),
            "copied and synced"
        );
        Ok(())
    })();
    if let Err(e) = result {
        files.discard();
        return Err(match (e, cancel.reason()) {
            (CoreError::Cancelled, Some(CancelReason::Signal(signal))) => {
                CoreError::Interrupted { signal }
            }
            (e, _) => e,
        });
    }
    let extras = match opts.extras.render(&layout) {
        Ok(e) => e,
        Err(e) => {
            files.discard();
            return Err(e);
        }
    };
    drop(files);
    progress.set_phase(Phase::Committing);
    let replaced = guard
        .commit(|| finalize(&opts.output, &layout, &opts.tag, &extras, &existing))
        .inspect_err(|_| output::remove_run_temps(&opts.output, &opts.tag))?;
    let report_files =
        crate::report::output_files(&opts.output, &layout, &extras, Vec::new(), false)?;
    let report = SaveReport {
        files: report_files.into_iter().map(|f| (f.path, f.size)).collect(),
        tensors: layout.tensors.len(),
        bytes: layout.total_size,
        replaced,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((layout, report))
}
