//! The attack suite, PCI configuration ports (issue 11, item 6): Linux
//! under thinhv with a NIC hidden (the hidden-NIC scenario of
//! `ownership.rs`, on two CPUs) runs, as root with I/O privilege, what a
//! hostile kernel tries against the legacy configuration mechanism:
//!
//! * `cf8-race`: one CPU keeps moving CONFIG_ADDRESS between another
//!   function and the hidden one while the other selects the hidden one
//!   and reads CONFIG_DATA — the check-then-access race a machine-wide
//!   latch allows;
//! * `cfc-overlap`: accesses that straddle the data window (IN/OUT at
//!   0xCFA, 0xCFB) with the hidden function selected.
//!
//! Neither may ever return the hidden function's ID or change its Command
//! register. The control, in the same boot: the same tool aimed at a
//! function Linux owns (the host bridge) reads the real ID through both,
//! so the tool does see a success when there is one.
use thinhv_ovmf::qemu::Profile;
use thinhv_tests::{attack_results, boot_linux_under_thinhv};

const HIDDEN: &str = "00:07.0";
const VISIBLE: &str = "00:00.0";

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn attacks_pci_on_the_configuration_ports_never_reach_a_hidden_function() {
    let mut m = Profile::svm(2);
    m.extra = [
        "-device",
        "intel-iommu",
        "-netdev",
        "user,id=n1",
        "-device",
        "e1000e,netdev=n1,addr=0x7",
    ]
    .map(String::from)
    .to_vec();
    let attacks = [
        ("cf8-race", HIDDEN),
        ("cfc-overlap", HIDDEN),
        ("cf8-race", VISIBLE),
        ("cfc-overlap", VISIBLE),
    ];
    let options: Vec<String> = attacks
        .iter()
        .map(|(a, bdf)| format!("thinhv_attack={a}/{bdf}"))
        .collect();
    let g = boot_linux_under_thinhv(
        "attacks-pci",
        m,
        &options.join(" "),
        &format!("\n[[device]]\nmatch = \"0000:{HIDDEN}\"\nowner = \"hidden\"\n"),
    );
    // The scenario holds: thinhv runs on both CPUs, the NIC is hidden.
    let s = g.status.as_ref().expect("thinhv status");
    assert_eq!(s["cpus_virtualized"], 2, "{s}");
    assert!(
        g.serial
            .contains("0000:00:07.0 8086:10d3 Ethernet controller owner=hidden ([[device]] #1)"),
        "{}",
        g.serial
    );
    assert!(
        !g.get("pci_sysfs").contains(&format!("0000:{HIDDEN}")),
        "{}",
        g.get("pci_sysfs")
    );
    let results = attack_results(&g.facts);
    let names: Vec<&str> = results.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        names,
        attacks.map(|a| a.0),
        "one result per attack, in order:\n{}",
        g.facts
    );
    for ((name, bdf), (_, attempts, succeeded)) in attacks.iter().zip(&results) {
        eprintln!("attack {name} on {bdf}: attempts={attempts} succeeded={succeeded}");
        assert!(
            *attempts > 0,
            "attack {name} on {bdf} did not run:\n{}",
            g.facts
        );
        if *bdf == HIDDEN {
            assert_eq!(
                *succeeded, 0,
                "attack {name} reached the hidden function:\n{}",
                g.facts
            );
        } else {
            // The control: aimed at a function the OS owns, the same
            // accesses read its ID (every one: each CPU's latch is its own).
            assert!(
                *succeeded > 0,
                "attack {name} cannot even see a function Linux owns:\n{}",
                g.facts
            );
        }
    }
    // cf8-race: the race ran long enough to matter.
    assert!(results[0].1 >= 1000, "{:?}", results[0]);
    // The attempts went through thinhv's configuration-port mediation (the
    // status is taken after the attacks): each read of the race is an OUT
    // to 0xCF8 and an IN from 0xCFC, both exits.
    let exits = s["exits_total"]["pci_config"].as_u64().unwrap_or(0);
    assert!(
        exits >= 2 * (results[0].1 + results[2].1),
        "{exits} configuration exits for {results:?}"
    );
}
