//! Hypercall buffers in holes of the memory map (issue 11, item 7), on a
//! firmware memory map with more RAM ranges than the loader passes to the
//! core: the EFI probe, booted first, splits RAM into 200 more ranges
//! before it starts thinhv. The loader must drop ranges, never merge them
//! across a gap: merging the smallest gaps first covered the legacy VGA
//! window (a 384 KiB hole) with "RAM", and a STATUS hypercall into it was
//! accepted. Also checks that the IOMMU translates from the core's start,
//! before any CPU enters guest mode (item 8).
use thinhv_ovmf::qemu::Profile;
use thinhv_tests::{Boot, PROBE, built, probe_value as get, run_probe};

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn hypercall_buffers_in_a_fragmented_memory_map_are_refused() {
    let b = built();
    let mut m = Profile::svm(2);
    m.extra = ["-device", "intel-iommu"].map(String::from).to_vec();
    let boot = Boot::new(&b, "attacks-hc-fragmented", m);
    boot.install_probe_first(
        &b,
        &format!("[boot]\nnext = '{PROBE}'\n\n[iommu]\nmode = \"protect\"\n"),
        Some("fragment-memory-map"),
    );
    let (serial, r) = run_probe(&boot);

    // The map really held more RAM ranges than the core takes.
    assert!(
        serial.contains("THINHV-PROBE-FRAGMENTED 200 pieces freed"),
        "{serial}"
    );
    // Every buffer in device memory refused (BAD_ADDRESS), the VGA window
    // among them.
    for what in ["vga_window", "lapic", "hpet", "ecam", "iommu", "above_ram"] {
        assert_eq!(
            get(&r, &format!("attack_hc_mmio_{what}")),
            "3",
            "a hypercall buffer in {what}\n{r}"
        );
    }
    let line = serial
        .lines()
        .find(|l| l.starts_with("thinhv: memory map: "))
        .unwrap_or_else(|| panic!("the loader did not report dropped ranges:\n{serial}"));
    assert!(
        line.contains("the core takes 128")
            && line.contains("smallest")
            && line.contains("refused as hypercall buffers"),
        "{line}"
    );
    assert!(get(&r, "attack_hc_ram_ranges").parse::<u32>().unwrap() > 128);
    // The probe's own buffers in RAM still work.
    assert_eq!(get(&r, "attack_hc_ram_control"), "0");
    assert_eq!(get(&r, "hc_status_status"), "0");
    assert_eq!(get(&r, "hc_log_status"), "0");
    assert_eq!(get(&r, "integrity_status"), "0");

    // Item 8: the IOMMU translated before the first CPU entered guest mode.
    let at = |needle: &str| {
        serial
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in the serial output:\n{serial}"))
    };
    assert!(
        at("translating from the core's start") < at("entering guest mode"),
        "{serial}"
    );
    assert!(
        serial.contains("1 of 1 VT-d units translating; DMA into thinhv is blocked"),
        "{serial}"
    );
}
