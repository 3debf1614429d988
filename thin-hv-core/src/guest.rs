//! The vendor-neutral view of a stopped guest CPU.

/// A general-purpose register, numbered as in instruction encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Gpr {
    /// All registers in encoding order.
    pub const ALL: [Self; 16] = [
        Self::Rax,
        Self::Rcx,
        Self::Rdx,
        Self::Rbx,
        Self::Rsp,
        Self::Rbp,
        Self::Rsi,
        Self::Rdi,
        Self::R8,
        Self::R9,
        Self::R10,
        Self::R11,
        Self::R12,
        Self::R13,
        Self::R14,
        Self::R15,
    ];
}

/// Execution mode of the guest, which decides how its instructions decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// Real mode or 16-bit protected mode.
    Bits16,
    /// 32-bit protected (or compatibility) mode.
    Bits32,
    /// 64-bit mode.
    Bits64,
}

impl CpuMode {
    /// Bitness as the decoder wants it.
    pub const fn bitness(self) -> u32 {
        match self {
            Self::Bits16 => 16,
            Self::Bits32 => 32,
            Self::Bits64 => 64,
        }
    }
}

/// The control registers that decide how guest linear addresses translate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagingRegs {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER as the guest sees it.
    pub efer: u64,
}

/// A segment register, as a memory operand names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegReg {
    /// ES
    Es,
    /// CS
    Cs,
    /// SS
    Ss,
    /// DS
    Ds,
    /// FS
    Fs,
    /// GS
    Gs,
}

/// A guest CPU stopped at an exit. Implemented by the SVM and VMX backends
/// over their control blocks, and by a fake in tests.
pub trait GuestCpu {
    /// Reads a general-purpose register.
    fn gpr(&self, r: Gpr) -> u64;
    /// Writes a general-purpose register.
    fn set_gpr(&mut self, r: Gpr, value: u64);
    /// RIP.
    fn rip(&self) -> u64;
    /// Sets RIP.
    fn set_rip(&mut self, rip: u64);
    /// Current privilege level.
    fn cpl(&self) -> u8;
    /// The next instruction's address if the hardware reported it for this
    /// exit (SVM NRIP save, VMX instruction length).
    fn next_rip_hint(&self) -> Option<u64>;
    /// Decode mode.
    fn mode(&self) -> CpuMode;
    /// CS base (linear address of RIP = CS base + RIP outside 64-bit mode).
    fn cs_base(&self) -> u64;
    /// The base of segment register `seg` as the processor holds it (in
    /// 64-bit mode only FS and GS bases take part in addressing; callers
    /// apply that rule).
    fn segment_base(&self, seg: SegReg) -> u64;
    /// Paging registers.
    fn paging(&self) -> PagingRegs;
    /// EFER as the guest sees it (SVM: the SVME bit hidden).
    fn guest_efer(&self) -> u64;
    /// Sets EFER from a guest write that the handler has already checked.
    fn set_guest_efer(&mut self, value: u64);
    /// Queues an exception for the next entry.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);
    /// Queues an NMI for the next entry.
    fn inject_nmi(&mut self);
    /// Sets the guest's IA32_PAT from a write the handler has checked (SVM:
    /// the VMCB's G_PAT; VMX: the guest PAT field).
    fn set_guest_pat(&mut self, value: u64);
    /// Emulates MOV to CR `cr` (only vendors that intercept CR writes
    /// implement it).
    fn write_cr(&mut self, cr: u8, value: u64) -> Result<(), GpFault>;
    /// MOV from CR `cr` (0, 3 or 4) as the guest sees it (read shadows
    /// applied); `None` where the backend never intercepts CR reads.
    fn read_cr(&self, cr: u8) -> Option<u64>;
    /// RFLAGS.
    fn rflags(&self) -> u64;
    /// The guest's IA32_DEBUGCTL as far as single-stepping depends on it
    /// (BTF, bit 1); 0 where the backend cannot see the guest's value.
    fn debugctl(&self) -> u64;
    /// DR7 as the guest set it.
    fn dr7(&self) -> u64;
    /// Breakpoint address register DR`n` (`n` < 4).
    fn breakpoint_address(&self, n: u8) -> u64;
    /// The exit's instruction has been emulated or skipped and RIP points
    /// past it: do what the processor does when an instruction completes.
    /// The interrupt shadow of a preceding STI or MOV SS ends, RFLAGS.RF is
    /// cleared, and when `dr6` is not 0 a debug exception with those DR6
    /// bits (BS for a single step, B0–B3 for breakpoints) arrives before the
    /// next instruction, as a trap after this one (SDM Vol. 3B §18.2.3,
    /// §18.3.1.4; APM Vol. 2 §13.1.3).
    fn complete_instruction(&mut self, dr6: u64);
    /// The registers a hardware task switch saves and loads; `None` where
    /// the backend never exits on task switches (SVM: the processor
    /// switches tasks itself).
    fn task_state(&self) -> Option<crate::vmx::task_switch::TaskState> {
        None
    }
    /// Loads the state a task switch produced. `delivered` is the event
    /// (VMX interruption-information format) whose delivery through a task
    /// gate the switch completed, 0 for CALL, JMP and IRET: it must not be
    /// delivered again.
    fn set_task_state(&mut self, state: &crate::vmx::task_switch::TaskState, delivered: u32) {
        let _ = (state, delivered);
    }
}

/// An emulated write the processor would refuse: the guest gets #GP(0) and
/// nothing changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpFault;

/// Exception vectors.
pub mod vector {
    /// #DB.
    pub const DB: u8 = 1;
    /// #UD.
    pub const UD: u8 = 6;
    /// #DF.
    pub const DF: u8 = 8;
    /// #TS.
    pub const TS: u8 = 10;
    /// #NP.
    pub const NP: u8 = 11;
    /// #SS.
    pub const SS: u8 = 12;
    /// #GP.
    pub const GP: u8 = 13;
    /// #PF.
    pub const PF: u8 = 14;
}

/// DR6 bits a debug exception reports (SDM Vol. 3B §18.2.3).
pub mod dr6 {
    /// B0–B3: breakpoint conditions met.
    pub const B0_3: u64 = 0xf;
    /// BS: single step.
    pub const BS: u64 = 1 << 14;
}
