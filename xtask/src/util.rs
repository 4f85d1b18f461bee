//! Running commands: echo them, stream their output, fail with context.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
};

use anyhow::{bail, Context, Result};

/// The workspace root (parent of xtask/).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command with inherited stdio; errors when it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd.status().with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", describe(cmd));
    }
    Ok(())
}

/// Runs a command and returns its stdout (trimmed), or None when it cannot run or fails.
pub(crate) fn output(program: impl AsRef<OsStr>, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Finds an executable in PATH.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

pub(crate) fn is_root() -> bool {
    output("id", &["-u"]).as_deref() == Some("0")
}

/// What a libtest run reported.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Tests that passed by saying `skipped: why` (counted out of `passed` in the summary).
    pub skipped: u64,
}

impl Tally {
    pub(crate) fn add(&mut self, o: Tally) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
        self.skipped += o.skipped;
    }

    fn scan(&mut self, line: &str) {
        if let Some(rest) = line.trim_start().strip_prefix("test result: ") {
            let num = |what: &str| {
                rest.split(';')
                    .find_map(|p| p.trim().strip_suffix(what).map(str::trim))
                    .and_then(|n| n.rsplit(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            self.passed += num("passed");
            self.failed += num("failed");
            self.ignored += num("ignored");
        } else if line.contains("skipped: ") {
            self.skipped += 1;
        }
    }
}

/// Runs a command, echoing its stdout and stderr live, and tallies libtest's result lines and
/// the `skipped:` lines of tests that could not run. Returns the tally and whether it succeeded.
pub(crate) fn run_tally(cmd: &mut Command) -> Result<(Tally, bool)> {
    eprintln!("xtask: $ {}", describe(cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let mut readers = Vec::new();
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    for (is_err, stream) in [(false, Box::new(out) as Box<dyn std::io::Read + Send>), (true, Box::new(err))] {
        let tx = tx.clone();
        readers.push(thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send((is_err, line));
            }
        }));
    }
    drop(tx);
    let mut tally = Tally::default();
    for (is_err, line) in rx {
        tally.scan(&line);
        if is_err {
            let _ = writeln!(std::io::stderr(), "{line}");
        } else {
            let _ = writeln!(std::io::stdout(), "{line}");
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait()?;
    Ok((tally, status.success()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_libtest_lines() {
        let mut t = Tally::default();
        t.scan(
            "test result: ok. 12 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        );
        t.scan("test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        t.scan("skipped: bpf_blk::counts: not root");
        t.scan("running 3 tests");
        assert_eq!((t.passed, t.failed, t.ignored, t.skipped), (15, 1, 2, 1));
    }
}
