//! The raw PMIx client API that axsave uses, opened at run time.
//!
//! PMIx is how Open MPI's `mpirun` (and Slurm's `srun --mpi=pmix`, PRRTE, Flux) tell each
//! process about its job; its client library keeps a stable ABI across versions (the
//! declarations below are the same in PMIx 2, 3, 4 and 5). Only the calls of a key-value
//! exchange are declared: `PMIx_Init`, `PMIx_Put`, `PMIx_Commit`, `PMIx_Fence`, `PMIx_Get`,
//! `PMIx_Finalize` and `PMIx_Error_string`, with the C types of `pmix_common.h`.
//!
//! # Finding the library
//!
//! `AXSAVE_PMIX_LIBRARY` (a file) when set, else `libpmix.so.2` then `libpmix.so` through the
//! dynamic linker (Debian's `libpmix2` package ships `libpmix.so.2`; Open MPI's own copy is
//! found the same way when it is on `LD_LIBRARY_PATH`).

// The C names are kept, so that each declaration can be checked against pmix_common.h.
#![allow(non_camel_case_types)]

use std::ffi::{OsString, c_char, c_int, c_void};
use std::sync::OnceLock;

/// `pmix_status_t`.
pub type pmix_status_t = c_int;
/// `pmix_rank_t`.
pub type pmix_rank_t = u32;
/// `pmix_data_type_t`.
pub type pmix_data_type_t = u16;
/// `pmix_scope_t`.
pub type pmix_scope_t = u8;

/// `PMIX_SUCCESS`.
pub const PMIX_SUCCESS: pmix_status_t = 0;
/// `PMIX_STRING`: a NUL-terminated string.
pub const PMIX_STRING: pmix_data_type_t = 3;
/// `PMIX_GLOBAL`: shared with every process of the job, local and remote.
pub const PMIX_GLOBAL: pmix_scope_t = 3;
/// `PMIX_MAX_NSLEN`.
pub const PMIX_MAX_NSLEN: usize = 255;
/// `PMIX_MAX_KEYLEN`.
pub const PMIX_MAX_KEYLEN: usize = 511;
/// `PMIX_INT`: a C `int`.
pub const PMIX_INT: pmix_data_type_t = 6;
/// `PMIX_TIMEOUT`: seconds before an operation gives up (an `int`; 0: never).
pub const PMIX_TIMEOUT: &str = "pmix.timeout";

/// `pmix_proc_t`: a namespace (the job) and a rank in it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct pmix_proc_t {
    /// `pmix_nspace_t`: `char[PMIX_MAX_NSLEN + 1]`, NUL-terminated.
    pub nspace: [c_char; PMIX_MAX_NSLEN + 1],
    /// The rank.
    pub rank: pmix_rank_t,
}

impl pmix_proc_t {
    /// All zero, as `PMIX_PROC_CONSTRUCT` leaves it.
    pub fn zeroed() -> Self {
        pmix_proc_t {
            nspace: [0; PMIX_MAX_NSLEN + 1],
            rank: 0,
        }
    }
}

/// `pmix_value_t`: a type tag and a union. The union's largest member is `pmix_envar_t` (two
/// pointers and a char: 24 bytes); axsave reads and writes only `string`, at offset 8.
#[repr(C)]
pub struct pmix_value_t {
    /// `type`: which union member is set.
    pub type_: pmix_data_type_t,
    /// The union, as `string` (the only member axsave uses) plus the rest of its size.
    pub data: pmix_value_data,
}

/// The union of `pmix_value_t`, reduced to the members axsave uses and the union's size.
#[repr(C)]
#[derive(Clone, Copy)]
pub union pmix_value_data {
    /// `char *string` (`PMIX_STRING`).
    pub string: *mut c_char,
    /// `int integer` (`PMIX_INT`).
    pub integer: c_int,
    /// The union's size and alignment.
    pub _size: [u64; 3],
}

/// `pmix_info_t`: a key, directive flags and a value (a directive to an operation).
#[repr(C)]
pub struct pmix_info_t {
    /// `pmix_key_t`: `char[PMIX_MAX_KEYLEN + 1]`, NUL-terminated.
    pub key: [c_char; PMIX_MAX_KEYLEN + 1],
    /// `pmix_info_directives_t` (0: optional, a server may ignore it).
    pub flags: u32,
    /// The value.
    pub value: pmix_value_t,
}

impl pmix_info_t {
    /// `PMIX_TIMEOUT` = `seconds`, optional.
    pub fn timeout(seconds: c_int) -> Self {
        let mut key = [0 as c_char; PMIX_MAX_KEYLEN + 1];
        for (k, b) in key.iter_mut().zip(PMIX_TIMEOUT.bytes()) {
            *k = b as c_char;
        }
        pmix_info_t {
            key,
            flags: 0,
            value: pmix_value_t {
                type_: PMIX_INT,
                data: pmix_value_data { _size: [0; 3] },
            },
        }
        .with_int(seconds)
    }

    fn with_int(mut self, v: c_int) -> Self {
        self.value.data.integer = v;
        self
    }
}

/// `PMIx_Init(pmix_proc_t *proc, pmix_info_t info[], size_t ninfo)`.
pub type InitFn = unsafe extern "C" fn(*mut pmix_proc_t, *mut c_void, usize) -> pmix_status_t;
/// `PMIx_Finalize(const pmix_info_t info[], size_t ninfo)`.
pub type FinalizeFn = unsafe extern "C" fn(*const c_void, usize) -> pmix_status_t;
/// `PMIx_Put(pmix_scope_t scope, const pmix_key_t key, pmix_value_t *val)`.
pub type PutFn =
    unsafe extern "C" fn(pmix_scope_t, *const c_char, *mut pmix_value_t) -> pmix_status_t;
/// `PMIx_Commit(void)`.
pub type CommitFn = unsafe extern "C" fn() -> pmix_status_t;
/// `PMIx_Fence(const pmix_proc_t procs[], size_t nprocs, const pmix_info_t info[], size_t ninfo)`.
pub type FenceFn =
    unsafe extern "C" fn(*const pmix_proc_t, usize, *const c_void, usize) -> pmix_status_t;
/// `PMIx_Get(const pmix_proc_t *proc, const char key[], const pmix_info_t info[], size_t ninfo,
/// pmix_value_t **val)`.
pub type GetFn = unsafe extern "C" fn(
    *const pmix_proc_t,
    *const c_char,
    *const c_void,
    usize,
    *mut *mut pmix_value_t,
) -> pmix_status_t;
/// `PMIx_Error_string(pmix_status_t)`.
pub type ErrorStringFn = unsafe extern "C" fn(pmix_status_t) -> *const c_char;
/// `PMIx_Value_destruct(pmix_value_t *val)` (PMIx ≥ 4: frees what a value points to).
pub type ValueDestructFn = unsafe extern "C" fn(*mut pmix_value_t);

/// An opened libpmix and its entry points.
pub struct Pmix {
    /// Keeps the library mapped; the function pointers below point into it.
    _lib: libloading::Library,
    path: String,
    /// `PMIx_Init`.
    pub init: InitFn,
    /// `PMIx_Finalize`.
    pub finalize: FinalizeFn,
    /// `PMIx_Put`.
    pub put: PutFn,
    /// `PMIx_Commit`.
    pub commit: CommitFn,
    /// `PMIx_Fence`.
    pub fence: FenceFn,
    /// `PMIx_Get`.
    pub get: GetFn,
    /// `PMIx_Error_string`.
    pub error_string: ErrorStringFn,
    /// `PMIx_Value_destruct` (PMIx ≥ 4; older ones leak the few bytes of a fetched value).
    pub value_destruct: Option<ValueDestructFn>,
}

impl std::fmt::Debug for Pmix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pmix").field("path", &self.path).finish()
    }
}

impl Pmix {
    /// What was opened: a path, or a bare name the dynamic linker resolved.
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// Why libpmix could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// No candidate could be opened.
    #[error(
        "the PMIx client library was not found (tried {}); install it (Debian: libpmix2) or set AXSAVE_PMIX_LIBRARY to libpmix.so.2",
        tried.join(", ")
    )]
    NotFound {
        /// Every candidate, with the loader's complaint.
        tried: Vec<String>,
    },
    /// The library opened but lacks a function axsave needs.
    #[error("{path} lacks {symbol}: not a PMIx client library")]
    MissingSymbol {
        /// The library.
        path: String,
        /// The function.
        symbol: String,
    },
}

/// Where to look for libpmix, in order (see the module documentation). `env` reads the
/// environment (a parameter so that tests can supply their own).
pub fn candidates(env: &dyn Fn(&str) -> Option<OsString>) -> Vec<OsString> {
    if let Some(explicit) = env("AXSAVE_PMIX_LIBRARY") {
        return vec![explicit];
    }
    vec!["libpmix.so.2".into(), "libpmix.so".into()]
}

/// Opens libpmix once per process (later calls return the same answer, success or failure).
pub fn load() -> Result<&'static Pmix, LoadError> {
    static PMIX: OnceLock<Result<Pmix, LoadError>> = OnceLock::new();
    PMIX.get_or_init(|| {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        open_first(&candidates(&env))
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn open_first(candidates: &[OsString]) -> Result<Pmix, LoadError> {
    let mut tried = Vec::new();
    for c in candidates {
        // SAFETY: opening a shared library runs its initialisers; libpmix's only set up its
        // own globals (it starts no thread and touches nothing of ours until PMIx_Init).
        match unsafe { libloading::Library::new(c) } {
            Ok(lib) => return resolve(lib, &c.to_string_lossy()),
            Err(e) => tried.push(format!("{} ({e})", c.to_string_lossy())),
        }
    }
    Err(LoadError::NotFound { tried })
}

fn resolve(lib: libloading::Library, path: &str) -> Result<Pmix, LoadError> {
    macro_rules! required {
        ($sym:literal, $ty:ty) => {
            // SAFETY: the symbol is declared in pmix.h with exactly the signature `$ty`
            // (checked by hand against pmix.h of PMIx 2 to 5); the pointer stays valid while
            // `lib` is kept in the returned struct.
            match unsafe { lib.get::<$ty>(concat!($sym, "\0").as_bytes()) } {
                Ok(f) => *f,
                Err(_) => {
                    return Err(LoadError::MissingSymbol {
                        path: path.to_owned(),
                        symbol: $sym.to_owned(),
                    });
                }
            }
        };
    }
    let init = required!("PMIx_Init", InitFn);
    let finalize = required!("PMIx_Finalize", FinalizeFn);
    let put = required!("PMIx_Put", PutFn);
    let commit = required!("PMIx_Commit", CommitFn);
    let fence = required!("PMIx_Fence", FenceFn);
    let get = required!("PMIx_Get", GetFn);
    let error_string = required!("PMIx_Error_string", ErrorStringFn);
    // SAFETY: as above; PMIx_Value_destruct is declared in pmix.h of PMIx 4 and 5.
    let value_destruct = unsafe { lib.get::<ValueDestructFn>(b"PMIx_Value_destruct\0") }
        .ok()
        .map(|f| *f);
    Ok(Pmix {
        _lib: lib,
        path: path.to_owned(),
        init,
        finalize,
        put,
        commit,
        fence,
        get,
        error_string,
        value_destruct,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_c_layouts_match_pmix_common_h() {
        // pmix_proc_t: char[256] then a uint32_t.
        assert_eq!(std::mem::size_of::<pmix_proc_t>(), 260);
        // pmix_value_t: a uint16_t, padding, a 24-byte union aligned to 8.
        assert_eq!(std::mem::size_of::<pmix_value_t>(), 32);
        assert_eq!(std::mem::offset_of!(pmix_value_t, data), 8);
        // pmix_info_t: char[512], a uint32_t, then the value at the next multiple of 8.
        assert_eq!(std::mem::offset_of!(pmix_info_t, flags), 512);
        assert_eq!(std::mem::offset_of!(pmix_info_t, value), 520);
        assert_eq!(std::mem::size_of::<pmix_info_t>(), 552);
        let t = pmix_info_t::timeout(42);
        assert_eq!(t.value.type_, PMIX_INT);
        // SAFETY: `integer` is the member just written.
        assert_eq!(unsafe { t.value.data.integer }, 42);
        assert_eq!(
            t.key[..12].iter().map(|&c| c as u8).collect::<Vec<_>>(),
            b"pmix.timeout"
        );
        assert_eq!(t.key[12], 0);
    }

    #[test]
    fn an_explicit_library_is_the_only_candidate() {
        let env = |k: &str| (k == "AXSAVE_PMIX_LIBRARY").then(|| OsString::from("/x/libpmix.so"));
        assert_eq!(candidates(&env), [OsString::from("/x/libpmix.so")]);
        let none = |_: &str| None;
        assert_eq!(candidates(&none), ["libpmix.so.2", "libpmix.so"]);
    }

    #[test]
    fn a_missing_library_is_an_error_naming_what_was_tried() {
        let e = open_first(&["/nonexistent/libpmix.so.2".into()]).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("/nonexistent/libpmix.so.2"), "{text}");
        assert!(text.contains("libpmix2"), "{text}");
    }
}
