//! Intercepted MSRs: EFER (SVME hidden and kept), the SVM control MSRs
//! (absent for the guest), and the x2APIC ICR (INIT/SIPI).
use super::{Outcome, advance_or_fault, ipi};
use crate::env::Env;
use crate::guest::{Gpr, GuestCpu, vector};

/// IA32_EFER.
pub const MSR_EFER: u32 = 0xc000_0080;
/// VM_CR (AMD).
pub const MSR_VM_CR: u32 = 0xc001_0114;
/// VM_HSAVE_PA (AMD).
pub const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
/// IA32_FEATURE_CONTROL (Intel).
pub const MSR_FEATURE_CONTROL: u32 = 0x3a;

const FC_LOCK: u64 = 1 << 0;
const FC_VMX: u64 = (1 << 1) | (1 << 2);
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_SVME: u64 = 1 << 12;
const CR0_PG: u64 = 1 << 31;

fn gp(cpu: &mut impl GuestCpu) -> Outcome {
    cpu.inject_exception(vector::GP, Some(0));
    Outcome::Resume
}

pub(super) fn read(cpu: &mut impl GuestCpu, env: &impl Env, msr: u32) -> Outcome {
    let value = match msr {
        MSR_EFER => cpu.guest_efer() & !EFER_SVME,
        // The guest sees VMX locked off, as firmware that disabled VT-x
        // would leave it.
        MSR_FEATURE_CONTROL => (env.read_msr(MSR_FEATURE_CONTROL) & !FC_VMX) | FC_LOCK,
        _ => {
            // VM_CR, VM_HSAVE_PA and anything else intercepted by accident:
            // a processor without SVM raises #GP for them.
            return gp(cpu);
        }
    };
    cpu.set_gpr(Gpr::Rax, value & 0xffff_ffff);
    cpu.set_gpr(Gpr::Rdx, value >> 32);
    advance_or_fault(cpu, env)
}

pub(super) fn write(cpu: &mut impl GuestCpu, env: &mut impl Env, msr: u32, value: u64) -> Outcome {
    match msr {
        MSR_EFER => {
            let cur = cpu.guest_efer();
            if value & EFER_SVME != 0 {
                return gp(cpu);
            }
            if (value ^ cur) & EFER_LME != 0 && cpu.paging().cr0 & CR0_PG != 0 {
                // Changing LME with paging on is a #GP on hardware.
                return gp(cpu);
            }
            // LMA is read-only: keep the current value.
            cpu.set_guest_efer((value & !EFER_LMA) | (cur & EFER_LMA));
            advance_or_fault(cpu, env)
        }
        crate::apic::X2APIC_ICR_MSR => {
            let outcome = ipi::icr_write(env, value, true);
            let adv = advance_or_fault(cpu, env);
            if outcome == Outcome::Resume {
                adv
            } else {
                outcome
            }
        }
        _ => gp(cpu),
    }
}
