//! A sick target the application must not notice: the remote target replica frozen (SIGSTOP)
//! for several seconds under fio's verifying 4 KiB random writes through the NBD export. The
//! router's write deadline fails the laggard and acknowledges from the source: fio sees no
//! error and no write longer than a second; after SIGCONT the target is resynced and both
//! replicas are identical.

use std::time::Duration;

use mirror_tests::{
    env::{skip, which},
    sick::{write_stall, Mirror, MirrorOpts, Sickness},
};

/// The bar (issue 15): the longest write fio sees across the freeze.
const MAX_WRITE_MS: f64 = 1000.0;

#[test]
fn a_frozen_target_stalls_no_write_past_a_second_and_resyncs_identical() {
    const T: &str = "sick_frozen::a_frozen_target_stalls_no_write_past_a_second_and_resyncs_identical";
    if which("fio").is_none() {
        return skip(T, "NBD", "fio is not installed (cargo xtask setup)");
    }
    let m = Mirror::start("sick-frozen", &MirrorOpts::default()).unwrap_or_else(|e| panic!("{e:#}"));
    let s = write_stall(m, Sickness::Frozen, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e:#}"));
    s.assert_unnoticed("frozen", MAX_WRITE_MS);
}
