//! A merge shared by several ranks (any launcher): every rank reads and checks the base and
//! the adapter itself, rank 0 creates the output files under temporary names in a directory
//! every rank shares, each rank merges and writes its share of the tensors straight into them,
//! and rank 0 renames everything into place once every rank has reported its part written and
//! synced.
//!
//! The rendezvous is the store saves use (PyTorch's TCPStore protocol, hosted by rank 0 or
//! torchrun's agent), with the same failure flag and heartbeat watchdog: a rank that fails
//! makes every rank exit non-zero, a silent one is given up after `timeout`, and no
//! final-named file appears unless every rank succeeded.
//!
//! Process safety is a save's ([`crate::distributed`]): rank 0 holds the output lock from
//! before it checks the directory to the end of the commit and removes the temporaries of dead
//! earlier runs; a signal (SIGTERM, SIGINT, SIGHUP) cancels every rank's part like a failure,
//! each rank removes the run's temporaries it can see, and the process exits 128 + the signal.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use axsave_dist::store::CoordError;
use axsave_dist::store::rendezvous::wait_watching_failure;
use axsave_dist::{StoreClient, World};

use super::{MergeOptions, MergeReport, Prepared, WriteAt, commit, prepare, write_tensors};
use crate::distributed::watchdog::{Shared, Watchdog};
use crate::error::{CoreError, Result};
use crate::interrupt::RunGuard;
use crate::lock::OutputLock;
use crate::output::{self, OutputFiles, temp_name};

/// Timeouts of a merge across ranks.
#[derive(Clone, Copy, Debug)]
pub struct RankTimeouts {
    /// How long a silent rank is tolerated.
    pub timeout: Duration,
    /// How long ranks wait for each other at the start.
    pub rendezvous: Duration,
}

/// The output files, opened by name by a rank other than their creator.
struct Opened(Vec<(PathBuf, File)>);

impl WriteAt for Opened {
    fn write_at(&self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        let (path, f) = &self.0[file];
        f.write_all_at(data, offset)
            .map_err(|e| CoreError::io(path, e))
    }
}

/// What a failed rank must clean up, from the moment the run's tag is known.
#[derive(Default)]
struct RunState {
    /// The run's tag (its temporaries' names), until the commit is done.
    tag: Option<String>,
    /// The run, registered for the signal backstop ([`crate::interrupt::abandon`]).
    guard: Option<RunGuard>,
    /// Rank 0: the output directory's lock, to the end of the commit.
    lock: Option<OutputLock>,
    /// Whether this rank reported its part written (`done/{rank}`).
    reported: bool,
}

impl RunState {
    /// After a failure: removes every temporary of the run this rank can see, as a failed save
    /// does ([`crate::distributed`]). A rank other than 0 looks at rank 0's output lock first:
    /// free, rank 0 is gone, so this rank removes what is left (the lock file included); held
    /// after this rank reported its part, rank 0 may be committing those files, or removes them
    /// itself when it fails, so they are left to it.
    fn cleanup(&mut self, dir: &Path, rank: usize) {
        if let Some(tag) = self.tag.take() {
            let _free = match (rank, dir.is_dir()) {
                (0, _) | (_, false) => None,
                _ => match OutputLock::acquire(dir, &tag) {
                    Ok(l) => Some(l),
                    Err(_) if self.reported => return,
                    Err(_) => None,
                },
            };
            output::remove_run_temps(dir, &tag);
        }
        self.guard = None;
        self.lock = None;
    }
}

/// The layout tensors each rank merges: greedily to the rank with the least work so far, a
/// merged tensor counting four times its bytes (it is read, computed and written).
pub fn shares(p: &Prepared, world_size: usize) -> Vec<Vec<usize>> {
    let mut load = vec![0u64; world_size];
    let mut out = vec![Vec::new(); world_size];
    for (i, t) in p.layout.tensors.iter().enumerate() {
        let cost = match p.plan.ops[t.source] {
            super::plan::Op::Copy => t.nbytes,
            _ => 4 * t.nbytes,
        };
        let r = (0..world_size).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        load[r] += cost;
        out[r].push(i);
    }
    out
}

/// Runs this rank's part of a merge. Returns the report on rank 0, `None` on the others.
pub fn run(
    world: &World,
    opts: &MergeOptions,
    fingerprint: &str,
    times: RankTimeouts,
    written: &AtomicU64,
) -> Result<Option<MergeReport>> {
    let (server, mut client) = crate::distributed::join::connect_store(
        world,
        &format!("{}/merge-lora", world.store_namespace()),
        times.rendezvous,
        times.timeout,
    )?;
    let shared = Arc::new(Shared::default());
    // A signal cancels the run like a failure (see `crate::interrupt`).
    crate::interrupt::watch(&shared.cancel);
    let mut state = RunState::default();
    let result = rank_run(
        world,
        opts,
        fingerprint,
        times,
        written,
        &mut client,
        &shared,
        &mut state,
    );
    if let Err(e) = &result {
        shared.announce(&mut client, world.rank, e);
        state.cleanup(&opts.output, world.rank);
    }
    drop(state);
    drop(client);
    crate::distributed::watchdog::close_server(server, times.timeout);
    result.map_err(|e| shared.cancel.explain(e))
}

/// Waits for `keys`, giving up when another rank failed or the watchdog cancelled the run.
fn wait_keys(
    client: &mut StoreClient,
    shared: &Shared,
    keys: &[&str],
    deadline: Instant,
) -> Result<()> {
    loop {
        if shared.cancel.is_cancelled() {
            return Err(CoreError::Cancelled);
        }
        let slice = deadline.min(Instant::now() + Duration::from_secs(1));
        match wait_watching_failure(client, keys, slice) {
            Ok(()) => return Ok(()),
            Err(CoordError::Timeout { .. }) if Instant::now() < deadline => continue,
            Err(CoordError::PeerFailed { rank, message }) => {
                shared.fail(format!("rank {rank} failed: {message}"));
                return Err(CoreError::Cancelled);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn get_string(client: &mut StoreClient, key: &str) -> Result<String> {
    let deadline = Instant::now() + client.options().io_timeout;
    let b = client.get(key, deadline)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

#[allow(clippy::too_many_arguments)]
fn rank_run(
    world: &World,
    opts: &MergeOptions,
    fingerprint: &str,
    times: RankTimeouts,
    written: &AtomicU64,
    client: &mut StoreClient,
    shared: &Arc<Shared>,
    state: &mut RunState,
) -> Result<Option<MergeReport>> {
    let (me, n) = (world.rank, world.world_size);
    let start = Instant::now();
    let join_deadline = Instant::now() + times.rendezvous;
    // Join: every rank says what it merges; rank 0 refuses a mismatch.
    client.set(
        &format!("hello/{me}"),
        format!("{n}|{fingerprint}").as_bytes(),
    )?;
    if me == 0 {
        for r in 1..n {
            wait_keys(client, shared, &[&format!("hello/{r}")], join_deadline)?;
            let theirs = get_string(client, &format!("hello/{r}"))?;
            if theirs != format!("{n}|{fingerprint}") {
                return Err(CoreError::Remote(format!(
                    "rank {r} was started with other arguments or another world size than rank 0 (every rank must merge the same base, adapter and output)"
                )));
            }
        }
    }
    let watch: Vec<usize> = if me == 0 { (1..n).collect() } else { vec![0] };
    let _watchdog = Watchdog::start(
        client.reconnect()?,
        me,
        watch,
        times.timeout,
        shared.clone(),
    );
    // Every rank reads and checks the inputs itself (they must be visible to every rank).
    let prepared = prepare(opts)?;
    let check = || -> Result<()> {
        if shared.cancel.is_cancelled() {
            return Err(CoreError::Cancelled);
        }
        Ok(())
    };
    // Rank 0 creates the files; the others open them by name.
    let far = Instant::now() + Duration::from_secs(7 * 24 * 3600);
    let (tag, existing) = if me == 0 {
        state.guard = Some(crate::interrupt::register_run(&opts.output, &opts.tag)?);
        // Held to the end of the commit: a second merge or save into this directory fails
        // at once, naming this process.
        state.lock = Some(OutputLock::acquire(&opts.output, &opts.tag)?);
        let existing = crate::save::check_output(&opts.output, "model", opts.force)?;
        for m in output::sweep_stale_temps(&opts.output, &opts.tag).messages(&opts.output) {
            tracing::warn!("{m}");
        }
        state.tag = Some(opts.tag.clone());
        let files = OutputFiles::create(
            &opts.output,
            &prepared.layout,
            &opts.tag,
            opts.memory_budget,
            |_| true,
        )?;
        drop(files);
        client.set("start", opts.tag.as_bytes())?;
        (opts.tag.clone(), existing)
    } else {
        wait_keys(client, shared, &["start"], far)?;
        let tag = get_string(client, "start")?;
        if crate::runtag::RunTag::parse(&tag).is_none() {
            return Err(CoreError::Remote(format!(
                "rank 0 sent a malformed run tag {tag:?}"
            )));
        }
        state.guard = Some(crate::interrupt::register_run(&opts.output, &tag)?);
        state.tag = Some(tag.clone());
        (tag, Vec::new())
    };
    let mut files = Vec::with_capacity(prepared.layout.files.len());
    for f in &prepared.layout.files {
        let path = opts.output.join(temp_name(&f.name, &tag));
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| {
            CoreError::Remote(format!(
                "rank {me} cannot open {} ({e}): merge-lora across ranks needs an output directory every rank shares",
                path.display()
            ))
        })?;
        files.push((path, file));
    }
    let files = Opened(files);
    let mine = shares(&prepared, n).swap_remove(me);
    tracing::info!(
        "rank {me}: writing {} of {} tensors",
        mine.len(),
        prepared.layout.tensors.len()
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.workers.max(1))
        .build()
        .map_err(|e| CoreError::Merge(format!("cannot start {} threads: {e}", opts.workers)))?;
    crate::fault::point("merging", me);
    pool.install(|| write_tensors(&prepared, opts, &mine, &files, written, &check))?;
    for (path, f) in &files.0 {
        f.sync_all().map_err(|e| CoreError::io(path, e))?;
    }
    drop(files);
    check()?;
    client.set(&format!("done/{me}"), b"1")?;
    state.reported = true;
    if me == 0 {
        for r in 0..n {
            wait_keys(client, shared, &[&format!("done/{r}")], far)?;
        }
        let opts0 = MergeOptions {
            tag: tag.clone(),
            ..opts.clone()
        };
        let report = match &state.guard {
            Some(g) => g.commit(|| commit(&prepared, &opts0, &existing, start))?,
            None => commit(&prepared, &opts0, &existing, start)?,
        };
        state.tag = None;
        state.guard = None;
        client.set("committed", b"1")?;
        state.lock = None;
        Ok(Some(report))
    } else {
        wait_keys(client, shared, &["committed"], far)?;
        Ok(None)
    }
}
