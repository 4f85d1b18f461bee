//! Configuration files (TOML) turned into typed, validated settings with clear errors.
//!
//! A replica server's file:
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
//! [health]                # how this node's health score is made (all optional)
//! disk_ratio_good = 2.0   # disk latency / baseline where the disk sub-score starts to fall
//! disk_ratio_bad = 10.0   # ... and where it is 0
//! disk_floor_us = 1000.0  # latency below this is never slow
//! runq_good_us = 1000.0
//! runq_bad_us = 50000.0
//! worst_margin = 15.0     # the score is at most the worst signal + this
//! weights = { disk = 0.35, cpu = 0.15, memory = 0.15, network = 0.15, app = 0.2 }
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::replication::server::VolumeSpec;

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
    #[serde(default)]
    pub volume: Vec<VolumeEntry>,
    /// How the node's health is scored.
    pub health: Option<crate::health::score::ScoreConfig>,
}

impl ReplicaFile {
    pub fn load(path: &Path) -> anyhow::Result<ReplicaFile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<ReplicaFile, String> {
        let f: ReplicaFile = toml::from_str(text).map_err(|e| e.to_string())?;
        for v in &f.volume {
            VolumeSpec::parse(&format!("{}={}", v.name, v.path.display()))?;
            if let Some(s) = &v.size {
                s.bytes().map_err(|e| format!("volume {}: size {e}", v.name))?;
            }
        }
        if let Some(h) = &f.health {
            if !(h.disk_ratio_good < h.disk_ratio_bad
                && h.runq_good_us < h.runq_bad_us
                && h.worst_margin >= 0.0)
            {
                return Err("[health]: each *_good must be below its *_bad, worst_margin >= 0".into());
            }
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
    }
}
