//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! - [`scratch_dir`]: one directory per fuzzing process on a tmpfs (`/dev/shm`), for the readers
//!   that need paths; targets write into it once at start and overwrite single files per input.
//! - [`stored_zip`] / [`rewrap_pickle`]: a minimal zip writer, so that a target can fuzz the
//!   pickle inside a `torch.save` archive while the archive around it stays valid (byte-level
//!   mutations of a whole zip mostly break its directory and never reach the pickle readers).
//! - [`reachable`]: every value of a parsed pickle, found without recursion and without looping
//!   on cycles (memoized containers can contain themselves).
//! - [`use_tensor`] / [`use_catalog`]: call what the rest of axsave calls on a reader's results
//!   (sizes, byte extents, coverage checks, `Display` of errors). Fuzz builds have overflow checks
//!   on, so a reader that lets an absurd size through shows up as a panic here.
//! - [`mutate`]: the targets' mutator. Besides libFuzzer's byte-level mutations it rewrites one
//!   integer of a pickle to an extreme value (0, 2^31, 2^62, 2^64 - 1, -1, ...), re-encoded with
//!   the opcode that fits: sizes, strides, offsets and counts are integers in every format read
//!   here, and byte mutations rarely turn a `K\x04` into a 9-byte `LONG1` with a meaningful value.
//! - [`LimitAlloc`], the global allocator of every target: an allocation larger than
//!   [`ALLOC_LIMIT`] aborts with a backtrace. libFuzzer's own `-malloc_limit_mb` needs a
//!   sanitizer runtime, which stable-toolchain builds (`-s none`) do not have; this catches a
//!   lying size that would reserve gigabytes without touching them (invisible to `-rss_limit_mb`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use axsave_formats::pickle::{Node, Pickle, Value};
use axsave_formats::torchsave::{TensorRef, TorchSave};
use axsave_formats::zip::ZipIndex;
use axsave_formats::{Catalog, Region};

/// The repository's `tests/fixtures`, as seen from this crate.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A fresh directory for this process: `/dev/shm/axsave-fuzz-<tag>-<pid>` (or under the system
/// temp dir when there is no `/dev/shm`). `scripts/fuzz.sh` removes them after each run.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("axsave-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Copies the files of `from` into `to` recursively (fixtures are small).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for e in std::fs::read_dir(from).expect("read fixture dir").flatten() {
        let p = e.path();
        let dest = to.join(e.file_name());
        if p.is_dir() {
            copy_tree(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).expect("copy fixture file");
        }
    }
}

/// Files under `dir` (recursively) whose name ends with `suffix`, sorted by their path relative
/// to `dir` in byte order (what `LC_ALL=C sort` gives in scripts/fuzz.sh).
pub fn files_sorted(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    fn walk(d: &Path, suffix: &str, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(d) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, suffix, out);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, suffix, &mut out);
    out.sort_by(|a, b| {
        let ra = a
            .strip_prefix(dir)
            .unwrap_or(a)
            .as_os_str()
            .as_encoded_bytes();
        let rb = b
            .strip_prefix(dir)
            .unwrap_or(b)
            .as_os_str()
            .as_encoded_bytes();
        ra.cmp(rb)
    });
    out
}

/// Whether `data` starts like a zip archive (a local file header).
pub fn is_zip(data: &[u8]) -> bool {
    data.starts_with(b"PK\x03\x04")
}

/// A zip of STORED records, as `torch.save` writes them (without the data descriptors and
/// alignment padding, which no reader needs), each with the CRC-32 of its bytes: the reader
/// checks those of `data.pkl` and `byteorder`, and a mutated pickle should reach the parser.
pub fn stored_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let local = out.len() as u32;
        let (nlen, size) = (name.len() as u16, data.len() as u32);
        let crc = crc32fast::hash(data).to_le_bytes();
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method, time, date
        out.extend_from_slice(&crc);
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&nlen.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);

        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // versions, flags, method, time, date
        central.extend_from_slice(&crc);
        central.extend_from_slice(&size.to_le_bytes());
        central.extend_from_slice(&size.to_le_bytes());
        central.extend_from_slice(&nlen.to_le_bytes());
        central.extend_from_slice(&[0; 12]); // extra, comment, disk, internal and external attributes
        central.extend_from_slice(&local.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let (cd_offset, cd_size) = (out.len() as u32, central.len() as u32);
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // disk numbers
    let n = entries.len() as u16;
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&cd_size.to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // comment length
    out
}

/// The records of a (valid) archive: name and bytes.
pub fn zip_records(archive: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let zip = ZipIndex::parse(archive).ok()?;
    zip.entries()
        .iter()
        .map(|e| Some((e.name.clone(), zip.bytes(archive, e)?.to_vec())))
        .collect()
}

/// `records` as an archive whose `data.pkl` is `pickle` (every other record kept), or, when
/// `records` has none, `archive/data.pkl` and `archive/byteorder` only.
pub fn rewrap_pickle(records: &[(String, Vec<u8>)], pickle: &[u8]) -> Vec<u8> {
    let mut entries: Vec<(&str, &[u8])> = Vec::with_capacity(records.len() + 2);
    let mut replaced = false;
    for (name, data) in records {
        if name == "data.pkl" || name.ends_with("/data.pkl") {
            entries.push((name, pickle));
            replaced = true;
        } else {
            entries.push((name, data));
        }
    }
    if !replaced {
        entries.insert(0, ("archive/data.pkl", pickle));
        entries.push(("archive/byteorder", b"little"));
    }
    stored_zip(&entries)
}

/// Every value reachable from the root of `p` (each arena node once; the root first).
pub fn reachable(p: &Pickle) -> Vec<Value> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut todo = vec![p.root().clone()];
    while let Some(v) = todo.pop() {
        if let Value::Ref(i) = v {
            if !seen.insert(i) {
                continue;
            }
            match p.node(&v) {
                Some(Node::List(items) | Node::Tuple(items) | Node::Set(items)) => {
                    todo.extend(items.iter().cloned())
                }
                Some(Node::Dict(pairs)) => {
                    for (k, x) in pairs {
                        todo.push(k.clone());
                        todo.push(x.clone());
                    }
                }
                Some(Node::Object(o)) => {
                    todo.push(o.callable.clone());
                    todo.push(o.args.clone());
                    todo.extend(o.kwargs.iter().cloned());
                    todo.extend(o.state.iter().cloned());
                    for (k, x) in &o.dict_items {
                        todo.push(k.clone());
                        todo.push(x.clone());
                    }
                    todo.extend(o.list_items.iter().cloned());
                }
                Some(Node::PersId(pid)) => todo.push(pid.clone()),
                Some(Node::Global { .. }) | None => {}
            }
        }
        out.push(v);
    }
    out
}

/// Calls the read-only accessors the typed extractors use on every reachable value.
pub fn use_pickle(p: &Pickle) {
    for v in reachable(p) {
        let _ = p.describe(&v);
        let _ = p.as_str(&v);
        let _ = p.as_int(&v);
        let _ = p.as_sequence(&v);
        let _ = p.as_dict(&v);
        let _ = p.dict_get(&v, "state_dict_metadata");
        let _ = p.class_of(&v);
        let _ = p.call_args(&v);
        let _ = p.as_persid(&v);
    }
}

/// What the DCP and ZeRO readers do with a [`TensorRef`] (and what an executor later relies on).
pub fn use_tensor(save: &TorchSave, t: &TensorRef) {
    let _ = t.numel();
    let _ = t.is_contiguous();
    let (first, last) = t.byte_extent();
    assert!(
        first <= last || t.numel() == 0,
        "byte extent {first}..{last}"
    );
    if let Some(record) = save.storage(&t.storage_key) {
        let _ = last > record.size || t.storage_nbytes > record.size;
        let _ = record.data_offset + first;
    }
}

/// Whether `AXSAVE_FUZZ_DEBUG` is set: the targets then print what they read (for looking at
/// one input: `AXSAVE_FUZZ_DEBUG=1 fuzz/target/.../torchsave INPUT`).
pub fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("AXSAVE_FUZZ_DEBUG").is_some())
}

/// Tensors of a parsed archive, as the torchsave fuzz target reads them.
pub fn use_torchsave(save: &TorchSave) {
    use_pickle(&save.pickle);
    for v in reachable(&save.pickle) {
        if !save.is_tensor(&v) {
            continue;
        }
        let t = save.tensor(&v);
        if debug() {
            eprintln!("tensor {}: {t:?}", save.pickle.describe(&v));
        }
        match t {
            Some(Ok(t)) => use_tensor(save, &t),
            Some(Err(e)) => {
                let _ = e.to_string();
            }
            None => {}
        }
    }
    let _ = save.tensor(save.pickle.root());
}

/// What the planner, executor, `inspect` and `verify` compute from a catalog. With overflow
/// checks on, an absurd size a reader let through panics here.
pub fn use_catalog(cat: &Catalog) {
    if debug() {
        eprintln!("{cat:#?}");
    }
    for t in &cat.tensors {
        let _ = t.numel();
        let _ = t.nbytes();
        let _ = t.check_coverage();
        for p in &t.pieces {
            assert!(
                p.file < cat.files.len(),
                "tensor {}: piece in file {} of {}",
                t.name,
                p.file,
                cat.files.len()
            );
            // plan.rs: the piece's bytes in the output dtype.
            let _ = p.region.numel() * t.dtype.size() as u64;
            let _ = p.stored_sizes();
            if let Region::Box { offsets, sizes } = &p.region {
                assert_eq!(offsets.len(), sizes.len(), "tensor {}", t.name);
            }
            // execute.rs: the file span the piece reads.
            let (off, len) = p.byte_span();
            let _ = off.checked_add(len);
        }
    }
    let _ = cat.total_bytes();
    let _ = format!("{cat:?}");
}

/// Largest single allocation a target may make. Inputs are kilobytes; the biggest legitimate
/// buffers are the DCP zstd reader's 1 MiB windows.
pub const ALLOC_LIMIT: usize = 256 << 20;

/// [`System`], aborting on an allocation above [`ALLOC_LIMIT`] (see the module docs).
pub struct LimitAlloc;

#[global_allocator]
static GLOBAL: LimitAlloc = LimitAlloc;

fn check_size(size: usize) {
    if size > ALLOC_LIMIT {
        // Both only make small allocations, which pass this check.
        eprintln!("axsave-fuzz: allocation of {size} bytes (limit {ALLOC_LIMIT})");
        eprintln!("{}", std::backtrace::Backtrace::force_capture());
        std::process::abort();
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the check only aborts.
unsafe impl GlobalAlloc for LimitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check_size(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check_size(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check_size(new_size);
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Byte ranges `[start, end)` of the integer opcodes (`BININT1`, `BININT2`, `BININT`, `LONG1`,
/// `INT`, `LONG`, opcode included) of the pickle at the start of `data`, up to `STOP` or to the
/// first opcode whose argument runs past the end.
pub fn pickle_int_sites(data: &[u8]) -> Vec<(usize, usize)> {
    let line = |from: usize| {
        data[from.min(data.len())..]
            .iter()
            .position(|&b| b == b'\n')
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let (start, op) = (i, data[i]);
        i += 1;
        let arg = match op {
            b'.' => break,
            b'K' | b'q' | b'h' | 0x80 | 0x82 => Some(1),
            b'M' | 0x83 => Some(2),
            b'J' | b'j' | b'r' | 0x84 => Some(4),
            b'G' | 0x95 => Some(8),
            b'C' | b'U' | 0x8c | 0x8a => data.get(i).map(|&n| 1 + n as usize),
            b'X' | b'B' | b'T' | 0x8b => data
                .get(i..i + 4)
                .map(|b| 4 + u32::from_le_bytes(b.try_into().unwrap()) as usize),
            0x8e | 0x8d | 0x96 => data
                .get(i..i + 8)
                .and_then(|b| usize::try_from(u64::from_le_bytes(b.try_into().unwrap())).ok())
                .and_then(|n| n.checked_add(8)),
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'p' | b'g' => line(i).map(|n| n + 1),
            b'c' | b'i' => line(i).and_then(|a| line(i + a + 1).map(|b| a + b + 2)),
            _ => Some(0),
        };
        let Some(end) = arg
            .and_then(|n| i.checked_add(n))
            .filter(|&e| e <= data.len())
        else {
            break;
        };
        if matches!(op, b'K' | b'M' | b'J' | b'I' | b'L') || (op == 0x8a && end - start <= 18) {
            out.push((start, end));
        }
        i = end;
    }
    out
}

/// The value of an integer opcode found by [`pickle_int_sites`] (0 when it does not parse).
fn int_value(site: &[u8]) -> i128 {
    let arg = &site[1..];
    match site[0] {
        b'K' => arg[0] as i128,
        b'M' => u16::from_le_bytes([arg[0], arg[1]]) as i128,
        b'J' => i32::from_le_bytes([arg[0], arg[1], arg[2], arg[3]]) as i128,
        0x8a => {
            let b = &arg[1..];
            let mut buf = if b.last().is_some_and(|x| x & 0x80 != 0) {
                [0xff; 16]
            } else {
                [0; 16]
            };
            buf[..b.len()].copy_from_slice(b);
            i128::from_le_bytes(buf)
        }
        _ => std::str::from_utf8(arg)
            .ok()
            .and_then(|s| s.trim().trim_end_matches('L').parse().ok())
            .unwrap_or(0),
    }
}

/// The shortest pickle encoding of `v`.
fn int_opcode(v: i128) -> Vec<u8> {
    if (0..=0xff).contains(&v) {
        return vec![b'K', v as u8];
    }
    if (0..=0xffff).contains(&v) {
        let b = (v as u16).to_le_bytes();
        return vec![b'M', b[0], b[1]];
    }
    if (i32::MIN as i128..=i32::MAX as i128).contains(&v) {
        let mut out = vec![b'J'];
        out.extend_from_slice(&(v as i32).to_le_bytes());
        return out;
    }
    // LONG1: minimal little-endian two's complement.
    let mut b = v.to_le_bytes().to_vec();
    while b.len() > 1 {
        let (last, prev) = (b[b.len() - 1], b[b.len() - 2]);
        if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
            b.pop();
        } else {
            break;
        }
    }
    let mut out = vec![0x8a, b.len() as u8];
    out.extend_from_slice(&b);
    out
}

/// Rewrites one integer of the pickle that starts at `data[from..size]` (see [`mutate`]).
/// Returns the new size, or `None` when there is no integer or no room.
pub fn mutate_pickle_int(
    data: &mut [u8],
    size: usize,
    max_size: usize,
    seed: u32,
    from: usize,
) -> Option<usize> {
    let sites = pickle_int_sites(data.get(from..size)?);
    if sites.is_empty() {
        return None;
    }
    let mut x = (seed as u64 ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut next = || {
        x ^= x >> 31;
        x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 29;
        x
    };
    let (s, e) = sites[next() as usize % sites.len()];
    let (s, e) = (s + from, e + from);
    let old = int_value(&data[s..e]);
    let new = match next() % 8 {
        0..=3 => EXTREMES[next() as usize % EXTREMES.len()],
        4 => old + 1,
        5 => old - 1,
        6 => old.checked_mul(1 << (next() % 40)).unwrap_or(old),
        _ => next() as i64 as i128,
    };
    let enc = int_opcode(new);
    let new_size = size - (e - s) + enc.len();
    if new_size > max_size {
        return None;
    }
    data.copy_within(e..size, s + enc.len());
    data[s..s + enc.len()].copy_from_slice(&enc);
    Some(new_size)
}

/// Integers the mutators and generators favour: the edges of every integer width.
pub const EXTREMES: [i128; 20] = [
    0,
    1,
    2,
    -1,
    -2,
    0x7f,
    0xff,
    0x100,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 53,
    1 << 62,
    (1 << 62) + 1,
    i64::MAX as i128,
    i64::MIN as i128,
    u64::MAX as i128,
    1 << 64,
    (u64::MAX as i128) / 3,
];

/// The targets' mutator: one time in four an integer of the pickle at `data[from..]` is set to
/// an extreme value ([`mutate_pickle_int`]); otherwise, or when that finds no integer,
/// libFuzzer's own mutations (which use the `-dict` given).
pub fn mutate(
    data: &mut [u8],
    size: usize,
    max_size: usize,
    seed: u32,
    from: Option<usize>,
) -> usize {
    if let Some(from) = from
        && seed.is_multiple_of(4)
        && let Some(n) = mutate_pickle_int(data, size, max_size, seed / 4, from)
    {
        return n;
    }
    libfuzzer_sys::fuzzer_mutate(data, size, max_size)
}

/// A `torch.save` `data.pkl` holding one tensor, generated from `spec` (the torchsave target's
/// generator mode), so that every combination of extreme sizes, strides, offsets and storage
/// sizes is one input away: `[form, storage class, ndim, offset, numel, size.., stride..]`, each
/// number one byte: below 20 an [`EXTREMES`] entry, else the byte minus 20. `form` picks
/// `_rebuild_tensor_v2`, `_rebuild_tensor_v3` over an `UntypedStorage`, a `_rebuild_parameter`
/// or a `_rebuild_from_type_v2` around the former.
pub fn tensor_pickle(spec: &[u8]) -> Vec<u8> {
    const CLASSES: [&str; 8] = [
        "FloatStorage",
        "BFloat16Storage",
        "HalfStorage",
        "DoubleStorage",
        "LongStorage",
        "ByteStorage",
        "BoolStorage",
        "UntypedStorage",
    ];
    const DTYPES: [&str; 8] = [
        "float32", "bfloat16", "float16", "float64", "int64", "uint8", "bool", "int8",
    ];
    let mut it = spec.iter().copied();
    let mut byte = || it.next().unwrap_or(0);
    let form = byte();
    let class = byte() as usize;
    let ndim = (byte() % 6) as usize;
    let num = |b: u8| match b {
        0..20 => EXTREMES[b as usize],
        _ => b as i128 - 20,
    };
    let mut vals: Vec<i128> = Vec::new();
    for _ in 0..2 + 2 * ndim {
        vals.push(num(byte()));
    }
    let (offset, numel) = (vals[0], vals[1]);
    let (sizes, strides) = vals[2..].split_at(ndim);

    let mut p = b"\x80\x02".to_vec();
    let global = |p: &mut Vec<u8>, m: &str, n: &str| {
        p.push(b'c');
        p.extend_from_slice(format!("{m}\n{n}\n").as_bytes());
    };
    let text = |p: &mut Vec<u8>, s: &str| {
        p.extend_from_slice(&[0x8c, s.len() as u8]);
        p.extend_from_slice(s.as_bytes());
    };
    let v3 = form % 4 == 1;
    let wrapper = form % 4;
    if wrapper == 2 {
        global(&mut p, "torch._utils", "_rebuild_parameter");
        p.push(b'(');
    } else if wrapper == 3 {
        global(&mut p, "torch._tensor", "_rebuild_from_type_v2");
        p.push(b'(');
    }
    let rebuild = if v3 {
        "_rebuild_tensor_v3"
    } else {
        "_rebuild_tensor_v2"
    };
    global(&mut p, "torch._utils", rebuild);
    if wrapper == 3 {
        // _rebuild_from_type_v2(func, type, args, state)
        global(&mut p, "torch", "Tensor");
    }
    p.push(b'(');
    // The persistent id: ('storage', class, key, location, numel).
    p.push(b'(');
    text(&mut p, "storage");
    let cls = if v3 {
        "UntypedStorage"
    } else {
        CLASSES[class % CLASSES.len()]
    };
    global(&mut p, "torch", cls);
    text(&mut p, "0");
    text(&mut p, "cpu");
    p.extend(int_opcode(numel));
    p.extend_from_slice(b"tQ");
    p.extend(int_opcode(offset));
    for dims in [sizes, strides] {
        p.push(b'(');
        for &d in dims {
            p.extend(int_opcode(d));
        }
        p.push(b't');
    }
    p.push(0x89); // requires_grad
    p.push(b'N'); // backward hooks
    if v3 {
        global(&mut p, "torch", DTYPES[class % DTYPES.len()]);
    }
    p.push(b't');
    if wrapper != 3 {
        p.push(b'R');
    }
    match wrapper {
        2 => p.extend_from_slice(b"\x89}tR"),
        3 => p.extend_from_slice(b"NtR"),
        _ => {}
    }
    p.push(b'.');
    p
}
