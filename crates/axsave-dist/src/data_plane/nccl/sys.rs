//! The raw NCCL C API that axsave uses, opened at run time.
//!
//! Only the few entry points the transport needs are declared, with the C signatures of
//! `nccl.h` (stable since NCCL 2.7 for point-to-point, 2.14 for the config struct). They are
//! resolved once, when the library is opened: a required one that is missing makes
//! [`load`] fail with [`LoadError::MissingSymbol`] instead of panicking at the first call, as
//! cudarc's own NCCL bindings would.
//!
//! # Finding the library
//!
//! cudarc's loader asks the dynamic linker for `libnccl.so` (and `.so.1`, `.so.9` … `.so.12`),
//! never `libnccl.so.2`. `libnccl.so` is the development symlink of the NCCL packages; the
//! runtime package (`libnccl2`) and NCCL's Python wheels (`nvidia-nccl-cu12`/`-cu13`, pulled in
//! by every CUDA build of torch) ship only `libnccl.so.2`, and the wheels put it in
//! `site-packages/nvidia/nccl/lib`, which is on no search path. Loading `libnccl.so.2` first
//! does not help either: glibc matches a later `dlopen("libnccl.so")` against the names and
//! SONAMEs of loaded objects, and the SONAME is `libnccl.so.2`.
//!
//! So axsave opens NCCL itself ([`candidates`] lists the order):
//!
//! 1. `AXSAVE_NCCL_LIBRARY`: a file, or a directory holding `libnccl.so.2` or `libnccl.so`.
//!    When it is set, nothing else is tried.
//! 2. `libnccl.so.2`, then `libnccl.so`, through the dynamic linker (`LD_LIBRARY_PATH`,
//!    `/etc/ld.so.cache`, the default directories).
//! 3. The Python environments the process can see, where the wheels live:
//!    `$VIRTUAL_ENV`, `$CONDA_PREFIX`, each `$PYTHONPATH` entry, the prefix of every `python3`
//!    on `$PATH`, `~/.local`, `/usr/local`, `/usr`, `/opt/conda`: `lib/python3*/`
//!    `{site,dist}-packages/nvidia/nccl/lib/libnccl.so.2` (and `$CONDA_PREFIX/lib`, where conda's
//!    `nccl` package puts it).
//! 4. The CUDA toolkit directories: `$CUDA_HOME/lib64`, `/usr/local/cuda/lib64`.
//!
//! The path that was opened is kept ([`Nccl::path`]) so the log can say which NCCL is used.

// The C names are kept, so that each declaration can be checked against nccl.h at a glance.
#![allow(non_camel_case_types)]

use std::ffi::{OsStr, OsString, c_char, c_int, c_uint, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `ncclResult_t`. Kept as a plain integer: a Rust enum would be undefined behaviour for a code
/// a newer NCCL adds.
pub type ncclResult_t = c_int;
/// `ncclComm_t`: an opaque pointer.
pub type ncclComm_t = *mut c_void;
/// `cudaStream_t` (the same object as the driver API's `CUstream`).
pub type cudaStream_t = *mut c_void;
/// `ncclDataType_t`.
pub type ncclDataType_t = c_int;

/// `ncclSuccess`.
pub const NCCL_SUCCESS: ncclResult_t = 0;
/// `ncclUnhandledCudaError`.
pub const NCCL_UNHANDLED_CUDA_ERROR: ncclResult_t = 1;
/// `ncclSystemError`.
pub const NCCL_SYSTEM_ERROR: ncclResult_t = 2;
/// `ncclInternalError`.
pub const NCCL_INTERNAL_ERROR: ncclResult_t = 3;
/// `ncclInvalidArgument`.
pub const NCCL_INVALID_ARGUMENT: ncclResult_t = 4;
/// `ncclInvalidUsage`.
pub const NCCL_INVALID_USAGE: ncclResult_t = 5;
/// `ncclRemoteError`.
pub const NCCL_REMOTE_ERROR: ncclResult_t = 6;
/// `ncclInProgress`: a non-blocking call has not finished yet.
pub const NCCL_IN_PROGRESS: ncclResult_t = 7;
/// `ncclTimeout` (NCCL 2.30).
pub const NCCL_TIMEOUT: ncclResult_t = 8;

/// `ncclUint8`: bytes are moved as bytes.
pub const NCCL_UINT8: ncclDataType_t = 1;

/// `NCCL_CONFIG_INITIALIZER`'s magic.
pub const NCCL_CONFIG_MAGIC: c_uint = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: "not set, use the default".
pub const NCCL_CONFIG_UNDEF_INT: c_int = c_int::MIN;
/// The config version axsave fills in: 2.14.0, the first with `ncclConfig_t`. NCCL copies
/// `size` bytes of the caller's struct over its defaults and reads only the fields that
/// version has, so this layout works with every later NCCL.
pub const NCCL_CONFIG_VERSION: c_uint = 21400;

/// `ncclUniqueId`: 128 opaque bytes made by rank 0 and given to every rank.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ncclUniqueId {
    /// The bytes.
    pub internal: [c_char; 128],
}

/// The first fields of `ncclConfig_t` (its NCCL 2.17 layout, a prefix of every later one).
/// With [`NCCL_CONFIG_VERSION`] 2.14 NCCL reads only `blocking` and keeps its defaults for the
/// rest, so the struct means the same to every NCCL from 2.14 on.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclConfig_v21400 {
    /// `sizeof` this struct.
    pub size: usize,
    /// [`NCCL_CONFIG_MAGIC`].
    pub magic: c_uint,
    /// [`NCCL_CONFIG_VERSION`].
    pub version: c_uint,
    /// 0: non-blocking communicator (calls may return [`NCCL_IN_PROGRESS`]).
    pub blocking: c_int,
    /// Default: [`NCCL_CONFIG_UNDEF_INT`].
    pub cga_cluster_size: c_int,
    /// Default: [`NCCL_CONFIG_UNDEF_INT`].
    pub min_ctas: c_int,
    /// Default: [`NCCL_CONFIG_UNDEF_INT`].
    pub max_ctas: c_int,
    /// Default: null.
    pub net_name: *const c_char,
}

impl ncclConfig_v21400 {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking` set.
    pub fn new(blocking: bool) -> Self {
        ncclConfig_v21400 {
            size: size_of::<Self>(),
            magic: NCCL_CONFIG_MAGIC,
            version: NCCL_CONFIG_VERSION,
            blocking: blocking as c_int,
            cga_cluster_size: NCCL_CONFIG_UNDEF_INT,
            min_ctas: NCCL_CONFIG_UNDEF_INT,
            max_ctas: NCCL_CONFIG_UNDEF_INT,
            net_name: std::ptr::null(),
        }
    }
}

/// `ncclGetVersion(int*)`.
pub type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> ncclResult_t;
/// `ncclGetUniqueId(ncclUniqueId*)`.
pub type GetUniqueIdFn = unsafe extern "C" fn(*mut ncclUniqueId) -> ncclResult_t;
/// `ncclCommInitRank(ncclComm_t*, int nranks, ncclUniqueId, int rank)`.
pub type CommInitRankFn =
    unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> ncclResult_t;
/// `ncclCommInitRankConfig(ncclComm_t*, int nranks, ncclUniqueId, int rank, ncclConfig_t*)`.
pub type CommInitRankConfigFn = unsafe extern "C" fn(
    *mut ncclComm_t,
    c_int,
    ncclUniqueId,
    c_int,
    *mut ncclConfig_v21400,
) -> ncclResult_t;
/// `ncclCommGetAsyncError(ncclComm_t, ncclResult_t*)`.
pub type CommGetAsyncErrorFn = unsafe extern "C" fn(ncclComm_t, *mut ncclResult_t) -> ncclResult_t;
/// `ncclCommAbort`, `ncclCommDestroy`, `ncclCommFinalize`: `(ncclComm_t)`.
pub type CommFn = unsafe extern "C" fn(ncclComm_t) -> ncclResult_t;
/// `ncclGetErrorString(ncclResult_t)`.
pub type GetErrorStringFn = unsafe extern "C" fn(ncclResult_t) -> *const c_char;
/// `ncclGetLastError(ncclComm_t)`.
pub type GetLastErrorFn = unsafe extern "C" fn(ncclComm_t) -> *const c_char;
/// `ncclGroupStart()`, `ncclGroupEnd()`.
pub type GroupFn = unsafe extern "C" fn() -> ncclResult_t;
/// `ncclSend(const void*, size_t, ncclDataType_t, int peer, ncclComm_t, cudaStream_t)`.
pub type SendFn = unsafe extern "C" fn(
    *const c_void,
    usize,
    ncclDataType_t,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
/// `ncclRecv(void*, size_t, ncclDataType_t, int peer, ncclComm_t, cudaStream_t)`.
pub type RecvFn = unsafe extern "C" fn(
    *mut c_void,
    usize,
    ncclDataType_t,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;

/// An opened libnccl and its entry points.
pub struct Nccl {
    /// Keeps the library mapped; the function pointers below point into it.
    _lib: libloading::Library,
    path: String,
    /// `ncclGetVersion`.
    pub get_version: GetVersionFn,
    /// `ncclGetUniqueId`.
    pub get_unique_id: GetUniqueIdFn,
    /// `ncclCommInitRank`.
    pub comm_init_rank: CommInitRankFn,
    /// `ncclCommInitRankConfig` (NCCL ≥ 2.14; needed for a non-blocking communicator).
    pub comm_init_rank_config: Option<CommInitRankConfigFn>,
    /// `ncclCommGetAsyncError`.
    pub comm_get_async_error: CommGetAsyncErrorFn,
    /// `ncclCommAbort`.
    pub comm_abort: CommFn,
    /// `ncclCommDestroy`.
    pub comm_destroy: CommFn,
    /// `ncclCommFinalize` (NCCL ≥ 2.14).
    pub comm_finalize: Option<CommFn>,
    /// `ncclGetErrorString`.
    pub get_error_string: GetErrorStringFn,
    /// `ncclGetLastError` (NCCL ≥ 2.13).
    pub get_last_error: Option<GetLastErrorFn>,
    /// `ncclGroupStart`.
    pub group_start: GroupFn,
    /// `ncclGroupEnd`.
    pub group_end: GroupFn,
    /// `ncclSend` (NCCL ≥ 2.7).
    pub send: SendFn,
    /// `ncclRecv` (NCCL ≥ 2.7).
    pub recv: RecvFn,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl").field("path", &self.path).finish()
    }
}

impl Nccl {
    /// What was opened: a path, or a bare name the dynamic linker resolved.
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// Why NCCL could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// No candidate could be opened.
    #[error(
        "NCCL not found (tried {}); install NCCL (the libnccl2 package, or the nvidia-nccl-cu12/-cu13 wheel that torch brings) or set AXSAVE_NCCL_LIBRARY to libnccl.so.2",
        tried.join(", ")
    )]
    NotFound {
        /// Every candidate, with the loader's complaint when it was a path that exists.
        tried: Vec<String>,
    },
    /// The library opened but lacks a function axsave needs (an NCCL older than 2.7).
    #[error("{path} lacks {symbol}: axsave needs NCCL 2.7 or newer")]
    MissingSymbol {
        /// The library.
        path: String,
        /// The function.
        symbol: String,
    },
}

/// Opens NCCL once per process (later calls return the same answer, success or failure).
pub fn load() -> Result<&'static Nccl, LoadError> {
    static NCCL: OnceLock<Result<Nccl, LoadError>> = OnceLock::new();
    NCCL.get_or_init(|| {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        open_first(&candidates(&env))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Where to look for libnccl, in order (see the module documentation). `env` reads the
/// environment (a parameter so that tests can supply their own). Bare names are for the
/// dynamic linker's own search; paths are listed only when the file exists.
pub fn candidates(env: &dyn Fn(&str) -> Option<OsString>) -> Vec<PathBuf> {
    if let Some(explicit) = env("AXSAVE_NCCL_LIBRARY") {
        let p = PathBuf::from(explicit);
        if p.is_dir() {
            return ["libnccl.so.2", "libnccl.so"]
                .iter()
                .map(|n| p.join(n))
                .collect();
        }
        return vec![p];
    }
    let mut out: Vec<PathBuf> = vec!["libnccl.so.2".into(), "libnccl.so".into()];
    let mut push = |p: PathBuf| {
        if p.is_file() && !out.contains(&p) {
            out.push(p);
        }
    };
    // Python prefixes: virtualenv, conda, PYTHONPATH entries, every python3 on PATH, the usual.
    let mut prefixes: Vec<PathBuf> = Vec::new();
    for k in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(v) = env(k) {
            prefixes.push(v.into());
        }
    }
    if let Some(pp) = env("PYTHONPATH") {
        for entry in std::env::split_paths(&pp) {
            push(entry.join("nvidia/nccl/lib/libnccl.so.2"));
        }
    }
    if let Some(path) = env("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("python3").is_file() || dir.join("python").is_file() {
                if let Some(prefix) = dir.parent() {
                    prefixes.push(prefix.to_path_buf());
                }
            }
        }
    }
    if let Some(home) = env("HOME") {
        prefixes.push(Path::new(&home).join(".local"));
    }
    for p in ["/usr/local", "/usr", "/opt/conda"] {
        prefixes.push(p.into());
    }
    let mut seen = Vec::new();
    for prefix in prefixes {
        if seen.contains(&prefix) {
            continue;
        }
        seen.push(prefix.clone());
        for site in python_site_dirs(&prefix) {
            push(site.join("nvidia/nccl/lib/libnccl.so.2"));
        }
    }
    if let Some(conda) = env("CONDA_PREFIX") {
        push(Path::new(&conda).join("lib/libnccl.so.2"));
    }
    if let Some(cuda) = env("CUDA_HOME") {
        push(Path::new(&cuda).join("lib64/libnccl.so.2"));
        push(Path::new(&cuda).join("lib64/libnccl.so"));
    }
    push("/usr/local/cuda/lib64/libnccl.so.2".into());
    push("/usr/local/cuda/lib64/libnccl.so".into());
    out
}

/// `prefix/lib/python3*/{site,dist}-packages` and `prefix/lib/python3/dist-packages` (Debian),
/// sorted so the answer does not depend on directory order.
fn python_site_dirs(prefix: &Path) -> Vec<PathBuf> {
    let lib = prefix.join("lib");
    let mut dirs = Vec::new();
    let Ok(entries) = std::fs::read_dir(&lib) else {
        return dirs;
    };
    let mut pythons: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("python3"))
        })
        .map(|e| e.path())
        .collect();
    pythons.sort();
    for py in pythons {
        for site in ["site-packages", "dist-packages"] {
            let d = py.join(site);
            if d.is_dir() {
                dirs.push(d);
            }
        }
    }
    dirs
}

/// Opens the first candidate that loads and has every required symbol.
fn open_first(candidates: &[PathBuf]) -> Result<Nccl, LoadError> {
    let mut tried = Vec::new();
    for c in candidates {
        // SAFETY: opening a library runs its initialisers. libnccl's only set up internal
        // state (no threads, no CUDA calls until an NCCL function is called), and the library
        // stays loaded for the life of the process (the `Nccl` lives in a static), so nothing
        // can call into unmapped code.
        match unsafe { libloading::Library::new(c.as_os_str()) } {
            Ok(lib) => return resolve(lib, c.as_os_str()),
            Err(e) => {
                // A bare name the linker did not find says nothing useful; a path that exists
                // but does not load (wrong architecture, missing dependency) does.
                if c.is_absolute() && c.exists() {
                    tried.push(format!("{} ({e})", c.display()));
                } else {
                    tried.push(c.display().to_string());
                }
            }
        }
    }
    Err(LoadError::NotFound { tried })
}

/// Looks up the entry points in an opened library.
fn resolve(lib: libloading::Library, name: &OsStr) -> Result<Nccl, LoadError> {
    let path = name.to_string_lossy().into_owned();
    macro_rules! required {
        ($sym:literal, $ty:ty) => {{
            // SAFETY: the symbol is declared in nccl.h with exactly the C signature of `$ty`
            // (checked against nccl.h of NCCL 2.7 to 2.30), and the pointer is used only while
            // `lib` is alive: it is stored next to `lib` in the same `Nccl`, which is never
            // dropped before the process exits (it lives in a static).
            match unsafe { lib.get::<$ty>(concat!($sym, "\0").as_bytes()) } {
                Ok(s) => *s,
                Err(_) => {
                    return Err(LoadError::MissingSymbol {
                        path,
                        symbol: $sym.into(),
                    });
                }
            }
        }};
    }
    macro_rules! optional {
        ($sym:literal, $ty:ty) => {{
            // SAFETY: as for `required!` above.
            unsafe { lib.get::<$ty>(concat!($sym, "\0").as_bytes()) }
                .ok()
                .map(|s| *s)
        }};
    }
    let nccl = Nccl {
        get_version: required!("ncclGetVersion", GetVersionFn),
        get_unique_id: required!("ncclGetUniqueId", GetUniqueIdFn),
        comm_init_rank: required!("ncclCommInitRank", CommInitRankFn),
        comm_init_rank_config: optional!("ncclCommInitRankConfig", CommInitRankConfigFn),
        comm_get_async_error: required!("ncclCommGetAsyncError", CommGetAsyncErrorFn),
        comm_abort: required!("ncclCommAbort", CommFn),
        comm_destroy: required!("ncclCommDestroy", CommFn),
        comm_finalize: optional!("ncclCommFinalize", CommFn),
        get_error_string: required!("ncclGetErrorString", GetErrorStringFn),
        get_last_error: optional!("ncclGetLastError", GetLastErrorFn),
        group_start: required!("ncclGroupStart", GroupFn),
        group_end: required!("ncclGroupEnd", GroupFn),
        send: required!("ncclSend", SendFn),
        recv: required!("ncclRecv", RecvFn),
        path: path.clone(),
        _lib: lib,
    };
    Ok(nccl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &Path)]) -> impl Fn(&str) -> Option<OsString> {
        let m: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_os_str().to_owned()))
            .collect();
        move |k: &str| m.get(k).cloned()
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"not really a library").unwrap();
    }

    #[test]
    fn the_linker_names_come_first_then_python_wheels() {
        let root = tempfile::tempdir().unwrap();
        let venv = root.path().join("venv");
        let wheel = venv.join("lib/python3.11/site-packages/nvidia/nccl/lib/libnccl.so.2");
        touch(&wheel);
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        touch(&venv.join("bin/python3"));
        let conda = root.path().join("conda");
        touch(&conda.join("lib/libnccl.so.2"));
        let pp = root.path().join("pp");
        touch(&pp.join("nvidia/nccl/lib/libnccl.so.2"));
        let got = candidates(&env_of(&[
            ("PATH", &venv.join("bin")),
            ("CONDA_PREFIX", &conda),
            ("PYTHONPATH", &pp),
        ]));
        assert_eq!(got[0], PathBuf::from("libnccl.so.2"));
        assert_eq!(got[1], PathBuf::from("libnccl.so"));
        let pos = |p: &Path| got.iter().position(|g| g == p);
        let (w, c, p) = (
            pos(&wheel).expect("venv wheel found through the python3 on PATH"),
            pos(&conda.join("lib/libnccl.so.2")).expect("conda lib"),
            pos(&pp.join("nvidia/nccl/lib/libnccl.so.2")).expect("PYTHONPATH entry"),
        );
        assert!(p < w && w < c, "{got:?}");
        // Each path once, however many ways lead to it.
        let mut dedup = got.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), got.len());
    }

    #[test]
    fn an_explicit_library_is_the_only_candidate() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("libnccl.so.2");
        touch(&file);
        assert_eq!(
            candidates(&env_of(&[("AXSAVE_NCCL_LIBRARY", &file)])),
            vec![file.clone()]
        );
        assert_eq!(
            candidates(&env_of(&[("AXSAVE_NCCL_LIBRARY", root.path())])),
            vec![file, root.path().join("libnccl.so")]
        );
    }

    #[test]
    fn a_file_that_is_not_a_library_is_reported_not_fatal() {
        let root = tempfile::tempdir().unwrap();
        let fake = root.path().join("libnccl.so.2");
        touch(&fake);
        let err = open_first(&[fake.clone(), "libnccl-definitely-absent.so.7".into()])
            .expect_err("not a library");
        let LoadError::NotFound { tried } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(tried.len(), 2);
        assert!(tried[0].starts_with(&fake.display().to_string()) && tried[0].contains('('));
        assert!(err.to_string().contains("AXSAVE_NCCL_LIBRARY"));
    }

    #[test]
    fn the_config_struct_has_the_c_layout() {
        // size_t, 2 × unsigned, 4 × int, pointer: 8 + 4 + 4 + 16 + 8 on LP64.
        #[cfg(target_pointer_width = "64")]
        assert_eq!(size_of::<ncclConfig_v21400>(), 40);
        let c = ncclConfig_v21400::new(false);
        assert_eq!(c.size, size_of::<ncclConfig_v21400>());
        assert_eq!((c.magic, c.version, c.blocking), (0xcafebeef, 21400, 0));
        assert_eq!(size_of::<ncclUniqueId>(), 128);
    }
}
