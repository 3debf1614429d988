//! Processor compatibility profiles (`[cpu] profile`, `hide`, `[[cpu.mask]]`).
//!
//! A profile is an allow-list of CPUID feature bits, named as Linux names
//! them in `/proc/cpuinfo`. In the *governed* registers ([`GOVERNED`]) every
//! bit a named profile does not allow is cleared, including bits this table
//! does not know (a newer processor's features stay hidden until a profile
//! names them), except the [`Class::Platform`] bits: topology, interrupt
//! controller, performance monitoring and speculation-control bits that say
//! what the platform *is* rather than which instructions code may use; they
//! pass through so the OS picks the right mitigations and topology.
//!
//! The result is a list of AND-masks and the XCR0 bits the guest may use,
//! which the loader hands to the core ([`CpuidProfile`]).
use alloc::string::String;
use alloc::vec::Vec;
use thinhv_abi::handoff::{ANY_SUBLEAF, CpuidMask, CpuidProfile, MAX_CPUID_MASKS};

/// Register index in a CPUID result.
pub const EAX: usize = 0;
/// Register index in a CPUID result.
pub const EBX: usize = 1;
/// Register index in a CPUID result.
pub const ECX: usize = 2;
/// Register index in a CPUID result.
pub const EDX: usize = 3;

/// How a named profile treats a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// An instruction-set or system feature: shown only if the profile
    /// allows it.
    Feature,
    /// Describes the platform (topology, APIC, PMU, speculation control):
    /// passed through by every named profile; `hide` and masks can still
    /// clear it.
    Platform,
    /// Reflects a control register (OSXSAVE, OSPKE): follows its parent
    /// feature.
    Follows(&'static str),
}

/// One CPUID feature bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    /// Linux's name (`/proc/cpuinfo`).
    pub name: &'static str,
    /// Leaf.
    pub leaf: u32,
    /// Sub-leaf, or [`ANY_SUBLEAF`].
    pub subleaf: u32,
    /// Register ([`EAX`]..[`EDX`]).
    pub reg: usize,
    /// Bit.
    pub bit: u32,
    /// Treatment by named profiles.
    pub class: Class,
}

/// The registers named profiles govern: (leaf, sub-leaf, register).
pub const GOVERNED: [(u32, u32, usize); 9] = [
    (1, ANY_SUBLEAF, ECX),
    (1, ANY_SUBLEAF, EDX),
    (7, 0, EBX),
    (7, 0, ECX),
    (7, 0, EDX),
    (7, 1, EAX),
    (0xd, 1, EAX),
    (0x8000_0001, ANY_SUBLEAF, ECX),
    (0x8000_0001, ANY_SUBLEAF, EDX),
];

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: usize, bit: u32) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
        class: Class::Feature,
    }
}

const fn p(name: &'static str, leaf: u32, subleaf: u32, reg: usize, bit: u32) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
        class: Class::Platform,
    }
}

const A: u32 = ANY_SUBLEAF;
const X1: u32 = 0x8000_0001;

/// Every feature bit of the governed registers this table knows. AMD
/// mirrors some leaf-1 EDX bits in 0x8000_0001 EDX; they appear twice,
/// under the same name.
#[rustfmt::skip]
pub const FEATURES: &[Feature] = &[
    // Leaf 1 EDX.
    f("fpu", 1, A, EDX, 0), f("vme", 1, A, EDX, 1), f("de", 1, A, EDX, 2),
    f("pse", 1, A, EDX, 3), f("tsc", 1, A, EDX, 4), f("msr", 1, A, EDX, 5),
    f("pae", 1, A, EDX, 6), f("mce", 1, A, EDX, 7), f("cx8", 1, A, EDX, 8),
    f("apic", 1, A, EDX, 9), f("sep", 1, A, EDX, 11), f("mtrr", 1, A, EDX, 12),
    f("pge", 1, A, EDX, 13), f("mca", 1, A, EDX, 14), f("cmov", 1, A, EDX, 15),
    f("pat", 1, A, EDX, 16), f("pse36", 1, A, EDX, 17), f("pn", 1, A, EDX, 18),
    f("clflush", 1, A, EDX, 19), f("dts", 1, A, EDX, 21), f("acpi", 1, A, EDX, 22),
    f("mmx", 1, A, EDX, 23), f("fxsr", 1, A, EDX, 24), f("sse", 1, A, EDX, 25),
    f("sse2", 1, A, EDX, 26), f("ss", 1, A, EDX, 27), p("ht", 1, A, EDX, 28),
    f("tm", 1, A, EDX, 29), f("ia64", 1, A, EDX, 30), f("pbe", 1, A, EDX, 31),
    // Leaf 1 ECX.
    f("pni", 1, A, ECX, 0), f("pclmulqdq", 1, A, ECX, 1), f("dtes64", 1, A, ECX, 2),
    f("monitor", 1, A, ECX, 3), f("ds_cpl", 1, A, ECX, 4), f("vmx", 1, A, ECX, 5),
    f("smx", 1, A, ECX, 6), f("est", 1, A, ECX, 7), f("tm2", 1, A, ECX, 8),
    f("ssse3", 1, A, ECX, 9), f("cid", 1, A, ECX, 10), f("sdbg", 1, A, ECX, 11),
    f("fma", 1, A, ECX, 12), f("cx16", 1, A, ECX, 13), f("xtpr", 1, A, ECX, 14),
    f("pdcm", 1, A, ECX, 15), f("pcid", 1, A, ECX, 17), f("dca", 1, A, ECX, 18),
    f("sse4_1", 1, A, ECX, 19), f("sse4_2", 1, A, ECX, 20), p("x2apic", 1, A, ECX, 21),
    f("movbe", 1, A, ECX, 22), f("popcnt", 1, A, ECX, 23),
    p("tsc_deadline_timer", 1, A, ECX, 24), f("aes", 1, A, ECX, 25),
    f("xsave", 1, A, ECX, 26),
    Feature { name: "osxsave", leaf: 1, subleaf: A, reg: ECX, bit: 27, class: Class::Follows("xsave") },
    f("avx", 1, A, ECX, 28), f("f16c", 1, A, ECX, 29), f("rdrand", 1, A, ECX, 30),
    p("hypervisor", 1, A, ECX, 31),
    // Leaf 7.0 EBX.
    f("fsgsbase", 7, 0, EBX, 0), f("tsc_adjust", 7, 0, EBX, 1), f("sgx", 7, 0, EBX, 2),
    f("bmi1", 7, 0, EBX, 3), f("hle", 7, 0, EBX, 4), f("avx2", 7, 0, EBX, 5),
    f("fdp_excptn_only", 7, 0, EBX, 6), f("smep", 7, 0, EBX, 7), f("bmi2", 7, 0, EBX, 8),
    f("erms", 7, 0, EBX, 9), f("invpcid", 7, 0, EBX, 10), f("rtm", 7, 0, EBX, 11),
    f("cqm", 7, 0, EBX, 12), f("zero_fcs_fds", 7, 0, EBX, 13), f("mpx", 7, 0, EBX, 14),
    f("rdt_a", 7, 0, EBX, 15), f("avx512f", 7, 0, EBX, 16), f("avx512dq", 7, 0, EBX, 17),
    f("rdseed", 7, 0, EBX, 18), f("adx", 7, 0, EBX, 19), f("smap", 7, 0, EBX, 20),
    f("avx512ifma", 7, 0, EBX, 21), f("clflushopt", 7, 0, EBX, 23), f("clwb", 7, 0, EBX, 24),
    f("intel_pt", 7, 0, EBX, 25), f("avx512pf", 7, 0, EBX, 26), f("avx512er", 7, 0, EBX, 27),
    f("avx512cd", 7, 0, EBX, 28), f("sha_ni", 7, 0, EBX, 29), f("avx512bw", 7, 0, EBX, 30),
    f("avx512vl", 7, 0, EBX, 31),
    // Leaf 7.0 ECX.
    f("avx512vbmi", 7, 0, ECX, 1), f("umip", 7, 0, ECX, 2), f("pku", 7, 0, ECX, 3),
    Feature { name: "ospke", leaf: 7, subleaf: 0, reg: ECX, bit: 4, class: Class::Follows("pku") },
    f("waitpkg", 7, 0, ECX, 5), f("avx512_vbmi2", 7, 0, ECX, 6), f("shstk", 7, 0, ECX, 7),
    f("gfni", 7, 0, ECX, 8), f("vaes", 7, 0, ECX, 9), f("vpclmulqdq", 7, 0, ECX, 10),
    f("avx512_vnni", 7, 0, ECX, 11), f("avx512_bitalg", 7, 0, ECX, 12), f("tme", 7, 0, ECX, 13),
    f("avx512_vpopcntdq", 7, 0, ECX, 14), f("la57", 7, 0, ECX, 16), f("rdpid", 7, 0, ECX, 22),
    p("bus_lock_detect", 7, 0, ECX, 24), f("cldemote", 7, 0, ECX, 25),
    f("movdiri", 7, 0, ECX, 27), f("movdir64b", 7, 0, ECX, 28), f("enqcmd", 7, 0, ECX, 29),
    f("sgx_lc", 7, 0, ECX, 30),
    // Leaf 7.0 EDX.
    f("avx512_4vnniw", 7, 0, EDX, 2), f("avx512_4fmaps", 7, 0, EDX, 3), f("fsrm", 7, 0, EDX, 4),
    f("avx512_vp2intersect", 7, 0, EDX, 8), p("srbds_ctrl", 7, 0, EDX, 9),
    p("md_clear", 7, 0, EDX, 10), p("rtm_always_abort", 7, 0, EDX, 11),
    p("tsx_force_abort", 7, 0, EDX, 13), f("serialize", 7, 0, EDX, 14),
    p("hybrid_cpu", 7, 0, EDX, 15), f("tsxldtrk", 7, 0, EDX, 16), f("pconfig", 7, 0, EDX, 18),
    f("arch_lbr", 7, 0, EDX, 19), f("ibt", 7, 0, EDX, 20), f("amx_bf16", 7, 0, EDX, 22),
    f("avx512_fp16", 7, 0, EDX, 23), f("amx_tile", 7, 0, EDX, 24), f("amx_int8", 7, 0, EDX, 25),
    p("spec_ctrl", 7, 0, EDX, 26), p("intel_stibp", 7, 0, EDX, 27), p("flush_l1d", 7, 0, EDX, 28),
    p("arch_capabilities", 7, 0, EDX, 29), p("core_capabilities", 7, 0, EDX, 30),
    p("spec_ctrl_ssbd", 7, 0, EDX, 31),
    // Leaf 7.1 EAX.
    f("avx_vnni", 7, 1, EAX, 4), f("avx512_bf16", 7, 1, EAX, 5),
    // Leaf 0xD.1 EAX.
    f("xsaveopt", 0xd, 1, EAX, 0), f("xsavec", 0xd, 1, EAX, 1), f("xgetbv1", 0xd, 1, EAX, 2),
    f("xsaves", 0xd, 1, EAX, 3),
    // Leaf 0x8000_0001 EDX (with AMD's copies of leaf-1 bits).
    f("fpu", X1, A, EDX, 0), f("vme", X1, A, EDX, 1), f("de", X1, A, EDX, 2),
    f("pse", X1, A, EDX, 3), f("tsc", X1, A, EDX, 4), f("msr", X1, A, EDX, 5),
    f("pae", X1, A, EDX, 6), f("mce", X1, A, EDX, 7), f("cx8", X1, A, EDX, 8),
    f("apic", X1, A, EDX, 9), f("syscall", X1, A, EDX, 11), f("mtrr", X1, A, EDX, 12),
    f("pge", X1, A, EDX, 13), f("mca", X1, A, EDX, 14), f("cmov", X1, A, EDX, 15),
    f("pat", X1, A, EDX, 16), f("pse36", X1, A, EDX, 17), f("mp", X1, A, EDX, 19),
    f("nx", X1, A, EDX, 20), f("mmxext", X1, A, EDX, 22), f("mmx", X1, A, EDX, 23),
    f("fxsr", X1, A, EDX, 24), f("fxsr_opt", X1, A, EDX, 25), f("pdpe1gb", X1, A, EDX, 26),
    f("rdtscp", X1, A, EDX, 27), f("lm", X1, A, EDX, 29), f("3dnowext", X1, A, EDX, 30),
    f("3dnow", X1, A, EDX, 31),
    // Leaf 0x8000_0001 ECX.
    f("lahf_lm", X1, A, ECX, 0), p("cmp_legacy", X1, A, ECX, 1), f("svm", X1, A, ECX, 2),
    p("extapic", X1, A, ECX, 3), f("cr8_legacy", X1, A, ECX, 4), f("abm", X1, A, ECX, 5),
    f("sse4a", X1, A, ECX, 6), f("misalignsse", X1, A, ECX, 7),
    f("3dnowprefetch", X1, A, ECX, 8), f("osvw", X1, A, ECX, 9), f("ibs", X1, A, ECX, 10),
    f("xop", X1, A, ECX, 11), f("skinit", X1, A, ECX, 12), f("wdt", X1, A, ECX, 13),
    f("lwp", X1, A, ECX, 15), f("fma4", X1, A, ECX, 16), f("tce", X1, A, ECX, 17),
    p("nodeid_msr", X1, A, ECX, 19), f("tbm", X1, A, ECX, 21), p("topoext", X1, A, ECX, 22),
    p("perfctr_core", X1, A, ECX, 23), p("perfctr_nb", X1, A, ECX, 24),
    f("bpext", X1, A, ECX, 26), f("ptsc", X1, A, ECX, 27), p("perfctr_llc", X1, A, ECX, 28),
    f("mwaitx", X1, A, ECX, 29),
];

/// x86-64 baseline (psABI level 1) plus the system features every x86-64
/// OS relies on.
const V1: &[&str] = &[
    "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge",
    "mca", "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "syscall", "nx", "lm",
];
/// psABI level 2.
const V2: &[&str] = &[
    "cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3",
];
/// psABI level 3 (OSXSAVE: `xsave`; LZCNT: `abm`).
const V3: &[&str] = &[
    "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
];
/// psABI level 4.
const V4: &[&str] = &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"];
/// Common to the Intel server generations below (Skylake-SP onwards) beyond
/// level 4.
const INTEL_SKX: &[&str] = &[
    "pclmulqdq",
    "pcid",
    "aes",
    "rdrand",
    "fsgsbase",
    "tsc_adjust",
    "smep",
    "erms",
    "invpcid",
    "rdseed",
    "adx",
    "smap",
    "clflushopt",
    "clwb",
    "pku",
    "xsaveopt",
    "xsavec",
    "xgetbv1",
    "xsaves",
    "pdpe1gb",
    "rdtscp",
    "3dnowprefetch",
    "ss",
    "pdcm",
];
/// Skylake-SP only (TSX and MPX were dropped later).
const INTEL_SKX_ONLY: &[&str] = &["hle", "rtm", "mpx"];
/// Cascade Lake.
const INTEL_CLX: &[&str] = &["avx512_vnni"];
/// Ice Lake-SP.
const INTEL_ICX: &[&str] = &[
    "avx512vbmi",
    "umip",
    "avx512_vbmi2",
    "gfni",
    "vaes",
    "vpclmulqdq",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "la57",
    "rdpid",
    "fsrm",
    "sha_ni",
    "avx512ifma",
];
/// Zen 2 (EPYC 7002) beyond level 3.
const AMD_ZEN2: &[&str] = &[
    "pclmulqdq",
    "aes",
    "rdrand",
    "mmxext",
    "fxsr_opt",
    "pdpe1gb",
    "rdtscp",
    "cr8_legacy",
    "sse4a",
    "misalignsse",
    "3dnowprefetch",
    "osvw",
    "fsgsbase",
    "smep",
    "rdseed",
    "adx",
    "smap",
    "clflushopt",
    "clwb",
    "sha_ni",
    "umip",
    "rdpid",
    "xsaveopt",
    "xsavec",
    "xgetbv1",
    "xsaves",
];
/// Zen 3 (EPYC 7003) beyond Zen 2.
const AMD_ZEN3: &[&str] = &[
    "pcid",
    "invpcid",
    "erms",
    "fsrm",
    "pku",
    "vaes",
    "vpclmulqdq",
];

/// The named profiles, each a union of feature lists.
pub const PROFILES: &[(&str, &[&[&str]])] = &[
    ("x86-64-v1", &[V1]),
    ("x86-64-v2", &[V1, V2]),
    ("x86-64-v3", &[V1, V2, V3]),
    ("x86-64-v4", &[V1, V2, V3, V4]),
    (
        "intel-skylake-server",
        &[V1, V2, V3, V4, INTEL_SKX, INTEL_SKX_ONLY],
    ),
    (
        "intel-cascadelake-server",
        &[V1, V2, V3, V4, INTEL_SKX, INTEL_SKX_ONLY, INTEL_CLX],
    ),
    (
        "intel-icelake-server",
        &[V1, V2, V3, V4, INTEL_SKX, INTEL_CLX, INTEL_ICX],
    ),
    ("amd-zen2", &[V1, V2, V3, AMD_ZEN2]),
    ("amd-zen3", &[V1, V2, V3, AMD_ZEN2, AMD_ZEN3]),
];

/// The profile that masks nothing.
pub const HOST: &str = "host";

/// Every profile name, `host` first.
pub fn profile_names() -> impl Iterator<Item = &'static str> {
    core::iter::once(HOST).chain(PROFILES.iter().map(|(n, _)| *n))
}

/// Whether `name` is in the table.
pub fn known_feature(name: &str) -> bool {
    FEATURES.iter().any(|f| f.name == name)
}

/// The features a named profile allows (the [`Class::Feature`] ones);
/// `None` for `host` or an unknown name.
pub fn allowed(profile: &str) -> Option<Vec<&'static str>> {
    let (_, lists) = PROFILES.iter().find(|(n, _)| *n == profile)?;
    let mut v: Vec<&'static str> = lists.iter().flat_map(|l| l.iter().copied()).collect();
    v.sort_unstable();
    v.dedup();
    Some(v)
}

/// Features a profile comparison can check in `/proc/cpuinfo`: the
/// [`Class::Feature`] names, once each.
pub fn comparable() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = FEATURES
        .iter()
        .filter(|f| f.class == Class::Feature)
        .map(|f| f.name)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// XCR0 state components tied to a feature: (feature, bits).
const XCR0_COMPONENTS: [(&str, u64); 5] = [
    ("avx", 1 << 2),
    ("mpx", (1 << 3) | (1 << 4)),
    ("avx512f", (1 << 5) | (1 << 6) | (1 << 7)),
    ("pku", 1 << 9),
    ("amx_tile", (1 << 17) | (1 << 18)),
];
/// x87 and SSE: always allowed.
const XCR0_BASE: u64 = 0b11;

/// An explicit mask from `[[cpu.mask]]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExplicitMask {
    /// Leaf.
    pub leaf: u32,
    /// Sub-leaf or [`ANY_SUBLEAF`].
    pub subleaf: u32,
    /// AND-masks for EAX..EDX.
    pub regs: [u32; 4],
}

/// Resolves a profile, names to hide and explicit masks into what the core
/// applies. Errors name what is wrong.
pub fn resolve(
    profile: &str,
    hide: &[String],
    explicit: &[ExplicitMask],
) -> Result<CpuidProfile, String> {
    let named = if profile == HOST {
        None
    } else {
        Some(allowed(profile).ok_or_else(|| {
            let mut names = String::new();
            for n in profile_names() {
                if !names.is_empty() {
                    names.push_str(", ");
                }
                names.push_str(n);
            }
            alloc::format!("unknown CPU profile {profile:?}; known profiles: {names}")
        })?)
    };
    let is_allowed = |feat: &Feature, allow: &[&str]| match feat.class {
        Class::Feature => allow.contains(&feat.name),
        Class::Platform => true,
        Class::Follows(parent) => allow.contains(&parent),
    };
    let mut masks: Vec<CpuidMask> = Vec::new();
    let slot = |masks: &mut Vec<CpuidMask>, leaf: u32, subleaf: u32| -> usize {
        if let Some(i) = masks
            .iter()
            .position(|m| m.leaf == leaf && m.subleaf == subleaf)
        {
            i
        } else {
            masks.push(CpuidMask {
                leaf,
                subleaf,
                regs: [u32::MAX; 4],
            });
            masks.len() - 1
        }
    };
    if let Some(allow) = &named {
        for &(leaf, subleaf, reg) in &GOVERNED {
            let mut keep = 0u32;
            for feat in FEATURES
                .iter()
                .filter(|f| f.leaf == leaf && f.subleaf == subleaf && f.reg == reg)
            {
                if is_allowed(feat, allow) {
                    keep |= 1 << feat.bit;
                }
            }
            let i = slot(&mut masks, leaf, subleaf);
            masks[i].regs[reg] &= keep;
        }
    }
    for name in hide {
        if !known_feature(name) {
            return Err(alloc::format!(
                "cpu.hide: unknown feature {name:?} (names as in /proc/cpuinfo; see docs/configuration.md)"
            ));
        }
        for feat in FEATURES.iter().filter(|f| {
            f.name == name || matches!(f.class, Class::Follows(parent) if parent == name)
        }) {
            let i = slot(&mut masks, feat.leaf, feat.subleaf);
            masks[i].regs[feat.reg] &= !(1 << feat.bit);
        }
    }
    for m in explicit {
        if (0x4000_0000..=0x4000_00ff).contains(&m.leaf) {
            return Err(alloc::format!(
                "cpu.mask: leaf {:#x} is thinhv's own (0x40000000-0x400000ff); use hide_hypervisor",
                m.leaf
            ));
        }
        let i = slot(&mut masks, m.leaf, m.subleaf);
        for r in 0..4 {
            masks[i].regs[r] &= m.regs[r];
        }
    }
    // A feature is still visible if every one of its bits survives.
    let visible = |name: &str| {
        FEATURES.iter().filter(|f| f.name == name).all(|f| {
            masks
                .iter()
                .filter(|m| m.leaf == f.leaf && m.subleaf == f.subleaf)
                .all(|m| m.regs[f.reg] & (1 << f.bit) != 0)
        })
    };
    let mut xcr0 = if named.is_some() { XCR0_BASE } else { u64::MAX };
    if !visible("xsave") {
        // Without XSAVE no extended state component is usable.
        xcr0 = XCR0_BASE;
    }
    for (feat, bits) in XCR0_COMPONENTS {
        if visible(feat) && visible("xsave") {
            xcr0 |= bits;
        } else {
            xcr0 &= !bits;
        }
    }
    for m in masks.iter().filter(|m| m.leaf == 0xd && m.subleaf == 0) {
        xcr0 &= u64::from(m.regs[EAX]) | (u64::from(m.regs[EDX]) << 32) | XCR0_BASE;
    }
    masks.retain(|m| m.regs != [u32::MAX; 4]);
    if masks.len() > MAX_CPUID_MASKS {
        return Err(alloc::format!(
            "cpu: {} masked CPUID leaves, at most {MAX_CPUID_MASKS}",
            masks.len()
        ));
    }
    let mut out = CpuidProfile {
        active: u32::from(named.is_some() || !masks.is_empty() || xcr0 != u64::MAX),
        xcr0_allowed: xcr0,
        ..CpuidProfile::default()
    };
    out.count = u32::try_from(masks.len()).unwrap_or(0);
    out.masks[..masks.len()].copy_from_slice(&masks);
    Ok(out)
}

/// The names visible under `p` given the processor's raw CPUID (`raw`),
/// for the comparable features.
pub fn visible_features(p: &CpuidProfile, raw: impl Fn(u32, u32) -> [u32; 4]) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = comparable()
        .into_iter()
        .filter(|name| {
            FEATURES
                .iter()
                .filter(|f| f.name == *name)
                .take(1)
                .all(|f| {
                    let sub = if f.subleaf == ANY_SUBLEAF {
                        0
                    } else {
                        f.subleaf
                    };
                    p.apply(f.leaf, sub, raw(f.leaf, sub))[f.reg] & (1 << f.bit) != 0
                })
        })
        .collect();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn mask_of(p: &CpuidProfile, leaf: u32, subleaf: u32) -> [u32; 4] {
        p.apply(leaf, subleaf, [u32::MAX; 4])
    }

    #[test]
    fn table_has_no_duplicate_bits() {
        for (i, a) in FEATURES.iter().enumerate() {
            for b in &FEATURES[i + 1..] {
                assert!(
                    !(a.leaf == b.leaf
                        && a.subleaf == b.subleaf
                        && a.reg == b.reg
                        && a.bit == b.bit),
                    "{} and {} share a bit",
                    a.name,
                    b.name
                );
            }
            assert!(
                GOVERNED.contains(&(a.leaf, a.subleaf, a.reg)),
                "{} is outside the governed registers",
                a.name
            );
        }
    }

    #[test]
    fn every_profile_names_known_features_only() {
        for (name, lists) in PROFILES {
            for f in lists.iter().flat_map(|l| l.iter()) {
                assert!(known_feature(f), "{name}: {f}");
            }
        }
    }

    #[test]
    fn host_masks_nothing() {
        let p = resolve("host", &[], &[]).unwrap();
        assert_eq!(p.active, 0);
        assert_eq!(p.count, 0);
        assert_eq!(p.xcr0_allowed, u64::MAX);
        assert_eq!(p.apply(7, 0, [1, 2, 3, 4]), [1, 2, 3, 4]);
    }

    #[test]
    fn v2_allows_exactly_its_levels() {
        let p = resolve("x86-64-v2", &[], &[]).unwrap();
        assert_eq!(p.active, 1);
        let l1 = mask_of(&p, 1, 0);
        // pni, ssse3, cx16, sse4_1, sse4_2, popcnt + platform x2apic,
        // tsc-deadline, hypervisor.
        let ecx = (1 << 0) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 23);
        let platform = (1 << 21) | (1 << 24) | (1 << 31);
        assert_eq!(l1[ECX], ecx | platform);
        // Leaf 1 EDX: everything of V1 plus `ht`, nothing else.
        assert_eq!(l1[EDX] & (1 << 28), 1 << 28, "ht is platform");
        assert_eq!(l1[EDX] & ((1 << 18) | (1 << 21) | (1 << 22) | (1 << 27)), 0);
        assert_eq!(
            l1[EDX] & 0x07ff_fbff & !(1 << 18) & !(1 << 21) & !(1 << 22),
            {
                let mut v = 0;
                for n in V1 {
                    for f in FEATURES.iter().filter(|f| f.name == *n && f.leaf == 1) {
                        v |= 1 << f.bit;
                    }
                }
                v
            } & 0x07ff_fbff
        );
        // No AVX2 or BMI in leaf 7; no XSAVE features in 0xD.1.
        let l7 = mask_of(&p, 7, 0);
        assert_eq!(l7[EBX], 0);
        assert_eq!(l7[ECX], 1 << 24, "only bus_lock_detect (platform)");
        assert_eq!(mask_of(&p, 7, 1)[EAX], 0);
        assert_eq!(mask_of(&p, 0xd, 1)[EAX], 0);
        // Extended: lahf_lm in ECX plus the platform bits; syscall, nx, lm.
        let x = mask_of(&p, X1, 0);
        assert_eq!(x[ECX] & 1, 1);
        assert_eq!(
            x[ECX] & ((1 << 5) | (1 << 2) | (1 << 6)),
            0,
            "no abm, svm, sse4a"
        );
        assert_eq!(
            x[EDX] & ((1 << 11) | (1 << 20) | (1 << 29)),
            (1 << 11) | (1 << 20) | (1 << 29)
        );
        assert_eq!(x[EDX] & ((1 << 26) | (1 << 27)), 0, "no pdpe1gb, rdtscp");
        // XCR0: x87 and SSE only.
        assert_eq!(p.xcr0_allowed, 0b11);
    }

    #[test]
    fn v3_allows_avx_state_but_not_avx512() {
        let p = resolve("x86-64-v3", &[], &[]).unwrap();
        assert_eq!(p.xcr0_allowed, 0b111);
        let l7 = mask_of(&p, 7, 0);
        assert_ne!(l7[EBX] & (1 << 5), 0, "avx2");
        assert_eq!(l7[EBX] & (1 << 16), 0, "avx512f");
        let l1 = mask_of(&p, 1, 0);
        assert_ne!(l1[ECX] & (1 << 27), 0, "osxsave follows xsave");
    }

    #[test]
    fn v4_and_skylake_allow_avx512_state() {
        let p = resolve("x86-64-v4", &[], &[]).unwrap();
        assert_eq!(p.xcr0_allowed, 0b1110_0111);
        let p = resolve("intel-skylake-server", &[], &[]).unwrap();
        assert_eq!(
            p.xcr0_allowed, 0b10_1111_1111,
            "x87 SSE AVX MPX AVX-512 PKRU"
        );
        let p = resolve("intel-icelake-server", &[], &[]).unwrap();
        assert_eq!(p.xcr0_allowed, 0b10_1110_0111, "no MPX on Ice Lake");
        let p = resolve("amd-zen3", &[], &[]).unwrap();
        assert_eq!(p.xcr0_allowed, 0b10_0000_0111);
    }

    #[test]
    fn every_profile_contains_the_levels_below() {
        let v2 = allowed("x86-64-v2").unwrap();
        for (name, _) in PROFILES.iter().skip(1) {
            let a = allowed(name).unwrap();
            for f in &v2 {
                assert!(a.contains(f), "{name} lacks {f}");
            }
        }
    }

    #[test]
    fn hide_clears_a_feature_and_its_state() {
        let p = resolve("host", &["avx".to_string()], &[]).unwrap();
        assert_eq!(p.active, 1);
        assert_eq!(mask_of(&p, 1, 0)[ECX] & (1 << 28), 0);
        assert_eq!(p.xcr0_allowed & 0b100, 0);
        assert_eq!(mask_of(&p, 7, 0), [u32::MAX; 4], "only leaf 1 is touched");
        let p = resolve("host", &["xsave".to_string()], &[]).unwrap();
        assert_eq!(mask_of(&p, 1, 0)[ECX] & ((1 << 26) | (1 << 27)), 0);
        assert_eq!(p.xcr0_allowed, 0b11);
        let p = resolve("host", &["fpu".to_string()], &[]).unwrap();
        assert_eq!(mask_of(&p, X1, 0)[EDX] & 1, 0, "AMD's copy too");
        assert!(resolve("host", &["avx3".to_string()], &[]).is_err());
    }

    #[test]
    fn explicit_masks_combine_with_the_profile() {
        let m = ExplicitMask {
            leaf: 7,
            subleaf: 0,
            regs: [u32::MAX, !(1 << 5), u32::MAX, u32::MAX],
        };
        let p = resolve("x86-64-v3", &[], &[m]).unwrap();
        assert_eq!(mask_of(&p, 7, 0)[EBX] & (1 << 5), 0);
        assert_ne!(mask_of(&p, 7, 0)[EBX] & (1 << 3), 0, "bmi1 stays");
        // A mask on a leaf no profile governs.
        let m6 = ExplicitMask {
            leaf: 6,
            subleaf: ANY_SUBLEAF,
            regs: [!4, u32::MAX, u32::MAX, u32::MAX],
        };
        let p = resolve("host", &[], &[m6]).unwrap();
        assert_eq!(p.count, 1);
        assert_eq!(p.apply(6, 3, [7, 0, 0, 0]), [3, 0, 0, 0]);
        // A mask on XSAVE's leaf restricts XCR0.
        let md = ExplicitMask {
            leaf: 0xd,
            subleaf: 0,
            regs: [!0b100, u32::MAX, u32::MAX, u32::MAX],
        };
        let p = resolve("host", &[], &[md]).unwrap();
        assert_eq!(p.xcr0_allowed & 0b111, 0b011);
        // thinhv's own leaves are not maskable.
        let own = ExplicitMask {
            leaf: 0x4000_0000,
            subleaf: 0,
            regs: [0; 4],
        };
        assert!(resolve("host", &[], &[own]).is_err());
    }

    #[test]
    fn unknown_profile_lists_the_known_ones() {
        let e = resolve("x86-64-v5", &[], &[]).unwrap_err();
        assert!(e.contains("x86-64-v2") && e.contains("amd-zen3"), "{e}");
    }

    #[test]
    fn visible_features_predicts_cpuinfo() {
        // A processor with everything: the profile's own list plus platform
        // names come out (platform names are not comparable).
        let p = resolve("x86-64-v2", &[], &[]).unwrap();
        let v = visible_features(&p, |_, _| [u32::MAX; 4]);
        assert_eq!(v, allowed("x86-64-v2").unwrap());
        // A processor without SSE4.2 does not gain it.
        let v = visible_features(&p, |leaf, _| {
            if leaf == 1 {
                [0, 0, !(1 << 20), u32::MAX]
            } else {
                [u32::MAX; 4]
            }
        });
        assert!(!v.contains(&"sse4_2"));
        assert_eq!(v.len(), allowed("x86-64-v2").unwrap().len() - 1);
        let _ = vec![0u8];
    }
}
