"""Command line: ssimae train | predict | evaluate | compare | report | export. The only module that parses argv and prints."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import re
import sys
import typing
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .config import PRESETS, Config, config_from_dict, load_config, preset_config
from .errors import SsimaeError

log = logging.getLogger("ssimae")


def _field_help() -> dict[str, str]:
    """The comment after each Config field, used as its --help text (one source of truth)."""
    source = inspect.getsource(Config)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): [^=]+=[^#\n]+#(.*)$", source, re.M)}


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One --flag per Config field; unset flags stay None so YAML and defaults show through."""
    hints = typing.get_type_hints(Config)
    helps = _field_help()
    group = parser.add_argument_group("settings (also settable in a YAML --config)")
    for field in dataclasses.fields(Config):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        text = f"{helps.get(field.name, '')} (default: {field.default})"
        if base is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, dest=field.name, type=base, default=None, help=text, metavar=base.__name__.upper())
    group.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help="named settings under --config and flags: paper (the defaults) or tuned")


def resolve_config(args: argparse.Namespace) -> Config:
    config = preset_config(getattr(args, "preset", None))
    if getattr(args, "config", None):
        config = load_config(args.config, config)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if getattr(args, f.name, None) is not None}
    return config_from_dict(overrides, config, source="command line").validate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssimae", description="Unsupervised defect segmentation with SSIM autoencoders.")
    parser.add_argument("--version", action="version", version=f"ssimae {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info messages")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", parents=[common], help="train a model on defect-free images")
    train.add_argument("dataset", type=Path, help="MVTec AD category folder, or a folder of defect-free images")
    train.add_argument("--output", "-o", type=Path, required=True, help="run folder for checkpoint.pt, config.yaml, logs")
    train.add_argument("--resume", action="store_true", help="continue the run in --output")
    add_config_flags(train)

    predict = commands.add_parser("predict", parents=[common], help="anomaly maps, masks, overlays and scores for images")
    predict.add_argument("checkpoint", type=Path)
    predict.add_argument("input", type=Path, help="an image file or a folder (searched recursively)")
    predict.add_argument("--output", "-o", type=Path, required=True)
    predict.add_argument("--threshold", type=float, help="override the checkpoint's threshold")
    _add_inference_flags(predict)

    evaluate = commands.add_parser("evaluate", parents=[common], help="pixel ROC AUC, AU-PRO and image AUROC on a test split")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("dataset", type=Path, help="MVTec AD category folder with test/ and ground_truth/")
    evaluate.add_argument("--output", "-o", type=Path, required=True)
    evaluate.add_argument("--save-maps", action="store_true", help="also write maps/<defect>/<name>.tiff")
    _add_inference_flags(evaluate)

    compare = commands.add_parser("compare", parents=[common],
                                  help="train and evaluate several methods with one budget; metrics, curves, HTML report")
    compare.add_argument("dataset", type=Path, help="MVTec AD category folder with train/good, test/ and ground_truth/")
    compare.add_argument("--methods", default="ssim-ae,l2-ae,vae,fm-ae", help="comma-separated (default: all four)")
    compare.add_argument("--checkpoints", help="reuse trained models instead of training: method=path,method=path")
    compare.add_argument("--output", "-o", type=Path, required=True,
                         help="folder for runs/<method>/, metrics.{md,csv,json}, roc.png, pro.png, examples/, report.html")
    add_config_flags(compare, skip=("method",))

    report = commands.add_parser("report", parents=[common], help="rebuild the figures and report.html of a compare run")
    report.add_argument("run_dir", type=Path, help="the --output folder of `ssimae compare`")

    export = commands.add_parser("export", parents=[common],
                                 help="ONNX model: patches -> reconstruction and residual map, settings in its metadata")
    export.add_argument("checkpoint", type=Path, help="a checkpoint.pt written by `ssimae train`")
    export.add_argument("--output", "-o", type=Path, required=True,
                        help="the .onnx file to write; run it with `ssimae predict model.onnx ... --backend onnxruntime`")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default: 17)")
    return parser


def _add_inference_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stride", type=int, help="sliding-window stride (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, help="patches per forward pass (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                        help="run patches with PyTorch or ONNX Runtime; onnxruntime also takes an exported .onnx "
                             "file as the checkpoint (default: torch)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                        help="torch backend: bf16 autocast for the network (auto = bf16 on CUDA, fp32 on CPU; "
                             "default: the checkpoint's setting)")


def _progress(args, desc: str):
    if args.quiet:
        return None
    return lambda items: tqdm(items, desc=desc, unit="image", dynamic_ncols=True)


def cmd_train(args) -> int:
    from .train import fit

    config = resolve_config(args)
    result = fit(config, args.dataset, args.output, resume=args.resume, progress=not args.quiet)
    print(f"trained {config.method} for {result.steps} steps ({result.seconds / 60:.1f} min); "
          f"threshold {result.threshold:.5f}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def cmd_predict(args) -> int:
    from .predict import load_detector, predict_folder

    detector = load_detector(args.checkpoint, args.device, args.stride, args.batch_size, args.backend, args.precision)
    rows = predict_folder(detector, args.input, args.output, args.threshold, _progress(args, "predict"))
    defective = sum(r["defective"] == "yes" for r in rows)
    print(f"{len(rows)} image(s), {defective} defective; maps, masks, overlays and scores.csv in {args.output}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_table
    from .predict import load_detector

    detector = load_detector(args.checkpoint, args.device, args.stride, args.batch_size, args.backend, args.precision)
    metrics = evaluate(detector, args.dataset, args.output, _progress(args, "evaluate"), args.save_maps)
    print(format_table(metrics))
    print(f"metrics: {Path(args.output) / 'metrics.json'}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare, parse_checkpoints, parse_methods
    from .report import metrics_markdown

    config = resolve_config(args)
    methods = parse_methods(args.methods)
    checkpoints = parse_checkpoints(args.checkpoints, methods)
    results = compare(config, args.dataset, args.output, methods, checkpoints, progress=not args.quiet,
                      image_progress=lambda desc: _progress(args, f"evaluate {desc}"))
    print(metrics_markdown(results), end="")
    print(f"report: {Path(args.output) / 'report.html'}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0


def cmd_export(args) -> int:
    from .export import export_onnx, read_metadata

    path = export_onnx(args.checkpoint, args.output, args.opset)
    meta = read_metadata(path)
    print(f"exported {meta['method']} ({meta['color']}, patch {meta['patch_size']}, stride {meta['stride']}, "
          f"threshold {meta['threshold'] or 'none'}) to {path}")
    return 0


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "compare": cmd_compare,
            "report": cmd_report, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.setLevel(logging.WARNING if args.quiet else logging.INFO)  # filter here: train.log still gets INFO
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return COMMANDS[args.command](args)
    except SsimaeError as error:
        print(f"ssimae: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssimae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
