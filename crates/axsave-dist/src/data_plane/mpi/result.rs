//! MPI return codes as `Result`s: one thin wrapper per call of [`super::sys`].
//!
//! # Safety contract of every `unsafe fn` here
//!
//! MPI is initialized and not finalized, and the caller is the progress thread (the only
//! thread that calls MPI, see the [module documentation](super)); handles passed in are
//! live. Functions that take buffers state what they additionally require. Codes other than
//! `MPI_SUCCESS` are only seen on communicators whose error handler is `MPI_ERRORS_RETURN`
//! (ours); elsewhere MPI aborts the job before returning.

use std::ffi::{c_char, c_int, c_void};
use std::mem::MaybeUninit;

use super::error::MpiError;
use super::sys;

/// A byte length as an MPI `int` count, or [`MpiError::TooLarge`] past `i32::MAX`: MPI-3 has
/// no larger counts, and a truncated count would silently lose data.
pub(crate) fn count(len: usize, what: &'static str) -> Result<c_int, MpiError> {
    c_int::try_from(len).map_err(|_| MpiError::TooLarge {
        what,
        len: len as u64,
        max: c_int::MAX as u64,
    })
}

/// `Ok` for `MPI_SUCCESS`, else the code and its message.
///
/// # Safety
///
/// See the module documentation.
unsafe fn check(code: c_int, function: &'static str) -> Result<(), MpiError> {
    // MPI_SUCCESS is 0 in every implementation; bindgen types the macro as u32.
    if code == sys::MPI_SUCCESS as c_int {
        return Ok(());
    }
    // SAFETY: forwarded contract.
    let message = unsafe { error_string(code) };
    Err(MpiError::Call {
        function,
        code,
        message,
    })
}

/// `MPI_Error_string`, or a plain description when even that fails.
///
/// # Safety
///
/// See the module documentation.
unsafe fn error_string(code: c_int) -> String {
    let mut buf = vec![0u8; sys::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: `buf` holds MPI_MAX_ERROR_STRING bytes as the call requires; `len` is a valid
    // out-pointer.
    let rc = unsafe { sys::MPI_Error_string(code, buf.as_mut_ptr().cast::<c_char>(), &mut len) };
    if rc != sys::MPI_SUCCESS as c_int {
        return format!("unknown MPI error {code}");
    }
    let len = usize::try_from(len).unwrap_or(0).min(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// `MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN)`.
///
/// # Safety
///
/// See the module documentation.
pub(crate) unsafe fn set_errors_return(comm: sys::MPI_Comm) -> Result<(), MpiError> {
    // SAFETY: forwarded contract; the predefined handler is always valid.
    unsafe {
        check(
            sys::MPI_Comm_set_errhandler(comm, sys::RSMPI_ERRORS_RETURN),
            "MPI_Comm_set_errhandler",
        )
    }
}

/// `MPI_Isend` of `buf` as bytes.
///
/// # Safety
///
/// The module's contract, and: `buf` stays allocated and unmodified until the returned
/// request completes (MPI reads it asynchronously).
pub(crate) unsafe fn isend(
    buf: &[u8],
    dest: c_int,
    tag: c_int,
    comm: sys::MPI_Comm,
) -> Result<sys::MPI_Request, MpiError> {
    let n = count(buf.len(), "an MPI message")?;
    let mut req = MaybeUninit::<sys::MPI_Request>::uninit();
    // SAFETY: `buf` is valid for `n` bytes (and stays so, by contract); `req` is a valid
    // out-pointer, initialized by MPI on success.
    unsafe {
        check(
            sys::MPI_Isend(
                buf.as_ptr().cast::<c_void>(),
                n,
                sys::RSMPI_UINT8_T,
                dest,
                tag,
                comm,
                req.as_mut_ptr(),
            ),
            "MPI_Isend",
        )?;
        Ok(req.assume_init())
    }
}

/// `MPI_Improbe(MPI_ANY_SOURCE, MPI_ANY_TAG)`: the next incoming message, matched (no
/// other probe or receive can take it), or `None`.
///
/// # Safety
///
/// See the module documentation.
pub(crate) unsafe fn improbe(
    comm: sys::MPI_Comm,
) -> Result<Option<(sys::MPI_Message, sys::MPI_Status)>, MpiError> {
    let mut flag: c_int = 0;
    let mut msg = MaybeUninit::<sys::MPI_Message>::uninit();
    let mut status = MaybeUninit::<sys::MPI_Status>::uninit();
    // SAFETY: valid out-pointers; `msg` and `status` are written when `flag` is set.
    unsafe {
        check(
            sys::MPI_Improbe(
                sys::RSMPI_ANY_SOURCE,
                sys::RSMPI_ANY_TAG,
                comm,
                &mut flag,
                msg.as_mut_ptr(),
                status.as_mut_ptr(),
            ),
            "MPI_Improbe",
        )?;
        if flag == 0 {
            return Ok(None);
        }
        Ok(Some((msg.assume_init(), status.assume_init())))
    }
}

/// `MPI_Get_count` in bytes of a probed message.
///
/// # Safety
///
/// See the module documentation; `status` comes from a probe.
pub(crate) unsafe fn get_count(status: &sys::MPI_Status) -> Result<usize, MpiError> {
    let mut n: c_int = 0;
    // SAFETY: `status` is a valid status; `n` a valid out-pointer.
    unsafe {
        check(
            sys::MPI_Get_count(status, sys::RSMPI_UINT8_T, &mut n),
            "MPI_Get_count",
        )?;
    }
    // MPI_UNDEFINED (negative) cannot happen for bytes, but is not a length either.
    usize::try_from(n).map_err(|_| MpiError::Call {
        function: "MPI_Get_count",
        code: n,
        message: "the message is not a whole number of bytes".to_owned(),
    })
}

/// `MPI_Imrecv` of a matched message into `buf`.
///
/// # Safety
///
/// The module's contract, and: `message` comes from [`improbe`] and was not received yet;
/// `buf` stays allocated and is neither read nor written until the returned request
/// completes (MPI writes it asynchronously).
pub(crate) unsafe fn imrecv(
    buf: &mut [u8],
    message: &mut sys::MPI_Message,
) -> Result<sys::MPI_Request, MpiError> {
    let n = count(buf.len(), "an MPI message")?;
    let mut req = MaybeUninit::<sys::MPI_Request>::uninit();
    // SAFETY: `buf` is valid for `n` bytes (and stays so, by contract); `message` is a
    // matched message (MPI sets it to MPI_MESSAGE_NULL); `req` a valid out-pointer.
    unsafe {
        check(
            sys::MPI_Imrecv(
                buf.as_mut_ptr().cast::<c_void>(),
                n,
                sys::RSMPI_UINT8_T,
                message,
                req.as_mut_ptr(),
            ),
            "MPI_Imrecv",
        )?;
        Ok(req.assume_init())
    }
}

/// `MPI_Ibcast` of `buf` as bytes from `root`.
///
/// # Safety
///
/// The module's contract, and: `buf` stays allocated and is neither read nor written until
/// the returned request completes.
pub(crate) unsafe fn ibcast(
    buf: &mut [u8],
    root: c_int,
    comm: sys::MPI_Comm,
) -> Result<sys::MPI_Request, MpiError> {
    let n = count(buf.len(), "a broadcast")?;
    let mut req = MaybeUninit::<sys::MPI_Request>::uninit();
    // SAFETY: `buf` is valid for `n` bytes (and stays so, by contract); `req` a valid
    // out-pointer.
    unsafe {
        check(
            sys::MPI_Ibcast(
                buf.as_mut_ptr().cast::<c_void>(),
                n,
                sys::RSMPI_UINT8_T,
                root,
                comm,
                req.as_mut_ptr(),
            ),
            "MPI_Ibcast",
        )?;
        Ok(req.assume_init())
    }
}

/// `MPI_Ibarrier`.
///
/// # Safety
///
/// See the module documentation.
pub(crate) unsafe fn ibarrier(comm: sys::MPI_Comm) -> Result<sys::MPI_Request, MpiError> {
    let mut req = MaybeUninit::<sys::MPI_Request>::uninit();
    // SAFETY: `req` is a valid out-pointer.
    unsafe {
        check(sys::MPI_Ibarrier(comm, req.as_mut_ptr()), "MPI_Ibarrier")?;
        Ok(req.assume_init())
    }
}

/// `MPI_Test`: the status once the request completed (MPI then frees it and sets the
/// handle to `MPI_REQUEST_NULL`), `None` while it is pending.
///
/// # Safety
///
/// See the module documentation; `req` is a live request.
pub(crate) unsafe fn test(req: &mut sys::MPI_Request) -> Result<Option<sys::MPI_Status>, MpiError> {
    let mut flag: c_int = 0;
    let mut status = MaybeUninit::<sys::MPI_Status>::uninit();
    // SAFETY: valid pointers; `status` is written when `flag` is set.
    unsafe {
        check(
            sys::MPI_Test(req, &mut flag, status.as_mut_ptr()),
            "MPI_Test",
        )?;
        if flag == 0 {
            return Ok(None);
        }
        Ok(Some(status.assume_init()))
    }
}

/// `MPI_Abort(MPI_COMM_WORLD, code)`: asks the launcher to kill every process of the job.
/// Returns only if MPI could not abort; the caller then exits by itself.
///
/// # Safety
///
/// MPI is initialized and not finalized, and the thread level permits a call from this
/// thread now (MULTIPLE, or this is the progress thread).
pub(crate) unsafe fn abort(code: c_int) -> c_int {
    // SAFETY: forwarded contract; MPI_COMM_WORLD is always valid while MPI is initialized.
    unsafe { sys::MPI_Abort(sys::RSMPI_COMM_WORLD, code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_past_i32_are_refused_not_truncated() {
        assert_eq!(count(0, "x").unwrap(), 0);
        assert_eq!(count(i32::MAX as usize, "x").unwrap(), i32::MAX);
        let e = count(i32::MAX as usize + 1, "an MPI message").unwrap_err();
        assert!(
            matches!(e, MpiError::TooLarge { len, max, .. } if len == 1 << 31 && max == (1 << 31) - 1),
            "{e:?}"
        );
        assert!(count(5 << 30, "x").is_err());
    }
}
