//! The pid file in the runtime folder: written by `start`, read by `stop`, `reload` and a
//! second `start`, removed on exit.

use std::path::{Path, PathBuf};

/// The pid file of a runtime folder.
pub fn path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("plughost.pid")
}

/// The pid in the file, if there is a readable one.
pub fn read(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether a process with this pid exists.
pub fn alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    let exists = r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    // A zombie (exited, not yet reaped by its parent) has stopped serving.
    exists && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(false)
}

/// Writes our pid. Returns the live process the file named before (with `start -i`), to
/// hand the file back to with [`give_back`] if this start fails.
pub fn write(path: &Path) -> std::io::Result<Option<i32>> {
    let before = read(path).filter(|&pid| pid != std::process::id() as i32 && alive(pid));
    std::fs::write(path, format!("{}\n", std::process::id()))?;
    Ok(before)
}

/// After a failed start: the file names the server that was running before again (or is
/// removed, when none was), if it still holds our pid.
pub fn give_back(path: &Path, before: Option<i32>) {
    match before {
        Some(pid) if read(path) == Some(std::process::id() as i32) => {
            let _ = std::fs::write(path, format!("{pid}\n"));
        }
        Some(_) => {}
        None => remove(path),
    }
}

/// Removes the file if it still holds our pid.
pub fn remove(path: &Path) {
    if read(path) == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(path);
    }
}

/// Sends `signal` to `pid`.
pub fn signal(pid: i32, signal: i32) -> std::io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
