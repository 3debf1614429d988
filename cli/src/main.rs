//! `thinhv`: the operator's command.
//!
//! Inside a guest (as root, no kernel module needed):
//! * `thinhv status [--json]` — version, CPUs, memory reserved, exits by
//!   reason, and the hypervisor log;
//! * `thinhv log` — the hypervisor log alone;
//! * `thinhv selftest` — checks, from user mode, that the hypervisor's
//!   memory is out of reach and that hypercalls from user mode are refused.
//!
//! Anywhere: `thinhv check FILE` validates a `thinhv.toml`.
//!
//! On a Linux host that boots through UEFI (root): `thinhv install` puts
//! thinhv on the ESP and first in `BootOrder`; `thinhv uninstall` undoes it.
//!
//! Installed as `thinhv-status` (a link), it behaves as `thinhv status`.
//!
//! How it talks to thinhv without privileges in the kernel: CPUID leaves
//! `0x4000_0000..` (any privilege level) give the version and the physical
//! address of the read-only status page; `/dev/mem` (root) reads that page.
//! See `docs/status-channel.md`.
mod appliances;
mod attack_msr;
mod attack_pci;
mod cpuid;
mod devmem;
mod dma;
mod gpt;
mod install;
mod nvme_virt;
mod offloads;
mod report;
mod selftest;
mod vfio;

use std::process::ExitCode;
use thinhv_abi::status::ControlOp;

pub(crate) const USAGE: &str = "usage: thinhv <command>
  status [--json]   show thinhv's state (inside a guest; root for counters and log)
  log [--json]      print the hypervisor log (root)
  devices [--json]  PCI functions thinhv found, their owner, IOMMU domain and SR-IOV state (root)
  appliances [--json]
                    the appliance partitions: state, CPUs, memory, uptime, restarts,
                    last console lines (root)
  appliance console NAME
                    an appliance's console lines (console = \"log\"; root)
  appliance stop|start|restart NAME [--no-wait]
                    stop, start or restart an appliance (control = \"os\"; root);
                    waits until it is stopped or running again
  selftest          check the hypervisor's protection from inside the guest (root)
  check FILE        validate a thinhv.toml and print the effective settings
  install --esp DIR [--config FILE] [--efi FILE] [--dry-run]
                    copy thinhv.efi (and the config) to DIR\\EFI\\thinhv and put a
                    Boot#### entry first in BootOrder; the previous first entry
                    is what thinhv starts next (root, UEFI host)
  uninstall --esp DIR [--keep-files] [--dry-run]
                    delete thinhv's boot entry and restore the previous BootOrder
      (both also take --efivars DIR and --esp-partition gpt:GUID:N:START:SIZE,
       for disk images and tests)
  help              this text";

/// Exit code when thinhv is not running.
const NOT_PRESENT: u8 = 3;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let argv0 = args.first().cloned().unwrap_or_default();
    if argv0.rsplit('/').next() == Some("thinhv-status") {
        args.insert(1, "status".into());
    }
    let cmd = args.get(1).map_or("help", String::as_str);
    let rest = &args[2.min(args.len())..];
    match cmd {
        "status" => report::status(rest.iter().any(|a| a == "--json")),
        "log" => report::log(rest.iter().any(|a| a == "--json")),
        "devices" => report::devices(rest.iter().any(|a| a == "--json")),
        "appliances" => appliances::list(rest.iter().any(|a| a == "--json")),
        "appliance" if rest.first().is_some_and(|a| a == "console") => {
            appliances::console(&rest[1..])
        }
        "appliance" if rest.first().is_some_and(|a| a == "stop") => {
            appliances::control(ControlOp::Stop, &rest[1..])
        }
        "appliance" if rest.first().is_some_and(|a| a == "start") => {
            appliances::control(ControlOp::Start, &rest[1..])
        }
        "appliance" if rest.first().is_some_and(|a| a == "restart") => {
            appliances::control(ControlOp::Restart, &rest[1..])
        }
        "selftest" => selftest::run(),
        "check" => check(rest),
        "install" => install::run_install(rest),
        // Test tool for the guest (QEMU's edu device); not for operators.
        "dma-probe" => dma::run(rest),
        // Test tool for the guest with an IOMMU of its own (issue 14).
        "vfio-probe" => vfio::run(),
        // Attacks a hostile kernel tries (issue 11); test tools as well.
        "attack" if rest.first().is_some_and(|a| a == "msr") => attack_msr::run(&rest[1..]),
        "attack" => attack_pci::run(rest),
        "offloads" => offloads::run(rest),
        "nvme-virt" => nvme_virt::run(rest),
        "uninstall" => install::run_uninstall(rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("thinhv: unknown command {other:?}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn check(rest: &[String]) -> ExitCode {
    let Some(path) = rest.first() else {
        eprintln!("usage: thinhv check FILE");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("thinhv: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match thinhv_config::Config::parse(&text) {
        Ok(c) => {
            let (devices, sriov) = thinhv_efi::inventory::rules(&c);
            let mut problems = thinhv_passthrough::policy::syntax_problems(&devices, &sriov);
            for a in &c.appliance {
                for d in &a.devices {
                    // A VF entry names its PF by the same syntax.
                    let m = thinhv_config::appliance::vf_entry(d).map_or(d.as_str(), |(pf, _)| pf);
                    if let Err(m) = thinhv_passthrough::policy::Matcher::parse(m) {
                        problems.push(thinhv_passthrough::policy::Problem {
                            message: format!("{}: devices: {m}", a.label()),
                        });
                    }
                }
            }
            if problems.is_empty() {
                println!("{path}: ok\n\n# effective settings\n{}", c.effective());
                return ExitCode::SUCCESS;
            }
            for p in &problems {
                eprintln!("{path}: {}", p.message);
            }
            eprintln!(
                "at boot, thinhv would start, report these rules and leave them out \
                 (whether the others match a device is checked on the machine itself)"
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            let shown = e.to_string().replacen(thinhv_config::FILE_NAME, path, 1);
            eprintln!("{shown}");
            let s = thinhv_config::salvage(&text);
            eprintln!(
                "at boot, thinhv would not start and would boot {} (required = {})",
                s.next.as_deref().unwrap_or("the next BootOrder entry"),
                s.required
            );
            ExitCode::FAILURE
        }
    }
}
