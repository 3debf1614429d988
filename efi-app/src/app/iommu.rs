//! The platform IOMMU from the loader's side: find DMAR/IVRS (through the
//! `acpi` crate), describe the units for the core, and — once the core has
//! switched translation on at seal — take the table out of what the OS sees
//! (XSDT and RSDT rewritten, checksums valid), so that the OS does not
//! reprogram the IOMMU thinhv owns.
use super::acpi_tables::{Identity, rsdp_address, tables};
use alloc::vec::Vec;
use thinhv_abi::handoff::{IOMMU_KIND_VTD, IOMMU_MODE_PROTECT, IommuHandoff};
use thinhv_config::Config;
use uefi::boot::{self, AllocateType, MemoryType};
use uefi::println;

macro_rules! raw_table {
    ($name:ident, $sig:expr) => {
        #[repr(C, packed)]
        struct $name {
            header: acpi::sdt::SdtHeader,
        }
        // SAFETY: the type is only the standard header, which every table
        // starts with; its length field gives the rest.
        unsafe impl acpi::AcpiTable for $name {
            const SIGNATURE: acpi::sdt::Signature = $sig;
            fn header(&self) -> &acpi::sdt::SdtHeader {
                &self.header
            }
        }
    };
}
raw_table!(RawDmar, acpi::sdt::Signature::DMAR);
raw_table!(RawIvrs, acpi::sdt::Signature::IVRS);

/// The bytes of a table, copied.
fn table<T: acpi::AcpiTable>(tables: &acpi::AcpiTables<Identity>) -> Option<Vec<u8>> {
    let m = tables.find_table::<T>().ok()?;
    let len = m.get().header().length as usize;
    let pa = m.physical_start();
    // SAFETY: the table was found through the firmware's root table and
    // validated by the acpi crate; it is `length` bytes of identity-mapped
    // ACPI memory.
    Some(unsafe { core::slice::from_raw_parts(pa as *const u8, len) }.to_vec())
}

/// Finds and describes the IOMMU for the core.
pub fn prepare(config: &Config, max_bus: u8, max_apic_id: u32) -> IommuHandoff {
    let off = IommuHandoff::default();
    let Ok(tables) = tables() else {
        return off;
    };
    let dmar = table::<RawDmar>(&tables);
    let ivrs = table::<RawIvrs>(&tables);
    let (protect, why) = thinhv_efi::iommu_plan::take(
        config.iommu.mode,
        max_apic_id,
        dmar.is_some() || ivrs.is_some(),
    );
    if let Some(why) = why {
        println!("thinhv: IOMMU: {why}");
    }
    let Some((plan, notes)) =
        thinhv_efi::iommu_plan::from_tables(dmar.as_deref(), ivrs.as_deref(), max_bus)
    else {
        if protect {
            println!(
                "thinhv: IOMMU: none in ACPI (enable VT-d or AMD-Vi in firmware setup); DMA into thinhv is NOT blocked"
            );
        }
        return off;
    };
    if !protect {
        println!("thinhv: IOMMU: left to the OS; DMA into thinhv is NOT blocked");
        // Still listed in the status page (state "off"), for the admin.
        return plan.map_or(off, |mut h| {
            h.mode = thinhv_abi::handoff::IOMMU_MODE_OFF;
            h
        });
    }
    for n in notes {
        println!("thinhv: IOMMU: {n}");
    }
    match plan {
        Ok(mut h) => {
            println!(
                "thinhv: IOMMU: {}; thinhv takes it ([iommu] mode = \"{}\")",
                thinhv_efi::iommu_plan::describe(&h),
                config.iommu.mode.name()
            );
            h.os = match config.iommu.os {
                thinhv_config::IommuOs::Emulated if h.kind == IOMMU_KIND_VTD => {
                    println!(
                        "thinhv: IOMMU: the OS gets an emulated VT-d unit of its own ([iommu] os = \"emulated\"; DMA translation, and interrupt remapping where no appliance runs)"
                    );
                    thinhv_abi::handoff::IOMMU_OS_EMULATED
                }
                thinhv_config::IommuOs::Emulated => {
                    println!(
                        "thinhv: IOMMU: the OS gets an emulated AMD-Vi unit of its own ([iommu] os = \"emulated\"; DMA translation; no interrupt remapping on AMD-Vi yet)"
                    );
                    thinhv_abi::handoff::IOMMU_OS_EMULATED
                }
                thinhv_config::IommuOs::None => thinhv_abi::handoff::IOMMU_OS_NONE,
            };
            h.interrupts = match config.iommu.interrupts {
                thinhv_config::IommuInterrupts::Remap => {
                    thinhv_abi::handoff::IOMMU_INTERRUPTS_REMAP
                }
                thinhv_config::IommuInterrupts::Off => {
                    println!(
                        "thinhv: IOMMU: interrupt messages not remapped ([iommu] interrupts = \"off\"): with appliances, each partition's devices can interrupt the other's processors"
                    );
                    thinhv_abi::handoff::IOMMU_INTERRUPTS_OFF
                }
            };
            h
        }
        Err(e) => {
            println!("thinhv: IOMMU: {e}; left to the OS, DMA into thinhv is NOT blocked");
            off
        }
    }
}

/// Whether the platform's DMAR announces interrupt remapping (flags bit
/// 0, INTR_REMAP).
pub fn dmar_remaps() -> bool {
    tables()
        .ok()
        .and_then(|t| table::<RawDmar>(&t))
        .is_some_and(|d| d.get(37).is_some_and(|f| f & 1 != 0))
}

/// The I/O APICs' source IDs and the MSI-capable HPETs the DMAR (device
/// scopes) or else the IVRS (special device entries) names (`None`
/// without either, or one that does not parse).
pub fn interrupt_sources() -> Option<thinhv_efi::iommu_plan::IrqSources> {
    let tables = tables().ok()?;
    if let Some(dmar) = table::<RawDmar>(&tables) {
        let d = thinhv_passthrough::dmar::parse(&dmar).ok()?;
        return Some(thinhv_efi::iommu_plan::irq_sources(&d));
    }
    let ivrs = table::<RawIvrs>(&tables)?;
    let r = thinhv_passthrough::ivrs::parse(&ivrs).ok()?;
    Some(thinhv_efi::iommu_plan::irq_sources_ivrs(&r))
}

/// The IVRS's alias entries (`iommu_plan::ivrs_aliases`; none without
/// an IVRS, or one that does not parse).
pub fn ivrs_aliases() -> alloc::vec::Vec<(u16, u16, u16)> {
    let Some(r) = tables()
        .ok()
        .and_then(|t| table::<RawIvrs>(&t))
        .and_then(|ivrs| thinhv_passthrough::ivrs::parse(&ivrs).ok())
    else {
        return alloc::vec::Vec::new();
    };
    thinhv_efi::iommu_plan::ivrs_aliases(&r)
}

/// After seal: report, and hide the table if every unit translates (or,
/// where the OS has emulated units, replace it by the OS's DMAR).
pub fn after_seal(
    h: &IommuHandoff,
    phys_addr_bits: u32,
    on: u64,
    total: u64,
    os_units: u64,
    owned: impl Fn(u16) -> bool,
) {
    if h.mode != IOMMU_MODE_PROTECT || total == 0 {
        return;
    }
    let (what, table) = if h.kind == IOMMU_KIND_VTD {
        ("VT-d units", *b"DMAR")
    } else {
        ("AMD-Vi IOMMUs", *b"IVRS")
    };
    let name = core::str::from_utf8(&table).unwrap_or("?");
    if on != total {
        println!(
            "thinhv: IOMMU: only {on} of {total} {what} translating (see the log); the {name} stays visible and DMA into thinhv is NOT fully blocked"
        );
        return;
    }
    if h.os == thinhv_abi::handoff::IOMMU_OS_EMULATED && os_units == 0 {
        println!(
            "thinhv: IOMMU: the core could not give the OS a unit of its own (see thinhv's log); the OS gets no IOMMU"
        );
    }
    if h.os == thinhv_abi::handoff::IOMMU_OS_EMULATED && os_units > 0 {
        let written = if h.kind == IOMMU_KIND_VTD {
            os_dmar(
                owned,
                h.flags & thinhv_abi::handoff::IOMMU_FLAG_OS_REMAP != 0,
            )
        } else {
            os_ivrs(owned, phys_addr_bits)
        };
        match written {
            Ok(()) => println!(
                "thinhv: IOMMU: {on} of {total} {what} translating; DMA into thinhv is blocked; the OS sees an emulated unit at each one's registers"
            ),
            Err(e) => {
                println!("thinhv: IOMMU: the OS's {name} could not be written ({e}); it is hidden");
                let _ = hide(&[table]);
            }
        }
        return;
    }
    match hide(&[table]) {
        Ok(()) => println!(
            "thinhv: IOMMU: {on} of {total} {what} translating; DMA into thinhv is blocked; {name} hidden from the OS"
        ),
        Err(e) => println!(
            "thinhv: IOMMU: translating, but the {name} could not be hidden ({e}); the OS may take the IOMMU over"
        ),
    }
}

/// Replaces the firmware's DMAR by the OS's: one unit per real one, only
/// the scopes of requesters `owned` (a single-hop endpoint's ID; deeper
/// paths and bridges are kept), interrupt remapping announced where
/// `remap`.
fn os_dmar(owned: impl Fn(u16) -> bool, remap: bool) -> Result<(), &'static str> {
    let (pa, bytes) = super::appliances::firmware_table(*b"DMAR")?;
    let real = thinhv_passthrough::dmar::parse(bytes).map_err(|_| "the DMAR is malformed")?;
    let keep = |_: u16, s: &thinhv_passthrough::dmar::DeviceScope| match (s.kind, s.path.as_slice())
    {
        (thinhv_passthrough::dmar::SCOPE_ENDPOINT, [(dev, func)]) => {
            owned(u16::from(s.start_bus) << 8 | u16::from(*dev) << 3 | u16::from(*func))
        }
        _ => true,
    };
    let table = thinhv_passthrough::os_tables::os_dmar(&real, remap, keep)
        .ok_or("a structure does not fit")?;
    super::appliances::replace_firmware_table(pa, &table)
}

/// Replaces the firmware's IVRS by the OS's: one unit per real one with
/// the extended features its emulated unit offers, only the device IDs
/// `owned`, no I/O APIC or HPET entries (its unit does not remap
/// interrupts, and Linux leaves remapping off without them).
fn os_ivrs(owned: impl Fn(u16) -> bool, phys_addr_bits: u32) -> Result<(), &'static str> {
    let (pa, bytes) = super::appliances::firmware_table(*b"IVRS")?;
    let real = thinhv_passthrough::ivrs::parse(bytes).map_err(|_| "the IVRS is malformed")?;
    let offer = thinhv_passthrough::vamdvi::Offer {
        host_width: u8::try_from(phys_addr_bits).unwrap_or(52),
        x2apic: false,
    };
    let table = thinhv_passthrough::os_tables::os_ivrs(&real, offer.efr(), false, owned)
        .ok_or("a block does not fit")?;
    super::appliances::replace_firmware_table(pa, &table)
}

/// The AMD-Vi units' own functions: (device ID, IOMMU capability offset)
/// as the IVRS names them (none without an IVRS that parses).
pub fn amdvi_functions() -> alloc::vec::Vec<(u16, u16)> {
    tables()
        .ok()
        .and_then(|t| table::<RawIvrs>(&t))
        .and_then(|ivrs| thinhv_passthrough::ivrs::parse(&ivrs).ok())
        .map(|r| {
            r.units()
                .iter()
                .filter(|h| h.segment == 0)
                .map(|h| (h.device_id, h.capability_offset))
                .collect()
        })
        .unwrap_or_default()
}

/// Rewrites the XSDT and RSDT without the tables whose signature is in
/// `drop`, in new ACPI-reclaim memory, and points the RSDP at them.
fn hide(drop: &[[u8; 4]]) -> Result<(), &'static str> {
    let rsdp_pa = rsdp_address().ok_or("no RSDP")?;
    // SAFETY: the ACPI 2.0 RSDP is 36 bytes of identity-mapped memory the
    // firmware published; boot services are still running.
    let rsdp = unsafe { core::slice::from_raw_parts_mut(rsdp_pa as *mut u8, 36) };
    let xsdt_pa = u64::from_le_bytes(rsdp[24..32].try_into().map_err(|_| "RSDP")?);
    let rsdt_pa = u64::from(u32::from_le_bytes(
        rsdp[16..20].try_into().map_err(|_| "RSDP")?,
    ));
    let is_dropped = |pa: u64| {
        if pa == 0 {
            return false;
        }
        // SAFETY: entries of the firmware's root tables point at tables in
        // identity-mapped ACPI memory; 4 bytes is their signature.
        let sig: [u8; 4] = unsafe { core::ptr::read_unaligned(pa as *const [u8; 4]) };
        drop.contains(&sig)
    };
    let rewrite = |pa: u64, entry: usize| -> Result<Option<u64>, &'static str> {
        if pa == 0 {
            return Ok(None);
        }
        // SAFETY: as above; the header's length field is read first.
        let len = unsafe { core::ptr::read_unaligned((pa + 4) as *const u32) } as usize;
        if !(36..=1 << 20).contains(&len) {
            return Err("root table length");
        }
        // SAFETY: `len` bytes of the firmware's root table.
        let old = unsafe { core::slice::from_raw_parts(pa as *const u8, len) };
        let new = thinhv_passthrough::acpi::root_without(old, entry, is_dropped)
            .ok_or("root table malformed")?;
        let pages = new.len().div_ceil(4096);
        let mem = boot::allocate_pages(AllocateType::AnyPages, MemoryType::ACPI_RECLAIM, pages)
            .map_err(|_| "no memory for the new root table")?;
        // SAFETY: freshly allocated, `pages` pages.
        unsafe { core::ptr::copy_nonoverlapping(new.as_ptr(), mem.as_ptr(), new.len()) };
        Ok(Some(mem.as_ptr() as u64))
    };
    let xsdt = rewrite(xsdt_pa, 8)?;
    // An RSDT above 4 GiB cannot be referenced by the 32-bit field.
    let rsdt = rewrite(rsdt_pa, 4)?.and_then(|a| u32::try_from(a).ok());
    if !thinhv_passthrough::acpi::patch_rsdp(rsdp, rsdt, xsdt) {
        return Err("RSDP malformed");
    }
    Ok(())
}
