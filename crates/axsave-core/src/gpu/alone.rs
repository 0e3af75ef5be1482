//! Whether a save by one process converts on a GPU.

use std::time::Duration;

use super::{LocalGpu, local_caps};
use crate::transport::{Transport, TransportRequest, select};

/// `--transport nccl` where there is no GPU (or no NCCL), or a GPU command in a build without
/// CUDA: the reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GpuUnavailable(pub String);

/// Whether one process converts on a GPU: only with `--transport nccl`, where it must (no GPU
/// fails at once). `auto` never does: a process's own pieces go from disk to disk, where the
/// CPU converts faster than the disk writes and a GPU only adds two PCIe copies, a CUDA
/// context and pinned buffers (see [`crate::route`]); no CUDA is initialised. Returns the GPU
/// and its description.
pub fn single_process_gpu(
    request: TransportRequest,
    device: Option<usize>,
    local_rank: usize,
    timeout: Duration,
) -> Result<Option<(LocalGpu, String)>, GpuUnavailable> {
    if request != TransportRequest::Nccl {
        return Ok(None);
    }
    let mut caps = local_caps(request, device, local_rank);
    if caps.gpu.is_ok() {
        caps.nccl = Ok("not needed by one process".into());
    }
    let choice = select(request, std::slice::from_ref(&caps), false)
        .map_err(|e| GpuUnavailable(e.to_string()))?;
    match (choice.transport, caps.gpu) {
        (Transport::Nccl, Ok(desc)) => Ok(Some((LocalGpu { device, timeout }, desc))),
        (_, gpu) => Err(GpuUnavailable(format!(
            "--transport nccl needs a GPU: {}",
            gpu.err().unwrap_or_default()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_and_host_transports_never_look_for_a_gpu() {
        for r in [
            TransportRequest::Auto,
            TransportRequest::Tcp,
            TransportRequest::Mpi,
        ] {
            let got = single_process_gpu(r, Some(999), 0, Duration::from_secs(1)).unwrap();
            assert!(got.is_none(), "{r:?}");
        }
    }
}
