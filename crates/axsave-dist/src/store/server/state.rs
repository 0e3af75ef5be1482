//! The key-value data, queues and pending WAITs, all behind the server's one mutex.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};

use super::super::protocol::WAIT_STOP_WAITING;
use super::ServerOptions;

/// The write half of a connection, shared with whoever wakes its WAIT.
pub(super) type Writer = Arc<Mutex<TcpStream>>;

/// A connection blocked in WAIT.
#[derive(Debug)]
pub(super) struct Waiter {
    pub(super) missing: HashSet<Vec<u8>>,
    pub(super) writer: Writer,
}

/// Everything the store holds.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) kv: HashMap<Vec<u8>, Vec<u8>>,
    pub(super) queues: HashMap<Vec<u8>, VecDeque<Vec<u8>>>,
    pub(super) waiters: HashMap<u64, Waiter>,
    /// Key → connections waiting for it.
    pub(super) waiting_on: HashMap<Vec<u8>, Vec<u64>>,
    /// Bytes of keys and values held in `kv` and `queues`.
    pub(super) held: usize,
}

impl State {
    pub(super) fn exists(&self, key: &[u8]) -> bool {
        self.kv.contains_key(key) || self.queues.get(key).is_some_and(|q| !q.is_empty())
    }

    /// Tells every connection whose last missing key is `key` that it may stop waiting.
    pub(super) fn wake(&mut self, key: &[u8]) {
        let Some(ids) = self.waiting_on.remove(key) else {
            return;
        };
        for id in ids {
            let done = match self.waiters.get_mut(&id) {
                Some(w) => {
                    w.missing.remove(key);
                    w.missing.is_empty()
                }
                None => false,
            };
            if done {
                if let Some(w) = self.waiters.remove(&id) {
                    write_to(&w.writer, &[WAIT_STOP_WAITING]);
                }
            }
        }
    }

    pub(super) fn set(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.held += key.len() + value.len();
        if let Some(old) = self.kv.insert(key.clone(), value) {
            self.held -= key.len() + old.len();
        }
        self.wake(&key);
    }

    /// Whether storing `added` more bytes under `key` (replacing its value when `replace`)
    /// keeps the store within [`ServerOptions::max_keys`] and
    /// [`ServerOptions::max_held_bytes`]; the error says which.
    pub(super) fn room_for(
        &self,
        key: &[u8],
        added: usize,
        replace: bool,
        opts: &ServerOptions,
    ) -> Result<(), String> {
        let new_key = !self.kv.contains_key(key) && !self.queues.contains_key(key);
        let freed = match self.kv.get(key) {
            Some(old) if replace => key.len() + old.len(),
            _ => 0,
        };
        if new_key && self.kv.len() + self.queues.len() >= opts.max_keys {
            return Err(format!(
                "the store already holds {} keys, the most it accepts",
                opts.max_keys
            ));
        }
        let after = (self.held - freed)
            .saturating_add(key.len())
            .saturating_add(added);
        if after > opts.max_held_bytes {
            return Err(format!(
                "the store would hold {after} bytes, more than the {} it accepts",
                opts.max_held_bytes
            ));
        }
        Ok(())
    }

    /// Forgets connection `id`'s pending wait, if any; true if there was one.
    pub(super) fn cancel(&mut self, id: u64) -> bool {
        let Some(w) = self.waiters.remove(&id) else {
            return false;
        };
        for key in &w.missing {
            if let Some(ids) = self.waiting_on.get_mut(key) {
                ids.retain(|&i| i != id);
                if ids.is_empty() {
                    self.waiting_on.remove(key);
                }
            }
        }
        true
    }
}

/// Writes one whole message; on failure shuts the socket so its reader thread ends too.
pub(super) fn write_to(writer: &Writer, bytes: &[u8]) -> bool {
    let mut s = writer.lock().unwrap_or_else(PoisonError::into_inner);
    match s.write_all(bytes) {
        Ok(()) => true,
        Err(_) => {
            let _ = s.shutdown(Shutdown::Both);
            false
        }
    }
}
