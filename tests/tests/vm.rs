//! Tests that need the VM kernel (Debian 6.12 under virtme-ng): kernel features the host lacks.
//! `cargo xtask vm-test` runs this binary inside the VM with MIRROR_IN_VM=1.

use mirror_tests::env::not_in_vm;

#[test]
fn ublk_driver_is_loadable_in_the_vm() {
    const T: &str = "vm::ublk_driver_is_loadable_in_the_vm";
    if not_in_vm(T) {
        return;
    }
    let ctl = std::path::Path::new("/dev/ublk-control");
    assert!(ctl.exists(), "/dev/ublk-control missing after modprobe ublk_drv");
    // Opening the control device proves the driver answers (ublk's server side needs it).
    let f = std::fs::OpenOptions::new().read(true).write(true).open(ctl);
    assert!(f.is_ok(), "open /dev/ublk-control: {:?}", f.err());
}

#[test]
fn vm_kernel_has_the_block_tracepoints_and_btf() {
    const T: &str = "vm::vm_kernel_has_the_block_tracepoints_and_btf";
    if not_in_vm(T) {
        return;
    }
    assert!(std::path::Path::new("/sys/kernel/btf/vmlinux").exists());
    let offsets = mirror::telemetry::tracefs::blk_offsets(std::path::Path::new("/sys/kernel/tracing"))
        .expect("block tracepoint formats parse on the VM kernel");
    assert_eq!(offsets.valid, 1);
}
