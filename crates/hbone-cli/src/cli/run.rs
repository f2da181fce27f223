//! `hbone run --config FILE`: every server, gateway and entry a config
//! file declares, in one process with one admin endpoint, drained
//! together on SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches};
use hbone::admin::LogControl;

use super::config_file::{self, ConfigFile};
use super::ops::{self, AdminSetting, Ops};
use super::watch::{Event, watch};
use super::{Cli, Command, commands};

#[derive(Args)]
pub(super) struct RunArgs {
    /// The configuration file (TOML); see `hbone config example`.
    #[arg(long, value_name = "FILE", value_hint = clap::ValueHint::FilePath)]
    pub(super) config: PathBuf,
}

/// One section, parsed exactly as its subcommand's flags would be.
struct Component {
    title: String,
    command: Command,
}

pub(super) async fn run(
    file: &ConfigFile,
    admin: Option<AdminSetting>,
    log_flag_given: bool,
    global: serde_json::Value,
    logging: Arc<dyn LogControl>,
    workers: Option<hbone::Workers>,
) -> anyhow::Result<()> {
    let root = Cli::command();
    let mut components = Vec::new();
    let mut config = match global {
        serde_json::Value::Object(object) => object,
        _ => serde_json::Map::new(),
    };
    config.insert("config-file".into(), file.path.display().to_string().into());
    for (index, section) in file.sections.iter().enumerate() {
        let title = match file
            .sections
            .iter()
            .filter(|s| s.kind == section.kind)
            .count()
        {
            1 => section.kind.to_owned(),
            _ => format!("{} #{}", section.kind, index + 1),
        };
        let mut argv = vec![std::ffi::OsString::from("hbone")];
        argv.extend(section.argv());
        let matches = root
            .clone()
            .try_get_matches_from(argv)
            .with_context(|| format!("{}: [{title}]", file.path.display()))?;
        let cli = Cli::from_arg_matches(&matches)?;
        let Some((_, sub_matches)) = matches.subcommand() else {
            continue;
        };
        let effective = root
            .find_subcommand(section.kind)
            .map(|sub| ops::effective_config(sub_matches, sub, ops::Fields::Own))
            .unwrap_or_default();
        match config.get_mut(section.kind) {
            Some(serde_json::Value::Array(list)) => list.push(effective),
            _ if matches!(section.kind, "forward" | "socks5") => {
                config.insert(section.kind.to_owned(), vec![effective].into());
            }
            _ => {
                config.insert(section.kind.to_owned(), effective);
            }
        }
        components.push(Component {
            title,
            command: cli.command,
        });
    }
    let admin =
        admin.unwrap_or_else(|| ops::parse_admin(ops::DEFAULT_ADMIN).unwrap_or(AdminSetting::Off));
    let ops = Arc::new(
        Ops::start(
            admin,
            components.len(),
            serde_json::Value::Object(config),
            logging.clone(),
        )
        .await?
        .with_workers(workers),
    );
    watch_config(file.clone(), log_flag_given, logging, &ops);
    let mut running = tokio::task::JoinSet::new();
    for component in components {
        let ops = ops.clone();
        running.spawn(async move {
            let result = match component.command {
                Command::Server { args, .. } => commands::run_server(args, &ops).await,
                Command::Gateway { args, .. } => commands::run_gateway(args, &ops).await,
                Command::Forward { args, .. } => commands::run_forward(args, &ops).await,
                Command::Socks5 { args, .. } => commands::run_socks5(args, &ops).await,
                Command::Node { args, .. } => super::node::run_node(args, &ops).await,
                _ => Ok(()),
            };
            result.with_context(|| format!("[{}]", component.title))
        });
    }
    // A component that fails (say, its port is taken) stops the process:
    // half a configuration running is worse than a clear error.
    while let Some(finished) = running.join_next().await {
        finished??;
    }
    Ok(())
}

/// Re-reads the file when it changes and on SIGHUP. The log filter applies
/// at once (unless `--log` was given); other changes are named and wait
/// for a restart, since they would mean rebinding listeners or rebuilding
/// connections. Policy and identity files the config names reload live
/// through their own watchers. A file that no longer validates is refused
/// and changes nothing.
fn watch_config(
    mut current: ConfigFile,
    log_flag_given: bool,
    logging: Arc<dyn LogControl>,
    ops: &Ops,
) {
    let metrics = ops.telemetry.metrics.clone();
    let path = current.path.clone();
    tokio::spawn(watch(vec![path.clone()], move |event| {
        let Event::Reload(why) = event else { return };
        // systemd hears of the reload (ExecReload sends SIGHUP) until done.
        super::systemd::reloading();
        reload_config(
            why,
            &path,
            &mut current,
            log_flag_given,
            &*logging,
            metrics.as_deref(),
        );
        super::systemd::reloaded();
    }));
}

/// One reload of the config file: the log filter applies at once, other
/// changes are named as taking effect after a restart.
fn reload_config(
    why: &'static str,
    path: &std::path::Path,
    current: &mut ConfigFile,
    log_flag_given: bool,
    logging: &dyn LogControl,
    metrics: Option<&hbone::metrics::Metrics>,
) {
    {
        let loaded = config_file::load(path);
        if let Some(metrics) = &metrics {
            metrics.reload("config", loaded.is_ok());
        }
        let new = match loaded {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(why, "config file not reloaded, nothing changed: {e}");
                return;
            }
        };
        let mut changed = changed_fields(current, &new);
        if let Some(at) = changed.iter().position(|name| name == "log")
            && !log_flag_given
        {
            changed.remove(at);
            let filter = new
                .global
                .iter()
                .find(|f| f.name == "log")
                .and_then(|f| f.values().last().map(|v| v.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "info".to_owned());
            match logging.set(&filter) {
                Ok(()) => tracing::info!(why, %filter, "config file reloaded: log filter applied"),
                Err(e) => tracing::error!(why, %filter, "log filter not applied: {e}"),
            }
        }
        if changed.is_empty() {
            tracing::info!(why, "config file reloaded");
        } else {
            tracing::warn!(
                why, fields = %changed.join(", "),
                "config file changed: these take effect after a restart; running with the old values"
            );
        }
        *current = new;
    }
}

/// The fields that differ between two versions of a file, named as
/// `log` or `[server] max-tunnels` or `[[forward]] #2 target`.
fn changed_fields(old: &ConfigFile, new: &ConfigFile) -> Vec<String> {
    let mut changed = differing("", &old.global, &new.global);
    let (old_sections, new_sections) = (titled(old), titled(new));
    for (title, fields) in &old_sections {
        match new_sections.iter().find(|(t, _)| t == title) {
            Some((_, new_fields)) => changed.extend(differing(title, fields, new_fields)),
            None => changed.push(format!("{title}(removed)")),
        }
    }
    for (title, _) in &new_sections {
        if !old_sections.iter().any(|(t, _)| t == title) {
            changed.push(format!("{title}(added)"));
        }
    }
    changed
}

/// Each section with the title it is reported under.
fn titled(file: &ConfigFile) -> Vec<(String, &[config_file::Field])> {
    let mut seen = std::collections::HashMap::new();
    file.sections
        .iter()
        .map(|section| {
            let n = seen.entry(section.kind).or_insert(0);
            *n += 1;
            let title = match section.kind {
                "forward" | "socks5" => format!("[[{}]] #{n} ", section.kind),
                kind => format!("[{kind}] "),
            };
            (title, section.fields.as_slice())
        })
        .collect()
}

/// Names (after `label`) of the fields set differently in `old` and `new`.
fn differing(label: &str, old: &[config_file::Field], new: &[config_file::Field]) -> Vec<String> {
    let args = |fields: &[config_file::Field], name: &str| {
        fields
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.args.clone())
    };
    let mut names: Vec<&str> = old.iter().chain(new).map(|f| f.name.as_str()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|name| args(old, name) != args(new, name))
        .map(|name| format!("{label}{name}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> ConfigFile {
        config_file::parse(text, Path::new("/etc/hbone/hbone.toml")).unwrap()
    }

    #[test]
    fn changes_are_named_by_field_and_section() {
        let old = parse(
            "log = \"info\"\n[server]\nidentity-dir = \"/c\"\nmax-tunnels = 5\n\
             [[forward]]\nidentity-dir = \"/c\"\nlisten = \"127.0.0.1:1\"\nserver = \"127.0.0.1:2\"\n\
             server-id = \"spiffe://td/s\"\ntarget = \"127.0.0.1:3\"\n",
        );
        assert!(changed_fields(&old, &old).is_empty());
        let new = parse(
            "log = \"debug\"\n[server]\nidentity-dir = \"/c\"\nmax-tunnels = 6\n\
             [[forward]]\nidentity-dir = \"/c\"\nlisten = \"127.0.0.1:1\"\nserver = \"127.0.0.1:2\"\n\
             server-id = \"spiffe://td/s\"\ntarget = \"127.0.0.1:4\"\n\
             [[socks5]]\nidentity-dir = \"/c\"\nlisten = \"127.0.0.1:5\"\nserver-id = \"spiffe://td/s\"\n",
        );
        assert_eq!(
            changed_fields(&old, &new),
            [
                "log",
                "[server] max-tunnels",
                "[[forward]] #1 target",
                "[[socks5]] #1 (added)"
            ]
        );
    }
}
