//! PMIx status codes as `Result`s.

use std::ffi::CStr;

use super::sys::{self, Pmix, pmix_status_t};

/// What went wrong with PMIx.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PmixError {
    /// libpmix could not be opened.
    #[error(transparent)]
    Load(#[from] sys::LoadError),
    /// A PMIx call returned an error status.
    #[error("{call} failed: {message} ({code})")]
    Call {
        /// The function, as in pmix.h.
        call: &'static str,
        /// The `pmix_status_t`.
        code: pmix_status_t,
        /// `PMIx_Error_string`.
        message: String,
    },
    /// A value came back that is not what was put (not a string, not UTF-8, a NUL inside).
    #[error("PMIx key {key}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// `Ok(())` for `PMIX_SUCCESS`, else the error with PMIx's own words for `code`.
pub fn check(pmix: &Pmix, call: &'static str, code: pmix_status_t) -> Result<(), PmixError> {
    if code == sys::PMIX_SUCCESS {
        return Ok(());
    }
    // SAFETY: PMIx_Error_string takes any status and returns a pointer to a static
    // NUL-terminated string (or NULL), which is only read here.
    let text = unsafe { (pmix.error_string)(code) };
    let message = if text.is_null() {
        "unknown status".to_owned()
    } else {
        // SAFETY: non-null, NUL-terminated, static (see above).
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    };
    Err(PmixError::Call {
        call,
        code,
        message,
    })
}
