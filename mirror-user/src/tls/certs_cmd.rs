//! `mirror certs`: make a CA and node certificates in the directory layout qemu's
//! `tls-creds-x509` reads (so one directory serves mirror and qemu / libnbd clients), and show
//! what a directory holds and whether it is usable. Existing keys are never replaced without
//! `--force`; key files are created mode 0600, directories 0700.

use std::{
    io::Write,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::{
    cert::CertInfo,
    creds::{
        check_key, check_validity, load_ca, parse_cert, read_ca, read_certs, read_file, read_key,
        verify_chain,
    },
    issue::{new_ca, new_node, IssueError, Issued, NodeSpec, Validity},
    CertOrigin, Credentials, Endpoint, TlsError, CA_CERT, CA_KEY,
};

/// TLS certificates: create a CA, issue node certificates, show a credentials directory.
#[derive(clap::Args, Debug)]
#[command(long_about = "TLS certificates for mirror's links and for NBD clients.\n\n\
        A volume's nodes trust one CA. `mirror certs ca` makes it (keep its directory, which holds \
        the CA key, off the nodes); `mirror certs node` issues each node a server certificate \
        (presented by its replica server and NBD export) and a client certificate (presented when \
        it connects), into a directory in qemu's tls-creds-x509 layout: ca-cert.pem, \
        server-cert.pem, server-key.pem, client-cert.pem, client-key.pem. The same directory \
        serves qemu (--object tls-creds-x509,id=tls0,dir=DIR,endpoint=client) and libnbd \
        (nbds://HOST/EXPORT?tls-certificates=DIR).\n\n\
        Example:\n  mirror certs ca --dir /root/mirror-ca\n  \
        mirror certs node --ca /root/mirror-ca --name node-a --ip 10.0.0.1 --dir /etc/mirror/tls\n  \
        mirror certs show --dir /etc/mirror/tls")]
pub struct CertsArgs {
    #[command(subcommand)]
    pub cmd: CertsCmd,
}

/// The `mirror certs` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum CertsCmd {
    /// Create a certificate authority: DIR/ca-cert.pem and DIR/ca-key.pem (mode 0600).
    #[command(
        long_about = "Create a certificate authority: DIR/ca-cert.pem (distributed to every node and \
        client) and DIR/ca-key.pem (mode 0600; needed only to issue node certificates: keep it off the \
        nodes). Refuses to replace an existing CA without --force, since certificates it signed would \
        no longer verify."
    )]
    Ca(CaArgs),
    /// Issue a node's server and client certificates, signed by the CA, into a credentials directory.
    #[command(long_about = "Issue a node's certificates, signed by the CA in --ca, into --dir in qemu's \
        tls-creds-x509 layout: ca-cert.pem (a copy of the CA's), server-cert.pem and server-key.pem \
        (presented by the node's replica server and NBD export), client-cert.pem and client-key.pem \
        (presented when it connects). Both name the node (--name) as common name and DNS name: its \
        identity in mirror's handshakes and logs. The server certificate also names every --ip and \
        --dns that clients dial: qemu and libnbd check the address they connect to against it (so \
        a test on one host needs --ip 127.0.0.1). Keys are mode 0600; existing keys are kept \
        unless --force.")]
    Node(NodeArgs),
    /// Show the certificates in a directory: subject, names, validity, issuer, and whether they verify.
    #[command(long_about = "Show the certificates in a credentials (or CA) directory: subject, names \
        (subject alternative names), purposes, validity, issuer, and whether each verifies against \
        the directory's ca-cert.pem, lies within its validity now and matches its key. Exits non-zero \
        when anything found is unusable.")]
    Show(ShowArgs),
}

/// `mirror certs ca`.
#[derive(clap::Args, Debug)]
pub struct CaArgs {
    /// Directory to write ca-cert.pem and ca-key.pem into (created when missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// The CA's common name [default: `mirror CA` and a random suffix]. CAs of distinct names
    /// let a refused peer be told "unknown CA" rather than "bad signature".
    #[arg(long)]
    pub name: Option<String>,
    /// Days the CA certificate stays valid.
    #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..))]
    pub days: u32,
    /// Replace an existing CA (certificates it signed stop verifying).
    #[arg(long)]
    pub force: bool,
}

/// `mirror certs node`.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// The CA's directory (ca-cert.pem and ca-key.pem, as `mirror certs ca` wrote them).
    #[arg(long)]
    pub ca: PathBuf,
    /// The node's name (a DNS name such as node-a): its identity in handshakes and logs.
    #[arg(long)]
    pub name: String,
    /// An address clients reach this node's servers at (goes into the server certificate).
    /// Repeatable.
    #[arg(long = "ip")]
    pub ips: Vec<IpAddr>,
    /// Another host name clients reach this node's servers by. Repeatable.
    #[arg(long = "dns")]
    pub dns: Vec<String>,
    /// The node's credentials directory to write (created when missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// Days the node's certificates stay valid.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
    pub days: u32,
    /// Replace existing certificates and keys in --dir.
    #[arg(long)]
    pub force: bool,
}

/// `mirror certs show`.
#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The directory to inspect.
    #[arg(long)]
    pub dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Errors of `mirror certs`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Issue(#[from] IssueError),
    #[error("{path} exists and differs; pass --force to replace it", path = .path.display())]
    Exists { path: PathBuf },
    #[error("writing {path}: {source}", path = .path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{dir}: {problems} problem(s) found (listed above)", dir = .dir.display())]
    Unusable { dir: PathBuf, problems: usize },
}

impl CertsArgs {
    /// Runs the command now, printing to stdout (what `main` calls).
    pub fn run(&self) -> Result<(), CertsError> {
        run(self, SystemTime::now(), &mut std::io::stdout())
    }
}

/// Runs `mirror certs` at time `now`, printing to `out`.
pub fn run(args: &CertsArgs, now: SystemTime, out: &mut dyn Write) -> Result<(), CertsError> {
    match &args.cmd {
        CertsCmd::Ca(a) => ca(a, now, out),
        CertsCmd::Node(a) => node(a, now, out),
        CertsCmd::Show(a) => show(a, now, out),
    }
}

/// A file to write: its path, contents, and whether it is a secret (mode 0600).
struct Planned {
    path: PathBuf,
    contents: String,
    secret: bool,
}

/// Writes `files` into `dir` (0700 when created): nothing is written when one exists with other
/// contents and `force` is off; each file goes to a temporary name first and is renamed.
fn write_files(dir: &Path, files: &[Planned], force: bool) -> Result<(), CertsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertsError::Write { path: dir.to_path_buf(), source })?;
    for f in files {
        match std::fs::read(&f.path) {
            Ok(existing) if existing != f.contents.as_bytes() && !force => {
                return Err(CertsError::Exists { path: f.path.clone() });
            }
            _ => {}
        }
    }
    for f in files {
        if std::fs::read(&f.path).is_ok_and(|existing| existing == f.contents.as_bytes()) {
            continue;
        }
        let tmp = f.path.with_extension("pem.tmp");
        let write = || -> std::io::Result<()> {
            let _ = std::fs::remove_file(&tmp);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if f.secret { 0o600 } else { 0o644 })
                .open(&tmp)?;
            file.write_all(f.contents.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &f.path)
        };
        write().map_err(|source| CertsError::Write { path: f.path.clone(), source })?;
    }
    Ok(())
}

fn ca(a: &CaArgs, now: SystemTime, out: &mut dyn Write) -> Result<(), CertsError> {
    // A CA is replaced only on request: its key is always new, so any existing one differs.
    let name = a.name.clone().unwrap_or_else(|| {
        let mut r = [0u8; 4];
        getrandom::fill(&mut r).expect("getrandom");
        format!("mirror CA {:08x}", u32::from_le_bytes(r))
    });
    let issued = new_ca(&name, Validity::days_from(now, a.days))?;
    write_files(
        &a.dir,
        &[
            Planned { path: a.dir.join(CA_KEY), contents: issued.key_pem, secret: true },
            Planned { path: a.dir.join(CA_CERT), contents: issued.cert_pem, secret: false },
        ],
        a.force,
    )?;
    let (_, infos) = load_ca(&a.dir.join(CA_CERT), now)?;
    let _ = writeln!(
        out,
        "wrote {}: {CA_CERT} ({}, valid until {}) and {CA_KEY} (mode 0600; keep it off the nodes)",
        a.dir.display(),
        infos[0].subject,
        infos[0].not_after
    );
    Ok(())
}

fn node(a: &NodeArgs, now: SystemTime, out: &mut dyn Write) -> Result<(), CertsError> {
    let ca_cert = a.ca.join(CA_CERT);
    let (_, ca_infos) = load_ca(&ca_cert, now)?;
    let ca_key = read_file(&a.ca.join(CA_KEY))?;
    let ca = Issued {
        cert_pem: String::from_utf8_lossy(&read_file(&ca_cert)?).into_owned(),
        key_pem: String::from_utf8_lossy(&ca_key).into_owned(),
    };
    let spec = NodeSpec { name: a.name.clone(), ips: a.ips.clone(), dns: a.dns.clone() };
    let validity = Validity::days_from(now, a.days);
    let certs = new_node(&ca, &spec, validity)?;
    let file =
        |name: &str, contents: String, secret: bool| Planned { path: a.dir.join(name), contents, secret };
    write_files(
        &a.dir,
        &[
            file(Endpoint::Server.key_file(), certs.server.key_pem, true),
            file(Endpoint::Client.key_file(), certs.client.key_pem, true),
            file(CA_CERT, ca.cert_pem, false),
            file(Endpoint::Server.cert_file(), certs.server.cert_pem, false),
            file(Endpoint::Client.cert_file(), certs.client.cert_pem, false),
        ],
        a.force,
    )?;
    // What was written must load as a handshake will load it.
    let server = Credentials::load(&a.dir, Endpoint::Server, now)?;
    Credentials::load(&a.dir, Endpoint::Client, now)?;
    let info = server.info();
    let _ = writeln!(
        out,
        "wrote {}: node {} ({}), valid until {}, signed by {}",
        a.dir.display(),
        a.name,
        names(info),
        info.not_after,
        ca_infos[0].subject
    );
    if let Some(ca) = ca_infos.iter().find(|c| c.not_after < info.not_after) {
        let _ = writeln!(out, "note: the CA expires at {}, before these certificates", ca.not_after);
    }
    Ok(())
}

fn names(info: &CertInfo) -> String {
    let dns = info.dns_names.iter().map(|n| format!("DNS:{n}"));
    let ips = info.ip_addresses.iter().map(|ip| format!("IP:{ip}"));
    dns.chain(ips).collect::<Vec<_>>().join(" ")
}

/// One certificate file of a directory, as `mirror certs show` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertReport {
    pub file: PathBuf,
    /// The certificate (the first in the file), when it could be read.
    pub cert: Option<CertInfo>,
    /// The private key file checked against it, when there is one.
    pub key_file: Option<PathBuf>,
    /// Why it cannot be used as it stands; empty when it can.
    pub problems: Vec<String>,
}

/// What `mirror certs show` found in a directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShowReport {
    pub dir: PathBuf,
    pub ca: Option<CertReport>,
    /// Whether the CA's key is here (a CA directory; a node's should not hold it).
    pub ca_key: bool,
    pub server: Option<CertReport>,
    pub client: Option<CertReport>,
    /// True when nothing found has a problem.
    pub usable: bool,
}

impl ShowReport {
    fn reports(&self) -> impl Iterator<Item = &CertReport> {
        self.ca.iter().chain(&self.server).chain(&self.client)
    }

    fn problems(&self) -> usize {
        self.reports().map(|r| r.problems.len()).sum()
    }
}

/// Inspects `dir` at `now`.
pub fn inspect(dir: &Path, now: SystemTime) -> ShowReport {
    let ca_path = dir.join(CA_CERT);
    let mut ca_report =
        CertReport { file: ca_path.clone(), cert: None, key_file: None, problems: Vec::new() };
    let roots = match read_ca(&ca_path) {
        Ok((roots, infos)) => {
            for info in &infos {
                if let Err(e) = check_validity(info, &CertOrigin::File(ca_path.clone()), now) {
                    ca_report.problems.push(e.to_string());
                }
            }
            ca_report.cert = infos.into_iter().next();
            Some(roots)
        }
        Err(e) => {
            ca_report.problems.push(e.to_string());
            None
        }
    };
    let endpoint = |end: Endpoint| -> Option<CertReport> {
        let (cert_path, key_path) = (dir.join(end.cert_file()), dir.join(end.key_file()));
        if !cert_path.exists() && !key_path.exists() {
            return None;
        }
        let mut r = CertReport {
            file: cert_path.clone(),
            cert: None,
            key_file: key_path.exists().then(|| key_path.clone()),
            problems: Vec::new(),
        };
        let mut problem = |e: TlsError| r.problems.push(e.to_string());
        match read_certs(&cert_path).and_then(|chain| Ok((parse_cert(&cert_path, &chain[0])?, chain))) {
            Ok((info, chain)) => {
                let origin = CertOrigin::File(cert_path.clone());
                if let Err(e) = check_validity(&info, &origin, now) {
                    problem(e);
                }
                match &roots {
                    Some(roots) => {
                        if let Err(e) = verify_chain(&chain, roots, end, now, &origin, &ca_path) {
                            // Expiry was reported above.
                            if !matches!(e, TlsError::Expired { .. } | TlsError::NotYetValid { .. }) {
                                problem(e);
                            }
                        }
                    }
                    None => problem(TlsError::NotSignedByCa { cert: origin, ca: ca_path.clone() }),
                }
                if let Err(e) =
                    read_key(&key_path).and_then(|key| check_key(&cert_path, &key_path, &chain, &key))
                {
                    problem(e);
                }
                r.cert = Some(info);
            }
            Err(e) => problem(e),
        }
        Some(r)
    };
    let (server, client) = (endpoint(Endpoint::Server), endpoint(Endpoint::Client));
    let mut report = ShowReport {
        dir: dir.to_path_buf(),
        ca: Some(ca_report),
        ca_key: dir.join(CA_KEY).exists(),
        server,
        client,
        usable: false,
    };
    report.usable = report.problems() == 0;
    report
}

fn show(a: &ShowArgs, now: SystemTime, out: &mut dyn Write) -> Result<(), CertsError> {
    let report = inspect(&a.dir, now);
    if a.json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&report).expect("report serializes"));
    } else {
        for r in report.reports() {
            print_report(out, r);
        }
        if report.ca_key {
            let _ = writeln!(out, "{}: the CA's key (keep it off the nodes)", a.dir.join(CA_KEY).display());
        }
    }
    let problems = report.problems();
    if problems > 0 {
        return Err(CertsError::Unusable { dir: a.dir.clone(), problems });
    }
    Ok(())
}

fn print_report(out: &mut dyn Write, r: &CertReport) {
    let key =
        r.key_file.as_ref().and_then(|k| k.file_name()).map(|k| format!(" (key {})", k.to_string_lossy()));
    let _ = writeln!(out, "{}{}", r.file.display(), key.unwrap_or_default());
    if let Some(c) = &r.cert {
        let _ = writeln!(out, "  subject   {}", c.subject);
        if !c.dns_names.is_empty() || !c.ip_addresses.is_empty() {
            let _ = writeln!(out, "  names     {}", names(c));
        }
        if !c.purposes.is_empty() {
            let p: Vec<_> = c.purposes.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "  purposes  {}", p.join(" "));
        }
        let _ = writeln!(out, "  issuer    {}", c.issuer);
        let _ = writeln!(out, "  valid     {} .. {}", c.not_before, c.not_after);
        if c.is_ca {
            let _ = writeln!(out, "  ca        yes");
        }
    }
    if r.problems.is_empty() {
        let what = if r.cert.as_ref().is_some_and(|c| c.is_ca) {
            "ok: a CA, valid now"
        } else {
            "ok: signed by the CA, valid now, the key matches"
        };
        let _ = writeln!(out, "  status    {what}");
    }
    for p in &r.problems {
        let _ = writeln!(out, "  PROBLEM   {p}");
    }
}
