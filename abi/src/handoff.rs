//! What the loader hands the core, and the core's entry point ABI.
//!
//! The loader (`efi-app`) reserves one block of memory, loads the core's ELF
//! into it, writes a [`Handoff`] there and calls the entry point:
//!
//! ```text
//! extern "sysv64" fn thinhv_core_entry(op: u64, a0: u64, a1: u64, a2: u64) -> u64
//! ```
//!
//! * [`CORE_OP_INIT`] (`a0` = physical address of the `Handoff`): global
//!   set-up, once, on the bootstrap processor, before any CPU is virtualized.
//! * [`CORE_OP_VIRTUALIZE`] (`a0` = CPU index, `a1` = resume RIP, `a2` =
//!   resume RSP): virtualize the calling CPU. On success the call does not
//!   return: the CPU continues **in guest mode** at `a1` with RSP = `a2` and
//!   RAX = 0, so `a1` must be loader code (the core is invisible to the
//!   guest). On failure it returns a nonzero [`CoreError`].
//! * [`CORE_OP_RELEASE`] (no arguments): roll-back, natively on the
//!   bootstrap processor once no CPU is virtualized any more, before the
//!   loader frees the region: the core switches off the IOMMU translation
//!   it turned on at the end of `CORE_OP_INIT` (its tables live in the
//!   region). A nonzero [`CoreError`] means the region must stay reserved.
//!
//! Everything is identity-mapped: physical addresses are usable as pointers
//! by both sides while the firmware's page tables are active.

use crate::PhysRange;

/// [`Handoff::magic`].
pub const HANDOFF_MAGIC: u64 = u64::from_le_bytes(*b"THINHVHO");
/// Most processors thinhv manages.
pub const MAX_CPUS: usize = 256;
/// Most RAM ranges passed to the core.
pub const MAX_RAM_RANGES: usize = 128;
/// Most read-only ranges of the core image covered by the integrity CRC.
pub const MAX_RO_RANGES: usize = 4;

/// Entry operation: global initialization.
pub const CORE_OP_INIT: u64 = 1;
/// Entry operation: virtualize this CPU.
pub const CORE_OP_VIRTUALIZE: u64 = 2;
/// Entry operation: roll-back, before the loader frees the region.
pub const CORE_OP_RELEASE: u64 = 3;

/// Bytes the loader sets aside for the hand-off at the start of the
/// protected region (the core image follows).
pub const HANDOFF_AREA: u64 = (core::mem::size_of::<Handoff>() as u64).div_ceil(4096) * 4096;

/// Name of the core's entry symbol.
pub const CORE_ENTRY_SYMBOL: &str = "thinhv_core_entry";

/// Error returned by the core entry point. Zero is success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreError(pub u64);

impl CoreError {
    /// Success.
    pub const OK: Self = Self(0);
    /// The hand-off is malformed (magic, version, size or ranges).
    pub const BAD_HANDOFF: Self = Self(1);
    /// The operation is unknown.
    pub const BAD_OP: Self = Self(2);
    /// CPU index out of range or CPU already virtualized.
    pub const BAD_CPU: Self = Self(3);
    /// `CORE_OP_VIRTUALIZE` before `CORE_OP_INIT`.
    pub const NOT_INITIALIZED: Self = Self(4);
    /// The reserved memory is too small.
    pub const OUT_OF_MEMORY: Self = Self(5);
    /// The processor refused to enable virtualization (EFER.SVME, VMXON).
    pub const ENABLE_FAILED: Self = Self(6);
    /// The CPU lacks a required feature.
    pub const UNSUPPORTED_CPU: Self = Self(7);
    /// Refused on purpose (`[debug] fail_cpu`, used by tests).
    pub const INJECTED_FAILURE: Self = Self(8);
    /// The first VM entry failed.
    pub const ENTRY_FAILED: Self = Self(9);
    /// An IOMMU unit could not be switched off (`CORE_OP_RELEASE`): the
    /// region holding its tables must stay reserved.
    pub const IOMMU_STILL_ON: Self = Self(10);

    /// Human-readable text.
    pub const fn describe(self) -> &'static str {
        match self.0 {
            0 => "success",
            1 => "malformed hand-off from the loader",
            2 => "unknown core operation",
            3 => "bad or duplicate CPU index",
            4 => "core not initialized",
            5 => "reserved memory too small",
            6 => "the processor refused to enable virtualization",
            7 => "processor lacks a required feature",
            8 => "failure injected by [debug] fail_cpu",
            9 => "the first VM entry failed",
            10 => "an IOMMU could not be switched off",
            _ => "unknown core error",
        }
    }
}

/// Settings the core needs from `thinhv.toml`.
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
pub struct CoreConfig {
    /// 0 off, 1 error, 2 warn, 3 info, 4 debug, 5 trace (0x00).
    pub log_level: u8,
    /// Nonzero: do not announce the hypervisor through CPUID (0x01).
    pub hide_hypervisor: u8,
    /// What a fatal error in the core does: [`ON_FATAL_HALT`] or
    /// [`ON_FATAL_RESET`] (0x02).
    pub on_fatal: u8,
    /// For tests: nonzero lets the loader ask for a deliberate exception in
    /// host mode (`Function::DEBUG_HOST_FAULT`) before sealing (0x03).
    pub debug_host_fault: u8,
    /// I/O port of the 16550 serial log, 0 for none (0x04).
    pub serial_port: u16,
    /// Reserved (0x06).
    pub reserved1: u16,
    /// For tests: CPU index on which `CORE_OP_VIRTUALIZE` fails on purpose,
    /// `u32::MAX` for none (0x08).
    pub debug_fail_cpu: u32,
    /// How AP start-up (INIT/SIPI) is handled: [`INIT_SIPI_AUTO`],
    /// [`INIT_SIPI_ACTIVITY`] or [`INIT_SIPI_INTERCEPT`] (0x0C).
    pub init_sipi: u8,
    /// Reserved (0x0D).
    pub reserved2: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<CoreConfig>() == 16);

/// [`CoreConfig::init_sipi`]: the processor's wait-for-SIPI activity state
/// where VMX has it, else intercepting the APIC's ICR.
pub const INIT_SIPI_AUTO: u8 = 0;
/// [`CoreConfig::init_sipi`]: VMX wait-for-SIPI activity state (INIT and
/// SIPI VM exits).
pub const INIT_SIPI_ACTIVITY: u8 = 1;
/// [`CoreConfig::init_sipi`]: intercept ICR writes, deliver SIPIs through
/// the hypervisor (always so on SVM).
pub const INIT_SIPI_INTERCEPT: u8 = 2;

/// [`CoreConfig::on_fatal`]: stop the CPU (print and halt).
pub const ON_FATAL_HALT: u8 = 0;
/// [`CoreConfig::on_fatal`]: print, then reset the platform.
pub const ON_FATAL_RESET: u8 = 1;

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            log_level: 3,
            hide_hypervisor: 0,
            on_fatal: ON_FATAL_HALT,
            debug_host_fault: 0,
            serial_port: 0x3f8,
            reserved1: 0,
            debug_fail_cpu: u32::MAX,
            init_sipi: INIT_SIPI_AUTO,
            reserved2: [0; 3],
        }
    }
}

/// Most IOMMU units thinhv drives.
pub const MAX_IOMMUS: usize = 8;
/// Most I/O APICs whose redirection entries thinhv judges.
pub const MAX_IOAPICS: usize = 8;
/// Most reserved-memory (RMRR / IVMD unity) ranges kept mapped for DMA.
pub const MAX_IOMMU_RESERVED: usize = 16;

/// [`IommuHandoff::mode`]: leave the IOMMU to the OS.
pub const IOMMU_MODE_OFF: u8 = 0;
/// [`IommuHandoff::mode`]: thinhv owns the IOMMU; the OS does not see it.
pub const IOMMU_MODE_PROTECT: u8 = 1;
/// [`IommuHandoff::kind`]: none found.
pub const IOMMU_KIND_NONE: u8 = 0;
/// [`IommuHandoff::kind`]: Intel VT-d (DMAR).
pub const IOMMU_KIND_VTD: u8 = 1;
/// [`IommuHandoff::kind`]: AMD-Vi (IVRS).
pub const IOMMU_KIND_AMDVI: u8 = 2;

/// One remapping unit.
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
pub struct IommuUnit {
    /// Register base.
    pub base: u64,
    /// Register bytes.
    pub size: u64,
    /// PCI segment.
    pub segment: u16,
    /// Reserved.
    pub reserved: [u16; 3],
}

/// An I/O APIC whose redirection entries thinhv judges for the OS: its
/// register page is out of the OS's second-level tables and emulated
/// (`handlers::ioapic`), where appliances run and `[iommu] interrupts` is
/// `"remap"`.
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
pub struct IoApicInfo {
    /// Register base (IOREGSEL; IOWIN at +0x10), from the MADT.
    pub base: u64,
    /// Its first global system interrupt.
    pub gsi_base: u32,
    /// Its I/O APIC ID.
    pub id: u32,
    /// [`IOAPIC_SOURCE_KNOWN`] with the source ID its messages carry
    /// (VT-d: from the DMAR's I/O APIC device scope) in bits 15:0; 0
    /// where none is known.
    pub source: u32,
    /// Reserved.
    pub reserved: u32,
}

/// [`IoApicInfo::source`]: the source ID is known.
pub const IOAPIC_SOURCE_KNOWN: u32 = 1 << 16;

impl IoApicInfo {
    /// The source ID its messages carry, where known.
    #[allow(clippy::cast_possible_truncation)] // the low 16 bits, masked
    pub const fn source_id(&self) -> Option<u16> {
        if self.source & IOAPIC_SOURCE_KNOWN != 0 {
            Some((self.source & 0xffff) as u16)
        } else {
            None
        }
    }
}

impl IommuUnit {
    /// The whole pages its registers occupy: what the guest's second-level
    /// tables never map to it.
    pub const fn window(&self) -> PhysRange {
        let page = crate::layout::PAGE;
        let size = if self.size > page { self.size } else { page };
        PhysRange::new(self.base & !(page - 1), size.div_ceil(page) * page)
    }
}

/// The platform IOMMU as the loader found it in ACPI.
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
pub struct IommuHandoff {
    /// [`IOMMU_MODE_OFF`] or [`IOMMU_MODE_PROTECT`].
    pub mode: u8,
    /// [`IOMMU_KIND_NONE`], [`IOMMU_KIND_VTD`] or [`IOMMU_KIND_AMDVI`].
    pub kind: u8,
    /// [`IOMMU_INTERRUPTS_REMAP`] (thinhv remaps interrupt messages where
    /// appliances need it and the unit can) or [`IOMMU_INTERRUPTS_OFF`].
    pub interrupts: u8,
    /// [`IOMMU_FLAG_BLOCK_COMPAT`] or 0.
    pub flags: u8,
    /// Valid `units`.
    pub count: u32,
    /// The units.
    pub units: [IommuUnit; MAX_IOMMUS],
    /// Valid `reserved_ranges`.
    pub reserved_count: u32,
    /// AMD-Vi: requester IDs the device table covers (0..device_ids).
    pub device_ids: u32,
    /// Memory devices use for DMA by firmware agreement (RMRR), kept
    /// identity-mapped.
    pub reserved_ranges: [PhysRange; MAX_IOMMU_RESERVED],
    /// Valid `shared`.
    pub shared_count: u32,
    /// [`IOMMU_OS_NONE`] or [`IOMMU_OS_EMULATED`]: whether the OS gets an
    /// emulated unit of its own (`docs/os-iommu.md`).
    pub os: u8,
    /// Reserved.
    pub reserved1: [u8; 3],
    /// AMD-Vi: requester IDs whose device table entries name one
    /// interrupt remapping table of thinhv's, shared by the functions
    /// among them whose messages thinhv remaps (each a part of its
    /// entries): the IDs an OS function behind a conventional PCI bridge
    /// may send with (the bridge's own, every ID on the buses below it,
    /// the IDs the IVRS aliases them to), all the OS's.
    pub shared: [SharedIds; MAX_SHARED_IDS],
}

/// Most [`IommuHandoff::shared`] ranges.
pub const MAX_SHARED_IDS: usize = 8;
/// Most tables [`IommuHandoff::shared`] ranges name (`SharedIds::table`
/// below it).
pub const MAX_SHARED_TABLES: usize = 4;

/// Requester IDs `first..=last` whose interrupts go through shared
/// table `table` ([`IommuHandoff::shared`]).
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
pub struct SharedIds {
    /// First routing ID.
    pub first: u16,
    /// Last routing ID.
    pub last: u16,
    /// Which shared table (below [`MAX_SHARED_TABLES`]).
    pub table: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

/// [`IommuHandoff::flags`]: every interrupt source the OS has sends
/// through an entry thinhv writes (its MSI and MSI-X functions, its I/O
/// APICs; no MSI-capable HPET, no virtual functions it can create that
/// thinhv has not registered), so
/// once the appliances are claimed a VT-d unit that remaps interrupts may
/// block compatibility-format messages, and an AMD-Vi unit may abort the
/// interrupts of every requester ID without a remapping table but the
/// I/O APICs' (the IDs of [`IommuHandoff::shared`] have a table).
pub const IOMMU_FLAG_BLOCK_COMPAT: u8 = 1;
/// [`IommuHandoff::flags`]: the OS's emulated VT-d unit offers interrupt
/// remapping (`[iommu] os = "emulated"`, no appliances, the platform's DMAR
/// announces it); the core confirms from the units' capabilities.
pub const IOMMU_FLAG_OS_REMAP: u8 = 2;

/// [`IommuHandoff::interrupts`]: interrupt messages are not remapped
/// (`[iommu] interrupts = "off"`).
pub const IOMMU_INTERRUPTS_OFF: u8 = 0;
/// [`IommuHandoff::os`]: the OS has no IOMMU (its DMAR or IVRS hidden).
pub const IOMMU_OS_NONE: u8 = 0;
/// [`IommuHandoff::os`]: the OS programs an emulated unit at the real
/// one's register window (VT-d), composed with thinhv's protection.
pub const IOMMU_OS_EMULATED: u8 = 1;
/// [`IommuHandoff::interrupts`]: remapped (the default).
pub const IOMMU_INTERRUPTS_REMAP: u8 = 1;

impl IommuHandoff {
    /// Whether thinhv judges the interrupt messages of the functions it
    /// mediates (`[iommu] interrupts = "remap"`, a unit it protects with):
    /// through remapping tables of its own (AMD-Vi; VT-d where the unit
    /// remaps interrupts), else by writing the judged message itself
    /// (VT-d, compatibility format).
    pub const fn remaps_interrupts(&self) -> bool {
        self.mode == IOMMU_MODE_PROTECT
            && (self.kind == IOMMU_KIND_AMDVI || self.kind == IOMMU_KIND_VTD)
            && self.interrupts == IOMMU_INTERRUPTS_REMAP
    }

    /// The valid [`Self::shared`] ranges.
    pub fn shared(&self) -> &[SharedIds] {
        &self.shared[..(self.shared_count as usize).min(MAX_SHARED_IDS)]
    }

    /// The shared table whose entries the interrupts of `rid` are looked
    /// up in ([`Self::shared`]), if any.
    pub fn shared_table_of(&self, rid: u16) -> Option<u8> {
        self.shared()
            .iter()
            .find(|r| (r.first..=r.last).contains(&rid))
            .map(|r| r.table)
    }

    /// Whether the shared ranges are sound: each in order, naming a table
    /// below [`MAX_SHARED_TABLES`], and ranges of different tables
    /// disjoint (an ID's device table entry names one table).
    fn shared_sound(&self) -> bool {
        let s = self.shared();
        s.iter()
            .all(|r| r.first <= r.last && usize::from(r.table) < MAX_SHARED_TABLES)
            && s.iter().all(|a| {
                s.iter()
                    .all(|b| a.table == b.table || a.last < b.first || b.last < a.first)
            })
    }

    /// The valid units.
    pub fn units(&self) -> &[IommuUnit] {
        &self.units[..(self.count as usize).min(MAX_IOMMUS)]
    }

    /// The valid reserved ranges.
    pub fn reserved_ranges(&self) -> &[PhysRange] {
        &self.reserved_ranges[..(self.reserved_count as usize).min(MAX_IOMMU_RESERVED)]
    }
}

/// Most PCI functions whose configuration space the core mediates.
pub const MAX_PCI_MEDIATED: usize = 128;
/// Most routing-ID ranges the IOMMU refuses all DMA.
pub const MAX_PCI_BLOCKED: usize = 32;

/// [`PciMediation::action`]: the function is hidden from the OS
/// (configuration space reads as all ones, writes dropped).
pub const PCI_ACTION_HIDE: u8 = 1;
/// [`PciMediation::action`]: the OS sees at most `os_vfs` VFs of this PF.
pub const PCI_ACTION_VF_BUDGET: u8 = 2;
/// [`PciMediation::action`]: the OS shares this PF's VFs with appliances:
/// its SR-IOV registers are a view ([`PciHandoff::shared`] entry
/// `PciMediation::reserved`).
pub const PCI_ACTION_VF_SHARED: u8 = 3;

/// Most PFs whose VFs the OS shares with appliances.
pub const MAX_SHARED_PFS: usize = 4;

/// A function the OS sees in a PF's place ([`PciHandoff::presented`],
/// index in [`PciMediation::reserved`]): an NVMe PF thinhv keeps shows the
/// OS its VF 1 there.
pub const PCI_ACTION_PRESENT_VF: u8 = 4;

/// A bridge the OS keeps but may neither reset (Secondary Bus Reset) nor
/// take the link of (Link Disable): the one above an NVMe PF thinhv keeps.
/// [`PciMediation::sriov_cap`] holds the offset of its PCI Express
/// capability (0: none).
pub const PCI_ACTION_BRIDGE_GUARD: u8 = 5;

/// A function of the OS's that signals by MSI or MSI-X, whose messages
/// thinhv remaps (an AMD-Vi unit, appliances present): the address and
/// data the OS writes into its MSI capability and MSI-X table are
/// thinhv's to judge and keep (`handlers::msi_remap` in the core); the
/// rest is as written. [`PciMediation::sriov_cap`]: its MSI capability
/// where it has no MSI-X (0 otherwise); [`PciMediation::source_check`]:
/// which requester IDs its remapping entries accept.
pub const PCI_ACTION_MSI: u8 = 6;

/// The real AMD-Vi unit's own function, where the OS drives an emulated
/// unit in its place (`[iommu] os = "emulated"`): its IOMMU capability
/// shows NpCache, its MSI capability is the OS's own copy, and no other
/// write reaches it (`thinhv_passthrough::mediate::UnitFunction`).
/// [`PciMediation::sriov_cap`]: the IOMMU capability's offset;
/// [`PciMediation::source`]: the MSI capability's (0: none).
pub const PCI_ACTION_AMDVI_UNIT: u8 = 7;

/// [`PciMediation::source_check`]: its own routing ID, all 16 bits (VT-d
/// SVT 01b).
pub const MSI_SOURCE_OWN: u8 = 0;
/// [`PciMediation::source_check`]: a requester ID whose bus lies within
/// [`PciMediation::source`]'s (first bus << 8 | last bus; VT-d SVT 10b):
/// a function behind a PCI Express to PCI bridge, whose messages carry the
/// bridge's secondary bus with device and function 0 (or, from PCI-X, its
/// own ID), never the ID of a function outside that bridge.
pub const MSI_SOURCE_BUSES: u8 = 1;

/// Most BARs thinhv keeps from everyone ([`PciHandoff::held`]).
pub const MAX_HELD_BARS: usize = 8;

/// A PF whose VFs the OS shares with appliances: its SR-IOV capability as
/// the loader set it up (`thinhv_passthrough::shared_pf::Setup`).
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
pub struct SharedPf {
    /// Requester ID of the PF (segment 0).
    pub rid: u16,
    /// Offset of the SR-IOV capability.
    pub cap: u16,
    /// The OS's budget (its VFs are `1..=os_vfs`).
    pub os_vfs: u16,
    /// InitialVFs as the device reports it.
    pub initial_vfs: u16,
    /// NumVFs in the device.
    pub num_vfs: u16,
    /// SR-IOV Control in the device.
    pub control: u16,
    /// Offset of Device Control (PCI Express capability + 8), 0 if none.
    pub devctl: u16,
    /// First VF Offset with the setup's NumVFs (VF `k` is at routing ID
    /// `rid + first_vf_offset + (k - 1) * vf_stride`).
    pub first_vf_offset: u16,
    /// System Page Size in the device.
    pub page_size: u32,
    /// VF BAR registers in the device.
    pub vf_bars: [u32; 6],
    /// Per VF BAR register, the bits a write sets.
    pub vf_bar_masks: [u32; 6],
    /// VF Stride with the setup's NumVFs.
    pub vf_stride: u16,
    /// Reserved (0).
    pub reserved: u16,
}

/// One function whose configuration space the core mediates.
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
pub struct PciMediation {
    /// Bus.
    pub bus: u8,
    /// Device << 3 | function.
    pub devfn: u8,
    /// [`PCI_ACTION_HIDE`] or [`PCI_ACTION_VF_BUDGET`].
    pub action: u8,
    /// Reserved.
    pub reserved: u8,
    /// VF budget: offset of the SR-IOV capability.
    pub sriov_cap: u16,
    /// VF budget: TotalVFs as the OS sees it.
    pub os_vfs: u16,
    /// VF budget: InitialVFs as the device reports it.
    pub initial_vfs: u16,
    /// VF budget: TotalVFs as the device reports it.
    pub total_vfs: u16,
    /// MSI: see [`Self::source_check`].
    pub source: u16,
    /// MSI: [`MSI_SOURCE_OWN`] or [`MSI_SOURCE_BUSES`].
    pub source_check: u8,
    /// [`MEDIATION_REMAP_MSI`] or 0.
    pub flags: u8,
}

/// [`PciMediation::flags`]: a PF whose VFs the OS shares
/// ([`PCI_ACTION_VF_SHARED`]) or has a budget of ([`PCI_ACTION_VF_BUDGET`])
/// whose own MSI and MSI-X messages thinhv remaps too, as for
/// [`PCI_ACTION_MSI`].
pub const MEDIATION_REMAP_MSI: u8 = 1;

impl PciMediation {
    /// Whether thinhv judges and remaps this function's MSI and MSI-X
    /// messages.
    pub const fn remaps_msi(&self) -> bool {
        self.action == PCI_ACTION_MSI
            || (self.action == PCI_ACTION_VF_SHARED || self.action == PCI_ACTION_VF_BUDGET)
                && self.flags & MEDIATION_REMAP_MSI != 0
    }
}

/// An inclusive range of PCI routing IDs (bus << 8 | devfn).
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
pub struct RidRange {
    /// First routing ID.
    pub first: u16,
    /// Last routing ID.
    pub last: u16,
}

/// PCI ownership: which configuration pages and ports the core mediates,
/// and which requesters the IOMMU refuses (segment 0).
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
pub struct PciHandoff {
    /// ECAM base of segment 0 as the MCFG gives it: where bus 0 would be,
    /// also when `bus_start` is above 0 (bus `n` at `ecam_base + (n << 20)`;
    /// PCI Firmware Specification 3.0 §4.1.2), or 0.
    pub ecam_base: u64,
    /// First bus the ECAM region decodes.
    pub bus_start: u8,
    /// Last bus the ECAM region decodes.
    pub bus_end: u8,
    /// Reserved.
    pub reserved: u16,
    /// Valid `mediated`.
    pub count: u32,
    /// The mediated functions.
    pub mediated: [PciMediation; MAX_PCI_MEDIATED],
    /// Valid `blocked`.
    pub blocked_count: u32,
    /// Reserved.
    pub reserved2: u32,
    /// Requesters the IOMMU gives no access at all (hidden functions and
    /// their potential VFs).
    pub blocked: [RidRange; MAX_PCI_BLOCKED],
    /// Valid `shared`.
    pub shared_count: u32,
    /// Reserved.
    pub reserved3: u32,
    /// PFs whose VFs the OS shares with appliances.
    pub shared: [SharedPf; MAX_SHARED_PFS],
    /// Functions the OS sees in a PF's place ([`PCI_ACTION_PRESENT_VF`]):
    /// the real function (`rid`), its IDs (`vf_ids`) and BARs.
    pub presented: [PartitionDevice; MAX_SHARED_PFS],
    /// Valid `held`.
    pub held_count: u32,
    /// Reserved.
    pub reserved4: u32,
    /// BARs of functions thinhv keeps (an NVMe PF's): blank in the OS's
    /// second-level tables and IOMMU domain, mapped nowhere.
    pub held: [PhysRange; MAX_HELD_BARS],
    /// Valid `budget`.
    pub budget_count: u32,
    /// Reserved.
    pub reserved5: u32,
    /// PFs with a plain VF budget ([`PCI_ACTION_VF_BUDGET`]) whose VFs'
    /// messages thinhv remaps: `rid`, `cap`, `os_vfs`, `vf_bar_masks`, and
    /// First VF Offset and VF Stride with NumVFs = `os_vfs`, as the loader
    /// read them. The OS places the VF BARs and turns VF Enable on and
    /// off: those are read from the device when a VF's MSI-X is enabled
    /// (`vf_bars`, `num_vfs` and `control` unused).
    pub budget: [SharedPf; MAX_SHARED_PFS],
}

impl Default for PciHandoff {
    fn default() -> Self {
        // All zero: nothing mediated, nothing blocked.
        zerocopy::FromZeros::new_zeroed()
    }
}

impl PciHandoff {
    /// The valid mediated functions.
    pub fn mediated(&self) -> &[PciMediation] {
        &self.mediated[..(self.count as usize).min(MAX_PCI_MEDIATED)]
    }

    /// The valid shared PFs.
    pub fn shared(&self) -> &[SharedPf] {
        &self.shared[..(self.shared_count as usize).min(MAX_SHARED_PFS)]
    }

    /// The valid [`Self::budget`] entries.
    pub fn budget(&self) -> &[SharedPf] {
        &self.budget[..(self.budget_count as usize).min(MAX_SHARED_PFS)]
    }

    /// The valid held BARs.
    pub fn held(&self) -> &[PhysRange] {
        &self.held[..(self.held_count as usize).min(MAX_HELD_BARS)]
    }

    /// Takes `rid` out of the blocked ranges (a range around it is split;
    /// false when that needs a slot there is not).
    pub fn unblock(&mut self, rid: u16) -> bool {
        let count = (self.blocked_count as usize).min(MAX_PCI_BLOCKED);
        let Some(at) = self.blocked[..count]
            .iter()
            .position(|r| (r.first..=r.last).contains(&rid))
        else {
            return true;
        };
        let range = self.blocked[at];
        let below = (range.first < rid).then(|| RidRange {
            first: range.first,
            last: rid - 1,
        });
        let above = (rid < range.last).then(|| RidRange {
            first: rid + 1,
            last: range.last,
        });
        match (below, above) {
            (None, None) => {
                self.blocked.copy_within(at + 1..count, at);
                self.blocked_count -= 1;
            }
            (Some(part), None) | (None, Some(part)) => self.blocked[at] = part,
            (Some(low), Some(high)) => {
                if count == MAX_PCI_BLOCKED {
                    return false;
                }
                self.blocked[at] = low;
                self.blocked[count] = high;
                self.blocked_count += 1;
            }
        }
        true
    }

    /// The valid blocked ranges.
    pub fn blocked(&self) -> &[RidRange] {
        &self.blocked[..(self.blocked_count as usize).min(MAX_PCI_BLOCKED)]
    }

    /// Whether the IOMMU refuses `rid`.
    pub fn is_blocked(&self, rid: u16) -> bool {
        self.blocked()
            .iter()
            .any(|r| (r.first..=r.last).contains(&rid))
    }

    /// The mediated function whose ECAM page holds `pa`, with the offset of
    /// `pa` in its configuration space.
    pub fn mediated_at(&self, pa: u64) -> Option<(&PciMediation, u16)> {
        if self.count == 0 || self.ecam_base == 0 || pa < self.ecam_base {
            return None;
        }
        let off = pa - self.ecam_base;
        let bus = off >> 20;
        if bus < u64::from(self.bus_start) || bus > u64::from(self.bus_end) {
            return None;
        }
        let devfn = u8::try_from((off >> 12) & 0xff).ok()?;
        let m = self.find(u8::try_from(bus).ok()?, devfn)?;
        Some((m, u16::try_from(off & 0xfff).ok()?))
    }

    /// The mediated function at `bus`/`devfn`.
    pub fn find(&self, bus: u8, devfn: u8) -> Option<&PciMediation> {
        self.mediated()
            .iter()
            .find(|m| m.bus == bus && m.devfn == devfn)
    }

    /// Physical address of the ECAM page of a mediated function.
    pub fn page_of(&self, m: &PciMediation) -> u64 {
        self.ecam_base + (u64::from(m.bus) << 20) + (u64::from(m.devfn) << 12)
    }

    /// Checks that the core can trap every mediated function's
    /// configuration space: each on a bus the ECAM region decodes, each
    /// ECAM page below `map_top` (the end of the core's second-level map).
    /// The loader leaves any other function with the OS
    /// (`thinhv_passthrough::policy::Reach`); a hand-off that still holds
    /// one is refused, never half enforced.
    pub fn check(&self, map_top: u64) -> Result<(), &'static str> {
        for m in self.mediated() {
            if m.bus < self.bus_start || m.bus > self.bus_end {
                return Err("mediated PCI function outside the ECAM region's buses");
            }
            if self
                .page_of(m)
                .checked_add(4096)
                .is_none_or(|end| end > map_top)
            {
                return Err("mediated PCI function's ECAM page beyond the core's map");
            }
            if m.source_check == MSI_SOURCE_BUSES && (m.source >> 8) > (m.source & 0xff) {
                return Err("mediated PCI function's source buses out of order");
            }
        }
        Ok(())
    }
}

/// The end (exclusive) of the core's identity maps, host and second-level,
/// for a firmware memory map ending at `phys_top`: at least 4 GiB, rounded
/// up to a GiB. Anything above is mapped only on first touch.
pub const fn identity_map_top(phys_top: u64) -> u64 {
    let top = if phys_top < (4 << 30) {
        4 << 30
    } else {
        phys_top
    };
    top.div_ceil(1 << 30) << 30
}

/// Most entries in [`CpuidProfile::masks`].
pub const MAX_CPUID_MASKS: usize = 24;

/// [`CpuidMask::subleaf`]: the mask applies whatever ECX is.
pub const ANY_SUBLEAF: u32 = u32::MAX;

/// AND-masks for one CPUID leaf (and sub-leaf).
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
pub struct CpuidMask {
    /// EAX on input.
    pub leaf: u32,
    /// ECX on input, or [`ANY_SUBLEAF`].
    pub subleaf: u32,
    /// Bits of EAX, EBX, ECX, EDX the guest may see.
    pub regs: [u32; 4],
}

/// The processor compatibility profile (`[cpu] profile`), resolved by the
/// loader into masks the core applies to every CPUID the guest executes.
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
pub struct CpuidProfile {
    /// Nonzero: masking is on (any profile but `host` without masks).
    pub active: u32,
    /// Number of valid `masks`.
    pub count: u32,
    /// XCR0 bits the guest may see in CPUID 0xD and set with XSETBV.
    pub xcr0_allowed: u64,
    /// The masks.
    pub masks: [CpuidMask; MAX_CPUID_MASKS],
}

impl Default for CpuidProfile {
    fn default() -> Self {
        Self {
            active: 0,
            count: 0,
            xcr0_allowed: u64::MAX,
            masks: [CpuidMask::default(); MAX_CPUID_MASKS],
        }
    }
}

impl CpuidProfile {
    /// The valid masks.
    pub fn masks(&self) -> &[CpuidMask] {
        &self.masks[..(self.count as usize).min(MAX_CPUID_MASKS)]
    }

    /// `raw` with every mask for (`leaf`, `subleaf`) applied.
    pub fn apply(&self, leaf: u32, subleaf: u32, raw: [u32; 4]) -> [u32; 4] {
        let mut r = raw;
        if self.active == 0 {
            return r;
        }
        for m in self
            .masks()
            .iter()
            .filter(|m| m.leaf == leaf && (m.subleaf == ANY_SUBLEAF || m.subleaf == subleaf))
        {
            for (v, mask) in r.iter_mut().zip(m.regs) {
                *v &= mask;
            }
        }
        r
    }
}

/// One processor as the firmware reported it.
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
pub struct CpuInfo {
    /// Local APIC ID.
    pub apic_id: u32,
    /// Bit 0: bootstrap processor.
    pub flags: u32,
}

/// [`CpuInfo::flags`]: the bootstrap processor.
pub const CPU_FLAG_BSP: u32 = 1;
/// [`CpuInfo::flags`] bits 8–15: the partition the processor belongs to
/// (0: the OS; `n`: appliance `n`, [`Handoff::partitions`]`[n - 1]`).
pub const CPU_PARTITION_SHIFT: u32 = 8;

impl CpuInfo {
    /// The partition this processor belongs to (0: the OS).
    pub const fn partition(&self) -> u8 {
        ((self.flags >> CPU_PARTITION_SHIFT) & 0xff) as u8
    }
}

/// Most appliance partitions (besides the OS's).
pub const MAX_APPLIANCES: usize = 8;

/// One appliance partition as the loader set it up (`docs/appliances.md`).
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
pub struct PartitionInfo {
    /// Its name, NUL-padded.
    pub name: [u8; 32],
    /// Its RAM: reserved from the OS's memory map, absent from the OS's
    /// second-level tables and IOMMU domain.
    pub ram: PhysRange,
    /// Processors ([`CpuInfo::partition`] names them).
    pub cpu_count: u32,
    /// [`partition_flags`].
    pub flags: u16,
    /// Its console's I/O port, 0 for the log ring.
    pub console_port: u16,
    /// Where its first processor starts (guest-physical addresses, the
    /// Linux 64-bit boot protocol): RIP, RSI (the zero page), CR3 (an
    /// identity map), the GDT's base; 0 RIP: nothing to start.
    pub entry_rip: u64,
    /// RSI at entry.
    pub entry_rsi: u64,
    /// CR3 at entry.
    pub entry_cr3: u64,
    /// GDT base at entry (its limit is [`APPLIANCE_GDT_LIMIT`]; code
    /// selector 0x10, data 0x18).
    pub entry_gdt: u64,
    /// The TSC frequency the loader measured, kHz.
    pub tsc_khz: u64,
    /// A copy of what its RAM held at the first start (the pieces below,
    /// back to back), reserved and hidden from the OS like its RAM: a
    /// restart scrubs the RAM and puts these back.
    pub image: PhysRange,
    /// Number of valid `pieces`.
    pub piece_count: u32,
    /// Reserved.
    pub reserved: u32,
    /// Where each piece of `image` goes (guest-physical) and its length.
    pub pieces: [PhysRange; MAX_IMAGE_PIECES],
    /// Number of valid `devices`.
    pub device_count: u32,
    /// Reserved.
    pub reserved2: u32,
    /// PCI functions given to it whole (`docs/appliances.md`).
    pub devices: [PartitionDevice; MAX_PARTITION_DEVICES],
}

/// The IOMMU domain of appliance partition `i + 1`'s PCI functions (1 is
/// the OS's; 2 the blocked requesters' on AMD-Vi).
#[allow(clippy::cast_possible_truncation)] // i < MAX_APPLIANCES
pub const fn appliance_iommu_domain(i: usize) -> u16 {
    16 + i as u16
}

/// Most PCI functions of one appliance.
pub const MAX_PARTITION_DEVICES: usize = 4;

/// Most memory BARs of a function.
pub const MAX_DEVICE_BARS: usize = 6;

/// A PCI function given to an appliance: hidden from the OS (configuration
/// space mediated, its BARs out of the OS's second-level tables, no DMA
/// in the OS's IOMMU domain), in the appliance's configuration space at
/// `vdevfn` of bus 0, its memory BARs at the same addresses in the
/// appliance's second-level tables, its DMA in the appliance's IOMMU
/// domain.
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
pub struct PartitionDevice {
    /// Requester ID (bus << 8 | device << 3 | function), segment 0.
    pub rid: u16,
    /// Device and function on the appliance's bus 0. For a function the
    /// OS sees in a PF's place (`PciHandoff::presented`): the offset of the
    /// Enhanced Allocation capability thinhv shows there, fixing its BAR 0
    /// (`thinhv_passthrough::fixed_bar`), or 0 for none.
    pub vdevfn: u8,
    /// Number of valid `bars`.
    pub bar_count: u8,
    /// A VF: its vendor (bits 0..16) and device ID (bits 16..32), which the
    /// appliance reads in its header (a VF's own read all ones); 0 for a
    /// function given whole.
    pub vf_ids: u32,
    /// Its memory BARs: register index, flags and the range the firmware
    /// assigned (`bar_regs`, `bars`). I/O BARs are not given.
    pub bars: [PhysRange; MAX_DEVICE_BARS],
    /// Per BAR: register index (bits 0..2), 64-bit (bit 4), prefetchable
    /// (bit 5).
    pub bar_regs: [u8; MAX_DEVICE_BARS],
    /// A VF: the requester ID of its PF (whose SR-IOV capability holds
    /// its BARs); 0 for a function given whole.
    pub pf_rid: u16,
}

/// [`PartitionDevice::bar_regs`]: a 64-bit BAR.
pub const BAR_REG_64: u8 = 1 << 4;
/// [`PartitionDevice::bar_regs`]: prefetchable.
pub const BAR_REG_PREFETCH: u8 = 1 << 5;

impl PartitionDevice {
    /// Whether it is a VF (of an SR-IOV PF the OS owns).
    pub const fn is_vf(&self) -> bool {
        self.vf_ids != 0
    }

    /// The valid BARs with their register bytes.
    pub fn bars(&self) -> impl Iterator<Item = (u8, PhysRange)> + '_ {
        self.bar_regs
            .iter()
            .copied()
            .zip(self.bars.iter().copied())
            .take(usize::from(self.bar_count).min(MAX_DEVICE_BARS))
    }
}

impl PartitionInfo {
    /// The PCI functions given to it.
    pub fn devices(&self) -> &[PartitionDevice] {
        &self.devices[..(self.device_count as usize).min(MAX_PARTITION_DEVICES)]
    }
}

/// Most pieces of an appliance image (page tables, GDT, zero page,
/// command line, five ACPI tables, kernel, initrd).
pub const MAX_IMAGE_PIECES: usize = 12;

impl PartitionInfo {
    /// The valid pieces.
    pub fn pieces(&self) -> &[PhysRange] {
        &self.pieces[..(self.piece_count as usize).min(MAX_IMAGE_PIECES)]
    }
}

/// Where an appliance's RAM sits in its guest-physical space: its first
/// [`APPLIANCE_LOW_RAM_TOP`] bytes from 0, the rest from
/// [`APPLIANCE_HIGH_RAM_BASE`]. Between them is its MMIO hole, where its
/// local APIC (0xFEE0_0000) and its functions' BARs below 4 GiB sit at
/// their host addresses, as a PC's memory map has one below 4 GiB.
pub const APPLIANCE_LOW_RAM_TOP: u64 = 0x8000_0000;
/// See [`APPLIANCE_LOW_RAM_TOP`].
pub const APPLIANCE_HIGH_RAM_BASE: u64 = 1 << 32;

/// An appliance's RAM of `size` bytes in its guest-physical space, as
/// (guest-physical address, offset in its host RAM, length): below
/// [`APPLIANCE_LOW_RAM_TOP`], then from 4 GiB (length 0 when it all fits
/// below).
pub const fn appliance_ram_ranges(size: u64) -> [(u64, u64, u64); 2] {
    let low = if size < APPLIANCE_LOW_RAM_TOP {
        size
    } else {
        APPLIANCE_LOW_RAM_TOP
    };
    [(0, 0, low), (APPLIANCE_HIGH_RAM_BASE, low, size - low)]
}

/// The offset in an appliance's host RAM (of `size` bytes) of its
/// guest-physical `[gpa, gpa + len)`, when all of it is RAM of one range.
pub fn appliance_ram_offset(size: u64, gpa: u64, len: u64) -> Option<u64> {
    let end = gpa.checked_add(len)?;
    appliance_ram_ranges(size)
        .into_iter()
        .find(|&(at, _, n)| gpa >= at && end <= at + n && n != 0)
        .map(|(at, off, _)| off + (gpa - at))
}

/// The GDT limit an appliance starts with (four descriptors).
pub const APPLIANCE_GDT_LIMIT: u16 = 0x1f;

impl PartitionInfo {
    /// The name as text.
    pub fn name(&self) -> &str {
        let n = self.name.iter().position(|&b| b == 0).unwrap_or(32);
        core::str::from_utf8(&self.name[..n]).unwrap_or("?")
    }
}

/// [`PartitionInfo::flags`].
pub mod partition_flags {
    /// `on_crash = "restart"`.
    pub const RESTART_ON_CRASH: u16 = 1 << 0;
    /// `control = "os"`: the OS's root may stop and start it.
    pub const OS_CONTROL: u16 = 1 << 1;
    /// `apic = "x2apic"`: its processors start in x2APIC mode where the
    /// processor has it.
    pub const X2APIC: u16 = 1 << 2;
}

/// CPU features the loader found ([`Handoff::features`]).
pub mod features {
    /// SVM: next-RIP saved on #VMEXIT.
    pub const NRIP_SAVE: u32 = 1 << 0;
    /// SVM: decode assists.
    pub const DECODE_ASSISTS: u32 = 1 << 1;
    /// 1 GiB pages (host and second level).
    pub const PAGE_1G: u32 = 1 << 2;
    /// No-execute.
    pub const NX: u32 = 1 << 3;
    /// SVM: flush by ASID.
    pub const FLUSH_BY_ASID: u32 = 1 << 4;
    /// x2APIC present.
    pub const X2APIC: u32 = 1 << 5;
}

/// The hand-off block. Lives in the protected region; the core copies it
/// during [`CORE_OP_INIT`].
#[derive(
    Clone,
    Copy,
    Debug,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::Immutable,
    zerocopy::KnownLayout,
)]
#[repr(C)]
pub struct Handoff {
    /// [`HANDOFF_MAGIC`].
    pub magic: u64,
    /// [`crate::ABI_VERSION`].
    pub abi_version: u32,
    /// `size_of::<Handoff>()`.
    pub size: u32,
    /// Everything reserved from the OS: `protected` followed by `status`.
    pub region: PhysRange,
    /// The part the guest can neither read nor write.
    pub protected: PhysRange,
    /// The read-only status page (see [`crate::status`]).
    pub status: PhysRange,
    /// Where the core's image was loaded (inside `protected`).
    pub image: PhysRange,
    /// Free part of `protected` the core carves its structures from.
    pub pool: PhysRange,
    /// Read-only parts of the loaded image (after relocation), covered by
    /// `ro_crc`.
    pub ro_ranges: [PhysRange; MAX_RO_RANGES],
    /// Number of valid `ro_ranges`.
    pub ro_count: u32,
    /// CRC-32 (IEEE) over the `ro_ranges`, in order.
    pub ro_crc: u32,
    /// 1 = AMD SVM, 2 = Intel VMX.
    pub vendor: u32,
    /// Number of valid `cpus`.
    pub cpu_count: u32,
    /// Processors in the firmware's numbering (index = MP services number).
    pub cpus: [CpuInfo; MAX_CPUS],
    /// Number of valid `ram`.
    pub ram_count: u32,
    /// [`features`] bits.
    pub features: u32,
    /// RAM ranges from the firmware memory map, sorted, each exactly as the
    /// firmware described it (adjacent ones joined; when there are more than
    /// [`MAX_RAM_RANGES`] the smallest are left out, never merged across a
    /// gap): hypercall buffers must lie inside them.
    pub ram: [PhysRange; MAX_RAM_RANGES],
    /// Highest address (exclusive) the firmware memory map describes.
    pub phys_top: u64,
    /// Physical address width (CPUID 0x8000_0008 EAX[7:0]).
    pub phys_addr_bits: u32,
    /// Reserved.
    pub reserved: u32,
    /// Settings.
    pub config: CoreConfig,
    /// CPUID masking (processor compatibility profile).
    pub cpuid: CpuidProfile,
    /// Physical address of the loader's device inventory
    /// ([`crate::status::DeviceRecord`] array, boot-services memory the
    /// core copies into the status page during [`CORE_OP_INIT`]), or 0.
    pub devices_pa: u64,
    /// Records at `devices_pa`.
    pub device_count: u32,
    /// Functions found beyond what the inventory holds.
    pub devices_dropped: u32,
    /// The IOMMU.
    pub iommu: IommuHandoff,
    /// PCI ownership (hidden functions, VF budgets).
    pub pci: PciHandoff,
    /// Number of valid `partitions`.
    pub partition_count: u32,
    /// Reserved.
    pub reserved2: u32,
    /// Appliance partitions 1..=`partition_count` (index `n - 1`).
    pub partitions: [PartitionInfo; MAX_APPLIANCES],
    /// Valid `ioapics` (none: the OS programs its I/O APICs unchecked).
    pub ioapic_count: u32,
    /// Reserved.
    pub reserved3: u32,
    /// The I/O APICs whose entries thinhv judges.
    pub ioapics: [IoApicInfo; MAX_IOAPICS],
    /// The HPET whose FSB (MSI) delivery the OS may not turn on: its
    /// register page, read-only in the OS's second-level tables (every
    /// store exits and is passed on without Tn_FSB_EN_CNF); 0 for none.
    pub hpet: u64,
}

impl Handoff {
    /// A zeroed hand-off with magic, version and size filled in.
    pub fn new() -> Self {
        let mut h: Self = zerocopy::FromZeros::new_zeroed();
        h.magic = HANDOFF_MAGIC;
        h.abi_version = crate::ABI_VERSION;
        h.size = u32::try_from(core::mem::size_of::<Self>()).unwrap_or(u32::MAX);
        h.config = CoreConfig::default();
        h.cpuid = CpuidProfile::default();
        h
    }

    /// The valid CPU entries.
    pub fn cpus(&self) -> &[CpuInfo] {
        &self.cpus[..(self.cpu_count as usize).min(MAX_CPUS)]
    }

    /// The valid appliance partitions (partition `n` at index `n - 1`).
    pub fn partitions(&self) -> &[PartitionInfo] {
        &self.partitions[..(self.partition_count as usize).min(MAX_APPLIANCES)]
    }

    /// The I/O APICs whose entries thinhv judges.
    pub fn ioapics(&self) -> &[IoApicInfo] {
        &self.ioapics[..(self.ioapic_count as usize).min(MAX_IOAPICS)]
    }

    /// The valid RAM ranges.
    pub fn ram(&self) -> &[PhysRange] {
        &self.ram[..(self.ram_count as usize).min(MAX_RAM_RANGES)]
    }

    /// The valid read-only ranges.
    pub fn ro_ranges(&self) -> &[PhysRange] {
        &self.ro_ranges[..(self.ro_count as usize).min(MAX_RO_RANGES)]
    }

    /// Checks what the core relies on before trusting the rest.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.magic != HANDOFF_MAGIC {
            return Err("bad magic");
        }
        if self.abi_version != crate::ABI_VERSION {
            return Err("ABI version mismatch between loader and core");
        }
        if self.size as usize != core::mem::size_of::<Self>() {
            return Err("hand-off size mismatch");
        }
        if self.cpu_count == 0 || self.cpu_count as usize > MAX_CPUS {
            return Err("CPU count out of range");
        }
        if self.ram_count as usize > MAX_RAM_RANGES
            || self.ro_count as usize > MAX_RO_RANGES
            || self.cpuid.count as usize > MAX_CPUID_MASKS
            || self.device_count as usize > crate::status::MAX_DEVICES
            || (self.device_count != 0 && self.devices_pa == 0)
            || self.iommu.count as usize > MAX_IOMMUS
            || self.iommu.reserved_count as usize > MAX_IOMMU_RESERVED
            || self.iommu.shared_count as usize > MAX_SHARED_IDS
            || !self.iommu.shared_sound()
            || self.partition_count as usize > MAX_APPLIANCES
            || self.ioapic_count as usize > MAX_IOAPICS
            || self
                .cpus()
                .iter()
                .any(|c| c.partition() as usize > self.partition_count as usize)
            || self.pci.count as usize > MAX_PCI_MEDIATED
            || self.pci.blocked_count as usize > MAX_PCI_BLOCKED
            || (self.pci.count != 0
                && (self.pci.ecam_base == 0
                    || !self.pci.ecam_base.is_multiple_of(1 << 20)
                    || self.pci.bus_end < self.pci.bus_start))
        {
            return Err("range count out of range");
        }
        self.pci.check(identity_map_top(self.phys_top))?;
        if self.ioapics().iter().any(|a| {
            !a.base.is_multiple_of(4096)
                || a.base.saturating_add(4096) > identity_map_top(self.phys_top)
        }) {
            // Its page is trapped like an ECAM page: whole, in the core's map.
            return Err("I/O APIC registers not page-aligned or outside the core's map");
        }
        if self
            .partitions()
            .iter()
            .flat_map(PartitionInfo::devices)
            .map(|d| d.rid)
            .chain(self.ioapics().iter().filter_map(IoApicInfo::source_id))
            .any(|rid| self.iommu.shared_table_of(rid).is_some())
        {
            // Every ID of a shared table is the OS's: an appliance's
            // function or an I/O APIC there would name the OS's entries.
            return Err(
                "a shared interrupt remapping table's IDs include an appliance's or an I/O APIC's",
            );
        }
        if self.hpet != 0
            && (!self.hpet.is_multiple_of(4096)
                || self.hpet.saturating_add(4096) > identity_map_top(self.phys_top))
        {
            return Err("HPET registers not page-aligned or outside the core's map");
        }
        let p = self.protected;
        if p.is_empty() || !p.base.is_multiple_of(4096) || !p.size.is_multiple_of(4096) {
            return Err("protected region not page-aligned");
        }
        if !self.status.base.is_multiple_of(4096)
            || !self.status.size.is_multiple_of(4096)
            || self.status.is_empty()
        {
            return Err("status page not page-aligned");
        }
        if p.overlaps(self.status.base, self.status.size) {
            return Err("status page overlaps the protected region");
        }
        for r in [self.image, self.pool] {
            if !p.encloses(r.base, r.size) {
                return Err("image or pool outside the protected region");
            }
        }
        if self.image.overlaps(self.pool.base, self.pool.size) {
            return Err("pool overlaps the image");
        }
        for r in self.ro_ranges() {
            if !self.image.encloses(r.base, r.size) {
                return Err("read-only range outside the image");
            }
        }
        // Hypercall buffers are checked against these: exact, in order,
        // none empty, none wrapping, no two overlapping.
        let ram = self.ram();
        if ram
            .iter()
            .any(|r| r.is_empty() || r.base.checked_add(r.size).is_none())
            || ram.windows(2).any(|w| w[0].end() > w[1].base)
        {
            return Err("RAM ranges not sorted, empty, overlapping or wrapping");
        }
        // Appliance RAM: page-aligned, apart from thinhv's region, from
        // the OS's RAM and from each other; each partition has a CPU.
        let parts = self.partitions();
        for (i, a) in parts.iter().enumerate() {
            let r = a.ram;
            if r.is_empty()
                || !r.base.is_multiple_of(4096)
                || !r.size.is_multiple_of(4096)
                || r.base.checked_add(r.size).is_none()
                || self.region.overlaps(r.base, r.size)
                || ram.iter().any(|o| o.overlaps(r.base, r.size))
                || parts[..i].iter().any(|b| b.ram.overlaps(r.base, r.size))
            {
                return Err("appliance RAM misaligned or overlapping");
            }
            let n = self
                .cpus()
                .iter()
                .filter(|c| usize::from(c.partition()) == i + 1)
                .count();
            if n == 0 || n != a.cpu_count as usize {
                return Err("appliance CPU count disagrees with the CPU list");
            }
            // Its devices' BARs: whole pages, apart from RAM and thinhv.
            if a.device_count as usize > MAX_PARTITION_DEVICES {
                return Err("too many appliance devices");
            }
            for d in a.devices() {
                for (_, b) in d.bars() {
                    if b.is_empty()
                        || !b.base.is_multiple_of(4096)
                        || !b.size.is_multiple_of(4096)
                        || b.base.checked_add(b.size).is_none()
                        || (self.phys_addr_bits < 64
                            && b.end() > 1u64 << self.phys_addr_bits.min(52))
                        || self.region.overlaps(b.base, b.size)
                        || ram.iter().any(|o| o.overlaps(b.base, b.size))
                        || parts.iter().any(|o| o.ram.overlaps(b.base, b.size))
                    {
                        return Err("appliance device BAR misaligned or overlapping memory");
                    }
                }
            }
        }
        if self.cpus().iter().all(|c| c.partition() != 0) {
            return Err("the OS has no processor");
        }
        Ok(())
    }
}

impl Default for Handoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appliance_ram_leaves_a_hole_below_4_gib() {
        let mib = 1u64 << 20;
        // Small: all below; nothing from 4 GiB.
        assert_eq!(
            appliance_ram_ranges(256 * mib),
            [(0, 0, 256 * mib), (1 << 32, 256 * mib, 0)]
        );
        assert_eq!(
            appliance_ram_offset(256 * mib, 0x1000, 0x1000),
            Some(0x1000)
        );
        assert_eq!(appliance_ram_offset(256 * mib, 256 * mib - 8, 16), None);
        assert_eq!(appliance_ram_offset(256 * mib, 1 << 32, 8), None);
        // 6 GiB: 2 GiB below, 4 GiB from 4 GiB; the hole is no RAM.
        let size = 6u64 << 30;
        assert_eq!(
            appliance_ram_ranges(size),
            [(0, 0, 2 << 30), (1 << 32, 2 << 30, 4 << 30)]
        );
        assert_eq!(appliance_ram_offset(size, 0xfee0_0000, 4), None);
        assert_eq!(appliance_ram_offset(size, (2 << 30) - 4, 8), None);
        assert_eq!(appliance_ram_offset(size, 1 << 32, 8), Some(2 << 30));
        assert_eq!(appliance_ram_offset(size, (8 << 30) - 8, 8), Some(size - 8));
        assert_eq!(appliance_ram_offset(size, 8 << 30, 1), None);
        assert_eq!(appliance_ram_offset(size, u64::MAX, 2), None);
    }

    fn valid() -> Handoff {
        let mut h = Handoff::new();
        h.protected = PhysRange::new(0x100_0000, 0x40_0000);
        h.status = PhysRange::new(0x140_0000, 0x1_1000);
        h.region = PhysRange::new(0x100_0000, 0x41_1000);
        h.image = PhysRange::new(0x100_0000, 0x10_0000);
        h.pool = PhysRange::new(0x110_0000, 0x30_0000);
        h.ro_ranges[0] = PhysRange::new(0x100_0000, 0x8000);
        h.ro_count = 1;
        h.cpu_count = 2;
        h
    }

    #[test]
    fn accepts_a_consistent_handoff() {
        assert_eq!(valid().validate(), Ok(()));
    }

    #[test]
    fn io_apics_are_whole_pages_in_the_cores_map() {
        let mut h = valid();
        h.ioapic_count = 1;
        h.ioapics[0].base = 0xfec0_0000;
        assert_eq!(h.validate(), Ok(()));
        assert_eq!(h.ioapics().len(), 1);
        h.ioapics[0].base = 0xfec0_0400;
        assert!(h.validate().is_err());
        h.ioapics[0].base = 1 << 40;
        assert!(h.validate().is_err());
        h.ioapics[0].base = 0xfec0_0000;
        h.ioapic_count = u32::try_from(MAX_IOAPICS).unwrap() + 1;
        assert!(h.validate().is_err());
    }

    #[test]
    fn the_hpet_is_a_whole_page_in_the_cores_map() {
        let mut h = valid();
        h.hpet = 0xfed0_0000;
        assert_eq!(h.validate(), Ok(()));
        h.hpet = 0xfed0_0400;
        assert!(h.validate().is_err());
        h.hpet = 1 << 40;
        assert!(h.validate().is_err());
        h.hpet = 0;
        assert_eq!(h.validate(), Ok(()));
    }

    #[test]
    fn shared_ranges_are_counted_in_order_and_name_one_table_each() {
        let mut h = valid();
        let r = |first, last, table| SharedIds {
            first,
            last,
            table,
            ..Default::default()
        };
        h.iommu.shared_count = 3;
        h.iommu.shared[..3].copy_from_slice(&[
            r(0x0048, 0x0048, 0),
            r(0x0100, 0x01ff, 0),
            r(0x0200, 0x02ff, 1),
        ]);
        assert_eq!(h.validate(), Ok(()));
        assert_eq!(h.iommu.shared_table_of(0x01ff), Some(0));
        assert_eq!(h.iommu.shared_table_of(0x0200), Some(1));
        assert_eq!(h.iommu.shared_table_of(0x0300), None);
        // One table's ranges may touch each other; two tables' may not.
        h.iommu.shared[2] = r(0x01ff, 0x02ff, 1);
        assert!(h.validate().is_err());
        h.iommu.shared[2] = r(0x0100, 0x0100, 0);
        assert_eq!(h.validate(), Ok(()));
        h.iommu.shared[2] = r(0x02ff, 0x0200, 1);
        assert!(h.validate().is_err());
        h.iommu.shared[2] = r(0x0200, 0x02ff, u8::try_from(MAX_SHARED_TABLES).unwrap());
        assert!(h.validate().is_err());
        // An I/O APIC whose source ID a shared table covers would name the
        // OS's entries.
        h.iommu.shared[2] = r(0x0200, 0x02ff, 1);
        h.ioapic_count = 1;
        h.ioapics[0].base = 0xfec0_0000;
        h.ioapics[0].source = IOAPIC_SOURCE_KNOWN | 0x0210;
        assert!(h.validate().is_err());
        h.ioapics[0].source = IOAPIC_SOURCE_KNOWN | 0x0310;
        assert_eq!(h.validate(), Ok(()));
        h.iommu.shared[2] = SharedIds::default();
        h.iommu.shared_count = u32::try_from(MAX_SHARED_IDS).unwrap() + 1;
        assert!(h.validate().is_err());
    }

    #[test]
    fn appliance_partitions_are_checked() {
        let mut h = valid();
        h.ram[0] = PhysRange::new(0x200_0000, 0x1000_0000);
        h.ram_count = 1;
        h.partition_count = 1;
        h.partitions[0].ram = PhysRange::new(0x2000_0000, 0x1000_0000);
        h.partitions[0].cpu_count = 1;
        h.partitions[0].name[..3].copy_from_slice(b"app");
        h.cpus[1].flags = 1 << CPU_PARTITION_SHIFT;
        assert_eq!(h.validate(), Ok(()));
        assert_eq!(h.partitions()[0].name(), "app");
        assert_eq!(h.cpus[1].partition(), 1);
        let bad = |f: &dyn Fn(&mut Handoff)| {
            let mut x = h;
            f(&mut x);
            x.validate().unwrap_err()
        };
        // Overlapping the OS's RAM, thinhv's region, misaligned.
        bad(&|x| x.partitions[0].ram = PhysRange::new(0x800_0000, 0x1000));
        bad(&|x| x.partitions[0].ram = PhysRange::new(0x140_0000, 0x1000));
        bad(&|x| x.partitions[0].ram = PhysRange::new(0x2000_0800, 0x1000));
        // A CPU of a partition that does not exist; counts that disagree;
        // no CPU left to the OS.
        bad(&|x| x.cpus[1].flags = 2 << CPU_PARTITION_SHIFT);
        bad(&|x| x.partitions[0].cpu_count = 2);
        bad(&|x| x.cpus[0].flags = 1 << CPU_PARTITION_SHIFT);
        bad(&|x| x.partition_count = 9);
    }

    #[test]
    fn ecam_addresses_count_buses_from_zero() {
        // MCFG: base 0xc000_0000, buses 0x80..=0x81; 81:00.0 hidden.
        let mut p = PciHandoff {
            ecam_base: 0xc000_0000,
            bus_start: 0x80,
            bus_end: 0x81,
            count: 1,
            ..PciHandoff::default()
        };
        p.mediated[0] = PciMediation {
            bus: 0x81,
            devfn: (2 << 3) | 1,
            action: PCI_ACTION_HIDE,
            ..PciMediation::default()
        };
        let page = 0xc000_0000 + (0x81 << 20) + (((2 << 3) | 1) << 12);
        assert_eq!(p.page_of(&p.mediated[0]), page);
        assert_eq!(
            p.mediated_at(page + 0x10).map(|(m, off)| (m.bus, off)),
            Some((0x81, 0x10))
        );
        // The page the old arithmetic (from bus_start) pointed at belongs
        // to 01:02.1, which this region does not decode.
        assert_eq!(p.mediated_at(0xc000_0000 + (1 << 20) + (0x11 << 12)), None);
        // Below the first bus and above the last: not this region's.
        assert_eq!(p.mediated_at(0xc000_0000 + (0x7f << 20)), None);
        assert_eq!(p.mediated_at(0xc000_0000 + (0x82 << 20)), None);
        assert_eq!(p.check(4 << 30), Ok(()));
        assert!(p.check(page + 0xfff).is_err(), "page beyond the map");
        p.mediated[0].bus = 0x7f;
        assert!(p.check(4 << 30).is_err(), "bus outside the region");
    }

    #[test]
    fn the_core_refuses_mediation_it_could_not_enforce() {
        assert_eq!(identity_map_top(0), 4 << 30);
        assert_eq!(identity_map_top((6 << 30) + 1), 7 << 30);
        let mut h = valid();
        h.pci.ecam_base = 0xb000_0000;
        h.pci.bus_end = 0xff;
        h.pci.count = 1;
        h.pci.mediated[0] = PciMediation {
            bus: 2,
            action: PCI_ACTION_HIDE,
            ..PciMediation::default()
        };
        assert_eq!(h.validate(), Ok(()));
        // An ECAM region above the map (4 GiB here).
        h.pci.ecam_base = 0x1_0000_0000;
        assert_eq!(
            h.validate(),
            Err("mediated PCI function's ECAM page beyond the core's map")
        );
        // The same with memory described up to 8 GiB: mapped, accepted.
        h.phys_top = 8 << 30;
        assert_eq!(h.validate(), Ok(()));
        // Source buses (SVT 10b): the first may not follow the last.
        h.pci.mediated[0].action = PCI_ACTION_MSI;
        h.pci.mediated[0].source_check = MSI_SOURCE_BUSES;
        h.pci.mediated[0].source = 0x0203;
        assert_eq!(h.validate(), Ok(()));
        h.pci.mediated[0].source = 0x0302;
        assert_eq!(
            h.validate(),
            Err("mediated PCI function's source buses out of order")
        );
    }

    #[test]
    fn rejects_inconsistent_handoffs() {
        let mut h = valid();
        h.magic = 0;
        assert!(h.validate().is_err());
        let mut h = valid();
        h.cpu_count = 0;
        assert!(h.validate().is_err());
        let mut h = valid();
        h.status = PhysRange::new(0x13f_f000, 0x2000);
        assert_eq!(
            h.validate(),
            Err("status page overlaps the protected region")
        );
        let mut h = valid();
        h.pool = PhysRange::new(0x10f_0000, 0x2000);
        assert_eq!(h.validate(), Err("pool overlaps the image"));
        let mut h = valid();
        h.ro_ranges[0] = PhysRange::new(0x10f_f000, 0x2000);
        assert!(h.validate().is_err());
        let mut h = valid();
        h.ram_count = 1000;
        assert!(h.validate().is_err());
    }

    #[test]
    fn ram_ranges_must_be_exact_and_in_order() {
        let with = |ranges: &[PhysRange]| {
            let mut h = valid();
            h.ram[..ranges.len()].copy_from_slice(ranges);
            h.ram_count = u32::try_from(ranges.len()).unwrap();
            h.validate()
        };
        let a = PhysRange::new(0, 0xa_0000);
        let b = PhysRange::new(0x10_0000, 0x100_0000);
        assert_eq!(with(&[a, b]), Ok(()));
        // Adjacent is fine (one range or two, the same bytes).
        assert_eq!(with(&[a, PhysRange::new(0xa_0000, 0x1000)]), Ok(()));
        let bad = Err("RAM ranges not sorted, empty, overlapping or wrapping");
        assert_eq!(with(&[b, a]), bad);
        assert_eq!(with(&[a, PhysRange::new(0x9_f000, 0x2000)]), bad);
        assert_eq!(with(&[a, PhysRange::new(0x20_0000, 0)]), bad);
        assert_eq!(with(&[PhysRange::new(u64::MAX - 0xfff, 0x2000)]), bad);
    }

    #[test]
    fn interrupts_are_remapped_only_by_a_unit_thinhv_protects_with() {
        let mut h = IommuHandoff {
            mode: IOMMU_MODE_PROTECT,
            kind: IOMMU_KIND_AMDVI,
            interrupts: IOMMU_INTERRUPTS_REMAP,
            ..IommuHandoff::default()
        };
        assert!(h.remaps_interrupts());
        h.interrupts = IOMMU_INTERRUPTS_OFF;
        assert!(!h.remaps_interrupts());
        h.interrupts = IOMMU_INTERRUPTS_REMAP;
        h.kind = IOMMU_KIND_VTD;
        assert!(h.remaps_interrupts(), "judged, in compatibility format");
        h.kind = IOMMU_KIND_NONE;
        assert!(!h.remaps_interrupts());
        h.kind = IOMMU_KIND_AMDVI;
        h.mode = IOMMU_MODE_OFF;
        assert!(!h.remaps_interrupts());
    }

    #[test]
    fn an_iommu_window_is_whole_pages() {
        let u = IommuUnit {
            base: 0xfed9_0010,
            size: 0x100,
            ..Default::default()
        };
        assert_eq!(u.window(), PhysRange::new(0xfed9_0000, 0x1000));
        let u = IommuUnit {
            base: 0xfeb8_0000,
            size: 0x8_0001,
            ..Default::default()
        };
        assert_eq!(u.window(), PhysRange::new(0xfeb8_0000, 0x8_1000));
    }
}

#[cfg(test)]
mod tests_unblock {
    use super::*;

    fn ranges(h: &PciHandoff) -> Vec<(u16, u16)> {
        h.blocked().iter().map(|r| (r.first, r.last)).collect()
    }

    #[test]
    fn unblocking_splits_trims_or_drops_the_range_around_it() {
        let mut h = PciHandoff::default();
        h.blocked[0] = RidRange {
            first: 0x100,
            last: 0x100,
        };
        h.blocked[1] = RidRange {
            first: 0x101,
            last: 0x17f,
        };
        h.blocked_count = 2;
        assert!(h.unblock(0x101));
        assert_eq!(ranges(&h), [(0x100, 0x100), (0x102, 0x17f)]);
        assert!(h.unblock(0x110));
        assert_eq!(ranges(&h), [(0x100, 0x100), (0x102, 0x10f), (0x111, 0x17f)]);
        assert!(h.unblock(0x100));
        assert_eq!(ranges(&h), [(0x102, 0x10f), (0x111, 0x17f)]);
        assert!(h.unblock(0x200), "not blocked: nothing to do");
        assert!(!h.is_blocked(0x101) && !h.is_blocked(0x110) && h.is_blocked(0x10f));
    }
}
