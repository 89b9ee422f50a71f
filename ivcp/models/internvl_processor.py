"""InternVL's processor without torchvision, and with the images' sizes: a ``ProcessorMixin``.

transformers' ``InternVLProcessor`` cannot be built without torchvision (its video processor) and does not
return the images' sizes, which the tiles' layout (and IVC-Prune's thumbnail mapping) needs. This class
processes images as it does — tiles by the image processor (``GotOcr2ImageProcessorPil``: InternVL's dynamic
tiling, 1..``max_patches`` tiles + a thumbnail), each ``<IMG_CONTEXT>`` of the text expanded to ``<img>`` +
``image_seq_length`` × tiles ``<IMG_CONTEXT>`` + ``</img>`` — and also returns ``image_sizes`` (images, 2:
height, width). Videos are refused.

Importing this module registers the class with ``AutoProcessor`` (name lookup: a folder whose
``processor_config.json`` names ``InternVLTilesProcessor`` loads it; ``scripts/convert_internvl.py`` writes
such folders). Folders naming transformers' ``InternVLProcessor`` still load transformers' class.
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, ProcessorMixin

# text keywords passed on to the tokenizer, image keywords to the image processor
TEXT_KWARGS = ("padding", "padding_side", "truncation", "max_length", "add_special_tokens", "return_attention_mask",
               "pad_to_multiple_of")
IMAGE_KWARGS = ("max_patches", "min_patches", "crop_to_patches")


def chat_template(system_message: str | None = None) -> str:
    """InternVL's chat format (the remote ``chat()``'s ``internvl2_5`` template) in Jinja: ``<|im_start|>role\\n`` ...
    ``<|im_end|>\\n`` per turn, each image of a turn written ``<IMG_CONTEXT>\\n`` where it stands; without a system
    turn, ``system_message`` (when given, plain text) is the system turn."""
    default = ""
    if system_message:
        default = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + system_message
                   + "<|im_end|>\n{% endif %}")
    return default + (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def flat_images(images) -> list:
    """A flat list of PIL images from one image, a list, or a list of lists (one per prompt, as
    ``apply_chat_template`` and the pipeline pass them); paths and URLs are loaded, arrays and tensors converted."""
    from PIL import Image
    from transformers.image_transforms import to_pil_image
    from transformers.image_utils import load_image

    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        images = [images]
    out = []
    for item in images:
        out += list(item) if isinstance(item, (list, tuple)) else [item]
    loaded = []
    for image in out:
        if image is None:
            continue
        if isinstance(image, str):
            image = load_image(image)
        elif not isinstance(image, Image.Image):
            image = to_pil_image(image)
        loaded.append(image)
    return loaded


def split_kwargs(kwargs: dict, owner: str, image_kwargs: tuple[str, ...]) -> tuple[dict, dict]:
    """(tokenizer keywords, image processor keywords) of a processor call; any other keyword is refused."""
    unknown = sorted(k for k in kwargs if k not in TEXT_KWARGS and k not in image_kwargs)
    if unknown:
        raise TypeError(f"{owner} got unexpected keyword arguments {', '.join(unknown)} (text: "
                        f"{', '.join(TEXT_KWARGS)}; images: {', '.join(image_kwargs)})")
    return ({k: v for k, v in kwargs.items() if k in TEXT_KWARGS},
            {k: v for k, v in kwargs.items() if k in image_kwargs})


class InternVLTilesProcessor(ProcessorMixin):
    """Images + text → ``input_ids``, ``attention_mask``, ``pixel_values`` (tiles, 3, S, S; each image's tiles then
    its thumbnail when tiled) and ``image_sizes`` (images, 2: height, width of the originals)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 start_image_token: str = "<img>", end_image_token: str = "</img>",
                 image_token: str = "<IMG_CONTEXT>", **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_seq_length = int(image_seq_length)
        self.start_image_token, self.end_image_token, self.image_token = start_image_token, end_image_token, image_token
        for token in (start_image_token, end_image_token, image_token):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no {token} token (InternVL's image markers)")
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def __call__(self, images=None, text=None, videos=None, audio=None, return_tensors: str | None = "pt",
                 **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("InternVLTilesProcessor needs text: the prompt(s), one image token per image")
        if videos is not None or audio is not None:
            raise ValueError("InternVLTilesProcessor processes images only (no videos, no audio)")
        text_kwargs, image_kwargs = split_kwargs(kwargs, type(self).__name__, IMAGE_KWARGS)
        texts = [text] if isinstance(text, str) else list(text)
        images = flat_images(images)
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(images):
            raise ValueError(f"the prompts hold {placeholders} {self.image_token} but {len(images)} images were given")
        data: dict = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt", **image_kwargs)
            tiles = vision["num_patches"]
            tiles = iter(tiles.tolist() if torch.is_tensor(tiles) else list(tiles))
            expanded = []
            for t in texts:
                pieces = t.split(self.image_token)
                expanded.append(pieces[0] + "".join(
                    self.start_image_token + self.image_token * self.image_seq_length * next(tiles) + self.end_image_token
                    + piece for piece in pieces[1:]))
            texts = expanded
            data["pixel_values"] = vision["pixel_values"]
            data["image_sizes"] = torch.tensor([[image.height, image.width] for image in images])
        text_kwargs.setdefault("padding", len(texts) > 1)
        encoded = self.tokenizer(texts, return_tensors="pt", **text_kwargs)
        data = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **data}
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


def _register() -> None:
    """Make ``AutoProcessor`` find the class by the name a saved folder gives. Keyed by a name, not by
    ``InternVLConfig``: folders without a processor class keep transformers' default."""
    from transformers import AutoProcessor

    AutoProcessor.register("internvl_tiles", InternVLTilesProcessor, exist_ok=True)


_register()
