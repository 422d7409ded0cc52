//! A tunneled stream as `AsyncRead + AsyncWrite`, used like a `TcpStream`.
//!
//! Reads copy out of the session's receive queue; writes copy into ready-made Data frames.
//! `poll_shutdown` is a full close (Error `EOF` after the queued bytes): remotedialer has no
//! half-close. Dropping the stream closes it the same way.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Shared;
use crate::mux::{Chunk, ReadOutcome, StreamError};
use crate::wire::Target;

/// One stream of a tunnel.
pub struct Stream {
    shared: Arc<Shared>,
    id: i64,
    target: Target,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.id)
            .field("target", &self.target.to_string())
            .finish()
    }
}

impl Stream {
    pub(crate) fn new(shared: Arc<Shared>, id: i64, target: Target) -> Self {
        Self { shared, id, target }
    }

    /// The stream id on the wire.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// What the stream was opened to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Aborts the stream: queued bytes are dropped and the peer gets an Error with `reason`.
    pub fn reset(&self, reason: &str) {
        let mut state = self.shared.lock();
        state.session.reset(self.id, reason);
        Shared::wake_driver(&mut state);
    }

    /// Takes up to `max` received bytes without copying them; `Ok(None)` at a graceful end.
    pub fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        let mut state = self.shared.lock();
        match state.session.read_chunk(self.id, max) {
            Ok(Chunk::Data(bytes)) => {
                if state.session.has_transmit() {
                    Shared::wake_driver(&mut state);
                }
                Poll::Ready(Ok(Some(bytes)))
            }
            Ok(Chunk::Finished) => Poll::Ready(Ok(None)),
            Ok(Chunk::Blocked) => {
                state.readers.insert(self.id, cx.waker().clone());
                Poll::Pending
            }
            Err(err) => Poll::Ready(Err(to_io(err))),
        }
    }
}

/// Maps a stream error to the `io::ErrorKind` a TCP user would expect.
pub(crate) fn to_io(err: StreamError) -> io::Error {
    let kind = match &err {
        StreamError::Reset(text) if text.to_ascii_lowercase().contains("connection refused") => {
            io::ErrorKind::ConnectionRefused
        }
        StreamError::Reset(text) if text.contains("i/o timeout") => io::ErrorKind::TimedOut,
        StreamError::Refused(_) => io::ErrorKind::PermissionDenied,
        StreamError::Reset(_)
        | StreamError::Synced
        | StreamError::Replaced
        | StreamError::BufferLimit { .. }
        | StreamError::WindowExceeded { .. } => io::ErrorKind::ConnectionReset,
        StreamError::LocallyReset(_) | StreamError::Tunnel(_) => io::ErrorKind::ConnectionAborted,
        StreamError::Closed | StreamError::Unknown(_) => io::ErrorKind::BrokenPipe,
    };
    io::Error::new(kind, err)
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        match state.session.read(self.id, buf.initialize_unfilled()) {
            Ok(ReadOutcome::Data(n)) => {
                buf.advance(n);
                if state.session.has_transmit() {
                    Shared::wake_driver(&mut state);
                }
                Poll::Ready(Ok(()))
            }
            Ok(ReadOutcome::Finished) => Poll::Ready(Ok(())),
            Ok(ReadOutcome::Blocked) => {
                state.readers.insert(self.id, cx.waker().clone());
                Poll::Pending
            }
            Err(err) => Poll::Ready(Err(to_io(err))),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut state = self.shared.lock();
        match state.session.write(self.id, data) {
            Ok(0) => {
                state.writers.insert(self.id, cx.waker().clone());
                Shared::wake_driver(&mut state);
                Poll::Pending
            }
            Ok(n) => {
                Shared::wake_driver(&mut state);
                Poll::Ready(Ok(n))
            }
            Err(err) => Poll::Ready(Err(to_io(err))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued bytes are on their way; the driver sends them without being asked.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        state.session.close(self.id);
        Shared::wake_driver(&mut state);
        Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.session.release(self.id);
        state.readers.remove(&self.id);
        state.writers.remove(&self.id);
        Shared::wake_driver(&mut state);
    }
}

// === impl Stream: for the pipe ===

impl Stream {
    /// Room in the send queue; registers the task for a wakeup when there is none.
    pub(crate) fn poll_send_capacity(&self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut state = self.shared.lock();
        let room = state.session.send_capacity(self.id);
        if room > 0 {
            return Poll::Ready(Ok(room));
        }
        // No room: either the queue is full (wait) or the stream is closed (say why).
        match state.session.write(self.id, &[]) {
            Err(err) => Poll::Ready(Err(to_io(err))),
            Ok(_) => {
                state.writers.insert(self.id, cx.waker().clone());
                if state.session.send_queued(self.id) == 0 {
                    // Closed for sending without an error to report.
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
                Poll::Pending
            }
        }
    }

    /// Queues `data`, all of which fits (the caller checked the capacity).
    pub(crate) fn write_now(&self, data: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        let n = state.session.write(self.id, data).map_err(to_io)?;
        Shared::wake_driver(&mut state);
        Ok(n)
    }

    /// Closes gracefully (Error `EOF` after the queued bytes).
    pub(crate) fn close(&self) {
        let mut state = self.shared.lock();
        state.session.close(self.id);
        Shared::wake_driver(&mut state);
    }
}
