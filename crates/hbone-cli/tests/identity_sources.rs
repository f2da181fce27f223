//! The binary with its identity from a stand-in for Istio's CA, given by
//! flags and by the config file: no certificate files anywhere.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::{CLIENT_ID, SERVER_ID, hbone, leaf_der, log_lines, presented_cert, spawn_logged};
use crate::common::istio_ca::{ISTIOD_NAME, TestIstioCa};
use crate::common::*;
use crate::revocation_cli::{listen_of, scrape};

const TOKEN: &str = "workload-token";

/// A stand-in CA signing with a fresh development CA, its root and the
/// token written to `dir`.
async fn start_ca(dir: &Path) -> TestIstioCa {
    let ca = TestIstioCa::start(Pki::new().ca, TOKEN).await;
    std::fs::write(dir.join("root-cert.pem"), &ca.root_pem).unwrap();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    ca
}

/// The flags that take the identity `id` from `ca`.
fn istio_flags(ca: &TestIstioCa, dir: &Path, id: &str) -> Vec<String> {
    [
        "--istio-ca",
        &ca.addr.to_string(),
        "--istio-ca-root",
        dir.join("root-cert.pem").to_str().unwrap(),
        "--istio-ca-name",
        ISTIOD_NAME,
        "--token-file",
        dir.join("token").to_str().unwrap(),
        "--cluster-id",
        "Kubernetes",
        "--id",
        id,
    ]
    .map(str::to_owned)
    .to_vec()
}

async fn spawn(args: &[String]) -> (tokio::process::Child, SocketAddr, crate::cli::Log) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_logged(&args).await
}

/// A forward with `identity` (the flags that give it) to `target`
/// through the server at `server`, which must prove SERVER_ID.
async fn forward_with(
    identity: Vec<String>,
    server: SocketAddr,
    target: SocketAddr,
) -> (tokio::process::Child, SocketAddr, crate::cli::Log) {
    let mut args = vec![
        "forward".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--server".into(),
        server.to_string(),
        "--server-id".into(),
        SERVER_ID.into(),
        "--target".into(),
        target.to_string(),
    ];
    args.extend(identity);
    spawn(&args).await
}

/// The flags that take the identity from the directory `dir`.
fn identity_dir(dir: &Path) -> Vec<String> {
    vec!["--identity-dir".into(), dir.to_str().unwrap().into()]
}

async fn echo_through(entry: SocketAddr, data: &[u8]) -> Vec<u8> {
    let stream = TcpStream::connect(entry).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), echo_roundtrip(stream, data))
        .await
        .expect("echo through the tunnel timed out")
        .unwrap()
}

/// A server from flags and a forward from a config file, both issued by
/// the CA at start: a tunnel passes, each side proves the issued ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_forward_take_their_identities_from_the_istio_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start_ca(dir.path()).await;
    let mut server_args = vec!["server".to_owned(), "--listen".into(), "127.0.0.1:0".into()];
    server_args.extend(istio_flags(&ca, dir.path(), SERVER_ID));
    let (_server, server, server_log) = spawn(&server_args).await;
    log_lines(&server_log, "certificate issued by the Istio CA", 1).await;

    let echo = start_echo().await;
    let config = dir.path().join("hbone.toml");
    std::fs::write(
        &config,
        format!(
            "[[forward]]\nlisten = \"127.0.0.1:0\"\nserver = \"{server}\"\nserver-id = \"{SERVER_ID}\"\n\
             target = \"{echo}\"\nistio-ca = \"{}\"\nistio-ca-root = \"root-cert.pem\"\n\
             istio-ca-name = \"{ISTIOD_NAME}\"\ntoken-file = \"token\"\nid = \"{CLIENT_ID}\"\n",
            ca.addr
        ),
    )
    .unwrap();
    let (_forward, forward, forward_log) = spawn(&[
        "run".into(),
        "--admin".into(),
        "off".into(),
        "--config".into(),
        config.to_str().unwrap().into(),
    ])
    .await;
    let data = payload(5, 200_000);
    assert_eq!(echo_through(forward, &data).await, data);

    let seen = ca.seen();
    assert_eq!(seen.len(), 2, "one certificate each: {seen:?}");
    for request in &seen {
        assert_eq!(
            request.authorization.as_deref(),
            Some("Bearer workload-token")
        );
        assert_eq!(request.validity_s, 24 * 3600);
    }
    assert_eq!(seen[0].cluster_id.as_deref(), Some("Kubernetes"));
    assert_eq!(seen[1].cluster_id, None, "not set in the file");
    // Each side's access record names the client's issued identity and
    // where each side's own identity came from.
    for log in [&server_log, &forward_log] {
        let record = log_lines(log, "tunnel closed", 1).await.remove(0);
        assert!(record.contains(CLIENT_ID), "{record}");
        assert!(record.contains("identity_source=\"istio-ca\""), "{record}");
    }
}

/// Certificates of 6 s: the server renews before expiry, new handshakes
/// get the new certificate, a tunnel open across the renewal carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_renews_mid_traffic_and_open_tunnels_continue() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start_ca(dir.path()).await;
    let mut server_args = vec![
        "server".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--cert-lifetime".into(),
        "6s".into(),
        "--identity-out".into(),
        dir.path().join("out").to_str().unwrap().into(),
        "--admin".into(),
        "127.0.0.1:0".into(),
    ];
    server_args.extend(istio_flags(&ca, dir.path(), SERVER_ID));
    let (_server, _, server_log) = spawn(&server_args).await;
    let server = listen_of(&server_log, "HBONE server ready").await;
    let admin = listen_of(&server_log, "admin endpoint ready").await;
    let first = presented_cert(server).await;
    // Written out for other processes: the same certificate, a private key.
    let out = dir.path().join("out");
    assert_eq!(leaf_der(&out.join("cert.pem")), first);
    let written = hbone::Identity::from_dir(&out).unwrap();
    assert_eq!(written.id().as_str(), SERVER_ID);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let echo = start_echo().await;
    let client = istio_flags(&ca, dir.path(), CLIENT_ID);
    let (_forward, forward, _) = forward_with(client, server, echo).await;
    let mut open = TcpStream::connect(forward).await.unwrap();
    let mut back = [0u8; 5];
    open.write_all(b"early").await.unwrap();
    within(PEER_WAIT, "the early echo", open.read_exact(&mut back))
        .await
        .unwrap();

    log_lines(&server_log, "certificate renewed by the Istio CA", 1).await;
    let renewed = presented_cert(server).await;
    assert_ne!(renewed, first, "new handshakes present the new certificate");
    assert_ne!(
        leaf_der(&out.join("cert.pem")),
        first,
        "the written copy follows"
    );
    // Several renewals within the certificate's own lifetime, counted.
    log_lines(&server_log, "certificate renewed by the Istio CA", 2).await;
    let metrics = scrape(admin).await;
    let renewals = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                "hbone_certificate_renewals_total{source=\"istio-ca\",result=\"success\"}",
            )
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(renewals >= Some(2), "{renewals:?} in\n{metrics}");

    open.write_all(b"later").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), open.read_exact(&mut back))
        .await
        .expect("the open tunnel stalled across renewals")
        .unwrap();
    assert_eq!(&back, b"later");
}

/// Start-up failures name what to fix, and a CA whose certificate does
/// not chain to the given root never sees the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_source_mistakes_stop_the_start_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start_ca(dir.path()).await;
    let run = |extra: Vec<String>| async move {
        let mut args = vec!["server".to_owned(), "--listen".into(), "127.0.0.1:0".into()];
        args.extend(extra);
        let output = tokio::time::timeout(
            Duration::from_secs(20),
            hbone(&args.iter().map(String::as_str).collect::<Vec<_>>()).output(),
        )
        .await
        .expect("hbone did not exit")
        .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };

    let wrong_root = dir.path().join("other-root.pem");
    std::fs::write(&wrong_root, Pki::new().ca.cert_pem()).unwrap();
    let mut flags = istio_flags(&ca, dir.path(), SERVER_ID);
    flags[3] = wrong_root.to_str().unwrap().to_owned();
    let stderr = run(flags).await;
    assert!(stderr.contains("no token was sent"), "{stderr}");
    assert!(stderr.contains(&ca.addr.to_string()), "{stderr}");
    assert!(ca.seen().is_empty(), "the token reached an unverified CA");

    let mut flags = istio_flags(&ca, dir.path(), SERVER_ID);
    flags[7] = dir
        .path()
        .join("missing-token")
        .to_str()
        .unwrap()
        .to_owned();
    let stderr = run(flags).await;
    assert!(stderr.contains("cannot read the token file"), "{stderr}");
    assert!(stderr.contains("missing-token"), "{stderr}");

    let mut flags = istio_flags(&ca, dir.path(), "spiffe://elsewhere/ns/a/sa/b");
    flags.truncate(12);
    let stderr = run(flags).await;
    assert!(
        stderr.contains("refused the certificate request"),
        "{stderr}"
    );
    assert!(stderr.contains("elsewhere"), "{stderr}");

    let stderr = run(vec![
        "--identity-dir".into(),
        dir.path().to_str().unwrap().into(),
        "--identity-out".into(),
        dir.path().join("out").to_str().unwrap().into(),
    ])
    .await;
    assert!(
        stderr.contains("give --istio-ca or --workload-api"),
        "{stderr}"
    );

    // A partner bundle for our own trust domain is a mistake.
    crate::common::workload_api::svid(&Pki::new().ca, SERVER_ID)
        .save(dir.path().join("server"))
        .unwrap();
    let stderr = run(vec![
        "--identity-dir".into(),
        dir.path().join("server").to_str().unwrap().into(),
        "--federated-bundle".into(),
        format!("cluster.local={}", wrong_root.display()),
    ])
    .await;
    assert!(
        stderr.contains("names cluster.local, this identity's own trust domain"),
        "{stderr}"
    );

    let output = tokio::time::timeout(
        Duration::from_secs(20),
        hbone(&["server", "--listen", "127.0.0.1:0", "--workload-api"])
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .output(),
    )
    .await
    .expect("hbone did not exit")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("SPIFFE_ENDPOINT_SOCKET"), "{stderr}");

    let closed = closed_port().await;
    let mut flags = istio_flags(&ca, dir.path(), SERVER_ID);
    flags[1] = closed.to_string();
    let stderr = run(flags).await;
    assert!(
        stderr.contains(&format!("cannot reach the Istio CA at {closed}")),
        "{stderr}"
    );
}

/// A server whose identity and bundle come from a Workload API agent: an
/// SVID rotation and a bundle update are used live; a client from a CA
/// the bundle does not hold yet is refused, then accepted once the agent
/// adds that CA, while a tunnel open across both updates carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_follows_the_workload_api_for_rotations_and_bundles() {
    use crate::common::workload_api::{TestAgent, svid};
    let dir = tempfile::tempdir().unwrap();
    let mesh = Pki::new();
    let agent = TestAgent::start(dir.path(), &svid(&mesh.ca, SERVER_ID), mesh.ca.cert_pem()).await;
    // `--workload-api` alone: the endpoint comes from the environment,
    // as SPIRE's tools expect.
    let endpoint = agent.endpoint();
    let (_server, server, server_log) = crate::cli::spawn_logged_with_env(
        &["server", "--listen", "127.0.0.1:0", "--workload-api"],
        &[("SPIFFE_ENDPOINT_SOCKET", endpoint.as_ref())],
    )
    .await;
    let started = log_lines(&server_log, "identity from the SPIFFE Workload API", 1).await;
    assert!(started[0].contains(&endpoint), "{started:?}");
    let first = presented_cert(server).await;

    // Clients with files: one from the mesh CA, one from a CA the server
    // does not trust yet (both trust the mesh CA, the server's issuer).
    let ours = svid(&mesh.ca, CLIENT_ID);
    ours.save(dir.path().join("ours")).unwrap();
    let newcomer = Pki::new();
    let mut theirs = svid(&newcomer.ca, CLIENT_ID);
    theirs.bundle_pem = mesh.ca.cert_pem().to_owned();
    theirs.save(dir.path().join("theirs")).unwrap();
    let echo = start_echo().await;
    let forward = |name: &str| forward_with(identity_dir(&dir.path().join(name)), server, echo);
    let (_ours_forward, ours_entry, _) = forward("ours").await;
    let (_theirs_forward, theirs_entry, _) = forward("theirs").await;
    let mut open = TcpStream::connect(ours_entry).await.unwrap();
    let mut back = [0u8; 5];
    open.write_all(b"early").await.unwrap();
    within(PEER_WAIT, "the early echo", open.read_exact(&mut back))
        .await
        .unwrap();
    assert_refused(theirs_entry).await;

    // Rotation: same CA, new SVID.
    agent.push(&svid(&mesh.ca, SERVER_ID), mesh.ca.cert_pem());
    log_lines(
        &server_log,
        "identity updated by the SPIFFE Workload API",
        1,
    )
    .await;
    assert_ne!(presented_cert(server).await, first);
    assert_refused(theirs_entry).await;

    // Bundle update: the newcomer's CA joins the trust bundle.
    let both = format!("{}{}", mesh.ca.cert_pem(), newcomer.ca.cert_pem());
    agent.push(&svid(&mesh.ca, SERVER_ID), &both);
    log_lines(
        &server_log,
        "identity updated by the SPIFFE Workload API",
        2,
    )
    .await;
    let data = payload(9, 50_000);
    assert_eq!(echo_through(theirs_entry, &data).await, data);
    let record = log_lines(&server_log, "tunnel closed", 1).await.remove(0);
    assert!(
        record.contains("identity_source=\"workload-api\""),
        "{record}"
    );

    open.write_all(b"later").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), open.read_exact(&mut back))
        .await
        .expect("the open tunnel stalled across updates")
        .unwrap();
    assert_eq!(&back, b"later");
}

/// A forward whose tunnel the server refuses: the entry closes the
/// client's connection without echoing anything.
async fn assert_refused(entry: SocketAddr) {
    let mut stream = TcpStream::connect(entry).await.unwrap();
    let _ = stream.write_all(b"probe").await;
    let mut buf = [0u8; 5];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("the refused tunnel neither answered nor closed");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "echoed through an untrusted client: {read:?}"
    );
}

/// `--federated-bundle TD=FILE` on a server with files: a partner-domain
/// client passes only once the file holds its domain's roots (the file is
/// watched with the identity), and only the partner ID the policy names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_files_federates_with_a_partner_domain_from_a_bundle_file() {
    use crate::common::workload_api::svid;
    use hbone::ca::DevCa;
    const PARTNER: &str = "spiffe://partner.example/ns/billing/sa/api";
    const PARTNER_OTHER: &str = "spiffe://partner.example/ns/billing/sa/batch";
    let dir = tempfile::tempdir().unwrap();
    let ours = Pki::new();
    svid(&ours.ca, SERVER_ID)
        .save(dir.path().join("server"))
        .unwrap();
    let partner = DevCa::generate("partner.example", DAY).unwrap();
    let impostor = DevCa::generate("partner.example", DAY).unwrap();
    for (name, id) in [("api", PARTNER), ("batch", PARTNER_OTHER)] {
        let mut client = svid(&partner, id);
        client.bundle_pem = ours.ca.cert_pem().to_owned();
        client.save(dir.path().join(name)).unwrap();
    }
    // At first the file holds another CA's roots for that domain.
    let roots = dir.path().join("partner-roots.pem");
    std::fs::write(&roots, impostor.cert_pem()).unwrap();
    let (_server, server, server_log) = spawn(&[
        "server".into(),
        "--identity-dir".into(),
        dir.path().join("server").to_str().unwrap().into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--federated-bundle".into(),
        format!("partner.example={}", roots.display()),
        "--allow-id".into(),
        PARTNER.into(),
    ])
    .await;
    let echo = start_echo().await;
    let forward = |name: &str| forward_with(identity_dir(&dir.path().join(name)), server, echo);
    let (_api_forward, api_entry, _) = forward("api").await;
    let (_batch_forward, batch_entry, _) = forward("batch").await;
    assert_refused(api_entry).await;
    log_lines(&server_log, "handshake failed", 1).await;

    std::fs::write(&roots, partner.cert_pem()).unwrap();
    log_lines(&server_log, "identity reloaded", 1).await;
    let data = payload(4, 30_000);
    assert_eq!(echo_through(api_entry, &data).await, data);
    let record = log_lines(&server_log, "tunnel closed", 1).await.remove(0);
    assert!(record.contains(&format!("peer=\"{PARTNER}\"")), "{record}");
    assert!(record.contains("identity_source=\"files\""), "{record}");
    // The same domain's other workload is not named by the policy.
    assert_refused(batch_entry).await;
}
