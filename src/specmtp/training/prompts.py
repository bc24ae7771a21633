"""An offline prompt set for self-distillation, built from what every Python installation has.

Code prompts come from the standard library's own functions ("explain this function", "continue this code",
"write a function that <its docstring>", "add type hints") and from small programming tasks in several
languages; chat prompts from instruction templates over a list of everyday and technical topics, and from
everyday writing tasks (emails, stories, how-tos, translations). Deterministic for a seed. The benchmark prompts
are never produced: `build_prompts` drops any prompt that appears in the file passed as `exclude`.

Prompt set 4 also asks the target for requests of its own (`own_requests`): an instruct model given its chat
template up to the user's turn writes the kind of request it was tuned to answer (Magpie), which templates over a
list of topics do not cover; requests close to an excluded prompt are dropped too.
"""

from __future__ import annotations

import ast
import functools
import itertools
import json
import random
import re
import sysconfig
from collections.abc import Iterator
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

# prompt set 2 adds these (set 1, the default before, is kept for the runs it built)
TOPICS_2 = (
    "the water wheel", "glaciers", "the Silk Road", "octopuses", "the history of chocolate", "tax returns",
    "job interviews", "composting", "the human brain", "submarines", "origami", "sourdough starters", "tides",
    "the Industrial Revolution", "password managers", "spreadsheets", "first aid", "wind turbines", "the Amazon river",
    "photography basics", "the stock exchange crash of 1929", "penguins", "recycling plastics", "typography",
    "the metric system", "insomnia", "volunteering", "container shipping", "the Byzantine Empire", "electric guitars",
    "hiking safety", "mortgages", "3D printing", "the placebo effect", "lightning", "bonsai trees",
    "the Apollo program", "podcasting", "cryptography history", "desert ecosystems", "saving for retirement",
    "the violin", "quantum computing", "urban gardening", "the Mongol Empire", "airplane wings", "fermentation",
    "learning to swim", "open-source software", "the Fibonacci sequence in nature",
)
TEMPLATES_2 = (
    "Write a short FAQ with three questions and answers about {t}.",
    "Explain {t} using an everyday analogy.",
    "Write a paragraph for a school textbook about {t}.",
    "What should a beginner know before getting started with {t}?",
    "Write a short news-style report about a recent development in {t}.",
    "Give a numbered list of key terms related to {t}, each with a one-line definition.",
    "Answer as a friendly expert: why does {t} matter today?",
    "Write a short persuasive paragraph encouraging people to learn about {t}.",
)
TASKS_2 = (
    "Write a short apology message from {who} who missed an appointment.",
    "Write a cover letter opening paragraph for {who} applying for a new job.",
    "Plan a simple three-course dinner that {who} could cook on a weeknight.",
    "Write a short motivational message for {who} starting a new challenge.",
    "Suggest a reading list of five kinds of books for {who}, with a reason for each.",
    "Write a short diary entry by {who} about an ordinary day.",
)

TASKS = (  # everyday writing for or about a person
    "Write a short email to {who} asking to move a meeting to next week.",
    "Write a thank-you note to {who} for their help with a project.",
    "Write a short story about {who} who discovers something unexpected.",
    "Give {who} step-by-step instructions for planting a tree.",
    "Write a short speech that {who} could give at a farewell party.",
    "Suggest a weekly exercise plan for {who}.",
    "Give {who} five ideas for a rainy weekend.",
    "Write a short product review of a pair of running shoes, as {who} would.",
    "Describe a typical morning routine of {who}.",
    "Write a limerick about {who}.",
)
WHO = ("a teacher", "a busy parent", "a software engineer", "a student", "a retired sailor", "a new neighbour",
       "a small-business owner", "a nurse", "a librarian", "a gardener", "a team manager", "a young musician")
LANGS = ("French", "Spanish", "German", "Italian")
SENTENCES = ("The train leaves at eight and arrives before noon.", "Please close the window when you leave.",
             "My sister is learning to play the violin.", "We are going to the market on Saturday.",
             "The museum is free on the first Sunday of every month.",
             "It rained all night, but the morning was sunny.")
CODE_TASKS = (
    "reverses the words in a sentence", "checks whether a string is a palindrome", "counts the vowels in a string",
    "returns the largest element of a list", "removes duplicates from a list while keeping the order",
    "computes the factorial of a number recursively", "flattens a nested list", "converts Celsius to Fahrenheit",
    "checks whether a year is a leap year", "returns the greatest common divisor of two numbers",
    "splits a list into chunks of a given size", "counts word frequencies in a text",
    "validates an email address with a regular expression", "rotates a matrix by 90 degrees",
    "finds the second smallest number in a list", "converts a Roman numeral to an integer",
    "computes the moving average of a list", "groups a list of words by their first letter",
    "returns the intersection of two lists", "capitalizes the first letter of every word",
)
CODE_LANGS = ("Python", "JavaScript", "TypeScript", "Go", "Rust", "Java", "C")

# prompt set 3 adds programming tasks of more kinds (data structures, algorithms, text and file handling, small
# programs and queries) in more forms (a function, a class, a script, an explanation beside the code)
CODE_TASKS_3 = (
    "implements a queue with two stacks", "checks whether two strings are anagrams", "finds all duplicates in a list",
    "computes the power set of a set", "implements insertion sort", "implements quicksort",
    "implements a least-recently-used cache", "counts the islands in a grid of 0s and 1s",
    "finds the longest common prefix of a list of strings", "checks whether parentheses in a string are balanced",
    "converts an integer to its binary representation", "computes the nth triangular number",
    "returns the k most frequent elements of a list", "implements depth-first search on an adjacency list",
    "implements breadth-first search on a graph", "finds the shortest path in an unweighted graph",
    "transposes a matrix", "multiplies two matrices", "reads a text file and prints its ten most common words",
    "parses a date string in ISO format and returns the weekday", "formats a number of seconds as hours, minutes "
    "and seconds", "generates a random password of a given length", "implements a binary search tree with insert "
    "and search", "computes the Levenshtein distance between two strings", "implements a trie for word lookup",
    "checks whether a number is an Armstrong number", "merges overlapping intervals", "finds the majority element "
    "of a list", "computes the running median of a stream of numbers", "implements run-length encoding",
    "shuffles a list in place with the Fisher-Yates algorithm", "computes the sum of the digits of a number",
    "returns all permutations of a string", "finds the maximum subarray sum", "validates an IPv4 address",
    "converts a snake_case string to camelCase", "implements a simple token bucket rate limiter",
    "retries a function call with exponential backoff", "memoizes a function with a dictionary",
    "computes the area of a polygon from its vertices", "implements a min-heap", "detects a cycle in a linked list",
    "reverses a singly linked list", "finds the lowest common ancestor of two nodes in a binary tree",
    "serializes a binary tree to a string and back", "counts the words in each line of a file",
    "chunks a string into lines of at most a given width", "finds pairs in a list that sum to a target",
    "removes comments from lines of source code", "computes a histogram of values in a list",
)
CODE_LANGS_3 = ("Python", "JavaScript", "TypeScript", "Go", "Rust", "Java", "C", "C++", "C#", "Kotlin", "Ruby",
                "Bash", "PHP", "Swift")
CODE_FORMS_3 = (
    "Write a {lang} function that {task}.",
    "Write a {lang} function that {task}, with a short comment explaining how it works.",
    "In {lang}, implement a program that {task}, and explain its time complexity briefly.",
    "Show how to write code that {task} in {lang}, with an example call.",
    "Write a {lang} class or module that {task}, with tests.",
)
SQL_TASKS_3 = (
    "returns the number of orders per customer, largest first, from orders(id, customer_id, amount)",
    "lists employees who earn more than their manager, from employees(id, name, salary, manager_id)",
    "finds products that were never ordered, from products(id, name) and order_items(order_id, product_id)",
    "computes the average rating per movie with at least ten ratings, from ratings(movie_id, user_id, stars)",
    "returns each department's highest paid employee, from employees(id, name, salary, department)",
    "counts new users per month, from users(id, created_at)",
    "deletes duplicate rows from emails(id, address), keeping the lowest id",
    "returns the running total of sales by day, from sales(day, amount)",
)

CODE_TEMPLATES = (
    "Explain what this Python function does:\n```python\n{src}\n```",
    "Continue this Python code:\n```python\n{head}\n```",
    "Write a Python function `{name}` that does the following: {doc}",
    "Add type hints and a short docstring to this function:\n```python\n{src}\n```",
    "Write two pytest unit tests for this function:\n```python\n{src}\n```",
    "Refactor this Python function to be easier to read:\n```python\n{src}\n```",
)


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)")


def _source_lines(text: str) -> list[str]:
    """Lines with their endings, split where `ast` splits them (\r\n, \r, \n)."""
    lines = _LINE.findall(text)
    rest = text[sum(map(len, lines)) :]
    return lines + [rest] if rest else lines


def _segment(lines: list[str], node: ast.AST) -> str:
    """ast.get_source_segment(text, node) from lines split once per file (it re-splits the file on every call)."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first].encode()[node.col_offset : node.end_col_offset].decode()
    return "".join([lines[first].encode()[node.col_offset :].decode(), *lines[first + 1 : last],
                    lines[last].encode()[: node.end_col_offset].decode()])


def _stdlib_files() -> list[Path]:
    """The standard library's top-level modules, sorted."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _parsed(files: list[Path]) -> Iterator[tuple[Path, str, ast.Module]]:
    """(path, source, syntax tree) of each file that reads and parses; the others are skipped."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
            yield path, text, ast.parse(text)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue


@functools.lru_cache(maxsize=2)
def _stdlib_functions(limit_files: int = 400) -> tuple[tuple[str, str, str], ...]:
    """(name, source, first docstring line) of small documented stdlib functions, in a fixed order."""
    out = []
    for _, text, tree in _parsed([p for p in _stdlib_files() if not p.name.startswith("_")][:limit_files]):
        lines = _source_lines(text)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            src = _segment(lines, node)
            if not doc or not src or not 150 <= len(src) <= 1200:
                continue
            line = doc.strip().splitlines()[0].strip()
            if len(line) > 20:
                out.append((node.name, src, line))
    return tuple(out)


RAW_WINDOWS_PER_TEXT = 3
RAW_CODE_ASKS = (
    "Show me the source code of the Python standard library module `{name}`.",
    "Continue writing the Python module `{name}`.",
    "Write part of a Python module like `{name}` from the standard library.",
)
RAW_PROSE_ASKS = (
    "Explain {name} in Python.",
    "What does the Python documentation say about {name}?",
    "Describe {name} in detail.",
)


@functools.lru_cache(maxsize=1)
def _prose() -> tuple[tuple[str, str], ...]:
    """(title, text): the language reference topics shipped with pydoc, and the long docstrings of stdlib modules,
    classes and functions (English prose about code)."""
    out: list[tuple[str, str]] = []
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    out += [(f"`{name}`", text) for name, text in sorted(topics.items()) if len(text) > 400]
    for path, _, tree in _parsed(_stdlib_files()):
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 400:
                    name = path.stem if isinstance(node, ast.Module) else f"{path.stem}.{node.name}"
                    out.append((f"`{name}`", doc))
    return tuple(out)


def _readable(files: list[Path]) -> Iterator[tuple[Path, str]]:
    """(path, text) of each file that reads as UTF-8."""
    for path in files:
        try:
            yield path, path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def raw_answers(target, tokens: int, max_len: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """About `tokens` tokens of text the target reads rather than writes (teacher-forced, at prefill speed): windows
    of standard-library source and of its documentation prose, each as the answer to a request for it in the
    target's chat format (or after BOS where it has none). Returns (token ids, prompt length) per window, at most
    max_len tokens each; code and prose alternate."""
    rng = random.Random(seed + 1)
    files = _stdlib_files()
    rng.shuffle(files)
    prose = list(_prose())
    rng.shuffle(prose)
    code = ((RAW_CODE_ASKS[i % len(RAW_CODE_ASKS)].format(name=path.stem), f"```python\n{text}")
            for i, (path, text) in enumerate(_readable(files)))
    docs = ((RAW_PROSE_ASKS[i % len(RAW_PROSE_ASKS)].format(name=name), text) for i, (name, text) in enumerate(prose))
    tok = target.tokenizer
    bos = [target.config.bos_token_id] if target.config.bos_token_id is not None else []
    out: list[tuple[list[int], int]] = []
    total = 0
    for pair in itertools.zip_longest(code, docs):  # code, prose, code, ...; until the code runs out
        if pair[0] is None:
            break
        for ask, text in (p for p in pair if p is not None):
            head = tok.encode_chat(ask) if tok.has_chat_template else bos
            body = tok.encode(text, add_special_tokens=False)
            room = max_len - len(head)
            starts = range(0, max(1, len(body) - 32), room)
            for i in starts[:RAW_WINDOWS_PER_TEXT]:  # a long text gives a few windows, each after the request
                window = head + body[i : i + room]
                out.append((window, len(head)))
                total += len(window)
                if total >= tokens or room < 64:
                    break
            if total >= tokens:
                return out
    return out


PROMPT_SETS = (1, 2, 3, 4)
OWN_SHARE = 4  # prompt set 4: a quarter of the prompts are the target's own requests (half of the chat share)
# how a request starts: nothing (the target's free choice of request) or an opening word it continues
OPENERS = ("", "", "", "", "Write", "Explain", "What", "How", "Give me", "Describe", "List", "Can you", "Summarize",
           "Why", "Translate", "Help me", "Tell me", "Compare", "Suggest", "Create")
REQUEST_TOKENS = 64  # a request still open after this many tokens is dropped (long ones ramble)


def _banned(exclude: str | Path | None) -> set[str]:
    """The prompts of a JSONL file (each line's "prompt"), or none."""
    if exclude is None or not Path(exclude).is_file():
        return set()
    return {json.loads(line)["prompt"] for line in Path(exclude).read_text().splitlines() if line.strip()}


@functools.lru_cache(maxsize=4096)
def _profile(text: str) -> tuple[frozenset[str], frozenset[tuple[str, ...]]]:
    """A text's lower-cased words and its runs of 5 of them (each excluded prompt's computed once)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return frozenset(words), frozenset(tuple(words[i : i + 5]) for i in range(len(words) - 4))


def near(text: str, banned: set[str]) -> bool:
    """Whether a request is close to an excluded prompt: half or more of their words shared (Jaccard), or any run
    of 5 words in common."""
    words, grams = _profile(text)
    for b in banned:
        other, other_grams = _profile(b)
        union = words | other
        if union and len(words & other) / len(union) >= 0.5:
            return True
        if grams & other_grams:
            return True
    return False


def _plain(text: str) -> bool:
    """A request worth answering: 4 to 80 words, almost all printable ASCII."""
    n = len(text.split())
    ascii_share = sum(32 <= ord(c) < 127 or c in "\n\t" for c in text) / max(1, len(text))
    return 4 <= n <= 80 and ascii_share >= 0.97


def own_requests(target, n: int, seed: int = 0, exclude: str | Path | None = None, batch: int = 64,
                 progress: bool = False) -> list[str]:
    """Up to n distinct requests the target writes itself (Magpie): its chat template up to the user's turn,
    sometimes an opening word (OPENERS), then sampled at temperature 1 until it ends the turn. Requests that do not
    end within REQUEST_TOKENS, are short, not plain text, or close to an excluded prompt (`near`) are dropped.
    Deterministic for a seed. A target without a chat template has no user's turn: none."""
    from tqdm import tqdm

    from specmtp.engine import Engine
    from specmtp.sampling import SamplingParams

    tok = target.tokenizer
    if n <= 0 or not tok.has_chat_template:
        return []
    mark = "\x00REQUEST\x00"
    text = tok.hf.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False)
    head = tok.encode(text.split(mark)[0], add_special_tokens=False)
    banned = _banned(exclude)
    engine = Engine(target)
    rng = random.Random(seed + 4)
    out: dict[str, None] = {}
    bar = tqdm(total=n, desc="asking", unit="request", disable=not progress)
    for round_ in range(max(4, 8 * n // batch)):  # gives up when too few requests pass (a weak target)
        openers = [rng.choice(OPENERS) for _ in range(batch)]
        starts = [tok.encode(o, add_special_tokens=False) if o else [] for o in openers]
        done = engine.generate([head + s for s in starts], max_new_tokens=REQUEST_TOKENS,
                               sampling=SamplingParams(temperature=1.0, top_p=0.98, seed=seed * 1_000_003 + round_))
        for s, c in zip(starts, done, strict=True):
            req = tok.decode(s + c.tokens).strip()
            if c.finish_reason == "eos" and _plain(req) and req not in out and not near(req, banned):
                out[req] = None
                bar.update(1)
        if len(out) >= n:
            break
    bar.close()
    return list(out)[:n]


def build_prompts(n: int, seed: int = 0, code_share: float = 0.5, exclude: str | Path | None = None,
                  prompt_set: int = 2) -> list[str]:
    """n prompts, about `code_share` of them about code, the rest chat; never one of the excluded prompts.
    prompt_set 2 draws its chat prompts from more topics, instruction templates and writing tasks than set 1
    (whose prompts, for the runs that used it, stay as they were)."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set} (choose from {PROMPT_SETS})")
    rng = random.Random(seed)
    banned = _banned(exclude)
    funcs = list(_stdlib_functions())
    rng.shuffle(funcs)
    chat = [t.format(t=topic) for topic in TOPICS for t in TEMPLATES]
    chat += [t.format(who=who) for who in WHO for t in TASKS]
    chat += [f"Translate to {lang}: {text}" for lang in LANGS for text in SENTENCES]
    if prompt_set >= 2:
        chat += [t.format(t=topic) for topic in TOPICS + TOPICS_2 for t in TEMPLATES_2]
        chat += [t.format(t=topic) for topic in TOPICS_2 for t in TEMPLATES]
        chat += [t.format(who=who) for who in WHO for t in TASKS_2]
    rng.shuffle(chat)
    tasks = [f"Write a {lang} function that {task}." for lang in CODE_LANGS for task in CODE_TASKS]
    share = 4  # a quarter of the code prompts: small programming tasks
    if prompt_set >= 3:  # half of them, drawn from many more tasks, languages and forms
        tasks += [form.format(lang=lang, task=task) for task in CODE_TASKS + CODE_TASKS_3 for lang in CODE_LANGS_3
                  for form in CODE_FORMS_3]
        tasks += [f"Write a SQL query that {task}." for task in SQL_TASKS_3]
        share = 2
    rng.shuffle(tasks)
    n_tasks = min(int(n * code_share) // share, len(tasks))
    prompts: list[str] = tasks[:n_tasks]
    n_code = min(int(n * code_share) - n_tasks, len(funcs)) if funcs else 0
    for i in range(n_code):
        name, src, doc = funcs[i]
        lines = src.splitlines()
        head = "\n".join(lines[: max(2, len(lines) // 2)])
        template = CODE_TEMPLATES[i % len(CODE_TEMPLATES)]
        prompts.append(template.format(src=src, head=head, name=name, doc=doc))
    prompts += chat[: n - len(prompts)]
    rng.shuffle(prompts)
    if prompt_set >= 2:  # (two stdlib functions can make the same prompt)
        prompts = list(dict.fromkeys(prompts))
    return [p for p in prompts if p not in banned]
