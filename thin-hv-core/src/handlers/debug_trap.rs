//! What the processor does when an instruction completes, for the
//! instructions thinhv emulates or skips (CPUID, MSR accesses, port I/O,
//! APIC and ECAM accesses, hypercalls, XSETBV, INVD, CR accesses): the
//! exit replaced the instruction, so the single-step trap it would have
//! raised (RFLAGS.TF, SDM Vol. 3B §18.3.1.4; APM Vol. 2 §13.1.3.3) and the
//! I/O breakpoints it would have hit (DR7 R/W = 10b with CR4.DE, §18.2.4)
//! are raised here, after it, through [`GuestCpu::complete_instruction`].
//!
//! Data breakpoints (R/W = 01b writes, 11b reads or writes) on the memory
//! accesses thinhv emulates (APIC writes, the relocated APIC page, ECAM
//! pages of mediated functions) are matched the same way, on the access's
//! linear address, which the handler decodes before it runs.
use super::{Outcome, decode_current};
use crate::env::Env;
use crate::exit::Exit;
use crate::guest::{GuestCpu, dr6};
use crate::insn::MemAccess;

const RFLAGS_TF: u64 = 1 << 8;
/// IA32_DEBUGCTL.BTF: TF single-steps branches only (SDM Vol. 3B §18.4.3).
const DEBUGCTL_BTF: u64 = 1 << 1;
/// CR4.DE: DR7 R/W = 10b means I/O breakpoints.
const CR4_DE: u64 = 1 << 3;
/// DR7 R/W encoding of an I/O read-or-write breakpoint.
const RW_IO: u64 = 0b10;

/// What the trap depends on, taken before the handler runs.
#[derive(Clone, Copy, Debug)]
pub(super) struct Before {
    rip: u64,
    rflags: u64,
    /// The emulated memory access, when a data breakpoint is enabled.
    access: Option<MemAccess>,
}

pub(super) fn before(exit: &Exit, cpu: &impl GuestCpu, env: &impl Env) -> Before {
    // Decoding costs: only for a second-level fault (the emulated accesses
    // are behind one) while the guest has a data breakpoint enabled.
    let access = if matches!(exit, Exit::NestedFault { .. }) && data_breakpoints_armed(cpu.dr7()) {
        decode_current(cpu, env).and_then(|d| d.mem_access(|r| cpu.gpr(r), |s| cpu.segment_base(s)))
    } else {
        None
    };
    Before {
        rip: cpu.rip(),
        rflags: cpu.rflags(),
        access,
    }
}

/// Whether DR7 enables any breakpoint with R/W = 01b or 11b.
fn data_breakpoints_armed(dr7: u64) -> bool {
    (0..4).any(|n| {
        let (enabled, rw, _) = slot(dr7, n);
        enabled && rw & 1 != 0
    })
}

/// After the handler: if it completed the instruction (the guest resumes
/// with RIP moved past it), finish it as the processor would.
pub(super) fn after(exit: &Exit, cpu: &mut impl GuestCpu, before: Before, outcome: Outcome) {
    if !matches!(outcome, Outcome::Resume | Outcome::ResumeFlushTlb)
        || cpu.rip() == before.rip
        || matches!(exit, Exit::TaskSwitch { .. })
    {
        // Nothing completed: the instruction faulted (an exception was
        // queued instead), will run again, or the CPU leaves this context.
        // A task switch loads its own EFLAGS and interrupt state.
        return;
    }
    let mut bits = 0;
    // TF at the start of the instruction, and not restricted to branches
    // (none of the emulated instructions branches).
    if before.rflags & RFLAGS_TF != 0 && cpu.debugctl() & DEBUGCTL_BTF == 0 {
        bits |= dr6::BS;
    }
    let addrs = || [0u8, 1, 2, 3].map(|n| cpu.breakpoint_address(n));
    if let Exit::PortIo {
        port,
        size,
        string: false,
        ..
    } = *exit
        && cpu.paging().cr4 & CR4_DE != 0
    {
        bits |= io_breakpoints(cpu.dr7(), addrs(), port, size);
    }
    if let Some(a) = before.access {
        bits |= data_breakpoints(cpu.dr7(), addrs(), a);
    }
    cpu.complete_instruction(bits);
}

/// Breakpoint `n` of DR7 (SDM Vol. 3B §18.2.4): enabled (Ln or Gn), its
/// R/Wn field, and the bytes LENn covers (00/01/11/10 = 1/2/4/8).
fn slot(dr7: u64, n: usize) -> (bool, u64, u64) {
    let len = match (dr7 >> (18 + 4 * n)) & 3 {
        0 => 1,
        1 => 2,
        2 => 8,
        _ => 4,
    };
    ((dr7 >> (2 * n)) & 3 != 0, (dr7 >> (16 + 4 * n)) & 3, len)
}

/// DR6 B0–B3 of the enabled breakpoints whose R/W field `kind` accepts and
/// whose range (the address aligned down to the length, §18.2.5) holds a
/// byte of `[start, start + size)`.
fn hits(dr7: u64, addrs: [u64; 4], start: u64, size: u8, kind: impl Fn(u64) -> bool) -> u64 {
    let end = start.wrapping_add(u64::from(size));
    let mut hit = 0;
    for (n, addr) in addrs.iter().enumerate() {
        let (enabled, rw, len) = slot(dr7, n);
        let lo = addr & !(len - 1);
        if enabled && kind(rw) && lo < end && start < lo.wrapping_add(len) {
            hit |= 1 << n;
        }
    }
    hit & dr6::B0_3
}

/// The DR6 B0–B3 bits of the enabled I/O breakpoints (R/Wn = 10b; the
/// port is the address's low 16 bits) that an access of `size` bytes at
/// `port` hits. Only meaningful with CR4.DE set.
pub fn io_breakpoints(dr7: u64, addrs: [u64; 4], port: u16, size: u8) -> u64 {
    hits(
        dr7,
        addrs.map(|a| a & 0xffff),
        u64::from(port),
        size,
        |rw| rw == RW_IO,
    )
}

/// The DR6 B0–B3 bits of the enabled data breakpoints that access `a`
/// hits: R/Wn = 01b for writes, 11b for reads or writes.
pub fn data_breakpoints(dr7: u64, addrs: [u64; 4], a: MemAccess) -> u64 {
    hits(dr7, addrs, a.linear, a.size, |rw| {
        rw == 0b11 || (rw == 0b01 && a.write)
    })
}

#[cfg(test)]
mod tests {
    use super::{data_breakpoints, io_breakpoints};
    use crate::insn::MemAccess;

    #[test]
    fn data_breakpoints_follow_dr7() {
        let w = |linear, size| MemAccess {
            linear,
            size,
            write: true,
        };
        let r = |linear, size| MemAccess {
            linear,
            size,
            write: false,
        };
        // DR0 = the TPR, L0, R/W0 = 01b (writes), LEN0 = 11b (4 bytes).
        let dr7 = 1 | (0b01 << 16) | (0b11 << 18);
        let a = [0xfee0_0080, 0, 0, 0];
        assert_eq!(data_breakpoints(dr7, a, w(0xfee0_0080, 4)), 1);
        assert_eq!(data_breakpoints(dr7, a, w(0xfee0_0082, 1)), 1, "inside");
        assert_eq!(data_breakpoints(dr7, a, w(0xfee0_007e, 4)), 1, "overlap");
        assert_eq!(data_breakpoints(dr7, a, w(0xfee0_0084, 4)), 0, "next");
        assert_eq!(data_breakpoints(dr7, a, r(0xfee0_0080, 4)), 0, "a read");
        // R/W = 11b: reads too; disabled: nothing; R/W = 10b (I/O): nothing.
        let rw = 1 | (0b11 << 16) | (0b11 << 18);
        assert_eq!(data_breakpoints(rw, a, r(0xfee0_0080, 4)), 1);
        assert_eq!(data_breakpoints(dr7 & !3, a, w(0xfee0_0080, 4)), 0);
        let io = 1 | (0b10 << 16) | (0b11 << 18);
        assert_eq!(data_breakpoints(io, a, w(0xfee0_0080, 4)), 0);
        // G3, 8 bytes at an unaligned DR3: aligned down.
        let dr7 = (1 << 7) | (0b01 << 28) | (0b10 << 30);
        let a = [0, 0, 0, 0xe000_0004];
        assert_eq!(data_breakpoints(dr7, a, w(0xe000_0000, 1)), 0b1000);
        assert_eq!(data_breakpoints(dr7, a, w(0xe000_0008, 1)), 0);
    }

    #[test]
    fn io_breakpoints_follow_dr7() {
        // DR1 = 0xcfc, L1, R/W1 = 10b (I/O), LEN1 = 11b (4 bytes).
        let dr7 = (1 << 2) | (0b10 << 20) | (0b11 << 22);
        let a = [0, 0xcfc, 0, 0];
        assert_eq!(io_breakpoints(dr7, a, 0xcfc, 4), 0b10);
        assert_eq!(io_breakpoints(dr7, a, 0xcfe, 1), 0b10, "inside the range");
        assert_eq!(io_breakpoints(dr7, a, 0xcf8, 4), 0, "next to it");
        assert_eq!(io_breakpoints(dr7, a, 0xcfb, 2), 0b10, "overlapping");
        // Disabled, or a data (write) breakpoint: no hit.
        assert_eq!(io_breakpoints(dr7 & !(1 << 2), a, 0xcfc, 4), 0);
        let data = (1 << 2) | (0b01 << 20) | (0b11 << 22);
        assert_eq!(io_breakpoints(data, a, 0xcfc, 4), 0);
        // G0 with a 1-byte breakpoint at 0x80.
        let dr7 = 1 << 1 | (0b10 << 16);
        assert_eq!(io_breakpoints(dr7, [0x80, 0, 0, 0], 0x80, 1), 1);
        assert_eq!(io_breakpoints(dr7, [0x80, 0, 0, 0], 0x81, 1), 0);
    }
}
