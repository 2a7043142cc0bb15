"""Forget the conntrack entries of a floating IP that was removed or moved.

Rules of this room: called on the writer thread only, after the apply that
removed the floating IP's NAT rules (never before: a packet in between would
create a fresh entry through the old rules). NAT is decided on a connection's
first packet and then cached in its conntrack entry, so without this an
established flow keeps its old translation for as long as it lasts.

Which entries: those whose original destination is the floating IP (flows
DNATed to the VM) and those whose reply destination is it (the VM's flows
SNATed to it). nova deleted by the fixed IP instead, which also cuts the
VM's flows that never used the floating IP.
"""

from __future__ import annotations

from agent.dataplane.command import KernelWriteError, run

# conntrack -D exits 1 both for "nothing matched" and for real failures;
# only this message tells them apart.
NOTHING_DELETED = "0 flow entries have been deleted"


def delete_flows(floating_ip: str) -> None:
    """Delete every IPv4 conntrack entry translated to or from `floating_ip`.

    Raises KernelWriteError when conntrack itself fails (missing tool,
    kernel error); finding nothing to delete is success.
    """
    for selector in ("--orig-dst", "--reply-dst"):
        try:
            run(["conntrack", "-D", "-f", "ipv4", selector, floating_ip])
        except KernelWriteError as exc:
            if NOTHING_DELETED not in str(exc):
                raise
