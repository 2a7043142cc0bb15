#!/bin/bash
# devstack/plugin.sh: run hostfw-agent on a DevStack node in place of Neutron's
# iptables firewall (doc/devstack.md).
#
# Two Neutron layouts are supported, chosen by DevStack's Q_AGENT:
#   openvswitch  ML2/OVS (DevStack master and every release): the OVS agent's
#                firewall_driver = hostfw, a shim that filters nothing but asks
#                for hybrid plugging, so Nova plugs each tap into a qbr bridge
#                where hostfw enforces (agent/neutron_firewall.py)
#   linuxbridge  ML2/Linux bridge (releases before 2025.1): the Linux bridge
#                agent's firewall_driver = noop
# Anything else (OVN) has no bridge for hostfw to filter on: the plugin stops.
#
# DevStack sources this with a mode and a phase:
#   stack install      hostfw into its own virtualenv (HOSTFW_VENV); for
#                      ML2/OVS also the shim into Neutron's Python
#   stack post-config  /etc/hostfw/agent.conf (RPC mode, DevStack's RabbitMQ) and
#                      Neutron's [securitygroup] firewall_driver, before
#                      Neutron's agents start
#   stack extra        start hostfw-agent as the systemd unit devstack@hostfw-agent
#   unstack            stop it (its rules stay, as after any SIGTERM)
#   clean              remove its configuration, state and virtualenv
# Functions in lower case (iniset, run_process, get_transport_url, pip_install,
# die, ...) and upper-case names without the HOSTFW_ prefix (STACK_USER,
# Q_AGENT, Q_PLUGIN_CONF_FILE) are DevStack's own, defined before this file is
# sourced.

# The firewall driver Neutron's L2 agent gets, per Q_AGENT; empty: unsupported.
function hostfw_neutron_firewall_driver {
    case "${Q_AGENT:-}" in
        openvswitch) echo hostfw ;;
        linuxbridge) echo noop ;;
        *) echo "" ;;
    esac
}

function install_hostfw {
    if ! "$HOSTFW_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        die $LINENO "hostfw needs Python 3.11 or newer: set HOSTFW_PYTHON in local.conf"
    fi
    if [[ ! -x "$HOSTFW_VENV/bin/pip" ]]; then
        "$HOSTFW_PYTHON" -m venv "$HOSTFW_VENV"
    fi
    "$HOSTFW_VENV/bin/pip" install --quiet --upgrade pip
    "$HOSTFW_VENV/bin/pip" install --quiet "$HOSTFW_DIR"
    if [[ "$(hostfw_neutron_firewall_driver)" == "hostfw" ]]; then
        # The OVS agent loads the shim through its entry point, from its own
        # Python: install the package there without its dependencies (the
        # shim needs none and must not move Neutron's), whatever that Python's
        # version (the shim runs on any Neutron's).
        pip_install --no-deps --ignore-requires-python "$HOSTFW_DIR"
    fi
}

function configure_hostfw {
    local neutron_conf=${HOSTFW_NEUTRON_AGENT_CONF:-${Q_PLUGIN_CONF_FILE:+/$Q_PLUGIN_CONF_FILE}}
    if [[ -z "$neutron_conf" ]]; then
        die $LINENO "cannot tell Neutron's L2 agent config file: set HOSTFW_NEUTRON_AGENT_CONF"
    fi
    local firewall_driver
    firewall_driver=$(hostfw_neutron_firewall_driver)
    if [[ -z "$firewall_driver" ]]; then
        # hostfw filters taps on Linux bridges (physdev); OVN has none.
        die $LINENO "hostfw needs Q_AGENT=openvswitch or linuxbridge; Q_AGENT is '${Q_AGENT:-}'"
    fi
    sudo install -d -o "$STACK_USER" -m 0755 "$HOSTFW_CONF_DIR"
    # The transport URL carries the broker's password.
    if [[ ! -e "$HOSTFW_CONF" ]]; then
        install -m 0600 /dev/null "$HOSTFW_CONF"
    fi
    iniset "$HOSTFW_CONF" DEFAULT host "$HOSTFW_HOST"
    iniset "$HOSTFW_CONF" DEFAULT state_path "$HOSTFW_STATE_PATH"
    iniset "$HOSTFW_CONF" DEFAULT transport_url "$(get_transport_url)"
    iniset "$HOSTFW_CONF" agent mode rpc
    iniset "$HOSTFW_CONF" firewall backend "$HOSTFW_BACKEND"
    iniset "$HOSTFW_CONF" admin socket_path "$HOSTFW_SOCKET"
    # Neutron's L2 agent keeps wiring ports and reporting them, but no longer
    # filters them: two writers of the same chains would fight. With OVS the
    # hostfw driver also makes Nova plug taps into per-port qbr bridges.
    iniset "$neutron_conf" securitygroup firewall_driver "$firewall_driver"
    # Bridged traffic reaches iptables only through br_netfilter.
    sudo modprobe br_netfilter
    sudo sysctl -q -w net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1
}

function start_hostfw {
    # Root: it writes iptables, ipset and conntrack, and keeps its state there.
    run_process hostfw-agent "$HOSTFW_VENV/bin/hostfw-agent --config-file $HOSTFW_CONF" "" root
}

function stop_hostfw {
    stop_process hostfw-agent
}

function cleanup_hostfw {
    sudo rm -rf "$HOSTFW_CONF_DIR" "$HOSTFW_STATE_PATH" "$HOSTFW_VENV"
}

if is_service_enabled hostfw-agent; then
    # DevStack passes no phase to unstack and clean.
    if [[ "$1" == "stack" && "${2:-}" == "install" ]]; then
        echo_summary "Installing hostfw-agent"
        install_hostfw
    elif [[ "$1" == "stack" && "${2:-}" == "post-config" ]]; then
        echo_summary "Configuring hostfw-agent"
        configure_hostfw
    elif [[ "$1" == "stack" && "${2:-}" == "extra" ]]; then
        echo_summary "Starting hostfw-agent"
        start_hostfw
    fi
    if [[ "$1" == "unstack" ]]; then
        stop_hostfw
    fi
    if [[ "$1" == "clean" ]]; then
        cleanup_hostfw
    fi
fi
