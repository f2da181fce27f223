//! HTTP/2 written by hand (RFC 9113 framing, HPACK literals without
//! indexing or Huffman coding, RFC 7541 §5.1 integers), for frames a
//! well-behaved client library will not send. A [`Wire`] is a client
//! connection over raw rustls whose frames from the server are collected by
//! a reader task.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::support::{SECOND, tcp_connect};
use crate::common::within;
use crate::common::*;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The first byte of a header block that says `:status 200` (HPACK static
/// table entry 8, indexed).
pub const STATUS_200: u8 = 0x88;

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// One frame, header and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    assert!(len < 1 << 24, "frame payload too long");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

/// An HPACK integer with an `n`-bit prefix; `high` holds the bits above it.
fn hpack_int(out: &mut Vec<u8>, n: u32, high: u8, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// A literal header field without indexing, with a new (literal) name.
pub fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 7, 0, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 7, 0, value.len());
    out.extend_from_slice(value);
}

/// The header block of `CONNECT authority`, plus `extra` fields.
pub fn connect_block(authority: &str, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut block = Vec::new();
    literal(&mut block, b":method", b"CONNECT");
    literal(&mut block, b":authority", authority.as_bytes());
    for (name, value) in extra {
        literal(&mut block, name.as_bytes(), value);
    }
    block
}

/// One frame from the server.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    fn code(&self, at: usize) -> Option<u32> {
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// A TLS connection with our client certificate and ALPN h2, over `tcp`.
pub async fn tls_over(tcp: TcpStream, pki: &Pki) -> Tls {
    let server = tcp.peer_addr().unwrap();
    let connector = tokio_rustls::TlsConnector::from(raw_client_config(Some(&pki.client)));
    let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake failed")
}

/// mTLS, then the client preface, an empty SETTINGS and the ACK of the
/// server's SETTINGS (which the server sends before it reads ours).
pub async fn h2_handshake(tcp: TcpStream, pki: &Pki) -> Tls {
    let mut tls = tls_over(tcp, pki).await;
    let mut start = PREFACE.to_vec();
    start.extend(frame(SETTINGS, 0, 0, &[]));
    start.extend(frame(SETTINGS, ACK, 0, &[]));
    within(5 * SECOND, "writing the preface", tls.write_all(&start))
        .await
        .unwrap();
    tls
}

/// A hand-written HTTP/2 client connection; a task collects the server's
/// frames until the connection ends.
pub struct Wire {
    writer: WriteHalf<Tls>,
    inbox: mpsc::UnboundedReceiver<Result<Frame, String>>,
    reader: tokio::task::JoinHandle<()>,
    /// Every frame received so far (see [`Wire::poll`]).
    pub frames: Vec<Frame>,
    /// Why reading ended: "EOF" or the error; `None` while open.
    pub end: Option<String>,
    /// PINGs sent by [`Wire::round_trip`], numbering their payloads.
    pings: u64,
}

impl Wire {
    pub async fn open(server: SocketAddr, pki: &Pki) -> Wire {
        let tcp = tcp_connect(server).await;
        let (reader, writer) = tokio::io::split(h2_handshake(tcp, pki).await);
        let (sender, inbox) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_frames(reader, sender));
        Wire {
            writer,
            inbox,
            reader,
            frames: Vec::new(),
            end: None,
            pings: 0,
        }
    }

    /// Writes `bytes`; an error if the connection is gone or the server
    /// stops reading for 5 s.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        let write = async {
            self.writer.write_all(bytes).await?;
            self.writer.flush().await
        };
        match tokio::time::timeout(Duration::from_secs(5), write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("write stalled for 5 s".to_owned()),
        }
    }

    /// Takes in the frames that have arrived, without waiting.
    pub fn poll(&mut self) {
        while let Ok(next) = self.inbox.try_recv() {
            self.take(next);
        }
    }

    fn take(&mut self, next: Result<Frame, String>) {
        match next {
            Ok(frame) => self.frames.push(frame),
            Err(end) => self.end = Some(end),
        }
    }

    /// Waits until `done` holds (true), the connection ends or `limit`
    /// passes (false, unless `done` holds then).
    pub async fn wait(&mut self, limit: Duration, done: impl Fn(&Wire) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.poll();
            if done(self) {
                return true;
            }
            if self.end.is_some() {
                return false;
            }
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Err(_) => return false,
                Ok(None) => self.end = Some("reader gone".to_owned()),
                Ok(Some(next)) => self.take(next),
            }
        }
    }

    /// Sends a PING and waits for its ACK, so that the server has read
    /// everything sent before it and answered; a check of what it did not
    /// send then rests on an event, not on a pause. Panics after 5 s.
    pub async fn round_trip(&mut self) {
        self.pings += 1;
        let payload = self.pings.to_be_bytes();
        self.send(&frame(PING, 0, 0, &payload))
            .await
            .expect("sending a PING");
        let acked = self
            .wait(5 * SECOND, |w| {
                w.frames
                    .iter()
                    .any(|f| f.kind == PING && f.flags & ACK != 0 && f.payload == payload)
            })
            .await;
        assert!(acked, "no PING ACK within 5 s (end {:?})", self.end);
    }

    /// Waits for the server to close the connection; false after `limit`.
    pub async fn wait_closed(&mut self, limit: Duration) -> bool {
        self.wait(limit, |w| w.end.is_some()).await;
        self.end.is_some()
    }

    /// The first GOAWAY: (last stream id, error code).
    pub fn goaway(&self) -> Option<(u32, u32)> {
        let goaway = self.frames.iter().find(|f| f.kind == GOAWAY)?;
        Some((goaway.code(0)? & 0x7fff_ffff, goaway.code(4)?))
    }

    /// The code of the first RST_STREAM on `stream`.
    pub fn reset_of(&self, stream: u32) -> Option<u32> {
        self.frames
            .iter()
            .find(|f| f.kind == RST_STREAM && f.stream == stream)
            .and_then(|f| f.code(0))
    }

    /// The first byte of the first response header block on `stream`
    /// ([`STATUS_200`] for 200).
    pub fn response_of(&self, stream: u32) -> Option<u8> {
        self.frames
            .iter()
            .find(|f| f.kind == HEADERS && f.stream == stream)
            .and_then(|f| f.payload.first().copied())
    }

    /// DATA received on `stream`, and whether it carried END_STREAM.
    pub fn data_of(&self, stream: u32) -> (Vec<u8>, bool) {
        let mut data = Vec::new();
        let mut ended = false;
        for f in self.frames.iter().filter(|f| f.stream == stream) {
            if f.kind == DATA {
                data.extend_from_slice(&f.payload);
            }
            ended |= matches!(f.kind, DATA | HEADERS) && f.flags & END_STREAM != 0;
        }
        (data, ended)
    }
}

/// Dropping a `Wire` closes its connection (the reader task holds the
/// other half of the socket).
impl Drop for Wire {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Parses `bytes` (the plaintext a server sent) as HTTP/2 frames; a
/// truncated last frame is dropped.
pub fn parse_frames(bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        if rest.len() < 9 + len {
            break;
        }
        frames.push(Frame {
            kind: rest[3],
            flags: rest[4],
            stream: u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff,
            payload: rest[9..9 + len].to_vec(),
        });
        rest = &rest[9 + len..];
    }
    frames
}

async fn read_frames(
    mut reader: ReadHalf<Tls>,
    sender: mpsc::UnboundedSender<Result<Frame, String>>,
) {
    // Bounded, in case a server never stops talking.
    for _ in 0..1_000_000 {
        let mut head = [0u8; 9];
        if let Err(e) = reader.read_exact(&mut head).await {
            let end = match e.kind() {
                std::io::ErrorKind::UnexpectedEof => "EOF".to_owned(),
                _ => e.to_string(),
            };
            let _ = sender.send(Err(end));
            return;
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        if let Err(e) = reader.read_exact(&mut payload).await {
            let _ = sender.send(Err(format!("in a frame: {e}")));
            return;
        }
        let frame = Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        };
        if sender.send(Ok(frame)).is_err() {
            return;
        }
    }
    let _ = sender.send(Err("too many frames".to_owned()));
}
