"""hostfw: a host firewall agent enforcing Neutron-style security groups with iptables."""
