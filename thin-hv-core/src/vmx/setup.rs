//! Choosing the controls for a processor, and the pure half of a vCPU's
//! INIT / SIPI handling on VMX.
use super::caps::VmxCaps;
use super::controls::{adjust, proc2};
use super::state::{Controls, cr_masks, wanted};

/// Why this processor cannot run thinhv's VMX backend.
pub type Missing = &'static str;

/// Adjusts every control word to the processor; fails with what is
/// missing.
pub fn choose_controls(
    caps: &VmxCaps,
    msr_bitmap: u64,
    io_bitmap: u64,
    eptp: u64,
    vpid: u16,
) -> Result<Controls, Missing> {
    let pin = adjust(wanted::PIN, 0, caps.pin).map_err(|_| "NMI exiting with virtual NMIs")?;
    if pin & wanted::PIN_AVOID != 0 {
        return Err("the processor forces external-interrupt exiting");
    }
    if caps.proc1.may_be_1() & wanted::PROC1_AVAILABLE != wanted::PROC1_AVAILABLE {
        return Err("NMI-window exiting");
    }
    let io = if io_bitmap != 0 {
        super::controls::proc1::IO_BITMAPS
    } else {
        0
    };
    let proc1 = adjust(wanted::PROC1_REQUIRED | io, 0, caps.proc1)
        .map_err(|_| "MSR bitmaps, I/O bitmaps or secondary controls")?;
    let proc2 = adjust(wanted::PROC2_REQUIRED, wanted::PROC2_WANTED, caps.proc2)
        .map_err(|_| "EPT with unrestricted guest")?;
    let exit = adjust(wanted::EXIT_REQUIRED, wanted::EXIT_WANTED, caps.exit)
        .map_err(|_| "64-bit host with EFER/PAT switching on exit")?;
    let entry = adjust(wanted::ENTRY_REQUIRED, wanted::ENTRY_WANTED, caps.entry)
        .map_err(|_| "EFER/PAT loading on entry")?;
    let unrestricted = proc2 & proc2::UNRESTRICTED != 0;
    let (cr0_mask, cr4_mask) = cr_masks(
        caps.cr0_fixed0,
        caps.cr0_fixed1,
        caps.cr4_fixed0,
        caps.cr4_fixed1,
        unrestricted,
    );
    Ok(Controls {
        pin,
        proc1,
        proc2,
        exit,
        entry,
        msr_bitmap,
        io_bitmap,
        eptp,
        vpid: if proc2 & proc2::VPID != 0 { vpid } else { 0 },
        cr0_mask,
        cr4_mask,
    })
}

#[cfg(test)]
mod tests {
    use super::super::caps::tests::bochs_tigerlake;
    use super::super::controls::{entry, exit, pin, proc1};
    use super::super::entry_check::check;
    use super::super::fields::Field;
    use super::super::state::{GuestCapture, HostState, Seg, build, placeholder_tr, seg_from_gdt};
    use super::*;
    use thinhv_paging::ept::eptp as make_eptp;

    /// The GDT OVMF runs with (x86-64): flat data at 0x30, 64-bit code at 0x38.
    fn ovmf_gdt() -> Vec<u8> {
        let mut g = vec![0u8; 0x48];
        g[0x30..0x38].copy_from_slice(&0x00cf_9300_0000_ffffu64.to_le_bytes());
        g[0x38..0x40].copy_from_slice(&0x00af_9b00_0000_ffffu64.to_le_bytes());
        g
    }

    /// The state a CPU has when the loader calls the core: 64-bit
    /// firmware, paging on, no TSS loaded.
    pub fn firmware_capture() -> GuestCapture {
        let g = ovmf_gdt();
        let data = seg_from_gdt(&g, 0x30);
        GuestCapture {
            cr0: 0x8001_0033,
            cr3: 0x7fc0_1000,
            cr4: 0x668,
            dr7: 0x400,
            rflags: 0x246,
            rsp: 0x7fe9_1f40,
            rip: 0x7e12_3456,
            efer: 0xd00,
            pat: 0x0007_0406_0007_0406,
            debugctl: 0,
            sysenter: [0; 3],
            gdtr: (0x7f9d_e000, 0x47),
            idtr: (0x7f40_0000, 0xfff),
            segs: [
                data,
                seg_from_gdt(&g, 0x38),
                data,
                data,
                data,
                data,
                seg_from_gdt(&g, 0),
                placeholder_tr(true),
            ],
        }
    }

    pub fn host() -> HostState {
        HostState {
            cr0: 0x8001_0033,
            cr3: 0x3dc0_0000,
            cr4: 0x668 | 1 << 13,
            rsp: 0x3dd0_0000,
            rip: 0x3dc1_2340,
            cs: 0x08,
            ds: 0x10,
            tr: 0x18,
            tr_base: 0x3dcf_f000,
            gdtr_base: 0x3dcf_e000,
            idtr_base: 0x3dce_0000,
            efer: 0xd00,
            pat: 0x0007_0406_0007_0406,
        }
    }

    fn image() -> (super::super::image::VmcsImage, VmxCaps) {
        let caps = bochs_tigerlake();
        let c =
            choose_controls(&caps, 0x3dc3_0000, 0x3dc5_0000, make_eptp(0x3dc4_0000), 1).unwrap();
        (
            build(
                &firmware_capture(),
                &host(),
                &c,
                caps.cr0_fixed0,
                caps.cr4_fixed0,
            ),
            caps,
        )
    }

    #[test]
    fn controls_for_the_test_processor() {
        let caps = bochs_tigerlake();
        let c = choose_controls(&caps, 0x1000, 0, make_eptp(0x2000), 1).unwrap();
        assert_ne!(c.proc1 & proc1::MSR_BITMAPS, 0);
        assert_eq!(
            c.proc1 & (proc1::CR3_LOAD | proc1::CR3_STORE | proc1::HLT | proc1::UNCOND_IO),
            0
        );
        assert_ne!(c.proc2 & proc2::EPT, 0);
        assert_ne!(c.proc2 & proc2::UNRESTRICTED, 0);
        assert_ne!(c.proc2 & proc2::VPID, 0);
        assert_ne!(c.exit & exit::HOST_64, 0);
        assert_ne!(c.entry & entry::LOAD_EFER, 0);
        assert_ne!(c.cr4_mask & (1 << 13), 0, "CR4.VMXE owned");
        assert_ne!(c.cr0_mask & (1 << 5), 0, "CR0.NE owned");
        assert_eq!(c.cr0_mask & 1, 0, "PE not owned under unrestricted guest");
        // Without EPT the backend refuses.
        let mut no_ept = caps;
        no_ept.proc2.0 &= !(u64::from(proc2::EPT) << 32);
        assert_eq!(
            choose_controls(&no_ept, 0, 0, 0, 1),
            Err("EPT with unrestricted guest")
        );
        // NMIs exit (INIT wake-ups) and are held with virtual-NMI blocking.
        assert_eq!(
            c.pin & (pin::NMI | pin::VIRTUAL_NMIS | pin::EXT_INTR),
            pin::NMI | pin::VIRTUAL_NMIS
        );
        assert_eq!(
            c.proc1 & proc1::NMI_WINDOW,
            0,
            "armed only while an NMI waits"
        );
        let mut no_vnmi = caps;
        no_vnmi.pin.0 &= !(u64::from(pin::VIRTUAL_NMIS) << 32);
        assert_eq!(
            choose_controls(&no_vnmi, 0, 0, 0, 1),
            Err("NMI exiting with virtual NMIs")
        );
        let mut no_window = caps;
        no_window.proc1.0 &= !(u64::from(proc1::NMI_WINDOW) << 32);
        assert_eq!(
            choose_controls(&no_window, 0, 0, 0, 1),
            Err("NMI-window exiting")
        );
    }

    #[test]
    fn an_appliance_entry_in_long_mode_passes_the_entry_checks() {
        use super::super::state::{LONG_MODE_CR0, LONG_MODE_CR4, actual_cr, long_mode_fields};
        // What the VMX backend writes at an appliance's 64-bit entry, on
        // top of the VMCS of a CPU that last ran in real mode after INIT
        // (IA-32e mode guest cleared), with the appliance's EPT and I/O
        // bitmaps.
        let (mut v, caps) = image();
        v.set(
            Field::ENTRY_CONTROLS,
            v.get(Field::ENTRY_CONTROLS) & !u64::from(entry::IA32E_GUEST),
        );
        for (f, x) in long_mode_fields(0x100_0200, 0x8_0000, 0x8_0000, 0x8_6000) {
            v.set(f, x);
        }
        v.set(Field::GUEST_LDTR_SELECTOR, 0);
        v.set(Field::GUEST_LDTR_AR, 1 << 16);
        v.set(Field::GUEST_IDTR_BASE, 0);
        v.set(Field::GUEST_IDTR_LIMIT, 0);
        let (cr0, cr4) = actual_cr(
            LONG_MODE_CR0,
            LONG_MODE_CR4,
            caps.cr0_fixed0,
            caps.cr4_fixed0,
            true,
        );
        v.set(Field::GUEST_CR0, cr0);
        v.set(Field::GUEST_CR4, cr4);
        v.set(Field::EPT_POINTER, make_eptp(0x3d00_0000));
        v.set(Field::IO_BITMAP_A, 0x3d10_0000);
        v.set(Field::IO_BITMAP_B, 0x3d10_1000);
        // Without the IA-32e mode guest control, long mode is refused...
        assert!(!check(&v, &caps).is_empty());
        // ...with it, nothing is.
        v.set(
            Field::ENTRY_CONTROLS,
            v.get(Field::ENTRY_CONTROLS) | u64::from(entry::IA32E_GUEST),
        );
        assert_eq!(check(&v, &caps), vec![]);
    }

    #[test]
    fn the_vmcs_built_from_firmware_state_passes_the_entry_checks() {
        let (v, caps) = image();
        assert_eq!(check(&v, &caps), vec![]);
        assert_ne!(
            v.get(Field::ENTRY_CONTROLS) & u64::from(entry::IA32E_GUEST),
            0
        );
        assert_eq!(v.get(Field::CR4_READ_SHADOW), 0x668, "VMXE hidden");
        assert_eq!(v.get(Field::GUEST_CR4), 0x668 | 1 << 13);
        assert_eq!(v.get(Field::GUEST_TR_AR), 0x8b);
        assert_eq!(v.get(Field::VMCS_LINK_POINTER), u64::MAX);
    }

    #[test]
    fn every_field_written_is_read_back_when_an_entry_fails() {
        // After a failed VM entry the backend reads `Field::all()` back and
        // runs the checker: it must see every field the builder writes.
        let (v, _) = image();
        let missing: Vec<String> = v
            .iter()
            .filter(|(f, _)| !Field::all().any(|g| g == *f))
            .map(|(f, _)| format!("{:#06x}", f.0))
            .collect();
        assert!(missing.is_empty(), "written but not read back: {missing:?}");
    }

    fn broken(f: impl FnOnce(&mut super::super::image::VmcsImage)) -> Vec<&'static str> {
        let (mut v, caps) = image();
        f(&mut v);
        check(&v, &caps).into_iter().map(|x| x.rule).collect()
    }

    #[test]
    fn each_class_of_mistake_is_caught_with_its_rule() {
        let has = |rules: &[&str], needle: &str| rules.iter().any(|r| r.contains(needle));
        let r = broken(|v| v.set(Field::PROC_BASED_CONTROLS2, 0x1 << 31));
        assert!(has(&r, "secondary processor-based controls"), "{r:?}");
        let r = broken(|v| v.set(Field::EPT_POINTER, 0x3dc4_0000 | 2 << 3 | 6));
        assert!(has(&r, "page-walk length"), "{r:?}");
        let r = broken(|v| v.set(Field::VPID, 0));
        assert!(has(&r, "VPID must not be 0"), "{r:?}");
        let r = broken(|v| {
            v.set(
                Field::PIN_BASED_CONTROLS,
                v.get(Field::PIN_BASED_CONTROLS) & !u64::from(pin::NMI),
            );
        });
        assert!(has(&r, "virtual NMIs require NMI exiting"), "{r:?}");
        let r = broken(|v| {
            v.set(
                Field::PIN_BASED_CONTROLS,
                v.get(Field::PIN_BASED_CONTROLS) & !u64::from(pin::VIRTUAL_NMIS),
            );
            v.set(
                Field::PROC_BASED_CONTROLS,
                v.get(Field::PROC_BASED_CONTROLS) | u64::from(proc1::NMI_WINDOW),
            );
        });
        assert!(has(&r, "NMI-window exiting requires virtual NMIs"), "{r:?}");
        let r = broken(|v| v.set(Field::HOST_TR_SELECTOR, 0));
        assert!(has(&r, "host TR must not be 0"), "{r:?}");
        let r = broken(|v| v.set(Field::HOST_CS_SELECTOR, 0x0b));
        assert!(has(&r, "RPL and TI"), "{r:?}");
        let r = broken(|v| v.set(Field::HOST_CR4, 0x668));
        assert!(has(&r, "host CR4"), "{r:?}");
        let r = broken(|v| v.set(Field::GUEST_CR4, 0x668));
        assert!(has(&r, "guest CR4"), "{r:?}");
        let r = broken(|v| v.set(Field::GUEST_IA32_EFER, 0x900));
        assert!(has(&r, "LMA must equal the IA-32e"), "{r:?}");
        let r = broken(|v| v.set(Field::GUEST_CS_AR, 0xa091));
        assert!(has(&r, "CS type"), "{r:?}");
        let r = broken(|v| v.set(Field::GUEST_CS_AR, 0x6099b));
        assert!(has(&r, "CS access-rights reserved"), "{r:?}");
        let r = broken(|v| v.set(Field::GUEST_TR_AR, 0x89));
        assert!(has(&r, "busy TSS"), "{r:?}");
        let r = broken(|v| v.set(Field::GUEST_RFLAGS, 0x240));
        assert!(has(&r, "RFLAGS reserved"), "{r:?}");
        let r = broken(|v| v.set(Field::GUEST_RIP, 0x0000_8000_0000_0000));
        assert!(has(&r, "RIP not canonical"), "{r:?}");
        let r = broken(|v| v.set(Field::VMCS_LINK_POINTER, 0));
        assert!(has(&r, "link pointer"), "{r:?}");
        let r = broken(|v| v.set(Field::GUEST_INTERRUPTIBILITY, 4));
        assert!(has(&r, "blocking by SMI"), "{r:?}");
        let r = broken(|v| v.set(Field::GUEST_ACTIVITY_STATE, 5));
        assert!(has(&r, "activity state"), "{r:?}");
        let r = broken(|v| v.set(Field::GUEST_DS_LIMIT, 0xf_fff0));
        assert!(has(&r, "granularity"), "{r:?}");
        let r = broken(|v| v.set(Field::ENTRY_INTERRUPTION_INFO, (1 << 31) | (3 << 8) | 0xd));
        assert!(has(&r, "deliver-error-code"), "{r:?}");
        let r = broken(|v| v.set(Field::GUEST_IA32_PAT, 0x0007_0406_0007_0402));
        assert!(has(&r, "IA32_PAT"), "{r:?}");
    }

    #[test]
    fn the_init_state_in_real_mode_passes_with_unrestricted_guest() {
        let (mut v, caps) = image();
        for (f, val) in super::super::state::init_fields() {
            v.set(f, val);
        }
        for f in super::super::state::INIT_ZERO_SEGMENTS {
            v.set(f, 0);
        }
        for f in super::super::state::INIT_LIMIT_FIELDS {
            v.set(f, 0xffff);
        }
        let (cr0, cr4) = super::super::state::actual_cr(
            super::super::state::INIT_CR0,
            0,
            caps.cr0_fixed0,
            caps.cr4_fixed0,
            true,
        );
        v.set(Field::GUEST_CR0, cr0);
        v.set(Field::GUEST_CR4, cr4);
        let ent = v.get(Field::ENTRY_CONTROLS) & !u64::from(entry::IA32E_GUEST);
        v.set(Field::ENTRY_CONTROLS, ent);
        v.set(Field::GUEST_ACTIVITY_STATE, 3);
        assert_eq!(check(&v, &caps), vec![]);
        // SIPI: CS from the vector, active.
        let (sel, base) = super::super::state::sipi_cs(0x9a);
        v.set(Field::GUEST_CS_SELECTOR, sel);
        v.set(Field::GUEST_CS_BASE, base);
        v.set(Field::GUEST_RIP, 0);
        v.set(Field::GUEST_ACTIVITY_STATE, 0);
        assert_eq!(check(&v, &caps), vec![]);
        // Without unrestricted guest, real mode cannot be entered.
        let p2 = v.get(Field::PROC_BASED_CONTROLS2) & !u64::from(proc2::UNRESTRICTED);
        v.set(Field::PROC_BASED_CONTROLS2, p2);
        assert!(!check(&v, &caps).is_empty());
        let _ = Seg::default();
    }
}
