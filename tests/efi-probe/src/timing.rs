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

fn measure(name: &str, mut f: impl FnMut()) {
    let mut v = [0u64; SAMPLES];
    for s in &mut v {
        let t0 = rdtsc();
        f();
        *s = rdtsc().wrapping_sub(t0);
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
