//! Binding the listeners of `sockets`: TCP and UDP with one `SO_REUSEPORT` socket per
//! worker, unix stream sockets as one file shared by the workers (created 0660, a stale one
//! from a crashed run replaced, removed at stop).

use std::{
    io,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
};

use socket2::{Domain, Protocol, Socket, Type};

use super::bind as bind_tcp;
use crate::{
    config::{unix_path, SocketProtocol},
    error::StartError,
    plan::{Plan, SocketPlan},
    plugin::host::Host,
    socket::Listener,
};

/// A unix socket file, removed when this is dropped unless another server took it over
/// (a restart put its own socket file at the path).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// The file's device and inode, when it was bound.
    id: Option<(u64, u64)>,
}

impl SocketFile {
    /// The guard of the socket file just bound at `path`.
    pub fn new(path: &Path) -> SocketFile {
        SocketFile {
            path: path.to_path_buf(),
            id: file_id(path),
        }
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Each worker's listeners of the sockets bound, with their keys.
pub type PerWorker = Vec<Vec<(String, Listener)>>;

/// Binds `n` listeners (one per worker) for each socket of the plan that `only` picks, and
/// logs each bound address; all or nothing. Returns each worker's listeners, and the unix
/// socket files by key.
pub fn bind(
    plan: &Plan,
    only: impl Fn(&SocketPlan) -> bool,
    (n, share): (usize, bool),
    host: &Host,
) -> Result<(PerWorker, Vec<(String, SocketFile)>), StartError> {
    let mut per_worker: PerWorker = (0..n).map(|_| Vec::new()).collect();
    let mut files = Vec::new();
    let mut senders = Vec::new();
    for (i, s) in plan.sockets.iter().enumerate().filter(|(_, s)| only(s)) {
        let (bound, file, url) = bind_one(s, (n, share), plan.unix_socket_mode)?;
        if let Some(Listener::Udp(u)) = bound.first() {
            let sender = u.try_clone();
            senders.push((
                s.key.clone(),
                sender.map_err(StartError::io("cannot clone a UDP socket"))?,
            ));
        }
        files.extend(file.map(|f| (s.key.clone(), f)));
        match s.handler {
            Some(h) => {
                let handler = &plan.socket_handlers[h].reference;
                log::info!("socket {i} ({handler}) listening on {url}");
            }
            // Not "listening on http://", which is the main listener's ready line.
            None if s.protocol == SocketProtocol::WebSocket => {
                log::info!("socket {i} (WebSocket) serving websocket.routes on {url}")
            }
            None => log::info!("socket {i} (Http) serving the routes on {url}"),
        }
        for (w, l) in bound.into_iter().enumerate() {
            per_worker[w].push((s.key.clone(), l));
        }
    }
    for (key, sender) in senders {
        host.sockets().udp.set_sender(&key, sender);
    }
    Ok((per_worker, files))
}

/// One socket's `n` listeners, its file if it is a unix socket, and its bound address.
fn bind_one(
    s: &SocketPlan,
    (n, share): (usize, bool),
    mode: u32,
) -> Result<(Vec<Listener>, Option<SocketFile>, String), StartError> {
    let upgrades_only = s.protocol == SocketProtocol::WebSocket;
    if let Some(path) = unix_path(&s.listen) {
        let listener = bind_unix(path, mode, share)?;
        let file = SocketFile::new(path);
        let mut all = Vec::new();
        for _ in 0..n {
            let dup = listener.try_clone();
            let dup = dup.map_err(StartError::io("cannot clone a unix socket"))?;
            all.push(if s.protocol.is_http() {
                // Held as a TCP listener, as the main `listen` (see `runtime::accept`).
                let fd = std::os::fd::OwnedFd::from(dup);
                Listener::Http(TcpListener::from(fd), upgrades_only)
            } else {
                Listener::Unix(dup)
            });
        }
        return Ok((all, Some(file), s.listen.clone()));
    }
    let addr: SocketAddr = s.listen.parse().expect("validated");
    let (bound, actual, scheme) = match s.protocol {
        SocketProtocol::Http | SocketProtocol::WebSocket => {
            let bound = bind_tcp(addr, n, share)?;
            let actual = bound[0].local_addr();
            let all = bound.into_iter();
            let all = all.map(|l| Listener::Http(l, upgrades_only)).collect();
            (all, actual, if upgrades_only { "ws" } else { "http" })
        }
        SocketProtocol::Tcp => {
            let bound = bind_tcp(addr, n, share)?;
            let actual = bound[0].local_addr();
            (
                bound.into_iter().map(Listener::Tcp).collect(),
                actual,
                "tcp",
            )
        }
        SocketProtocol::Udp => {
            let bound = bind_udp(addr, n, share)?;
            let actual = bound[0].local_addr();
            (
                bound.into_iter().map(Listener::Udp).collect::<Vec<_>>(),
                actual,
                "udp",
            )
        }
    };
    let actual = actual.map_err(StartError::io("cannot read the bound address"))?;
    Ok((bound, None, format!("{scheme}://{actual}")))
}

/// Binds `n` UDP sockets to `addr` with `SO_REUSEPORT` (port 0: the first picks the port);
/// the kernel spreads datagrams over them by source address.
fn bind_udp(addr: SocketAddr, n: usize, share: bool) -> Result<Vec<UdpSocket>, StartError> {
    let make = |addr: SocketAddr| -> std::io::Result<UdpSocket> {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s.into())
    };
    if addr.port() != 0 && !share {
        // SO_REUSEPORT would let us share a port with another server; refuse that instead.
        UdpSocket::bind(addr).map_err(StartError::io(format!("cannot listen on udp {addr}")))?;
    }
    let first = make(addr).map_err(StartError::io(format!("cannot listen on udp {addr}")))?;
    let actual = first
        .local_addr()
        .map_err(StartError::io("cannot read the bound address"))?;
    let mut all = vec![first];
    for _ in 1..n {
        let next = make(actual).map_err(StartError::io(format!("cannot listen on udp {actual}")));
        all.push(next?);
    }
    Ok(all)
}

/// Binds a unix stream socket at `path` with permissions `mode`. A socket file nobody
/// listens on (left by a crashed run) is replaced; one in use, or a file that is not a
/// socket, is refused. `share` (a restart): one in use is taken over, atomically: the new
/// socket is bound beside it and renamed over it, so a client always finds one that
/// listens, and the old server keeps what it accepted.
pub fn bind_unix(path: &Path, mode: u32, share: bool) -> Result<UnixListener, StartError> {
    let err = StartError::io(format!("cannot listen on unix:{}", path.display()));
    let bind = || -> io::Result<UnixListener> {
        let mut take_over = false;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_err() {
                    std::fs::remove_file(path)?;
                    log::info!("replaced the stale socket file {}", path.display());
                } else if share {
                    take_over = true;
                } else {
                    return Err(io::Error::other("another server listens on it"));
                }
            }
            Ok(_) => return Err(io::Error::other("the file exists and is not a socket")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let at = if take_over {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".{}.new", std::process::id()));
            PathBuf::from(name)
        } else {
            path.to_path_buf()
        };
        let listener = UnixListener::bind(&at)?;
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode))?;
        listener.set_nonblocking(true)?;
        if take_over {
            std::fs::rename(&at, path)?;
            log::info!(
                "took over the socket file {} from the server before",
                path.display()
            );
        }
        Ok(listener)
    };
    bind().map_err(err)
}
