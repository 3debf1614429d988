//! The exit dispatcher: called by the VMRUN loop after every #VMEXIT.
use super::guest::SvmGuest;
use super::world::{LeaveState, svm_leave};
use crate::arch::core_state::{self, Core, percpu};
use crate::arch::env_impl::HwEnv;
use crate::arch::idt::fatal;
use crate::arch::instr::{rdmsr, wrmsr};
use crate::arch::percpu::{GuestRegs, PerCpu, RunState};
use crate::arch::vcpu::{self, Backend as _, NativeState};
use crate::handlers;
use crate::handlers::msr::MSR_VM_CR;
use crate::nmi::NmiTracker;
use crate::nmi::svm as nmi_window;
use crate::svm::exit_code::{self, ExitCode};
use crate::svm::state::{init_state, long_mode_entry, sipi_start};
use crate::svm::vmcb::{EFER_SVME, Vmcb, tlb};
use core::fmt;
use core::sync::atomic::Ordering;
use spin::MutexGuard;
use thinhv_abi::handoff::{CoreError, features};

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
        guest_control: vmcb,
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
    let mut vcpu = SvmVcpu {
        vmcb,
        run,
        nmi: Some(nmi),
        code,
    };
    if ExitCode(code) == ExitCode::INVALID && first {
        // The very first VMRUN failed: give the CPU back to the loader
        // with an error, exactly where it called us.
        log::error!("cpu {cpu}: first VMRUN failed its consistency checks; rolling back");
        vcpu::roll_back(core, cpu, &mut vcpu, Some(CoreError::ENTRY_FAILED.0));
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
        vcpu.before_entry(core, cpu);
        return;
    }
    let (vmcb, run, nmi) = vcpu.parts();
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
        vmcb,
        regs: &mut run.regs,
        next_rip_valid: nrip,
        nmi: &mut *nmi,
    };
    let mut env = HwEnv { core, cpu };
    let handled = handlers::handle(&exit, &mut guest, &mut env);
    nmi_window::after_handlers(nmi, vmcb, seen);
    vcpu::account(core, cpu, &handled);
    vcpu::apply(core, cpu, handled.outcome, &mut vcpu);
}

/// The SVM side of the vCPU seam: this CPU's VMCB, run state and NMI
/// tracker for the length of one exit.
struct SvmVcpu<'a> {
    vmcb: &'a mut Vmcb,
    run: &'a mut RunState,
    /// Held for the whole exit; released before leaving guest mode for
    /// good (so that a later launch can take it).
    nmi: Option<MutexGuard<'static, NmiTracker>>,
    code: u64,
}

impl SvmVcpu<'_> {
    /// The VMCB, the run state and the NMI tracker, borrowed apart (the
    /// tracker is held until `leave`, which never returns).
    fn parts(&mut self) -> (&mut Vmcb, &mut RunState, &mut NmiTracker) {
        let Self { vmcb, run, nmi, .. } = self;
        let nmi = nmi.as_mut().expect("the tracker is held until leaving");
        (vmcb, run, nmi)
    }
}

impl vcpu::Backend for SvmVcpu<'_> {
    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.run.regs
    }

    fn flush_tlb(&mut self, core: &Core) {
        self.vmcb.control.tlb_control = if core.handoff.features & features::FLUSH_BY_ASID != 0 {
            tlb::FLUSH_ASID
        } else {
            tlb::FLUSH_ALL
        };
    }

    /// The CPU waits in host mode for the SIPI (APM §15.21, Table 14-1).
    fn enter_init(&mut self, _core: &Core, _cpu: usize) -> bool {
        init_state(&mut self.vmcb.save);
        self.vmcb.control.event_inj = 0;
        // No NMI owed or blocked survives INIT.
        self.parts().2.reset();
        nmi_window::clear(self.vmcb);
        true
    }

    fn sipi_arrived(&mut self, core: &Core, cpu: usize) -> u32 {
        // The kick that delivered this INIT may have arrived after the exit
        // that took it (the sender posts, then sends the NMI), or while this
        // CPU already waited here: it is still pending and must not reach
        // the restarted guest as an NMI. A SIPI comes after the INIT's kick,
        // so by now the kick has normally arrived; the caller settles the
        // mailbox's count of wake-ups with what was taken.
        super::nmi::consume_pending_nmi(core, cpu, 1)
    }

    fn start_at(&mut self, core: &Core, _cpu: usize, vector: u8) {
        sipi_start(&mut self.vmcb.save, vector);
        debug_assert!(self.vmcb.save.efer & EFER_SVME != 0);
        self.flush_tlb(core);
    }

    fn enter_partition(&mut self, _core: &Core, _cpu: usize, slat_root: u64, iopm_pa: u64) {
        let c = &mut self.vmcb.control;
        c.n_cr3 = slat_root;
        c.iopm_base_pa = iopm_pa;
        c.intercept_misc1 |= crate::svm::vmcb::misc1::IOIO_PROT;
        // Another address space under the same ASID: nothing cached of
        // the old one may survive (APM §15.16.1), nor any cached VMCB field.
        c.tlb_control = tlb::FLUSH_ALL;
        c.clean_bits = 0;
    }

    fn start_long(&mut self, _core: &Core, _cpu: usize, e: &vcpu::LongEntry) -> bool {
        long_mode_entry(&mut self.vmcb.save, e.rip, e.rsp, e.cr3, e.gdt);
        self.run.regs = [0; 16];
        self.run.regs[6] = e.rsi;
        true
    }

    fn leave(&mut self, _core: &Core, _cpu: usize, rax: Option<u64>) -> ! {
        if let Some(rax) = rax {
            self.vmcb.save.rax = rax;
        }
        // `leave` never returns: release the tracker for a later launch.
        drop(self.nmi.take());
        leave(self.vmcb, self.run)
    }

    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit {} {:#x}, info {:#x} {:#x}, rip {:#x}",
            exit_code::name(self.code),
            self.code,
            self.vmcb.control.exit_info1,
            self.vmcb.control.exit_info2,
            self.vmcb.save.rip
        )
    }

    fn before_entry(&mut self, _core: &Core, _cpu: usize) {
        let (vmcb, _, nmi) = self.parts();
        nmi_window::before_entry(nmi, vmcb);
    }
}

/// Restores the guest's state natively and continues there.
fn leave(vmcb: &Vmcb, run: &RunState) -> ! {
    let s = &vmcb.save;
    let st = LeaveState {
        native: NativeState {
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
        },
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
