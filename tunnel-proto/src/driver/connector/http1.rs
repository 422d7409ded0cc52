//! The little HTTP/1.1 client the connector needs: read a response head, and read a bounded
//! body of a failed response.
//!
//! tungstenite's client handshake hands back only the bytes that happened to arrive with the
//! head, so a 401 whose body comes in a second segment would lose its text. Agents log that text
//! (`cluster not found`, `failed authentication`), so the connector reads heads and bodies
//! itself, for the proxy's `CONNECT` answer and for the websocket upgrade answer alike.

use std::io;

use http::HeaderMap;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers parsed.
const MAX_HEADERS: usize = 100;

/// A parsed response head, and whatever bytes followed it in the same reads.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) leftover: Vec<u8>,
}

/// Reads until a full response head has arrived.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                if buf.is_empty() {
                    "connection closed before any response".to_owned()
                } else {
                    format!(
                        "connection closed inside the response head ({} bytes)",
                        buf.len()
                    )
                },
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut slots);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.unwrap_or_default();
                let mut headers = HeaderMap::new();
                for h in resp.headers.iter() {
                    if let (Ok(name), Ok(value)) = (
                        http::HeaderName::from_bytes(h.name.as_bytes()),
                        http::HeaderValue::from_bytes(h.value),
                    ) {
                        headers.append(name, value);
                    }
                }
                return Ok(Head {
                    status,
                    headers,
                    leftover: buf[len..].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("response head larger than {MAX_HEAD} bytes"),
                ));
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("malformed HTTP response: {e}"),
                ));
            }
        }
    }
}

enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilEof,
}

/// Reads at most `max` bytes of the body that follows `head`, returning it as (lossy) text.
///
/// Never fails: a read error, the `deadline` or `max` simply end the body early, since the body
/// only decorates an error the caller reports anyway. `until_eof_ok` allows a body with neither
/// length nor chunking (HTTP/1.0 proxies) to be read until the peer closes.
pub(crate) async fn read_body<S: AsyncRead + Unpin>(
    io: &mut S,
    head: &Head,
    max: usize,
    deadline: Option<Instant>,
) -> String {
    let framing = if head.status < 200 || head.status == 204 || head.status == 304 {
        Framing::Empty
    } else if head.headers.get_all(TRANSFER_ENCODING).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.to_ascii_lowercase().contains("chunked"))
    }) {
        Framing::Chunked
    } else if let Some(len) = head
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        Framing::Length(len)
    } else {
        Framing::UntilEof
    };
    // Chunk framing costs bytes too; allow some slack over `max` for it.
    let raw_cap = match framing {
        Framing::Empty => 0,
        Framing::Length(len) => len.min(max),
        Framing::Chunked => max.saturating_mul(2).saturating_add(1024),
        Framing::UntilEof => max,
    };
    let mut raw = head.leftover.clone();
    let mut chunk = [0u8; 4096];
    loop {
        let done = match framing {
            Framing::Empty => true,
            Framing::Length(_) | Framing::UntilEof => raw.len() >= raw_cap,
            Framing::Chunked => {
                let (body, complete) = decode_chunked(&raw);
                complete || body.len() >= max || raw.len() >= raw_cap
            }
        };
        if done {
            break;
        }
        let read = io.read(&mut chunk);
        let n = match deadline {
            Some(d) => match tokio::time::timeout_at(d, read).await {
                Ok(r) => r,
                Err(_) => break,
            },
            None => read.await,
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
        }
    }
    let mut body = match framing {
        Framing::Chunked => decode_chunked(&raw).0,
        _ => raw,
    };
    body.truncate(max);
    String::from_utf8_lossy(&body).into_owned()
}

/// Decodes as much of a chunked body as `raw` holds. Returns the data and whether the final
/// zero-size chunk was seen.
fn decode_chunked(raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let Some(line_end) = find_crlf(&raw[pos..]) else {
            return (out, false);
        };
        let line = &raw[pos..pos + line_end];
        let size_text = std::str::from_utf8(line)
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return (out, true); // garbage: stop with what we have
        };
        pos += line_end + 2;
        if size == 0 {
            return (out, true);
        }
        let avail = raw.len().saturating_sub(pos);
        if avail < size {
            out.extend_from_slice(&raw[pos..]);
            return (out, false);
        }
        out.extend_from_slice(&raw[pos..pos + size]);
        pos += size;
        // the CRLF after the data
        if raw.len() < pos + 2 {
            return (out, false);
        }
        pos += 2;
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_decoding() {
        assert_eq!(
            decode_chunked(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"),
            (b"hello world".to_vec(), true)
        );
        assert_eq!(decode_chunked(b"5\r\nhel"), (b"hel".to_vec(), false));
        assert_eq!(decode_chunked(b""), (Vec::new(), false));
    }

    #[tokio::test]
    async fn head_then_bounded_bodies() {
        let resp = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 21\r\n\r\nfailed authentication";
        let mut io = &resp[..];
        let head = read_head(&mut io).await.unwrap();
        assert_eq!(head.status, 401);
        assert_eq!(
            read_body(&mut io, &head, 64, None).await,
            "failed authentication"
        );

        let mut io = &resp[..];
        let head = read_head(&mut io).await.unwrap();
        assert_eq!(read_body(&mut io, &head, 6, None).await, "failed");

        let resp =
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let mut io = &resp[..];
        let head = read_head(&mut io).await.unwrap();
        assert_eq!(read_body(&mut io, &head, 64, None).await, "abc");

        let resp = b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\nno length";
        let mut io = &resp[..];
        let head = read_head(&mut io).await.unwrap();
        assert_eq!(read_body(&mut io, &head, 64, None).await, "no length");

        let mut io = &b"HTTP/1.1 200 OK\r\nX"[..];
        assert_eq!(
            read_head(&mut io).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
