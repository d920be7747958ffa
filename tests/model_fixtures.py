"""Tiny random BERT/RoBERTa models from ``transformers`` configs, saved to temporary directories.

Shared by the model, loading and export tests. Everything is built offline and seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

VOCAB = 99
SEQ = 9


def tiny_config(kind: str, **overrides):
    """A tiny ``BertConfig`` (``kind="bert"``) or ``RobertaConfig`` (``"roberta"``): hidden 32, 2 layers."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        num_labels=3,
    )
    common.update(overrides)
    if kind == "bert":
        return transformers.BertConfig(**common)
    if kind in ("roberta", "xlm-roberta"):
        common.setdefault("pad_token_id", 1)
        common.setdefault("type_vocab_size", 1)
        cls = transformers.RobertaConfig if kind == "roberta" else transformers.XLMRobertaConfig
        return cls(**common)
    raise ValueError(kind)


_CLASSES = {
    ("bert", "sequence_classification"): transformers.BertForSequenceClassification,
    ("bert", "base"): transformers.BertModel,
    ("roberta", "sequence_classification"): transformers.RobertaForSequenceClassification,
    ("roberta", "base"): transformers.RobertaModel,
    ("xlm-roberta", "sequence_classification"): transformers.XLMRobertaForSequenceClassification,
}


def torch_model(kind: str, task: str = "sequence_classification", seed: int = 0, **overrides):
    """A seeded random ``transformers`` model in eval mode; biases and LayerNorms randomised too, so
    that a wrongly mapped bias or norm parameter cannot go unnoticed."""
    torch.manual_seed(seed)
    model = _CLASSES[(kind, task)](tiny_config(kind, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save(model, path: Path, **kwargs) -> Path:
    """``model.save_pretrained(path, **kwargs)``; returns ``path``."""
    model.save_pretrained(str(path), **kwargs)
    return path


def save_bin(model, path: Path) -> Path:
    """The legacy PyTorch format: ``config.json`` + ``pytorch_model.bin`` (``torch.save`` of the state
    dict, what ``save_pretrained(safe_serialization=False)`` wrote before transformers 5 removed it)."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(path))
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def batch(config, seed: int = 0, batch_size: int = 3) -> dict[str, np.ndarray]:
    """``input_ids``/``attention_mask`` ``(B, SEQ)`` int with right padding (row 1 from 5, row 2 from 2)
    and, for BERT, random ``token_type_ids``."""
    rng = np.random.RandomState(seed)
    pad = config.pad_token_id
    ids = rng.randint(3, config.vocab_size, (batch_size, SEQ)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = pad
    out = {"input_ids": ids, "attention_mask": mask}
    if config.type_vocab_size > 1:
        out["token_type_ids"] = (rng.rand(batch_size, SEQ) > 0.5).astype(np.int64) * mask
    return out


def torch_forward(model, b: dict[str, np.ndarray]):
    """The torch model's output (with hidden states) on a NumPy batch."""
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in b.items()}, output_hidden_states=True)


def tiny_tokenizer(path: Path) -> transformers.BertTokenizer:
    """A ``BertTokenizer`` over a ``VOCAB``-entry word-piece vocabulary, written to ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    return transformers.BertTokenizer(str(path / "vocab.txt"))
