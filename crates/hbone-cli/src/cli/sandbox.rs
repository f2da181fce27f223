//! The sandbox of the long-running commands (`server`, `gateway`,
//! `forward`, `socks5`, `node` and `run`) on Linux: `no_new_privs`, and a
//! Landlock ruleset under which the filesystem can only be read where the
//! process has files to read: the directories of its identity, policy,
//! services, routes, CRL, SOCKS5 credentials, config, Istio CA root and
//! token files, and the system's name-resolution files. Nothing can be
//! written, made, removed or executed anywhere, except files replaced in
//! the `--identity-out` directory; connecting to a Unix socket is allowed
//! only in the directory of the SPIFFE Workload API socket and of systemd's
//! `NOTIFY_SOCKET` (where the kernel checks that, Landlock ABI 9 and
//! later). The network is not restricted.
//!
//! A mesh node runs `nft` to install, count and remove its rules, so it
//! may also execute that one program, read and map the system's libraries
//! (the dynamic loader is executed too), read the files nft reads
//! (`/etc/iproute2`, `/etc/connlabel.conf`, `/etc/protocols`,
//! `/etc/services`) and write to `/dev/null`, nft's output. With the
//! iptables firewall it may execute `iptables`, `ip6tables` and their
//! `-restore` programs instead, and read iptables' lock file
//! (`/run/xtables.lock`, or `XTABLES_LOCKFILE`), made at start when
//! missing, since legacy iptables opens it with `O_CREAT` even to read.
//! The programs inherit the sandbox.
//!
//! Files are granted by their directory, not one by one: Landlock grants
//! by inode, and a file replaced by a rename (editors, `hbone ca revoke`,
//! Kubernetes secret volumes swapping their `..data` link) is a new inode
//! that a rule on the old file would not cover. An `--identity-dir` is
//! granted itself.
//!
//! The ruleset is put in force before the async runtime and the log writer
//! start any thread: before Landlock ABI 8 (Linux 7.0) a thread restricts
//! only itself and the threads it starts later, so applying it from a
//! runtime worker after start-up would leave the other threads free. The
//! start-up that follows reads only what the ruleset allows, so it is no
//! different from a sandbox put in place after it.
//!
//! A kernel without Landlock, or with an older ABI, gets what it supports
//! (the `landlock` crate's best-effort mode) and a warning; the start never
//! fails for it. `--no-sandbox` (`no-sandbox = true` in a config file) turns
//! it all off. The one-shot commands (`connect`, `ca`, `config`, `policy`,
//! `demo`, `bench`) are not sandboxed: `connect` runs as a user's
//! `ProxyCommand` and ends with its tunnel, the others write files or run
//! child processes and exit.

use std::path::{Path, PathBuf};

use super::args::{IdentityArgs, ServerArgs};
use super::config_file::ConfigFile;
use super::node::{Firewall, NodeArgs};
use super::revocation::RevocationArgs;
use super::{Cli, Command};

/// The hidden environment variable naming a file the process tries to open
/// once, after the sandbox is in place and from a runtime worker thread,
/// logging `sandbox probe: opened` or `sandbox probe: denied`. For the
/// tests: it opens the file and closes it unread, and changes nothing.
const PROBE: &str = "HBONE_SANDBOX_PROBE";

/// Files the resolver reads when a host name is looked up (targets,
/// `--server`, services and routes may name hosts).
const NAME_RESOLUTION: [&str; 5] = [
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
];

/// Files nft reads besides its libraries (names of realms, groups, marks,
/// connection labels, protocols and services); any may be missing.
const NFT_FILES: [&str; 4] = [
    "/etc/iproute2",
    "/etc/connlabel.conf",
    "/etc/protocols",
    "/etc/services",
];

/// iptables' lock file, unless `XTABLES_LOCKFILE` names another.
const XTABLES_LOCK: &str = "/run/xtables.lock";

/// Where the system's shared libraries and dynamic loader live.
const LIBRARY_DIRECTORIES: [&str; 4] = ["/lib", "/lib64", "/usr/lib", "/usr/lib64"];

/// What the sandbox leaves reachable.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Allowed {
    /// Files, and directories with everything beneath them, that may be
    /// read.
    pub(super) read: Vec<PathBuf>,
    /// Directories beneath which Unix sockets may be connected to.
    pub(super) sockets: Vec<PathBuf>,
    /// Directories whose files may be written and replaced (`--identity-out`).
    pub(super) write: Vec<PathBuf>,
    /// Programs, and directories with everything beneath them, that may be
    /// executed and read: a node's nft, the libraries it maps and the
    /// dynamic loader that maps them.
    pub(super) execute: Vec<PathBuf>,
    /// Files that may be opened for writing but not replaced: `/dev/null`,
    /// which a node's nft gets as its output.
    pub(super) write_files: Vec<PathBuf>,
    /// Files made now when missing (empty, owner-only), then readable:
    /// iptables' lock file, which only its creation would need more for.
    pub(super) made: Vec<PathBuf>,
}

impl Allowed {
    /// The directory `file` is in (`.` for a bare name).
    fn directory_of(&mut self, file: &Path) {
        let parent = match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        push_new(&mut self.read, parent.to_path_buf());
    }

    fn identity(&mut self, args: &IdentityArgs) {
        if let Some(dir) = &args.identity_dir {
            push_new(&mut self.read, dir.clone());
        }
        let files = [&args.cert, &args.key, &args.trust_bundle];
        let istio = [&args.istio_ca_root, &args.token_file];
        for file in files.into_iter().chain(istio).flatten() {
            self.directory_of(file);
        }
        for bundle in &args.federated_bundles {
            self.directory_of(&bundle.path);
        }
        let endpoint = args.workload_api_endpoint().ok().flatten();
        if let Some(socket) = endpoint.as_deref().and_then(unix_socket_path) {
            self.socket_directory_of(&socket);
        }
        // Only where it will be written (the start refuses it otherwise).
        if let Some(dir) = &args.identity_out
            && (args.istio_ca.is_some() || args.workload_api.is_some())
        {
            push_new(&mut self.write, dir.clone());
        }
    }

    fn socket_directory_of(&mut self, socket: &Path) {
        if let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty()) {
            push_new(&mut self.sockets, parent.to_path_buf());
        }
    }

    fn revocation(&mut self, args: &RevocationArgs) {
        for crl in &args.crls {
            self.directory_of(crl);
        }
    }

    fn server(&mut self, args: &ServerArgs) {
        self.identity(&args.identity);
        self.revocation(&args.revocation);
        for file in [&args.policy, &args.services].into_iter().flatten() {
            self.directory_of(file);
        }
    }

    /// A mesh node: its identity and revocation lists, and its firewall's
    /// programs when it runs them (to install its rules, or to count
    /// plaintext to protected ports).
    fn node(&mut self, args: &NodeArgs) {
        self.identity(&args.identity);
        self.revocation(&args.revocation);
        let installs = !args.no_install_rules;
        if !installs && args.protect.is_empty() {
            return;
        }
        let firewall = args.firewall();
        for program in firewall.programs(installs) {
            self.program(&program);
        }
        match firewall {
            Firewall::Nftables(_) => {
                for file in NFT_FILES {
                    push_new(&mut self.read, PathBuf::from(file));
                }
            }
            Firewall::Iptables => {
                let lock = std::env::var_os("XTABLES_LOCKFILE")
                    .filter(|path| !path.is_empty())
                    .map_or_else(|| PathBuf::from(XTABLES_LOCK), PathBuf::from);
                push_new(&mut self.made, lock);
            }
        }
    }

    /// `program` (a path, or a name looked up in `PATH` as the child's
    /// start will), the system libraries and `/dev/null`. A program not
    /// found is left to fail at its start, where the error names it.
    fn program(&mut self, program: &str) {
        if let Some(path) = find_program(program) {
            push_new(&mut self.execute, path);
        }
        for dir in LIBRARY_DIRECTORIES {
            let dir = Path::new(dir);
            if dir.exists() {
                // /lib is often a link to /usr/lib: one grant for both.
                let real = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
                push_new(&mut self.execute, real);
            }
        }
        push_new(&mut self.write_files, PathBuf::from("/dev/null"));
    }

    /// What `command` reads after start; `None` for a command that is not
    /// sandboxed.
    fn command(&mut self, command: &Command) -> Option<()> {
        match command {
            Command::Server { args, .. } => self.server(args),
            Command::Gateway { args, .. } => {
                self.identity(&args.identity);
                self.revocation(&args.revocation);
                self.directory_of(&args.routes);
            }
            Command::Forward { args, .. } => {
                self.identity(&args.dial.identity);
                self.revocation(&args.dial.revocation);
            }
            Command::Socks5 { args, .. } => {
                self.identity(&args.dial.identity);
                self.revocation(&args.dial.revocation);
                if let Some(file) = &args.socks5_credentials {
                    self.directory_of(file);
                }
            }
            Command::Run { args, .. } => self.directory_of(&args.config),
            Command::Node { args, .. } if !args.print_rules => self.node(args),
            _ => return None,
        }
        Some(())
    }

    /// What the process as a whole needs: name resolution, and systemd's
    /// notification socket when there is one.
    fn process(&mut self) {
        for file in NAME_RESOLUTION {
            push_new(&mut self.read, PathBuf::from(file));
            // A link to a file that is replaced by rename, as
            // systemd-resolved and NetworkManager keep resolv.conf:
            // the directory of its target.
            let target = std::fs::read_link(file)
                .is_ok()
                .then(|| std::fs::canonicalize(file).ok())
                .flatten();
            if let Some(parent) = target.as_deref().and_then(Path::parent)
                && !matches!(parent.to_str(), Some("/" | "/etc"))
            {
                push_new(&mut self.read, parent.to_path_buf());
            }
        }
        // glibc loads its name-service modules (libnss_*) at the first
        // lookup, which comes after the sandbox is in force.
        push_new(&mut self.read, PathBuf::from("/etc/ld.so.cache"));
        for dir in nss_module_directories() {
            push_new(&mut self.read, dir);
        }
        if let Some(socket) = std::env::var_os("NOTIFY_SOCKET") {
            let socket = PathBuf::from(socket);
            // An abstract socket (`@name`) has no path to grant.
            if socket.is_absolute() {
                self.socket_directory_of(&socket);
            }
        }
    }
}

/// The system library directories holding glibc's name-service modules
/// (`libnss_*`), multiarch ones (`/usr/lib/x86_64-linux-gnu`) included.
fn nss_module_directories() -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    for base in ["/lib", "/lib64", "/usr/lib", "/usr/lib64"] {
        let base = Path::new(base);
        candidates.push(base.to_path_buf());
        let Ok(entries) = std::fs::read_dir(base) else {
            continue;
        };
        candidates.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with("-linux-gnu"))
                .map(|e| e.path()),
        );
    }
    let holds_modules = |dir: &Path| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libnss_"))
        })
    };
    let mut found: Vec<PathBuf> = Vec::new();
    for dir in candidates.into_iter().filter(|d| holds_modules(d)) {
        // /lib is often a link to /usr/lib: one grant for both.
        let real = std::fs::canonicalize(&dir).unwrap_or(dir);
        push_new(&mut found, real);
    }
    found
}

/// The file `program` names: itself when it holds a `/`, else the first
/// regular file of that name in a directory of `PATH`, as `execvp` finds
/// it; resolved through links, since Landlock grants the file itself.
pub(super) fn find_program(program: &str) -> Option<PathBuf> {
    let found = if program.contains('/') {
        Some(PathBuf::from(program))
    } else {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    }?;
    std::fs::canonicalize(found).ok()
}

fn push_new(list: &mut Vec<PathBuf>, path: PathBuf) {
    if !list.contains(&path) {
        list.push(path);
    }
}

/// The socket path of a `unix:///path` or `unix:/path` endpoint.
fn unix_socket_path(endpoint: &str) -> Option<PathBuf> {
    let rest = endpoint.strip_prefix("unix:")?;
    let path = rest.strip_prefix("//").unwrap_or(rest);
    Some(PathBuf::from(path))
}

/// What a sandboxed command may reach: `None` when `cli` runs a command
/// that is not sandboxed. For `hbone run`, the union over every section of
/// `file` (a section that does not parse adds nothing: the run reports it).
pub(super) fn allowed(cli: &Cli, file: Option<&ConfigFile>) -> Option<Allowed> {
    let mut allowed = Allowed::default();
    allowed.command(&cli.command)?;
    if let (Command::Run { .. }, Some(file)) = (&cli.command, file) {
        for section in &file.sections {
            let mut argv = vec![std::ffi::OsString::from("hbone")];
            argv.extend(section.argv());
            if let Ok(parsed) = <Cli as clap::Parser>::try_parse_from(argv) {
                allowed.command(&parsed.command);
            }
        }
    }
    allowed.process();
    Some(allowed)
}

/// How entering the sandbox went, to be logged once logging is up.
#[must_use]
pub struct Entered {
    outcome: Outcome,
    /// Whether the command is one that gets the sandbox (the probe runs for
    /// those only).
    long_running: bool,
}

// Elsewhere than on Linux the sandbox is never in force.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
enum Outcome {
    NotSandboxed,
    TurnedOff,
    /// The ruleset is in force: fully, or only as far as the kernel goes.
    Restricted {
        full: bool,
        /// The kernel's Landlock ABI, and the rights it cannot restrict.
        abi: String,
        missing: String,
        /// Whether reading, writing, linking or truncating files is among
        /// the missing rights (Landlock's first three ABIs), rather than
        /// only later refinements such as device ioctls or connecting to
        /// Unix sockets.
        core_missing: bool,
        allowed: Allowed,
        skipped: Vec<String>,
    },
    /// No Landlock here: `no_new_privs` only.
    NoLandlock {
        no_new_privs: bool,
    },
    Failed(String),
}

/// Puts the process in its sandbox, unless the command is not a
/// long-running one or `--no-sandbox` was given. Call it before any
/// thread starts; log what happened with [`Entered::report`].
pub fn enter(cli: &Cli, file: Option<&ConfigFile>) -> Entered {
    let Some(allowed) = allowed(cli, file) else {
        return Entered {
            outcome: Outcome::NotSandboxed,
            long_running: false,
        };
    };
    let outcome = if cli.command.service().is_some_and(|s| s.no_sandbox) {
        Outcome::TurnedOff
    } else {
        restrict(allowed)
    };
    Entered {
        outcome,
        long_running: true,
    }
}

#[cfg(target_os = "linux")]
fn restrict(allowed: Allowed) -> Outcome {
    use landlock::{
        ABI, Access, AccessFs, BitFlags, LandlockStatus, PathBeneath, PathFd, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus,
    };
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS reads its integer arguments only.
    let no_new_privs = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == 0;
    let mut skipped = Vec::new();
    // Made now, while it still can be; the write at start would make it.
    let writable: Vec<&PathBuf> = allowed
        .write
        .iter()
        .filter(|dir| match std::fs::create_dir_all(dir) {
            Ok(()) => true,
            Err(e) => {
                skipped.push(format!("{}: {e}", dir.display()));
                false
            }
        })
        .collect();
    // Made now, as iptables would make it (owner-only).
    let made: Vec<&PathBuf> = allowed
        .made
        .iter()
        .filter(|file| {
            use std::os::unix::fs::OpenOptionsExt as _;
            let made = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(file);
            match made {
                Ok(_) => true,
                Err(e) => {
                    skipped.push(format!("{}: {e}", file.display()));
                    false
                }
            }
        })
        .collect();
    let mut rules = Vec::new();
    let system: Vec<&Path> = NAME_RESOLUTION
        .iter()
        .chain(&NFT_FILES)
        .map(Path::new)
        .chain([Path::new("/etc/ld.so.cache")])
        .collect();
    let mut rule = |path: &Path, access: BitFlags<AccessFs>| match PathFd::new(path) {
        Ok(fd) => {
            // Directory rights on a file are refused: only ReadFile there.
            let access = if path.is_dir() {
                access
            } else {
                access & AccessFs::from_file(ABI::V9)
            };
            rules.push(PathBeneath::new(fd, access));
        }
        // The system's own files may be missing (no /etc/gai.conf); the
        // process's own were read at start, so a missing one is said.
        Err(_) if system.contains(&path) => {}
        Err(e) => skipped.push(format!("{}: {e}", path.display())),
    };
    for path in &allowed.read {
        rule(path, AccessFs::ReadFile | AccessFs::ReadDir);
    }
    for path in &allowed.sockets {
        rule(path, AccessFs::ResolveUnix.into());
    }
    for path in &allowed.execute {
        rule(
            path,
            AccessFs::Execute | AccessFs::ReadFile | AccessFs::ReadDir,
        );
    }
    for path in &allowed.write_files {
        rule(path, AccessFs::ReadFile | AccessFs::WriteFile);
    }
    for path in &made {
        rule(path, AccessFs::ReadFile.into());
    }
    for dir in &writable {
        // Each file is written under a temporary name and renamed over the
        // old one, in the same directory.
        let replace = AccessFs::ReadFile
            | AccessFs::ReadDir
            | AccessFs::WriteFile
            | AccessFs::Truncate
            | AccessFs::MakeReg
            | AccessFs::RemoveFile;
        rule(dir, replace);
    }
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI::V9))
        .and_then(|ruleset| ruleset.create())
        .and_then(|ruleset| {
            ruleset.add_rules(rules.into_iter().map(Ok::<_, landlock::RulesetError>))
        })
        .and_then(|ruleset| ruleset.restrict_self());
    match status {
        Ok(status) => match status.ruleset {
            RulesetStatus::NotEnforced => Outcome::NoLandlock { no_new_privs },
            enforced => {
                let (abi, missing, core_missing) = match status.landlock {
                    LandlockStatus::Available { effective_abi, .. } => {
                        let missing =
                            AccessFs::from_all(ABI::V9) & !AccessFs::from_all(effective_abi);
                        let names: Vec<_> =
                            missing.iter().map(|right| format!("{right:?}")).collect();
                        let core = !(missing & AccessFs::from_all(ABI::V3)).is_empty();
                        (format!("{effective_abi:?}"), names.join(","), core)
                    }
                    other => (format!("{other:?}"), String::new(), true),
                };
                Outcome::Restricted {
                    full: enforced == RulesetStatus::FullyEnforced,
                    abi,
                    missing,
                    core_missing,
                    allowed,
                    skipped,
                }
            }
        },
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

#[cfg(not(target_os = "linux"))]
fn restrict(_: Allowed) -> Outcome {
    Outcome::NoLandlock {
        no_new_privs: false,
    }
}

impl Entered {
    /// Logs how entering the sandbox went.
    pub fn report(&self) {
        let list = |paths: &[PathBuf]| {
            let shown: Vec<_> = paths.iter().map(|p| p.display().to_string()).collect();
            shown.join(",")
        };
        match &self.outcome {
            Outcome::NotSandboxed => {}
            Outcome::TurnedOff => {
                tracing::info!(
                    "sandbox off (--no-sandbox, or no-sandbox = true in the config file)"
                )
            }
            Outcome::Restricted {
                full,
                abi,
                missing,
                core_missing,
                allowed,
                skipped,
            } => {
                for path in skipped {
                    tracing::warn!("sandbox: cannot grant {path}; it stays unreadable");
                }
                let read = list(&allowed.read);
                let sockets = list(&allowed.sockets);
                let write = list(&allowed.write);
                let execute = list(&allowed.execute);
                if *full {
                    tracing::info!(%abi, %read, %write, %sockets, %execute, "sandbox in force: no_new_privs, filesystem read-only beneath these paths, writable only beneath those under write");
                } else if *core_missing {
                    tracing::warn!(%abi, %missing, %read, %write, %sockets, %execute, "sandbox in force as far as this kernel's Landlock goes: the rights listed as missing cannot be restricted here");
                } else {
                    // Every start on an older kernel: a warning here would
                    // teach operators to ignore warnings.
                    tracing::info!(%abi, %missing, %read, %write, %sockets, %execute, "sandbox in force: no_new_privs, files restricted as listed; this kernel's Landlock cannot restrict the rights listed as missing");
                }
            }
            Outcome::NoLandlock { no_new_privs } => tracing::warn!(
                no_new_privs,
                "sandbox: Landlock is not available in this kernel; running without a filesystem sandbox"
            ),
            Outcome::Failed(e) => {
                tracing::warn!("sandbox: could not be put in force, running without it: {e}")
            }
        }
    }

    /// Runs the probe when the environment asks for one, on one of
    /// `runtime`'s worker threads: those started after the sandbox, which
    /// must be in it too.
    pub fn probe(&self, runtime: &tokio::runtime::Runtime) {
        let Some(path) = std::env::var_os(PROBE).filter(|_| self.long_running) else {
            return;
        };
        let probing = runtime.spawn(async move { probe(Path::new(&path)) });
        if let Err(e) = runtime.block_on(probing) {
            tracing::warn!("sandbox probe: failed: {e}");
        }
    }
}

fn probe(path: &Path) {
    match std::fs::File::open(path) {
        Ok(_) => tracing::info!(path = %path.display(), "sandbox probe: opened"),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::info!(path = %path.display(), "sandbox probe: denied")
        }
        Err(e) => tracing::info!(path = %path.display(), "sandbox probe: failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// What a node capturing 10.0.2.0/24, with `/bin/sh` standing in for
    /// its nft, is granted with `extra` flags.
    fn node_allowed(extra: &[&str]) -> Option<Allowed> {
        let mut args = vec![
            "hbone",
            "node",
            "--identity-dir",
            "/c",
            "--mesh",
            "10.0.2.0/24",
            "--peer",
            "10.0.2.0/24=spiffe://td/ns/a/sa/b",
            "--nft",
            "/bin/sh",
        ];
        args.extend_from_slice(extra);
        allowed(&Cli::try_parse_from(args).unwrap(), None)
    }

    /// A mesh node is sandboxed too, alone or in `hbone run`: it may
    /// execute its nft and read the libraries nft maps; printing the rules
    /// is a one-shot command. With neither rules to install nor ports to
    /// count, nft never runs and is not granted.
    #[test]
    fn a_mesh_node_may_run_its_nft_and_nothing_else() {
        let node = node_allowed;
        let sandboxed = node(&[]).expect("a node is sandboxed");
        let shell = std::fs::canonicalize("/bin/sh").unwrap();
        assert_eq!(sandboxed.execute.first(), Some(&shell));
        let usr_lib = std::fs::canonicalize("/usr/lib").unwrap();
        assert!(
            sandboxed.execute.contains(&usr_lib),
            "{:?}",
            sandboxed.execute
        );
        assert_eq!(sandboxed.write_files, [PathBuf::from("/dev/null")]);
        assert!(sandboxed.read.contains(&PathBuf::from("/c")));
        assert!(sandboxed.read.contains(&PathBuf::from("/etc/iproute2")));
        assert!(sandboxed.write.is_empty());

        assert!(sandboxed.made.is_empty());

        let hands_off = node(&["--no-install-rules"]).unwrap();
        assert!(hands_off.execute.is_empty() && hands_off.write_files.is_empty());
        let counting = node(&["--no-install-rules", "--protect", "8080"]).unwrap();
        assert_eq!(counting.execute.first(), Some(&shell));
        assert_eq!(node(&["--print-rules"]), None);

        let text = "[server]\nidentity-dir = \"/s\"\n\
                    [node]\nidentity-dir = \"/c\"\nmesh = [\"10.0.2.0/24\"]\n\
                    peer = [\"10.0.2.0/24=spiffe://td/ns/a/sa/b\"]\nnft = \"/bin/sh\"\n";
        let file =
            crate::cli::config_file::parse(text, Path::new("/etc/hbone/hbone.toml")).unwrap();
        let run =
            Cli::try_parse_from(["hbone", "run", "--config", "/etc/hbone/hbone.toml"]).unwrap();
        let both = allowed(&run, Some(&file)).expect("a run with a node is sandboxed");
        assert_eq!(both.execute.first(), Some(&shell));
        for dir in ["/etc/hbone", "/s", "/c"] {
            assert!(
                both.read.contains(&PathBuf::from(dir)),
                "{dir}: {:?}",
                both.read
            );
        }
    }

    /// With iptables the node runs iptables' programs, not its nft: all
    /// four to install its rules, the two that list the counters to count
    /// only; and it may read iptables' lock file.
    #[test]
    fn a_mesh_node_on_iptables_may_run_iptables_and_not_nft() {
        let node = |extra: &[&str]| {
            let mut args = vec!["--firewall", "iptables"];
            args.extend_from_slice(extra);
            node_allowed(&args).expect("a node is sandboxed")
        };
        let programs = |names: &[&str]| -> Vec<PathBuf> {
            let mut found = Vec::new();
            for name in names {
                // Links to one multi-call program are one grant.
                if let Some(path) = find_program(name) {
                    push_new(&mut found, path);
                }
            }
            found
        };
        let shell = std::fs::canonicalize("/bin/sh").unwrap();
        let installing = node(&[]);
        assert!(!installing.execute.contains(&shell), "{installing:?}");
        let all = [
            "iptables",
            "ip6tables",
            "iptables-restore",
            "ip6tables-restore",
        ];
        let expected = programs(&all);
        assert_eq!(installing.execute[..expected.len()], expected[..]);
        assert_eq!(installing.made.len(), 1, "the lock file: {installing:?}");
        assert!(!installing.read.contains(&PathBuf::from("/etc/iproute2")));

        let counting = node(&["--no-install-rules", "--protect", "8080"]);
        let expected = programs(&all[..2]);
        assert_eq!(counting.execute[..expected.len()], expected[..]);
        if find_program("iptables-restore") != find_program("iptables") {
            let restore = find_program("iptables-restore");
            assert!(restore.is_none_or(|r| !counting.execute.contains(&r)));
        }
        assert!(node(&["--no-install-rules"]).execute.is_empty());
    }

    #[test]
    fn programs_are_found_as_execvp_finds_them() {
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        assert_eq!(find_program("/bin/sh"), Some(sh.clone()));
        assert_eq!(find_program("no-such-program-here"), None);
        // `sh` is on every PATH the tests run with.
        assert!(find_program("sh").is_some());
    }

    fn allowed_for(args: &[&str]) -> Allowed {
        let cli = Cli::try_parse_from(args).unwrap();
        let mut allowed = Allowed::default();
        allowed.command(&cli.command).unwrap();
        allowed
    }

    #[test]
    fn files_are_granted_by_their_directory() {
        let allowed = allowed_for(&[
            "hbone",
            "server",
            "--cert",
            "/c/cert.pem",
            "--key",
            "/k/key.pem",
            "--trust-bundle",
            "/c/bundle.pem",
            "--policy",
            "policy.toml",
            "--services",
            "/etc/hbone/services.toml",
            "--crl",
            "/crl/a.pem",
        ]);
        let read: Vec<_> = allowed.read.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(read, ["/c", "/k", "/crl", ".", "/etc/hbone"]);
        assert!(allowed.sockets.is_empty());
    }

    #[test]
    fn entries_grant_identity_sources_and_credentials() {
        let allowed = allowed_for(&[
            "hbone",
            "socks5",
            "--workload-api",
            "unix:///run/spire/agent.sock",
            "--server-id",
            "spiffe://td/s",
            "--listen",
            "127.0.0.1:1080",
            "--socks5-credentials",
            "/etc/hbone/users",
        ]);
        assert_eq!(allowed.read, [PathBuf::from("/etc/hbone")]);
        assert_eq!(allowed.sockets, [PathBuf::from("/run/spire")]);
        assert!(allowed.write.is_empty());
        let allowed = allowed_for(&[
            "hbone",
            "forward",
            "--istio-ca",
            "istiod:15012",
            "--istio-ca-root",
            "/var/run/istio/root-cert.pem",
            "--token-file",
            "/var/run/secrets/tokens/istio-token",
            "--id",
            "spiffe://td/ns/a/sa/b",
            "--federated-bundle",
            "partner.example=/etc/partner/roots.pem",
            "--identity-out",
            "/run/hbone/identity",
            "--server-id",
            "spiffe://td/s",
            "--listen",
            "127.0.0.1:1",
            "--server",
            "127.0.0.1:2",
            "--target",
            "127.0.0.1:3",
        ]);
        assert_eq!(
            allowed.read,
            [
                PathBuf::from("/var/run/istio"),
                PathBuf::from("/var/run/secrets/tokens"),
                PathBuf::from("/etc/partner")
            ]
        );
        assert_eq!(allowed.write, [PathBuf::from("/run/hbone/identity")]);
    }

    #[test]
    fn one_shot_commands_are_not_sandboxed() {
        let cli = Cli::try_parse_from(["hbone", "ca", "init", "--out", "ca"]).unwrap();
        assert_eq!(allowed(&cli, None), None);
        assert_eq!(
            unix_socket_path("unix:/tmp/a.sock"),
            Some(PathBuf::from("/tmp/a.sock"))
        );
        assert_eq!(unix_socket_path("tcp://127.0.0.1:1"), None);
    }
}
