//! The platform IOMMU, owned by thinhv (`[iommu] mode = "protect"`).
//!
//! Intel VT-d: at `CORE_OP_INIT` the tables are built (one domain for every
//! requester, identity-mapping all memory except the hypervisor's region,
//! reserved memory regions included) and translation is switched on at the
//! end of `CORE_OP_INIT` ([`start`]), before any CPU is virtualized: from
//! the core's first moment no device can write it, and the firmware's
//! drivers keep working (their buffers lie outside thinhv's region, which
//! the loader has just allocated; hidden functions get no DMA at all, as
//! after the seal). A roll-back turns it off again ([`release`],
//! `CORE_OP_RELEASE`) before the loader frees the region that holds the
//! tables; the seal only reports the units. The register windows are
//! hidden from the guest by the second-level tables (see `core_state`).
//! Faults are polled whenever the guest makes a hypercall or asks thinhv's
//! CPUID leaves, counted in the status page and logged.
//!
//! AMD-Vi the same way: one device table whose entries all point to one
//! I/O page table (identity, minus the hypervisor), the command buffer for
//! invalidation with a completion wait, and the event log for faults; an
//! exclusion range the firmware left is cleared (and logged) when thinhv
//! takes the unit.
use super::phys::IdentityMem;
use super::status_page::StatusPage;
use core::sync::atomic::{AtomicBool, Ordering};
use spin::Mutex;
use thinhv_abi::PhysRange;
use thinhv_abi::handoff::{
    CoreError, IOMMU_KIND_AMDVI, IOMMU_KIND_VTD, IOMMU_MODE_PROTECT, IommuHandoff, MAX_APPLIANCES,
    MAX_DEVICE_BARS, MAX_IOMMUS, MAX_PARTITION_DEVICES, MAX_PCI_MEDIATED, PartitionInfo,
    PciHandoff,
};
use thinhv_abi::layout::PAGE;
use thinhv_abi::status::{
    IOMMU_STATE_FAILED, IOMMU_STATE_OFF, IOMMU_STATE_TRANSLATING, IommuRecord,
};
use thinhv_paging::iommu::{ADDR_MASK, AmdViFormat, VtdFormat};
use thinhv_paging::{Attrs, BumpFrames, EntryFormat, FrameAlloc, Mapper, PhysMem};
use thinhv_passthrough::amdvi::{self, Ring};
use thinhv_passthrough::irq_remap;
use thinhv_passthrough::reset::{self, FunctionConfig as _};
use thinhv_passthrough::vtd::{self, Caps, Mmio};

/// A 256-entry ring of 16-byte entries in the core's memory.
struct PhysRing {
    base: u64,
}

impl Ring for PhysRing {
    fn read(&self, i: usize) -> [u32; 4] {
        // SAFETY: `base` is a page of the pool given to this ring; i < 256
        // keeps the 16-byte entry inside it.
        unsafe { core::ptr::read_volatile((self.base as *const [u32; 4]).add(i % 256)) }
    }
    fn write(&mut self, i: usize, e: [u32; 4]) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((self.base as *mut [u32; 4]).add(i % 256), e) }
    }
}

/// What the units were set up with.
// One per core, built once: the size of the AMD-Vi variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug)]
enum Hw {
    /// Nothing to enable.
    None,
    /// VT-d root table; the sources whose messages thinhv judges (no
    /// table of their own: their entries are empty); and where the units
    /// remap interrupts, thinhv's remapping table and queues. Without it
    /// a judged message is written into the function in compatibility
    /// format.
    Vtd {
        root_table: u64,
        judged: IrqTables,
        ir: Option<VtdIr>,
    },
    /// AMD-Vi structures.
    AmdVi {
        dev_table: u64,
        dev_table_pages: u64,
        cmd_buf: u64,
        event_log: u64,
        sem: u64,
        irq: IrqTables,
    },
}

/// VT-d interrupt remapping: one table for every unit (2^
/// `VTD_IRT_ENTRIES_LOG2` entries), an invalidation queue per unit (unit
/// `i` at `queues + i` pages) and the page their waits store to (unit `i`
/// at +16 `i`).
#[derive(Clone, Copy, Debug)]
struct VtdIr {
    table: u64,
    queues: u64,
    status: u64,
    /// Entries name 32-bit destinations (IRTA.EIME): every unit has
    /// ECAP.EIM and compatibility format need not pass.
    x2apic: bool,
}

impl VtdIr {
    fn queue(&self, unit: usize) -> PhysQueue {
        PhysQueue {
            base: self.queues + unit as u64 * PAGE,
            status: self.status + 16 * unit as u64,
            unit: unit % MAX_IOMMUS,
        }
    }
}

/// The last wait token of each unit's queue.
static QUEUE_TOKENS: [core::sync::atomic::AtomicU32; MAX_IOMMUS] =
    [const { core::sync::atomic::AtomicU32::new(0) }; MAX_IOMMUS];

/// One unit's invalidation queue page and status dword.
struct PhysQueue {
    base: u64,
    status: u64,
    unit: usize,
}

impl vtd::QueueMemory for PhysQueue {
    fn write(&mut self, i: usize, d: [u64; 2]) {
        // SAFETY: `base` is a pool page given to this unit's queue; i < 256
        // keeps the 16-byte descriptor inside it. Written back before the
        // tail moves, for a unit that does not snoop.
        unsafe {
            let at = (self.base as *mut [u64; 2]).add(i % 256);
            core::ptr::write_volatile(at, d);
            core::arch::x86_64::_mm_clflush(at.cast::<u8>());
            core::arch::x86_64::_mm_mfence();
        }
    }
    fn base(&self) -> u64 {
        self.base
    }
    fn status_address(&self) -> u64 {
        self.status
    }
    fn status(&self) -> u32 {
        // SAFETY: the pool page for the units' wait stores; the unit writes
        // the dword by DMA, so it is read through memory each time.
        unsafe { core::ptr::read_volatile(self.status as *const u32) }
    }
    fn next_token(&mut self) -> u32 {
        let t = QUEUE_TOKENS[self.unit].fetch_add(1, Ordering::SeqCst);
        t.wrapping_add(1).max(1)
    }
}

/// Key of the remapping table's entry 0, which is never present: a
/// refused message names it.
const NEVER_PRESENT: irq_remap::Key = irq_remap::Key {
    source: u16::MAX,
    slot: u16::MAX,
};

/// Most functions with an interrupt remapping table: every appliance's,
/// and the OS's mediated ones (`PCI_ACTION_MSI`).
const MAX_IRQ_TABLES: usize =
    MAX_APPLIANCES * MAX_PARTITION_DEVICES + MAX_PCI_MEDIATED + thinhv_abi::handoff::MAX_IOAPICS;

/// [`IrqTables`] on VT-d: the value of a judged function whose entries
/// check the requester's bus (never a table's address: those are pages).
const JUDGED_BUSES: u64 = 1 << 63;

/// Interrupt remapping tables of functions whose MSI thinhv remaps
/// (AMD-Vi: one page each, `irq_remap::amdvi::ENTRIES` 32-bit entries),
/// by routing ID.
#[derive(Clone, Copy, Debug)]
struct IrqTables {
    tables: [(u16, u64); MAX_IRQ_TABLES],
    /// AMD-Vi: each function's part of its table (the whole of one of its
    /// own; a part of one it shares behind a conventional bridge).
    shares: [irq_remap::amdvi::Share; MAX_IRQ_TABLES],
    count: usize,
}

impl IrqTables {
    const fn new() -> Self {
        Self {
            tables: [(0, 0); MAX_IRQ_TABLES],
            shares: [irq_remap::amdvi::Share::OWN; MAX_IRQ_TABLES],
            count: 0,
        }
    }

    /// AMD-Vi: `rid` takes `share` of `table`, which other functions'
    /// IDs name too.
    fn add_shared(
        &mut self,
        rid: u16,
        table: u64,
        share: irq_remap::amdvi::Share,
    ) -> Result<(), &'static str> {
        let k = self.count;
        let slot = self
            .tables
            .get_mut(k)
            .ok_or("too many interrupt remapping tables")?;
        *slot = (rid, table);
        self.shares[k] = share;
        self.count += 1;
        Ok(())
    }

    /// AMD-Vi: `rid`'s table and its part of it.
    fn share_of(&self, rid: u16) -> Option<(u64, irq_remap::amdvi::Share)> {
        let k = self.tables[..self.count]
            .iter()
            .position(|(r, _)| *r == rid)?;
        Some((self.tables[k].1, self.shares[k]))
    }

    fn add(&mut self, rid: u16, frames: &mut BumpFrames) -> Result<u64, &'static str> {
        let slot = self
            .tables
            .get_mut(self.count)
            .ok_or("too many interrupt remapping tables")?;
        let table = frames_take(frames)?;
        *slot = (rid, table);
        self.count += 1;
        Ok(table)
    }

    /// A function with no table of its own (VT-d: its messages judged).
    fn add_judged(&mut self, rid: u16) -> Result<(), &'static str> {
        let slot = self
            .tables
            .get_mut(self.count)
            .ok_or("too many functions with judged interrupts")?;
        *slot = (rid, 0);
        self.count += 1;
        Ok(())
    }

    /// VT-d: a function behind a PCI Express to PCI bridge, whose
    /// messages carry a requester ID on `first..=last`.
    fn add_judged_buses(&mut self, rid: u16, first: u8, last: u8) -> Result<(), &'static str> {
        self.add_judged(rid)?;
        self.tables[self.count - 1].1 = JUDGED_BUSES | u64::from(first) << 8 | u64::from(last);
        Ok(())
    }

    /// VT-d: the buses [`Self::add_judged_buses`] gave `rid`, if any.
    fn buses_of(&self, rid: u16) -> Option<(u8, u8)> {
        self.of(rid)
            .filter(|v| v & JUDGED_BUSES != 0)
            .map(|v| ((v >> 8) as u8, v as u8))
    }

    fn of(&self, rid: u16) -> Option<u64> {
        self.tables[..self.count]
            .iter()
            .find(|(r, _)| *r == rid)
            .map(|(_, t)| *t)
    }
}

/// One function's configuration space through 0xCF8/0xCFC, at
/// `CORE_OP_INIT` (native, before any processor is virtualized): to find
/// which capabilities it has.
struct InitConfig {
    rid: u16,
}

impl InitConfig {
    fn select(&self, reg: u16) {
        // SAFETY: CORE_OP_INIT runs natively with no guest running;
        // selecting a dword of a function's configuration space changes
        // nothing but the address latch, which the next access sets again.
        unsafe {
            super::instr::port_out(
                thinhv_passthrough::mediate::CONFIG_ADDRESS,
                4,
                1 << 31 | u32::from(self.rid) << 8 | u32::from(reg & 0xfc),
            );
        }
    }
}

impl reset::FunctionConfig for InitConfig {
    fn read32(&mut self, reg: u16) -> u32 {
        self.select(reg);
        // SAFETY: as in `select`: a read of the dword just selected.
        unsafe { super::instr::port_in(thinhv_passthrough::mediate::CONFIG_ADDRESS + 4, 4) }
    }
    fn write32(&mut self, _reg: u16, _value: u32) {
        // Only capabilities are looked up here: nothing is written.
    }
    fn write16(&mut self, _reg: u16, _value: u16) {}
    fn wait_us(&mut self, _us: u32) {}
}

/// Where an appliance's function keeps its MSI-X table (physical address
/// of entry 0, entries): in one of its memory BARs, by the capability's
/// BIR and offset. `None` without MSI-X; `Some(None)` where the table is
/// not in a BAR it was given.
pub fn appliance_msix(d: &thinhv_abi::handoff::PartitionDevice) -> Option<Option<(u64, u16)>> {
    let mut f = InitConfig { rid: d.rid };
    let cap = reset::find_capability(&mut f, reset::CAP_MSIX)?;
    let control = f.read32(cap) >> 16;
    let table = f.read32(cap + 4);
    let entries = (control & 0x7ff) as u16 + 1;
    let bir = (table & 7) as u8;
    Some(
        d.bars()
            .find(|(regs, _)| regs & 7 == bir)
            .map(|(_, bar)| (bar.base.saturating_add(u64::from(table & !7)), entries))
            .filter(|(base, n)| base.saturating_add(u64::from(*n) * 16) <= bar_end(d, bir)),
    )
}

fn bar_end(d: &thinhv_abi::handoff::PartitionDevice, bir: u8) -> u64 {
    d.bars()
        .find(|(regs, _)| regs & 7 == bir)
        .map_or(0, |(_, bar)| bar.end())
}

/// VT-d: the functions whose messages thinhv judges and writes itself
/// (`[iommu] interrupts = "remap"`): an appliance's that signal by MSI or
/// MSI-X ([`appliance_remapped`]), and the OS's mediated for it
/// (`PCI_ACTION_MSI`). Without remapping on the unit, a function's DMA to
/// the interrupt window still passes as written (`docs/appliances.md`).
fn judged_functions(
    h: &IommuHandoff,
    blocked: &PciHandoff,
    partitions: &[PartitionInfo],
    ioapics: &[thinhv_abi::handoff::IoApicInfo],
    ir: bool,
    reach: &Reach,
) -> Result<IrqTables, &'static str> {
    let mut judged = IrqTables::new();
    if !h.remaps_interrupts() {
        return Ok(judged);
    }
    let how = if ir {
        "through thinhv's remapping table"
    } else {
        "written in compatibility format"
    };
    if ir {
        // The I/O APICs' entries, by the source ID their messages carry.
        for a in ioapics {
            if let Some(sid) = a.source_id() {
                judged.add_judged(sid)?;
            }
        }
    }
    for p in partitions.iter().take(MAX_APPLIANCES) {
        for d in p.devices().iter().filter(|d| appliance_remapped(d, reach)) {
            judged.add_judged(d.rid)?;
            log::info!(
                "IOMMU: interrupts of {:02x}:{:02x}.{} (appliance {}) judged (VT-d: {how})",
                d.rid >> 8,
                (d.rid >> 3) & 0x1f,
                d.rid & 7,
                p.name()
            );
        }
    }
    let mut os_msi = 0;
    for m in blocked.mediated().iter().filter(|m| m.remaps_msi()) {
        let rid = u16::from(m.bus) << 8 | u16::from(m.devfn);
        if m.source_check == thinhv_abi::handoff::MSI_SOURCE_BUSES {
            let (first, last) = ((m.source >> 8) as u8, m.source as u8);
            judged.add_judged_buses(rid, first, last)?;
            log::info!(
                "IOMMU: interrupts of {:02x}:{:02x}.{} (the OS's, behind a PCI Express to PCI bridge) accepted from buses {first:02x}-{last:02x} (VT-d: SVT 10b)",
                m.bus,
                m.devfn >> 3,
                m.devfn & 7
            );
        } else {
            judged.add_judged(rid)?;
        }
        os_msi += 1;
    }
    if os_msi > 0 {
        log::info!("IOMMU: interrupts of {os_msi} function(s) of the OS's judged (VT-d: {how})");
    }
    Ok(judged)
}

/// Why compatibility-format messages must keep passing once interrupts
/// are remapped, if they must (see [`Iommu::start_remapping`]).
fn compat_needed(
    h: &IommuHandoff,
    partitions: &[PartitionInfo],
    reach: &Reach,
) -> Option<&'static str> {
    if h.flags & thinhv_abi::handoff::IOMMU_FLAG_BLOCK_COMPAT == 0 {
        return Some(
            "not every interrupt source of the OS's is remapped: see the loader's warning",
        );
    }
    let signals = |d: &thinhv_abi::handoff::PartitionDevice| {
        let mut f = InitConfig { rid: d.rid };
        reset::find_capability(&mut f, reset::CAP_MSI).is_some()
            || reset::find_capability(&mut f, reset::CAP_MSIX).is_some()
    };
    partitions
        .iter()
        .take(MAX_APPLIANCES)
        .flat_map(PartitionInfo::devices)
        .any(|d| signals(d) && !appliance_remapped(d, reach))
        .then_some(
            "an appliance's function signals through an MSI-X table thinhv cannot trap, and would lose its interrupts",
        )
}

/// What the core's own map reaches of appliances' MSI-X tables: all
/// below `top`, and the pages beyond it mapped at `CORE_OP_INIT`
/// ([`appliance_table_pages`]).
#[derive(Clone, Debug, Default)]
pub struct Reach {
    /// The top of the core's identity map.
    pub top: u64,
    /// Pages beyond it the core mapped (uncached).
    pub high: alloc::vec::Vec<u64>,
}

impl Reach {
    /// Whether the core reaches every byte of `base..base + len`.
    pub fn covers(&self, base: u64, len: u64) -> bool {
        let Some(end) = base.checked_add(len) else {
            return false;
        };
        end <= self.top
            || (base & !(PAGE - 1)..end)
                .step_by(PAGE as usize)
                .all(|p| p < self.top || self.high.contains(&p))
    }
}

/// The pages of appliances' MSI-X tables at or beyond `top` (the core's
/// identity map), each once: the core maps them at `CORE_OP_INIT` so
/// that it can emulate those tables too.
pub fn appliance_table_pages(partitions: &[PartitionInfo], top: u64) -> alloc::vec::Vec<u64> {
    let mut out = alloc::vec::Vec::new();
    for d in partitions
        .iter()
        .take(MAX_APPLIANCES)
        .flat_map(PartitionInfo::devices)
    {
        if let Some(Some((base, n))) = appliance_msix(d) {
            let end = base.saturating_add(u64::from(n) * 16);
            let mut p = base & !(PAGE - 1);
            while p < end {
                if p.saturating_add(PAGE) > top && !out.contains(&p) {
                    out.push(p);
                }
                p += PAGE;
            }
        }
    }
    out
}

/// Whether thinhv remaps the messages of an appliance's function `d`: it
/// signals by MSI or MSI-X, and an MSI-X table lies in one of its BARs
/// where the core reaches it (`reach`), so that thinhv can emulate it.
pub fn appliance_remapped(d: &thinhv_abi::handoff::PartitionDevice, reach: &Reach) -> bool {
    let msi = reset::find_capability(&mut InitConfig { rid: d.rid }, reset::CAP_MSI).is_some();
    match appliance_msix(d) {
        None => msi,
        Some(None) => false,
        Some(Some((base, n))) => reach.covers(base, u64::from(n) * 16),
    }
}

/// A unit's registers through the identity map.
struct Window {
    base: u64,
}

impl Mmio for Window {
    fn read32(&self, offset: u64) -> u32 {
        // SAFETY: `base` is a DRHD register window from the DMAR, mapped
        // uncached by the firmware's and the core's identity maps (checked
        // against the core's map at init); offsets are inside the unit's
        // register set and naturally aligned.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }
    fn read64(&self, offset: u64) -> u64 {
        // SAFETY: as in `read32`.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u64) }
    }
    fn write32(&mut self, offset: u64, value: u32) {
        // SAFETY: as in `read32`; only the VT-d driver's register sequences
        // write here.
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }
    fn write64(&mut self, offset: u64, value: u64) {
        // SAFETY: as in `write32`.
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut u64, value) }
    }
}

/// One unit's state.
#[derive(Clone, Copy, Debug, Default)]
struct Unit {
    base: u64,
    caps: Option<Caps>,
    record: IommuRecord,
}

/// How thinhv writes a judged interrupt message ([`Iommu::message_format`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageFormat {
    /// An entry of the function's own AMD-Vi table, named by its index.
    AmdViTable,
    /// An entry of thinhv's VT-d table, named in remappable format.
    VtdTable,
    /// VT-d without remapping: the judged message itself.
    VtdCompat,
    /// No IOMMU judges messages.
    None,
}

/// The IOMMU state.
pub struct Iommu {
    units: Mutex<([Unit; MAX_IOMMUS], usize)>,
    hw: Hw,
    protect: bool,
    status: StatusPage,
    /// [`Iommu::enable`] has run (it acts once; later calls report).
    started: AtomicBool,
    /// `[iommu] interrupts = "remap"`.
    remap_interrupts: bool,
    /// VT-d: every translating unit remaps interrupts through thinhv's
    /// table (else judged messages are written in compatibility format).
    ir_on: AtomicBool,
    /// VT-d: the remapping table's entries, by source and slot.
    irt: Mutex<Option<irq_remap::Slots>>,
    /// VT-d: the share of the table each source may take entries from
    /// (an appliance's functions and each I/O APIC have their own; every
    /// other source is the OS's), so that no partition can use up
    /// another's.
    irt_shares: IrtShares,
    /// An invalidation failed. VT-d: no entry is changed any more;
    /// AMD-Vi: every write invalidates, even of the value an entry holds.
    irt_broken: AtomicBool,
    /// Why compatibility-format messages must keep passing, if they must:
    /// the loader did not find every interrupt source of the OS's
    /// remappable (`IOMMU_FLAG_BLOCK_COMPAT`), or an appliance's function
    /// signals through a table thinhv cannot trap.
    compat_needed: Option<&'static str>,
    /// [`Iommu::start_remapping`] ran.
    remapping_started: AtomicBool,
    /// The I/O APICs' source IDs (the loader's, from the DMAR or IVRS).
    ioapic_sources: alloc::vec::Vec<u16>,
    /// AMD-Vi: the IDs whose device table entries name a table they
    /// share (`IommuHandoff::shared`: the OS's functions behind
    /// conventional bridges).
    shared: alloc::vec::Vec<thinhv_abi::handoff::SharedIds>,
    /// VT-d with `[iommu] os = "emulated"`: what the OS's emulated units
    /// change in the real tables (`thin_hv_core::os_iommu`).
    os_real: Option<OsReal>,
    /// DMA faults of requesters under the OS's emulated units, for the
    /// core to tell whose they are (`thin_hv_core::os_iommu::RealFault`);
    /// at most [`OS_FAULTS_QUEUED`], later ones dropped.
    os_faults: Mutex<alloc::vec::Vec<thin_hv_core::os_iommu::RealFault>>,
    /// VT-d: the real remapping table is the OS's (its emulated unit
    /// remaps; no appliance runs).
    os_ir: bool,
    /// AMD-Vi with `[iommu] os = "emulated"`: the DMA half of thinhv's
    /// device table entry for the OS, which the OS's emulated unit
    /// changes per device.
    os_amd: Option<thin_hv_core::os_iommu::RealDevTable>,
}

/// The real AMD-Vi device table, as `thin_hv_core::os_iommu::RealDevTable`
/// changes it: the core's pool pages, identity-mapped; each store written
/// back for the unit, which may not snoop.
struct PhysDevTable {
    base: u64,
    ids: u64,
}

impl thin_hv_core::os_iommu::DeviceTable for PhysDevTable {
    fn ids(&self) -> u32 {
        u32::try_from(self.ids).unwrap_or(u32::MAX)
    }
    fn read(&self, id: u16, q: usize) -> u64 {
        let at = (self.base + u64::from(id) * 32) as *const u64;
        // SAFETY: `id` is below `ids` (the caller's check), so quadword
        // `q` (0 to 3) of its entry lies in the core's device table.
        unsafe { core::ptr::read_volatile(at.add(q & 3)) }
    }
    fn write(&mut self, id: u16, q: usize, value: u64) {
        let at = (self.base + u64::from(id) * 32) as *mut u64;
        // SAFETY: as for `read`; only the core writes the table, and the
        // line is written back and fenced before the unit is told.
        unsafe {
            core::ptr::write_volatile(at.add(q & 3), value);
            core::arch::x86_64::_mm_clflush(at.cast::<u8>());
            core::arch::x86_64::_mm_mfence();
        }
    }
}

/// The fewest domain IDs (CAP.ND, 2^(4+2ND) IDs) among the first `n` units.
fn c_nd(units: &[Unit], n: usize) -> u64 {
    units[..n]
        .iter()
        .map(|u| u.caps.map_or(0, |c| c.cap & 7))
        .min()
        .unwrap_or(0)
}

/// Real faults queued for the OS's emulated units between two collections.
const OS_FAULTS_QUEUED: usize = 64;

/// The real VT-d tables as the OS's emulated units change them
/// (`thin_hv_core::os_iommu::RealTables`).
struct OsReal {
    /// The root table.
    root: u64,
    /// The context table the buses without blocked or appliance
    /// requesters share.
    shared_ctx: u64,
    /// The context entry of thinhv's domain for the OS.
    os_entry: [u64; 2],
    /// The requesters thinhv's own tables give its domain for the OS
    /// (one bit each), whose entries [`Iommu::os_set_unnamed`] blocks.
    os_default: alloc::boxed::Box<[u64; 1024]>,
}

impl OsReal {
    fn tables(&self) -> thin_hv_core::os_iommu::RealTables<'_> {
        thin_hv_core::os_iommu::RealTables {
            root: self.root,
            shared_ctx: self.shared_ctx,
            os_entry: self.os_entry,
            defaults: &self.os_default,
        }
    }
}

/// Why an AMD-Vi remapping entry was not written.
#[derive(Clone, Copy, Debug)]
pub enum IrteError {
    /// The function's part of a table it shares has no room for that
    /// slot.
    Full,
    /// Anything else (no table, a unit that did not complete).
    Failed(&'static str),
}

/// Completion-wait values for interrupt table invalidations (distinct
/// from the one `amdvi_enable` uses).
static IRQ_TOKEN: core::sync::atomic::AtomicU64 =
    core::sync::atomic::AtomicU64::new(0x6972_7100_0000_0000);

/// Largest address the identity map for devices covers with 3-level tables.
const THREE_LEVEL_LIMIT: u64 = 1 << 39;

impl Iommu {
    /// Builds the tables (protect mode), or records why not. `top` bounds
    /// both the core's own map (the register windows must lie below it) and
    /// the identity map for devices; `holes` is what devices must never
    /// reach; `reach` what the core maps of appliances' MSI-X tables.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        h: &IommuHandoff,
        blocked: &PciHandoff,
        partitions: &[PartitionInfo],
        ioapics: &[thinhv_abi::handoff::IoApicInfo],
        holes: &Holes,
        top: u64,
        reach: &Reach,
        frames: &mut BumpFrames,
        status: StatusPage,
    ) -> Result<Self, CoreError> {
        let mut units = [Unit::default(); MAX_IOMMUS];
        let n = h.units().len();
        for (u, src) in units.iter_mut().zip(h.units()) {
            u.base = src.base;
            u.record = IommuRecord {
                base: src.base,
                kind: h.kind,
                segment: src.segment,
                ..IommuRecord::default()
            };
        }
        let protect = h.mode == IOMMU_MODE_PROTECT
            && (h.kind == IOMMU_KIND_VTD || h.kind == IOMMU_KIND_AMDVI)
            && n > 0;
        let mut me = Self {
            units: Mutex::new((units, n)),
            hw: Hw::None,
            protect,
            status,
            started: AtomicBool::new(false),
            remap_interrupts: h.remaps_interrupts(),
            ir_on: AtomicBool::new(false),
            irt: Mutex::new(None),
            irt_shares: IrtShares::new(partitions, ioapics),
            irt_broken: AtomicBool::new(false),
            compat_needed: compat_needed(h, partitions, reach),
            remapping_started: AtomicBool::new(false),
            ioapic_sources: ioapics
                .iter()
                .filter_map(thinhv_abi::handoff::IoApicInfo::source_id)
                .collect(),
            shared: h.shared().to_vec(),
            os_real: None,
            os_faults: Mutex::new(alloc::vec::Vec::new()),
            os_ir: false,
            os_amd: None,
        };
        if protect {
            let outside = h
                .units()
                .iter()
                .any(|u| u.base == 0 || u.base.saturating_add(u.size.max(PAGE)) > top);
            let built = if outside {
                Err("a register window lies outside the core's map")
            } else if h.kind == IOMMU_KIND_VTD {
                me.build(h, blocked, partitions, holes, top, frames)
                    .and_then(|(root_table, os_real)| {
                        me.os_real = os_real;
                        let ir = me.vtd_remapping(h, partitions, frames)?;
                        me.os_ir = ir.is_some()
                            && me.os_real.is_some()
                            && partitions.is_empty()
                            && h.remaps_interrupts()
                            && h.flags & thinhv_abi::handoff::IOMMU_FLAG_OS_REMAP != 0;
                        if ir.is_some() {
                            *me.irt.lock() = Some(irt_slots());
                        }
                        Ok(Hw::Vtd {
                            root_table,
                            judged: judged_functions(
                                h,
                                blocked,
                                partitions,
                                ioapics,
                                ir.is_some(),
                                reach,
                            )?,
                            ir,
                        })
                    })
            } else {
                me.build_amdvi(h, blocked, partitions, holes, reach, frames)
                    .map(|(hw, open)| {
                        if h.os == thinhv_abi::handoff::IOMMU_OS_EMULATED {
                            me.os_amd = os_amd_real(&me.units.lock(), open);
                        }
                        hw
                    })
            };
            match built {
                Ok(hw) => me.hw = hw,
                Err(why) => {
                    log::error!("IOMMU: {why}; DMA into thinhv is NOT blocked");
                    me.protect = false;
                    let mut g = me.units.lock();
                    let (units, n) = &mut *g;
                    for u in &mut units[..*n] {
                        u.record.state = IOMMU_STATE_FAILED;
                    }
                }
            }
        }
        me.publish_all();
        Ok(me)
    }

    #[allow(clippy::many_single_char_names)]
    fn build(
        &self,
        h: &IommuHandoff,
        blocked: &PciHandoff,
        partitions: &[PartitionInfo],
        holes: &Holes,
        top: u64,
        frames: &mut BumpFrames,
    ) -> Result<(u64, Option<OsReal>), &'static str> {
        let mut g = self.units.lock();
        let (units, n) = &mut *g;
        let mut aw = 2u8;
        let (mut p2m, mut p1g) = (true, true);
        for u in &mut units[..*n] {
            let c = vtd::caps(&Window { base: u.base });
            let a = c
                .address_width()
                .ok_or("a VT-d unit supports neither 3- nor 4-level tables")?;
            aw = aw.min(a);
            let (m, g1) = c.large_pages();
            p2m &= m;
            p1g &= g1;
            log::info!(
                "IOMMU: VT-d unit {:#x}: cap {:#x} ecap {:#x}, {}-level tables",
                u.base,
                c.cap,
                c.ecap,
                if a == 2 { 4 } else { 3 }
            );
            u.caps = Some(c);
        }
        if aw == 1 && top > THREE_LEVEL_LIMIT {
            return Err("3-level VT-d tables cannot cover memory above 512 GiB");
        }
        let fmt = VtdFormat {
            page_1g: p1g,
            page_2m: p2m,
        };
        // SAFETY: only this core's table roots and frames from its own
        // allocator reach the engine (`IdentityMem::new`'s contract).
        let mut mem = unsafe { IdentityMem::new() };
        let sl4 = identity_tables(&fmt, h, holes, top, frames)?;
        // 3-level: the table under the 4-level root's first entry.
        let sl_root = if aw == 1 {
            mem.read_entry(sl4, 0) & ADDR_MASK
        } else {
            sl4
        };
        let ctx = frames_take(frames)?;
        let root = frames_take(frames)?;
        let c = vtd::context_entry(sl_root, aw, 1);
        for i in 0..256 {
            mem.write_entry(ctx, 2 * i, c[0]);
            mem.write_entry(ctx, 2 * i + 1, c[1]);
        }
        // Each appliance's domain: its guest-physical addresses (what its
        // drivers program into its devices) onto its RAM, nothing else.
        let mut assigned = [(0u16, [0u64; 2]); MAX_APPLIANCES * MAX_PARTITION_DEVICES];
        let mut n_assigned = 0;
        for (i, p) in partitions.iter().enumerate().take(MAX_APPLIANCES) {
            if p.devices().is_empty() {
                continue;
            }
            let top = partition_tables(&fmt, p, frames)?;
            let root = if aw == 1 {
                mem.read_entry(top, 0) & ADDR_MASK
            } else {
                top
            };
            let e = vtd::context_entry(root, aw, thinhv_abi::handoff::appliance_iommu_domain(i));
            for d in p.devices() {
                assigned[n_assigned] = (d.rid, e);
                n_assigned += 1;
            }
        }
        let assigned = &assigned[..n_assigned];
        let entry_of = |rid: u16| {
            if let Some((_, e)) = assigned.iter().find(|(r, _)| *r == rid) {
                *e
            } else if blocked.is_blocked(rid) {
                [0, 0]
            } else {
                c
            }
        };
        for bus in 0..256u16 {
            // A bus with a blocked or an appliance's requester gets its own
            // context table, in which a blocked requester's entry is not
            // present (every DMA of it faults) and an appliance's points
            // at its domain; every other bus shares the one table.
            let table = if (0..256u16).any(|df| entry_of(bus << 8 | df) != c) {
                let t = frames_take(frames)?;
                for df in 0..256u16 {
                    let e = entry_of(bus << 8 | df);
                    mem.write_entry(t, 2 * usize::from(df), e[0]);
                    mem.write_entry(t, 2 * usize::from(df) + 1, e[1]);
                }
                t
            } else {
                ctx
            };
            let r = vtd::root_entry(table);
            mem.write_entry(root, 2 * usize::from(bus), r[0]);
            mem.write_entry(root, 2 * usize::from(bus) + 1, r[1]);
        }
        let os_real = if h.os != thinhv_abi::handoff::IOMMU_OS_EMULATED {
            None
        } else if aw != 2 {
            log::error!(
                "IOMMU: a VT-d unit has no 4-level tables: the OS's emulated unit would need them for its shadows; the OS gets none"
            );
            None
        } else if c_nd(units, *n) < 3 {
            log::error!(
                "IOMMU: a VT-d unit has fewer than 1024 domain IDs (CAP.ND < 3): the OS's emulated unit would need 0x100 to 0x1ff for its shadows; the OS gets none"
            );
            None
        } else {
            let mut os_default = alloc::boxed::Box::new([0u64; 1024]);
            for rid in 0..=u16::MAX {
                if entry_of(rid) == c {
                    os_default[usize::from(rid / 64)] |= 1 << (rid % 64);
                }
            }
            Some(OsReal {
                root,
                shared_ctx: ctx,
                os_entry: c,
                os_default,
            })
        };
        Ok((root, os_real))
    }

    /// Writes the state of the OS's emulated unit at unit `index`'s base
    /// into its status record.
    pub fn publish_os(&self, index: usize, s: thin_hv_core::os_iommu::OsUnitStatus) {
        let mut guard = self.units.lock();
        let (units, count) = &mut *guard;
        let Some(unit) = units[..*count].get_mut(index) else {
            return;
        };
        let r = &mut unit.record;
        r.os_state = s.state;
        r.os_remapping = u8::from(s.remapping);
        r.os_domains = s.domains;
        r.os_faults = u32::try_from(s.faults).unwrap_or(u32::MAX);
        r.os_pages = s.pages;
        r.os_refused = s.refused;
        r.os_flushes = u32::try_from(s.flushes).unwrap_or(u32::MAX);
        r.os_entries = s.entries;
        self.status.publish_iommu(index, r);
    }

    /// The faults [`Iommu::poll`] queued for the OS's emulated units.
    pub fn take_os_faults(&self) -> alloc::vec::Vec<thin_hv_core::os_iommu::RealFault> {
        core::mem::take(&mut *self.os_faults.lock())
    }

    /// Whether the OS's emulated units may offer interrupt remapping:
    /// the real table is theirs, and every unit remaps with a queue.
    pub fn os_remapping(&self) -> bool {
        self.os_ir && self.os_emulated()
    }

    /// Whether every real unit takes 32-bit destinations (ECAP.EIM).
    pub fn os_eim(&self) -> bool {
        let g = self.units.lock();
        let (units, n) = &*g;
        units[..*n]
            .iter()
            .all(|u| u.caps.is_some_and(|c| c.extended_interrupt_mode()))
    }

    /// Writes entry `index` of the real remapping table for the OS's unit
    /// (an index past the table is dropped).
    pub fn os_write_irte(&self, index: u32, entry: [u64; 2]) {
        let Hw::Vtd { ir: Some(ir), .. } = &self.hw else {
            return;
        };
        if !self.os_ir || index >= 1 << thinhv_abi::layout::VTD_IRT_ENTRIES_LOG2 {
            return;
        }
        let page = ir.table + u64::from(index / 256) * PAGE;
        let at = 2 * (index % 256) as usize;
        // SAFETY: the remapping table's pages are this core's
        // (`frames_take_run` in `vtd_remapping`), identity-mapped; `index`
        // is inside it (checked above).
        let mut mem = unsafe { IdentityMem::new() };
        if entry[0] & 1 == 0 {
            mem.write_entry(page, at, entry[0]);
            mem.write_entry(page, at + 1, entry[1]);
        } else {
            mem.write_entry(page, at + 1, entry[1]);
            mem.write_entry(page, at, entry[0]);
        }
        // Written back for a unit that does not snoop (ECAP.C clear)
        // before the invalidation that follows.
        // SAFETY: the line is the entry just written, in the core's
        // identity map.
        unsafe {
            core::arch::x86_64::_mm_clflush((page + 8 * at as u64) as *const u8);
            core::arch::x86_64::_mm_mfence();
        }
    }

    /// Invalidates every unit's interrupt entry cache (the OS's entries
    /// changed).
    pub fn os_irte_flush(&self) {
        let Some(ir) = self.os_ir_table() else {
            return;
        };
        if let Err(e) = self.on_every_unit(ir, &[vtd::desc::IEC_GLOBAL]) {
            log::error!("IOMMU: interrupt entry cache invalidation for the OS's unit: {e}");
        }
    }

    /// The real remapping table and queues, where they are the OS's
    /// unit's and the units run.
    fn os_ir_table(&self) -> Option<VtdIr> {
        match self.hw {
            Hw::Vtd { ir: Some(ir), .. } if self.os_ir && self.started.load(Ordering::SeqCst) => {
                Some(ir)
            }
            _ => None,
        }
    }

    /// Turns every unit's interrupt remapping on through the real table
    /// (the OS's entries), or off.
    pub fn os_set_remapping(&self, on: bool, x2apic: bool, compat: bool) {
        let Some(ir) = self.os_ir_table() else {
            return;
        };
        let g = self.units.lock();
        let (units, n) = &*g;
        for (i, u) in units[..*n].iter().enumerate() {
            let mut regs = Window { base: u.base };
            let result = if on {
                vtd::enable_remapping(
                    &mut regs,
                    &mut ir.queue(i),
                    ir.table,
                    thinhv_abi::layout::VTD_IRT_ENTRIES_LOG2,
                    x2apic,
                    compat && !x2apic,
                )
            } else {
                vtd::disable_remapping(&mut regs)
            };
            match result {
                Ok(()) => log::info!(
                    "IOMMU: unit {:#x}: interrupt remapping {} for the OS's unit ({} destinations, compatibility format {})",
                    u.base,
                    if on { "on" } else { "off" },
                    if x2apic { "32-bit" } else { "8-bit" },
                    if compat && !x2apic {
                        "passes"
                    } else {
                        "blocked"
                    }
                ),
                Err(e) => log::error!(
                    "IOMMU: unit {:#x}: interrupt remapping for the OS's unit: {}",
                    u.base,
                    e.describe()
                ),
            }
        }
    }

    /// Whether the OS's emulated units have the real tables to work on.
    pub fn os_emulated(&self) -> bool {
        (self.os_real.is_some() || self.os_amd.is_some()) && self.protect
    }

    /// Points requester `rid`'s real context entry where the OS's
    /// emulated unit says (`thin_hv_core::os_iommu::RealContext`); a bus
    /// that shares the common context table gets one of its own, a frame
    /// from `frame`. False where none was left (the entry is as it was).
    /// The caller flushes ([`Iommu::os_flush`]).
    pub fn os_set_context(
        &self,
        rid: u16,
        c: thin_hv_core::os_iommu::RealContext,
        mut frame: impl FnMut() -> Option<u64>,
    ) -> bool {
        use thin_hv_core::os_iommu::{RealContext, RealTables};
        if let Some(a) = self.os_amd {
            return self.os_set_dte(rid, c, a);
        }
        let Some(o) = &self.os_real else {
            return false;
        };
        // SAFETY: the root table, the context tables and the frames
        // `frame` gives are this core's (its pool), identity-mapped, and no
        // reference points into them.
        let mut mem = unsafe { IdentityMem::new() };
        let t = o.tables();
        let Some(table) = t.own_table(&mut mem, rid >> 8, &mut frame) else {
            log::error!(
                "IOMMU: no frame left for bus {:#04x}'s context table: {:02x}:{:02x}.{} keeps its real entry",
                rid >> 8,
                rid >> 8,
                (rid >> 3) & 0x1f,
                rid & 7
            );
            return false;
        };
        let e = match c {
            RealContext::Os => o.os_entry,
            RealContext::Blocked => [0, 0],
            RealContext::Shadow { root, domain, .. } => vtd::context_entry(root, 2, domain),
        };
        RealTables::write_context(&mut mem, table, rid, e);
        true
    }

    /// AMD-Vi: the device table and the IDs it holds.
    fn amd_dev_table(&self) -> Option<(u64, u64)> {
        match &self.hw {
            Hw::AmdVi {
                dev_table,
                dev_table_pages,
                ..
            } => Some((*dev_table, (dev_table_pages * PAGE / 32).min(0x1_0000))),
            _ => None,
        }
    }

    /// AMD-Vi: the DMA half of `rid`'s real device table entry as the
    /// OS's emulated unit says; its interrupt half stays thinhv's.
    fn os_set_dte(
        &self,
        rid: u16,
        c: thin_hv_core::os_iommu::RealContext,
        open: thin_hv_core::os_iommu::RealDevTable,
    ) -> bool {
        let Some((base, ids)) = self.amd_dev_table() else {
            return false;
        };
        open.set(&mut PhysDevTable { base, ids }, rid, c)
    }

    /// AMD-Vi: every device table entry that gives thinhv's domain for
    /// the OS, but those `named`, made to block DMA (`blocked`), or those
    /// so blocked given that domain again
    /// (`thin_hv_core::os_iommu::RealDevTable::set_unnamed`).
    fn os_set_unnamed_dtes(
        &self,
        blocked: bool,
        named: &dyn Fn(u16) -> bool,
        open: thin_hv_core::os_iommu::RealDevTable,
    ) -> bool {
        let Some((base, ids)) = self.amd_dev_table() else {
            return false;
        };
        open.set_unnamed(&mut PhysDevTable { base, ids }, blocked, named);
        true
    }

    /// The requesters whose real entries thinhv's own tables give its
    /// domain for the OS, but those `named`: not present (`blocked`), or
    /// that domain again (`thin_hv_core::os_iommu::RealTables::set_unnamed`;
    /// frames from `frame` for the buses that need a table of their own).
    /// The caller flushes ([`Iommu::os_flush`]).
    pub fn os_set_unnamed(
        &self,
        blocked: bool,
        named: &dyn Fn(u16) -> bool,
        mut frame: impl FnMut() -> Option<u64>,
    ) -> bool {
        if let Some(open) = self.os_amd {
            return self.os_set_unnamed_dtes(blocked, named, open);
        }
        let Some(o) = &self.os_real else {
            return false;
        };
        // SAFETY: as in `os_set_context`.
        let mut mem = unsafe { IdentityMem::new() };
        o.tables().set_unnamed(&mut mem, blocked, named, &mut frame)
    }

    /// Global context-cache and IOTLB invalidation on every VT-d unit
    /// (`None`), or domain-selective IOTLB invalidation of `Some(ids)`
    /// alone (through the queue where thinhv runs one).
    pub fn os_flush(&self, domains: Option<&[u16]>) -> bool {
        if let Hw::AmdVi { cmd_buf, sem, .. } = &self.hw {
            return self.os_flush_amdvi(domains, *cmd_buf, *sem);
        }
        let Hw::Vtd { ir, .. } = &self.hw else {
            return false;
        };
        if !self.started.load(Ordering::SeqCst) {
            // Nothing translates yet, so nothing is cached.
            return true;
        }
        let mut all = true;
        let g = self.units.lock();
        let (units, n) = &*g;
        if !units[..*n]
            .iter()
            .all(|u| u.caps.is_some_and(|c| c.coherent()))
        {
            // Table writes reach memory before a non-coherent unit walks
            // them.
            // SAFETY: writing back caches loses nothing.
            unsafe { core::arch::asm!("wbinvd", options(nostack)) };
        }
        for (i, u) in units[..*n].iter().enumerate() {
            // A unit that does not translate caches nothing.
            if u.record.state != IOMMU_STATE_TRANSLATING {
                continue;
            }
            let mut w = Window { base: u.base };
            let r = match (ir, u.caps) {
                (Some(ir), _) => match domains {
                    None => vtd::queue_run(
                        &mut w,
                        &mut ir.queue(i),
                        &[vtd::desc::CONTEXT_GLOBAL, vtd::desc::IOTLB_GLOBAL],
                    ),
                    Some(ds) => ds.chunks(32).try_for_each(|ds| {
                        let mut descs = [[0u64; 2]; 32];
                        for (d, &id) in descs.iter_mut().zip(ds) {
                            *d = vtd::desc::iotlb_domain(id);
                        }
                        vtd::queue_run(&mut w, &mut ir.queue(i), &descs[..ds.len()])
                    }),
                },
                (None, Some(c)) => match domains {
                    None => vtd::invalidate_all(&mut w, &c),
                    Some(ds) => vtd::invalidate_domains(&mut w, &c, ds),
                },
                (None, None) => Ok(()),
            };
            if let Err(e) = r {
                all = false;
                log::error!(
                    "IOMMU: unit {:#x}: invalidation for the OS's unit: {}",
                    u.base,
                    e.describe()
                );
            }
        }
        all
    }

    /// AMD-Vi: INVALIDATE_IOMMU_ALL on every unit (`None`), or
    /// INVALIDATE_IOMMU_PAGES of the domains `Some(ids)`, each followed by
    /// a completion wait.
    fn os_flush_amdvi(&self, domains: Option<&[u16]>, cmd_buf: u64, sem: u64) -> bool {
        if !self.started.load(Ordering::SeqCst) {
            return true;
        }
        let g = self.units.lock();
        let (units, n) = &*g;
        let mut all = true;
        for u in units[..*n]
            .iter()
            .filter(|u| u.record.state == IOMMU_STATE_TRANSLATING)
        {
            let r = match domains {
                None => {
                    invalidate_each(u.base, cmd_buf, sem, &[0], |_| amdvi::cmd_invalidate_all())
                }
                Some(ds) => invalidate_each(u.base, cmd_buf, sem, ds, amdvi::cmd_invalidate_domain),
            };
            if r.is_err() {
                all = false;
                log::error!(
                    "IOMMU: unit {:#x}: invalidation for the OS's unit did not complete",
                    u.base
                );
            }
        }
        all
    }

    /// VT-d: thinhv's interrupt remapping table, the units' queues and
    /// their wait page, where interrupts are judged for appliances and
    /// every unit can remap them with queued invalidation (else `None`:
    /// judged messages are written in compatibility format).
    fn vtd_remapping(
        &self,
        h: &IommuHandoff,
        partitions: &[PartitionInfo],
        frames: &mut BumpFrames,
    ) -> Result<Option<VtdIr>, &'static str> {
        // The OS's own unit remapping through the real table, where no
        // appliance shares it (`IOMMU_FLAG_OS_REMAP`).
        let os_ir = h.os == thinhv_abi::handoff::IOMMU_OS_EMULATED
            && h.flags & thinhv_abi::handoff::IOMMU_FLAG_OS_REMAP != 0
            && h.remaps_interrupts()
            && partitions.is_empty();
        if !os_ir && (!h.remaps_interrupts() || partitions.is_empty()) {
            return Ok(None);
        }
        let g = self.units.lock();
        let (units, n) = &*g;
        let caps = || units[..*n].iter().filter_map(|u| u.caps);
        if !caps().all(|c| c.interrupt_remapping() && c.queued_invalidation()) {
            log::warn!(
                "IOMMU: a VT-d unit cannot remap interrupts (ECAP.IR or QI clear): judged messages are written in compatibility format, and a device's own DMA to the interrupt window is not stopped"
            );
            return Ok(None);
        }
        // 32-bit destinations only where compatibility format need not
        // pass: with them the unit blocks it whatever CFI says.
        let x2apic = caps().all(|c| c.extended_interrupt_mode()) && self.compat_needed.is_none();
        let taken = frames_take_run(
            frames,
            thinhv_abi::layout::VTD_IRT_PAGES,
            "the interrupt remapping table is not contiguous",
        )
        .and_then(|table| {
            let queues = frames_take_run(
                frames,
                *n as u64,
                "the invalidation queues are not contiguous",
            )?;
            Ok((table, queues, frames_take(frames)?))
        });
        let (table, queues, status) = match taken {
            Ok(t) => t,
            // For the OS's unit alone: it offers no remapping, thinhv's
            // protection stands.
            Err(why) if os_ir && partitions.is_empty() => {
                log::error!("IOMMU: no remapping table for the OS's unit ({why}): it offers none");
                return Ok(None);
            }
            Err(why) => return Err(why),
        };
        log::info!(
            "IOMMU: VT-d interrupt remapping through thinhv's table at {table:#x} ({} entries, {} destinations)",
            1u32 << thinhv_abi::layout::VTD_IRT_ENTRIES_LOG2,
            if x2apic { "32-bit" } else { "8-bit" }
        );
        Ok(Some(VtdIr {
            table,
            queues,
            status,
            x2apic,
        }))
    }

    /// AMD-Vi: the I/O page table, the device table (every entry the same),
    /// the command buffer, the event log and the completion-wait page.
    fn build_amdvi(
        &self,
        h: &IommuHandoff,
        blocked: &PciHandoff,
        partitions: &[PartitionInfo],
        holes: &Holes,
        reach: &Reach,
        frames: &mut BumpFrames,
    ) -> Result<(Hw, [u64; 4]), &'static str> {
        // The core's identity map's top.
        let top = reach.top;
        {
            let g = self.units.lock();
            let (units, n) = &*g;
            for u in &units[..*n] {
                let efr = Window { base: u.base }.read64(amdvi::reg::EFR);
                log::info!(
                    "IOMMU: AMD-Vi unit {:#x}: extended features {efr:#x}",
                    u.base
                );
            }
        }
        let pt_root = identity_tables(&AmdViFormat, h, holes, top, frames)?;
        let ids = u64::from(h.device_ids.clamp(256, 65536));
        let pages = (ids * 32).div_ceil(PAGE);
        // The bump allocator hands out consecutive frames: the device table
        // is one contiguous block.
        let dev_table = frames_take_run(frames, pages, "the device table is not contiguous")?;
        // SAFETY: only this core's table roots and frames from its own
        // allocator reach the engine (`IdentityMem::new`'s contract).
        let mut mem = unsafe { IdentityMem::new() };
        let open = amdvi::dte(pt_root, 1);
        let closed = amdvi::dte_blocked(2);
        let mut assigned = [(0u16, [0u64; 4]); MAX_APPLIANCES * MAX_PARTITION_DEVICES];
        let mut n_assigned = 0;
        let mut irq = IrqTables::new();
        for (i, p) in partitions.iter().enumerate().take(MAX_APPLIANCES) {
            if p.devices().is_empty() {
                continue;
            }
            let e = amdvi::dte(
                partition_tables(&AmdViFormat, p, frames)?,
                thinhv_abi::handoff::appliance_iommu_domain(i),
            );
            for d in p.devices() {
                // A function whose messages thinhv remaps: its own table,
                // every entry not present until the appliance programs
                // its MSI (`handlers::msi_remap`).
                let e = if h.remaps_interrupts() && appliance_remapped(d, reach) {
                    let table = irq.add(d.rid, frames)?;
                    log::info!(
                        "IOMMU: interrupts of {:02x}:{:02x}.{} (appliance {}) remapped through its table at {table:#x}",
                        d.rid >> 8,
                        (d.rid >> 3) & 0x1f,
                        d.rid & 7,
                        p.name()
                    );
                    irq_remap::amdvi::dte(e, table, false)
                } else {
                    e
                };
                assigned[n_assigned] = (d.rid, e);
                n_assigned += 1;
            }
        }
        // The OS's functions whose MSI thinhv remaps: a table each, or
        // behind a conventional bridge an equal part of the one table the
        // IDs they send with share (`IommuHandoff::shared`).
        let mut shared_tables = [0u64; thinhv_abi::handoff::MAX_SHARED_TABLES];
        for r in h.shared() {
            let t = &mut shared_tables[usize::from(r.table)];
            if *t == 0 {
                *t = frames_take(frames)?;
            }
        }
        let mut os_msi = 0;
        let remapped = || {
            blocked
                .mediated()
                .iter()
                .filter(|m| m.remaps_msi())
                .map(|m| u16::from(m.bus) << 8 | u16::from(m.devfn))
        };
        for rid in remapped().filter(|&r| h.shared_table_of(r).is_none()) {
            irq.add(rid, frames)?;
            os_msi += 1;
        }
        for (t, &table) in shared_tables.iter().enumerate().filter(|(_, t)| **t != 0) {
            let members: alloc::vec::Vec<u16> = remapped()
                .filter(|&r| h.shared_table_of(r) == Some(t as u8))
                .collect();
            // At most as many as get a part of MIN_SHARE entries; the
            // loader keeps them within that, and any beyond lose their
            // interrupts (every entry of the table is the OS's).
            let room = members
                .len()
                .min(irq_remap::amdvi::ENTRIES / irq_remap::amdvi::MIN_SHARE);
            for (i, &rid) in members.iter().enumerate() {
                let Some(share) = irq_remap::amdvi::Share::nth(i, room) else {
                    log::error!(
                        "IOMMU: interrupts of {:02x}:{:02x}.{}: no room in the table its IDs share",
                        rid >> 8,
                        (rid >> 3) & 0x1f,
                        rid & 7
                    );
                    continue;
                };
                irq.add_shared(rid, table, share)?;
                os_msi += 1;
            }
            if let Some(each) = irq_remap::amdvi::ENTRIES.checked_div(room) {
                log::info!(
                    "IOMMU: interrupts of {room} function(s) behind a conventional bridge remapped through one table at {table:#x}, which the IDs they send with share ({each} entries each)"
                );
            }
        }
        if os_msi > 0 {
            log::info!("IOMMU: interrupts of {os_msi} function(s) of the OS's remapped");
        }
        let assigned = &assigned[..n_assigned];
        for id in 0..ids {
            let shared = h
                .shared_table_of(id as u16)
                .map(|t| shared_tables[usize::from(t)]);
            let e = if let Some((_, e)) = assigned.iter().find(|(r, _)| u64::from(*r) == id) {
                *e
            } else if blocked.is_blocked(id as u16) {
                closed
            } else if let Some(table) = irq.of(id as u16).or(shared) {
                irq_remap::amdvi::dte(open, table, false)
            } else {
                open
            };
            let at = dev_table + id * 32;
            let (table, index) = (at & !(PAGE - 1), ((at & (PAGE - 1)) / 8) as usize);
            for (k, q) in e.iter().enumerate() {
                mem.write_entry(table, index + k, *q);
            }
        }
        Ok((
            Hw::AmdVi {
                dev_table,
                dev_table_pages: pages,
                cmd_buf: frames_take(frames)?,
                event_log: frames_take(frames)?,
                sem: frames_take(frames)?,
                irq,
            },
            open,
        ))
    }

    /// Switches translation on (once, at the end of `CORE_OP_INIT`; the
    /// seal calls it again and gets the same report). Returns (units
    /// translating, units).
    pub fn enable(&self) -> (u32, u32) {
        let mut on = 0;
        let total;
        {
            let mut g = self.units.lock();
            let (units, n) = &mut *g;
            total = *n as u32;
            if self.started.swap(true, Ordering::SeqCst) {
                let on = units[..*n]
                    .iter()
                    .filter(|u| u.record.state == IOMMU_STATE_TRANSLATING)
                    .count() as u32;
                return (on, total);
            }
            if self.protect {
                // Table writes must reach memory before a non-coherent
                // unit walks them.
                // SAFETY: writing back caches loses nothing.
                unsafe { core::arch::asm!("wbinvd", options(nostack)) };
                for (i, u) in units[..*n].iter_mut().enumerate() {
                    let r: Result<(), &'static str> = match self.hw {
                        // With the queue where interrupts will be
                        // remapped (at the claim: [`Iommu::start_remapping`]).
                        Hw::Vtd {
                            root_table,
                            ir: Some(ir),
                            ..
                        } => vtd::enable_queued(
                            &mut Window { base: u.base },
                            root_table,
                            &mut ir.queue(i),
                        )
                        .map(|_| ())
                        .map_err(vtd::VtdError::describe),
                        Hw::Vtd { root_table, .. } => {
                            vtd::enable(&mut Window { base: u.base }, root_table)
                                .map(|_| ())
                                .map_err(vtd::VtdError::describe)
                        }
                        Hw::AmdVi {
                            dev_table,
                            dev_table_pages,
                            cmd_buf,
                            event_log,
                            sem,
                            ..
                        } => amdvi_enable(
                            u.base,
                            dev_table,
                            dev_table_pages,
                            cmd_buf,
                            event_log,
                            sem,
                        ),
                        Hw::None => Err("not set up"),
                    };
                    match r {
                        Ok(()) => {
                            u.record.state = IOMMU_STATE_TRANSLATING;
                            on += 1;
                            log::info!(
                                "IOMMU: unit {:#x} translating; DMA into thinhv is blocked",
                                u.base
                            );
                        }
                        Err(e) => {
                            u.record.state = IOMMU_STATE_FAILED;
                            log::error!("IOMMU: unit {:#x}: {e}", u.base);
                        }
                    }
                }
            }
        }
        self.publish_all();
        (on, total)
    }

    /// Switches translation off on every unit that translates (a roll-back
    /// before the OS starts: the tables live in the region the loader is
    /// about to free). Returns how many units could not be switched off.
    pub fn disable(&self) -> u32 {
        let mut failed = 0;
        {
            let mut g = self.units.lock();
            let (units, n) = &mut *g;
            for u in &mut units[..*n] {
                if u.record.state != IOMMU_STATE_TRANSLATING {
                    continue;
                }
                let mut regs = Window { base: u.base };
                let off = match self.hw {
                    Hw::Vtd { .. } => vtd::disable(&mut regs).map_err(vtd::VtdError::describe),
                    Hw::AmdVi { .. } => {
                        amdvi::disable(&mut regs).map_err(amdvi::AmdViError::describe)
                    }
                    Hw::None => Ok(()),
                };
                match off {
                    Ok(()) => {
                        u.record.state = IOMMU_STATE_OFF;
                        log::info!(
                            "IOMMU: unit {:#x} no longer translating (roll-back)",
                            u.base
                        );
                    }
                    Err(why) => {
                        failed += 1;
                        log::error!(
                            "IOMMU: unit {:#x} could not be switched off ({why}); its tables stay reserved",
                            u.base
                        );
                    }
                }
            }
            self.started.store(false, Ordering::SeqCst);
            self.ir_on.store(false, Ordering::SeqCst);
        }
        self.publish_all();
        failed
    }

    /// Whether appliances' functions' messages are judged (units set up
    /// to protect, `[iommu] interrupts = "remap"`): through remapping
    /// tables on AMD-Vi, written by thinhv on VT-d.
    pub fn remaps_appliances(&self) -> bool {
        self.protect
            && self.remap_interrupts
            && matches!(self.hw, Hw::AmdVi { .. } | Hw::Vtd { .. })
    }

    /// Whether the interrupts of `rid` are judged (units translating): on
    /// AMD-Vi through a table of thinhv's, on VT-d written by thinhv.
    pub fn remaps(&self, rid: u16) -> bool {
        // By reference: the tables are kilobytes, and this runs on a
        // processor's host stack.
        let judged = match &self.hw {
            Hw::AmdVi { irq, .. } => irq.of(rid).is_some(),
            Hw::Vtd { judged, .. } => judged.of(rid).is_some(),
            Hw::None => false,
        };
        judged && self.started.load(Ordering::SeqCst) && self.protect
    }

    /// How a judged message reaches the function (read once per message:
    /// remapping on VT-d starts at the claim).
    pub fn message_format(&self) -> MessageFormat {
        match self.hw {
            Hw::AmdVi { .. } => MessageFormat::AmdViTable,
            Hw::Vtd { ir: Some(_), .. } if self.ir_on.load(Ordering::SeqCst) => {
                MessageFormat::VtdTable
            }
            Hw::Vtd { .. } => MessageFormat::VtdCompat,
            Hw::None => MessageFormat::None,
        }
    }

    /// VT-d with interrupt remapping: the entry of `rid`'s `slot` in
    /// thinhv's table delivers `target`, usable by `rid` alone (by the
    /// requesters on its buses where `rid` sits behind a PCI Express to
    /// PCI bridge: [`IrqTables::add_judged_buses`]); every unit
    /// reads it again. `None` frees the entry (not present). Returns the
    /// entry's handle: 0, never present, for `None`.
    pub fn set_vtd_entry(
        &self,
        rid: u16,
        slot: u16,
        target: Option<irq_remap::Target>,
    ) -> Result<u16, irq_remap::Refusal> {
        let Hw::Vtd {
            ir: Some(ir),
            judged,
            ..
        } = &self.hw
        else {
            return Err(irq_remap::Refusal::Malformed);
        };
        let ir = *ir;
        let key = irq_remap::Key { source: rid, slot };
        if self.irt_broken.load(Ordering::SeqCst) {
            // Entries stay as they are (each names its owner's processor
            // or nothing); new ones are refused.
            return if target.is_some() {
                Err(irq_remap::Refusal::Malformed)
            } else {
                Ok(0)
            };
        }
        let mut g = self.irt.lock();
        let slots = g.as_mut().ok_or(irq_remap::Refusal::Malformed)?;
        let (handle, entry) = match target {
            Some(t) => {
                let e = match judged.buses_of(rid) {
                    Some((first, last)) => irq_remap::vtd::irte_buses(&t, first, last, ir.x2apic)?,
                    None => irq_remap::vtd::irte(&t, rid, ir.x2apic)?,
                };
                (slots.assign_within(key, self.irt_shares.of(rid))?, e)
            }
            None => match slots.release(key) {
                Some(h) => (h, irq_remap::vtd::NOT_PRESENT),
                None => return Ok(0),
            },
        };
        let at = (ir.table + 16 * u64::from(handle)) as *mut u64;
        // SAFETY: `table` is the pool block of `VTD_IRT_PAGES` pages given to
        // the remapping table and `handle` is below its entries (`Slots`
        // of that size). A present entry gets its high quadword (the
        // source, the same for a live entry, whose key names it) before
        // its low one (present bit, destination, vector); one not present
        // loses its present bit first. The unit never reads half of
        // another entry.
        unsafe {
            if entry[0] & 1 != 0 {
                core::ptr::write_volatile(at.add(1), entry[1]);
                core::ptr::write_volatile(at, entry[0]);
            } else {
                core::ptr::write_volatile(at, entry[0]);
                core::ptr::write_volatile(at.add(1), entry[1]);
            }
            core::arch::x86_64::_mm_clflush(at.cast::<u8>());
            core::arch::x86_64::_mm_mfence();
        }
        drop(g);
        self.on_every_unit(ir, &[vtd::desc::iec_index(handle)])
            .map_err(|e| {
                if !self.irt_broken.swap(true, Ordering::SeqCst) {
                    log::error!(
                        "IOMMU: interrupt entry {handle}: {e}; no remapping entry changes from now on (new messages are refused)"
                    );
                }
                irq_remap::Refusal::Malformed
            })?;
        Ok(if entry[0] & 1 != 0 { handle } else { 0 })
    }

    /// Runs `descs` through the queue of every translating VT-d unit.
    fn on_every_unit(&self, ir: VtdIr, descs: &[[u64; 2]]) -> Result<(), &'static str> {
        let g = self.units.lock();
        let (units, n) = &*g;
        for (i, u) in units[..*n].iter().enumerate() {
            if u.record.state == IOMMU_STATE_TRANSLATING {
                vtd::queue_run(&mut Window { base: u.base }, &mut ir.queue(i), descs)
                    .map_err(vtd::VtdError::describe)?;
            }
        }
        Ok(())
    }

    /// When the appliances are claimed (the firmware is done, the OS not
    /// started): every VT-d unit starts remapping interrupts through
    /// thinhv's table. Compatibility-format messages are blocked from then
    /// on, unless the loader did not find every interrupt source of the
    /// OS's remappable or an appliance's function cannot be remapped
    /// (`compat_needed`): then they keep passing, which the unit must
    /// acknowledge (GCMD.CFI). A unit that fails leaves every unit
    /// without remapping: judged messages are then written in
    /// compatibility format. Once.
    pub fn start_remapping(&self) {
        if let Hw::AmdVi {
            dev_table,
            dev_table_pages,
            cmd_buf,
            sem,
            ..
        } = self.hw
        {
            if self.remap_interrupts
                && self.started.load(Ordering::SeqCst)
                && !self.remapping_started.swap(true, Ordering::SeqCst)
            {
                self.abort_unremapped(dev_table, dev_table_pages, cmd_buf, sem);
            }
            return;
        }
        let Hw::Vtd { ir: Some(ir), .. } = self.hw else {
            return;
        };
        // The real table is the OS's unit's (no appliance runs): remapping
        // follows the OS's own, never this call's (the OS may make it).
        if self.os_ir {
            return;
        }
        if !self.started.load(Ordering::SeqCst)
            || self.remapping_started.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let g = self.units.lock();
        let (units, n) = &*g;
        let units = &units[..*n];
        if units
            .iter()
            .any(|u| u.record.state != IOMMU_STATE_TRANSLATING)
        {
            log::error!(
                "IOMMU: not every VT-d unit translates: interrupts are not remapped; judged messages are written in compatibility format"
            );
            return;
        }
        let compat = self.compat_needed.is_some();
        let mut failed = None;
        for (i, u) in units.iter().enumerate() {
            if let Err(e) = vtd::enable_remapping(
                &mut Window { base: u.base },
                &mut ir.queue(i),
                ir.table,
                thinhv_abi::layout::VTD_IRT_ENTRIES_LOG2,
                ir.x2apic,
                compat,
            ) {
                failed = Some((u.base, e));
                break;
            }
        }
        if let Some((base, e)) = failed {
            for u in units {
                let _ = vtd::disable_remapping(&mut Window { base: u.base });
            }
            log::error!(
                "IOMMU: unit {base:#x}: interrupt remapping: {e}{}; no unit remaps, judged messages are written in compatibility format",
                self.compat_needed
                    .map_or_else(alloc::string::String::new, |why| alloc::format!(
                        " (compatibility format must keep passing: {why})"
                    ))
            );
            return;
        }
        self.ir_on.store(true, Ordering::SeqCst);
        match self.compat_needed {
            None => log::info!(
                "IOMMU: {} VT-d unit(s) remapping interrupts; compatibility-format messages blocked, only entries thinhv wrote deliver",
                units.len()
            ),
            Some(why) => log::warn!(
                "IOMMU: {} VT-d unit(s) remapping interrupts; compatibility-format messages still pass ({why}): a device's own DMA to the interrupt window is not stopped",
                units.len()
            ),
        }
    }

    /// Writes entry `slot` of the remapping table of `rid` (the entry its
    /// part of a shared table gives that slot) and has every translating
    /// unit read it again (INVALIDATE_INTERRUPT_TABLE for every requester
    /// ID whose device table entry names the table, then a completion
    /// wait). Returns the table's index of the entry, what the function's
    /// message names. `entry` 0 (not present) for a slot its part has no
    /// room for takes the entry its part never writes.
    pub fn set_irte(&self, rid: u16, slot: u16, entry: u32) -> Result<u16, IrteError> {
        let Hw::AmdVi {
            dev_table_pages,
            cmd_buf,
            sem,
            irq,
            ..
        } = &self.hw
        else {
            return Err(IrteError::Failed("no interrupt remapping table"));
        };
        let (dev_table_pages, cmd_buf, sem) = (*dev_table_pages, *cmd_buf, *sem);
        let (table, share) = irq
            .share_of(rid)
            .ok_or(IrteError::Failed("no interrupt remapping table"))?;
        let index = match share.index(slot) {
            Some(i) => i,
            None if entry == 0 => share.never(),
            None => return Err(IrteError::Full),
        };
        if usize::from(index) >= irq_remap::amdvi::ENTRIES {
            return Err(IrteError::Failed("no such entry"));
        }
        // The IDs whose entries name the table: `rid`'s alone, or every ID
        // of a shared table (within the device table).
        let ids = (dev_table_pages * PAGE / 32).min(0x1_0000) as u32;
        let mut invalidate = alloc::vec::Vec::new();
        match self
            .shared
            .iter()
            .find(|r| (r.first..=r.last).contains(&rid))
        {
            Some(mine) => {
                for r in self.shared.iter().filter(|r| r.table == mine.table) {
                    invalidate.extend(
                        (u32::from(r.first)..=u32::from(r.last))
                            .filter(|&id| id < ids)
                            .map(|id| id as u16),
                    );
                }
            }
            None => invalidate.push(rid),
        }
        // Held from the read to the last wait: entries are written one at
        // a time.
        let g = self.units.lock();
        let (units, n) = &*g;
        let at = (table + 4 * u64::from(index)) as *mut u32;
        // SAFETY: `table` is a page of the core's pool given to this
        // function's interrupt table (or to the one its IDs share, of
        // which `index` is in its part); `index` is below the entries a
        // page holds.
        let now = unsafe { core::ptr::read_volatile(at) };
        if now == entry && !self.irt_broken.load(Ordering::SeqCst) {
            // What every unit read after the last write (each write was
            // followed by its invalidation): nothing to tell them.
            return Ok(index);
        }
        // SAFETY: as above; the line is written back before the unit is
        // told.
        unsafe {
            core::ptr::write_volatile(at, entry);
            core::arch::x86_64::_mm_clflush(at.cast::<u8>());
            core::arch::x86_64::_mm_mfence();
        }
        for u in units[..*n]
            .iter()
            .filter(|u| u.record.state == IOMMU_STATE_TRANSLATING)
        {
            if invalidate_each(u.base, cmd_buf, sem, &invalidate, |id| {
                amdvi::cmd_invalidate_interrupt_table(id)
            })
            .is_err()
            {
                // A later write of the same value invalidates again.
                self.irt_broken.store(true, Ordering::SeqCst);
                return Err(IrteError::Failed("the command buffer did not complete"));
            }
        }
        Ok(index)
    }

    /// AMD-Vi, at the claim: where every interrupt source of the OS's is
    /// remapped (`compat_needed` is `None`), every requester ID whose
    /// device table entry leaves its interrupts unremapped (no table of
    /// thinhv's) has them aborted from now on, the I/O APICs' excepted
    /// (their entries are judged as written). So a function without a
    /// table, whatever it writes by DMA to the interrupt window, reaches no
    /// processor.
    fn abort_unremapped(&self, dev_table: u64, pages: u64, cmd_buf: u64, sem: u64) {
        if let Some(why) = self.compat_needed {
            log::warn!(
                "IOMMU: requester IDs without a remapping table keep sending unremapped ({why}); a device's own DMA to the interrupt window is not stopped"
            );
            return;
        }
        let ids = pages * PAGE / 32;
        let mut changed = alloc::vec::Vec::new();
        for id in 0..ids {
            if self.ioapic_sources.contains(&(id as u16)) {
                continue;
            }
            let q2 = (dev_table + id * 32 + 16) as *mut u64;
            // SAFETY: `dev_table` is the contiguous pool block of `pages`
            // pages holding the device table (`build_amdvi`); entry `id`
            // is below `ids`, and its bits 191:128 are one aligned quadword
            // the unit reads whole.
            unsafe {
                if irq_remap::amdvi::passes_unremapped(core::ptr::read_volatile(q2)) {
                    core::ptr::write_volatile(q2, irq_remap::amdvi::ABORT_ALL);
                    core::arch::x86_64::_mm_clflush(q2.cast::<u8>());
                    changed.push(id as u16);
                }
            }
        }
        // SAFETY: a store fence (SSE2, which every x86-64 processor has):
        // the written-back entries are in memory before the unit is told.
        unsafe { core::arch::x86_64::_mm_mfence() };
        let g = self.units.lock();
        let (units, n) = &*g;
        for u in units[..*n]
            .iter()
            .filter(|u| u.record.state == IOMMU_STATE_TRANSLATING)
        {
            if invalidate_each(u.base, cmd_buf, sem, &changed, amdvi::cmd_invalidate_devtab)
                .is_err()
            {
                log::error!(
                    "IOMMU: unit {:#x}: the command buffer did not complete; aborted interrupts may take effect late",
                    u.base
                );
            }
        }
        log::info!(
            "IOMMU: interrupts of {} requester ID(s) without a remapping table aborted (the I/O APICs' excepted): only entries thinhv wrote deliver",
            changed.len()
        );
    }

    /// Reads and clears recorded faults, counting them.
    pub fn poll(&self) {
        if !self.protect {
            return;
        }
        let Some(mut g) = self.units.try_lock() else {
            return;
        };
        let (units, n) = &mut *g;
        for (i, u) in units[..*n].iter_mut().enumerate() {
            if u.record.state != IOMMU_STATE_TRANSLATING {
                continue;
            }
            // By reference: `Hw` holds kilobytes of tables.
            let (faults, overflow) = match (&self.hw, u.caps) {
                (Hw::Vtd { .. }, Some(c)) => vtd::take_faults(&mut Window { base: u.base }, &c),
                (Hw::AmdVi { event_log, .. }, _) => {
                    let (ev, o) = amdvi::take_events(
                        &mut Window { base: u.base },
                        &PhysRing { base: *event_log },
                    );
                    (
                        ev.iter()
                            .filter(|e| e.code == amdvi::EVENT_IO_PAGE_FAULT)
                            .map(|e| vtd::Fault {
                                source: e.device_id,
                                reason: e.code,
                                address: e.address & !0xfff,
                                write: e.write,
                                interrupt_index: None,
                            })
                            .collect(),
                        o,
                    )
                }
                _ => continue,
            };
            if faults.is_empty() && !overflow {
                continue;
            }
            if self.os_real.is_some() || self.os_amd.is_some() {
                let mut q = self.os_faults.lock();
                for f in faults.iter().filter(|f| f.interrupt_index.is_none()) {
                    if q.len() < OS_FAULTS_QUEUED {
                        q.push(thin_hv_core::os_iommu::RealFault {
                            unit: i,
                            sid: f.source,
                            addr: f.address,
                            write: f.write,
                        });
                    }
                }
            }
            for f in &faults {
                u.record.faults = u.record.faults.saturating_add(1);
                u.record.last_fault_address = f.address;
                u.record.last_fault_source = f.source;
                u.record.last_fault_reason = f.reason;
                u.record.last_fault_write = u8::from(f.write);
                if let Some(index) = f.interrupt_index.filter(|_| u.record.faults <= 32) {
                    log::warn!(
                        "IOMMU {:#x}: interrupt message by {:02x}:{:02x}.{} naming entry {index} blocked (reason {:#x}, {} so far)",
                        u.base,
                        f.source >> 8,
                        (f.source >> 3) & 0x1f,
                        f.source & 7,
                        f.reason,
                        u.record.faults
                    );
                } else if u.record.faults <= 32 {
                    log::warn!(
                        "IOMMU {:#x}: DMA {} by {:02x}:{:02x}.{} at {:#x} blocked (reason {:#x}, {} so far)",
                        u.base,
                        if f.write { "write" } else { "read" },
                        f.source >> 8,
                        (f.source >> 3) & 0x1f,
                        f.source & 7,
                        f.address,
                        f.reason,
                        u.record.faults
                    );
                }
            }
            if overflow {
                u.record.overflows = u.record.overflows.saturating_add(1);
            }
            self.status.publish_iommu(i, &u.record);
        }
    }

    fn publish_all(&self) {
        let g = self.units.lock();
        let (units, n) = &*g;
        for (i, u) in units[..*n].iter().enumerate() {
            self.status.publish_iommu(i, &u.record);
        }
        self.status.set_iommu_count(*n);
    }
}

/// The identity table for devices: everything below `top` except thinhv's
/// region and the appliances' RAM (the OS's devices reach neither), plus
/// the firmware's reserved ranges.
fn identity_tables(
    fmt: &impl EntryFormat,
    h: &IommuHandoff,
    holes: &Holes,
    top: u64,
    frames: &mut BumpFrames,
) -> Result<u64, &'static str> {
    let oom = "out of memory for the IOMMU tables";
    // SAFETY: only this core's table roots and frames from its own
    // allocator reach the engine (`IdentityMem::new`'s contract).
    let mut mem = unsafe { IdentityMem::new() };
    let root = Mapper::create(fmt, &mut mem, frames)
        .map_err(|_| oom)?
        .root();
    let mut m = Mapper::open(fmt, &mut mem, root);
    let mut next = 0u64;
    for hole in holes.sorted() {
        if hole.base > next {
            m.map(
                next,
                next,
                hole.base.min(top).saturating_sub(next),
                Attrs::RWX,
                frames,
            )
            .map_err(|_| oom)?;
        }
        next = next.max(hole.end());
    }
    if next < top {
        m.map(next, next, top - next, Attrs::RWX, frames)
            .map_err(|_| oom)?;
    }
    for r in h.reserved_ranges() {
        if holes.sorted().iter().any(|x| x.overlaps(r.base, r.size)) {
            log::error!(
                "IOMMU: reserved range {:#x}+{:#x} overlaps thinhv or an appliance; not mapped",
                r.base,
                r.size
            );
            continue;
        }
        let base = r.base & !(PAGE - 1);
        let end = r.end().div_ceil(PAGE) * PAGE;
        m.map(base, base, end - base, Attrs::RWX, frames)
            .map_err(|_| oom)?;
    }
    Ok(root)
}

/// An appliance's I/O page tables: its RAM where its guest-physical map
/// has it (`appliance_ram_ranges`).
fn partition_tables(
    fmt: &impl EntryFormat,
    p: &PartitionInfo,
    frames: &mut BumpFrames,
) -> Result<u64, &'static str> {
    let oom = "out of memory for an appliance's IOMMU tables";
    // SAFETY: only this core's table roots and frames from its own
    // allocator reach the engine (`IdentityMem::new`'s contract).
    let mut mem = unsafe { IdentityMem::new() };
    let mut m = Mapper::create(fmt, &mut mem, frames).map_err(|_| oom)?;
    super::core_init::map_appliance_ram(&mut m, p, frames).map_err(|_| oom)?;
    Ok(m.root())
}

/// Most ranges the OS's devices must never reach.
const MAX_HOLES: usize = 1
    + thinhv_abi::handoff::MAX_HELD_BARS
    + MAX_APPLIANCES * (2 + MAX_PARTITION_DEVICES * MAX_DEVICE_BARS);

/// What the OS's devices must never reach: thinhv's region, each
/// appliance's RAM and image copy, and the BARs of its functions (no
/// peer-to-peer writes into them), sorted.
pub struct Holes {
    ranges: [PhysRange; MAX_HOLES],
    n: usize,
}

impl Holes {
    /// `region`, the BARs thinhv keeps (`held`) and the appliances' RAM,
    /// image copies and BARs of the hand-off.
    pub fn new(region: PhysRange, partitions: &[PartitionInfo], held: &[PhysRange]) -> Self {
        let mut ranges = [PhysRange::default(); MAX_HOLES];
        ranges[0] = region;
        let mut n = 1;
        for &r in held.iter().take(thinhv_abi::handoff::MAX_HELD_BARS) {
            ranges[n] = r;
            n += 1;
        }
        for p in partitions.iter().take(MAX_APPLIANCES) {
            ranges[n] = p.ram;
            n += 1;
            if !p.image.is_empty() {
                ranges[n] = p.image;
                n += 1;
            }
            for d in p.devices() {
                for (_, bar) in d.bars() {
                    ranges[n] = bar;
                    n += 1;
                }
            }
        }
        ranges[..n].sort_unstable_by_key(|r| r.base);
        Self { ranges, n }
    }

    fn sorted(&self) -> &[PhysRange] {
        &self.ranges[..self.n]
    }
}

/// Enables one AMD-Vi unit and checks that its command processing works:
/// an invalidation of the domain followed by a completion wait that must
/// store its value.
fn amdvi_enable(
    base: u64,
    dev_table: u64,
    pages: u64,
    cmd_buf: u64,
    event_log: u64,
    sem: u64,
) -> Result<(), &'static str> {
    let mut w = Window { base };
    let left = amdvi::enable(&mut w, dev_table, pages, cmd_buf, event_log)
        .map_err(amdvi::AmdViError::describe)?;
    if left.is_set() {
        log::warn!(
            "IOMMU: unit {base:#x}: the firmware left an exclusion range {:#x}..={:#x} ({}, for {}); cleared",
            left.start(),
            left.last(),
            if left.enabled() {
                "enabled"
            } else {
                "disabled"
            },
            if left.all_devices() {
                "every device"
            } else {
                "devices marked EX"
            }
        );
    }
    // SAFETY: `sem` is a pool page reserved for completion waits.
    unsafe { core::ptr::write_volatile(sem as *mut u64, 0) };
    amdvi::submit(
        &mut w,
        &mut PhysRing { base: cmd_buf },
        &[
            amdvi::cmd_invalidate_domain(1),
            amdvi::cmd_completion_wait(sem, 0x7468_696e),
        ],
    );
    // SAFETY: as above; the IOMMU writes the value by DMA.
    amdvi::wait(|| unsafe { core::ptr::read_volatile(sem as *const u64) } == 0x7468_696e)
        .map_err(|_| "the command buffer did not complete")
}

/// Entries of thinhv's VT-d table for each I/O APIC (pins, at most 120).
const IRT_IOAPIC_SHARE: usize = 128;
/// Entries of thinhv's VT-d table for each appliance with functions.
const IRT_APPLIANCE_SHARE: usize = 256;

/// How thinhv's VT-d remapping table is shared out: from the top, a share
/// for each I/O APIC with a known source and each appliance with
/// functions; the OS's sources take from the rest, above entry 0.
struct IrtShares {
    /// (source, first entry, end).
    own: alloc::vec::Vec<(u16, usize, usize)>,
    /// The OS's share's end.
    os_end: usize,
}

impl IrtShares {
    fn new(partitions: &[PartitionInfo], ioapics: &[thinhv_abi::handoff::IoApicInfo]) -> Self {
        let mut end = 1usize << thinhv_abi::layout::VTD_IRT_ENTRIES_LOG2;
        let mut own = alloc::vec::Vec::new();
        for sid in ioapics
            .iter()
            .filter_map(thinhv_abi::handoff::IoApicInfo::source_id)
        {
            own.push((sid, end - IRT_IOAPIC_SHARE, end));
            end -= IRT_IOAPIC_SHARE;
        }
        for p in partitions.iter().take(MAX_APPLIANCES) {
            if p.devices().is_empty() {
                continue;
            }
            for d in p.devices() {
                own.push((d.rid, end - IRT_APPLIANCE_SHARE, end));
            }
            end -= IRT_APPLIANCE_SHARE;
        }
        Self { own, os_end: end }
    }

    /// The entries `rid` may take.
    fn of(&self, rid: u16) -> core::ops::Range<usize> {
        self.own
            .iter()
            .find(|(s, _, _)| *s == rid)
            .map_or(1..self.os_end, |&(_, a, b)| a..b)
    }
}

/// The remapping table's entries: 0 reserved (never present), the rest
/// free.
fn irt_slots() -> irq_remap::Slots {
    let mut slots = irq_remap::Slots::new(1 << thinhv_abi::layout::VTD_IRT_ENTRIES_LOG2);
    let _ = slots.assign(NEVER_PRESENT, Some(0));
    slots
}

/// The OS's emulated AMD-Vi unit's hold on the real device table, where
/// every unit can invalidate everything at once (EFR.IASup), which the
/// changes of its entries need. `open`: thinhv's entry for the OS.
fn os_amd_real(
    units: &([Unit; MAX_IOMMUS], usize),
    open: [u64; 4],
) -> Option<thin_hv_core::os_iommu::RealDevTable> {
    let (units, n) = units;
    for u in &units[..*n] {
        let efr = Window { base: u.base }.read64(amdvi::reg::EFR);
        if efr & (1 << 6) == 0 {
            log::error!(
                "IOMMU: AMD-Vi unit {:#x} cannot invalidate everything at once (EFR.IASup clear): the OS's emulated unit needs it; the OS gets none",
                u.base
            );
            return None;
        }
    }
    Some(thin_hv_core::os_iommu::RealDevTable {
        open_q0: open[0],
        open_domain: (open[1] & 0xffff) as u16,
    })
}

/// AMD-Vi: `command(id)` for each of `ids` on the unit at `base`, through
/// the command buffer at `cmd_buf`, in batches of 128 (the buffer holds
/// 256), each followed by a completion wait on `sem`. `Err` at the first
/// wait that does not complete (the rest are not sent).
fn invalidate_each(
    base: u64,
    cmd_buf: u64,
    sem: u64,
    ids: &[u16],
    command: impl Fn(u16) -> [u32; 4],
) -> Result<(), ()> {
    for batch in ids.chunks(128) {
        let token = IRQ_TOKEN.fetch_add(1, Ordering::Relaxed);
        let mut cmds: alloc::vec::Vec<[u32; 4]> = batch.iter().map(|&id| command(id)).collect();
        cmds.push(amdvi::cmd_completion_wait(sem, token));
        amdvi::submit(&mut Window { base }, &mut PhysRing { base: cmd_buf }, &cmds);
        // SAFETY: `sem` is the pool page for completion waits; the unit
        // stores the token there by DMA.
        amdvi::wait(|| unsafe { core::ptr::read_volatile(sem as *const u64) } == token)
            .map_err(|_| ())?;
    }
    Ok(())
}

/// `pages` (at least one) zeroed frames in a row: the bump allocator hands
/// out consecutive frames, and anything else is `not_contiguous`.
fn frames_take_run(
    frames: &mut BumpFrames,
    pages: u64,
    not_contiguous: &'static str,
) -> Result<u64, &'static str> {
    let first = frames_take(frames)?;
    for i in 1..pages {
        if frames_take(frames)? != first + i * PAGE {
            return Err(not_contiguous);
        }
    }
    Ok(first)
}

fn frames_take(frames: &mut BumpFrames) -> Result<u64, &'static str> {
    let f = frames
        .alloc_frame()
        .ok_or("out of memory for the IOMMU tables")?;
    // SAFETY: `f` was just taken from the IOMMU's own frame allocator.
    unsafe { IdentityMem::new() }.zero_frame(f);
    Ok(f)
}

/// End of `CORE_OP_INIT`: translation on, before any CPU is virtualized
/// (see the module documentation for why this is safe for the firmware).
pub fn start() {
    let Some(core) = super::core_state::get() else {
        return;
    };
    let (on, total) = core.iommu.enable();
    if total > 0 && core.iommu.protect {
        log::info!(
            "IOMMU: {on} of {total} unit(s) translating from the core's start, before any CPU is virtualized"
        );
    }
}

/// `CORE_OP_RELEASE`: the loader rolls back and is about to free the
/// region. Called natively after every CPU left guest mode; switches
/// translation off so that no unit walks tables in freed memory.
pub fn release() -> Result<(), CoreError> {
    let core = super::core_state::get().ok_or(CoreError::NOT_INITIALIZED)?;
    if core.hv.cpus_virtualized.load(Ordering::SeqCst) != 0 {
        log::error!("release refused: processors are still under thinhv");
        return Err(CoreError::BAD_CPU);
    }
    if core.iommu.disable() > 0 {
        return Err(CoreError::IOMMU_STILL_ON);
    }
    Ok(())
}
