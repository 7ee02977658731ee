#!/usr/bin/env bash
# setup.sh — prepare a Debian 12 machine (as root) to build and measure labkit labs.
#
# One idempotent step, safe to run again; a re-run with everything in place takes about a second.
#   1. apt: the system tools labkit drives (only when one is missing: apt-get update is slow)
#   2. kernel headers for bcc: when the running kernel has no headers of its own (a custom kernel),
#      link /lib/modules/$(uname -r)/{build,source} to Debian's headers; bcc needs both links
#   3. .venv (Debian's python3, or python3 on PATH: >= 3.11, and runnable by every user since a
#      classroom's participants run it) with `pip install -e '.[dev]'` (skipped when pyproject.toml
#      and the interpreter are unchanged since the last install: hash stamp in .venv)
#   4. Debian's bcc (python3-bpfcc) made visible to .venv alone, not the rest of dist-packages:
#      .venv/debian-bcc/bcc -> /usr/lib/python3/dist-packages/bcc, named by a .pth file
# Paths are relative to this script's folder, so a clone anywhere works (CI clones elsewhere).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
VENV="$ROOT/.venv"
STAMP="$VENV/.labkit-install-stamp"
DEBIAN_BCC=/usr/lib/python3/dist-packages/bcc
ARCH="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
START=$SECONDS

PACKAGES=(python3-bpfcc bpfcc-tools "linux-headers-$ARCH" iptables nftables ipvsadm ipset iproute2
          iperf3 sockperf gcc make bpftool util-linux procps
          # the http workload: nginx in backend pods, wrk as the client (labkit/workloads.py)
          nginx-light wrk
          # the vagrant backend (VMs under QEMU, box built offline by debootstrap): labkit/backends/vagrant/
          vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 qemu-utils debootstrap
          # figure export (kaleido) and the browser test (Playwright) drive Debian's Chromium: no download
          chromium
          # the classroom (labkit classroom up): JupyterHub's proxy runs on Node.js (the proxy itself
          # comes from the npm registry: install_proxy below)
          nodejs)
OPTIONAL_PACKAGES=(kmod)  # modprobe: useless on a kernel without modules, wanted in the VMs

step() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

installed() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }

install_packages() {
  local wanted=("${PACKAGES[@]}") missing=() optional=() p
  /usr/bin/python3 -c 'import ensurepip' 2>/dev/null || wanted+=(python3-venv)  # Debian's python3 needs it
  command -v npm >/dev/null || wanted+=(npm)  # a Node.js from elsewhere (NodeSource) brings its own npm
  for p in "${wanted[@]}"; do installed "$p" || missing+=("$p"); done
  for p in "${OPTIONAL_PACKAGES[@]}"; do installed "$p" || optional+=("$p"); done
  if [ ${#missing[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ]; then
    step "apt: all ${#wanted[@]} packages present"
    return
  fi
  step "apt: installing ${missing[*]}${optional[*]:+ (optional: ${optional[*]})}"
  # Debian starts a package's service on install (nginx on port 80 of this host): labkit runs nginx
  # only inside pods, so no service may start while we install. A policy-rc.d that says "no" (101)
  # is put in place for the install, unless one is there already, and removed after.
  local made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# labkit setup.sh: no service starts during its apt-get install\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also when apt fails and the script dies
  fi
  apt-get update -qq
  if ! apt-get install -y -qq "${missing[@]}" "${optional[@]}" >/dev/null; then
    [ ${#optional[@]} -gt 0 ] || die "apt-get install ${missing[*]} failed"
    step "apt: retrying without optional ${optional[*]}"
    [ ${#missing[@]} -eq 0 ] || apt-get install -y -qq "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed"
  fi
  if [ -n "$made_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
}

link_kernel_headers() {
  local kver mod hdr common name target
  kver="$(uname -r)"
  mod="/lib/modules/$kver"
  if [ -d "/usr/src/linux-headers-$kver" ]; then
    step "kernel headers: the running kernel $kver has its own; nothing to link"
    return
  fi
  hdr="$(ls -d /usr/src/linux-headers-*-"$ARCH" 2>/dev/null | sort -V | tail -n1)"
  [ -n "$hdr" ] || die "no /usr/src/linux-headers-*-$ARCH (apt-get install linux-headers-$ARCH)"
  common="${hdr%-"$ARCH"}-common"
  mkdir -p "$mod"
  for name in build source; do
    target="$hdr"; [ "$name" = source ] && target="$common"
    if [ -e "$mod/$name" ]; then
      step "kernel headers: kept $mod/$name -> $(readlink -f "$mod/$name")"
    else  # absent, or dangling after a headers upgrade
      ln -sfn "$target" "$mod/$name"
      step "kernel headers: CHANGED $mod/$name -> $target (kernel $kver has no headers; bcc compiles against these)"
    fi
  done
}

reachable() {  # whether every user can run this interpreter: a classroom's participants run the venv's
  runuser -u nobody -- /bin/sh -c '"$0" -c "import sys"' "$1" 2>/dev/null
}

pick_python() {  # Debian's python3 first (any user can run it; a pyenv one under /root may not be)
  local cand
  for cand in /usr/bin/python3 "$(command -v python3 || true)"; do
    [ -n "$cand" ] && [ -x "$cand" ] || continue
    "$cand" -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || continue
    reachable "$cand" || continue
    echo "$cand"
    return
  done
}

make_venv() {
  local py
  py="$(pick_python)"
  if "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    if reachable "$VENV/bin/python" || [ -z "$py" ]; then
      step "venv: $VENV present ($("$VENV/bin/python" -V))"
      [ -n "$py" ] || step "venv: WARNING: other users cannot run $VENV/bin/python (labkit classroom needs them to)"
      return
    fi
    step "venv: CHANGED: other users cannot run $(readlink -f "$VENV/bin/python") (a classroom's participants run " \
         "the venv's Python); recreating $VENV with $py"
    rm -rf "$VENV"
  elif [ -e "$VENV" ]; then
    step "venv: $VENV does not run; recreating it"
    rm -rf "$VENV"
  fi
  if [ -z "$py" ]; then
    command -v python3 >/dev/null || die "no python3 on PATH"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || die "python3 on PATH is $(python3 -V 2>&1); labkit needs >= 3.11"
    py="$(command -v python3)"
    step "venv: WARNING: no Python >= 3.11 that every user can run; $py it is (labkit classroom will refuse)"
  fi
  "$py" -m venv "$VENV"
  step "venv: created $VENV with $py ($("$VENV/bin/python" -V))"
}

install_labkit() {
  local want
  want="$(cat "$ROOT/pyproject.toml" <("$VENV/bin/python" -VV) <(echo "$ROOT") | sha256sum | cut -c1-16)"
  if [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] && "$VENV/bin/python" -I - "$ROOT" <<'EOF'
import importlib.util, sys
spec = importlib.util.find_spec("labkit")
sys.exit(not (spec and spec.origin == f"{sys.argv[1]}/labkit/__init__.py" and importlib.util.find_spec("pytest")))
EOF
  then
    step "pip: labkit[dev] installed, pyproject.toml unchanged"
    return
  fi
  step "pip: installing -e '.[dev]' into $VENV"
  (cd "$ROOT" && "$VENV/bin/python" -m pip install -q -e '.[dev]') || die "pip install -e '.[dev]' failed"
  echo "$want" >"$STAMP"
}

link_debian_bcc() {
  local site pth
  [ -d "$DEBIAN_BCC" ] || die "$DEBIAN_BCC missing (apt-get install python3-bpfcc)"
  mkdir -p "$VENV/debian-bcc"
  if [ "$(readlink "$VENV/debian-bcc/bcc" || true)" != "$DEBIAN_BCC" ]; then
    ln -sfn "$DEBIAN_BCC" "$VENV/debian-bcc/bcc"
    step "bcc: linked $VENV/debian-bcc/bcc -> $DEBIAN_BCC"
  fi
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
  pth="$site/labkit-debian-bcc.pth"
  if [ "$(cat "$pth" 2>/dev/null)" != "$VENV/debian-bcc" ]; then
    echo "$VENV/debian-bcc" >"$pth"
    step "bcc: wrote $pth (adds only $VENV/debian-bcc to sys.path)"
  fi
}

verify_bcc() {
  "$VENV/bin/python" -I - "$DEBIAN_BCC" <<'EOF' || die "import bcc failed in $VENV (see above)"
import os, sys
import bcc
where = os.path.realpath(os.path.dirname(bcc.__file__))
if where != sys.argv[1]:
    sys.exit(f"bcc comes from {where}, not Debian's {sys.argv[1]} (PyPI's 'bcc' is unrelated: pip uninstall bcc)")
if "/usr/lib/python3/dist-packages" in sys.path:
    sys.exit("the rest of Debian's dist-packages leaked into the venv's sys.path")
print(f"setup: bcc: import bcc ok ({where})")
EOF
}

install_proxy() {
  # JupyterHub's configurable-http-proxy, from the npm registry, into the venv (labkit/classroom.py)
  local prefix="$VENV/node" want=4.6.3
  if [ "$("$prefix/node_modules/.bin/configurable-http-proxy" --version 2>/dev/null)" = "$want" ]; then
    step "npm: configurable-http-proxy $want present"
    return
  fi
  step "npm: installing configurable-http-proxy@$want into $prefix"
  npm install --silent --no-audit --no-fund --prefix "$prefix" "configurable-http-proxy@$want" >/dev/null \
    || die "npm install configurable-http-proxy@$want failed"
}

[ "$(id -u)" -eq 0 ] || die "run as root (apt, /lib/modules and network namespaces need it)"
install_packages
link_kernel_headers
make_venv
install_labkit
link_debian_bcc
verify_bcc
install_proxy
step "done in $((SECONDS - START)) s; check the machine with: $VENV/bin/labkit doctor"
