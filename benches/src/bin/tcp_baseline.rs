//! The baseline of the TCP socket benchmark: a line echo on a tokio runtime with 2 worker
//! threads, doing what plughost's `echo.tcp` does on a socket with `framing: Eof("\r\n")`.
//!
//! Each connection reads into a buffer, answers every complete `\r\n`-terminated line in it
//! with `plughost: <line>\r\n` (all the answers to one read with one write), keeps the
//! unterminated rest for the next read, closes after `quit`, and closes a connection whose
//! line grows past 2 MiB (plughost's default `max_package_bytes`).
//!
//! Binds 127.0.0.1:0 (or the address given as the first argument) and prints
//! `listening on http://ADDR` on stdout once it accepts (the benchmark harness waits for
//! that line). Stops on SIGTERM (default action).

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const MAX_LINE: usize = 2 << 20;

async fn serve(mut stream: TcpStream) {
    let mut input = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        input.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        let mut quit = false;
        while let Some(at) = input[start..].windows(2).position(|w| w == b"\r\n") {
            let line = &input[start..start + at];
            out.extend_from_slice(b"plughost: ");
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
            quit |= line == b"quit";
            start += at + 2;
        }
        input.drain(..start);
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if quit || input.len() > MAX_LINE {
            return;
        }
    }
}

fn main() {
    plughost_benches::serve_tokio(|_| {}, serve);
}
