"""The ``timm-anysize`` command line: list, show and check variants, and run the demo.

Every command sees the demo's digits variants (``vit_digits_*``) next to the shipped ones: it registers them first
(:func:`timm_anysize.apps.demo.register_demo_variants`; ``import timm_anysize`` alone does not).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import timm_anysize
from timm_anysize import register_yaml
from timm_anysize.apps.demo import metrics_from_demo, register_demo_variants, run_demo
from timm_anysize.apps.digits import train_digits_base
from timm_anysize.apps.docs import families_markdown
from timm_anysize.apps.launcher import run_script
from timm_anysize.apps.survey import run_survey
from timm_anysize.convert import convert_checkpoint
from timm_anysize.core.errors import AnysizeError
from timm_anysize.core.spec import parse_variant
from timm_anysize.hub import export, push_to_hub
from timm_anysize.origins import config_geometry, detect_layout, unwrap_checkpoint
from timm_anysize.plan import format_bytes, make_plan, memory_budget
from timm_anysize.registry import check_name
from timm_anysize.schema import yaml_json_schema, yaml_reference_markdown
from timm_anysize.weights import detect_format, read_checkpoint, transformers_config
from timm_anysize.yaml_config import load_yaml_specs

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for name in timm_anysize.list_variants():
        spec = timm_anysize.get_variant(name)
        try:
            geometry = make_plan(spec).target.compact()
        except AnysizeError:  # registered unplanned (validate=False): its error is for `check`, not for the listing
            geometry = f"invalid (timm-anysize check {spec.origin})" if spec.origin else "invalid"
        src = spec.pretrained
        where = (
            f"file {src.file}"
            if src.file
            else f"hf-hub {src.hf_hub_id}"
            if src.hf_hub_id
            else f"url {src.url}"
            if src.url
            else f"base tag ({spec.base})"
        )
        rows.append((name, spec.base, geometry, where))
    widths = [max(len(r[i]) for r in rows + [("name", "base", "geometry", "weights")]) for i in range(3)]
    print(f"{'name':<{widths[0]}}  {'base':<{widths[1]}}  {'geometry':<{widths[2]}}  weights")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    return 0


def _as_written(value: object, key: str = "") -> object:
    """A spec dump as one would write it: a square ``img_size``/``patch_size`` pair as one number."""
    if isinstance(value, dict):
        return {k: _as_written(v, k) for k, v in value.items()}
    if key in ("img_size", "patch_size") and isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return value


def _written_dumper(yaml: Any) -> type:
    """A safe YAML dumper that writes mappings as blocks and lists inline (``img_size: [224, 320]``)."""

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    return Dumper


def _cmd_show(args: argparse.Namespace) -> int:
    import yaml

    spec = timm_anysize.get_variant(args.name)
    plan = make_plan(spec)
    if args.all:  # every field, defaults included
        data = json.loads(spec.model_dump_json(exclude_defaults=False))
    else:  # the keys the variant sets, as its YAML (or register_variant call) said them
        data = _as_written(spec.model_dump(mode="json", exclude_unset=True))
    data.pop("name", None)
    print(f"# {spec.name}  (from {spec.origin or 'Python: register_variant'})")
    if args.all:
        print(yaml.safe_dump({spec.name: data}, sort_keys=False).rstrip())
    else:
        print(yaml.dump({spec.name: data}, Dumper=_written_dumper(yaml), sort_keys=False, width=1000).rstrip())
    print("\n# resolved (no weights read)")
    print(f"family: {plan.family.name}")
    print(f"source: {plan.source.describe()}")
    print(f"target: {plan.target.describe()}")
    (h, w) = plan.target.img_size
    fixed = f"no: timm's own model, at {h}x{w} only"
    print(f"dynamic: {'yes: any input size' if plan.dynamic else fixed}")
    if plan.cost is not None:
        print(f"memory: {plan.cost.describe()}")
        budget, _ = memory_budget()
        if plan.cost.total > budget:  # accepted because it fits in half precision
            half = format_bytes(plan.cost.total_in(torch.bfloat16))
            print(f"  over this machine's budget in float32: build it with dtype=torch.bfloat16 (~{half})")
    print("adaptation:")
    steps = plan.steps()
    for key, what in steps:
        print(f"  {key}: {what}")
    if not steps:
        print("  every tensor copied (same geometry)")
    else:
        print("  every other tensor: copied")
    _print_layout(spec)
    return 0


def _print_layout(spec) -> None:
    """The checkpoint layout and its key mapping, when the variant names a local file (nothing is built)."""

    file = spec.pretrained.file
    if file is None or not file.exists() or detect_format(file) == "npz":
        return
    state_dict, wrappers = unwrap_checkpoint(read_checkpoint(file), spec.pretrained.select, str(file))
    conv = detect_layout(state_dict, spec.pretrained.layout, str(file))
    print(
        f"\n# checkpoint layout: {conv.layout if conv else 'timm'}"
        + (f" (unwrapped: {'; '.join(wrappers)})" if wrappers else "")
    )
    if conv is not None:
        for key, how in conv.key_mapping():
            print(f"  {key} <- {how}")
        for key, why in conv.dropped.items():
            print(f"  dropped {key}: {why}")


def _cmd_convert(args: argparse.Namespace) -> int:
    file = Path(args.file).resolve()
    state_dict, _ = unwrap_checkpoint(read_checkpoint(file), args.select, str(file))
    conv = detect_layout(state_dict, args.layout, str(file))
    sd = conv.state_dict if conv is not None else state_dict
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
    del state_dict, sd, head, conv  # only shapes were read; the conversion streams the file tensor by tensor
    spec = parse_variant(
        f"convert_{abs(hash(str(file))) % 10**8}",
        dict(
            base=args.base,
            pretrained=source,
            dynamic=False,
            model_args=json.loads(args.model_args or "{}"),
            **geometry,
        ),
    )
    out = Path(args.to or file.with_name(file.stem + "_timm.safetensors"))
    report = convert_checkpoint(spec, out)
    out.with_suffix(".report.json").write_text(json.dumps(report.to_dict(), indent=2))
    print(report.summary())
    print(
        f"wrote {out} and {out.with_suffix('.report.json')} (plain timm: timm.create_model({args.base!r}, "
        f"pretrained_cfg_overlay=dict(file={str(out)!r}), ...geometry above)"
    )
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            specs = load_yaml_specs(path)
        except AnysizeError as e:
            failed += 1
            print(str(e), file=sys.stderr)
            continue
        errors = []
        for spec in specs:
            try:
                check_name(spec, {})
                make_plan(spec)
            except AnysizeError as e:
                errors.append(str(e))
        if errors:
            failed += 1
            print("\n".join(errors), file=sys.stderr)
        else:
            print(f"{path}: ok ({len(specs)} variants: {', '.join(s.name for s in specs)})")
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(out_dir=args.out, epochs=args.epochs, quick=args.quick, progress=not args.quiet)
    return 0


def _cmd_train_digits_base(args: argparse.Namespace) -> int:
    acc, losses = train_digits_base(args.out, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    print(f"held-out accuracy {acc:.2f}% after {args.epochs} epochs (final loss {losses[-1]:.4f}); saved {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    metrics = metrics_from_demo(args.demo_results, args.name)
    out = export(args.name, args.out_dir, file=args.file, overwrite=args.overwrite, metrics=metrics)
    if metrics:
        print(f"model card includes {len(metrics)} fidelity results from {args.demo_results}")
    print(f"exported {args.name} to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    print(f"load it with plain timm: timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
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


def _cmd_run(args: argparse.Namespace) -> int:
    for path in args.config or ():
        register_yaml(path)  # our errors: one line, like every command
    try:
        run_script(args.script, args.args)
    except SystemExit as e:  # the script's own exit status is ours
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # the script's own errors keep their traceback, as under `python script.py`
        raise _ScriptFailed() from e
    return 0


class _ScriptFailed(Exception):
    """Raised around an exception of a script run by `timm-anysize run`, so main() re-raises it untouched."""


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``timm-anysize``."""
    parser = argparse.ArgumentParser(prog="timm-anysize", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or INFO logs")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered variants with base, geometry and weight source")
    p = sub.add_parser(
        "show", help="a variant as written, its geometries, memory estimate and adaptation plan (no weights read)"
    )
    p.add_argument("name")
    p.add_argument("--all", action="store_true", help="every field of the spec, defaults included")
    p = sub.add_parser("check", help="validate YAML files; non-zero exit with the errors")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("demo", help="adapt a digits ViT to many geometries and print the fidelity table")
    p.add_argument("--out", default="anysize-demo", help="output folder for results.json and the plot")
    p.add_argument("--epochs", type=int, default=2, help="fine-tune and scratch epochs per variant")
    p.add_argument("--quick", action="store_true", help="fewer variants and data (a smoke run)")
    p = sub.add_parser("train-digits-base", help="reproduce the shipped digits base weights (deterministic)")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to save the weights")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("export", help="write a Hub-style folder (config.json, model.safetensors, README.md)")
    p.add_argument("name")
    p.add_argument("out_dir")
    p.add_argument("--file", help="load these weights instead of the variant's own source")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    p.add_argument(
        "--demo-results",
        metavar="RESULTS.json",
        help="a results.json of `timm-anysize demo`; its numbers for this variant go into the model card",
    )
    p = sub.add_parser("push", help="export and upload to a Hugging Face Hub repo")
    p.add_argument("name")
    p.add_argument("repo_id")
    p.add_argument("--file", help="load these weights instead of the variant's own source")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="show the files and the card; no network")
    p = sub.add_parser("run", help="register variants, then run SCRIPT.py as __main__ with its own arguments")
    p.add_argument("--config", action="append", metavar="FILE.yaml", help="extra variant files (repeatable)")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser(
        "convert",
        help="map another library's checkpoint (torchvision, transformers, MMPretrain, "
        "DINO) to timm's names and write it as safetensors, with the report",
    )
    p.add_argument("file", help="the checkpoint, or a transformers save_pretrained folder")
    p.add_argument("--base", required=True, help="timm architecture the weights map onto, e.g. vit_base_patch16_224")
    p.add_argument("--to", help="output .safetensors (default: FILE_timm.safetensors)")
    p.add_argument("--layout", default="auto", help="pretrained.layout (default: detected from the keys)")
    p.add_argument("--select", default="teacher", help="teacher or student (DINO checkpoints)")
    p.add_argument("--img-size", type=int, help="size the weights were trained at (default: config.json / base)")
    p.add_argument("--patch-size", type=int, help="patch size of the weights (default: config.json / base)")
    p.add_argument("--model-args", help="JSON timm model_args of the architecture, e.g. '{\"depth\": 2}'")
    p = sub.add_parser("families", help="the family coverage matrix (Markdown, as docs/families.md)")
    p.add_argument(
        "--refresh",
        action="store_true",
        help="first recompute the survey of every timm module (timm_anysize/survey.json; minutes)",
    )
    p = sub.add_parser("schema", help="print the JSON Schema of variant YAML files")
    p.add_argument("--markdown", action="store_true", help="the YAML reference as Markdown instead")
    return parser


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": _cmd_list,
    "show": _cmd_show,
    "check": _cmd_check,
    "demo": _cmd_demo,
    "train-digits-base": _cmd_train_digits_base,
    "export": _cmd_export,
    "push": _cmd_push,
    "run": _cmd_run,
    "schema": _cmd_schema,
    "families": _cmd_families,
    "convert": _cmd_convert,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; errors are one line on stderr and exit code 1 (tracebacks with ``--debug``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # Hub downloads; our own bars take `progress=not args.quiet`
    try:
        register_demo_variants()
        return _COMMANDS[args.command](args)
    except _ScriptFailed as e:
        raise e.__cause__ from None
    except (ValueError, KeyError, OSError) as e:  # our errors subclass ValueError
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"timm-anysize {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
