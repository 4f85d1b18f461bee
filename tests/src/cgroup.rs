//! cgroups of the tests and the scenario: an I/O cgroup whose limits throttle a block device
//! (cgroup v1 `blkio` or v2 `io`), a memory cgroup with a small limit, and commands that join a
//! cgroup before they exec. Each is a child of the hierarchy's root named by
//! [`unique_name`](crate::fs::unique_name) and removed on drop.
//!
//! blk-throttle holds bios before they become requests, so a throttle on a device does not show
//! in that device's own issue-to-complete latency; a loop device stacked on the throttled one
//! sees it (the scenario's source disk and the telemetry test read the upper device).

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{blockdev::major_minor, fs::unique_name};

const V1_BLKIO: &str = "/sys/fs/cgroup/blkio";
const V1_MEMORY: &str = "/sys/fs/cgroup/memory";
const V2: &str = "/sys/fs/cgroup";

/// Whether the v2 hierarchy offers `controller` (`io`, `memory`).
fn v2_has(controller: &str) -> bool {
    std::fs::read_to_string(Path::new(V2).join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .any(|c| c == controller)
}

/// Whether this machine can throttle a device's I/O in a cgroup (v1 `blkio` or v2 `io`).
pub fn io_available() -> bool {
    Path::new(V1_BLKIO).join("blkio.throttle.read_iops_device").exists() || v2_has("io")
}

/// A command that runs `program` inside the cgroup at `dir`: a shell writes its pid into
/// `cgroup.procs` and execs `program` (so the child's pid is the program's). Add the program's
/// arguments to the returned command.
pub fn command_in(dir: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("echo $$ > {} && exec \"$0\" \"$@\"", dir.join("cgroup.procs").display()))
        .arg(program);
    c
}

/// Removes a cgroup directory, waiting up to 5 s for its members to be gone.
fn remove(dir: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An I/O limit on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoLimit {
    ReadIops,
    WriteIops,
    ReadBps,
}

impl IoLimit {
    /// The key in cgroup v2's `io.max`.
    fn v2_key(self) -> &'static str {
        match self {
            IoLimit::ReadIops => "riops",
            IoLimit::WriteIops => "wiops",
            IoLimit::ReadBps => "rbps",
        }
    }

    /// The file of cgroup v1's `blkio` controller.
    fn v1_file(self) -> &'static str {
        match self {
            IoLimit::ReadIops => "blkio.throttle.read_iops_device",
            IoLimit::WriteIops => "blkio.throttle.write_iops_device",
            IoLimit::ReadBps => "blkio.throttle.read_bps_device",
        }
    }
}

/// A cgroup whose members' I/O to chosen devices is throttled; the limits are lifted and the
/// cgroup removed on drop.
#[derive(Debug)]
pub struct IoCgroup {
    dir: PathBuf,
    v2: bool,
    /// The limits set so far, lifted on drop.
    set: Mutex<Vec<((u32, u32), IoLimit)>>,
}

impl IoCgroup {
    /// A new I/O cgroup: under v1 `blkio` where the machine has it, else under v2 (enabling
    /// `io` for the root's children).
    pub fn new(tag: &str) -> Result<Self> {
        let name = unique_name(tag);
        let v1 = Path::new(V1_BLKIO);
        if v1.join("blkio.throttle.read_iops_device").exists() {
            let dir = v1.join(name);
            std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            return Ok(IoCgroup { dir, v2: false, set: Mutex::new(Vec::new()) });
        }
        if !v2_has("io") {
            bail!("no cgroup v1 blkio and no cgroup v2 io controller");
        }
        let v2 = Path::new(V2);
        let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+io");
        let dir = v2.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        if !dir.join("io.max").exists() {
            let _ = std::fs::remove_dir(&dir);
            bail!("cgroup v2 io controller not enabled for children (no io.max)");
        }
        Ok(IoCgroup { dir, v2: true, set: Mutex::new(Vec::new()) })
    }

    /// Sets limits on the I/O of the members to `dev` (a block device node); `None` lifts one.
    pub fn limit(&self, dev: &Path, limits: &[(IoLimit, Option<u64>)]) -> Result<()> {
        let dev = major_minor(dev)?;
        self.write(dev, limits)?;
        let mut set = self.set.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for &(l, _) in limits {
            if !set.contains(&(dev, l)) {
                set.push((dev, l));
            }
        }
        Ok(())
    }

    fn write(&self, (ma, mi): (u32, u32), limits: &[(IoLimit, Option<u64>)]) -> Result<()> {
        if self.v2 {
            let mut line = format!("{ma}:{mi}");
            for (l, v) in limits {
                let v = v.map_or("max".to_string(), |v| v.to_string());
                line.push_str(&format!(" {}={v}", l.v2_key()));
            }
            let f = self.dir.join("io.max");
            std::fs::write(&f, &line).with_context(|| format!("write {line:?} to {}", f.display()))?;
        } else {
            for (l, v) in limits {
                let line = format!("{ma}:{mi} {}", v.unwrap_or(0));
                let f = self.dir.join(l.v1_file());
                std::fs::write(&f, &line).with_context(|| format!("write {line:?} to {}", f.display()))?;
            }
        }
        Ok(())
    }

    /// The cgroup's directory (for [`command_in`]).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves a running process into the cgroup.
    pub fn add(&self, pid: u32) -> Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", self.dir.display()))
    }

    /// A command that runs `program` inside this cgroup (see [`command_in`]).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(&self.dir, program)
    }
}

impl Drop for IoCgroup {
    fn drop(&mut self) {
        let set = std::mem::take(self.set.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (dev, l) in set {
            let _ = self.write(dev, &[(l, None)]);
        }
        // The members have exited by now (their owners stop them first).
        remove(&self.dir);
    }
}

/// A memory cgroup with a limit (v1 `memory` or v2), removed on drop.
#[derive(Debug)]
pub struct MemCgroup(pub PathBuf);

impl MemCgroup {
    pub fn new(limit: u64) -> Result<Self> {
        let name = unique_name("mem");
        let v1 = Path::new(V1_MEMORY);
        let (dir, file) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(name), "memory.limit_in_bytes")
        } else {
            if !v2_has("memory") {
                bail!("no cgroup v1 memory and no cgroup v2 memory controller");
            }
            let v2 = Path::new(V2);
            let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+memory");
            (v2.join(name), "memory.max")
        };
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let cg = MemCgroup(dir);
        std::fs::write(cg.0.join(file), limit.to_string()).with_context(|| format!("write {file}"))?;
        Ok(cg)
    }

    /// A command that runs `program` inside this cgroup (see [`command_in`]).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(&self.0, program)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        remove(&self.0);
    }
}
