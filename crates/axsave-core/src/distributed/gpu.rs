//! The GPU side of a multi-rank save: the transport every rank agrees on from every rank's
//! capabilities, and the copy over NCCL through the GPU executor (rank 0's sizes and NCCL id
//! travel through the store).

use axsave_dist::store::rendezvous::broadcast_bytes;

use super::catalog::Bundle;
use super::{Rank, json, unjson};
use crate::error::{CoreError, Result};
#[cfg(feature = "cuda")]
use crate::execute::ExecOptions;
use crate::host::hostname;
use crate::output::OutputFiles;
use crate::plan::Plan;
use crate::route::{Route, classify, needs_caps, route};
use crate::sources::SourceFiles;
use crate::transport::TransportRequest;

impl Rank<'_> {
    /// Every rank routes each class of bytes the same way ([`crate::route`]) from the same
    /// plan and, when the rule needs them, the same reports of every rank's GPU and NCCL. A save
    /// in which nothing crosses nodes asks for none (`auto`): no rank initialises CUDA.
    /// `--transport nccl` on a rank without a GPU or NCCL fails here, at once; the failure
    /// flag then stops the others.
    pub(super) fn agree_route(&mut self, bundle: &Bundle) -> Result<Route> {
        let (me, n) = (self.world.rank, self.world.world_size);
        let o = self.opts;
        let bytes = classify(&bundle.plan, &bundle.nodes);
        let route = if !needs_caps(o.transport, &bytes) {
            route(o.transport, bytes, &[], o.mpi_available)?
        } else {
            let caps = crate::gpu::local_caps(o.transport, o.device, self.world.local_rank);
            if o.transport == TransportRequest::Nccl
                && let Some(why) = caps.nccl_missing()
            {
                return Err(CoreError::Gpu(format!(
                    "--transport nccl, but rank {me} (on {}) cannot use NCCL: {why}",
                    hostname()
                )));
            }
            tracing::debug!(rank = me, "GPU: {:?}, NCCL: {:?}", caps.gpu, caps.nccl);
            broadcast_bytes(self.client, &format!("caps/{me}"), &json(&caps)?)?;
            let mut all = Vec::with_capacity(n);
            for r in 0..n {
                let d = self.deadline();
                all.push(unjson(
                    &self.receive(&format!("caps/{r}"), d)?,
                    "capabilities",
                )?);
            }
            route(o.transport, bytes, &all, o.mpi_available)?
        };
        if me == 0 {
            for line in route.lines() {
                tracing::info!("{line}");
            }
        }
        Ok(route)
    }

    /// The data plane over NCCL: the GPU executor.
    #[cfg(feature = "cuda")]
    pub(super) fn execute_nccl(
        &mut self,
        bundle: &Bundle,
        plan: &Plan,
        local_on_gpu: bool,
        files: Option<&OutputFiles>,
        sources: &SourceFiles,
    ) -> Result<()> {
        let cancel = self.shared.cancel.clone();
        let o = crate::gpu::run::RanksOptions {
            world_size: self.world.world_size,
            device: self.opts.device,
            local_rank: self.world.local_rank,
            timeout: self.opts.timeout,
            init_timeout: self.opts.rendezvous_timeout,
            cancelled: std::sync::Arc::new(move || cancel.is_cancelled()),
        };
        let shared = self.shared.clone();
        let work = crate::gpu::RankWork {
            catalog: &bundle.catalog,
            layout: &bundle.layout,
            plan,
            local_on_gpu,
            sources,
            files,
            me: self.world.rank,
            sizing: crate::gpu::schedule::Sizing::for_budget(self.opts.memory_budget),
            exec: ExecOptions::for_budget(self.opts.memory_budget / 2, self.opts.workers),
            written: &shared.local_written,
            cancel: shared.cancel.flag(),
        };
        crate::gpu::run::run_ranks(self, work, &o)
    }

    /// Without CUDA no rank reports a GPU, so NCCL is never chosen: unreachable in practice.
    #[cfg(not(feature = "cuda"))]
    pub(super) fn execute_nccl(
        &mut self,
        _: &Bundle,
        _: &Plan,
        _: bool,
        _: Option<&OutputFiles>,
        _: &SourceFiles,
    ) -> Result<()> {
        Err(CoreError::Gpu(
            "this axsave was built without CUDA (cargo feature `cuda`)".into(),
        ))
    }
}

/// Rank 0's small values (the GPU setup) travel through the store.
#[cfg(feature = "cuda")]
impl crate::gpu::run::Exchange for Rank<'_> {
    fn publish(&mut self, key: &str, value: &[u8]) -> Result<()> {
        Ok(broadcast_bytes(self.client, key, value)?)
    }
    fn fetch(&mut self, key: &str) -> Result<Vec<u8>> {
        let d = self.deadline();
        self.receive(key, d)
    }
}
