//! Where a driver finds the guest images herd-image builds: `<images_dir>/<name>/`,
//! each with the files the driver boots from (a kernel and initrd for QEMU, the initrd
//! alone for a container).

use crate::driver::DriverError;
use std::path::{Path, PathBuf};

/// The directory of image `name`, if it holds every one of `files`. The name is one
/// path component: never empty, never hidden, never a way out of `images_dir`.
pub(crate) fn find(images_dir: &Path, name: &str, files: &[&str]) -> Result<PathBuf, DriverError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(DriverError::Invalid(format!("invalid image name {name:?}")));
    }
    let dir = images_dir.join(name);
    if files.iter().all(|file| dir.join(file).exists()) {
        Ok(dir)
    } else {
        Err(DriverError::Invalid(format!(
            "image {name:?} not found in {} (build it with herd-image)",
            images_dir.display()
        )))
    }
}

/// The names of the images in `images_dir`, for a driver's probe; an error if there is
/// none, which says where they were looked for.
pub(crate) fn available(images_dir: &Path, kind: &'static str) -> Result<Vec<String>, DriverError> {
    let names: Vec<String> = std::fs::read_dir(images_dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join("initrd").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        return Err(DriverError::Unavailable {
            kind,
            reason: format!(
                "no guest image in {} (build one with herd-image)",
                images_dir.display()
            ),
        });
    }
    Ok(names)
}
