"""A larger real-English corpus for the model family (`fam-*`), built from text that ships in Debian packages.

Sources (docs/corpus.md gives sizes and the rebuild recipe): the Linux kernel's documentation (reST), Python's
HTML documentation, Perl's POD manuals, WordNet's synsets and glosses, the King James Bible (one document a
chapter) and gensim's Wikipedia dump (samples/wiki_corpus.py). Each document is cleaned to plain text; a document
whose normalized text (lower case, letters and digits only, single spaces) hashes like an earlier one is dropped;
documents are split train / held-out by a seeded hash of their id, so no document straddles the split. Tokens
are bytes, as in samples/wiki_corpus.py. Built once into the compressor cache (COMPRESSOR_CACHE) with a manifest
(sources, package versions, document counts, bytes, sha256): `python -m samples.text_corpus build`.
"""
import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from samples.wiki_corpus import cache_dir

CORPUS_VERSION = 1
SPLIT_SEED = 0
HELDOUT_PER_MILLE = 30  # 3% of documents are held out
MIN_DOC_BYTES = 200  # shorter cleaned documents (stubs, index pages) are dropped
MAX_NON_ASCII = 0.05  # documents with more non-ASCII bytes than this are not English text
WORDNET_SYNSETS_PER_DOC = 100
MANIFEST_IN_REPO = Path(__file__).parent / "data" / "text-corpus-manifest.json"
SPLITS = ("train", "heldout")
DOC_SEPARATOR = "\n\n"

KERNEL_DOCS = Path("/usr/share/doc/linux-doc-6.1/Documentation")
PYTHON_HTML = Path("/usr/share/doc/python3.11/html")
PERL_POD = Path("/usr/share/perl")
WORDNET = Path("/usr/share/wordnet")


class SourceMissing(RuntimeError):
    """A source's files are not installed; the message is one line naming what to install."""


# ---------------------------------------------------------------------------------------------- cleaning ----

_RST_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.(\s+([\w:-]+)::.*|\s.*|)$")
_RST_FIELD = re.compile(r"^\s*:[\w -]+:(\s.*)?$")
_RST_ROLE = re.compile(r":[\w:+.-]+:`([^`]*)`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>`]*>`_{0,2}")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_REFERENCE = re.compile(r"`([^`]+)`_{0,2}")
_RST_STRONG = re.compile(r"\*\*([^*\n]+)\*\*")
_RST_EMPHASIS = re.compile(r"(?<![\w*])\*([^*\s][^*\n]*?)\*(?![\w*])")
_RST_KEEP_BODY = {"note", "warning", "attention", "caution", "danger", "error", "hint", "important", "tip",
                  "admonition", "seealso", "deprecated", "versionadded", "versionchanged", "topic", "sidebar",
                  "rubric", "epigraph", "highlights", "glossary", "table", "list-table", "flat-table",
                  "tabularcolumns", "only", "container", "class", "c:function", "c:type", "c:macro",
                  "c:struct", "c:member", "function", "describe", "option"}


def _role_text(match: re.Match) -> str:
    inner = match.group(1)
    if "<" in inner and inner.endswith(">"):
        inner = inner[: inner.index("<")].strip()
    return inner.lstrip("~!")


def _blank_runs(lines: Iterable[str]) -> str:
    """Lines stripped on the right, runs of blank lines collapsed to one, no blank lines at either end."""
    out: list[str] = []
    for line in lines:
        line = line.rstrip()
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def clean_rst(text: str) -> str:
    """reStructuredText -> plain text: section underlines, comments, field lists and the bodies of non-prose
    directives (toctree, code-block, kernel-doc, ...) dropped; roles, links, literals and emphasis unwrapped."""
    lines = text.splitlines()
    kept: list[str] = []
    skip_indent: int | None = None  # inside a dropped block: lines indented deeper than this are skipped
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        directive = _RST_DIRECTIVE.match(line)
        if directive:
            name = directive.group(3)
            if name not in _RST_KEEP_BODY:
                skip_indent = indent
            continue
        if _RST_UNDERLINE.match(line) or _RST_FIELD.match(line):
            continue
        line = _RST_ROLE.sub(_role_text, line)
        line = _RST_LINK.sub(r"\1", line)
        line = _RST_LITERAL.sub(r"\1", line)
        line = _RST_REFERENCE.sub(r"\1", line)
        line = _RST_STRONG.sub(r"\1", line)
        line = _RST_EMPHASIS.sub(r"\1", line)
        if line.rstrip().endswith("::"):
            line = line.rstrip()[:-1]
        kept.append(line.replace("|", "") if line.count("|") >= 2 and line.lstrip().startswith("|") else line)
    return _blank_runs(kept)


_BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
               "tr", "table", "section", "blockquote", "figure", "caption", "hr"}


class _MainText(HTMLParser):
    """Text of the element `<div role="main">` (Sphinx's page body), blocks on their own lines, <pre> verbatim."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0  # nesting of <div> inside the main div; 0 = outside it
        self.skip = 0  # inside <script>/<style> or a Sphinx header link (the ¶ anchors)
        self.pre = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if not self.depth:
            if tag == "div" and attributes.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag in ("script", "style") or (tag == "a" and "headerlink" in (attributes.get("class") or "")):
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if not self.depth:
            return
        if tag == "div":
            self.depth -= 1
        if tag in ("script", "style", "a") and self.skip:
            self.skip -= 1
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """The main body of a Sphinx HTML page as plain text (navigation, scripts and ¶ anchors dropped)."""
    parser = _MainText()
    parser.feed(html)
    parser.close()
    return _blank_runs(line.strip() if not line.startswith(" ") else line
                       for line in "".join(parser.parts).splitlines())


_POD_CODE = re.compile(r"[IBCFSLXZE]<(?:<+\s(.*?)\s>+|([^<>]*))>", re.S)
_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _pod_code(match: re.Match) -> str:
    code, inner = match.group(0)[0], match.group(1) if match.group(1) is not None else match.group(2)
    if code in "XZ":
        return ""
    if code == "E":
        return _POD_ENTITIES.get(inner, chr(int(inner)) if inner.isdigit() else "")
    if code == "L":
        return inner.split("|", 1)[0] if "|" in inner else inner.strip('"').split("/")[-1].strip('"')
    return inner


def clean_pod(text: str) -> str:
    """Perl POD -> plain text: headings kept as lines, =item bullets, formatting codes unwrapped, commands and
    =begin/=for blocks dropped."""
    kept: list[str] = []
    in_begin = False
    for line in text.splitlines():
        if line.startswith("="):
            command, _, rest = line[1:].partition(" ")
            if command == "begin":
                in_begin = True
            elif command == "end":
                in_begin = False
            elif command.startswith("head"):
                kept += ["", rest.strip(), ""]
            elif command == "item":
                kept.append("* " + rest.strip().lstrip("*").strip() if rest.strip() not in ("*", "") else "*")
            continue
        if not in_begin:
            kept.append(line)
    body = "\n".join(kept)
    for _ in range(4):  # nested codes (B<C<x>>) unwrap from the inside out
        body, changed = _POD_CODE.subn(_pod_code, body)
        if not changed:
            break
    return _blank_runs(body.splitlines())


def wordnet_synset_line(line: str) -> str | None:
    """One line of WordNet's data.{noun,verb,adj,adv} -> "lemma, lemma: gloss", or None for the license header."""
    if line.startswith("  ") or "|" not in line:
        return None
    fields, gloss = line.split("|", 1)
    parts = fields.split()
    count = int(parts[3], 16)
    lemmas = [re.sub(r"\(\w+\)$", "", parts[4 + 2 * i]).replace("_", " ") for i in range(count)]
    return f"{', '.join(lemmas)}: {gloss.strip()}"


def kjv_chapters(text: str) -> Iterator[tuple[str, str]]:
    """`bible -l0 Gen1:1-Rev22:21` output -> (chapter heading, "heading\\nverse 1 ...") per chapter."""
    heading, verses = None, []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            if heading and verses:
                yield heading, "\n".join([heading, *verses])
            heading, verses = line.strip(), []
        else:
            verses.append(line.strip())
    if heading and verses:
        yield heading, "\n".join([heading, *verses])


def normalized_key(text: str) -> str:
    """The dedup key: sha1 of the text lower-cased with every run of non-alphanumerics made one space."""
    return hashlib.sha1(re.sub(r"[^a-z0-9]+", " ", text.lower()).strip().encode()).hexdigest()


def split_of(doc_id: str, seed: int = SPLIT_SEED, heldout_per_mille: int = HELDOUT_PER_MILLE) -> str:
    return "heldout" if _rank(doc_id, seed) % 1000 < heldout_per_mille else "train"


def _rank(doc_id: str, seed: int = SPLIT_SEED) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")


# ----------------------------------------------------------------------------------------------- sources ----

@dataclass(frozen=True)
class TextSource:
    name: str
    package: str  # what provides it (Debian package, or pip for gensim)
    install: str  # the one-line fix when it is missing
    documents: Callable[[], Iterator[tuple[str, str]]]  # -> (document id, cleaned text), in a stable order


def _require(path: Path, install: str) -> Path:
    if not path.exists():
        raise SourceMissing(f"{path} not found: {install}")
    return path


def _kernel_docs() -> Iterator[tuple[str, str]]:
    root = _require(KERNEL_DOCS, "apt-get install linux-doc-6.1")
    for path in sorted(root.rglob("*.rst.gz")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith("translations/"):  # not English
            continue
        yield f"kernel/{relative}", clean_rst(gzip.decompress(path.read_bytes()).decode("utf-8", "replace"))


def _python_docs() -> Iterator[tuple[str, str]]:
    root = _require(PYTHON_HTML, "apt-get install python3.11-doc")
    for path in sorted(root.rglob("*.html")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("_", "genindex")) or relative in ("search.html", "py-modindex.html"):
            continue
        yield f"python/{relative}", html_to_text(path.read_text(encoding="utf-8", errors="replace"))


def _perl_docs() -> Iterator[tuple[str, str]]:
    # /usr/share/perl/5.36 links to 5.36.0: each file once
    pods = sorted({p.resolve() for p in _require(PERL_POD, "apt-get install perl-doc").glob("*/pod/*.pod")})
    if not pods:
        raise SourceMissing(f"no {PERL_POD}/*/pod/*.pod found: apt-get install perl-doc")
    for path in pods:
        yield f"perl/{path.name}", clean_pod(path.read_text(encoding="utf-8", errors="replace"))


def _wordnet() -> Iterator[tuple[str, str]]:
    root = _require(WORDNET, "apt-get install wordnet-base")
    for pos in ("noun", "verb", "adj", "adv"):
        lines = [s for s in map(wordnet_synset_line, (root / f"data.{pos}").read_text(encoding="latin-1")
                                .splitlines()) if s]
        for start in range(0, len(lines), WORDNET_SYNSETS_PER_DOC):
            yield f"wordnet/{pos}/{start // WORDNET_SYNSETS_PER_DOC:04d}", "\n".join(
                lines[start : start + WORDNET_SYNSETS_PER_DOC])


def _kjv() -> Iterator[tuple[str, str]]:
    try:
        text = subprocess.run(["bible", "-l0", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                              check=True, stdin=subprocess.DEVNULL).stdout
    except (FileNotFoundError, subprocess.CalledProcessError):
        raise SourceMissing("the `bible` program (King James text) is missing: apt-get install bible-kjv") from None
    for heading, chapter in kjv_chapters(text):
        yield f"kjv/{heading}", chapter


def _wiki() -> Iterator[tuple[str, str]]:
    from samples import wiki_corpus

    try:
        articles = wiki_corpus.load_articles()
    except ImportError:
        raise SourceMissing("gensim's Wikipedia dump is missing: pip install gensim") from None
    for title, text in articles:
        yield f"wiki/{title}", text


SOURCES: tuple[TextSource, ...] = (
    TextSource("linux-kernel-docs", "linux-doc-6.1", "apt-get install linux-doc-6.1", _kernel_docs),
    TextSource("python-docs", "python3.11-doc", "apt-get install python3.11-doc", _python_docs),
    TextSource("perl-docs", "perl-doc", "apt-get install perl-doc", _perl_docs),
    TextSource("wordnet", "wordnet-base", "apt-get install wordnet-base", _wordnet),
    TextSource("kjv-bible", "bible-kjv-text", "apt-get install bible-kjv", _kjv),
    TextSource("gensim-wikipedia", "gensim", "pip install gensim", _wiki),
)


def _package_version(package: str) -> str:
    if package == "gensim":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("gensim")
        except PackageNotFoundError:
            return "unknown"
    try:
        return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True,
                              check=True).stdout.strip() or "unknown"
    except (FileNotFoundError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------- build ----

def select_documents(sources: Iterable[tuple[str, Iterable[tuple[str, str]]]]) -> tuple[dict, dict]:
    """(source name, documents) -> ({split: [(doc id, text)] in seeded order}, {source name: counts}).

    Drops documents shorter than MIN_DOC_BYTES, mostly non-ASCII ones, and any whose normalized_key() was seen
    before (earlier sources win); splits the rest by split_of(doc id)."""
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    counts: dict[str, dict] = {}
    for name, documents in sources:
        c = counts[name] = {"found": 0, "kept": 0, "short": 0, "non_english": 0, "duplicates": 0,
                            "train_documents": 0, "heldout_documents": 0, "bytes": 0}
        for doc_id, text in documents:
            c["found"] += 1
            data = text.encode("utf-8")
            if len(data) < MIN_DOC_BYTES:
                c["short"] += 1
                continue
            if sum(b >= 128 for b in data) > MAX_NON_ASCII * len(data):
                c["non_english"] += 1
                continue
            key = normalized_key(text)
            if key in seen:
                c["duplicates"] += 1
                continue
            seen.add(key)
            split = split_of(doc_id)
            splits[split].append((doc_id, text))
            c["kept"] += 1
            c[f"{split}_documents"] += 1
            c["bytes"] += len(data)
    for split in SPLITS:  # a seeded interleaving of the sources, so any prefix or stride mixes them
        splits[split].sort(key=lambda doc: _rank(doc[0]))
    return splits, counts


def corpus_dir() -> Path:
    return cache_dir() / f"text-corpus-v{CORPUS_VERSION}"


def build(out: Path | None = None, progress: bool = True) -> dict:
    """Build the corpus into `out` (default corpus_dir()): train.bin, heldout.bin (uint8 bytes) and manifest.json."""
    out = Path(out or corpus_dir())
    for source in SOURCES:  # every source is checked before any is parsed
        if source.name != "gensim-wikipedia":
            try:
                next(source.documents())
            except StopIteration:
                raise SourceMissing(f"{source.name} yielded no documents: {source.install}") from None

    def logged(source: TextSource):
        if progress:
            print(f"reading {source.name} ({source.package})", file=sys.stderr, flush=True)
        return source.name, source.documents()

    splits, counts = select_documents(logged(s) for s in SOURCES)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in SPLITS:
        data = DOC_SEPARATOR.join(text for _, text in splits[split]).encode("utf-8")
        tmp = out / f"{split}.bin.tmp{os.getpid()}"
        tmp.write_bytes(data)
        tmp.replace(out / f"{split}.bin")
        files[split] = {"bytes": len(data), "documents": len(splits[split]),
                        "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "name": "text-corpus", "version": CORPUS_VERSION, "tokenizer": "bytes (UTF-8)",
        "split": {"rule": f"sha256('{SPLIT_SEED}:' + document id) -> first 8 bytes as an integer; "
                          f"held out when it is < {HELDOUT_PER_MILLE} mod 1000",
                  "seed": SPLIT_SEED, "heldout_per_mille": HELDOUT_PER_MILLE,
                  "order": "documents of each split sorted by that integer, joined by a blank line"},
        "dedup": "drop a document whose sha1(lower-cased text, non-alphanumeric runs -> one space) equals an "
                 "earlier one's (sources in the order listed)",
        "filters": {"min_document_bytes": MIN_DOC_BYTES, "max_non_ascii_fraction": MAX_NON_ASCII},
        "sources": [{"name": s.name, "package": s.package, "version": _package_version(s.package),
                     "install": s.install, **counts[s.name]} for s in SOURCES],
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "total_documents": sum(f["documents"] for f in files.values()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# --------------------------------------------------------------------------------------------------- use ----

class CorpusUnavailable(RuntimeError):
    """The corpus cannot be built or does not match its manifest (the task reports it as a user error)."""


def _user_error(message: str) -> Exception:
    return CorpusUnavailable(message)


@lru_cache(maxsize=1)
def _manifest() -> dict:
    """The cached corpus's manifest, building the corpus first if it is not there; its sha256s must match the
    manifest committed beside this file (the corpus the family was trained on)."""
    folder = corpus_dir()
    if not (folder / "manifest.json").is_file():
        try:
            build(folder)
        except SourceMissing as exc:
            raise _user_error(f"text corpus not built ({folder}) and a source is missing: {exc}") from None
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    if MANIFEST_IN_REPO.is_file():
        expected = json.loads(MANIFEST_IN_REPO.read_text(encoding="utf-8"))["files"]
        for split in SPLITS:
            if manifest["files"][split]["sha256"] != expected[split]["sha256"]:
                raise _user_error(f"{folder}/{split}.bin differs from {MANIFEST_IN_REPO.name} (other package "
                                  f"versions?): rebuild with `python -m samples.text_corpus build --force` or "
                                  f"compare the two manifests' sources")
    return manifest


@lru_cache(maxsize=2)
def split_tokens(split: str) -> np.ndarray:
    """All documents of `split` ('train' or 'heldout') as one uint8 byte stream (read-only memory map)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    expected = _manifest()["files"][split]
    tokens = np.memmap(corpus_dir() / f"{split}.bin", dtype=np.uint8, mode="r")
    if len(tokens) != expected["bytes"]:
        raise _user_error(f"{corpus_dir()}/{split}.bin holds {len(tokens)} bytes, its manifest says "
                          f"{expected['bytes']}: rebuild with `python -m samples.text_corpus build --force`")
    return tokens


def corpus_fingerprint() -> str:
    files = _manifest()["files"]
    return hashlib.sha256((files["train"]["sha256"] + files["heldout"]["sha256"]).encode()).hexdigest()[:16]


def describe() -> dict:
    """What a training record says about the corpus."""
    return {"name": f"text-corpus-v{CORPUS_VERSION}", "sha": corpus_fingerprint(), "tokenizer": "bytes",
            "heldout": f"{HELDOUT_PER_MILLE / 10:g}% of documents by seeded hash"}


def heldout_windows(context: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping [N, context + 1] int64 windows of held-out text: inputs are [:, :-1], targets [:, 1:].
    With max_windows, that many windows spread evenly over the whole split (so a few windows still mix the
    sources), always the same ones."""
    tokens = split_tokens("heldout")
    total = (len(tokens) - 1) // context
    picked = np.arange(total)
    if max_windows is not None and max_windows < total:
        picked = np.linspace(0, total - 1, max_windows).round().astype(np.int64)
    return np.stack([tokens[s * context : s * context + context + 1] for s in picked]).astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samples.text_corpus", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build the corpus into the compressor cache")
    build_cmd.add_argument("--force", action="store_true", help="rebuild even if it is there")
    build_cmd.add_argument("--out", type=Path, default=None, help=f"folder (default {corpus_dir()})")
    commands.add_parser("info", help="print the cached corpus's manifest")
    args = parser.parse_args(argv)
    if args.command == "info":
        path = corpus_dir() / "manifest.json"
        print(path.read_text() if path.is_file() else f"not built: {path} is missing")
        return 0
    out = args.out or corpus_dir()
    if (out / "manifest.json").is_file() and not args.force:
        print(f"already built: {out} (--force rebuilds)")
        return 0
    try:
        manifest = build(out)
    except SourceMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for source in manifest["sources"]:
        print(f"{source['name']:<18} {source['package']} {source['version']}: {source['kept']} of "
              f"{source['found']} documents ({source['duplicates']} duplicates, {source['short']} short, "
              f"{source['non_english']} non-English dropped), {source['bytes'] / 1e6:.1f} MB")
    files = manifest["files"]
    print(f"train {files['train']['bytes'] / 1e6:.1f} MB ({files['train']['documents']} documents), heldout "
          f"{files['heldout']['bytes'] / 1e6:.1f} MB ({files['heldout']['documents']} documents) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
