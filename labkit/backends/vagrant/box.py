"""The VM box: a Debian libvirt box built here from Debian packages only (``labkit box build``).

One box per Debian release (:data:`RELEASES`): ``bookworm`` (Debian 12, kernel 6.1, the default) and
``trixie`` (Debian 13, kernel 6.12: netkit, BIG TCP for IPv4 too). A lab picks one with ``release:``
in its spec; ``labkit box build --release trixie`` builds the other.

No image is downloaded from anywhere but the Debian mirror the host's apt sources name:
``debootstrap --variant=minbase`` makes a root file system with Debian's kernel and the tools a lab
node runs (iproute2, kmod, iptables, nftables, ipvsadm, ipset, bpftool, iperf3, python3 + yaml,
openssh-server, sudo, and bcc: ``python3-bpfcc``, ``bpfcc-tools`` and ``linux-headers-amd64``, whose
version is checked to be the installed kernel's, so that the eBPF datapaths compile in the VM), the
``vagrant`` user gets Vagrant's insecure key and password-less sudo, and the tree becomes one ext4
file system on the whole disk (``/dev/vda``, no partition table, no boot loader) in a qcow2 image.
The VM boots Debian's kernel and initrd directly (libvirt ``<kernel>``/``<initrd>``), which is both
the fastest boot under QEMU TCG and the simplest image.

debootstrap runs in two stages so that the box is configured before dpkg installs anything: between
them labkit writes dpkg ``path-exclude`` rules (no documentation, man pages or translations; no
kernel modules for hardware a VM never has: GPUs, sound, media, wireless, InfiniBand, …) and an
initramfs configuration holding only what mounts the root file system (``MODULES=list``: virtio
and ext4), so the initrd is a few MiB instead of ~36 and is unpacked in a fraction of the time
under TCG. Neither Recommends nor Suggests are installed (debootstrap resolves Depends only).

Inside the box, the first NIC (Vagrant's management NIC, the one ``vagrant ssh`` uses) is renamed
``mgmt0`` by a udev rule and gets DHCP from systemd-networkd with no default route and no DNS, so the
names ``eth0`` / ``eni<k>`` and the routing table stay free for the lab (:mod:`labkit.remote.agent` renames
the VPC NICs by MAC address).

Cache (``$LABKIT_CACHE`` or ``~/.cache/labkit``)::

    boxes/<key>/recipe.json        the recipe; <key> = hash of the recipe (packages, release, script);
                                   also the kernel's version and features (:func:`kernel_features`)
    boxes/<key>/vmlinuz, initrd.img, config-<kernel>
    boxes/<key>/build.log          debootstrap's output; recipe.json also holds the time of each phase
    boxes/debs/                    debootstrap's .deb cache: a rebuild downloads nothing new
    vagrant.d/                     VAGRANT_HOME: the box as Vagrant knows it (labkit/debian<12|13>-<key>)

libvirt must read the kernel as its qemu user, so the kernel and initrd are also copied to
``/var/lib/libvirt/boot/labkit-<key>/``. vagrant-libvirt uploads the image once into libvirt's
``default`` pool as ``labkit-VAGRANTSLASH-debian<N>-<key>_vagrant_box_image_0_<stamp>_box.img``, the base of
every VM's copy-on-write disk; it belongs to the box, not to a lab, and ``labkit box rm`` removes it
with the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ... import nsexec
from ...errors import LabkitError, MissingFeature


@dataclass(frozen=True)
class Release:
    """A Debian release labkit builds boxes of. ``python``: its python3 (the payload ships bytecode
    for it when this host runs the same version)."""

    name: str
    version: int
    python: tuple[int, int]


RELEASES = {r.name: r for r in (Release("bookworm", 12, (3, 11)), Release("trixie", 13, (3, 13)))}
DEFAULT_RELEASE = "bookworm"
BOX_PREFIX = "labkit/debian"  # + the release's version: labkit/debian12-<key>, labkit/debian13-<key>
LIBVIRT_BOOT = Path("/var/lib/libvirt/boot")
LIBVIRT_IMAGES = Path("/var/lib/libvirt/images")  # libvirt's default pool, as vagrant-libvirt makes it
DISK_GB = 4
# i8042.noaux: no PS/2 mouse probe (~4 s of a TCG boot); tsc=reliable: TSC as clocksource (time reads
# without HPET MMIO exits under TCG); no5lvl: 4-level page tables (TCG walks them on every TLB miss)
CMDLINE = ("root=/dev/vda rootfstype=ext4 rw console=ttyS0 net.ifnames=0 mitigations=off quiet i8042.noaux "
           "tsc=reliable no5lvl")
SCRIPT_VERSION = 6  # bump when the rootfs configuration below changes: it is part of the cache key
# What a box's kernel has, read from its /boot/config-<version> ("y", "m" or "" for absent): the
# netkit pod mode needs netkit (6.7+: trixie's kernel, not bookworm's), BTF is
# /sys/kernel/btf/vmlinux. BIG TCP has no Kconfig symbol: it is in the core of every kernel since
# 5.19 for IPv6 and 6.3 for IPv4 (gso_ipv4_max_size), so the version says (``big_tcp``: the families).
KERNEL_CONFIG = {"netkit": "CONFIG_NETKIT", "ipvlan": "CONFIG_IPVLAN", "ip_vs": "CONFIG_IP_VS",
                 "btf": "CONFIG_DEBUG_INFO_BTF"}
BIG_TCP_SINCE = {"ipv4": (6, 3), "ipv6": (5, 19)}

PACKAGES = (
    "systemd-sysv", "udev", "dbus", "linux-image-amd64", "openssh-server", "sudo", "procps",
    "python3", "python3-yaml", "iproute2", "kmod", "iptables", "nftables", "ipvsadm", "ipset",
    "bpftool", "iperf3", "iputils-ping", "ethtool", "tcpdump", "conntrack",
)
# bcc for the eBPF datapaths; linux-headers-amd64 is the metapackage of the same suite as
# linux-image-amd64, so both name the same ABI (checked after install: _check_headers)
BCC_PACKAGES = ("python3-bpfcc", "bpfcc-tools", "linux-headers-amd64")
INSECURE_KEY_GLOB = "/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub"
_INSECURE_PUB = ("ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+niNltGEFHzD"
                 "8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9D8H"
                 "fdOV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJnAmCP3NOTd0jMZEn"
                 "DkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9c9W"
                 "hQ== vagrant insecure public key")


def cache_root() -> Path:
    root = os.environ.get("LABKIT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "labkit"


def vagrant_home() -> Path:
    """VAGRANT_HOME for everything labkit runs: its boxes stay out of the user's own ~/.vagrant.d."""
    return cache_root() / "vagrant.d"


def release_of(name: str) -> Release:
    """The :class:`Release` called ``name``; an unknown name is a :class:`LabkitError` listing them."""
    if name not in RELEASES:
        import difflib

        near = difflib.get_close_matches(name, RELEASES, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise LabkitError(f"unknown Debian release {name!r}{hint}; labkit builds boxes of {', '.join(RELEASES)}")
    return RELEASES[name]


@dataclass(frozen=True)
class BoxRecipe:
    """What goes into a box. Its hash names the box, so a changed recipe is a new box."""

    release: str = DEFAULT_RELEASE
    packages: tuple[str, ...] = PACKAGES
    with_bcc: bool = True  # False: a smaller box without the eBPF datapaths
    disk_gb: int = DISK_GB
    cmdline: str = CMDLINE
    script: int = SCRIPT_VERSION
    extra: tuple[str, ...] = field(default_factory=tuple)

    @property
    def all_packages(self) -> tuple[str, ...]:
        return self.packages + (BCC_PACKAGES if self.with_bcc else ()) + self.extra

    @property
    def key(self) -> str:
        recipe = asdict(self)
        # hashed under the field's first name, "suite": the bookworm box built before trixie keeps its key
        recipe["suite"] = recipe.pop("release")
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def box_name(self) -> str:
        return f"{BOX_PREFIX}{release_of(self.release).version}-{self.key}"

    @classmethod
    def from_json(cls, meta: dict) -> BoxRecipe:
        """The recipe a box's recipe.json holds (``suite``: the release, in boxes built before trixie)."""
        data = {k: v for k, v in meta.items() if k in cls.__dataclass_fields__}
        data.setdefault("release", meta.get("suite", DEFAULT_RELEASE))
        for k in ("packages", "extra"):
            if k in data:
                data[k] = tuple(data[k])
        return cls(**data)


@dataclass(frozen=True)
class Box:
    """A built box: where its pieces are."""

    recipe: BoxRecipe
    dir: Path

    @property
    def name(self) -> str:
        return self.recipe.box_name

    @property
    def kernel(self) -> Path:
        return LIBVIRT_BOOT / f"labkit-{self.recipe.key}" / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return LIBVIRT_BOOT / f"labkit-{self.recipe.key}" / "initrd.img"

    @property
    def vagrant_dir(self) -> Path:
        return vagrant_home() / "boxes" / self.name.replace("/", "-VAGRANTSLASH-")

    @property
    def libvirt_volume_prefix(self) -> str:
        """vagrant-libvirt names the uploaded image ``<box>_vagrant_box_image_<version>_<stamp>_box.img``."""
        return f"{self.name.replace('/', '-VAGRANTSLASH-')}_vagrant_box_image_"

    def ready(self) -> bool:
        return self.vagrant_dir.is_dir() and self.kernel.exists() and self.initrd.exists()

    def meta(self) -> dict:
        """recipe.json as the build wrote it ({} before a build)."""
        try:
            return json.loads((self.dir / "recipe.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def features(self) -> dict[str, str]:
        """The box's kernel features (:func:`kernel_features`), {} when unknown (not built). A box built
        before labkit recorded them gets them now, from its kernel's .deb in the package cache."""
        meta = self.meta()
        if "kernel_features" not in meta and meta.get("kernel_version"):
            config = _cached_kernel_config(meta["kernel_version"])
            if config is not None:
                meta["kernel_features"] = kernel_features(config, meta["kernel_version"])
                try:
                    (self.dir / f"config-{meta['kernel_version']}").write_text(config)
                    (self.dir / "recipe.json").write_text(json.dumps(meta, indent=1))
                except OSError:
                    pass  # another user's cache: read again next time
        return dict(meta.get("kernel_features", {}))

    def lacks(self, features) -> list[str]:
        """Which of ``features`` (names of :data:`KERNEL_CONFIG`; others are not the box's to say) the
        box's kernel does not have."""
        have = self.features()
        return [f for f in features if f in KERNEL_CONFIG and have and not have.get(f)]

    def info(self) -> dict:
        meta = self.meta()
        return {"name": self.name, "release": self.recipe.release, "key": self.recipe.key, "ready": self.ready(),
                "dir": str(self.dir), "kernel": meta.get("kernel_version", ""), "features": self.features(),
                "size_mb": meta.get("image_mb"), "built": meta.get("built"),
                "build_seconds": meta.get("build_seconds"), "with_bcc": self.recipe.with_bcc}


def box_for(recipe: BoxRecipe | None = None) -> Box:
    recipe = recipe or BoxRecipe()
    return Box(recipe, cache_root() / "boxes" / recipe.key)


def cached_boxes() -> list[Box]:
    """Every box with a folder in the cache (built, or a build that failed), by release then name."""
    out = []
    for meta_file in sorted((cache_root() / "boxes").glob("*/recipe.json")):
        try:
            recipe = BoxRecipe.from_json(json.loads(meta_file.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if recipe.release in RELEASES and recipe.key == meta_file.parent.name:
            out.append(box_for(recipe))
    order = list(RELEASES)
    return sorted(out, key=lambda b: (order.index(b.recipe.release), not b.recipe.with_bcc, b.name))


# ================================================================ kernel features

def kernel_features(config: str, kver: str) -> dict[str, str]:
    """``{feature: "y" | "m" | ""}`` for each of :data:`KERNEL_CONFIG` from a kernel's config text, and
    ``big_tcp``: the families with BIG TCP (``"ipv4,ipv6"``, ``"ipv6"`` or ``""``) from its version."""
    values = dict(re.findall(r"^(CONFIG_\w+)=([ym])\s*$", config, re.MULTILINE))
    out = {name: values.get(symbol, "") for name, symbol in KERNEL_CONFIG.items()}
    m = re.match(r"(\d+)\.(\d+)", kver)
    version = (int(m[1]), int(m[2])) if m else (0, 0)
    families = [f for f, since in sorted(BIG_TCP_SINCE.items()) if version >= since
                and values.get("CONFIG_IPV6" if f == "ipv6" else "CONFIG_INET")]
    out["big_tcp"] = ",".join(families)
    return out


def describe_features(features: dict[str, str]) -> str:
    """``netkit y, ipvlan m, ip_vs m, BTF y, BIG TCP ipv4+ipv6`` (``no netkit`` for one absent)."""
    if not features:
        return "features unknown"
    label = {"btf": "BTF", "big_tcp": "BIG TCP"}
    parts = []
    for name in (*KERNEL_CONFIG, "big_tcp"):
        value = features.get(name, "")
        parts.append(f"{label.get(name, name)} {value.replace(',', '+')}" if value else f"no {label.get(name, name)}")
    return ", ".join(parts)


def _cached_kernel_config(kver: str) -> str | None:
    """``/boot/config-<kver>`` from ``linux-image-<kver>``'s .deb in the package cache, if it is there."""
    for deb in sorted((cache_root() / "boxes" / "debs").glob(f"linux-image-{kver}_*.deb")):
        try:
            proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
        except OSError:
            return None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    if member.name.lstrip("./") in (f"boot/config-{kver}", f"usr/boot/config-{kver}"):
                        return tar.extractfile(member).read().decode()
        except tarfile.TarError:
            pass
        finally:
            proc.kill()
            proc.wait()
    return None


# ================================================================ environment

def vagrant_env() -> dict[str, str]:
    env = dict(os.environ)
    env["VAGRANT_HOME"] = str(vagrant_home())
    env["VAGRANT_DEFAULT_PROVIDER"] = env.get("VAGRANT_DEFAULT_PROVIDER", "libvirt")
    env["VAGRANT_CHECKPOINT_DISABLE"] = "1"  # no phoning home for version checks
    env["VAGRANT_BOX_UPDATE_CHECK_DISABLE"] = "1"
    env["VAGRANT_NO_COLOR"] = "1"
    env["LIBVIRT_DEFAULT_URI"] = "qemu:///system"
    return env


def debian_mirror(release: str = DEFAULT_RELEASE) -> str:
    """The Debian mirror the host's apt sources name (deb822 ``URIs:`` or a one-line ``deb`` entry): the
    one listing ``release``, else the one listing any Debian release (a Debian 12 host builds Debian
    13 boxes from its own mirror, which serves every release; :func:`check_release` asks it)."""
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    for wanted in dict.fromkeys((release, *RELEASES)):
        for path in candidates:
            try:
                text = path.read_text()
            except OSError:
                continue
            for stanza in re.split(r"\n\s*\n", text):
                if "Suites:" in stanza and re.search(rf"Suites:.*\b{wanted}\b", stanza) and "security" not in stanza:
                    m = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                    if m and "debian" in m.group(1):
                        return m.group(1)
            for line in text.splitlines():
                m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+" + wanted + r"\s", line.strip())
                if m and "security" not in m.group(1):
                    return m.group(1)
    raise LabkitError("no Debian mirror in /etc/apt/sources.list{,.d}: labkit builds its boxes from it")


def check_release(mirror: str, release: str, timeout: float = 15) -> None:
    """Fail fast, before debootstrap, when ``mirror`` does not serve ``release`` (its
    ``dists/<release>/InRelease``, or ``Release``, must be there)."""
    problems = []
    for name in ("InRelease", "Release"):
        url = f"{mirror.rstrip('/')}/dists/{release}/{name}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                return
        except urllib.error.HTTPError as exc:
            problems.append(f"{url}: HTTP {exc.code}")
        except (urllib.error.URLError, OSError) as exc:
            problems.append(f"{url}: {getattr(exc, 'reason', exc)}")
    raise LabkitError(f"the Debian mirror {mirror} does not serve {release} ({'; '.join(problems)}): no "
                      f"{release} box can be built from it")


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise MissingFeature(tool, "labkit box build", f"apt-get install {package}")
    return path


def insecure_public_key() -> str:
    import glob

    for path in sorted(glob.glob(INSECURE_KEY_GLOB)):
        return Path(path).read_text().strip()
    return _INSECURE_PUB


def insecure_private_key() -> str:
    """Vagrant's insecure private key (the box's ``vagrant`` user accepts its public half)."""
    import glob

    for path in sorted(glob.glob(INSECURE_KEY_GLOB[:-len(".pub")])) + [str(vagrant_home() / "insecure_private_key")]:
        try:
            return Path(path).read_text()
        except OSError:
            continue
    raise MissingFeature("vagrant", "the vagrant backend's ssh", "apt-get install vagrant (it ships the insecure key)")


# ================================================================ build

_NETWORK_UNIT = """[Match]
Name=mgmt0

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no

[DHCPv4]
UseDNS=no
UseRoutes=no
UseGateway=no
UseHostname=no
ClientIdentifier=mac
"""
# The management NIC is the first one (vagrant-libvirt and VirtualBox both put it first).
_UDEV_RULE = 'SUBSYSTEM=="net", ACTION=="add", KERNEL=="eth0", NAME="mgmt0"\n'
_SUDOERS = "vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n"
_SSHD = "UseDNS no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n"
# Units a lab VM does without; each costs CPU that the VMs' boots share under TCG. Without dbus and
# logind, ssh logins still work (no pam_systemd in the box) and networkd runs on its own.
_MASK = ("systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
         "e2scrub_reap.service", "fstrim.timer", "systemd-networkd-wait-online.service", "getty-static.service",
         "dbus.service", "dbus.socket", "systemd-logind.service", "getty@tty1.service", "systemd-pstore.service",
         "dpkg-db-backup.timer", "systemd-update-utmp.service", "systemd-update-utmp-runlevel.service",
         "ipvsadm.service", "dev-hugepages.mount", "dev-mqueue.mount", "sys-kernel-config.mount",
         "sys-fs-fuse-connections.mount", "proc-sys-fs-binfmt_misc.automount", "systemd-journal-flush.service",
         "systemd-random-seed.service", "systemd-network-generator.service", "modprobe@drm.service",
         "modprobe@efi_pstore.service", "modprobe@fuse.service", "modprobe@loop.service", "modprobe@dm_mod.service",
         "modprobe@configfs.service")
# Modules udev would load for the emulated PC's devices and CPU features (kvm alone takes ~9 s to load
# under TCG); blacklisted for autoloading only, an explicit modprobe still loads them.
_BLACKLIST = ("kvm", "kvm_amd", "kvm_intel", "ccp", "floppy", "ata_piix", "ata_generic", "pata_acpi", "libata",
              "uhci_hcd", "ehci_hcd", "ehci_pci", "ohci_pci", "xhci_pci", "usbcore", "psmouse", "serio_raw",
              "pcspkr", "joydev", "intel_rapl_msr", "intel_rapl_common", "i2c_piix4", "virtio_balloon",
              "qemu_fw_cfg", "aesni_intel", "sha1_ssse3", "sha256_ssse3", "sha512_ssse3", "ghash_clmulni_intel",
              "crc32_pclmul", "polyval_clmulni", "drm", "bochs")
# Written between debootstrap's stages, before dpkg unpacks anything: what a lab VM never uses is not
# installed at all (copyright files stay). Kernel modules of hardware a QEMU guest cannot have, in
# /lib/modules (bookworm's packages) and /usr/lib/modules (where trixie's may put them; bookworm's
# rootfs is the same with or without those lines, so its box's key stays).
_DPKG_EXCLUDES = """path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/groff/*
path-exclude=/usr/share/lintian/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
""" + "".join(f"path-exclude={top}/modules/*/kernel/{d}/*\n" for top in ("/lib", "/usr/lib") for d in (
    "drivers/gpu", "drivers/media", "drivers/net/wireless", "drivers/infiniband", "drivers/iio",
    "drivers/bluetooth", "drivers/staging", "drivers/isdn", "drivers/hwmon", "drivers/input/touchscreen",
    "sound", "net/wireless", "net/mac80211", "net/bluetooth"))
# The initrd only has to mount /dev/vda: virtio and ext4 (the kernel has them as modules)
_INITRAMFS_CONF = "MODULES=list\nRESUME=none\n"
_INITRAMFS_MODULES = "virtio_pci\nvirtio_blk\next4\n"


def build(recipe: BoxRecipe | None = None, force: bool = False, log=print) -> Box:
    """Build (or find cached) the box of ``recipe`` and register it with Vagrant. Idempotent."""
    box = box_for(recipe)
    if box.ready() and not force:
        log(f"box {box.name} is cached ({box.dir})")
        return box
    release = release_of(box.recipe.release)
    mirror = debian_mirror(release.name)
    check_release(mirror, release.name)
    if os.geteuid() != 0:
        raise LabkitError("labkit box build needs root (debootstrap, chroot)")
    debootstrap = _need("debootstrap", "debootstrap")
    _need("qemu-img", "qemu-utils")
    _need("mkfs.ext4", "e2fsprogs")
    vagrant = _need("vagrant", "vagrant vagrant-libvirt")
    t0 = time.monotonic()
    box.dir.mkdir(parents=True, exist_ok=True)
    debs = cache_root() / "boxes" / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    logf = box.dir / "build.log"
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=box.dir))
    fast = _tmpfs_dir()
    try:
        rootfs = (fast or work) / "rootfs"
        phases: dict[str, float] = {}
        mark = _phase_clock(phases)
        log(f"debootstrap {release.name} (Debian {release.version}) from {mirror} "
            f"({len(box.recipe.all_packages)} packages) …")
        with open(logf, "w") as out:
            subprocess.run([debootstrap, "--foreign", "--variant=minbase", f"--cache-dir={debs}",
                            "--include=" + ",".join(box.recipe.all_packages), release.name, str(rootfs), mirror],
                           stdout=out, stderr=subprocess.STDOUT, check=True, stdin=subprocess.DEVNULL)
            mark("download")
            _preinstall(rootfs)
            subprocess.run(["chroot", str(rootfs), "/debootstrap/debootstrap", "--second-stage"],
                           stdout=out, stderr=subprocess.STDOUT, check=True, stdin=subprocess.DEVNULL)
            mark("install")
        log(f"  rootfs done in {time.monotonic() - t0:.0f} s; configuring")
        kver = _configure(rootfs)
        if box.recipe.with_bcc:
            _check_headers(rootfs, kver)
        boot = box.kernel.parent
        boot.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(rootfs / "boot" / f"vmlinuz-{kver}", box.dir / "vmlinuz")
        shutil.copyfile(rootfs / "boot" / f"initrd.img-{kver}", box.dir / "initrd.img")
        config, features = rootfs / "boot" / f"config-{kver}", {}
        if config.exists():
            features = kernel_features(config.read_text(), kver)
            shutil.copyfile(config, box.dir / config.name)
        log(f"  kernel {kver}: {describe_features(features)}")
        mark("configure")
        img = (fast or work) / "box.img"
        _make_image(rootfs, img, box.recipe.disk_gb, fast or work, logf, mark)
        image_mb = img.stat().st_size // 2**20
        log(f"  image {image_mb} MiB at {time.monotonic() - t0:.0f} s; adding to Vagrant as {box.name}")
        boxfile = (fast or work) / "labkit.box"
        _pack(boxfile, img, box)
        img.unlink()
        mark("pack")
        env = vagrant_env()
        subprocess.run([vagrant, "box", "add", "--force", "--name", box.name, str(boxfile)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        mark("vagrant_box_add")
        for name in ("vmlinuz", "initrd.img"):
            shutil.copyfile(box.dir / name, boot / name)
        (box.dir / "recipe.json").write_text(json.dumps(
            {**asdict(box.recipe), "name": box.name, "kernel_version": kver, "kernel_features": features,
             "image_mb": image_mb, "mirror": mirror,
             "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_seconds": round(time.monotonic() - t0, 1),
             "phases_s": phases},
            indent=1))
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip()[-800:] if isinstance(exc.stderr, str) else ""
        raise LabkitError(f"box build failed: {' '.join(map(str, exc.cmd[:3]))} … exited {exc.returncode}; "
                          f"{detail or f'see {logf}'}") from None
    finally:
        _safe_rmtree(work)
        if fast:
            _safe_rmtree(fast)
    log(f"box {box.name} ready in {time.monotonic() - t0:.0f} s")
    return box


def _phase_clock(phases: dict[str, float]):
    """``mark(name)`` records the seconds since the previous mark under ``name``."""
    last = [time.monotonic()]

    def mark(name: str) -> None:
        now = time.monotonic()
        phases[name] = round(now - last[0], 1)
        last[0] = now

    return mark


def _preinstall(root: Path) -> None:
    """Between debootstrap's stages: dpkg's excludes and the initramfs configuration (see the module
    docstring), in place before the second stage installs the packages they apply to."""
    (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/dpkg/dpkg.cfg.d/01-labkit-excludes").write_text(_DPKG_EXCLUDES)
    (root / "etc/initramfs-tools/conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/initramfs-tools/conf.d/labkit.conf").write_text(_INITRAMFS_CONF)
    (root / "usr/share/initramfs-tools/modules.d").mkdir(parents=True, exist_ok=True)
    (root / "usr/share/initramfs-tools/modules.d/labkit").write_text(_INITRAMFS_MODULES)


def _check_headers(root: Path, kver: str) -> None:
    """bcc compiles against /lib/modules/<running kernel>/build: the headers must be the kernel's."""
    build = root / "lib/modules" / kver / "build"
    target = os.readlink(build) if build.is_symlink() else ""
    if target.startswith("/"):  # bookworm: /usr/src/linux-headers-<kver>, inside the box's root
        inside = root / target.lstrip("/")
    else:  # trixie: ../../../src/linux-headers-<kver>, from /usr/lib/modules/<kver>
        inside = Path(os.path.realpath(build))
    if not (inside / "include").is_dir():
        have = sorted(p.name for p in (root / "usr/src").glob("linux-headers-*"))
        raise LabkitError(f"the box's kernel {kver} has no matching headers (/lib/modules/{kver}/build -> "
                          f"{target or 'missing'}; installed: {', '.join(have) or 'none'}): the mirror's "
                          "linux-headers-amd64 and linux-image-amd64 differ; retry when the mirror is consistent, "
                          "or build without bcc (labkit box build --no-bcc)")


def _tmpfs_dir(need_gb: float = 5.0) -> Path | None:
    """A scratch folder in /dev/shm when it has room: dpkg fsyncs every file it unpacks, which on a
    busy disk is most of debootstrap's time; in RAM it costs nothing. It holds the tree, the raw
    ext4 image, the qcow2 and the .box (each ~1 GB, not all at once)."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize < need_gb * 2**30:
        return None
    with open("/proc/self/mounts") as f:
        opts = [ln.split()[3] for ln in f if ln.split()[1:2] == [str(shm)]]
    if not opts or any(bad in opts[-1].split(",") for bad in ("noexec", "nodev")):
        return None  # the chroot must exec and open device nodes
    return Path(tempfile.mkdtemp(prefix="labkit-box-", dir=shm))


def _configure(root: Path) -> str:
    """Make the debootstrapped tree a bootable, ssh-able lab node. Returns the kernel version."""
    # no fsck of a fresh copy; labkit's payload is unpacked in RAM (half the time of ext4 under TCG)
    (root / "etc/fstab").write_text("/dev/vda / ext4 defaults,noatime 0 0\n"
                                    "tmpfs /opt/labkit tmpfs mode=0755,size=128m 0 0\n")
    (root / "opt/labkit").mkdir(parents=True, exist_ok=True)
    (root / "etc/modprobe.d/labkit-blacklist.conf").write_text("".join(f"blacklist {m}\n" for m in _BLACKLIST))
    (root / "etc/systemd/journald.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/systemd/journald.conf.d/labkit.conf").write_text("[Journal]\nStorage=volatile\n")
    (root / "etc/hostname").write_text("labkit\n")
    # every VM of the box must get its own machine-id (DHCP DUIDs and leases derive from it)
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 labkit\n")
    (root / "etc/udev/rules.d/70-labkit-mgmt.rules").write_text(_UDEV_RULE)
    netdir = root / "etc/systemd/network"
    netdir.mkdir(parents=True, exist_ok=True)
    (netdir / "10-labkit-mgmt.network").write_text(_NETWORK_UNIT)
    (root / "etc/sudoers.d/vagrant").write_text(_SUDOERS)
    os.chmod(root / "etc/sudoers.d/vagrant", 0o440)
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/labkit.conf").write_text(_SSHD)
    (root / "etc/modules-load.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/modules-load.d/labkit.conf").write_text("ipvlan\nip_vs\nbr_netfilter\nvxlan\n")
    script = f"""set -e
useradd -m -s /bin/bash -U vagrant
install -d -m 700 -o vagrant -g vagrant /home/vagrant/.ssh
install -d -m 700 /root/.ssh
systemctl enable systemd-networkd.service >/dev/null 2>&1
systemctl mask {' '.join(_MASK)} >/dev/null 2>&1 || true
"""
    subprocess.run(["chroot", str(root), "/bin/sh", "-c", script], check=True, stdin=subprocess.DEVNULL,
                   capture_output=True)
    key = insecure_public_key() + "\n"
    for home, owner in ((root / "home/vagrant", "vagrant"), (root / "root", "root")):
        path = home / ".ssh/authorized_keys"
        path.write_text(key)
        os.chmod(path, 0o600)
    uid = _passwd_ids(root, "vagrant")
    os.chown(root / "home/vagrant/.ssh/authorized_keys", *uid)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / junk).glob("*"):
            if p.is_file():
                p.unlink()
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise LabkitError("the box has no kernel in /boot (linux-image-amd64 did not install)")
    return kernels[-1].name[len("vmlinuz-"):]


def _safe_rmtree(path: Path) -> None:
    """rmtree that first detaches whatever debootstrap left mounted inside (proc, sys, dev binds)
    and refuses to go on if a mount remains: deleting through a bind mount of /dev would be ruinous."""
    if not path.exists():
        return
    for mnt in nsexec.mounts_under(path):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    left = nsexec.mounts_under(path)
    if left:
        raise LabkitError(f"not removing {path}: still mounted inside: {', '.join(map(str, left))}")
    shutil.rmtree(path, ignore_errors=True)


def _passwd_ids(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        parts = line.split(":")
        if parts[0] == user:
            return int(parts[2]), int(parts[3])
    raise LabkitError(f"no user {user} in the box")


def _make_image(rootfs: Path, img: Path, disk_gb: int, work: Path, logf: Path, mark) -> None:
    raw = work / "root.ext4"
    with open(raw, "wb") as f:
        f.truncate(disk_gb * 2**30)
    with open(logf, "a") as out:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "labkit", "-d", str(rootfs), str(raw)], check=True,
                       stdout=out, stderr=subprocess.STDOUT)
        _safe_rmtree(rootfs)
        mark("mkfs")
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(img)], check=True,
                       stdout=out, stderr=subprocess.STDOUT)
        mark("qcow2")
    raw.unlink()


def _pack(boxfile: Path, img: Path, box: Box) -> None:
    """A Vagrant libvirt box: box.img, metadata.json and a Vagrantfile with the box's defaults."""
    meta = json.dumps({"provider": "libvirt", "format": "qcow2", "virtual_size": box.recipe.disk_gb})
    vf = f"""# labkit box {box.name}: Debian's kernel booted directly (no boot loader in the image)
Vagrant.configure("2") do |config|
  config.vm.synced_folder ".", "/vagrant", disabled: true
  config.ssh.insert_key = false
  config.vm.provider :libvirt do |lv|
    lv.disk_bus = "virtio"
    lv.kernel = "{box.kernel}"
    lv.initrd = "{box.initrd}"
    lv.cmd_line = "{box.recipe.cmdline}"
  end
end
"""
    with tarfile.open(boxfile, "w") as tar:
        for name, data in (("metadata.json", meta), ("Vagrantfile", vf)):
            f = boxfile.parent / name
            f.write_text(data)
            tar.add(f, arcname=name)
        tar.add(img, arcname="box.img")


# ================================================================ remove, status

def remove(recipe: BoxRecipe | None = None, log=print) -> dict[str, int]:
    """Remove a box everywhere: Vagrant's copy, libvirt's base volume, the kernel, the cache folder."""
    box = box_for(recipe)
    counts = {"vagrant_boxes": 0, "volumes": 0, "files": 0}
    if shutil.which("vagrant") and box.vagrant_dir.exists():
        subprocess.run(["vagrant", "box", "remove", "--force", "--all", box.name], env=vagrant_env(),
                       capture_output=True, stdin=subprocess.DEVNULL)
        shutil.rmtree(box.vagrant_dir, ignore_errors=True)
        counts["vagrant_boxes"] += 1
    if shutil.which("virsh") and Path("/run/libvirt/libvirt-sock").exists():
        vols = subprocess.run(["virsh", "-q", "vol-list", "default"], capture_output=True, text=True).stdout
        for vol in (ln.split()[0] for ln in vols.splitlines() if ln.split()):
            if vol.startswith(box.libvirt_volume_prefix):
                proc = subprocess.run(["virsh", "-q", "vol-delete", "--pool", "default", vol], capture_output=True)
                counts["volumes"] += proc.returncode == 0
    # libvirtd not running (labkit starts it only for labs): the default pool is a plain folder
    for img in LIBVIRT_IMAGES.glob(box.libvirt_volume_prefix + "*"):
        img.unlink()
        counts["volumes"] += 1
    for path in (box.kernel.parent, box.dir):
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            counts["files"] += 1
    log(f"box {box.name} removed: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return counts


def status(recipe: BoxRecipe | None = None) -> dict:
    return box_for(recipe).info()


def describe(box: Box) -> str:
    """One line: ``bookworm labkit/debian12-<key>: kernel 6.1.0-50-amd64, 952 MiB; no netkit, ipvlan m, …``."""
    info = box.info()
    size = f", {info['size_mb']} MiB" if info.get("size_mb") else ""
    bcc = "" if box.recipe.with_bcc else ", no bcc"
    return (f"{box.recipe.release} {box.name}: kernel {info['kernel'] or '?'}{size}{bcc}; "
            f"{describe_features(info['features'])}")


def doctor_row() -> tuple[str, str, str]:
    """(status, detail, fix) for `labkit doctor`'s ``box`` row: every built box, with its kernel and
    its features; ok when the default release's box (what labs use unless they say) is built."""
    built = [b for b in cached_boxes() if b.ready()]
    detail = " | ".join(describe(b) for b in built)
    absent = [r for r in RELEASES if not any(b.recipe == BoxRecipe(release=r) for b in built)]
    if absent:
        detail += (" | " if detail else "") + f"not built: {', '.join(absent)}"
    if box_for().ready():
        return "ok", detail, ""
    return "warn", detail, ("labkit box build (debootstrap from the apt mirror, ~2 min); "
                            "labkit box build --release trixie for labs with release: trixie")


__all__ = ["Box", "BoxRecipe", "Release", "RELEASES", "DEFAULT_RELEASE", "KERNEL_CONFIG", "box_for", "build",
           "cached_boxes", "check_release", "describe", "describe_features", "kernel_features", "release_of",
           "remove", "status", "vagrant_env", "debian_mirror"]
