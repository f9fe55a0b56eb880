//! Taking over keep-alive connections from a stalled worker.
//!
//! A connection lives on one worker, which holds its task and buffers. While that worker is
//! stuck (in a slow handler, or preempted on a busy machine), requests that arrive on its other
//! keep-alive connections wait, even when another worker is idle. tokio steals tasks for this.
//! Here, a worker about to sleep looks at the other workers' event loops. From one that has
//! not turned for `steal_after_us`, it takes over the connections that sit between two
//! requests and already have a request readable.
//!
//! Between two requests a connection is only its socket: its buffers are empty and nothing is
//! owed. So taking it over means three steps. The taker claims it, one compare-and-swap
//! against the one its owner makes when it wakes. The taker then removes it from the owner's
//! epoll and registers it in its own. The owner's task, woken by a `Control::Released`,
//! finds the claim lost and leaves without touching the descriptor.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream},
    os::fd::{FromRawFd, RawFd},
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use super::reactor::Pulse;

const BUSY: u8 = 0;
const PARKED: u8 = 1;
const TAKEN: u8 = 2;

/// Who may use a connection's socket: its worker, or (once taken) another.
#[derive(Debug, Default)]
pub struct Claim(AtomicU8);

impl Claim {
    /// The connection waits between two requests: another worker may take it over.
    pub fn park(&self) {
        self.0.store(PARKED, Ordering::Release);
    }

    /// Its worker uses it again (to read, or to close it). False when another worker took
    /// it over: the socket is not this worker's any more.
    pub fn hold(&self) -> bool {
        match self
            .0
            .compare_exchange(PARKED, BUSY, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(now) => now != TAKEN,
        }
    }

    /// Whether another worker took the connection over.
    pub fn taken(&self) -> bool {
        self.0.load(Ordering::Acquire) == TAKEN
    }

    fn take(&self) -> bool {
        self.0
            .compare_exchange(PARKED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn parked(&self) -> bool {
        self.0.load(Ordering::Acquire) == PARKED
    }
}

#[derive(Debug)]
struct Entry {
    fd: RawFd,
    peer: SocketAddr,
    claim: Arc<Claim>,
}

/// A worker's HTTP connections as other workers see them.
///
/// A connection leaves the lobby before its descriptor closes, under the lock a taker holds,
/// so a taker only ever sees descriptors that are open and belong to the listed connection.
#[derive(Debug, Default)]
pub struct Lobby {
    pulse: OnceLock<Arc<Pulse>>,
    conns: Mutex<HashMap<u64, Entry>>,
    /// The worker's listening socket, while it accepts: connections waiting in its backlog
    /// can be accepted by another worker while this one is stuck.
    listener: Mutex<Option<RawFd>>,
}

impl Lobby {
    /// Publishes the worker's event loop, once it runs.
    pub fn set_pulse(&self, pulse: Arc<Pulse>) {
        let _ = self.pulse.set(pulse);
    }

    /// Publishes the worker's listening socket (`None` before it is closed: after that no
    /// other worker uses the descriptor).
    pub fn set_listener(&self, fd: Option<RawFd>) {
        *self.listener.lock().unwrap_or_else(|e| e.into_inner()) = fd;
    }

    /// Lists connection `id`.
    pub fn enter(&self, id: u64, fd: RawFd, peer: SocketAddr, claim: Arc<Claim>) {
        self.lock().insert(id, Entry { fd, peer, claim });
    }

    /// Unlists connection `id`; after this no other worker can take it.
    pub fn leave(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        // The map stays consistent even if a holder panicked: every change is one call.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection taken over from another worker.
#[derive(Debug)]
pub struct Taken {
    /// Its id on the worker it came from.
    pub id: u64,
    /// The socket, now owned here.
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
}

/// Scratch space for [`take_from`], kept by the caller across calls: the parked connections'
/// ids and their `pollfd`s, side by side.
#[derive(Debug, Default)]
pub struct Scratch {
    ids: Vec<u64>,
    fds: Vec<libc::pollfd>,
}

/// Takes over from `from` every parked connection with something to read (a request, or
/// the client's close).
pub fn take_from(from: &Lobby, scratch: &mut Scratch) -> Vec<Taken> {
    let mut taken = Vec::new();
    let Some(pulse) = from.pulse.get() else {
        return taken;
    };
    // Never wait for the owner: it may hold the lock while preempted.
    let Ok(mut conns) = from.conns.try_lock() else {
        return taken;
    };
    let Scratch { ids, fds } = scratch;
    ids.clear();
    fds.clear();
    for (id, e) in conns.iter().filter(|(_, e)| e.claim.parked()) {
        ids.push(*id);
        fds.push(libc::pollfd {
            fd: e.fd,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        });
    }
    if fds.is_empty() {
        return taken;
    }
    // SAFETY: poll over descriptors that stay open while we hold the lobby's lock; timeout 0.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    if n <= 0 {
        return taken;
    }
    for (id, p) in ids.iter().zip(fds.iter()) {
        if p.revents == 0 {
            continue;
        }
        let Some(entry) = conns.get(id) else { continue };
        if !entry.claim.take() {
            continue; // its worker woke up and holds it
        }
        if let Err(e) = pulse.remove(entry.fd) {
            // Left in the owner's epoll, it only wakes a task that will find it taken.
            log::debug!("taking over connection {id}: cannot remove it from its epoll: {e}");
        }
        let entry = conns.remove(id).expect("listed");
        taken.push(Taken {
            id: *id,
            // SAFETY: the claim made us the descriptor's only user; the owner's task leaves
            // without closing it (`Claim::taken`).
            stream: unsafe { TcpStream::from_raw_fd(entry.fd) },
            peer: entry.peer,
        });
    }
    taken
}

/// Accepts up to `max` connections waiting in the backlog of `from`'s listening socket (its
/// worker is stuck, so nobody else would).
pub fn accept_from(from: &Lobby, max: usize) -> Vec<(TcpStream, SocketAddr)> {
    let mut accepted = Vec::new();
    // Never wait for the owner.
    let Ok(listener) = from.listener.try_lock() else {
        return accepted;
    };
    let Some(fd) = *listener else {
        return accepted;
    };
    // SAFETY: the descriptor stays open while we hold the lock (its owner unpublishes it
    // before closing it); ManuallyDrop never closes it here. It is nonblocking.
    let l = std::mem::ManuallyDrop::new(unsafe { std::net::TcpListener::from_raw_fd(fd) });
    while accepted.len() < max {
        match super::accept(&l) {
            Ok(conn) => accepted.push(conn),
            Err(_) => break,
        }
    }
    accepted
}

/// What an idle worker knows of the others' event loops.
#[derive(Debug)]
pub struct Watch {
    peers: Vec<Option<Seen>>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The turn count last seen.
    turns: u64,
    /// When to look at that worker's connections next.
    next: Instant,
    /// Looks in a row that found nothing to take (each doubles the wait, up to 16x).
    empty: u32,
}

impl Watch {
    /// Watches `workers` workers.
    pub fn new(workers: usize) -> Watch {
        Watch {
            peers: vec![None; workers],
        }
    }

    /// Called by worker `me` about to sleep. Calls `take(i)` (which returns how many
    /// connections it took) for each worker `i` whose event loop has not turned for `after`
    /// while awake, and returns how long to sleep at most before looking again (`None`: every
    /// other worker sleeps too). While a worker stays stuck and nothing is taken, the looks
    /// back off to one per `16 * after`.
    pub fn check(
        &mut self,
        me: usize,
        lobbies: &[Arc<Lobby>],
        after: Duration,
        mut take: impl FnMut(usize) -> usize,
    ) -> Option<Duration> {
        let mut sleep: Option<Duration> = None;
        let mut now = None;
        for (i, lobby) in lobbies.iter().enumerate() {
            if i == me {
                continue;
            }
            let Some(pulse) = lobby.pulse.get() else {
                continue;
            };
            if pulse.waiting() {
                self.peers[i] = None;
                continue;
            }
            let now = *now.get_or_insert_with(Instant::now);
            let turns = pulse.turns();
            let seen = match &mut self.peers[i] {
                Some(seen) if seen.turns == turns => seen,
                slot => slot.insert(Seen {
                    turns,
                    next: now + after,
                    empty: 0,
                }),
            };
            if now >= seen.next {
                seen.empty = if take(i) > 0 {
                    0
                } else {
                    (seen.empty + 1).min(4)
                };
                seen.next = now + after * (1 << seen.empty);
            }
            let wait = seen.next - now;
            sleep = Some(sleep.map_or(wait, |s: Duration| s.min(wait)));
        }
        sleep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read, Write},
        net::TcpListener,
        os::fd::AsRawFd,
    };

    #[test]
    fn the_owner_and_a_taker_never_both_hold_a_connection() {
        let claim = Claim::default();
        claim.park();
        assert!(claim.take());
        assert!(!claim.hold(), "the owner must see it taken");
        assert!(claim.taken());

        let claim = Claim::default();
        claim.park();
        assert!(claim.hold());
        assert!(!claim.take(), "a held connection cannot be taken");
        assert!(claim.hold(), "held twice (a close while busy) stays held");
    }

    /// The owner waking and a taker race for the same parked claims, many times over, from two
    /// threads: for each claim exactly one of them wins (a claim that is not one atomic step
    /// lets both win now and then).
    #[test]
    fn an_owner_and_a_taker_racing_for_a_claim_never_both_win() {
        const N: usize = 200_000;
        let claims: Arc<Vec<Claim>> = Arc::new((0..N).map(|_| Claim::default()).collect());
        for c in claims.iter() {
            c.park();
        }
        let start = Arc::new(std::sync::Barrier::new(2));
        let race = |take: bool| {
            let (claims, start) = (claims.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                claims
                    .iter()
                    .map(|c| if take { c.take() } else { c.hold() })
                    .collect::<Vec<bool>>()
            })
        };
        let (owner, taker) = (race(false), race(true));
        let (owner, taker) = (owner.join().unwrap(), taker.join().unwrap());
        let both = (0..N).filter(|&i| owner[i] && taker[i]).count();
        let neither = (0..N).filter(|&i| !owner[i] && !taker[i]).count();
        assert_eq!((both, neither), (0, 0), "of {N} races");
        // How the claims split (both sides win some when the threads overlap, as they mostly do).
        let taken = taker.iter().filter(|&&t| t).count();
        eprintln!("{taken} of {N} claims went to the taker");
        for (i, c) in claims.iter().enumerate() {
            assert_eq!(c.taken(), taker[i]);
        }
    }

    #[test]
    fn only_parked_connections_with_a_request_waiting_are_taken() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let quiet = TcpStream::connect(addr).unwrap();
        let (quiet_s, quiet_peer) = listener.accept().unwrap();
        let mut asking = TcpStream::connect(addr).unwrap();
        let (asking_s, asking_peer) = listener.accept().unwrap();
        let mut busy = TcpStream::connect(addr).unwrap();
        let (busy_s, busy_peer) = listener.accept().unwrap();

        let lobby = Lobby::default();
        // An epoll of its own stands for the owner's reactor.
        // SAFETY: creating an epoll descriptor.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epfd >= 0);
        lobby.set_pulse(Arc::new(Pulse::for_test(epfd)));
        let claims: Vec<Arc<Claim>> = (0..3).map(|_| Arc::new(Claim::default())).collect();
        for (id, (s, peer)) in [
            (&quiet_s, quiet_peer),
            (&asking_s, asking_peer),
            (&busy_s, busy_peer),
        ]
        .into_iter()
        .enumerate()
        {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: id as u64,
            };
            // SAFETY: both descriptors are open.
            assert_eq!(
                unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) },
                0
            );
            lobby.enter(id as u64, s.as_raw_fd(), peer, claims[id].clone());
        }
        claims[0].park();
        claims[1].park();
        // The busy one has a request too, but its worker holds it.
        asking.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        busy.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();

        let mut scratch = Scratch::default();
        let taken = take_from(&lobby, &mut scratch);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].id, 1);
        assert_eq!(taken[0].peer, asking_peer);
        assert!(claims[1].taken() && !claims[1].hold());
        assert!(claims[0].hold() && claims[2].hold());
        // Gone from the lobby: not taken twice.
        claims[0].park();
        assert!(take_from(&lobby, &mut scratch).is_empty());

        // The taker reads the request the owner never saw; the owner's copy must not close it.
        std::mem::forget(asking_s);
        let mut stream = taken.into_iter().next().unwrap().stream;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"GET / "));
        stream.write_all(b"ok").unwrap();
        let mut got = [0u8; 2];
        asking.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ok");
        drop((quiet_s, busy_s, quiet));
        // SAFETY: closing the epoll we created.
        unsafe { libc::close(epfd) };
    }

    #[test]
    fn a_worker_is_stalled_only_while_awake_and_not_turning() {
        let lobbies: Vec<Arc<Lobby>> = (0..2).map(|_| Arc::new(Lobby::default())).collect();
        let pulse = Arc::new(Pulse::for_test(-1));
        lobbies[1].set_pulse(pulse.clone());
        let mut watch = Watch::new(2);
        let after = Duration::from_millis(20);
        let mut took = Vec::new();

        let mut take = |i: usize| {
            took.push(i);
            0
        };

        // Asleep: nothing to watch, sleep until an event.
        pulse.set_for_test(5, true);
        assert_eq!(watch.check(0, &lobbies, after, &mut take), None);
        // Awake: look again within `after`.
        pulse.set_for_test(5, false);
        let wait = watch.check(0, &lobbies, after, &mut take).unwrap();
        assert!(wait <= after);
        // Turning: never stalled.
        for t in 6..9 {
            pulse.set_for_test(t, false);
            watch.check(0, &lobbies, after, &mut take);
        }
        // Standing still for `after`: stalled.
        std::thread::sleep(after);
        let wait = watch.check(0, &lobbies, after, &mut take).unwrap();
        assert_eq!(took, vec![1]);
        // Nothing was taken: the next look waits twice as long.
        assert!(wait > after && wait <= 2 * after, "{wait:?}");
    }
}
