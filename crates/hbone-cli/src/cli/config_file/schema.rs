//! What a config file may contain, read off the clap definition so that the
//! file and the command line cannot drift apart.

use std::ffi::OsString;

use clap::error::ErrorKind;
use clap::{Arg, ArgAction, Command, CommandFactory, ValueHint};

/// The sections, in the order the docs and the example present them, and
/// whether each may repeat (`[[forward]]`) or not (`[server]`).
pub(super) const SECTIONS: [(&str, bool); 5] = [
    ("server", false),
    ("forward", true),
    ("socks5", true),
    ("gateway", false),
    ("node", false),
];

pub(super) struct Schema {
    /// The command whose flags the top-level fields are, each checked by
    /// its parser: `hbone run`, which takes them all.
    pub top_level: Command,
    pub globals: Vec<Key>,
    pub sections: Vec<SectionSchema>,
}

pub(super) struct SectionSchema {
    pub kind: &'static str,
    pub repeats: bool,
    pub cmd: Command,
    pub keys: Vec<Key>,
}

/// A file field: one long flag.
pub(super) struct Key {
    pub name: String,
    pub shape: Shape,
    pub arg: Arg,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Shape {
    /// A flag without a value: a boolean in the file.
    Switch,
    /// One value.
    One,
    /// A repeatable flag: an array (or one value) in the file.
    Many,
}

/// What a value looks like, found by asking the arg's own parser.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(super) enum ValueKind {
    Boolean,
    Integer,
    /// An IP:PORT.
    Address,
    /// An IP:PORT or a HOST:PORT.
    HostPort,
    Duration,
    Path,
    Choice(Vec<String>),
    Text,
}

impl Schema {
    pub fn cli() -> Self {
        Self::from_command(super::super::Cli::command())
    }

    /// `root` is a parameter so tests can add flags (e.g. a global `admin`).
    pub fn from_command(mut root: Command) -> Self {
        // Building propagates the global args and adds help/version, which
        // are then filtered out like any other non-field.
        root.build();
        // The top level: the root's global flags (logs), then those of
        // `hbone run` about the whole process (threads, admin).
        let top_level = root
            .find_subcommand("run")
            .expect("the CLI has a `run` subcommand")
            .clone();
        let mut globals = keys(&root, |arg| arg.is_global_set());
        globals.extend(keys(&top_level, |arg| {
            is_process_flag(arg) && !arg.is_global_set()
        }));
        let sections = SECTIONS
            .iter()
            .map(|&(kind, repeats)| {
                let cmd = root
                    .find_subcommand(kind)
                    .unwrap_or_else(|| panic!("the CLI has no `{kind}` subcommand"))
                    .clone();
                let keys = keys(&cmd, |arg| !is_process_flag(arg));
                SectionSchema {
                    kind,
                    repeats,
                    cmd,
                    keys,
                }
            })
            .collect();
        Schema {
            top_level,
            globals,
            sections,
        }
    }

    pub fn section(&self, kind: &str) -> Option<&SectionSchema> {
        self.sections.iter().find(|s| s.kind == kind)
    }

    pub fn global(&self, name: &str) -> Option<&Key> {
        self.globals.iter().find(|k| k.name == name)
    }

    /// Section names as a reader writes them: `[server]`, `[[forward]]`.
    pub fn section_list(&self) -> Vec<String> {
        self.sections.iter().map(|s| s.header()).collect()
    }
}

impl SectionSchema {
    pub fn key(&self, name: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.name == name)
    }

    pub fn header(&self) -> String {
        header(self.kind, self.repeats)
    }
}

pub(super) fn header(kind: &str, repeats: bool) -> String {
    if repeats {
        format!("[[{kind}]]")
    } else {
        format!("[{kind}]")
    }
}

/// A flag about the whole process (logs, threads, admin endpoint): a
/// top-level field, never a section's.
fn is_process_flag(arg: &Arg) -> bool {
    arg.is_global_set() || arg.get_help_heading() == Some(crate::cli::GLOBAL_OPTIONS)
}

fn keys(cmd: &Command, keep: impl Fn(&Arg) -> bool) -> Vec<Key> {
    cmd.get_arguments()
        .filter(|arg| !arg.is_positional() && keep(arg))
        .filter_map(|arg| {
            let name = arg.get_long()?;
            // `config` names the file itself (`hbone run --config`).
            if matches!(name, "help" | "version" | "config") {
                return None;
            }
            let shape = match arg.get_action() {
                ArgAction::SetTrue => Shape::Switch,
                ArgAction::Append => Shape::Many,
                ArgAction::Set => Shape::One,
                _ => return None,
            };
            Some(Key {
                name: name.to_owned(),
                shape,
                arg: arg.clone(),
            })
        })
        .collect()
}

impl Key {
    pub fn flag(&self) -> String {
        format!("--{}", self.name)
    }

    /// Command-line words for one value. A value that starts with `-` is
    /// glued on with `=` so clap cannot take it for a flag.
    pub fn push_value(&self, args: &mut Vec<OsString>, value: OsString) {
        if value.to_string_lossy().starts_with('-') {
            let mut glued = OsString::from(format!("{}=", self.flag()));
            glued.push(value);
            args.push(glued);
        } else {
            args.push(self.flag().into());
            args.push(value);
        }
    }

    /// The path inside a value, to anchor when relative: the whole value
    /// of a path flag, or what follows `=` in a `NAME=FILE` flag (as
    /// `--federated-bundle TD=FILE`). Returns the text before the path.
    pub fn path_in<'t>(&self, text: &'t str) -> Option<(&'t str, &'t str)> {
        if self.is_path() {
            return Some(("", text));
        }
        let names_a_file = self
            .arg
            .get_value_names()
            .is_some_and(|names| names.iter().any(|n| n.as_str().ends_with("=FILE")));
        match text.find('=') {
            Some(at) if names_a_file => Some(text.split_at(at + 1)),
            _ => None,
        }
    }

    pub fn is_path(&self) -> bool {
        matches!(
            self.arg.get_value_hint(),
            ValueHint::AnyPath
                | ValueHint::FilePath
                | ValueHint::DirPath
                | ValueHint::ExecutablePath
        )
    }

    /// The flag's help, speaking of fields rather than `--flags`.
    pub fn help(&self) -> String {
        let help = self
            .arg
            .get_help()
            .map(|h| h.to_string())
            .unwrap_or_default();
        help.replace(" --", " ").replace("(--", "(")
    }

    pub fn defaults(&self) -> Vec<String> {
        self.arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect()
    }

    pub fn is_required(&self) -> bool {
        self.arg.is_required_set()
    }

    /// The placeholder given in the definition (`DIR`, `SPIFFE_ID`), if any.
    pub fn value_name(&self) -> Option<String> {
        match self.arg.get_value_names() {
            Some([name, ..]) => Some(name.to_string()),
            _ => None,
        }
    }

    /// Checks `value` with the arg's own parser by parsing it inside `cmd`,
    /// so it is judged exactly as on the command line. Errors other than a
    /// bad value (a missing required flag, say) are not this value's fault.
    pub fn check(&self, cmd: &Command, value: &OsString) -> Result<(), clap::Error> {
        let mut argv = vec![OsString::from(cmd.get_name())];
        self.push_value(&mut argv, value.clone());
        match cmd.clone().try_get_matches_from(argv) {
            Err(e) if is_value_error(&e) => Err(e),
            _ => Ok(()),
        }
    }

    fn accepts(&self, cmd: &Command, value: &str) -> bool {
        self.check(cmd, &value.into()).is_ok()
    }

    pub fn kind(&self, cmd: &Command) -> ValueKind {
        if self.shape == Shape::Switch {
            return ValueKind::Boolean;
        }
        let choices: Vec<String> = self
            .arg
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_owned())
            .collect();
        if !choices.is_empty() {
            return ValueKind::Choice(choices);
        }
        if self.is_path() {
            return ValueKind::Path;
        }
        let strict = !self.accepts(cmd, "x");
        if strict && self.accepts(cmd, "7") && !self.accepts(cmd, "7s") {
            ValueKind::Integer
        } else if strict && self.accepts(cmd, "5s") && self.accepts(cmd, "250ms") {
            ValueKind::Duration
        } else if strict && self.accepts(cmd, "127.0.0.1:8080") && !self.accepts(cmd, "10.0.0.0/8")
        {
            if self.accepts(cmd, "localhost:8080") {
                ValueKind::HostPort
            } else {
                ValueKind::Address
            }
        } else {
            ValueKind::Text
        }
    }
}

pub(super) fn is_value_error(e: &clap::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    )
}

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The candidate nearest to `name`, when it is near enough to be a typo.
pub(super) fn closest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = 2.max(name.chars().count() / 3);
    candidates
        .into_iter()
        .map(|c| (distance(name, c), c))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levenshtein() {
        assert_eq!(distance("listne", "listen"), 2);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(closest("listne", ["listen", "cert"]), Some("listen"));
        assert_eq!(closest("zzzzzz", ["listen", "cert"]), None);
    }
}
