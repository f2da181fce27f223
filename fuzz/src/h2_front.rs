//! The `h2_front` target: the server's handling of an accepted connection
//! after TLS, fed a script of HTTP/2 frames.
//!
//! The fuzzer's bytes are read as a script ([`Op`]s, one opcode byte
//! each, then their fields); the script is serialized to frames after the
//! client preface and an empty SETTINGS, and written into an in-memory
//! pipe whose other end [`hbone::server::fuzzing::PlaintextServer`]
//! serves as a connection from `spiffe://cluster.local/ns/default/sa/client`.
//! A short read of the script gives zeros, so every input is a script.
//!
//! The policy allows one target, an echo listener on 127.0.0.1 that the
//! harness starts itself; every other address is denied (403) before any
//! dial, and service names are unknown (the services table is empty, so
//! nothing is looked up). Nothing leaves the machine. The limits are
//! small (6 streams, 4 tunnels, 24 control frames per 10 s) so that short
//! scripts reach them.
//!
//! Each input runs on a fresh current-thread runtime with paused time,
//! bounded by [`BOUND`] of virtual time: a stalled connection is cut off
//! at once rather than hanging the fuzzer. Checks: no panic (in our code
//! or h2), and what the server writes is well-formed framing: a SETTINGS
//! first, frame headers with the reserved bit clear, no PUSH_PROMISE, and
//! HEADERS or DATA only on client-initiated (odd) streams.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hbone::config::H2Settings;
use hbone::policy::Policy;
use hbone::server::Limits;
use hbone::server::fuzzing::PlaintextServer;
use hbone::{ServerConfig, SpiffeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The longest an input may run, in (paused, virtual) time.
const BOUND: Duration = Duration::from_secs(30);
/// The address the server is taken to listen on; denied as a target.
const LISTEN: &str = "127.0.0.1:15008";
/// The server's limits in the harness.
const MAX_STREAMS: u32 = 6;
const MAX_TUNNELS: usize = 4;
const CONTROL_FRAMES: u32 = 24;
const PEER: &str = "spiffe://cluster.local/ns/default/sa/client";
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;

/// A server, the echo target it may dial, and how many connections the
/// echo has accepted.
pub struct Front {
    pub server: PlaintextServer,
    pub echo: SocketAddr,
    pub echo_accepted: Arc<AtomicUsize>,
}

impl Front {
    /// A development CA's server identity, a policy allowing only a new
    /// echo listener (served by a thread of its own) and default limits.
    pub fn new() -> Front {
        let echo_accepted = Arc::new(AtomicUsize::new(0));
        let echo = echo(echo_accepted.clone());
        let ca = hbone::ca::DevCa::generate("cluster.local", Duration::from_secs(86_400))
            .expect("a development CA");
        let server_id: SpiffeId = "spiffe://cluster.local/ns/default/sa/server"
            .parse()
            .unwrap();
        let identity = ca
            .issue(&server_id, Duration::from_secs(86_400))
            .expect("a server certificate")
            .identity()
            .expect("a server identity");
        let rule = format!("127.0.0.1/32:{}", echo.port()).parse().unwrap();
        // Small limits, so that scripts of a few dozen frames reach them:
        // the tunnel limit (503), h2's stream limit (REFUSED_STREAM) and
        // the control-frame budget (GOAWAY with ENHANCE_YOUR_CALM).
        let config = ServerConfig::new(LISTEN.parse().unwrap(), identity)
            .with_policy(Policy::new(Vec::new(), vec![rule]))
            .with_h2(H2Settings::server().with_max_concurrent_streams(MAX_STREAMS))
            .with_limits(
                Limits::default()
                    .with_max_tunnels(MAX_TUNNELS)
                    .with_max_control_frames(CONTROL_FRAMES, Duration::from_secs(10)),
            );
        Front {
            server: PlaintextServer::new(config).expect("a server"),
            echo,
            echo_accepted,
        }
    }

    /// Runs `script` through one connection; what the server wrote.
    pub fn run(&self, script: &[Op]) -> Vec<u8> {
        let input = serialize(script, self.echo);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
        let opened_before = self.server.stats().snapshot().tunnels_opened;
        let output = runtime.block_on(async {
            let (client, server_end) = tokio::io::duplex(1 << 16);
            let (mut read, mut write) = tokio::io::split(client);
            let peer = "127.0.0.1:40000".parse().unwrap();
            let serve = self.server.serve(server_end, peer, PEER.parse().unwrap());
            let send = async move {
                for chunk in input {
                    match chunk {
                        Chunk::Bytes(bytes) => {
                            if write.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        Chunk::Wait(wait) => {
                            settle(SETTLE).await;
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
                // A tunnel's target answers in real time: give its bytes
                // a moment to come back before the connection ends.
                if self.server.stats().snapshot().tunnels_opened > opened_before {
                    settle(SETTLE).await;
                }
                let _ = write.shutdown().await;
            };
            let mut output = Vec::new();
            let receive = async {
                let mut buf = [0u8; 16384];
                while let Ok(n) = read.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    output.extend_from_slice(&buf[..n]);
                }
            };
            let all = async { tokio::join!(serve, receive, send) };
            let _ = tokio::time::timeout(BOUND, all).await;
            output
        });
        // Tunnels still relaying end with the runtime.
        drop(runtime);
        output
    }
}

impl Default for Front {
    fn default() -> Self {
        Self::new()
    }
}

/// Rounds of [`settle`] at each wait, and before the end once a tunnel
/// opened.
const SETTLE: u32 = 16;

/// Lets real time pass without letting virtual time jump: the echo thread
/// and the kernel move bytes over loopback while the runtime is blocked,
/// and each yield lets it poll for them. A paused clock would otherwise
/// advance to the next timer whenever the runtime waits on sockets alone,
/// and fire connect timeouts before loopback answers.
async fn settle(rounds: u32) {
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_micros(50));
        tokio::task::yield_now().await;
    }
}

/// A loopback listener on its own thread that echoes every connection.
fn echo(accepted: Arc<AtomicUsize>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("an echo listener");
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((mut socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
            }
        });
    });
    addr
}

/// The fuzz target: the bytes as a script, through the one shared server.
pub fn h2_front(data: &[u8]) {
    static FRONT: OnceLock<Front> = OnceLock::new();
    let front = FRONT.get_or_init(Front::new);
    let script = parse(data);
    let output = front.run(&script);
    check_output(&output);
}

/// What the server writes must be well-formed framing (a trailing partial
/// frame aside: the input may have been cut off).
pub fn check_output(output: &[u8]) {
    let mut at = 0;
    let mut first = true;
    while output.len() - at >= 9 {
        let head = &output[at..at + 9];
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let kind = head[3];
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
        assert_eq!(stream >> 31, 0, "reserved bit set in {head:?}");
        if first {
            assert_eq!(kind, SETTINGS, "the server's first frame: {head:?}");
            assert_eq!(stream, 0);
            first = false;
        }
        assert_ne!(kind, PUSH_PROMISE, "the server pushed");
        if kind == HEADERS || kind == DATA {
            assert!(stream % 2 == 1, "{kind} frame on stream {stream}");
        }
        if matches!(kind, SETTINGS | PING | GOAWAY) {
            assert_eq!(stream, 0, "frame type {kind} on stream {stream}");
        }
        at += 9 + length;
    }
}

/// The frames a server wrote, as (type, flags, stream, payload); a
/// trailing partial frame is left out.
pub fn frames(output: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut at = 0;
    while output.len() - at >= 9 {
        let head = &output[at..at + 9];
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
        let Some(payload) = output.get(at + 9..at + 9 + length) else {
            break;
        };
        frames.push((head[3], head[4], stream, payload.to_vec()));
        at += 9 + length;
    }
    frames
}

/// Which stream a frame goes on: one of the first client streams, or any
/// 31-bit value (0, even, reserved bit and all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Client stream `2n + 1`, n < 64.
    Client(u8),
    Raw(u32),
}

/// Where a CONNECT goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authority {
    /// The echo listener: the only target the policy allows.
    Echo,
    /// The server's own listen address: denied.
    OwnListener,
    /// Another loopback port: denied.
    OtherLoopback,
    /// The echo's port over IPv6 loopback: denied.
    EchoV6,
    /// A service name: unknown to the empty services table.
    Service,
    /// A routable address: denied.
    Remote,
    /// These bytes as written.
    Raw(Vec<u8>),
    /// No `:authority`.
    Missing,
}

/// One header field, HPACK-encoded as a literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
    /// Literal with incremental indexing (0x40) rather than without (0x00).
    pub indexed: bool,
}

/// One step of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// HEADERS (and CONTINUATIONs when `split` > 0, the block cut every
    /// `split` bytes) with `:method` (CONNECT unless `method` is given)
    /// and `:authority`, then `extra` fields.
    Connect {
        stream: Stream,
        authority: Authority,
        method: Option<Vec<u8>>,
        extra: Vec<Field>,
        end_stream: bool,
        split: u8,
    },
    /// A HEADERS frame with these flags and raw block.
    Headers {
        stream: Stream,
        flags: u8,
        block: Vec<u8>,
    },
    /// DATA, padded with `pad` bytes when `Some`.
    Data {
        stream: Stream,
        flags: u8,
        payload: Vec<u8>,
        pad: Option<u8>,
    },
    /// DATA of `length` bytes of `fill`: flow control without long inputs.
    Bulk {
        stream: Stream,
        end_stream: bool,
        length: u16,
        fill: u8,
    },
    RstStream {
        stream: Stream,
        code: u32,
    },
    WindowUpdate {
        stream: Stream,
        increment: u32,
    },
    Ping {
        flags: u8,
        data: [u8; 8],
    },
    Settings {
        flags: u8,
        settings: Vec<(u16, u32)>,
    },
    GoAway {
        last: u32,
        code: u32,
        debug: Vec<u8>,
    },
    Continuation {
        stream: Stream,
        flags: u8,
        block: Vec<u8>,
    },
    Priority {
        stream: Stream,
        dependency: u32,
        weight: u8,
    },
    /// Any frame: type, flags, stream, payload.
    Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    },
    /// Bytes as they are, frame boundaries or not.
    Bytes(Vec<u8>),
    /// Let the server run a moment in real time (for loopback targets),
    /// then `10 ms * n` in virtual time, before what follows.
    Wait(u8),
}

const OPS: u8 = 14;

/// Reads a script's fields; past the end, zeros.
struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// A length byte, then that many bytes (fewer at the end).
    fn bytes(&mut self) -> Vec<u8> {
        let n = usize::from(self.u8()).min(self.data.len());
        let (bytes, rest) = self.data.split_at(n);
        self.data = rest;
        bytes.to_vec()
    }

    fn stream(&mut self) -> Stream {
        match self.u8() {
            b if b < 0x80 => Stream::Client(b % 64),
            _ => Stream::Raw(self.u32()),
        }
    }

    fn field(&mut self) -> Field {
        let which = self.u8();
        let name = match which % 12 {
            0 => b"forwarded".to_vec(),
            1 => b"traceparent".to_vec(),
            2 => b"baggage".to_vec(),
            3 => b":path".to_vec(),
            4 => b":scheme".to_vec(),
            5 => b":protocol".to_vec(),
            6 => b"content-length".to_vec(),
            7 => b"te".to_vec(),
            8 => b"connection".to_vec(),
            9 => b":status".to_vec(),
            10 => b"x-forwarded-for".to_vec(),
            _ => self.bytes(),
        };
        Field {
            name,
            value: self.bytes(),
            indexed: which & 0x80 != 0,
        }
    }
}

/// Reads the fuzzer's bytes as a script of at most 64 steps.
pub fn parse(data: &[u8]) -> Vec<Op> {
    let mut r = Reader { data };
    let mut ops = Vec::new();
    while !r.data.is_empty() && ops.len() < 64 {
        let op = match r.u8() % OPS {
            0 => {
                let stream = r.stream();
                let flags = r.u8();
                let authority = match r.u8() % 8 {
                    0 => Authority::Echo,
                    1 => Authority::OwnListener,
                    2 => Authority::OtherLoopback,
                    3 => Authority::EchoV6,
                    4 => Authority::Service,
                    5 => Authority::Remote,
                    6 => Authority::Raw(r.bytes()),
                    _ => Authority::Missing,
                };
                let method = (flags & 0x2 != 0).then(|| r.bytes());
                let extra = (0..(flags >> 4) & 0x7).map(|_| r.field()).collect();
                let split = if flags & 0x4 != 0 { r.u8() } else { 0 };
                Op::Connect {
                    stream,
                    authority,
                    method,
                    extra,
                    end_stream: flags & 0x1 != 0,
                    split,
                }
            }
            1 => Op::Headers {
                stream: r.stream(),
                flags: r.u8(),
                block: r.bytes(),
            },
            2 => {
                let stream = r.stream();
                let flags = r.u8();
                let payload = r.bytes();
                let pad = (flags & PADDED != 0).then(|| r.u8());
                Op::Data {
                    stream,
                    flags,
                    payload,
                    pad,
                }
            }
            3 => {
                let stream = r.stream();
                let flags = r.u8();
                Op::Bulk {
                    stream,
                    end_stream: flags & 1 != 0,
                    length: r.u16(),
                    fill: r.u8(),
                }
            }
            4 => Op::RstStream {
                stream: r.stream(),
                code: r.u32(),
            },
            5 => Op::WindowUpdate {
                stream: r.stream(),
                increment: r.u32(),
            },
            6 => {
                let flags = r.u8();
                let mut data = [0u8; 8];
                data.iter_mut().for_each(|b| *b = r.u8());
                Op::Ping { flags, data }
            }
            7 => {
                let flags = r.u8();
                let settings = (0..r.u8() % 8).map(|_| (r.u16(), r.u32())).collect();
                Op::Settings { flags, settings }
            }
            8 => Op::GoAway {
                last: r.u32(),
                code: r.u32(),
                debug: r.bytes(),
            },
            9 => Op::Continuation {
                stream: r.stream(),
                flags: r.u8(),
                block: r.bytes(),
            },
            10 => Op::Priority {
                stream: r.stream(),
                dependency: r.u32(),
                weight: r.u8(),
            },
            11 => Op::Frame {
                kind: r.u8(),
                flags: r.u8(),
                stream: r.u32(),
                payload: r.bytes(),
            },
            12 => Op::Bytes(r.bytes()),
            _ => Op::Wait(r.u8()),
        };
        ops.push(op);
    }
    ops
}

/// Writes `script` back in the form [`parse`] reads (the seeds are made
/// with it).
pub fn encode(script: &[Op]) -> Vec<u8> {
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        assert!(b.len() < 256);
        out.push(b.len() as u8);
        out.extend_from_slice(b);
    }
    fn stream(out: &mut Vec<u8>, s: Stream) {
        match s {
            Stream::Client(n) => out.push(n % 64),
            Stream::Raw(id) => {
                out.push(0x80);
                out.extend_from_slice(&id.to_be_bytes());
            }
        }
    }
    let mut out = Vec::new();
    for op in script {
        match op {
            Op::Connect {
                stream: s,
                authority,
                method,
                extra,
                end_stream,
                split,
            } => {
                out.push(0);
                stream(&mut out, *s);
                assert!(extra.len() < 8);
                let flags = u8::from(*end_stream)
                    | if method.is_some() { 0x2 } else { 0 }
                    | if *split > 0 { 0x4 } else { 0 }
                    | (extra.len() as u8) << 4;
                out.push(flags);
                match authority {
                    Authority::Echo => out.push(0),
                    Authority::OwnListener => out.push(1),
                    Authority::OtherLoopback => out.push(2),
                    Authority::EchoV6 => out.push(3),
                    Authority::Service => out.push(4),
                    Authority::Remote => out.push(5),
                    Authority::Raw(raw) => {
                        out.push(6);
                        bytes(&mut out, raw);
                    }
                    Authority::Missing => out.push(7),
                }
                if let Some(method) = method {
                    bytes(&mut out, method);
                }
                for field in extra {
                    out.push(11 | if field.indexed { 0x80 } else { 0 });
                    bytes(&mut out, &field.name);
                    bytes(&mut out, &field.value);
                }
                if *split > 0 {
                    out.push(*split);
                }
            }
            Op::Headers {
                stream: s,
                flags,
                block,
            } => {
                out.push(1);
                stream(&mut out, *s);
                out.push(*flags);
                bytes(&mut out, block);
            }
            Op::Data {
                stream: s,
                flags,
                payload,
                pad,
            } => {
                out.push(2);
                stream(&mut out, *s);
                let flags = (flags & !PADDED) | if pad.is_some() { PADDED } else { 0 };
                out.push(flags);
                bytes(&mut out, payload);
                if let Some(pad) = pad {
                    out.push(*pad);
                }
            }
            Op::Bulk {
                stream: s,
                end_stream,
                length,
                fill,
            } => {
                out.push(3);
                stream(&mut out, *s);
                out.push(u8::from(*end_stream));
                out.extend_from_slice(&length.to_be_bytes());
                out.push(*fill);
            }
            Op::RstStream { stream: s, code } => {
                out.push(4);
                stream(&mut out, *s);
                out.extend_from_slice(&code.to_be_bytes());
            }
            Op::WindowUpdate {
                stream: s,
                increment,
            } => {
                out.push(5);
                stream(&mut out, *s);
                out.extend_from_slice(&increment.to_be_bytes());
            }
            Op::Ping { flags, data } => {
                out.push(6);
                out.push(*flags);
                out.extend_from_slice(data);
            }
            Op::Settings { flags, settings } => {
                out.push(7);
                out.push(*flags);
                assert!(settings.len() < 8);
                out.push(settings.len() as u8);
                for (id, value) in settings {
                    out.extend_from_slice(&id.to_be_bytes());
                    out.extend_from_slice(&value.to_be_bytes());
                }
            }
            Op::GoAway { last, code, debug } => {
                out.push(8);
                out.extend_from_slice(&last.to_be_bytes());
                out.extend_from_slice(&code.to_be_bytes());
                bytes(&mut out, debug);
            }
            Op::Continuation {
                stream: s,
                flags,
                block,
            } => {
                out.push(9);
                stream(&mut out, *s);
                out.push(*flags);
                bytes(&mut out, block);
            }
            Op::Priority {
                stream: s,
                dependency,
                weight,
            } => {
                out.push(10);
                stream(&mut out, *s);
                out.extend_from_slice(&dependency.to_be_bytes());
                out.push(*weight);
            }
            Op::Frame {
                kind,
                flags,
                stream,
                payload,
            } => {
                out.push(11);
                out.push(*kind);
                out.push(*flags);
                out.extend_from_slice(&stream.to_be_bytes());
                bytes(&mut out, payload);
            }
            Op::Bytes(b) => {
                out.push(12);
                bytes(&mut out, b);
            }
            Op::Wait(n) => {
                out.push(13);
                out.push(*n);
            }
        }
    }
    out
}

/// What the client writes: bytes, and pauses that let the server run.
enum Chunk {
    Bytes(Vec<u8>),
    Wait(Duration),
}

fn stream_id(s: Stream) -> u32 {
    match s {
        Stream::Client(n) => 2 * u32::from(n) + 1,
        Stream::Raw(id) => id,
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let length = payload.len() as u32;
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK integer with an `n`-bit prefix, its first byte or-ed with
/// `high`.
fn hpack_int(out: &mut Vec<u8>, high: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A literal header field with a literal name (RFC 7541 §6.2), no Huffman.
fn hpack_literal(out: &mut Vec<u8>, field: &Field) {
    out.push(if field.indexed { 0x40 } else { 0x00 });
    hpack_int(out, 0, 7, field.name.len());
    out.extend_from_slice(&field.name);
    hpack_int(out, 0, 7, field.value.len());
    out.extend_from_slice(&field.value);
}

fn authority_bytes(authority: &Authority, echo: SocketAddr) -> Option<Vec<u8>> {
    Some(match authority {
        Authority::Echo => echo.to_string().into_bytes(),
        Authority::OwnListener => LISTEN.as_bytes().to_vec(),
        Authority::OtherLoopback => b"127.0.0.1:1".to_vec(),
        Authority::EchoV6 => format!("[::1]:{}", echo.port()).into_bytes(),
        Authority::Service => b"svc.example.svc.cluster.local:80".to_vec(),
        Authority::Remote => b"192.0.2.1:443".to_vec(),
        Authority::Raw(raw) => raw.clone(),
        Authority::Missing => return None,
    })
}

/// The bytes the client sends for `script`, with the preface and an empty
/// SETTINGS first; `echo` is the allowed target.
fn serialize(script: &[Op], echo: SocketAddr) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    for op in script {
        match op {
            Op::Connect {
                stream,
                authority,
                method,
                extra,
                end_stream,
                split,
            } => {
                let mut block = Vec::new();
                let method = Field {
                    name: b":method".to_vec(),
                    value: method.clone().unwrap_or_else(|| b"CONNECT".to_vec()),
                    indexed: false,
                };
                hpack_literal(&mut block, &method);
                if let Some(authority) = authority_bytes(authority, echo) {
                    let authority = Field {
                        name: b":authority".to_vec(),
                        value: authority,
                        indexed: true,
                    };
                    hpack_literal(&mut block, &authority);
                }
                for field in extra {
                    hpack_literal(&mut block, field);
                }
                let id = stream_id(*stream);
                let end = if *end_stream { END_STREAM } else { 0 };
                if *split == 0 || block.len() <= usize::from(*split) {
                    frame(&mut out, HEADERS, END_HEADERS | end, id, &block);
                } else {
                    let mut pieces = block.chunks(usize::from(*split)).peekable();
                    let first = pieces.next().unwrap_or_default();
                    frame(&mut out, HEADERS, end, id, first);
                    while let Some(piece) = pieces.next() {
                        let last = if pieces.peek().is_none() {
                            END_HEADERS
                        } else {
                            0
                        };
                        frame(&mut out, CONTINUATION, last, id, piece);
                    }
                }
            }
            Op::Headers {
                stream,
                flags,
                block,
            } => frame(&mut out, HEADERS, *flags, stream_id(*stream), block),
            Op::Data {
                stream,
                flags,
                payload,
                pad,
            } => {
                let mut body = Vec::new();
                if let Some(pad) = pad {
                    body.push(*pad);
                }
                body.extend_from_slice(payload);
                if let Some(pad) = pad {
                    body.resize(body.len() + usize::from(*pad), 0);
                }
                let flags = (flags & !PADDED) | if pad.is_some() { PADDED } else { 0 };
                frame(&mut out, DATA, flags, stream_id(*stream), &body);
            }
            Op::Bulk {
                stream,
                end_stream,
                length,
                fill,
            } => {
                let body = vec![*fill; usize::from(*length).min(16384)];
                let flags = if *end_stream { END_STREAM } else { 0 };
                frame(&mut out, DATA, flags, stream_id(*stream), &body);
            }
            Op::RstStream { stream, code } => frame(
                &mut out,
                RST_STREAM,
                0,
                stream_id(*stream),
                &code.to_be_bytes(),
            ),
            Op::WindowUpdate { stream, increment } => frame(
                &mut out,
                WINDOW_UPDATE,
                0,
                stream_id(*stream),
                &increment.to_be_bytes(),
            ),
            Op::Ping { flags, data } => frame(&mut out, PING, *flags, 0, data),
            Op::Settings { flags, settings } => {
                let mut body = Vec::new();
                for (id, value) in settings {
                    body.extend_from_slice(&id.to_be_bytes());
                    body.extend_from_slice(&value.to_be_bytes());
                }
                frame(&mut out, SETTINGS, *flags, 0, &body);
            }
            Op::GoAway { last, code, debug } => {
                let mut body = last.to_be_bytes().to_vec();
                body.extend_from_slice(&code.to_be_bytes());
                body.extend_from_slice(debug);
                frame(&mut out, GOAWAY, 0, 0, &body);
            }
            Op::Continuation {
                stream,
                flags,
                block,
            } => frame(&mut out, CONTINUATION, *flags, stream_id(*stream), block),
            Op::Priority {
                stream,
                dependency,
                weight,
            } => {
                let mut body = dependency.to_be_bytes().to_vec();
                body.push(*weight);
                frame(&mut out, PRIORITY, 0, stream_id(*stream), &body);
            }
            Op::Frame {
                kind,
                flags,
                stream,
                payload,
            } => frame(&mut out, *kind, *flags, *stream, payload),
            Op::Bytes(bytes) => out.extend_from_slice(bytes),
            Op::Wait(n) => {
                chunks.push(Chunk::Bytes(std::mem::take(&mut out)));
                chunks.push(Chunk::Wait(Duration::from_millis(10 * u64::from(*n))));
            }
        }
    }
    chunks.push(Chunk::Bytes(out));
    chunks
}
