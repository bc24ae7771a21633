"""specmtp: speculative decoding with multi-token-prediction drafters, fast on an ordinary CPU.

    import specmtp
    target = specmtp.load_model("smollm2-135m")
    engine = specmtp.Engine(target, drafter=specmtp.load_drafter("ngram"), num_draft_tokens=4)
    print(engine.generate(["The capital of France is"], max_new_tokens=32)[0].text)
    for piece in engine.stream("Tell me a joke.", chat=True):
        print(piece, end="", flush=True)
"""

from specmtp.drafters import Drafter, load_drafter
from specmtp.engine import Completion, Engine, Stats
from specmtp.errors import SpecMTPError
from specmtp.loader import LoadedModel, load_model
from specmtp.sampling import SamplingParams

__all__ = [
    "Completion", "Drafter", "Engine", "LoadedModel", "SamplingParams", "SpecMTPError", "Stats",
    "load_drafter", "load_model",
]
