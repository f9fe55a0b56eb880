//! A worker's side of `sockets`: an accept loop (TCP, unix) or a receive loop (UDP) per
//! socket, on the worker's own `SO_REUSEPORT` socket (a unix socket is shared), a task per
//! connection (`socket::serve`), the handler calls, and the sockets a reload adds or removes.
//! A socket is known by its key (`plan::SocketPlan::key`).

use std::{
    net::{TcpListener, UdpSocket},
    os::{fd::AsFd, unix::net::UnixListener},
    panic::AssertUnwindSafe,
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use async_executor::LocalExecutor;
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

    fn socket_event(&self, socket: &str, event: SocketEvent<'_>) -> bool {
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

/// Starts serving each of `listeners` (socket key, listener); a socket's loop stops when
/// its task, kept in `socket_loops`, is dropped.
pub(super) fn start(
    ex: &Rc<LocalExecutor<'static>>,
    worker: &Rc<Worker>,
    listeners: Vec<(String, Listener)>,
) -> Result<(), String> {
    for (key, listener) in listeners {
        let fail = |e: std::io::Error| format!("cannot register the listener of {key}: {e}");
        let k: Rc<str> = key.as_str().into();
        let task = match listener {
            Listener::Tcp(l) => {
                let bound = l.local_addr().map_err(fail)?.to_string();
                let l = Async::new(l).map_err(fail)?;
                ex.spawn(accept_loop(
                    ex.clone(),
                    worker.clone(),
                    (k, bound.into()),
                    l,
                ))
            }
            Listener::Unix(l) => {
                let bound = worker.plan.borrow().socket(&key).map(|s| s.listen.clone());
                let l = Async::new(l).map_err(fail)?;
                let k = (k, bound.unwrap_or_default().into());
                ex.spawn(accept_unix(ex.clone(), worker.clone(), k, l))
            }
            Listener::Udp(s) => {
                let s = Async::new(s).map_err(fail)?;
                ex.spawn(receive_loop(worker.clone(), k, s))
            }
            Listener::Http(l, upgrades_only) => {
                let l = Rc::new(Async::new(l).map_err(fail)?);
                let accept = super::accept_loop(ex.clone(), worker.clone(), l, upgrades_only);
                ex.spawn(accept)
            }
        };
        worker.socket_loops.borrow_mut().insert(key, task);
    }
    Ok(())
}

/// After a reload: takes out the loops of the sockets the new plan no longer has (for the
/// caller to cancel) and closes their connections.
pub(super) fn retire(worker: &Worker) -> Vec<async_executor::Task<()>> {
    let plan = worker.plan.borrow().clone();
    let mut loops = worker.socket_loops.borrow_mut();
    let gone: Vec<String> = loops
        .keys()
        .filter(|k| plan.socket(k).is_none())
        .cloned()
        .collect();
    let mut retired = Vec::new();
    for key in &gone {
        retired.extend(loops.remove(key));
        log::info!("worker {}: socket {key} removed", worker.id());
    }
    for (id, key) in worker.socket_of.borrow().iter() {
        if plan.socket(key).is_none() {
            let _ = worker.sockets.close(*id, Close::Stopping);
        }
    }
    retired
}

/// Stops every socket loop and asks every socket connection of this worker to close (the
/// server stops).
pub(super) fn stop(worker: &Worker) {
    worker.socket_loops.borrow_mut().clear();
    for id in worker.sockets.of_worker(worker.id()) {
        let _ = worker.sockets.close(id, Close::Stopping);
    }
}

/// Hands each datagram to the socket's handler on this worker.
async fn receive_loop(worker: Rc<Worker>, key: Rc<str>, udp: Async<UdpSocket>) {
    let mut buf = vec![0; 65_536];
    loop {
        match udp.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let max = worker
                    .plan
                    .borrow()
                    .socket(&key)
                    .map(|s| s.max_package_bytes);
                if n > max.unwrap_or(0) {
                    log::debug!("socket {key}: a datagram of {n} bytes from {from} is over max_package_bytes; dropped");
                    continue;
                }
                let peer = worker.sockets.udp.peer(&key, from);
                let addr = from.to_string();
                let packet = SocketEvent::Packet(peer, &addr, &buf[..n]);
                socket::Site::socket_event(&*worker, &key, packet);
            }
            Err(e) => {
                log::error!("worker {}: socket {key}: receive failed: {e}", worker.id());
                Timer::after(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A socket's key and the address it is bound to.
type Names = (Rc<str>, Arc<str>);

async fn accept_loop(
    ex: Rc<LocalExecutor<'static>>,
    worker: Rc<Worker>,
    names: Names,
    listener: Async<TcpListener>,
) {
    let key = &names.0;
    loop {
        match listener.accept_std().await {
            Ok((stream, peer)) => adopt(&ex, &worker, &names, stream, peer.to_string()),
            Err(e) => {
                log::error!("worker {}: socket {key}: accept failed: {e}", worker.id());
                Timer::after(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept_unix(
    ex: Rc<LocalExecutor<'static>>,
    worker: Rc<Worker>,
    names: Names,
    listener: Async<UnixListener>,
) {
    let key = &names.0;
    loop {
        match listener.accept_std().await {
            Ok((stream, _)) => adopt(&ex, &worker, &names, stream, "unix".into()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::error!("worker {}: socket {key}: accept failed: {e}", worker.id());
                Timer::after(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A socket connection in its worker's count and list, for as long as its task lives.
struct Counted(Rc<Worker>, u64);

impl Drop for Counted {
    fn drop(&mut self) {
        let n = &self.0.socket_conns;
        n.set(n.get() - 1);
        self.0.socket_of.borrow_mut().remove(&self.1);
    }
}

fn adopt<S: AsFd + 'static>(
    ex: &Rc<LocalExecutor<'static>>,
    worker: &Rc<Worker>,
    (key, bound): &Names,
    stream: S,
    peer: String,
) where
    for<'a> &'a Async<S>: AsyncRead + AsyncWrite,
{
    let settings = {
        let plan = worker.plan.borrow();
        let Some(s) = plan.socket(key) else {
            return;
        };
        Settings {
            socket: key.clone(),
            listen: [s.listen_as_written.as_str().into(), bound.clone()],
            framing: s.framing.clone(),
            max_package_bytes: s.max_package_bytes,
            idle: s.idle,
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
    worker.socket_of.borrow_mut().insert(id, key.clone());
    let counted = Counted(worker.clone(), id);
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

/// Writes queued to one socket connection before it counts as a slow reader and is closed.
const SEND_QUEUE: usize = 1024;
