//! `cargo xtask test`: what CI runs.
//!
//! 1. formatting and clippy (`lint`);
//! 2. host unit tests of the whole workspace;
//! 3. release build of every artifact;
//! 4. the QEMU integration tests (`tests/`), one at a time, each with its
//!    own timeout and end marker.
use crate::{artifacts, root, sh};
use std::process::Command;
use std::time::Instant;

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn run() -> Result<(), String> {
    let t0 = Instant::now();
    crate::deps::ensure()?;
    println!("== lint");
    crate::lint::run()?;
    println!("== unit tests (host)");
    sh(cargo().args(["test", "--workspace"]))?;
    println!("== build");
    integration(&[])?;
    println!(
        "xtask: all tests passed in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Builds, prepares the guest image and runs the QEMU integration tests
/// (`filter`: test-name filters passed to the test harness).
pub fn integration(filter: &[String]) -> Result<(), String> {
    let a = artifacts::build()?;
    a.print();
    let build = root().join("build");
    thinhv_ovmf::linux::prepare(&build.join("cache"), &a.tool)?;
    println!("== integration tests (QEMU, Bochs)");
    let skipped = build.join("it").join(thinhv_ovmf::SKIPPED_FILE);
    let hangs = build.join("it").join(thinhv_ovmf::HANGS_FILE);
    let _ = std::fs::remove_file(&skipped);
    let _ = std::fs::remove_file(&hangs);
    let r = sh(cargo()
        .args([
            "test",
            "-p",
            "thinhv-tests",
            "--",
            "--ignored",
            "--test-threads=1",
        ])
        .args(filter)
        .env("THINHV_BUILD_DIR", &build));
    // Failed by hanging: where each stood, last, where a long log that is
    // cut in the middle still shows it.
    if let Ok(s) = std::fs::read_to_string(&hangs) {
        print!("{s}");
    }
    // Not passed, not failed: what the test beds could not check.
    if let Ok(s) = std::fs::read_to_string(&skipped) {
        for line in s.lines() {
            println!("{line}");
        }
    }
    r
}
