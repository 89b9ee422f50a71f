"""What every tiny model shares: seeded construction and the widened random init."""

from __future__ import annotations

import math

import torch


class seeded:
    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.state)


def widen_init(model: torch.nn.Module) -> None:
    """Random init is too tame to tell tokens apart; widen it so that pruning visibly matters."""
    for param in model.parameters():
        if param.dim() >= 2:
            torch.nn.init.normal_(param, std=1.0 / math.sqrt(param.shape[-1]))


def printable_only(model, vocab_size: int, eos_token_id: int) -> None:
    """A random model would emit markup and stray bytes; a real one does not. Let the tiny one generate
    printable ASCII (byte token id = byte value) and its end token only."""
    allowed = set(range(32, 127)) | {eos_token_id}
    model.generation_config.suppress_tokens = [i for i in range(vocab_size) if i not in allowed]


def build_tiny(model_class, config, seed: int, dtype: torch.dtype):
    """A tiny random model of ``model_class``: seeded, widened init, eval mode, generating printable
    ASCII and its end token only."""
    with seeded(seed):
        model = model_class(config)
        widen_init(model)
    model = model.to(dtype).eval()
    text = getattr(config, "text_config", config)
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    printable_only(model, text.vocab_size, text.eos_token_id)
    return model
