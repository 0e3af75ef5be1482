//! The GPU executor as a save runs it (feature `cuda`): with other ranks over NCCL
//! ([`run_nccl`], called by the coordinator when the transport is NCCL), or alone
//! ([`run_local`]).

use std::sync::Arc;
use std::time::Duration;

use axsave_dist::data_plane::nccl::{Comm, CommOptions, UniqueId};

use super::cuda::{self, CudaEngine};
use super::schedule::Sizing;
use super::{LocalGpu, RankWork, run_rank};
use crate::error::{CoreError, Result};

/// How the coordinator lets rank 0 hand small values to every rank (the store, or MPI).
pub trait Exchange {
    /// Makes `value` readable by every rank under `key` (called on rank 0).
    fn publish(&mut self, key: &str, value: &[u8]) -> Result<()>;
    /// Waits for `key` (published by rank 0) and returns its value; gives up when the run is
    /// cancelled or the rendezvous deadline passes.
    fn fetch(&mut self, key: &str) -> Result<Vec<u8>>;
}

/// What rank 0 decides for everyone: the sizes the schedule is computed with, and the NCCL id
/// (only when bytes cross ranks).
#[derive(serde::Serialize, serde::Deserialize)]
struct Setup {
    sizing: Sizing,
    nccl_id: Option<String>,
}

/// Options of [`run_nccl`].
#[derive(Clone)]
pub struct NcclOptions {
    /// Number of ranks.
    pub world_size: usize,
    /// `--device`.
    pub device: Option<usize>,
    /// This rank's local rank (picks the device).
    pub local_rank: usize,
    /// No progress for this long fails the run (and aborts the communicator).
    pub timeout: Duration,
    /// How long every rank may take to join the communicator.
    pub init_timeout: Duration,
    /// Whether the run was cancelled (another rank failed): the NCCL watchdog aborts then.
    pub cancelled: Arc<dyn Fn() -> bool + Send + Sync>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// This rank's part of a save over NCCL. `work.sizing` is this rank's proposal; rank 0's is
/// the one every rank uses. Rank 0 makes the NCCL id when the plan moves bytes between ranks
/// (every rank knows whether it does: the plan is the same everywhere); every rank then joins
/// the communicator, binds its GPU, and runs its rounds.
pub fn run_nccl(ex: &mut dyn Exchange, mut work: RankWork<'_>, o: &NcclOptions) -> Result<()> {
    let me = work.me;
    let remote = work.plan.network_bytes() > 0;
    let setup = if me == 0 {
        let id = if remote {
            Some(UniqueId::new().map_err(|e| CoreError::Gpu(format!("NCCL: {e}")))?)
        } else {
            None
        };
        let s = Setup {
            sizing: work.sizing,
            nccl_id: id.map(|i| hex(i.as_bytes())),
        };
        let bytes = serde_json::to_vec(&s).map_err(|e| CoreError::Internal(e.to_string()))?;
        ex.publish("gpu/setup", &bytes)?;
        s
    } else {
        serde_json::from_slice(&ex.fetch("gpu/setup")?)
            .map_err(|e| CoreError::Remote(format!("malformed GPU setup from rank 0: {e}")))?
    };
    work.sizing = setup.sizing;
    let dev = cuda::device(o.device, o.local_rank).map_err(CoreError::Gpu)?;
    dev.bind()?;
    let kernels = match cuda::kernels(dev) {
        Ok(k) => Some(k),
        Err(why) => {
            tracing::info!("conversions on the CPU: {why}");
            None
        }
    };
    let comm = match &setup.nccl_id {
        Some(h) => {
            let id = unhex(h)
                .ok_or_else(|| CoreError::Remote("malformed NCCL id from rank 0".into()))
                .and_then(|b| {
                    UniqueId::from_bytes(&b).map_err(|e| CoreError::Remote(e.to_string()))
                })?;
            let opts = CommOptions {
                init_timeout: o.init_timeout,
                tick: Duration::from_millis(50),
                cancelled: o.cancelled.clone(),
            };
            let bind = Arc::new(move || dev.ctx.bind_to_thread().map_err(|e| e.to_string()));
            let comm = Comm::init(&id, me, o.world_size, opts, bind)
                .map_err(|e| CoreError::Gpu(format!("NCCL: {e}")))?;
            tracing::debug!(
                rank = me,
                "joined the NCCL communicator of {} ranks",
                o.world_size
            );
            Some(comm)
        }
        None => None,
    };
    let result = {
        let mut engine = CudaEngine::new(
            dev,
            kernels,
            comm.as_ref(),
            setup.sizing.round_bytes as usize,
            o.timeout,
            work.cancel,
        )?;
        run_rank(Some(&mut engine), work)
    };
    match (result, comm) {
        (Ok(()), Some(c)) => {
            // Every transfer this rank takes part in has completed; a shutdown that fails or
            // waits on a slow peer costs nothing but the abort that follows.
            if let Err(e) = c.finish(o.timeout.min(Duration::from_secs(30))) {
                tracing::debug!("NCCL shutdown: {e} (aborted instead)");
            }
            Ok(())
        }
        // Dropping the communicator aborts it, so peers fail at once.
        (r, _) => r,
    }
}

/// A save by one process: conversions through the GPU when its kernels work, copies (and
/// conversions otherwise) on the CPU.
pub fn run_local(work: RankWork<'_>, g: &LocalGpu) -> Result<()> {
    let dev = cuda::device(g.device, 0).map_err(CoreError::Gpu)?;
    dev.bind()?;
    let kernels = match cuda::kernels(dev) {
        Ok(k) => k,
        Err(why) => {
            tracing::info!("conversions on the CPU: {why}");
            return run_rank(None::<&mut super::pipeline::NoDevice>, work);
        }
    };
    tracing::debug!("conversions on {}", dev.describe());
    let mut engine = CudaEngine::new(
        dev,
        Some(kernels),
        None,
        work.sizing.round_bytes as usize,
        g.timeout,
        work.cancel,
    )?;
    run_rank(Some(&mut engine), work)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_the_hex_round_trip() {
        let b: Vec<u8> = (0..=255u8).collect();
        assert_eq!(unhex(&hex(&b)).unwrap(), b);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }
}
