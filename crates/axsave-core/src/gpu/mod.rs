//! The GPU executor: conversions on the device, and bytes between ranks over the GPUs' data
//! plane (`axsave_dist::data_plane::DevicePlane`, which NCCL carries).
//!
//! When the transport is NCCL (`--transport nccl`, or `auto` when every rank has a GPU and
//! NCCL), each rank binds one GPU ([`pick_ordinal`]: its local rank among the visible devices,
//! or `--device N`) and runs its part of the plan in **rounds** ([`schedule`]):
//!
//! ```text
//!  reader: pread → gather (CPU) → pinned staging ──H2D──▶ d_in ──kernel──▶ d_out ──ncclSend──┐
//!  writer: pwrite ◀── pinned landing ◀──D2H── d_land ◀──ncclRecv─────────────────────────────┘
//!  local conversions: … d_in ──kernel──▶ d_land ──D2H──▶ landing → pwrite
//! ```
//!
//! Every rank computes the same units and rounds from the plan (identical everywhere) and the
//! sizes rank 0 chose, so a writer posts exactly the receives its readers' sends need, in the
//! same order, without any message about it. Two rounds are in flight, on three CUDA streams
//! (upload and convert, NCCL, download), so disk reads, host-to-device copies, NCCL and
//! device-to-host copies overlap ([`pipeline`]). Staging and landing buffers are page-locked
//! host memory allocated *without* `CU_MEMHOSTALLOC_WRITECOMBINED` (cudarc's `alloc_pinned`
//! default), because the CPU reads the landed bytes to write them out.
//!
//! Local pieces that need no conversion are copied by the CPU executor, in parallel with the
//! rounds: the GPU would only add two copies. Local pieces that need one go through the device
//! when the conversion kernels compiled and passed their self-test; otherwise on the CPU.
//!
//! The conversion kernels ([`kernels`]) are CUDA C compiled at run time by NVRTC; each has a
//! CPU twin tested against torch's output. Nothing here needs CUDA to build: with feature
//! `cuda` the driver, NVRTC and NCCL are opened at run time, and their absence is reported as
//! a reason ([`local_caps`]) that makes `auto` pick another transport.

pub mod alone;
pub mod kernel_cache;
pub mod kernels;
pub mod pipeline;
pub mod schedule;

#[cfg(feature = "cuda")]
pub mod bench;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod run;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axsave_formats::Catalog;

use crate::error::{CoreError, Result};
use crate::execute::{self, CopyJob, ExecOptions, Task};
use crate::layout::Layout;
use crate::output::{LocalSink, OutputFiles};
use crate::plan::{Assignment, Plan};
use crate::sources::SourceFiles;
use crate::transport::{Caps, TransportRequest};

use pipeline::{Engine, Job};
use schedule::{RoundWork, Sizing, Unit};

/// The device ordinal a rank binds: `explicit` (`--device N`) when given, else its local rank
/// modulo the number of visible devices. CUDA numbers only the devices `CUDA_VISIBLE_DEVICES`
/// lets through, so with a launcher that gives each rank its own device (`srun --gpus-per-task
/// 1`) the answer is 0 for everyone, and with 8 ranks on an 8-GPU node rank *i* takes GPU *i*.
pub fn pick_ordinal(
    local_rank: usize,
    device_count: usize,
    explicit: Option<usize>,
) -> std::result::Result<usize, String> {
    if device_count == 0 {
        return Err("no GPU is visible (check CUDA_VISIBLE_DEVICES)".into());
    }
    match explicit {
        Some(d) if d < device_count => Ok(d),
        Some(d) => Err(format!(
            "--device {d}: only {device_count} GPU{} visible (0..{})",
            if device_count == 1 { " is" } else { "s are" },
            device_count - 1
        )),
        None => Ok(local_rank % device_count),
    }
}

/// What this rank can do with GPUs: binds the device (see [`pick_ordinal`]) and opens NCCL
/// when `request` may use them, and says why not otherwise. Never panics, whatever is
/// installed; without feature `cuda` the answer is always "built without CUDA".
pub fn local_caps(request: TransportRequest, device: Option<usize>, local_rank: usize) -> Caps {
    if !request.wants_gpu() {
        return Caps::none(&format!(
            "--transport {}",
            match request {
                TransportRequest::Mpi => "mpi",
                _ => "tcp",
            }
        ));
    }
    #[cfg(feature = "cuda")]
    {
        let dev = cuda::device(device, local_rank);
        let gpu = dev.as_ref().map(|d| d.describe()).map_err(Clone::clone);
        let nccl = match &gpu {
            Ok(_) => axsave_dist::data_plane::DevicePlane::library().map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        Caps {
            gpu,
            nccl,
            gpu_id: dev.ok().map(|d| d.uuid.clone()),
            shared_gpu_ok: std::env::var("NCCL_MULTI_RANK_GPU_ENABLE")
                .is_ok_and(|v| v.trim() == "1"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, local_rank);
        Caps::none("this axsave was built without CUDA (cargo feature `cuda`)")
    }
}

/// A single-process save's use of the GPU (conversions only: there are no peers).
#[derive(Clone, Debug)]
pub struct LocalGpu {
    /// `--device`.
    pub device: Option<usize>,
    /// How long the device may take to finish a round.
    pub timeout: std::time::Duration,
}

/// A single-process save through the GPU executor: local conversions on the device when its
/// kernels work, everything else on the CPU. (Without feature `cuda`: all on the CPU.)
pub fn run_single(work: RankWork<'_>, g: &LocalGpu) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        run::run_local(work, g)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = g;
        run_rank(None::<&mut pipeline::NoDevice>, work)
    }
}

/// One rank's part of a save through the GPU executor.
pub struct RankWork<'a> {
    /// The source checkpoint.
    pub catalog: &'a Catalog,
    /// The output.
    pub layout: &'a Layout,
    /// The plan, identical on every rank (or the part of it this executor carries).
    pub plan: &'a Plan,
    /// Whether this rank's own pieces that need a conversion go through the GPU (`--transport
    /// nccl`); else the CPU copies them (under `auto` a rank's own pieces never touch the GPU).
    pub local_on_gpu: bool,
    /// The source files as this rank sees them.
    pub sources: &'a SourceFiles,
    /// The output files this rank writes (when it writes any).
    pub files: Option<&'a OutputFiles>,
    /// This rank.
    pub me: usize,
    /// Sizes agreed by every rank.
    pub sizing: Sizing,
    /// The CPU executor's options (for the local copies) and the reading threads.
    pub exec: ExecOptions,
    /// Output bytes produced here, for progress.
    pub written: &'a AtomicU64,
    /// Raised when the run must stop.
    pub cancel: &'a AtomicBool,
}

/// What one rank does: the units the rounds refer to, its rounds in order, and the local
/// pieces left to the CPU executor.
pub struct RankPlan {
    /// Every remote unit of the world (canonical order), then this rank's local GPU units.
    pub units: Vec<Unit>,
    /// This rank's rounds, in the order it runs them.
    pub rounds: Vec<RoundWork>,
    /// Local pieces the CPU executor copies.
    pub cpu_tasks: Vec<Task>,
}

/// Plans rank `me`'s work. `device_converts`: the engine converts (its kernels work);
/// `gpu_local`: local conversions go through the device (else the CPU executor does them).
pub fn plan_rank(w: &RankWork<'_>, device_converts: bool, gpu_local: bool) -> RankPlan {
    let remote: Vec<Assignment> = w
        .plan
        .assignments
        .iter()
        .filter(|a| a.reader != a.writer)
        .copied()
        .collect();
    let mut units = schedule::units(w.catalog, w.layout, &remote, w.sizing.chunk_bytes);
    let exchange = schedule::exchange_rounds(&units, w.sizing.round_bytes);
    let needs_conversion = |a: &Assignment| {
        let out = &w.layout.tensors[a.task.out];
        let piece = &w.catalog.tensors[out.source].pieces[a.task.piece];
        piece.stored_dtype != out.dtype
    };
    let (gpu, cpu): (Vec<Assignment>, Vec<Assignment>) = w
        .plan
        .assignments
        .iter()
        .filter(|a| a.reader == w.me && a.writer == w.me)
        .partition(|a| gpu_local && device_converts && needs_conversion(a));
    let base = units.len();
    units.extend(schedule::units(
        w.catalog,
        w.layout,
        &gpu,
        w.sizing.chunk_bytes,
    ));
    let local: Vec<usize> = (base..units.len()).collect();
    let local = schedule::local_rounds(&units, &local, w.sizing.round_bytes);
    let mut rounds = Vec::new();
    let mut ex = exchange
        .iter()
        .map(|r| RoundWork::for_rank(&units, r, w.me, device_converts))
        .filter(|r| !r.is_empty());
    let mut lo = local
        .iter()
        .map(|r| RoundWork::for_rank(&units, r, w.me, device_converts));
    // Alternate, so local conversions fill the gaps while peers catch up.
    loop {
        match (ex.next(), lo.next()) {
            (None, None) => break,
            (a, b) => rounds.extend(a.into_iter().chain(b)),
        }
    }
    RankPlan {
        units,
        rounds,
        cpu_tasks: cpu.iter().map(|a| a.task).collect(),
    }
}

/// Runs rank `me`'s part: the rounds through `engine` (needed when the rank has any), the
/// local copies through the CPU executor at the same time; then the whole-record checks of the
/// files the rounds read, and the check that no source changed.
pub fn run_rank<E: Engine>(engine: Option<&mut E>, w: RankWork<'_>) -> Result<()> {
    crate::fault::point("copying", w.me);
    let converts = engine.as_ref().is_some_and(|e| e.converts());
    let p = plan_rank(&w, converts, engine.is_some() && w.local_on_gpu);
    let cpu_job = CopyJob {
        catalog: w.catalog,
        layout: w.layout,
        sources: w.sources,
        tasks: &p.cpu_tasks,
        opts: w.exec,
    };
    let job = Job {
        catalog: w.catalog,
        layout: w.layout,
        sources: w.sources,
        files: w.files,
        units: &p.units,
        workers: w.exec.workers,
        written: w.written,
        cancel: w.cancel,
    };
    let (gpu, cpu) = std::thread::scope(|scope| {
        let cpu = scope.spawn(|| -> Result<()> {
            if p.cpu_tasks.is_empty() {
                return Ok(());
            }
            let files = w.files.ok_or_else(|| {
                CoreError::Internal("local pieces on a rank that writes no file".into())
            })?;
            execute::run(
                cpu_job,
                &|_| 0,
                &|_| Ok(LocalSink(files)),
                w.written,
                w.cancel,
            )
        });
        let gpu = match engine {
            _ if p.rounds.is_empty() => Ok(()),
            Some(e) => pipeline::drive(e, &job, &p.rounds),
            None => {
                w.cancel.store(true, Ordering::SeqCst);
                Err(CoreError::Gpu(
                    "this rank has GPU work but no device".into(),
                ))
            }
        };
        let cpu = cpu
            .join()
            .unwrap_or_else(|_| Err(CoreError::Internal("the CPU copy thread panicked".into())));
        (gpu, cpu)
    });
    // The root cause, not the cancellation it caused in the other half.
    match (gpu, cpu) {
        (Err(CoreError::Cancelled), Err(e)) | (Err(e), _) | (Ok(()), Err(e)) => return Err(e),
        (Ok(()), Ok(())) => {}
    }
    let cpu_files: HashSet<usize> = p
        .cpu_tasks
        .iter()
        .map(|t| w.catalog.tensors[w.layout.tensors[t.out].source].pieces[t.piece].file)
        .collect();
    let mut buf = Vec::new();
    let gpu_files = pipeline::files_read(&job, &p.rounds);
    for r in w
        .catalog
        .records
        .iter()
        .filter(|r| gpu_files.contains(&r.file) && !cpu_files.contains(&r.file))
    {
        execute::check_record(w.sources, r, w.sizing.chunk_bytes as usize, &mut buf)?;
    }
    w.sources.check_unchanged()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layout::{DtypeChoice, LayoutOptions, plan_layout};
    use crate::plan::{Mode, make_plan};
    use crate::save::{SaveOptions, save_local};
    use pipeline::tests::HostEngine;
    use std::path::{Path, PathBuf};

    #[test]
    fn ordinals_follow_the_local_rank_or_the_flag() {
        assert_eq!(pick_ordinal(3, 8, None), Ok(3));
        assert_eq!(pick_ordinal(9, 8, None), Ok(1));
        assert_eq!(pick_ordinal(5, 1, None), Ok(0), "one visible GPU per rank");
        assert_eq!(pick_ordinal(5, 4, Some(2)), Ok(2));
        let e = pick_ordinal(0, 2, Some(2)).unwrap_err();
        assert_eq!(e, "--device 2: only 2 GPUs are visible (0..1)");
        assert!(
            pick_ordinal(0, 0, None)
                .unwrap_err()
                .contains("CUDA_VISIBLE_DEVICES")
        );
    }

    #[test]
    fn without_a_gpu_request_nothing_is_probed() {
        let c = local_caps(TransportRequest::Tcp, None, 0);
        assert_eq!(c.nccl_missing().as_deref(), Some("--transport tcp"));
    }

    /// Without a GPU (this machine, CI) the probe explains itself; on a GPU machine it names
    /// the device.
    #[test]
    fn the_probe_names_a_device_or_a_reason() {
        let c = local_caps(TransportRequest::Auto, None, 0);
        match &c.gpu {
            Ok(d) => eprintln!("GPU found: {d}; NCCL: {:?}", c.nccl),
            Err(why) => {
                assert!(!why.is_empty());
                assert!(c.nccl.is_err());
                eprintln!("no GPU here: {why}");
            }
        }
    }

    pub(crate) fn fixtures() -> PathBuf {
        std::env::var_os("AXSAVE_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
            })
    }

    /// The CPU executor's output for the same save: the reference every GPU-executor run
    /// must match byte for byte.
    pub(crate) fn cpu_output(catalog: &Catalog, lopts: &LayoutOptions) -> Vec<(String, Vec<u8>)> {
        let dir = tempfile::tempdir().unwrap();
        let opts = SaveOptions {
            output: dir.path().to_path_buf(),
            layout: lopts.clone(),
            memory_budget: 64 << 20,
            force: false,
            workers: 2,
            tag: "ref".into(),
            extras: Default::default(),
            gpu: None,
        };
        let (layout, _) =
            save_local(catalog, &opts, &crate::progress::Progress::default()).unwrap();
        layout
            .files
            .iter()
            .map(|f| {
                (
                    f.name.clone(),
                    std::fs::read(dir.path().join(&f.name)).unwrap(),
                )
            })
            .collect()
    }

    /// A whole save by `n` simulated ranks, each reading only "its" files (node-local disks),
    /// over host engines; returns the files the writers produced.
    fn simulated_save(
        source: &Path,
        lopts: &LayoutOptions,
        n: usize,
        mode: Mode,
        sizing: Sizing,
        converts: bool,
    ) -> Vec<(String, Vec<u8>)> {
        let (results, files) = simulated_ranks(source, lopts, n, mode, sizing, converts);
        for (r, res) in results.into_iter().enumerate() {
            res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        }
        files
    }

    /// Output files by name, with their bytes.
    type Files = Vec<(String, Vec<u8>)>;

    /// `n` simulated ranks save `source`: what each returned, and the files written (read only
    /// when every rank succeeded).
    fn simulated_ranks(
        source: &Path,
        lopts: &LayoutOptions,
        n: usize,
        mode: Mode,
        sizing: Sizing,
        converts: bool,
    ) -> (Vec<Result<()>>, Files) {
        let catalog = axsave_formats::detect::open(source).unwrap();
        let layout = plan_layout(&catalog, lopts).unwrap();
        // File f is visible to rank f % n only.
        let readers: Vec<Vec<usize>> = (0..catalog.files.len()).map(|f| vec![f % n]).collect();
        let plan = make_plan(&catalog, &layout, &readers, n, mode).unwrap();
        if n > 1 {
            assert!(
                plan.network_bytes() > 0,
                "the test must move bytes between ranks"
            );
        }
        let out = tempfile::tempdir().unwrap();
        let tag = "sim";
        let engines = HostEngine::world(n, sizing.round_bytes as usize, converts);
        let cancel = AtomicBool::new(false);
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = engines
                .into_iter()
                .enumerate()
                .map(|(me, mut engine)| {
                    let (catalog, layout, plan, cancel, out) =
                        (&catalog, &layout, &plan, &cancel, out.path());
                    scope.spawn(move || {
                        let files = plan
                            .is_writer(me)
                            .then(|| {
                                OutputFiles::create(out, layout, tag, 256 << 20, |f| {
                                    plan.file_writers[f] == me
                                })
                            })
                            .transpose()?;
                        let sources = SourceFiles::new(catalog, &catalog.root);
                        let written = AtomicU64::new(0);
                        let w = RankWork {
                            catalog,
                            local_on_gpu: true,
                            layout,
                            plan,
                            sources: &sources,
                            files: files.as_ref(),
                            me,
                            sizing,
                            exec: ExecOptions::for_budget(16 << 20, 2),
                            written: &written,
                            cancel,
                        };
                        run_rank(Some(&mut engine), w)?;
                        let moves = plan.assignments.iter().any(|a| {
                            (a.reader == me) != (a.writer == me)
                                || (a.reader == me && converts && {
                                    let t = &layout.tensors[a.task.out];
                                    catalog.tensors[t.source].pieces[a.task.piece].stored_dtype
                                        != t.dtype
                                })
                        });
                        assert_eq!(
                            engine.launched > 0,
                            moves,
                            "rank {me}: rounds run iff it has GPU work"
                        );
                        if let Some(f) = &files {
                            f.sync()?;
                        }
                        // Every unit this rank read was accounted for.
                        let read: u64 = plan
                            .assignments
                            .iter()
                            .filter(|a| a.reader == me)
                            .map(|a| a.bytes)
                            .sum();
                        assert_eq!(written.load(Ordering::Relaxed), read, "rank {me}");
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        if results.iter().any(|r| r.is_err()) {
            return (results, Vec::new());
        }
        let files = layout
            .files
            .iter()
            .map(|f| {
                let p = out.path().join(crate::output::temp_name(&f.name, tag));
                (f.name.clone(), std::fs::read(p).unwrap())
            })
            .collect();
        (results, files)
    }

    pub(crate) fn opts(dtype: DtypeChoice, min_files: usize) -> LayoutOptions {
        LayoutOptions {
            dtype,
            min_files,
            ..LayoutOptions::default()
        }
    }

    /// Tiny rounds: many units per piece, many rounds, every path of the packing.
    pub(crate) const TINY: Sizing = Sizing {
        chunk_bytes: 48,
        round_bytes: 160,
    };

    #[test]
    fn gather_over_the_simulated_device_matches_the_cpu_executor() {
        let src = fixtures().join("dcp/fsdp_w4/checkpoint");
        let catalog = axsave_formats::detect::open(&src).unwrap();
        for dtype in [DtypeChoice::Keep, DtypeChoice::Bf16, DtypeChoice::Fp16] {
            let lopts = opts(dtype, 1);
            let want = cpu_output(&catalog, &lopts);
            for n in [2, 3, 4] {
                for converts in [true, false] {
                    for sizing in [TINY, Sizing::for_budget(64 << 20)] {
                        let got = simulated_save(&src, &lopts, n, Mode::Gather, sizing, converts);
                        assert!(
                            got == want,
                            "{dtype:?}, {n} ranks, device converts: {converts}, {sizing:?}: output differs from the CPU executor's"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sharded_over_the_simulated_device_matches_the_cpu_executor() {
        let src = fixtures().join("dcp/fsdp_w8/checkpoint");
        let catalog = axsave_formats::detect::open(&src).unwrap();
        for n in [2, 4] {
            let lopts = opts(DtypeChoice::Bf16, n);
            let want = cpu_output(&catalog, &lopts);
            let got = simulated_save(&src, &lopts, n, Mode::Sharded, TINY, true);
            assert!(got == want, "{n} ranks: output differs");
        }
    }

    /// A strided piece (fsdp_w2's transposed `proj_t.weight`) is staged out of order, so its
    /// CRC is checked by reading its record again: a damaged byte there fails the save.
    #[test]
    fn damaged_bytes_of_a_strided_piece_fail_the_device_path() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("ckpt");
        std::fs::create_dir(&src).unwrap();
        for e in std::fs::read_dir(fixtures().join("dcp/fsdp_w2/checkpoint")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), src.join(e.file_name())).unwrap();
        }
        let catalog = axsave_formats::detect::open(&src).unwrap();
        let (file, piece) = catalog
            .tensors
            .iter()
            .filter(|t| t.name.ends_with("proj_t.weight"))
            .flat_map(|t| &t.pieces)
            .find(|p| p.strides == [1, 4] && p.checksum.is_some())
            .map(|p| (catalog.files[p.file].path.clone(), p.clone()))
            .expect("a strided, checksummed piece");
        let path = src.join(&file);
        let mut data = std::fs::read(&path).unwrap();
        data[piece.offset as usize + 8] ^= 0xdf;
        std::fs::write(&path, &data).unwrap();
        for converts in [true, false] {
            let (results, _) = simulated_ranks(
                &src,
                &opts(DtypeChoice::Keep, 1),
                2,
                Mode::Gather,
                TINY,
                converts,
            );
            let errors: Vec<String> = results
                .iter()
                .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
                .collect();
            assert!(
                errors.iter().any(|e| e.contains("damaged (crc32")),
                "device converts: {converts}: {errors:?}"
            );
        }
    }

    /// Compressed pieces are decoded forward only, across rounds.
    #[test]
    fn zstd_pieces_cross_rounds_in_order() {
        let src = fixtures().join("dcp/zstd_w2/checkpoint");
        let catalog = axsave_formats::detect::open(&src).unwrap();
        let lopts = opts(DtypeChoice::Bf16, 1);
        let want = cpu_output(&catalog, &lopts);
        for n in [1, 2] {
            let got = simulated_save(&src, &lopts, n, Mode::Gather, TINY, true);
            assert!(got == want, "{n} ranks");
        }
    }

    /// One rank alone: local conversions through the (simulated) device, copies on the CPU.
    #[test]
    fn one_rank_converts_locally_on_the_device() {
        let src = fixtures().join("dcp/fsdp_w2/checkpoint");
        let catalog = axsave_formats::detect::open(&src).unwrap();
        for dtype in [DtypeChoice::Bf16, DtypeChoice::Fp16, DtypeChoice::Fp32] {
            let lopts = opts(dtype, 1);
            let want = cpu_output(&catalog, &lopts);
            let got = simulated_save(
                &src,
                &lopts,
                1,
                Mode::Gather,
                Sizing::for_budget(64 << 20),
                true,
            );
            assert!(got == want, "{dtype:?}");
            // And the reference torch wrote.
            let name = match dtype {
                DtypeChoice::Bf16 => "bf16",
                DtypeChoice::Fp16 => "fp16",
                _ => "fp32",
            };
            let reference =
                std::fs::read(fixtures().join(format!("dcp/fsdp_w2/reference_{name}.safetensors")))
                    .unwrap();
            assert!(
                got[0].1 == reference,
                "{dtype:?}: differs from torch's file"
            );
        }
    }

    /// A rank whose engine fails stops its peers instead of leaving them waiting.
    #[test]
    fn a_failing_rank_does_not_hang_the_others() {
        struct Broken;
        impl Engine for Broken {
            fn converts(&self) -> bool {
                true
            }
            fn staging(&mut self, _: usize) -> Result<&mut [u8]> {
                Err(CoreError::Gpu("device lost".into()))
            }
            fn launch(&mut self, _: usize, _: &RoundWork) -> Result<()> {
                unreachable!()
            }
            fn landed(&mut self, _: usize) -> Result<&[u8]> {
                unreachable!()
            }
        }
        let src = fixtures().join("dcp/fsdp_w2/checkpoint");
        let catalog = axsave_formats::detect::open(&src).unwrap();
        let layout = plan_layout(&catalog, &opts(DtypeChoice::Bf16, 1)).unwrap();
        let readers: Vec<Vec<usize>> = (0..catalog.files.len()).map(|f| vec![f % 2]).collect();
        let plan = make_plan(&catalog, &layout, &readers, 2, Mode::Gather).unwrap();
        let sources = SourceFiles::new(&catalog, &catalog.root);
        let cancel = AtomicBool::new(false);
        let written = AtomicU64::new(0);
        let w = RankWork {
            catalog: &catalog,
            local_on_gpu: true,
            layout: &layout,
            plan: &plan,
            sources: &sources,
            files: None,
            me: 1,
            sizing: TINY,
            exec: ExecOptions::for_budget(16 << 20, 2),
            written: &written,
            cancel: &cancel,
        };
        let e = run_rank(Some(&mut Broken), w).unwrap_err();
        assert!(e.to_string().contains("device lost"), "{e}");
        assert!(
            cancel.load(Ordering::SeqCst),
            "the failure raised the cancel flag"
        );
    }
}
