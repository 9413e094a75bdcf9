"""`vfiomig probe`: see what a host offers for live migration with VFIO devices.

For each VFIO device: its IOMMU (type, dirty-tracking capability), its migration flags
(STOP_COPY, P2P, PRE_COPY), the migration state, MIG_DATA_SIZE, whether PRECOPY_INFOv2 can
be enabled, and whether the device can log its own DMA (and at what page size). For the
host: iommufd (/dev/iommu, VFIO cdevs) or only the legacy type1 container. With --model it
probes devices of the model kernel instead, and it shows the model's devices on a host that
has no VFIO at all.

Probing opens each device and binds it to a fresh iommufd; to learn the DMA-logging page
size it attaches the device to an empty IOAS and starts and stops logging. It never changes
the migration state. A device another process holds (a running VM) answers EBUSY and is
listed as such. --model takes KIND,key=value,... (QEMU's syntax; KIND:key=value,... still
works); the kinds and their keys are listed below.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from collections.abc import Sequence
from errno import EACCES, EBUSY, ENOENT, ENOTTY, EPERM
from typing import Any

from vfiomig.host import (
    Container,
    Iommufd,
    LinuxTransport,
    ModelTransport,
    Transport,
    VfioDevice,
    VfioError,
)
from vfiomig.host.device import GET, SET, flag_names, state_name
from vfiomig.host.errors import errno_name
from vfiomig.host.transport import (
    IOMMUFD_PATH,
    VFIO_CONTAINER_PATH,
    VFIO_DEVICES_DIR,
    VFIO_DIR,
)
from vfiomig.hw.iommu import VENDORS
from vfiomig.tools import helptext
from vfiomig.tools.options import (
    ModelSpec,
    add_iommu_hw_argument,
    check_model_options,
    model_spec_arg,
)
from vfiomig.tools.options import (  # re-exported: the names probe has always offered
    parse_model_spec as parse_model_spec,
)
from vfiomig.uapi import vfio as v

IOMMU_CHOICES = VENDORS  # the model's IOMMUs (--iommu-hw)

DEFAULT_MODEL_DEVICES = ("mtty", "hisi_acc", "reference")

# The range the probe asks a device to log, only to learn the page size it negotiates.
LOG_PROBE_RANGE = (1 << 30, 1 << 30)


# ------------------------------------------------------------------------------------------
# model devices (their KIND,key=value specs are parsed and checked in vfiomig.tools.options)


def build_model(specs: Sequence[ModelSpec], iommu: str = "smmuv3") -> tuple[Any, list[str]]:
    """A ModelKernel with one device per spec; returns (kernel, cdev paths).

    ValueError (a usage error) for an unknown kind, an unknown option or a bad value."""
    from vfiomig.kernel import ModelKernel

    checked = [check_model_options(s.kind, s.options) for s in specs]
    k = ModelKernel(iommu=iommu)
    paths = []
    for s, opts in zip(specs, checked, strict=True):
        try:
            paths.append(k.add_device(s.kind, **opts))
        except MemoryError:
            raise ValueError(f"{s.label()}: this machine cannot hold that device") from None
        except (ValueError, TypeError) as e:  # the driver refuses a value (and names it)
            raise ValueError(str(e)) from None
    return k, paths


# ------------------------------------------------------------------------------------------
# probing


def _err(e: VfioError) -> str:
    return f"{e.op}: {errno_name(e.errno or 0)}"


def probe_device(t: Transport, path: str, iommufd_path: str = IOMMUFD_PATH) -> dict[str, Any]:
    """Everything the probe reports about one VFIO cdev."""
    out: dict[str, Any] = {"path": path}
    out.update(t.describe(path))
    try:
        ictx = Iommufd(t, iommufd_path)
    except VfioError as e:
        out["error"] = _err(e)
        return out
    with ictx:
        try:
            dev = VfioDevice(t, path)
        except VfioError as e:
            hint = {
                EBUSY: "in use (a VM or another process has it open)",
                EACCES: "permission denied",
                EPERM: "permission denied",
                ENOENT: "no such device",
            }.get(e.errno or 0, "")
            out["error"] = _err(e) + (f" - {hint}" if hint else "")
            return out
        with dev:
            try:
                dev_id = dev.bind(ictx)
            except VfioError as e:
                out["error"] = _err(e)
                return out
            out.update(_probe_bound(ictx, dev, dev_id))
    return out


def _probe_bound(ictx: Iommufd, dev: VfioDevice, dev_id: int) -> dict[str, Any]:
    out: dict[str, Any] = {"dev_id": dev_id}
    try:
        info = dev.info()
        out["bus"] = info.bus
        out["reset"] = info.can_reset
    except VfioError as e:
        out["info_error"] = _err(e)
    try:
        hw = ictx.hw_info(dev_id)
        out["iommu"] = {"type": hw.type_name, "dirty_tracking": hw.dirty_tracking}
    except VfioError as e:
        if e.errno == ENOENT:
            # An emulated device (mdev such as mtty) binds as an iommufd ACCESS, not a
            # DEVICE: there is no IOMMU behind it to ask.
            out["iommu"] = {"type": "emulated", "dirty_tracking": False}
        else:
            out["iommu"] = {"error": _err(e)}

    mig: dict[str, Any] = {}
    try:
        flags = int(dev.migration_flags())
    except VfioError as e:
        mig["supported"] = False
        if e.errno != ENOTTY:
            mig["error"] = _err(e)
        out["migration"] = mig
        flags = 0
    else:
        mig.update(supported=True, flags=flags, flag_names=flag_names(flags))
        try:
            mig["state"] = state_name(dev.get_state())
        except VfioError as e:
            mig["state_error"] = _err(e)
        try:
            mig["data_size"] = dev.mig_data_size()
        except VfioError as e:
            mig["data_size_error"] = _err(e)
        mig["precopy_info_v2"] = dev.supports(v.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2, SET)
        out["migration"] = mig

    log: dict[str, Any] = {}
    err = dev.probe_feature(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, SET)
    log["supported"] = err == 0
    if err and err != ENOTTY:
        log["error"] = f"DMA_LOGGING_START PROBE: {errno_name(err)}"
    if err == 0:
        log["report"] = dev.supports(v.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, GET)
        log.update(_log_page_size(ictx, dev))
    out["dma_logging"] = log
    return out


def _log_page_size(ictx: Iommufd, dev: VfioDevice) -> dict[str, Any]:
    """Attach to an empty IOAS, start logging at 4 KiB, read what the device chose, stop."""
    try:
        with ictx.ioas_alloc() as ioas:
            dev.attach(ioas)
            try:
                page = dev.dma_logging_start([LOG_PROBE_RANGE], 4096)
                dev.dma_logging_stop()
            finally:
                dev.detach()
    except VfioError as e:
        return {"page_size_error": _err(e)}
    return {"page_size": page}


def is_iommufd(t: Transport, path: str) -> bool:
    """Does ``path`` exist and answer as iommufd (IOMMU_IOAS_ALLOC succeeds)? A node that is
    not one (e.g. /dev/null) answers ENOTTY."""
    if not t.exists(path):
        return False
    try:
        with Iommufd(t, path) as ictx:
            ictx.ioas_alloc().destroy()
    except VfioError as e:
        # ENOTTY: the node is something else; any other answer (permissions, a busy or
        # half-working iommufd) still makes it an iommufd node to report
        return e.errno != errno.ENOTTY
    return True


def probe_host(
    t: Transport,
    devices: Sequence[str] | None = None,
    iommufd_path: str = IOMMUFD_PATH,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The host summary and one entry per device (all VFIO cdevs when ``devices`` is None)."""
    host: dict[str, Any] = {
        "transport": t.name,
        "iommufd": is_iommufd(t, iommufd_path),
        "vfio_cdevs": t.exists(VFIO_DEVICES_DIR),
        "legacy_container": t.exists(VFIO_CONTAINER_PATH),
    }
    if host["legacy_container"]:
        host["type1"] = _probe_type1(t)
    groups = [g for g in t.listdir(VFIO_DIR) if g.isdigit()]
    host["groups"] = groups
    if devices is None:
        devices = [f"{VFIO_DEVICES_DIR}/{n}" for n in t.listdir(VFIO_DEVICES_DIR)]
    if host["iommufd"] and host["vfio_cdevs"]:
        host["access"] = "iommufd"
    elif host["legacy_container"]:
        host["access"] = "type1 only"
    else:
        host["access"] = "none"
    entries = []
    for path in devices:
        entry: dict[str, Any]
        if not t.exists(path):
            entry = {"path": path, "error": "no such device node"}
        elif host["iommufd"]:
            try:
                entry = probe_device(t, path, iommufd_path)
            except Exception as e:  # not the kernel's answer (an OSError) but a bug below
                entry = {"path": path, "error": _internal(e), "internal_error": True}
        else:
            entry = {
                "path": path,
                "error": f"{iommufd_path} "
                + ("is not an iommufd" if t.exists(iommufd_path) else "missing")
                + ": per-device details need iommufd",
            }
        if labels and path in labels:
            entry["model"] = labels[path]
        entries.append(entry)
    host["devices"] = entries
    return host


def _internal(e: Exception) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"internal error: {type(e).__name__}: {e}{where}"


def _probe_type1(t: Transport) -> dict[str, Any]:
    try:
        with Container(t) as c:
            return {
                "api_version": c.api_version(),
                "type1v2": bool(c.check_extension(v.VFIO_TYPE1v2_IOMMU)),
                "type1": bool(c.check_extension(v.VFIO_TYPE1_IOMMU)),
            }
    except VfioError as e:
        return {"error": _err(e)}


def linux_has_vfio(t: Transport, iommufd_path: str = IOMMUFD_PATH) -> bool:
    """VFIO cdevs, the legacy container or the iommufd node (``--iommufd``) exist."""
    return t.exists(VFIO_DEVICES_DIR) or t.exists(VFIO_CONTAINER_PATH) or t.exists(iommufd_path)


# ------------------------------------------------------------------------------------------
# output


def _yes(b: Any) -> str:
    return "yes" if b else "no"


def render_table(report: dict[str, Any]) -> str:
    lines: list[str] = []
    head = f"transport: {report['transport']}   access: {report['access']}"
    head += f"   iommufd: {_yes(report['iommufd'])}   legacy container: "
    t1 = report.get("type1")
    if not report["legacy_container"]:
        head += "no"
    elif t1 and "error" not in t1:
        head += "type1v2" if t1.get("type1v2") else ("type1" if t1.get("type1") else "no type1")
    else:
        head += f"yes ({t1.get('error') if t1 else '?'})"
    if report.get("note"):
        lines.append(report["note"])
    lines.append(head)
    cols = [
        "DEVICE",
        "IOMMU",
        "IOMMU DIRTY",
        "MIGRATION",
        "STATE",
        "DATA SIZE",
        "PRECOPYv2",
        "DMA LOG",
    ]
    rows: list[list[str]] = []
    notes: list[str] = []
    for d in report["devices"]:
        name = d["path"]
        extra = d.get("model") or d.get("driver") or ""
        if d.get("address"):
            extra = f"{d['address']} {extra}".strip()
        if extra:
            name += f" ({extra})"
        if "error" in d:
            rows.append([name, "-", "-", "-", "-", "-", "-", "-"])
            notes.append(f"{d['path']}: {d['error']}")
            continue
        iommu = d.get("iommu", {})
        mig = d.get("migration", {})
        log = d.get("dma_logging", {})
        if mig.get("supported"):
            migs = "|".join(mig["flag_names"]) or "0"
            state = mig.get("state", "?")
            size = str(mig.get("data_size", "?"))
            v2 = _yes(mig.get("precopy_info_v2"))
        else:
            migs, state, size, v2 = "no", "-", "-", "-"
        if log.get("supported"):
            logs = f"yes, {log['page_size']:#x}" if "page_size" in log else "yes"
        else:
            logs = "no"
        rows.append(
            [
                name,
                iommu.get("type", iommu.get("error", "?")),
                _yes(iommu.get("dirty_tracking")) if "type" in iommu else "?",
                migs,
                state,
                size,
                v2,
                logs,
            ]
        )
        for key in ("info_error", "page_size_error"):
            if key in d or key in log:
                notes.append(f"{d['path']}: {d.get(key) or log.get(key)}")
    if not rows:
        lines.append("no VFIO devices")
    else:
        widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
        for r in [cols, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lines.extend(notes)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# CLI


EXAMPLES = (
    ("vfiomig probe", "this host; the model's devices if it has no VFIO"),
    ("vfiomig probe --device /dev/vfio/devices/vfio0 --json", "one device, for scripts"),
    (
        "vfiomig probe --model hisi_acc --model reference,migration_flags=5,dma_logging=0 "
        "--iommu-hw vtd",
        "two model devices, one with options, behind the Intel VT-d model",
    ),
)

EXIT_STATUS = (
    (0, "probed (a device found by listing that cannot be probed, e.g. in use, is reported)"),
    (1, "a device named with --device cannot be probed, or a model device failed internally"),
    (2, "usage error: a bad option or --model spec (the message names it), --device with --model"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    helptext.apply(
        parser,
        __doc__ or "",
        [
            helptext.examples(*EXAMPLES),
            helptext.model_devices("--model"),
            helptext.defect_list("defects=NAME+NAME in --model reference,..."),
            helptext.exit_status(*EXIT_STATUS),
        ],
    )
    parser.add_argument(
        "--device",
        action="append",
        metavar="PATH",
        default=[],
        help="a VFIO cdev of this host (/dev/vfio/devices/vfioN); repeatable (default: all)",
    )
    parser.add_argument(
        "--iommufd", metavar="PATH", default=IOMMUFD_PATH, help="iommufd node (default %(default)s)"
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="KIND[,key=value,...]",
        type=model_spec_arg,
        default=[],
        help=f"probe a model kernel with this device instead ({', '.join(helptext.model_kinds())})"
        " and its driver's options, e.g. reference,migration_flags=5 (listed below); repeatable",
    )
    add_iommu_hw_argument(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    devices: list[str] = args.device
    specs: list[ModelSpec] = args.model
    if devices and specs:
        print("vfiomig probe: use --device or --model, not both", file=sys.stderr)
        return 2
    note = ""
    if not specs:
        linux = LinuxTransport()
        if devices or linux_has_vfio(linux, args.iommufd):
            report = probe_host(linux, devices or None, args.iommufd)
            code = _emit(report, args.json)
            # A device asked for by name that could not be probed is a failure; one found
            # by listing (a VM's device answers EBUSY) is only reported.
            if devices and any("error" in d for d in report["devices"]):
                return 1
            return code
        note = (
            f"No VFIO on this host ({VFIO_DEVICES_DIR}, {args.iommufd} and "
            f"{VFIO_CONTAINER_PATH} are absent); showing the model kernel's devices."
        )
        specs = [ModelSpec(k, {}) for k in DEFAULT_MODEL_DEVICES]
    try:
        k, paths = build_model(specs, args.iommu_hw)
    except (ValueError, TypeError) as e:
        print(f"vfiomig probe: bad --model: {e}", file=sys.stderr)
        return 2
    labels = {p: s.label() for p, s in zip(paths, specs, strict=True)}
    report = probe_host(ModelTransport(k), paths, IOMMUFD_PATH, labels)
    report["iommu_model"] = args.iommu_hw
    if note:
        report["note"] = note
    code = _emit(report, args.json)
    return 1 if any(d.get("internal_error") for d in report["devices"]) else code


def _emit(report: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_table(report))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from vfiomig.cli import main

    sys.exit(main(["probe", *sys.argv[1:]]))
