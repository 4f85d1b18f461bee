//! [`VolumeStatus`]: a volume's state as `mirror status` and the router see it (generations,
//! tracking, dirty bytes, counters, the job), and the hex forms its identifiers take in JSON.

use super::GenInfo;

use super::job::JobStatus;

/// A volume's status (the JSON of `Message::Status` and `mirror status`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VolumeStatus {
    pub volume: String,
    pub path: String,
    pub size: u64,
    pub block_size: u32,
    #[serde(with = "hex::bytes16")]
    pub uuid: [u8; 16],
    pub generation: GenInfo,
    /// Degraded or syncing: every write is recorded in the dirty bitmap.
    pub tracking: bool,
    /// Bytes recorded as possibly missing on the peer (on disk).
    pub dirty_bytes: u64,
    /// Bytes still to send (in memory).
    pub pending_bytes: u64,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    pub job: Option<JobStatus>,
}

/// Serde forms of identifiers as lowercase hex strings: generations as 16 digits, uuids as 32.
pub mod hex {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    /// A `u64` as 16 hex digits (`serde(with = "...")`).
    pub mod u64_16 {
        use super::*;

        pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(&format_args!("{v:016x}"))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
            let s = String::deserialize(d)?;
            u64::from_str_radix(&s, 16).map_err(|e| D::Error::custom(format!("{s:?}: {e}")))
        }
    }

    /// An array of `u64`s, each as 16 hex digits.
    pub mod u64_16_array {
        use super::*;

        pub fn serialize<S: Serializer, const N: usize>(v: &[u64; N], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|x| format!("{x:016x}")))
        }

        pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u64; N], D::Error> {
            let v = Vec::<String>::deserialize(d)?;
            let n = v.len();
            let parsed = v
                .iter()
                .map(|s| u64::from_str_radix(s, 16).map_err(|e| D::Error::custom(format!("{s:?}: {e}"))))
                .collect::<Result<Vec<u64>, _>>()?;
            parsed.try_into().map_err(|_| D::Error::invalid_length(n, &format!("{N} generations").as_str()))
        }
    }

    /// 16 bytes as 32 hex digits.
    pub mod bytes16 {
        use super::*;

        pub fn serialize<S: Serializer>(v: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(&format_args!("{:032x}", u128::from_be_bytes(*v)))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
            let s = String::deserialize(d)?;
            if s.len() != 32 {
                return Err(D::Error::invalid_length(s.len(), &"32 hex digits"));
            }
            u128::from_str_radix(&s, 16)
                .map(u128::to_be_bytes)
                .map_err(|e| D::Error::custom(format!("{s:?}: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VolumeStatus {
        VolumeStatus {
            volume: "v".into(),
            path: "/srv/v.img".into(),
            size: 1 << 20,
            block_size: 4096,
            uuid: [0x01, 0x23, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xab, 0xff],
            generation: GenInfo {
                current: 0xdead_beef,
                history: [7, 0, 0, 1 << 63],
                consistent: true,
                sync_source: 0,
            },
            tracking: false,
            dirty_bytes: 8192,
            pending_bytes: 4096,
            reads: 1,
            writes: 2,
            read_bytes: 3,
            write_bytes: 4,
            errors: 5,
            job: None,
        }
    }

    #[test]
    fn volume_status_json_keeps_its_field_names_and_hex_forms() {
        let v = serde_json::to_value(sample()).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "block_size",
                "dirty_bytes",
                "errors",
                "generation",
                "job",
                "path",
                "pending_bytes",
                "read_bytes",
                "reads",
                "size",
                "tracking",
                "uuid",
                "volume",
                "write_bytes",
                "writes"
            ]
        );
        assert_eq!(v["uuid"], format!("0123{}abff", "0".repeat(24)));
        assert_eq!(
            v["generation"],
            serde_json::json!({
                "current": "00000000deadbeef",
                "history": ["0000000000000007", "0000000000000000", "0000000000000000", "8000000000000000"],
                "consistent": true,
                "sync_source": "0000000000000000",
            })
        );
        assert_eq!(v["job"], serde_json::Value::Null);
        // A remote status (the text of `Message::Json`) decodes back to the same value.
        let back: VolumeStatus = serde_json::from_str(&v.to_string()).unwrap();
        assert_eq!(back, sample());
        // Malformed generations are refused, not zeroed.
        let mut bad = v.clone();
        bad["generation"]["current"] = "xyz".into();
        assert!(serde_json::from_value::<VolumeStatus>(bad).is_err());
        let mut short = v;
        short["generation"]["history"] = serde_json::json!(["0000000000000001"]);
        assert!(serde_json::from_value::<VolumeStatus>(short).is_err());
    }
}
