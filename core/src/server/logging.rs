//! The log backend: env_logger, to stderr or to a file, with the level changeable at run time
//! through `log::set_max_level` (plugins' records pass the same gate).
//!
//! Repeated identical warnings and errors are rate-limited: a panicking route under load
//! would otherwise write a line per request (77 MB in 3 s were seen). Per target and message,
//! the first [`BURST`] in a second are written; the rest are counted, and a line a second says
//! how many more there were.

use std::{
    collections::HashMap,
    fs::OpenOptions,
    io,
    path::Path,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Identical warnings or errors written per second before the rest are only counted.
pub const BURST: u32 = 5;

/// Installs the logger. Dependencies' chatter stays at warn unless the level is trace.
pub fn init(level: LevelFilter, file: Option<&Path>) -> io::Result<()> {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(LevelFilter::Trace);
    if level < LevelFilter::Trace {
        for noisy in ["polling", "async_executor"] {
            builder.filter_module(noisy, LevelFilter::Warn);
        }
    }
    builder.format_timestamp_millis();
    if let Some(path) = file {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        builder.target(env_logger::Target::Pipe(Box::new(f)));
    }
    let limited = Arc::new(RateLimited {
        inner: builder.build(),
        seen: Mutex::new(HashMap::new()),
    });
    // A second init (tests) keeps the first logger.
    if log::set_boxed_logger(Box::new(Shared(limited.clone()))).is_ok() {
        let _ = thread::Builder::new()
            .name("log-summary".into())
            .spawn(move || loop {
                thread::sleep(Duration::from_secs(1));
                limited.summarize(Instant::now());
            });
    }
    log::set_max_level(level);
    Ok(())
}

/// One repeated message: when its window began, how many were written and suppressed in it.
#[derive(Debug)]
struct Seen {
    window: Instant,
    written: u32,
    suppressed: u64,
    level: Level,
}

struct RateLimited {
    inner: env_logger::Logger,
    seen: Mutex<HashMap<(String, String), Seen>>,
}

impl RateLimited {
    /// Whether to write this warning or error now.
    fn admit(&self, target: &str, message: String, level: Level) -> bool {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let entry = seen.entry((target.to_owned(), message)).or_insert(Seen {
            window: now,
            written: 0,
            suppressed: 0,
            level,
        });
        if now.duration_since(entry.window) >= Duration::from_secs(1) && entry.suppressed == 0 {
            entry.window = now;
            entry.written = 0;
        }
        if entry.written < BURST {
            entry.written += 1;
            true
        } else {
            entry.suppressed += 1;
            false
        }
    }

    /// Once a second: a line for each message with suppressed repeats; forgets quiet ones.
    fn summarize(&self, now: Instant) {
        let mut lines = Vec::new();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.retain(|(target, message), s| {
                if s.suppressed > 0 {
                    lines.push((target.clone(), message.clone(), s.suppressed, s.level));
                    s.suppressed = 0;
                    s.window = now;
                    s.written = 0;
                }
                now.duration_since(s.window) < Duration::from_secs(10)
            });
        }
        for (target, message, n, level) in lines {
            self.inner.log(
                &Record::builder()
                    .level(level)
                    .target(&target)
                    .args(format_args!(
                        "{n} more like this in the last second: {message}"
                    ))
                    .build(),
            );
        }
    }
}

/// The installed logger (shared with the summary thread).
struct Shared(Arc<RateLimited>);

impl Log for Shared {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.0.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        let r = &self.0;
        if !r.inner.matches(record) {
            return;
        }
        if record.level() <= Level::Warn
            && !r.admit(record.target(), record.args().to_string(), record.level())
        {
            return;
        }
        r.inner.log(record);
    }

    fn flush(&self) {
        self.0.inner.flush();
    }
}
