//! The Markdown reference, generated from the schema, with the error
//! messages produced by running the parser, so it cannot go stale.

use std::fmt::Write as _;
use std::path::Path;

use clap::Command;

use super::example::{example_for, sentence, toml_value};
use super::parse_with;
use super::schema::{Key, Schema, SectionSchema, Shape, ValueKind};

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
        ValueKind::HostPort => format!("address{name} (an IP or a host name)"),
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
gateway, any number of forwards and SOCKS5 entries, and a mesh node.

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
- `hbone run` re-reads the file when it changes and on SIGHUP. A new `log`
  filter applies at once; other changed fields are named in a warning and
  take effect at the next restart (they mean rebinding listeners or
  rebuilding connections). A file that no longer validates changes nothing.
  The policy and identity files the config names reload live on their own.

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
    write_table(&mut out, &schema.globals, &schema.top_level);
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
        "\n## Example\n\nThe output of `hbone config example`: `[server]` is on, and every \
         other section is there commented out (remove one `# ` from each of its lines to turn \
         it on); every field is listed with its help, and defaults and examples are commented \
         out.\n\n```toml\n{}```\n",
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
