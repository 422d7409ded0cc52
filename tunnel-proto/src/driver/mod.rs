//! The tokio driver: one future per websocket runs a [`Session`], and streams are handles that
//! behave like a `TcpStream`.
//!
//! The driver reads every websocket message as it arrives and hands it to the session, which
//! never waits on a stream: a slow reader only fills its own buffer (and gets the peer paused).
//! It then writes whatever the session schedules (control first, then fair Data turns), runs
//! the one timer the session asks for, and wakes the streams the session names. Protocol
//! decisions live in [`crate::mux`]; nothing here decides what goes on the wire.
//!
//! The one exception to reading as messages arrive is back-pressure on the peer itself: while
//! the session's queued control frames are over [`SessionConfig::max_outbound_backlog`] (the
//! peer is not taking what we send, and each message read may add to it), the driver stops
//! reading and waits for the websocket to take some. Nothing is dropped; the peer's writes
//! wait in its socket. Data does not count: it has per-stream bounds and writers that wait,
//! and two ends doing bulk transfers both ways must never stop reading each other at once.
//! A session that ends because the peer broke a bound is logged as a warning.
//!
//! ```text
//!   Tunnel (handle: open / accept / close)      Stream (AsyncRead + AsyncWrite)
//!        │                                            │ lock, read/write, wake driver
//!        ▼                                            ▼
//!   Shared { Mutex<State { Session, wakers, incoming }> }
//!        ▲
//!        │ lock per step, never across I/O
//!   Driver future: ws.next() → handle_* ; poll_transmit → ws.send ; sleep → handle_timeout
//! ```

pub mod acceptor;
pub mod capability;
pub mod connector;
mod pipe;
pub mod registry;
mod stream;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::{Sink, Stream as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

pub use pipe::{LocalSocket, PipeStats, pipe};
pub use stream::Stream;

use crate::config::SessionConfig;
use crate::mux::{
    Authorizer, Event, OpenError, ProtocolError, Session, SessionError, Stats, Transmit,
};
use crate::wire::Target;

/// Websocket settings that keep an idle tunnel small: 8 KiB read chunks instead of
/// tungstenite's 128 KiB, and writes batched up to 64 KiB. `max_message` bounds one
/// reassembled message (Go servers send one message per application write, however large).
pub fn websocket_config(max_message: usize) -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 16 << 10;
    config.write_buffer_size = 64 << 10;
    config.max_write_buffer_size = (4 << 20).max(2 * max_message);
    config.max_message_size = Some(max_message);
    config.max_frame_size = Some(max_message);
    config
}

/// The default bound on one reassembled websocket message: 64 MiB, tungstenite's default.
pub const DEFAULT_MAX_MESSAGE: usize = 64 << 20;

/// A handle on a running session: open streams, accept the peer's, close the tunnel. Clones
/// share the session.
#[derive(Clone)]
pub struct Tunnel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    state: Mutex<State>,
}

pub(crate) struct State {
    pub(crate) session: Session,
    driver: Option<Waker>,
    pub(crate) readers: HashMap<i64, Waker>,
    pub(crate) writers: HashMap<i64, Waker>,
    incoming: VecDeque<i64>,
    acceptor: Option<Waker>,
    closed_waiters: Vec<Waker>,
    close_requested: bool,
    /// Why a requested close ends the session ([`SessionError::Local`] unless set).
    close_reason: Option<SessionError>,
    protocol_errors: Vec<ProtocolError>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the session half-updated in a way that
        // matters more than losing the tunnel, so a poisoned lock is used as is.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes the driver so it sends what the last command queued.
    pub(crate) fn wake_driver(state: &mut State) {
        if let Some(waker) = state.driver.take() {
            waker.wake();
        }
    }
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl Tunnel {
    /// Starts a session over `ws`. Returns the handle and the driver future, which must be
    /// spawned (or awaited); it resolves with the reason the session ended.
    pub fn new<S>(
        ws: WebSocketStream<S>,
        config: SessionConfig,
        authorizer: Authorizer,
    ) -> (Tunnel, Driver<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let session = Session::new(config, authorizer, now());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                session,
                driver: None,
                readers: HashMap::new(),
                writers: HashMap::new(),
                incoming: VecDeque::new(),
                acceptor: None,
                closed_waiters: Vec::new(),
                close_requested: false,
                close_reason: None,
                protocol_errors: Vec::new(),
            }),
        });
        let driver = Driver {
            shared: shared.clone(),
            ws,
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            pending: None,
            flush_needed: false,
            close_echo_since: None,
            reads_held: false,
        };
        (Tunnel { shared }, driver)
    }

    /// Like [`Tunnel::new`], with the driver spawned on the current runtime.
    pub fn spawn<S>(ws: WebSocketStream<S>, config: SessionConfig, authorizer: Authorizer) -> Tunnel
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (tunnel, driver) = Tunnel::new(ws, config, authorizer);
        tokio::spawn(driver);
        tunnel
    }

    /// Opens a stream to `proto`/`address` through the peer. There is no acknowledgement in the
    /// protocol: this returns at once, and a refused or failed dial shows as an error on the
    /// first read.
    pub fn open(&self, proto: &str, address: &str) -> Result<Stream, OpenError> {
        let mut state = self.shared.lock();
        let target = Target::new(proto, address);
        let id = state.session.open(now(), target.clone())?;
        Shared::wake_driver(&mut state);
        drop(state);
        Ok(Stream::new(self.shared.clone(), id, target))
    }

    /// [`Tunnel::open`] in the shape of a dialer, for HTTP clients and proxies.
    pub async fn dial(&self, proto: &str, address: &str) -> Result<Stream, OpenError> {
        self.open(proto, address)
    }

    /// The next stream the peer opened (and the authorizer allowed), or `None` once the session
    /// has ended.
    pub async fn accept(&self) -> Option<Stream> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for the next stream the peer opened.
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<Option<Stream>> {
        let mut state = self.shared.lock();
        if let Some(id) = state.incoming.pop_front() {
            let target = state
                .session
                .stream_target(id)
                .map(|(t, _)| t.clone())
                .unwrap_or_else(|| Target::new("", ""));
            drop(state);
            return Poll::Ready(Some(Stream::new(self.shared.clone(), id, target)));
        }
        if state.session.closed().is_some() {
            return Poll::Ready(None);
        }
        state.acceptor = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ends the session: queued control messages are flushed, then the websocket is dropped and
    /// every stream fails.
    pub fn close(&self) {
        let mut state = self.shared.lock();
        state.close_requested = true;
        Shared::wake_driver(&mut state);
    }

    /// Like [`Tunnel::close`], with the reason the session will give (a registry evicting it).
    pub(crate) fn close_with(&self, reason: SessionError) {
        let mut state = self.shared.lock();
        state.close_requested = true;
        state.close_reason.get_or_insert(reason);
        Shared::wake_driver(&mut state);
    }

    /// Waits until the session has ended, and says why.
    pub async fn closed(&self) -> SessionError {
        std::future::poll_fn(|cx| {
            let mut state = self.shared.lock();
            if let Some(err) = state.session.closed() {
                return Poll::Ready(err.clone());
            }
            if !state.closed_waiters.iter().any(|w| w.will_wake(cx.waker())) {
                state.closed_waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<SessionError> {
        self.shared.lock().session.closed().cloned()
    }

    /// Whether the peer was heard from within `max_silence`: a session that has stopped
    /// answering pings should not get new dials (spec §6.4, rancher#39597).
    pub fn is_healthy(&self, max_silence: Duration) -> bool {
        let state = self.shared.lock();
        state.session.closed().is_none()
            && now().saturating_duration_since(state.session.last_heard()) <= max_silence
    }

    /// The session's counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().session.stats().clone()
    }

    /// Streams in the session's table.
    pub fn stream_count(&self) -> usize {
        self.shared.lock().session.stream_count()
    }

    /// Protocol violations seen since the last call (for logs and tests).
    pub fn take_protocol_errors(&self) -> Vec<ProtocolError> {
        std::mem::take(&mut self.shared.lock().protocol_errors)
    }
}

/// The future that runs one session over its websocket. Resolves with why the session ended.
pub struct Driver<S> {
    shared: Arc<Shared>,
    ws: WebSocketStream<S>,
    sleep: Pin<Box<Sleep>>,
    /// A frame taken from the session that the websocket was not ready for.
    pending: Option<WsMessage>,
    flush_needed: bool,
    /// Set when the peer sent a Close: tungstenite has queued the echo (same code, RFC 6455
    /// §5.5.1, as gorilla does), which goes out before the driver ends, for at most
    /// [`CLOSE_ECHO_TIMEOUT`] after this instant.
    close_echo_since: Option<tokio::time::Instant>,
    /// Reads are held back because the outbound backlog is over its bound (for logging the
    /// change once).
    reads_held: bool,
}

/// Most inbound messages handled per turn before writing, so a flood in cannot hold back
/// Pongs and control messages out.
const READ_BATCH: usize = 16;
/// Most frames written per turn before reading again, so a stream that keeps its queue full
/// cannot keep the driver from hearing a Pause (or a Ping) from the peer.
const WRITE_BATCH: usize = 16;
/// Retained protocol errors between [`Tunnel::take_protocol_errors`] calls.
const MAX_KEPT_PROTOCOL_ERRORS: usize = 64;
/// How long a driver that received a Close tries to get its echo out before it ends anyway.
const CLOSE_ECHO_TIMEOUT: Duration = Duration::from_secs(1);

impl<S> Driver<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Reads what is there; false once the websocket has ended.
    fn poll_inbound(&mut self, cx: &mut Context<'_>, wake: &mut Vec<Waker>) -> (bool, bool) {
        let mut progressed = false;
        for _ in 0..READ_BATCH {
            let item = match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Pending => return (progressed, true),
                Poll::Ready(item) => item,
            };
            progressed = true;
            let mut state = self.shared.lock();
            let now = now();
            match item {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    if let Err(err) = state.session.handle_binary(now, bytes) {
                        record_violation(&mut state, err);
                    }
                }
                Some(Ok(WsMessage::Text(_))) => {
                    let err = state.session.handle_text(now);
                    record_violation(&mut state, err);
                }
                Some(Ok(WsMessage::Ping(_))) => state.session.handle_ping(now),
                Some(Ok(WsMessage::Pong(_))) => state.session.handle_pong(now),
                Some(Ok(WsMessage::Frame(_))) => {}
                Some(Ok(WsMessage::Close(frame))) => {
                    self.close_echo_since = Some(tokio::time::Instant::now());
                    let why = frame.map_or_else(
                        || "close frame".to_string(),
                        |f| format!("close frame {}: {}", f.code, f.reason),
                    );
                    state.session.close_session(SessionError::Transport(why));
                }
                Some(Err(err)) => state
                    .session
                    .close_session(SessionError::Transport(err.to_string())),
                None => state
                    .session
                    .close_session(SessionError::Transport("connection closed".into())),
            }
            dispatch_events(&mut state, wake);
            if state.session.closed().is_some() {
                return (true, false);
            }
            if state.session.outbound_backlogged() {
                // Write first; the main loop reads again once the backlog is down.
                return (true, true);
            }
        }
        // A full batch: come back at once rather than wait for a wakeup.
        cx.waker().wake_by_ref();
        (progressed, true)
    }

    /// Writes what the session has scheduled; returns whether anything moved.
    fn poll_outbound(
        &mut self,
        cx: &mut Context<'_>,
        wake: &mut Vec<Waker>,
    ) -> Result<bool, tungstenite::Error> {
        let mut progressed = false;
        for _ in 0..WRITE_BATCH {
            if self.pending.is_none() {
                let mut state = self.shared.lock();
                let transmit = state.session.poll_transmit();
                dispatch_events(&mut state, wake);
                drop(state);
                self.pending = match transmit {
                    None => break,
                    Some(Transmit::Message(bytes)) => Some(WsMessage::Binary(bytes)),
                    Some(Transmit::Ping) => Some(WsMessage::Ping(Default::default())),
                    // tungstenite answers every Ping itself while reading (with the Ping's
                    // payload; Go's Pings are empty), so the session's Pong is already out.
                    Some(Transmit::Pong) => continue,
                };
            }
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(err)) => return Err(err),
                Poll::Ready(Ok(())) => {}
            }
            let message = self.pending.take().expect("pending frame");
            Pin::new(&mut self.ws).start_send(message)?;
            self.flush_needed = true;
            progressed = true;
        }
        if self.flush_needed {
            match Pin::new(&mut self.ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flush_needed = false,
                Poll::Ready(Err(err)) => return Err(err),
                Poll::Pending => {}
            }
        }
        Ok(progressed)
    }
}

fn record_violation(state: &mut State, err: ProtocolError) {
    tracing::debug!(error = %err, "protocol violation from peer; message dropped");
    if state.protocol_errors.len() < MAX_KEPT_PROTOCOL_ERRORS {
        state.protocol_errors.push(err);
    }
}

/// Every waiter, for when the session has ended.
fn take_all_wakers(state: &mut State, wake: &mut Vec<Waker>) {
    wake.extend(state.acceptor.take());
    wake.append(&mut state.closed_waiters);
    wake.extend(state.readers.drain().map(|(_, w)| w));
    wake.extend(state.writers.drain().map(|(_, w)| w));
}

/// Turns the session's events into wakers to call once the lock is released.
fn dispatch_events(state: &mut State, wake: &mut Vec<Waker>) {
    while let Some(event) = state.session.poll_event() {
        match event {
            Event::Incoming(id) => {
                state.incoming.push_back(id);
                wake.extend(state.acceptor.take());
            }
            Event::Readable(id) => wake.extend(state.readers.remove(&id)),
            Event::Writable(id) => wake.extend(state.writers.remove(&id)),
            Event::ClientAdded(a) => {
                tracing::debug!(key = %a.client_key_str(), "peer announced client")
            }
            Event::ClientRemoved(a) => {
                tracing::debug!(key = %a.client_key_str(), "peer withdrew client")
            }
        }
    }
}

impl<S> Driver<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Flushes the echo of the peer's Close; true once it is out, failed, or given up on.
    fn poll_close_echo(&mut self, cx: &mut Context<'_>, since: tokio::time::Instant) -> bool {
        let deadline = since + CLOSE_ECHO_TIMEOUT;
        match Pin::new(&mut self.ws).poll_flush(cx) {
            Poll::Ready(_) => true,
            Poll::Pending if tokio::time::Instant::now() >= deadline => true,
            Poll::Pending => {
                if self.sleep.deadline() != deadline {
                    self.sleep.as_mut().reset(deadline);
                }
                self.sleep.as_mut().poll(cx).is_ready()
            }
        }
    }
}

impl<S> Future for Driver<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Output = SessionError;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SessionError> {
        let this = &mut *self;
        let mut wake = Vec::new();
        {
            // Registered before looking for work, so a command issued after the look still
            // wakes this task.
            let mut state = this.shared.lock();
            if !state
                .driver
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                state.driver = Some(cx.waker().clone());
            }
        }
        let result = loop {
            // Writes first: reads spend the task's cooperative I/O budget, and a Pause or Pong
            // queued by the last read must not wait behind the next batch of reads.
            let write_progress = match this.poll_outbound(cx, &mut wake) {
                Ok(progress) => progress,
                Err(err) => {
                    let mut state = this.shared.lock();
                    state
                        .session
                        .close_session(SessionError::Transport(err.to_string()));
                    dispatch_events(&mut state, &mut wake);
                    false
                }
            };

            // Back-pressure: while the peer is not taking our control frames, read no more of
            // its input. poll_outbound has registered for write readiness (the queue is not
            // empty, so it either wrote or found the websocket not ready).
            let backlogged = this.shared.lock().session.outbound_backlogged();
            if backlogged != this.reads_held {
                this.reads_held = backlogged;
                let state = this.shared.lock();
                let backlog = state.session.control_backlog();
                if backlogged {
                    tracing::debug!(backlog, "peer not reading: reads held back");
                } else {
                    tracing::debug!(backlog, "outbound backlog drained: reading again");
                }
            }
            let (read_progress, open) = if backlogged {
                (false, true)
            } else {
                this.poll_inbound(cx, &mut wake)
            };

            // Timers.
            let mut state = this.shared.lock();
            let mut timer_due = false;
            if let Some(deadline) = state.session.poll_timeout() {
                if now() >= deadline {
                    // What the timers queue (a Ping, a SyncConnections) goes out next turn.
                    timer_due = true;
                    state.session.handle_timeout(now());
                    dispatch_events(&mut state, &mut wake);
                }
                if let Some(deadline) = state.session.poll_timeout() {
                    let deadline = tokio::time::Instant::from_std(deadline);
                    if this.sleep.deadline() != deadline {
                        this.sleep.as_mut().reset(deadline);
                    }
                }
            }
            let close_requested = state.close_requested;
            drop(state);
            let timer_fired = this.sleep.as_mut().poll(cx).is_ready();

            let mut state = this.shared.lock();
            if close_requested
                && state.session.closed().is_none()
                && !state.session.has_transmit()
                && this.pending.is_none()
                && !this.flush_needed
            {
                let reason = state.close_reason.take().unwrap_or(SessionError::Local);
                state.session.close_session(reason);
                dispatch_events(&mut state, &mut wake);
            }
            if !open && state.session.closed().is_none() {
                state
                    .session
                    .close_session(SessionError::Transport("connection closed".into()));
                dispatch_events(&mut state, &mut wake);
            }
            if let Some(err) = state.session.closed().cloned() {
                take_all_wakers(&mut state, &mut wake);
                drop(state);
                if let Some(since) = this.close_echo_since
                    && !this.poll_close_echo(cx, since)
                {
                    break Poll::Pending;
                }
                if matches!(
                    err,
                    SessionError::ControlQueueOverflow { .. }
                        | SessionError::RecvBufferLimit { .. }
                ) {
                    tracing::warn!(error = %err, "session ended: the peer broke a bound");
                }
                break Poll::Ready(err);
            }
            drop(state);
            for waker in wake.drain(..) {
                waker.wake();
            }
            if !(read_progress || write_progress || timer_fired || timer_due) {
                break Poll::Pending;
            }
        };
        for waker in wake {
            waker.wake();
        }
        result
    }
}

impl<S> Drop for Driver<S> {
    fn drop(&mut self) {
        // A driver dropped mid-session (its task aborted) must not leave streams waiting.
        let mut wake = Vec::new();
        let mut state = self.shared.lock();
        if state.session.closed().is_none() {
            state
                .session
                .close_session(SessionError::Transport("tunnel driver stopped".into()));
        }
        dispatch_events(&mut state, &mut wake);
        take_all_wakers(&mut state, &mut wake);
        drop(state);
        for waker in wake {
            waker.wake();
        }
    }
}
