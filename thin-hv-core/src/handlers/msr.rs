//! Intercepted MSR accesses, dispatched on the table in
//! [`super::msr_policy`]: EFER (SVME hidden, reserved bits #GP), the SVM
//! and VMX control MSRs (absent for the guest), the x2APIC ICR (INIT/SIPI),
//! IA32_APIC_BASE (relocation emulated), PAT, the MTRRs (emulated per
//! CPU) and the AMD MSRs that decode memory for the host too (HWCR,
//! SYSCFG, TOP_MEM, IORRs, ...).
use super::msr_policy::{
    self as policy, CheckedWrite, MtrrCap, MtrrReg, Rule, efer, lookup, mtrr_reg,
};
use super::{Outcome, advance_or_fault, apic_reloc, ipi};
use crate::env::Env;
use crate::guest::{Gpr, GuestCpu, vector};
use crate::hv::MtrrShadow;
use core::sync::atomic::Ordering;

pub use policy::{MSR_EFER, MSR_FEATURE_CONTROL, MSR_VM_CR, MSR_VM_HSAVE_PA};

const FC_LOCK: u64 = 1 << 0;
const FC_VMX: u64 = (1 << 1) | (1 << 2);
const CR0_PG: u64 = 1 << 31;
/// IA32_MTRRCAP.
const MSR_MTRRCAP: u32 = 0xfe;
/// CPUID.1:ECX.x2APIC.
const LEAF1_ECX_X2APIC: u32 = 1 << 21;

fn gp(cpu: &mut impl GuestCpu) -> Outcome {
    cpu.inject_exception(vector::GP, Some(0));
    Outcome::Resume
}

/// Logs a refused write (the log ring is bounded and overwrites its
/// oldest lines, so a guest looping on refused writes costs log lines,
/// never memory).
fn refused(env: &impl Env, msr: u32, value: u64, why: &str) {
    let name = policy::entry(msr).map_or("MSR", |r| r.name);
    log::warn!(
        "cpu {}: WRMSR {name} ({msr:#x}) = {value:#x} refused: {why}",
        env.cpu_index()
    );
}

pub(super) fn read(cpu: &mut impl GuestCpu, env: &impl Env, msr: u32) -> Outcome {
    let value = match lookup(env.hv().vendor, msr).0 {
        Rule::Efer => cpu.guest_efer() & !efer::SVME,
        // The guest sees VMX locked off, as firmware that disabled VT-x
        // would leave it.
        Rule::FeatureControl => (env.read_msr(MSR_FEATURE_CONTROL) & !FC_VMX) | FC_LOCK,
        Rule::Mtrr => match mtrr_read(env, msr) {
            Some(v) => v,
            None => return gp(cpu),
        },
        Rule::ApicBase => apic_reloc::msr_value(env),
        // Refused, or intercepted by accident: a processor without the
        // MSR raises #GP.
        _ => return gp(cpu),
    };
    cpu.set_gpr(Gpr::Rax, value & 0xffff_ffff);
    cpu.set_gpr(Gpr::Rdx, value >> 32);
    advance_or_fault(cpu, env)
}

pub(super) fn write(cpu: &mut impl GuestCpu, env: &mut impl Env, msr: u32, value: u64) -> Outcome {
    match lookup(env.hv().vendor, msr).1 {
        Rule::Efer => efer_write(cpu, env, value),
        Rule::X2apicIcr => {
            let outcome = ipi::icr_write(env, value, true);
            let adv = advance_or_fault(cpu, env);
            if outcome == Outcome::Resume {
                adv
            } else {
                outcome
            }
        }
        Rule::ApicBase => apic_base_write(cpu, env, value),
        Rule::X2apicLint => {
            let appliance = !env.hv().space_of(env.cpu_index()).is_os();
            let x2apic = env.read_msr(policy::MSR_APIC_BASE) & crate::apic::APIC_BASE_EXTD != 0;
            match CheckedWrite::x2apic_lint(msr, value, appliance) {
                Some(w) if x2apic => {
                    env.write_msr(w);
                    advance_or_fault(cpu, env)
                }
                _ => gp(cpu),
            }
        }
        Rule::Pat => {
            if !policy::pat_ok(value) {
                return gp(cpu);
            }
            cpu.set_guest_pat(value);
            advance_or_fault(cpu, env)
        }
        Rule::Mtrr => {
            if mtrr_write(env, msr, value) {
                advance_or_fault(cpu, env)
            } else {
                gp(cpu)
            }
        }
        Rule::Hwcr => {
            let current = env.read_msr(msr);
            let Some(w) = CheckedWrite::hwcr(current, value) else {
                refused(
                    env,
                    msr,
                    value,
                    "only McStatusWrEn, CpbDis and IRPerfEn may change",
                );
                return gp(cpu);
            };
            if value != current {
                env.write_msr(w);
            }
            advance_or_fault(cpu, env)
        }
        Rule::Syscfg => {
            let current = env.read_msr(msr);
            let Some(w) = CheckedWrite::syscfg(current, value) else {
                refused(env, msr, value, "it decodes memory for the hypervisor too");
                return gp(cpu);
            };
            if value != current {
                env.write_msr(w);
            }
            advance_or_fault(cpu, env)
        }
        Rule::RefuseChange => {
            if env.read_msr(msr) == value {
                advance_or_fault(cpu, env)
            } else {
                refused(env, msr, value, "it decodes memory for the hypervisor too");
                gp(cpu)
            }
        }
        Rule::Native | Rule::Refuse | Rule::FeatureControl => gp(cpu),
    }
}

fn efer_write(cpu: &mut impl GuestCpu, env: &impl Env, value: u64) -> Outcome {
    let cur = cpu.guest_efer();
    let allowed = policy::efer_allowed(env.cpuid(0x8000_0001, 0)[3]);
    if value & !allowed != 0 {
        // SVME, LMSLE, TCE, reserved bits: #GP, never a VMRUN that fails
        // its consistency checks.
        return gp(cpu);
    }
    if (value ^ cur) & efer::LME != 0 && cpu.paging().cr0 & CR0_PG != 0 {
        // Changing LME with paging on is a #GP on hardware.
        return gp(cpu);
    }
    // LMA is read-only: keep the current value.
    cpu.set_guest_efer((value & !efer::LMA) | (cur & efer::LMA));
    advance_or_fault(cpu, env)
}

/// IA32_APIC_BASE: the mode bits reach the processor (checked), the base
/// stays the guest's own (SDM Vol. 3A §12.4.5; APM Vol. 2 §16.3.1).
fn apic_base_write(cpu: &mut impl GuestCpu, env: &mut impl Env, value: u64) -> Outcome {
    let hw = env.read_msr(policy::MSR_APIC_BASE);
    let x2apic = env.cpuid(1, 0)[2] & LEAF1_ECX_X2APIC != 0;
    let guest_base = apic_reloc::guest_base(env);
    let bits = env.hv().phys_addr_bits;
    let Some(update) = CheckedWrite::apic_base(hw, guest_base, value, bits, x2apic) else {
        return gp(cpu);
    };
    let moved = update.base != guest_base;
    if moved && let Err(why) = apic_reloc::move_to(env, update.base) {
        refused(env, policy::MSR_APIC_BASE, value, why);
        return gp(cpu);
    }
    if let Some(w) = update.hardware {
        // A mode change at the hardware's own base: x2APIC mode keeps the
        // ICR MSR intercepted, and the host's own APIC accesses follow the
        // mode (`HwEnv::lapic_write`).
        env.write_msr(w);
    }
    let outcome = advance_or_fault(cpu, env);
    if moved {
        // This CPU must not keep a cached translation of the page it moved
        // to or from (`apic_reloc`: other CPUs need no shootdown).
        Outcome::ResumeFlushTlb
    } else {
        outcome
    }
}

/// Loads this CPU's MTRR emulation from the hardware on first use.
fn mtrr_shadow(env: &impl Env) -> &MtrrShadow {
    let s = &env.hv().cpus()[env.cpu_index()].mtrr;
    if !s.loaded.load(Ordering::Relaxed) {
        let cap_raw = env.read_msr(MSR_MTRRCAP);
        let cap = MtrrCap::from_msr(cap_raw);
        s.cap.store(cap_raw, Ordering::Relaxed);
        s.def_type
            .store(env.read_msr(policy::MSR_MTRR_DEF_TYPE), Ordering::Relaxed);
        if cap.fixed {
            for (i, m) in policy::MTRR_FIXED.iter().enumerate() {
                s.fixed[i].store(env.read_msr(*m), Ordering::Relaxed);
            }
        }
        for i in 0..2 * cap.vcnt {
            let m = policy::MSR_MTRR_VAR_FIRST + u32::try_from(i).unwrap_or(0);
            s.var[i].store(env.read_msr(m), Ordering::Relaxed);
        }
        s.loaded.store(true, Ordering::Relaxed);
    }
    s
}

fn mtrr_slot(s: &MtrrShadow, reg: MtrrReg) -> &core::sync::atomic::AtomicU64 {
    match reg {
        MtrrReg::DefType => &s.def_type,
        MtrrReg::Fixed(i) => &s.fixed[i],
        MtrrReg::Base(i) => &s.var[2 * i],
        MtrrReg::Mask(i) => &s.var[2 * i + 1],
    }
}

/// The guest's view of an MTRR; None (#GP) for one the processor lacks.
fn mtrr_read(env: &impl Env, msr: u32) -> Option<u64> {
    let reg = mtrr_reg(msr)?;
    let s = mtrr_shadow(env);
    let cap = MtrrCap::from_msr(s.cap.load(Ordering::Relaxed));
    policy::mtrr_exists(reg, cap).then(|| mtrr_slot(s, reg).load(Ordering::Relaxed))
}

/// Records a guest MTRR write; false (#GP) for a value the processor would
/// refuse. The hardware MTRRs, and with them the memory types the host and
/// the second-level tables use, stay the firmware's.
fn mtrr_write(env: &impl Env, msr: u32, value: u64) -> bool {
    let Some(reg) = mtrr_reg(msr) else {
        return false;
    };
    let s = mtrr_shadow(env);
    let cap = MtrrCap::from_msr(s.cap.load(Ordering::Relaxed));
    if !policy::mtrr_write_ok(reg, value, cap, env.hv().phys_addr_bits) {
        return false;
    }
    mtrr_slot(s, reg).store(value, Ordering::Relaxed);
    true
}
