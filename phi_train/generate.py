"""Batched incremental decoding with the KV cache, for sampling during training and for HumanEval/MBPP evaluation.

How a batch is decoded (phi-1 reports greedy pass@1 on HumanEval and MBPP, arXiv 2306.11644 Table 1, so
greedy must be exact; sampling serves pass@k):

1. prompts are sorted by length (less padding), cut into batches and **left-padded**, so every row's next token sits
   in the same column and one cache position per step serves the whole batch;
2. each row gets its own positions (`arange - pad`) and a boolean mask that hides its padding, so a padded prompt
   computes what it would alone;
3. one prefill pass fills the cache, then one token per step; a row that emits EOS or whose new text contains a stop
   string is finished and **dropped from the batch** (`KVCache.reorder`), so the batch shrinks as rows finish;
4. completions are decoded, cut before the first stop string and returned in the caller's order.

Sampling draws every row from its own `torch.Generator`, seeded by the caller's per-prompt `seeds` or else by
`row_seed(seed, prompt index)`, so a prompt's sample does not depend on the batch size or on which other prompts share
its batch. `row_seed` mixes the pair through splitmix64 rather than adding (`seed + i` made row 1 of seed 0 the same
stream as row 0 of seed 1, and the server's concurrent requests with nearby seeds drew the same text).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from phi_train.config import ConfigError, ModelConfig
from phi_train.errors import PhiTrainError
from phi_train.model import KVCache, PhiModel, Rotary
from phi_train.ops import FLASH_NEEDS, flash_supported


class GenerateError(PhiTrainError):
    """Bad generation arguments; one line naming the argument, its value and what would be valid."""


class TextTokenizer(Protocol):
    """What generation needs from a tokenizer (phi_train.tokenizer.Tokenizer has it)."""

    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def prompt_budget(max_seq_len: int, max_new_tokens: int) -> int:
    """Most prompt tokens kept (the last ones): room for max_new_tokens, but never less than half the context.

    The model never saw sequences longer than max_seq_len (rotary positions beyond it are untrained), so a row also
    stops when prompt + completion fill the context.
    """
    return max_seq_len - min(max_new_tokens, max_seq_len // 2)


_MASK64 = (1 << 64) - 1


def row_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for prompt `index` of a call seeded `seed`: splitmix64 of the pair, so (seed, i) and
    (seed + 1, i - 1) are unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    for _ in range(2):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1  # manual_seed takes any int, but a non-negative one stays valid on every backend


def _row_seeds(n: int, seed: int, seeds: Sequence[int] | None) -> list[int]:
    if seeds is None:
        return [row_seed(seed, i) for i in range(n)]
    if len(seeds) != n:
        raise GenerateError(f"seeds has {len(seeds)} entries for {n} prompts: give one seed per prompt (or none)")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise GenerateError(f"seeds must be non-negative integers, got {bad[0]!r}")
    return list(seeds)


def _check_args(max_new_tokens: int, temperature: float, top_p: float, batch_size: int) -> None:
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise GenerateError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise GenerateError(f"top_p={top_p} must be in (0, 1]")
    if batch_size < 1:
        raise GenerateError(f"batch_size={batch_size} must be >= 1")


def prefill_inputs(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Left-padded ids (B, L), positions (B, L), pad counts (B,) and the prefill mask (B, 1, L, L).

    The mask is causal and hides every row's padding. A padding query may still attend to itself: a query that sees no
    key makes SDPA return NaN, and a NaN value vector poisons real rows too (0 * NaN = NaN in the softmax product).
    """
    L = max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts], device=device)
    ids = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], dtype=torch.long).to(device)
    cols = torch.arange(L, device=device)
    positions = (cols[None, :] - pad[:, None]).clamp(min=0)
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    real_key = cols[None, :] >= pad[:, None]  # (B, S)
    mask = (causal[None] & real_key[:, None, :]) | torch.eye(L, dtype=torch.bool, device=device)[None]
    return ids, positions, pad, mask[:, None]


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """Next token per row from logits (B, V): argmax when temperature == 0, else temperature + nucleus sampling.

    Nucleus (Holtzman et al. 2020): keep the smallest set of most likely tokens whose mass reaches top_p (the most
    likely token always stays), renormalise, draw.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    assert generators is not None and len(generators) == probs.shape[0]
    return torch.stack([torch.multinomial(probs[row], 1, generator=g)[0] for row, g in enumerate(generators)])


class _StopWatch:
    """Finds stop strings in the newest text of a row cheaply: decode only a window of the last tokens.

    A stop string that ends in the newest token spans at most 4 tokens per character (byte-fallback pieces of a 4-byte
    UTF-8 character), so a window of 4 * longest + 4 tokens sees it whole, with spare tokens in front so that
    SentencePiece's dropped leading space of the window's first piece cannot hide it.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 4

    def hit(self, new_ids: list[int]) -> bool:
        if not self.stop:
            return False
        tail = self.tokenizer.decode(new_ids[-self.window :])
        return any(s in tail for s in self.stop)


@torch.inference_mode()
def generate_ids(
    model: PhiModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    batch_size: int = 16,
    should_stop=None,
    on_token=None,
    on_finish=None,
    progress: bool = False,
) -> list[list[int]]:
    """New token ids for every prompt (ids in), in the caller's order; EOS is not included.

    `vocab_size`: the tokenizer's size; logits of the padding rows of the embedding (vocab padded to 64) are masked.
    `should_stop(new_ids) -> bool`: a text-level stop test, called after each new token of a row.
    `on_token(index, new_ids)`: called after each new token of prompt `index` (for streaming), before should_stop; a
    true return ends that row (a client that went away).
    `seeds`: one sampling seed per prompt (default `row_seed(seed, index)`).
    `on_finish(index, reason)`: why prompt `index` ended: "stop" (EOS or should_stop), "length" (max_new_tokens or the
    context filled) or "cancelled" (on_token asked).
    Prompts longer than `prompt_budget(...)` keep their last tokens; no row grows past the model's max_seq_len.
    """
    cfg: ModelConfig = model.cfg
    _check_args(max_new_tokens, temperature, top_p, batch_size)
    row_seeds = _row_seeds(len(prompts), seed, seeds)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerateError(f"prompt {i} is empty; give at least one token (e.g. the EOS id that starts documents)")
    keep = prompt_budget(cfg.max_seq_len, max_new_tokens)
    prompts = [list(p)[-keep:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: any OOM shows up at once
    out: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="prompt")
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            results = _generate_batch(
                model,
                [prompts[i] for i in rows],
                rows,
                max_new_tokens,
                temperature,
                top_p,
                eos_id,
                vocab_size,
                row_seeds,
                should_stop,
                on_token,
                on_finish,
                device,
            )
            for i, ids in zip(rows, results):
                out[i] = ids
            if bar is not None:
                bar.update(len(rows))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out


def _next_logits(model: PhiModel, ids: torch.Tensor, **kw) -> torch.Tensor:
    """Logits (B, V) of the last position only: the LM head over a whole prefill would be B x L x V floats (16 prompts
    of 1.5k tokens x 51k vocabulary = 5 GB in fp32) just to throw all but one column away."""
    hidden = model(ids, return_hidden=True, **kw)
    return model.lm_head(hidden[:, -1])


def _generate_batch(
    model: PhiModel,
    prompts: list[list[int]],
    indices: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int | None,
    vocab_size: int | None,
    seeds: list[int],
    should_stop,
    on_token,
    on_finish,
    device: torch.device,
) -> list[list[int]]:
    """New ids of one left-padded batch; `indices` are the prompts' positions in the caller's list (into `seeds`)."""
    cfg = model.cfg
    B = len(prompts)
    ids, positions, pad, mask = prefill_inputs(prompts, pad_id=eos_id if eos_id is not None else 0, device=device)
    L = ids.shape[1]
    limit = [min(max_new_tokens, cfg.max_seq_len - len(p)) for p in prompts]  # per row: stay inside the context
    steps = max(limit)
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg.n_layer, B, cfg.n_head, L + steps, cfg.head_dim, device, dtype)
    generators = None
    if temperature > 0:
        generators = [torch.Generator(device=device).manual_seed(seeds[i]) for i in indices]
    new: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    alive = list(range(B))  # batch row -> index into `new`
    # rows of equal length need no mask and no per-row positions: attention then takes its causal kernels (flash)
    pads = [L - len(p) for p in prompts]  # host copy of `pad`, kept in step with it
    if any(pads):
        logits = _next_logits(model, ids, positions=positions, attn_mask=mask, cache=cache)
    else:
        logits = _next_logits(model, ids, cache=cache)
    for step in range(steps):
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits[:, vocab_size:] = float("-inf")
        nxt = sample_next(logits, temperature, top_p, generators)
        keep: list[int] = []
        for row, token in enumerate(nxt.tolist()):
            r = alive[row]
            seq = new[r]
            if token == eos_id:
                reasons[r] = "stop"
                continue
            seq.append(token)
            if on_token is not None and on_token(indices[r], seq):
                reasons[r] = "cancelled"
                continue
            if should_stop is not None and should_stop(seq):
                reasons[r] = "stop"
                continue
            if len(seq) >= limit[r]:
                continue
            keep.append(row)
        if not keep or step == steps - 1:
            break
        if len(keep) < len(alive):  # drop finished rows: the batch shrinks, so does every later step's work
            index = torch.tensor(keep, device=device)
            cache.reorder(index)
            nxt, pad = nxt[index], pad[index]
            pads = [pads[r] for r in keep]
            alive = [alive[r] for r in keep]
            if generators is not None:
                generators = [generators[r] for r in keep]
        if not any(pads):
            logits = _next_logits(model, nxt[:, None], cache=cache)
            continue
        S = cache.length + 1
        step_mask = (torch.arange(S, device=device)[None, :] >= pad[:, None])[:, None, None, :]  # (B, 1, 1, S)
        step_pos = (cache.length - pad)[:, None]
        logits = _next_logits(model, nxt[:, None], positions=step_pos, attn_mask=step_mask, cache=cache)
    if on_finish is not None:
        for r, reason in enumerate(reasons):
            on_finish(indices[r], reason)
    return new


def _completion_text(tokenizer: TextTokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Decode the completion as it reads after the prompt: SentencePiece drops the leading space of a sequence's first
    piece, so decoding the new ids alone would lose a space the model did write; decode prompt + new, strip the prompt."""
    if not new_ids:
        return ""
    head = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(prompt_ids + new_ids)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(new_ids)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string."""
    cut = len(text)
    for s in stop:
        if s and (i := text.find(s)) != -1:
            cut = min(cut, i)
    return text[:cut]


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (and might still become one)."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class _TextStream:
    """One prompt's completion as text deltas while it is generated: only text that the final completion will
    begin with goes out, so the deltas concatenate to exactly what generate() returns. Held back until the next
    token decides: an unfinished UTF-8 character (byte-fallback pieces decode to U+FFFD until complete) and an end
    that could be the start of a stop string."""

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int], stop: Sequence[str]):
        self.tokenizer, self.prompt_ids, self.stop = tokenizer, prompt_ids, [s for s in stop if s]
        self.head = tokenizer.decode(prompt_ids)
        self.sent = ""

    def update(self, new_ids: list[int]) -> str:
        full = self.tokenizer.decode(self.prompt_ids + new_ids)
        if not full.startswith(self.head):  # the prompt's own end re-decoded differently: wait for the final text
            return ""
        text = cut_at_stop(full[len(self.head) :], self.stop).rstrip("\ufffd")
        text = text[: len(text) - _stop_prefix_len(text, self.stop)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, final: str) -> str:
        return final[len(self.sent) :] if final.startswith(self.sent) else ""


def generate(
    model: PhiModel,
    tokenizer: TextTokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    batch_size: int = 16,
    on_text=None,
    cancelled=None,
    on_finish=None,
    fixed_length: bool = False,
    progress: bool = False,
) -> list[str]:
    """Completions only (prompt not repeated), each cut before its first stop string, in the order of `prompts`.

    An empty prompt starts from EOS, the separator the model saw in front of every training document.
    `on_text(index, delta)` streams: called with each new piece of prompt `index`'s completion as tokens arrive; the
    pieces of a prompt concatenate to exactly its returned completion. `cancelled(index) -> bool`, checked after each
    token, ends that prompt's decoding early (its text is then whatever was generated so far).
    `seeds` / `on_finish`: as `generate_ids` (a stop string counts as "stop"; not with fixed_length).
    `fixed_length`: decode max_new_tokens for every prompt, cutting at EOS and stop strings only afterwards, so the
    number of forward passes does not depend on what is sampled (ranks of a ZeRO-3 model must all run the same ones).
    """
    if isinstance(prompts, str):
        raise GenerateError("prompts must be a list of strings, got a single string (wrap it: [prompt])")
    if fixed_length and (on_text is not None or on_finish is not None):
        raise GenerateError("fixed_length=True decodes past EOS and stop strings: it cannot stream (on_text/on_finish)")
    encoded = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
    watch = _StopWatch(tokenizer, stop)
    keep = prompt_budget(model.cfg.max_seq_len, max_new_tokens)
    streams = [_TextStream(tokenizer, p[-keep:], stop) for p in encoded] if on_text is not None else None

    def on_token(index: int, new_ids: list[int]) -> bool:
        if streams is not None and (delta := streams[index].update(new_ids)):
            on_text(index, delta)
        return cancelled is not None and cancelled(index)

    new = generate_ids(
        model,
        encoded,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=None if fixed_length else tokenizer.eos_id,
        vocab_size=tokenizer.vocab_size,
        seed=seed,
        seeds=seeds,
        batch_size=batch_size,
        should_stop=watch.hit if watch.stop and not fixed_length else None,
        on_token=on_token if streams is not None or cancelled is not None else None,
        on_finish=on_finish,
        progress=progress,
    )
    if fixed_length:  # what decoding would have stopped at
        new = [n[: n.index(tokenizer.eos_id)] if tokenizer.eos_id in n else n for n in new]
    texts = [cut_at_stop(_completion_text(tokenizer, p[-keep:], n), stop) for p, n in zip(encoded, new)]
    for i, text in enumerate(texts if streams is not None else ()):
        if delta := streams[i].finish(text):
            on_text(i, delta)
    return texts


def build_model(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    device="cpu",
    dtype: torch.dtype | None = None,
    *,
    attention: str = "auto",
    cpu_matmul: str = "onednn",
) -> PhiModel:
    """A PhiModel holding `state`, without paying for a random init first (built on the meta device); `attention` and
    `cpu_matmul` pick its kernels (config `kernels.*`).

    The rotary tables are rebuilt after the dtype cast: they are fp32 on purpose (model.py's apply_rotary), and a
    blanket `.to(bfloat16)` would round them.
    """
    vocab = state["wte.weight"].shape[0]
    with torch.device("meta"):
        model = PhiModel(cfg, vocab_size=vocab, attention=attention, cpu_matmul=cpu_matmul)
    if model.vocab_size != vocab:
        raise ConfigError(
            f"checkpoint embedding has {vocab} rows but model.vocab_size={cfg.vocab_size} pads to {model.vocab_size}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary = Rotary(cfg.rotary_dim, cfg.max_seq_len, cfg.rotary_base)  # its buffers were never materialised
    model.to(device=device, dtype=dtype)
    model.rotary = Rotary(cfg.rotary_dim, cfg.max_seq_len, cfg.rotary_base).to(device)
    if attention == "flash" and not flash_supported(model.wte.weight.device, model.wte.weight.dtype):
        raise ConfigError(FLASH_NEEDS)  # now, not at the first request
    return model.eval()


def load_for_inference(
    path: str,
    device="cpu",
    dtype: torch.dtype | None = None,
    tag: str | None = None,
    *,
    attention: str = "auto",
    cpu_matmul: str = "onednn",
):
    """(PhiModel, Tokenizer) from a phi_train checkpoint directory or a transformers Phi export (has config.json).

    The kernels are this caller's choice (`attention`: auto | flash | sdpa, `cpu_matmul`: onednn | blas), whatever
    the run that wrote the checkpoint used."""
    from phi_train.tokenizer import Tokenizer

    p = Path(path)
    if (p / "config.json").exists():
        from phi_train.interop import import_hf

        cfg, state = import_hf(p)
        tok_path = p / "tokenizer.model"
        if not tok_path.exists():
            raise ConfigError(f"{p} has config.json but no tokenizer.model (export with launch/export.py)")
    else:
        from phi_train.checkpoint import load_model_state

        cfg, state, meta = load_model_state(str(p), tag)
        tok = meta.get("tokenizer")
        tok_path = tok.get("path") if isinstance(tok, dict) else tok
        if not tok_path:
            raise ConfigError(f"checkpoint {p} does not record its tokenizer (meta.json key 'tokenizer')")
    return build_model(cfg, state, device, dtype, attention=attention, cpu_matmul=cpu_matmul), Tokenizer(str(tok_path))


@torch.inference_mode()
def embed_texts(model: PhiModel, tokenizer: TextTokenizer, texts: Sequence[str], *, max_tokens: int = 512,
                batch_size: int = 16) -> torch.Tensor:  # fmt: skip
    """Mean-pooled final hidden states (after ln_f), one row per text: the embedding phi-1 §2.1 fits its quality
    classifier on. Texts are cut to their first `max_tokens` tokens; padding is excluded from the mean."""
    device = next(model.parameters()).device
    max_tokens = min(max_tokens, model.cfg.max_seq_len)
    out = []
    for i in range(0, len(texts), batch_size):
        ids = [tokenizer.encode(t)[:max_tokens] or [tokenizer.eos_id] for t in texts[i : i + batch_size]]
        width = max(len(x) for x in ids)
        batch = torch.full((len(ids), width), tokenizer.eos_id, dtype=torch.long, device=device)
        keep = torch.zeros(len(ids), width, 1, device=device)
        for row, x in enumerate(ids):  # right padding: causal attention keeps real tokens blind to it
            batch[row, : len(x)] = torch.tensor(x, device=device)
            keep[row, : len(x)] = 1.0
        hidden = model(batch, return_hidden=True).float()  # (B, T, C)
        out.append((hidden * keep).sum(1) / keep.sum(1))
    return torch.cat(out).cpu()
