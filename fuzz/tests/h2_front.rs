//! The `h2_front` seeds: written from the scripts below (run with
//! `WRITE_SEEDS=1` to rewrite them after changing a script), and checked
//! to do what they are meant to against a server of their own.
//!
//!     cargo test --manifest-path fuzz/Cargo.toml --test h2_front

use std::path::Path;
use std::sync::atomic::Ordering;

use hbone_fuzz::h2_front::{Authority, Field, Front, Op, Stream, encode, frames, parse};

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;

fn connect(stream: u8, authority: Authority) -> Op {
    Op::Connect {
        stream: Stream::Client(stream),
        authority,
        method: None,
        extra: Vec::new(),
        end_stream: false,
        split: 0,
    }
}

fn data(stream: u8, payload: &[u8], end: bool) -> Op {
    Op::Data {
        stream: Stream::Client(stream),
        flags: if end { END_STREAM } else { 0 },
        payload: payload.to_vec(),
        pad: None,
    }
}

fn field(name: &str, value: &str) -> Field {
    Field {
        name: name.into(),
        value: value.into(),
        indexed: false,
    }
}

/// The seeds, by file name.
fn seeds() -> Vec<(&'static str, Vec<Op>)> {
    vec![
        (
            "connect_echo",
            vec![
                connect(0, Authority::Echo),
                Op::Wait(1),
                data(0, b"hello", true),
                Op::Wait(1),
            ],
        ),
        (
            "two_streams",
            vec![
                connect(0, Authority::Echo),
                connect(1, Authority::Echo),
                Op::Wait(1),
                data(0, b"one", false),
                data(1, b"two", true),
                Op::Wait(1),
                data(0, b"", true),
                Op::Wait(1),
            ],
        ),
        (
            "reset_after_open",
            vec![
                connect(0, Authority::Echo),
                Op::Wait(1),
                data(0, b"x", false),
                Op::RstStream {
                    stream: Stream::Client(0),
                    code: 0x8,
                },
                Op::Wait(1),
            ],
        ),
        (
            "denied",
            vec![
                connect(0, Authority::OwnListener),
                connect(1, Authority::Remote),
                connect(2, Authority::Service),
                connect(3, Authority::EchoV6),
                connect(4, Authority::OtherLoopback),
                Op::Wait(1),
            ],
        ),
        (
            "malformed_requests",
            vec![
                Op::Connect {
                    stream: Stream::Client(0),
                    authority: Authority::Echo,
                    method: Some(b"GET".to_vec()),
                    extra: vec![field(":path", "/"), field(":scheme", "https")],
                    end_stream: true,
                    split: 0,
                },
                Op::Connect {
                    stream: Stream::Client(1),
                    authority: Authority::Echo,
                    method: None,
                    extra: vec![field(":path", "/")],
                    end_stream: false,
                    split: 0,
                },
                Op::Connect {
                    stream: Stream::Client(2),
                    authority: Authority::Raw(b"not an authority".to_vec()),
                    method: None,
                    extra: Vec::new(),
                    end_stream: false,
                    split: 0,
                },
                Op::Connect {
                    stream: Stream::Client(3),
                    authority: Authority::Echo,
                    method: None,
                    extra: vec![
                        field("forwarded", "for=\"10.0.0.1:4000\""),
                        field(
                            "traceparent",
                            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                        ),
                        field("baggage", "k8s.namespace.name=default"),
                    ],
                    end_stream: false,
                    split: 64,
                },
                Op::Wait(1),
                data(3, b"through continuation", true),
                Op::Wait(1),
            ],
        ),
        (
            "control_frames",
            vec![
                Op::Settings {
                    flags: 0,
                    settings: vec![(0x4, 1 << 20), (0x3, 10), (0x5, 32768)],
                },
                Op::Ping {
                    flags: 0,
                    data: *b"12345678",
                },
                Op::WindowUpdate {
                    stream: Stream::Raw(0),
                    increment: 1 << 16,
                },
                Op::Priority {
                    stream: Stream::Client(5),
                    dependency: 0,
                    weight: 16,
                },
                Op::Frame {
                    kind: 0x20,
                    flags: 0xff,
                    stream: 7,
                    payload: b"unknown".to_vec(),
                },
                connect(0, Authority::Echo),
                Op::Wait(1),
                Op::Bulk {
                    stream: Stream::Client(0),
                    end_stream: false,
                    length: 16384,
                    fill: b'z',
                },
                Op::WindowUpdate {
                    stream: Stream::Client(0),
                    increment: 1 << 16,
                },
                Op::Wait(1),
                Op::GoAway {
                    last: 1,
                    code: 0,
                    debug: b"bye".to_vec(),
                },
            ],
        ),
        (
            "limits",
            (0..7)
                .map(|n| connect(n, Authority::Echo))
                .chain([Op::Wait(1)])
                .chain((0..30).map(|n| Op::Ping {
                    flags: 0,
                    data: [n; 8],
                }))
                .chain([Op::Wait(1)])
                .collect(),
        ),
    ]
}

#[test]
fn seeds_are_the_scripts_encoded() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/h2_front");
    let write = std::env::var_os("WRITE_SEEDS").is_some();
    for (name, script) in seeds() {
        let bytes = encode(&script);
        assert_eq!(parse(&bytes), script, "{name} does not read back");
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let stored = std::fs::read(&path).unwrap_or_default();
        assert_eq!(stored, bytes, "{name}: run with WRITE_SEEDS=1");
    }
}

/// The DATA a server sent on `stream`, and whether it ended the stream.
fn data_on(output: &[u8], stream: u32) -> (Vec<u8>, bool) {
    let mut bytes = Vec::new();
    let mut ended = false;
    for (kind, flags, id, payload) in frames(output) {
        if kind == DATA && id == stream {
            bytes.extend_from_slice(&payload);
            ended |= flags & END_STREAM != 0;
        }
    }
    (bytes, ended)
}

fn headers_on(output: &[u8]) -> Vec<u32> {
    frames(output)
        .into_iter()
        .filter(|f| f.0 == HEADERS)
        .map(|f| f.2)
        .collect()
}

#[test]
fn a_tunnel_to_the_echo_opens_and_echoes() {
    let front = Front::new();
    let seeds = seeds();
    let output = front.run(&seeds[0].1);
    hbone_fuzz::h2_front::check_output(&output);
    let stats = front.server.stats().snapshot();
    assert_eq!(stats.tunnels_opened, 1, "{stats:?}");
    assert_eq!(front.echo_accepted.load(Ordering::Acquire), 1);
    assert_eq!(headers_on(&output), [1]);
    assert_eq!(data_on(&output, 1), (b"hello".to_vec(), true));

    let output = front.run(&seeds[1].1);
    assert_eq!(front.server.stats().snapshot().tunnels_opened, 3);
    assert_eq!(data_on(&output, 1), (b"one".to_vec(), true));
    assert_eq!(data_on(&output, 3), (b"two".to_vec(), true));
}

#[test]
fn denied_targets_are_refused_without_a_dial() {
    let front = Front::new();
    let output = front.run(&seeds()[3].1);
    hbone_fuzz::h2_front::check_output(&output);
    let stats = front.server.stats().snapshot();
    assert_eq!((stats.tunnels_opened, stats.refusals), (0, 5), "{stats:?}");
    assert_eq!(front.echo_accepted.load(Ordering::Acquire), 0);
    // Each refusal is a HEADERS that ends its stream, no DATA.
    assert_eq!(headers_on(&output), [1, 3, 5, 7, 9]);
    assert!(frames(&output).iter().all(|f| f.0 != DATA));
}

#[test]
fn the_other_seeds_run() {
    let front = Front::new();
    for (name, script) in seeds() {
        let output = front.run(&script);
        hbone_fuzz::h2_front::check_output(&output);
        if name == "reset_after_open" {
            // The tunnel opened before the client reset it.
            assert_eq!(headers_on(&output), [1], "{name}");
        }
        if name == "malformed_requests" {
            assert_eq!(
                data_on(&output, 7),
                (b"through continuation".to_vec(), true)
            );
        }
    }
}

#[test]
fn the_harness_limits_are_reached() {
    let front = Front::new();
    let script = seeds()
        .into_iter()
        .find(|(name, _)| *name == "limits")
        .unwrap()
        .1;
    let output = front.run(&script);
    hbone_fuzz::h2_front::check_output(&output);
    let stats = front.server.stats().snapshot();
    // Six streams at once: four tunnels, two refused at the tunnel limit;
    // the seventh stream is refused by h2 itself.
    assert_eq!(
        (stats.tunnels_opened, stats.limit_refusals - 1),
        (4, 2),
        "{stats:?}"
    );
    assert_eq!(stats.control_frame_floods, 1, "{stats:?}");
    let frames = frames(&output);
    assert!(
        frames.iter().any(|f| f.0 == RST_STREAM && f.2 == 13),
        "{frames:?}"
    );
    let goaway = frames.iter().find(|f| f.0 == GOAWAY).expect("a GOAWAY");
    assert_eq!(goaway.3[4..8], [0, 0, 0, 0xb], "ENHANCE_YOUR_CALM");
}
