"""The scheduler: filter and weigh every host at once, claim without double-booking."""

from stratus.handlers.scheduler.decide import Decider, SchedulerConfig, load_config
from stratus.handlers.scheduler.filters import Request
from stratus.handlers.scheduler.service import SchedulerService
from stratus.handlers.scheduler.table import HostTable

__all__ = ["Decider", "HostTable", "Request", "SchedulerConfig", "SchedulerService", "load_config"]
