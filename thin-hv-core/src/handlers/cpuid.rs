//! CPUID: announce thinhv, hide virtualization from the guest.
use crate::env::Env;
use crate::guest::{Gpr, GuestCpu};
use thinhv_abi::cpuid as leaves;
use thinhv_abi::exit::EXIT_REASON_COUNT;
use thinhv_abi::handoff::CpuidProfile;

/// Bytes of the legacy XSAVE area plus the XSAVE header.
const XSAVE_LEGACY_AND_HEADER: u32 = 512 + 64;

/// What the processor compatibility profile makes of a CPUID result:
/// the masks, plus the XSAVE leaf (0xD) kept consistent with the XCR0
/// components the profile allows — the supported-component bitmap, the
/// maximum area size recomputed from the components left (`host` answers
/// CPUID 0xD.i with the processor's own size and offset), and the
/// sub-leaves of hidden components reading as zeros.
pub fn profile_cpuid(
    p: &CpuidProfile,
    leaf: u32,
    subleaf: u32,
    raw: [u32; 4],
    host: impl Fn(u32, u32) -> [u32; 4],
) -> [u32; 4] {
    if p.active == 0 {
        return raw;
    }
    let mut r = p.apply(leaf, subleaf, raw);
    if leaf != 0xd {
        return r;
    }
    let allowed = p.xcr0_allowed;
    match subleaf {
        0 => {
            let user = (u64::from(r[0]) | (u64::from(r[3]) << 32)) & allowed;
            r[0] = (user & 0xffff_ffff) as u32;
            r[3] = (user >> 32) as u32;
            let mut max = XSAVE_LEGACY_AND_HEADER;
            for i in 2..64u32 {
                if user & (1 << i) != 0 {
                    let c = host(0xd, i);
                    max = max.max(c[1].saturating_add(c[0]));
                }
            }
            r[2] = max;
        }
        // 1: XSAVEOPT.. features (masked above) and the XSS components.
        2..=63 => {
            let d0 = host(0xd, 0);
            let d1 = host(0xd, 1);
            let user = (u64::from(d0[0]) | (u64::from(d0[3]) << 32)) & allowed;
            let supervisor = u64::from(d1[2]) | (u64::from(d1[3]) << 32);
            if (user | supervisor) & (1 << subleaf) == 0 {
                r = [0; 4];
            }
        }
        _ => {}
    }
    r
}

/// Leaf 1 ECX bit 5: VMX.
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// Leaf 1 ECX bit 6: SMX. GETSEC exits unconditionally under VMX (SDM Vol.
/// 3C §26.1.2) and thinhv offers no measured launch, so SMX is hidden and
/// GETSEC raises #UD, as on a processor without SMX.
const LEAF1_ECX_SMX: u32 = 1 << 6;
/// Leaf 1 ECX bit 27: OSXSAVE, a copy of CR4.OSXSAVE.
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
/// Leaf 7.0 ECX bit 3: PKU; bit 4: OSPKE, a copy of CR4.PKE.
const LEAF7_ECX_PKU: u32 = 1 << 3;
const LEAF7_ECX_OSPKE: u32 = 1 << 4;
/// CR4.OSXSAVE and CR4.PKE.
const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_PKE: u64 = 1 << 22;
/// Leaf 0x8000_0001 ECX bit 17: TCE. thinhv refuses EFER.TCE (see
/// `msr_policy::efer_allowed`), so it does not announce it either.
const EXT1_ECX_TCE: u32 = 1 << 17;
/// Leaf 0x8000_0001 ECX bit 2: SVM.
const EXT1_ECX_SVM: u32 = 1 << 2;
/// Leaf 0x8000_0001 ECX bit 12: SKINIT/STGI.
const EXT1_ECX_SKINIT: u32 = 1 << 12;
/// SVM feature leaf.
const LEAF_SVM_FEATURES: u32 = 0x8000_000a;

/// What the hypervisor leaves report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HvInfo {
    /// CPUID presence hidden.
    pub hidden: bool,
    /// CPUs virtualized.
    pub cpus_virtualized: u32,
    /// CPUs expected.
    pub cpus_expected: u32,
    /// Bytes reserved.
    pub bytes_reserved: u64,
    /// Status page base.
    pub status_base: u64,
    /// Status page size.
    pub status_size: u32,
    /// Vendor code.
    pub vendor: u32,
    /// Sealed.
    pub sealed: bool,
}

/// The CPUID result the guest sees, from the processor's own `raw` answer.
pub fn filter_cpuid(leaf: u32, subleaf: u32, raw: [u32; 4], info: &HvInfo) -> [u32; 4] {
    let _ = subleaf;
    let [mut a, mut b, mut c, mut d] = raw;
    if !info.hidden && (leaves::LEAF_SIGNATURE..=leaves::LEAF_SIGNATURE + 0xff).contains(&leaf) {
        return match leaf {
            leaves::LEAF_SIGNATURE => {
                let (sb, sc, sd) = leaves::signature_regs();
                [leaves::LEAF_MAX, sb, sc, sd]
            }
            leaves::LEAF_VERSION => [
                thinhv_abi::VERSION,
                thinhv_abi::ABI_VERSION,
                info.cpus_virtualized,
                info.cpus_expected,
            ],
            leaves::LEAF_MEMORY => [
                (info.bytes_reserved & 0xffff_ffff) as u32,
                (info.bytes_reserved >> 32) as u32,
                (info.status_base & 0xffff_ffff) as u32,
                (info.status_base >> 32) as u32,
            ],
            leaves::LEAF_INFO => [
                info.status_size,
                info.vendor,
                u32::try_from(EXIT_REASON_COUNT).unwrap_or(u32::MAX),
                u32::from(info.sealed),
            ],
            _ => [0; 4],
        };
    }
    match leaf {
        1 => {
            c &= !(LEAF1_ECX_VMX | LEAF1_ECX_SMX);
            if !info.hidden {
                c |= leaves::LEAF1_ECX_HYPERVISOR;
            }
        }
        0x8000_0001 => c &= !(EXT1_ECX_SVM | EXT1_ECX_SKINIT | EXT1_ECX_TCE),
        LEAF_SVM_FEATURES => {
            a = 0;
            b = 0;
            c = 0;
            d = 0;
        }
        _ => {}
    }
    [a, b, c, d]
}

/// The CPUID bits that mirror the guest's own CR4 (SDM Vol. 2A CPUID,
/// Table 3-8: "OSXSAVE: A value of 1 indicates that the OS has set
/// CR4.OSXSAVE"; leaf 7 ECX OSPKE likewise for CR4.PKE). CPUID runs in host
/// mode under the host's CR4, so these are set from the guest's.
pub fn follow_guest_cr4(leaf: u32, subleaf: u32, mut r: [u32; 4], guest_cr4: u64) -> [u32; 4] {
    match (leaf, subleaf) {
        (1, _) => {
            r[2] &= !LEAF1_ECX_OSXSAVE;
            if guest_cr4 & CR4_OSXSAVE != 0 {
                r[2] |= LEAF1_ECX_OSXSAVE;
            }
        }
        (7, 0) => {
            let pku = r[2] & LEAF7_ECX_PKU != 0;
            r[2] &= !LEAF7_ECX_OSPKE;
            if pku && guest_cr4 & CR4_PKE != 0 {
                r[2] |= LEAF7_ECX_OSPKE;
            }
        }
        _ => {}
    }
    r
}

pub(super) fn info(env: &impl Env) -> HvInfo {
    let hv = env.hv();
    HvInfo {
        hidden: hv.hidden(),
        cpus_virtualized: hv
            .cpus_virtualized
            .load(core::sync::atomic::Ordering::Relaxed),
        cpus_expected: u32::try_from(hv.cpus().len()).unwrap_or(u32::MAX),
        bytes_reserved: hv.protected.size + hv.status.size,
        status_base: hv.status.base,
        status_size: u32::try_from(hv.status.size).unwrap_or(u32::MAX),
        vendor: hv.vendor,
        sealed: hv.is_sealed(),
    }
}

pub(super) fn handle(cpu: &mut impl GuestCpu, env: &impl Env) {
    let leaf = (cpu.gpr(Gpr::Rax) & 0xffff_ffff) as u32;
    let sub = (cpu.gpr(Gpr::Rcx) & 0xffff_ffff) as u32;
    if (leaves::LEAF_SIGNATURE..=leaves::LEAF_SIGNATURE + 0xff).contains(&leaf) {
        // A status query: collect DMA faults first.
        env.iommu_poll();
    }
    let raw = profile_cpuid(&env.hv().cpuid, leaf, sub, env.cpuid(leaf, sub), |l, s| {
        env.cpuid(l, s)
    });
    let info = info(env);
    let r = if leaf == leaves::LEAF_INTEGRITY && !info.hidden {
        let i = env.integrity();
        [i.expected_crc, i.current_crc, u32::from(i.canary_ok), 0]
    } else {
        follow_guest_cr4(
            leaf,
            sub,
            filter_cpuid(leaf, sub, raw, &info),
            cpu.paging().cr4,
        )
    };
    cpu.set_gpr(Gpr::Rax, u64::from(r[0]));
    cpu.set_gpr(Gpr::Rbx, u64::from(r[1]));
    cpu.set_gpr(Gpr::Rcx, u64::from(r[2]));
    cpu.set_gpr(Gpr::Rdx, u64::from(r[3]));
}
