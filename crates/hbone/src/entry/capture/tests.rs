use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::timeout;

use super::*;
use crate::test_support::{test_id, test_identity};

#[derive(Default)]
struct Collected(Mutex<Vec<TunnelRecord>>);

impl AccessLog for Collected {
    fn record(&self, record: &TunnelRecord) {
        self.0.lock().unwrap().push(record.clone());
    }
}

#[test]
fn routes_go_to_the_hbone_port_of_the_original_address() {
    let peers = Peers::new(vec![
        format!("10.0.0.0/24={}", test_id("server"))
            .parse()
            .unwrap(),
    ]);
    let config = CaptureConfig::new(peers);
    let route = config.route("10.0.0.7:8080".parse().unwrap()).unwrap();
    let Route::Direct { server, server_ids } = route else {
        panic!("a direct route, got {route:?}");
    };
    assert_eq!(server, "10.0.0.7:15008".parse().unwrap());
    assert_eq!(server_ids, [test_id("server")]);
    let other_port = config.with_server_port(15009);
    let Some(Route::Direct { server, .. }) = other_port.route("10.0.0.7:80".parse().unwrap())
    else {
        panic!("a direct route");
    };
    assert_eq!(server.port(), 15009);
    assert!(other_port.route("10.0.1.7:80".parse().unwrap()).is_none());
}

#[test]
fn remote_networks_go_through_their_gateway_the_most_specific_winning() {
    let peers = Peers::new(vec![
        format!("10.0.0.0/8={}", test_id("server")).parse().unwrap(),
        format!("10.78.1.0/24={}", test_id("remote-server"))
            .parse()
            .unwrap(),
    ]);
    let remote = |text: String| text.parse::<RemoteNetwork>().unwrap();
    let config = CaptureConfig::new(peers).with_remotes(vec![
        remote(format!(
            "10.78.0.0/16=192.0.2.1:15008,{}",
            test_id("wide-gw")
        )),
        remote(format!(
            "10.78.1.0/24=192.0.2.2:15009,{}",
            test_id("narrow-gw")
        )),
    ]);
    let route = config.route("10.78.1.2:8080".parse().unwrap()).unwrap();
    let Route::Gateway {
        gateway,
        gateway_ids,
        service,
        server_ids,
    } = route
    else {
        panic!("a gateway route, got {route:?}");
    };
    assert_eq!(gateway, "192.0.2.2:15009".parse().unwrap());
    assert_eq!(gateway_ids, [test_id("narrow-gw")]);
    // The gateway is asked for the original destination; the final node
    // proves what the peers table says.
    assert_eq!(service, "10.78.1.2:8080");
    assert_eq!(server_ids, [test_id("remote-server")]);

    let Some(Route::Gateway {
        gateway, service, ..
    }) = config.route("10.78.9.9:443".parse().unwrap())
    else {
        panic!("a gateway route");
    };
    assert_eq!(gateway, "192.0.2.1:15008".parse().unwrap());
    assert_eq!(service, "10.78.9.9:443");

    // Outside every remote network: direct, as before.
    let Some(Route::Direct { server, .. }) = config.route("10.9.0.1:80".parse().unwrap()) else {
        panic!("a direct route");
    };
    assert_eq!(server, "10.9.0.1:15008".parse().unwrap());
    // In a remote network but no peer network: not in the mesh.
    let config = CaptureConfig::new(Peers::default()).with_remotes(config.remotes.clone());
    assert!(config.route("10.78.1.2:8080".parse().unwrap()).is_none());
}

/// IPv6 destinations are asked for in brackets, as authorities are.
#[test]
fn an_ipv6_remote_destination_is_a_bracketed_service() {
    let peers = Peers::new(vec![
        format!("fd78::/64={}", test_id("server")).parse().unwrap(),
    ]);
    let remote = format!("fd78::/64=[fd00::9]:15008,{}", test_id("gw"));
    let config = CaptureConfig::new(peers).with_remotes(vec![remote.parse().unwrap()]);
    let Some(Route::Gateway {
        gateway, service, ..
    }) = config.route("[fd78::2]:8080".parse().unwrap())
    else {
        panic!("a gateway route");
    };
    assert_eq!(gateway, "[fd00::9]:15008".parse().unwrap());
    assert_eq!(service, "[fd78::2]:8080");
}

/// A connection made straight to the listener (not redirected) has no
/// other destination: it is closed and recorded, never tunnelled.
#[tokio::test]
async fn a_connection_that_was_not_redirected_is_closed_and_recorded() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    refused_straight_away(listener, addr).await;
}

/// The same on a dual-stack listener: the IPv4 client is recorded as the
/// IPv4 address it is, not IPv4-mapped.
#[tokio::test]
async fn an_ipv4_client_of_a_dual_stack_listener_is_named_in_ipv4() {
    let Ok(listener) = TcpListener::bind("[::]:0").await else {
        eprintln!("no IPv6 on this machine; the IPv4 case is tested above");
        return;
    };
    let port = listener.local_addr().unwrap().port();
    refused_straight_away(listener, SocketAddr::from(([127, 0, 0, 1], port))).await;
}

async fn refused_straight_away(listener: TcpListener, addr: SocketAddr) {
    let dialer = Dialer::new(&test_identity("client")).unwrap();
    // Everything on loopback is "in the mesh": were the connection
    // tunnelled, it would go to 127.0.0.1:15008, not be refused.
    let peers = Peers::new(vec![
        format!("127.0.0.0/8={}", test_id("server"))
            .parse()
            .unwrap(),
    ]);
    let log = Arc::new(Collected::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(serve(
        listener,
        dialer,
        CaptureConfig::new(peers),
        log.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    let mut app = timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let mut buf = [0u8; 1];
    let read = timeout(Duration::from_secs(5), app.read(&mut buf))
        .await
        .expect("the capture entry should close the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let record = timeout(Duration::from_secs(5), async {
        loop {
            if let Some(record) = log.0.lock().unwrap().first().cloned() {
                return record;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a refusal record");
    match &record.outcome {
        Outcome::Refused { status, reason, .. } => {
            assert_eq!(*status, 0);
            assert!(
                ["not_redirected", "no_original_destination"].contains(reason),
                "{reason}"
            );
        }
        other => panic!("refused, got {other:?}"),
    }
    assert_eq!(record.source.ip(), addr.ip(), "{record:?}");
    assert!(record.peer_id.is_none());
    stop.send(()).unwrap();
    timeout(Duration::from_secs(5), serving)
        .await
        .unwrap()
        .unwrap();
}
