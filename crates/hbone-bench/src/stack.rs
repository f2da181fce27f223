//! The deployment under test: identities on disk, the target apps, an
//! HBONE server and the client entries, each its own process on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hbone::SpiffeId;
use hbone::ca::DevCa;

use super::EntryKind;
use super::child::Proc;

const TRUST_DOMAIN: &str = "cluster.local";
/// How long a child may take to start and report its address.
const START_LIMIT: Duration = Duration::from_secs(20);
const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";

/// A private directory removed when the bench ends. The bench writes its
/// identities here, since the server and entries load them from files.
pub struct WorkDir(PathBuf);

impl WorkDir {
    pub fn create() -> anyhow::Result<WorkDir> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!("hbone-bench-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(WorkDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh CA, with a server and a client identity saved under `dir`.
pub struct Pki {
    pub server_dir: PathBuf,
    pub client_dir: PathBuf,
    pub gateway_dir: PathBuf,
    pub server_id: SpiffeId,
    pub gateway_id: SpiffeId,
}

impl Pki {
    pub fn write(dir: &Path) -> anyhow::Result<Pki> {
        let day = Duration::from_secs(86_400);
        let ca = DevCa::generate(TRUST_DOMAIN, day)?;
        let server_id = SpiffeId::istio(TRUST_DOMAIN, "bench", "server")?;
        let client_id = SpiffeId::istio(TRUST_DOMAIN, "bench", "client")?;
        let gateway_id = SpiffeId::istio(TRUST_DOMAIN, "bench", "gateway")?;
        let server_dir = dir.join("server");
        let client_dir = dir.join("client");
        let gateway_dir = dir.join("gateway");
        ca.issue(&server_id, day)?.save(&server_dir)?;
        ca.issue(&client_id, day)?.save(&client_dir)?;
        ca.issue(&gateway_id, day)?.save(&gateway_dir)?;
        Ok(Pki {
            server_dir,
            client_dir,
            gateway_dir,
            server_id,
            gateway_id,
        })
    }
}

/// The sink and echo applications (`hbone bench apps`).
pub struct Apps {
    pub proc: Proc,
    pub sink: SocketAddr,
    pub echo: SocketAddr,
}

impl Apps {
    pub fn start() -> anyhow::Result<Apps> {
        let mut proc = Proc::spawn("target apps", &strings(&["bench", "apps", "--log", "warn"]))?;
        let line = proc.next_line(START_LIMIT)?;
        let (sink, echo) = super::apps::parse_ports(&line)
            .with_context(|| format!("target apps printed {line:?}, not their ports"))?;
        Ok(Apps { proc, sink, echo })
    }
}

/// A server or entry process and the address it listens on.
pub struct Listening {
    pub proc: Proc,
    pub addr: SocketAddr,
}

/// `hbone server` on an ephemeral loopback port; only loopback targets are
/// allowed, which is the server's default.
pub fn start_server(pki: &Pki, flags: &ChildFlags) -> anyhow::Result<Listening> {
    let mut args = strings(&["server", "--listen", LOOPBACK_ANY_PORT]);
    push_path(&mut args, "--identity-dir", &pki.server_dir);
    args.extend(flags.args());
    let mut proc = Proc::spawn("hbone server", &args)?;
    let addr = proc.wait_ready(START_LIMIT)?;
    Ok(Listening { proc, addr })
}

/// The service name the bench's gateway routes to the server.
const BENCH_SERVICE: &str = "echo.bench.svc.cluster.local:8080";

/// `hbone gateway` routing [`BENCH_SERVICE`] to `server`.
pub fn start_gateway(
    pki: &Pki,
    dir: &Path,
    server: SocketAddr,
    flags: &ChildFlags,
) -> anyhow::Result<Listening> {
    let routes = dir.join("routes.toml");
    let host = BENCH_SERVICE.split(':').next().unwrap_or_default();
    std::fs::write(
        &routes,
        format!("[[route]]\nhost = \"{host}\"\nendpoints = [\"{server}\"]\n"),
    )
    .with_context(|| format!("cannot write {}", routes.display()))?;
    let mut args = strings(&["gateway", "--listen", LOOPBACK_ANY_PORT]);
    push_path(&mut args, "--identity-dir", &pki.gateway_dir);
    push_path(&mut args, "--routes", &routes);
    args.extend(flags.args());
    let mut proc = Proc::spawn("hbone gateway", &args)?;
    let addr = proc.wait_ready(START_LIMIT)?;
    Ok(Listening { proc, addr })
}

/// A forward entry to `target` through the gateway (double HBONE);
/// `pool: false` gives every connection a fresh inner handshake.
pub fn start_gateway_forward(
    pki: &Pki,
    gateway: SocketAddr,
    target: SocketAddr,
    pool: bool,
    flags: &ChildFlags,
) -> anyhow::Result<Listening> {
    let mut args = strings(&["forward", "--listen", LOOPBACK_ANY_PORT]);
    push_path(&mut args, "--identity-dir", &pki.client_dir);
    args.extend(strings(&[
        "--gateway",
        &gateway.to_string(),
        "--gateway-id",
        pki.gateway_id.as_str(),
        "--service",
        BENCH_SERVICE,
        "--server-id",
        pki.server_id.as_str(),
        "--target",
        &target.to_string(),
    ]));
    if !pool {
        args.push("--no-pool".into());
    }
    args.extend(flags.args());
    let name = if pool {
        "forward via gateway"
    } else {
        "forward via gateway (no pool)"
    };
    let mut proc = Proc::spawn(name, &args)?;
    let addr = proc.wait_ready(START_LIMIT)?;
    Ok(Listening { proc, addr })
}

/// A client entry: a forward to one target, or a SOCKS5 entry for any.
pub struct Entry {
    pub listening: Listening,
    /// The forward's fixed target; `None` for SOCKS5.
    target: Option<SocketAddr>,
}

/// How the load generator reaches a target: connect to `addr`, and ask a
/// SOCKS5 entry for the target first when there is one.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub addr: SocketAddr,
    pub socks5: Option<SocketAddr>,
}

impl Route {
    pub fn direct(addr: SocketAddr) -> Route {
        Route { addr, socks5: None }
    }
}

impl Entry {
    /// Starts an entry of `kind` towards `server`; `target` is used by a
    /// forward only. `pool: false` makes every tunnel a fresh handshake.
    pub fn start(
        kind: EntryKind,
        pki: &Pki,
        server: SocketAddr,
        target: SocketAddr,
        pool: bool,
        flags: &ChildFlags,
    ) -> anyhow::Result<Entry> {
        let (command, name, target) = match kind {
            EntryKind::Forward => (
                "forward",
                format!("forward entry to {target}"),
                Some(target),
            ),
            EntryKind::Socks5 => ("socks5", "SOCKS5 entry".to_owned(), None),
        };
        let name = if pool {
            name
        } else {
            format!("{name} (no pool)")
        };
        let mut args = strings(&[command, "--listen", LOOPBACK_ANY_PORT]);
        push_path(&mut args, "--identity-dir", &pki.client_dir);
        args.extend(strings(&["--server", &server.to_string()]));
        args.extend(strings(&["--server-id", pki.server_id.as_str()]));
        if let Some(target) = target {
            args.extend(strings(&["--target", &target.to_string()]));
        }
        if !pool {
            args.push("--no-pool".into());
        }
        args.extend(flags.args());
        let mut proc = Proc::spawn(&name, &args)?;
        let addr = proc.wait_ready(START_LIMIT)?;
        Ok(Entry {
            listening: Listening { proc, addr },
            target,
        })
    }

    /// Whether this entry can carry tunnels to `target`.
    pub fn serves(&self, target: SocketAddr) -> bool {
        self.target.is_none_or(|fixed| fixed == target)
    }

    /// The route to `target` through this entry.
    pub fn route(&self, target: SocketAddr) -> Route {
        match self.target {
            Some(_) => Route::direct(self.listening.addr),
            None => Route {
                addr: target,
                socks5: Some(self.listening.addr),
            },
        }
    }
}

/// The client side of the tunnel: pooled entries for the sink and the echo
/// app, and one with pooling off for the handshake rate.
pub struct ClientSide {
    pub pooled: Vec<Entry>,
    pub no_pool: Entry,
}

impl ClientSide {
    pub fn start(
        kind: EntryKind,
        pki: &Pki,
        server: SocketAddr,
        apps: &Apps,
        flags: &ChildFlags,
    ) -> anyhow::Result<ClientSide> {
        let pooled = match kind {
            EntryKind::Forward => vec![
                Entry::start(kind, pki, server, apps.sink, true, flags)?,
                Entry::start(kind, pki, server, apps.echo, true, flags)?,
            ],
            EntryKind::Socks5 => vec![Entry::start(kind, pki, server, apps.sink, true, flags)?],
        };
        let no_pool = Entry::start(kind, pki, server, apps.echo, false, flags)?;
        Ok(ClientSide { pooled, no_pool })
    }

    /// The pooled entry that carries tunnels to `target`.
    pub fn entry_for(&self, target: SocketAddr) -> anyhow::Result<&Entry> {
        self.pooled
            .iter()
            .find(|entry| entry.serves(target))
            .with_context(|| format!("no entry leads to {target}"))
    }

    pub fn procs_mut(&mut self) -> impl Iterator<Item = &mut Proc> {
        self.pooled
            .iter_mut()
            .chain(std::iter::once(&mut self.no_pool))
            .map(|entry| &mut entry.listening.proc)
    }
}

/// What every server, gateway and entry process of the bench is started with.
pub struct ChildFlags {
    /// Their log filter (`info` writes the access log).
    pub log: String,
    /// Whether they run their admin endpoint (metrics and the open-tunnel
    /// list), as `hbone run` does by default.
    pub admin: bool,
}

impl ChildFlags {
    /// Their "ready" lines (target `hbone::cli`) always show: the bench
    /// reads the addresses from them. The admin endpoint, when on, takes an
    /// ephemeral port.
    fn args(&self) -> Vec<String> {
        let mut args = strings(&["--log", &format!("{},hbone::cli=info", self.log)]);
        if self.admin {
            args.extend(strings(&["--admin", LOOPBACK_ANY_PORT]));
        }
        args
    }
}

fn push_path(args: &mut Vec<String>, flag: &str, path: &Path) {
    args.push(flag.to_owned());
    args.push(path.display().to_string());
}

pub fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}
