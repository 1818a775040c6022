"""nginx variables at run time: evaluation against a request, map variables, the balancer trace."""
