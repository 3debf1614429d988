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
//! | `devices_offset`        | `device_count` × [`DeviceRecord`]            |
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
    /// Offset of the first [`DeviceRecord`] (0x68).
    pub devices_offset: u32,
    /// Bytes per [`DeviceRecord`] (0x6C).
    pub device_record_size: u32,
    /// Number of valid [`DeviceRecord`]s (0x70).
    pub device_count: u32,
    /// PCI functions the loader found beyond [`MAX_DEVICES`] (0x74).
    pub devices_dropped: u32,
    /// Offset of the first [`IommuRecord`] (0x78).
    pub iommu_offset: u32,
    /// Number of [`IommuRecord`]s (0x7C).
    pub iommu_count: u32,
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

/// One PCI function of the device inventory (found by the loader through
/// ECAM before the OS starts).
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
pub struct DeviceRecord {
    /// Segment group (0x00).
    pub segment: u16,
    /// Bus (0x02).
    pub bus: u8,
    /// Device << 3 | function (0x03).
    pub devfn: u8,
    /// Vendor ID (0x04).
    pub vendor: u16,
    /// Device ID (0x06).
    pub device: u16,
    /// Class code << 8 | revision (0x08).
    pub class_rev: u32,
    /// Subsystem vendor ID (0x0C).
    pub subsys_vendor: u16,
    /// Subsystem ID (0x0E).
    pub subsys_device: u16,
    /// Header type (0x10).
    pub header_type: u8,
    /// [`OWNER_OS`], [`OWNER_HIDDEN`] or [`OWNER_APPLIANCE`] (0x11).
    pub owner: u8,
    /// [`DEV_FLAG_PCIE`], [`DEV_FLAG_SRIOV`], [`DEV_FLAG_VFS_ENABLED`]
    /// (0x12).
    pub flags: u8,
    /// Secondary bus of a bridge (0x13).
    pub secondary_bus: u8,
    /// SR-IOV TotalVFs as the device reports it (0x14).
    pub sriov_total_vfs: u16,
    /// SR-IOV TotalVFs as the OS sees it (0x16).
    pub sriov_os_vfs: u16,
    /// SR-IOV VF device ID (0x18).
    pub sriov_vf_device: u16,
    /// SR-IOV NumVFs at boot (0x1A).
    pub sriov_num_vfs: u16,
    /// 1-based index of the `[[device]]` rule that decided the owner, 0
    /// for the default (0x1C).
    pub rule: u8,
    /// 1-based index of the `[[sriov]]` rule that set the VF budget, 0 for
    /// none (0x1D).
    pub sriov_rule: u8,
    /// VF BAR space: one of the `VF_SPACE_*` values (0x1E).
    pub vf_space: u8,
    /// [`IOMMU_DOMAIN_OS`] or [`IOMMU_DOMAIN_BLOCKED`] (0x1F).
    pub iommu_domain: u8,
    /// The six BARs, sized (a 64-bit BAR fills its index, the next one is
    /// empty) (0x20).
    pub bars: [BarRecord; 6],
    /// Bytes the VF BARs need for TotalVFs VFs (0x80).
    pub vf_bar_space: u64,
    /// Bytes the VF BARs need for the VFs the OS may create (0x88).
    pub vf_bar_space_os: u64,
}

const _: () = assert!(core::mem::size_of::<DeviceRecord>() == 144);

/// One sized BAR.
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
pub struct BarRecord {
    /// Address the firmware assigned.
    pub base: u64,
    /// Size in bytes; 0 for an unimplemented BAR.
    pub size: u64,
}

/// BAR flags live in the low bits of [`BarRecord::base`] as in the
/// register: bit 0 I/O space, bits 2:1 = 2 for 64-bit, bit 3 prefetchable.
pub const BAR_FLAG_MASK: u64 = 0xf;

/// [`DeviceRecord::vf_space`]: not a PF, or nothing to check.
pub const VF_SPACE_NONE: u8 = 0;
/// [`DeviceRecord::vf_space`]: the VF BARs fit the bridge window.
pub const VF_SPACE_FITS: u8 = 1;
/// [`DeviceRecord::vf_space`]: the firmware assigned no VF BAR space.
pub const VF_SPACE_UNASSIGNED: u8 = 2;
/// [`DeviceRecord::vf_space`]: the VF BARs do not fit the bridge window.
pub const VF_SPACE_NO_ROOM: u8 = 3;
/// [`DeviceRecord::vf_space`]: on a root bus: no bridge window to check.
pub const VF_SPACE_ROOT_BUS: u8 = 4;

/// [`DeviceRecord::iommu_domain`]: the OS's domain (all OS memory).
pub const IOMMU_DOMAIN_OS: u8 = 1;
/// [`DeviceRecord::iommu_domain`]: no access at all (hidden function).
pub const IOMMU_DOMAIN_BLOCKED: u8 = 0;

/// [`DeviceRecord::owner`]: the OS drives the function directly.
pub const OWNER_OS: u8 = 0;
/// [`DeviceRecord::owner`]: hidden from the OS.
pub const OWNER_HIDDEN: u8 = 1;
/// [`DeviceRecord::owner`]: given to an appliance partition (hidden from
/// the OS; its DMA in the appliance's IOMMU domain, whose number is
/// [`DeviceRecord::iommu_domain`]).
pub const OWNER_APPLIANCE: u8 = 2;
/// [`DeviceRecord::flags`]: PCI Express function.
pub const DEV_FLAG_PCIE: u8 = 1 << 0;
/// [`DeviceRecord::flags`]: has an SR-IOV capability (a PF).
pub const DEV_FLAG_SRIOV: u8 = 1 << 1;
/// [`DeviceRecord::flags`]: VF Enable was set at boot.
pub const DEV_FLAG_VFS_ENABLED: u8 = 1 << 2;

/// Most devices the inventory holds.
pub const MAX_DEVICES: usize = 512;

/// One IOMMU unit in the status page.
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
pub struct IommuRecord {
    /// Register base (0x00).
    pub base: u64,
    /// `handoff::IOMMU_KIND_*` (0x08).
    pub kind: u8,
    /// [`IOMMU_STATE_OFF`], [`IOMMU_STATE_TRANSLATING`] or
    /// [`IOMMU_STATE_FAILED`] (0x09).
    pub state: u8,
    /// PCI segment (0x0A).
    pub segment: u16,
    /// DMA faults seen (0x0C).
    pub faults: u32,
    /// Page address of the last fault (0x10).
    pub last_fault_address: u64,
    /// Requester of the last fault (0x18).
    pub last_fault_source: u16,
    /// Reason code of the last fault (0x1A).
    pub last_fault_reason: u8,
    /// 1 if the last fault was a write (0x1B).
    pub last_fault_write: u8,
    /// Faults lost to overflow of the unit's recording registers (0x1C).
    pub overflows: u32,
    /// The OS's emulated unit at this base (`[iommu] os = "emulated"`):
    /// [`OS_UNIT_NONE`], [`OS_UNIT_OFF`] or [`OS_UNIT_TRANSLATING`] (0x20).
    pub os_state: u8,
    /// 1 where the OS's unit remaps interrupts (0x21).
    pub os_remapping: u8,
    /// Domains of the OS's that thinhv shadows (0x22).
    pub os_domains: u16,
    /// Faults recorded in the OS's unit's fault registers (0x24).
    pub os_faults: u32,
    /// Pages mapped in the shadows now (0x28).
    pub os_pages: u64,
    /// Pages the OS mapped that thinhv refused to map: its own or an
    /// appliance's (0x30).
    pub os_refused: u64,
    /// Real invalidations made for the OS's unit (0x38).
    pub os_flushes: u32,
    /// The OS's remapping entries in the real table (0x3C).
    pub os_entries: u32,
}

const _: () = assert!(core::mem::size_of::<IommuRecord>() == 64);

/// [`IommuRecord::os_state`]: the OS has no unit here.
pub const OS_UNIT_NONE: u8 = 0;
/// [`IommuRecord::os_state`]: the OS has a unit, translation off.
pub const OS_UNIT_OFF: u8 = 1;
/// [`IommuRecord::os_state`]: the OS's unit translates.
pub const OS_UNIT_TRANSLATING: u8 = 2;

/// [`IommuRecord::state`]: not translating (mode off, or not yet sealed).
pub const IOMMU_STATE_OFF: u8 = 0;
/// [`IommuRecord::state`]: translating: DMA into thinhv is blocked.
pub const IOMMU_STATE_TRANSLATING: u8 = 1;
/// [`IommuRecord::state`]: setting the unit up failed.
pub const IOMMU_STATE_FAILED: u8 = 2;

/// Most IOMMU records.
pub const MAX_IOMMU_RECORDS: usize = 8;

/// Log ring size.
pub const LOG_RING_SIZE: usize = 64 * 1024;

/// Offset of the CPU records.
pub const CPUS_OFFSET: usize = 0x80;

/// Offset of the device records for `max_cpus` CPUs.
pub const fn devices_offset(max_cpus: usize) -> usize {
    let cpus_end = CPUS_OFFSET + max_cpus * core::mem::size_of::<CpuRecord>();
    (cpus_end + 0x3f) & !0x3f
}

/// Offset of the IOMMU records for `max_cpus` CPUs.
pub const fn iommu_offset(max_cpus: usize) -> usize {
    devices_offset(max_cpus) + MAX_DEVICES * core::mem::size_of::<DeviceRecord>()
}

/// [`ApplianceRecord::flags`]: its processors were handed over in x2APIC
/// mode (its table asked for it and the processor has it).
pub const APPLIANCE_IN_X2APIC: u32 = 1 << 16;

/// One appliance partition (`thinhv appliances`); records whose name
/// starts with a NUL are unused.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::Immutable,
    zerocopy::KnownLayout,
)]
#[repr(C)]
pub struct ApplianceRecord {
    /// Its name, NUL-padded.
    pub name: [u8; 32],
    /// `thin_hv_core::partition::PartitionState` value: 0 unclaimed, 1
    /// stopped, 2 starting, 3 running, 4 crashed.
    pub state: u32,
    /// Processors.
    pub cpu_count: u32,
    /// Its RAM (host-physical).
    pub ram_base: u64,
    /// Its RAM size.
    pub ram_size: u64,
    /// TSC when its kernel last started (0: never).
    pub started_tsc: u64,
    /// TSC frequency in kHz (the loader's measurement).
    pub tsc_khz: u64,
    /// Starts after the first.
    pub restarts: u32,
    /// Crashes.
    pub crashes: u32,
    /// `handoff::partition_flags` (bits 0–15) and
    /// [`APPLIANCE_IN_X2APIC`].
    pub flags: u32,
    /// Console port (0: the log).
    pub console_port: u16,
    /// First APIC ID.
    pub first_apic_id: u16,
    /// Why it last stopped, NUL-padded.
    pub reason: [u8; 40],
    /// Its processors: bit `i` for the CPU record `i` (their exit counts
    /// are its exits).
    pub cpu_mask: u64,
}

const _: () = assert!(core::mem::size_of::<ApplianceRecord>() == 136);

/// Names for [`ApplianceRecord::state`].
pub const fn appliance_state_name(state: u32) -> &'static str {
    match state {
        0 => "unclaimed",
        1 => "stopped",
        2 => "starting",
        3 => "running",
        4 => "crashed",
        _ => "?",
    }
}

/// Offset of the appliance records (`handoff::MAX_APPLIANCES` of them).
pub const fn appliances_offset(max_cpus: usize) -> usize {
    iommu_offset(max_cpus) + MAX_IOMMU_RECORDS * core::mem::size_of::<IommuRecord>()
}

/// Offset of the appliance control doorbell ([`ControlCommand`], 8 bytes,
/// the only place in the status area the OS may write: every other write
/// there is discarded), followed by the last result ([`ControlResult`],
/// 8 bytes).
pub const fn control_offset(max_cpus: usize) -> usize {
    appliances_offset(max_cpus)
        + crate::handoff::MAX_APPLIANCES * core::mem::size_of::<ApplianceRecord>()
}

/// Size of the status area for `max_cpus` CPUs, page-aligned, and the
/// offset of its log ring.
pub const fn status_area_layout(max_cpus: usize) -> (usize, usize) {
    let iommu_end = control_offset(max_cpus) + 16;
    let log_offset = (iommu_end + 0xfff) & !0xfff;
    (log_offset + LOG_RING_SIZE, log_offset)
}

/// A short name for a PCI class code (base class, subclass).
pub const fn class_name(base: u8, sub: u8) -> &'static str {
    match (base, sub) {
        (0x01, 0x00) => "SCSI controller",
        (0x01, 0x01) => "IDE controller",
        (0x01, 0x04) => "RAID controller",
        (0x01, 0x06) => "SATA controller",
        (0x01, 0x07) => "SAS controller",
        (0x01, 0x08) => "NVMe controller",
        (0x01, _) => "storage controller",
        (0x02, 0x00) => "Ethernet controller",
        (0x02, _) => "network controller",
        (0x03, _) => "display controller",
        (0x04, _) => "multimedia controller",
        (0x05, _) => "memory controller",
        (0x06, 0x00) => "host bridge",
        (0x06, 0x01) => "ISA bridge",
        (0x06, 0x04) => "PCI bridge",
        (0x06, _) => "bridge",
        (0x07, _) => "communication controller",
        (0x08, _) => "system peripheral",
        (0x0c, 0x03) => "USB controller",
        (0x0c, 0x05) => "SMBus controller",
        (0x0c, _) => "serial bus controller",
        (0x00, _) => "unclassified device",
        _ => "device",
    }
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
            assert!(log >= devices_offset(n) + MAX_DEVICES * core::mem::size_of::<DeviceRecord>());
            assert!(devices_offset(n) >= CPUS_OFFSET + n * core::mem::size_of::<CpuRecord>());
            assert_eq!(size - log, LOG_RING_SIZE);
        }
    }
}

/// What the OS asks of an appliance (`thinhv appliance stop|start|restart`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlOp {
    /// Its processors stop and wait in thinhv.
    Stop,
    /// A stopped or crashed appliance boots again (RAM scrubbed, image
    /// restored).
    Start,
    /// Stop, then start.
    Restart,
}

impl ControlOp {
    const fn code(self) -> u64 {
        match self {
            Self::Stop => 1,
            Self::Start => 2,
            Self::Restart => 3,
        }
    }

    /// Its name in logs and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Start => "start",
            Self::Restart => "restart",
        }
    }
}

/// One control request, written as a single aligned 8-byte store to the
/// doorbell at [`control_offset`]: bits 63..48 [`ControlCommand::MAGIC`],
/// 47..16 a sequence number the caller picks (its result carries it back),
/// 15..8 the appliance's partition number (its record's index + 1), 7..0
/// the operation (1 stop, 2 start, 3 restart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlCommand {
    /// The operation.
    pub op: ControlOp,
    /// The appliance's partition number (1 for the first record).
    pub partition: u8,
    /// The caller's sequence number.
    pub seq: u32,
}

impl ControlCommand {
    /// Bits 63..48 of every command ("th").
    pub const MAGIC: u64 = 0x7468;

    /// The doorbell word.
    pub const fn encode(self) -> u64 {
        (Self::MAGIC << 48)
            | ((self.seq as u64) << 16)
            | ((self.partition as u64) << 8)
            | self.op.code()
    }

    /// The command in a doorbell word, if it is one.
    #[allow(clippy::cast_possible_truncation)] // the fields, by their widths
    pub const fn decode(word: u64) -> Option<Self> {
        if word >> 48 != Self::MAGIC {
            return None;
        }
        let op = match word & 0xff {
            1 => ControlOp::Stop,
            2 => ControlOp::Start,
            3 => ControlOp::Restart,
            _ => return None,
        };
        Some(Self {
            op,
            partition: (word >> 8) as u8,
            seq: (word >> 16) as u32,
        })
    }
}

/// The outcome of the last control request, at [`control_offset`] + 8:
/// bits 63..32 its sequence number, 31..0 a
/// [`crate::hypercall::Status`] (ok, not permitted: `control = "none"`,
/// invalid argument: no such appliance or a malformed word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlResult {
    /// The request's sequence number.
    pub seq: u32,
    /// Its status.
    pub status: crate::hypercall::Status,
}

impl ControlResult {
    /// The result word.
    pub const fn encode(self) -> u64 {
        ((self.seq as u64) << 32) | (self.status.0 & 0xffff_ffff)
    }

    /// The result in a result word.
    #[allow(clippy::cast_possible_truncation)] // the sequence number, bits 63..32
    pub const fn decode(word: u64) -> Self {
        Self {
            seq: (word >> 32) as u32,
            status: crate::hypercall::Status(word & 0xffff_ffff),
        }
    }
}

#[cfg(test)]
mod control_tests {
    use super::*;

    #[test]
    fn control_words_round_trip_and_strangers_are_not_commands() {
        for op in [ControlOp::Stop, ControlOp::Start, ControlOp::Restart] {
            let c = ControlCommand {
                op,
                partition: 3,
                seq: 0xdead_beef,
            };
            assert_eq!(ControlCommand::decode(c.encode()), Some(c));
        }
        let stop = ControlCommand {
            op: ControlOp::Stop,
            partition: 1,
            seq: 7,
        }
        .encode();
        assert_eq!(stop, 0x7468_0000_0007_0101);
        assert_eq!(ControlCommand::decode(stop & !(1 << 60)), None);
        assert_eq!(ControlCommand::decode((stop & !0xff) | 4), None);
        assert_eq!(ControlCommand::decode(0), None);
        let r = ControlResult {
            seq: 9,
            status: crate::hypercall::Status::NOT_PERMITTED,
        };
        assert_eq!(ControlResult::decode(r.encode()), r);
    }

    #[test]
    fn the_doorbell_sits_after_the_appliance_records_and_before_the_log() {
        let (size, log) = status_area_layout(64);
        assert!(control_offset(64).is_multiple_of(8));
        assert!(control_offset(64) + 16 <= log);
        assert!(log < size);
    }
}
