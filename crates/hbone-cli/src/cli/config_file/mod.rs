//! The TOML configuration file: top-level keys are the global flags, and
//! each section (`[server]`, `[gateway]`, `[[forward]]`, `[[socks5]]`,
//! `[node]`) holds one subcommand's flags, named as on the command line
//! without `--`.
//!
//! Everything is read off the clap definition, so a new flag is a new field
//! with no change here, and each value is checked by the flag's own parser.

mod check;
mod docs;
mod example;
mod files;
mod read;
mod schema;
#[cfg(test)]
mod tests;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use toml::de::DeTable;

pub(super) use docs::docs_markdown;
pub(super) use example::example;
use schema::Schema;

#[derive(Debug, Clone)]
pub(crate) struct ConfigFile {
    pub path: PathBuf,
    pub global: Vec<Field>,
    pub sections: Vec<Section>,
}

#[derive(Debug, Clone)]
pub(crate) struct Section {
    /// "server", "gateway", "forward", "socks5" or "node".
    pub kind: &'static str,
    pub line: usize,
    pub fields: Vec<Field>,
}

#[derive(Debug, Clone)]
pub(crate) struct Field {
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
    /// Validate a config file and the files it names (identities exist,
    /// match and are not expired; policy, routes and services files load),
    /// and say what it would run; errors name the line.
    #[command(after_help = "Example:\n  hbone config check hbone.toml")]
    Check {
        /// The config file.
        file: PathBuf,
        /// Check the file's own syntax and values only, not the files it
        /// names (for a file written on another machine).
        #[arg(long)]
        syntax_only: bool,
    },
    /// Print a complete, commented example config file.
    #[command(after_help = "Example:\n  hbone config example > hbone.toml")]
    Example,
    /// Print the config file reference (docs/config.md) in Markdown.
    #[command(hide = true)]
    Docs,
}

pub(super) fn run(command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Check { file, syntax_only } => {
            let config = load(&file)?;
            if !syntax_only {
                let problems = files::problems(&config);
                if !problems.is_empty() {
                    for problem in &problems {
                        eprintln!("{problem}");
                    }
                    anyhow::bail!(
                        "{}: {} problem(s) with the files it names (--syntax-only skips them)",
                        file.display(),
                        problems.len()
                    );
                }
            }
            for line in config.summary() {
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
    let (global, mut sections) = read::document(schema, &src, document.get_ref())?;
    if sections.is_empty() {
        return Err(ConfigError(format!(
            "{}: nothing to run: add a [server], [gateway], [[forward]], [[socks5]] or [node] section",
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
