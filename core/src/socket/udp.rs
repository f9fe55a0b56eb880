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
    /// Socket key -> peer address -> token.
    by_addr: HashMap<String, HashMap<SocketAddr, u64>>,
    by_token: HashMap<u64, (String, SocketAddr)>,
    next: u64,
}

/// Every UDP socket's sender and the peers that sent to them.
#[derive(Debug, Default)]
pub struct Udp {
    /// By socket key.
    senders: RwLock<HashMap<String, UdpSocket>>,
    peers: Mutex<Peers>,
}

impl Udp {
    /// Registers the socket that answers for the socket `key`.
    pub fn set_sender(&self, key: &str, socket: UdpSocket) {
        let mut senders = self.senders.write().unwrap_or_else(PoisonError::into_inner);
        senders.insert(key.to_owned(), socket);
    }

    /// Forgets the socket `key` (a reload removed it).
    pub fn remove(&self, key: &str) {
        let mut senders = self.senders.write().unwrap_or_else(PoisonError::into_inner);
        senders.remove(key);
    }

    /// The token of `addr` as a peer of socket `key` (the same token while remembered).
    pub fn peer(&self, key: &str, addr: SocketAddr) -> u64 {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = peers.by_addr.get(key).and_then(|m| m.get(&addr)) {
            return *t;
        }
        if peers.by_token.len() >= MAX_PEERS {
            peers.by_addr.clear();
            peers.by_token.clear();
        }
        peers.next += 1;
        let token = peers.next;
        let of_socket = peers.by_addr.entry(key.to_owned()).or_default();
        of_socket.insert(addr, token);
        peers.by_token.insert(token, (key.to_owned(), addr));
        token
    }

    /// Sends a datagram to the peer `token`, from the socket it sent to.
    pub fn send_to(&self, token: u64, data: &[u8]) -> Result<(), HostError> {
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let (key, addr) = peers
            .by_token
            .get(&token)
            .ok_or(HostError::NotFound)?
            .clone();
        drop(peers);
        let senders = self.senders.read().unwrap_or_else(PoisonError::into_inner);
        let socket = senders.get(&key).ok_or(HostError::NotFound)?;
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
        udp.set_sender("a", server.try_clone().unwrap());
        let t = udp.peer("a", addr);
        assert_eq!(udp.peer("a", addr), t);
        assert_ne!(udp.peer("b", addr), t);
        udp.send_to(t, b"hi").unwrap();
        let mut buf = [0; 8];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"hi"[..], server.local_addr().unwrap())
        );
        assert_eq!(udp.send_to(999, b"x"), Err(HostError::NotFound));
        udp.remove("a");
        assert_eq!(udp.send_to(t, b"x"), Err(HostError::NotFound));
    }
}
