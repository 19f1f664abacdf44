"""Command line: ssimae train | predict | evaluate | compare | report | export. The only module that parses argv and prints.

Every setting flag is derived from a Config field (name, type, help text from the field's comment,
allowed values from config.CHOICES); predict and evaluate get the fields that may change after
training (config.INFERENCE_SETTINGS). An error about a setting names the flag the user typed.
Exit codes: 0 done; 1 predict finished but some images could not be read (errors.csv); 2 a user
error (one line on stderr, nothing half-written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import logging
import re
import sys
import warnings
from pathlib import Path

from tqdm import tqdm

from . import __version__, distributed
from .config import BACKENDS, CHOICES, INFERENCE_SETTINGS, PRESETS, Config, config_from_dict, load_config, \
    preset_config, setting_type
from .errors import SettingError, SsimaeError
from .methods import COMPARED

log = logging.getLogger("ssimae")
TYPED = "_typed_flags"  # namespace attribute: setting name -> the flag the user typed for it


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """argparse's usage errors on one line, like every other user error."""
        where = "" if self.prog == "ssimae" else f"{self.prog}: "  # the top parser's name is the prefix already
        self.exit(2, f"ssimae: error: {where}{message}; see `{self.prog} --help`\n")

    def parse_args(self, args=None, namespace=None):
        """argparse's own, except that an unknown option after a command is that command's error, with
        its help to see (argparse leaves the extras to the top parser, which names only itself)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            owner = commands.get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _without_abbreviations(add_parser):
    def add(*args, **kwargs):
        return add_parser(*args, allow_abbrev=False, **kwargs)

    return add


def _recording(base: type[argparse.Action]) -> type[argparse.Action]:
    """An argparse action that also records which option string set its destination."""

    class Recording(base):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            typed = getattr(namespace, TYPED, None) or {}
            typed[self.dest] = option_string
            setattr(namespace, TYPED, typed)

    return Recording


_STORE, _BOOLEAN = _recording(argparse._StoreAction), _recording(argparse.BooleanOptionalAction)


def _field_help() -> dict[str, str]:
    """The comment after each Config field, used as its --help text (one source of truth)."""
    source = inspect.getsource(Config)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): [^=]+=[^#\n]+#(.*)$", source, re.M)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser, names, title: str, aliases: dict[str, str] | None = None,
                      defaults_from: str = "") -> None:
    """One --flag per named Config field; unset flags stay None so YAML, presets and defaults show through."""
    helps = _field_help()
    group = parser.add_argument_group(title)
    for name in names:
        kind, _ = setting_type(name)
        field = Config.__dataclass_fields__[name]
        text = helps.get(name, "")
        if name in CHOICES:
            text = f"{' | '.join(CHOICES[name])}{text[text.find(':'):] if ':' in text else ''}"
        text += f" (default: {defaults_from or field.default})"
        flags = [_flag(name)] + ([aliases[name]] if aliases and name in aliases else [])
        if kind is bool:
            group.add_argument(*flags, dest=name, action=_BOOLEAN, default=None, help=text)
        else:
            group.add_argument(*flags, dest=name, action=_STORE, type=_typed(kind, name), default=None, help=text,
                               metavar=kind.__name__.upper())


def _typed(kind: type, name: str):
    """A flag's value converter with a short message (argparse prefixes it with the flag)."""

    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None

    convert.__name__ = kind.__name__
    return convert


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    add_setting_flags(parser, [f.name for f in dataclasses.fields(Config) if f.name not in skip],
                      "settings (also settable in a YAML --config)")
    parser.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="named settings under --config and flags: paper (the paper's protocol: no L2 warm-up, "
                             "the min-area threshold rule, the map maximum as image score) or tuned (an L2 warm-up "
                             "for every method, maps smoothed with sigma 2)")


def resolve_config(args: argparse.Namespace) -> Config:
    config = preset_config(getattr(args, "preset", None))
    if getattr(args, "config", None):
        config = load_config(args.config, config)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if getattr(args, f.name, None) is not None}
    try:
        return config_from_dict(overrides, config, source="command line").validate()
    except SettingError as error:
        if error.setting in overrides or not getattr(args, "config", None):
            raise
        # Not typed, so from the YAML file (presets hold valid values): name the file to edit.
        raise SettingError(error.setting, f"config file {args.config}: {error}", source=str(args.config)) from None


def inference_overrides(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in INFERENCE_SETTINGS if getattr(args, name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a mistyped flag must be an error, not silently another flag (--strid -> --stride).
    parser = _Parser(prog="ssimae", description="Unsupervised defect segmentation with SSIM autoencoders.",
                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"ssimae {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info messages")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser = _without_abbreviations(commands.add_parser)

    train = commands.add_parser("train", parents=[common], help="train a model on defect-free images")
    train.add_argument("dataset", type=Path, help="MVTec AD category folder, or a folder of defect-free images")
    train.add_argument("--output", "-o", type=Path, required=True, help="run folder for checkpoint.pt, config.yaml, logs")
    train.add_argument("--resume", action="store_true", help="continue the run in --output")
    add_config_flags(train)

    predict = commands.add_parser("predict", parents=[common], help="anomaly maps, masks, overlays and scores for images")
    predict.add_argument("checkpoint", type=Path)
    predict.add_argument("input", type=Path, help="an image file or a folder (searched recursively)")
    predict.add_argument("--output", "-o", type=Path, required=True)
    predict.add_argument("--threshold", action=_STORE, type=_typed(float, "threshold"),
                         help="override the checkpoint's threshold")
    predict.add_argument("--strict", action="store_true",
                         help="stop at the first unreadable image (default: skip it, list it in errors.csv, exit 1)")
    predict.add_argument("--outputs",
                         help="the per-image files to write, comma-separated: maps (TIFF), masks (PNG), overlays "
                              "(PNG; the slowest to write), or none for scores.csv alone (default: all three)")
    _add_inference_flags(predict)

    evaluate = commands.add_parser("evaluate", parents=[common], help="pixel ROC AUC, AU-PRO and image AUROC on a test split")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("dataset", type=Path, help="MVTec AD category folder with test/ and ground_truth/")
    evaluate.add_argument("--output", "-o", type=Path, required=True)
    evaluate.add_argument("--save-maps", action="store_true", help="also write maps/<defect>/<name>.tiff")
    evaluate.add_argument("--threshold", action=_STORE, type=_typed(float, "threshold"),
                          help="override the checkpoint's threshold")
    _add_inference_flags(evaluate)

    compare = commands.add_parser("compare", parents=[common],
                                  help="train and evaluate several methods with one budget; metrics, curves, HTML report")
    compare.add_argument("dataset", type=Path, help="MVTec AD category folder with train/good, test/ and ground_truth/")
    compare.add_argument("--methods", default=",".join(COMPARED),
                         help=f"comma-separated (default: {','.join(COMPARED)}: the paper's four, PatchCore and the "
                              "no-network floor)")
    compare.add_argument("--checkpoints", help="reuse trained models instead of training: method=path,method=path")
    compare.add_argument("--output", "-o", type=Path, required=True,
                         help="folder for runs/<method>/, metrics.{md,csv,json}, roc.png, pro.png, examples/, report.html")
    add_config_flags(compare, skip=("method",))

    report = commands.add_parser("report", parents=[common], help="rebuild the figures and report.html of a compare run")
    report.add_argument("run_dir", type=Path, help="the --output folder of `ssimae compare`")

    export = commands.add_parser("export", parents=[common],
                                 help="ONNX model: the network part of the detector, settings in its metadata")
    export.add_argument("checkpoint", type=Path, help="a checkpoint.pt written by `ssimae train`")
    export.add_argument("--output", "-o", type=Path, required=True,
                        help="the .onnx file to write; run it with `ssimae predict model.onnx ... --backend onnxruntime`")
    export.add_argument("--opset", type=_typed(int, "opset"), default=17, help="ONNX opset, 17 or newer (default: 17)")
    return parser


def _add_inference_flags(parser: argparse.ArgumentParser) -> None:
    add_setting_flags(parser, INFERENCE_SETTINGS, "inference settings (default: the checkpoint's)",
                      aliases={"infer_batch_size": "--batch-size"}, defaults_from="the checkpoint's; device: auto")
    parser.add_argument("--backend", default="torch",
                        help=f"{' | '.join(BACKENDS)}: run the network with PyTorch or ONNX Runtime; onnxruntime also "
                             "takes an exported .onnx file as the checkpoint (default: torch)")


def _progress(args, desc: str):
    if args.quiet:
        return None
    return lambda items: tqdm(items, desc=desc, unit="image", dynamic_ncols=True)


def cmd_train(args) -> int:
    from .train import fit

    config = resolve_config(args)
    rank = distributed.setup(config.device)
    result = fit(config, args.dataset, args.output, resume=args.resume, progress=not args.quiet)
    if rank.main:
        print(f"trained {config.method} for {result.steps} steps ({result.seconds / 60:.1f} min); "
              f"threshold {result.threshold:.5f}")
        print(f"checkpoint: {result.checkpoint}")
    return 0


def _detector(args, rank: distributed.Rank = distributed.Rank()):
    from .detector import load_detector

    overrides = inference_overrides(args)
    overrides["device"] = distributed.device_for(rank, overrides.get("device", "auto"))
    return load_detector(args.checkpoint, args.backend, overrides, args.threshold)


def cmd_predict(args) -> int:
    from .predict import parse_outputs, predict_folder

    outputs = parse_outputs(args.outputs)
    rank = distributed.setup(getattr(args, "device", None) or "auto")
    progress = _progress(args, "predict") if rank.main else None
    result = predict_folder(_detector(args, rank), args.input, args.output, args.threshold, progress,
                            strict=args.strict, rank=rank, outputs=outputs)
    if not rank.main:
        return 0
    defective = sum(r["defective"] == "yes" for r in result.rows)
    written = ", ".join(outputs) + " and scores.csv" if outputs else "scores.csv"
    print(f"{len(result.rows)} image(s), {defective} defective; {written} in {args.output}")
    if result.errors:
        print(f"ssimae: {len(result.errors)} image(s) could not be read and were skipped (first: {result.errors[0][0]}); "
              f"see {Path(args.output) / 'errors.csv'}", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_table

    metrics = evaluate(_detector(args), args.dataset, args.output, _progress(args, "evaluate"), args.save_maps,
                       args.threshold)
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
    from .export import export_onnx
    from .onnx_backend import load_onnx

    path = export_onnx(args.checkpoint, args.output, args.opset)
    loaded = load_onnx(path)
    config = loaded.config
    print(f"exported {config.method} ({config.color}, patch {config.patch_size}, stride {config.stride}, "
          f"threshold {loaded.threshold if loaded.threshold is not None else 'none'}) to {path}")
    return 0


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "compare": cmd_compare,
            "report": cmd_report, "export": cmd_export}
DISTRIBUTED_COMMANDS = ("train", "predict")  # the commands that run under torchrun


def _setting_message(error: SettingError, args: argparse.Namespace) -> str:
    """The error text with the setting's name replaced by the flag the user typed for it."""
    text = str(error)
    flag = (getattr(args, TYPED, None) or {}).get(error.setting)
    if flag is None or error.source is not None:  # a value from a file is named as the file spells it
        return text
    for spelling in (error.setting, error.setting.replace("_", " ")):
        if spelling in text:
            return text.replace(spelling, flag, 1)
    return f"{flag}: {text}"


def _out_of_memory(error: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, torch's OutOfMemoryError (CUDA) or its CPU allocator's error."""
    text = str(error)
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or \
        "can't allocate memory" in text or "out of memory" in text.lower()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # a usage error was printed on one line; --help and --version exit 0
        if exit.code == 2:
            return 2
        raise
    # Pillow warns (with its source line) about damaged files it still decodes; the image's own
    # error, if any, is the one line the user needs.
    warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.setLevel(logging.WARNING if args.quiet else logging.INFO)  # filter here: train.log still gets INFO
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    rank = distributed.launched()
    if rank.rank:  # only the main process reports progress; the others say only what goes wrong
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter(f"%(levelname)s (rank {rank.rank}): %(message)s"))
    try:
        if rank.distributed and args.command not in DISTRIBUTED_COMMANDS:
            raise SsimaeError(f"`ssimae {args.command}` runs in one process; start it without torchrun "
                              f"(torchrun runs {' and '.join(DISTRIBUTED_COMMANDS)})")
        return COMMANDS[args.command](args)
    except SettingError as error:
        print(f"ssimae: error: {_setting_message(error, args)}", file=sys.stderr)
        return 2
    except SsimaeError as error:
        print(f"ssimae: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the file system refused: read-only, full disk, a file where a folder should be
        where = f" {error.filename}" if error.filename else ""
        fix = "free some space on its disk" if error.errno == errno.ENOSPC else "check the path and its permissions"
        print(f"ssimae: error: cannot write or read{where}: {error.strerror or error}; {fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssimae: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if _out_of_memory(error):  # settings too large for this machine: a user error, not a bug
            reason = str(error).splitlines()[0][:160] if str(error).strip() else type(error).__name__
            print(f"ssimae: error: out of memory ({reason}); use a smaller --batch-size, --infer-batch-size "
                  "or --image-size", file=sys.stderr)
            return 2
        if not distributed.lost_contact(error):
            raise  # a bug: the traceback is what a report needs
        print(f"ssimae: error: rank {rank.rank}: lost contact with the other processes ({str(error).splitlines()[0]}); "
              "see the first failing rank's message", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
