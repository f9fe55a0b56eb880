//! Reading request input: the connection's read buffer, and bodies framed by
//! `Content-Length` or chunked transfer coding.

use std::{
    io,
    net::TcpStream,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use futures_lite::{AsyncRead, AsyncReadExt};

use super::parse::Refusal;
use crate::runtime::reactor::Async;

/// The read buffer: `data[start..end]` holds bytes not yet consumed. It starts small and
/// grows, up to `max`, only for a long head or a body read in place.
pub struct ReadBuf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
    max: usize,
}

impl ReadBuf {
    /// Most requests fit: curl's is under 100 bytes, a browser's with cookies about 1 KiB.
    const INITIAL: usize = 2048;

    /// An empty buffer that may grow to `max` bytes.
    pub fn new(max: usize) -> ReadBuf {
        ReadBuf {
            data: vec![0u8; Self::INITIAL.min(max)].into_boxed_slice(),
            start: 0,
            end: 0,
            max,
        }
    }

    /// Sets how far the buffer may grow (a reload may raise `max_header_bytes`).
    pub fn set_max(&mut self, max: usize) {
        self.max = max.max(self.data.len());
    }

    /// Grows the buffer so `data[start..start + len]` fits, when `max` allows.
    pub fn fit(&mut self, len: usize) -> bool {
        let need = self.start + len;
        if need <= self.data.len() {
            return true;
        }
        if need > self.max {
            return false;
        }
        let size = (self.data.len() * 2).clamp(need, self.max);
        let mut data = vec![0u8; size].into_boxed_slice();
        data[self.start..self.end].copy_from_slice(&self.data[self.start..self.end]);
        self.data = data;
        true
    }

    /// The bytes read and not consumed yet.
    pub fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Drops the first `n` pending bytes.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Whether the buffer can take no more bytes (it holds `max`).
    pub fn is_full(&mut self) -> bool {
        self.space().is_empty()
    }

    /// Room to read into, moving pending bytes to the front or growing when that makes room.
    pub fn space(&mut self) -> &mut [u8] {
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.data.len() {
            self.fit(self.end - self.start + 1);
        }
        &mut self.data[self.end..]
    }
}

impl ReadBuf {
    /// Cuts the pending bytes back to the first `len` (a body moved out of the buffer).
    pub fn truncate(&mut self, len: usize) {
        self.end = self.start + len;
    }
}

/// Bytes of large request bodies this connection holds or was promised, counted against the
/// server-wide `limits.max_inflight_body_bytes`; given back when dropped.
#[derive(Debug)]
pub struct Budget {
    counter: Arc<AtomicUsize>,
    max: usize,
    held: usize,
}

impl Budget {
    /// An empty share of `counter`, which may reach `max`.
    pub fn new(counter: Arc<AtomicUsize>, max: usize) -> Budget {
        Budget {
            counter,
            max,
            held: 0,
        }
    }

    /// Takes `more` bytes from the budget; false (taking nothing) when that would pass it.
    pub fn take(&mut self, more: usize) -> bool {
        let taken = self
            .counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                now.checked_add(more).filter(|&sum| sum <= self.max)
            });
        if taken.is_ok() {
            self.held += more;
        }
        taken.is_ok()
    }

    /// Sets the budget's size (a reload may change it).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Gives back everything taken.
    pub fn release(&mut self) {
        if self.held > 0 {
            self.counter.fetch_sub(self.held, Ordering::AcqRel);
            self.held = 0;
        }
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.release();
    }
}

/// How much a body buffer grows per read: memory follows the bytes that arrive, never the
/// length a header announces.
const GROW: usize = 64 * 1024;

/// Reads the rest of a body of `n` bytes into `body` (which holds the first `body.len()`),
/// growing it as bytes arrive. `Ok(false)` when the input ended first.
pub async fn read_into(
    stream: &Async<TcpStream>,
    body: &mut Vec<u8>,
    n: usize,
) -> io::Result<bool> {
    let mut got = body.len();
    while got < n {
        body.resize((got + GROW).min(n), 0);
        match (&*stream).read(&mut body[got..]).await {
            Ok(0) => {
                body.truncate(got);
                return Ok(false);
            }
            Ok(k) => got += k,
            Err(e) => {
                body.truncate(got);
                return Err(e);
            }
        }
        body.truncate(got);
    }
    Ok(true)
}

/// Reads what is there into `buf`; 0 at the end of the input.
pub async fn read_some(stream: &Async<TcpStream>, buf: &mut ReadBuf) -> io::Result<usize> {
    fill(&mut &*stream, buf).await
}

/// Reads what `input` has into `buf`; 0 at its end.
pub async fn fill<R: AsyncRead + Unpin>(input: &mut R, buf: &mut ReadBuf) -> io::Result<usize> {
    let space = buf.space();
    if space.is_empty() {
        return Err(io::Error::other("read buffer full"));
    }
    let n = input.read(space).await?;
    buf.end += n;
    Ok(n)
}

/// The longest chunk-size or trailer line we wait for.
const MAX_LINE: usize = 1024;

/// Decodes a chunked body that starts `head_len` bytes into the pending input, into `body`.
/// On success the head stays pending (consumed by the caller) and the chunked bytes are gone.
pub async fn read_chunked<R: AsyncRead + Unpin>(
    input: &mut R,
    read: &mut ReadBuf,
    body: &mut Vec<u8>,
    head_len: usize,
    max: usize,
    budget: &mut Budget,
) -> io::Result<Result<(), Refusal>> {
    body.clear();
    let mut c = Chunked {
        input,
        read,
        head_len,
        pos: 0,
    };
    loop {
        let size = match c.size_line().await? {
            Ok(size) => size,
            Err(r) => return Ok(Err(r)),
        };
        if size == 0 {
            return c.trailers().await;
        }
        if size > (max - body.len()) as u64 {
            return Ok(Err(Refusal::TooLarge));
        }
        if !budget.take(size as usize) {
            return Ok(Err(Refusal::Busy));
        }
        c.data(body, size as usize).await?;
        if let Err(r) = c.crlf().await? {
            return Ok(Err(r));
        }
    }
}

/// A chunked body being decoded: `pos` counts the bytes of it decoded after the head and not
/// yet removed from the read buffer.
struct Chunked<'a, R> {
    input: &'a mut R,
    read: &'a mut ReadBuf,
    head_len: usize,
    pos: usize,
}

impl<R: AsyncRead + Unpin> Chunked<'_, R> {
    fn avail(&self) -> &[u8] {
        &self.read.pending()[self.head_len + self.pos..]
    }

    /// Removes the bytes already decoded, then reads more; the input may not end here.
    async fn more(&mut self) -> io::Result<()> {
        self.compact();
        if fill(self.input, self.read).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Removes the decoded bytes after the head from the read buffer.
    fn compact(&mut self) {
        if self.pos == 0 {
            return;
        }
        let from = self.read.start + self.head_len;
        self.read
            .data
            .copy_within(from + self.pos..self.read.end, from);
        self.read.end -= self.pos;
        self.pos = 0;
    }

    async fn size_line(&mut self) -> io::Result<Result<u64, Refusal>> {
        loop {
            match httparse::parse_chunk_size(self.avail()) {
                Ok(httparse::Status::Complete((used, size))) => {
                    self.pos += used;
                    return Ok(Ok(size));
                }
                Ok(httparse::Status::Partial) if self.avail().len() > MAX_LINE => {
                    return Ok(Err(Refusal::BadRequest));
                }
                Ok(httparse::Status::Partial) => self.more().await?,
                Err(_) => return Ok(Err(Refusal::BadRequest)),
            }
        }
    }

    /// Skips trailer lines up to the empty one that ends the body.
    async fn trailers(&mut self) -> io::Result<Result<(), Refusal>> {
        loop {
            match self.avail().windows(2).position(|w| w == b"\r\n") {
                Some(0) => {
                    self.pos += 2;
                    self.compact();
                    return Ok(Ok(()));
                }
                Some(i) => self.pos += i + 2,
                None if self.avail().len() > MAX_LINE => return Ok(Err(Refusal::BadRequest)),
                None => self.more().await?,
            }
        }
    }

    async fn data(&mut self, body: &mut Vec<u8>, size: usize) -> io::Result<()> {
        let mut left = size;
        while left > 0 {
            let take = self.avail().len().min(left);
            body.extend_from_slice(&self.avail()[..take]);
            self.pos += take;
            left -= take;
            if left > 0 {
                self.more().await?;
            }
        }
        Ok(())
    }

    /// The CRLF after a chunk's data.
    async fn crlf(&mut self) -> io::Result<Result<(), Refusal>> {
        while self.avail().len() < 2 {
            self.more().await?;
        }
        if &self.avail()[..2] != b"\r\n" {
            return Ok(Err(Refusal::BadRequest));
        }
        self.pos += 2;
        self.compact();
        Ok(Ok(()))
    }
}
