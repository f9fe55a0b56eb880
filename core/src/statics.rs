//! Static files, like LaravelS's `handle_static`: the `static` section serves a folder under
//! a path prefix, before the routes or for requests no route takes. [`Statics::lookup`] is
//! the entry point: a request path and its headers in, a response head and a file out (or
//! "not here", and the routes answer).
//!
//! A path never leads outside the folder: it is decoded segment by segment ([`fs::relative`]
//! refuses `..`, encoded slashes, backslashes and NUL) and opened beneath the folder's
//! descriptor, so a symlink leaving it is refused unless `follow_symlinks` ([`fs::Root`]).
//! Responses carry `etag` (`"<mtime hex>-<length hex>"`, as nginx) and `last-modified`,
//! answer `If-None-Match` / `If-Modified-Since` with 304, a single `Range` with 206 or 416,
//! and prefer a `FILE.br` or `FILE.gz` beside the file for clients that accept it
//! ([`headers`]). Small files (up to 32 KiB) come from each worker's [`cache`], checked
//! with one `fstatat` per request; the connection loop copies them behind the head, and
//! sends larger ones with sendfile ([`send`]).

pub mod cache;
pub mod fs;
pub mod headers;
pub mod mime;
pub mod send;

use std::{
    ffi::CStr,
    fs::File,
    io::{Read, Write},
    path::Path,
    rc::Rc,
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

use httpdate::HttpDate;

use crate::config::StaticConfig;
use cache::{Cache, Entry, FileId};
use headers::{Ask, Span};

/// The static file settings of a plan, with the folder held open.
#[derive(Debug)]
pub struct Statics {
    id: u64,
    /// `None` when the folder could not be opened (gone since the config was checked).
    root: Option<fs::Root>,
    /// Ends with `/`.
    prefix: String,
    index: Vec<Vec<u8>>,
    /// Files win over routes (else only requests no route takes get a file).
    pub before_routes: bool,
    follow_symlinks: bool,
    hidden: bool,
    precompressed: bool,
    cache_control: String,
}

impl std::fmt::Display for Statics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.root() {
            Some(root) => write!(f, "{} at {}", root.display(), self.prefix)?,
            None => write!(f, "(folder not open) at {}", self.prefix)?,
        }
        let order = if self.before_routes {
            "before"
        } else {
            "after"
        };
        write!(f, ", {order} the routes")
    }
}

/// What [`Statics::lookup`] found.
#[derive(Debug)]
pub enum Found {
    /// No file for this path: the routes answer.
    NotHere,
    /// A folder asked for without its trailing `/`: redirect to the path with one.
    Folder,
    /// A response, its other header lines already written.
    Reply(Reply),
}

/// A response to send: the status, the length and where the body comes from. Its header
/// lines (`content-type`, `etag`, ...) are in the buffer given to `lookup`.
#[derive(Debug)]
pub struct Reply {
    /// 200, 206, 304 or 416.
    pub status: u16,
    /// `content-length` (`None`: 304, no length sent).
    pub length: Option<u64>,
    /// The body and the offset of its first byte (`None`: no body).
    pub body: Option<(Body, u64)>,
}

/// Where a body comes from.
#[derive(Debug)]
pub enum Body {
    /// An open file (copied, or sent with sendfile when large).
    File(File),
    /// A small file's bytes, from the worker's cache.
    Memory(Rc<[u8]>),
}

/// What a response says about the file it sends.
#[derive(Debug, Clone, Copy)]
pub struct Info {
    len: u64,
    mtime: SystemTime,
    content_type: &'static str,
    encoding: Option<&'static str>,
}

/// The file chosen for a request, before the request's conditions are applied.
struct Chosen {
    file: File,
    meta: std::fs::Metadata,
    info: Info,
}

/// Ids of [`Statics`], so a worker's cache knows when a reload replaced its settings.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// `Accept-Encoding` and the trailing slash, as the last byte of a cache key.
const FOLDER: u8 = 1;
const BR: u8 = 2;
const GZIP: u8 = 4;

impl Statics {
    /// The settings of `config`, with its folder opened (a failure is logged, and nothing is
    /// served until a reload finds the folder again).
    pub fn new(config: &StaticConfig) -> Statics {
        let root = fs::Root::new(&config.root)
            .inspect_err(|e| {
                log::error!("static: cannot open {}: {e}", config.root.display());
            })
            .ok();
        let mut prefix = config.prefix.clone();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Statics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            root,
            prefix,
            index: config.index.iter().map(|s| s.as_bytes().to_vec()).collect(),
            before_routes: config.before_routes,
            follow_symlinks: config.follow_symlinks,
            hidden: config.hidden,
            precompressed: config.precompressed,
            cache_control: match config.max_age {
                0 => "no-cache".into(),
                n => format!("public, max-age={n}"),
            },
        }
    }

    /// The folder served (canonical), if it is open.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_ref().map(|r| r.path())
    }

    /// Finds the file for a GET or HEAD of `path` (normalized, still percent-encoded) and
    /// applies the request's conditions. Header lines of the reply go into `head`; `name`
    /// is scratch space; `cache` is the worker's.
    pub fn lookup(
        &self,
        path: &str,
        ask: &Ask<'_>,
        head: &mut Vec<u8>,
        name: &mut Vec<u8>,
        cache: &mut Cache,
    ) -> Found {
        let rest = match path.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest,
            None if self.prefix.len() > 1 && self.prefix.strip_suffix('/') == Some(path) => {
                return Found::Folder;
            }
            None => return Found::NotHere,
        };
        let (Some(root), Some(())) = (&self.root, fs::relative(rest, self.hidden, name)) else {
            return Found::NotHere;
        };
        let mut flags = if rest.is_empty() || rest.ends_with('/') {
            FOLDER
        } else {
            0
        };
        if let (true, Some(accept)) = (self.precompressed, ask.accept_encoding) {
            for (bit, coding) in [(BR, &b"br"[..]), (GZIP, b"gzip")] {
                if headers::accepts(accept, coding) {
                    flags |= bit;
                }
            }
        }
        name.push(flags);
        if let Some(e) = cache.get(self.id, name) {
            let file = CStr::from_bytes_with_nul(&e.file).ok();
            if file.and_then(|f| root.stat(f).ok()) == Some(e.id) {
                let (info, body) = (e.info, Body::Memory(e.body.clone()));
                return Found::Reply(self.reply(&info, body, ask, head));
            }
            cache.remove(name);
        }
        let key = name.clone();
        name.pop();
        let Some(chosen) = self.choose(root, name, flags) else {
            return Found::NotHere;
        };
        if chosen.meta.is_dir() {
            return Found::Folder;
        }
        let body = self.remember(chosen.file, &chosen.meta, &chosen.info, name, key, cache);
        Found::Reply(self.reply(&chosen.info, body, ask, head))
    }

    /// The body of a chosen file: a small one is read and cached (under `key`; `name` is the
    /// file's), a large one stays an open file.
    fn remember(
        &self,
        mut file: File,
        meta: &std::fs::Metadata,
        info: &Info,
        name: &[u8],
        key: Vec<u8>,
        cache: &mut Cache,
    ) -> Body {
        if info.len > cache::FILE_MAX {
            return Body::File(file);
        }
        let mut bytes = Vec::with_capacity(info.len as usize);
        match file.read_to_end(&mut bytes) {
            Ok(n) if n as u64 == info.len => {}
            // Changed while read: send what the file holds now, cache nothing.
            _ => return Body::File(file),
        }
        let body: Rc<[u8]> = bytes.into();
        let entry = Entry {
            file: name.to_vec(),
            id: FileId::of(meta),
            info: *info,
            body: body.clone(),
        };
        cache.insert(key, entry);
        Body::Memory(body)
    }

    /// Opens the file `name` names (NUL-terminated), its folder's index file, or the
    /// precompressed sibling the client accepts, leaving that file's name in `name`. A
    /// folder asked for without `/` comes back as itself (the caller redirects).
    fn choose(&self, root: &fs::Root, name: &mut Vec<u8>, flags: u8) -> Option<Chosen> {
        let mut file = self.open(root, name)?;
        let mut meta = file.metadata().ok()?;
        let mut info = Info {
            len: 0,
            mtime: SystemTime::UNIX_EPOCH,
            content_type: "",
            encoding: None,
        };
        if meta.is_dir() {
            if flags & FOLDER == 0 {
                return Some(Chosen { file, meta, info });
            }
            name.pop();
            let base = name.len();
            let found = self.index.iter().find_map(|index| {
                name.truncate(base);
                name.push(b'/');
                name.extend_from_slice(index);
                name.push(0);
                let f = self.open(root, name)?;
                let m = f.metadata().ok().filter(|m| m.is_file())?;
                Some((f, m))
            })?;
            (file, meta) = found;
        } else if !meta.is_file() || flags & FOLDER != 0 {
            // `/a.txt/` names a folder, which `a.txt` is not.
            return None;
        }
        name.pop();
        let base = name.rsplit(|&b| b == b'/').next().unwrap_or(name);
        info.content_type = mime::content_type(base);
        let mut chosen = Chosen { file, meta, info };
        self.precompressed_sibling(root, name, flags, &mut chosen);
        chosen.info.len = chosen.meta.len();
        chosen.info.mtime = chosen.meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        Some(chosen)
    }

    /// Replaces the file with `name.br` or `name.gz` when one exists and the client accepts
    /// that encoding (brotli first). `name` comes without its NUL and leaves with it.
    fn precompressed_sibling(
        &self,
        root: &fs::Root,
        name: &mut Vec<u8>,
        flags: u8,
        chosen: &mut Chosen,
    ) {
        let base = name.len();
        for (bit, coding, ext) in [(BR, "br", &b".br\0"[..]), (GZIP, "gzip", b".gz\0")] {
            if flags & bit == 0 {
                continue;
            }
            name.truncate(base);
            name.extend_from_slice(ext);
            let Some(f) = self.open(root, name) else {
                continue;
            };
            if let Some(m) = f.metadata().ok().filter(|m| m.is_file()) {
                (chosen.file, chosen.meta, chosen.info.encoding) = (f, m, Some(coding));
                return;
            }
        }
        name.truncate(base);
        name.push(0);
    }

    fn open(&self, root: &fs::Root, name: &[u8]) -> Option<File> {
        let name = CStr::from_bytes_with_nul(name).ok()?;
        match root.open(name, self.follow_symlinks) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                log::debug!("static: {name:?} leads outside the folder or cannot be read");
                None
            }
            Err(_) => None,
        }
    }

    /// Applies the conditions of the request to the chosen file, and writes the header lines.
    fn reply(&self, info: &Info, body: Body, ask: &Ask<'_>, head: &mut Vec<u8>) -> Reply {
        let (len, mtime) = (info.len, info.mtime);
        let secs = headers::unix_secs(mtime);
        let mut tag = [0u8; 40];
        let tag = {
            let mut w = &mut tag[..];
            let _ = write!(w, "\"{secs:x}-{len:x}\"");
            let n = 40 - w.len();
            &tag[..n]
        };
        head.clear();
        head.extend_from_slice(b"etag: ");
        head.extend_from_slice(tag);
        head.extend_from_slice(b"\r\nlast-modified: ");
        let lm_start = head.len();
        let _ = write!(head, "{}", HttpDate::from(mtime));
        let lm_end = head.len();
        head.extend_from_slice(b"\r\ncache-control: ");
        head.extend_from_slice(self.cache_control.as_bytes());
        head.extend_from_slice(b"\r\n");
        if let Some(coding) = info.encoding {
            head.extend_from_slice(b"content-encoding: ");
            head.extend_from_slice(coding.as_bytes());
            head.extend_from_slice(b"\r\nvary: accept-encoding\r\n");
        }
        let unchanged = match (ask.if_none_match, ask.if_modified_since) {
            (Some(list), _) => headers::etag_matches(list, tag),
            (None, Some(date)) => headers::unmodified_since(date, secs),
            (None, None) => false,
        };
        if unchanged {
            return Reply {
                status: 304,
                length: None,
                body: None,
            };
        }
        head.extend_from_slice(b"content-type: ");
        head.extend_from_slice(info.content_type.as_bytes());
        head.extend_from_slice(b"\r\naccept-ranges: bytes\r\n");
        let span = match (ask.range, ask.if_range) {
            (Some(_), Some(cond))
                if !headers::if_range_holds(cond, tag, &head[lm_start..lm_end]) =>
            {
                Span::Whole
            }
            (Some(range), _) => headers::span(range, len),
            (None, _) => Span::Whole,
        };
        match span {
            Span::Whole => Reply {
                status: 200,
                length: Some(len),
                body: Some((body, 0)),
            },
            Span::Part(first, last) => {
                let _ = write!(head, "content-range: bytes {first}-{last}/{len}\r\n");
                Reply {
                    status: 206,
                    length: Some(last - first + 1),
                    body: Some((body, first)),
                }
            }
            Span::Unsatisfiable => {
                let _ = write!(head, "content-range: bytes */{len}\r\n");
                Reply {
                    status: 416,
                    length: Some(0),
                    body: None,
                }
            }
        }
    }
}
