//! VMCS field encodings (SDM Vol. 3C, Appendix B).
#![allow(missing_docs)]

/// A VMCS field encoding. A newtype: the processor defines more fields
/// than thinhv names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Field(pub u32);

impl Field {
    // 16-bit control.
    pub const VPID: Self = Self(0x0000);
    // 16-bit guest state.
    pub const GUEST_ES_SELECTOR: Self = Self(0x0800);
    pub const GUEST_CS_SELECTOR: Self = Self(0x0802);
    pub const GUEST_SS_SELECTOR: Self = Self(0x0804);
    pub const GUEST_DS_SELECTOR: Self = Self(0x0806);
    pub const GUEST_FS_SELECTOR: Self = Self(0x0808);
    pub const GUEST_GS_SELECTOR: Self = Self(0x080a);
    pub const GUEST_LDTR_SELECTOR: Self = Self(0x080c);
    pub const GUEST_TR_SELECTOR: Self = Self(0x080e);
    // 16-bit host state.
    pub const HOST_ES_SELECTOR: Self = Self(0x0c00);
    pub const HOST_CS_SELECTOR: Self = Self(0x0c02);
    pub const HOST_SS_SELECTOR: Self = Self(0x0c04);
    pub const HOST_DS_SELECTOR: Self = Self(0x0c06);
    pub const HOST_FS_SELECTOR: Self = Self(0x0c08);
    pub const HOST_GS_SELECTOR: Self = Self(0x0c0a);
    pub const HOST_TR_SELECTOR: Self = Self(0x0c0c);
    // 64-bit control.
    pub const IO_BITMAP_A: Self = Self(0x2000);
    pub const IO_BITMAP_B: Self = Self(0x2002);
    pub const MSR_BITMAP: Self = Self(0x2004);
    pub const TSC_OFFSET: Self = Self(0x2010);
    pub const EPT_POINTER: Self = Self(0x201a);
    pub const XSS_EXITING_BITMAP: Self = Self(0x202c);
    // 64-bit read-only.
    pub const GUEST_PHYSICAL_ADDRESS: Self = Self(0x2400);
    // 64-bit guest state.
    pub const VMCS_LINK_POINTER: Self = Self(0x2800);
    pub const GUEST_IA32_DEBUGCTL: Self = Self(0x2802);
    pub const GUEST_IA32_PAT: Self = Self(0x2804);
    pub const GUEST_IA32_EFER: Self = Self(0x2806);
    pub const GUEST_PDPTE0: Self = Self(0x280a);
    pub const GUEST_PDPTE1: Self = Self(0x280c);
    pub const GUEST_PDPTE2: Self = Self(0x280e);
    pub const GUEST_PDPTE3: Self = Self(0x2810);
    // 64-bit host state.
    pub const HOST_IA32_PAT: Self = Self(0x2c00);
    pub const HOST_IA32_EFER: Self = Self(0x2c02);
    // 32-bit control.
    pub const PIN_BASED_CONTROLS: Self = Self(0x4000);
    pub const PROC_BASED_CONTROLS: Self = Self(0x4002);
    pub const EXCEPTION_BITMAP: Self = Self(0x4004);
    pub const CR3_TARGET_COUNT: Self = Self(0x400a);
    pub const EXIT_CONTROLS: Self = Self(0x400c);
    pub const EXIT_MSR_STORE_COUNT: Self = Self(0x400e);
    pub const EXIT_MSR_LOAD_COUNT: Self = Self(0x4010);
    pub const ENTRY_CONTROLS: Self = Self(0x4012);
    pub const ENTRY_MSR_LOAD_COUNT: Self = Self(0x4014);
    pub const ENTRY_INTERRUPTION_INFO: Self = Self(0x4016);
    pub const ENTRY_EXCEPTION_ERROR_CODE: Self = Self(0x4018);
    pub const ENTRY_INSTRUCTION_LENGTH: Self = Self(0x401a);
    pub const PROC_BASED_CONTROLS2: Self = Self(0x401e);
    // 32-bit read-only.
    pub const VM_INSTRUCTION_ERROR: Self = Self(0x4400);
    pub const EXIT_REASON: Self = Self(0x4402);
    pub const EXIT_INTERRUPTION_INFO: Self = Self(0x4404);
    pub const IDT_VECTORING_INFO: Self = Self(0x4408);
    pub const IDT_VECTORING_ERROR_CODE: Self = Self(0x440a);
    pub const EXIT_INSTRUCTION_LENGTH: Self = Self(0x440c);
    // 32-bit guest state.
    pub const GUEST_ES_LIMIT: Self = Self(0x4800);
    pub const GUEST_CS_LIMIT: Self = Self(0x4802);
    pub const GUEST_SS_LIMIT: Self = Self(0x4804);
    pub const GUEST_DS_LIMIT: Self = Self(0x4806);
    pub const GUEST_FS_LIMIT: Self = Self(0x4808);
    pub const GUEST_GS_LIMIT: Self = Self(0x480a);
    pub const GUEST_LDTR_LIMIT: Self = Self(0x480c);
    pub const GUEST_TR_LIMIT: Self = Self(0x480e);
    pub const GUEST_GDTR_LIMIT: Self = Self(0x4810);
    pub const GUEST_IDTR_LIMIT: Self = Self(0x4812);
    pub const GUEST_ES_AR: Self = Self(0x4814);
    pub const GUEST_CS_AR: Self = Self(0x4816);
    pub const GUEST_SS_AR: Self = Self(0x4818);
    pub const GUEST_DS_AR: Self = Self(0x481a);
    pub const GUEST_FS_AR: Self = Self(0x481c);
    pub const GUEST_GS_AR: Self = Self(0x481e);
    pub const GUEST_LDTR_AR: Self = Self(0x4820);
    pub const GUEST_TR_AR: Self = Self(0x4822);
    pub const GUEST_INTERRUPTIBILITY: Self = Self(0x4824);
    pub const GUEST_ACTIVITY_STATE: Self = Self(0x4826);
    pub const GUEST_SYSENTER_CS: Self = Self(0x482a);
    // 32-bit host state.
    pub const HOST_SYSENTER_CS: Self = Self(0x4c00);
    // Natural-width control.
    pub const CR0_GUEST_HOST_MASK: Self = Self(0x6000);
    pub const CR4_GUEST_HOST_MASK: Self = Self(0x6002);
    pub const CR0_READ_SHADOW: Self = Self(0x6004);
    pub const CR4_READ_SHADOW: Self = Self(0x6006);
    // Natural-width read-only.
    pub const EXIT_QUALIFICATION: Self = Self(0x6400);
    pub const GUEST_LINEAR_ADDRESS: Self = Self(0x640a);
    // Natural-width guest state.
    pub const GUEST_CR0: Self = Self(0x6800);
    pub const GUEST_CR3: Self = Self(0x6802);
    pub const GUEST_CR4: Self = Self(0x6804);
    pub const GUEST_ES_BASE: Self = Self(0x6806);
    pub const GUEST_CS_BASE: Self = Self(0x6808);
    pub const GUEST_SS_BASE: Self = Self(0x680a);
    pub const GUEST_DS_BASE: Self = Self(0x680c);
    pub const GUEST_FS_BASE: Self = Self(0x680e);
    pub const GUEST_GS_BASE: Self = Self(0x6810);
    pub const GUEST_LDTR_BASE: Self = Self(0x6812);
    pub const GUEST_TR_BASE: Self = Self(0x6814);
    pub const GUEST_GDTR_BASE: Self = Self(0x6816);
    pub const GUEST_IDTR_BASE: Self = Self(0x6818);
    pub const GUEST_DR7: Self = Self(0x681a);
    pub const GUEST_RSP: Self = Self(0x681c);
    pub const GUEST_RIP: Self = Self(0x681e);
    pub const GUEST_RFLAGS: Self = Self(0x6820);
    pub const GUEST_PENDING_DEBUG: Self = Self(0x6822);
    pub const GUEST_SYSENTER_ESP: Self = Self(0x6824);
    pub const GUEST_SYSENTER_EIP: Self = Self(0x6826);
    // Natural-width host state.
    pub const HOST_CR0: Self = Self(0x6c00);
    pub const HOST_CR3: Self = Self(0x6c02);
    pub const HOST_CR4: Self = Self(0x6c04);
    pub const HOST_FS_BASE: Self = Self(0x6c06);
    pub const HOST_GS_BASE: Self = Self(0x6c08);
    pub const HOST_TR_BASE: Self = Self(0x6c0a);
    pub const HOST_GDTR_BASE: Self = Self(0x6c0c);
    pub const HOST_IDTR_BASE: Self = Self(0x6c0e);
    pub const HOST_SYSENTER_ESP: Self = Self(0x6c10);
    pub const HOST_SYSENTER_EIP: Self = Self(0x6c12);
    pub const HOST_RSP: Self = Self(0x6c14);
    pub const HOST_RIP: Self = Self(0x6c16);

    /// The guest segment fields (selector, base, limit, access rights) of
    /// segment register `i` in the order ES, CS, SS, DS, FS, GS, LDTR, TR.
    pub const fn guest_segment(i: usize) -> [Self; 4] {
        #[allow(clippy::cast_possible_truncation, reason = "masked to 0..=7")]
        let i = (i & 7) as u32;
        [
            Self(0x0800 + 2 * i),
            Self(0x6806 + 2 * i),
            Self(0x4800 + 2 * i),
            Self(0x4814 + 2 * i),
        ]
    }

    /// Width from bits 14:13 of the encoding (SDM Appendix B).
    pub const fn width_bits(self) -> u32 {
        match (self.0 >> 13) & 3 {
            0 => 16,
            2 => 32,
            // 1: 64-bit; 3: natural width, 64 bits on x86-64.
            _ => 64,
        }
    }

    /// Every field this module names, in encoding order (to read a live
    /// VMCS back into an image).
    pub fn all() -> impl Iterator<Item = Self> {
        NAMES.iter().map(|&(e, _)| Self(e))
    }

    /// A name for logs.
    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(f, _)| *f == self.0)
            .map_or("unknown field", |(_, n)| n)
    }
}

const NAMES: &[(u32, &str)] = &[
    (0x0000, "VPID"),
    (0x0800, "GUEST_ES_SELECTOR"),
    (0x0802, "GUEST_CS_SELECTOR"),
    (0x0804, "GUEST_SS_SELECTOR"),
    (0x0806, "GUEST_DS_SELECTOR"),
    (0x0808, "GUEST_FS_SELECTOR"),
    (0x080a, "GUEST_GS_SELECTOR"),
    (0x080c, "GUEST_LDTR_SELECTOR"),
    (0x080e, "GUEST_TR_SELECTOR"),
    (0x0c00, "HOST_ES_SELECTOR"),
    (0x0c02, "HOST_CS_SELECTOR"),
    (0x0c04, "HOST_SS_SELECTOR"),
    (0x0c06, "HOST_DS_SELECTOR"),
    (0x0c08, "HOST_FS_SELECTOR"),
    (0x0c0a, "HOST_GS_SELECTOR"),
    (0x0c0c, "HOST_TR_SELECTOR"),
    (0x2000, "IO_BITMAP_A"),
    (0x2002, "IO_BITMAP_B"),
    (0x2004, "MSR_BITMAP"),
    (0x2010, "TSC_OFFSET"),
    (0x201a, "EPT_POINTER"),
    (0x202c, "XSS_EXITING_BITMAP"),
    (0x2400, "GUEST_PHYSICAL_ADDRESS"),
    (0x2800, "VMCS_LINK_POINTER"),
    (0x2802, "GUEST_IA32_DEBUGCTL"),
    (0x2804, "GUEST_IA32_PAT"),
    (0x2806, "GUEST_IA32_EFER"),
    (0x280a, "GUEST_PDPTE0"),
    (0x280c, "GUEST_PDPTE1"),
    (0x280e, "GUEST_PDPTE2"),
    (0x2810, "GUEST_PDPTE3"),
    (0x2c00, "HOST_IA32_PAT"),
    (0x2c02, "HOST_IA32_EFER"),
    (0x4000, "PIN_BASED_CONTROLS"),
    (0x4002, "PROC_BASED_CONTROLS"),
    (0x4004, "EXCEPTION_BITMAP"),
    (0x400a, "CR3_TARGET_COUNT"),
    (0x400c, "EXIT_CONTROLS"),
    (0x400e, "EXIT_MSR_STORE_COUNT"),
    (0x4010, "EXIT_MSR_LOAD_COUNT"),
    (0x4012, "ENTRY_CONTROLS"),
    (0x4014, "ENTRY_MSR_LOAD_COUNT"),
    (0x4016, "ENTRY_INTERRUPTION_INFO"),
    (0x4018, "ENTRY_EXCEPTION_ERROR_CODE"),
    (0x401a, "ENTRY_INSTRUCTION_LENGTH"),
    (0x401e, "PROC_BASED_CONTROLS2"),
    (0x4400, "VM_INSTRUCTION_ERROR"),
    (0x4402, "EXIT_REASON"),
    (0x4404, "EXIT_INTERRUPTION_INFO"),
    (0x4408, "IDT_VECTORING_INFO"),
    (0x440a, "IDT_VECTORING_ERROR_CODE"),
    (0x440c, "EXIT_INSTRUCTION_LENGTH"),
    (0x4800, "GUEST_ES_LIMIT"),
    (0x4802, "GUEST_CS_LIMIT"),
    (0x4804, "GUEST_SS_LIMIT"),
    (0x4806, "GUEST_DS_LIMIT"),
    (0x4808, "GUEST_FS_LIMIT"),
    (0x480a, "GUEST_GS_LIMIT"),
    (0x480c, "GUEST_LDTR_LIMIT"),
    (0x480e, "GUEST_TR_LIMIT"),
    (0x4810, "GUEST_GDTR_LIMIT"),
    (0x4812, "GUEST_IDTR_LIMIT"),
    (0x4814, "GUEST_ES_AR"),
    (0x4816, "GUEST_CS_AR"),
    (0x4818, "GUEST_SS_AR"),
    (0x481a, "GUEST_DS_AR"),
    (0x481c, "GUEST_FS_AR"),
    (0x481e, "GUEST_GS_AR"),
    (0x4820, "GUEST_LDTR_AR"),
    (0x4822, "GUEST_TR_AR"),
    (0x4824, "GUEST_INTERRUPTIBILITY"),
    (0x4826, "GUEST_ACTIVITY_STATE"),
    (0x482a, "GUEST_SYSENTER_CS"),
    (0x4c00, "HOST_SYSENTER_CS"),
    (0x6000, "CR0_GUEST_HOST_MASK"),
    (0x6002, "CR4_GUEST_HOST_MASK"),
    (0x6004, "CR0_READ_SHADOW"),
    (0x6006, "CR4_READ_SHADOW"),
    (0x6400, "EXIT_QUALIFICATION"),
    (0x640a, "GUEST_LINEAR_ADDRESS"),
    (0x6800, "GUEST_CR0"),
    (0x6802, "GUEST_CR3"),
    (0x6804, "GUEST_CR4"),
    (0x6806, "GUEST_ES_BASE"),
    (0x6808, "GUEST_CS_BASE"),
    (0x680a, "GUEST_SS_BASE"),
    (0x680c, "GUEST_DS_BASE"),
    (0x680e, "GUEST_FS_BASE"),
    (0x6810, "GUEST_GS_BASE"),
    (0x6812, "GUEST_LDTR_BASE"),
    (0x6814, "GUEST_TR_BASE"),
    (0x6816, "GUEST_GDTR_BASE"),
    (0x6818, "GUEST_IDTR_BASE"),
    (0x681a, "GUEST_DR7"),
    (0x681c, "GUEST_RSP"),
    (0x681e, "GUEST_RIP"),
    (0x6820, "GUEST_RFLAGS"),
    (0x6822, "GUEST_PENDING_DEBUG"),
    (0x6824, "GUEST_SYSENTER_ESP"),
    (0x6826, "GUEST_SYSENTER_EIP"),
    (0x6c00, "HOST_CR0"),
    (0x6c02, "HOST_CR3"),
    (0x6c04, "HOST_CR4"),
    (0x6c06, "HOST_FS_BASE"),
    (0x6c08, "HOST_GS_BASE"),
    (0x6c0a, "HOST_TR_BASE"),
    (0x6c0c, "HOST_GDTR_BASE"),
    (0x6c0e, "HOST_IDTR_BASE"),
    (0x6c10, "HOST_SYSENTER_ESP"),
    (0x6c12, "HOST_SYSENTER_EIP"),
    (0x6c14, "HOST_RSP"),
    (0x6c16, "HOST_RIP"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_field_groups_follow_appendix_b() {
        assert_eq!(
            Field::guest_segment(1),
            [
                Field::GUEST_CS_SELECTOR,
                Field::GUEST_CS_BASE,
                Field::GUEST_CS_LIMIT,
                Field::GUEST_CS_AR
            ]
        );
        assert_eq!(
            Field::guest_segment(7),
            [
                Field::GUEST_TR_SELECTOR,
                Field::GUEST_TR_BASE,
                Field::GUEST_TR_LIMIT,
                Field::GUEST_TR_AR
            ]
        );
        assert_eq!(Field::GUEST_CR0.width_bits(), 64);
        assert_eq!(Field::GUEST_CS_AR.width_bits(), 32);
        assert_eq!(Field::VPID.width_bits(), 16);
        assert_eq!(Field::EPT_POINTER.width_bits(), 64);
        assert_eq!(Field::GUEST_RIP.name(), "GUEST_RIP");
    }
}
