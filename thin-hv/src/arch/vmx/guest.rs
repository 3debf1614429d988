//! [`GuestCpu`] over the current VMCS and the saved GPRs.
use super::instr::{invvpid_all, vmread, vmwrite};
use crate::arch::percpu::GuestRegs;
use crate::guest::{CpuMode, GpFault, Gpr, GuestCpu, PagingRegs};
use crate::vmx::controls::{entry, proc2};
use crate::vmx::cr::{CrRules, write_cr0, write_cr4};
use crate::vmx::fields::Field;

const CR0_PE: u64 = 1;
const EFER_LMA: u64 = 1 << 10;
const AR_L: u64 = 1 << 13;
const AR_DB: u64 = 1 << 14;

/// A stopped VMX guest (the current VMCS is its).
pub struct VmxGuest<'a> {
    /// Its registers.
    pub regs: &'a mut GuestRegs,
    /// Length of the exiting instruction, when the exit reports one.
    pub insn_len: Option<u64>,
    /// CR rules of this processor.
    pub rules: CrRules,
    /// Set when an NMI is to reach the guest (injected before the next
    /// entry, or when its NMI window opens).
    pub nmi_pending: &'a mut u64,
}

fn write(f: Field, v: u64) {
    // SAFETY: the current VMCS is this CPU's (the exit handler runs on the
    // CPU that exited); the fields written are guest state the neutral
    // handlers decided on, within the rules they checked.
    let r = unsafe { vmwrite(f, v) };
    if r.is_err() {
        log::error!("VMWRITE {} failed", f.name());
    }
}

impl GuestCpu for VmxGuest<'_> {
    fn gpr(&self, r: Gpr) -> u64 {
        match r {
            Gpr::Rsp => vmread(Field::GUEST_RSP),
            _ => self.regs[r as usize],
        }
    }

    fn set_gpr(&mut self, r: Gpr, value: u64) {
        match r {
            Gpr::Rsp => write(Field::GUEST_RSP, value),
            _ => self.regs[r as usize] = value,
        }
    }

    fn rip(&self) -> u64 {
        vmread(Field::GUEST_RIP)
    }

    fn set_rip(&mut self, rip: u64) {
        write(Field::GUEST_RIP, rip);
    }

    fn cpl(&self) -> u8 {
        ((vmread(Field::GUEST_SS_AR) >> 5) & 3) as u8
    }

    fn next_rip_hint(&self) -> Option<u64> {
        self.insn_len.map(|n| self.rip().wrapping_add(n))
    }

    fn mode(&self) -> CpuMode {
        let ar = vmread(Field::GUEST_CS_AR);
        if vmread(Field::GUEST_CR0) & CR0_PE == 0 {
            CpuMode::Bits16
        } else if vmread(Field::GUEST_IA32_EFER) & EFER_LMA != 0 && ar & AR_L != 0 {
            CpuMode::Bits64
        } else if ar & AR_DB != 0 {
            CpuMode::Bits32
        } else {
            CpuMode::Bits16
        }
    }

    fn cs_base(&self) -> u64 {
        vmread(Field::GUEST_CS_BASE)
    }

    fn paging(&self) -> PagingRegs {
        PagingRegs {
            cr0: vmread(Field::GUEST_CR0),
            cr3: vmread(Field::GUEST_CR3),
            cr4: vmread(Field::GUEST_CR4),
            efer: vmread(Field::GUEST_IA32_EFER),
        }
    }

    fn guest_efer(&self) -> u64 {
        vmread(Field::GUEST_IA32_EFER)
    }

    fn set_guest_efer(&mut self, value: u64) {
        write(Field::GUEST_IA32_EFER, value);
        let ent = vmread(Field::ENTRY_CONTROLS) & !u64::from(entry::IA32E_GUEST);
        let lma = if value & EFER_LMA != 0 {
            u64::from(entry::IA32E_GUEST)
        } else {
            0
        };
        write(Field::ENTRY_CONTROLS, ent | lma);
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let mut info = u64::from(vector) | (3 << 8) | (1 << 31);
        if let Some(code) = error_code {
            info |= 1 << 11;
            write(Field::ENTRY_EXCEPTION_ERROR_CODE, u64::from(code));
        }
        write(Field::ENTRY_INTERRUPTION_INFO, info);
    }

    fn inject_nmi(&mut self) {
        *self.nmi_pending = 1;
    }

    fn write_cr(&mut self, cr: u8, value: u64) -> Result<(), GpFault> {
        let efer = vmread(Field::GUEST_IA32_EFER);
        let update = match cr {
            0 => write_cr0(
                value,
                vmread(Field::CR0_READ_SHADOW),
                efer,
                vmread(Field::GUEST_CR4),
                &self.rules,
            )?,
            4 => write_cr4(value, efer, vmread(Field::GUEST_CR3), &self.rules)?,
            _ => return Err(GpFault),
        };
        let (real, shadow) = if cr == 0 {
            (Field::GUEST_CR0, Field::CR0_READ_SHADOW)
        } else {
            (Field::GUEST_CR4, Field::CR4_READ_SHADOW)
        };
        write(real, update.actual);
        write(shadow, update.shadow);
        if let Some(e) = update.efer {
            self.set_guest_efer(e);
        }
        if vmread(Field::PROC_BASED_CONTROLS2) & u64::from(proc2::VPID) != 0 {
            // An emulated CR write does not flush the guest's TLB by itself.
            // SAFETY: VMX root operation with VPID in use.
            unsafe { invvpid_all() };
        }
        Ok(())
    }
}
