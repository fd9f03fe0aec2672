"""Two-level scheduling: frameworks, the offers the allocator makes them, and
their tasks.

A framework is a tenant's resource (``ev.<tenant>.framework.<id>``). The
allocator offers it the unclaimed resources of one host at a time: an offer
is a resource of the framework's tenant (``ev.<tenant>.offer.<id>``, what
the framework reads and answers), and ``host.offered`` on the host's own
subject, appended in the same atomic batch on the condition that nothing
came on the host since the state the allocator decided on. So no two
allocator replicas offer one host's resources twice, and an acceptance,
conditioned on the host subject too, fails (``conflict``) once anything
moved there: another claim, a newer offer, a rescind.

A task is a container server (``ev.<tenant>.server.<id>``) whose spec names
its framework; accepting an offer requests, claims and schedules it on the
offer's host in one batch, so the scheduler's servers and the frameworks'
tasks are one capacity truth, folded from the host subject. Its status
updates (``task.running``, ``task.finished``, ``task.failed``) come from the
framework's executor, as Mesos status updates do; a finished or failed task
gives its claim back in the same batch (``host.released``).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

from stratus.events.model import Event
from stratus.events.resources import Name, Positive, Ref, ResourceEvent, TenantScoped, Text

# Frameworks beat here (``framework.beat``, through the command service),
# as hosts beat into theirs: liveness is not history.
FRAMEWORK_BEATS = "stratus-framework-beats"

Weight = Annotated[float, msgspec.Meta(gt=0, le=1000)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=86400)]
Role = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9*][a-z0-9_-]{0,62}$")]


# -- frameworks ------------------------------------------------------------------


class FrameworkRegistered(ResourceEvent, frozen=True, tag="framework.registered"):
    begins = True
    status = "active"
    name: str
    role: str = "*"
    weight: float = 1.0
    # A framework that stops beating this long is removed: its tasks are
    # killed and their resources freed. Re-registering (``--id``) sooner
    # keeps them.
    failover_timeout_s: float = 60.0


class FrameworkReregistered(ResourceEvent, frozen=True, tag="framework.reregistered"):
    """The framework came back within its failover timeout: its tasks stay its."""

    status = "active"


class FrameworkRemoved(ResourceEvent, frozen=True, tag="framework.removed"):
    """Gone past its failover timeout (the allocator decides): its tasks are
    failed and their claims released in the same batch."""

    ends = True
    reason: str = ""


# -- offers -------------------------------------------------------------------------


class OfferMade(ResourceEvent, frozen=True, tag="offer.made"):
    begins = True
    status = "offered"
    framework: str
    host: str
    vcpus: float
    ram_mb: float
    disk_gb: float
    # Unix time after which the allocator rescinds it.
    expires_at: float


class OfferRescinded(ResourceEvent, frozen=True, tag="offer.rescinded"):
    ends = True
    reason: str = ""


class OfferDeclined(ResourceEvent, frozen=True, tag="offer.declined"):
    """Not wanted; the allocator offers that host to this framework again
    only after ``refuse_seconds``."""

    ends = True
    refuse_seconds: float = 5.0


class OfferAccepted(ResourceEvent, frozen=True, tag="offer.accepted"):
    ends = True
    tasks: list[str] = []


class HostOffered(Event, frozen=True, tag="host.offered"):
    """On the host's subject: this host's unclaimed resources are offered to
    one framework (the newest such event is the host's one live offer)."""

    offer: str
    framework: str
    framework_tenant: str


class HostOfferEnded(Event, frozen=True, tag="host.offer-ended"):
    """On the host's subject: the host's live offer was rescinded or declined."""

    offer: str
    framework: str = ""
    refuse_seconds: float = 0.0


# -- tasks (servers of kind container whose spec names a framework) ------------------


class TaskEvent(ResourceEvent, frozen=True):
    """About a task, which is a server: its row in the servers view."""

    view_kind: ClassVar[str] = "server"


class TaskRunning(TaskEvent, frozen=True, tag="task.running"):
    status = "running"


class TaskFinished(TaskEvent, frozen=True, tag="task.finished"):
    ends = True
    status = "finished"


class TaskFailed(TaskEvent, frozen=True, tag="task.failed"):
    ends = True
    status = "failed"
    reason: str = ""


# -- commands -------------------------------------------------------------------------


class FrameworkRegister(TenantScoped, frozen=True):
    name: Name
    role: Role = "*"
    weight: Weight = 1.0
    failover_timeout_s: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 60.0
    # Re-registering after a failover: the framework's id (its tasks stay).
    id: Ref | None = None


class FrameworkBeat(TenantScoped, frozen=True):
    """The framework is alive (for its failover timeout from now)."""

    framework: Ref


class TaskLaunch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    name: Name
    vcpus: Positive
    ram_mb: Positive
    disk_gb: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] = 0
    image: Ref | None = None


class OfferAccept(TenantScoped, frozen=True):
    offer: Ref
    # The offer's host, as ``offer.made`` said (the decision checks it).
    host: Name
    tasks: Annotated[list[TaskLaunch], msgspec.Meta(min_length=1, max_length=64)]


class OfferDecline(TenantScoped, frozen=True):
    offer: Ref
    refuse_seconds: Seconds = 5.0


class TaskUpdate(TenantScoped, frozen=True):
    """A task's executor reports it finished or failed: its claim is given back."""

    task: Ref
    # The task's host (the decision checks it): its claim is released there.
    host: Name
    state: Annotated[str, msgspec.Meta(pattern=r"^(finished|failed)$")]
    reason: Text = ""


class TaskRef(TenantScoped, frozen=True):
    task: Ref


EVENTS = (
    FrameworkRegistered,
    FrameworkReregistered,
    FrameworkRemoved,
    OfferMade,
    OfferRescinded,
    OfferDeclined,
    OfferAccepted,
    HostOffered,
    HostOfferEnded,
    TaskRunning,
    TaskFinished,
    TaskFailed,
)
COMMANDS = {
    "framework.register": FrameworkRegister,
    "framework.beat": FrameworkBeat,
    "offer.accept": OfferAccept,
    "offer.decline": OfferDecline,
    "task.update": TaskUpdate,
    "task.running": TaskRef,
}
