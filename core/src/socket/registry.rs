//! The socket connections of every worker, by global id, so that any thread can send to
//! any of them: bytes go into the connection's bounded send queue (framed for a `Length`
//! socket on the sender's thread), and the task that owns the connection writes them out.
//! The same pattern as `ws::registry`.

use std::{
    cell::RefCell,
    collections::HashMap,
    os::fd::RawFd,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
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
    /// Bytes in `data`.
    queued: Arc<AtomicUsize>,
    close: async_channel::Sender<Close>,
    closing: AtomicBool,
    /// The connection's socket, shut down when its queue overflows: a write stuck on a
    /// peer that does not read fails at once. Open while the handle is registered (the
    /// connection unregisters before it closes the socket).
    fd: RawFd,
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
    data: async_channel::Receiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    /// A close request.
    pub close: async_channel::Receiver<Close>,
}

impl Queues {
    /// The next bytes to write, once there are some; `None` when the registry let go.
    pub async fn recv(&self) -> Option<Vec<u8>> {
        let bytes = self.data.recv().await.ok()?;
        self.queued.fetch_sub(bytes.len(), Ordering::Relaxed);
        Some(bytes)
    }

    /// The next bytes to write, if any are queued now.
    pub fn try_recv(&self) -> Option<Vec<u8>> {
        let bytes = self.data.try_recv().ok()?;
        self.queued.fetch_sub(bytes.len(), Ordering::Relaxed);
        Some(bytes)
    }
}

/// Bytes queued to one connection before it counts as a slow reader and is closed (beside
/// the count of writes, `send_queue`); one write larger than this still fits an empty queue.
pub const SEND_QUEUE_BYTES: usize = 16 << 20;

const SHARDS: usize = 64;

/// Hashes connection ids (a worker id and a counter, never chosen by a client) with one
/// multiplication instead of SipHash: a lookup per send.
#[derive(Debug, Default, Clone, Copy)]
struct Ids;

impl std::hash::BuildHasher for Ids {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Debug)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | *b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, id: u64) {
        self.0 = (id ^ id >> 29).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

thread_local! {
    /// The connection whose frames this thread is handing to its handler, and what was sent
    /// to it meanwhile (see [`Direct`]).
    static SERVING: RefCell<Option<(u64, Vec<u8>, usize)>> = const { RefCell::new(None) };
}

/// While this lives, a send from this thread to connection `id` (its handler answering)
/// goes straight into an output buffer that the connection writes after the handler
/// returns: no queue, no wake-up. Only while nothing is queued to it ahead (order holds),
/// and for at most `capacity` sends (past that the queue takes them, and closes a runaway).
pub struct Direct(());

impl Direct {
    /// Starts collecting direct sends to `id` into `out` (appended to).
    pub fn enter(id: u64, out: Vec<u8>) -> Direct {
        SERVING.with(|s| *s.borrow_mut() = Some((id, out, 0)));
        Direct(())
    }

    /// Stops, and gives back the buffer.
    pub fn finish(self) -> Vec<u8> {
        SERVING
            .with(|s| s.borrow_mut().take())
            .map(|(_, out, _)| out)
            .unwrap_or_default()
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        SERVING.with(|s| s.borrow_mut().take());
    }
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(RwLock<HashMap<u64, Handle, Ids>>);

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
    fn shard(&self, id: u64) -> &RwLock<HashMap<u64, Handle, Ids>> {
        // The worker id is in the high 16 bits of a connection id.
        &self.shards[(id >> 48) as usize % SHARDS].0
    }

    /// Registers a connection of the socket known as `listen` (as configured, and as bound)
    /// with a send queue of `capacity` writes; `fd` is its socket.
    pub fn open(
        &self,
        (id, fd): (u64, RawFd),
        listen: [Arc<str>; 2],
        framing: &Framing,
        capacity: usize,
    ) -> Queues {
        let (data_tx, data) = async_channel::unbounded();
        let (close_tx, close) = async_channel::bounded(1);
        let queued = Arc::new(AtomicUsize::new(0));
        let handle = Handle {
            listen,
            framing: framing.clone(),
            data: data_tx,
            capacity: capacity.max(1),
            queued: queued.clone(),
            close: close_tx,
            closing: AtomicBool::new(false),
            fd,
        };
        if let Ok(mut map) = self.shard(id).write() {
            map.insert(id, handle);
        }
        Queues {
            data,
            queued,
            close,
        }
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
        let direct = SERVING.with(|s| {
            let mut s = s.try_borrow_mut().ok()?;
            let (serving, out, count) = s.as_mut()?;
            if *serving != id || *count >= handle.capacity || !handle.data.is_empty() {
                return None;
            }
            *count += 1;
            Some(framing::encode_into(&handle.framing, data, out))
        });
        match direct {
            Some(true) => return Ok(()),
            Some(false) => return Err(HostError::ValueTooLong),
            None => {}
        }
        let framed = framing::encode(&handle.framing, data).ok_or(HostError::ValueTooLong)?;
        let queued = handle.queued.load(Ordering::Relaxed);
        let over_bytes = queued > 0 && queued + framed.len() > SEND_QUEUE_BYTES;
        if handle.data.len() >= handle.capacity || over_bytes {
            // A reader this slow would cost unbounded memory: close it, and fail the write
            // it may be stuck in.
            handle.closing.store(true, Ordering::Relaxed);
            let _ = handle.close.try_send(Close::QueueFull);
            // SAFETY: the descriptor is open while the handle is registered (see `fd`), and
            // we hold the shard's lock, so the handle cannot go meanwhile.
            unsafe { libc::shutdown(handle.fd, libc::SHUT_RDWR) };
            return Err(HostError::QueueFull);
        }
        handle.queued.fetch_add(framed.len(), Ordering::Relaxed);
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
        let q = s.open((1, -1), names, &framing, 1);
        assert_eq!(s.send(1, b"ab"), Ok(()));
        assert_eq!(q.try_recv().unwrap(), b"\x02ab");
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
