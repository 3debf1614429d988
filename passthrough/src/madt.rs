//! The OS's MADT without an appliance's processors (ACPI 6.5 §5.2.12).
//!
//! Entries are removed, never marked disabled: Linux counts a disabled
//! Processor Local APIC entry as a hot-pluggable CPU unless the FADT is
//! revision 6.3 or later and the entry lacks "Online Capable"
//! (`acpi_is_processor_usable` in `arch/x86/kernel/acpi/boot.c`), and an OS
//! that may hot-plug a CPU would try to start it. Removed with each
//! processor: the Local APIC NMI entries that name it by its ACPI processor
//! UID (those for all processors, UID 0xFF / 0xFFFFFFFF, stay).
use crate::acpi::{SDT_HEADER_LEN, TableError, checked, set_checksum, u32_at};
use alloc::vec::Vec;

/// Entry types (ACPI 6.5 Table 5.21).
const LOCAL_APIC: u8 = 0;
const IO_APIC: u8 = 1;
const LOCAL_APIC_NMI: u8 = 4;
const LOCAL_X2APIC: u8 = 9;
const LOCAL_X2APIC_NMI: u8 = 0xa;
/// The MADT's fixed part after the header: Local Interrupt Controller
/// Address (4) and Flags (4).
const FIXED: usize = SDT_HEADER_LEN + 8;

/// What [`without_processors`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carved {
    /// The new table, length and checksum fixed.
    pub table: Vec<u8>,
    /// Processor entries removed (Local APIC and Local x2APIC).
    pub processors: usize,
    /// NMI entries removed with them.
    pub nmi_entries: usize,
}

/// A copy of `madt` without the processor entries whose APIC ID is in
/// `apic_ids`. Fails on a malformed table (bad header or checksum, an entry
/// that runs past the end or has a length below 2).
pub fn without_processors(madt: &[u8], apic_ids: &[u32]) -> Result<Carved, TableError> {
    let (_, t) = checked(madt, b"APIC")?;
    if t.len() < FIXED {
        return Err(TableError::TooShort);
    }
    // First pass: the UIDs of the removed processors.
    let mut uids: Vec<u32> = Vec::new();
    let mut x2uids: Vec<u32> = Vec::new();
    for e in entries(&t[FIXED..])? {
        match e[0] {
            LOCAL_APIC if e.len() >= 8 && apic_ids.contains(&u32::from(e[3])) => {
                uids.push(u32::from(e[2]));
            }
            LOCAL_X2APIC if e.len() >= 16 => {
                let id = u32_at(e, 4).ok_or(TableError::TooShort)?;
                if apic_ids.contains(&id) {
                    x2uids.push(u32_at(e, 12).ok_or(TableError::TooShort)?);
                }
            }
            _ => {}
        }
    }
    let mut out = t[..FIXED].to_vec();
    let (mut processors, mut nmi_entries) = (0, 0);
    for e in entries(&t[FIXED..])? {
        let drop = match e[0] {
            LOCAL_APIC if e.len() >= 8 => apic_ids.contains(&u32::from(e[3])),
            LOCAL_X2APIC if e.len() >= 16 => u32_at(e, 4).is_some_and(|id| apic_ids.contains(&id)),
            LOCAL_APIC_NMI if e.len() >= 6 => uids.contains(&u32::from(e[2])),
            LOCAL_X2APIC_NMI if e.len() >= 12 => {
                u32_at(e, 4).is_some_and(|uid| x2uids.contains(&uid))
            }
            _ => false,
        };
        if drop {
            if matches!(e[0], LOCAL_APIC | LOCAL_X2APIC) {
                processors += 1;
            } else {
                nmi_entries += 1;
            }
        } else {
            out.extend_from_slice(e);
        }
    }
    let len = u32::try_from(out.len()).map_err(|_| TableError::TooShort)?;
    out[4..8].copy_from_slice(&len.to_le_bytes());
    set_checksum(&mut out);
    Ok(Carved {
        table: out,
        processors,
        nmi_entries,
    })
}

/// The APIC IDs of the processor entries (Local APIC and Local x2APIC)
/// whose Enabled or Online Capable flag is set.
pub fn processor_ids(madt: &[u8]) -> Result<Vec<u32>, TableError> {
    let (_, t) = checked(madt, b"APIC")?;
    if t.len() < FIXED {
        return Err(TableError::TooShort);
    }
    let mut ids = Vec::new();
    for e in entries(&t[FIXED..])? {
        match e[0] {
            LOCAL_APIC if e.len() >= 8 && u32_at(e, 4).is_some_and(|f| f & 3 != 0) => {
                ids.push(u32::from(e[3]));
            }
            LOCAL_X2APIC if e.len() >= 16 && u32_at(e, 8).is_some_and(|f| f & 3 != 0) => {
                ids.push(u32_at(e, 4).ok_or(TableError::TooShort)?);
            }
            _ => {}
        }
    }
    Ok(ids)
}

/// An I/O APIC structure of the MADT (ACPI 6.5 §5.2.12.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApic {
    /// Its I/O APIC ID.
    pub id: u8,
    /// The physical address of its registers (IOREGSEL; IOWIN at +0x10).
    pub address: u32,
    /// The first global system interrupt of its inputs.
    pub gsi_base: u32,
}

/// The I/O APICs the MADT lists, in table order.
pub fn io_apics(madt: &[u8]) -> Result<Vec<IoApic>, TableError> {
    let (_, t) = checked(madt, b"APIC")?;
    if t.len() < FIXED {
        return Err(TableError::TooShort);
    }
    let mut out = Vec::new();
    for e in entries(&t[FIXED..])? {
        if e[0] == IO_APIC && e.len() >= 12 {
            out.push(IoApic {
                id: e[2],
                address: u32_at(e, 4).ok_or(TableError::TooShort)?,
                gsi_base: u32_at(e, 8).ok_or(TableError::TooShort)?,
            });
        }
    }
    Ok(out)
}

/// The entries of an interrupt-controller structure list.
fn entries(body: &[u8]) -> Result<Vec<&[u8]>, TableError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < body.len() {
        let kind = u16::from(body[off]);
        let length = body.get(off + 1).map_or(0, |&l| usize::from(l));
        if length < 2 || off + length > body.len() {
            return Err(TableError::BadStructure {
                offset: FIXED + off,
                kind,
                length,
            });
        }
        out.push(&body[off..off + length]);
        off += length;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::checksum;

    /// A MADT shaped like QEMU q35's with `n` processors: Local APIC
    /// entries (UID = APIC ID = i), one I/O APIC, two interrupt source
    /// overrides, a Local APIC NMI for all processors; plus, for the test,
    /// a Local APIC NMI for UID 3 and a Local x2APIC entry (ID 300, UID 9)
    /// with its own x2APIC NMI.
    fn qemu_like(n: u8) -> Vec<u8> {
        let mut t = vec![0u8; FIXED];
        t[..4].copy_from_slice(b"APIC");
        t[8] = 3;
        t[SDT_HEADER_LEN..SDT_HEADER_LEN + 4].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
        t[SDT_HEADER_LEN + 4] = 1; // PCAT_COMPAT
        for i in 0..n {
            t.extend_from_slice(&[LOCAL_APIC, 8, i, i, 1, 0, 0, 0]);
        }
        t.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
        t.extend_from_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
        t.extend_from_slice(&[2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0]);
        t.extend_from_slice(&[LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
        t.extend_from_slice(&[LOCAL_APIC_NMI, 6, 3, 0, 0, 1]);
        let mut x2 = vec![LOCAL_X2APIC, 16, 0, 0];
        x2.extend_from_slice(&300u32.to_le_bytes());
        x2.extend_from_slice(&1u32.to_le_bytes());
        x2.extend_from_slice(&9u32.to_le_bytes());
        t.extend_from_slice(&x2);
        let mut x2nmi = vec![LOCAL_X2APIC_NMI, 12, 0, 0];
        x2nmi.extend_from_slice(&9u32.to_le_bytes());
        x2nmi.extend_from_slice(&[1, 0, 0, 0]);
        t.extend_from_slice(&x2nmi);
        let len = u32::try_from(t.len()).unwrap();
        t[4..8].copy_from_slice(&len.to_le_bytes());
        set_checksum(&mut t);
        t
    }

    #[test]
    fn lists_the_io_apics() {
        let mut madt = qemu_like(2);
        assert_eq!(
            io_apics(&madt).unwrap(),
            [IoApic {
                id: 0,
                address: 0xfec0_0000,
                gsi_base: 0
            }]
        );
        madt[9] ^= 1;
        assert!(io_apics(&madt).is_err(), "a bad checksum is refused");
    }

    #[test]
    fn removes_the_processors_and_their_nmi_entries_only() {
        let madt = qemu_like(4);
        assert_eq!(processor_ids(&madt).unwrap(), [0, 1, 2, 3, 300]);
        let c = without_processors(&madt, &[2, 3, 300]).unwrap();
        assert_eq!((c.processors, c.nmi_entries), (3, 2));
        assert_eq!(checksum(&c.table), 0);
        assert_eq!(
            u32::from_le_bytes(c.table[4..8].try_into().unwrap()) as usize,
            c.table.len()
        );
        assert_eq!(processor_ids(&c.table).unwrap(), [0, 1]);
        assert_eq!(c.table.len(), madt.len() - 2 * 8 - 6 - 16 - 12);
        // The I/O APIC, the overrides and the all-processor NMI stay.
        let kinds: Vec<u8> = entries(&c.table[FIXED..])
            .unwrap()
            .iter()
            .map(|e| e[0])
            .collect();
        assert_eq!(kinds, [0, 0, 1, 2, 2, 4]);
        assert_eq!(entries(&c.table[FIXED..]).unwrap()[5][2], 0xff);
        // The fixed part is unchanged but for length and checksum.
        assert_eq!(c.table[10..FIXED], madt[10..FIXED]);
        assert_eq!(c.table[..4], madt[..4]);
    }

    #[test]
    fn nothing_to_remove_is_an_identical_table() {
        let madt = qemu_like(2);
        let c = without_processors(&madt, &[7]).unwrap();
        assert_eq!(c.table, madt);
        assert_eq!((c.processors, c.nmi_entries), (0, 0));
    }

    #[test]
    fn malformed_tables_are_refused() {
        let mut madt = qemu_like(2);
        madt[9] = madt[9].wrapping_add(1);
        assert_eq!(
            without_processors(&madt, &[1]),
            Err(TableError::BadChecksum)
        );
        // An entry whose length runs past the end.
        let mut madt = qemu_like(2);
        madt[FIXED + 1] = 200;
        set_checksum(&mut madt);
        assert!(matches!(
            without_processors(&madt, &[1]),
            Err(TableError::BadStructure { length: 200, .. })
        ));
        // A zero-length entry would loop forever.
        let mut madt = qemu_like(2);
        madt[FIXED + 1] = 0;
        set_checksum(&mut madt);
        assert!(matches!(
            without_processors(&madt, &[1]),
            Err(TableError::BadStructure { length: 0, .. })
        ));
        assert!(without_processors(b"APIC", &[1]).is_err());
    }
}
