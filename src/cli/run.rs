//! `hbone run --config FILE`: every server, gateway and entry a config
//! file declares, in one process with one admin endpoint, drained
//! together on SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches};
use hbone::admin::LogControl;

use super::config_file::ConfigFile;
use super::ops::{self, AdminSetting, Ops};
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
    global: serde_json::Value,
    logging: Arc<dyn LogControl>,
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
            .map(|sub| ops::effective_config(sub_matches, sub))
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
            logging,
        )
        .await?,
    );
    let mut running = tokio::task::JoinSet::new();
    for component in components {
        let ops = ops.clone();
        running.spawn(async move {
            let result = match component.command {
                Command::Server(args) => commands::run_server(args, &ops).await,
                Command::Gateway(args) => commands::run_gateway(args, &ops).await,
                Command::Forward(args) => commands::run_forward(args, &ops).await,
                Command::Socks5(args) => commands::run_socks5(args, &ops).await,
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
