//! Binding the device: whether the CUDA driver is there at all, which GPU this rank takes,
//! and what it is (name, capability, memory, UUID).

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, DriverError, sys as ds};

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

pub(super) fn gpu_err(e: DriverError) -> CoreError {
    CoreError::Gpu(format!("CUDA: {e}"))
}

/// The text of a caught panic.
pub(super) fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
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
        let ordinal = crate::gpu::pick_ordinal(local_rank, count, explicit)?;
        let started = std::time::Instant::now();
        let ctx =
            CudaContext::new(ordinal).map_err(|e| format!("cannot use GPU {ordinal}: {e}"))?;
        tracing::debug!(
            "GPU fixed cost: CUDA context on GPU {ordinal} in {} ms",
            started.elapsed().as_millis()
        );
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = ctx.compute_capability().unwrap_or((0, 0));
        let total_mem = ctx.total_mem().unwrap_or(0);
        let uuid = match ctx.uuid() {
            Ok(u) => uuid_text(&u.bytes.map(|c| c as u8)),
            Err(_) => format!("{}:ordinal-{ordinal}", crate::host::hostname()),
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
pub(super) fn uuid_text(b: &[u8; 16]) -> String {
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
