//! NVMe virtualization management, as pure logic: what thinhv's loader
//! asks of an NVMe PF it keeps so that its secondary controllers (NVMe
//! VFs) boot with resources, online and with a namespace each
//! (`docs/appliances.md`, "NVMe VFs").
//!
//! The sequence (NVM Express Base Specification 2.0, §8.26 and the
//! Virtualization Management command, §5.27):
//!
//! 1. Identify the Primary Controller Capabilities (CNS 14h). Flexible
//!    resources the primary still holds are released with Primary
//!    Controller Flexible Allocation of 0, which takes effect at the next
//!    reset of the primary's function: the caller's FLR.
//! 2. Identify the Secondary Controller List (CNS 15h): which secondary
//!    controller is which VF.
//! 3. Each wanted secondary: Secondary Controller Assign of the most
//!    flexible queues and interrupts one secondary may have (it must be
//!    offline for that).
//! 4. VF Enable with NumVFs (the caller's SR-IOV write): a secondary
//!    controller can go online only once its VF exists.
//! 5. Secondary Controller Online, then Namespace Attachment of its
//!    namespace (already attached counts as done: a device keeps
//!    attachments across power cycles).
//!
//! A reset of the primary takes every secondary offline again, which is
//! why thinhv, not the OS, keeps the primary (`docs/appliances.md`).
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Admin command opcodes.
pub const OPC_IDENTIFY: u8 = 0x06;
/// Namespace Attachment.
pub const OPC_NS_ATTACHMENT: u8 = 0x15;
/// Virtualization Management.
pub const OPC_VIRT_MGMT: u8 = 0x1c;

/// Identify CNS: Primary Controller Capabilities.
pub const CNS_PRIMARY_CAPS: u8 = 0x14;
/// Identify CNS: Secondary Controller List.
pub const CNS_SECONDARY_LIST: u8 = 0x15;

/// Virtualization Management actions.
pub const ACT_PRIMARY_FLEXIBLE: u8 = 1;
/// Secondary Controller Offline.
pub const ACT_OFFLINE: u8 = 7;
/// Secondary Controller Assign.
pub const ACT_ASSIGN: u8 = 8;
/// Secondary Controller Online.
pub const ACT_ONLINE: u8 = 9;

/// Resource types: VQ (queues) and VI (interrupts).
pub const RT_VQ: u8 = 0;
/// Interrupt resources.
pub const RT_VI: u8 = 1;

/// Status (SCT << 8 | SC): Namespace Already Attached.
pub const STATUS_NS_ALREADY_ATTACHED: u16 = 0x118;

/// One admin command: what the sequence sets (the rest is zero; its data,
/// if any, is one 4 KiB buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command {
    /// Opcode.
    pub opcode: u8,
    /// Namespace ID.
    pub nsid: u32,
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
}

impl Command {
    /// Identify `cns` (controller ID `cntid` where the CNS takes one).
    pub const fn identify(cns: u8, cntid: u16) -> Self {
        Self {
            opcode: OPC_IDENTIFY,
            nsid: 0,
            cdw10: (cntid as u32) << 16 | cns as u32,
            cdw11: 0,
        }
    }

    /// Virtualization Management.
    pub const fn virt_mgmt(action: u8, rt: u8, cntlid: u16, nr: u16) -> Self {
        Self {
            opcode: OPC_VIRT_MGMT,
            nsid: 0,
            cdw10: (cntlid as u32) << 16 | ((rt as u32) & 7) << 8 | (action as u32) & 0xf,
            cdw11: nr as u32,
        }
    }

    /// Namespace Attachment (attach) of `nsid`; its data a controller
    /// list ([`controller_list`]).
    pub const fn attach(nsid: u32) -> Self {
        Self {
            opcode: OPC_NS_ATTACHMENT,
            nsid,
            cdw10: 0,
            cdw11: 0,
        }
    }

    /// The 16 dwords of its submission queue entry, with command ID `cid`
    /// and its data at `prp1` (one page).
    #[allow(clippy::cast_possible_truncation)] // the halves of PRP 1
    pub fn entry(&self, cid: u16, prp1: u64) -> [u32; 16] {
        let mut e = [0u32; 16];
        e[0] = u32::from(cid) << 16 | u32::from(self.opcode);
        e[1] = self.nsid;
        e[6] = prp1 as u32;
        e[7] = (prp1 >> 32) as u32;
        e[10] = self.cdw10;
        e[11] = self.cdw11;
        e
    }
}

/// A Namespace Attachment's data: the one controller `cntlid`.
pub fn controller_list(data: &mut [u8; 4096], cntlid: u16) {
    data.fill(0);
    data[0..2].copy_from_slice(&1u16.to_le_bytes());
    data[2..4].copy_from_slice(&cntlid.to_le_bytes());
}

/// A completion queue entry's status field (SCT << 8 | SC) and phase.
pub const fn completion_status(dw3: u32) -> (u16, bool) {
    (((dw3 >> 17) & 0x7ff) as u16, dw3 & 1 << 16 != 0)
}

fn le16(d: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([d[at], d[at + 1]])
}

fn le32(d: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]])
}

/// What the Primary Controller Capabilities say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrimaryCaps {
    /// The primary's controller ID.
    pub cntlid: u16,
    /// Flexible queue resources in all.
    pub vq_total: u32,
    /// Flexible queue resources the primary holds.
    pub vq_primary: u16,
    /// Most flexible queue resources one secondary may have.
    pub vq_max: u16,
    /// Flexible interrupt resources in all.
    pub vi_total: u32,
    /// Flexible interrupt resources the primary holds.
    pub vi_primary: u16,
    /// Most flexible interrupt resources one secondary may have.
    pub vi_max: u16,
}

impl PrimaryCaps {
    /// From the Identify data (CNS 14h).
    pub fn parse(d: &[u8; 4096]) -> Self {
        Self {
            cntlid: le16(d, 0),
            vq_total: le32(d, 32),
            vq_primary: le16(d, 40),
            vq_max: le16(d, 44),
            vi_total: le32(d, 64),
            vi_primary: le16(d, 72),
            vi_max: le16(d, 76),
        }
    }
}

/// One entry of the Secondary Controller List.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Secondary {
    /// Its controller ID.
    pub scid: u16,
    /// Online.
    pub online: bool,
    /// Its VF (1-based).
    pub vfn: u16,
    /// Queue resources assigned.
    pub nvq: u16,
    /// Interrupt resources assigned.
    pub nvi: u16,
}

/// The Secondary Controller List (CNS 15h).
pub fn parse_secondaries(d: &[u8; 4096]) -> Vec<Secondary> {
    let n = usize::from(d[0]).min(127);
    (0..n)
        .map(|i| {
            let e = 32 + 32 * i;
            Secondary {
                scid: le16(d, e),
                online: d[e + 4] & 1 != 0,
                vfn: le16(d, e + 8),
                nvq: le16(d, e + 10),
                nvi: le16(d, e + 12),
            }
        })
        .collect()
}

/// A failed admin command: its status field (SCT << 8 | SC), or 0xffff
/// when it did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failed(pub u16);

/// What the sequence runs on: the primary's admin queue, its function's
/// reset and its SR-IOV capability.
pub trait Primary {
    /// Runs `cmd` with `data` as its one page of data (read or written by
    /// the controller); its completion's dword 0.
    fn run(&mut self, cmd: Command, data: &mut [u8; 4096]) -> Result<u32, Failed>;
    /// Resets the primary's function (FLR) and brings its admin queue up
    /// again.
    fn reset_function(&mut self) -> Result<(), String>;
    /// VF Enable with NumVFs `num_vfs`, once the VFs answer.
    fn enable_vfs(&mut self, num_vfs: u16) -> Result<(), String>;
}

/// A secondary controller set up: VF `vfn` is controller `scid` with
/// namespace `nsid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Provisioned {
    /// The VF (1-based).
    pub vfn: u16,
    /// Its controller ID.
    pub scid: u16,
    /// Its namespace.
    pub nsid: u32,
    /// Queue resources (admin queue included).
    pub nvq: u16,
    /// Interrupt resources.
    pub nvi: u16,
}

fn step(what: &str, r: Result<u32, Failed>) -> Result<u32, String> {
    r.map_err(|Failed(s)| {
        if s == 0xffff {
            format!("{what}: no completion")
        } else {
            format!("{what}: status {s:#05x}")
        }
    })
}

/// Sets up the secondary controllers of `wants` (VF, namespace), with
/// NumVFs `num_vfs` (at least the highest VF wanted): the module
/// documentation's sequence.
pub fn provision(
    p: &mut impl Primary,
    wants: &[(u16, u32)],
    num_vfs: u16,
) -> Result<Vec<Provisioned>, String> {
    let mut data = [0u8; 4096];
    let mut caps = PrimaryCaps::default();
    for pass in 0..2 {
        step(
            "Identify Primary Controller Capabilities",
            p.run(Command::identify(CNS_PRIMARY_CAPS, 0), &mut data),
        )?;
        caps = PrimaryCaps::parse(&data);
        if caps.vq_primary == 0 && caps.vi_primary == 0 {
            break;
        }
        if pass == 1 {
            return Err(format!(
                "the primary still holds {} flexible queue and {} interrupt resources after its reset",
                caps.vq_primary, caps.vi_primary
            ));
        }
        for rt in [RT_VQ, RT_VI] {
            step(
                "Primary Controller Flexible Allocation",
                p.run(
                    Command::virt_mgmt(ACT_PRIMARY_FLEXIBLE, rt, caps.cntlid, 0),
                    &mut data,
                ),
            )?;
        }
        p.reset_function()?;
    }
    if caps.vq_max < 2 || caps.vi_max < 1 {
        return Err(format!(
            "a secondary controller may have {} queue and {} interrupt resources; it needs 2 and 1",
            caps.vq_max, caps.vi_max
        ));
    }
    step(
        "Identify Secondary Controller List",
        p.run(Command::identify(CNS_SECONDARY_LIST, 0), &mut data),
    )?;
    let list = parse_secondaries(&data);
    let mut out = Vec::new();
    for &(vfn, nsid) in wants {
        let s = list
            .iter()
            .find(|s| s.vfn == vfn)
            .ok_or_else(|| format!("no secondary controller is VF {vfn}"))?;
        if s.online {
            step(
                "Secondary Controller Offline",
                p.run(Command::virt_mgmt(ACT_OFFLINE, RT_VQ, s.scid, 0), &mut data),
            )?;
        }
        for (rt, nr) in [(RT_VQ, caps.vq_max), (RT_VI, caps.vi_max)] {
            step(
                "Secondary Controller Assign",
                p.run(Command::virt_mgmt(ACT_ASSIGN, rt, s.scid, nr), &mut data),
            )?;
        }
        out.push(Provisioned {
            vfn,
            scid: s.scid,
            nsid,
            nvq: caps.vq_max,
            nvi: caps.vi_max,
        });
    }
    p.enable_vfs(num_vfs)?;
    for s in &out {
        step(
            "Secondary Controller Online",
            p.run(Command::virt_mgmt(ACT_ONLINE, RT_VQ, s.scid, 0), &mut data),
        )?;
        controller_list(&mut data, s.scid);
        match p.run(Command::attach(s.nsid), &mut data) {
            Err(Failed(STATUS_NS_ALREADY_ATTACHED)) => {}
            r => {
                step(&format!("Namespace Attachment of namespace {}", s.nsid), r)?;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // the fake's small counts and fields
mod tests {
    use super::*;
    use alloc::vec;

    /// A controller as QEMU's `hw/nvme` models one (and as the
    /// specification has it): flexible resources the primary holds move
    /// at its function's reset, which takes every secondary offline;
    /// assignment only while offline; online only with a VF and at least
    /// 2 queues and 1 interrupt; a private namespace attaches once.
    struct Fake {
        primary_vq: u16,
        next_primary_vq: u16,
        primary_vi: u16,
        next_primary_vi: u16,
        secondaries: Vec<Secondary>,
        num_vfs: u16,
        attached: Vec<(u32, u16)>,
        log: Vec<String>,
        stuck_vi: bool,
    }

    const TOTAL: u16 = 4;

    impl Fake {
        fn new() -> Self {
            Self {
                primary_vq: TOTAL,
                next_primary_vq: TOTAL,
                primary_vi: 2,
                next_primary_vi: 2,
                secondaries: (1..=2)
                    .map(|v| Secondary {
                        scid: 0x40 + v,
                        vfn: v,
                        ..Secondary::default()
                    })
                    .collect(),
                num_vfs: 0,
                attached: Vec::new(),
                log: Vec::new(),
                stuck_vi: false,
            }
        }
    }

    impl Primary for Fake {
        fn run(&mut self, cmd: Command, data: &mut [u8; 4096]) -> Result<u32, Failed> {
            let act = (cmd.cdw10 & 0xf) as u8;
            let rt = ((cmd.cdw10 >> 8) & 7) as u8;
            let cntlid = (cmd.cdw10 >> 16) as u16;
            self.log
                .push(format!("{:02x}/{act}/{rt}/{cntlid:#x}", cmd.opcode));
            match (cmd.opcode, cmd.cdw10 & 0xff) {
                (OPC_IDENTIFY, 0x14) => {
                    data.fill(0);
                    data[0] = 0x40;
                    data[32..36].copy_from_slice(&u32::from(TOTAL).to_le_bytes());
                    data[40..42].copy_from_slice(&self.primary_vq.to_le_bytes());
                    data[44..46].copy_from_slice(&2u16.to_le_bytes());
                    data[64..68].copy_from_slice(&2u32.to_le_bytes());
                    data[72..74].copy_from_slice(&self.primary_vi.to_le_bytes());
                    data[76..78].copy_from_slice(&1u16.to_le_bytes());
                    return Ok(0);
                }
                (OPC_IDENTIFY, 0x15) => {
                    data.fill(0);
                    data[0] = self.secondaries.len() as u8;
                    for (i, s) in self.secondaries.iter().enumerate() {
                        let e = 32 + 32 * i;
                        data[e..e + 2].copy_from_slice(&s.scid.to_le_bytes());
                        data[e + 4] = u8::from(s.online);
                        data[e + 8..e + 10].copy_from_slice(&s.vfn.to_le_bytes());
                        data[e + 10..e + 12].copy_from_slice(&s.nvq.to_le_bytes());
                        data[e + 12..e + 14].copy_from_slice(&s.nvi.to_le_bytes());
                    }
                    return Ok(0);
                }
                _ => {}
            }
            if cmd.opcode == OPC_NS_ATTACHMENT {
                let id = u16::from_le_bytes([data[2], data[3]]);
                let exists = self
                    .secondaries
                    .iter()
                    .any(|s| s.scid == id && s.vfn <= self.num_vfs);
                if !exists {
                    return Err(Failed(0x11c));
                }
                if self.attached.iter().any(|a| a.0 == cmd.nsid) {
                    return Err(Failed(STATUS_NS_ALREADY_ATTACHED));
                }
                self.attached.push((cmd.nsid, id));
                return Ok(0);
            }
            assert_eq!(cmd.opcode, OPC_VIRT_MGMT);
            let num_vfs = self.num_vfs;
            let free_vq =
                TOTAL - self.primary_vq - self.secondaries.iter().map(|s| s.nvq).sum::<u16>();
            let free_vi = 2 - self.primary_vi - self.secondaries.iter().map(|s| s.nvi).sum::<u16>();
            match act {
                ACT_PRIMARY_FLEXIBLE => {
                    if rt == RT_VQ {
                        self.next_primary_vq = cmd.cdw11 as u16;
                    } else if !self.stuck_vi {
                        self.next_primary_vi = cmd.cdw11 as u16;
                    }
                    Ok(cmd.cdw11)
                }
                ACT_ASSIGN | ACT_ONLINE | ACT_OFFLINE => {
                    let s = self
                        .secondaries
                        .iter_mut()
                        .find(|s| s.scid == cntlid)
                        .ok_or(Failed(0x11f))?;
                    match act {
                        ACT_ASSIGN if s.online => Err(Failed(0x120)),
                        ACT_ASSIGN => {
                            let nr = cmd.cdw11 as u16;
                            let (have, free) = if rt == RT_VQ {
                                (&mut s.nvq, free_vq)
                            } else {
                                (&mut s.nvi, free_vi)
                            };
                            if nr > *have + free {
                                return Err(Failed(0x121));
                            }
                            *have = nr;
                            Ok(u32::from(nr))
                        }
                        ACT_ONLINE if s.nvq < 2 || s.nvi < 1 || s.vfn > num_vfs => {
                            Err(Failed(0x120))
                        }
                        ACT_ONLINE => {
                            s.online = true;
                            Ok(0)
                        }
                        _ => {
                            s.online = false;
                            s.nvq = 0;
                            s.nvi = 0;
                            Ok(0)
                        }
                    }
                }
                _ => Err(Failed(0x002)),
            }
        }

        fn reset_function(&mut self) -> Result<(), String> {
            self.log.push(String::from("flr"));
            self.primary_vq = self.next_primary_vq;
            self.primary_vi = self.next_primary_vi;
            // QEMU takes the secondaries' resources with their state.
            for s in &mut self.secondaries {
                s.online = false;
                s.nvq = 0;
                s.nvi = 0;
            }
            self.num_vfs = 0;
            Ok(())
        }

        fn enable_vfs(&mut self, num_vfs: u16) -> Result<(), String> {
            self.log.push(format!("vfs {num_vfs}"));
            self.num_vfs = num_vfs;
            Ok(())
        }
    }

    #[test]
    fn frees_the_primarys_resources_then_assigns_enables_onlines_and_attaches() {
        let mut f = Fake::new();
        let out = provision(&mut f, &[(1, 1), (2, 2)], 2).unwrap();
        assert_eq!(
            out,
            vec![
                Provisioned {
                    vfn: 1,
                    scid: 0x41,
                    nsid: 1,
                    nvq: 2,
                    nvi: 1
                },
                Provisioned {
                    vfn: 2,
                    scid: 0x42,
                    nsid: 2,
                    nvq: 2,
                    nvi: 1
                }
            ]
        );
        assert!(f.secondaries.iter().all(|s| s.online));
        assert_eq!(f.attached, vec![(1, 0x41), (2, 0x42)]);
        // The primary's resources released before the FLR, the VFs enabled
        // before the first online.
        let at = |s: &str| f.log.iter().position(|l| l == s).unwrap();
        assert!(at("1c/1/0/0x40") < at("flr") && at("1c/1/1/0x40") < at("flr"));
        assert!(at("vfs 2") < at("1c/9/0/0x41"));
        assert!(at("1c/8/0/0x42") < at("vfs 2"));
    }

    #[test]
    fn a_second_boot_finds_resources_free_and_namespaces_attached() {
        let mut f = Fake::new();
        provision(&mut f, &[(2, 2)], 2).unwrap();
        // The server boots again: the device kept its attachments and its
        // assignments; the loader's FLR took the secondaries offline.
        f.reset_function().unwrap();
        f.log.clear();
        let out = provision(&mut f, &[(2, 2)], 2).unwrap();
        assert_eq!(out[0].scid, 0x42);
        assert!(!f.log.iter().any(|l| l == "flr"), "{:?}", f.log);
        assert!(f.secondaries[1].online);
    }

    #[test]
    fn a_controller_that_refuses_is_named_with_its_status() {
        let mut f = Fake::new();
        assert_eq!(
            provision(&mut f, &[(3, 3)], 3).unwrap_err(),
            "no secondary controller is VF 3"
        );
        // A primary whose interrupts do not move at its reset.
        let mut f = Fake::new();
        f.next_primary_vi = 2;
        f.stuck_vi = true;
        assert_eq!(
            provision(&mut f, &[(2, 2)], 2).unwrap_err(),
            "the primary still holds 0 flexible queue and 2 interrupt resources after its reset"
        );
        // A secondary already given every interrupt elsewhere.
        let mut f = Fake::new();
        f.primary_vi = 0;
        f.next_primary_vi = 0;
        f.secondaries[0].nvi = 2;
        f.primary_vq = 0;
        f.next_primary_vq = 0;
        assert_eq!(
            provision(&mut f, &[(2, 2)], 2).unwrap_err(),
            "Secondary Controller Assign: status 0x121"
        );
    }

    #[test]
    fn commands_and_completions_are_laid_out_as_the_specification_says() {
        let e = Command::virt_mgmt(ACT_ASSIGN, RT_VI, 0x42, 3).entry(7, 0x1234_5000);
        assert_eq!(e[0], 7 << 16 | 0x1c);
        assert_eq!(e[10], 0x42 << 16 | 1 << 8 | 8);
        assert_eq!(e[11], 3);
        assert_eq!((e[6], e[7]), (0x1234_5000, 0));
        assert_eq!(Command::identify(0x15, 0).entry(1, 0)[10], 0x15);
        assert_eq!(completion_status(0x0118 << 17 | 1 << 16), (0x118, true));
        let mut d = [0xffu8; 4096];
        controller_list(&mut d, 0x42);
        assert_eq!(&d[..6], &[1, 0, 0x42, 0, 0, 0]);
    }
}
