//! The capture workload: an unmodified client's plain TCP to an app on
//! another host, captured by `hbone node` and carried over HBONE, beside
//! the same traffic through a `hbone forward` entry and direct.
//!
//! The two hosts are network namespaces the bench creates, joined by a
//! veth pair (nothing leaves the machine), and deletes when it ends. Host
//! B runs two echo apps (one that the node captures, one that it leaves
//! alone for the direct baseline) and `hbone server`; host A runs the
//! node, the forward entry and the load generator. The paths alternate
//! within each run, so drift in background load touches all alike. The
//! CPU per unit is that of the client-side proxy (node or forward) and
//! the server together. Both hosts reuse ports in TIME_WAIT for new
//! connections, as Linux does on loopback, where the other workloads run.
//!
//! It needs root, `ip` and `nft`; without them it is skipped with a note.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use super::Bench;
use crate::child::Proc;
use crate::cost::Meter;
use crate::load::Workload;
use crate::report::number;
use crate::results::{CaptureFigure, CapturePath};
use crate::runner::{RoundTrips, conn_rate, run_load_in, units};
use crate::stack::{Route, push_path, strings};

/// Host A's and host B's addresses on the veth pair.
const HOST_A: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
const HOST_B: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);
/// HBONE's port, where the node and the entry reach B's server.
const HBONE_PORT: u16 = 15008;
/// Where the node's rules send captured connections, on A's loopback.
const CAPTURE_LISTEN: &str = "127.0.0.1:15001";
/// How long a process may take to start and report its address.
const START_LIMIT: Duration = Duration::from_secs(20);

/// Two network namespaces joined by a veth pair; deleted when dropped,
/// which also removes the node's firewall rules with host A.
struct Hosts {
    a: String,
    b: String,
}

impl Hosts {
    fn create() -> anyhow::Result<Hosts> {
        let tag = std::process::id();
        let hosts = Hosts {
            a: format!("hbone-bench-a-{tag}"),
            b: format!("hbone-bench-b-{tag}"),
        };
        let (a, b) = (hosts.a.as_str(), hosts.b.as_str());
        ip(&["netns", "add", a])?;
        ip(&["netns", "add", b])?;
        ip(&[
            "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b,
        ])?;
        ip(&["-n", a, "addr", "add", &format!("{HOST_A}/24"), "dev", "va"])?;
        ip(&["-n", b, "addr", "add", &format!("{HOST_B}/24"), "dev", "vb"])?;
        for (ns, dev) in [(a, "va"), (b, "vb")] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            // Thousands of connections a second to one app leave their
            // ports in TIME_WAIT for a minute: without reuse, which Linux
            // allows by default on loopback only, a second run finds the
            // ports of the first still taken and crawls (a tenth of the
            // rate, whichever path it measures).
            let reuse = Command::new("ip")
                .args(["netns", "exec", ns, "sysctl", "-q", "-w"])
                .arg("net.ipv4.tcp_tw_reuse=1")
                .status()
                .context("cannot run sysctl")?;
            if !reuse.success() {
                bail!("sysctl net.ipv4.tcp_tw_reuse=1 failed in {ns}");
            }
        }
        Ok(hosts)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Runs `ip ARGS`; its error output becomes the error.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Why the workload cannot run on this machine, if it cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces and firewall rules)".into());
    }
    for (tool, args) in [("ip", ["-V"]), ("nft", ["--version"])] {
        let works = Command::new(tool)
            .args(args)
            .output()
            .is_ok_and(|out| out.status.success());
        if !works {
            return Some(format!("needs the {tool} program"));
        }
    }
    None
}

/// The processes of the workload, on their hosts.
struct Deployment {
    hosts: Hosts,
    procs: Vec<Proc>,
    /// The echo app the node captures, and the one it leaves alone.
    captured_echo: SocketAddr,
    direct_echo: SocketAddr,
    /// The forward entry on A's loopback.
    forward: SocketAddr,
    server_pid: u32,
    node_pid: u32,
    forward_pid: u32,
}

impl Deployment {
    fn start(bench: &Bench) -> anyhow::Result<Deployment> {
        let hosts = Hosts::create()?;
        let flags = bench.options.child_flags().args();
        let pki = &bench.pki;
        let mut procs = Vec::new();
        let mut echo_app = |name: &str| -> anyhow::Result<SocketAddr> {
            let args = strings(&["bench", "apps", "--log", "warn", "--ip"]);
            let args = [args, vec![HOST_B.to_string()]].concat();
            let mut proc = Proc::spawn_in(Some(&hosts.b), name, &args)?;
            let line = proc.next_line(START_LIMIT)?;
            let (_, echoes) = crate::apps::parse_ports(&line)
                .with_context(|| format!("{name} printed {line:?}, not their ports"))?;
            procs.push(proc);
            Ok(echoes[0])
        };
        let captured_echo = echo_app("target apps (captured)")?;
        let direct_echo = echo_app("target apps (direct)")?;

        let server_addr = SocketAddr::new(IpAddr::V4(HOST_B), HBONE_PORT);
        let mut args = strings(&["server", "--listen", &server_addr.to_string()]);
        args.extend(strings(&["--allow-target", &format!("{HOST_B}/32")]));
        push_path(&mut args, "--identity-dir", &pki.server_dir);
        args.extend(flags.iter().cloned());
        let mut server = Proc::spawn_in(Some(&hosts.b), "hbone server (capture)", &args)?;
        server.wait_ready(START_LIMIT)?;
        let server_pid = server.pid();
        procs.push(server);

        let server_id = pki.server_id.as_str();
        let mut args = strings(&["forward", "--listen", "127.0.0.1:0"]);
        push_path(&mut args, "--identity-dir", &pki.client_dir);
        args.extend(strings(&["--server", &server_addr.to_string()]));
        args.extend(strings(&["--server-id", server_id]));
        args.extend(strings(&["--target", &captured_echo.to_string()]));
        args.extend(flags.iter().cloned());
        let mut forward = Proc::spawn_in(Some(&hosts.a), "hbone forward (capture)", &args)?;
        let forward_addr = forward.wait_ready(START_LIMIT)?;
        let forward_pid = forward.pid();
        procs.push(forward);

        let mut args = strings(&["node", "--listen", CAPTURE_LISTEN]);
        push_path(&mut args, "--identity-dir", &pki.client_dir);
        args.extend(strings(&[
            "--mesh",
            &format!("{HOST_B}/32:{}", captured_echo.port()),
            "--peer",
            &format!("{HOST_B}/32={server_id}"),
        ]));
        args.extend(flags.iter().cloned());
        let mut node = Proc::spawn_in(Some(&hosts.a), "hbone node", &args)?;
        node.wait_ready(START_LIMIT)?;
        let node_pid = node.pid();
        procs.push(node);

        Ok(Deployment {
            hosts,
            procs,
            captured_echo,
            direct_echo,
            forward: forward_addr,
            server_pid,
            node_pid,
            forward_pid,
        })
    }

    /// Where the load generator connects for `path`, and the proxies that
    /// carry it (none direct).
    fn route(&self, path: CapturePath) -> (Route, Vec<u32>) {
        match path {
            CapturePath::Direct => (Route::direct(self.direct_echo), Vec::new()),
            CapturePath::Forward => (
                Route::direct(self.forward),
                vec![self.forward_pid, self.server_pid],
            ),
            CapturePath::Captured => (
                Route::direct(self.captured_echo),
                vec![self.node_pid, self.server_pid],
            ),
        }
    }
}

impl Bench<'_> {
    /// Request/response and connection rate through the node and through
    /// a forward entry, with direct TCP between the hosts as baseline.
    pub(super) fn capture(&mut self) -> anyhow::Result<()> {
        if let Some(why) = unavailable() {
            eprintln!("hbone bench: capture skipped: {why}");
            self.capture.skipped = Some(why);
            return Ok(());
        }
        let mut deployment = Deployment::start(self).context("cannot set up the capture hosts")?;
        let result = self.capture_runs(&mut deployment);
        let mut logged: Vec<String> = deployment
            .procs
            .iter()
            .filter_map(Proc::problem_summary)
            .collect();
        self.logged.append(&mut logged);
        drop(deployment);
        result
    }

    fn capture_runs(&mut self, deployment: &mut Deployment) -> anyhow::Result<()> {
        for run in 1..=self.options.runs {
            let mut line = Vec::new();
            for path in CapturePath::ALL {
                let fields = self.capture_load(deployment, path, Workload::ReqResp)?;
                let (fields, cpu) = fields;
                let round_trips = RoundTrips::from(&fields)?;
                self.capture
                    .push(CaptureFigure::ReqRate, path, round_trips.rate);
                self.capture
                    .push(CaptureFigure::ReqP50, path, round_trips.p50);
                self.capture
                    .push(CaptureFigure::ReqP99, path, round_trips.p99);
                if let Some(cpu) = cpu {
                    self.capture.push(CaptureFigure::ReqCpu, path, cpu);
                }
                line.push(format!("{}: {round_trips}", path.label()));
            }
            self.progress_as("capture, 1 KiB req/resp", run, &line.join("; "));
            let mut line = Vec::new();
            for path in CapturePath::ALL {
                let (fields, cpu) = self.capture_load(deployment, path, Workload::Connect)?;
                let rate = conn_rate(&fields)?;
                self.capture.push(CaptureFigure::ConnRate, path, rate);
                if let Some(cpu) = cpu {
                    self.capture.push(CaptureFigure::ConnCpu, path, cpu);
                }
                line.push(format!("{}: {}/s", path.label(), number(rate)));
            }
            self.progress_as("capture, new connections", run, &line.join("; "));
        }
        Ok(())
    }

    /// One run of `workload` over `path` from host A, with the CPU of its
    /// proxies per unit of work (none direct).
    fn capture_load(
        &mut self,
        deployment: &mut Deployment,
        path: CapturePath,
        workload: Workload,
    ) -> anyhow::Result<(crate::wire::Fields, Option<f64>)> {
        let (route, pids) = deployment.route(path);
        let meter = match pids.is_empty() {
            true => None,
            false => Some(Meter::start(&pids, &mut self.syscalls, false, &self.dir)?),
        };
        let mut watched: Vec<&mut Proc> = deployment.procs.iter_mut().collect();
        let fields = run_load_in(
            Some(&deployment.hosts.a),
            self.options,
            workload,
            path.label(),
            route,
            &[],
            &mut watched,
        )?;
        let cpu = match meter {
            Some(meter) => {
                let usage = meter.finish(&mut self.syscalls)?;
                Some(usage.per(units(workload, &fields)?).cpu_us)
            }
            None => None,
        };
        Ok((fields, cpu))
    }
}
