# Shared helpers for scripts/up and scripts/test. Sourced, not run.

# The packages named that are not installed, one per line.
not_installed() {
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

# Installs Debian packages that are missing; runs apt-get update at most once.
need_packages() {
    local missing
    mapfile -t missing < <(not_installed "$@")
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "herd needs these Debian packages: ${missing[*]} (run as root, or install them)" >&2
        return 1
    fi
    echo "installing ${missing[*]}" >&2
    apt-get update -qq >&2
    # Installing the missing packages may remove one that was installed (qemu-system-x86
    # from bookworm removes a qemu-utils from backports), and asking for both at once
    # fails outright, as their versions conflict. So install the missing ones, then
    # whatever that removed, which apt now takes from the same release.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    local removed
    mapfile -t removed < <(not_installed "$@")
    if [ ${#removed[@]} -ne 0 ]; then
        echo "installing ${removed[*]} again" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${removed[@]}" >&2
    fi
    local gone
    mapfile -t gone < <(not_installed "$@")
    if [ ${#gone[@]} -ne 0 ]; then
        echo "apt-get left these packages uninstalled: ${gone[*]}" >&2
        return 1
    fi
}

need_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "herd is built with Rust: install it with rustup (https://rustup.rs), then run this again" >&2
        return 1
    fi
}

# What real VMs and containers need: QEMU (and qemu-img for disks), runc (and CRIU, which it checkpoints with),
# busybox for the guest image, the tools that unpack kernel modules, and package lists
# that know the cloud kernel (apt-get download needs them).
need_vm_packages() {
    need_packages qemu-system-x86 qemu-utils runc criu busybox-static xz-utils zstd
    if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
        if [ "$(id -u)" -ne 0 ]; then
            echo "run apt-get update as root: the guest kernel package is not known yet" >&2
            return 1
        fi
        apt-get update -qq >&2
    fi
}
