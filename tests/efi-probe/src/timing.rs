//! Exit round trips measured from inside the guest, in TSC cycles: CPUID
//! (an instruction intercept) and a write to the local APIC's TPR (a
//! nested page fault on the write-protected APIC page, decoded and done by
//! thinhv). Run bare, the same loop measures the emulator's own cost, so
//! `cargo xtask bench` can show what thinhv adds. Prints
//! `bench_<what>_cycles_min` and `_median`.
use crate::probe::kv;
use core::arch::asm;

/// Samples per measurement: enough for a stable median, few enough that
/// the probe's other checks do not wait (each exit costs ~20 µs in TCG).
const SAMPLES: usize = 301;
/// The xAPIC page and its task-priority register (SDM Vol. 3A Table 12-1).
const APIC_TPR: u64 = 0xfee0_0080;

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: LFENCE; RDTSC reads the time-stamp counter, no side effects.
    unsafe {
        asm!("lfence", "rdtsc", "lfence", out("eax") lo, out("edx") hi, options(nomem, nostack));
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Under thinhv: (handler cycles, exits) so far on CPU 0 (the probe's).
fn exit_cost() -> Option<(u64, u64)> {
    let s = crate::probe::cpuid(thinhv_abi::cpuid::LEAF_SIGNATURE, 0);
    if thinhv_abi::cpuid::signature_from_regs(s[1], s[2], s[3]) != thinhv_abi::cpuid::SIGNATURE {
        return None;
    }
    let r = crate::probe::hc(thinhv_abi::hypercall::Function::EXIT_COST, 0, 0, 0);
    (r[0] == thinhv_abi::hypercall::Status::OK.0).then_some((r[1], r[2]))
}

fn measure(name: &str, mut f: impl FnMut()) {
    let before = exit_cost();
    let mut v = [0u64; SAMPLES];
    for s in &mut v {
        let t0 = rdtsc();
        f();
        *s = rdtsc().wrapping_sub(t0);
    }
    // The handler's share of each exit (thinhv's own TSC reads around its
    // exit handler): the rest of the round trip is the world switch.
    if let (Some((c0, e0)), Some((c1, e1))) = (before, exit_cost())
        && e1 > e0
    {
        kv(
            &alloc::format!("bench_{name}_handler_cycles"),
            (c1 - c0) / (e1 - e0),
        );
    }
    v.sort_unstable();
    kv(&alloc::format!("bench_{name}_cycles_min"), v[0]);
    kv(
        &alloc::format!("bench_{name}_cycles_median"),
        v[SAMPLES / 2],
    );
}

/// The round trips (bare: the emulator's cost; under thinhv: plus the
/// exit, the handler and the re-entry).
pub fn exit_round_trips() {
    measure("cpuid", || {
        let _ = core::hint::black_box(crate::probe::cpuid(0, 0));
    });
    // The APIC page is identity-mapped by the firmware (uncached); the TPR
    // is written back with its own value, which changes nothing.
    // SAFETY: reading the TPR of this processor's enabled xAPIC.
    let tpr = unsafe { core::ptr::read_volatile(APIC_TPR as *const u32) };
    measure("apic_write", || {
        // SAFETY: writing the TPR its current value has no effect.
        unsafe { core::ptr::write_volatile(APIC_TPR as *mut u32, tpr) };
    });
}
