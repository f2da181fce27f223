//! Command line plus config file: the file's fields become the flags of
//! the same names, added to the command line unless the command line
//! already gives that flag (flags override the file).
//!
//! Done on the raw arguments, before clap sees them, so that a flag that
//! is required on the command line (say `--listen`) can come from the file.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::CommandFactory;

use super::Cli;
use super::config_file::{self, ConfigFile, Field};

/// Sections a single subcommand can take from a file with `--config`.
const SECTION_COMMANDS: [&str; 5] = ["server", "gateway", "forward", "socks5", "node"];

/// The arguments with the config file's fields merged in, and the file
/// (for `hbone run`, which runs every section). Without `--config`, the
/// arguments come back unchanged.
pub fn expand(args: Vec<OsString>) -> anyhow::Result<(Vec<OsString>, Option<ConfigFile>)> {
    // Help needs no file (and must not fail for want of one).
    let asks_help = args
        .iter()
        .any(|a| matches!(a.to_str(), Some("--help" | "-h" | "--version" | "-V")));
    let Some((command, config)) = find_config(&args).filter(|_| !asks_help) else {
        return Ok((args, None));
    };
    let file = config_file::load(&config)?;
    let given = given_flags(&args);
    let mut merged = args;
    merged.extend(missing(&file.global, &given));
    if command != "run" {
        let mut sections = file.sections.iter().filter(|s| s.kind == command);
        let section = match (sections.next(), sections.next()) {
            (Some(section), None) => section,
            (None, _) => anyhow::bail!(
                "{}: has no [{command}] section for `hbone {command} --config`",
                config.display()
            ),
            (Some(_), Some(_)) => anyhow::bail!(
                "{}: has several [[{command}]] sections; run them all with `hbone run --config {}`",
                config.display(),
                config.display()
            ),
        };
        merged.extend(missing(&section.fields, &given));
    }
    Ok((merged, Some(file)))
}

/// The file's flags for the fields the command line does not give.
fn missing<'a>(fields: &'a [Field], given: &'a [String]) -> impl Iterator<Item = OsString> + 'a {
    fields
        .iter()
        .filter(|field| !given.contains(&field.name))
        .flat_map(|field| field.args.iter().cloned())
}

/// The subcommand and the `--config` path, when both are there.
fn find_config(args: &[OsString]) -> Option<(String, PathBuf)> {
    let command = subcommand(args)?;
    if command != "run" && !SECTION_COMMANDS.contains(&command.as_str()) {
        return None;
    }
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        let arg = arg.to_string_lossy();
        if arg == "--config" {
            return Some((command, rest.next()?.into()));
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some((command, path.into()));
        }
    }
    None
}

/// The first argument that is neither an option nor an option's value.
fn subcommand(args: &[OsString]) -> Option<String> {
    let root = Cli::command();
    let takes_value = |name: &str| {
        root.get_arguments()
            .any(|a| a.get_long() == Some(name) && a.get_action().takes_values())
    };
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        let arg = arg.to_string_lossy();
        match arg.strip_prefix("--") {
            Some(option) if !option.contains('=') && takes_value(option) => {
                rest.next();
            }
            Some(_) => {}
            None if arg.starts_with('-') => {}
            None => return Some(arg.into_owned()),
        }
    }
    None
}

/// Long flags present on the command line, without their dashes.
fn given_flags(args: &[OsString]) -> Vec<String> {
    args.iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_owned())
        .collect()
}

/// `OsStr` helper for tests.
#[cfg(test)]
fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_subcommand_past_global_options() {
        assert_eq!(
            subcommand(&os(&[
                "hbone",
                "--log",
                "debug",
                "--log-format=json",
                "run"
            ]))
            .as_deref(),
            Some("run")
        );
        assert_eq!(subcommand(&os(&["hbone", "--log-format", "json"])), None);
        assert_eq!(
            find_config(&os(&["hbone", "server", "--config=x.toml"])),
            Some(("server".into(), "x.toml".into()))
        );
        assert_eq!(
            find_config(&os(&["hbone", "policy", "check", "--config", "x"])),
            None
        );
    }

    #[test]
    fn flags_on_the_command_line_are_not_taken_from_the_file() {
        let given = given_flags(&os(&["hbone", "run", "--admin=off", "--log", "x"]));
        assert_eq!(given, ["admin", "log"]);
        let fields = vec![
            Field {
                name: "admin".into(),
                line: 1,
                args: os(&["--admin", "127.0.0.1:1"]),
            },
            Field {
                name: "threads".into(),
                line: 2,
                args: os(&["--threads", "2"]),
            },
        ];
        let added: Vec<OsString> = missing(&fields, &given).collect();
        assert_eq!(added, os(&["--threads", "2"]));
    }
}
