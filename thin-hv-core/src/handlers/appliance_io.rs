//! Port I/O of appliance processors: every port exits (their I/O map
//! intercepts all). The console UART is emulated (`console = "log"`: its
//! lines go to thinhv's log, prefixed with the appliance's name) or passed
//! through (`console` = a COM port given to the appliance); a reset
//! through port 0xCF9 or the keyboard controller stops the appliance, not
//! the machine; every other port reads as all ones (no device) and
//! ignores writes, so the OS's PIT, RTC, PIC, COM ports and PCI
//! configuration space are out of its reach.
use super::Outcome;
use super::pcicfg::complete_port;
use crate::env::Env;
use crate::guest::{Gpr, GuestCpu, vector};
use thinhv_passthrough::mediate::all_ones;

/// The emulated console's base port.
pub const CONSOLE: u16 = 0x3f8;

pub(super) fn port(
    cpu: &mut impl GuestCpu,
    env: &mut impl Env,
    port: u16,
    size: u8,
    input: bool,
    string: bool,
) -> Outcome {
    let part = env.hv().partition_of(env.cpu_index());
    let Some(p) = env.hv().appliance(part) else {
        return Outcome::Fatal("appliance port I/O without a partition");
    };
    if string || !matches!(size, 1 | 2 | 4) {
        log::warn!(
            "appliance {:?}: string or odd-sized I/O on port {port:#x}; #GP",
            p.name()
        );
        cpu.inject_exception(vector::GP, Some(0));
        return Outcome::Resume;
    }
    let value = (cpu.gpr(Gpr::Rax) & 0xffff_ffff) as u32 & all_ones(size);
    if let Some(v) = super::appliance_pci::port(env, part, port, size, input, value) {
        return complete_port(cpu, env, size, input.then_some(v));
    }
    let Some(p) = env.hv().appliance(part) else {
        return Outcome::Fatal("appliance port I/O without a partition");
    };
    let given = p.info.console_port;
    let mut loaded = 0u32;
    if given != 0 && (given..given + 8).contains(&port) {
        if input {
            loaded = env.port_read(port, size);
        } else {
            env.port_write(port, size, value);
        }
    } else if given == 0 && (CONSOLE..CONSOLE + 8).contains(&port) {
        let mut uart = p.console.lock();
        for i in 0..u16::from(size) {
            let off = port + i - CONSOLE;
            if off >= 8 {
                break;
            }
            if input {
                loaded |= u32::from(uart.read(off)) << (8 * i);
            } else if let Some(line) = uart.write(off, value.to_le_bytes()[usize::from(i)]) {
                log::info!(
                    "[{}] {}",
                    p.name(),
                    core::str::from_utf8(line).unwrap_or("?")
                );
            }
        }
    } else if input {
        loaded = all_ones(size);
    } else if (port == 0xcf9 && value & 0x04 != 0) || (port == 0x64 && value & 0xff == 0xfe) {
        log::warn!(
            "appliance {:?}: reset requested through port {port:#x}",
            p.name()
        );
        return Outcome::Fatal("the appliance asked for a reset");
    }
    complete_port(cpu, env, size, input.then_some(loaded))
}
