//! The firmware's ACPI tables through the `acpi` crate, for the PCI
//! inventory (MCFG) and the IOMMU (DMAR, IVRS).
use core::ptr::NonNull;
use uefi::table::cfg::ConfigTableEntry;

/// UEFI identity-maps all memory and MMIO it describes, so "mapping" a
/// physical region is taking its address.
#[derive(Clone, Copy, Debug)]
pub struct Identity;

impl acpi::AcpiHandler for Identity {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> acpi::PhysicalMapping<Self, T> {
        // SAFETY: boot services identity-map the ACPI tables; the caller
        // (the acpi crate) asks only for regions the tables describe.
        unsafe {
            acpi::PhysicalMapping::new(
                physical_address,
                NonNull::new_unchecked(physical_address as *mut T),
                size,
                size,
                Self,
            )
        }
    }

    fn unmap_physical_region<T>(_region: &acpi::PhysicalMapping<Self, T>) {}
}

/// Physical address of the ACPI 2.0 RSDP the firmware published.
pub fn rsdp_address() -> Option<u64> {
    uefi::system::with_config_table(|t| {
        t.iter()
            .find(|e| e.guid == ConfigTableEntry::ACPI2_GUID)
            .map(|e| e.address as u64)
    })
}

/// The firmware's tables, or why they cannot be read.
pub fn tables() -> Result<acpi::AcpiTables<Identity>, &'static str> {
    let rsdp = rsdp_address().ok_or("no ACPI 2.0 tables from the firmware")?;
    // SAFETY: the firmware's configuration table points at a valid RSDP.
    unsafe { acpi::AcpiTables::from_rsdp(Identity, rsdp as usize) }
        .map_err(|_| "the ACPI tables are unreadable")
}
