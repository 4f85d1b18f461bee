//! Embeds the eBPF object built by `cargo xtask build`. Without it the binary still builds (so
//! `cargo check`, clippy and unit tests work anywhere) and says at run time how to get it.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(mirror_has_ebpf)");
    println!("cargo:rerun-if-env-changed=MIRROR_EBPF_OBJ");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let obj = env::var_os("MIRROR_EBPF_OBJ")
        .map_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/mirror"), PathBuf::from);
    println!("cargo:rerun-if-changed={}", obj.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it")).join("mirror-ebpf.o");
    match fs::read(&obj) {
        Ok(bytes) if !bytes.is_empty() => {
            fs::write(&out, bytes).expect("write OUT_DIR/mirror-ebpf.o");
            println!("cargo:rustc-cfg=mirror_has_ebpf");
        }
        _ => {
            fs::write(&out, []).expect("write OUT_DIR/mirror-ebpf.o");
            println!(
                "cargo:warning=eBPF object not found at {}: run `cargo xtask build` to embed it \
                 (without it the daemon uses the /proc fallback)",
                obj.display()
            );
        }
    }
}
