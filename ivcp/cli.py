"""ivcp: training-free visual-token pruning for vision-language models (IVC-Prune and baselines).

Start with `ivcp demo` (a tiny offline model, every method's visual tokens kept and KV bytes) or
`ivcp viz kept` (a picture of what each method keeps). `ivcp COMMAND --help` explains each command.
"""

from __future__ import annotations

# Only the standard library at import time: `ivcp --help` must not load torch or transformers.
# Each command imports what it needs inside its function.
import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

MAX_GRID_SIDE = 256          # viz ivc: cells per side ...
MAX_GRID_CELLS = 16384       # ... and in all (Qwen2.5-VL's largest image is 16384 merged tokens)


class CommandError(ValueError):
    """A bad argument found while running a command: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``ivcp demo: error: ... (ivcp demo --help)``), exit status 2,
    and every option's default shown in its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- shared helpers ---------------------------------------------------------------------------------

def progress(items, desc: str):
    """A progress bar on stderr when it is a terminal (tqdm; silent in logs and tests)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=None, leave=False, file=sys.stderr)


def _names(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _raw_param(text: str) -> tuple[str, str]:
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE or METHOD.NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()


def _convert(value: str, kind: Any, where: str) -> Any:
    """``value`` (command-line text) as the type ``kind`` of a method's dataclass field."""
    import json
    import types
    import typing

    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value.lower() == "none" and type(None) in args:
            return None
        errors = []
        for member in [a for a in args if a is not type(None)]:
            try:
                return _convert(value, member, where)
            except CommandError as error:
                errors.append(str(error))
        raise CommandError(errors[0] if len(errors) == 1 else f"{where}: cannot read {value!r} as "
                           f"{' or '.join(getattr(a, '__name__', str(a)) for a in args if a is not type(None))}")
    if origin is tuple:
        item = args[0] if args else str
        return tuple(_convert(v.strip(), item, where) for v in value.split(",") if v.strip())
    if origin is dict or kind is dict:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise CommandError(f"{where} takes a JSON object, e.g. '{{\"keep_ratio\": 0.3}}', got {value!r}")
        return parsed
    if kind is bool:
        lowered = value.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise CommandError(f"{where} takes true or false, got {value!r}")
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise CommandError(f"{where} takes {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    return value  # str, and a method name given for a method-valued field


def method_params(methods: list[str], raw: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Each method's typed keyword parameters from ``--param`` pairs: ``NAME=VALUE`` goes to every
    listed method that has the field NAME, ``METHOD.NAME=VALUE`` to that method only. Types come from
    the method's dataclass fields (``stage_layers=8,16,24`` is a tuple of ints)."""
    import dataclasses
    import typing

    from ivcp.methods import method_class

    fields = {}
    for method in methods:
        if method == "vanilla":
            fields[method] = {}
            continue
        try:
            cls = method_class(method)
        except ValueError as error:
            raise CommandError(str(error)) from None
        hints = typing.get_type_hints(cls)
        fields[method] = {f.name: hints.get(f.name, str) for f in dataclasses.fields(cls) if f.init}
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in raw:
        target, dot, name = key.rpartition(".")
        if dot:
            if target not in fields:
                raise CommandError(f"--param {key}: {target!r} is not one of the methods asked for ({', '.join(methods)})")
            targets = [target]
            if name not in fields[target]:
                raise CommandError(f"--param {key}: {target} has no parameter {name!r}; it takes "
                                   f"{', '.join(sorted(fields[target])) or 'none'}")
        else:
            targets = [m for m in methods if name in fields[m]]
            if not targets:
                raise CommandError(f"--param {key}: no method asked for ({', '.join(methods)}) has a parameter {name!r}")
        for method in targets:
            out[method][name] = _convert(value, fields[method][name], f"--param {method}.{name}")
    return out


# --- commands ---------------------------------------------------------------------------------------

def _kv_bytes_per_layer(cache) -> list[int]:
    return [int(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size())
            for layer in cache.layers]


def _compress(values: list[int]) -> str:
    """'a ×n, b ×m' for runs of equal values."""
    runs: list[list[int]] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return ", ".join(f"{v:,}" + (f" ×{n}" if n > 1 else "") for v, n in runs)


def demo(args: argparse.Namespace) -> int:
    """Tiny offline model + generated image: vanilla and each method, one row each."""
    import torch

    import ivcp
    from ivcp.compat import output_cache
    from ivcp.testing import FAMILIES, make_image, make_inputs, tiny_model

    if args.family not in FAMILIES:
        raise CommandError(f"unknown family {args.family!r}; choose one of {', '.join(FAMILIES)}")
    params = method_params(args.methods, args.param)
    model, processor = tiny_model(args.family, num_hidden_layers=args.layers)
    for method in args.methods:  # bad names or parameters fail here, before any compute
        if method != "vanilla":
            ivcp.resolve_method(model, method, **params[method])
    image = make_image(args.width, args.height, seed=args.seed)
    inputs = make_inputs(processor, args.prompt, images=[image])
    n_prompt = inputs["input_ids"].shape[1]
    print(f"tiny random {args.family} ({args.layers} layers, weights from seed 0: the text is noise, the "
          f"mechanics are real); image {args.width}x{args.height}; prompt of {n_prompt} tokens\n")
    header = f"{'method':<12} {'visual kept':>12} {'KV bytes total':>15}  KV bytes per layer / generated text"
    print(header)
    print("-" * len(header))
    for method in progress(["vanilla", *[m for m in args.methods if m != "vanilla"]], "demo"):
        generate = dict(max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True)
        with torch.no_grad():
            if method == "vanilla":
                # the visual token count comes from a session with nothing pruned: the adapter finds the segments
                with ivcp.prune(model, "random", keep_ratio=1.0) as session:
                    model(**inputs)
                n_vis = session.last.n_visual
                out = model.generate(**inputs, **generate)
                prefill = output_cache(model(**inputs, use_cache=True))
                kept = f"{n_vis}/{n_vis}"
            else:
                with ivcp.prune(model, method, **params[method]) as session:
                    out = model.generate(**inputs, **generate)
                    prefill = output_cache(model(**inputs, use_cache=True))
                rec = session.last
                kept = f"{rec.n_visual_kept}/{rec.n_visual}"
        per_layer = _kv_bytes_per_layer(prefill)
        text = processor.decode(out.sequences[0, n_prompt:])
        print(f"{method:<12} {kept:>12} {sum(per_layer):>15,}  [{_compress(per_layer)}]")
        print(f"{'':<12} {'':>12} {'':>15}  {text!r}")
    return 0


def viz_ivc(args: argparse.Namespace) -> int:
    """IVC score maps (V and U; for M-RoPE the reference and sectioned modes) of a family's rotary."""
    grid_h, grid_w = args.grid
    if not (0 < grid_h <= MAX_GRID_SIDE and 0 < grid_w <= MAX_GRID_SIDE) or grid_h * grid_w > MAX_GRID_CELLS:
        raise CommandError(f"--grid {grid_h} {grid_w}: each side must be in 1..{MAX_GRID_SIDE} and the grid at most "
                           f"{MAX_GRID_CELLS:,} cells")
    if args.offset < 0:
        raise CommandError(f"--offset must be a non-negative count, got {args.offset}")
    if not 0 < args.ivc_ratio <= 1:
        raise CommandError(f"--ivc-ratio must be in (0, 1], got {args.ivc_ratio}")
    from ivcp import viz
    from ivcp.config import config_names, family_rope

    if args.model == "tiny" or args.model.startswith("tiny:"):
        from ivcp.adapters import adapter_for
        from ivcp.loading import load_model

        rope = adapter_for(load_model(args.model, device="cpu")[0]).rope
    elif args.model in config_names("models", ".toml"):
        rope = family_rope(args.model)
    else:
        raise CommandError(f"unknown model {args.model!r}: use a family ({', '.join(config_names('models', '.toml'))}) "
                           "or tiny[:family]")
    maps = viz.ivc_maps(rope, grid_h, grid_w, args.offset, args.ivc_ratio)
    title = (f"{args.model}: θ {rope.theta:g}, d {rope.head_dim}, grid {grid_h}×{grid_w} after {args.offset} tokens, "
             f"IVC {args.ivc_ratio:.0%} outlined")
    path = viz.save(viz.render_ivc_maps(maps, title), args.out, f"ivc_maps_{args.model.replace(':', '_')}_{grid_h}x{grid_w}.png")
    print(path)
    return 0


def viz_kept(args: argparse.Namespace) -> int:
    """The image once per method, pruned cells greyed out (and the grounder's box and expression)."""
    params = method_params(args.methods, args.param)
    from PIL import Image, UnidentifiedImageError

    from ivcp import viz
    from ivcp.loading import load_model

    image = expression = target = None
    if args.image:
        try:
            image = Image.open(args.image).convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise CommandError(f"cannot read the image {args.image!r}: {error}") from None
    grounder = args.model == "tiny:grounder"
    if grounder:
        expression = args.expression
        if image is None:  # a picture the grounder knows how to read: the harness's synthetic data
            import random

            from ivcp.data.grounding import make_sample

            sample = make_sample(random.Random(args.seed))
            image, expression = sample["image"], expression or sample["expression"]
            target = sample["box"] if expression == sample["expression"] else None
        elif not expression:
            raise CommandError("--model tiny:grounder with --image needs --expression (what to locate)")
    elif image is None:
        raise CommandError(f"--image is needed with --model {args.model} (only the grounder draws its own picture)")
    model, processor = load_model(args.model)
    figure = viz.kept_figure(model, processor, image, args.methods, params, prompt=args.prompt, expression=expression,
                             columns=args.columns, target=target, progress=lambda items: progress(items, "viz kept"))
    name = f"kept_{Path(args.image).stem if args.image else f'grounder_seed{args.seed}'}.png"
    print(viz.save(figure, args.out, name))
    return 0


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in filter(None, text.split(",")):
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"image sizes are WIDTHxHEIGHT, got {item!r}") from None
        if width < 1 or height < 1:
            raise argparse.ArgumentTypeError(f"image sizes must be positive, got {item!r}")
        sizes.append((height, width))
    return sizes


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _batch_sizes(text: str) -> list[int]:
    sizes = _positive_ints(text)
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"batch sizes are distinct positive integers, got {text!r}")
    return sizes


def _ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios in (0, 1], got {text!r}")
    return values


def bench(args: argparse.Namespace) -> int:
    """Efficiency benchmark (see ivcp/bench.py; ``--engine vllm``: ivcp/vllm/bench.py)."""
    if args.engine == "vllm":
        return bench_vllm(args)
    import torch

    from ivcp import bench as b
    from ivcp.loading import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "bf16": torch.bfloat16,
             "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    sizes = list(args.image_sizes) + [b.visual_tokens_to_size(n) for n in args.visual_tokens]
    if not sizes:
        sizes = [(336, 448)]
    cases = b.plan(args.methods, args.keep_ratios, sizes, args.batch_sizes)  # unknown methods fail here
    if args.model == "tiny" or args.model.startswith("tiny:") or args.model in b.bundled_architectures():
        if args.model.startswith("tiny"):
            model, _ = load_model(args.model, device=device)
            model = model.to(dtype)
        else:
            model = b.random_model(args.model, device=device, dtype=dtype)
    elif Path(args.model).exists() or "/" in args.model:
        model, _ = load_model(args.model, dtype=dtype, device=device)
    else:
        raise CommandError(f"unknown model {args.model!r}: use tiny, a checkpoint directory, a hub id, or one of "
                           f"{', '.join(b.bundled_architectures())}")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cases = b.run(model, cases, repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
                  prompt_tokens=args.prompt_tokens, rounds=lambda items: progress(items, "bench rounds"))
    options = {k: getattr(args, k) for k in ("repeats", "warmup", "new_tokens", "prompt_tokens")}
    rows = b.summarise(model, cases)
    if not rows:
        print("ivcp bench: error: every case ran out of memory", file=sys.stderr)
        return 1
    if args.batch_sizes:
        weights = b.weight_bytes(model)
        options.update(batch_sizes=args.batch_sizes, memory_budget_gb=args.memory_budget_gb, weight_bytes=weights,
                       capacity=b.capacity(rows, weights, int(args.memory_budget_gb * 2 ** 30)),
                       out_of_memory=sorted({f"{c.label} at batch {c.batch}" for c in cases if c.out_of_memory}))
    report = b.report_for(args.model, model, rows, options, "ivcp " + " ".join(sys.argv[1:]))
    paths = b.write(report, args.out)
    print(b.markdown(report))
    print("\n".join(f"wrote {path}" for path in paths.values()))
    return 0


def bench_vllm(args: argparse.Namespace) -> int:
    """``ivcp bench --engine vllm``: vanilla vs pruned vLLM on the same prompts at a fixed KV budget."""
    from ivcp.vllm import bench as vb

    methods = ["vanilla", "ivc_prune"] if args.methods == _names("vanilla,fastv,pdrop,ivc_prune") else list(args.methods)
    params = {"keep_ratio": args.keep_ratios[0]} if args.keep_ratios else {}
    if args.keep_ratios and len(args.keep_ratios) > 1:
        raise CommandError("--engine vllm takes one --keep-ratios value")
    out = args.out
    try:
        vb.bench(args.model, methods, params, args.requests, args.kv_blocks, args.new_tokens, 11, out,
                 "ivcp " + " ".join(sys.argv[1:]), repeats=args.repeats)
    except (RuntimeError, ValueError) as error:
        raise CommandError(str(error)) from error
    return 0


def make_grounding(args: argparse.Namespace) -> int:
    from ivcp.data.grounding import make_grounding as make

    try:
        paths = make(args.out, per_split=args.per_split, seed=args.seed, layout=args.layout, force=args.force)
    except (FileExistsError, ValueError) as error:
        raise CommandError(str(error)) from None
    for path in paths:
        print(path)
    return 0


def list_methods(args: argparse.Namespace) -> int:
    """Each registered method: its name and the first line of its module's docstring (``--explain NAME``:
    one method's sources, deviations and per-family settings)."""
    if getattr(args, "explain", None):
        return explain_method(args.explain)
    import ivcp
    from ivcp.methods import method_class

    for name in ivcp.available_methods():
        doc = (sys.modules[method_class(name).__module__].__doc__ or "").strip()
        print(f"{name:<14} {doc.splitlines()[0] if doc else ''}")
    return 0


def explain_method(name: str) -> int:
    """``ivcp methods --explain NAME``: a method's sources, deviations and per-family settings."""
    from ivcp.config import config_names, family_config
    from ivcp.methods import method_class

    cls = method_class(name)
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    print(f"{name}: {doc.splitlines()[0] if doc else cls.__name__}")
    print(cls.source or "No source notes: see the module docstring.\n" + doc)
    for family in config_names("models", ".toml"):
        config = family_config(family)
        for kind in ("defaults", "authors"):
            settings = config.get(kind, {}).get(name)
            if settings:
                text = ", ".join(f"{k}={v!r}" for k, v in settings.items())
                print(f"  {family} [{kind}.{name}] (configs/models/{family}.toml): {text}")
    return 0


def list_models(args: argparse.Namespace) -> int:
    """The harness's VLMEvalKit model names (configs/eval.toml), one line each."""
    from ivcp.eval.protocol import all_run_names

    runs = all_run_names()
    families = sorted({run.model.family for run in runs.values()})
    if args.family and args.family not in families:
        raise CommandError(f"unknown family {args.family!r}; the harness has {', '.join(families)}")
    for name, run in runs.items():
        if args.family and run.model.family != args.family:
            continue
        print(f"{name:<48} {run.model.family:<11} {run.method or 'vanilla':<13} {run.protocol:<8} {run.model.hub_id}")
    return 0


# --- the parser -------------------------------------------------------------------------------------

PARAM_HELP = ("a method parameter, repeatable: NAME=VALUE for every method that has NAME, METHOD.NAME=VALUE for "
              "one; typed by the method's fields (tuples comma-separated: pdrop.stage_layers=2,4,6; none for None)")


def build_parser() -> Parser:
    parser = Parser(prog="ivcp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run a tiny offline model unpruned and with pruning methods (a table)",
                       description="A tiny random model of FAMILY on a generated image: for vanilla and each method, "
                       "the visual tokens kept, the KV-cache bytes after prefill (per layer) and the generated text "
                       "(noise: the weights are random; the mechanics are real).")
    p.add_argument("--family", default="qwen2_5_vl", help="tiny model family: qwen2_5_vl, qwen2_vl, qwen3_vl, "
                   "qwen3_vl_moe, llava, internvl, internvl_llama (ivcp.testing.FAMILIES)")
    p.add_argument("--methods", default="ivc_prune,fastv", type=_names, help="comma-separated method names (ivcp methods)")
    p.add_argument("--param", action="append", default=[], type=_raw_param, metavar="[METHOD.]NAME=VALUE", help=PARAM_HELP)
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the tiny model")
    p.add_argument("--width", type=int, default=448, help="image width, pixels")
    p.add_argument("--height", type=int, default=336, help="image height, pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated image")
    p.add_argument("--prompt", default="Locate the red shape and output the bbox coordinates in JSON format.",
                   help="the user's text after the image")
    p.add_argument("--max-new-tokens", type=int, default=12, help="tokens generated per method")
    p.set_defaults(func=demo)

    p = sub.add_parser("viz", help="pictures: IVC score maps, what each method keeps",
                       description="Pictures (PNG): `viz ivc` the IVC score maps of a rotary, `viz kept` the tokens "
                       "each method keeps on an image.")
    viz_sub = p.add_subparsers(dest="viz_command", required=True, metavar="PICTURE")
    q = viz_sub.add_parser("ivc", help="V and U heat maps over a grid with the IVC tokens outlined",
                           description="The summed cosine V(m) and sine U(m) of the rotary over an image grid (paper "
                           "eq. 7-8), with the IVC tokens outlined; M-RoPE families in the reference and sectioned modes.")
    q.add_argument("--model", default="qwen2_5_vl", help="a model family (its released checkpoints' rotary: qwen2_5_vl, "
                   "qwen2_vl, qwen3_vl, llava, internvl) or tiny[:family]")
    q.add_argument("--grid", nargs=2, type=int, metavar=("H", "W"), default=[24, 24],
                   help=f"grid rows and columns (merged tokens), each at most {MAX_GRID_SIDE}, {MAX_GRID_CELLS:,} in all")
    q.add_argument("--offset", type=int, default=0, help="tokens before the image (its rotary start)")
    q.add_argument("--ivc-ratio", type=float, default=0.1, help="share of the grid outlined as IVC tokens")
    q.add_argument("--out", default="outputs/viz", help="folder for the PNG")
    q.set_defaults(func=viz_ivc)
    q = viz_sub.add_parser("kept", help="the image once per method, pruned cells greyed out",
                           description="Runs each method once on the image and draws a grid of panels: the image as "
                           "the model saw it, pruned cells greyed, IVC tokens and foreground seeds marked, with a "
                           "legend and axes in token cells. The default model is the trained tiny grounder on a "
                           "synthetic picture: each panel then shows the expression and the box it predicts.")
    q.add_argument("--model", default="tiny:grounder", help="tiny:grounder (trained), tiny[:family] (random), a "
                   "checkpoint directory or a hub id")
    q.add_argument("--image", default=None, help="the picture (default with the grounder: a synthetic one from --seed)")
    q.add_argument("--expression", default=None, help="with the grounder: what to locate, e.g. 'the red circle' "
                   "(default: the synthetic picture's own)")
    q.add_argument("--seed", type=int, default=0, help="seed of the grounder's synthetic picture")
    q.add_argument("--prompt", default="Locate the object and output the bbox coordinates in JSON format.",
                   help="the user's text for models other than the grounder (the grounder gets the harness's prompt)")
    q.add_argument("--methods", default="vanilla,ivc_prune,fastv,pdrop", type=_names,
                   help="comma-separated method names; vanilla adds an unpruned panel")
    q.add_argument("--param", action="append", default=[], type=_raw_param, metavar="[METHOD.]NAME=VALUE", help=PARAM_HELP)
    q.add_argument("--columns", type=int, default=2, help="panels per row")
    q.add_argument("--out", default="outputs/viz", help="folder for the PNG")
    q.set_defaults(func=viz_kept)

    p = sub.add_parser("bench", help="efficiency per method beside the analytic limit",
                       description="Prefill and decode time, KV bytes and memory per method on synthetic inputs, "
                       "beside the analytic FLOPs / bytes limit (ivcp/bench.py); writes bench.json, bench.md, bench.png.")
    p.add_argument("--model", default="tiny", help="tiny[:family], a bundled architecture (random weights: "
                   "qwen2_5_vl_3b/7b/32b, qwen2_vl_7b, qwen3_vl_8b, qwen3_vl_30b_a3b, llava_1_5_7b, internvl2_5_8b, "
                   "qwen2_5_vl_mini), a checkpoint directory or a hub id")
    p.add_argument("--methods", default="vanilla,fastv,pdrop,ivc_prune", type=_names, help="comma-separated method names")
    p.add_argument("--repeats", type=int, default=3, help="measured rounds per case")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    p.add_argument("--image-sizes", type=_sizes, default=[], help="WIDTHxHEIGHT[,...] (none given: 448x336)")
    p.add_argument("--visual-tokens", type=_positive_ints, default=[],
                   help="sizes given as visual-token counts instead, e.g. 1300,5000")
    p.add_argument("--keep-ratios", type=_ratios, default=None,
                   help="sweep keep_ratio for the methods that have one, e.g. 0.25,0.5,0.75 (none: each method's default)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None,
                   help="throughput at these batch sizes, e.g. 1,4,8,16 (each method against vanilla at the same batch)")
    p.add_argument("--memory-budget-gb", type=float, default=40.0,
                   help="with --batch-sizes: the largest batch that fits this much memory, GiB (40: the paper's A100-40GB)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="text tokens in the synthetic prompt")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per run")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights' dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (none: CUDA when available)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", default="outputs/bench", help="folder for bench.json, bench.md, bench.png")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: ivcp's HF engine (above); vllm: vanilla vs pruned vLLM at a fixed KV budget "
                   "(ivcp/vllm/bench.py: --model tiny or a servable folder, --methods, --requests, --kv-blocks, "
                   "--new-tokens, --repeats, --out; runs in the vLLM environment, docs/vllm.md)")
    p.add_argument("--requests", type=int, default=48, help="with --engine vllm: prompts, all submitted at once")
    p.add_argument("--kv-blocks", type=int, default=40, help="with --engine vllm: the KV budget in blocks of 32 tokens")
    p.set_defaults(func=bench)

    p = sub.add_parser("data", help="synthetic datasets in VLMEvalKit's TSV format",
                       description="Synthetic datasets in VLMEvalKit's TSV format.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    q = data_sub.add_parser("make-grounding", help="RefCOCO-format TSVs for every grounding split (generated shapes)",
                            description="One TSV per RefCOCO split (and the aggregated RefCOCO.tsv) of generated "
                            "pictures of coloured shapes with a referring expression and its box.")
    q.add_argument("--out", required=True, help="folder for the TSVs (e.g. $LMUData)")
    q.add_argument("--per-split", type=int, default=8, help="pictures per split")
    q.add_argument("--seed", type=int, default=0, help="seed of the generator")
    q.add_argument("--layout", choices=["pixels", "authors"], default="pixels",
                   help="pixels: bbox_x1..bbox_y2 columns (ivcp / upstream); authors: their answer-column TSVs")
    q.add_argument("--force", action="store_true", help="overwrite existing TSVs")
    q.set_defaults(func=make_grounding)

    p = sub.add_parser("methods", help="list the registered pruning methods",
                       description="The registered pruning methods, one line each.")
    p.add_argument("--explain", metavar="NAME", help="a method's sources, deviations and per-family settings")
    p.set_defaults(func=list_methods)

    p = sub.add_parser("models", help="list the evaluation harness's model names (model x method x prompt protocol)",
                       description="The evaluation harness's VLMEvalKit model names (configs/eval.toml): name, family, "
                       "method, prompt protocol, checkpoint.")
    p.add_argument("--family", default="", help="only this model family (none: every family)")
    p.set_defaults(func=list_models)
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ivcp")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = " ".join(["ivcp"] + [getattr(args, k) for k in ("command", "viz_command", "data_command")
                                if getattr(args, k, None)])
    try:
        status = args.func(args)
        sys.stdout.flush()  # inside the try: a reader that left shows here, not at interpreter exit
        return status
    except ValueError as error:  # CommandError and the library's own bad-configuration errors
        message = " ".join(str(error).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ivcp models | head`: the reader left; no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit must not fail
        return 141  # 128 + SIGPIPE, as a Unix tool killed by the broken pipe


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
