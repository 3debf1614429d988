//! thinhv must never be the reason a server does not boot: every failure
//! before the OS is handed over is reported, and the OS boots without the
//! hypervisor (all CPUs native), unless `required = true`.
use std::time::Duration;
use thinhv_ovmf::qemu::Profile;
use thinhv_tests::{
    Boot, Guest, PROBE, boot_linux, boot_probe, built, cpu_list_len, linux_config, test_options,
};

/// Linux came up natively: all CPUs online, no hypervisor.
fn assert_native(g: &Guest, n: usize) {
    assert!(
        g.serial
            .contains("thinhv: booting the operating system without the hypervisor"),
        "{}",
        g.serial
    );
    assert_eq!(cpu_list_len(g.get("online")), n);
    assert_eq!(g.get("cpuinfo_hypervisor"), "0");
    assert!(
        g.status.as_ref().is_some_and(|s| s["present"] == false),
        "{:?}",
        g.status
    );
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn no_svm_boots_linux_natively() {
    let b = built();
    let boot = Boot::new(&b, "no-svm", Profile::no_svm(2));
    boot.esp.install_linux(&b.linux).unwrap();
    boot.esp
        .install_thinhv(&b.efi, Some(&linux_config("")))
        .unwrap();
    let g = boot_linux(&boot);
    assert!(
        g.serial.contains("does not report AMD-V (SVM)"),
        "{}",
        g.serial
    );
    assert_native(&g, 2);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn malformed_config_names_the_line_and_boots_linux() {
    let b = built();
    let boot = Boot::new(&b, "bad-config", Profile::svm(2));
    boot.esp.install_linux(&b.linux).unwrap();
    // Line 3 has an unterminated string; [boot] is intact and honoured.
    let text = format!(
        "[hypervisor]\nrequired = false\nlog_level = \"info\n\n[boot]\nnext = '{}'\noptions = '{}'\n",
        thinhv_tests::KERNEL,
        test_options()
    );
    boot.esp.install_thinhv(&b.efi, Some(&text)).unwrap();
    let g = boot_linux(&boot);
    assert!(
        g.serial.contains("thinhv.toml:3:"),
        "the line must be named: {}",
        g.serial
    );
    assert!(g.serial.contains("configuration error"), "{}", g.serial);
    assert_native(&g, 2);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn unknown_key_names_the_line() {
    let b = built();
    let boot = Boot::new(&b, "unknown-key", Profile::svm(1));
    boot.esp.put_file(PROBE, &b.probe).unwrap();
    let text = format!("[boot]\nnext = '{PROBE}'\n\n[cpu]\nhide_hypervisr = true\n");
    boot.esp.install_thinhv(&b.efi, Some(&text)).unwrap();
    let serial = boot.run_until("THINHV-PROBE-END", Duration::from_mins(4));
    assert!(serial.contains("thinhv.toml:5:"), "{serial}");
    assert!(serial.contains("hide_hypervisr"), "{serial}");
    let r =
        thinhv_ovmf::runner::section(&serial, "THINHV-PROBE-BEGIN", "THINHV-PROBE-END").unwrap();
    assert_eq!(
        thinhv_ovmf::runner::value(r, "thinhv"),
        Some("absent"),
        "{r}"
    );
}

/// A copy of thinhv.efi with one byte of the embedded core flipped.
fn corrupted_efi(b: &thinhv_tests::Built) -> std::path::PathBuf {
    let mut bytes = std::fs::read(&b.efi).unwrap();
    let magic = b"THINHV-CORE-BLOB";
    let at = bytes
        .windows(magic.len())
        .position(|w| w == magic)
        .expect("core blob in thinhv.efi");
    // Header is 32 bytes; flip a byte well inside the ELF.
    let target = at + 32 + 0x2000;
    bytes[target] ^= 0x55;
    let p = b.work.join("corrupted-thinhv.efi");
    std::fs::create_dir_all(&b.work).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn corrupted_core_is_refused_and_linux_boots() {
    let b = built();
    let efi = corrupted_efi(&b);
    let boot = Boot::new(&b, "corrupt-core", Profile::svm(2));
    boot.esp.install_linux(&b.linux).unwrap();
    boot.esp
        .install_thinhv(&efi, Some(&linux_config("")))
        .unwrap();
    let g = boot_linux(&boot);
    assert!(
        g.serial.contains("the embedded core is corrupted"),
        "{}",
        g.serial
    );
    assert_native(&g, 2);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn failing_ap_rolls_back_every_cpu() {
    let b = built();
    let boot = Boot::new(&b, "rollback", Profile::svm(4));
    boot.esp.install_linux(&b.linux).unwrap();
    boot.esp
        .install_thinhv(&b.efi, Some(&linux_config("\n[debug]\nfail_cpu = 2\n")))
        .unwrap();
    let g = boot_linux(&boot);
    assert!(
        g.serial
            .contains("processor 2 (APIC 2) could not be virtualized"),
        "{}",
        g.serial
    );
    assert!(
        g.serial
            .contains("every processor was returned to native mode"),
        "{}",
        g.serial
    );
    // CPUs 0, 1 and 3 had entered guest mode and left it again.
    for c in [0, 1, 3] {
        assert!(
            g.serial
                .contains(&format!("cpu {c} (APIC {c}): entering guest mode")),
            "{}",
            g.serial
        );
    }
    assert!(
        g.serial.matches("leaving guest mode (roll-back)").count() == 3,
        "{}",
        g.serial
    );
    assert_native(&g, 4);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn an_exception_in_the_hypervisor_is_reported_then_resets() {
    let b = built();
    let boot = Boot::new(&b, "host-fault", Profile::svm(2));
    boot.esp.put_file(PROBE, &b.probe).unwrap();
    let text = format!(
        "[hypervisor]\non_fatal = \"reset\"\n\n[boot]\nnext = '{PROBE}'\n\n[debug]\nhost_fault = true\n"
    );
    boot.esp.install_thinhv(&b.efi, Some(&text)).unwrap();
    let mut run = boot.start();
    run.wait_for("resetting the platform", Duration::from_mins(2))
        .unwrap_or_else(|e| panic!("{e}\n{}", run.output()));
    // The reset ends QEMU (-no-reboot): nothing hangs.
    let status = run
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", run.output()));
    let out = run.output();
    assert!(status.success(), "{status}");
    assert!(
        out.contains("FATAL exception 6 (error 0x0) in host mode"),
        "{out}"
    );
    assert!(
        out.contains(" rax 0x") && out.contains(" r15 0x"),
        "registers are printed: {out}"
    );
    assert!(
        !out.contains("THINHV-PROBE-BEGIN"),
        "nothing ran after the fault: {out}"
    );
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn required_without_svm_stops_the_boot() {
    let b = built();
    let boot = Boot::new(&b, "required-no-svm", Profile::no_svm(1));
    boot.esp.install_linux(&b.linux).unwrap();
    boot.esp
        .install_thinhv(
            &b.efi,
            Some(&linux_config("").replace("[hypervisor]\n", "[hypervisor]\nrequired = true\n")),
        )
        .unwrap();
    let mut run = boot.start();
    run.wait_for("THE SYSTEM IS STOPPED", Duration::from_mins(2))
        .unwrap_or_else(|e| panic!("{e}\n{}", run.output()));
    // Give a wrongly continuing boot time to show itself.
    let r = run.wait_for("Linux version", Duration::from_secs(15));
    let out = run.output();
    assert!(
        r.is_err(),
        "Linux started although thinhv was required:\n{out}"
    );
    assert!(
        out.contains("does not report AMD-V (SVM)"),
        "the reason is on screen: {out}"
    );
    assert!(out.contains("Press any key to restart"), "{out}");
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn without_boot_next_the_next_bootorder_entry_runs() {
    // No thinhv.toml at all: defaults, hypervisor on, chain-load the entry
    // after ours in BootOrder: OVMF's UEFI Shell, which runs startup.nsh.
    let b = built();
    let boot = Boot::new(&b, "bootorder", Profile::svm(2));
    boot.esp.put_file(PROBE, &b.probe).unwrap();
    boot.esp.install_thinhv(&b.efi, None).unwrap();
    boot.esp
        .put_bytes(r"\startup.nsh", format!("{PROBE}\r\n").as_bytes())
        .unwrap();
    let r = boot_probe(&boot);
    assert_eq!(
        thinhv_ovmf::runner::value(&r, "signature"),
        Some("ThinHVThinHV"),
        "{r}"
    );
    assert_eq!(
        thinhv_ovmf::runner::value(&r, "status_cpus_virtualized"),
        Some("2"),
        "{r}"
    );
}
