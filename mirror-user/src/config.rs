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
}
