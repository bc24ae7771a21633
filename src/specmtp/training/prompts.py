"""An offline prompt set for self-distillation, built from what every Python installation has.

Code prompts come from the standard library's own functions ("explain this function", "continue this code",
"write a function that <its docstring>", "add type hints"); chat prompts from instruction templates over a
list of everyday and technical topics. Deterministic for a seed. The benchmark prompts are never produced:
`build_prompts` drops any prompt that appears in the file passed as `exclude`.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path

TOPICS = (
    "photosynthesis", "the French Revolution", "compound interest", "black holes", "the immune system",
    "recursion in programming", "version control with git", "the stock market", "volcanoes", "machine learning",
    "the Roman Empire", "healthy sleep habits", "public speaking", "electric cars", "the internet",
    "coral reefs", "time management", "the theory of evolution", "renewable energy", "bread baking",
    "the human heart", "earthquakes", "budgeting", "learning a new language", "the moon landing",
    "databases", "operating systems", "encryption", "bees and pollination", "the printing press",
    "marathon training", "vaccines", "sorting algorithms", "the water table", "jazz music", "chess openings",
    "rainforests", "unit testing", "ancient Egypt", "gardening for beginners", "cloud computing", "gravity",
    "the periodic table", "remote teamwork", "compilers", "climate change", "the Olympic Games", "meditation",
    "linked lists", "the Renaissance", "solar panels", "credit scores", "DNA", "web browsers", "bicycles",
    "the Great Wall of China", "regular expressions", "bird migration", "supply and demand", "neural networks",
)

TEMPLATES = (
    "Explain {t} to a beginner in a short paragraph.",
    "Give me five interesting facts about {t}.",
    "What are the pros and cons of {t}? Answer briefly.",
    "Write a short poem about {t}.",
    "Summarize the key ideas of {t} in three bullet points.",
    "How would you teach {t} to a twelve-year-old?",
    "Write a short dialogue between two friends discussing {t}.",
    "What are common misconceptions about {t}?",
    "Describe the history of {t} in a few sentences.",
    "Write a short blog introduction about {t}.",
)

CODE_TEMPLATES = (
    "Explain what this Python function does:\n```python\n{src}\n```",
    "Continue this Python code:\n```python\n{head}\n```",
    "Write a Python function `{name}` that does the following: {doc}",
    "Add type hints and a short docstring to this function:\n```python\n{src}\n```",
    "Write two pytest unit tests for this function:\n```python\n{src}\n```",
    "Refactor this Python function to be easier to read:\n```python\n{src}\n```",
)


def _stdlib_functions(limit_files: int = 400) -> list[tuple[str, str, str]]:
    """(name, source, first docstring line) of small documented stdlib functions, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))[:limit_files]
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            src = ast.get_source_segment(text, node)
            if not doc or not src or not 150 <= len(src) <= 1200:
                continue
            line = doc.strip().splitlines()[0].strip()
            if len(line) > 20:
                out.append((node.name, src, line))
    return out


def raw_windows(target, tokens: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """About `tokens` tokens of standard-library source, as windows of at most max_len tokens (shuffled files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    random.Random(seed + 1).shuffle(files)
    bos = target.config.bos_token_id
    out, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ids = target.tokenizer.encode(text, add_special_tokens=False)
        for i in range(0, len(ids) - 32, max_len - 1):
            window = ([bos] if bos is not None else []) + ids[i : i + max_len - 1]
            out.append(window)
            total += len(window)
            if total >= tokens:
                return out
    return out


def build_prompts(n: int, seed: int = 0, code_share: float = 0.5, exclude: str | Path | None = None) -> list[str]:
    """n prompts, about `code_share` of them about code, the rest chat; never one of the excluded prompts."""
    rng = random.Random(seed)
    banned = set()
    if exclude is not None and Path(exclude).is_file():
        banned = {json.loads(line)["prompt"] for line in Path(exclude).read_text().splitlines() if line.strip()}
    funcs = _stdlib_functions()
    rng.shuffle(funcs)
    chat = [t.format(t=topic) for topic in TOPICS for t in TEMPLATES]
    rng.shuffle(chat)
    prompts: list[str] = []
    n_code = min(int(n * code_share), len(funcs)) if funcs else 0
    for i in range(n_code):
        name, src, doc = funcs[i]
        lines = src.splitlines()
        head = "\n".join(lines[: max(2, len(lines) // 2)])
        template = CODE_TEMPLATES[i % len(CODE_TEMPLATES)]
        prompts.append(template.format(src=src, head=head, name=name, doc=doc))
    prompts += chat[: n - len(prompts)]
    rng.shuffle(prompts)
    return [p for p in prompts if p not in banned]
