//! Nested page faults: writes to the hypervisor's memory (discarded), the
//! local APIC page (emulated, for INIT/SIPI), pages the emulated APIC
//! relocation traps ([`super::apic_reloc`]), and first touches of address
//! space beyond the initial map.
use super::{Handled, Outcome, advance, decode_current, ipi};
use crate::apic::reg;
use crate::env::Env;
use crate::guest::{GuestCpu, vector};
use crate::insn::StoreSource;
use core::sync::atomic::Ordering;
use thinhv_abi::exit::ExitReason;

/// Protected-region writes logged in full before the log is thinned out.
const LOG_FIRST: u64 = 8;

pub(super) fn handle(
    cpu: &mut impl GuestCpu,
    env: &mut impl Env,
    gpa: u64,
    write: bool,
    fetch: bool,
    present: bool,
) -> Handled {
    let hv = env.hv();
    let part = hv.space_of(env.cpu_index());
    if !part.is_os() {
        return appliance(cpu, env, gpa, write, present);
    }
    if write && present && gpa & !7 == hv.control_doorbell() {
        return Handled {
            outcome: control_write(cpu, env),
            reason: ExitReason::NESTED_FAULT,
        };
    }
    if hv.touches_hypervisor(gpa, 1) || hv.foreign_ram(part, gpa, 1) {
        return Handled {
            outcome: protected(cpu, env, gpa, write, fetch),
            reason: ExitReason::PROTECTED_ACCESS,
        };
    }
    if let Some((m, offset)) = hv.pci.mediated_at(gpa).map(|(m, o)| (*m, o)) {
        return Handled {
            outcome: super::pcicfg::ecam(cpu, env, gpa, m, offset),
            reason: ExitReason::PCI_CONFIG,
        };
    }
    if write
        && present
        && let Some(outcome) = super::hpet::write(cpu, env, gpa)
    {
        return Handled {
            outcome,
            reason: ExitReason::APIC_ACCESS,
        };
    }
    if !present && let Some(outcome) = super::ioapic::access(cpu, env, gpa) {
        return Handled {
            outcome,
            reason: ExitReason::APIC_ACCESS,
        };
    }
    if !present && let Some(outcome) = super::msi_remap::msix_access(cpu, env, gpa) {
        return Handled {
            outcome,
            reason: ExitReason::PCI_CONFIG,
        };
    }
    if !present && let Some(outcome) = super::os_iommu::access(cpu, env, gpa) {
        return Handled {
            outcome,
            reason: ExitReason::NESTED_FAULT,
        };
    }
    if let Some(outcome) = super::apic_reloc::access(cpu, env, gpa, fetch) {
        return Handled {
            outcome,
            reason: ExitReason::APIC_ACCESS,
        };
    }
    if write && present && gpa & !0xfff == env.hv().apic_base {
        return Handled {
            outcome: apic_write(cpu, env, gpa),
            reason: ExitReason::APIC_ACCESS,
        };
    }
    if !present && env.demand_map(gpa) {
        log::debug!(
            "cpu {}: mapped the GiB at {gpa:#x} on first touch",
            env.cpu_index()
        );
        return Handled {
            outcome: Outcome::ResumeFlushTlb,
            reason: ExitReason::NESTED_FAULT,
        };
    }
    log::error!(
        "cpu {}: unexpected nested fault at {gpa:#x} (write {write}, fetch {fetch}, present {present}) rip {:#x}; injecting #GP",
        env.cpu_index(),
        cpu.rip()
    );
    cpu.inject_exception(vector::GP, Some(0));
    Handled {
        outcome: Outcome::Resume,
        reason: ExitReason::NESTED_FAULT,
    }
}

/// A nested fault on an appliance processor: a write to its local APIC
/// (the ICR filtered as for the OS), or an access to an address where it
/// has no memory and no device, which stops the appliance.
fn appliance(
    cpu: &mut impl GuestCpu,
    env: &mut impl Env,
    gpa: u64,
    write: bool,
    present: bool,
) -> Handled {
    if write && present && gpa & !0xfff == env.hv().apic_base {
        return Handled {
            outcome: apic_write(cpu, env, gpa),
            reason: ExitReason::APIC_ACCESS,
        };
    }
    if !present && let Some(outcome) = super::msi_remap::msix_access(cpu, env, gpa) {
        return Handled {
            outcome,
            reason: ExitReason::PCI_CONFIG,
        };
    }
    log::error!(
        "cpu {}: appliance access to {gpa:#x} (write {write}), where it has neither memory nor a device, rip {:#x}",
        env.cpu_index(),
        cpu.rip()
    );
    Handled {
        outcome: Outcome::Fatal("an appliance touched an address outside its partition"),
        reason: ExitReason::NESTED_FAULT,
    }
}

/// A write to the appliance control doorbell (the status area is
/// read-only for the OS, so every store there exits): an aligned 8-byte
/// store is a request ([`super::partition::control`]), whose result is
/// published beside the doorbell; anything else is discarded like any
/// other write to thinhv's memory.
fn control_write(cpu: &mut impl GuestCpu, env: &mut impl Env) -> Outcome {
    let Some(d) = decode_current(cpu, env) else {
        cpu.inject_exception(vector::GP, Some(0));
        return Outcome::Resume;
    };
    let next = cpu.rip().wrapping_add(d.len() as u64);
    cpu.set_rip(next);
    let Some(store) = d.store().filter(|s| s.size == 8 && !s.exchange) else {
        log::warn!(
            "cpu {}: appliance control doorbell written by {:?}, not an 8-byte store; discarded",
            env.cpu_index(),
            d.mnemonic()
        );
        return Outcome::Resume;
    };
    let word = match store.source {
        StoreSource::Immediate(v) => v,
        StoreSource::Register(r) => cpu.gpr(r),
    };
    let result = super::partition::control(env, word);
    env.publish_control(result);
    Outcome::Resume
}

fn protected(
    cpu: &mut impl GuestCpu,
    env: &mut impl Env,
    gpa: u64,
    write: bool,
    fetch: bool,
) -> Outcome {
    let me = env.cpu_index();
    let whose = if env.hv().touches_hypervisor(gpa, 1) {
        "hypervisor"
    } else {
        "another partition's"
    };
    if fetch {
        log::warn!(
            "cpu {me}: guest tried to execute {whose} memory at {gpa:#x} (rip {:#x}); #UD",
            cpu.rip()
        );
        cpu.inject_exception(vector::UD, None);
        return Outcome::Resume;
    }
    if write {
        let n = env.hv().blocked_writes.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= LOG_FIRST || n.is_multiple_of(1024) {
            log::warn!(
                "cpu {me}: write to {whose} memory at {gpa:#x} discarded (rip {:#x}, {n} so far)",
                cpu.rip()
            );
        }
    }
    if !advance(cpu, env) {
        cpu.inject_exception(vector::GP, Some(0));
    }
    Outcome::Resume
}

/// A write to this CPU's xAPIC page at `gpa` (the offset within the page
/// is the register; the page is the real one, or the one the guest moved
/// it to: [`super::apic_reloc`]).
pub(super) fn apic_write(cpu: &mut impl GuestCpu, env: &mut impl Env, gpa: u64) -> Outcome {
    let me = env.cpu_index();
    let Some(d) = decode_current(cpu, env) else {
        log::error!(
            "cpu {me}: cannot decode the APIC write at rip {:#x}; #GP",
            cpu.rip()
        );
        cpu.inject_exception(vector::GP, Some(0));
        return Outcome::Resume;
    };
    let next = cpu.rip().wrapping_add(d.len() as u64);
    let Some(store) = d.store().filter(|s| s.size == 4) else {
        log::error!(
            "cpu {me}: unsupported APIC access {:?} at rip {:#x}; skipped",
            d.mnemonic(),
            cpu.rip()
        );
        cpu.set_rip(next);
        return Outcome::Resume;
    };
    let value = match store.source {
        StoreSource::Immediate(v) => v,
        StoreSource::Register(r) => cpu.gpr(r),
    } & 0xffff_ffff;
    let value = value as u32;
    let offset = (gpa & 0xff0) as u32;
    let old = store.exchange.then(|| env.lapic_read(offset));
    let appliance = !env.hv().space_of(env.cpu_index()).is_os();
    let outcome = if offset == reg::ICR_LOW && icr_virtualized(env.hv()) {
        let high = env.lapic_read(reg::ICR_HIGH);
        ipi::icr_write(env, (u64::from(high) << 32) | u64::from(value), false)
    } else if matches!(offset, reg::LDR | reg::DFR)
        && (env.hv().has_appliances() || env.hv().os_unit_count.load(Ordering::Relaxed) > 0)
    {
        // Kept for resolving logical destinations (`ipi`, and the OS's
        // remapping entries where it has a unit of its own); an
        // appliance's never reach the hardware, the OS's do as well.
        let slot = &env.hv().cpus()[env.cpu_index()];
        if offset == reg::LDR {
            slot.vldr.store(value & 0xff00_0000, Ordering::SeqCst);
        } else {
            slot.vdfr.store(value | 0x0fff_ffff, Ordering::SeqCst);
        }
        if !appliance {
            env.lapic_write(offset, value);
        }
        Outcome::Resume
    } else if matches!(offset, reg::LVT_LINT0 | reg::LVT_LINT1) {
        env.lapic_write(offset, crate::apic::lint_value(value, appliance));
        Outcome::Resume
    } else {
        env.lapic_write(offset, value);
        Outcome::Resume
    };
    if let (Some(old), StoreSource::Register(r)) = (old, store.source) {
        cpu.set_gpr(r, u64::from(old));
    }
    cpu.set_rip(next);
    outcome
}

/// Whether ICR writes are thinhv's to filter: always on SVM, and on VMX
/// unless INIT and SIPI reach the processor (`init_sipi = "activity"`,
/// where INIT always exits and the real page is the guest's to write, so
/// an ICR write that comes here, through a relocated page, goes to the
/// APIC as the guest's own would).
fn icr_virtualized(hv: &crate::hv::Hv) -> bool {
    hv.vendor != thinhv_abi::hypercall::VENDOR_INTEL_VMX
        || hv.config.init_sipi != thinhv_abi::handoff::INIT_SIPI_ACTIVITY
}
