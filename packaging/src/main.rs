//! `mirror-gen --out DIR`: the man pages and shell completions of the `mirror` binary, generated
//! from its clap definition ([`mirror::cli::Cli`]), for `cargo xtask package`. Writes
//! `DIR/man/mirror.8`, one page per subcommand (`mirror-serve.8`, `mirror-ctl-status.8`, ...)
//! with the sections clap cannot know (EXIT STATUS from [`mirror::cli::exit::Exit`], FILES,
//! ENVIRONMENT, SEE ALSO), and `DIR/completions/{mirror.bash,_mirror,mirror.fish}`.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use clap_complete::Shell;
use clap_mangen::Man;
use mirror::cli::{exit::Exit, Cli};
use roff::{bold, italic, roman, Roff};

/// `mirror-gen` flags.
#[derive(Parser, Debug)]
#[command(about = "Generate mirror's man pages and shell completions")]
struct Args {
    /// Output directory (man/ and completions/ are made in it).
    #[arg(long)]
    out: PathBuf,
}

/// The man section: system administration commands (root, daemons).
const SECTION: &str = "8";

/// The files each command reads or writes, for its FILES section: (path, what).
fn files(page: &str) -> &'static [(&'static str, &'static str)] {
    const SECRET: (&str, &str) =
        ("/etc/mirror/secret", "the shared secret (>= 16 bytes) of the nodes, the same file on each");
    const CTL: (&str, &str) = ("/run/mirror/ctl.sock", "the control socket of `mirror serve` (root only)");
    const META: (&str, &str) =
        ("/var/lib/mirror/", "metadata of block-device replicas (DEVICE.meta); volume files by convention");
    const PINS: (&str, &str) =
        ("/sys/fs/bpf/mirror/", "the maps the node daemon pins, and the weights-VOLUME map");
    match page {
        "mirror" => &[
            SECRET,
            ("/etc/mirror/replica.toml", "the replica server's config file (mirror-replica.service)"),
            ("/etc/mirror/volumes/NAME.toml", "a mirrored volume's config file (mirror-serve@NAME.service)"),
            ("/etc/mirror/tls/", "this node's TLS credentials (`mirror certs node --dir /etc/mirror/tls`)"),
            META,
            CTL,
            PINS,
            ("/usr/share/doc/mirror/examples/", "commented example config files"),
            (
                "/usr/share/mirror/grafana/",
                "a Grafana dashboard for `mirror serve --metrics`, with its provisioning file",
            ),
        ],
        "mirror-replica" => &[
            ("/etc/mirror/replica.toml", "the config file of mirror-replica.service (--config)"),
            SECRET,
            META,
            PINS,
        ],
        "mirror-serve" => &[
            ("/etc/mirror/volumes/NAME.toml", "the config file of mirror-serve@NAME.service (--config)"),
            SECRET,
            CTL,
            META,
            PINS,
        ],
        "mirror-daemon" | "mirror-top" => &[PINS],
        p if p.starts_with("mirror-ctl") => &[CTL],
        _ => &[],
    }
}

/// What the config file of a command looks like, for its CONFIGURATION note (DESCRIPTION).
fn config_note(page: &str) -> Option<&'static str> {
    match page {
        "mirror-replica" | "mirror-serve" => Some(
            "With --config FILE the settings come from a TOML file too: each key is the long flag of \
             the same name with _ for - (--sync-min-rate is sync_min_rate); tables group the rest \
             ([[volume]] for a replica's volumes, [engine] for the weighting engine's flags, [monitor] \
             for the health monitor's, [health] for the health score). Unknown keys are errors that \
             name the key. A flag given on the command line overrides the file, the file overrides \
             the defaults. Commented examples: /usr/share/doc/mirror/examples/.",
        ),
        _ => None,
    }
}

fn section(roff: &mut Roff, title: &str) {
    roff.control("SH", [title]);
}

/// A tagged paragraph: `tag` in bold, then `text`.
fn item(roff: &mut Roff, tag: &str, text: &str) {
    roff.control("TP", []);
    roff.text([bold(tag)]);
    roff.text([roman(text)]);
}

/// The sections of a page that clap does not know.
fn extra_sections(page: &str, subpages: &[String]) -> Roff {
    let mut roff = Roff::new();
    if let Some(note) = config_note(page) {
        section(&mut roff, "CONFIGURATION");
        roff.text([roman(note)]);
    }
    section(&mut roff, "EXIT STATUS");
    for e in Exit::ALL {
        item(&mut roff, &e.code().to_string(), e.meaning());
    }
    section(&mut roff, "ENVIRONMENT");
    item(&mut roff, "MIRROR_SECRET_FILE", "the --secret-file of the commands that take one");
    item(
        &mut roff,
        "RUST_LOG",
        "the log filter (default info), e.g. RUST_LOG=mirror=debug; logs go to stderr",
    );
    let files = files(page);
    if !files.is_empty() {
        section(&mut roff, "FILES");
        for (path, what) in files {
            item(&mut roff, path, what);
        }
    }
    section(&mut roff, "SEE ALSO");
    let mut see: Vec<String> = if page == "mirror" { subpages.to_vec() } else { vec!["mirror".into()] };
    see.extend(subpages.iter().filter(|p| p.starts_with(&format!("{page}-"))).cloned());
    see.dedup();
    let mut refs = Vec::new();
    for (i, p) in see.iter().enumerate() {
        if i > 0 {
            refs.push(roman(", "));
        }
        refs.push(bold(p.as_str()));
        refs.push(roman(format!("({SECTION})")));
    }
    if page == "mirror" || page == "mirror-serve" || page == "mirror-replica" {
        refs.push(roman(", "));
        refs.push(bold("systemctl"));
        refs.push(roman("(1): "));
        refs.push(italic("mirror-daemon.service, mirror-replica.service, mirror-serve@NAME.service"));
    }
    roff.text(refs);
    roff
}

/// The NAME line wants one phrase: the about's first sentence; the whole of it stays the
/// DESCRIPTION (unless the command has a long about of its own).
fn short_about(c: clap::Command) -> clap::Command {
    let Some(about) = c.get_about().map(std::string::ToString::to_string) else { return c };
    let first = about.split(". ").next().unwrap_or(&about).trim_end_matches('.').to_string();
    let c = if c.get_long_about().is_none() { c.long_about(about) } else { c };
    c.about(first)
}

/// Every command of the tree, depth first, with its page name (`mirror-ctl-status`).
fn pages(cmd: &clap::Command, prefix: &str, out: &mut Vec<(String, clap::Command)>) {
    let name =
        if prefix.is_empty() { cmd.get_name().to_string() } else { format!("{prefix}-{}", cmd.get_name()) };
    out.push((name.clone(), cmd.clone()));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages(sub, &name, out);
    }
}

fn write_man(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut all = Vec::new();
    pages(&cmd, "", &mut all);
    let names: Vec<String> = all.iter().map(|(n, _)| n.clone()).collect();
    let version = cmd.get_version().unwrap_or("").to_string();
    let mut written = Vec::new();
    for (name, c) in all {
        let c = short_about(c.version(env!("CARGO_PKG_VERSION")));
        let man = Man::new(c.clone())
            .title(name.to_uppercase())
            .section(SECTION)
            .source(format!("mirror {version}"))
            .manual("mirror manual");
        let path = dir.join(format!("{name}.{SECTION}"));
        let mut f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        man.render_title(&mut f)?;
        man.render_name_section(&mut f)?;
        man.render_synopsis_section(&mut f)?;
        man.render_description_section(&mut f)?;
        if c.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(&mut f)?;
        }
        if c.has_subcommands() {
            man.render_subcommands_section(&mut f)?;
        }
        extra_sections(&name, &names).to_writer(&mut f)?;
        man.render_version_section(&mut f)?;
        f.flush()?;
        written.push(path);
    }
    Ok(written)
}

fn write_completions(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = Cli::command();
        written.push(clap_complete::generate_to(shell, &mut cmd, "mirror", dir)?);
    }
    Ok(written)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (man, comp) = (args.out.join("man"), args.out.join("completions"));
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let pages = write_man(&man)?;
    let completions = write_completions(&comp)?;
    println!("{} man pages in {}, completions: {}", pages.len(), man.display(), {
        let names: Vec<_> = completions.iter().filter_map(|p| p.file_name()?.to_str()).collect();
        names.join(" ")
    });
    Ok(())
}
