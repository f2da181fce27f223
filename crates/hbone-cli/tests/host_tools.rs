//! What the tests that build hosts out of network namespaces need of the
//! machine: root, and tools such as `ip`, `nft` or `iptables`.

use std::process::Command;

/// Fails the test with how to get `tool` when it is not on the path.
/// `file` names the test file that needs it.
pub(crate) fn require(tool: &str, file: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{file} needs `{tool}`; run `bash scripts/install-test-deps.sh` as root"
    );
}

/// Whether this process may create network namespaces. Without root, a
/// developer's run skips the test with a visible line; in CI (`CI` set,
/// as `.ci/run` does) it must run, so a missing root fails loudly.
/// `needs` says for what, e.g. "network namespaces, iptables".
pub(crate) fn root_or_skip(test: &str, needs: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root ({needs}), and CI must run it"
    );
    // Straight to stderr: the test harness captures `eprintln!` of a
    // passing test, and a skip must be seen.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("SKIPPED {test}: needs root ({needs}); run as root or with CI set\n").as_bytes(),
    );
    false
}
