"""Reliability suite (issue 8): the real agent, real packets, bad moments.

- test_restarts.py: restarts under continuous traffic lose no allowed packet
  and let no denied one through;
- test_kill9.py: SIGKILL at random points of applies leaves every table a
  whole generation, and the restarted agent converges;
- test_tamper.py: a flushed or deleted chain, a deleted rule, hook or ipset
  member is repaired, and the repair shows in the log, metrics and status;
- test_foreign_writer.py: another program adding and deleting rules in the
  same tables during many applies loses none of them.

`make test` runs bounded sizes; `make soak` runs every loop
HOSTFW_SOAK_SCALE times longer. Not here: RabbitMQ outages (tests/rpc/ owns
the broker-fault test) and hostile-input fuzzing (tests/unit/test_fuzz.py).
"""
