//! Physical NMIs on SVM without opening GIF in host mode, and the per-CPU
//! state of the guest's NMIs ([`crate::nmi`]).
//!
//! Every CPU under thinhv intercepts NMIs (APM Vol. 2 §15.13): wake-up
//! kicks (`hv::Mailbox`) and the guest's own NMIs both exit. The
//! intercepted NMI is not consumed by the #VMEXIT: it stays pending while
//! GIF is clear (§15.17), and the next VMRUN, which sets GIF, would exit
//! for it again at once. Taking it in host mode needs GIF set there
//! (STGI), and while GIF is set in host mode a real INIT is taken too: on
//! a processor without INIT redirection (VM_CR.R_INIT, §15.30.1; QEMU TCG
//! ignores it) it resets the CPU, which a SIPI then starts outside the
//! nested page tables and the IOMMU (issue 11, item 1). So thinhv never
//! sets GIF in host mode. The NMI is taken in guest mode instead, by the
//! *NMI sink*: a VMCB of thinhv's own (a frame of the core's pool, out of
//! the guest's reach) whose "guest" is this CPU's host context itself
//! (host CR3, GDT, IDT, TR, nested paging off, its own ASID), with the NMI
//! intercept off. VMRUN of it sets GIF, the pending NMI is delivered
//! through the host IDT before the sink's first instruction (its handler
//! counts it in `CpuSlot::host_nmis` and returns with IRET, so the
//! processor's NMI masking ends where it began), and the sink's code exits
//! with VMMCALL. A real INIT that arrives meanwhile meets the sink's INIT
//! intercept, exactly as it would meet the guest's; every exception exits
//! (a fault there is thinhv's bug and stops the machine with a report).
//!
//! Whether the NMI was a kick or the guest's the handlers decide from the
//! mailbox, as before; the guest's are then injected by [`crate::nmi`],
//! never into a guest that is still blocking NMIs.
use crate::arch::core_state::Core;
use crate::arch::idt::fatal;
use crate::arch::instr::{rdmsr, read_cr0, read_cr3, read_cr4, sgdt, sidt};
use crate::arch::percpu::{SEL_CODE, SEL_DATA};
use crate::handlers::msr::MSR_EFER;
use crate::nmi::NmiTracker;
use crate::svm::exit_code::{self, ExitCode};
use crate::svm::vmcb::{Segment, Vmcb, attrib_from_descriptor_high, misc1, misc2, tlb};
use core::arch::{asm, naked_asm};
use core::mem::offset_of;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;
use thinhv_abi::handoff::{CoreError, MAX_CPUS, features};
use thinhv_paging::FrameAlloc;

/// One CPU's NMI state.
pub struct SvmNmi {
    /// The guest's NMIs. Only this CPU's exit path locks it.
    pub tracker: Mutex<NmiTracker>,
    /// Physical address of its NMI sink VMCB (0: none yet).
    sink_pa: AtomicU64,
}

impl SvmNmi {
    const fn new() -> Self {
        Self {
            tracker: Mutex::new(NmiTracker::new()),
            sink_pa: AtomicU64::new(0),
        }
    }
}

static CPUS: [SvmNmi; MAX_CPUS] = [const { SvmNmi::new() }; MAX_CPUS];

/// CPU `cpu`'s NMI state.
pub fn of(cpu: usize) -> &'static SvmNmi {
    &CPUS[cpu]
}

/// The sink's ASID: not the host's (0) nor the guest's (1).
const SINK_ASID: u32 = 2;
/// IA32_PAT.
const IA32_PAT: u32 = 0x277;
/// DR6 and DR7 at reset (no breakpoint enabled in the sink).
const DR6_INIT: u64 = 0xffff_0ff0;
const DR7_INIT: u64 = 0x400;
/// RFLAGS of the sink: IF clear (no physical interrupt is taken there:
/// without V_INTR_MASKING the guest's IF masks them, §15.21.1).
const SINK_RFLAGS: u64 = 0x2;
/// Every exception vector but 2 (not an exception) exits the sink.
const SINK_EXCEPTIONS: u32 = !(1 << 2);
/// Pause iterations the sink waits before VMMCALL; the pending NMI is
/// normally taken before its first instruction.
const SINK_SPIN: u32 = 64;
/// VMRUNs of the sink for an intercepted NMI before giving up (logged).
pub const SINK_TRIES: usize = 4;
/// Offset of the save area's RSP in the VMCB (Table B-2), for the asm.
const SINK_RSP: usize = offset_of!(Vmcb, save) + offset_of!(crate::svm::vmcb::SaveArea, rsp);

/// Gives CPU `cpu` its sink VMCB (once; kept across a roll-back and a
/// second `virtualize`).
pub fn prepare_sink(core: &Core, cpu: usize) -> Result<(), CoreError> {
    let s = &CPUS[cpu];
    if s.sink_pa.load(Ordering::SeqCst) != 0 {
        return Ok(());
    }
    let pa = core
        .frames
        .lock()
        .alloc_frame()
        .ok_or(CoreError::OUT_OF_MEMORY)?;
    // SAFETY: a fresh 4 KiB frame of the core's pool, identity-mapped in
    // the host tables and covered by the protected region; only this CPU
    // ever uses it.
    unsafe { core::ptr::write_bytes(pa as *mut u8, 0, 4096) };
    s.sink_pa.store(pa, Ordering::SeqCst);
    Ok(())
}

/// The sink's code: wait a little for the NMI, then leave.
#[unsafe(naked)]
unsafe extern "C" fn sink_code() {
    naked_asm!(
        "mov ecx, {spin}",
        "2:",
        "pause",
        "dec ecx",
        "jnz 2b",
        "vmmcall",
        "ud2",
        spin = const SINK_SPIN,
    );
}

fn segment(selector: u16, descriptor: u64) -> Segment {
    Segment {
        selector,
        attrib: attrib_from_descriptor_high((descriptor >> 32) as u32),
        limit: 0xffff_ffff,
        base: 0,
    }
}

/// Fills the sink from the host context this CPU runs in now.
fn fill(core: &Core, vmcb: &mut Vmcb) {
    let c = &mut vmcb.control;
    c.tlb_control = if c.guest_asid == 0 {
        // First use: nothing of ASID 2 may be in the TLB from before.
        if core.handoff.features & features::FLUSH_BY_ASID != 0 {
            tlb::FLUSH_ASID
        } else {
            tlb::FLUSH_ALL
        }
    } else {
        tlb::DO_NOTHING
    };
    c.intercept_misc1 = misc1::INIT | misc1::SHUTDOWN;
    c.intercept_misc2 = misc2::VMRUN | misc2::VMMCALL;
    c.intercept_exceptions = SINK_EXCEPTIONS;
    c.iopm_base_pa = core.iopm_pa;
    c.msrpm_base_pa = core.msr_map_pa;
    c.guest_asid = SINK_ASID;
    c.int_ctl = 0;
    c.int_state = 0;
    c.nested_ctl = 0;
    c.event_inj = 0;
    c.virt_ext = 0;
    c.clean_bits = 0;
    let gdt = sgdt();
    let idt = sidt();
    // SAFETY: GDTR is this CPU's host GDT (`PerCpu::init_gdt`), which
    // holds the code and data descriptors at SEL_CODE and SEL_DATA.
    let (code, data) = unsafe {
        let g = gdt.base as *const u64;
        (
            g.add(usize::from(SEL_CODE) / 8).read(),
            g.add(usize::from(SEL_DATA) / 8).read(),
        )
    };
    let s = &mut vmcb.save;
    s.cs = segment(SEL_CODE, code);
    s.ss = segment(SEL_DATA, data);
    s.ds = s.ss;
    s.es = s.ss;
    s.gdtr = Segment {
        selector: 0,
        attrib: 0,
        limit: u32::from(gdt.limit),
        base: gdt.base,
    };
    s.idtr = Segment {
        selector: 0,
        attrib: 0,
        limit: u32::from(idt.limit),
        base: idt.base,
    };
    s.cpl = 0;
    // SAFETY: EFER and PAT exist on every processor with SVM; reading
    // them has no side effects. EFER holds SVME, as VMRUN requires.
    s.efer = unsafe { rdmsr(MSR_EFER) };
    // SAFETY: as above.
    s.g_pat = unsafe { rdmsr(IA32_PAT) };
    s.cr0 = read_cr0();
    s.cr3 = read_cr3();
    s.cr4 = read_cr4();
    s.dr6 = DR6_INIT;
    s.dr7 = DR7_INIT;
    s.rflags = SINK_RFLAGS;
    s.rip = sink_code as *const () as u64;
    s.rax = 0;
}

/// VMRUN of the sink at `pa`; returns after its #VMEXIT.
///
/// # Safety
/// Host mode, EFER.SVME set, GIF clear, VM_HSAVE_PA set; `pa` is this
/// CPU's sink VMCB as [`fill`] left it. The sink runs this CPU's host
/// context (its page tables map this code, its IDT returns from NMIs and
/// every other exception exits).
unsafe fn run_sink(pa: u64) {
    // SAFETY: guaranteed by the caller. VMRUN saves this host state in the
    // host save area and #VMEXIT restores it (RAX, RSP, RIP included,
    // APM §15.5.1, §15.6); the sink changes only ECX of the other
    // registers (the NMI handler saves what it uses). Its RSP, below this
    // frame, is never written: the NMI runs on IST1.
    unsafe {
        asm!(
            "lea rcx, [rsp - 256]",
            "and rcx, -16",
            "mov [rax + {rsp}], rcx",
            "vmrun rax",
            rsp = const SINK_RSP,
            inout("rax") pa => _,
            out("rcx") _,
        );
    }
}

/// Sink runs that took no NMI, or met an INIT (logged, the first few).
static SINK_MISSES: AtomicU64 = AtomicU64::new(0);

/// Takes the physical NMI pending on CPU `cpu` (after #VMEXIT(NMI), or a
/// kick that may still be in flight) in the NMI sink, with up to `tries`
/// VMRUNs of it. Returns how many NMIs the host NMI handler counted (0:
/// none was pending, or an INIT came first and stays latched for the
/// guest's INIT intercept).
pub fn consume_pending_nmi(core: &Core, cpu: usize, tries: usize) -> u32 {
    let pa = CPUS[cpu].sink_pa.load(Ordering::SeqCst);
    if pa == 0 {
        fatal(format_args!("no NMI sink on cpu {cpu}"));
    }
    let slot = &core.hv.cpus()[cpu];
    slot.host_nmis.store(0, Ordering::SeqCst);
    // SAFETY: the sink frame belongs to this CPU alone (`prepare_sink`),
    // and the processor writes it only during `run_sink` below.
    let vmcb = unsafe { &mut *(pa as *mut Vmcb) };
    fill(core, vmcb);
    for _ in 0..tries {
        // SAFETY: host mode after #VMEXIT (GIF clear, SVME and
        // VM_HSAVE_PA set at launch); the sink was filled just now.
        unsafe { run_sink(pa) };
        vmcb.control.tlb_control = tlb::DO_NOTHING;
        let code = vmcb.control.exit_code;
        match ExitCode(code) {
            ExitCode::VMMCALL => {}
            ExitCode::INIT => {
                miss(cpu, "a real INIT arrived (it stays latched for the guest)");
                return slot.host_nmis.swap(0, Ordering::SeqCst);
            }
            _ => fatal(format_args!(
                "NMI sink exit {} {code:#x} (info {:#x} {:#x}, rip {:#x})",
                exit_code::name(code),
                vmcb.control.exit_info1,
                vmcb.control.exit_info2,
                vmcb.save.rip
            )),
        }
        let n = slot.host_nmis.swap(0, Ordering::SeqCst);
        if n > 0 {
            return n;
        }
    }
    0
}

/// Logs a sink run that did not end as expected (rate-limited).
pub fn miss(cpu: usize, what: &str) {
    let n = SINK_MISSES.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= 8 || n.is_multiple_of(1024) {
        log::warn!("cpu {cpu}: NMI sink: {what} ({n} so far)");
    }
}
