//! Deferred responses as the host keeps them: a registry of open ones by token, each a
//! channel from whatever thread completes or streams it to the connection task that waits
//! for it. The response is host memory, reached through `HostFfi`, so it does not depend on
//! the plugin library that deferred it (a hot reload may replace that meanwhile).
//!
//! A worker arms its thread for one request before it runs the plugins ([`arm`]); a
//! `host.defer` during that call registers the response and leaves its [`Waiting`] end in
//! the arming, which the connection loop takes afterwards. The registry entry lives exactly
//! as long as that end: when the connection stops waiting (answered, timed out, the client
//! left), every handle reports `Closed`.

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use plughost_plugin_api::{abi::DeferOp, HostError, Response};

/// What reaches the waiting connection.
#[derive(Debug)]
pub enum Event {
    /// The whole response.
    Complete(Parts),
    /// The status and headers of a stream, and its first bytes (maybe none).
    Start(Parts),
    /// More of the stream.
    Chunk(Vec<u8>),
    /// The stream (or an empty `200`) is done.
    Finish,
    /// The handle went away unfinished: `500`, or a stream cut short.
    Dropped,
    /// The stream's chunks queued up past [`MAX_QUEUED`] bytes: the client reads too slowly.
    Overflow,
}

/// The most bytes of a stream's chunks queued for a connection that has not written them
/// yet; past it the client is taken to be too slow, the connection closes and the writer gets
/// `Closed` (as a WebSocket's `send_queue`).
pub const MAX_QUEUED: usize = 8 << 20;

/// A response as a plugin left it, copied out of the plugin's `Response`.
#[derive(Debug, Default)]
pub struct Parts {
    /// The status code.
    pub status: u16,
    /// The header lines, `name: value\r\n` each.
    pub head: Vec<u8>,
    /// The body (or the first chunk).
    pub body: Vec<u8>,
}

impl Parts {
    fn of(resp: &Response) -> Parts {
        Parts {
            status: resp.status(),
            head: resp.head_bytes().to_vec(),
            body: resp.body().to_vec(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Waiting,
    Streaming,
    Done,
}

#[derive(Debug)]
struct Entry {
    tx: async_channel::Sender<Event>,
    stage: Mutex<Stage>,
    /// Bytes of chunks sent and not taken by the connection yet.
    queued: Arc<AtomicUsize>,
}

/// Every open deferred response, by token.
#[derive(Debug, Default)]
pub struct Deferrals {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Entry>>>,
    /// How the ones that ended ended, for `info`.
    ended: [AtomicU64; 5],
}

/// How a deferred response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Completed, or a stream finished.
    Answered,
    /// Not answered in time (504), or a stream silent too long (cut).
    TimedOut,
    /// Its handle was dropped unfinished (500, or a stream cut short).
    Dropped,
    /// The client went away first.
    ClientGone,
    /// A stop came first (503, or a stream ended).
    Stopped,
}

impl Deferrals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many deferred responses are open now.
    pub fn open(&self) -> usize {
        self.lock().len()
    }

    /// The `info` line: how many are open, and how the others ended.
    pub fn info(&self) -> String {
        let n = |e: Ended| self.ended[e as usize].load(Ordering::Relaxed);
        format!(
            "deferred responses: {} open, {} answered, {} timed out, {} dropped unfinished, {} clients gone, {} cut by a stop",
            self.open(),
            n(Ended::Answered),
            n(Ended::TimedOut),
            n(Ended::Dropped),
            n(Ended::ClientGone),
            n(Ended::Stopped)
        )
    }

    /// `host.defer(conn)` on this thread: registers a response for the armed request.
    pub fn defer(self: &Arc<Self>, conn: u64) -> Result<u64, HostError> {
        ARMED.with(|armed| {
            let mut armed = armed.borrow_mut();
            let Some(a) = armed.as_mut().filter(|a| a.conn == conn) else {
                return Err(HostError::NotEnabled);
            };
            if let Some(w) = &a.waiting {
                // Deferred twice in one request: the same response.
                return Ok(w.token);
            }
            let token = self.next.fetch_add(1, Ordering::Relaxed) + 1;
            let (tx, rx) = async_channel::unbounded();
            let queued = Arc::new(AtomicUsize::new(0));
            let entry = Entry {
                tx,
                stage: Mutex::new(Stage::Waiting),
                queued: queued.clone(),
            };
            self.lock().insert(token, Arc::new(entry));
            a.waiting = Some(Waiting {
                token,
                rx,
                queued,
                deferrals: self.clone(),
            });
            Ok(token)
        })
    }

    /// A handle's call on response `token`, from any thread.
    pub fn apply(&self, token: u64, op: DeferOp<'_>) -> Result<(), HostError> {
        let Some(entry) = self.lock().get(&token).cloned() else {
            return Err(HostError::Closed);
        };
        let mut stage = entry.stage.lock().unwrap_or_else(PoisonError::into_inner);
        if entry.tx.is_closed() {
            return Err(HostError::Closed);
        }
        let (event, next) = match (op, *stage) {
            (_, Stage::Done) => return Err(HostError::Closed),
            (DeferOp::Check, _) => return Ok(()),
            (DeferOp::Complete(resp), Stage::Waiting) => {
                (Event::Complete(Parts::of(resp)), Stage::Done)
            }
            (DeferOp::Start(resp), Stage::Waiting) => {
                (Event::Start(Parts::of(resp)), Stage::Streaming)
            }
            // Only before the head went out.
            (DeferOp::Complete(_) | DeferOp::Start(_), Stage::Streaming) => {
                return Err(HostError::Closed)
            }
            (DeferOp::Write(data), Stage::Waiting) => {
                let parts = Parts {
                    status: 200,
                    head: Vec::new(),
                    body: data.to_vec(),
                };
                (Event::Start(parts), Stage::Streaming)
            }
            (DeferOp::Write(data), Stage::Streaming) => {
                let queued = entry.queued.fetch_add(data.len(), Ordering::AcqRel) + data.len();
                if queued > MAX_QUEUED {
                    *stage = Stage::Done;
                    let _ = entry.tx.try_send(Event::Overflow);
                    return Err(HostError::Closed);
                }
                (Event::Chunk(data.to_vec()), Stage::Streaming)
            }
            (DeferOp::Finish, _) => (Event::Finish, Stage::Done),
            (DeferOp::Drop, _) => (Event::Dropped, Stage::Done),
        };
        entry.tx.try_send(event).map_err(|_| HostError::Closed)?;
        *stage = next;
        Ok(())
    }
}

/// The connection's end of a deferred response. Dropping it closes the response: every
/// handle's call returns `Closed` from then on.
#[derive(Debug)]
pub struct Waiting {
    token: u64,
    rx: async_channel::Receiver<Event>,
    queued: Arc<AtomicUsize>,
    deferrals: Arc<Deferrals>,
}

impl Waiting {
    /// The response's token.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The next event; `None` cannot happen while the registry holds the sender, but is
    /// taken as a dropped handle.
    pub async fn recv(&self) -> Event {
        let event = self.rx.recv().await.unwrap_or(Event::Dropped);
        self.taken(event)
    }

    /// An event already queued, if any.
    pub fn try_recv(&self) -> Option<Event> {
        self.rx.try_recv().ok().map(|e| self.taken(e))
    }

    fn taken(&self, event: Event) -> Event {
        if let Event::Chunk(data) = &event {
            self.queued.fetch_sub(data.len(), Ordering::AcqRel);
        }
        event
    }

    /// Counts how the response ended (for `info`), and closes it: every handle reports
    /// `Closed` from now on.
    pub fn end(self, how: Ended) {
        self.deferrals.ended[how as usize].fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.rx.close();
        self.deferrals.lock().remove(&self.token);
    }
}

struct Armed {
    conn: u64,
    waiting: Option<Waiting>,
}

thread_local! {
    /// The request this thread runs plugins for, and its deferred response once deferred.
    static ARMED: RefCell<Option<Armed>> = const { RefCell::new(None) };
}

/// While this lives, `host.defer` on this thread defers the request of connection `conn`.
#[derive(Debug)]
pub struct Arming(());

/// Arms this thread for the request of connection `conn` (see [`Arming::take`]).
pub fn arm(conn: u64) -> Arming {
    ARMED.with(|a| {
        *a.borrow_mut() = Some(Armed {
            conn,
            waiting: None,
        })
    });
    Arming(())
}

impl Arming {
    /// The deferred response, if the plugins deferred the request.
    pub fn take(self) -> Option<Waiting> {
        ARMED
            .with(|a| a.borrow_mut().take())
            .and_then(|a| a.waiting)
    }
}

impl Drop for Arming {
    fn drop(&mut self) {
        // `take` already emptied it, or the call is over without one: nothing is deferred.
        let left = ARMED.with(|a| a.borrow_mut().take());
        drop(left);
    }
}

/// Forgets the deferral of the request being handled on this thread (its plugin call
/// failed, so the request gets that failure's answer): handles report `Closed`.
pub fn cancel_current() {
    let dropped = ARMED.with(|a| a.borrow_mut().as_mut().and_then(|a| a.waiting.take()));
    drop(dropped);
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::std_types::RSlice;

    #[test]
    fn a_response_goes_through_its_stages_and_closes_with_its_waiting_end() {
        let d = Arc::new(Deferrals::default());
        assert_eq!(d.defer(7), Err(HostError::NotEnabled));
        let arming = arm(7);
        assert_eq!(d.defer(8), Err(HostError::NotEnabled));
        let token = d.defer(7).unwrap();
        assert_eq!(d.defer(7), Ok(token));
        let waiting = arming.take().expect("deferred");
        assert_eq!(d.open(), 1);
        let mut head = Response::new();
        head.set_header("content-type", "text/event-stream");
        d.apply(token, DeferOp::Start(&head)).unwrap();
        assert_eq!(
            d.apply(token, DeferOp::Complete(&head)),
            Err(HostError::Closed)
        );
        d.apply(token, DeferOp::Write(RSlice::from_slice(b"data: 1\n\n")))
            .unwrap();
        d.apply(token, DeferOp::Finish).unwrap();
        assert_eq!(d.apply(token, DeferOp::Check), Err(HostError::Closed));
        assert!(
            matches!(waiting.try_recv(), Some(Event::Start(p)) if p.head.starts_with(b"content-type"))
        );
        assert!(matches!(waiting.try_recv(), Some(Event::Chunk(c)) if c == b"data: 1\n\n"));
        assert!(matches!(waiting.try_recv(), Some(Event::Finish)));
        drop(waiting);
        assert_eq!(d.open(), 0);
        assert_eq!(d.apply(token, DeferOp::Drop), Err(HostError::Closed));
    }

    #[test]
    fn a_stream_queued_past_its_bound_closes() {
        let d = Arc::new(Deferrals::default());
        let arming = arm(3);
        let token = d.defer(3).unwrap();
        let waiting = arming.take().unwrap();
        d.apply(token, DeferOp::Start(&Response::new())).unwrap();
        let mb = vec![b'x'; 1 << 20];
        for _ in 0..MAX_QUEUED >> 20 {
            d.apply(token, DeferOp::Write(RSlice::from_slice(&mb)))
                .unwrap();
        }
        // Taking one out makes room for one more.
        assert!(matches!(waiting.try_recv(), Some(Event::Start(_))));
        assert!(matches!(waiting.try_recv(), Some(Event::Chunk(_))));
        d.apply(token, DeferOp::Write(RSlice::from_slice(&mb)))
            .unwrap();
        assert_eq!(
            d.apply(token, DeferOp::Write(RSlice::from_slice(b"x"))),
            Err(HostError::Closed)
        );
        let mut last = None;
        while let Some(e) = waiting.try_recv() {
            last = Some(e);
        }
        assert!(matches!(last, Some(Event::Overflow)));
    }

    #[test]
    fn a_waiting_end_gone_closes_the_handles() {
        let d = Arc::new(Deferrals::default());
        let arming = arm(1);
        let token = d.defer(1).unwrap();
        let waiting = arming.take().unwrap();
        assert_eq!(d.apply(token, DeferOp::Check), Ok(()));
        drop(waiting);
        assert_eq!(d.apply(token, DeferOp::Check), Err(HostError::Closed));
        // Not armed any more: nothing to defer.
        assert_eq!(d.defer(1), Err(HostError::NotEnabled));
    }
}
