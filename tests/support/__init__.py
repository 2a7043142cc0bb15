"""Shared test support: the network-namespace sandbox and its fixtures.

``tests.support.topology`` has no pytest dependency so the demo can use it;
``tests.support.fixtures`` holds the pytest fixtures built on it.
"""
