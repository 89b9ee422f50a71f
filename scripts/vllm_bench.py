"""vLLM throughput at a fixed KV budget, vanilla against pruned (the code: ivcp/vllm/bench.py; also
``ivcp bench --engine vllm``).

    .venv-vllm/bin/python scripts/vllm_bench.py --methods vanilla,ivc_prune --n 48 --blocks 40 \\
        --out results/bench/cpu-vllm-tiny-grounder
"""

from __future__ import annotations

import sys

from ivcp.vllm.bench import main

if __name__ == "__main__":
    sys.exit(main())
