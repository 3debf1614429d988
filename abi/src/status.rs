//! The status page: a read-only window into the core for the guest.
//!
//! The core publishes counters and its log in a small region beside (not
//! inside) the protected region. The second-level page tables map it
//! **read-only** for the guest, so a root process can read it through
//! `/dev/mem` at the address [`crate::cpuid::LEAF_MEMORY`] reports, without a
//! kernel module and without a hypercall. The guest can never change it, and
//! the core never reads back anything from it that it trusts: it is a
//! write-only mirror from the core's side. It holds log text and counters,
//! nothing secret.
//!
//! Layout (all little-endian):
//!
//! | offset                  | content                                      |
//! |-------------------------|----------------------------------------------|
//! | 0                       | [`StatusPageHeader`]                         |
//! | `cpus_offset`           | `max_cpus` × [`CpuRecord`]                   |
//! | `log_offset`            | log ring of `log_size` bytes                 |
//!
//! The log ring holds the last `log_size` bytes of the log; `log_head`
//! counts every byte ever written, so byte number `n` sits at
//! `log_offset + n % log_size` while `n >= log_head - log_size`. A reader
//! copies, then re-reads `log_head` and discards what was overwritten
//! meanwhile.

use crate::exit::EXIT_REASON_COUNT;

/// Magic at offset 0 of the status page.
pub const STATUS_MAGIC: [u8; 8] = *b"THINHVSP";

/// Header at offset 0 of the status page.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::Immutable,
    zerocopy::KnownLayout,
)]
#[repr(C)]
pub struct StatusPageHeader {
    /// [`STATUS_MAGIC`] (0x00).
    pub magic: [u8; 8],
    /// [`crate::ABI_VERSION`] (0x08).
    pub abi_version: u32,
    /// `size_of::<StatusPageHeader>()` (0x0C).
    pub header_size: u32,
    /// [`crate::VERSION`] (0x10).
    pub version: u32,
    /// Vendor backend (0x14).
    pub vendor: u32,
    /// Processors the firmware reported enabled (0x18).
    pub cpus_expected: u32,
    /// Processors running under thinhv (0x1C).
    pub cpus_virtualized: u32,
    /// Bytes reserved from the OS in total (0x20).
    pub bytes_reserved: u64,
    /// Protected region base (0x28).
    pub protected_base: u64,
    /// Protected region size (0x30).
    pub protected_size: u64,
    /// Size of this status area in bytes (0x38).
    pub area_size: u64,
    /// Offset of the first [`CpuRecord`] (0x40).
    pub cpus_offset: u32,
    /// Bytes per [`CpuRecord`] (0x44).
    pub cpu_record_size: u32,
    /// Number of [`CpuRecord`]s (0x48).
    pub max_cpus: u32,
    /// Counters per CPU ([`EXIT_REASON_COUNT`]) (0x4C).
    pub exit_reason_count: u32,
    /// Offset of the log ring (0x50).
    pub log_offset: u32,
    /// Size of the log ring (0x54).
    pub log_size: u32,
    /// Bytes ever written to the log (0x58).
    pub log_head: u64,
    /// Bit 0: sealed (the OS has been started); bit 1: CPUID presence hidden;
    /// bit 2: the hypervisor stopped on a fatal error (0x60).
    pub flags: u32,
    /// Writes to the protected region discarded so far (low 32 bits) (0x64).
    pub blocked_writes: u32,
    /// Reserved (0x68).
    pub reserved: [u64; 3],
}

const _: () = assert!(core::mem::size_of::<StatusPageHeader>() == 0x80);

/// [`StatusPageHeader::flags`]: the loader has sealed the hypervisor.
pub const FLAG_SEALED: u32 = 1 << 0;
/// [`StatusPageHeader::flags`]: CPUID presence is hidden.
pub const FLAG_HIDDEN: u32 = 1 << 1;
/// [`StatusPageHeader::flags`]: a fatal error stopped a CPU.
pub const FLAG_FATAL: u32 = 1 << 2;

/// Per-CPU record in the status page.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::Immutable,
    zerocopy::KnownLayout,
)]
#[repr(C)]
pub struct CpuRecord {
    /// Local APIC ID (0x00).
    pub apic_id: u32,
    /// [`CpuState`] value (0x04).
    pub state: u32,
    /// Exits by [`crate::exit::ExitReason`] index (0x08).
    pub exits: [u64; EXIT_REASON_COUNT],
}

const _: () = assert!(core::mem::size_of::<CpuRecord>() == 8 + 8 * EXIT_REASON_COUNT);

/// State of a CPU as the status page reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuState(pub u32);

impl CpuState {
    /// Not (yet) under thinhv.
    pub const OFFLINE: Self = Self(0);
    /// Running its guest.
    pub const RUNNING: Self = Self(1);
    /// Virtual INIT received; waiting for a SIPI.
    pub const WAIT_FOR_SIPI: Self = Self(2);
    /// Stopped by a fatal error.
    pub const STOPPED: Self = Self(3);

    /// Short name.
    pub const fn name(self) -> &'static str {
        match self.0 {
            0 => "offline",
            1 => "running",
            2 => "wait-for-sipi",
            3 => "stopped",
            _ => "unknown",
        }
    }
}

/// Log ring size.
pub const LOG_RING_SIZE: usize = 64 * 1024;

/// Offset of the CPU records.
pub const CPUS_OFFSET: usize = 0x80;

/// Size of the status area for `max_cpus` CPUs, page-aligned, and the
/// offset of its log ring.
pub const fn status_area_layout(max_cpus: usize) -> (usize, usize) {
    let cpus_end = CPUS_OFFSET + max_cpus * core::mem::size_of::<CpuRecord>();
    let log_offset = (cpus_end + 0xfff) & !0xfff;
    (log_offset + LOG_RING_SIZE, log_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_page_aligned_and_fits() {
        for n in [1usize, 2, 4, 64, 256] {
            let (size, log) = status_area_layout(n);
            assert_eq!(size % 4096, 0);
            assert_eq!(log % 4096, 0);
            assert!(log >= CPUS_OFFSET + n * core::mem::size_of::<CpuRecord>());
            assert_eq!(size - log, LOG_RING_SIZE);
        }
    }
}
