//! The cost of exit handling, measured on the CPU that handles the exit:
//! TSC at the handler's entry and when it returns towards VMRUN/VMRESUME,
//! summed per CPU (`CpuSlot::add_exit_cost`, read by the EXIT_COST
//! hypercall). What the guest measures around the same exit minus this is
//! the world switch itself.
use crate::hv::CpuSlot;

/// Reads the time-stamp counter (RDTSC has no side effects; not
/// serializing, which is fine for a sum over many exits).
fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter into EDX:EAX.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Started at the handler's entry; records the elapsed cycles when dropped
/// (every return path; paths that never return record nothing).
pub struct ExitTimer<'a> {
    slot: &'a CpuSlot,
    start: u64,
}

impl<'a> ExitTimer<'a> {
    /// Starts timing this CPU's exit.
    pub fn start(slot: &'a CpuSlot) -> Self {
        Self {
            slot,
            start: rdtsc(),
        }
    }
}

impl Drop for ExitTimer<'_> {
    fn drop(&mut self) {
        self.slot.add_exit_cost(rdtsc().wrapping_sub(self.start));
    }
}
