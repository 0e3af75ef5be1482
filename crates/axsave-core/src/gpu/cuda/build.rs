//! The conversion kernels: compiled by NVRTC for the bound device (or taken from the
//! [`kernel_cache`] of an earlier run), loaded, and checked against the CPU conversion before
//! any is used.

use std::sync::OnceLock;

use axsave_formats::{DType, convert};
use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg, result as dr};

use crate::error::{CoreError, Result};
use crate::gpu::kernel_cache::{self, KernelKey};
use crate::gpu::kernels::{self, NVRTC_OPTIONS, PAIRS, SOURCE};
use cudarc::nvrtc::Ptx;

use super::device::{Device, gpu_err, panic_text};
use super::memory::DeviceBuffer;

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
    let versions = versions();
    let key = versions.map(|(nvrtc, driver)| KernelKey {
        source: SOURCE,
        options: NVRTC_OPTIONS,
        nvrtc,
        driver,
        cc: dev.cc,
    });
    let dir = kernel_cache::cache_dir(&|k| std::env::var(k).ok());
    dev.ctx.bind_to_thread().map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    // A cached build when there is one the driver takes; else NVRTC, and the result kept.
    let cached = match (&dir, &key) {
        (Some(dir), Some(key)) => kernel_cache::load(dir, key).and_then(|ptx| {
            match dev.ctx.load_module(Ptx::from_src(ptx)) {
                Ok(m) => {
                    tracing::debug!(
                        "conversion kernels from {}",
                        dir.join(key.file_name()).display()
                    );
                    Some(m)
                }
                Err(e) => {
                    tracing::debug!("cached kernels not loaded ({e}): compiling");
                    None
                }
            }
        }),
        _ => None,
    };
    let how = if cached.is_some() {
        "cached"
    } else {
        "compiled"
    };
    let module = match cached {
        Some(m) => m,
        None => {
            let ptx = compile()?;
            if let (Some(dir), Some(key)) = (&dir, &key) {
                match kernel_cache::store(dir, key, &ptx.to_src()) {
                    Ok(p) => tracing::debug!("conversion kernels kept in {}", p.display()),
                    Err(e) => tracing::debug!("cannot keep the kernels in {}: {e}", dir.display()),
                }
            }
            dev.ctx.load_module(ptx).map_err(|e| {
                format!("the driver cannot load the kernels (an NVRTC newer than the driver?): {e}")
            })?
        }
    };
    let mut funcs = Vec::new();
    for (from, to) in PAIRS {
        let name = kernels::kernel_name(from, to).ok_or("kernel table out of step")?;
        let f = module
            .load_function(name)
            .map_err(|e| format!("{name}: {e}"))?;
        funcs.push(((from, to), f));
    }
    let k = Kernels { funcs };
    tracing::debug!(
        "GPU fixed cost: kernels {how} and loaded in {} ms",
        started.elapsed().as_millis()
    );
    let started = std::time::Instant::now();
    self_test(dev, &k)?;
    tracing::debug!(
        "GPU fixed cost: kernel self-test in {} ms",
        started.elapsed().as_millis()
    );
    Ok(k)
}

/// NVRTC compiles [`SOURCE`] (a few hundred milliseconds; see [`kernel_cache`]).
fn compile() -> std::result::Result<Ptx, String> {
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
    match compiled {
        Ok(Ok(ptx)) => Ok(ptx),
        Ok(Err(e)) => Err(format!("NVRTC could not compile the kernels: {e}")),
        Err(p) => Err(format!("NVRTC is not usable here: {}", panic_text(p))),
    }
}

/// NVRTC's and the driver's versions (part of the cache key), when both say.
fn versions() -> Option<((i32, i32), i32)> {
    let (mut major, mut minor, mut driver) = (0, 0, 0);
    // SAFETY: NVRTC was found loadable above (is_culib_present); nvrtcVersion writes two ints
    // through the pointers, which point at live locals.
    let nvrtc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    // SAFETY: the driver is loaded (a device is bound); cuDriverGetVersion writes one int
    // through the pointer, which points at a live local.
    let drv = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
    (nvrtc == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS
        && drv == cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS)
        .then_some(((major, minor), driver))
}

/// Runs every kernel on [`kernels::self_test_inputs`] and compares with the CPU conversion:
/// kernels that disagree anywhere are not used.
pub(super) fn self_test(dev: &Device, k: &Kernels) -> std::result::Result<(), String> {
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
