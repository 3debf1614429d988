//! Guest writes to CR0 and CR4 that touch bits thinhv owns (the VMX fixed
//! bits, CR4.VMXE, unsupported bits) exit; this decides what the guest's
//! write means (SDM Vol. 3A §2.5, Vol. 3C §26.1.3 and §27.3.1.1).
use super::state::actual_cr;
use crate::guest::GpFault;

const CR0_PE: u64 = 1;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_VMXE: u64 = 1 << 13;
const CR4_PCIDE: u64 = 1 << 17;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// The processor's CR rules that thinhv enforces on emulated writes.
#[derive(Clone, Copy, Debug)]
pub struct CrRules {
    /// IA32_VMX_CR0_FIXED0.
    pub cr0_fixed0: u64,
    /// IA32_VMX_CR0_FIXED1 (bits that may be 1).
    pub cr0_fixed1: u64,
    /// IA32_VMX_CR4_FIXED0.
    pub cr4_fixed0: u64,
    /// IA32_VMX_CR4_FIXED1.
    pub cr4_fixed1: u64,
    /// Unrestricted guest is on.
    pub unrestricted: bool,
    /// Physical address width (CR3 bits at and above it are reserved).
    pub phys_bits: u32,
}

/// The effect of an accepted write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrUpdate {
    /// Value for the guest CR field (what the processor uses).
    pub actual: u64,
    /// Value for the read shadow (what the guest reads back).
    pub shadow: u64,
    /// New guest EFER when paging switched IA-32e mode on or off.
    pub efer: Option<u64>,
}

/// A write to CR0. `efer` is the guest's EFER, `cr4` its CR4 (actual).
/// `Err(GpFault)`: the write raises #GP, nothing changes.
pub fn write_cr0(
    new: u64,
    old_shadow: u64,
    efer: u64,
    cr4: u64,
    r: &CrRules,
) -> Result<CrUpdate, GpFault> {
    if new >> 32 != 0 {
        return Err(GpFault);
    }
    // Bits the processor does not have (fixed1 clear), except the fixed
    // ones the hypervisor sets itself.
    if new & !r.cr0_fixed1 & 0xffff_ffff != 0 {
        return Err(GpFault);
    }
    if new & CR0_PG != 0 && new & CR0_PE == 0 {
        return Err(GpFault);
    }
    if new & CR0_NW != 0 && new & CR0_CD == 0 {
        return Err(GpFault);
    }
    let mut efer_out = None;
    let pg_on = new & CR0_PG != 0 && old_shadow & CR0_PG == 0;
    let pg_off = new & CR0_PG == 0 && old_shadow & CR0_PG != 0;
    if pg_on && efer & EFER_LME != 0 {
        // Entering IA-32e mode needs PAE.
        if cr4 & CR4_PAE == 0 {
            return Err(GpFault);
        }
        efer_out = Some(efer | EFER_LMA);
    } else if pg_off && efer & EFER_LMA != 0 {
        efer_out = Some(efer & !EFER_LMA);
    }
    let (actual, _) = actual_cr(new, 0, r.cr0_fixed0, 0, r.unrestricted);
    Ok(CrUpdate {
        actual,
        shadow: new,
        efer: efer_out,
    })
}

/// A write to CR4. VMXE is hidden from the guest: setting it is refused as
/// on a processor without VMX.
pub fn write_cr4(new: u64, efer: u64, cr3: u64, r: &CrRules) -> Result<CrUpdate, GpFault> {
    if new & CR4_VMXE != 0 || new >> 32 != 0 {
        return Err(GpFault);
    }
    if new & !r.cr4_fixed1 & 0xffff_ffff != 0 {
        return Err(GpFault);
    }
    if efer & EFER_LMA != 0 && new & CR4_PAE == 0 {
        return Err(GpFault);
    }
    if new & CR4_PCIDE != 0 && (efer & EFER_LMA == 0 || cr3 & 0xfff != 0) {
        return Err(GpFault);
    }
    let (_, actual) = actual_cr(0, new, 0, r.cr4_fixed0, r.unrestricted);
    Ok(CrUpdate {
        actual,
        shadow: new,
        efer: None,
    })
}

/// CR0.TS.
pub const CR0_TS: u64 = 1 << 3;
/// The CR0 bits LMSW loads: PE, MP, EM, TS (SDM Vol. 2A "LMSW").
const LMSW_BITS: u64 = 0xf;

/// The CR0 that LMSW with `source` gives, from the guest's CR0: only bits
/// 0–3 change, and PE can be set but not cleared (SDM Vol. 2A "LMSW").
pub const fn lmsw(cr0: u64, source: u16) -> u64 {
    (cr0 & !LMSW_BITS) | (source as u64 & LMSW_BITS) | (cr0 & CR0_PE)
}

/// The CR0 that CLTS gives (SDM Vol. 2A "CLTS").
pub const fn clts(cr0: u64) -> u64 {
    cr0 & !CR0_TS
}

/// A MOV to CR3 (SDM Vol. 3A §2.5, §4.10.4.1): in IA-32e mode bits from
/// the physical address width up to 62 are reserved (#GP) and, with
/// CR4.PCIDE, bit 63 asks not to flush and is not stored; outside IA-32e
/// mode the operand is 32 bits. Returns the value CR3 holds afterwards.
pub fn write_cr3(new: u64, efer: u64, cr4: u64, r: &CrRules) -> Result<u64, GpFault> {
    if efer & EFER_LMA == 0 {
        return Ok(new & 0xffff_ffff);
    }
    let value = if cr4 & CR4_PCIDE != 0 {
        new & !(1 << 63)
    } else {
        new
    };
    let width = r.phys_bits.clamp(32, 63);
    if value >> width != 0 {
        return Err(GpFault);
    }
    Ok(value)
}

/// A MOV to CR8 (SDM Vol. 3A §10.8.6.1): bits 63:4 are reserved; the value
/// is TPR bits 7:4. Returns the TPR register value.
pub const fn write_cr8(new: u64) -> Result<u32, GpFault> {
    if new >> 4 != 0 {
        return Err(GpFault);
    }
    Ok(((new & 0xf) as u32) << 4)
}

/// CR-access exit qualification (SDM Vol. 3C Table 28-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrAccess {
    /// Control register number.
    pub cr: u8,
    /// 0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW.
    pub kind: u8,
    /// General-purpose register of a MOV (encoding order).
    pub gpr: u8,
    /// LMSW source data.
    pub lmsw: u16,
}

impl CrAccess {
    /// Decodes the qualification.
    pub const fn decode(q: u64) -> Self {
        Self {
            cr: (q & 0xf) as u8,
            kind: ((q >> 4) & 3) as u8,
            gpr: ((q >> 8) & 0xf) as u8,
            lmsw: ((q >> 16) & 0xffff) as u16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::caps::tests::bochs_tigerlake;

    fn rules() -> CrRules {
        let c = bochs_tigerlake();
        CrRules {
            cr0_fixed0: c.cr0_fixed0,
            cr0_fixed1: c.cr0_fixed1,
            cr4_fixed0: c.cr4_fixed0,
            cr4_fixed1: c.cr4_fixed1,
            unrestricted: true,
            phys_bits: 39,
        }
    }

    #[test]
    fn lmsw_touches_bits_0_to_3_and_never_clears_pe() {
        // PE|MP|ET|NE|PG with TS: LMSW 0 clears MP and TS but keeps PE.
        let cr0 = 0x8000_003b;
        assert_eq!(lmsw(cr0, 0), 0x8000_0031);
        // LMSW 0xfff0 loads only bits 0-3 (all clear here).
        assert_eq!(lmsw(cr0, 0xfff0), 0x8000_0031);
        // From real mode, LMSW 1 sets PE (the classic way into protected mode).
        assert_eq!(lmsw(0x6000_0010, 1), 0x6000_0011);
        assert_eq!(lmsw(0x10, 0x000e), 0x1e, "MP, EM, TS set");
        assert_eq!(clts(0x8000_003b), 0x8000_0033);
        assert_eq!(clts(0x11), 0x11);
    }

    #[test]
    fn cr3_and_cr8_writes() {
        let r = rules();
        let lma = 1 << 10;
        // Legacy mode: the operand is 32 bits.
        assert_eq!(write_cr3(0xdead_0000_1234_5000, 0, 0, &r), Ok(0x1234_5000));
        // IA-32e: bits 39..=62 are reserved with 39 physical address bits.
        assert_eq!(write_cr3(0x7f_ffff_f000, lma, 0, &r), Ok(0x7f_ffff_f000));
        assert_eq!(write_cr3(1 << 39, lma, 0, &r), Err(GpFault));
        assert_eq!(write_cr3(1 << 63, lma, 0, &r), Err(GpFault), "no PCIDE");
        // With PCIDE bit 63 is the no-flush hint, not stored.
        assert_eq!(
            write_cr3((1 << 63) | 0x1000 | 5, lma, CR4_PCIDE, &r),
            Ok(0x1005)
        );
        assert_eq!(write_cr8(0xf), Ok(0xf0));
        assert_eq!(write_cr8(0), Ok(0));
        assert_eq!(write_cr8(0x10), Err(GpFault));
    }

    #[test]
    fn linux_trampoline_from_real_mode() {
        let r = rules();
        // After INIT the guest sees 0x60000010; the trampoline turns on PE
        // (and NE, which the processor forces anyway).
        let u = write_cr0(0x0000_0021 | 0x10, 0x6000_0010, 0, 0, &r).unwrap();
        assert_eq!(u.shadow, 0x31);
        assert_eq!(u.actual & 0x21, 0x21, "PE and NE");
        assert_eq!(u.efer, None);
        // startup_32 → long mode: EFER.LME set, CR4.PAE set, then PG.
        let u = write_cr0(0x8005_0033, 0x31, 1 << 8, 1 << 5 | 1 << 13, &r).unwrap();
        assert_eq!(
            u.efer,
            Some((1 << 8) | (1 << 10)),
            "LMA follows PG with LME"
        );
        // And back off.
        let u = write_cr0(0x31, 0x8005_0033, (1 << 8) | (1 << 10), 1 << 5, &r).unwrap();
        assert_eq!(u.efer, Some(1 << 8));
    }

    #[test]
    fn invalid_cr0_writes_fault() {
        let r = rules();
        assert!(
            write_cr0(0x8000_0000, 0x31, 0, 0, &r).is_err(),
            "PG without PE"
        );
        assert!(
            write_cr0(0x2000_0011, 0x31, 0, 0, &r).is_err(),
            "NW without CD"
        );
        assert!(
            write_cr0(1 << 32 | 0x11, 0x31, 0, 0, &r).is_err(),
            "high bits"
        );
        assert!(
            write_cr0(0x8000_0011, 0x11, 1 << 8, 0, &r).is_err(),
            "long mode without PAE"
        );
    }

    #[test]
    fn cr4_hides_vmxe() {
        let r = rules();
        let u = write_cr4(0x6f0, 0, 0, &r).unwrap();
        assert_eq!(u.shadow, 0x6f0);
        assert_eq!(u.actual, 0x6f0 | 1 << 13);
        assert!(
            write_cr4(0x6f0 | 1 << 13, 0, 0, &r).is_err(),
            "VMXE refused"
        );
        assert!(write_cr4(1 << 26, 0, 0, &r).is_err(), "unsupported bit");
        assert!(
            write_cr4(0x6d0, 1 << 10, 0, &r).is_err(),
            "PAE off in long mode"
        );
        assert!(write_cr4(0x6f0 | 1 << 17, 1 << 10, 0x1000, &r).is_ok());
        assert!(
            write_cr4(0x6f0 | 1 << 17, 1 << 10, 0x1001, &r).is_err(),
            "PCIDE with CR3[11:0]"
        );
    }

    #[test]
    fn qualification_decoding() {
        let q = CrAccess::decode(0x0000_0304);
        assert_eq!(
            q,
            CrAccess {
                cr: 4,
                kind: 0,
                gpr: 3,
                lmsw: 0
            }
        );
        let q = CrAccess::decode(0x0011_0030);
        assert_eq!((q.kind, q.lmsw), (3, 0x11));
    }
}
