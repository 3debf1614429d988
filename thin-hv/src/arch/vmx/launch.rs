//! `CORE_OP_VIRTUALIZE` on VMX: VMXON, a VMCS built from the state the
//! firmware runs in, checked, then VMLAUNCH.
use super::instr::{VmFail, vmclear, vmptrld, vmread, vmwrite, vmxoff, vmxon};
use super::world::{vmx_exit_stub, vmx_launch};
use crate::arch::core_state;
use crate::arch::idt::idt_pointer;
use crate::arch::instr::{
    cpuid, rdmsr, read_cr0, read_cr3, read_cr4, read_cs, read_dr7, read_ds, read_es, read_rflags,
    read_ss, sgdt, sidt, wrmsr,
};
use crate::arch::percpu::{PerCpu, RunState, SEL_CODE, SEL_DATA, SEL_TSS};
use crate::arch::vcpu;
use crate::vmx::caps::{MSR_FEATURE_CONTROL, feature_control};
use crate::vmx::entry_check::check;
use crate::vmx::fields::Field;
use crate::vmx::setup::choose_controls;
use crate::vmx::state::{GuestCapture, HostState, Seg, build, placeholder_tr, seg_from_gdt};
use core::arch::asm;
use core::sync::atomic::Ordering;
use thinhv_abi::handoff::CoreError;

const CR4_VMXE: u64 = 1 << 13;
const CR4_OSXSAVE: u64 = 1 << 18;
const MSR_EFER: u32 = 0xc000_0080;
const MSR_PAT: u32 = 0x277;
const MSR_DEBUGCTL: u32 = 0x1d9;
const MSR_SYSENTER: [u32; 3] = [0x174, 0x175, 0x176];
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
/// One VPID for every CPU (VPIDs tag per logical processor).
const VPID: u16 = 1;

fn sel(reg: &str) -> u16 {
    let v: u16;
    // SAFETY: SLDT/STR only read the selector.
    unsafe {
        match reg {
            "ldtr" => asm!("sldt {:x}", out(reg) v, options(nomem, nostack)),
            _ => asm!("str {:x}", out(reg) v, options(nomem, nostack)),
        }
    }
    v
}

/// Undoes VMXON after a failure before launch, restoring the firmware's
/// CR4 and interrupt flag.
fn off(pa: u64, cr4: u64, rflags: u64) {
    // SAFETY: this CPU entered VMX root operation in `virtualize` and no
    // guest runs on it; CR4.VMXE is cleared only after VMXOFF; IF returns
    // to what the firmware had.
    unsafe {
        let _ = vmclear(pa);
        vmxoff();
        asm!("mov cr4, {}", in(reg) cr4, options(nostack));
        if rflags & (1 << 9) != 0 {
            asm!("sti", options(nomem, nostack));
        }
    }
}

/// Virtualizes the calling CPU. Returns only on failure.
///
/// # Safety
/// Called by the loader on CPU `cpu` itself, natively, with `resume_rip`
/// pointing to loader code that expects RAX = status and RSP = `resume_rsp`.
pub unsafe fn virtualize(cpu: u64, resume_rip: u64, resume_rsp: u64) -> Result<(), CoreError> {
    let core = core_state::get().ok_or(CoreError::NOT_INITIALIZED)?;
    let vmxg = core.vmx.as_ref().ok_or(CoreError::UNSUPPORTED_CPU)?;
    let caps = vmxg.caps;
    let (idx, slot) = vcpu::claim(core, cpu)?;
    // IA32_FEATURE_CONTROL: VMX outside SMX must be allowed; a firmware
    // that left the MSR unlocked gets it set and locked (SDM §24.7).
    // SAFETY: the MSR exists on processors with VMX (the loader checked).
    let fc = unsafe { rdmsr(MSR_FEATURE_CONTROL) };
    if fc & feature_control::LOCK == 0 {
        // SAFETY: as above; enabling VMX is what the loader was asked to do.
        unsafe {
            wrmsr(
                MSR_FEATURE_CONTROL,
                fc | feature_control::LOCK | feature_control::VMX_OUTSIDE_SMX,
            );
        };
    } else if fc & feature_control::VMX_OUTSIDE_SMX == 0 {
        return Err(CoreError::ENABLE_FAILED);
    }

    // SAFETY: the loader calls this on CPU `idx` itself, before its guest
    // exists: nothing else uses its `PerCpu`.
    let pc: &mut PerCpu = unsafe { vcpu::fresh_percpu(core, idx) };
    let vmcs_pa = pc.vmcs_region_pa();
    let vmxon_pa = pc.vmxon_region_pa();
    // SAFETY: both regions are this CPU's, page-aligned, 4 KiB; the first
    // dword takes the VMCS revision identifier (SDM §25.2, §25.11.5).
    unsafe {
        (vmcs_pa as *mut u32).write_volatile(caps.revision());
        (vmxon_pa as *mut u32).write_volatile(caps.revision());
    }

    // Capture the firmware's state (CR4 before VMXE).
    let gdtr = sgdt();
    let idtr = sidt();
    // SAFETY: the firmware's GDT is identity-mapped, GDTR.limit + 1 bytes.
    let gdt =
        unsafe { core::slice::from_raw_parts(gdtr.base as *const u8, usize::from(gdtr.limit) + 1) };
    // SAFETY: architectural MSRs present on every x86-64 processor with VMX.
    let (efer, pat, debugctl, sysenter, fs_base, gs_base) = unsafe {
        (
            rdmsr(MSR_EFER),
            rdmsr(MSR_PAT),
            rdmsr(MSR_DEBUGCTL),
            MSR_SYSENTER.map(|m| rdmsr(m)),
            rdmsr(MSR_FS_BASE),
            rdmsr(MSR_GS_BASE),
        )
    };
    let fs_sel: u16;
    let gs_sel: u16;
    // SAFETY: reading segment selectors has no side effects.
    unsafe {
        asm!("mov {:x}, fs", out(reg) fs_sel, options(nomem, nostack));
        asm!("mov {:x}, gs", out(reg) gs_sel, options(nomem, nostack));
    }
    let long_mode = efer & (1 << 10) != 0;
    let mut fs = seg_from_gdt(gdt, fs_sel);
    fs.base = fs_base;
    let mut gs = seg_from_gdt(gdt, gs_sel);
    gs.base = gs_base;
    let tr_sel = sel("tr");
    let tr = if tr_sel & !7 == 0 {
        placeholder_tr(long_mode)
    } else {
        busy(seg_from_gdt(gdt, tr_sel))
    };
    let guest_cr4 = read_cr4();
    let capture = GuestCapture {
        cr0: read_cr0(),
        cr3: read_cr3(),
        cr4: guest_cr4,
        dr7: read_dr7(),
        rflags: read_rflags(),
        rsp: resume_rsp,
        rip: resume_rip,
        efer,
        pat,
        debugctl,
        sysenter,
        gdtr: (gdtr.base, u32::from(gdtr.limit)),
        idtr: (idtr.base, u32::from(idtr.limit)),
        segs: [
            seg_from_gdt(gdt, read_es()),
            seg_from_gdt(gdt, read_cs()),
            seg_from_gdt(gdt, read_ss()),
            seg_from_gdt(gdt, read_ds()),
            fs,
            gs,
            seg_from_gdt(gdt, sel("ldtr")),
            tr,
        ],
    };

    // Enter VMX root operation.
    let mut host_cr4 = guest_cr4 | CR4_VMXE | caps.cr4_fixed0;
    if cpuid(1, 0)[2] & (1 << 26) != 0 {
        host_cr4 |= CR4_OSXSAVE;
    }
    let host_cr0 = read_cr0() | caps.cr0_fixed0;
    // SAFETY: CR0/CR4 get only the bits VMX requires (fixed-1) and, for
    // XSETBV emulation, OSXSAVE; the paging mode is unchanged.
    unsafe {
        asm!("cli", options(nomem, nostack));
        asm!("mov cr0, {}", in(reg) host_cr0, options(nostack));
        asm!("mov cr4, {}", in(reg) host_cr4, options(nostack));
    }
    // SAFETY: the VMXON region is set up; CR0/CR4 satisfy the fixed bits.
    if unsafe { vmxon(vmxon_pa) }.is_err() {
        // SAFETY: restore the firmware's CR4 and IF (VMX was not entered).
        unsafe {
            asm!("mov cr4, {}", in(reg) guest_cr4, options(nostack));
            if capture.rflags & (1 << 9) != 0 {
                asm!("sti", options(nomem, nostack));
            }
        }
        log::error!("cpu {idx}: VMXON failed");
        return Err(CoreError::ENABLE_FAILED);
    }
    // SAFETY: in VMX root operation; the VMCS region is this CPU's.
    if unsafe { vmclear(vmcs_pa).and_then(|()| vmptrld(vmcs_pa)) }.is_err() {
        off(vmcs_pa, guest_cr4, capture.rflags);
        return Err(CoreError::ENABLE_FAILED);
    }

    // I/O exits only for the configuration ports (0xCF8..=0xCFF), and only
    // when a PCI function is mediated.
    let io_bitmap = if core.hv.pci.count > 0 {
        core.iopm_pa
    } else {
        0
    };
    let controls =
        choose_controls(&caps, core.msr_map_pa, io_bitmap, vmxg.eptp, VPID).map_err(|m| {
            log::error!("cpu {idx}: the processor lacks {m}");
            off(vmcs_pa, guest_cr4, capture.rflags);
            CoreError::UNSUPPORTED_CPU
        })?;
    let (_, idt_base) = idt_pointer();
    // The host stack's top slot holds the RunState pointer for the stub.
    let host_rsp = pc.stack_top() - 16;
    let run: *mut RunState = &raw mut pc.misc.run;
    // SAFETY: `host_rsp` is inside this CPU's host stack.
    unsafe { (host_rsp as *mut u64).write_volatile(run as u64) };
    let host = HostState {
        cr0: host_cr0,
        cr3: core.host_cr3,
        cr4: host_cr4,
        rsp: host_rsp,
        rip: vmx_exit_stub as *const () as u64,
        cs: SEL_CODE,
        ds: SEL_DATA,
        tr: SEL_TSS,
        tr_base: PerCpu::pa_of(&pc.misc.tss),
        gdtr_base: PerCpu::pa_of(&pc.misc.gdt),
        idtr_base: idt_base,
        efer,
        pat,
    };
    let image = build(&capture, &host, &controls, caps.cr0_fixed0, caps.cr4_fixed0);
    let violations = check(&image, &caps);
    if !violations.is_empty() {
        for v in &violations {
            log::error!(
                "cpu {idx}: VMCS check failed: {} ({:#06x}) = {:#x}: {}",
                v.field.name(),
                v.field.0,
                image.get(v.field),
                v.rule
            );
        }
        off(vmcs_pa, guest_cr4, capture.rflags);
        return Err(CoreError::ENTRY_FAILED);
    }
    for (f, v) in image.iter() {
        // SAFETY: the current VMCS is this CPU's and the image passed the
        // entry checks.
        if unsafe { vmwrite(f, v) }.is_err() {
            log::error!(
                "cpu {idx}: VMWRITE {} ({:#06x}) = {v:#x} failed",
                f.name(),
                f.0
            );
            off(vmcs_pa, guest_cr4, capture.rflags);
            return Err(CoreError::ENTRY_FAILED);
        }
    }
    // SAFETY: `run` is this CPU's run state.
    let r = unsafe { &mut *run };
    vcpu::init_run(r, cpu, vmcs_pa, 0);

    vcpu::went_online(core, idx);
    log::info!("cpu {idx} (APIC {}): entering guest mode", slot.apic_id);
    slot.vmx_live.store(true, Ordering::SeqCst);
    // SAFETY: the VMCS is complete and checked; on success the guest
    // resumes in the loader and this call never returns.
    let failed = unsafe { vmx_launch() };
    let err = vmread(Field::VM_INSTRUCTION_ERROR);
    slot.vmx_live.store(false, Ordering::SeqCst);
    log::error!("cpu {idx}: VMLAUNCH failed ({failed}), VM-instruction error {err}");
    vcpu::went_offline(core, idx);
    off(vmcs_pa, guest_cr4, capture.rflags);
    let _ = VmFail::Valid;
    Err(CoreError::ENTRY_FAILED)
}

/// A TSS descriptor as loaded in TR: type busy (TR always holds a busy TSS).
fn busy(mut s: Seg) -> Seg {
    s.ar |= 0x2;
    s
}
