"""Packing: fixed length, cu_seqlens, no cross-sequence labels; PackSource order, sharding and resume."""

import itertools
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pear_mega.data import (
    PackSource,
    TokenizedExample,
    build_pack,
    first_fit,
    pack_examples,
)


def example(n, seed, source=""):
    """A synthetic shifted example: loss on a random suffix, labels = next token there."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 1000, (n,), generator=g)
    labels = torch.full((n,), -100)
    start = int(torch.randint(0, n, (1,), generator=g))
    labels[start:n - 1] = tokens[start + 1:]
    blp = torch.where(labels != -100, -torch.rand(n, generator=g), torch.zeros(n))
    return TokenizedExample(tokens, labels, blp, source=source or f"s{seed}")


def test_build_pack_hand_layout():
    a = TokenizedExample(torch.tensor([5, 6, 7]), torch.tensor([6, 7, -100]), torch.tensor([-0.5, -0.25, 0.0]), "a")
    b = TokenizedExample(torch.tensor([8, 9]), torch.tensor([9, -100]), torch.tensor([-1.0, 0.0]), "b")
    p = build_pack([a, b], seq_length=8, pad_id=0)
    assert p.tokens.tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert p.labels.tolist() == [6, 7, -100, 9, -100, -100, -100, -100]
    assert p.behavior_logprobs.tolist() == [-0.5, -0.25, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    assert p.cu_seqlens.tolist() == [0, 3, 5, 8] and p.cu_seqlens.dtype == torch.int32
    assert p.num_real_tokens == 5 and p.num_loss_tokens == 3 and p.sources == ("a", "b")
    full = build_pack([a, a, b], seq_length=8, pad_id=0)  # exactly full: no pad sequence
    assert full.cu_seqlens.tolist() == [0, 3, 6, 8]


def test_first_fit_hand():
    # 5→bin0 (3 left), 4→bin1 (4 left), 3→bin0 (full), 2→bin1 (2 left), 6→bin2.
    assert first_fit([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    with pytest.raises(ValueError, match="an example of 9 tokens does not fit in a pack of 8"):
        first_fit([3, 9], 8)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(2, 32), min_size=1, max_size=40), seq_length=st.integers(32, 64))
def test_packs_are_fixed_length_and_lossless(lengths, seq_length):
    examples = [example(n, k) for k, n in enumerate(lengths)]
    packs = pack_examples(examples, seq_length, pad_id=1)
    seen = []
    for p in packs:
        assert p.tokens.shape == p.labels.shape == p.behavior_logprobs.shape == (seq_length,)
        cu = p.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == seq_length and all(x < y for x, y in itertools.pairwise(cu))
        # Every sequence ends with label -100: no label crosses into the next sequence.
        assert all(p.labels[end - 1] == -100 for end in cu[1:])
        for k, (s, e) in enumerate(itertools.pairwise(cu)):
            if k < len(p.sources):
                ex = examples[int(p.sources[k][1:])]
                assert torch.equal(p.tokens[s:e], ex.tokens) and torch.equal(p.labels[s:e], ex.labels)
                assert torch.equal(p.behavior_logprobs[s:e], ex.behavior_logprobs)
                seen.append(int(p.sources[k][1:]))
            else:  # the pad tail
                assert k == len(cu) - 2 and (p.labels[s:e] == -100).all() and (p.tokens[s:e] == 1).all()
                assert (p.behavior_logprobs[s:e] == 0).all()
        assert p.num_real_tokens == sum(lengths[int(src[1:])] for src in p.sources)
    assert sorted(seen) == list(range(len(lengths)))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, tokenizer):
    """30 rows of varying length (16..70 tokens) in one jsonl file."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "seven", "nine"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    path = tmp_path_factory.mktemp("packdata") / "rows.jsonl"
    with open(path, "w") as f:
        for k in range(30):
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [im_end]
            lps = [-rng.random() for _ in ids]
            f.write(json.dumps({"messages": [{"role": "system", "content": "s"},
                                             {"role": "user", "content": f"q{k}"},
                                             {"role": "assistant", "content": answer, "token_ids": ids,
                                              "logprobs": lps}]}) + "\n")
    return str(path)


@pytest.fixture
def source(data_file, tokenizer, tmp_path):
    def make(seed=1, dp_rank=0, dp_size=1):
        return PackSource(train_files=[data_file], tokenizer_path="unused", seq_length=96, seed=seed,
                          dp_rank=dp_rank, dp_size=dp_size, cache_dir=str(tmp_path / "hf"), tokenizer=tokenizer)
    return make


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("tokens", "labels", "behavior_logprobs", "cu_seqlens"))


def test_pack_source_stream(source):
    src = source()
    n = len(src)
    assert n == len(src.packs) >= 10 and src.stats.examples == 30
    first_epoch = [src.next_pack() for _ in range(n)]
    for p in first_epoch:
        assert p["tokens"].shape == (96,) and p["cu_seqlens"].dtype == torch.int32
    # One epoch visits every pack once; the next epoch is another order of the same packs.
    index = {tuple(q.tokens.tolist()): k for k, q in enumerate(src.packs)}
    assert len(index) == n and sorted(index[tuple(p["tokens"].tolist())] for p in first_epoch) == list(range(n))
    second_epoch = [src.next_pack() for _ in range(n)]
    assert src.epoch == 1 and not all(same(a, b) for a, b in zip(first_epoch, second_epoch))
    # Deterministic: the same seed gives the same stream, another seed another one.
    again = source()
    assert all(same(again.next_pack(), p) for p in first_epoch + second_epoch)
    other = source(seed=2)
    assert not all(same(other.next_pack(), p) for p in first_epoch)


def test_dp_shards_are_disjoint(source):
    whole = source()
    ranks = [source(dp_rank=r, dp_size=2) for r in range(2)]
    per_rank = len(ranks[0])
    assert per_rank == len(whole) // 2
    # Global position g goes to rank g % 2: interleaving the ranks gives the 1-rank stream, across
    # epoch boundaries too (an odd number of packs drops nothing), so a step's data is layout-free.
    for _ in range(3 * per_rank + 3):
        for r in ranks:
            assert same(r.next_pack(), whole.next_pack())


@pytest.mark.parametrize("taken", [3, 13, 25])
def test_resume_gives_the_exact_next_pack(source, taken):
    src = source()
    for _ in range(taken):  # 13 and 25 cross an epoch boundary
        src.next_pack()
    state = json.loads(json.dumps(src.state_dict()))  # checkpoints store it as JSON
    resumed = source()
    resumed.load_state_dict(state)
    for _ in range(len(src) + 2):
        assert same(resumed.next_pack(), src.next_pack())


def test_resume_with_other_dp_size_and_changed_data(source):
    src = source()
    for _ in range(4):
        src.next_pack()
    state = src.state_dict()
    ranks = [source(dp_rank=r, dp_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for _ in range(3):
        for r in ranks:
            assert same(r.next_pack(), src.next_pack())
    bad = dict(state, fingerprint="0" * 16)
    with pytest.raises(ValueError, match="fingerprint is '0000000000000000' in the checkpoint but"):
        source().load_state_dict(bad)
    odd = dict(state, consumed=3)
    with pytest.raises(ValueError, match="3 packs consumed do not divide over 2"):
        ranks[0].load_state_dict(odd)
