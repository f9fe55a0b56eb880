//! The WebSocket benchmark: plughost (the ws-echo plugin) against a tokio-tungstenite server
//! (`ws_baseline`), in three modes:
//!
//! - **pipelined**: echo, 64 connections each keeping 8 messages in flight (it sends the
//!   window, then one more for each echo it gets);
//! - **ping-pong**: echo, 100 connections with one message in flight each;
//! - **fan-out**: 1000 connections on `/ws/fanout`, where every message received is
//!   broadcast to every connection on the route; one of them sends (with a window of 8 over
//!   the whole fan-out, see `fanout.rs`), all of them receive and time the delivery.
//!
//! Builds the release binaries, starts both servers on 127.0.0.1 with 2 workers each, and
//! loads each in turn, interleaved over several rounds, with a client of its own: a few std
//! threads, each owning a share of the connections (tungstenite's blocking client, switched
//! to non-blocking sockets and `poll(2)` after the handshake). Messages must come back in
//! order and unchanged; anything else counts as an error, and so does a connection the
//! server closes.
//!
//! Reported per mode: messages/s received, server CPU (utime+stime from /proc/PID/stat) per
//! message, loaded RSS, fan-out delivery latency (p50, p99), medians over the rounds and the
//! ratios plughost/baseline, written to `benches/WS_RESULTS.md`. Nothing is asserted.
//!
//! Usage: `cargo run --release -p plughost-benches --bin ws_bench -- [--mode MODE]
//! [--duration SECS] [--rounds N] [--quick]` (see `--help`).

mod client;
mod fanout;
mod report;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{atomic::Ordering, Arc},
    thread,
    time::{Duration, Instant},
};

use plughost_benches::{
    cargo, clock_ticks, cpu_ticks, load_average, root, rss_kb, thread_ticks, Server,
};

use crate::{
    client::{Clients, EchoOpts},
    fanout::{FanoutOpts, Shared},
    report::{fmt_num, fmt_us, Report, Run},
};

/// The WebSocket routes both servers serve.
const ECHO_PATH: &str = "/ws/echo";
const FANOUT_PATH: &str = "/ws/fanout";

const USAGE: &str = "\
usage: ws_bench [--mode pipelined|pingpong|fanout|all] [--duration SECS] [--rounds N]
                [--conns N] [--window N] [--pingpong-conns N] [--fanout-conns N]
                [--fanout-window N] [--size BYTES] [--threads N] [--binary] [--quick]
                [--no-build] [--syscalls] [--out FILE]

  --mode MODE          what to measure (default all: pipelined, pingpong, fanout)
  --duration SECS      measured length of each run (default 5)
  --rounds N           interleaved rounds of (plughost, baseline) per mode (default 3)
  --conns N            pipelined: WebSocket connections (default 64)
  --window N           pipelined: messages in flight per connection (default 8)
  --pingpong-conns N   ping-pong: connections, one message in flight each (default 100)
  --fanout-conns N     fan-out: receiving connections, the sender among them (default 1000)
  --fanout-window N    fan-out: message k+1 waits until all have k-N (default 8)
  --size BYTES         message size, at least 20, 30 for the fan-out (default 32)
  --threads N          client threads, sharing the connections (default 4)
  --binary             send binary messages (default: text)
  --quick              smoke test: 2 s runs, 1 round
  --no-build           use the binaries already in target/ (skip the cargo builds)
  --syscalls           count the server's syscalls and context switches in each measured
                       window with `perf stat -p` (logged per message, not in the report)
  --out FILE           where to write the report (default benches/WS_RESULTS.md)
";

/// Ramp-up after the connections are open and before the measured window starts.
const SETTLE: Duration = Duration::from_millis(500);

type Result<T> = std::result::Result<T, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pipelined,
    PingPong,
    Fanout,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Pipelined, Mode::PingPong, Mode::Fanout];

    fn parse(s: &str) -> Result<Vec<Mode>> {
        match s {
            "pipelined" => Ok(vec![Mode::Pipelined]),
            "pingpong" | "ping-pong" => Ok(vec![Mode::PingPong]),
            "fanout" | "fan-out" => Ok(vec![Mode::Fanout]),
            "all" => Ok(Mode::ALL.to_vec()),
            other => Err(format!("unknown mode {other:?}\n{USAGE}")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Pipelined => "pipelined",
            Mode::PingPong => "ping-pong",
            Mode::Fanout => "fan-out",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Opts {
    modes: Vec<Mode>,
    duration: u64,
    rounds: usize,
    conns: usize,
    window: usize,
    pingpong_conns: usize,
    fanout_conns: usize,
    fanout_window: u64,
    size: usize,
    threads: usize,
    binary: bool,
    build: bool,
    syscalls: bool,
    out: PathBuf,
    args: Vec<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            modes: Mode::ALL.to_vec(),
            duration: 5,
            rounds: 3,
            conns: 64,
            window: 8,
            pingpong_conns: 100,
            fanout_conns: 1000,
            fanout_window: 8,
            size: 32,
            threads: 4,
            binary: false,
            build: true,
            syscalls: false,
            out: root().join("benches/WS_RESULTS.md"),
            args: Vec::new(),
        }
    }
}

fn parse_args() -> Result<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        args: args.clone(),
        ..Opts::default()
    };
    let mut quick = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<String> {
            it.next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        let number = |v: String| -> Result<u64> {
            v.parse()
                .map_err(|_| format!("{a} takes a whole number, not {v:?}"))
        };
        match a.as_str() {
            "--mode" => o.modes = Mode::parse(&value(&a)?)?,
            "--duration" => o.duration = number(value(&a)?)?,
            "--rounds" => o.rounds = number(value(&a)?)? as usize,
            "--conns" => o.conns = number(value(&a)?)? as usize,
            "--window" => o.window = number(value(&a)?)? as usize,
            "--pingpong-conns" => o.pingpong_conns = number(value(&a)?)? as usize,
            "--fanout-conns" => o.fanout_conns = number(value(&a)?)? as usize,
            "--fanout-window" => o.fanout_window = number(value(&a)?)?,
            "--size" => o.size = number(value(&a)?)? as usize,
            "--threads" => o.threads = number(value(&a)?)? as usize,
            "--binary" => o.binary = true,
            "--quick" => quick = true,
            "--no-build" => o.build = false,
            "--syscalls" => o.syscalls = true,
            "--out" => o.out = PathBuf::from(value(&a)?),
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
    check(&o)?;
    Ok(o)
}

fn check(o: &Opts) -> Result<()> {
    let counts = [
        o.duration,
        o.rounds as u64,
        o.conns as u64,
        o.window as u64,
        o.pingpong_conns as u64,
        o.fanout_conns as u64,
        o.threads as u64,
    ];
    if counts.contains(&0) {
        return Err("--duration, --rounds, --threads and the connection counts and --window must be at least 1".into());
    }
    if o.size < 20 {
        return Err("--size must be at least 20 (the payload carries a sequence number)".into());
    }
    if o.size < 30 && o.modes.contains(&Mode::Fanout) {
        return Err(
            "--size must be at least 30 for the fan-out (send time and sequence number)".into(),
        );
    }
    Ok(())
}

pub fn log(msg: impl AsRef<str>) {
    eprintln!("[ws_bench] {}", msg.as_ref());
}

/// The fan-out needs a descriptor per connection in this process (and in each server, which
/// inherits the limit): raises the soft limit to the hard one if it must, else fails.
fn check_fd_limit(o: &Opts) -> Result<()> {
    if !o.modes.contains(&Mode::Fanout) {
        return Ok(());
    }
    let need = o.fanout_conns as u64 + 256;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max >= need {
        // Room for the servers too, which inherit it.
        lim.rlim_cur = lim.rlim_max.min(need * 4);
        // SAFETY: setrlimit reads one rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            log(format!("raised the open files limit to {}", lim.rlim_cur));
            return Ok(());
        }
    }
    Err(format!(
        "the open files limit (ulimit -n) is {} (hard {}), the fan-out of {} connections needs at least {need}: raise it (`ulimit -n {need}`) or lower --fanout-conns",
        lim.rlim_cur, lim.rlim_max, o.fanout_conns
    ))
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

/// The send queue of a plughost connection (and the baseline's broadcast channel).
const SEND_QUEUE: usize = 1024;

fn plughost_config(dir: &Path, echo: &Path, o: &Opts) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let text = format!(
        r#"// Generated by benches/src/bin/ws_bench/main.rs.
(
    listen: "127.0.0.1:0",
    worker_num: 2,
    runtime_dir: "{run}",
    log: (level: "info"),
    plugins: {{ "ws-echo": (path: "{echo}") }},
    websocket: (
        enable: true,
        routes: [
            (path: "{ECHO_PATH}", handler: "ws-echo.echo"),
            (path: "{FANOUT_PATH}", handler: "ws-echo.fanout"),
        ],
        max_message_size: 1048576,
        max_connections: {max},
        send_queue: {SEND_QUEUE},
    ),
)
"#,
        run = dir.join("run").display(),
        echo = echo.display(),
        max = (o.fanout_conns + 1000).max(10_000),
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
// One run

/// Starts the clients of `mode` against `addr`.
fn start_clients(o: &Opts, mode: Mode, addr: &str) -> Result<(Clients, Option<Arc<Shared>>)> {
    let echo = |conns, window| EchoOpts {
        addr: addr.to_owned(),
        path: ECHO_PATH,
        conns,
        window,
        size: o.size,
        binary: o.binary,
    };
    let threads = o.threads;
    match mode {
        Mode::Pipelined => Ok((client::start_echo(&echo(o.conns, o.window), threads)?, None)),
        Mode::PingPong => Ok((
            client::start_echo(&echo(o.pingpong_conns, 1), threads)?,
            None,
        )),
        Mode::Fanout => {
            let fo = FanoutOpts {
                addr: addr.to_owned(),
                path: FANOUT_PATH,
                conns: o.fanout_conns,
                window: o.fanout_window,
                size: o.size,
                binary: o.binary,
            };
            let (clients, shared) = fanout::start(&fo, threads.min(o.fanout_conns))?;
            Ok((clients, Some(shared)))
        }
    }
}

/// What is sampled at both ends of the measured window.
struct Snapshot {
    msgs: u64,
    sent: u64,
    cpu: u64,
    own: u64,
    threads: std::collections::BTreeMap<String, u64>,
}

fn snapshot(clients: &Clients, shared: Option<&Arc<Shared>>, pid: u32) -> Snapshot {
    Snapshot {
        msgs: clients.msgs(),
        sent: shared.map_or(0, |s| s.sent()),
        cpu: cpu_ticks(pid),
        own: cpu_ticks(std::process::id()),
        threads: thread_ticks(pid),
    }
}

fn load(o: &Opts, mode: Mode, server: &Server, secs: f64) -> Result<Run> {
    let pid = server.pid();
    let (clients, shared) = start_clients(o, mode, &server.addr)?;
    thread::sleep(SETTLE);
    let measuring = |on: bool| {
        if let Some(s) = &shared {
            s.measuring.store(on, Ordering::Relaxed);
        }
    };
    measuring(true);
    let perf = o
        .syscalls
        .then(|| [PerfStat::start(pid), PerfStat::start(std::process::id())]);
    let s0 = snapshot(&clients, shared.as_ref(), pid);
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
    let s1 = snapshot(&clients, shared.as_ref(), pid);
    if let Some([server_perf, client_perf]) = perf {
        server_perf.finish(server.name, s1.msgs - s0.msgs);
        client_perf.finish("client", s1.msgs - s0.msgs);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    measuring(false);
    let errors = clients.finish();
    let latencies = shared.map(|s| s.latencies());
    let threads = s1
        .threads
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(*s0.threads.get(k).unwrap_or(&0)),
            )
        })
        .collect();
    Ok(Run {
        msgs: s1.msgs - s0.msgs,
        sent: s1.sent - s0.sent,
        secs: elapsed,
        errors,
        cpu_s: s1.cpu.saturating_sub(s0.cpu) as f64 / clock_ticks(),
        client_cpu_s: s1.own.saturating_sub(s0.own) as f64 / clock_ticks(),
        rss_max_kb: rss_max,
        p50_us: latencies
            .as_ref()
            .map_or(f64::NAN, |h| h.quantile(0.5) / 1e3),
        p99_us: latencies
            .as_ref()
            .map_or(f64::NAN, |h| h.quantile(0.99) / 1e3),
        threads,
    })
}

/// `perf stat` of the server's syscalls over a measured window (`--syscalls`).
struct PerfStat {
    child: Option<std::process::Child>,
    out: PathBuf,
}

/// The events `--syscalls` counts.
const PERF_EVENTS: &str = "raw_syscalls:sys_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_poll,syscalls:sys_enter_futex,context-switches";

impl PerfStat {
    fn start(pid: u32) -> PerfStat {
        let out = std::env::temp_dir().join(format!("ws-bench-perf-{pid}.csv"));
        let child = Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                PERF_EVENTS,
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| log(format!("--syscalls: cannot run perf: {e}")))
            .ok();
        // perf attaches to every thread before the window starts.
        thread::sleep(Duration::from_millis(200));
        PerfStat { child, out }
    }

    /// Stops perf and logs each event per message.
    fn finish(self, name: &str, msgs: u64) {
        let Some(mut child) = self.child else { return };
        // SAFETY: kill(2) on our own child; SIGINT makes perf stat write its counts.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let _ = child.wait();
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        let _ = fs::remove_file(&self.out);
        let per: Vec<String> = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let n: f64 = f.first()?.trim().parse().ok()?;
                let event = f.get(2)?.rsplit(['_', ':']).next()?;
                Some(format!("{event} {:.3}", n / msgs.max(1) as f64))
            })
            .collect();
        log(format!("{name} per message: {}", per.join(", ")));
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
    check_fd_limit(&o)?;
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
    let config = plughost_config(dir, &b.echo, o)?;
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
    let mut modes = Vec::new();
    for &mode in &o.modes {
        modes.push((mode, run_mode(o, mode, &servers)?));
    }
    for s in servers {
        s.stop();
    }
    Ok(Report {
        o,
        modes,
        idle_rss_kb,
        load_before,
    }
    .render())
}

/// A warm-up of each server, then the interleaved rounds; runs[server] = one Run per round.
fn run_mode(o: &Opts, mode: Mode, servers: &[Server; 2]) -> Result<[Vec<Run>; 2]> {
    for s in servers {
        log(format!("{}: warm-up of {} (1 s)", mode.name(), s.name));
        let r = load(o, mode, s, 1.0)?;
        if r.msgs == 0 {
            return Err(format!(
                "{} received nothing from {} in the warm-up ({} errors): see the client messages above",
                mode.name(),
                s.name,
                r.errors
            ));
        }
    }
    let mut runs: [Vec<Run>; 2] = Default::default();
    for round in 0..o.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let s = &servers[i];
            let r = load(o, mode, s, o.duration as f64)?;
            let latency = if mode == Mode::Fanout {
                format!("  p50 {}  p99 {}", fmt_us(r.p50_us), fmt_us(r.p99_us))
            } else {
                String::new()
            };
            log(format!(
                "{} round {}/{} {:<8} {:>9} msg/s  {:>6.2} µs CPU/msg  server {:.2} cores  client {:.2} cores{latency}  rss {} kB  errors {}",
                mode.name(),
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
    Ok(runs)
}
