//! The commented example and the Markdown reference, both generated from
//! the schema (and the errors by running the parser) so they cannot go
//! stale.

use std::fmt::Write as _;
use std::path::Path;

use clap::Command;

use super::parse_with;
use super::schema::{Key, Schema, SectionSchema, Shape, ValueKind};

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
        "allow-target" => "10.0.0.0/8:80-443",
        "allow-id" => "spiffe://cluster.local/ns/web/*",
        "policy" => "/etc/hbone/policy.toml",
        "routes" => "/etc/hbone/routes.toml",
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
        _ => return None,
    })
}

/// Fields the example sets, besides clap's required ones, so that every
/// section would start; listeners are distinct so they do not collide.
fn preset(kind: &str, name: &str) -> Option<&'static str> {
    match (kind, name) {
        (_, "identity-dir") => sample(name),
        ("forward", "listen") => Some("127.0.0.1:8080"),
        ("forward", "server") => sample(name),
        ("socks5", "listen") => Some("127.0.0.1:1080"),
        ("gateway", "listen") => Some("[::]:15009"),
        _ => None,
    }
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
fn toml_value(key: &Key, kind: &ValueKind, values: &[String]) -> String {
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
fn sentence(text: &str) -> String {
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
/// examples commented out, and what each section needs set.
pub(in crate::cli) fn example() -> String {
    example_for(&Schema::cli())
}

fn example_for(schema: &Schema) -> String {
    let mut out = String::from(
        "# hbone configuration file (TOML).
#
#   hbone run --config hbone.toml      runs every section below in one process
#   hbone config check hbone.toml      validates it and lists what would run
#
# Each field is the command-line flag of the same name without its \"--\", and
# takes the same values. Flags given on the command line override the file.
# Relative paths are relative to this file's directory. Commented-out lines
# show defaults (marked) and example values.
#
# ---- Top level: for the whole process ----
",
    );
    write_fields(&mut out, "", &schema.globals, &schema.root);
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
        let _ = write!(
            out,
            "\n# ---- {}: {about}{repeat} ----\n{}\n",
            section.header(),
            section.header()
        );
        write_fields(&mut out, section.kind, &section.keys, &section.cmd);
    }
    out
}

/// Bad files shown under "Errors" in the docs, with the message the
/// parser gives for each.
pub(super) const ERROR_CASES: &[(&str, &str)] = &[
    (
        "Unknown field, with a suggestion",
        "[server]\nidentity-dir = \"certs\"\nlistne = \"0.0.0.0:15008\"\n",
    ),
    ("Unknown section", "[servre]\nidentity-dir = \"certs\"\n"),
    (
        "Wrong type",
        "[server]\nidentity-dir = \"certs\"\nproxy-protocol = \"yes\"\n",
    ),
    (
        "Bad value",
        "[server]\nidentity-dir = \"certs\"\nlisten = \"nowhere\"\n",
    ),
    (
        "Bad duration",
        "[server]\nidentity-dir = \"certs\"\ndrain-timeout = \"30 seconds\"\n",
    ),
    (
        "An array for a single-valued field",
        "[server]\nidentity-dir = \"certs\"\nlisten = [\"0.0.0.0:15008\", \"[::]:15008\"]\n",
    ),
    (
        "Missing required field",
        "[gateway]\nidentity-dir = \"certs\"\nlisten = \"0.0.0.0:15009\"\n",
    ),
    (
        "Conflicting fields",
        "[server]\nidentity-dir = \"certs\"\ncert = \"certs/cert.pem\"\nkey = \"certs/key.pem\"\ntrust-bundle = \"certs/bundle.pem\"\n",
    ),
    (
        "Conflicting listeners",
        "[server]\nidentity-dir = \"certs\"\n\n[gateway]\nidentity-dir = \"certs\"\nroutes = \"routes.toml\"\n",
    ),
    (
        "A section given twice",
        "[server]\nidentity-dir = \"certs\"\n\n[server]\nlisten = \"0.0.0.0:15009\"\n",
    ),
    (
        "TOML syntax error",
        "[server]\nidentity-dir = \"certs\"\nlisten = 0.0.0.0:15008\n",
    ),
];

/// The message for a bad file, as `hbone config check` prints it.
pub(super) fn error_message(toml: &str) -> String {
    match parse_with(&Schema::cli(), toml, Path::new("hbone.toml")) {
        Ok(_) => "(no error: this case is out of date)".into(),
        Err(e) => format!("error: {e}"),
    }
}

/// A small valid file showing each kind of value; the docs include it and
/// the tests check it.
const VALUES_EXAMPLE: &str = "log-format = \"json\"   # a string
threads = 4            # an integer

[server]
identity-dir = \"certs/server\"                             # a path, relative to this file
listen = \"0.0.0.0:15008\"
drain-timeout = \"1m\"                                      # a duration
max-tunnels = 10000                                       # an integer
proxy-protocol = true                                     # a flag: --proxy-protocol
allow-target = [\"10.0.0.0/8:80-443\", \"192.168.1.0/24\"]   # repeatable: an array
allow-id = \"spiffe://cluster.local/ns/web/*\"              # repeatable: one value is fine

[[forward]]
identity-dir = \"certs/client\"
listen = \"127.0.0.1:8080\"
server = \"10.0.0.2:15008\"
server-id = [\"spiffe://cluster.local/ns/demo/sa/server\"]
target = \"127.0.0.1:80\"

[[forward]]
identity-dir = \"certs/client\"
listen = \"127.0.0.1:5433\"
server = \"10.0.0.3:15008\"
server-id = [\"spiffe://cluster.local/ns/db/sa/postgres\"]
target = \"127.0.0.1:5432\"
";

fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

fn value_cell(key: &Key, kind: &ValueKind) -> String {
    let name = key
        .value_name()
        .map(|n| format!(" `{n}`"))
        .unwrap_or_default();
    match kind {
        ValueKind::Boolean => "boolean".into(),
        ValueKind::Integer => format!("integer{name}"),
        ValueKind::Address => format!("address{name} (IP:PORT)"),
        ValueKind::Duration => "duration".into(),
        ValueKind::Path => format!("path{name}"),
        ValueKind::Choice(choices) => choices
            .iter()
            .map(|c| format!("`\"{c}\"`"))
            .collect::<Vec<_>>()
            .join(" or "),
        ValueKind::Text => format!("string{name}"),
    }
}

fn write_table(out: &mut String, keys: &[Key], cmd: &Command) {
    out.push_str("| Field | Value | Default | Repeatable | Description |\n");
    out.push_str("|---|---|---|---|---|\n");
    for key in keys {
        let kind = key.kind(cmd);
        let defaults = key.defaults();
        let default = if key.is_required() {
            "required".to_owned()
        } else if defaults.is_empty() {
            String::new()
        } else {
            format!("`{}`", toml_value(key, &kind, &defaults))
        };
        let repeatable = if key.shape == Shape::Many { "yes" } else { "" };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {repeatable} | {} |",
            key.name,
            cell(&value_cell(key, &kind)),
            cell(&default),
            cell(&sentence(&key.help()))
        );
    }
}

fn section_intro(section: &SectionSchema) -> String {
    let about = section
        .cmd
        .get_about()
        .map(|a| sentence(&a.to_string()))
        .unwrap_or_default();
    let count = if section.repeats {
        format!("any number of `{}` sections", section.header())
    } else {
        format!("at most one `{}` section", section.header())
    };
    format!(
        "{about} The fields of `hbone {} --help`; a file has {count}.\n\n",
        section.kind
    )
}

/// The whole of docs/config.md.
pub(in crate::cli) fn docs_markdown() -> String {
    let schema = Schema::cli();
    let admin = if schema.global("admin").is_some() {
        ", nor the top-level `admin` address,"
    } else {
        ""
    };
    let mut out = format!(
        "# The configuration file

<!-- Generated by `cargo run -- config docs > docs/config.md`; do not edit. -->

One TOML file describes everything one `hbone` process runs: a server, a
gateway, and any number of forwards and SOCKS5 entries.

```sh
hbone config example > hbone.toml   # a complete, commented starting point
hbone config check hbone.toml       # validate it and list what it would run
hbone run --config hbone.toml       # run it
```

The file mirrors the command line. Top-level fields are the global flags,
and each section holds the flags of one subcommand, with the same names
without the leading `--`, the same values and the same defaults:
`identity-dir = \"certs\"` in `[server]` is `hbone server --identity-dir certs`.

- Flags given on the command line override the file.
- Relative paths in the file are relative to the file's directory, not to
  the working directory.
- Every value is checked as the command line would check it, and each
  section as a whole (required fields, fields that exclude each other); no
  two sections{admin} may listen on the same port. Errors name the file,
  the line, the section and the field.

## Values

- A string for any value: addresses (`\"127.0.0.1:8080\"`, `\"[::]:15008\"`),
  durations (`\"500ms\"`, `\"5s\"`, `\"2m\"`, `\"1h\"`), paths, SPIFFE IDs.
- An integer wherever a number is expected (any field takes one, as its
  decimal text).
- `true` or `false` for a flag without a value: `proxy-protocol = true` is
  `--proxy-protocol`, `false` leaves it out.
- An array for a repeatable flag: `allow-target = [\"10.0.0.0/8\", \"192.168.1.0/24\"]`
  is `--allow-target 10.0.0.0/8 --allow-target 192.168.1.0/24`; a single
  value is also accepted. Other fields refuse arrays.

```toml
"
    );
    out.push_str(VALUES_EXAMPLE);
    out.push_str("```\n\n## Fields\n\n### Top level\n\nFor the whole process.\n\n");
    write_table(&mut out, &schema.globals, &schema.root);
    for section in &schema.sections {
        let _ = write!(
            out,
            "\n### `{}`\n\n{}",
            section.header(),
            section_intro(section)
        );
        write_table(&mut out, &section.keys, &section.cmd);
    }
    let _ = write!(
        out,
        "\n## Example\n\nThe output of `hbone config example`: every field, with defaults and \
         examples commented out.\n\n```toml\n{}```\n",
        example_for(&schema)
    );
    out.push_str(
        "\n## Errors\n\nEach error is one line. These are the messages `hbone config check hbone.toml` \
         gives for these files.\n",
    );
    for (title, toml) in ERROR_CASES {
        let _ = write!(
            out,
            "\n### {title}\n\n```toml\n{toml}```\n\n```text\n{}\n```\n",
            error_message(toml)
        );
    }
    out
}

#[cfg(test)]
pub(super) fn values_example() -> &'static str {
    VALUES_EXAMPLE
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
    collect("", &schema.globals, &schema.root);
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
