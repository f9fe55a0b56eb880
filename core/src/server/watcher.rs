//! The inotify watcher: watches folders (cargo replaces a plugin file with a new inode, so
//! watching the file itself would lose it) and reports every file created, written or moved
//! into them. The main thread debounces and decides what the changes mean.

use std::{
    ffi::OsStr,
    io,
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex},
    thread,
};

use inotify::{Inotify, WatchDescriptor, WatchMask, Watches};

/// Watches folders from a thread of its own; more folders can be added while it runs.
#[derive(Debug)]
pub struct Watcher {
    watches: Watches,
    dirs: Arc<Mutex<Vec<(WatchDescriptor, PathBuf)>>>,
}

impl Watcher {
    /// Starts the watcher thread; each changed file's path is sent through `on_change`.
    pub fn start<T: Send + 'static>(
        tx: mpsc::Sender<T>,
        on_change: fn(PathBuf) -> T,
    ) -> io::Result<Watcher> {
        let mut inotify = Inotify::init()?;
        let watches = inotify.watches();
        let dirs: Arc<Mutex<Vec<(WatchDescriptor, PathBuf)>>> = Arc::default();
        let seen = dirs.clone();
        thread::Builder::new()
            .name("watcher".into())
            .spawn(move || {
                let mut buffer = [0u8; 8192];
                loop {
                    let events = match inotify.read_events_blocking(&mut buffer) {
                        Ok(events) => events,
                        Err(e) => {
                            log::error!("file watcher stopped: {e}");
                            return;
                        }
                    };
                    for event in events {
                        let Some(name) = event.name else { continue };
                        let dir = seen.lock().ok().and_then(|d| {
                            d.iter()
                                .find(|(wd, _)| *wd == event.wd)
                                .map(|(_, p)| p.clone())
                        });
                        if let Some(dir) = dir {
                            if tx.send(on_change(dir.join(name))).is_err() {
                                return;
                            }
                        }
                    }
                }
            })?;
        Ok(Watcher { watches, dirs })
    }

    /// Watches `dir` (canonicalized) unless it is watched already.
    pub fn watch(&mut self, dir: &Path) -> io::Result<()> {
        let dir = dir.canonicalize()?;
        let mut dirs = self
            .dirs
            .lock()
            .map_err(|_| io::Error::other("watcher lock poisoned"))?;
        if dirs.iter().any(|(_, d)| *d == dir) {
            return Ok(());
        }
        let wd = self.watches.add(
            &dir,
            WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE,
        )?;
        log::debug!("watching {}", dir.display());
        dirs.push((wd, dir));
        Ok(())
    }
}

/// A path in the form the watcher reports it: canonical folder, plus file name.
pub fn watch_key(path: &Path) -> Option<PathBuf> {
    let dir = path.parent()?.canonicalize().ok()?;
    Some(dir.join(path.file_name().unwrap_or(OsStr::new(""))))
}
