//! The hypervisor CPUID leaves, readable at any privilege level.
use thinhv_abi::cpuid::{
    LEAF_INFO, LEAF_MEMORY, LEAF_SIGNATURE, LEAF_VERSION, LEAF1_ECX_HYPERVISOR, SIGNATURE,
    signature_from_regs,
};

/// CPUID.
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// What the leaves say.
#[derive(Clone, Copy, Debug)]
pub struct Presence {
    /// Leaf 1 ECX[31].
    pub hypervisor_bit: bool,
    /// The 12-byte signature of leaf 0x4000_0000.
    pub signature: [u8; 12],
    /// Version (packed).
    pub version: u32,
    /// ABI version.
    pub abi: u32,
    /// CPUs virtualized.
    pub cpus_virtualized: u32,
    /// CPUs expected.
    pub cpus_expected: u32,
    /// Bytes reserved.
    pub bytes_reserved: u64,
    /// Status page physical address.
    pub status_page: u64,
    /// Status page size.
    pub status_size: u32,
    /// Vendor backend.
    pub vendor: u32,
    /// Sealed.
    pub sealed: bool,
}

impl Presence {
    /// Whether the signature is thinhv's.
    pub fn is_thinhv(&self) -> bool {
        self.signature == SIGNATURE
    }
}

/// Reads the leaves.
pub fn presence() -> Presence {
    let l1 = cpuid(1, 0);
    let s = cpuid(LEAF_SIGNATURE, 0);
    let v = cpuid(LEAF_VERSION, 0);
    let m = cpuid(LEAF_MEMORY, 0);
    let i = cpuid(LEAF_INFO, 0);
    Presence {
        hypervisor_bit: l1[2] & LEAF1_ECX_HYPERVISOR != 0,
        signature: signature_from_regs(s[1], s[2], s[3]),
        version: v[0],
        abi: v[1],
        cpus_virtualized: v[2],
        cpus_expected: v[3],
        bytes_reserved: u64::from(m[0]) | (u64::from(m[1]) << 32),
        status_page: u64::from(m[2]) | (u64::from(m[3]) << 32),
        status_size: i[0],
        vendor: i[1],
        sealed: i[3] & 1 != 0,
    }
}

/// The processor vendor string.
pub fn vendor() -> [u8; 12] {
    let l0 = cpuid(0, 0);
    let mut v = [0u8; 12];
    v[0..4].copy_from_slice(&l0[1].to_le_bytes());
    v[4..8].copy_from_slice(&l0[3].to_le_bytes());
    v[8..12].copy_from_slice(&l0[2].to_le_bytes());
    v
}
