//! Transparency: single-stepping (RFLAGS.TF) over an instruction thinhv
//! emulates or skips must raise the #DB right after it, with DR6.BS set,
//! as the processor does (SDM Vol. 3B §18.3.1.4). Runs bare too, where the
//! processor (the emulator) is the control.
//!
//! For each instruction: `tf_after_<name>` is the #DB's RIP minus the
//! instruction's address (its length when the trap came right after it;
//! more when it came late; 0 when none came), `tf_bs_<name>` DR6.BS seen
//! by the handler. The probe runs at CPL 0 only: user-mode stepping is
//! covered by the unit tests (the emulation does not depend on the CPL).
//! A data breakpoint on the same emulated APIC write is checked too
//! (`db_after_apic_tpr`, `db_b0_apic_tpr`).
use core::arch::{asm, naked_asm};
use core::sync::atomic::{AtomicU64, Ordering};
use thinhv_abi::cpuid::{LEAF_SIGNATURE, SIGNATURE, signature_from_regs};
use thinhv_abi::hypercall::Function;
use uefi::println;

/// RIP and DR6 of the first #DB taken, and how many were taken.
static DB_RIP: AtomicU64 = AtomicU64::new(0);
static DB_DR6: AtomicU64 = AtomicU64::new(0);
static DB_COUNT: AtomicU64 = AtomicU64::new(0);

#[unsafe(naked)]
extern "C" fn db_stub() {
    // Frame: RIP, CS, RFLAGS, RSP, SS (no error code). Records the first
    // trap, clears TF in the saved RFLAGS (one trap per test) and resets
    // DR6 (the processor never clears its status bits).
    naked_asm!(
        "push rax",
        "cmp qword ptr [rip + {count}], 0",
        "jne 2f",
        "mov rax, [rsp + 8]",
        "mov [rip + {rip}], rax",
        "mov rax, dr6",
        "mov [rip + {dr6}], rax",
        "2:",
        "add qword ptr [rip + {count}], 1",
        "and qword ptr [rsp + 24], -257",
        "mov eax, 0xffff0ff0",
        "mov dr6, rax",
        "pop rax",
        "iretq",
        count = sym DB_COUNT, rip = sym DB_RIP, dr6 = sym DB_DR6,
    );
}

/// Runs `f` with the #DB vector pointing at [`db_stub`]; returns what it
/// recorded as (RIP delta from the address `f` returns, DR6), (0, 0) when
/// no #DB came.
fn with_db_handler(f: impl FnOnce() -> u64) -> (u64, u64) {
    let idt = crate::probe::Idt::current();
    DB_COUNT.store(0, Ordering::SeqCst);
    DB_RIP.store(0, Ordering::SeqCst);
    DB_DR6.store(0, Ordering::SeqCst);
    let start;
    // SAFETY: entry 1 is ours (`db_stub`, a complete #DB handler) around
    // `f` only, with interrupts disabled so nothing else takes a #DB
    // through the temporary gate.
    unsafe {
        asm!("cli");
        let old = idt.replace(1, db_stub as *const () as u64);
        start = f();
        idt.restore(1, old);
        asm!("sti");
    }
    if DB_COUNT.load(Ordering::SeqCst) == 0 {
        return (0, 0);
    }
    let delta = DB_RIP.load(Ordering::SeqCst).wrapping_sub(start);
    (delta, DB_DR6.load(Ordering::SeqCst))
}

/// Executes `$insn` with TF set and returns its address. POPF sets TF, so
/// the trap comes after the instruction that follows it (SDM Vol. 3B
/// §18.3.1.4): `$insn`. TF is cleared again right after (if the trap came
/// late, after that PUSHF, the delta shows it).
macro_rules! stepped {
    ($insn:literal $(, $($op:tt)*)?) => {{
        let start: u64;
        // SAFETY: each use names the instruction's inputs and clobbers; RBX
        // (which the compiler reserves) is saved and restored around it.
        unsafe {
            asm!(
                "mov {saved}, rbx",
                "lea {start}, [rip + 2f]",
                "pushfq",
                "or qword ptr [rsp], 0x100",
                "popfq",
                "2:",
                $insn,
                "pushfq",
                "and qword ptr [rsp], -257",
                "popfq",
                "mov rbx, {saved}",
                start = out(reg) start,
                saved = out(reg) _,
                $($($op)*)?
            );
        }
        start
    }};
}

fn report(name: &str, (delta, dr6): (u64, u64)) {
    println!("tf_after_{name}={delta}");
    println!("tf_bs_{name}={}", (dr6 >> 14) & 1);
}

/// Data breakpoint on an emulated access: DR0 = the TPR, L0, R/W0 = 01b
/// (writes), LEN0 = 11b (4 bytes); one store of the TPR's own value there
/// (2 bytes, `mov [rax], ecx`), no TF. The processor raises #DB after the
/// store with DR6.B0 (SDM Vol. 3B §18.2.4, §18.3.1.2): `db_after_apic_tpr`
/// is the trap's RIP minus the store's address, `db_b0_apic_tpr` DR6.B0.
fn data_breakpoint_on_the_tpr() {
    let tpr = crate::apic::page() + 0x80;
    // SAFETY: the TPR of this CPU's own APIC, identity-mapped MMIO.
    let value = unsafe { core::ptr::read_volatile(tpr as *const u32) };
    let dr7: u64 = 1 | (0b01 << 16) | (0b11 << 18);
    let (delta, dr6) = with_db_handler(|| {
        let start: u64;
        // SAFETY: DR0/DR7 are set for this one store and cleared after it
        // (the probe uses no other breakpoint); the store writes the TPR's
        // current value back, which changes nothing.
        unsafe {
            asm!(
                "mov dr0, rax",
                "mov dr7, rdx",
                "lea {start}, [rip + 2f]",
                "2:",
                "mov [rax], ecx",
                "xor edx, edx",
                "mov dr7, rdx",
                start = out(reg) start,
                in("rax") tpr,
                in("ecx") value,
                inout("rdx") dr7 => _,
            );
        }
        start
    });
    println!("db_after_apic_tpr={delta}");
    println!("db_b0_apic_tpr={}", dr6 & 1);
}

fn genuine_intel() -> bool {
    let r = core::arch::x86_64::__cpuid_count(0, 0);
    r.ebx == u32::from_le_bytes(*b"Genu")
}

/// The single-step checks. Call before the probe decides whether thinhv
/// is there, so that they also run bare.
pub fn single_step() {
    // NOP: the harness itself (1 byte).
    report("nop", with_db_handler(|| stepped!("nop")));
    // CPUID (2 bytes): always intercepted.
    report(
        "cpuid",
        with_db_handler(|| stepped!("cpuid", inout("eax") 0u32 => _, out("ecx") _, out("edx") _)),
    );
    // RDMSR IA32_EFER (2 bytes): intercepted on SVM (EFER.SVME hidden).
    report(
        "rdmsr_efer",
        with_db_handler(|| stepped!("rdmsr", in("ecx") 0xc000_0080u32, out("eax") _, out("edx") _)),
    );
    // IN EAX, DX from 0xCFC (1 byte), the latch set to 00:00.0 register 0
    // first (outside the stepped window): intercepted where thinhv
    // mediates configuration space.
    // SAFETY: selects the host bridge's vendor/device register; reading it
    // has no side effects.
    unsafe { asm!("out dx, eax", in("dx") 0xcf8u16, in("eax") 0x8000_0000u32) };
    report(
        "in_cfc",
        with_db_handler(|| stepped!("in eax, dx", in("dx") 0xcfcu16, out("eax") _)),
    );
    // An APIC write (the TPR's own value back, `mov [rax], ecx`, 2
    // bytes): emulated where thinhv traps the xAPIC page.
    let tpr = crate::apic::page() + 0x80;
    // SAFETY: the TPR of this CPU's own APIC, identity-mapped MMIO.
    let value = unsafe { core::ptr::read_volatile(tpr as *const u32) };
    report(
        "apic_tpr",
        with_db_handler(|| stepped!("mov [rax], ecx", in("rax") tpr, in("ecx") value)),
    );
    data_breakpoint_on_the_tpr();
    let s = core::arch::x86_64::__cpuid_count(LEAF_SIGNATURE, 0);
    if signature_from_regs(s.ebx, s.ecx, s.edx) != SIGNATURE {
        // Bare: VMCALL/VMMCALL would be #UD; no hypercall to step over.
        return;
    }
    // The VERSION hypercall (3 bytes), which changes RAX..RDX.
    let r = if genuine_intel() {
        with_db_handler(
            || stepped!("vmcall", inout("rax") Function::VERSION.0 => _, out("rcx") _, out("rdx") _),
        )
    } else {
        with_db_handler(
            || stepped!("vmmcall", inout("rax") Function::VERSION.0 => _, out("rcx") _, out("rdx") _),
        )
    };
    report("hypercall", r);
}
