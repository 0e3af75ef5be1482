//! Phase 3, the data plane: the shared-directory check, this rank's output files under
//! temporary names, then the copy: over NCCL through the GPU executor ([`super::gpu`]), or
//! writers listen and publish where they listen (TCP) and every rank copies the pieces it
//! reads, into its own files or to their writer over TCP or MPI.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axsave_dist::data_plane::TcpOptions;

use super::Rank;
use super::catalog::Bundle;
use super::remote::{Net, PeerSink};
use crate::error::{CoreError, Result, ResultExt};
use crate::execute::{self, CopyJob, ExecOptions, Sink};
use crate::host::hostname;
use crate::output::{OutputFiles, marker_name};
use crate::plan::{Mode, Plan};
use crate::route::{Class, Route, restrict};
use crate::save::LocalSink;
use crate::sources::SourceFiles;
use crate::transport::Transport;
use axsave_dist::address;

/// Frame size for the network: small enough that every rank's buffers stay within the budget.
pub(super) fn frame_bytes(budget: u64, world: usize, workers: usize) -> usize {
    let per = budget / 4 / (world.max(2) as u64 * workers.max(1) as u64);
    per.clamp(64 * 1024, 4 << 20) as usize
}

/// The TCP session number of run `tag`: connections of another run are refused.
pub(super) fn session_of(tag: &str) -> u64 {
    let mut h = crc32fast::Hasher::new();
    h.update(tag.as_bytes());
    (h.finalize() as u64) << 32 | tag.len() as u64
}

impl Rank<'_> {
    /// This rank's output files, when it writes any (after the sharded-mode check that it sees
    /// rank 0's marker, i.e. shares the output directory).
    pub(super) fn create_files(
        &mut self,
        bundle: &Bundle,
        tag: &str,
    ) -> Result<Option<Arc<OutputFiles>>> {
        let me = self.world.rank;
        let opts = self.opts;
        let plan = &bundle.plan;
        let writes = plan.is_writer(me);
        if opts.mode == Mode::Sharded && writes && me != 0 {
            let marker = opts.output.join(marker_name(tag));
            if !marker.exists() {
                return Err(CoreError::Remote(format!(
                    "rank {me} on {} does not see rank 0's marker in {}: --mode sharded needs an output directory every rank shares (use --mode gather otherwise)",
                    hostname(),
                    opts.output.display()
                )));
            }
        }
        if !writes {
            return Ok(None);
        }
        Ok(Some(Arc::new(OutputFiles::create(
            &opts.output,
            &bundle.layout,
            tag,
            opts.memory_budget,
            |f| plan.file_writers[f] == me,
        )?)))
    }

    /// Phase 3: moves every piece this rank reads to its writer and waits for every piece this
    /// rank writes, each class of bytes by its [`Route`]: all through the GPU executor under
    /// `--transport nccl`; under `auto` with bytes crossing nodes over NCCL, the host moves the
    /// rest first (local pieces, same-node ones over TCP or MPI), then every rank meets and
    /// NCCL moves the cross-node pieces; otherwise the host moves everything.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn move_data(
        &mut self,
        route: &Route,
        net: &Net,
        bundle: &Bundle,
        files: Option<&Arc<OutputFiles>>,
        tag: &str,
        token: [u8; axsave_dist::data_plane::TOKEN_LEN],
    ) -> Result<()> {
        let sources =
            SourceFiles::with_paths(&bundle.catalog, &bundle.catalog.root, &bundle.borrowed);
        let Some(host) = route.host_transport() else {
            return self.execute_nccl(
                bundle,
                &bundle.plan,
                true,
                files.map(|f| f.as_ref()),
                &sources,
            );
        };
        if !route.split() {
            return self.move_by_host(host, net, bundle, &bundle.plan, &sources, files, tag, token);
        }
        let nodes = &bundle.nodes;
        let cross = |a: &crate::plan::Assignment| Class::of(a, nodes) == Class::CrossNode;
        let on_host = restrict(&bundle.plan, |a| !cross(a));
        self.move_by_host(host, net, bundle, &on_host, &sources, files, tag, token)?;
        // NCCL's communicator forms only when every rank is there: after the host part.
        self.barrier("hostpart")?;
        let over_nccl = restrict(&bundle.plan, cross);
        self.execute_nccl(
            bundle,
            &over_nccl,
            false,
            files.map(|f| f.as_ref()),
            &sources,
        )
    }

    /// Every rank sets `{name}/{rank}` and waits for the others' (the watchdog cancels the
    /// wait when a rank dies).
    fn barrier(&mut self, name: &str) -> Result<()> {
        let me = self.world.rank;
        self.client.set(&format!("{name}/{me}"), b"1")?;
        let keys: Vec<String> = (0..self.world.world_size)
            .map(|r| format!("{name}/{r}"))
            .collect();
        let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        let d = self.far();
        self.wait_keys(&keys, d)
    }

    /// Moves the pieces of `plan` (the whole plan, or the part the host carries) over `transport`
    /// (TCP or MPI): every rank copies what it reads into its own files or to the writer.
    #[allow(clippy::too_many_arguments)]
    fn move_by_host(
        &mut self,
        transport: Transport,
        net: &Net,
        bundle: &Bundle,
        plan: &Plan,
        sources: &SourceFiles,
        files: Option<&Arc<OutputFiles>>,
        tag: &str,
        token: [u8; axsave_dist::data_plane::TOKEN_LEN],
    ) -> Result<()> {
        let (me, n) = (self.world.rank, self.world.world_size);
        let opts = self.opts;
        let (catalog, layout) = (&bundle.catalog, &bundle.layout);
        let expected = plan.bytes_received_by(me);
        let tcp = TcpOptions {
            session: session_of(tag),
            token,
            frame_bytes: frame_bytes(opts.memory_budget, n, opts.workers),
            io_timeout: opts.timeout,
        };
        // MPI carries the pieces only when it was chosen; otherwise TCP does.
        let plane = match transport {
            Transport::Mpi => net.plane(tcp),
            _ => Net::Tcp.plane(tcp),
        };
        let mut receiver = None;
        if expected > 0 {
            let files: Arc<OutputFiles> = files
                .cloned()
                .ok_or_else(|| CoreError::Internal("a receiver without files".into()))?;
            if plane.is_mpi() {
                let (r, _) = plane
                    .receive(files, IpAddr::from([0, 0, 0, 0]))
                    .context(|| "cannot receive over MPI".into())?;
                receiver = Some(r);
            } else {
                // Listen on the address this rank publishes; on every interface when it is
                // not one of this host's, as an `AXSAVE_ADDR` behind NAT may be.
                let ip = self.publish_ip()?;
                let bind = if address::is_local(ip) {
                    ip
                } else if ip.is_ipv4() {
                    IpAddr::from([0, 0, 0, 0])
                } else {
                    IpAddr::from([0u16; 8])
                };
                let (r, at) = plane
                    .receive(files, bind)
                    .context(|| format!("cannot listen for peers on {bind}"))?;
                let port = at.map(|a| a.port()).ok_or_else(|| {
                    CoreError::Internal("a TCP receiver without an address".into())
                })?;
                let addr = SocketAddr::new(ip, port);
                tracing::debug!(rank = me, "peers reach this rank at {addr}");
                self.client
                    .set(&format!("addr/{me}"), addr.to_string().as_bytes())?;
                receiver = Some(r);
            }
        }
        let tasks = plan.tasks_read_by(me);
        let mut peers: Vec<Option<SocketAddr>> = vec![None; n];
        if !plane.is_mpi() {
            for w in tasks
                .iter()
                .map(|t| plan.file_writers[layout.tensors[t.out].file])
            {
                if w != me && peers[w].is_none() {
                    let key = format!("addr/{w}");
                    let d = self.far();
                    self.wait_keys(&[&key], d)?;
                    let a = self.client.get(&key, d)?;
                    let a: SocketAddr = String::from_utf8_lossy(&a).parse().map_err(|e| {
                        CoreError::Remote(format!("rank {w} published a bad address: {e}"))
                    })?;
                    peers[w] = Some(a);
                }
            }
        }
        let job = CopyJob {
            catalog,
            layout,
            sources,
            tasks: &tasks,
            opts: ExecOptions::for_budget(opts.memory_budget, opts.workers),
        };
        let writer_of = |t: &execute::Task| {
            crate::fault::point("copying", me);
            plan.file_writers[layout.tensors[t.out].file]
        };
        let copy = execute::run(
            job,
            &writer_of,
            &|w| -> Result<Box<dyn Sink + '_>> {
                if w == me {
                    let f = files.ok_or_else(|| CoreError::Internal("no local files".into()))?;
                    return Ok(Box::new(LocalSink(f.as_ref())));
                }
                Ok(Box::new(PeerSink::open(
                    &plane,
                    me,
                    w,
                    peers[w],
                    self.shared_cancel(),
                )?))
            },
            &self.shared.local_written,
            self.shared.cancel.flag(),
        );
        let received = match (&receiver, &copy) {
            (Some(r), Ok(())) => r.wait(expected).map(|_| ()).map_err(CoreError::from),
            _ => Ok(()),
        };
        if let Some(r) = receiver.take() {
            r.shutdown();
        }
        copy?;
        received
    }

    /// The address this rank's data listener binds and publishes ([`address::publish`]): the
    /// one its store connection comes from, unless that is loopback and a peer is elsewhere.
    fn publish_ip(&mut self) -> Result<IpAddr> {
        let me = self.world.rank;
        let over = address::override_from_env();
        let own = self
            .client
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let mut peers = Vec::new();
        if over.is_none() && own.is_loopback() {
            for r in (0..self.world.world_size).filter(|&r| r != me) {
                let d = self.deadline();
                let b = self.client.get(&format!("ip/{r}"), d)?;
                if let Ok(ip) = String::from_utf8_lossy(&b).parse::<IpAddr>()
                    && !ip.is_loopback()
                {
                    peers.push(ip);
                    break;
                }
            }
        }
        Ok(address::publish(over, own, &peers, address::route_source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_share_the_budget_between_peers_and_workers() {
        // 256 MiB over 4 ranks and 8 workers: a quarter of it, in 32 frames of 2 MiB.
        assert_eq!(frame_bytes(256 << 20, 4, 8), 2 << 20);
        // Never below 64 KiB, never above 4 MiB.
        assert_eq!(frame_bytes(1 << 20, 64, 16), 64 * 1024);
        assert_eq!(frame_bytes(1 << 40, 2, 1), 4 << 20);
        // A world of one and no workers count as two and one.
        assert_eq!(frame_bytes(8 << 20, 1, 0), frame_bytes(8 << 20, 2, 1));
    }

    #[test]
    fn sessions_differ_between_runs_and_agree_within_one() {
        let a = crate::runtag::RunTag::new().to_string();
        let b = crate::runtag::RunTag::new().to_string();
        assert_eq!(session_of(&a), session_of(&a));
        assert_ne!(session_of(&a), session_of(&b));
        // The low half is the tag's length.
        assert_eq!(session_of("abc") & 0xffff_ffff, 3);
    }
}
