//! The TCP socket benchmark: a line echo on a `sockets` port of plughost (the echo plugin's
//! `echo.tcp`, `framing: Eof("\r\n")`) against the same echo on tokio (`tcp_baseline`).
//!
//! Both servers run with 2 worker threads on 127.0.0.1. A client of a few std threads (each
//! owning a share of the connections, nonblocking sockets and `poll(2)`) keeps `window`
//! lines in flight on each of 64 connections: it sends the window, then one more line for
//! each answer. Each answer must be `plughost: <the line>` in order; anything else counts as
//! an error. Two modes: **pipelined** (8 lines in flight) and **ping-pong** (1), each as
//! interleaved rounds of (plughost, baseline).
//!
//! Reported: answers/s, server CPU (utime+stime from /proc/PID/stat) per answer, medians
//! over the rounds and the ratios plughost/baseline, written to `benches/TCP_RESULTS.md`.
//! Nothing is asserted.
//!
//! Usage: `cargo run --release -p plughost-benches --bin tcp_bench -- [--mode MODE]
//! [--duration SECS] [--rounds N] [--conns N] [--quick] [--no-build]` (see `--help`).

use std::{
    fmt::Write as _,
    fs,
    io::{self, Read, Write},
    net::TcpStream,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use plughost_benches::{
    cargo, clock_ticks, cpu_ticks, load_average, machine, median, root, utc_now, Server,
};

const USAGE: &str = "\
usage: tcp_bench [--mode pipelined|pingpong|all] [--duration SECS] [--rounds N] [--conns N]
                 [--size BYTES] [--threads N] [--quick] [--no-build] [--out FILE]

  --mode MODE      pipelined (8 lines in flight per connection), pingpong (1), or all (default)
  --duration SECS  measured length of each run (default 5)
  --rounds N       interleaved rounds of (plughost, baseline) per mode (default 3)
  --conns N        connections (default 64)
  --size BYTES     bytes per line, the \\r\\n included, at least 12 (default 32)
  --threads N      client threads, sharing the connections (default 4)
  --quick          smoke test: 2 s runs, 1 round
  --no-build       use the binaries already in target/ (skip the cargo builds)
  --out FILE       where to write the report (default benches/TCP_RESULTS.md)
";

const SETTLE: Duration = Duration::from_millis(500);

type Result<T> = std::result::Result<T, String>;

#[derive(Debug, Clone)]
struct Opts {
    windows: Vec<usize>,
    duration: u64,
    rounds: usize,
    conns: usize,
    size: usize,
    threads: usize,
    build: bool,
    out: PathBuf,
    args: Vec<String>,
}

fn parse_args() -> Result<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        windows: vec![8, 1],
        duration: 5,
        rounds: 3,
        conns: 64,
        size: 32,
        threads: 4,
        build: true,
        out: root().join("benches/TCP_RESULTS.md"),
        args: args.clone(),
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        let number = |v: String| -> Result<u64> {
            v.parse()
                .map_err(|_| format!("{a} takes a whole number, not {v:?}"))
        };
        match a.as_str() {
            "--mode" => {
                o.windows = match value()?.as_str() {
                    "pipelined" => vec![8],
                    "pingpong" | "ping-pong" => vec![1],
                    "all" => vec![8, 1],
                    other => return Err(format!("unknown mode {other:?}\n{USAGE}")),
                }
            }
            "--duration" => o.duration = number(value()?)?,
            "--rounds" => o.rounds = number(value()?)? as usize,
            "--conns" => o.conns = number(value()?)? as usize,
            "--size" => o.size = number(value()?)? as usize,
            "--threads" => o.threads = number(value()?)? as usize,
            "--quick" => (o.duration, o.rounds) = (2, 1),
            "--no-build" => o.build = false,
            "--out" => o.out = PathBuf::from(value()?),
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if [
        o.duration,
        o.rounds as u64,
        o.conns as u64,
        o.threads as u64,
    ]
    .contains(&0)
    {
        return Err("--duration, --rounds, --conns and --threads must be at least 1".into());
    }
    if o.size < 12 {
        return Err("--size must be at least 12 (a sequence number and \\r\\n)".into());
    }
    Ok(o)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[tcp_bench] {}", msg.as_ref());
}

fn mode_name(window: usize) -> String {
    match window {
        1 => "ping-pong".into(),
        n => format!("pipelined ({n} in flight)"),
    }
}

// ---------------------------------------------------------------------------------------------
// The servers

fn start_servers(o: &Opts, dir: &Path) -> Result<[(Server, String); 2]> {
    let r = root();
    if o.build {
        cargo(&["build", "--release", "-p", "plughost", "-p", "echo"])?;
        let bin = ["--bin", "tcp_baseline"];
        cargo(&[
            "build",
            "--release",
            "-p",
            "plughost-benches",
            bin[0],
            bin[1],
        ])?;
    }
    let (plughost, echo) = (
        r.join("target/release/plughost"),
        r.join("target/release/libecho.so"),
    );
    let baseline = r.join("target/release/tcp_baseline");
    for p in [&plughost, &echo, &baseline] {
        if !p.exists() {
            return Err(format!(
                "{} is missing (run without --no-build)",
                p.display()
            ));
        }
    }
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let config = dir.join("server.ron");
    let text = format!(
        r#"// Generated by benches/src/bin/tcp_bench.rs.
(
    listen: "127.0.0.1:0",
    worker_num: 2,
    runtime_dir: "{run}",
    log: (level: "info"),
    plugins: {{ "echo": (path: "{echo}") }},
    sockets: [(listen: "127.0.0.1:0", protocol: Tcp, framing: Eof("\r\n"), handler: "echo.tcp")],
)
"#,
        run = dir.join("run").display(),
        echo = echo.display(),
    );
    fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
    let mut cmd = Command::new(&plughost);
    cmd.arg("start")
        .arg("-c")
        .arg(&config)
        .env_remove("RUST_LOG");
    let p = Server::start("plughost", cmd, true)?;
    let addr = p
        .output
        .iter()
        .find_map(|l| {
            Some(
                l.split("(echo.tcp) listening on tcp://")
                    .nth(1)?
                    .trim()
                    .to_owned(),
            )
        })
        .ok_or_else(|| {
            format!(
                "plughost logged no socket address:\n{}",
                p.output.join("\n")
            )
        })?;
    let b = Server::start("baseline", Command::new(&baseline), false)?;
    let baddr = b.addr.clone();
    Ok([(p, addr), (b, baddr)])
}

// ---------------------------------------------------------------------------------------------
// The client

#[derive(Default)]
struct Counters {
    answers: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

/// One connection: what it sent and expects back.
struct Line {
    stream: TcpStream,
    next_send: u64,
    next_answer: u64,
    input: Vec<u8>,
    output: Vec<u8>,
}

impl Line {
    fn queue(&mut self, size: usize) {
        // "plughost: " + the line comes back; the line is a zero-padded sequence number.
        let width = size - 2;
        let _ = write!(
            PlainWriter(&mut self.output),
            "{:0width$}\r\n",
            self.next_send % 10u64.pow(width.min(19) as u32)
        );
        self.next_send += 1;
    }

    /// Reads what came; checks and counts the answers; returns how many.
    fn read(&mut self, size: usize, counters: &Counters) -> io::Result<u64> {
        let mut buf = [0u8; 16 * 1024];
        let mut got = 0;
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let answer = 10 + size;
        let width = size - 2;
        let mut at = 0;
        while self.input.len() - at >= answer {
            let a = &self.input[at..at + answer];
            let want = format!(
                "plughost: {:0width$}\r\n",
                self.next_answer % 10u64.pow(width.min(19) as u32)
            );
            if a != want.as_bytes() {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                return Err(io::Error::other("a wrong answer"));
            }
            self.next_answer += 1;
            got += 1;
            at += answer;
        }
        self.input.drain(..at);
        Ok(got)
    }

    fn flush(&mut self) -> io::Result<()> {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(n) => drop(self.output.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// `write!` into a Vec without the io::Write error path.
struct PlainWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for PlainWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn client_thread(addr: String, conns: usize, window: usize, size: usize, c: Arc<Counters>) {
    let mut lines: Vec<Line> = Vec::new();
    for _ in 0..conns {
        let Ok(stream) = TcpStream::connect(&addr) else {
            c.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_nonblocking(true);
        let mut l = Line {
            stream,
            next_send: 0,
            next_answer: 0,
            input: Vec::new(),
            output: Vec::new(),
        };
        for _ in 0..window {
            l.queue(size);
        }
        lines.push(l);
    }
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !c.stop.load(Ordering::Relaxed) && !lines.is_empty() {
        fds.clear();
        fds.extend(lines.iter().map(|l| libc::pollfd {
            fd: l.stream.as_raw_fd(),
            events: libc::POLLIN
                | if l.output.is_empty() {
                    0
                } else {
                    libc::POLLOUT
                },
            revents: 0,
        }));
        // SAFETY: poll reads and writes `fds.len()` pollfd structs we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if n <= 0 {
            continue;
        }
        let mut dead = Vec::new();
        for (i, l) in lines.iter_mut().enumerate() {
            if fds[i].revents == 0 {
                continue;
            }
            let result = l.read(size, &c).and_then(|got| {
                c.answers.fetch_add(got, Ordering::Relaxed);
                for _ in 0..got {
                    l.queue(size);
                }
                l.flush()
            });
            if result.is_err() {
                if !c.stop.load(Ordering::Relaxed) {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                }
                dead.push(i);
            }
        }
        for i in dead.into_iter().rev() {
            lines.swap_remove(i);
        }
    }
}

struct Clients {
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
}

fn start_clients(o: &Opts, addr: &str, window: usize) -> Clients {
    let counters = Arc::new(Counters::default());
    let threads = (0..o.threads)
        .map(|t| {
            let share = o.conns / o.threads + usize::from(t < o.conns % o.threads);
            let (addr, c, size) = (addr.to_owned(), counters.clone(), o.size);
            thread::spawn(move || client_thread(addr, share, window, size, c))
        })
        .collect();
    Clients { counters, threads }
}

impl Clients {
    fn finish(self) -> u64 {
        self.counters.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.counters.errors.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------
// Runs and the report

#[derive(Debug, Clone, Copy)]
struct Run {
    rate: f64,
    us_per_answer: f64,
    errors: u64,
}

fn load(o: &Opts, server: &Server, addr: &str, window: usize, secs: f64) -> Run {
    let clients = start_clients(o, addr, window);
    thread::sleep(SETTLE);
    let (a0, c0, t0) = (
        clients.counters.answers.load(Ordering::Relaxed),
        cpu_ticks(server.pid()),
        Instant::now(),
    );
    thread::sleep(Duration::from_secs_f64(secs));
    let (a1, c1) = (
        clients.counters.answers.load(Ordering::Relaxed),
        cpu_ticks(server.pid()),
    );
    let elapsed = t0.elapsed().as_secs_f64();
    let errors = clients.finish();
    let answers = (a1 - a0) as f64;
    let cpu = c1.saturating_sub(c0) as f64 / clock_ticks();
    Run {
        rate: answers / elapsed,
        us_per_answer: if answers > 0.0 {
            1e6 * cpu / answers
        } else {
            f64::NAN
        },
        errors,
    }
}

fn run_mode(o: &Opts, servers: &[(Server, String); 2], window: usize) -> [Vec<Run>; 2] {
    let mode = mode_name(window);
    for (s, addr) in servers {
        log(format!("{mode}: warm-up of {} (1 s)", s.name));
        load(o, s, addr, window, 1.0);
    }
    let mut runs: [Vec<Run>; 2] = Default::default();
    for round in 0..o.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (s, addr) = &servers[i];
            let r = load(o, s, addr, window, o.duration as f64);
            log(format!(
                "{mode} round {}/{} {:<8} {:>10.0} answers/s  {:>6.2} µs CPU/answer  errors {}",
                round + 1,
                o.rounds,
                s.name,
                r.rate,
                r.us_per_answer,
                r.errors
            ));
            runs[i].push(r);
        }
    }
    runs
}

fn report(o: &Opts, modes: &[(usize, [Vec<Run>; 2])], load_before: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# TCP socket benchmark: plughost `sockets` against a tokio line echo\n"
    );
    let _ = writeln!(
        s,
        "Generated by `cargo run --release -p plughost-benches --bin tcp_bench -- {}` on {} ({}).\n",
        o.args.join(" "),
        utc_now(),
        machine()
    );
    let _ = writeln!(
        s,
        "{} connections, lines of {} bytes, {} rounds of {} s per server (interleaved), both \
         servers on 2 worker threads; load average before: {load_before}. Server CPU is \
         utime+stime of the serving process. Medians over the rounds.\n",
        o.conns, o.size, o.rounds, o.duration
    );
    let _ = writeln!(
        s,
        "| mode | plughost answers/s | baseline answers/s | ratio | plughost µs CPU/answer | baseline µs CPU/answer | ratio | errors |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for (window, runs) in modes {
        let m = |i: usize, f: fn(&Run) -> f64| median(runs[i].iter().map(f).collect());
        let (pr, br) = (m(0, |r| r.rate), m(1, |r| r.rate));
        let (pc, bc) = (m(0, |r| r.us_per_answer), m(1, |r| r.us_per_answer));
        let errors: u64 = runs.iter().flatten().map(|r| r.errors).sum();
        let _ = writeln!(
            s,
            "| {} | {pr:.0} | {br:.0} | **{:.2}x** | {pc:.2} | {bc:.2} | **{:.2}x** | {errors} |",
            mode_name(*window),
            pr / br,
            pc / bc
        );
    }
    let _ = writeln!(
        s,
        "\nTargets (issue #14): answers/s ratio ≥ 1.0 and CPU per answer ratio ≤ 1.0."
    );
    s
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("tcp_bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let o = parse_args()?;
    let dir = std::env::temp_dir().join(format!("plughost-tcp-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let load_before = load_average();
    let servers = start_servers(&o, &dir)?;
    let modes: Vec<_> = o
        .windows
        .iter()
        .map(|&w| (w, run_mode(&o, &servers, w)))
        .collect();
    drop(servers);
    let _ = fs::remove_dir_all(&dir);
    let text = report(&o, &modes, &load_before);
    fs::write(&o.out, &text).map_err(|e| format!("{}: {e}", o.out.display()))?;
    println!("{text}");
    log(format!("wrote {}", o.out.display()));
    Ok(())
}
