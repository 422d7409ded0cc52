//! Splices a tunnel stream with a local socket and records when bytes last moved, so a draining
//! agent can close the streams that carry nothing.
//!
//! ```text
//!  tunnel Stream ◀──── splice ────▶ Tracked(local socket) ── each read/write ──▶ Activity
//!                                                                                  │
//!  drain token fires ─▶ every DRAIN_IDLE_CHECK: Activity::idle_for() ≥ idle_after? ◀┘
//!                         yes ─▶ drop both ends: the server gets EOF, the socket is closed
//! ```
//!
//! **Idle** means that no byte went through the local socket, either way, for the threshold,
//! and that none is waiting to: a write the socket has not taken yet, or bytes read from the
//! socket that the tunnel has not taken yet (back-pressure), keep a stream busy however long
//! they wait. Closing an idle stream is safe: an HTTP/1.1 keep-alive connection between requests
//! is the common case (the management server pools them for up to a minute, and HTTP clients
//! retry on a closed idle connection), and an idle interactive session would be cut when the
//! grace period ends anyway.
//!
//! **Why not tunnel-proto's `pipe`**: it takes only `TcpStream` and `UnixStream` (its
//! `LocalSocket` trait is not exported), so it cannot read through [`Tracked`]. [`splice`] is
//! the same loop over any `AsyncRead + AsyncWrite`: bytes from the tunnel are written to the
//! socket straight from the received message, bytes from the socket are read into the stack and
//! copied once into a Data frame, and nothing is held while the stream is idle. One difference:
//! the socket is read before the tunnel says it has room, so a stream the server reads slower
//! than the socket fills holds one read (at most 32 KiB) on the heap until the tunnel takes it.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::{PipeStats, Stream};

/// How often a draining agent looks for idle streams. The idle threshold is therefore met
/// within this much after it has passed.
pub const DRAIN_IDLE_CHECK: Duration = Duration::from_secs(1);

/// Largest read from the local socket at once (on the stack), as tunnel-proto's pipe.
const READ_CHUNK: usize = 32 << 10;
/// Reads or writes per poll before yielding to other tasks, as tunnel-proto's pipe.
const TURNS_PER_POLL: usize = 16;

// === Activity ===

/// When bytes last moved through a local socket, and whether any wait to.
///
/// Written by [`Tracked`] on every read and write (a clock read and an atomic store), read by
/// the drain's idle check.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    /// Milliseconds from `origin` to the last byte moved; coarse on purpose, one atomic store.
    last_ms: AtomicU64,
    /// The last read found nothing: the local side is quiet and nothing read waits for the
    /// tunnel. False after a read until the next one comes back empty-handed.
    read_parked: AtomicBool,
    /// The last write could not go out: the socket has not taken bytes the tunnel delivered.
    write_blocked: AtomicBool,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// A record that counts its creation as the last activity.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            read_parked: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
        }
    }

    /// How long no byte has moved, or `None` while bytes wait to move (a write the socket has
    /// not taken, or a read the tunnel has not taken, however old).
    pub fn idle_for(&self) -> Option<Duration> {
        if !self.read_parked.load(Ordering::Relaxed) || self.write_blocked.load(Ordering::Relaxed) {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.origin.elapsed().saturating_sub(last))
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

// === Tracked ===

/// A local socket that records its reads and writes in an [`Activity`].
#[derive(Debug)]
pub struct Tracked<'a, S> {
    inner: S,
    activity: &'a Activity,
}

impl<'a, S> Tracked<'a, S> {
    /// Wraps `inner`, recording into `activity`.
    pub fn new(inner: S, activity: &'a Activity) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &poll {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.activity.touch();
                this.activity.read_parked.store(false, Ordering::Relaxed);
            }
            Poll::Pending => this.activity.read_parked.store(true, Ordering::Relaxed),
            // End or error: the splice ends with it.
            Poll::Ready(_) => {}
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, data);
        match &poll {
            Poll::Ready(Ok(n)) if *n > 0 => {
                this.activity.touch();
                this.activity.write_blocked.store(false, Ordering::Relaxed);
            }
            Poll::Pending => this.activity.write_blocked.store(true, Ordering::Relaxed),
            Poll::Ready(_) => {}
        }
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// === splice ===

/// Copies both ways until either side ends or fails, then closes both: the stream gracefully
/// (Error `EOF` after its queued bytes) or, on an error, with an Error carrying it. As
/// remotedialer's pipe, there is no half-close.
pub async fn splice<S>(mut stream: Stream, mut socket: S) -> io::Result<PipeStats>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut stats = PipeStats::default();
    // From the tunnel, not yet taken by the socket.
    let mut to_local: Option<Bytes> = None;
    // From the socket, not yet taken by the tunnel (only under back-pressure).
    let mut to_tunnel: Option<Bytes> = None;
    let result = std::future::poll_fn(|cx| {
        let mut turns = 0;
        // Tunnel -> local.
        loop {
            if turns == TURNS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            turns += 1;
            if let Some(chunk) = to_local.as_mut() {
                match Pin::new(&mut socket).poll_write(cx, chunk) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        chunk.advance(n);
                        stats.to_local += n as u64;
                        if chunk.is_empty() {
                            to_local = None;
                        }
                        continue;
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => break,
                }
            }
            match stream.poll_read_chunk(cx, usize::MAX) {
                Poll::Ready(Ok(Some(chunk))) => to_local = Some(chunk),
                Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => break,
            }
        }
        // Local -> tunnel.
        loop {
            if turns >= 2 * TURNS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            turns += 1;
            if let Some(chunk) = to_tunnel.as_mut() {
                match Pin::new(&mut stream).poll_write(cx, chunk) {
                    Poll::Ready(Ok(n)) => {
                        chunk.advance(n);
                        stats.to_tunnel += n as u64;
                        if chunk.is_empty() {
                            to_tunnel = None;
                        }
                        continue;
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => break,
                }
            }
            let mut buf = [const { MaybeUninit::<u8>::uninit() }; READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut buf);
            match Pin::new(&mut socket).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    stats.local_ended = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => {
                    let data = buf.filled();
                    // The stream takes what fits in its send queue; the rest waits on the heap.
                    let taken = match Pin::new(&mut stream).poll_write(cx, data) {
                        Poll::Ready(Ok(n)) => n,
                        Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                        Poll::Pending => 0,
                    };
                    stats.to_tunnel += taken as u64;
                    if taken < data.len() {
                        to_tunnel = Some(Bytes::copy_from_slice(&data[taken..]));
                    }
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => break,
            }
        }
        Poll::Pending
    })
    .await;
    match &result {
        Ok(()) => {
            // A full close: never fails, never waits.
            let _ = stream.shutdown().await;
        }
        Err(err) => stream.reset(&err.to_string()),
    }
    // Flush what the tunnel already delivered, then close the socket (dropped below).
    if let Some(mut chunk) = to_local.take() {
        let len = chunk.remaining() as u64;
        if socket.write_all_buf(&mut chunk).await.is_ok() {
            stats.to_local += len;
        }
    }
    let _ = socket.shutdown().await;
    result.map(|()| stats)
}

/// How [`splice_draining`] ended.
#[derive(Debug)]
pub enum SpliceEnd {
    /// Either side ended or failed, as with [`splice`].
    Done(io::Result<PipeStats>),
    /// The agent was draining and the stream had moved no bytes for this long: both ends were
    /// closed (the server's with `EOF`).
    ClosedIdle(Duration),
}

/// [`splice`], until `drain` fires; from then on the stream is checked every
/// [`DRAIN_IDLE_CHECK`] (the first time at once) and closed as soon as it has been idle (see
/// the module docs) for at least `idle_after`. A stream that moves bytes goes on until it ends
/// or the runtime's grace period is over.
pub async fn splice_draining<S>(
    stream: Stream,
    socket: S,
    drain: &CancellationToken,
    idle_after: Duration,
) -> SpliceEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let pipe = splice(stream, Tracked::new(socket, &activity));
    tokio::pin!(pipe);
    let idle = async {
        drain.cancelled().await;
        let mut check = tokio::time::interval(DRAIN_IDLE_CHECK);
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            check.tick().await;
            if let Some(idle) = activity.idle_for()
                && idle >= idle_after
            {
                return idle;
            }
        }
    };
    tokio::select! {
        // The splice first, so bytes that arrive with the check's tick count as activity.
        biased;
        result = &mut pipe => SpliceEnd::Done(result),
        // Dropping the splice drops the stream (a graceful close: `EOF` to the server) and the
        // socket. Nothing is lost: an idle stream has nothing in flight on this side.
        idle = idle => SpliceEnd::ClosedIdle(idle),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, duplex};

    #[tokio::test(start_paused = true)]
    async fn reads_and_writes_are_activity() {
        let activity = Activity::new();
        let (near, mut far) = duplex(64);
        let mut tracked = Tracked::new(near, &activity);
        // Never read: busy, not idle.
        assert_eq!(activity.idle_for(), None);

        // A read that finds nothing parks: idle since creation.
        let mut buf = [0u8; 16];
        assert!(
            tokio::time::timeout(Duration::from_millis(10), tracked.read(&mut buf))
                .await
                .is_err()
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        let idle = activity.idle_for().expect("parked on read");
        assert!(idle >= Duration::from_secs(3), "{idle:?}");

        // Bytes from the far side: activity, and busy until the next empty read.
        far.write_all(b"hi").await.unwrap();
        assert_eq!(tracked.read(&mut buf).await.unwrap(), 2);
        assert_eq!(activity.idle_for(), None);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), tracked.read(&mut buf))
                .await
                .is_err()
        );
        assert!(activity.idle_for().unwrap() < Duration::from_millis(100));

        // A write is activity too.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(activity.idle_for().unwrap() >= Duration::from_secs(5));
        tracked.write_all(b"back").await.unwrap();
        assert!(activity.idle_for().unwrap() < Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_write_is_never_idle() {
        let activity = Activity::new();
        let (near, mut far) = duplex(8);
        let mut tracked = Tracked::new(near, &activity);
        let mut buf = [0u8; 8];
        assert!(
            tokio::time::timeout(Duration::from_millis(10), tracked.read(&mut buf))
                .await
                .is_err()
        );
        // 8 bytes fit, the 9th waits for the far side to read.
        assert!(
            tokio::time::timeout(Duration::from_millis(10), tracked.write_all(&[7u8; 9]))
                .await
                .is_err()
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(activity.idle_for(), None, "a write is waiting");
        let mut got = [0u8; 8];
        far.read_exact(&mut got).await.unwrap();
        tracked.write_all(&[7u8; 1]).await.unwrap();
        assert!(activity.idle_for().unwrap() < Duration::from_millis(100));
    }
}
