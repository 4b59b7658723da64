"""Real PyTorch architectures users train — torchvision, timm and Hugging Face transformers —
built with random weights from small configs (nothing downloaded).

torchvision's PyPI wheel is a CUDA build: its compiled ops (``torchvision::nms``, ...) link
CUDA libraries this CPU torch does not have, so the extension does not load, and importing
torchvision then fails while registering fake kernels for ``nms``/``qnms``.
:func:`import_torchvision` declares those two schemas first; the models are pure Python and
run on the CPU (only the detection ops, which the models here do not use, stay unavailable).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

_TV_LIB: Any = None


def import_torchvision() -> Any:
    """torchvision, importable on the CPU build of torch (see the module docstring)."""
    global _TV_LIB
    try:
        return importlib.import_module("torchvision")
    except RuntimeError:
        pass
    if _TV_LIB is None:
        _TV_LIB = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _TV_LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    return importlib.import_module("torchvision")


def _image(size: int = 64, batch: int = 2) -> dict:
    return {"args": (torch.randn(batch, 3, size, size),)}


def _tokens(vocab: int = 100, seq: int = 8, batch: int = 2, **extra: Any) -> dict:
    g = torch.Generator().manual_seed(0)
    kwargs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    kwargs.update(extra)
    return {"kwargs": kwargs}


def torchvision_models() -> dict[str, Callable[[], tuple[torch.nn.Module, dict]]]:
    tv = import_torchvision().models
    return {
        "tv_resnet18": lambda: (tv.resnet18(num_classes=10), _image()),
        "tv_mobilenet_v3_small": lambda: (tv.mobilenet_v3_small(num_classes=10), _image()),
        "tv_efficientnet_b0": lambda: (tv.efficientnet_b0(num_classes=10), _image()),
        "tv_convnext_tiny": lambda: (tv.convnext_tiny(num_classes=10), _image()),
        "tv_vit": lambda: (tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10), _image(32)),
        "tv_swin_t": lambda: (tv.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                                                 window_size=[4, 4], num_classes=10), _image(32)),
    }


def timm_models() -> dict[str, Callable[[], tuple[torch.nn.Module, dict]]]:
    import_torchvision()
    import timm

    return {
        "timm_resnet18": lambda: (timm.create_model("resnet18", pretrained=False, num_classes=10), _image()),
        "timm_vit_tiny": lambda: (timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                                    img_size=32, patch_size=8), _image(32)),
        "timm_convnext_atto": lambda: (timm.create_model("convnext_atto", pretrained=False, num_classes=10),
                                       _image()),
    }


def transformers_models() -> dict[str, Callable[[], tuple[torch.nn.Module, dict]]]:
    import transformers as hf

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    labels = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    return {
        "hf_bert": lambda: (hf.BertForMaskedLM(hf.BertConfig(**small)), _tokens(labels=labels)),
        "hf_gpt2": lambda: (hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100,
                                                             bos_token_id=0, eos_token_id=0)), _tokens(labels=labels)),
        "hf_llama": lambda: (hf.LlamaForCausalLM(hf.LlamaConfig(**small, num_key_value_heads=2, bos_token_id=0,
                                                                eos_token_id=0)), _tokens(labels=labels)),
        "hf_t5": lambda: (hf.T5ForConditionalGeneration(hf.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                                    num_heads=2, vocab_size=100,
                                                                    decoder_start_token_id=0)),
                          _tokens(labels=labels)),
        "hf_bart": lambda: (hf.BartForConditionalGeneration(hf.BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)), _tokens(labels=labels)),
        "hf_vit": lambda: (hf.ViTForImageClassification(hf.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=10)), {"kwargs": {"pixel_values": torch.randn(2, 3, 32, 32)}}),
    }


def zoo() -> dict[str, Callable[[], tuple[torch.nn.Module, dict]]]:
    """Every model: name -> builder returning (model, {"args": ..., "kwargs": ...})."""
    return {**torchvision_models(), **timm_models(), **transformers_models()}


def call(model: torch.nn.Module, inputs: dict) -> Any:
    return model(*inputs.get("args", ()), **inputs.get("kwargs", {}))
