//! The hypercall ABI.
//!
//! A hypercall is `VMMCALL` (AMD) or `VMCALL` (Intel) executed at CPL 0.
//! Both instructions behave identically under thinhv, so a guest may use
//! whichever its CPU has.
//!
//! | register | in                    | out                       |
//! |----------|-----------------------|---------------------------|
//! | RAX      | function number       | [`Status`]                |
//! | RBX      | argument 0            | result 0                  |
//! | RCX      | argument 1            | result 1                  |
//! | RDX      | argument 2            | result 2                  |
//!
//! All other registers are preserved. Buffers are passed as **guest-physical**
//! addresses and lengths; the core checks every byte of a buffer before it
//! touches it: the range must not wrap, must lie in memory the firmware
//! reported as RAM, and must not reach the hypervisor's region or its
//! read-only status page. A hypercall from CPL 1–3 is refused with
//! [`Status::NOT_PERMITTED`] and changes nothing else.
//!
//! See `docs/hypercalls.md` for the prose version of this table.

/// Result of a hypercall, returned in RAX. A newtype rather than an `enum`:
/// a future core may return codes this crate does not know yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Status(pub u64);

impl Status {
    /// Success.
    pub const OK: Self = Self(0);
    /// The function number is unknown.
    pub const UNKNOWN_FUNCTION: Self = Self(1);
    /// The caller is not at CPL 0, or the function is closed (sealed).
    pub const NOT_PERMITTED: Self = Self(2);
    /// A buffer is not wholly inside guest RAM, wraps, or reaches the
    /// hypervisor's memory.
    pub const BAD_ADDRESS: Self = Self(3);
    /// A buffer is too small for the result; RBX holds the size needed.
    pub const BUFFER_TOO_SMALL: Self = Self(4);
    /// An argument is out of range.
    pub const INVALID_ARGUMENT: Self = Self(5);
    /// The integrity check found the core's memory changed.
    pub const INTEGRITY_FAILURE: Self = Self(6);

    /// A short name for logs and tools.
    pub const fn name(self) -> &'static str {
        match self.0 {
            0 => "ok",
            1 => "unknown function",
            2 => "not permitted",
            3 => "bad address",
            4 => "buffer too small",
            5 => "invalid argument",
            6 => "integrity failure",
            _ => "unknown status",
        }
    }
}

/// Function numbers (RAX on entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Function(pub u64);

impl Function {
    /// Version: RBX ← [`crate::VERSION`], RCX ← [`crate::ABI_VERSION`],
    /// RDX ← number of CPUs virtualized.
    pub const VERSION: Self = Self(0);
    /// Status: RBX = buffer GPA, RCX = buffer length. Writes a
    /// [`StatusReport`]; RBX ← bytes written.
    pub const STATUS: Self = Self(1);
    /// Log read: RBX = buffer GPA, RCX = buffer length, RDX = log position to
    /// start from (0 for the oldest byte still held). Copies log bytes;
    /// RBX ← bytes copied, RCX ← position after the last byte copied,
    /// RDX ← current end of the log.
    pub const LOG_READ: Self = Self(2);
    /// Integrity: recomputes the CRC-32 of the core's read-only image and
    /// checks the canary page. RBX ← CRC expected, RCX ← CRC now,
    /// RDX ← 1 if the canary is intact. RAX is [`Status::OK`] only if both
    /// hold, else [`Status::INTEGRITY_FAILURE`].
    pub const INTEGRITY: Self = Self(3);
    /// Exit counters of one CPU: RBX = buffer GPA, RCX = buffer length,
    /// RDX = CPU index. Writes `[u64; EXIT_REASON_COUNT]`; RBX ← bytes
    /// written.
    pub const EXIT_COUNTS: Self = Self(4);
    /// Cost of exit handling on one CPU: RDX = CPU index. RBX ← TSC cycles
    /// spent in thinhv's exit handler (from its entry after #VMEXIT / VM
    /// exit to its return towards VMRUN / VMRESUME), summed; RCX ← exits
    /// measured. A guest that also times its own round trip sees how much
    /// of an exit is the handler and how much the world switch.
    pub const EXIT_COST: Self = Self(5);

    /// Loader only, before [`Function::SEAL`]: leave guest mode on this CPU
    /// and continue natively at the instruction after the hypercall.
    pub const DEVIRTUALIZE: Self = Self(0x100);
    /// Loader only: the OS is about to be started; closes
    /// [`Function::DEVIRTUALIZE`] and [`Function::SEAL`] for good.
    pub const SEAL: Self = Self(0x101);
    /// The loader's ExitBootServices hook, after the firmware's own
    /// ExitBootServices handling returned (it wakes every processor it
    /// started and waits for each, `docs/appliances.md`): appliance
    /// partitions claim their processors, which from now on no IPI from
    /// the OS reaches. After [`Function::SEAL`], from the OS's partition;
    /// RBX ← processors claimed (0 when already claimed).
    pub const CLAIM_APPLIANCE_CPUS: Self = Self(0x102);
    /// Tests only (`[debug] host_fault`), before sealing: the core raises an
    /// exception in host mode, to prove that such a fault is reported and
    /// never hangs silently.
    pub const DEBUG_HOST_FAULT: Self = Self(0x1ff);

    /// A short name for logs and tools.
    pub const fn name(self) -> &'static str {
        match self.0 {
            0 => "version",
            1 => "status",
            2 => "log-read",
            3 => "integrity",
            4 => "exit-counts",
            0x102 => "claim-appliance-cpus",
            5 => "exit-cost",
            0x100 => "devirtualize",
            0x101 => "seal",
            0x1ff => "debug-host-fault",
            _ => "unknown",
        }
    }
}

/// What [`Function::STATUS`] writes into the caller's buffer.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::Immutable,
    zerocopy::KnownLayout,
)]
#[repr(C)]
pub struct StatusReport {
    /// `size_of::<StatusReport>()`, for forward compatibility (offset 0x00).
    pub size: u32,
    /// [`crate::ABI_VERSION`] (0x04).
    pub abi_version: u32,
    /// [`crate::VERSION`] (0x08).
    pub version: u32,
    /// CPU vendor backend: 1 = AMD SVM, 2 = Intel VMX (0x0C).
    pub vendor: u32,
    /// Processors the firmware reported enabled (0x10).
    pub cpus_expected: u32,
    /// Processors running under thinhv (0x14).
    pub cpus_virtualized: u32,
    /// Total bytes reserved from the OS (protected region + status page) (0x18).
    pub bytes_reserved: u64,
    /// The protected region: the guest cannot read or write it (0x20).
    pub protected_base: u64,
    /// (0x28)
    pub protected_size: u64,
    /// The read-only status page (0x30).
    pub status_page_base: u64,
    /// (0x38)
    pub status_page_size: u64,
    /// Exits on all CPUs since start (0x40).
    pub exits_total: u64,
    /// Writes to the protected region that were discarded (0x48).
    pub blocked_writes: u64,
    /// Bytes ever written to the log (0x50).
    pub log_head: u64,
    /// Whether the loader has sealed the hypervisor (0x58).
    pub sealed: u32,
    /// Whether CPUID presence is hidden (0x5C).
    pub hidden: u32,
}

const _: () = assert!(core::mem::size_of::<StatusReport>() == 0x60);

/// Vendor code in [`StatusReport::vendor`] and the status page.
pub const VENDOR_AMD_SVM: u32 = 1;
/// Vendor code in [`StatusReport::vendor`] and the status page.
pub const VENDOR_INTEL_VMX: u32 = 2;
