//! Device memory and page-locked host memory, each freed on drop.

use std::sync::Arc;

use cudarc::driver::{CudaContext, DriverError, result as dr, sys as ds};

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
    /// The host address (the tests read its allocation flags).
    pub(super) ptr: std::ptr::NonNull<u8>,
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
