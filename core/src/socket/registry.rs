//! The socket connections of every worker, by global id, so that any thread can send to
//! any of them: bytes go into the connection's bounded send queue (framed for a `Length`
//! socket on the sender's thread), and the task that owns the connection writes them out.
//! The same pattern as `ws::registry`.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
};

use plughost_plugin_api::HostError;

use super::framing;
use crate::config::Framing;

/// The handle other threads hold to one connection.
#[derive(Debug)]
struct Handle {
    /// Its socket's `listen` as configured, and the address it is bound to.
    listen: [Arc<str>; 2],
    framing: Framing,
    /// Unbounded, so an idle connection holds no queue memory; `capacity` bounds it.
    data: async_channel::Sender<Vec<u8>>,
    capacity: usize,
    close: async_channel::Sender<Close>,
    closing: AtomicBool,
}

/// Why a connection is asked to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// A plugin asked (`host.close_socket`): after what is queued.
    Asked,
    /// Its send queue overflowed: the peer reads too slowly.
    QueueFull,
    /// The server stops.
    Stopping,
}

/// The receiving ends, for the connection's own task.
#[derive(Debug)]
pub struct Queues {
    /// Bytes to write, framed.
    pub data: async_channel::Receiver<Vec<u8>>,
    /// A close request.
    pub close: async_channel::Receiver<Close>,
}

const SHARDS: usize = 64;

#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(RwLock<HashMap<u64, Handle>>);

/// Every open socket connection, and the UDP sockets.
#[derive(Debug)]
pub struct Sockets {
    shards: Box<[Shard]>,
    /// The UDP sockets' senders and peers.
    pub udp: super::udp::Udp,
}

impl Default for Sockets {
    fn default() -> Self {
        Sockets {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            udp: Default::default(),
        }
    }
}

impl Sockets {
    fn shard(&self, id: u64) -> &RwLock<HashMap<u64, Handle>> {
        // The worker id is in the high 16 bits of a connection id.
        &self.shards[(id >> 48) as usize % SHARDS].0
    }

    /// Registers a connection of the socket known as `listen` (as configured, and as bound)
    /// with a send queue of `capacity` writes.
    pub fn open(
        &self,
        id: u64,
        listen: [Arc<str>; 2],
        framing: &Framing,
        capacity: usize,
    ) -> Queues {
        let (data_tx, data) = async_channel::unbounded();
        let (close_tx, close) = async_channel::bounded(1);
        let handle = Handle {
            listen,
            framing: framing.clone(),
            data: data_tx,
            capacity: capacity.max(1),
            close: close_tx,
            closing: AtomicBool::new(false),
        };
        if let Ok(mut map) = self.shard(id).write() {
            map.insert(id, handle);
        }
        Queues { data, close }
    }

    /// Forgets a connection.
    pub fn remove(&self, id: u64) {
        if let Ok(mut map) = self.shard(id).write() {
            map.remove(&id);
        }
    }

    /// Queues `data` to connection `id`, framed for its socket.
    pub fn send(&self, id: u64, data: &[u8]) -> Result<(), HostError> {
        let map = self.shard(id).read().map_err(|_| HostError::NotFound)?;
        let handle = map.get(&id).ok_or(HostError::NotFound)?;
        if handle.closing.load(Ordering::Relaxed) {
            return Err(HostError::Closed);
        }
        let framed = framing::encode(&handle.framing, data).ok_or(HostError::ValueTooLong)?;
        if handle.data.len() >= handle.capacity {
            // A reader this slow would cost unbounded memory: close it.
            handle.closing.store(true, Ordering::Relaxed);
            let _ = handle.close.try_send(Close::QueueFull);
            return Err(HostError::QueueFull);
        }
        handle.data.try_send(framed).map_err(|_| HostError::Closed)
    }

    /// Asks connection `id` to close (after what is queued to it).
    pub fn close(&self, id: u64, why: Close) -> Result<(), HostError> {
        let map = self.shard(id).read().map_err(|_| HostError::NotFound)?;
        let handle = map.get(&id).ok_or(HostError::NotFound)?;
        if handle.closing.swap(true, Ordering::Relaxed) {
            return Err(HostError::Closed);
        }
        let _ = handle.close.try_send(why);
        Ok(())
    }

    /// Ids of the connections of the socket known as `listen` (as configured or as bound;
    /// empty: every socket).
    pub fn connections(&self, listen: &str) -> Vec<u64> {
        let mut ids = Vec::new();
        for shard in self.shards.iter() {
            let Ok(map) = shard.0.read() else { continue };
            let of = |h: &Handle| listen.is_empty() || h.listen.iter().any(|l| &**l == listen);
            ids.extend(map.iter().filter(|(_, h)| of(h)).map(|(id, _)| *id));
        }
        ids
    }

    /// Ids of the connections of worker `worker`.
    pub fn of_worker(&self, worker: u32) -> Vec<u64> {
        let map = self.shard((worker as u64) << 48).read();
        map.map(|m| {
            m.keys()
                .filter(|id| (*id >> 48) as u32 == worker)
                .copied()
                .collect()
        })
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_frames_and_overflow_closes() {
        let s = Sockets::default();
        let framing = Framing::Length {
            header: crate::config::LengthHeader::U8,
            offset: 0,
            adjust: 0,
        };
        let names = ["127.0.0.1:0".into(), "127.0.0.1:4000".into()];
        let q = s.open(1, names, &framing, 1);
        assert_eq!(s.send(1, b"ab"), Ok(()));
        assert_eq!(q.data.try_recv().unwrap(), b"\x02ab");
        assert_eq!(s.send(1, &[0; 300]), Err(HostError::ValueTooLong));
        assert_eq!(s.send(1, b"x"), Ok(()));
        assert_eq!(s.send(1, b"y"), Err(HostError::QueueFull));
        assert_eq!(q.close.try_recv(), Ok(Close::QueueFull));
        assert_eq!(s.send(1, b"z"), Err(HostError::Closed));
        assert_eq!(s.send(2, b"z"), Err(HostError::NotFound));
        assert_eq!(s.of_worker(0), [1]);
        assert_eq!(s.connections("127.0.0.1:4000"), [1]);
        assert_eq!(s.connections("127.0.0.1:0"), [1]);
        assert_eq!(s.connections(""), [1]);
        assert!(s.connections("127.0.0.1:4001").is_empty());
        s.remove(1);
        assert!(s.of_worker(0).is_empty());
    }
}
