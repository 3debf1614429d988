//! Exit reasons as thinhv counts them, the same for both vendors.
//!
//! A vendor backend maps its own exit codes (SVM `EXITCODE`, VMX basic exit
//! reason) onto these. The index is stable: it is the position in the
//! per-CPU counter array of the status page and of
//! [`crate::hypercall::Function::EXIT_COUNTS`].

/// Index of a counted exit reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExitReason(pub u16);

impl ExitReason {
    /// CPUID.
    pub const CPUID: Self = Self(0);
    /// VMMCALL / VMCALL.
    pub const HYPERCALL: Self = Self(1);
    /// RDMSR of an intercepted MSR.
    pub const MSR_READ: Self = Self(2);
    /// WRMSR of an intercepted MSR.
    pub const MSR_WRITE: Self = Self(3);
    /// Write to the local APIC page (emulated, INIT/SIPI virtualized).
    pub const APIC_ACCESS: Self = Self(4);
    /// Access to the protected region (discarded).
    pub const PROTECTED_ACCESS: Self = Self(5);
    /// Other nested/extended page fault (demand-mapped or unexpected).
    pub const NESTED_FAULT: Self = Self(6);
    /// INIT (intercepted or virtual).
    pub const INIT: Self = Self(7);
    /// SIPI delivered to a virtual CPU.
    pub const SIPI: Self = Self(8);
    /// NMI (reflected to the guest or used as a wake-up).
    pub const NMI: Self = Self(9);
    /// A virtualization instruction in the guest (answered with #UD).
    pub const VIRT_INSN: Self = Self(10);
    /// Triple fault / shutdown.
    pub const SHUTDOWN: Self = Self(11);
    /// XSETBV.
    pub const XSETBV: Self = Self(12);
    /// A guest write to a control register thinhv owns bits of (VMX).
    pub const CR_ACCESS: Self = Self(13);
    /// INVD (VMX: always exits; done as WBINVD).
    pub const INVD: Self = Self(14);
    /// Anything else (logged).
    pub const OTHER: Self = Self(15);
    /// A PCI configuration access thinhv mediates (a hidden function or a
    /// VF budget): a trapped ECAM page or the 0xCFC data port.
    pub const PCI_CONFIG: Self = Self(16);
    /// Any other port access by an appliance (all its ports exit: its
    /// console UART, its reset ports, and the rest reading all-ones).
    pub const PORT_IO: Self = Self(17);

    /// Number of reasons; the length of a counter array.
    pub const COUNT: usize = 18;

    /// All reasons in index order.
    pub const ALL: [Self; Self::COUNT] = [
        Self::CPUID,
        Self::HYPERCALL,
        Self::MSR_READ,
        Self::MSR_WRITE,
        Self::APIC_ACCESS,
        Self::PROTECTED_ACCESS,
        Self::NESTED_FAULT,
        Self::INIT,
        Self::SIPI,
        Self::NMI,
        Self::VIRT_INSN,
        Self::SHUTDOWN,
        Self::XSETBV,
        Self::CR_ACCESS,
        Self::INVD,
        Self::OTHER,
        Self::PCI_CONFIG,
        Self::PORT_IO,
    ];

    /// Stable short name (used in logs, the status tool and JSON output).
    pub const fn name(self) -> &'static str {
        match self.0 {
            0 => "cpuid",
            1 => "hypercall",
            2 => "msr_read",
            3 => "msr_write",
            4 => "apic_access",
            5 => "protected_access",
            6 => "nested_fault",
            7 => "init",
            8 => "sipi",
            9 => "nmi",
            10 => "virt_insn",
            11 => "shutdown",
            12 => "xsetbv",
            13 => "cr_access",
            14 => "invd",
            16 => "pci_config",
            17 => "port_io",
            _ => "other",
        }
    }

    /// Index into a counter array (out-of-range values map to OTHER).
    pub const fn index(self) -> usize {
        if (self.0 as usize) < Self::COUNT {
            self.0 as usize
        } else {
            Self::OTHER.0 as usize
        }
    }
}

/// Number of counted exit reasons.
pub const EXIT_REASON_COUNT: usize = ExitReason::COUNT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_match_positions_and_names_are_unique() {
        for (i, r) in ExitReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut names: Vec<_> = ExitReason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ExitReason::COUNT);
        assert_eq!(ExitReason(999).index(), ExitReason::OTHER.index());
    }
}
