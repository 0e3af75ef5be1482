//! [`DataPlane`]: the one face of the data transports. A run picks TCP or MPI once; from then
//! on a reading rank opens a [`PlaneSender`] to each writer it has data for and a writing
//! rank runs one [`PlaneReceiver`] that hands every run to its [`Sink`](super::Sink), without
//! either naming the transport.
//!
//! Between GPUs, bytes move in rounds of matched sends and receives of device buffers, not as
//! runs into a sink: that is `DevicePlane` (module `device`, feature `cuda`), this face's
//! counterpart, over NCCL.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

#[cfg(feature = "mpi")]
use super::mpi::{MpiError, MpiReceiver, MpiSender, MpiTransport};
use super::{ReceiveStats, SharedSink, TcpOptions, TcpReceiver, TcpSender, TransportError};

/// Which transport carries the runs between ranks.
#[derive(Debug, Clone)]
pub enum DataPlane {
    /// Direct TCP connections; each writer publishes the address its receiver listens on.
    Tcp(TcpOptions),
    /// MPI point-to-point messages (feature `mpi`, a job started by an MPI launcher).
    #[cfg(feature = "mpi")]
    Mpi(MpiTransport),
}

/// Why the data plane failed: the transport's own error.
#[derive(Debug, Clone, Error)]
pub enum DataPlaneError {
    /// Over TCP.
    #[error(transparent)]
    Tcp(#[from] TransportError),
    /// Over MPI.
    #[cfg(feature = "mpi")]
    #[error(transparent)]
    Mpi(#[from] MpiError),
}

impl DataPlane {
    /// The name the log and reports use: `tcp` or `mpi`.
    pub fn name(&self) -> &'static str {
        match self {
            DataPlane::Tcp(_) => "tcp",
            #[cfg(feature = "mpi")]
            DataPlane::Mpi(_) => "mpi",
        }
    }

    /// Whether runs travel over MPI.
    pub fn is_mpi(&self) -> bool {
        !matches!(self, DataPlane::Tcp(_))
    }

    /// Starts receiving into `sink`. Over TCP the receiver listens on `bind` (port 0 picks
    /// one) and its address is returned, for the writer to publish; over MPI there is no
    /// address and `bind` is ignored.
    pub fn receive(
        &self,
        sink: SharedSink,
        bind: IpAddr,
    ) -> Result<(PlaneReceiver, Option<SocketAddr>), DataPlaneError> {
        let cancel = Arc::new(AtomicBool::new(false));
        match self {
            DataPlane::Tcp(options) => {
                let mut r = TcpReceiver::listen(SocketAddr::new(bind, 0), options.clone())?;
                let addr = r.local_addr();
                r.start(sink, Arc::clone(&cancel))?;
                Ok((
                    PlaneReceiver {
                        inner: Receiving::Tcp(r),
                        cancel,
                    },
                    Some(addr),
                ))
            }
            #[cfg(feature = "mpi")]
            DataPlane::Mpi(t) => {
                let r = t.start_receiver(sink, Arc::clone(&cancel))?;
                Ok((
                    PlaneReceiver {
                        inner: Receiving::Mpi(r),
                        cancel,
                    },
                    None,
                ))
            }
        }
    }

    /// Opens a stream from rank `me` to writer rank `peer`. Over TCP `addr` is where the
    /// writer's receiver listens (required); MPI needs only the rank. Setting `cancel` makes
    /// the sender's calls return an error within a fraction of a second.
    pub fn send_to(
        &self,
        me: usize,
        peer: usize,
        addr: Option<SocketAddr>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<PlaneSender, DataPlaneError> {
        match self {
            DataPlane::Tcp(options) => {
                let addr = addr.ok_or_else(|| TransportError::InvalidOptions {
                    detail: format!("no address to reach rank {peer} at"),
                })?;
                Ok(PlaneSender::Tcp(TcpSender::connect_with_cancel(
                    addr, me, options, cancel,
                )?))
            }
            #[cfg(feature = "mpi")]
            DataPlane::Mpi(t) => Ok(PlaneSender::Mpi(t.sender_with_cancel(peer, cancel)?)),
        }
    }
}

/// One stream from this rank to one writer rank (see [`DataPlane::send_to`]).
#[derive(Debug)]
pub enum PlaneSender {
    /// A TCP connection.
    Tcp(TcpSender),
    /// An MPI stream.
    #[cfg(feature = "mpi")]
    Mpi(MpiSender),
}

impl PlaneSender {
    /// Queues `data` for byte `offset` of output file `file`.
    pub fn push(&mut self, file: u32, offset: u64, data: &[u8]) -> Result<(), DataPlaneError> {
        match self {
            PlaneSender::Tcp(s) => Ok(s.push(file, offset, data)?),
            #[cfg(feature = "mpi")]
            PlaneSender::Mpi(s) => Ok(s.push(file, offset, data)?),
        }
    }

    /// Sends what is buffered and ends the stream; returns the payload bytes it carried.
    /// Over TCP this also waits until the writer confirmed every byte; over MPI delivery is
    /// confirmed by the writer's [`PlaneReceiver::wait`].
    pub fn finish(self) -> Result<u64, DataPlaneError> {
        match self {
            PlaneSender::Tcp(s) => Ok(s.finish()?),
            #[cfg(feature = "mpi")]
            PlaneSender::Mpi(s) => Ok(s.finish()?),
        }
    }
}

/// A writer rank's receiving side (see [`DataPlane::receive`]). Dropping it stops it.
#[derive(Debug)]
pub struct PlaneReceiver {
    inner: Receiving,
    cancel: Arc<AtomicBool>,
}

#[derive(Debug)]
enum Receiving {
    Tcp(TcpReceiver),
    #[cfg(feature = "mpi")]
    Mpi(MpiReceiver),
}

impl PlaneReceiver {
    /// Blocks until `expected_bytes` payload bytes in total were handed to the sink and every
    /// stream ended; fails with the first error the receiver hit.
    pub fn wait(&self, expected_bytes: u64) -> Result<ReceiveStats, DataPlaneError> {
        match &self.inner {
            Receiving::Tcp(r) => Ok(r.wait(expected_bytes)?),
            #[cfg(feature = "mpi")]
            Receiving::Mpi(r) => Ok(r.wait(expected_bytes)?),
        }
    }

    /// What arrived so far.
    pub fn stats(&self) -> ReceiveStats {
        match &self.inner {
            Receiving::Tcp(r) => r.stats(),
            #[cfg(feature = "mpi")]
            Receiving::Mpi(r) => r.stats(),
        }
    }

    /// The flag that cancels this receiver: setting it makes [`PlaneReceiver::wait`] fail.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.cancel)
    }

    /// Cancels and stops receiving; waits for a sink call in progress.
    pub fn shutdown(self) {
        self.cancel.store(true, Ordering::SeqCst);
        match self.inner {
            Receiving::Tcp(r) => r.shutdown(),
            #[cfg(feature = "mpi")]
            Receiving::Mpi(r) => r.shutdown(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data_plane::sink_fn;
    use std::sync::Mutex;
    use std::time::Duration;

    fn tcp() -> DataPlane {
        DataPlane::Tcp(TcpOptions {
            session: 7,
            frame_bytes: 4096,
            io_timeout: Duration::from_secs(20),
            ..TcpOptions::default()
        })
    }

    #[test]
    fn runs_reach_the_sink_over_tcp() {
        let plane = tcp();
        assert_eq!(plane.name(), "tcp");
        assert!(!plane.is_mpi());
        let out = Arc::new(Mutex::new(vec![0u8; 10_000]));
        let sink = {
            let out = Arc::clone(&out);
            sink_fn(move |_, file, offset, bytes| {
                assert_eq!(file, 0);
                let o = offset as usize;
                out.lock().unwrap()[o..o + bytes.len()].copy_from_slice(bytes);
                Ok(())
            })
        };
        let (r, addr) = plane.receive(sink, IpAddr::from([127, 0, 0, 1])).unwrap();
        let addr = addr.expect("a TCP receiver has an address");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut s = plane.send_to(1, 0, Some(addr), None).unwrap();
        s.push(0, 0, &data[..6000]).unwrap();
        s.push(0, 6000, &data[6000..]).unwrap();
        assert_eq!(s.finish().unwrap(), 10_000);
        let stats = r.wait(10_000).unwrap();
        assert_eq!(stats.bytes, 10_000);
        assert_eq!(stats.bytes_by_rank.get(&1), Some(&10_000));
        assert_eq!(*out.lock().unwrap(), data);
        r.shutdown();
    }

    #[test]
    fn errors_keep_the_transports_error() {
        let plane = tcp();
        let e = plane.send_to(1, 3, None, None).unwrap_err();
        assert!(
            matches!(&e, DataPlaneError::Tcp(TransportError::InvalidOptions { detail }) if detail.contains("rank 3")),
            "{e:?}"
        );
        let (r, _) = plane
            .receive(sink_fn(|_, _, _, _| Ok(())), IpAddr::from([127, 0, 0, 1]))
            .unwrap();
        r.cancel_flag().store(true, Ordering::SeqCst);
        assert!(matches!(
            r.wait(1),
            Err(DataPlaneError::Tcp(TransportError::Cancelled))
        ));
    }
}
