//! Splices a tunnel stream with a local socket and records when bytes last moved, so a draining
//! agent can close the streams that carry nothing.
//!
//! ```text
//!  tunnel Stream ◀──── pipe ─────▶ Tracked(local socket) ── each read/write ──▶ Activity
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
//! The splice itself is tunnel-proto's `pipe` (nothing held while the stream is idle; the socket
//! is read only when the tunnel has room), reading and writing through [`Tracked`], which
//! implements its `LocalSocket`. Under back-pressure the last read succeeded and the next one
//! has not happened, so the stream counts as busy.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::{LocalSocket, PipeStats, Stream, pipe};

/// How often a draining agent looks for idle streams. The idle threshold is therefore met
/// within this much after it has passed.
pub const DRAIN_IDLE_CHECK: Duration = Duration::from_secs(1);

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

impl<S: LocalSocket> LocalSocket for Tracked<'_, S> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = self.inner.poll_read_ready(cx);
        if poll.is_pending() {
            self.activity.read_parked.store(true, Ordering::Relaxed);
        }
        poll
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let result = self.inner.try_read(buf);
        match &result {
            Ok(n) if *n > 0 => {
                self.activity.touch();
                self.activity.read_parked.store(false, Ordering::Relaxed);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                self.activity.read_parked.store(true, Ordering::Relaxed);
            }
            // End or error: the pipe ends with it.
            _ => {}
        }
        result
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

// === splice_draining ===

/// How [`splice_draining`] ended.
#[derive(Debug)]
pub enum SpliceEnd {
    /// Either side ended or failed, as with tunnel-proto's `pipe`.
    Done(io::Result<PipeStats>),
    /// The agent was draining and the stream had moved no bytes for this long: both ends were
    /// closed (the server's with `EOF`).
    ClosedIdle(Duration),
}

/// tunnel-proto's `pipe` through [`Tracked`], until `drain` fires; from then on the stream is checked every
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
    S: LocalSocket,
{
    let activity = Activity::new();
    let pipe = pipe(stream, Tracked::new(socket, &activity));
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A loopback TCP pair: (near, far).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap());
        let (near, far) = tokio::join!(near, listener.accept());
        (near.unwrap(), far.unwrap().0)
    }

    #[tokio::test]
    async fn reads_and_writes_are_activity() {
        let activity = Activity::new();
        let (near, mut far) = tcp_pair().await;
        let mut tracked = Tracked::new(near, &activity);
        // Never read: busy, not idle.
        assert_eq!(activity.idle_for(), None);

        // A read that finds nothing parks: idle since creation.
        let mut buf = [0u8; 16];
        let err = tracked.try_read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let idle = activity.idle_for().expect("parked on read");
        assert!(idle >= Duration::from_millis(300), "{idle:?}");

        // Bytes from the far side: activity, and busy until the next empty read.
        far.write_all(b"hi").await.unwrap();
        std::future::poll_fn(|cx| tracked.poll_read_ready(cx))
            .await
            .unwrap();
        assert_eq!(tracked.try_read(&mut buf).unwrap(), 2);
        assert_eq!(activity.idle_for(), None);
        assert!(tracked.try_read(&mut buf).is_err());
        assert!(activity.idle_for().unwrap() < Duration::from_millis(100));

        // A write is activity too.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(activity.idle_for().unwrap() >= Duration::from_millis(300));
        tracked.write_all(b"back").await.unwrap();
        assert!(activity.idle_for().unwrap() < Duration::from_millis(100));
        let mut got = [0u8; 4];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"back");
    }

    #[tokio::test]
    async fn a_blocked_write_is_never_idle() {
        let activity = Activity::new();
        let (near, mut far) = tcp_pair().await;
        let mut tracked = Tracked::new(near, &activity);
        let mut buf = [0u8; 8];
        assert!(tracked.try_read(&mut buf).is_err());
        // Fill the kernel buffers until a write waits for the far side to read.
        let chunk = vec![7u8; 1 << 20];
        let mut written = 0usize;
        while tokio::time::timeout(Duration::from_millis(200), tracked.write(&chunk))
            .await
            .map(|r| written += r.unwrap())
            .is_ok()
        {
            assert!(written < 256 << 20, "the socket never pushed back");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(activity.idle_for(), None, "a write is waiting");
        let mut sink = vec![0u8; 1 << 20];
        let mut drained = 0usize;
        while drained < written {
            drained += far.read(&mut sink).await.unwrap();
        }
        tracked.write_all(&[7u8; 1]).await.unwrap();
        assert!(activity.idle_for().unwrap() < Duration::from_millis(100));
    }
}
