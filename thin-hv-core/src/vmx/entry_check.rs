//! A checker of the conditions VM entry verifies (SDM Vol. 3C §27.2
//! "Checks on VMX Controls and Host-State Area" and §27.3.1 "Checks on the
//! Guest State Area"), run on a [`VmcsImage`] before it is written to a
//! processor, so that a VMCS the backend builds fails here, on the host, in
//! a unit test, with the rule named — not as an opaque VM-entry failure.
//!
//! Covered: every control word against the capability MSRs; CR3-target
//! count; MSR-bitmap address; EPTP memory type, walk length, reserved bits
//! and address; unrestricted guest needing EPT; VPID nonzero; NMI/virtual-NMI
//! dependencies; host CR0/CR4 fixed bits, CR3 width, selectors (RPL/TI, CS
//! and TR nonzero), canonical bases and RIP, 64-bit host needing PAE, host
//! EFER and PAT; guest CR0/CR4 fixed bits (PE/PG relaxed under unrestricted
//! guest), PG needing PE, IA-32e mode needing PG and PAE, PCIDE only in
//! IA-32e mode, CR3 width, DR7 and DEBUGCTL reserved bits, EFER (reserved
//! bits, LMA = IA-32e mode guest, LMA = LME when paging), PAT; segment
//! checks for CS, SS, DS, ES, FS, GS, LDTR and TR (type, S, DPL, P, reserved
//! bits, granularity against limit, unusable rules, base widths); GDTR/IDTR
//! base and limit; RIP width and canonical form; RFLAGS reserved bits and VM;
//! activity state; interruptibility reserved bits, STI/MOV-SS and SMI rules; the
//! event-injection field's reserved bits and type/vector pairs; pending
//! debug exceptions reserved bits; the VMCS link pointer.
//!
//! Not covered (thinhv uses none of them): MSR-load/store areas, I/O
//! bitmaps, TPR shadow and APIC virtualization, posted interrupts, PML,
//! VMFUNC and EPTP switching, #VE, VMCS shadowing, SMM/dual-monitor, Intel
//! PT, CET, PKRS, PERF_GLOBAL_CTRL, BNDCFGS, LBR; virtual-8086 mode; guest
//! PDPTEs (only needed for a PAE guest without IA-32e mode at the moment of
//! entry, which thinhv never launches).
use super::caps::{VmxCaps, ept_cap};
use super::controls::{Allowed, entry, exit, pin, proc1, proc2};
use super::fields::Field;
use super::image::VmcsImage;
use super::state::AR_UNUSABLE;
use alloc::vec::Vec;

/// One failed check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The field that breaks the rule.
    pub field: Field,
    /// The rule, with its SDM section.
    pub rule: &'static str,
}

struct Checker<'a> {
    v: &'a VmcsImage,
    out: Vec<Violation>,
}

impl Checker<'_> {
    fn get(&self, f: Field) -> u64 {
        self.v.get(f)
    }

    fn require(&mut self, ok: bool, field: Field, rule: &'static str) {
        if !ok {
            self.out.push(Violation { field, rule });
        }
    }
}

fn canonical(a: u64) -> bool {
    let top = a >> 47;
    top == 0 || top == 0x1_ffff
}

fn fixed_ok(value: u64, fixed0: u64, fixed1: u64) -> bool {
    value & fixed0 == fixed0 && value & !fixed1 & 0xffff_ffff == 0 && value >> 32 == 0
}

fn pat_ok(pat: u64) -> bool {
    (0..8).all(|i| matches!((pat >> (8 * i)) & 0xff, 0 | 1 | 4 | 5 | 6 | 7))
}

const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const EFER_ALLOWED: u64 = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_PCIDE: u64 = 1 << 17;

/// Checks an image against a processor's capabilities.
pub fn check(v: &VmcsImage, caps: &VmxCaps) -> Vec<Violation> {
    let mut c = Checker { v, out: Vec::new() };
    controls(&mut c, caps);
    host(&mut c, caps);
    guest(&mut c, caps);
    c.out
}

fn ctl(c: &mut Checker<'_>, f: Field, cap: Allowed, rule: &'static str) -> u32 {
    let value = (c.get(f) & 0xffff_ffff) as u32;
    c.require(cap.permits(value), f, rule);
    value
}

fn controls(c: &mut Checker<'_>, caps: &VmxCaps) {
    let pinv = ctl(
        c,
        Field::PIN_BASED_CONTROLS,
        caps.pin,
        "27.2.1.1: pin-based controls outside the allowed settings",
    );
    let p1 = ctl(
        c,
        Field::PROC_BASED_CONTROLS,
        caps.proc1,
        "27.2.1.1: primary processor-based controls outside the allowed settings",
    );
    let p2 = if p1 & proc1::SECONDARY != 0 {
        ctl(
            c,
            Field::PROC_BASED_CONTROLS2,
            caps.proc2,
            "27.2.1.1: secondary processor-based controls outside the allowed settings",
        )
    } else {
        0
    };
    let ex = ctl(
        c,
        Field::EXIT_CONTROLS,
        caps.exit,
        "27.2.1.2: VM-exit controls outside the allowed settings",
    );
    let en = ctl(
        c,
        Field::ENTRY_CONTROLS,
        caps.entry,
        "27.2.1.3: VM-entry controls outside the allowed settings",
    );
    let max_targets = (caps.misc >> 16) & 0x1ff;
    c.require(
        c.get(Field::CR3_TARGET_COUNT) <= max_targets.min(4),
        Field::CR3_TARGET_COUNT,
        "27.2.1.1: CR3-target count above the supported number",
    );
    if p1 & proc1::IO_BITMAPS != 0 {
        for f in [Field::IO_BITMAP_A, Field::IO_BITMAP_B] {
            let a = c.get(f);
            c.require(
                a & 0xfff == 0 && caps.phys_ok(a),
                f,
                "27.2.1.1: I/O-bitmap address not 4 KiB-aligned or beyond the physical-address width",
            );
        }
    }
    if p1 & proc1::MSR_BITMAPS != 0 {
        let a = c.get(Field::MSR_BITMAP);
        c.require(
            a & 0xfff == 0 && caps.phys_ok(a),
            Field::MSR_BITMAP,
            "27.2.1.1: MSR-bitmap address not 4 KiB-aligned or beyond the physical-address width",
        );
    }
    if pinv & pin::NMI == 0 {
        c.require(
            pinv & pin::VIRTUAL_NMIS == 0,
            Field::PIN_BASED_CONTROLS,
            "27.2.1.1: virtual NMIs require NMI exiting",
        );
    }
    if pinv & pin::VIRTUAL_NMIS == 0 {
        c.require(
            p1 & proc1::NMI_WINDOW == 0,
            Field::PROC_BASED_CONTROLS,
            "27.2.1.1: NMI-window exiting requires virtual NMIs",
        );
    }
    if p2 & proc2::EPT != 0 {
        let eptp = c.get(Field::EPT_POINTER);
        let mt = eptp & 7;
        let mt_ok =
            (mt == 0 && caps.ept_has(ept_cap::UC)) || (mt == 6 && caps.ept_has(ept_cap::WB));
        c.require(
            mt_ok,
            Field::EPT_POINTER,
            "27.2.1.1: EPTP memory type not supported",
        );
        let walk = (eptp >> 3) & 7;
        let walk_ok = (walk == 3 && caps.ept_has(ept_cap::WALK_4))
            || (walk == 4 && caps.ept_has(ept_cap::WALK_5));
        c.require(
            walk_ok,
            Field::EPT_POINTER,
            "27.2.1.1: EPTP page-walk length not supported",
        );
        c.require(
            eptp & (1 << 6) == 0 || caps.ept_has(ept_cap::AD),
            Field::EPT_POINTER,
            "27.2.1.1: EPT accessed/dirty flags not supported",
        );
        c.require(
            eptp & 0xf80 == 0 && caps.phys_ok(eptp & !0xfff),
            Field::EPT_POINTER,
            "27.2.1.1: EPTP reserved bits set or address beyond the physical-address width",
        );
    }
    if p2 & proc2::UNRESTRICTED != 0 {
        c.require(
            p2 & proc2::EPT != 0,
            Field::PROC_BASED_CONTROLS2,
            "27.2.1.1: unrestricted guest requires EPT",
        );
    }
    if p2 & proc2::VPID != 0 {
        c.require(
            c.get(Field::VPID) != 0,
            Field::VPID,
            "27.2.1.1: VPID must not be 0 when VPID is enabled",
        );
    }
    let _ = ex;
    // Event injection (§27.2.1.3).
    let info = c.get(Field::ENTRY_INTERRUPTION_INFO);
    if info & (1 << 31) != 0 {
        let ty = (info >> 8) & 7;
        let vector = info & 0xff;
        c.require(
            info & 0x7fff_f000 == 0,
            Field::ENTRY_INTERRUPTION_INFO,
            "27.2.1.3: reserved bits in the VM-entry interruption information",
        );
        c.require(
            ty != 1,
            Field::ENTRY_INTERRUPTION_INFO,
            "27.2.1.3: interruption type 1 is reserved",
        );
        c.require(
            ty != 2 || vector == 2,
            Field::ENTRY_INTERRUPTION_INFO,
            "27.2.1.3: an NMI must use vector 2",
        );
        c.require(
            ty != 3 || vector <= 31,
            Field::ENTRY_INTERRUPTION_INFO,
            "27.2.1.3: a hardware exception must use vector 0-31",
        );
        let err_valid = info & (1 << 11) != 0;
        let takes_err = ty == 3 && matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21);
        c.require(
            err_valid == takes_err || ty != 3,
            Field::ENTRY_INTERRUPTION_INFO,
            "27.2.1.3: deliver-error-code bit does not match the exception",
        );
        c.require(
            !err_valid || c.get(Field::ENTRY_EXCEPTION_ERROR_CODE) >> 15 == 0,
            Field::ENTRY_EXCEPTION_ERROR_CODE,
            "27.2.1.3: error code bits 31:15 must be 0",
        );
    }
    let _ = en;
}

fn host(c: &mut Checker<'_>, caps: &VmxCaps) {
    let ex = (c.get(Field::EXIT_CONTROLS) & 0xffff_ffff) as u32;
    let host64 = ex & exit::HOST_64 != 0;
    let cr0 = c.get(Field::HOST_CR0);
    let cr4 = c.get(Field::HOST_CR4);
    c.require(
        fixed_ok(cr0, caps.cr0_fixed0, caps.cr0_fixed1),
        Field::HOST_CR0,
        "27.2.2: host CR0 violates IA32_VMX_CR0_FIXED0/1",
    );
    c.require(
        fixed_ok(cr4, caps.cr4_fixed0, caps.cr4_fixed1),
        Field::HOST_CR4,
        "27.2.2: host CR4 violates IA32_VMX_CR4_FIXED0/1",
    );
    c.require(
        caps.phys_ok(c.get(Field::HOST_CR3)),
        Field::HOST_CR3,
        "27.2.2: host CR3 beyond the physical-address width",
    );
    for f in [Field::HOST_SYSENTER_ESP, Field::HOST_SYSENTER_EIP] {
        c.require(
            canonical(c.get(f)),
            f,
            "27.2.2: host SYSENTER address not canonical",
        );
    }
    if ex & exit::LOAD_PAT != 0 {
        c.require(
            pat_ok(c.get(Field::HOST_IA32_PAT)),
            Field::HOST_IA32_PAT,
            "27.2.2: host IA32_PAT holds an invalid memory type",
        );
    }
    if ex & exit::LOAD_EFER != 0 {
        let efer = c.get(Field::HOST_IA32_EFER);
        c.require(
            efer & !EFER_ALLOWED & !(1 << 12) == 0,
            Field::HOST_IA32_EFER,
            "27.2.2: host IA32_EFER reserved bits set",
        );
        let lm = efer & EFER_LMA != 0;
        c.require(
            lm == host64 && (efer & EFER_LME != 0) == host64,
            Field::HOST_IA32_EFER,
            "27.2.2: host EFER.LMA/LME must equal the host address-space size control",
        );
    }
    for f in [
        Field::HOST_ES_SELECTOR,
        Field::HOST_CS_SELECTOR,
        Field::HOST_SS_SELECTOR,
        Field::HOST_DS_SELECTOR,
        Field::HOST_FS_SELECTOR,
        Field::HOST_GS_SELECTOR,
        Field::HOST_TR_SELECTOR,
    ] {
        c.require(
            c.get(f) & 7 == 0,
            f,
            "27.2.3: host selector RPL and TI must be 0",
        );
    }
    c.require(
        c.get(Field::HOST_CS_SELECTOR) != 0,
        Field::HOST_CS_SELECTOR,
        "27.2.3: host CS must not be 0",
    );
    c.require(
        c.get(Field::HOST_TR_SELECTOR) != 0,
        Field::HOST_TR_SELECTOR,
        "27.2.3: host TR must not be 0",
    );
    c.require(
        host64 || c.get(Field::HOST_SS_SELECTOR) != 0,
        Field::HOST_SS_SELECTOR,
        "27.2.3: host SS must not be 0 outside a 64-bit host",
    );
    for f in [
        Field::HOST_FS_BASE,
        Field::HOST_GS_BASE,
        Field::HOST_GDTR_BASE,
        Field::HOST_IDTR_BASE,
        Field::HOST_TR_BASE,
    ] {
        c.require(
            canonical(c.get(f)),
            f,
            "27.2.3: host base address not canonical",
        );
    }
    if host64 {
        c.require(
            cr4 & CR4_PAE != 0,
            Field::HOST_CR4,
            "27.2.4: a 64-bit host needs CR4.PAE",
        );
        c.require(
            canonical(c.get(Field::HOST_RIP)),
            Field::HOST_RIP,
            "27.2.4: host RIP not canonical",
        );
    } else {
        c.require(
            c.get(Field::ENTRY_CONTROLS) & u64::from(entry::IA32E_GUEST) == 0,
            Field::ENTRY_CONTROLS,
            "27.2.4: IA-32e mode guest needs a 64-bit host",
        );
    }
}

fn seg_g_ok(limit: u64, ar: u64) -> bool {
    let g = ar & (1 << 15) != 0;
    (limit & 0xfff == 0xfff || !g) && (limit >> 20 == 0 || g)
}

fn guest(c: &mut Checker<'_>, caps: &VmxCaps) {
    let en = (c.get(Field::ENTRY_CONTROLS) & 0xffff_ffff) as u32;
    let p1 = (c.get(Field::PROC_BASED_CONTROLS) & 0xffff_ffff) as u32;
    let p2 = if p1 & proc1::SECONDARY != 0 {
        (c.get(Field::PROC_BASED_CONTROLS2) & 0xffff_ffff) as u32
    } else {
        0
    };
    let unrestricted = p2 & proc2::UNRESTRICTED != 0;
    let ia32e = en & entry::IA32E_GUEST != 0;
    let cr0 = c.get(Field::GUEST_CR0);
    let cr4 = c.get(Field::GUEST_CR4);
    let relax = if unrestricted { CR0_PE | CR0_PG } else { 0 };
    c.require(
        fixed_ok(cr0, caps.cr0_fixed0 & !relax, caps.cr0_fixed1),
        Field::GUEST_CR0,
        "27.3.1.1: guest CR0 violates IA32_VMX_CR0_FIXED0/1",
    );
    c.require(
        cr0 & CR0_PG == 0 || cr0 & CR0_PE != 0,
        Field::GUEST_CR0,
        "27.3.1.1: guest CR0.PG requires CR0.PE",
    );
    c.require(
        fixed_ok(cr4, caps.cr4_fixed0, caps.cr4_fixed1),
        Field::GUEST_CR4,
        "27.3.1.1: guest CR4 violates IA32_VMX_CR4_FIXED0/1",
    );
    if ia32e {
        c.require(
            cr0 & CR0_PG != 0 && cr4 & CR4_PAE != 0,
            Field::ENTRY_CONTROLS,
            "27.3.1.1: IA-32e mode guest needs CR0.PG and CR4.PAE",
        );
    } else {
        c.require(
            cr4 & CR4_PCIDE == 0,
            Field::GUEST_CR4,
            "27.3.1.1: CR4.PCIDE only in IA-32e mode",
        );
    }
    c.require(
        caps.phys_ok(c.get(Field::GUEST_CR3)),
        Field::GUEST_CR3,
        "27.3.1.1: guest CR3 beyond the physical-address width",
    );
    if en & entry::LOAD_DEBUG != 0 {
        c.require(
            c.get(Field::GUEST_DR7) >> 32 == 0,
            Field::GUEST_DR7,
            "27.3.1.1: guest DR7 bits 63:32 must be 0",
        );
        c.require(
            c.get(Field::GUEST_IA32_DEBUGCTL) & !0xffc3 == 0,
            Field::GUEST_IA32_DEBUGCTL,
            "27.3.1.1: guest IA32_DEBUGCTL reserved bits set",
        );
    }
    if en & entry::LOAD_EFER != 0 {
        let efer = c.get(Field::GUEST_IA32_EFER);
        c.require(
            efer & !EFER_ALLOWED == 0,
            Field::GUEST_IA32_EFER,
            "27.3.1.1: guest IA32_EFER reserved bits set",
        );
        c.require(
            (efer & EFER_LMA != 0) == ia32e,
            Field::GUEST_IA32_EFER,
            "27.3.1.1: guest EFER.LMA must equal the IA-32e mode guest control",
        );
        if cr0 & CR0_PG != 0 {
            c.require(
                (efer & EFER_LMA != 0) == (efer & EFER_LME != 0),
                Field::GUEST_IA32_EFER,
                "27.3.1.1: with paging, guest EFER.LMA must equal EFER.LME",
            );
        }
    }
    if en & entry::LOAD_PAT != 0 {
        c.require(
            pat_ok(c.get(Field::GUEST_IA32_PAT)),
            Field::GUEST_IA32_PAT,
            "27.3.1.1: guest IA32_PAT holds an invalid memory type",
        );
    }
    segments(c, unrestricted, ia32e, cr0);
    for (base, limit) in [
        (Field::GUEST_GDTR_BASE, Field::GUEST_GDTR_LIMIT),
        (Field::GUEST_IDTR_BASE, Field::GUEST_IDTR_LIMIT),
    ] {
        c.require(
            canonical(c.get(base)),
            base,
            "27.3.1.3: GDTR/IDTR base not canonical",
        );
        c.require(
            c.get(limit) >> 16 == 0,
            limit,
            "27.3.1.3: GDTR/IDTR limit bits 31:16 must be 0",
        );
    }
    // RIP and RFLAGS (§27.3.1.4).
    let rip = c.get(Field::GUEST_RIP);
    let cs_l = c.get(Field::GUEST_CS_AR) & (1 << 13) != 0;
    if ia32e && cs_l {
        c.require(
            canonical(rip),
            Field::GUEST_RIP,
            "27.3.1.4: guest RIP not canonical",
        );
    } else {
        c.require(
            rip >> 32 == 0,
            Field::GUEST_RIP,
            "27.3.1.4: guest RIP bits 63:32 must be 0 outside 64-bit mode",
        );
    }
    let rf = c.get(Field::GUEST_RFLAGS);
    c.require(
        rf & 0xffff_ffff_ffc0_8028 == 0 && rf & 2 != 0,
        Field::GUEST_RFLAGS,
        "27.3.1.4: guest RFLAGS reserved bits wrong",
    );
    c.require(
        rf & (1 << 17) == 0 || (!ia32e && cr0 & CR0_PE != 0),
        Field::GUEST_RFLAGS,
        "27.3.1.4: RFLAGS.VM only in protected mode outside IA-32e mode",
    );
    let info = c.get(Field::ENTRY_INTERRUPTION_INFO);
    if info & (1 << 31) != 0 && (info >> 8) & 7 == 0 {
        c.require(
            rf & (1 << 9) != 0,
            Field::GUEST_RFLAGS,
            "27.3.1.4: injecting an external interrupt needs RFLAGS.IF",
        );
    }
    // Non-register state (§27.3.1.5).
    let act = c.get(Field::GUEST_ACTIVITY_STATE);
    let act_ok = act == 0 || (act <= 3 && caps.misc & (1 << (5 + act)) != 0);
    c.require(
        act_ok,
        Field::GUEST_ACTIVITY_STATE,
        "27.3.1.5: activity state not supported",
    );
    let intr = c.get(Field::GUEST_INTERRUPTIBILITY);
    c.require(
        intr >> 5 == 0,
        Field::GUEST_INTERRUPTIBILITY,
        "27.3.1.5: interruptibility reserved bits set",
    );
    c.require(
        intr & 3 != 3,
        Field::GUEST_INTERRUPTIBILITY,
        "27.3.1.5: blocking by STI and by MOV SS together",
    );
    c.require(
        intr & 1 == 0 || rf & (1 << 9) != 0,
        Field::GUEST_INTERRUPTIBILITY,
        "27.3.1.5: blocking by STI needs RFLAGS.IF",
    );
    c.require(
        intr & 4 == 0 || en & entry::ENTRY_TO_SMM != 0,
        Field::GUEST_INTERRUPTIBILITY,
        "27.3.1.5: blocking by SMI only in SMM",
    );
    c.require(
        c.get(Field::GUEST_PENDING_DEBUG) & !0x1_500f == 0,
        Field::GUEST_PENDING_DEBUG,
        "27.3.1.5: pending debug exceptions reserved bits set",
    );
    c.require(
        c.get(Field::VMCS_LINK_POINTER) == u64::MAX,
        Field::VMCS_LINK_POINTER,
        "27.3.1.5: VMCS link pointer must be FFFFFFFF_FFFFFFFFh",
    );
}

fn segments(c: &mut Checker<'_>, unrestricted: bool, ia32e: bool, cr0: u64) {
    let [_, _, cs_limit_f, cs_ar_f] = Field::guest_segment(1);
    let cs_sel = c.get(Field::GUEST_CS_SELECTOR);
    let ss_sel = c.get(Field::GUEST_SS_SELECTOR);
    let cs_ar = c.get(cs_ar_f);
    let ss_ar = c.get(Field::GUEST_SS_AR);
    let tr_sel = c.get(Field::GUEST_TR_SELECTOR);
    c.require(
        tr_sel & 4 == 0,
        Field::GUEST_TR_SELECTOR,
        "27.3.1.2: TR selector TI must be 0",
    );
    if c.get(Field::GUEST_LDTR_AR) & u64::from(AR_UNUSABLE) == 0 {
        c.require(
            c.get(Field::GUEST_LDTR_SELECTOR) & 4 == 0,
            Field::GUEST_LDTR_SELECTOR,
            "27.3.1.2: LDTR selector TI must be 0",
        );
    }
    if !unrestricted {
        c.require(
            ss_sel & 3 == cs_sel & 3,
            Field::GUEST_SS_SELECTOR,
            "27.3.1.2: SS.RPL must equal CS.RPL",
        );
    }
    for i in [4usize, 5, 7] {
        let [_, base, _, _] = Field::guest_segment(i);
        c.require(
            canonical(c.get(base)),
            base,
            "27.3.1.2: FS/GS/TR base not canonical",
        );
    }
    if c.get(Field::GUEST_LDTR_AR) & u64::from(AR_UNUSABLE) == 0 {
        c.require(
            canonical(c.get(Field::GUEST_LDTR_BASE)),
            Field::GUEST_LDTR_BASE,
            "27.3.1.2: LDTR base not canonical",
        );
    }
    c.require(
        c.get(Field::GUEST_CS_BASE) >> 32 == 0,
        Field::GUEST_CS_BASE,
        "27.3.1.2: CS base bits 63:32 must be 0",
    );
    for i in [0usize, 2, 3] {
        let [_, base, _, ar] = Field::guest_segment(i);
        if c.get(ar) & u64::from(AR_UNUSABLE) == 0 {
            c.require(
                c.get(base) >> 32 == 0,
                base,
                "27.3.1.2: SS/DS/ES base bits 63:32 must be 0",
            );
        }
    }
    // CS.
    let ty = cs_ar & 0xf;
    let cs_dpl = (cs_ar >> 5) & 3;
    let ss_dpl = (ss_ar >> 5) & 3;
    let ty_ok = matches!(ty, 9 | 11 | 13 | 15) || (unrestricted && ty == 3);
    c.require(
        ty_ok,
        cs_ar_f,
        "27.3.1.2: CS type must be accessed code (or 3 with unrestricted guest)",
    );
    c.require(cs_ar & 0x10 != 0, cs_ar_f, "27.3.1.2: CS.S must be 1");
    match ty {
        3 => c.require(cs_dpl == 0, cs_ar_f, "27.3.1.2: CS type 3 needs DPL 0"),
        9 | 11 => c.require(
            cs_dpl == ss_dpl,
            cs_ar_f,
            "27.3.1.2: non-conforming CS.DPL must equal SS.DPL",
        ),
        13 | 15 => c.require(
            cs_dpl <= ss_dpl,
            cs_ar_f,
            "27.3.1.2: conforming CS.DPL must not exceed SS.DPL",
        ),
        _ => {}
    }
    c.require(cs_ar & 0x80 != 0, cs_ar_f, "27.3.1.2: CS must be present");
    c.require(
        cs_ar & 0xf00 == 0 && cs_ar >> 17 == 0,
        cs_ar_f,
        "27.3.1.2: CS access-rights reserved bits set",
    );
    c.require(
        cs_ar & u64::from(AR_UNUSABLE) == 0,
        cs_ar_f,
        "27.3.1.2: CS must be usable",
    );
    if ia32e && cs_ar & (1 << 13) != 0 {
        c.require(
            cs_ar & (1 << 14) == 0,
            cs_ar_f,
            "27.3.1.2: 64-bit CS must have D/B = 0",
        );
    }
    c.require(
        seg_g_ok(c.get(cs_limit_f), cs_ar),
        cs_ar_f,
        "27.3.1.2: CS granularity does not match its limit",
    );
    // SS.
    if ss_ar & u64::from(AR_UNUSABLE) == 0 {
        c.require(
            matches!(ss_ar & 0xf, 3 | 7),
            Field::GUEST_SS_AR,
            "27.3.1.2: SS type must be 3 or 7",
        );
        c.require(
            ss_ar & 0x10 != 0 && ss_ar & 0x80 != 0,
            Field::GUEST_SS_AR,
            "27.3.1.2: SS must be a present code/data segment",
        );
        c.require(
            ss_ar & 0xf00 == 0 && ss_ar >> 17 == 0,
            Field::GUEST_SS_AR,
            "27.3.1.2: SS access-rights reserved bits set",
        );
        c.require(
            seg_g_ok(c.get(Field::GUEST_SS_LIMIT), ss_ar),
            Field::GUEST_SS_AR,
            "27.3.1.2: SS granularity does not match its limit",
        );
    }
    if !unrestricted {
        c.require(
            ss_dpl == ss_sel & 3,
            Field::GUEST_SS_AR,
            "27.3.1.2: SS.DPL must equal SS.RPL",
        );
    }
    if ty == 3 || cr0 & CR0_PE == 0 {
        c.require(
            ss_dpl == 0,
            Field::GUEST_SS_AR,
            "27.3.1.2: SS.DPL must be 0 (real mode or CS type 3)",
        );
    }
    // DS, ES, FS, GS.
    for i in [0usize, 3, 4, 5] {
        let [sel, _, limit, ar_f] = Field::guest_segment(i);
        let ar = c.get(ar_f);
        if ar & u64::from(AR_UNUSABLE) != 0 {
            continue;
        }
        c.require(
            ar & 1 != 0,
            ar_f,
            "27.3.1.2: data segment type must be accessed",
        );
        c.require(
            ar & 8 == 0 || ar & 2 != 0,
            ar_f,
            "27.3.1.2: a code segment in DS/ES/FS/GS must be readable",
        );
        c.require(
            ar & 0x10 != 0 && ar & 0x80 != 0,
            ar_f,
            "27.3.1.2: DS/ES/FS/GS must be present code/data segments",
        );
        if !unrestricted && ar & 0xf <= 11 {
            c.require(
                (ar >> 5) & 3 >= c.get(sel) & 3,
                ar_f,
                "27.3.1.2: data segment DPL below its RPL",
            );
        }
        c.require(
            ar & 0xf00 == 0 && ar >> 17 == 0,
            ar_f,
            "27.3.1.2: access-rights reserved bits set",
        );
        c.require(
            seg_g_ok(c.get(limit), ar),
            ar_f,
            "27.3.1.2: granularity does not match the limit",
        );
    }
    // LDTR.
    let ldtr = c.get(Field::GUEST_LDTR_AR);
    if ldtr & u64::from(AR_UNUSABLE) == 0 {
        c.require(
            ldtr & 0x9f == 0x82,
            Field::GUEST_LDTR_AR,
            "27.3.1.2: LDTR must be a present LDT (type 2, S = 0)",
        );
        c.require(
            ldtr & 0xf00 == 0 && ldtr >> 17 == 0,
            Field::GUEST_LDTR_AR,
            "27.3.1.2: LDTR access-rights reserved bits set",
        );
        c.require(
            seg_g_ok(c.get(Field::GUEST_LDTR_LIMIT), ldtr),
            Field::GUEST_LDTR_AR,
            "27.3.1.2: LDTR granularity does not match its limit",
        );
    }
    // TR.
    let tr = c.get(Field::GUEST_TR_AR);
    let tr_ty = tr & 0xf;
    c.require(
        tr_ty == 11 || (!ia32e && tr_ty == 3),
        Field::GUEST_TR_AR,
        "27.3.1.2: TR must be a busy TSS (64-bit in IA-32e mode)",
    );
    c.require(
        tr & 0x10 == 0 && tr & 0x80 != 0,
        Field::GUEST_TR_AR,
        "27.3.1.2: TR must be a present system segment",
    );
    c.require(
        tr & 0xf00 == 0 && tr >> 16 == 0,
        Field::GUEST_TR_AR,
        "27.3.1.2: TR must be usable, reserved bits 0",
    );
    c.require(
        seg_g_ok(c.get(Field::GUEST_TR_LIMIT), tr),
        Field::GUEST_TR_AR,
        "27.3.1.2: TR granularity does not match its limit",
    );
}
