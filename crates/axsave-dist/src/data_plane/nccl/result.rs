//! NCCL return codes as `Result`s, and thin wrappers over the raw calls of [`super::sys`].
//!
//! Every wrapper that takes a communicator is `unsafe`: the caller guarantees the handle is
//! live (made by `ncclCommInitRank*`, not yet destroyed or aborted) and that no other thread
//! uses it at the same time, except for [`comm_get_async_error`] and [`comm_abort`], which
//! NCCL allows from a watchdog thread. [`safe`](super::safe) upholds both.

use std::ffi::{CStr, c_char, c_int};

use super::sys::{self, Nccl, ncclComm_t, ncclResult_t, ncclUniqueId};

/// What went wrong in NCCL, or around it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NcclError {
    /// libnccl could not be opened, or is too old.
    #[error(transparent)]
    Load(#[from] sys::LoadError),
    /// An NCCL call returned an error code.
    #[error("{call} failed: {} ({code}){}", code_name(*code), detail_text(detail))]
    Call {
        /// The function, as in nccl.h.
        call: &'static str,
        /// The `ncclResult_t`.
        code: c_int,
        /// `ncclGetErrorString` and, when NCCL has one, `ncclGetLastError`.
        detail: String,
    },
    /// An operation made no progress within the deadline; the communicator was aborted.
    #[error(
        "NCCL made no progress for {seconds}s while {what}; the communicator was aborted (a peer is gone or stuck; NCCL_DEBUG=INFO shows why)"
    )]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The deadline, in seconds.
        seconds: u64,
    },
    /// The run was cancelled (another part failed); the communicator was aborted.
    #[error("cancelled; the NCCL communicator was aborted")]
    Cancelled,
    /// The communicator was aborted earlier, for this reason; nothing more can be done with it.
    #[error("the NCCL communicator was aborted: {0}")]
    Aborted(String),
    /// A blocking `ncclCommInitRank` (NCCL < 2.14) did not return in time.
    #[error(
        "ncclCommInitRank did not finish within {seconds}s: not every rank joined (check NCCL_SOCKET_IFNAME and that every rank can reach rank 0)"
    )]
    InitTimeout {
        /// The deadline, in seconds.
        seconds: u64,
    },
    /// An argument NCCL cannot take (a count over `int`, a rank outside the world).
    #[error("invalid NCCL argument: {0}")]
    Invalid(String),
}

impl NcclError {
    /// The `ncclResult_t` of a failed call (`None` for the errors axsave raises itself).
    pub fn code(&self) -> Option<c_int> {
        match self {
            NcclError::Call { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn detail_text(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(": {d}")
    }
}

/// The name of an `ncclResult_t`, as in nccl.h.
pub fn code_name(code: c_int) -> &'static str {
    match code {
        sys::NCCL_SUCCESS => "ncclSuccess",
        sys::NCCL_UNHANDLED_CUDA_ERROR => "ncclUnhandledCudaError",
        sys::NCCL_SYSTEM_ERROR => "ncclSystemError",
        sys::NCCL_INTERNAL_ERROR => "ncclInternalError",
        sys::NCCL_INVALID_ARGUMENT => "ncclInvalidArgument",
        sys::NCCL_INVALID_USAGE => "ncclInvalidUsage",
        sys::NCCL_REMOTE_ERROR => "ncclRemoteError",
        sys::NCCL_IN_PROGRESS => "ncclInProgress",
        sys::NCCL_TIMEOUT => "ncclTimeout",
        _ => "unknown NCCL result",
    }
}

/// A call that did not fail: done, or (non-blocking communicator) still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `ncclSuccess`.
    Done,
    /// `ncclInProgress`: poll [`comm_get_async_error`] until it is done.
    InProgress,
}

/// `ncclSuccess` → `Done`, `ncclInProgress` → `InProgress`, anything else → an error with
/// NCCL's own description (and the communicator's last error when there is one).
pub fn check(
    nccl: &Nccl,
    call: &'static str,
    code: ncclResult_t,
    comm: Option<ncclComm_t>,
) -> Result<Status, NcclError> {
    match code {
        sys::NCCL_SUCCESS => Ok(Status::Done),
        sys::NCCL_IN_PROGRESS => Ok(Status::InProgress),
        _ => Err(NcclError::Call {
            call,
            code,
            detail: describe(nccl, code, comm),
        }),
    }
}

/// `ncclGetErrorString(code)`, plus `ncclGetLastError(comm)` when NCCL has it and says more.
fn describe(nccl: &Nccl, code: ncclResult_t, comm: Option<ncclComm_t>) -> String {
    // SAFETY: ncclGetErrorString takes any code and returns a static string (or null).
    let mut s = unsafe { text((nccl.get_error_string)(code)) };
    if let (Some(last), Some(comm)) = (nccl.get_last_error, comm) {
        // SAFETY: ncclGetLastError accepts a live communicator (or null) and returns a string
        // owned by NCCL that stays valid until the next NCCL call on this thread; it is copied
        // out at once.
        let l = unsafe { text(last(comm)) };
        if !l.is_empty() && !s.contains(&l) {
            if !s.is_empty() {
                s.push_str("; ");
            }
            s.push_str(&l);
        }
    }
    s
}

/// A C string NCCL returned, copied (empty for null).
///
/// # Safety
///
/// `p` is null or points to a NUL-terminated string that stays valid during the call.
unsafe fn text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated, per this function's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// `ncclGetVersion`: `major * 10000 + minor * 100 + patch` (for NCCL ≥ 2.9).
pub fn get_version(nccl: &Nccl) -> Result<i32, NcclError> {
    let mut v: c_int = 0;
    // SAFETY: ncclGetVersion writes one int through a valid pointer.
    let code = unsafe { (nccl.get_version)(&mut v) };
    check(nccl, "ncclGetVersion", code, None)?;
    Ok(v)
}

/// `ncclGetUniqueId`. Starts NCCL's bootstrap root in this process: call it on one rank only,
/// which must stay alive until every rank has joined.
pub fn get_unique_id(nccl: &Nccl) -> Result<ncclUniqueId, NcclError> {
    let mut id = ncclUniqueId { internal: [0; 128] };
    // SAFETY: ncclGetUniqueId writes 128 bytes through a valid pointer to an ncclUniqueId.
    let code = unsafe { (nccl.get_unique_id)(&mut id) };
    check(nccl, "ncclGetUniqueId", code, None)?;
    Ok(id)
}

/// `ncclCommInitRankConfig` with `blocking` (NCCL ≥ 2.14; `Ok(None)` when this NCCL lacks it):
/// joins the communicator of `nranks` ranks as `rank`, on the calling thread's current CUDA
/// device. Non-blocking, it returns at once with `Status::InProgress`; poll
/// [`comm_get_async_error`] until the join is done. On an error, a handle NCCL returned anyway is
/// aborted here.
pub fn comm_init_rank_config(
    nccl: &Nccl,
    nranks: c_int,
    id: ncclUniqueId,
    rank: c_int,
    blocking: bool,
) -> Result<Option<(ncclComm_t, Status)>, NcclError> {
    let Some(init) = nccl.comm_init_rank_config else {
        return Ok(None);
    };
    let mut config = sys::ncclConfig_v21400::new(blocking);
    let mut comm: ncclComm_t = std::ptr::null_mut();
    // SAFETY: `comm` and `config` are valid for the call (NCCL copies the config); the id is
    // passed by value as nccl.h declares.
    let code = unsafe { init(&mut comm, nranks, id, rank, &mut config) };
    match check(nccl, "ncclCommInitRankConfig", code, None) {
        Ok(status) => Ok(Some((comm, status))),
        Err(e) => {
            if !comm.is_null() {
                // SAFETY: NCCL returned a handle, so it is live; it is not used again.
                let _ = unsafe { comm_abort(nccl, comm) };
            }
            Err(e)
        }
    }
}

/// `ncclCommInitRank`: the blocking join (it returns only when every rank has joined).
pub fn comm_init_rank(
    nccl: &Nccl,
    nranks: c_int,
    id: ncclUniqueId,
    rank: c_int,
) -> Result<ncclComm_t, NcclError> {
    let mut comm: ncclComm_t = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; the id by value as nccl.h declares.
    let code = unsafe { (nccl.comm_init_rank)(&mut comm, nranks, id, rank) };
    check(nccl, "ncclCommInitRank", code, None).map(|_| comm)
}

/// `ncclCommGetAsyncError`: the communicator's state, `Ok(Done)` when idle and healthy,
/// `Ok(InProgress)` while a non-blocking call is still running, else its error.
///
/// # Safety
///
/// `comm` is live. May be called from any thread while another uses the communicator.
pub unsafe fn comm_get_async_error(nccl: &Nccl, comm: ncclComm_t) -> Result<Status, NcclError> {
    let mut state: ncclResult_t = sys::NCCL_SUCCESS;
    // SAFETY: `comm` is live (caller); `state` is a valid out-pointer.
    let code = unsafe { (nccl.comm_get_async_error)(comm, &mut state) };
    check(nccl, "ncclCommGetAsyncError", code, Some(comm))?;
    check(nccl, "an NCCL operation", state, Some(comm))
}

/// `ncclCommAbort`: frees the communicator and stops its operations on the device. Errors are
/// returned, not acted on: there is nothing left to do with the communicator either way.
///
/// # Safety
///
/// `comm` is live; it is not live afterwards, whatever the result.
pub unsafe fn comm_abort(nccl: &Nccl, comm: ncclComm_t) -> Result<(), NcclError> {
    // SAFETY: `comm` is live (caller) and not used again (caller).
    let code = unsafe { (nccl.comm_abort)(comm) };
    check(nccl, "ncclCommAbort", code, None).map(|_| ())
}

/// `ncclCommFinalize` (when NCCL has it): flushes outstanding work; on a non-blocking
/// communicator it may return `InProgress`.
///
/// # Safety
///
/// `comm` is live and used by no other thread.
pub unsafe fn comm_finalize(nccl: &Nccl, comm: ncclComm_t) -> Result<Status, NcclError> {
    let Some(f) = nccl.comm_finalize else {
        return Ok(Status::Done);
    };
    // SAFETY: `comm` is live and not shared (caller).
    let code = unsafe { f(comm) };
    check(nccl, "ncclCommFinalize", code, Some(comm))
}

/// `ncclCommDestroy`.
///
/// # Safety
///
/// `comm` is live, finalized or idle, and used by no other thread; it is not live afterwards.
pub unsafe fn comm_destroy(nccl: &Nccl, comm: ncclComm_t) -> Result<(), NcclError> {
    // SAFETY: as the caller guarantees.
    let code = unsafe { (nccl.comm_destroy)(comm) };
    check(nccl, "ncclCommDestroy", code, None).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_nccl_h_name() {
        let names: Vec<&str> = (0..=9).map(code_name).collect();
        assert_eq!(
            names,
            [
                "ncclSuccess",
                "ncclUnhandledCudaError",
                "ncclSystemError",
                "ncclInternalError",
                "ncclInvalidArgument",
                "ncclInvalidUsage",
                "ncclRemoteError",
                "ncclInProgress",
                "ncclTimeout",
                "unknown NCCL result",
            ]
        );
        assert_eq!(code_name(-1), "unknown NCCL result");
    }

    #[test]
    fn errors_read_well() {
        let e = NcclError::Call {
            call: "ncclSend",
            code: 6,
            detail: "remote process exited".into(),
        };
        assert_eq!(
            e.to_string(),
            "ncclSend failed: ncclRemoteError (6): remote process exited"
        );
        assert_eq!(e.code(), Some(6));
        let t = NcclError::Timeout {
            what: "receiving from rank 3".into(),
            seconds: 60,
        };
        assert!(
            t.to_string()
                .contains("no progress for 60s while receiving from rank 3")
        );
        assert_eq!(t.code(), None);
    }
}
