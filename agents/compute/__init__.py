"""The compute agent: one per host, libvirt domains and container instances
from the events on the host's subject (imports only ``stratus.events``)."""
