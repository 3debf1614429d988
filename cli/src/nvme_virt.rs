//! `thinhv nvme-virt`: a test tool for the guest. NVMe virtualization
//! management from the OS (what nvme-cli's `virt-mgmt`, `list-secondary`
//! and `attach-ns` do), through the kernel's admin pass-through ioctl, to
//! bring an SR-IOV VF's secondary controller online:
//!
//! * `thinhv nvme-virt DEV sec-list` — Identify CNS 15h: each secondary
//!   controller, online or offline, with its VF number and resources;
//! * `thinhv nvme-virt DEV virt-mgmt CNTLID ACTION TYPE COUNT` —
//!   Virtualization Management (opcode 1Ch; action 8 assign, 9 online,
//!   7 offline; type 0 VQ, 1 VI);
//! * `thinhv nvme-virt DEV ns-attach NSID CNTLID` — Namespace Attachment
//!   (opcode 15h).
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use thinhv_passthrough::nvme_virt::{self, Command};

/// `struct nvme_passthru_cmd` (`linux/nvme_ioctl.h`), 72 bytes.
#[repr(C)]
#[derive(Default)]
struct PassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

/// `_IOWR('N', 0x41, struct nvme_passthru_cmd)`.
const NVME_IOCTL_ADMIN_CMD: libc::c_ulong =
    (3 << 30) | (72 << 16) | ((b'N' as libc::c_ulong) << 8) | 0x41;

/// Runs `cmd` through the kernel, with `buf` as its data.
fn admin(fd: i32, cmd: Command, buf: Option<&mut [u8]>) -> Result<u32, String> {
    let mut c = PassthruCmd {
        opcode: cmd.opcode,
        nsid: cmd.nsid,
        cdw10: cmd.cdw10,
        cdw11: cmd.cdw11,
        ..PassthruCmd::default()
    };
    if let Some(b) = buf {
        c.addr = b.as_mut_ptr() as u64;
        c.data_len = u32::try_from(b.len()).map_err(|_| "buffer too large")?;
    }
    // SAFETY: `c` is a valid nvme_passthru_cmd whose data pointer, if any,
    // points at a live buffer of `data_len` bytes for the whole call.
    let rc = unsafe { libc::ioctl(fd, NVME_IOCTL_ADMIN_CMD, &raw mut c) };
    if rc < 0 {
        return Err(format!("ioctl: {}", std::io::Error::last_os_error()));
    }
    if rc > 0 {
        return Err(format!(
            "NVMe status {rc:#x} (type {:#x}, code {:#x})",
            (rc >> 8) & 7,
            rc & 0xff
        ));
    }
    Ok(c.result)
}

fn num(s: Option<&String>) -> Result<u32, String> {
    let s = s.ok_or("missing argument")?;
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("not a number: {s}"))
}

fn command(fd: i32, args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("sec-list") => {
            let mut b = [0u8; 4096];
            admin(
                fd,
                Command::identify(nvme_virt::CNS_SECONDARY_LIST, 0),
                Some(&mut b),
            )?;
            for s in nvme_virt::parse_secondaries(&b) {
                println!(
                    "scid={} vf={} state={} vq={} vi={}",
                    s.scid,
                    s.vfn,
                    if s.online { "online" } else { "offline" },
                    s.nvq,
                    s.nvi
                );
            }
            Ok(())
        }
        Some("virt-mgmt") => {
            let (cntlid, action, kind, count) = (
                num(args.get(1))?,
                num(args.get(2))?,
                num(args.get(3))?,
                num(args.get(4))?,
            );
            let narrow = |v: u32| u16::try_from(v).map_err(|_| format!("{v} is too large"));
            let c = Command::virt_mgmt(
                u8::try_from(action).map_err(|_| "bad action")?,
                u8::try_from(kind).map_err(|_| "bad type")?,
                narrow(cntlid)?,
                narrow(count)?,
            );
            let r = admin(fd, c, None)?;
            println!("virt-mgmt controller {cntlid} action {action} type {kind} count {count}: ok ({r})");
            Ok(())
        }
        Some("ns-attach") => {
            let (nsid, cntlid) = (num(args.get(1))?, num(args.get(2))?);
            let mut b = [0u8; 4096];
            nvme_virt::controller_list(&mut b, u16::try_from(cntlid).map_err(|_| "bad id")?);
            admin(fd, Command::attach(nsid), Some(&mut b))?;
            println!("namespace {nsid} attached to controller {cntlid}");
            Ok(())
        }
        _ => Err("usage: thinhv nvme-virt DEV sec-list | virt-mgmt CNTLID ACTION TYPE COUNT | ns-attach NSID CNTLID".into()),
    }
}

/// Runs the tool.
pub fn run(args: &[String]) -> ExitCode {
    let Some(dev) = args.first() else {
        eprintln!("usage: thinhv nvme-virt DEV COMMAND ...");
        return ExitCode::from(2);
    };
    let f = match OpenOptions::new().read(true).write(true).open(dev) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("thinhv: {dev}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command(f.as_raw_fd(), &args[1..]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thinhv: nvme-virt {}: {e}", args[1..].join(" "));
            ExitCode::FAILURE
        }
    }
}
