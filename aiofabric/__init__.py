"""aiofabric: asyncio-first point-to-point RDMA transfers over libfabric.

One-sided writes with 32-bit immediates, counted at the target by credit
counters; no ordering assumed anywhere.  See docs/concepts.md.
"""
from ._lib import fabric_version
from .counters import CounterStatistics, ImmCounter
from .config import EngineConfig, EngineStatistics, Message
from .engine import TransferEngine
from .opener import open_engine
from .errors import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    CompletionError,
    FabricError,
    ProtocolError,
    ProviderStuckError,
    RegistrationError,
    RemoteAccessError,
    UnavailableError,
)
from .memory import Address, MemoryRegion, RegionDescriptor, RegionView
from .providers import ProviderInfo, default_provider, list_providers
from .watcher import SlotChanges, Watcher, WatcherStatistics

__version__ = "0.1.0"

__all__ = [
    "Address",
    "BrokenResourceError",
    "BusyResourceError",
    "ClosedResourceError",
    "CompletionError",
    "CounterStatistics",
    "EngineConfig",
    "EngineStatistics",
    "FabricError",
    "ImmCounter",
    "MemoryRegion",
    "Message",
    "ProtocolError",
    "ProviderInfo",
    "ProviderStuckError",
    "RegionDescriptor",
    "RegionView",
    "RegistrationError",
    "RemoteAccessError",
    "TransferEngine",
    "UnavailableError",
    "SlotChanges",
    "Watcher",
    "WatcherStatistics",
    "default_provider",
    "fabric_version",
    "list_providers",
    "open_engine",
]
