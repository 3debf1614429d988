//! The EFI probe, running under thinhv before any OS, checks the
//! hypervisor from the inside: CPUID, hidden virtualization, hypercalls,
//! pointer validation, and that its memory can be neither read nor written.
use thinhv_ovmf::qemu::Profile;
use thinhv_tests::{Boot, PROBE, boot_probe, built, probe_value as get, run_probe};

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn probe_under_thinhv() {
    let b = built();
    let boot = Boot::new(&b, "probe", Profile::svm(2));
    boot.esp.put_file(PROBE, &b.probe).unwrap();
    boot.esp
        .install_thinhv(&b.efi, Some(&format!("[boot]\nnext = '{PROBE}'\n")))
        .unwrap();
    let r = boot_probe(&boot);

    assert_eq!(get(&r, "signature"), "ThinHVThinHV");
    assert_eq!(get(&r, "hypervisor_bit"), "1");
    // The guest sees no virtualization extensions.
    assert_eq!(get(&r, "svm_bit"), "0");
    assert_eq!(get(&r, "vmx_bit"), "0");
    assert_eq!(get(&r, "svm_leaf_edx"), "0");
    assert_eq!(get(&r, "efer_svme"), "0");
    assert_eq!(get(&r, "vmrun_fault"), "6", "VMRUN must raise #UD");
    assert_eq!(get(&r, "stgi_fault"), "6", "STGI must raise #UD");
    assert_eq!(
        get(&r, "hsave_read_fault"),
        "13",
        "VM_HSAVE_PA must raise #GP"
    );
    // XSETBV works, the AVX state included (no CPU profile).
    assert_eq!(get(&r, "xsetbv_fault"), "0");
    assert_eq!(get(&r, "xcr0_after_xsetbv"), "3");
    assert_eq!(get(&r, "xsetbv_avx_fault"), "0");
    assert_ne!(get(&r, "cpuid7_ebx"), "0x0");
    // Hypercalls.
    assert_eq!(get(&r, "hc_version_status"), "0");
    // ABI 3: the hand-off carries appliance partitions.
    assert_eq!(get(&r, "hc_abi"), thinhv_abi::ABI_VERSION.to_string());
    assert_eq!(get(&r, "hc_cpus"), "2");
    assert_eq!(get(&r, "status_cpus_virtualized"), "2");
    assert_eq!(get(&r, "status_sealed"), "1");
    assert_eq!(get(&r, "hc_log_status"), "0");
    assert_eq!(get(&r, "hc_log_mentions_core"), "1");
    // Pointers into the hypervisor: BAD_ADDRESS (3), nothing changed.
    for k in [
        "status_into_protected",
        "status_straddling",
        "log_into_protected",
        "log_into_status_page",
        "counts_into_protected",
    ] {
        assert_eq!(get(&r, k), "3", "{k}");
    }
    assert_eq!(
        get(&r, "devirtualize_after_seal"),
        "2",
        "NOT_PERMITTED after seal"
    );
    assert_eq!(get(&r, "unknown_function"), "1");
    // The region reads as zeros and writes to it vanish.
    assert_eq!(get(&r, "protected_nonzero_qwords"), "0");
    assert_eq!(get(&r, "protected_writes_visible"), "0");
    assert_eq!(get(&r, "blocked_writes_delta"), "3");
    // And the core is intact afterwards (CRC via hypercall).
    assert_eq!(get(&r, "integrity_status"), "0");
    assert_eq!(get(&r, "integrity_expected"), get(&r, "integrity_current"));
    assert_eq!(get(&r, "integrity_canary"), "1");
    assert_eq!(get(&r, "cpu0_protected_exits"), "3");
    // The AP path: OVMF woke the virtualized AP with INIT-SIPI-SIPI, which
    // thinhv turned into a virtual INIT and a real-mode start.
    assert_eq!(get(&r, "ap_ran"), "1");
    assert_eq!(get(&r, "ap_signature"), "ThinHVThinHV");
    assert!(get(&r, "ap_init_exits").parse::<u64>().unwrap() >= 1);
    assert!(get(&r, "ap_sipi_exits").parse::<u64>().unwrap() >= 1);
    assert!(get(&r, "cpu0_cpuid_exits").parse::<u64>().unwrap() > 0);
    // Single-stepping over what thinhv emulates (CPUID, RDMSR EFER, the
    // hypercall) raises #DB right after each instruction, as bare
    // (`probe_bare_single_step`).
    assert_single_steps(&r, true);
    // An NMI sent while the guest's NMI handler runs arrives once, after
    // its IRET, never nested in it, as bare (`probe_bare_single_step`).
    assert_blocked_nmi_pending(&r);
    // Hypercall buffers in device memory (issue 11, item 7): every one
    // refused with BAD_ADDRESS (3), none written; a buffer in RAM works.
    for what in ["lapic", "hpet", "ecam", "vga_window", "above_ram"] {
        assert_eq!(
            get(&r, &format!("attack_hc_mmio_{what}")),
            "3",
            "a hypercall buffer in {what}"
        );
    }
    assert_eq!(get(&r, "attack_hc_mmio_iommu"), "none", "no IOMMU here");
    assert_eq!(get(&r, "attack_hc_ram_control"), "0");
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn probe_with_hidden_hypervisor() {
    let b = built();
    let boot = Boot::new(&b, "probe-hidden", Profile::svm(2));
    boot.esp.put_file(PROBE, &b.probe).unwrap();
    boot.esp
        .install_thinhv(
            &b.efi,
            Some(&format!(
                "[boot]\nnext = '{PROBE}'\n\n[cpu]\nhide_hypervisor = true\n"
            )),
        )
        .unwrap();
    let (serial, report) = run_probe(&boot);
    assert!(
        serial.contains("thinhv: 2 of 2 processors virtualized"),
        "{serial}"
    );
    let r = report.as_str();
    assert_eq!(get(r, "hypervisor_bit"), "0");
    assert_ne!(get(r, "signature"), "ThinHVThinHV");
    // Virtualization stays hidden even so.
    assert_eq!(get(r, "svm_bit"), "0");
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn probe_with_cpu_profile_x86_64_v2() {
    // The same processor without and with the profile: AVX2 and the AVX
    // state are there, then hidden and refused.
    let b = built();
    let native = Boot::new(&b, "probe-profile-host", Profile::svm(1));
    native.esp.put_file(PROBE, &b.probe).unwrap();
    native
        .esp
        .install_thinhv(&b.efi, Some(&format!("[boot]\nnext = '{PROBE}'\n")))
        .unwrap();
    let n = boot_probe(&native);
    let boot = Boot::new(&b, "probe-profile-v2", Profile::svm(2));
    boot.esp.put_file(PROBE, &b.probe).unwrap();
    boot.esp
        .install_thinhv(
            &b.efi,
            Some(&format!(
                "[boot]\nnext = '{PROBE}'\n\n[cpu]\nprofile = \"x86-64-v2\"\n"
            )),
        )
        .unwrap();
    let (serial, report) = run_probe(&boot);
    assert!(
        serial.contains("thinhv: CPU profile x86-64-v2:"),
        "{serial}"
    );
    let r = report.as_str();
    thinhv_tests::assert_probe_follows_profile(r, Some(&n), "x86-64-v2");
    // thinhv still announces itself and hides SVM under a profile.
    assert_eq!(get(r, "signature"), "ThinHVThinHV");
    assert_eq!(get(r, "svm_bit"), "0");
    // The AP sees the same masked features.
    assert_eq!(get(r, "ap_ran"), "1");
    assert_eq!(get(r, "ap_cpuid7_ebx"), get(r, "cpuid7_ebx"));
    assert_eq!(get(r, "ap_cpuid1_ecx"), get(r, "cpuid1_ecx"));
}

/// Each instruction the probe single-stepped trapped right after itself
/// (the #DB's RIP is the instruction's address plus its length) with
/// DR6.BS set. `hypercall`: thinhv is there to answer one.
fn assert_single_steps(r: &str, hypercall: bool) {
    let mut cases = vec![
        ("nop", 1),
        ("cpuid", 2),
        ("rdmsr_efer", 2),
        ("in_cfc", 1),
        ("apic_tpr", 2),
    ];
    if hypercall {
        cases.push(("hypercall", 3));
    }
    for (insn, len) in cases {
        assert_eq!(
            get(r, &format!("tf_after_{insn}")),
            len.to_string(),
            "#DB right after a single-stepped {insn} (0: no #DB)"
        );
        assert_eq!(get(r, &format!("tf_bs_{insn}")), "1", "DR6.BS for {insn}");
    }
    // A data breakpoint on the TPR: #DB right after the store, DR6.B0.
    assert_eq!(
        get(r, "db_after_apic_tpr"),
        "2",
        "#DB right after the store to a watched APIC register (0: none)"
    );
    assert_eq!(get(r, "db_b0_apic_tpr"), "1", "DR6.B0 for the TPR store");
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn probe_bare_single_step() {
    // The control for the single-step checks: the same probe as the boot
    // loader, no thinhv on the disk at all. The processor (the emulator)
    // raises each #DB itself.
    let b = built();
    let boot = Boot::new(&b, "probe-bare", Profile::svm(1));
    boot.esp
        .put_file(r"\EFI\BOOT\BOOTX64.EFI", &b.probe)
        .unwrap();
    let r = boot_probe(&boot);
    assert_eq!(get(&r, "thinhv"), "absent");
    assert_eq!(get(&r, "hypervisor_bit"), "0");
    assert_single_steps(&r, false);
    // The control for the NMI check: the processor holds the second NMI
    // until the handler's IRET and then delivers it.
    assert_blocked_nmi_pending(&r);
}

/// The probe's NMI handler sent itself a second NMI while running: it was
/// delivered exactly once more, after the IRET, not inside the handler
/// (`tests/efi-probe/src/nmi.rs`).
fn assert_blocked_nmi_pending(r: &str) {
    assert_eq!(
        get(r, "nmi_deliveries"),
        "2",
        "the NMI and the one sent from its handler, each delivered once"
    );
    assert_eq!(
        get(r, "nmi_nested"),
        "0",
        "the second NMI must wait for the first handler's IRET"
    );
}
