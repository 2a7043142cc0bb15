"""hostfw test tree (a package so ``tests.support`` imports everywhere)."""
