"""Conversation + behavior tokens → one packed-shifted training example, with alignment checks.

Layout (``docs/architecture.md``, "Packed, shifted layout"): for a sequence of ``n`` tokens

    tokens            [n]  int64    the rendered conversation
    labels            [n]  int64    labels[t] = tokens[t+1] if token t+1 is a loss token, else -100
    behavior_logprobs [n]  float32  log πβ(labels[t] | tokens[..t]) where labels[t] != -100, else 0

and ``labels[n-1] = -100`` (nothing follows the last token).

How the sequence is built. The conversation is rendered with the tokenizer's chat template
(``apply_chat_template(..., tokenize=False)``). For every loss span (assistant message *i*) the
template must render ``render(messages[:i], add_generation_prompt=True) + content`` as a prefix of
the full text — this locates the content's characters exactly (a template that rewrites the
content, e.g. strips whitespace or drops earlier reasoning, is an error, never a guess). The text
between spans is tokenized piecewise (``add_special_tokens=False``: the template writes its own
special tokens, as ``apply_chat_template(tokenize=True)`` does) and the span itself is the
*stored* ``token_ids``: the trained tokens ARE the behavior tokens, whatever the tokenizer would
make of the text.

End-of-turn rule. The template closes an assistant turn with its own tokens (ChatML:
``<|im_end|>\\n``). If the stored ``token_ids`` end with a special token, the behavior model
produced it (vLLM returns the EOS / stop token in ``token_ids`` when it stops on it): it must be
the first token the template renders after the content, it is a loss token with its stored
log-prob, and the rest of the template's suffix is context. Otherwise (the sample hit
``max_tokens``, or the data has no end-of-turn) every template token after the content is context
(label -100): πβ never produced it, so there is no log-prob to train it with.

Alignment checks, each a ``DataError`` naming file, row and field:

* the content ids (``token_ids`` without the end-of-turn token) must decode exactly to the
  message's ``content``; on a mismatch we look for the known failure — ids shifted by a few
  positions against the rendered conversation (chat-template tokens included in, or missing
  from, ``token_ids``) — and name the shift;
* ``token_check="retokenize"`` (default) additionally requires that re-tokenizing the rendered
  text gives exactly the stored ids on the content's characters. Sampling can produce a
  non-canonical tokenization of the same text (e.g. ``"Hel" + "lo"``), which this rejects;
  ``token_check="decode"`` accepts those (the decode check still applies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pear_mega.data.format import Conversation, LossSpan

IGNORE_INDEX = -100
TOKEN_CHECKS = ("retokenize", "decode")
# How far (in tokens) to look for a shifted copy of the stored ids when diagnosing a mismatch.
MAX_DIAGNOSED_SHIFT = 8


@dataclass
class TokenizedExample:
    """One sequence in the packed-shifted layout (see module docstring). All tensors ``[n]``."""

    tokens: torch.Tensor
    labels: torch.Tensor
    behavior_logprobs: torch.Tensor
    source: str
    """``file:row`` of the row this came from."""
    truncated: bool = False
    topk_ids: torch.Tensor | None = None
    """``[n, K]`` int64 teacher top-K of each label (shifted like ``behavior_logprobs``), -1 = empty
    slot; None when the row stores no top-K."""
    topk_logprobs: torch.Tensor | None = None
    """``[n, K]`` float32 log-probs of ``topk_ids`` (0 in empty slots)."""

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class RenderedSpan:
    """An assistant message's character span in the rendered text."""

    message_index: int
    start: int
    end: int


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, template_kwargs: dict) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)


def render_conversation(tokenizer, conv: Conversation, message_indices: list[int],
                        template_kwargs: dict | None = None) -> tuple[str, list[RenderedSpan]]:
    """Render ``conv`` with the chat template and locate the content of the given assistant messages.

    Returns:
        (full rendered text, one ``RenderedSpan`` per index in ``message_indices``, in order).
    """
    kwargs = template_kwargs or {}
    try:
        full = _render(tokenizer, conv.messages, False, kwargs)
    except Exception as exc:
        raise conv.error("messages", f"the chat template cannot render this conversation: {exc}",
                         "alignment") from exc
    spans, prev_end = [], 0
    for i in sorted(message_indices):
        content = conv.messages[i]["content"]
        name = conv.content_field(i)
        if i == 0:
            raise conv.error(name, "an assistant loss span needs a preceding message", "alignment")
        prefix = _render(tokenizer, conv.messages[:i], True, kwargs)
        start, end = len(prefix), len(prefix) + len(content)
        if not full.startswith(prefix) or full[start:end] != content or start < prev_end:
            got = full[start:end] if full.startswith(prefix) else full[:len(prefix)]
            raise conv.error(
                name, "the chat template does not render this assistant message as "
                "render(previous messages, add_generation_prompt=True) + content (it rewrites the content "
                f"or earlier turns); rendered {got!r}, content {content!r}", "alignment")
        spans.append(RenderedSpan(i, start, end))
        prev_end = end
    return full, spans


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def special_ids(tokenizer) -> set[int]:
    """Ids the end-of-turn rule treats as special (the tokenizer's special and added-special tokens)."""
    ids = set(tokenizer.all_special_ids)
    for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return ids


class _Retokenized:
    """The full rendered text tokenized once, with character offsets (fast tokenizers only)."""

    def __init__(self, tokenizer, text: str):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("token_check='retokenize' needs a fast (Rust) tokenizer for character offsets; "
                             "use token_check='decode'")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        self.ids = list(enc["input_ids"])
        self.offsets = [tuple(o) for o in enc["offset_mapping"]]

    def span(self, start: int, end: int) -> tuple[int, list[int], bool]:
        """(index of the first token in [start, end), ids of tokens inside, whether a token straddles a bound)."""
        first, inside, straddles = None, [], False
        for k, (s, e) in enumerate(self.offsets):
            if e <= start or s >= end:
                continue
            if s < start or e > end:
                straddles = True
                continue
            if first is None:
                first = k
            inside.append(self.ids[k])
        if first is None:  # empty content: position where it would start
            first = next((k for k, (s, _) in enumerate(self.offsets) if s >= start), len(self.ids))
        return first, inside, straddles


def _token_repr(tokenizer, ids: list[int]) -> str:
    return repr(tokenizer.convert_ids_to_tokens(ids))


def _diagnose(tokenizer, retok: _Retokenized, first: int, ids: list[int]) -> str:
    """Explain a mismatch: a shift by a few tokens against the rendered conversation, if that is what it is."""
    n = len(ids)
    for shift in sorted(range(-MAX_DIAGNOSED_SHIFT, MAX_DIAGNOSED_SHIFT + 1), key=abs):
        lo = first + shift
        if shift == 0 or lo < 0 or lo + n > len(retok.ids):
            continue
        if retok.ids[lo:lo + n] == ids:
            if shift < 0:
                extra = retok.ids[lo:first]
                return (f"token_ids are shifted by {shift} tokens: they start with {-shift} chat-template token(s) "
                        f"{_token_repr(tokenizer, extra)} before the content (and miss its last tokens)")
            missing = retok.ids[first:lo]
            return (f"token_ids are shifted by +{shift} tokens: they miss the content's first token(s) "
                    f"{_token_repr(tokenizer, missing)} (and run past the content)")
    return ""


def _check_span(tokenizer, conv: Conversation, span: LossSpan, content: str, content_ids: list[int],
                full: str, retok: _Retokenized | None, rspan: RenderedSpan) -> None:
    """Run the alignment checks of one loss span (``retok`` None: decode check only)."""
    decoded = _decode(tokenizer, content_ids)
    if decoded != content:
        # Only now pay for a retokenization in "decode" mode: it names the shift, if there is one.
        helper = retok if retok is not None else _Retokenized(tokenizer, full)
        first, _, _ = helper.span(rspan.start, rspan.end)
        why = _diagnose(tokenizer, helper, first, span.token_ids) or _diagnose(tokenizer, helper, first, content_ids)
        head = f"{why}; " if why else ""
        raise conv.error(span.ids_field, f"{head}the token ids decode to {decoded[:200]!r} but the content is "
                         f"{content[:200]!r}", "alignment")
    if retok is None:
        return
    _, canonical, straddles = retok.span(rspan.start, rspan.end)
    if straddles or canonical != content_ids:
        if straddles:
            detail = "a token of the rendered text straddles the content boundary"
        else:
            j = next((k for k, (a, b) in enumerate(zip(canonical, content_ids)) if a != b),
                     min(len(canonical), len(content_ids)))
            detail = (f"first difference at token {j}: stored {_token_repr(tokenizer, content_ids[j:j + 3])} vs "
                      f"re-tokenized {_token_repr(tokenizer, canonical[j:j + 3])}")
        raise conv.error(span.ids_field, "the token ids decode to the content but are not its re-tokenization "
                         f"within the rendered conversation ({detail}); sampling can produce such non-canonical "
                         "tokenizations: load with token_check='decode' to accept them", "alignment")


def tokenize_conversation(tokenizer, conv: Conversation, *, max_length: int | None = None,
                          truncate: bool = False, token_check: str = "retokenize",
                          template_kwargs: dict | None = None) -> TokenizedExample:
    """Build the packed-shifted example of a parsed row (see the module docstring for all rules).

    Args:
        tokenizer: the model's HF tokenizer (with its chat template).
        conv: a row parsed by ``pear_mega.data.format.parse_row`` (with loss spans).
        max_length: longest sequence allowed (the pack length); None = no limit.
        truncate: cut longer sequences at ``max_length`` (the loss mask simply ends) instead of
            raising. A truncated example may end up with no loss token (the caller decides).
    Returns:
        ``TokenizedExample`` with ``tokens``, ``labels``, ``behavior_logprobs`` of length n.
    Raises:
        DataError naming file, row and field on any misalignment or over-long row.
    """
    if token_check not in TOKEN_CHECKS:
        raise ValueError(f"token_check must be one of {TOKEN_CHECKS}, got {token_check!r}")
    by_index = {s.message_index: s for s in conv.spans}
    full, rspans = render_conversation(tokenizer, conv, list(by_index), template_kwargs)
    retok = _Retokenized(tokenizer, full) if token_check == "retokenize" else None
    specials = special_ids(tokenizer)
    vocab = len(tokenizer)

    tokens: list[int] = []
    loss_logprobs: dict[int, float] = {}  # token position -> log πβ of that token
    loss_topk: dict[int, tuple[list[int], list[float]]] = {}  # token position -> teacher top-K before it
    cursor, drop_first = 0, None
    for rspan in rspans:
        span = by_index[rspan.message_index]
        context = _encode(tokenizer, full[cursor:rspan.start])
        if drop_first is not None:
            context = _consume_end_of_turn(tokenizer, conv, context, drop_first)
        tokens += context
        bad = [t for t in span.token_ids if t >= vocab]
        if bad:
            raise conv.error(span.ids_field, f"token id {bad[0]} is outside the tokenizer's vocabulary of {vocab}",
                             "invalid_value")
        for k, ids in enumerate(span.topk_ids or ()):  # the teacher's top-K ids, where stored
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise conv.error(f"{span.topk_ids_field}[{k}]", f"token id {bad[0]} is outside the tokenizer's "
                                 f"vocabulary of {vocab}", "invalid_value")
        ends_turn = span.token_ids[-1] in specials
        content_ids = span.token_ids[:-1] if ends_turn else span.token_ids
        content = conv.messages[rspan.message_index]["content"]
        _check_span(tokenizer, conv, span, content, content_ids, full, retok, rspan)
        if not tokens:
            raise conv.error(span.ids_field, "the chat template renders nothing before the assistant content: "
                             "its first token would have no context to be predicted from", "alignment")
        for pos_offset, lp in enumerate(span.logprobs):
            loss_logprobs[len(tokens) + pos_offset] = lp
        for pos_offset, top in enumerate(zip(span.topk_ids or (), span.topk_logprobs or ())):
            loss_topk[len(tokens) + pos_offset] = top
        tokens += span.token_ids
        cursor = rspan.end
        drop_first = (span, span.token_ids[-1]) if ends_turn else None
    tail = _encode(tokenizer, full[cursor:])
    if drop_first is not None:
        tail = _consume_end_of_turn(tokenizer, conv, tail, drop_first)
    tokens += tail
    example = _shifted_example(conv, tokens, loss_logprobs, max_length, truncate)
    if loss_topk:
        example.topk_ids, example.topk_logprobs = _shifted_topk(loss_topk, len(example))
    return example


def _shifted_topk(loss_topk: dict[int, tuple[list[int], list[float]]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, K]`` teacher top-K tensors: the top-K stored with token p goes to position p-1 (whose
    label is token p), like its log πβ; K = the most entries at any position (at least 1), fewer are
    padded with id -1. Log-probs the format allows a hair above 0 (fp rounding) are clamped to 0."""
    k = max([1] + [len(ids) for ids, _ in loss_topk.values()])
    ids_out = torch.full((n, k), -1, dtype=torch.long)
    lps_out = torch.zeros((n, k), dtype=torch.float32)
    for p, (ids, lps) in loss_topk.items():
        if 0 < p < n and ids:  # p < n: as for the labels of a truncated example
            ids_out[p - 1, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            lps_out[p - 1, : len(lps)] = torch.tensor(lps, dtype=torch.float32).clamp_max(0.0)
    return ids_out, lps_out


def _consume_end_of_turn(tokenizer, conv: Conversation, context: list[int], produced: tuple) -> list[int]:
    """The template's suffix after a span whose ids end with end-of-turn token ``t``: must start with ``t``."""
    span, eot = produced
    if not context or context[0] != eot:
        expected = _token_repr(tokenizer, context[:1]) if context else "nothing"
        raise conv.error(span.ids_field, f"token_ids end with the special token {_token_repr(tokenizer, [eot])} but "
                         f"the chat template closes the turn with {expected}", "alignment")
    return context[1:]


def _shifted_example(conv: Conversation, tokens: list[int], loss_logprobs: dict[int, float],
                     max_length: int | None, truncate: bool) -> TokenizedExample:
    n = len(tokens)
    truncated = False
    if max_length is not None and n > max_length:
        if not truncate:
            raise conv.error(None, f"the tokenized conversation has {n} tokens, more than the sequence length "
                             f"{max_length} (set truncate=True to cut it)", "too_long")
        n, truncated = max_length, True
    tok = torch.tensor(tokens[:n], dtype=torch.long)
    labels = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
    blp = torch.zeros(n, dtype=torch.float32)
    positions = [p for p in loss_logprobs if p < n]
    if positions:
        pos = torch.tensor(positions, dtype=torch.long)
        # Shift: the log-prob of token p is attached to position p-1, whose label is token p.
        labels[pos - 1] = tok[pos]
        blp[pos - 1] = torch.tensor([loss_logprobs[p] for p in positions], dtype=torch.float32)
    return TokenizedExample(tok, labels, blp, source=f"{conv.file}:{conv.row}", truncated=truncated)


def loss_token_ids(tokenizer, conv: Conversation, message_index: int, full: str,
                   rspan: RenderedSpan) -> list[int]:
    """The ids ``collect score`` scores for an assistant message: its canonical tokens (+ end-of-turn).

    The content's tokens are those of the rendered text on its characters; the first token the
    template renders after the content is added when it is special (the end-of-turn token the
    behavior model would emit), so the scored data trains the turn's end like generated data.
    """
    retok = _Retokenized(tokenizer, full)
    _, ids, straddles = retok.span(rspan.start, rspan.end)
    if straddles:
        raise conv.error(conv.content_field(message_index), "a token of the rendered text straddles the "
                         "assistant content's boundary: the content has no token span of its own", "alignment")
    if not ids:
        raise conv.error(conv.content_field(message_index), "the assistant content is empty", "invalid_value")
    after = _encode(tokenizer, full[rspan.end:])
    if after and after[0] in special_ids(tokenizer):
        ids = ids + [after[0]]
    return ids
