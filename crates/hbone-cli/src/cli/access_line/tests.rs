use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hbone::access::Role;
use hbone::ca::DevCa;
use hbone::{Dialer, Route, Server, ServerConfig, SpiffeId, entry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::cli::logwriter::Collected;

/// Keeps every record.
#[derive(Default)]
struct Records(Mutex<Vec<TunnelRecord>>);

impl AccessLog for Records {
    fn record(&self, record: &TunnelRecord) {
        self.0.lock().unwrap().push(record.clone());
    }
}

/// Real records of both ends: a tunnel that completed (both roles), and
/// one the server refused because nothing listened at the target.
async fn real_records() -> Vec<TunnelRecord> {
    let ca = DevCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let client_id = SpiffeId::istio("cluster.local", "ns", "client").unwrap();
    let server_id = SpiffeId::istio("cluster.local", "ns", "server").unwrap();
    let client = ca.issue(&client_id, Duration::from_secs(3600)).unwrap();
    let server = ca.issue(&server_id, Duration::from_secs(3600)).unwrap();
    let records = Arc::new(Records::default());
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));

    let echo = TcpListener::bind(loopback).await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = socket.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
    // A port with nothing behind it.
    let closed = TcpListener::bind(loopback).await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);

    let config =
        ServerConfig::new(loopback, server.identity().unwrap()).with_access_log(records.clone());
    let server = Server::bind(config).await.unwrap();
    let route = Route::Direct {
        server: server.local_addr(),
        server_ids: vec![server_id],
    };
    tokio::spawn(server.run());
    let dialer = Dialer::new(&client.identity().unwrap()).unwrap();
    for target in [echo_addr, closed_addr] {
        let forward = TcpListener::bind(loopback).await.unwrap();
        let forward_addr = forward.local_addr().unwrap();
        tokio::spawn(entry::forward::run(
            forward,
            dialer.clone(),
            entry::Destination::new(route.clone(), target),
            records.clone(),
        ));
        let mut app = TcpStream::connect(forward_addr).await.unwrap();
        let _ = app.write_all(b"a \"quoted\" line\n").await;
        let _ = app.shutdown().await;
        let mut back = Vec::new();
        let _ = app.read_to_end(&mut back).await;
    }
    for _ in 0..500 {
        if records.0.lock().unwrap().len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let records = records.0.lock().unwrap().clone();
    assert!(records.len() >= 4, "records: {records:?}");
    assert!(
        records
            .iter()
            .any(|r| matches!(r.outcome, Outcome::Completed) && r.role == Role::Server)
    );
    assert!(
        records
            .iter()
            .any(|r| matches!(r.outcome, Outcome::Refused { .. }))
    );
    records
}

/// What `tracing`'s formatter writes for `record` through [`TracingLog`].
fn through_tracing(record: &TunnelRecord, json: bool) -> String {
    let out = Collected::default();
    let sink = out.clone();
    let builder = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false);
    let log = TracingLog::with_identity_source("files");
    if json {
        let subscriber = builder.json().flatten_event(true).finish();
        tracing::subscriber::with_default(subscriber, || log.record(record));
    } else {
        let subscriber = builder.finish();
        tracing::subscriber::with_default(subscriber, || log.record(record));
    }
    String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
}

/// The line without its timestamp, which differs between two writes.
fn untimed(line: &str, json: bool) -> String {
    if json {
        let start = line.find("\"timestamp\":\"").unwrap() + 13;
        let end = start + line[start..].find('"').unwrap();
        format!("{}{}", &line[..start], &line[end..])
    } else {
        line.split_once(' ').unwrap().1.to_owned()
    }
}

#[tokio::test]
async fn lines_are_what_tracing_writes() {
    let records = real_records().await;
    for record in &records {
        for json in [false, true] {
            let expected = through_tracing(record, json);
            let mut line = String::new();
            if json {
                json_line(&mut line, SystemTime::now(), "files", record);
            } else {
                text_line(&mut line, SystemTime::now(), "files", record);
            }
            assert_eq!(
                untimed(&line, json),
                untimed(&expected, json),
                "record {record:?}"
            );
            if json {
                let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_eq!(parsed["target"], "hbone::access");
            }
            // The timestamps have the same shape.
            let stamp = |l: &str| {
                if json {
                    let parsed: serde_json::Value = serde_json::from_str(l).unwrap();
                    parsed["timestamp"].as_str().unwrap().len()
                } else {
                    l.split_once(' ').unwrap().0.len()
                }
            };
            assert_eq!(stamp(&line), stamp(&expected));
        }
    }
}

#[test]
fn json_strings_escape_as_serde_json_does() {
    let awkward = "a \"b\" \\ c\n\r\t\u{8}\u{c}\u{1}\u{1f} é ☃";
    let mut line = String::new();
    json_string(&mut line, awkward);
    assert_eq!(line, serde_json::to_string(awkward).unwrap());
}

#[test]
fn timestamps_are_utc_dates() {
    let at = |secs: u64, micros: u32| {
        let mut line = String::new();
        timestamp(
            &mut line,
            UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(u64::from(micros)),
        );
        line
    };
    assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
    assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
    assert_eq!(at(1_709_251_199, 999_999), "2024-02-29T23:59:59.999999Z");
    assert_eq!(at(1_796_241_908, 123_456), "2026-12-02T20:05:08.123456Z");
    assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000000Z");
    // The cached second is not reused for the next one.
    assert_eq!(at(1_796_241_909, 0), "2026-12-02T20:05:09.000000Z");
}
