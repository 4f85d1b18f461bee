//! Configuration files (TOML) turned into typed, validated settings with clear errors. Each
//! key is the long flag of the same name with `_` for `-` (`--sync-min-rate` is
//! `sync_min_rate`), except for the tables: `[[volume]]` (a replica's volumes), `[health]` (how
//! the node's health score is made, no flags), `[monitor]` (the health monitor's flags) and
//! `[engine]` (the weighting engine's flags). Unknown keys are errors that name the key. The
//! commands lay their flags over the file and the file over the defaults
//! ([`crate::cli::replica::ReplicaArgs::settings`], [`crate::cli::serve::ServeArgs::settings`]).
//! Values are parsed here, where the file is read (a bad one is reported with its key and
//! line), into the types the flags parse to.
//!
//! The documented layout under `/etc/mirror/`: `secret` (the shared secret), `replica.toml` (the
//! replica server of this node), `volumes/NAME.toml` (one `mirror serve` per volume, the
//! `mirror-serve@NAME` service), `tls/` (`mirror certs node --dir /etc/mirror/tls`). The
//! package installs commented examples (`packaging/etc/`).
//!
//! A replica server's file (`/etc/mirror/replica.toml`):
//! ```toml
//! listen = "0.0.0.0:7700"
//! secret_file = "/etc/mirror/secret"
//! sync_min_rate = "16M"   # bytes/s while the application is active
//! sync_max_rate = "0"     # bytes/s when idle, 0 = unlimited
//! block_size = 4096
//!
//! [[volume]]
//! name = "vol0"
//! path = "/var/lib/mirror/vol0.img"
//! size = "10G"            # only used to create a missing file
//! # meta = "/var/lib/mirror/vol0.meta"
//! # direct_io = true     # aligned I/O with O_DIRECT (bypass this node's page cache)
//!
//! [monitor]               # the health monitor (all optional)
//! interval = "250ms"
//! # probe = ["http://127.0.0.1:8080/health,timeout=2s"]
//! # device = "/dev/vdb"   # the disk scored [default: the one under the first volume]
//! # pin_dir = "/sys/fs/bpf/mirror"
//!
//! [health]                # how this node's health score is made (all optional)
//! disk_ratio_good = 2.0   # disk latency / baseline where the disk sub-score starts to fall
//! disk_ratio_bad = 10.0   # ... and where it is 0
//! disk_floor_us = 1000.0  # latency below this is never slow
//! runq_good_us = 1000.0
//! runq_bad_us = 50000.0
//! load_good = 4.0         # runnable tasks per CPU (load average / CPUs) where saturation starts
//! load_bad = 32.0
//! fs_free_good_pct = 10.0 # free space of the replica's filesystem where it starts to count
//! fs_free_bad_pct = 5.0   # ... and where the node is sick (about to hit ENOSPC)
//! mem_available_good_pct = 10.0
//! mem_available_bad_pct = 2.0
//! link_errors_good = 1.0  # errors + drops per second on the interface towards the peer
//! link_errors_bad = 100.0
//! worst_margin = 15.0     # the score is at most the worst part + this
//! weights = { disk = 0.35, cpu = 0.15, memory = 0.15, network = 0.15, app = 0.2, space = 0.15 }
//! ```
//!
//! A mirrored volume's file (`/etc/mirror/volumes/vol0.toml`, [`ServeFile`]):
//! ```toml
//! volume = "vol0"         # [default: the unit's instance name, given as --volume]
//! source = "local:/var/lib/mirror/vol0.img:10G"
//! target = "remote:10.0.0.2:7700"
//! secret_file = "/etc/mirror/secret"
//! source_listen = "0.0.0.0:7700"
//! nbd = "127.0.0.1:10809"
//! # nbd_unix = "/run/mirror/vol0.nbd"
//! # export = "vol0"
//! ctl_socket = "/run/mirror/ctl.sock"
//! metrics = "127.0.0.1:9187"
//! # frontend = "auto"
//! # conns = 4
//!
//! [engine]
//! # policy = "adaptive"
//! # failback_hold = "10s"
//! # ramp = "30s"
//! ```
//! `--degraded`, `--assume-clean`, `--target-weight` and the `--ublk-*` flags stay flags: the
//! first three are decisions an operator takes for one start, which a file that a service
//! restarts from would repeat at every start; the ublk flags keep their clap defaults in
//! [`crate::frontend::ublk::UblkArgs`] (a systemd drop-in adds them to `ExecStart`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};

use crate::{
    cli::serve::PolicyName,
    health::{probe::ProbeSpec, score::ScoreConfig},
    serve::Frontend,
    storage::VolumeSpec,
    volume::open::ReplicaSpec,
};

/// A size written as a number of bytes or a string with a unit ("16M").
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => crate::parse_size(t),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeEntry {
    pub name: String,
    pub path: PathBuf,
    pub size: Option<Size>,
    pub meta: Option<PathBuf>,
    #[serde(default)]
    pub direct_io: bool,
}

/// The replica section of a config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaFile {
    pub listen: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub sync_min_rate: Option<Size>,
    pub sync_max_rate: Option<Size>,
    pub block_size: Option<u32>,
    /// The node's TLS credentials directory, as `--tls` (`mirror certs node --dir`).
    pub tls: Option<PathBuf>,
    /// As `--insecure-plaintext`: plaintext replication on a non-loopback address.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// As `--tls-allow`: the node names whose certificates the server accepts.
    #[serde(default)]
    pub tls_allow: Vec<String>,
    #[serde(default)]
    pub volume: Vec<VolumeEntry>,
    /// The health monitor's settings.
    #[serde(default)]
    pub monitor: MonitorFile,
    /// How the node's health is scored.
    pub health: Option<ScoreConfig>,
}

/// Reads a config file, naming it in every error.
fn load<T>(path: &Path, parse: impl Fn(&str) -> Result<T, String>) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
}

/// The `[health]` table's thresholds must be ordered, its weights not negative
/// ([`ScoreConfig::validate`]).
fn check_score(h: &Option<ScoreConfig>) -> Result<(), String> {
    match h {
        Some(h) => h.validate().map_err(|e| format!("[health]: {e}")),
        None => Ok(()),
    }
}

/// `{p}tls` and `{p}insecure_plaintext` (`p` is `""` or `"nbd_"`) contradict each other in one
/// file.
fn check_tls(p: &str, tls: Option<&Path>, insecure_plaintext: bool) -> Result<(), String> {
    match tls {
        Some(dir) if insecure_plaintext => Err(format!(
            "{p}tls = {:?} and {p}insecure_plaintext = true: choose one (TLS, or plaintext beyond loopback)",
            dir.display().to_string()
        )),
        Some(dir) if dir.as_os_str().is_empty() => Err(format!("{p}tls: an empty path")),
        _ => Ok(()),
    }
}

impl ReplicaFile {
    pub fn load(path: &Path) -> anyhow::Result<ReplicaFile> {
        load(path, Self::parse)
    }

    pub fn parse(text: &str) -> Result<ReplicaFile, String> {
        let f: ReplicaFile = toml::from_str(text).map_err(|e| e.to_string())?;
        for v in &f.volume {
            VolumeSpec::parse(&format!("{}={}", v.name, v.path.display()))?;
            if let Some(s) = &v.size {
                s.bytes().map_err(|e| format!("volume {}: size {e}", v.name))?;
            }
        }
        check_score(&f.health)?;
        check_tls("", f.tls.as_deref(), f.insecure_plaintext)?;
        if !f.tls_allow.is_empty() && f.tls.is_none() {
            return Err("tls_allow: only with `tls` (the names are the peers' certificate names)".into());
        }
        for (k, r) in [("sync_min_rate", &f.sync_min_rate), ("sync_max_rate", &f.sync_max_rate)] {
            if let Some(r) = r {
                r.bytes().map_err(|e| format!("{k}: {e}"))?;
            }
        }
        Ok(f)
    }

    /// The volumes as server specs.
    pub fn volume_specs(&self, block_size: u32) -> Vec<VolumeSpec> {
        self.volume
            .iter()
            .map(|v| VolumeSpec {
                name: v.name.clone(),
                path: v.path.clone(),
                size: v.size.as_ref().and_then(|s| s.bytes().ok()),
                meta: v.meta.clone(),
                block_size,
                direct_io: v.direct_io,
            })
            .collect()
    }
}

/// The `[monitor]` table: the node health monitor's flags (`--health-interval`, `--probe`,
/// `--health-device`, `--pin-dir`), for `replica` and `serve` alike.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorFile {
    #[serde(default, deserialize_with = "de::duration")]
    pub interval: Option<Duration>,
    /// `URL[,timeout=2s][,status=200]`, as `--probe`; the flags' probes come after these.
    #[serde(default, deserialize_with = "de::probes")]
    pub probe: Vec<ProbeSpec>,
    pub device: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
}

/// The `[engine]` table of a volume's file: the weighting engine's flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineFile {
    #[serde(default, deserialize_with = "de::value_enum")]
    pub policy: Option<PolicyName>,
    /// `SOURCE,TARGET`, as `--seed-factors`.
    pub seed_factors: Option<String>,
    pub good_health: Option<f64>,
    pub critical_health: Option<f64>,
    #[serde(default, deserialize_with = "de::duration")]
    pub heartbeat_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de::duration")]
    pub failback_hold: Option<Duration>,
    #[serde(default, deserialize_with = "de::duration")]
    pub ramp: Option<Duration>,
    /// `true` turns it on; the flag can only turn it on too.
    #[serde(default)]
    pub balance_reads: bool,
    #[serde(default, deserialize_with = "de::duration")]
    pub tick: Option<Duration>,
}

/// A mirrored volume's file (`mirror serve --config`, `/etc/mirror/volumes/NAME.toml`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    pub volume: Option<String>,
    #[serde(default, deserialize_with = "de::replica")]
    pub source: Option<ReplicaSpec>,
    #[serde(default, deserialize_with = "de::replica")]
    pub target: Option<ReplicaSpec>,
    pub secret_file: Option<PathBuf>,
    pub nbd: Option<SocketAddr>,
    pub nbd_unix: Option<PathBuf>,
    pub export: Option<String>,
    /// The replication link's TLS credentials, as `--tls`.
    pub tls: Option<PathBuf>,
    /// As `--insecure-plaintext`.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// NBD STARTTLS credentials, as `--nbd-tls`.
    pub nbd_tls: Option<PathBuf>,
    /// As `--nbd-tls-verify-peer`: NBD clients must present a certificate of the CA.
    #[serde(default)]
    pub nbd_tls_verify_peer: bool,
    /// As `--nbd-insecure-plaintext`: NBD without TLS on a non-loopback address.
    #[serde(default)]
    pub nbd_insecure_plaintext: bool,
    pub source_listen: Option<String>,
    pub target_listen: Option<String>,
    pub conns: Option<usize>,
    #[serde(default, deserialize_with = "de::duration")]
    pub write_deadline_floor: Option<Duration>,
    #[serde(default, deserialize_with = "de::duration")]
    pub write_deadline_cap: Option<Duration>,
    #[serde(default, deserialize_with = "de::duration")]
    pub write_timeout: Option<Duration>,
    pub al_extents: Option<usize>,
    pub ctl_socket: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    #[serde(default, deserialize_with = "de::value_enum")]
    pub frontend: Option<Frontend>,
    #[serde(default)]
    pub engine: EngineFile,
    #[serde(default)]
    pub monitor: MonitorFile,
    /// How this node's health is scored (for local replicas), as a replica's `[health]`.
    pub health: Option<ScoreConfig>,
}

impl ServeFile {
    pub fn load(path: &Path) -> anyhow::Result<ServeFile> {
        load(path, Self::parse)
    }

    pub fn parse(text: &str) -> Result<ServeFile, String> {
        let f: ServeFile = toml::from_str(text).map_err(|e| e.to_string())?;
        check_score(&f.health)?;
        check_tls("", f.tls.as_deref(), f.insecure_plaintext)?;
        check_tls("nbd_", f.nbd_tls.as_deref(), f.nbd_insecure_plaintext)?;
        if f.nbd_tls_verify_peer && f.nbd_tls.is_none() {
            return Err("nbd_tls_verify_peer: only with `nbd_tls`".into());
        }
        if f.conns == Some(0) {
            return Err("conns: at least 1 connection per remote replica".into());
        }
        Ok(f)
    }
}

/// Values of the file parsed by the flags' own parsers, so a file and a flag accept the same
/// text and a bad value fails where the file is read, with its key and line.
mod de {
    use super::{Deserialize, Deserializer, Duration, ProbeSpec, ReplicaSpec};

    fn parsed<'de, D: Deserializer<'de>, T>(
        d: D,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(Some).map_err(serde::de::Error::custom)
    }

    pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        parsed(d, crate::parse_duration)
    }

    pub(super) fn replica<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ReplicaSpec>, D::Error> {
        parsed(d, ReplicaSpec::parse)
    }

    pub(super) fn value_enum<'de, D: Deserializer<'de>, T: clap::ValueEnum>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        parsed(d, |s| {
            T::from_str(s, false).map_err(|_| {
                let known: Vec<String> = T::value_variants()
                    .iter()
                    .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
                    .collect();
                format!("`{s}`: expected one of {}", known.join(", "))
            })
        })
    }

    pub(super) fn probes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ProbeSpec>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| ProbeSpec::parse(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let f = ReplicaFile::parse(
            r#"
            listen = "0.0.0.0:7700"
            secret_file = "/etc/mirror/secret"
            sync_min_rate = "16M"
            sync_max_rate = 0
            [[volume]]
            name = "vol0"
            path = "/var/lib/mirror/vol0.img"
            size = "10G"
            "#,
        )
        .unwrap();
        assert_eq!(f.listen.as_deref(), Some("0.0.0.0:7700"));
        assert_eq!(f.sync_min_rate.as_ref().unwrap().bytes(), Ok(16 << 20));
        let v = f.volume_specs(4096);
        assert_eq!((v[0].name.as_str(), v[0].size), ("vol0", Some(10 << 30)));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        let e = ReplicaFile::parse("lisen = \"x\"").unwrap_err();
        assert!(e.contains("lisen"), "{e}");
        let e = ReplicaFile::parse("sync_min_rate = \"fast\"").unwrap_err();
        assert!(e.contains("sync_min_rate"), "{e}");
        let e = ReplicaFile::parse("[[volume]]\nname = \"bad name\"\npath = \"/x\"").unwrap_err();
        assert!(e.contains("volume name"), "{e}");
    }

    #[test]
    fn the_health_table_configures_the_score() {
        let f = ReplicaFile::parse(
            "[health]\ndisk_ratio_good = 3.0\ndisk_floor_us = 500.0\nweights = { disk = 1.0, app = 0.5 }",
        )
        .unwrap();
        let h = f.health.unwrap();
        assert_eq!((h.disk_ratio_good, h.disk_ratio_bad, h.disk_floor_us), (3.0, 10.0, 500.0));
        assert_eq!((h.weights.disk, h.weights.app, h.weights.cpu), (1.0, 0.5, 0.15));
        let e = ReplicaFile::parse("[health]\ndisk_ratio_good = 20.0").unwrap_err();
        assert!(e.contains("[health]"), "{e}");
        let e = ReplicaFile::parse("[health]\ndisk_ratio_godo = 2.0").unwrap_err();
        assert!(e.contains("disk_ratio_godo"), "{e}");
        // The node facts' thresholds and weight.
        let f = ReplicaFile::parse(
            "[health]\nfs_free_good_pct = 20.0\nload_bad = 16.0\nweights = { space = 1.0 }",
        )
        .unwrap();
        let h = f.health.unwrap();
        assert_eq!(
            (h.fs_free_good_pct, h.fs_free_bad_pct, h.load_bad, h.weights.space),
            (20.0, 5.0, 16.0, 1.0)
        );
        for (text, key) in [
            ("fs_free_bad_pct = 12.0", "fs_free"),
            ("mem_available_bad_pct = 0.0", "mem_available"),
            ("link_errors_good = 500.0", "link_errors"),
            ("load_good = 0.0", "load_good"),
            ("weights = { space = -1.0 }", "weights"),
        ] {
            let e = ReplicaFile::parse(&format!("[health]\n{text}")).unwrap_err();
            assert!(e.contains("[health]") && e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn a_serve_file_is_typed_where_it_is_read() {
        let f = ServeFile::parse(
            r#"
            source = "local:/var/lib/mirror/vol0.img:10G"
            target = "remote:10.0.0.2:7700"
            nbd = "127.0.0.1:10809"
            frontend = "ublk"
            [engine]
            ramp = "1m"
            [monitor]
            probe = ["http://127.0.0.1:8080/,status=204"]
            "#,
        )
        .unwrap();
        assert_eq!(
            f.source,
            Some(ReplicaSpec::Local { path: "/var/lib/mirror/vol0.img".into(), size: Some(10 << 30) })
        );
        assert_eq!(f.target, Some(ReplicaSpec::Remote { addr: "10.0.0.2:7700".into() }));
        assert_eq!(f.frontend, Some(Frontend::Ublk));
        assert_eq!(f.engine.ramp, Some(Duration::from_mins(1)));
        assert_eq!(f.monitor.probe[0].expect_status, 204);
        assert!(f.volume.is_none() && f.engine.policy.is_none());
    }

    #[test]
    fn serve_file_errors_name_the_key_and_the_value() {
        for (text, words) in [
            ("volum = \"v\"", &["volum"][..]),
            ("[engine]\npolcy = \"seed\"", &["polcy"]),
            ("[monitor]\ninterval_ms = 5", &["interval_ms"]),
            ("source = \"nfs:/x\"", &["source", "local:PATH"]),
            ("target = \"remote:host\"", &["target", "needs a port"]),
            ("frontend = \"floppy\"", &["frontend", "nbd, ublk, auto"]),
            ("[engine]\npolicy = \"random\"", &["policy", "adaptive, seed"]),
            ("[engine]\nramp = \"soon\"", &["ramp", "examples"]),
            ("nbd = \"localhost\"", &["nbd"]),
            ("[monitor]\nprobe = [\"not a url\"]", &["probe", "not a URL"]),
            ("[health]\ndisk_ratio_good = 20.0", &["[health]"]),
        ] {
            let e = ServeFile::parse(text).unwrap_err();
            for w in words {
                assert!(e.contains(w), "{text:?}: {w:?} not in {e}");
            }
        }
    }

    #[test]
    fn the_shipped_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/etc");
        let replica =
            ReplicaFile::parse(&std::fs::read_to_string(dir.join("replica.toml")).unwrap()).unwrap();
        assert_eq!(replica.secret_file.as_deref(), Some(Path::new("/etc/mirror/secret")));
        let vol = ServeFile::parse(&std::fs::read_to_string(dir.join("volume.toml")).unwrap()).unwrap();
        assert_eq!(vol.secret_file.as_deref(), Some(Path::new("/etc/mirror/secret")));
        assert!(vol.source.is_some() && vol.target.is_some());
        // Both listen beyond loopback: they carry the node's TLS directory.
        assert_eq!(replica.tls.as_deref(), Some(Path::new("/etc/mirror/tls")));
        assert_eq!(vol.tls.as_deref(), Some(Path::new("/etc/mirror/tls")));
        assert!(!replica.insecure_plaintext && !vol.insecure_plaintext && !vol.nbd_insecure_plaintext);
    }

    #[test]
    fn the_tls_keys_are_read_and_checked() {
        let r = ReplicaFile::parse("tls = \"/etc/mirror/tls\"\ntls_allow = [\"node-a\"]").unwrap();
        assert_eq!(
            (r.tls.as_deref(), r.tls_allow.as_slice()),
            (Some(Path::new("/etc/mirror/tls")), &["node-a".to_string()][..])
        );
        let v = ServeFile::parse(
            "tls = \"/t\"\nnbd_tls = \"/n\"\nnbd_tls_verify_peer = true\nnbd = \"0.0.0.0:10809\"",
        )
        .unwrap();
        assert_eq!((v.tls.as_deref(), v.nbd_tls.as_deref()), (Some(Path::new("/t")), Some(Path::new("/n"))));
        assert!(v.nbd_tls_verify_peer);
        for (text, words) in [
            ("tls = \"/t\"\ninsecure_plaintext = true", &["tls", "insecure_plaintext", "choose one"][..]),
            ("tls = \"\"", &["tls", "empty"]),
            ("tls_allow = [\"a\"]", &["tls_allow", "only with `tls`"]),
            ("tls_dir = \"/t\"", &["tls_dir", "unknown field"]),
        ] {
            let e = ReplicaFile::parse(text).unwrap_err();
            for w in words {
                assert!(e.contains(w), "{text:?}: {w:?} not in {e}");
            }
        }
        for (text, words) in [
            ("nbd_tls = \"/n\"\nnbd_insecure_plaintext = true", &["nbd_tls", "nbd_insecure_plaintext"][..]),
            ("nbd_tls_verify_peer = true", &["nbd_tls_verify_peer", "only with `nbd_tls`"]),
            ("tls = \"/t\"\ninsecure_plaintext = true", &["choose one"]),
            ("tls = 3", &["tls"]),
        ] {
            let e = ServeFile::parse(text).unwrap_err();
            for w in words {
                assert!(e.contains(w), "{text:?}: {w:?} not in {e}");
            }
        }
    }
}
