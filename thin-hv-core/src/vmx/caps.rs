//! The VMX capability MSRs (SDM Vol. 3C, Appendix A).
use super::controls::Allowed;

/// IA32_FEATURE_CONTROL.
pub const MSR_FEATURE_CONTROL: u32 = 0x3a;
/// IA32_VMX_BASIC.
pub const MSR_VMX_BASIC: u32 = 0x480;
/// IA32_VMX_PINBASED_CTLS.
pub const MSR_PINBASED: u32 = 0x481;
/// IA32_VMX_PROCBASED_CTLS.
pub const MSR_PROCBASED: u32 = 0x482;
/// IA32_VMX_EXIT_CTLS.
pub const MSR_EXIT: u32 = 0x483;
/// IA32_VMX_ENTRY_CTLS.
pub const MSR_ENTRY: u32 = 0x484;
/// IA32_VMX_MISC.
pub const MSR_MISC: u32 = 0x485;
/// IA32_VMX_CR0_FIXED0.
pub const MSR_CR0_FIXED0: u32 = 0x486;
/// IA32_VMX_CR0_FIXED1.
pub const MSR_CR0_FIXED1: u32 = 0x487;
/// IA32_VMX_CR4_FIXED0.
pub const MSR_CR4_FIXED0: u32 = 0x488;
/// IA32_VMX_CR4_FIXED1.
pub const MSR_CR4_FIXED1: u32 = 0x489;
/// IA32_VMX_PROCBASED_CTLS2.
pub const MSR_PROCBASED2: u32 = 0x48b;
/// IA32_VMX_EPT_VPID_CAP.
pub const MSR_EPT_VPID_CAP: u32 = 0x48c;
/// IA32_VMX_TRUE_PINBASED_CTLS.
pub const MSR_TRUE_PINBASED: u32 = 0x48d;
/// IA32_VMX_TRUE_PROCBASED_CTLS.
pub const MSR_TRUE_PROCBASED: u32 = 0x48e;
/// IA32_VMX_TRUE_EXIT_CTLS.
pub const MSR_TRUE_EXIT: u32 = 0x48f;
/// IA32_VMX_TRUE_ENTRY_CTLS.
pub const MSR_TRUE_ENTRY: u32 = 0x490;
/// The VMX capability MSRs a guest must not see.
pub const CAPABILITY_MSRS: core::ops::RangeInclusive<u32> = 0x480..=0x493;

/// IA32_FEATURE_CONTROL bits.
pub mod feature_control {
    /// Lock.
    pub const LOCK: u64 = 1 << 0;
    /// VMX inside SMX.
    pub const VMX_IN_SMX: u64 = 1 << 1;
    /// VMX outside SMX.
    pub const VMX_OUTSIDE_SMX: u64 = 1 << 2;
}

/// IA32_VMX_EPT_VPID_CAP bits (Appendix A.10).
pub mod ept_cap {
    /// Execute-only translations.
    pub const EXEC_ONLY: u64 = 1 << 0;
    /// 4-level page walk.
    pub const WALK_4: u64 = 1 << 6;
    /// 5-level page walk.
    pub const WALK_5: u64 = 1 << 7;
    /// UC paging-structure memory type.
    pub const UC: u64 = 1 << 8;
    /// WB paging-structure memory type.
    pub const WB: u64 = 1 << 14;
    /// 2 MiB pages.
    pub const PAGE_2M: u64 = 1 << 16;
    /// 1 GiB pages.
    pub const PAGE_1G: u64 = 1 << 17;
    /// INVEPT.
    pub const INVEPT: u64 = 1 << 20;
    /// Accessed and dirty flags.
    pub const AD: u64 = 1 << 21;
    /// Single-context INVEPT.
    pub const INVEPT_SINGLE: u64 = 1 << 25;
    /// All-context INVEPT.
    pub const INVEPT_ALL: u64 = 1 << 26;
    /// INVVPID.
    pub const INVVPID: u64 = 1 << 32;
    /// All-context INVVPID.
    pub const INVVPID_ALL: u64 = 1 << 42;
}

/// Everything thinhv reads about VMX.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxCaps {
    /// IA32_VMX_BASIC.
    pub basic: u64,
    /// Pin-based (TRUE variant if available).
    pub pin: Allowed,
    /// Primary processor-based (TRUE variant if available).
    pub proc1: Allowed,
    /// Secondary processor-based.
    pub proc2: Allowed,
    /// Exit (TRUE variant if available).
    pub exit: Allowed,
    /// Entry (TRUE variant if available).
    pub entry: Allowed,
    /// IA32_VMX_MISC.
    pub misc: u64,
    /// CR0 bits that must be 1.
    pub cr0_fixed0: u64,
    /// CR0 bits that may be 1.
    pub cr0_fixed1: u64,
    /// CR4 bits that must be 1.
    pub cr4_fixed0: u64,
    /// CR4 bits that may be 1.
    pub cr4_fixed1: u64,
    /// IA32_VMX_EPT_VPID_CAP.
    pub ept_vpid: u64,
    /// Physical address width.
    pub phys_bits: u32,
}

/// The raw MSR values, by MSR number, for [`VmxCaps::from_msrs`].
pub type MsrReader<'a> = &'a dyn Fn(u32) -> u64;

impl VmxCaps {
    /// Reads the capability MSRs through `rd` (which must only be called
    /// for MSRs that exist: the TRUE and secondary ones are read only when
    /// advertised).
    pub fn from_msrs(rd: MsrReader<'_>, phys_bits: u32) -> Self {
        let basic = rd(MSR_VMX_BASIC);
        let true_ctls = basic & (1 << 55) != 0;
        let pick = |legacy: u32, tru: u32| Allowed(rd(if true_ctls { tru } else { legacy }));
        let proc1 = pick(MSR_PROCBASED, MSR_TRUE_PROCBASED);
        let has2 = proc1.may_be_1() & super::controls::proc1::SECONDARY != 0;
        let proc2 = if has2 {
            Allowed(rd(MSR_PROCBASED2))
        } else {
            Allowed(0)
        };
        let has_ept_vpid =
            proc2.may_be_1() & (super::controls::proc2::EPT | super::controls::proc2::VPID) != 0;
        Self {
            basic,
            pin: pick(MSR_PINBASED, MSR_TRUE_PINBASED),
            proc1,
            proc2,
            exit: pick(MSR_EXIT, MSR_TRUE_EXIT),
            entry: pick(MSR_ENTRY, MSR_TRUE_ENTRY),
            misc: rd(MSR_MISC),
            cr0_fixed0: rd(MSR_CR0_FIXED0),
            cr0_fixed1: rd(MSR_CR0_FIXED1),
            cr4_fixed0: rd(MSR_CR4_FIXED0),
            cr4_fixed1: rd(MSR_CR4_FIXED1),
            ept_vpid: if has_ept_vpid {
                rd(MSR_EPT_VPID_CAP)
            } else {
                0
            },
            phys_bits,
        }
    }

    /// VMCS revision identifier (bits 30:0 of IA32_VMX_BASIC).
    pub const fn revision(&self) -> u32 {
        (self.basic & 0x7fff_ffff) as u32
    }

    /// Whether a secondary control may be 1.
    pub const fn has2(&self, bit: u32) -> bool {
        self.proc1.may_be_1() & super::controls::proc1::SECONDARY != 0
            && self.proc2.may_be_1() & bit != 0
    }

    /// Whether an EPT/VPID capability bit is set.
    pub const fn ept_has(&self, bit: u64) -> bool {
        self.ept_vpid & bit == bit
    }

    /// Activity states supported besides active (IA32_VMX_MISC bits 8:6:
    /// HLT, shutdown, wait-for-SIPI).
    pub const fn wait_for_sipi_supported(&self) -> bool {
        self.misc & (1 << 8) != 0
    }

    /// Whether `value` is a physical address the processor can hold.
    pub const fn phys_ok(&self, value: u64) -> bool {
        self.phys_bits >= 64 || value >> self.phys_bits == 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Capability MSRs of Bochs 2.7 with `cpu: model=tigerlake`, as the
    /// core logs them at `log_level = "debug"` ("VMX caps: ..."): TRUE
    /// controls, EPT with 1 GiB pages, unrestricted guest, VPID. The legacy
    /// (non-TRUE) MSRs are not read when TRUE ones exist, so they are 0 here.
    pub fn bochs_tigerlake() -> VmxCaps {
        let msrs = |m: u32| -> u64 {
            match m {
                MSR_VMX_BASIC => 0x01d8_1000_0000_0004,
                MSR_TRUE_PINBASED => 0x0000_007f_0000_0016,
                MSR_TRUE_PROCBASED => 0xfff9_fffe_0400_6172,
                MSR_PROCBASED2 => 0x0297_7fff_0000_0000,
                MSR_TRUE_EXIT => 0x107f_ffff_0003_6dfb,
                MSR_TRUE_ENTRY => 0x0010_ffff_0000_11fb,
                MSR_MISC => 0x6004_01e0,
                MSR_CR0_FIXED0 => 0x8000_0021,
                MSR_CR0_FIXED1 => 0xffff_ffff,
                MSR_CR4_FIXED0 => 0x2000,
                MSR_CR4_FIXED1 => 0x00f7_2fff,
                MSR_EPT_VPID_CAP => 0x0000_0f01_06b3_4141,
                _ => 0,
            }
        };
        VmxCaps::from_msrs(&msrs, 40)
    }

    #[test]
    fn reads_true_controls_and_secondary_caps() {
        let c = bochs_tigerlake();
        assert_eq!(c.revision(), 4);
        // TRUE controls used: CR3-load exiting may be 0.
        assert_eq!(
            c.proc1.must_be_1() & super::super::controls::proc1::CR3_LOAD,
            0
        );
        assert!(c.has2(super::super::controls::proc2::EPT));
        assert!(c.has2(super::super::controls::proc2::UNRESTRICTED));
        assert!(c.has2(super::super::controls::proc2::VPID));
        assert!(c.ept_has(ept_cap::WALK_4 | ept_cap::WB | ept_cap::PAGE_2M));
        assert!(c.wait_for_sipi_supported());
        assert!(c.phys_ok(0xff_ffff_f000));
        assert!(!c.phys_ok(0x100_0000_0000));
    }
}
