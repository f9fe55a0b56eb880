//! The load benchmark: plughost (hello plugin) against a hyper/tokio baseline.
//!
//! Builds the release binaries, starts both servers on 127.0.0.1, loads each in turn with
//! `wrk -t1 -cN -dSECS --latency` at 64 and 256 connections, interleaved over several rounds,
//! and reports req/s, p99, requests per server-CPU-second, idle and loaded RSS, allocations
//! per request (an `alloc-stats` build of plughost) and, when strace is there, syscalls per
//! request. The figures, the ratios plughost/baseline and the targets go to
//! `benches/RESULTS.md`. Targets are reported, never asserted.
//!
//! Usage: `bash benches/run.sh [--duration SECS] [--rounds N] [--quick]` (see `--help`).

use plughost_benches::{
    cargo, clock_ticks, cpu_ticks, load_average, machine, median, root, rss_kb, thread_ticks,
    tool_version, utc_now, Server,
};
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

const CONNECTIONS: [u32; 2] = [64, 256];
const USAGE: &str = "\
usage: bench [--duration SECS] [--rounds N] [--quick] [--no-build] [--no-strace] [--out FILE]
             [--steal-after-us N]

  --duration SECS  length of each wrk run (default 10)
  --rounds N       interleaved rounds of (c64, c256) x (plughost, baseline) (default 3)
  --quick          smoke test: 2 s runs, 1 round
  --no-build       use the binaries already in target/ (skip the cargo builds)
  --no-strace      do not count syscalls (perf stat, strace) even if installed
  --out FILE       where to write the report (default benches/RESULTS.md)
  --steal-after-us N  plughost's steal_after_us (default: the server's default; 0 = off)
";

type Result<T> = std::result::Result<T, String>;

#[derive(Debug, Clone)]
struct Opts {
    duration: u64,
    rounds: usize,
    quick: bool,
    build: bool,
    strace: bool,
    out: PathBuf,
    steal_after_us: Option<u64>,
    args: Vec<String>,
}

fn parse_args() -> Result<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        duration: 10,
        rounds: 3,
        quick: false,
        build: true,
        strace: true,
        out: root().join("benches/RESULTS.md"),
        steal_after_us: None,
        args: args.clone(),
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--duration" => {
                o.duration = value("--duration")?
                    .parse()
                    .map_err(|_| "--duration takes whole seconds".to_owned())?
            }
            "--rounds" => {
                o.rounds = value("--rounds")?
                    .parse()
                    .map_err(|_| "--rounds takes a number".to_owned())?
            }
            "--quick" => o.quick = true,
            "--no-build" => o.build = false,
            "--no-strace" => o.strace = false,
            "--out" => o.out = PathBuf::from(value("--out")?),
            "--steal-after-us" => {
                o.steal_after_us = Some(
                    value("--steal-after-us")?
                        .parse()
                        .map_err(|_| "--steal-after-us takes microseconds".to_owned())?,
                )
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if o.quick {
        o.duration = 2;
        o.rounds = 1;
    }
    if o.duration == 0 || o.rounds == 0 {
        return Err("--duration and --rounds must be at least 1".into());
    }
    Ok(o)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------------
// Building

struct Binaries {
    plughost: PathBuf,
    plughost_alloc: PathBuf,
    hello: PathBuf,
    baseline: PathBuf,
}

fn build(o: &Opts) -> Result<Binaries> {
    let r = root();
    if o.build {
        cargo(&["build", "--release", "-p", "plughost", "-p", "hello"])?;
        cargo(&[
            "build",
            "--release",
            "-p",
            "plughost-benches",
            "--bin",
            "baseline",
        ])?;
        cargo(&[
            "build",
            "--release",
            "-p",
            "plughost",
            "--bin",
            "plughost",
            "--features",
            "alloc-stats",
            "--target-dir",
            "target/bench-alloc",
        ])?;
    }
    let b = Binaries {
        plughost: r.join("target/release/plughost"),
        plughost_alloc: r.join("target/bench-alloc/release/plughost"),
        hello: r.join("target/release/libhello.so"),
        baseline: r.join("target/release/baseline"),
    };
    // The alloc-stats build is optional with --no-build: allocations are then not measured.
    for p in [&b.plughost, &b.hello, &b.baseline] {
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

fn plughost_config(dir: &Path, hello: &Path, steal_after_us: Option<u64>) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let text = format!(
        r#"// Generated by benches/src/bin/bench.rs.
(
    listen: "127.0.0.1:0",
    worker_num: 2,{steal}
    runtime_dir: "{run}",
    log: (level: "info"),
    plugins: {{ "hello": (path: "{hello}") }},
    routes: [(path: "/hello", handler: "hello.hello")],
)
"#,
        run = dir.join("run").display(),
        hello = hello.display(),
        steal = steal_after_us
            .map(|us| format!("\n    steal_after_us: {us},"))
            .unwrap_or_default(),
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
// wrk

#[derive(Debug, Clone, Default)]
struct Wrk {
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn latency_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

fn parse_wrk(text: &str) -> Result<Wrk> {
    let mut w = Wrk::default();
    let mut have = (false, false, false);
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(0.0);
            have.0 = true;
        } else if t.contains(" requests in ") {
            w.requests = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            have.1 = true;
        } else if let Some(v) = t.strip_prefix("50%") {
            w.p50_ms = latency_ms(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("90%") {
            w.p90_ms = latency_ms(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("99%") {
            if let Some(ms) = latency_ms(v) {
                w.p99_ms = ms;
                have.2 = true;
            }
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            w.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if have != (true, true, true) {
        return Err(format!("cannot read wrk's output:\n{text}"));
    }
    Ok(w)
}

/// One wrk run, with the server's CPU and RSS sampled around it.
#[derive(Debug, Clone, Default)]
struct Run {
    wrk: Wrk,
    cpu_s: f64,
    rss_max_kb: u64,
    threads: BTreeMap<String, u64>,
}

impl Run {
    fn per_cpu_s(&self) -> f64 {
        if self.cpu_s > 0.0 {
            self.wrk.requests as f64 / self.cpu_s
        } else {
            f64::NAN
        }
    }
}

fn wrk(addr: &str, conns: u32, secs: u64, pid: u32) -> Result<Run> {
    let url = format!("http://{addr}/hello");
    let before = cpu_ticks(pid);
    let threads_before = thread_ticks(pid);
    let mut child = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            &url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run wrk (install it: apt-get install -y wrk): {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(secs + 30);
    let mut rss_max = 0;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("wrk did not finish in time".into());
        }
        rss_max = rss_max.max(rss_kb(pid));
        thread::sleep(Duration::from_millis(100));
    };
    let after = cpu_ticks(pid);
    let threads_after = thread_ticks(pid);
    let mut out = String::new();
    let _ = child.stdout.take().expect("piped").read_to_string(&mut out);
    if !status.success() {
        let mut err = String::new();
        let _ = child.stderr.take().expect("piped").read_to_string(&mut err);
        return Err(format!("wrk failed ({status}): {out}{err}"));
    }
    let threads = threads_after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(*threads_before.get(k).unwrap_or(&0)),
            )
        })
        .collect();
    Ok(Run {
        wrk: parse_wrk(&out)?,
        cpu_s: after.saturating_sub(before) as f64 / clock_ticks(),
        rss_max_kb: rss_max,
        threads,
    })
}

// ---------------------------------------------------------------------------------------------
// Allocations and syscalls

fn info_counters(bin: &Path, config: &Path) -> Result<(u64, u64)> {
    let out = Command::new(bin)
        .args(["info", "-c"])
        .arg(config)
        .output()
        .map_err(|e| format!("plughost info: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    match (field("allocations:"), field("requests:")) {
        (Some(a), Some(r)) => Ok((a, r)),
        _ => Err(format!(
            "plughost info printed no `allocations:`/`requests:` lines (is it an alloc-stats build?):\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

#[derive(Debug, Clone)]
struct Allocs {
    allocations: u64,
    requests: u64,
}

fn measure_allocs(b: &Binaries, dir: &Path, secs: u64, steal: Option<u64>) -> Result<Allocs> {
    if !b.plughost_alloc.exists() {
        return Err(format!("{} is missing", b.plughost_alloc.display()));
    }
    let config = plughost_config(&dir.join("alloc"), &b.hello, steal)?;
    let server = start_plughost(&b.plughost_alloc, &config)?;
    // Warm up first so per-connection buffers have grown: we want the steady state.
    wrk(&server.addr, 64, 1, server.pid())?;
    let (a0, r0) = info_counters(&b.plughost_alloc, &config)?;
    wrk(&server.addr, 64, secs, server.pid())?;
    let (a1, r1) = info_counters(&b.plughost_alloc, &config)?;
    server.stop();
    Ok(Allocs {
        allocations: a1 - a0,
        requests: r1 - r0,
    })
}

#[derive(Debug, Clone)]
struct Syscalls {
    requests: u64,
    total: u64,
    /// Calls by syscall name, most first.
    by_name: Vec<(String, u64)>,
    /// Context switches of the server's threads (perf only).
    switches: Option<u64>,
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Counts the server's syscalls with `strace -c -f -p` during a fixed-length c64 load.
fn count_syscalls(server: &Server, dir: &Path, secs: u64) -> Result<Syscalls> {
    let out = dir.join(format!("strace-{}.txt", server.name));
    let mut strace = Command::new("strace")
        .args(["-c", "-f", "-q", "-p", &server.pid().to_string(), "-o"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run strace: {e}"))?;
    thread::sleep(Duration::from_millis(1000));
    if let Ok(Some(s)) = strace.try_wait() {
        let mut err = String::new();
        let _ = strace
            .stderr
            .take()
            .expect("piped")
            .read_to_string(&mut err);
        return Err(format!("strace exited at once ({s}): {}", err.trim()));
    }
    let run = wrk(&server.addr, 64, secs, server.pid());
    // SAFETY: kill(2) on our own child's pid; SIGINT makes strace detach and print its summary.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    let _ = strace.wait();
    let run = run?;
    let text = fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut by_name = Vec::new();
    let mut total = 0;
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.len() < 5 || t[0].parse::<f64>().is_err() {
            continue;
        }
        let calls: u64 = t[3].parse().unwrap_or(0);
        let name = t[t.len() - 1].to_owned();
        if name == "total" {
            total = calls;
        } else {
            by_name.push((name, calls));
        }
    }
    by_name.sort_by_key(|x| std::cmp::Reverse(x.1));
    if total == 0 || run.wrk.requests == 0 {
        return Err(format!("no syscall counts in strace's output:\n{text}"));
    }
    Ok(Syscalls {
        requests: run.wrk.requests,
        total,
        by_name,
        switches: None,
    })
}

/// Syscalls whose trace points `perf_syscalls` counts one by one (the total covers them all).
const PERF_SYSCALLS: [&str; 11] = [
    "recvfrom",
    "sendto",
    "writev",
    "read",
    "write",
    "futex",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "timerfd_settime",
    "sched_yield",
];

/// Whether `perf stat` can count syscall trace points here.
fn perf_usable() -> bool {
    which("perf")
        && Command::new("perf")
            .args(["stat", "-x,", "-e", "raw_syscalls:sys_enter", "--", "true"])
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stderr).lines().any(|l| {
                        l.split(',')
                            .next()
                            .is_some_and(|c| c.trim().parse::<u64>().is_ok())
                    })
            })
}

/// Counts the server's syscalls with `perf stat` trace points during a fixed-length c64 load.
/// Unlike strace (which stops the server at every syscall, so reads rarely find an empty
/// socket) this leaves the timing nearly as it is.
fn perf_syscalls(server: &Server, dir: &Path, secs: u64) -> Result<Syscalls> {
    let out = dir.join(format!("perf-{}.csv", server.name));
    let pid = server.pid().to_string();
    let detailed: Vec<String> = ["raw_syscalls:sys_enter", "context-switches"]
        .iter()
        .map(|e| e.to_string())
        .chain(
            PERF_SYSCALLS
                .iter()
                .map(|s| format!("syscalls:sys_enter_{s}")),
        )
        .collect();
    let mut last_err = String::new();
    // Trace point names differ between architectures: fall back to the total alone.
    for events in [
        detailed.join(","),
        "raw_syscalls:sys_enter,context-switches".to_owned(),
    ] {
        let mut perf = Command::new("perf")
            .args(["stat", "-x,", "-e", &events, "-p", &pid, "-o"])
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run perf: {e}"))?;
        thread::sleep(Duration::from_millis(300));
        if let Ok(Some(st)) = perf.try_wait() {
            let mut err = String::new();
            let _ = perf.stderr.take().expect("piped").read_to_string(&mut err);
            last_err = format!("perf stat exited at once ({st}): {}", err.trim());
            continue;
        }
        let run = wrk(&server.addr, 64, secs, server.pid());
        // SAFETY: kill(2) on our own child's pid; SIGINT makes perf stat print its counts.
        unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
        let _ = perf.wait();
        let run = run?;
        let text = fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let mut sc = Syscalls {
            requests: run.wrk.requests,
            total: 0,
            by_name: Vec::new(),
            switches: None,
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split(',').collect();
            let count = f.first().and_then(|c| c.trim().parse::<u64>().ok());
            let (Some(count), Some(event)) = (count, f.get(2)) else {
                continue;
            };
            match *event {
                "raw_syscalls:sys_enter" => sc.total = count,
                "context-switches" => sc.switches = Some(count),
                e => {
                    if let Some(name) = e.strip_prefix("syscalls:sys_enter_") {
                        if count > 0 {
                            sc.by_name.push((name.to_owned(), count));
                        }
                    }
                }
            }
        }
        sc.by_name.sort_by_key(|x| std::cmp::Reverse(x.1));
        if sc.total == 0 || sc.requests == 0 {
            return Err(format!("no syscall counts in perf's output:\n{text}"));
        }
        return Ok(sc);
    }
    Err(last_err)
}

// ---------------------------------------------------------------------------------------------
// Report

struct Report<'a> {
    o: &'a Opts,
    /// runs[server][conns] = one Run per round; server 0 = plughost, 1 = baseline.
    runs: [BTreeMap<u32, Vec<Run>>; 2],
    idle_rss_kb: [u64; 2],
    allocs: Result<Allocs>,
    syscalls: [Option<Result<Syscalls>>; 2],
    perf: [Option<Result<Syscalls>>; 2],
    load_before: String,
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

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

impl Report<'_> {
    fn agg(&self, server: usize, c: u32, f: impl Fn(&Run) -> f64) -> f64 {
        median(
            self.runs[server]
                .get(&c)
                .map_or(Vec::new(), |v| v.iter().map(&f).collect()),
        )
    }

    fn render(&self) -> String {
        let o = self.o;
        let command = std::env::var("PLUGHOST_BENCH_CMD").unwrap_or_else(|_| {
            format!(
                "cargo run --release -p plughost-benches --bin bench --{}",
                o.args.iter().map(|a| format!(" {a}")).collect::<String>()
            )
        });
        let mut s = String::new();
        let _ = writeln!(s, "# plughost benchmark results\n");
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
            "- load: `wrk -t1 -cN -d{}s --latency http://127.0.0.1:PORT/hello`, N in 64 and 256, {} interleaved round{} (plughost and baseline alternate who goes first); figures are medians over the rounds, loaded RSS the maximum",
            o.duration,
            o.rounds,
            if o.rounds == 1 { "" } else { "s" }
        );
        let _ = writeln!(
            s,
            "- plughost: `target/release/plughost start` with 2 workers, the hello plugin on `/hello`, no middleware, `steal_after_us` {}; baseline: `target/release/baseline` (hyper 1 + tokio, 2 worker threads, same response)",
            match o.steal_after_us {
                Some(us) => format!("{us}"),
                None => "at its default".to_owned(),
            }
        );
        let _ = writeln!(
            s,
            "- tools: {}; {}; {}\n",
            tool_version("wrk", "-v"),
            tool_version("rustc", "--version"),
            if which("strace") {
                tool_version("strace", "-V")
            } else {
                "no strace".into()
            }
        );
        let _ = writeln!(
            s,
            "Server CPU = utime+stime delta of the server process from /proc/PID/stat over the run. wrk runs on the same 2 cores, so req/s is shared-machine throughput; requests per server-CPU-second is the efficiency figure.\n"
        );

        let _ = writeln!(
            s,
            "| metric | plughost | baseline (hyper/tokio) | plughost/baseline | target | status |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---|---|");
        for c in CONNECTIONS {
            let (p, b) = (self.agg(0, c, |r| r.wrk.rps), self.agg(1, c, |r| r.wrk.rps));
            let r = p / b;
            let _ = writeln!(
                s,
                "| req/s, c{c} | {} | {} | {r:.2}x | >= 1.0x | {} |",
                fmt_num(p),
                fmt_num(b),
                met(r >= 1.0)
            );
        }
        for c in CONNECTIONS {
            let (p, b) = (
                self.agg(0, c, Run::per_cpu_s),
                self.agg(1, c, Run::per_cpu_s),
            );
            let r = p / b;
            let _ = writeln!(
                s,
                "| requests per server-CPU-second, c{c} | {} | {} | {r:.2}x | >= 1.0x | {} |",
                fmt_num(p),
                fmt_num(b),
                met(r >= 1.0)
            );
        }
        for c in CONNECTIONS {
            // The median and p90 are not targets; they show where the p99 stands.
            for (name, pick) in [("p50", 0), ("p90", 1)] {
                let get = |r: &Run| {
                    if pick == 0 {
                        r.wrk.p50_ms
                    } else {
                        r.wrk.p90_ms
                    }
                };
                let (p, b) = (self.agg(0, c, get), self.agg(1, c, get));
                let _ = writeln!(
                    s,
                    "| {name} latency, c{c} | {p:.2} ms | {b:.2} ms | {:.2}x | (none) | - |",
                    p / b
                );
            }
            let (p, b) = (
                self.agg(0, c, |r| r.wrk.p99_ms),
                self.agg(1, c, |r| r.wrk.p99_ms),
            );
            let r = p / b;
            let _ = writeln!(
                s,
                "| p99 latency, c{c} | {p:.2} ms | {b:.2} ms | {r:.2}x | <= 1.25x | {} |",
                met(r <= 1.25)
            );
        }
        let (pi, bi) = (self.idle_rss_kb[0], self.idle_rss_kb[1]);
        let _ = writeln!(
            s,
            "| idle RSS | {:.1} MiB | {:.1} MiB | {:.2}x | plughost <= 8 MiB | {} |",
            pi as f64 / 1024.0,
            bi as f64 / 1024.0,
            pi as f64 / bi as f64,
            met(pi <= 8 * 1024)
        );
        for c in CONNECTIONS {
            let max = |server: usize| {
                self.runs[server]
                    .get(&c)
                    .map_or(0, |v| v.iter().map(|r| r.rss_max_kb).max().unwrap_or(0))
            };
            let (p, b) = (max(0), max(1));
            let _ = writeln!(
                s,
                "| loaded RSS, c{c} | {:.1} MiB | {:.1} MiB | {:.2}x | (none) | - |",
                p as f64 / 1024.0,
                b as f64 / 1024.0,
                p as f64 / b as f64
            );
        }
        match &self.allocs {
            Ok(a) => {
                let per = a.allocations as f64 / a.requests.max(1) as f64;
                let _ = writeln!(
                    s,
                    "| allocations per request (host allocator) | {per:.2} ({} / {}) | not measured | - | <= 1 | {} |",
                    fmt_num(a.allocations as f64),
                    fmt_num(a.requests as f64),
                    met(per <= 1.0)
                );
            }
            Err(e) => {
                let _ = writeln!(s, "| allocations per request (host allocator) | not measured ({}) | not measured | - | <= 1 | not measured |", e.lines().next().unwrap_or(""));
            }
        }
        let per = |x: &Option<Result<Syscalls>>| match x {
            Some(Ok(sc)) => Some(sc.total as f64 / sc.requests as f64),
            _ => None,
        };
        for (what, counts) in [
            ("perf stat trace points, c64", &self.perf),
            ("strace -c -f, c64", &self.syscalls),
        ] {
            match (per(&counts[0]), per(&counts[1])) {
                (Some(p), Some(b)) => {
                    let _ = writeln!(
                        s,
                        "| syscalls per request ({what}) | {p:.2} | {b:.2} | {:.2}x | (none) | - |",
                        p / b
                    );
                }
                (p, b) => {
                    let show =
                        |x: Option<f64>| x.map_or("not measured".to_owned(), |v| format!("{v:.2}"));
                    let _ = writeln!(
                        s,
                        "| syscalls per request ({what}) | {} | {} | - | (none) | - |",
                        show(p),
                        show(b)
                    );
                }
            }
        }
        let switches = |x: &Option<Result<Syscalls>>| match x {
            Some(Ok(sc)) => sc.switches.map(|n| n as f64 / sc.requests as f64),
            _ => None,
        };
        if let (Some(p), Some(b)) = (switches(&self.perf[0]), switches(&self.perf[1])) {
            let _ = writeln!(
                s,
                "| context switches per request (perf, c64) | {p:.3} | {b:.3} | {:.2}x | (none) | - |",
                p / b
            );
        }

        // Per-round figures.
        let _ = writeln!(s, "\n## Every run\n");
        let _ = writeln!(s, "| round | conns | server | req/s | p99 | requests | server CPU s | req per CPU-s | max RSS | errors |");
        let _ = writeln!(s, "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for round in 0..o.rounds {
            for c in CONNECTIONS {
                for (server, name) in [(0, "plughost"), (1, "baseline")] {
                    if let Some(r) = self.runs[server].get(&c).and_then(|v| v.get(round)) {
                        let _ = writeln!(
                            s,
                            "| {} | {c} | {name} | {} | {:.2} ms | {} | {:.2} | {} | {:.1} MiB | {} |",
                            round + 1,
                            fmt_num(r.wrk.rps),
                            r.wrk.p99_ms,
                            fmt_num(r.wrk.requests as f64),
                            r.cpu_s,
                            fmt_num(r.per_cpu_s()),
                            r.rss_max_kb as f64 / 1024.0,
                            r.wrk.errors
                        );
                    }
                }
            }
        }

        // Where the server CPU went, by thread.
        let _ = writeln!(s, "\n## Server CPU by thread (all runs)\n");
        for (server, name) in [(0, "plughost"), (1, "baseline")] {
            let mut sum: BTreeMap<String, u64> = BTreeMap::new();
            let mut requests = 0u64;
            for runs in self.runs[server].values() {
                for r in runs {
                    requests += r.wrk.requests;
                    for (k, v) in &r.threads {
                        *sum.entry(k.clone()).or_insert(0) += v;
                    }
                }
            }
            let total: u64 = sum.values().sum();
            let mut parts: Vec<(String, u64)> = sum.into_iter().filter(|(_, v)| *v > 0).collect();
            parts.sort_by_key(|x| std::cmp::Reverse(x.1));
            let list: Vec<String> = parts
                .iter()
                .map(|(k, v)| format!("`{k}` {:.0}%", 100.0 * *v as f64 / total.max(1) as f64))
                .collect();
            let _ = writeln!(
                s,
                "- {name}: {:.1} µs CPU per request; {}",
                1e6 * total as f64 / clock_ticks() / requests.max(1) as f64,
                list.join(", ")
            );
        }

        // Syscalls.
        let _ = writeln!(s, "\n## Syscalls per request\n");
        let _ = writeln!(
            s,
            "perf stat counts syscall trace points and barely slows the server; strace stops it at every syscall, so under strace a read almost always finds data waiting and its count is a lower bound.\n"
        );
        for (method, counts) in [("perf stat", &self.perf), ("strace", &self.syscalls)] {
            for (i, name) in [(0, "plughost"), (1, "baseline")] {
                match &counts[i] {
                    Some(Ok(sc)) => {
                        let top: Vec<String> = sc
                            .by_name
                            .iter()
                            .take(8)
                            .map(|(n, c)| format!("{n} {:.2}", *c as f64 / sc.requests as f64))
                            .collect();
                        let _ = writeln!(
                            s,
                            "- {name} ({method}): {:.2} per request ({} calls / {} requests): {}",
                            sc.total as f64 / sc.requests as f64,
                            fmt_num(sc.total as f64),
                            fmt_num(sc.requests as f64),
                            top.join(", ")
                        );
                    }
                    Some(Err(e)) => {
                        let _ = writeln!(
                            s,
                            "- {name} ({method}): not measured ({})",
                            e.lines().next().unwrap_or("")
                        );
                    }
                    None => {
                        let _ = writeln!(
                            s,
                            "- {name} ({method}): not measured ({method} not usable here, or --no-strace)"
                        );
                    }
                }
            }
        }
        let _ = writeln!(
            s,
            "\nAllocations per request come from an `alloc-stats` build of plughost (`target/bench-alloc`): the delta of `allocations:` over the delta of `requests:` from `plughost info` around one {}-second c64 wrk run, after a 1-second warm-up. The counter is the global allocator of the plughost binary: allocations a plugin makes with the allocator linked into its own `.so` are not counted (the micro-benchmarks print the hello handler's own allocations per call). Targets are reported, never asserted.",
            self.o.duration.min(5)
        );
        s
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    match real_main() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(1);
        }
    }
}

fn real_main() -> Result<()> {
    let o = parse_args()?;
    if !which("wrk") {
        return Err("wrk is not installed: apt-get install -y wrk (benches/run.sh does it)".into());
    }
    let b = build(&o)?;
    let dir = std::env::temp_dir().join(format!("plughost-bench-{}", std::process::id()));
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
    let config = plughost_config(&dir.join("main"), &b.hello, o.steal_after_us)?;
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
        log(format!("warm-up: {} (1 s at c256)", s.name));
        wrk(&s.addr, 256, 1, s.pid())?;
    }
    let mut runs: [BTreeMap<u32, Vec<Run>>; 2] = Default::default();
    for round in 0..o.rounds {
        for c in CONNECTIONS {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let s = &servers[i];
                let r = wrk(&s.addr, c, o.duration, s.pid())?;
                log(format!(
                    "round {}/{} c{c} {:<8} {:>9} req/s  p99 {:>7.2} ms  {:>9} req/CPU-s  rss {} kB  errors {}",
                    round + 1,
                    o.rounds,
                    s.name,
                    fmt_num(r.wrk.rps),
                    r.wrk.p99_ms,
                    fmt_num(r.per_cpu_s()),
                    r.rss_max_kb,
                    r.wrk.errors
                ));
                runs[i].entry(c).or_default().push(r);
            }
        }
    }

    let short = o.duration.min(5);
    let mut syscalls: [Option<Result<Syscalls>>; 2] = [None, None];
    let mut perf: [Option<Result<Syscalls>>; 2] = [None, None];
    if o.strace && perf_usable() {
        for (i, s) in servers.iter().enumerate() {
            log(format!(
                "counting syscalls of {} ({short} s at c64, perf stat)",
                s.name
            ));
            let r = perf_syscalls(s, dir, short);
            if let Err(e) = &r {
                log(format!("perf stat failed: {e}"));
            }
            perf[i] = Some(r);
        }
    }
    if o.strace && which("strace") {
        for (i, s) in servers.iter().enumerate() {
            log(format!(
                "counting syscalls of {} ({short} s at c64 under strace)",
                s.name
            ));
            let r = count_syscalls(s, dir, short);
            if let Err(e) = &r {
                log(format!("strace failed: {e}"));
            }
            syscalls[i] = Some(r);
        }
    }
    for s in servers {
        s.stop();
    }

    log(format!("allocations: alloc-stats build, {short} s at c64"));
    let allocs = measure_allocs(b, dir, short, o.steal_after_us);
    if let Err(e) = &allocs {
        log(format!("allocation count failed: {e}"));
    }

    Ok(Report {
        o,
        runs,
        idle_rss_kb,
        allocs,
        syscalls,
        perf,
        load_before,
    }
    .render())
}
