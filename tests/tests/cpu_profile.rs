//! Processor compatibility mode: Linux under thinhv with `[cpu] profile =
//! "x86-64-v2"` reports in `/proc/cpuinfo` exactly the profile's features
//! that the processor has — nothing more, nothing less — on every CPU.
use thinhv_config::profile::{allowed, comparable};
use thinhv_ovmf::qemu::Profile;
use thinhv_tests::{Boot, KERNEL, boot_linux, built, linux_config, test_options};

fn flags(g: &thinhv_tests::Guest) -> Vec<String> {
    let mut v: Vec<String> = g
        .get("flags_cpu0")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Flags Linux sets from other facts, whatever CPUID says; each with the
/// reason. The profile cannot hide these from `/proc/cpuinfo`.
const LINUX_INFERRED: &[(&str, &str)] = &[(
    "3dnowprefetch",
    "init_amd() sets it on every 64-bit AMD processor (PREFETCHW exists on all of them)",
)];

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn linux_cpuinfo_matches_the_x86_64_v2_profile() {
    let b = built();
    // The processor's own flags: the same machine, thinhv disabled.
    let native = Boot::new(&b, "profile-native", Profile::svm(2));
    native.esp.install_linux(&b.linux).unwrap();
    native
        .esp
        .install_thinhv(
            &b.efi,
            Some(&format!(
                "[hypervisor]\nenabled = false\n\n[boot]\nnext = '{KERNEL}'\noptions = '{}'\n",
                test_options()
            )),
        )
        .unwrap();
    let n = boot_linux(&native);
    assert_eq!(
        n.status.as_ref().map(|s| s["present"].clone()),
        Some(serde_json::Value::Bool(false)),
        "thinhv must be absent in the reference boot"
    );
    let native_flags = flags(&n);

    let boot = Boot::new(&b, "profile-v2", Profile::svm(2));
    boot.esp.install_linux(&b.linux).unwrap();
    boot.esp
        .install_thinhv(
            &b.efi,
            Some(&linux_config("[cpu]\nprofile = \"x86-64-v2\"\n")),
        )
        .unwrap();
    let g = boot_linux(&boot);
    assert!(
        g.serial.contains("thinhv: 2 of 2 processors virtualized"),
        "{}",
        g.serial
    );
    let got = flags(&g);
    let v2 = allowed("x86-64-v2").unwrap();
    let governed = comparable();
    let expected: Vec<&str> = governed
        .iter()
        .copied()
        .filter(|f| {
            native_flags.iter().any(|n| n == f)
                && (v2.contains(f) || LINUX_INFERRED.iter().any(|(l, _)| l == f))
        })
        .collect();
    let shown: Vec<&str> = governed
        .iter()
        .copied()
        .filter(|f| got.iter().any(|g| g == f))
        .collect();
    assert_eq!(
        shown, expected,
        "/proc/cpuinfo under x86-64-v2 (left) differs from the profile ∩ processor (right)\n\
         native: {native_flags:?}\nunder thinhv: {got:?}"
    );
    // The test means something: the processor has features v2 hides.
    for f in ["avx", "avx2", "bmi2"] {
        assert!(native_flags.iter().any(|n| n == f), "native lacks {f}");
        assert!(!got.iter().any(|n| n == f), "{f} visible under x86-64-v2");
    }
    // Every CPU shows the same flags.
    assert_eq!(g.get("flags_variants"), "1");
    assert_eq!(g.get("online"), "0-1");
}
