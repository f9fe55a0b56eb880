//! A worker's side of `sockets`: one accept loop per socket on the worker's own
//! `SO_REUSEPORT` listener, a task per connection (`socket::serve`), and the handler calls.

use std::{
    net::{TcpListener, UdpSocket},
    os::{fd::AsFd, unix::net::UnixListener},
    panic::AssertUnwindSafe,
    rc::Rc,
    time::Duration,
};

use async_executor::{LocalExecutor, Task};
use futures_lite::{AsyncRead, AsyncWrite, FutureExt};

use super::{InCall, Worker};
use crate::{
    http::Site as _,
    runtime::reactor::{Async, Timer},
    socket::{
        self,
        conn::Settings,
        registry::{Close, Sockets},
        Listener, SocketEvent,
    },
};

impl socket::Site for Worker {
    fn sockets(&self) -> &Sockets {
        &self.sockets
    }

    fn socket_event(&self, socket: usize, event: SocketEvent<'_>) -> bool {
        let stats = self.my_stats();
        let _in_call = InCall::enter(stats);
        let mut slot = self.instances.borrow_mut();
        if slot.is_none() {
            *slot = self.create_instances();
        }
        match slot.as_mut() {
            Some(inst) => inst.socket_event(socket, stats, event),
            None => false,
        }
    }
}

/// Starts an accept loop (TCP) or a receive loop (UDP) for each of this worker's sockets (in
/// `sockets` order); dropping the tasks stops them.
pub(super) fn start(
    ex: &Rc<LocalExecutor<'static>>,
    worker: &Rc<Worker>,
    listeners: Vec<Listener>,
) -> Result<Vec<Task<()>>, String> {
    let mut tasks = Vec::new();
    let fail = |socket: usize| {
        move |e: std::io::Error| format!("cannot register the listener of socket {socket}: {e}")
    };
    for (socket, listener) in listeners.into_iter().enumerate() {
        let task = match listener {
            Listener::Tcp(l) => {
                let l = Async::new(l).map_err(fail(socket))?;
                ex.spawn(accept_loop(ex.clone(), worker.clone(), socket, l))
            }
            Listener::Unix(l) => {
                let l = Async::new(l).map_err(fail(socket))?;
                ex.spawn(accept_unix(ex.clone(), worker.clone(), socket, l))
            }
            Listener::Udp(s) => {
                let s = Async::new(s).map_err(fail(socket))?;
                ex.spawn(receive_loop(worker.clone(), socket, s))
            }
        };
        tasks.push(task);
    }
    Ok(tasks)
}

/// Hands each datagram to the socket's handler on this worker.
async fn receive_loop(worker: Rc<Worker>, socket: usize, udp: Async<UdpSocket>) {
    let mut buf = vec![0; 65_536];
    loop {
        match udp.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let max = worker
                    .plan
                    .borrow()
                    .sockets
                    .get(socket)
                    .map(|s| s.max_package_bytes);
                if n > max.unwrap_or(0) {
                    log::debug!("socket {socket}: a datagram of {n} bytes from {from} is over max_package_bytes; dropped");
                    continue;
                }
                let peer = worker.sockets.udp.peer(socket, from);
                let addr = from.to_string();
                socket::Site::socket_event(
                    &*worker,
                    socket,
                    SocketEvent::Packet(peer, &addr, &buf[..n]),
                );
            }
            Err(e) => {
                log::error!(
                    "worker {}: socket {socket}: receive failed: {e}",
                    worker.id()
                );
                Timer::after(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept_loop(
    ex: Rc<LocalExecutor<'static>>,
    worker: Rc<Worker>,
    socket: usize,
    listener: Async<TcpListener>,
) {
    loop {
        match listener.accept_std().await {
            Ok((stream, peer)) => adopt(&ex, &worker, socket, stream, peer.to_string()),
            Err(e) => {
                log::error!(
                    "worker {}: socket {socket}: accept failed: {e}",
                    worker.id()
                );
                Timer::after(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept_unix(
    ex: Rc<LocalExecutor<'static>>,
    worker: Rc<Worker>,
    socket: usize,
    listener: Async<UnixListener>,
) {
    loop {
        match listener.accept_std().await {
            Ok((stream, _)) => adopt(&ex, &worker, socket, stream, "unix".into()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::error!(
                    "worker {}: socket {socket}: accept failed: {e}",
                    worker.id()
                );
                Timer::after(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Counts a socket connection on its worker for as long as its task lives.
struct Counted(Rc<Worker>);

impl Drop for Counted {
    fn drop(&mut self) {
        let n = &self.0.socket_conns;
        n.set(n.get() - 1);
    }
}

fn adopt<S: AsFd + 'static>(
    ex: &Rc<LocalExecutor<'static>>,
    worker: &Rc<Worker>,
    socket: usize,
    stream: S,
    peer: String,
) where
    for<'a> &'a Async<S>: AsyncRead + AsyncWrite,
{
    let settings = {
        let plan = worker.plan.borrow();
        let Some(s) = plan.sockets.get(socket) else {
            return;
        };
        Settings {
            socket,
            framing: s.framing.clone(),
            max_package_bytes: s.max_package_bytes,
            send_queue: SEND_QUEUE,
        }
    };
    let _ = socket2::SockRef::from(&stream).set_nodelay(true);
    let stream = match Async::new(stream) {
        Ok(s) => s,
        Err(e) => {
            log::error!("worker {}: cannot register a connection: {e}", worker.id());
            return;
        }
    };
    let id = worker.next_id();
    worker.socket_conns.set(worker.socket_conns.get() + 1);
    let counted = Counted(worker.clone());
    ex.spawn(async move {
        let w = &counted.0;
        let served = AssertUnwindSafe(socket::serve(&**w, &settings, id, &stream, &peer))
            .catch_unwind()
            .await;
        if served.is_err() {
            log::error!(
                "worker {}: socket connection {id} ended by a panic in the server (a bug: please report it)",
                w.id()
            );
        }
    })
    .detach();
}

/// Asks every socket connection of this worker to close (the server stops).
pub(super) fn close_all(worker: &Worker) {
    for id in worker.sockets.of_worker(worker.id()) {
        let _ = worker.sockets.close(id, Close::Stopping);
    }
}

/// Writes queued to one socket connection before it counts as a slow reader and is closed.
const SEND_QUEUE: usize = 1024;
