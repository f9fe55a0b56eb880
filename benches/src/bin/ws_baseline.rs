//! The baseline plughost's WebSocket echo is measured against: tokio-tungstenite on a tokio
//! runtime with 2 worker threads. Every connection (any path) gets the handshake, then each
//! text or binary message is sent straight back on the same connection (`send`, which
//! flushes); pings are answered by tungstenite, a close ends the connection.
//!
//! Binds 127.0.0.1:0 (or the address given as the first argument) and prints
//! `listening on http://ADDR` on stdout once it accepts. Stops on SIGTERM (default action).

use std::{io::Write, net::SocketAddr};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{accept_async_with_config, tungstenite::protocol::WebSocketConfig};

/// Same limit as the plughost config the benchmark writes.
const MAX_MESSAGE_SIZE: usize = 1 << 20;

async fn echo(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_MESSAGE_SIZE));
    let Ok(mut ws) = accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        if message.is_close() {
            // tungstenite queued the close reply; flush it and stop.
            let _ = ws.close(None).await;
            return;
        }
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            return;
        }
    }
}

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .expect("an address such as 127.0.0.1:0");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let local = listener.local_addr().expect("local address");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{local}");
        let _ = out.flush();
        drop(out);
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(echo(stream));
                }
                Err(e) => eprintln!("accept: {e}"),
            }
        }
    });
}
