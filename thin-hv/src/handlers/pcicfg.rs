//! PCI configuration accesses thinhv mediates (hidden functions, VF
//! budgets): loads and stores on the ECAM page of a mediated function
//! (nested page fault: the page is not present in the second-level
//! tables), and IN/OUT on the legacy data port 0xCFC..0xCFF (I/O
//! intercept; the address latch 0xCF8 is the hardware's, read back here).
//! What the access returns or writes is decided by
//! [`thinhv_passthrough::mediate`]; everything it lets through reaches the
//! device with the guest's own width.
use super::{Outcome, advance, decode_current, wrap_ip};
use crate::env::Env;
use crate::guest::{Gpr, GuestCpu, vector};
use crate::insn::{Load, StoreSource};
use core::sync::atomic::Ordering;
use thinhv_abi::handoff::{PCI_ACTION_HIDE, PciMediation};
use thinhv_passthrough::mediate::{self, Policy, Refusal};

/// The legacy configuration address latch.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// The first legacy configuration data port (0xCFC..=0xCFF).
pub const CONFIG_DATA: u16 = 0xcfc;

/// The low 32 bits.
const fn low32(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

fn policy_of(m: &PciMediation) -> Policy {
    if m.action == PCI_ACTION_HIDE {
        Policy::Hidden
    } else {
        Policy::VfBudget {
            cap: m.sriov_cap,
            os_vfs: m.os_vfs,
            initial_vfs: m.initial_vfs,
        }
    }
}

fn bdf(m: &PciMediation) -> (u8, u8, u8) {
    (m.bus, m.devfn >> 3, m.devfn & 7)
}

fn report(env: &impl Env, m: &PciMediation, refusal: Refusal) {
    let count = env.hv().refused_pci_writes.fetch_add(1, Ordering::Relaxed) + 1;
    let (bus, dev, func) = bdf(m);
    match refusal {
        Refusal::NumVfsAboveBudget { asked, budget } => log::warn!(
            "PCI 0000:{bus:02x}:{dev:02x}.{func}: NumVFs = {asked} refused: the OS may use {budget} VFs ({count} refused writes)"
        ),
        Refusal::VfEnableAboveBudget { num_vfs, budget } => log::warn!(
            "PCI 0000:{bus:02x}:{dev:02x}.{func}: VF Enable with NumVFs = {num_vfs} refused: the OS may use {budget} VFs ({count} refused writes)"
        ),
    }
}

/// Reads the 16-bit register `reg` of `m` through ECAM.
fn read16(env: &impl Env, m: &PciMediation, reg: u16) -> u16 {
    (env.mmio_read(env.hv().pci.page_of(m) + u64::from(reg), 2) & 0xffff) as u16
}

/// A load or store the guest made at `offset` of the ECAM page (at `gpa`)
/// of the mediated function `m`.
pub(super) fn ecam(
    cpu: &mut impl GuestCpu,
    env: &mut impl Env,
    gpa: u64,
    m: PciMediation,
    offset: u16,
) -> Outcome {
    let me = env.cpu_index();
    let policy = policy_of(&m);
    let Some(d) = decode_current(cpu, env) else {
        log::error!(
            "cpu {me}: cannot decode the configuration access at rip {:#x}; #GP",
            cpu.rip()
        );
        cpu.inject_exception(vector::GP, Some(0));
        return Outcome::Resume;
    };
    let next = wrap_ip(cpu.mode(), cpu.rip().wrapping_add(d.len() as u64));
    let fits =
        |size: u8| matches!(size, 1 | 2 | 4) && usize::from(offset) + usize::from(size) <= 4096;
    if let Some(load) = d.load().filter(|l| fits(l.size)) {
        let v = mediate::read(&policy, offset, load.size, || env.mmio_read(gpa, load.size));
        set_loaded(cpu, load, v);
    } else if let Some(store) = d.store().filter(|s| fits(s.size) && !s.exchange) {
        let value = match store.source {
            StoreSource::Immediate(v) => v,
            StoreSource::Register(r) => cpu.gpr(r),
        };
        let value = low32(value) & mediate::all_ones(store.size);
        let w = mediate::write(&policy, offset, store.size, value, |reg| {
            read16(env, &m, reg)
        });
        if let Some(v) = w.forward {
            env.mmio_write(gpa, store.size, v);
        }
        if let Some(r) = w.refused {
            report(env, &m, r);
        }
    } else {
        log::error!(
            "cpu {me}: unsupported configuration access {:?} at {gpa:#x} (rip {:#x}); skipped",
            d.mnemonic(),
            cpu.rip()
        );
    }
    cpu.set_rip(next);
    Outcome::Resume
}

fn set_loaded(cpu: &mut impl GuestCpu, load: Load, value: u32) {
    let old = cpu.gpr(load.dest);
    cpu.set_gpr(load.dest, load.merge(old, u64::from(value)));
}

/// IN or OUT on an intercepted configuration data port.
pub(super) fn port(
    cpu: &mut impl GuestCpu,
    env: &mut impl Env,
    port: u16,
    size: u8,
    input: bool,
    string: bool,
) -> Outcome {
    if string || !matches!(size, 1 | 2 | 4) {
        log::error!(
            "cpu {}: string or odd-sized I/O on port {port:#x} at rip {:#x}; #GP",
            env.cpu_index(),
            cpu.rip()
        );
        cpu.inject_exception(vector::GP, Some(0));
        return Outcome::Resume;
    }
    let target = port
        .checked_sub(CONFIG_DATA)
        .filter(|b| *b < 4)
        .and_then(|b| mediate::cf8_target(env.port_read(CONFIG_ADDRESS, 4), (b & 3) as u8))
        .and_then(|(bus, devfn, off)| env.hv().pci.find(bus, devfn).map(|m| (*m, off)));
    let rax = Load {
        dest: Gpr::Rax,
        dest_size: size,
        size,
    };
    match target {
        None if input => {
            let v = env.port_read(port, size);
            set_loaded(cpu, rax, v);
        }
        None => {
            let v = low32(cpu.gpr(Gpr::Rax)) & mediate::all_ones(size);
            env.port_write(port, size, v);
        }
        Some((m, off)) if input => {
            let v = mediate::read(&policy_of(&m), off, size, || env.port_read(port, size));
            set_loaded(cpu, rax, v);
        }
        Some((m, off)) => {
            let v = low32(cpu.gpr(Gpr::Rax)) & mediate::all_ones(size);
            let w = mediate::write(&policy_of(&m), off, size, v, |reg| read16(env, &m, reg));
            if let Some(v) = w.forward {
                env.port_write(port, size, v);
            }
            if let Some(r) = w.refused {
                report(env, &m, r);
            }
        }
    }
    if !advance(cpu, env) {
        cpu.inject_exception(vector::GP, Some(0));
    }
    Outcome::Resume
}
