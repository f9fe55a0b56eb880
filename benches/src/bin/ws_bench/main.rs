//! The WebSocket echo benchmark: plughost (the ws-echo plugin, whose `on_message` pushes the
//! message back through the connection's send queue) against a tokio-tungstenite echo server
//! (`ws_baseline`).
//!
//! Builds the release binaries, starts both servers on 127.0.0.1 with 2 workers each, and
//! loads each in turn, interleaved over several rounds, with a client of its own: a few std
//! threads, each owning a share of the connections (tungstenite's blocking client, switched
//! to non-blocking sockets and `poll(2)` after the handshake). Every connection keeps a fixed
//! window of messages in flight: it sends the window, then one more for each echo it gets.
//! Echoes must come back in order and unchanged; anything else counts as an error.
//!
//! Reported: echo messages/s, server CPU (utime+stime from /proc/PID/stat) per message,
//! idle and loaded RSS, medians over the rounds and the ratios plughost/baseline, written to
//! `benches/WS_RESULTS.md`. Nothing is asserted.
//!
//! Usage: `cargo run --release -p plughost-benches --bin ws_bench -- [--duration SECS]
//! [--rounds N] [--conns N] [--quick]` (see `--help`).

use plughost_benches::{
    cargo, clock_ticks, cpu_ticks, load_average, machine, median, root, rss_kb, thread_ticks,
    utc_now, Server,
};

/// The WebSocket route both servers echo on.
const WS_PATH: &str = "/ws/echo";
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs, io,
    net::TcpStream,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Barrier,
    },
    thread,
    time::{Duration, Instant},
};

use tungstenite::{Error as WsError, Message, WebSocket};

const USAGE: &str = "\
usage: ws_bench [--duration SECS] [--rounds N] [--conns N] [--window N] [--size BYTES]
                [--threads N] [--binary] [--quick] [--no-build] [--out FILE]

  --duration SECS  measured length of each run (default 5)
  --rounds N       interleaved rounds of (plughost, baseline) (default 3)
  --conns N        WebSocket connections (default 64)
  --window N       messages in flight per connection (default 8)
  --size BYTES     message size, at least 20 (default 32)
  --threads N      client threads, each owning conns/threads connections (default 4)
  --binary         send binary messages (default: text)
  --quick          smoke test: 2 s runs, 1 round
  --no-build       use the binaries already in target/ (skip the cargo builds)
  --out FILE       where to write the report (default benches/WS_RESULTS.md)
";

/// Figures measured on this project's machine before this benchmark existed (the issue).
const EARLIER: &str = "tokio-tungstenite 32k msg/s at 27 µs CPU/msg; smol + async-tungstenite 29k msg/s at 34 µs CPU/msg";

/// Ramp-up after the connections are open and before the measured window starts.
const SETTLE: Duration = Duration::from_millis(500);

type Result<T> = std::result::Result<T, String>;

#[derive(Debug, Clone)]
struct Opts {
    duration: u64,
    rounds: usize,
    conns: usize,
    window: usize,
    size: usize,
    threads: usize,
    binary: bool,
    build: bool,
    out: PathBuf,
    args: Vec<String>,
}

fn parse_args() -> Result<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        duration: 5,
        rounds: 3,
        conns: 64,
        window: 8,
        size: 32,
        threads: 4,
        binary: false,
        build: true,
        out: root().join("benches/WS_RESULTS.md"),
        args: args.clone(),
    };
    let mut quick = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut number = |name: &str| -> Result<u64> {
            it.next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))?
                .parse()
                .map_err(|_| format!("{name} takes a whole number"))
        };
        match a.as_str() {
            "--duration" => o.duration = number("--duration")?,
            "--rounds" => o.rounds = number("--rounds")? as usize,
            "--conns" => o.conns = number("--conns")? as usize,
            "--window" => o.window = number("--window")? as usize,
            "--size" => o.size = number("--size")? as usize,
            "--threads" => o.threads = number("--threads")? as usize,
            "--binary" => o.binary = true,
            "--quick" => quick = true,
            "--no-build" => o.build = false,
            "--out" => {
                o.out = PathBuf::from(
                    it.next()
                        .ok_or_else(|| format!("--out needs a value\n{USAGE}"))?,
                )
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if quick {
        o.duration = 2;
        o.rounds = 1;
    }
    if o.duration == 0 || o.rounds == 0 || o.conns == 0 || o.window == 0 || o.threads == 0 {
        return Err(
            "--duration, --rounds, --conns, --window and --threads must be at least 1".into(),
        );
    }
    if o.size < 20 {
        return Err("--size must be at least 20 (the payload carries a sequence number)".into());
    }
    o.threads = o.threads.min(o.conns);
    Ok(o)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[ws_bench] {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------------
// Building

struct Binaries {
    plughost: PathBuf,
    echo: PathBuf,
    baseline: PathBuf,
}

fn build(o: &Opts) -> Result<Binaries> {
    let r = root();
    if o.build {
        cargo(&["build", "--release", "-p", "plughost", "-p", "ws-echo"])?;
        // Only the baseline of this crate: the other bench binaries are not needed here.
        cargo(&[
            "build",
            "--release",
            "-p",
            "plughost-benches",
            "--bin",
            "ws_baseline",
        ])?;
    }
    let b = Binaries {
        plughost: r.join("target/release/plughost"),
        echo: r.join("target/release/libws_echo.so"),
        baseline: r.join("target/release/ws_baseline"),
    };
    for p in [&b.plughost, &b.echo, &b.baseline] {
        if !p.exists() {
            return Err(format!(
                "{} is missing (run without --no-build)",
                p.display()
            ));
        }
    }
    Ok(b)
}

// ---------------------------------------------------------------------------------------------
// Servers

fn plughost_config(dir: &Path, echo: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let text = format!(
        r#"// Generated by benches/src/bin/ws_bench.rs.
(
    listen: "127.0.0.1:0",
    worker_num: 2,
    runtime_dir: "{run}",
    log: (level: "info"),
    plugins: {{ "ws-echo": (path: "{echo}") }},
    websocket: (
        enable: true,
        routes: [(path: "/ws/echo", handler: "ws-echo.echo")],
        max_message_size: 1048576,
        send_queue: 1024,
    ),
)
"#,
        run = dir.join("run").display(),
        echo = echo.display(),
    );
    let path = dir.join("server.ron");
    fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

fn start_plughost(bin: &Path, config: &Path) -> Result<Server> {
    let mut cmd = Command::new(bin);
    cmd.arg("start")
        .arg("-c")
        .arg(config)
        .env_remove("RUST_LOG");
    Server::start("plughost", cmd, true)
}

fn start_baseline(bin: &Path) -> Result<Server> {
    Server::start("baseline", Command::new(bin), false)
}

// ---------------------------------------------------------------------------------------------
// /proc

// ---------------------------------------------------------------------------------------------
// The client

/// One client thread's counters, on a cache line of its own.
#[repr(align(128))]
#[derive(Default)]
struct Counters {
    /// Echoes received (in order and unchanged).
    echoes: AtomicU64,
    /// Failed connects, wrong or out-of-order echoes, connections lost or closed by the server.
    errors: AtomicU64,
}

/// The payload of message `seq`: the number, zero-padded to `size` bytes.
fn payload(seq: u64, size: usize) -> String {
    format!("{seq:0size$}")
}

struct Conn {
    ws: WebSocket<TcpStream>,
    sent: u64,
    received: u64,
    /// The last flush could not write everything: wait for POLLOUT.
    pending: bool,
    alive: bool,
}

impl Conn {
    fn open(addr: &str, path: &str) -> Result<Conn> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let (ws, resp) = tungstenite::client(format!("ws://{addr}{path}"), stream)
            .map_err(|e| format!("handshake with {addr}{path}: {e}"))?;
        if resp.status().as_u16() != 101 {
            return Err(format!("handshake answered {}", resp.status()));
        }
        ws.get_ref()
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        Ok(Conn {
            ws,
            sent: 0,
            received: 0,
            pending: false,
            alive: true,
        })
    }

    /// Queues the next message (written out by `flush`).
    fn send_next(&mut self, size: usize, binary: bool) -> Result<()> {
        let text = payload(self.sent, size);
        let message = if binary {
            Message::binary(text.into_bytes())
        } else {
            Message::text(text)
        };
        self.sent += 1;
        match self.ws.write(message) {
            Ok(()) => Ok(()),
            // Queued, the socket is full: `flush` finishes it.
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.pending = true;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn flush(&mut self) -> Result<()> {
        match self.ws.flush() {
            Ok(()) => {
                self.pending = false;
                Ok(())
            }
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.pending = true;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Whether `data` is the echo of the next message this connection waits for.
    fn is_next(&self, data: &[u8]) -> bool {
        std::str::from_utf8(data)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            == Some(self.received)
    }
}

#[derive(Debug, Clone)]
struct ClientOpts {
    addr: String,
    path: &'static str,
    conns: usize,
    window: usize,
    size: usize,
    binary: bool,
}

/// One client thread: opens `o.conns` connections, waits at `ready`, then keeps every
/// connection's window full until `stop`; then closes them.
fn client_thread(o: ClientOpts, ready: Arc<Barrier>, stop: Arc<AtomicBool>, c: Arc<Counters>) {
    let mut conns = Vec::with_capacity(o.conns);
    for _ in 0..o.conns {
        match Conn::open(&o.addr, o.path) {
            Ok(conn) => conns.push(conn),
            Err(e) => {
                log(format!("client: {e}"));
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    ready.wait();
    let fail = |conn: &mut Conn, what: String| {
        if conn.alive {
            log(format!("client: {what}"));
            conn.alive = false;
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
    };
    for conn in &mut conns {
        let mut r = Ok(());
        for _ in 0..o.window {
            r = r.and_then(|()| conn.send_next(o.size, o.binary));
        }
        if let Err(e) = r.and_then(|()| conn.flush()) {
            fail(conn, format!("first send: {e}"));
        }
    }
    let mut fds: Vec<libc::pollfd> = conns
        .iter()
        .map(|conn| libc::pollfd {
            fd: conn.ws.get_ref().as_raw_fd(),
            events: 0,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        for (fd, conn) in fds.iter_mut().zip(&conns) {
            fd.events = libc::POLLIN | if conn.pending { libc::POLLOUT } else { 0 };
            fd.revents = 0;
            if !conn.alive {
                fd.fd = -1;
            }
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log(format!("client: poll: {e}"));
            c.errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        if n == 0 {
            continue;
        }
        for (fd, conn) in fds.iter().zip(conns.iter_mut()) {
            if fd.revents == 0 || !conn.alive {
                continue;
            }
            let mut got = 0;
            loop {
                match conn.ws.read() {
                    Ok(Message::Text(t)) if conn.is_next(t.as_bytes()) => got += 1,
                    Ok(Message::Binary(b)) if conn.is_next(&b) => got += 1,
                    Ok(Message::Text(_) | Message::Binary(_)) => {
                        fail(
                            conn,
                            format!(
                                "echo {} of a connection came back wrong or out of order",
                                conn.received
                            ),
                        );
                        break;
                    }
                    Ok(Message::Close(frame)) => {
                        fail(conn, format!("the server closed a connection: {frame:?}"));
                        break;
                    }
                    Ok(_) => continue,
                    Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        fail(conn, format!("read: {e}"));
                        break;
                    }
                }
                conn.received += 1;
                if !stop.load(Ordering::Relaxed) {
                    if let Err(e) = conn.send_next(o.size, o.binary) {
                        fail(conn, format!("send: {e}"));
                        break;
                    }
                }
            }
            if got > 0 {
                c.echoes.fetch_add(got, Ordering::Relaxed);
            }
            if conn.alive {
                if let Err(e) = conn.flush() {
                    fail(conn, format!("flush: {e}"));
                }
            }
        }
    }
    // Close: send every close frame first, then read what is left (the echoes still in
    // flight, then the close reply) with a timeout. Failures here are not counted.
    for conn in conns.iter_mut().filter(|c| c.alive) {
        let _ = conn.ws.get_ref().set_nonblocking(false);
        let _ = conn
            .ws
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(1)));
        let _ = conn.ws.close(None);
        let _ = conn.ws.flush();
    }
    for conn in conns.iter_mut().filter(|c| c.alive) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if conn.ws.read().is_err() {
                break;
            }
        }
    }
}

/// One measured run against one server.
#[derive(Debug, Clone, Default)]
struct Run {
    echoes: u64,
    secs: f64,
    errors: u64,
    cpu_s: f64,
    client_cpu_s: f64,
    rss_max_kb: u64,
    threads: BTreeMap<String, u64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.echoes as f64 / self.secs
    }
    fn us_per_msg(&self) -> f64 {
        if self.echoes == 0 {
            f64::NAN
        } else {
            1e6 * self.cpu_s / self.echoes as f64
        }
    }
}

fn load(o: &Opts, server: &Server, secs: f64) -> Result<Run> {
    let pid = server.pid();
    let ready = Arc::new(Barrier::new(o.threads + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let mut counters = Vec::new();
    for t in 0..o.threads {
        // Spread the connections as evenly as they go.
        let conns = o.conns / o.threads + usize::from(t < o.conns % o.threads);
        let c = Arc::new(Counters::default());
        counters.push(c.clone());
        let co = ClientOpts {
            addr: server.addr.clone(),
            path: WS_PATH,
            conns,
            window: o.window,
            size: o.size,
            binary: o.binary,
        };
        let (ready, stop) = (ready.clone(), stop.clone());
        handles.push(
            thread::Builder::new()
                .name(format!("client-{t}"))
                .spawn(move || client_thread(co, ready, stop, c))
                .map_err(|e| e.to_string())?,
        );
    }
    ready.wait();
    thread::sleep(SETTLE);
    let echoes = |counters: &[Arc<Counters>]| -> u64 {
        counters
            .iter()
            .map(|c| c.echoes.load(Ordering::Relaxed))
            .sum()
    };
    let self_pid = std::process::id();
    let (e0, cpu0, own0, threads0) = (
        echoes(&counters),
        cpu_ticks(pid),
        cpu_ticks(self_pid),
        thread_ticks(pid),
    );
    let t0 = Instant::now();
    let mut rss_max = rss_kb(pid);
    let end = t0 + Duration::from_secs_f64(secs);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        thread::sleep((end - now).min(Duration::from_millis(100)));
        rss_max = rss_max.max(rss_kb(pid));
    }
    let (e1, cpu1, own1, threads1) = (
        echoes(&counters),
        cpu_ticks(pid),
        cpu_ticks(self_pid),
        thread_ticks(pid),
    );
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let errors = counters
        .iter()
        .map(|c| c.errors.load(Ordering::Relaxed))
        .sum();
    let threads = threads1
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(*threads0.get(k).unwrap_or(&0))))
        .collect();
    Ok(Run {
        echoes: e1 - e0,
        secs: elapsed,
        errors,
        cpu_s: cpu1.saturating_sub(cpu0) as f64 / clock_ticks(),
        client_cpu_s: own1.saturating_sub(own0) as f64 / clock_ticks(),
        rss_max_kb: rss_max,
        threads,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn rustc_version() -> String {
    Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

const NAMES: [&str; 2] = ["plughost", "baseline"];

struct Report<'a> {
    o: &'a Opts,
    /// runs[server] = one Run per round; server 0 = plughost, 1 = baseline.
    runs: [Vec<Run>; 2],
    idle_rss_kb: [u64; 2],
    load_before: String,
}

impl Report<'_> {
    fn med(&self, server: usize, f: impl Fn(&Run) -> f64) -> f64 {
        median(self.runs[server].iter().map(f).collect())
    }

    fn render(&self) -> String {
        let o = self.o;
        let command = std::env::var("PLUGHOST_BENCH_CMD").unwrap_or_else(|_| {
            format!(
                "cargo run --release -p plughost-benches --bin ws_bench --{}",
                o.args.iter().map(|a| format!(" {a}")).collect::<String>()
            )
        });
        let kind = if o.binary { "binary" } else { "text" };
        let mut s = String::new();
        let _ = writeln!(s, "# plughost WebSocket echo benchmark\n");
        let _ = writeln!(s, "- date: {}", utc_now());
        let _ = writeln!(s, "- machine: {}", machine());
        let _ = writeln!(
            s,
            "- load average (1 min) before the runs: {}, after: {}",
            self.load_before,
            load_average()
        );
        let _ = writeln!(s, "- command: `{command}`");
        let _ = writeln!(
            s,
            "- load: {} connections on {} client threads (tungstenite blocking client, non-blocking sockets and poll(2)), each connection keeping {} {kind} messages of {} bytes in flight (a new one sent for every echo received); {} s measured per run after {} ms of ramp-up, {} interleaved round{} (the two servers alternate who goes first); figures are medians over the rounds, loaded RSS the maximum",
            o.conns,
            o.threads,
            o.window,
            o.size,
            o.duration,
            SETTLE.as_millis(),
            o.rounds,
            if o.rounds == 1 { "" } else { "s" }
        );
        let _ = writeln!(
            s,
            "- plughost: `target/release/plughost start`, 2 workers, the ws-echo plugin on `/ws/echo` (`on_message` answers with `host.push(conn, message)`, through the connection's send queue, `send_queue: 1024`); baseline: `target/release/ws_baseline` (tokio-tungstenite 0.27, tokio with 2 worker threads, `next()` then `send()` per message)"
        );
        let _ = writeln!(s, "- {}", rustc_version());
        let _ = writeln!(
            s,
            "- measured here before (the WebSocket issue): {EARLIER}; that load (client, connections, messages in flight) was not recorded, so those figures are context, not comparable with the table below\n"
        );
        let _ = writeln!(
            s,
            "Server CPU = utime+stime delta of the server process from /proc/PID/stat over the measured window. The client runs on the same 2 cores, so messages/s is shared-machine throughput; CPU per message is the efficiency figure. Nothing is asserted.\n"
        );
        let _ = writeln!(
            s,
            "| metric | plughost | baseline (tokio-tungstenite) | plughost/baseline |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|");
        let (p, b) = (self.med(0, Run::rate), self.med(1, Run::rate));
        let _ = writeln!(
            s,
            "| echo messages/s | {} | {} | {:.2}x |",
            fmt_num(p),
            fmt_num(b),
            p / b
        );
        let (p, b) = (self.med(0, Run::us_per_msg), self.med(1, Run::us_per_msg));
        let _ = writeln!(
            s,
            "| server CPU per message | {p:.1} µs | {b:.1} µs | {:.2}x |",
            p / b
        );
        let busy = |r: &Run| r.cpu_s / r.secs;
        let (p, b) = (self.med(0, busy), self.med(1, busy));
        let _ = writeln!(
            s,
            "| server CPU (cores busy) | {p:.2} | {b:.2} | {:.2}x |",
            p / b
        );
        let cbusy = |r: &Run| r.client_cpu_s / r.secs;
        let (p, b) = (self.med(0, cbusy), self.med(1, cbusy));
        let _ = writeln!(
            s,
            "| client CPU (cores busy) | {p:.2} | {b:.2} | {:.2}x |",
            p / b
        );
        let (pi, bi) = (self.idle_rss_kb[0], self.idle_rss_kb[1]);
        let _ = writeln!(
            s,
            "| idle RSS | {:.1} MiB | {:.1} MiB | {:.2}x |",
            pi as f64 / 1024.0,
            bi as f64 / 1024.0,
            pi as f64 / bi as f64
        );
        let max = |server: usize| {
            self.runs[server]
                .iter()
                .map(|r| r.rss_max_kb)
                .max()
                .unwrap_or(0)
        };
        let (p, b) = (max(0), max(1));
        let _ = writeln!(
            s,
            "| loaded RSS | {:.1} MiB | {:.1} MiB | {:.2}x |",
            p as f64 / 1024.0,
            b as f64 / 1024.0,
            p as f64 / b as f64
        );
        let errs = |server: usize| self.runs[server].iter().map(|r| r.errors).sum::<u64>();
        let _ = writeln!(s, "| errors (all runs) | {} | {} | - |", errs(0), errs(1));

        let _ = writeln!(s, "\n## Every run\n");
        let _ = writeln!(
            s,
            "| round | server | messages/s | echoes | seconds | server CPU s | CPU µs/msg | client CPU s | max RSS | errors |"
        );
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for round in 0..o.rounds {
            for (server, name) in NAMES.iter().enumerate() {
                if let Some(r) = self.runs[server].get(round) {
                    let _ = writeln!(
                        s,
                        "| {} | {name} | {} | {} | {:.2} | {:.2} | {:.1} | {:.2} | {:.1} MiB | {} |",
                        round + 1,
                        fmt_num(r.rate()),
                        fmt_num(r.echoes as f64),
                        r.secs,
                        r.cpu_s,
                        r.us_per_msg(),
                        r.client_cpu_s,
                        r.rss_max_kb as f64 / 1024.0,
                        r.errors
                    );
                }
            }
        }

        let _ = writeln!(s, "\n## Server CPU by thread (all runs)\n");
        for (server, name) in NAMES.iter().enumerate() {
            let mut sum: BTreeMap<String, u64> = BTreeMap::new();
            for r in &self.runs[server] {
                for (k, v) in &r.threads {
                    *sum.entry(k.clone()).or_insert(0) += v;
                }
            }
            let total: u64 = sum.values().sum();
            let mut parts: Vec<(String, u64)> = sum.into_iter().filter(|(_, v)| *v > 0).collect();
            parts.sort_by_key(|x| std::cmp::Reverse(x.1));
            let list: Vec<String> = parts
                .iter()
                .map(|(k, v)| format!("`{k}` {:.0}%", 100.0 * *v as f64 / total.max(1) as f64))
                .collect();
            let _ = writeln!(s, "- {name}: {}", list.join(", "));
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    if let Err(e) = real_main() {
        eprintln!("ws_bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let o = parse_args()?;
    let b = build(&o)?;
    let dir = std::env::temp_dir().join(format!("plughost-ws-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_all(&o, &b, &dir);
    let _ = fs::remove_dir_all(&dir);
    let report = result?;
    fs::write(&o.out, &report).map_err(|e| format!("{}: {e}", o.out.display()))?;
    println!("{report}");
    log(format!("wrote {}", o.out.display()));
    Ok(())
}

fn run_all(o: &Opts, b: &Binaries, dir: &Path) -> Result<String> {
    let load_before = load_average();
    let config = plughost_config(dir, &b.echo)?;
    let servers = [
        start_plughost(&b.plughost, &config)?,
        start_baseline(&b.baseline)?,
    ];
    thread::sleep(Duration::from_millis(500));
    let idle_rss_kb = [rss_kb(servers[0].pid()), rss_kb(servers[1].pid())];
    log(format!(
        "idle RSS: plughost {} kB, baseline {} kB",
        idle_rss_kb[0], idle_rss_kb[1]
    ));
    for s in &servers {
        log(format!("warm-up: {} (1 s)", s.name));
        let r = load(o, s, 1.0)?;
        if r.echoes == 0 {
            return Err(format!(
                "{} echoed nothing in the warm-up ({} errors): see the client messages above",
                s.name, r.errors
            ));
        }
    }
    let mut runs: [Vec<Run>; 2] = Default::default();
    for round in 0..o.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let s = &servers[i];
            let r = load(o, s, o.duration as f64)?;
            log(format!(
                "round {}/{} {:<8} {:>9} msg/s  {:>6.1} µs CPU/msg  server {:.2} cores  client {:.2} cores  rss {} kB  errors {}",
                round + 1,
                o.rounds,
                s.name,
                fmt_num(r.rate()),
                r.us_per_msg(),
                r.cpu_s / r.secs,
                r.client_cpu_s / r.secs,
                r.rss_max_kb,
                r.errors
            ));
            runs[i].push(r);
        }
    }
    for s in servers {
        s.stop();
    }
    Ok(Report {
        o,
        runs,
        idle_rss_kb,
        load_before,
    }
    .render())
}
