//! XSETBV (always exits on VMX): checked like the processor checks it
//! (SDM Vol. 2D "XSETBV"; Vol. 1 §13.3), then done on the real XCR0.
use super::{Outcome, advance_or_fault};
use crate::env::Env;
use crate::guest::{Gpr, GuestCpu, vector};

const X87: u64 = 1 << 0;
const SSE: u64 = 1 << 1;
const AVX: u64 = 1 << 2;
const MPX: u64 = (1 << 3) | (1 << 4);
const AVX512: u64 = (1 << 5) | (1 << 6) | (1 << 7);
const AMX: u64 = (1 << 17) | (1 << 18);

/// Whether `xcr0` is a value XSETBV accepts, given the bits the processor
/// supports (CPUID 0xD.0 EDX:EAX).
pub fn valid_xcr0(xcr0: u64, supported: u64) -> bool {
    xcr0 & X87 != 0
        && xcr0 & !supported == 0
        && (xcr0 & AVX == 0 || xcr0 & SSE != 0)
        && (xcr0 & MPX == 0 || xcr0 & MPX == MPX)
        && (xcr0 & AVX512 == 0 || (xcr0 & AVX512 == AVX512 && xcr0 & AVX != 0))
        && (xcr0 & AMX == 0 || xcr0 & AMX == AMX)
}

pub(super) fn handle(cpu: &mut impl GuestCpu, env: &mut impl Env) -> Outcome {
    let index = cpu.gpr(Gpr::Rcx) & 0xffff_ffff;
    let value = (cpu.gpr(Gpr::Rdx) << 32) | (cpu.gpr(Gpr::Rax) & 0xffff_ffff);
    let d = env.cpuid(0xd, 0);
    // The processor compatibility profile narrows what may be set.
    let supported = (u64::from(d[0]) | (u64::from(d[3]) << 32)) & env.hv().cpuid.xcr0_allowed;
    if cpu.cpl() != 0 || index != 0 || !valid_xcr0(value, supported) {
        cpu.inject_exception(vector::GP, Some(0));
        return Outcome::Resume;
    }
    env.xsetbv(value);
    advance_or_fault(cpu, env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xcr0_rules() {
        let all = 0x2ff;
        assert!(valid_xcr0(0x3, all));
        assert!(valid_xcr0(0x7, all));
        assert!(valid_xcr0(0xe7, all));
        assert!(!valid_xcr0(0x2, all), "x87 must stay on");
        assert!(!valid_xcr0(0x5, all), "AVX without SSE");
        assert!(!valid_xcr0(0x27, all), "part of AVX-512");
        assert!(!valid_xcr0(0xe3, all), "AVX-512 without AVX");
        assert!(!valid_xcr0(0x0b, all), "half of MPX");
        assert!(!valid_xcr0(0x7, 0x3), "unsupported bit");
    }
}
