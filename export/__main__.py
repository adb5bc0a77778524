"""Command line: `python -m export {tiny,onnx,config,tensorrt,style} ...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from export.errors import ExportError


def _add_tiny(sub: argparse._SubParsersAction) -> None:
    tiny = sub.add_parser(
        "tiny", help="write a deterministic tiny Stable Diffusion (random weights)"
    )
    tiny.add_argument("--out", type=Path, required=True, help="folder to write the pipeline to")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.add_argument(
        "--architecture",
        choices=["tiny", "sd15"],
        default="tiny",
        help="sd15: Stable Diffusion 1.5's shapes (3.4 GB UNet), for GPU work",
    )


def _add_onnx(sub: argparse._SubParsersAction) -> None:
    onnx = sub.add_parser("onnx", help="export a pipeline to ONNX into a Triton model repository")
    onnx.add_argument("--model", required=True, help="diffusers folder or model hub id")
    onnx.add_argument("--repository", type=Path, default=Path("model_repository"))
    onnx.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest allowed |ONNX Runtime - torch| per component",
    )
    onnx.add_argument("--opset", type=int, default=None)
    onnx.add_argument(
        "--torch-only",
        action="store_true",
        help="publish the diffusers copy for the torch runtime without ONNX files",
    )


def _add_config(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser(
        "config",
        help="write configs/exported.pbtxt: config.pbtxt + overrides + the manifest's values",
    )
    config.add_argument("--repository", type=Path, default=Path("model_repository"))
    config.add_argument("--model-name", default="stable_diffusion")
    config.add_argument("--runtime", help="onnxruntime, onnxruntime_cuda, ...")
    config.add_argument("--instance-kind", choices=["KIND_CPU", "KIND_GPU"])
    config.add_argument("--instances", type=int)
    config.add_argument("--max-batch-size", type=int)
    config.add_argument("--max-queue-delay-us", type=int)
    config.add_argument("--parameter", action="append", default=[], metavar="KEY=VALUE")


def _add_tensorrt(sub: argparse._SubParsersAction) -> None:
    trt = sub.add_parser(
        "tensorrt",
        help="build fp16 TensorRT engines for this GPU into the published weights' engines/",
    )
    trt.add_argument("--repository", type=Path, default=Path("model_repository"))
    trt.add_argument("--model-name", default="stable_diffusion")
    trt.add_argument(
        "--max-batch-size", type=int, help="largest batch (default: the model config's)"
    )
    trt.add_argument("--opt-batch", type=int, help="batch TensorRT tunes for (default 4)")
    sizes = trt.add_mutually_exclusive_group()
    sizes.add_argument(
        "--sizes", help="one profile per WIDTHxHEIGHT, e.g. 512x512,768x768 (fastest engines)"
    )
    sizes.add_argument("--min-size", type=int, help="one dynamic profile from this size")
    trt.add_argument("--max-size", type=int, help="... to this size (default: the config's)")
    trt.add_argument("--timing-cache", type=Path, help="default var/tensorrt/timing.<gpu>.cache")
    trt.add_argument("--workspace-gib", type=float, default=4.0)
    trt.add_argument(
        "--refittable",
        action="store_true",
        help="UNet and text encoder engines whose weights the model can refit (studio styles)",
    )
    trt.add_argument(
        "--dry-run",
        action="store_true",
        help="print the optimisation profiles that would be built; needs no TensorRT",
    )


def _add_style(sub: argparse._SubParsersAction) -> None:
    style = sub.add_parser(
        "style", help="studio styles (LoRA safetensors) checked against the exported model"
    )
    actions = style.add_subparsers(dest="style_command", required=True)
    add = actions.add_parser("add", help="check a LoRA and publish it as a style")
    add.add_argument("--name", required=True, help="the style's name, as requests give it")
    add.add_argument(
        "--file", type=Path, required=True, help="LoRA safetensors (diffusers/PEFT or kohya)"
    )
    remove = actions.add_parser("remove", help="unpublish a style")
    remove.add_argument("--name", required=True)
    actions.add_parser("list", help="the published styles' manifests")
    for action in (add, remove, actions.choices["list"]):
        action.add_argument("--repository", type=Path, default=Path("model_repository"))


def parser() -> argparse.ArgumentParser:
    """The command line's parser, one subcommand per export step."""
    root = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    for add in (_add_tiny, _add_onnx, _add_config, _add_tensorrt, _add_style):
        add(sub)
    return root


def run_tiny(args: argparse.Namespace) -> None:
    """`tiny`: write the deterministic tiny pipeline and print its folder."""
    from export.tiny import write_tiny

    print(write_tiny(args.out, seed=args.seed, architecture=args.architecture))


def run_onnx(args: argparse.Namespace) -> None:
    """`onnx`: export, check, publish; print the model identity and the parity measured."""
    from export.onnx_export import DEFAULT_OPSET, DEFAULT_TOLERANCE, export_onnx

    manifest = export_onnx(
        args.model,
        args.repository,
        tolerance=args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE,
        opset=args.opset or DEFAULT_OPSET,
        torch_only=args.torch_only,
    )
    print(json.dumps({"model": manifest["model"], "parity": manifest["parity"]}, indent=2))


def run_config(args: argparse.Namespace) -> None:
    """`config`: write configs/exported.pbtxt and print its path."""
    from export.triton_config import ConfigOverrides, write_exported_config

    parameters = {}
    for item in args.parameter:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ExportError(f"--parameter {item!r} is not KEY=VALUE")
        parameters[key] = value
    overrides = ConfigOverrides(
        runtime=args.runtime,
        instance_kind=args.instance_kind,
        instances=args.instances,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        parameters=parameters,
    )
    print(write_exported_config(args.repository / args.model_name, overrides))


def run_tensorrt(args: argparse.Namespace) -> None:
    """`tensorrt`: build the engines (or, dry, plan their profiles) and print the result."""
    from export.tensorrt_build import build_engines, dry_run, plan_engines
    from export.tensorrt_profiles import parse_sizes

    if args.sizes and args.max_size is not None:
        raise ExportError("--max-size goes with --min-size, not with --sizes")
    planned = plan_engines(
        args.repository,
        model_name=args.model_name,
        max_batch_size=args.max_batch_size,
        sizes=parse_sizes(args.sizes) if args.sizes else None,
        min_size=args.min_size,
        max_size=args.max_size,
        opt_batch=args.opt_batch,
    )
    if args.dry_run:
        result = dry_run(planned)
    else:
        result = build_engines(
            planned,
            timing_cache=args.timing_cache,
            workspace_gib=args.workspace_gib,
            refittable=args.refittable,
        )
    print(json.dumps(result, indent=2))


def run_style(args: argparse.Namespace) -> None:
    """`style add|list|remove`: print the added style's manifest, the list, or the name."""
    from export.styles import add_style, list_styles, remove_style

    if args.style_command == "add":
        print(json.dumps(add_style(args.repository, args.name, args.file), indent=2))
    elif args.style_command == "list":
        print(json.dumps(list_styles(args.repository), indent=2))
    else:
        remove_style(args.repository, args.name)
        print(f"removed style {args.name}")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "tiny": run_tiny,
    "onnx": run_onnx,
    "config": run_config,
    "tensorrt": run_tensorrt,
    "style": run_style,
}


def main(argv: list[str] | None = None) -> int:
    """Run one export command; 2 (and the reason on stderr) for a problem the user can fix."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        COMMANDS[args.command](args)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
