//! `thinhv offloads IFACE`: a test tool for the guest. Reports whether the
//! NIC's checksum and segmentation offloads are on, through the ethtool
//! ioctl (what `ethtool -k` reads), as `key=value` lines. thinhv passes
//! NICs through, so nothing between the NIC and the OS should turn them
//! off.
use std::process::ExitCode;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// Legacy ethtool "get" commands (`linux/ethtool.h`).
const QUERIES: [(&str, u32); 4] = [
    ("rx_checksum", 0x14),      // ETHTOOL_GRXCSUM
    ("tx_checksum", 0x16),      // ETHTOOL_GTXCSUM
    ("scatter_gather", 0x18),   // ETHTOOL_GSG
    ("tcp_segmentation", 0x1e), // ETHTOOL_GTSO
];

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

fn query(fd: libc::c_int, iface: &str, cmd: u32) -> Result<bool, std::io::Error> {
    let mut v = EthtoolValue { cmd, data: 0 };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &raw mut v,
        _pad: [0; 16],
    };
    let n = iface.len().min(libc::IFNAMSIZ - 1);
    req.name[..n].copy_from_slice(&iface.as_bytes()[..n]);
    // SAFETY: `req` is a valid ifreq whose data points at `v`, both live
    // across the call; SIOCETHTOOL reads the command and writes `v.data`.
    let r = unsafe { libc::ioctl(fd, SIOCETHTOOL, &raw mut req) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v.data != 0)
}

/// Runs the tool.
pub fn run(args: &[String]) -> ExitCode {
    let Some(iface) = args.first() else {
        eprintln!("usage: thinhv offloads IFACE");
        return ExitCode::from(2);
    };
    // SAFETY: a plain datagram socket for the ioctl; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        eprintln!("thinhv: socket: {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    let mut ok = true;
    for (name, cmd) in QUERIES {
        match query(fd, iface, cmd) {
            Ok(on) => println!("{name}={}", if on { "on" } else { "off" }),
            Err(e) => {
                println!("{name}=error: {e}");
                ok = false;
            }
        }
    }
    // SAFETY: `fd` was opened above and is not used after this.
    unsafe { libc::close(fd) };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
