//! The window in which a device could DMA into thinhv before the seal
//! (issue 11, item 8): the IOMMU translates from the end of the core's
//! set-up, before any CPU is virtualized, so a roll-back must switch it off
//! again before the loader frees the memory that holds its tables. (That
//! translation is on before the first CPU enters guest mode is checked by
//! `attacks_hc.rs` and by every IOMMU test that boots Linux.)
use thinhv_ovmf::qemu::Profile;
use thinhv_tests::{Boot, boot_linux, built, linux_config};

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn a_roll_back_switches_the_iommu_off_before_freeing_its_tables() {
    let b = built();
    let mut m = Profile::svm(2);
    m.extra = ["-device", "intel-iommu"].map(String::from).to_vec();
    let boot = Boot::new(&b, "iommu-rollback", m);
    boot.esp.install_linux(&b.linux).unwrap();
    boot.esp
        .install_thinhv(
            &b.efi,
            Some(&linux_config(
                "\n[iommu]\nmode = \"protect\"\n\n[debug]\nfail_cpu = 1\n",
            )),
        )
        .unwrap();
    let g = boot_linux(&boot);
    let at = |needle: &str| {
        g.serial
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in the serial output:\n{}", g.serial))
    };
    // On from the core's start, off again at the roll-back, before the
    // loader reports (and frees the region).
    assert!(at("translating from the core's start") < at("entering guest mode"));
    assert!(
        at("unit 0xfed90000 no longer translating (roll-back)")
            < at("every processor was returned to native mode"),
        "{}",
        g.serial
    );
    assert!(!g.serial.contains("stays reserved"), "{}", g.serial);
    // Linux boots without thinhv, sees the DMAR and drives the IOMMU.
    let tables: Vec<&str> = g.get("acpi_tables").split_whitespace().collect();
    assert!(tables.contains(&"DMAR"), "{tables:?}");
    assert_ne!(g.get("dmesg_dmar_lines"), "0");
    assert_eq!(g.get("nproc"), "2");
    assert_eq!(g.get("cpuinfo_hypervisor"), "0");
    assert!(
        g.status.as_ref().is_some_and(|s| s["present"] == false),
        "thinhv is not running: {:?}",
        g.status
    );
}
