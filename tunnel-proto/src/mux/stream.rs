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
}

impl Stream {
    pub(crate) fn new(origin: Origin, target: Target, created: Instant) -> Self {
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

    fn payload_len_of(&self, frame: &Bytes) -> usize {
        // The header is at most 24 bytes; decoding it back is cheaper than storing lengths.
        let mut at = 0;
        for _ in 0..4 {
            at += wire::varint::get(&frame[at..]).map_or(0, |(_, used)| used);
        }
        frame.len() - at
    }

    /// Drops everything queued for sending (on reset or a peer's Error).
    pub(crate) fn discard_send(&mut self) {
        self.send.clear();
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
            return Some(self.payload_len_of(frame));
        }
        self.send_tail
            .as_ref()
            .map(|tail| tail.len() - self.send_tail_header)
    }
}
