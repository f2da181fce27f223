//! The TOML configuration file: top-level keys are the global flags, and
//! each section (`[server]`, `[gateway]`, `[[forward]]`, `[[socks5]]`) holds
//! one subcommand's flags, named as on the command line without `--`.
//!
//! Everything is read off the clap definition, so a new flag is a new field
//! with no change here, and each value is checked by the flag's own parser.

mod check;
mod docs;
mod schema;
#[cfg(test)]
mod tests;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

pub(super) use docs::{docs_markdown, example};
use schema::{Key, Schema, SectionSchema, Shape, closest};

#[derive(Debug, Clone)]
#[allow(dead_code, reason = "`path` is for `hbone run`")]
pub(super) struct ConfigFile {
    pub path: PathBuf,
    pub global: Vec<Field>,
    pub sections: Vec<Section>,
}

#[derive(Debug, Clone)]
pub(super) struct Section {
    /// "server", "gateway", "forward" or "socks5".
    pub kind: &'static str,
    pub line: usize,
    pub fields: Vec<Field>,
}

#[derive(Debug, Clone)]
pub(super) struct Field {
    pub name: String,
    pub line: usize,
    /// Command-line words, e.g. `["--listen", "127.0.0.1:8080"]`; empty for
    /// a switch set to false.
    pub args: Vec<OsString>,
}

/// A bad config file, as one line naming the file and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Field {
    /// The values given, without the flags (none for a switch).
    pub fn values(&self) -> Vec<&OsStr> {
        let flag = format!("--{}", self.name);
        let glued = format!("{flag}=");
        let mut values = Vec::new();
        let mut args = self.args.iter();
        while let Some(arg) = args.next() {
            if arg.as_os_str() == OsStr::new(&flag) {
                if let Some(value) = args.next() {
                    values.push(value.as_os_str());
                }
            } else if let Some(value) = arg.to_str().and_then(|a| a.strip_prefix(&glued)) {
                values.push(OsStr::new(value));
            }
        }
        values
    }
}

impl Section {
    /// `[kind, args...]`, ready for clap.
    pub fn argv(&self) -> Vec<OsString> {
        std::iter::once(OsString::from(self.kind))
            .chain(self.fields.iter().flat_map(|f| f.args.iter().cloned()))
            .collect()
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

impl ConfigFile {
    /// The top-level fields as global flags.
    #[allow(dead_code, reason = "for `hbone run`")]
    pub fn global_argv(&self) -> Vec<OsString> {
        self.global
            .iter()
            .flat_map(|f| f.args.iter().cloned())
            .collect()
    }

    /// One line per section, saying what it would run.
    pub fn summary(&self) -> Vec<String> {
        let schema = Schema::cli();
        let mut counts = std::collections::HashMap::new();
        self.sections
            .iter()
            .map(|section| {
                let value = |name: &str| effective(&schema, section, name).unwrap_or_default();
                let mut line = section.kind.to_owned();
                if schema.section(section.kind).is_some_and(|s| s.repeats) {
                    let n = counts.entry(section.kind).or_insert(0);
                    *n += 1;
                    line += &format!(" #{n}");
                }
                line += &format!(": listen {}", value("listen"));
                if section.kind == "forward" {
                    line += &format!(" -> target {}", value("target"));
                }
                line
            })
            .collect()
    }
}

/// A field's value as the subcommand would see it: the last one given, or
/// clap's default.
fn effective(schema: &Schema, section: &Section, name: &str) -> Option<String> {
    match section.field(name) {
        Some(field) => field
            .values()
            .last()
            .map(|v| v.to_string_lossy().into_owned()),
        None => schema
            .section(section.kind)?
            .key(name)?
            .defaults()
            .into_iter()
            .next(),
    }
}

/// Config file commands.
#[derive(Subcommand)]
pub(super) enum ConfigCommand {
    /// Validate a config file and say what it would run; errors name the line.
    #[command(after_help = "Example:\n  hbone config check hbone.toml")]
    Check { file: PathBuf },
    /// Print a complete, commented example config file.
    #[command(after_help = "Example:\n  hbone config example > hbone.toml")]
    Example,
    /// Print the config file reference (docs/config.md) in Markdown.
    #[command(hide = true)]
    Docs,
}

pub(super) fn run(command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Check { file } => {
            for line in load(&file)?.summary() {
                println!("{line}");
            }
        }
        ConfigCommand::Example => print!("{}", example()),
        ConfigCommand::Docs => print!("{}", docs_markdown()),
    }
    Ok(())
}

/// Reads, parses and validates a config file.
pub(super) fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    parse(&text, path)
}

/// Parses and validates a config file's text; `path` names it in errors
/// and anchors relative paths.
pub(super) fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
    parse_with(&Schema::cli(), text, path)
}

/// The file being read: for line numbers and error messages.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    /// Relative paths in the file are relative to this.
    base: PathBuf,
}

impl Source<'_> {
    fn line(&self, offset: usize) -> usize {
        let offset = offset.min(self.text.len());
        self.text.as_bytes()[..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// `path:line: subject: message`.
    fn error(&self, line: usize, subject: &str, message: impl fmt::Display) -> ConfigError {
        let subject = if subject.is_empty() {
            String::new()
        } else {
            format!("{subject}: ")
        };
        ConfigError(format!(
            "{}:{line}: {subject}{message}",
            self.path.display()
        ))
    }
}

fn parse_with(schema: &Schema, text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let src = Source {
        path,
        text,
        base: absolute.parent().map(Path::to_owned).unwrap_or_default(),
    };
    let document = DeTable::parse(text).map_err(|e| check::syntax_error(schema, &src, &e))?;
    let mut global = Vec::new();
    let mut sections = Vec::new();
    for (key, value) in in_file_order(document.get_ref()) {
        let name: &str = key.get_ref();
        let line = src.line(key.span().start);
        if let Some(section) = schema.section(name) {
            read_sections(schema, section, &src, value, &mut sections)?;
        } else if let Some(field) = schema.global(name) {
            global.push(read_field(&schema.root, field, "", &src, key, value)?);
        } else if is_table_like(value.get_ref()) {
            let suggestion = closest(name, schema.sections.iter().map(|s| s.kind))
                .and_then(|kind| schema.section(kind))
                .map(|s| format!("did you mean {}? ", s.header()))
                .unwrap_or_default();
            return Err(src.error(
                line,
                "",
                format!(
                    "unknown section [{name}]; {suggestion}valid sections: {}",
                    schema.section_list().join(", ")
                ),
            ));
        } else {
            return Err(unknown_top_level(schema, &src, line, name));
        }
    }
    if sections.is_empty() {
        return Err(ConfigError(format!(
            "{}: nothing to run: add a [server], [gateway], [[forward]] or [[socks5]] section",
            path.display()
        )));
    }
    sections.sort_by_key(|s: &Section| s.line);
    let file = ConfigFile {
        path: path.to_owned(),
        global,
        sections,
    };
    check::sections(schema, &src, &file)?;
    check::listeners(schema, &src, &file)?;
    Ok(file)
}

fn unknown_top_level(schema: &Schema, src: &Source<'_>, line: usize, name: &str) -> ConfigError {
    let owners: Vec<String> = schema
        .sections
        .iter()
        .filter(|s| s.key(name).is_some())
        .map(|s| s.header())
        .collect();
    let names = schema.globals.iter().map(|k| k.name.as_str());
    let message = if !owners.is_empty() {
        format!(
            "{name} is not a top-level field: it belongs in a section ({})",
            owners.join(", ")
        )
    } else {
        let suggestion = closest(name, names.clone())
            .map(|n| format!("did you mean {n}? "))
            .unwrap_or_default();
        format!(
            "unknown top-level field {name}; {suggestion}valid top-level fields: {}",
            names.collect::<Vec<_>>().join(", ")
        )
    };
    src.error(line, "", message)
}

type Entry<'a, 'i> = (
    &'a Spanned<std::borrow::Cow<'i, str>>,
    &'a Spanned<DeValue<'i>>,
);

/// TOML tables come back sorted by key; errors and sections should follow
/// the file.
fn in_file_order<'a, 'i>(table: &'a DeTable<'i>) -> Vec<Entry<'a, 'i>> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    entries
}

fn is_table_like(value: &DeValue<'_>) -> bool {
    match value {
        DeValue::Table(_) => true,
        DeValue::Array(items) => items.iter().any(|v| v.get_ref().is_table()),
        _ => false,
    }
}

fn read_sections(
    schema: &Schema,
    section: &SectionSchema,
    src: &Source<'_>,
    value: &Spanned<DeValue<'_>>,
    out: &mut Vec<Section>,
) -> Result<(), ConfigError> {
    let kind = section.kind;
    let line = src.line(value.span().start);
    match (value.get_ref(), section.repeats) {
        (DeValue::Table(table), false) => {
            out.push(read_section(
                schema,
                section,
                src,
                table,
                line,
                &section.header(),
            )?);
        }
        (DeValue::Array(items), true) if items.iter().all(|i| i.get_ref().is_table()) => {
            for (index, item) in items.iter().enumerate() {
                let DeValue::Table(table) = item.get_ref() else {
                    unreachable!("checked above");
                };
                let line = src.line(item.span().start);
                let label = format!("[[{kind}]] #{}", index + 1);
                out.push(read_section(schema, section, src, table, line, &label)?);
            }
        }
        (DeValue::Array(_), false) => {
            return Err(src.error(
                line,
                "",
                format!(
                    "{kind} must be one [{kind}] table, not an array: a file has at most one [{kind}] \
                     (only [[forward]] and [[socks5]] repeat)"
                ),
            ));
        }
        (DeValue::Table(_), true) => {
            return Err(src.error(
                line,
                "",
                format!("write [[{kind}]] with double brackets: {kind} sections may repeat"),
            ));
        }
        (other, _) => {
            return Err(src.error(
                line,
                "",
                format!(
                    "{kind} must be a section ({}), not {}",
                    section.header(),
                    article(other.type_str())
                ),
            ));
        }
    }
    Ok(())
}

fn read_section(
    schema: &Schema,
    section: &SectionSchema,
    src: &Source<'_>,
    table: &DeTable<'_>,
    line: usize,
    label: &str,
) -> Result<Section, ConfigError> {
    let mut fields = Vec::new();
    for (key, value) in in_file_order(table) {
        let name: &str = key.get_ref();
        let Some(field) = section.key(name) else {
            return Err(unknown_field(schema, section, src, label, key));
        };
        fields.push(read_field(&section.cmd, field, label, src, key, value)?);
    }
    Ok(Section {
        kind: section.kind,
        line,
        fields,
    })
}

fn unknown_field(
    schema: &Schema,
    section: &SectionSchema,
    src: &Source<'_>,
    label: &str,
    key: &Spanned<std::borrow::Cow<'_, str>>,
) -> ConfigError {
    let name: &str = key.get_ref();
    let line = src.line(key.span().start);
    let names = section.keys.iter().map(|k| k.name.as_str());
    let message = if schema.global(name).is_some() {
        "a top-level field: put it at the top of the file, before any section".to_owned()
    } else {
        let suggestion = closest(name, names.clone())
            .map(|n| format!("did you mean {n}? "))
            .unwrap_or_default();
        format!(
            "unknown field; {suggestion}valid fields: {}",
            names.collect::<Vec<_>>().join(", ")
        )
    };
    src.error(line, &format!("{label} {name}"), message)
}

/// Turns one `name = value` into command-line words, checking the value's
/// type and, with the flag's own parser, its content.
fn read_field(
    cmd: &clap::Command,
    key: &Key,
    label: &str,
    src: &Source<'_>,
    name: &Spanned<std::borrow::Cow<'_, str>>,
    value: &Spanned<DeValue<'_>>,
) -> Result<Field, ConfigError> {
    let line = src.line(name.span().start);
    let subject = if label.is_empty() {
        key.name.clone()
    } else {
        format!("{label} {}", key.name)
    };
    let mut args = Vec::new();
    let items: Vec<&Spanned<DeValue<'_>>> = match (key.shape, value.get_ref()) {
        (Shape::Switch, DeValue::Boolean(on)) => {
            if *on {
                args.push(key.flag().into());
            }
            Vec::new()
        }
        (Shape::Switch, other) => {
            return Err(src.error(
                line,
                &subject,
                format!(
                    "expected true or false, found {}",
                    article(other.type_str())
                ),
            ));
        }
        (Shape::One, DeValue::Array(_)) => {
            return Err(src.error(
                line,
                &subject,
                "takes a single value, not an array (only repeatable fields take arrays)",
            ));
        }
        (Shape::Many, DeValue::Array(items)) => items.iter().collect(),
        _ => vec![value],
    };
    for item in items {
        let item_line = src.line(item.span().start);
        let text = scalar(item.get_ref()).ok_or_else(|| {
            let expected = match key.kind(cmd) {
                schema::ValueKind::Integer => "an integer",
                _ => "a string",
            };
            let what = if key.shape == Shape::Many {
                "each value"
            } else {
                "the value"
            };
            src.error(
                item_line,
                &subject,
                format!(
                    "{what} must be {expected}, found {}",
                    article(item.get_ref().type_str())
                ),
            )
        })?;
        let value = if key.is_path() && !text.is_empty() && Path::new(&text).is_relative() {
            src.base.join(&text).into_os_string()
        } else {
            OsString::from(&text)
        };
        if let Err(e) = key.check(cmd, &value) {
            let cause = check::value_error(key, cmd, &text, &e);
            let quoted = format!("{text:?}");
            let message = if cause.contains(&quoted) {
                cause
            } else {
                format!("invalid value {quoted}: {cause}")
            };
            return Err(src.error(item_line, &subject, message));
        }
        key.push_value(&mut args, value);
    }
    Ok(Field {
        name: key.name.clone(),
        line,
        args,
    })
}

/// Strings as they are; integers as decimal text.
fn scalar(value: &DeValue<'_>) -> Option<String> {
    match value {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix())
            .ok()
            .map(|n| n.to_string()),
        _ => None,
    }
}

fn article(type_name: &str) -> String {
    let a = if type_name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{a} {type_name}")
}
