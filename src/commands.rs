//! The subcommands, each a thin layer over the library crates.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use std::time::Duration;

use anyhow::{Context, Result};
use axsave_core::distributed::{self, DistOptions, Progress as DistProgress, sha256_file};
use axsave_core::layout::LayoutOptions;
use axsave_core::plan::Mode;
use axsave_core::save::{SaveOptions, save_local};
use axsave_core::size::{human, parse_size};
use axsave_formats::detect;

use crate::cli::{InspectArgs, ModeArg, SaveArgs, VerifyArgs};
use crate::progress::Progress;

/// A mistake in how axsave was called (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn size_arg(flag: &str, value: &str) -> Result<u64> {
    parse_size(value).map_err(|e| UsageError(format!("{flag}: {e}")).into())
}

fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

/// A short random tag for temporary file names.
fn run_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:04x}", std::process::id(), nanos & 0xffff)
}

/// The default command: a save by this process alone, or this rank's part of a save by several.
pub fn save(a: &SaveArgs) -> Result<()> {
    let source: PathBuf = a
        .source
        .clone()
        .ok_or_else(|| UsageError("--source is required".into()))?;
    let output: PathBuf = a
        .output
        .clone()
        .ok_or_else(|| UsageError("--output is required".into()))?;
    let layout = LayoutOptions {
        dtype: a.dtype.into(),
        max_shard_size: size_arg("--max-shard-size", &a.max_shard_size)?,
        min_files: 1,
        stem: "model".into(),
    };
    let memory_budget = size_arg("--memory-budget", &a.memory_budget)?;
    let workers = a.workers.unwrap_or_else(default_workers);
    let world = axsave_dist::detect_from_process_env()?;
    world.log_detected();
    let started = std::time::Instant::now();
    if world.world_size == 1 {
        return save_alone(
            a,
            &source,
            &output,
            layout,
            memory_budget,
            workers,
            &world,
            started,
        );
    }
    let _span = tracing::info_span!("rank", r = world.rank).entered();
    let mode = match a.mode {
        ModeArg::Gather => Mode::Gather,
        ModeArg::Sharded => Mode::Sharded,
    };
    let opts = DistOptions {
        source: source.to_string_lossy().into_owned(),
        output: output.clone(),
        layout,
        mode,
        memory_budget,
        force: a.force,
        workers,
        timeout: Duration::from_secs(a.timeout.max(1)),
        rendezvous_timeout: Duration::from_secs(a.rendezvous_timeout.max(1)),
        checksums: a.json,
        fingerprint: fingerprint(a),
    };
    if world.rank == 0 {
        tracing::info!(
            "{} ranks ({}), {} mode over tcp",
            world.world_size,
            world.launcher,
            mode.as_str()
        );
    }
    let progress = Arc::new(DistProgress::default());
    let display = (world.rank == 0).then(|| Progress::start_dist(progress.clone(), a.quiet));
    let result = distributed::run(&world, &opts, progress);
    if let Some(d) = display {
        d.finish();
    }
    let Some(report) = result? else {
        return Ok(());
    };
    for n in &report.notes {
        tracing::info!("{n}");
    }
    if !report.left_out.is_empty() {
        tracing::info!(
            "left out {} tensors outside the `model` entry (e.g. {})",
            report.left_out.len(),
            report.left_out[0]
        );
    }
    for r in &report.replaced {
        tracing::info!("removed {r} of the model this save replaced");
    }
    let data_files = report
        .files
        .iter()
        .filter(|f| !f.path.to_string_lossy().ends_with(".json"))
        .count();
    tracing::info!(
        "wrote {} tensors, {} in {} file{} to {} in {:.2}s ({}/s); {} crossed the network",
        report.tensors,
        human(report.bytes),
        data_files,
        if data_files == 1 { "" } else { "s" },
        output.display(),
        report.seconds,
        human((report.bytes as f64 / report.seconds.max(1e-9)) as u64),
        human(report.network_bytes),
    );
    if a.json {
        let summary = serde_json::json!({
            "output": output,
            "files": report.files,
            "tensors": report.tensors,
            "bytes": report.bytes,
            "dtype": dtype_summary(&report.dtypes),
            "format": report.format,
            "seconds": report.seconds,
            "network_bytes": report.network_bytes,
            "transport": "tcp",
            "mode": report.mode.as_str(),
            "world_size": report.world_size,
            "launcher": world.launcher.to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// One process, no rendezvous.
#[allow(clippy::too_many_arguments)]
fn save_alone(
    a: &SaveArgs,
    source: &std::path::Path,
    output: &std::path::Path,
    layout: LayoutOptions,
    memory_budget: u64,
    workers: usize,
    world: &axsave_dist::World,
    started: std::time::Instant,
) -> Result<()> {
    let opts = SaveOptions {
        output: output.to_path_buf(),
        layout,
        memory_budget,
        force: a.force,
        workers,
        tag: run_tag(),
    };
    let catalog = detect::open(source)?;
    tracing::info!(
        "{}: {} ({} tensors, {}{})",
        source.display(),
        catalog.format,
        catalog.tensors.len(),
        human(catalog.total_bytes()),
        catalog
            .writer_ranks
            .map(|r| format!(", written by {r} rank{}", if r == 1 { "" } else { "s" }))
            .unwrap_or_default()
    );
    for n in &catalog.notes {
        tracing::info!("{n}");
    }
    let counter = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(counter.clone(), catalog.total_bytes(), a.quiet);
    let result = save_local(&catalog, &opts, &counter);
    progress.finish();
    let (layout, report) = result?;
    if !layout.left_out.is_empty() {
        tracing::info!(
            "left out {} tensors outside the `model` entry (e.g. {})",
            layout.left_out.len(),
            layout.left_out[0]
        );
    }
    for r in &report.replaced {
        tracing::info!("removed {r} of the model this save replaced");
    }
    tracing::info!(
        "wrote {} tensors, {} in {} file{} to {} in {:.2}s ({}/s)",
        report.tensors,
        human(report.bytes),
        layout.files.len(),
        if layout.files.len() == 1 { "" } else { "s" },
        output.display(),
        report.seconds,
        human((report.bytes as f64 / report.seconds.max(1e-9)) as u64)
    );
    if a.json {
        let mut files = Vec::new();
        for (p, size) in &report.files {
            files.push(serde_json::json!({"path": p, "size": size, "sha256": sha256_file(p)?}));
        }
        let mut dtypes: Vec<(axsave_formats::DType, usize)> = Vec::new();
        for t in &layout.tensors {
            match dtypes.iter_mut().find(|(d, _)| *d == t.dtype) {
                Some((_, c)) => *c += 1,
                None => dtypes.push((t.dtype, 1)),
            }
        }
        let summary = serde_json::json!({
            "output": output,
            "files": files,
            "tensors": report.tensors,
            "bytes": report.bytes,
            "dtype": dtype_summary(&dtypes),
            "format": catalog.format.to_string(),
            "seconds": started.elapsed().as_secs_f64(),
            "network_bytes": 0,
            "transport": "none",
            "mode": "gather",
            "world_size": 1,
            "launcher": world.launcher.to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// `{"BF16": 20, "I64": 1}`: how many tensors of each output dtype.
fn dtype_summary(d: &[(axsave_formats::DType, usize)]) -> serde_json::Value {
    serde_json::Value::Object(
        d.iter()
            .map(|(t, n)| (t.to_string(), serde_json::Value::from(*n)))
            .collect(),
    )
}

/// A digest of the arguments every rank must agree on (what and where to save, and how).
fn fingerprint(a: &SaveArgs) -> String {
    let key = format!(
        "{:?}|{:?}|{:?}|{}|{:?}|{}|{:?}",
        a.source, a.output, a.dtype, a.max_shard_size, a.mode, a.force, a.transport
    );
    let mut h = crc32fast::Hasher::new();
    h.update(key.as_bytes());
    format!("{:08x}", h.finalize())
}

/// `axsave inspect`.
pub fn inspect(a: &InspectArgs) -> Result<()> {
    let c = detect::open(&a.source)?;
    if a.json {
        let tensors: Vec<_> = c
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": t.shape,
                    "bytes": t.nbytes(),
                    "pieces": t.pieces.iter().map(|p| serde_json::json!({
                        "region": p.region,
                        "file": c.files[p.file].path,
                        "offset": p.offset,
                        "strides": p.strides,
                        "stored_dtype": p.stored_dtype,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "format": c.format,
            "format_name": c.format.to_string(),
            "writer_ranks": c.writer_ranks,
            "files": c.files,
            "total_bytes": c.total_bytes(),
            "tensors": tensors,
            "skipped": c.skipped,
            "notes": c.notes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("format:       {}", c.format);
    if let Some(r) = c.writer_ranks {
        println!("written by:   {r} rank{}", if r == 1 { "" } else { "s" });
    }
    println!("files:        {}", c.files.len());
    println!("tensors:      {}", c.tensors.len());
    println!(
        "total:        {} ({} bytes)",
        human(c.total_bytes()),
        c.total_bytes()
    );
    if !c.skipped.is_empty() {
        println!(
            "non-tensors:  {} skipped ({})",
            c.skipped.len(),
            c.skipped.join(", ")
        );
    }
    for n in &c.notes {
        println!("note:         {n}");
    }
    println!();
    let width = c
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:<7}  {:<20}  {:>6}  {:>12}",
        "name", "dtype", "shape", "pieces", "bytes"
    );
    for t in &c.tensors {
        println!(
            "{:<width$}  {:<7}  {:<20}  {:>6}  {:>12}",
            t.name,
            t.dtype.to_string(),
            format!("{:?}", t.shape),
            t.pieces.len(),
            t.nbytes()
        );
    }
    Ok(())
}

/// `axsave verify`.
pub fn verify(a: &VerifyArgs) -> Result<()> {
    let budget = size_arg("--memory-budget", &a.memory_budget)?;
    let c = detect::open(&a.source)?;
    let r = axsave_core::verify::verify(&c, &a.output, budget, default_workers()).with_context(
        || {
            format!(
                "{} does not match {}",
                a.output.display(),
                a.source.display()
            )
        },
    )?;
    tracing::info!(
        "ok: {} tensors in {} file{} match the source ({}{})",
        r.tensors,
        r.files,
        if r.files == 1 { "" } else { "s" },
        human(r.bytes),
        if r.converted > 0 {
            format!(", {} converted before comparing", r.converted)
        } else {
            String::new()
        }
    );
    Ok(())
}
