"""The text corpus builder on tiny synthetic inputs: cleaning, dedup, split, manifest, missing sources."""
import hashlib
import json

import numpy as np
import pytest

from samples import text_corpus
from samples.text_corpus import (SourceMissing, TextSource, clean_pod, clean_rst, html_to_text, kjv_chapters,
                                 normalized_key, select_documents, split_of, wordnet_synset_line)

PROSE = "The kernel keeps a reference count on every object it hands out, and frees it at zero. " * 4


def test_clean_rst_drops_markup_and_non_prose_directives():
    text = """.. SPDX-License-Identifier: GPL-2.0

=========
Reference
=========

:Author: Someone <someone@example.org>

.. toctree::
   :maxdepth: 2

   intro
   usage

Call :c:func:`kref_get` with ``struct kref`` or see :ref:`the rules <kref-rules>` and `LWN <https://lwn.net>`_.
This is **important** and *emphasised*.

.. note::
   The body of a note is prose and stays.

.. code-block:: c

   int x = 1;

Example::

    kref_init(&k);
"""
    assert clean_rst(text) == """Reference

Call kref_get with struct kref or see the rules and LWN.
This is important and emphasised.

   The body of a note is prose and stays.

Example:

    kref_init(&k);"""


def test_html_to_text_keeps_only_the_main_body():
    html = """<html><head><script>var x = 1;</script></head><body>
<div class="sphinxsidebar">Navigation</div>
<div class="body" role="main"><section><h1>Built-in Functions<a class="headerlink" href="#x">¶</a></h1>
<p>The   Python interpreter has <em>many</em>
functions.</p><div class="highlight"><pre>def f():
    return 1</pre></div></section></div>
<div class="footer">Copyright</div></body></html>"""
    assert html_to_text(html) == ("Built-in Functions\n\nThe Python interpreter has many functions.\n\n"
                                  "def f():\n    return 1")


def test_clean_pod_unwraps_codes_and_drops_commands():
    pod = """=pod

=head1 NAME

perlintro - a B<brief> introduction with C<use strict> and L<perlsyn|perlsyn/Loops>.

=over 4

=item *

Nested B<C<code>> and E<lt>angleE<gt> and C<< $a <=> $b >>X<index entry>.

=back

=begin html

<p>dropped</p>

=end html

=cut
"""
    assert clean_pod(pod) == """NAME

perlintro - a brief introduction with use strict and perlsyn.

*

Nested code and <angle> and $a <=> $b."""


def test_wordnet_line_and_kjv_chapters():
    line = ("00001930 03 n 02 physical_entity 0 matter(a) 1 007 @ 00001740 n 0000 | an entity that has "
            "physical existence  ")
    assert wordnet_synset_line(line) == "physical entity, matter: an entity that has physical existence"
    assert wordnet_synset_line("  1 This software and database is being provided") is None
    output = "\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth.\n1 Kings 2\n  1 Now the days.\n"
    assert list(kjv_chapters(output)) == [("Genesis 1", "Genesis 1\n1 In the beginning.\n2 And the earth."),
                                          ("1 Kings 2", "1 Kings 2\n1 Now the days.")]


def test_dedup_by_normalized_text_short_and_non_english_documents():
    assert normalized_key("Hello,  World!\n") == normalized_key("hello world")
    sources = [
        ("a", [("a/1", PROSE), ("a/2", "too short"), ("a/3", "日本語のテキストです。" * 40)]),
        ("b", [("b/1", PROSE.upper().replace(",", " ;")), ("b/2", PROSE + " Another.")]),
    ]
    splits, counts = select_documents(sources)
    assert {k: counts["a"][k] for k in ("found", "kept", "short", "non_english", "duplicates")} == {
        "found": 3, "kept": 1, "short": 1, "non_english": 1, "duplicates": 0}
    assert counts["b"]["duplicates"] == 1 and counts["b"]["kept"] == 1  # the upper-cased copy of a/1 is dropped
    kept = sorted(doc_id for split in splits.values() for doc_id, _ in split)
    assert kept == ["a/1", "b/2"]


def test_split_is_by_document_seeded_and_about_three_percent():
    ids = [f"src/{i}" for i in range(40_000)]
    assignments = [split_of(doc_id) for doc_id in ids]
    assert assignments == [split_of(doc_id) for doc_id in ids]  # deterministic
    assert 0.025 < assignments.count("heldout") / len(ids) < 0.035  # measured 0.0330
    assert [split_of(d, seed=1) for d in ids] != assignments  # the seed matters
    docs = [(doc_id, f"document {doc_id} " + PROSE) for doc_id in ids[:300]]
    splits, _ = select_documents([("src", docs)])
    train_ids = {d for d, _ in splits["train"]}
    heldout_ids = {d for d, _ in splits["heldout"]}
    assert not train_ids & heldout_ids and len(train_ids | heldout_ids) == 300
    assert all(split_of(d) == "heldout" for d in heldout_ids)


@pytest.fixture
def tiny_corpus(tmp_path, monkeypatch):
    """The whole build -> load path on two synthetic sources, in a temporary cache."""
    docs = [(f"s/{i}", f"Document number {i}. " + PROSE) for i in range(400)]
    monkeypatch.setattr(text_corpus, "SOURCES", (
        TextSource("first", "first-pkg", "apt-get install first-pkg", lambda: iter(docs[:200])),
        TextSource("second", "second-pkg", "apt-get install second-pkg", lambda: iter(docs[150:])),
    ))
    monkeypatch.setattr(text_corpus, "_package_version", lambda package: "1.0")
    monkeypatch.setattr(text_corpus, "MANIFEST_IN_REPO", tmp_path / "no-manifest.json")
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    for cached in (text_corpus._manifest, text_corpus.split_tokens):
        cached.cache_clear()
    yield text_corpus.build(progress=False)
    for cached in (text_corpus._manifest, text_corpus.split_tokens):
        cached.cache_clear()


def test_build_writes_manifest_and_splits(tiny_corpus):
    manifest = tiny_corpus
    folder = text_corpus.corpus_dir()
    assert [s["name"] for s in manifest["sources"]] == ["first", "second"]
    assert manifest["sources"][1]["duplicates"] == 50  # docs 150..199 were already read from "first"
    assert manifest["total_documents"] == 400
    for split in ("train", "heldout"):
        data = (folder / f"{split}.bin").read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["files"][split]["sha256"]
        assert len(text_corpus.split_tokens(split)) == len(data)
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    heldout = text_corpus.split_tokens("heldout").tobytes().decode()
    train = text_corpus.split_tokens("train").tobytes().decode()
    assert heldout and all(doc not in train for doc in heldout.split("\n\n"))
    windows = text_corpus.heldout_windows(32, 4)
    assert windows.shape == (4, 33) and windows.dtype == np.int64
    every = text_corpus.heldout_windows(32)
    assert np.array_equal(windows[0], every[0]) and np.array_equal(windows[-1], every[-1])  # spread over the split


def test_a_missing_source_is_one_line_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(text_corpus, "KERNEL_DOCS", tmp_path / "absent")
    with pytest.raises(SourceMissing) as caught:
        text_corpus.build(tmp_path / "out", progress=False)
    message = str(caught.value)
    assert "\n" not in message and message.endswith("apt-get install linux-doc-6.1")
    assert text_corpus.main(["build", "--out", str(tmp_path / "out")]) == 2
