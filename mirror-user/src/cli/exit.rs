//! How `mirror` ends: its exit statuses ([`Exit`], one table for `main`, the man pages and
//! `docs/commands.md`), the errors that end a command with a status other than 1
//! ([`CliError`]), and printing to stdout that ends quietly when the reader goes away
//! ([`outln!`](crate::outln): `mirror ctl status --json | head`).

use std::io::Write;

/// An exit status of `mirror`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// Success (also when the reader of stdout went away: it had what it read).
    Ok,
    /// The command failed: refused, unreachable, an I/O or protocol error, a job that failed.
    Error,
    /// The command line or a config file is wrong (clap's usage errors too): retrying the
    /// same thing cannot help, so the packaged services do not restart on it.
    Usage,
    /// `mirror sync --verify` ran and found ranges that differ between the replicas.
    Differ,
}

impl Exit {
    /// Every status, in the order of their codes.
    pub const ALL: [Exit; 4] = [Exit::Ok, Exit::Error, Exit::Usage, Exit::Differ];

    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Error => 1,
            Exit::Usage => 2,
            Exit::Differ => 3,
        }
    }

    /// What the status means, as the man pages and docs/commands.md say it.
    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Ok => "success (also when the reader of the output went away, as with `| head`)",
            Exit::Error => "the command failed: refused, unreachable, an I/O or protocol error, a failed job",
            Exit::Usage => {
                "the command line or a config file is wrong (unknown flag or key, bad or missing value)"
            }
            Exit::Differ => "`mirror sync --verify` found ranges that differ between the replicas",
        }
    }
}

/// Errors that end a command with their own status ([`status_of`]); any other error is
/// [`Exit::Error`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// A bad command line or config file, found after clap's parsing: a file that does not
    /// parse, a value out of range, a required setting missing.
    #[error(transparent)]
    Usage(anyhow::Error),
    /// `sync --verify` found mismatching ranges.
    #[error("verify found {count} mismatching range(s) (offset, length): {ranges}")]
    Differ { count: usize, ranges: String },
}

impl CliError {
    /// Wraps an error of reading or settling the configuration.
    pub fn usage(e: impl Into<anyhow::Error>) -> anyhow::Error {
        CliError::Usage(e.into()).into()
    }
}

/// The status an error ends the command with.
pub fn status_of(e: &anyhow::Error) -> Exit {
    match e.downcast_ref::<CliError>() {
        Some(CliError::Usage(_)) => Exit::Usage,
        Some(CliError::Differ { .. }) => Exit::Differ,
        None => Exit::Error,
    }
}

/// Writes to stdout and flushes. A reader that went away (EPIPE) ends the process quietly with
/// [`Exit::Ok`]: what it read was printed, and nothing more can be. Any other failure to write
/// ends it with [`Exit::Error`].
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(Exit::Ok.code().into()),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "Error: writing to stdout: {e}");
            std::process::exit(Exit::Error.code().into())
        }
    }
}

/// `println!` for command output: see [`write_stdout`].
#[macro_export]
macro_rules! outln {
    () => { $crate::cli::exit::write_stdout(format_args!("\n")) };
    ($($t:tt)*) => { $crate::cli::exit::write_stdout(format_args!("{}\n", format_args!($($t)*))) };
}

/// `print!` for command output: see [`write_stdout`].
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::exit::write_stdout(format_args!($($t)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_their_status() {
        assert_eq!(status_of(&anyhow::anyhow!("refused")), Exit::Error);
        assert_eq!(status_of(&CliError::usage(anyhow::anyhow!("config x: unknown field"))), Exit::Usage);
        let e: anyhow::Error = CliError::Differ { count: 1, ranges: "[[0,4096]]".into() }.into();
        assert_eq!(status_of(&e), Exit::Differ);
        assert_eq!(e.to_string(), "verify found 1 mismatching range(s) (offset, length): [[0,4096]]");
        // A usage error reads as the error it wraps.
        let e = CliError::usage(anyhow::anyhow!("config x: unknown field `lisen`"));
        assert_eq!(format!("{e:#}"), "config x: unknown field `lisen`");
        let codes: Vec<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes, [0, 1, 2, 3]);
    }

    #[test]
    fn docs_commands_md_lists_exactly_these_statuses() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/commands.md")).unwrap();
        let table = doc.split("## Exit status").nth(1).expect("docs/commands.md has an Exit status section");
        let rows: Vec<(u8, String)> = table
            .lines()
            .skip_while(|l| !l.starts_with("| status"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let l = l.replace("\\|", "\u{1}");
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (cells[1].parse().unwrap(), cells[2].replace('\u{1}', "|"))
            })
            .collect();
        let want: Vec<(u8, String)> = Exit::ALL.iter().map(|e| (e.code(), e.meaning().to_string())).collect();
        assert_eq!(rows, want);
    }
}
