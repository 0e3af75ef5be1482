//! The GPU itself (feature `cuda`): binding a device, compiling and checking the conversion
//! kernels, and [`CudaEngine`], which runs the executor's rounds on CUDA streams with NCCL.
//!
//! cudarc is built with `dynamic-loading`: libcuda and libnvrtc are opened on first use, and
//! cudarc *panics* when one is missing. So every entry point here first asks cudarc whether
//! the library is present (`is_culib_present`, which only tries to open it), and the few calls
//! that could still panic on an unusual installation (a driver or NVRTC too old to have a
//! symbol cudarc binds) run under `catch_unwind` as a last resort, turning the panic into the
//! reason this rank has no GPU.
//!
//! The engine manages device memory, pinned host memory and ordering itself, through cudarc's
//! `result` layer and explicit events, rather than cudarc's tracked `CudaSlice`s: the
//! executor's double buffering needs exactly the waits described on [`CudaEngine`] and no
//! others, and every wait must be a poll that a watchdog can interrupt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axsave_dist::transport::nccl::{Comm, NcclError, P2p};
use axsave_formats::{DType, convert};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaStream, DriverError, LaunchConfig, PushKernelArg,
    result as dr, sys as ds,
};

use super::kernels::{self, NVRTC_OPTIONS, PAIRS, SOURCE};
use super::pipeline::Engine;
use super::schedule::{RoundWork, Seg};
use crate::error::{CoreError, Result};

/// The device this process bound.
pub struct Device {
    /// cudarc's handle on the device's primary context.
    pub ctx: Arc<CudaContext>,
    /// The ordinal among the visible devices.
    pub ordinal: usize,
    /// How many devices are visible.
    pub count: usize,
    /// The device name.
    pub name: String,
    /// Compute capability.
    pub cc: (i32, i32),
    /// Device memory, bytes.
    pub total_mem: usize,
    /// The device's UUID (`GPU-…`, as nvidia-smi prints it), or the ordinal when unknown.
    pub uuid: String,
}

impl Device {
    /// `"0: NVIDIA H200 (sm_90, 140 GiB)"`.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} (sm_{}{}, {} GiB)",
            self.ordinal,
            self.name,
            self.cc.0,
            self.cc.1,
            self.total_mem >> 30
        )
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(gpu_err)
    }
}

fn gpu_err(e: DriverError) -> CoreError {
    CoreError::Gpu(format!("CUDA: {e}"))
}

/// The text of a caught panic.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// The device of this process: bound on the first call (`explicit` = `--device`, else the
/// local rank modulo the visible devices), the same answer afterwards. `Err` says why there is
/// no GPU, in words for the log.
pub fn device(
    explicit: Option<usize>,
    local_rank: usize,
) -> std::result::Result<&'static Device, String> {
    static DEVICE: OnceLock<std::result::Result<Device, String>> = OnceLock::new();
    DEVICE
        .get_or_init(|| open_device(explicit, local_rank))
        .as_ref()
        .map_err(Clone::clone)
}

/// Opens a device without binding the process to it (the tests open several).
pub(crate) fn open_device(
    explicit: Option<usize>,
    local_rank: usize,
) -> std::result::Result<Device, String> {
    // SAFETY: is_culib_present only tries to dlopen libcuda's candidate names and closes what
    // it opened; it calls no CUDA function.
    if !unsafe { ds::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so.1 not found)".into());
    }
    // Last resort: cudarc panics on a symbol its bindings expect and this driver lacks.
    let opened = std::panic::catch_unwind(|| -> std::result::Result<Device, String> {
        let count = CudaContext::device_count()
            .map_err(|e| format!("the CUDA driver cannot start: {e}"))?;
        let count = usize::try_from(count).unwrap_or(0);
        let ordinal = super::pick_ordinal(local_rank, count, explicit)?;
        let ctx =
            CudaContext::new(ordinal).map_err(|e| format!("cannot use GPU {ordinal}: {e}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = ctx.compute_capability().unwrap_or((0, 0));
        let total_mem = ctx.total_mem().unwrap_or(0);
        let uuid = match ctx.uuid() {
            Ok(u) => uuid_text(&u.bytes.map(|c| c as u8)),
            Err(_) => format!("{}:ordinal-{ordinal}", hostname()),
        };
        Ok(Device {
            ctx,
            ordinal,
            count,
            name,
            cc,
            total_mem,
            uuid,
        })
    });
    opened.unwrap_or_else(|p| {
        Err(format!(
            "the CUDA driver is not usable here: {}",
            panic_text(p)
        ))
    })
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as nvidia-smi writes a device UUID.
fn uuid_text(b: &[u8; 16]) -> String {
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The compiled conversion kernels.
pub struct Kernels {
    funcs: Vec<((DType, DType), CudaFunction)>,
}

impl Kernels {
    fn get(&self, from: DType, to: DType) -> Option<&CudaFunction> {
        self.funcs
            .iter()
            .find(|(p, _)| *p == (from, to))
            .map(|(_, f)| f)
    }

    /// Enqueues `dst[i] = convert(src[i])` for `n` elements on `stream`.
    ///
    /// # Safety
    ///
    /// `src` holds `n` elements of `from` and `dst` room for `n` of `to`, both device addresses
    /// in the stream's context, aligned to their element size, and they stay allocated and
    /// untouched by other work until the kernel has run.
    pub unsafe fn launch(
        &self,
        stream: &CudaStream,
        from: DType,
        to: DType,
        dst: u64,
        src: u64,
        n: u64,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let f = self
            .get(from, to)
            .ok_or_else(|| CoreError::Gpu(format!("no kernel converts {from} to {to}")))?;
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(f);
        b.arg(&dst).arg(&src).arg(&n);
        // SAFETY: every kernel of SOURCE takes (OUT* dst, const IN* src, u64 n), passed here as
        // three 64-bit values; the addresses are valid for n elements (this function's
        // contract) and the grid-stride loop stays below n.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(gpu_err)
    }
}

/// The kernels for `dev`, compiled once per process. `Err` says why conversions stay on the
/// CPU (no NVRTC, a compile or load failure, or a kernel that disagrees with the CPU).
pub fn kernels(dev: &'static Device) -> std::result::Result<&'static Kernels, String> {
    static KERNELS: OnceLock<std::result::Result<Kernels, String>> = OnceLock::new();
    KERNELS
        .get_or_init(|| build_kernels(dev))
        .as_ref()
        .map_err(Clone::clone)
}

/// Compiles, loads and checks the kernels in `dev`'s context (the tests build one set per
/// device).
pub(crate) fn build_kernels(dev: &Device) -> std::result::Result<Kernels, String> {
    // SAFETY: only tries to dlopen NVRTC's candidate names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC not found (libnvrtc.so or libnvrtc.so.12 on the library path)".into());
    }
    let compiled = std::panic::catch_unwind(|| {
        cudarc::nvrtc::compile_ptx_with_opts(
            SOURCE,
            cudarc::nvrtc::CompileOptions {
                options: NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect(),
                name: Some("axsave_convert.cu".into()),
                ..Default::default()
            },
        )
    });
    let ptx = match compiled {
        Ok(Ok(ptx)) => ptx,
        Ok(Err(e)) => return Err(format!("NVRTC could not compile the kernels: {e}")),
        Err(p) => return Err(format!("NVRTC is not usable here: {}", panic_text(p))),
    };
    dev.ctx.bind_to_thread().map_err(|e| e.to_string())?;
    let module = dev.ctx.load_module(ptx).map_err(|e| {
        format!("the driver cannot load the kernels (an NVRTC newer than the driver?): {e}")
    })?;
    let mut funcs = Vec::new();
    for (from, to) in PAIRS {
        let name = kernels::kernel_name(from, to).ok_or("kernel table out of step")?;
        let f = module
            .load_function(name)
            .map_err(|e| format!("{name}: {e}"))?;
        funcs.push(((from, to), f));
    }
    let k = Kernels { funcs };
    self_test(dev, &k)?;
    Ok(k)
}

/// Runs every kernel on [`kernels::self_test_inputs`] and compares with the CPU conversion:
/// kernels that disagree anywhere are not used.
fn self_test(dev: &Device, k: &Kernels) -> std::result::Result<(), String> {
    for (from, to) in PAIRS {
        let input = kernels::self_test_inputs(from);
        let n = input.len() / from.size();
        let mut want = vec![0u8; n * to.size()];
        convert::convert(from, to, &input, &mut want).map_err(|e| e.to_string())?;
        let got = convert_on_device(dev, k, from, to, &input)?;
        if got != want {
            let es = to.size();
            let i = (0..n)
                .find(|&i| got[i * es..(i + 1) * es] != want[i * es..(i + 1) * es])
                .unwrap_or(0);
            return Err(format!(
                "the GPU kernel for {from} -> {to} disagrees with the CPU at element {i}; converting on the CPU"
            ));
        }
    }
    Ok(())
}

/// Converts `input` (little-endian `from`) on the device with `k` and returns the result: one
/// upload, one kernel, one download, synchronously. For checks and tests, not for the data
/// path.
pub fn convert_on_device(
    dev: &Device,
    k: &Kernels,
    from: DType,
    to: DType,
    input: &[u8],
) -> std::result::Result<Vec<u8>, String> {
    let n = input.len() / from.size();
    dev.ctx.bind_to_thread().map_err(|e| e.to_string())?;
    let stream = dev.ctx.new_stream().map_err(|e| e.to_string())?;
    let d_in = DeviceBuffer::new(&dev.ctx, input.len()).map_err(|e| e.to_string())?;
    let d_out = DeviceBuffer::new(&dev.ctx, n * to.size()).map_err(|e| e.to_string())?;
    let mut got = vec![0u8; n * to.size()];
    // SAFETY: both device buffers are as long as the copies and the kernel need; the host
    // slices outlive the synchronize below, which completes every enqueued operation before
    // they are read or dropped.
    unsafe {
        dr::memcpy_htod_async(d_in.ptr, &input[..n * from.size()], stream.cu_stream())
            .map_err(|e| e.to_string())?;
        k.launch(&stream, from, to, d_out.ptr, d_in.ptr, n as u64)
            .map_err(|e| e.to_string())?;
        dr::memcpy_dtoh_async(&mut got, d_out.ptr, stream.cu_stream())
            .map_err(|e| e.to_string())?;
    }
    stream.synchronize().map_err(|e| e.to_string())?;
    Ok(got)
}

/// Device memory (`cuMemAlloc`), freed on drop.
pub struct DeviceBuffer {
    /// The device address.
    pub ptr: u64,
    /// Bytes.
    pub len: usize,
    ctx: Arc<CudaContext>,
}

impl DeviceBuffer {
    /// Allocates `len` bytes (at least one) in `ctx`.
    pub fn new(
        ctx: &Arc<CudaContext>,
        len: usize,
    ) -> std::result::Result<DeviceBuffer, DriverError> {
        ctx.bind_to_thread()?;
        // SAFETY: plain allocation in the context bound just above; freed once in Drop.
        let ptr = unsafe { dr::malloc_sync(len.max(1)) }?;
        Ok(DeviceBuffer {
            ptr,
            len,
            ctx: ctx.clone(),
        })
    }

    /// The address `off` bytes in.
    pub fn at(&self, off: usize) -> u64 {
        self.ptr + off as u64
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemAlloc in this context and freed only here. The owners
        // drop buffers only after the work using them completed or was aborted.
        if let Err(e) = unsafe { dr::free_sync(self.ptr) } {
            tracing::debug!("cuMemFree: {e}");
        }
    }
}

/// Page-locked host memory (`cuMemHostAlloc` with flags 0: cached, *not* write-combined, so
/// the CPU reads it at full speed), zeroed, freed on drop.
pub struct PinnedBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    ctx: Arc<CudaContext>,
}

impl PinnedBuffer {
    /// Allocates `len` bytes (at least one).
    pub fn new(
        ctx: &Arc<CudaContext>,
        len: usize,
    ) -> std::result::Result<PinnedBuffer, DriverError> {
        ctx.bind_to_thread()?;
        let n = len.max(1);
        // SAFETY: plain allocation; flags 0 = neither portable, mapped nor write-combined.
        let p = unsafe { dr::malloc_host(n, 0) }? as *mut u8;
        let ptr = std::ptr::NonNull::new(p)
            .ok_or(DriverError(ds::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY))?;
        // SAFETY: `n` writable bytes were just allocated at `p`; zeroing them makes the slices
        // below point to initialised memory.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, n) };
        Ok(PinnedBuffer {
            ptr,
            len,
            ctx: ctx.clone(),
        })
    }

    /// The bytes.
    ///
    /// # Safety
    ///
    /// No device operation writing this buffer may be pending (wait for its event first).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes owned by self; no concurrent device write (contract).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, to fill.
    ///
    /// # Safety
    ///
    /// No device operation reading or writing this buffer may be pending.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above; `&mut self` excludes other host access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemHostAlloc, freed only here, after the work using it.
        if let Err(e) = unsafe { dr::free_host(self.ptr.as_ptr() as *mut std::ffi::c_void) } {
            tracing::debug!("cuMemFreeHost: {e}");
        }
    }
}

/// One of the two round slots.
struct Slot {
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

/// Runs rounds on the device: uploads and conversions on stream `up`, NCCL on `net`, downloads
/// on `down`, two slots in flight. The waits that make the reuse of a slot safe:
///
/// * the host refills a slot's staging only after its `staged` (the upload read it);
/// * `up` overwrites d_in/d_out only after `sent` (NCCL read them) and writes local outputs
///   into d_land only after `landed` (the previous download read it);
/// * `net` starts after `staged` (the data is ready) and after `landed` (d_land is free);
/// * `down` starts after `sent`; the host reads landing only after `landed`, and the driver
///   writes a slot's landed bytes out before launching the slot again.
///
/// Every host wait polls its event; with a communicator it is announced to the NCCL watchdog
/// (which aborts on no progress within the timeout, or on an NCCL error) and checks the
/// communicator, and it checks the cancel flag. Any failure aborts the communicator, so the
/// peers fail at once and the device stops instead of waiting on them.
pub struct CudaEngine<'a> {
    dev: &'a Device,
    kernels: Option<&'a Kernels>,
    comm: Option<&'a Comm>,
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
    /// convert on the CPU. `comm`: needed when rounds exchange bytes.
    pub fn new(
        dev: &'a Device,
        kernels: Option<&'a Kernels>,
        comm: Option<&'a Comm>,
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
        let (up, net, down, slots) = alloc().map_err(|e| {
            CoreError::Gpu(format!(
                "cannot allocate {} MiB of round buffers on {}: {e}",
                (5 * 2 * round_bytes) >> 20,
                dev.describe()
            ))
        })?;
        Ok(CudaEngine {
            dev,
            kernels,
            comm,
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
        let guard = self.comm.map(|c| c.watch(what, self.timeout));
        let start = std::time::Instant::now();
        let mut nap = Duration::from_micros(10);
        loop {
            match ev.try_is_complete() {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return Err(gpu_err(e)),
            }
            if let Some(c) = self.comm {
                c.check().map_err(nccl_err)?;
            } else if start.elapsed() > self.timeout {
                // Without NCCL nothing waits on a peer: a device that does not finish local
                // work within the timeout is broken.
                return Err(CoreError::Gpu(format!(
                    "the GPU did not finish {what} within {}s",
                    self.timeout.as_secs()
                )));
            }
            if self.cancel.load(Ordering::Relaxed) {
                if let Some(c) = self.comm {
                    c.abort(NcclError::Cancelled);
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

    /// Marks the engine failed and aborts the communicator (once), passing `e` through.
    fn fail(&mut self, e: CoreError) -> CoreError {
        self.failed = true;
        if let Some(c) = self.comm {
            c.abort(NcclError::Aborted(e.to_string()));
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
            let comm = self.comm.ok_or_else(|| {
                CoreError::Gpu("a round exchanges bytes but there is no NCCL communicator".into())
            })?;
            self.net.wait(&s.staged).map_err(gpu_err)?;
            self.net.wait(&s.landed).map_err(gpu_err)?;
            let ops: Vec<P2p> = w
                .sends
                .iter()
                .map(|b| P2p::Send {
                    ptr: s.d_out.at(b.off),
                    bytes: b.len,
                    peer: b.peer,
                })
                .chain(w.recvs.iter().map(|b| P2p::Recv {
                    ptr: s.d_land.at(b.off),
                    bytes: b.len,
                    peer: b.peer,
                }))
                .collect();
            // SAFETY: `net` belongs to the device's context, on which the communicator was
            // made; the send ranges lie in d_out (written on `up`, which `net` waited for) and
            // the receive ranges in d_land (free: `net` waited for `landed`); neither is
            // touched again before `sent`, recorded next, completes (`up` and `down` wait for
            // it) or the communicator is aborted.
            unsafe {
                comm.exchange(
                    &ops,
                    self.net.cu_stream() as *mut std::ffi::c_void,
                    self.timeout,
                )
            }
            .map_err(nccl_err)?;
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

fn nccl_err(e: NcclError) -> CoreError {
    match e {
        NcclError::Cancelled => CoreError::Cancelled,
        e => CoreError::Gpu(format!("NCCL: {e}")),
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
            && let Some(c) = self.comm
        {
            c.abort(NcclError::Aborted("the GPU executor failed".into()));
        }
        let _ = self.dev.bind();
        for s in [&self.up, &self.net, &self.down] {
            if let Err(e) = s.synchronize() {
                tracing::debug!("stream synchronize at shutdown: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! On a machine with an NVIDIA GPU: the kernels on torch's fixtures, pinned memory flags,
    //! the engine end to end, NCCL with itself and with a second GPU, the watchdog. Without a
    //! GPU each test says why it skips; `AXSAVE_REQUIRE_GPU=1` (scripts/gpu-check.sh) makes
    //! that a failure.

    use super::*;
    use crate::execute::ExecOptions;
    use crate::gpu::tests::{TINY, cpu_output, fixtures, opts};
    use crate::gpu::{RankWork, run_rank};
    use crate::layout::{DtypeChoice, plan_layout};
    use crate::output::OutputFiles;
    use crate::plan::{Mode, make_plan};
    use crate::sources::SourceFiles;
    use axsave_dist::transport::nccl::{CommOptions, UniqueId};
    use std::sync::atomic::AtomicU64;

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
        match Comm::library() {
            Ok((path, v)) => {
                eprintln!("{test}: NCCL {} from {path}", crate::gpu::nccl_version(v));
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
        let r =
            unsafe { ds::cuMemHostGetFlags(&mut flags, b.ptr.as_ptr() as *mut std::ffi::c_void) };
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
            let files = OutputFiles::create(out.path(), &layout, "gpu", |_| true).unwrap();
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
                        std::fs::read(out.path().join(crate::output::temp_name(&name, "gpu")))
                            .unwrap();
                    assert!(
                        got == bytes,
                        "{dtype:?} {sizing:?}: {name} differs from the CPU executor's"
                    );
                }
            }
        }
    }

    /// A communicator of one rank sends a buffer to itself: the NCCL layer (loader, non-blocking
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
        let id = UniqueId::new().unwrap();
        let bind = Arc::new(move || dev.ctx.bind_to_thread().map_err(|e| e.to_string()));
        let comm = Comm::init(&id, 0, 1, CommOptions::default(), bind).unwrap();
        let n = (8 << 20) + 5;
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let a = DeviceBuffer::new(&dev.ctx, n).unwrap();
        let b = DeviceBuffer::new(&dev.ctx, n).unwrap();
        let stream = dev.ctx.new_stream().unwrap();
        let mut back = vec![0u8; n];
        // SAFETY: `a` and `b` hold n bytes; every operation is complete after the synchronize.
        unsafe {
            dr::memcpy_htod_async(a.ptr, &data, stream.cu_stream()).unwrap();
            comm.exchange(
                &[
                    P2p::Send {
                        ptr: a.ptr,
                        bytes: n,
                        peer: 0,
                    },
                    P2p::Recv {
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
        comm.check().unwrap();
        comm.finish(Duration::from_secs(30)).unwrap();
    }

    /// A receive nobody sends never completes: the watchdog aborts the communicator when the
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
        let id = UniqueId::new().unwrap();
        let bind = Arc::new(move || dev.ctx.bind_to_thread().map_err(|e| e.to_string()));
        let comm = Comm::init(&id, 0, 1, CommOptions::default(), bind).unwrap();
        let buf = DeviceBuffer::new(&dev.ctx, 4096).unwrap();
        let stream = dev.ctx.new_stream().unwrap();
        let start = std::time::Instant::now();
        // SAFETY: `buf` holds 4096 bytes and outlives the abort below, which stops the receive.
        let posted = unsafe {
            comm.exchange(
                &[P2p::Recv {
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
        let guard = comm.watch("a receive nobody sends", Duration::from_secs(3));
        let outcome = loop {
            if ev.try_is_complete().unwrap_or(true) {
                break Ok(());
            }
            if let Err(e) = comm.check() {
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
        assert!(matches!(e, NcclError::Timeout { .. }), "{e}");
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
        let id = UniqueId::new().unwrap();
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
                        let comm = Comm::init(id, me, 2, CommOptions::default(), bind).unwrap();
                        let files = (me == 0)
                            .then(|| OutputFiles::create(out, layout, "gpu", |_| true).unwrap());
                        let sources = SourceFiles::new(catalog, &catalog.root);
                        let written = AtomicU64::new(0);
                        let mut engine = CudaEngine::new(
                            dev,
                            Some(k),
                            Some(&comm),
                            TINY.round_bytes as usize,
                            Duration::from_secs(60),
                            cancel,
                        )
                        .unwrap();
                        run_rank(
                            Some(&mut engine),
                            RankWork {
                                catalog,
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
                        comm.finish(Duration::from_secs(30)).unwrap();
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        });
        for (name, bytes) in cpu_output(&catalog, &lopts) {
            let got =
                std::fs::read(out.path().join(crate::output::temp_name(&name, "gpu"))).unwrap();
            assert!(got == bytes, "{name} differs from the CPU executor's");
        }
    }
}
