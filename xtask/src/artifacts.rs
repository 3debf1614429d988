//! Building everything, and where it ends up (`build/`).
use crate::{root, sh};
use std::path::PathBuf;
use std::process::Command;

/// Built artifacts.
#[derive(Clone, Debug)]
pub struct Artifacts {
    /// The core ELF.
    pub core: PathBuf,
    /// `thinhv.efi`.
    pub efi: PathBuf,
    /// The EFI probe.
    pub probe: PathBuf,
    /// The guest tool (static Linux binary).
    pub tool: PathBuf,
}

impl Artifacts {
    /// Where `build` puts them.
    pub fn locations() -> Self {
        let b = root().join("build");
        Self {
            core: b.join("thin-hv.elf"),
            efi: b.join("thinhv.efi"),
            probe: b.join("thinhv-probe.efi"),
            tool: b.join("thinhv"),
        }
    }

    /// Prints where they are.
    pub fn print(&self) {
        let size = |p: &PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
        println!("built:");
        println!(
            "  {}  ({} bytes; UEFI loader with the core embedded)",
            self.efi.display(),
            size(&self.efi)
        );
        println!(
            "  {}  ({} bytes; the core ELF, for reference)",
            self.core.display(),
            size(&self.core)
        );
        println!(
            "  {}  ({} bytes; EFI probe for tests)",
            self.probe.display(),
            size(&self.probe)
        );
        println!(
            "  {}  ({} bytes; static Linux tool: thinhv status/devices/log/selftest/check/install)",
            self.tool.display(),
            size(&self.tool)
        );
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Builds all artifacts in release mode.
pub fn build() -> Result<Artifacts, String> {
    crate::deps::rust_targets()?;
    let target = root().join("target");
    sh(cargo().args([
        "build",
        "--release",
        "-p",
        "thin-hv",
        "--bin",
        "thin-hv",
        "--target",
        "x86_64-unknown-none",
    ]))?;
    let core = target.join("x86_64-unknown-none/release/thin-hv");
    let elf = std::fs::read(&core).map_err(|e| format!("{}: {e}", core.display()))?;
    // The loader's own ELF checks, at build time: a core it would refuse
    // never gets embedded.
    let lay =
        thinhv_efi::elf_load::layout(&elf).map_err(|e| format!("the core ELF is unusable: {e}"))?;
    println!(
        "core: {} bytes, image {} KiB, {} relocations, entry {:#x}",
        elf.len(),
        lay.span / 1024,
        lay.relocations,
        lay.entry
    );
    sh(cargo()
        .args([
            "build",
            "--release",
            "-p",
            "thinhv-efi",
            "--bin",
            "thinhv",
            "--target",
            "x86_64-unknown-uefi",
        ])
        .env("THINHV_CORE_ELF", &core))?;
    sh(cargo().args([
        "build",
        "--release",
        "-p",
        "thinhv-probe",
        "--target",
        "x86_64-unknown-uefi",
    ]))?;
    sh(cargo()
        .args([
            "build",
            "--release",
            "-p",
            "thinhv-cli",
            "--bin",
            "thinhv",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        ))?;
    let a = Artifacts::locations();
    std::fs::create_dir_all(root().join("build")).map_err(|e| e.to_string())?;
    let copy = |from: PathBuf, to: &PathBuf| {
        std::fs::copy(&from, to)
            .map(|_| ())
            .map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))
    };
    copy(core, &a.core)?;
    copy(
        target.join("x86_64-unknown-uefi/release/thinhv.efi"),
        &a.efi,
    )?;
    copy(
        target.join("x86_64-unknown-uefi/release/thinhv-probe.efi"),
        &a.probe,
    )?;
    copy(
        target.join("x86_64-unknown-linux-gnu/release/thinhv"),
        &a.tool,
    )?;
    Ok(a)
}
