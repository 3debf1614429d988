//! The hypervisor CPUID leaves.
//!
//! CPUID is executable at every privilege level and always intercepted, so
//! these leaves are the channel an unprivileged (or root, no kernel module)
//! program in the guest uses to find thinhv. They only ever *report*; no leaf
//! changes state. Unless `[cpu] hide_hypervisor` is set, leaf 1 ECX bit 31
//! ("hypervisor present") is set and the leaves below answer; when hidden,
//! the bit reads as the hardware has it and the leaves return what the
//! processor itself returns.

/// Leaf 1 ECX bit 31: a hypervisor is present.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;

/// Base leaf: EAX ← highest thinhv leaf, EBX:ECX:EDX ← [`SIGNATURE`].
pub const LEAF_SIGNATURE: u32 = 0x4000_0000;
/// EAX ← [`crate::VERSION`], EBX ← [`crate::ABI_VERSION`],
/// ECX ← CPUs virtualized, EDX ← CPUs expected.
pub const LEAF_VERSION: u32 = 0x4000_0001;
/// EAX:EBX ← bytes reserved (low, high), ECX:EDX ← physical address of the
/// read-only status page (low, high).
pub const LEAF_MEMORY: u32 = 0x4000_0002;
/// EAX ← status page size in bytes, EBX ← vendor backend
/// ([`crate::hypercall::VENDOR_AMD_SVM`] or `..._INTEL_VMX`),
/// ECX ← number of exit reasons counted, EDX ← flags (bit 0: sealed).
pub const LEAF_INFO: u32 = 0x4000_0003;
/// Integrity: EAX ← CRC-32 of the core's read-only image recorded at load,
/// EBX ← the same CRC computed now, ECX ← 1 if the canary page is intact.
/// (Recomputed on every call; meant for self-tests and monitoring.)
pub const LEAF_INTEGRITY: u32 = 0x4000_0004;
/// Highest leaf thinhv answers.
pub const LEAF_MAX: u32 = LEAF_INTEGRITY;

/// The 12-byte signature returned in EBX, ECX, EDX of [`LEAF_SIGNATURE`].
pub const SIGNATURE: [u8; 12] = *b"ThinHVThinHV";

/// The signature as the three registers (EBX, ECX, EDX) carry it.
pub const fn signature_regs() -> (u32, u32, u32) {
    let s = SIGNATURE;
    (
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    )
}

/// Reassembles the signature from the three registers.
pub fn signature_from_regs(ebx: u32, ecx: u32, edx: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..4].copy_from_slice(&ebx.to_le_bytes());
    out[4..8].copy_from_slice(&ecx.to_le_bytes());
    out[8..12].copy_from_slice(&edx.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trips() {
        let (b, c, d) = signature_regs();
        assert_eq!(signature_from_regs(b, c, d), SIGNATURE);
        assert_eq!(&SIGNATURE[..6], b"ThinHV");
    }
}
