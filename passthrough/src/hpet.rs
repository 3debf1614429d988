//! The HPET's FSB (MSI) delivery, withheld from the OS where appliances
//! run.
//!
//! A timer whose configuration register has Tn_FSB_EN_CNF set sends its
//! interrupt as a memory write of the value and address in its FSB route
//! register: an interrupt message the OS composes at will, which thinhv
//! neither writes nor judges (IA-PC HPET specification 1.0a, §2.3.9). So
//! every store the OS makes to the register page is passed on with that
//! bit clear; the timer then interrupts through its I/O APIC route, whose
//! entries thinhv judges. Reads are the hardware's (the page is read-only
//! for the OS, not absent, so the counter reads at full speed).

/// Timer `n`'s configuration and capability register: `0x100 + 0x20 n`.
pub const TIMER_CONFIG: u64 = 0x100;
/// Bytes between two timers' register blocks.
pub const TIMER_STRIDE: u64 = 0x20;
/// Most timers a block has (bits 12:8 of the capabilities, plus one).
pub const MAX_TIMERS: u64 = 32;
/// Tn_FSB_EN_CNF: the timer signals by FSB (an MSI) instead of its I/O
/// APIC route.
pub const FSB_EN: u64 = 1 << 14;
/// Tn_INT_ENB_CNF: the timer interrupts at all.
pub const INT_ENB: u64 = 1 << 2;

/// Whether `at` (an offset in the register page) is byte `byte` of a
/// timer's configuration register, and which timer's.
fn config_byte(at: u64, byte: u64) -> Option<u64> {
    let end = TIMER_CONFIG + MAX_TIMERS * TIMER_STRIDE;
    ((TIMER_CONFIG..end).contains(&at) && (at - TIMER_CONFIG) % TIMER_STRIDE == byte)
        .then(|| (at - TIMER_CONFIG) / TIMER_STRIDE)
}

/// `value`, stored as `size` bytes at offset `off` of the register page,
/// with every timer's Tn_FSB_EN_CNF it covers clear, and where a store
/// asked for FSB delivery, that timer's Tn_INT_ENB_CNF too if the store
/// covers it (the timer then interrupts no one, rather than through an
/// I/O APIC route the OS did not set up); and which timer had FSB
/// delivery asked for, if one did.
pub fn without_fsb(off: u64, size: u8, value: u64) -> (u64, Option<u64>) {
    let mut v = value;
    let mut refused = None;
    let n = u64::from(size.min(8));
    for k in 0..n {
        // Bit 14 of the configuration is bit 6 of its second byte.
        if let Some(timer) = config_byte(off + k, 1) {
            let bit = 1u64 << (8 * k + 6);
            if v & bit != 0 {
                v &= !bit;
                refused = Some(timer);
                // Bit 2, in its first byte, when the store holds it.
                if k >= 1 {
                    v &= !(1u64 << (8 * (k - 1) + 2));
                }
            }
        }
    }
    (v, refused)
}

/// The register block's address an ACPI HPET table gives (the Generic
/// Address Structure at offset 40: system memory, address at 44), or
/// `None` for a table too short or a block elsewhere.
pub fn table_base(table: &[u8]) -> Option<u64> {
    if table.len() < 56 || &table[..4] != b"HPET" || table[40] != 0 {
        return None;
    }
    let base = u64::from_le_bytes(table[44..52].try_into().ok()?);
    (base != 0).then_some(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hpet_table_gives_the_register_block_in_memory_only() {
        let mut t = [0u8; 56];
        t[..4].copy_from_slice(b"HPET");
        t[44..52].copy_from_slice(&0xfed0_0000u64.to_le_bytes());
        assert_eq!(table_base(&t), Some(0xfed0_0000));
        // In I/O space, short, another table, no address.
        let mut io = t;
        io[40] = 1;
        assert_eq!(table_base(&io), None);
        assert_eq!(table_base(&t[..52]), None);
        let mut other = t;
        other[..4].copy_from_slice(b"APIC");
        assert_eq!(table_base(&other), None);
        let mut zero = t;
        zero[44..52].fill(0);
        assert_eq!(table_base(&zero), None);
    }

    #[test]
    fn fsb_enable_is_cleared_whatever_the_width_of_the_store() {
        // Timer 2's configuration, a dword: FSB, 32-bit mode, enabled:
        // neither FSB nor the interrupt is left on.
        assert_eq!(without_fsb(0x140, 4, 0x4104), (0x100, Some(2)));
        // A quadword over the configuration and the route capability.
        assert_eq!(
            without_fsb(0x100, 8, 0x00f0_0000_0000_4004),
            (0x00f0_0000_0000_0000, Some(0))
        );
        // The byte holding bit 14 alone (bit 2 is not in it), and a word.
        assert_eq!(without_fsb(0x161, 1, 0x41), (0x01, Some(3)));
        assert_eq!(without_fsb(0x160, 2, 0xc004), (0x8000, Some(3)));
        // The interrupt enabled without FSB: as written.
        assert_eq!(without_fsb(0x160, 4, 0x0004), (0x0004, None));
        // The last timer a block can have.
        assert_eq!(without_fsb(0x4e0, 4, FSB_EN), (0, Some(31)));
        // Without the bit: as written.
        assert_eq!(without_fsb(0x140, 4, 0x104), (0x104, None));
        // Bit 14 of other registers: the comparator, the FSB route, the
        // main counter, the general configuration, past the last timer.
        for off in [0x148, 0x150, 0x0f0, 0x010, 0x500] {
            assert_eq!(without_fsb(off, 4, FSB_EN), (FSB_EN, None), "{off:#x}");
        }
        // The high dword of a configuration register (its capabilities).
        assert_eq!(without_fsb(0x144, 4, FSB_EN), (FSB_EN, None));
    }
}
