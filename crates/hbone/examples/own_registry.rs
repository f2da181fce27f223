//! Register hbone's metrics into your application's own Prometheus
//! registry, so one scrape shows your series and the tunnels' together.
//!
//! ```sh
//! cargo run -p hbone --example own_registry
//! ```

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use hbone::Telemetry;
use hbone::access::TracingLog;
use hbone::ca::DevCa;
use hbone::lifecycle::TunnelLifecycle;
use hbone::metrics::Metrics;
use hbone::{Dialer, DialerConfig, Server, ServerConfig, SpiffeId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    print!("{}", run().await?);
    Ok(())
}

/// Opens one tunnel and returns the application's whole scrape.
pub async fn run() -> Result<String, Box<dyn Error>> {
    // The application's registry, with a metric of its own.
    let mut registry = Registry::default();
    let requests = Counter::<u64>::default();
    registry.register(
        "app_requests",
        "Requests the application served",
        requests.clone(),
    );
    // hbone's metrics, in the same registry.
    let metrics = Arc::new(Metrics::register(&mut registry));
    let telemetry = Telemetry::default().with_metrics(metrics.clone());

    let day = Duration::from_secs(86_400);
    let ca = DevCa::generate("cluster.local", day)?;
    let server_id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/server".parse()?;
    let client_id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/client".parse()?;
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = sink.accept().await {
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut conn, &mut tokio::io::sink()).await;
            });
        }
    });

    let config = ServerConfig::new(
        "127.0.0.1:0".parse()?,
        ca.issue(&server_id, day)?.identity()?,
    )
    .with_telemetry(telemetry.clone());
    let server = Server::bind(config).await?;
    let server_addr = server.local_addr();
    tokio::spawn(server.run());

    let dialer_config = DialerConfig::default().with_telemetry(telemetry);
    let dialer = Dialer::with_config(&ca.issue(&client_id, day)?.identity()?, dialer_config)?;
    let asked = std::time::Instant::now();
    let tunnel = dialer
        .connect(server_addr, std::slice::from_ref(&server_id), sink_addr)
        .await?;
    // A tunnel relayed by the application itself is counted, logged and
    // listed through its lifecycle, as hbone's own entries do.
    let local: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    let lifecycle = TunnelLifecycle::for_tunnel(
        &dialer,
        &tunnel,
        local,
        sink_addr,
        Arc::new(TracingLog::default()),
        asked,
    );
    // The application's end of the relay: an in-memory stream here, a
    // socket or a Unix stream in practice.
    let (mut app, local) = tokio::io::duplex(16 << 10);
    app.write_all(b"counted").await?;
    app.shutdown().await?;
    let result = tunnel.relay(local).await;
    lifecycle.finish(result.as_ref().copied());
    assert_eq!(result?.to_tunnel, 7);
    requests.inc();

    // Gauges computed from live state are brought up to date, then the
    // application encodes its registry as it always does.
    metrics.refresh();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    dialer.close(Duration::from_secs(2)).await;
    Ok(text)
}
