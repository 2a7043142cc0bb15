#!/bin/bash
# devstack/plugin.sh: run hostfw-agent on a DevStack node in place of Neutron's
# iptables firewall driver (doc/devstack.md).
#
# DevStack sources this with a mode and a phase:
#   stack install      hostfw into its own virtualenv (HOSTFW_VENV)
#   stack post-config  /etc/hostfw/agent.conf (RPC mode, DevStack's RabbitMQ) and
#                      Neutron's [securitygroup] firewall_driver = noop, before
#                      Neutron's agents start
#   stack extra        start hostfw-agent as the systemd unit devstack@hostfw-agent
#   unstack            stop it (its rules stay, as after any SIGTERM)
#   clean              remove its configuration, state and virtualenv
# Functions in lower case (iniset, run_process, get_transport_url, die, ...)
# and upper-case names without the HOSTFW_ prefix (STACK_USER, Q_AGENT,
# Q_PLUGIN_CONF_FILE) are DevStack's own, defined before this file is sourced.

function install_hostfw {
    if ! "$HOSTFW_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        die $LINENO "hostfw needs Python 3.11 or newer: set HOSTFW_PYTHON in local.conf"
    fi
    if [[ ! -x "$HOSTFW_VENV/bin/pip" ]]; then
        "$HOSTFW_PYTHON" -m venv "$HOSTFW_VENV"
    fi
    "$HOSTFW_VENV/bin/pip" install --quiet --upgrade pip
    "$HOSTFW_VENV/bin/pip" install --quiet "$HOSTFW_DIR"
}

function configure_hostfw {
    local neutron_conf=${HOSTFW_NEUTRON_AGENT_CONF:-${Q_PLUGIN_CONF_FILE:+/$Q_PLUGIN_CONF_FILE}}
    if [[ -z "$neutron_conf" ]]; then
        die $LINENO "cannot tell Neutron's L2 agent config file: set HOSTFW_NEUTRON_AGENT_CONF"
    fi
    if [[ "${Q_AGENT:-}" != "linuxbridge" ]]; then
        # hostfw filters bridged tap devices (physdev): the OVS agent has none
        # once its firewall driver is noop.
        warn $LINENO "hostfw filters Linux bridge ports; Q_AGENT is '${Q_AGENT:-}'"
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
    # filters them: two writers of the same chains would fight.
    iniset "$neutron_conf" securitygroup firewall_driver noop
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
