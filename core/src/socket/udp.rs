//! UDP sockets as any thread sees them: each socket's sending handle, and the peers
//! datagrams came from, each known by a token a handler answers with `host.send_to`.

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    sync::{Mutex, PoisonError, RwLock},
};

use plughost_plugin_api::HostError;

/// Peers remembered at most; past it the table starts again (older tokens answer
/// `NotFound`), so a flood of source addresses costs bounded memory.
const MAX_PEERS: usize = 65_536;

#[derive(Debug, Default)]
struct Peers {
    by_addr: HashMap<(usize, SocketAddr), u64>,
    by_token: HashMap<u64, (usize, SocketAddr)>,
    next: u64,
}

/// Every UDP socket's sender and the peers that sent to them.
#[derive(Debug, Default)]
pub struct Udp {
    senders: RwLock<HashMap<usize, UdpSocket>>,
    peers: Mutex<Peers>,
}

impl Udp {
    /// Registers the socket that answers for socket `index` of `sockets`.
    pub fn set_sender(&self, index: usize, socket: UdpSocket) {
        let mut senders = self.senders.write().unwrap_or_else(PoisonError::into_inner);
        senders.insert(index, socket);
    }

    /// The token of `addr` as a peer of socket `index` (the same token while remembered).
    pub fn peer(&self, index: usize, addr: SocketAddr) -> u64 {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = peers.by_addr.get(&(index, addr)) {
            return *t;
        }
        if peers.by_addr.len() >= MAX_PEERS {
            peers.by_addr.clear();
            peers.by_token.clear();
        }
        peers.next += 1;
        let token = peers.next;
        peers.by_addr.insert((index, addr), token);
        peers.by_token.insert(token, (index, addr));
        token
    }

    /// Sends a datagram to the peer `token`, from the socket it sent to.
    pub fn send_to(&self, token: u64, data: &[u8]) -> Result<(), HostError> {
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let (index, addr) = *peers.by_token.get(&token).ok_or(HostError::NotFound)?;
        drop(peers);
        let senders = self.senders.read().unwrap_or_else(PoisonError::into_inner);
        let socket = senders.get(&index).ok_or(HostError::NotFound)?;
        match socket.send_to(data, addr) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(HostError::QueueFull),
            Err(_) => Err(HostError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_get_stable_tokens_and_answers() {
        let udp = Udp::default();
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = client.local_addr().unwrap();
        udp.set_sender(0, server.try_clone().unwrap());
        let t = udp.peer(0, addr);
        assert_eq!(udp.peer(0, addr), t);
        assert_ne!(udp.peer(1, addr), t);
        udp.send_to(t, b"hi").unwrap();
        let mut buf = [0; 8];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"hi"[..], server.local_addr().unwrap())
        );
        assert_eq!(udp.send_to(999, b"x"), Err(HostError::NotFound));
    }
}
