//! The MSR policy: one table saying, for each MSR that can change how the
//! host itself runs, what a guest read or write does on each backend, and
//! why (the manual section). The backends build their intercept maps (SVM
//! MSRPM, VMX MSR bitmap) from it with [`intercepts`], and the MSR exit
//! handler ([`super::msr`]) dispatches on it with [`lookup`], so the two
//! can never disagree.
//!
//! References: AMD APM Vol. 2 rev. 3.42 (§3.1.7 EFER, §7.8 MTRRs, §7.8.1
//! MtrrFixDramEn/ModEn in SYSCFG, §7.9 IORRs and TOP_MEM, §7.8.2 PAT,
//! §15.30 SVM MSRs, §16.3.1 APIC base); Intel SDM Vol. 3A (§12.11 MTRRs,
//! §13.12 PAT, §12.4.4 / §12.12 IA32_APIC_BASE and x2APIC transitions),
//! Vol. 4 (MSR list); AMD PPR for family 17h (MSRC001_0015 HWCR,
//! MSRC001_0010 SYSCFG, MSRC001_0058 MMIO configuration base).
//!
//! Every MSR that exits but is not in the table (on SVM the MSRs outside
//! the MSRPM's three ranges, on VMX those outside the bitmap's two) raises
//! #GP, as a processor without that MSR would.
use thinhv_abi::hypercall::VENDOR_INTEL_VMX;

/// What thinhv does with one kind of access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Not intercepted: the processor executes it for the guest.
    Native,
    /// #GP(0), as a processor without the MSR (or one refusing the value).
    Refuse,
    /// A write that changes nothing is accepted (firmware and OSes rewrite
    /// what they read); any change raises #GP and is logged.
    RefuseChange,
    /// EFER: SVME hidden; reserved and unsupported bits raise #GP.
    Efer,
    /// IA32_FEATURE_CONTROL (VMX): read as locked with VMX off.
    FeatureControl,
    /// The x2APIC ICR: INIT/SIPI virtualized, everything else forwarded.
    X2apicIcr,
    /// x2APIC LVT LINT0/LINT1: an appliance's kept masked
    /// (`crate::apic::lint_value`), the OS's forwarded.
    X2apicLint,
    /// IA32_APIC_BASE: reads show the guest's own base; writes checked,
    /// mode changes forwarded, relocation emulated (the hardware's base
    /// never moves: `super::apic_reloc`).
    ApicBase,
    /// IA32_PAT: each entry a valid memory type, else #GP.
    Pat,
    /// MTRRs: emulated per CPU (the hardware keeps the firmware's values).
    Mtrr,
    /// AMD HWCR: only the benign bits may change.
    Hwcr,
    /// AMD SYSCFG: only clearing MtrrFixDramModEn.
    Syscfg,
}

/// One entry: an MSR range, its rules per backend, and the reason.
#[derive(Clone, Copy, Debug)]
pub struct MsrRule {
    /// First MSR.
    pub first: u32,
    /// Last MSR (inclusive).
    pub last: u32,
    /// Name, for logs.
    pub name: &'static str,
    /// (read, write) on SVM.
    pub svm: (Rule, Rule),
    /// (read, write) on VMX.
    pub vmx: (Rule, Rule),
    /// Why, with the manual section.
    pub why: &'static str,
}

const N: Rule = Rule::Native;

/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_FEATURE_CONTROL.
pub const MSR_FEATURE_CONTROL: u32 = 0x3a;
/// IA32_MTRR_PHYSBASE0.
pub const MSR_MTRR_VAR_FIRST: u32 = 0x200;
/// Highest variable MTRR MSR thinhv emulates (16 pairs).
pub const MSR_MTRR_VAR_LAST: u32 = 0x21f;
/// Variable-range pairs the emulation holds.
pub const MTRR_VAR_MAX: usize = 16;
/// IA32_PAT.
pub const MSR_PAT: u32 = 0x277;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// The fixed-range MTRRs in address order (SDM Vol. 3A Table 12-9).
pub const MTRR_FIXED: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];
/// EFER.
pub const MSR_EFER: u32 = 0xc000_0080;
/// AMD SYSCFG.
pub const MSR_SYSCFG: u32 = 0xc001_0010;
/// AMD HWCR.
pub const MSR_HWCR: u32 = 0xc001_0015;
/// AMD VM_CR.
pub const MSR_VM_CR: u32 = 0xc001_0114;
/// AMD VM_HSAVE_PA.
pub const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;

/// The policy. Order does not matter; ranges do not overlap (tested).
pub const POLICY: &[MsrRule] = &[
    MsrRule {
        first: MSR_APIC_BASE,
        last: MSR_APIC_BASE,
        name: "IA32_APIC_BASE",
        svm: (Rule::ApicBase, Rule::ApicBase),
        vmx: (Rule::ApicBase, Rule::ApicBase),
        why: "APM Vol. 2 §16.3.1, SDM Vol. 3A §12.4.4/§12.4.5/§12.12.5: moving the xAPIC \
              page in the hardware would move it out from under thinhv's ICR trap; the \
              relocation is emulated per CPU and reads return the guest's base",
    },
    MsrRule {
        first: MSR_FEATURE_CONTROL,
        last: MSR_FEATURE_CONTROL,
        name: "IA32_FEATURE_CONTROL",
        svm: (N, N),
        vmx: (Rule::FeatureControl, Rule::Refuse),
        why: "SDM Vol. 3C §24.7: the guest sees VMX locked off; writes to a locked MSR #GP",
    },
    MsrRule {
        first: 0x480,
        last: 0x493,
        name: "IA32_VMX_* capabilities",
        svm: (N, N),
        vmx: (Rule::Refuse, Rule::Refuse),
        why: "SDM Vol. 4 Table 2-2: absent on a processor without VMX",
    },
    MsrRule {
        first: MSR_MTRR_VAR_FIRST,
        last: MSR_MTRR_VAR_LAST,
        name: "IA32_MTRR_PHYSBASE/PHYSMASK",
        svm: (Rule::Mtrr, Rule::Mtrr),
        vmx: (Rule::Mtrr, Rule::Mtrr),
        why: "SDM Vol. 3A §12.11.2.3, APM Vol. 2 §7.8: MTRRs also govern the host's own \
              accesses; emulated per CPU, the hardware keeps the firmware's values",
    },
    MsrRule {
        first: 0x250,
        last: 0x250,
        name: "IA32_MTRR_FIX64K_00000",
        svm: (Rule::Mtrr, Rule::Mtrr),
        vmx: (Rule::Mtrr, Rule::Mtrr),
        why: "SDM Vol. 3A §12.11.2.2: as the variable MTRRs",
    },
    MsrRule {
        first: 0x258,
        last: 0x259,
        name: "IA32_MTRR_FIX16K_*",
        svm: (Rule::Mtrr, Rule::Mtrr),
        vmx: (Rule::Mtrr, Rule::Mtrr),
        why: "SDM Vol. 3A §12.11.2.2: as the variable MTRRs",
    },
    MsrRule {
        first: 0x268,
        last: 0x26f,
        name: "IA32_MTRR_FIX4K_*",
        svm: (Rule::Mtrr, Rule::Mtrr),
        vmx: (Rule::Mtrr, Rule::Mtrr),
        why: "SDM Vol. 3A §12.11.2.2: as the variable MTRRs",
    },
    MsrRule {
        first: MSR_PAT,
        last: MSR_PAT,
        name: "IA32_PAT",
        svm: (N, Rule::Pat),
        vmx: (N, N),
        why: "APM Vol. 2 §7.8.2 and §15.25.8: a reserved type must #GP; VMRUN's G_PAT \
              consistency check must never fail (VMX: the processor checks it in the guest)",
    },
    MsrRule {
        first: MSR_MTRR_DEF_TYPE,
        last: MSR_MTRR_DEF_TYPE,
        name: "IA32_MTRR_DEF_TYPE",
        svm: (Rule::Mtrr, Rule::Mtrr),
        vmx: (Rule::Mtrr, Rule::Mtrr),
        why: "SDM Vol. 3A §12.11.2.1: as the variable MTRRs",
    },
    MsrRule {
        first: MSR_EFER,
        last: MSR_EFER,
        name: "EFER",
        svm: (Rule::Efer, Rule::Efer),
        vmx: (N, N),
        why: "APM Vol. 2 §3.1.7, §15.5.1: SVME is thinhv's; a reserved bit must #GP, never \
              reach VMRUN's consistency checks (VMX: VM entry loads the guest's own EFER)",
    },
    MsrRule {
        first: MSR_SYSCFG,
        last: MSR_SYSCFG,
        name: "SYSCFG",
        svm: (N, Rule::Syscfg),
        vmx: (N, N),
        why: "APM Vol. 2 §7.8.1, §7.9.1: memory-type and TOM2 decoding of all memory, the \
              host's included",
    },
    MsrRule {
        first: MSR_HWCR,
        last: MSR_HWCR,
        name: "HWCR",
        svm: (N, Rule::Hwcr),
        vmx: (N, N),
        why: "PPR MSRC001_0015: INVDWBINVD, SmmLock and cache controls act on the host too",
    },
    MsrRule {
        first: 0xc001_0016,
        last: 0xc001_0019,
        name: "IORR_BASE/MASK",
        svm: (N, Rule::RefuseChange),
        vmx: (N, N),
        why: "APM Vol. 2 §7.9.1: IORRs redirect memory reads/writes to I/O for everyone",
    },
    MsrRule {
        first: 0xc001_001a,
        last: 0xc001_001a,
        name: "TOP_MEM",
        svm: (N, Rule::RefuseChange),
        vmx: (N, N),
        why: "APM Vol. 2 §7.9.2: moves the DRAM/MMIO boundary under the host",
    },
    MsrRule {
        first: 0xc001_001d,
        last: 0xc001_001d,
        name: "TOP_MEM2",
        svm: (N, Rule::RefuseChange),
        vmx: (N, N),
        why: "APM Vol. 2 §7.9.2: moves the DRAM/MMIO boundary above 4 GiB under the host",
    },
    MsrRule {
        first: 0xc001_001f,
        last: 0xc001_001f,
        name: "NB_CFG",
        svm: (N, Rule::RefuseChange),
        vmx: (N, N),
        why: "BKDG family 10h/15h D18F3x8C and MSRC001_001F: EnableCf8ExtCfg changes how \
              0xCF8 addresses configuration space (thinhv mediates it)",
    },
    MsrRule {
        first: 0xc001_0058,
        last: 0xc001_0058,
        name: "MMIO_CFG_BASE",
        svm: (N, Rule::RefuseChange),
        vmx: (N, N),
        why: "PPR MSRC001_0058: moves the ECAM window away from thinhv's mediation",
    },
    MsrRule {
        first: 0xc001_0112,
        last: 0xc001_0113,
        name: "SMM_ADDR/SMM_MASK",
        svm: (N, Rule::RefuseChange),
        vmx: (N, N),
        why: "APM Vol. 2 §10.2.5: TSEG placement; only firmware sets it",
    },
    MsrRule {
        first: MSR_VM_CR,
        last: MSR_VM_CR,
        name: "VM_CR",
        svm: (Rule::Refuse, Rule::Refuse),
        vmx: (Rule::Refuse, Rule::Refuse),
        why: "APM Vol. 2 §15.30.1: thinhv's; absent for a guest without SVM",
    },
    MsrRule {
        first: MSR_VM_HSAVE_PA,
        last: MSR_VM_HSAVE_PA,
        name: "VM_HSAVE_PA",
        svm: (Rule::Refuse, Rule::Refuse),
        vmx: (Rule::Refuse, Rule::Refuse),
        why: "APM Vol. 2 §15.30.4: thinhv's host save area; absent for a guest without SVM",
    },
    MsrRule {
        first: 0x830,
        last: 0x830,
        name: "x2APIC ICR",
        svm: (N, Rule::X2apicIcr),
        vmx: (N, Rule::X2apicIcr),
        why: "SDM Vol. 3A §12.12.9: INIT/SIPI to CPUs under thinhv are virtualized",
    },
    MsrRule {
        first: 0x835,
        last: 0x836,
        name: "x2APIC LVT LINT0/LINT1",
        svm: (N, Rule::X2apicLint),
        vmx: (N, Rule::X2apicLint),
        why: "SDM Vol. 3A §11.5.1: the pins carry the platform's 8259 INTR and NMI, which the \
              OS controls; an appliance's stay masked",
    },
];

/// The table entry covering `msr`.
pub fn entry(msr: u32) -> Option<&'static MsrRule> {
    POLICY.iter().find(|r| (r.first..=r.last).contains(&msr))
}

/// (read, write) rules for `msr` on the backend of `vendor`. MSRs outside
/// the table are native where the intercept map covers them (they never
/// exit) and refused where it does not (they always exit).
pub fn lookup(vendor: u32, msr: u32) -> (Rule, Rule) {
    match entry(msr) {
        Some(r) if vendor == VENDOR_INTEL_VMX => r.vmx,
        Some(r) => r.svm,
        None => (Rule::Refuse, Rule::Refuse),
    }
}

/// Every MSR that must exit on the backend of `vendor`, as (msr, read,
/// write). `has_mtrr` (CPUID.1:EDX.MTRR) leaves the MTRRs native (a #GP
/// from the processor itself) when the processor has none.
pub fn intercepts(vendor: u32, has_mtrr: bool) -> impl Iterator<Item = (u32, bool, bool)> {
    POLICY
        .iter()
        .filter(move |r| has_mtrr || r.svm.0 != Rule::Mtrr)
        .flat_map(move |r| {
            let (read, write) = if vendor == VENDOR_INTEL_VMX {
                r.vmx
            } else {
                r.svm
            };
            (r.first..=r.last).map(move |m| (m, read != Rule::Native, write != Rule::Native))
        })
        .filter(|&(_, r, w)| r || w)
}

// ---- Value checks: pure functions of the value and the processor ------

/// An MSR write this policy has checked. Only this module makes one (the
/// fields are private), so the environment that performs it
/// ([`crate::env::Env::write_msr`]) needs no further proof that the write
/// is harmless to the host: that is the point of the type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckedWrite {
    msr: u32,
    value: u64,
}

impl CheckedWrite {
    /// The MSR.
    pub const fn msr(&self) -> u32 {
        self.msr
    }

    /// The value.
    pub const fn value(&self) -> u64 {
        self.value
    }

    /// HWCR: only [`hwcr::GUEST_MAY_CHANGE`] bits differ from `current`.
    pub fn hwcr(current: u64, value: u64) -> Option<Self> {
        hwcr_write_ok(current, value).then_some(Self {
            msr: MSR_HWCR,
            value,
        })
    }

    /// x2APIC LVT LINT0/LINT1 (0x835/0x836): the writable bits only
    /// (None: #GP, as the processor would), masked for an appliance.
    pub fn x2apic_lint(msr: u32, value: u64, appliance: bool) -> Option<Self> {
        if !(0x835..=0x836).contains(&msr) || value & !crate::apic::LVT_LINT_WRITABLE != 0 {
            return None;
        }
        let value = u32::try_from(value).ok()?;
        Some(Self {
            msr,
            value: u64::from(crate::apic::lint_value(value, appliance)),
        })
    }

    /// SYSCFG: unchanged, or only MtrrFixDramModEn cleared.
    pub fn syscfg(current: u64, value: u64) -> Option<Self> {
        syscfg_write_ok(current, value).then_some(Self {
            msr: MSR_SYSCFG,
            value,
        })
    }

    /// IA32_APIC_BASE with the relocation emulated: `hw` is the
    /// processor's value, `guest_base` the base the guest set last (what
    /// it reads back), `value` what it writes now. None: #GP, as the
    /// processor would (reserved bits, an invalid mode transition, x2APIC
    /// without the feature). Otherwise where the guest's xAPIC page is
    /// afterwards, and what reaches the processor: the mode bits (EN,
    /// EXTD) only, its own base and BSP flag kept. A new base never
    /// reaches the hardware.
    pub fn apic_base(
        hw: u64,
        guest_base: u64,
        value: u64,
        phys_bits: u32,
        x2apic: bool,
    ) -> Option<ApicBaseUpdate> {
        let view = (hw & !apic_base::BASE) | guest_base;
        if apic_base_write(view, value, phys_bits, x2apic) == ApicBaseWrite::Invalid {
            return None;
        }
        let mode = apic_base::EN | apic_base::EXTD;
        let to_hw = (hw & !mode) | (value & mode);
        Some(ApicBaseUpdate {
            hardware: (to_hw != hw).then_some(Self {
                msr: MSR_APIC_BASE,
                value: to_hw,
            }),
            base: value & apic_base::BASE,
        })
    }
}

/// A valid guest write to IA32_APIC_BASE ([`CheckedWrite::apic_base`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicBaseUpdate {
    /// The mode change the processor must make, if any.
    pub hardware: Option<CheckedWrite>,
    /// The base of the guest's xAPIC page from now on.
    pub base: u64,
}

/// EFER bits (APM Vol. 2 §3.1.7, Figure 3-8).
pub mod efer {
    /// System-call extensions.
    pub const SCE: u64 = 1 << 0;
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active (read-only).
    pub const LMA: u64 = 1 << 10;
    /// No-execute enable.
    pub const NXE: u64 = 1 << 11;
    /// SVM enable (thinhv's).
    pub const SVME: u64 = 1 << 12;
    /// Fast FXSAVE/FXRSTOR.
    pub const FFXSR: u64 = 1 << 14;
}

/// The EFER bits a guest may set, from the processor's CPUID 0x8000_0001
/// EDX: SCE (SYSCALL, bit 11), NXE (NX, bit 20), LME/LMA (LM, bit 29),
/// FFXSR (bit 25). Everything else — SVME, LMSLE, TCE and the newer AMD
/// bits — raises #GP: thinhv does not offer them, and VMRUN's consistency
/// checks (APM §15.5.1) fail on bits the processor treats as reserved.
pub fn efer_allowed(ext1_edx: u32) -> u64 {
    let mut m = efer::LMA;
    if ext1_edx & (1 << 11) != 0 {
        m |= efer::SCE;
    }
    if ext1_edx & (1 << 20) != 0 {
        m |= efer::NXE;
    }
    if ext1_edx & (1 << 29) != 0 {
        m |= efer::LME;
    }
    if ext1_edx & (1 << 25) != 0 {
        m |= efer::FFXSR;
    }
    m
}

/// A memory type valid in the PAT (SDM Vol. 3A Table 13-10: UC, WC, WT,
/// WP, WB, UC-).
const fn pat_type_ok(t: u8) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6 | 7)
}

/// A PAT value the processor accepts (SDM Vol. 3A §13.12.2: a reserved
/// type in any entry, or a set reserved bit, is #GP).
pub fn pat_ok(value: u64) -> bool {
    value.to_le_bytes().iter().all(|&b| pat_type_ok(b))
}

/// A memory type valid in an MTRR (SDM Vol. 3A Table 12-8: UC, WC, WT,
/// WP, WB; WC only when MTRRCAP.WC).
const fn mtrr_type_ok(t: u8, wc: bool) -> bool {
    matches!(t, 0 | 4 | 5 | 6) || (t == 1 && wc)
}

/// What an MTRR MSR is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtrrReg {
    /// IA32_MTRR_DEF_TYPE.
    DefType,
    /// Fixed range `i` (index into [`MTRR_FIXED`]).
    Fixed(usize),
    /// PHYSBASE of pair `i`.
    Base(usize),
    /// PHYSMASK of pair `i`.
    Mask(usize),
}

/// Classifies an MTRR MSR.
pub fn mtrr_reg(msr: u32) -> Option<MtrrReg> {
    if msr == MSR_MTRR_DEF_TYPE {
        return Some(MtrrReg::DefType);
    }
    if let Some(i) = MTRR_FIXED.iter().position(|&m| m == msr) {
        return Some(MtrrReg::Fixed(i));
    }
    if (MSR_MTRR_VAR_FIRST..=MSR_MTRR_VAR_LAST).contains(&msr) {
        let i = (msr - MSR_MTRR_VAR_FIRST) as usize;
        return Some(if i.is_multiple_of(2) {
            MtrrReg::Base(i / 2)
        } else {
            MtrrReg::Mask(i / 2)
        });
    }
    None
}

/// MTRRCAP: what the processor implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MtrrCap {
    /// Variable-range pairs (VCNT).
    pub vcnt: usize,
    /// Fixed ranges implemented (FIX).
    pub fixed: bool,
    /// Write-combining type (WC).
    pub wc: bool,
}

impl MtrrCap {
    /// From IA32_MTRRCAP (SDM Vol. 3A Figure 12-5).
    pub fn from_msr(v: u64) -> Self {
        Self {
            vcnt: ((v & 0xff) as usize).min(MTRR_VAR_MAX),
            fixed: v & (1 << 8) != 0,
            wc: v & (1 << 10) != 0,
        }
    }
}

/// Whether `value` may be written to the MTRR `reg` on a processor with
/// `cap` and `phys_bits` physical address bits (SDM Vol. 3A §12.11.2:
/// reserved bits, bits at or above MAXPHYADDR and invalid types are #GP;
/// registers the processor does not implement are #GP too).
pub fn mtrr_write_ok(reg: MtrrReg, value: u64, cap: MtrrCap, phys_bits: u32) -> bool {
    let above_phys = if phys_bits >= 64 {
        0
    } else {
        !0u64 << phys_bits
    };
    match reg {
        MtrrReg::DefType => {
            // Type in 7:0, FE 10, E 11; the rest reserved.
            value & !0xcff == 0 && mtrr_type_ok((value & 0xff) as u8, cap.wc)
        }
        MtrrReg::Fixed(_) => {
            cap.fixed && value.to_le_bytes().iter().all(|&b| mtrr_type_ok(b, cap.wc))
        }
        MtrrReg::Base(i) => {
            i < cap.vcnt
                && value & 0xf00 == 0
                && value & above_phys == 0
                && mtrr_type_ok((value & 0xff) as u8, cap.wc)
        }
        MtrrReg::Mask(i) => i < cap.vcnt && value & 0x7ff == 0 && value & above_phys == 0,
    }
}

/// Whether an MTRR register is implemented (reads of the others #GP).
pub fn mtrr_exists(reg: MtrrReg, cap: MtrrCap) -> bool {
    match reg {
        MtrrReg::DefType => true,
        MtrrReg::Fixed(_) => cap.fixed,
        MtrrReg::Base(i) | MtrrReg::Mask(i) => i < cap.vcnt,
    }
}

/// IA32_APIC_BASE bits (SDM Vol. 3A Figure 12-5 / §12.12.1).
pub mod apic_base {
    /// Processor is the BSP (read-only).
    pub const BSP: u64 = 1 << 8;
    /// x2APIC mode.
    pub const EXTD: u64 = 1 << 10;
    /// APIC global enable.
    pub const EN: u64 = 1 << 11;
    /// Base address field (above MAXPHYADDR reserved).
    pub const BASE: u64 = !0xfff;
}

/// What a guest write to IA32_APIC_BASE amounts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicBaseWrite {
    /// Valid and the base stays: forward this value to the processor.
    Forward(u64),
    /// Reserved bits, an invalid mode transition or x2APIC without the
    /// feature: #GP, as the processor would.
    Invalid,
    /// A valid write that moves the xAPIC page: the hardware keeps its
    /// base (where thinhv's ICR trap is) and thinhv emulates the move
    /// (`super::apic_reloc`).
    Relocation,
}

/// Classifies a write of `value` over `current` (SDM Vol. 3A §12.12.5,
/// Figure 12-27: the only valid state changes are disabled ↔ xAPIC,
/// xAPIC → x2APIC, x2APIC → disabled; EXTD without EN is invalid).
pub fn apic_base_write(current: u64, value: u64, phys_bits: u32, x2apic: bool) -> ApicBaseWrite {
    let above_phys = if phys_bits >= 64 {
        0
    } else {
        !0u64 << phys_bits
    };
    let reserved = 0xff | (1 << 9) | above_phys | if x2apic { 0 } else { apic_base::EXTD };
    if value & reserved != 0 {
        return ApicBaseWrite::Invalid;
    }
    let mode = |v: u64| (v & apic_base::EN != 0, v & apic_base::EXTD != 0);
    let valid = match (mode(current), mode(value)) {
        (_, (false, true)) => false,
        (a, b) if a == b => true,
        // Disabled → xAPIC, xAPIC → x2APIC, any → disabled.
        ((false, false), (true, false)) | ((true, false), (true, true)) | (_, (false, false)) => {
            true
        }
        // x2APIC → xAPIC, disabled → x2APIC.
        _ => false,
    };
    if !valid {
        return ApicBaseWrite::Invalid;
    }
    let keep_bsp = (value & !apic_base::BSP) | (current & apic_base::BSP);
    if (value ^ current) & apic_base::BASE & !above_phys != 0 {
        return ApicBaseWrite::Relocation;
    }
    ApicBaseWrite::Forward(keep_bsp)
}

/// HWCR bits (PPR MSRC001_0015).
pub mod hwcr {
    /// SmmLock: SMM code lock (write-once).
    pub const SMM_LOCK: u64 = 1 << 0;
    /// INVDWBINVD: INVD acts as WBINVD.
    pub const INVD_WBINVD: u64 = 1 << 4;
    /// McStatusWrEn: MCi_STATUS writable.
    pub const MC_STATUS_WR_EN: u64 = 1 << 18;
    /// CpbDis: core performance boost disabled.
    pub const CPB_DIS: u64 = 1 << 25;
    /// IRPerfEn: instructions-retired counter enabled.
    pub const IR_PERF_EN: u64 = 1 << 30;
    /// The bits a guest may change: they tune performance counting and
    /// boost, nothing the host relies on.
    pub const GUEST_MAY_CHANGE: u64 = MC_STATUS_WR_EN | CPB_DIS | IR_PERF_EN;
}

/// Whether the HWCR write `value` over `current` only changes bits a guest
/// may change (never clears INVDWBINVD, never touches SmmLock).
pub fn hwcr_write_ok(current: u64, value: u64) -> bool {
    (current ^ value) & !hwcr::GUEST_MAY_CHANGE == 0
}

/// SYSCFG: MtrrFixDramModEn (APM Vol. 2 §7.8.1). Clearing it is what
/// operating systems do after reading the fixed MTRRs; it only hides the
/// RdMem/WrMem bits again.
pub const SYSCFG_FIX_DRAM_MOD_EN: u64 = 1 << 19;

/// Whether the SYSCFG write `value` over `current` is allowed: no change,
/// or only MtrrFixDramModEn cleared.
pub fn syscfg_write_ok(current: u64, value: u64) -> bool {
    let changed = current ^ value;
    changed & !SYSCFG_FIX_DRAM_MOD_EN == 0 && value & SYSCFG_FIX_DRAM_MOD_EN == 0 || changed == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinhv_abi::hypercall::VENDOR_AMD_SVM;

    #[test]
    fn ranges_do_not_overlap_and_each_names_a_manual() {
        for (i, a) in POLICY.iter().enumerate() {
            assert!(a.first <= a.last, "{}", a.name);
            assert!(
                ["APM", "SDM", "PPR", "BKDG"]
                    .iter()
                    .any(|m| a.why.contains(m)),
                "{} cites no manual",
                a.name
            );
            for b in &POLICY[i + 1..] {
                assert!(
                    a.last < b.first || b.last < a.first,
                    "{} overlaps {}",
                    a.name,
                    b.name
                );
            }
        }
    }

    #[test]
    fn intercepts_cover_what_the_issue_lists_on_svm() {
        let svm: Vec<_> = intercepts(VENDOR_AMD_SVM, true).collect();
        let writes = |m: u32| svm.iter().any(|&(x, _, w)| x == m && w);
        let reads = |m: u32| svm.iter().any(|&(x, r, _)| x == m && r);
        for m in [
            0x2ff,
            0x200,
            0x21f,
            0x250,
            0x26f,
            MSR_PAT,
            MSR_SYSCFG,
            MSR_HWCR,
            0xc001_001a,
            0xc001_001d,
            0xc001_0016,
            0xc001_0019,
            MSR_EFER,
            MSR_APIC_BASE,
            0x830,
        ] {
            assert!(writes(m), "{m:#x} write not intercepted");
        }
        // MTRR reads come from the emulation; EFER reads hide SVME.
        assert!(reads(0x2ff) && reads(0x200) && reads(MSR_EFER));
        // PAT, HWCR and SYSCFG reads are the processor's own.
        assert!(!reads(MSR_PAT) && !reads(MSR_HWCR) && !reads(MSR_SYSCFG));
        // Nothing outside the table.
        assert!(svm.iter().all(|&(m, _, _)| entry(m).is_some()));
        // No MTRR intercepts on a processor without MTRRs.
        assert!(
            !intercepts(VENDOR_AMD_SVM, false).any(|(m, _, _)| mtrr_reg(m).is_some()),
            "MTRRs intercepted without MTRRs"
        );
    }

    #[test]
    fn vmx_leaves_amd_msrs_and_efer_to_the_processor() {
        let vmx: Vec<_> = intercepts(VENDOR_INTEL_VMX, true).collect();
        assert!(!vmx.iter().any(|&(m, _, _)| m == MSR_EFER || m == MSR_PAT));
        assert!(vmx.iter().any(|&(m, r, w)| m == 0x3a && r && w));
        assert!(vmx.iter().any(|&(m, r, w)| m == 0x2ff && r && w));
        assert_eq!(lookup(VENDOR_INTEL_VMX, MSR_HWCR), (N, N));
        // An MSR nobody lists that exits anyway is refused.
        assert_eq!(
            lookup(VENDOR_INTEL_VMX, 0x4000_0000),
            (Rule::Refuse, Rule::Refuse)
        );
    }

    #[test]
    fn efer_allows_only_what_the_processor_enumerates() {
        // SYSCALL, NX, LM, FFXSR.
        let all = (1 << 11) | (1 << 20) | (1 << 29) | (1 << 25);
        let m = efer_allowed(all);
        assert_eq!(
            m,
            efer::SCE | efer::LME | efer::LMA | efer::NXE | efer::FFXSR
        );
        assert_eq!(m & efer::SVME, 0);
        assert_eq!(m & (1 << 13), 0, "LMSLE is never offered");
        assert_eq!(m & (1 << 15), 0, "TCE is never offered");
        assert_eq!(efer_allowed(1 << 29) & efer::NXE, 0);
    }

    #[test]
    fn pat_types_follow_the_sdm() {
        assert!(pat_ok(0x0007_0406_0007_0406));
        assert!(!pat_ok(0x0007_0406_0007_0402), "type 2 is reserved");
        assert!(!pat_ok(0x0007_0406_0007_0403), "type 3 is reserved");
        assert!(!pat_ok(0x0007_0406_0007_0416), "bits 3-7 are reserved");
        assert!(!pat_ok(0x0807_0406_0007_0406));
    }

    #[test]
    fn mtrr_writes_follow_the_sdm() {
        let cap = MtrrCap::from_msr(0x508);
        assert_eq!(
            cap,
            MtrrCap {
                vcnt: 8,
                fixed: true,
                wc: true
            }
        );
        let b = |i: u32| mtrr_reg(0x200 + 2 * i).unwrap();
        let k = |i: u32| mtrr_reg(0x201 + 2 * i).unwrap();
        assert!(mtrr_write_ok(b(0), 0x8000_0006, cap, 40));
        assert!(!mtrr_write_ok(b(0), 0x8000_0002, cap, 40), "type 2");
        assert!(!mtrr_write_ok(b(0), 0x8000_0106, cap, 40), "bit 8");
        assert!(
            !mtrr_write_ok(b(0), 1 << 40 | 6, cap, 40),
            "above MAXPHYADDR"
        );
        assert!(!mtrr_write_ok(b(8), 6, cap, 40), "pair 8 of 8");
        assert!(mtrr_write_ok(k(1), 0xff_8000_0800, cap, 40));
        assert!(!mtrr_write_ok(k(1), 0xff_8000_0801, cap, 40), "bit 0");
        let d = MtrrReg::DefType;
        assert!(mtrr_write_ok(d, 0xc06, cap, 40));
        assert!(mtrr_write_ok(d, 0, cap, 40));
        assert!(!mtrr_write_ok(d, 0x1006, cap, 40), "bit 12");
        assert!(
            !mtrr_write_ok(d, 0xc07, cap, 40),
            "type 7 is not an MTRR type"
        );
        let f = mtrr_reg(0x26f).unwrap();
        assert_eq!(f, MtrrReg::Fixed(10));
        assert!(mtrr_write_ok(f, 0x0505_0505_0606_0606, cap, 40));
        assert!(!mtrr_write_ok(f, 0x0505_0505_0606_0602, cap, 40));
        let no_wc = MtrrCap { wc: false, ..cap };
        assert!(!mtrr_write_ok(d, 0xc01, no_wc, 40), "WC without MTRRCAP.WC");
        assert!(!mtrr_exists(
            MtrrReg::Fixed(0),
            MtrrCap {
                fixed: false,
                ..cap
            }
        ));
        assert_eq!(mtrr_reg(0x2fe), None);
    }

    #[test]
    fn apic_base_transitions_follow_the_sdm() {
        let xapic = 0xfee0_0000 | apic_base::EN | apic_base::BSP;
        let x2 = xapic | apic_base::EXTD;
        use ApicBaseWrite::*;
        // Enabling x2APIC: forwarded, BSP kept from the processor.
        assert_eq!(
            apic_base_write(xapic, x2 & !apic_base::BSP, 40, true),
            Forward(x2)
        );
        assert_eq!(apic_base_write(xapic, x2, 40, false), Invalid);
        // x2APIC → xAPIC directly is invalid; → disabled is fine.
        assert_eq!(apic_base_write(x2, xapic, 40, true), Invalid);
        assert_eq!(
            apic_base_write(x2, 0xfee0_0000, 40, true),
            Forward(0xfee0_0000 | apic_base::BSP)
        );
        // EXTD without EN.
        assert_eq!(
            apic_base_write(xapic, 0xfee0_0000 | apic_base::EXTD, 40, true),
            Invalid
        );
        // Reserved bits.
        assert_eq!(apic_base_write(xapic, xapic | 1, 40, true), Invalid);
        assert_eq!(apic_base_write(xapic, xapic | 1 << 9, 40, true), Invalid);
        assert_eq!(apic_base_write(xapic, xapic | 1 << 45, 40, true), Invalid);
        // Relocation.
        assert_eq!(
            apic_base_write(xapic, 0xfed0_0000 | apic_base::EN, 40, true),
            Relocation
        );
        // Rewriting the same value.
        assert_eq!(apic_base_write(xapic, xapic, 40, true), Forward(xapic));
    }

    #[test]
    fn apic_base_relocation_never_reaches_the_hardware() {
        let hw = 0xfee0_0000 | apic_base::EN | apic_base::BSP;
        let moved = 0xfec8_0000;
        // A move: the base is the guest's, nothing for the processor.
        let u = CheckedWrite::apic_base(hw, 0xfee0_0000, moved | apic_base::EN, 40, true);
        assert_eq!(
            u,
            Some(ApicBaseUpdate {
                hardware: None,
                base: moved
            })
        );
        // Moved, then x2APIC on: the mode reaches the processor at its own
        // base (and BSP), the guest keeps its base.
        let u = CheckedWrite::apic_base(hw, moved, moved | 0xc00, 40, true).unwrap();
        assert_eq!(u.base, moved);
        let w = u.hardware.unwrap();
        assert_eq!((w.msr(), w.value()), (MSR_APIC_BASE, hw | apic_base::EXTD));
        // Moving and disabling at once.
        let u = CheckedWrite::apic_base(hw, 0xfee0_0000, moved, 40, true).unwrap();
        assert_eq!(u.base, moved);
        assert_eq!(u.hardware.unwrap().value(), hw & !apic_base::EN);
        // Checked against the guest's view: reserved bits, above
        // MAXPHYADDR, x2APIC → xAPIC directly.
        assert_eq!(
            CheckedWrite::apic_base(hw, moved, moved | apic_base::EN | 1 << 9, 40, true),
            None
        );
        assert_eq!(
            CheckedWrite::apic_base(hw, moved, 1 << 40 | apic_base::EN, 40, true),
            None
        );
        let x2 = hw | apic_base::EXTD;
        assert_eq!(
            CheckedWrite::apic_base(x2, moved, moved | apic_base::EN, 40, true),
            None
        );
    }

    #[test]
    fn hwcr_and_syscfg_allow_only_harmless_changes() {
        let cur = hwcr::INVD_WBINVD | hwcr::SMM_LOCK;
        assert!(hwcr_write_ok(cur, cur | hwcr::IR_PERF_EN));
        assert!(!hwcr_write_ok(cur, cur & !hwcr::INVD_WBINVD));
        assert!(!hwcr_write_ok(cur, cur & !hwcr::SMM_LOCK));
        assert!(!hwcr_write_ok(cur, cur | 1 << 3), "TlbCacheDis");
        let s = 0x74_0000 | SYSCFG_FIX_DRAM_MOD_EN;
        assert!(syscfg_write_ok(s, s), "no change");
        assert!(syscfg_write_ok(s, s & !SYSCFG_FIX_DRAM_MOD_EN));
        assert!(
            !syscfg_write_ok(s & !SYSCFG_FIX_DRAM_MOD_EN, s),
            "setting ModEn"
        );
        assert!(!syscfg_write_ok(s, s | 1 << 23), "SMEE");
    }
}
