//! Run an HBONE server inside an application, with a policy of its own:
//! one namespace may reach one port, everything else is refused (403).
//!
//! ```sh
//! cargo run -p hbone --example server_with_policy
//! ```

use std::error::Error;
use std::time::Duration;

use hbone::ca::DevCa;
use hbone::policy::{Policy, Rule};
use hbone::{DialError, Dialer, Server, ServerConfig, SpiffeId};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    for line in run().await? {
        println!("{line}");
    }
    Ok(())
}

/// Tries the allowed and a denied target; one line per outcome.
pub async fn run() -> Result<Vec<String>, Box<dyn Error>> {
    let day = Duration::from_secs(86_400);
    let ca = DevCa::generate("cluster.local", day)?;
    let server_id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/db".parse()?;
    let web_id: SpiffeId = "spiffe://cluster.local/ns/web/sa/frontend".parse()?;

    let allowed = TcpListener::bind("127.0.0.1:0").await?;
    let other = TcpListener::bind("127.0.0.1:0").await?;
    let (allowed_addr, other_addr) = (allowed.local_addr()?, other.local_addr()?);

    let rule = Rule::allow("web reaches the database")
        .from_ids(["spiffe://cluster.local/ns/web/*".parse()?])
        .to_targets([format!("127.0.0.1/32:{}", allowed_addr.port()).parse()?]);
    let config = ServerConfig::new(
        "127.0.0.1:0".parse()?,
        ca.issue(&server_id, day)?.identity()?,
    )
    .with_policy(Policy::from_rules(vec![rule]));
    let server = Server::bind(config).await?;
    let server_addr = server.local_addr();
    tokio::spawn(server.run());

    let dialer = Dialer::new(&ca.issue(&web_id, day)?.identity()?)?;
    let mut lines = Vec::new();
    for target in [allowed_addr, other_addr] {
        let outcome = match dialer
            .connect(server_addr, std::slice::from_ref(&server_id), target)
            .await
        {
            Ok(_) => "allowed".to_owned(),
            Err(DialError::Status { status, .. }) => format!("refused with {status}"),
            Err(e) => return Err(e.into()),
        };
        lines.push(format!("{target}: {outcome}"));
    }
    dialer.close(Duration::from_secs(2)).await;
    Ok(lines)
}
