#!/usr/bin/env bash
# Delete network namespaces left behind by killed hostfw test runs.
#
# Test namespaces are named hfwt-<pid>-<rand>-<role> (tests/support/
# topology.py). Only those whose creating pid is gone are removed, so a test
# run going on in parallel is left alone; FORCE=1 removes every hfwt-
# namespace. Processes still inside a namespace are killed first, because a
# live process keeps a deleted namespace (and its devices) alive.
set -euo pipefail

force=${FORCE:-0}
removed=0
while read -r ns _; do
    [[ "$ns" == hfwt-* ]] || continue
    pid=${ns#hfwt-}
    pid=${pid%%-*}
    if [[ "$force" != 1 && "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        echo "clean-netns: keeping $ns (pid $pid still running; FORCE=1 to remove)"
        continue
    fi
    for p in $(ip netns pids "$ns" 2>/dev/null); do
        kill -9 "$p" 2>/dev/null || true
    done
    ip netns delete "$ns" && removed=$((removed + 1))
    echo "clean-netns: deleted $ns"
done < <(ip netns list 2>/dev/null)

# Scratch dirs of the same runs (server logs).
for d in "${TMPDIR:-/tmp}"/hfwt-*; do
    [[ -d "$d" ]] || continue
    pid=${d##*/hfwt-}
    pid=${pid%%-*}
    if [[ "$force" == 1 ]] || ! kill -0 "$pid" 2>/dev/null; then
        rm -rf -- "$d"
    fi
done
echo "clean-netns: $removed namespace(s) removed"
