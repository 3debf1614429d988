//! Local APIC interrupt command register (Intel SDM Vol. 3A §11.6.1 "Interrupt
//! Command Register (ICR)", §11.12.9 for x2APIC; AMD APM Vol. 2 §16.5).
//!
//! thinhv looks at every write to the ICR only to find INIT and STARTUP
//! IPIs aimed at virtualized CPUs; everything else is passed to the APIC
//! unchanged.

/// xAPIC register offsets used by thinhv.
pub mod reg {
    /// Local APIC ID.
    pub const ID: u32 = 0x20;
    /// End of interrupt.
    pub const EOI: u32 = 0xb0;
    /// ICR, low half: writing it sends the IPI.
    pub const ICR_LOW: u32 = 0x300;
    /// ICR, high half: destination.
    pub const ICR_HIGH: u32 = 0x310;
    /// Logical destination register.
    pub const LDR: u32 = 0xd0;
    /// Destination format register.
    pub const DFR: u32 = 0xe0;
    /// LVT LINT0 (the platform's 8259 INTR in virtual-wire mode).
    pub const LVT_LINT0: u32 = 0x350;
    /// LVT LINT1 (the platform's NMI).
    pub const LVT_LINT1: u32 = 0x360;
}

/// LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;

/// The bits of an LVT LINT register a write may carry: vector, delivery
/// mode, delivery status and remote IRR (read-only, ignored), polarity,
/// trigger mode, mask (SDM Vol. 3A Figure 11-8). In x2APIC mode a write
/// with any other bit set raises #GP (§12.12.1.2).
pub const LVT_LINT_WRITABLE: u64 = 0x1_f7ff;

/// What reaches LVT LINT0/LINT1 when partition `appliance` (or the OS)
/// writes `value`: an appliance's stay masked. Those pins carry the
/// platform's legacy interrupt (the 8259's INTR, which the OS programs) and
/// its NMI (the OS's to raise, through the chipset), and thinhv wires no
/// platform line to an appliance.
pub const fn lint_value(value: u32, appliance: bool) -> u32 {
    if appliance { value | LVT_MASKED } else { value }
}

/// MSR of the x2APIC ICR (64 bits, one write).
pub const X2APIC_ICR_MSR: u32 = 0x830;
/// IA32_APIC_BASE.
pub const IA32_APIC_BASE: u32 = 0x1b;
/// IA32_APIC_BASE: x2APIC mode enabled.
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE: APIC globally enabled.
pub const APIC_BASE_EN: u64 = 1 << 11;
/// IA32_APIC_BASE: address bits.
pub const APIC_BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The IA32_APIC_BASE values to write, in order, to take a local APIC
/// whose register reads `base` to x2APIC mode: none when it is there
/// already; through xAPIC when it is disabled, since disabled → x2APIC is
/// an invalid transition (SDM Vol. 3A §12.12.5, Figure 12-27).
pub fn to_x2apic(base: u64) -> [Option<u64>; 2] {
    if base & APIC_BASE_EXTD != 0 && base & APIC_BASE_EN != 0 {
        return [None, None];
    }
    let xapic = (base & !APIC_BASE_EXTD) | APIC_BASE_EN;
    let first = (base & APIC_BASE_EN == 0).then_some(xapic);
    [first, Some(xapic | APIC_BASE_EXTD)]
}

/// Delivery mode (ICR bits 8–10). A newtype: every 3-bit value is legal to
/// write, reserved ones included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryMode(pub u8);

impl DeliveryMode {
    /// Fixed.
    pub const FIXED: Self = Self(0);
    /// Lowest priority.
    pub const LOWEST: Self = Self(1);
    /// SMI.
    pub const SMI: Self = Self(2);
    /// NMI.
    pub const NMI: Self = Self(4);
    /// INIT.
    pub const INIT: Self = Self(5);
    /// STARTUP (SIPI).
    pub const STARTUP: Self = Self(6);
}

/// Who an IPI goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Shorthand "self".
    SelfOnly,
    /// Shorthand "all including self", or the physical broadcast ID.
    AllIncludingSelf,
    /// Shorthand "all excluding self".
    AllExcludingSelf,
    /// One APIC ID, physical mode.
    Physical(u32),
    /// Logical mode (flat or cluster); thinhv does not resolve these.
    Logical(u32),
}

/// A decoded ICR write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Icr {
    /// Vector (STARTUP: the page number of the start address).
    pub vector: u8,
    /// Delivery mode.
    pub mode: DeliveryMode,
    /// Level: assert (true) or de-assert.
    pub assert: bool,
    /// Trigger mode: level (true) or edge.
    pub level_triggered: bool,
    /// Destination.
    pub dest: Destination,
}

impl Icr {
    /// Decodes an ICR value; `x2apic` selects the 32-bit destination in
    /// bits 32–63 (x2APIC) over the 8-bit one in bits 56–63 (xAPIC).
    pub fn decode(value: u64, x2apic: bool) -> Self {
        let low = value & 0xffff_ffff;
        let dest_field = if x2apic {
            (value >> 32) as u32
        } else {
            ((value >> 56) & 0xff) as u32
        };
        let broadcast = if x2apic { u32::MAX } else { 0xff };
        let logical = low & (1 << 11) != 0;
        let dest = match (low >> 18) & 3 {
            1 => Destination::SelfOnly,
            2 => Destination::AllIncludingSelf,
            3 => Destination::AllExcludingSelf,
            _ if logical => Destination::Logical(dest_field),
            _ if dest_field == broadcast => Destination::AllIncludingSelf,
            _ => Destination::Physical(dest_field),
        };
        Self {
            vector: (low & 0xff) as u8,
            mode: DeliveryMode(((low >> 8) & 7) as u8),
            assert: low & (1 << 14) != 0,
            level_triggered: low & (1 << 15) != 0,
            dest,
        }
    }

    /// An INIT de-assert ("INIT level de-assert"): a no-op on all modern
    /// processors (SDM §11.6.1), and for virtual CPUs.
    pub fn is_init_deassert(&self) -> bool {
        self.mode == DeliveryMode::INIT && self.level_triggered && !self.assert
    }

    /// Whether this IPI is one thinhv virtualizes (INIT or STARTUP).
    pub fn is_init_or_sipi(&self) -> bool {
        matches!(self.mode, DeliveryMode::INIT | DeliveryMode::STARTUP)
    }
}

/// An ICR value that sends an NMI to one APIC ID (physical mode).
pub fn nmi_icr(apic_id: u32, x2apic: bool) -> u64 {
    let low = u64::from(DeliveryMode::NMI.0) << 8 | 1 << 14;
    if x2apic {
        (u64::from(apic_id) << 32) | low
    } else {
        (u64::from(apic_id & 0xff) << 56) | low
    }
}

/// An ICR value that sends INIT (`sipi = None`) or STARTUP with a vector to
/// one APIC ID, physical mode (used to forward to CPUs not under thinhv).
pub fn physical_icr(apic_id: u32, mode: DeliveryMode, vector: u8, x2apic: bool) -> u64 {
    let low = u64::from(vector) | (u64::from(mode.0) << 8) | 1 << 14;
    if x2apic {
        (u64::from(apic_id) << 32) | low
    } else {
        (u64::from(apic_id & 0xff) << 56) | low
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_linux_init_sipi_sequence() {
        // Linux: apic_icr_write(APIC_INT_LEVELTRIG | APIC_INT_ASSERT | APIC_DM_INIT, 1)
        let init = Icr::decode((1u64 << 56) | 0xc500, false);
        assert_eq!(init.mode, DeliveryMode::INIT);
        assert!(init.assert && init.level_triggered && !init.is_init_deassert());
        assert_eq!(init.dest, Destination::Physical(1));
        let deassert = Icr::decode((1u64 << 56) | 0x8500, false);
        assert!(deassert.is_init_deassert());
        let sipi = Icr::decode((1u64 << 56) | 0x0699, false);
        assert_eq!(sipi.mode, DeliveryMode::STARTUP);
        assert_eq!(sipi.vector, 0x99);
    }

    #[test]
    fn shorthands_and_broadcast() {
        assert_eq!(
            Icr::decode(0x000c_4500, false).dest,
            Destination::AllExcludingSelf
        );
        assert_eq!(
            Icr::decode(0x0008_4500, false).dest,
            Destination::AllIncludingSelf
        );
        assert_eq!(Icr::decode(0x0004_4500, false).dest, Destination::SelfOnly);
        assert_eq!(
            Icr::decode((0xffu64 << 56) | 0x4500, false).dest,
            Destination::AllIncludingSelf
        );
        assert_eq!(
            Icr::decode((0xffu64 << 32) | 0x4500, true).dest,
            Destination::Physical(0xff)
        );
        assert_eq!(
            Icr::decode((3u64 << 56) | 0x4d00, false).dest,
            Destination::Logical(3)
        );
    }

    #[test]
    fn to_x2apic_goes_through_xapic_from_disabled() {
        let base = 0xfee0_0000;
        let (en, extd) = (APIC_BASE_EN, APIC_BASE_EXTD);
        assert_eq!(to_x2apic(base | en | extd | 1 << 8), [None, None]);
        assert_eq!(
            to_x2apic(base | en | 1 << 8),
            [None, Some(base | en | extd | 1 << 8)]
        );
        assert_eq!(to_x2apic(base), [Some(base | en), Some(base | en | extd)]);
    }

    #[test]
    fn x2apic_destination_is_32_bits() {
        let i = Icr::decode((0x1234u64 << 32) | 0x0610, true);
        assert_eq!(i.dest, Destination::Physical(0x1234));
        assert_eq!(i.vector, 0x10);
    }

    #[test]
    fn built_icrs_decode_back() {
        let n = Icr::decode(nmi_icr(7, false), false);
        assert_eq!(
            (n.mode, n.dest),
            (DeliveryMode::NMI, Destination::Physical(7))
        );
        let s = Icr::decode(physical_icr(300, DeliveryMode::STARTUP, 0x9a, true), true);
        assert_eq!(
            (s.mode, s.dest, s.vector),
            (DeliveryMode::STARTUP, Destination::Physical(300), 0x9a)
        );
    }
}
