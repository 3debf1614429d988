//! Everything needed to boot thinhv in an emulator, shared by `xtask` (run,
//! bench) and the integration tests:
//!
//! * [`firmware`] — where OVMF is;
//! * [`qemu`] — QEMU command lines for the test profiles;
//! * [`esp`] — an EFI system partition laid out as a server's would be;
//! * [`linux`] — a Debian kernel (downloaded with `apt-get download`, never
//!   installed) and a busybox initramfs;
//! * [`bochs`] — the Bochs test bed (Intel VMX + EPT);
//! * [`cpio`] — the `newc` archive format for the initramfs;
//! * [`runner`] — starts QEMU under a timeout, watches the serial port for
//!   markers, and always kills the process it started (by PID) on drop.
pub mod bochs;
pub mod cpio;
pub mod esp;
pub mod firmware;
pub mod linux;
pub mod qemu;
pub mod runner;

use std::path::{Path, PathBuf};

/// The build directory: `THINHV_BUILD_DIR` (what `cargo xtask` passes the
/// tests), else `build/` in the workspace.
pub fn build_dir() -> PathBuf {
    std::env::var_os("THINHV_BUILD_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../build"),
        PathBuf::from,
    )
}

/// File under the integration tests' work directory that collects the
/// SKIPPED lines (a capability the test bed lacks); `cargo xtask it`
/// prints them after the run.
pub const SKIPPED_FILE: &str = "skipped.txt";

/// File under the integration tests' work directory that collects a brief
/// report of each run that stopped making progress; `cargo xtask it` prints
/// it after the run, where a long log cut in the middle still shows it.
pub const HANGS_FILE: &str = "hangs.txt";
