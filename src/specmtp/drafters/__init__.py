"""Drafters behind one interface (base.Drafter); `load_drafter` builds one from what the user names."""

from __future__ import annotations

from specmtp.drafters.base import DraftContext, Drafter, Proposal
from specmtp.drafters.draft_model import DraftModelDrafter
from specmtp.drafters.gemma4_assistant import Gemma4AssistantDrafter
from specmtp.drafters.hybrid import LookupFirst
from specmtp.drafters.mtp import MODEL_TYPE as MTP_TYPE
from specmtp.drafters.mtp import MTPDrafter
from specmtp.drafters.ngram import NgramDrafter
from specmtp.loader import load_model


def load_drafter(ref: str, dtype: str = "fp16", progress: bool = True, weights: str = "dense") -> Drafter:
    """'ngram'; a preset / path / HF id of an MTP drafter, Gemma 4 assistant or draft model sharing the target's
    tokenizer; or 'ngram+REF': copy from the context where it repeats itself, REF's drafts elsewhere.

    dtype: a draft model's weights. Half precision by default: a draft only proposes, the target's verification
    keeps the output exact, and a draft step reads half the bytes (on a CPU, 56 ms instead of 130 ms for
    Qwen2.5-Coder-0.5B). MTP drafters compute in the target's dtype and ignore it.
    weights: "q8" / "q4" quantize a draft model like a target (then it computes in fp32, whatever dtype says)."""
    if ref == "ngram":
        return NgramDrafter()
    if ref.startswith("ngram+"):
        return LookupFirst(load_drafter(ref[len("ngram+") :], dtype, progress, weights))
    from specmtp.checkpoint import read_config
    from specmtp.loader import checkpoint_dir

    path = checkpoint_dir(ref, progress=progress)
    model_type = read_config(path).get("model_type")
    if model_type == "gemma4_assistant":
        return Gemma4AssistantDrafter(path)
    if model_type == MTP_TYPE:
        return MTPDrafter(path)
    loaded = load_model(ref, dtype="fp32" if weights != "dense" else dtype, progress=progress, weights=weights)
    return DraftModelDrafter(loaded.model, loaded.tokenizer.vocab, name=ref)


__all__ = [
    "DraftContext", "Drafter", "Proposal", "DraftModelDrafter", "Gemma4AssistantDrafter", "LookupFirst", "MTPDrafter",
    "NgramDrafter", "load_drafter",
]
