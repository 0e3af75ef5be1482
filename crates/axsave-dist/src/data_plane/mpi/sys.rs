//! The raw C API, limited to what the transport calls that rsmpi does not wrap in a form
//! usable from a polling loop: matched probes and receives whose buffers outlive a lexical
//! scope, non-blocking collectives on owned buffers, `MPI_Abort`, and error strings.
//!
//! Everything here is `unsafe` to call; [`super::result`] turns the return codes into
//! `Result`s and [`super::safe`] ties buffers and requests together.

pub(crate) use mpi::ffi::{
    MPI_Abort, MPI_Comm, MPI_Comm_set_errhandler, MPI_Error_string, MPI_Get_count, MPI_Ibarrier,
    MPI_Ibcast, MPI_Improbe, MPI_Imrecv, MPI_Isend, MPI_MAX_ERROR_STRING, MPI_Message, MPI_Request,
    MPI_SUCCESS, MPI_Status, MPI_Test, RSMPI_ANY_SOURCE, RSMPI_ANY_TAG, RSMPI_COMM_WORLD,
    RSMPI_ERRORS_RETURN, RSMPI_UINT8_T,
};
