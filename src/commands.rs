//! The subcommands, each a thin layer over the library crates.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use std::time::Duration;

use anyhow::{Context, Result};
use axsave_core::axolotl::CleanupPlan;
use axsave_core::axolotl::resolve::{Resolved, resolve_save};
use axsave_core::distributed::{self, DistOptions, Progress as DistProgress};
use axsave_core::save::{SaveOptions, save_local};
use axsave_core::size::{human, parse_size};
use axsave_core::summary;
use axsave_formats::detect;

use axsave_core::gpu::alone::single_process_gpu;

use crate::cli::{GpuBenchArgs, InspectArgs, MergeLoraArgs, SaveArgs, VerifyArgs};
use crate::progress::Progress;
use axsave_core::bootstrap;

/// Prints `v` as pretty JSON on stdout.
fn print_json(v: &serde_json::Value) -> Result<()> {
    print_stdout(&format!("{}\n", serde_json::to_string_pretty(v)?))
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

/// A tag for temporary file names: owner, start time and random bits (see
/// `axsave_core::runtag`), so a later save can tell a dead run's leftovers.
fn run_tag() -> String {
    axsave_core::runtag::RunTag::new().to_string()
}

/// How long a save may take to cancel itself after SIGTERM, SIGINT or SIGHUP before the
/// signal thread removes the run's temporaries itself and exits (a second signal: at once).
const CANCEL_GRACE: Duration = Duration::from_secs(4);

/// SIGTERM, SIGINT and SIGHUP cancel the save (see `axsave_core::interrupt`): the save's error
/// path removes the temporaries and the process exits 128 + the signal number.
fn handle_signals() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot install the signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if axsave_core::interrupt::raise(sig) {
                    tracing::warn!(
                        "received {}: cancelling the save",
                        axsave_core::interrupt::signal_name(sig)
                    );
                    std::thread::spawn(move || {
                        std::thread::sleep(CANCEL_GRACE);
                        axsave_core::interrupt::abandon(sig)
                    });
                } else {
                    axsave_core::interrupt::abandon(sig);
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// The default command: a save by this process alone, or this rank's part of a save by several.
pub fn save(a: &SaveArgs) -> Result<()> {
    handle_signals()?;
    let mut world = axsave_dist::detect_from_process_env()?;
    world.log_detected();
    let started = std::time::Instant::now();
    let r = resolve_save(&a.flags, world.rank == 0)?;
    if world.rank == 0 {
        for n in &r.notes {
            tracing::info!("{n}");
        }
        for w in &r.warnings {
            tracing::warn!("{w}");
        }
    }
    // What --cleanup will remove, decided now: a conflict (the output inside the checkpoint,
    // a file as source) fails before anything is written, and --dry-run shows the same plan.
    let cleanup_plan = r.cleanup_plan(world.rank, world.local_rank, world.node_rank)?;
    if a.flags.dry_run {
        // A plan needs no other rank: rank 0 prints it, the others have nothing to do.
        return if world.rank == 0 {
            print_stdout(&summary::dry_run_text(&r, cleanup_plan.as_ref())?)
        } else {
            Ok(())
        };
    }
    let workers = a.workers.unwrap_or_else(default_workers);
    if world.world_size == 1 {
        return save_alone(a, &r, workers, &world, started, cleanup_plan.as_ref());
    }
    let _span = tracing::info_span!("rank", r = world.rank).entered();
    let use_mpi = bootstrap::wants_mpi(r.transport, world.launcher);
    let ready = bootstrap::setup(
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
        force: a.flags.force,
        workers,
        timeout: Duration::from_secs(r.timeout.max(1)),
        rendezvous_timeout: Duration::from_secs(a.rendezvous_timeout.max(1)),
        checksums: a.json,
        fingerprint: r.fingerprint(a.flags.force),
        extras: r.extras.clone(),
        transport: r.transport,
        device: a.flags.device,
        mpi_available: ready.net.is_mpi(),
        job_token: ready.job_token,
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
    let display = (world.rank == 0).then(|| Progress::start(progress.clone(), a.quiet));
    let result = distributed::run(&world, &opts, progress, ready.net.clone());
    if let Some(d) = display {
        d.finish();
    }
    if let Err(e) = &result {
        ready.fail(e);
    }
    let Some(report) = result? else {
        // Each rank removes its own view of the source when it is not shared.
        if let Some(p) = &cleanup_plan {
            cleanup(p)?;
        }
        return Ok(());
    };
    for n in &report.notes {
        tracing::info!("{n}");
    }
    log_left_out_and_replaced(&report.left_out, &report.replaced);
    let data_files = report
        .files
        .iter()
        .filter(|f| f.path.to_string_lossy().ends_with(".safetensors"))
        .count();
    tracing::info!(
        "{}; {} crossed the network",
        summary::wrote_line(
            report.tensors,
            report.bytes,
            data_files,
            &r.output,
            report.seconds
        ),
        human(report.network_bytes),
    );
    if let Some(p) = cleanup_plan
        .as_ref()
        .filter(|_| report.shared_source || world.rank == 0)
    {
        cleanup(p)?;
    }
    if a.json {
        let v = summary::SaveJson::of_ranks(&r.output, &report, world.launcher)?;
        print_json(&serde_json::to_value(v)?)?;
    }
    Ok(())
}

/// What the save left out of the model and removed of the one it replaced.
fn log_left_out_and_replaced(left_out: &[String], replaced: &[String]) {
    if !left_out.is_empty() {
        tracing::info!("{}", axsave_core::naming::left_out_summary(left_out));
    }
    for x in replaced {
        tracing::info!("removed {x} of the model this save replaced");
    }
}

/// `--cleanup`, once the save is committed.
fn cleanup(plan: &CleanupPlan) -> Result<()> {
    for removed in plan.execute()? {
        tracing::info!("cleanup: removed {removed}");
    }
    Ok(())
}

/// One process, no rendezvous.
fn save_alone(
    a: &SaveArgs,
    r: &Resolved,
    workers: usize,
    world: &axsave_dist::World,
    started: std::time::Instant,
    cleanup_plan: Option<&CleanupPlan>,
) -> Result<()> {
    let timeout = Duration::from_secs(r.timeout.max(1));
    let gpu = single_process_gpu(r.transport, a.flags.device, world.local_rank, timeout)?;
    if let Some((_, desc)) = &gpu {
        tracing::info!("GPU {desc}: conversions on the GPU");
    }
    let gpu_name = gpu.as_ref().map(|(_, d)| d.clone());
    let opts = SaveOptions {
        output: r.output.clone(),
        layout: r.layout.clone(),
        memory_budget: r.memory_budget,
        force: a.flags.force,
        workers,
        tag: run_tag(),
        extras: r.extras.clone(),
        gpu: gpu.map(|(g, _)| g),
    };
    let source = std::path::Path::new(&r.source);
    let catalog = detect::open(source)?;
    tracing::info!("{}", summary::source_line(source, &catalog));
    for n in &catalog.notes {
        tracing::info!("{n}");
    }
    // Counted in output bytes against the layout's output bytes (not the source's size).
    let counts = Arc::new(DistProgress::default());
    let progress = Progress::start(counts.clone(), a.quiet);
    let result = save_local(&catalog, &opts, &counts);
    progress.finish();
    let (layout, report) = result?;
    log_left_out_and_replaced(&layout.left_out, &report.replaced);
    let files = layout.files.len();
    let line = summary::wrote_line(
        report.tensors,
        report.bytes,
        files,
        &r.output,
        report.seconds,
    );
    tracing::info!("{line}");
    if let Some(p) = cleanup_plan {
        cleanup(p)?;
    }
    if a.json {
        let (format, seconds) = (&catalog.format, started.elapsed().as_secs_f64());
        let (layout, launcher) = (&layout, world.launcher);
        let v = summary::SaveJson::of_process(
            &r.output, &report, layout, format, seconds, gpu_name, launcher,
        );
        print_json(&serde_json::to_value(v?)?)?;
    }
    Ok(())
}

/// `axsave merge-lora`: by this process alone, or this rank's share of a merge by several
/// (every rank reads the inputs; they and the output directory must be visible to all).
pub fn merge_lora(a: &MergeLoraArgs) -> Result<()> {
    use axsave_core::merge_lora::{self as ml, MergeOptions};
    // Signals cancel a merge as they cancel a save: temporaries removed, exit 128 + N.
    handle_signals()?;
    let world = axsave_dist::detect_from_process_env()?;
    world.log_detected();
    let (base, adapter, output) = match &a.config {
        Some(path) => {
            let cfg = axsave_core::axolotl::config::AxolotlConfig::load(path)?;
            let cwd = std::env::current_dir()?;
            let env = |k: &str| std::env::var(k).ok();
            let p = ml::axolotl::merge_paths(&cfg, &cwd, &env)?;
            let output = a.output.clone().unwrap_or(p.output);
            (p.base, p.adapter, output)
        }
        None => match (&a.base, &a.adapter, &a.output) {
            (Some(b), Some(ad), Some(o)) => (b.clone(), ad.clone(), o.clone()),
            _ => {
                return Err(UsageError(
                    "--base, --adapter and --output are needed without --config".into(),
                )
                .into());
            }
        },
    };
    let opts = MergeOptions {
        base,
        adapter,
        output,
        max_shard_size: size_arg("--max-shard-size", &a.max_shard_size)?,
        memory_budget: size_arg("--memory-budget", &a.memory_budget)?,
        force: a.force,
        workers: a.workers.unwrap_or_else(default_workers),
        tag: run_tag(),
    };
    let counter = AtomicU64::new(0);
    if world.world_size > 1 {
        let _span = tracing::info_span!("rank", r = world.rank).entered();
        if world.rank == 0 {
            tracing::info!(
                "{} ranks ({}): merging {} + {}",
                world.world_size,
                world.launcher,
                opts.base.display(),
                opts.adapter.display()
            );
        }
        let key = format!(
            "{}|{}|{}|{}|{}",
            opts.base.display(),
            opts.adapter.display(),
            opts.output.display(),
            opts.max_shard_size,
            opts.force
        );
        let mut h = crc32fast::Hasher::new();
        h.update(key.as_bytes());
        let times = ml::ranks::RankTimeouts {
            timeout: Duration::from_secs(a.timeout.max(1)),
            rendezvous: Duration::from_secs(a.rendezvous_timeout.max(1)),
        };
        let report = ml::ranks::run(
            &world,
            &opts,
            &format!("{:08x}", h.finalize()),
            times,
            &counter,
        )?;
        if let Some(r) = report {
            tracing::info!(
                "wrote {} tensors ({} merged, {} replaced), {} to {} in {:.2}s",
                r.tensors,
                r.merged,
                r.replaced,
                human(r.bytes),
                opts.output.display(),
                r.seconds
            );
            merge_json(a, &opts.output, &r)?;
        }
        return Ok(());
    }
    let prepared = ml::prepare(&opts)?;
    let (merged, replaced, kept) = prepared.plan.counts();
    tracing::info!(
        "{} + {}: {} tensors merged, {} replaced (modules_to_save), {} copied",
        opts.base.display(),
        opts.adapter.display(),
        merged,
        replaced,
        kept
    );
    let report = ml::merge_local(&prepared, &opts, &counter)?;
    for x in &report.removed {
        tracing::info!("removed {x} of the model this merge replaced");
    }
    tracing::info!(
        "wrote {} tensors, {} in {} file{} to {} in {:.2}s",
        report.tensors,
        human(report.bytes),
        prepared.layout.files.len(),
        if prepared.layout.files.len() == 1 {
            ""
        } else {
            "s"
        },
        opts.output.display(),
        report.seconds
    );
    merge_json(a, &opts.output, &report)
}

/// `merge-lora --json`: the summary on stdout.
fn merge_json(
    a: &MergeLoraArgs,
    output: &std::path::Path,
    report: &axsave_core::merge_lora::MergeReport,
) -> Result<()> {
    if !a.json {
        return Ok(());
    }
    print_json(&summary::merge_json(output, report)?)
}

/// `axsave inspect`.
pub fn inspect(a: &InspectArgs) -> Result<()> {
    let c = detect::open(&a.source)?;
    if a.json {
        return print_json(&summary::inspect_json(&c));
    }
    print_stdout(&summary::inspect_text(&c))
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
    tracing::info!("{}", summary::verified_line(&r));
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
            return print_json(&serde_json::json!({ "device": device, "rows": rows }));
        }
        print_stdout(&summary::bench_text(&device, bytes, &rows))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (bytes, a.device, a.json);
        let why = "this axsave was built without CUDA (cargo feature `cuda`)";
        Err(axsave_core::gpu::alone::GpuUnavailable(why.into()).into())
    }
}
