//! PCI enumeration through ECAM, as pure logic over [`ConfigSpace`].
//!
//! The walk starts at the first bus of each ECAM region (MCFG) and follows
//! the secondary bus numbers the firmware programmed into bridges, so it
//! reads only buses that exist; loops and out-of-range bus numbers in a
//! broken topology are ignored rather than followed. Capability lists are
//! walked with iteration limits, so a device with a circular list cannot
//! hang the boot.
// Register fields are shifted and masked to their width before narrowing.
#![allow(clippy::cast_possible_truncation)]
use alloc::vec::Vec;
use core::fmt;
use thinhv_sriov::{EXT_CAP_ID_SRIOV, SriovCap};

/// A segment:bus:device.function address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// PCI segment group.
    pub segment: u16,
    /// Bus.
    pub bus: u8,
    /// Device (0..32).
    pub device: u8,
    /// Function (0..8).
    pub function: u8,
}

impl Bdf {
    /// A new address (device and function masked to their widths).
    pub const fn new(segment: u16, bus: u8, device: u8, function: u8) -> Self {
        Self {
            segment,
            bus,
            device: device & 0x1f,
            function: function & 7,
        }
    }

    /// The function of routing ID `rid` on `segment`.
    pub const fn from_rid(segment: u16, rid: u16) -> Self {
        Self::new(
            segment,
            (rid >> 8) as u8,
            ((rid >> 3) & 0x1f) as u8,
            (rid & 7) as u8,
        )
    }

    /// Routing ID: bus << 8 | device << 3 | function.
    pub const fn rid(self) -> u16 {
        ((self.bus as u16) << 8) | ((self.device as u16) << 3) | self.function as u16
    }

    /// The device/function byte.
    pub const fn devfn(self) -> u8 {
        (self.device << 3) | self.function
    }

    /// Offset of this function's 4 KiB from the base of its segment's
    /// ECAM space: address bits 27:20 are the bus number itself, 19:15 the
    /// device, 14:12 the function (PCI Express Base 4.0 §7.2.2, Table 7-1),
    /// whatever bus the segment's range starts at.
    pub const fn ecam_offset(self) -> u64 {
        ((self.bus as u64) << 20) | ((self.device as u64) << 15) | ((self.function as u64) << 12)
    }

    /// Parses `SSSS:BB:DD.F` or `BB:DD.F` (hexadecimal, as `lspci -D`).
    pub fn parse(s: &str) -> Option<Self> {
        let (rest, func) = s.rsplit_once('.')?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (seg, bus, dev) = match parts.as_slice() {
            [s, b, d] => (*s, *b, *d),
            [b, d] => ("0", *b, *d),
            _ => return None,
        };
        let ok = |t: &str, max: usize| !t.is_empty() && t.len() <= max;
        if !(ok(seg, 4) && ok(bus, 2) && ok(dev, 2) && ok(func, 1)) {
            return None;
        }
        let seg = u16::from_str_radix(seg, 16).ok()?;
        let bus = u8::from_str_radix(bus, 16).ok()?;
        let dev = u8::from_str_radix(dev, 16).ok()?;
        let func = u8::from_str_radix(func, 16).ok()?;
        (dev < 32 && func < 8).then(|| Self::new(seg, bus, dev, func))
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

/// Access to configuration space. Reads of absent functions return all
/// ones, as the hardware does.
pub trait ConfigSpace {
    /// A naturally aligned dword at `offset` (< 4096).
    fn read32(&self, bdf: Bdf, offset: u16) -> u32;
}

/// One ECAM region from the MCFG.
///
/// `base` is the MCFG entry's Base Address as the table gives it (PCI
/// Firmware Specification 3.0 §4.1.2, Table 4-3): the base of the
/// segment's whole enhanced configuration space, where bus 0 would be,
/// also when `bus_start` is above 0 (bus `n` is at `base + (n << 20)`;
/// the region decodes only `bus_start..=bus_end`). Linux, Xen and FreeBSD
/// read it the same way; computing from `bus_start` instead reaches the
/// wrong function's page on such segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcamRegion {
    /// Physical base of the segment's ECAM space (where bus 0 would be).
    pub base: u64,
    /// Segment group.
    pub segment: u16,
    /// First bus decoded.
    pub bus_start: u8,
    /// Last bus decoded.
    pub bus_end: u8,
}

impl EcamRegion {
    /// Physical address of `bdf`'s configuration space, if this region
    /// decodes it.
    pub fn address(&self, bdf: Bdf) -> Option<u64> {
        (bdf.segment == self.segment && (self.bus_start..=self.bus_end).contains(&bdf.bus))
            .then(|| self.base + bdf.ecam_offset())
    }
}

/// A legacy or extended capability: (ID, offset).
pub type Cap = (u16, u16);

/// One function found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Function {
    /// Address.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (base class, subclass, programming interface) << 8 |
    /// revision.
    pub class_rev: u32,
    /// Header type (bit 7: multi-function masked off).
    pub header_type: u8,
    /// Subsystem vendor and device (type-0 headers).
    pub subsystem: (u16, u16),
    /// Secondary and subordinate bus (bridges).
    pub bridge_buses: Option<(u8, u8)>,
    /// Legacy capabilities.
    pub caps: Vec<Cap>,
    /// Extended capabilities.
    pub ext_caps: Vec<Cap>,
    /// SR-IOV capability, if any.
    pub sriov: Option<SriovCap>,
    /// Implemented BARs, sized ([`crate::bars::size_function`]).
    pub bars: Vec<crate::bars::Bar>,
    /// Implemented VF BARs of an SR-IOV PF, sized per VF.
    pub vf_bars: Vec<crate::bars::Bar>,
    /// A bridge's memory windows.
    pub windows: Option<crate::bars::Windows>,
}

/// Legacy capability ID of PCI Express.
pub const CAP_ID_PCIE: u16 = 0x10;
/// Legacy capability ID of MSI.
pub const CAP_ID_MSI: u16 = 0x05;
/// Legacy capability ID of MSI-X.
pub const CAP_ID_MSIX: u16 = 0x11;

impl Function {
    /// The offset of its MSI capability if it signals by MSI only (no
    /// MSI-X).
    pub fn msi_only(&self) -> Option<u16> {
        let has = |id| self.caps.iter().find(|c| c.0 == id).map(|c| c.1);
        has(CAP_ID_MSIX)
            .is_none()
            .then(|| has(CAP_ID_MSI))
            .flatten()
    }

    /// An NVM Express controller (class 01h, subclass 08h, interface 02h).
    pub fn is_nvme(&self) -> bool {
        self.class_rev >> 8 == 0x01_0802
    }

    /// Base class.
    pub fn base_class(&self) -> u8 {
        (self.class_rev >> 24) as u8
    }

    /// Subclass.
    pub fn subclass(&self) -> u8 {
        (self.class_rev >> 16) as u8
    }

    /// What kind of device this is, for reports and `class:` rules.
    pub fn kind(&self) -> Kind {
        Kind::of(self.base_class(), self.subclass())
    }

    /// Whether it has a PCI Express capability.
    pub fn is_pcie(&self) -> bool {
        self.caps.iter().any(|c| c.0 == CAP_ID_PCIE)
    }
}

/// Broad device kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Mass storage controller (class 01h).
    Storage,
    /// Network controller (class 02h).
    Nic,
    /// Display controller (03h).
    Display,
    /// Bridge (06h).
    Bridge,
    /// Serial bus controller such as USB (0Ch).
    SerialBus,
    /// Anything else.
    Other,
}

impl Kind {
    /// From base class and subclass.
    pub fn of(base: u8, _sub: u8) -> Self {
        match base {
            0x01 => Self::Storage,
            0x02 => Self::Nic,
            0x03 => Self::Display,
            0x06 => Self::Bridge,
            0x0c => Self::SerialBus,
            _ => Self::Other,
        }
    }

    /// Short name (`class:` rule spelling).
    pub fn name(self) -> &'static str {
        match self {
            Self::Storage => "storage",
            Self::Nic => "nic",
            Self::Display => "display",
            Self::Bridge => "bridge",
            Self::SerialBus => "serial-bus",
            Self::Other => "other",
        }
    }
}

/// Limits that keep a hostile or broken topology from costing more than a
/// bounded number of reads.
const MAX_LEGACY_CAPS: usize = 48;
const MAX_EXT_CAPS: usize = (4096 - 256) / 4;

/// Walks the legacy capability list.
pub fn legacy_caps(cfg: &impl ConfigSpace, bdf: Bdf) -> Vec<Cap> {
    let mut out = Vec::new();
    let status = cfg.read32(bdf, 0x04) >> 16;
    if status & (1 << 4) == 0 {
        return out;
    }
    let mut ptr = (cfg.read32(bdf, 0x34) & 0xfc) as u16;
    while ptr >= 0x40 && out.len() < MAX_LEGACY_CAPS {
        let v = cfg.read32(bdf, ptr);
        if out.iter().any(|c: &Cap| c.1 == ptr) {
            break;
        }
        out.push(((v & 0xff) as u16, ptr));
        ptr = ((v >> 8) & 0xfc) as u16;
    }
    out
}

/// Walks the extended capability list (ECAM only).
pub fn extended_caps(cfg: &impl ConfigSpace, bdf: Bdf) -> Vec<Cap> {
    let mut out = Vec::new();
    let mut ptr = 0x100u16;
    while out.len() < MAX_EXT_CAPS {
        let v = cfg.read32(bdf, ptr);
        if v == 0 || v == u32::MAX {
            break;
        }
        if out.iter().any(|c: &Cap| c.1 == ptr) {
            break;
        }
        out.push(((v & 0xffff) as u16, ptr));
        let next = ((v >> 20) & 0xffc) as u16;
        if next < 0x100 {
            break;
        }
        ptr = next;
    }
    out
}

fn read_sriov(cfg: &impl ConfigSpace, bdf: Bdf, offset: u16) -> Option<SriovCap> {
    if usize::from(offset) + thinhv_sriov::CAP_SIZE > 4096 {
        return None;
    }
    let mut bytes = [0u8; thinhv_sriov::CAP_SIZE];
    for (i, chunk) in bytes.chunks_mut(4).enumerate() {
        let off = offset + u16::try_from(i * 4).ok()?;
        chunk.copy_from_slice(&cfg.read32(bdf, off).to_le_bytes());
    }
    SriovCap::parse(offset, &bytes).ok()
}

/// Reads one function, if present.
pub fn probe(cfg: &impl ConfigSpace, bdf: Bdf) -> Option<Function> {
    let id = cfg.read32(bdf, 0);
    let vendor = (id & 0xffff) as u16;
    if vendor == 0xffff || vendor == 0 {
        return None;
    }
    let class_rev = cfg.read32(bdf, 0x08);
    let header_type = ((cfg.read32(bdf, 0x0c) >> 16) & 0x7f) as u8;
    let (subsystem, bridge_buses) = match header_type {
        0 => {
            let s = cfg.read32(bdf, 0x2c);
            (((s & 0xffff) as u16, (s >> 16) as u16), None)
        }
        1 => {
            let b = cfg.read32(bdf, 0x18);
            (
                (0, 0),
                Some((((b >> 8) & 0xff) as u8, ((b >> 16) & 0xff) as u8)),
            )
        }
        _ => ((0, 0), None),
    };
    let caps = legacy_caps(cfg, bdf);
    let is_pcie = caps.iter().any(|c| c.0 == CAP_ID_PCIE);
    let ext_caps = if is_pcie {
        extended_caps(cfg, bdf)
    } else {
        Vec::new()
    };
    let sriov = ext_caps
        .iter()
        .find(|c| c.0 == EXT_CAP_ID_SRIOV)
        .and_then(|c| read_sriov(cfg, bdf, c.1));
    Some(Function {
        bdf,
        vendor,
        device: (id >> 16) as u16,
        class_rev,
        header_type,
        subsystem,
        bridge_buses,
        caps,
        ext_caps,
        sriov,
        bars: Vec::new(),
        vf_bars: Vec::new(),
        windows: (header_type == 1).then(|| crate::bars::bridge_windows(cfg, bdf)),
    })
}

/// Every function reachable from the regions' first buses, in bus order
/// of discovery (depth first through bridges).
pub fn enumerate(regions: &[EcamRegion], cfg: &impl ConfigSpace) -> Vec<Function> {
    let mut out = Vec::new();
    for r in regions {
        let mut visited = [false; 256];
        let mut stack = alloc::vec![r.bus_start];
        while let Some(bus) = stack.pop() {
            if visited[usize::from(bus)] || !(r.bus_start..=r.bus_end).contains(&bus) {
                continue;
            }
            visited[usize::from(bus)] = true;
            let mut children = Vec::new();
            for dev in 0..32u8 {
                let f0 = Bdf::new(r.segment, bus, dev, 0);
                let Some(first) = probe(cfg, f0) else {
                    continue;
                };
                let multi = (cfg.read32(f0, 0x0c) >> 16) & 0x80 != 0;
                let mut funcs = alloc::vec![first];
                if multi {
                    funcs.extend(
                        (1..8).filter_map(|f| probe(cfg, Bdf::new(r.segment, bus, dev, f))),
                    );
                }
                for func in funcs {
                    if let Some((secondary, _)) = func.bridge_buses
                        && secondary > bus
                    {
                        children.push(secondary);
                    }
                    out.push(func);
                }
            }
            // Depth first, lowest secondary bus first.
            children.sort_unstable_by(|a, b| b.cmp(a));
            stack.extend(children);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use std::collections::BTreeMap;

    /// Configuration space as a map of dwords; everything else reads as
    /// all ones.
    #[derive(Default)]
    pub struct FakeConfig {
        pub dwords: BTreeMap<(Bdf, u16), u32>,
        /// Writable address bits of BAR registers (the rest read back as
        /// they are: flags, or zeros).
        pub bar_masks: BTreeMap<(Bdf, u16), u32>,
        /// Set when a BAR held all ones while the function decoded.
        pub decode_was_off_while_sizing: bool,
        decoding_violation: bool,
    }

    impl FakeConfig {
        pub fn set(&mut self, bdf: Bdf, off: u16, v: u32) {
            self.dwords.insert((bdf, off), v);
        }

        /// A type-0 function with a class, optionally PCIe with an
        /// extended-capability chain.
        pub fn endpoint(&mut self, bdf: Bdf, id: u32, class_rev: u32, pcie: bool) {
            self.set(bdf, 0, id);
            self.set(bdf, 0x04, if pcie { 1 << 20 } else { 0 });
            self.set(bdf, 0x08, class_rev);
            self.set(bdf, 0x0c, 0);
            self.set(bdf, 0x2c, 0x1100_1af4);
            if pcie {
                self.set(bdf, 0x34, 0x40);
                self.set(bdf, 0x40, 0x0000_0010);
            }
        }

        /// A BAR at `reg` of `size` bytes (a power of two) holding
        /// `value` (address | flag bits); 64-bit when the flags say so.
        pub fn bar(&mut self, bdf: Bdf, reg: u16, value: u64, size: u64) {
            let io = value & 1 == 1;
            let flags = if io { 0x3 } else { 0xf };
            let mask = !(size - 1);
            self.set(bdf, reg, value as u32);
            self.bar_masks.insert((bdf, reg), (mask as u32) & !flags);
            if !io && (value >> 1) & 3 == 2 {
                self.set(bdf, reg + 4, (value >> 32) as u32);
                self.bar_masks.insert((bdf, reg + 4), (mask >> 32) as u32);
            }
        }

        fn decoding(&self, bdf: Bdf, reg: u16) -> bool {
            if reg >= 0x100 {
                // A VF BAR: VF MSE of the SR-IOV capability at 0x160.
                self.dwords.get(&(bdf, 0x168)).is_some_and(|c| c & 8 != 0)
            } else {
                self.dwords.get(&(bdf, 0x04)).is_some_and(|c| c & 3 != 0)
            }
        }

        pub fn bridge(&mut self, bdf: Bdf, secondary: u8, subordinate: u8) {
            self.set(bdf, 0, 0x000c_1b36);
            self.set(bdf, 0x04, 1 << 20);
            self.set(bdf, 0x08, 0x0604_0000);
            self.set(bdf, 0x0c, 0x0001_0000);
            self.set(
                bdf,
                0x18,
                u32::from(bdf.bus) | (u32::from(secondary) << 8) | (u32::from(subordinate) << 16),
            );
            self.set(bdf, 0x34, 0x40);
            self.set(bdf, 0x40, 0x0000_0010);
        }
    }

    impl ConfigSpace for FakeConfig {
        fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
            if self.dwords.keys().any(|(b, _)| *b == bdf) {
                self.dwords.get(&(bdf, offset)).copied().unwrap_or(0)
            } else {
                u32::MAX
            }
        }
    }

    impl crate::bars::ConfigWrite for FakeConfig {
        fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
            let old = self.dwords.get(&(bdf, offset)).copied().unwrap_or(0);
            let new = match self.bar_masks.get(&(bdf, offset)) {
                Some(&m) => {
                    if value == u32::MAX {
                        if self.decoding(bdf, offset) {
                            self.decoding_violation = true;
                        } else {
                            self.decode_was_off_while_sizing = !self.decoding_violation;
                        }
                    }
                    (value & m) | (old & !m & 0xf)
                }
                // An unimplemented BAR is hardwired to zero.
                None if (0x10..0x28).contains(&offset) || (0x184..0x19c).contains(&offset) => old,
                // The Status half is read-only or write-one-to-clear.
                None if offset == 0x04 => (old & 0xffff_0000) | (value & 0xffff),
                None => value,
            };
            if new != 0 || self.dwords.contains_key(&(bdf, offset)) {
                self.dwords.insert((bdf, offset), new);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::FakeConfig;
    use super::*;

    fn region() -> EcamRegion {
        EcamRegion {
            base: 0xb000_0000,
            segment: 0,
            bus_start: 0,
            bus_end: 0xff,
        }
    }

    #[test]
    fn bdf_parse_format_and_rid() {
        let b = Bdf::parse("0000:02:00.0").unwrap();
        assert_eq!(b, Bdf::new(0, 2, 0, 0));
        assert_eq!(b.to_string(), "0000:02:00.0");
        assert_eq!(Bdf::parse("02:1f.7"), Some(Bdf::new(0, 2, 0x1f, 7)));
        assert_eq!(Bdf::new(0, 2, 0x10, 2).rid(), 0x0282);
        assert_eq!(Bdf::from_rid(0, 0x0282), Bdf::new(0, 2, 0x10, 2));
        assert_eq!(Bdf::from_rid(0, 0x0100).to_string(), "0000:01:00.0");
        for bad in [
            "",
            "02:00",
            "0000:02:20.0",
            "0000:02:00.8",
            "x:02:00.0",
            "00000:02:00.0",
            "0:0:0:0.0",
        ] {
            assert_eq!(Bdf::parse(bad), None, "{bad}");
        }
        assert_eq!(
            region().address(Bdf::new(0, 1, 2, 3)),
            Some(0xb000_0000 + (1 << 20) + (2 << 15) + (3 << 12))
        );
        assert_eq!(region().address(Bdf::new(1, 1, 2, 3)), None);
    }

    #[test]
    fn a_segment_whose_buses_start_above_zero() {
        // MCFG: Base Address 0xc000_0000, buses 0x80..=0xff. The base is
        // where bus 0 would be: bus 0x80 starts 128 MiB above it.
        let r = EcamRegion {
            base: 0xc000_0000,
            segment: 0,
            bus_start: 0x80,
            bus_end: 0xff,
        };
        assert_eq!(
            r.address(Bdf::new(0, 0x80, 0, 0)),
            Some(0xc000_0000 + (0x80 << 20))
        );
        assert_eq!(
            r.address(Bdf::new(0, 0x81, 3, 1)),
            Some(0xc000_0000 + (0x81 << 20) + (3 << 15) + (1 << 12))
        );
        // Buses below the range are not this region's.
        assert_eq!(r.address(Bdf::new(0, 0x7f, 0, 0)), None);
        assert_eq!(r.address(Bdf::new(0, 0, 0, 0)), None);
        // The walk starts at the region's first bus and reads each
        // function at its own address.
        let mut c = FakeConfig::default();
        c.endpoint(Bdf::new(0, 0x80, 0, 0), 0x29c0_8086, 0x0600_0000, false);
        c.bridge(Bdf::new(0, 0x80, 1, 0), 0x81, 0x81);
        c.endpoint(Bdf::new(0, 0x81, 0, 0), 0x10d3_8086, 0x0200_0000, true);
        let f = enumerate(&[r], &c);
        let names: Vec<String> = f.iter().map(|f| f.bdf.to_string()).collect();
        assert_eq!(names, ["0000:80:00.0", "0000:80:01.0", "0000:81:00.0"]);
    }

    #[test]
    fn walks_bridges_and_multifunction_devices() {
        let mut c = FakeConfig::default();
        c.endpoint(Bdf::new(0, 0, 0, 0), 0x29c0_8086, 0x0600_0000, false);
        c.endpoint(Bdf::new(0, 0, 2, 0), 0x10d3_8086, 0x0200_0000, false);
        c.bridge(Bdf::new(0, 0, 3, 0), 1, 2);
        c.endpoint(Bdf::new(0, 1, 0, 0), 0x0010_1b36, 0x0108_0202, true);
        // Multi-function device on bus 0 slot 0x1f.
        c.endpoint(Bdf::new(0, 0, 0x1f, 0), 0x2918_8086, 0x0601_0002, false);
        c.set(Bdf::new(0, 0, 0x1f, 0), 0x0c, 0x0080_0000);
        c.endpoint(Bdf::new(0, 0, 0x1f, 2), 0x2922_8086, 0x0106_0102, false);
        // A function on bus 5, which no bridge leads to: not visited.
        c.endpoint(Bdf::new(0, 5, 0, 0), 0x1234_1234, 0x0200_0000, false);
        let f = enumerate(&[region()], &c);
        let names: Vec<String> = f.iter().map(|f| f.bdf.to_string()).collect();
        assert_eq!(
            names,
            [
                "0000:00:00.0",
                "0000:00:02.0",
                "0000:00:03.0",
                "0000:00:1f.0",
                "0000:00:1f.2",
                "0000:01:00.0"
            ]
        );
        let nvme = &f[5];
        assert_eq!(nvme.kind(), Kind::Storage);
        assert!(nvme.is_pcie());
        assert_eq!(f[1].kind(), Kind::Nic);
        assert_eq!(f[2].bridge_buses, Some((1, 2)));
        assert_eq!(f[1].subsystem, (0x1af4, 0x1100));
    }

    #[test]
    fn bridge_loops_and_circular_capability_lists_end() {
        let mut c = FakeConfig::default();
        // A bridge claiming its own bus as secondary, and one pointing
        // back to bus 1 from bus 2.
        c.bridge(Bdf::new(0, 0, 1, 0), 0, 0);
        c.bridge(Bdf::new(0, 0, 2, 0), 1, 2);
        c.bridge(Bdf::new(0, 1, 0, 0), 2, 2);
        c.bridge(Bdf::new(0, 2, 0, 0), 1, 1);
        // Circular legacy list 0x40 -> 0x50 -> 0x40, circular extended list.
        let d = Bdf::new(0, 0, 4, 0);
        c.endpoint(d, 0x1111_2222, 0x0200_0000, true);
        c.set(d, 0x40, 0x0000_5010);
        c.set(d, 0x50, 0x0000_4005);
        c.set(d, 0x100, 0x1400_0001);
        c.set(d, 0x140, 0x1000_000b);
        let f = enumerate(&[region()], &c);
        assert_eq!(f.len(), 5);
        let dev = f.iter().find(|x| x.bdf == d).unwrap();
        assert_eq!(dev.caps, [(0x10, 0x40), (0x05, 0x50)]);
        assert_eq!(dev.ext_caps, [(0x01, 0x100), (0x0b, 0x140)]);
    }

    #[test]
    fn finds_the_sriov_capability() {
        let mut c = FakeConfig::default();
        let pf = Bdf::new(0, 0, 2, 0);
        c.endpoint(pf, 0x10c9_8086, 0x0200_0001, true);
        // AER at 0x100 → SR-IOV at 0x160.
        c.set(pf, 0x100, 0x1601_0001);
        c.set(pf, 0x160, 0x0001_0010);
        c.set(pf, 0x160 + 0x0c, 0x0008_0008);
        c.set(pf, 0x160 + 0x10, 0x0000_0002);
        c.set(pf, 0x160 + 0x14, 0x0002_0080);
        c.set(pf, 0x160 + 0x18, 0x10ca_0000);
        let f = enumerate(&[region()], &c);
        let s = f[0].sriov.unwrap();
        assert_eq!(
            (s.offset, s.total_vfs, s.num_vfs, s.vf_device_id),
            (0x160, 8, 2, 0x10ca)
        );
        assert_eq!(s.vf_rid(pf.rid(), 1), Some(0x0090));
    }
}
