"""The migration thread: QEMU 10.0's pre-copy policy over the VFIO uAPI, in simulated time.

Follows migration/migration.c (migration_iteration_run, migration_update_counters,
migration_completion), migration/ram.c (the dirty bitmap, ram_save_iterate's rate limit and
MAX_WAIT, migration_bitmap_sync, auto-converge's trigger) and hw/vfio/migration.c (through
vmm.vfio). Time only moves when the engine spends it: sending bytes (the link's rate, or
max-bandwidth's 100 ms windows), scanning for zero pages, syncing dirty logs, device
transitions. While it moves, the guest runs (``World.advance``): vCPUs write RAM, devices
DMA through the IOMMU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from vfiomig.host import VfioError
from vfiomig.vmm import stream as st
from vfiomig.vmm.bitmap import PageBitmap
from vfiomig.vmm.channel import Channel, ChannelError
from vfiomig.vmm.dirty import IommufdHwpt, Tracker
from vfiomig.vmm.guest_ram import PAGE
from vfiomig.vmm.params import Params
from vfiomig.vmm.vm import Vm

if TYPE_CHECKING:
    from vfiomig.sim.costs import CostModel

BUFFER_DELAY = 0.1  # s: migration_update_counters' window (BUFFER_DELAY)
MAX_WAIT = 0.05  # s: ram_save_iterate returns after this long (MAX_WAIT)
DIRTY_RATE_PERIOD = 1.0  # s: migration_bitmap_sync's rate period
THROTTLE_SYNC_PERIOD = 5.0  # s: CPU_THROTTLE_DIRTY_SYNC_TIMESLICE_MS
NORMAL_WIRE = st.PAGE_HEADER + PAGE
# QEMUFile buffers this much before a flush, and the rate limiter only sees flushed bytes
# (migration_transferred_bytes): a window ends up to one buffer over its budget, and the
# measured bandwidth, so the threshold, includes that overshoot (migration/qemu-file.c).
IO_BUF_SIZE = 32768


class World(Protocol):
    """What runs while the migration spends time: the guest (vCPUs) and its devices."""

    now: float
    throttle: float

    def advance(self, dt: float) -> None: ...

    def stop_vcpus(self) -> None: ...

    def cpu_state(self) -> bytes: ...


class Cancelled(Exception):
    """``max_time`` passed: the user cancels (migrate_cancel), whatever step is running."""


@dataclass
class Stats:
    """query-migrate's counters (migration/migration.c populate_ram_info, ...)."""

    transferred: int = 0  # every byte of the stream as QEMU counts it
    ram_transferred: int = 0
    normal: int = 0
    duplicate: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    vfio_transferred: int = 0
    mbps: float = 0.0
    pages_per_second: float = 0.0
    expected_downtime: float = 0.0  # ms
    throttle_pct: int = 0
    iterations: int = 0  # pre-copy rounds: completed passes over the bitmap
    syncs_exact: int = 0
    dirty_bytes_last_sync: int = 0
    setup_time: float = 0.0
    total_time: float = 0.0
    downtime: float = 0.0
    sync_times: list[float] = field(default_factory=list)


class Migration:
    """One outgoing migration of ``src`` over ``channel``."""

    def __init__(
        self,
        src: Vm,
        channel: Channel,
        world: World,
        costs: CostModel,
        params: Params,
        *,
        tracker: str = "auto",
        max_time: float = 60.0,
        progress: Callable[[Migration], None] | None = None,
        dest_ack: Callable[[], float | None] | None = None,
        dest_busy: Callable[[], float] | None = None,
    ) -> None:
        self.src = src
        self.ram = src.ram
        self.channel = channel
        self.world = world
        self.costs = costs
        self.params = params
        self.tracker_choice = tracker
        self.max_time = max_time
        self.progress = progress
        self.dest_ack = dest_ack or (lambda: None)
        self.dest_busy = dest_busy or (lambda: world.now)
        # s->expected_downtime starts at the downtime limit (migrate_init)
        self.deadline = float("inf")
        self.stats = Stats(expected_downtime=float(params.downtime_limit))
        self.status = "setup"
        self.step = "setup"
        self.tracker: Tracker | None = None
        self.bmap = PageBitmap(self.ram.npages)
        self.cursor = 0
        self.threshold = 0.0
        self.bandwidth = 0.0
        self.window_start = 0.0
        self.window_bytes = 0
        self.window_first_byte = 0
        self.rate_limited = True
        self.vm_running = True
        self.devices = [pd.mig for pd in src.devices if pd.mig is not None]
        self.events: list[tuple[float, str]] = []
        self.start_time = 0.0
        self.period_start = 0.0
        self.period_dirty = 0
        self.period_xfer_start = 0
        self.dirty_rate_high_cnt = 0
        self.throttle_tick = 0.0
        self.throttle_tick_syncs = 0
        self.wall_start = time.perf_counter()
        self._last_wire = 0  # QEMU bytes of the last RAM section (paces the next)
        self.failed_step = ""
        self.failure: BaseException | None = None
        self.ram_digest_at_failure = ""

    # -- time -----------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.world.now

    def spend(self, dt: float) -> None:
        """Let ``dt`` seconds pass: the guest runs, windows close. Past the deadline the
        migration is cancelled where it stands (a send on a slow link is cut short)."""
        end = self.now + max(dt, 0.0)
        cancel = end > self.deadline
        end = min(end, self.deadline)
        while True:
            wend = self.window_start + BUFFER_DELAY
            if wend > end:
                break
            self.world.advance(wend - self.now)
            self._tick()
            self.update_counters()
        self.world.advance(end - self.now)
        self._tick()
        if cancel:
            raise Cancelled

    def _tick(self) -> None:
        """The auto-converge dirty-sync timer (cpu_throttle_dirty_sync_timer, QEMU >= 9.2)."""
        if not self.params.cap("auto-converge") or not self.vm_running:
            return
        if self.now - self.throttle_tick >= THROTTLE_SYNC_PERIOD:
            self.throttle_tick = self.now
            if self.stats.dirty_sync_count > 1 and self.stats.dirty_sync_count == (
                self.throttle_tick_syncs
            ):
                self.sync()
            self.throttle_tick_syncs = self.stats.dirty_sync_count

    def update_counters(self) -> None:
        """migration_update_counters, at the end of each >= 100 ms window."""
        elapsed = self.now - self.window_start
        if elapsed <= 0:
            return
        self.bandwidth = self.window_bytes / elapsed
        expected_bw = self.params.avail_switchover_bandwidth or self.bandwidth
        self.threshold = expected_bw * self.params.downtime_limit / 1000
        self.stats.mbps = self.bandwidth * 8 / 1e6
        if self.stats.dirty_pages_rate and self.window_bytes > 10000 and expected_bw:
            self.stats.expected_downtime = self.stats.dirty_bytes_last_sync / expected_bw * 1000
        self.window_start = self.now
        self.window_bytes = 0
        self.window_first_byte = self.stats.transferred // IO_BUF_SIZE * IO_BUF_SIZE
        if self.progress is not None and self.status == "active":
            self.progress(self)

    def rate_exceeded(self) -> bool:
        """migration_rate_exceeded: flushed bytes of this window over its budget."""
        if not self.rate_limited:
            return False
        flushed = self.stats.transferred // IO_BUF_SIZE * IO_BUF_SIZE
        return flushed - self.window_first_byte > self.params.max_bandwidth * BUFFER_DELAY

    def wait_window(self) -> None:
        """migration_rate_limit: sleep until the current window ends."""
        self.spend(self.window_start + BUFFER_DELAY - self.now)

    def account(self, wire: int, *, ram: bool) -> None:
        self.window_bytes += wire
        self.stats.transferred += wire
        if ram:
            self.stats.ram_transferred += wire
            if self.vm_running:
                self.stats.precopy_bytes += wire
            else:
                self.stats.downtime_bytes += wire
        # QEMU's vfio "transferred": the bytes read from the devices' data fds
        self.stats.vfio_transferred = sum(d.transferred for d in self.devices)

    # -- the whole migration ----------------------------------------------------------------

    def run(self) -> str:
        """Setup, pre-copy, completion. Returns the final status: completed, failed or
        cancelled (the source runs again after the last two)."""
        self.start_time = self.now
        self.deadline = self.start_time + self.max_time
        self.status = "setup"
        try:
            self.setup()
            self.status = "active"
            while not self.iteration():
                pass
            self.status = "completed"
            self.stats.total_time = self.now - self.start_time
            self.cleanup_source()
        except Cancelled:
            self.fail("cancelled", None)
        except (VfioError, ChannelError, st.StreamError, OSError) as e:
            self.fail("failed", e)
        return self.status

    def setup(self) -> None:
        """qemu_savevm_state_setup: dirty logging on, bitmap all dirty, devices to PRE_COPY;
        the setup sync makes dirty-sync-count 1."""
        self.step = "setup: dirty tracking start"
        self.tracker = self.src.tracker(self.tracker_choice)
        self.ram.logging = True
        self.tracker.start()
        self.bmap.set_all()
        self.stats.dirty_sync_count = 1
        self.step = "setup: device save_setup"
        for d in self.devices:
            self.send(st.Section(st.DEVICE, st.DEV_SETUP, self._idx(d)), 16, ram=False)
            d.save_setup()
            self.spend(self.costs.device_transition.value if d.precopy else 0.0)
        self.spend(self.costs.setup_fixed.value + self.costs.sync_time(self.ram.size))
        self.stats.setup_time = self.now - self.start_time
        self.window_start = self.now
        self.window_first_byte = self.stats.transferred // IO_BUF_SIZE * IO_BUF_SIZE
        self.period_start = self.now
        self.throttle_tick = self.now

    def _idx(self, d: Any) -> int:
        return self.devices.index(d)

    def iteration(self) -> bool:
        """migration_iteration_run; True when the migration completed."""
        pending = self.ram_remaining() + sum(d.pending_estimate() for d in self.devices)
        if pending < self.threshold:
            pending = self.pending_exact()
        if (not pending or pending < self.threshold) and self.can_switchover():
            self.complete()
            return True
        self.iterate()
        return False

    def ram_remaining(self) -> int:
        return self.bmap.count() * PAGE

    def pending_exact(self) -> int:
        """qemu_savevm_state_pending_exact: RAM syncs if its remainder is under the
        threshold; every device reports its stop-copy size."""
        self.stats.syncs_exact += 1
        if self.ram_remaining() < self.threshold:
            self.step = "pre-copy: dirty sync"
            self.sync()
        self.step = "pre-copy: device pending size"
        return self.ram_remaining() + sum(d.pending_exact() for d in self.devices)

    def can_switchover(self) -> bool:
        """migration_can_switchover: with switchover-ack, only once the destination ACKed."""
        if not self.params.cap("switchover-ack") or not any(d.precopy for d in self.devices):
            return True
        ack = self.dest_ack()
        if ack is None or ack > self.now:
            return False
        self.event("ack", ack)
        return True

    def iterate(self) -> None:
        """qemu_savevm_state_iterate: RAM first, then each VFIO device, while the window's
        budget lasts; then wait for the window if it is used up."""
        self.step = "pre-copy: RAM"
        ram_dry = self.ram_save_iterate()
        for d in self.devices:
            if self.rate_exceeded():
                break
            self.step = f"pre-copy: {d.name} read"
            self.vfio_save_iterate(d)
        if self.rate_exceeded():
            self.wait_window()
        elif ram_dry and not any(d.pending_estimate() for d in self.devices):
            # Nothing to send and not converged yet (a sync storm in QEMU): time still
            # passes by at least a sync's cost.
            self.spend(self.costs.sync_fixed.value)

    def ram_save_iterate(self) -> bool:
        """Send dirty pages until the rate limit, MAX_WAIT or the bitmap runs dry. True if
        it ran dry."""
        t0 = self.now
        per_page = float(NORMAL_WIRE)
        while not self.rate_exceeded() and self.now - t0 < MAX_WAIT:
            budget = self.params.max_bandwidth * BUFFER_DELAY - self.window_bytes + IO_BUF_SIZE
            time_left = MAX_WAIT - (self.now - t0)
            n_time = time_left / max(per_page / self.channel.rate, PAGE / self._scan_rate())
            n = int(max(1, min(budget / per_page, n_time)))
            sent = self.send_pages(n)
            if sent == 0:
                return True
            per_page = max(self._last_wire / sent, 1.0)
        return False

    def _scan_rate(self) -> float:
        return float(self.costs.zero_scan_rate.value)

    def send_pages(self, n: int) -> int:
        """Take up to ``n`` dirty pages from the cursor and send them as one section."""
        pages, cursor = self.bmap.take(self.cursor, n)
        if pages.size == 0:
            self._last_wire = 0
            return 0
        if not self.stats.iterations or cursor <= self.cursor or pages[0] < self.cursor:
            self.stats.iterations += 1  # the first pass over RAM, or the scan wrapped
        self.cursor = cursor
        wrap = np.flatnonzero(np.diff(pages) < 0)
        if wrap.size:  # a scan that wrapped returns [cursor, end) then [0, ...)
            k = int(wrap[0]) + 1
            pages = np.concatenate((pages[k:], pages[:k]))
        zero = self.ram.zero_mask(pages)
        nz = int(pages.size - zero.sum())
        versions = self.ram.versions[pages] if self.ram.versions is not None else None
        rows = self.ram.page_bytes(pages[~zero]) if nz else np.zeros((0, PAGE), np.uint8)
        wire = nz * NORMAL_WIRE + (pages.size - nz) * st.ZERO_PAGE_WIRE
        self.stats.normal += nz
        self.stats.duplicate += pages.size - nz
        self._last_wire = wire
        self.send(st.encode_ram(pages, zero, versions, rows), wire, ram=True)
        self.spend(max(wire / self.channel.rate, pages.size * PAGE / self._scan_rate()))
        return int(pages.size)

    def send(self, section: st.Section, wire: int, *, ram: bool) -> None:
        self.channel.send(section)
        self.account(wire, ram=ram)

    def vfio_save_iterate(self, d: Any) -> None:
        """vfio_save_iterate: one chunk; INIT_DATA_SENT once initial bytes are all out."""
        chunk = d.save_iterate()
        if chunk:
            self.send(
                st.Section(st.DEVICE, st.DEV_DATA, self._idx(d), chunk), len(chunk) + 16, ram=False
            )
            self.spend(len(chunk) / self.channel.rate)
        if (
            self.params.cap("switchover-ack")
            and d.precopy
            and not d.initial_data_sent
            and d.precopy_init_size == 0
        ):
            d.initial_data_sent = True
            self.event("init-data-sent")
            self.send(st.Section(st.DEVICE, st.DEV_INIT_DATA_SENT, self._idx(d)), 8, ram=False)

    # -- syncs and throttling ---------------------------------------------------------------

    def sync(self) -> None:
        """migration_bitmap_sync: KVM's log and the VFIO tracker into the bitmap."""
        assert self.tracker is not None
        before = self.bmap.count()
        self.bmap.or_bitmap(self.ram.dirty_log.fetch_and_clear())
        self.tracker.sync(self.bmap)
        new = self.bmap.count() - before
        self.stats.dirty_sync_count += 1
        self.stats.sync_times.append(self.now - self.start_time)
        self.period_dirty += new
        self.stats.dirty_bytes_last_sync = self.bmap.count() * PAGE
        self.spend(self._sync_cost())
        if self.now - self.period_start >= DIRTY_RATE_PERIOD:
            self._end_period()

    def _sync_cost(self) -> float:
        cost = self.costs.sync_time(self.ram.size)
        if isinstance(self.tracker, IommufdHwpt):
            leaf = (2 << 20) if self.src.hugepages else PAGE
            cost += len(self.tracker.hwpts) * self.costs.hwpt_read_time(self.ram.size, leaf)
        elif self.tracker is not None and self.tracker.name in ("device", "type1"):
            cost += self.ram.size * self.costs.device_log_pass.value
        return float(cost)

    def _end_period(self) -> None:
        """migration_update_rates and migration_trigger_throttle at a >= 1 s period's end."""
        span = self.now - self.period_start
        self.stats.dirty_pages_rate = int(self.period_dirty / span)
        xfer = self.stats.ram_transferred - self.period_xfer_start
        if self.params.cap("auto-converge") and self.vm_running:
            threshold = xfer * self.params.throttle_trigger_threshold / 100
            if self.period_dirty * PAGE > threshold:
                self.dirty_rate_high_cnt += 1
                if self.dirty_rate_high_cnt >= 2:
                    self.dirty_rate_high_cnt = 0
                    self.throttle_up(self.period_dirty * PAGE, threshold)
        self.period_start = self.now
        self.period_dirty = 0
        self.period_xfer_start = self.stats.ram_transferred

    def throttle_up(self, dirty: float, threshold: float) -> None:
        """mig_throttle_guest_down: initial, then +increment (tailslow scales it)."""
        p = self.params
        pct = self.stats.throttle_pct
        if pct == 0:
            pct = p.cpu_throttle_initial
        elif p.cpu_throttle_tailslow and threshold > 0:
            needed = 1.0 - threshold / dirty
            pct = min(
                pct + p.cpu_throttle_increment, max(pct, int(100 - (100 - pct) * (1 - needed)))
            )
        else:
            pct += p.cpu_throttle_increment
        self.stats.throttle_pct = min(pct, p.max_cpu_throttle)
        self.world.throttle = self.stats.throttle_pct / 100
        self.events.append((self.now - self.start_time, f"throttle {self.stats.throttle_pct}%"))

    # -- completion ---------------------------------------------------------------------------

    def complete(self) -> None:
        """migration_completion: stop the VM, final sync, the rest of RAM at the link's rate,
        each device's stop-copy data, config, CPU state, end of stream."""
        t_stop = self.now
        self.event("switchover")
        self.step = "switchover: stop vCPUs"
        self.world.stop_vcpus()
        self.vm_running = False
        self.rate_limited = False
        self.spend(self.costs.vcpu_stop.value)
        for d in reversed(self.devices):
            self.step = f"switchover: {d.name} -> P2P"
            d.switchover_prepare()
            self.spend(self.costs.device_transition.value if d.p2p else 0.0)
        for d in self.devices:
            self.step = f"switchover: {d.name} -> STOP_COPY"
            d.switchover()
            self.spend(self.costs.device_transition.value)
        self.step = "stop-copy: final dirty sync"
        self.sync()
        self.step = "stop-copy: RAM"
        while self.send_pages(max(1, int(self.channel.rate * BUFFER_DELAY) // NORMAL_WIRE)):
            pass
        for d in self.devices:
            self.step = f"stop-copy: {d.name} read"
            for chunk in d.save_complete():
                sec = st.Section(st.DEVICE, st.DEV_DATA, self._idx(d), chunk)
                self.send(sec, len(chunk) + 16, ram=False)
                self.spend(len(chunk) / self.channel.rate)
            self.send(st.Section(st.DEVICE, st.DEV_END, self._idx(d)), 8, ram=False)
        self.step = "stop-copy: config"
        for d in self.devices:
            self.send(st.Section(st.DEVICE, st.DEV_CONFIG, self._idx(d), d.config()), 64, ram=False)
        cpu = self.world.cpu_state()
        self.send(st.Section(st.CPU, payload=cpu), len(cpu), ram=False)
        self.send(st.Section(st.EOS), 8, ram=False)
        self.spend(self.channel.latency)
        if self.params.cap("return-path"):
            # close_return_path_on_source waits for the destination's SHUT: its load counts.
            self.spend(max(0.0, self.dest_busy() - self.now) + self.channel.latency)
        self.stats.downtime = self.now - t_stop

    def cleanup_source(self) -> None:
        """migration_cleanup after success: devices STOP_COPY -> STOP, logging off. The
        source VM stays stopped (postmigrate)."""
        self.step = "cleanup"
        for d in self.devices:
            d.cleanup()
        self.stop_tracking()

    def stop_tracking(self) -> None:
        self.ram.logging = False
        if self.tracker is not None:
            try:
                self.tracker.stop()
            except VfioError:
                pass  # log_global_stop's errors are reported, not fatal (QEMU warns)

    def fail(self, status: str, cause: BaseException | None) -> None:
        """migrate_fd_cleanup on error or cancel: devices back to RUNNING (reset where a
        transition fails), tracking stopped, the VM running again."""
        self.failed_step = self.step
        self.failure = cause
        self.status = status
        self.ram_digest_at_failure = self.ram.digest()
        self.stats.total_time = self.now - self.start_time
        for d in self.devices:
            try:
                d.recover()
            except VfioError as e:  # even the reset failed: report, keep going
                self.events.append((self.now - self.start_time, f"{d.name}: {e}"))
        self.stop_tracking()
        self.vm_running = True

    def event(self, what: str, when: float | None = None) -> None:
        """Note a moment of the migration (seconds from its start) for reports and tests."""
        t = self.now if when is None else when
        if what not in (w for _, w in self.events):
            self.events.append((t - self.start_time, what))

    def wall_time(self) -> float:
        return time.perf_counter() - self.wall_start
