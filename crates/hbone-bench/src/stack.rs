//! The deployment under test: identities on disk, the target apps, an
//! HBONE server and the client entries on loopback, either each in its
//! own process or the server and the entries in one (`hbone run`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use hbone::SpiffeId;
use hbone::ca::DevCa;

use super::EntryKind;
use super::child::Proc;
use super::cost::Counted;
use super::results::Topology;

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
    /// The first echo listener.
    pub echo: SocketAddr,
    /// Every echo listener, `echo` first.
    pub echoes: Vec<SocketAddr>,
}

impl Apps {
    pub fn start() -> anyhow::Result<Apps> {
        Apps::start_on(None, 1)
    }

    /// The apps held to `cpus`, when given, with `echoes` echo listeners
    /// (`--scaling`: one per load generator).
    pub fn start_on(cpus: Option<&[usize]>, echoes: usize) -> anyhow::Result<Apps> {
        let mut args = strings(&["bench", "apps", "--log", "warn"]);
        args.extend(["--echoes".to_owned(), echoes.to_string()]);
        let mut proc = Proc::spawn_on("target apps", &args, cpus)?;
        let line = proc.next_line(START_LIMIT)?;
        let (sink, echoes) = super::apps::parse_ports(&line)
            .with_context(|| format!("target apps printed {line:?}, not their ports"))?;
        Ok(Apps {
            proc,
            sink,
            echo: echoes[0],
            echoes,
        })
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
    start_server_with(pki, flags, &[])
}

/// [`start_server`] with `extra` flags.
pub fn start_server_with(
    pki: &Pki,
    flags: &ChildFlags,
    extra: &[&str],
) -> anyhow::Result<Listening> {
    let mut args = strings(&["server", "--listen", LOOPBACK_ANY_PORT]);
    args.extend(strings(extra));
    push_path(&mut args, "--identity-dir", &pki.server_dir);
    if let Some(streams) = flags.server_max_streams {
        args.extend(["--max-streams".to_owned(), streams.to_string()]);
    }
    args.extend(flags.args());
    let mut proc = Proc::spawn("hbone server", &args)?;
    let addr = proc.wait_ready(START_LIMIT)?;
    Ok(Listening { proc, addr })
}

/// `hbone bench delay` to `to`, holding every byte `delay` each way (a
/// long path on loopback), and the address it listens on.
pub fn start_delay_relay(to: SocketAddr, delay: Duration) -> anyhow::Result<(Proc, SocketAddr)> {
    let millis = delay.as_millis();
    let args = strings(&[
        "bench",
        "delay",
        "--to",
        &to.to_string(),
        "--delay",
        &format!("{millis}ms"),
    ]);
    let mut relay = Proc::spawn(&format!("delay relay ({millis} ms each way)"), &args)?;
    let line = relay.next_line(START_LIMIT)?;
    let addr = line
        .strip_prefix(super::delay::READY_PREFIX)
        .and_then(|addr| addr.trim().parse().ok())
        .with_context(|| format!("the delay relay printed {line:?}, not its address"))?;
    Ok((relay, addr))
}

/// Bare relays (`hbone bench relays`) in front of the apps: the reference
/// beside hbone on bulk and req/resp.
pub struct BareRelays {
    pub proc: Proc,
    /// Whose work they are in the per-unit tables.
    pub counted: Counted,
    /// Each app's entry relay: (app, entry relay).
    entries: Vec<(SocketAddr, SocketAddr)>,
}

impl BareRelays {
    /// The relays with a blocking thread per direction, or all on one
    /// thread with epoll.
    pub fn start(apps: &Apps, one_thread: bool) -> anyhow::Result<BareRelays> {
        BareRelays::start_on(apps, one_thread, None)
    }

    /// The same, held to `cpus` when given (`--placement`).
    pub fn start_on(
        apps: &Apps,
        one_thread: bool,
        cpus: Option<&[usize]>,
    ) -> anyhow::Result<BareRelays> {
        let targets = [apps.sink, apps.echo];
        let mut args = strings(&["bench", "relays"]);
        for target in targets {
            args.extend(["--to".to_owned(), target.to_string()]);
        }
        let (name, counted) = match one_thread {
            true => {
                args.push("--one-thread".to_owned());
                ("bare relays, one thread", Counted::BareRelaysOneThread)
            }
            false => ("bare relays", Counted::BareRelays),
        };
        let mut proc = Proc::spawn_on(name, &args, cpus)?;
        let mut entries = Vec::with_capacity(targets.len());
        for target in targets {
            entries.push((target, proc.wait_ready(START_LIMIT)?));
        }
        Ok(BareRelays {
            proc,
            counted,
            entries,
        })
    }

    /// The route to `app` through the relays.
    pub fn route(&self, app: SocketAddr) -> anyhow::Result<Route> {
        self.entries
            .iter()
            .find(|(target, _)| *target == app)
            .map(|(_, entry)| Route::direct(*entry))
            .with_context(|| format!("no bare relay in front of {app}"))
    }
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

/// One client entry the bench runs: a forward to one target, or a SOCKS5
/// entry for any; `pool: false` makes every tunnel a fresh handshake.
#[derive(Debug, Clone, Copy)]
pub struct EntrySpec {
    pub kind: EntryKind,
    /// The forward's fixed target; `None` for SOCKS5.
    pub target: Option<SocketAddr>,
    pub pool: bool,
}

impl EntrySpec {
    /// An entry of `kind`; `target` is used by a forward only.
    pub fn new(kind: EntryKind, target: SocketAddr, pool: bool) -> EntrySpec {
        let target = (kind == EntryKind::Forward).then_some(target);
        EntrySpec { kind, target, pool }
    }

    fn name(&self) -> String {
        let name = match self.target {
            Some(target) => format!("forward entry to {target}"),
            None => "SOCKS5 entry".to_owned(),
        };
        if self.pool {
            name
        } else {
            format!("{name} (no pool)")
        }
    }

    fn command(&self) -> &'static str {
        self.kind.name()
    }
}

/// A client entry that is listening.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub spec: EntrySpec,
    pub addr: SocketAddr,
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
    /// Whether this entry can carry tunnels to `target`.
    pub fn serves(&self, target: SocketAddr) -> bool {
        self.spec.target.is_none_or(|fixed| fixed == target)
    }

    /// The route to `target` through this entry.
    pub fn route(&self, target: SocketAddr) -> Route {
        match self.spec.target {
            Some(_) => Route::direct(self.addr),
            None => Route {
                addr: target,
                socks5: Some(self.addr),
            },
        }
    }
}

/// Starts `hbone forward` or `hbone socks5` towards `server`.
pub fn start_entry(
    spec: EntrySpec,
    pki: &Pki,
    server: SocketAddr,
    flags: &ChildFlags,
) -> anyhow::Result<(Proc, Entry)> {
    let mut args = strings(&[spec.command(), "--listen", LOOPBACK_ANY_PORT]);
    push_path(&mut args, "--identity-dir", &pki.client_dir);
    args.extend(strings(&["--server", &server.to_string()]));
    args.extend(strings(&["--server-id", pki.server_id.as_str()]));
    if let Some(target) = spec.target {
        args.extend(strings(&["--target", &target.to_string()]));
    }
    if !spec.pool {
        args.push("--no-pool".into());
    }
    args.extend(flags.args());
    let mut proc = Proc::spawn(&spec.name(), &args)?;
    let addr = proc.wait_ready(START_LIMIT)?;
    Ok((proc, Entry { spec, addr }))
}

/// The entries of the main workloads: pooled ones for the sink and the
/// echo app (one SOCKS5 entry serves both; beside forwards, a pooled
/// SOCKS5 entry for the new tunnels the targets are stated for), and one
/// with pooling off for the handshake rate.
pub fn entry_specs(kind: EntryKind, apps: &Apps) -> Vec<EntrySpec> {
    let mut specs = match kind {
        EntryKind::Forward => vec![
            EntrySpec::new(kind, apps.sink, true),
            EntrySpec::new(kind, apps.echo, true),
            EntrySpec::new(EntryKind::Socks5, apps.echo, true),
        ],
        EntryKind::Socks5 => vec![EntrySpec::new(kind, apps.sink, true)],
    };
    specs.push(EntrySpec::new(kind, apps.echo, false));
    specs
}

/// The server and the client entries under test, in one topology: each
/// in a process of its own, or all in one `hbone run` process.
pub struct Proxies {
    pub server: SocketAddr,
    pub entries: Vec<Entry>,
    /// The processes they run in: the server's first.
    pub procs: Vec<Proc>,
}

impl Proxies {
    /// `hbone server`, then one process per entry.
    pub fn start_split(
        specs: &[EntrySpec],
        pki: &Pki,
        flags: &ChildFlags,
    ) -> anyhow::Result<Proxies> {
        let server = start_server(pki, flags)?;
        let mut procs = vec![server.proc];
        let mut entries = Vec::new();
        for &spec in specs {
            let (proc, entry) = start_entry(spec, pki, server.addr, flags)?;
            procs.push(proc);
            entries.push(entry);
        }
        Ok(Proxies {
            server: server.addr,
            entries,
            procs,
        })
    }

    /// The server and entries of `topology`: apart, or in one `hbone run`
    /// (under `--runtime per-core` for [`Topology::JoinedPerCore`]).
    pub fn start(
        topology: Topology,
        specs: &[EntrySpec],
        pki: &Pki,
        dir: &Path,
        flags: &ChildFlags,
    ) -> anyhow::Result<Proxies> {
        match topology {
            Topology::Split | Topology::Gateway => Proxies::start_split(specs, pki, flags),
            Topology::Joined => Proxies::start_joined(specs, pki, dir, flags),
            Topology::JoinedPerCore => Proxies::start_joined(specs, pki, dir, &flags.per_core()),
        }
    }

    /// `hbone run` with a config file holding a `[server]` and a section
    /// per entry. The entries must know the server's port before it runs,
    /// so every port is picked free beforehand; should another process
    /// take one meanwhile, the start is tried again with new ports.
    pub fn start_joined(
        specs: &[EntrySpec],
        pki: &Pki,
        dir: &Path,
        flags: &ChildFlags,
    ) -> anyhow::Result<Proxies> {
        let mut attempt = 1;
        loop {
            match Proxies::try_joined(specs, pki, dir, flags) {
                Ok(proxies) => return Ok(proxies),
                Err(e) if attempt < JOINED_ATTEMPTS && format!("{e:#}").contains(PORT_TAKEN) => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_joined(
        specs: &[EntrySpec],
        pki: &Pki,
        dir: &Path,
        flags: &ChildFlags,
    ) -> anyhow::Result<Proxies> {
        let ports = free_ports(1 + specs.len())?;
        let server: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
        let entries: Vec<Entry> = specs
            .iter()
            .zip(&ports[1..])
            .map(|(&spec, &port)| Entry {
                spec,
                addr: ([127, 0, 0, 1], port).into(),
            })
            .collect();
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        // A file per process: `hbone run` watches its file for changes.
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config = dir.join(format!("one-process-{n}.toml"));
        std::fs::write(
            &config,
            joined_config(pki, server, &entries, flags.server_max_streams),
        )
        .with_context(|| format!("cannot write {}", config.display()))?;
        let mut args = strings(&["run"]);
        push_path(&mut args, "--config", &config);
        args.extend(flags.run_args());
        let label = match flags.runtime.as_str() {
            "per-core" => "hbone run --runtime per-core (server and entries in one process)",
            _ => "hbone run (server and entries in one process)",
        };
        let mut proc = match &flags.binary {
            None => Proc::spawn_on(label, &args, flags.cpus.as_deref())?,
            Some(exe) => Proc::spawn_exe(exe, None, OTHER_BUILD_LABEL, &args)?,
        };
        let mut ready = Vec::new();
        for _ in 0..1 + entries.len() {
            ready.push(proc.wait_ready(START_LIMIT)?);
        }
        ready.sort();
        let mut expected: Vec<SocketAddr> = entries.iter().map(|e| e.addr).collect();
        expected.push(server);
        expected.sort();
        if ready != expected {
            bail!("hbone run listens on {ready:?}, not on the configured {expected:?}");
        }
        Ok(Proxies {
            server,
            entries,
            procs: vec![proc],
        })
    }

    /// The pooled entry that carries tunnels to `target`.
    pub fn entry_for(&self, target: SocketAddr) -> anyhow::Result<&Entry> {
        self.entries
            .iter()
            .find(|entry| entry.spec.pool && entry.serves(target))
            .with_context(|| format!("no entry leads to {target}"))
    }

    /// The pooled SOCKS5 entry.
    pub fn socks5_entry(&self) -> anyhow::Result<&Entry> {
        self.entries
            .iter()
            .find(|entry| entry.spec.pool && entry.spec.kind == EntryKind::Socks5)
            .context("no pooled SOCKS5 entry")
    }

    /// The entry with pooling off that carries tunnels to `target`.
    pub fn no_pool_for(&self, target: SocketAddr) -> anyhow::Result<&Entry> {
        self.entries
            .iter()
            .find(|entry| !entry.spec.pool && entry.serves(target))
            .with_context(|| format!("no entry without a pool leads to {target}"))
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }
}

/// How often a one-process start is tried when a picked port was taken.
const JOINED_ATTEMPTS: u32 = 3;
/// What `hbone` says when it cannot bind.
const PORT_TAKEN: &str = "cannot listen on";

/// `n` loopback ports that were free a moment ago.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    // All held at once, so they differ.
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind(LOOPBACK_ANY_PORT))
        .collect::<Result<_, _>>()
        .context("cannot find free loopback ports")?;
    held.iter()
        .map(|listener| Ok(listener.local_addr()?.port()))
        .collect()
}

/// The config file of the one-process topology.
fn joined_config(
    pki: &Pki,
    server: SocketAddr,
    entries: &[Entry],
    max_streams: Option<u32>,
) -> String {
    let quoted = |path: &Path| toml_string(&path.display().to_string());
    let mut out = format!(
        "[server]\nidentity-dir = {}\nlisten = \"{server}\"\n",
        quoted(&pki.server_dir)
    );
    if let Some(streams) = max_streams {
        out += &format!("max-streams = {streams}\n");
    }
    for entry in entries {
        out += &format!(
            "\n[[{}]]\nidentity-dir = {}\nlisten = \"{}\"\nserver = \"{server}\"\nserver-id = {}\n",
            entry.spec.command(),
            quoted(&pki.client_dir),
            entry.addr,
            toml_string(pki.server_id.as_str()),
        );
        if let Some(target) = entry.spec.target {
            out += &format!("target = \"{target}\"\n");
        }
        if !entry.spec.pool {
            out += "no-pool = true\n";
        }
    }
    out
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// The proxies' `--runtime` when none is given.
pub const DEFAULT_RUNTIME: &str = "work-stealing";
/// The one-process `hbone run` of the build given with `--against`.
pub const OTHER_BUILD_LABEL: &str = "hbone run of the other build (--against)";

/// What every server, gateway and entry process of the bench is started with.
#[derive(Clone)]
pub struct ChildFlags {
    /// Their log filter (`info` writes the access log).
    pub log: String,
    /// Whether they run their admin endpoint (metrics and the open-tunnel
    /// list), as `hbone run` does by default.
    pub admin: bool,
    /// Their `--runtime`: `work-stealing` or `per-core`.
    pub runtime: String,
    /// Their `--threads`, if given.
    pub threads: Option<u16>,
    /// The servers' `--max-streams`, if given (servers only).
    pub server_max_streams: Option<u32>,
    /// Another hbone binary to run instead of this one (`--against`; the
    /// one-process `hbone run` only).
    pub binary: Option<PathBuf>,
    /// The CPUs the one-process `hbone run` may use (`--scaling`), if held
    /// to some.
    pub cpus: Option<Vec<usize>>,
}

impl ChildFlags {
    /// The same flags under `--runtime per-core`.
    pub fn per_core(&self) -> ChildFlags {
        ChildFlags {
            runtime: "per-core".to_owned(),
            ..self.clone()
        }
    }

    /// The same flags for the hbone binary at `exe`.
    pub fn of_binary(&self, exe: &Path) -> ChildFlags {
        ChildFlags {
            binary: Some(exe.to_owned()),
            ..self.clone()
        }
    }

    /// Their "ready" lines (target `hbone::cli`) always show: the bench
    /// reads the addresses from them. The admin endpoint, when on, takes an
    /// ephemeral port.
    pub(crate) fn args(&self) -> Vec<String> {
        let mut args = strings(&["--log", &format!("{},hbone::cli=info", self.log)]);
        // Only when not the default, so that builds older than the flag
        // run too (`--against`).
        if self.runtime != DEFAULT_RUNTIME {
            args.extend(strings(&["--runtime", &self.runtime]));
        }
        if let Some(threads) = self.threads {
            args.extend(strings(&["--threads", &threads.to_string()]));
        }
        if self.admin {
            args.extend(strings(&["--admin", LOOPBACK_ANY_PORT]));
        }
        args
    }

    /// The same for `hbone run`, whose admin endpoint is on by default.
    fn run_args(&self) -> Vec<String> {
        let mut args = self.args();
        if !self.admin {
            args.extend(strings(&["--admin", "off"]));
        }
        args
    }
}

pub(crate) fn push_path(args: &mut Vec<String>, flag: &str, path: &Path) {
    args.push(flag.to_owned());
    args.push(path.display().to_string());
}

pub fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proxies get `--runtime` and `--threads` only where the bench
    /// was given something other than their defaults, so that builds older
    /// than a flag still start (`--against`).
    #[test]
    fn proxies_get_runtime_and_threads_only_when_not_their_default() {
        let defaults = ChildFlags {
            log: "info".to_owned(),
            admin: false,
            runtime: DEFAULT_RUNTIME.to_owned(),
            threads: None,
            server_max_streams: None,
            binary: None,
            cpus: None,
        };
        let args = defaults.args();
        assert!(
            !args.iter().any(|a| a == "--runtime" || a == "--threads"),
            "{args:?}"
        );
        let split = ChildFlags {
            threads: Some(1),
            ..defaults.per_core()
        };
        let args = split.args().join(" ");
        assert!(args.contains("--runtime per-core"), "{args}");
        assert!(args.contains("--threads 1"), "{args}");
    }

    #[test]
    fn one_process_config_holds_the_server_and_every_entry() {
        let dir = Path::new("/tmp/bench \"quoted\"");
        let pki = Pki {
            server_dir: dir.join("server"),
            client_dir: dir.join("client"),
            gateway_dir: dir.join("gateway"),
            server_id: SpiffeId::istio(TRUST_DOMAIN, "bench", "server").unwrap(),
            gateway_id: SpiffeId::istio(TRUST_DOMAIN, "bench", "gateway").unwrap(),
        };
        let (sink, echo): (SocketAddr, SocketAddr) = (
            "127.0.0.1:7001".parse().unwrap(),
            "127.0.0.1:7002".parse().unwrap(),
        );
        let entries = [
            Entry {
                spec: EntrySpec::new(EntryKind::Forward, sink, true),
                addr: "127.0.0.1:8001".parse().unwrap(),
            },
            Entry {
                spec: EntrySpec::new(EntryKind::Forward, echo, false),
                addr: "127.0.0.1:8002".parse().unwrap(),
            },
            Entry {
                spec: EntrySpec::new(EntryKind::Socks5, echo, true),
                addr: "127.0.0.1:8003".parse().unwrap(),
            },
        ];
        let server = "127.0.0.1:9000".parse().unwrap();
        let text = joined_config(&pki, server, &entries, None);
        let file: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(file["server"]["listen"].as_str(), Some("127.0.0.1:9000"));
        assert_eq!(
            file["server"]["identity-dir"].as_str(),
            Some("/tmp/bench \"quoted\"/server")
        );
        let forwards = file["forward"].as_array().unwrap();
        assert_eq!(forwards.len(), 2);
        assert_eq!(forwards[0]["target"].as_str(), Some("127.0.0.1:7001"));
        assert_eq!(forwards[0]["server"].as_str(), Some("127.0.0.1:9000"));
        assert!(forwards[0].get("no-pool").is_none());
        assert_eq!(forwards[1]["no-pool"].as_bool(), Some(true));
        let socks5 = &file["socks5"].as_array().unwrap()[0];
        assert_eq!(socks5["listen"].as_str(), Some("127.0.0.1:8003"));
        assert!(socks5.get("target").is_none());
        assert_eq!(
            socks5["server-id"].as_str(),
            Some("spiffe://cluster.local/ns/bench/sa/server")
        );
        assert!(file["server"].get("max-streams").is_none(), "{text}");
        let limited = joined_config(&pki, server, &entries, Some(8));
        let file: toml::Table = limited.parse().unwrap();
        assert_eq!(file["server"]["max-streams"].as_integer(), Some(8));
    }

    #[test]
    fn free_ports_differ() {
        let ports = free_ports(4).unwrap();
        let mut unique = ports.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 4, "{ports:?}");
    }
}
