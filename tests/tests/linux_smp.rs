//! Linux under thinhv brings every CPU online; the guest sees the
//! hypervisor; the status tool agrees; user mode cannot reach thinhv.
use thinhv_ovmf::qemu::Profile;
use thinhv_tests::{Boot, boot_linux, built, cpu_list_len, linux_config};

#[allow(clippy::many_single_char_names)]
fn smp(n: u32) {
    let b = built();
    let boot = Boot::new(&b, &format!("linux-smp{n}"), Profile::svm(n));
    let n = n as usize;
    boot.esp.install_linux(&b.linux).unwrap();
    boot.esp
        .install_thinhv(&b.efi, Some(&linux_config("")))
        .unwrap();
    let g = boot_linux(&boot);

    // The loader virtualized every CPU before the OS.
    assert!(
        g.serial
            .contains(&format!("thinhv: {n} of {n} processors virtualized")),
        "{}",
        g.serial
    );
    // Linux brought every CPU online through thinhv's INIT/SIPI handling.
    assert_eq!(cpu_list_len(g.get("online")), n, "online CPUs");
    assert_eq!(g.get("nproc"), n.to_string());
    // /proc/cpuinfo shows the hypervisor flag on every CPU (QEMU's own bit
    // is off in this profile, so this is thinhv's).
    assert_eq!(g.get("cpuinfo_hypervisor"), n.to_string());

    let s = g.status.as_ref().expect("thinhv status --json");
    assert_eq!(s["present"], true);
    assert_eq!(s["signature"], "ThinHVThinHV");
    assert_eq!(s["cpus_virtualized"], n as u64);
    assert_eq!(s["cpus_expected"], n as u64);
    assert_eq!(s["sealed"], true);
    let reserved = s["bytes_reserved"].as_u64().unwrap();
    assert!(reserved > 0 && reserved < 4 << 20, "reserved {reserved}");
    let cpus = s["cpus"].as_array().unwrap();
    assert_eq!(cpus.len(), n);
    for c in cpus {
        assert_eq!(c["state"], "running", "{c}");
        assert!(
            c["exits"]["cpuid"].as_u64().unwrap() > 0,
            "every CPU took CPUID exits: {c}"
        );
    }
    // Every AP went through thinhv's INIT/SIPI path (at least once for
    // the firmware and once for Linux).
    for c in &cpus[1..] {
        assert!(c["exits"]["sipi"].as_u64().unwrap() >= 2, "{c}");
    }
    let log = s["log"].as_str().unwrap();
    for i in 0..n {
        assert!(
            log.contains(&format!("cpu {i} (APIC")),
            "log lacks cpu {i}: {log}"
        );
    }

    // Self-protection and hypercall refusal, checked from user mode.
    assert_eq!(
        g.selftest("user_hypercall_status"),
        "2",
        "CPL 3 hypercall must be NOT_PERMITTED"
    );
    assert_eq!(g.selftest("protected_read_nonzero"), "0");
    assert_eq!(
        g.selftest("protected_read_bytes"),
        s["protected_size"].as_u64().unwrap().to_string(),
        "the whole region was read"
    );
    for i in 0..3 {
        assert_eq!(g.selftest(&format!("protected_write{i}_visible")), "0");
    }
    let delta: u64 = g.selftest("blocked_writes_delta").parse().unwrap();
    assert!(
        delta >= 3,
        "writes were not blocked by thinhv (delta {delta})"
    );
    assert_eq!(
        g.selftest("integrity_expected_crc"),
        g.selftest("integrity_current_crc")
    );
    assert_eq!(g.selftest("integrity_canary_ok"), "1");
    assert_eq!(g.selftest("selftest_failures"), "0");
    // The device inventory thinhv took through ECAM before the OS matches
    // what Linux enumerated, function for function; all owned by the OS.
    let d = g.devices.as_ref().expect("thinhv devices --json");
    let mut inventory: Vec<&str> = d["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["bdf"].as_str().unwrap())
        .collect();
    inventory.sort_unstable();
    let mut linux: Vec<&str> = g.get("pci_sysfs").split_whitespace().collect();
    linux.sort_unstable();
    assert_eq!(
        inventory, linux,
        "thinhv's inventory vs /sys/bus/pci/devices"
    );
    assert!(
        d["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["owner"] == "os")
    );
    assert!(
        d["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["bdf"] == "0000:00:00.0"
                && x["vendor_id"] == "8086"
                && x["class_name"] == "host bridge"),
        "{d}"
    );
    assert_eq!(s["devices"], d["devices"].as_array().unwrap().len());
    assert_eq!(s["iommu"]["managed"], false);
    assert!(g.serial.contains("thinhv: PCI: "), "{}", g.serial);
    // The log as JSON is the same ring as in the status.
    let l = g.log.as_ref().expect("thinhv log --json");
    assert!(l["log"].as_str().unwrap().contains("cpu 0 (APIC"));
    assert!(l["bytes_written"].as_u64().unwrap() > 0);
    assert!(
        g.facts.contains("5 functions")
            && g.facts
                .contains("IOMMU:              none driven by thinhv"),
        "thinhv devices table: {}",
        g.facts
    );
    // The human-readable status tool works too.
    assert!(
        g.facts.contains(&format!("CPUs virtualized:   {n} of {n}")),
        "{}",
        g.facts
    );
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn linux_smp2() {
    smp(2);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn linux_smp4() {
    smp(4);
}
