//! Task worker and cron figures, through the real server with the `fixture-tasks` plugin, each
//! beside an in-process baseline measured in the same run:
//!
//! - tasks per second through `deliver` -> `handle` (an HTTP worker delivers N tasks as fast as
//!   the queue takes them; two task workers handle them), and the deliver-to-handle latency
//!   p50/p99; baseline: a `std::sync::mpsc` channel shared by two threads, same payload;
//! - cron tick jitter (p50/p99/max distance from the fixed-rate schedule) of a 10 ms job on an
//!   idle server; baseline: a thread sleeping until each 10 ms deadline.
//!
//! Usage: `cargo run -p plughost-benches --bin jobs_bench -- [--release] [--n N] [--secs S]`.
//! Without `--release` it builds and measures debug binaries (cheaper on a shared machine, and
//! slower: compare the ratios, not the absolute figures).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

type Result<T> = std::result::Result<T, String>;

struct Opts {
    release: bool,
    n: u64,
    secs: u64,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        release: false,
        n: 100_000,
        secs: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<u64> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{what} needs a number"))
        };
        match a.as_str() {
            "--release" => o.release = true,
            "--n" => o.n = num("--n")?,
            "--secs" => o.secs = num("--secs")?,
            "-h" | "--help" => {
                println!("usage: jobs_bench [--release] [--n TASKS] [--secs JITTER_SECONDS]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_path_buf()
}

/// Kills the server on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(o: &Opts, dir: &Path) -> Result<(Server, SocketAddr)> {
    let profile = if o.release { "release" } else { "debug" };
    let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    build
        .current_dir(root())
        .args(["build", "-p", "plughost", "-p", "fixture-tasks"]);
    if o.release {
        build.arg("--release");
    }
    let status = build.status().map_err(|e| format!("cargo: {e}"))?;
    if !status.success() {
        return Err("the build failed".into());
    }
    let target = root().join("target").join(profile);
    let config = format!(
        r#"(
    listen: "127.0.0.1:0",
    worker_num: 1,
    runtime_dir: "{dir}/run",
    log: (level: "warn"),
    task_worker_num: 2,
    task_queue_size: 65536,
    plugins: {{ "tasks": (path: "{lib}") }},
    routes: [ (path: "/t/*", handler: "tasks.ctl") ],
    timer: (enable: true, jobs: [(job: "tasks.jitter", interval_ms: 10, immediate: true)]),
)"#,
        dir = dir.display(),
        lib = target.join("libfixture_tasks.so").display()
    );
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let path = dir.join("server.ron");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let mut child = Command::new(target.join("plughost"))
        .arg("start")
        .arg("-c")
        .arg(&path)
        .arg("-i")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start plughost: {e}"))?;
    // The ready line is logged at info, below our warn level: find the port in `info`.
    let stderr = child.stderr.take().expect("piped");
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            eprintln!("[server] {line}");
        }
    });
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(target.join("plughost"))
            .args(["info", "-c"])
            .arg(&path)
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(addr) = text
            .lines()
            .find_map(|l| l.strip_prefix("listen: http://"))
            .and_then(|a| a.trim().parse().ok())
        {
            return Ok((server, addr));
        }
        if Instant::now() > deadline {
            return Err("the server did not start".into());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(600))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(text))
}

fn field(text: &str, key: &str) -> f64 {
    text.split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    if v.is_empty() {
        0
    } else {
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

/// Two threads take timestamps from one channel: tasks/s and latency p50/p99 (us).
fn baseline_queue(n: u64) -> (f64, u64, u64) {
    let (tx, rx) = mpsc::sync_channel::<Instant>(65536);
    let rx = Arc::new(Mutex::new(rx));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let rx = rx.clone();
            thread::spawn(move || {
                let mut lat = Vec::new();
                loop {
                    let msg = rx.lock().unwrap().recv();
                    match msg {
                        Ok(sent) => lat.push(sent.elapsed().as_nanos() as u64),
                        Err(_) => return (lat, Instant::now()),
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    for _ in 0..n {
        tx.send(Instant::now()).unwrap();
    }
    drop(tx);
    let mut lat = Vec::new();
    let mut end = start;
    for h in handles {
        let (l, e) = h.join().unwrap();
        lat.extend(l);
        end = end.max(e);
    }
    let rate = n as f64 / (end - start).as_secs_f64();
    (rate, pct(&mut lat, 0.5) / 1000, pct(&mut lat, 0.99) / 1000)
}

/// A thread sleeping until each 10 ms deadline: jitter p50/p99/max (us).
fn baseline_ticks(secs: u64) -> (u64, u64, u64) {
    let start = Instant::now();
    let interval = Duration::from_millis(10);
    let mut jitter = Vec::new();
    let mut k = 1u32;
    while start.elapsed() < Duration::from_secs(secs) {
        let due = start + interval * k;
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
        jitter.push(Instant::now().duration_since(due).as_nanos() as u64);
        k += 1;
    }
    let max = jitter.iter().copied().max().unwrap_or(0) / 1000;
    (
        pct(&mut jitter, 0.5) / 1000,
        pct(&mut jitter, 0.99) / 1000,
        max,
    )
}

fn main() {
    if let Err(e) = run() {
        eprintln!("jobs_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let o = parse_args()?;
    let dir = std::env::temp_dir().join(format!("plughost-jobs-bench-{}", std::process::id()));
    let (server, addr) = start(&o, &dir)?;

    // Cron jitter on an idle server: clear the ticks so far, wait, report.
    get(addr, "/t/report")?;
    thread::sleep(Duration::from_secs(o.secs));
    let idle = get(addr, "/t/report")?;
    let (bj50, bj99, bjmax) = baseline_ticks(o.secs);

    // Tasks: one HTTP request delivers N, then wait for the task workers to handle them all.
    let started = Instant::now();
    let delivered = get(addr, &format!("/t/bench?n={}", o.n))?;
    let report = loop {
        let r = get(addr, "/t/report")?;
        if field(&r, "done") as u64 >= o.n || started.elapsed() > Duration::from_secs(600) {
            break r;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let (brate, b50, b99) = baseline_queue(o.n);
    // Latency when the queue is not the bottleneck: 2000 tasks, one every 500 us.
    let paced_n = 2000;
    get(addr, &format!("/t/bench?n={paced_n}&gap_us=500"))?;
    let paced = loop {
        let r = get(addr, "/t/report")?;
        if field(&r, "done") as u64 >= paced_n || started.elapsed() > Duration::from_secs(600) {
            break r;
        }
        thread::sleep(Duration::from_millis(50));
    };
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);

    let profile = if o.release { "release" } else { "debug" };
    let rate = field(&report, "rate");
    println!(
        "jobs_bench ({profile} build, {} tasks, 2 task workers, {} s of 10 ms ticks)",
        o.n, o.secs
    );
    println!("  {}", delivered.trim());
    println!(
        "  deliver -> handle: {rate:.0} tasks/s, latency p50 {} us, p99 {} us",
        field(&report, "p50_us"),
        field(&report, "p99_us")
    );
    println!(
        "  baseline (std mpsc, 2 threads): {brate:.0} msgs/s, p50 {b50} us, p99 {b99} us; ratio {:.2}x",
        rate / brate
    );
    println!(
        "  paced (one task every 500 us): latency p50 {} us, p99 {} us",
        field(&paced, "p50_us"),
        field(&paced, "p99_us")
    );
    println!(
        "  cron 10 ms tick jitter ({} ticks): p50 {} us, p99 {} us, max {} us",
        field(&idle, "ticks"),
        field(&idle, "jitter_p50_us"),
        field(&idle, "jitter_p99_us"),
        field(&idle, "jitter_max_us")
    );
    println!(
        "  baseline (thread::sleep to each deadline): p50 {bj50} us, p99 {bj99} us, max {bjmax} us"
    );
    Ok(())
}
