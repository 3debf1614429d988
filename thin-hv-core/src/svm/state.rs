//! Guest state for the VMCB: converting the state captured from the running
//! firmware, and the architectural INIT / SIPI state (AMD APM Vol. 2 §14.1.3
//! Table 14-1 "Initial Processor State").
use super::vmcb::{EFER_SVME, SaveArea, Segment, attrib_from_descriptor_high};

/// A segment descriptor table as raw bytes (the GDT).
pub type DescriptorTable<'a> = &'a [u8];

/// Builds a VMCB segment from `selector` and the GDT it indexes. A null
/// selector, a selector into the LDT, or one beyond the table gives an
/// unusable segment (attributes 0), as the VMCB expects for null segments.
pub fn segment_from_gdt(gdt: DescriptorTable<'_>, selector: u16) -> Segment {
    let index = usize::from(selector & !7);
    if selector & !3 == 0 || selector & 4 != 0 || index + 8 > gdt.len() {
        return Segment {
            selector,
            attrib: 0,
            limit: 0,
            base: 0,
        };
    }
    let raw = u64::from_le_bytes(gdt[index..index + 8].try_into().unwrap_or([0; 8]));
    let low = (raw & 0xffff_ffff) as u32;
    let high = (raw >> 32) as u32;
    let mut base =
        u64::from(low >> 16) | (u64::from(high & 0xff) << 16) | (u64::from(high >> 24) << 24);
    let mut limit = (low & 0xffff) | (high & 0x000f_0000);
    if high & (1 << 23) != 0 {
        // Granularity: limit in 4 KiB units.
        limit = (limit << 12) | 0xfff;
    }
    let is_system = high & (1 << 12) == 0;
    if is_system && index + 16 <= gdt.len() {
        // 16-byte system descriptor in long mode: base bits 32..63 follow.
        let upper = u32::from_le_bytes(gdt[index + 8..index + 12].try_into().unwrap_or([0; 4]));
        base |= u64::from(upper) << 32;
    }
    Segment {
        selector,
        attrib: attrib_from_descriptor_high(high),
        limit,
        base,
    }
}

/// Registers read from the running processor to become the guest's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    /// CR0.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER (SVME already set).
    pub efer: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// DR6.
    pub dr6: u64,
    /// DR7.
    pub dr7: u64,
    /// IA32_PAT.
    pub pat: u64,
    /// GDTR base.
    pub gdtr_base: u64,
    /// GDTR limit.
    pub gdtr_limit: u16,
    /// IDTR base.
    pub idtr_base: u64,
    /// IDTR limit.
    pub idtr_limit: u16,
    /// Selectors.
    pub cs: u16,
    /// Selectors.
    pub ss: u16,
    /// Selectors.
    pub ds: u16,
    /// Selectors.
    pub es: u16,
    /// Where the guest resumes.
    pub rip: u64,
    /// Its stack.
    pub rsp: u64,
}

/// Fills the save area from captured state (FS, GS, TR, LDTR and the
/// syscall MSRs come from VMSAVE, not from here).
pub fn fill_from_captured(save: &mut SaveArea, c: &Captured, gdt: DescriptorTable<'_>) {
    save.cs = segment_from_gdt(gdt, c.cs);
    save.ss = segment_from_gdt(gdt, c.ss);
    save.ds = segment_from_gdt(gdt, c.ds);
    save.es = segment_from_gdt(gdt, c.es);
    save.gdtr = Segment {
        selector: 0,
        attrib: 0,
        limit: u32::from(c.gdtr_limit),
        base: c.gdtr_base,
    };
    save.idtr = Segment {
        selector: 0,
        attrib: 0,
        limit: u32::from(c.idtr_limit),
        base: c.idtr_base,
    };
    save.cpl = ((save.ss.attrib >> 5) & 3) as u8;
    save.efer = c.efer | EFER_SVME;
    save.cr0 = c.cr0;
    save.cr2 = c.cr2;
    save.cr3 = c.cr3;
    save.cr4 = c.cr4;
    save.rflags = c.rflags;
    save.dr6 = c.dr6;
    save.dr7 = c.dr7;
    save.g_pat = c.pat;
    save.rip = c.rip;
    save.rsp = c.rsp;
    save.rax = 0;
}

/// Power-on PAT.
pub const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

/// Puts the save area in the state INIT leaves a processor in (real mode
/// at F000:FFF0; Table 14-1). EFER keeps only SVME, which the guest never
/// sees.
pub fn init_state(save: &mut SaveArea) {
    let data = Segment {
        selector: 0,
        attrib: 0x93,
        limit: 0xffff,
        base: 0,
    };
    save.cs = Segment {
        selector: 0xf000,
        attrib: 0x9b,
        limit: 0xffff,
        base: 0xffff_0000,
    };
    save.ds = data;
    save.es = data;
    save.fs = data;
    save.gs = data;
    save.ss = data;
    save.gdtr = Segment {
        selector: 0,
        attrib: 0,
        limit: 0xffff,
        base: 0,
    };
    save.idtr = Segment {
        selector: 0,
        attrib: 0,
        limit: 0xffff,
        base: 0,
    };
    save.ldtr = Segment {
        selector: 0,
        attrib: 0x82,
        limit: 0xffff,
        base: 0,
    };
    save.tr = Segment {
        selector: 0,
        attrib: 0x83,
        limit: 0xffff,
        base: 0,
    };
    save.cpl = 0;
    save.efer = EFER_SVME;
    save.cr0 = 0x6000_0010;
    save.cr2 = 0;
    save.cr3 = 0;
    save.cr4 = 0;
    save.rflags = 2;
    save.rip = 0xfff0;
    save.rsp = 0;
    save.rax = 0;
    save.dr6 = 0xffff_0ff0;
    save.dr7 = 0x400;
    save.g_pat = PAT_DEFAULT;
    save.kernel_gs_base = 0;
    save.star = 0;
    save.lstar = 0;
    save.cstar = 0;
    save.sfmask = 0;
    save.sysenter_cs = 0;
    save.sysenter_esp = 0;
    save.sysenter_eip = 0;
}

/// Starts a CPU in wait-for-SIPI at the SIPI vector: CS = vector << 8,
/// base vector << 12, IP 0.
pub fn sipi_start(save: &mut SaveArea, vector: u8) {
    save.cs.selector = u16::from(vector) << 8;
    save.cs.base = u64::from(vector) << 12;
    save.rip = 0;
}

/// Puts the save area in 64-bit mode at an appliance's entry (the Linux
/// 64-bit boot protocol, `Documentation/arch/x86/boot.rst`): paging with
/// `cr3`, flat code (0x10, long mode) and data (0x18) from the GDT at
/// `gdt`, interrupts off. RSI (the zero page) is the caller's: it is not in
/// the save area.
pub fn long_mode_entry(save: &mut SaveArea, rip: u64, rsp: u64, cr3: u64, gdt: u64) {
    // The descriptors the appliance's GDT holds (high dwords).
    let code = Segment {
        selector: 0x10,
        attrib: attrib_from_descriptor_high(0x00af_9b00),
        limit: 0xffff_ffff,
        base: 0,
    };
    let data = Segment {
        selector: 0x18,
        attrib: attrib_from_descriptor_high(0x00cf_9300),
        limit: 0xffff_ffff,
        base: 0,
    };
    save.cs = code;
    save.ds = data;
    save.es = data;
    save.fs = data;
    save.gs = data;
    save.ss = data;
    save.gdtr = Segment {
        selector: 0,
        attrib: 0,
        limit: u32::from(thinhv_abi::handoff::APPLIANCE_GDT_LIMIT),
        base: gdt,
    };
    save.idtr = Segment::default();
    save.tr = Segment {
        selector: 0,
        attrib: 0x8b,
        limit: 0x67,
        base: 0,
    };
    // PG, NE, ET, MP, PE; PAE; long mode active.
    save.cr0 = 0x8000_0033;
    save.cr3 = cr3;
    save.cr4 = 0x20;
    save.efer = EFER_SVME | 0x500;
    save.rflags = 2;
    save.rip = rip;
    save.rsp = rsp;
    save.rax = 0;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svm::vmcb::Vmcb;

    /// A GDT like OVMF's: null, ..., flat 32-bit data at 0x08, 64-bit code
    /// at 0x38, and a 64-bit TSS at 0x40 with a base above 4 GiB.
    fn gdt() -> Vec<u8> {
        let mut g = vec![0u8; 0x50];
        let put = |g: &mut Vec<u8>, i: usize, v: u64| g[i..i + 8].copy_from_slice(&v.to_le_bytes());
        put(&mut g, 0x08, 0x00cf_9300_0000_ffff);
        put(&mut g, 0x38, 0x00af_9b00_0000_ffff);
        // TSS: base 0x1_2345_6789, limit 0x67, type 9 (available 64-bit TSS).
        put(&mut g, 0x40, 0x1200_8945_6789_0067);
        put(&mut g, 0x48, 0x0000_0000_0000_0001);
        g
    }

    #[test]
    fn segments_from_a_real_looking_gdt() {
        let g = gdt();
        let cs = segment_from_gdt(&g, 0x38);
        assert_eq!((cs.attrib, cs.base, cs.limit), (0xa9b, 0, 0xffff_ffff));
        let ds = segment_from_gdt(&g, 0x08);
        assert_eq!((ds.attrib, ds.limit), (0xc93, 0xffff_ffff));
        let tr = segment_from_gdt(&g, 0x40);
        assert_eq!((tr.attrib, tr.base, tr.limit), (0x089, 0x1_1245_6789, 0x67));
        assert_eq!(segment_from_gdt(&g, 0).attrib, 0);
        assert_eq!(segment_from_gdt(&g, 0x3).attrib, 0);
        assert_eq!(segment_from_gdt(&g, 0x0c).attrib, 0, "LDT selector");
        assert_eq!(segment_from_gdt(&g, 0x100).attrib, 0, "beyond the table");
    }

    #[test]
    fn captured_state_lands_in_the_save_area() {
        let g = gdt();
        let c = Captured {
            cr0: 0x8000_0033,
            cr3: 0x7f80_1000,
            cr4: 0x668,
            efer: 0xd00,
            rflags: 0x202,
            dr7: 0x400,
            pat: PAT_DEFAULT,
            gdtr_base: 0x7f9d_e000,
            gdtr_limit: 0x47,
            idtr_base: 0x7f40_0000,
            idtr_limit: 0xfff,
            cs: 0x38,
            ss: 0x08,
            ds: 0x08,
            es: 0x08,
            rip: 0x7e12_3456,
            rsp: 0x7fe9_0000,
            ..Default::default()
        };
        let mut v = Vmcb::zeroed();
        fill_from_captured(&mut v.save, &c, &g);
        assert_eq!(v.save.efer, 0xd00 | EFER_SVME);
        assert_eq!(v.save.cs.attrib, 0xa9b);
        assert_eq!(v.save.cpl, 0);
        assert_eq!(v.save.gdtr.limit, 0x47);
        assert_eq!(v.save.rip, 0x7e12_3456);
        assert_eq!(v.save.rax, 0);
    }

    #[test]
    fn init_then_sipi() {
        let mut v = Vmcb::zeroed();
        v.save.cr0 = 0x8000_0011;
        init_state(&mut v.save);
        assert_eq!(v.save.cr0, 0x6000_0010);
        assert_eq!(
            (v.save.cs.selector, v.save.cs.base, v.save.rip),
            (0xf000, 0xffff_0000, 0xfff0)
        );
        sipi_start(&mut v.save, 0x9a);
        assert_eq!(
            (v.save.cs.selector, v.save.cs.base, v.save.rip),
            (0x9a00, 0x9a000, 0)
        );
        assert_eq!(v.save.efer, EFER_SVME);
    }
}
