//! The neutral exit: what happened in the guest, independent of vendor.
use thinhv_abi::exit::ExitReason;

/// Why the guest stopped, as the neutral handler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// CPUID.
    Cpuid,
    /// VMMCALL or VMCALL.
    Hypercall,
    /// RDMSR of an intercepted MSR.
    MsrRead {
        /// ECX.
        msr: u32,
    },
    /// WRMSR of an intercepted MSR.
    MsrWrite {
        /// ECX.
        msr: u32,
        /// EDX:EAX.
        value: u64,
    },
    /// Nested (NPT) or extended (EPT) page fault.
    NestedFault {
        /// Guest-physical address.
        gpa: u64,
        /// The access was a write.
        write: bool,
        /// The access was an instruction fetch.
        fetch: bool,
        /// A translation existed (protection fault, not a missing entry).
        present: bool,
        /// The fault happened while walking the guest's own page tables.
        guest_table_walk: bool,
    },
    /// An SVM/VMX instruction: the guest sees no virtualization, so #UD.
    VirtInstruction,
    /// A real INIT signal.
    Init,
    /// A SIPI to a CPU in wait-for-SIPI (VMX reports it as an exit).
    Sipi {
        /// Start page (CS = vector << 8, IP = 0).
        vector: u8,
    },
    /// INVD.
    Invd,
    /// MOV to a control register whose owned bits the write touches (VMX).
    CrWrite {
        /// Control register.
        cr: u8,
        /// Source register (encoding order).
        gpr: u8,
    },
    /// MOV from a control register (VMX: CR3-store or CR8-store exiting).
    CrRead {
        /// Control register.
        cr: u8,
        /// Destination register (encoding order).
        gpr: u8,
    },
    /// CLTS while thinhv owns CR0.TS (VMX).
    Clts,
    /// LMSW that touches CR0 bits thinhv owns (VMX).
    Lmsw {
        /// The source operand (register or memory: the processor reports
        /// it either way).
        source: u16,
    },
    /// A hardware task switch (VMX exits on every one; SVM lets the
    /// processor switch tasks).
    TaskSwitch {
        /// Selector of the new task's TSS.
        selector: u16,
        /// What started it: 0 CALL, 1 IRET, 2 JMP, 3 a task gate in the IDT
        /// (SDM Vol. 3C Table 28-2).
        source: u8,
        /// The event a task gate delivers (VMX IDT-vectoring information,
        /// bit 31 valid), else 0.
        event: u32,
        /// Its error code, when `event` has one.
        error_code: u32,
        /// Length of the instruction that started it (CALL, JMP, IRET,
        /// INT n, INT3, INTO), 0 if none.
        insn_len: u8,
    },
    /// The second-level tables are malformed at this address (EPT
    /// misconfiguration): a hypervisor bug, never a guest's doing.
    TableMisconfig {
        /// Guest-physical address.
        gpa: u64,
    },
    /// A physical NMI.
    Nmi,
    /// Triple fault.
    Shutdown,
    /// XSETBV.
    Xsetbv,
    /// IN/OUT (or INS/OUTS) on an intercepted port.
    PortIo {
        /// Port.
        port: u16,
        /// Access size in bytes (1, 2 or 4).
        size: u8,
        /// IN (true) or OUT.
        input: bool,
        /// INS/OUTS (possibly with REP).
        string: bool,
    },
    /// The VM entry itself failed.
    EntryFailed {
        /// Vendor detail (VM-instruction error, or 0).
        detail: u64,
    },
    /// Anything else.
    Other {
        /// Vendor exit code.
        code: u64,
        /// Vendor information.
        info1: u64,
        /// Vendor information.
        info2: u64,
    },
}

impl Exit {
    /// The counter this exit is accounted under. Nested faults are split by
    /// the handler (APIC, protected region, other), so this is the default.
    pub const fn reason(&self) -> ExitReason {
        match self {
            Self::Cpuid => ExitReason::CPUID,
            Self::Hypercall => ExitReason::HYPERCALL,
            Self::MsrRead { .. } => ExitReason::MSR_READ,
            Self::MsrWrite { .. } => ExitReason::MSR_WRITE,
            Self::NestedFault { .. } => ExitReason::NESTED_FAULT,
            Self::VirtInstruction => ExitReason::VIRT_INSN,
            Self::Init => ExitReason::INIT,
            Self::Sipi { .. } => ExitReason::SIPI,
            Self::Invd => ExitReason::INVD,
            Self::CrWrite { .. } | Self::CrRead { .. } | Self::Clts | Self::Lmsw { .. } => {
                ExitReason::CR_ACCESS
            }
            Self::Nmi => ExitReason::NMI,
            Self::Shutdown => ExitReason::SHUTDOWN,
            Self::Xsetbv => ExitReason::XSETBV,
            Self::PortIo { .. } => ExitReason::PCI_CONFIG,
            Self::EntryFailed { .. }
            | Self::Other { .. }
            | Self::TableMisconfig { .. }
            | Self::TaskSwitch { .. } => ExitReason::OTHER,
        }
    }
}
