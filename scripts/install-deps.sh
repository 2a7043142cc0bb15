#!/usr/bin/env bash
# Install the Debian packages and kernel modules hostfw's tests and demo need.
#
# Idempotent and quiet when there is nothing to do, so `make deps` (and CI,
# which always runs it) costs a few dpkg-query calls on a prepared machine.
# apt-get is only touched when a package is really missing, because
# `apt-get update` is slow and needs the network.
set -euo pipefail

PACKAGES=(
    iptables ipset conntrack iproute2 kmod procps
    rabbitmq-server iperf3 socat tcpdump shellcheck python3-venv
    # Not in the original list, but tests/support/topology.py's ping()
    # probe needs it and the base image does not ship it.
    iputils-ping
    # systemd-analyze, for tests/ops/test_unit_file.py (verify the unit).
    systemd
)

MODULES=(
    br_netfilter xt_physdev ip_set ip_set_hash_net xt_set nf_conntrack
    xt_conntrack xt_comment xt_mac xt_multiport xt_CT iptable_raw
    iptable_nat ip6table_raw ip6table_nat nf_tables nft_compat
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-deps: missing packages (${missing[*]}) and not root" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # rabbitmq-server's postinst starts the service where an init system
    # runs; that is fine, tests start their own broker when they need one.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Best effort: on this kind of machine most of these are built into the kernel
# (there is no /lib/modules at all), so modprobe failing is expected and not
# an error. Tests that really need a feature find out by using it.
if command -v modprobe >/dev/null 2>&1; then
    for mod in "${MODULES[@]}"; do
        modprobe -q "$mod" >/dev/null 2>&1 || true
    done
fi
