"""The sampling parameters travel with the collected data: every row's ``meta.behavior`` record is
counted by the loader, and PEAR warns when the data was sampled with top-p < 1 or top-k > 0."""

import json

import pytest

from pear_mega.collect import LOGPROBS_MODE, SamplingConfig, behavior_record
from pear_mega.data import DataConfig, load_examples
from pear_mega.pear import PearConfig, truncated_sampling_warning


def test_behavior_record_fields():
    rec = behavior_record("smollm2", 0.7, 0.95, 20, LOGPROBS_MODE, max_tokens=16)
    assert rec == {"model": "smollm2", "temperature": 0.7, "top_p": 0.95, "top_k": 20,
                   "logprobs_mode": "processed_logprobs", "max_tokens": 16}


@pytest.mark.parametrize("top_k", [-1, 1.5, True])
def test_sampling_top_k_validation(top_k):
    with pytest.raises(ValueError, match="sampling.top_k"):
        SamplingConfig(top_k=top_k)


def test_loader_counts_behavior_records_and_pear_warns(tokenizer, chat_row, write_jsonl):
    nucleus = behavior_record("m", 1.0, 0.9, 0, LOGPROBS_MODE)
    full = behavior_record("m", 1.0, 1.0, 0, LOGPROBS_MODE)
    rows = [chat_row("q", "Answer: 1", meta={"behavior": nucleus}), chat_row("q", "Answer: 2", meta={"behavior": full}),
            chat_row("q", "Answer: 3", meta={"behavior": nucleus}), chat_row("q", "Answer: 4")]
    _, stats = load_examples(DataConfig(train_files=[write_jsonl(rows)], tokenizer_path="unused"), tokenizer)
    counts = {json.dumps(nucleus, sort_keys=True): 2, json.dumps(full, sort_keys=True): 1}
    assert stats.behaviors == counts
    pairs = [(json.loads(k), n) for k, n in stats.behaviors.items()]
    msg = truncated_sampling_warning(pairs, PearConfig(level="block"))
    assert "2 rows from model='m' temperature=1.0 top_p=0.9 top_k=0" in msg
    assert truncated_sampling_warning(pairs, PearConfig(level="none")) is None
