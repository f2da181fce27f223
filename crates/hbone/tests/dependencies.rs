//! What embedders pay for: the library without its optional features must
//! stay a small dependency tree, free of what only the command line, the
//! metrics, the admin endpoint, the development CA or the file formats
//! need.

use std::collections::BTreeSet;
use std::process::Command;

/// Most crates (normal and build dependencies, the library included) that
/// `hbone` with `default-features = false` may pull in.
const MAX_CRATES: usize = 70;

/// Crates that must not be among them.
const FORBIDDEN: [&str; 9] = [
    "clap",
    "tracing-subscriber",
    "tikv-jemallocator",
    "hyper",
    "toml",
    "rcgen",
    "prometheus-client",
    "x509-parser",
    "anyhow",
];

fn tree(features: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            "-p",
            "hbone",
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ])
        .args(["--locked", "--offline"])
        .args(features)
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some(format!("{} {}", words.next()?, words.next()?))
        })
        .collect()
}

#[test]
fn the_bare_library_stays_small() {
    let crates = tree(&["--no-default-features"]);
    let names: BTreeSet<&str> = crates.iter().filter_map(|c| c.split(' ').next()).collect();
    assert!(
        crates.len() <= MAX_CRATES,
        "{} crates (at most {MAX_CRATES}): {crates:?}",
        crates.len()
    );
    for name in FORBIDDEN {
        assert!(
            !names.contains(name),
            "{name} is in the bare library's tree"
        );
    }
    assert!(
        names.contains("rustls") && names.contains("h2"),
        "{names:?}"
    );
}

#[test]
fn each_feature_brings_its_own_crates() {
    let has = |features: &[&str], name: &str| {
        tree(features)
            .iter()
            .any(|c| c.split(' ').next() == Some(name))
    };
    let only = |feature: &'static str| vec!["--no-default-features", "--features", feature];
    assert!(has(&only("metrics"), "prometheus-client"));
    assert!(!has(&only("metrics"), "hyper"));
    assert!(has(&only("admin"), "hyper"));
    assert!(has(&only("ca"), "rcgen"));
    assert!(has(&only("files"), "toml"));
    assert!(!has(&only("ca"), "prometheus-client"));
}
