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

mod build;
mod device;
mod engine;
mod memory;
#[cfg(test)]
mod tests;

pub use build::{Kernels, convert_on_device, kernels};
pub use device::{Device, device};
pub use engine::CudaEngine;
pub use memory::{DeviceBuffer, PinnedBuffer};
