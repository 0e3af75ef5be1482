//! The host side of the GPU executor: reads the units a rank stages, hands rounds to an
//! [`Engine`] (the device and the network), and writes what lands.
//!
//! Two rounds are in flight: while the engine runs round *i* (upload, convert, exchange,
//! download, on the device's streams), the host writes round *i − 1*'s landed bytes and reads
//! round *i + 1*'s units into the other staging buffer. Reading and writing each use up to
//! [`Job::workers`] threads over a round's units (the units of a zstd-compressed piece are read
//! in order on one thread: its decoder only goes forward).
//!
//! Integrity checks are those of the CPU executor: a piece's CRC when its sub-boxes read the
//! checksummed bytes back to back, and whole-record CRCs for records read only in part.
//!
//! The engine is a trait so that the same driver runs on a CPU stand-in in the tests
//! (`HostEngine` below: threads for ranks, channels for NCCL, the kernels' CPU twins for the
//! conversions), which checks the protocol, the offsets and the bytes without a GPU.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axsave_formats::convert;
use axsave_formats::{Catalog, Encoding};

use super::schedule::{RoundWork, Seg, Unit, geometry};
use crate::error::{CoreError, Result};
use crate::geometry::{gather, runs};
use crate::layout::Layout;
use crate::output::OutputFiles;
use crate::sources::{SourceFiles, ZstdCursor};

/// The device and the network, as the driver sees them. A round lives in one of two slots.
pub trait Engine {
    /// Whether conversions run on the device. When not, the driver stages output-dtype bytes
    /// (build the rounds with the same answer, see [`RoundWork::for_rank`]).
    fn converts(&self) -> bool;
    /// The staging buffer of `slot`, at least as long as any round's `in_len`, once the
    /// slot's previous round no longer reads it.
    fn staging(&mut self, slot: usize) -> Result<&mut [u8]>;
    /// Starts `work` in `slot`: upload the staged bytes, convert them, post the exchange,
    /// download what lands. Returns once it is under way.
    fn launch(&mut self, slot: usize, work: &RoundWork) -> Result<()>;
    /// Waits until the round in `slot` has landed, and gives its landing buffer.
    fn landed(&mut self, slot: usize) -> Result<&[u8]>;
}

/// No device: the engine type of a [`super::run_rank`] that has none (all work then stays on
/// the CPU). Uninhabited, so it is never actually called.
pub enum NoDevice {}

impl Engine for NoDevice {
    fn converts(&self) -> bool {
        match *self {}
    }
    fn staging(&mut self, _: usize) -> Result<&mut [u8]> {
        match *self {}
    }
    fn launch(&mut self, _: usize, _: &RoundWork) -> Result<()> {
        match *self {}
    }
    fn landed(&mut self, _: usize) -> Result<&[u8]> {
        match *self {}
    }
}

/// What the driver works on.
pub struct Job<'a> {
    /// The source checkpoint.
    pub catalog: &'a Catalog,
    /// The output.
    pub layout: &'a Layout,
    /// The source files as this rank sees them.
    pub sources: &'a SourceFiles,
    /// This rank's output files (needed when something lands here).
    pub files: Option<&'a OutputFiles>,
    /// Every unit the rounds refer to.
    pub units: &'a [Unit],
    /// Threads for reading and for writing.
    pub workers: usize,
    /// Output bytes this rank has produced (sent or written), for progress.
    pub written: &'a AtomicU64,
    /// Raised to stop (by this driver on failure, or by another part of the run).
    pub cancel: &'a AtomicBool,
}

/// Piece checksums being assembled: task → (sub-box index, CRC of its stored span).
type Crcs = HashMap<crate::execute::Task, Vec<(usize, crc32fast::Hasher)>>;

/// Runs `rounds` (this rank's, in order) through `engine`.
pub fn drive<E: Engine>(engine: &mut E, job: &Job<'_>, rounds: &[RoundWork]) -> Result<()> {
    let result = drive_inner(engine, job, rounds);
    if result.is_err() {
        job.cancel.store(true, Ordering::SeqCst);
    }
    result
}

fn drive_inner<E: Engine>(engine: &mut E, job: &Job<'_>, rounds: &[RoundWork]) -> Result<()> {
    let checked = checked_tasks(job, rounds);
    let crcs: Mutex<Crcs> = Mutex::new(HashMap::new());
    let mut cursors: HashMap<crate::execute::Task, ZstdCursor<'_>> = HashMap::new();
    let mut bufs: Vec<Buffers> = (0..job.workers.max(1))
        .map(|_| Buffers::default())
        .collect();
    // (slot, round) launched and not yet written.
    let mut in_flight: std::collections::VecDeque<(usize, usize)> = Default::default();
    for (i, work) in rounds.iter().enumerate() {
        if job.cancel.load(Ordering::Relaxed) {
            return Err(CoreError::Cancelled);
        }
        let slot = i % 2;
        if in_flight.len() == 2 {
            if let Some((s, r)) = in_flight.pop_front() {
                write_landed(engine, job, s, &rounds[r], &mut bufs)?;
            }
        }
        let staging = engine.staging(slot)?;
        let staging = staging.get_mut(..work.in_len).ok_or_else(|| {
            CoreError::Internal(format!(
                "staging buffer smaller than a round ({} bytes)",
                work.in_len
            ))
        })?;
        fill(job, work, staging, &mut cursors, &mut bufs, &checked, &crcs)?;
        engine.launch(slot, work)?;
        let sent: usize = work
            .sends
            .iter()
            .flat_map(|b| &b.segs)
            .map(|s| s.out_len)
            .sum();
        job.written.fetch_add(sent as u64, Ordering::Relaxed);
        in_flight.push_back((slot, i));
        // Write the previous round while this one runs.
        if in_flight.len() == 2 {
            if let Some((s, r)) = in_flight.pop_front() {
                write_landed(engine, job, s, &rounds[r], &mut bufs)?;
            }
        }
    }
    while let Some((s, r)) = in_flight.pop_front() {
        write_landed(engine, job, s, &rounds[r], &mut bufs)?;
    }
    verify_checksums(
        job,
        rounds,
        checked,
        crcs.into_inner().unwrap_or_else(|e| e.into_inner()),
    )
}

/// Scratch buffers of one reading thread.
#[derive(Default)]
struct Buffers {
    inbuf: Vec<u8>,
    gbuf: Vec<u8>,
}

/// Tasks whose piece CRC can be checked: it has one, and its sub-boxes (all read here) read
/// exactly the checksummed bytes back to back. Maps to the number of sub-boxes.
fn checked_tasks(job: &Job<'_>, rounds: &[RoundWork]) -> HashMap<crate::execute::Task, usize> {
    let mut subs: HashMap<crate::execute::Task, Vec<usize>> = HashMap::new();
    for s in rounds.iter().flat_map(|w| w.staged()) {
        let u = &job.units[s.unit];
        subs.entry(u.task).or_default().push(s.unit);
    }
    let mut out = HashMap::new();
    for (t, us) in subs {
        let piece = &job.catalog.tensors[job.layout.tensors[t.out].source].pieces[t.piece];
        let Some(c) = &piece.checksum else { continue };
        let g = geometry(job.catalog, job.layout, &t);
        let contiguous = us
            .iter()
            .all(|&i| job.units[i].sub_box.is_contiguous(&g.strides));
        let (off, len) = piece.byte_span();
        if contiguous && off == c.offset && len == c.len {
            out.insert(t, us.len());
        }
    }
    out
}

/// Checks every piece CRC of the tasks read here: assembled from the reads where
/// `checked_tasks` allows it, else by reading the checksummed bytes again, whole.
fn verify_checksums(
    job: &Job<'_>,
    rounds: &[RoundWork],
    checked: HashMap<crate::execute::Task, usize>,
    crcs: Crcs,
) -> Result<()> {
    let staged: std::collections::HashSet<crate::execute::Task> = rounds
        .iter()
        .flat_map(|w| w.staged())
        .map(|s| job.units[s.unit].task)
        .collect();
    let mut buf = Vec::new();
    for t in staged {
        let piece = &job.catalog.tensors[job.layout.tensors[t.out].source].pieces[t.piece];
        let assembled = crcs.get(&t).map(Vec::len);
        if piece.checksum.is_some()
            && (assembled.is_none() || checked.get(&t) != assembled.as_ref())
        {
            crate::execute::check_piece(job.sources, piece, 1 << 20, &mut buf)?;
        }
    }
    for (t, parts) in crcs {
        if checked.get(&t) == Some(&parts.len()) {
            let piece = &job.catalog.tensors[job.layout.tensors[t.out].source].pieces[t.piece];
            crate::execute::check_assembled(job.sources, piece, parts)?;
        }
    }
    Ok(())
}

/// Reads every unit this rank stages in `work` into its place in `staging`.
fn fill<'s>(
    job: &Job<'s>,
    work: &RoundWork,
    staging: &mut [u8],
    cursors: &mut HashMap<crate::execute::Task, ZstdCursor<'s>>,
    bufs: &mut [Buffers],
    checked: &HashMap<crate::execute::Task, usize>,
    crcs: &Mutex<Crcs>,
) -> Result<()> {
    let mut segs: Vec<&Seg> = work.staged().collect();
    segs.sort_by_key(|s| s.in_off);
    // Cut the staging buffer into one disjoint slice per unit.
    let mut slices: Vec<(&Seg, &mut [u8])> = Vec::with_capacity(segs.len());
    let mut rest: &mut [u8] = staging;
    let mut pos = 0usize;
    for s in segs {
        let tail = std::mem::take(&mut rest);
        let (_, tail) = tail
            .split_at_mut_checked(s.in_off - pos)
            .ok_or_else(|| CoreError::Internal("staging layout out of bounds".into()))?;
        let (mine, tail) = tail
            .split_at_mut_checked(s.in_len)
            .ok_or_else(|| CoreError::Internal("staging layout out of bounds".into()))?;
        slices.push((s, mine));
        rest = tail;
        pos = s.in_off + s.in_len;
    }
    // zstd units go in order to the first thread (with the decoders); the rest round-robin.
    let is_zstd = |s: &Seg| {
        let t = job.units[s.unit].task;
        matches!(
            job.catalog.tensors[job.layout.tensors[t.out].source].pieces[t.piece].encoding,
            Encoding::Zstd { .. }
        )
    };
    let total: usize = slices.iter().map(|(s, _)| s.in_len).sum();
    let threads = if total < (4 << 20) {
        1
    } else {
        bufs.len().min(slices.len()).max(1)
    };
    let mut shares: Vec<Vec<(&Seg, &mut [u8])>> = (0..threads).map(|_| Vec::new()).collect();
    let mut k = 0;
    for (s, d) in slices {
        if is_zstd(s) {
            shares[0].push((s, d));
        } else {
            shares[k % threads].push((s, d));
            k += 1;
        }
    }
    let stage_share = |share: Vec<(&Seg, &mut [u8])>,
                       b: &mut Buffers,
                       cursors: Option<&mut HashMap<crate::execute::Task, ZstdCursor<'s>>>|
     -> Result<()> {
        let mut cursors = cursors;
        for (s, dst) in share {
            let u = &job.units[s.unit];
            let want_crc = checked.contains_key(&u.task);
            let h = stage_unit(job, u, s, dst, b, cursors.as_deref_mut(), want_crc)?;
            if let Some(h) = h {
                crcs.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(u.task)
                    .or_default()
                    .push((u.sub, h));
            }
        }
        Ok(())
    };
    if threads == 1 {
        let share = shares.pop().unwrap_or_default();
        return stage_share(share, &mut bufs[0], Some(cursors));
    }
    let first_error: Mutex<Option<CoreError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        let mut bufs_it = bufs.iter_mut();
        let mut shares_it = shares.into_iter();
        let (Some(b0), Some(s0)) = (bufs_it.next(), shares_it.next()) else {
            return;
        };
        for (share, b) in shares_it.zip(bufs_it) {
            let first_error = &first_error;
            let stage_share = &stage_share;
            scope.spawn(move || {
                if let Err(e) = stage_share(share, b, None) {
                    first_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                }
            });
        }
        if let Err(e) = stage_share(s0, b0, Some(cursors)) {
            first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(e);
        }
    });
    match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Reads one unit's stored span, puts it in row-major order and into `dst` (converted on the
/// CPU when the segment stages output bytes). Returns the CRC of the stored span when asked.
fn stage_unit<'s>(
    job: &Job<'s>,
    u: &Unit,
    seg: &Seg,
    dst: &mut [u8],
    b: &mut Buffers,
    cursors: Option<&mut HashMap<crate::execute::Task, ZstdCursor<'s>>>,
    want_crc: bool,
) -> Result<Option<crc32fast::Hasher>> {
    let t = u.task;
    let out = &job.layout.tensors[t.out];
    let src = &job.catalog.tensors[out.source];
    let piece = &src.pieces[t.piece];
    let g = geometry(job.catalog, job.layout, &t);
    let ies = piece.stored_dtype.size();
    let (first, count) = u.sub_box.span(&g.strides);
    let at = piece.offset + first * ies as u64;
    b.inbuf.resize(count as usize * ies, 0);
    match piece.encoding {
        Encoding::Zstd {
            stream_offset,
            stream_len,
        } => {
            let cursors = cursors.ok_or_else(|| {
                CoreError::Internal("a compressed piece was staged off the decoding thread".into())
            })?;
            let c = cursors.entry(t).or_insert_with(|| {
                ZstdCursor::new(job.sources, piece.file, stream_offset, stream_len)
            });
            c.read_at(at, &mut b.inbuf)?;
            // Drop a decoder once its piece's last sub-box is read.
            if u.sub + 1 == u.subs {
                cursors.remove(&t);
            }
        }
        Encoding::Raw => job.sources.read_at(piece.file, at, &mut b.inbuf)?,
    }
    let crc = want_crc.then(|| {
        let mut h = crc32fast::Hasher::new();
        h.update(&b.inbuf);
        h
    });
    let n = u.elems as usize * ies;
    let ordered: &[u8] = if u.sub_box.is_contiguous(&g.strides) {
        &b.inbuf[..n]
    } else {
        b.gbuf.resize(n, 0);
        gather(&u.sub_box, &g.strides, ies, &b.inbuf, &mut b.gbuf);
        &b.gbuf
    };
    if seg.from == u.from {
        dst.copy_from_slice(ordered);
    } else {
        convert::convert(u.from, seg.from, ordered, dst).map_err(|e| CoreError::Convert {
            tensor: src.name.clone(),
            from: u.from.to_string(),
            to: format!("{} ({e})", seg.from),
        })?;
    }
    Ok(crc)
}

/// Waits for the round in `slot` and writes what landed (receives and local units).
fn write_landed<E: Engine>(
    engine: &mut E,
    job: &Job<'_>,
    slot: usize,
    work: &RoundWork,
    bufs: &mut [Buffers],
) -> Result<()> {
    let land = engine.landed(slot)?;
    if work.land_len == 0 {
        return Ok(());
    }
    let files = job
        .files
        .ok_or_else(|| CoreError::Internal("bytes landed on a rank that writes no file".into()))?;
    let land = land
        .get(..work.land_len)
        .ok_or_else(|| CoreError::Internal("landing buffer shorter than the round".into()))?;
    let segs: Vec<&Seg> = work.landing().collect();
    let write = |s: &Seg| -> Result<()> {
        let u = &job.units[s.unit];
        let out = &job.layout.tensors[u.task.out];
        let g = geometry(job.catalog, job.layout, &u.task);
        let oes = out.dtype.size();
        let data = &land[s.out_off..s.out_off + s.out_len];
        let mut pos = 0usize;
        for (elem, len) in runs(&g, &u.sub_box) {
            let n = len as usize * oes;
            files.write_at(
                out.file,
                out.offset + elem * oes as u64,
                &data[pos..pos + n],
            )?;
            pos += n;
        }
        Ok(())
    };
    let threads = if work.land_len < (4 << 20) {
        1
    } else {
        bufs.len().min(segs.len()).max(1)
    };
    if threads == 1 {
        segs.iter().try_for_each(|s| write(s))?;
    } else {
        let first_error: Mutex<Option<CoreError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for t in 0..threads {
                let (segs, write, first_error) = (&segs, &write, &first_error);
                scope.spawn(move || {
                    for s in segs.iter().skip(t).step_by(threads) {
                        if let Err(e) = write(s) {
                            first_error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
    }
    let local: usize = work.locals.iter().map(|s| s.out_len).sum();
    job.written.fetch_add(local as u64, Ordering::Relaxed);
    Ok(())
}

/// Files whose records this rank must check whole because units of the rounds read them:
/// the ones the CPU executor does not already check (it checks those of its own tasks).
pub fn files_read(job: &Job<'_>, rounds: &[RoundWork]) -> HashSet<usize> {
    rounds
        .iter()
        .flat_map(|w| w.staged())
        .map(|s| {
            let t = job.units[s.unit].task;
            job.catalog.tensors[job.layout.tensors[t.out].source].pieces[t.piece].file
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    //! The driver on a CPU stand-in for the device and NCCL: one thread per rank, a channel
    //! per ordered pair of ranks, the kernels' CPU twins for conversions. Saves run end to end
    //! (layout, plan, schedule, rounds, output files) and must give exactly the CPU executor's
    //! bytes.

    use super::*;
    use crate::gpu::kernels::twin_convert;
    use std::sync::mpsc::{Receiver, Sender};
    use std::time::Duration;

    /// NCCL stand-in: sends are queued, receives block (with a deadline), sizes must match.
    pub(crate) struct HostEngine {
        pub converts: bool,
        pub staging: [Vec<u8>; 2],
        pub landing: [Vec<u8>; 2],
        pub to: HashMap<usize, Sender<Vec<u8>>>,
        pub from: HashMap<usize, Receiver<Vec<u8>>>,
        /// Rounds launched (for the tests' bookkeeping).
        pub launched: usize,
    }

    impl HostEngine {
        /// A world of `n` connected engines.
        pub fn world(n: usize, cap: usize, converts: bool) -> Vec<HostEngine> {
            let mut engines: Vec<HostEngine> = (0..n)
                .map(|_| HostEngine {
                    converts,
                    staging: [vec![0; cap], vec![0; cap]],
                    landing: [vec![0; cap], vec![0; cap]],
                    to: HashMap::new(),
                    from: HashMap::new(),
                    launched: 0,
                })
                .collect();
            for a in 0..n {
                for b in 0..n {
                    if a != b {
                        let (tx, rx) = std::sync::mpsc::channel();
                        engines[a].to.insert(b, tx);
                        engines[b].from.insert(a, rx);
                    }
                }
            }
            engines
        }
    }

    impl Engine for HostEngine {
        fn converts(&self) -> bool {
            self.converts
        }
        fn staging(&mut self, slot: usize) -> Result<&mut [u8]> {
            Ok(&mut self.staging[slot])
        }
        fn launch(&mut self, slot: usize, work: &RoundWork) -> Result<()> {
            self.launched += 1;
            let staged = &self.staging[slot];
            let conv = |s: &Seg, out: &mut [u8]| {
                twin_convert(s.from, s.to, &staged[s.in_off..s.in_off + s.in_len], out)
                    .map_err(|e| CoreError::Internal(e.to_string()))
            };
            for b in &work.sends {
                let mut msg = vec![0u8; b.len];
                for s in &b.segs {
                    let o = s.out_off - b.off;
                    conv(s, &mut msg[o..o + s.out_len])?;
                }
                self.to[&b.peer]
                    .send(msg)
                    .map_err(|_| CoreError::Remote(format!("rank {} is gone", b.peer)))?;
            }
            let land = &mut self.landing[slot];
            for b in &work.recvs {
                let msg = self.from[&b.peer]
                    .recv_timeout(Duration::from_secs(20))
                    .map_err(|_| CoreError::Remote(format!("nothing from rank {}", b.peer)))?;
                if msg.len() != b.len {
                    return Err(CoreError::Remote(format!(
                        "rank {} sent {} bytes, {} expected: the schedules disagree",
                        b.peer,
                        msg.len(),
                        b.len
                    )));
                }
                land[b.off..b.off + b.len].copy_from_slice(&msg);
            }
            for s in &work.locals {
                let out = &mut land[s.out_off..s.out_off + s.out_len];
                twin_convert(s.from, s.to, &staged[s.in_off..s.in_off + s.in_len], out)
                    .map_err(|e| CoreError::Internal(e.to_string()))?;
            }
            Ok(())
        }
        fn landed(&mut self, slot: usize) -> Result<&[u8]> {
            Ok(&self.landing[slot])
        }
    }
}
