//! VM-execution, VM-exit and VM-entry control bits (SDM Vol. 3C §25.6–25.8)
//! and their adjustment against the capability MSRs (Appendix A.3–A.5).

/// Pin-based controls (§25.6.1).
pub mod pin {
    /// External-interrupt exiting.
    pub const EXT_INTR: u32 = 1 << 0;
    /// NMI exiting.
    pub const NMI: u32 = 1 << 3;
    /// Virtual NMIs.
    pub const VIRTUAL_NMIS: u32 = 1 << 5;
}

/// Primary processor-based controls (§25.6.2).
pub mod proc1 {
    /// HLT exiting.
    pub const HLT: u32 = 1 << 7;
    /// NMI-window exiting (needs virtual NMIs).
    pub const NMI_WINDOW: u32 = 1 << 22;
    /// CR3-load exiting.
    pub const CR3_LOAD: u32 = 1 << 15;
    /// CR3-store exiting.
    pub const CR3_STORE: u32 = 1 << 16;
    /// Unconditional I/O exiting.
    pub const UNCOND_IO: u32 = 1 << 24;
    /// Use I/O bitmaps.
    pub const IO_BITMAPS: u32 = 1 << 25;
    /// Use MSR bitmaps.
    pub const MSR_BITMAPS: u32 = 1 << 28;
    /// Activate secondary controls.
    pub const SECONDARY: u32 = 1 << 31;
}

/// Secondary processor-based controls (§25.6.2).
pub mod proc2 {
    /// Enable EPT.
    pub const EPT: u32 = 1 << 1;
    /// Enable RDTSCP.
    pub const RDTSCP: u32 = 1 << 3;
    /// Enable VPID.
    pub const VPID: u32 = 1 << 5;
    /// Unrestricted guest.
    pub const UNRESTRICTED: u32 = 1 << 7;
    /// Enable INVPCID.
    pub const INVPCID: u32 = 1 << 12;
    /// Enable XSAVES/XRSTORS.
    pub const XSAVES: u32 = 1 << 20;
    /// Enable user wait and pause.
    pub const USER_WAIT_PAUSE: u32 = 1 << 26;
}

/// VM-exit controls (§25.7.1).
pub mod exit {
    /// Save debug controls.
    pub const SAVE_DEBUG: u32 = 1 << 2;
    /// Host address-space size (64-bit host).
    pub const HOST_64: u32 = 1 << 9;
    /// Save IA32_PAT.
    pub const SAVE_PAT: u32 = 1 << 18;
    /// Load IA32_PAT.
    pub const LOAD_PAT: u32 = 1 << 19;
    /// Save IA32_EFER.
    pub const SAVE_EFER: u32 = 1 << 20;
    /// Load IA32_EFER.
    pub const LOAD_EFER: u32 = 1 << 21;
}

/// VM-entry controls (§25.8.1).
pub mod entry {
    /// Load debug controls.
    pub const LOAD_DEBUG: u32 = 1 << 2;
    /// IA-32e mode guest.
    pub const IA32E_GUEST: u32 = 1 << 9;
    /// Entry to SMM.
    pub const ENTRY_TO_SMM: u32 = 1 << 10;
    /// Load IA32_PAT.
    pub const LOAD_PAT: u32 = 1 << 14;
    /// Load IA32_EFER.
    pub const LOAD_EFER: u32 = 1 << 15;
}

/// A capability MSR value: bits 31:0 are the allowed 0-settings (a 1 there
/// means the control must be 1), bits 63:32 the allowed 1-settings (a 0
/// there means the control must be 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Allowed(pub u64);

impl Allowed {
    /// Bits that must be 1.
    pub const fn must_be_1(self) -> u32 {
        (self.0 & 0xffff_ffff) as u32
    }

    /// Bits that may be 1.
    pub const fn may_be_1(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// Whether every bit of `value` is allowed.
    pub const fn permits(self, value: u32) -> bool {
        value & self.must_be_1() == self.must_be_1() && value & !self.may_be_1() == 0
    }
}

/// Why a control word cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsupported {
    /// The required bits the processor cannot set.
    pub missing: u32,
}

/// Builds a control word: `required` bits must be settable, `wanted` bits
/// are set when the processor allows, and the bits the processor requires
/// are added. Fails if a required bit cannot be 1.
pub fn adjust(required: u32, wanted: u32, cap: Allowed) -> Result<u32, Unsupported> {
    let missing = required & !cap.may_be_1();
    if missing != 0 {
        return Err(Unsupported { missing });
    }
    Ok(((required | wanted) & cap.may_be_1()) | cap.must_be_1())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjustment_follows_appendix_a() {
        // Must-be-1 bits 1, 2, 4 (the "default1" class); bits 0..=7 and 28, 31 may be 1.
        let cap = Allowed((u64::from(0x9000_00ffu32) << 32) | 0x16);
        let v = adjust(proc1::MSR_BITMAPS, proc1::SECONDARY | (1 << 20), cap).unwrap();
        assert_eq!(v, 0x9000_0016);
        assert!(cap.permits(v));
        assert!(!cap.permits(v & !0x2), "a must-be-1 bit cleared");
        assert!(!cap.permits(v | (1 << 20)), "a must-be-0 bit set");
        assert_eq!(
            adjust(1 << 20, 0, cap),
            Err(Unsupported { missing: 1 << 20 })
        );
    }

    #[test]
    fn true_controls_allow_clearing_default1_bits() {
        // The TRUE_ MSR clears the must-be-1 bit 15 (CR3-load exiting) that
        // the legacy MSR forces on.
        let legacy = Allowed((u64::from(u32::MAX) << 32) | 0x0401_e172);
        let true_caps = Allowed((u64::from(u32::MAX) << 32) | 0x0400_6172);
        assert_ne!(adjust(0, 0, legacy).unwrap() & proc1::CR3_LOAD, 0);
        assert_eq!(adjust(0, 0, true_caps).unwrap() & proc1::CR3_LOAD, 0);
    }
}
