//! Guest images built from Debian's own packages: a distribution kernel and an initramfs
//! holding herd-guest, so nothing is downloaded from outside the Debian mirror.
//!
//! An image is a kernel and an initramfs, nothing else: the cloud kernel
//! (`linux-image-*-cloud-amd64`, fetched with `apt-get download`), the few virtio modules
//! a microvm guest needs, busybox-static for the user's shell, and herd-guest as `/init`.
//! No disk image and no root filesystem keeps a build to seconds and a boot under TCG to
//! about a second. Images live in `<data_dir>/images/<name>/{vmlinuz,initrd,image.json}`;
//! the kernel package is cached in `<data_dir>/cache/` so a rebuild does not download it
//! again, and an image whose inputs are unchanged is not rebuilt at all.

pub mod cpio;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel modules a guest loads, by name; their dependencies are added at build time.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
];

/// The Debian meta-package whose dependency names the current cloud kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

const BUSYBOX: &str = "/bin/busybox";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what} failed: {detail}")]
    Tool { what: String, detail: String },
    #[error("{0} is not installed: run `apt-get install -y {0}`")]
    MissingPackage(&'static str),
    #[error("the kernel package has no {0}")]
    KernelContent(String),
    #[error("herd-guest binary {0} does not exist")]
    MissingGuest(PathBuf),
    #[error("{0} is dynamically linked; the guest needs a static herd-guest (build it with `herd image build` from the source tree)")]
    DynamicGuest(PathBuf),
    #[error("invalid image name {0:?}: use letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("I/O error while {context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt image metadata {path}")]
    Metadata {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// What an image holds; stored as `image.json` next to its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub kernel_package: String,
    pub kernel_version: String,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    /// Modules in the order the guest loads them.
    pub modules: Vec<String>,
    /// SHA-256 of the herd-guest binary inside; a different binary rebuilds the image.
    pub guest_sha256: String,
    pub guest_bytes: u64,
    pub initrd_bytes: u64,
}

pub fn images_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("images")
}

pub fn image_dir(data_dir: &Path, name: &str) -> PathBuf {
    images_dir(data_dir).join(name)
}

fn check_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadName(name.into()))
    }
}

fn run(what: &str, cmd: &mut Command) -> Result<String, ImageError> {
    let out = cmd.output().map_err(|e| ImageError::Tool {
        what: what.into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            what: what.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads an image's metadata, if it is complete.
pub fn load_image(data_dir: &Path, name: &str) -> Result<Option<ImageInfo>, ImageError> {
    let dir = image_dir(data_dir, name);
    let path = dir.join("image.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
    };
    let info: ImageInfo =
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Metadata {
            path: path.clone(),
            source,
        })?;
    if info.vmlinuz.exists() && info.initrd.exists() {
        Ok(Some(info))
    } else {
        Ok(None)
    }
}

/// An image's content as a container's root filesystem: its initramfs unpacked into
/// `<image dir>/rootfs-<guest hash>/`, without the kernel modules and device nodes a
/// container has no use for (the runtime makes its own /dev). Made once per herd-guest
/// build and shared read-only by every container of the image, as the lower layer of
/// each one's overlay; a rebuilt image gets a new directory, so running containers keep
/// the one they started on.
pub fn container_rootfs(image_dir: &Path) -> Result<PathBuf, ImageError> {
    let meta = image_dir.join("image.json");
    let bytes = std::fs::read(&meta).map_err(io_err(format!("reading {}", meta.display())))?;
    let info: ImageInfo =
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Metadata {
            path: meta.clone(),
            source,
        })?;
    let hash: String = info.guest_sha256.chars().take(16).collect();
    let rootfs = image_dir.join(format!("rootfs-{hash}"));
    if rootfs.join("init").exists() {
        return Ok(rootfs);
    }
    let initrd = image_dir.join("initrd");
    let archive =
        std::fs::read(&initrd).map_err(io_err(format!("reading {}", initrd.display())))?;
    let entries = cpio::read(&archive).map_err(|e| ImageError::Tool {
        what: format!("unpacking {}", initrd.display()),
        detail: e.to_string(),
    })?;
    // A name of its own per unpacking: two containers of one agent may start at once,
    // and neither may remove what the other is writing.
    static UNPACKING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = UNPACKING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = image_dir.join(format!("rootfs-{hash}.tmp-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let unpack = |context: &str| io_err(format!("{context} in {}", tmp.display()));
    std::fs::create_dir_all(&tmp).map_err(unpack("creating the root"))?;
    for entry in entries {
        if entry.name.starts_with("lib/modules/") && entry.name.ends_with(".ko") {
            continue;
        }
        let path = tmp.join(entry.name);
        if entry.is_dir() {
            std::fs::create_dir_all(&path).map_err(unpack(entry.name))?;
        } else if entry.is_file() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&path, entry.data).map_err(unpack(entry.name))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(entry.permissions()))
                .map_err(unpack(entry.name))?;
        } else if entry.is_symlink() {
            let target = String::from_utf8_lossy(entry.data).into_owned();
            std::os::unix::fs::symlink(target, &path).map_err(unpack(entry.name))?;
        }
    }
    match std::fs::rename(&tmp, &rootfs) {
        Ok(()) => Ok(rootfs),
        // Another process unpacked it first.
        Err(_) if rootfs.join("init").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(rootfs)
        }
        Err(e) => Err(io_err("installing the root filesystem")(e)),
    }
}

/// Every complete image in the data dir, by name.
pub fn list_images(data_dir: &Path) -> Result<Vec<ImageInfo>, ImageError> {
    let dir = images_dir(data_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("listing {}", dir.display()))(e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(info) = load_image(data_dir, &name)? {
            out.push(info);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Builds (or returns the cached) image `name` with `guest_binary` as its `/init`.
pub fn build_image(
    data_dir: &Path,
    name: &str,
    guest_binary: &Path,
    mut progress: impl FnMut(&str),
) -> Result<ImageInfo, ImageError> {
    check_name(name)?;
    // Builds in other processes (test runners, agents starting together) share the
    // cache and image dirs: one at a time.
    std::fs::create_dir_all(data_dir).map_err(io_err("creating the data dir"))?;
    let lock = std::fs::File::create(data_dir.join(".image-build.lock"))
        .map_err(io_err("creating the image build lock"))?;
    lock.lock().map_err(io_err("locking the image build"))?;
    let guest = std::fs::read(guest_binary)
        .map_err(|_| ImageError::MissingGuest(guest_binary.to_path_buf()))?;
    if !is_static_elf(&guest) {
        return Err(ImageError::DynamicGuest(guest_binary.to_path_buf()));
    }
    let guest_sha256 = hex::encode(Sha256::digest(&guest));
    if let Some(info) = load_image(data_dir, name)? {
        if info.guest_sha256 == guest_sha256 {
            progress("image is up to date");
            return Ok(info);
        }
        progress("herd-guest changed; rebuilding the initramfs");
    }
    check_busybox()?;

    let cache = data_dir.join("cache");
    std::fs::create_dir_all(&cache).map_err(io_err("creating the cache dir"))?;
    let package = kernel_package()?;
    let deb = fetch_deb(&cache, &package, &mut progress)?;

    progress("unpacking the kernel package");
    let unpack = cache.join(format!("{package}.unpacked"));
    if unpack.exists() {
        std::fs::remove_dir_all(&unpack).map_err(io_err("clearing an old unpack dir"))?;
    }
    run(
        "dpkg-deb -x",
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpack),
    )?;
    let result = assemble(
        data_dir,
        name,
        &package,
        &unpack,
        &guest,
        guest_sha256,
        &mut progress,
    );
    let _ = std::fs::remove_dir_all(&unpack);
    result
}

fn check_busybox() -> Result<(), ImageError> {
    let status = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "busybox-static"])
        .output();
    match status {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("install ok installed") => Ok(()),
        _ => Err(ImageError::MissingPackage("busybox-static")),
    }
}

/// The concrete kernel package the cloud meta-package currently points at.
fn kernel_package() -> Result<String, ImageError> {
    let out = run(
        "apt-cache depends (run apt-get update if this fails)",
        Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]),
    )?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(str::to_string)
        .ok_or_else(|| ImageError::Tool {
            what: format!("finding the kernel of {KERNEL_META_PACKAGE}"),
            detail: "no linux-image dependency: run apt-get update".into(),
        })
}

fn fetch_deb(
    cache: &Path,
    package: &str,
    progress: &mut impl FnMut(&str),
) -> Result<PathBuf, ImageError> {
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(cache)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let n = p.file_name().map(|n| n.to_string_lossy().into_owned());
                n.is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
    };
    if let Some(deb) = find() {
        progress(&format!("using cached {}", deb.display()));
        return Ok(deb);
    }
    progress(&format!("apt-get download {package}"));
    run(
        "apt-get download (run apt-get update first if the package is not found)",
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(cache),
    )?;
    find().ok_or_else(|| ImageError::Tool {
        what: "apt-get download".into(),
        detail: format!("no {package}_*.deb appeared in {}", cache.display()),
    })
}

/// Module file name to module name, as the kernel spells it.
fn module_name(file_name: &str) -> Option<(String, &'static str)> {
    for ext in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] {
        if let Some(stem) = file_name.strip_suffix(ext) {
            let kind = match ext {
                ".ko.xz" => "xz",
                ".ko.zst" => "zstd",
                ".ko.gz" => "gzip",
                _ => "",
            };
            return Some((stem.replace('-', "_"), kind));
        }
    }
    None
}

/// The `depends=` entry of a module's .modinfo section.
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    let needle = b"depends=";
    for (i, w) in ko.windows(needle.len()).enumerate() {
        // .modinfo entries are NUL-separated, so a real key starts after a NUL.
        if w == needle && (i == 0 || ko[i - 1] == 0) {
            let rest = &ko[i + needle.len()..];
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            return String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect();
        }
    }
    Vec::new()
}

fn read_module(path: &Path, compression: &str) -> Result<Vec<u8>, ImageError> {
    if compression.is_empty() {
        return std::fs::read(path).map_err(io_err(format!("reading {}", path.display())));
    }
    let out = Command::new(compression)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|_| ImageError::Tool {
            what: format!("decompressing {}", path.display()),
            detail: format!("{compression} is not installed"),
        })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            what: format!("decompressing {}", path.display()),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out.stdout)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
}

/// Picks `wanted` and their dependencies from a module tree; returns them in load order.
fn collect_modules(tree: &Path, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let mut files = Vec::new();
    walk(tree, &mut files);
    let mut by_name: BTreeMap<String, (PathBuf, &'static str)> = BTreeMap::new();
    for f in files {
        let file_name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some((name, kind)) = file_name.as_deref().and_then(module_name) {
            by_name.insert(name, (f, kind));
        }
    }
    let mut ordered = Vec::new();
    let mut done = BTreeSet::new();
    // Depth-first: dependencies before dependents. Built-in modules are not in the tree and
    // need nothing, so a wanted module missing from the tree is only an error at top level.
    fn visit(
        name: &str,
        top: bool,
        by_name: &BTreeMap<String, (PathBuf, &'static str)>,
        done: &mut BTreeSet<String>,
        ordered: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> Result<(), ImageError> {
        if done.contains(name) || depth > 32 {
            return Ok(());
        }
        done.insert(name.to_string());
        let Some((path, kind)) = by_name.get(name) else {
            return if top {
                Err(ImageError::KernelContent(format!("module {name}")))
            } else {
                Ok(())
            };
        };
        let bytes = read_module(path, kind)?;
        for dep in module_depends(&bytes) {
            visit(&dep, false, by_name, done, ordered, depth + 1)?;
        }
        ordered.push((name.to_string(), bytes));
        Ok(())
    }
    for name in wanted {
        visit(name, true, &by_name, &mut done, &mut ordered, 0)?;
    }
    Ok(ordered)
}

fn assemble(
    data_dir: &Path,
    name: &str,
    package: &str,
    unpack: &Path,
    guest: &[u8],
    guest_sha256: String,
    progress: &mut impl FnMut(&str),
) -> Result<ImageInfo, ImageError> {
    let boot = unpack.join("boot");
    let vmlinuz_src = std::fs::read_dir(&boot)
        .map_err(|_| ImageError::KernelContent("boot/ directory".into()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| ImageError::KernelContent("boot/vmlinuz-*".into()))?;
    let kernel_version = vmlinuz_src
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    let tree = unpack.join("lib/modules").join(&kernel_version);
    progress("collecting virtio modules");
    let modules = collect_modules(&tree, GUEST_MODULES)?;

    progress("writing the initramfs");
    let busybox =
        std::fs::read(BUSYBOX).map_err(|_| ImageError::MissingPackage("busybox-static"))?;
    let applets = run("busybox --list", Command::new(BUSYBOX).arg("--list"))?;
    let dir = image_dir(data_dir, name);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let initrd_path = dir.join("initrd");
    let tmp = dir.join("initrd.tmp");
    let file = std::fs::File::create(&tmp).map_err(io_err("creating the initramfs"))?;
    let mut w = cpio::CpioWriter::new(std::io::BufWriter::new(file));
    let write = |r: std::io::Result<()>| r.map_err(io_err("writing the initramfs"));
    for d in [
        "/bin",
        "/sbin",
        "/dev",
        "/proc",
        "/sys",
        "/tmp",
        "/run",
        "/etc",
        "/root",
        "/lib",
        "/lib/modules",
        "/usr",
        "/usr/bin",
        "/usr/sbin",
        "/var",
    ] {
        write(w.dir(d))?;
    }
    write(w.char_device("/dev/console", 0o600, 5, 1))?;
    write(w.char_device("/dev/null", 0o666, 1, 3))?;
    write(w.file("/init", 0o755, guest))?;
    // The workload runs it by name too (`herd-guest burst ...`).
    write(w.symlink("/bin/herd-guest", "/init"))?;
    write(w.file("/bin/busybox", 0o755, &busybox))?;
    for applet in applets.lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        write(w.symlink(&format!("/bin/{applet}"), "busybox"))?;
    }
    let mut order = String::new();
    for (module, bytes) in &modules {
        write(w.file(&format!("/lib/modules/{module}.ko"), 0o644, bytes))?;
        order.push_str(module);
        order.push('\n');
    }
    write(w.file("/lib/modules/load-order", 0o644, order.as_bytes()))?;
    write(w.file("/etc/hostname", 0o644, b"herd\n"))?;
    w.finish().map_err(io_err("finishing the initramfs"))?;
    std::fs::rename(&tmp, &initrd_path).map_err(io_err("installing the initramfs"))?;
    let vmlinuz = dir.join("vmlinuz");
    std::fs::copy(&vmlinuz_src, &vmlinuz).map_err(io_err("copying the kernel"))?;

    let info = ImageInfo {
        name: name.into(),
        kernel_package: package.into(),
        kernel_version,
        vmlinuz,
        initrd: initrd_path.clone(),
        modules: modules.iter().map(|(n, _)| n.clone()).collect(),
        guest_sha256,
        guest_bytes: guest.len() as u64,
        initrd_bytes: std::fs::metadata(&initrd_path)
            .map(|m| m.len())
            .unwrap_or(0),
    };
    let json = serde_json::to_vec_pretty(&info).map_err(|source| ImageError::Metadata {
        path: dir.join("image.json"),
        source,
    })?;
    let meta_tmp = dir.join("image.json.tmp");
    std::fs::write(&meta_tmp, json).map_err(io_err("writing image.json"))?;
    std::fs::rename(&meta_tmp, dir.join("image.json")).map_err(io_err("installing image.json"))?;
    progress(&format!(
        "image {name}: kernel {}, initrd {} KiB, modules {}",
        info.kernel_version,
        info.initrd_bytes / 1024,
        info.modules.join(",")
    ));
    Ok(info)
}

/// Whether `bytes` are an x86-64 ELF executable without a program interpreter, i.e. one
/// that runs as the guest's /init with no dynamic loader in the initramfs.
pub fn is_static_elf(bytes: &[u8]) -> bool {
    let read = |at: usize, len: usize| bytes.get(at..at + len);
    let u16_at = |at| read(at, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at| read(at, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |at| {
        read(at, 8).map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    };
    // 64-bit little-endian ELF.
    if read(0, 6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..usize::from(phnum)).all(|idx| {
        let at = (phoff as usize).saturating_add(idx * usize::from(phentsize));
        u32_at(at).is_some_and(|p_type| p_type != PT_INTERP)
    })
}

/// The root of the workspace being built or tested. It is read at run time, from the
/// `CARGO_MANIFEST_DIR` that cargo and nextest set for tests and `cargo run`, because a
/// compile-time `env!` goes stale when a kept target dir (CI's) serves another checkout:
/// cargo reuses the artifact and the baked path points at a tree that is gone.
/// `compiled_manifest_dir` (the caller's `env!("CARGO_MANIFEST_DIR")`) is the fallback.
pub fn workspace_root(compiled_manifest_dir: &str) -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(compiled_manifest_dir));
    start
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").exists())
        .map(Path::to_path_buf)
        .unwrap_or(start)
}

/// Where the static herd-guest binary is built: `guest/` under `CARGO_TARGET_DIR` if set
/// (so CI's kept target dir caches it), else `target/guest` in the workspace.
pub fn guest_target_dir(workspace_root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root.join(PathBuf::from(dir)).join("guest"),
        _ => workspace_root.join("target").join("guest"),
    }
}

/// Returns the static herd-guest binary, building it first with cargo if it is missing or
/// `rebuild` is set. The build uses its own target dir because its RUSTFLAGS (static C
/// runtime) and size-oriented profile would otherwise invalidate the shared build cache.
pub fn guest_binary(workspace_root: &Path, rebuild: bool) -> Result<PathBuf, ImageError> {
    let target_dir = guest_target_dir(workspace_root);
    let bin = target_dir.join("x86_64-unknown-linux-gnu/release/herd-guest");
    if bin.exists() && !rebuild {
        return Ok(bin);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(
        "building herd-guest",
        Command::new(cargo)
            .current_dir(workspace_root)
            .args([
                "build",
                "--release",
                "-p",
                "herd-guest",
                "--target",
                "x86_64-unknown-linux-gnu",
                "--target-dir",
            ])
            .arg(&target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s")
            .env("CARGO_PROFILE_RELEASE_LTO", "true")
            .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
            .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
            .env("CARGO_PROFILE_RELEASE_STRIP", "true")
            .env("CARGO_PROFILE_RELEASE_DEBUG", "false"),
    )?;
    if bin.exists() {
        Ok(bin)
    } else {
        Err(ImageError::MissingGuest(bin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_elf_check() {
        let own = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        // Test binaries are dynamically linked.
        assert!(!is_static_elf(&own));
        assert!(!is_static_elf(b"not an elf"));
    }

    #[test]
    fn module_metadata() {
        assert_eq!(
            module_name("virtio-rng.ko.xz"),
            Some(("virtio_rng".into(), "xz"))
        );
        assert_eq!(module_name("a.ko"), Some(("a".into(), "")));
        assert_eq!(module_name("a.txt"), None);
        let ko = b"\x7fELF junk\0license=GPL\0depends=virtio_ring,virtio,net-failover\0name=x\0";
        assert_eq!(
            module_depends(ko),
            vec!["virtio_ring", "virtio", "net_failover"]
        );
        assert!(module_depends(b"nodepends=a").is_empty());
    }

    #[test]
    fn collects_dependencies_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, deps: &str| {
            std::fs::write(dir.path().join(name), format!("\0depends={deps}\0")).expect("write")
        };
        write("a.ko", "b,c");
        write("b.ko", "c");
        write("c.ko", "");
        let got: Vec<String> = collect_modules(dir.path(), &["a", "c"])
            .expect("collect")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(got, vec!["c", "b", "a"]);
        assert!(collect_modules(dir.path(), &["zzz"]).is_err());
    }

    /// Containers of one agent starting at once unpack the same image side by side:
    /// each gets the whole root, none fails for another's work.
    #[test]
    fn a_root_unpacked_by_many_at_once_is_whole_for_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = cpio::CpioWriter::new(Vec::new());
        w.dir("/bin").expect("dir");
        w.file("/init", 0o755, b"guest").expect("init");
        for i in 0..200 {
            w.file(&format!("/bin/f{i}"), 0o644, &[7u8; 4096])
                .expect("file");
        }
        w.symlink("/bin/herd-guest", "/init").expect("link");
        std::fs::write(dir.path().join("initrd"), w.finish().expect("finish")).expect("initrd");
        let info = ImageInfo {
            name: "t".into(),
            kernel_package: String::new(),
            kernel_version: String::new(),
            vmlinuz: PathBuf::new(),
            initrd: dir.path().join("initrd"),
            modules: Vec::new(),
            guest_sha256: "ab".repeat(32),
            guest_bytes: 5,
            initrd_bytes: 0,
        };
        let meta = serde_json::to_vec(&info).expect("json");
        std::fs::write(dir.path().join("image.json"), meta).expect("meta");
        let roots: Vec<PathBuf> = std::thread::scope(|scope| {
            let unpacking: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| container_rootfs(dir.path())))
                .collect();
            unpacking
                .into_iter()
                .map(|h| h.join().expect("thread").expect("unpacked"))
                .collect()
        });
        assert!(roots.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(
            std::fs::read_dir(roots[0].join("bin"))
                .expect("bin")
                .count(),
            201
        );
        let leftovers = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn names_are_checked_and_missing_guest_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            build_image(dir.path(), "../x", Path::new("/nope"), |_| {}),
            Err(ImageError::BadName(_))
        ));
        assert!(matches!(
            build_image(dir.path(), "ok", Path::new("/nope"), |_| {}),
            Err(ImageError::MissingGuest(_))
        ));
        assert!(list_images(dir.path()).expect("list").is_empty());
    }
}
