//! What the neutral exit handlers need from the host side: the shared
//! state, raw physical memory, the local APIC, and the status page. The core
//! implements it over real hardware; tests implement it with fakes.
use crate::hv::Hv;
use thinhv_abi::exit::EXIT_REASON_COUNT;
use thinhv_abi::hypercall::StatusReport;

/// Result of the integrity check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Integrity {
    /// CRC the loader computed.
    pub expected_crc: u32,
    /// CRC now.
    pub current_crc: u32,
    /// The canary page still holds its pattern.
    pub canary_ok: bool,
}

/// Host-side services for exit handlers.
pub trait Env {
    /// What the OS's emulated IOMMU borrows of the host for one register
    /// write ([`crate::os_iommu`]).
    type OsIommu: crate::os_iommu::OsIommuHw;
    /// The OS's emulated IOMMU's host side, where the core has one.
    fn os_iommu(&mut self) -> Option<Self::OsIommu> {
        None
    }
    /// The real units' DMA faults of the OS's requesters under its
    /// emulated units, taken since the last call (collected by
    /// [`Env::iommu_poll`]).
    fn take_os_iommu_faults(&mut self) -> alloc::vec::Vec<crate::os_iommu::RealFault> {
        alloc::vec::Vec::new()
    }
    /// Writes the OS's unit `index`'s state into the status page.
    fn publish_os_iommu(&self, _index: usize, _status: crate::os_iommu::OsUnitStatus) {}
    /// Shared hypervisor state.
    fn hv(&self) -> &Hv;
    /// Index of the CPU handling the exit.
    fn cpu_index(&self) -> usize;
    /// Executes CPUID on this processor.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// Reads host-physical memory. Callers validate addresses first.
    fn read_phys(&self, pa: u64, buf: &mut [u8]);
    /// Writes host-physical memory. Callers validate addresses first.
    fn write_phys(&mut self, pa: u64, data: &[u8]);
    /// Reads a local APIC register of this CPU (xAPIC offset, e.g. 0x310).
    fn lapic_read(&self, offset: u32) -> u32;
    /// Writes a local APIC register of this CPU (xAPIC offset).
    fn lapic_write(&mut self, offset: u32, value: u32);
    /// Writes the x2APIC ICR (MSR 0x830).
    fn x2apic_icr_write(&mut self, value: u64);
    /// Makes the (virtualized) CPU with this APIC ID leave guest mode to
    /// take the INIT just posted to its mailbox: an NMI on SVM (which thinhv
    /// intercepts), a real INIT on VMX (which always exits, and is held off
    /// while a CPU is in VMX root operation).
    fn kick_for_init(&mut self, apic_id: u32);
    /// Maps the 1 GiB around `gpa` identity into the second-level tables
    /// (a first touch beyond what was mapped at start). Returns false when
    /// that is not possible.
    fn demand_map(&mut self, gpa: u64) -> bool;
    /// For the emulated relocation of the local APIC
    /// (`handlers::apic_reloc`): `trap` makes the 4 KiB page at `page` not
    /// present in the second-level tables (which all CPUs share), so that
    /// every access to it exits; otherwise maps it back as it was at start
    /// (identity; the xAPIC page as the ICR trap wants it). Returns false,
    /// with nothing changed, for a page the core cannot trap (outside its
    /// own map, the hypervisor's pages, an IOMMU register window) or when
    /// the tables cannot grow. Only this CPU's guest TLB is the caller's
    /// business ([`Outcome::ResumeFlushTlb`](crate::handlers::Outcome)).
    fn apic_page_trap(&mut self, page: u64, trap: bool) -> bool;
    /// The status report for the status hypercall.
    fn status_report(&self) -> StatusReport;
    /// Exit counters of a CPU.
    fn exit_counts(&self, cpu: usize) -> Option<[u64; EXIT_REASON_COUNT]>;
    /// Copies log bytes starting at log position `pos` into `out`. Returns
    /// (bytes copied, position after them, current end of the log).
    fn log_read(&self, pos: u64, out: &mut [u8]) -> (usize, u64, u64);
    /// Recomputes the integrity check.
    fn integrity(&self) -> Integrity;
    /// Reads an MSR of this processor (only MSRs that exist).
    fn read_msr(&self, msr: u32) -> u64;
    /// Performs an MSR write on the guest's behalf. Only the MSR policy can
    /// make a [`CheckedWrite`](crate::handlers::msr_policy::CheckedWrite),
    /// after checking that the value changes nothing the hypervisor relies
    /// on (memory decoding, caches, the APIC page); an implementation
    /// performs it as it is.
    fn write_msr(&mut self, w: crate::handlers::msr_policy::CheckedWrite);
    /// Sets XCR0 (the value has been checked).
    fn xsetbv(&mut self, xcr0: u64);
    /// Writes back and invalidates the caches.
    fn wbinvd(&mut self);
    /// Makes sure the IOMMU translates (`[iommu] mode = "protect"`; the
    /// core switched it on at the end of `CORE_OP_INIT`, the seal asks
    /// again and reports). Returns (units translating, units).
    fn iommu_enable(&mut self) -> (u32, u32);
    /// Collects DMA faults the IOMMU recorded (counted in the status page).
    fn iommu_poll(&self);
    /// Reads `size` (1, 2 or 4) bytes of device memory (ECAM) with one
    /// access of that width. Callers pass only addresses of mediated
    /// configuration pages, or of a page the APIC relocation traps
    /// ([`Env::apic_page_trap`] accepted it).
    fn mmio_read(&self, pa: u64, size: u8) -> u32;
    /// Writes `size` bytes of device memory with one access.
    fn mmio_write(&mut self, pa: u64, size: u8, value: u32);
    /// One access to a legacy configuration data port (`port` in
    /// 0xCFC..=0xCFF, `size` 1, 2 or 4) for a guest whose address latch
    /// holds `address`: OUT `address` to 0xCF8, then the IN (`write` is
    /// `None`; returns what it read) or the OUT of `write` (returns 0),
    /// with [`Hv::legacy_config_lock`] held across both so that no other
    /// CPU's address comes between them.
    fn legacy_config_access(
        &mut self,
        address: u32,
        port: u16,
        size: u8,
        write: Option<u32>,
    ) -> u32;
    /// The time-stamp counter (for waits: the appliance's `tsc_khz` says
    /// how fast it runs).
    fn tsc(&self) -> u64;
    /// IN of `size` bytes from `port`.
    fn port_read(&self, port: u16, size: u8) -> u32;
    /// OUT of `size` bytes to `port`.
    fn port_write(&mut self, port: u16, size: u8, value: u32);
    /// Whether the interrupt messages of the function with routing ID
    /// `rid` go through a remapping table that thinhv writes
    /// ([`Env::remap_interrupt`]): what it sends must then name an entry.
    fn remaps_interrupts(&self, _rid: u16) -> bool {
        false
    }
    /// Writes entry `slot` of the remapping table of `rid` to deliver
    /// `target` (`None`: not present, every message naming it aborted),
    /// invalidates the unit's copy, and returns the message (address,
    /// data) that names the entry. `Err` where the entry cannot be
    /// written (no table for `rid`, a target the format cannot name).
    fn remap_interrupt(
        &mut self,
        _rid: u16,
        _slot: u16,
        _target: Option<thinhv_passthrough::irq_remap::Target>,
    ) -> Result<(u64, u32), thinhv_passthrough::irq_remap::Refusal> {
        Err(thinhv_passthrough::irq_remap::Refusal::Malformed)
    }
    /// The appliances are claimed (the firmware is done, the OS and the
    /// appliances not started): where the IOMMU can, interrupt messages
    /// go through its remapping table from now on ([`Env::remap_interrupt`]
    /// gives messages that name entries), and where every source is
    /// remapped, messages that name no entry are blocked.
    fn start_interrupt_remapping(&mut self) {}
    /// The appliance partitions changed state: their records on the
    /// status page are written again.
    fn publish_appliances(&self) {}
    /// Writes the result of the last appliance control request
    /// (`thinhv_abi::status::ControlResult`) beside the doorbell.
    fn publish_control(&self, result: thinhv_abi::status::ControlResult);
}
