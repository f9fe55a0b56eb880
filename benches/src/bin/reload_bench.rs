//! Hot-reload figures: the time from a new `.so` landing in the watched folder to the first
//! response from the new version (median of N reloads), and RSS growth per reload (old library
//! versions stay mapped). Release builds; the hello plugin alternates between two builds.
//!
//! Run: `cargo run --release -p plughost-benches --bin reload_bench -- [--reloads 20] [--debounce-ms 100] [--no-build]`
//! Writes benches/RELOAD_RESULTS.md.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use plughost_benches::root;

type Result<T> = std::result::Result<T, String>;

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or(format!("{cmd:?} failed: {status}"))
}

/// Builds the server, hello, and a second hello whose greeting differs.
fn build(work: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let root = root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "plughost",
        "-p",
        "hello",
    ]))?;
    let krate = work.join("hello-v2");
    std::fs::create_dir_all(krate.join("src")).map_err(|e| e.to_string())?;
    std::fs::write(
        krate.join("Cargo.toml"),
        format!(
            "[package]\nname = \"hello-v2\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
             [dependencies]\nplughost-plugin-api = {{ path = {:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\n\
             [profile.release]\ndebug = \"line-tables-only\"\n\n[workspace]\n",
            root.join("plugin-api").to_string_lossy()
        ),
    )
    .map_err(|e| e.to_string())?;
    std::fs::copy(root.join("Cargo.lock"), krate.join("Cargo.lock")).map_err(|e| e.to_string())?;
    let src = std::fs::read_to_string(root.join("plugins/hello/src/lib.rs"))
        .map_err(|e| e.to_string())?;
    std::fs::write(
        krate.join("src/lib.rs"),
        src.replace("{} from plughost", "{} from plughost v2"),
    )
    .map_err(|e| e.to_string())?;
    run(Command::new(&cargo)
        .current_dir(&krate)
        .args(["build", "--release", "--quiet"])
        .env("CARGO_TARGET_DIR", root.join("target")))?;
    let release = root.join("target/release");
    Ok((
        release.join("plughost"),
        release.join("libhello.so"),
        release.join("libhello_v2.so"),
    ))
}

/// GET /hello on a fresh connection; the body.
fn get(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

/// Puts `from` at `to` the way a deploy does: copy beside it, then rename over it.
fn install(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("so.tmp");
    std::fs::copy(from, &tmp).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, to).map_err(|e| e.to_string())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("reload_bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(default)
    };
    let reloads = opt("--reloads", 20) as usize;
    let debounce = opt("--debounce-ms", 100);
    let work = std::env::temp_dir().join(format!("plughost-reload-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("plugins")).map_err(|e| e.to_string())?;
    let root = root();
    let (server, v1, v2) = if args.iter().any(|a| a == "--no-build") {
        let r = root.join("target/release");
        (
            r.join("plughost"),
            r.join("libhello.so"),
            r.join("libhello_v2.so"),
        )
    } else {
        build(&work)?
    };
    let plugin = work.join("plugins/libhello.so");
    install(&v1, &plugin)?;
    let config = work.join("server.ron");
    std::fs::write(
        &config,
        format!(
            "(listen: \"127.0.0.1:0\", worker_num: 2, runtime_dir: \"run\", log: (level: \"info\"),\n\
             reload: (inotify: true, debounce_ms: {debounce}),\n\
             plugins: {{ \"hello\": (path: \"plugins/libhello.so\") }},\n\
             routes: [(path: \"/hello\", handler: \"hello.hello\")])\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut child: Child = Command::new(&server)
        .args(["start", "-c"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the server did not get ready".to_string())?;
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap_or("").to_owned();
        }
    };
    let pid = child.id();
    let bodies = [
        get(&addr).ok_or("first GET failed")?,
        "hello from plughost v2\n".to_owned(),
    ];
    let rss_before = plughost_benches::rss_kb(pid);
    let mut latencies = Vec::new();
    for i in 0..reloads {
        let (from, want) = if i % 2 == 0 {
            (&v2, &bodies[1])
        } else {
            (&v1, &bodies[0])
        };
        let started = Instant::now();
        install(from, &plugin)?;
        loop {
            if get(&addr).as_ref() == Some(want) {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("reload {i} not served within 30 s"));
            }
            thread::sleep(Duration::from_millis(1));
        }
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        // Let the previous reload's log line and swap settle before the next one.
        thread::sleep(Duration::from_millis(debounce + 50));
    }
    let rss_after = plughost_benches::rss_kb(pid);
    let info = Command::new(&server)
        .args(["info", "-c"])
        .arg(&config)
        .output()
        .map_err(|e| e.to_string())?;
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    let held = info
        .lines()
        .find(|l| l.starts_with("library versions held"))
        .unwrap_or("library versions held: ?")
        .to_owned();
    // SAFETY: plain signal to our child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&work);

    let mut sorted = latencies.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let so_kib = std::fs::metadata(&v1).map(|m| m.len() / 1024).unwrap_or(0);
    let growth = (rss_after as f64 - rss_before as f64) / reloads as f64;
    let report = format!(
        "# plughost hot-reload results\n\n\
         - command: `cargo run --release -p plughost-benches --bin reload_bench -- --reloads {reloads} --debounce-ms {debounce}`\n\
         - the hello plugin (release, {so_kib} KiB) alternates between two builds, installed by copy + rename into the watched folder; \
         the time runs from the rename to the first `GET /hello` (new connection, polled every 1 ms) that answers with the new text\n\
         - the debounce ({debounce} ms, the default is 100) is part of the figure: the watcher waits that long for quiet before it reloads\n\n\
         | metric | value |\n|---|---:|\n\
         | reloads | {reloads} |\n\
         | .so written -> first new response, median | {:.1} ms |\n\
         | p90 | {:.1} ms |\n\
         | max | {:.1} ms |\n\
         | median minus the debounce | {:.1} ms |\n\
         | RSS before | {:.1} MiB |\n\
         | RSS after | {:.1} MiB |\n\
         | RSS growth per reload | {:.0} KiB |\n\
         | {held} | |\n",
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.9),
        sorted[sorted.len() - 1],
        percentile(&sorted, 0.5) - debounce as f64,
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        growth,
    );
    print!("{report}");
    std::fs::write(root.join("benches/RELOAD_RESULTS.md"), report).map_err(|e| e.to_string())?;
    Ok(())
}
