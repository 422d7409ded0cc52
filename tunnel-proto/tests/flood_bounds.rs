//! Floods from a raw websocket peer that never reads, one per bound: junk Data (Error replies),
//! Connects to refused targets, Pings while the outbound is blocked, Data on many streams the
//! local side never reads, and a junk flood with the read-stop bound below the reply bound.
//!
//! Each test checks the session's verdict (a clear [`SessionError`], or back-pressure that
//! holds) and that the process's resident memory stays flat while the flood is many times
//! larger. RSS is process-wide, so the tests take a lock and run one at a time.

mod support;

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tunnel_proto::driver::Tunnel;
use tunnel_proto::mux::{Authorizer, SessionError};
use tunnel_proto::wire::{Body, Message, Target};
use tunnel_proto::{Role, SessionConfig};

use support::*;

/// RSS is one number for the whole process: one flood at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// How much RSS may grow during a flood.
const RSS_SLACK: u64 = 64 << 20;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The process's resident set, from /proc/self/status.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS value");
    kib << 10
}

/// Tracks the highest RSS seen above a baseline.
struct RssWatch {
    base: u64,
    peak: u64,
}

impl RssWatch {
    fn start() -> Self {
        let base = rss();
        Self { base, peak: base }
    }

    fn sample(&mut self) {
        self.peak = self.peak.max(rss());
    }

    fn growth(&mut self) -> u64 {
        self.sample();
        self.peak.saturating_sub(self.base)
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn frame(id: i64, conn_id: i64, body: Body) -> WsMessage {
    WsMessage::Binary(Message::new(id, conn_id, body).to_bytes())
}

/// A raw peer (client end) and a session of ours (server end) over loopback TCP.
async fn flood_pair(
    config: SessionConfig,
    authorizer: Authorizer,
) -> (WebSocketStream<TcpStream>, Tunnel) {
    let (peer, ours) = ws_pair_tcp().await;
    let tunnel = Tunnel::spawn(ours, config, authorizer);
    (peer, tunnel)
}

/// Sends `count` frames made by `make`, flushing every 256, without ever reading. Stops early
/// once the session has ended (the socket then fails) and samples RSS as it goes. Returns how
/// many were sent.
async fn flood(
    peer: &mut WebSocketStream<TcpStream>,
    tunnel: &Tunnel,
    watch: &mut RssWatch,
    count: u64,
    mut make: impl FnMut(u64) -> WsMessage,
) -> u64 {
    for i in 0..count {
        if peer.feed(make(i)).await.is_err() {
            return i;
        }
        if i % 256 == 255 {
            if peer.flush().await.is_err() {
                return i;
            }
            if i % (64 << 10) == 65_535 {
                watch.sample();
                if tunnel.close_reason().is_some() {
                    return i;
                }
            }
        }
    }
    count
}

fn server_config() -> SessionConfig {
    SessionConfig::new(Role::Server)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Data for a stream that does not exist, 1.5 million times: each one queues a
/// `connection not found` Error that the peer never reads.
#[test]
fn junk_data_flood_ends_the_session_with_control_queue_overflow() {
    let _serial = serial();
    runtime().block_on(async {
        let (mut peer, tunnel) = flood_pair(server_config(), allow_none()).await;
        let mut watch = RssWatch::start();
        const COUNT: u64 = 1_500_000;
        let sent = flood(&mut peer, &tunnel, &mut watch, COUNT, |i| {
            frame(i as i64 + 1, 7, Body::Data(Bytes::from_static(b"x")))
        })
        .await;
        let reason = timeout(Duration::from_secs(20), tunnel.closed()).await;
        let growth = watch.growth();
        println!(
            "junk data: sent {sent} of {COUNT} frames (~{:.0} MiB of Error replies if kept), \
             RSS grew {:.1} MiB, session: {reason:?}",
            mib(sent * 37),
            mib(growth)
        );
        assert!(
            matches!(reason, Ok(SessionError::ControlQueueOverflow { .. })),
            "session should end with ControlQueueOverflow, got {reason:?}"
        );
        assert!(growth < RSS_SLACK, "RSS grew {:.1} MiB", mib(growth));
    });
}

/// Connects to a refused target, 1.5 million times: each one queues `connect not allowed`.
#[test]
fn refused_connect_flood_ends_the_session_with_control_queue_overflow() {
    let _serial = serial();
    runtime().block_on(async {
        let (mut peer, tunnel) = flood_pair(server_config(), allow_none()).await;
        let mut watch = RssWatch::start();
        const COUNT: u64 = 1_500_000;
        let sent = flood(&mut peer, &tunnel, &mut watch, COUNT, |i| {
            let target = Target::new("tcp", "10.0.0.1:1");
            frame(i as i64 + 1, i as i64 + 2, Body::Connect(target))
        })
        .await;
        let reason = timeout(Duration::from_secs(20), tunnel.closed()).await;
        let growth = watch.growth();
        println!(
            "refused connects: sent {sent} of {COUNT} frames, RSS grew {:.1} MiB, session: \
             {reason:?}",
            mib(growth)
        );
        assert!(
            matches!(reason, Ok(SessionError::ControlQueueOverflow { .. })),
            "session should end with ControlQueueOverflow, got {reason:?}"
        );
        assert!(growth < RSS_SLACK, "RSS grew {:.1} MiB", mib(growth));
    });
}

/// Five million Pings while our outbound is blocked by a stream whose Data the peer never
/// reads. Pongs coalesce (RFC 6455 §5.5.3), so the session lives and memory stays flat.
#[test]
fn ping_flood_with_blocked_outbound_keeps_memory_flat() {
    let _serial = serial();
    runtime().block_on(async {
        let (mut peer, tunnel) = flood_pair(server_config(), allow_tcp()).await;
        // Block our outbound: the peer opens a stream and our side writes into it until the
        // socket buffers are full and a Data frame waits in the driver.
        peer.send(frame(1, 2, Body::Connect(Target::new("tcp", "10.0.0.1:1"))))
            .await
            .unwrap();
        let mut stream = tunnel.accept().await.expect("stream");
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 << 10];
            loop {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        // Some Data is out; the writer keeps the send queue full from here on, so by the
        // time the Pings are read the socket buffers are full and a Data frame waits.
        timeout(Duration::from_secs(20), async {
            while tunnel.stats().data_bytes_out < (1 << 20) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("data flows");
        let out_before = tunnel.stats().data_bytes_out;
        let mut watch = RssWatch::start();
        const COUNT: u64 = 5_000_000;
        let sent = flood(&mut peer, &tunnel, &mut watch, COUNT, |_| {
            WsMessage::Ping(Bytes::new())
        })
        .await;
        let growth = watch.growth();
        let reason = tunnel.close_reason();
        println!(
            "ping flood: sent {sent} of {COUNT} Pings, data out before {:.1} MiB, RSS grew \
             {:.1} MiB, session: {reason:?}",
            mib(out_before),
            mib(growth)
        );
        assert_eq!(sent, COUNT);
        assert_eq!(reason, None, "a Ping flood must not end the session");
        assert!(growth < RSS_SLACK, "RSS grew {:.1} MiB", mib(growth));
        writer.abort();
    });
}

/// 48 streams get 4 MiB each (Pause ignored) and nobody reads them: 192 MiB offered, twelve
/// times the session's aggregate receive bound (16 MiB here; each stream stays under its own
/// 32 MiB bound, so only the aggregate can stop this).
#[test]
fn unread_streams_flood_ends_the_session_at_the_aggregate_receive_bound() {
    let _serial = serial();
    runtime().block_on(async {
        let mut config = server_config();
        config.max_session_recv_buffer(16 << 20);
        let (mut peer, tunnel) = flood_pair(config, allow_tcp()).await;
        const STREAMS: i64 = 48;
        const PER_STREAM: u64 = 4 << 20;
        for s in 0..STREAMS {
            let target = Target::new("tcp", "10.0.0.1:1");
            peer.feed(frame(s + 1, s + 2, Body::Connect(target)))
                .await
                .unwrap();
        }
        peer.flush().await.unwrap();
        let mut watch = RssWatch::start();
        let chunk = Bytes::from(vec![9u8; 32 << 10]);
        let per_stream = PER_STREAM / chunk.len() as u64;
        let count = per_stream * STREAMS as u64;
        let sent = flood(&mut peer, &tunnel, &mut watch, count, |i| {
            let s = (i % STREAMS as u64) as i64;
            frame(1000 + i as i64, s + 2, Body::Data(chunk.clone()))
        })
        .await;
        let reason = timeout(Duration::from_secs(20), tunnel.closed()).await;
        let growth = watch.growth();
        println!(
            "unread streams: sent {:.0} of {:.0} MiB on {STREAMS} streams, RSS grew {:.1} MiB, \
             session: {reason:?}",
            mib(sent * chunk.len() as u64),
            mib(count * chunk.len() as u64),
            mib(growth)
        );
        assert!(
            matches!(reason, Ok(SessionError::RecvBufferLimit { .. })),
            "session should end with RecvBufferLimit, got {reason:?}"
        );
        assert!(growth < RSS_SLACK, "RSS grew {:.1} MiB", mib(growth));
    });
}

/// Junk Data with the read-stop bound (64 KiB of queued control frames) far below the reply
/// bound: the driver stops reading, so the peer's writes stall in its socket, memory stays
/// flat and the session lives. Once the peer reads, everything flows: every message is
/// handled and every reply arrives (back-pressure, not loss).
#[test]
fn peer_that_does_not_read_is_stalled_by_the_outbound_backlog_bound() {
    let _serial = serial();
    runtime().block_on(async {
        let mut config = server_config();
        config
            .max_outbound_backlog(64 << 10)
            .max_control_queue(256 << 20);
        let (peer, tunnel) = flood_pair(config, allow_none()).await;
        let (mut sink, mut source) = peer.split();
        let mut watch = RssWatch::start();
        const COUNT: u64 = 200_000;
        let junk = Bytes::from(vec![b'j'; 1024]);
        let sent = Arc::new(AtomicU64::new(0));
        let progress = sent.clone();
        let mut flood = tokio::spawn(async move {
            for i in 0..COUNT {
                let message = frame(i as i64 + 1, 7, Body::Data(junk.clone()));
                sink.feed(message).await.unwrap();
                if i % 256 == 255 {
                    sink.flush().await.unwrap();
                }
                progress.store(i + 1, Ordering::Relaxed);
            }
            sink.flush().await.unwrap();
            sink
        });
        // 200 MB cannot fit in the socket buffers: if reads stop, so does the flood.
        let stalled = timeout(Duration::from_secs(3), &mut flood).await.is_err();
        let growth = watch.growth();
        let handled = tunnel.stats().messages_in;
        println!(
            "stalled peer: flood stalled {stalled} after {} of {COUNT} frames ({:.0} MiB \
             offered), {handled} handled, RSS grew {:.1} MiB, session: {:?}",
            sent.load(Ordering::Relaxed),
            mib(COUNT * 1024),
            mib(growth),
            tunnel.close_reason()
        );
        assert!(stalled, "the flood should stall while we do not read");
        assert!(handled < COUNT);
        assert_eq!(tunnel.close_reason(), None, "back-pressure, not loss");
        assert!(growth < RSS_SLACK, "RSS grew {:.1} MiB", mib(growth));

        // The peer reads: the backlog drains, reading resumes, nothing was lost.
        let replies = tokio::spawn(async move {
            let mut replies = 0u64;
            while replies < COUNT {
                match source.next().await {
                    Some(Ok(WsMessage::Binary(_))) => replies += 1,
                    Some(Ok(_)) => {}
                    other => panic!("peer's read ended: {other:?}"),
                }
            }
            replies
        });
        let _sink = timeout(Duration::from_secs(120), flood)
            .await
            .expect("flood completes once the peer reads")
            .unwrap();
        let replies = timeout(Duration::from_secs(120), replies)
            .await
            .expect("every reply arrives")
            .unwrap();
        let growth = watch.growth();
        println!(
            "after the peer read: {} handled, {replies} replies, RSS grew {:.1} MiB",
            tunnel.stats().messages_in,
            mib(growth)
        );
        assert_eq!(tunnel.stats().messages_in, COUNT);
        assert_eq!(tunnel.close_reason(), None);
        assert!(growth < RSS_SLACK, "RSS grew {:.1} MiB", mib(growth));
    });
}
