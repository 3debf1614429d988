//! [`GuestCpu`] over the current VMCS and the saved GPRs.
use super::instr::{invvpid_all, vmread, vmwrite};
use crate::arch::percpu::GuestRegs;
use crate::guest::{CpuMode, GpFault, Gpr, GuestCpu, PagingRegs, SegReg};
use crate::vmx::controls::{entry, proc2};
use crate::vmx::cr::{CrRules, write_cr0, write_cr3, write_cr4};
use crate::vmx::fields::Field;
use crate::vmx::state::Seg;
use crate::vmx::task_switch::TaskState;

const CR0_PE: u64 = 1;
const CR0_TS: u64 = 1 << 3;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RF: u64 = 1 << 16;
/// Interruptibility state: blocking by STI (bit 0), by MOV SS (bit 1), by
/// NMI (bit 3; virtual-NMI blocking with virtual NMIs) (SDM Vol. 3C
/// Table 25-3).
const BLOCKING_STI_MOVSS: u64 = 0b11;
const BLOCKING_NMI: u64 = 1 << 3;
/// Pending debug exceptions: B0–B3, enabled breakpoint (bit 12), BS (bit
/// 14) (SDM Vol. 3C Table 25-4).
const PENDING_B0_3: u64 = 0xf;
const PENDING_ENABLED_BP: u64 = 1 << 12;
const PENDING_BS: u64 = 1 << 14;
/// Interruption type NMI in an interruption-information field.
const INTR_TYPE_MASK: u32 = 7 << 8;
const INTR_TYPE_NMI: u32 = 2 << 8;

/// Reads DR0–DR3. On VMX the guest's breakpoint addresses stay in the
/// registers across exits (only DR7 is switched, SDM Vol. 3C §28.5.1), and
/// the host never changes them.
pub(crate) fn read_breakpoint(n: u8) -> u64 {
    let v: u64;
    // SAFETY: reading a debug register at CPL 0 has no side effects.
    unsafe {
        match n & 3 {
            0 => {
                core::arch::asm!("mov {}, dr0", out(reg) v, options(nomem, nostack, preserves_flags));
            }
            1 => {
                core::arch::asm!("mov {}, dr1", out(reg) v, options(nomem, nostack, preserves_flags));
            }
            2 => {
                core::arch::asm!("mov {}, dr2", out(reg) v, options(nomem, nostack, preserves_flags));
            }
            _ => {
                core::arch::asm!("mov {}, dr3", out(reg) v, options(nomem, nostack, preserves_flags));
            }
        }
    }
    v
}

/// The guest's view of CR0 or CR4: owned bits from the read shadow.
fn guest_view(actual: Field, mask: Field, shadow: Field) -> u64 {
    let m = vmread(mask);
    (vmread(actual) & !m) | (vmread(shadow) & m)
}

fn read_seg(i: usize) -> Seg {
    let [sel, base, limit, ar] = Field::guest_segment(i);
    #[allow(clippy::cast_possible_truncation, reason = "16- and 32-bit fields")]
    Seg {
        selector: vmread(sel) as u16,
        base: vmread(base),
        limit: vmread(limit) as u32,
        ar: vmread(ar) as u32,
    }
}

fn write_seg(i: usize, s: &Seg) {
    let [sel, base, limit, ar] = Field::guest_segment(i);
    write(sel, u64::from(s.selector));
    write(base, s.base);
    write(limit, u64::from(s.limit));
    write(ar, u64::from(s.ar));
}

/// An emulated CR3 load does not flush the guest's TLB by itself.
fn flush_vpid() {
    if vmread(Field::PROC_BASED_CONTROLS2) & u64::from(proc2::VPID) != 0 {
        // SAFETY: VMX root operation with VPID in use.
        unsafe { invvpid_all() };
    }
}
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

    fn segment_base(&self, seg: SegReg) -> u64 {
        vmread(match seg {
            SegReg::Es => Field::GUEST_ES_BASE,
            SegReg::Cs => Field::GUEST_CS_BASE,
            SegReg::Ss => Field::GUEST_SS_BASE,
            SegReg::Ds => Field::GUEST_DS_BASE,
            SegReg::Fs => Field::GUEST_FS_BASE,
            SegReg::Gs => Field::GUEST_GS_BASE,
        })
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

    fn set_guest_pat(&mut self, value: u64) {
        // VM entry loads IA32_PAT from this field ("load IA32_PAT").
        write(Field::GUEST_IA32_PAT, value);
    }

    fn write_cr(&mut self, cr: u8, value: u64) -> Result<(), GpFault> {
        let efer = vmread(Field::GUEST_IA32_EFER);
        if cr == 3 {
            // Only where the processor forces CR3-load exiting (no TRUE
            // controls). With PAE paging the PDPTE fields are not reloaded
            // here (see docs/security.md).
            let cr4 = vmread(Field::GUEST_CR4);
            write(Field::GUEST_CR3, write_cr3(value, efer, cr4, &self.rules)?);
            flush_vpid();
            return Ok(());
        }
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

    fn read_cr(&self, cr: u8) -> Option<u64> {
        match cr {
            0 => Some(guest_view(
                Field::GUEST_CR0,
                Field::CR0_GUEST_HOST_MASK,
                Field::CR0_READ_SHADOW,
            )),
            3 => Some(vmread(Field::GUEST_CR3)),
            4 => Some(guest_view(
                Field::GUEST_CR4,
                Field::CR4_GUEST_HOST_MASK,
                Field::CR4_READ_SHADOW,
            )),
            _ => None,
        }
    }

    fn rflags(&self) -> u64 {
        vmread(Field::GUEST_RFLAGS)
    }

    fn debugctl(&self) -> u64 {
        vmread(Field::GUEST_IA32_DEBUGCTL)
    }

    fn dr7(&self) -> u64 {
        vmread(Field::GUEST_DR7)
    }

    fn breakpoint_address(&self, n: u8) -> u64 {
        read_breakpoint(n)
    }

    fn complete_instruction(&mut self, dr6: u64) {
        // The STI / MOV SS shadow covered the instruction just completed.
        let intr = vmread(Field::GUEST_INTERRUPTIBILITY);
        if intr & BLOCKING_STI_MOVSS != 0 {
            write(Field::GUEST_INTERRUPTIBILITY, intr & !BLOCKING_STI_MOVSS);
        }
        let rflags = vmread(Field::GUEST_RFLAGS);
        if rflags & RFLAGS_RF != 0 {
            write(Field::GUEST_RFLAGS, rflags & !RFLAGS_RF);
        }
        if dr6 != 0 {
            // Delivered by the processor right after VM entry, with the
            // priority of a trap on the previous instruction, DR6 updated
            // from these bits (SDM Vol. 3C §27.7.3; field in §25.4.2).
            let mut pending = vmread(Field::GUEST_PENDING_DEBUG);
            pending |= dr6 & (PENDING_BS | PENDING_B0_3);
            if dr6 & PENDING_B0_3 != 0 {
                pending |= PENDING_ENABLED_BP;
            }
            write(Field::GUEST_PENDING_DEBUG, pending);
        }
    }

    fn task_state(&self) -> Option<TaskState> {
        let mut st = TaskState {
            rip: self.rip(),
            rflags: vmread(Field::GUEST_RFLAGS),
            segs: core::array::from_fn(read_seg),
            ldtr: read_seg(6),
            tr: read_seg(7),
            gdtr: (
                vmread(Field::GUEST_GDTR_BASE),
                u32::try_from(vmread(Field::GUEST_GDTR_LIMIT) & 0xffff).unwrap_or(0),
            ),
            cr0: self.read_cr(0).unwrap_or_default(),
            cr3: vmread(Field::GUEST_CR3),
            cr4: self.read_cr(4).unwrap_or_default(),
            efer: vmread(Field::GUEST_IA32_EFER),
            dr7: vmread(Field::GUEST_DR7),
            ..TaskState::default()
        };
        for (i, r) in st.gprs.iter_mut().enumerate() {
            *r = self.gpr(Gpr::ALL[i]);
        }
        Some(st)
    }

    fn set_task_state(&mut self, s: &TaskState, delivered: u32) {
        for (i, seg) in s.segs.iter().enumerate() {
            write_seg(i, seg);
        }
        write_seg(6, &s.ldtr);
        write_seg(7, &s.tr);
        for (i, r) in s.gprs.iter().enumerate() {
            self.set_gpr(Gpr::ALL[i], *r);
        }
        write(Field::GUEST_RIP, s.rip);
        write(Field::GUEST_RFLAGS, s.rflags);
        write(Field::GUEST_DR7, s.dr7);
        if s.cr0 & CR0_TS != 0 {
            // CR0.TS is the guest's (not owned): set it in both.
            write(Field::GUEST_CR0, vmread(Field::GUEST_CR0) | CR0_TS);
            write(
                Field::CR0_READ_SHADOW,
                vmread(Field::CR0_READ_SHADOW) | CR0_TS,
            );
        }
        if let Some(p) = s.pdptes {
            for (f, v) in [
                Field::GUEST_PDPTE0,
                Field::GUEST_PDPTE1,
                Field::GUEST_PDPTE2,
                Field::GUEST_PDPTE3,
            ]
            .into_iter()
            .zip(p)
            {
                write(f, v);
            }
        }
        if s.cr3 != vmread(Field::GUEST_CR3) {
            write(Field::GUEST_CR3, s.cr3);
            flush_vpid();
        }
        let mut intr = vmread(Field::GUEST_INTERRUPTIBILITY) & !BLOCKING_STI_MOVSS;
        if delivered != 0 {
            // The switch was the delivery: nothing to inject again; an NMI
            // delivered blocks NMIs until the new task's IRET.
            write(Field::ENTRY_INTERRUPTION_INFO, 0);
            if delivered & INTR_TYPE_MASK == INTR_TYPE_NMI {
                intr |= BLOCKING_NMI;
            }
        }
        write(Field::GUEST_INTERRUPTIBILITY, intr);
    }
}
