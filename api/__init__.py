"""The HTTP faces of Stratus: the OpenStack-compatible API (``stratus serve openstack-api``)."""
