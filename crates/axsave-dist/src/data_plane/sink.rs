//! Where a receiver hands the runs it received: the [`Sink`] every data transport (TCP, MPI)
//! writes into, typically a positioned write into a preallocated output file.

use std::error::Error;
use std::fmt;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

/// Where received runs go. Called from several receiver threads at once, in arrival order
/// within one connection or stream. An `Err` (or a panic) fails the transfer: the receiver
/// reports it from its `wait` and, over TCP, to the sender in place of its acknowledgement.
///
/// Closures `Fn(sender_rank, file, offset, bytes) -> Result<(), SinkError>` are sinks; see
/// [`sink_fn`] for one whose argument types are inferred.
pub trait Sink: Send + Sync {
    /// Writes `bytes`, received from rank `from`, at byte `offset` of output file `file`.
    fn write_run(&self, from: usize, file: u32, offset: u64, bytes: &[u8])
    -> Result<(), SinkError>;
}

impl<F> Sink for F
where
    F: Fn(usize, u32, u64, &[u8]) -> Result<(), SinkError> + Send + Sync,
{
    fn write_run(
        &self,
        from: usize,
        file: u32,
        offset: u64,
        bytes: &[u8],
    ) -> Result<(), SinkError> {
        self(from, file, offset, bytes)
    }
}

/// A sink shared by a receiver's threads.
pub type SharedSink = Arc<dyn Sink>;

/// Wraps a closure as a [`SharedSink`], inferring its argument types.
pub fn sink_fn<F>(f: F) -> SharedSink
where
    F: Fn(usize, u32, u64, &[u8]) -> Result<(), SinkError> + Send + Sync + 'static,
{
    Arc::new(f)
}

/// Why a sink could not take a run: the writer's own error, kept as its source.
#[derive(Debug)]
pub struct SinkError(Box<dyn Error + Send + Sync>);

impl SinkError {
    /// Wraps any error.
    pub fn new(error: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        SinkError(error.into())
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Error for SinkError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

impl From<io::Error> for SinkError {
    fn from(e: io::Error) -> Self {
        SinkError::new(e)
    }
}

impl From<String> for SinkError {
    fn from(message: String) -> Self {
        SinkError::new(message)
    }
}

impl From<&str> for SinkError {
    fn from(message: &str) -> Self {
        SinkError::new(message)
    }
}

/// Hands one run to `sink`; a panic in it becomes an error. Returns the message a transport
/// error carries.
pub(crate) fn deliver(
    sink: &dyn Sink,
    from: usize,
    file: u32,
    offset: u64,
    bytes: &[u8],
) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| {
        sink.write_run(from, file, offset, bytes)
    })) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(panic_message(&*panic)),
    }
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-string panic");
    format!("the sink panicked: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_panics_become_messages() {
        let ok = sink_fn(|_, _, _, _| Ok(()));
        assert_eq!(deliver(&*ok, 0, 0, 0, b"x"), Ok(()));
        let full = sink_fn(|_, _, _, _| Err("disk full".into()));
        assert_eq!(deliver(&*full, 0, 0, 0, b"x"), Err("disk full".to_string()));
        let io = sink_fn(|_, _, _, _| Err(io::Error::other("no space").into()));
        assert_eq!(deliver(&*io, 0, 0, 0, b"x"), Err("no space".to_string()));
        let boom = sink_fn(|_, _, _, _| panic!("exploded"));
        assert_eq!(
            deliver(&*boom, 0, 0, 0, b"x"),
            Err("the sink panicked: exploded".to_string())
        );
    }

    #[test]
    fn closures_see_the_run() {
        let seen = std::sync::Mutex::new(Vec::new());
        let sink = |from: usize, file: u32, offset: u64, bytes: &[u8]| -> Result<(), SinkError> {
            seen.lock()
                .unwrap()
                .push((from, file, offset, bytes.to_vec()));
            Ok(())
        };
        deliver(&sink, 3, 1, 40, b"ab").unwrap();
        assert_eq!(seen.into_inner().unwrap(), vec![(3, 1, 40, b"ab".to_vec())]);
    }
}
