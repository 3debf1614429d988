//! The UEFI application: glue between the firmware and the pure logic in
//! the library. Order of events (DESIGN.md, "Boot flow"):
//!
//! 1. read `thinhv.toml` beside this image;
//! 2. check the processor;
//! 3. reserve memory, load the core, start it on the BSP and every AP;
//! 4. if anything failed: roll back so that no CPU stays virtualized, say
//!    why, and boot the OS without thinhv (unless `required`);
//! 5. chain-load the OS.
//!
//! x86-64 UEFI only: `usize` is 64 bits, so the `u64`/`usize` conversions
//! of addresses and sizes here cannot truncate, and counts converted to
//! `u32` are bounded by `MAX_CPUS` / `MAX_RAM_RANGES` first.
#![allow(clippy::cast_possible_truncation)]
mod acpi_tables;
mod appliances;
mod chain;
mod config_file;
mod hypercall;
mod install;
mod iommu;
mod nvme;
mod pci;
mod platform;

use alloc::string::String;
use thinhv_config::Config;
use uefi::prelude::*;
use uefi::println;

/// What to boot and how.
pub struct BootTarget {
    /// `[boot] next`.
    pub next: Option<String>,
    /// `[boot] options`.
    pub options: Option<String>,
}

#[entry]
fn main() -> Status {
    if uefi::helpers::init().is_err() {
        return Status::ABORTED;
    }
    log::set_max_level(log::LevelFilter::Info);
    println!(
        "thinhv {}: firmware-resident thin hypervisor",
        env!("CARGO_PKG_VERSION")
    );
    let cfg_file = config_file::load();
    let (config, target, config_error) = match cfg_file {
        config_file::Loaded::Absent => {
            println!(
                "thinhv: no {} beside thinhv.efi; using defaults",
                thinhv_config::FILE_NAME
            );
            let c = Config::default();
            (
                c,
                BootTarget {
                    next: None,
                    options: None,
                },
                None,
            )
        }
        config_file::Loaded::Parsed(c) => {
            let t = BootTarget {
                next: c.next_path(),
                options: c.boot.options.clone(),
            };
            (c, t, None)
        }
        config_file::Loaded::Broken { error, salvaged } => {
            let mut c = Config::default();
            c.hypervisor.required = salvaged.required;
            let t = BootTarget {
                next: salvaged
                    .next
                    .as_deref()
                    .map(thinhv_config::normalize_esp_path),
                options: salvaged.options.clone(),
            };
            (c, t, Some(error))
        }
    };
    set_log_level(&config);

    let outcome = match config_error {
        Some(e) => Err(alloc::format!("configuration error: {e}")),
        None if !config.hypervisor.enabled => Err(alloc::string::String::from(
            "disabled in thinhv.toml ([hypervisor] enabled = false)",
        )),
        None => install::install(&config),
    };
    match outcome {
        Ok(summary) => println!("thinhv: {summary}"),
        Err(reason) => {
            println!("thinhv: not started: {reason}");
            if config.hypervisor.required {
                stop_required(&reason);
            }
            println!("thinhv: booting the operating system without the hypervisor");
        }
    }
    chain::boot(&target)
}

fn set_log_level(c: &Config) {
    use thinhv_config::LogLevel;
    log::set_max_level(match c.hypervisor.log_level {
        LogLevel::Off => log::LevelFilter::Off,
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
    });
}

/// `required = true` and thinhv could not start: stop here, say why, and
/// restart on a key press (never boot the OS unprotected).
fn stop_required(reason: &str) -> ! {
    // The boot manager's 5-minute watchdog would reset into the same
    // failure over and over; the admin needs to read the screen.
    let _ = boot::set_watchdog_timer(0, 0x10000, None);
    println!(
        "thinhv: the hypervisor is required ([hypervisor] required = true) and could not start:"
    );
    println!("thinhv:   {reason}");
    println!(
        "thinhv: THE SYSTEM IS STOPPED. Fix the cause, or set required = false in thinhv.toml."
    );
    println!("thinhv: Press any key to restart.");
    loop {
        let key = uefi::system::with_stdin(uefi::proto::console::text::Input::read_key);
        if let Ok(Some(_)) = key {
            uefi::runtime::reset(uefi::runtime::ResetType::COLD, Status::ABORTED, None);
        }
        boot::stall(core::time::Duration::from_millis(100));
    }
}
