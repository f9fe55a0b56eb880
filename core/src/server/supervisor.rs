//! The supervisor: what `plughost start` runs. It owns the listening sockets and the pid
//! file, and runs the server as a child process (`plughost serve`) on those sockets. A
//! plugin's segfault, abort or `exit` cannot be caught inside the server: when the child dies
//! the supervisor logs how, and which plugin component each thread was inside (from the
//! record of calls it shares with the child, see `runtime::calls`), and starts a new child at
//! once on the same sockets, so connections wait in the backlog instead of being refused.
//! `plughost restart` (SIGUSR2) starts a new child beside the running one and, once it
//! serves, has the old one drain: a restart with no connection refused, which also frees the
//! library versions reloads leave mapped.

use std::{
    collections::VecDeque,
    ffi::OsString,
    io::{BufRead, BufReader},
    net::TcpListener,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::{CommandExt, ExitStatusExt},
    },
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use signal_hook::{
    consts::{SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2},
    iterator::Signals,
};

use crate::{config::Loaded, runtime::calls};

/// The exit status of a supervisor that gave up: the server kept crashing.
pub const CRASH_LOOP_EXIT: i32 = 70;

/// Environment variables through which the supervisor hands things to the server process.
pub mod env {
    /// The listening sockets' descriptors, comma-separated, one per worker.
    pub const LISTEN_FDS: &str = "PLUGHOST_LISTEN_FDS";
    /// A pipe to write `ready` to once serving.
    pub const READY_FD: &str = "PLUGHOST_READY_FD";
    /// The shared record of calls into plugin code.
    pub const CALLS_FD: &str = "PLUGHOST_CALLS_FD";
    /// The supervisor's line for `info`.
    pub const INFO: &str = "PLUGHOST_SUPERVISOR";
    /// Set for a restart: the running server holds the fixed ports and socket files of
    /// `sockets`, which the new one shares (and takes over) instead of refusing them.
    pub const SHARE_SOCKETS: &str = "PLUGHOST_SHARE_SOCKETS";
}

/// What the supervisor waits for.
#[derive(Debug)]
enum Event {
    Signal(i32),
    Ready(u32),
    /// The server process could not start, and says why.
    Failed(u32, String),
    Exited(u32, ExitStatus),
}

/// One server process.
#[derive(Debug)]
struct Child {
    pid: u32,
    /// Its record of calls into plugin code, read after it died.
    calls: OwnedFd,
    ready: bool,
}

/// The supervisor's state.
struct Supervisor<'a> {
    listeners: &'a [TcpListener],
    /// Arguments of `plughost serve` (the config, `-e`, `-x`).
    args: Vec<OsString>,
    events: mpsc::Sender<Event>,
    max_crashes: usize,
    window: Duration,
    /// The child serving (or starting to).
    current: Option<Child>,
    /// A new child starting for a restart.
    next: Option<Child>,
    /// Children that handed over and drain.
    old: Vec<Child>,
    crashes: VecDeque<Instant>,
    restarts: u64,
    last_crash: Option<String>,
    stopping: bool,
    /// Why the first server process could not start, as it said.
    start_error: Option<String>,
}

/// How supervising ended.
#[derive(Debug)]
pub struct Outcome {
    /// The exit status for the supervisor.
    pub code: i32,
    /// Why the server never started, when it did not.
    pub start_error: Option<String>,
}

/// Supervises server processes on `listeners` until told to stop; returns the exit status.
/// `ready` is called once, when the first server process serves.
pub fn run(
    loaded: &Loaded,
    listeners: &[TcpListener],
    args: Vec<OsString>,
    ready: impl FnOnce(),
) -> Outcome {
    let fail = |code| Outcome {
        code,
        start_error: None,
    };
    let signals = match Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return fail(1);
        }
    };
    let (events, rx) = mpsc::channel();
    if let Err(e) = super::forward_signals(signals, events.clone(), Event::Signal) {
        log::error!("cannot start the signal thread: {e}");
        return fail(1);
    }
    let s = &loaded.config.supervisor;
    let mut sup = Supervisor {
        listeners,
        args,
        events,
        max_crashes: s.max_crashes.max(1) as usize,
        window: Duration::from_secs(s.crash_window_secs),
        current: None,
        next: None,
        old: Vec::new(),
        crashes: VecDeque::new(),
        restarts: 0,
        last_crash: None,
        stopping: false,
        start_error: None,
    };
    match sup.spawn(false) {
        Ok(child) => sup.current = Some(child),
        Err(e) => {
            log::error!("cannot start the server process: {e}");
            return fail(1);
        }
    }
    log::info!(
        "supervisor (pid {}) started the server process (pid {})",
        std::process::id(),
        sup.current.as_ref().map_or(0, |c| c.pid)
    );
    let mut ready = Some(ready);
    loop {
        let Ok(event) = rx.recv() else {
            return fail(1);
        };
        let outcome = match event {
            Event::Signal(signal) => sup.on_signal(signal),
            Event::Ready(pid) => {
                if sup.on_ready(pid) {
                    if let Some(ready) = ready.take() {
                        ready();
                    }
                }
                None
            }
            Event::Failed(pid, why) => {
                if sup.current.as_ref().is_some_and(|c| c.pid == pid) {
                    sup.start_error = Some(why);
                }
                None
            }
            Event::Exited(pid, status) => sup.on_exit(pid, status, ready.is_some()),
        };
        if let Some(code) = outcome {
            return Outcome {
                code,
                start_error: sup.start_error.take(),
            };
        }
    }
}

/// How a process ended, in words.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("died of {} (signal {signal})", signal_name(signal)),
        _ => format!("ended ({status})"),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGSYS => "SIGSYS",
        _ => "a signal",
    }
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(pid as i32, signal) };
}

impl Supervisor<'_> {
    /// Starts a server process on the listeners; `beside` another one that serves (a
    /// restart).
    fn spawn(&self, beside: bool) -> std::io::Result<Child> {
        let calls = calls::create()?;
        let (ready_r, ready_w) = pipe()?;
        let mut keep: Vec<RawFd> = self.listeners.iter().map(|l| l.as_raw_fd()).collect();
        let fds: Vec<String> = keep.iter().map(|fd| fd.to_string()).collect();
        keep.push(ready_w.as_raw_fd());
        keep.push(calls.as_raw_fd());
        let last = self.last_crash.as_deref().unwrap_or("none");
        let info = format!(
            "pid {}, restarts {}, last crash: {last}",
            std::process::id(),
            self.restarts
        );
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("serve")
            .args(&self.args)
            .env(env::LISTEN_FDS, fds.join(","))
            .env(env::READY_FD, ready_w.as_raw_fd().to_string())
            .env(env::CALLS_FD, calls.as_raw_fd().to_string())
            .env(env::INFO, info)
            .stdin(Stdio::null());
        if beside {
            cmd.env(env::SHARE_SOCKETS, "1");
        }
        // SAFETY: only async-signal-safe calls between fork and exec: fcntl and prctl.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &keep {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // The server goes when the supervisor goes, even killed with SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut process = cmd.spawn()?;
        drop(ready_w);
        let pid = process.id();
        let tx = self.events.clone();
        let reader = thread::Builder::new()
            .name(format!("ready-{pid}"))
            .spawn(move || {
                let mut line = String::new();
                let read = BufReader::new(std::fs::File::from(ready_r)).read_line(&mut line);
                let line = line.trim();
                if read.is_err() || line.is_empty() {
                    return;
                }
                let _ = tx.send(match line.strip_prefix("error ") {
                    Some(why) => Event::Failed(pid, why.to_owned()),
                    None => Event::Ready(pid),
                });
            })?;
        let tx = self.events.clone();
        thread::Builder::new()
            .name(format!("wait-{pid}"))
            .spawn(move || {
                let status = process.wait();
                // What the process said (`ready`) comes before its end: the pipe closed
                // when it ended, so the reader is done or about to be.
                let _ = reader.join();
                if let Ok(status) = status {
                    let _ = tx.send(Event::Exited(pid, status));
                }
            })?;
        Ok(Child {
            pid,
            calls,
            ready: false,
        })
    }

    /// Every child, for signals.
    fn children(&self) -> impl Iterator<Item = &Child> {
        self.current.iter().chain(&self.next).chain(&self.old)
    }

    fn on_signal(&mut self, signal: i32) -> Option<i32> {
        match signal {
            SIGUSR1 => {
                for c in self.current.iter().chain(&self.next) {
                    kill(c.pid, SIGUSR1);
                }
            }
            SIGUSR2 if self.stopping => {}
            SIGUSR2 if self.next.is_some() => {
                log::warn!("restart requested while one is under way; ignored");
            }
            SIGUSR2 => match self.spawn(self.current.is_some()) {
                Ok(child) => {
                    log::info!(
                        "restart requested (SIGUSR2): starting a new server process (pid {}) on the same sockets",
                        child.pid
                    );
                    self.next = Some(child);
                }
                Err(e) => log::error!("restart failed: cannot start a server process: {e}"),
            },
            _ => {
                self.stopping = true;
                for c in self.children() {
                    kill(c.pid, SIGTERM);
                }
                if self.children().next().is_none() {
                    return Some(0);
                }
            }
        }
        None
    }

    /// A child serves. True for the first server process of this supervisor.
    fn on_ready(&mut self, pid: u32) -> bool {
        if let Some(c) = self.current.as_mut().filter(|c| c.pid == pid) {
            let first = self.restarts == 0 && !c.ready;
            c.ready = true;
            return first;
        }
        if self.next.as_ref().is_some_and(|c| c.pid == pid) {
            let mut new = self.next.take().expect("checked");
            new.ready = true;
            if let Some(old) = self.current.replace(new) {
                log::info!(
                    "restart: server process {pid} serves; the old one ({}) drains",
                    old.pid
                );
                kill(old.pid, SIGUSR2);
                self.old.push(old);
            }
        }
        false
    }

    fn on_exit(&mut self, pid: u32, status: ExitStatus, never_ready: bool) -> Option<i32> {
        if let Some(i) = self.old.iter().position(|c| c.pid == pid) {
            self.old.remove(i);
            log::info!(
                "the old server process {pid} drained and {}",
                describe(status)
            );
        } else if self.next.as_ref().is_some_and(|c| c.pid == pid) {
            self.next = None;
            if !self.stopping {
                log::error!(
                    "restart failed: the new server process {pid} {} before it served; the running one keeps serving",
                    describe(status)
                );
            }
        } else if self.current.as_ref().is_some_and(|c| c.pid == pid) {
            let child = self.current.take().expect("checked");
            if !self.stopping {
                if never_ready && !child.ready {
                    // The first start failed: the server said why; exit as it did.
                    return Some(status.code().unwrap_or(1).max(1));
                }
                return self.crashed(child, status);
            }
        }
        if self.stopping && self.children().next().is_none() {
            return Some(0);
        }
        None
    }

    /// The serving process died without being asked to: say how and where, and start
    /// another, unless it keeps crashing.
    fn crashed(&mut self, child: Child, status: ExitStatus) -> Option<i32> {
        let inside: Vec<String> = calls::read(&child.calls)
            .into_iter()
            .map(|(thread, component)| format!("{thread} was inside {component}"))
            .collect();
        let at = if inside.is_empty() {
            "no thread was inside plugin code".to_owned()
        } else {
            inside.join(", ")
        };
        let what = format!("server process {} {}; {at}", child.pid, describe(status));
        log::error!("{what}");
        let now = Instant::now();
        self.crashes.push_back(now);
        while self
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.crashes.pop_front();
        }
        if self.crashes.len() >= self.max_crashes {
            log::error!(
                "the server crashed {} times within {}s: giving up (exit status {CRASH_LOOP_EXIT}); fix the plugin named above, then start again",
                self.crashes.len(),
                self.window.as_secs()
            );
            self.stopping = true;
            for c in self.children() {
                kill(c.pid, SIGTERM);
            }
            return Some(CRASH_LOOP_EXIT);
        }
        self.restarts += 1;
        self.last_crash = Some(what);
        match self.spawn(!self.old.is_empty()) {
            Ok(c) => {
                log::warn!(
                    "started a new server process (pid {}), restart {}",
                    c.pid,
                    self.restarts
                );
                self.current = Some(c);
                None
            }
            Err(e) => {
                log::error!("cannot start a new server process: {e}");
                Some(1)
            }
        }
    }
}

/// A pipe whose ends close on exec (the write end is kept open in the child on purpose).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// In the server process: what the supervisor handed over, if there is a supervisor.
#[derive(Debug)]
pub struct Handed {
    /// The listening sockets.
    pub listeners: Vec<TcpListener>,
    /// Where to say `ready`.
    pub ready: Option<std::fs::File>,
    /// The supervisor's line for `info`.
    pub info: Option<String>,
    /// A restart beside a running server (see [`env::SHARE_SOCKETS`]).
    pub share_sockets: bool,
}

/// Takes what the supervisor handed to this process through the environment.
pub fn handed() -> Result<Handed, String> {
    let fd = |name: &str| -> Result<Option<RawFd>, String> {
        match std::env::var(name) {
            Ok(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("{name}={v:?} is not a descriptor")),
            Err(_) => Ok(None),
        }
    };
    let listen = std::env::var(env::LISTEN_FDS).map_err(|_| {
        format!(
            "{} is not set: plughost serve runs under plughost start",
            env::LISTEN_FDS
        )
    })?;
    let mut listeners = Vec::new();
    for part in listen.split(',') {
        let fd: RawFd = part.parse().map_err(|_| {
            format!(
                "{}={listen:?} is not a list of descriptors",
                env::LISTEN_FDS
            )
        })?;
        // SAFETY: the supervisor passed this listening socket to us, and nothing else owns it
        // in this process.
        listeners.push(unsafe { TcpListener::from_raw_fd(fd) });
    }
    if let Some(calls_fd) = fd(env::CALLS_FD)? {
        calls::attach(calls_fd).map_err(|e| format!("cannot map the call record: {e}"))?;
    }
    // SAFETY: the pipe's write end, passed to us alone.
    let ready = fd(env::READY_FD)?.map(|fd| unsafe { std::fs::File::from_raw_fd(fd) });
    let share_sockets = std::env::var_os(env::SHARE_SOCKETS).is_some();
    for name in [
        env::LISTEN_FDS,
        env::CALLS_FD,
        env::READY_FD,
        env::SHARE_SOCKETS,
    ] {
        // SAFETY: single-threaded here (before the server starts any thread).
        unsafe { std::env::remove_var(name) };
    }
    Ok(Handed {
        listeners,
        ready,
        info: std::env::var(env::INFO).ok(),
        share_sockets,
    })
}

/// How long a restart or crash may take before `plughost restart` gives up waiting.
pub fn restart_patience(max_wait_time: u64) -> Duration {
    Duration::from_secs(max_wait_time + 30)
}
