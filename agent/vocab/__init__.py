"""The vocabulary the compiler and the dataplane share, below both of them.

Rules of this room: values and pure functions only, and imports from nothing
else in the agent. The compiler builds these values, the dataplane writes
them, `agent-ctl trace` walks them; none of the three imports another's
internals. What lives here: rules as typed values (`rules`), the desired
state (`ruleset`), the names of kernel objects and their ownership
(`names`), conntrack cuts (`flows`), protocol numbers (`protocols`), and the
reader of rules the kernel printed (`rule_text`).
"""
