//! The subcommands, each a thin layer over the library crates.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use std::time::Duration;

use anyhow::{Context, Result};
use axsave_core::distributed::{self, DistOptions, Progress as DistProgress, sha256_file};
use axsave_core::save::{SaveOptions, save_local};
use axsave_core::size::{human, parse_size};
use axsave_formats::detect;

use axsave_core::gpu::{LocalGpu, local_caps as local_gpu_caps};
use axsave_core::transport::{Transport, select};

use crate::cli::{GpuBenchArgs, InspectArgs, SaveArgs, VerifyArgs};
use crate::progress::Progress;
use crate::resolve::{Resolved, resolve_save};
use crate::transport;

/// Appends a formatted line to a `String` (writing to a `String` cannot fail).
macro_rules! outln {
    ($o:expr) => {
        $o.push('\n')
    };
    ($o:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($o, $($arg)*);
    }};
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn print_stdout(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

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
    let mut world = axsave_dist::detect_from_process_env()?;
    world.log_detected();
    let started = std::time::Instant::now();
    let r = resolve_save(a, world.rank == 0)?;
    if world.rank == 0 {
        for n in &r.notes {
            tracing::info!("{n}");
        }
        for w in &r.warnings {
            tracing::warn!("{w}");
        }
    }
    if a.dry_run {
        // A plan needs no other rank: rank 0 prints it, the others have nothing to do.
        return if world.rank == 0 { dry_run(&r) } else { Ok(()) };
    }
    let workers = a.workers.unwrap_or_else(default_workers);
    if world.world_size == 1 {
        return save_alone(a, &r, workers, &world, started);
    }
    let _span = tracing::info_span!("rank", r = world.rank).entered();
    let use_mpi = transport::wants_mpi(r.transport, world.launcher);
    let ready = transport::setup(
        use_mpi,
        &mut world,
        Duration::from_secs(r.timeout.max(1)),
        Duration::from_secs(a.rendezvous_timeout.max(1)),
    )?;
    let opts = DistOptions {
        source: r.source.clone(),
        output: r.output.clone(),
        layout: r.layout.clone(),
        mode: r.mode,
        memory_budget: r.memory_budget,
        force: a.force,
        workers,
        timeout: Duration::from_secs(r.timeout.max(1)),
        rendezvous_timeout: Duration::from_secs(a.rendezvous_timeout.max(1)),
        checksums: a.json,
        fingerprint: fingerprint(a, &r),
        extras: r.extras.clone(),
        transport: r.transport,
        device: a.device,
        mpi_available: ready.net.is_mpi(),
    };
    if world.rank == 0 {
        tracing::info!(
            "{} ranks ({}), {} mode",
            world.world_size,
            world.launcher,
            r.mode.as_str()
        );
    }
    let progress = Arc::new(DistProgress::default());
    let display = (world.rank == 0).then(|| Progress::start_dist(progress.clone(), a.quiet));
    let result = distributed::run(&world, &opts, progress, ready.net.clone());
    if let Some(d) = display {
        d.finish();
    }
    if let Err(e) = &result {
        ready.fail(e);
    }
    let Some(report) = result? else {
        // Each rank removes its own view of the source when it is not shared.
        if r.cleanup {
            cleanup(&r, &world)?;
        }
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
    for x in &report.replaced {
        tracing::info!("removed {x} of the model this save replaced");
    }
    let data_files = report
        .files
        .iter()
        .filter(|f| f.path.to_string_lossy().ends_with(".safetensors"))
        .count();
    tracing::info!(
        "wrote {} tensors, {} in {} file{} to {} in {:.2}s ({}/s); {} crossed the network",
        report.tensors,
        human(report.bytes),
        data_files,
        if data_files == 1 { "" } else { "s" },
        r.output.display(),
        report.seconds,
        human((report.bytes as f64 / report.seconds.max(1e-9)) as u64),
        human(report.network_bytes),
    );
    if r.cleanup && (report.shared_source || world.rank == 0) {
        cleanup(&r, &world)?;
    }
    if a.json {
        let summary = serde_json::json!({
            "output": r.output,
            "files": report.files,
            "tensors": report.tensors,
            "bytes": report.bytes,
            "dtype": dtype_summary(&report.dtypes),
            "format": report.format,
            "seconds": report.seconds,
            "network_bytes": report.network_bytes,
            "transport": report.transport.as_str(),
            "mode": report.mode.as_str(),
            "world_size": report.world_size,
            "launcher": world.launcher.to_string(),
        });
        print_stdout(&format!("{}\n", serde_json::to_string_pretty(&summary)?))?;
    }
    Ok(())
}

/// `--cleanup`: this rank's view of the source, once the save is committed.
fn cleanup(r: &Resolved, world: &axsave_dist::World) -> Result<()> {
    let src = axsave_core::distributed::inventory::expand_source(
        &r.source,
        world.rank,
        world.local_rank,
        world.node_rank,
    )?;
    let src = std::path::Path::new(&src);
    if src.exists() {
        for removed in axsave_core::axolotl::cleanup_source(src, &r.output)? {
            tracing::info!("cleanup: removed {removed}");
        }
    }
    Ok(())
}

/// `--dry-run`: what would be read and written.
fn dry_run(r: &Resolved) -> Result<()> {
    let source = std::path::PathBuf::from(&r.source);
    let catalog = detect::open(&source)?;
    let layout = axsave_core::layout::plan_layout(&catalog, &r.layout)?;
    let mut o = String::new();
    outln!(o, "dry run: nothing is written");
    outln!(
        o,
        "source:  {} ({}, {} tensors, {})",
        source.display(),
        catalog.format,
        catalog.tensors.len(),
        human(catalog.total_bytes())
    );
    outln!(
        o,
        "output:  {} ({} tensors, {}, dtype {})",
        r.output.display(),
        layout.tensors.len(),
        human(layout.total_size),
        r.layout.dtype.as_str()
    );
    outln!(o, "mode:    {}", r.mode.as_str());
    for f in &layout.files {
        outln!(
            o,
            "  would write {} ({} bytes, {} tensors)",
            f.name,
            f.size,
            f.tensors.len()
        );
    }
    if let Some(name) = layout.index_name() {
        outln!(o, "  would write {name}");
    }
    for (name, from) in r.extras.sources() {
        outln!(o, "  would write {name} (from {from})");
    }
    let existing = axsave_core::output::existing_model_files(&r.output, &r.layout.stem)?;
    if !existing.is_empty() {
        outln!(
            o,
            "  {} already holds {} (a save would need --force)",
            r.output.display(),
            existing.join(", ")
        );
    }
    if r.cleanup {
        outln!(
            o,
            "cleanup: would remove {} after success",
            source.display()
        );
    }
    print_stdout(&o)
}

/// Whether one process converts on a GPU: with `--transport nccl` it must (no GPU fails at
/// once), with `auto` it does when it can (NCCL itself is not needed without peers), with
/// `tcp`/`mpi` it does not. Returns the GPU and its description.
fn single_process_gpu(
    a: &SaveArgs,
    r: &Resolved,
    world: &axsave_dist::World,
) -> Result<Option<(LocalGpu, String)>> {
    if !r.transport.wants_gpu() {
        return Ok(None);
    }
    let mut caps = local_gpu_caps(r.transport, a.device, world.local_rank);
    if caps.gpu.is_ok() {
        caps.nccl = Ok("not needed by one process".into());
    }
    let choice = select(r.transport, std::slice::from_ref(&caps), false).map_err(GpuUnavailable)?;
    match (choice.transport, caps.gpu) {
        (Transport::Nccl, Ok(desc)) => Ok(Some((
            LocalGpu {
                device: a.device,
                timeout: Duration::from_secs(r.timeout.max(1)),
            },
            desc,
        ))),
        (_, gpu) => {
            if let Err(why) = gpu {
                tracing::debug!("no GPU ({why}): converting on the CPU");
            }
            Ok(None)
        }
    }
}

/// `--transport nccl` where there is no GPU (or no NCCL): exit 1 with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GpuUnavailable(pub String);

/// One process, no rendezvous.
fn save_alone(
    a: &SaveArgs,
    r: &Resolved,
    workers: usize,
    world: &axsave_dist::World,
    started: std::time::Instant,
) -> Result<()> {
    let gpu = single_process_gpu(a, r, world)?;
    if let Some((_, desc)) = &gpu {
        tracing::info!("GPU {desc}: conversions on the GPU");
    }
    let gpu_name = gpu.as_ref().map(|(_, d)| d.clone());
    let opts = SaveOptions {
        output: r.output.clone(),
        layout: r.layout.clone(),
        memory_budget: r.memory_budget,
        force: a.force,
        workers,
        tag: run_tag(),
        extras: r.extras.clone(),
        gpu: gpu.map(|(g, _)| g),
    };
    let source = std::path::Path::new(&r.source);
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
    for x in &report.replaced {
        tracing::info!("removed {x} of the model this save replaced");
    }
    tracing::info!(
        "wrote {} tensors, {} in {} file{} to {} in {:.2}s ({}/s)",
        report.tensors,
        human(report.bytes),
        layout.files.len(),
        if layout.files.len() == 1 { "" } else { "s" },
        r.output.display(),
        report.seconds,
        human((report.bytes as f64 / report.seconds.max(1e-9)) as u64)
    );
    if r.cleanup {
        cleanup(r, world)?;
    }
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
            "output": r.output,
            "files": files,
            "tensors": report.tensors,
            "bytes": report.bytes,
            "dtype": dtype_summary(&dtypes),
            "format": catalog.format.to_string(),
            "seconds": started.elapsed().as_secs_f64(),
            "network_bytes": 0,
            "transport": "none",
            "gpu": gpu_name,
            "mode": "gather",
            "world_size": 1,
            "launcher": world.launcher.to_string(),
        });
        print_stdout(&format!("{}\n", serde_json::to_string_pretty(&summary)?))?;
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

/// A digest of what every rank must agree on: what and where to save, and how.
fn fingerprint(a: &SaveArgs, r: &Resolved) -> String {
    let key = format!(
        "{}|{}|{:?}|{:?}|{}|{}|{:?}",
        r.source,
        r.output.display(),
        r.layout,
        r.mode,
        a.force,
        r.cleanup,
        r.transport
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
        return print_stdout(&format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    let mut o = String::new();
    outln!(o, "format:       {}", c.format);
    if let Some(r) = c.writer_ranks {
        outln!(o, "written by:   {r} rank{}", if r == 1 { "" } else { "s" });
    }
    outln!(o, "files:        {}", c.files.len());
    outln!(o, "tensors:      {}", c.tensors.len());
    outln!(
        o,
        "total:        {} ({} bytes)",
        human(c.total_bytes()),
        c.total_bytes()
    );
    if !c.skipped.is_empty() {
        outln!(
            o,
            "non-tensors:  {} skipped ({})",
            c.skipped.len(),
            c.skipped.join(", ")
        );
    }
    for n in &c.notes {
        outln!(o, "note:         {n}");
    }
    outln!(o);
    let width = c
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    outln!(
        o,
        "{:<width$}  {:<7}  {:<20}  {:>6}  {:>12}",
        "name",
        "dtype",
        "shape",
        "pieces",
        "bytes"
    );
    for t in &c.tensors {
        outln!(
            o,
            "{:<width$}  {:<7}  {:<20}  {:>6}  {:>12}",
            t.name,
            t.dtype.to_string(),
            format!("{:?}", t.shape),
            t.pieces.len(),
            t.nbytes()
        );
    }
    print_stdout(&o)
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

/// `axsave gpu-bench` (hidden): bandwidth of the transfers and conversions the GPU executor
/// makes, on this machine's GPU.
pub fn gpu_bench(a: &GpuBenchArgs) -> Result<()> {
    let bytes = size_arg("--bytes", &a.bytes)?;
    #[cfg(feature = "cuda")]
    {
        let (device, rows) = axsave_core::gpu::bench::run(bytes as usize, a.device)?;
        if a.json {
            let v = serde_json::json!({ "device": device, "rows": rows });
            return print_stdout(&format!("{}\n", serde_json::to_string_pretty(&v)?));
        }
        let mut o = String::new();
        outln!(
            o,
            "GPU {device}, {} per measurement (best of several)",
            human(bytes)
        );
        outln!(o, "{:<58} {:>10} {:>10}", "", "GB/s", "ms");
        for r in rows {
            if r.bytes == 0 {
                outln!(o, "{}", r.what);
            } else {
                outln!(
                    o,
                    "{:<58} {:>10.1} {:>10.2}",
                    r.what,
                    r.gb_per_s,
                    r.seconds * 1e3
                );
            }
        }
        print_stdout(&o)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (bytes, a.device, a.json);
        Err(
            GpuUnavailable("this axsave was built without CUDA (cargo feature `cuda`)".into())
                .into(),
        )
    }
}
