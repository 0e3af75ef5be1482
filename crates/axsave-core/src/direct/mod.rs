//! Direct-I/O writers for the output files.
//!
//! Written through the page cache, a file reaches the disk at the speed of the kernel's
//! writeback of that one file, which on many machines is a single stream well below what the
//! disk takes (and the copy stalls on dirty-page throttling meanwhile). Here the block-aligned
//! middle of each write goes through an aligned staging buffer to a few writer threads that
//! write it with `O_DIRECT`, so the disk sees several writes in flight, as with parallel
//! `dd oflag=direct` streams. Bytes that need no conversion are read from the source straight
//! into the staging buffer (`Writers::write_from`); others are copied in
//! (`Writers::write_at`). The unaligned ends of a write (the bytes of blocks it covers only
//! in part) are gathered with the other parts of their blocks (`stitch`); a block made whole
//! goes direct too, and the blocks that never become whole (the one the header shares, a file's
//! last block) are written through the page cache after the direct writes, as are files on
//! filesystems that refuse `O_DIRECT`; the final fsync covers both. The two never share a
//! block: a block goes direct only when every byte of it is at hand, the page cache gets only
//! the others, and every output byte is written once.
//!
//! Sized from `--memory-budget` ([`WriteOptions::for_budget`]) and tunable with
//! `AXSAVE_WRITERS` ([`WriteOptions::with_env`]).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::error::{CoreError, Result};
use crate::execute::Fill;

mod staging;
mod stitch;

pub use staging::ALIGN;
use staging::Staging;
use stitch::{Added, Stitcher};

/// Tuning of the output writers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// Threads writing with `O_DIRECT`; 0 writes everything through the page cache.
    pub writers: usize,
    /// Bytes per staging buffer (a multiple of [`ALIGN`]); each writer has two, so the
    /// buffers take `2 * writers * buffer_bytes`.
    pub buffer_bytes: usize,
    /// Memory for gathering the blocks no single write covers whole, so that they too go
    /// direct (each takes `2 * ALIGN`); 0 writes such bytes through the page cache at once.
    pub stitch_bytes: usize,
}

impl Default for WriteOptions {
    /// [`WriteOptions::for_budget`] of the default 256 MiB `--memory-budget`: 8 writers of two
    /// 1.6 MiB buffers, 6.4 MiB for partial blocks.
    fn default() -> Self {
        WriteOptions::for_budget(256 << 20)
    }
}

impl WriteOptions {
    /// Writers that take an eighth of `budget`, at most 40 MiB (half of the quarter of the
    /// budget the copy's own buffers leave free, see
    /// [`crate::execute::ExecOptions::for_budget`]): 8 writers with two staging buffers each of
    /// `budget / 160`, rounded down to [`ALIGN`], from 64 KiB to 2 MiB, and a quarter of what
    /// the buffers take again for partial blocks.
    pub fn for_budget(budget: u64) -> Self {
        const WRITERS: usize = 8;
        let each = (budget / (10 * 2 * WRITERS as u64)) as usize;
        let buffer_bytes = each.clamp(64 << 10, 2 << 20) / ALIGN * ALIGN;
        WriteOptions {
            writers: WRITERS,
            buffer_bytes,
            stitch_bytes: 2 * WRITERS * buffer_bytes / 4,
        }
    }

    /// `self` with the environment's overrides: `AXSAVE_WRITERS=N` the number of writers (at
    /// most 64; `0`: no direct I/O, everything through the page cache) and
    /// `AXSAVE_WRITE_BUFFER_KIB=K` the size of each buffer (4 KiB to 256 MiB). A value that is
    /// not a number is ignored.
    pub fn with_env(mut self) -> Self {
        if let Some(n) = std::env::var("AXSAVE_WRITERS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            self.writers = n.min(64);
        }
        if let Some(n) = std::env::var("AXSAVE_WRITE_BUFFER_KIB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            self.buffer_bytes = n.clamp(4, 256 * 1024) * 1024;
        }
        self
    }
}

/// A file being written: its page-cache handle and, where the filesystem takes it, a second
/// handle opened with `O_DIRECT`.
pub(crate) struct Target {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    direct: Option<File>,
}

impl Target {
    /// Wraps `file` (open for writing at `path`) and, when `want_direct`, opens `path` again
    /// with `O_DIRECT`; a filesystem that refuses it (tmpfs, some network ones) leaves the
    /// file to the page cache.
    pub(crate) fn new(path: PathBuf, file: File, want_direct: bool) -> Self {
        let direct = if want_direct {
            open_direct(&path).filter(|d| same_file(&file, d))
        } else {
            None
        };
        Target { path, file, direct }
    }

    fn buffered(&self, data: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| CoreError::io(&self.path, e))
    }
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_: &Path) -> Option<File> {
    None
}

/// Whether two handles are the same file (a temporary renamed or replaced between its
/// creation and the second open would not be: its writes then all go through the first).
fn same_file(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// One aligned span waiting for a writer.
struct Request {
    file: usize,
    offset: u64,
    buf: Staging,
    len: usize,
    /// Whether `buf` returns to the pool of staging buffers (a block gathered by the stitcher
    /// is not one of them).
    pooled: bool,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Request>,
    free: Vec<Staging>,
    allocated: usize,
    /// Requests queued or being written.
    in_flight: usize,
    /// The first failure, reported by every later call.
    error: Option<(PathBuf, std::io::ErrorKind, Option<i32>, String)>,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a request is queued or the pool closes.
    work: Condvar,
    /// Signalled when a request is done (a buffer is free again).
    done: Condvar,
    /// Cleared when a direct write is refused with EINVAL (an alignment the device does not
    /// take): from then on everything goes through the page cache.
    direct_ok: AtomicBool,
    /// Bytes written with `O_DIRECT` so far.
    direct_bytes: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn error_of(e: &(PathBuf, std::io::ErrorKind, Option<i32>, String)) -> CoreError {
    let source = match e.2 {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.1, e.3.clone()),
    };
    CoreError::io(&e.0, source)
}

/// The output files of one rank and the threads that write their aligned spans directly.
pub(crate) struct Writers {
    targets: Arc<Vec<Option<Target>>>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    buffer_bytes: usize,
    max_buffers: usize,
    stitch: Stitcher,
}

impl Writers {
    /// Starts `opts.writers` threads for `targets` (none when no target has a direct handle).
    pub(crate) fn new(targets: Vec<Option<Target>>, opts: WriteOptions) -> Self {
        let any_direct = targets.iter().flatten().any(|t| t.direct.is_some());
        let writers = if any_direct { opts.writers } else { 0 };
        let buffer_bytes = (opts.buffer_bytes.max(ALIGN) / ALIGN) * ALIGN;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            direct_ok: AtomicBool::new(writers > 0),
            direct_bytes: AtomicU64::new(0),
        });
        let targets = Arc::new(targets);
        let threads = (0..writers)
            .map(|_| {
                let (targets, shared) = (targets.clone(), shared.clone());
                std::thread::spawn(move || writer(&targets, &shared))
            })
            .collect();
        Writers {
            targets,
            shared,
            threads,
            buffer_bytes,
            max_buffers: 2 * writers,
            stitch: Stitcher::new(opts.stitch_bytes),
        }
    }

    /// The files, in layout order (`None`: not written by this rank).
    pub(crate) fn targets(&self) -> &[Option<Target>] {
        &self.targets
    }

    /// Bytes written with `O_DIRECT` so far.
    pub(crate) fn direct_bytes(&self) -> u64 {
        self.shared.direct_bytes.load(Ordering::Relaxed)
    }

    /// Target `file`, or an error when this rank does not write it.
    fn target(&self, file: usize) -> Result<&Target> {
        match self.targets.get(file) {
            Some(Some(t)) => Ok(t),
            _ => Err(CoreError::Remote(format!(
                "asked to write file {file}, which this rank does not write"
            ))),
        }
    }

    /// Whether writes to `t` go direct: it has a direct handle, and no direct write has been
    /// refused for its alignment.
    fn goes_direct(&self, t: &Target) -> bool {
        t.direct.is_some() && self.shared.direct_ok.load(Ordering::Relaxed)
    }

    /// Writes `len` bytes at `offset` of target `file` that `fill(at, buf)` produces (`at`:
    /// where `buf` starts within the `len` bytes; called in ascending order of `at`, once per
    /// byte). The whole aligned blocks inside are filled straight into staging buffers and
    /// handed to the writers, saving the copy [`Writers::write_at`] makes; the ends (the bytes
    /// of blocks the write covers only in part) are filled into `scratch` and gathered with
    /// the other parts of their blocks ([`stitch`]). When nothing goes direct everything is
    /// written through the page cache. A failure of `fill` is returned as it is; one of an
    /// earlier direct write here or by [`Writers::drain`].
    pub(crate) fn write_from(
        &self,
        file: usize,
        offset: u64,
        len: usize,
        scratch: &mut Vec<u8>,
        fill: &mut Fill<'_>,
    ) -> Result<()> {
        let t = self.target(file)?;
        let direct = self.goes_direct(t);
        let mut ends = |fill: &mut Fill<'_>, at: u64, n: usize| {
            scratch.resize(n, 0);
            fill(at, scratch)?;
            match direct {
                true => self.partial(t, file, offset + at, scratch),
                false => t.buffered(scratch, offset + at),
            }
        };
        let (a, b) = aligned_inside(offset, len);
        if !direct || b <= a {
            return ends(fill, 0, len);
        }
        if a > offset {
            ends(fill, 0, (a - offset) as usize)?;
        }
        self.stage(file, a, b, &mut |at, buf| fill(at - offset, buf))?;
        let end = offset + len as u64;
        if end > b {
            ends(fill, b - offset, (end - b) as usize)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset` of target `file`: the whole aligned blocks inside go to the
    /// writers (copied, so `data` can be reused at once), the ends are gathered with the other
    /// parts of their blocks; everything through the page cache when nothing goes direct. A
    /// failure of an earlier direct write is returned here or by [`Writers::drain`].
    pub(crate) fn write_at(&self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        let t = self.target(file)?;
        if !self.goes_direct(t) {
            return t.buffered(data, offset);
        }
        let (a, b) = aligned_inside(offset, data.len());
        if b <= a {
            return self.partial(t, file, offset, data);
        }
        let (head, rest) = data.split_at((a - offset) as usize);
        let (middle, tail) = rest.split_at((b - a) as usize);
        self.partial(t, file, offset, head)?;
        self.stage(file, a, b, &mut |at, buf| {
            let from = (at - a) as usize;
            buf.copy_from_slice(&middle[from..from + buf.len()]);
            Ok(())
        })?;
        self.partial(t, file, b, tail)
    }

    /// Bytes at `offset` of target `file` that fill no block whole: each part is gathered with
    /// the rest of its block, and a block made whole goes to the writers; a part the stitcher
    /// has no room for is written through the page cache at once.
    fn partial(&self, t: &Target, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        for (pos, lo, hi) in stitch::parts(offset, data.len()) {
            match self.stitch.add(file, pos, &data[lo..hi]) {
                Added::Kept => {}
                Added::Whole(buf) => self.queue(Request {
                    file,
                    offset: pos / ALIGN as u64 * ALIGN as u64,
                    buf,
                    len: ALIGN,
                    pooled: false,
                }),
                Added::Refused => t.buffered(&data[lo..hi], pos)?,
            }
        }
        Ok(())
    }

    /// Hands the aligned bytes `[a, b)` of target `file` to the writers, one staging buffer at
    /// a time, each filled by `fill(file offset, buffer)`. A failing fill returns its buffer to
    /// the pool and its error.
    fn stage(&self, file: usize, a: u64, b: u64, fill: &mut Fill<'_>) -> Result<()> {
        let mut at = a;
        while at < b {
            let n = ((b - at) as usize).min(self.buffer_bytes);
            let mut buf = self.take_buffer()?;
            if let Err(e) = fill(at, buf.bytes_mut(n)) {
                self.put_back(buf);
                return Err(e);
            }
            self.queue(Request {
                file,
                offset: at,
                buf,
                len: n,
                pooled: true,
            });
            at += n as u64;
        }
        Ok(())
    }

    fn queue(&self, r: Request) {
        let mut st = self.shared.lock();
        st.queue.push_back(r);
        st.in_flight += 1;
        drop(st);
        self.shared.work.notify_one();
    }

    /// Returns a buffer taken but not queued to the pool.
    fn put_back(&self, buf: Staging) {
        self.shared.lock().free.push(buf);
        self.shared.done.notify_all();
    }

    /// A free staging buffer, allocated up to the pool's size, else waited for.
    fn take_buffer(&self) -> Result<Staging> {
        let mut st = self.shared.lock();
        loop {
            if let Some(e) = &st.error {
                return Err(error_of(e));
            }
            if let Some(b) = st.free.pop() {
                return Ok(b);
            }
            if st.allocated < self.max_buffers {
                st.allocated += 1;
                drop(st);
                return Ok(Staging::new(self.buffer_bytes));
            }
            st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until every queued write is on its way to the disk (written; the caller fsyncs),
    /// then writes the blocks that never became whole through the page cache (no direct write
    /// is in flight by then to contend with); returns the first failure.
    pub(crate) fn drain(&self) -> Result<()> {
        let mut st = self.shared.lock();
        while st.in_flight > 0 {
            st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(e) = &st.error {
            return Err(error_of(e));
        }
        drop(st);
        for (file, block, p) in self.stitch.take() {
            let t = self.target(file)?;
            for &(lo, hi) in &p.ranges {
                t.buffered(&p.data.bytes(ALIGN)[lo..hi], block + lo as u64)?;
            }
        }
        Ok(())
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The whole aligned blocks `[a, b)` inside `len` bytes at `offset` (`b <= a`: none).
fn aligned_inside(offset: u64, len: usize) -> (u64, u64) {
    let a = offset.div_ceil(ALIGN as u64) * ALIGN as u64;
    let b = (offset + len as u64) / ALIGN as u64 * ALIGN as u64;
    (a, b)
}

/// A writer thread: takes requests until the pool closes and its queue is empty.
fn writer(targets: &[Option<Target>], shared: &Shared) {
    loop {
        let req = {
            let mut st = shared.lock();
            loop {
                if let Some(r) = st.queue.pop_front() {
                    break r;
                }
                if st.closed {
                    return;
                }
                st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let result = write_direct(targets, shared, &req);
        let mut st = shared.lock();
        if let Err((path, e)) = result
            && st.error.is_none()
        {
            st.error = Some((path, e.kind(), e.raw_os_error(), e.to_string()));
        }
        st.in_flight -= 1;
        if req.pooled {
            st.free.push(req.buf);
        }
        drop(st);
        shared.done.notify_all();
    }
}

fn write_direct(
    targets: &[Option<Target>],
    shared: &Shared,
    req: &Request,
) -> std::result::Result<(), (PathBuf, std::io::Error)> {
    let Some(Some(t)) = targets.get(req.file) else {
        return Ok(());
    };
    let data = req.buf.bytes(req.len);
    if let Some(d) = &t.direct
        && shared.direct_ok.load(Ordering::Relaxed)
    {
        match d.write_all_at(data, req.offset) {
            Ok(()) => {
                shared
                    .direct_bytes
                    .fetch_add(req.len as u64, Ordering::Relaxed);
                return Ok(());
            }
            // An alignment the device does not take: the page cache from now on. (A direct
            // write that failed wrote nothing the buffered one below does not rewrite.)
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                shared.direct_ok.store(false, Ordering::Relaxed);
            }
            Err(e) => return Err((t.path.clone(), e)),
        }
    }
    t.file
        .write_all_at(data, req.offset)
        .map_err(|e| (t.path.clone(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(dir: &Path, name: &str, len: u64, header: &[u8], direct: bool) -> Target {
        let path = dir.join(name);
        let file = crate::output::create_exclusive(&path, true).unwrap();
        file.set_len(len).unwrap();
        file.write_all_at(header, 0).unwrap();
        Target::new(path, file, direct)
    }

    fn direct_supported() -> bool {
        let probe = tempfile::tempdir().unwrap();
        let p = probe.path().join("probe");
        std::fs::write(&p, b"").unwrap();
        let ok = open_direct(&p).is_some();
        if !ok {
            eprintln!("the temporary directory's filesystem refuses O_DIRECT: page cache only");
        }
        ok
    }

    const LEN: usize = 3 * 1024 * 1024 + 777;
    const HEADER: usize = 1000;

    fn pattern() -> Vec<u8> {
        (0..LEN).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Cut points of the data after the header: unaligned, some closer together than a
    /// block, one piece longer than a staging buffer, and a stretch of 100-byte runs (a
    /// tensor sharded on its columns).
    fn pieces() -> Vec<(usize, usize)> {
        let mut cuts = vec![HEADER, 1005, 4095, 4097, 9000, 9001, 70_000];
        cuts.extend((1..400).map(|k| 70_000 + 100 * k));
        cuts.extend([1_500_000, 1_500_000 + 12_288, 2_900_001, LEN]);
        cuts.windows(2).map(|c| (c[0], c[1])).collect()
    }

    /// The bytes of the whole aligned blocks inside each piece: what goes direct.
    fn aligned_middles(pieces: &[(usize, usize)]) -> u64 {
        pieces
            .iter()
            .map(|&(lo, hi)| {
                let (a, b) = (lo.div_ceil(ALIGN) * ALIGN, hi / ALIGN * ALIGN);
                b.saturating_sub(a) as u64
            })
            .sum()
    }

    /// How the round trip hands its bytes to the writers.
    #[derive(Clone, Copy)]
    enum Via {
        /// [`Writers::write_at`] with the bytes.
        Slice,
        /// [`Writers::write_from`], the bytes produced by a fill that checks it is called in
        /// ascending order, once per byte.
        Fill,
    }

    /// Writes the pattern after a header into two files through `w`, out of order, from
    /// several threads, drains, and checks every byte; returns the bytes written directly.
    fn round_trip(opts: WriteOptions, direct: bool, via: Via) -> u64 {
        let d = tempfile::tempdir().unwrap();
        let pattern = pattern();
        let w = Writers::new(
            vec![
                Some(target(
                    d.path(),
                    "a",
                    LEN as u64,
                    &pattern[..HEADER],
                    direct,
                )),
                None,
                Some(target(
                    d.path(),
                    "b",
                    LEN as u64,
                    &pattern[..HEADER],
                    direct,
                )),
            ],
            opts,
        );
        let pieces = pieces();
        std::thread::scope(|s| {
            for file in [0usize, 2] {
                for half in [0, 1] {
                    let (w, pattern, pieces) = (&w, &pattern, &pieces);
                    s.spawn(move || {
                        for (i, &(lo, hi)) in pieces.iter().enumerate().rev() {
                            if i % 2 != half {
                                continue;
                            }
                            match via {
                                Via::Slice => {
                                    w.write_at(file, lo as u64, &pattern[lo..hi]).unwrap()
                                }
                                Via::Fill => {
                                    let mut next = 0u64;
                                    let mut fill = |at: u64, buf: &mut [u8]| {
                                        assert_eq!(at, next, "ascending, each byte once");
                                        let from = lo + at as usize;
                                        buf.copy_from_slice(&pattern[from..from + buf.len()]);
                                        next += buf.len() as u64;
                                        Ok(())
                                    };
                                    let mut scratch = Vec::new();
                                    w.write_from(file, lo as u64, hi - lo, &mut scratch, &mut fill)
                                        .unwrap();
                                    assert_eq!(next, (hi - lo) as u64);
                                }
                            }
                        }
                    });
                }
            }
        });
        w.drain().unwrap();
        assert!(w.write_at(1, 0, b"x").is_err(), "file 1 is not ours");
        let direct_bytes = w.direct_bytes();
        drop(w);
        for name in ["a", "b"] {
            let got = std::fs::read(d.path().join(name)).unwrap();
            assert_eq!(got.len(), LEN);
            assert!(got == pattern, "{name} differs");
        }
        direct_bytes
    }

    const SMALL: WriteOptions = WriteOptions {
        writers: 3,
        buffer_bytes: 64 * 1024,
        stitch_bytes: 1 << 20,
    };

    /// Every block that holds only tensor bytes goes direct: the whole blocks inside a write
    /// (in staging buffers smaller than the longest write) and the blocks gathered from the
    /// ends of writes and from the short runs; the block the header shares and the file's
    /// last, partial one through the page cache. The files hold every byte where it belongs.
    #[test]
    fn every_block_of_tensor_bytes_goes_direct() {
        for via in [Via::Slice, Via::Fill] {
            let direct = round_trip(SMALL, true, via);
            if direct_supported() {
                let data_blocks = (LEN / ALIGN - HEADER.div_ceil(ALIGN)) * ALIGN;
                assert!(data_blocks as u64 > aligned_middles(&pieces()));
                assert_eq!(direct, 2 * data_blocks as u64);
            } else {
                assert_eq!(direct, 0);
            }
        }
    }

    /// Without room to gather partial blocks, only the whole blocks inside each write go
    /// direct, the ends and the short runs through the page cache; the bytes are the same.
    #[test]
    fn without_room_for_partial_blocks_the_ends_go_through_the_page_cache() {
        let opts = WriteOptions {
            stitch_bytes: 0,
            ..SMALL
        };
        for via in [Via::Slice, Via::Fill] {
            let direct = round_trip(opts, true, via);
            if direct_supported() {
                let middles = aligned_middles(&pieces());
                assert!(middles > 2 * 1024 * 1024, "the test writes long pieces");
                assert_eq!(direct, 2 * middles);
            } else {
                assert_eq!(direct, 0);
            }
        }
    }

    /// With room for only a few partial blocks, the rest go through the page cache at once and
    /// the blocks that were gathered still complete: the files are right either way.
    #[test]
    fn a_full_stitcher_falls_back_to_the_page_cache() {
        let opts = WriteOptions {
            stitch_bytes: 3 * 2 * ALIGN,
            ..SMALL
        };
        for via in [Via::Slice, Via::Fill] {
            let direct = round_trip(opts, true, via);
            if direct_supported() {
                let middles = aligned_middles(&pieces()) * 2;
                let data_blocks = 2 * ((LEN / ALIGN - HEADER.div_ceil(ALIGN)) * ALIGN) as u64;
                assert!((middles..data_blocks).contains(&direct), "{direct}");
            }
        }
    }

    /// A fill that fails returns its error, and the staging buffer it was filling goes back to
    /// the pool: with one buffer in all, later writes still get it.
    #[test]
    fn a_failed_fill_is_returned_and_its_buffer_reused() {
        let d = tempfile::tempdir().unwrap();
        let w = Writers::new(
            vec![Some(target(d.path(), "a", 1 << 20, &[], true))],
            WriteOptions {
                writers: 1,
                buffer_bytes: 8192,
                stitch_bytes: 0,
            },
        );
        let mut scratch = Vec::new();
        for round in 0..4u64 {
            let e = w
                .write_from(0, round * 65_536, 65_536, &mut scratch, &mut |at, buf| {
                    if at + buf.len() as u64 > 8192 {
                        Err(CoreError::Internal("the source failed".into()))
                    } else {
                        Ok(())
                    }
                })
                .unwrap_err();
            assert!(e.to_string().contains("the source failed"), "{e}");
        }
        let data = vec![9u8; 65_536];
        w.write_from(0, 131_072, 65_536, &mut scratch, &mut |at, buf| {
            let at = at as usize;
            buf.copy_from_slice(&data[at..at + buf.len()]);
            Ok(())
        })
        .unwrap();
        w.drain().unwrap();
        drop(w);
        let got = std::fs::read(d.path().join("a")).unwrap();
        assert!(got[131_072..196_608].iter().all(|&b| b == 9));
    }

    #[test]
    fn without_writers_or_a_direct_handle_everything_goes_through_the_page_cache() {
        let opts = WriteOptions {
            writers: 0,
            buffer_bytes: 64 * 1024,
            stitch_bytes: 1 << 20,
        };
        for via in [Via::Slice, Via::Fill] {
            assert_eq!(round_trip(opts, true, via), 0);
            assert_eq!(round_trip(WriteOptions::default(), false, via), 0);
        }
    }

    #[test]
    fn a_file_replaced_before_the_second_open_is_not_written_directly() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a");
        let file = crate::output::create_exclusive(&path, true).unwrap();
        // Someone puts another file at the name before the direct handle is opened.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not ours").unwrap();
        let t = Target::new(path.clone(), file, true);
        assert!(t.direct.is_none());
        let w = Writers::new(vec![Some(t)], SMALL);
        w.write_at(0, 0, &vec![1u8; 64 * 1024]).unwrap();
        w.drain().unwrap();
        assert_eq!(w.direct_bytes(), 0);
        assert_eq!(std::fs::read(&path).unwrap(), b"not ours");
    }

    #[test]
    fn a_failed_direct_write_is_reported_with_the_file() {
        if !direct_supported() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mut t = target(d.path(), "a", 1 << 20, &[], true);
        // A read-only handle in place of the direct one: every direct write fails (EBADF).
        t.direct = Some(File::open(&t.path).unwrap());
        let w = Writers::new(
            vec![Some(t)],
            WriteOptions {
                writers: 1,
                buffer_bytes: 8192,
                stitch_bytes: 0,
            },
        );
        let data = vec![7u8; 64 * 1024];
        // The first writes are queued; a later one or the drain reports the failure.
        for i in 0..8 {
            if w.write_at(0, i * 65_536, &data).is_err() {
                break;
            }
        }
        let err = w.drain().unwrap_err();
        let path = d.path().join("a").display().to_string();
        assert!(err.to_string().contains(&path), "{err}");
    }

    #[test]
    fn the_writers_take_an_eighth_of_the_budget_aligned_and_bounded() {
        let buffers = |o: WriteOptions| 2 * o.writers * o.buffer_bytes;
        let all = |o: WriteOptions| buffers(o) + o.stitch_bytes;
        assert_eq!(WriteOptions::default(), WriteOptions::for_budget(256 << 20));
        let d = WriteOptions::default();
        assert_eq!(
            (d.writers, d.buffer_bytes),
            (8, (256 << 20) / 160 / ALIGN * ALIGN)
        );
        assert!(all(d) <= 32 << 20 && all(d) > 31 << 20, "{}", all(d));
        // Capped above (2 MiB buffers) and below (64 KiB).
        assert_eq!(buffers(WriteOptions::for_budget(64 << 30)), 32 << 20);
        assert_eq!(all(WriteOptions::for_budget(64 << 30)), 40 << 20);
        assert_eq!(WriteOptions::for_budget(1 << 20).buffer_bytes, 64 << 10);
        for budget in [1u64 << 20, 100_000_000, 300 << 20, 1 << 40] {
            let o = WriteOptions::for_budget(budget);
            assert_eq!(o.buffer_bytes % ALIGN, 0, "{budget}");
            assert!(all(o) as u64 <= (budget / 8).max((5 << 20) / 4), "{budget}");
            assert_eq!(o.stitch_bytes, buffers(o) / 4, "{budget}: partial blocks");
        }
    }
}
