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
//!
//! So is a rule the core could not enforce ([`Reach`]): a function whose
//! configuration space thinhv cannot trap (another segment, a bus outside
//! the ECAM region, an ECAM page beyond the core's memory map) or that no
//! longer fits the hand-off stays with the OS and is reported as such;
//! it is never reported hidden while the OS could still reach it.
use crate::pci::{Bdf, EcamRegion, Function, Kind};
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
    /// A bridge may be hidden: set only by the loader, for the bridges
    /// above an appliance's function when everything behind them is that
    /// appliance's (a `[[device]]` rule never hides a bridge).
    pub bridge_ok: bool,
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

/// What the core can mediate: the limits a hiding rule or a VF budget
/// must fit for the core to enforce it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reach {
    /// The ECAM region of segment 0 (MCFG): the only segment the hand-off
    /// and the legacy configuration ports (0xCF8/0xCFC) address.
    pub region: Option<EcamRegion>,
    /// End (exclusive) of the core's second-level map. The core traps an
    /// ECAM page by removing it from that map; a page at or above the end
    /// is not in it, and the first touch would map it (with the rest of
    /// its GiB) instead of trapping.
    pub map_top: u64,
    /// Most functions the hand-off can carry for mediation.
    pub max_mediated: usize,
    /// Most requester ranges the hand-off can carry for the IOMMU to
    /// refuse.
    pub max_blocked: usize,
}

impl Reach {
    /// Why the core cannot trap every access to `bdf`'s configuration
    /// space, or `None` when it can.
    pub fn unreachable(&self, bdf: Bdf) -> Option<String> {
        if bdf.segment != 0 {
            return Some(format!(
                "it is in PCI segment {:04x}, and thinhv mediates configuration space in \
                 segment 0 only",
                bdf.segment
            ));
        }
        let Some(r) = self.region else {
            return Some(String::from(
                "the firmware describes no ECAM region for segment 0 (MCFG), so thinhv \
                 cannot trap its configuration space",
            ));
        };
        let Some(page) = r.address(bdf) else {
            return Some(format!(
                "bus {:02x} lies outside the ECAM region of segment 0 (buses {:02x}-{:02x}), \
                 so thinhv cannot trap its configuration space",
                bdf.bus, r.bus_start, r.bus_end
            ));
        };
        if page.checked_add(4096).is_none_or(|end| end > self.map_top) {
            return Some(format!(
                "its ECAM page {page:#x} lies beyond the memory thinhv maps (up to {:#x}), \
                 where no access to it could be trapped",
                self.map_top
            ));
        }
        None
    }
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
/// (never hidden), when known; `reach` is what the core can enforce.
pub fn resolve(
    functions: &[Function],
    devices: &[DeviceRule],
    sriov: &[SriovRule],
    boot_device: Option<Bdf>,
    reach: &Reach,
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
                if f.header_type == 1 && !r.bridge_ok {
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
                if let Some(why) = reach.unreachable(f.bdf) {
                    problem(format!(
                        "{name}: {} cannot be hidden: {why}; it stays with the OS",
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
            // Equal to TotalVFs: nothing to mediate.
            let os_vfs = u16::try_from(r.os_vfs).ok().filter(|&n| n < cap.total_vfs);
            if os_vfs.is_some()
                && let Some(why) = reach.unreachable(f.bdf)
            {
                problem(format!(
                    "{name}: the VF budget of {} cannot be enforced: {why}; the OS sees all {}",
                    f.bdf, cap.total_vfs
                ));
                continue;
            }
            d.sriov_rule = Some(i);
            d.os_vfs = os_vfs;
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
    fit_handoff(functions, devices, sriov, &mut plan, reach);
    plan
}

/// Leaves with the OS, in inventory order, the mediated functions beyond
/// what the hand-off holds ([`Reach::max_mediated`] functions,
/// [`Reach::max_blocked`] requester ranges), each reported with its rule.
fn fit_handoff(
    functions: &[Function],
    devices: &[DeviceRule],
    sriov: &[SriovRule],
    plan: &mut Plan,
    reach: &Reach,
) {
    let (mut mediated, mut blocked) = (0, 0);
    for (f, d) in functions.iter().zip(plan.decisions.iter_mut()) {
        let hidden = d.owner == Owner::Hidden;
        if !hidden && d.os_vfs.is_none() {
            continue;
        }
        let ranges = if hidden { blocked_rids(f).len() } else { 0 };
        let full = if mediated + 1 > reach.max_mediated {
            Some(format!(
                "more than {} functions to mediate",
                reach.max_mediated
            ))
        } else if blocked + ranges > reach.max_blocked {
            Some(format!(
                "more than {} requester ranges for the IOMMU to refuse",
                reach.max_blocked
            ))
        } else {
            None
        };
        let Some(why) = full else {
            mediated += 1;
            blocked += ranges;
            continue;
        };
        let message = if hidden {
            let r = d.rule.unwrap_or_default();
            format!(
                "{}: {} cannot be hidden: {why}; it stays with the OS",
                rule_name("device", r, devices.get(r).and_then(|x| x.line)),
                f.bdf
            )
        } else {
            let r = d.sriov_rule.unwrap_or_default();
            format!(
                "{}: the VF budget of {} cannot be enforced: {why}; the OS sees all {}",
                rule_name("sriov", r, sriov.get(r).and_then(|x| x.line)),
                f.bdf,
                f.sriov.map_or(0, |c| c.total_vfs)
            )
        };
        plan.problems.push(Problem { message });
        if hidden {
            d.owner = Owner::Os;
            d.rule = None;
        } else {
            d.os_vfs = None;
            d.sriov_rule = None;
        }
    }
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

    /// QEMU q35's ECAM (segment 0, all buses at 0xb000_0000) and a core
    /// map of 4 GiB.
    const Q35: Reach = Reach {
        region: Some(EcamRegion {
            base: 0xb000_0000,
            segment: 0,
            bus_start: 0,
            bus_end: 0xff,
        }),
        map_top: 4 << 30,
        max_mediated: 32,
        max_blocked: 32,
    };

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
            bridge_ok: false,
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
        let p = resolve(&fs, &[], &[], None, &Q35);
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
            &Q35,
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
    fn a_bridge_is_hidden_only_for_an_appliance_by_the_loader() {
        let fs = machine();
        let hidden = |p: &Plan| decision(&fs, p, "0000:00:01.0").owner == Owner::Hidden;
        // A `[[device]]` rule: refused (the control).
        let p = resolve(&fs, &[dev("0000:00:01.0", "hidden")], &[], None, &Q35);
        assert!(!hidden(&p));
        assert_eq!(p.problems.len(), 1);
        // The loader's, for the bridge above an appliance's function.
        let mut rule = dev("0000:00:01.0", "hidden");
        rule.bridge_ok = true;
        let p = resolve(&fs, &[rule], &[], None, &Q35);
        assert!(hidden(&p), "{:?}", p.problems);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
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
            &Q35,
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
        let p = resolve(&fs, &[], &[budget("0000:01:00.0", 2)], None, &Q35);
        assert!(p.problems.is_empty());
        let d = decision(&fs, &p, "0000:01:00.0");
        assert_eq!((d.os_vfs, d.sriov_rule), (Some(2), Some(0)));
        // Equal to TotalVFs: accepted, nothing to mediate.
        let p = resolve(&fs, &[], &[budget("8086:10c9", 8)], None, &Q35);
        let d = decision(&fs, &p, "0000:01:00.0");
        assert_eq!((d.os_vfs, d.sriov_rule), (None, Some(0)));
        // Zero: no VFs for the OS.
        let p = resolve(&fs, &[], &[budget("8086:10c9", 0)], None, &Q35);
        assert_eq!(decision(&fs, &p, "0000:01:00.0").os_vfs, Some(0));
        // A hidden PF's budget does not apply.
        let p = resolve(
            &fs,
            &[dev("8086:10c9", "hidden")],
            &[budget("8086:10c9", 2)],
            None,
            &Q35,
        );
        assert_eq!(p.problems.len(), 1);
        assert_eq!(decision(&fs, &p, "0000:01:00.0").os_vfs, None);
    }

    #[test]
    fn rules_the_core_cannot_enforce_leave_the_function_with_the_os() {
        let msgs =
            |p: &Plan| -> Vec<String> { p.problems.iter().map(|x| x.message.clone()).collect() };
        let mut fs = machine();
        // A second segment with an e1000e of its own.
        let mut other = fs
            .iter()
            .find(|f| f.bdf == Bdf::new(0, 0, 3, 0))
            .unwrap()
            .clone();
        other.bdf = Bdf::new(1, 0, 3, 0);
        fs.push(other);
        let hide = |m: &str| [dev("0000:00:03.0", "os"), dev(m, "hidden")];
        // Another segment: neither the hand-off nor the ports reach it.
        let p = resolve(&fs, &hide("0001:00:03.0"), &[], None, &Q35);
        assert_eq!(
            msgs(&p),
            [
                "[[device]] #2 (line 7): 0001:00:03.0 cannot be hidden: it is in PCI segment 0001, \
              and thinhv mediates configuration space in segment 0 only; it stays with the OS"
            ]
        );
        assert_eq!(decision(&fs, &p, "0001:00:03.0").owner, Owner::Os);
        // The segment-0 function of the same IDs is still hidden by an ID
        // rule; its twin elsewhere is reported, not silently skipped.
        let p = resolve(&fs, &[dev("8086:10d3", "hidden")], &[], None, &Q35);
        assert_eq!(p.problems.len(), 1, "{:?}", msgs(&p));
        assert_eq!(decision(&fs, &p, "0000:00:03.0").owner, Owner::Hidden);
        assert_eq!(decision(&fs, &p, "0001:00:03.0").owner, Owner::Os);
        // No ECAM region for segment 0: nothing can be hidden; the earlier
        // decision (rule #1, "os") holds.
        let none = Reach {
            region: None,
            ..Q35
        };
        let p = resolve(&fs, &hide("0000:00:03.0"), &[], None, &none);
        assert!(
            msgs(&p)[0].starts_with(
                "[[device]] #2 (line 7): 0000:00:03.0 cannot be hidden: the firmware describes \
                 no ECAM region for segment 0 (MCFG)"
            ),
            "{:?}",
            msgs(&p)
        );
        let d = decision(&fs, &p, "0000:00:03.0");
        assert_eq!((d.owner, d.rule), (Owner::Os, Some(0)));
        // A region whose buses start at 0x80: bus 0 is outside it.
        let high = Reach {
            region: Some(EcamRegion {
                bus_start: 0x80,
                ..Q35.region.unwrap()
            }),
            ..Q35
        };
        let p = resolve(&fs, &hide("0000:00:03.0"), &[], None, &high);
        assert!(
            msgs(&p)[0].contains(
                "cannot be hidden: bus 00 lies outside the ECAM region of segment 0 (buses 80-ff)"
            ),
            "{:?}",
            msgs(&p)
        );
        // An ECAM page beyond the core's map: 00:03.0's page ends at
        // 0xb001_9000, 00:02.0's at 0xb001_1000.
        let short = Reach {
            map_top: 0xb001_8000,
            ..Q35
        };
        let p = resolve(&fs, &hide("0000:00:03.0"), &[], None, &short);
        assert_eq!(
            msgs(&p),
            [
                "[[device]] #2 (line 7): 0000:00:03.0 cannot be hidden: its ECAM page 0xb0018000 \
              lies beyond the memory thinhv maps (up to 0xb0018000), where no access to it \
              could be trapped; it stays with the OS"
            ]
        );
        assert_eq!(decision(&fs, &p, "0000:00:03.0").owner, Owner::Os);
        let p = resolve(&fs, &hide("0000:00:02.0"), &[], None, &short);
        assert!(p.problems.is_empty(), "{:?}", msgs(&p));
        assert_eq!(decision(&fs, &p, "0000:00:02.0").owner, Owner::Hidden);
        // A VF budget the core cannot enforce: the OS keeps all its VFs.
        let below = Reach {
            map_top: 0xb010_0000,
            ..Q35
        };
        let p = resolve(&fs, &[], &[budget("8086:10c9", 2)], None, &below);
        assert_eq!(
            msgs(&p),
            [
                "[[sriov]] #1: the VF budget of 0000:01:00.0 cannot be enforced: its ECAM page \
              0xb0100000 lies beyond the memory thinhv maps (up to 0xb0100000), where no access \
              to it could be trapped; the OS sees all 8"
            ]
        );
        let d = decision(&fs, &p, "0000:01:00.0");
        assert_eq!((d.os_vfs, d.sriov_rule), (None, None));
        // A budget equal to TotalVFs needs no mediation, so no reach.
        let p = resolve(&fs, &[], &[budget("8086:10c9", 8)], None, &below);
        assert!(p.problems.is_empty(), "{:?}", msgs(&p));
    }

    #[test]
    fn mediation_beyond_the_handoff_leaves_the_function_with_the_os() {
        let fs = machine();
        let msgs =
            |p: &Plan| -> Vec<String> { p.problems.iter().map(|x| x.message.clone()).collect() };
        // One mediated function fits: the second NIC (in inventory order)
        // stays with the OS.
        let one = Reach {
            max_mediated: 1,
            ..Q35
        };
        let p = resolve(&fs, &[dev("8086:10d3", "hidden")], &[], None, &one);
        assert_eq!(
            msgs(&p),
            [
                "[[device]] #1 (line 7): 0000:00:03.0 cannot be hidden: more than 1 functions to \
              mediate; it stays with the OS"
            ]
        );
        assert_eq!(decision(&fs, &p, "0000:00:02.0").owner, Owner::Hidden);
        let d = decision(&fs, &p, "0000:00:03.0");
        assert_eq!((d.owner, d.rule), (Owner::Os, None));
        // The hidden igb needs two requester ranges (itself and its VFs).
        let narrow = Reach {
            max_blocked: 1,
            ..Q35
        };
        let p = resolve(&fs, &[dev("8086:10c9", "hidden")], &[], None, &narrow);
        assert!(
            msgs(&p)[0].ends_with(
                "0000:01:00.0 cannot be hidden: more than 1 requester ranges for the IOMMU to \
                 refuse; it stays with the OS"
            ),
            "{:?}",
            msgs(&p)
        );
        assert_eq!(decision(&fs, &p, "0000:01:00.0").owner, Owner::Os);
        // A budget counts as a mediated function too.
        let none = Reach {
            max_mediated: 0,
            ..Q35
        };
        let p = resolve(&fs, &[], &[budget("8086:10c9", 2)], None, &none);
        assert_eq!(
            msgs(&p),
            [
                "[[sriov]] #1: the VF budget of 0000:01:00.0 cannot be enforced: more than 0 \
              functions to mediate; the OS sees all 8"
            ]
        );
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
