"""hostfw-controller: the server side of the Neutron-compatible RPC API."""
