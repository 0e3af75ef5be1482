//! Bandwidth of what the GPU executor does with bytes (`axsave gpu-bench`, hidden): host to
//! device and back from pinned (cached and write-combined) and pageable memory, the conversion
//! kernels on the device, and the CPU conversion for comparison. Times come from CUDA events;
//! each figure is the best of a few repetitions.

use std::sync::Arc;

use axsave_formats::{DType, convert};
use cudarc::driver::{CudaContext, CudaStream, result as dr, sys as ds};

use super::cuda::{self, DeviceBuffer, PinnedBuffer};
use crate::error::{CoreError, Result};

/// One measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// What was measured.
    pub what: String,
    /// Bytes moved (for conversions: bytes read).
    pub bytes: u64,
    /// Best time, seconds.
    pub seconds: f64,
    /// `bytes / seconds`, in GB/s (10^9).
    pub gb_per_s: f64,
}

fn gpu(e: impl std::fmt::Display) -> CoreError {
    CoreError::Gpu(e.to_string())
}

/// Times `op` (which enqueues work on `stream`) with CUDA events, best of `reps`.
fn time(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    reps: usize,
    mut op: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let start = ctx
            .new_event(Some(ds::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(gpu)?;
        let end = ctx
            .new_event(Some(ds::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(gpu)?;
        start.record(stream).map_err(gpu)?;
        op()?;
        end.record(stream).map_err(gpu)?;
        let ms = start.elapsed_ms(&end).map_err(gpu)?;
        best = best.min(ms as f64 / 1000.0);
    }
    Ok(best)
}

fn row(what: &str, bytes: usize, seconds: f64) -> Row {
    Row {
        what: what.into(),
        bytes: bytes as u64,
        seconds,
        gb_per_s: bytes as f64 / seconds.max(1e-12) / 1e9,
    }
}

/// Measures on `bytes` bytes (rounded down to 8) on the device `--device` or 0. Returns the
/// device's description and the rows.
pub fn run(bytes: usize, device: Option<usize>) -> Result<(String, Vec<Row>)> {
    let bytes = (bytes / 8 * 8).max(8 << 20);
    let dev = cuda::device(device, 0).map_err(CoreError::Gpu)?;
    dev.bind()?;
    let ctx = &dev.ctx;
    let stream = ctx.new_stream().map_err(gpu)?;
    let cu = stream.cu_stream();
    let mut rows = Vec::new();
    let d_a = DeviceBuffer::new(ctx, bytes).map_err(gpu)?;
    let d_b = DeviceBuffer::new(ctx, bytes).map_err(gpu)?;
    let mut pinned = PinnedBuffer::new(ctx, bytes).map_err(gpu)?;
    // SAFETY: nothing is enqueued on the buffer yet.
    for (i, b) in unsafe { pinned.as_mut_slice() }.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2];
    }
    // Every timed copy below: the host and device ranges are `bytes` long, stay allocated
    // until `time` has waited for the end event, and nothing else touches them meanwhile.
    let s = time(ctx, &stream, 3, || {
        // SAFETY: see above; no copy into `pinned` is pending while it is read here.
        unsafe { dr::memcpy_htod_async(d_a.ptr, pinned.as_slice(), cu) }.map_err(gpu)
    })?;
    rows.push(row("host to device, pinned", bytes, s));
    let s = time(ctx, &stream, 3, || {
        // SAFETY: see above; `time` waited for the previous copies.
        unsafe { dr::memcpy_dtoh_async(pinned.as_mut_slice(), d_a.ptr, cu) }.map_err(gpu)
    })?;
    rows.push(row("device to host, pinned", bytes, s));
    {
        // Write-combined pinned memory (cudarc's `alloc_pinned` default), for comparison.
        // SAFETY: a plain allocation, freed below; its contents are irrelevant to the copy.
        let wc =
            unsafe { dr::malloc_host(bytes, ds::CU_MEMHOSTALLOC_WRITECOMBINED) }.map_err(gpu)?;
        let wc_slice = wc as *const u8;
        let s = time(ctx, &stream, 3, || {
            // SAFETY: `bytes` bytes allocated at `wc` just above (their values do not matter:
            // only the copy is timed), valid until freed below, after the copies completed.
            unsafe {
                let src = std::slice::from_raw_parts(wc_slice, bytes);
                dr::memcpy_htod_async(d_a.ptr, src, cu).map_err(gpu)
            }
        });
        // SAFETY: allocated by cuMemHostAlloc above; the timed copies have completed.
        let _ = unsafe { dr::free_host(wc) };
        rows.push(row("host to device, pinned write-combined", bytes, s?));
    }
    {
        let mut pageable = vec![1u8; bytes];
        let s = time(ctx, &stream, 2, || {
            // SAFETY: see above.
            unsafe { dr::memcpy_htod_async(d_a.ptr, &pageable, cu) }.map_err(gpu)
        })?;
        rows.push(row("host to device, pageable", bytes, s));
        let s = time(ctx, &stream, 2, || {
            // SAFETY: see above.
            unsafe { dr::memcpy_dtoh_async(&mut pageable, d_a.ptr, cu) }.map_err(gpu)
        })?;
        rows.push(row("device to host, pageable", bytes, s));
    }
    match cuda::kernels(dev) {
        Ok(k) => {
            for (from, to) in [
                (DType::F32, DType::BF16),
                (DType::F32, DType::F16),
                (DType::BF16, DType::F32),
                (DType::F16, DType::F32),
                (DType::F64, DType::BF16),
            ] {
                let n = (bytes / from.size()).min(bytes / to.size()) as u64;
                let s = time(ctx, &stream, 3, || {
                    // SAFETY: d_a holds n elements of `from`, d_b room for n of `to` (both
                    // `bytes` long, 256-byte aligned allocations), untouched meanwhile.
                    unsafe { k.launch(&stream, from, to, d_b.ptr, d_a.ptr, n) }
                })?;
                rows.push(row(
                    &format!("convert {from} -> {to} on the GPU (bytes read)"),
                    n as usize * from.size(),
                    s,
                ));
            }
        }
        Err(why) => rows.push(Row {
            what: format!("GPU conversion unavailable: {why}"),
            bytes: 0,
            seconds: 0.0,
            gb_per_s: 0.0,
        }),
    }
    // The CPU path for comparison: one thread, as one worker of the CPU executor.
    let n = bytes.min(512 << 20) / 4;
    let src = vec![0x3Fu8; n * 4];
    let mut dst = vec![0u8; n * 2];
    let mut best = f64::INFINITY;
    for _ in 0..2 {
        let t = std::time::Instant::now();
        convert::convert(DType::F32, DType::BF16, &src, &mut dst)
            .map_err(|e| CoreError::Gpu(e.to_string()))?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    rows.push(row(
        "convert F32 -> BF16 on the CPU, one thread (bytes read)",
        n * 4,
        best,
    ));
    stream.synchronize().map_err(gpu)?;
    Ok((dev.describe(), rows))
}
