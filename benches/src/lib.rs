//! What the benchmark binaries share: reading /proc for CPU and memory, medians, and the
//! facts about the machine each report starts with.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime in clock ticks, and the thread/process name, from a `stat` file.
pub fn stat_ticks(path: &Path) -> Option<(String, u64)> {
    let text = fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    // Fields after the name start at field 3 (state); utime is field 14, stime field 15.
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

pub fn cpu_ticks(pid: u32) -> u64 {
    stat_ticks(Path::new(&format!("/proc/{pid}/stat"))).map_or(0, |(_, t)| t)
}

/// CPU ticks per thread, keyed by `name` (threads of the same name are summed).
pub fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    if let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            if let Some((comm, t)) = stat_ticks(&e.path().join("stat")) {
                *out.entry(comm).or_insert(0) += t;
            }
        }
    }
    out
}

/// VmRSS in kB.
pub fn rss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `YYYY-MM-DD HH:MM UTC` without a date crate.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

pub fn machine() -> String {
    let nproc = thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or_else(String::new, |kb| {
            format!(", {:.0} GiB RAM", kb as f64 / 1048576.0)
        });
    format!("{nproc} CPUs ({cpu}){mem}, Linux {kernel}")
}

/// The 1-minute load average: anything well above the servers' and wrk's own share means
/// other work shared the cores and the figures are noisier.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

pub fn tool_version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

/// A running server; stopped with SIGTERM when dropped.
pub struct Server {
    /// What the reports call it.
    pub name: &'static str,
    child: Child,
    /// `IP:PORT` from the ready line.
    pub addr: String,
    /// What it printed before its ready line.
    pub output: Vec<String>,
    /// The process that serves: the `pid N` of the ready line (plughost's server process,
    /// under its supervisor), else the spawned process.
    server_pid: u32,
}

impl Server {
    /// Spawns `cmd` and reads `stream` (stdout or stderr) until `listening on http://ADDR`.
    pub fn start(
        name: &'static str,
        mut cmd: Command,
        from_stderr: bool,
    ) -> Result<Server, String> {
        cmd.stdin(Stdio::null());
        if from_stderr {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        } else {
            cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let pipe: Box<dyn Read + Send> = if from_stderr {
            Box::new(child.stderr.take().expect("piped"))
        } else {
            Box::new(child.stdout.take().expect("piped"))
        };
        let (tx, rx) = mpsc::channel::<String>();
        thread::Builder::new()
            .name(format!("{name}-output"))
            .spawn(move || {
                // Forward lines until the ready line, then keep draining so the server never
                // blocks on a full pipe; warnings and errors are still shown.
                let mut ready = false;
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if !ready {
                        ready = line.contains("listening on http://");
                        let _ = tx.send(line);
                    } else if line.contains("WARN") || line.contains("ERROR") {
                        eprintln!("[{name}] {line}");
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr: String =
                            rest.chars().take_while(|c| !c.is_whitespace()).collect();
                        let server_pid = rest
                            .split("pid ")
                            .nth(1)
                            .and_then(|p| p.trim_end_matches(')').trim().parse().ok())
                            .unwrap_or(child.id());
                        eprintln!("[bench] {name} ready on {addr} (pid {server_pid})");
                        return Ok(Server {
                            name,
                            child,
                            addr,
                            output: seen,
                            server_pid,
                        });
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{name} did not print `listening on http://ADDR` within 30 s; its output:\n{}",
                        seen.join("\n")
                    ));
                }
            }
        }
    }

    /// The pid of the process that serves (for CPU, RSS and syscall counts).
    pub fn pid(&self) -> u32 {
        self.server_pid
    }

    /// Stops it: SIGTERM, then SIGKILL after 15 s.
    pub fn stop(mut self) -> Option<ExitStatus> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "[bench] {} did not stop on SIGTERM within 15 s; killing it",
            self.name
        );
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// The workspace root (this crate lives in `benches/`).
pub fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_path_buf()
}

/// Runs cargo with `args` in the workspace root.
pub fn cargo(args: &[&str]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("[bench] cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !status.success() {
        return Err(format!("cargo {} failed: {status}", args.join(" ")));
    }
    Ok(())
}

/// The baselines' `main`: binds the address given as the first argument (default
/// `127.0.0.1:0`), prints `listening on http://ADDR` on stdout once it accepts (what
/// [`Server::start`] waits for), and runs `serve` for each connection on a tokio runtime with
/// 2 worker threads; `runtime` may add to the runtime's builder. Stops on SIGTERM (the
/// default action).
pub fn serve_tokio<F, Fut>(runtime: impl FnOnce(&mut tokio::runtime::Builder), serve: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .expect("an address such as 127.0.0.1:0");
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_io();
    runtime(&mut builder);
    let runtime = builder.build().expect("a tokio runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let local = listener.local_addr().expect("local address");
        let mut out = std::io::stdout().lock();
        let _ = std::io::Write::write_fmt(&mut out, format_args!("listening on http://{local}\n"));
        let _ = std::io::Write::flush(&mut out);
        drop(out);
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve(stream));
                }
                Err(e) => eprintln!("accept: {e}"),
            }
        }
    });
}
