//! Control-register accesses that exit (VMX: CR0/CR4 bits thinhv owns,
//! and CR3/CR8 accesses where the processor forces their exiting
//! controls; SDM Vol. 3C §26.1.3, qualification in Table 28-3): MOV to and
//! from CR0, CR3, CR4 and CR8, CLTS and LMSW, emulated as the instruction
//! would run (Vol. 2A "MOV—Move to/from Control Registers", "CLTS",
//! "LMSW"). The backend keeps CR0/CR4, their read shadows and EFER
//! consistent in [`GuestCpu::write_cr`].
use super::{Outcome, advance_or_fault};
use crate::env::Env;
use crate::guest::{CpuMode, Gpr, GuestCpu, vector};
use crate::vmx::cr;

/// The local APIC task-priority register (CR8 is its bits 7:4).
const APIC_TPR: u32 = 0x80;

fn fault(cpu: &mut impl GuestCpu, v: u8) -> Outcome {
    cpu.inject_exception(v, (v == vector::GP).then_some(0));
    Outcome::Resume
}

/// Outside 64-bit mode the operand of these instructions is 32 bits.
fn operand(cpu: &impl GuestCpu, value: u64) -> u64 {
    if cpu.mode() == CpuMode::Bits64 {
        value
    } else {
        value & 0xffff_ffff
    }
}

fn reg(gpr: u8) -> Gpr {
    Gpr::ALL[usize::from(gpr & 0xf)]
}

/// MOV to CR`cr` from `gpr`.
pub(super) fn mov_to(cpu: &mut impl GuestCpu, env: &mut impl Env, cr: u8, gpr: u8) -> Outcome {
    if cpu.cpl() != 0 {
        return fault(cpu, vector::GP);
    }
    let value = operand(cpu, cpu.gpr(reg(gpr)));
    let ok = if cr == 8 {
        cr::write_cr8(value).map(|tpr| env.lapic_write(APIC_TPR, tpr))
    } else {
        cpu.write_cr(cr, value)
    };
    match ok {
        Ok(()) => advance_or_fault(cpu, env),
        Err(_) => fault(cpu, vector::GP),
    }
}

/// MOV to `gpr` from CR`cr`.
pub(super) fn mov_from(cpu: &mut impl GuestCpu, env: &mut impl Env, cr: u8, gpr: u8) -> Outcome {
    if cpu.cpl() != 0 {
        return fault(cpu, vector::GP);
    }
    let value = if cr == 8 {
        Some(u64::from((env.lapic_read(APIC_TPR) >> 4) & 0xf))
    } else {
        cpu.read_cr(cr)
    };
    let Some(value) = value else {
        // No other control register can exit; a processor without it
        // raises #UD.
        return fault(cpu, vector::UD);
    };
    cpu.set_gpr(reg(gpr), operand(cpu, value));
    advance_or_fault(cpu, env)
}

/// CLTS or LMSW: a new CR0 computed from the guest's.
pub(super) fn cr0_op(
    cpu: &mut impl GuestCpu,
    env: &mut impl Env,
    op: impl FnOnce(u64) -> u64,
) -> Outcome {
    if cpu.cpl() != 0 {
        return fault(cpu, vector::GP);
    }
    let Some(cr0) = cpu.read_cr(0) else {
        return fault(cpu, vector::UD);
    };
    match cpu.write_cr(0, op(cr0)) {
        Ok(()) => advance_or_fault(cpu, env),
        Err(_) => fault(cpu, vector::GP),
    }
}
