//! The log backend: env_logger, to stderr or to a file, with the level changeable at run time
//! through `log::set_max_level` (plugins' records pass the same gate).

use std::{fs::OpenOptions, io, path::Path};

use log::LevelFilter;

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
    // A second init (tests) keeps the first logger.
    let _ = builder.try_init();
    log::set_max_level(level);
    Ok(())
}
