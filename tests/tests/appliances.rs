//! Appliance partitions (issue 12): what the OS sees and can reach once an
//! appliance has taken cores and memory. QEMU TCG, q35, `-smp 4`, AMD-Vi
//! off (the IOMMU is VT-d), Linux 6.1 as the OS.
use thinhv_ovmf::esp::kernel_options;
use thinhv_ovmf::qemu::Profile;
use thinhv_tests::{Boot, Guest, boot_linux, built, cpu_list_len};

const APPLIANCE: &str = "
[[appliance]]
name = \"store\"
cpus = 2
memory = 256
kernel = '\\EFI\\appliance\\vmlinuz'
";

fn os_with(name: &str, extra_config: &str, options: &str) -> Guest {
    let b = built();
    let mut m = Profile::svm(4);
    m.extra = ["-device", "intel-iommu"].map(String::from).to_vec();
    let boot = Boot::new(&b, name, m);
    boot.esp.install_linux(&b.linux).unwrap();
    let config = thinhv_ovmf::esp::config_booting(
        thinhv_ovmf::esp::KERNEL,
        Some(&kernel_options(&format!("quiet thinhv_test=1 {options}"))),
        &format!("\n[iommu]\nmode = \"protect\"\n{extra_config}"),
    );
    boot.esp.install_thinhv(&b.efi, Some(&config)).unwrap();
    boot_linux(&boot)
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn the_os_loses_the_appliance_cpus_and_ram_from_every_view() {
    let g = os_with("appliance-carve", APPLIANCE, "thinhv_appliance_probe=1");
    // The loader's decision and the carve.
    assert!(
        g.serial
            .contains("appliance \"store\": APIC IDs [2, 3], 256 MiB at"),
        "{}",
        g.serial
    );
    assert!(
        g.serial
            .contains("MADT: 2 appliance processor entries removed"),
        "{}",
        g.serial
    );
    // CPUs: two, and none to hot-plug.
    assert_eq!(cpu_list_len(g.get("online")), 2, "{}", g.facts);
    assert_eq!(cpu_list_len(g.get("possible")), 2, "{}", g.facts);
    assert_eq!(cpu_list_len(g.get("present")), 2, "{}", g.facts);
    // Memory: reserved in the OS's map, and /dev/mem reaches nothing.
    let ram = g.get("appliance_ram");
    assert!(ram.starts_with("0x"), "{}", g.facts);
    assert!(
        g.get("appliance_ram_memmap").starts_with("Reserved"),
        "{}",
        g.facts
    );
    assert_eq!(g.get("appliance_ram_nonzero_bytes"), "0", "{}", g.facts);
    assert_ne!(
        g.get("appliance_ram_written"),
        g.get("appliance_ram_read"),
        "{}",
        g.facts
    );
    // The appliance's processors were claimed after ExitBootServices.
    let log = g.log.as_ref().expect("thinhv log --json")["log"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        log.contains("appliance \"store\" (partition 1): 2 processor(s) claimed, state stopped"),
        "{log}"
    );
}
