//! Block devices of the tests: loop devices over files or stacked on other devices (detached on
//! drop), a device's major:minor, and `dd`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::fs::TempDir;

/// A loop device, detached on drop (with the scratch directory of its backing file, if it made
/// one).
#[derive(Debug)]
pub struct LoopDev {
    pub dev: PathBuf,
    _dir: Option<TempDir>,
}

impl LoopDev {
    /// A loop device over a new sparse file of `size` bytes, with direct I/O to the file; panics
    /// when it cannot.
    pub fn new(size: u64) -> Self {
        Self::over_new_file("loop", size, true)
    }

    /// A loop device whose backing file is read through the page cache (`--direct-io=off`):
    /// a fast device, for high request rates.
    pub fn cached(size: u64) -> Self {
        Self::over_new_file("loop-cached", size, false)
    }

    /// A loop device stacked on another block device (e.g. another loop device).
    pub fn over(backing: &Path) -> Self {
        Self::attach(backing, true).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn over_new_file(tag: &str, size: u64, direct_io: bool) -> Self {
        let dir = TempDir::new(tag);
        let img = dir.0.join("disk.img");
        std::fs::File::create(&img).and_then(|f| f.set_len(size)).expect("create backing file");
        let mut l = Self::attach(&img, direct_io).unwrap_or_else(|e| panic!("{e:#}"));
        l._dir = Some(dir);
        l
    }

    /// Attaches the first free loop device to `backing` (a file or a block device); with
    /// `direct_io` the loop worker does O_DIRECT I/O to it, else it goes through the page cache.
    pub fn attach(backing: &Path, direct_io: bool) -> Result<Self> {
        if !Path::new("/dev/loop-control").exists() {
            let _ = Command::new("modprobe").arg("loop").status();
        }
        let out = Command::new("losetup")
            .args(["-f", "--show", if direct_io { "--direct-io=on" } else { "--direct-io=off" }])
            .arg(backing)
            .output()
            .context("run losetup")?;
        if !out.status.success() {
            bail!("losetup {}: {}", backing.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(LoopDev { dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()), _dir: None })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// The major and minor number of a block device node.
pub fn major_minor(dev: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(dev).with_context(|| format!("stat {}", dev.display()))?.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}

/// Runs `dd` with these arguments; panics when it fails.
pub fn dd(args: &[&str]) {
    let out = Command::new("dd").args(args).stderr(Stdio::piped()).output().expect("run dd");
    assert!(out.status.success(), "dd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}
