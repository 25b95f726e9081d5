"""The timm-anysize command line: list, show and check variants, export and push them, convert checkpoints, run
scripts with the variants registered, and run the digits demo.

Every command sees what "import timm_anysize" registers (the shipped variants and the files of $TIMM_ANYSIZE_CONFIGS)
plus the YAML files given with -c/--config; "timm-anysize list" shows exactly that. The demo's digits variants
(vit_digits_*) are registered by "demo" and "train-digits-base" only (elsewhere: -c with the demo's digits.yaml).
Every error is one line on stderr and exit status 1 (2 for a usage error); --debug shows the traceback.
Reference: docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

import timm
import torch
import yaml

import timm_anysize
from timm_anysize.apps.demo import metrics_from_demo, run_demo
from timm_anysize.apps.digits import DEMO_CONFIG, train_digits_base
from timm_anysize.apps.docs import families_markdown
from timm_anysize.apps.launcher import run_script, script_path
from timm_anysize.apps.survey import run_survey
from timm_anysize.calibration import calibrate, save_calibrated
from timm_anysize.convert import convert_checkpoint
from timm_anysize.core.errors import AnysizeError, one_line
from timm_anysize.core.geometry import Geometry
from timm_anysize.core.memory import format_bytes, memory_budget
from timm_anysize.core.spec import VariantSpec, parse_variant
from timm_anysize.core.variant_plan import VariantPlan
from timm_anysize.hub import export, push_to_hub
from timm_anysize.origins import config_geometry, read_layout
from timm_anysize.plan import make_plan
from timm_anysize.preflight import weight_source_problems
from timm_anysize.registry import CONFIGS_ENV, check_name, register_yaml
from timm_anysize.schema import yaml_json_schema, yaml_reference_markdown
from timm_anysize.weight_files import detect_format, read_checkpoint, transformers_config
from timm_anysize.yaml_config import load_yaml_specs

__all__ = ["main", "build_parser"]

PROG = "timm-anysize"


def _variant(name: str) -> VariantSpec:
    """A registered variant; an unknown name says how to register one's own YAML."""
    try:
        return timm_anysize.get_variant(name)
    except (KeyError, AnysizeError) as e:  # KeyError today; an AnysizeError subclass would say the same
        hint = f"a variant of your own YAML: -c FILE.yaml, or list the file in ${CONFIGS_ENV}"
        if name.startswith("vit_digits_"):
            hint = f"the demo's digits variants: -c {DEMO_CONFIG}"
        raise AnysizeError(f"{one_line(e)} ({hint})") from e


def _weights(spec: VariantSpec) -> dict[str, str]:
    src = spec.pretrained
    if src.file:
        return {"source": "file", "location": str(src.file)}
    if src.hf_hub_id:
        return {"source": "hf-hub", "location": src.hf_hub_id}
    if src.url:
        return {"source": "url", "location": src.url}
    return {"source": "base", "location": spec.base}


def _geometry(g: Geometry) -> dict[str, Any]:
    pair = lambda v: list(v) if v is not None else None  # noqa: E731
    return {
        "img_size": pair(g.img_size),
        "patch_size": pair(g.patch_size),
        "grid_size": pair(g.grid_size),
        "num_prefix_tokens": g.num_prefix_tokens,
        "in_chans": g.in_chans,
        "num_classes": g.num_classes,
    }


def _cmd_list(args: argparse.Namespace) -> int:
    rows, table = [], []
    for name in timm_anysize.list_variants():
        spec = timm_anysize.get_variant(name)
        try:
            plan: Optional[VariantPlan] = make_plan(spec)
            error = None
        except AnysizeError as e:  # registered unplanned (validate=False): its error is for `check`, not the listing
            plan, error = None, one_line(e)
        weights = _weights(spec)
        rows.append(
            {
                "name": name,
                "base": spec.base,
                "origin": spec.origin,
                "geometry": _geometry(plan.target) if plan else None,
                "dynamic": plan.dynamic if plan else None,
                "weights": weights,
                "error": error,
            }
        )
        invalid = f"invalid ({PROG} check {spec.origin})" if spec.origin else "invalid"
        where = (
            f"base tag ({spec.base})" if weights["source"] == "base" else f"{weights['source']} {weights['location']}"
        )
        table.append((name, spec.base, plan.target.compact() if plan else invalid, where))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    widths = [max(len(r[i]) for r in table + [("name", "base", "geometry", "weights")]) for i in range(3)]
    print(f"{'name':<{widths[0]}}  {'base':<{widths[1]}}  {'geometry':<{widths[2]}}  weights")
    for r in table:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    return 0


def _as_written(value: object, key: str = "") -> object:
    """A spec dump as one would write it: a square ``img_size``/``patch_size`` pair as one number."""
    if isinstance(value, dict):
        return {k: _as_written(v, k) for k, v in value.items()}
    if key in ("img_size", "patch_size") and isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return value


class _WrittenDumper(yaml.SafeDumper):
    """A safe YAML dumper that writes mappings as blocks and lists inline (``img_size: [224, 320]``)."""


_WrittenDumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _layout(spec: VariantSpec) -> Optional[dict[str, Any]]:
    """The checkpoint layout and its key mapping, when the variant names a local file (nothing is built)."""
    file = spec.pretrained.file
    if file is None or not file.exists() or detect_format(file) == "npz":
        return None
    _, wrappers, conv = read_layout(read_checkpoint(file), spec.pretrained.layout, spec.pretrained.select, str(file))
    return {
        "layout": conv.layout if conv else "timm",
        "unwrapped": list(wrappers),
        "mapping": [{"key": key, "from": how} for key, how in conv.key_mapping()] if conv else [],
        "dropped": dict(conv.dropped) if conv else {},
    }


def _cmd_show(args: argparse.Namespace) -> int:
    spec = _variant(args.name)
    plan = make_plan(spec)
    if args.all or args.json:  # every field, defaults included (JSON: the keys it sets, sizes as [H, W])
        data = json.loads(spec.model_dump_json(exclude_defaults=False, exclude_unset=not args.all))
    else:  # the keys the variant sets, as its YAML (or register_variant call) said them
        data = _as_written(spec.model_dump(mode="json", exclude_unset=True))
    data.pop("name", None)
    over_budget = plan.cost is not None and plan.cost.total > memory_budget()[0]
    layout = _layout(spec)
    if args.json:
        shown = {
            "name": spec.name,
            "origin": spec.origin,
            "spec": data,
            "family": plan.family.name,
            "source": _geometry(plan.source),
            "target": _geometry(plan.target),
            "dynamic": plan.dynamic,
            "memory": None
            if plan.cost is None
            else {
                "float32_bytes": plan.cost.total,
                "bfloat16_bytes": plan.cost.total_in(torch.bfloat16),
                "over_budget": over_budget,
                "description": plan.cost.describe(),
            },
            "adaptation": [{"key": key, "how": what} for key, what in plan.steps()],
            "checkpoint": layout,
        }
        print(json.dumps(shown, indent=2))
        return 0
    print(f"# {spec.name}  (from {spec.origin or 'Python: register_variant'})")
    if args.all:
        print(yaml.safe_dump({spec.name: data}, sort_keys=False).rstrip())
    else:
        print(yaml.dump({spec.name: data}, Dumper=_WrittenDumper, sort_keys=False, width=1000).rstrip())
    print("\n# resolved (no weights read)")
    print(f"family: {plan.family.name}")
    print(f"source: {plan.source.describe()}")
    print(f"target: {plan.target.describe()}")
    (h, w) = plan.target.img_size
    fixed = f"no: timm's own model, at {h}x{w} only"
    print(f"dynamic: {'yes: any input size' if plan.dynamic else fixed}")
    if plan.cost is not None:
        print(f"memory: {plan.cost.describe()}")
        if over_budget:  # accepted because it fits in half precision
            half = format_bytes(plan.cost.total_in(torch.bfloat16))
            print(f"  over this machine's budget in float32: build it with dtype=torch.bfloat16 (~{half})")
    print("adaptation:")
    steps = plan.steps()
    for key, what in steps:
        print(f"  {key}: {what}")
    print("  every other tensor: copied" if steps else "  every tensor copied (same geometry)")
    if layout is not None:
        print(
            f"\n# checkpoint layout: {layout['layout']}"
            + (f" (unwrapped: {'; '.join(layout['unwrapped'])})" if layout["unwrapped"] else "")
        )
        for row in layout["mapping"]:
            print(f"  {row['key']} <- {row['from']}")
        for key, why in layout["dropped"].items():
            print(f"  dropped {key}: {why}")
    return 0


# The keys of the spec `convert` builds from its arguments, as the user gave them (longest first).
_CONVERT_ARGS = {
    "pretrained.img_size": "--img-size",
    "pretrained.patch_size": "--patch-size",
    "pretrained.layout": "--layout",
    "pretrained.select": "--select",
    "pretrained.file": "FILE",
    "model_args": "--model-args",
    "img_size": "--img-size",
    "patch_size": "--patch-size",
    "base": "--base",
}


def _convert_error(message: str, name: str, file: str) -> str:
    """An error about the spec ``convert`` built, in the user's terms: its arguments, not the spec's keys.

    Example:
        >>> _convert_error("<dict>: tv.base: unknown timm model 'x'", "tv", "tv.pth")
        "--base: unknown timm model 'x'"
        >>> _convert_error("<dict>: tv: unknown pretrained.layout 'x'", "tv", "tv.pth")
        "tv.pth: unknown --layout 'x'"
    """
    message = message.replace(f"<dict>: {name}.", "").replace(f"<dict>: {name}: ", f"{file}: ")
    for key, arg in _CONVERT_ARGS.items():
        message = re.sub(rf"(?<![\w.-]){re.escape(key)}\b", arg, message)
    return message


def _cmd_convert(args: argparse.Namespace) -> int:
    file = Path(args.file).resolve()
    if not file.exists():
        raise AnysizeError(f"{args.file}: no such file or folder")
    try:
        model_args = json.loads(args.model_args or "{}")
    except ValueError as e:
        raise AnysizeError(f"--model-args: not JSON ({e}): {args.model_args}") from e
    if not isinstance(model_args, dict):
        raise AnysizeError(f"--model-args: a JSON object of timm model arguments, got {args.model_args}")
    name = "convert_" + re.sub(r"[^a-z0-9_]", "_", file.stem.lower())  # what the adaptation's log lines say
    try:
        sd = read_layout(read_checkpoint(file), args.layout, args.select, str(file)).state_dict
        head = sd.get("head.weight", sd.get("head.fc.weight"))
        stated = config_geometry(transformers_config(file))
        source: dict = {
            "file": str(file),
            "layout": args.layout,
            "select": args.select,
            "num_classes": int(head.shape[0]) if head is not None else 0,
        }
        for key, value in (
            ("img_size", args.img_size or stated.get("img_size")),
            ("patch_size", args.patch_size or stated.get("patch_size")),
        ):
            if value:
                source[key] = value
        geometry = {k: source[k] for k in ("img_size", "patch_size", "num_classes") if k in source}
        del sd, head  # only shapes were read; the conversion streams the file tensor by tensor
        spec = parse_variant(
            name, dict(base=args.base, pretrained=source, dynamic=False, model_args=model_args, **geometry)
        )
        out = Path(args.to or file.with_name(file.stem + "_timm.safetensors"))
        report = convert_checkpoint(spec, out)
    except AnysizeError as e:
        raise type(e)(_convert_error(str(e), name, args.file)) from e
    out.with_suffix(".report.json").write_text(json.dumps(report.shareable().to_dict(), indent=2))  # no local path
    print(report.summary())
    print(
        f"wrote {out} and {out.with_suffix('.report.json')} (plain timm: timm.create_model({args.base!r}, "
        f"pretrained_cfg_overlay=dict(file={str(out)!r}), ...geometry above)"
    )
    return 0


def _check_specs(specs: Sequence[VariantSpec]) -> list[str]:
    """One line per problem of each spec: its name (a registered one is its own), its geometry (the plan), its
    weight source."""
    problems = []
    for spec in specs:
        try:
            check_name(spec, {})
            plan = make_plan(spec)
        except AnysizeError as e:
            problems += str(e).splitlines()
            continue
        problems += weight_source_problems(spec, plan)
    return problems


def _names_in(paths: Sequence[str]) -> set[str]:
    """The variant names the YAML files ``paths`` define (a file that does not load defines none here: checking it
    reports why)."""
    names: set[str] = set()
    for path in paths:
        try:
            names.update(spec.name for spec in load_yaml_specs(path))
        except AnysizeError:
            pass
    return names


def _cmd_check(args: argparse.Namespace) -> int:
    env = [p for p in os.environ.get(CONFIGS_ENV, "").split(os.pathsep) if p]
    targets = list(dict.fromkeys([*args.targets, *args.config, *env]))  # in order, once each
    if not targets:
        _usage_error(args, f"name YAML files or variants to check (or list files in ${CONFIGS_ENV})")
    failed = 0
    in_config = _names_in(args.config)
    for target in targets:
        is_file = target.endswith((".yaml", ".yml")) or os.sep in target or Path(target).is_file()
        if not is_file and target in in_config:
            continue  # a variant of a -c file: checked with its file below, not looked up among the registered
        try:
            specs = load_yaml_specs(target) if is_file else [_variant(target)]
        except AnysizeError as e:
            failed += 1
            lines = str(e).splitlines()  # one per variant with a problem, each naming the file; else one in all
            lines = lines if all(line.startswith(f"{target}: ") for line in lines) else [one_line(e)]
            suffix = f" (from ${CONFIGS_ENV})" if target in env else ""
            print("\n".join(line + suffix for line in lines), file=sys.stderr)
            continue
        problems = _check_specs(specs)
        if problems:
            failed += 1
            print("\n".join(problems), file=sys.stderr)
        elif is_file:
            print(f"{target}: ok ({len(specs)} variants: {', '.join(s.name for s in specs)})")
        else:
            print(f"{target}: ok")
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(out_dir=args.out, epochs=args.epochs, quick=args.quick, progress=not args.quiet)
    return 0


def _cmd_train_digits_base(args: argparse.Namespace) -> int:
    acc, losses = train_digits_base(args.out, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    print(f"held-out accuracy {acc:.2f}% after {args.epochs} epochs (final loss {losses[-1]:.4f}); saved {args.out}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    spec = _variant(args.name)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise AnysizeError(
            f"--out {args.out}: the calibrated weights are written as safetensors; end it in .safetensors"
        )
    images = Path(args.images)
    if not images.is_dir():
        raise AnysizeError(f"--images {args.images}: no such folder; pass a folder of image files (any nesting)")
    model = timm.create_model(spec.name, pretrained=True)
    report = calibrate(
        model,
        images,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        patch_sizes=args.patch_sizes,
        img_sizes=args.img_sizes,
        trainable=args.trainable,
        seed=args.seed,
        progress=not args.quiet,
    )
    save_calibrated(model, report, out)
    print(report.summary())
    # the file states its geometry in its metadata: named as the variant's weights, every tensor is copied
    print(f"wrote {out} and its report; to load it as the variant's weights:")
    print(f"  timm.create_model({spec.name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={str(out)!r}))")
    print(f"  or, in the variant's YAML: pretrained: {json.dumps({'file': out.name})}  (the file beside the YAML)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _variant(args.name)
    metrics = metrics_from_demo(args.demo_results, args.name)
    out = export(args.name, args.out_dir, file=args.file, overwrite=args.overwrite, metrics=metrics)
    if metrics:
        print(f"model card includes {len(metrics)} fidelity results from {args.demo_results}")
    print(f"exported {args.name} to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    print(f"load it with plain timm: timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    _variant(args.name)
    result = push_to_hub(args.name, args.repo_id, private=args.private, file=args.file, dry_run=args.dry_run)
    if args.dry_run:
        print(f"dry run: would create {'private ' if args.private else ''}repo {args.repo_id} and upload:")
        for name in result["files"]:
            print(f"  {name}")
        if not result["weights_loaded"]:
            print(f"weights: {result['weights']}, not downloaded in a dry run (the card lists the planned steps)")
        print("\n--- README.md ---")
        print(result["card"])
    else:
        print(f"pushed {args.name} to {args.repo_id}: {result['commit_url']}")
    return 0


class _ScriptFailed(Exception):
    """Raised around an exception of a script run by `timm-anysize run`, so main() re-raises it untouched."""


def _cmd_run(args: argparse.Namespace) -> int:
    script_path(args.script)  # a missing script is our one-line error; what the script raises is its own
    try:
        run_script(args.script, args.args)
    except SystemExit as e:  # the script's own exit status is ours
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # the script's own errors keep their traceback, as under `python script.py`
        raise _ScriptFailed() from e
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    if args.markdown:
        print(yaml_reference_markdown(), end="")
    else:
        print(json.dumps(yaml_json_schema(), indent=2))
    return 0


def _cmd_families(args: argparse.Namespace) -> int:
    if args.refresh:  # recompute the survey of every timm module (minutes), then render
        run_survey(log=lambda line: print(line, file=sys.stderr))
    print(families_markdown(), end="")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (and exit status 2), naming where to find the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    """An argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, got {text!r}")
    return value


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    print(f"{PROG} {args.command}: error: {message} (see {PROG} {args.command} --help)", file=sys.stderr)
    raise SystemExit(2)


def _global_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every command takes, before or after its name (SUPPRESS: a later parser does not reset them)."""
    group = parser.add_argument_group("global options")
    group.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or INFO logs"
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="timm-anysize's DEBUG logs too (each new input size a model's caches meet, with their hit rate)",
    )
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="FILE.yaml",
        help="register the variants of this YAML file first (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``timm-anysize``.

    Example:
        >>> args = build_parser().parse_args(["show", "vit_tiny_patch4_64", "-q", "-c", "a.yaml", "--config", "b.yaml"])
        >>> args.command, args.name, args.quiet, args.config
        ('show', 'vit_tiny_patch4_64', True, ['a.yaml', 'b.yaml'])
    """
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {timm_anysize.__version__}", help="print the version"
    )
    _global_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")

    def command(name: str, help: str, config: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".")
        _global_flags(p)
        if config:
            _config_flag(p)
        return p

    p = command("list", "the registered variants with base, geometry and weight source", config=True)
    p.add_argument("--json", action="store_true", help="a JSON list of objects (fields: docs/cli.md)")
    p = command(
        "show",
        "a variant as written, its geometries, memory estimate and adaptation plan (no weights read)",
        config=True,
    )
    p.add_argument("name", help="a registered variant name")
    p.add_argument("--all", action="store_true", help="every field of the spec, defaults included")
    p.add_argument("--json", action="store_true", help="a JSON object (fields: docs/cli.md)")
    p = command(
        "check",
        "check YAML files or registered variants without building them: the geometry, the name, the weight file, "
        f"the Hub id, a config.json beside the weights (and the files of ${CONFIGS_ENV}); exit 1 with one line "
        "per problem",
        config=True,
    )
    p.add_argument(
        "targets", nargs="*", metavar="FILE.yaml|NAME", help="a variant YAML file or a registered variant name"
    )
    p = command("demo", "adapt a digits ViT to many geometries and print the fidelity table")
    p.add_argument("--out", default="anysize-demo", help="output folder for results.json and the plot")
    p.add_argument("--epochs", type=_positive, default=2, help="fine-tune and scratch epochs per variant")
    p.add_argument("--quick", action="store_true", help="fewer variants and data (a smoke run)")
    p = command("train-digits-base", "reproduce the shipped digits base weights (deterministic)")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="the weight file to write")
    p.add_argument("--epochs", type=_positive, default=40, help="training epochs")
    p.add_argument("--seed", type=int, default=0, help="the random seed")
    p = command(
        "calibrate",
        "distil a variant's source model into it from unlabelled images (no labels needed) and write the weights",
        config=True,
    )
    p.add_argument("name", help="a registered variant name")
    p.add_argument("--images", required=True, help="a folder of image files, any nesting (labels are not read)")
    p.add_argument("--out", required=True, help="the calibrated weights to write, FILE.safetensors (report beside it)")
    p.add_argument("--steps", type=_positive, default=300, help="optimiser steps")
    p.add_argument("--batch-size", type=_positive, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW, cosine schedule)")
    p.add_argument("--patch-sizes", type=_positive, nargs="+", help="run-time patch sizes to calibrate for")
    p.add_argument("--img-sizes", type=_positive, nargs="+", help="input sizes to calibrate for")
    p.add_argument("--trainable", choices=("all", "geometry"), default="all", help="which parameters learn")
    p.add_argument("--seed", type=int, default=0, help="the seed of the batch and geometry draws")
    p = command("export", "write a Hub-style folder (config.json, model.safetensors, README.md)", config=True)
    p.add_argument("name", help="a registered variant name")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (it must not exist, or be empty)")
    p.add_argument("--file", help="load these weights instead of the variant's own source")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    p.add_argument(
        "--demo-results",
        metavar="RESULTS.json",
        help="a results.json of `timm-anysize demo`; its numbers for this variant go into the model card",
    )
    p = command("push", "export and upload to a Hugging Face Hub repo", config=True)
    p.add_argument("name", help="a registered variant name")
    p.add_argument("repo_id", metavar="REPO_ID", help="the Hub repo, e.g. your-name/vit-gray-48")
    p.add_argument("--file", help="load these weights instead of the variant's own source")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true", help="show the files and the card; no network")
    p = command(
        "run", "register variants, then run SCRIPT.py as __main__ with its own arguments (no logging set up)", True
    )
    p.add_argument("script", metavar="SCRIPT.py", help="the script, e.g. timm's train.py")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the script's own arguments")
    p = command(
        "convert",
        "map another library's checkpoint (torchvision, transformers, MMPretrain, DINO) to timm's names and "
        "write it as safetensors, with the report",
        config=True,
    )
    p.add_argument("file", metavar="FILE", help="the checkpoint, or a transformers save_pretrained folder")
    p.add_argument("--base", required=True, help="timm architecture the weights map onto, e.g. vit_base_patch16_224")
    p.add_argument("--to", help="output .safetensors (default: FILE_timm.safetensors)")
    p.add_argument("--layout", default="auto", help="the checkpoint's layout (default: detected from the keys)")
    p.add_argument("--select", default="teacher", help="teacher or student (DINO checkpoints)")
    p.add_argument("--img-size", type=_positive, help="size the weights were trained at (default: config.json / base)")
    p.add_argument("--patch-size", type=_positive, help="patch size of the weights (default: config.json / base)")
    p.add_argument("--model-args", help="JSON timm model_args of the architecture, e.g. '{\"depth\": 2}'")
    p = command("families", "the family coverage matrix (Markdown, as docs/families.md)")
    p.add_argument(
        "--refresh",
        action="store_true",
        help="first recompute the survey of every timm module (timm_anysize/apps/survey.json; minutes)",
    )
    p = command("schema", "print the JSON Schema of variant YAML files")
    p.add_argument("--markdown", action="store_true", help="the YAML reference as Markdown instead")
    return parser


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": _cmd_list,
    "show": _cmd_show,
    "check": _cmd_check,
    "demo": _cmd_demo,
    "train-digits-base": _cmd_train_digits_base,
    "calibrate": _cmd_calibrate,
    "export": _cmd_export,
    "push": _cmd_push,
    "run": _cmd_run,
    "schema": _cmd_schema,
    "families": _cmd_families,
    "convert": _cmd_convert,
}


def _quiet_pipe() -> int:
    """A reader closed our stdout (``| head``): no more output, no "Broken pipe" message; exit 141 as SIGPIPE would."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush at exit goes nowhere
    return 141


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI: every error is one line on stderr and exit status 1 (a usage error: 2); ``--debug`` raises it
    with its traceback instead. A script run by ``run`` raises its own errors as they are.

    Example:
        >>> main(["show", "nosuch_variant_name"])
        1
    """
    args = build_parser().parse_args(argv)
    args.quiet, args.debug = getattr(args, "quiet", False), getattr(args, "debug", False)
    args.verbose = getattr(args, "verbose", False)
    if args.quiet and args.verbose:
        _usage_error(args, "-q/--quiet and -v/--verbose together: pick one")
    if args.command != "run":  # a script run by `run` sets up its own logging (timm's setup_default_logging)
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    ours_logger = logging.getLogger(timm_anysize.__name__)
    ours_level = ours_logger.level  # restored on return: main() may run in-process (tests, notebooks)
    if args.quiet or args.verbose:  # our loggers only; under `run` the script's handlers print what passes
        ours_logger.setLevel(logging.WARNING if args.quiet else logging.DEBUG)
    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # Hub downloads; our own bars take `progress=not args.quiet`
    try:
        if args.command != "check":  # check checks its -c files rather than registering them
            for path in getattr(args, "config", ()):
                register_yaml(path)
        code = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe raises here, not at the interpreter's exit
        return code
    except _ScriptFailed as e:
        raise e.__cause__ from None  # type: ignore[misc]
    except BrokenPipeError:
        return _quiet_pipe()
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        ours = isinstance(e, (AnysizeError, KeyError, OSError))
        message = one_line(e) if ours else f"{type(e).__name__}: {one_line(e)} (--debug shows the traceback)"
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        ours_logger.setLevel(ours_level)


if __name__ == "__main__":
    sys.exit(main())
