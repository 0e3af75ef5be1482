//! The GPU executor as a save runs it (feature `cuda`): with other ranks over the GPUs' data
//! plane (NCCL; [`run_ranks`], called by the coordinator when the transport is NCCL), or alone
//! ([`run_local`]).

use std::sync::Arc;
use std::time::Duration;

use axsave_dist::data_plane::{DevicePlane, DevicePlaneId, DevicePlaneOptions};

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

/// What rank 0 decides for everyone: the sizes the schedule is computed with, and the id of
/// the GPUs' data plane (only when bytes cross ranks).
#[derive(serde::Serialize, serde::Deserialize)]
struct Setup {
    sizing: Sizing,
    plane_id: Option<String>,
}

/// Options of [`run_ranks`].
#[derive(Clone)]
pub struct RanksOptions {
    /// Number of ranks.
    pub world_size: usize,
    /// `--device`.
    pub device: Option<usize>,
    /// This rank's local rank (picks the device).
    pub local_rank: usize,
    /// No progress for this long fails the run (and aborts the data plane).
    pub timeout: Duration,
    /// How long every rank may take to join the data plane.
    pub init_timeout: Duration,
    /// Whether the run was cancelled (another rank failed): the plane's watchdog aborts then.
    pub cancelled: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// This rank's part of a save over NCCL. `work.sizing` is this rank's proposal; rank 0's is
/// the one every rank uses. Rank 0 makes the data plane's id when the plan moves bytes between
/// ranks (every rank knows whether it does: the plan is the same everywhere); every rank then
/// binds its GPU, joins the plane, and runs its rounds.
pub fn run_ranks(ex: &mut dyn Exchange, mut work: RankWork<'_>, o: &RanksOptions) -> Result<()> {
    let me = work.me;
    let remote = work.plan.network_bytes() > 0;
    let setup = if me == 0 {
        let id = if remote {
            Some(DevicePlaneId::new()?)
        } else {
            None
        };
        let s = Setup {
            sizing: work.sizing,
            plane_id: id.map(|i| i.to_hex()),
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
    let plane = match &setup.plane_id {
        Some(h) => {
            let id = DevicePlaneId::from_hex(h)
                .map_err(|e| CoreError::Remote(format!("the id rank 0 sent: {e}")))?;
            let opts = DevicePlaneOptions {
                init_timeout: o.init_timeout,
                tick: Duration::from_millis(50),
                cancelled: o.cancelled.clone(),
            };
            let bind = Arc::new(move || dev.ctx.bind_to_thread().map_err(|e| e.to_string()));
            let plane = DevicePlane::join(&id, me, o.world_size, opts, bind)?;
            tracing::debug!(
                rank = me,
                "joined the GPUs' data plane (NCCL) of {} ranks",
                o.world_size
            );
            Some(plane)
        }
        None => None,
    };
    let result = {
        let mut engine = CudaEngine::new(
            dev,
            kernels,
            plane.as_ref(),
            setup.sizing.round_bytes as usize,
            o.timeout,
            work.cancel,
        )?;
        run_rank(Some(&mut engine), work)
    };
    match (result, plane) {
        (Ok(()), Some(c)) => {
            // Every transfer this rank takes part in has completed; a shutdown that fails or
            // waits on a slow peer costs nothing but the abort that follows.
            if let Err(e) = c.finish(o.timeout.min(Duration::from_secs(30))) {
                tracing::debug!("NCCL shutdown: {e} (aborted instead)");
            }
            Ok(())
        }
        // Dropping the plane aborts it, so peers fail at once.
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
