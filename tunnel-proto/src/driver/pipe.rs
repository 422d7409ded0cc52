//! Splices a tunneled stream with a local socket, the way an agent serves a Connect.
//!
//! Nothing is buffered while the stream is idle: bytes from the tunnel are written to the
//! socket straight from the received message, and bytes from the socket are read (into the
//! stack) only when the stream's send queue has room, then copied once into a Data frame.
//! That keeps an idle stream to its bookkeeping, where `tokio::io::copy_bidirectional` would
//! hold two 8 KiB buffers per stream for its lifetime.
//!
//! Either side ending ends both, as remotedialer's pipe does (there is no half-close).

use std::io;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;
use tokio::net::{TcpStream, UnixStream};

use super::Stream;

/// A local socket the pipe can read without a buffer of its own.
pub trait LocalSocket: AsyncWrite + Unpin {
    /// Waits until the socket may be readable.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads without waiting; `WouldBlock` when nothing is there after all.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
}

impl LocalSocket for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::try_read(self, buf)
    }
}

impl LocalSocket for UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UnixStream::poll_read_ready(self, cx)
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        UnixStream::try_read(self, buf)
    }
}

/// Bytes moved by a pipe, and which side ended it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipeStats {
    /// From the tunnel to the local socket.
    pub to_local: u64,
    /// From the local socket into the tunnel.
    pub to_tunnel: u64,
    /// True when the local socket ended first.
    pub local_ended: bool,
}

/// Largest read from the local socket at once (on the stack).
const READ_CHUNK: usize = 32 << 10;
/// Reads or writes per poll before yielding to other tasks.
const TURNS_PER_POLL: usize = 16;

/// Copies both ways until either side ends or fails, then closes both.
///
/// When the peer closes, the stream stops taking bytes at once but may still hold bytes it
/// received before the close: those are all written to the socket before the pipe ends (the
/// local direction stops; the tunnel direction drains to its end).
pub async fn pipe<S: LocalSocket>(mut stream: Stream, mut socket: S) -> io::Result<PipeStats> {
    let mut stats = PipeStats::default();
    let mut outgoing: Option<Bytes> = None;
    // Set once the stream stops taking bytes: its receive side has ended too (a close or a
    // reset ends both ways), so reading it to its end finishes the pipe.
    let mut tunnel_unwritable = false;
    let result = std::future::poll_fn(|cx| {
        let mut turns = 0;
        // Tunnel -> local.
        loop {
            if turns == TURNS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            turns += 1;
            if let Some(chunk) = outgoing.as_mut() {
                match std::pin::Pin::new(&mut socket).poll_write(cx, chunk) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        chunk.advance(n);
                        stats.to_local += n as u64;
                        if chunk.is_empty() {
                            outgoing = None;
                        }
                        continue;
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => break,
                }
            }
            match stream.poll_read_chunk(cx, usize::MAX) {
                Poll::Ready(Ok(Some(chunk))) => outgoing = Some(chunk),
                Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => break,
            }
        }
        // Local -> tunnel.
        while !tunnel_unwritable {
            if turns >= 2 * TURNS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            turns += 1;
            let room = match stream.poll_send_capacity(cx) {
                Poll::Ready(Ok(room)) => room,
                // Bytes received before the end still go to the socket: the read side above
                // reports the end (or the failure) once they have.
                Poll::Ready(Err(_)) => {
                    tunnel_unwritable = true;
                    break;
                }
                Poll::Pending => break,
            };
            match socket.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => break,
            }
            let mut buf = [0u8; READ_CHUNK];
            match socket.try_read(&mut buf[..room.min(READ_CHUNK)]) {
                Ok(0) => {
                    stats.local_ended = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => match stream.write_now(&buf[..n]) {
                    Ok(_) => stats.to_tunnel += n as u64,
                    // Closed between the capacity check and the write: as above.
                    Err(_) => {
                        tunnel_unwritable = true;
                        break;
                    }
                },
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
        Poll::Pending
    })
    .await;
    match &result {
        Ok(()) => stream.close(),
        Err(err) => stream.reset(&err.to_string()),
    }
    // Flush what the tunnel already delivered, then close the socket (dropped below).
    if let Some(mut chunk) = outgoing.take() {
        let len = chunk.remaining() as u64;
        if tokio::io::AsyncWriteExt::write_all_buf(&mut socket, &mut chunk)
            .await
            .is_ok()
        {
            stats.to_local += len;
        }
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut socket).await;
    result.map(|()| stats)
}
