//! INIT and SIPI to a processor thinhv does not run (issue 11, item 2):
//! the EFI probe, booted first, disables the AP through MP services, so the
//! firmware reports it disabled and thinhv leaves it out; under thinhv,
//! after the seal, the probe sends it INIT-SIPI-SIPI (logical, shorthand,
//! physical) with the vector at a stub that stores a marker. Before this
//! was closed, the physical INIT and SIPI were forwarded and the processor
//! ran the stub natively, outside the second-level tables and the IOMMU.
use thinhv_ovmf::qemu::Profile;
use thinhv_tests::{Boot, PROBE, built, probe_value as get, run_probe};

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn init_sipi_to_a_processor_outside_thinhv_are_refused() {
    let b = built();
    let boot = Boot::new(&b, "attacks-ipi-disabled-ap", Profile::svm(2));
    boot.install_probe_first(
        &b,
        &format!("[boot]\nnext = '{PROBE}'\n"),
        Some("disable-ap"),
    );
    let (serial, r) = run_probe(&boot);

    // The set-up: the AP is outside thinhv.
    assert!(
        serial.contains("THINHV-PROBE-AP-DISABLED apic 1"),
        "{serial}"
    );
    assert!(
        serial.contains("1 processor(s) disabled by the firmware stay outside the hypervisor"),
        "{serial}"
    );
    assert_eq!(get(&r, "hc_cpus"), "1");
    assert_eq!(get(&r, "attack_ipi_target_apic"), "1");
    // None of the three ways started it.
    for how in ["logical", "broadcast", "physical"] {
        assert_eq!(
            get(&r, &format!("attack_ipi_{how}_started")),
            "0",
            "INIT-SIPI-SIPI by {how} started a processor outside thinhv\n{r}"
        );
    }
    // Refused and logged (thinhv's log ring, read by the probe: after the
    // seal warnings stay off the serial port).
    for what in ["physical", "sipi", "logical"] {
        assert_eq!(
            get(&r, &format!("attack_ipi_logged_{what}")),
            "1",
            "refusal ({what}) not in thinhv's log\n{r}"
        );
    }
}
