"""Command line: ``ivcp <command>`` or ``python -m ivcp <command>``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


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
    from ivcp.testing import make_image, make_inputs, tiny_model

    model, processor = tiny_model(args.family, num_hidden_layers=args.layers)
    for method in args.methods:  # bad names or parameters fail here, before any compute
        ivcp.resolve_method(model, method, **dict(args.param))
    image = make_image(args.width, args.height, seed=args.seed)
    inputs = make_inputs(processor, args.prompt, images=[image])
    n_prompt = inputs["input_ids"].shape[1]
    print(f"tiny random {args.family} ({args.layers} layers, weights from seed 0: the text is noise, the "
          f"mechanics are real); image {args.width}x{args.height}; prompt of {n_prompt} tokens\n")
    header = f"{'method':<12} {'visual kept':>12} {'KV bytes total':>15}  KV bytes per layer / generated text"
    print(header)
    print("-" * len(header))
    rows = []
    for method in ["vanilla", *args.methods]:
        with torch.no_grad():
            if method == "vanilla":
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     return_dict_in_generate=True)
                prefill = output_cache(model(**inputs, use_cache=True))
                n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
                kept = f"{n_vis}/{n_vis}"
            else:
                with ivcp.prune(model, method, **dict(args.param)) as session:
                    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                         return_dict_in_generate=True)
                    prefill = output_cache(model(**inputs, use_cache=True))
                rec = session.last
                kept = f"{rec.n_visual_kept}/{rec.n_visual}"
        per_layer = _kv_bytes_per_layer(prefill)
        text = processor.decode(out.sequences[0, n_prompt:])
        rows.append((method, kept, sum(per_layer)))
        print(f"{method:<12} {kept:>12} {sum(per_layer):>15,}  [{_compress(per_layer)}]")
        print(f"{'':<12} {'':>12} {'':>15}  {text!r}")
    return 0


def viz_ivc(args: argparse.Namespace) -> int:
    """IVC score maps (V and U, reference and sectioned) for a family's rotary or the tiny model's."""
    from ivcp import viz
    from ivcp.config import family_rope

    if args.model == "tiny" or args.model.startswith("tiny:"):
        from ivcp.adapters import adapter_for
        from ivcp.loading import load_model

        rope = adapter_for(load_model(args.model, device="cpu")[0]).rope
    else:
        rope = family_rope(args.model)
    grid_h, grid_w = args.grid
    if grid_h < 1 or grid_w < 1 or args.offset < 0:
        raise ValueError("--grid needs two positive sizes and --offset a non-negative count")
    maps = viz.ivc_maps(rope, grid_h, grid_w, args.offset, args.ivc_ratio)
    title = (f"{args.model}: theta {rope.theta:g}, d {rope.head_dim}, grid {grid_h}x{grid_w}, offset {args.offset}, "
             f"IVC {args.ivc_ratio:.0%} outlined")
    path = viz.save(viz.render_ivc_maps(maps, title), args.out, f"ivc_maps_{args.model.replace(':', '_')}_{grid_h}x{grid_w}.png")
    print(path)
    return 0


def viz_kept(args: argparse.Namespace) -> int:
    """The image once per method with pruned cells greyed out."""
    from PIL import Image, UnidentifiedImageError

    from ivcp import viz
    from ivcp.loading import load_model

    try:
        image = Image.open(args.image).convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read the image {args.image!r}: {error}") from None
    model, processor = load_model(args.model)
    params: dict = {}
    for (key, value) in args.param:
        method, _, name = key.partition(".")
        if not name:
            raise ValueError(f"--param for viz kept is METHOD.NAME=VALUE, got {key}={value}")
        params.setdefault(method, {})[name] = value
    view, panels = viz.kept_panels(model, processor, image, args.prompt, args.methods, params)
    canvas, _ = viz.render_kept(view, panels)
    print(viz.save(canvas, args.out, f"kept_{Path(args.image).stem}.png"))
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


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes are comma-separated positive integers, got {text!r}") from None
    if not sizes or any(b < 1 for b in sizes) or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"batch sizes are distinct positive integers, got {text!r}")
    return sizes


def bench(args: argparse.Namespace) -> int:
    """Efficiency benchmark (see ivcp/bench.py)."""
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
        raise ValueError(f"unknown model {args.model!r}: use tiny, a checkpoint directory, a hub id, or one of "
                         f"{', '.join(b.bundled_architectures())}")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cases = b.run(model, cases, repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
                  prompt_tokens=args.prompt_tokens)
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


def make_grounding(args: argparse.Namespace) -> int:
    from ivcp.data.grounding import make_grounding as make

    try:
        paths = make(args.out, per_split=args.per_split, seed=args.seed, layout=args.layout, force=args.force)
    except (FileExistsError, ValueError) as error:
        print(f"ivcp data make-grounding: error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def list_methods(args: argparse.Namespace) -> int:
    if getattr(args, "explain", None):
        return explain_method(args.explain)
    import ivcp
    from ivcp.methods import method_class

    for name in ivcp.available_methods():
        doc = (method_class(name).__module__ and sys.modules[method_class(name).__module__].__doc__ or "").strip()
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

    for name, run in all_run_names().items():
        if args.family and run.model.family != args.family:
            continue
        print(f"{name:<48} {run.model.family:<11} {run.method or 'vanilla':<13} {run.protocol:<8} {run.model.hub_id}")
    return 0


def _param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return name, cast(value)
        except ValueError:
            pass
    return name, {"true": True, "false": False}.get(value.lower(), value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ivcp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run a tiny offline model with vanilla and pruning methods")
    p.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen2_vl"])
    p.add_argument("--methods", default="ivc_prune,fastv", type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--param", action="append", default=[], type=_param, metavar="NAME=VALUE",
                   help="method parameter, repeatable (e.g. --param keep_ratio=0.3)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=448)
    p.add_argument("--height", type=int, default=336)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="Locate the red shape and output the bbox coordinates in JSON format.")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.set_defaults(func=demo)

    p = sub.add_parser("viz", help="pictures: IVC score maps, kept-token overlays")
    viz_sub = p.add_subparsers(dest="viz_command", required=True)
    q = viz_sub.add_parser("ivc", help="V and U heat maps over a merged grid with the IVC tokens outlined")
    q.add_argument("--model", default="qwen2_5_vl", help="a model family (its released rotary) or tiny[:family]")
    q.add_argument("--grid", nargs=2, type=int, metavar=("H", "W"), default=[24, 24])
    q.add_argument("--offset", type=int, default=0, help="tokens before the image (its rotary start)")
    q.add_argument("--ivc-ratio", type=float, default=0.1)
    q.add_argument("--out", default="outputs/viz")
    q.set_defaults(func=viz_ivc)
    q = viz_sub.add_parser("kept", help="the image once per method, pruned cells greyed out")
    q.add_argument("--image", required=True)
    q.add_argument("--prompt", default="Locate the object and output the bbox coordinates in JSON format.")
    q.add_argument("--methods", default="ivc_prune,fastv", type=lambda s: [m for m in s.split(",") if m])
    q.add_argument("--model", default="tiny", help="tiny[:family], a checkpoint directory or a hub id")
    q.add_argument("--param", action="append", default=[], type=_param, metavar="METHOD.NAME=VALUE")
    q.add_argument("--out", default="outputs/viz")
    q.set_defaults(func=viz_kept)

    p = sub.add_parser("bench", help="efficiency per method beside the analytic limit")
    p.add_argument("--model", default="tiny", help="tiny[:family], a bundled architecture (random weights: "
                   "qwen2_5_vl_3b/7b/32b, qwen2_vl_7b, qwen2_5_vl_mini), a checkpoint directory or a hub id")
    p.add_argument("--methods", default="vanilla,fastv,pdrop,ivc_prune", type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--image-sizes", type=_sizes, default=[], help="WIDTHxHEIGHT[,...] (default 448x336)")
    p.add_argument("--visual-tokens", type=lambda s: [int(v) for v in s.split(",") if v], default=[],
                   help="sizes given as visual-token counts instead, e.g. 1300,5000")
    p.add_argument("--keep-ratios", type=lambda s: [float(v) for v in s.split(",") if v], default=None,
                   help="sweep keep_ratio for the methods that have one, e.g. 0.25,0.5,0.75")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None,
                   help="throughput at these batch sizes, e.g. 1,4,8,16 (each method against vanilla at the same batch)")
    p.add_argument("--memory-budget-gb", type=float, default=40.0,
                   help="with --batch-sizes: the largest batch that fits this much memory, GiB (default 40: the paper's A100-40GB)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="outputs/bench")
    p.set_defaults(func=bench)

    p = sub.add_parser("data", help="synthetic datasets in VLMEvalKit's TSV format")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("make-grounding", help="RefCOCO-format TSVs for every grounding split (generated shapes)")
    q.add_argument("--out", required=True)
    q.add_argument("--per-split", type=int, default=8)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--layout", choices=["pixels", "authors"], default="pixels",
                   help="pixels: bbox_x1..bbox_y2 columns (ivcp / upstream); authors: their answer-column TSVs")
    q.add_argument("--force", action="store_true", help="overwrite existing TSVs")
    q.set_defaults(func=make_grounding)

    p = sub.add_parser("methods", help="list the registered pruning methods")
    p.add_argument("--explain", metavar="NAME", help="a method's sources, deviations and per-family settings")
    p.set_defaults(func=list_methods)

    p = sub.add_parser("models", help="list the evaluation harness's model names (model x method x prompt protocol)")
    p.add_argument("--family", default="", help="only this model family")
    p.set_defaults(func=list_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"ivcp: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
