//! A save with one process per rank, in four phases under a short [`run`]:
//!
//! 1. **Join** (`join`): every rank says hello in the store (its world size and a fingerprint
//!    of its arguments; rank 0 refuses a mismatch), rank 0 announces the run's tag; the ranks
//!    agree on a transport (`gpu`).
//! 2. **Catalog** (`catalog`): every rank lists what it sees of the source. When all see the
//!    same files (a shared filesystem) rank 0 reads the catalog alone; otherwise every rank
//!    reads the part it sees and rank 0 merges the parts. Rank 0 makes the layout and the plan
//!    and broadcasts them.
//! 3. **Data plane** (`data_plane`): writers create their files under temporary names and
//!    listen; every rank copies the pieces it reads, into its own files or to their writer over
//!    TCP, MPI or NCCL.
//! 4. **Commit** (`commit`): each rank reports success; once all have, rank 0 renames every
//!    file into place and says so; only then do the ranks exit 0.
//!
//! A watchdog thread per rank beats a heartbeat and watches the failure flag and the others'
//! heartbeats; any failure anywhere cancels every rank, which then removes the temporaries it
//! can see and exits non-zero. No final-named file appears unless every rank succeeded.

mod borrow;
mod catalog;
mod commit;
mod data_plane;
mod gpu;
pub mod identity;
pub mod inventory;
pub(crate) mod join;
pub mod remote;
pub mod token;
pub mod watchdog;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axsave_dist::store::rendezvous::{receive_broadcast, wait_watching_failure};
use axsave_dist::{StoreClient, World};
use axsave_formats::DType;

use crate::error::{CoreError, Result};
use crate::layout::LayoutOptions;
use crate::plan::Mode;
use crate::transport::{Transport, TransportRequest};

pub use crate::host::hostname;
pub use crate::report::{OutputFileReport, sha256_file};
pub use remote::Net;
pub use token::{hex, random_token, unhex};
use watchdog::Shared;

/// Options of a multi-rank save (identical on every rank, checked at the rendezvous).
#[derive(Clone, Debug)]
pub struct DistOptions {
    /// `--source`, placeholders not yet expanded.
    pub source: String,
    /// The output directory.
    pub output: PathBuf,
    /// Output shape (`min_files` is raised to the world size in sharded mode).
    pub layout: LayoutOptions,
    /// Gather or sharded.
    pub mode: Mode,
    /// Memory the copy and network buffers may use.
    pub memory_budget: u64,
    /// Replace an existing model.
    pub force: bool,
    /// Copy threads.
    pub workers: usize,
    /// How long a silent peer is tolerated.
    pub timeout: Duration,
    /// How long to wait for every rank to join.
    pub rendezvous_timeout: Duration,
    /// Compute the SHA-256 of every output file.
    pub checksums: bool,
    /// A digest of the arguments that must agree across ranks.
    pub fingerprint: String,
    /// Files rank 0 writes beside the weights (tokenizer, config).
    pub extras: crate::axolotl::Extras,
    /// `--transport`.
    pub transport: TransportRequest,
    /// `--device`: the GPU to bind instead of the local rank's.
    pub device: Option<usize>,
    /// Whether the MPI transport can be used ([`crate::transport::mpi_available`]).
    pub mpi_available: bool,
    /// The job token every data connection must present, when the launcher gave every rank
    /// the same one through a private channel (`axsave launch`'s `AXSAVE_JOB_TOKEN`, the MPI
    /// bootstrap). Without one, rank 0 mints a token and hands it out through the store, which
    /// still keeps out connections of other runs but proves nothing against whoever can read
    /// the store.
    pub job_token: Option<[u8; axsave_dist::data_plane::TOKEN_LEN]>,
}

/// What rank 0 reports after a successful save.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DistReport {
    /// Output files: path, size, SHA-256 (when asked for).
    pub files: Vec<OutputFileReport>,
    /// Tensors written.
    pub tensors: usize,
    /// Tensor bytes written.
    pub bytes: u64,
    /// Bytes that crossed the network between ranks.
    pub network_bytes: u64,
    /// Wall time on rank 0.
    pub seconds: f64,
    /// Ranks.
    pub world_size: usize,
    /// The source format.
    pub format: String,
    /// How the work was spread.
    pub mode: Mode,
    /// Tensors left out of the output (not under `model`).
    pub left_out: Vec<String>,
    /// Files of a replaced model that were removed.
    pub replaced: Vec<String>,
    /// Output dtypes written, and how many tensors each.
    pub dtypes: Vec<(DType, usize)>,
    /// Notes from the reader.
    pub notes: Vec<String>,
    /// Whether rank 0 read the whole catalog itself (shared filesystem) or merged parts.
    pub shared_source: bool,
    /// The transport between ranks (the cross-node one when bytes crossed nodes).
    pub transport: Transport,
    /// The way each class of bytes took, and why ([`crate::route`]).
    pub route: Vec<crate::route::Leg>,
}

/// Progress of the whole run as this rank sees it (rank 0 sees all ranks).
pub use crate::progress::Progress;

/// A value for the store. Our own types always serialize; a failure is a bug.
fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| CoreError::Internal(format!("cannot serialize: {e}")))
}

/// A value another rank put in the store, named `what` in the error.
fn unjson<T: serde::de::DeserializeOwned>(b: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(b).map_err(|source| CoreError::Malformed {
        what: what.into(),
        source,
    })
}

/// Runs this rank's part of a save. Returns the report on rank 0, `None` on the others.
pub fn run(
    world: &World,
    opts: &DistOptions,
    progress: Arc<Progress>,
    net: Net,
) -> Result<Option<DistReport>> {
    let start = Instant::now();
    let (server, mut client) = join::connect_store(
        world,
        &world.store_namespace(),
        opts.rendezvous_timeout,
        opts.timeout,
    )?;
    let shared = Arc::new(Shared {
        progress: progress.clone(),
        ..Shared::default()
    });
    // A signal cancels the run like a failure (see `crate::interrupt`).
    crate::interrupt::watch(&shared.cancel);
    let mut rank = Rank {
        world,
        opts,
        client: &mut client,
        shared: shared.clone(),
        run_files: None,
        guard: None,
        lock: None,
        reported: false,
    };
    let result = rank.run(start, &progress, &net);
    if let Err(e) = &result {
        shared.announce(rank.client, world.rank, e);
        rank.cleanup();
    }
    // Our own connections go first, so that the server counts only the others'.
    drop(rank);
    drop(client);
    watchdog::close_server(server, opts.timeout);
    result.map_err(|e| shared.cancel.explain(e))
}

/// One rank of the run: its view of the world, its store connection, and what it must undo
/// after a failure. The phases are its methods, one file each.
struct Rank<'a> {
    world: &'a World,
    opts: &'a DistOptions,
    client: &'a mut StoreClient,
    shared: Arc<Shared>,
    /// Output directory and run tag, from the join on. On failure this rank removes every
    /// temporary of the run it can see (a dead rank's too when the directory is shared, even
    /// one made before this rank learnt the file names) and rank 0's sharded-mode marker.
    run_files: Option<(PathBuf, String)>,
    /// The run, registered for the signal backstop ([`crate::interrupt::abandon`]).
    guard: Option<crate::interrupt::RunGuard>,
    /// Rank 0: the output directory's lock, from the plan to the end of the commit.
    lock: Option<crate::lock::OutputLock>,
    /// Whether this rank reported its part written (`ok/{rank}`).
    reported: bool,
}

impl Rank<'_> {
    /// The phases in order.
    fn run(
        &mut self,
        start: Instant,
        progress: &Progress,
        net: &Net,
    ) -> Result<Option<DistReport>> {
        let joined = self.join()?;
        let bundle = self.catalog(&joined.tag)?;
        let route = self.agree_route(&bundle)?;
        progress.total.store(
            crate::progress::total_bytes(&bundle.layout),
            Ordering::Relaxed,
        );
        let files = self.create_files(&bundle, &joined.tag)?;
        self.move_data(
            &route,
            net,
            &bundle,
            files.as_ref(),
            &joined.tag,
            joined.token,
        )?;
        self.check_cancel()?;
        let info = commit::CommitInfo { start, route };
        self.commit(bundle, files, joined, info, progress)
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.opts.rendezvous_timeout
    }

    /// A deadline for steps that only wait on peers that are alive: the watchdog cancels the
    /// run when one is not, so this only bounds a store that answers but never delivers.
    fn far(&self) -> Instant {
        Instant::now() + Duration::from_secs(7 * 24 * 3600)
    }

    /// The run's cancel flag, shared with transports that watch it.
    fn shared_cancel(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.shared.cancel.flag().clone()
    }

    fn check_cancel(&self) -> Result<()> {
        self.shared.cancel.check()
    }

    /// Waits for keys, cancelled by the watchdog.
    fn wait_keys(&mut self, keys: &[&str], deadline: Instant) -> Result<()> {
        loop {
            self.check_cancel()?;
            let slice = deadline.min(Instant::now() + Duration::from_secs(1));
            match wait_watching_failure(self.client, keys, slice) {
                Ok(()) => return Ok(()),
                Err(axsave_dist::store::CoordError::Timeout { .. })
                    if Instant::now() < deadline =>
                {
                    continue;
                }
                Err(axsave_dist::store::CoordError::PeerFailed { rank, message }) => {
                    self.shared.fail(format!("rank {rank} failed: {message}"));
                    return Err(CoreError::Cancelled);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn receive(&mut self, key: &str, deadline: Instant) -> Result<Vec<u8>> {
        let header = format!("bcast/{key}");
        self.wait_keys(&[&header], deadline)?;
        Ok(receive_broadcast(self.client, key, deadline)?)
    }
}

/// "ranks 1, 2, 5" or "ranks 1, 2, …, 10 and 99990 more": at most `max` numbers.
fn rank_list(ranks: &[usize], max: usize) -> String {
    let shown: Vec<String> = ranks.iter().take(max).map(|r| r.to_string()).collect();
    let word = if ranks.len() == 1 { "rank" } else { "ranks" };
    if ranks.len() > max {
        format!("{word} {} and {} more", shown.join(", "), ranks.len() - max)
    } else {
        format!("{word} {}", shown.join(", "))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Runs `phases` on two ranks (threads of this process) against a real store, with
    /// `fingerprints[r]` as rank r's arguments, `source` (placeholders allowed) and `output`.
    pub(in crate::distributed) fn two_ranks<T: Send + 'static>(
        fingerprints: [&str; 2],
        source: &str,
        output: &std::path::Path,
        phases: impl Fn(&mut Rank<'_>) -> Result<T> + Send + Sync + 'static,
    ) -> Vec<Result<T>> {
        use axsave_dist::{ServerOptions, StoreServer};
        let server = StoreServer::start(ServerOptions {
            bind: vec![std::net::SocketAddr::from(([127, 0, 0, 1], 0))],
            port: 0,
            ..ServerOptions::default()
        })
        .unwrap();
        let run_id = hex(&random_token());
        let phases = Arc::new(phases);
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let world = World {
                    rank,
                    world_size: 2,
                    local_rank: rank,
                    master_addr: Some("127.0.0.1".into()),
                    master_port: server.port(),
                    run_id: Some(run_id.clone()),
                    use_agent_store: true,
                    ..World::single()
                };
                let opts = DistOptions {
                    source: source.into(),
                    output: output.to_path_buf(),
                    layout: Default::default(),
                    mode: Mode::Gather,
                    memory_budget: 1 << 26,
                    force: false,
                    workers: 1,
                    timeout: Duration::from_secs(20),
                    rendezvous_timeout: Duration::from_secs(3),
                    checksums: false,
                    fingerprint: fingerprints[rank].into(),
                    extras: Default::default(),
                    transport: TransportRequest::Tcp,
                    device: None,
                    mpi_available: false,
                    job_token: None,
                };
                let phases = phases.clone();
                std::thread::spawn(move || {
                    let (_, mut client) = join::connect_store(
                        &world,
                        &world.store_namespace(),
                        opts.rendezvous_timeout,
                        opts.timeout,
                    )?;
                    let mut rank = Rank {
                        world: &world,
                        opts: &opts,
                        client: &mut client,
                        shared: Arc::new(Shared::default()),
                        run_files: None,
                        guard: None,
                        lock: None,
                        reported: false,
                    };
                    phases(&mut rank)
                })
            })
            .collect();
        let results = handles.into_iter().map(|h| h.join().unwrap()).collect();
        server.shutdown();
        results
    }

    #[test]
    fn rank_lists_are_short() {
        assert_eq!(rank_list(&[3], 10), "rank 3");
        assert_eq!(rank_list(&[1, 2, 5], 10), "ranks 1, 2, 5");
        let many: Vec<usize> = (1..=100_000).collect();
        assert_eq!(rank_list(&many, 3), "ranks 1, 2, 3 and 99997 more");
    }

    #[test]
    fn malformed_values_from_a_peer_say_what_they_were() {
        let e = unjson::<Vec<u32>>(b"nope", "inventory").unwrap_err();
        assert!(matches!(e, CoreError::Malformed { .. }));
        assert!(
            e.to_string()
                .starts_with("malformed inventory from another rank: ")
        );
    }
}
