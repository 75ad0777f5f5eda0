# Shared helpers for scripts/up and scripts/test. Sourced, not run.

# Installs Debian packages that are missing; runs apt-get update at most once.
need_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "herd needs these Debian packages: ${missing[*]} (run as root, or install them)" >&2
        return 1
    fi
    echo "installing ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    # apt may resolve a conflict by removing a package it was asked for (an older
    # qemu-utils from backports against qemu-system-x86): ask again for what is gone.
    local still=()
    for pkg in "${missing[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || still+=("$pkg")
    done
    [ ${#still[@]} -eq 0 ] && return 0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${still[@]}" >&2
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
