//! A sink that sends converted runs to the rank that writes them.

use std::net::SocketAddr;

use axsave_dist::transport::{Sender, TcpOptions};

use crate::error::{CoreError, Result};
use crate::execute::Sink;

/// One worker's connection to one writer rank.
pub struct RemoteSink {
    sender: Option<Sender>,
    peer: usize,
}

impl RemoteSink {
    /// Connects to writer `peer` listening at `addr`.
    pub fn connect(addr: SocketAddr, me: usize, peer: usize, opts: &TcpOptions) -> Result<Self> {
        let sender = Sender::connect(addr, me, opts)
            .map_err(|e| CoreError::Remote(format!("cannot send to rank {peer} at {addr}: {e}")))?;
        Ok(RemoteSink {
            sender: Some(sender),
            peer,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> CoreError {
        CoreError::Remote(format!("sending to rank {}: {e}", self.peer))
    }
}

impl Sink for RemoteSink {
    fn write(&mut self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        let peer = self.peer;
        let s = self.sender.as_mut().ok_or_else(|| {
            CoreError::Remote(format!("connection to rank {peer} already finished"))
        })?;
        s.push(file as u32, offset, data)
            .map_err(|e| CoreError::Remote(format!("sending to rank {peer}: {e}")))
    }

    /// Sends what is buffered and waits until the writer confirms it has every byte.
    fn finish(&mut self) -> Result<()> {
        match self.sender.take() {
            Some(s) => s.finish().map(|_| ()).map_err(|e| self.err(e)),
            None => Ok(()),
        }
    }
}
