//! tracefs and bpffs: making sure they are mounted, and reading tracepoint record layouts.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use mirror_common::{blk::BlkTpOffsets, net::NetTpOffsets};

use super::TelemetryError;

/// Where tracefs is normally mounted.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// Where bpffs is normally mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// True when `path` is a mount point of filesystem type `fstype` according to /proc/mounts.
pub fn is_mounted(path: &str, fstype: &str) -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace();
            let (_, mp, ty) = (f.next(), f.next(), f.next());
            mp == Some(path) && ty == Some(fstype)
        })
    })
}

fn mount(fstype: &'static str, path: &str) -> Result<(), TelemetryError> {
    let out = Command::new("mount").args(["-t", fstype, fstype, path]).output();
    let err = |reason: String| TelemetryError::Mount {
        fs: fstype,
        path: PathBuf::from(path),
        source: std::io::Error::other(reason),
    };
    match out {
        Ok(o) if o.status.success() => {
            tracing::info!(fs = fstype, path, "mounted");
            Ok(())
        }
        Ok(o) => Err(err(String::from_utf8_lossy(&o.stderr).trim().to_string())),
        Err(e) => Err(err(format!("running mount: {e}"))),
    }
}

/// Returns the tracefs root, mounting it at [`TRACEFS`] when it is not mounted yet.
pub fn ensure_tracefs() -> Result<PathBuf, TelemetryError> {
    for root in [TRACEFS, "/sys/kernel/debug/tracing"] {
        if Path::new(root).join("events").is_dir() {
            return Ok(PathBuf::from(root));
        }
    }
    mount("tracefs", TRACEFS)?;
    Ok(PathBuf::from(TRACEFS))
}

/// Mounts bpffs at [`BPFFS`] unless it already is.
pub fn ensure_bpffs() -> Result<(), TelemetryError> {
    if is_mounted(BPFFS, "bpf") {
        return Ok(());
    }
    mount("bpf", BPFFS)
}

/// A field of a tracepoint record: byte offset and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Parses the `format` file of a tracepoint into field name -> [`Field`].
pub fn parse_format(text: &str) -> HashMap<String, Field> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse().ok();
            } else if decl.is_none() && !part.is_empty() {
                decl = Some(part);
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        // "char rwbs[10]" -> "rwbs"; "dev_t dev" -> "dev".
        let name = decl.rsplit(' ').next().unwrap_or(decl);
        let name = name.split('[').next().unwrap_or(name);
        fields.insert(name.to_string(), Field { offset, size });
    }
    fields
}

fn field(
    fields: &HashMap<String, Field>,
    path: &Path,
    name: &str,
    min_size: u32,
) -> Result<u32, TelemetryError> {
    match fields.get(name) {
        Some(f)
            if f.size >= min_size && (f.offset + min_size) as usize <= mirror_common::TP_RECORD_PREFIX =>
        {
            Ok(f.offset)
        }
        Some(f) if f.size >= min_size => Err(TelemetryError::Format {
            path: path.to_path_buf(),
            reason: format!(
                "field {name} ends past the first {} bytes the programs copy",
                mirror_common::TP_RECORD_PREFIX
            ),
        }),
        Some(f) => Err(TelemetryError::Format {
            path: path.to_path_buf(),
            reason: format!("field {name} has size {} (expected >= {min_size})", f.size),
        }),
        None => Err(TelemetryError::Format { path: path.to_path_buf(), reason: format!("no field {name}") }),
    }
}

/// Builds the offsets of the block tracepoints from their format texts.
pub fn blk_offsets_from(
    issue: &str,
    complete: &str,
    issue_path: &Path,
    complete_path: &Path,
) -> Result<BlkTpOffsets, TelemetryError> {
    let i = parse_format(issue);
    let c = parse_format(complete);
    Ok(BlkTpOffsets {
        issue_dev: field(&i, issue_path, "dev", 4)?,
        issue_sector: field(&i, issue_path, "sector", 8)?,
        issue_bytes: field(&i, issue_path, "bytes", 4)?,
        issue_rwbs: field(&i, issue_path, "rwbs", 4)?,
        complete_dev: field(&c, complete_path, "dev", 4)?,
        complete_sector: field(&c, complete_path, "sector", 8)?,
        complete_error: field(&c, complete_path, "error", 4)?,
        complete_rwbs: field(&c, complete_path, "rwbs", 4)?,
        valid: 1,
        _pad: 0,
    })
}

/// Reads the block tracepoints' formats under a tracefs root.
pub fn blk_offsets(root: &Path) -> Result<BlkTpOffsets, TelemetryError> {
    let ip = root.join("events/block/block_rq_issue/format");
    let cp = root.join("events/block/block_rq_complete/format");
    let read = |p: &Path| fs::read_to_string(p).map_err(|e| TelemetryError::io(p.display().to_string(), e));
    blk_offsets_from(&read(&ip)?, &read(&cp)?, &ip, &cp)
}

fn read_format(root: &Path, category: &str, tp: &str) -> Result<(String, PathBuf), TelemetryError> {
    let p = root.join(format!("events/{category}/{tp}/format"));
    let text = fs::read_to_string(&p).map_err(|e| TelemetryError::io(p.display().to_string(), e))?;
    Ok((text, p))
}

/// Builds the offsets of `tcp:tcp_retransmit_skb` from its format text.
pub fn net_offsets_from(text: &str, path: &Path) -> Result<NetTpOffsets, TelemetryError> {
    let f = parse_format(text);
    Ok(NetTpOffsets {
        family: field(&f, path, "family", 2)?,
        daddr: field(&f, path, "daddr", 4)?,
        daddr_v6: field(&f, path, "daddr_v6", 16)?,
        valid: 1,
    })
}

/// Reads `tcp:tcp_retransmit_skb`'s format under a tracefs root.
pub fn net_offsets(root: &Path) -> Result<NetTpOffsets, TelemetryError> {
    let (t, p) = read_format(root, "tcp", "tcp_retransmit_skb")?;
    net_offsets_from(&t, &p)
}

/// True when the tracepoint exists on this kernel.
pub fn has_tracepoint(root: &Path, category: &str, tp: &str) -> bool {
    root.join(format!("events/{category}/{tp}")).is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_618: &str = "name: block_rq_issue
ID: 2104
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:unsigned int bytes;\toffset:28;\tsize:4;\tsigned:0;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
\tfield:char comm[16];\toffset:44;\tsize:16;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:60;\tsize:4;\tsigned:0;

print fmt: \"%d,%d %s\"";

    // Older layout (no ioprio, rwbs[8]) as on 5.x kernels.
    const COMPLETE_OLD: &str = "format:
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:char rwbs[8];\toffset:32;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:40;\tsize:4;\tsigned:1;";

    #[test]
    fn parses_fields() {
        let f = parse_format(ISSUE_618);
        assert_eq!(f["rwbs"], Field { offset: 34, size: 10 });
        assert_eq!(f["cmd"], Field { offset: 60, size: 4 });
        assert_eq!(f["dev"], Field { offset: 8, size: 4 });
    }

    #[test]
    fn builds_offsets_across_layouts() {
        let o = blk_offsets_from(ISSUE_618, COMPLETE_OLD, Path::new("i"), Path::new("c")).unwrap();
        assert_eq!((o.issue_rwbs, o.complete_rwbs, o.complete_error, o.valid), (34, 32, 28, 1));
    }

    #[test]
    fn net_offsets_from_format() {
        let t = "format:
\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:38;\tsize:4;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;";
        let o = net_offsets_from(t, Path::new("f")).unwrap();
        assert_eq!((o.family, o.daddr, o.daddr_v6, o.valid), (32, 38, 58, 1));
    }

    #[test]
    fn missing_field_is_a_clear_error() {
        let err = blk_offsets_from(ISSUE_618, "format:\n", Path::new("i"), Path::new("c/format"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c/format") && err.contains("no field dev"), "{err}");
    }
}
