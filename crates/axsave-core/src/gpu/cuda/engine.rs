//! [`CudaEngine`]: the executor's rounds on three CUDA streams, with the GPUs' data plane
//! (NCCL) between ranks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axsave_dist::data_plane::{DeviceOp, DevicePlane};
use cudarc::driver::{CudaEvent, CudaStream, DriverError, result as dr};

use crate::error::{CoreError, Result};
use crate::gpu::pipeline::Engine;
use crate::gpu::schedule::{RoundWork, Seg};

use super::build::Kernels;
use super::device::{Device, gpu_err};
use super::memory::{DeviceBuffer, PinnedBuffer};

/// One of the two round slots.
pub(super) struct Slot {
    /// Host: staged units (stored or output dtype), read by the upload.
    staging: PinnedBuffer,
    /// Host: landed bytes (receives and local outputs), written by the download.
    landing: PinnedBuffer,
    /// Device: the uploaded staging.
    d_in: DeviceBuffer,
    /// Device: outgoing bundles (converted sends).
    d_out: DeviceBuffer,
    /// Device: the image of the landing buffer (receives, local outputs).
    d_land: DeviceBuffer,
    /// Recorded on `up` after the upload and conversions: staging is free, d_out is ready.
    staged: CudaEvent,
    /// Recorded after the exchange (or with `staged` when there is none): d_in and d_out are
    /// free, d_land holds the receives.
    sent: CudaEvent,
    /// Recorded on `down` after the download: landing is filled, d_land is free.
    landed: CudaEvent,
}

/// Runs rounds on the device: uploads and conversions on stream `up`, the exchange with the
/// other ranks (the data plane, NCCL) on `net`, downloads
/// on `down`, two slots in flight. The waits that make the reuse of a slot safe:
///
/// * the host refills a slot's staging only after its `staged` (the upload read it);
/// * `up` overwrites d_in/d_out only after `sent` (NCCL read them) and writes local outputs
///   into d_land only after `landed` (the previous download read it);
/// * `net` starts after `staged` (the data is ready) and after `landed` (d_land is free);
/// * `down` starts after `sent`; the host reads landing only after `landed`, and the driver
///   writes a slot's landed bytes out before launching the slot again.
///
/// Every host wait polls its event; with a data plane it is announced to the plane's watchdog
/// (which aborts on no progress within the timeout, or on a peer's failure) and checks the
/// plane, and it checks the cancel flag. Any failure aborts the plane, so the peers fail at
/// once and the device stops instead of waiting on them.
pub struct CudaEngine<'a> {
    dev: &'a Device,
    kernels: Option<&'a Kernels>,
    plane: Option<&'a DevicePlane>,
    up: Arc<CudaStream>,
    net: Arc<CudaStream>,
    down: Arc<CudaStream>,
    slots: [Slot; 2],
    timeout: Duration,
    cancel: &'a AtomicBool,
    failed: bool,
}

impl<'a> CudaEngine<'a> {
    /// An engine whose rounds use at most `round_bytes` in each buffer. `kernels`: `None` to
    /// convert on the CPU. `plane`: needed when rounds exchange bytes.
    pub fn new(
        dev: &'a Device,
        kernels: Option<&'a Kernels>,
        plane: Option<&'a DevicePlane>,
        round_bytes: usize,
        timeout: Duration,
        cancel: &'a AtomicBool,
    ) -> Result<CudaEngine<'a>> {
        dev.bind()?;
        let ctx = &dev.ctx;
        let slot = || -> std::result::Result<Slot, DriverError> {
            Ok(Slot {
                staging: PinnedBuffer::new(ctx, round_bytes)?,
                landing: PinnedBuffer::new(ctx, round_bytes)?,
                d_in: DeviceBuffer::new(ctx, round_bytes)?,
                d_out: DeviceBuffer::new(ctx, round_bytes)?,
                d_land: DeviceBuffer::new(ctx, round_bytes)?,
                staged: ctx.new_event(None)?,
                sent: ctx.new_event(None)?,
                landed: ctx.new_event(None)?,
            })
        };
        let alloc = || -> std::result::Result<_, DriverError> {
            Ok((
                ctx.new_stream()?,
                ctx.new_stream()?,
                ctx.new_stream()?,
                [slot()?, slot()?],
            ))
        };
        let started = std::time::Instant::now();
        let (up, net, down, slots) = alloc().map_err(|e| {
            CoreError::Gpu(format!(
                "cannot allocate {} MiB of round buffers on {}: {e}",
                (5 * 2 * round_bytes) >> 20,
                dev.describe()
            ))
        })?;
        tracing::debug!(
            "GPU fixed cost: {} MiB pinned and {} MiB device buffers in {} ms",
            (2 * 2 * round_bytes) >> 20,
            (2 * 3 * round_bytes) >> 20,
            started.elapsed().as_millis()
        );
        Ok(CudaEngine {
            dev,
            kernels,
            plane,
            up,
            net,
            down,
            slots,
            timeout,
            cancel,
            failed: false,
        })
    }

    /// Waits for `ev` by polling, watched (see the type's documentation).
    fn wait(&self, ev: &CudaEvent, what: &str) -> Result<()> {
        let guard = self.plane.map(|p| p.watch(what, self.timeout));
        let start = std::time::Instant::now();
        let mut nap = Duration::from_micros(10);
        loop {
            match ev.try_is_complete() {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return Err(gpu_err(e)),
            }
            if let Some(p) = self.plane {
                p.check()?;
            } else if start.elapsed() > self.timeout {
                // Without a plane nothing waits on a peer: a device that does not finish local
                // work within the timeout is broken.
                return Err(CoreError::Gpu(format!(
                    "the GPU did not finish {what} within {}s",
                    self.timeout.as_secs()
                )));
            }
            if self.cancel.load(Ordering::Relaxed) {
                if let Some(p) = self.plane {
                    p.cancel();
                }
                return Err(CoreError::Cancelled);
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
        if let Some(g) = &guard {
            g.progress();
        }
        Ok(())
    }

    /// Marks the engine failed and aborts the data plane (once), passing `e` through.
    fn fail(&mut self, e: CoreError) -> CoreError {
        self.failed = true;
        if let Some(p) = self.plane {
            p.abort(e.to_string());
        }
        e
    }

    fn launch_inner(&mut self, slot: usize, w: &RoundWork) -> Result<()> {
        self.dev.bind()?;
        let s = &self.slots[slot];
        let cap = s.d_in.len;
        if w.in_len > cap || w.out_len > cap || w.land_len > cap {
            return Err(CoreError::Gpu(format!(
                "a round needs more than the {cap} bytes its buffers have"
            )));
        }
        let up = &self.up;
        up.wait(&s.sent).map_err(gpu_err)?;
        up.wait(&s.landed).map_err(gpu_err)?;
        if w.in_len > 0 {
            // SAFETY: `staging()` returned this slot's buffer only after its previous upload
            // completed, and the host does not touch it again until `staged` (recorded below)
            // completes; d_in holds at least in_len bytes (checked above).
            unsafe {
                let src = &s.staging.as_slice()[..w.in_len];
                dr::memcpy_htod_async(s.d_in.ptr, src, up.cu_stream()).map_err(gpu_err)?;
            }
        }
        let convert = |seg: &Seg, dst: u64| -> Result<()> {
            let src = s.d_in.at(seg.in_off);
            if seg.from == seg.to {
                // SAFETY: both ranges lie in their buffers (the round fits, offsets come from
                // RoundWork) and are ordered on `up` after the upload.
                unsafe { dr::memcpy_dtod_async(dst, src, seg.out_len, up.cu_stream()) }
                    .map_err(gpu_err)
            } else {
                let k = self.kernels.ok_or_else(|| {
                    CoreError::Gpu(
                        "a conversion was staged for the device, which has no kernels".into(),
                    )
                })?;
                let n = (seg.in_len / seg.from.size()) as u64;
                // SAFETY: n elements of `from` at src and room for n of `to` at dst, both in
                // this slot's buffers at 16-byte aligned offsets, ordered on `up` after the
                // upload and before `staged`.
                unsafe { k.launch(up, seg.from, seg.to, dst, src, n) }
            }
        };
        for b in &w.sends {
            for seg in &b.segs {
                convert(seg, s.d_out.at(seg.out_off))?;
            }
        }
        for seg in &w.locals {
            convert(seg, s.d_land.at(seg.out_off))?;
        }
        s.staged.record(up).map_err(gpu_err)?;
        if w.sends.is_empty() && w.recvs.is_empty() {
            s.sent.record(up).map_err(gpu_err)?;
        } else {
            let plane = self.plane.ok_or_else(|| {
                CoreError::Internal("a round exchanges bytes but there is no data plane".into())
            })?;
            self.net.wait(&s.staged).map_err(gpu_err)?;
            self.net.wait(&s.landed).map_err(gpu_err)?;
            let ops: Vec<DeviceOp> = w
                .sends
                .iter()
                .map(|b| DeviceOp::Send {
                    ptr: s.d_out.at(b.off),
                    bytes: b.len,
                    peer: b.peer,
                })
                .chain(w.recvs.iter().map(|b| DeviceOp::Recv {
                    ptr: s.d_land.at(b.off),
                    bytes: b.len,
                    peer: b.peer,
                }))
                .collect();
            // SAFETY: `net` belongs to the device's context, on which the plane was joined;
            // the send ranges lie in d_out (written on `up`, which `net` waited for) and the
            // receive ranges in d_land (free: `net` waited for `landed`); neither is touched
            // again before `sent`, recorded next, completes (`up` and `down` wait for it) or
            // the plane is aborted.
            unsafe {
                plane.exchange(
                    &ops,
                    self.net.cu_stream() as *mut std::ffi::c_void,
                    self.timeout,
                )
            }?;
            s.sent.record(&self.net).map_err(gpu_err)?;
        }
        self.down.wait(&s.sent).map_err(gpu_err)?;
        if w.land_len > 0 {
            // SAFETY: the driver wrote this slot's previous landed bytes out before launching
            // it again and reads the buffer only after `landed` (recorded below); d_land holds
            // land_len bytes, complete once `sent` has (waited for above).
            unsafe {
                let s = &mut self.slots[slot];
                let dst = &mut s.landing.as_mut_slice()[..w.land_len];
                dr::memcpy_dtoh_async(dst, s.d_land.ptr, self.down.cu_stream()).map_err(gpu_err)?;
            }
        }
        self.slots[slot]
            .landed
            .record(&self.down)
            .map_err(gpu_err)?;
        Ok(())
    }
}

impl Engine for CudaEngine<'_> {
    fn converts(&self) -> bool {
        self.kernels.is_some()
    }

    fn staging(&mut self, slot: usize) -> Result<&mut [u8]> {
        if let Err(e) = self.wait(&self.slots[slot].staged, "uploading a round") {
            return Err(self.fail(e));
        }
        // SAFETY: the slot's last upload (the only device access to staging) has completed.
        Ok(unsafe { self.slots[slot].staging.as_mut_slice() })
    }

    fn launch(&mut self, slot: usize, work: &RoundWork) -> Result<()> {
        self.launch_inner(slot, work).map_err(|e| self.fail(e))
    }

    fn landed(&mut self, slot: usize) -> Result<&[u8]> {
        if let Err(e) = self.wait(&self.slots[slot].landed, "receiving a round") {
            return Err(self.fail(e));
        }
        // SAFETY: the slot's download (the only device access to landing) has completed.
        Ok(unsafe { self.slots[slot].landing.as_slice() })
    }
}

impl Drop for CudaEngine<'_> {
    fn drop(&mut self) {
        // After a failure here or anywhere in the run, abort first so no kernel keeps waiting
        // on a peer; then let the streams drain before the buffers they use are freed.
        if (self.failed || self.cancel.load(Ordering::SeqCst))
            && let Some(p) = self.plane
        {
            p.abort("the GPU executor failed");
        }
        let _ = self.dev.bind();
        for s in [&self.up, &self.net, &self.down] {
            if let Err(e) = s.synchronize() {
                tracing::debug!("stream synchronize at shutdown: {e}");
            }
        }
    }
}
