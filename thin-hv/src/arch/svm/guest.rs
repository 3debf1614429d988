//! [`GuestCpu`] over a VMCB and the saved GPRs.
use crate::arch::percpu::GuestRegs;
use crate::guest::{CpuMode, GpFault, Gpr, GuestCpu, PagingRegs, SegReg};
use crate::nmi::NmiTracker;
use crate::svm::vmcb::{EFER_SVME, Vmcb, event};

const CR0_PE: u64 = 1;
const RFLAGS_RF: u64 = 1 << 16;
/// `int_state` bit 0: the guest is in an interrupt shadow (STI, MOV SS).
const INTERRUPT_SHADOW: u64 = 1;
/// `virt_ext` bit 0: LBR virtualization (the VMCB holds the guest's
/// DEBUGCTL only then).
const LBR_VIRT: u64 = 1;
const EFER_LMA: u64 = 1 << 10;
/// VMCB segment attribute bits (packed form): L and D/B.
const ATTR_L: u16 = 1 << 9;
const ATTR_DB: u16 = 1 << 10;

/// A stopped SVM guest.
pub struct SvmGuest<'a> {
    /// Its control block.
    pub vmcb: &'a mut Vmcb,
    /// Its other registers.
    pub regs: &'a mut GuestRegs,
    /// The processor saved the next RIP for this exit (NRIP save, and an
    /// instruction intercept).
    pub next_rip_valid: bool,
    /// Its NMIs: an NMI for it is injected only once it can take one
    /// (`crate::nmi`), never straight into EVENTINJ.
    pub nmi: &'a mut NmiTracker,
}

impl GuestCpu for SvmGuest<'_> {
    fn gpr(&self, r: Gpr) -> u64 {
        match r {
            Gpr::Rax => self.vmcb.save.rax,
            Gpr::Rsp => self.vmcb.save.rsp,
            _ => self.regs[r as usize],
        }
    }

    fn set_gpr(&mut self, r: Gpr, value: u64) {
        match r {
            Gpr::Rax => self.vmcb.save.rax = value,
            Gpr::Rsp => self.vmcb.save.rsp = value,
            _ => self.regs[r as usize] = value,
        }
    }

    fn rip(&self) -> u64 {
        self.vmcb.save.rip
    }

    fn set_rip(&mut self, rip: u64) {
        self.vmcb.save.rip = rip;
    }

    fn cpl(&self) -> u8 {
        self.vmcb.save.cpl
    }

    fn next_rip_hint(&self) -> Option<u64> {
        (self.next_rip_valid && self.vmcb.control.next_rip != 0)
            .then_some(self.vmcb.control.next_rip)
    }

    fn mode(&self) -> CpuMode {
        let s = &self.vmcb.save;
        if s.cr0 & CR0_PE == 0 {
            CpuMode::Bits16
        } else if s.efer & EFER_LMA != 0 && s.cs.attrib & ATTR_L != 0 {
            CpuMode::Bits64
        } else if s.cs.attrib & ATTR_DB != 0 {
            CpuMode::Bits32
        } else {
            CpuMode::Bits16
        }
    }

    fn cs_base(&self) -> u64 {
        self.vmcb.save.cs.base
    }

    fn segment_base(&self, seg: SegReg) -> u64 {
        let s = &self.vmcb.save;
        match seg {
            SegReg::Es => s.es.base,
            SegReg::Cs => s.cs.base,
            SegReg::Ss => s.ss.base,
            SegReg::Ds => s.ds.base,
            SegReg::Fs => s.fs.base,
            SegReg::Gs => s.gs.base,
        }
    }

    fn paging(&self) -> PagingRegs {
        let s = &self.vmcb.save;
        PagingRegs {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer & !EFER_SVME,
        }
    }

    fn guest_efer(&self) -> u64 {
        self.vmcb.save.efer & !EFER_SVME
    }

    fn set_guest_efer(&mut self, value: u64) {
        // VMRUN requires EFER.SVME in the guest state; the guest never sees it.
        self.vmcb.save.efer = value | EFER_SVME;
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.vmcb.control.event_inj = event::exception(vector, error_code);
    }

    fn inject_nmi(&mut self) {
        // Owed to the guest; `nmi::svm::before_entry` injects it when the
        // guest is not blocking NMIs and nothing else is being injected.
        if !self.nmi.arrived() {
            log::trace!("NMI for a guest that has one latched already: lost, as on the processor");
        }
    }

    fn set_guest_pat(&mut self, value: u64) {
        self.vmcb.save.g_pat = value;
    }

    fn write_cr(&mut self, _cr: u8, _value: u64) -> Result<(), GpFault> {
        // The SVM backend intercepts no CR writes.
        Err(GpFault)
    }

    fn read_cr(&self, _cr: u8) -> Option<u64> {
        // Nor CR reads.
        None
    }

    fn rflags(&self) -> u64 {
        self.vmcb.save.rflags
    }

    fn debugctl(&self) -> u64 {
        if self.vmcb.control.virt_ext & LBR_VIRT != 0 {
            self.vmcb.save.dbgctl
        } else {
            // Without LBR virtualization the guest's DEBUGCTL is live in the
            // MSR; its BTF is not consulted (see docs/security.md).
            0
        }
    }

    fn dr7(&self) -> u64 {
        self.vmcb.save.dr7
    }

    fn breakpoint_address(&self, n: u8) -> u64 {
        // DR0–DR3 are not switched by VMRUN/#VMEXIT (APM Vol. 2 §15.5.1,
        // §15.6): the guest's values are in the registers.
        crate::arch::vmx::guest::read_breakpoint(n)
    }

    fn complete_instruction(&mut self, dr6: u64) {
        self.vmcb.control.int_state &= !INTERRUPT_SHADOW;
        self.vmcb.save.rflags &= !RFLAGS_RF;
        if dr6 != 0 && self.vmcb.control.event_inj & event::VALID == 0 {
            // A #DB trap after the instruction: DR6 comes from the VMCB on
            // VMRUN (APM Vol. 2 §15.5.1), and an injected exception is taken
            // before the guest's next instruction (§15.20).
            self.vmcb.save.dr6 |= dr6;
            self.vmcb.control.event_inj = event::exception(crate::guest::vector::DB, None);
        }
    }
}
