//! `thinhv status` and `thinhv log`.
use crate::NOT_PRESENT;
use crate::cpuid::{Presence, presence};
use crate::devmem;
use serde_json::json;
use std::process::ExitCode;
use thinhv_abi::exit::{EXIT_REASON_COUNT, ExitReason};
use thinhv_abi::status::{
    CpuRecord, CpuState, DEV_FLAG_PCIE, DEV_FLAG_SRIOV, DEV_FLAG_VFS_ENABLED, DeviceRecord,
    IOMMU_DOMAIN_BLOCKED, IOMMU_STATE_FAILED, IOMMU_STATE_TRANSLATING, IommuRecord, OWNER_HIDDEN,
    STATUS_MAGIC, StatusPageHeader, VF_SPACE_FITS, VF_SPACE_NO_ROOM, VF_SPACE_ROOT_BUS,
    VF_SPACE_UNASSIGNED, class_name,
};
use zerocopy::FromBytes;

/// The status page, read.
pub struct Page {
    /// Header.
    pub header: StatusPageHeader,
    /// CPU records.
    pub cpus: Vec<CpuRecord>,
    /// The log text held.
    pub log: String,
    /// The device inventory.
    pub devices: Vec<DeviceRecord>,
    /// The IOMMU units.
    pub iommus: Vec<IommuRecord>,
    /// The appliance partitions.
    pub appliances: Vec<thinhv_abi::status::ApplianceRecord>,
}

/// Reads and checks the status page.
pub fn read_page(p: &Presence) -> Result<Page, String> {
    let bytes = devmem::read(p.status_page, p.status_size as usize).map_err(|e| {
        format!(
            "cannot read the status page at {:#x} through /dev/mem: {e}",
            p.status_page
        )
    })?;
    let (header, _) =
        StatusPageHeader::read_from_prefix(&bytes).map_err(|_| "status page too small")?;
    if header.magic != STATUS_MAGIC {
        return Err(format!(
            "no status page at {:#x} (bad magic)",
            p.status_page
        ));
    }
    let mut cpus = Vec::new();
    for i in 0..header.max_cpus as usize {
        let off = header.cpus_offset as usize + i * header.cpu_record_size as usize;
        let rec = bytes
            .get(off..)
            .and_then(|b| CpuRecord::read_from_prefix(b).ok())
            .ok_or("truncated CPU records")?;
        cpus.push(rec.0);
    }
    let (lo, ls) = (header.log_offset as usize, header.log_size as usize);
    let ring = bytes.get(lo..lo + ls).ok_or("truncated log ring")?;
    let head = header.log_head;
    let start = head.saturating_sub(ls as u64);
    let text: Vec<u8> = (start..head)
        .filter_map(|i| {
            usize::try_from(i % ls as u64)
                .ok()
                .and_then(|j| ring.get(j).copied())
        })
        .collect();
    let mut devices = Vec::new();
    let rec = header.device_record_size as usize;
    if rec >= core::mem::size_of::<DeviceRecord>() {
        for i in 0..header.device_count as usize {
            let off = header.devices_offset as usize + i * rec;
            let Some(d) = bytes
                .get(off..)
                .and_then(|b| DeviceRecord::read_from_prefix(b).ok())
            else {
                break;
            };
            devices.push(d.0);
        }
    }
    let mut iommus = Vec::new();
    for i in 0..header.iommu_count.min(8) as usize {
        let off = header.iommu_offset as usize + i * core::mem::size_of::<IommuRecord>();
        let Some(r) = bytes
            .get(off..)
            .and_then(|b| IommuRecord::read_from_prefix(b).ok())
        else {
            break;
        };
        iommus.push(r.0);
    }
    let mut appliances = Vec::new();
    for i in 0..thinhv_abi::handoff::MAX_APPLIANCES {
        let off = thinhv_abi::status::appliances_offset(header.max_cpus as usize)
            + i * core::mem::size_of::<thinhv_abi::status::ApplianceRecord>();
        match bytes
            .get(off..)
            .and_then(|b| thinhv_abi::status::ApplianceRecord::read_from_prefix(b).ok())
        {
            Some((r, _)) if r.name[0] != 0 => appliances.push(r),
            _ => break,
        }
    }
    Ok(Page {
        header,
        cpus,
        devices,
        iommus,
        appliances,
        log: String::from_utf8_lossy(&text).into_owned(),
    })
}

fn vendor_name(v: u32) -> &'static str {
    match v {
        thinhv_abi::hypercall::VENDOR_AMD_SVM => "AMD SVM",
        thinhv_abi::hypercall::VENDOR_INTEL_VMX => "Intel VMX",
        _ => "unknown",
    }
}

fn version(v: u32) -> String {
    let (a, b, c) = thinhv_abi::unpack_version(v);
    format!("{a}.{b}.{c}")
}

fn not_present(p: &Presence, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            json!({"present": false, "hypervisor_bit": p.hypervisor_bit,
            "signature": String::from_utf8_lossy(&p.signature)})
        );
    } else if p.hypervisor_bit {
        println!(
            "thinhv: not running (a hypervisor is present, signature {:?}, or thinhv hides itself)",
            String::from_utf8_lossy(&p.signature)
        );
    } else {
        println!("thinhv: not running (no hypervisor present)");
    }
    ExitCode::from(NOT_PRESENT)
}

/// The status page, or the exit code after saying why there is none
/// (thinhv not running, or the page unreadable).
pub fn page_or_exit(json: bool) -> Result<Page, ExitCode> {
    let p = presence();
    if !p.is_thinhv() {
        return Err(not_present(&p, json));
    }
    read_page(&p).map_err(|e| {
        eprintln!("thinhv: {e}");
        ExitCode::FAILURE
    })
}

/// `thinhv status`.
pub fn status(json: bool) -> ExitCode {
    let p = presence();
    if !p.is_thinhv() {
        return not_present(&p, json);
    }
    let page = read_page(&p);
    if json {
        let mut v = json!({
            "present": true,
            "signature": String::from_utf8_lossy(&p.signature),
            "version": version(p.version),
            "abi": p.abi,
            "vendor": vendor_name(p.vendor),
            "cpus_virtualized": p.cpus_virtualized,
            "cpus_expected": p.cpus_expected,
            "bytes_reserved": p.bytes_reserved,
            "status_page": p.status_page,
            "sealed": p.sealed,
        });
        match &page {
            Ok(pg) => {
                let cpus: Vec<_> = pg.cpus.iter().enumerate().map(|(i, c)| {
                    let exits: serde_json::Map<_, _> = ExitReason::ALL.iter()
                        .map(|r| (r.name().to_string(), json!(c.exits[r.index()]))).collect();
                    json!({"index": i, "apic_id": c.apic_id, "state": CpuState(c.state).name(), "exits": exits})
                }).collect();
                v["protected_base"] = json!(pg.header.protected_base);
                v["protected_size"] = json!(pg.header.protected_size);
                v["blocked_writes"] = json!(pg.header.blocked_writes);
                v["cpus"] = json!(cpus);
                v["exits_total"] = json!(
                    totals(&pg.cpus)
                        .iter()
                        .enumerate()
                        .map(|(i, n)| (ExitReason::ALL[i].name().to_string(), json!(n)))
                        .collect::<serde_json::Map<_, _>>()
                );
                v["devices"] = json!(pg.devices.len());
                v["iommu"] = iommu_json(&pg.iommus);
                v["log"] = json!(pg.log);
            }
            Err(e) => v["status_page_error"] = json!(e),
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!(
        "thinhv {} (ABI {}), {}",
        version(p.version),
        p.abi,
        vendor_name(p.vendor)
    );
    println!(
        "signature:          {}",
        String::from_utf8_lossy(&p.signature)
    );
    println!(
        "CPUs virtualized:   {} of {}",
        p.cpus_virtualized, p.cpus_expected
    );
    println!(
        "memory reserved:    {} KiB ({} bytes)",
        p.bytes_reserved / 1024,
        p.bytes_reserved
    );
    println!("status page:        {:#x}", p.status_page);
    println!(
        "sealed:             {}",
        if p.sealed { "yes (OS running)" } else { "no" }
    );
    match page {
        Ok(pg) => {
            println!(
                "protected region:   {:#x} + {} KiB",
                pg.header.protected_base,
                pg.header.protected_size / 1024
            );
            println!("blocked writes:     {}", pg.header.blocked_writes);
            print!("\nexits by reason   ");
            for i in 0..pg.cpus.len() {
                print!("{:>10}", format!("cpu{i}"));
            }
            println!("{:>12}", "total");
            let t = totals(&pg.cpus);
            for r in ExitReason::ALL {
                print!("  {:<16}", r.name());
                for c in &pg.cpus {
                    print!("{:>10}", c.exits[r.index()]);
                }
                println!("{:>12}", t[r.index()]);
            }
            println!(
                "\nPCI functions:      {} (thinhv devices lists them)",
                pg.devices.len()
            );
            print!("{}", iommu_text(&pg.iommus));
            println!("\nhypervisor log:\n{}", pg.log.trim_end());
        }
        Err(e) => println!("\n(counters and log unavailable: {e}; run as root)"),
    }
    ExitCode::SUCCESS
}

fn totals(cpus: &[CpuRecord]) -> [u64; EXIT_REASON_COUNT] {
    let mut t = [0u64; EXIT_REASON_COUNT];
    for c in cpus {
        for (a, b) in t.iter_mut().zip(c.exits.iter()) {
            *a += b;
        }
    }
    t
}

/// Without units in protect mode: what that means.
const NO_IOMMU: &str = "none driven by thinhv ([iommu] mode = \"off\", none found, or AMD-Vi): DMA into thinhv is not blocked (docs/security.md)";

fn kind_name(k: u8) -> &'static str {
    match k {
        thinhv_abi::handoff::IOMMU_KIND_VTD => "VT-d",
        thinhv_abi::handoff::IOMMU_KIND_AMDVI => "AMD-Vi",
        _ => "unknown",
    }
}

fn state_name(s: u8) -> &'static str {
    match s {
        IOMMU_STATE_TRANSLATING => "translating",
        IOMMU_STATE_FAILED => "failed",
        _ => "off",
    }
}

fn rid(r: u16) -> String {
    format!("{:02x}:{:02x}.{}", r >> 8, (r >> 3) & 0x1f, r & 7)
}

/// The IOMMU units as JSON.
pub fn iommu_json(units: &[IommuRecord]) -> serde_json::Value {
    let list: Vec<_> = units
        .iter()
        .map(|u| {
            let last = (u.faults > 0).then(|| {
                json!({
                    "address": u.last_fault_address,
                    "source": rid(u.last_fault_source),
                    "reason": u.last_fault_reason,
                    "write": u.last_fault_write != 0,
                })
            });
            json!({
                "base": u.base,
                "kind": kind_name(u.kind),
                "segment": u.segment,
                "state": state_name(u.state),
                "faults": u.faults,
                "overflows": u.overflows,
                "last_fault": last,
                "os_unit": os_unit_json(u),
            })
        })
        .collect();
    let managed = units.iter().any(|u| u.state == IOMMU_STATE_TRANSLATING);
    json!({"managed": managed, "units": list})
}

fn os_unit_json(u: &IommuRecord) -> serde_json::Value {
    if u.os_state == thinhv_abi::status::OS_UNIT_NONE {
        return serde_json::Value::Null;
    }
    json!({
        "translating": u.os_state == thinhv_abi::status::OS_UNIT_TRANSLATING,
        "remapping": u.os_remapping != 0,
        "domains": u.os_domains,
        "pages": u.os_pages,
        "refused": u.os_refused,
        "faults": u.os_faults,
        "flushes": u.os_flushes,
        "remapping_entries": u.os_entries,
    })
}

/// The IOMMU units as text.
pub fn iommu_text(units: &[IommuRecord]) -> String {
    use std::fmt::Write;
    if units.is_empty() {
        return format!("IOMMU:              {NO_IOMMU}\n");
    }
    let mut s = String::new();
    for u in units {
        let _ = write!(
            s,
            "IOMMU:              {} unit {:#x} (segment {}): {}, {} faults",
            kind_name(u.kind),
            u.base,
            u.segment,
            state_name(u.state),
            u.faults
        );
        // VT-d reasons 0x20 to 0x27: an interrupt message refused by
        // remapping (the record holds no address).
        if u.faults > 0
            && u.kind == thinhv_abi::handoff::IOMMU_KIND_VTD
            && (0x20..=0x27).contains(&u.last_fault_reason)
        {
            let _ = write!(
                s,
                " (last: an interrupt message by {} refused, reason {:#x})",
                rid(u.last_fault_source),
                u.last_fault_reason
            );
        } else if u.faults > 0 {
            let _ = write!(
                s,
                " (last: {} by {} at {:#x}, reason {:#x})",
                if u.last_fault_write != 0 {
                    "write"
                } else {
                    "read"
                },
                rid(u.last_fault_source),
                u.last_fault_address,
                u.last_fault_reason
            );
        }
        s.push('\n');
        if u.os_state != thinhv_abi::status::OS_UNIT_NONE {
            let _ = writeln!(
                s,
                "  the OS's own unit: {}, {} domain(s) shadowed, {} page(s) mapped, {} refused (thinhv's or an appliance's), {} fault(s) reported to the OS, interrupt remapping {} ({} entries)",
                if u.os_state == thinhv_abi::status::OS_UNIT_TRANSLATING {
                    "translating"
                } else {
                    "translation off"
                },
                u.os_domains,
                u.os_pages,
                u.os_refused,
                u.os_faults,
                if u.os_remapping != 0 { "on" } else { "off" },
                u.os_entries
            );
        }
    }
    s
}

/// thinhv puts every requester in one IOMMU domain (1) while a unit
/// translates; none otherwise.
fn shared_domain(iommus: &[IommuRecord]) -> Option<u16> {
    iommus
        .iter()
        .any(|u| u.state == IOMMU_STATE_TRANSLATING)
        .then_some(1)
}

/// `SSSS:BB:DD.F` of a record.
pub fn bdf(d: &DeviceRecord) -> String {
    format!(
        "{:04x}:{:02x}:{:02x}.{}",
        d.segment,
        d.bus,
        d.devfn >> 3,
        d.devfn & 7
    )
}

fn owner_name(d: &DeviceRecord) -> &'static str {
    match d.owner {
        OWNER_HIDDEN => "hidden",
        thinhv_abi::status::OWNER_APPLIANCE => "appliance",
        _ => "os",
    }
}

/// What the IOMMU lets a function reach.
fn dma_name(d: &DeviceRecord, iommu_on: bool) -> &'static str {
    if d.owner == thinhv_abi::status::OWNER_APPLIANCE {
        return if iommu_on {
            "appliance-memory"
        } else {
            "unrestricted (no IOMMU)"
        };
    }
    match (iommu_on, d.iommu_domain == IOMMU_DOMAIN_BLOCKED) {
        (true, true) => "blocked",
        (true, false) => "os-memory",
        (false, _) => "unrestricted (no IOMMU)",
    }
}

fn vf_space_name(v: u8) -> &'static str {
    match v {
        VF_SPACE_FITS => "fits",
        VF_SPACE_UNASSIGNED => "unassigned",
        VF_SPACE_NO_ROOM => "no-room",
        VF_SPACE_ROOT_BUS => "root-bus",
        _ => "none",
    }
}

fn bars_json(d: &DeviceRecord) -> serde_json::Value {
    let list: Vec<_> = d
        .bars
        .iter()
        .enumerate()
        .filter(|(_, b)| b.size != 0)
        .map(|(i, b)| {
            let flags = b.base & thinhv_abi::status::BAR_FLAG_MASK;
            json!({
                "index": i,
                "base": b.base & !thinhv_abi::status::BAR_FLAG_MASK & if flags & 1 == 1 { !0x3 } else { !0 },
                "size": b.size,
                "kind": if flags & 1 == 1 { "io" } else if flags & 6 == 4 { "mem64" } else { "mem32" },
                "prefetchable": flags & 8 != 0,
            })
        })
        .collect();
    json!(list)
}

/// The inventory as JSON.
pub fn devices_json(devs: &[DeviceRecord], iommus: &[IommuRecord]) -> serde_json::Value {
    let domain = shared_domain(iommus);
    let list: Vec<_> = devs
        .iter()
        .map(|d| {
            let [base, sub, _, _] = d.class_rev.to_be_bytes();
            let sriov = if d.flags & DEV_FLAG_SRIOV != 0 {
                json!({
                    "total_vfs": d.sriov_total_vfs,
                    "total_vfs_seen_by_os": d.sriov_os_vfs,
                    "num_vfs_at_boot": d.sriov_num_vfs,
                    "vfs_enabled_at_boot": d.flags & DEV_FLAG_VFS_ENABLED != 0,
                    "vf_device_id": format!("{:04x}", d.sriov_vf_device),
                    "sriov_rule": (d.sriov_rule != 0).then_some(d.sriov_rule),
                    "vf_bar_bytes": d.vf_bar_space,
                    "vf_bar_bytes_for_os": d.vf_bar_space_os,
                    "vf_bar_space": vf_space_name(d.vf_space),
                })
            } else {
                serde_json::Value::Null
            };
            json!({
                "bdf": bdf(d),
                "vendor_id": format!("{:04x}", d.vendor),
                "device_id": format!("{:04x}", d.device),
                "class": format!("{:06x}", d.class_rev >> 8),
                "class_name": class_name(base, sub),
                "pcie": d.flags & DEV_FLAG_PCIE != 0,
                "owner": owner_name(d),
                "rule": (d.rule != 0).then_some(d.rule),
                "iommu_domain": domain.map(|x| match d.owner {
                    thinhv_abi::status::OWNER_APPLIANCE => u16::from(d.iommu_domain),
                    _ if d.iommu_domain == IOMMU_DOMAIN_BLOCKED => 0,
                    _ => x,
                }),
                "dma": dma_name(d, domain.is_some()),
                "bars": bars_json(d),
                "sriov": sriov,
            })
        })
        .collect();
    json!({"devices": list})
}

/// The inventory as a table.
pub fn devices_text(devs: &[DeviceRecord], iommus: &[IommuRecord]) -> String {
    let domain = shared_domain(iommus).map_or_else(|| "none".to_string(), |d| d.to_string());
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<13} {:<9} {:<22} {:<6} {:<7} SR-IOV (TotalVFs device / seen by OS, NumVFs)",
        "address", "id", "class", "owner", "IOMMU"
    );
    for d in devs {
        let [base, sub, _, _] = d.class_rev.to_be_bytes();
        let sriov = if d.flags & DEV_FLAG_SRIOV != 0 {
            format!(
                "PF {} / {}, {}",
                d.sriov_total_vfs, d.sriov_os_vfs, d.sriov_num_vfs
            )
        } else {
            "-".to_string()
        };
        let _ = writeln!(
            s,
            "{:<13} {:04x}:{:04x} {:<22} {:<6} {:<7} {}",
            bdf(d),
            d.vendor,
            d.device,
            class_name(base, sub),
            owner_name(d),
            if d.owner == thinhv_abi::status::OWNER_APPLIANCE && domain != "none" {
                format!("{}", d.iommu_domain)
            } else if d.iommu_domain == IOMMU_DOMAIN_BLOCKED && domain != "none" {
                "blocked".to_string()
            } else {
                domain.clone()
            },
            sriov
        );
    }
    let _ = writeln!(s, "{} functions", devs.len());
    s
}

/// `thinhv devices`.
pub fn devices(json_out: bool) -> ExitCode {
    let p = presence();
    if !p.is_thinhv() {
        return not_present(&p, json_out);
    }
    match read_page(&p) {
        Ok(pg) => {
            if json_out {
                let mut v = devices_json(&pg.devices, &pg.iommus);
                v["iommu"] = iommu_json(&pg.iommus);
                v["dropped"] = json!(pg.header.devices_dropped);
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", devices_text(&pg.devices, &pg.iommus));
                print!("{}", iommu_text(&pg.iommus));
                if pg.header.devices_dropped > 0 {
                    println!(
                        "({} more functions did not fit the inventory)",
                        pg.header.devices_dropped
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("thinhv: {e} (run as root)");
            ExitCode::FAILURE
        }
    }
}

/// `thinhv log`.
pub fn log(json_out: bool) -> ExitCode {
    let p = presence();
    if !p.is_thinhv() {
        return not_present(&p, json_out);
    }
    match read_page(&p) {
        Ok(pg) => {
            if json_out {
                let v = json!({"log": pg.log, "bytes_written": pg.header.log_head,
                    "ring_size": pg.header.log_size});
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", pg.log);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("thinhv: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic() -> DeviceRecord {
        DeviceRecord {
            bus: 2,
            devfn: (1 << 3) | 1,
            vendor: 0x8086,
            device: 0x10c9,
            class_rev: 0x0200_0001,
            flags: DEV_FLAG_PCIE | DEV_FLAG_SRIOV,
            sriov_total_vfs: 8,
            sriov_os_vfs: 8,
            sriov_vf_device: 0x10ca,
            iommu_domain: thinhv_abi::status::IOMMU_DOMAIN_OS,
            bars: [
                thinhv_abi::status::BarRecord {
                    base: 0xfe80_0000,
                    size: 128 << 10,
                },
                thinhv_abi::status::BarRecord::default(),
                thinhv_abi::status::BarRecord {
                    base: 0xc001,
                    size: 32,
                },
                thinhv_abi::status::BarRecord::default(),
                thinhv_abi::status::BarRecord::default(),
                thinhv_abi::status::BarRecord::default(),
            ],
            ..DeviceRecord::default()
        }
    }

    #[test]
    fn devices_as_json() {
        let v = devices_json(&[nic()], &[]);
        let d = &v["devices"][0];
        assert_eq!(d["bdf"], "0000:02:01.1");
        assert_eq!(d["vendor_id"], "8086");
        assert_eq!(d["class"], "020000");
        assert_eq!(d["class_name"], "Ethernet controller");
        assert_eq!(d["owner"], "os");
        assert_eq!(d["pcie"], true);
        assert_eq!(d["sriov"]["total_vfs"], 8);
        assert_eq!(d["sriov"]["vf_device_id"], "10ca");
        assert!(d["iommu_domain"].is_null());
        let on = IommuRecord {
            base: 0xfed9_0000,
            kind: thinhv_abi::handoff::IOMMU_KIND_VTD,
            state: IOMMU_STATE_TRANSLATING,
            faults: 2,
            last_fault_source: 0x0100,
            last_fault_write: 1,
            ..IommuRecord::default()
        };
        assert_eq!(
            devices_json(&[nic()], &[on])["devices"][0]["iommu_domain"],
            1
        );
        let j = iommu_json(&[on]);
        assert_eq!(j["managed"], true);
        assert_eq!(j["units"][0]["state"], "translating");
        assert_eq!(j["units"][0]["last_fault"]["source"], "01:00.0");
        assert_eq!(iommu_json(&[])["managed"], false);
        let t = iommu_text(&[on]);
        assert!(
            t.contains(
                "VT-d unit 0xfed90000 (segment 0): translating, 2 faults (last: write by 01:00.0"
            ),
            "{t}"
        );
        let refused = IommuRecord {
            last_fault_reason: 0x22,
            ..on
        };
        let t = iommu_text(&[refused]);
        assert!(
            t.contains("2 faults (last: an interrupt message by 01:00.0 refused, reason 0x22)"),
            "{t}"
        );
        let d = &devices_json(&[nic()], &[on])["devices"][0];
        assert_eq!(d["dma"], "os-memory");
        assert_eq!(d["bars"][0]["base"], 0xfe80_0000u64);
        assert_eq!(d["bars"][0]["kind"], "mem32");
        assert_eq!(d["bars"][1]["index"], 2);
        assert_eq!(d["bars"][1]["kind"], "io");
        assert_eq!(d["bars"][1]["base"], 0xc000);
        assert_eq!(d["bars"][1]["size"], 32);
        let mut plain = nic();
        plain.flags = 0;
        plain.owner = OWNER_HIDDEN;
        plain.rule = 2;
        plain.iommu_domain = IOMMU_DOMAIN_BLOCKED;
        let v = devices_json(&[plain], &[]);
        assert!(v["devices"][0]["sriov"].is_null());
        assert_eq!(v["devices"][0]["owner"], "hidden");
        assert_eq!(v["devices"][0]["rule"], 2);
        assert_eq!(v["devices"][0]["dma"], "unrestricted (no IOMMU)");
        let v = devices_json(&[plain], &[on]);
        assert_eq!(v["devices"][0]["dma"], "blocked");
        assert_eq!(v["devices"][0]["iommu_domain"], 0);
    }

    #[test]
    fn devices_as_text() {
        let t = devices_text(&[nic()], &[]);
        let row = t.lines().nth(1).unwrap();
        assert!(
            row.starts_with("0000:02:01.1  8086:10c9 Ethernet controller"),
            "{t}"
        );
        assert!(row.ends_with("PF 8 / 8, 0"), "{t}");
        assert!(t.contains("1 functions"), "{t}");
    }
}
