//! A BAR the OS must not move, told to it the way the PCI Express Base
//! Specification has for platforms that fix a function's resources: an
//! Enhanced Allocation capability (PCIe Base 6.0 §7.8.5; capability ID
//! 14h), whose entries Linux takes as fixed (`IORESOURCE_PCI_FIXED`: never
//! reassigned, also not when the OS removes the function and scans its bus
//! again).
//!
//! thinhv shows the OS a VF in the place of an NVMe PF it keeps; the VF's
//! BAR is its slot of the PF's VF BAR, which cannot move on its own. So the
//! view adds one EA entry for that BAR, in 16 bytes of the VF's
//! configuration space no capability uses ([`free_slot`]), at the head of
//! the capability list ([`ea_dword`]).

/// Capability ID of Enhanced Allocation.
pub const CAP_ID_EA: u8 = 0x14;
/// Bytes the capability takes: its header and one entry with a 32-bit
/// base and maximum offset.
pub const EA_BYTES: u16 = 16;

/// Bytes a capability of `id` at `at` takes, where its kind is known
/// (`read` reads a configuration byte).
fn cap_len(id: u8, at: u16, read: &impl Fn(u16) -> u8) -> Option<u16> {
    Some(match id {
        // Power management, VPD.
        0x01 | 0x03 => 8,
        // MSI: 64-bit address (bit 7), per-vector masking (bit 8).
        0x05 => {
            let flags = u16::from(read(at + 2)) | u16::from(read(at + 3)) << 8;
            10 + if flags & 0x80 != 0 { 4 } else { 0 } + if flags & 0x100 != 0 { 10 } else { 0 }
        }
        // Vendor-specific: its own length byte.
        0x09 => u16::from(read(at + 2)).max(3),
        // PCI Express (version 2).
        0x10 => 0x3c,
        // MSI-X.
        0x11 => 12,
        _ => return None,
    })
}

/// The first 16 bytes (4-aligned, from 0x40) of a type-0 configuration
/// space that no capability covers and that read 0, or `None` when a
/// capability of a kind whose length is unknown (or a malformed list)
/// makes that uncertain.
pub fn free_slot(read: impl Fn(u16) -> u8) -> Option<u16> {
    let mut used = [false; 256];
    used[..0x40].fill(true);
    let mut at = u16::from(read(0x34) & 0xfc);
    for _ in 0..48 {
        if at == 0 {
            break;
        }
        if at < 0x40 {
            return None;
        }
        let len = cap_len(read(at), at, &read)?;
        let end = (at + len).min(256);
        used[usize::from(at)..usize::from(end)].fill(true);
        at = u16::from(read(at + 1) & 0xfc);
    }
    if at != 0 {
        return None;
    }
    (0x40..=256 - EA_BYTES)
        .step_by(4)
        .find(|&s| (s..s + EA_BYTES).all(|b| !used[usize::from(b)] && read(b) == 0))
}

/// The dword at `at` (4-aligned, within `[ea, ea + 16)`) of an EA
/// capability at `ea` whose next capability is at `next`, with one
/// enabled entry fixing BAR 0 (non-prefetchable memory) at `base`, `size`
/// bytes (both below 4 GiB).
#[allow(clippy::cast_possible_truncation)] // below 4 GiB, checked by the caller
pub const fn ea_dword(ea: u16, next: u8, base: u64, size: u64, at: u16) -> u32 {
    match at.wrapping_sub(ea) {
        // ID, next, one entry.
        0 => CAP_ID_EA as u32 | (next as u32) << 8 | 1 << 16,
        // Entry: 2 dwords after this one, BEI 0, primary properties 00h
        // (memory, non-prefetchable), secondary properties FFh (unused),
        // enabled.
        4 => 2 | 0xff << 16 | 1 << 31,
        // Base (32-bit).
        8 => base as u32 & !3,
        // Maximum offset (size - 1; its low 2 bits are taken as ones).
        12 => (size - 1) as u32 & !3,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's NVMe VF: power management at 0x60 (next 0x80), PCI Express
    /// at 0x80 (next 0x40), MSI-X at 0x40 (last).
    fn nvme_vf() -> [u8; 256] {
        let mut c = [0u8; 256];
        c[0x34] = 0x60;
        c[0x60] = 0x01;
        c[0x61] = 0x80;
        c[0x80] = 0x10;
        c[0x81] = 0x40;
        c[0x40] = 0x11;
        c[0x42] = 0x02;
        c
    }

    #[test]
    #[allow(clippy::many_single_char_names)] // one configuration space each
    fn the_first_free_16_bytes_after_every_capability_of_a_known_kind() {
        let c = nvme_vf();
        // MSI-X 0x40..0x4c: 0x4c..0x5c is free; PM is 0x60..0x68.
        assert_eq!(free_slot(|o| c[usize::from(o)]), Some(0x4c));
        // A non-zero byte inside is not free.
        let mut d = c;
        d[0x50] = 1;
        assert_eq!(free_slot(|o| d[usize::from(o)]), Some(0x68));
        // A capability of a kind whose length is unknown: no guess.
        let mut e = c;
        e[0x40] = 0x13;
        assert_eq!(free_slot(|o| e[usize::from(o)]), None);
        // A list that loops.
        let mut f = c;
        f[0x41] = 0x60;
        assert_eq!(free_slot(|o| f[usize::from(o)]), None);
        // MSI with 64-bit addresses and masking: 24 bytes.
        let mut g = [0u8; 256];
        g[0x34] = 0x40;
        g[0x40] = 0x05;
        g[0x42] = 0x80;
        g[0x43] = 0x01;
        assert_eq!(free_slot(|o| g[usize::from(o)]), Some(0x58));
    }

    #[test]
    fn the_entry_fixes_bar_0_at_its_base_and_size() {
        let d = |at| ea_dword(0x4c, 0x60, 0xc100_4000, 0x4000, at);
        assert_eq!(d(0x4c), 0x0001_6014);
        assert_eq!(d(0x50), 0x80ff_0002);
        assert_eq!(d(0x54), 0xc100_4000);
        assert_eq!(d(0x58), 0x3ffc);
        assert_eq!(d(0x5c), 0);
    }
}
