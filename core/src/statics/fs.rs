//! The folder and the files in it: a request path becomes a relative name with no way out
//! ([`relative`]), which is opened beneath the root's descriptor so that no symbolic link
//! leads outside it ([`Root::open`]).

use std::{
    ffi::CStr,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use super::cache::FileId;

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// openat2: fail if resolution leaves the starting folder (by `..` or any symlink).
const RESOLVE_BENEATH: u64 = 0x08;
/// openat2: no `/proc/PID/fd/N`-style links.
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;

/// Set when the kernel (or a seccomp filter) refuses openat2: open and check instead.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

const FLAGS: libc::c_int = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;

/// The served folder, held open: its path is resolved once (at start or reload), so a
/// `root` that is a symlink switched by a deploy needs `plughost reload`.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    /// The canonical path, for the check of a file reached through a symlink.
    path: PathBuf,
}

impl Root {
    /// Opens the folder.
    pub fn new(path: &Path) -> io::Result<Root> {
        let path = path.canonicalize()?;
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a NUL-terminated path; the descriptor returned is ours alone.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Root { fd, path })
    }

    /// The canonical path of the folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `rel` (relative, without `.` or `..` segments) for reading. Unless `outside`,
    /// a file reached through a symlink that leaves the folder is refused
    /// (`PermissionDenied`); links that stay inside are followed.
    pub fn open(&self, rel: &CStr, outside: bool) -> io::Result<File> {
        if outside {
            return self.openat(rel);
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            match self.openat2(rel) {
                Ok(f) => return Ok(f),
                // ENOSYS: an old kernel; EPERM: a seccomp filter; E2BIG: an odd struct.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOSYS | libc::EPERM | libc::E2BIG)
                    ) =>
                {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                // A link that leaves the folder, or an absolute one (which may well point
                // back inside): decide by where the file really is.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::ELOOP)) => {}
                Err(e) => return Err(e),
            }
        }
        let file = self.openat(rel)?;
        if self.holds(&file) {
            Ok(file)
        } else {
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        }
    }

    /// The identity of the file `rel` leads to now (following symlinks: only compared with
    /// the identity of a file opened safely, see `cache`).
    pub fn stat(&self, rel: &CStr) -> io::Result<FileId> {
        // SAFETY: all-zero is a valid `stat`; fstatat writes it and reads the NUL-terminated
        // path under a directory descriptor we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::fstatat(self.fd.as_raw_fd(), rel.as_ptr(), &mut st, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FileId::of_stat(&st))
    }

    fn openat(&self, rel: &CStr) -> io::Result<File> {
        // SAFETY: a NUL-terminated relative path under a directory descriptor we own.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), rel.as_ptr(), FLAGS) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    fn openat2(&self, rel: &CStr) -> io::Result<File> {
        let how = OpenHow {
            flags: FLAGS as u64,
            mode: 0,
            resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: openat2 reads `how` (of the size given) and the NUL-terminated path.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                rel.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        Ok(unsafe { File::from_raw_fd(fd as libc::c_int) })
    }

    /// Whether the open `file` lies inside the folder (by the path the kernel knows it by).
    fn holds(&self, file: &File) -> bool {
        let link = format!("/proc/self/fd/{}", file.as_raw_fd());
        match std::fs::read_link(link) {
            Ok(real) => real.starts_with(&self.path),
            Err(_) => false,
        }
    }
}

/// Turns the part of a request path under the prefix into a relative file name in `out`
/// (NUL-terminated, `.` for the folder itself): segments are percent-decoded, empty ones
/// skipped. `None` for a name that must not be served: a decoded `/`, a backslash or NUL,
/// a `.` or `..` segment (however encoded), or, unless `hidden`, a name starting with a dot.
pub fn relative(rest: &str, hidden: bool, out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    for seg in rest.split('/').filter(|s| !s.is_empty()) {
        if !out.is_empty() {
            out.push(b'/');
        }
        let start = out.len();
        let bytes = seg.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let b = if bytes[i] == b'%' {
                let hi = (*bytes.get(i + 1)? as char).to_digit(16)?;
                let lo = (*bytes.get(i + 2)? as char).to_digit(16)?;
                i += 3;
                (hi * 16 + lo) as u8
            } else {
                i += 1;
                bytes[i - 1]
            };
            if matches!(b, 0 | b'/' | b'\\') {
                return None;
            }
            out.push(b);
        }
        let name = &out[start..];
        if name == b"." || name == b".." || (!hidden && name.starts_with(b".")) {
            return None;
        }
    }
    if out.is_empty() {
        out.push(b'.');
    }
    out.push(0);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(rest: &str) -> Option<String> {
        let mut out = Vec::new();
        relative(rest, false, &mut out)?;
        out.pop();
        Some(String::from_utf8(out).unwrap())
    }

    #[test]
    fn names_stay_inside() {
        assert_eq!(rel("a/b.txt").as_deref(), Some("a/b.txt"));
        assert_eq!(rel("").as_deref(), Some("."));
        assert_eq!(rel("a//b/").as_deref(), Some("a/b"));
        assert_eq!(rel("caf%C3%A9.txt").as_deref(), Some("café.txt"));
        for bad in [
            "..",
            "a/../b",
            "%2e%2e/x",
            "%2E%2e",
            ".%2e",
            "a%2fb",
            "a%2F..%2Fb",
            "a\\b",
            "..%5c",
            "a%00b",
            "%zz",
            "a%2",
            ".env",
            "a/.git/config",
            "%2e",
        ] {
            assert_eq!(rel(bad), None, "{bad}");
        }
        let mut out = Vec::new();
        assert!(relative(".well-known/x", true, &mut out).is_some());
    }
}
