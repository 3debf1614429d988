//! `cargo xtask <command>`: see `cargo xtask help`.
mod artifacts;
mod bench;
mod deps;
mod fuzz;
mod guest;
mod lint;
mod soak;
mod test;

use std::process::ExitCode;

const HELP: &str = "cargo xtask <command>

  build            build thinhv.efi (core embedded), the EFI probe and the guest tool
  run [opts]       boot OVMF -> thinhv -> Debian Linux in QEMU, serial on this terminal
                     --smp N        processors (default 2)
                     --no-hv        boot the same Linux without thinhv
                     --append ARGS  extra kernel command-line arguments
  test             lint, unit tests, then the QEMU integration tests (what CI runs)
  it [FILTER..]    only the QEMU integration tests (optionally those matching FILTER)
  bench            boot time with and without thinhv, exits, memory, binary size,
                     and the CPUID/APIC-write exit round trips measured in the guest;
                     an appliance beside the OS (--appliances: only that; --runs N);
                     --appliance-nvme: only an appliance's own NVMe read against the OS's;
                     --appliance-nvme-vf: the same on two VFs of an NVMe PF thinhv keeps
  soak [N]         boot Linux under thinhv N times (SMP 4, igb + NVMe; default 10) and
                     report every hang or failure with its hang report (not part of CI)
  lint             rustfmt check and clippy on the host, UEFI and core targets
  fuzz [SECONDS]   run each cargo-fuzz target (ACPI tables, PCI capabilities) for SECONDS
                     (default 60; needs nightly Rust and cargo-fuzz)
  setup            install what the test beds need (Debian; root)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map_or("help", String::as_str);
    let rest = &args[1.min(args.len())..];
    let r = match cmd {
        "build" => artifacts::build().map(|a| a.print()),
        "run" => guest::run(rest),
        "test" => test::run(),
        "it" => crate::deps::ensure().and_then(|()| test::integration(rest)),
        "bench" => bench::run(rest),
        "soak" => soak::run(rest),
        "lint" => lint::run(),
        "fuzz" => fuzz::run(rest),
        "setup" => deps::setup(),
        "help" | "-h" | "--help" => {
            println!("{HELP}");
            Ok(())
        }
        other => Err(format!("unknown command {other:?}\n\n{HELP}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

/// Runs a command, inheriting stdio; fails with the command line.
pub fn sh(cmd: &mut std::process::Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().map_err(|e| format!("{shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}
