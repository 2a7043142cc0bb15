"""Traffic conformance suite: Neutron's functional firewall tests, with real packets."""
