//! Starting the next image: `[boot] next` with its options, else the next
//! `Boot####` in `BootOrder` after thinhv's own entry.
use super::BootTarget;
use alloc::boxed::Box;
use alloc::vec::Vec;
use thinhv_efi::boot_option::{LoadOption, after_current, parse_order, variable_name};
use uefi::boot::{self, LoadImageSource, OpenProtocolAttributes, OpenProtocolParams};
use uefi::prelude::*;
use uefi::println;
use uefi::proto::BootPolicy;
use uefi::proto::device_path::DevicePath;
use uefi::proto::device_path::build::{DevicePathBuilder, media::FilePath};
use uefi::proto::loaded_image::LoadedImage;
use uefi::runtime::{self, VariableVendor};
use uefi::{CString16, Handle};

/// Boots the next image. Returns only when nothing could be started.
pub fn boot(target: &BootTarget) -> Status {
    if let Some(next) = &target.next {
        match start_path(next, target.options.as_deref()) {
            Ok(()) => println!("thinhv: {next} returned"),
            Err(e) => println!("thinhv: cannot start {next}: {e}"),
        }
        println!("thinhv: trying the next entry in BootOrder instead");
    }
    boot_order();
    println!("thinhv: nothing left to boot");
    Status::NOT_FOUND
}

/// The device path of the volume thinhv.efi was loaded from.
pub fn own_volume_path() -> Result<boot::ScopedProtocol<DevicePath>, alloc::string::String> {
    let li = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle())
        .map_err(|e| alloc::format!("{:?}", e.status()))?;
    let device = li.device().ok_or("thinhv.efi has no device handle")?;
    drop(li);
    // SAFETY: GET_PROTOCOL does not take ownership; the device path is only
    // read while the handle exists (it outlives the loader).
    unsafe {
        boot::open_protocol::<DevicePath>(
            OpenProtocolParams {
                handle: device,
                agent: boot::image_handle(),
                controller: None,
            },
            OpenProtocolAttributes::GetProtocol,
        )
    }
    .map_err(|e| alloc::format!("no device path for thinhv's volume: {:?}", e.status()))
}

/// Loads `path` (on thinhv's own volume), passes `options`, starts it.
fn start_path(path: &str, options: Option<&str>) -> Result<(), alloc::string::String> {
    let dp = own_volume_path()?;
    let name = CString16::try_from(path).map_err(|_| "path is not valid UCS-2")?;
    let mut buf = Vec::new();
    let mut b = DevicePathBuilder::with_vec(&mut buf);
    for node in dp.node_iter() {
        b = b.push(&node).map_err(|_| "device path too long")?;
    }
    let full = b
        .push(&FilePath { path_name: &name })
        .and_then(uefi::proto::device_path::build::DevicePathBuilder::finalize)
        .map_err(|_| "cannot build the device path")?;
    let handle = boot::load_image(
        boot::image_handle(),
        LoadImageSource::FromDevicePath {
            device_path: full,
            boot_policy: BootPolicy::ExactMatch,
        },
    )
    .map_err(|e| alloc::format!("LoadImage: {:?}", e.status()))?;
    if let Some(opts) = options {
        let units = thinhv_efi::text::to_ucs2(opts)
            .map_err(|c| alloc::format!("boot.options contains {c:?}, which UCS-2 cannot carry"))?;
        set_options(handle, units_to_bytes(&units));
    }
    println!(
        "thinhv: starting {path}{}",
        if options.is_some() {
            " with options"
        } else {
            ""
        }
    );
    boot::start_image(handle).map_err(|e| alloc::format!("StartImage: {:?}", e.status()))
}

fn units_to_bytes(units: &[u16]) -> Vec<u8> {
    units.iter().flat_map(|u| u.to_le_bytes()).collect()
}

/// Gives the image its load options; the buffer lives as long as the
/// firmware may read it (leaked: the image may keep the pointer).
fn set_options(handle: Handle, bytes: Vec<u8>) {
    if bytes.is_empty() {
        return;
    }
    let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    if let Ok(mut li) = boot::open_protocol_exclusive::<LoadedImage>(handle) {
        // SAFETY: the buffer is leaked, so it outlives the image.
        unsafe { li.set_load_options(leaked.as_ptr(), u32::try_from(leaked.len()).unwrap_or(0)) };
    }
}

fn read_var(name: &str) -> Option<Box<[u8]>> {
    let n = CString16::try_from(name).ok()?;
    runtime::get_variable_boxed(&n, &VariableVendor::GLOBAL_VARIABLE)
        .ok()
        .map(|(b, _)| b)
}

/// Tries the `Boot####` entries after ours.
fn boot_order() {
    let order = read_var("BootOrder")
        .map(|b| parse_order(&b))
        .unwrap_or_default();
    let current = read_var("BootCurrent").and_then(|b| parse_order(&b).first().copied());
    for n in after_current(&order, current) {
        let name = variable_name(n);
        let Some(raw) = read_var(&name) else { continue };
        let Some(opt) = LoadOption::parse(&raw) else {
            println!("thinhv: {name} is malformed; skipped");
            continue;
        };
        if !opt.bootable() {
            continue;
        }
        let Ok(dp) = <&DevicePath>::try_from(opt.device_path.as_slice()) else {
            println!("thinhv: {name} has a malformed device path; skipped");
            continue;
        };
        println!("thinhv: starting {name} \"{}\"", opt.description);
        let handle = match boot::load_image(
            boot::image_handle(),
            LoadImageSource::FromDevicePath {
                device_path: dp,
                boot_policy: BootPolicy::BootSelection,
            },
        ) {
            Ok(h) => h,
            Err(e) => {
                println!("thinhv: {name}: LoadImage: {:?}", e.status());
                continue;
            }
        };
        set_options(handle, opt.optional_data.clone());
        match boot::start_image(handle) {
            Ok(()) => println!("thinhv: {name} returned"),
            Err(e) => println!("thinhv: {name}: StartImage: {:?}", e.status()),
        }
    }
}
