//! The device inventory: PCI functions found through ECAM, as records for
//! the status page and lines for the boot console.
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use thinhv_abi::status::{
    DEV_FLAG_PCIE, DEV_FLAG_SRIOV, DEV_FLAG_VFS_ENABLED, DeviceRecord, MAX_DEVICES, OWNER_OS,
    class_name,
};
use thinhv_passthrough::pci::{Function, Kind};

/// The status-page record of a function. Every function is the OS's until
/// ownership rules exist.
pub fn record(f: &Function) -> DeviceRecord {
    let mut flags = 0;
    if f.is_pcie() {
        flags |= DEV_FLAG_PCIE;
    }
    let (total, vf_dev, num) = match &f.sriov {
        Some(s) => {
            flags |= DEV_FLAG_SRIOV;
            if s.vfs_enabled() {
                flags |= DEV_FLAG_VFS_ENABLED;
            }
            (s.total_vfs, s.vf_device_id, s.num_vfs)
        }
        None => (0, 0, 0),
    };
    DeviceRecord {
        segment: f.bdf.segment,
        bus: f.bdf.bus,
        devfn: f.bdf.devfn(),
        vendor: f.vendor,
        device: f.device,
        class_rev: f.class_rev,
        subsys_vendor: f.subsystem.0,
        subsys_device: f.subsystem.1,
        header_type: f.header_type,
        owner: OWNER_OS,
        flags,
        secondary_bus: f.bridge_buses.map_or(0, |b| b.0),
        sriov_total_vfs: total,
        sriov_os_vfs: total,
        sriov_vf_device: vf_dev,
        sriov_num_vfs: num,
        reserved: 0,
    }
}

/// Records for at most [`MAX_DEVICES`] functions, and how many did not fit.
pub fn records(functions: &[Function]) -> (Vec<DeviceRecord>, u32) {
    let kept: Vec<DeviceRecord> = functions.iter().take(MAX_DEVICES).map(record).collect();
    let dropped = u32::try_from(functions.len() - kept.len()).unwrap_or(u32::MAX);
    (kept, dropped)
}

/// One console line for a function.
pub fn line(f: &Function) -> String {
    let mut s = format!(
        "{} {:04x}:{:04x} {} owner=os",
        f.bdf,
        f.vendor,
        f.device,
        class_name(f.base_class(), f.subclass())
    );
    if let Some(v) = &f.sriov {
        let _ = write!(
            s,
            " sr-iov: TotalVFs {} NumVFs {} VF {:04x}:{:04x}",
            v.total_vfs, v.num_vfs, f.vendor, v.vf_device_id
        );
    }
    s
}

/// The lines the loader prints: a summary, then each NIC and storage
/// controller (the devices an admin checks are passed through).
pub fn report(functions: &[Function]) -> Vec<String> {
    let mut out = Vec::new();
    let nics = functions.iter().filter(|f| f.kind() == Kind::Nic).count();
    let storage = functions
        .iter()
        .filter(|f| f.kind() == Kind::Storage)
        .count();
    out.push(format!(
        "PCI: {} functions ({} NICs, {} storage controllers), all owned by the OS (pass-through)",
        functions.len(),
        nics,
        storage
    ));
    for f in functions
        .iter()
        .filter(|f| matches!(f.kind(), Kind::Nic | Kind::Storage))
    {
        out.push(format!("  {}", line(f)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinhv_passthrough::pci::Bdf;

    use thinhv_passthrough::sriov::{CAP_SIZE, SriovCap};

    fn nic_with_sriov() -> Function {
        let mut bytes = [0u8; CAP_SIZE];
        bytes[0] = 0x10;
        bytes[0x08] = 1;
        bytes[0x0e] = 8;
        bytes[0x10] = 2;
        bytes[0x1a] = 0xca;
        bytes[0x1b] = 0x10;
        Function {
            bdf: Bdf::new(0, 2, 0, 0),
            vendor: 0x8086,
            device: 0x10c9,
            class_rev: 0x0200_0001,
            caps: alloc::vec![(0x10, 0x40)],
            sriov: SriovCap::parse(0x160, &bytes).ok(),
            ..Function::default()
        }
    }

    #[test]
    fn records_carry_ids_class_and_sriov() {
        let f = nic_with_sriov();
        let r = record(&f);
        assert_eq!((r.bus, r.devfn, r.vendor, r.device), (2, 0, 0x8086, 0x10c9));
        assert_eq!(
            r.flags,
            DEV_FLAG_PCIE | DEV_FLAG_SRIOV | DEV_FLAG_VFS_ENABLED
        );
        assert_eq!(
            (r.sriov_total_vfs, r.sriov_os_vfs, r.sriov_num_vfs),
            (8, 8, 2)
        );
        assert_eq!(r.sriov_vf_device, 0x10ca);
        assert_eq!(r.owner, OWNER_OS);
        assert_eq!(
            line(&f),
            "0000:02:00.0 8086:10c9 Ethernet controller owner=os sr-iov: TotalVFs 8 NumVFs 2 VF 8086:10ca"
        );
    }

    #[test]
    fn report_lists_nics_and_storage_and_caps_the_records() {
        let mut fs = alloc::vec![nic_with_sriov()];
        fs.push(Function {
            bdf: Bdf::new(0, 0, 0, 0),
            class_rev: 0x0600_0000,
            vendor: 0x8086,
            device: 0x29c0,
            ..Function::default()
        });
        fs.push(Function {
            bdf: Bdf::new(0, 1, 0, 0),
            class_rev: 0x0108_0202,
            vendor: 0x1b36,
            device: 0x0010,
            ..Function::default()
        });
        let lines = report(&fs);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("PCI: 3 functions (1 NICs, 1 storage controllers)"));
        assert!(lines[2].contains("NVMe controller"));
        let many: Vec<Function> = (0..MAX_DEVICES + 3).map(|_| fs[1].clone()).collect();
        let (r, dropped) = records(&many);
        assert_eq!((r.len(), dropped), (MAX_DEVICES, 3));
    }
}
