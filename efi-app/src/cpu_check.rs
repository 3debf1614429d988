//! Can this processor run thinhv? Decided from raw CPUID leaves and MSR
//! values, with messages a server admin can act on.
//!
//! AMD: CPUID 0x8000_0001 ECX[2] (SVM), 0x8000_000A EDX[0] (nested paging),
//! EDX[3] NRIP save, EDX[7] decode assists, EDX[6] flush by ASID; VM_CR
//! (C001_0114h) bit 4 SVMDIS, bit 3 LOCK (AMD APM Vol. 2 §15.4 "Enabling
//! SVM", §15.30.1). Common: 0x8000_0001 EDX[20] NX, EDX[26] 1 GiB pages,
//! 0x8000_0008 EAX[7:0] physical address width.
use thinhv_abi::handoff::features;

/// The CPUID and MSR values the decision needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    /// Leaf 0: EBX, EDX, ECX spell the vendor.
    pub vendor: [u8; 12],
    /// Leaf 0x8000_0000 EAX.
    pub max_ext_leaf: u32,
    /// Leaf 1 ECX.
    pub leaf1_ecx: u32,
    /// Leaf 0x8000_0001 ECX.
    pub ext1_ecx: u32,
    /// Leaf 0x8000_0001 EDX.
    pub ext1_edx: u32,
    /// Leaf 0x8000_0008 EAX.
    pub ext8_eax: u32,
    /// Leaf 0x8000_000A EDX (SVM features).
    pub svm_edx: u32,
    /// Leaf 0x8000_000A EBX (number of ASIDs).
    pub svm_asids: u32,
    /// VM_CR, when SVM is reported (the MSR exists only then).
    pub vm_cr: Option<u64>,
}

/// What the processor offers, when it can run thinhv.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// `thinhv_abi::handoff::features` bits.
    pub features: u32,
    /// Physical address width.
    pub phys_addr_bits: u32,
    /// `VENDOR_AMD_SVM` or `VENDOR_INTEL_VMX`.
    pub vendor: u32,
}

/// Why not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// Neither AMD nor Intel.
    UnknownVendor,
    /// Intel processor: the VMX backend is not part of this build yet.
    IntelNotSupported,
    /// No SVM in CPUID.
    NoSvm,
    /// SVM disabled by firmware, and locked.
    SvmDisabledLocked,
    /// SVM disabled by firmware (not locked: still, the firmware chose so).
    SvmDisabled,
    /// No nested paging.
    NoNestedPaging,
    /// No NX (the nested tables need it to protect the hypervisor from
    /// execution).
    NoNx,
}

impl Unavailable {
    /// The message shown on the console.
    pub const fn message(self) -> &'static str {
        match self {
            Self::UnknownVendor => {
                "this processor is neither AMD nor Intel; thinhv supports AMD-V (SVM) and Intel VT-x"
            }
            Self::IntelNotSupported => {
                "this is an Intel processor; this build of thinhv runs on AMD-V (SVM) processors only"
            }
            Self::NoSvm => {
                "the processor does not report AMD-V (SVM); it may be disabled in firmware setup, or absent"
            }
            Self::SvmDisabledLocked => {
                "SVM is disabled in firmware setup; enable AMD-V (\"SVM Mode\") and power-cycle"
            }
            Self::SvmDisabled => {
                "SVM is disabled by the firmware (VM_CR.SVMDIS); enable AMD-V (\"SVM Mode\") in firmware setup and power-cycle"
            }
            Self::NoNestedPaging => {
                "the processor has SVM but no nested paging (NPT/RVI), which thinhv requires"
            }
            Self::NoNx => "the processor has no NX (no-execute) support, which thinhv requires",
        }
    }
}

const VM_CR_LOCK: u64 = 1 << 3;
const VM_CR_SVMDIS: u64 = 1 << 4;

/// Decides.
pub fn assess(p: &Probe) -> Result<Caps, Unavailable> {
    match &p.vendor {
        b"AuthenticAMD" | b"HygonGenuine" => {}
        b"GenuineIntel" => return Err(Unavailable::IntelNotSupported),
        _ => return Err(Unavailable::UnknownVendor),
    }
    if p.max_ext_leaf < 0x8000_000a || p.ext1_ecx & (1 << 2) == 0 {
        return Err(Unavailable::NoSvm);
    }
    if let Some(vm_cr) = p.vm_cr
        && vm_cr & VM_CR_SVMDIS != 0
    {
        return Err(if vm_cr & VM_CR_LOCK != 0 {
            Unavailable::SvmDisabledLocked
        } else {
            Unavailable::SvmDisabled
        });
    }
    if p.svm_edx & 1 == 0 {
        return Err(Unavailable::NoNestedPaging);
    }
    if p.ext1_edx & (1 << 20) == 0 {
        return Err(Unavailable::NoNx);
    }
    let mut f = features::NX;
    if p.ext1_edx & (1 << 26) != 0 {
        f |= features::PAGE_1G;
    }
    if p.svm_edx & (1 << 3) != 0 {
        f |= features::NRIP_SAVE;
    }
    if p.svm_edx & (1 << 7) != 0 {
        f |= features::DECODE_ASSISTS;
    }
    if p.svm_edx & (1 << 6) != 0 {
        f |= features::FLUSH_BY_ASID;
    }
    if p.leaf1_ecx & (1 << 21) != 0 {
        f |= features::X2APIC;
    }
    let bits = if p.max_ext_leaf >= 0x8000_0008 {
        p.ext8_eax & 0xff
    } else {
        36
    };
    Ok(Caps {
        features: f,
        phys_addr_bits: bits.clamp(32, 52),
        vendor: thinhv_abi::hypercall::VENDOR_AMD_SVM,
    })
}

/// Names the features, for the boot log.
pub fn describe(f: u32) -> alloc::string::String {
    let mut s = alloc::string::String::new();
    for (bit, name) in [
        (features::NRIP_SAVE, "nrip-save"),
        (features::DECODE_ASSISTS, "decode-assists"),
        (features::PAGE_1G, "1g-pages"),
        (features::NX, "nx"),
        (features::FLUSH_BY_ASID, "flush-by-asid"),
        (features::X2APIC, "x2apic"),
    ] {
        if f & bit != 0 {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(name);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What QEMU's `-cpu max` (TCG) reports: SVM and NPT, no NRIP save.
    fn qemu_max() -> Probe {
        Probe {
            vendor: *b"AuthenticAMD",
            max_ext_leaf: 0x8000_0022,
            leaf1_ecx: 1 << 21,
            ext1_ecx: (1 << 2) | 0x1,
            ext1_edx: (1 << 20) | (1 << 26) | (1 << 29),
            ext8_eax: 0x3028,
            svm_edx: 0x1,
            svm_asids: 16,
            vm_cr: Some(0),
        }
    }

    #[test]
    fn qemu_tcg_amd_is_accepted() {
        let c = assess(&qemu_max()).unwrap();
        assert_eq!(c.phys_addr_bits, 40);
        assert_ne!(c.features & features::PAGE_1G, 0);
        assert_eq!(c.features & features::NRIP_SAVE, 0);
        assert_eq!(describe(c.features), "1g-pages nx x2apic");
    }

    #[test]
    fn every_refusal_has_its_reason() {
        let mut p = qemu_max();
        p.ext1_ecx = 0;
        assert_eq!(assess(&p), Err(Unavailable::NoSvm));
        let mut p = qemu_max();
        p.vm_cr = Some(VM_CR_SVMDIS | VM_CR_LOCK);
        assert_eq!(assess(&p), Err(Unavailable::SvmDisabledLocked));
        assert!(
            Unavailable::SvmDisabledLocked
                .message()
                .contains("enable AMD-V")
        );
        assert!(
            Unavailable::SvmDisabledLocked
                .message()
                .contains("power-cycle")
        );
        let mut p = qemu_max();
        p.vm_cr = Some(VM_CR_SVMDIS);
        assert_eq!(assess(&p), Err(Unavailable::SvmDisabled));
        let mut p = qemu_max();
        p.svm_edx = 0;
        assert_eq!(assess(&p), Err(Unavailable::NoNestedPaging));
        let mut p = qemu_max();
        p.ext1_edx = 0;
        assert_eq!(assess(&p), Err(Unavailable::NoNx));
        let mut p = qemu_max();
        p.vendor = *b"GenuineIntel";
        assert_eq!(assess(&p), Err(Unavailable::IntelNotSupported));
        let mut p = qemu_max();
        p.vendor = *b"VIA VIA VIA ";
        assert_eq!(assess(&p), Err(Unavailable::UnknownVendor));
        let mut p = qemu_max();
        p.max_ext_leaf = 0x8000_0008;
        assert_eq!(assess(&p), Err(Unavailable::NoSvm));
    }

    #[test]
    fn server_features_are_reported() {
        let mut p = qemu_max();
        p.svm_edx = 0x1 | (1 << 3) | (1 << 6) | (1 << 7);
        let c = assess(&p).unwrap();
        assert_eq!(
            c.features & (features::NRIP_SAVE | features::FLUSH_BY_ASID | features::DECODE_ASSISTS),
            features::NRIP_SAVE | features::FLUSH_BY_ASID | features::DECODE_ASSISTS
        );
    }
}
