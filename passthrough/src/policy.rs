//! PCI ownership policy: `[[device]]` and `[[sriov]]` rules applied to the
//! inventory, before the OS sees the bus.
//!
//! Every function belongs to the OS (pass-through) unless a `[[device]]`
//! rule with `owner = "hidden"` matches it; rules apply in file order, a
//! later rule overriding an earlier one for the functions both match. A
//! `[[sriov]]` rule limits the VFs the OS may create on the PFs it matches.
//!
//! A rule that cannot be read, matches nothing, or asks for something
//! unsafe (hiding a bridge, or the device the OS boots from; a VF budget
//! above TotalVFs) is reported and left out: the boot continues with the
//! defaults for what it would have decided.
use crate::pci::{Bdf, Function, Kind};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// What a rule's `match` (or `device`) names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matcher {
    /// One function by address.
    Address(Bdf),
    /// Every function with these IDs.
    Ids {
        /// Vendor ID.
        vendor: u16,
        /// Device ID.
        device: u16,
    },
    /// Every function of a kind (`class:nic`, `class:storage`, ...).
    Class(Kind),
}

const KINDS: [Kind; 5] = [
    Kind::Nic,
    Kind::Storage,
    Kind::Display,
    Kind::Bridge,
    Kind::SerialBus,
];

impl Matcher {
    /// Parses `"0000:02:00.0"` / `"02:00.0"`, `"8086:10d3"` or
    /// `"class:nic"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(k) = s.strip_prefix("class:") {
            return KINDS
                .iter()
                .find(|x| x.name() == k)
                .map(|x| Self::Class(*x))
                .ok_or_else(|| {
                    format!(
                        "unknown class \"{k}\" (known: class:nic, class:storage, class:display, \
                         class:bridge, class:serial-bus)"
                    )
                });
        }
        if s.contains('.') {
            return Bdf::parse(s).map(Self::Address).ok_or_else(|| {
                format!(
                    "\"{s}\" is not a PCI address (segment:bus:device.function in hexadecimal, \
                     such as \"0000:02:00.0\"; device below 20, function below 8)"
                )
            });
        }
        if let Some((v, d)) = s.split_once(':') {
            let hex = |t: &str| {
                (t.len() == 4)
                    .then(|| u16::from_str_radix(t, 16).ok())
                    .flatten()
            };
            if let (Some(vendor), Some(device)) = (hex(v), hex(d)) {
                return Ok(Self::Ids { vendor, device });
            }
        }
        Err(format!(
            "\"{s}\" is neither a PCI address (\"0000:02:00.0\"), a vendor:device pair \
             (\"8086:10d3\") nor a class (\"class:nic\")"
        ))
    }

    /// Whether `f` is matched.
    pub fn matches(&self, f: &Function) -> bool {
        match *self {
            Self::Address(b) => f.bdf == b,
            Self::Ids { vendor, device } => f.vendor == vendor && f.device == device,
            Self::Class(k) => f.kind() == k,
        }
    }
}

/// Who drives a function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Owner {
    /// The OS, directly (pass-through).
    #[default]
    Os,
    /// Nobody for now: absent for the OS, no DMA.
    Hidden,
}

impl Owner {
    /// Parses `"os"` or `"hidden"`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "os" => Some(Self::Os),
            "hidden" => Some(Self::Hidden),
            _ => None,
        }
    }

    /// As spelled in the configuration.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Os => "os",
            Self::Hidden => "hidden",
        }
    }
}

/// A `[[device]]` rule as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRule {
    /// `match`.
    pub matcher: String,
    /// `owner`.
    pub owner: String,
    /// Line of its `[[device]]` header, for messages.
    pub line: Option<usize>,
}

/// A `[[sriov]]` rule as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SriovRule {
    /// `device`.
    pub device: String,
    /// `os_vfs`.
    pub os_vfs: u32,
    /// Line of its `[[sriov]]` header.
    pub line: Option<usize>,
}

/// What the policy decided for one function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Owner.
    pub owner: Owner,
    /// 0-based index of the `[[device]]` rule that decided, if any.
    pub rule: Option<usize>,
    /// VFs the OS may create, when a `[[sriov]]` rule limits them below
    /// TotalVFs.
    pub os_vfs: Option<u16>,
    /// 0-based index of that `[[sriov]]` rule.
    pub sriov_rule: Option<usize>,
}

/// A rule reported and left out (in whole or for some functions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The message, naming the rule and its line.
    pub message: String,
}

/// The result: one decision per function (same order), and the problems.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per function.
    pub decisions: Vec<Decision>,
    /// What was reported.
    pub problems: Vec<Problem>,
}

fn rule_name(kind: &str, i: usize, line: Option<usize>) -> String {
    match line {
        Some(l) => format!("[[{kind}]] #{} (line {l})", i + 1),
        None => format!("[[{kind}]] #{}", i + 1),
    }
}

/// A `[[device]]` rule read: its matcher and owner, or why it is left out.
fn read_device(i: usize, r: &DeviceRule) -> Result<(Matcher, Owner), Problem> {
    let name = rule_name("device", i, r.line);
    let m = Matcher::parse(&r.matcher).map_err(|e| Problem {
        message: format!("{name}: match: {e}; rule ignored"),
    })?;
    let owner = Owner::parse(&r.owner).ok_or_else(|| Problem {
        message: format!(
            "{name}: owner \"{}\" is neither \"os\" nor \"hidden\"; rule ignored",
            r.owner
        ),
    })?;
    Ok((m, owner))
}

/// A `[[sriov]]` rule's matcher, or why it is left out.
fn read_sriov(i: usize, r: &SriovRule) -> Result<Matcher, Problem> {
    Matcher::parse(&r.device).map_err(|e| Problem {
        message: format!(
            "{}: device: {e}; rule ignored",
            rule_name("sriov", i, r.line)
        ),
    })
}

/// The problems a machine cannot change: malformed `match`, `owner` or
/// `device` values (as [`resolve`] reports them), for `thinhv check`.
pub fn syntax_problems(devices: &[DeviceRule], sriov: &[SriovRule]) -> Vec<Problem> {
    let d = devices
        .iter()
        .enumerate()
        .filter_map(|(i, r)| read_device(i, r).err());
    let s = sriov
        .iter()
        .enumerate()
        .filter_map(|(i, r)| read_sriov(i, r).err());
    d.chain(s).collect()
}

/// Applies the rules. `boot_device` is the function the OS boots from
/// (never hidden), when known.
pub fn resolve(
    functions: &[Function],
    devices: &[DeviceRule],
    sriov: &[SriovRule],
    boot_device: Option<Bdf>,
) -> Plan {
    let mut plan = Plan {
        decisions: alloc::vec![Decision::default(); functions.len()],
        problems: Vec::new(),
    };
    let mut problem = |m: String| plan.problems.push(Problem { message: m });
    for (i, r) in devices.iter().enumerate() {
        let name = rule_name("device", i, r.line);
        let (m, owner) = match read_device(i, r) {
            Ok(x) => x,
            Err(p) => {
                problem(p.message);
                continue;
            }
        };
        let mut matched = 0;
        for (f, d) in functions.iter().zip(plan.decisions.iter_mut()) {
            if !m.matches(f) {
                continue;
            }
            matched += 1;
            if owner == Owner::Hidden {
                if f.header_type == 1 {
                    problem(format!(
                        "{name}: {} is a PCI bridge; hiding it would strand the devices behind \
                         it, so it stays with the OS",
                        f.bdf
                    ));
                    continue;
                }
                if boot_device == Some(f.bdf) {
                    problem(format!(
                        "{name}: {} is the device the OS boots from; it stays with the OS",
                        f.bdf
                    ));
                    continue;
                }
            }
            d.owner = owner;
            d.rule = Some(i);
        }
        if matched == 0 {
            problem(format!(
                "{name}: match \"{}\" matches no PCI function; nothing changed",
                r.matcher.trim()
            ));
        }
    }
    for (i, r) in sriov.iter().enumerate() {
        let name = rule_name("sriov", i, r.line);
        let m = match read_sriov(i, r) {
            Ok(m) => m,
            Err(p) => {
                problem(p.message);
                continue;
            }
        };
        let (mut matched, mut pfs) = (0, 0);
        for (f, d) in functions.iter().zip(plan.decisions.iter_mut()) {
            if !m.matches(f) {
                continue;
            }
            matched += 1;
            // Functions without SR-IOV that a class or ID rule also
            // matches are not PFs: skipped without a word, unless the rule
            // matches no PF at all (below).
            let Some(cap) = f.sriov else {
                continue;
            };
            pfs += 1;
            if d.owner == Owner::Hidden {
                problem(format!(
                    "{name}: {} is hidden; its VFs are not the OS's either",
                    f.bdf
                ));
                continue;
            }
            if r.os_vfs > u32::from(cap.total_vfs) {
                problem(format!(
                    "{name}: os_vfs = {} is above TotalVFs {} of {}; the OS sees all {}",
                    r.os_vfs, cap.total_vfs, f.bdf, cap.total_vfs
                ));
                continue;
            }
            d.sriov_rule = Some(i);
            // Equal to TotalVFs: nothing to mediate.
            d.os_vfs = u16::try_from(r.os_vfs).ok().filter(|&n| n < cap.total_vfs);
        }
        if matched == 0 {
            problem(format!(
                "{name}: device \"{}\" matches no PCI function; nothing changed",
                r.device.trim()
            ));
        } else if pfs == 0 {
            problem(format!(
                "{name}: device \"{}\" matches no SR-IOV physical function ({matched} without \
                 SR-IOV); os_vfs does not apply",
                r.device.trim()
            ));
        }
    }
    plan
}

/// The function the OS boots from, from the PCI nodes (device, function)
/// of its UEFI device path: the first node is on `root_bus`, each further
/// node on the secondary bus of the bridge before it.
pub fn boot_device(
    functions: &[Function],
    segment: u16,
    root_bus: u8,
    path: &[(u8, u8)],
) -> Option<Bdf> {
    let mut bus = root_bus;
    let mut found = None;
    for (n, &(dev, func)) in path.iter().enumerate() {
        let bdf = Bdf::new(segment, bus, dev, func);
        let f = functions.iter().find(|f| f.bdf == bdf)?;
        found = Some(bdf);
        if n + 1 < path.len() {
            bus = f.bridge_buses?.0;
        }
    }
    found
}

/// Routing IDs the IOMMU must refuse for a hidden function: its own and
/// those of every VF it could enable (with the current First VF Offset and
/// VF Stride), as inclusive ranges.
pub fn blocked_rids(f: &Function) -> Vec<(u16, u16)> {
    let rid = f.bdf.rid();
    let mut out = alloc::vec![(rid, rid)];
    if let Some(range) = f.sriov.and_then(|c| c.potential_vf_rids(rid)) {
        out.push(range);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::tests_support::FakeConfig;
    use crate::pci::{EcamRegion, enumerate};
    use thinhv_sriov::SriovCap;

    /// q35-like: root port 00:01.0 → bus 1 with an igb PF (SR-IOV, 8 VFs);
    /// e1000e at 00:02.0 and 00:03.0, NVMe at 00:04.0 (the boot disk).
    fn machine() -> Vec<Function> {
        let mut c = FakeConfig::default();
        c.bridge(Bdf::new(0, 0, 1, 0), 1, 1);
        let igb = Bdf::new(0, 1, 0, 0);
        c.endpoint(igb, 0x10c9_8086, 0x0200_0001, true);
        c.endpoint(Bdf::new(0, 0, 2, 0), 0x10d3_8086, 0x0200_0000, true);
        c.endpoint(Bdf::new(0, 0, 3, 0), 0x10d3_8086, 0x0200_0000, true);
        c.endpoint(Bdf::new(0, 0, 4, 0), 0x0010_1b36, 0x0108_0202, true);
        let r = EcamRegion {
            base: 0xb000_0000,
            segment: 0,
            bus_start: 0,
            bus_end: 0xff,
        };
        let mut fs = enumerate(&[r], &c);
        let mut bytes = [0u8; thinhv_sriov::CAP_SIZE];
        bytes[0] = 0x10;
        bytes[0x0c] = 8;
        bytes[0x0e] = 8;
        bytes[0x14] = 0x80;
        bytes[0x16] = 2;
        fs.iter_mut().find(|f| f.bdf == igb).unwrap().sriov = SriovCap::parse(0x160, &bytes).ok();
        fs
    }

    fn dev(m: &str, owner: &str) -> DeviceRule {
        DeviceRule {
            matcher: m.into(),
            owner: owner.into(),
            line: Some(7),
        }
    }

    fn budget(m: &str, n: u32) -> SriovRule {
        SriovRule {
            device: m.into(),
            os_vfs: n,
            line: None,
        }
    }

    fn decision<'a>(fs: &[Function], p: &'a Plan, bdf: &str) -> &'a Decision {
        let b = Bdf::parse(bdf).unwrap();
        &p.decisions[fs.iter().position(|f| f.bdf == b).unwrap()]
    }

    #[test]
    fn matchers() {
        assert_eq!(
            Matcher::parse("0000:02:00.0"),
            Ok(Matcher::Address(Bdf::new(0, 2, 0, 0)))
        );
        assert_eq!(
            Matcher::parse("8086:10D3"),
            Ok(Matcher::Ids {
                vendor: 0x8086,
                device: 0x10d3
            })
        );
        assert_eq!(
            Matcher::parse("class:storage"),
            Ok(Matcher::Class(Kind::Storage))
        );
        for bad in [
            "0000:zz:00.0",
            "0000:02:20.0",
            "86:10d3",
            "class:gpu",
            "",
            "nic",
        ] {
            let e = Matcher::parse(bad).unwrap_err();
            assert!(e.contains('"'), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_everything_to_the_os() {
        let fs = machine();
        let p = resolve(&fs, &[], &[], None);
        assert!(p.problems.is_empty());
        assert!(p.decisions.iter().all(|d| *d == Decision::default()));
    }

    #[test]
    fn hides_by_address_and_later_rules_override() {
        let fs = machine();
        let p = resolve(
            &fs,
            &[
                dev("class:nic", "hidden"),
                dev("0000:00:02.0", "os"),
                dev("0000:00:03.0", "hidden"),
            ],
            &[],
            None,
        );
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(decision(&fs, &p, "0000:00:02.0").owner, Owner::Os);
        assert_eq!(decision(&fs, &p, "0000:00:02.0").rule, Some(1));
        assert_eq!(decision(&fs, &p, "0000:00:03.0").owner, Owner::Hidden);
        assert_eq!(decision(&fs, &p, "0000:00:03.0").rule, Some(2));
        assert_eq!(decision(&fs, &p, "0000:01:00.0").owner, Owner::Hidden);
        assert_eq!(decision(&fs, &p, "0000:00:04.0").owner, Owner::Os);
        assert_eq!(decision(&fs, &p, "0000:00:04.0").rule, None);
    }

    #[test]
    fn bad_rules_are_reported_and_left_out() {
        let fs = machine();
        let p = resolve(
            &fs,
            &[
                dev("0000:zz:00.0", "hidden"),
                dev("1234:5678", "hidden"),
                dev("0000:00:03.0", "gone"),
                dev("0000:00:01.0", "hidden"),
                dev("class:storage", "hidden"),
            ],
            &[
                budget("8086:10c9", 9),
                budget("0000:00:02.0", 1),
                budget("0000:07:00.0", 1),
            ],
            Some(Bdf::new(0, 0, 4, 0)),
        );
        let msgs: Vec<&str> = p.problems.iter().map(|x| x.message.as_str()).collect();
        let expect = [
            "[[device]] #1 (line 7): match: \"0000:zz:00.0\" is not a PCI address",
            "[[device]] #2 (line 7): match \"1234:5678\" matches no PCI function; nothing changed",
            "[[device]] #3 (line 7): owner \"gone\" is neither \"os\" nor \"hidden\"; rule ignored",
            "[[device]] #4 (line 7): 0000:00:01.0 is a PCI bridge",
            "[[device]] #5 (line 7): 0000:00:04.0 is the device the OS boots from; it stays with the OS",
            "[[sriov]] #1: os_vfs = 9 is above TotalVFs 8 of 0000:01:00.0; the OS sees all 8",
            "[[sriov]] #2: device \"0000:00:02.0\" matches no SR-IOV physical function (1 without SR-IOV)",
            "[[sriov]] #3: device \"0000:07:00.0\" matches no PCI function",
        ];
        assert_eq!(msgs.len(), expect.len(), "{msgs:#?}");
        for (m, e) in msgs.iter().zip(expect) {
            assert!(m.starts_with(e), "{m}\n  expected {e}");
        }
        // The syntax alone, as `thinhv check` sees it: the same messages.
        let syntax = syntax_problems(
            &[
                dev("0000:zz:00.0", "hidden"),
                dev("1234:5678", "hidden"),
                dev("0000:00:03.0", "gone"),
            ],
            &[budget("class:gpu", 1)],
        );
        assert_eq!(syntax.len(), 3);
        assert_eq!(syntax[0].message, p.problems[0].message);
        assert_eq!(syntax[1].message, p.problems[2].message);
        assert!(
            syntax[2]
                .message
                .starts_with("[[sriov]] #1: device: unknown class")
        );
        // Nothing was decided by a bad rule: the defaults hold.
        assert!(
            p.decisions.iter().all(|d| *d == Decision::default()),
            "{:?}",
            p.decisions
        );
    }

    #[test]
    fn vf_budgets() {
        let fs = machine();
        let p = resolve(&fs, &[], &[budget("0000:01:00.0", 2)], None);
        assert!(p.problems.is_empty());
        let d = decision(&fs, &p, "0000:01:00.0");
        assert_eq!((d.os_vfs, d.sriov_rule), (Some(2), Some(0)));
        // Equal to TotalVFs: accepted, nothing to mediate.
        let p = resolve(&fs, &[], &[budget("8086:10c9", 8)], None);
        let d = decision(&fs, &p, "0000:01:00.0");
        assert_eq!((d.os_vfs, d.sriov_rule), (None, Some(0)));
        // Zero: no VFs for the OS.
        let p = resolve(&fs, &[], &[budget("8086:10c9", 0)], None);
        assert_eq!(decision(&fs, &p, "0000:01:00.0").os_vfs, Some(0));
        // A hidden PF's budget does not apply.
        let p = resolve(
            &fs,
            &[dev("8086:10c9", "hidden")],
            &[budget("8086:10c9", 2)],
            None,
        );
        assert_eq!(p.problems.len(), 1);
        assert_eq!(decision(&fs, &p, "0000:01:00.0").os_vfs, None);
    }

    #[test]
    fn boot_device_through_bridges_and_blocked_rids() {
        let fs = machine();
        assert_eq!(
            boot_device(&fs, 0, 0, &[(1, 0), (0, 0)]),
            Some(Bdf::new(0, 1, 0, 0))
        );
        assert_eq!(
            boot_device(&fs, 0, 0, &[(4, 0)]),
            Some(Bdf::new(0, 0, 4, 0))
        );
        assert_eq!(boot_device(&fs, 0, 0, &[(9, 0)]), None);
        assert_eq!(boot_device(&fs, 0, 0, &[]), None);
        let igb = fs.iter().find(|f| f.sriov.is_some()).unwrap();
        // 01:00.0, then VFs at +0x80 with stride 2: 01:10.0 .. 01:1e.0.
        assert_eq!(blocked_rids(igb), [(0x100, 0x100), (0x180, 0x18e)]);
        let nic = fs.iter().find(|f| f.bdf == Bdf::new(0, 0, 2, 0)).unwrap();
        assert_eq!(blocked_rids(nic), [(0x10, 0x10)]);
    }
}
