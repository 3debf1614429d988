//! Finding the PCI functions before the OS: MCFG (through the `acpi`
//! crate) gives the ECAM regions; the walk itself is pure
//! (`thinhv_passthrough::pci`). The only writes are BAR sizing
//! (`thinhv_passthrough::bars`), with decoding off and every register
//! restored, at the highest task priority so no firmware timer handler
//! touches a device meanwhile.
use alloc::vec::Vec;
use thinhv_passthrough::bars::{ConfigWrite, size_function};
use thinhv_passthrough::pci::{Bdf, ConfigSpace, EcamRegion, Function, enumerate};
use uefi::boot::{self, Tpl};
use uefi::proto::device_path::DevicePathNodeEnum;

/// ECAM reads through the identity-mapped MMIO window.
struct Ecam<'a> {
    regions: &'a [EcamRegion],
}

impl ConfigSpace for Ecam<'_> {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        let Some(base) = self.regions.iter().find_map(|r| r.address(bdf)) else {
            return u32::MAX;
        };
        if offset > 0xffc || !offset.is_multiple_of(4) {
            return u32::MAX;
        }
        // SAFETY: the address lies in an ECAM window the MCFG describes,
        // which the firmware maps as uncached MMIO; a dword read of
        // configuration space has no side effects.
        unsafe { core::ptr::read_volatile((base + u64::from(offset)) as *const u32) }
    }
}

impl ConfigWrite for Ecam<'_> {
    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        let Some(base) = self.regions.iter().find_map(|r| r.address(bdf)) else {
            return;
        };
        if offset > 0xffc || !offset.is_multiple_of(4) {
            return;
        }
        // SAFETY: as `read32`; the caller (BAR sizing) restores what it
        // changes, with the function's decoding off.
        unsafe { core::ptr::write_volatile((base + u64::from(offset)) as *mut u32, value) }
    }
}

/// The ECAM regions from the MCFG, or why there are none.
pub fn ecam_regions() -> Result<Vec<EcamRegion>, &'static str> {
    let tables = super::acpi_tables::tables()?;
    let mcfg = tables
        .find_table::<acpi::mcfg::Mcfg>()
        .map_err(|_| "no MCFG table (no PCI Express configuration space)")?;
    Ok(mcfg
        .get()
        .entries()
        .iter()
        .map(|e| EcamRegion {
            // Where bus 0 would be, whatever bus the entry starts at (see
            // `EcamRegion`).
            base: e.base_address,
            segment: e.pci_segment_group,
            bus_start: e.bus_number_start,
            bus_end: e.bus_number_end,
        })
        .collect())
}

/// Every PCI function the firmware left visible, with its BARs sized.
pub fn functions(regions: &[EcamRegion]) -> Vec<Function> {
    let mut ecam = Ecam { regions };
    let mut fs = enumerate(regions, &ecam);
    for f in &mut fs {
        // SAFETY: raised and restored within this loop iteration; nothing
        // here waits on an event.
        let _tpl = unsafe { boot::raise_tpl(Tpl::HIGH_LEVEL) };
        size_function(&mut ecam, f);
    }
    fs
}

/// The PCI path (device, function per node, from the root bridge) of the
/// disk thinhv was loaded from: the device the OS boots from.
pub fn boot_device_path() -> Option<Vec<(u8, u8)>> {
    let dp = super::chain::own_volume_path().ok()?;
    let nodes: Vec<(u8, u8)> = dp
        .node_iter()
        .filter_map(|n| match n.as_enum() {
            Ok(DevicePathNodeEnum::HardwarePci(p)) => Some((p.device(), p.function())),
            _ => None,
        })
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// Turns bus mastering off on `bdf` (a function given to an appliance):
/// whatever the firmware left running there stops reaching memory; the
/// appliance's driver turns it on again. Only the command register is
/// written (the status half as zeros, which clears nothing).
pub fn stop_bus_mastering(regions: &[EcamRegion], bdf: Bdf) -> bool {
    let mut ecam = Ecam { regions };
    let cmd = ecam.read32(bdf, 0x04) & 0xffff;
    if cmd == 0xffff {
        return false;
    }
    ecam.write32(bdf, 0x04, cmd & !(1 << 2));
    true
}
