//! The deployment files under `deploy/` agree with the binary: every
//! Kubernetes manifest parses; containers running hbone use subcommands and
//! flags that exist; probes, scrape annotations and container ports match
//! the admin and listen addresses hbone is given; grace periods outlast the
//! drain; the hbone configs pass `hbone config check`; and the systemd unit
//! starts, stops and reloads hbone as it expects.
//!
//! Configs are checked with their certificate paths pointed at a temporary
//! identity from `hbone ca`, since the real files exist only where deployed.
//! Three tests need `hbone run`, `hbone config check` and the
//! `--admin` flag: `hbone_containers_use_real_subcommands_and_flags`,
//! `hbone_configs_in_config_maps_pass_config_check` and
//! `systemd_unit_runs_a_real_subcommand_with_a_valid_config`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_hbone");

/// Sections of an hbone config file, each named after its subcommand.
const SECTIONS: [&str; 4] = ["server", "gateway", "forward", "socks5"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

// ---------------------------------------------------------------------------
// The binary: its subcommands, flags, defaults and duration syntax.

fn hbone(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// `hbone <path> --help`, which must succeed.
fn help(path: &[&str]) -> String {
    let mut args = path.to_vec();
    args.push("--help");
    let output = hbone(&args);
    assert!(
        output.status.success(),
        "`hbone {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The lines of one section of a help text ("Commands:", "Options:"), up
/// to the blank line that ends it.
fn help_section<'a>(help: &'a str, title: &str) -> impl Iterator<Item = &'a str> {
    help.lines()
        .skip_while(move |line| line.trim() != title)
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
}

fn subcommands() -> BTreeSet<String> {
    help_section(&help(&[]), "Commands:")
        .filter(|line| line.starts_with("  ") && !line.starts_with("   "))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The long flag an option line of a help text defines
/// ("  -h, --help", "      --listen <LISTEN>"), if it is one.
fn option_flag(line: &str) -> Option<&str> {
    let line = line.trim_start();
    let line = match line.strip_prefix('-') {
        Some(rest) if !rest.starts_with('-') => rest.split_once(", ")?.1,
        _ => line,
    };
    let flag = line.strip_prefix("--")?;
    let end = flag
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .unwrap_or(flag.len());
    Some(&flag[..end])
}

/// The long flags (without `--`) in the given sections of a help text.
fn flags_under(help: &str, titles: &[&str]) -> BTreeSet<String> {
    titles
        .iter()
        .flat_map(|title| help_section(help, title).filter_map(option_flag))
        .map(str::to_owned)
        .collect()
}

/// The flags `hbone <subcommand>` accepts: its own ("Options:") and
/// those about the whole process that apply to it ("Global options:").
fn flags_of(subcommand: &str) -> BTreeSet<String> {
    flags_under(&help(&[subcommand]), &["Options:", "Global options:"])
}

/// The `[default: X]` that `hbone <subcommand> --help` gives for `--flag`.
fn default_of(subcommand: &str, flag: &str) -> Option<String> {
    let help = help(&[subcommand]);
    let mut lines = help_section(&help, "Options:").skip_while(|l| option_flag(l) != Some(flag));
    let first = lines.next()?;
    let rest = lines.take_while(|l| option_flag(l).is_none());
    let text: Vec<&str> = std::iter::once(first).chain(rest).collect();
    let text = text.join(" ");
    let start = text.find("[default: ")? + "[default: ".len();
    // The value may hold brackets itself ("[::]:15008").
    let mut depth = 1;
    let end = start
        + text[start..].find(|c| {
            depth += match c {
                '[' => 1,
                ']' => -1,
                _ => 0,
            };
            depth == 0
        })?;
    Some(text[start..end].to_owned())
}

/// hbone's duration syntax: `500ms`, `25s`, `2m`, `1h`, or bare seconds.
fn hbone_duration(text: &str) -> Duration {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .unwrap_or_else(|_| panic!("bad duration {text:?}"));
    match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => panic!("bad duration {text:?}"),
    }
}

/// The port of an `ip:port` address as hbone takes it.
fn port_of(addr: &str) -> u16 {
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr:?} is not ip:port: {e}"))
        .port()
}

/// A CA and one identity (cert.pem, key.pem, bundle.pem) made by
/// `hbone ca`, in `dir/identity`.
fn temp_identity(dir: &Path) -> PathBuf {
    let ca = dir.join("ca");
    let identity = dir.join("identity");
    for args in [
        vec!["ca", "init", "--out", ca.to_str().unwrap()],
        vec![
            "ca",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--id",
            "spiffe://cluster.local/ns/deploy/sa/test",
            "--out",
            identity.to_str().unwrap(),
        ],
    ] {
        let output = hbone(&args);
        assert!(
            output.status.success(),
            "hbone {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    identity
}

/// `config` with every identity pointed at `identity`, keeping the form it
/// had (a directory, or cert/key/trust-bundle files): the files it names
/// exist only where it is deployed.
fn with_identity(mut config: toml::Table, identity: &Path) -> toml::Table {
    let file = |name: &str| toml::Value::String(identity.join(name).to_str().unwrap().to_owned());
    let mut tables: Vec<&mut toml::Table> = Vec::new();
    for (name, value) in config.iter_mut() {
        if !SECTIONS.contains(&name.as_str()) {
            continue;
        }
        match value {
            toml::Value::Table(table) => tables.push(table),
            toml::Value::Array(array) => {
                tables.extend(array.iter_mut().filter_map(toml::Value::as_table_mut))
            }
            _ => {}
        }
    }
    for table in tables {
        if table.contains_key("identity-dir") {
            table.insert(
                "identity-dir".into(),
                toml::Value::String(identity.to_str().unwrap().to_owned()),
            );
        }
        for (key, name) in [
            ("cert", "cert.pem"),
            ("key", "key.pem"),
            ("trust-bundle", "bundle.pem"),
        ] {
            if table.contains_key(key) {
                table.insert(key.into(), file(name));
            }
        }
    }
    config
}

/// `hbone config check` on `config` (from `origin`), its identity replaced
/// by a temporary one.
fn assert_config_checks(origin: &str, config: &toml::Table) {
    let dir = tempfile::tempdir().unwrap();
    let identity = temp_identity(dir.path());
    let file = dir.path().join("hbone.toml");
    let text = toml::to_string(&with_identity(config.clone(), &identity)).unwrap();
    std::fs::write(&file, &text).unwrap();
    let output = hbone(&["config", "check", file.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{origin}: `hbone config check` refused it:\n{}{}\n--- as checked:\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

/// Every key of an hbone config is a flag: top-level keys of the root
/// command, section keys of that section's subcommand.
fn assert_config_keys_are_flags(origin: &str, config: &toml::Table) {
    // `hbone run` takes every flag about the whole process.
    let global = flags_under(&help(&["run"]), &["Global options:"]);
    for (name, value) in config {
        if !SECTIONS.contains(&name.as_str()) {
            assert!(
                global.contains(name),
                "{origin}: top-level key {name:?} is not a global option of hbone run"
            );
            continue;
        }
        let flags = flags_of(name);
        let tables: Vec<&toml::Table> = match value {
            toml::Value::Table(table) => vec![table],
            toml::Value::Array(array) => array.iter().filter_map(toml::Value::as_table).collect(),
            _ => panic!("{origin}: [{name}] must be a table"),
        };
        for table in tables {
            for key in table.keys() {
                assert!(
                    flags.contains(key),
                    "{origin}: [{name}] key {key:?} is not a flag of `hbone {name}`"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// What an hbone process is told, from its flags and its config file.

/// The flags of an argument list: `--name value`, `--name=value`, or a
/// bare `--name` (followed by another flag or nothing).
fn parse_flags(args: &[String]) -> Vec<(String, Option<String>)> {
    let mut flags = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if let Some(flag) = args[i].strip_prefix("--") {
            if let Some((name, value)) = flag.split_once('=') {
                flags.push((name.to_owned(), Some(value.to_owned())));
            } else if args.get(i + 1).is_some_and(|next| !next.starts_with("--")) {
                flags.push((flag.to_owned(), Some(args[i + 1].clone())));
                i += 1;
            } else {
                flags.push((flag.to_owned(), None));
            }
        }
        i += 1;
    }
    flags
}

/// The settings the deployment files must agree on.
#[derive(Debug, Default)]
struct Settings {
    /// `--admin` or the config's `admin`; None when not given.
    admin: Option<String>,
    /// The server's (or else the gateway's) listen address, if given.
    listen: Option<String>,
    /// Every drain timeout given (server and gateway).
    drain_timeouts: Vec<Duration>,
    /// Which subcommand serves HBONE, for the defaults.
    serving: Option<String>,
}

impl Settings {
    fn from_flags(subcommand: &str, flags: &[(String, Option<String>)]) -> Self {
        let value = |name: &str| {
            flags
                .iter()
                .rev()
                .find(|(flag, _)| flag == name)
                .and_then(|(_, value)| value.clone())
        };
        let serving = ["server", "gateway"].contains(&subcommand);
        Settings {
            admin: value("admin"),
            listen: value("listen").filter(|_| serving),
            drain_timeouts: value("drain-timeout")
                .map(|d| hbone_duration(&d))
                .into_iter()
                .collect(),
            serving: serving.then(|| subcommand.to_owned()),
        }
    }

    fn from_config(config: &toml::Table) -> Self {
        let string = |table: &toml::Table, key: &str| {
            table.get(key).map(|v| match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        };
        let mut settings = Settings {
            admin: string(config, "admin"),
            ..Settings::default()
        };
        for section in ["gateway", "server"] {
            let Some(table) = config.get(section).and_then(toml::Value::as_table) else {
                continue;
            };
            // The server's listen address wins over the gateway's.
            settings.listen = string(table, "listen").or(settings.listen);
            settings.serving = Some(section.to_owned());
            if let Some(drain) = string(table, "drain-timeout") {
                settings.drain_timeouts.push(hbone_duration(&drain));
            }
        }
        settings
    }

    /// The drain timeout that matters: the longest given, or the default.
    fn drain_timeout(&self) -> Duration {
        self.drain_timeouts
            .iter()
            .copied()
            .max()
            .unwrap_or_else(|| {
                let serving = self.serving.as_deref().unwrap_or("server");
                hbone_duration(&default_of(serving, "drain-timeout").expect("drain default"))
            })
    }

    /// The port tunnels arrive on: the one given, or the default.
    fn listen_port(&self) -> u16 {
        let serving = self.serving.as_deref().unwrap_or("server");
        let listen = self
            .listen
            .clone()
            .or_else(|| default_of(serving, "listen"))
            .expect("listen default");
        port_of(&listen)
    }
}

// ---------------------------------------------------------------------------
// The Kubernetes manifests.

struct Doc {
    file: String,
    value: Value,
}

fn manifests() -> Vec<Doc> {
    let dir = deploy_dir().join("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, document) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{file}: document {i} is not valid YAML: {e}"));
            if !value.is_null() {
                docs.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    docs
}

fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// A pod template (or pod) and where it comes from.
struct Pod<'a> {
    origin: String,
    namespace: &'a str,
    /// The template's metadata.
    metadata: &'a Value,
    spec: &'a Value,
}

fn pods(docs: &[Doc]) -> Vec<Pod<'_>> {
    let mut pods = Vec::new();
    for doc in docs {
        let v = &doc.value;
        let kind = str_of(&v["kind"]);
        let (metadata, spec) = match kind {
            "Pod" => (&v["metadata"], &v["spec"]),
            "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job" => (
                &v["spec"]["template"]["metadata"],
                &v["spec"]["template"]["spec"],
            ),
            _ => continue,
        };
        pods.push(Pod {
            origin: format!("{} {kind}/{}", doc.file, str_of(&v["metadata"]["name"])),
            namespace: v["metadata"]["namespace"].as_str().unwrap_or("default"),
            metadata,
            spec,
        });
    }
    pods
}

fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .filter_map(|key| spec[key].as_array())
        .flatten()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| items.iter().map(|s| str_of(s).to_owned()).collect())
        .unwrap_or_default()
}

/// A container running hbone, with the arguments after the binary.
struct HboneContainer<'a> {
    origin: String,
    pod: &'a Pod<'a>,
    container: &'a Value,
    argv: Vec<String>,
}

fn is_hbone_binary(path: &str) -> bool {
    path == "hbone" || path.ends_with("/hbone")
}

fn hbone_containers<'a>(pods: &'a [Pod<'a>]) -> Vec<HboneContainer<'a>> {
    let mut found = Vec::new();
    for pod in pods {
        for container in containers(pod.spec) {
            let image = str_of(&container["image"]);
            let repository = image.rsplit('/').next().unwrap_or_default();
            let repository = repository.split([':', '@']).next().unwrap_or_default();
            let command = strings(&container["command"]);
            let runs_hbone = match command.first() {
                Some(binary) => is_hbone_binary(binary),
                None => repository == "hbone",
            };
            if !runs_hbone {
                continue;
            }
            let mut argv: Vec<String> = command.into_iter().skip(1).collect();
            argv.extend(strings(&container["args"]));
            found.push(HboneContainer {
                origin: format!("{} container {}", pod.origin, str_of(&container["name"])),
                pod,
                container,
                argv,
            });
        }
    }
    found
}

/// Finds a document by kind, namespace and name.
fn find<'a>(docs: &'a [Doc], kind: &str, namespace: &str, name: &str) -> Option<&'a Value> {
    docs.iter().map(|d| &d.value).find(|v| {
        str_of(&v["kind"]) == kind
            && v["metadata"]["namespace"].as_str().unwrap_or("default") == namespace
            && str_of(&v["metadata"]["name"]) == name
    })
}

impl HboneContainer<'_> {
    fn subcommand(&self) -> &str {
        self.argv.first().map(String::as_str).unwrap_or_default()
    }

    fn flags(&self) -> Vec<(String, Option<String>)> {
        parse_flags(&self.argv[1.min(self.argv.len())..])
    }

    /// The hbone config file `--config` names, read from the ConfigMap
    /// mounted there.
    fn config(&self, docs: &[Doc]) -> Option<toml::Table> {
        let path = self
            .flags()
            .into_iter()
            .find(|(flag, _)| flag == "config")?
            .1
            .unwrap_or_else(|| panic!("{}: --config without a file", self.origin));
        let mounts = self.container["volumeMounts"].as_array();
        let (mount, key) = mounts
            .into_iter()
            .flatten()
            .find_map(|mount| {
                let at = str_of(&mount["mountPath"]).trim_end_matches('/');
                match mount["subPath"].as_str() {
                    Some(sub) if at == path => Some((mount, sub.to_owned())),
                    Some(_) => None,
                    None => path
                        .strip_prefix(at)
                        .and_then(|rest| rest.strip_prefix('/'))
                        .map(|rest| (mount, rest.to_owned())),
                }
            })
            .unwrap_or_else(|| panic!("{}: nothing is mounted at {path}", self.origin));
        let volume_name = str_of(&mount["name"]);
        let volume = self.pod.spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| str_of(&v["name"]) == volume_name)
            .unwrap_or_else(|| panic!("{}: no volume {volume_name}", self.origin));
        let config_map = &volume["configMap"];
        assert!(
            config_map.is_object(),
            "{}: {path} should come from a ConfigMap",
            self.origin
        );
        // With `items`, the file name maps back to a key.
        let key = config_map["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| str_of(&i["path"]) == key))
            .map(|item| str_of(&item["key"]).to_owned())
            .unwrap_or(key);
        let name = str_of(&config_map["name"]);
        let found = find(docs, "ConfigMap", self.pod.namespace, name)
            .unwrap_or_else(|| panic!("{}: ConfigMap {name} is not in deploy/", self.origin));
        let text = found["data"][&key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: ConfigMap {name} has no key {key}", self.origin));
        Some(
            toml::from_str(text)
                .unwrap_or_else(|e| panic!("{}: {path} is not TOML: {e}", self.origin)),
        )
    }

    fn settings(&self, docs: &[Doc]) -> Settings {
        let from_flags = Settings::from_flags(self.subcommand(), &self.flags());
        match self.config(docs) {
            // Flags given beside --config are global ones.
            Some(config) => {
                let mut settings = Settings::from_config(&config);
                settings.admin = from_flags.admin.or(settings.admin);
                settings
            }
            None => from_flags,
        }
    }

    /// The containerPort a probe or Service port refers to (number or name).
    fn resolve_port(&self, port: &Value) -> Option<u16> {
        if let Some(n) = port.as_u64() {
            return u16::try_from(n).ok();
        }
        let name = port.as_str()?;
        if let Ok(n) = name.parse() {
            return Some(n);
        }
        self.ports().get(name).copied()
    }

    /// Declared container ports by name ("" for unnamed ones).
    fn ports(&self) -> BTreeMap<String, u16> {
        self.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let port = p["containerPort"].as_u64().expect("containerPort");
                (str_of(&p["name"]).to_owned(), u16::try_from(port).unwrap())
            })
            .collect()
    }
}

/// The hbone containers of the manifests; both files must have one.
fn k8s_hbone<'a>(pods: &'a [Pod<'a>]) -> Vec<HboneContainer<'a>> {
    let found = hbone_containers(pods);
    let files: BTreeSet<&str> = found
        .iter()
        .map(|c| c.origin.split(' ').next().unwrap())
        .collect();
    for file in ["sidecar.yaml", "daemonset.yaml"] {
        assert!(files.contains(file), "no hbone container found in {file}");
    }
    found
}

#[test]
fn every_manifest_parses_and_names_its_objects() {
    let docs = manifests();
    for doc in &docs {
        let v = &doc.value;
        for field in ["apiVersion", "kind"] {
            assert!(
                v[field].is_string(),
                "{}: a document lacks {field}",
                doc.file
            );
        }
        assert!(
            v["metadata"]["name"].is_string(),
            "{}: a {} has no metadata.name",
            doc.file,
            str_of(&v["kind"])
        );
    }
    let kinds: BTreeSet<&str> = docs.iter().map(|d| str_of(&d.value["kind"])).collect();
    for kind in [
        "Deployment",
        "DaemonSet",
        "Service",
        "ConfigMap",
        "ServiceAccount",
        "Namespace",
    ] {
        assert!(kinds.contains(kind), "no {kind} in deploy/kubernetes");
    }
    assert!(
        find(&docs, "Namespace", "default", "hbone-system").is_some(),
        "the DaemonSet's namespace hbone-system is declared"
    );
}

/// Needs `hbone run` and the `--admin` flag (and, for config keys,
/// the top-level `admin` key) from the main branch.
#[test]
fn hbone_containers_use_real_subcommands_and_flags() {
    let docs = manifests();
    let pods = pods(&docs);
    let subcommands = subcommands();
    for container in k8s_hbone(&pods) {
        let origin = &container.origin;
        let subcommand = container.subcommand();
        assert!(
            subcommands.contains(subcommand),
            "{origin}: {subcommand:?} is not an hbone subcommand (have {subcommands:?})"
        );
        let known = flags_of(subcommand);
        for (flag, _) in container.flags() {
            assert!(
                known.contains(&flag),
                "{origin}: --{flag} is not a flag of `hbone {subcommand}`"
            );
        }
        // The values parse too: clap checks each value as it reads it, and
        // a trailing --help then exits 0 before the run would start.
        let mut args: Vec<&str> = container.argv.iter().map(String::as_str).collect();
        args.push("--help");
        let output = hbone(&args);
        assert!(
            output.status.success(),
            "{origin}: hbone refuses its arguments: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if let Some(config) = container.config(&docs) {
            assert_config_keys_are_flags(origin, &config);
        }
    }
}

#[test]
fn probes_and_scrape_annotations_use_the_admin_port() {
    let docs = manifests();
    let pods = pods(&docs);
    for container in k8s_hbone(&pods) {
        let origin = &container.origin;
        let settings = container.settings(&docs);
        let admin = settings
            .admin
            .clone()
            .filter(|a| a != "off")
            .unwrap_or_else(|| {
                panic!("{origin}: no admin endpoint (--admin or `admin`), yet probes need one")
            });
        let admin_addr: SocketAddr = admin
            .parse()
            .unwrap_or_else(|e| panic!("{origin}: admin {admin:?}: {e}"));
        let admin_port = admin_addr.port();

        let mut probe_ports = Vec::new();
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &container.container[probe]["httpGet"];
            assert!(get.is_object(), "{origin}: no {probe} httpGet");
            assert_eq!(str_of(&get["path"]), path, "{origin}: {probe} path");
            let port = container
                .resolve_port(&get["port"])
                .unwrap_or_else(|| panic!("{origin}: {probe} port {} unknown", get["port"]));
            // The kubelet probes the pod IP unless the probe names a host.
            if admin_addr.ip().is_loopback() {
                let host: std::net::IpAddr = str_of(&get["host"]).parse().unwrap_or_else(|_| {
                    panic!(
                        "{origin}: admin {admin} is loopback-only, but {probe} probes the pod IP"
                    )
                });
                assert!(host.is_loopback(), "{origin}: {probe} host {host}");
            }
            probe_ports.push(port);
        }
        assert_eq!(
            probe_ports,
            [admin_port, admin_port],
            "{origin}: probes must use the admin port ({admin})"
        );
        assert!(
            container.ports().values().any(|&p| p == admin_port),
            "{origin}: admin port {admin_port} is not a declared containerPort"
        );

        let annotations = &container.pod.metadata["annotations"];
        assert_eq!(
            str_of(&annotations["prometheus.io/scrape"]),
            "true",
            "{origin}: prometheus.io/scrape"
        );
        assert_eq!(
            str_of(&annotations["prometheus.io/path"]),
            "/metrics",
            "{origin}: prometheus.io/path"
        );
        assert_eq!(
            str_of(&annotations["prometheus.io/port"]),
            admin_port.to_string(),
            "{origin}: prometheus.io/port must be the admin port"
        );
    }
}

#[test]
fn hbone_container_port_is_the_listen_port() {
    let docs = manifests();
    let pods = pods(&docs);
    for container in k8s_hbone(&pods) {
        let origin = &container.origin;
        let settings = container.settings(&docs);
        assert!(
            settings.serving.is_some(),
            "{origin}: serves no HBONE (no server or gateway)"
        );
        let declared = container.ports();
        let port = declared
            .get("hbone")
            .unwrap_or_else(|| panic!("{origin}: no containerPort named \"hbone\""));
        assert_eq!(
            *port,
            settings.listen_port(),
            "{origin}: the hbone containerPort differs from the listen address {:?}",
            settings.listen
        );
    }
}

#[test]
fn grace_period_outlasts_the_drain() {
    let docs = manifests();
    let pods = pods(&docs);
    for container in k8s_hbone(&pods) {
        let origin = &container.origin;
        let drain = container.settings(&docs).drain_timeout();
        // Kubernetes' default when the field is absent.
        let grace = container.pod.spec["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        assert!(
            Duration::from_secs(grace) > drain,
            "{origin}: terminationGracePeriodSeconds {grace} must exceed the drain timeout {drain:?}"
        );
    }
}

#[test]
fn services_target_declared_container_ports() {
    let docs = manifests();
    let pods = pods(&docs);
    for doc in docs
        .iter()
        .filter(|d| str_of(&d.value["kind"]) == "Service")
    {
        let service = &doc.value;
        let name = str_of(&service["metadata"]["name"]);
        let namespace = service["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let selector = service["spec"]["selector"].as_object().expect("selector");
        let selected: Vec<&Pod> = pods
            .iter()
            .filter(|pod| pod.namespace == namespace)
            .filter(|pod| {
                selector
                    .iter()
                    .all(|(k, v)| pod.metadata["labels"][k] == *v)
            })
            .collect();
        assert!(
            !selected.is_empty(),
            "{}: Service {name} selects no pod",
            doc.file
        );
        for port in service["spec"]["ports"].as_array().expect("ports") {
            let target = if port["targetPort"].is_null() {
                &port["port"]
            } else {
                &port["targetPort"]
            };
            let found = selected.iter().any(|pod| {
                containers(pod.spec)
                    .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                    .any(|p| match target {
                        Value::String(s) => p["name"] == *s,
                        n => p["containerPort"] == *n,
                    })
            });
            assert!(
                found,
                "{}: Service {name} targets port {target}, which its pods do not declare",
                doc.file
            );
        }
    }
}

/// Needs `hbone config check` (and `run`'s config format) from the main branch.
#[test]
fn hbone_configs_in_config_maps_pass_config_check() {
    let docs = manifests();
    let mut checked = 0;
    for doc in docs
        .iter()
        .filter(|d| str_of(&d.value["kind"]) == "ConfigMap")
    {
        let name = str_of(&doc.value["metadata"]["name"]);
        let Some(data) = doc.value["data"].as_object() else {
            continue;
        };
        for (key, text) in data {
            if !key.ends_with(".toml") {
                continue;
            }
            let config: toml::Table = toml::from_str(str_of(text))
                .unwrap_or_else(|e| panic!("{}: ConfigMap {name} {key}: {e}", doc.file));
            if !SECTIONS.iter().any(|s| config.contains_key(*s)) {
                continue; // some other TOML
            }
            assert_config_checks(&format!("{}: ConfigMap {name} {key}", doc.file), &config);
            checked += 1;
        }
    }
    assert!(checked > 0, "no hbone config found in any ConfigMap");
}

// ---------------------------------------------------------------------------
// The systemd unit.

/// The entries of a unit file by section and key, in order.
fn unit() -> BTreeMap<(String, String), Vec<String>> {
    let path = deploy_dir().join("systemd/hbone.service");
    let text = std::fs::read_to_string(path).unwrap();
    let mut entries: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("hbone.service: not key=value: {line:?}"));
        entries
            .entry((section.clone(), key.trim().to_owned()))
            .or_default()
            .push(value.trim().to_owned());
    }
    entries
}

/// The single value of `[Service] key`.
fn service_value(unit: &BTreeMap<(String, String), Vec<String>>, key: &str) -> String {
    let values = unit
        .get(&("Service".to_owned(), key.to_owned()))
        .unwrap_or_else(|| panic!("hbone.service has no {key}="));
    assert_eq!(values.len(), 1, "hbone.service: one {key}= expected");
    values[0].clone()
}

/// ExecStart's arguments after the hbone binary.
fn exec_start_argv(unit: &BTreeMap<(String, String), Vec<String>>) -> Vec<String> {
    let exec = service_value(unit, "ExecStart");
    let exec = exec.trim_start_matches(['-', '@', '+', '!', ':']);
    let mut words = exec.split_whitespace().map(str::to_owned);
    let binary = words.next().expect("ExecStart is empty");
    assert!(
        binary.starts_with('/') && is_hbone_binary(&binary),
        "ExecStart runs {binary}, not an absolute path to hbone"
    );
    words.collect()
}

/// The config file ExecStart names, from deploy/systemd (same file name).
fn unit_config(argv: &[String]) -> (String, toml::Table) {
    let path = parse_flags(argv)
        .into_iter()
        .find(|(flag, _)| flag == "config")
        .and_then(|(_, value)| value)
        .expect("ExecStart has no --config FILE");
    let name = Path::new(&path).file_name().unwrap();
    let local = deploy_dir().join("systemd").join(name);
    let text = std::fs::read_to_string(&local)
        .unwrap_or_else(|e| panic!("{path} should be shipped as {}: {e}", local.display()));
    (path, toml::from_str(&text).expect("hbone.toml is TOML"))
}

/// systemd's time spans: "35s", "90", "1min 30s", "infinity".
fn systemd_duration(text: &str) -> Duration {
    if text == "infinity" {
        return Duration::MAX;
    }
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .unwrap_or_else(|_| panic!("bad time span {text:?}"));
        rest = rest[digits..].trim_start();
        let letters = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let seconds = match &rest[..letters] {
            "" | "s" | "sec" | "second" | "seconds" => n,
            "m" | "min" | "minute" | "minutes" => n * 60,
            "h" | "hr" | "hour" | "hours" => n * 3600,
            "ms" | "msec" => {
                total += Duration::from_millis(n);
                0
            }
            unit => panic!("time span {text:?}: unit {unit:?} not handled here"),
        };
        total += Duration::from_secs(seconds);
        rest = rest[letters..].trim_start();
    }
    total
}

/// Needs `hbone run` and `hbone config check` from the main branch.
#[test]
fn systemd_unit_runs_a_real_subcommand_with_a_valid_config() {
    let unit = unit();
    let argv = exec_start_argv(&unit);
    let subcommand = argv.first().expect("ExecStart has no subcommand");
    assert!(
        subcommands().contains(subcommand),
        "ExecStart: {subcommand:?} is not an hbone subcommand"
    );
    let known = flags_of(subcommand);
    for (flag, _) in parse_flags(&argv[1..]) {
        assert!(
            known.contains(&flag),
            "ExecStart: --{flag} is not a flag of `hbone {subcommand}`"
        );
    }
    let (path, config) = unit_config(&argv);
    assert_config_keys_are_flags(&path, &config);
    assert_config_checks(&path, &config);
}

#[test]
fn systemd_unit_stops_after_the_drain_and_reloads_with_hup() {
    let unit = unit();
    let argv = exec_start_argv(&unit);
    let (path, config) = unit_config(&argv);
    let drain = Settings::from_config(&config).drain_timeout();
    let stop = systemd_duration(&service_value(&unit, "TimeoutStopSec"));
    assert!(
        stop > drain,
        "TimeoutStopSec ({stop:?}) must exceed the drain timeout of {path} ({drain:?})"
    );
    if let Some(signal) = unit.get(&("Service".into(), "KillSignal".into())) {
        assert_eq!(signal, &["SIGTERM"], "SIGTERM is what drains");
    }
    let reload = service_value(&unit, "ExecReload");
    let words: Vec<&str> = reload.split_whitespace().collect();
    assert!(
        words.first().is_some_and(|w| w.ends_with("/kill"))
            && words.iter().any(|w| ["-HUP", "-SIGHUP", "-1"].contains(w))
            && words.last() == Some(&"$MAINPID"),
        "ExecReload should send SIGHUP to $MAINPID, not {reload:?}"
    );
    assert_eq!(service_value(&unit, "Restart"), "on-failure");
    // The config's directory is readable inside the sandbox.
    let dir = Path::new(&path).parent().unwrap().to_str().unwrap();
    let read_only = service_value(&unit, "ReadOnlyPaths");
    assert!(
        read_only.split_whitespace().any(|p| p == dir),
        "ReadOnlyPaths ({read_only}) should list {dir}"
    );
    let nofile: u64 = service_value(&unit, "LimitNOFILE").parse().unwrap();
    assert!(
        nofile >= 65_536,
        "LimitNOFILE {nofile}: two sockets per tunnel end"
    );
}

#[test]
fn helpers_read_help_and_durations() {
    assert!(subcommands().contains("server"));
    let flags = flags_of("server");
    for flag in [
        "listen",
        "drain-timeout",
        "identity-dir",
        "log-format",
        "admin",
        "help",
    ] {
        assert!(flags.contains(flag), "server --help lacks --{flag}");
    }
    assert_eq!(
        default_of("server", "listen").as_deref(),
        Some("[::]:15008")
    );
    assert_eq!(
        hbone_duration(&default_of("server", "drain-timeout").unwrap()),
        Duration::from_secs(30)
    );
    assert_eq!(systemd_duration("1min 30s"), Duration::from_secs(90));
    assert_eq!(systemd_duration("35s"), Duration::from_secs(35));
    assert_eq!(
        parse_flags(&["--a".into(), "1".into(), "--b".into(), "--c=2".into()]),
        [
            ("a".into(), Some("1".into())),
            ("b".into(), None),
            ("c".into(), Some("2".into()))
        ]
    );
}
