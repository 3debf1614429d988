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

/// A dword of `bdf`'s configuration space through ECAM (all ones where no
/// window reaches it).
pub fn read32(regions: &[EcamRegion], bdf: Bdf, offset: u16) -> u32 {
    Ecam { regions }.read32(bdf, offset)
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

/// One function's configuration space through ECAM, with the firmware's
/// stall for waits: what [`thinhv_passthrough::reset`] runs on.
pub struct EcamFunction<'a> {
    ecam: Ecam<'a>,
    bdf: Bdf,
}

/// Function `bdf`'s configuration space.
pub fn function(regions: &[EcamRegion], bdf: Bdf) -> EcamFunction<'_> {
    EcamFunction {
        ecam: Ecam { regions },
        bdf,
    }
}

impl thinhv_passthrough::reset::FunctionConfig for EcamFunction<'_> {
    fn read32(&mut self, reg: u16) -> u32 {
        self.ecam.read32(self.bdf, reg)
    }
    fn write32(&mut self, reg: u16, value: u32) {
        ConfigWrite::write32(&mut self.ecam, self.bdf, reg, value);
    }
    fn write16(&mut self, reg: u16, value: u16) {
        let Some(base) = self.ecam.regions.iter().find_map(|r| r.address(self.bdf)) else {
            return;
        };
        if reg > 0xffe || !reg.is_multiple_of(2) {
            return;
        }
        // SAFETY: as `Ecam::read32`: the address lies in an ECAM window
        // the MCFG describes (uncached MMIO); the loader writes it before
        // the OS runs: an appliance's function's reset sequence, or a PF's
        // SR-IOV registers it sets up or reads the VF layout from.
        unsafe { core::ptr::write_volatile((base + u64::from(reg)) as *mut u16, value) }
    }
    fn wait_us(&mut self, us: u32) {
        boot::stall(core::time::Duration::from_micros(u64::from(us)));
    }
}

/// Memory Space and Bus Master Enable on bridge `bdf` (above a function
/// given to an appliance): it forwards the function's BARs and its DMA.
/// Only the command register is written (the status half as zeros, which
/// clears nothing).
pub fn enable_forwarding(regions: &[EcamRegion], bdf: Bdf) {
    let mut ecam = Ecam { regions };
    let cmd = ecam.read32(bdf, 0x04) & 0xffff;
    if cmd != 0xffff && cmd & 0x6 != 0x6 {
        ConfigWrite::write32(&mut ecam, bdf, 0x04, cmd | 0x6);
    }
}

/// Writes `setup` into PF `pf` and waits the 100 ms its VFs take to
/// answer.
pub fn provision<'a>(
    regions: &'a [EcamRegion],
    pf: Bdf,
    setup: &thinhv_passthrough::shared_pf::Setup,
) -> EcamFunction<'a> {
    use thinhv_passthrough::reset::FunctionConfig;
    let mut f = EcamFunction {
        ecam: Ecam { regions },
        bdf: pf,
    };
    for w in setup.provision() {
        if w.size == 2 {
            f.write16(w.offset, w.value as u16);
        } else {
            f.write32(w.offset, w.value);
        }
    }
    f.wait_us(100_000);
    f
}

/// Whether PF `pf` holds `setup` already (VF Enable on, its NumVFs).
pub fn holds(
    regions: &[EcamRegion],
    pf: Bdf,
    setup: &thinhv_passthrough::shared_pf::Setup,
) -> bool {
    let ecam = Ecam { regions };
    let control = ecam.read32(pf, setup.cap + 8) & 0xffff;
    let num_vfs = ecam.read32(pf, setup.cap + 0x10) & 0xffff;
    control == u32::from(setup.control) && num_vfs == u32::from(setup.num_vfs)
}

/// SR-IOV Control and NumVFs of `pf` back as enumerated (VFs the loader
/// enabled for an appliance left out go away).
pub fn restore_sriov(regions: &[EcamRegion], pf: &Function) {
    use thinhv_passthrough::reset::FunctionConfig;
    let Some(cap) = pf.sriov else {
        return;
    };
    let mut f = EcamFunction {
        ecam: Ecam { regions },
        bdf: pf.bdf,
    };
    f.write16(cap.offset + 8, cap.control);
    f.write16(cap.offset + 0x10, cap.num_vfs);
}

/// Writes `setup` into PF `pf` (`Setup::provision`: NumVFs, the firmware's
/// page size and VF BARs, VF Enable and VF MSE), waits the 100 ms the VFs
/// take to answer, and returns VF `index` as a function of its own, or
/// why not.
pub fn enable_vf(
    regions: &[EcamRegion],
    pf: &Function,
    setup: &thinhv_passthrough::shared_pf::Setup,
    index: u16,
) -> Result<Function, alloc::string::String> {
    provision(regions, pf.bdf, setup);
    vf_of(regions, pf, setup, index)
}

/// VF `index` of `pf`, which holds `setup`, as a function of its own, or
/// why not.
pub fn vf_of(
    regions: &[EcamRegion],
    pf: &Function,
    setup: &thinhv_passthrough::shared_pf::Setup,
    index: u16,
) -> Result<Function, alloc::string::String> {
    use thinhv_passthrough::reset::FunctionConfig;
    let mut f = function(regions, pf.bdf);
    let mut bytes = [0u8; thinhv_passthrough::sriov::CAP_SIZE];
    for (i, ch) in bytes.chunks_mut(4).enumerate() {
        ch.copy_from_slice(&f.read32(setup.cap + 4 * i as u16).to_le_bytes());
    }
    let now = thinhv_passthrough::sriov::SriovCap::parse(setup.cap, &bytes)
        .map_err(|_| alloc::format!("{}: its SR-IOV capability no longer reads", pf.bdf))?;
    if !now.vfs_enabled() || now.num_vfs != setup.num_vfs {
        return Err(alloc::format!(
            "{}: VF Enable and NumVFs {} did not take (Control {:#06x}, NumVFs {})",
            pf.bdf,
            setup.num_vfs,
            now.control,
            now.num_vfs
        ));
    }
    thinhv_passthrough::shared_pf::vf_function(&f.ecam, pf, &now, index)
        .ok_or_else(|| alloc::format!("{}: VF {index} does not answer", pf.bdf))
}

/// Quiesces and resets `bdf` (a function given to an appliance) and puts
/// `bars` back (`thinhv_passthrough::reset`); `None` when nothing answers
/// there.
pub fn reset_function(
    regions: &[EcamRegion],
    bdf: Bdf,
    bars: &[thinhv_passthrough::reset::Bar],
) -> Option<thinhv_passthrough::reset::Report> {
    let mut f = EcamFunction {
        ecam: Ecam { regions },
        bdf,
    };
    thinhv_passthrough::reset::reset(&mut f, bars)
}

/// Stops every firmware driver that manages `bdf` (DisconnectController on
/// the function's handle, which also ends its child handles: a NIC's
/// SNP, an NVMe controller's namespaces): a function given to an appliance
/// must not be driven by the firmware until the OS leaves boot services,
/// nor reset under a driver that still thinks it owns it. The number of
/// handles disconnected (0: no driver had it, or no handle matched).
pub fn disconnect_firmware_drivers(functions: &[Function], root_bus: u8, bdf: Bdf) -> usize {
    use uefi::Identify;
    use uefi::proto::device_path::DevicePath;
    let Ok(handles) = boot::locate_handle_buffer(boot::SearchType::ByProtocol(&DevicePath::GUID))
    else {
        return 0;
    };
    let mut n = 0;
    for &h in handles.iter() {
        // The path's PCI nodes, if the handle is a PCI function's own
        // (its last node a PCI node: not a child such as a namespace).
        let nodes = {
            let Ok(dp) = (unsafe {
                // SAFETY: GetProtocol opens the device path without taking
                // it from its owner; it is only read, and dropped before
                // DisconnectController below.
                boot::open_protocol::<DevicePath>(
                    boot::OpenProtocolParams {
                        handle: h,
                        agent: boot::image_handle(),
                        controller: None,
                    },
                    boot::OpenProtocolAttributes::GetProtocol,
                )
            }) else {
                continue;
            };
            let mut pci = Vec::new();
            let mut last_is_pci = false;
            let mut root_uid = None;
            for node in dp.node_iter() {
                match node.as_enum() {
                    Ok(DevicePathNodeEnum::HardwarePci(p)) => {
                        pci.push((p.device(), p.function()));
                        last_is_pci = true;
                    }
                    Ok(DevicePathNodeEnum::AcpiAcpi(a)) if root_uid.is_none() => {
                        root_uid = Some(a.uid());
                        last_is_pci = false;
                    }
                    _ => last_is_pci = false,
                }
            }
            // Only under the host bridge whose root bus is `root_bus`
            // (UID 0): on a machine with several, the same chain of
            // device and function numbers under another one is another
            // function, perhaps the OS's.
            if !last_is_pci || root_uid != Some(0) {
                continue;
            }
            pci
        };
        if thinhv_passthrough::policy::boot_device(functions, bdf.segment, root_bus, &nodes)
            == Some(bdf)
            && boot::disconnect_controller(h, None, None).is_ok()
        {
            n += 1;
        }
    }
    n
}
