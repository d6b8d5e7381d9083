"""Build the recovery text set the project ships (examples/texts/stdlib.txt) from text every Python install has.

Sources, read without importing anything: the docstrings of the standard library's modules, classes and functions
(parsed with ``ast`` from the ``.py`` files under ``sysconfig``'s stdlib folder, tests and ``site-packages`` left
out) and the help topics of ``pydoc_data/topics.py`` (the language reference text behind ``help('if')``). Each
docstring or topic is cut into paragraphs, code-like paragraphs (doctests, indented blocks, lines full of symbols)
are dropped, and the prose is split into sentences of 5 to 60 words; duplicates are removed and the order shuffled
with a fixed seed; the first ``--dev`` sentences go to a held-out file (``stdlib-dev.txt``). The text is Python's
documentation (PSF License); the output depends on the Python version (the shipped files: Python 3.11).

    .venv/bin/python scripts/make_texts.py        # writes examples/texts/stdlib.txt and stdlib-dev.txt
    .venv/bin/python scripts/make_texts.py --limit 5000 --dev 0 -o /tmp/texts.txt
"""

from __future__ import annotations

import argparse
import ast
import random
import re
import sys
import sysconfig
from pathlib import Path

SKIP_PARTS = {"test", "tests", "site-packages", "dist-packages", "idle_test", "__pycache__", "turtledemo"}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")
WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file (none when it does not parse)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def pydoc_topics(stdlib: Path) -> list[str]:
    """The help topics of ``pydoc_data/topics.py`` (a dict literal), read with ``ast``, not imported."""
    path = stdlib / "pydoc_data" / "topics.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return []
            return [v for v in value.values() if isinstance(v, str)] if isinstance(value, dict) else []
    return []


def is_prose(paragraph: str) -> bool:
    """A paragraph of running text, not code, a table or a list of signatures."""
    lines = paragraph.splitlines()
    if not lines or any(ln.startswith((" ", "\t", ">>>", "...", "$", "%", "*", "-", "+", "|", "=")) for ln in lines):
        return False
    text = " ".join(lines)
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters >= 0.85 * len(text) and not text.rstrip().endswith(":")


def sentences(paragraph: str) -> list[str]:
    text = re.sub(r"\s+", " ", paragraph).strip()
    text = re.sub(r"[`*]", "", text)
    text = re.sub(r":(?:func|class|meth|mod|attr|data|const|exc|ref|term|pep|rfc|keyword|option|envvar):", "", text)
    out = []
    for s in SENTENCE_END.split(text):
        words = WORD.findall(s)
        if 5 <= len(s.split()) <= 60 and len(words) >= 0.7 * len(s.split()) and s[0].isalnum():
            out.append(s)
    return out


def collect(stdlib: Path) -> list[str]:
    """Every sentence from the stdlib's docstrings and help topics, deduplicated, in a fixed order."""
    docs: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP_PARTS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        docs.extend(docstrings(path))
    docs.extend(pydoc_topics(stdlib))
    seen: set[str] = set()
    out = []
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc):
            if not is_prose(para):
                continue
            for s in sentences(para):
                key = s.lower()
                if key not in seen:
                    seen.add(key)
                    out.append(s)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).resolve().parents[1] / "examples" /
                        "texts" / "stdlib.txt")
    parser.add_argument("--limit", type=int, default=None, help="keep at most this many training sentences")
    parser.add_argument("--dev", type=int, default=300, help="held-out sentences, written beside as <name>-dev.txt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = collect(stdlib)
    random.Random(args.seed).shuffle(texts)
    dev, texts = texts[: args.dev], texts[args.dev :]
    if args.limit:
        texts = texts[: args.limit]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    outputs = [(args.output, texts)]
    if dev:
        outputs.append((args.output.with_name(f"{args.output.stem}-dev{args.output.suffix}"), dev))
    for path, part in outputs:
        path.write_text("".join(t + "\n" for t in part), encoding="utf-8")
        words = sum(len(t.split()) for t in part)
        print(f"{path}: {len(part)} sentences, {words} words, from {stdlib} (Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
