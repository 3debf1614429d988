//! State shared by all CPUs of the hypervisor: configuration, memory ranges,
//! and per-CPU slots with the INIT/SIPI mailboxes.
use crate::partition::{Partition, PartitionId};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use thinhv_abi::PhysRange;
use thinhv_abi::handoff::{
    CoreConfig, CpuidProfile, Handoff, MAX_APPLIANCES, MAX_CPUS, MAX_RAM_RANGES, PciHandoff,
};
use thinhv_abi::status::CpuState;

/// Mailbox through which one CPU asks another to take an INIT or a SIPI.
///
/// The sender never delivers INIT or SIPI to a virtualized CPU through the
/// APIC: an INIT that reaches a CPU in host mode resets it on processors
/// (and emulators) without INIT redirection, and a SIPI to a CPU in host mode
/// is dropped. Instead the sender posts here and wakes the target with an
/// NMI, which every CPU under thinhv intercepts.
#[derive(Debug, Default)]
pub struct Mailbox {
    /// INIT and SIPI in one word, so that a start-up and the INIT it
    /// answers are taken together: [`SIPI_INIT`] (an INIT is pending: the
    /// CPU takes it at its next exit), [`SIPI_WAITING`] (an INIT came; the
    /// first SIPI counts) or [`SIPI_VALID`] with the vector in bits 7:0
    /// (that SIPI, not yet taken); 0: running (a SIPI is ignored).
    pub sipi: AtomicU32,
    /// NMIs sent as wake-ups and not yet consumed.
    pub wake_nmis: AtomicU32,
    /// thinhv starts this CPU at its partition's entry (the first
    /// processor of an appliance), instead of waiting for a SIPI.
    pub boot: AtomicBool,
}

/// [`Mailbox::sipi`]: a vector is present.
pub const SIPI_VALID: u32 = 0x100;
/// [`Mailbox::sipi`]: waiting for a SIPI, none yet.
pub const SIPI_WAITING: u32 = 0x200;
/// [`Mailbox::sipi`]: an INIT is pending.
pub const SIPI_INIT: u32 = 0x400;

impl Mailbox {
    /// Posts an INIT. The caller then sends the wake-up NMI. From here on
    /// the first SIPI counts, however long the target takes to reach its
    /// wait: the wait belongs to the INIT, not to the target's progress
    /// (a SIPI sent while the target is still between its NMI exit and its
    /// wait loop is not lost). A SIPI not yet taken is dropped: this INIT
    /// needs its own.
    pub fn post_init(&self) {
        self.sipi.store(SIPI_INIT | SIPI_WAITING, Ordering::SeqCst);
        self.wake_nmis.fetch_add(1, Ordering::SeqCst);
    }

    /// Posts a SIPI; only the first one after an INIT counts, as on
    /// hardware, and none once the CPU has started. Returns whether it was
    /// taken.
    pub fn post_sipi(&self, vector: u8) -> bool {
        self.sipi
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w & SIPI_WAITING != 0).then_some(w & SIPI_INIT | SIPI_VALID | u32::from(vector))
            })
            .is_ok()
    }

    /// Whether an INIT is pending (not yet taken at an exit or by the
    /// start-up that answered it).
    pub fn init_pending(&self) -> bool {
        self.sipi.load(Ordering::SeqCst) & SIPI_INIT != 0
    }

    /// The CPU enters its wait for a SIPI (an INIT of its own, to itself,
    /// posts nothing): from here on the first SIPI counts. A SIPI that has
    /// already arrived stays.
    pub fn arm(&self) {
        let _ = self
            .sipi
            .compare_exchange(0, SIPI_WAITING, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The CPU leaves its wait without a SIPI (thinhv starts it itself):
    /// a later SIPI is ignored, as on a running processor. An INIT posted
    /// meanwhile keeps its wait (the CPU takes it at its first exit).
    pub fn disarm(&self) {
        let _ = self
            .sipi
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w & SIPI_INIT == 0 && w != 0).then_some(0)
            });
    }

    /// Asks the CPU, once in its INIT wait, to start at its partition's
    /// entry.
    pub fn post_boot(&self) {
        self.boot.store(true, Ordering::SeqCst);
    }

    /// Takes a boot request.
    pub fn take_boot(&self) -> bool {
        self.boot.swap(false, Ordering::SeqCst)
    }

    /// Takes a pending INIT (its wait, and a SIPI already posted for it,
    /// stay).
    pub fn take_init(&self) -> bool {
        self.sipi.fetch_and(!SIPI_INIT, Ordering::SeqCst) & SIPI_INIT != 0
    }

    /// Takes the SIPI vector, if one arrived, with the INIT it answers
    /// (which the CPU may not have taken yet if it was already waiting):
    /// the CPU then runs, and a second SIPI is ignored. An INIT posted
    /// after the SIPI wins (the CPU waits again for the SIPI after it).
    pub fn take_sipi(&self) -> Option<u8> {
        self.sipi
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w & SIPI_VALID != 0).then_some(0)
            })
            .ok()
            .map(|w| (w & 0xff) as u8)
    }

    /// Takes the count of wake-up NMIs sent.
    pub fn take_wakes(&self) -> u32 {
        self.wake_nmis.swap(0, Ordering::SeqCst)
    }

    /// The CPU took `nmis` physical NMIs in host mode while it waited for
    /// its SIPI (SVM's NMI sink): those were the wake-ups sent so far,
    /// however many coalesced into them, and none is left for the guest's
    /// next NMI exit to mistake for one (which would swallow a real NMI).
    /// With none taken, a wake-up is still in flight and stays counted.
    pub fn wakes_taken_in_host(&self, nmis: u32) {
        if nmis > 0 {
            self.take_wakes();
        }
    }
}

/// A processor's MTRRs as its guest sees them. Guest writes land here and
/// never in the hardware, which keeps the firmware's values for the host's
/// own accesses (see `handlers::msr_policy`). Loaded from the hardware at
/// the first MTRR exit of that CPU; only that CPU touches it.
#[derive(Debug, Default)]
pub struct MtrrShadow {
    /// The registers below hold values (else read them from the hardware).
    pub loaded: AtomicBool,
    /// IA32_MTRRCAP.
    pub cap: AtomicU64,
    /// IA32_MTRR_DEF_TYPE.
    pub def_type: AtomicU64,
    /// The fixed ranges, in `msr_policy::MTRR_FIXED` order.
    pub fixed: [AtomicU64; 11],
    /// PHYSBASE/PHYSMASK pairs, interleaved as their MSR numbers.
    pub var: [AtomicU64; 2 * crate::handlers::msr_policy::MTRR_VAR_MAX],
}

/// One processor.
#[derive(Debug)]
pub struct CpuSlot {
    /// Local APIC ID.
    pub apic_id: u32,
    /// The partition it belongs to, for good.
    pub partition: PartitionId,
    /// It runs in its partition's address space (set when an appliance
    /// processor first starts there; never for the OS's).
    pub entered: AtomicBool,
    /// An appliance processor's xAPIC logical destination and format as
    /// its kernel wrote them: the hardware's LDR stays 0, so that no
    /// logical destination the OS uses (IPIs, I/O APIC, MSIs) can name it;
    /// its own partition's logical IPIs are resolved against these
    /// (`handlers::ipi`).
    pub vldr: AtomicU32,
    /// See `vldr` (reset value: flat).
    pub vdfr: AtomicU32,
    /// [`CpuState`] value.
    pub state: AtomicU32,
    /// INIT/SIPI mailbox.
    pub mailbox: Mailbox,
    /// Its own PCI configuration address latch (CONFIG_ADDRESS, port 0xCF8)
    /// while any function is mediated: a dword OUT to 0xCF8 lands here,
    /// never in the machine's one latch, so no other CPU can change what
    /// this CPU's data-port accesses reach (`handlers::pcicfg`). Only this
    /// CPU touches it.
    pub cf8_latch: AtomicU32,
    /// A page left the OS's second-level tables while this CPU handled an
    /// exit (an MSI-X table thinhv traps): its guest TLB is flushed before
    /// it resumes.
    pub flush_tlb: AtomicBool,
    /// Its emulated MTRRs.
    pub mtrr: MtrrShadow,
    /// NMIs the host NMI handler took on this CPU and no exit has looked at
    /// yet (VMX; on SVM only those taken in its NMI sink, counted while the
    /// exit path waits for them, `arch::svm::nmi`). Here,
    /// in shared state reached only through `&`, rather than in the CPU's
    /// own `PerCpu`, which its exit path holds as `&mut` while an NMI can
    /// interrupt it.
    pub host_nmis: AtomicU32,
    /// VMX: this CPU is in VMX operation with its VMCS current, so the
    /// host NMI handler may arm NMI-window exiting.
    pub vmx_live: AtomicBool,
    /// TSC cycles spent in the exit handler, summed ([`Self::add_exit_cost`]).
    pub handler_cycles: AtomicU64,
    /// Exits whose handler time is in `handler_cycles`.
    pub handler_exits: AtomicU64,
    /// The base of its xAPIC page as its guest set it in IA32_APIC_BASE
    /// (the hardware's stays [`Hv::apic_base`]; `handlers::apic_reloc`).
    /// Only this CPU changes it, under [`Hv::apic_reloc`]'s lock.
    pub apic_vbase: AtomicU64,
}

impl CpuSlot {
    /// The state.
    pub fn state(&self) -> CpuState {
        CpuState(self.state.load(Ordering::SeqCst))
    }

    /// Sets the state.
    pub fn set_state(&self, s: CpuState) {
        self.state.store(s.0, Ordering::SeqCst);
    }

    /// Records one exit's handler time (the CPU's own exit path only).
    pub fn add_exit_cost(&self, cycles: u64) {
        self.handler_cycles.fetch_add(cycles, Ordering::Relaxed);
        self.handler_exits.fetch_add(1, Ordering::Relaxed);
    }

    /// (handler cycles, exits) so far.
    pub fn exit_cost(&self) -> (u64, u64) {
        (
            self.handler_cycles.load(Ordering::Relaxed),
            self.handler_exits.load(Ordering::Relaxed),
        )
    }

    /// Whether the CPU runs under thinhv (INIT/SIPI to it must be virtual).
    pub fn virtualized(&self) -> bool {
        self.state() != CpuState::OFFLINE
    }
}

/// Global hypervisor state.
#[derive(Debug)]
pub struct Hv {
    /// Settings.
    pub config: CoreConfig,
    /// CPUID masking.
    pub cpuid: CpuidProfile,
    /// The region the guest can neither read nor write.
    pub protected: PhysRange,
    /// The read-only status page.
    pub status: PhysRange,
    /// RAM the guest owns (hypercall buffers must lie inside).
    ram: [PhysRange; MAX_RAM_RANGES],
    ram_count: usize,
    /// Physical address width.
    pub phys_addr_bits: u32,
    /// Physical base of the xAPIC MMIO page.
    pub apic_base: u64,
    /// Vendor backend (`thinhv_abi::hypercall::VENDOR_*`).
    pub vendor: u32,
    /// Processors (on the heap: the state is built on the firmware's
    /// stack at `CORE_OP_INIT`, which 256 slots would overflow).
    cpus: alloc::boxed::Box<[CpuSlot]>,
    cpu_count: usize,
    /// The loader has handed over to the OS.
    pub sealed: AtomicBool,
    /// Writes to protected memory discarded.
    pub blocked_writes: AtomicU64,
    /// Processors virtualized.
    pub cpus_virtualized: AtomicU32,
    /// Mediated PCI functions (hidden ones, VF budgets).
    pub pci: PciHandoff,
    /// The IOMMU units' register windows, as the loader found them (also
    /// where thinhv does not take them).
    pub(crate) iommu_windows: [PhysRange; thinhv_abi::handoff::MAX_IOMMUS],
    /// Configuration writes refused (VF budgets).
    pub refused_pci_writes: AtomicU64,
    /// The OS's view of each PF whose VFs it shares with appliances.
    pub shared_pfs:
        spin::Mutex<[crate::handlers::shared_pf::State; thinhv_abi::handoff::MAX_SHARED_PFS]>,
    /// The BAR registers of the functions the OS sees in a PF's place
    /// (`PciHandoff::presented`), as it sees them.
    pub presented_bars:
        spin::Mutex<[crate::partition::BarShadow; thinhv_abi::handoff::MAX_SHARED_PFS]>,
    /// INIT and STARTUP IPIs refused: to CPUs not under thinhv after the
    /// seal, or in logical destination mode (`handlers::ipi`).
    pub refused_ipis: AtomicU64,
    /// Held across each "OUT the CPU's latch to 0xCF8, then access the
    /// data port" pair thinhv performs for a guest: the machine has one
    /// configuration address latch, and no other CPU's address may come
    /// between the two.
    pub legacy_config_lock: spin::Mutex<()>,
    /// Pages the emulated APIC relocation keeps out of the second-level
    /// tables (`handlers::apic_reloc`).
    pub apic_reloc: crate::handlers::apic_reloc::Relocations,
    /// Appliance partitions (partition `n` at index `n - 1`).
    partitions: [Option<Partition>; MAX_APPLIANCES],
    partition_count: usize,
    /// IPIs dropped because they crossed partitions (`handlers::ipi`).
    pub cross_partition_ipis: AtomicU64,
    /// Interrupt messages a partition programmed into its functions that
    /// thinhv gave no remapping entry (`handlers::msi_remap`).
    pub refused_msis: AtomicU64,
    /// Refused messages logged so far, by requester ID
    /// (`handlers::msi_remap`): each function's first ones are logged
    /// whatever the others did.
    pub msi_refusals_logged: spin::Mutex<alloc::collections::BTreeMap<u16, u64>>,
    /// The MSI address and data the OS wrote into its functions whose
    /// messages are remapped (`PCI_ACTION_MSI`), by mediation index.
    pub os_msi: spin::Mutex<[crate::partition::MsiShadow; thinhv_abi::handoff::MAX_PCI_MEDIATED]>,
    /// The MSI-X tables thinhv traps (functions whose messages are
    /// remapped), by routing ID (`handlers::msi_remap`).
    pub msix: spin::Mutex<alloc::collections::BTreeMap<u16, crate::partition::MsixTable>>,
    /// Held by the processor writing into a trapped MSI-X table
    /// (`handlers::msi_remap`).
    pub msix_writer: AtomicBool,
    /// The I/O APICs whose entries thinhv judges for the OS
    /// (`handlers::ioapic`).
    pub ioapics: spin::Mutex<alloc::vec::Vec<crate::handlers::ioapic::IoApicGuard>>,
    /// Held while thinhv drives an I/O APIC's IOREGSEL and IOWIN.
    pub ioapic_hw: AtomicBool,
    /// I/O APIC entries of the OS's that thinhv masked (`handlers::ioapic`).
    pub refused_rtes: AtomicU64,
    /// The HPET register page whose stores thinhv passes on without FSB
    /// delivery (`handlers::hpet`), or 0.
    pub hpet: u64,
    /// Stores of the OS's that asked for a timer's FSB delivery.
    pub refused_fsb: AtomicU64,
    /// The OS's emulated VT-d or AMD-Vi units, one per real unit at its
    /// register window (`[iommu] os = "emulated"`; `crate::os_iommu`).
    pub os_units: spin::Mutex<alloc::vec::Vec<crate::os_iommu::OsUnit>>,
    /// The TSC when the real units' faults were last collected for the
    /// OS's units (`handlers::os_iommu::tick`).
    pub os_iommu_polled: AtomicU64,
    /// Interrupts the OS's units did not deliver (the first few logged).
    pub os_iommu_dropped: AtomicU64,
    /// How many units the OS has of its own (`os_units.len()` once the core
    /// is set up), read without the lock.
    pub os_unit_count: core::sync::atomic::AtomicUsize,
}

impl Hv {
    /// Builds the state from a validated hand-off.
    pub fn from_handoff(h: &Handoff, apic_base: u64) -> Self {
        let mut ram = [PhysRange::default(); MAX_RAM_RANGES];
        let n = h.ram().len();
        ram[..n].copy_from_slice(h.ram());
        let count = usize::try_from(h.cpu_count)
            .unwrap_or(MAX_CPUS)
            .clamp(1, MAX_CPUS);
        let cpus = (0..count)
            .map(|i| CpuSlot {
                apic_id: h.cpus.get(i).map_or(u32::MAX, |c| c.apic_id),
                partition: PartitionId(
                    h.cpus
                        .get(i)
                        .map_or(0, thinhv_abi::handoff::CpuInfo::partition),
                ),
                entered: AtomicBool::new(false),
                vldr: AtomicU32::new(0),
                vdfr: AtomicU32::new(u32::MAX),
                state: AtomicU32::new(CpuState::OFFLINE.0),
                mailbox: Mailbox::default(),
                cf8_latch: AtomicU32::new(0),
                flush_tlb: AtomicBool::new(false),
                mtrr: MtrrShadow::default(),
                host_nmis: AtomicU32::new(0),
                vmx_live: AtomicBool::new(false),
                handler_cycles: AtomicU64::new(0),
                handler_exits: AtomicU64::new(0),
                apic_vbase: AtomicU64::new(apic_base),
            })
            .collect();
        Self {
            config: h.config,
            cpuid: h.cpuid,
            protected: h.protected,
            status: h.status,
            ram,
            ram_count: n,
            phys_addr_bits: h.phys_addr_bits,
            apic_base,
            vendor: h.vendor,
            cpus,
            cpu_count: h.cpus().len(),
            sealed: AtomicBool::new(false),
            blocked_writes: AtomicU64::new(0),
            cpus_virtualized: AtomicU32::new(0),
            pci: h.pci,
            iommu_windows: core::array::from_fn(|i| {
                h.iommu
                    .units()
                    .get(i)
                    .map_or(PhysRange::default(), |u| PhysRange {
                        base: u.base,
                        size: u.size.max(4096),
                    })
            }),
            refused_pci_writes: AtomicU64::new(0),
            shared_pfs: spin::Mutex::new(crate::handlers::shared_pf::initial(&h.pci)),
            presented_bars: spin::Mutex::new(core::array::from_fn(|i| {
                crate::partition::BarShadow::new(&h.pci.presented[i])
            })),
            refused_ipis: AtomicU64::new(0),
            legacy_config_lock: spin::Mutex::new(()),
            apic_reloc: crate::handlers::apic_reloc::Relocations::default(),
            partitions: core::array::from_fn(|i| h.partitions().get(i).map(|p| Partition::new(*p))),
            partition_count: h.partitions().len(),
            cross_partition_ipis: AtomicU64::new(0),
            refused_msis: AtomicU64::new(0),
            msi_refusals_logged: spin::Mutex::new(alloc::collections::BTreeMap::new()),
            msix: spin::Mutex::new(alloc::collections::BTreeMap::new()),
            msix_writer: AtomicBool::new(false),
            ioapics: spin::Mutex::new(
                h.ioapics()
                    .iter()
                    .map(|a| {
                        // Its entries go through the IOMMU's table on
                        // VT-d only (AMD-Vi's I/O APIC has none of
                        // thinhv's: its messages are judged as written).
                        let vtd = h.iommu.kind == thinhv_abi::handoff::IOMMU_KIND_VTD;
                        crate::handlers::ioapic::IoApicGuard::new(
                            a.base,
                            a.source_id().filter(|_| vtd),
                        )
                    })
                    .collect(),
            ),
            ioapic_hw: AtomicBool::new(false),
            refused_rtes: AtomicU64::new(0),
            hpet: h.hpet,
            refused_fsb: AtomicU64::new(0),
            os_units: spin::Mutex::new(crate::os_iommu::for_handoff(h)),
            os_iommu_polled: AtomicU64::new(0),
            os_unit_count: core::sync::atomic::AtomicUsize::new(0),
            os_iommu_dropped: AtomicU64::new(0),
            os_msi: spin::Mutex::new(
                [crate::partition::MsiShadow::default(); thinhv_abi::handoff::MAX_PCI_MEDIATED],
            ),
        }
    }

    /// Whether `page` is the platform's own MMIO, which no device's BAR
    /// may claim and thinhv never writes on a partition's behalf: the
    /// chipset range below 4 GiB (from 0xFEC0_0000: I/O APICs, HPET, the
    /// usual IOMMU windows, local APICs, the firmware's flash), an IOMMU
    /// unit's registers wherever they are, the ECAM region.
    pub fn is_platform_page(&self, page: u64) -> bool {
        let page = page & !0xfff;
        let ecam = (self.pci.ecam_base != 0 && self.pci.bus_end >= self.pci.bus_start).then(|| {
            PhysRange {
                base: self.pci.ecam_base + (u64::from(self.pci.bus_start) << 20),
                size: (u64::from(self.pci.bus_end - self.pci.bus_start) + 1) << 20,
            }
        });
        (0xfec0_0000..0x1_0000_0000).contains(&page)
            || self.iommu_windows.iter().any(|w| w.overlaps(page, 4096))
            || ecam.is_some_and(|e| e.overlaps(page, 4096))
    }

    /// Whether `page` holds the registers of an I/O APIC whose entries
    /// thinhv judges: never mapped to the OS, nor taken by another trap.
    pub fn is_ioapic_page(&self, page: u64) -> bool {
        self.ioapics.lock().iter().any(|a| a.base == page & !0xfff)
    }

    /// Whether `page` holds the HPET's registers whose stores thinhv
    /// passes on without FSB delivery (`handlers::hpet`): read-only for the
    /// OS, and never taken by another trap (which would map it back).
    pub fn is_hpet_page(&self, page: u64) -> bool {
        self.hpet != 0 && self.hpet == page & !0xfff
    }

    /// Whether any appliance partition exists.
    pub fn has_appliances(&self) -> bool {
        self.partition_count != 0
    }

    /// Appliance partition `id` (`None` for the OS and unknown numbers).
    pub fn appliance(&self, id: PartitionId) -> Option<&Partition> {
        let i = usize::from(id.0).checked_sub(1)?;
        self.partitions.get(i)?.as_ref()
    }

    /// The appliance partitions with their numbers.
    pub fn appliances(&self) -> impl Iterator<Item = (PartitionId, &Partition)> {
        self.partitions[..self.partition_count]
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((PartitionId(u8::try_from(i + 1).ok()?), p.as_ref()?)))
    }

    /// The partition whose address space CPU `cpu` runs in now: its own
    /// once it has entered it (an appliance processor before its claim
    /// still runs the firmware, in the OS's).
    pub fn space_of(&self, cpu: usize) -> PartitionId {
        self.cpus().get(cpu).map_or(PartitionId::OS, |c| {
            if c.entered.load(Ordering::SeqCst) {
                c.partition
            } else {
                PartitionId::OS
            }
        })
    }

    /// The partition CPU `cpu` belongs to.
    pub fn partition_of(&self, cpu: usize) -> PartitionId {
        self.cpus()
            .get(cpu)
            .map_or(PartitionId::OS, |c| c.partition)
    }

    /// Whether CPU `target` is out of reach of partition `from`: it
    /// belongs to another partition that is not waiting for the firmware
    /// to let its processors go (the OS's processors are out of every
    /// appliance's reach, always).
    pub fn isolated(&self, from: PartitionId, target: usize) -> bool {
        let to = self.partition_of(target);
        if to == from {
            return false;
        }
        self.appliance(to).is_none_or(Partition::claimed)
    }

    /// The host-physical address of `[gpa, gpa + len)` as partition `part`
    /// sees it: the OS's map is the identity; an appliance's RAM is where
    /// `thinhv_abi::handoff::appliance_ram_ranges` puts it (anything else
    /// it sees is no memory).
    pub fn host_address(&self, part: PartitionId, gpa: u64, len: u64) -> Option<u64> {
        if part.is_os() {
            return Some(gpa);
        }
        let ram = self.appliance(part)?.ram();
        thinhv_abi::handoff::appliance_ram_offset(ram.size, gpa, len).map(|o| ram.base + o)
    }

    /// Whether any byte of `[gpa, gpa + len)` is RAM of an appliance other
    /// than `part` or a BAR of its PCI functions, or any appliance's image
    /// copy (what a restart puts back), or a BAR of a function thinhv keeps
    /// (`PciHandoff::held`): partition `part` may neither read nor write it.
    pub fn foreign_ram(&self, part: PartitionId, gpa: u64, len: u64) -> bool {
        self.pci.held().iter().any(|b| b.overlaps(gpa, len))
            || self.appliances().any(|(id, p)| {
                (id != part
                    && (p.ram().overlaps(gpa, len)
                        || p.info
                            .devices()
                            .iter()
                            .any(|d| d.bars().any(|(_, b)| b.overlaps(gpa, len)))))
                    || p.info.image.overlaps(gpa, len)
            })
    }

    /// The processors.
    pub fn cpus(&self) -> &[CpuSlot] {
        &self.cpus[..self.cpu_count]
    }

    /// The RAM ranges.
    pub fn ram(&self) -> &[PhysRange] {
        &self.ram[..self.ram_count]
    }

    /// The CPU index for an APIC ID.
    pub fn cpu_by_apic_id(&self, apic_id: u32) -> Option<usize> {
        self.cpus().iter().position(|c| c.apic_id == apic_id)
    }

    /// Whether any byte of `[gpa, gpa + len)` belongs to the hypervisor
    /// (protected region or status page).
    pub fn touches_hypervisor(&self, gpa: u64, len: u64) -> bool {
        self.protected.overlaps(gpa, len) || self.status.overlaps(gpa, len)
    }

    /// The appliance control doorbell in the status area
    /// (`thinhv_abi::status::ControlCommand`): the one 8-byte word of
    /// thinhv's memory the OS's writes reach (through a nested fault).
    pub fn control_doorbell(&self) -> u64 {
        self.status.base + thinhv_abi::status::control_offset(self.cpu_count) as u64
    }

    /// Whether CPUID presence is hidden.
    pub fn hidden(&self) -> bool {
        self.config.hide_hypervisor != 0
    }

    /// Whether the hypervisor has been sealed.
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::SeqCst)
    }
}

/// Spins until this processor holds `flag` (a lock around device
/// accesses that an exit handler makes through `Env`, which a guard
/// borrowed from the state could not span). Never held while waiting for
/// another processor.
pub fn hold(flag: &AtomicBool) {
    while flag
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
}

/// Lets go of `flag` ([`hold`]).
pub fn release(flag: &AtomicBool) {
    flag.store(false, Ordering::Release);
}

#[cfg(test)]
mod mailbox_tests {
    use super::Mailbox;

    #[test]
    fn wake_ups_taken_in_host_mode_are_not_counted_again() {
        // Two INITs, their kicks coalesced into the one NMI the waiting
        // CPU took: nothing is left to swallow the guest's next NMI.
        let mb = Mailbox::default();
        mb.post_init();
        mb.post_init();
        mb.wakes_taken_in_host(1);
        assert_eq!(mb.take_wakes(), 0);
        // None taken yet: the kick is in flight and stays counted, so its
        // NMI exit is still known as a wake-up.
        mb.post_init();
        mb.wakes_taken_in_host(0);
        assert_eq!(mb.take_wakes(), 1);
    }

    #[test]
    fn a_sipi_sent_before_the_target_reaches_its_wait_is_not_lost() {
        // The firmware's INIT-SIPI-SIPI (OVMF's ExitBootServices wakes every
        // processor once and waits for all of them): the target took the
        // INIT at its NMI exit and has not reached its wait loop when both
        // SIPIs arrive. The first counts.
        let mb = Mailbox::default();
        mb.post_init();
        assert!(mb.take_init());
        assert!(mb.post_sipi(0x9a));
        assert!(!mb.post_sipi(0x9a), "the second SIPI is ignored");
        mb.arm();
        assert_eq!(mb.take_sipi(), Some(0x9a));
    }

    #[test]
    fn a_started_processor_ignores_sipis_until_its_next_init() {
        let mb = Mailbox::default();
        assert!(!mb.post_sipi(0x10), "no INIT yet");
        mb.post_init();
        assert!(mb.post_sipi(0x10));
        assert_eq!(mb.take_sipi(), Some(0x10));
        // The second SIPI of the pair comes after the target took the
        // first (it still reads as waiting until it runs): ignored, and
        // nothing is left to start it at a stale vector later.
        assert!(!mb.post_sipi(0x20));
        assert_eq!(mb.take_sipi(), None);
        mb.arm();
        assert!(mb.post_sipi(0x30), "an INIT to itself arms its wait");
        assert_eq!(mb.take_sipi(), Some(0x30));
    }

    #[test]
    fn an_init_before_the_sipi_was_taken_waits_for_the_next_sipi() {
        let mb = Mailbox::default();
        mb.post_init();
        assert!(mb.post_sipi(0x10));
        mb.post_init();
        mb.arm();
        assert_eq!(mb.take_sipi(), None);
        assert!(mb.post_sipi(0x20));
        assert_eq!(mb.take_sipi(), Some(0x20));
    }

    #[test]
    fn an_init_a_waiting_processor_has_not_taken_is_answered_by_its_sipi() {
        // The target already waits (it took an earlier INIT and checked
        // for a new one) when INIT-SIPI arrive: it starts with the SIPI,
        // and no INIT is left behind to stop it again at its next exit
        // (where the second SIPI, already ignored, could not restart it).
        let mb = Mailbox::default();
        mb.post_init();
        assert!(mb.take_init());
        mb.arm();
        assert!(!mb.take_init());
        mb.post_init();
        assert!(mb.post_sipi(0x9a));
        assert_eq!(mb.take_sipi(), Some(0x9a));
        assert!(!mb.post_sipi(0x9a));
        assert!(!mb.init_pending());
        assert!(!mb.take_init());
    }

    #[test]
    fn an_init_posted_while_thinhv_starts_the_processor_keeps_its_wait() {
        let mb = Mailbox::default();
        mb.post_boot();
        mb.post_init();
        assert!(mb.take_init());
        assert!(mb.take_boot());
        // A stop's INIT lands before the boot is done.
        mb.post_init();
        mb.disarm();
        assert!(mb.post_sipi(0x10), "the stop's wait kept");
        assert!(mb.take_init());
        assert_eq!(mb.take_sipi(), Some(0x10));
    }

    #[test]
    fn a_processor_thinhv_starts_itself_ignores_a_later_sipi() {
        let mb = Mailbox::default();
        mb.post_boot();
        mb.post_init();
        assert!(mb.take_init());
        mb.arm();
        assert!(mb.take_boot());
        mb.disarm();
        assert!(!mb.post_sipi(0x10));
        // Its next INIT arms it again.
        mb.post_init();
        assert!(mb.post_sipi(0x11));
        assert_eq!(mb.take_sipi(), Some(0x11));
    }

    #[test]
    fn no_sipi_is_lost_however_the_target_lags_behind_the_sender() {
        // Sender and target on two threads, the target yielding for a
        // varying time between its INIT exit and its wait, as a processor
        // whose emulator thread is descheduled does.
        use std::sync::Arc;
        let mb = Arc::new(Mailbox::default());
        for round in 0..2000u32 {
            let vector = (round % 200) as u8 + 1;
            let t = Arc::clone(&mb);
            let target = std::thread::spawn(move || {
                while !t.take_init() {
                    std::hint::spin_loop();
                }
                for _ in 0..(round % 7) {
                    std::thread::yield_now();
                }
                t.arm();
                loop {
                    if let Some(v) = t.take_sipi() {
                        return v;
                    }
                    std::thread::yield_now();
                }
            });
            mb.post_init();
            let first = mb.post_sipi(vector);
            let second = mb.post_sipi(vector.wrapping_add(1));
            assert!(first && !second, "round {round}");
            assert_eq!(target.join().unwrap(), vector, "round {round}");
            assert_eq!(mb.take_sipi(), None, "round {round}");
        }
    }
}
