"""The routing core: modules, hosts and the load balancer. Pure Python, no I/O, no trio."""
