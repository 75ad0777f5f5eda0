//! Guest images on this machine: finding the herd-guest binary, building images on
//! first use, and `herd image ...`.

use crate::table::Table;
use crate::Output;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where an installed herd keeps the static guest module.
const INSTALLED_GUEST: &str = "/usr/local/lib/herd/herd-guest";

/// The static herd-guest binary to put into images: `HERD_GUEST_BINARY`, next to this
/// executable, the installed copy, or, when run from a source tree, built from it.
pub fn guest_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("HERD_GUEST_BINARY") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let exe_dir = exe.parent().unwrap_or(Path::new("/"));
    // Run from a herd source tree (the executable in the tree's target dir, or the
    // working directory inside the tree when the target dir is elsewhere): build it
    // from there, so a development herd never uses an older installed guest.
    let cwd = std::env::current_dir().unwrap_or_default();
    let in_tree = |dir: &&Path| dir.join("crates/herd-guest/Cargo.toml").is_file();
    if let Some(root) = exe
        .ancestors()
        .find(in_tree)
        .or_else(|| cwd.ancestors().find(in_tree))
    {
        eprintln!("building herd-guest from {}...", root.display());
        return herd_image::guest_binary(root, true).context("building herd-guest");
    }
    for candidate in [
        exe_dir.join("herd-guest"),
        exe_dir.join("../lib/herd/herd-guest"),
        PathBuf::from(INSTALLED_GUEST),
    ] {
        // Only a static binary can be a guest's /init.
        let is_static =
            std::fs::read(&candidate).is_ok_and(|bytes| herd_image::is_static_elf(&bytes));
        if is_static {
            return Ok(candidate);
        }
    }
    bail!(
        "herd-guest is not installed (looked next to {} and in {INSTALLED_GUEST}); run scripts/up from the herd source tree",
        exe.display()
    )
}

/// Builds image `name` under `data_dir` if it is missing or holds another herd-guest
/// than this herd's, showing progress. An up-to-date image costs one hash.
pub fn ensure_image(data_dir: &Path, name: &str) -> Result<()> {
    if herd_image::load_image(data_dir, name)?.is_none() {
        eprintln!("building guest image {name:?} (first use; this downloads the cloud kernel)...");
    }
    build(data_dir, name)
}

fn build(data_dir: &Path, name: &str) -> Result<()> {
    let guest = guest_binary()?;
    let started = std::time::Instant::now();
    // On a terminal the steps turn a spinner; piped, each is a line of the log.
    let on_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = crate::progress::spinner(&format!("image {name}"), "checking".into());
    let built = herd_image::build_image(data_dir, name, &guest, |step| {
        if on_terminal {
            bar.set_message(step.to_owned());
        } else {
            eprintln!("  image: {step}");
        }
    });
    bar.finish_and_clear();
    let info = built.with_context(|| format!("building image {name:?}"))?;
    eprintln!(
        "image {name:?} ready in {:.1} s: kernel {}, initrd {} KiB",
        started.elapsed().as_secs_f64(),
        info.kernel_version,
        info.initrd_bytes / 1024
    );
    Ok(())
}

pub fn build_command(data_dir: &Path, name: &str) -> Result<()> {
    build(data_dir, name)
}

pub fn list_command(data_dir: &Path, output: Output) -> Result<()> {
    let images = herd_image::list_images(data_dir)?;
    match output {
        Output::Json => {
            let list: Vec<_> = images
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "name": i.name,
                        "kernel_version": i.kernel_version,
                        "kernel_package": i.kernel_package,
                        "initrd_bytes": i.initrd_bytes,
                        "guest_bytes": i.guest_bytes,
                        "guest_sha256": i.guest_sha256,
                        "modules": i.modules,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
        Output::Table => {
            let mut table = Table::new(vec!["NAME", "KERNEL", "INITRD", "HERD-GUEST"]);
            for image in &images {
                table.row(vec![
                    image.name.clone(),
                    image.kernel_version.clone(),
                    format!("{} KiB", image.initrd_bytes / 1024),
                    format!("{} KiB", image.guest_bytes / 1024),
                ]);
            }
            print!("{}", table.render());
            if images.is_empty() {
                eprintln!(
                    "no images in {}; build one with `herd image build`",
                    data_dir.display()
                );
            }
        }
    }
    Ok(())
}
