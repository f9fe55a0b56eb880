//! A connection's mailbox: what other threads queue to it, the one waker of its task, and
//! the writes another thread makes for it while its worker sleeps.
//!
//! A push wakes the task only if it waits and nobody woke it since, so a burst of pushes
//! costs one wake-up and the task takes the whole burst at once. A thread that queues during
//! a burst of messages ([`HoldWakes`]) wakes the tasks when the burst ends; a task whose
//! worker is asleep in that moment is not woken at all: the thread writes what is queued to
//! its socket itself, so a broadcast reaches a sleeping worker's connections without a
//! wake-up of that worker (and without waiting for the scheduler to run it).

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    os::fd::RawFd,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll, Waker},
};

use super::registry::Outgoing;
use crate::runtime::reactor::Pulse;

/// A close request: code and reason.
pub type CloseRequest = (u16, String);

/// What other threads queue to one connection.
#[derive(Debug, Default)]
pub struct Mailbox {
    state: Mutex<Mail>,
    /// Messages queued, readable without the lock (a direct push needs it to be 0).
    len: AtomicUsize,
    /// A close request waits, readable without the lock (checked every loop turn).
    control: AtomicBool,
}

#[derive(Debug, Default)]
struct Mail {
    queue: VecDeque<Outgoing>,
    control: Option<CloseRequest>,
    /// The task's waker while it waits and has not been woken.
    waker: Option<Waker>,
    /// The task waits with nothing of its own to write.
    idle: bool,
    /// The socket and the pulse of the worker that owns it, while other threads may write
    /// to it for the task ([`Lent`]).
    lent: Option<(RawFd, Arc<Pulse>)>,
}

thread_local! {
    /// Whether this thread holds wake-ups back ([`HoldWakes`]), and those it holds.
    static HOLDING: Cell<bool> = const { Cell::new(false) };
    static HELD: RefCell<Vec<(Waker, Arc<Mailbox>)>> = const { RefCell::new(Vec::new()) };
    /// Frames gathered for one write made for another worker's connection.
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Mail> {
        // A panic while holding the lock leaves the queue consistent: go on with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `message`, waking the task if it waits.
    pub(super) fn put(self: &Arc<Self>, message: Outgoing) {
        let mut mail = self.lock();
        mail.queue.push_back(message);
        self.len.store(mail.queue.len(), Ordering::Release);
        let waker = mail.waker.take();
        drop(mail);
        if let Some(w) = waker {
            self.wake(w);
        }
    }

    /// Asks the task to close, unless it was asked already.
    pub(super) fn request_close(self: &Arc<Self>, request: CloseRequest) {
        let mut mail = self.lock();
        if mail.control.is_some() {
            return;
        }
        mail.control = Some(request);
        self.control.store(true, Ordering::Release);
        let waker = mail.waker.take();
        drop(mail);
        if let Some(w) = waker {
            self.wake(w);
        }
    }

    /// Wakes the task now, or when this thread's [`HoldWakes`] ends.
    fn wake(self: &Arc<Self>, waker: Waker) {
        if HOLDING.with(Cell::get) {
            HELD.with(|h| h.borrow_mut().push((waker, self.clone())));
        } else {
            waker.wake();
        }
    }

    /// Messages queued.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether no message is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether nothing is queued and no close request waits.
    pub fn is_idle(&self) -> bool {
        self.is_empty() && !self.control.load(Ordering::Acquire)
    }

    /// Takes the close request, if one waits.
    pub fn take_control(&self) -> Option<CloseRequest> {
        if !self.control.load(Ordering::Acquire) {
            return None;
        }
        let mut mail = self.lock();
        self.control.store(false, Ordering::Release);
        mail.control.take()
    }

    /// Moves up to `max` queued messages to the end of `into`, with one lock.
    pub fn take(&self, into: &mut Vec<Outgoing>, max: usize) {
        if self.is_empty() {
            return;
        }
        let mut mail = self.lock();
        let n = mail.queue.len().min(max);
        into.extend(mail.queue.drain(..n));
        self.len.store(mail.queue.len(), Ordering::Release);
    }

    /// Ready when a message or a close request waits (`control_only`: a close request);
    /// else keeps the task's waker for the next push. Waiting for anything means the task
    /// has nothing to write: other threads may write for it until [`Mailbox::busy`].
    pub fn poll_ready(&self, cx: &mut Context<'_>, control_only: bool) -> Poll<()> {
        let mut mail = self.lock();
        if mail.control.is_some() || (!control_only && !mail.queue.is_empty()) {
            return Poll::Ready(());
        }
        match &mail.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => mail.waker = Some(cx.waker().clone()),
        }
        mail.idle |= !control_only;
        Poll::Pending
    }

    /// The task runs again and may write: no other thread writes for it from now on (one
    /// that is writing finishes first).
    pub fn busy(&self) {
        self.lock().idle = false;
    }

    /// Lets other threads write to `fd`, owned by the worker of `pulse`, for the task while
    /// it waits with nothing to write, until the returned guard is dropped (before `fd`
    /// closes). Only for a connection whose messages go out as they are framed (no
    /// compression).
    pub fn lend(&self, fd: RawFd, pulse: Arc<Pulse>) -> Lent<'_> {
        self.lock().lent = Some((fd, pulse));
        Lent(self)
    }

    /// Writes what is queued for the task that `waker` would wake, if its worker is asleep
    /// and it waits with nothing else to write: then it stays asleep (`None`). Else, or
    /// when the socket does not take it all, gives the waker back to wake the task.
    fn write_for(&self, waker: Waker) -> Option<Waker> {
        let mut mail = self.lock();
        let fd = match &mail.lent {
            Some((fd, owner)) if owner.waiting() => *fd,
            _ => return Some(waker),
        };
        if !mail.idle || mail.control.is_some() || mail.waker.is_some() {
            return Some(waker);
        }
        GATHER.with(|gather| {
            let mut out = gather.borrow_mut();
            out.clear();
            for m in &mail.queue {
                out.extend_from_slice(m.frame());
            }
            let sent = if out.is_empty() { 0 } else { send(fd, &out) };
            let woken = if sent == out.len() {
                mail.queue.clear();
                mail.waker = Some(waker);
                None
            } else {
                // What the socket did not take goes first when the task writes.
                let rest = Outgoing::raw(&out[sent..]);
                mail.queue.clear();
                mail.queue.push_back(rest);
                Some(waker)
            };
            self.len.store(mail.queue.len(), Ordering::Release);
            if out.capacity() > 64 << 10 {
                *out = Vec::new();
            }
            woken
        })
    }
}

/// `send(2)` without blocking; the bytes it took (0 on any error: the task finds it).
fn send(fd: RawFd, buf: &[u8]) -> usize {
    // SAFETY: `buf` is valid for `buf.len()` bytes; `fd` is open while it is lent (`Lent`
    // takes it back before the socket closes, under the lock the caller holds).
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).unwrap_or(0)
}

/// A socket lent to other threads ([`Mailbox::lend`]); dropping it takes it back.
#[derive(Debug)]
pub struct Lent<'a>(&'a Mailbox);

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let mut mail = self.0.lock();
        mail.lent = None;
        mail.idle = false;
    }
}

/// Holds back the wake-ups of the connections this thread queues to, until it is dropped: a
/// connection's task then finds all that a burst of messages queued to it (a fan-out of
/// several broadcasts goes out in one write per receiver), and a connection whose worker
/// sleeps gets it written by this thread. Must not be held across an await.
#[derive(Debug)]
pub struct HoldWakes(());

impl HoldWakes {
    /// Starts holding (a nested hold ends with the outer one).
    pub fn new() -> Option<HoldWakes> {
        (!HOLDING.with(|h| h.replace(true))).then(|| HoldWakes(()))
    }
}

impl Drop for HoldWakes {
    fn drop(&mut self) {
        HOLDING.with(|h| h.set(false));
        let mut held = HELD.with(|h| std::mem::take(&mut *h.borrow_mut()));
        for (waker, mailbox) in held.drain(..) {
            if let Some(w) = mailbox.write_for(waker) {
                w.wake();
            }
        }
        // Keep the capacity for the next burst.
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if h.capacity() == 0 {
                *h = held;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read,
        os::{fd::AsRawFd, unix::net::UnixStream},
        sync::atomic::AtomicUsize,
    };

    use plughost_plugin_api::Message;

    use super::*;
    use crate::ws::registry::Connections;

    /// Counts its wake-ups.
    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn what_a_hold_queued_for_a_sleeping_worker_is_written_by_the_holder() {
        let (ours, mut client) = UnixStream::pair().unwrap();
        client.set_nonblocking(true).unwrap();
        let pulse = Arc::new(Pulse::for_test(-1));
        let c = Connections::default();
        let m = c.open(1, "/chat", 100);
        let lent = m.lend(ours.as_raw_fd(), pulse.clone());
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(m.poll_ready(&mut cx, false).is_pending());

        // Its worker sleeps: the two messages go out in one write, and nobody is woken.
        pulse.set_for_test(1, true);
        let hold = HoldWakes::new().expect("not holding yet");
        c.push(1, &Message::text("a")).unwrap();
        c.push(1, &Message::text("b")).unwrap();
        drop(hold);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        assert_eq!(m.len(), 0);
        let mut got = [0; 16];
        let n = client.read(&mut got).unwrap();
        assert_eq!(&got[..n], b"\x81\x01a\x81\x01b");

        // The task's waker is still there for the next push.
        c.push(1, &Message::text("c")).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(m.poll_ready(&mut cx, false).is_ready());
        let mut taken = Vec::new();
        m.take(&mut taken, 64);
        assert_eq!(taken[0].payload(), b"c");

        // Its worker is awake, or the task is busy: the task is woken and writes itself.
        for (waiting, busy) in [(false, false), (true, true)] {
            assert!(m.poll_ready(&mut cx, false).is_pending());
            if busy {
                m.busy();
            }
            pulse.set_for_test(2, waiting);
            let before = count.0.load(Ordering::SeqCst);
            let hold = HoldWakes::new().expect("not holding yet");
            c.push(1, &Message::text("d")).unwrap();
            drop(hold);
            assert_eq!(count.0.load(Ordering::SeqCst), before + 1);
            assert_eq!(m.len(), 1);
            m.take(&mut taken, 64);
        }
        assert!(client.read(&mut got).is_err(), "nothing more was written");

        // Taken back: never written for it again.
        drop(lent);
        pulse.set_for_test(3, true);
        assert!(m.poll_ready(&mut cx, false).is_pending());
        let hold = HoldWakes::new().expect("not holding yet");
        c.push(1, &Message::text("e")).unwrap();
        drop(hold);
        assert_eq!(m.len(), 1);
    }
}
