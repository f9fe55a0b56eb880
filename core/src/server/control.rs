//! The control socket in the runtime folder (mode 0600): `plughost info` asks the running
//! server over it.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    thread,
    time::Duration,
};

use super::state::State;
use crate::{
    jobs,
    plugin::{loader, registry::Registry},
    runtime::alloc,
};

/// The socket's path in a runtime folder.
pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("plughost.sock")
}

/// The control socket of this server process.
#[derive(Debug)]
pub struct Control {
    path: PathBuf,
    /// The socket file's inode: after a zero-downtime restart the path is the new server's.
    inode: u64,
}

impl Control {
    /// Removes the socket file, unless another server process bound the path since.
    pub fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Listens on `path` and answers commands on a thread of its own.
pub fn serve(path: &Path, state: Arc<State>) -> std::io::Result<Control> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let inode = std::fs::symlink_metadata(path)?.ino();
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let mut reader = BufReader::new(&stream);
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let answer = match line.trim() {
                    "info" => info(&state),
                    other => format!("unknown command {other:?}; known: info\n"),
                };
                let _ = (&stream).write_all(answer.as_bytes());
            }
        })?;
    Ok(Control {
        path: path.to_path_buf(),
        inode,
    })
}

/// Sends `command` to the server behind `path` and returns its answer.
pub fn ask(path: &Path, command: &str) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

fn info(state: &State) -> String {
    let stats = &state.stats;
    let registry = state.registry.read().map(|r| r.clone()).ok();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "plughost {} (plugin-api {})",
        env!("CARGO_PKG_VERSION"),
        plughost_plugin_api::API_VERSION
    );
    let _ = writeln!(
        s,
        "app version: {}",
        if state.app_version.is_empty() {
            "-"
        } else {
            &state.app_version
        }
    );
    let _ = writeln!(s, "pid: {}", std::process::id());
    if let Some(line) = &state.supervisor {
        let _ = writeln!(s, "supervisor: {line}");
    }
    let _ = writeln!(s, "config: {}", state.config_path.display());
    let _ = writeln!(s, "listen: {}", state.listen);
    let _ = writeln!(s, "workers: {}", state.workers);
    let _ = writeln!(s, "uptime: {}s", stats.started.elapsed().as_secs());
    let _ = writeln!(s, "requests: {}", stats.sum(|w| &w.requests));
    let _ = writeln!(s, "connections: {}", stats.sum(|w| &w.connections));
    workers_info(&mut s, state);
    let _ = writeln!(
        s,
        "static files: {} responses, {} sent with sendfile ({} bytes)",
        stats.sum(|w| &w.static_responses),
        stats.sum(|w| &w.sendfile_responses),
        stats.sum(|w| &w.sendfile_bytes)
    );
    let _ = writeln!(s, "panics: {}", stats.sum(|w| &w.panics));
    let _ = writeln!(
        s,
        "panics outside calls (drops, plugin threads): {}",
        state.stray_panics.load(Ordering::Relaxed)
    );
    let _ = writeln!(s, "recycles: {}", stats.sum(|w| &w.recycles));
    let _ = writeln!(
        s,
        "large request bodies: {} bytes in flight, {} refused (503) past limits.max_inflight_body_bytes",
        stats.bodies_in_flight.load(Ordering::Relaxed),
        stats.bodies_refused.load(Ordering::Relaxed)
    );
    let _ = writeln!(s, "{}", state.deferrals.info());
    let _ = writeln!(s, "{}", crate::ws::deflate::TOTALS.line());
    let _ = writeln!(
        s,
        "reloads: {} ok, {} failed",
        stats.reloads.load(Ordering::Relaxed),
        stats.reload_failures.load(Ordering::Relaxed)
    );
    if let Some(last) = state.last_reload.lock().ok().and_then(|l| l.clone()) {
        let _ = writeln!(s, "last reload: {last}");
    }
    jobs::info(&mut s, &stats.services);
    state.tables.info(&mut s);
    let (count, bytes) = loader::held();
    let _ = writeln!(
        s,
        "library versions held: {count} ({} kB of library files; old versions stay mapped, abi_stable cannot unload)",
        bytes / 1024
    );
    if let Some(n) = alloc::count() {
        let _ = writeln!(s, "allocations: {n}");
    }
    plugins_info(&mut s, registry);
    s
}

/// Each worker's line.
fn workers_info(s: &mut String, state: &State) {
    let stats = &state.stats;
    let ws = state.connections.per_worker(stats.workers.len());
    for (i, w) in stats.workers.iter().enumerate() {
        let _ = writeln!(
            s,
            "  worker {i}: {} requests, {} connections, {} panics, {} connections taken over, {} accepted from a stalled worker's backlog, {} websocket connections with {} messages queued and {} bytes in their buffers",
            w.requests.load(Ordering::Relaxed),
            w.connections.load(Ordering::Relaxed),
            w.panics.load(Ordering::Relaxed),
            w.taken_over.load(Ordering::Relaxed),
            w.from_backlog.load(Ordering::Relaxed),
            ws[i].0,
            ws[i].1,
            w.ws_buffered.load(Ordering::Relaxed)
        );
    }
}

/// The loaded plugins and their components.
fn plugins_info(s: &mut String, registry: Option<Arc<Registry>>) {
    if let Some(registry) = registry {
        let _ = writeln!(s, "plugins:");
        for (name, lib) in &registry.libraries {
            let _ = writeln!(
                s,
                "  {name} {} (plugin-api {}) {}",
                lib.manifest.version,
                lib.manifest.api_version,
                lib.path.display()
            );
            for c in lib.manifest.components.iter() {
                let _ = writeln!(s, "    {} {}", c.kind, c.name);
            }
        }
    }
}
