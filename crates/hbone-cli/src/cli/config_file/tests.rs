use std::ffi::OsString;
use std::path::Path;

use clap::{CommandFactory, Parser};

use super::schema::{Schema, Shape};
use super::*;
use crate::cli::{Cli, Command};

const SERVER: &str = "[server]\nidentity-dir = \"/certs\"\n";

fn ok(text: &str) -> ConfigFile {
    parse(text, Path::new("/etc/hbone/hbone.toml")).unwrap_or_else(|e| panic!("{e}"))
}

fn err(text: &str) -> String {
    parse(text, Path::new("hbone.toml"))
        .expect_err("should be refused")
        .to_string()
}

fn args(field: &Field) -> Vec<&str> {
    field.args.iter().map(|a| a.to_str().unwrap()).collect()
}

#[test]
fn schema_mirrors_the_cli() {
    let schema = Schema::cli();
    let globals: Vec<_> = schema.globals.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(
        globals,
        [
            "log",
            "log-format",
            "threads",
            "runtime",
            "admin",
            "no-sandbox"
        ]
    );
    let server = schema.section("server").unwrap();
    for name in ["help", "log", "threads", "admin"] {
        assert!(server.key(name).is_none(), "{name} is not a [server] field");
    }
    assert_eq!(server.key("proxy-protocol").unwrap().shape, Shape::Switch);
    assert_eq!(server.key("allow-target").unwrap().shape, Shape::Many);
    assert_eq!(server.key("listen").unwrap().shape, Shape::One);
    assert!(server.key("identity-dir").unwrap().is_path());
    // Every long flag of each subcommand is a field.
    for section in &schema.sections {
        let cmd = Cli::command()
            .find_subcommand(section.kind)
            .unwrap()
            .clone();
        // Except the file itself and the flags about the whole process.
        let fields = cmd
            .get_arguments()
            .filter(|arg| arg.get_help_heading() != Some(crate::cli::GLOBAL_OPTIONS));
        for arg in fields {
            if let Some(long) = arg.get_long().filter(|long| *long != "config") {
                assert!(section.key(long).is_some(), "{} --{long}", section.kind);
            }
        }
    }
}

#[test]
fn values_become_arguments() {
    let file = ok(
        "log = \"debug\"\nthreads = 4\n\n[server]\nidentity-dir = \"/certs\"\n\
         max-tunnels = 0x10\nproxy-protocol = true\nallow-target = [\"10.0.0.0/8\", \"192.168.0.0/16:443\"]\n\
         allow-id = \"spiffe://td/*\"\n",
    );
    assert_eq!(global_argv(&file), ["--log", "debug", "--threads", "4"]);
    let server = &file.sections[0];
    assert_eq!((server.kind, server.line), ("server", 4));
    let by_name = |name: &str| args(server.field(name).unwrap());
    assert_eq!(by_name("max-tunnels"), ["--max-tunnels", "16"]);
    assert_eq!(by_name("proxy-protocol"), ["--proxy-protocol"]);
    assert_eq!(
        by_name("allow-target"),
        [
            "--allow-target",
            "10.0.0.0/8",
            "--allow-target",
            "192.168.0.0/16:443"
        ]
    );
    assert_eq!(by_name("allow-id"), ["--allow-id", "spiffe://td/*"]);
    assert_eq!(server.field("allow-id").unwrap().line, 9);
    let off = ok("[server]\nidentity-dir = \"/certs\"\nproxy-protocol = false\n");
    assert!(
        off.sections[0]
            .field("proxy-protocol")
            .unwrap()
            .args
            .is_empty()
    );
}

#[test]
fn a_value_starting_with_a_dash_stays_a_value() {
    let file = ok(&format!("log = \"-x\"\n{SERVER}"));
    assert_eq!(global_argv(&file), ["--log=-x"]);
    assert_eq!(file.global[0].values(), ["-x"]);
    let mut argv = vec![OsString::from("hbone")];
    argv.extend(global_argv(&file));
    argv.extend(file.sections[0].argv());
    assert!(Cli::try_parse_from(argv).is_ok());
}

#[test]
fn relative_paths_are_relative_to_the_file() {
    let file = ok("[server]\nidentity-dir = \"certs\"\npolicy = \"/abs/policy.toml\"\n");
    let server = &file.sections[0];
    assert_eq!(
        args(server.field("identity-dir").unwrap()),
        ["--identity-dir", "/etc/hbone/certs"]
    );
    assert_eq!(
        args(server.field("policy").unwrap()),
        ["--policy", "/abs/policy.toml"]
    );
    // Strings that are not paths are left alone.
    let forward = ok(
        "[[forward]]\nidentity-dir = \"/c\"\nlisten = \"127.0.0.1:1\"\n\
         server = \"127.0.0.1:2\"\nserver-id = \"spiffe://td/s\"\ntarget = \"127.0.0.1:3\"\nnetwork = \"a/b\"\n",
    );
    let network = forward.sections[0].field("network").unwrap();
    assert_eq!(args(network), ["--network", "a/b"]);
    // In NAME=FILE values, the file part.
    let server = ok("[server]\nidentity-dir = \"/c\"\n\
         federated-bundle = [\"partner.example=partner.pem\", \"other.example=/abs/o.pem\"]\n");
    assert_eq!(
        args(server.sections[0].field("federated-bundle").unwrap()),
        [
            "--federated-bundle",
            "partner.example=/etc/hbone/partner.pem",
            "--federated-bundle",
            "other.example=/abs/o.pem"
        ]
    );
}

/// `example` with its commented-out sections turned on as a reader would:
/// one `# ` removed from each line from the section's header down to the
/// next `# ----` banner.
fn all_sections_on(example: &str) -> String {
    let headers: Vec<String> = Schema::cli()
        .sections
        .iter()
        .map(|s| format!("# {}", s.header()))
        .collect();
    let mut on = false;
    let mut text = String::new();
    for line in example.lines() {
        on = (on || headers.iter().any(|h| h == line)) && !line.starts_with("# ---- ");
        text.push_str(if on {
            line.strip_prefix("# ").unwrap_or(line)
        } else {
            line
        });
        text.push('\n');
    }
    text
}

#[test]
fn the_example_runs_the_server_and_each_section_parses_as_its_subcommand() {
    let example = example();
    let file = ok(&example);
    let kinds: Vec<_> = file.sections.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, ["server"], "only [server] is on");

    let file = ok(&all_sections_on(&example));
    let kinds: Vec<_> = file.sections.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, ["server", "forward", "socks5", "gateway", "node"]);
    for section in &file.sections {
        // As `hbone SUBCOMMAND --config` merges them: the file's top-level
        // fields after the section's.
        let mut argv = vec![OsString::from("hbone")];
        argv.extend(section.argv());
        argv.extend(global_argv(&file));
        let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let parsed = match cli.command {
            Command::Server { .. } => "server",
            Command::Forward { .. } => "forward",
            Command::Socks5 { .. } => "socks5",
            Command::Gateway { .. } => "gateway",
            Command::Node { .. } => "node",
            _ => "other",
        };
        assert_eq!(parsed, section.kind);
    }
    assert_eq!(
        file.summary(),
        [
            "server: listen [::]:15008",
            "forward #1: listen 127.0.0.1:8080 -> target 127.0.0.1:80",
            "socks5 #1: listen 127.0.0.1:1080",
            "gateway: listen [::]:15009",
            "node: listen 127.0.0.1:15001",
        ]
    );
}

#[test]
fn every_commented_example_value_is_valid() {
    assert_eq!(example::missing_samples(), Vec::<String>::new());
    for (kind, name, value) in example::commented_samples() {
        let text = if kind.is_empty() {
            format!("{name} = {value}\n{SERVER}")
        } else {
            format!("[{kind}]\n{name} = {value}\n")
        };
        // Only the value is at stake: the section may lack required fields.
        if let Err(e) = parse(&text, Path::new("x.toml")) {
            let e = e.to_string();
            assert!(
                !e.contains(&format!(" {name}: ")) && !e.contains("syntax"),
                "{kind} {name} = {value}: {e}"
            );
        }
    }
}

#[test]
fn unknown_names() {
    assert_eq!(
        err("[server]\nlistne = \"[::]:1\"\n")
            .split(" valid fields")
            .next(),
        Some("hbone.toml:2: [server] listne: unknown field; did you mean listen?")
    );
    let e = err("[server]\nzzzzzzzz = 1\n");
    assert!(
        e.contains("unknown field; valid fields: identity-dir, "),
        "{e}"
    );
    assert_eq!(
        err("[servre]\n"),
        "hbone.toml:1: unknown section [servre]; did you mean [server]? \
         valid sections: [server], [[forward]], [[socks5]], [gateway], [node]"
    );
    assert!(err("[[forwrd]]\n").contains("did you mean [[forward]]?"));
    assert!(
        err("listen = \"[::]:1\"\n")
            .contains("listen is not a top-level field: it belongs in a section ([server], ")
    );
    assert!(err("logg = \"x\"\n").contains("unknown top-level field logg; did you mean log?"));
    assert_eq!(
        err("[server]\nlog = \"debug\"\n"),
        "hbone.toml:2: [server] log: a top-level field: put it at the top of the file, before any section"
    );
}

#[test]
fn wrong_types() {
    assert_eq!(
        err("[server]\nidentity-dir = \"/c\"\nmax-tunnels = true\n"),
        "hbone.toml:3: [server] max-tunnels: the value must be an integer, found a boolean"
    );
    assert_eq!(
        err("[server]\nlisten = 1.5\n"),
        "hbone.toml:2: [server] listen: the value must be a string, found a float"
    );
    assert_eq!(
        err("[server]\nproxy-protocol = 1\n"),
        "hbone.toml:2: [server] proxy-protocol: expected true or false, found an integer"
    );
    assert_eq!(
        err("[server]\nallow-id = [\"spiffe://td/*\",\n  true]\n"),
        "hbone.toml:3: [server] allow-id: each value must be a string, found a boolean"
    );
    assert_eq!(
        err("[server]\nlisten = [\"[::]:1\"]\n"),
        "hbone.toml:2: [server] listen: takes a single value, not an array (only repeatable fields take arrays)"
    );
    assert!(err("server = 1\n").contains("server must be a section ([server]), not an integer"));
    assert!(err("[forward]\n").contains("write [[forward]] with double brackets"));
}

#[test]
fn bad_values_use_the_flags_parsers() {
    assert_eq!(
        err("[server]\nidentity-dir = \"/c\"\ndrain-timeout = \"5 minutes\"\n"),
        "hbone.toml:3: [server] drain-timeout: \"5 minutes\": unknown unit \" minutes\" (use ms, s, m or h)"
    );
    assert_eq!(
        err("[server]\nidentity-dir = \"/c\"\nconnect-timeout = 0\n"),
        "hbone.toml:3: [server] connect-timeout: invalid value \"0\": a timeout of zero would fail everything; give a positive duration"
    );
    assert_eq!(
        err("log-format = \"xml\"\n"),
        "hbone.toml:1: log-format: invalid value \"xml\": expected one of: text, json"
    );
    assert_eq!(
        err("threads = 0\n"),
        "hbone.toml:1: threads: invalid value \"0\": 0 is not in 1..=65535"
    );
    assert_eq!(
        err("[server]\nmax-tunnels = \"many\"\n"),
        "hbone.toml:2: [server] max-tunnels: invalid value \"many\": invalid digit found in string; expected an integer"
    );
    assert_eq!(
        err("[server]\nallow-target = [\"10.0.0.0/8\",\n  \"nowhere\"]\n"),
        "hbone.toml:3: [server] allow-target: invalid IP address \"nowhere\"; e.g. 10.0.0.0/8:80-443"
    );
}

#[test]
fn whole_sections_are_checked() {
    assert_eq!(
        err(
            "[[forward]]\nidentity-dir = \"/c\"\nlisten = \"127.0.0.1:1\"\nserver = \"127.0.0.1:2\"\ntarget = \"127.0.0.1:3\"\n"
        ),
        "hbone.toml:1: [[forward]] #1: missing required field server-id (SPIFFE ID the server must present (spiffe://TD alone: any workload of TD); repeat to accept any of several)"
    );
    assert_eq!(
        err("[server]\ncert = \"c.pem\"\n"),
        "hbone.toml:1: [server]: missing required fields key, trust-bundle"
    );
    assert_eq!(
        err(
            "[server]\ncert = \"c.pem\"\nkey = \"k.pem\"\ntrust-bundle = \"b.pem\"\nidentity-dir = \"/c\"\n"
        ),
        "hbone.toml:5: [server] identity-dir: cannot be used together with cert (line 2); remove one of them"
    );
    assert_eq!(
        err("[server]\nlisten = \"[::]:1\"\n"),
        "hbone.toml:1: [server]: no identity: set identity-dir, or cert, key and trust-bundle, or istio-ca, or workload-api"
    );
    let forward = "identity-dir = \"/c\"\nlisten = \"127.0.0.1:1\"\nserver-id = \"spiffe://td/s\"\ntarget = \"127.0.0.1:3\"\n";
    assert_eq!(
        err(&format!(
            "[[forward]]\nserver = \"127.0.0.1:2\"\n{forward}[[forward]]\n{forward}"
        )),
        "hbone.toml:7: [[forward]] #2: no route: set server, or gateway with gateway-id and service"
    );
}

#[test]
fn listeners_must_not_collide() {
    let gateway = "[gateway]\nidentity-dir = \"/c\"\nroutes = \"/r.toml\"\n";
    assert_eq!(
        err(&format!("{SERVER}{gateway}")),
        "hbone.toml:3: [gateway] listen [::]:15008 (default) conflicts with [server] listen [::]:15008 (default) \
         at line 1: both would listen on port 15008; give one of them another address"
    );
    ok(&format!("{SERVER}{gateway}listen = \"[::]:15009\"\n"));
    let socks = |listen: &str| {
        format!(
            "[[socks5]]\nidentity-dir = \"/c\"\nserver-id = \"spiffe://td/s\"\nlisten = \"{listen}\"\n"
        )
    };
    // Same port on distinct addresses is fine; an unspecified one takes all.
    ok(&format!(
        "{}{}",
        socks("127.0.0.1:1080"),
        socks("127.0.0.2:1080")
    ));
    assert_eq!(
        err(&format!(
            "{}{}allow-remote-clients = true\n",
            socks("127.0.0.1:1080"),
            socks("0.0.0.0:1080")
        )),
        "hbone.toml:8: [[socks5]] #2 listen 0.0.0.0:1080 conflicts with [[socks5]] #1 listen 127.0.0.1:1080 \
         at line 4: both would listen on port 1080; give one of them another address"
    );
}

#[test]
fn entries_off_loopback_must_say_who_may_use_them() {
    let socks = |listen: &str, extra: &str| {
        format!(
            "[[socks5]]\nidentity-dir = \"/c\"\nserver-id = \"spiffe://td/s\"\nlisten = \"{listen}\"\n{extra}"
        )
    };
    let refused = err(&socks("0.0.0.0:1080", ""));
    assert!(
        refused.starts_with(
            "hbone.toml:4: [[socks5]] #1 listen: refusing to listen on 0.0.0.0:1080: it is not a loopback address"
        ),
        "{refused}"
    );
    assert!(
        refused.contains("allow-source = [") && refused.contains("socks5-credentials = "),
        "{refused}"
    );
    assert!(err(&socks("[::]:1080", "")).contains("refusing to listen on [::]:1080"));
    ok(&socks("[::1]:1080", ""));
    ok(&socks("0.0.0.0:1080", "allow-remote-clients = true\n"));
    ok(&socks("0.0.0.0:1080", "allow-source = [\"10.1.0.0/16\"]\n"));
    ok(&socks("0.0.0.0:1080", "socks5-credentials = \"/users\"\n"));
    // A switch set to false says nothing.
    assert!(err(&socks("0.0.0.0:1080", "allow-remote-clients = false\n")).contains("refusing"));
    let forward = "[[forward]]\nidentity-dir = \"/c\"\nserver = \"127.0.0.1:2\"\nserver-id = \"spiffe://td/s\"\n\
                   target = \"127.0.0.1:3\"\nlisten = \"192.0.2.1:8080\"\n";
    let refused = err(forward);
    assert!(
        refused.starts_with(
            "hbone.toml:6: [[forward]] #1 listen: refusing to listen on 192.0.2.1:8080"
        ),
        "{refused}"
    );
    assert!(!refused.contains("credentials"), "{refused}");
    ok(&format!("{forward}allow-source = \"192.0.2.0/24\"\n"));
    assert!(err(&format!("{forward}allow-source = \"10.0.0.0/8:80\"\n")).contains("names a port"),);
    assert!(
        err(&format!(
            "{forward}allow-source = \"10.0.0.0/8\"\nallow-remote-clients = true\n"
        ))
        .contains("cannot be used together"),
    );
}

#[test]
fn the_admin_address_is_a_listener() {
    // Without an `admin` field, `hbone run` listens on 127.0.0.1:15000.
    let schema = Schema::from_command(Cli::command());
    let parse = |text: &str| parse_with(&schema, text, Path::new("hbone.toml"));
    let socks = "[[socks5]]\nidentity-dir = \"/c\"\nserver-id = \"spiffe://td/s\"\nlisten = \"127.0.0.1:15000\"\n";
    assert_eq!(
        parse(socks).unwrap_err().to_string(),
        "hbone.toml:4: [[socks5]] #1 listen 127.0.0.1:15000 conflicts with admin 127.0.0.1:15000 (default): \
         both would listen on port 15000; give one of them another address"
    );
    assert!(parse(&format!("admin = \"off\"\n{socks}")).is_ok());
    assert_eq!(
        parse(&format!("admin = \"[::]:15008\"\n{SERVER}"))
            .unwrap_err()
            .to_string(),
        "hbone.toml:2: [server] listen [::]:15008 (default) conflicts with admin [::]:15008 at line 1: \
         both would listen on port 15008; give one of them another address"
    );
}

#[test]
fn structure_errors() {
    assert_eq!(
        err(&format!("{SERVER}\n{SERVER}")),
        "hbone.toml:4: [server] given twice (first at line 1): a file has at most one [server]; \
         only [[forward]] and [[socks5]] repeat"
    );
    assert!(
        err("[[server]]\nidentity-dir = \"/c\"\n")
            .contains("server must be one [server] table, not an array")
    );
    assert_eq!(
        err("[server]\nidentity-dir = \"/c\"\nidentity-dir = \"/d\"\n"),
        "hbone.toml:3: [server] identity-dir: given twice"
    );
    assert_eq!(
        err("[server]\nlisten = \"[::]:1\n"),
        "hbone.toml:2: TOML syntax error in [server]: invalid basic string, expected `\"`"
    );
    assert!(
        err("[server]\nlisten = 0.0.0.0:15008 # comment\n")
            .ends_with("; strings need quotes: listen = \"0.0.0.0:15008\""),
    );
    assert_eq!(
        err("threads = 4\n# nothing else\n"),
        "hbone.toml: nothing to run: add a [server], [gateway], [[forward]], [[socks5]] or [node] section"
    );
    assert_eq!(
        err(""),
        "hbone.toml: nothing to run: add a [server], [gateway], [[forward]], [[socks5]] or [node] section"
    );
}

#[test]
fn a_missing_file_is_named() {
    let e = load(Path::new("/nonexistent/hbone.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("cannot read config file /nonexistent/hbone.toml: "),
        "{e}"
    );
}

#[test]
fn the_docs_error_cases_fail_and_the_rest_pass() {
    for (title, toml) in docs::ERROR_CASES {
        assert!(
            parse(toml, Path::new("hbone.toml")).is_err(),
            "{title} should fail"
        );
    }
    ok(docs::values_example());
}

/// The top-level fields as global flags.
fn global_argv(file: &ConfigFile) -> Vec<std::ffi::OsString> {
    file.global.iter().flat_map(|f| f.args.clone()).collect()
}

proptest::proptest! {
    /// Whatever the operator writes, the answer is a file or one line of
    /// error naming the file, never a panic.
    #[test]
    fn any_text_parses_or_fails_with_one_line(text in "(?s).{0,300}") {
        if let Err(e) = parse(&text, Path::new("hbone.toml")) {
            let message = e.to_string();
            proptest::prop_assert!(message.starts_with("hbone.toml"), "{message}");
            proptest::prop_assert!(!message.contains('\n'), "{message}");
        }
    }

    /// Near-valid files: real sections and field names with arbitrary
    /// values of every TOML type.
    #[test]
    fn real_fields_with_any_values(
        section in proptest::sample::select(vec!["[server]", "[gateway]", "[[forward]]", "[[socks5]]"]),
        field in proptest::sample::select(vec![
            "listen", "allow-target", "max-tunnels", "drain-timeout", "proxy-protocol",
            "server-id", "identity-dir", "admin", "threads", "routes", "no-pool",
        ]),
        value in proptest::sample::select(vec![
            "1", "-1", "0", "99999999999999999999", "true", "\"\"", "\"5s\"", "\"x\"",
            "[]", "[1, 2]", "[\"a\", \"b\"]", "{ a = 1 }", "1.5", "1979-05-27",
            "\"[::]:15008\"", "\"127.0.0.1:0\"", "\"10.0.0.0/8:80-443\"",
        ]),
    ) {
        let text = format!("{section}\nidentity-dir = \"/c\"\n{field} = {value}\n");
        if let Err(e) = parse(&text, Path::new("hbone.toml")) {
            proptest::prop_assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
}
