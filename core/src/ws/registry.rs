//! The WebSocket connections of every worker, by global id, so that any thread can push to
//! any connection: a push goes into the connection's bounded send queue (its
//! [`Mailbox`](super::mailbox::Mailbox)), and the task that owns the connection, on its
//! worker's executor, writes it out.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
};

use plughost_plugin_api::{HostError, Message, MessageKind};

use super::{
    frame::{self, Kind},
    mailbox::Mailbox,
};

/// A message queued to a connection, framed once: a broadcast shares the one frame among
/// all its receivers (those that compress it build their own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Text or binary.
    pub kind: Kind,
    /// The uncompressed frame: header, then payload.
    frame: Arc<[u8]>,
    header: usize,
}

impl Outgoing {
    /// Frames `payload` (UTF-8 for text).
    pub fn new(kind: Kind, payload: &[u8]) -> Outgoing {
        let mut framed = Vec::with_capacity(payload.len() + 10);
        frame::message(&mut framed, kind, false, payload);
        Outgoing {
            kind,
            header: framed.len() - payload.len(),
            frame: framed.into(),
        }
    }

    /// Bytes already framed (the part of a write the socket did not take): written as they
    /// are.
    pub(super) fn raw(bytes: &[u8]) -> Outgoing {
        Outgoing {
            kind: Kind::Binary,
            frame: bytes.into(),
            header: 0,
        }
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.frame[self.header..]
    }

    /// The whole uncompressed frame.
    pub fn frame(&self) -> &[u8] {
        &self.frame
    }
}

/// The handle other threads hold to one connection.
#[derive(Debug)]
pub struct Handle {
    /// The route path the connection was opened on.
    pub route: String,
    /// Unbounded, so an idle connection holds no queue memory; `capacity` bounds it.
    mailbox: Arc<Mailbox>,
    capacity: usize,
    closing: AtomicBool,
}

/// Shards of the registry: one per worker id (mod this), each on its own cache line, so a
/// worker pushing to its own connections never contends with another worker.
const SHARDS: usize = 64;

#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(RwLock<HashMap<u64, Handle>>);

/// Every open WebSocket connection.
#[derive(Debug)]
pub struct Connections {
    shards: Box<[Shard]>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

/// Converts a plugin's message into one to send; text that is not UTF-8 is refused.
pub fn to_ws(message: &Message<'_>) -> Result<Outgoing, HostError> {
    Ok(Outgoing::new(kind_of(message)?, message.data.as_slice()))
}

/// A plugin's message's kind; text that is not UTF-8 is refused.
pub fn kind_of(message: &Message<'_>) -> Result<Kind, HostError> {
    match message.kind {
        MessageKind::Text if std::str::from_utf8(message.data.as_slice()).is_err() => {
            Err(HostError::NotFound)
        }
        MessageKind::Text => Ok(Kind::Text),
        MessageKind::Binary => Ok(Kind::Binary),
    }
}

impl Connections {
    fn shard(&self, id: u64) -> &RwLock<HashMap<u64, Handle>> {
        // The worker id is in the high 16 bits of a connection id.
        &self.shards[(id >> 48) as usize % SHARDS].0
    }

    /// Registers a connection with a send queue of `capacity` messages; returns its mailbox.
    pub fn open(&self, id: u64, route: &str, capacity: usize) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox::default());
        let handle = Handle {
            route: route.to_owned(),
            mailbox: mailbox.clone(),
            capacity: capacity.max(1),
            closing: AtomicBool::new(false),
        };
        if let Ok(mut map) = self.shard(id).write() {
            map.insert(id, handle);
        }
        mailbox
    }

    /// Forgets a connection.
    pub fn remove(&self, id: u64) {
        if let Ok(mut map) = self.shard(id).write() {
            map.remove(&id);
        }
    }

    /// Open connections.
    pub fn count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.read().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    fn queue(handle: &Handle, message: Outgoing) -> Result<(), HostError> {
        if handle.closing.load(Ordering::Relaxed) {
            return Err(HostError::Closed);
        }
        if handle.mailbox.len() >= handle.capacity {
            // A reader this slow would cost unbounded memory: close it.
            handle.closing.store(true, Ordering::Relaxed);
            handle
                .mailbox
                .request_close((1008, "send queue full: the client reads too slowly".into()));
            return Err(HostError::QueueFull);
        }
        handle.mailbox.put(message);
        Ok(())
    }

    /// Sends `message` to connection `id`: straight into its outbox when it is the
    /// connection whose event this thread is delivering, else through its queue.
    pub fn push(&self, id: u64, message: &Message<'_>) -> Result<(), HostError> {
        if let Some(pushed) = super::conn::push_direct(id, message) {
            return pushed;
        }
        let message = to_ws(message)?;
        let map = self.shard(id).read().map_err(|_| HostError::NotFound)?;
        let handle = map.get(&id).ok_or(HostError::NotFound)?;
        Self::queue(handle, message)
    }

    /// Queues `message` to every connection on `route` (empty: all) but `except`.
    pub fn broadcast(&self, message: &Message<'_>, route: &str, except: u64) -> u64 {
        let Ok(message) = to_ws(message) else {
            return 0;
        };
        let mut reached = 0;
        for shard in self.shards.iter() {
            let Ok(map) = shard.0.read() else { continue };
            reached += map
                .iter()
                .filter(|(id, h)| **id != except && (route.is_empty() || h.route == route))
                .filter(|(_, h)| Self::queue(h, message.clone()).is_ok())
                .count() as u64;
        }
        reached
    }

    /// Asks connection `id` to close.
    pub fn close(&self, id: u64, code: u16, reason: &str) -> Result<(), HostError> {
        let map = self.shard(id).read().map_err(|_| HostError::NotFound)?;
        let handle = map.get(&id).ok_or(HostError::NotFound)?;
        if handle.closing.swap(true, Ordering::Relaxed) {
            return Err(HostError::Closed);
        }
        handle.mailbox.request_close((code, reason.to_owned()));
        Ok(())
    }

    /// Whether `id` is an open connection that is not closing.
    pub fn is_established(&self, id: u64) -> bool {
        self.shard(id)
            .read()
            .ok()
            .and_then(|m| m.get(&id).map(|h| !h.closing.load(Ordering::Relaxed)))
            .unwrap_or(false)
    }

    /// Per worker (by id, `workers` of them): its open connections and the messages queued
    /// to them, for `info`.
    pub fn per_worker(&self, workers: usize) -> Vec<(u64, u64)> {
        let mut out = vec![(0, 0); workers];
        for shard in self.shards.iter() {
            let Ok(map) = shard.0.read() else { continue };
            for (id, h) in map.iter() {
                if let Some(w) = out.get_mut((id >> 48) as usize) {
                    w.0 += 1;
                    w.1 += h.mailbox.len() as u64;
                }
            }
        }
        out
    }

    /// Ids on `route` (empty: all), in no particular order.
    pub fn ids(&self, route: &str) -> Vec<u64> {
        let mut ids = Vec::new();
        for shard in self.shards.iter() {
            if let Ok(m) = shard.0.read() {
                ids.extend(
                    m.iter()
                        .filter(|(_, h)| route.is_empty() || h.route == route)
                        .map(|(id, _)| *id),
                );
            }
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::AtomicUsize,
        task::{Context, Waker},
    };

    use super::super::mailbox::HoldWakes;
    use super::*;

    #[test]
    fn push_broadcast_and_overflow() {
        let c = Connections::default();
        let a = c.open(1, "/chat", 2);
        let _b = c.open(2, "/chat", 2);
        let _other = c.open(3, "/other", 2);
        assert_eq!(c.push(1, &Message::text("hi")), Ok(()));
        assert_eq!(c.push(9, &Message::text("hi")), Err(HostError::NotFound));
        assert_eq!(c.broadcast(&Message::text("all"), "/chat", 2), 1);
        assert_eq!(a.len(), 2);
        // The queue of 1 is full now: the next push closes it.
        assert_eq!(c.push(1, &Message::text("x")), Err(HostError::QueueFull));
        assert!(!c.is_established(1));
        assert_eq!(a.take_control().unwrap().0, 1008);
        assert_eq!(c.push(1, &Message::text("x")), Err(HostError::Closed));
        let mut ids = c.ids("");
        ids.sort();
        assert_eq!(ids, [1, 2, 3]);
        c.remove(1);
        assert_eq!(c.count(), 2);
    }

    /// Counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn a_burst_wakes_the_task_once_and_it_takes_the_burst_in_order() {
        let c = Connections::default();
        let m = c.open(1, "/chat", 100);
        let (count, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        assert!(m.poll_ready(&mut cx, false).is_pending());
        for i in 0..5 {
            c.push(1, &Message::text(&i.to_string())).unwrap();
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(m.poll_ready(&mut cx, false).is_ready());
        let mut taken = Vec::new();
        m.take(&mut taken, 3);
        m.take(&mut taken, 64);
        let payloads: Vec<&[u8]> = taken.iter().map(|o| o.payload()).collect();
        assert_eq!(payloads, [b"0", b"1", b"2", b"3", b"4"]);
        assert!(m.is_idle());
        // Waiting for a close request only: a message does not make it ready.
        assert!(m.poll_ready(&mut cx, true).is_pending());
        c.push(1, &Message::text("x")).unwrap();
        assert!(m.poll_ready(&mut cx, true).is_pending());
        assert_eq!(c.close(1, 1000, "bye"), Ok(()));
        assert!(m.poll_ready(&mut cx, true).is_ready());
        assert_eq!(m.take_control(), Some((1000, "bye".into())));
        assert!(m.take_control().is_none());
    }

    #[test]
    fn held_wake_ups_go_out_when_the_hold_ends() {
        let c = Connections::default();
        let (a, b) = (c.open(1, "/chat", 100), c.open(2, "/chat", 100));
        let (count, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        assert!(a.poll_ready(&mut cx, false).is_pending());
        assert!(b.poll_ready(&mut cx, false).is_pending());
        let hold = HoldWakes::new().expect("not holding yet");
        assert!(
            HoldWakes::new().is_none(),
            "a nested hold ends with the outer one"
        );
        assert_eq!(c.broadcast(&Message::text("1"), "/chat", 0), 2);
        assert_eq!(c.broadcast(&Message::text("2"), "/chat", 0), 2);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        drop(hold);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert_eq!((a.len(), b.len()), (2, 2));
    }
}
