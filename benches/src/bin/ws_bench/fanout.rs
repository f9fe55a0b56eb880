//! The fan-out client: `conns` receivers on `/ws/fanout` spread over the client threads; the
//! first connection of thread 0 is also the sender (it receives its own broadcasts too).
//!
//! Every message carries its send time (nanoseconds since a base `Instant` the threads
//! share, 20 digits) then its sequence number (zero-padded to the message size), so each
//! receiver checks the order and records the delivery latency. Flow control over the whole
//! fan-out: message `k + 1` is sent only once every receiver has message `k - window`, known
//! from a count of deliveries per message (a ring of `window + 2` counters) that the
//! receiving threads add to after each poll pass; the thread that completes a message wakes
//! the sender through an eventfd. So no connection has more than `window + 1` messages
//! queued, and a send queue overflow (a server-side close) means the server fell behind.

use std::{
    collections::BTreeMap,
    os::fd::RawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Barrier, Mutex,
    },
    time::Instant,
};

use crate::{
    client::{self, Clients, Conn, Counters, Handler},
    Result,
};

/// Latencies in nanoseconds, log-linear: 32 buckets per power of two (about 3 % wide).
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    n: u64,
}

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; (SUB * (64 - u64::from(SUB_BITS) + 1)) as usize],
            n: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros();
        let shift = e - SUB_BITS;
        (SUB * (u64::from(shift) + 1) + ((v >> shift) - SUB)) as usize
    }

    /// The smallest value of bucket `i` (saturating past the last one).
    fn lower(i: usize) -> u64 {
        let i = i as u128;
        let sub = u128::from(SUB);
        if i < sub {
            return i as u64;
        }
        let shift = i / sub - 1;
        u64::try_from((sub + i % sub) << shift).unwrap_or(u64::MAX)
    }

    pub fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.n += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
    }

    /// The `q` quantile (0..=1), the middle of its bucket; NaN when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.n == 0 {
            return f64::NAN;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = (Self::lower(i), Self::lower(i + 1));
                return (lo + hi) as f64 / 2.0;
            }
        }
        f64::NAN
    }
}

/// An eventfd, closed on drop.
struct EventFd(RawFd);

impl EventFd {
    fn new() -> Result<EventFd> {
        // SAFETY: eventfd(2) has no memory preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
        }
        Ok(EventFd(fd))
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`.
        let _ = unsafe { libc::write(self.0, (&one as *const u64).cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

#[derive(Debug, Clone)]
pub struct FanoutOpts {
    pub addr: String,
    pub path: &'static str,
    /// Receiver connections (the sender among them).
    pub conns: usize,
    pub window: u64,
    pub size: usize,
    pub binary: bool,
}

/// What the client threads of one fan-out run share.
pub struct Shared {
    base: Instant,
    /// Open receivers: what a message's delivery count must reach.
    receivers: AtomicU64,
    /// Deliveries of message `seq`, at `seq % done.len()`.
    done: Vec<AtomicU64>,
    /// Messages broadcast (written by the sender).
    sent: AtomicU64,
    /// Record latencies (the measured window).
    pub measuring: AtomicBool,
    wake: EventFd,
    /// The threads' latencies, merged when they end.
    latencies: Mutex<Histogram>,
}

impl Shared {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn latencies(&self) -> Histogram {
        self.latencies.lock().map(|h| h.clone()).unwrap_or_default()
    }

    fn slot(&self, seq: u64) -> &AtomicU64 {
        &self.done[(seq % self.done.len() as u64) as usize]
    }
}

/// The payload of message `seq` sent at `ts`: 20 digits of `ts`, then `seq` zero-padded to
/// fill `size` (at least 30) bytes.
fn payload(ts: u64, seq: u64, size: usize) -> String {
    format!("{ts:020}{seq:0w$}", w = size - 20)
}

/// (send time, sequence number) of a payload.
fn parse(data: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(data).ok()?;
    let ts = s.get(..20)?.parse().ok()?;
    let seq = s.get(20..)?.parse().ok()?;
    Some((ts, seq))
}

struct Fanout {
    o: FanoutOpts,
    shared: Arc<Shared>,
    /// Thread 0: its first connection sends.
    sender: bool,
    /// Deliveries this pass, by message, not yet added to `shared.done`.
    pass: BTreeMap<u64, u64>,
    measuring: bool,
    latencies: Histogram,
}

impl Fanout {
    /// Adds this pass's deliveries; wakes the sender if that completed a message.
    fn publish(&mut self) {
        let target = self.shared.receivers.load(Ordering::Acquire);
        let mut completed = false;
        for (seq, n) in std::mem::take(&mut self.pass) {
            let before = self.shared.slot(seq).fetch_add(n, Ordering::AcqRel);
            completed |= before < target && before + n >= target;
        }
        if completed && !self.sender {
            self.shared.wake.signal();
        }
    }

    /// Whether every open receiver has message `seq`.
    fn delivered(&self, seq: u64) -> bool {
        self.shared.slot(seq).load(Ordering::Acquire)
            >= self.shared.receivers.load(Ordering::Acquire)
    }

    /// Sends what the window allows.
    fn send_more(&mut self, conn: &mut Conn) {
        if !conn.is_alive() || self.shared.receivers.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut wrote = false;
        loop {
            let next = conn.sent;
            if next > self.o.window && !self.delivered(next - self.o.window - 1) {
                break;
            }
            // The slot's previous message (next - window - 2) is delivered everywhere.
            self.shared.slot(next).store(0, Ordering::Release);
            let ts = self.shared.base.elapsed().as_nanos() as u64;
            if conn
                .send(payload(ts, next, self.o.size), self.o.binary)
                .is_err()
            {
                break;
            }
            self.shared.sent.fetch_add(1, Ordering::Relaxed);
            wrote = true;
        }
        if wrote {
            // A failure shows in the next read.
            let _ = conn.flush();
        }
    }
}

impl Handler for Fanout {
    fn on_message(&mut self, conn: &mut Conn, data: &[u8], _stop: bool) -> Result<()> {
        match parse(data) {
            Some((ts, seq)) if seq == conn.received => {
                *self.pass.entry(seq).or_insert(0) += 1;
                if self.measuring {
                    let now = self.shared.base.elapsed().as_nanos() as u64;
                    self.latencies.record(now.saturating_sub(ts));
                }
                Ok(())
            }
            _ => Err(format!(
                "fan-out message {} of a connection came wrong or out of order",
                conn.received
            )),
        }
    }

    fn after_pass(&mut self, conns: &mut [Conn], stop: bool) {
        self.publish();
        self.measuring = self.shared.measuring.load(Ordering::Relaxed);
        if self.sender && !stop {
            if let Some(conn) = conns.first_mut() {
                self.send_more(conn);
            }
        }
    }

    fn on_fail(&mut self) {
        self.shared.receivers.fetch_sub(1, Ordering::AcqRel);
        self.shared.wake.signal();
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.sender.then_some(self.shared.wake.0)
    }
}

fn fanout_thread(
    o: FanoutOpts,
    shared: Arc<Shared>,
    sender: bool,
    ready: Arc<Barrier>,
    stop: Arc<AtomicBool>,
    c: Arc<Counters>,
) {
    let mut conns = Conn::open_many(&o.addr, o.path, o.conns, &c);
    shared
        .receivers
        .fetch_add(conns.len() as u64, Ordering::AcqRel);
    ready.wait();
    let mut h = Fanout {
        o,
        shared: shared.clone(),
        sender,
        pass: BTreeMap::new(),
        measuring: false,
        latencies: Histogram::default(),
    };
    client::poll_loop(&mut conns, &stop, &c, &mut h);
    if let Ok(mut all) = shared.latencies.lock() {
        all.merge(&h.latencies);
    }
    client::close_all(&mut conns);
}

/// Starts the fan-out clients of one run.
pub fn start(o: &FanoutOpts, threads: usize) -> Result<(Clients, Arc<Shared>)> {
    let shared = Arc::new(Shared {
        base: Instant::now(),
        receivers: AtomicU64::new(0),
        done: (0..o.window + 2).map(|_| AtomicU64::new(0)).collect(),
        sent: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
        wake: EventFd::new()?,
        latencies: Mutex::new(Histogram::default()),
    });
    let (o, s) = (o.clone(), shared.clone());
    let clients = client::spawn(threads, o.conns, move |t, conns, ready, stop, c| {
        let o = FanoutOpts { conns, ..o.clone() };
        fanout_thread(o, s.clone(), t == 0, ready, stop, c)
    })?;
    Ok((clients, shared))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        for v in [
            0,
            1,
            31,
            32,
            33,
            63,
            64,
            1000,
            123_456_789,
            u64::MAX / 2,
            u64::MAX - 1,
        ] {
            let i = Histogram::index(v);
            assert!(
                Histogram::lower(i) <= v && v < Histogram::lower(i + 1),
                "{v}"
            );
        }
        let mut h = Histogram::default();
        for v in 1..=1000 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5);
        assert!((p50 - 500_000.0).abs() < 0.04 * 500_000.0, "{p50}");
        assert_eq!(h.n, 1000);
    }

    #[test]
    fn payload_round_trip() {
        let p = payload(123_456, 7, 32);
        assert_eq!(p.len(), 32);
        assert_eq!(parse(p.as_bytes()), Some((123_456, 7)));
    }
}
