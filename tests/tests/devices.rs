//! The device inventory: thinhv walks PCI through ECAM before the OS and
//! reports every function, with SR-IOV state, through `thinhv devices`.
use thinhv_ovmf::qemu::Profile;
use thinhv_tests::{Boot, boot_linux, built, linux_config};

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn inventory_shows_an_sriov_nic_behind_a_root_port() {
    let b = built();
    let mut p = Profile::svm(2);
    p.extra = thinhv_ovmf::qemu::IGB_BEHIND_ROOT_PORT
        .map(String::from)
        .to_vec();
    let boot = Boot::new(&b, "devices-igb", p);
    boot.esp.install_linux(&b.linux).unwrap();
    boot.esp
        .install_thinhv(&b.efi, Some(&linux_config("")))
        .unwrap();
    let g = boot_linux(&boot);
    // The boot console lists the NIC with its SR-IOV capability.
    assert!(
        g.serial.contains(
            "8086:10c9 Ethernet controller owner=os (default) iommu: no IOMMU sr-iov: TotalVFs 8"
        ),
        "{}",
        g.serial
    );
    let d = g.devices.as_ref().expect("thinhv devices --json");
    let list = d["devices"].as_array().unwrap();
    let nic = list
        .iter()
        .find(|x| x["device_id"] == "10c9")
        .unwrap_or_else(|| panic!("no igb in {d}"));
    let bdf = nic["bdf"].as_str().unwrap();
    assert_eq!(nic["class_name"], "Ethernet controller");
    assert_eq!(nic["pcie"], true);
    assert_eq!(nic["owner"], "os");
    // TotalVFs as the device reports it equals what Linux reads; no VF
    // budget is configured, so the OS sees them all.
    // Without a budget the OS reads the device's TotalVFs (8); Linux's igb
    // driver then lowers sriov_totalvfs to the 82576's 7 itself
    // (pci_sriov_set_totalvfs).
    let linux_total: u64 = g.get(&format!("sriov_totalvfs_{bdf}")).parse().unwrap();
    assert_eq!(nic["sriov"]["total_vfs"], 8);
    assert_eq!(nic["sriov"]["total_vfs_seen_by_os"], 8);
    assert_eq!(
        linux_total, 7,
        "igb's own limit below the 8 the OS was shown"
    );
    assert_eq!(nic["sriov"]["vf_device_id"], "10ca");
    // The root port leads to it: the walk followed the bridge.
    assert!(
        list.iter()
            .any(|x| x["class_name"] == "PCI bridge" && x["bdf"].as_str().unwrap() < bdf)
    );
    let mut inventory: Vec<&str> = list.iter().map(|x| x["bdf"].as_str().unwrap()).collect();
    inventory.sort_unstable();
    let mut linux: Vec<&str> = g.get("pci_sysfs").split_whitespace().collect();
    linux.sort_unstable();
    assert_eq!(inventory, linux);
}
