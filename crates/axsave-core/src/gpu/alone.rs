//! Whether a save by one process converts on a GPU.

use std::time::Duration;

use super::{LocalGpu, local_caps};
use crate::transport::{Transport, TransportRequest, select};

/// `--transport nccl` where there is no GPU (or no NCCL), or a GPU command in a build without
/// CUDA: the reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GpuUnavailable(pub String);

/// Whether one process converts on a GPU: with `--transport nccl` it must (no GPU fails at
/// once), with `auto` it does when it can (NCCL itself is not needed without peers), with
/// `tcp`/`mpi` it does not. Returns the GPU and its description.
pub fn single_process_gpu(
    request: TransportRequest,
    device: Option<usize>,
    local_rank: usize,
    timeout: Duration,
) -> Result<Option<(LocalGpu, String)>, GpuUnavailable> {
    if !request.wants_gpu() {
        return Ok(None);
    }
    let mut caps = local_caps(request, device, local_rank);
    if caps.gpu.is_ok() {
        caps.nccl = Ok("not needed by one process".into());
    }
    let choice = select(request, std::slice::from_ref(&caps), false).map_err(GpuUnavailable)?;
    match (choice.transport, caps.gpu) {
        (Transport::Nccl, Ok(desc)) => Ok(Some((LocalGpu { device, timeout }, desc))),
        (_, gpu) => {
            if let Err(why) = gpu {
                tracing::debug!("no GPU ({why}): converting on the CPU");
            }
            Ok(None)
        }
    }
}
