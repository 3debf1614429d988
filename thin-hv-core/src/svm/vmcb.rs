//! The Virtual Machine Control Block (AMD APM Vol. 2, Appendix B, Tables B-1
//! "VMCB Layout, Control Area" and B-2 "VMCB Layout, State Save Area";
//! revision 3.42).
//!
//! A plain `#[repr(C)]` model of the 4 KiB page. Offsets are checked at
//! compile time against the tables; the bits used by thinhv have names.

use core::mem::{offset_of, size_of};

/// A segment register in the state save area (Table B-2): selector, packed
/// attributes (descriptor bits 40–47 in 7:0, 52–55 in 11:8), limit, base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Segment {
    /// +0
    pub selector: u16,
    /// +2
    pub attrib: u16,
    /// +4
    pub limit: u32,
    /// +8
    pub base: u64,
}

const _: () = assert!(size_of::<Segment>() == 16);

/// Control area (offsets 0x000–0x3FF).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct ControlArea {
    /// 0x000: intercept reads of CR0–15 (bits 0–15), writes (16–31).
    pub intercept_cr: u32,
    /// 0x004: intercept reads of DR0–15 (bits 0–15), writes (16–31).
    pub intercept_dr: u32,
    /// 0x008: intercept exception vectors 0–31.
    pub intercept_exceptions: u32,
    /// 0x00C: intercept vector 3 ([`misc1`]).
    pub intercept_misc1: u32,
    /// 0x010: intercept vector 4 ([`misc2`]).
    pub intercept_misc2: u32,
    /// 0x014: intercept vector 5.
    pub intercept_misc3: u32,
    /// 0x018
    pub reserved0: [u8; 0x3c - 0x18],
    /// 0x03C
    pub pause_filter_threshold: u16,
    /// 0x03E
    pub pause_filter_count: u16,
    /// 0x040: physical address of the I/O permission map (12 KiB).
    pub iopm_base_pa: u64,
    /// 0x048: physical address of the MSR permission map (8 KiB).
    pub msrpm_base_pa: u64,
    /// 0x050
    pub tsc_offset: u64,
    /// 0x058: guest ASID.
    pub guest_asid: u32,
    /// 0x05C: TLB control ([`tlb`]), bits 0–7.
    pub tlb_control: u32,
    /// 0x060: virtual interrupt control (V_TPR, V_IRQ, V_INTR_MASKING, ...).
    pub int_ctl: u64,
    /// 0x068: bit 0 interrupt shadow, bit 1 guest interrupt mask.
    pub int_state: u64,
    /// 0x070: exit code ([`super::exit_code`]).
    pub exit_code: u64,
    /// 0x078
    pub exit_info1: u64,
    /// 0x080
    pub exit_info2: u64,
    /// 0x088
    pub exit_int_info: u64,
    /// 0x090: bit 0 nested paging enable.
    pub nested_ctl: u64,
    /// 0x098
    pub avic_apic_bar: u64,
    /// 0x0A0
    pub ghcb_pa: u64,
    /// 0x0A8: event injection ([`event`]).
    pub event_inj: u64,
    /// 0x0B0: nested page table root (nCR3).
    pub n_cr3: u64,
    /// 0x0B8: bit 0 LBR virtualization, bit 1 virtualized VMSAVE/VMLOAD.
    pub virt_ext: u64,
    /// 0x0C0: VMCB clean bits.
    pub clean_bits: u32,
    /// 0x0C4
    pub reserved1: u32,
    /// 0x0C8: next sequential RIP (with NRIP save).
    pub next_rip: u64,
    /// 0x0D0: number of guest instruction bytes fetched (decode assists).
    pub insn_len: u8,
    /// 0x0D1: the bytes.
    pub insn_bytes: [u8; 15],
    /// 0x0E0
    pub reserved2: [u8; 0x400 - 0xe0],
}

const _: () = assert!(size_of::<ControlArea>() == 0x400);
const _: () = assert!(offset_of!(ControlArea, intercept_misc1) == 0x00c);
const _: () = assert!(offset_of!(ControlArea, iopm_base_pa) == 0x040);
const _: () = assert!(offset_of!(ControlArea, msrpm_base_pa) == 0x048);
const _: () = assert!(offset_of!(ControlArea, guest_asid) == 0x058);
const _: () = assert!(offset_of!(ControlArea, int_ctl) == 0x060);
const _: () = assert!(offset_of!(ControlArea, exit_code) == 0x070);
const _: () = assert!(offset_of!(ControlArea, nested_ctl) == 0x090);
const _: () = assert!(offset_of!(ControlArea, event_inj) == 0x0a8);
const _: () = assert!(offset_of!(ControlArea, n_cr3) == 0x0b0);
const _: () = assert!(offset_of!(ControlArea, clean_bits) == 0x0c0);
const _: () = assert!(offset_of!(ControlArea, next_rip) == 0x0c8);
const _: () = assert!(offset_of!(ControlArea, insn_bytes) == 0x0d1);

/// State save area (offsets 0x400–0xFFF), non-SEV-ES layout.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct SaveArea {
    /// 0x000
    pub es: Segment,
    /// 0x010
    pub cs: Segment,
    /// 0x020
    pub ss: Segment,
    /// 0x030
    pub ds: Segment,
    /// 0x040
    pub fs: Segment,
    /// 0x050
    pub gs: Segment,
    /// 0x060 (selector and attributes unused)
    pub gdtr: Segment,
    /// 0x070
    pub ldtr: Segment,
    /// 0x080 (selector and attributes unused)
    pub idtr: Segment,
    /// 0x090
    pub tr: Segment,
    /// 0x0A0
    pub reserved0: [u8; 0xcb - 0xa0],
    /// 0x0CB: current privilege level.
    pub cpl: u8,
    /// 0x0CC
    pub reserved1: u32,
    /// 0x0D0
    pub efer: u64,
    /// 0x0D8
    pub reserved2: [u8; 0x148 - 0xd8],
    /// 0x148
    pub cr4: u64,
    /// 0x150
    pub cr3: u64,
    /// 0x158
    pub cr0: u64,
    /// 0x160
    pub dr7: u64,
    /// 0x168
    pub dr6: u64,
    /// 0x170
    pub rflags: u64,
    /// 0x178
    pub rip: u64,
    /// 0x180
    pub reserved3: [u8; 0x1d8 - 0x180],
    /// 0x1D8
    pub rsp: u64,
    /// 0x1E0
    pub s_cet: u64,
    /// 0x1E8
    pub ssp: u64,
    /// 0x1F0
    pub isst_addr: u64,
    /// 0x1F8
    pub rax: u64,
    /// 0x200
    pub star: u64,
    /// 0x208
    pub lstar: u64,
    /// 0x210
    pub cstar: u64,
    /// 0x218
    pub sfmask: u64,
    /// 0x220
    pub kernel_gs_base: u64,
    /// 0x228
    pub sysenter_cs: u64,
    /// 0x230
    pub sysenter_esp: u64,
    /// 0x238
    pub sysenter_eip: u64,
    /// 0x240
    pub cr2: u64,
    /// 0x248
    pub reserved4: [u8; 0x268 - 0x248],
    /// 0x268: guest PAT.
    pub g_pat: u64,
    /// 0x270
    pub dbgctl: u64,
    /// 0x278
    pub br_from: u64,
    /// 0x280
    pub br_to: u64,
    /// 0x288
    pub last_excp_from: u64,
    /// 0x290
    pub last_excp_to: u64,
    /// 0x298
    pub reserved5: [u8; 0xc00 - 0x298],
}

const _: () = assert!(size_of::<SaveArea>() == 0xc00);
const _: () = assert!(offset_of!(SaveArea, tr) == 0x090);
const _: () = assert!(offset_of!(SaveArea, cpl) == 0x0cb);
const _: () = assert!(offset_of!(SaveArea, efer) == 0x0d0);
const _: () = assert!(offset_of!(SaveArea, cr4) == 0x148);
const _: () = assert!(offset_of!(SaveArea, rip) == 0x178);
const _: () = assert!(offset_of!(SaveArea, rsp) == 0x1d8);
const _: () = assert!(offset_of!(SaveArea, rax) == 0x1f8);
const _: () = assert!(offset_of!(SaveArea, kernel_gs_base) == 0x220);
const _: () = assert!(offset_of!(SaveArea, cr2) == 0x240);
const _: () = assert!(offset_of!(SaveArea, g_pat) == 0x268);

/// The whole VMCB: one 4 KiB-aligned page.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(4096))]
pub struct Vmcb {
    /// 0x000
    pub control: ControlArea,
    /// 0x400
    pub save: SaveArea,
}

const _: () = assert!(size_of::<Vmcb>() == 0x1000);
const _: () = assert!(offset_of!(Vmcb, save) == 0x400);

impl Vmcb {
    /// An all-zero VMCB.
    pub const fn zeroed() -> Self {
        Self {
            control: ControlArea {
                intercept_cr: 0,
                intercept_dr: 0,
                intercept_exceptions: 0,
                intercept_misc1: 0,
                intercept_misc2: 0,
                intercept_misc3: 0,
                reserved0: [0; 0x3c - 0x18],
                pause_filter_threshold: 0,
                pause_filter_count: 0,
                iopm_base_pa: 0,
                msrpm_base_pa: 0,
                tsc_offset: 0,
                guest_asid: 0,
                tlb_control: 0,
                int_ctl: 0,
                int_state: 0,
                exit_code: 0,
                exit_info1: 0,
                exit_info2: 0,
                exit_int_info: 0,
                nested_ctl: 0,
                avic_apic_bar: 0,
                ghcb_pa: 0,
                event_inj: 0,
                n_cr3: 0,
                virt_ext: 0,
                clean_bits: 0,
                reserved1: 0,
                next_rip: 0,
                insn_len: 0,
                insn_bytes: [0; 15],
                reserved2: [0; 0x400 - 0xe0],
            },
            save: SaveArea {
                es: SEG0,
                cs: SEG0,
                ss: SEG0,
                ds: SEG0,
                fs: SEG0,
                gs: SEG0,
                gdtr: SEG0,
                ldtr: SEG0,
                idtr: SEG0,
                tr: SEG0,
                reserved0: [0; 0xcb - 0xa0],
                cpl: 0,
                reserved1: 0,
                efer: 0,
                reserved2: [0; 0x148 - 0xd8],
                cr4: 0,
                cr3: 0,
                cr0: 0,
                dr7: 0,
                dr6: 0,
                rflags: 0,
                rip: 0,
                reserved3: [0; 0x1d8 - 0x180],
                rsp: 0,
                s_cet: 0,
                ssp: 0,
                isst_addr: 0,
                rax: 0,
                star: 0,
                lstar: 0,
                cstar: 0,
                sfmask: 0,
                kernel_gs_base: 0,
                sysenter_cs: 0,
                sysenter_esp: 0,
                sysenter_eip: 0,
                cr2: 0,
                reserved4: [0; 0x268 - 0x248],
                g_pat: 0,
                dbgctl: 0,
                br_from: 0,
                br_to: 0,
                last_excp_from: 0,
                last_excp_to: 0,
                reserved5: [0; 0xc00 - 0x298],
            },
        }
    }
}

const SEG0: Segment = Segment {
    selector: 0,
    attrib: 0,
    limit: 0,
    base: 0,
};

/// Intercept vector 3 (offset 0x00C), Table B-1.
pub mod misc1 {
    /// Physical INTR.
    pub const INTR: u32 = 1 << 0;
    /// Physical NMI.
    pub const NMI: u32 = 1 << 1;
    /// SMI.
    pub const SMI: u32 = 1 << 2;
    /// INIT.
    pub const INIT: u32 = 1 << 3;
    /// CPUID.
    pub const CPUID: u32 = 1 << 18;
    /// IRET.
    pub const IRET: u32 = 1 << 20;
    /// INVD.
    pub const INVD: u32 = 1 << 22;
    /// HLT.
    pub const HLT: u32 = 1 << 24;
    /// INVLPGA.
    pub const INVLPGA: u32 = 1 << 26;
    /// IN/OUT through the I/O permission map.
    pub const IOIO_PROT: u32 = 1 << 27;
    /// RDMSR/WRMSR through the MSR permission map.
    pub const MSR_PROT: u32 = 1 << 28;
    /// Shutdown (triple fault).
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Intercept vector 4 (offset 0x010), Table B-1.
pub mod misc2 {
    /// VMRUN (must be set, or VMRUN fails its consistency checks).
    pub const VMRUN: u32 = 1 << 0;
    /// VMMCALL.
    pub const VMMCALL: u32 = 1 << 1;
    /// VMLOAD.
    pub const VMLOAD: u32 = 1 << 2;
    /// VMSAVE.
    pub const VMSAVE: u32 = 1 << 3;
    /// STGI.
    pub const STGI: u32 = 1 << 4;
    /// CLGI.
    pub const CLGI: u32 = 1 << 5;
    /// SKINIT.
    pub const SKINIT: u32 = 1 << 6;
    /// XSETBV.
    pub const XSETBV: u32 = 1 << 13;
}

/// TLB_CONTROL values (offset 0x05C).
pub mod tlb {
    /// Flush nothing.
    pub const DO_NOTHING: u32 = 0;
    /// Flush the entire TLB (all ASIDs).
    pub const FLUSH_ALL: u32 = 1;
    /// Flush this guest's ASID.
    pub const FLUSH_ASID: u32 = 3;
}

/// Event injection (offset 0x0A8) and EXITINTINFO format, APM §15.20.
pub mod event {
    /// Valid.
    pub const VALID: u64 = 1 << 31;
    /// Error code valid.
    pub const EV: u64 = 1 << 11;
    /// Type: external interrupt.
    pub const TYPE_INTR: u64 = 0 << 8;
    /// Type: NMI.
    pub const TYPE_NMI: u64 = 2 << 8;
    /// Type: exception.
    pub const TYPE_EXCEPTION: u64 = 3 << 8;
    /// Type: software interrupt.
    pub const TYPE_SOFT_INT: u64 = 4 << 8;

    /// An exception with an optional error code.
    pub const fn exception(vector: u8, error_code: Option<u32>) -> u64 {
        let mut e = VALID | TYPE_EXCEPTION | vector as u64;
        if let Some(code) = error_code {
            e |= EV | ((code as u64) << 32);
        }
        e
    }

    /// An NMI.
    pub const fn nmi() -> u64 {
        VALID | TYPE_NMI | 2
    }
}

/// `nested_ctl` bit 0.
pub const NESTED_CTL_NP_ENABLE: u64 = 1;

/// EFER.SVME (APM §3.1.7).
pub const EFER_SVME: u64 = 1 << 12;

/// Segment attributes in VMCB packed form from a descriptor's high dword
/// (bits 32–63 of the 8-byte descriptor): type/S/DPL/P from bits 8–15,
/// AVL/L/D/G from bits 20–23.
#[allow(
    clippy::cast_possible_truncation,
    reason = "the value is masked to 12 bits"
)]
pub const fn attrib_from_descriptor_high(high: u32) -> u16 {
    (((high >> 8) & 0xff) | ((high >> 12) & 0xf00)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_pack_like_the_apm_says() {
        // 64-bit code segment: P=1 DPL=0 S=1 type=0xB, L=1, G=1.
        let high = 0x00af_9b00;
        assert_eq!(attrib_from_descriptor_high(high), 0xa9b);
        // 32-bit flat data: P=1 S=1 type=3, D/B=1, G=1.
        assert_eq!(attrib_from_descriptor_high(0x00cf_9300), 0xc93);
    }

    #[test]
    fn event_encoding() {
        assert_eq!(event::exception(6, None), 0x8000_0306);
        assert_eq!(event::exception(13, Some(0)), 0x0000_0000_8000_0b0d);
        assert_eq!(event::exception(14, Some(2)), 0x0000_0002_8000_0b0e);
        assert_eq!(event::nmi(), 0x8000_0202);
    }
}
