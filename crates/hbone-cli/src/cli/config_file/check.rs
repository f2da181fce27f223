//! Checks that look at more than one value: whole sections through clap,
//! start-up rules clap cannot express, and listeners that would collide;
//! and the wording of errors that come from toml or clap.

use std::error::Error as _;
use std::net::SocketAddr;

use clap::Command;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use toml::de::DeValue;

use super::example::sample;
use super::schema::{Key, Schema, SectionSchema, ValueKind};
use super::{ConfigError, ConfigFile, Section, Source, effective};

/// A toml error as one line, naming the section it is in.
pub(super) fn syntax_error(schema: &Schema, src: &Source<'_>, e: &toml::de::Error) -> ConfigError {
    let offset = e.span().map_or(0, |s| s.start);
    let line = src.line(offset);
    let place = section_at(src.text, line);
    if e.message().starts_with("duplicate key")
        && let Some(span) = e.span()
        && let Some(name) = src.text.get(span)
    {
        let line_text = src.text.lines().nth(line - 1).unwrap_or_default();
        if !line_text.trim_start().starts_with('[') {
            return src.error(line, format!("{place} {name}").trim_start(), "given twice");
        }
        let first = src
            .text
            .lines()
            .take(line - 1)
            .position(|l| header_of(l).is_some_and(|h| h.trim_matches(['[', ']']) == name))
            .map(|i| format!(" (first at line {})", i + 1))
            .unwrap_or_default();
        let message = match schema.section(name) {
            Some(section) if !section.repeats => format!(
                "[{name}] given twice{first}: a file has at most one [{name}]; \
                 only [[forward]] and [[socks5]] repeat"
            ),
            _ => format!("[{name}] given twice{first}"),
        };
        return src.error(line, "", message);
    }
    let place = if place.is_empty() {
        String::new()
    } else {
        format!(" in {place}")
    };
    let hint = src
        .text
        .lines()
        .nth(line - 1)
        .and_then(quoting_hint)
        .unwrap_or_default();
    src.error(
        line,
        "",
        format!("TOML syntax error{place}: {}{hint}", e.message()),
    )
}

/// `listen = 0.0.0.0:15008` is the likeliest syntax error: a string
/// without quotes. Suggest the quoted line when quoting would fix it.
fn quoting_hint(line: &str) -> Option<String> {
    let (key, raw) = line.split_once('=')?;
    let raw = raw.split(" #").next().unwrap_or_default();
    let (key, raw) = (key.trim(), raw.trim());
    if raw.is_empty() || raw.starts_with(['"', '\'', '[', '{']) || DeValue::parse(raw).is_ok() {
        return None;
    }
    let quoted = toml::Value::String(raw.to_owned()).to_string();
    DeValue::parse(&quoted).ok()?;
    Some(format!("; strings need quotes: {key} = {quoted}"))
}

/// `[server]` for a header line, ignoring a trailing comment.
fn header_of(line: &str) -> Option<&str> {
    let line = line.split('#').next().unwrap_or_default().trim();
    line.starts_with('[').then_some(line)
}

/// The header of the section that `line` (1-based) is in, or "".
fn section_at(text: &str, line: usize) -> &str {
    text.lines()
        .take(line)
        .filter_map(header_of)
        .last()
        .unwrap_or_default()
}

/// Why the flag's parser refused a value, without clap's usage noise, and
/// what it would accept.
pub(super) fn value_error(key: &Key, cmd: &Command, text: &str, e: &clap::Error) -> String {
    let cause = match (e.kind(), e.get(ContextKind::ValidValue)) {
        (ErrorKind::InvalidValue, Some(ContextValue::Strings(valid))) if !valid.is_empty() => {
            return format!("expected one of: {}", valid.join(", "));
        }
        (ErrorKind::InvalidValue, _) if text.is_empty() => return "must not be empty".into(),
        _ => e
            .source()
            .map(|s| s.to_string())
            .unwrap_or_else(|| first_line(e)),
    };
    match key.kind(cmd) {
        // The flag's own parser may already say what it expects.
        ValueKind::Address | ValueKind::HostPort if cause.contains("expected") => cause,
        ValueKind::Address => format!("{cause}; expected IP:PORT, e.g. 127.0.0.1:8080"),
        ValueKind::HostPort => {
            format!("{cause}; expected HOST:PORT, e.g. 127.0.0.1:8080 or db.internal:5432")
        }
        ValueKind::Integer if text.parse::<i128>().is_err() => {
            format!("{cause}; expected an integer")
        }
        ValueKind::Text if key.defaults().is_empty() => match sample(&key.name) {
            Some(sample) => format!("{cause}; e.g. {sample}"),
            None => cause,
        },
        _ => cause,
    }
}

/// clap's message, first line only, with flags spoken as field names.
fn first_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let line = rendered.lines().next().unwrap_or_default();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find("'--") {
        out.push_str(&rest[..start]);
        let quoted = &rest[start + 1..];
        let end = quoted.find('\'').unwrap_or(quoted.len());
        out.push_str(&field_name(&quoted[..end]));
        rest = quoted.get(end + 1..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

/// `--identity-dir <DIR>` -> `identity-dir`.
fn field_name(flag: &str) -> String {
    flag.trim_start_matches("--")
        .split([' ', '='])
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn field_names(value: Option<&ContextValue>) -> Vec<String> {
    match value {
        Some(ContextValue::String(s)) => vec![field_name(s)],
        Some(ContextValue::Strings(list)) => list.iter().map(|s| field_name(s)).collect(),
        _ => Vec::new(),
    }
}

/// Labels as errors use them: `[server]`, `[[forward]] #2`.
pub(super) fn labels(schema: &Schema, file: &ConfigFile) -> Vec<String> {
    let mut counts = std::collections::HashMap::new();
    file.sections
        .iter()
        .map(|section| match schema.section(section.kind) {
            Some(s) if s.repeats => {
                let n = counts.entry(section.kind).or_insert(0);
                *n += 1;
                format!("{} #{n}", s.header())
            }
            _ => format!("[{}]", section.kind),
        })
        .collect()
}

/// Each section as a whole command line: required fields and conflicts.
pub(super) fn sections(
    schema: &Schema,
    src: &Source<'_>,
    file: &ConfigFile,
) -> Result<(), ConfigError> {
    for (section, label) in file.sections.iter().zip(labels(schema, file)) {
        let Some(shape) = schema.section(section.kind) else {
            continue;
        };
        if let Err(e) = shape.cmd.clone().try_get_matches_from(section.argv()) {
            return Err(clap_error(shape, src, section, &label, &e));
        }
        start_up_rules(shape, src, section, &label)?;
    }
    Ok(())
}

fn field_line(section: &Section, name: &str) -> usize {
    section.field(name).map_or(section.line, |f| f.line)
}

fn clap_error(
    shape: &SectionSchema,
    src: &Source<'_>,
    section: &Section,
    label: &str,
    e: &clap::Error,
) -> ConfigError {
    match e.kind() {
        ErrorKind::MissingRequiredArgument => {
            let mut names = field_names(e.get(ContextKind::InvalidArg));
            names.sort_by_key(|n| shape.keys.iter().position(|k| &k.name == n));
            let message = match names.as_slice() {
                [one] => {
                    let help = shape.key(one).map(Key::help).unwrap_or_default();
                    format!("missing required field {one} ({help})")
                }
                many => format!("missing required fields {}", many.join(", ")),
            };
            src.error(section.line, label, message)
        }
        ErrorKind::ArgumentConflict => {
            let a = field_names(e.get(ContextKind::InvalidArg));
            let b = field_names(e.get(ContextKind::PriorArg));
            let (Some(a), Some(b)) = (a.first(), b.first()) else {
                return src.error(section.line, label, first_line(e));
            };
            conflict(src, section, label, a, b)
        }
        _ => src.error(section.line, label, first_line(e)),
    }
}

/// Names both fields, at the line of the later one.
fn conflict(src: &Source<'_>, section: &Section, label: &str, a: &str, b: &str) -> ConfigError {
    let (first, second) = if field_line(section, a) <= field_line(section, b) {
        (a, b)
    } else {
        (b, a)
    };
    src.error(
        field_line(section, second),
        &format!("{label} {second}"),
        format!(
            "cannot be used together with {first} (line {}); remove one of them",
            field_line(section, first)
        ),
    )
}

/// What the subcommands refuse at start-up though clap lets it through.
fn start_up_rules(
    shape: &SectionSchema,
    src: &Source<'_>,
    section: &Section,
    label: &str,
) -> Result<(), ConfigError> {
    let given = |name: &str| section.field(name).is_some_and(|f| !f.args.is_empty());
    let has = |name: &str| shape.key(name).is_some();
    if has("identity-dir")
        && has("cert")
        && !given("identity-dir")
        && !given("cert")
        && !given("istio-ca")
        && !given("workload-api")
    {
        return Err(src.error(
            section.line,
            label,
            "no identity: set identity-dir, or cert, key and trust-bundle, or istio-ca, or workload-api",
        ));
    }
    if has("server") && has("gateway") {
        if given("server") && given("gateway") {
            return Err(conflict(src, section, label, "server", "gateway"));
        }
        if section.kind == "forward" && !given("server") && !given("gateway") {
            return Err(src.error(
                section.line,
                label,
                "no route: set server, or gateway with gateway-id and service",
            ));
        }
    }
    Ok(())
}

struct Listener {
    subject: String,
    addr: SocketAddr,
    /// Where it is set; for a default, the section's line (None for a
    /// top-level default, which has no line).
    line: Option<usize>,
    default: bool,
}

impl Listener {
    fn describe(&self) -> String {
        let default = if self.default { " (default)" } else { "" };
        format!("{} {}{default}", self.subject, self.addr)
    }

    fn collides(&self, other: &Listener) -> bool {
        let (a, b) = (self.addr, other.addr);
        a.port() == b.port()
            && a.port() != 0
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    }
}

/// Every `listen`, and the top-level `admin` address, must be free of the
/// others.
pub(super) fn listeners(
    schema: &Schema,
    src: &Source<'_>,
    file: &ConfigFile,
) -> Result<(), ConfigError> {
    let mut all = Vec::new();
    if let Some(key) = schema.global("admin") {
        let given = file.global.iter().find(|f| f.name == "admin");
        let value = match given {
            Some(field) => field
                .values()
                .last()
                .map(|v| v.to_string_lossy().into_owned()),
            // `hbone run`'s default when the file names none.
            None => key
                .defaults()
                .into_iter()
                .next()
                .or_else(|| Some(crate::cli::ops::DEFAULT_ADMIN.to_owned())),
        };
        if let Some(addr) = value.and_then(|v| v.parse().ok()) {
            all.push(Listener {
                subject: "admin".into(),
                addr,
                line: given.map(|f| f.line),
                default: given.is_none(),
            });
        }
    }
    for (section, label) in file.sections.iter().zip(labels(schema, file)) {
        let Some(addr) = effective(schema, section, "listen").and_then(|v| v.parse().ok()) else {
            continue;
        };
        all.push(Listener {
            subject: format!("{label} listen"),
            addr,
            line: Some(field_line(section, "listen")),
            default: section.field("listen").is_none(),
        });
    }
    for (i, later) in all.iter().enumerate() {
        if let Some(earlier) = all[..i].iter().find(|e| e.collides(later)) {
            let at = earlier
                .line
                .map(|l| format!(" at line {l}"))
                .unwrap_or_default();
            return Err(src.error(
                later.line.unwrap_or(1),
                "",
                format!(
                    "{} conflicts with {}{at}: both would listen on port {}; give one of them another address",
                    later.describe(),
                    earlier.describe(),
                    later.addr.port()
                ),
            ));
        }
    }
    Ok(())
}
