//! The data plane between ranks, whichever transport carries it: TCP (always) or MPI (built
//! with the `mpi` feature and launched by mpirun). Readers' workers hand runs to a
//! [`RemoteSink`]; a writer's [`Incoming`] hands them to its output files.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axsave_dist::data_plane::{SharedSink, TcpOptions, TcpReceiver, TcpSender};

use crate::error::{CoreError, Result, ResultExt};
use crate::execute::Sink;

/// Which transport moves pieces between ranks.
#[derive(Clone)]
pub enum Net {
    /// Direct TCP connections; writers publish their address in the store.
    Tcp,
    /// MPI point-to-point messages.
    #[cfg(feature = "mpi")]
    Mpi(axsave_dist::data_plane::mpi::MpiTransport),
}

impl Net {
    /// Whether MPI is there to carry pieces.
    pub fn is_mpi(&self) -> bool {
        !matches!(self, Net::Tcp)
    }

    /// The name the log and `--json` use.
    pub fn name(&self) -> &'static str {
        match self {
            Net::Tcp => "tcp",
            #[cfg(feature = "mpi")]
            Net::Mpi(_) => "mpi",
        }
    }
}

/// One worker's channel to one writer rank.
pub enum RemoteSink {
    /// A TCP connection.
    Tcp(Option<TcpSender>, usize),
    /// An MPI stream.
    #[cfg(feature = "mpi")]
    Mpi(Option<axsave_dist::data_plane::mpi::MpiSender>, usize),
}

impl RemoteSink {
    /// Connects to writer `peer` listening at `addr`.
    pub fn tcp(addr: SocketAddr, me: usize, peer: usize, opts: &TcpOptions) -> Result<Self> {
        let sender = TcpSender::connect(addr, me, opts)
            .context(|| format!("cannot send to rank {peer} at {addr}"))?;
        Ok(RemoteSink::Tcp(Some(sender), peer))
    }

    /// Opens an MPI stream to writer `peer`.
    #[cfg(feature = "mpi")]
    pub fn mpi(
        t: &axsave_dist::data_plane::mpi::MpiTransport,
        peer: usize,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self> {
        let s = t
            .sender_with_cancel(peer, Some(cancel))
            .context(|| format!("cannot send to rank {peer} over MPI"))?;
        Ok(RemoteSink::Mpi(Some(s), peer))
    }

    fn gone(peer: usize) -> CoreError {
        CoreError::Internal(format!("the stream to rank {peer} already finished"))
    }
}

impl Sink for RemoteSink {
    fn write(&mut self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            RemoteSink::Tcp(s, peer) => s
                .as_mut()
                .ok_or_else(|| Self::gone(*peer))?
                .push(file as u32, offset, data)
                .context(|| format!("sending to rank {peer}")),
            #[cfg(feature = "mpi")]
            RemoteSink::Mpi(s, peer) => s
                .as_mut()
                .ok_or_else(|| Self::gone(*peer))?
                .push(file as u32, offset, data)
                .context(|| format!("sending to rank {peer}")),
        }
    }

    /// Sends what is buffered; over TCP, also waits until the writer confirms every byte.
    fn finish(&mut self) -> Result<()> {
        match self {
            RemoteSink::Tcp(s, peer) => match s.take() {
                Some(s) => s
                    .finish()
                    .map(|_| ())
                    .context(|| format!("sending to rank {peer}")),
                None => Ok(()),
            },
            #[cfg(feature = "mpi")]
            RemoteSink::Mpi(s, peer) => match s.take() {
                Some(s) => s
                    .finish()
                    .map(|_| ())
                    .context(|| format!("sending to rank {peer}")),
                None => Ok(()),
            },
        }
    }
}

/// A writer's receiving side.
pub enum Incoming {
    /// TCP connections from readers.
    Tcp(TcpReceiver, Arc<AtomicBool>),
    /// MPI messages from readers.
    #[cfg(feature = "mpi")]
    Mpi(axsave_dist::data_plane::mpi::MpiReceiver, Arc<AtomicBool>),
}

impl Incoming {
    /// Starts receiving over MPI into `sink`.
    #[cfg(feature = "mpi")]
    pub fn mpi(t: &axsave_dist::data_plane::mpi::MpiTransport, sink: SharedSink) -> Result<Self> {
        let cancel = Arc::new(AtomicBool::new(false));
        let r = t
            .start_receiver(sink, cancel.clone())
            .context(|| "cannot receive over MPI".into())?;
        Ok(Incoming::Mpi(r, cancel))
    }

    /// Starts a TCP receiver on `ip` (the address this rank publishes; every interface when it
    /// is not one of this host's, as an `AXSAVE_ADDR` behind NAT may be); returns it and its port.
    pub fn tcp(opts: &TcpOptions, sink: SharedSink, ip: std::net::IpAddr) -> Result<(Self, u16)> {
        let any = match ip {
            std::net::IpAddr::V4(_) => std::net::IpAddr::from([0, 0, 0, 0]),
            std::net::IpAddr::V6(_) => std::net::IpAddr::from([0u16; 8]),
        };
        let bind = if super::address::is_local(ip) {
            ip
        } else {
            any
        };
        let mut r = TcpReceiver::listen(SocketAddr::new(bind, 0), opts.clone())
            .context(|| format!("cannot listen for peers on {bind}"))?;
        let port = r.local_addr().port();
        let cancel = Arc::new(AtomicBool::new(false));
        r.start(sink, cancel.clone())?;
        Ok((Incoming::Tcp(r, cancel), port))
    }

    /// Waits until `expected` bytes were written.
    pub fn wait(&self, expected: u64) -> Result<()> {
        match self {
            Incoming::Tcp(r, _) => Ok(r.wait(expected).map(|_| ())?),
            #[cfg(feature = "mpi")]
            Incoming::Mpi(r, _) => Ok(r.wait(expected).map(|_| ())?),
        }
    }

    /// Stops receiving.
    pub fn shutdown(self) {
        match self {
            Incoming::Tcp(r, cancel) => {
                cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                r.shutdown();
            }
            #[cfg(feature = "mpi")]
            Incoming::Mpi(r, cancel) => {
                cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                r.shutdown();
            }
        }
    }
}
