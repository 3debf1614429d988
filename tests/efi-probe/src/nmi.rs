//! Transparency: an NMI that arrives while the processor blocks NMIs (from
//! the delivery of an NMI until the next IRET, SDM Vol. 3A §6.7.1; APM
//! Vol. 2 §8.2.3) stays pending and is delivered once, right after that
//! IRET: none lost, none doubled, never nested (issue 11). Runs bare too,
//! where the processor (the emulator) is the control.
//!
//! The probe points vector 2 at [`nmi_stub`] and sends itself an NMI
//! through its local APIC. On its first entry the handler sends itself a
//! second NMI, spins, and returns with IRET; every entry counts, and one
//! that begins while another is still running marks nesting. The wait after
//! the first NMI runs with interrupts disabled and makes no VM exit, so the
//! second NMI must come from the IRET itself, not from a later exit or an
//! interrupt window. Prints `nmi_deliveries=<n>` and `nmi_nested=<0|1>`.
//!
//! The IPI names this CPU's own APIC ID (physical destination) rather than
//! the "self" shorthand: the SDM's table of valid ICR combinations (Vol. 3A
//! §11.6.1) allows the shorthand with the fixed delivery mode only, and not
//! every emulator accepts it for an NMI.
use crate::probe::kv;
use core::arch::{asm, naked_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// xAPIC registers (Table 11-1): ID, ICR low and high.
const XAPIC_ID: u64 = 0x20;
const XAPIC_ICR_LOW: u64 = 0x300;
const XAPIC_ICR_HIGH: u64 = 0x310;
/// x2APIC MSRs (§11.12.1): ID, ICR.
const X2APIC_ICR: u32 = 0x830;
/// ICR low (§11.6.1): delivery mode NMI (100b), level assert, physical
/// destination, no shorthand. The vector is ignored for NMIs.
const ICR_NMI: u32 = (0b100 << 8) | (1 << 14);

/// Entries into the handler, entries begun while another was running, and
/// how many are running now.
static ENTRIES: AtomicU64 = AtomicU64::new(0);
static NESTED: AtomicU64 = AtomicU64::new(0);
static DEPTH: AtomicU64 = AtomicU64::new(0);
/// How the handler sends: 0 xAPIC (ICR low at `ICR_ADDR`, ICR high already
/// names this CPU), 1 x2APIC (`X2_DEST` in EDX).
static X2: AtomicU64 = AtomicU64::new(0);
static ICR_ADDR: AtomicU64 = AtomicU64::new(0);
static X2_DEST: AtomicU64 = AtomicU64::new(0);

/// Iterations the handler spins after sending, and the wait for the second
/// delivery (bounded; it normally ends at once).
const HANDLER_SPIN: u32 = 100_000;
const WAIT_SPIN: u64 = 20_000_000;

#[unsafe(naked)]
extern "C" fn nmi_stub() {
    // Frame: RIP, CS, RFLAGS, RSP, SS (no error code). Saves what it uses;
    // IRETQ restores RFLAGS.
    naked_asm!(
        "push rax",
        "push rcx",
        "push rdx",
        "cmp qword ptr [rip + {depth}], 0",
        "je 2f",
        "mov qword ptr [rip + {nested}], 1",
        "2:",
        "add qword ptr [rip + {depth}], 1",
        "add qword ptr [rip + {entries}], 1",
        "cmp qword ptr [rip + {entries}], 1",
        "jne 5f",
        // First entry: the second NMI, to this CPU, while this one runs.
        "cmp qword ptr [rip + {x2}], 0",
        "jne 3f",
        "mov rax, [rip + {icr}]",
        "mov dword ptr [rax], {nmi}",
        "jmp 4f",
        "3:",
        "mov ecx, {x2icr}",
        "mov eax, {nmi}",
        "mov rdx, [rip + {x2dest}]",
        "wrmsr",
        "4:",
        "mov ecx, {spin}",
        "6:",
        "pause",
        "dec ecx",
        "jnz 6b",
        "5:",
        "sub qword ptr [rip + {depth}], 1",
        "pop rdx",
        "pop rcx",
        "pop rax",
        "iretq",
        depth = sym DEPTH,
        nested = sym NESTED,
        entries = sym ENTRIES,
        x2 = sym X2,
        icr = sym ICR_ADDR,
        x2dest = sym X2_DEST,
        x2icr = const X2APIC_ICR,
        nmi = const ICR_NMI,
        spin = const HANDLER_SPIN,
    );
}

/// Sends the first NMI the way the handler sends the second.
fn send_nmi() {
    if X2.load(Ordering::SeqCst) != 0 {
        let dest = u32::try_from(X2_DEST.load(Ordering::SeqCst)).unwrap_or(0);
        // SAFETY: the x2APIC ICR; an NMI to this CPU, whose vector 2 the
        // probe's handler owns for now.
        unsafe {
            asm!("wrmsr", in("ecx") X2APIC_ICR, in("eax") ICR_NMI, in("edx") dest,
                options(nostack));
        }
    } else {
        let icr = ICR_ADDR.load(Ordering::SeqCst) as *mut u32;
        // SAFETY: this CPU's xAPIC ICR low, identity-mapped by the firmware;
        // ICR high already names this CPU.
        unsafe { icr.write_volatile(ICR_NMI) };
    }
}

/// The check. Call before the probe decides whether thinhv is there, so
/// that it also runs bare.
pub fn blocked_nmi_stays_pending() {
    let page = crate::apic::page();
    if let Some(id) = crate::apic::x2apic_id() {
        X2.store(1, Ordering::SeqCst);
        X2_DEST.store(u64::from(id), Ordering::SeqCst);
    } else {
        X2.store(0, Ordering::SeqCst);
        ICR_ADDR.store(page + XAPIC_ICR_LOW, Ordering::SeqCst);
    }
    ENTRIES.store(0, Ordering::SeqCst);
    NESTED.store(0, Ordering::SeqCst);
    DEPTH.store(0, Ordering::SeqCst);
    let idt = crate::probe::Idt::current();
    let mut waited = 0u64;
    // SAFETY: entry 2 is ours (`nmi_stub`, a complete NMI handler) for the
    // check only, with interrupts disabled (no firmware handler runs
    // meanwhile; NMIs ignore IF). In xAPIC mode ICR high is set to this CPU's own ID first (the
    // firmware sends no IPI while interrupts are off) and the NMIs go to
    // this CPU only.
    unsafe {
        asm!("cli");
        if X2.load(Ordering::SeqCst) == 0 {
            let id = ((page + XAPIC_ID) as *const u32).read_volatile() >> 24;
            ((page + XAPIC_ICR_HIGH) as *mut u32).write_volatile(id << 24);
        }
        let old = idt.replace(2, nmi_stub as *const () as u64);
        send_nmi();
        while ENTRIES.load(Ordering::SeqCst) < 2 && waited < WAIT_SPIN {
            core::hint::spin_loop();
            waited += 1;
        }
        idt.restore(2, old);
        asm!("sti");
    }
    kv("nmi_deliveries", ENTRIES.load(Ordering::SeqCst));
    kv("nmi_nested", NESTED.load(Ordering::SeqCst));
}
