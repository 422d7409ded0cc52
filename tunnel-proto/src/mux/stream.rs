//! One stream's state inside the session: its receive queue, its send queue of ready-made Data
//! frames, and where it stands in the close handshake.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::error::StreamError;
use crate::wire::{self, MessageType, Target};

/// Who opened a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This side sent the Connect.
    Local,
    /// The peer sent the Connect.
    Remote,
}

/// The receive half: bytes the peer sent, and how the stream ended.
#[derive(Debug)]
pub(crate) enum RecvEnd {
    Open,
    /// Graceful close (`EOF`), delivered after the buffered bytes.
    Finished,
    /// Ended with an error, delivered after the buffered bytes (unless the error discarded them).
    Failed(StreamError),
}

/// The send half.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendEnd {
    Open,
    /// The application closed the stream: Error `EOF` goes out once the queue drains.
    Closing,
    /// The close has been sent, or the peer closed the stream: nothing more goes out.
    Closed,
}

#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) origin: Origin,
    pub(crate) target: Target,
    pub(crate) created: Instant,

    pub(crate) recv: VecDeque<Bytes>,
    pub(crate) recv_len: usize,
    pub(crate) recv_end: RecvEnd,
    /// This side sent Pause and has not yet sent Resume.
    pub(crate) we_paused_peer: bool,
    /// The application read and found nothing: wake it on the next arrival.
    pub(crate) reader_waiting: bool,

    /// Full Data frames, header included, ready to go.
    pub(crate) send: VecDeque<Bytes>,
    /// The frame being filled by small writes, header already in place.
    pub(crate) send_tail: Option<BytesMut>,
    pub(crate) send_tail_header: usize,
    /// Payload bytes queued in `send` and `send_tail`.
    pub(crate) send_len: usize,
    pub(crate) send_end: SendEnd,
    /// The peer sent Pause and has not yet sent Resume.
    pub(crate) peer_paused_us: bool,
    /// The application's write found the queue full: wake it when there is room.
    pub(crate) writer_waiting: bool,

    /// The application still holds this stream (or has yet to accept it).
    pub(crate) held: bool,

    // Credit windows (only when negotiated; unused otherwise).
    /// Payload bytes of the front frame of `send` already sent as a split-off piece.
    pub(crate) front_sent: usize,
    /// Data bytes the peer lets this side send.
    pub(crate) send_credit: u64,
    /// Data bytes the peer may still send before it hears from us.
    pub(crate) recv_credit: u64,
    /// Bytes the application read and not yet granted back to the peer.
    pub(crate) recv_ungranted: u64,
}

impl Stream {
    /// A stream; `window` is the credit window (0 when credit windows are off).
    pub(crate) fn new(origin: Origin, target: Target, created: Instant, window: u32) -> Self {
        Self {
            origin,
            target,
            created,
            recv: VecDeque::new(),
            recv_len: 0,
            recv_end: RecvEnd::Open,
            we_paused_peer: false,
            reader_waiting: false,
            send: VecDeque::new(),
            send_tail: None,
            send_tail_header: 0,
            send_len: 0,
            send_end: SendEnd::Open,
            peer_paused_us: false,
            writer_waiting: false,
            held: true,
            front_sent: 0,
            send_credit: u64::from(window),
            recv_credit: u64::from(window),
            recv_ungranted: 0,
        }
    }

    /// Whether the protocol is done with this stream in both directions.
    pub(crate) fn protocol_closed(&self) -> bool {
        self.send_end == SendEnd::Closed && !matches!(self.recv_end, RecvEnd::Open)
    }

    /// Whether the entry can be dropped: closed on the wire and let go by the application.
    pub(crate) fn reapable(&self) -> bool {
        self.protocol_closed() && !self.held
    }

    /// Appends up to `room` bytes of `data` as Data frames of at most `chunk` payload bytes,
    /// filling the open tail frame first. Returns how many bytes were taken.
    pub(crate) fn queue_data(
        &mut self,
        conn_id: i64,
        data: &[u8],
        room: usize,
        chunk: usize,
        next_message_id: &mut impl FnMut() -> i64,
    ) -> usize {
        let taken = data.len().min(room);
        let mut rest = &data[..taken];
        while !rest.is_empty() {
            if self.send_tail.is_none() {
                let id = next_message_id();
                let header = wire::header_len(id, conn_id, MessageType::Data as i64);
                let mut frame = BytesMut::with_capacity(header + rest.len().min(chunk));
                wire::put_header(&mut frame, id, conn_id, MessageType::Data as i64);
                self.send_tail_header = header;
                self.send_tail = Some(frame);
            }
            let tail = self.send_tail.as_mut().expect("tail was just set");
            let space = chunk - (tail.len() - self.send_tail_header);
            let n = space.min(rest.len());
            tail.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if tail.len() - self.send_tail_header == chunk {
                self.seal_tail();
            }
        }
        self.send_len += taken;
        taken
    }

    fn seal_tail(&mut self) {
        if let Some(tail) = self.send_tail.take() {
            self.send.push_back(tail.freeze());
        }
    }

    /// Takes the next Data frame, with its payload length.
    pub(crate) fn pop_frame(&mut self) -> Option<(Bytes, usize)> {
        if self.send.is_empty() {
            self.seal_tail();
        }
        let frame = self.send.pop_front()?;
        let payload = self.payload_len_of(&frame);
        self.send_len -= payload;
        Some((frame, payload))
    }

    /// Takes at most `limit` payload bytes of the next frame: the frame itself when it fits
    /// and none of it has gone yet (no copy), else a new frame with the next `limit` bytes
    /// (copied, under a fresh message id). Credit windows split frames this way; the plain
    /// protocol never does.
    pub(crate) fn pop_frame_limited(
        &mut self,
        conn_id: i64,
        limit: usize,
        next_message_id: &mut impl FnMut() -> i64,
    ) -> Option<(Bytes, usize)> {
        if self.send.is_empty() {
            self.seal_tail();
        }
        let front = self.send.front()?;
        let header = header_len_of(front);
        let total = front.len() - header;
        let remaining = total - self.front_sent;
        if self.front_sent == 0 && remaining <= limit {
            return self.pop_frame();
        }
        let n = remaining.min(limit);
        let start = header + self.front_sent;
        let id = next_message_id();
        let data = MessageType::Data as i64;
        let mut piece = BytesMut::with_capacity(wire::header_len(id, conn_id, data) + n);
        wire::put_header(&mut piece, id, conn_id, data);
        piece.extend_from_slice(&front[start..start + n]);
        self.front_sent += n;
        if self.front_sent == total {
            self.send.pop_front();
            self.front_sent = 0;
        }
        self.send_len -= n;
        Some((piece.freeze(), n))
    }

    fn payload_len_of(&self, frame: &Bytes) -> usize {
        frame.len() - header_len_of(frame)
    }

    /// Drops everything queued for sending (on reset or a peer's Error).
    pub(crate) fn discard_send(&mut self) {
        self.send.clear();
        self.front_sent = 0;
        self.send_tail = None;
        self.send_len = 0;
    }

    /// Drops everything received and not yet read; returns how many bytes that was.
    pub(crate) fn discard_recv(&mut self) -> usize {
        self.recv.clear();
        std::mem::take(&mut self.recv_len)
    }

    /// Payload length of the frame that would go next, if this stream may send now.
    pub(crate) fn next_frame_len(&self) -> Option<usize> {
        if self.peer_paused_us || self.send_end == SendEnd::Closed {
            return None;
        }
        if let Some(frame) = self.send.front() {
            return Some(self.payload_len_of(frame) - self.front_sent);
        }
        self.send_tail
            .as_ref()
            .map(|tail| tail.len() - self.send_tail_header)
    }
}

/// Header length of a frame built by [`Stream::queue_data`]. The header is at most 24 bytes;
/// decoding it back is cheaper than storing lengths.
fn header_len_of(frame: &[u8]) -> usize {
    let mut at = 0;
    for _ in 0..4 {
        at += wire::varint::get(&frame[at..]).map_or(0, |(_, used)| used);
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Body, Message};

    fn stream_with(data: &[u8], chunk: usize) -> (Stream, i64) {
        let mut s = Stream::new(Origin::Local, Target::new("tcp", "x:1"), Instant::now(), 0);
        let mut id = 0;
        s.queue_data(-3, data, usize::MAX, chunk, &mut || {
            id += 1;
            id
        });
        (s, id)
    }

    fn payload(frame: Bytes) -> Bytes {
        match Message::decode(frame).unwrap().body {
            Body::Data(p) => p,
            other => panic!("not Data: {other:?}"),
        }
    }

    #[test]
    fn limited_pop_splits_frames_and_keeps_the_bytes_in_order() {
        let data: Vec<u8> = (0..100u8).collect();
        let (mut s, mut id) = stream_with(&data, 64);
        let mut next = || {
            id += 1;
            id
        };
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while let Some((frame, n)) = s.pop_frame_limited(-3, 24, &mut next) {
            let p = payload(frame);
            assert_eq!(p.len(), n);
            sizes.push(n);
            got.extend_from_slice(&p);
        }
        assert_eq!(got, data);
        // The 64-byte frame in pieces of 24, 24, 16; then the 36-byte tail in 24, 12.
        assert_eq!(sizes, [24, 24, 16, 24, 12]);
        assert_eq!(s.send_len, 0);
    }

    #[test]
    fn a_frame_that_fits_goes_whole_without_a_copy() {
        let (mut s, _) = stream_with(&[7; 10], 64);
        let mut never = || -> i64 { panic!("no new message id for a whole frame") };
        let (frame, n) = s.pop_frame_limited(-3, 10, &mut never).unwrap();
        assert_eq!((n, payload(frame).as_ref()), (10, &[7u8; 10][..]));
        assert!(s.pop_frame_limited(-3, 10, &mut never).is_none());
    }
}
