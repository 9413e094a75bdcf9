"""`vfiomig conformance`: test one VFIO device's migration support against the uAPI.

Every check drives the device through ``vfiomig.host`` (the same bytes a VMM would send) and
compares what the kernel and the driver do with what the VFIO uAPI (linux/vfio.h) promises:
the migration FSM and its data fds, illegal and blocked transitions, PRECOPY_INFO,
MIG_DATA_SIZE, the end of the data stream, save/resume round trips, rejection of bad resume
streams, recovery through reset, DMA logging, and the P2P two-phase order. The device is a
real one (--device, with --device2 for the checks that resume on a second device) or one of
the model kernel (--model, which creates two).

Each check prints pass / fail / skip with its reason. Every check runs on devices opened for
it alone (and closed after it), so its verdict is the same with --check as in the full run.
On a real device the suite changes the device's migration state and resets it, so it refuses
to start without --yes. Checks that need to make the device DMA or to inject a fault run only
on the model and are skipped (with the reason) elsewhere. --model takes KIND,key=value,...
(QEMU's syntax; KIND:key=value,... still works); the kinds, their keys, the defects and the
checks are listed below.

The suite itself is the package ``vfiomig.conformance``; this module is its command line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

from vfiomig.conformance import (
    CHECK_NAMES,
    CHECKS,
    FAIL,
    ModelHooks,
    Target,
    kernel_release_at_least,
    render,
    run_suite,
    summary,
)
from vfiomig.host import LinuxTransport, ModelTransport, VfioError
from vfiomig.host.transport import IOMMUFD_PATH
from vfiomig.tools import helptext
from vfiomig.tools.options import (
    ModelSpec,
    add_iommu_hw_argument,
    arg_type,
    check_model_options,
    model_spec_arg,
    parse_size,
)
from vfiomig.tools.probe import build_model

# ------------------------------------------------------------------------------------------
# CLI


EXAMPLES = (
    ("vfiomig conformance --model reference", "the suite on the model's reference device"),
    (
        "vfiomig conformance --model reference --defect lossy_resume --check save-resume-roundtrip",
        "a defect, and the check that catches it",
    ),
    (
        "vfiomig conformance --device /dev/vfio/devices/vfio3 --device2 /dev/vfio/devices/vfio4 "
        "--yes",
        "two real VFs of one PF",
    ),
)

EXIT_STATUS = (
    (0, "every check passed, was skipped or reported a finding (and --list)"),
    (1, "a check failed, or a real device could not be set up"),
    (2, "usage error, or a real --device without --yes"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    helptext.apply(
        parser,
        __doc__ or "",
        [
            helptext.examples(*EXAMPLES),
            helptext.model_devices("--model"),
            helptext.defect_list("--defect NAME, repeatable, or defects=NAME+NAME in --model"),
            helptext.check_list(),
            helptext.exit_status(*EXIT_STATUS),
        ],
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--device", metavar="PATH", help="a VFIO cdev of this host (/dev/vfio/devices/vfioN)"
    )
    where.add_argument(
        "--model",
        metavar="KIND[,key=value,...]",
        type=model_spec_arg,
        help=f"a device of the model kernel ({', '.join(helptext.model_kinds())}; two are created)"
        " and its driver's options, e.g. reference,log_page_shift=16/21 (listed below)",
    )
    parser.add_argument(
        "--device2", metavar="PATH", help="a second device of the same kind (resume checks)"
    )
    parser.add_argument(
        "--iommufd", metavar="PATH", default=IOMMUFD_PATH, help="iommufd node (default %(default)s)"
    )
    parser.add_argument("--yes", action="store_true", help="allow changing a real device's state")
    parser.add_argument(
        "--blocked-arcs",
        action="store_true",
        help="try STOP_COPY -> PRE_COPY on a real kernel older than 7.2 (hangs one without the fix)",
    )
    add_iommu_hw_argument(parser)
    parser.add_argument(
        "--migration-flags", type=int, choices=(1, 3, 5, 7), help="model option migration_flags"
    )
    parser.add_argument("--dma-logging", type=int, choices=(0, 1), help="model option dma_logging")
    parser.add_argument(
        "--state-size",
        type=arg_type(parse_size),
        metavar="SIZE",
        help="model option state_size: bytes, or with a K/M/G suffix (powers of 1024)",
    )
    parser.add_argument(
        "--defect",
        action="append",
        default=[],
        metavar="NAME",
        help="inject a defect into the reference device (listed below); repeatable",
    )
    parser.add_argument(
        "--check",
        action="append",
        metavar="NAME",
        help="run only this check (listed below); repeatable",
    )
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


# The options that configure the model's reference device, as command-line flags.
REFERENCE_FLAGS = {
    "migration_flags": "--migration-flags",
    "dma_logging": "--dma-logging",
    "state_size": "--state-size",
    "defect": "--defect",
}


def target_from_args(args: argparse.Namespace) -> Target:
    """The device(s) the arguments name. ValueError for a combination that makes no sense."""
    given = [flag for key, flag in REFERENCE_FLAGS.items() if getattr(args, key) not in (None, [])]
    if args.device2 and not args.device:
        raise ValueError("--device2 goes with --device (a model always gets a second device)")
    if args.device and given:
        raise ValueError(
            f"{', '.join(given)}: options of the model's reference device, not of --device"
        )
    if args.model is not None and given and args.model.kind != "reference":
        kind = args.model.kind
        raise ValueError(
            f"{', '.join(given)}: options of the reference device, not of {kind} "
            f"(give {kind}'s own options as --model {kind},key=value)"
        )
    if args.device:
        return Target(
            LinuxTransport(),
            args.device,
            args.device2,
            iommufd_path=args.iommufd,
            label=args.device + (f" + {args.device2}" if args.device2 else ""),
            blocked_arcs_safe=args.blocked_arcs
            or kernel_release_at_least(platform.release(), 7, 2),
        )
    spec: ModelSpec = args.model
    opts = dict(spec.options)
    if args.migration_flags is not None:
        opts["migration_flags"] = args.migration_flags
    if args.dma_logging is not None:
        opts["dma_logging"] = bool(args.dma_logging)
    if args.state_size is not None:
        opts["state_size"] = args.state_size
    if args.defect:
        opts["defects"] = frozenset(opts.get("defects", frozenset())) | frozenset(args.defect)
    # Checked once here: ModelHooks adds more devices of this kind with these options.
    spec = ModelSpec(spec.kind, check_model_options(spec.kind, opts))
    k, (a, b) = build_model([spec, spec], args.iommu_hw)
    return Target(
        ModelTransport(k),
        a,
        b,
        label=f"model {spec.label()} ({args.iommu_hw})",
        model=ModelHooks(k, spec.kind, spec.options),
        host_page_size=4096,
    )


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name, doc, _ in CHECKS:
            print(f"{name:<28} {doc}")
        return 0
    if args.device is not None and not args.device.strip():
        print("vfiomig conformance: --device: empty path", file=sys.stderr)
        return 2
    if not args.device and not args.model:
        print(
            "vfiomig conformance: give --device PATH (a real device) or --model KIND",
            file=sys.stderr,
        )
        return 2
    if args.device and not args.yes:
        print(
            f"vfiomig conformance: this changes the migration state of {args.device} and resets it;"
            " no VM may use it. Run again with --yes to proceed.",
            file=sys.stderr,
        )
        return 2
    unknown = [c for c in args.check or [] if c not in CHECK_NAMES]
    if unknown:
        print(
            f"vfiomig conformance: unknown check(s) {', '.join(unknown)} (see --list)",
            file=sys.stderr,
        )
        return 2
    try:
        target = target_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"vfiomig conformance: {e}", file=sys.stderr)
        return 2
    except VfioError as e:
        print(f"vfiomig conformance: {e}", file=sys.stderr)
        return 1
    results = run_suite(target, args.check)
    if args.json:
        print(
            json.dumps(
                {
                    "target": target.label,
                    "results": [r.as_dict() for r in results],
                    "summary": summary(results),
                },
                indent=2,
            )
        )
    else:
        print(render(results, target.label))
    return 1 if any(r.status == FAIL for r in results) else 0


if __name__ == "__main__":  # pragma: no cover
    from vfiomig.cli import main

    sys.exit(main(["conformance", *sys.argv[1:]]))
