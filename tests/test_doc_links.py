"""The docs' relative links name files that exist: the README's results table and the results
index point at published runs, which a rename or a removal must not leave dangling."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "experiments/results/README.md")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")  # [text](target), anchors dropped


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
  with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
    targets = LINK.findall(f.read())
  local = [t for t in targets if not re.match(r"[a-z]+:", t)]  # not http:, https:, mailto:
  assert local, f"{doc} has no relative links: is the pattern stale?"
  here = os.path.dirname(os.path.join(ROOT, doc))
  missing = [t for t in local if not os.path.exists(os.path.normpath(os.path.join(here, t)))]
  assert not missing, f"{doc}: links to missing files: {missing}"
