"""`make bench`: how fast hostfw programs the kernel, against the floor and the peer.

Rules of this room:

1. Everything runs in private network namespaces (`hfwt-<pid>-...`, the test
   sandbox's prefix, so `make clean-netns` finds leftovers); the root
   namespace's firewall is never read or written, and no packet leaves the
   machine.
2. Every measurement is run side by side with its floor in the same run (raw
   `iptables-restore` / `ipset restore` of the very ruleset the engine
   writes), because this machine is shared and noisy: only figures taken on
   the same machine and minute compare.
3. Results are data: `bench/results/latest.json` records the machine, the
   versions, every sample, medians and spreads, and the verdict on each goal
   of issue 8; the plots and doc/performance.md are drawn from it.
4. Nothing here asserts a timing: `make test` never depends on how busy the
   machine is.
"""
