//! `CORE_OP_VIRTUALIZE` on SVM: enable SVM on this CPU, build its VMCB
//! from the state the firmware is running in, and launch.
use super::world::{HostSwitch, svm_launch};
use crate::arch::core_state;
use crate::arch::idt::idt_pointer;
use crate::arch::instr::{
    clgi, cli, cpuid, rdmsr, read_cr0, read_cr2, read_cr3, read_cr4, read_cs, read_dr6, read_dr7,
    read_ds, read_es, read_rflags, read_ss, sgdt, sidt, vmsave, wrmsr,
};
use crate::arch::percpu::{PerCpu, SEL_TSS};
use crate::arch::vcpu;
use crate::handlers::msr::{MSR_EFER, MSR_VM_CR, MSR_VM_HSAVE_PA};
use crate::svm::state::{Captured, fill_from_captured};
use crate::svm::vmcb::{EFER_SVME, NESTED_CTL_NP_ENABLE, misc1, misc2, tlb};
use thinhv_abi::handoff::{CoreError, features};

const EFER_NXE: u64 = 1 << 11;
/// VM_CR.SVMDIS (APM §15.30.1).
const VM_CR_SVMDIS: u64 = 1 << 4;
/// VM_CR.R_INIT (APM Vol. 2 §15.30.1): an INIT taken in host mode raises
/// #SX (vector 30, error code 1: INIT redirected, APM Vol. 2 §8.2)
/// instead of resetting the processor.
pub(super) const VM_CR_R_INIT: u64 = 1 << 1;
const IA32_PAT: u32 = 0x277;
/// The guest's ASID (one guest per CPU; ASID 0 is the host's).
const GUEST_ASID: u32 = 1;

/// Virtualizes the calling CPU. Returns only on failure.
///
/// # Safety
/// Called by the loader on CPU `cpu` itself, natively, with `resume_rip`
/// pointing to loader code that expects RAX = status and RSP =
/// `resume_rsp`.
pub unsafe fn virtualize(cpu: u64, resume_rip: u64, resume_rsp: u64) -> Result<(), CoreError> {
    let core = core_state::get().ok_or(CoreError::NOT_INITIALIZED)?;
    let (idx, slot) = vcpu::claim(core, cpu)?;
    // SAFETY: VM_CR exists on every processor with SVM (the loader checked).
    if unsafe { rdmsr(MSR_VM_CR) } & VM_CR_SVMDIS != 0 {
        return Err(CoreError::ENABLE_FAILED);
    }

    // The frame that takes this CPU's intercepted NMIs without GIF in host
    // mode (`super::nmi`); its guest NMI state starts open.
    super::nmi::prepare_sink(core, idx)?;
    super::nmi::of(idx).tracker.lock().reset();

    // SAFETY: the loader calls this on CPU `idx` itself, before its guest
    // exists: nothing else uses its `PerCpu`.
    let pc: &mut PerCpu = unsafe { vcpu::fresh_percpu(core, idx) };

    // Enable SVM. NXE in the host's EFER makes the NX bits of the nested
    // tables legal (APM §15.25.3); the guest keeps its own EFER.
    // SAFETY: EFER exists; setting SVME (allowed: SVMDIS clear) and NXE (the
    // loader checked NX support before asking for it) keeps the current
    // mappings valid.
    let guest_efer = unsafe { rdmsr(MSR_EFER) };
    let nxe = if core.handoff.features & features::NX != 0 {
        EFER_NXE
    } else {
        0
    };
    // SAFETY: see above.
    unsafe { wrmsr(MSR_EFER, guest_efer | EFER_SVME | nxe) };
    let host_save_area = PerCpu::pa_of(&pc.host_save_area);
    // SAFETY: the host save area is a page of this CPU's `PerCpu`, owned by
    // the processor from now on.
    unsafe { wrmsr(MSR_VM_HSAVE_PA, host_save_area) };

    // Capture the firmware's state as the guest's.
    let gdtr = sgdt();
    let idtr = sidt();
    let captured = Captured {
        cr0: read_cr0(),
        cr2: read_cr2(),
        cr3: read_cr3(),
        cr4: read_cr4(),
        efer: guest_efer | EFER_SVME,
        rflags: read_rflags(),
        dr6: read_dr6(),
        dr7: read_dr7(),
        // SAFETY: IA32_PAT exists on all x86-64 processors.
        pat: unsafe { rdmsr(IA32_PAT) },
        gdtr_base: gdtr.base,
        gdtr_limit: gdtr.limit,
        idtr_base: idtr.base,
        idtr_limit: idtr.limit,
        cs: read_cs(),
        ss: read_ss(),
        ds: read_ds(),
        es: read_es(),
        rip: resume_rip,
        rsp: resume_rsp,
    };
    // SAFETY: the firmware's GDT is identity-mapped and GDTR.limit + 1
    // bytes long.
    let gdt =
        unsafe { core::slice::from_raw_parts(gdtr.base as *const u8, usize::from(gdtr.limit) + 1) };
    let vmcb = &mut pc.guest_control;
    fill_from_captured(&mut vmcb.save, &captured, gdt);
    // FS, GS, TR, LDTR, KernelGsBase, STAR/LSTAR/CSTAR/SFMASK, SYSENTER_*.
    // SAFETY: SVME is set; the VMCB is this CPU's, page-aligned.
    unsafe { vmsave(PerCpu::pa_of(&pc.guest_control)) };

    let c = &mut pc.guest_control.control;
    c.intercept_misc1 = crate::svm::intercepts::MISC1;
    c.intercept_misc2 = crate::svm::intercepts::MISC2;
    // A compatibility profile that narrows XCR0 needs XSETBV checked (VMX
    // always exits on it). The handler executes XSETBV in host mode, which
    // needs the host's CR4.OSXSAVE; the guest's CR4 is its own (VMCB).
    if core.hv.cpuid.active != 0 && cpuid(1, 0)[2] & (1 << 26) != 0 {
        c.intercept_misc2 |= misc2::XSETBV;
        // SAFETY: XSAVE is supported (CPUID.1:ECX[26]); OSXSAVE only
        // enables XGETBV/XSETBV and the XSAVE family in the host, which the
        // host uses for nothing else. The guest's CR4 was captured above.
        unsafe {
            core::arch::asm!("mov cr4, {}", in(reg) read_cr4() | (1u64 << 18), options(nostack));
        }
    }
    c.iopm_base_pa = core.iopm_pa;
    // The configuration ports (0xCF8..=0xCFF) are set in the map only when
    // a PCI function is mediated; nothing else is intercepted.
    if core.hv.pci.count > 0 {
        c.intercept_misc1 |= misc1::IOIO_PROT;
    }
    c.msrpm_base_pa = core.msr_map_pa;
    c.guest_asid = GUEST_ASID;
    c.tlb_control = tlb::FLUSH_ALL;
    c.int_ctl = 0;
    c.nested_ctl = NESTED_CTL_NP_ENABLE;
    c.n_cr3 = core.slat_root;
    c.clean_bits = 0;

    let (control, host) = (
        PerCpu::pa_of(&pc.guest_control),
        PerCpu::pa_of(&pc.host_state),
    );
    vcpu::init_run(&mut pc.misc.run, cpu, control, host);

    let (idt_limit, idt_base) = idt_pointer();
    let sw = HostSwitch {
        cr3: core.host_cr3,
        stack_top: pc.stack_top(),
        gdt_limit: (core::mem::size_of_val(&pc.misc.gdt) - 1) as u64,
        gdt_base: PerCpu::pa_of(&pc.misc.gdt),
        idt_limit: u64::from(idt_limit),
        idt_base,
    };
    let _ = SEL_TSS;

    vcpu::went_online(core, idx);
    // From here on GIF stays clear in host mode (`super::nmi`): INIT and
    // NMI are taken only in guest mode, where they are intercepted. INIT
    // redirection guards what remains (should a host-mode GIF window ever
    // be added): INIT becomes #SX, which the host IDT drops
    // (`idt::REDIRECTED_INITS`); leaving guest mode (roll-back) clears it
    // again. QEMU TCG ignores the bit (docs/emulator-faults.md); it is set
    // all the same.
    // SAFETY: interrupts off and GIF cleared (SVME is set) before INIT
    // redirection changes how an INIT is taken; `svm_launch` keeps both
    // clear. VM_CR exists on every processor with SVM and R_INIT is
    // writable whatever VM_CR.LOCK says (it guards SVMDIS and LOCK only).
    let r_init = unsafe {
        cli();
        clgi();
        wrmsr(MSR_VM_CR, rdmsr(MSR_VM_CR) | VM_CR_R_INIT);
        rdmsr(MSR_VM_CR) & VM_CR_R_INIT != 0
    };
    log::info!(
        "cpu {idx}: INIT redirection (VM_CR.R_INIT) {}",
        if r_init {
            "on"
        } else {
            "not taken by this processor (reads back 0)"
        }
    );
    log::info!("cpu {idx} (APIC {}): entering guest mode", slot.apic_id);
    // SAFETY: SVM enabled, host save area set, VMCB and host structures
    // complete; `sw` lives on this stack until the switch reads it.
    unsafe { svm_launch(&raw mut pc.misc.run, &raw const sw) }
}
