//! Guest and host state for the VMCS: segments in VMX access-rights form,
//! the state captured from the running firmware, and the architectural
//! INIT/SIPI state (SDM Vol. 3A Table 10-1; Vol. 3C §25.4, §27.3.1).
use super::controls::{entry, exit, pin, proc1, proc2};
use super::fields::Field;
use super::image::VmcsImage;
use crate::svm::state::segment_from_gdt;

/// Access rights "unusable" bit (§25.4.1, Table 25-2).
pub const AR_UNUSABLE: u32 = 1 << 16;

/// A segment as the VMCS holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seg {
    /// Selector.
    pub selector: u16,
    /// Base.
    pub base: u64,
    /// Limit in bytes (expanded for G = 1).
    pub limit: u32,
    /// Access rights: descriptor bits 40–47 in 7:0, 52–55 in 15:12, bit 16
    /// unusable.
    pub ar: u32,
}

/// A segment from `selector` and the GDT (null or LDT-relative selectors
/// give an unusable segment).
pub fn seg_from_gdt(gdt: &[u8], selector: u16) -> Seg {
    let s = segment_from_gdt(gdt, selector);
    if s.attrib == 0 {
        return Seg {
            selector,
            base: 0,
            limit: 0,
            ar: AR_UNUSABLE,
        };
    }
    let a = u32::from(s.attrib);
    Seg {
        selector,
        base: s.base,
        limit: s.limit,
        ar: (a & 0xff) | ((a & 0xf00) << 4),
    }
}

/// Registers captured from the running processor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestCapture {
    /// CR0 as the guest had it.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4 as the guest had it (without VMXE unless the guest set it).
    pub cr4: u64,
    /// DR7.
    pub dr7: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// RSP.
    pub rsp: u64,
    /// RIP.
    pub rip: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// IA32_PAT.
    pub pat: u64,
    /// IA32_DEBUGCTL.
    pub debugctl: u64,
    /// SYSENTER_CS/ESP/EIP.
    pub sysenter: [u64; 3],
    /// GDTR (base, limit).
    pub gdtr: (u64, u32),
    /// IDTR (base, limit).
    pub idtr: (u64, u32),
    /// ES, CS, SS, DS, FS, GS, LDTR, TR.
    pub segs: [Seg; 8],
}

/// Host state: the core's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostState {
    /// CR0.
    pub cr0: u64,
    /// CR3 (the core's tables).
    pub cr3: u64,
    /// CR4 (with VMXE).
    pub cr4: u64,
    /// Stack.
    pub rsp: u64,
    /// Exit entry point.
    pub rip: u64,
    /// Code selector.
    pub cs: u16,
    /// Data selector (SS, DS, ES; FS and GS are 0).
    pub ds: u16,
    /// TR selector.
    pub tr: u16,
    /// TR base.
    pub tr_base: u64,
    /// GDTR base.
    pub gdtr_base: u64,
    /// IDTR base.
    pub idtr_base: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// IA32_PAT.
    pub pat: u64,
}

/// Control settings (already adjusted to the processor).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Controls {
    /// Pin-based.
    pub pin: u32,
    /// Primary processor-based.
    pub proc1: u32,
    /// Secondary processor-based.
    pub proc2: u32,
    /// VM-exit.
    pub exit: u32,
    /// VM-entry (IA-32e mode guest is set from the guest's EFER.LMA).
    pub entry: u32,
    /// MSR bitmap.
    pub msr_bitmap: u64,
    /// I/O bitmap A (B follows at +4 KiB); 0: no I/O exits.
    pub io_bitmap: u64,
    /// EPT pointer.
    pub eptp: u64,
    /// VPID (0: none).
    pub vpid: u16,
    /// CR0 bits owned by the hypervisor.
    pub cr0_mask: u64,
    /// CR4 bits owned by the hypervisor.
    pub cr4_mask: u64,
}

/// What thinhv asks for, before adjustment: MSR bitmaps, secondary
/// controls with EPT, VPID and unrestricted guest, and the instructions a
/// modern OS expects to run natively; a 64-bit host; EFER, PAT and debug
/// controls switched on entry and exit. No interrupt, NMI, HLT or I/O exits.
pub mod wanted {
    use super::{entry, exit, pin, proc1, proc2};
    /// Pin-based: NMIs exit (thinhv's INIT wake-ups arrive as NMIs; the
    /// guest's own are injected back), with virtual-NMI blocking so that
    /// an NMI held for the guest waits for its NMI window.
    pub const PIN: u32 = pin::NMI | pin::VIRTUAL_NMIS;
    /// Pin-based bits thinhv must not get (forced by `adjust` if required).
    pub const PIN_AVOID: u32 = pin::EXT_INTR;
    /// Primary: must be available (set while an NMI waits for the guest).
    pub const PROC1_AVAILABLE: u32 = proc1::NMI_WINDOW;
    /// Primary: required.
    pub const PROC1_REQUIRED: u32 = proc1::MSR_BITMAPS | proc1::SECONDARY;
    /// Secondary: required.
    pub const PROC2_REQUIRED: u32 = proc2::EPT | proc2::UNRESTRICTED;
    /// Secondary: when available.
    pub const PROC2_WANTED: u32 =
        proc2::VPID | proc2::RDTSCP | proc2::INVPCID | proc2::XSAVES | proc2::USER_WAIT_PAUSE;
    /// Exit: required.
    pub const EXIT_REQUIRED: u32 =
        exit::HOST_64 | exit::SAVE_EFER | exit::LOAD_EFER | exit::SAVE_PAT | exit::LOAD_PAT;
    /// Exit: when available.
    pub const EXIT_WANTED: u32 = exit::SAVE_DEBUG;
    /// Entry: required.
    pub const ENTRY_REQUIRED: u32 = entry::LOAD_EFER | entry::LOAD_PAT;
    /// Entry: when available.
    pub const ENTRY_WANTED: u32 = entry::LOAD_DEBUG;
}

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_VMXE: u64 = 1 << 13;
const EFER_LMA: u64 = 1 << 10;

/// The CR0 and CR4 the processor runs the guest with, from the values the
/// guest believes it has: fixed-1 bits added (PE and PG excepted under
/// unrestricted guest).
pub fn actual_cr(
    guest_cr0: u64,
    guest_cr4: u64,
    cr0_fixed0: u64,
    cr4_fixed0: u64,
    unrestricted: bool,
) -> (u64, u64) {
    let relax = if unrestricted { CR0_PE | CR0_PG } else { 0 };
    (guest_cr0 | (cr0_fixed0 & !relax), guest_cr4 | cr4_fixed0)
}

/// Masks of the CR0/CR4 bits thinhv owns: every fixed bit (they differ
/// from what the guest may believe) and every bit the processor does not
/// allow, so guest writes that touch them exit.
pub fn cr_masks(
    cr0_fixed0: u64,
    cr0_fixed1: u64,
    cr4_fixed0: u64,
    cr4_fixed1: u64,
    unrestricted: bool,
) -> (u64, u64) {
    let relax = if unrestricted { CR0_PE | CR0_PG } else { 0 };
    let low = 0xffff_ffffu64;
    (
        (cr0_fixed0 & !relax) | (!cr0_fixed1 & low),
        cr4_fixed0 | (!cr4_fixed1 & low) | CR4_VMXE,
    )
}

/// Builds the full VMCS image.
pub fn build(
    g: &GuestCapture,
    h: &HostState,
    c: &Controls,
    cr0_fixed0: u64,
    cr4_fixed0: u64,
) -> VmcsImage {
    let mut v = VmcsImage::new();
    let unrestricted = c.proc2 & proc2::UNRESTRICTED != 0 && c.proc1 & proc1::SECONDARY != 0;
    // Controls.
    v.set(Field::PIN_BASED_CONTROLS, u64::from(c.pin));
    v.set(Field::PROC_BASED_CONTROLS, u64::from(c.proc1));
    v.set(Field::PROC_BASED_CONTROLS2, u64::from(c.proc2));
    v.set(Field::EXIT_CONTROLS, u64::from(c.exit));
    let mut ent = c.entry & !entry::IA32E_GUEST;
    if g.efer & EFER_LMA != 0 {
        ent |= entry::IA32E_GUEST;
    }
    v.set(Field::ENTRY_CONTROLS, u64::from(ent));
    v.set(Field::EXCEPTION_BITMAP, 0);
    v.set(Field::CR3_TARGET_COUNT, 0);
    v.set(Field::EXIT_MSR_STORE_COUNT, 0);
    v.set(Field::EXIT_MSR_LOAD_COUNT, 0);
    v.set(Field::ENTRY_MSR_LOAD_COUNT, 0);
    v.set(Field::ENTRY_INTERRUPTION_INFO, 0);
    v.set(Field::MSR_BITMAP, c.msr_bitmap);
    if c.proc1 & proc1::IO_BITMAPS != 0 {
        v.set(Field::IO_BITMAP_A, c.io_bitmap);
        v.set(Field::IO_BITMAP_B, c.io_bitmap + 0x1000);
    }
    v.set(Field::EPT_POINTER, c.eptp);
    if c.proc2 & proc2::XSAVES != 0 {
        // XSAVES/XRSTORS exit for the components set here (SDM Vol. 3C
        // §26.1.3): none. VMCLEAR does not promise a zero field.
        v.set(Field::XSS_EXITING_BITMAP, 0);
    }
    if c.proc2 & proc2::VPID != 0 {
        v.set(Field::VPID, u64::from(c.vpid));
    }
    v.set(Field::TSC_OFFSET, 0);
    v.set(Field::CR0_GUEST_HOST_MASK, c.cr0_mask);
    v.set(Field::CR4_GUEST_HOST_MASK, c.cr4_mask);
    v.set(Field::CR0_READ_SHADOW, g.cr0);
    v.set(Field::CR4_READ_SHADOW, g.cr4 & !CR4_VMXE);
    // Guest state.
    let (cr0, cr4) = actual_cr(g.cr0, g.cr4, cr0_fixed0, cr4_fixed0, unrestricted);
    v.set(Field::GUEST_CR0, cr0);
    v.set(Field::GUEST_CR3, g.cr3);
    v.set(Field::GUEST_CR4, cr4);
    v.set(Field::GUEST_DR7, g.dr7);
    v.set(Field::GUEST_RSP, g.rsp);
    v.set(Field::GUEST_RIP, g.rip);
    v.set(Field::GUEST_RFLAGS, g.rflags);
    for (i, s) in g.segs.iter().enumerate() {
        let [sel, base, limit, ar] = Field::guest_segment(i);
        v.set(sel, u64::from(s.selector));
        v.set(base, s.base);
        v.set(limit, u64::from(s.limit));
        v.set(ar, u64::from(s.ar));
    }
    v.set(Field::GUEST_GDTR_BASE, g.gdtr.0);
    v.set(Field::GUEST_GDTR_LIMIT, u64::from(g.gdtr.1));
    v.set(Field::GUEST_IDTR_BASE, g.idtr.0);
    v.set(Field::GUEST_IDTR_LIMIT, u64::from(g.idtr.1));
    v.set(Field::GUEST_IA32_EFER, g.efer);
    v.set(Field::GUEST_IA32_PAT, g.pat);
    v.set(Field::GUEST_IA32_DEBUGCTL, g.debugctl);
    v.set(Field::GUEST_SYSENTER_CS, g.sysenter[0]);
    v.set(Field::GUEST_SYSENTER_ESP, g.sysenter[1]);
    v.set(Field::GUEST_SYSENTER_EIP, g.sysenter[2]);
    v.set(Field::GUEST_INTERRUPTIBILITY, 0);
    v.set(Field::GUEST_ACTIVITY_STATE, 0);
    v.set(Field::GUEST_PENDING_DEBUG, 0);
    v.set(Field::VMCS_LINK_POINTER, u64::MAX);
    // Host state.
    v.set(Field::HOST_CR0, h.cr0);
    v.set(Field::HOST_CR3, h.cr3);
    v.set(Field::HOST_CR4, h.cr4);
    v.set(Field::HOST_RSP, h.rsp);
    v.set(Field::HOST_RIP, h.rip);
    v.set(Field::HOST_CS_SELECTOR, u64::from(h.cs));
    for f in [
        Field::HOST_SS_SELECTOR,
        Field::HOST_DS_SELECTOR,
        Field::HOST_ES_SELECTOR,
    ] {
        v.set(f, u64::from(h.ds));
    }
    v.set(Field::HOST_FS_SELECTOR, 0);
    v.set(Field::HOST_GS_SELECTOR, 0);
    v.set(Field::HOST_TR_SELECTOR, u64::from(h.tr));
    v.set(Field::HOST_FS_BASE, 0);
    v.set(Field::HOST_GS_BASE, 0);
    v.set(Field::HOST_TR_BASE, h.tr_base);
    v.set(Field::HOST_GDTR_BASE, h.gdtr_base);
    v.set(Field::HOST_IDTR_BASE, h.idtr_base);
    v.set(Field::HOST_SYSENTER_CS, 0);
    v.set(Field::HOST_SYSENTER_ESP, 0);
    v.set(Field::HOST_SYSENTER_EIP, 0);
    v.set(Field::HOST_IA32_EFER, h.efer);
    v.set(Field::HOST_IA32_PAT, h.pat);
    v
}

/// The guest fields of a CPU after INIT, waiting for SIPI (real mode at
/// F000:FFF0, Table 10-1), as `(field, value)` pairs; CR0/CR4 are the
/// values the guest sees (the caller applies the fixed bits).
pub fn init_fields() -> [(Field, u64); 30] {
    let data_ar = 0x93;
    [
        (Field::GUEST_CS_SELECTOR, 0xf000),
        (Field::GUEST_CS_BASE, 0xffff_0000),
        (Field::GUEST_CS_LIMIT, 0xffff),
        (Field::GUEST_CS_AR, 0x9b),
        (Field::GUEST_SS_SELECTOR, 0),
        (Field::GUEST_SS_BASE, 0),
        (Field::GUEST_SS_LIMIT, 0xffff),
        (Field::GUEST_SS_AR, data_ar),
        (Field::GUEST_DS_AR, data_ar),
        (Field::GUEST_ES_AR, data_ar),
        (Field::GUEST_FS_AR, data_ar),
        (Field::GUEST_GS_AR, data_ar),
        (Field::GUEST_LDTR_AR, 0x82),
        (Field::GUEST_TR_AR, 0x8b),
        (Field::GUEST_TR_LIMIT, 0xffff),
        (Field::GUEST_GDTR_BASE, 0),
        (Field::GUEST_GDTR_LIMIT, 0xffff),
        (Field::GUEST_IDTR_BASE, 0),
        (Field::GUEST_IDTR_LIMIT, 0xffff),
        (Field::GUEST_RIP, 0xfff0),
        (Field::GUEST_RSP, 0),
        (Field::GUEST_RFLAGS, 2),
        (Field::GUEST_DR7, 0x400),
        (Field::GUEST_CR3, 0),
        (Field::GUEST_IA32_EFER, 0),
        (Field::GUEST_IA32_PAT, crate::svm::state::PAT_DEFAULT),
        (Field::GUEST_IA32_DEBUGCTL, 0),
        (Field::GUEST_INTERRUPTIBILITY, 0),
        (Field::GUEST_PENDING_DEBUG, 0),
        (Field::GUEST_SYSENTER_CS, 0),
    ]
}

/// The other segments' selectors, bases and limits zero after INIT.
pub const INIT_ZERO_SEGMENTS: [Field; 12] = [
    Field::GUEST_DS_SELECTOR,
    Field::GUEST_DS_BASE,
    Field::GUEST_ES_SELECTOR,
    Field::GUEST_ES_BASE,
    Field::GUEST_FS_SELECTOR,
    Field::GUEST_FS_BASE,
    Field::GUEST_GS_SELECTOR,
    Field::GUEST_GS_BASE,
    Field::GUEST_LDTR_SELECTOR,
    Field::GUEST_LDTR_BASE,
    Field::GUEST_TR_SELECTOR,
    Field::GUEST_TR_BASE,
];

/// VMX access rights from a segment descriptor's high dword (SDM Vol. 3C
/// §24.4.1, Table 24-2): type, S, DPL, P (descriptor bits 8..15) and
/// AVL, L, D/B, G (bits 20..23).
pub const fn ar_from_descriptor_high(high: u32) -> u64 {
    let a = (high >> 8) as u64;
    (a & 0xff) | (a & 0xf000)
}

/// The guest state of an appliance's first processor at its 64-bit entry
/// (the Linux 64-bit boot protocol): paging with `cr3`, flat code (0x10,
/// long mode) and data (0x18) from its GDT at `gdt`, a placeholder TR,
/// interrupts off, EFER.LME|LMA. CR0 and CR4 as the guest sees them are
/// [`LONG_MODE_CR0`] and [`LONG_MODE_CR4`] (the caller adds the fixed
/// bits); RSI is the caller's (not in the VMCS). The VM-entry control
/// "IA-32e mode guest" must be set with it.
pub fn long_mode_fields(rip: u64, rsp: u64, cr3: u64, gdt: u64) -> [(Field, u64); 35] {
    let code = ar_from_descriptor_high(0x00af_9b00);
    let data = ar_from_descriptor_high(0x00cf_9300);
    let tr = placeholder_tr(true);
    [
        (Field::GUEST_CS_SELECTOR, 0x10),
        (Field::GUEST_CS_BASE, 0),
        (Field::GUEST_CS_LIMIT, 0xffff_ffff),
        (Field::GUEST_CS_AR, code),
        (Field::GUEST_SS_SELECTOR, 0x18),
        (Field::GUEST_SS_BASE, 0),
        (Field::GUEST_SS_LIMIT, 0xffff_ffff),
        (Field::GUEST_SS_AR, data),
        (Field::GUEST_DS_SELECTOR, 0x18),
        (Field::GUEST_DS_BASE, 0),
        (Field::GUEST_DS_LIMIT, 0xffff_ffff),
        (Field::GUEST_DS_AR, data),
        (Field::GUEST_ES_SELECTOR, 0x18),
        (Field::GUEST_ES_BASE, 0),
        (Field::GUEST_ES_LIMIT, 0xffff_ffff),
        (Field::GUEST_ES_AR, data),
        (Field::GUEST_FS_SELECTOR, 0x18),
        (Field::GUEST_FS_BASE, 0),
        (Field::GUEST_FS_LIMIT, 0xffff_ffff),
        (Field::GUEST_FS_AR, data),
        (Field::GUEST_GS_SELECTOR, 0x18),
        (Field::GUEST_GS_BASE, 0),
        (Field::GUEST_GS_LIMIT, 0xffff_ffff),
        (Field::GUEST_GS_AR, data),
        (Field::GUEST_TR_SELECTOR, u64::from(tr.selector)),
        (Field::GUEST_TR_BASE, tr.base),
        (Field::GUEST_TR_LIMIT, u64::from(tr.limit)),
        (Field::GUEST_TR_AR, u64::from(tr.ar)),
        (Field::GUEST_GDTR_BASE, gdt),
        (
            Field::GUEST_GDTR_LIMIT,
            u64::from(thinhv_abi::handoff::APPLIANCE_GDT_LIMIT),
        ),
        (Field::GUEST_CR3, cr3),
        (Field::GUEST_IA32_EFER, 0x500),
        (Field::GUEST_RIP, rip),
        (Field::GUEST_RSP, rsp),
        (Field::GUEST_RFLAGS, 2),
    ]
}

/// CR0 of an appliance at its 64-bit entry as it sees it: PG, NE, ET, MP,
/// PE.
pub const LONG_MODE_CR0: u64 = 0x8000_0033;
/// CR4 of an appliance at its 64-bit entry: PAE.
pub const LONG_MODE_CR4: u64 = 0x20;

/// CR0 after INIT (CD, NW, ET) as the guest sees it.
pub const INIT_CR0: u64 = 0x6000_0010;
/// Data segment limits after INIT.
pub const INIT_LIMIT_FIELDS: [Field; 5] = [
    Field::GUEST_DS_LIMIT,
    Field::GUEST_ES_LIMIT,
    Field::GUEST_FS_LIMIT,
    Field::GUEST_GS_LIMIT,
    Field::GUEST_LDTR_LIMIT,
];

/// CS after a SIPI with `vector`: (selector, base), RIP 0.
pub const fn sipi_cs(vector: u8) -> (u64, u64) {
    ((vector as u64) << 8, (vector as u64) << 12)
}

/// A TR for a guest that never loaded one (firmware without a TSS): a
/// busy 64-bit (or 32-bit) TSS at 0 with the architectural minimum limit,
/// which VM entry requires and the guest never uses.
pub fn placeholder_tr(long_mode: bool) -> Seg {
    let _ = long_mode;
    Seg {
        selector: 0,
        base: 0,
        limit: 0x67,
        ar: 0x8b,
    }
}

#[cfg(test)]
mod long_mode_tests {
    use super::*;

    #[test]
    fn the_appliance_entry_has_long_mode_code_and_flat_data() {
        assert_eq!(ar_from_descriptor_high(0x00af_9b00), 0xa09b);
        assert_eq!(ar_from_descriptor_high(0x00cf_9300), 0xc093);
        let f = long_mode_fields(0x100_0200, 0x8_0000, 0x8_0000, 0x8_6000);
        let get = |k: Field| f.iter().find(|(x, _)| *x == k).unwrap().1;
        assert_eq!(get(Field::GUEST_CS_AR) & (1 << 13), 1 << 13, "L");
        assert_eq!(get(Field::GUEST_CS_AR) & (1 << 14), 0, "D must be 0 with L");
        assert_eq!(get(Field::GUEST_IA32_EFER), 0x500);
        assert_eq!(get(Field::GUEST_RIP), 0x100_0200);
        assert_eq!(get(Field::GUEST_TR_AR), 0x8b);
        assert_eq!(LONG_MODE_CR0 & 0x8000_0001, 0x8000_0001);
    }
}
