"""Everything between a compiled Ruleset and the kernel."""
