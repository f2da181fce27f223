//! Who may use an entry (`forward`, `socks5`): its listen address, the
//! sources it serves, and the SOCKS5 credentials file, reloaded when it
//! changes.
//!
//! An entry opens tunnels with this workload's identity, so an entry on an
//! address other machines can reach lends that identity to them. It is
//! refused unless the operator says who may use it: --allow-source
//! (networks), --allow-remote-clients (anyone), or, for SOCKS5, a
//! credentials file (anyone with a password).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use hbone::entry::access::is_loopback;
use hbone::entry::socks5::{Credentials, CredentialsHandle};
use hbone::entry::{ClientSources, socks5::SocksAccess};
use hbone::policy::{IpNet, TargetRule};

use super::ops::Ops;
use super::watch::{Event, watch};

/// The sources an entry serves.
#[derive(Args, Clone)]
pub(super) struct EntryAccessArgs {
    /// Serve clients from any address. Needed (or --allow-source) to
    /// listen on an address other than loopback: whoever reaches the port
    /// opens tunnels with this workload's identity.
    #[arg(long, conflicts_with = "allow_sources")]
    pub(super) allow_remote_clients: bool,
    /// Serve only clients from this network, CIDR or one address,
    /// repeatable (e.g. 10.1.0.0/16, 192.0.2.7); others are closed right
    /// after accept. Lets the entry listen on an address other than
    /// loopback.
    #[arg(long = "allow-source", value_name = "CIDR", value_parser = parse_network)]
    pub(super) allow_sources: Vec<IpNet>,
}

impl EntryAccessArgs {
    pub(super) fn sources(&self) -> ClientSources {
        match self.allow_sources.as_slice() {
            [] => ClientSources::Any,
            nets => ClientSources::Only(nets.to_vec()),
        }
    }

    /// Whether the operator said who may use the entry.
    fn explicit(&self) -> bool {
        self.allow_remote_clients || !self.allow_sources.is_empty()
    }
}

/// A network for --allow-source: a CIDR, or one address (a /32 or /128).
fn parse_network(text: &str) -> Result<IpNet, String> {
    let expected = "expected a network (CIDR) or an address, e.g. 10.1.0.0/16 or 192.0.2.7";
    let rule: TargetRule = text.parse().map_err(|e| format!("{e}; {expected}"))?;
    // A network has no port: a port given here is a mistake.
    if rule.ports != (1, u16::MAX) || text.contains(']') || text.matches(':').count() == 1 {
        return Err(format!("{text:?} names a port; {expected}"));
    }
    Ok(rule.net)
}

/// How the refusal names the settings that would allow it: as flags, or
/// as config file fields.
#[derive(Clone, Copy)]
pub(super) enum Spelling {
    Flags,
    Fields,
}

/// Refuses a listen address other than loopback unless the entry says who
/// may use it (`explicit`: an allow setting, or SOCKS5 credentials).
pub(super) fn refusal(
    listen: SocketAddr,
    explicit: bool,
    socks5: bool,
    spelling: Spelling,
) -> Option<String> {
    if is_loopback(listen.ip()) || explicit {
        return None;
    }
    let (source, remote, credentials) = match spelling {
        Spelling::Flags => (
            "--allow-source CIDR (repeatable)",
            "--allow-remote-clients",
            "--socks5-credentials FILE",
        ),
        Spelling::Fields => (
            "allow-source = [\"CIDR\", ...]",
            "allow-remote-clients = true",
            "socks5-credentials = \"FILE\"",
        ),
    };
    let credentials = if socks5 {
        format!(", or {credentials} to ask each client for a user name and password")
    } else {
        String::new()
    };
    Some(format!(
        "refusing to listen on {listen}: it is not a loopback address, so other machines \
         could open tunnels with this workload's identity; say who may: {source} for your \
         clients' networks, or {remote} for any source{credentials}; or listen on 127.0.0.1"
    ))
}

/// The start-up check of `hbone forward` and `hbone socks5`, before
/// anything is bound. `socks5` is, for a SOCKS5 entry, whether it has a
/// credentials file (`None` for a forward).
pub(super) fn check_listen(
    listen: SocketAddr,
    access: &EntryAccessArgs,
    socks5: Option<bool>,
) -> anyhow::Result<()> {
    let explicit = access.explicit() || socks5 == Some(true);
    match refusal(listen, explicit, socks5.is_some(), Spelling::Flags) {
        Some(message) => anyhow::bail!(message),
        None => Ok(()),
    }
}

/// The SOCKS5 entry's access: its sources and, given a credentials file,
/// the credentials, loaded now and reloaded when the file changes.
pub(super) fn socks_access(
    access: &EntryAccessArgs,
    credentials: Option<PathBuf>,
    ops: &Ops,
) -> anyhow::Result<SocksAccess> {
    let mut socks = SocksAccess::default().with_sources(access.sources());
    if let Some(path) = credentials {
        let loaded = Credentials::load(&path)?;
        tracing::info!(path = %path.display(), users = loaded.len(), "SOCKS5 credentials loaded");
        let handle = CredentialsHandle::new(loaded);
        watch_credentials(path, handle.clone(), ops);
        socks = socks.with_credentials(handle);
    }
    Ok(socks)
}

/// Reloads the credentials file when it changes and on SIGHUP. A file that
/// does not load (malformed, or readable by others) keeps the old
/// credentials in force.
fn watch_credentials(path: PathBuf, handle: CredentialsHandle, ops: &Ops) {
    let metrics = ops.telemetry.metrics.clone();
    tokio::spawn(watch(vec![path.clone()], move |event| {
        let Event::Reload(why) = event else { return };
        let loaded = Credentials::load(&path);
        if let Some(metrics) = &metrics {
            metrics.reload("socks5-credentials", loaded.is_ok());
        }
        match loaded {
            Ok(credentials) => {
                let users = credentials.len();
                handle.replace(credentials);
                tracing::info!(path = %path.display(), users, why, "SOCKS5 credentials reloaded");
            }
            Err(e) => tracing::error!(
                path = %path.display(), why,
                "SOCKS5 credentials not reloaded, the old ones stay in force: {e}"
            ),
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_are_cidrs_or_addresses_without_ports() {
        assert_eq!(
            parse_network("10.1.0.0/16").unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert_eq!(
            parse_network("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(parse_network("fd00::/8").unwrap().to_string(), "fd00::/8");
        assert!(
            parse_network("10.0.0.0/8:80")
                .unwrap_err()
                .contains("names a port")
        );
        assert!(parse_network("[fd00::/8]:80").is_err());
        assert!(
            parse_network("10.0.0.1/8")
                .unwrap_err()
                .contains("host bits")
        );
        assert!(parse_network("nowhere").is_err());
    }

    #[test]
    fn only_loopback_listeners_need_no_permission() {
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        for listen in ["127.0.0.1:1080", "127.0.0.9:0", "[::1]:1080"] {
            assert_eq!(refusal(addr(listen), false, true, Spelling::Flags), None);
        }
        for listen in ["0.0.0.0:1080", "[::]:1080", "192.0.2.1:1080"] {
            let message = refusal(addr(listen), false, false, Spelling::Flags).unwrap();
            assert!(message.contains("--allow-remote-clients"), "{message}");
            assert!(!message.contains("credentials"), "{message}");
            assert_eq!(refusal(addr(listen), true, false, Spelling::Flags), None);
        }
        let fields = refusal(addr("0.0.0.0:1"), false, true, Spelling::Fields).unwrap();
        assert!(fields.contains("allow-source = [") && fields.contains("socks5-credentials = "));
        assert!(!fields.contains("--"), "{fields}");
    }
}
