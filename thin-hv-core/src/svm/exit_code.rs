//! SVM exit codes (AMD APM Vol. 2, Appendix C, Table C-1 "SVM Intercept
//! Codes") and their translation into the neutral [`Exit`].
use crate::exit::Exit;

/// An SVM `EXITCODE`. A newtype: unknown codes must stay representable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExitCode(pub u64);

#[allow(missing_docs)]
impl ExitCode {
    pub const EXCP_BASE: Self = Self(0x40);
    pub const INTR: Self = Self(0x60);
    pub const NMI: Self = Self(0x61);
    pub const SMI: Self = Self(0x62);
    pub const INIT: Self = Self(0x63);
    pub const VINTR: Self = Self(0x64);
    pub const CPUID: Self = Self(0x72);
    pub const IRET: Self = Self(0x74);
    pub const INVD: Self = Self(0x76);
    pub const HLT: Self = Self(0x78);
    pub const INVLPGA: Self = Self(0x7a);
    pub const IOIO: Self = Self(0x7b);
    pub const MSR: Self = Self(0x7c);
    pub const SHUTDOWN: Self = Self(0x7f);
    pub const VMRUN: Self = Self(0x80);
    pub const VMMCALL: Self = Self(0x81);
    pub const VMLOAD: Self = Self(0x82);
    pub const VMSAVE: Self = Self(0x83);
    pub const STGI: Self = Self(0x84);
    pub const CLGI: Self = Self(0x85);
    pub const SKINIT: Self = Self(0x86);
    pub const XSETBV: Self = Self(0x8d);
    pub const NPF: Self = Self(0x400);
    /// VMRUN failed its consistency checks (`VMEXIT_INVALID`, -1).
    pub const INVALID: Self = Self(u64::MAX);
}

/// NPF `EXITINFO1` bits (APM §15.25.6, the #PF error code plus bits 32/33).
pub mod npf {
    /// The translation was present (protection violation).
    pub const PRESENT: u64 = 1 << 0;
    /// Write access.
    pub const WRITE: u64 = 1 << 1;
    /// User access (always set for nested walks).
    pub const USER: u64 = 1 << 2;
    /// Reserved bit set in a nested entry.
    pub const RSVD: u64 = 1 << 3;
    /// Instruction fetch.
    pub const FETCH: u64 = 1 << 4;
    /// Fault on the final guest-physical address.
    pub const FINAL_ADDR: u64 = 1 << 32;
    /// Fault while walking the guest's page tables.
    pub const GUEST_TABLE: u64 = 1 << 33;
}

/// Translates the exit fields of a VMCB into a neutral exit.
///
/// `rcx`, `rax` and `rdx` are the guest's registers at exit time (needed for
/// MSR exits: ECX is the MSR, EDX:EAX the value written).
pub fn decode(code: u64, info1: u64, info2: u64, rcx: u64, rax: u64, rdx: u64) -> Exit {
    match ExitCode(code) {
        ExitCode::CPUID => Exit::Cpuid,
        ExitCode::VMMCALL => Exit::Hypercall,
        ExitCode::MSR => {
            let msr = (rcx & 0xffff_ffff) as u32;
            if info1 & 1 == 0 {
                Exit::MsrRead { msr }
            } else {
                Exit::MsrWrite {
                    msr,
                    value: (rdx << 32) | (rax & 0xffff_ffff),
                }
            }
        }
        ExitCode::NPF => Exit::NestedFault {
            gpa: info2,
            write: info1 & npf::WRITE != 0,
            fetch: info1 & npf::FETCH != 0,
            present: info1 & npf::PRESENT != 0,
            guest_table_walk: info1 & npf::GUEST_TABLE != 0,
        },
        ExitCode::VMRUN
        | ExitCode::VMLOAD
        | ExitCode::VMSAVE
        | ExitCode::STGI
        | ExitCode::CLGI
        | ExitCode::SKINIT
        | ExitCode::INVLPGA => Exit::VirtInstruction,
        ExitCode::INIT => Exit::Init,
        ExitCode::INVD => Exit::Invd,
        ExitCode::NMI => Exit::Nmi,
        ExitCode::SHUTDOWN => Exit::Shutdown,
        ExitCode::XSETBV => Exit::Xsetbv,
        // APM Vol. 2 §15.10.2: EXITINFO1 of an IOIO intercept.
        ExitCode::IOIO => Exit::PortIo {
            port: ((info1 >> 16) & 0xffff) as u16,
            size: if info1 & (1 << 4) != 0 {
                1
            } else if info1 & (1 << 5) != 0 {
                2
            } else {
                4
            },
            input: info1 & 1 != 0,
            string: info1 & (1 << 2) != 0,
        },
        ExitCode::INVALID => Exit::EntryFailed { detail: 0 },
        _ => Exit::Other { code, info1, info2 },
    }
}

/// A short name for an SVM exit code, for logs.
pub fn name(code: u64) -> &'static str {
    match ExitCode(code) {
        ExitCode::INTR => "INTR",
        ExitCode::NMI => "NMI",
        ExitCode::SMI => "SMI",
        ExitCode::INIT => "INIT",
        ExitCode::VINTR => "VINTR",
        ExitCode::CPUID => "CPUID",
        ExitCode::IRET => "IRET",
        ExitCode::INVD => "INVD",
        ExitCode::HLT => "HLT",
        ExitCode::INVLPGA => "INVLPGA",
        ExitCode::IOIO => "IOIO",
        ExitCode::MSR => "MSR",
        ExitCode::SHUTDOWN => "SHUTDOWN",
        ExitCode::VMRUN => "VMRUN",
        ExitCode::VMMCALL => "VMMCALL",
        ExitCode::VMLOAD => "VMLOAD",
        ExitCode::VMSAVE => "VMSAVE",
        ExitCode::STGI => "STGI",
        ExitCode::CLGI => "CLGI",
        ExitCode::SKINIT => "SKINIT",
        ExitCode::XSETBV => "XSETBV",
        ExitCode::NPF => "NPF",
        ExitCode::INVALID => "INVALID",
        ExitCode(c) if (0x40..0x60).contains(&c) => "EXCEPTION",
        _ => "unknown",
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
        // out dx, eax / in eax, dx at 0xcf8 (SZ32 = bit 6, TYPE = bit 0).
        assert_eq!(decode(0x7b, 0x0cf8_0040, 0, 0, 0, 0), io(0xcf8, 4, false));
        assert_eq!(decode(0x7b, 0x0cf8_0041, 0, 0, 0, 0), io(0xcf8, 4, true));
        // out dx, al at 0xcf9 (SZ8 = bit 4); in ax, dx at 0xcfa (SZ16 = bit 5).
        assert_eq!(decode(0x7b, 0x0cf9_0010, 0, 0, 0, 0), io(0xcf9, 1, false));
        assert_eq!(decode(0x7b, 0x0cfa_0021, 0, 0, 0, 0), io(0xcfa, 2, true));
    }

    #[test]
    fn decodes_port_io() {
        // in eax, dx with DX = 0xcfc: TYPE=1, SZ32, port in 31:16.
        assert_eq!(
            decode(0x7b, 0x0cfc_0041, 0, 0, 0, 0),
            Exit::PortIo {
                port: 0xcfc,
                size: 4,
                input: true,
                string: false
            }
        );
        // out dx, ax to 0xcfe.
        assert_eq!(
            decode(0x7b, 0x0cfe_0020, 0, 0, 0, 0),
            Exit::PortIo {
                port: 0xcfe,
                size: 2,
                input: false,
                string: false
            }
        );
        // rep insb from 0xcfd.
        assert_eq!(
            decode(0x7b, 0x0cfd_001d, 0, 0, 0, 0),
            Exit::PortIo {
                port: 0xcfd,
                size: 1,
                input: true,
                string: true
            }
        );
    }

    #[test]
    fn decodes_invd() {
        // APM Table C-1: VMEXIT_INVD is 0x76; it used to decode as Other,
        // which the neutral handler treats as fatal.
        assert_eq!(decode(0x76, 0, 0, 0, 0, 0), Exit::Invd);
    }

    #[test]
    fn decodes_msr_exits() {
        assert_eq!(
            decode(0x7c, 0, 0, 0xc000_0080, 0, 0),
            Exit::MsrRead { msr: 0xc000_0080 }
        );
        assert_eq!(
            decode(0x7c, 1, 0, 0x1_0000_0830, 0xdead_0000_0000_4500, 0x3),
            Exit::MsrWrite {
                msr: 0x830,
                value: 0x3_0000_4500
            }
        );
    }

    #[test]
    fn decodes_npf() {
        let e = decode(
            0x400,
            npf::PRESENT | npf::WRITE | npf::USER | npf::FINAL_ADDR,
            0xfee0_0300,
            0,
            0,
            0,
        );
        assert_eq!(
            e,
            Exit::NestedFault {
                gpa: 0xfee0_0300,
                write: true,
                fetch: false,
                present: true,
                guest_table_walk: false
            }
        );
    }

    #[test]
    fn svm_instructions_and_unknown_codes() {
        for c in [0x80, 0x82, 0x83, 0x84, 0x85, 0x86, 0x7a] {
            assert_eq!(decode(c, 0, 0, 0, 0, 0), Exit::VirtInstruction, "{c:#x}");
        }
        assert_eq!(
            decode(u64::MAX, 0, 0, 0, 0, 0),
            Exit::EntryFailed { detail: 0 }
        );
        assert_eq!(
            decode(0x1234, 1, 2, 0, 0, 0),
            Exit::Other {
                code: 0x1234,
                info1: 1,
                info2: 2
            }
        );
        assert_eq!(name(0x400), "NPF");
        assert_eq!(name(0x4e), "EXCEPTION");
    }
}
