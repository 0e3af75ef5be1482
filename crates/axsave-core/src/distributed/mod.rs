//! A save with one process per rank.
//!
//! 1. **Rendezvous**: every rank says hello in the store (its world size and a fingerprint of
//!    its arguments; rank 0 refuses a mismatch), rank 0 announces the run's tag.
//! 2. **Inventory**: every rank lists what it sees of the source. When all see the same files
//!    (a shared filesystem) rank 0 reads the catalog alone; otherwise every rank reads the part
//!    it sees (DCP metadata travels from the rank that holds it) and rank 0 merges the parts.
//! 3. **Plan**: rank 0 makes the layout and the plan and broadcasts them.
//! 4. **Execute**: writers create their files under temporary names and listen; every rank
//!    copies the pieces it reads, into its own files or over TCP to their writer.
//! 5. **Commit**: each rank reports success; once all have, rank 0 renames every file into place
//!    and says so; only then do the ranks exit 0.
//!
//! A watchdog thread per rank beats a heartbeat and watches the failure flag and the others'
//! heartbeats; any failure anywhere cancels every rank, which then removes the temporaries it
//! can see and exits non-zero. No final-named file appears unless every rank succeeded.

pub mod address;
pub mod identity;
pub mod inventory;
pub mod remote;
pub mod token;
pub mod watchdog;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axsave_dist::store::rendezvous::{
    broadcast_bytes, receive_broadcast, report_failure, wait_watching_failure,
};
use axsave_dist::transport::TcpOptions;
use axsave_dist::{ClientOptions, ServerOptions, StoreClient, StoreServer, World};
use axsave_formats::detect::{self, Detected};
use axsave_formats::{Catalog, DType};

use crate::error::{CoreError, Result};
use crate::execute::{self, CopyJob, ExecOptions, Sink};
use crate::layout::{Layout, LayoutOptions, plan_layout};
use crate::output::{self, OutputFiles};
use crate::plan::{Mode, Plan, make_plan};
use crate::save::{LocalSink, check_output, finalize};
use crate::sources::SourceFiles;
use crate::transport::{Choice, Transport, TransportRequest, select};

use inventory::Inventory;
pub use remote::Net;
use remote::{Incoming, RemoteSink};
use token::token_digest;
pub use token::{hex, random_token, unhex};
use watchdog::{Shared, Watchdog};

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
    pub job_token: Option<[u8; axsave_dist::transport::TOKEN_LEN]>,
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
    /// The transport the ranks agreed on.
    pub transport: Transport,
}

/// One output file.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct OutputFileReport {
    /// Full path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 in hex, when computed.
    pub sha256: Option<String>,
}

/// Progress of the whole run as this rank sees it (rank 0 sees all ranks).
#[derive(Default)]
pub struct Progress {
    /// Total bytes to write (0 until the plan is known).
    pub total: std::sync::atomic::AtomicU64,
    /// Bytes written so far.
    pub done: std::sync::atomic::AtomicU64,
}

/// Everything rank 0 decides and every rank needs.
#[derive(serde::Serialize, serde::Deserialize)]
struct Bundle {
    catalog: Catalog,
    readers: Vec<Vec<usize>>,
    layout: Layout,
    plan: Plan,
    shared_source: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Hello {
    world_size: usize,
    fingerprint: String,
    host: String,
    #[serde(default)]
    pid: u32,
    /// A digest of the job token this rank was given (never the token itself).
    #[serde(default)]
    token_digest: Option<String>,
}

/// Rank 0's word that the run starts: its tag, and the job token when rank 0 minted it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Start {
    tag: String,
    token: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Done {
    files: Vec<(usize, Option<String>)>,
}

/// The keys of the failure flag and the store live under this namespace.
fn connect_store(world: &World, opts: &DistOptions) -> Result<(Option<StoreServer>, StoreClient)> {
    let server = if world.hosts_store() {
        // Where the peers will connect: the addresses MASTER_ADDR names here (see `address`).
        let bind: Vec<SocketAddr> = match &world.master_addr {
            Some(master) => {
                address::store_bind(master, &address::resolve(master), address::is_local)
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, world.master_port))
                    .collect()
            }
            None => Vec::new(),
        };
        let s = StoreServer::start(ServerOptions {
            bind,
            port: world.master_port,
            ..ServerOptions::default()
        })
        .map_err(|e| {
            CoreError::Remote(format!(
                "rank 0 cannot host the rendezvous store on port {}: {e} (set MASTER_PORT to a free port)",
                world.master_port
            ))
        })?;
        tracing::debug!(addrs = ?s.local_addrs(), "the rendezvous store listens");
        Some(s)
    } else {
        None
    };
    let host = world.master_addr.clone().ok_or_else(|| {
        CoreError::Remote(format!(
            "{} started ranks on several nodes and gives no MASTER_ADDR: set MASTER_ADDR to the host of rank 0 (under mpirun, axsave asks PMIx instead when libpmix.so.2 is installed, or MPI when built with --features mpi)",
            world.launcher
        ))
    })?;
    let client_opts = ClientOptions {
        connect_timeout: opts.rendezvous_timeout,
        io_timeout: opts.timeout,
        ..ClientOptions::default()
    };
    let client = StoreClient::connect(&host, world.master_port, client_opts)
        .map_err(|e| {
            CoreError::Remote(format!(
                "cannot reach the rendezvous store at {host}:{}: {e}",
                world.master_port
            ))
        })?
        .with_namespace(&world.store_namespace());
    Ok((server, client))
}

fn remote(e: impl std::fmt::Display) -> CoreError {
    CoreError::Remote(e.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(remote)
}

fn unjson<T: serde::de::DeserializeOwned>(b: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(b)
        .map_err(|e| CoreError::Remote(format!("malformed {what} from another rank: {e}")))
}

/// Runs this rank's part of a save. Returns the report on rank 0, `None` on the others.
pub fn run(
    world: &World,
    opts: &DistOptions,
    progress: Arc<Progress>,
    net: Net,
) -> Result<Option<DistReport>> {
    let start = Instant::now();
    let (server, mut client) = connect_store(world, opts)?;
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
    let interrupted = crate::interrupt::received().filter(|_| shared.failure().is_none());
    if let Err(e) = &result {
        // Tell everyone (unless it is someone else's failure we are echoing), then clean up.
        let msg = match interrupted {
            Some(signal) => CoreError::Interrupted { signal }.to_string(),
            None => e.to_string(),
        };
        if interrupted.is_some()
            || (!matches!(e, CoreError::Cancelled) && shared.failure().is_none())
        {
            let _ = report_failure(rank.client, world.rank, &msg);
        }
        rank.cleanup();
    }
    // Our own connections go first, so that the server counts only the others'.
    drop(rank);
    drop(client);
    if let Some(s) = server {
        // Others may still be reading the last keys: give them a moment to leave.
        let _ = s.wait_for_disconnects(Instant::now() + Duration::from_secs(5).min(opts.timeout));
        s.shutdown();
    }
    match result {
        Err(_) if interrupted.is_some() => Err(CoreError::Interrupted {
            signal: interrupted.unwrap_or_default(),
        }),
        Err(CoreError::Cancelled) => Err(CoreError::Remote(
            shared.failure().unwrap_or_else(|| "cancelled".into()),
        )),
        other => other,
    }
}

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
    fn deadline(&self) -> Instant {
        Instant::now() + self.opts.rendezvous_timeout
    }

    /// A deadline for steps that only wait on peers that are alive: the watchdog cancels the
    /// run when one is not, so this only bounds a store that answers but never delivers.
    fn far(&self) -> Instant {
        Instant::now() + Duration::from_secs(7 * 24 * 3600)
    }

    /// The run's cancel flag, shared with transports that watch it.
    #[cfg(feature = "mpi")]
    fn shared_cancel(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.shared.cancel.clone()
    }

    fn check_cancel(&self) -> Result<()> {
        if self.shared.cancel.load(Ordering::SeqCst) {
            return Err(CoreError::Cancelled);
        }
        Ok(())
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
                Err(e) => return Err(remote(e)),
            }
        }
    }

    fn receive(&mut self, key: &str, deadline: Instant) -> Result<Vec<u8>> {
        let header = format!("bcast/{key}");
        self.wait_keys(&[&header], deadline)?;
        receive_broadcast(self.client, key, deadline).map_err(remote)
    }

    fn run(
        &mut self,
        start: Instant,
        progress: &Progress,
        net: &Net,
    ) -> Result<Option<DistReport>> {
        let (me, n) = (self.world.rank, self.world.world_size);
        let opts = self.opts;

        // 1. Rendezvous.
        let hello = Hello {
            world_size: n,
            fingerprint: opts.fingerprint.clone(),
            host: hostname(),
            pid: std::process::id(),
            token_digest: opts.job_token.map(|t| token_digest(&t)),
        };
        self.claim_rank(&hello)?;
        // The address this rank's store connection comes from: where its peers can reach it
        // (set before the hello, so every rank that sees the start sees it).
        let seen = self
            .client
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        self.client
            .set(&format!("ip/{me}"), seen.to_string().as_bytes())
            .map_err(remote)?;
        self.client
            .set(&format!("hello/{me}"), &json(&hello)?)
            .map_err(remote)?;
        let (tag, token) = if me == 0 {
            self.check_hellos()?;
            let tag = crate::runtag::RunTag::new().to_string();
            // Through the store only when the launcher gave no token (see `job_token`).
            let minted = match opts.job_token {
                Some(_) => None,
                None => Some(random_token()),
            };
            let start = Start {
                tag: tag.clone(),
                token: minted.map(|t| hex(&t)),
            };
            broadcast_bytes(self.client, "start", &json(&start)?).map_err(remote)?;
            (tag, opts.job_token.or(minted))
        } else {
            let d = self.deadline();
            let start: Start = unjson(&self.receive("start", d)?, "start")?;
            let token =
                match (&start.token, opts.job_token) {
                    (_, Some(t)) => Some(t),
                    (Some(h), None) => Some(unhex(h).ok_or_else(|| {
                        CoreError::Remote("malformed job token from rank 0".into())
                    })?),
                    (None, None) => None,
                };
            (start.tag, token)
        };
        let token = token.ok_or_else(|| {
            CoreError::Remote(
                "rank 0 was given a job token (AXSAVE_JOB_TOKEN) and this rank none: start every rank from the same launcher".into(),
            )
        })?;
        tracing::debug!(rank = me, tag, "joined");
        self.guard = Some(crate::interrupt::register_run(&self.opts.output, &tag)?);
        self.run_files = Some((self.opts.output.clone(), tag.clone()));
        crate::fault::point("joined", me);
        let watch: Vec<usize> = if me == 0 { (1..n).collect() } else { vec![0] };
        let watchdog = Watchdog::start(
            self.client.reconnect().map_err(remote)?,
            me,
            watch,
            opts.timeout,
            self.shared.clone(),
        );
        // The transport, agreed from every rank's report (GPU work, issue #6).
        let choice = self.agree_transport()?;

        // 2. Inventory and catalog.
        let source = PathBuf::from(inventory::expand_source(
            &opts.source,
            me,
            self.world.local_rank,
            self.world.node_rank,
        )?);
        let inv = inventory::take(&source)?;
        broadcast_bytes(self.client, &format!("inv/{me}"), &json(&inv)?).map_err(remote)?;
        let mut invs: Vec<Inventory> = Vec::with_capacity(n);
        for r in 0..n {
            let d = self.deadline();
            let b = self.receive(&format!("inv/{r}"), d)?;
            invs.push(unjson(&b, "inventory")?);
        }
        // Every rank must read the same checkpoint; each rank checks all, so all fail alike.
        let ids: Vec<identity::Identity> = invs.iter().map(|i| i.identity.clone()).collect();
        identity::check_same(&ids)?;
        let shared_source =
            invs.iter().all(|i| i.files == invs[0].files) && invs[0].detected.is_some();

        let bundle: Bundle = if shared_source {
            if me == 0 {
                let catalog = detect::open(&source)?;
                let readers = vec![(0..n).collect::<Vec<_>>(); catalog.files.len()];
                self.plan_and_send(catalog, readers, true, &tag)?
            } else {
                let d = self.far();
                unjson(&self.receive("bundle", d)?, "plan")?
            }
        } else {
            let format = invs.iter().find_map(|i| i.detected).ok_or_else(|| {
                CoreError::Remote(format!(
                    "no rank finds a checkpoint at --source {} (rank {me} looked in {})",
                    opts.source,
                    source.display()
                ))
            })?;
            let metadata = if format == Detected::Dcp {
                let holder = invs
                    .iter()
                    .position(|i| !i.metadata.is_empty())
                    .ok_or_else(|| {
                        CoreError::Remote("no rank sees the DCP .metadata file".into())
                    })?;
                if holder == me {
                    let m = axsave_formats::dcp::load_metadata(&source)?;
                    broadcast_bytes(self.client, "meta", &json(&m)?).map_err(remote)?;
                    m
                } else {
                    let d = self.deadline();
                    unjson(&self.receive("meta", d)?, "metadata")?
                }
            } else {
                Vec::new()
            };
            let part = detect::open_partial(&source, format, &metadata)?;
            broadcast_bytes(self.client, &format!("part/{me}"), &json(&part)?).map_err(remote)?;
            if me == 0 {
                let mut parts = Vec::with_capacity(n);
                for r in 0..n {
                    let d = self.deadline();
                    parts.push((
                        r,
                        unjson::<Catalog>(&self.receive(&format!("part/{r}"), d)?, "catalog part")?,
                    ));
                }
                let merged = Catalog::merge(parts).map_err(|e| {
                    CoreError::Format(axsave_formats::FormatError::invalid(&opts.source, e))
                })?;
                self.plan_and_send(merged.catalog, merged.readers, false, &tag)?
            } else {
                let d = self.far();
                unjson(&self.receive("bundle", d)?, "plan")?
            }
        };
        let Bundle {
            mut catalog,
            layout,
            plan,
            shared_source,
            ..
        } = bundle;
        catalog.root = if source.is_file() {
            source.parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            source.clone()
        };
        let total = layout.total_size;
        progress.total.store(total, Ordering::Relaxed);

        // 3. Output: the shared-directory check, then this rank's files.
        let writes = plan.is_writer(me);
        if opts.mode == Mode::Sharded && writes && me != 0 {
            let token = opts.output.join(token_name(&tag));
            if !token.exists() {
                return Err(CoreError::Remote(format!(
                    "rank {me} on {} does not see rank 0's marker in {}: --mode sharded needs an output directory every rank shares (use --mode gather otherwise)",
                    hostname(),
                    opts.output.display()
                )));
            }
        }
        let files = if writes {
            Some(Arc::new(OutputFiles::create(
                &opts.output,
                &layout,
                &tag,
                |f| plan.file_writers[f] == me,
            )?))
        } else {
            None
        };

        // 4. Execute: over NCCL through the GPU executor, or listen, publish, copy and receive
        // over MPI or TCP.
        let sources = SourceFiles::new(&catalog, &catalog.root);
        let (copy, received) = match choice.transport {
            Transport::Nccl => (
                self.execute_nccl(&catalog, &layout, &plan, files.as_deref(), &sources),
                Ok(()),
            ),
            _ => {
                // MPI carries the pieces only when it was chosen; otherwise TCP does.
                let tcp_net = Net::Tcp;
                let net = match choice.transport {
                    Transport::Mpi => net,
                    _ => &tcp_net,
                };
                let expected = plan.bytes_received_by(me);
                let tcp = TcpOptions {
                    session: session_of(&tag),
                    token,
                    frame_bytes: frame_bytes(opts.memory_budget, n, opts.workers),
                    io_timeout: opts.timeout,
                };
                let mut receiver = None;
                if expected > 0 {
                    let files = files
                        .clone()
                        .ok_or_else(|| CoreError::Remote("receiver without files".into()))?;
                    let sink = axsave_dist::transport::sink_fn(move |_from, file, offset, data| {
                        files
                            .write_at(file as usize, offset, data)
                            .map_err(|e| e.to_string().into())
                    });
                    match net {
                        Net::Tcp => {
                            let ip = self.publish_ip()?;
                            let (r, port) = Incoming::tcp(&tcp, sink, ip)?;
                            let addr = SocketAddr::new(ip, port);
                            tracing::debug!(rank = me, "peers reach this rank at {addr}");
                            self.client
                                .set(&format!("addr/{me}"), addr.to_string().as_bytes())
                                .map_err(remote)?;
                            receiver = Some(r);
                        }
                        #[cfg(feature = "mpi")]
                        Net::Mpi(t) => receiver = Some(Incoming::mpi(t, sink)?),
                    }
                }
                let tasks = plan.tasks_read_by(me);
                let mut peers: Vec<Option<SocketAddr>> = vec![None; n];
                if matches!(net, Net::Tcp) {
                    for w in tasks
                        .iter()
                        .map(|t| plan.file_writers[layout.tensors[t.out].file])
                    {
                        if w != me && peers[w].is_none() {
                            let key = format!("addr/{w}");
                            let d = self.far();
                            self.wait_keys(&[&key], d)?;
                            let a = self.client.get(&key, d).map_err(remote)?;
                            let a: SocketAddr =
                                String::from_utf8_lossy(&a).parse().map_err(|e| {
                                    CoreError::Remote(format!(
                                        "rank {w} published a bad address: {e}"
                                    ))
                                })?;
                            peers[w] = Some(a);
                        }
                    }
                }
                let job = CopyJob {
                    catalog: &catalog,
                    layout: &layout,
                    sources: &sources,
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
                            let f = files
                                .as_ref()
                                .ok_or_else(|| CoreError::Remote("no local files".into()))?;
                            return Ok(Box::new(LocalSink(f.as_ref())));
                        }
                        match net {
                            Net::Tcp => {
                                let addr = peers[w].ok_or_else(|| {
                                    CoreError::Remote(format!("no address for rank {w}"))
                                })?;
                                Ok(Box::new(RemoteSink::tcp(addr, me, w, &tcp)?))
                            }
                            #[cfg(feature = "mpi")]
                            Net::Mpi(t) => {
                                Ok(Box::new(RemoteSink::mpi(t, w, self.shared_cancel())?))
                            }
                        }
                    },
                    &self.shared.local_written,
                    &self.shared.cancel,
                );
                let received = match (&receiver, &copy) {
                    (Some(r), Ok(())) => r.wait(expected),
                    _ => Ok(()),
                };
                if let Some(r) = receiver.take() {
                    r.shutdown();
                }
                (copy, received)
            }
        };
        copy?;
        received?;
        self.check_cancel()?;

        // 5. Durable, then reported; rank 0 commits once everyone has reported.
        let mut done = Done { files: Vec::new() };
        if let Some(f) = &files {
            f.sync()?;
            for (i, w) in plan.file_writers.iter().enumerate() {
                if *w == me {
                    let sha = if opts.checksums {
                        Some(sha256_file(
                            &opts
                                .output
                                .join(output::temp_name(&layout.files[i].name, &tag)),
                        )?)
                    } else {
                        None
                    };
                    done.files.push((i, sha));
                }
            }
        }
        crate::fault::point("synced", me);
        self.client
            .set(&format!("ok/{me}"), &json(&done)?)
            .map_err(remote)?;
        progress.done.store(total, Ordering::Relaxed);
        if me != 0 {
            // From now on rank 0 may be renaming this run's files: a failure here must not
            // remove them under it (see `cleanup`), nor may the signal backstop.
            self.reported = true;
            self.guard = None;
            let d = self.far();
            self.wait_keys(&["committed"], d)?;
            watchdog.stop();
            self.run_files = None;
            self.guard = None;
            return Ok(None);
        }
        let mut shas: Vec<Option<String>> = vec![None; layout.files.len()];
        for r in 0..n {
            let key = format!("ok/{r}");
            let d = self.far();
            self.wait_keys(&[&key], d)?;
            let b = self.client.get(&key, d).map_err(remote)?;
            let d: Done = unjson(&b, "report")?;
            for (i, s) in d.files {
                if let Some(slot) = shas.get_mut(i) {
                    *slot = s;
                }
            }
        }
        self.check_cancel()?;
        let existing = check_output(&opts.output, &opts.layout.stem, opts.force)?;
        let extras = opts.extras.render(&layout)?;
        // Rank 0 renames every file, its own and (in sharded mode, in the shared directory) the
        // others', so the commit happens in one place.
        drop(files);
        crate::fault::point("committing", me);
        let replaced = match &self.guard {
            Some(g) => g.commit(|| finalize(&opts.output, &layout, &tag, &extras, &existing))?,
            None => finalize(&opts.output, &layout, &tag, &extras, &existing)?,
        };
        self.run_files = None;
        self.guard = None;
        self.client.set("committed", b"1").map_err(remote)?;
        watchdog.stop();
        if opts.mode == Mode::Sharded {
            let _ = std::fs::remove_file(opts.output.join(token_name(&tag)));
        }
        self.lock = None;
        let mut dtypes: Vec<(DType, usize)> = Vec::new();
        for t in &layout.tensors {
            match dtypes.iter_mut().find(|(d, _)| *d == t.dtype) {
                Some((_, c)) => *c += 1,
                None => dtypes.push((t.dtype, 1)),
            }
        }
        let mut files_report: Vec<OutputFileReport> = layout
            .files
            .iter()
            .zip(shas)
            .map(|(f, sha)| OutputFileReport {
                path: opts.output.join(&f.name),
                size: f.size,
                sha256: sha,
            })
            .collect();
        for name in layout
            .index_name()
            .into_iter()
            .chain(extras.iter().map(|(n, _)| n.clone()))
        {
            let p = opts.output.join(&name);
            files_report.push(OutputFileReport {
                size: std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0),
                sha256: if opts.checksums {
                    Some(sha256_file(&p)?)
                } else {
                    None
                },
                path: p,
            });
        }
        Ok(Some(DistReport {
            files: files_report,
            tensors: layout.tensors.len(),
            bytes: layout.total_size,
            network_bytes: plan.network_bytes(),
            seconds: start.elapsed().as_secs_f64(),
            world_size: n,
            format: catalog.format.to_string(),
            mode: opts.mode,
            left_out: layout.left_out.clone(),
            replaced,
            dtypes,
            notes: catalog.notes.clone(),
            shared_source,
            transport: choice.transport,
        }))
    }

    /// Every rank claims its number once in the store: a second process started with the same
    /// RANK fails here, naming both (rather than corrupting the transfers later), and its
    /// failure stops the others.
    fn claim_rank(&mut self, hello: &Hello) -> Result<()> {
        let me = self.world.rank;
        let claims = self.client.add(&format!("claim/{me}"), 1).map_err(remote)?;
        if claims <= 1 {
            return Ok(());
        }
        let other = self
            .client
            .check(&[&format!("hello/{me}")])
            .ok()
            .filter(|&there| there)
            .and_then(|_| {
                self.client
                    .get(&format!("hello/{me}"), self.deadline())
                    .ok()
            })
            .and_then(|b| serde_json::from_slice::<Hello>(&b).ok())
            .map(|h| format!("process {} on {}", h.pid, h.host))
            .unwrap_or_else(|| "another process".into());
        Err(CoreError::Remote(format!(
            "two processes claim rank {me}: {other} and process {} on {}; every process needs its own RANK",
            hello.pid, hello.host
        )))
    }

    /// Rank 0: every hello must name the same world size and arguments.
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
                let b = self.client.get(&format!("ip/{r}"), d).map_err(remote)?;
                if let Ok(ip) = String::from_utf8_lossy(&b).parse::<IpAddr>() {
                    if !ip.is_loopback() {
                        peers.push(ip);
                        break;
                    }
                }
            }
        }
        Ok(address::publish(over, own, &peers, address::route_source))
    }

    fn check_hellos(&mut self) -> Result<()> {
        let n = self.world.world_size;
        let deadline = self.deadline();
        let mut seen = vec![false; n];
        let mut missing_from = 0;
        loop {
            self.check_cancel()?;
            if let Some(f) = axsave_dist::store::rendezvous::check_failure(self.client)
                .map_err(remote)?
                .filter(|f| f.rank != 0)
            {
                return Err(CoreError::Remote(format!(
                    "rank {} failed: {}",
                    f.rank, f.message
                )));
            }
            for (r, seen_r) in seen.iter_mut().enumerate().skip(missing_from) {
                if *seen_r {
                    continue;
                }
                // A huge world size must not keep rank 0 past the deadline in one pass.
                if Instant::now() >= deadline {
                    break;
                }
                let key = format!("hello/{r}");
                if !self.client.check(&[&key]).map_err(remote)? {
                    continue;
                }
                let b = self.client.get(&key, deadline).map_err(remote)?;
                let h: Hello = unjson(&b, "hello")?;
                if h.world_size != n {
                    return Err(CoreError::Remote(format!(
                        "rank {r} (on {}) was started with a world size of {}, rank 0 with {n}: start every rank with the same WORLD_SIZE",
                        h.host, h.world_size
                    )));
                }
                let mine = self.opts.job_token.map(|t| token_digest(&t));
                if h.token_digest != mine {
                    let (theirs, ours) = match (&h.token_digest, &mine) {
                        (Some(_), Some(_)) => ("another job token", "its own"),
                        (Some(_), None) => ("a job token", "none"),
                        _ => ("no job token", "one"),
                    };
                    return Err(CoreError::Remote(format!(
                        "rank {r} (on {}) was given {theirs} (AXSAVE_JOB_TOKEN) and rank 0 {ours}: start every rank from the same launcher",
                        h.host
                    )));
                }
                if h.fingerprint != self.opts.fingerprint {
                    return Err(CoreError::Remote(format!(
                        "rank {r} (on {}) was started with different arguments than rank 0 ({} vs {}): every rank must get the same command line",
                        h.host, h.fingerprint, self.opts.fingerprint
                    )));
                }
                *seen_r = true;
            }
            while missing_from < n && seen[missing_from] {
                missing_from += 1;
            }
            if missing_from == n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (missing_from..n).filter(|&r| !seen[r]).collect();
                return Err(CoreError::Remote(format!(
                    "{} of {n} ranks did not join within {}s (--rendezvous-timeout): {}",
                    missing.len(),
                    self.opts.rendezvous_timeout.as_secs(),
                    rank_list(&missing, 10)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rank 0: layout, plan, the output checks, and the broadcast of it all.
    fn plan_and_send(
        &mut self,
        catalog: Catalog,
        readers: Vec<Vec<usize>>,
        shared_source: bool,
        tag: &str,
    ) -> Result<Bundle> {
        let n = self.world.world_size;
        let mut lopts = self.opts.layout.clone();
        if self.opts.mode == Mode::Sharded {
            lopts.min_files = lopts.min_files.max(n);
        }
        let layout = plan_layout(&catalog, &lopts)?;
        let plan = make_plan(&catalog, &layout, &readers, n, self.opts.mode)
            .map_err(|e| CoreError::Layout(e.to_string()))?;
        // Held to the end of the commit: a second save into this directory fails at once.
        self.lock = Some(crate::lock::OutputLock::acquire(&self.opts.output, tag)?);
        check_output(&self.opts.output, &self.opts.layout.stem, self.opts.force)?;
        for m in output::sweep_stale_temps(&self.opts.output, tag).messages(&self.opts.output) {
            tracing::warn!("{m}");
        }
        if self.opts.mode == Mode::Sharded {
            let token = self.opts.output.join(token_name(tag));
            // Created exclusively, never through a link planted at its name.
            std::io::Write::write_all(
                &mut output::create_exclusive(&token, false)?,
                hostname().as_bytes(),
            )
            .map_err(|e| CoreError::io(&token, e))?;
        }
        let bundle = Bundle {
            catalog,
            readers,
            layout,
            plan,
            shared_source,
        };
        broadcast_bytes(self.client, "bundle", &json(&bundle)?).map_err(remote)?;
        Ok(bundle)
    }

    /// After a failure: remove every temporary of this run that this rank can see (a dead
    /// writer's too, when the directory is shared), and rank 0's marker.
    fn cleanup(&mut self) {
        if let Some((dir, tag)) = self.run_files.take() {
            // The other ranks look at rank 0's output lock. Free: rank 0 died (or finished), so
            // this rank removes what is left, the lock file included (taking the lock and
            // dropping it removes it). Held: rank 0 is alive; once this rank has reported its
            // part, rank 0 may be committing those files, or will remove them itself when it
            // fails, so they are left to it.
            let _free = match (self.world.rank, dir.is_dir()) {
                (0, _) | (_, false) => None,
                _ => match crate::lock::OutputLock::acquire(&dir, &tag) {
                    Ok(l) => Some(l),
                    Err(_) if self.reported => return,
                    Err(_) => None,
                },
            };
            output::remove_run_temps(&dir, &tag);
            let _ = std::fs::remove_file(dir.join(token_name(&tag)));
        }
        self.guard = None;
        self.lock = None;
    }
}

// ===== GPU work (issue #6): the transport agreement and the NCCL data plane. =====

impl Rank<'_> {
    /// Every rank reports what it can do (its GPU and NCCL, when the request may use them) and
    /// all pick the same transport from the same reports. `--transport nccl` on a rank without
    /// a GPU or NCCL fails here, at once; the failure flag then stops the others.
    fn agree_transport(&mut self) -> Result<Choice> {
        let (me, n) = (self.world.rank, self.world.world_size);
        let o = self.opts;
        if !o.transport.wants_gpu() {
            return select(o.transport, &[], o.mpi_available).map_err(CoreError::Remote);
        }
        let caps = crate::gpu::local_caps(o.transport, o.device, self.world.local_rank);
        if o.transport == TransportRequest::Nccl
            && let Some(why) = caps.nccl_missing()
        {
            return Err(CoreError::Gpu(format!(
                "--transport nccl, but rank {me} (on {}) cannot use NCCL: {why}",
                hostname()
            )));
        }
        broadcast_bytes(self.client, &format!("caps/{me}"), &json(&caps)?).map_err(remote)?;
        let mut all = Vec::with_capacity(n);
        for r in 0..n {
            let d = self.deadline();
            all.push(unjson(
                &self.receive(&format!("caps/{r}"), d)?,
                "capabilities",
            )?);
        }
        let choice = select(o.transport, &all, o.mpi_available).map_err(CoreError::Remote)?;
        if me == 0 {
            tracing::info!("transport {}: {}", choice.transport.as_str(), choice.why);
        }
        tracing::debug!(rank = me, "GPU: {:?}, NCCL: {:?}", caps.gpu, caps.nccl);
        Ok(choice)
    }

    /// Step 4 over NCCL: the GPU executor (rank 0's sizes and NCCL id through the store).
    #[cfg(feature = "cuda")]
    fn execute_nccl(
        &mut self,
        catalog: &Catalog,
        layout: &Layout,
        plan: &Plan,
        files: Option<&OutputFiles>,
        sources: &SourceFiles,
    ) -> Result<()> {
        let shared = self.shared.clone();
        let o = crate::gpu::nccl::NcclOptions {
            world_size: self.world.world_size,
            device: self.opts.device,
            local_rank: self.world.local_rank,
            timeout: self.opts.timeout,
            init_timeout: self.opts.rendezvous_timeout,
            cancelled: std::sync::Arc::new(move || shared.cancel.load(Ordering::SeqCst)),
        };
        let shared = self.shared.clone();
        let work = crate::gpu::RankWork {
            catalog,
            layout,
            plan,
            sources,
            files,
            me: self.world.rank,
            sizing: crate::gpu::schedule::Sizing::for_budget(self.opts.memory_budget),
            exec: ExecOptions::for_budget(self.opts.memory_budget / 2, self.opts.workers),
            written: &shared.local_written,
            cancel: &shared.cancel,
        };
        crate::gpu::nccl::run_nccl(self, work, &o)
    }

    #[cfg(not(feature = "cuda"))]
    fn execute_nccl(
        &mut self,
        _: &Catalog,
        _: &Layout,
        _: &Plan,
        _: Option<&OutputFiles>,
        _: &SourceFiles,
    ) -> Result<()> {
        // Unreachable in practice: without CUDA no rank reports a GPU, so NCCL is never chosen.
        Err(CoreError::Gpu(
            "this axsave was built without CUDA (cargo feature `cuda`)".into(),
        ))
    }
}

/// Rank 0's small values (the GPU setup) travel through the store.
#[cfg(feature = "cuda")]
impl crate::gpu::nccl::Exchange for Rank<'_> {
    fn publish(&mut self, key: &str, value: &[u8]) -> Result<()> {
        broadcast_bytes(self.client, key, value).map_err(remote)
    }
    fn fetch(&mut self, key: &str) -> Result<Vec<u8>> {
        let d = self.deadline();
        self.receive(key, d)
    }
}

// ===== end of GPU work =====

/// The marker rank 0 leaves in the output directory for the sharded-mode check.
fn token_name(tag: &str) -> String {
    format!(".axsave-{tag}.shared")
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

/// Frame size for the network: small enough that every rank's buffers stay within the budget.
fn frame_bytes(budget: u64, world: usize, workers: usize) -> usize {
    let per = budget / 4 / (world.max(2) as u64 * workers.max(1) as u64);
    per.clamp(64 * 1024, 4 << 20) as usize
}

fn session_of(tag: &str) -> u64 {
    let mut h = crc32fast::Hasher::new();
    h.update(tag.as_bytes());
    (h.finalize() as u64) << 32 | tag.len() as u64
}

/// This host's name (for messages and the output lock's record).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// SHA-256 of a file, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| CoreError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
