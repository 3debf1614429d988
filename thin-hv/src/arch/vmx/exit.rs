//! The VMX exit dispatcher.
use super::guest::VmxGuest;
use super::instr::{invept_all, vmread, vmwrite, vmxoff};
use super::world::{VmxLeave, vmx_leave};
use crate::arch::core_state::{self, Core};
use crate::arch::env_impl::HwEnv;
use crate::arch::idt::fatal;
use crate::arch::instr::read_cr4;
use crate::arch::percpu::{GuestRegs, RunState};
use crate::arch::vcpu::{self, Backend as _, NativeState};
use crate::exit::Exit;
use crate::handlers::{self, Outcome};
use crate::vmx::controls::{entry, proc1};
use crate::vmx::cr::CrRules;
use crate::vmx::entry_check::check;
use crate::vmx::exit_reason::{self, ExitReason};
use crate::vmx::fields::Field;
use crate::vmx::image::VmcsImage;
use crate::vmx::state::{
    INIT_CR0, INIT_LIMIT_FIELDS, INIT_ZERO_SEGMENTS, LONG_MODE_CR0, LONG_MODE_CR4, actual_cr,
    init_fields, long_mode_fields, sipi_cs,
};
use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};
use thinhv_abi::handoff::CoreError;

/// Guest activity state "wait-for-SIPI" (SDM Vol. 3C §25.4.2).
const ACTIVITY_WAIT_SIPI: u64 = 3;

fn write(f: Field, v: u64) {
    // SAFETY: the current VMCS is this CPU's; the values are the
    // architectural INIT/SIPI state or re-injected events.
    if unsafe { vmwrite(f, v) }.is_err() {
        log::error!("VMWRITE {} failed", f.name());
    }
}

/// Exits whose instruction length the processor reports (SDM §28.2.5).
fn has_insn_len(r: ExitReason) -> bool {
    matches!(
        r,
        ExitReason::CPUID
            | ExitReason::VMCALL
            | ExitReason::RDMSR
            | ExitReason::WRMSR
            | ExitReason::XSETBV
            | ExitReason::INVD
            | ExitReason::CR_ACCESS
            // IN/OUT (the configuration ports): saves decoding the
            // instruction on every configuration access.
            | ExitReason::IO
    )
}

pub(crate) fn rules(core: &Core) -> CrRules {
    let c = core.vmx.as_ref().map(|v| v.caps).unwrap_or_default();
    CrRules {
        cr0_fixed0: c.cr0_fixed0,
        cr0_fixed1: c.cr0_fixed1,
        cr4_fixed0: c.cr4_fixed0,
        cr4_fixed1: c.cr4_fixed1,
        unrestricted: true,
        phys_bits: c.phys_bits,
    }
}

/// Handles one VM exit on the current CPU.
pub extern "sysv64" fn vmx_exit(run: &mut RunState) {
    let Some(core) = core_state::get() else {
        fatal(format_args!("exit before initialization"))
    };
    let cpu = run.cpu as usize;
    let _cost = crate::arch::exit_timer::ExitTimer::start(&core.hv.cpus()[cpu]);
    let first = run.exits == 0;
    run.exits += 1;
    let reason = vmread(Field::EXIT_REASON) as u32;
    let basic = ExitReason((reason & 0xffff) as u16);
    let qual = vmread(Field::EXIT_QUALIFICATION);

    if reason & exit_reason::ENTRY_FAILURE != 0 {
        log::error!(
            "cpu {cpu}: VM entry failed ({}, qualification {qual:#x})",
            basic.name()
        );
        diagnose(core);
        if first {
            log::error!("cpu {cpu}: rolling back");
            let mut vcpu = VmxVcpu::new(run, reason, qual);
            vcpu::roll_back(core, cpu, &mut vcpu, Some(CoreError::ENTRY_FAILED.0));
        }
    }
    // An event whose delivery the exit interrupted is delivered again
    // (SDM §28.2.4), unless a handler injects something else.
    let idt = vmread(Field::IDT_VECTORING_INFO);
    if idt & (1 << 31) != 0 {
        write(Field::ENTRY_INTERRUPTION_INFO, idt & !(1 << 12));
        if idt & (1 << 11) != 0 {
            write(
                Field::ENTRY_EXCEPTION_ERROR_CODE,
                vmread(Field::IDT_VECTORING_ERROR_CODE),
            );
        }
        write(
            Field::ENTRY_INSTRUCTION_LENGTH,
            vmread(Field::EXIT_INSTRUCTION_LENGTH),
        );
    }
    // The host NMI handler updates it concurrently, atomically.
    let host_nmis = &core.hv.cpus()[cpu].host_nmis;
    if basic == ExitReason::NMI_WINDOW {
        set_nmi_window(false);
    }
    if host_nmis.swap(0, Ordering::SeqCst) != 0 {
        // NMIs the host took since the last exit: a wake-up (an INIT for
        // this CPU) or the guest's own, handled like an NMI exit.
        let mut guest = VmxGuest {
            regs: &mut run.regs,
            insn_len: None,
            rules: rules(core),
            nmi_pending: &mut run.nmi_pending,
        };
        let mut env = HwEnv { core, cpu };
        let h = handlers::handle(&Exit::Nmi, &mut guest, &mut env);
        core.status.count(cpu, h.reason);
        if h.outcome == Outcome::ResumeFlushTlb {
            // A kick that asked for a flush (`msi_remap`): its request was
            // taken just now, whatever this exit was about.
            VmxVcpu::new(run, reason, qual).flush_tlb(core);
        }
        if h.outcome == Outcome::WaitForSipi {
            // INIT discards whatever this exit was about.
            let mut vcpu = VmxVcpu::new(run, reason, qual);
            vcpu::init_then_sipi(core, cpu, &mut vcpu);
            vcpu.before_entry(core, cpu);
            return;
        }
    }
    if basic == ExitReason::NMI_WINDOW {
        // Only here to hand an NMI over: `before_entry` injects it.
        VmxVcpu::new(run, reason, qual).before_entry(core, cpu);
        return;
    }
    let mut exit = exit_reason::decode(
        reason,
        qual,
        vmread(Field::GUEST_PHYSICAL_ADDRESS),
        run.regs[1],
        run.regs[0],
        run.regs[2],
        vmread(Field::EXIT_INTERRUPTION_INFO) as u32,
    );
    if let Exit::TaskSwitch {
        event,
        error_code,
        insn_len,
        ..
    } = &mut exit
    {
        // A switch through a task gate is the delivery of the event the
        // IDT-vectoring information names (SDM Vol. 3C §28.2.4); the
        // instruction length covers CALL, JMP, IRET and software
        // interrupts (§28.2.5).
        if idt & (1 << 31) != 0 {
            *event = idt as u32;
            *error_code = vmread(Field::IDT_VECTORING_ERROR_CODE) as u32;
        }
        *insn_len = (vmread(Field::EXIT_INSTRUCTION_LENGTH) & 0xf) as u8;
    }
    log::trace!(
        "cpu {cpu}: exit {} ({reason:#x}) qual {qual:#x} rip {:#x} cs {:#x}",
        basic.name(),
        vmread(Field::GUEST_RIP),
        vmread(Field::GUEST_CS_SELECTOR)
    );
    let insn_len = has_insn_len(basic).then(|| vmread(Field::EXIT_INSTRUCTION_LENGTH));
    let mut guest = VmxGuest {
        regs: &mut run.regs,
        insn_len,
        rules: rules(core),
        nmi_pending: &mut run.nmi_pending,
    };
    let mut env = HwEnv { core, cpu };
    let handled = handlers::handle(&exit, &mut guest, &mut env);
    vcpu::account(core, cpu, &handled);
    vcpu::apply(
        core,
        cpu,
        handled.outcome,
        &mut VmxVcpu::new(run, reason, qual),
    );
}

/// The VMX side of the vCPU seam: this CPU's run state and the current
/// VMCS, for the length of one exit.
struct VmxVcpu<'a> {
    run: &'a mut RunState,
    reason: u32,
    qual: u64,
}

impl<'a> VmxVcpu<'a> {
    fn new(run: &'a mut RunState, reason: u32, qual: u64) -> Self {
        Self { run, reason, qual }
    }
}

impl vcpu::Backend for VmxVcpu<'_> {
    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.run.regs
    }

    fn flush_tlb(&mut self, _core: &Core) {
        // SAFETY: VMX root operation; INVEPT was checked at start.
        unsafe { invept_all() };
    }

    /// The INIT state; then either the processor's wait-for-SIPI activity
    /// state, or (SIPIs intercepted at the APIC) a wait in the host, as on
    /// SVM, for the SIPI posted to the mailbox.
    fn enter_init(&mut self, core: &Core, _cpu: usize) -> bool {
        init_state(core, self.run);
        core.vmx.as_ref().is_some_and(|v| v.intercept_sipi)
    }

    fn start_at(&mut self, _core: &Core, _cpu: usize, vector: u8) {
        start_at(vector);
    }

    /// The appliance's EPT, and I/O bitmaps A and B from its map (every
    /// port exits).
    fn enter_partition(&mut self, _core: &Core, _cpu: usize, slat_root: u64, iopm_pa: u64) {
        write(Field::EPT_POINTER, thinhv_paging::ept::eptp(slat_root));
        write(Field::IO_BITMAP_A, iopm_pa);
        write(Field::IO_BITMAP_B, iopm_pa + 4096);
        let p = vmread(Field::PROC_BASED_CONTROLS) | u64::from(proc1::IO_BITMAPS);
        write(Field::PROC_BASED_CONTROLS, p);
        // SAFETY: VMX root operation; INVEPT was checked at start. Nothing
        // cached for the OS's EPT may serve the appliance's.
        unsafe { invept_all() };
    }

    fn start_long(&mut self, core: &Core, _cpu: usize, e: &vcpu::LongEntry) -> bool {
        let r = rules(core);
        for (f, v) in long_mode_fields(e.rip, e.rsp, e.cr3, e.gdt) {
            write(f, v);
        }
        write(Field::GUEST_LDTR_SELECTOR, 0);
        write(Field::GUEST_LDTR_AR, 1 << 16);
        write(Field::GUEST_IDTR_BASE, 0);
        write(Field::GUEST_IDTR_LIMIT, 0);
        let (cr0, cr4) = actual_cr(
            LONG_MODE_CR0,
            LONG_MODE_CR4,
            r.cr0_fixed0,
            r.cr4_fixed0,
            true,
        );
        write(Field::GUEST_CR0, cr0);
        write(Field::CR0_READ_SHADOW, LONG_MODE_CR0);
        write(Field::GUEST_CR4, cr4);
        write(Field::CR4_READ_SHADOW, LONG_MODE_CR4);
        let ent = vmread(Field::ENTRY_CONTROLS) | u64::from(entry::IA32E_GUEST);
        write(Field::ENTRY_CONTROLS, ent);
        write(Field::ENTRY_INTERRUPTION_INFO, 0);
        write(Field::GUEST_INTERRUPTIBILITY, 0);
        write(Field::GUEST_PENDING_DEBUG, 0);
        write(Field::GUEST_ACTIVITY_STATE, 0);
        self.run.regs = [0; 16];
        self.run.regs[6] = e.rsi;
        self.run.nmi_pending = 0;
        set_nmi_window(false);
        // SAFETY: VMX root operation; INVEPT was checked at start.
        unsafe { invept_all() };
        true
    }

    fn leave(&mut self, core: &Core, cpu: usize, rax: Option<u64>) -> ! {
        leave(core, cpu, self.run, rax)
    }

    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit {} {:#x}, qualification {:#x}, rip {:#x}, VM-instruction error {}",
            ExitReason((self.reason & 0xffff) as u16).name(),
            self.reason,
            self.qual,
            vmread(Field::GUEST_RIP),
            vmread(Field::VM_INSTRUCTION_ERROR)
        )
    }

    fn before_entry(&mut self, core: &Core, cpu: usize) {
        finish(self.run, &core.hv.cpus()[cpu].host_nmis);
    }
}

/// Before VM entry: hands a held NMI to the guest if it can take one now,
/// else asks for an exit when it can; and if the host took an NMI that
/// this exit did not see, makes the entry exit at once.
fn finish(run: &mut RunState, host_nmis: &AtomicU32) {
    if run.nmi_pending != 0 {
        let busy = vmread(Field::ENTRY_INTERRUPTION_INFO) & (1 << 31) != 0;
        // Blocking by STI, MOV SS or (virtual) NMI (§25.4.2, §27.3.1.5);
        // or a debug trap due after the instruction thinhv just completed
        // (pending BS or enabled breakpoint), which the processor delivers
        // first and which an injected event would displace (§27.7.3).
        let blocked = vmread(Field::GUEST_INTERRUPTIBILITY) & 0b1011 != 0
            || vmread(Field::GUEST_PENDING_DEBUG) & PENDING_DEBUG_VALID != 0;
        if busy || blocked {
            set_nmi_window(true);
        } else {
            write(Field::ENTRY_INTERRUPTION_INFO, NMI_INJECTION);
            run.nmi_pending = 0;
        }
    }
    if host_nmis.load(Ordering::SeqCst) != 0 {
        set_nmi_window(true);
    }
}

/// Pending debug exceptions that VM entry delivers: BS (bit 14) and
/// enabled breakpoint (bit 12) (§25.4.2, §27.7.3).
const PENDING_DEBUG_VALID: u64 = (1 << 14) | (1 << 12);

/// Injection of an NMI: vector 2, type NMI, valid (§25.8.3).
const NMI_INJECTION: u64 = 2 | (2 << 8) | (1 << 31);

fn set_nmi_window(on: bool) {
    let p1 = vmread(Field::PROC_BASED_CONTROLS);
    let bit = u64::from(proc1::NMI_WINDOW);
    write(
        Field::PROC_BASED_CONTROLS,
        if on { p1 | bit } else { p1 & !bit },
    );
}

/// Arms NMI-window exiting from the host NMI handler: no logging (the
/// interrupted code may hold the logger), failures ignored.
pub(crate) fn arm_nmi_window() {
    let p1 = vmread(Field::PROC_BASED_CONTROLS);
    // SAFETY: only called while this CPU's VMCS is current (`vmx_live`);
    // NMI-window exiting is an available control (checked at start).
    let _ = unsafe {
        vmwrite(
            Field::PROC_BASED_CONTROLS,
            p1 | u64::from(proc1::NMI_WINDOW),
        )
    };
}

/// INIT: the architectural INIT state, and activity "wait-for-SIPI"; the
/// processor exits again when the SIPI arrives (unless SIPIs are
/// intercepted, when the host waits). Registers: the neutral layer.
fn init_state(core: &Core, run: &mut RunState) {
    let r = rules(core);
    for (f, v) in init_fields() {
        write(f, v);
    }
    for f in INIT_ZERO_SEGMENTS {
        write(f, 0);
    }
    for f in INIT_LIMIT_FIELDS {
        write(f, 0xffff);
    }
    let (cr0, cr4) = actual_cr(INIT_CR0, 0, r.cr0_fixed0, r.cr4_fixed0, true);
    write(Field::GUEST_CR0, cr0);
    write(Field::CR0_READ_SHADOW, INIT_CR0);
    write(Field::GUEST_CR4, cr4);
    write(Field::CR4_READ_SHADOW, 0);
    let ent = vmread(Field::ENTRY_CONTROLS) & !u64::from(entry::IA32E_GUEST);
    write(Field::ENTRY_CONTROLS, ent);
    write(Field::ENTRY_INTERRUPTION_INFO, 0);
    write(Field::GUEST_ACTIVITY_STATE, ACTIVITY_WAIT_SIPI);
    // An NMI held for the guest does not outlive its INIT.
    run.nmi_pending = 0;
    set_nmi_window(false);
}

/// SIPI: real mode at the vector's page.
fn start_at(vector: u8) {
    let (sel, base) = sipi_cs(vector);
    write(Field::GUEST_CS_SELECTOR, sel);
    write(Field::GUEST_CS_BASE, base);
    write(Field::GUEST_RIP, 0);
    // What the SIPI exit saved of the waiting state does not carry over
    // (Bochs saves "blocking by SMI" there, which VM entry then refuses).
    write(Field::GUEST_INTERRUPTIBILITY, 0);
    write(Field::GUEST_PENDING_DEBUG, 0);
    write(Field::GUEST_ACTIVITY_STATE, 0);
}

/// VMRESUME failed (the VMCS was made invalid): report and stop.
pub extern "sysv64" fn vmx_resume_failed(run: &RunState) -> ! {
    if let Some(core) = core_state::get() {
        diagnose(core);
    }
    fatal(format_args!(
        "VMRESUME failed on cpu {}: VM-instruction error {}",
        run.cpu,
        vmread(Field::VM_INSTRUCTION_ERROR)
    ))
}

/// After a failed VM entry: reads the current VMCS back and runs the
/// entry checker on it, naming each field that breaks a rule.
fn diagnose(core: &Core) {
    let Some(v) = core.vmx.as_ref() else { return };
    let mut image = VmcsImage::new();
    for f in Field::all() {
        image.set(f, vmread(f));
    }
    let found = check(&image, &v.caps);
    if found.is_empty() {
        log::error!("the VM-entry checker finds no broken rule in the current VMCS");
    }
    for x in found {
        log::error!(
            "VMCS check: {} ({:#06x}) = {:#x}: {}",
            x.field.name(),
            x.field.0,
            image.get(x.field),
            x.rule
        );
    }
}

/// Leaves VMX operation on this CPU and continues natively where the guest
/// was, with RAX = `rax` if given (the neutral layer did the bookkeeping).
fn leave(core: &Core, cpu: usize, run: &mut RunState, rax: Option<u64>) -> ! {
    core.hv.cpus()[cpu].vmx_live.store(false, Ordering::SeqCst);
    if let Some(rax) = rax {
        run.regs[0] = rax;
    }
    let rd = vmread;
    let st = VmxLeave {
        native: NativeState {
            cr0: (rd(Field::GUEST_CR0) & !rd(Field::CR0_GUEST_HOST_MASK))
                | (rd(Field::CR0_READ_SHADOW) & rd(Field::CR0_GUEST_HOST_MASK)),
            cr3: rd(Field::GUEST_CR3),
            cr4: rd(Field::CR4_READ_SHADOW)
                | (rd(Field::GUEST_CR4) & !rd(Field::CR4_GUEST_HOST_MASK)),
            efer: rd(Field::GUEST_IA32_EFER),
            gdt_limit: rd(Field::GUEST_GDTR_LIMIT),
            gdt_base: rd(Field::GUEST_GDTR_BASE),
            idt_limit: rd(Field::GUEST_IDTR_LIMIT),
            idt_base: rd(Field::GUEST_IDTR_BASE),
            cs: rd(Field::GUEST_CS_SELECTOR),
            ss: rd(Field::GUEST_SS_SELECTOR),
            ds: rd(Field::GUEST_DS_SELECTOR),
            es: rd(Field::GUEST_ES_SELECTOR),
            rip: rd(Field::GUEST_RIP),
            rsp: rd(Field::GUEST_RSP),
            rflags: rd(Field::GUEST_RFLAGS),
        },
        fs: rd(Field::GUEST_FS_SELECTOR),
        gs: rd(Field::GUEST_GS_SELECTOR),
        tr: rd(Field::GUEST_TR_SELECTOR),
        ldtr: rd(Field::GUEST_LDTR_SELECTOR),
        fs_base: rd(Field::GUEST_FS_BASE),
        gs_base: rd(Field::GUEST_GS_BASE),
        pat: rd(Field::GUEST_IA32_PAT),
    };
    if st.tr & !7 != 0 {
        // LTR needs an available TSS: clear the busy bit the guest's own
        // LTR set in its GDT.
        let desc = (st.native.gdt_base + (st.tr & !7) + 5) as *mut u8;
        // SAFETY: the guest's GDT is identity-mapped firmware memory and the
        // selector indexes it (it was loaded in TR); byte 5 holds the type.
        unsafe { desc.write_volatile(desc.read_volatile() & !0x02) };
    }
    // SAFETY: this CPU is in VMX root operation and no guest runs on it
    // any more; CR4.VMXE may only be cleared after VMXOFF.
    unsafe {
        vmxoff();
        core::arch::asm!("mov cr4, {}", in(reg) read_cr4() & !(1u64 << 13), options(nostack));
    }
    // SAFETY: before the seal, on firmware page tables that map this code.
    unsafe { vmx_leave(run, &raw const st) }
}
