"""The forgetting rule's default set is text the tiny base never trained on, in pretraining or in SFT."""

from __future__ import annotations

import json

from tasks.core.config import REPO_ROOT, load_config
from tasks.plumbing.general_text import general_documents, shingles
from tasks.plumbing.tiny_corpus import pretraining_corpus


def test_the_default_general_set_shares_no_passage_with_any_training_text() -> None:
    texts, source = general_documents(load_config(overrides=[("gate.max_general_ppl_increase", 0.1)]))
    train, heldout = pretraining_corpus()
    assert 10 <= len(texts) < len(heldout)  # some held-out tails are quoted by other topics: dropped
    assert "never trained on" in source
    rows = [json.loads(line) for line in (REPO_ROOT / "data" / "qa.jsonl").open(encoding="utf-8")]
    sft = shingles(r[k] for r in rows for k in ("question", "answer"))
    pretraining = shingles(text for _, text in train)
    for text in texts:
        assert not shingles([text]) & (pretraining | sft), text[:80]
    assert sum(len(t.split()) for t in texts) > 1000  # enough tokens for a perplexity worth gating on
