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
    /// The VMX MSRs, when VMX is reported.
    pub vmx: Option<VmxProbe>,
}

/// What the loader reads of VMX (SDM Vol. 3C Appendix A).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxProbe {
    /// IA32_FEATURE_CONTROL.
    pub feature_control: u64,
    /// Allowed-1 settings of the primary processor-based controls.
    pub proc1_allowed1: u32,
    /// Allowed-1 settings of the secondary controls (0 without them).
    pub proc2_allowed1: u32,
    /// IA32_VMX_EPT_VPID_CAP (0 without EPT/VPID).
    pub ept_vpid: u64,
    /// IA32_VMX_MISC.
    pub misc: u64,
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
    /// No VMX in CPUID.
    NoVmx,
    /// VMX disabled by firmware and locked (IA32_FEATURE_CONTROL).
    VmxDisabledLocked,
    /// VMX without EPT and unrestricted guest.
    NoEpt,
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
            Self::NoVmx => {
                "the processor does not report Intel VT-x (VMX); it may be disabled in firmware setup, or absent"
            }
            Self::VmxDisabledLocked => {
                "VT-x is disabled in firmware setup; enable Intel Virtualization Technology (VT-x), then power the machine off and on (a reboot may not be enough)"
            }
            Self::NoEpt => {
                "the processor has VT-x but not EPT with unrestricted guest, which thinhv requires"
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
        b"GenuineIntel" => return assess_vmx(p),
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

const FC_LOCK: u64 = 1 << 0;
const FC_VMX_OUTSIDE_SMX: u64 = 1 << 2;
const PROC1_SECONDARY: u32 = 1 << 31;
const PROC2_EPT: u32 = 1 << 1;
const PROC2_UNRESTRICTED: u32 = 1 << 7;
const EPT_WALK4: u64 = 1 << 6;
const EPT_WB: u64 = 1 << 14;
const EPT_INVEPT: u64 = 1 << 20;

fn common_features(p: &Probe) -> Result<u32, Unavailable> {
    if p.ext1_edx & (1 << 20) == 0 {
        return Err(Unavailable::NoNx);
    }
    let mut f = features::NX;
    if p.ext1_edx & (1 << 26) != 0 {
        f |= features::PAGE_1G;
    }
    if p.leaf1_ecx & (1 << 21) != 0 {
        f |= features::X2APIC;
    }
    Ok(f)
}

fn phys_bits(p: &Probe) -> u32 {
    let bits = if p.max_ext_leaf >= 0x8000_0008 {
        p.ext8_eax & 0xff
    } else {
        36
    };
    bits.clamp(32, 52)
}

/// Intel: VMX, not locked off, EPT (4-level, write-back) with unrestricted
/// guest and INVEPT. (Without the wait-for-SIPI activity state the core
/// starts APs by intercepting the ICR.)
fn assess_vmx(p: &Probe) -> Result<Caps, Unavailable> {
    let Some(v) = p.vmx.filter(|_| p.leaf1_ecx & (1 << 5) != 0) else {
        return Err(Unavailable::NoVmx);
    };
    if v.feature_control & FC_LOCK != 0 && v.feature_control & FC_VMX_OUTSIDE_SMX == 0 {
        return Err(Unavailable::VmxDisabledLocked);
    }
    let has2 = v.proc1_allowed1 & PROC1_SECONDARY != 0;
    let needed2 = PROC2_EPT | PROC2_UNRESTRICTED;
    if !has2 || v.proc2_allowed1 & needed2 != needed2 {
        return Err(Unavailable::NoEpt);
    }
    let needed_ept = EPT_WALK4 | EPT_WB | EPT_INVEPT;
    if v.ept_vpid & needed_ept != needed_ept {
        return Err(Unavailable::NoEpt);
    }
    Ok(Caps {
        features: common_features(p)?,
        phys_addr_bits: phys_bits(p),
        vendor: thinhv_abi::hypercall::VENDOR_INTEL_VMX,
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
            vmx: None,
        }
    }

    /// What Bochs' `tigerlake` model reports to the loader (the VMX values
    /// as the core logs them; IA32_FEATURE_CONTROL as firmware leaves it,
    /// locked with VMX outside SMX).
    fn bochs_intel() -> Probe {
        Probe {
            vendor: *b"GenuineIntel",
            max_ext_leaf: 0x8000_0008,
            leaf1_ecx: 1 << 5,
            ext1_ecx: 0,
            ext1_edx: (1 << 20) | (1 << 26),
            ext8_eax: 0x3027,
            vmx: Some(VmxProbe {
                feature_control: 0x5,
                proc1_allowed1: 0xfff9_fffe,
                proc2_allowed1: 0x0297_7fff,
                ept_vpid: 0x0000_0f01_06b3_4141,
                misc: 0x6004_01e0,
            }),
            ..Probe::default()
        }
    }

    #[test]
    fn intel_vmx_is_accepted_and_refusals_are_explained() {
        let c = assess(&bochs_intel()).unwrap();
        assert_eq!(c.vendor, thinhv_abi::hypercall::VENDOR_INTEL_VMX);
        assert_eq!(
            c.phys_addr_bits, 39,
            "from CPUID 0x8000_0008 of the fixture"
        );
        let mut p = bochs_intel();
        p.vmx.as_mut().unwrap().feature_control = 0x1;
        assert_eq!(assess(&p), Err(Unavailable::VmxDisabledLocked));
        let m = Unavailable::VmxDisabledLocked.message();
        assert!(
            m.contains("enable Intel Virtualization Technology")
                && m.contains("power the machine off and on"),
            "{m}"
        );
        // Unlocked without the VMX bit: the core sets and locks it.
        p.vmx.as_mut().unwrap().feature_control = 0;
        assert!(assess(&p).is_ok());
        let mut p = bochs_intel();
        p.vmx.as_mut().unwrap().proc2_allowed1 &= !(1 << 7);
        assert_eq!(assess(&p), Err(Unavailable::NoEpt));
        let mut p = bochs_intel();
        p.vmx.as_mut().unwrap().ept_vpid &= !(1 << 14);
        assert_eq!(assess(&p), Err(Unavailable::NoEpt));
        let mut p = bochs_intel();
        p.vmx.as_mut().unwrap().misc = 0;
        assert!(
            assess(&p).is_ok(),
            "no wait-for-SIPI: APs start by interception"
        );
        let mut p = bochs_intel();
        p.leaf1_ecx = 0;
        assert_eq!(assess(&p), Err(Unavailable::NoVmx));
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
        assert_eq!(assess(&p), Err(Unavailable::NoVmx));
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
