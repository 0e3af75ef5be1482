//! On a machine with an NVIDIA GPU: the kernels on torch's fixtures, pinned memory flags,
//! the engine end to end, NCCL with itself and with a second GPU, the watchdog. Without a
//! GPU each test says why it skips; `AXSAVE_REQUIRE_GPU=1` (scripts/gpu-check.sh) makes
//! that a failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use axsave_dist::data_plane::{DeviceOp, DevicePlane, DevicePlaneId, DevicePlaneOptions};
use axsave_formats::convert;
use cudarc::driver::{result as dr, sys as ds};

use super::build::build_kernels;
use super::device::open_device;
use super::*;
use crate::execute::ExecOptions;
use crate::gpu::kernels::PAIRS;
use crate::gpu::tests::{TINY, cpu_output, fixtures, opts};
use crate::gpu::{RankWork, run_rank};
use crate::layout::{DtypeChoice, plan_layout};
use crate::output::OutputFiles;
use crate::plan::{Mode, make_plan};
use crate::sources::SourceFiles;

fn required() -> bool {
    std::env::var_os("AXSAVE_REQUIRE_GPU").is_some_and(|v| v == "1")
}

/// The GPU, or `None` after saying why the test skips.
fn gpu(test: &str) -> Option<&'static Device> {
    match device(None, 0) {
        Ok(d) => Some(d),
        Err(why) => {
            assert!(
                !required(),
                "{test}: AXSAVE_REQUIRE_GPU=1 but no GPU: {why}"
            );
            eprintln!("skipping {test}: no GPU ({why})");
            None
        }
    }
}

fn kernels_of(dev: &'static Device, test: &str) -> Option<&'static Kernels> {
    match kernels(dev) {
        Ok(k) => Some(k),
        Err(why) => {
            assert!(
                !required(),
                "{test}: AXSAVE_REQUIRE_GPU=1 but the kernels are unusable: {why}"
            );
            eprintln!("skipping {test}: {why}");
            None
        }
    }
}

fn nccl_here(test: &str) -> bool {
    match DevicePlane::library() {
        Ok(lib) => {
            eprintln!("{test}: NCCL {lib}");
            true
        }
        Err(e) => {
            assert!(!required(), "{test}: AXSAVE_REQUIRE_GPU=1 but: {e}");
            eprintln!("skipping {test}: {e}");
            false
        }
    }
}

#[test]
fn kernels_match_torch_on_the_device() {
    let Some(dev) = gpu("kernels_match_torch_on_the_device") else {
        return;
    };
    let Some(k) = kernels_of(dev, "kernels_match_torch_on_the_device") else {
        return;
    };
    eprintln!("{}", dev.describe());
    for (from, to, input, want) in crate::gpu::kernels::tests::explicit() {
        let got = convert_on_device(dev, k, from, to, &input).unwrap();
        assert_eq!(got.len(), want.len());
        if let Some(i) = crate::gpu::kernels::tests::first_difference(to.size(), &want, &got) {
            panic!(
                "{from} -> {to} on {}: element {i} differs from torch",
                dev.name
            );
        }
    }
    // Large inputs: many blocks of the grid-stride loop, against the CPU.
    for (from, to) in PAIRS {
        let input: Vec<u8> = (0..(3 << 20) + 7)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let input = &input[..input.len() / from.size() * from.size()];
        let mut want = vec![0u8; input.len() / from.size() * to.size()];
        convert::convert(from, to, input, &mut want).unwrap();
        assert!(
            convert_on_device(dev, k, from, to, input).unwrap() == want,
            "{from} -> {to}"
        );
    }
}

#[test]
fn pinned_buffers_are_cached_not_write_combined() {
    let Some(dev) = gpu("pinned_buffers_are_cached_not_write_combined") else {
        return;
    };
    let b = PinnedBuffer::new(&dev.ctx, 1 << 20).unwrap();
    let mut flags = 0u32;
    // SAFETY: `b` is a live cuMemHostAlloc allocation; `flags` a valid out-pointer.
    let r = unsafe { ds::cuMemHostGetFlags(&mut flags, b.ptr.as_ptr() as *mut std::ffi::c_void) };
    assert_eq!(r, ds::cudaError_enum::CUDA_SUCCESS);
    assert_eq!(
        flags & ds::CU_MEMHOSTALLOC_WRITECOMBINED,
        0,
        "flags {flags:#x}"
    );
}

/// One rank: local conversions through the CUDA engine (two slots, tiny rounds so many
/// are in flight), byte-identical to the CPU executor.
#[test]
fn the_engine_converts_locally_like_the_cpu() {
    let Some(dev) = gpu("the_engine_converts_locally_like_the_cpu") else {
        return;
    };
    let Some(k) = kernels_of(dev, "the_engine_converts_locally_like_the_cpu") else {
        return;
    };
    let src = fixtures().join("dcp/fsdp_w2/checkpoint");
    let catalog = axsave_formats::detect::open(&src).unwrap();
    for dtype in [DtypeChoice::Bf16, DtypeChoice::Fp16, DtypeChoice::Fp32] {
        let lopts = opts(dtype, 1);
        let layout = plan_layout(&catalog, &lopts).unwrap();
        let plan = make_plan(
            &catalog,
            &layout,
            &vec![vec![0]; catalog.files.len()],
            1,
            Mode::Gather,
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        let files = OutputFiles::create(out.path(), &layout, "gpu", 256 << 20, |_| true).unwrap();
        let sources = SourceFiles::new(&catalog, &catalog.root);
        let cancel = AtomicBool::new(false);
        let written = AtomicU64::new(0);
        for sizing in [TINY, crate::gpu::schedule::Sizing::for_budget(64 << 20)] {
            let mut engine = CudaEngine::new(
                dev,
                Some(k),
                None,
                sizing.round_bytes as usize,
                Duration::from_secs(30),
                &cancel,
            )
            .unwrap();
            let work = RankWork {
                catalog: &catalog,
                local_on_gpu: true,
                layout: &layout,
                plan: &plan,
                sources: &sources,
                files: Some(&files),
                me: 0,
                sizing,
                exec: ExecOptions::for_budget(16 << 20, 2),
                written: &written,
                cancel: &cancel,
            };
            run_rank(Some(&mut engine), work).unwrap();
            drop(engine);
            files.sync().unwrap();
            let want = cpu_output(&catalog, &lopts);
            for (name, bytes) in want {
                let got =
                    std::fs::read(out.path().join(crate::output::temp_name(&name, "gpu"))).unwrap();
                assert!(
                    got == bytes,
                    "{dtype:?} {sizing:?}: {name} differs from the CPU executor's"
                );
            }
        }
    }
}

/// A data plane of one rank sends a buffer to itself: the NCCL layer (loader, non-blocking
/// init, group, streams, finish) on real hardware.
#[test]
fn nccl_sends_to_itself() {
    let Some(dev) = gpu("nccl_sends_to_itself") else {
        return;
    };
    if !nccl_here("nccl_sends_to_itself") {
        return;
    }
    dev.bind().unwrap();
    let id = DevicePlaneId::new().unwrap();
    let bind = Arc::new(move || dev.ctx.bind_to_thread().map_err(|e| e.to_string()));
    let plane = DevicePlane::join(&id, 0, 1, DevicePlaneOptions::default(), bind).unwrap();
    let n = (8 << 20) + 5;
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let a = DeviceBuffer::new(&dev.ctx, n).unwrap();
    let b = DeviceBuffer::new(&dev.ctx, n).unwrap();
    let stream = dev.ctx.new_stream().unwrap();
    let mut back = vec![0u8; n];
    // SAFETY: `a` and `b` hold n bytes; every operation is complete after the synchronize.
    unsafe {
        dr::memcpy_htod_async(a.ptr, &data, stream.cu_stream()).unwrap();
        plane
            .exchange(
                &[
                    DeviceOp::Send {
                        ptr: a.ptr,
                        bytes: n,
                        peer: 0,
                    },
                    DeviceOp::Recv {
                        ptr: b.ptr,
                        bytes: n,
                        peer: 0,
                    },
                ],
                stream.cu_stream() as *mut std::ffi::c_void,
                Duration::from_secs(60),
            )
            .unwrap();
        dr::memcpy_dtoh_async(&mut back, b.ptr, stream.cu_stream()).unwrap();
    }
    stream.synchronize().unwrap();
    assert!(back == data);
    plane.check().unwrap();
    plane.finish(Duration::from_secs(30)).unwrap();
}

/// A receive nobody sends never completes: the watchdog aborts the plane when the
/// watched wait sees no progress, and the wait ends with the reason instead of hanging.
#[test]
fn the_watchdog_ends_a_receive_that_never_comes() {
    let Some(dev) = gpu("the_watchdog_ends_a_receive_that_never_comes") else {
        return;
    };
    if !nccl_here("the_watchdog_ends_a_receive_that_never_comes") {
        return;
    }
    dev.bind().unwrap();
    // Two ranks, but only rank 0 exists: its receive from rank 1 can never match.
    // (Init needs both, so use one rank and a lone self-receive instead.)
    let id = DevicePlaneId::new().unwrap();
    let bind = Arc::new(move || dev.ctx.bind_to_thread().map_err(|e| e.to_string()));
    let plane = DevicePlane::join(&id, 0, 1, DevicePlaneOptions::default(), bind).unwrap();
    let buf = DeviceBuffer::new(&dev.ctx, 4096).unwrap();
    let stream = dev.ctx.new_stream().unwrap();
    let start = std::time::Instant::now();
    // SAFETY: `buf` holds 4096 bytes and outlives the abort below, which stops the receive.
    let posted = unsafe {
        plane.exchange(
            &[DeviceOp::Recv {
                ptr: buf.ptr,
                bytes: 4096,
                peer: 0,
            }],
            stream.cu_stream() as *mut std::ffi::c_void,
            Duration::from_secs(5),
        )
    };
    if let Err(e) = posted {
        // NCCL may refuse an unmatched self-receive up front: an error, not a hang, is
        // what matters.
        eprintln!("NCCL refused the lone receive: {e}");
        return;
    }
    let ev = dev.ctx.new_event(None).unwrap();
    ev.record(&stream).unwrap();
    let guard = plane.watch("a receive nobody sends", Duration::from_secs(3));
    let outcome = loop {
        if ev.try_is_complete().unwrap_or(true) {
            break Ok(());
        }
        if let Err(e) = plane.check() {
            break Err(e);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the watchdog did not fire"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(guard);
    let e = outcome.expect_err("the lone receive cannot complete");
    assert!(e.is_timeout(), "{e}");
    // The aborted receive no longer holds the stream.
    stream.synchronize().unwrap();
}

/// Two GPUs of this machine, one rank each in two threads: the whole NCCL executor (rank 0
/// writes what rank 1 reads), byte-identical to the CPU executor. Needs two GPUs.
#[test]
fn two_gpus_exchange_rounds_over_nccl() {
    let Some(first) = gpu("two_gpus_exchange_rounds_over_nccl") else {
        return;
    };
    if first.count < 2 {
        eprintln!(
            "skipping two_gpus_exchange_rounds_over_nccl: one GPU only (the multi-rank binary test covers NCCL_MULTI_RANK_GPU_ENABLE)"
        );
        return;
    }
    if !nccl_here("two_gpus_exchange_rounds_over_nccl") {
        return;
    }
    let src = fixtures().join("dcp/fsdp_w4/checkpoint");
    let catalog = axsave_formats::detect::open(&src).unwrap();
    let lopts = opts(DtypeChoice::Bf16, 1);
    let layout = plan_layout(&catalog, &lopts).unwrap();
    let readers: Vec<Vec<usize>> = (0..catalog.files.len()).map(|f| vec![f % 2]).collect();
    let plan = make_plan(&catalog, &layout, &readers, 2, Mode::Gather).unwrap();
    assert!(plan.network_bytes() > 0);
    let out = tempfile::tempdir().unwrap();
    let id = DevicePlaneId::new().unwrap();
    let cancel = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|me| {
                let (catalog, layout, plan, id, cancel, out) =
                    (&catalog, &layout, &plan, &id, &cancel, out.path());
                scope.spawn(move || {
                    let dev: &'static Device =
                        Box::leak(Box::new(open_device(Some(me), me).unwrap()));
                    let k: &'static Kernels = Box::leak(Box::new(build_kernels(dev).unwrap()));
                    dev.bind().unwrap();
                    let bind =
                        Arc::new(move || dev.ctx.bind_to_thread().map_err(|e| e.to_string()));
                    let plane =
                        DevicePlane::join(id, me, 2, DevicePlaneOptions::default(), bind).unwrap();
                    let files = (me == 0).then(|| {
                        OutputFiles::create(out, layout, "gpu", 256 << 20, |_| true).unwrap()
                    });
                    let sources = SourceFiles::new(catalog, &catalog.root);
                    let written = AtomicU64::new(0);
                    let mut engine = CudaEngine::new(
                        dev,
                        Some(k),
                        Some(&plane),
                        TINY.round_bytes as usize,
                        Duration::from_secs(60),
                        cancel,
                    )
                    .unwrap();
                    run_rank(
                        Some(&mut engine),
                        RankWork {
                            catalog,
                            local_on_gpu: true,
                            layout,
                            plan,
                            sources: &sources,
                            files: files.as_ref(),
                            me,
                            sizing: TINY,
                            exec: ExecOptions::for_budget(16 << 20, 2),
                            written: &written,
                            cancel,
                        },
                    )
                    .unwrap();
                    drop(engine);
                    if let Some(f) = &files {
                        f.sync().unwrap();
                    }
                    plane.finish(Duration::from_secs(30)).unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    for (name, bytes) in cpu_output(&catalog, &lopts) {
        let got = std::fs::read(out.path().join(crate::output::temp_name(&name, "gpu"))).unwrap();
        assert!(got == bytes, "{name} differs from the CPU executor's");
    }
}
