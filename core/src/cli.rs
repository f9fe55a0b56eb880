//! `plughost start|stop|restart|reload|info|help`, with LaravelS's flags.

use std::{
    io::{Read, Write},
    os::fd::{FromRawFd, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::{Args, Parser, Subcommand};

mod new;

use crate::{
    config::{log_level, Config, Loaded},
    error::StartError,
    plugin::loader,
    runtime,
    server::{self, control, logging, pidfile, supervisor, Options},
};

#[derive(Debug, Parser)]
#[command(
    name = "plughost",
    version,
    about = "An application server for Rust plugins shipped as .so files",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the server.
    Start(StartArgs),
    /// Stop a running server gracefully (SIGTERM), waiting for it to exit.
    Stop(Common),
    /// Stop the running server if there is one, then start.
    Restart(StartArgs),
    /// Ask a running server to reload its plugins (SIGUSR1).
    Reload(Common),
    /// Show what a running server is doing.
    Info(Common),
    /// Create a plugin crate with a handler and a test, and say how to enable it.
    New(new::NewArgs),
    /// The server process that `start` runs under its supervisor (not for direct use).
    #[command(hide = true)]
    Serve(ServeArgs),
}

#[derive(Debug, Args, Clone)]
struct ServeArgs {
    /// The config file.
    #[arg(short, long)]
    config: PathBuf,
    /// The `-x` version string.
    #[arg(short = 'x', long = "x-version")]
    x_version: Option<String>,
    /// Log to this file (the supervisor's, when it runs in the background).
    #[arg(long)]
    log_file: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
struct Common {
    /// The config file.
    #[arg(short, long, default_value = "config/server.ron")]
    config: PathBuf,
    /// Environment: loads server.ENV.ron beside the config when it exists.
    #[arg(short, long)]
    env: Option<String>,
}

#[derive(Debug, Args, Clone)]
struct StartArgs {
    #[command(flatten)]
    common: Common,
    /// Run in the background; logs go to log.file (default RUNTIME_DIR/plughost.log).
    #[arg(short, long)]
    daemonize: bool,
    /// Ignore an existing pid file.
    #[arg(short, long)]
    ignore: bool,
    /// A version string for your application, readable by plugins.
    #[arg(short = 'x', long = "x-version", value_name = "VERSION")]
    x_version: Option<String>,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Start(args) => start(&args),
        Command::Stop(c) => match load_for_control(&c) {
            Ok(l) => stop(&l, true),
            Err(code) => code,
        },
        Command::Restart(args) => match load(&args.common) {
            Ok(l) => restart(&l, &args),
            Err(code) => code,
        },
        Command::Serve(args) => serve(&args),
        Command::Reload(c) => match load_for_control(&c) {
            Ok(l) => reload(&l),
            Err(code) => code,
        },
        Command::Info(c) => match load_for_control(&c) {
            Ok(l) => info(&l),
            Err(code) => code,
        },
        Command::New(args) => new::run(&args),
    }
}

fn load(c: &Common) -> Result<Loaded, i32> {
    Config::load(&c.config, c.env.as_deref()).map_err(|e| {
        eprintln!("plughost: {e}");
        2
    })
}

/// The config for a command that only talks to the running server: a config that does not
/// validate still tells where that server's runtime folder is.
fn load_for_control(c: &Common) -> Result<Loaded, i32> {
    match Config::load_for_control(&c.config, c.env.as_deref()) {
        Ok((loaded, None)) => Ok(loaded),
        Ok((loaded, Some(e))) => {
            eprintln!(
                "plughost: warning: {e}\nplughost: reaching the server through {} anyway",
                loaded.config.runtime_dir.display()
            );
            Ok(loaded)
        }
        Err(e) => {
            eprintln!("plughost: {e}");
            Err(2)
        }
    }
}

fn start(args: &StartArgs) -> i32 {
    let loaded = match load(&args.common) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let config = &loaded.config;
    let level = log_level(&config.log.level).expect("validated");
    let log_file = match (&config.log.file, args.daemonize) {
        (Some(f), _) => Some(f.clone()),
        (None, true) => Some(config.runtime_dir.join("plughost.log")),
        (None, false) => None,
    };
    if let Err(e) = logging::init(level, log_file.as_deref()) {
        eprintln!("plughost: cannot open the log file: {e}");
        return 1;
    }
    let report = |e: &StartError| {
        log::error!("{e}");
        if log_file.is_some() {
            // The log goes to a file; say it on the terminal too.
            eprintln!("plughost: {e}");
        }
    };
    let pid_path = match prepare_runtime_dir(config, args.ignore) {
        Ok(p) => p,
        Err(e) => {
            report(&e);
            return 1;
        }
    };
    let mut notify = match args.daemonize.then(daemonize).transpose() {
        Ok(fd) => fd.map(std::fs::File::from),
        Err(e) => {
            report(&StartError::io("cannot daemonize")(e));
            return 1;
        }
    };
    let written = pidfile::write(&pid_path).map_err(StartError::io(format!(
        "cannot write the pid file {}",
        pid_path.display()
    )));
    let before = match written {
        Ok(before) => before,
        Err(e) => {
            report(&e);
            if let Some(n) = notify.as_mut() {
                let _ = writeln!(n, "{e}");
            }
            return 1;
        }
    };
    let code = if config.supervisor.enable {
        supervise(&loaded, args, log_file.as_deref(), &mut notify)
    } else {
        let options = Options {
            app_version: args.x_version.clone().unwrap_or_default(),
            ..Options::default()
        };
        let result = server::run(loaded.clone(), options, |addr| {
            if let Some(n) = notify.as_mut() {
                let _ = writeln!(n, "ok {}", started_line(addr));
            }
            notify = None;
        });
        result.map_or_else(
            |e| {
                report(&e);
                if let Some(n) = notify.as_mut() {
                    let _ = writeln!(n, "{e}");
                }
                exit_code(&e)
            },
            |()| 0,
        )
    };
    if code == 0 {
        pidfile::remove(&pid_path);
    } else {
        pidfile::give_back(&pid_path, before);
    }
    code
}

/// A config the loaded plugins show to be wrong exits like any other config error.
fn exit_code(e: &StartError) -> i32 {
    if matches!(e, StartError::Config(_)) {
        2
    } else {
        1
    }
}

fn started_line(listen: &str) -> String {
    format!(
        "plughost started in the background: listening on {listen}, pid {}",
        std::process::id()
    )
}

/// Binds the listeners and runs the server under the supervisor until it stops.
fn supervise(
    loaded: &Loaded,
    args: &StartArgs,
    log_file: Option<&std::path::Path>,
    notify: &mut Option<std::fs::File>,
) -> i32 {
    let config = &loaded.config;
    // A unix socket file is the supervisor's: removed when it stops.
    let (listeners, _http_file) =
        match server::bind_listen(&config.listen, config.workers(), config.unix_socket_mode) {
            Ok(l) => l,
            Err(e) => {
                log::error!("{e}");
                if let Some(n) = notify.as_mut() {
                    let _ = writeln!(n, "{e}");
                } else if log_file.is_some() {
                    eprintln!("plughost: {e}");
                }
                return 1;
            }
        };
    let bound =
        server::listen_url(&config.listen, &listeners[0]).unwrap_or_else(|_| config.listen.clone());
    let mut child_args: Vec<std::ffi::OsString> = vec!["-c".into(), loaded.path.clone().into()];
    if let Some(x) = &args.x_version {
        child_args.extend(["-x".into(), x.into()]);
    }
    if let Some(f) = log_file {
        child_args.extend(["--log-file".into(), f.into()]);
    }
    let outcome = supervisor::run(loaded, &listeners, child_args, || {
        if let Some(mut n) = notify.take() {
            let _ = writeln!(n, "ok {}", started_line(&bound));
        }
    });
    if let (Some(n), Some(why)) = (notify.as_mut(), &outcome.start_error) {
        let _ = writeln!(n, "{why}");
    }
    outcome.code
}

/// `plughost serve`: the server process, on the sockets its supervisor hands it.
fn serve(args: &ServeArgs) -> i32 {
    let loaded = match Config::load(&args.config, None) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("plughost: {e}");
            return 2;
        }
    };
    let level = log_level(&loaded.config.log.level).expect("validated");
    let log_file = args.log_file.clone().or(loaded.config.log.file.clone());
    if let Err(e) = logging::init(level, log_file.as_deref()) {
        eprintln!("plughost: cannot open the log file: {e}");
        return 1;
    }
    let handed = match supervisor::handed() {
        Ok(h) => h,
        Err(e) => {
            log::error!("{e}");
            return 1;
        }
    };
    runtime::calls::thread("main");
    let mut ready = handed.ready;
    let options = Options {
        app_version: args.x_version.clone().unwrap_or_default(),
        listeners: Some(handed.listeners),
        supervisor: handed.info,
        share_sockets: handed.share_sockets,
    };
    let result = server::run(loaded, options, |_| {
        if let Some(r) = ready.as_mut() {
            let _ = r.write_all(b"ready\n");
        }
        ready = None;
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            if let Some(r) = ready.as_mut() {
                let _ = writeln!(r, "error {e}");
            }
            exit_code(&e)
        }
    }
}

/// `plughost restart`: with a supervisor, a new server process takes over from the running
/// one on the same sockets (no connection refused); otherwise stop, then start.
fn restart(l: &Loaded, args: &StartArgs) -> i32 {
    let Ok(supervisor) = running(l) else {
        return start(args);
    };
    let socket = control::socket_path(&l.config.runtime_dir);
    let server_pid = |answer: &str| {
        answer
            .lines()
            .find_map(|line| line.strip_prefix("pid: "))
            .map(str::to_owned)
    };
    let before = control::ask(&socket, "info").ok();
    let supervised = before
        .as_deref()
        .is_some_and(|a| a.contains("\nsupervisor: "));
    let Some(old) = before
        .as_deref()
        .and_then(server_pid)
        .filter(|_| supervised)
    else {
        let code = stop(l, false);
        return if code == 0 { start(args) } else { code };
    };
    if let Err(e) = pidfile::signal(supervisor, libc::SIGUSR2) {
        eprintln!("plughost: cannot signal pid {supervisor}: {e}");
        return 1;
    }
    let deadline = Instant::now() + supervisor::restart_patience(l.config.max_wait_time);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = control::ask(&socket, "info").ok();
        if let Some(new) = now.as_deref().and_then(server_pid).filter(|p| *p != old) {
            println!(
                "plughost restarted: server process {new} took over from {old} (supervisor pid {supervisor})"
            );
            return 0;
        }
    }
    eprintln!(
        "plughost: the restart did not complete; the running server keeps serving (see its log)"
    );
    1
}

/// Creates the runtime folder (0700), refuses one others can write to, and checks that no
/// server holds its pid file (unless `ignore`); returns the pid file's path.
fn prepare_runtime_dir(config: &Config, ignore: bool) -> Result<PathBuf, StartError> {
    // Others who can write there could plant the files the server loads.
    loader::private_dir(&config.runtime_dir).map_err(StartError::RuntimeDir)?;
    let pid_path = pidfile::path(&config.runtime_dir);
    if !ignore {
        if let Some(pid) = pidfile::read(&pid_path) {
            if pid != std::process::id() as i32 && pidfile::alive(pid) {
                return Err(StartError::AlreadyRunning {
                    pid,
                    pidfile: pid_path,
                });
            }
            log::warn!(
                "replacing stale pid file {} (pid {pid} is not running)",
                pid_path.display()
            );
        }
    }
    Ok(pid_path)
}

/// Forks into the background. The parent waits for the child to say it is serving (or why
/// not), prints that, and exits; the child returns the pipe to say it on.
fn daemonize() -> std::io::Result<OwnedFd> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array. Close-on-exec: the server process
    // the supervisor starts must not hold the parent's pipe open.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet (start forks before spawning any).
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read);
            // SAFETY: plain syscalls on our own process and descriptors.
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::dup2(null, 2);
                    if null > 2 {
                        libc::close(null);
                    }
                }
            }
            Ok(write)
        }
        _ => {
            drop(write);
            let mut answer = String::new();
            let _ = std::fs::File::from(read).read_to_string(&mut answer);
            let answer = answer.trim();
            match answer.strip_prefix("ok ") {
                Some(msg) => {
                    println!("{msg}");
                    std::process::exit(0)
                }
                None if answer.is_empty() => {
                    eprintln!("plughost: the background server exited during start; see its log");
                    std::process::exit(1)
                }
                None => {
                    eprintln!("plughost: {answer}");
                    std::process::exit(1)
                }
            }
        }
    }
}

/// The pid of the running server, or a message why there is none.
fn running(l: &Loaded) -> Result<i32, String> {
    let path = pidfile::path(&l.config.runtime_dir);
    match pidfile::read(&path) {
        Some(pid) if pidfile::alive(pid) => Ok(pid),
        Some(pid) => Err(format!(
            "plughost is not running (stale pid file {} names pid {pid})",
            path.display()
        )),
        None => Err(format!(
            "plughost is not running (no pid file at {})",
            path.display()
        )),
    }
}

fn stop(l: &Loaded, must_run: bool) -> i32 {
    let pid = match running(l) {
        Ok(pid) => pid,
        Err(msg) if must_run => {
            eprintln!("{msg}");
            return 1;
        }
        Err(_) => return 0,
    };
    if let Err(e) = pidfile::signal(pid, libc::SIGTERM) {
        eprintln!("plughost: cannot signal pid {pid}: {e}");
        return 1;
    }
    let patience = Duration::from_secs(l.config.max_wait_time + 10);
    let started = Instant::now();
    while pidfile::alive(pid) {
        if started.elapsed() > patience {
            eprintln!(
                "plughost: pid {pid} is still running {}s after SIGTERM",
                patience.as_secs()
            );
            return 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("plughost stopped (pid {pid})");
    0
}

fn reload(l: &Loaded) -> i32 {
    match running(l) {
        Ok(pid) => match pidfile::signal(pid, libc::SIGUSR1) {
            Ok(()) => {
                println!("asked plughost (pid {pid}) to reload");
                0
            }
            Err(e) => {
                eprintln!("plughost: cannot signal pid {pid}: {e}");
                1
            }
        },
        Err(msg) => {
            eprintln!("{msg}");
            1
        }
    }
}

fn info(l: &Loaded) -> i32 {
    let socket = control::socket_path(&l.config.runtime_dir);
    match control::ask(&socket, "info") {
        Ok(answer) => {
            print!("{answer}");
            0
        }
        Err(e) => {
            eprintln!(
                "plughost is not running or not answering (control socket {}: {e})",
                socket.display()
            );
            1
        }
    }
}
