//! `thinhv install` / `uninstall` / `check` as an admin runs them, against
//! a temporary ESP directory and a fake efivarfs (a directory of
//! `Name-GUID` files holding the attribute word and the data, as efivarfs
//! presents them).
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use thinhv_efi::boot_option::{LoadOption, device_path_nodes, parse_order};

const GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
const PART: &str = "gpt:c12a7328-f81f-11d2-ba4b-00a0c93ec93b:1:2048:204800";

struct Bed {
    root: PathBuf,
}

impl Bed {
    fn new(name: &str) -> Self {
        let root =
            std::env::temp_dir().join(format!("thinhv-install-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("esp/EFI/BOOT")).unwrap();
        fs::create_dir_all(root.join("efivars")).unwrap();
        fs::write(root.join("thinhv.efi"), b"MZ fake image").unwrap();
        let b = Self { root };
        b.put_var("BootOrder", &[1, 0, 0, 0]);
        b.put_var(
            "Boot0000",
            &option_bytes("UEFI Shell", "\\EFI\\BOOT\\shell.efi"),
        );
        b.put_var(
            "Boot0001",
            &option_bytes("debian", "\\EFI\\debian\\shimx64.efi"),
        );
        b
    }

    fn var_path(&self, name: &str) -> PathBuf {
        self.root.join("efivars").join(format!("{name}-{GUID}"))
    }

    fn put_var(&self, name: &str, data: &[u8]) {
        let mut b = 7u32.to_le_bytes().to_vec();
        b.extend_from_slice(data);
        fs::write(self.var_path(name), b).unwrap();
    }

    fn var(&self, name: &str) -> Option<Vec<u8>> {
        fs::read(self.var_path(name)).ok()
    }

    fn order(&self) -> Vec<u16> {
        let v = self.var("BootOrder").unwrap();
        assert_eq!(&v[..4], &7u32.to_le_bytes(), "attributes NV|BS|RT");
        parse_order(&v[4..])
    }

    fn esp(&self) -> PathBuf {
        self.root.join("esp")
    }

    fn thinhv(&self, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_thinhv"));
        c.args(args);
        if matches!(args.first(), Some(&("install" | "uninstall"))) {
            c.arg("--esp").arg(self.esp());
            c.arg("--efivars").arg(self.root.join("efivars"));
            if args[0] == "install" {
                c.arg("--efi").arg(self.root.join("thinhv.efi"));
                c.args(["--esp-partition", PART]);
            }
        }
        c.output().unwrap()
    }

    /// Every file under the bed with its contents.
    fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        fn walk(p: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
            for e in fs::read_dir(p).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push((p.clone(), fs::read(&p).unwrap()));
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.root, &mut v);
        v.sort();
        v
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn option_bytes(desc: &str, path: &str) -> Vec<u8> {
    let part = thinhv_efi::boot_option::Partition {
        number: 1,
        start: 2048,
        size: 204_800,
        id: thinhv_efi::boot_option::PartitionId::Gpt([9; 16]),
    };
    LoadOption {
        attributes: 1,
        description: desc.into(),
        device_path: thinhv_efi::boot_option::hd_file_path(&part, path).unwrap(),
        optional_data: Vec::new(),
    }
    .to_bytes()
    .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn install_then_uninstall_round_trip() {
    let b = Bed::new("roundtrip");
    let cfg = b.root.join("my.toml");
    fs::write(
        &cfg,
        "[hypervisor]\nrequired = false\n\n[cpu]\nprofile = \"x86-64-v3\"\n",
    )
    .unwrap();
    let before = b.snapshot();

    // Dry run: says what it would do, changes nothing.
    let o = b.thinhv(&["install", "--config", cfg.to_str().unwrap(), "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("dry run"), "{t}");
    assert!(t.contains("would create Boot0002 \"thinhv\""), "{t}");
    assert!(
        t.contains("would set BootOrder 0001,0000 -> 0002,0001,0000"),
        "{t}"
    );
    assert!(t.contains("starts Boot0001 (\"debian\") next"), "{t}");
    assert_eq!(b.snapshot(), before, "a dry run changed files");

    // For real.
    let o = b.thinhv(&["install", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(b.order(), [2, 1, 0]);
    let entry = b.var("Boot0002").expect("Boot0002 created");
    assert_eq!(&entry[..4], &7u32.to_le_bytes());
    let opt = LoadOption::parse(&entry[4..]).unwrap();
    assert_eq!(opt.description, "thinhv");
    assert!(opt.bootable());
    assert_eq!(
        opt.file_path().as_deref(),
        Some("\\EFI\\thinhv\\thinhv.efi")
    );
    let hd = device_path_nodes(&opt.device_path).next().unwrap();
    assert_eq!((hd.0, hd.1), (4, 1), "hard-drive node first");
    assert_eq!(&hd.2[..4], &1u32.to_le_bytes(), "partition 1");
    assert_eq!(&hd.2[4..12], &2048u64.to_le_bytes(), "start LBA");
    assert_eq!(
        &hd.2[20..24],
        &[0x28, 0x73, 0x2a, 0xc1],
        "GPT GUID, on-disk order"
    );
    assert_eq!(
        fs::read(b.esp().join("EFI/thinhv/thinhv.efi")).unwrap(),
        b"MZ fake image"
    );
    assert_eq!(
        fs::read_to_string(b.esp().join("EFI/thinhv/thinhv.toml")).unwrap(),
        fs::read_to_string(&cfg).unwrap()
    );

    // Again (an upgrade): same entry, same order, no duplicate.
    let o = b.thinhv(&["install"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("did rewrite Boot0002"), "{}", text(&o));
    assert_eq!(b.order(), [2, 1, 0]);
    assert!(b.var("Boot0003").is_none());

    // Someone moved thinhv down the list meanwhile; uninstall still
    // restores the order from before the installation.
    b.put_var("BootOrder", &[0, 0, 2, 0, 1, 0]);
    let o = b.thinhv(&["uninstall", "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("would delete Boot0002"), "{}", text(&o));
    assert_eq!(b.order(), [0, 2, 1]);
    let o = b.thinhv(&["uninstall"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(b.order(), [1, 0]);
    assert!(b.var("Boot0002").is_none());
    assert!(!b.esp().join("EFI/thinhv").exists());
    assert!(b.var("Boot0000").is_some() && b.var("Boot0001").is_some());
}

#[test]
fn a_bad_config_installs_nothing_and_names_the_line() {
    let b = Bed::new("badcfg");
    let cfg = b.root.join("bad.toml");
    fs::write(
        &cfg,
        "[hypervisor]\nrequired = false\n[cpu]\nprofile = \"pentium\"\n",
    )
    .unwrap();
    let before = b.snapshot();
    let o = b.thinhv(&["install", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("bad.toml:4"), "{t}");
    assert!(t.contains("nothing installed"), "{t}");
    assert_eq!(b.snapshot(), before);
}

#[test]
fn errors_are_clear() {
    let b = Bed::new("errors");
    // No efivarfs.
    let o = Command::new(env!("CARGO_BIN_EXE_thinhv"))
        .args(["install", "--esp"])
        .arg(b.esp())
        .arg("--efi")
        .arg(b.root.join("thinhv.efi"))
        .args(["--esp-partition", PART, "--efivars"])
        .arg(b.root.join("nope"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("mount -t efivarfs"), "{}", text(&o));
    // Not a UEFI image.
    fs::write(b.root.join("thinhv.efi"), b"#!/bin/sh").unwrap();
    let o = b.thinhv(&["install"]);
    assert!(text(&o).contains("not a UEFI (PE) image"), "{}", text(&o));
    // Missing --esp, unknown option, bad partition spec: usage errors.
    for args in [
        vec!["install"],
        vec!["install", "--esp", "/x", "--frobnicate"],
        vec!["install", "--esp", "/x", "--esp-partition", "gpt:zz"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_thinhv"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
    }
    // Uninstall when nothing is installed: harmless.
    let o = b.thinhv(&["uninstall"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no thinhv boot entry found"));
    assert_eq!(b.order(), [1, 0]);
}

#[test]
fn check_reports_every_setting_or_the_line() {
    let dir = std::env::temp_dir().join(format!("thinhv-check-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    fs::write(
        &good,
        "[cpu]\nprofile = \"x86-64-v2\"\nhide = [\"sse4_2\"]\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_thinhv"))
        .arg("check")
        .arg(&good)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for k in [
        "required = false",
        "profile = \"x86-64-v2\"",
        "hide = [\"sse4_2\"]",
        "XCR0 allowed: 0x3",
        "init_sipi",
    ] {
        assert!(t.contains(k), "{k} missing from\n{t}");
    }
    let rules = dir.join("rules.toml");
    fs::write(
        &rules,
        "[[device]]\nmatch = \"0000:02:00.0\"\nowner = \"hidden\"\n\n[[sriov]]\ndevice = \"8086:10c9\"\nos_vfs = 2\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_thinhv"))
        .arg("check")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("[[device]]\nmatch = \"0000:02:00.0\"\nowner = \"hidden\""));
    assert!(text(&o).contains("[[sriov]]\ndevice = \"8086:10c9\"\nos_vfs = 2"));
    let rules = dir.join("bad-rules.toml");
    fs::write(
        &rules,
        "[[device]]\nmatch = \"0000:zz:00.0\"\nowner = \"hidden\"\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_thinhv"))
        .arg("check")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("[[device]] #1 (line 1): match: \"0000:zz:00.0\" is not a PCI address"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("at boot, thinhv would start"),
        "{}",
        text(&o)
    );
    let appl = dir.join("appliance.toml");
    fs::write(
        &appl,
        "[[appliance]]\nname = \"store\"\ncpus = 2\nmemory = 256\nkernel = '\\EFI\\a\\vmlinuz'\ndevices = [\"0000:zz:00.0\"]\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_thinhv"))
        .arg("check")
        .arg(&appl)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains(
            "[[appliance]] \"store\" (line 1): devices: \"0000:zz:00.0\" is not a PCI address"
        ),
        "{}",
        text(&o)
    );
    let bad = dir.join("bad.toml");
    fs::write(&bad, "[boot]\nnext = 'EFI/x.efi'\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_thinhv"))
        .arg("check")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(t.contains("bad.toml:2"), "{t}");
    assert!(t.contains("at boot, thinhv would not start"), "{t}");
    let _ = fs::remove_dir_all(&dir);
}
