use super::*;

#[test]
fn empty_file_gives_defaults() {
    let c = Config::parse("").unwrap();
    assert_eq!(c, Config::default());
    assert!(!c.hypervisor.required);
    assert_eq!(c.hypervisor.serial, Serial::Port(0x3f8));
    assert_eq!(c.hypervisor.log_level, LogLevel::Info);
    assert_eq!(c.boot.next, None);
}

#[test]
fn full_file_parses() {
    let text = r#"
# thinhv configuration
[hypervisor]
enabled = true
required = true
log_level = "debug"
serial = 0x2f8
on_fatal = "reset"

[boot]
next = '\EFI\Linux\vmlinuz.efi'
options = "console=ttyS0 initrd=\\EFI\\Linux\\initrd.img"

[cpu]
hide_hypervisor = true
init_sipi = "intercept"
"#;
    let c = Config::parse(text).unwrap();
    assert!(c.hypervisor.required);
    assert_eq!(c.hypervisor.log_level, LogLevel::Debug);
    assert_eq!(c.hypervisor.serial, Serial::Port(0x2f8));
    assert_eq!(c.hypervisor.on_fatal, OnFatal::Reset);
    assert_eq!(c.next_path().unwrap(), "\\EFI\\Linux\\vmlinuz.efi");
    assert_eq!(
        c.boot.options.as_deref(),
        Some("console=ttyS0 initrd=\\EFI\\Linux\\initrd.img")
    );
    assert!(c.cpu.hide_hypervisor);
    assert_eq!(c.cpu.init_sipi, InitSipi::Intercept);
    // The effective settings parse back to the same configuration.
    assert_eq!(Config::parse(&c.effective()).unwrap(), c);
}

#[test]
fn serial_spellings() {
    for (v, want) in [
        ("\"none\"", Serial::None),
        ("\"COM2\"", Serial::Port(0x2f8)),
        ("\"0x3e8\"", Serial::Port(0x3e8)),
        ("1016", Serial::Port(0x3f8)),
    ] {
        let c = Config::parse(&format!("[hypervisor]\nserial = {v}\n")).unwrap();
        assert_eq!(c.hypervisor.serial, want, "{v}");
    }
    for bad in ["0", "70000", "-1", "\"com9\"", "true"] {
        let e = Config::parse(&format!("[hypervisor]\nserial = {bad}\n")).unwrap_err();
        assert_eq!(e.line, Some(2), "{bad}: {e}");
        assert!(
            e.message.contains("serial") || e.message.contains("I/O port"),
            "{e}"
        );
    }
}

#[test]
fn syntax_error_names_the_line() {
    let text = "[hypervisor]\nrequired = false\n\n[boot]\nnext = '\\EFI\\x.efi'\noptions = \"unterminated\n";
    let e = Config::parse(text).unwrap_err();
    assert_eq!(e.line, Some(6), "{e}");
    assert!(e.to_string().starts_with("thinhv.toml:6:"), "{e}");
}

#[test]
fn unknown_key_names_the_line_and_key() {
    let text = "[hypervisor]\nrequired = false\nlog_levle = \"info\"\n";
    let e = Config::parse(text).unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    assert!(e.message.contains("log_levle"), "{e}");
    let e = Config::parse("[hypervisr]\n").unwrap_err();
    assert_eq!(e.line, Some(1), "{e}");
    assert!(e.message.contains("hypervisr"), "{e}");
}

#[test]
fn wrong_types_and_values_name_the_line() {
    let cases = [
        ("[hypervisor]\nrequired = \"yes\"\n", 2),
        ("[hypervisor]\n\nlog_level = \"loud\"\n", 3),
        ("[cpu]\nhide_hypervisor = 1\n", 2),
        ("[boot]\nnext = 'EFI\\x.efi'\n", 2),
        ("[boot]\nnext = '\\EFI\\..\\x.efi'\n", 2),
        ("[boot]\noptions = \"console=ttyS0\"\n", 2),
        ("[hypervisor]\non_fatal = \"reboot\"\n", 2),
    ];
    for (text, line) in cases {
        let e = Config::parse(text).unwrap_err();
        assert_eq!(e.line, Some(line), "{text:?}: {e}");
    }
}

#[test]
fn salvage_recovers_boot_keys_from_a_broken_file() {
    let text = "[hypervisor]\nrequired = true\nlog_level = \"info\n\n[boot]\nnext = '\\EFI\\Linux\\vmlinuz.efi'\noptions = \"console=ttyS0 initrd=\\\\EFI\\\\Linux\\\\initrd.img\"\n";
    assert!(Config::parse(text).is_err());
    let s = salvage(text);
    assert!(s.required);
    assert_eq!(s.next.as_deref(), Some("\\EFI\\Linux\\vmlinuz.efi"));
    assert_eq!(
        s.options.as_deref(),
        Some("console=ttyS0 initrd=\\EFI\\Linux\\initrd.img")
    );
}

#[test]
fn salvage_treats_unclear_required_as_true() {
    assert!(salvage("[hypervisor]\nrequired = tru\n").required);
    assert!(!salvage("[hypervisor]\nrequired = false # no\n").required);
    assert!(!salvage("[boot]\nrequired = true\n").required);
    assert!(!salvage("").required);
}

#[test]
fn line_col_counts_from_one() {
    assert_eq!(line_col("ab\ncd", 0), (1, 1));
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
    assert_eq!(line_col("ab", 99), (1, 3));
}

#[test]
fn debug_keys_round_trip() {
    let c = Config::parse("[debug]\nfail_cpu = 2\nhost_fault = true\n").unwrap();
    assert_eq!(c.debug.fail_cpu, Some(2));
    assert!(c.debug.host_fault);
    assert_eq!(Config::parse(&c.effective()).unwrap(), c);
}

#[test]
fn disabled_hypervisor_and_contradictions() {
    let c = Config::parse("[hypervisor]\nenabled = false\n").unwrap();
    assert!(!c.hypervisor.enabled);
    let e = Config::parse("[hypervisor]\nrequired = true\nenabled = false\n").unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
}

#[test]
fn cpu_profile_hide_and_masks_parse_and_round_trip() {
    let text = "[cpu]\nprofile = \"x86-64-v3\"\nhide = [\"avx2\"]\n\n[[cpu.mask]]\nleaf = 6\neax = 0xfffffffb\n";
    let c = Config::parse(text).unwrap();
    assert_eq!(c.cpu.profile, "x86-64-v3");
    assert_eq!(c.cpu.hide, ["avx2"]);
    assert_eq!(c.cpu.mask.len(), 1);
    assert_eq!(c.cpu.mask[0].eax, Some(0xffff_fffb));
    let p = c.cpu.cpuid_profile().unwrap();
    assert_eq!(p.active, 1);
    let eff = c.effective();
    assert!(eff.contains("profile = \"x86-64-v3\""), "{eff}");
    assert!(eff.contains("XCR0 allowed: 0x7"), "{eff}");
    assert_eq!(Config::parse(&eff).unwrap(), c);
    // Defaults: host, nothing masked.
    let d = Config::parse("").unwrap();
    assert_eq!(d.cpu.profile, "host");
    assert_eq!(d.cpu.cpuid_profile().unwrap().active, 0);
}

#[test]
fn cpu_profile_errors_name_the_line() {
    let e = Config::parse("[boot]\n\n[cpu]\nprofile = \"pentium\"\n").unwrap_err();
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.message.contains("x86-64-v2"), "{e}");
    let e = Config::parse("[cpu]\nhide_hypervisor = false\nhide = [\"avx9\"]\n").unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    let e = Config::parse("[cpu]\n\n[[cpu.mask]]\nleaf = 0x40000001\necx = 0\n").unwrap_err();
    assert_eq!(e.line, Some(4), "{e}");
    let e = Config::parse("[[cpu.mask]]\nleaf = 7\nebx = 0x1ffffffff\n").unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    let e = Config::parse("[[cpu.mask]]\nleaf = 7\nesi = 0\n").unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
}

#[test]
fn the_documented_example_parses_and_every_profile_is_documented() {
    let doc = include_str!("../../docs/configuration.md");
    let example = doc
        .split("## Example")
        .nth(1)
        .and_then(|s| s.split("```toml").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("example block");
    let c = Config::parse(example).unwrap_or_else(|e| panic!("{e}\n{example}"));
    assert_eq!(c.cpu.profile, "x86-64-v3");
    let profiles = include_str!("../../docs/cpu-profiles.md");
    for name in crate::profile::profile_names() {
        assert!(
            profiles.contains(&format!("`{name}`")),
            "{name} undocumented"
        );
        assert!(
            doc.contains(&format!("`{name}`")),
            "{name} not in configuration.md"
        );
    }
}

#[test]
fn device_and_sriov_rules() {
    let text = "[iommu]\nmode = \"protect\"\n\n[[device]]\nmatch = \"0000:02:00.0\"\nowner = \"hidden\"\n\n[[device]] # NICs\nmatch = \"class:nic\"\n\n[[sriov]]\ndevice = \"8086:10c9\"\nos_vfs = 2\n";
    let c = Config::parse(text).unwrap();
    assert_eq!(c.device.len(), 2);
    assert_eq!(c.device[0].matcher, "0000:02:00.0");
    assert_eq!(c.device[0].owner, "hidden");
    assert_eq!(c.device[1].owner, "os", "owner defaults to os");
    assert_eq!(c.sriov[0].os_vfs, 2);
    assert_eq!(
        (c.device[0].line, c.device[1].line, c.sriov[0].line),
        (Some(4), Some(8), Some(11))
    );
    assert_eq!(table_line(text, "device", 0), Some(4));
    assert_eq!(table_line(text, "device", 1), Some(8));
    assert_eq!(table_line(text, "sriov", 0), Some(11));
    assert_eq!(table_line(text, "sriov", 1), None);
    // Round trip through the effective settings.
    let again = Config::parse(&c.effective()).unwrap();
    let key = |c: &Config| {
        (
            c.device
                .iter()
                .map(|d| (d.matcher.clone(), d.owner.clone()))
                .collect::<Vec<_>>(),
            c.sriov
                .iter()
                .map(|d| (d.device.clone(), d.os_vfs))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(key(&again), key(&c));
    // Malformed values are the policy's to report at boot (the file still
    // parses); a wrong key or type is a file error with its line.
    assert!(Config::parse("[[device]]\nmatch = \"0000:zz:00.0\"\n").is_ok());
    let e = Config::parse("[[device]]\nmatch = \"x\"\nowners = \"os\"\n").unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    let e = Config::parse("[[sriov]]\ndevice = \"x\"\nos_vfs = -1\n").unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    let e = Config::parse("[[sriov]]\nos_vfs = 1\n").unwrap_err();
    assert!(e.message.contains("device"), "{e}");
}

#[test]
fn appliance_tables_parse_with_defaults_and_round_trip() {
    let text = r#"
[[device]]
match = "0000:03:00.0"
owner = "hidden"

[[appliance]]
name = "storage-1"
cpus = 2
memory = 256
kernel = '\EFI\appliance\vmlinuz'
initrd = "/EFI/appliance/initrd.img"
cmdline = "console=ttyS0 quiet"
devices = ["8086:10d3"]
on_crash = "stop"
control = "none"
apic = "xapic"

[[appliance]] # a monitor on two named cores
name = "mon"
cpus = [6, 7]
memory = 64
kernel = '\EFI\mon\vmlinuz'
console = "com2"
"#;
    let c = Config::parse(text).unwrap();
    assert_eq!(c.appliance.len(), 2);
    let a = &c.appliance[0];
    assert_eq!(a.cpus, CpuSpec::Count(2));
    assert_eq!(a.memory_bytes(), 256 << 20);
    assert_eq!(a.console, Console::Log, "console defaults to the log ring");
    assert_eq!((a.on_crash, a.control), (OnCrash::Stop, Control::None));
    assert_eq!(a.line, Some(6));
    assert_eq!(a.apic, crate::ApicMode::Xapic);
    let b = &c.appliance[1];
    assert_eq!(b.apic, crate::ApicMode::X2apic, "x2APIC by default");
    assert_eq!(b.cpus, CpuSpec::ApicIds(vec![6, 7]));
    assert_eq!(b.console, Console::Port(0x2f8));
    assert_eq!((b.on_crash, b.control), (OnCrash::Restart, Control::Os));
    assert_eq!(b.initrd, None);
    assert_eq!(b.line, Some(18));
    assert!(b.label().contains("line 18"), "{}", b.label());
    let again = Config::parse(&c.effective()).unwrap();
    let strip = |c: &Config| {
        c.appliance
            .iter()
            .map(|a| {
                let mut a = a.clone();
                a.line = None;
                a.kernel = normalize_esp_path(&a.kernel);
                a.initrd = a.initrd.as_deref().map(normalize_esp_path);
                a
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&again), strip(&c));
}

#[test]
fn appliance_errors_name_the_table_line() {
    let base = "[[appliance]]\nname = \"a\"\ncpus = 1\nmemory = 128\nkernel = '\\k'\n";
    assert!(Config::parse(base).is_ok());
    let bad = |extra: &str, want: &str| {
        let text = format!("{base}{extra}");
        let e = Config::parse(&text).unwrap_err();
        assert!(e.message.contains(want), "{extra:?}: {e}");
        assert!(e.line.is_some(), "{extra:?}: {e}");
        e
    };
    // Values.
    for (k, v, want) in [
        ("name", "\"\"", "name must be"),
        ("name", "\"a b\"", "only letters"),
        ("cpus", "0", "at least one processor"),
        ("cpus", "[]", "at least one processor"),
        ("cpus", "[3, 3]", "listed twice"),
        ("memory", "16", "64 to"),
        (
            "kernel",
            "\"vmlinuz\"",
            "kernel = \"vmlinuz\" must be an absolute path",
        ),
        ("console", "\"tty\"", "expected \"log\" or a COM port"),
        ("on_crash", "\"reboot\"", "unknown variant"),
        ("control", "\"root\"", "unknown variant"),
    ] {
        let text = base.replace(&format!("{k} = "), &format!("{k} = {v}\nx_{k} = "));
        let text = text
            .lines()
            .filter(|l| !l.starts_with("x_"))
            .collect::<Vec<_>>()
            .join("\n");
        let text = if base.contains(&format!("{k} = ")) {
            text
        } else {
            format!("{base}{k} = {v}\n")
        };
        let e = Config::parse(&text).unwrap_err();
        assert!(e.message.contains(want), "{k} = {v}: {e}");
        assert!(e.line.is_some(), "{k} = {v}: {e}");
    }
    bad("initrd = \"../x\"\n", "initrd");
    bad("cmdline = \"a\\u0000b\"\n", "NUL");
    bad("devices = [\"1:2\", \"1:2\"]\n", "listed twice");
    bad("devices = [\"vf:8086:10c9#0\"]\n", "a VF is named");
    bad("devices = [\"vf:8086:10c9\"]\n", "a VF is named");
    bad("console = \"com1\"\n", "thinhv's own log port");
    bad("vcpus = 2\n", "unknown field");
    let e = Config::parse(&format!("[cpu]\ninit_sipi = \"activity\"\n\n{base}")).unwrap_err();
    assert!(e.message.contains("init_sipi"), "{e}");
    // Missing keys.
    let e = Config::parse("[[appliance]]\nname = \"a\"\ncpus = 1\nmemory = 128\n").unwrap_err();
    assert!(e.message.contains("kernel"), "{e}");
    // Tables against each other and the rest of the file.
    let two = |second: &str| format!("{base}\n[[appliance]]\n{second}");
    let e = Config::parse(&two(
        "name = \"a\"\ncpus = 1\nmemory = 64\nkernel = '\\k'\n",
    ))
    .unwrap_err();
    assert!(e.message.contains("used twice"), "{e}");
    assert_eq!(e.line, Some(7), "the second table's header: {e}");
    let ids = "[[appliance]]\nname = \"a\"\ncpus = [1, 2]\nmemory = 64\nkernel = '\\k'\n\n[[appliance]]\nname = \"b\"\ncpus = [2]\nmemory = 64\nkernel = '\\k'\n";
    let e = Config::parse(ids).unwrap_err();
    assert!(e.message.contains("APIC ID 2 is also given"), "{e}");
    let dev =
        format!("[[device]]\nmatch = \"1:2\"\nowner = \"hidden\"\n\n{base}devices = [\"1:2\"]\n");
    let e = Config::parse(&dev).unwrap_err();
    assert!(e.message.contains("one owner"), "{e}");
    let ports = two("name = \"b\"\ncpus = 1\nmemory = 64\nkernel = '\\k'\nconsole = \"com2\"\n")
        .replace(
            "kernel = '\\k'\n\n",
            "kernel = '\\k'\nconsole = \"0x2f8\"\n\n",
        );
    let e = Config::parse(&ports).unwrap_err();
    assert!(e.message.contains("console port 0x2f8"), "{e}");
    let many = (0..9)
        .map(|i| base.replace("\"a\"", &format!("\"a{i}\"")))
        .collect::<Vec<_>>()
        .concat();
    let e = Config::parse(&many).unwrap_err();
    assert!(e.message.contains("at most 8"), "{e}");
}

#[test]
fn interrupt_remapping_is_on_unless_turned_off() {
    let c = Config::parse("[iommu]\nmode = \"protect\"\n").unwrap();
    assert_eq!(c.iommu.interrupts, crate::IommuInterrupts::Remap);
    let c = Config::parse("[iommu]\ninterrupts = \"off\"\n").unwrap();
    assert_eq!(c.iommu.interrupts, crate::IommuInterrupts::Off);
    assert_eq!(
        Config::parse(&c.effective()).unwrap().iommu.interrupts,
        crate::IommuInterrupts::Off
    );
    assert!(Config::parse("[iommu]\ninterrupts = \"filter\"\n").is_err());
}

#[test]
fn the_oss_own_iommu_is_off_unless_asked_for() {
    let c = Config::parse("[iommu]\nmode = \"protect\"\n").unwrap();
    assert_eq!(c.iommu.os, crate::IommuOs::None);
    let c = Config::parse("[iommu]\nos = \"emulated\"\n").unwrap();
    assert_eq!(c.iommu.os, crate::IommuOs::Emulated);
    assert_eq!(
        Config::parse(&c.effective()).unwrap().iommu.os,
        crate::IommuOs::Emulated
    );
    let e = Config::parse("[iommu]\nos = \"passthrough\"\n").unwrap_err();
    assert!(
        e.to_string().contains("expected `none` or `emulated`"),
        "{e}"
    );
}
