"""Engine settings and the plain records the engine hands out."""
from __future__ import annotations

from dataclasses import dataclass

from .memory import Address

__all__ = ["EngineConfig", "EngineStatistics", "Message", "NATIVE_FIELDS"]

NATIVE_FIELDS = frozenset(
    "msg_size recv_slots send_slots max_ops sq_slots eq_slots spin_us wait_spin_us idle_ms direct_post "
    "max_peers stripe_threshold poll_pause_ns".split()
)  # lock_timeout is native too, as lock_timeout_ms (opener.py)


@dataclass(frozen=True)
class EngineConfig:
    """Engine-wide settings (all optional).

    msg_size: largest two-sided message frame in bytes (the payload limit is
        this minus the sender's address, see ``TransferEngine.max_message_size``).
    spin_us: how long the worker keeps polling after the last activity before
        it blocks; idle_ms: the longest it blocks (progress runs this often).
    wait_spin_us: on providers that cannot wake a blocked thread (shm, rxd),
        how long the worker keeps polling after the last activity while a task
        awaits a counter or a message (after that it polls every <= 1 ms).
    direct_post: post from the calling thread instead of handing work to the
        worker (see docs/design.md for the measurement behind the default).
    loop_spin_us: while a task awaits a counter or a message, the event loop
        also polls the provider and the completion ring (between its other
        callbacks) for this long after the last completion before it relies on
        the eventfd alone; trades CPU for latency (0: off).
    close_timeout: seconds ``aclose()`` lets operations in flight finish
        before it fails them.
    max_peers: how many peer engines this engine can address.
    peer_timeout: seconds within which a failed peer is detected: when a
        peer's oldest operation makes no progress, a zero-byte probe is
        written to it, and a peer that does not answer it within
        peer_timeout is declared failed (a peer on this host whose process
        exited is detected at the next check, every peer_timeout / 6).  Must
        exceed the longest time one operation may legitimately take on one
        path; ``float("inf")`` turns detection off.  See docs/failures.md.
    stripe_threshold: a single write of at least this many bytes to a peer
        reached over several NIC paths is split into one shard per path
        (shards rounded up to 4 KiB).  It still delivers exactly one
        immediate: the shards go first and a zero-byte write carrying the
        immediate follows once all of them are delivered (see docs/multi-nic.md).
    lock_timeout: seconds the event loop waits for the worker's provider lock
        (register, deregister, a new peer) before it raises
        ProviderStuckError, and that closing waits for the worker to stop
        before it abandons the engine: a provider call that never returns
        (libfabric 1.17 shm on a killed peer) must not hang the loop.  See
        docs/failures.md.
    """

    msg_size: int = 65536
    recv_slots: int = 64
    send_slots: int = 64
    max_ops: int = 4096
    sq_slots: int = 1 << 16
    eq_slots: int = 1 << 16
    spin_us: int = 20000
    wait_spin_us: int = 20000
    idle_ms: int = 10
    direct_post: bool = False
    loop_spin_us: int = 200
    close_timeout: float = 2.0
    max_peers: int = 4096
    poll_pause_ns: int = 0
    peer_timeout: float = 3.0
    stripe_threshold: int = 256 * 1024
    lock_timeout: float = 5.0


@dataclass(frozen=True)
class EngineStatistics:
    """A snapshot of an engine's counts (``engine.statistics()``)."""

    provider: str
    bytes_per_nic: tuple[int, ...]
    writes_posted: int
    bytes_posted: int
    sends_posted: int
    completions: int
    errors: int
    imms_received: int
    msgs_received: int
    eagain: int
    worker_sleeps: int
    worker_wakeups: int
    ops_in_flight: int
    queued: int
    pending_futures: int
    regions: int
    messages_waiting: int
    failed_peers: int
    #: the provider refused FI_DELIVERY_COMPLETE, so a striped write's trailing
    #: immediate follows the shards' plain local completion (docs/multi-nic.md)
    fence_unconfirmed: bool = False
    #: sends to failed peers whose message slots were replaced (docs/failures.md)
    sends_written_off: int = 0


@dataclass(frozen=True)
class Message:
    """A two-sided message: who sent it and its bytes."""

    sender: Address
    data: bytes
