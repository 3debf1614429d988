//! The exit dispatcher: called by the VMRUN loop after every #VMEXIT.
use super::guest::SvmGuest;
use super::world::{LeaveState, svm_leave};
use crate::arch::core_state::{self, Core, percpu};
use crate::arch::env_impl::HwEnv;
use crate::arch::idt::fatal;
use crate::arch::instr::{cpuid, rdmsr, reset_platform, wrmsr};
use crate::arch::percpu::PerCpu;
use crate::arch::percpu::RunState;
use crate::handlers::msr::MSR_VM_CR;
use crate::handlers::{self, Outcome};
use crate::nmi::NmiTracker;
use crate::nmi::svm as nmi_window;
use crate::svm::exit_code::{self, ExitCode};
use crate::svm::state::{init_state, sipi_start};
use crate::svm::vmcb::{EFER_SVME, Vmcb, tlb};
use core::sync::atomic::Ordering;
use thinhv_abi::exit::ExitReason;
use thinhv_abi::handoff::{CoreError, features};
use thinhv_abi::status::CpuState;

/// Exits for which NRIP save reports the next instruction (APM §15.7.1:
/// instruction intercepts).
fn nrip_applies(code: u64) -> bool {
    matches!(
        ExitCode(code),
        ExitCode::CPUID | ExitCode::VMMCALL | ExitCode::MSR
    )
}

/// Handles one #VMEXIT on the current CPU.
///
/// # Safety
/// Only the VMRUN loop calls it, on the host stack, with this CPU's own
/// `RunState` (inside its `PerCpu`), which nothing else references.
pub unsafe extern "sysv64" fn svm_exit(run: *mut RunState) {
    let Some(core) = core_state::get() else {
        fatal(format_args!("exit before initialization"))
    };
    // SAFETY: the VMRUN loop passes this CPU's `RunState`, which lives in
    // its `PerCpu`; `cpu` was written once, at launch.
    let cpu = unsafe { (*run).cpu } as usize;
    let _cost = crate::arch::exit_timer::ExitTimer::start(&core.hv.cpus()[cpu]);
    // SAFETY: this CPU's own `PerCpu`, which only this CPU touches (the
    // host NMI handler uses the shared `CpuSlot`, never this memory). From
    // here on `run` is reached only through this one `&mut`, split into
    // disjoint fields, so no two live `&mut` cover the same data.
    let pc = unsafe { &mut *percpu(core, cpu) };
    let PerCpu {
        guest_vmcb: vmcb,
        misc,
        ..
    } = pc;
    let run = &mut misc.run;
    let first = run.exits == 0;
    run.exits += 1;
    vmcb.control.tlb_control = tlb::DO_NOTHING;
    // An event the exit interrupted is re-delivered unless a handler
    // replaces it (APM §15.7.2); the guest's NMI state follows the exit
    // (a step over its IRET undone, the exits the NMI window asked for
    // recognized: `crate::nmi`). Only this CPU locks its tracker.
    let mut nmi = super::nmi::of(cpu).tracker.lock();
    let seen = nmi_window::on_exit(&mut nmi, vmcb);
    if crate::arch::idt::REDIRECTED_INITS.load(Ordering::Relaxed) != 0 {
        let n = crate::arch::idt::REDIRECTED_INITS.swap(0, Ordering::Relaxed);
        log::warn!("cpu {cpu}: {n} INIT(s) redirected to #SX in host mode were dropped");
    }

    let code = vmcb.control.exit_code;
    if ExitCode(code) == ExitCode::INVALID && first {
        // The very first VMRUN failed: give the CPU back to the loader
        // with an error, exactly where it called us.
        log::error!("cpu {cpu}: first VMRUN failed its consistency checks; rolling back");
        core.hv.cpus()[cpu].set_state(CpuState::OFFLINE);
        core.status.set_cpu_state(cpu, CpuState::OFFLINE);
        let n = core.hv.cpus_virtualized.fetch_sub(1, Ordering::SeqCst) - 1;
        core.status.set_virtualized(n);
        vmcb.save.rax = CoreError::ENTRY_FAILED.0;
        // `leave` never returns: release the tracker for a later launch.
        drop(nmi);
        leave(vmcb, run);
    }
    if ExitCode(code) == ExitCode::NMI
        && super::nmi::consume_pending_nmi(core, cpu, super::nmi::SINK_TRIES) == 0
    {
        // Without GIF ever set in host mode (`super::nmi`).
        super::nmi::miss(cpu, "the intercepted NMI was not taken");
    }
    if seen.owned {
        // The NMI window's own exit (IRET, interrupt window, the step's
        // #DB or a fault it reflected): nothing for the handlers.
        nmi_window::before_entry(&mut nmi, vmcb);
        return;
    }
    let exit = exit_code::decode(
        code,
        vmcb.control.exit_info1,
        vmcb.control.exit_info2,
        run.regs[1],
        vmcb.save.rax,
        run.regs[2],
    );
    let nrip = core.handoff.features & features::NRIP_SAVE != 0 && nrip_applies(code);
    let mut guest = SvmGuest {
        vmcb: &mut *vmcb,
        regs: &mut run.regs,
        next_rip_valid: nrip,
        nmi: &mut nmi,
    };
    let mut env = HwEnv { core, cpu };
    let handled = handlers::handle(&exit, &mut guest, &mut env);
    nmi_window::after_handlers(&mut nmi, vmcb, seen);
    core.status.count(cpu, handled.reason);
    if handled.reason == ExitReason::PROTECTED_ACCESS {
        core.status
            .set_blocked_writes(core.hv.blocked_writes.load(Ordering::Relaxed));
    }
    match handled.outcome {
        Outcome::Resume => {}
        Outcome::ResumeFlushTlb => vmcb_flush(core, vmcb),
        Outcome::WaitForSipi => wait_for_sipi(core, cpu, vmcb, run, &mut nmi),
        Outcome::Devirtualize => {
            log::info!("cpu {cpu}: leaving guest mode (roll-back)");
            core.hv.cpus()[cpu].set_state(CpuState::OFFLINE);
            core.status.set_cpu_state(cpu, CpuState::OFFLINE);
            let n = core.hv.cpus_virtualized.fetch_sub(1, Ordering::SeqCst) - 1;
            core.status.set_virtualized(n);
            drop(nmi);
            leave(vmcb, run);
        }
        Outcome::StartAt(_) => fatal(format_args!("SIPI exit on SVM")),
        Outcome::HostFaultTest => {
            // SAFETY: UD2 only raises #UD, which the host IDT reports before
            // stopping or resetting per `on_fatal`; this is the test of it.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
        }
        Outcome::Reset => {
            log::error!("resetting the platform after a guest triple fault");
            reset_platform();
        }
        Outcome::Fatal(why) => fatal(format_args!(
            "{why} (exit {} {code:#x}, info {:#x} {:#x}, rip {:#x})",
            exit_code::name(code),
            vmcb.control.exit_info1,
            vmcb.control.exit_info2,
            vmcb.save.rip
        )),
    }
    nmi_window::before_entry(&mut nmi, vmcb);
}

fn vmcb_flush(core: &Core, vmcb: &mut crate::svm::vmcb::Vmcb) {
    vmcb.control.tlb_control = if core.handoff.features & features::FLUSH_BY_ASID != 0 {
        tlb::FLUSH_ASID
    } else {
        tlb::FLUSH_ALL
    };
}

/// INIT: the CPU waits in host mode for a SIPI, then starts in real mode
/// at its vector (APM §15.21, Table 14-1).
fn wait_for_sipi(
    core: &Core,
    cpu: usize,
    vmcb: &mut Vmcb,
    run: &mut RunState,
    nmi: &mut NmiTracker,
) {
    let slot = &core.hv.cpus()[cpu];
    slot.set_state(CpuState::WAIT_FOR_SIPI);
    core.status.set_cpu_state(cpu, CpuState::WAIT_FOR_SIPI);
    init_state(&mut vmcb.save);
    vmcb.control.event_inj = 0;
    // No NMI owed or blocked survives INIT.
    nmi.reset();
    nmi_window::clear(vmcb);
    run.regs = [0; 16];
    // RDX after INIT holds the processor signature (CPUID 1 EAX).
    run.regs[2] = u64::from(cpuid(1, 0)[0]);
    log::debug!("cpu {cpu}: INIT, waiting for SIPI");
    let vector = loop {
        // A further INIT while waiting changes nothing.
        let _ = slot.mailbox.take_init();
        if let Some(v) = slot.mailbox.take_sipi() {
            break v;
        }
        core::hint::spin_loop();
    };
    // The kick that delivered this INIT may have arrived after the exit
    // that took it (the sender posts, then sends the NMI): it is still
    // pending here and must not reach the restarted guest as an NMI. A
    // SIPI comes after the INIT's kick, so by now the kick has arrived.
    let _ = super::nmi::consume_pending_nmi(core, cpu, 1);
    sipi_start(&mut vmcb.save, vector);
    debug_assert!(vmcb.save.efer & EFER_SVME != 0);
    vmcb_flush(core, vmcb);
    slot.set_state(CpuState::RUNNING);
    core.status.set_cpu_state(cpu, CpuState::RUNNING);
    core.status.count(cpu, ExitReason::SIPI);
    log::debug!(
        "cpu {cpu}: SIPI {vector:#x}, starting at {:#x}",
        u64::from(vector) << 12
    );
}

/// Restores the guest's state natively and continues there.
fn leave(vmcb: &Vmcb, run: &RunState) -> ! {
    let s = &vmcb.save;
    let st = LeaveState {
        cr0: s.cr0,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer & !EFER_SVME,
        gdt_limit: u64::from(s.gdtr.limit),
        gdt_base: s.gdtr.base,
        idt_limit: u64::from(s.idtr.limit),
        idt_base: s.idtr.base,
        cs: u64::from(s.cs.selector),
        ss: u64::from(s.ss.selector),
        ds: u64::from(s.ds.selector),
        es: u64::from(s.es.selector),
        rip: s.rip,
        rsp: s.rsp,
        rflags: s.rflags,
        rax: s.rax,
        cr2: s.cr2,
        pat: s.g_pat,
    };
    // INIT redirection was thinhv's: natively the firmware expects INIT to
    // reset the CPU (its MP services use it).
    // SAFETY: VM_CR exists on every processor with SVM; R_INIT only
    // changes how INIT is taken, and GIF stays clear until `svm_leave`.
    unsafe { wrmsr(MSR_VM_CR, rdmsr(MSR_VM_CR) & !super::launch::VM_CR_R_INIT) };
    // SAFETY: only reached before the loader seals the hypervisor, while
    // the firmware's identity-mapped page tables (which map this code and
    // stack) are the guest's.
    unsafe { svm_leave(run, &raw const st) }
}
