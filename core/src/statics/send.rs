//! A file body sent with sendfile(2): the kernel copies from the page cache to the socket,
//! nothing passes through user space. The socket is nonblocking; a full send buffer waits
//! for writability on the worker's reactor.

use std::{fs::File, io, net::TcpStream, os::fd::AsRawFd};

use crate::runtime::reactor::Async;

/// Bytes handed to one sendfile call; between two, other connections of the worker run.
const CHUNK: u64 = 1 << 20;

/// Writes `out` (a response head, and responses before it) flagged `MSG_MORE`, so that the
/// kernel sends it in one segment with the start of the file that follows. Clears `out`.
pub async fn send_head(stream: &Async<TcpStream>, out: &mut Vec<u8>) -> io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        let rest = &out[done..];
        done += stream
            .write_with(rest.len(), |socket| {
                // SAFETY: `rest` is valid for its length during the call.
                let n = unsafe {
                    libc::send(
                        socket.as_raw_fd(),
                        rest.as_ptr().cast(),
                        rest.len(),
                        libc::MSG_MORE | libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            })
            .await?;
    }
    out.clear();
    Ok(())
}

/// Sends `len` bytes of `file` from `offset`. `progress` runs after every call that sent
/// something (the send timeout counts from the last progress). A file that ends early (cut
/// while being sent) is an error: the length was promised, the connection must close.
pub async fn send_file(
    stream: &Async<TcpStream>,
    file: &File,
    mut offset: u64,
    len: u64,
    mut progress: impl FnMut(),
) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        let want = (end - offset).min(CHUNK) as usize;
        let sent = stream
            .write_with(want, |socket| {
                let mut off = offset as libc::off_t;
                // SAFETY: both descriptors are open for the call; the kernel writes `off`.
                let n =
                    unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut off, want) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            })
            .await?;
        if sent == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file got shorter while it was being sent",
            ));
        }
        offset += sent as u64;
        progress();
        if sent == want && offset < end {
            // A fast client could keep this loop going for a whole large file.
            futures_lite::future::yield_now().await;
        }
    }
    Ok(())
}
