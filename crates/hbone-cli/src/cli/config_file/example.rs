//! The commented example file, generated from the schema.

use std::fmt::Write as _;

use clap::Command;

use super::schema::{Key, Schema, Shape, ValueKind};

/// Example values for fields without a default, as a user would write them.
pub(super) fn sample(name: &str) -> Option<&'static str> {
    Some(match name {
        "log" => "info,hbone=debug",
        "threads" => "4",
        "admin" => "127.0.0.1:15000",
        "identity-dir" => "/etc/hbone/certs",
        "cert" => "/etc/hbone/certs/cert.pem",
        "key" => "/etc/hbone/certs/key.pem",
        "trust-bundle" => "/etc/hbone/certs/bundle.pem",
        "istio-ca" => "istiod.istio-system.svc:15012",
        "istio-ca-root" => "/etc/hbone/istio/root-cert.pem",
        "istio-ca-name" => "istiod.istio-system.svc",
        "token-file" => "/var/run/secrets/tokens/istio-token",
        "cluster-id" => "Kubernetes",
        "id" => "spiffe://cluster.local/ns/web/sa/web",
        "workload-api" => "unix:///run/spire/agent.sock",
        "federated-bundle" => "partner.example=/etc/hbone/partner-bundle.pem",
        "identity-out" => "/run/hbone/identity",
        "crl" => "/etc/hbone/certs/crl.pem",
        "allow-target" => "10.0.0.0/8:80-443",
        "allow-id" => "spiffe://cluster.local/ns/web/*",
        "policy" => "/etc/hbone/policy.toml",
        "allow-source" => "10.1.0.0/16",
        "socks5-credentials" => "/etc/hbone/socks5-users",
        "routes" => "/etc/hbone/routes.toml",
        "services" => "/etc/hbone/services.toml",
        "tunnel-idle-timeout" => "1h",
        "cluster" => "east",
        "workload" => "deployment/web",
        "app" => "web",
        "app-version" => "v1",
        "server-id" => "spiffe://cluster.local/ns/demo/sa/server",
        "server" => "10.0.0.2:15008",
        "gateway" => "10.0.0.9:15008",
        "gateway-id" => "spiffe://cluster.local/ns/istio-system/sa/gateway",
        "service" => "echo.demo.svc.cluster.local:8080",
        "network" => "east-net",
        "listen" => "127.0.0.1:8080",
        "target" => "127.0.0.1:80",
        "mesh" => "10.0.2.0/24",
        "peer" => "10.0.2.0/24=spiffe://cluster.local/ns/db/sa/db",
        // Within the peer sample, so that uncommenting it starts.
        "remote" => {
            "10.0.2.0/24=192.0.2.10:15008,spiffe://cluster.local/ns/istio-system/sa/east-gateway"
        }
        "protect" => "8080",
        _ => return None,
    })
}

/// The section the example has on: the one a newcomer can run as it is,
/// with the certificate `hbone ca issue` writes.
const ACTIVE: &str = "server";

/// Fields the example sets, besides clap's required ones, so that every
/// section would start; listeners are distinct so they do not collide.
/// Identities are where `hbone ca issue --out` puts them (see the intro
/// and each section's note), relative to the file.
fn preset(kind: &str, name: &str) -> Option<&'static str> {
    match (kind, name) {
        ("server", "identity-dir") => Some("certs/server"),
        ("forward" | "socks5" | "node", "identity-dir") => Some("certs/client"),
        ("gateway", "identity-dir") => Some("certs/gateway"),
        ("forward", "listen") => Some("127.0.0.1:8080"),
        // The [server] of this file: the forward works once uncommented.
        ("forward", "server") => Some("127.0.0.1:15008"),
        ("socks5", "listen") => Some("127.0.0.1:1080"),
        ("gateway", "listen") => Some("[::]:15009"),
        ("gateway", "routes") => Some("routes.toml"),
        ("node", "mesh") => Some("10.0.2.0/24"),
        ("node", "peer") => Some("10.0.2.0/24=spiffe://cluster.local/ns/db/sa/db"),
        _ => None,
    }
}

/// What a commented-out section needs besides uncommenting: words, and
/// the command that makes it.
fn needs(kind: &str) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        "forward" | "socks5" | "node" => (
            "It needs a client identity:",
            "hbone ca issue --ca ca --id spiffe://cluster.local/ns/demo/sa/client --out certs/client",
        ),
        "gateway" => (
            "It needs a routes file (see hbone gateway --help) and an identity:",
            "hbone ca issue --ca ca --id spiffe://cluster.local/ns/istio-system/sa/gateway --out certs/gateway",
        ),
        _ => return None,
    })
}

/// How a field appears in the example.
enum Line {
    Set(String),
    Default(String),
    Sample(String),
}

fn example_line(kind: &str, key: &Key, cmd: &Command) -> Line {
    let value = |text: &str| toml_value(key, &key.kind(cmd), &[text.to_owned()]);
    if let Some(text) = preset(kind, &key.name) {
        return Line::Set(value(text));
    }
    let sample = sample(&key.name);
    if key.is_required() {
        return Line::Set(value(sample.unwrap_or("VALUE")));
    }
    let defaults = key.defaults();
    if !defaults.is_empty() {
        return Line::Default(toml_value(key, &key.kind(cmd), &defaults));
    }
    let placeholder = key.value_name().unwrap_or_else(|| "VALUE".into());
    Line::Sample(value(sample.unwrap_or(&placeholder)))
}

/// The TOML for `values` of `key`: bare booleans and integers, quoted
/// strings, an array for a repeatable field.
pub(super) fn toml_value(key: &Key, kind: &ValueKind, values: &[String]) -> String {
    let one = |text: &String| match kind {
        ValueKind::Boolean | ValueKind::Integer => text.clone(),
        _ => toml::Value::String(text.clone()).to_string(),
    };
    match key.shape {
        Shape::Many => format!(
            "[{}]",
            values.iter().map(one).collect::<Vec<_>>().join(", ")
        ),
        _ => values.first().map(one).unwrap_or_default(),
    }
}

/// clap drops the final period of a one-line help; comments read better
/// with it.
pub(super) fn sentence(text: &str) -> String {
    let text = text.trim();
    if text.is_empty() || text.ends_with(['.', '?', '!']) {
        text.to_owned()
    } else {
        format!("{text}.")
    }
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Fields to set come first, then the rest in `--help` order.
fn write_fields(out: &mut String, kind: &str, keys: &[Key], cmd: &Command) {
    let mut lines: Vec<(&Key, Line)> = keys
        .iter()
        .map(|key| (key, example_line(kind, key, cmd)))
        .collect();
    lines.sort_by_key(|(_, line)| !matches!(line, Line::Set(_)));
    for (key, line) in lines {
        out.push('\n');
        for text in wrap(&sentence(&key.help()), 76) {
            let _ = writeln!(out, "# {text}");
        }
        let _ = match line {
            Line::Set(value) => writeln!(out, "{} = {value}", key.name),
            Line::Default(value) => writeln!(out, "# {} = {value}  # default", key.name),
            Line::Sample(value) => writeln!(out, "# {} = {value}", key.name),
        };
    }
}

/// A complete, commented config: every field with its help, defaults and
/// examples commented out, and what each section needs set. Only
/// [`ACTIVE`] is on; every other section is there commented out, line by
/// line, so that removing one `# ` from each of its lines turns it on.
pub(in crate::cli) fn example() -> String {
    example_for(&Schema::cli())
}

pub(super) fn example_for(schema: &Schema) -> String {
    let mut out = format!(
        "# hbone configuration file (TOML).
#
#   hbone run --config hbone.toml      runs every section that is on
#   hbone config check hbone.toml      validates it and lists what would run
#
# Only [{ACTIVE}] is on. The other sections are commented out: to add one,
# remove the \"# \" that starts each of its lines. To run the [{ACTIVE}] as it
# is, create a development CA and its certificate in this file's directory:
#
#   hbone ca init --out ca
#   hbone ca issue --ca ca --id spiffe://cluster.local/ns/demo/sa/server --out certs/server
#
# Each field is the command-line flag of the same name without its \"--\", and
# takes the same values. Flags given on the command line override the file.
# Relative paths are relative to this file's directory. Commented-out lines
# show defaults (marked) and example values.
#
# ---- Top level: for the whole process ----
"
    );
    write_fields(&mut out, "", &schema.globals, &schema.top_level);
    for section in &schema.sections {
        let about = section
            .cmd
            .get_about()
            .map(|a| sentence(&a.to_string()))
            .unwrap_or_default();
        let repeat = if section.repeats {
            format!(" Repeat [[{}]] for more.", section.kind)
        } else {
            String::new()
        };
        let _ = writeln!(out, "\n# ---- {}: {about}{repeat} ----", section.header());
        let mut body = format!("{}\n", section.header());
        write_fields(&mut body, section.kind, &section.keys, &section.cmd);
        if section.kind == ACTIVE {
            out.push_str(&body);
            continue;
        }
        if let Some((needed, command)) = needs(section.kind) {
            for text in wrap(needed, 76) {
                let _ = writeln!(out, "# {text}");
            }
            let _ = writeln!(out, "#   {command}");
        }
        let note = "Commented out: to use it, remove one \"# \" from each line below, \
                    down to the next \"# ----\" line.";
        for text in wrap(note, 76) {
            let _ = writeln!(out, "# {text}");
        }
        out.push_str(&comment_out(&body));
    }
    out
}

/// `text` with every line commented out by one `# `; blank lines stay
/// blank.
fn comment_out(text: &str) -> String {
    text.lines()
        .map(|line| match line {
            "" => "\n".to_owned(),
            line => format!("# {line}\n"),
        })
        .collect()
}

#[cfg(test)]
pub(super) fn commented_samples() -> Vec<(String, String, String)> {
    // (section kind, field, TOML value) for every commented-out line.
    let schema = Schema::cli();
    let mut all = Vec::new();
    let mut collect = |kind: &str, keys: &[Key], cmd: &Command| {
        for key in keys {
            if let Line::Default(v) | Line::Sample(v) = example_line(kind, key, cmd) {
                all.push((kind.to_owned(), key.name.clone(), v));
            }
        }
    };
    collect("", &schema.globals, &schema.top_level);
    for section in &schema.sections {
        collect(section.kind, &section.keys, &section.cmd);
    }
    all
}

/// Fields whose example line would fall back to a placeholder.
#[cfg(test)]
pub(super) fn missing_samples() -> Vec<String> {
    let schema = Schema::cli();
    let keys = schema.globals.iter().map(|k| ("", k)).chain(
        schema
            .sections
            .iter()
            .flat_map(|s| s.keys.iter().map(|k| (s.kind, k))),
    );
    keys.filter(|(kind, key)| {
        preset(kind, &key.name).is_none()
            && key.defaults().is_empty()
            && key.shape != Shape::Switch
            && sample(&key.name).is_none()
    })
    .map(|(kind, key)| format!("{kind} {}", key.name))
    .collect()
}
