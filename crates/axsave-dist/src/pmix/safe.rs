//! A PMIx client that cannot be misused: initialised once, finalised on drop, string values
//! only.

use std::ffi::{CStr, CString};
use std::time::Duration;

use super::result::{PmixError, check};
use super::sys::{
    self, PMIX_GLOBAL, PMIX_STRING, Pmix, pmix_info_t, pmix_proc_t, pmix_value_data, pmix_value_t,
};

/// This process as a PMIx client (between `PMIx_Init` and `PMIx_Finalize`).
pub struct Client {
    pmix: &'static Pmix,
    me: pmix_proc_t,
}

impl Client {
    /// Opens libpmix and connects to the local PMIx server (the launcher's daemon).
    pub fn init() -> Result<Client, PmixError> {
        let pmix = sys::load()?;
        let mut me = pmix_proc_t::zeroed();
        // SAFETY: `me` is a valid pmix_proc_t for PMIx to fill in; no info array (NULL, 0).
        let rc = unsafe { (pmix.init)(&mut me, std::ptr::null_mut(), 0) };
        check(pmix, "PMIx_Init", rc)?;
        Ok(Client { pmix, me })
    }

    /// This process's rank in its job.
    pub fn rank(&self) -> u32 {
        self.me.rank
    }

    /// This process's job (the PMIx namespace).
    pub fn namespace(&self) -> String {
        // SAFETY: PMIx_Init filled `nspace` with a NUL-terminated string; the array is one
        // longer than PMIX_MAX_NSLEN and zeroed beforehand, so a NUL is always there.
        unsafe { CStr::from_ptr(self.me.nspace.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    /// The path of the library in use.
    pub fn library(&self) -> &str {
        self.pmix.path()
    }

    fn key(key: &str) -> Result<CString, PmixError> {
        if key.len() > sys::PMIX_MAX_KEYLEN {
            return Err(PmixError::BadValue {
                key: key.to_owned(),
                reason: "key too long".into(),
            });
        }
        CString::new(key).map_err(|_| PmixError::BadValue {
            key: key.to_owned(),
            reason: "NUL in the key".into(),
        })
    }

    /// Posts `key = value` for every process of the job (`PMIX_GLOBAL`); visible to them once
    /// committed and fenced.
    pub fn put_string(&mut self, key: &str, value: &str) -> Result<(), PmixError> {
        let k = Self::key(key)?;
        let v = CString::new(value).map_err(|_| PmixError::BadValue {
            key: key.to_owned(),
            reason: "NUL in the value".into(),
        })?;
        let mut val = pmix_value_t {
            type_: PMIX_STRING,
            data: pmix_value_data {
                string: v.as_ptr().cast_mut(),
            },
        };
        // SAFETY: `k` and the string in `val` are NUL-terminated and outlive the call; PMIx
        // copies the value (PMIx_Put does not keep the caller's pointers).
        let rc = unsafe { (self.pmix.put)(PMIX_GLOBAL, k.as_ptr(), &mut val) };
        check(self.pmix, "PMIx_Put", rc)
    }

    /// Pushes what was put to the local server.
    pub fn commit(&mut self) -> Result<(), PmixError> {
        // SAFETY: no arguments; the client is initialised.
        let rc = unsafe { (self.pmix.commit)() };
        check(self.pmix, "PMIx_Commit", rc)
    }

    /// Waits until every process of the job has reached the fence (after which what each
    /// committed before it can be fetched), at most `timeout` where the server honours
    /// `PMIX_TIMEOUT`.
    pub fn fence(&mut self, timeout: Duration) -> Result<(), PmixError> {
        let info = pmix_info_t::timeout(seconds(timeout));
        // SAFETY: NULL procs means every process of this job; one valid info, read only
        // during the call.
        let rc = unsafe { (self.pmix.fence)(std::ptr::null(), 0, (&raw const info).cast(), 1) };
        check(self.pmix, "PMIx_Fence", rc)
    }

    /// The string that process `rank` of this job put under `key`, waiting at most `timeout`
    /// for it where the server honours `PMIX_TIMEOUT`.
    pub fn get_string(
        &mut self,
        rank: u32,
        key: &str,
        timeout: Duration,
    ) -> Result<String, PmixError> {
        let k = Self::key(key)?;
        let mut proc_ = self.me;
        proc_.rank = rank;
        let info = pmix_info_t::timeout(seconds(timeout));
        let mut out: *mut pmix_value_t = std::ptr::null_mut();
        // SAFETY: `proc_`, `k` and `info` are valid for the call; PMIx stores a pointer to a
        // value it allocated in `out`.
        let rc =
            unsafe { (self.pmix.get)(&proc_, k.as_ptr(), (&raw const info).cast(), 1, &mut out) };
        check(self.pmix, "PMIx_Get", rc)?;
        if out.is_null() {
            return Err(PmixError::BadValue {
                key: key.to_owned(),
                reason: "no value returned".into(),
            });
        }
        // SAFETY: PMIx returned a valid pmix_value_t; `string` is the member in use when the
        // type is PMIX_STRING (checked first), NUL-terminated and owned by the value.
        let result = unsafe {
            let v = &*out;
            if v.type_ != PMIX_STRING {
                Err(format!("a value of PMIx type {}, not a string", v.type_))
            } else if v.data.string.is_null() {
                Err("a null string".to_owned())
            } else {
                CStr::from_ptr(v.data.string)
                    .to_str()
                    .map(str::to_owned)
                    .map_err(|_| "not UTF-8".to_owned())
            }
        };
        if let Some(destruct) = self.pmix.value_destruct {
            // SAFETY: `out` is the value PMIx allocated; destructing frees what it points to
            // (the string, copied above). The 32-byte value itself stays allocated: it came
            // from PMIx's allocator, which Rust cannot free, and this happens once per run.
            unsafe { destruct(out) };
        }
        result.map_err(|reason| PmixError::BadValue {
            key: key.to_owned(),
            reason,
        })
    }
}

/// Whole seconds for `PMIX_TIMEOUT`, at least 1 (0 would mean "never").
fn seconds(d: Duration) -> std::ffi::c_int {
    d.as_secs().clamp(1, i32::MAX as u64) as std::ffi::c_int
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("library", &self.pmix.path())
            .field("namespace", &self.namespace())
            .field("rank", &self.me.rank)
            .finish()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // SAFETY: initialised in `init`, finalised only here; no info array.
        let rc = unsafe { (self.pmix.finalize)(std::ptr::null(), 0) };
        if let Err(e) = check(self.pmix, "PMIx_Finalize", rc) {
            tracing::debug!("{e}");
        }
    }
}
