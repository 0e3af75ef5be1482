//! Core's side of dist's [`DataPlane`]: which transport a run may use ([`Net`]), a reading
//! worker's stream to one writer rank as an [`execute::Sink`](Sink) ([`PeerSink`]), and the
//! output files as the sink the receivers write into (`impl data_plane::Sink for
//! OutputFiles`). Sockets and MPI calls stay in dist.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axsave_dist::data_plane::{self, DataPlane, PlaneSender, SinkError, TcpOptions};

use crate::error::{CoreError, Result, ResultExt};
use crate::execute::Sink;
use crate::output::OutputFiles;

/// Which transport moves pieces between ranks, as the launcher allows: TCP always, MPI when
/// the binary has it and mpirun started the job.
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

    /// The data plane of one run: MPI when this is MPI, else TCP with `tcp`'s options.
    pub fn plane(&self, tcp: TcpOptions) -> DataPlane {
        match self {
            Net::Tcp => DataPlane::Tcp(tcp),
            #[cfg(feature = "mpi")]
            Net::Mpi(t) => DataPlane::Mpi(t.clone()),
        }
    }
}

/// One worker's stream to one writer rank.
pub struct PeerSink {
    sender: Option<PlaneSender>,
    peer: usize,
}

impl PeerSink {
    /// Opens a stream from rank `me` to writer `peer` (listening at `addr`, over TCP). Once
    /// `cancel` is set, the stream's calls fail within a fraction of a second.
    pub fn open(
        plane: &DataPlane,
        me: usize,
        peer: usize,
        addr: Option<SocketAddr>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self> {
        let sender = plane
            .send_to(me, peer, addr, Some(cancel))
            .context(|| match addr {
                Some(a) => format!("cannot send to rank {peer} at {a}"),
                None => format!("cannot send to rank {peer} over {}", plane.name()),
            })?;
        Ok(PeerSink {
            sender: Some(sender),
            peer,
        })
    }
}

impl Sink for PeerSink {
    fn write(&mut self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        let peer = self.peer;
        self.sender
            .as_mut()
            .ok_or_else(|| {
                CoreError::Internal(format!("the stream to rank {peer} already finished"))
            })?
            .push(file as u32, offset, data)
            .context(|| format!("sending to rank {peer}"))
    }

    /// Sends what is buffered; over TCP, also waits until the writer confirms every byte.
    fn finish(&mut self) -> Result<()> {
        let peer = self.peer;
        match self.sender.take() {
            Some(s) => s
                .finish()
                .map(|_| ())
                .context(|| format!("sending to rank {peer}")),
            None => Ok(()),
        }
    }
}

/// The receivers write what arrives straight into the output files.
impl data_plane::Sink for OutputFiles {
    fn write_run(
        &self,
        _from: usize,
        file: u32,
        offset: u64,
        bytes: &[u8],
    ) -> std::result::Result<(), SinkError> {
        self.write_at(file as usize, offset, bytes)
            .map_err(SinkError::new)
    }
}
