//! Finding and reading `thinhv.toml` beside this image.
use alloc::string::String;
use alloc::vec::Vec;
use thinhv_config::{Config, ConfigError, Salvaged, salvage};
use uefi::CString16;
use uefi::boot;
use uefi::fs::FileSystem;
use uefi::println;
use uefi::proto::device_path::DevicePathNodeEnum;
use uefi::proto::loaded_image::LoadedImage;

/// The outcome of reading the file.
pub enum Loaded {
    /// No file: defaults.
    Absent,
    /// A valid file.
    Parsed(Config),
    /// A file with errors, and what the boot-critical keys say.
    Broken {
        /// The first error, with its line.
        error: ConfigError,
        /// Keys recovered line by line.
        salvaged: Salvaged,
    },
}

/// This image's path on its volume, e.g. `\EFI\BOOT\BOOTX64.EFI`.
pub fn own_path() -> Option<String> {
    let li = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle()).ok()?;
    let fp = li.file_path()?;
    let mut path = String::new();
    for node in fp.node_iter() {
        if let Ok(DevicePathNodeEnum::MediaFilePath(f)) = node.as_enum() {
            let units: Vec<u16> = f.path_name().to_vec();
            let s = thinhv_efi::text::from_ucs2(&units);
            if !path.is_empty() && !path.ends_with('\\') && !s.starts_with('\\') {
                path.push('\\');
            }
            path.push_str(&s);
        }
    }
    (!path.is_empty()).then_some(path)
}

/// Reads and parses the configuration.
pub fn load() -> Loaded {
    let Some(me) = own_path() else {
        println!("thinhv: cannot tell where thinhv.efi was loaded from; using defaults");
        return Loaded::Absent;
    };
    let dir = match me.rfind('\\') {
        Some(i) => &me[..=i],
        None => "\\",
    };
    let path = alloc::format!("{dir}{}", thinhv_config::FILE_NAME);
    let Ok(path16) = CString16::try_from(path.as_str()) else {
        return Loaded::Absent;
    };
    let Ok(sfs) = boot::get_image_file_system(boot::image_handle()) else {
        return Loaded::Absent;
    };
    let mut fs = FileSystem::new(sfs);
    let Ok(bytes) = fs.read(path16.as_ref()) else {
        return Loaded::Absent;
    };
    log::debug!("read {} bytes from {path}", bytes.len());
    let text = match core::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            let lossy = String::from_utf8_lossy(&bytes);
            return Loaded::Broken {
                error: ConfigError {
                    line: Some(line),
                    column: None,
                    message: "not valid UTF-8".into(),
                },
                salvaged: salvage(&lossy),
            };
        }
    };
    match Config::parse(text) {
        Ok(c) => {
            println!("thinhv: configuration {path} read");
            Loaded::Parsed(c)
        }
        Err(error) => {
            println!("thinhv: {error}");
            Loaded::Broken {
                error,
                salvaged: salvage(text),
            }
        }
    }
}

/// Reads a whole file from the volume this image was loaded from
/// (`\EFI\...` or `/EFI/...`).
pub fn read_esp(path: &str) -> Result<Vec<u8>, String> {
    let p = thinhv_config::normalize_esp_path(path);
    let p16 = CString16::try_from(p.as_str()).map_err(|_| alloc::format!("{p}: bad path"))?;
    let sfs = boot::get_image_file_system(boot::image_handle())
        .map_err(|e| alloc::format!("{p}: no file system ({:?})", e.status()))?;
    FileSystem::new(sfs)
        .read(p16.as_ref())
        .map_err(|e| match e {
            uefi::fs::Error::Io(io) if io.uefi_error.status() == uefi::Status::NOT_FOUND => {
                alloc::format!("{p}: not found on the ESP")
            }
            uefi::fs::Error::Io(io) => alloc::format!("{p}: {:?}", io.uefi_error.status()),
            e => alloc::format!("{p}: {e}"),
        })
}
