"""The allocator of two-level scheduling: offers by Dominant Resource Fairness."""

from stratus.handlers.allocator.drf import Res, dominant_share, plan_offers
from stratus.handlers.allocator.service import AllocatorConfig, AllocatorService

__all__ = ["AllocatorConfig", "AllocatorService", "Res", "dominant_share", "plan_offers"]
