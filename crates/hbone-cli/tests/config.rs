//! `hbone config`: the committed docs match the code, and every file they
//! show behaves as they say.

use std::path::Path;
use std::process::{Command, Output};

fn hbone(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hbone"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("run hbone")
}

/// Runs `hbone config check --syntax-only hbone.toml` on `text`, from the
/// file's directory so that errors name it `hbone.toml` as the docs do.
/// (The docs' examples name files under /etc/hbone that are not here.)
fn check(text: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hbone.toml"), text).unwrap();
    hbone(
        dir.path(),
        &["config", "check", "--syntax-only", "hbone.toml"],
    )
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn docs() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/config.md")).unwrap()
}

/// The fenced blocks of `markdown`, as (language, content).
fn blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let mut content = String::new();
            for line in lines.by_ref() {
                if line == "```" {
                    break;
                }
                content.push_str(line);
                content.push('\n');
            }
            blocks.push((lang.to_owned(), content));
        }
    }
    blocks
}

#[test]
fn docs_are_up_to_date() {
    let output = hbone(Path::new("."), &["config", "docs"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output) == docs(),
        "docs/config.md is out of date: regenerate it with `cargo run -- config docs > docs/config.md`"
    );
}

#[test]
fn the_files_in_the_docs_pass_and_the_errors_are_as_documented() {
    let docs = docs();
    let (body, errors) = docs.split_once("\n## Errors\n").expect("an Errors section");
    let valid: Vec<_> = blocks(body)
        .into_iter()
        .filter(|(lang, _)| lang == "toml")
        .collect();
    assert!(valid.len() >= 2, "the values example and the full example");
    for (_, text) in valid {
        let output = check(&text);
        assert!(output.status.success(), "{text}\n{}", stderr(&output));
    }
    let cases = blocks(errors);
    assert!(
        cases.len() >= 16,
        "about 8 cases, each a file and a message"
    );
    for pair in cases.chunks(2) {
        let [(lang, text), (kind, message)] = pair else {
            panic!("a toml block without its message");
        };
        assert_eq!((lang.as_str(), kind.as_str()), ("toml", "text"));
        let output = check(text);
        assert!(!output.status.success(), "{text} should fail");
        assert_eq!(
            stderr(&output).trim_end(),
            message.trim_end(),
            "for\n{text}"
        );
    }
}

/// `text` with the commented-out section under `header` turned on, as
/// the example tells a reader to: one `# ` removed from each line from
/// `# HEADER` down to the next `# ----` banner.
fn uncomment(text: &str, header: &str) -> String {
    let mut on = false;
    let mut out = String::new();
    for line in text.lines() {
        on = (on || line == format!("# {header}")) && !line.starts_with("# ---- ");
        out.push_str(if on {
            line.strip_prefix("# ").unwrap_or(line)
        } else {
            line
        });
        out.push('\n');
    }
    out
}

/// The example has exactly one section on, a server; every other section
/// `hbone run` accepts is there commented out, and stays valid when
/// uncommented, one at a time or all together.
#[test]
fn the_example_has_one_section_on_and_the_others_commented_out() {
    let example = hbone(Path::new("."), &["config", "example"]);
    assert!(example.status.success());
    let example = stdout(&example);
    let output = check(&example);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "server: listen [::]:15008\n");
    let on: Vec<&str> = example.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(
        on,
        ["[server]"],
        "exactly one section header is not commented out"
    );

    // The sections `hbone run` accepts, as the checker lists them.
    let refused = check("[nowhere]\n");
    let listed = stderr(&refused);
    let headers: Vec<&str> = listed
        .split_once("valid sections: ")
        .unwrap_or_else(|| panic!("no section list in {listed}"))
        .1
        .trim()
        .split(", ")
        .collect();
    assert_eq!(headers.len(), 5, "{headers:?}");
    let commented: Vec<&str> = headers
        .iter()
        .copied()
        .filter(|h| !on.contains(h))
        .collect();
    assert_eq!(commented.len(), 4, "{headers:?}");

    let mut all = example.clone();
    for header in &commented {
        assert!(
            example.lines().any(|l| l == format!("# {header}")),
            "{header} is not in the example, commented out"
        );
        let with_it = uncomment(&example, header);
        assert_ne!(with_it, example);
        let output = check(&with_it);
        assert!(
            output.status.success(),
            "with {header} uncommented: {}",
            stderr(&output)
        );
        let kind = header.trim_matches(['[', ']']);
        assert_eq!(stdout(&output).lines().count(), 2, "{}", stdout(&output));
        assert!(
            stdout(&output).lines().nth(1).unwrap().starts_with(kind),
            "{}",
            stdout(&output)
        );
        all = uncomment(&all, header);
    }
    let output = check(&all);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "server: listen [::]:15008\n\
         forward #1: listen 127.0.0.1:8080 -> target 127.0.0.1:80\n\
         socks5 #1: listen 127.0.0.1:1080\n\
         gateway: listen [::]:15009\n\
         node: listen 127.0.0.1:15001\n"
    );
}

/// The commands the example's introduction gives make what its server
/// needs: after them, the full check (identity files included) passes.
#[test]
fn the_example_server_runs_after_the_commands_it_gives() {
    let dir = tempfile::tempdir().unwrap();
    let example = stdout(&hbone(dir.path(), &["config", "example"]));
    let intro = example.split("# ---- ").next().unwrap();
    let commands: Vec<Vec<&str>> = intro
        .lines()
        .filter_map(|l| l.strip_prefix("#   hbone ca "))
        .map(|l| ["ca"].into_iter().chain(l.split_whitespace()).collect())
        .collect();
    assert_eq!(commands.len(), 2, "ca init and ca issue: {intro}");
    for command in &commands {
        let output = hbone(dir.path(), command);
        assert!(output.status.success(), "{command:?}: {}", stderr(&output));
    }
    std::fs::write(dir.path().join("hbone.toml"), &example).unwrap();
    let output = hbone(dir.path(), &["config", "check", "hbone.toml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "server: listen [::]:15008\n");
}

#[test]
fn a_missing_file_is_named() {
    let output = hbone(
        Path::new("."),
        &["config", "check", "/nonexistent/hbone.toml"],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).starts_with("error: cannot read config file /nonexistent/hbone.toml: "),
        "{}",
        stderr(&output)
    );
}

#[test]
fn an_error_names_the_line_and_field() {
    let output = check("[server]\nidentity-dir = \"certs\"\n\nmax-tunnels = \"lots\"\n");
    assert!(!output.status.success());
    assert_eq!(
        stderr(&output),
        "error: hbone.toml:4: [server] max-tunnels: invalid value \"lots\": \
         invalid digit found in string; expected an integer\n"
    );
}

/// Without --syntax-only, `config check` reads the files a config names, as
/// the commands would: each problem on its own line naming line, section
/// and field, in the file's order, then one error.
#[test]
fn check_reads_the_files_a_config_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let certs = dir.path().join("certs");
    let run = |args: &[&str]| hbone(dir.path(), args);
    assert!(
        run(&["ca", "init", "--out", ca.to_str().unwrap()])
            .status
            .success()
    );
    let issued = run(&[
        "ca",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--id",
        "spiffe://cluster.local/ns/demo/sa/server",
        "--out",
        certs.to_str().unwrap(),
    ]);
    assert!(issued.status.success());
    std::fs::write(
        dir.path().join("policy.toml"),
        "[[rule]]\nto = [\"10.0.0.1/8\"]\n",
    )
    .unwrap();
    let config = "[server]\nidentity-dir = \"certs\"\npolicy = \"policy.toml\"\n\n\
                  [gateway]\nidentity-dir = \"missing\"\nlisten = \"127.0.0.1:15009\"\nroutes = \"routes.toml\"\n";
    std::fs::write(dir.path().join("hbone.toml"), config).unwrap();

    let output = run(&["config", "check", "hbone.toml"]);
    assert!(!output.status.success());
    let lines: Vec<String> = stderr(&output).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(
        lines[0].starts_with("hbone.toml:3: [server] policy: ") && lines[0].contains("host bits"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("hbone.toml:6: [gateway] identity-dir: "),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("hbone.toml:8: [gateway] routes: ")
            && lines[2].contains("routes.toml"),
        "{lines:?}"
    );
    assert!(
        lines[3].starts_with("error: hbone.toml: 3 problem(s)"),
        "{lines:?}"
    );

    // The same file passes on syntax alone.
    let syntax = run(&["config", "check", "--syntax-only", "hbone.toml"]);
    assert!(syntax.status.success(), "{}", stderr(&syntax));

    // Fixed, it passes in full.
    std::fs::write(
        dir.path().join("policy.toml"),
        "[[rule]]\nto = [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("hbone.toml"),
        "[server]\nidentity-dir = \"certs\"\npolicy = \"policy.toml\"\n",
    )
    .unwrap();
    let full = run(&["config", "check", "hbone.toml"]);
    assert!(full.status.success(), "{}", stderr(&full));
    assert!(
        stdout(&full).contains("server: listen"),
        "{}",
        stdout(&full)
    );
}

/// `config check` refuses what the commands would refuse at start: a key
/// that others may read (unless allow-insecure-key-permissions) and a
/// SOCKS5 credentials file that others may read, each named by line.
#[test]
fn check_refuses_keys_and_credentials_others_may_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| hbone(dir.path(), args);
    assert!(run(&["ca", "init", "--out", "ca"]).status.success());
    let issued = run(&[
        "ca",
        "issue",
        "--ca",
        "ca",
        "--id",
        "spiffe://cluster.local/ns/demo/sa/client",
        "--out",
        "certs",
    ]);
    assert!(issued.status.success());
    let mode = |name: &str, mode: u32| {
        std::fs::set_permissions(dir.path().join(name), std::fs::Permissions::from_mode(mode))
            .unwrap()
    };
    mode("certs/key.pem", 0o644);
    std::fs::write(dir.path().join("users"), "alice:s3cret\n").unwrap();
    mode("users", 0o644);
    let config = "[[socks5]]\nidentity-dir = \"certs\"\nserver-id = \"spiffe://cluster.local/ns/demo/sa/server\"\n\
                  listen = \"127.0.0.1:1080\"\nsocks5-credentials = \"users\"\n";
    std::fs::write(dir.path().join("hbone.toml"), config).unwrap();
    let output = run(&["config", "check", "hbone.toml"]);
    assert!(!output.status.success());
    let lines: Vec<String> = stderr(&output).lines().map(str::to_owned).collect();
    assert!(
        lines[0].starts_with("hbone.toml:2: [socks5] identity-dir: private key ")
            && lines[0].contains("chmod 600")
            && lines[0].contains("set allow-insecure-key-permissions"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("hbone.toml:5: [socks5] socks5-credentials: ")
            && lines[1].contains("readable by group or others"),
        "{lines:?}"
    );

    mode("users", 0o600);
    std::fs::write(
        dir.path().join("hbone.toml"),
        format!("{config}allow-insecure-key-permissions = true\n"),
    )
    .unwrap();
    let output = run(&["config", "check", "hbone.toml"]);
    assert!(output.status.success(), "{}", stderr(&output));
}
