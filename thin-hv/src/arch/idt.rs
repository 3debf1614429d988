//! The host IDT: every exception in host mode prints the processor state
//! and stops (or resets, per `[hypervisor] on_fatal`); it never hangs
//! silently. Two vectors return instead:
//!
//! * NMI: recorded for the CPU's next exit (on SVM it only arrives inside
//!   the NMI sink, `svm::nmi`, which counts it; on VMX any NMI can, and the
//!   handler also arms NMI-window exiting so that the next VM entry exits
//!   at once and the NMI reaches the guest or wakes the CPU).
//! * #SX (vector 30): with INIT redirection (VM_CR.R_INIT, AMD APM Vol. 2
//!   §15.30.1) an INIT taken in host mode raises #SX with error code 1
//!   instead of resetting the CPU (APM Vol. 2 §8.2). It is counted in
//!   [`REDIRECTED_INITS`] and dropped: the CPU keeps running thinhv.
//!   thinhv never sets GIF in host mode while it runs a guest, so none is
//!   expected; this is the guard if one ever does.
use super::core_state;
use super::instr::{halt_forever, read_cr2, read_cr3, reset_platform};
use super::logger::LOGGER;
use super::percpu::PerCpu;
use core::arch::naked_asm;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Once;
use thinhv_abi::handoff::ON_FATAL_RESET;
use thinhv_abi::status::{CpuState, FLAG_FATAL};

/// Register state pushed by the stubs, lowest address first.
#[derive(Debug)]
#[repr(C)]
pub struct ExceptionFrame {
    /// General-purpose registers (pushed by `exception_common`).
    pub r15: u64,
    #[allow(missing_docs)]
    pub r14: u64,
    #[allow(missing_docs)]
    pub r13: u64,
    #[allow(missing_docs)]
    pub r12: u64,
    #[allow(missing_docs)]
    pub r11: u64,
    #[allow(missing_docs)]
    pub r10: u64,
    #[allow(missing_docs)]
    pub r9: u64,
    #[allow(missing_docs)]
    pub r8: u64,
    #[allow(missing_docs)]
    pub rbp: u64,
    #[allow(missing_docs)]
    pub rdi: u64,
    #[allow(missing_docs)]
    pub rsi: u64,
    #[allow(missing_docs)]
    pub rdx: u64,
    #[allow(missing_docs)]
    pub rcx: u64,
    #[allow(missing_docs)]
    pub rbx: u64,
    #[allow(missing_docs)]
    pub rax: u64,
    /// Vector (pushed by the stub).
    pub vector: u64,
    /// Error code (by the CPU, or 0 by the stub).
    pub error: u64,
    /// Pushed by the CPU.
    pub rip: u64,
    #[allow(missing_docs)]
    pub cs: u64,
    #[allow(missing_docs)]
    pub rflags: u64,
    #[allow(missing_docs)]
    pub rsp: u64,
    #[allow(missing_docs)]
    pub ss: u64,
}

#[unsafe(naked)]
unsafe extern "C" fn exception_common() {
    naked_asm!(
        "push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
        "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
        "mov rdi, rsp",
        "call {handler}",
        "ud2",
        handler = sym host_exception,
    );
}

macro_rules! stub {
    ($name:ident, $vec:literal) => {
        #[unsafe(naked)]
        unsafe extern "C" fn $name() {
            naked_asm!("push 0", concat!("push ", $vec), "jmp {c}", c = sym exception_common);
        }
    };
    ($name:ident, $vec:literal, error) => {
        #[unsafe(naked)]
        unsafe extern "C" fn $name() {
            naked_asm!(concat!("push ", $vec), "jmp {c}", c = sym exception_common);
        }
    };
}

stub!(v0, 0);
stub!(v1, 1);
stub!(v3, 3);
stub!(v4, 4);
stub!(v5, 5);
stub!(v6, 6);
stub!(v7, 7);
stub!(v8, 8, error);
stub!(v9, 9);
stub!(v10, 10, error);
stub!(v11, 11, error);
stub!(v12, 12, error);
stub!(v13, 13, error);
stub!(v14, 14, error);
stub!(v16, 16);
stub!(v17, 17, error);
stub!(v18, 18);
stub!(v19, 19);
stub!(v20, 20);
stub!(v21, 21, error);
stub!(v28, 28);
stub!(v29, 29, error);
stub!(vother, 255);

/// INITs redirected to #SX in host mode and dropped, not yet logged (the
/// next exit logs them: the handler itself may not take the logger's lock).
pub static REDIRECTED_INITS: AtomicU64 = AtomicU64::new(0);

#[unsafe(naked)]
unsafe extern "C" fn sx() {
    // The CPU aligned RSP to 16 and pushed 48 bytes (frame and error
    // code); nine registers and 8 more bytes realign it for the call. The
    // error code is dropped before IRETQ.
    naked_asm!(
        "push rax", "push rcx", "push rdx", "push rsi", "push rdi",
        "push r8", "push r9", "push r10", "push r11",
        "mov rdi, [rsp + 72]",
        "sub rsp, 8",
        "call {handler}",
        "add rsp, 8",
        "pop r11", "pop r10", "pop r9", "pop r8",
        "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rax",
        "add rsp, 8",
        "iretq",
        handler = sym host_sx,
    );
}

/// #SX in host mode: an INIT (error code 1) or any other redirected event
/// is counted and dropped. No logging here (see [`REDIRECTED_INITS`]).
extern "sysv64" fn host_sx(_error_code: u64) {
    REDIRECTED_INITS.fetch_add(1, Ordering::Relaxed);
}

#[unsafe(naked)]
unsafe extern "C" fn nmi() {
    // The CPU pushed 40 bytes on the 16-byte-aligned IST stack; nine more
    // registers realign it for the call. Caller-saved registers only: the
    // handler is ordinary `sysv64` code (no SSE on this target).
    naked_asm!(
        "push rax", "push rcx", "push rdx", "push rsi", "push rdi",
        "push r8", "push r9", "push r10", "push r11",
        "call {handler}",
        "pop r11", "pop r10", "pop r9", "pop r8",
        "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rax",
        "iretq",
        handler = sym host_nmi,
    );
}

/// Records an NMI taken in host mode in this CPU's `MiscPage`, found
/// through GDTR (each CPU's host GDT opens its `MiscPage`).
extern "sysv64" fn host_nmi() {
    let Some(core) = core_state::get() else {
        return;
    };
    let base = super::instr::sgdt().base;
    let stride = core::mem::size_of::<PerCpu>() as u64;
    let first = core.percpu_base + core::mem::offset_of!(PerCpu, misc) as u64;
    let index = base.wrapping_sub(first) / stride;
    if base < first
        || !(base - first).is_multiple_of(stride)
        || index >= core.hv.cpus().len() as u64
    {
        // Not thinhv's host GDT: nothing of ours to record into.
        return;
    }
    // The CPU's shared slot, never its `PerCpu`: the interrupted exit path
    // may hold that as `&mut`.
    let slot = &core.hv.cpus()[index as usize];
    super::vcpu::host_nmi_taken(slot);
}

/// One 16-byte interrupt gate.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Gate {
    low: u64,
    high: u64,
}

fn gate(handler: unsafe extern "C" fn(), ist: u8) -> Gate {
    let a = handler as usize as u64;
    let low = (a & 0xffff)
        | (u64::from(super::percpu::SEL_CODE) << 16)
        | (u64::from(ist & 7) << 32)
        | (0x8eu64 << 40) // present, DPL 0, 64-bit interrupt gate
        | (((a >> 16) & 0xffff) << 48);
    Gate { low, high: a >> 32 }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static IDT: Once<Idt> = Once::new();

/// The IDT's pseudo-descriptor (limit, base), building it on first use.
pub fn idt_pointer() -> (u16, u64) {
    let idt = IDT.call_once(|| {
        let mut g = [gate(vother, 0); 256];
        let table: [(usize, unsafe extern "C" fn(), u8); 23] = [
            (0, v0, 0),
            (1, v1, 0),
            (2, nmi, 1),
            (3, v3, 0),
            (4, v4, 0),
            (5, v5, 0),
            (6, v6, 0),
            (7, v7, 0),
            (8, v8, 2),
            (9, v9, 0),
            (10, v10, 0),
            (11, v11, 0),
            (12, v12, 0),
            (13, v13, 0),
            (14, v14, 0),
            (16, v16, 0),
            (17, v17, 0),
            (18, v18, 3),
            (19, v19, 0),
            (20, v20, 0),
            (21, v21, 0),
            (29, v29, 0),
            (30, sx, 0),
        ];
        for (v, h, ist) in table {
            g[v] = gate(h, ist);
        }
        g[28] = gate(v28, 0);
        Idt(g)
    });
    (
        (core::mem::size_of::<Idt>() - 1) as u16,
        core::ptr::from_ref(idt) as u64,
    )
}

extern "sysv64" fn host_exception(f: &ExceptionFrame) -> ! {
    fatal(format_args!(
        "exception {} (error {:#x}) in host mode at {:#x}:{:#x} rflags {:#x} rsp {:#x} cr2 {:#x} cr3 {:#x}\n  \
         rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}\n  \
         r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}",
        f.vector,
        f.error,
        f.cs,
        f.rip,
        f.rflags,
        f.rsp,
        read_cr2(),
        read_cr3(),
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp,
        f.r8,
        f.r9,
        f.r10,
        f.r11,
        f.r12,
        f.r13,
        f.r14,
        f.r15
    ))
}

struct Buf {
    b: [u8; 1024],
    n: usize,
}

impl Write for Buf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let k = s.len().min(self.b.len() - self.n);
        self.b[self.n..self.n + k].copy_from_slice(&s.as_bytes()[..k]);
        self.n += k;
        Ok(())
    }
}

/// Reports a fatal error on this CPU, then halts or resets per
/// configuration. Never returns.
pub fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    let mut buf = Buf { b: [0; 1024], n: 0 };
    let cpu = core_state::current_cpu();
    let _ = match cpu {
        Some(c) => write!(buf, "\r\nthinhv[cpu{c}] FATAL {args}\r\n"),
        None => write!(buf, "\r\nthinhv FATAL {args}\r\n"),
    };
    let core = core_state::get();
    let reset = core.is_some_and(|c| c.handoff.config.on_fatal == ON_FATAL_RESET);
    let _ = write!(
        buf,
        "thinhv: {}\r\n",
        if reset {
            "resetting the platform"
        } else {
            "this CPU is stopped"
        }
    );
    LOGGER.emergency(
        core::str::from_utf8(&buf.b[..buf.n]).unwrap_or("thinhv FATAL (unprintable)\r\n"),
    );
    if let (Some(core), Some(c)) = (core, cpu) {
        core.status.set_flags(FLAG_FATAL);
        core.status.set_cpu_state(c, CpuState::STOPPED);
        core.hv.cpus()[c].set_state(CpuState::STOPPED);
    }
    if reset {
        reset_platform()
    }
    halt_forever()
}
