//! VMX basic exit reasons (SDM Vol. 3C Appendix C) and their translation
//! into the neutral [`Exit`].
use super::cr::CrAccess;
use crate::exit::Exit;

/// A basic exit reason. A newtype: processors add reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExitReason(pub u16);

#[allow(missing_docs)]
impl ExitReason {
    pub const EXCEPTION_NMI: Self = Self(0);
    pub const EXTERNAL_INTERRUPT: Self = Self(1);
    pub const TRIPLE_FAULT: Self = Self(2);
    pub const INIT: Self = Self(3);
    pub const SIPI: Self = Self(4);
    pub const NMI_WINDOW: Self = Self(8);
    pub const TASK_SWITCH: Self = Self(9);
    pub const CPUID: Self = Self(10);
    pub const GETSEC: Self = Self(11);
    pub const HLT: Self = Self(12);
    pub const INVD: Self = Self(13);
    pub const VMCALL: Self = Self(18);
    pub const VMCLEAR: Self = Self(19);
    pub const VMLAUNCH: Self = Self(20);
    pub const VMPTRLD: Self = Self(21);
    pub const VMPTRST: Self = Self(22);
    pub const VMREAD: Self = Self(23);
    pub const VMRESUME: Self = Self(24);
    pub const VMWRITE: Self = Self(25);
    pub const VMXOFF: Self = Self(26);
    pub const VMXON: Self = Self(27);
    pub const CR_ACCESS: Self = Self(28);
    pub const IO: Self = Self(30);
    pub const RDMSR: Self = Self(31);
    pub const WRMSR: Self = Self(32);
    pub const INVALID_GUEST_STATE: Self = Self(33);
    pub const MSR_LOADING: Self = Self(34);
    pub const MACHINE_CHECK: Self = Self(41);
    pub const EPT_VIOLATION: Self = Self(48);
    pub const EPT_MISCONFIG: Self = Self(49);
    pub const INVEPT: Self = Self(50);
    pub const INVVPID: Self = Self(53);
    pub const XSETBV: Self = Self(55);
    pub const VMFUNC: Self = Self(59);
    pub const SEAMCALL: Self = Self(76);
    pub const TDCALL: Self = Self(77);

    /// Name for logs.
    pub const fn name(self) -> &'static str {
        match self.0 {
            0 => "exception/NMI",
            1 => "external interrupt",
            2 => "triple fault",
            3 => "INIT",
            4 => "SIPI",
            8 => "NMI window",
            9 => "task switch",
            10 => "CPUID",
            11 => "GETSEC",
            12 => "HLT",
            13 => "INVD",
            18 => "VMCALL",
            19..=27 => "VMX instruction",
            28 => "CR access",
            30 => "I/O",
            31 => "RDMSR",
            32 => "WRMSR",
            33 => "invalid guest state",
            34 => "MSR loading",
            41 => "machine check",
            48 => "EPT violation",
            49 => "EPT misconfiguration",
            50 => "INVEPT",
            53 => "INVVPID",
            55 => "XSETBV",
            59 => "VMFUNC",
            76 => "SEAMCALL",
            77 => "TDCALL",
            _ => "unknown",
        }
    }
}

/// Bit 31 of the exit reason: the VM entry failed.
pub const ENTRY_FAILURE: u32 = 1 << 31;

/// EPT-violation exit qualification bits (Table 28-7).
pub mod ept_qual {
    /// Data read.
    pub const READ: u64 = 1 << 0;
    /// Data write.
    pub const WRITE: u64 = 1 << 1;
    /// Instruction fetch.
    pub const FETCH: u64 = 1 << 2;
    /// The translation allowed read, write or execute (bits 3–5).
    pub const PERMS: u64 = 0x38;
    /// Guest linear address valid.
    pub const LINEAR_VALID: u64 = 1 << 7;
    /// The access was to the final translation (not a guest table walk).
    pub const FINAL: u64 = 1 << 8;
}

/// VM-exit interruption information: valid, and type NMI (§25.9.2).
const INTR_VALID: u32 = 1 << 31;
const INTR_TYPE_NMI: u32 = 2 << 8;
const INTR_TYPE_MASK: u32 = 7 << 8;

/// Translates an exit into the neutral form. `intr_info` is the VM-exit
/// interruption information (exception/NMI exits).
pub fn decode(
    reason: u32,
    qual: u64,
    gpa: u64,
    rcx: u64,
    rax: u64,
    rdx: u64,
    intr_info: u32,
) -> Exit {
    let basic = ExitReason((reason & 0xffff) as u16);
    if reason & ENTRY_FAILURE != 0 {
        return Exit::EntryFailed {
            detail: u64::from(basic.0),
        };
    }
    match basic {
        ExitReason::EXCEPTION_NMI
            if intr_info & (INTR_VALID | INTR_TYPE_MASK) == INTR_VALID | INTR_TYPE_NMI =>
        {
            Exit::Nmi
        }
        ExitReason::TRIPLE_FAULT => Exit::Shutdown,
        ExitReason::INIT => Exit::Init,
        ExitReason::SIPI => Exit::Sipi {
            vector: (qual & 0xff) as u8,
        },
        ExitReason::CPUID => Exit::Cpuid,
        ExitReason::INVD => Exit::Invd,
        ExitReason::VMCALL => Exit::Hypercall,
        // Instructions that exit unconditionally (SDM Vol. 3C §26.1.2) and
        // that a processor without VMX (or outside SEAM, for the TDX pair)
        // answers with #UD.
        ExitReason::GETSEC
        | ExitReason::INVEPT
        | ExitReason::INVVPID
        | ExitReason::VMFUNC
        | ExitReason::SEAMCALL
        | ExitReason::TDCALL
        | ExitReason(19..=27) => Exit::VirtInstruction,
        // Table 28-3: access types 0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW.
        ExitReason::CR_ACCESS => {
            let a = CrAccess::decode(qual);
            match a.kind {
                0 => Exit::CrWrite {
                    cr: a.cr,
                    gpr: a.gpr,
                },
                1 => Exit::CrRead {
                    cr: a.cr,
                    gpr: a.gpr,
                },
                2 => Exit::Clts,
                _ => Exit::Lmsw { source: a.lmsw },
            }
        }
        // Table 28-2: TSS selector in 15:0, source in 31:30. The event a
        // task gate delivers and the instruction length are filled in by
        // the caller (IDT-vectoring information, VM-exit instruction length).
        ExitReason::TASK_SWITCH => Exit::TaskSwitch {
            selector: (qual & 0xffff) as u16,
            source: ((qual >> 30) & 3) as u8,
            event: 0,
            error_code: 0,
            insn_len: 0,
        },
        ExitReason::RDMSR => Exit::MsrRead {
            msr: (rcx & 0xffff_ffff) as u32,
        },
        ExitReason::WRMSR => Exit::MsrWrite {
            msr: (rcx & 0xffff_ffff) as u32,
            value: (rdx << 32) | (rax & 0xffff_ffff),
        },
        ExitReason::EPT_VIOLATION => Exit::NestedFault {
            gpa,
            write: qual & ept_qual::WRITE != 0,
            fetch: qual & ept_qual::FETCH != 0,
            present: qual & ept_qual::PERMS != 0,
            guest_table_walk: qual & ept_qual::LINEAR_VALID != 0 && qual & ept_qual::FINAL == 0,
        },
        ExitReason::EPT_MISCONFIG => Exit::TableMisconfig { gpa },
        ExitReason::XSETBV => Exit::Xsetbv,
        // SDM Vol. 3C Table 28-5: exit qualification of I/O instructions.
        ExitReason::IO => Exit::PortIo {
            port: ((qual >> 16) & 0xffff) as u16,
            size: (qual & 7) as u8 + 1,
            input: qual & (1 << 3) != 0,
            string: qual & (1 << 4) != 0,
        },
        _ => Exit::Other {
            code: u64::from(basic.0),
            info1: qual,
            info2: gpa,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_configuration_address_port() {
        let io = |port, size, input| Exit::PortIo {
            port,
            size,
            input,
            string: false,
        };
        // Size - 1 in bits 2:0, IN = bit 3, port in bits 31:16.
        assert_eq!(decode(30, 0x0cf8_0003, 0, 0, 0, 0, 0), io(0xcf8, 4, false));
        assert_eq!(decode(30, 0x0cf8_000b, 0, 0, 0, 0, 0), io(0xcf8, 4, true));
        assert_eq!(decode(30, 0x0cf9_0000, 0, 0, 0, 0, 0), io(0xcf9, 1, false));
        assert_eq!(decode(30, 0x0cfa_0009, 0, 0, 0, 0, 0), io(0xcfa, 2, true));
    }

    #[test]
    fn decodes_what_thinhv_intercepts() {
        assert_eq!(decode(10, 0, 0, 0, 0, 0, 0), Exit::Cpuid);
        assert_eq!(decode(18, 0, 0, 0, 0, 0, 0), Exit::Hypercall);
        assert_eq!(decode(4, 0x9a, 0, 0, 0, 0, 0), Exit::Sipi { vector: 0x9a });
        assert_eq!(decode(3, 0, 0, 0, 0, 0, 0), Exit::Init);
        assert_eq!(decode(2, 0, 0, 0, 0, 0, 0), Exit::Shutdown);
        // NMI: vector 2, type 2, valid.
        assert_eq!(decode(0, 0, 0, 0, 0, 0, 0x8000_0202), Exit::Nmi);
        // A hardware exception (#GP, type 3) is not an NMI.
        assert!(matches!(
            decode(0, 0, 0, 0, 0, 0, 0x8000_0b0d),
            Exit::Other { .. }
        ));
        assert!(
            matches!(decode(0, 0, 0, 0, 0, 0, 0x0000_0202), Exit::Other { .. }),
            "invalid info"
        );
        assert_eq!(decode(13, 0, 0, 0, 0, 0, 0), Exit::Invd);
        assert_eq!(decode(55, 0, 0, 0, 0, 0, 0), Exit::Xsetbv);
        for r in [
            11u32, 19, 20, 21, 22, 23, 24, 25, 26, 27, 50, 53, 59, 76, 77,
        ] {
            assert_eq!(decode(r, 0, 0, 0, 0, 0, 0), Exit::VirtInstruction, "{r}");
        }
        assert_eq!(decode(31, 0, 0, 0x3a, 0, 0, 0), Exit::MsrRead { msr: 0x3a });
        assert_eq!(
            decode(32, 0, 0, 0x277, 0x0406, 0x7, 0),
            Exit::MsrWrite {
                msr: 0x277,
                value: 0x7_0000_0406
            }
        );
        // mov cr4, rbx (qualification: CR 4, type 0, GPR 3).
        assert_eq!(
            decode(28, 0x304, 0, 0, 0, 0, 0),
            Exit::CrWrite { cr: 4, gpr: 3 }
        );
        // mov rdx, cr3 (type 1, GPR 2); mov r9, cr8.
        assert_eq!(
            decode(28, 0x213, 0, 0, 0, 0, 0),
            Exit::CrRead { cr: 3, gpr: 2 }
        );
        assert_eq!(
            decode(28, 0x918, 0, 0, 0, 0, 0),
            Exit::CrRead { cr: 8, gpr: 9 }
        );
        assert_eq!(decode(28, 0x20, 0, 0, 0, 0, 0), Exit::Clts);
        // lmsw with source 0x000b (register or memory form: bit 6).
        assert_eq!(
            decode(28, 0x000b_0070, 0, 0, 0, 0, 0),
            Exit::Lmsw { source: 0xb }
        );
        // A task switch by IRET (source 1) to TSS selector 0x28; by a task
        // gate in the IDT (source 3) to 0x50.
        assert_eq!(
            decode(9, 0x4000_0028, 0, 0, 0, 0, 0),
            Exit::TaskSwitch {
                selector: 0x28,
                source: 1,
                event: 0,
                error_code: 0,
                insn_len: 0
            }
        );
        assert!(matches!(
            decode(9, 0xc000_0050, 0, 0, 0, 0, 0),
            Exit::TaskSwitch {
                selector: 0x50,
                source: 3,
                ..
            }
        ));
        // in eax, dx (0xcfc): size 4, IN, DX operand.
        assert_eq!(
            decode(30, 0x0cfc_000b, 0, 0, 0, 0, 0),
            Exit::PortIo {
                port: 0xcfc,
                size: 4,
                input: true,
                string: false
            }
        );
        // outb to 0xcff; outsw to 0xcfe.
        assert_eq!(
            decode(30, 0x0cff_0040, 0, 0, 0, 0, 0),
            Exit::PortIo {
                port: 0xcff,
                size: 1,
                input: false,
                string: false
            }
        );
        assert_eq!(
            decode(30, 0x0cfe_0011, 0, 0, 0, 0, 0),
            Exit::PortIo {
                port: 0xcfe,
                size: 2,
                input: false,
                string: true
            }
        );
    }

    #[test]
    fn decodes_ept_exits_and_entry_failures() {
        // Write to a read-only translation, final address.
        let e = decode(48, 0x18a, 0x7e00_1000, 0, 0, 0, 0);
        assert_eq!(
            e,
            Exit::NestedFault {
                gpa: 0x7e00_1000,
                write: true,
                fetch: false,
                present: true,
                guest_table_walk: false
            }
        );
        // Not present, during a guest table walk.
        let e = decode(48, 0x81, 0x9_0000_0000, 0, 0, 0, 0);
        assert!(matches!(
            e,
            Exit::NestedFault {
                present: false,
                guest_table_walk: true,
                ..
            }
        ));
        assert_eq!(
            decode(49, 0, 0x1234_5000, 0, 0, 0, 0),
            Exit::TableMisconfig { gpa: 0x1234_5000 }
        );
        assert_eq!(
            decode(ENTRY_FAILURE | 0x21, 0, 0, 0, 0, 0, 0),
            Exit::EntryFailed { detail: 33 }
        );
        assert_eq!(ExitReason(48).name(), "EPT violation");
    }
}
