//! Unit tests of the TLS room: real handshakes over loopback sockets between credentials issued
//! here, and each kind of refusal with the error that names it.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use super::{
    certs_cmd::{self, CertsArgs, CertsCmd, CertsError},
    issue::{new_ca, new_node, Issued, NodeSpec, Validity},
    CertOrigin, CertTime, ClientAuth, Credentials, Endpoint, PeerPolicy, TlsClient, TlsError, TlsServer,
    CA_CERT, CA_KEY,
};

const T: Duration = Duration::from_secs(5);

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("getrandom");
        let p = std::env::temp_dir().join(format!(
            "mirror-tls-{tag}-{}-{:x}",
            std::process::id(),
            u64::from_le_bytes(r)
        ));
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

/// A CA of its own name (as `mirror certs ca` names them), valid from a month ago.
fn ca() -> Issued {
    let mut r = [0u8; 4];
    getrandom::fill(&mut r).expect("getrandom");
    let name = format!("test CA {:08x}", u32::from_le_bytes(r));
    new_ca(&name, Validity { not_before: now() - days(30), not_after: now() + days(30) }).expect("CA")
}

/// Writes a node's credentials directory `root/name` issued by `ca`.
fn node_in(root: &Path, ca: &Issued, name: &str, validity: Validity) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("node dir");
    let spec = NodeSpec { name: name.into(), ips: vec!["127.0.0.1".parse().expect("ip")], dns: vec![] };
    let certs = new_node(ca, &spec, validity).expect("node certs");
    for (file, contents) in [
        (CA_CERT, &ca.cert_pem),
        ("server-cert.pem", &certs.server.cert_pem),
        ("server-key.pem", &certs.server.key_pem),
        ("client-cert.pem", &certs.client.cert_pem),
        ("client-key.pem", &certs.client.key_pem),
    ] {
        std::fs::write(dir.join(file), contents).expect("write credential");
    }
    dir
}

fn node(root: &Path, ca: &Issued, name: &str) -> PathBuf {
    node_in(root, ca, name, Validity::days_from(now(), 10))
}

fn server(dir: &Path, auth: ClientAuth) -> TlsServer {
    TlsServer::from_dir(dir, auth, now()).expect("server credentials")
}

fn client(dir: &Path, policy: PeerPolicy) -> TlsClient {
    TlsClient::from_dir(dir, policy, now()).expect("client credentials")
}

/// Runs `f` on the server side of a fresh loopback connection in a thread; returns the client
/// socket and the thread.
fn loopback<R: Send + 'static>(
    f: impl FnOnce(TcpStream) -> R + Send + 'static,
) -> (TcpStream, std::thread::JoinHandle<R>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let t = std::thread::spawn(move || f(listener.accept().expect("accept").0));
    (TcpStream::connect(addr).expect("connect"), t)
}

#[test]
fn mutual_handshake_reports_both_identities() {
    let root = Scratch::new("mutual");
    let ca = ca();
    let (a, b) = (node(&root.0, &ca, "node-a"), node(&root.0, &ca, "node-b"));
    let srv = server(&a, ClientAuth::Required(PeerPolicy::AnyNode));
    let (tcp, t) = loopback(move |tcp| {
        let (mut s, peer) = srv.accept(tcp, T).expect("server handshake");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read");
        s.write_all(b"world").expect("write");
        s.flush().expect("flush");
        (peer.expect("client certificate").node, buf, s.conn.protocol_version())
    });
    let cl = client(&b, PeerPolicy::node("node-a").expect("name"));
    let (mut s, peer) = cl.connect(tcp, T).expect("client handshake");
    s.write_all(b"hello").expect("write");
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"world");
    assert_eq!(peer.node, "node-a");
    assert_eq!(peer.cert.ip_addresses, vec!["127.0.0.1".parse::<std::net::IpAddr>().expect("ip")]);
    assert_eq!(s.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    // Both ends speak aws-lc-rs: the post-quantum hybrid group is the one agreed.
    assert_eq!(
        s.conn.negotiated_key_exchange_group().map(rustls::crypto::SupportedKxGroup::name),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    let (server_saw, got, version) = t.join().expect("server thread");
    assert_eq!(server_saw, "node-b");
    assert_eq!(&got, b"hello");
    assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
}

#[test]
fn mutual_handshake_on_tokio_streams() {
    let root = Scratch::new("async");
    let ca = ca();
    let (a, b) = (node(&root.0, &ca, "node-a"), node(&root.0, &ca, "node-b"));
    let (srv, cl) = (server(&a, ClientAuth::Required(PeerPolicy::AnyNode)), client(&b, PeerPolicy::AnyNode));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_side = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let (mut s, peer) = srv.accept_async(tcp, T).await.expect("server handshake");
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.expect("read");
            s.write_all(&buf).await.expect("echo");
            s.flush().await.expect("flush");
            peer.expect("client certificate").node
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut s, peer) = cl.connect_async(tcp, T).await.expect("client handshake");
        s.write_all(b"ping").await.expect("write");
        s.flush().await.expect("flush");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        assert_eq!(peer.node, "node-a");
        assert_eq!(server_side.await.expect("server task"), "node-b");
    });
}

/// The client's view of a refusal by the server: TLS 1.3 lets the client finish first, so the
/// server's alert shows either in the handshake or on the first read.
fn client_refusal(cl: &TlsClient, tcp: TcpStream) -> TlsError {
    match cl.connect(tcp, T) {
        Err(e) => e,
        Ok((mut s, _)) => {
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Err(e) => cl.explain(e),
                Ok(n) => panic!("the refused client read {n} bytes"),
            }
        }
    }
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let root = Scratch::new("otherca-client");
    let (ca1, ca2) = (ca(), ca());
    let a = node(&root.0, &ca1, "node-a");
    let stranger = node(&root.0, &ca2, "node-b");
    let srv = server(&a, ClientAuth::Required(PeerPolicy::AnyNode));
    let (tcp, t) = loopback(move |tcp| srv.accept(tcp, T).map(|_| ()));
    // The stranger trusts both CAs (so it accepts node-a's certificate) but holds one of CA 2.
    std::fs::write(stranger.join(CA_CERT), format!("{}{}", ca2.cert_pem, ca1.cert_pem)).expect("CA bundle");
    let cl = client(&stranger, PeerPolicy::AnyNode);
    let seen = client_refusal(&cl, tcp);
    match t.join().expect("server thread") {
        Err(TlsError::NotSignedByCa { cert: CertOrigin::Peer, ca }) => assert_eq!(ca, a.join(CA_CERT)),
        other => panic!("server: {other:?}"),
    }
    assert!(
        matches!(seen, TlsError::RefusedByPeer { alert: rustls::AlertDescription::UnknownCA }),
        "client: {seen:?}"
    );
}

#[test]
fn server_certificate_from_another_ca_is_refused() {
    let root = Scratch::new("otherca-server");
    let (ca1, ca2) = (ca(), ca());
    let b = node(&root.0, &ca1, "node-b");
    let stranger = node(&root.0, &ca2, "node-a");
    let srv = server(&stranger, ClientAuth::Required(PeerPolicy::AnyNode));
    let (tcp, t) = loopback(move |tcp| srv.accept(tcp, T).map(|_| ()));
    let cl = client(&b, PeerPolicy::AnyNode);
    match cl.connect(tcp, T) {
        Err(TlsError::NotSignedByCa { cert: CertOrigin::Peer, ca }) => assert_eq!(ca, b.join(CA_CERT)),
        other => panic!("client: {:?}", other.map(|(_, p)| p)),
    }
    match t.join().expect("server thread") {
        Err(TlsError::RefusedByPeer { alert: rustls::AlertDescription::UnknownCA }) => {}
        other => panic!("server: {other:?}"),
    }
}

#[test]
fn expired_client_certificate_is_refused_by_the_server() {
    let root = Scratch::new("expired");
    let ca = ca();
    let a = node(&root.0, &ca, "node-a");
    let (issued, expired_at) = (now() - days(10), now() - days(1));
    let b = node_in(&root.0, &ca, "node-b", Validity { not_before: issued, not_after: expired_at });
    let srv = server(&a, ClientAuth::Required(PeerPolicy::AnyNode));
    let (tcp, t) = loopback(move |tcp| srv.accept(tcp, T).map(|_| ()));
    // Loaded as of two days ago, when it was still valid: the handshake checks today.
    let cl = TlsClient::from_dir(&b, PeerPolicy::AnyNode, now() - days(2)).expect("valid two days ago");
    let seen = client_refusal(&cl, tcp);
    match t.join().expect("server thread") {
        Err(TlsError::Expired { cert: CertOrigin::Peer, not_after, now: at }) => {
            assert_eq!(not_after, CertTime::at(expired_at));
            assert!(at > not_after);
        }
        other => panic!("server: {other:?}"),
    }
    assert!(
        matches!(seen, TlsError::RefusedByPeer { alert: rustls::AlertDescription::CertificateExpired }),
        "client: {seen:?}"
    );
    // And loading it today names the file and the dates.
    match Credentials::load(&b, Endpoint::Client, now()) {
        Err(TlsError::Expired { cert: CertOrigin::File(p), not_after, .. }) => {
            assert_eq!(p, b.join("client-cert.pem"));
            assert_eq!(not_after, CertTime::at(expired_at));
        }
        other => panic!("load: {other:?}"),
    }
}

#[test]
fn not_yet_valid_certificate_is_refused_at_load() {
    let root = Scratch::new("future");
    let ca = ca();
    let from = now() + days(3);
    let a = node_in(&root.0, &ca, "node-a", Validity { not_before: from, not_after: now() + days(9) });
    match Credentials::load(&a, Endpoint::Server, now()) {
        Err(TlsError::NotYetValid { cert: CertOrigin::File(p), not_before, .. }) => {
            assert_eq!(p, a.join("server-cert.pem"));
            assert_eq!(not_before, CertTime::at(from));
        }
        other => panic!("load: {other:?}"),
    }
}

#[test]
fn server_of_another_name_is_refused_by_the_client() {
    let root = Scratch::new("name-server");
    let ca = ca();
    let (a, b) = (node(&root.0, &ca, "node-a"), node(&root.0, &ca, "node-b"));
    let srv = server(&a, ClientAuth::Required(PeerPolicy::AnyNode));
    let (tcp, t) = loopback(move |tcp| srv.accept(tcp, T).map(|_| ()));
    let cl = client(&b, PeerPolicy::node("node-x").expect("name"));
    match cl.connect(tcp, T) {
        Err(TlsError::WrongIdentity { cert: CertOrigin::Peer, expected, presented }) => {
            assert_eq!(expected, vec!["node-x".to_string()]);
            assert_eq!(presented, vec!["node-a".to_string()]);
        }
        other => panic!("client: {:?}", other.map(|(_, p)| p)),
    }
    assert!(matches!(t.join().expect("server thread"), Err(TlsError::RefusedByPeer { .. })));
}

#[test]
fn client_of_another_name_is_refused_by_the_server() {
    let root = Scratch::new("name-client");
    let ca = ca();
    let (a, b) = (node(&root.0, &ca, "node-a"), node(&root.0, &ca, "node-b"));
    let srv = server(&a, ClientAuth::Required(PeerPolicy::Nodes(vec!["node-c".into(), "node-d".into()])));
    let (tcp, t) = loopback(move |tcp| srv.accept(tcp, T).map(|_| ()));
    let seen = client_refusal(&client(&b, PeerPolicy::AnyNode), tcp);
    match t.join().expect("server thread") {
        Err(TlsError::WrongIdentity { cert: CertOrigin::Peer, expected, presented }) => {
            assert_eq!(expected, vec!["node-c".to_string(), "node-d".to_string()]);
            assert_eq!(presented, vec!["node-b".to_string()]);
        }
        other => panic!("server: {other:?}"),
    }
    assert!(matches!(seen, TlsError::RefusedByPeer { .. }), "client: {seen:?}");
}

#[test]
fn missing_file_is_named() {
    let root = Scratch::new("missing");
    let a = node(&root.0, &ca(), "node-a");
    std::fs::remove_file(a.join("client-key.pem")).expect("remove");
    match Credentials::load(&a, Endpoint::Client, now()) {
        Err(TlsError::MissingFile { path }) => assert_eq!(path, a.join("client-key.pem")),
        other => panic!("{other:?}"),
    }
    // The server half is complete and still loads.
    Credentials::load(&a, Endpoint::Server, now()).expect("server credentials");
    std::fs::remove_file(a.join(CA_CERT)).expect("remove");
    match Credentials::load(&a, Endpoint::Server, now()) {
        Err(TlsError::MissingFile { path }) => assert_eq!(path, a.join(CA_CERT)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn broken_files_are_refused_with_their_reason() {
    let root = Scratch::new("broken");
    let (ca1, ca2) = (ca(), ca());
    let a = node(&root.0, &ca1, "node-a");
    let other = node(&root.0, &ca2, "node-b");
    let load = |end| Credentials::load(&a, end, now());

    // Not PEM at all.
    let cert = std::fs::read(a.join("server-cert.pem")).expect("read");
    std::fs::write(a.join("server-cert.pem"), "not a certificate\n").expect("write");
    assert!(matches!(load(Endpoint::Server), Err(TlsError::Pem { what: "CERTIFICATE", .. })));
    std::fs::write(a.join("server-cert.pem"), &cert).expect("restore");

    // The client key in the server's place.
    let key = std::fs::read(a.join("server-key.pem")).expect("read");
    std::fs::copy(a.join("client-key.pem"), a.join("server-key.pem")).expect("copy");
    match load(Endpoint::Server) {
        Err(TlsError::KeyMismatch { cert, key }) => {
            assert_eq!((cert, key), (a.join("server-cert.pem"), a.join("server-key.pem")));
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(a.join("server-key.pem"), &key).expect("restore");

    // A server certificate used as the client's.
    std::fs::copy(a.join("server-cert.pem"), a.join("client-cert.pem")).expect("copy");
    std::fs::copy(a.join("server-key.pem"), a.join("client-key.pem")).expect("copy");
    match load(Endpoint::Client) {
        Err(TlsError::WrongPurpose { cert: CertOrigin::File(p), wanted: Endpoint::Client }) => {
            assert_eq!(p, a.join("client-cert.pem"));
        }
        other => panic!("{other:?}"),
    }

    // A certificate and key of another CA.
    std::fs::copy(other.join("server-cert.pem"), a.join("server-cert.pem")).expect("copy");
    std::fs::copy(other.join("server-key.pem"), a.join("server-key.pem")).expect("copy");
    match load(Endpoint::Server) {
        Err(TlsError::NotSignedByCa { cert: CertOrigin::File(p), ca }) => {
            assert_eq!((p, ca), (a.join("server-cert.pem"), a.join(CA_CERT)));
        }
        other => panic!("{other:?}"),
    }

    // A node certificate as the CA.
    std::fs::copy(other.join("server-cert.pem"), a.join(CA_CERT)).expect("copy");
    assert!(matches!(load(Endpoint::Server), Err(TlsError::NotCa { .. })));
}

#[test]
fn plaintext_peers_are_told_apart() {
    let root = Scratch::new("plaintext");
    let ca = ca();
    let (a, b) = (node(&root.0, &ca, "node-a"), node(&root.0, &ca, "node-b"));
    // A plaintext replication client: a protocol frame where a ClientHello belongs.
    let srv = server(&a, ClientAuth::Required(PeerPolicy::AnyNode));
    let (mut tcp, t) = loopback(move |tcp| srv.accept(tcp, T).map(|_| ()));
    tcp.write_all(b"MRF1\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x40\x00\x00\x00\x00\x00\x00\x00")
        .expect("write");
    assert!(matches!(t.join().expect("server thread"), Err(TlsError::NotTls { .. })));
    // A plaintext NBD server answering a TLS client.
    let (tcp, t) = loopback(|mut tcp| {
        let _ = tcp.write_all(b"NBDMAGICIHAVEOPT\x00\x03");
        std::thread::sleep(Duration::from_millis(200));
    });
    let res = client(&b, PeerPolicy::AnyNode).connect(tcp, T).map(|_| ());
    assert!(matches!(res, Err(TlsError::NotTls { .. })), "{res:?}");
    t.join().expect("server thread");
}

#[test]
fn silent_peer_times_out() {
    let root = Scratch::new("timeout");
    let a = node(&root.0, &ca(), "node-a");
    let srv = server(&a, ClientAuth::Required(PeerPolicy::AnyNode));
    let limit = Duration::from_millis(300);
    let (tcp, t) = loopback(move |tcp| {
        let start = Instant::now();
        (srv.accept(tcp, limit).map(|_| ()), start.elapsed())
    });
    let (res, took) = t.join().expect("server thread");
    drop(tcp);
    assert!(matches!(res, Err(TlsError::Timeout { after }) if after == limit), "{res:?}");
    assert!(took >= limit && took < limit * 5, "took {took:?}");
}

#[test]
fn node_names_are_dns_names() {
    assert!(super::check_node_name("node-a").is_ok());
    assert!(super::check_node_name("db1.example").is_ok());
    for bad in ["10.0.0.1", "", "a b", "node/a"] {
        assert!(matches!(super::check_node_name(bad), Err(TlsError::InvalidNodeName { .. })), "{bad}");
    }
}

fn certs(cmd: CertsCmd) -> (Result<(), CertsError>, String) {
    let mut out = Vec::new();
    let res = certs_cmd::run(&CertsArgs { cmd }, now(), &mut out);
    (res, String::from_utf8(out).expect("utf-8"))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

#[test]
fn certs_command_makes_a_usable_directory_and_keeps_keys() {
    use certs_cmd::{CaArgs, NodeArgs, ShowArgs};
    let root = Scratch::new("cmd");
    let (ca_dir, node_dir) = (root.0.join("ca"), root.0.join("node-a"));
    let ca_args = || CaArgs { dir: ca_dir.clone(), name: None, days: 30, force: false };
    certs(CertsCmd::Ca(ca_args())).0.expect("certs ca");
    assert_eq!(mode(&ca_dir.join(CA_KEY)), 0o600);
    assert_eq!(mode(&ca_dir), 0o700);
    // A second CA over the first is refused, the key kept.
    let key = std::fs::read(ca_dir.join(CA_KEY)).expect("key");
    assert!(matches!(certs(CertsCmd::Ca(ca_args())).0, Err(CertsError::Exists { .. })));
    assert_eq!(std::fs::read(ca_dir.join(CA_KEY)).expect("key"), key);

    let node_args = |force| NodeArgs {
        ca: ca_dir.clone(),
        name: "node-a".into(),
        ips: vec!["127.0.0.1".parse().expect("ip")],
        dns: vec!["localhost".into()],
        dir: node_dir.clone(),
        days: 10,
        force,
    };
    let (res, out) = certs(CertsCmd::Node(node_args(false)));
    res.expect("certs node");
    assert!(out.contains("node-a"), "{out}");
    for key in ["server-key.pem", "client-key.pem"] {
        assert_eq!(mode(&node_dir.join(key)), 0o600, "{key}");
    }
    let creds = Credentials::load(&node_dir, Endpoint::Server, now()).expect("server credentials");
    assert_eq!(creds.info().dns_names, vec!["node-a".to_string(), "localhost".to_string()]);
    assert_eq!(creds.info().common_name.as_deref(), Some("node-a"));
    let key = std::fs::read(node_dir.join("server-key.pem")).expect("key");
    assert!(matches!(certs(CertsCmd::Node(node_args(false))).0, Err(CertsError::Exists { .. })));
    assert_eq!(std::fs::read(node_dir.join("server-key.pem")).expect("key"), key);
    certs(CertsCmd::Node(node_args(true))).0.expect("certs node --force");
    assert_ne!(std::fs::read(node_dir.join("server-key.pem")).expect("key"), key);

    let (res, out) = certs(CertsCmd::Show(ShowArgs { dir: node_dir.clone(), json: true }));
    res.expect("show");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(report["usable"], true);
    assert_eq!(report["server"]["cert"]["ip_addresses"][0], "127.0.0.1");
    assert_eq!(report["client"]["cert"]["purposes"][0], "client_auth");
    assert_eq!(report["ca"]["cert"]["is_ca"], true);
    assert_eq!(report["ca_key"], false);

    // A key that is not the certificate's: show names it and fails.
    std::fs::copy(node_dir.join("client-key.pem"), node_dir.join("server-key.pem")).expect("copy");
    let (res, out) = certs(CertsCmd::Show(ShowArgs { dir: node_dir.clone(), json: false }));
    assert!(matches!(res, Err(CertsError::Unusable { problems: 1, .. })), "{res:?}");
    assert!(out.contains("PROBLEM") && out.contains("does not belong"), "{out}");
}

#[test]
fn another_ca_of_the_same_name_is_still_not_ours() {
    let root = Scratch::new("samename");
    let validity = Validity::days_from(now(), 5);
    let (ca1, ca2) = (new_ca("mirror CA", validity).expect("CA"), new_ca("mirror CA", validity).expect("CA"));
    let a = node(&root.0, &ca2, "node-a");
    std::fs::write(a.join(CA_CERT), &ca1.cert_pem).expect("write");
    match Credentials::load(&a, Endpoint::Server, now()) {
        Err(TlsError::NotSignedByCa { cert: CertOrigin::File(p), .. }) => {
            assert_eq!(p, a.join("server-cert.pem"));
        }
        other => panic!("{other:?}"),
    }
}

/// Copies `from` to `to` until either closes; once `flip` is set, the last byte of the next chunk
/// is inverted (inside a record's ciphertext or tag, never its header).
fn pump(mut from: TcpStream, mut to: TcpStream, flip: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if n > 5 && flip.swap(false, Ordering::SeqCst) {
            buf[n - 1] ^= 0xff;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

#[test]
fn a_byte_flipped_after_the_handshake_breaks_the_connection() {
    use std::sync::{atomic::AtomicBool, Arc};
    let root = Scratch::new("mitm");
    let ca = ca();
    let (a, b) = (node(&root.0, &ca, "node-a"), node(&root.0, &ca, "node-b"));
    let srv = server(&a, ClientAuth::Required(PeerPolicy::AnyNode));
    let (got_first, first) = std::sync::mpsc::channel();
    let (to_server, t) = loopback(move |tcp| {
        let (mut s, _) = srv.accept(tcp, T).expect("server handshake");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("first record");
        got_first.send(buf).expect("send");
        s.read_exact(&mut buf).map_err(|e| srv.explain(e))
    });
    // The man in the middle: the client talks to it, it talks to the server.
    let proxy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let to_proxy = TcpStream::connect(proxy.local_addr().expect("addr")).expect("connect");
    let from_client = proxy.accept().expect("accept").0;
    let flip = Arc::new(AtomicBool::new(false));
    let (c2s, s2c) = (from_client.try_clone().expect("clone"), to_server.try_clone().expect("clone"));
    let f = flip.clone();
    let up = std::thread::spawn(move || pump(c2s, to_server, f));
    let down = std::thread::spawn(move || pump(s2c, from_client, Arc::new(AtomicBool::new(false))));
    let cl = client(&b, PeerPolicy::AnyNode);
    let (mut s, _) = cl.connect(to_proxy, T).expect("client handshake");
    s.write_all(b"first").expect("write");
    s.flush().expect("flush");
    assert_eq!(&first.recv().expect("first record"), b"first");
    flip.store(true, std::sync::atomic::Ordering::SeqCst);
    s.write_all(b"later").expect("write");
    s.flush().expect("flush");
    match t.join().expect("server thread") {
        Err(TlsError::Broken(rustls::Error::DecryptError)) => {}
        other => panic!("server: {other:?}"),
    }
    drop(s);
    up.join().expect("pump");
    down.join().expect("pump");
}

#[test]
fn a_server_certificate_presented_by_a_client_is_refused() {
    use std::sync::Arc;
    let root = Scratch::new("purpose");
    let ca = ca();
    let (a, b) = (node(&root.0, &ca, "node-a"), node(&root.0, &ca, "node-b"));
    let srv = server(&a, ClientAuth::Required(PeerPolicy::AnyNode));
    let (tcp, t) = loopback(move |tcp| srv.accept(tcp, T).map(|_| ()));
    // A client built by hand: `Credentials::load` would refuse this certificate up front.
    let (roots, _) = super::creds::load_ca(&b.join(CA_CERT), now()).expect("CA");
    let chain = super::creds::read_certs(&b.join("server-cert.pem")).expect("cert");
    let key = super::creds::read_key(&b.join("server-key.pem")).expect("key");
    let verifier = super::verify::NodeServerVerifier::new(roots, super::provider(), PeerPolicy::AnyNode);
    let config = rustls::ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .expect("client config");
    let name = rustls::pki_types::ServerName::try_from("node-a").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("connection");
    let mut tcp = tcp;
    while conn.is_handshaking() {
        if conn.complete_io(&mut tcp).is_err() {
            break;
        }
    }
    match t.join().expect("server thread") {
        Err(TlsError::WrongPurpose { cert: CertOrigin::Peer, wanted: Endpoint::Client }) => {}
        other => panic!("server: {other:?}"),
    }
}

#[test]
fn certs_help_explains_each_subcommand() {
    use clap::Args;
    let mut cmd = CertsArgs::augment_args(clap::Command::new("certs"));
    cmd.build();
    cmd.clone().debug_assert();
    let long = cmd.render_long_help().to_string();
    assert!(long.contains("tls-creds-x509") && long.contains("mirror certs node --ca"), "{long}");
    for (sub, says) in [("ca", "ca-key.pem"), ("node", "--ip 127.0.0.1"), ("show", "verifies against")] {
        let help = cmd.find_subcommand_mut(sub).expect("subcommand").render_long_help().to_string();
        assert!(help.contains(says), "certs {sub} --help: {help}");
    }
}
